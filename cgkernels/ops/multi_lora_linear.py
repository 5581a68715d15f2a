"""Fused multi-LoRA linear: one base GEMM with a different LoRA adapter per batch segment.

    y[m] = x[m] W^T + bias + seg_scale[s] * (x[m] A_a^T) B_a^T     for rows m of segment s, a = seg_adapter[s]

Segment metadata (row offsets, adapter index, scale) lives on the host: it is validated there and turned into a
small cached tile schedule, so repeated calls with the same routing (every UNet step) neither sync nor copy.

Backends
- triton (fp16/bf16 on CUDA by default): each program owns a (row tile, column block) pair whose rows all belong
  to one segment, so a tile has exactly one adapter. The LoRA shrink x A_a^T is either accumulated in the base
  GEMM's K loop over the same x tile ("in-loop": one kernel, but every column block recomputes it) or computed once
  per row tile by a small pre-pass kernel into an [M, R_pad] buffer ("pre-pass"; always for padded ranks > 64,
  > 32 in fp32, where the in-loop accumulator would spill). The epilogue adds the scaled expand (.) B_a^T and the bias; no [M, N]
  intermediate. The autotuner (keyed by layer shape, layout, rank and a bucket of M) times both placements. The
  x-gradient has the same structure (W^T, B_a^T, A_a^T as strided views) and reuses the kernels.
- torch (CPU, float64, and fp32 on CUDA where cuBLAS beats an FMA Triton kernel): base matmul once over all rows,
  then per segment an in-place `addmm_` (LoRA) and bias add on row views.
"""
from __future__ import annotations

import contextlib
import math
import numbers
import struct
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Optional, Sequence, Union

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # torch backend only
    triton = None
    tl = None

__all__ = [
    "multi_lora_linear", "multi_lora_linear_reference", "planned_multi_lora_linear", "prepare_multi_lora_linear",
    "SegmentPlan", "KernelConfig", "KERNEL_CONFIGS", "force_kernel_config", "MAX_TRITON_RANK",
]

IntSequence = Union[Sequence[int], torch.Tensor]
FloatSequence = Union[Sequence[float], torch.Tensor]

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_AUTO_TRITON_DTYPES = (torch.float16, torch.bfloat16)  # fp32 on CUDA: cuBLAS + the torch LoRA path
_TORCH_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ----------------------------------------------------------------------------------------------------------------
# Host-side metadata
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SegmentPlan:
    """Validated segment metadata as plain Python tuples (hashable: it keys the tile-schedule cache)."""

    indptr: tuple
    adapter: tuple
    scale: tuple

    def runs(self):
        """Non-empty (start, end, adapter, scale) runs; neighbours with the same adapter and scale are merged.
        Computed once per plan (a plan serves every step of its routing)."""
        cached = self.__dict__.get("_runs")
        if cached is None:
            cached = tuple(self._merged_runs())
            object.__setattr__(self, "_runs", cached)  # a memo, not a field: equality and hash ignore it
        return cached

    def _merged_runs(self):
        merged = []
        for s, adapter in enumerate(self.adapter):
            start, end = self.indptr[s], self.indptr[s + 1]
            if start == end:
                continue
            scale = 0.0 if adapter < 0 else self.scale[s]
            if scale == 0.0:  # a zero-scaled adapter contributes nothing: run those rows as base only
                adapter = -1
            if merged and merged[-1][1] == start and merged[-1][2] == adapter and merged[-1][3] == scale:
                merged[-1] = (merged[-1][0], end, adapter, scale)
            else:
                merged.append((start, end, adapter, scale))
        return merged


def _host_list(values, name: str, kind: str) -> list:
    """Metadata as a Python list. CUDA tensors are rejected: reading them would force a device sync."""
    if isinstance(values, torch.Tensor):
        if values.device.type != "cpu":
            raise ValueError(
                f"{name} must be host metadata (a Python sequence or a CPU tensor), got a tensor on {values.device}: "
                "reading it would synchronize with the device on every call"
            )
        if values.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(values.shape)}")
        if kind == "int" and (values.dtype.is_floating_point or values.dtype.is_complex or values.dtype == torch.bool):
            raise TypeError(f"{name} must have an integer dtype, got {values.dtype}")
        if kind == "float" and (values.dtype.is_complex or values.dtype == torch.bool):
            raise TypeError(f"{name} must have a real dtype, got {values.dtype}")
        return values.tolist()
    if isinstance(values, (str, bytes)) or not (hasattr(values, "__len__") and hasattr(values, "__iter__")):
        raise TypeError(f"{name} must be a sequence of {kind}s or a CPU tensor, got {type(values).__name__}")
    out = []
    plain_type = int if kind == "int" else float
    for i, v in enumerate(values):
        if type(v) is plain_type:  # the common case, without the (slow) abstract-base-class checks below
            out.append(v)
            continue
        if isinstance(v, bool) or not isinstance(v, numbers.Integral if kind == "int" else numbers.Real):
            expected = "an integer" if kind == "int" else "a real number"
            raise TypeError(f"{name}[{i}] must be {expected}, got {type(v).__name__} ({v!r})")
        out.append(int(v) if kind == "int" else float(v))
    return out


def _validate_segments(seg_indptr, seg_adapter, seg_scale, num_rows: int, num_adapters: int) -> SegmentPlan:
    indptr = _host_list(seg_indptr, "seg_indptr", "int")
    adapter = _host_list(seg_adapter, "seg_adapter", "int")
    num_segments = len(adapter)
    scale = [1.0] * num_segments if seg_scale is None else _host_list(seg_scale, "seg_scale", "float")
    if len(indptr) != num_segments + 1:
        raise ValueError(f"seg_indptr must have len(seg_adapter) + 1 = {num_segments + 1} entries, got {len(indptr)}")
    if len(scale) != num_segments:
        raise ValueError(f"seg_scale must have len(seg_adapter) = {num_segments} entries, got {len(scale)}")
    if indptr[0] != 0:
        raise ValueError(f"seg_indptr must start at 0, got {indptr[0]}")
    if indptr[-1] != num_rows:
        raise ValueError(f"seg_indptr must end at the number of rows M = {num_rows}, got {indptr[-1]}")
    for s in range(num_segments):
        if indptr[s + 1] < indptr[s]:
            raise ValueError(f"seg_indptr must be non-decreasing, got {indptr[s]} > {indptr[s + 1]} at segment {s}")
        if not -1 <= adapter[s] < num_adapters:
            raise ValueError(
                f"seg_adapter[{s}] = {adapter[s]} is out of range: use -1 (base only) or 0..{num_adapters - 1}"
            )
        if not math.isfinite(scale[s]):
            raise ValueError(f"seg_scale[{s}] = {scale[s]} is not finite")
    return SegmentPlan(tuple(indptr), tuple(adapter), tuple(scale))


_PLAN_CACHE_SIZE = 1024
_plan_cache: dict = {}


def _segment_plan(seg_indptr, seg_adapter, seg_scale, num_rows: int, num_adapters: int) -> SegmentPlan:
    """The SegmentPlan of op-level metadata (lists of plain ints / floats), validated once per distinct value.

    The custom op and its backward receive the metadata the Python wrapper already checked strictly (types
    included); here a repeat of the same routing, as in every UNet step, costs one dict lookup."""
    if type(num_rows) is not int or type(num_adapters) is not int:  # symbolic sizes while tracing: no caching
        return _validate_segments(seg_indptr, seg_adapter, seg_scale, num_rows, num_adapters)
    key = (tuple(seg_indptr), tuple(seg_adapter), tuple(seg_scale), num_rows, num_adapters)
    plan = _plan_cache.get(key)
    if plan is None:
        plan = _validate_segments(seg_indptr, seg_adapter, seg_scale, num_rows, num_adapters)
        if len(_plan_cache) >= _PLAN_CACHE_SIZE:
            _plan_cache.clear()
        _plan_cache[key] = plan
    return plan


def _validate_tensors(x, weight, bias, lora_a, lora_b) -> None:
    for name, t in (("x", x), ("weight", weight), ("lora_a", lora_a), ("lora_b", lora_b)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if x.dtype not in _TORCH_DTYPES:
        raise TypeError(f"x must be float16, bfloat16, float32 or float64, got {x.dtype}")
    named = [("weight", weight), ("lora_a", lora_a), ("lora_b", lora_b), ("bias", bias)]
    for name, t in (item for item in named if item[1] is not None):
        if t.dtype != x.dtype:
            raise TypeError(f"{name} dtype {t.dtype} differs from x dtype {x.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension [..., K]")
    if weight.dim() != 2:
        raise ValueError(f"weight must be [N, K], got shape {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    if x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1]} input features but weight expects K = {in_features}")
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"bias must be [N] = [{out_features}], got shape {tuple(bias.shape)}")
    if lora_a.dim() != 3 or lora_a.shape[2] != in_features:
        raise ValueError(f"lora_a must be [A, R, K] with K = {in_features}, got shape {tuple(lora_a.shape)}")
    num_adapters, rank = lora_a.shape[0], lora_a.shape[1]
    if rank < 1:
        raise ValueError("lora_a must have rank R >= 1 (pad smaller adapters with zero rows)")
    if tuple(lora_b.shape) != (num_adapters, out_features, rank):
        raise ValueError(
            f"lora_b must be [A, N, R] = [{num_adapters}, {out_features}, {rank}], got shape {tuple(lora_b.shape)}"
        )


# ----------------------------------------------------------------------------------------------------------------
# Torch backend
# ----------------------------------------------------------------------------------------------------------------
def _torch_forward(x2, weight, bias, lora_a, lora_b, plan: SegmentPlan, shrink_out=None):
    """Base matmul over all rows, then per segment its LoRA delta and the bias, added in place on its row view.

    The bias is added per segment rather than by F.linear: right after the segment's LoRA update its rows are
    still in cache, while addmm's bias path copies the bias into the whole output and makes the GEMM read it back
    (measurably slower on CPU). shrink_out: an optional [M, R] buffer that receives each LoRA segment's x A_a^T
    rows (autograd keeps them for the lora_b gradient instead of recomputing them).
    """
    y = x2 @ weight.t()
    for start, end, adapter, scale in plan.runs():
        rows = y[start:end]
        if adapter >= 0:
            a_t = lora_a[adapter].t()
            if shrink_out is None:
                shrink = x2[start:end] @ a_t
            else:
                shrink = torch.mm(x2[start:end], a_t, out=shrink_out[start:end])
            rows.addmm_(shrink, lora_b[adapter].t(), alpha=scale)
        if bias is not None:
            rows.add_(bias)
    return y


# ----------------------------------------------------------------------------------------------------------------
# Triton backend
# ----------------------------------------------------------------------------------------------------------------
SHRINK_MODES = ("in-loop", "pre-pass")
# The in-loop shrink keeps a [BLOCK_M, R_PAD] fp32 accumulator next to the [BLOCK_M, BLOCK_N] one: beyond these padded
# ranks some configs spill (checked by tests/test_triton_compile.py), so wider adapters (pos+neg concatenated for
# NPO reach 128) always take the pre-pass. fp32 (FMA path, operands in registers) has less room.
MAX_IN_LOOP_RANK = {"half": 64, "fp32": 32}


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes, launch options and shrink placement of the Triton kernel (block_m also sets the tile schedule's
    row tiles).

    shrink: "in-loop" accumulates x A_a^T in the base GEMM's K loop of every (row tile, column block) program, so
    each column block recomputes it (extra work ~ R_pad / BLOCK_N); "pre-pass" computes it once per row tile in a
    small kernel that writes scale * x A_a^T as [M, R_pad] (input dtype), read back in the epilogue (an extra read
    of x). The autotuner times both where both are allowed; which one won is visible in the tuned config.
    """

    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3
    shrink: str = "in-loop"

    def __post_init__(self):
        if self.shrink not in SHRINK_MODES:
            raise ValueError(f"KernelConfig.shrink must be one of {SHRINK_MODES}, got {self.shrink!r}")


# Hopper-sized tiles for fp16/bf16 (wgmma); the autotuner tries each with both shrink placements. fp32 runs on the
# Triton kernel only when asked for (backend="triton": tests, the interpreter); the automatic choice on CUDA is cuBLAS
# plus the torch LoRA path, faster than a 255-register FMA kernel.
KERNEL_CONFIGS = {
    "half": (
        KernelConfig(128, 128, 64, num_warps=8, num_stages=3),
        KernelConfig(128, 256, 64, num_warps=8, num_stages=3),
        KernelConfig(128, 64, 64, num_warps=4, num_stages=4),
        KernelConfig(64, 128, 64, num_warps=4, num_stages=4),
        # Small tiles: narrow layers, and GPUs with ~100 KB of shared memory where the others do not fit.
        KernelConfig(64, 64, 32, num_warps=4, num_stages=2),
    ),
    "fp32": (
        KernelConfig(64, 64, 16, num_warps=4, num_stages=3),
        KernelConfig(128, 64, 16, num_warps=8, num_stages=3),
    ),
}
# One small config for the CPU interpreter, where timing configs is meaningless.
INTERPRETER_CONFIG = KernelConfig(32, 32, 16, group_m=4, num_warps=4, num_stages=1)

_forced_config: Optional[KernelConfig] = None
_best_config_cache: dict = {}
_TILE_CACHE_SIZE = 256
_tile_cache: "OrderedDict[tuple, tuple]" = OrderedDict()


@contextlib.contextmanager
def force_kernel_config(config: KernelConfig):
    """Run the Triton kernel with `config` instead of the autotuned one (tests, tuning experiments)."""
    global _forced_config
    previous, _forced_config = _forced_config, config
    try:
        yield
    finally:
        _forced_config = previous


def _rank_pad(rank: int) -> int:
    # tl.dot needs every dimension >= 16; powers of two keep the register layout simple.
    return max(16, triton.next_power_of_2(rank))


def _dtype_class(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "half"


def _in_loop_fits(rank: int, dtype: torch.dtype) -> bool:
    return _rank_pad(rank) <= MAX_IN_LOOP_RANK[_dtype_class(dtype)]


def _shrink_mode(config: KernelConfig, rank: int, dtype: torch.dtype) -> str:
    """The config's shrink placement, or the pre-pass where the in-loop accumulator would not fit."""
    return config.shrink if _in_loop_fits(rank, dtype) else "pre-pass"


def _candidate_configs(dtype: torch.dtype, rank: int) -> list:
    """What the autotuner times: every tile config with every shrink placement allowed at this rank."""
    modes = SHRINK_MODES if _in_loop_fits(rank, dtype) else ("pre-pass",)
    return [replace(config, shrink=mode) for config in KERNEL_CONFIGS[_dtype_class(dtype)] for mode in modes]


def _rows_bucket(num_rows: int) -> int:
    """Power-of-two bucket of M for the autotune key: the best tile for 462 text rows is not the one for 24576."""
    return 1 << max(4, (num_rows - 1).bit_length())


def _tile_schedule(plan: SegmentPlan, block_m: int, device: torch.device):
    """Device int32 [T, 4] rows (row_start, row_end, adapter, scale as float32 bits); cached per routing."""
    key = (plan, block_m, device)
    cached = _tile_cache.get(key)
    if cached is not None:
        _tile_cache.move_to_end(key)
        return cached
    rows = []
    for start, end, adapter, scale in plan.runs():
        scale_bits = struct.unpack("<i", struct.pack("<f", scale))[0]
        for row in range(start, end, block_m):
            rows.append((row, min(row + block_m, end), adapter, scale_bits))
    table = torch.tensor(rows, dtype=torch.int32).reshape(-1, 4)
    entry = (table.to(device), len(rows))
    _tile_cache[key] = entry
    # Eviction frees a table that a CUDA graph captured earlier may still read: capture only after warm-up, and
    # keep the number of distinct routings x layer shapes in a captured graph under _TILE_CACHE_SIZE.
    if len(_tile_cache) > _TILE_CACHE_SIZE:
        _tile_cache.popitem(last=False)
    return entry


if triton is not None:

    @triton.jit
    def _load_tile(tile_ptr, tile):
        row_start = tl.load(tile_ptr + tile * 4)
        row_end = tl.load(tile_ptr + tile * 4 + 1)
        adapter = tl.load(tile_ptr + tile * 4 + 2)
        scale = tl.load(tile_ptr + tile * 4 + 3).to(tl.float32, bitcast=True)
        return row_start, row_end, adapter, scale

    @triton.jit
    def _k_loop_dot(acc, x_ptrs, w_ptrs, row_mask, col_mask, offs_k, K, stride_xk, stride_wk,
                    INPUT_PRECISION: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST_BF16: tl.constexpr):
        """acc += x W^T over all of K for one row tile and one block of W's rows (a column block of the base GEMM,
        or the rank rows of A_a for the shrink)."""
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            k_mask = offs_k < K - k * BLOCK_K
            x = tl.load(x_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
            if UPCAST_BF16:
                x, w = x.to(tl.float32), w.to(tl.float32)
            acc = tl.dot(x, w, acc, input_precision=INPUT_PRECISION)
            x_ptrs += BLOCK_K * stride_xk
            w_ptrs += BLOCK_K * stride_wk
        return acc

    @triton.jit
    def _expand(acc, shrink, b_ptr, adapter, offs_r, offs_n, rank_mask, col_mask, stride_ba, stride_bn, stride_br,
                INPUT_PRECISION: tl.constexpr, UPCAST_BF16: tl.constexpr):
        """acc += shrink B_a^T for one column block (shrink: the scaled [BLOCK_M, R_PAD] x A_a^T, input dtype)."""
        b_ptrs = (b_ptr + adapter.to(tl.int64) * stride_ba + offs_r[:, None] * stride_br
                  + offs_n.to(tl.int64)[None, :] * stride_bn)
        b = tl.load(b_ptrs, mask=rank_mask[:, None] & col_mask[None, :], other=0.0)
        if UPCAST_BF16:
            shrink, b = shrink.to(tl.float32), b.to(tl.float32)
        return tl.dot(shrink, b, acc, input_precision=INPUT_PRECISION)

    @triton.jit
    def _lora_shrink_kernel(
        x_ptr, a_ptr, s_ptr, tile_ptr,
        K, R,
        stride_xm, stride_xk,
        stride_aa, stride_ar, stride_ak,
        stride_sm,
        R_PAD: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_K: tl.constexpr,
        UPCAST_BF16: tl.constexpr,
    ):
        # Pre-pass: s[m, :] = scale * x[m] A_a^T (rounded to the input dtype) for the rows of one row tile, once.
        row_start, row_end, adapter, scale = _load_tile(tile_ptr, tl.program_id(0))
        if adapter >= 0:
            offs_m = row_start + tl.arange(0, BLOCK_M)
            offs_k = tl.arange(0, BLOCK_K)
            offs_r = tl.arange(0, R_PAD)
            row_mask = offs_m < row_end
            rank_mask = offs_r < R
            x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :] * stride_xk
            a_base = a_ptr + adapter.to(tl.int64) * stride_aa
            a_ptrs = a_base + offs_r[None, :] * stride_ar + offs_k[:, None] * stride_ak
            acc_r = _k_loop_dot(tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32), x_ptrs, a_ptrs, row_mask, rank_mask,
                                offs_k, K, stride_xk, stride_ak, INPUT_PRECISION, BLOCK_K, UPCAST_BF16)
            s_ptrs = s_ptr + offs_m.to(tl.int64)[:, None] * stride_sm + offs_r[None, :]
            tl.store(s_ptrs, (acc_r * scale).to(s_ptr.dtype.element_ty), mask=row_mask[:, None])

    # The tile count varies with every routing and layer: no specialization on it (each would be another compile of
    # every autotune candidate). R keeps its divisibility hint: without it the rank mask costs registers (spills).
    @triton.jit(do_not_specialize=["num_tiles"])
    def _multi_lora_linear_kernel(
        x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, s_ptr, y_ptr, tile_ptr,
        num_tiles, N, K, R,
        stride_xm, stride_xk,
        stride_wn, stride_wk,
        stride_aa, stride_ar, stride_ak,
        stride_ba, stride_bn, stride_br,
        stride_sm,
        stride_ym, stride_yn,
        HAS_BIAS: tl.constexpr,
        R_PAD: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
        UPCAST_BF16: tl.constexpr,
        SHRINK_IN_LOOP: tl.constexpr,
    ):
        # Grouped ordering: GROUP_M consecutive row tiles sweep the column blocks together, so their W blocks
        # stay in L2.
        pid = tl.program_id(0)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        pids_per_group = GROUP_M * num_pid_n
        first_tile = (pid // pids_per_group) * GROUP_M
        group_size = tl.minimum(num_tiles - first_tile, GROUP_M)
        tile = first_tile + (pid % pids_per_group) % group_size
        pid_n = (pid % pids_per_group) // group_size
        row_start, row_end, adapter, scale = _load_tile(tile_ptr, tile)

        offs_m = row_start + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        offs_r = tl.arange(0, R_PAD)
        row_mask = offs_m < row_end
        col_mask = offs_n < N
        rank_mask = offs_r < R

        # int64 row/column offsets: M*K and N*K can exceed 2^31 elements.
        x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :] * stride_xk
        w_ptrs = w_ptr + offs_n.to(tl.int64)[None, :] * stride_wn + offs_k[:, None] * stride_wk
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

        if SHRINK_IN_LOOP:
            if adapter >= 0:
                # Base GEMM and shrink in the same K loop over the same x tile.
                a_ptrs = (a_ptr + adapter.to(tl.int64) * stride_aa + offs_r[None, :] * stride_ar
                          + offs_k[:, None] * stride_ak)
                acc_r = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
                for k in range(0, tl.cdiv(K, BLOCK_K)):
                    k_mask = offs_k < K - k * BLOCK_K
                    x = tl.load(x_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
                    w = tl.load(w_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
                    a = tl.load(a_ptrs, mask=k_mask[:, None] & rank_mask[None, :], other=0.0)
                    if UPCAST_BF16:
                        x, w, a = x.to(tl.float32), w.to(tl.float32), a.to(tl.float32)
                    acc = tl.dot(x, w, acc, input_precision=INPUT_PRECISION)
                    acc_r = tl.dot(x, a, acc_r, input_precision=INPUT_PRECISION)
                    x_ptrs += BLOCK_K * stride_xk
                    w_ptrs += BLOCK_K * stride_wk
                    a_ptrs += BLOCK_K * stride_ak
                # The shrink is rounded to the input dtype like an unfused LoRA would be (and like the pre-pass).
                shrink = (acc_r * scale).to(b_ptr.dtype.element_ty)
                acc = _expand(acc, shrink, b_ptr, adapter, offs_r, offs_n, rank_mask, col_mask, stride_ba, stride_bn,
                              stride_br, INPUT_PRECISION, UPCAST_BF16)
            else:
                acc = _k_loop_dot(acc, x_ptrs, w_ptrs, row_mask, col_mask, offs_k, K, stride_xk, stride_wk,
                                 INPUT_PRECISION, BLOCK_K, UPCAST_BF16)
        else:
            acc = _k_loop_dot(acc, x_ptrs, w_ptrs, row_mask, col_mask, offs_k, K, stride_xk, stride_wk,
                             INPUT_PRECISION, BLOCK_K, UPCAST_BF16)
            if adapter >= 0:  # the pre-pass left scale * x A_a^T for these rows in s
                s_ptrs = s_ptr + offs_m.to(tl.int64)[:, None] * stride_sm + offs_r[None, :]
                shrink = tl.load(s_ptrs, mask=row_mask[:, None], other=0.0)
                acc = _expand(acc, shrink, b_ptr, adapter, offs_r, offs_n, rank_mask, col_mask, stride_ba, stride_bn,
                              stride_br, INPUT_PRECISION, UPCAST_BF16)

        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=col_mask, other=0.0).to(tl.float32)
        y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n.to(tl.int64)[None, :] * stride_yn
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


def _auto_uses_triton(x: torch.Tensor) -> bool:
    # The interpreter is a test tool, never an automatic choice; fp32 goes to cuBLAS + the torch LoRA path.
    return triton is not None and x.is_cuda and x.dtype in _AUTO_TRITON_DTYPES and not _is_interpreted()


def _is_interpreted() -> bool:
    # TRITON_INTERPRET=1 at import time turns @triton.jit into an interpreted (CPU, numpy) function.
    return triton is not None and not isinstance(_multi_lora_linear_kernel, triton.runtime.JITFunction)


def _squeeze_interpreter_loop_bounds() -> None:
    """Compatibility for Triton < 3.7 with NumPy >= 2.4, interpreter only (3.7+ already does this).

    The interpreter holds a runtime scalar such as tl.cdiv(K, BLOCK_K) as a shape-(1,) array, and older versions
    turn it into a `range` bound with int(array), which NumPy 2.4 rejects ("only 0-dimensional arrays can be
    converted to Python scalars"). Re-patch tensor.__index__ to squeeze first, as Triton 3.7 does; the
    interpreter's per-run patch scope still restores the original attribute afterwards.
    """
    from triton.runtime import interpreter

    patch_lang_tensor = interpreter._patch_lang_tensor

    def patch_lang_tensor_squeezed(tensor, *args):
        patch_lang_tensor(tensor, *args)
        tensor.__index__ = lambda self: int(self.handle.data.squeeze())

    interpreter._patch_lang_tensor = patch_lang_tensor_squeezed


if _is_interpreted() and tuple(int(part) for part in triton.__version__.split(".")[:2]) < (3, 7):
    _squeeze_interpreter_loop_bounds()


def _kernel_launch_spec(x2, weight, bias, lora_a, lora_b, y, tiles, num_tiles: int, config: KernelConfig,
                        shrink=None):
    """The main kernel's grid, runtime arguments, constexprs and launch options, by name.

    shrink: the pre-pass's [M, R_pad] buffer (pre-pass mode), else None. Tests reuse this to compile the kernel
    ahead of time with exactly the arguments a real launch passes.
    """
    out_features, in_features = weight.shape
    rank = lora_a.shape[1]
    in_loop = _shrink_mode(config, rank, x2.dtype) == "in-loop"
    if not in_loop and shrink is None:
        raise ValueError("the pre-pass shrink mode needs the shrink buffer")
    grid = (num_tiles * triton.cdiv(out_features, config.block_n),)
    args = dict(
        x_ptr=x2, w_ptr=weight, bias_ptr=bias if bias is not None else y, a_ptr=lora_a, b_ptr=lora_b,
        s_ptr=shrink if shrink is not None else y, y_ptr=y,
        tile_ptr=tiles, num_tiles=num_tiles, N=out_features, K=in_features, R=rank,
        stride_xm=x2.stride(0), stride_xk=x2.stride(1),
        stride_wn=weight.stride(0), stride_wk=weight.stride(1),
        stride_aa=lora_a.stride(0), stride_ar=lora_a.stride(1), stride_ak=lora_a.stride(2),
        stride_ba=lora_b.stride(0), stride_bn=lora_b.stride(1), stride_br=lora_b.stride(2),
        stride_sm=shrink.stride(0) if shrink is not None else 0,
        stride_ym=y.stride(0), stride_yn=y.stride(1),
    )
    constexprs = dict(
        HAS_BIAS=bias is not None,
        R_PAD=_rank_pad(rank),
        INPUT_PRECISION=_input_precision(x2),
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        GROUP_M=config.group_m,
        UPCAST_BF16=_upcast_bf16(x2),
        SHRINK_IN_LOOP=in_loop,
    )
    options = dict(num_warps=config.num_warps, num_stages=config.num_stages)
    return grid, args, constexprs, options


def _shrink_launch_spec(x2, lora_a, shrink, tiles, num_tiles: int, config: KernelConfig):
    """The pre-pass kernel's grid (one program per row tile), arguments, constexprs and launch options."""
    rank_pad = _rank_pad(lora_a.shape[1])
    args = dict(
        x_ptr=x2, a_ptr=lora_a, s_ptr=shrink, tile_ptr=tiles, K=x2.shape[1], R=lora_a.shape[1],
        stride_xm=x2.stride(0), stride_xk=x2.stride(1),
        stride_aa=lora_a.stride(0), stride_ar=lora_a.stride(1), stride_ak=lora_a.stride(2),
        stride_sm=shrink.stride(0),
    )
    constexprs = dict(R_PAD=rank_pad, INPUT_PRECISION=_input_precision(x2), BLOCK_M=config.block_m,
                      BLOCK_K=config.block_k, UPCAST_BF16=_upcast_bf16(x2))
    # A [BLOCK_M, R_PAD] fp32 accumulator: 8 warps keep 128 x 128 at 64 registers a thread.
    options = dict(num_warps=8 if config.block_m * rank_pad >= 128 * 128 else 4, num_stages=min(config.num_stages, 3))
    return (num_tiles,), args, constexprs, options


def _input_precision(x2) -> str:
    # fp32 must stay exact (no tf32 rounding); halves take the tensor cores either way.
    return "ieee" if x2.dtype == torch.float32 else "tf32"


def _upcast_bf16(x2) -> bool:
    # The interpreter's tl.dot multiplies bf16 bit patterns as integers (triton 3.6-3.9): feed it exact fp32
    # copies instead. Compiled kernels take bf16 straight to the tensor cores.
    return x2.dtype == torch.bfloat16 and _is_interpreted()


def _launch(x2, weight, bias, lora_a, lora_b, plan: SegmentPlan, y, config: KernelConfig):
    """Runs the kernel(s) for one call; returns the pre-pass's scaled shrink buffer (pre-pass mode) or None."""
    tiles, num_tiles = _tile_schedule(plan, config.block_m, x2.device)
    if num_tiles == 0:
        return None
    shrink = None
    if _shrink_mode(config, lora_a.shape[1], x2.dtype) == "pre-pass":
        # Rows of base-only tiles are neither written nor read.
        shrink = torch.empty((x2.shape[0], _rank_pad(lora_a.shape[1])), dtype=x2.dtype, device=x2.device)
        grid, args, constexprs, options = _shrink_launch_spec(x2, lora_a, shrink, tiles, num_tiles, config)
        _lora_shrink_kernel[grid](*args.values(), **constexprs, **options)
    grid, args, constexprs, options = _kernel_launch_spec(
        x2, weight, bias, lora_a, lora_b, y, tiles, num_tiles, config, shrink=shrink
    )
    _multi_lora_linear_kernel[grid](*args.values(), **constexprs, **options)
    return shrink


def _autotune_key(x2, weight, bias, lora_a) -> tuple:
    # The layout is part of the key (the x-gradient runs this kernel on transposed, strided views), and so is a
    # bucket of M: the best tile for 462 text rows is not the one for 24576 image rows.
    return (_rows_bucket(x2.shape[0]), weight.shape[0], weight.shape[1], weight.stride(), _rank_pad(lora_a.shape[1]),
            x2.dtype, bias is not None, x2.device)


def _pick_config(x2, weight, bias, lora_a, lora_b, plan, y) -> KernelConfig:
    if _forced_config is not None:
        return _forced_config
    if _is_interpreted():
        return INTERPRETER_CONFIG
    key = _autotune_key(x2, weight, bias, lora_a)
    best = _best_config_cache.get(key)
    if best is None:
        # Time each candidate on the real call (the output is overwritten, so the timing runs are harmless).
        candidates = _candidate_configs(x2.dtype, lora_a.shape[1])
        timings = []
        for config in candidates:
            try:
                # Short timing runs: a layer's first call tunes ~10 candidates, and a UNet has ~100 layer shapes.
                ms = triton.testing.do_bench(lambda: _launch(x2, weight, bias, lora_a, lora_b, plan, y, config),
                                             warmup=5, rep=25)
            except triton.runtime.errors.OutOfResources:
                continue
            timings.append((ms, config))
        if not timings:
            raise RuntimeError(f"no multi-LoRA kernel config fits this GPU's resources (tried {candidates})")
        best = min(timings, key=lambda t: t[0])[1]
        _best_config_cache[key] = best
    return best


def _triton_forward(x2, weight, bias, lora_a, lora_b, plan: SegmentPlan, keep_shrink: bool = False):
    """y, or (y, shrink) with keep_shrink: the pre-pass's [M, R_pad] scale * x A_a^T (None without LoRA rows),
    kept for the lora_b gradient; the tuned tile config then runs with the pre-pass."""
    if bias is not None:
        bias = bias.contiguous()  # the kernel reads bias[n] at bias_ptr + n
    y = torch.empty((x2.shape[0], weight.shape[0]), dtype=x2.dtype, device=x2.device)
    shrink = None
    if x2.shape[0] > 0:
        config = _pick_config(x2, weight, bias, lora_a, lora_b, plan, y)
        if keep_shrink:
            config = replace(config, shrink="pre-pass")
        shrink = _launch(x2, weight, bias, lora_a, lora_b, plan, y, config)
    return (y, shrink) if keep_shrink else y


# ----------------------------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------------------------
_FORWARDS = {"torch": _torch_forward, "triton": _triton_forward}


def _lora_grads(x2, grad_y, lora_a, lora_b, plan: SegmentPlan, need_a: bool, need_b: bool, shrink=None,
                shrink_scaled: bool = False, grad_x=None):
    """dA_a = sum_s scale_s (dy_s B_a)^T x_s and dB_a = sum_s scale_s dy_s^T (x_s A_a^T), two products per run of
    LoRA rows. The layouts the patch and the trainer emit group rows by adapter ([b(u), b(c) | p(u), p(c) | ...]),
    and SegmentPlan.runs() merges neighbouring segments of one adapter and scale: one run, one product per adapter.

    shrink: the forward's x A_a^T rows ([M, >= R]; already multiplied by the scale if shrink_scaled: the Triton
    pre-pass), else recomputed here. grad_x: if given, each run's LoRA part of dx, scale_s (dy_s B_a) A_a, is added
    to it in place, sharing dy_s B_a with dA_a (the torch backend).
    """
    # Matmuls run in the input dtype (fp32 accumulation inside); the partials of an adapter that serves several
    # runs are summed in an fp32 buffer for half inputs.
    acc_dtype = torch.float32 if lora_a.dtype in (torch.float16, torch.bfloat16) else lora_a.dtype
    grad_a = torch.zeros(lora_a.shape, dtype=acc_dtype, device=lora_a.device) if need_a else None
    grad_b = torch.zeros(lora_b.shape, dtype=acc_dtype, device=lora_b.device) if need_b else None
    rank = lora_a.shape[1]
    for start, end, a, scale in plan.runs():
        if a < 0:
            continue
        x_run, dy_run = x2[start:end], grad_y[start:end]  # [m, K], [m, N]
        if need_a or grad_x is not None:
            expand_grad = dy_run @ lora_b[a]  # [m, R]
            if grad_x is not None:
                grad_x[start:end].addmm_(expand_grad, lora_a[a], alpha=scale)
            if need_a:
                grad_a[a].add_(expand_grad.t() @ x_run, alpha=scale)
        if need_b:
            if shrink is None:
                shrink_run, factor = x_run @ lora_a[a].t(), scale
            else:
                shrink_run, factor = shrink[start:end, :rank], 1.0 if shrink_scaled else scale
            grad_b[a].add_(dy_run.t() @ shrink_run, alpha=factor)
    return (
        grad_a.to(lora_a.dtype) if need_a else None,
        grad_b.to(lora_b.dtype) if need_b else None,
    )


class _MultiLoraLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, weight, bias, lora_a, lora_b, plan, backend):
        shrink = None
        if backend == "torch":
            # Keep the segments' x A_a^T ([M, R], small next to x) for dB when lora_b needs a gradient.
            if ctx.needs_input_grad[4]:
                shrink = x2.new_empty((x2.shape[0], lora_a.shape[1]))
            y = _torch_forward(x2, weight, bias, lora_a, lora_b, plan, shrink_out=shrink)
        elif ctx.needs_input_grad[4]:
            # The pre-pass's scale * x A_a^T ([M, R_pad]) serves dB: no recompute in backward.
            y, shrink = _triton_forward(x2, weight, bias, lora_a, lora_b, plan, keep_shrink=True)
        else:
            y = _FORWARDS[backend](x2, weight, bias, lora_a, lora_b, plan)
        ctx.save_for_backward(x2, weight, lora_a, lora_b, shrink)
        ctx.plan, ctx.backend, ctx.has_bias = plan, backend, bias is not None
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        x2, weight, lora_a, lora_b, shrink = ctx.saved_tensors
        plan, backend = ctx.plan, ctx.backend

        def fused_grad_x(grad_y, weight_t, lora_b_t, lora_a_t):
            return _FORWARDS[backend](grad_y, weight_t, None, lora_b_t, lora_a_t, plan)

        grads = _backward(grad_y, x2, weight, lora_a, lora_b, plan, backend, ctx.needs_input_grad[:5], ctx.has_bias,
                          fused_grad_x, shrink=shrink, shrink_scaled=backend == "triton")
        return (*grads, None, None)


def _backward(grad_y, x2, weight, lora_a, lora_b, plan: SegmentPlan, backend: str, needs, has_bias: bool,
              fused_grad_x, *, shrink=None, shrink_scaled: bool = False):
    """(dx, dW, dbias, dA, dB) of y = x W^T + b + scale_s (x A_a^T) B_a^T; shared by the eager autograd Function
    and the custom op's registered autograd. fused_grad_x(dy, W^T, B^T, A^T) runs the fused forward on transposed
    views for the Triton backend (the op passes itself, so that it stays one opaque node when compiled)."""
    need_x, need_w, need_bias, need_a, need_b = needs
    grad_y = grad_y.contiguous()
    grad_x = grad_w = grad_bias = lora_grad_x = None
    if need_x and backend == "torch":
        # dx = dy W here; _lora_grads adds scale * (dy B_a) A_a per segment, reusing dy B_a for dA.
        grad_x = lora_grad_x = grad_y @ weight
    elif need_x:
        # dx = dy W + scale * (dy B_a) A_a: the fused forward kernel with W^T, B_a^T and A_a^T as strided views.
        grad_x = fused_grad_x(grad_y, weight.t(), lora_b.transpose(1, 2), lora_a.transpose(1, 2))
    if need_w:
        grad_w = grad_y.t() @ x2
    if need_bias and has_bias:
        grad_bias = grad_y.sum(0)
    grad_a, grad_b = _lora_grads(x2, grad_y, lora_a, lora_b, plan, need_a, need_b, shrink=shrink,
                                 shrink_scaled=shrink_scaled, grad_x=lora_grad_x)
    return grad_x, grad_w, grad_bias, grad_a, grad_b


# ----------------------------------------------------------------------------------------------------------------
# torch.library op: what torch.compile sees
# ----------------------------------------------------------------------------------------------------------------
# Under torch.compile the whole layer is one opaque node `torch.ops.cgkernels.multi_lora_linear` with a fake
# implementation. Segment metadata travels as int[] / float[] arguments: host values, constants of the graph, never
# device tensors (no syncs). The op body and its backward rebuild the SegmentPlan through a cache, so a routing is
# validated once, not per call. Eager calls skip the dispatcher (see `planned_multi_lora_linear`): the custom op's
# Python autograd wrapper costs more host time than the whole fused call at small sizes.
@torch.library.custom_op("cgkernels::multi_lora_linear", mutates_args=(), device_types=("cpu", "cuda"))
def _multi_lora_linear_op(
    x2: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    seg_indptr: list[int],
    seg_adapter: list[int],
    seg_scale: list[float],
    backend: str,
) -> torch.Tensor:
    plan = _segment_plan(seg_indptr, seg_adapter, seg_scale, x2.shape[0], lora_a.shape[0])
    return _FORWARDS[backend](x2, weight, bias, lora_a, lora_b, plan)


@_multi_lora_linear_op.register_fake
def _multi_lora_linear_fake(x2, weight, bias, lora_a, lora_b, seg_indptr, seg_adapter, seg_scale, backend):
    torch._check(x2.shape[1] == weight.shape[1], lambda: "multi_lora_linear: x and weight disagree on K")
    return x2.new_empty((x2.shape[0], weight.shape[0]))


def _op_setup_context(ctx, inputs, output):
    x2, weight, bias, lora_a, lora_b, seg_indptr, seg_adapter, seg_scale, backend = inputs
    ctx.save_for_backward(x2, weight, lora_a, lora_b)
    ctx.segments = (seg_indptr, seg_adapter, seg_scale)
    ctx.backend, ctx.has_bias = backend, bias is not None


def _op_backward(ctx, grad_y):
    x2, weight, lora_a, lora_b = ctx.saved_tensors
    seg_indptr, seg_adapter, seg_scale = ctx.segments
    plan = _segment_plan(seg_indptr, seg_adapter, seg_scale, x2.shape[0], lora_a.shape[0])

    def fused_grad_x(grad_y, weight_t, lora_b_t, lora_a_t):
        return _multi_lora_linear_op(grad_y, weight_t, None, lora_b_t, lora_a_t, seg_indptr, seg_adapter, seg_scale,
                                     ctx.backend)

    grads = _backward(grad_y, x2, weight, lora_a, lora_b, plan, ctx.backend, ctx.needs_input_grad[:5], ctx.has_bias,
                      fused_grad_x)
    return (*grads, None, None, None, None)


_multi_lora_linear_op.register_autograd(_op_backward, setup_context=_op_setup_context)


def planned_multi_lora_linear(x2, weight, bias, lora_a, lora_b, plan: SegmentPlan, backend: str) -> torch.Tensor:
    """The fused linear on already validated operands: x2 [M, K], a SegmentPlan, a resolved backend.

    Callers that validated the tensors and metadata once (the segmented LoRA layers, per routing and input shape)
    call this on every step. Under torch.compile it emits the custom op; in eager mode it calls the same
    implementation directly, which saves the dispatcher's host time.
    """
    if torch.compiler.is_compiling():
        return _multi_lora_linear_op(x2, weight, bias, lora_a, lora_b, list(plan.indptr), list(plan.adapter),
                                     list(plan.scale), backend)
    if torch.is_grad_enabled() and (
        x2.requires_grad or weight.requires_grad or lora_a.requires_grad or lora_b.requires_grad
        or (bias is not None and bias.requires_grad)
    ):
        return _MultiLoraLinearFunction.apply(x2, weight, bias, lora_a, lora_b, plan, backend)
    return _FORWARDS[backend](x2, weight, bias, lora_a, lora_b, plan)


# ----------------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------------
def _resolve_backend(backend: str, x: torch.Tensor) -> str:
    if backend == "auto":
        return "triton" if _auto_uses_triton(x) else "torch"
    if backend == "torch":
        return backend
    if backend == "triton":
        if triton is None:
            raise RuntimeError("backend='triton' needs the triton package, which is not installed")
        if x.dtype not in _TRITON_DTYPES:
            raise TypeError(f"backend='triton' supports float16, bfloat16 and float32, got {x.dtype}")
        if not x.is_cuda and not _is_interpreted():
            raise ValueError(
                "backend='triton' needs CUDA tensors (CPU tensors only under TRITON_INTERPRET=1, set before "
                f"triton is imported); got tensors on {x.device}"
            )
        if x.is_cuda and _is_interpreted():
            raise ValueError("backend='triton' with CUDA tensors cannot run while TRITON_INTERPRET=1")
        return backend
    raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")


# The largest stacked adapter rank the Triton kernels are compiled and checked for (tests/test_triton_compile.py:
# the pre-pass at rank 128). Callers with wider stacks (several adapters concatenated along the rank) use the torch
# backend or their own per-segment path.
MAX_TRITON_RANK = 128


def prepare_multi_lora_linear(x2, weight, bias, lora_a, lora_b, seg_indptr, seg_adapter, seg_scale=None, *,
                              backend: str = "auto") -> tuple[SegmentPlan, str]:
    """Validate the operands and segment metadata of one fused call and resolve the backend, once: returns the
    (SegmentPlan, backend) that `planned_multi_lora_linear` takes. Callers that repeat the same routing and shapes
    every step (the segmented LoRA layers) prepare once per routing and input, then call the planned op."""
    _validate_tensors(x2, weight, bias, lora_a, lora_b)
    plan = _validate_segments(seg_indptr, seg_adapter, seg_scale, x2.reshape(-1, weight.shape[1]).shape[0],
                              lora_a.shape[0])
    return plan, _resolve_backend(backend, x2)


def multi_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    seg_indptr: IntSequence,
    seg_adapter: IntSequence,
    seg_scale: Optional[FloatSequence] = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Linear layer with a per-segment LoRA adapter: y = x W^T + b + scale_s (x A_a^T) B_a^T.

    Args:
        x: [M, K] or [..., K] (leading dims flattened into rows M).
        weight: [N, K]. bias: [N] or None.
        lora_a: [A, R, K], lora_b: [A, N, R]; adapters of smaller rank are zero-padded to R.
        seg_indptr: S+1 row offsets from 0 to M (non-decreasing; empty segments allowed).
        seg_adapter: S adapter indices in [0, A), or -1 for base only.
        seg_scale: S finite floats (None = all 1).
        backend: "auto" (Triton for CUDA tensors, else torch), "triton" or "torch".
    Metadata should be Python sequences or CPU tensors: it is validated and scheduled on the host, and the small
    device tile schedule is cached per routing, so repeated calls copy nothing. On CUDA the first call per layer
    shape autotunes (times each config): warm up before capturing CUDA graphs.
    Differentiable with respect to x, lora_a, lora_b, and weight/bias when they require grad.
    """
    _validate_tensors(x, weight, bias, lora_a, lora_b)
    in_features, out_features = weight.shape[1], weight.shape[0]
    x2 = x.reshape(-1, in_features)
    plan = _validate_segments(seg_indptr, seg_adapter, seg_scale, x2.shape[0], lora_a.shape[0])
    backend = _resolve_backend(backend, x)
    y = planned_multi_lora_linear(x2, weight, bias, lora_a, lora_b, plan, backend)
    return y.reshape(*x.shape[:-1], out_features)


def multi_lora_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    seg_indptr: IntSequence,
    seg_adapter: IntSequence,
    seg_scale: Optional[FloatSequence] = None,
) -> torch.Tensor:
    """Plain out-of-place torch definition (use float64 inputs for a ground truth; autograd gives its gradients)."""
    _validate_tensors(x, weight, bias, lora_a, lora_b)
    x2 = x.reshape(-1, weight.shape[1])
    plan = _validate_segments(seg_indptr, seg_adapter, seg_scale, x2.shape[0], lora_a.shape[0])
    base = x2 @ weight.t()
    if bias is not None:
        base = base + bias
    pieces = []
    for s, adapter in enumerate(plan.adapter):
        start, end = plan.indptr[s], plan.indptr[s + 1]
        rows = base[start:end]
        if adapter >= 0:
            rows = rows + plan.scale[s] * ((x2[start:end] @ lora_a[adapter].t()) @ lora_b[adapter].t())
        pieces.append(rows)
    y = torch.cat(pieces) if pieces else base
    return y.reshape(*x.shape[:-1], weight.shape[0])
