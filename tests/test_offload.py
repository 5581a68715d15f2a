"""cgkernels.patch with accelerate's CPU offload, as diffusers installs it (the hooks run on CPU too).

enable_model_cpu_offload wraps pipe.unet.forward in a hook that diffusers removes and re-installs after every
pipeline call (maybe_free_model_hooks). Before the fix only the first call after `offload -> patch` was guided and
`patch -> offload -> unpatch` brought the stale patched forward back. Each case runs three pipeline calls and checks
the output and the UNet rows of every call against the same pipeline patched (or unpatched) without offload.
"""
import pytest
import torch
from accelerate import cpu_offload

import cgkernels
from cgkernels.testing import add_random_lora, tiny_sd_pipeline

CALLS = 3


@pytest.fixture(scope="module")
def pipe():
    pipe = tiny_sd_pipeline("sd15", seed=3)
    add_random_lora(pipe, "pos", rank=4, seed=1, lora_alpha=6)
    add_random_lora(pipe, "neg", rank=3, seed=2, lora_alpha=2)
    pipe.rows = []
    pipe.unet.conv_in.register_forward_pre_hook(lambda module, args: pipe.rows.append(args[0].shape[0]))
    yield pipe
    pipe.remove_all_hooks()


def _run(pipe):
    """(latents, UNet batch rows of each step) of one pipeline call."""
    pipe.rows.clear()
    out = pipe("a red circle", num_inference_steps=2, guidance_scale=5.0, output_type="latent",
               generator=torch.Generator().manual_seed(0)).images
    return out, list(pipe.rows)


@pytest.fixture(scope="module")
def expected(pipe):
    """Latents without offload: (unpatched, patched contrastive)."""
    base, base_rows = _run(pipe)
    cgkernels.patch(pipe, guidance="contrastive", strength=1.5)
    try:
        guided, guided_rows = _run(pipe)
    finally:
        cgkernels.unpatch(pipe)
    assert set(base_rows) == {2} and guided_rows == [6] * len(base_rows)
    assert (guided - base).abs().max() > 1e-3  # the adapters matter, so a lost patch cannot pass unnoticed
    return base, guided, len(base_rows)


def _assert_calls(pipe, latents, rows):
    for _ in range(CALLS):
        out, out_rows = _run(pipe)
        assert out_rows == rows
        assert torch.equal(out, latents)  # on CPU offload moves nothing: the same arithmetic, bit for bit


@pytest.mark.parametrize("order", ["offload-then-patch", "patch-then-offload"])
def test_model_offload_guides_every_call_and_unpatch_restores(pipe, expected, order):
    base, guided, calls = expected
    pipe.remove_all_hooks()
    try:
        if order == "offload-then-patch":
            pipe.enable_model_cpu_offload(device="cpu")
            cgkernels.patch(pipe, guidance="contrastive", strength=1.5)
        else:
            cgkernels.patch(pipe, guidance="contrastive", strength=1.5)
            pipe.enable_model_cpu_offload(device="cpu")
        assert cgkernels.patching.is_patched(pipe)
        _assert_calls(pipe, guided, [6] * calls)
        cgkernels.unpatch(pipe)
        _assert_calls(pipe, base, [2] * calls)  # no stale patched forward behind the offload hook
        cgkernels.patch(pipe, guidance="contrastive", strength=1.5)  # patching again is accepted and guides
        _assert_calls(pipe, guided, [6] * calls)
        cgkernels.unpatch(pipe)
        pipe.remove_all_hooks()  # offload off: the UNet runs its own forward again
        _assert_calls(pipe, base, [2] * calls)
    finally:
        if cgkernels.patching.is_patched(pipe):
            cgkernels.unpatch(pipe)
        pipe.remove_all_hooks()


def test_per_layer_offload_is_refused_in_either_order(pipe):
    """enable_sequential_cpu_offload (accelerate's cpu_offload per module, which diffusers calls; it insists on an
    accelerator, so the hooks are installed directly here) keeps weights off-device outside each submodule's own
    forward, where the fused layers read them."""
    unet = pipe.unet
    cgkernels.patch(pipe)
    try:
        cpu_offload(unet, execution_device="cpu")
        with pytest.raises(ValueError, match="enable_model_cpu_offload"):
            _run(pipe)
    finally:
        cgkernels.unpatch(pipe)
        pipe.remove_all_hooks()
    cpu_offload(unet, execution_device="cpu")
    try:
        with pytest.raises(ValueError, match="sequential"):
            cgkernels.patch(pipe)
        assert not cgkernels.patching.is_patched(pipe)
    finally:
        pipe.remove_all_hooks()
