"""Stage bodies of benchmarks/gpu_suite.py (one stage per process; see that file for the order and the output).

Each stage takes a gpu_suite.Context: ctx.rehearsal selects tiny CPU sizes (Triton through the interpreter),
ctx.record appends a result line at once, ctx.check records a pass/fail line, ctx.guarded records an exception and
lets the stage go on with its next item.
"""
from __future__ import annotations

import contextlib
import gc
import importlib
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
BRANCH_ADAPTERS = [-1, 0, 1, -1, 0, 1]  # cPGD rows: [uncond base, +pos, +neg, cond base, +pos, +neg]
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
def time_call(ctx, fn, *, graphable: bool, iters: int | None = None) -> dict:
    """GPU time per call (CUDA graph replay where the call can be captured, else CUDA events around a stream of
    calls) and host time per call (launch cost: the loop's wall time before the device is waited for).

    CPU (rehearsal): wall time per call only.
    """
    iters = iters or (1 if ctx.rehearsal else 20)
    fn()
    _sync(ctx)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    host_us = (time.perf_counter() - start) / iters * 1e6
    if ctx.device.type != "cuda":
        return dict(gpu_us=None, host_us=round(host_us, 2), timer="cpu-wall")
    torch.cuda.synchronize()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    events_us = begin.elapsed_time(end) * 1e3 / iters
    result = dict(gpu_us=round(events_us, 2), events_us=round(events_us, 2), host_us=round(host_us, 2),
                  timer="cuda-events")
    if graphable:
        try:
            graph_us = _graph_time_us(fn, calls_per_graph=10, replays=max(3, iters // 4))
            result.update(gpu_us=round(graph_us, 2), graph_us=round(graph_us, 2), timer="cuda-graph")
        except Exception as error:  # noqa: BLE001 (recorded; the events timing stands)
            torch.cuda.synchronize()
            result["graph_error"] = f"{type(error).__name__}: {error}"[:300]
    return result


def _graph_time_us(fn, calls_per_graph: int, replays: int) -> float:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls_per_graph):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) * 1e3 / (replays * calls_per_graph)


# ----------------------------------------------------------------------------------------------------------------
# Stage: env
# ----------------------------------------------------------------------------------------------------------------
def stage_env(ctx):
    info = {}
    if ctx.device.type == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(capability=f"{props.major}.{props.minor}", sm_count=props.multi_processor_count,
                    memory_gb=round(props.total_memory / 2**30, 1))
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
    from importlib import metadata

    for package in ("diffusers", "peft", "transformers", "accelerate", "ninja", "pytest", "hypothesis"):
        try:
            info[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            info[package] = None
    ctx.record("env", **info)


# ----------------------------------------------------------------------------------------------------------------
# Stage: kernel correctness
# ----------------------------------------------------------------------------------------------------------------
def _triton_backend(ctx) -> str:
    # On the GPU the automatic choice is the one under test; in the rehearsal the interpreter must be asked for.
    return "triton" if ctx.rehearsal else "auto"


def _layout(tokens: int) -> dict:
    """Six branches whose boundaries do not all align with tiles: an empty segment, a segment straddling two
    branches' rows, an adapter used with different scales, a negative scale."""
    t = tokens
    return dict(
        seg_indptr=[0, t, t, 2 * t + 5, 3 * t, 4 * t - 3, 5 * t, 6 * t],
        seg_adapter=[-1, 0, 1, 1, -1, 0, 1],
        seg_scale=[1.0, 0.8, -1.25, 0.5, 1.0, 1.5, 0.75],
    )


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


def _check_forward(ctx, shape, rank, dtype, *, config=None):
    from cgkernels.ops import multi_lora_linear, multi_lora_linear_reference
    mll = importlib.import_module("cgkernels.ops.multi_lora_linear")

    tensors = _operands(shape, rank, dtype, ctx.device, seed=rank)
    layout = _layout(shape.tokens)
    before = set(mll._best_config_cache)
    forced = mll.force_kernel_config(config) if config is not None else contextlib.nullcontext()
    with forced:
        y = multi_lora_linear(*tensors, **layout, backend=_triton_backend(ctx))
    expected = multi_lora_linear_reference(*[t.double() for t in tensors], **layout)
    error = _relative_error(y, expected)
    tuned = [repr(mll._best_config_cache[key]) for key in set(mll._best_config_cache) - before]
    ctx.check(error <= TOLERANCE[dtype], "forward", shape=shape.name, rows=6 * shape.tokens, rank=rank,
              dtype=str(dtype), rel_error=error, tolerance=TOLERANCE[dtype],
              config=repr(config) if config is not None else None, autotuned=tuned)


def _check_gradients(ctx, shape, rank, dtype):
    from cgkernels.ops import multi_lora_linear, multi_lora_linear_reference

    tensors = _operands(shape, rank, dtype, ctx.device, seed=11)
    layout = _layout(shape.tokens)
    trainable = [True, False, False, True, True]  # x, lora_a, lora_b; the base layer is frozen
    leaves = [t.clone().requires_grad_(flag) for t, flag in zip(tensors, trainable)]
    grad_y = torch.randn(6 * shape.tokens, shape.out_features, generator=torch.Generator().manual_seed(3))
    multi_lora_linear(*leaves, **layout, backend=_triton_backend(ctx)).backward(grad_y.to(ctx.device, dtype))
    reference = [t.detach().double().requires_grad_(flag) for t, flag in zip(tensors, trainable)]
    multi_lora_linear_reference(*reference, **layout).backward(grad_y.to(ctx.device, torch.float64))
    for name, leaf, ref in zip(["x", "weight", "bias", "lora_a", "lora_b"], leaves, reference):
        if ref.requires_grad:
            error = _relative_error(leaf.grad, ref.grad)
            ctx.check(error <= GRADIENT_TOLERANCE[dtype], "gradient", shape=shape.name, rank=rank, dtype=str(dtype),
                      tensor=name, rel_error=error, tolerance=GRADIENT_TOLERANCE[dtype])


def _check_fp32_routing(ctx, shape):
    """fp32 on CUDA takes cuBLAS + the torch LoRA path (the automatic choice), still exact to fp32."""
    from cgkernels.ops import multi_lora_linear, multi_lora_linear_reference
    mll = importlib.import_module("cgkernels.ops.multi_lora_linear")

    tensors = _operands(shape, 8, torch.float32, ctx.device, seed=2)
    layout = _layout(shape.tokens)
    backend = mll._resolve_backend("auto", tensors[0])
    error = _relative_error(multi_lora_linear(*tensors, **layout), multi_lora_linear_reference(
        *[t.double() for t in tensors], **layout))
    ctx.check(backend == "torch" and error <= TOLERANCE[torch.float32], "fp32-routing", shape=shape.name,
              backend=backend, rel_error=error)


def stage_kernel_correctness(ctx):
    shapes = REHEARSAL_SHAPES if ctx.rehearsal else CORRECTNESS_SHAPES
    mll = importlib.import_module("cgkernels.ops.multi_lora_linear")
    # Every config of the table once (the autotuner may pick any of them on some shape), largest rank first.
    for rank in (128,) if ctx.rehearsal else (128, 8):
        for config in mll.KERNEL_CONFIGS["half"]:
            ctx.guarded("forward", lambda: _check_forward(ctx, shapes[0], rank, torch.float16, config=config),
                        shape=shapes[0].name, rank=rank, config=repr(config))
    for shape in shapes:
        for dtype in (torch.float16, torch.bfloat16):
            for rank in (8, 64, 128):
                ctx.guarded("forward", lambda: _check_forward(ctx, shape, rank, dtype), shape=shape.name, rank=rank,
                            dtype=str(dtype))
    gradient_shape = shapes[0] if ctx.rehearsal else LayerShape("sd15 attn 32^2 320->320", 1024, 320, 320)
    for rank in (8,) if ctx.rehearsal else (8, 64):
        ctx.guarded("gradient", lambda: _check_gradients(ctx, gradient_shape, rank, torch.float16), rank=rank)
    if ctx.device.type == "cuda":
        ctx.guarded("fp32-routing", lambda: _check_fp32_routing(ctx, shapes[0]))


# ----------------------------------------------------------------------------------------------------------------
# Stage: kernel microbenchmark
# ----------------------------------------------------------------------------------------------------------------
BENCH_VARIANTS = ("cublas base-only", "cgkernels", "torch lora path", "peft mixed batch")


def _bench_layer(ctx, shape, rank):
    from test_bench_multi_lora_linear import LoraProblem

    from cgkernels.ops import multi_lora_linear
    mll = importlib.import_module("cgkernels.ops.multi_lora_linear")

    dtype = torch.float32 if ctx.rehearsal else torch.float16
    problem = LoraProblem(shape.tokens, shape.in_features, shape.out_features, rank, ctx.device, dtype)
    x2 = problem.x.reshape(-1, shape.in_features)
    weight, bias = problem.base.weight, problem.base.bias
    scales = [1.0] * len(BRANCH_ADAPTERS)
    calls = {
        "cublas base-only": (lambda: F.linear(x2, weight, bias), True),
        "cgkernels": (lambda: multi_lora_linear(x2, weight, bias, problem.lora_a, problem.lora_b, problem.seg_indptr,
                                                BRANCH_ADAPTERS, scales, backend=_triton_backend(ctx)), True),
        "torch lora path": (lambda: multi_lora_linear(x2, weight, bias, problem.lora_a, problem.lora_b,
                                                      problem.seg_indptr, BRANCH_ADAPTERS, scales, backend="torch"),
                            True),
        # peft builds index tensors from Python lists on every call: not capturable, timed with events.
        "peft mixed batch": (lambda: problem.forward("peft mixed batch"), False),
    }
    before = set(mll._best_config_cache)
    times = {}
    with torch.no_grad():
        for variant in BENCH_VARIANTS:
            fn, graphable = calls[variant]
            timing = ctx.guarded("bench", lambda: time_call(ctx, fn, graphable=graphable), shape=shape.name,
                                 rank=rank, variant=variant)
            if timing is None:
                continue
            times[variant] = timing
            ctx.record("bench", shape=shape.name, rows=6 * shape.tokens, in_features=shape.in_features,
                       out_features=shape.out_features, rank=rank, dtype=str(dtype), variant=variant, **timing)
    tuned = [repr(mll._best_config_cache[key]) for key in set(mll._best_config_cache) - before]
    ctx.record("bench-summary", shape=shape.name, rank=rank, autotuned=tuned, **_ratios(times))
    del problem
    _free(ctx)


def _ratios(times: dict) -> dict:
    def ratio(a, b):
        if a not in times or b not in times:
            return None
        key = "gpu_us" if times[a]["gpu_us"] is not None else "host_us"
        return round(times[a][key] / times[b][key], 4)

    return dict(cgkernels_vs_cublas=ratio("cgkernels", "cublas base-only"),
                cgkernels_vs_peft=ratio("cgkernels", "peft mixed batch"),
                torch_path_vs_cublas=ratio("torch lora path", "cublas base-only"))


def stage_kernel_bench(ctx):
    sys.path.insert(0, str(REPO / "benchmarks"))
    shapes = REHEARSAL_SHAPES if ctx.rehearsal else SD15_SHAPES + SDXL_SHAPES
    for rank in (8,) if ctx.rehearsal else (8, 64):
        for shape in shapes:
            ctx.guarded("bench", lambda: _bench_layer(ctx, shape, rank), shape=shape.name, rank=rank)


# ----------------------------------------------------------------------------------------------------------------
# Stage: merge op and patched pipelines on the device
# ----------------------------------------------------------------------------------------------------------------
def _check_merge(ctx, dtype, num_preds, rescale):
    from cgkernels.ops import guidance_merge, guidance_merge_reference

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
              error_over_magnitude=error, tolerance=tolerance)


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
    ctx.check(error <= tolerance * effect, "pipeline", model=kind, dtype=str(dtype), device=str(out.device),
              error=error, adapter_effect=effect, tolerance_of_effect=tolerance)


def stage_extension_correctness(ctx):
    from cgkernels.ops.guidance_merge import EXTENSION_ERROR

    ctx.record("extension", loaded=EXTENSION_ERROR is None,
               error=None if EXTENSION_ERROR is None else str(EXTENSION_ERROR))
    if EXTENSION_ERROR is not None:
        ctx.failures += 1
        return
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


def _unet_step(ctx, kind):
    ub = _unet_bench_module()
    pipe, sample, text, added = _unet_setup(ctx, kind)
    times = {}
    for variant in UNET_VARIANTS:
        run, cleanup = ub._variant_fn(variant, "contrastive", pipe, sample, text, added)
        try:
            with torch.inference_mode():
                timing = ctx.guarded("unet-step", lambda: time_call(ctx, run, graphable=False,
                                                                    iters=1 if ctx.rehearsal else 10),
                                     model=kind, variant=variant)
        finally:
            if cleanup is not None:
                cleanup()
            pipe.unet.enable_lora()
            pipe.unet.set_adapters(["pos", "neg"])
        if timing is not None:
            times[variant] = timing
            ctx.record("unet-step", model=kind, mode="contrastive", rows=6, variant=variant, **timing)
    key = "gpu_us" if ctx.device.type == "cuda" else "host_us"
    if "cgkernels" in times:
        ctx.record("unet-step-summary", model=kind, **{
            f"cgkernels_vs_{other}": round(times["cgkernels"][key] / times[other][key], 4)
            for other in ("base-only", "naive", "peft-mixed") if other in times})
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
            timing = time_call(ctx, run, graphable=False, iters=1 if ctx.rehearsal else 10)
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
        ctx.record("end-to-end", model="sd15", steps=steps, variant=variant, seconds=round(seconds, 4))
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
        ctx.record("train-step", objective="sft", batching=batching, seconds=round(seconds, 4))


def stage_extras(ctx):
    ctx.guarded("end-to-end", lambda: _end_to_end(ctx))
    ctx.guarded("train-step", lambda: _train_step(ctx))


# ----------------------------------------------------------------------------------------------------------------
# Stage: merge bandwidth
# ----------------------------------------------------------------------------------------------------------------
def _merge_bandwidth(ctx, num_preds, rescale):
    from cgkernels.ops import guidance_merge

    # One prediction of 64 MiB in fp16 (the output); the K inputs are K times that.
    elements = (1 << 14) if ctx.rehearsal else (64 << 20) // 2
    batch = 2
    preds = torch.randn(num_preds, batch, elements // batch, device=ctx.device, dtype=torch.float16)
    coeffs = [1.0 / num_preds] * num_preds
    ref_coeffs = [0.0] * (num_preds - 1) + [1.0]
    moved = (num_preds + 1) * elements * 2
    def merge_call():
        return guidance_merge(preds, coeffs, rescale=rescale, ref_coeffs=ref_coeffs)

    merge = ctx.guarded("merge-bandwidth", lambda: time_call(ctx, merge_call, graphable=True,
                                                             iters=3 if ctx.rehearsal else 20),
                        num_preds=num_preds, rescale=rescale)
    source = torch.empty(moved // 4, device=ctx.device, dtype=torch.float16)  # copy: moved/2 read, moved/2 written
    target = torch.empty_like(source)
    copy = time_call(ctx, lambda: target.copy_(source), graphable=True, iters=3 if ctx.rehearsal else 20)
    if merge is None:
        return
    key = "gpu_us" if ctx.device.type == "cuda" else "host_us"
    merge_gbps = moved / (merge[key] * 1e-6) / 1e9
    copy_gbps = moved / (copy[key] * 1e-6) / 1e9
    ctx.record("merge-bandwidth", num_preds=num_preds, rescale=rescale, bytes=moved, merge=merge, copy=copy,
               merge_gb_per_s=round(merge_gbps, 1), copy_gb_per_s=round(copy_gbps, 1),
               fraction_of_copy=round(merge_gbps / copy_gbps, 4))
    del preds, source, target
    _free(ctx)


def stage_merge_bandwidth(ctx):
    from cgkernels.ops.guidance_merge import EXTENSION_ERROR

    if EXTENSION_ERROR is not None:
        ctx.check(False, "merge-bandwidth", error=f"extension not loaded: {EXTENSION_ERROR}")
        return
    for num_preds in (2, 4, 6):
        for rescale in (0.0, 0.7):
            _merge_bandwidth(ctx, num_preds, rescale)


# ----------------------------------------------------------------------------------------------------------------
# Stage: the op test files' CUDA cases
# ----------------------------------------------------------------------------------------------------------------
def stage_cuda_tests(ctx):
    files = ["tests/test_multi_lora_linear.py"] + ([] if ctx.rehearsal else ["tests/test_guidance_merge.py"])
    # The rehearsal checks the invocation and the summary parsing with one quick test.
    selection = ["-k", "test_tile_schedule_covers_rows_once_and_is_cached"] if ctx.rehearsal else []
    result = subprocess.run([sys.executable, "-m", "pytest", *files, *selection, "-q", "-p", "no:cacheprovider",
                             "-rfE"], cwd=REPO, capture_output=True, text=True)
    print(result.stdout[-20000:], result.stderr[-5000:], flush=True)
    lines = result.stdout.strip().splitlines()
    summary = lines[-1] if lines else result.stderr[-500:]
    failed = [line for line in lines if line.startswith(("FAILED", "ERROR"))]
    ctx.check(result.returncode == 0, "pytest", files=files, summary=summary, failed=failed[:50])


def stage_adapter_mix(ctx):
    """A different LoRA per prompt (benchmarks/test_bench_adapter_mix.py): 8 prompts with 1, 3 and 8 distinct LoRAs
    in one CFG step; cgkernels (one call, adapters_per_prompt) against peft's mixed batch, one call per adapter,
    one call per prompt and base-only; the variants' agreement is checked first."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import test_bench_adapter_mix as mix

    pipe, sample, text, t = mix.setup(str(ctx.device), tiny=ctx.rehearsal)
    key = "gpu_us" if ctx.device.type == "cuda" else "host_us"
    for distinct in mix.DISTINCT:
        outputs, times = {}, {}
        for variant in mix.VARIANTS:
            run, cleanup = mix.variant_fn(variant, distinct, pipe, sample, text, t)
            try:
                with torch.inference_mode():
                    outputs[variant] = run().float()
                    timing = ctx.guarded("adapter-mix", lambda: time_call(ctx, run, graphable=False,
                                                                          iters=1 if ctx.rehearsal else 10),
                                         distinct=distinct, variant=variant)
            finally:
                if cleanup is not None:
                    cleanup()
                mix.restore(pipe)
            if timing is not None:
                times[variant] = timing
                ctx.record("adapter-mix", prompts=mix.PROMPTS, distinct=distinct, variant=variant, **timing)
        reference = outputs["sequential"]
        error = (outputs["cgkernels"] - reference).abs().max().item() / max(reference.abs().max().item(), 1e-12)
        ctx.check(error < (5e-3 if sample.dtype == torch.float16 else 1e-4), "adapter-mix-agreement",
                  distinct=distinct, relative_error=error)
        if "cgkernels" in times:
            ctx.record("adapter-mix-summary", distinct=distinct, **{
                f"cgkernels_vs_{other}": round(times["cgkernels"][key] / times[other][key], 4)
                for other in mix.VARIANTS[1:] if other in times})
    del pipe
    _free(ctx)


STAGE_FUNCTIONS = {
    "env": stage_env,
    "kernel-correctness": stage_kernel_correctness,
    "kernel-bench": stage_kernel_bench,
    "extension-correctness": stage_extension_correctness,
    "unet-step": stage_unet_step,
    "merge-bandwidth": stage_merge_bandwidth,
    "unet-compiled": stage_unet_compiled,
    "extras": stage_extras,
    "cuda-tests": stage_cuda_tests,
    "adapter-mix": stage_adapter_mix,
}
