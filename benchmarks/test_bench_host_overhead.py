"""Host overhead of the patched path: per-layer call cost at tiny shapes, and eager vs compiled patched UNet steps.

- layer-call: one call of a LoRA layer at tiny shapes (6 samples x 4 tokens, 16 features, rank 4) on CPU, where
  the launch cost dominates the arithmetic: a plain nn.Linear, a peft LoRA Linear with one active adapter (the
  baseline: goal, the segmented layer costs no more host time), and the cgkernels segmented layer (its launch
  cached per routing and shape) with every row through one adapter (the baseline's work) and with the six rows
  routed [base, pos, neg, base, pos, neg] (on CPU the torch backend then runs four adapter segments: more ops).
- patched-step: one patched tiny-UNet step (contrastive, 6 rows), eager vs `torch.compile(unet, fullgraph=True)`
  (the host part stays eager, the core is one graph). Goal: compiled <= eager. CPU uses dynamo's "eager" backend
  (tracing without codegen: what removes Python overhead, without minutes of C++ compilation); CUDA uses inductor
  and inductor with CUDA graphs (mode="reduce-overhead").
- compiled-step (CUDA only): full SD1.5 512^2 fp16 contrastive step, patched + compiled with CUDA graphs, against
  the base-only UNet over the same 6 rows compiled the same way (baseline; goal <= 1.10x) and the naive sequential
  branches (goal: <= 0.5x).
"""
from __future__ import annotations

import os
import time

import pytest
import torch
from torch import nn

import cgkernels
from cgkernels.lora_layers import attach_segmented_lora
from cgkernels.testing import add_random_lora, tiny_sd_pipeline

CUDA = torch.cuda.is_available()
CPU_THREADS = int(os.environ.get("CGKERNELS_BENCH_THREADS", "1"))
TIMER = {} if CUDA or CPU_THREADS != 1 else {"timer": time.process_time}
BRANCHES = [None, "pos", "neg", None, "pos", "neg"]
TOKENS, FEATURES, RANK = 4, 16, 4


@pytest.fixture(scope="module", autouse=True)
def fixed_cpu_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(CPU_THREADS)
    yield
    torch.set_num_threads(previous)


def _lora_linear():
    from peft import LoraConfig, inject_adapter_in_model

    class One(nn.Module):
        def __init__(self):
            super().__init__()
            self.to_q = nn.Linear(FEATURES, FEATURES)

        def forward(self, x):
            return self.to_q(x)

    torch.manual_seed(0)
    model = One()
    for name in ("pos", "neg"):
        config = LoraConfig(r=RANK, lora_alpha=RANK, target_modules=["to_q"], init_lora_weights=False)
        model = inject_adapter_in_model(config, model, adapter_name=name)
    return model


@pytest.mark.benchmark(min_rounds=20, **TIMER)
@pytest.mark.parametrize("variant", ["nn.Linear", "peft LoRA Linear (1 adapter)", "cgkernels segmented (1 adapter)",
                                     "cgkernels segmented (6 branches)"])
def test_layer_call(benchmark, variant):
    model = _lora_linear()
    layer = model.to_q
    x = torch.randn(len(BRANCHES), TOKENS, FEATURES)
    benchmark.group = f"layer-call host time ({len(BRANCHES)}x{TOKENS} rows, {FEATURES} features, r={RANK})"
    benchmark.extra_info["variant"] = variant
    benchmark.extra_info["baseline"] = variant.startswith("peft")
    handle = None
    if variant == "nn.Linear":
        call = lambda: layer.base_layer(x)  # noqa: E731
    elif variant.startswith("peft"):
        layer.set_adapter("pos")
        call = lambda: layer(x)  # noqa: E731
    else:
        handle = attach_segmented_lora(model, {"pos": {"pos": 1.0}, "neg": {"neg": 1.0}})
        # "1 adapter": every row through "pos", the work of the peft baseline; "6 branches": the contrastive rows
        mixes = ["pos"] * len(BRANCHES) if "1 adapter" in variant else BRANCHES
        routing = handle.router.plan([(1, mix) for mix in mixes])
        handle.router.current = routing  # what the patched forward does once per UNet call
        call = lambda: layer(x)  # noqa: E731
    try:
        with torch.inference_mode():
            call()
            benchmark(call)
    finally:
        if handle is not None:
            handle.router.current = None
            handle.detach()


def _patched_tiny_pipe(kind):
    pipe = tiny_sd_pipeline(kind, seed=3)
    add_random_lora(pipe, "pos", rank=4, seed=1)
    add_random_lora(pipe, "neg", rank=4, seed=2)
    pipe.unet.set_adapters(["pos", "neg"])
    pipe._guidance_scale, pipe._guidance_rescale = 7.5, 0.0
    cgkernels.patch(pipe, guidance="contrastive", strength=1.0)
    return pipe


PATCHED_STEP_VARIANTS = ["eager"] + (["compiled inductor", "compiled inductor+cudagraphs"] if CUDA
                                     else ["compiled (dynamo, eager backend)"])


@pytest.mark.benchmark(**TIMER)
@pytest.mark.parametrize("variant", PATCHED_STEP_VARIANTS)
def test_patched_tiny_unet_step(benchmark, variant):
    pipe = _patched_tiny_pipe("sd15")
    device = torch.device("cuda" if CUDA else "cpu")
    pipe.to(device)
    unet, config = pipe.unet, pipe.unet.config
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(2, config.in_channels, config.sample_size, config.sample_size, generator=gen).to(device)
    text = torch.randn(2, 5, config.cross_attention_dim, generator=gen).to(device)
    t = torch.tensor(500, device=device)
    benchmark.group = "patched tiny sd15 UNet step (contrastive, 6 rows)"
    benchmark.extra_info["variant"] = variant
    benchmark.extra_info["baseline"] = variant == "eager"
    torch._dynamo.reset()
    if variant.startswith("compiled"):
        options = dict(fullgraph=True)
        if "dynamo" in variant:
            options["backend"] = "eager"
        if "cudagraphs" in variant:
            options["mode"] = "reduce-overhead"
        unet = torch.compile(unet, **options)
    step = lambda: unet(sample, t, text, return_dict=False)[0]  # noqa: E731
    try:
        with torch.inference_mode():
            for _ in range(3):  # compile, warm up (CUDA graphs record on a later call)
                step()
            benchmark.pedantic(step, rounds=20, iterations=5, warmup_rounds=1)
    finally:
        cgkernels.unpatch(pipe)
        torch._dynamo.reset()


@pytest.mark.skipif(not CUDA, reason="full-size SD1.5 step with CUDA graphs needs a GPU")
@pytest.mark.parametrize("variant", ["base-only 6 rows compiled", "cgkernels compiled", "naive"])
def test_compiled_sd15_contrastive_step(benchmark, variant):
    from test_bench_unet import _setup, _variant_fn

    pipe, sample, text, added = _setup("sd15")
    if variant == "naive":
        run, cleanup = _variant_fn("naive", "contrastive", pipe, sample, text, added)
    else:
        run, cleanup = _variant_fn("cgkernels" if variant.startswith("cgkernels") else "base-only", "contrastive",
                                   pipe, sample, text, added)
        module = pipe.unet
        compiled = torch.compile(module, fullgraph=True, mode="reduce-overhead")
        pipe.unet = compiled
        # _variant_fn's closures call `unet` they captured; rebuild the call on the compiled module
        run = _compiled_call(variant, compiled, sample, text, added)
    benchmark.group = "compiled sd15 512^2 fp16 contrastive step (CUDA graphs)"
    benchmark.extra_info["variant"] = variant
    benchmark.extra_info["baseline"] = variant.startswith("base-only")
    try:
        with torch.inference_mode():
            for _ in range(3):
                run()
            torch.cuda.synchronize()
            benchmark(run)
    finally:
        if variant != "naive":
            pipe.unet = module
        if cleanup is not None:
            cleanup()
        pipe.unet.enable_lora()
        torch._dynamo.reset()


def _compiled_call(variant, unet, sample, text, added):
    t = torch.tensor(500, device=sample.device)
    if variant.startswith("cgkernels"):  # the pipeline's CFG batch [uncond, cond]; the patch expands it to 6 rows
        return lambda: unet(sample, t, text, added_cond_kwargs=added, return_dict=False)[0]
    rows = [0, 1] * 3
    x, e = sample[rows], text[rows]
    a = None if added is None else {k: v[rows] for k, v in added.items()}
    return lambda: unet(x, t, e, added_cond_kwargs=a, return_dict=False)[0]
