"""Multi-LoRA linear at SD1.5 / SDXL attention and feed-forward shapes, rows = 6 guidance branches x tokens.

Row layouts (LAYOUTS), both measured, grouped first:
- "grouped": what the patch emits for contrastive guidance (cgkernels.guidance.row_plan groups rows by adapter mix):
  [b(u), b(c) | p(u), p(c) | n(u), n(c)], three segments of 2 x tokens rows with adapters [-1, 0, 1].
- "interleaved": [b(u), p(u), n(u), b(c), p(c), n(c)], six segments with adapters [-1, 0, 1, -1, 0, 1]. No caller
  emits it; it stays as a stress case (twice the segment boundaries, each adapter's rows in two runs).
Variants, in the same run:
- base-only F.linear (the baseline: cuBLAS on CUDA; the floor any LoRA method pays)
- peft mixed batch: peft.tuners.lora.Linear with adapters "pos"/"neg", forward(x, adapter_names=[...]) per sample
- naive per-segment loop: one F.linear + LoRA per branch, then torch.cat
- cgkernels: multi_lora_linear (backend auto: the fused Triton kernel on CUDA, the torch backend on CPU)
Forward under no_grad, and forward+backward (gradients for x and the LoRA weights; the base layer is frozen).
CUDA: full sizes in float16. CPU: 256 tokens per branch in float32, so the file runs in about a minute.
CPU timings use a fixed number of torch threads (CGKERNELS_BENCH_THREADS, default 1): with the default (all cores)
the ratios swing with whatever else runs on the machine. With one thread the CPU timer is the process's CPU time,
which leaves out the time the process waits for a core on a shared machine (cache and memory contention remain).
Each benchmark runs at least MIN_ROUNDS rounds (CPU: after CPU_WARMUP_CALLS untimed calls).
"""
import os
import time
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from cgkernels.ops import multi_lora_linear

# layout: adapter of each of the 6 branches in row order (-1: base only); equal neighbours form one segment
LAYOUTS = {
    "grouped": [-1, -1, 0, 0, 1, 1],
    "interleaved": [-1, 0, 1, -1, 0, 1],
}
ADAPTER_NAMES = ["pos", "neg"]
# name: (tokens per branch on CUDA, in features, out features)
SHAPES = {
    "sd15 to_q 64x64": (4096, 320, 320),
    "sd15 ff.proj (GEGLU) 64x64": (4096, 320, 2560),
    "sd15 ff.out 64x64": (4096, 1280, 320),
    "sdxl to_q 64x64": (4096, 640, 640),
    "sdxl to_q 32x32": (1024, 1280, 1280),
    "sdxl ff.proj (GEGLU) 32x32": (1024, 1280, 10240),
}
CPU_SHAPES = ["sd15 to_q 64x64", "sd15 ff.proj (GEGLU) 64x64", "sdxl to_q 32x32"]
CPU_TOKENS = 256
VARIANTS = ["base-only F.linear", "peft mixed batch", "naive per-segment loop", "cgkernels"]
# The stress layout runs the variants whose work depends on the row layout, and its group's baseline.
STRESS_VARIANTS = ["base-only F.linear", "peft mixed batch", "cgkernels"]
CPU_THREADS = int(os.environ.get("CGKERNELS_BENCH_THREADS", "1"))
MIN_ROUNDS = 15
CPU_WARMUP_CALLS = 3
# Only on CPU: on CUDA the harness's synchronizing wall-clock timer must stay.
TIMER = {} if torch.cuda.is_available() or CPU_THREADS != 1 else {"timer": time.process_time}


@pytest.fixture(scope="module", autouse=True)
def fixed_cpu_threads():
    """Pin torch's CPU thread count for this module's timings, and restore it afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(CPU_THREADS)
    yield CPU_THREADS
    torch.set_num_threads(previous)


def segments(branch_adapters, tokens):
    """(seg_indptr, seg_adapter) of a branch layout: neighbouring branches with one adapter form one segment, as
    cgkernels.lora_layers routes them."""
    indptr, adapters = [0], []
    for adapter in branch_adapters:
        if adapters and adapters[-1] == adapter:
            indptr[-1] += tokens
        else:
            adapters.append(adapter)
            indptr.append(indptr[-1] + tokens)
    return indptr, adapters


class LoraProblem:
    """One layer's operands: a frozen base linear and two LoRA adapters, shared by every variant, and a row layout
    (a LAYOUTS key)."""

    def __init__(self, tokens, in_features, out_features, rank, device, dtype, layout="grouped", seed=0):
        gen = torch.Generator().manual_seed(seed)
        self.layout = layout
        self.branch_adapters = LAYOUTS[layout]
        self.x = (torch.randn(len(self.branch_adapters), tokens, in_features, generator=gen)).to(device, dtype)
        self.base = nn.Linear(in_features, out_features).to(device, dtype).requires_grad_(False)
        self.lora_a = (torch.randn(2, rank, in_features, generator=gen) * in_features**-0.5).to(device, dtype)
        self.lora_b = (torch.randn(2, out_features, rank, generator=gen) * rank**-0.5).to(device, dtype)
        self.scale = 1.0
        self.seg_indptr, self.seg_adapter = segments(self.branch_adapters, tokens)
        self.peft_layer = self._peft_layer(rank)

    def _peft_layer(self, rank):
        """A peft LoRA Linear around the same base layer, with the same two adapters (scaling alpha/r = 1)."""
        from peft import LoraConfig, inject_adapter_in_model

        holder = nn.Module()
        holder.proj = self.base
        for name in ADAPTER_NAMES:
            config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=["proj"])
            with warnings.catch_warnings():  # the second adapter is intended ("multiple adapters" warning)
                warnings.simplefilter("ignore", UserWarning)
                holder = inject_adapter_in_model(config, holder, adapter_name=name)
        layer = holder.proj
        with torch.no_grad():
            for index, name in enumerate(ADAPTER_NAMES):
                layer.lora_A[name].weight.copy_(self.lora_a[index])
                layer.lora_B[name].weight.copy_(self.lora_b[index])
        layer.to(self.x.device, self.x.dtype)
        return layer.eval()  # mixed batches are refused in training mode; there is no dropout either way

    def trainable(self, variant):
        """The tensors that get gradients in forward+backward."""
        if variant == "base-only F.linear":
            return [self.x]
        if variant == "peft mixed batch":
            layer = self.peft_layer
            return [self.x] + [m[n].weight for m in (layer.lora_A, layer.lora_B) for n in ADAPTER_NAMES]
        return [self.x, self.lora_a, self.lora_b]

    def forward(self, variant):
        x, weight, bias = self.x, self.base.weight, self.base.bias
        if variant == "base-only F.linear":
            return F.linear(x, weight, bias)
        if variant == "peft mixed batch":
            names = ["__base__" if a < 0 else ADAPTER_NAMES[a] for a in self.branch_adapters]
            return self.peft_layer(x, adapter_names=names)
        if variant == "naive per-segment loop":
            outputs = []
            for branch, adapter in enumerate(self.branch_adapters):
                out = F.linear(x[branch], weight, bias)
                if adapter >= 0:
                    out = out + self.scale * F.linear(F.linear(x[branch], self.lora_a[adapter]), self.lora_b[adapter])
                outputs.append(out)
            return torch.stack(outputs)
        if variant == "cgkernels":
            scales = [self.scale] * len(self.seg_adapter)
            lora = (self.lora_a, self.lora_b)
            return multi_lora_linear(x, weight, bias, *lora, self.seg_indptr, self.seg_adapter, scales)
        raise ValueError(variant)


def lora_flop_floor(in_features, out_features, rank, with_backward):
    """Least time any LoRA method can take relative to the base-only linear, by FLOPs (no kernel is faster).

    Per LoRA row the base costs 2KN (forward) and the adapter 2r(K+N); with backward (dx only for the frozen base)
    the base costs 4KN and the adapter at least 6r(K+N): shrink and expand, dx's two rank-r products, dA and dB.
    """
    lora_rows = 4 / 6  # 4 of the 6 branches carry an adapter, in either layout
    base, adapter = (4, 6) if with_backward else (2, 2)
    k, n = in_features, out_features
    return 1 + lora_rows * adapter * rank * (k + n) / (base * k * n)


def make_call(problem, variant, with_backward):
    if not with_backward:
        def forward_only():
            with torch.no_grad():
                return problem.forward(variant)

        return forward_only

    inputs = problem.trainable(variant)
    for tensor in inputs:
        tensor.requires_grad_(True)
    grad_y = torch.randn(problem.forward("base-only F.linear").shape, device=problem.x.device, dtype=problem.x.dtype)

    def forward_backward():
        return torch.autograd.grad(problem.forward(variant), inputs, grad_y)

    return forward_backward


@pytest.mark.benchmark(min_rounds=MIN_ROUNDS, **TIMER)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("with_backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("rank", [8, 64])
@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_multi_lora_linear(benchmark, bench_device, layout, shape_name, rank, with_backward, variant):
    on_cuda = bench_device.type == "cuda"
    if not on_cuda and shape_name not in CPU_SHAPES:
        pytest.skip("reduced CPU suite")
    if layout != "grouped" and (variant not in STRESS_VARIANTS or rank != 8 or with_backward):
        pytest.skip("the interleaved stress layout: forward, rank 8, the layout-dependent variants")
    tokens, in_features, out_features = SHAPES[shape_name]
    tokens = tokens if on_cuda else CPU_TOKENS
    dtype = torch.float16 if on_cuda else torch.float32
    problem = LoraProblem(tokens, in_features, out_features, rank, bench_device, dtype, layout=layout)
    call = make_call(problem, variant, with_backward)
    for _ in range(1 if on_cuda else CPU_WARMUP_CALLS):
        call()  # warm-up: Triton compile and autotune (CUDA), allocator and BLAS setup (CPU), outside the timing

    rows = tokens * len(problem.branch_adapters)
    kind = "fwd+bwd" if with_backward else "fwd"
    benchmark.group = (
        f"multi-lora {kind} {layout} {shape_name} rows={rows} {in_features}->{out_features} r={rank} "
        f"{str(dtype).removeprefix('torch.')}"
    )
    benchmark.extra_info["variant"] = variant
    benchmark.extra_info["layout"] = layout
    if variant == "base-only F.linear":
        benchmark.extra_info["baseline"] = True
    benchmark.extra_info["cpu_threads"] = torch.get_num_threads()
    benchmark.extra_info["lora_flop_floor"] = round(lora_flop_floor(in_features, out_features, rank, with_backward), 4)
    benchmark(call)
