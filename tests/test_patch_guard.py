"""Misuse of a patched pipeline is refused on the host (or followed correctly), never silently mis-guided:
adapters loaded, deleted, fused, edited or re-weighted after `patch`, other pipelines sharing the patched UNet,
unsupported dtypes and pipeline classes."""
import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

import cgkernels
from cgkernels.testing import FP32_UNET_REL, add_random_lora, tiny_sd_pipeline

PROMPT = "a red circle"


def _pipe():
    pipe = tiny_sd_pipeline("sd15", seed=3)
    add_random_lora(pipe, "pos", rank=4, seed=1, lora_alpha=6)
    add_random_lora(pipe, "neg", rank=2, seed=2, target_modules=("to_k", "to_v"))
    pipe.unet.set_adapters(["pos", "neg"])
    return pipe


@pytest.fixture
def pipe():
    return _pipe()


def _run(pipe, **kwargs):
    args = dict(prompt=PROMPT, num_inference_steps=2, guidance_scale=5.0, output_type="latent",
                generator=torch.Generator().manual_seed(0))
    args.update(kwargs)
    return pipe(**args).images


def test_fuse_lora_after_patch_is_refused_until_unfused(pipe):
    cgkernels.patch(pipe, guidance="contrastive")
    guided = _run(pipe)
    pipe.fuse_lora(adapter_names=["pos"])
    with pytest.raises(ValueError, match=r"fused into pipe.unet's base weights .*pipe.unfuse_lora\(\)"):
        _run(pipe)
    pipe.unfuse_lora()
    # unfusing restores W within fp32 rounding of W itself, well inside one UNet forward's own rounding bound
    torch.testing.assert_close(_run(pipe), guided, rtol=0, atol=FP32_UNET_REL * guided.abs().max().item())
    cgkernels.unpatch(pipe)


@pytest.mark.parametrize("change, message", [
    (lambda p: add_random_lora(p, "extra", rank=2, seed=5, target_modules=("to_q",)), r"loaded: \['extra'\]"),
    (lambda p: p.unet.delete_adapters("neg"), r"deleted: \['neg'\]"),
])
def test_adapters_loaded_or_deleted_after_patch_are_refused(pipe, change, message):
    cgkernels.patch(pipe, guidance="pgd")
    _run(pipe)
    change(pipe)
    with pytest.raises(ValueError, match=message + r".*cgkernels.unpatch\(pipe\) and patch again"):
        _run(pipe)
    cgkernels.unpatch(pipe)  # and patching again picks the new set up
    cgkernels.patch(pipe, guidance="pgd")
    _run(pipe)
    cgkernels.unpatch(pipe)


def test_adapter_weights_edited_in_place_after_patch_are_refused(pipe):
    cgkernels.patch(pipe, guidance="contrastive")
    _run(pipe)
    layer = next(m for m in pipe.unet.modules() if hasattr(m, "lora_A") and "neg" in m.lora_A)
    with torch.no_grad():
        layer.lora_B["neg"].weight.mul_(2.0)
    with pytest.raises(ValueError, match="modified in place"):
        _run(pipe)
    cgkernels.unpatch(pipe)


def test_set_adapters_after_patch(pipe):
    """Preference modes ignore set_adapters by design (the result does not change); mode "cfg" runs the user's
    active adapters and weights, so a change after patching is refused."""
    cgkernels.patch(pipe, guidance="npo", strength=1.5)
    before = _run(pipe)
    pipe.unet.set_adapters(["pos"], [0.3])
    assert torch.equal(_run(pipe), before)
    cgkernels.unpatch(pipe)

    cgkernels.patch(pipe, guidance="cfg")
    _run(pipe)
    pipe.unet.set_adapters(["pos", "neg"], [1.0, 0.5])
    with pytest.raises(ValueError, match="set_adapters weights changed .*guidance='cfg'"):
        _run(pipe)
    pipe.unet.set_adapters(["pos"], [0.3])  # back as at patch time: accepted again
    _run(pipe)
    pipe.unet.disable_lora()
    with pytest.raises(ValueError, match="guidance='cfg'"):
        _run(pipe)
    cgkernels.unpatch(pipe)


def test_pipeline_sharing_the_patched_unet_uses_its_own_guidance_settings(pipe):
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    img2img = StableDiffusionImg2ImgPipeline(**pipe.components)
    img2img.set_progress_bar_config(disable=True)
    call = dict(prompt=PROMPT, image=image, strength=0.8, num_inference_steps=3, guidance_scale=9.0,
                output_type="latent")
    settings = dict(guidance="contrastive", strength=1.5, stop=0.5)

    cgkernels.patch(img2img, **settings)  # the expected result: img2img patched itself
    expected = img2img(**call, generator=torch.Generator().manual_seed(0)).images
    cgkernels.unpatch(img2img)

    cgkernels.patch(pipe, **settings)
    _run(pipe, guidance_scale=3.0, num_inference_steps=4)  # pipe's last guidance scale and step count: 3 and 4
    shared = img2img(**call, generator=torch.Generator().manual_seed(0)).images
    assert torch.equal(shared, expected)
    with_pipes_scale = img2img(**{**call, "guidance_scale": 3.0}, generator=torch.Generator().manual_seed(0)).images
    assert (with_pipes_scale - expected).abs().max() > 1e-2  # the guidance scale matters

    class SamePipeline(StableDiffusionPipeline):  # keeps the parent's denoising loop: accepted
        pass

    class CustomPipeline(StableDiffusionPipeline):  # its own __call__ may call the UNet its own way: refused
        def __call__(self, *args, **kwargs):
            return super().__call__(*args, **kwargs)

    same = SamePipeline(**pipe.components)
    same.set_progress_bar_config(disable=True)
    _run(same)
    custom = CustomPipeline(**pipe.components)
    custom.set_progress_bar_config(disable=True)
    with pytest.raises(ValueError, match="called by another pipeline; cgkernels supports subclasses of "
                                         "StableDiffusionPipeline that keep its __call__.*CustomPipeline"):
        _run(custom)
    cgkernels.unpatch(pipe)


def test_unsupported_dtype_and_pipeline_refused_at_patch_time():
    pipe = _pipe().to(torch.float64)
    with pytest.raises(ValueError, match=r"pipe.unet is float64; cgkernels.patch supports float32, float16, bfloat16"):
        cgkernels.patch(pipe, guidance="contrastive")
    assert "forward" not in pipe.unet.__dict__

    class CustomPipeline(StableDiffusionPipeline):
        def __call__(self, *args, **kwargs):
            return super().__call__(*args, **kwargs)

    with pytest.raises(ValueError, match="keep its __call__.*CustomPipeline gets its __call__ from CustomPipeline"):
        cgkernels.patch(CustomPipeline(**pipe.to(torch.float32).components))
    with pytest.raises(ValueError, match="supports StableDiffusionPipeline.*; got DiffusionPipeline"):
        cgkernels.patch(DiffusionPipeline())


def test_diffusers_layerwise_casting_is_refused_at_patch_time():
    """enable_layerwise_casting keeps weights in the storage dtype outside each layer's forward, where the fused
    layers read them: refused by name at patch time (before: a dtype TypeError at the first step)."""
    pipe = _pipe()
    pipe.unet.enable_layerwise_casting(storage_dtype=torch.bfloat16, compute_dtype=torch.float32)
    with pytest.raises(ValueError, match="layerwise_casting"):
        cgkernels.patch(pipe)
    assert not cgkernels.patching.is_patched(pipe)
