"""guidance_merge (C++/CUDA op) against float64 references, diffusers' rescale_noise_cfg, opcheck, torch.compile,
shape fuzzing and bad input. Runs on CPU here and on CUDA too in a GPU session (`device` fixture)."""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cgkernels.ops.guidance_merge import guidance_merge, guidance_merge_reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def random_preds(num_preds, shape, dtype, device, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((num_preds, *shape), generator=generator, dtype=torch.float64).to(dtype).to(device)


def random_coeffs(num_preds, seed=0):
    generator = torch.Generator().manual_seed(1000 + seed)
    return [float(c) for c in torch.empty(num_preds, dtype=torch.float64).uniform_(-3.0, 8.0, generator=generator)]


def assert_matches_reference(actual, preds, coeffs, rescale=0.0, ref_coeffs=None):
    """Compares to the float64 reference on the same (already rounded) inputs. The bound scales with
    |expected| + sum_k |c_k| |p_k|, the magnitude the fp32 accumulation and the final rounding work at."""
    expected = guidance_merge_reference(preds.double(), coeffs, rescale=rescale, ref_coeffs=ref_coeffs)
    magnitude = sum(abs(c) * p.double().abs() for c, p in zip(coeffs, preds.unbind(0)))
    if rescale > 0.0:  # the per-sample factor scales the accumulation error too
        plain = guidance_merge_reference(preds.double(), coeffs)
        factor = expected.abs() / plain.abs().clamp_min(1e-300)
        magnitude = magnitude * factor.clamp_min(1.0)
    assert actual.dtype == preds.dtype and actual.shape == preds.shape[1:] and actual.device == preds.device
    error = (actual.double() - expected).abs()
    bound = TOLERANCE[preds.dtype] * (expected.abs() + magnitude) + 1e-30
    worst = (error / bound).max().item() if error.numel() else 0.0
    assert worst <= 1.0, f"error exceeds the {preds.dtype} bound by {worst:.3g}x"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_preds", [1, 2, 4, 6, 9])
@pytest.mark.parametrize("shape", [(3, 5, 7, 9), (2, 4, 16, 16), (1, 13)])
def test_merge_matches_float64_reference(device, dtype, num_preds, shape):
    preds = random_preds(num_preds, shape, dtype, device, seed=num_preds)
    coeffs = random_coeffs(num_preds, seed=num_preds)
    assert_matches_reference(guidance_merge(preds, coeffs), preds, coeffs)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_preds", [1, 2, 4, 6, 9])
@pytest.mark.parametrize("rescale", [0.3, 0.7, 1.0])
@pytest.mark.parametrize("shape", [(3, 4, 7, 9), (2, 4, 16, 16)])
def test_rescale_matches_float64_reference(device, dtype, num_preds, rescale, shape):
    preds = random_preds(num_preds, shape, dtype, device, seed=7 * num_preds)
    coeffs = random_coeffs(num_preds, seed=num_preds)
    ref_coeffs = random_coeffs(num_preds, seed=50 + num_preds)
    actual = guidance_merge(preds, coeffs, rescale=rescale, ref_coeffs=ref_coeffs)
    assert_matches_reference(actual, preds, coeffs, rescale, ref_coeffs)


@pytest.mark.parametrize("num_preds", [2, 6])
@pytest.mark.parametrize("rescale", [0.0, 0.5])
def test_sequence_and_stacked_forms_agree(device, num_preds, rescale):
    preds = random_preds(num_preds, (3, 4, 11, 5), torch.float32, device, seed=3)
    coeffs = random_coeffs(num_preds)
    ref_coeffs = random_coeffs(num_preds, seed=9)
    stacked = guidance_merge(preds, coeffs, rescale=rescale, ref_coeffs=ref_coeffs)
    separate = [p.clone() for p in preds.unbind(0)]  # K independent allocations
    from_list = guidance_merge(separate, coeffs, rescale=rescale, ref_coeffs=ref_coeffs)
    from_tuple = guidance_merge(tuple(separate), coeffs, rescale=rescale, ref_coeffs=ref_coeffs)
    torch.testing.assert_close(from_list, stacked, rtol=0, atol=0)
    torch.testing.assert_close(from_tuple, stacked, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rescale", [0.0, 0.25, 0.7, 1.0])
def test_rescale_matches_diffusers_rescale_noise_cfg(device, dtype, rescale):
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    guidance_scale = 7.5
    preds = random_preds(2, (3, 4, 24, 24), dtype, device, seed=11)  # [uncond, text]
    uncond, text = preds.double().unbind(0)
    expected = rescale_noise_cfg(uncond + guidance_scale * (text - uncond), text, guidance_rescale=rescale)
    actual = guidance_merge(preds, [1.0 - guidance_scale, guidance_scale], rescale=rescale, ref_coeffs=[0.0, 1.0])
    tolerance = TOLERANCE[dtype] * expected.abs().max().item()
    torch.testing.assert_close(actual.double(), expected, rtol=TOLERANCE[dtype], atol=tolerance)


@pytest.mark.parametrize("shape, mean", [((2, 70001), 1000.0), ((257, 3, 40), 0.0)])
def test_long_rows_large_mean_and_many_rows(device, shape, mean):
    # Rows longer than one CPU task / CUDA block with |mean| >> std (a naive sum-of-squares variance would
    # cancel; the fp32 rounding of out itself only averages out over long rows), and many short rows.
    preds = random_preds(3, shape, torch.float32, device, seed=5) * 0.01 + mean
    coeffs, ref_coeffs = [0.5, 0.25, 0.25], [0.0, 1.0, 0.0]
    actual = guidance_merge(preds, coeffs, rescale=0.8, ref_coeffs=ref_coeffs)
    assert_matches_reference(actual, preds, coeffs, 0.8, ref_coeffs)
    plain = guidance_merge(preds, coeffs)
    assert_matches_reference(plain, preds, coeffs)


def test_zero_variance_sample_is_left_unrescaled(device):
    # diffusers would divide by std(out) = 0 (NaN/inf); the op keeps such a sample as is (factor 1).
    preds = random_preds(2, (3, 4, 5, 5), torch.float32, device, seed=2)
    preds[:, 1] = 0.75  # sample 1 constant in every prediction
    coeffs, ref_coeffs = [-1.0, 2.0], [0.0, 1.0]
    actual = guidance_merge(preds, coeffs, rescale=0.7, ref_coeffs=ref_coeffs)
    plain = guidance_merge(preds, coeffs)
    assert torch.isfinite(actual).all()
    torch.testing.assert_close(actual[1], plain[1], rtol=0, atol=0)
    assert_matches_reference(actual, preds, coeffs, 0.7, ref_coeffs)
    assert not torch.allclose(actual[0], plain[0])


def test_single_element_samples_are_left_unrescaled(device):
    preds = random_preds(3, (5,), torch.float32, device, seed=4)  # [K, B]: one element per sample
    coeffs, ref_coeffs = [1.0, -2.0, 0.5], [0.0, 1.0, 0.0]
    actual = guidance_merge(preds, coeffs, rescale=1.0, ref_coeffs=ref_coeffs)
    torch.testing.assert_close(actual, guidance_merge(preds, coeffs), rtol=0, atol=0)
    assert_matches_reference(actual, preds, coeffs, 1.0, ref_coeffs)


@pytest.mark.parametrize("shape", [(0, 4, 8), (3, 0, 8), (0,)])
@pytest.mark.parametrize("rescale", [0.0, 0.5])
def test_empty_batch_or_sample_gives_empty_output(device, shape, rescale):
    preds = torch.empty((2, *shape), device=device)
    out = guidance_merge(preds, [1.0, 2.0], rescale=rescale, ref_coeffs=[0.0, 1.0])
    assert out.shape == shape and out.device == preds.device


@pytest.mark.parametrize("rescale", [0.0, 0.6])
def test_non_contiguous_and_offset_predictions(device, rescale):
    base = random_preds(3, (4, 9, 13), torch.float16, device, seed=8)
    transposed = base.transpose(2, 3)  # [K, B, 13, 9] views, not contiguous
    coeffs, ref_coeffs = [1.5, -0.5, 2.0], [1.0, 0.0, 0.0]
    actual = guidance_merge(transposed, coeffs, rescale=rescale, ref_coeffs=ref_coeffs)
    assert_matches_reference(actual, transposed, coeffs, rescale, ref_coeffs)
    # Storage offset of one element: data pointers not 16-byte aligned (CUDA takes the scalar path).
    flat = random_preds(1, (3 * 4 * 64 + 1,), torch.float16, device, seed=9)[0]
    shifted = flat[1:].view(3, 4, 64)
    actual = guidance_merge(shifted, coeffs, rescale=rescale, ref_coeffs=ref_coeffs)
    assert_matches_reference(actual, shifted, coeffs, rescale, ref_coeffs)


@pytest.mark.parametrize("form", ["list", "stacked"])
@pytest.mark.parametrize("rescale", [0.0, 0.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(device, form, rescale, dtype):
    preds = random_preds(3, (2, 4, 6, 5), dtype, device, seed=1)
    ref_coeffs = [0.0, 1.0, 0.0] if rescale else []
    if form == "list":
        op, preds = torch.ops.cgkernels.guidance_merge.default, list(preds.unbind(0))
    else:
        op = torch.ops.cgkernels.guidance_merge.stacked
    torch.library.opcheck(op, (preds, [1.0, -2.0, 3.0], rescale, ref_coeffs))


def test_torch_compile_fullgraph(device):
    def guided(preds, scale):
        merged = guidance_merge(preds, [1.0 - 7.5, 7.5], rescale=0.7, ref_coeffs=[0.0, 1.0])
        return merged * scale

    compiled = torch.compile(guided, fullgraph=True, backend="aot_eager")
    preds = random_preds(2, (2, 4, 8, 8), torch.float32, device, seed=6)
    torch.testing.assert_close(compiled(preds, 0.5), guided(preds, 0.5), rtol=0, atol=0)


def test_torch_compile_inductor(device):
    # Only the op in the graph: inductor lowers it to an extern call through the fake impl and has no pointwise
    # kernel to compile (keeps this test fast on CPU).
    def guided(preds):
        return guidance_merge(preds.unbind(0), [-1.0, 2.0], rescale=0.5, ref_coeffs=[1.0, 0.0])

    compiled = torch.compile(guided, fullgraph=True)
    preds = random_preds(2, (2, 4, 8, 8), torch.float32, device, seed=6)
    torch.testing.assert_close(compiled(preds), guided(preds), rtol=0, atol=0)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    num_preds=st.integers(1, 7),
    shape=st.lists(st.integers(1, 9), min_size=1, max_size=4),
    dtype=st.sampled_from(DTYPES),
    rescale=st.sampled_from([0.0, 0.4, 1.0]),
    as_list=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_fuzz_shapes(device, num_preds, shape, dtype, rescale, as_list, seed):
    preds = random_preds(num_preds, shape, dtype, device, seed=seed)
    coeffs = random_coeffs(num_preds, seed=seed)
    ref_coeffs = random_coeffs(num_preds, seed=seed + 1)
    inputs = list(preds.unbind(0)) if as_list else preds
    actual = guidance_merge(inputs, coeffs, rescale=rescale, ref_coeffs=ref_coeffs)
    assert_matches_reference(actual, preds, coeffs, rescale, ref_coeffs)


def bad_input_cases():
    p = torch.randn(2, 3, 4)
    return [
        ("empty K", lambda: guidance_merge([], []), ValueError, "empty"),
        ("empty K tensor", lambda: guidance_merge(torch.randn(0, 3, 4), []), ValueError, "empty"),
        ("too many preds", lambda: guidance_merge(torch.randn(17, 2, 2), [1.0] * 17), ValueError, "at most 16"),
        ("coeff count", lambda: guidance_merge(p, [1.0]), ValueError, "2 predictions but 1 coeffs"),
        ("ref count", lambda: guidance_merge(p, [1.0, 1.0], rescale=0.5, ref_coeffs=[1.0]), ValueError, "ref_coeffs"),
        ("ref missing", lambda: guidance_merge(p, [1.0, 1.0], rescale=0.5), ValueError, "needs ref_coeffs"),
        ("rescale > 1", lambda: guidance_merge(p, [1.0, 1.0], rescale=1.5, ref_coeffs=[0, 1]), ValueError, "rescale"),
        ("rescale < 0", lambda: guidance_merge(p, [1.0, 1.0], rescale=-0.1, ref_coeffs=[0, 1]), ValueError, "rescale"),
        ("rescale nan", lambda: guidance_merge(p, [1.0, 1.0], rescale=math.nan, ref_coeffs=[0, 1]), ValueError, "rescale"),
        ("rescale str", lambda: guidance_merge(p, [1.0, 1.0], rescale="0.5"), TypeError, "rescale"),
        ("nan coeff", lambda: guidance_merge(p, [1.0, math.nan]), ValueError, r"coeffs\[1\] is not finite"),
        ("inf coeff", lambda: guidance_merge(p, [math.inf, 1.0]), ValueError, r"coeffs\[0\] is not finite"),
        ("inf ref", lambda: guidance_merge(p, [1.0, 1.0], rescale=0.5, ref_coeffs=[0, -math.inf]), ValueError, "ref_coeffs"),
        ("tensor coeffs", lambda: guidance_merge(p, torch.tensor([1.0, 2.0])), TypeError, "coeffs"),
        ("bool coeff", lambda: guidance_merge(p, [True, 1.0]), TypeError, r"coeffs\[0\]"),
        ("int tensor", lambda: guidance_merge(torch.ones(2, 3, dtype=torch.int32), [1.0, 1.0]), TypeError, "int32"),
        ("bool tensor", lambda: guidance_merge(torch.ones(2, 3, dtype=torch.bool), [1.0, 1.0]), TypeError, "bool"),
        ("float64", lambda: guidance_merge(torch.ones(2, 3, dtype=torch.float64), [1.0, 1.0]), TypeError, "float64"),
        ("dtype mismatch", lambda: guidance_merge([p[0], p[1].half()], [1.0, 1.0]), TypeError, r"preds\[1\] has dtype"),
        ("shape mismatch", lambda: guidance_merge([p[0], p[1, :2]], [1.0, 1.0]), ValueError, r"preds\[1\] has shape"),
        ("1-d stacked", lambda: guidance_merge(torch.randn(3), [1.0] * 3), ValueError, "at least 2 dims"),
        ("0-d preds", lambda: guidance_merge([torch.tensor(1.0)], [1.0]), ValueError, "batch dimension"),
        ("not tensors", lambda: guidance_merge([p[0], [1.0]], [1.0, 1.0]), TypeError, r"preds\[1\]"),
        ("preds type", lambda: guidance_merge(3.0, [1.0]), TypeError, "preds"),
    ]


@pytest.mark.parametrize("case", bad_input_cases(), ids=lambda case: case[0])
def test_bad_input_raises(case):
    _, call, error, match = case
    with pytest.raises(error, match=match):
        call()


@pytest.mark.cuda
@pytest.mark.parametrize("rescale", [0.0, 0.7])
def test_cuda_graph_capture_and_replay(rescale):
    # No host sync and no host-side state: the op records into a CUDA graph and replays on new inputs.
    preds = random_preds(3, (2, 4, 32, 32), torch.float16, "cuda", seed=12)
    coeffs, ref_coeffs = [-6.5, 7.5, 0.5], [0.0, 1.0, 0.0]
    side_stream = torch.cuda.Stream()
    side_stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side_stream):
        guidance_merge(preds, coeffs, rescale=rescale, ref_coeffs=ref_coeffs)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side_stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured_out = guidance_merge(preds, coeffs, rescale=rescale, ref_coeffs=ref_coeffs)
    preds.copy_(random_preds(3, (2, 4, 32, 32), torch.float16, "cuda", seed=13))
    graph.replay()
    torch.cuda.synchronize()
    assert_matches_reference(captured_out, preds, coeffs, rescale, ref_coeffs)


@pytest.mark.cuda
@pytest.mark.parametrize("rescale", [0.0, 0.5])
def test_more_than_2_31_elements(rescale):
    # 64-bit indexing: one sample of 2^31 + 37 float16 elements (13 GB in all); checked on its last elements.
    numel = 2**31 + 37
    preds = torch.empty((2, 1, numel), dtype=torch.float16, device="cuda")
    preds[0].fill_(1.5)
    preds[1].fill_(-0.25)
    preds[:, 0, -1000:] = random_preds(2, (1000,), torch.float16, "cuda", seed=14)
    out = guidance_merge(preds, [2.0, 4.0], rescale=rescale, ref_coeffs=[0.0, 1.0])
    tail = preds[:, 0, -1000:].double()
    plain_tail = 2.0 * tail[0] + 4.0 * tail[1]
    expected_factor = 1.0
    if rescale:  # exact unbiased std of "constant except the tail", from the tail alone in float64
        def std(constant, values):
            mean = (constant * (numel - 1000) + values.sum()) / numel
            squares = (numel - 1000) * (constant - mean) ** 2 + ((values - mean) ** 2).sum()
            return (squares / (numel - 1)).sqrt()

        ratio = std(-0.25, tail[1]) / std(2.0, plain_tail)
        expected_factor = (rescale * ratio + 1.0 - rescale).item()
    torch.testing.assert_close(out[0, -1000:].double(), plain_tail * expected_factor, rtol=2e-3, atol=2e-3)
    head = out[0, : numel - 1000]
    assert (head == head[0]).all() and abs(head[0].item() - 2.0 * expected_factor) < 2e-3 * 2.0 * expected_factor


@pytest.mark.cuda
def test_device_mismatch_raises():
    with pytest.raises(ValueError, match=r"preds\[1\] is on"):
        guidance_merge([torch.randn(2, 3), torch.randn(2, 3, device="cuda")], [1.0, 1.0])


def test_requires_grad_raises_and_no_grad_works():
    preds = torch.randn(2, 3, 4, requires_grad=True)
    with pytest.raises(ValueError, match="no autograd"):
        guidance_merge(preds, [1.0, 2.0])
    with torch.no_grad():
        assert_matches_reference(guidance_merge(preds, [1.0, 2.0]), preds.detach(), [1.0, 2.0])


def test_direct_op_call_checks_arguments():
    preds = list(torch.randn(2, 3, 4).unbind(0))
    with pytest.raises(ValueError, match="2 predictions but 1 coeffs"):
        torch.ops.cgkernels.guidance_merge(preds, [1.0], 0.0, [])
    with pytest.raises(ValueError, match="rescale > 0 needs 2 ref_coeffs"):
        torch.ops.cgkernels.guidance_merge(preds, [1.0, 2.0], 0.5, [])
    with pytest.raises(ValueError, match="rescale must be in"):
        torch.ops.cgkernels.guidance_merge(preds, [1.0, 2.0], 2.0, [0.0, 1.0])
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        torch.ops.cgkernels.guidance_merge([p.double() for p in preds], [1.0, 2.0], 0.0, [])
    with pytest.raises(ValueError, match=r"preds\[1\] has shape"):
        torch.ops.cgkernels.guidance_merge([preds[0], preds[1][:2]], [1.0, 2.0], 0.0, [])
    stacked = torch.stack(preds)
    with pytest.raises(ValueError, match="2 predictions but 3 coeffs"):
        torch.ops.cgkernels.guidance_merge.stacked(stacked, [1.0, 2.0, 3.0], 0.0, [])
    with pytest.raises(ValueError, match="at least 2 dims"):
        torch.ops.cgkernels.guidance_merge.stacked(stacked[0, 0], [1.0] * 4, 0.0, [])
    with pytest.raises(ValueError, match="empty"):
        torch.ops.cgkernels.guidance_merge.stacked(stacked[:0], [], 0.0, [])
