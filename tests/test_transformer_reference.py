"""The per-branch float64 reference for SD3 / Flux pipelines (tests/transformer_reference.py) checked against the
pipelines' own runs, so that the patch tests built on it compare against something proven: base and cfg reproduce
the pipeline, pgd at s = 1 is the positive adapter, contrastive-cond's extra term survives Flux's true CFG mix,
img2img works, what the reference cannot model is refused, and how many rows each pipeline call carries."""
import pytest
import torch

from cgkernels.testing import (
    FP32_UNET_REL,
    FLUX_LORA_TARGETS,
    SD3_LORA_TARGETS,
    add_random_lora,
    fp32_merge_atol,
    tiny_flux_pipeline,
    tiny_sd3_pipeline,
)
from transformer_reference import TransformerReference, count_transformer_rows, reference_images, reference_run

SEQ = 8


def _pipe_with_adapters(family: str):
    if family == "sd3":
        pipe, targets = tiny_sd3_pipeline(seed=3), SD3_LORA_TARGETS
    else:
        pipe, targets = tiny_flux_pipeline(seed=3), FLUX_LORA_TARGETS
    add_random_lora(pipe, "pos", rank=4, seed=1, lora_alpha=6, target_modules=targets)
    # "neg": another rank and other targets (context stream, final projection), so layers differ in adapters
    add_random_lora(pipe, "neg", rank=3, seed=2, lora_alpha=2,
                    target_modules=("to_k", "to_v", "add_k_proj", "ff_context.net.2", "proj_out"))
    pipe.transformer.set_adapters(["pos", "neg"])
    return pipe


@pytest.fixture(scope="module")
def pipes():
    return {family: _pipe_with_adapters(family) for family in ("sd3", "flux")}


@pytest.fixture(params=["sd3", "flux"])
def pipe(request, pipes):
    return pipes[request.param]


def _call(pipe, **overrides):
    call = dict(prompt=["a red circle"], num_inference_steps=3, height=32, width=32, output_type="latent",
                max_sequence_length=SEQ, generator=torch.Generator().manual_seed(0))
    if "SD3" in type(pipe.transformer).__name__:  # (Flux: guidance_scale is the distilled guidance input, 3.5)
        call["guidance_scale"] = 5.0
    call.update(overrides)
    return call


def _plain(pipe, adapters, weights=None, **overrides):
    """The pipeline's own run with `adapters` active (None: LoRA disabled)."""
    transformer = pipe.transformer
    try:
        if adapters is None:
            transformer.disable_lora()
        else:
            transformer.set_adapters(adapters, weights)
        return pipe(**_call(pipe, **overrides)).images
    finally:
        transformer.enable_lora()
        transformer.set_adapters(["pos", "neg"])


def _cfg_coeffs(call: dict) -> tuple:
    """The pipeline's own CFG mix of its two predictions: SD3's guidance_scale, Flux's true_cfg_scale."""
    g = call.get("true_cfg_scale", 1.0) if call.get("negative_prompt") is not None else call.get("guidance_scale")
    return (1.0 - g, g) if g is not None and g > 1 else (1.0,)


def _atol(ref, coeffs) -> float:
    """Per-branch calls see fewer rows than the pipeline's batched call: fp32 rounding differs, nothing more. Each
    transformer call's merged prediction may differ by fp32_merge_atol (branch magnitudes, merge coefficients); a
    flow-matching Euler step adds it times |dt| <= 1; the calls' differences may add up."""
    return ref.calls * fp32_merge_atol(coeffs, ref.branch_scale)


def _close(reference, plain):
    """reference: (images, TransformerReference) from reference_run; plain: the pipeline's own images."""
    (images, ref), coeffs = reference
    torch.testing.assert_close(images, plain, rtol=0, atol=_atol(ref, coeffs))


def _ref(pipe, mode, call, **reference_kwargs):
    return reference_run(pipe, mode, call, **reference_kwargs), _cfg_coeffs(call)


def test_base_and_cfg_reproduce_the_pipeline(pipe):
    _close(_ref(pipe, "base", _call(pipe)), _plain(pipe, None))
    _close(_ref(pipe, "cfg", _call(pipe)), _plain(pipe, ["pos", "neg"]))
    assert (_plain(pipe, None) - _plain(pipe, ["pos", "neg"])).abs().max() > 1e-3  # the adapters matter


def test_pgd_at_strength_one_is_the_positive_adapter_and_the_window_counts_steps(pipe):
    _close(_ref(pipe, "pgd", _call(pipe), strength=1.0), _plain(pipe, ["pos"]))
    _close(_ref(pipe, "merged", _call(pipe), strength=0.7), _plain(pipe, ["pos", "neg"], [0.7, -0.7]))
    # a window that covers no step is the base model
    _close(_ref(pipe, "contrastive", _call(pipe), strength=2.0, start=0.0, stop=0.3), _plain(pipe, None))
    windowed = reference_images(pipe, "contrastive", _call(pipe), strength=2.0, start=0.0, stop=0.5)
    assert (windowed - _plain(pipe, None)).abs().max() > 1e-3


def test_img2img_variant(pipe):
    from diffusers import FluxImg2ImgPipeline, StableDiffusion3Img2ImgPipeline

    cls = StableDiffusion3Img2ImgPipeline if "SD3" in type(pipe.transformer).__name__ else FluxImg2ImgPipeline
    img2img = cls(**pipe.components)
    img2img.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    call = _call(pipe, image=image, strength=0.7, num_inference_steps=4)
    reference = _ref(img2img, "pgd", call, strength=1.0)
    img2img.transformer.set_adapters(["pos"])
    try:
        plain = img2img(**_call(pipe, image=image, strength=0.7, num_inference_steps=4)).images
    finally:
        img2img.transformer.set_adapters(["pos", "neg"])
    _close(reference, plain)


def test_flux_true_cfg_halves_and_contrastive_cond(pipes):
    pipe = pipes["flux"]
    true_cfg = dict(negative_prompt=["blue"], true_cfg_scale=3.0)
    rows = []
    with count_transformer_rows(pipe, rows):
        plain = _plain(pipe, ["pos", "neg"], **true_cfg)
    assert rows == [1, 1] * 3  # two separate calls per step (cond, then uncond), never a batched CFG
    _close(_ref(pipe, "cfg", _call(pipe, **true_cfg)), plain)
    # One Euler step: latents move by dt · ε, so contrastive-cond minus base is dt · s · (p(c) − n(c)) whatever
    # the true CFG scale: the extra term is outside the CFG mix.
    deltas, atol = [], 0.0
    for scale in (2.0, 4.0):
        def call():  # a fresh generator per run: the same starting latents
            return _call(pipe, negative_prompt=["blue"], true_cfg_scale=scale, num_inference_steps=1)

        guided, guided_ref = reference_run(pipe, "contrastive-cond", call(), strength=1.5)
        base, base_ref = reference_run(pipe, "base", call())
        deltas.append(guided - base)
        # each of the four runs is off by its fp32 rounding: the CFG mix, and contrastive-cond's 1.5 (p - n)
        atol += _atol(guided_ref, (1 - scale, scale, 1.5, 1.5)) + _atol(base_ref, (1 - scale, scale))
    assert deltas[0].abs().max() > 10 * atol
    torch.testing.assert_close(deltas[0], deltas[1], rtol=0, atol=atol)


def test_sd3_makes_one_call_per_step_over_both_halves(pipes):
    pipe = pipes["sd3"]
    rows = []
    with count_transformer_rows(pipe, rows):
        _plain(pipe, None, prompt=["a red circle", "a tree"])
    assert rows == [4] * 3  # [uncond; cond] of 2 prompts, one call per step


def test_refuses_what_it_cannot_model(pipe):
    if "Flux" in type(pipe.transformer).__name__:
        for mode in ("npo", "contrastive-cond"):
            with pytest.raises(ValueError, match=f"{mode} needs an unconditional branch"):
                TransformerReference(pipe, mode)
    else:
        with pytest.raises(ValueError, match=r"does not model transformer inputs \['skip_layers'\]"):
            # skip-layer guidance acts on steps in (1 %, 20 %) of 10: step 1
            reference_images(pipe, "pgd", _call(pipe, skip_guidance_layers=[0], num_inference_steps=10))
    with pytest.raises(ValueError, match="unknown mode"):
        TransformerReference(pipe, "ppo")


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_one_segmented_transformer_call_equals_the_branch_calls(pipes, family):
    """The mechanism the SD3/Flux patch will use, checked on the inputs the pipeline really passes: rows
    [base | pos | neg | merged] in one transformer call, every batch-dim input replicated per branch, position ids
    passed once, equals one peft call per branch."""
    from cgkernels.lora_layers import attach_segmented_lora, segment_routing
    from transformer_reference import BATCH_INPUTS

    pipe = pipes[family]
    captured = []
    hook = pipe.transformer.register_forward_pre_hook(lambda m, a, kw: captured.append(dict(kw)), with_kwargs=True)
    try:
        pipe(**_call(pipe, num_inference_steps=1, prompt=["a red circle", "a tree"]))
    finally:
        hook.remove()
    kwargs = {k: v for k, v in captured[0].items() if k != "return_dict"}
    batch = [k for k in BATCH_INPUTS[family] if kwargs.get(k) is not None]
    rows = kwargs["hidden_states"].shape[0]
    branches = [None, {"pos": 1.0}, {"neg": 1.0}, {"pos": 0.5, "neg": -0.5}]
    transformer = pipe.transformer
    expected = []
    try:
        for adapters in branches:
            if adapters is None:
                transformer.disable_lora()
            else:
                transformer.enable_lora()
                transformer.set_adapters(list(adapters), list(adapters.values()))
            expected.append(transformer(**kwargs, return_dict=False)[0].double())
    finally:
        transformer.enable_lora()
        transformer.set_adapters(["pos", "neg"])
    stacked = dict(kwargs)
    for k in batch:
        stacked[k] = torch.cat([kwargs[k]] * len(branches))
    with attach_segmented_lora(transformer, {"pos": {"pos": 1.0}, "neg": {"neg": 1.0},
                                             "merged": {"pos": 0.5, "neg": -0.5}}) as handle:
        with torch.no_grad(), segment_routing(handle, [(rows, None), (rows, "pos"), (rows, "neg"), (rows, "merged")]):
            out = transformer(**stacked, return_dict=False)[0].double()
    # Two fp32 evaluations in different orders (one batched call vs one peft call per branch): each is within
    # FP32_UNET_REL of the largest output magnitude of float64, so they differ by at most twice that.
    atol = 2 * FP32_UNET_REL * max(float(e.abs().max()) for e in expected)
    for i, reference in enumerate(expected):
        torch.testing.assert_close(out[i * rows:(i + 1) * rows], reference, rtol=0, atol=atol)
    assert (expected[1] - expected[0]).abs().max() > 1e-3 and (expected[2] - expected[0]).abs().max() > 1e-3
