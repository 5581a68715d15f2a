"""A different LoRA per prompt in one batch: one CFG denoising step of 8 prompts whose images use 1, 3 or 8 distinct
LoRAs (prompt i gets adapter i mod k), every variant returning the same CFG prediction for all 8 prompts.

  (a) cgkernels   the patched UNet, `cross_attention_kwargs={"adapters_per_prompt": [...]}`: ONE UNet call over the
                  16 CFG rows through the segmented multi-LoRA layers, fused CFG merge
  (b) peft-mixed  one UNet call over the 16 rows with peft's mixed-adapter batch (`adapter_names` per row: peft
                  splits every LoRA layer's batch per adapter in Python)
  (c) per-adapter one UNet call per distinct adapter, over the CFG rows of that adapter's prompts (set_adapters)
  (d) sequential  one UNet call per prompt (its 2 CFG rows), as a loop of per-prompt pipeline calls would
  (e) base-only   the UNet with LoRA off over the 16 rows (the floor; baseline of the ratio table)

Rank-8 adapters on to_q/to_k/to_v/to_out.0. Full SD1.5 UNet (512^2) in fp16 on CUDA; the reduced UNet of
test_bench_unet in fp32 on CPU. The GPU suite's "adapter-mix" stage times the same variants (gpu_suite_stages).
`python benchmarks/test_bench_adapter_mix.py OUT.json` measures process CPU seconds instead (interleaved medians; the
wall-clock medians of a shared 2-core machine move by tens of percent between runs).
"""
from __future__ import annotations

import functools

import pytest
import torch

import cgkernels
from bench_steps import peft_mixed_batch, time_denoiser_step
from cgkernels.testing import add_random_lora, tiny_sd_pipeline

CUDA = torch.cuda.is_available()
PROMPTS = 8
DISTINCT = (1, 3, 8)
GUIDANCE_SCALE = 7.5
VARIANTS = ("cgkernels", "peft-mixed", "per-adapter", "sequential", "base-only")


@functools.lru_cache(maxsize=1)
def setup(device: str | None = None, tiny: bool = False):
    """(pipe, sample [2P], text [2P], t): a pipeline object around the benchmark UNet (test_bench_unet's: full SD1.5
    on CUDA, reduced on CPU; tiny=True: the test suite's tiny UNet, for the GPU suite's rehearsal) with adapters
    "lora0".."lora7", fed the CFG batch [uncond x P, cond x P]."""
    from diffusers import UNet2DConditionModel

    from test_bench_unet import _unet_config

    device = torch.device(device or ("cuda" if CUDA else "cpu"))
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    pipe = tiny_sd_pipeline("sd15")  # tiny text encoder / VAE: the step is fed embeddings directly
    if not tiny:
        torch.manual_seed(0)
        with torch.device(device):
            unet = UNet2DConditionModel(**_unet_config("sd15"))
        pipe.register_modules(unet=unet.to(dtype).eval())
    pipe.to(device)
    for i in range(max(DISTINCT)):
        add_random_lora(pipe, f"lora{i}", rank=8, seed=10 + i)
    cfg = pipe.unet.config
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(PROMPTS, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=gen)
    text = torch.randn(2 * PROMPTS, 77, cfg.cross_attention_dim, generator=gen)
    sample = torch.cat([sample, sample]).to(device, dtype)
    return pipe, sample, text.to(device, dtype), torch.tensor(500, device=device)


def adapters_of(distinct: int) -> list[str]:
    return [f"lora{i % distinct}" for i in range(PROMPTS)]


def _cfg(out):
    uncond, cond = out.chunk(2)
    return uncond + GUIDANCE_SCALE * (cond - uncond)


def variant_fn(variant: str, distinct: int, pipe, sample, text, t):
    """(run, cleanup) of one variant; run() returns the CFG prediction [P, ...] of all prompts."""
    unet = pipe.unet
    adapters = adapters_of(distinct)
    unet.enable_lora()
    if variant == "cgkernels":
        pipe._guidance_scale, pipe._guidance_rescale = GUIDANCE_SCALE, 0.0
        cgkernels.patch(pipe, guidance=cgkernels.Guidance(cgkernels.branch("uncond"), cgkernels.branch("cond")))
        options = {"adapters_per_prompt": [{a: 1.0} for a in adapters]}

        def run():
            return unet(sample, t, text, cross_attention_kwargs=options, return_dict=False)[0][:PROMPTS]
        return run, lambda: cgkernels.unpatch(pipe)
    if variant == "peft-mixed":
        names = adapters + adapters  # both CFG halves

        def run():
            with peft_mixed_batch(unet, names):
                return _cfg(unet(sample, t, text, return_dict=False)[0])
        return run, None
    if variant == "per-adapter":
        groups = {a: [i for i, b in enumerate(adapters) if b == a] for a in dict.fromkeys(adapters)}

        def run():
            out = torch.empty_like(sample[:PROMPTS])
            for adapter, prompts in groups.items():
                rows = prompts + [PROMPTS + i for i in prompts]
                unet.set_adapters([adapter])
                out[prompts] = _cfg(unet(sample[rows], t, text[rows], return_dict=False)[0])
            return out
        return run, None
    if variant == "sequential":
        def run():
            out = torch.empty_like(sample[:PROMPTS])
            for i, adapter in enumerate(adapters):
                unet.set_adapters([adapter])
                rows = [i, PROMPTS + i]
                out[i:i + 1] = _cfg(unet(sample[rows], t, text[rows], return_dict=False)[0])
            return out
        return run, None
    unet.disable_lora()
    return (lambda: _cfg(unet(sample, t, text, return_dict=False)[0])), None


def restore(pipe):
    pipe.unet.enable_lora()
    pipe.unet.set_adapters([f"lora{i}" for i in range(max(DISTINCT))])


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("distinct", DISTINCT)
def test_adapter_mix_step(benchmark, distinct, variant):
    pipe, sample, text, t = setup()
    run, cleanup = variant_fn(variant, distinct, pipe, sample, text, t)
    try:
        time_denoiser_step(benchmark, run, cleanup, group=f"adapter-mix {PROMPTS} prompts, {distinct} LoRAs",
                           variant=variant, baseline=variant == "base-only")
    finally:
        restore(pipe)


def test_variants_agree():
    """Every variant computes the same prediction (not a timing: runs under --benchmark-disable too)."""
    pipe, sample, text, t = setup()
    for distinct in (3,):
        results = {}
        for variant in VARIANTS[:-1]:
            run, cleanup = variant_fn(variant, distinct, pipe, sample, text, t)
            try:
                with torch.inference_mode():
                    results[variant] = run().float()
            finally:
                if cleanup is not None:
                    cleanup()
                restore(pipe)
        scale = results["sequential"].abs().max().item()
        for variant, value in results.items():
            tolerance = 5e-3 if sample.dtype == torch.float16 else 1e-4
            torch.testing.assert_close(value, results["sequential"], rtol=0, atol=tolerance * scale, msg=variant)


def cpu_seconds(rounds: int = 5) -> dict:
    """Process CPU seconds per step of every variant (median of `rounds`, variants interleaved round by round), one
    intra-op thread: on a shared, busy machine wall-clock medians move by tens of percent between runs, CPU time
    much less."""
    import statistics
    import time

    torch.set_num_threads(1)
    pipe, sample, text, t = setup()
    result = {}
    for distinct in DISTINCT:
        samples = {variant: [] for variant in VARIANTS}
        for _ in range(rounds):
            for variant in VARIANTS:
                run, cleanup = variant_fn(variant, distinct, pipe, sample, text, t)
                try:
                    with torch.inference_mode():
                        run()  # warm-up
                        start = time.process_time()
                        run()
                        samples[variant].append(time.process_time() - start)
                finally:
                    if cleanup is not None:
                        cleanup()
                    restore(pipe)
        medians = {variant: statistics.median(values) for variant, values in samples.items()}
        result[f"{distinct} LoRAs"] = {
            "cpu_s": {variant: round(value, 4) for variant, value in medians.items()},
            "cgkernels_vs": {variant: round(medians["cgkernels"] / value, 3) for variant, value in medians.items()
                             if variant != "cgkernels"},
        }
    return result


if __name__ == "__main__":  # python benchmarks/test_bench_adapter_mix.py [OUT.json]
    import json
    import platform
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    out = dict(machine=f"{platform.machine()}, {torch.get_num_threads()} threads -> 1", torch=torch.__version__,
               prompts=PROMPTS, results=cpu_seconds())
    text = json.dumps(out, indent=1)
    print(text)
    if len(sys.argv) > 1:
        Path(sys.argv[1]).write_text(text + "\n")
