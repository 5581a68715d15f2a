"""How the step benchmarks time one denoiser step and one training step (shared by test_bench_unet,
test_bench_transformer, test_bench_train and test_bench_train_flow; gpu_suite_stages reuses those modules)."""
from __future__ import annotations

import contextlib

import torch

from cgkernels.lora_layers import attach_segmented_lora
from cgkernels.train import trainer as T

CUDA = torch.cuda.is_available()


def time_denoiser_step(benchmark, run, cleanup, *, group: str, variant: str, baseline: bool):
    """Times run() under inference mode after one warm-up call (Triton autotune, allocator); records the peak
    memory on CUDA; calls cleanup() (if any) afterwards."""
    benchmark.group = group
    benchmark.extra_info["variant"] = variant
    benchmark.extra_info["baseline"] = baseline
    try:
        with torch.inference_mode():
            run()
            if CUDA:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            benchmark(run)
            if CUDA:
                benchmark.extra_info["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
    finally:
        if cleanup is not None:
            cleanup()


def _autocast():
    return torch.autocast("cuda", dtype=torch.bfloat16) if CUDA else torch.autocast("cpu", enabled=False)


def make_train_step(model, params: dict, inputs, optimizer, *, objective: str, batching: str):
    """(step, detach): step() is one optimizer step of the trainer's objective, with all adapters in one segmented
    pass ("joint", attached here; detach() removes it) or one peft pass per adapter ("separate"); bf16 autocast on
    CUDA."""
    handle = attach_segmented_lora(model, {"pos": {"pos": 1.0}, "neg": {"neg": 1.0}}, trainable=True) \
        if batching == "joint" else None

    def step():
        optimizer.zero_grad(set_to_none=True)
        with _autocast():
            if batching == "joint":
                T.joint_step(model, model, inputs, objective, 5000.0, torch.Tensor.backward)
            else:
                T.separate_step(model, inputs, objective, 5000.0, torch.Tensor.backward, list(params.values()))
        optimizer.step()

    return step, (handle.detach if handle is not None else (lambda: None))


def time_train_step(benchmark, model, params: dict, inputs, optimizer, *, objective: str, batching: str, group: str):
    """Times make_train_step's step ("separate" is the baseline), with its peak memory on CUDA."""
    step, detach = make_train_step(model, params, inputs, optimizer, objective=objective, batching=batching)
    try:
        step()  # warm-up (and the peak-memory probe)
        if CUDA:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            step()
            torch.cuda.synchronize()
            benchmark.extra_info["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
        benchmark.group = group
        benchmark.extra_info["variant"] = batching
        benchmark.extra_info["baseline"] = batching == "separate"
        benchmark.pedantic(step, rounds=5, iterations=2 if CUDA else 1, warmup_rounds=1)
    finally:
        detach()


@contextlib.contextmanager
def peft_mixed_batch(model, adapter_names):
    """peft's own mixed-adapter batch (the honest alternative to the segmented layers): every LoRA layer of `model`
    gets `adapter_names` (one adapter name or "__base__" per row) on each call inside the block."""
    from peft.tuners.lora import LoraLayer

    def inject(module, args, kwargs):
        kwargs["adapter_names"] = adapter_names
        return args, kwargs

    handles = [m.register_forward_pre_hook(inject, with_kwargs=True) for m in model.modules()
               if isinstance(m, LoraLayer)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
