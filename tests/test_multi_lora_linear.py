"""multi_lora_linear against a float64 reference: both backends (Triton through the interpreter on CPU)."""
import importlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cgkernels.ops import multi_lora_linear, multi_lora_linear_reference

# The package re-exports the function under the module's name, so fetch the module itself for its internals.
mll = importlib.import_module("cgkernels.ops.multi_lora_linear")

# Relative to the largest reference magnitude. fp32 meets 1e-5; halves are limited by their 8/11-bit mantissas.
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}
GRAD_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 4e-2}

# A layout that exercises everything at once: a segment straddling row blocks, an empty segment, base-only rows,
# an adapter used twice with different scales, negative and zero scales.
M_SMALL = 70
LAYOUT = dict(
    seg_indptr=[0, 13, 13, 40, 41, 58, 70],
    seg_adapter=[1, 0, -1, 2, 1, 0],
    seg_scale=[0.75, 3.0, 1.0, -1.5, 2.0, 0.0],
)


def make_inputs(m, n, k, ranks, dtype, device, *, bias=True, lead=(), seed=0):
    """Fresh random operands; adapter i has true rank ranks[i], zero-padded to max(ranks)."""
    gen = torch.Generator().manual_seed(seed)
    rank = max(ranks)

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale

    x = rand(*lead, m, k)
    weight = rand(n, k, scale=k**-0.5)
    lora_a = rand(len(ranks), rank, k, scale=k**-0.5)
    lora_b = rand(len(ranks), n, rank, scale=rank**-0.5)
    for i, true_rank in enumerate(ranks):
        lora_a[i, true_rank:] = 0
        lora_b[i, :, true_rank:] = 0
    tensors = [x, weight, rand(n) if bias else None, lora_a, lora_b]
    return [None if t is None else t.to(dtype=dtype, device=device) for t in tensors]


def reference_of(tensors, **layout):
    """Float64 reference on exactly the (rounded) operands the op sees."""
    as64 = [None if t is None else t.detach().cpu().double() for t in tensors]
    return multi_lora_linear_reference(*as64, **layout)


def assert_close_rel(actual, expected, tol, what="output"):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    err = (actual.detach().cpu().double() - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert scale > 0, f"{what}: degenerate all-zero reference"
    assert err <= tol * scale, f"{what}: max error {err:.3e} > {tol:.0e} x max|ref| {scale:.3e}"


BACKEND_DTYPES = [
    ("torch", torch.float64),
    ("torch", torch.float32),
    ("torch", torch.float16),
    ("torch", torch.bfloat16),
    ("triton", torch.float32),
    ("triton", torch.float16),
    ("triton", torch.bfloat16),
]


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
def test_forward_matches_reference(device, backend, dtype):
    # Odd sizes everywhere; different true ranks per adapter.
    n, k = (33, 45) if backend == "triton" else (97, 131)
    tensors = make_inputs(M_SMALL, n, k, ranks=[5, 8, 3], dtype=dtype, device=device)
    y = multi_lora_linear(*tensors, **LAYOUT, backend=backend)
    assert y.dtype == dtype and y.device == device
    assert_close_rel(y, reference_of(tensors, **LAYOUT), TOLERANCE[dtype])


@pytest.mark.parametrize(
    "backend,rank",
    [(backend, r) for backend in ("torch", "triton") for r in (1, 4, 8, 16, 64)],
)
def test_ranks(device, backend, rank):
    # Every adapter but the last uses a smaller true rank than the padded R.
    ranks = [rank, max(1, rank // 2), max(1, rank - 1)]
    n, k = (40, 48) if backend == "triton" else (64, 96)
    tensors = make_inputs(M_SMALL, n, k, ranks=ranks, dtype=torch.float32, device=device, seed=rank)
    y = multi_lora_linear(*tensors, **LAYOUT, backend=backend)
    assert_close_rel(y, reference_of(tensors, **LAYOUT), TOLERANCE[torch.float32])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_leading_dims_no_bias_default_scale(device, backend):
    tensors = make_inputs(35, 24, 40, ranks=[4, 4], dtype=torch.float32, device=device, bias=False, lead=(2,))
    layout = dict(seg_indptr=[0, 35, 70], seg_adapter=[0, 1])  # seg_scale None = 1
    y = multi_lora_linear(*tensors, **layout, backend=backend)
    assert y.shape == (2, 35, 24)
    assert_close_rel(y, reference_of(tensors, **layout), TOLERANCE[torch.float32])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_metadata_as_cpu_tensors(device, backend):
    tensors = make_inputs(M_SMALL, 20, 24, ranks=[4, 4, 4], dtype=torch.float32, device=device)
    y_list = multi_lora_linear(*tensors, **LAYOUT, backend=backend)
    y_tensor = multi_lora_linear(
        *tensors,
        torch.tensor(LAYOUT["seg_indptr"], dtype=torch.int32),
        torch.tensor(LAYOUT["seg_adapter"]),
        torch.tensor(LAYOUT["seg_scale"], dtype=torch.float64),
        backend=backend,
    )
    torch.testing.assert_close(y_tensor, y_list, rtol=0, atol=0)



class _IndexLike(int):
    """An int subclass (like numpy's integers): accepted, but not the plain-int fast path of the metadata check."""


def test_metadata_int_like_values_and_int_scales():
    tensors = make_inputs(M_SMALL, 20, 24, ranks=[4, 4, 4], dtype=torch.float32, device="cpu")
    y_plain = multi_lora_linear(*tensors, **LAYOUT, backend="torch")
    y_int_like = multi_lora_linear(
        *tensors,
        tuple(_IndexLike(i) for i in LAYOUT["seg_indptr"]),
        [_IndexLike(a) for a in LAYOUT["seg_adapter"]],
        [int(s) if s == int(s) else s for s in LAYOUT["seg_scale"]],  # integral scales given as ints
        backend="torch",
    )
    torch.testing.assert_close(y_int_like, y_plain, rtol=0, atol=0)

@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_all_base_only_and_zero_rows(device, backend):
    tensors = make_inputs(21, 18, 20, ranks=[2], dtype=torch.float32, device=device)
    layout = dict(seg_indptr=[0, 0, 21, 21], seg_adapter=[0, -1, 0])
    assert_close_rel(multi_lora_linear(*tensors, **layout, backend=backend), reference_of(tensors, **layout), 1e-5)

    empty = make_inputs(0, 18, 20, ranks=[2], dtype=torch.float32, device=device)
    y = multi_lora_linear(*empty, seg_indptr=[0, 0], seg_adapter=[0], backend=backend)
    assert y.shape == (0, 18)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_half_rank_64(triton_device, dtype):
    tensors = make_inputs(M_SMALL, 40, 48, ranks=[64, 17, 1], dtype=dtype, device=triton_device, seed=5)
    y = multi_lora_linear(*tensors, **LAYOUT, backend="triton")
    assert_close_rel(y, reference_of(tensors, **LAYOUT), TOLERANCE[dtype])


def test_triton_small_tiles_and_grouped_order(triton_device):
    # 16-row tiles: segments straddle many tiles; several column blocks exercise the grouped program order.
    tensors = make_inputs(M_SMALL, 47, 33, ranks=[3, 6, 6], dtype=torch.float32, device=triton_device)
    with mll.force_kernel_config(mll.KernelConfig(16, 16, 16, group_m=3, num_warps=4, num_stages=2)):
        y = multi_lora_linear(*tensors, **LAYOUT, backend="triton")
    assert_close_rel(y, reference_of(tensors, **LAYOUT), TOLERANCE[torch.float32])


def test_tile_schedule_covers_rows_once_and_is_cached():
    plan = mll._validate_segments(LAYOUT["seg_indptr"], LAYOUT["seg_adapter"], LAYOUT["seg_scale"], M_SMALL, 3)
    tiles, num_tiles = mll._tile_schedule(plan, 16, torch.device("cpu"))
    covered = []
    for row_start, row_end, adapter, _ in tiles.tolist():
        assert 0 < row_end - row_start <= 16
        segment = next(s for s in range(len(plan.adapter)) if plan.indptr[s] <= row_start < plan.indptr[s + 1])
        assert row_end <= plan.indptr[segment + 1], "a tile must not cross a segment boundary"
        # A zero-scaled adapter segment runs as base only.
        assert adapter == (-1 if plan.scale[segment] == 0 else plan.adapter[segment])
        covered.extend(range(row_start, row_end))
    assert covered == list(range(M_SMALL))
    # Scales travel as float32 bits in the int32 table.
    assert tiles[:, 3].view(torch.float32)[0].item() == pytest.approx(0.75)
    again, _ = mll._tile_schedule(plan, 16, torch.device("cpu"))
    assert again is tiles, "the schedule for repeated routing must come from the cache (no new host-to-device copy)"


# ----------------------------------------------------------------------------------------------------------------
# Gradients
# ----------------------------------------------------------------------------------------------------------------
GRAD_CASES = [
    ("torch", torch.float64),
    ("torch", torch.float32),
    ("torch", torch.bfloat16),
    ("triton", torch.float32),
    ("triton", torch.float16),
]


@pytest.mark.parametrize("train_base", [False, True], ids=["frozen_base", "train_base"])
@pytest.mark.parametrize("backend,dtype", GRAD_CASES)
def test_gradients_match_reference_autograd(device, backend, dtype, train_base):
    n, k = (33, 45) if backend == "triton" else (57, 83)
    tensors = make_inputs(M_SMALL, n, k, ranks=[5, 8, 3], dtype=dtype, device=device, seed=7)
    trainable = [True, train_base, train_base, True, True]
    leaves = [t.clone().requires_grad_(flag) for t, flag in zip(tensors, trainable)]
    grad_y = torch.randn(M_SMALL, n, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    y = multi_lora_linear(*leaves, **LAYOUT, backend=backend)
    y.backward(grad_y.to(dtype=dtype, device=device))

    ref_leaves = [t.detach().cpu().double().requires_grad_(flag) for t, flag in zip(tensors, trainable)]
    multi_lora_linear_reference(*ref_leaves, **LAYOUT).backward(grad_y)
    for name, leaf, ref in zip(["x", "weight", "bias", "lora_a", "lora_b"], leaves, ref_leaves):
        if not ref.requires_grad:
            assert leaf.grad is None, f"{name} is frozen but got a gradient"
            continue
        assert leaf.grad.dtype == dtype
        assert_close_rel(leaf.grad, ref.grad, GRAD_TOLERANCE[dtype], what=f"grad {name}")


def test_gradient_flows_through_leading_dims_and_scale_zero():
    # Scale 0 segments must give zero LoRA gradients for their rows but still pass dx through the base.
    tensors = make_inputs(8, 6, 10, ranks=[3], dtype=torch.float64, device="cpu", lead=(2,))
    leaves = [t.clone().requires_grad_() for t in tensors]
    layout = dict(seg_indptr=[0, 16], seg_adapter=[0], seg_scale=[0.0])
    multi_lora_linear(*leaves, **layout, backend="torch").sum().backward()
    assert leaves[3].grad.abs().max() == 0 and leaves[4].grad.abs().max() == 0
    torch.testing.assert_close(leaves[0].grad, leaves[1].sum(0).expand(2, 8, 10))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "trainable",
    [("x",), ("lora_a",), ("lora_b",), ("x", "lora_b"), ("lora_a", "lora_b"), ("weight", "bias")],
    ids=lambda names: "+".join(names),
)
def test_torch_backend_gradients_for_any_subset_of_inputs(dtype, trainable):
    # The torch backward shares dy B_a between dx and dA and reuses the forward's shrink for dB: each of those
    # shortcuts must hold whichever inputs need a gradient.
    names = ["x", "weight", "bias", "lora_a", "lora_b"]
    tensors = make_inputs(M_SMALL, 29, 37, ranks=[5, 8, 3], dtype=dtype, device="cpu", seed=5)
    leaves = [t.clone().requires_grad_(name in trainable) for name, t in zip(names, tensors)]
    grad_y = torch.randn(M_SMALL, 29, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    multi_lora_linear(*leaves, **LAYOUT, backend="torch").backward(grad_y.to(dtype))

    ref_leaves = [t.detach().double().requires_grad_(name in trainable) for name, t in zip(names, tensors)]
    multi_lora_linear_reference(*ref_leaves, **LAYOUT).backward(grad_y)
    for name, leaf, ref in zip(names, leaves, ref_leaves):
        if name in trainable:
            assert leaf.grad.dtype == dtype
            assert_close_rel(leaf.grad, ref.grad, GRAD_TOLERANCE[dtype], what=f"grad {name}")
        else:
            assert leaf.grad is None, f"{name} is frozen but got a gradient"


def test_torch_gradcheck_float64():
    tensors = make_inputs(9, 5, 7, ranks=[2, 3], dtype=torch.float64, device="cpu", seed=11)
    leaves = tuple(t.clone().requires_grad_() for t in tensors)
    layout = dict(seg_indptr=[0, 4, 4, 9], seg_adapter=[1, 0, 0], seg_scale=[0.5, 1.0, -2.0])
    assert torch.autograd.gradcheck(lambda *ts: multi_lora_linear(*ts, **layout, backend="torch"), leaves)


# ----------------------------------------------------------------------------------------------------------------
# Hypothesis shape fuzzing
# ----------------------------------------------------------------------------------------------------------------
@st.composite
def problems(draw, max_rows, max_features, max_rank):
    segment_lengths = draw(st.lists(st.integers(0, max_rows // 3), min_size=1, max_size=4))
    num_segments, num_adapters = len(segment_lengths), draw(st.integers(1, 3))
    return dict(
        lengths=segment_lengths,
        n=draw(st.integers(1, max_features)),
        k=draw(st.integers(1, max_features)),
        ranks=draw(st.lists(st.integers(1, max_rank), min_size=num_adapters, max_size=num_adapters)),
        adapters=draw(st.lists(st.integers(-1, num_adapters - 1), min_size=num_segments, max_size=num_segments)),
        scales=draw(st.lists(st.floats(-2, 2), min_size=num_segments, max_size=num_segments)),
        bias=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


def _check_problem(problem, backend, device):
    indptr = [0]
    for length in problem["lengths"]:
        indptr.append(indptr[-1] + length)
    tensors = make_inputs(
        indptr[-1], problem["n"], problem["k"], problem["ranks"], torch.float32, device,
        bias=problem["bias"], seed=problem["seed"],
    )
    layout = dict(seg_indptr=indptr, seg_adapter=problem["adapters"], seg_scale=problem["scales"])
    y = multi_lora_linear(*tensors, **layout, backend=backend)
    expected = reference_of(tensors, **layout)
    if expected.numel() and expected.abs().max() > 0:
        assert_close_rel(y, expected, 2e-5)
    else:
        assert y.shape == expected.shape


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(problem=problems(max_rows=120, max_features=80, max_rank=20))
def test_fuzz_torch_backend(device, problem):
    _check_problem(problem, "torch", device)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(problem=problems(max_rows=60, max_features=40, max_rank=17))
def test_fuzz_triton_backend(triton_device, problem):
    _check_problem(problem, "triton", triton_device)


# ----------------------------------------------------------------------------------------------------------------
# Bad input: rejected on the host, before any kernel runs
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture
def no_kernels(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a kernel ran on invalid input")

    monkeypatch.setitem(mll._FORWARDS, "torch", forbidden)
    monkeypatch.setitem(mll._FORWARDS, "triton", forbidden)


BAD_METADATA = [
    (dict(seg_indptr=[0, 5, 10], seg_adapter=[0]), ValueError, "seg_indptr must have"),
    (dict(seg_indptr=[0, 10], seg_adapter=[0], seg_scale=[1.0, 2.0]), ValueError, "seg_scale must have"),
    (dict(seg_indptr=[1, 10], seg_adapter=[0]), ValueError, "start at 0"),
    (dict(seg_indptr=[0, 9], seg_adapter=[0]), ValueError, "end at the number of rows"),
    (dict(seg_indptr=[0, 11], seg_adapter=[0]), ValueError, "end at the number of rows"),
    (dict(seg_indptr=[0, 6, 4, 10], seg_adapter=[0, 0, 0]), ValueError, "non-decreasing"),
    (dict(seg_indptr=[0, 10], seg_adapter=[2]), ValueError, "out of range"),
    (dict(seg_indptr=[0, 10], seg_adapter=[-2]), ValueError, "out of range"),
    (dict(seg_indptr=[0, 10], seg_adapter=[0], seg_scale=[float("nan")]), ValueError, "not finite"),
    (dict(seg_indptr=[0, 10], seg_adapter=[0], seg_scale=[float("inf")]), ValueError, "not finite"),
    (dict(seg_indptr=[0.0, 10.0], seg_adapter=[0]), TypeError, "must be an integer"),
    (dict(seg_indptr=[0, 10], seg_adapter=[True]), TypeError, "must be an integer"),
    (dict(seg_indptr=[0, 10], seg_adapter=[0], seg_scale=["1"]), TypeError, "must be a real number"),
    (dict(seg_indptr=torch.tensor([0.0, 10.0]), seg_adapter=[0]), TypeError, "integer dtype"),
    (dict(seg_indptr=torch.tensor([[0, 10]]), seg_adapter=[0]), ValueError, "1-D"),
    (dict(seg_indptr="0,10", seg_adapter=[0]), TypeError, "sequence"),
    # A device tensor (here on the meta device, standing in for CUDA) would cost a sync per call.
    (dict(seg_indptr=torch.tensor([0, 10], device="meta"), seg_adapter=[0]), ValueError, "host metadata"),
]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("layout,error,message", BAD_METADATA)
def test_bad_metadata_raises_before_kernel(no_kernels, backend, layout, error, message):
    tensors = make_inputs(10, 6, 8, ranks=[2, 2], dtype=torch.float32, device="cpu")
    with pytest.raises(error, match=message):
        multi_lora_linear(*tensors, **layout, backend=backend)


def _bad_tensors():
    good = make_inputs(10, 6, 8, ranks=[2, 2], dtype=torch.float32, device="cpu")
    x, w, b, a, bb = good
    return [
        ((x[:, :7], w, b, a, bb), ValueError, "input features"),
        ((x, w.t(), b, a, bb), ValueError, "input features"),
        ((x, w, b[:5], a, bb), ValueError, "bias must be"),
        ((x, w, b, a[:, :, :7], bb), ValueError, "lora_a must be"),
        ((x, w, b, a, bb[:1]), ValueError, "lora_b must be"),
        ((x, w, b, a[:, :0], bb[:, :, :0]), ValueError, "rank R >= 1"),
        ((x, w.double(), b, a, bb), TypeError, "weight dtype"),
        ((x, w, b, a.half(), bb), TypeError, "lora_a dtype"),
        ((x.long(), w, b, a, bb), TypeError, "x must be"),
        ((x, w.to("meta"), b, a, bb), ValueError, "weight is on"),
        ((x, w, b, a.tolist(), bb), TypeError, "lora_a must be a torch.Tensor"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_tensors())))
def test_bad_tensors_raise_before_kernel(no_kernels, case):
    tensors, error, message = _bad_tensors()[case]
    with pytest.raises(error, match=message):
        multi_lora_linear(*tensors, seg_indptr=[0, 10], seg_adapter=[0], backend="torch")


def test_bad_backend_choices(no_kernels):
    tensors = make_inputs(10, 6, 8, ranks=[2], dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="backend must be"):
        multi_lora_linear(*tensors, [0, 10], [0], backend="cuda")
    as64 = [t.double() for t in tensors]
    with pytest.raises(TypeError, match="backend='triton' supports"):
        multi_lora_linear(*as64, [0, 10], [0], backend="triton")


def test_triton_backend_on_cpu_needs_the_interpreter(monkeypatch, no_kernels):
    monkeypatch.setattr(mll, "_is_interpreted", lambda: False)
    tensors = make_inputs(10, 6, 8, ranks=[2], dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        multi_lora_linear(*tensors, [0, 10], [0], backend="triton")


def test_auto_backend_uses_torch_on_cpu(monkeypatch):
    calls = []
    monkeypatch.setitem(mll._FORWARDS, "torch", lambda *args: calls.append("torch") or mll._torch_forward(*args))
    tensors = make_inputs(10, 6, 8, ranks=[2], dtype=torch.float32, device="cpu")
    multi_lora_linear(*tensors, [0, 10], [0])
    assert calls == ["torch"]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_auto_backend_autotunes_and_caches_schedule(dtype):
    # A realistic layer (6 branches x 300 tokens, SD1.5 widths, grouped by mix as the patch emits them: base, pos,
    # neg): autotuned Triton path, schedule reused per call.
    device = torch.device("cuda")
    layout = dict(seg_indptr=[0, 600, 1200, 1800], seg_adapter=[-1, 0, 1], seg_scale=[1.0, 0.8, 0.8])
    tensors = make_inputs(1800, 320, 320, ranks=[8, 8], dtype=dtype, device=device)
    y = multi_lora_linear(*tensors, **layout)
    assert_close_rel(y, reference_of(tensors, **layout), TOLERANCE[dtype])
    cache_size = len(mll._tile_cache)
    multi_lora_linear(*tensors, **layout)
    assert len(mll._tile_cache) == cache_size, "a repeated routing must not build a new tile schedule"


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_strided_bias_matches_reference_on_both_backends(device, backend):
    torch.manual_seed(7)
    m, k, n, r = 37, 24, 20, 4
    x, weight = torch.randn(m, k), torch.randn(n, k)
    bias = torch.randn(2 * n)[::2]  # a strided view
    lora_a, lora_b = torch.randn(2, r, k), torch.randn(2, n, r)
    indptr, adapters = [0, 13, 13, 37], [1, -1, 0]
    expected = multi_lora_linear_reference(
        x.double(), weight.double(), bias.double(), lora_a.double(), lora_b.double(), indptr, adapters
    )
    x, weight, lora_a, lora_b = (t.to(device) for t in (x, weight, lora_a, lora_b))
    out = multi_lora_linear(x, weight, bias.to(device), lora_a, lora_b, indptr, adapters, backend=backend)
    assert not bias.to(device).is_contiguous()
    torch.testing.assert_close(out.double().cpu(), expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Shrink placement (in-loop / pre-pass), autotune key, automatic backend choice
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shrink", mll.SHRINK_MODES)
@pytest.mark.parametrize("dtype,rank", [(torch.float32, 5), (torch.float16, 128), (torch.bfloat16, 100)])
def test_shrink_placements_match_reference(triton_device, shrink, dtype, rank):
    # 16-row tiles: segments straddle tiles, one is empty, one adapter serves two segments with different scales.
    tensors = make_inputs(M_SMALL, 33, 45, ranks=[rank, 3, rank - 1], dtype=dtype, device=triton_device, seed=rank)
    with mll.force_kernel_config(mll.KernelConfig(16, 16, 16, group_m=3, shrink=shrink)):
        y = multi_lora_linear(*tensors, **LAYOUT, backend="triton")
    assert_close_rel(y, reference_of(tensors, **LAYOUT), TOLERANCE[dtype])


@pytest.mark.parametrize("shrink", mll.SHRINK_MODES)
def test_shrink_placements_gradients(triton_device, shrink):
    tensors = make_inputs(M_SMALL, 33, 45, ranks=[5, 8, 3], dtype=torch.float16, device=triton_device, seed=9)
    leaves = [t.clone().requires_grad_(flag) for t, flag in zip(tensors, [True, False, False, True, True])]
    grad_y = torch.randn(M_SMALL, 33, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    with mll.force_kernel_config(mll.KernelConfig(16, 16, 16, group_m=3, shrink=shrink)):
        multi_lora_linear(*leaves, **LAYOUT, backend="triton").backward(grad_y.to(torch.float16).to(triton_device))
    ref_leaves = [t.detach().cpu().double().requires_grad_(leaf.requires_grad) for t, leaf in zip(tensors, leaves)]
    multi_lora_linear_reference(*ref_leaves, **LAYOUT).backward(grad_y)
    for name, leaf, ref in zip(["x", "weight", "bias", "lora_a", "lora_b"], leaves, ref_leaves):
        if ref.requires_grad:
            assert_close_rel(leaf.grad, ref.grad, GRAD_TOLERANCE[torch.float16], what=f"grad {name}")


def test_wide_ranks_always_take_the_pre_pass():
    in_loop = mll.KernelConfig(64, 64, 32)
    assert mll._shrink_mode(in_loop, 64, torch.float16) == "in-loop"
    assert mll._shrink_mode(in_loop, 65, torch.float16) == "pre-pass"  # padded to 128
    assert mll._shrink_mode(in_loop, 33, torch.float32) == "pre-pass"
    modes = {c.shrink for c in mll._candidate_configs(torch.bfloat16, 128)}
    assert modes == {"pre-pass"}
    assert {c.shrink for c in mll._candidate_configs(torch.float16, 8)} == set(mll.SHRINK_MODES)
    with pytest.raises(ValueError, match="shrink must be"):
        mll.KernelConfig(64, 64, 32, shrink="fused")


def test_autotune_key_separates_row_counts_but_not_within_a_bucket():
    weight, lora_a = torch.empty(320, 768), torch.empty(2, 8, 768)

    def key(rows):
        return mll._autotune_key(torch.empty(rows, 768), weight, None, lora_a)

    assert key(462) != key(24576)  # text rows vs image rows of one layer shape
    assert key(400) == key(462)
    assert key(1) == key(16)


def test_auto_backend_routes_fp32_cuda_to_torch(monkeypatch):
    from types import SimpleNamespace

    monkeypatch.setattr(mll, "_is_interpreted", lambda: False)
    for dtype, expected in ((torch.float16, True), (torch.bfloat16, True), (torch.float32, False)):
        assert mll._auto_uses_triton(SimpleNamespace(is_cuda=True, dtype=dtype)) is expected


GUIDANCE_LAYOUTS = {
    # What the patch emits for contrastive guidance (guidance.row_plan groups rows by mix): [b(u), b(c) | p(u), p(c) |
    # n(u), n(c)], here one segment per branch as a caller might pass them: neighbours merge into one run per adapter.
    "grouped": dict(seg_indptr=[0, 11, 22, 33, 44, 55, 66], seg_adapter=[-1, -1, 0, 0, 1, 1], seg_scale=[1.5] * 6),
    # Stress cases no caller emits: branches interleaved [b, +pos, +neg] x [uncond, cond] (two runs per adapter),
    # with one scale and with per-branch scales.
    "interleaved": dict(seg_indptr=[0, 11, 22, 33, 44, 55, 66], seg_adapter=[-1, 0, 1, -1, 0, 1], seg_scale=[1.5] * 6),
    "interleaved-scales-differ": dict(seg_indptr=[0, 11, 22, 33, 44, 55, 66], seg_adapter=[-1, 0, 1, -1, 0, 1],
                                      seg_scale=[1.0, 0.5, -2.0, 1.0, 0.5, 1.25]),
}


def test_grouped_layout_gives_one_run_per_adapter():
    layout = GUIDANCE_LAYOUTS["grouped"]
    plan = mll._validate_segments(layout["seg_indptr"], layout["seg_adapter"], layout["seg_scale"], 66, 2)
    assert plan.runs() == ((0, 22, -1, 0.0), (22, 44, 0, 1.5), (44, 66, 1, 1.5))


@pytest.mark.parametrize("layout", list(GUIDANCE_LAYOUTS))
@pytest.mark.parametrize("backend,dtype", [("torch", torch.float64), ("torch", torch.float32), ("triton", torch.float16)])
def test_gradients_of_guidance_layouts(device, backend, dtype, layout):
    layout = GUIDANCE_LAYOUTS[layout]
    tensors = make_inputs(66, 29, 37, ranks=[6, 4], dtype=dtype, device=device, seed=13)
    leaves = [t.clone().requires_grad_(flag) for t, flag in zip(tensors, [True, False, False, True, True])]
    grad_y = torch.randn(66, 29, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    multi_lora_linear(*leaves, **layout, backend=backend).backward(grad_y.to(dtype).to(device))
    ref_leaves = [t.detach().cpu().double().requires_grad_(leaf.requires_grad) for t, leaf in zip(tensors, leaves)]
    multi_lora_linear_reference(*ref_leaves, **layout).backward(grad_y)
    for name, leaf, ref in zip(["x", "weight", "bias", "lora_a", "lora_b"], leaves, ref_leaves):
        if ref.requires_grad:
            assert_close_rel(leaf.grad, ref.grad, GRAD_TOLERANCE[dtype], what=f"grad {name}")


# ----------------------------------------------------------------------------------------------------------------
# The torch.library op (what torch.compile sees)
# ----------------------------------------------------------------------------------------------------------------
def _op_args(tensors, backend, layout=LAYOUT):
    return (*tensors, list(layout["seg_indptr"]), list(layout["seg_adapter"]), list(layout["seg_scale"]), backend)


@pytest.mark.parametrize("backend,dtype,train_base", [("torch", torch.float64, True), ("torch", torch.float32, False),
                                                     ("triton", torch.float32, True)])
def test_opcheck_with_gradients(backend, dtype, train_base, device):
    tensors = make_inputs(M_SMALL, 9, 11, ranks=[3, 4, 2], dtype=dtype, device=device, seed=13)
    trainable = [True, train_base, train_base, True, True]
    leaves = [t.clone().requires_grad_(flag) for t, flag in zip(tensors, trainable)]
    result = torch.library.opcheck(torch.ops.cgkernels.multi_lora_linear.default, _op_args(leaves, backend))
    assert set(result.values()) == {"SUCCESS"}, result


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_op_autograd_matches_reference(backend, device):
    """The op's registered autograd (used under torch.compile) against float64 autograd of the reference."""
    dtype = torch.float32
    tensors = make_inputs(M_SMALL, 13, 17, ranks=[5, 8, 3], dtype=dtype, device=device, seed=17)
    leaves = [t.clone().requires_grad_() for t in tensors]
    grad_y = torch.randn(M_SMALL, 13, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    y = torch.ops.cgkernels.multi_lora_linear(*_op_args(leaves, backend))
    y.backward(grad_y.to(dtype).to(device))
    ref_leaves = [t.detach().cpu().double().requires_grad_() for t in tensors]
    ref = multi_lora_linear_reference(*ref_leaves, **LAYOUT)
    ref.backward(grad_y)
    assert_close_rel(y, ref.detach(), TOLERANCE[dtype])
    for name, leaf, ref_leaf in zip(["x", "weight", "bias", "lora_a", "lora_b"], leaves, ref_leaves):
        assert_close_rel(leaf.grad, ref_leaf.grad, GRAD_TOLERANCE[dtype], what=f"grad {name}")


def _compile_counting_breaks(fn, backend):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    return torch.compile(fn, fullgraph=True, backend=backend), lambda: sum(counters["graph_break"].values())


def test_compiles_fullgraph_forward_and_backward():
    """One opaque node under torch.compile (aot_eager: fake implementation, functionalized registered backward):
    no graph break, values and gradients as the float64 reference."""
    dtype = torch.float32
    x, weight, bias, lora_a, lora_b = make_inputs(M_SMALL, 13, 17, ranks=[5, 8, 3], dtype=dtype, device="cpu",
                                                  seed=19)
    x = x.reshape(2, 35, 17)
    leaves = [t.clone().requires_grad_() for t in (x, lora_a, lora_b)]

    def step(x, lora_a, lora_b):
        return multi_lora_linear(x, weight, bias, lora_a, lora_b, **LAYOUT).square().sum()

    compiled, graph_breaks = _compile_counting_breaks(step, "aot_eager")
    loss = compiled(*leaves)
    loss.backward()
    assert graph_breaks() == 0
    ref_leaves = [t.detach().double().requires_grad_() for t in (x, lora_a, lora_b)]
    ref_loss = multi_lora_linear_reference(ref_leaves[0], weight.double(), bias.double(), ref_leaves[1],
                                           ref_leaves[2], **LAYOUT).square().sum()
    ref_loss.backward()
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * abs(ref_loss.item())
    for name, leaf, ref_leaf in zip(["x", "lora_a", "lora_b"], leaves, ref_leaves):
        assert_close_rel(leaf.grad, ref_leaf.grad, GRAD_TOLERANCE[dtype], what=f"grad {name}")
    torch._dynamo.reset()


def test_inductor_keeps_the_op_opaque():
    """Inductor lowers the op as one extern call (inference: the graph is the op alone, so no C++ is compiled)."""
    tensors = make_inputs(M_SMALL, 13, 17, ranks=[5, 8, 3], dtype=torch.float32, device="cpu", seed=29)
    compiled, graph_breaks = _compile_counting_breaks(
        lambda *ts: multi_lora_linear(*ts, **LAYOUT), "inductor"
    )
    with torch.no_grad():
        y = compiled(*tensors)
    assert graph_breaks() == 0
    assert_close_rel(y, reference_of(tensors, **LAYOUT), TOLERANCE[torch.float32])
    torch._dynamo.reset()


def test_op_validates_each_routing_once(monkeypatch):
    """The op body rebuilds its SegmentPlan from a cache: a repeated routing is not validated again."""
    calls = []
    validate = mll._validate_segments
    monkeypatch.setattr(mll, "_validate_segments", lambda *a: calls.append(a) or validate(*a))
    mll._plan_cache.clear()
    tensors = make_inputs(M_SMALL, 5, 6, ranks=[2, 2, 2], dtype=torch.float32, device="cpu", seed=23)
    first = torch.ops.cgkernels.multi_lora_linear(*_op_args(tensors, "torch"))
    for _ in range(3):
        torch.testing.assert_close(torch.ops.cgkernels.multi_lora_linear(*_op_args(tensors, "torch")), first)
    assert len(calls) == 1
