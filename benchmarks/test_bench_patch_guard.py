"""Host cost of cgkernels.patch's misuse guards (cgkernels.patch_guard) against the patched UNet call they guard.

Per UNet call the patch looks up the calling pipeline (a short frame walk) and compares pipe.unet.peft_config with
its patch-time stamp; once per pipeline call (and on direct UNet calls) it scans every LoRA layer's stamps. The
scan is O(LoRA layers): `extra_info["per_layer_us"]` scales it to a real UNet (SDXL with attention LoRA: ~560
layers). Tiny SD1.5-shaped UNet called directly with a CFG batch of 2 (6 branch rows; a direct call also runs the
layer scan); on CUDA the UNet call is the same tiny model.
"""
import pytest
import torch

import cgkernels
from cgkernels.lora_layers import lora_layers
from cgkernels.patch_guard import AdapterGuard, calling_pipeline
from cgkernels.testing import add_random_lora, tiny_sd_pipeline

GROUP = "patch guard vs one patched UNet call (tiny sd15, contrastive)"


@pytest.fixture(scope="module")
def patched(bench_device):
    pipe = tiny_sd_pipeline("sd15")
    add_random_lora(pipe, "pos", rank=4, seed=1)
    add_random_lora(pipe, "neg", rank=4, seed=2)
    pipe.to(bench_device)
    pipe._guidance_scale, pipe._guidance_rescale = 5.0, 0.0
    cgkernels.patch(pipe, guidance="contrastive")
    yield pipe
    cgkernels.unpatch(pipe)


@pytest.mark.parametrize("variant", ["patched UNet call", "per-call checks", "layer scan", "layer scan (cfg)"])
def test_guard_cost(benchmark, patched, bench_device, device_sync, variant):
    benchmark.group = GROUP
    benchmark.extra_info["variant"] = variant
    unet = patched.unet
    layers = lora_layers(unet)
    guard = AdapterGuard(unet, layers, watch_user_settings=variant.endswith("(cfg)"))
    if variant == "patched UNet call":
        benchmark.extra_info["baseline"] = True
        sample = torch.randn(2, 4, 16, 16, device=bench_device)
        text = torch.randn(2, 7, 32, device=bench_device)
        t = torch.tensor(400, device=bench_device)

        def call():
            with torch.no_grad():
                unet(sample, t, text, return_dict=False)
            device_sync()
    elif variant == "per-call checks":
        def call():
            guard._check_configs()
            calling_pipeline()
    else:
        call = guard._check_layers
    benchmark(call)
    if variant.startswith("layer scan") and benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["per_layer_us"] = benchmark.stats.stats.median / len(layers) * 1e6
