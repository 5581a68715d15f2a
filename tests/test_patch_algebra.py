"""`cgkernels.patch(pipe, guidance=Guidance(...))` and per-prompt adapter mixes on tiny SD1.5, SDXL, SD3 and Flux
pipelines, against the per-branch float64 reference of tests/guidance_reference.py (one unpatched denoiser call per
branch and prompt, adapters through set_adapters), with the denoiser calls of every step counted.

Tolerances: each denoiser call's merged prediction may differ from the reference by fp32_merge_atol (the branch
magnitudes the reference saw, the formula's coefficients); a scheduler step scales it by at most
max(1, init_noise_sigma) (flow matching: |dt| <= 1); the calls' differences may add up.
"""
import contextlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cgkernels
from cgkernels import Guidance, branch
from cgkernels.testing import (
    FLUX_LORA_TARGETS,
    SD3_LORA_TARGETS,
    add_random_lora,
    denoiser,
    fp32_merge_atol,
    tiny_flux_pipeline,
    tiny_sd3_pipeline,
    tiny_sd_pipeline,
)
from guidance_reference import GuidanceReference, is_flux, merge_l1

STEPS = 2
ADAPTERS = ("pos", "neg", "style")


def _with_adapters(pipe, family):
    targets = {"sd3": SD3_LORA_TARGETS, "flux": FLUX_LORA_TARGETS}.get(family, ("to_q", "to_k", "to_v", "to_out.0"))
    add_random_lora(pipe, "pos", rank=4, seed=1, lora_alpha=6, target_modules=targets)
    add_random_lora(pipe, "neg", rank=3, seed=2, lora_alpha=2, target_modules=("to_k", "to_v"))
    # "style": on other layers too (the UNets' 1x1 proj_in / 3x3 conv1 take the conv paths)
    extra = ("proj_in", "conv1") if family in ("sd15", "sdxl") else ("proj_out",)
    add_random_lora(pipe, "style", rank=2, seed=4, lora_alpha=4, target_modules=("to_q",) + extra)
    denoiser(pipe).set_adapters(list(ADAPTERS))
    return pipe


def _build(family):
    if family in ("sd15", "sdxl"):
        return _with_adapters(tiny_sd_pipeline(family, seed=3), family)
    if family == "sd3":
        return _with_adapters(tiny_sd3_pipeline(seed=3), family)
    return _with_adapters(tiny_flux_pipeline(seed=3), family)


FAMILIES = ("sd15", "sdxl", "sd3", "flux")


@pytest.fixture(scope="module")
def pipes():
    return {}


def _pipe(pipes, family):
    if family not in pipes:
        pipes[family] = _build(family)
    return pipes[family]


def _call(pipe, prompts, **overrides):
    call = dict(prompt=prompts, num_inference_steps=STEPS, output_type="latent", height=32, width=32)
    if hasattr(pipe, "transformer"):
        call["max_sequence_length"] = 8
    if not is_flux(pipe):
        call["guidance_scale"] = 4.0
    call.update(overrides)
    return call


def _run(pipe, call, **extra):
    return pipe(**call, **extra, generator=torch.Generator().manual_seed(0)).images


@contextlib.contextmanager
def _count_calls(pipe, calls: list):
    """Appends the rows of every denoiser call (after the patch's expansion) to `calls`."""
    model = denoiser(pipe)
    first = model.conv_in if hasattr(pipe, "unet") else model.x_embedder if is_flux(pipe) else model.pos_embed
    hook = first.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    try:
        yield calls
    finally:
        hook.remove()


def _true_cfg(pipe, call):
    return call.get("true_cfg_scale") if is_flux(pipe) and call.get("negative_prompt") is not None else None


def _check(pipe, guidance, call, *, prompt_mixes=None, start=0.0, stop=1.0):
    """Patched latents == reference latents up to the fp32 bound; returns (patched, denoiser rows per call)."""
    true_cfg = _true_cfg(pipe, call)
    ref = GuidanceReference(pipe, guidance, start=start, stop=stop, prompt_mixes=prompt_mixes,
                            true_cfg_scale=true_cfg)
    attention_arg = "cross_attention_kwargs" if hasattr(pipe, "unet") else "joint_attention_kwargs"
    if prompt_mixes is not None:
        call = dict(call, **{attention_arg: {**(call.get(attention_arg) or {}), "adapters_per_prompt": prompt_mixes}})
    with ref:
        expected = _run(pipe, call, callback_on_step_end=ref.callback)
    rows = []
    cgkernels.patch(pipe, guidance=guidance, start=start, stop=stop)
    try:
        with _count_calls(pipe, rows):
            out = _run(pipe, call)
    finally:
        cgkernels.unpatch(pipe)
    cfg = not is_flux(pipe) and call["guidance_scale"] > 1
    g = call["guidance_scale"] if cfg else (true_cfg or 1.0)
    sigma = max(1.0, float(getattr(pipe.scheduler, "init_noise_sigma", 1.0)))
    atol = ref.calls * sigma * fp32_merge_atol(merge_l1(guidance, g, cfg or true_cfg is not None),
                                               ref.branch_scale, rescale=call.get("guidance_rescale", 0.0))
    torch.testing.assert_close(out, expected, rtol=0, atol=atol)
    return out, rows, atol


# ------------------------------------------------------------------------------------------------------------------
# Random Guidance expressions
# ------------------------------------------------------------------------------------------------------------------
@st.composite
def _terms(draw, prompts):
    total = None
    for _ in range(draw(st.integers(1, 3))):
        prompt = draw(st.sampled_from(prompts))
        adapters = draw(st.dictionaries(st.sampled_from(ADAPTERS), st.sampled_from([0.5, 1.0, -1.0, 1.5]),
                                        max_size=2))
        term = draw(st.sampled_from([1.0, -0.5, 1.5])) * branch(prompt, **adapters)
        total = term if total is None else total + term
    return total


@st.composite
def _guidance_and_call(draw, family):
    """A random Guidance that the family's call can run, and whether Flux runs true CFG."""
    true_cfg = family == "flux" and draw(st.booleans())
    if family == "flux" and not true_cfg:  # no unconditional prediction at all
        uncond, cond = draw(_terms(("cond",))), draw(_terms(("cond",)))
        after = draw(st.one_of(st.none(), _terms(("cond",))))
    else:
        uncond, cond = draw(_terms(("uncond", "cond"))), draw(_terms(("uncond", "cond")))
        after = draw(st.one_of(st.none(), _terms(("uncond", "cond"))))
    return uncond, cond, after, true_cfg


@pytest.mark.parametrize("family", FAMILIES)
@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture],
          derandomize=True)
@given(data=st.data())
def test_random_guidance_matches_per_branch_reference(pipes, family, data):
    """Random linear combinations of branches at either prompt with any adapter mix: one denoiser call per step
    (Flux true CFG included: both prompts run in the step's first call), equal to one call per branch merged in
    float64."""
    pipe = _pipe(pipes, family)
    uncond, cond, after, true_cfg = data.draw(_guidance_and_call(family))
    if cond.items() == ():  # everything cancelled: Guidance refuses an empty cond (test_guidance_algebra)
        cond = branch("cond")
    guidance = Guidance(uncond, cond, after)
    overrides = dict(negative_prompt=["blue square"], true_cfg_scale=3.0) if true_cfg else {}
    if family in ("sd15", "sdxl"):
        overrides["guidance_rescale"] = data.draw(st.sampled_from([0.0, 0.5]))
    call = _call(pipe, ["a red circle"], **overrides)
    try:
        _, rows, _ = _check(pipe, guidance, call)
    except ValueError as error:  # a combination whose merge coefficients all cancel is refused, never run
        assert "every merge coefficient is zero" in str(error)
        return
    assert len(rows) == pipe.num_timesteps


@pytest.mark.parametrize("family", FAMILIES)
def test_readme_examples_match_reference(pipes, family):
    """A LoRA on the negative prompt only; autoguidance with a LoRA as the "bad" model; cPGD on a style LoRA."""
    pipe = _pipe(pipes, family)
    u = "cond" if is_flux(pipe) else "uncond"  # Flux without true CFG has no uncond prediction
    examples = {
        "negative-only": Guidance(uncond=branch(u, neg=1.0), cond=branch("cond")),
        "autoguidance": Guidance(uncond=branch("cond", neg=1.0), cond=branch("cond")),
        "cpgd-on-style": Guidance(
            uncond=branch(u, style=1.0) + 1.5 * (branch(u, style=1.0, pos=1.0) - branch(u, style=1.0, neg=1.0)),
            cond=branch("cond", style=1.0) + 1.5 * (branch("cond", style=1.0, pos=1.0)
                                                     - branch("cond", style=1.0, neg=1.0))),
    }
    call = _call(pipe, ["a red circle"], **({"guidance_scale": 3.5} if is_flux(pipe) else {}))
    base = _run(pipe, call)
    for name, guidance in examples.items():
        if is_flux(pipe) and name != "cpgd-on-style":  # Flux: under true CFG, both prompts in one call per step
            flux_call = dict(call, negative_prompt=["blue square"], true_cfg_scale=3.0)
            if name == "negative-only":
                guidance = Guidance(uncond=branch("uncond", neg=1.0), cond=branch("cond"))
            out, rows, atol = _check(pipe, guidance, flux_call)
            assert rows == [2] * pipe.num_timesteps
            assert (out - _run(pipe, flux_call)).abs().max() > 10 * atol, name
            continue
        out, rows, atol = _check(pipe, guidance, call)
        assert len(rows) == pipe.num_timesteps  # one denoiser call per step
        assert (out - base).abs().max() > 10 * atol, name  # the adapters matter beyond the tolerance


@pytest.mark.parametrize("mode", ["contrastive", "contrastive-uncond", "npo", "merged"])
def test_presets_match_the_generic_reference(pipes, mode):
    """The mode strings are presets in the algebra: the generic reference, given the preset, checks them too."""
    from cgkernels.guidance import preset

    pipe = _pipe(pipes, "sd15")
    call = _call(pipe, ["a red circle"], guidance_rescale=0.3)
    guidance = preset(mode, strength=1.5, merge_weight=0.25)
    ref = GuidanceReference(pipe, guidance)
    with ref:
        expected = _run(pipe, call, callback_on_step_end=ref.callback)
    cgkernels.patch(pipe, guidance=mode, strength=np.float32(1.5), merge_weight=torch.tensor(0.25))
    try:
        out = _run(pipe, call)
    finally:
        cgkernels.unpatch(pipe)
    sigma = max(1.0, float(pipe.scheduler.init_noise_sigma))
    atol = ref.calls * sigma * fp32_merge_atol(merge_l1(guidance, 4.0, True), ref.branch_scale, rescale=0.3)
    torch.testing.assert_close(out, expected, rtol=0, atol=atol)


# ------------------------------------------------------------------------------------------------------------------
# Per-prompt adapter mixes
# ------------------------------------------------------------------------------------------------------------------
def _latents(pipe, call, batch):
    """Fixed initial latents for `batch` images (so a prompt run alone starts from its own rows' noise)."""
    generator = torch.Generator().manual_seed(7)
    if is_flux(pipe):
        channels = pipe.transformer.config.in_channels // 4
        shape = (batch, (call["height"] // pipe.vae_scale_factor // 2) * (call["width"] // pipe.vae_scale_factor // 2),
                 channels * 4)
    else:
        model = denoiser(pipe)
        channels = model.config.in_channels
        shape = (batch, channels, call["height"] // pipe.vae_scale_factor, call["width"] // pipe.vae_scale_factor)
    return torch.randn(shape, generator=generator)


@pytest.mark.parametrize("family", FAMILIES)
def test_per_prompt_mixes_equal_each_prompt_alone(pipes, family):
    """Three prompts with three adapter mixes (two images each) in one call, one denoiser call per step: each
    prompt's images equal that prompt run alone through the unpatched pipeline with its adapters set."""
    pipe = _pipe(pipes, family)
    prompts = ["a red circle", "a blue square", "a green triangle"]
    mixes = [{"pos": 1.0}, {"neg": 0.7, "style": np.float32(1.5)}, {}]
    images = 2
    call = _call(pipe, prompts, num_images_per_prompt=images)
    latents = _latents(pipe, call, len(prompts) * images)
    attention_arg = "cross_attention_kwargs" if hasattr(pipe, "unet") else "joint_attention_kwargs"
    model = denoiser(pipe)
    plain = Guidance(uncond=branch("uncond" if not is_flux(pipe) else "cond"), cond=branch("cond"))
    cgkernels.patch(pipe, guidance=plain)
    rows = []
    try:
        with _count_calls(pipe, rows):
            out = pipe(**call, latents=latents, **{attention_arg: {"adapters_per_prompt": mixes}}).images
    finally:
        cgkernels.unpatch(pipe)
    assert rows == [(1 if is_flux(pipe) else 2) * len(prompts) * images] * pipe.num_timesteps
    effects = []
    for p, (prompt, mix) in enumerate(zip(prompts, mixes)):
        mix = {a: float(w) for a, w in mix.items()}
        if mix:
            model.set_adapters(list(mix), list(mix.values()))
        else:
            model.disable_lora()
        alone_call = dict(call, prompt=[prompt])
        alone = pipe(**alone_call, latents=latents[p * images:(p + 1) * images]).images
        model.enable_lora()
        model.set_adapters(list(ADAPTERS))
        scale = alone.abs().max().item()
        # one fp32 denoiser evaluation per step differs by FP32_UNET_REL of its magnitude, amplified by the CFG
        # weights; bounded here by 1e-4 of the latents' magnitude per step (two orders above what the runs show)
        torch.testing.assert_close(out[p * images:(p + 1) * images], alone, rtol=0,
                                   atol=1e-4 * scale * pipe.num_timesteps)
        effects.append(alone)
    assert (effects[0] - effects[2]).abs().max() > 1e-2  # the mixes matter


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_per_prompt_mixes_under_guidance_match_reference(pipes, family):
    """Per-prompt mixes added to every branch of a guidance expression (a negative-only LoRA, cPGD's pos / neg),
    with a [start, stop) window and the LoRA scale: still one call per step, equal to the per-branch reference."""
    pipe = _pipe(pipes, family)
    prompts = ["a red circle", "a blue square"]
    mixes = [{"style": 1.0}, {"pos": 0.5}]
    if is_flux(pipe):
        guidance = Guidance(uncond=branch("uncond", neg=1.0), cond=branch("cond") + branch("cond", pos=1.0)
                            - branch("cond", neg=1.0))
        call = _call(pipe, prompts, negative_prompt=["blue", "green"], true_cfg_scale=3.0,
                     joint_attention_kwargs={"scale": 0.5})
    else:
        guidance = Guidance(uncond=branch("uncond", neg=1.0), cond=branch("cond"),
                            after=1.5 * (branch("cond", pos=1.0) - branch("cond", neg=1.0)))
        call = _call(pipe, prompts, cross_attention_kwargs={"scale": 0.5}, num_inference_steps=4)
    out, rows, atol = _check(pipe, guidance, call, prompt_mixes=mixes, start=0.25, stop=0.75)
    assert len(rows) == pipe.num_timesteps  # Flux true CFG too: both prompts in the step's first call


def test_per_prompt_key_is_removed_before_attention_processors(pipes):
    pipe = _pipe(pipes, "sd15")
    seen = []
    attention = next(m for name, m in pipe.unet.named_modules() if name.endswith("attn2"))
    hook = attention.register_forward_pre_hook(lambda module, args, kwargs: seen.append(sorted(kwargs)),
                                               with_kwargs=True)
    user_kwargs = {"adapters_per_prompt": [{"pos": 1.0}], "scale": 0.5}
    cgkernels.patch(pipe, guidance=Guidance(branch("uncond"), branch("cond")))
    try:
        _run(pipe, _call(pipe, ["a red circle"], cross_attention_kwargs=user_kwargs))
    finally:
        cgkernels.unpatch(pipe)
        hook.remove()
    assert seen and all("adapters_per_prompt" not in kwargs and "scale" not in kwargs for kwargs in seen)
    assert user_kwargs == {"adapters_per_prompt": [{"pos": 1.0}], "scale": 0.5}  # the user's dict is untouched


def test_bad_per_prompt_mixes_are_refused_by_name(pipes):
    pipe = _pipe(pipes, "sd15")
    call = _call(pipe, ["a red circle", "a blue square"], num_images_per_prompt=2, num_inference_steps=1)
    cases = [
        ([{"pos": 1.0}], r"has 1 entries; this call needs 2 \(one per prompt\)"),
        ([{"pos": 1.0}] * 4, r"has 4 entries; this call needs 2"),
        ([{"pos": 1.0}, {"nope": 1.0}], r"adapters_per_prompt'\]\[1\] names adapter 'nope', which is not loaded"),
        ([{"pos": float("nan")}, {}], r"adapters_per_prompt'\]\[0\].*weight of adapter 'pos' must be finite"),
        ([{"pos": "1"}, {}], r"weight of adapter 'pos' must be a real number"),
        ({"pos": 1.0}, "must be a list"),
    ]
    cgkernels.patch(pipe, guidance="contrastive")
    try:
        for mixes, match in cases:
            with pytest.raises(ValueError, match=match):
                _run(pipe, dict(call, cross_attention_kwargs={"adapters_per_prompt": mixes}))
    finally:
        cgkernels.unpatch(pipe)


def test_text_encoder_loras_are_refused_per_prompt():
    """An adapter with text-encoder LoRA layers cannot differ per prompt in one encoder pass: refused by name."""
    from peft import LoraConfig

    pipe = _with_adapters(tiny_sd_pipeline("sd15", seed=3), "sd15")
    pipe.text_encoder.add_adapter(LoraConfig(r=2, target_modules=["q_proj"]), adapter_name="style")
    cgkernels.patch(pipe, guidance=Guidance(branch("uncond"), branch("cond")))
    try:
        with pytest.raises(ValueError, match="'style', which also has LoRA layers on text_encoder"):
            _run(pipe, _call(pipe, ["a red circle"], num_inference_steps=1,
                             cross_attention_kwargs={"adapters_per_prompt": [{"style": 1.0}]}))
        _run(pipe, _call(pipe, ["a red circle"], num_inference_steps=1,  # denoiser-only adapters are fine
                         cross_attention_kwargs={"adapters_per_prompt": [{"pos": 1.0}]}))
    finally:
        cgkernels.unpatch(pipe)


def test_distinct_mix_limit_is_a_clear_error(pipes, monkeypatch):
    """Beyond MAX_MIXES distinct mixes per patched pipeline: a ValueError that says so (here with a limit of 4)."""
    import cgkernels.lora_layers as layers

    pipe = _pipe(pipes, "sd15")
    monkeypatch.setattr(layers, "MAX_MIXES", 4)
    cgkernels.patch(pipe, guidance=Guidance(branch("uncond"), branch("cond")))
    try:
        mixes = [{"pos": w} for w in (0.25, 0.5, 0.75, 1.0, 1.25)]
        with pytest.raises(ValueError, match="5 distinct adapter mixes .* at most 4"):
            _run(pipe, _call(pipe, ["a"] * 5, num_inference_steps=1,
                             cross_attention_kwargs={"adapters_per_prompt": mixes}))
        _run(pipe, _call(pipe, ["a"] * 4, num_inference_steps=1,
                         cross_attention_kwargs={"adapters_per_prompt": mixes[:4]}))
    finally:
        cgkernels.unpatch(pipe)


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_uncond_branch_in_cond_without_cfg_is_refused(pipes, family):
    """Without CFG (guidance_scale 1; Flux without true CFG) the call has only the prompt's rows: a cond term reading
    branch("uncond", ...) is refused, not silently evaluated at the prompt (before the fix
    Guidance(b(u), b(u, pos)) at guidance_scale=1 gave exactly Guidance(b(u), b(c, pos)))."""
    pipe = _pipe(pipes, family)
    guidance = Guidance(uncond=branch("uncond"), cond=branch("uncond", pos=1.0))
    call = _call(pipe, ["a red circle"], num_inference_steps=1, **({} if is_flux(pipe) else {"guidance_scale": 1.0}))
    cgkernels.patch(pipe, guidance=guidance)
    try:
        with pytest.raises(ValueError, match=r"cond=branch\('uncond', pos=1\) reads the unconditional prediction"):
            _run(pipe, call)
    finally:
        cgkernels.unpatch(pipe)


def test_direct_flux_calls_refuse_a_guidance_that_one_call_cannot_guide(pipes):
    """A direct call of the patched Flux transformer (the user's own loop, perhaps running true CFG as two calls)
    sees one prompt's rows: a Guidance whose uncond term is not its cond term at the negative prompt (a negative-only
    LoRA) or that has an after term is refused there (before: the uncond term was silently ignored); presets like
    contrastive still run, guided."""
    from cgkernels.guidance import guides_each_call_alone, preset

    pipe = _pipe(pipes, "flux")
    captured = {}

    def capture(module, args, kwargs):
        captured.setdefault("kwargs", dict(kwargs))

    hook = pipe.transformer.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        _run(pipe, _call(pipe, ["a red circle"], num_inference_steps=1))
    finally:
        hook.remove()
    negative_only = Guidance(uncond=branch("uncond", neg=1.0), cond=branch("cond"))
    after_only = Guidance(uncond=branch("uncond"), cond=branch("cond"), after=0.5 * branch("cond", pos=1.0))
    assert not guides_each_call_alone(negative_only) and not guides_each_call_alone(after_only)
    assert guides_each_call_alone(preset("contrastive", strength=2.0))
    for guidance in (negative_only, after_only):
        cgkernels.patch(pipe, guidance=guidance)
        try:
            _run(pipe, _call(pipe, ["a red circle"], num_inference_steps=1))  # the pipeline's own call runs
            with pytest.raises(ValueError, match="direct call of the patched Flux transformer"), torch.no_grad():
                pipe.transformer(**captured["kwargs"])
        finally:
            cgkernels.unpatch(pipe)
    cgkernels.patch(pipe, guidance="contrastive", strength=2.0)
    try:
        _run(pipe, _call(pipe, ["a red circle"], num_inference_steps=1))
        with torch.no_grad():
            guided = pipe.transformer(**captured["kwargs"])[0]
    finally:
        cgkernels.unpatch(pipe)
    with torch.no_grad():
        base = pipe.transformer(**captured["kwargs"])[0]
    assert guided.shape == base.shape and not torch.equal(guided, base)


def test_more_branches_than_the_merge_takes_are_refused_before_the_denoiser_runs(pipes):
    """The fused merge takes at most MAX_PREDS (16) branch predictions: a Guidance with more distinct branches is
    refused when its plan is built, naming the limit (before the fix: from the merge, after one denoiser call over
    all 18 branches' rows)."""
    from cgkernels.ops.guidance_merge import MAX_PREDS

    pipe = _pipe(pipes, "sd15")
    weights = [0.25 * i for i in range(1, MAX_PREDS // 2 + 2)]  # 9 mixes at both prompts: 18 branches
    guidance = Guidance(sum(branch("uncond", pos=w) for w in weights), sum(branch("cond", pos=w) for w in weights))
    rows = []
    cgkernels.patch(pipe, guidance=guidance)
    try:
        with _count_calls(pipe, rows), pytest.raises(ValueError, match=f"18 distinct branches in one call; the fused "
                                                                       f"guidance merge takes at most {MAX_PREDS}"):
            _run(pipe, _call(pipe, ["a red circle"], num_inference_steps=1))
    finally:
        cgkernels.unpatch(pipe)
    assert rows == []


def test_preset_arguments_with_a_guidance_are_refused(pipes):
    pipe = _pipe(pipes, "sd15")
    with pytest.raises(ValueError, match="strength set the mode strings' presets"):
        cgkernels.patch(pipe, guidance=Guidance(branch("uncond"), branch("cond", pos=1.0)), strength=2.0)
    with pytest.raises(ValueError, match="adapter 'nope' is not loaded"):
        cgkernels.patch(pipe, guidance=Guidance(branch("uncond"), branch("cond", nope=1.0)))
    with pytest.raises(TypeError, match="mode string or a cgkernels.Guidance"):
        cgkernels.patch(pipe, guidance=branch("cond"))
    assert not cgkernels.patching.is_patched(pipe)
