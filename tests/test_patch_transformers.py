"""cgkernels.patch on tiny SD3 and Flux pipelines against the per-branch float64 reference
(tests/transformer_reference.py, itself checked against the pipelines' own runs in test_transformer_reference.py).

Every mode of each family, the rows of every transformer call counted (one call per step for SD3 and for Flux
without true CFG, the pipeline's two calls per step under Flux true CFG), img2img's shortened schedules with a
[start, stop) window, the LoRA scale, unpatch bit-exact, what is refused, torch.compile without graph breaks, and
adapters trained by cgkernels.train loaded with load_lora_weights then patched. Tolerances: fp32 rounding bounds
derived from the branch magnitudes the reference saw and the mode's merge coefficients (fp32_merge_atol).
"""
import contextlib

import pytest
import torch

import cgkernels
from cgkernels.guidance import compile_merge, preset
from cgkernels.testing import (
    FLUX_LORA_TARGETS,
    SD3_LORA_TARGETS,
    add_random_lora,
    fp32_merge_atol,
    tiny_flux_pipeline,
    tiny_sd3_pipeline,
)
from transformer_reference import reference_run

SEQ = 8
STEPS = 3
PATCH = dict(strength=1.5, merge_weight=0.25)
TRUE_CFG = dict(negative_prompt=["blue square"], true_cfg_scale=3.0)
ALL_MODES = ("contrastive", "contrastive-cond", "contrastive-uncond", "pgd", "npo", "merged", "cfg")


def _with_adapters(pipe, targets):
    add_random_lora(pipe, "pos", rank=4, seed=1, lora_alpha=6, target_modules=targets)
    # "neg": another rank and other targets (context stream, the final projection), so layers differ in adapters
    add_random_lora(pipe, "neg", rank=3, seed=2, lora_alpha=2,
                    target_modules=("to_k", "to_v", "add_k_proj", "ff_context.net.2", "proj_out"))
    pipe.transformer.set_adapters(["pos", "neg"])
    return pipe


@pytest.fixture(scope="module")
def pipes():
    return {"sd3": _with_adapters(tiny_sd3_pipeline(seed=3), SD3_LORA_TARGETS),
            "flux": _with_adapters(tiny_flux_pipeline(seed=3), FLUX_LORA_TARGETS)}


def _is_sd3(pipe) -> bool:
    return "SD3" in type(pipe.transformer).__name__


def _call(pipe, **overrides) -> dict:
    call = dict(prompt=["a red circle"], num_inference_steps=STEPS, height=32, width=32, output_type="latent",
                max_sequence_length=SEQ)
    if _is_sd3(pipe):  # (Flux: guidance_scale is the distilled guidance input)
        call["guidance_scale"] = 5.0
    call.update(overrides)
    return call


def _run(pipe, call: dict, **extra):
    return pipe(**call, **extra, generator=torch.Generator().manual_seed(0)).images


def _reference(pipe, mode, call, **patch_kwargs):
    options = {k: v for k, v in patch_kwargs.items() if k in ("strength", "start", "stop", "merge_weight")}
    return reference_run(pipe, mode, dict(call, generator=torch.Generator().manual_seed(0)), **options)


def _cfg_scale(pipe, call):
    """(CFG on, g): SD3's guidance_scale, Flux's true_cfg_scale (with a negative prompt)."""
    if _is_sd3(pipe):
        return call["guidance_scale"] > 1, call["guidance_scale"]
    g = call.get("true_cfg_scale", 1.0) if call.get("negative_prompt") is not None else 1.0
    return g > 1, g


def _atol(pipe, ref, mode, call, **patch_kwargs) -> float:
    """Each transformer call's merged prediction may differ by fp32_merge_atol (branch magnitudes, the mode's
    coefficients of the whole CFG formula); a flow-matching Euler step adds it times |dt| <= 1; the calls'
    differences may add up."""
    cfg, g = _cfg_scale(pipe, call)
    _, coeffs, _ = compile_merge(_preset(mode, **patch_kwargs), "cfg" if cfg else "cond", g)
    return ref.calls * fp32_merge_atol(coeffs, ref.branch_scale)


@contextlib.contextmanager
def _count_rows(pipe, rows: list):
    """Appends the rows of every transformer call that runs (after the patch's expansion) to `rows`."""
    embed = pipe.transformer.pos_embed if _is_sd3(pipe) else pipe.transformer.x_embedder
    hook = embed.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    try:
        yield rows
    finally:
        hook.remove()


def _check(pipe, mode, call, rows=None, **patch_kwargs):
    """Patched latents == reference latents up to the fp32 bound; `rows` collects the patched calls' rows."""
    expected, ref = _reference(pipe, mode, call, **patch_kwargs)
    cgkernels.patch(pipe, guidance=mode, **patch_kwargs)
    try:
        with _count_rows(pipe, [] if rows is None else rows):
            out = _run(pipe, call)
    finally:
        cgkernels.unpatch(pipe)
    atol = _atol(pipe, ref, mode, call, **patch_kwargs)
    torch.testing.assert_close(out, expected, rtol=0, atol=atol)
    if mode != "cfg":  # the adapters must matter far beyond the tolerance, or the comparison proves nothing
        assert (out - _run(pipe, call)).abs().max() > 10 * atol
    return out


def _preset(mode, **patch_kwargs):
    return preset(mode, strength=patch_kwargs.get("strength", 1.0), merge_weight=patch_kwargs.get("merge_weight", 0.0))


def _branches(mode, *, cfg, g=1.0, **patch_kwargs) -> int:
    return len(compile_merge(_preset(mode, **patch_kwargs), "cfg" if cfg else "cond", g)[0])


@pytest.mark.parametrize("mode", ALL_MODES)
def test_sd3_mode_matches_reference_in_one_call_per_step(pipes, mode):
    pipe, rows = pipes["sd3"], []
    _check(pipe, mode, _call(pipe), rows, **PATCH)
    assert rows == [_branches(mode, cfg=True, g=5.0, **PATCH)] * STEPS  # contrastive: 6 rows, npo: 2, ...


@pytest.mark.parametrize("mode", ["contrastive", "pgd", "merged", "cfg"])
def test_flux_mode_on_the_conditional_row(pipes, mode):
    """Guidance-distilled Flux without true CFG: contrastive b + s(p - n) in 3 rows, pgd b + s(p - b) in 2, merged
    and cfg in 1, one transformer call per step."""
    pipe, rows = pipes["flux"], []
    _check(pipe, mode, _call(pipe), rows, **PATCH)
    assert rows == [{"contrastive": 3, "pgd": 2, "merged": 1, "cfg": 1}[mode]] * STEPS


@pytest.mark.parametrize("joint", [True, False])
@pytest.mark.parametrize("mode", ALL_MODES)
def test_flux_true_cfg_every_mode(pipes, mode, joint, monkeypatch):
    """true_cfg_scale > 1 with a negative prompt. Joint (the default): the pipeline's cond call runs every branch of
    both prompts in one batched transformer call and its uncond call returns its half without running the
    transformer: one call per step. Two calls (the fallback): the cond call runs the mode's branches at the prompt
    (C + D / G), the uncond call those at the negative prompt (U). The pipeline's mix gives the mode's formula."""
    import cgkernels.call_record

    monkeypatch.setattr(cgkernels.call_record, "JOINT_TRUE_CFG", joint)
    pipe, rows = pipes["flux"], []
    _check(pipe, mode, _call(pipe, **TRUE_CFG), rows, **PATCH)
    if joint:
        assert rows == [len(compile_merge(_preset(mode, **PATCH), "cfg", 3.0)[0])] * STEPS
    else:
        per_call = [len(compile_merge(_preset(mode, **PATCH), layout, 3.0)[0])
                    for layout in ("two_call_cond", "two_call_uncond")]
        assert rows == per_call * STEPS


def test_sd3_without_cfg_drops_uncond_rows_and_lora_scale_applies(pipes):
    pipe, rows = pipes["sd3"], []
    _check(pipe, "contrastive-cond", _call(pipe, guidance_scale=1.0), rows, strength=1.0)
    assert rows == [3] * STEPS  # b(c), p(c), n(c)
    # joint_attention_kwargs' LoRA scale multiplies every adapter delta of every branch
    scaled = _call(pipe, joint_attention_kwargs={"scale": 0.5})
    pipe.transformer.set_adapters(["pos"], [0.3])  # set_adapters weights may not leak into the modes
    try:
        half = _check(pipe, "contrastive", scaled, strength=1.5)
    finally:
        pipe.transformer.set_adapters(["pos", "neg"])
    assert (half - _check(pipe, "contrastive", _call(pipe), strength=1.5)).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_img2img_window_and_batch(pipes, family):
    """img2img's shortened schedule (strength 0.7 of 6 steps), a [start, stop) window over those steps,
    2 prompts x 2 images; Flux under true CFG and with as many T5 tokens as batch rows (its position ids must not
    be replicated)."""
    from diffusers import FluxImg2ImgPipeline, StableDiffusion3Img2ImgPipeline

    pipe = pipes[family]
    cls = StableDiffusion3Img2ImgPipeline if family == "sd3" else FluxImg2ImgPipeline
    img2img = cls(**pipe.components)
    img2img.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    call = _call(img2img, image=image, strength=0.7, num_inference_steps=6, prompt=["a red circle", "a tree"],
                 num_images_per_prompt=2)
    if family == "flux":
        call.update(TRUE_CFG, negative_prompt=["blue", "green"], max_sequence_length=4)
    rows = []
    _check(img2img, "contrastive", call, rows, strength=1.5, start=0.25, stop=0.75)
    n = img2img.num_timesteps
    assert 2 < n < 6  # shortened by img2img
    guided = [int(0.25 * n) <= i < int(0.75 * n) for i in range(n)]
    # one call per step over both prompts (Flux under true CFG too: the step's first call runs them all)
    assert rows == [4 * (6 if g else 2) for g in guided]


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_unpatch_restores_the_pipeline_bit_exactly(pipes, family):
    pipe = pipes[family]
    call = _call(pipe, num_inference_steps=2)
    before = _run(pipe, call)
    forwards = {name: layer.forward for name, layer in pipe.transformer.named_modules()}
    cgkernels.patch(pipe, guidance="contrastive", strength=2.0)
    patched = _run(pipe, call)
    cgkernels.unpatch(pipe)
    assert "forward" not in pipe.transformer.__dict__
    assert {name: layer.forward for name, layer in pipe.transformer.named_modules()} == forwards
    torch.testing.assert_close(_run(pipe, call), before, rtol=0, atol=0)
    assert (patched - before).abs().max() > 1e-3


def test_refused_modes_and_pipelines(pipes):
    from diffusers import FluxPipeline

    flux, sd3 = pipes["flux"], pipes["sd3"]
    for mode in ("npo", "contrastive-cond", "contrastive-uncond"):
        cgkernels.patch(flux, guidance=mode)
        try:
            with pytest.raises(ValueError, match=f"guidance='{mode}' needs an unconditional.*true_cfg_scale > 1"):
                _run(flux, _call(flux, num_inference_steps=1))
            # a negative prompt without true_cfg_scale > 1 is no true CFG either
            with pytest.raises(ValueError, match="needs an unconditional"):
                _run(flux, _call(flux, num_inference_steps=1, negative_prompt=["blue"], true_cfg_scale=1.0))
        finally:
            cgkernels.unpatch(flux)
    cgkernels.patch(sd3, guidance="pgd")
    try:  # skip-layer guidance: refused at the first call, before any step ran
        with pytest.raises(ValueError, match="skip-layer guidance"):
            _run(sd3, _call(sd3, skip_guidance_layers=[0], num_inference_steps=10))
    finally:
        cgkernels.unpatch(sd3)

    class CustomFlux(FluxPipeline):  # a subclass with its own loop may call its transformer differently
        def __call__(self, *args, **kwargs):
            return super().__call__(*args, **kwargs)

    with pytest.raises(ValueError, match="subclasses of FluxPipeline that keep its __call__.*CustomFlux"):
        cgkernels.patch(CustomFlux(**flux.components))
    cgkernels.patch(flux, guidance="pgd")
    try:  # a pipeline of an unsupported class calling the patched transformer
        custom = CustomFlux(**flux.components)
        custom.set_progress_bar_config(disable=True)
        with pytest.raises(ValueError, match="called by another pipeline"):
            _run(custom, _call(flux, num_inference_steps=1))
    finally:
        cgkernels.unpatch(flux)
    flux.transformer.to(torch.float64)
    try:
        with pytest.raises(ValueError, match="pipe.transformer is float64"):
            cgkernels.patch(flux, guidance="pgd")
    finally:
        flux.transformer.to(torch.float32)
    with pytest.raises(ValueError, match="adapter 'missing' is not loaded on pipe.transformer"):
        cgkernels.patch(flux, guidance="pgd", positive="missing")
    cgkernels.patch(sd3, guidance="contrastive")
    try:  # the patch guards apply to transformers: an adapter loaded after patching is refused at the next call
        add_random_lora(sd3, "late", rank=2, seed=9, target_modules=("to_q",))
        with pytest.raises(ValueError, match="pipe.transformer's LoRA adapters changed after cgkernels.patch"):
            _run(sd3, _call(sd3, num_inference_steps=1))
    finally:
        cgkernels.unpatch(sd3)
        sd3.transformer.delete_adapters("late")
        sd3.transformer.set_adapters(["pos", "neg"])


@pytest.mark.parametrize("joint", [True, False])
def test_compiled_flux_transformer_has_no_graph_breaks(pipes, joint, monkeypatch):
    """torch.compile(pipe.transformer, fullgraph=True) after patching: the host part (which call of true CFG this
    is, step counting) stays eager, the core traces whole, one graph per step plan (joint: the one call per step,
    plus a one-view graph returning the uncond call's half; two calls: the cond and the uncond call)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    import cgkernels.call_record

    monkeypatch.setattr(cgkernels.call_record, "JOINT_TRUE_CFG", joint)
    pipe = pipes["flux"]
    module = pipe.transformer
    call = _call(pipe, num_inference_steps=2, **TRUE_CFG)
    cgkernels.patch(pipe, guidance="contrastive-cond", strength=1.5)
    torch._dynamo.reset()
    counters.clear()
    try:
        eager = _run(pipe, call)
        pipe.transformer = torch.compile(module, fullgraph=True, backend="eager")
        compiled = _run(pipe, call)
        assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
        # joint: the one call per step, and the uncond call's one-view graph that hands out its half
        assert counters["stats"]["unique_graphs"] == 2
        scale = eager.abs().max().item()
        torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-5 * scale)  # the same kernels, reassociated
    finally:
        pipe.transformer = module
        cgkernels.unpatch(pipe)
        torch._dynamo.reset()


def test_adapters_trained_by_cgkernels_load_and_patch(tmp_path):
    """cgkernels.train (sft: pos and neg) on a tiny Flux pipeline, its files loaded with load_lora_weights into a
    fresh pipeline, patched, against the reference under true CFG."""
    from diffusers import FluxPipeline

    from cgkernels.train import TrainConfig, train
    from train_testdata import make_pickapic

    tiny_flux_pipeline(seed=5).save_pretrained(tmp_path / "flux")
    make_pickapic(tmp_path / "pairs.parquet")
    result = train(TrainConfig(
        model=str(tmp_path / "flux"), dataset=str(tmp_path / "pairs.parquet"), output_dir=str(tmp_path / "out"),
        objective="sft", resolution=32, batch_size=2, max_steps=2, lr=2e-2, checkpoint_every=0, progress=False,
        rank=4, alpha=8.0, target_modules=FLUX_LORA_TARGETS, max_sequence_length=SEQ))
    pipe = FluxPipeline.from_pretrained(str(tmp_path / "flux"))
    pipe.set_progress_bar_config(disable=True)
    for adapter in result["adapters"]:
        pipe.load_lora_weights(str(tmp_path / "out" / adapter), adapter_name=adapter)
    pipe.transformer.set_adapters(["pos", "neg"])
    _check(pipe, "contrastive", _call(pipe, num_inference_steps=2, **TRUE_CFG), strength=4.0)


def test_flux_schnell_without_guidance_input():
    """A FLUX.1-schnell-shaped transformer (no guidance embedding: the pipeline passes guidance=None)."""
    pipe = _with_adapters(tiny_flux_pipeline(seed=4, guidance_embeds=False), FLUX_LORA_TARGETS)
    rows = []
    _check(pipe, "contrastive", _call(pipe, num_inference_steps=2), rows, strength=1.5)
    assert rows == [3, 3]
    _check(pipe, "npo", _call(pipe, num_inference_steps=2, **TRUE_CFG), strength=1.5, merge_weight=0.25)


def test_flux_lora_scale_and_a_pipeline_sharing_the_patched_transformer(pipes):
    """joint_attention_kwargs' LoRA scale on both true-CFG calls; an img2img pipeline built from the patched
    pipeline's components follows its own call (true CFG, shortened schedule)."""
    from diffusers import FluxImg2ImgPipeline

    pipe = pipes["flux"]
    expected, ref = _reference(pipe, "npo", _call(pipe, joint_attention_kwargs={"scale": 0.5}, **TRUE_CFG),
                               strength=1.5)
    # (the reference folds the scale into its set_adapters weights; the patch applies it to every adapter delta)
    img2img = FluxImg2ImgPipeline(**pipe.components)
    img2img.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    shared_call = _call(pipe, image=image, strength=0.7, num_inference_steps=4, **TRUE_CFG)
    shared_expected, shared_ref = _reference(img2img, "npo", shared_call, strength=1.5)
    cgkernels.patch(pipe, guidance="npo", strength=1.5)
    try:
        out = _run(pipe, _call(pipe, joint_attention_kwargs={"scale": 0.5}, **TRUE_CFG))
        shared = _run(img2img, shared_call)
    finally:
        cgkernels.unpatch(pipe)
    atol = _atol(pipe, ref, "npo", _call(pipe, **TRUE_CFG), strength=1.5)
    torch.testing.assert_close(out, expected, rtol=0, atol=atol)
    unscaled, _ = _reference(pipe, "npo", _call(pipe, **TRUE_CFG), strength=1.5)
    assert (out - unscaled).abs().max() > 10 * atol  # the scale matters
    torch.testing.assert_close(shared, shared_expected, rtol=0,
                               atol=_atol(img2img, shared_ref, "npo", shared_call, strength=1.5))
