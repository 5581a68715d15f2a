"""cgkernels.patch on tiny SD1.5- and SDXL-shaped pipelines against an independent per-branch float64 reference.

The reference never touches the row expansion, routing or merge code: it wraps the UNet so that each pipeline step
runs one UNet call per branch with peft adapters switched through diffusers' set_adapters / disable_lora, combines
the branches in float64 with each mode's formula written out here, and counts steps with callback_on_step_end.
Adapters have lora_alpha != rank, so peft's scaling is part of every comparison.
"""
import contextlib
import math

import numpy as np
import pytest
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

import cgkernels
from cgkernels.guidance import compile_merge, preset
from cgkernels.testing import add_random_lora, fp32_merge_atol, tiny_sd_pipeline
from guidance_reference import rows_of

PROMPTS = ["a red circle", "a blue square at the top left"]
STEPS = 3

def _with_adapters(pipe):
    add_random_lora(pipe, "pos", rank=4, seed=1, lora_alpha=6)
    # "neg": another rank and other targets, so some layers hold only one of the adapters; conv1 (3x3) exercises
    # the segmented conv fallback, SD1.5's proj_in the 1x1-conv path and time_emb_proj a linear on [batch, features]
    # rows (the timestep embedding: one row per branch, no token axis).
    add_random_lora(pipe, "neg", rank=3, seed=2, lora_alpha=2,
                    target_modules=("to_k", "to_v", "proj_in", "ff.net.2", "conv1", "time_emb_proj"))
    pipe.unet.set_adapters(["pos", "neg"])
    return pipe

@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def pipe(request):
    return _with_adapters(tiny_sd_pipeline(request.param, seed=3))

def _run(pipe, **kwargs):
    args = dict(prompt=PROMPTS[:1], num_inference_steps=STEPS, guidance_scale=5.0, output_type="latent",
                generator=torch.Generator().manual_seed(0))
    args.update(kwargs)
    return pipe(**args).images

class Reference:
    """Wraps pipe.unet.forward: one UNet call per branch, float64 arithmetic, returns [eps, eps] (or [eps])."""

    def __init__(self, pipe, mode, strength=1.0, start=0.0, stop=1.0, merge_weight=0.0, user=("pos", "neg"),
                 lora_scale=1.0):
        self.pipe, self.mode, self.s, self.mw = pipe, mode, strength, merge_weight
        self.start, self.stop, self.user, self.lora_scale = start, stop, list(user), lora_scale
        self.step = 0
        self.unet_calls, self.branch_scale = 0, 0.0  # what the fp32 rounding bound of a comparison scales with

    def __enter__(self):
        self.original = self.pipe.unet.forward
        self.pipe.unet.forward = self.forward
        return self

    def __exit__(self, *exc):
        del self.pipe.unet.__dict__["forward"]
        self.pipe.unet.set_adapters(self.user)
        self.pipe.unet.enable_lora()

    def callback(self, pipe, i, t, kwargs):
        self.step = i + 1
        return {}

    def branch(self, adapters, half, sample, t, ehs, unet_kwargs):
        unet = self.pipe.unet
        if adapters is None:
            unet.disable_lora()
        else:
            unet.enable_lora()
            unet.set_adapters(list(adapters), [w * self.lora_scale for w in adapters.values()])
        n = sample.shape[0] // self.halves
        rows = slice(half * n, (half + 1) * n) if self.halves == 2 else slice(0, n)
        kwargs_rows = rows_of(unet_kwargs, rows, sample.shape[0])
        out = self.original(sample[rows], t, ehs[rows], **kwargs_rows, return_dict=False)[0]
        self.branch_scale = max(self.branch_scale, out.abs().max().item())
        return out.double()

    def forward(self, sample, t, encoder_hidden_states=None, return_dict=True, **unet_kwargs):
        unet_kwargs.pop("cross_attention_kwargs", None)  # the LoRA scale enters through set_adapters weights instead
        pipe, s, g = self.pipe, self.s, self.pipe.guidance_scale
        self.unet_calls += 1
        self.halves = 2 if pipe.do_classifier_free_guidance else 1
        # scheduler steps: a second-order scheduler (Heun) makes two UNet calls (loop iterations) per step
        order = pipe.scheduler.order
        n_steps = math.ceil(pipe.num_timesteps / order)
        guided = int(self.start * n_steps) <= self.step // order < int(self.stop * n_steps)

        def ev(adapters, half):
            return self.branch(adapters, half, sample, t, encoder_hidden_states, unet_kwargs)

        pos, neg = {"pos": 1.0}, {"neg": 1.0}
        U, C = 0, 1
        halves = [U, C] if self.halves == 2 else [C]
        mode = self.mode if guided else "base"
        extra = 0.0
        if mode == "base":
            e = {y: ev(None, y) for y in halves}
        elif mode == "contrastive":
            e = {y: ev(None, y) + s * (ev(pos, y) - ev(neg, y)) for y in halves}
        elif mode == "contrastive-cond":
            e = {y: ev(None, y) for y in halves}
            extra = s * (ev(pos, C) - ev(neg, C))
        elif mode == "contrastive-uncond":  # needs CFG (the patch refuses it without)
            e = {y: ev(None, y) for y in halves}
            extra = s * (ev(pos, U) - ev(neg, U))
        elif mode == "pgd":
            e = {y: ev(None, y) + s * (ev(pos, y) - ev(None, y)) for y in halves}
        elif mode == "npo":
            e = {C: ev(pos, C)}
            if U in halves:
                e[U] = ev({"neg": s, "pos": 1.0 - self.mw}, U)
        elif mode == "merged":
            e = {y: ev({"pos": s, "neg": -s}, y) for y in halves}
        elif mode == "cfg":
            e = {y: ev({a: 1.0 for a in self.user}, y) for y in halves}
        if self.halves == 2:
            eps = e[U] + g * (e[C] - e[U]) + extra
            phi = getattr(pipe, "_guidance_rescale", 0.0)  # img2img pipelines have no rescale
            if phi > 0 and mode != "base":  # the pipeline rescales base steps itself
                eps = rescale_noise_cfg(eps, e[C] + extra, phi)
            if mode == "base":
                return (torch.cat([e[U], e[C]]).to(sample.dtype),)
        else:
            eps = e[C] + extra
        return (torch.cat([eps] * self.halves).to(sample.dtype),)

def _reference(pipe, mode, patch_kwargs, call_kwargs, lora_scale=1.0, run=_run):
    """(latents, the Reference that made them)."""
    ref = Reference(pipe, mode, **{k: v for k, v in patch_kwargs.items() if k != "guidance"}, lora_scale=lora_scale)
    with ref:
        return run(pipe, callback_on_step_end=ref.callback, **call_kwargs), ref

def _atol(pipe, ref, patch_kwargs, call_kwargs) -> float:
    """Bound on the fp32 rounding difference between patched and reference latents, from the magnitudes involved:
    each UNet call's merged prediction may differ by fp32_merge_atol (the branch magnitudes the reference saw, the
    mode's merge coefficients); a scheduler step adds the prediction scaled by at most max(1, init_noise_sigma)
    (Euler / Heun: sigma_max ~ 15, PNDM: 1); the calls' differences may add up."""
    g = call_kwargs.get("guidance_scale", 5.0)
    guidance = patch_kwargs["guidance"]
    if isinstance(guidance, str):
        guidance = preset(guidance, strength=patch_kwargs.get("strength", 1.0),
                          merge_weight=patch_kwargs.get("merge_weight", 0.0))
    _, coeffs, _ = compile_merge(guidance, "cfg" if g > 1 else "cond", g)
    sigma = max(1.0, float(pipe.scheduler.init_noise_sigma))
    return ref.unet_calls * sigma * fp32_merge_atol(coeffs, ref.branch_scale,
                                                     rescale=call_kwargs.get("guidance_rescale", 0.0))

@contextlib.contextmanager
def _count_rows(pipe, rows):
    """Appends the batch size of every UNet call to `rows` (None: records nothing)."""
    if rows is None:
        yield
        return
    hook = pipe.unet.conv_in.register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[0]))
    try:
        yield
    finally:
        hook.remove()

def _check(pipe, patch_kwargs, call_kwargs=None, rows=None, run=_run):
    """Patched latents == reference latents up to fp32 rounding (`_atol`); `rows` collects the UNet batch size of
    each patched call; `run(pipe, **call_kwargs)` calls the pipeline."""
    call_kwargs = call_kwargs or {}
    mode = patch_kwargs["guidance"]
    expected, ref = _reference(pipe, mode, patch_kwargs, call_kwargs, run=run)
    cgkernels.patch(pipe, **patch_kwargs)
    try:
        with _count_rows(pipe, rows):
            out = run(pipe, **call_kwargs)
    finally:
        cgkernels.unpatch(pipe)
    atol = _atol(pipe, ref, patch_kwargs, call_kwargs)
    torch.testing.assert_close(out, expected, rtol=0, atol=atol)
    base = run(pipe, **call_kwargs)
    if mode != "cfg":  # the adapters must matter far beyond the tolerance, or the comparison proves nothing
        assert (out - base).abs().max() > 10 * atol
    return out

@pytest.mark.parametrize("mode", ["contrastive", "contrastive-cond", "contrastive-uncond", "pgd", "npo", "merged",
                                  "cfg"])
def test_mode_matches_reference(pipe, mode):
    _check(pipe, dict(guidance=mode, strength=1.5, merge_weight=0.25))

def test_batch_two_prompts_two_images(pipe):
    _check(pipe, dict(guidance="contrastive", strength=2.0),
           dict(prompt=PROMPTS, num_images_per_prompt=2, num_inference_steps=2))

def test_no_cfg_drops_uncond_rows(pipe):
    rows = []
    _check(pipe, dict(guidance="contrastive-cond", strength=1.0), dict(guidance_scale=1.0, num_inference_steps=2),
           rows=rows)
    assert rows == [3] * pipe.num_timesteps  # b(c), p(c), n(c): no uncond rows

def test_start_stop_window_and_rescale(pipe):
    rows = []
    _check(pipe, dict(guidance="contrastive", strength=1.0, start=0.25, stop=0.75), dict(guidance_rescale=0.7),
           rows=rows)
    n = pipe.num_timesteps  # PNDM runs one extra UNet call; Euler one per step
    guided = [int(0.25 * n) <= i < int(0.75 * n) for i in range(n)]
    assert 0 < sum(guided) < n
    assert rows == [6 if g else 2 for g in guided]  # unguided steps: the 2 base CFG rows only

def test_second_order_scheduler_guides_whole_steps(pipe):
    """Heun makes two UNet calls per step: the window counts steps (of num_inference_steps), never splitting one;
    a second pipeline call starts counting afresh."""
    from diffusers import HeunDiscreteScheduler

    original = pipe.scheduler
    pipe.scheduler = HeunDiscreteScheduler.from_config(original.config)
    try:
        rows = []
        # Heun's latents start at sigma_max ~ 15: the same fp32 rounding is larger in absolute terms
        _check(pipe, dict(guidance="contrastive", strength=1.5, stop=0.5), dict(num_inference_steps=2), rows=rows)
        assert rows == [6, 6, 2]  # 3 calls: step 0 (calls 0, 1) guided, step 1 (call 2) not
        rows.clear()
        cgkernels.patch(pipe, guidance="pgd", strength=0.5, stop=0.5)
        try:
            with _count_rows(pipe, rows):
                for _ in range(2):
                    _run(pipe, num_inference_steps=2)
        finally:
            cgkernels.unpatch(pipe)
        assert rows == [4, 4, 2] * 2
    finally:
        pipe.scheduler = original

def test_adapter_weights_and_lora_scale(pipe):
    """Preference modes use the adapters at their configured scale whatever set_adapters holds, and the LoRA
    `scale` multiplies every adapter delta; mode "cfg" runs exactly what the unpatched pipeline runs."""
    scaled = dict(cross_attention_kwargs={"scale": 0.5}, num_inference_steps=2)
    expected, ref = _reference(pipe, "npo", dict(guidance="npo", strength=1.5), scaled, lora_scale=0.5)
    atol = _atol(pipe, ref, dict(guidance="npo", strength=1.5), scaled)
    pipe.unet.set_adapters(["pos"], [0.3])  # neg inactive, pos down-weighted: neither may leak into the modes
    try:
        cgkernels.patch(pipe, guidance="npo", strength=1.5)
        try:
            out = _run(pipe, **scaled)
        finally:
            cgkernels.unpatch(pipe)
        torch.testing.assert_close(out, expected, rtol=0, atol=atol)

        pipe.unet.set_adapters(["pos", "neg"], [0.6, 1.4])
        unpatched = _run(pipe, **scaled)
        assert (unpatched - _run(pipe, num_inference_steps=2)).abs().max() > 1e-3  # the scale matters
        cgkernels.patch(pipe, guidance="cfg")
        try:
            out = _run(pipe, **scaled)
        finally:
            cgkernels.unpatch(pipe)
        # the same pipeline, steps and magnitudes as above; plain CFG's coefficients (1 - g, g) are smaller than npo's
        torch.testing.assert_close(out, unpatched, rtol=0, atol=atol)
    finally:
        pipe.unet.set_adapters(["pos", "neg"])

def _pipeline_like(pipe, sd_class: str, sdxl_class: str, **extra_components):
    """Another pipeline class over `pipe`'s components (SD1.5 or SDXL flavour), progress bar off."""
    import diffusers
    from diffusers import StableDiffusionPipeline

    cls = getattr(diffusers, sd_class if isinstance(pipe, StableDiffusionPipeline) else sdxl_class)
    other = cls(**pipe.components, **extra_components)
    other.set_progress_bar_config(disable=True)
    return other

def _caller(pipe, **fixed):
    """A `run` for _check: calls `pipe` with `fixed` plus the call's own arguments."""
    def run(p, **kwargs):
        args = dict(prompt=PROMPTS[0], guidance_scale=5.0, output_type="latent",
                    generator=torch.Generator().manual_seed(0))
        args.update(fixed)
        args.update(kwargs)
        return p(**args).images
    return run

def test_img2img_matches_reference(pipe):
    img2img = _pipeline_like(pipe, "StableDiffusionImg2ImgPipeline", "StableDiffusionXLImg2ImgPipeline")
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    run = _caller(img2img, image=image, strength=0.7, num_inference_steps=4)
    _check(img2img, dict(guidance="contrastive", strength=1.5, stop=0.5), run=run)

@pytest.mark.parametrize("unet_in_channels", [4, 9])
def test_inpaint_matches_reference(pipe, unet_in_channels):
    """A plain (4-channel) UNet, whose latents the pipeline blends with the masked image, and an inpainting UNet
    (9 channels: latents, mask, masked-image latents replicated per branch)."""
    from diffusers import StableDiffusionPipeline

    source = pipe
    if unet_in_channels == 9:
        kind = "sd15" if isinstance(pipe, StableDiffusionPipeline) else "sdxl"
        source = _with_adapters(tiny_sd_pipeline(kind, seed=3, unet_in_channels=9))
    inpaint = _pipeline_like(source, "StableDiffusionInpaintPipeline", "StableDiffusionXLInpaintPipeline")
    generator = torch.Generator().manual_seed(1)
    image = torch.rand(1, 3, 32, 32, generator=generator)
    mask = (torch.rand(1, 1, 32, 32, generator=generator) > 0.5).float()
    run = _caller(inpaint, image=image, mask_image=mask, strength=0.9, num_inference_steps=3, height=32, width=32)
    rows = []
    _check(inpaint, dict(guidance="contrastive", strength=1.5), dict(guidance_rescale=0.3), rows=rows, run=run)
    assert rows == [6] * inpaint.num_timesteps  # one UNet call of 6 rows per scheduler call

@pytest.mark.parametrize("guess_mode", [False, True])
def test_controlnet_matches_reference_and_runs_once_per_conditioning_row(pipe, guess_mode):
    """The ControlNet runs on the pipeline's CFG batch (2 rows, or the cond row in guess mode) once per step, and
    its residuals are replicated to every branch row of the one UNet call."""
    from cgkernels.testing import tiny_controlnet

    from diffusers import StableDiffusionPipeline

    controlnet = tiny_controlnet("sd15" if isinstance(pipe, StableDiffusionPipeline) else "sdxl", seed=4)
    pipeline = _pipeline_like(pipe, "StableDiffusionControlNetPipeline", "StableDiffusionXLControlNetPipeline",
                              controlnet=controlnet)
    control = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    run = _caller(pipeline, image=control, num_inference_steps=3, height=32, width=32, guess_mode=guess_mode)
    unet_rows, controlnet_rows = [], []
    hook = controlnet.conv_in.register_forward_pre_hook(lambda m, a: controlnet_rows.append(a[0].shape[0]))
    try:
        out = _check(pipeline, dict(guidance="contrastive", strength=1.5), rows=unet_rows, run=run)
    finally:
        hook.remove()
    steps = len(unet_rows)
    assert unet_rows == [6] * steps and steps == pipeline.num_timesteps  # one UNet call per scheduler call
    # the reference, the patched run and the base run each ran the ControlNet once per step on the CFG batch
    assert controlnet_rows == [1 if guess_mode else 2] * (3 * steps)
    # the residuals must matter, or replicating them proves nothing
    assert (run(pipeline) - run(pipeline, controlnet_conditioning_scale=0.0)).abs().max() > 1e-2

def test_ip_adapter_matches_reference(pipe):
    """IP-Adapter image embeds (a list inside added_cond_kwargs) are replicated per branch like every other input."""
    from diffusers import StableDiffusionPipeline

    from cgkernels.testing import add_random_ip_adapter

    kind = "sd15" if isinstance(pipe, StableDiffusionPipeline) else "sdxl"
    ip_pipe = _with_adapters(tiny_sd_pipeline(kind, seed=3))  # own pipeline: IP-Adapter changes the UNet
    add_random_ip_adapter(ip_pipe, image_embed_dim=16, seed=5)
    embeds = [torch.randn(2, 1, 16, generator=torch.Generator().manual_seed(3))]  # negative, positive
    run = _caller(ip_pipe, ip_adapter_image_embeds=embeds, num_inference_steps=3)
    rows = []
    _check(ip_pipe, dict(guidance="contrastive", strength=1.5), rows=rows, run=run)
    assert rows == [6] * ip_pipe.num_timesteps
    # the image embeds must matter, or replicating them proves nothing
    other = [torch.randn(2, 1, 16, generator=torch.Generator().manual_seed(4))]
    assert (run(ip_pipe) - run(ip_pipe, ip_adapter_image_embeds=other)).abs().max() > 1e-2

def test_unpatch_restores_bit_for_bit(pipe):
    before = _run(pipe)
    unet_forward_in_dict = "forward" in pipe.unet.__dict__
    cgkernels.patch(pipe, guidance="npo", strength=1.0)
    patched = _run(pipe)
    cgkernels.unpatch(pipe)
    assert torch.equal(_run(pipe), before)
    assert not torch.equal(patched, before)
    assert ("forward" in pipe.unet.__dict__) == unet_forward_in_dict
    assert all("forward" not in m.__dict__ for m in pipe.unet.modules())

def test_bad_inputs(pipe):
    with pytest.raises(ValueError, match=r"loaded adapters: \['neg', 'pos'\]"):
        cgkernels.patch(pipe, guidance="contrastive", positive="nope")
    with pytest.raises(ValueError, match="needs a negative"):
        cgkernels.patch(pipe, guidance="contrastive", negative=None)
    with pytest.raises(ValueError, match="finite"):
        cgkernels.patch(pipe, strength=float("inf"))
    with pytest.raises(ValueError, match="start < stop"):
        cgkernels.patch(pipe, start=0.5, stop=0.5)
    with pytest.raises(ValueError, match="unknown guidance"):
        cgkernels.patch(pipe, guidance="magic")
    with pytest.raises(ValueError, match="supports"):
        cgkernels.patch(object())
    with pytest.raises(ValueError, match="finite"):
        cgkernels.patch(pipe, strength=torch.tensor(float("nan")))
    with pytest.raises(ValueError, match="real"):
        cgkernels.patch(pipe, strength=1j)
    with pytest.raises(ValueError, match=r"'nope' is not loaded.*positive=None runs the base model on the cond"):
        cgkernels.patch(pipe, guidance="npo", positive="nope")  # e.g. an NPO adapter loaded alone
    cgkernels.patch(pipe)
    with pytest.raises(ValueError, match="already patched"):
        cgkernels.patch(pipe)
    cgkernels.unpatch(pipe)
    with pytest.raises(ValueError, match="not patched"):
        cgkernels.unpatch(pipe)

def test_dora_and_fused_adapters_rejected():
    pipe = tiny_sd_pipeline("sd15")
    add_random_lora(pipe, "pos", rank=2, use_dora=True)
    add_random_lora(pipe, "neg", rank=2, seed=1)
    with pytest.raises(ValueError, match="DoRA"):
        cgkernels.patch(pipe, guidance="contrastive")
    assert "forward" not in pipe.unet.__dict__
    pipe.unet.delete_adapters("pos")
    pipe.fuse_lora(adapter_names=["neg"])
    with pytest.raises(ValueError, match="merged"):
        cgkernels.patch(pipe, guidance="npo", positive=None)

@pytest.mark.parametrize("dtype,tol", [(torch.float16, 0.05), (torch.bfloat16, 0.25)])
def test_low_precision_close_to_reference(dtype, tol):
    """fp16/bf16: the batched pass and the per-branch reference round differently, amplified by g over the steps;
    the error must stay a small fraction of the adapters' own effect on the latents."""
    pipe = tiny_sd_pipeline("sd15", dtype=dtype, seed=3)
    add_random_lora(pipe, "pos", rank=4, seed=1)
    add_random_lora(pipe, "neg", rank=3, seed=2, target_modules=("to_k", "to_v", "proj_in", "conv1"))
    pipe.unet.set_adapters(["pos", "neg"])
    ref = Reference(pipe, "contrastive", strength=1.5)
    with ref:
        expected = _run(pipe, callback_on_step_end=ref.callback, num_inference_steps=2).float()
    base = _run(pipe, num_inference_steps=2).float()
    cgkernels.patch(pipe, guidance="contrastive", strength=1.5)
    out = _run(pipe, num_inference_steps=2)
    cgkernels.unpatch(pipe)
    assert out.dtype == dtype
    effect = (expected - base).abs().max()
    assert (out.float() - expected).abs().max() <= tol * effect


def test_direct_denoiser_calls_are_guided_or_refused():
    """The user's own loop calling the patched UNet: refused before any pipeline call (no guidance settings yet) and
    with a narrower [start, stop) window (only pipeline calls count steps); otherwise every direct call is guided,
    also after a pipeline call that left its step counter at its last step."""
    pipe = _with_adapters(tiny_sd_pipeline("sd15", seed=3))
    sample = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    text = torch.randn(2, 77, pipe.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    cgkernels.patch(pipe, guidance="contrastive", strength=1.5)
    try:
        with pytest.raises(ValueError, match="before any call of the pipeline"):
            pipe.unet(sample, 10, encoder_hidden_states=text)
        _run(pipe)
        rows = []
        with _count_rows(pipe, rows), torch.no_grad():
            for _ in range(3):
                pipe.unet(sample, 10, encoder_hidden_states=text)
        assert rows == [6, 6, 6]
    finally:
        cgkernels.unpatch(pipe)
    cgkernels.patch(pipe, guidance="contrastive", strength=1.5, stop=0.5)
    try:
        with pytest.raises(ValueError, match=r"window"):
            pipe.unet(sample, 10, encoder_hidden_states=text)
    finally:
        cgkernels.unpatch(pipe)


def test_npo_without_cfg_is_refused_not_silently_base(pipe):
    """npo acts through the unconditional branch: at guidance_scale=1 it would give the base model bit for bit."""
    cgkernels.patch(pipe, guidance="npo", strength=np.float32(2.0))
    try:
        with pytest.raises(ValueError, match="guidance='npo' acts through the unconditional branch"):
            _run(pipe, guidance_scale=1.0, num_inference_steps=1)
    finally:
        cgkernels.unpatch(pipe)


def test_numpy_and_torch_scalar_strengths_equal_python_floats(pipe):
    outputs = []
    for strength in (2.0, np.float32(2.0), torch.tensor(2.0)):
        cgkernels.patch(pipe, guidance="contrastive", strength=strength, start=np.float64(0.0))
        try:
            outputs.append(_run(pipe, num_inference_steps=1))
        finally:
            cgkernels.unpatch(pipe)
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[0], outputs[2])
