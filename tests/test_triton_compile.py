"""Compile every Triton kernel for sm_90 with no GPU: the interpreter accepts kernels the real compiler rejects.

For each autotune config and dtype, in both the forward and the x-gradient (transposed operand) layouts, and for
both shrink placements (in-loop up to rank 64, the pre-pass kernel + main kernel at rank 128), the multi-LoRA kernels
are compiled with exactly the arguments a launch passes (specialized the way Triton's JIT
specializes them: unit strides become constants, 16-divisible values get divisibility hints). Checks: the half
precision GEMM runs on Hopper's wgmma with pipelined cp.async loads, shared memory fits an H100, and ptxas -v on
the PTX reports no register spills.

TRITON_INTERPRET=1 (set by conftest on CPU machines) turns @triton.jit into an interpreted function, so the
compile runs in a subprocess without it: this file doubles as that subprocess's script.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
H100_SHARED_MEMORY_BYTES = 227 * 1024
# SD-like layer: K=320 in, N=640 out; ranks 8 (a stride not divisible by 16) and 64.
IN_FEATURES, OUT_FEATURES, ROWS = 320, 640, 300
SPILL_PATTERN = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
REGISTER_PATTERN = re.compile(r"Used (\d+) registers")


def _variants(dtype_names):
    """(dtype, config index, rank, direction, kernel) to compile; kernel "main" or "shrink" (the pre-pass).

    Every config of every dtype: the in-loop shrink at the largest rank it is allowed (64; fp32: 32) and the
    pre-pass (main kernel and pre-pass kernel) above it (128, pos + neg adapters concatenated; fp32: 64); for fp16
    also the x-gradient layout (transposed W, B, A operands) of both, and a rank-8 forward (stride not 16-aligned).
    """
    from cgkernels.ops.multi_lora_linear import KERNEL_CONFIGS

    variants = []
    for dtype_name in dtype_names:
        half = dtype_name != "float32"
        configs = KERNEL_CONFIGS["half" if half else "fp32"]
        in_loop_rank, pre_pass_rank = (64, 128) if half else (32, 64)
        directions = ("forward", "backward") if dtype_name == "float16" else ("forward",)
        shrink_kernels_seen = set()
        for index, config in enumerate(configs):
            # The pre-pass kernel depends on the row tile, K step and stages only: compile each distinct one once.
            shrink_key = (config.block_m, config.block_k, min(config.num_stages, 3))
            for direction in directions:
                variants.append((dtype_name, index, in_loop_rank, direction, "main"))
                variants.append((dtype_name, index, pre_pass_rank, direction, "main"))
                if shrink_key not in shrink_kernels_seen:
                    variants.append((dtype_name, index, pre_pass_rank, direction, "shrink"))
            shrink_kernels_seen.add(shrink_key)
        if dtype_name == "float16":
            variants.append((dtype_name, 0, 8, "forward", "main"))
    return variants


def _compile_variant(dtype_name, config_index, rank, direction, kernel_name, workdir):
    """Compile one variant for sm_90 and inspect its PTX with Triton's own ptxas."""
    import importlib
    from dataclasses import replace

    import torch
    import triton
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend, get_ptxas

    mll = importlib.import_module("cgkernels.ops.multi_lora_linear")
    assert isinstance(mll._multi_lora_linear_kernel, triton.runtime.JITFunction), (
        "the compile subprocess must not run interpreted"
    )
    dtype = getattr(torch, dtype_name)
    # Ranks above the in-loop limit always take the pre-pass (mll._shrink_mode): compile what would run.
    config = mll.KERNEL_CONFIGS["fp32" if dtype == torch.float32 else "half"][config_index]
    shrink_mode = mll._shrink_mode(config, rank, dtype)
    config = replace(config, shrink=shrink_mode)

    # Real (small) CPU tensors with the production layouts; only their strides and alignment matter here.
    x = torch.empty(ROWS, IN_FEATURES, dtype=dtype)
    weight = torch.empty(OUT_FEATURES, IN_FEATURES, dtype=dtype)
    bias = torch.empty(OUT_FEATURES, dtype=dtype)
    lora_a = torch.empty(3, rank, IN_FEATURES, dtype=dtype)
    lora_b = torch.empty(3, OUT_FEATURES, rank, dtype=dtype)
    plan = mll._validate_segments([0, 100, 100, 170, 300], [0, -1, 2, 1], None, ROWS, 3)
    tiles, num_tiles = mll._tile_schedule(plan, config.block_m, torch.device("cpu"))
    if direction == "forward":
        operands = (x, weight, bias, lora_a, lora_b)
        y = torch.empty(ROWS, OUT_FEATURES, dtype=dtype)
    else:  # the x-gradient launch: dy with W^T, B^T, A^T as strided views, as in the autograd backward
        grad_y = torch.empty(ROWS, OUT_FEATURES, dtype=dtype)
        operands = (grad_y, weight.t(), None, lora_b.transpose(1, 2), lora_a.transpose(1, 2))
        y = torch.empty(ROWS, IN_FEATURES, dtype=dtype)
    shrink = torch.empty(ROWS, mll._rank_pad(rank), dtype=dtype) if shrink_mode == "pre-pass" else None
    if kernel_name == "main":
        kernel = mll._multi_lora_linear_kernel
        _, args, constexprs, options = mll._kernel_launch_spec(*operands, y, tiles, num_tiles, config, shrink=shrink)
    else:
        kernel = mll._lora_shrink_kernel
        _, args, constexprs, options = mll._shrink_launch_spec(operands[0], operands[3], shrink, tiles, num_tiles,
                                                               config)

    signature, attrs, constants = {}, {}, dict(constexprs)
    unspecialized = {kernel.arg_names[i] if isinstance(i, int) else i for i in kernel.do_not_specialize}
    for position, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        arg_type, hint = native_specialize_impl(CUDABackend, args[name], False, name not in unspecialized, True)
        signature[name] = arg_type
        if arg_type == "constexpr":
            constants[name] = hint
        elif hint:
            attrs[(position,)] = CUDABackend.parse_attr(hint)
    source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)

    ptx = compiled.asm["ptx"]
    tag = f"{dtype_name}-{config_index}-r{rank}-{direction}-{kernel_name}"
    ptx_path = Path(workdir) / f"{tag}.ptx"
    ptx_path.write_text(ptx)
    ptxas = subprocess.run(
        [get_ptxas(90).path, "-v", "-arch=sm_90a", str(ptx_path), "-o", str(ptx_path.with_suffix(".cubin"))],
        capture_output=True, text=True,
    )
    spills = SPILL_PATTERN.findall(ptxas.stderr)
    registers = REGISTER_PATTERN.findall(ptxas.stderr)
    return dict(
        tag=tag, dtype=dtype_name, config=repr(config), rank=rank, direction=direction, kernel=kernel_name,
        ptxas_returncode=ptxas.returncode, ptxas_log=ptxas.stderr[-2000:],
        spill_stores=int(spills[0][0]) if spills else None, spill_loads=int(spills[0][1]) if spills else None,
        registers=int(registers[0]) if registers else None,
        wgmma=ptx.count("wgmma.mma_async"), cp_async=ptx.count("cp.async"), shared=compiled.metadata.shared,
    )


def _run_compile_subprocesses(tmp_path, groups):
    """One subprocess per dtype group, in parallel, each without TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when unset; 1 is its current default
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    processes = [
        subprocess.Popen(
            [sys.executable, __file__, ",".join(group), str(tmp_path)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT,
        )
        for group in groups
    ]
    results = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, f"compile subprocess failed:\n{stderr[-4000:]}"
        results.extend(json.loads(line) for line in stdout.splitlines() if line.startswith("{"))
    return results


@pytest.fixture(scope="module")
def compiled_variants(tmp_path_factory):
    pytest.importorskip("triton")
    groups = [["float16"], ["bfloat16", "float32"]]  # about the same number of compiles each
    results = _run_compile_subprocesses(tmp_path_factory.mktemp("ptx"), groups)
    assert len(results) == len(_variants([name for group in groups for name in group]))
    return results


def test_every_config_compiles_without_spills(compiled_variants):
    for result in compiled_variants:
        assert result["ptxas_returncode"] == 0, f"{result['tag']}: ptxas failed\n{result['ptxas_log']}"
        assert result["spill_stores"] is not None, f"{result['tag']}: no spill report in\n{result['ptxas_log']}"
        assert (result["spill_stores"], result["spill_loads"]) == (0, 0), (
            f"{result['tag']} spills ({result['spill_stores']} B stores, {result['spill_loads']} B loads, "
            f"{result['registers']} registers): shrink the tile"
        )
        assert result["shared"] <= H100_SHARED_MEMORY_BYTES, f"{result['tag']}: {result['shared']} B shared memory"


def test_half_precision_gemm_uses_wgmma_and_pipelined_loads(compiled_variants):
    half = [r for r in compiled_variants if r["dtype"] in ("float16", "bfloat16")]
    assert half
    for result in half:
        # Base GEMM + shrink in the loop of the adapter branch, base GEMM in the base-only branch, expand after.
        assert result["wgmma"] > 0, f"{result['tag']}: no wgmma in the PTX"
        assert result["cp_async"] > 0, f"{result['tag']}: operand loads are not pipelined (no cp.async)"


def test_rank_128_is_covered_by_both_kernels(compiled_variants):
    for dtype in ("float16", "bfloat16"):
        kernels = {r["kernel"] for r in compiled_variants if r["dtype"] == dtype and r["rank"] == 128}
        assert kernels == {"main", "shrink"}, f"{dtype}: rank 128 compiled for {kernels}"


def test_fp32_compiles_to_exact_fma_path(compiled_variants):
    fp32 = [r for r in compiled_variants if r["dtype"] == "float32"]
    assert fp32
    for result in fp32:
        # input_precision="ieee": fp32 must not be rounded to tf32 on the tensor cores.
        assert result["wgmma"] == 0, f"{result['tag']}: fp32 went through tf32 wgmma"


if __name__ == "__main__":
    # Subprocess entry point: python tests/test_triton_compile.py DTYPE[,DTYPE...] WORKDIR -> one JSON line each.
    sys.path.insert(0, str(REPO_ROOT))
    for variant in _variants(sys.argv[1].split(",")):
        print(json.dumps(_compile_variant(*variant, sys.argv[2])), flush=True)
