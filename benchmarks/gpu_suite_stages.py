"""Stage bodies of benchmarks/gpu_suite.py (one stage per process; see that file for the order and the output).

Each stage takes a gpu_suite.Context: ctx.rehearsal selects tiny CPU sizes (Triton through the interpreter),
ctx.record appends a result line at once, ctx.check records a pass/fail line, ctx.guarded records an exception and
lets the stage go on with its next item.

Records of timed calls carry time_call's result (one stats dict per timer: "events", "graph", or "wall" on the CPU)
and every ratio summary names its `timer`; multi-LoRA records name their row `layout` ("grouped": what the patch
emits; "interleaved": a stress case); records of a merge name the `merge` that ran ("extension" or "reference").
"""
from __future__ import annotations

import contextlib
import gc
import importlib
import importlib.util
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
GRADIENT_TOLERANCE = {torch.float16: 2e-2, torch.bfloat16: 4e-2, torch.float32: 1e-5}
TOLERANCE = {torch.float16: 1e-2, torch.bfloat16: 2e-2, torch.float32: 1e-5}


@dataclass(frozen=True)
class LayerShape:
    name: str
    tokens: int  # rows per guidance branch; the layer sees 6 * tokens rows
    in_features: int
    out_features: int


# SD1.5 at 512^2 (64^2 latents: 4096 tokens at the top level) and SDXL at 1024^2 (128^2 latents, attention from
# 64^2 down); text rows are 77 tokens per branch, cross-attention K/V project the 768 / 2048-wide text embeddings.
SD15_SHAPES = (
    LayerShape("sd15 attn 64^2 320->320", 4096, 320, 320),
    LayerShape("sd15 attn 32^2 640->640", 1024, 640, 640),
    LayerShape("sd15 attn 16^2 1280->1280", 256, 1280, 1280),
    LayerShape("sd15 ff.proj 64^2 320->2560", 4096, 320, 2560),
    LayerShape("sd15 ff.out 64^2 1280->320", 4096, 1280, 320),
    LayerShape("sd15 text k/v 77 768->320", 77, 768, 320),
    LayerShape("sd15 text k/v 77 768->1280", 77, 768, 1280),
)
SDXL_SHAPES = (
    LayerShape("sdxl attn 64^2 640->640", 4096, 640, 640),
    LayerShape("sdxl attn 32^2 1280->1280", 1024, 1280, 1280),
    LayerShape("sdxl ff.proj 64^2 640->5120", 4096, 640, 5120),
    LayerShape("sdxl ff.out 64^2 2560->640", 4096, 2560, 640),
    LayerShape("sdxl ff.proj 32^2 1280->10240", 1024, 1280, 10240),
    LayerShape("sdxl ff.out 32^2 5120->1280", 1024, 5120, 1280),
    LayerShape("sdxl text k/v 77 2048->640", 77, 2048, 640),
    LayerShape("sdxl text k/v 77 2048->1280", 77, 2048, 1280),
)
# Correctness: the image shapes of both models plus text segments of 2 x 77 rows (batch 2 per branch).
CORRECTNESS_SHAPES = (
    SD15_SHAPES[0], SD15_SHAPES[3], SD15_SHAPES[4], SD15_SHAPES[2],
    LayerShape("sd15 text k/v 2x77 768->320", 154, 768, 320),
    LayerShape("sd15 text k/v 2x77 768->1280", 154, 768, 1280),
    SDXL_SHAPES[1],
    LayerShape("sdxl text k/v 2x77 2048->640", 154, 2048, 640),
)
REHEARSAL_SHAPES = (LayerShape("tiny 40->24", 12, 40, 24),)


def _sync(ctx):
    if ctx.device.type == "cuda":
        torch.cuda.synchronize()


def _free(ctx):
    gc.collect()
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------------------
WINDOWS = 5  # timed windows per timer: the median is reported, with min and max
TIMERS = ("graph", "events", "wall")  # "wall": CPU only (the rehearsal)


def _stats(per_call_us: list, calls_per_window: int) -> dict:
    ordered = sorted(per_call_us)
    return dict(median_us=round(statistics.median(ordered), 3), min_us=round(ordered[0], 3),
                max_us=round(ordered[-1], 3), windows=len(ordered), calls_per_window=calls_per_window)


def time_call(ctx, fn, num_inputs: int = 1, *, graphable: bool, calls: int | None = None) -> dict:
    """Time per call of fn(i) (i: the input set, rotated 0..num_inputs-1 so that sets which fit in L2 are not
    timed from a warm cache), as {timer: stats} for every timer that applies, plus the host time.

    - The first call of every input set runs before anything is timed: Triton compiles and autotunes there.
    - "events": CUDA events around each of WINDOWS windows of `calls` eager calls (GPU time incl. launch gaps).
    - "graph": the same `calls` calls captured in one CUDA graph, one replay per window (GPU time without host
      launch cost); only where the call can be captured (graphable), else "graph_error" says why not.
    - "wall" (CPU, no CUDA): perf_counter around each window.
    - host_us_one_call_after_sync: wall time of one call issued right after a device sync (what the host spends
      launching it; the median of WINDOWS such calls, min and max kept).
    stats: median_us, min_us, max_us (per call, over the windows), windows, calls_per_window.
    """
    calls = calls or max(num_inputs, 1 if ctx.rehearsal else 10)
    calls = -(-calls // num_inputs) * num_inputs  # whole rotations
    for i in range(num_inputs):
        fn(i)
    _sync(ctx)
    host = []
    for window in range(WINDOWS):
        _sync(ctx)
        start = time.perf_counter()
        fn(window % num_inputs)
        host.append((time.perf_counter() - start) * 1e6)
    _sync(ctx)
    result = dict(host_us_one_call_after_sync=_stats(host, 1), input_sets=num_inputs)
    if ctx.device.type != "cuda":
        walls = []
        for _ in range(WINDOWS):
            start = time.perf_counter()
            for c in range(calls):
                fn(c % num_inputs)
            walls.append((time.perf_counter() - start) * 1e6 / calls)
        result["wall"] = _stats(walls, calls)
        return result
    result["events"] = _stats(_event_windows(lambda: [fn(c % num_inputs) for c in range(calls)], calls), calls)
    if graphable:
        try:
            result["graph"] = _stats(_graph_windows(fn, num_inputs, calls), calls)
        except Exception as error:  # noqa: BLE001 (recorded; the events timing stands)
            torch.cuda.synchronize()
            result["graph_error"] = f"{type(error).__name__}: {error}"[:300]
    return result


def _event_windows(run_window, calls: int) -> list:
    per_call = []
    for _ in range(WINDOWS):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        begin.record()
        run_window()
        end.record()
        end.synchronize()
        per_call.append(begin.elapsed_time(end) * 1e3 / calls)
    return per_call


def _graph_windows(fn, num_inputs: int, calls: int) -> list:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(num_inputs):
            fn(i)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in range(calls):
            fn(c % num_inputs)
    graph.replay()  # the first replay uploads the graph
    return _event_windows(graph.replay, calls)


MAX_INPUT_SETS = 32


def input_sets_for(ctx, set_bytes: int) -> int:
    """How many input sets to rotate: 1 where one set overflows L2, else enough sets to overflow it twice (at least
    3, at most MAX_INPUT_SETS: the smallest text-row layers stay partly L2-resident, which their records show as
    rotated_bytes < 2 x l2_bytes). The rehearsal rotates 3 (the code path, not the cache)."""
    if ctx.device.type != "cuda":
        return 3
    l2_bytes = l2_cache_bytes(ctx)
    if set_bytes > l2_bytes:
        return 1
    return min(MAX_INPUT_SETS, max(3, -(-2 * l2_bytes // max(set_bytes, 1))))


def l2_cache_bytes(ctx):
    return torch.cuda.get_device_properties(ctx.device).L2_cache_size if ctx.device.type == "cuda" else None


def timer_ratios(times: dict, pairs: dict) -> list:
    """One summary per timer: {name: times[a][timer] / times[b][timer]} (medians) for the pairs (name: (a, b)) whose
    two sides both have that timer. times: variant -> time_call result. Never mixes timers in one ratio."""
    summaries = []
    for timer in TIMERS:
        ratios = {}
        for name, (a, b) in pairs.items():
            if timer in times.get(a, {}) and timer in times.get(b, {}):
                ratios[name] = round(times[a][timer]["median_us"] / times[b][timer]["median_us"], 4)
        if ratios:
            summaries.append(dict(timer=timer, **ratios))
    return summaries


# ----------------------------------------------------------------------------------------------------------------
# Stage: env
# ----------------------------------------------------------------------------------------------------------------
def stage_env(ctx):
    info = {}
    if ctx.device.type == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(capability=f"{props.major}.{props.minor}", sm_count=props.multi_processor_count,
                    memory_gb=round(props.total_memory / 2**30, 1), l2_bytes=props.L2_cache_size)
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
            info["nvidia_smi"] = smi.stdout.strip()
        except (OSError, subprocess.SubprocessError) as error:
            info["nvidia_smi"] = repr(error)
    try:
        info["nvcc"] = subprocess.run(["nvcc", "--version"], capture_output=True, text=True,
                                      timeout=20).stdout.strip().splitlines()[-1:]
    except (OSError, subprocess.SubprocessError):
        info["nvcc"] = None
    from gpu_suite import find_cuda_home

    info["cuda_home"] = find_cuda_home(dict(os.environ))  # what the build uses where CUDA_HOME is unset
    info.update(_package_versions())
    ctx.record("env", **info)


# torch is pinned in the Makefile (installed only where none is), the rest in requirements.txt.
TORCH_PIN = "2.13.0"
CHECKED_PACKAGES = ("torch", "triton", "diffusers", "peft", "transformers", "accelerate", "safetensors",
                    "huggingface-hub", "tokenizers")


def _pins() -> dict:
    pins = {"torch": TORCH_PIN}
    for line in (REPO / "requirements.txt").read_text().splitlines():
        match = re.match(r"^\s*([A-Za-z0-9_.-]+)\s*==\s*([^\s#;]+)", line)
        if match:
            pins[match.group(1).lower()] = match.group(2)
    return pins


def _package_versions() -> dict:
    """Installed versions of the packages we pin, and where they differ from the pins (version_skew: the device
    image's torch/Triton/transformers are its own; the carried wheels bring diffusers and peft)."""
    from importlib import metadata

    pins, versions, skew = _pins(), {}, {}
    for package in CHECKED_PACKAGES + ("ninja", "pytest", "hypothesis"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
        pinned = pins.get(package)
        installed = versions[package]
        if pinned is not None and (installed is None or installed.split("+")[0] != pinned):
            skew[package] = dict(pinned=pinned, installed=installed)
    return dict(versions=versions, version_skew=skew)


# ----------------------------------------------------------------------------------------------------------------
# Stage: kernel correctness
# ----------------------------------------------------------------------------------------------------------------
def _triton_backend(ctx) -> str:
    # On the GPU the automatic choice is the one under test; in the rehearsal the interpreter must be asked for.
    return "triton" if ctx.rehearsal else "auto"


def _grouped_layout(tokens: int) -> dict:
    """What the patch emits for contrastive guidance: [b(u), b(c) | p(u), p(c) | n(u), n(c)], one segment per mix."""
    return dict(seg_indptr=[0, 2 * tokens, 4 * tokens, 6 * tokens], seg_adapter=[-1, 0, 1],
                seg_scale=[1.0, 1.0, 1.0])


def _stress_layout(tokens: int) -> dict:
    """Seven segments whose boundaries do not all align with tiles: an empty segment, a segment straddling two
    branches' rows, an adapter used with different scales, a negative scale."""
    t = tokens
    return dict(
        seg_indptr=[0, t, t, 2 * t + 5, 3 * t, 4 * t - 3, 5 * t, 6 * t],
        seg_adapter=[-1, 0, 1, 1, -1, 0, 1],
        seg_scale=[1.0, 0.8, -1.25, 0.5, 1.0, 1.5, 0.75],
    )


LAYOUT_FUNCTIONS = {"grouped": _grouped_layout, "stress": _stress_layout}


def _operands(shape: LayerShape, rank: int, dtype, device, *, seed=0, num_adapters=2):
    gen = torch.Generator().manual_seed(seed)
    k, n, m = shape.in_features, shape.out_features, 6 * shape.tokens

    def rand(*size, scale=1.0):
        return (torch.randn(*size, generator=gen) * scale).to(device=device, dtype=dtype)

    # Adapters of smaller true rank zero-padded to R, as for pos/neg adapters concatenated for NPO.
    lora_a = rand(num_adapters, rank, k, scale=k**-0.5)
    lora_b = rand(num_adapters, n, rank, scale=rank**-0.5)
    lora_a[-1, rank // 2 + 1:] = 0
    lora_b[-1, :, rank // 2 + 1:] = 0
    return [rand(m, k), rand(n, k, scale=k**-0.5), rand(n), lora_a, lora_b]


def _relative_error(actual, expected) -> float:
    scale = expected.abs().max().item()
    return (actual.double() - expected).abs().max().item() / scale if scale > 0 else float("inf")


def _forced(config):
    mll = importlib.import_module("cgkernels.ops.multi_lora_linear")
    return mll.force_kernel_config(config) if config is not None else contextlib.nullcontext()


def _check_forward(ctx, shape, rank, dtype, *, config, layout="grouped"):
    from cgkernels.ops import multi_lora_linear, multi_lora_linear_reference

    tensors = _operands(shape, rank, dtype, ctx.device, seed=rank)
    segments = LAYOUT_FUNCTIONS[layout](shape.tokens)
    with _forced(config):
        y = multi_lora_linear(*tensors, **segments, backend=_triton_backend(ctx))
    expected = multi_lora_linear_reference(*[t.double() for t in tensors], **segments)
    error = _relative_error(y, expected)
    ctx.check(error <= TOLERANCE[dtype], "forward", shape=shape.name, rows=6 * shape.tokens, rank=rank,
              dtype=str(dtype), layout=layout, rel_error=error, tolerance=TOLERANCE[dtype], config=repr(config))


def _check_gradients(ctx, shape, rank, dtype, *, config, layout):
    from cgkernels.ops import multi_lora_linear, multi_lora_linear_reference

    tensors = _operands(shape, rank, dtype, ctx.device, seed=11)
    segments = LAYOUT_FUNCTIONS[layout](shape.tokens)
    trainable = [True, False, False, True, True]  # x, lora_a, lora_b; the base layer is frozen
    leaves = [t.clone().requires_grad_(flag) for t, flag in zip(tensors, trainable)]
    grad_y = torch.randn(6 * shape.tokens, shape.out_features, generator=torch.Generator().manual_seed(3))
    with _forced(config):
        multi_lora_linear(*leaves, **segments, backend=_triton_backend(ctx)).backward(grad_y.to(ctx.device, dtype))
    reference = [t.detach().double().requires_grad_(flag) for t, flag in zip(tensors, trainable)]
    multi_lora_linear_reference(*reference, **segments).backward(grad_y.to(ctx.device, torch.float64))
    for name, leaf, ref in zip(["x", "weight", "bias", "lora_a", "lora_b"], leaves, reference):
        if ref.requires_grad:
            error = _relative_error(leaf.grad, ref.grad)
            ctx.check(error <= GRADIENT_TOLERANCE[dtype], "gradient", shape=shape.name, rank=rank, dtype=str(dtype),
                      layout=layout, tensor=name, rel_error=error, tolerance=GRADIENT_TOLERANCE[dtype],
                      config=repr(config))


def _check_fp32_routing(ctx, shape):
    """fp32 on CUDA takes cuBLAS + the torch LoRA path (the automatic choice), still exact to fp32."""
    from cgkernels.ops import multi_lora_linear, multi_lora_linear_reference
    mll = importlib.import_module("cgkernels.ops.multi_lora_linear")

    tensors = _operands(shape, 8, torch.float32, ctx.device, seed=2)
    segments = _grouped_layout(shape.tokens)
    backend = mll._resolve_backend("auto", tensors[0])
    error = _relative_error(multi_lora_linear(*tensors, **segments), multi_lora_linear_reference(
        *[t.double() for t in tensors], **segments))
    ctx.check(backend == "torch" and error <= TOLERANCE[torch.float32], "fp32-routing", shape=shape.name,
              backend=backend, rel_error=error)


def stage_kernel_correctness(ctx):
    """Every launch runs a forced config (force_kernel_config), never the autotuner: each distinct config x dtype x
    rank class compiles once, so the compile count is bounded by the table, not by the number of layer keys."""
    shapes = REHEARSAL_SHAPES if ctx.rehearsal else CORRECTNESS_SHAPES
    mll = importlib.import_module("cgkernels.ops.multi_lora_linear")
    configs = mll.KERNEL_CONFIGS["half"]
    # 1. Gradients (training uses them) and the fp32 route first: the checks most likely to find a device-only bug.
    gradient_shape = shapes[0] if ctx.rehearsal else LayerShape("sd15 attn 32^2 320->320", 1024, 320, 320)
    for layout in ("grouped", "stress"):
        for rank in (8,) if ctx.rehearsal else (8, 64):
            ctx.guarded("gradient", lambda: _check_gradients(ctx, gradient_shape, rank, torch.float16,
                                                             config=configs[0], layout=layout),
                        rank=rank, layout=layout)
    if ctx.device.type == "cuda":
        ctx.guarded("fp32-routing", lambda: _check_fp32_routing(ctx, shapes[0]))
    # 2. Every config of the table once (the autotuner may pick any of them on some shape), on the stress layout.
    for rank in (128,) if ctx.rehearsal else (128, 8):
        for config in configs:
            ctx.guarded("forward", lambda: _check_forward(ctx, shapes[0], rank, torch.float16, config=config,
                                                          layout="stress"),
                        shape=shapes[0].name, rank=rank, config=repr(config))
    # 3. The model shapes in the grouped layout, configs in rotation (shape i, rank j: config i + j).
    for i, shape in enumerate(shapes):
        for dtype in (torch.float16, torch.bfloat16):
            for j, rank in enumerate((8, 64, 128)):
                config = configs[(i + j) % len(configs)]
                ctx.guarded("forward", lambda: _check_forward(ctx, shape, rank, dtype, config=config),
                            shape=shape.name, rank=rank, dtype=str(dtype))


# ----------------------------------------------------------------------------------------------------------------
# Stage: kernel microbenchmark
# ----------------------------------------------------------------------------------------------------------------
BENCH_VARIANTS = ("cublas base-only", "cgkernels", "torch lora path", "peft mixed batch")
STRESS_BENCH_VARIANTS = ("cublas base-only", "cgkernels", "peft mixed batch")  # the interleaved layout
BENCH_RATIOS = {
    "cgkernels_vs_cublas": ("cgkernels", "cublas base-only"),
    "cgkernels_vs_peft": ("cgkernels", "peft mixed batch"),
    "cgkernels_vs_torch_path": ("cgkernels", "torch lora path"),
    "torch_path_vs_cublas": ("torch lora path", "cublas base-only"),
}


def _bench_layer(ctx, shape, rank, layout):
    from test_bench_multi_lora_linear import LoraProblem

    from cgkernels.ops import multi_lora_linear
    mll = importlib.import_module("cgkernels.ops.multi_lora_linear")

    dtype = torch.float32 if ctx.rehearsal else torch.float16
    element = torch.tensor([], dtype=dtype).element_size()
    rows = 6 * shape.tokens
    # One input set: x, y, W, bias, pos/neg A and B.
    set_bytes = element * (rows * (shape.in_features + shape.out_features) + shape.in_features * shape.out_features
                           + shape.out_features + 2 * rank * (shape.in_features + shape.out_features))
    num_sets = input_sets_for(ctx, set_bytes)
    problems = [LoraProblem(shape.tokens, shape.in_features, shape.out_features, rank, ctx.device, dtype,
                            layout=layout, seed=seed) for seed in range(num_sets)]

    def fused(backend):
        def call(i):
            p = problems[i]
            return multi_lora_linear(p.x.view(-1, shape.in_features), p.base.weight, p.base.bias, p.lora_a,
                                     p.lora_b, p.seg_indptr, p.seg_adapter, [1.0] * len(p.seg_adapter),
                                     backend=backend)
        return call

    calls = {
        "cublas base-only": (lambda i: F.linear(problems[i].x, problems[i].base.weight, problems[i].base.bias), True),
        "cgkernels": (fused(_triton_backend(ctx)), True),
        "torch lora path": (fused("torch"), True),
        # peft builds index tensors from Python lists on every call: not capturable, events only.
        "peft mixed batch": (lambda i: problems[i].forward("peft mixed batch"), False),
    }
    before = set(mll._best_config_cache)
    times = {}
    common = dict(shape=shape.name, rows=rows, in_features=shape.in_features, out_features=shape.out_features,
                  rank=rank, dtype=str(dtype), layout=layout)
    with torch.no_grad():
        for variant in BENCH_VARIANTS if layout == "grouped" else STRESS_BENCH_VARIANTS:
            fn, graphable = calls[variant]
            timing = ctx.guarded("bench", lambda: time_call(ctx, fn, num_sets, graphable=graphable), variant=variant,
                                 **common)
            if timing is not None:
                times[variant] = timing
                ctx.record("bench", variant=variant, input_set_bytes=set_bytes, rotated_bytes=num_sets * set_bytes,
                           l2_bytes=l2_cache_bytes(ctx), **common, **timing)
    tuned = [repr(mll._best_config_cache[key]) for key in set(mll._best_config_cache) - before]
    for summary in timer_ratios(times, BENCH_RATIOS):
        ctx.record("bench-summary", **common, autotuned=tuned, **summary)
    del problems
    _free(ctx)


def stage_kernel_bench(ctx):
    """The grouped layout (what the patch emits) at every shape and rank first, then the interleaved stress layout
    at rank 8."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    shapes = REHEARSAL_SHAPES if ctx.rehearsal else SD15_SHAPES + SDXL_SHAPES
    for layout, ranks in (("grouped", (8,) if ctx.rehearsal else (8, 64)), ("interleaved", (8,))):
        for rank in ranks:
            for shape in shapes:
                ctx.guarded("bench", lambda: _bench_layer(ctx, shape, rank, layout), shape=shape.name, rank=rank,
                            layout=layout)


# ----------------------------------------------------------------------------------------------------------------
# Stage: merge op and patched pipelines on the device
# ----------------------------------------------------------------------------------------------------------------
def _check_merge(ctx, dtype, num_preds, rescale):
    from cgkernels.ops import guidance_merge, guidance_merge_reference
    from cgkernels.ops.guidance_merge import merge_implementation

    shape = (2, 4, 8, 8) if ctx.rehearsal else (2, 4, 128, 128)
    gen = torch.Generator().manual_seed(num_preds)
    preds = torch.randn(num_preds, *shape, generator=gen).to(ctx.device, dtype)
    coeffs = [float(c) for c in torch.linspace(-2.0, 6.0, num_preds)]
    ref_coeffs = [0.0] * (num_preds - 1) + [1.0]
    out = guidance_merge(preds, coeffs, rescale=rescale, ref_coeffs=ref_coeffs)
    expected = guidance_merge_reference(preds.double(), coeffs, rescale=rescale, ref_coeffs=ref_coeffs)
    magnitude = sum(abs(c) for c in coeffs) * preds.double().abs().max().item()
    error = (out.double() - expected).abs().max().item() / magnitude
    tolerance = TOLERANCE[dtype]
    ctx.check(error <= tolerance, "merge", dtype=str(dtype), num_preds=num_preds, rescale=rescale,
              merge=merge_implementation(ctx.device), error_over_magnitude=error, tolerance=tolerance)


def _check_pipeline(ctx, kind, dtype):
    sys.path.insert(0, str(REPO / "tests"))
    from test_patch import Reference, _run

    import cgkernels
    from cgkernels.testing import add_random_lora, tiny_sd_pipeline

    pipe = tiny_sd_pipeline(kind, dtype=dtype, seed=3)
    add_random_lora(pipe, "pos", rank=4, seed=1, lora_alpha=6)
    add_random_lora(pipe, "neg", rank=3, seed=2, lora_alpha=2,
                    target_modules=("to_k", "to_v", "proj_in", "ff.net.2", "conv1"))
    pipe.unet.set_adapters(["pos", "neg"])
    pipe.to(ctx.device)
    steps = 1 if ctx.rehearsal else 2
    reference = Reference(pipe, "contrastive", strength=1.5)
    with reference:
        expected = _run(pipe, callback_on_step_end=reference.callback, num_inference_steps=steps).float()
    base = _run(pipe, num_inference_steps=steps).float()
    cgkernels.patch(pipe, guidance="contrastive", strength=1.5)
    try:
        out = _run(pipe, num_inference_steps=steps)
    finally:
        cgkernels.unpatch(pipe)
    effect = (expected - base).abs().max().item()
    error = (out.float() - expected).abs().max().item()
    # fp32 on CUDA: cuDNN convolutions may use TF32, so the batched and the per-branch passes round differently.
    tolerance = 0.05 if dtype != torch.float32 else (1e-2 if ctx.device.type == "cuda" else 1e-3)
    from cgkernels.ops.guidance_merge import merge_implementation

    ctx.check(error <= tolerance * effect, "pipeline", model=kind, dtype=str(dtype), device=str(out.device),
              merge=merge_implementation(out.device), error=error, adapter_effect=effect,
              tolerance_of_effect=tolerance)


def stage_extension_correctness(ctx):
    """Without the extension (a failed build) the same checks run on guidance_merge's reference fallback, which the
    patched pipelines then use: the records' merge field says which ran."""
    from cgkernels.ops.guidance_merge import EXTENSION_ERROR, merge_implementation

    ctx.record("extension", loaded=EXTENSION_ERROR is None, merge=merge_implementation(ctx.device),
               error=None if EXTENSION_ERROR is None else str(EXTENSION_ERROR))
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for num_preds in (2, 6):
            for rescale in (0.0, 0.7):
                ctx.guarded("merge", lambda: _check_merge(ctx, dtype, num_preds, rescale), dtype=str(dtype),
                            num_preds=num_preds, rescale=rescale)
    dtypes = (torch.float32,) if ctx.rehearsal else (torch.float32, torch.float16)
    for kind in ("sd15", "sdxl"):
        for dtype in dtypes:
            ctx.guarded("pipeline", lambda: _check_pipeline(ctx, kind, dtype), model=kind, dtype=str(dtype))


# ----------------------------------------------------------------------------------------------------------------
# Stages: UNet step (eager, compiled), end-to-end sampling, training step
# ----------------------------------------------------------------------------------------------------------------
def _unet_bench_module():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import test_bench_unet

    return test_bench_unet


def _unet_setup(ctx, kind):
    """test_bench_unet's setup (full SD1.5/SDXL UNet in fp16 on CUDA, reduced in fp32 on CPU, rank-8 pos/neg), with
    the random UNet initialised on the device (a CPU init of SDXL's 2.6B parameters takes tens of seconds)."""
    from diffusers import UNet2DConditionModel

    from cgkernels.testing import add_random_lora, tiny_sd_pipeline

    ub = _unet_bench_module()
    pipe = tiny_sd_pipeline(kind)
    if ctx.rehearsal:  # the test suite's tiny UNet: the rehearsal checks the code path, not the numbers
        dtype = torch.float32
        unet = pipe.unet.eval()
    else:
        dtype = torch.float16
        torch.manual_seed(0)
        with torch.device(ctx.device):
            unet = UNet2DConditionModel(**ub._unet_config(kind))
        unet = unet.to(dtype).eval()
        pipe.register_modules(unet=unet)
    pipe.to(ctx.device)
    add_random_lora(pipe, "pos", rank=8, seed=1)
    add_random_lora(pipe, "neg", rank=8, seed=2)
    pipe.unet.set_adapters(["pos", "neg"])
    cfg = unet.config
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(2, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=gen).to(ctx.device, dtype)
    text = torch.randn(2, 77, cfg.cross_attention_dim, generator=gen).to(ctx.device, dtype)
    added = None
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        side = cfg.sample_size * 8
        added = {"text_embeds": torch.randn(2, pooled, generator=gen).to(ctx.device, dtype),
                 "time_ids": torch.tensor([[side, side, 0.0, 0.0, side, side]] * 2).to(ctx.device, dtype)}
    return pipe, sample, text, added


UNET_VARIANTS = ("base-only", "naive", "peft-mixed", "cgkernels")


UNET_RATIOS = {
    "cgkernels_vs_base-only": ("cgkernels", "base-only"),
    "cgkernels_vs_naive": ("cgkernels", "naive"),
    "cgkernels_vs_peft-mixed": ("cgkernels", "peft-mixed"),
}


@contextlib.contextmanager
def _variant_run(run_and_cleanup, restore):
    """A benchmark variant's `run` under inference mode; afterwards, whatever happened, the variant's own cleanup
    (if it has one) and `restore`, which puts the shared pipeline back for the next variant."""
    run, cleanup = run_and_cleanup
    try:
        with torch.inference_mode():
            yield run
    finally:
        if cleanup is not None:
            cleanup()
        restore()


def _time_variant(ctx, stage: str, run, *, calls: int, **labels) -> dict | None:
    """Event timing of `run()` (not capturable: the variants switch adapters on the host), `calls` calls per
    repeat (one in the rehearsal); None, with the error recorded under `stage` and `labels`, where it fails."""
    return ctx.guarded(stage, lambda: time_call(ctx, lambda _: run(), graphable=False,
                                                calls=1 if ctx.rehearsal else calls), **labels)


def _unet_step(ctx, kind):
    """Every variant timed with events (the naive and peft variants switch adapters on the host between calls: not
    capturable), so every ratio compares event times with event times."""
    from cgkernels.ops.guidance_merge import merge_implementation

    ub = _unet_bench_module()
    pipe, sample, text, added = _unet_setup(ctx, kind)
    merge = merge_implementation(ctx.device)
    times = {}
    for variant in UNET_VARIANTS:
        with _variant_run(ub._variant_fn(variant, "contrastive", pipe, sample, text, added),
                          restore=lambda: (pipe.unet.enable_lora(), pipe.unet.set_adapters(["pos", "neg"]))) as run:
            timing = _time_variant(ctx, "unet-step", run, calls=2, model=kind, variant=variant)
        if timing is not None:
            times[variant] = timing
            fields = dict(merge=merge) if variant == "cgkernels" else {}
            ctx.record("unet-step", model=kind, mode="contrastive", rows=6, variant=variant, **fields, **timing)
    for summary in timer_ratios(times, UNET_RATIOS):
        ctx.record("unet-step-summary", model=kind, merge=merge, **summary)
    del pipe
    _free(ctx)


def stage_unet_step(ctx):
    for kind in ("sd15", "sdxl"):
        ctx.guarded("unet-step", lambda: _unet_step(ctx, kind), model=kind)


def _unet_compiled(ctx, kind):
    import cgkernels

    pipe, sample, text, added = _unet_setup(ctx, kind)
    unet = pipe.unet
    pipe._guidance_scale, pipe._guidance_rescale = 7.5, 0.0
    cgkernels.patch(pipe, guidance="contrastive", strength=1.0)
    t = torch.tensor(500, device=ctx.device)
    try:
        # The rehearsal checks that the graph traces (fullgraph); inductor's CPU compile would take minutes.
        compiled = torch.compile(unet, fullgraph=True, backend="eager" if ctx.rehearsal else "inductor")

        def run():
            return compiled(sample, t, text, added_cond_kwargs=added, return_dict=False)[0]

        with torch.inference_mode():
            start = time.perf_counter()
            try:
                run()
                _sync(ctx)
            except Exception as error:  # noqa: BLE001 (an expected outcome until the compile work has landed)
                ctx.record("unet-compiled", model=kind, compiled=False, error=f"{type(error).__name__}: {error}"[:2000])
                return
            compile_s = time.perf_counter() - start
            timing = time_call(ctx, lambda i: run(), graphable=False, calls=1 if ctx.rehearsal else 2)
        ctx.record("unet-compiled", model=kind, compiled=True, compile_s=round(compile_s, 1), **timing)
    finally:
        cgkernels.unpatch(pipe)
        del pipe
        torch._dynamo.reset()
        _free(ctx)


def stage_unet_compiled(ctx):
    ctx.guarded("unet-compiled", lambda: _unet_compiled(ctx, "sd15"), model="sd15")


def _end_to_end(ctx):
    import cgkernels

    ub = _unet_bench_module()
    pipe, _, text, _ = _unet_setup(ctx, "sd15")
    steps = 1 if ctx.rehearsal else 30
    call = dict(prompt_embeds=text[1:], negative_prompt_embeds=text[:1], num_inference_steps=steps,
                guidance_scale=7.5, output_type="latent")
    variants = {
        "base-cfg": (lambda: pipe.unet.disable_lora(), lambda: pipe.unet.enable_lora(), contextlib.nullcontext),
        "naive-contrastive": (lambda: None, lambda: None, lambda: ub._naive_contrastive_unet(pipe)),
        "cgkernels-contrastive": (lambda: cgkernels.patch(pipe, guidance="contrastive", strength=1.0),
                                  lambda: cgkernels.unpatch(pipe), contextlib.nullcontext),
    }
    for variant, (enter, leave, context) in variants.items():
        enter()
        try:
            with context():
                pipe(**call)  # warm-up
                _sync(ctx)
                start = time.perf_counter()
                pipe(**call)
                _sync(ctx)
                seconds = time.perf_counter() - start
        finally:
            leave()
        ctx.record("end-to-end", model="sd15", steps=steps, variant=variant, seconds=round(seconds, 4),
                   timer="wall, one call after a warm-up, synchronized")
    del pipe
    _free(ctx)


def _train_step(ctx):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import test_bench_train as tb
    from bench_steps import make_train_step

    unet, params, inputs, optimizer = tb._setup()
    for batching in ("separate", "joint"):
        step, detach = make_train_step(unet, params, inputs, optimizer, objective="sft", batching=batching)
        try:
            step()
            _sync(ctx)
            start = time.perf_counter()
            rounds = 1 if ctx.rehearsal else 3
            for _ in range(rounds):
                step()
            _sync(ctx)
            seconds = (time.perf_counter() - start) / rounds
        finally:
            detach()
        ctx.record("train-step", objective="sft", batching=batching, seconds=round(seconds, 4),
                   timer=f"wall, mean of {rounds} synchronized steps after a warm-up")


def stage_extras(ctx):
    ctx.guarded("end-to-end", lambda: _end_to_end(ctx))
    ctx.guarded("train-step", lambda: _train_step(ctx))


# ----------------------------------------------------------------------------------------------------------------
# Stage: merge bandwidth
# ----------------------------------------------------------------------------------------------------------------
def _merge_bandwidth(ctx, num_preds, rescale):
    """guidance_merge and a device-to-device copy moving the same bytes, each with every timer that applies; one
    record per timer (fraction_of_copy compares the two with that timer)."""
    from cgkernels.ops import guidance_merge
    from cgkernels.ops.guidance_merge import merge_implementation

    # One prediction of 64 MiB in fp16 (the output); the K inputs are K times that: far beyond L2, one input set.
    elements = (1 << 14) if ctx.rehearsal else (64 << 20) // 2
    batch = 2
    preds = torch.randn(num_preds, batch, elements // batch, device=ctx.device, dtype=torch.float16)
    coeffs = [1.0 / num_preds] * num_preds
    ref_coeffs = [0.0] * (num_preds - 1) + [1.0]
    moved = (num_preds + 1) * elements * 2
    merge_impl = merge_implementation(ctx.device)
    merge = ctx.guarded("merge-bandwidth", lambda: time_call(
        ctx, lambda i: guidance_merge(preds, coeffs, rescale=rescale, ref_coeffs=ref_coeffs), graphable=True),
        num_preds=num_preds, rescale=rescale, merge=merge_impl)
    source = torch.empty(moved // 4, device=ctx.device, dtype=torch.float16)  # copy: moved/2 read, moved/2 written
    target = torch.empty_like(source)
    copy = time_call(ctx, lambda i: target.copy_(source), graphable=True)
    if merge is None:
        return
    for timer in TIMERS:
        if timer in merge and timer in copy:
            merge_gbps = moved / (merge[timer]["median_us"] * 1e-6) / 1e9
            copy_gbps = moved / (copy[timer]["median_us"] * 1e-6) / 1e9
            ctx.record("merge-bandwidth", num_preds=num_preds, rescale=rescale, merge=merge_impl, timer=timer,
                       bytes=moved, merge_time=merge[timer], copy_time=copy[timer],
                       merge_host_us_one_call_after_sync=merge["host_us_one_call_after_sync"],
                       merge_gb_per_s=round(merge_gbps, 1), copy_gb_per_s=round(copy_gbps, 1),
                       fraction_of_copy=round(merge_gbps / copy_gbps, 4))
    del preds, source, target
    _free(ctx)


def stage_merge_bandwidth(ctx):
    """Runs whichever merge guidance_merge runs (the records' merge field): without the extension that is the
    reference fallback, whose bandwidth is then the one the patched pipelines get."""
    for num_preds in (2, 4, 6):
        for rescale in (0.0, 0.7):
            _merge_bandwidth(ctx, num_preds, rescale)


# ----------------------------------------------------------------------------------------------------------------
# Stage: the op test files' CUDA cases
# ----------------------------------------------------------------------------------------------------------------
PYTEST_MARGIN_S = 15  # what the stage keeps after pytest's own timeout, to kill it and record the summary


def stage_cuda_tests(ctx):
    """pytest in its own process session with its own timeout (the stage's deadline minus a margin); its output is
    streamed into OUT/cuda-tests.log, so a timeout keeps the lines of every test that finished."""
    from gpu_suite import CUDA_TESTS_LOG, stop_session, start_session

    files = ["tests/test_multi_lora_linear.py"] + ([] if ctx.rehearsal else ["tests/test_guidance_merge.py"])
    if importlib.util.find_spec("hypothesis") is None:  # both files import it; the device image lacks it
        ctx.check(False, "pytest", files=files, summary="not run: hypothesis is not installed (carry it: "
                  "../shared/gpu/wheels.sh hypothesis sortedcontainers attrs)", failed=[], timed_out=False)
        return
    # The rehearsal checks the invocation and the summary parsing with one quick test.
    selection = ["-k", "test_tile_schedule_covers_rows_once_and_is_cached"] if ctx.rehearsal else []
    timeout = max(1.0, ctx.seconds_left() - PYTEST_MARGIN_S)
    log_path = ctx.out / CUDA_TESTS_LOG
    with open(log_path, "w", encoding="utf-8") as log:
        process = start_session([sys.executable, "-m", "pytest", *files, *selection, "-q", "-p", "no:cacheprovider",
                                 "-rfE"], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        # pytest has a session of its own: if the driver stops this stage, take pytest down too.
        signal.signal(signal.SIGTERM, lambda signum, frame: (os.killpg(process.pid, signal.SIGKILL), sys.exit(143)))
        try:
            returncode, timed_out = process.wait(timeout=timeout), False
        except subprocess.TimeoutExpired:
            returncode, timed_out = stop_session(process), True
    lines = log_path.read_text(errors="replace").strip().splitlines()
    summary = lines[-1] if lines else ""
    failed = [line for line in lines if line.startswith(("FAILED", "ERROR"))]
    progress = "".join(line for line in lines if re.fullmatch(r"[.FEsxX]+(\s+\[\s*\d+%\])?", line.strip()))
    ctx.check(returncode == 0 and not timed_out, "pytest", files=files, summary=summary, failed=failed[:50],
              timed_out=timed_out, timeout_s=round(timeout), log=CUDA_TESTS_LOG,
              passed_before_stop=progress.count("."), failed_before_stop=progress.count("F"))


def stage_adapter_mix(ctx):
    """A different LoRA per prompt (benchmarks/test_bench_adapter_mix.py): 8 prompts with 1, 3 and 8 distinct LoRAs
    in one CFG step; cgkernels (one call, adapters_per_prompt) against peft's mixed batch, one call per adapter,
    one call per prompt and base-only; the variants' agreement is checked first."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import test_bench_adapter_mix as mix

    pipe, sample, text, t = mix.setup(str(ctx.device), tiny=ctx.rehearsal)
    ratios = {f"cgkernels_vs_{other}": ("cgkernels", other) for other in mix.VARIANTS[1:]}
    for distinct in mix.DISTINCT:
        outputs, times = {}, {}
        for variant in mix.VARIANTS:
            with _variant_run(mix.variant_fn(variant, distinct, pipe, sample, text, t),
                              restore=lambda: mix.restore(pipe)) as run:
                outputs[variant] = run().float()
                timing = _time_variant(ctx, "adapter-mix", run, calls=10, distinct=distinct, variant=variant)
            if timing is not None:
                times[variant] = timing
                ctx.record("adapter-mix", prompts=mix.PROMPTS, distinct=distinct, variant=variant, **timing)
        reference = outputs["sequential"]
        error = (outputs["cgkernels"] - reference).abs().max().item() / max(reference.abs().max().item(), 1e-12)
        ctx.check(error < (5e-3 if sample.dtype == torch.float16 else 1e-4), "adapter-mix-agreement",
                  distinct=distinct, relative_error=error)
        for summary in timer_ratios(times, ratios):
            ctx.record("adapter-mix-summary", distinct=distinct, **summary)
    del pipe
    _free(ctx)


STAGE_FUNCTIONS = {
    "env": stage_env,
    "kernel-bench": stage_kernel_bench,
    "merge-bandwidth": stage_merge_bandwidth,
    "kernel-correctness": stage_kernel_correctness,
    "extension-correctness": stage_extension_correctness,
    "unet-step": stage_unet_step,
    "extras": stage_extras,
    "unet-compiled": stage_unet_compiled,
    "cuda-tests": stage_cuda_tests,
    "adapter-mix": stage_adapter_mix,
}
