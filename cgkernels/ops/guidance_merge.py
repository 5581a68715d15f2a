"""Fused guidance merge: combine K branch predictions with guidance coefficients in one pass.

    out = sum_k coeffs[k] * preds[k]                                  (fp32 accumulation, input dtype out)
    out = phi * out * std(ref) / std(out) + (1 - phi) * out           (only when rescale phi > 0)
    ref = sum_k ref_coeffs[k] * preds[k]

std is per batch item over all non-batch dims and unbiased, as in diffusers' `rescale_noise_cfg` ("Common
Diffusion Noise Schedules and Sample Steps are Flawed"). One deliberate difference: where std(out) is zero (a
constant sample, or a single element per sample) diffusers divides by zero and returns inf/NaN; here that sample
is left unrescaled (factor 1).

The kernels are C++/CUDA (csrc/guidance_merge*.{cpp,cu}) registered with TORCH_LIBRARY as
`torch.ops.cgkernels.guidance_merge` (K separate predictions, Tensor[]) and `torch.ops.cgkernels.guidance_merge.stacked`
(one [K, B, *S] tensor), with fake implementations below, so torch.compile and CUDA graphs see one opaque op. Both
forms read the predictions in place: no stack, no unbind. All argument checks happen here, on the host; the
coefficients stay Python floats (no device tensors, no syncs).

Without a usable kernel (cgkernels._C failed to build or load, or was built without CUDA and the predictions are on
a GPU) `guidance_merge` runs `guidance_merge_reference` instead: same result (fp32 accumulation), a few more
kernel launches and memory passes. It warns once per process and device type; `merge_implementation(device)` says
which of the two runs, so benchmarks can record it. CGKERNELS_REQUIRE_EXTENSION=1 turns the fallback into an error.
"""
from __future__ import annotations

import math
import numbers
import os
import warnings
from collections.abc import Sequence

import torch

# The compiled library registers torch.ops.cgkernels.*. A missing or broken build must not make the rest of the
# package (the Triton multi-LoRA op above all, on a GPU machine whose extension build failed) unimportable: remember
# why it failed, fall back to the reference merge and say so (once) when guidance_merge is called.
try:
    import cgkernels._C  # noqa: F401
except ImportError as error:  # OSError from a bad .so surfaces as ImportError too
    EXTENSION_ERROR: ImportError | None = error
else:
    EXTENSION_ERROR = None

MAX_PREDS = 16  # the CUDA kernel takes the K input pointers by value
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
EXTENSION, REFERENCE = "extension", "reference"  # what merge_implementation returns
_fallback_warned: set = set()  # device types whose fallback was announced


def guidance_merge(
    preds: torch.Tensor | Sequence[torch.Tensor],
    coeffs: Sequence[float],
    *,
    rescale: float = 0.0,
    ref_coeffs: Sequence[float] | None = None,
) -> torch.Tensor:
    """Returns sum_k coeffs[k] * preds[k] (shape [B, *S], dtype of preds), optionally guidance-rescaled.

    preds: a tensor [K, B, *S] (e.g. a UNet output [K*B, ...] viewed as [K, B, ...]) or a sequence of K tensors
        [B, *S]; float32, float16 or bfloat16; all on one device. Neither form is copied (the kernel reads the K
        predictions in place) unless it is non-contiguous, which is then copied to contiguous first.
    coeffs: K finite floats.
    rescale: phi in [0, 1]; 0 (default) skips the rescale.
    ref_coeffs: K finite floats defining ref (for CFG: the conditional branch, e.g. [0, 1]); required when
        rescale > 0.

    Inference only: it has no autograd formula (use `guidance_merge_reference` where gradients are needed).
    Runs the compiled kernel, or `guidance_merge_reference` where none is usable (see the module docstring and
    `merge_implementation`).
    """
    if isinstance(preds, torch.Tensor):
        _check_stacked_predictions(preds)
        num_preds = preds.shape[0]
        needs_grad = preds.requires_grad
    else:
        pred_list = _prediction_list(preds)
        num_preds = len(pred_list)
        needs_grad = any(p.requires_grad for p in pred_list)
    coeff_list = _coefficient_list(coeffs, num_preds, "coeffs")
    rescale = _check_rescale(rescale)
    if ref_coeffs is None:
        if rescale > 0.0:
            raise ValueError(
                f"guidance_merge: rescale={rescale} needs ref_coeffs (the combination whose std the output is "
                "rescaled to, e.g. the conditional prediction)"
            )
        ref_list: list[float] = []
    else:
        ref_list = _coefficient_list(ref_coeffs, num_preds, "ref_coeffs")
    if needs_grad and torch.is_grad_enabled():
        raise ValueError(
            "guidance_merge has no autograd formula: call it under torch.no_grad() or use "
            "guidance_merge_reference when gradients are needed"
        )
    device = preds.device if isinstance(preds, torch.Tensor) else pred_list[0].device
    if merge_implementation(device) == REFERENCE:
        _announce_fallback(device)
        return guidance_merge_reference(preds if isinstance(preds, torch.Tensor) else pred_list, coeff_list,
                                        rescale=rescale, ref_coeffs=ref_list or None)
    if isinstance(preds, torch.Tensor):
        return torch.ops.cgkernels.guidance_merge.stacked(preds, coeff_list, rescale, ref_list)
    return torch.ops.cgkernels.guidance_merge.default(pred_list, coeff_list, rescale, ref_list)


def extension_available() -> bool:
    """Whether the compiled cgkernels._C (the guidance_merge kernels) loaded."""
    return EXTENSION_ERROR is None


def merge_implementation(device: torch.device | str = "cpu") -> str:
    """Which merge `guidance_merge` runs for predictions on `device`: "extension" (the compiled kernel) or
    "reference" (`guidance_merge_reference`: no extension, or one built without kernels for that device type)."""
    return EXTENSION if _has_kernel(torch.device(device).type) else REFERENCE


def _has_kernel(device_type: str) -> bool:
    return device_type in _KERNEL_DEVICE_TYPES


def _fallback_reason(device_type: str) -> str:
    if EXTENSION_ERROR is not None:
        return f"the compiled extension cgkernels._C failed to load ({EXTENSION_ERROR})"
    return f"cgkernels._C was built without {device_type} kernels"


def _announce_fallback(device: torch.device) -> None:
    """Warns once per device type (never while torch.compile traces: the warning came from the eager call);
    raises instead under CGKERNELS_REQUIRE_EXTENSION=1, for runs that must not measure the fallback."""
    reason = _fallback_reason(device.type)
    fix = ("build it with `pip install --no-build-isolation .` (or `python setup.py build_ext --inplace`; set "
           "CGKERNELS_CUDA=1 to make a CUDA build fail loudly)")
    if os.environ.get("CGKERNELS_REQUIRE_EXTENSION", "0") == "1":
        raise RuntimeError(f"guidance_merge: {reason} and CGKERNELS_REQUIRE_EXTENSION=1; {fix}")
    if torch.compiler.is_compiling() or device.type in _fallback_warned:
        return
    _fallback_warned.add(device.type)
    warnings.warn(f"guidance_merge: {reason}; using the reference merge (same result, slower); {fix}",
                  RuntimeWarning, stacklevel=3)


def guidance_merge_reference(
    preds: torch.Tensor | Sequence[torch.Tensor],
    coeffs: Sequence[float],
    *,
    rescale: float = 0.0,
    ref_coeffs: Sequence[float] | None = None,
) -> torch.Tensor:
    """Plain torch version of `guidance_merge` (same semantics, differentiable). Computes in float64 for
    float64 inputs (the test reference) and in float32 otherwise, returning the input dtype."""
    pred_list = list(preds.unbind(0)) if isinstance(preds, torch.Tensor) else list(preds)
    dtype = pred_list[0].dtype
    compute_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    wide = [p.to(compute_dtype) for p in pred_list]
    out = sum(float(c) * p for c, p in zip(coeffs, wide, strict=True))
    if rescale > 0.0:
        ref = sum(float(c) * p for c, p in zip(ref_coeffs, wide, strict=True))
        out = out * _reference_rescale_factor(out, ref, float(rescale))
    return out.to(dtype)


def _reference_rescale_factor(out: torch.Tensor, ref: torch.Tensor, rescale: float) -> torch.Tensor:
    if math.prod(out.shape[1:]) < 2 or out.numel() == 0:  # std of one element is undefined: leave it as is
        return torch.ones((out.shape[0],) + (1,) * (out.dim() - 1), dtype=out.dtype, device=out.device)
    sample_dims = list(range(1, out.dim()))
    std_out = out.std(dim=sample_dims, keepdim=True)
    std_ref = ref.std(dim=sample_dims, keepdim=True)
    factor = rescale * std_ref / std_out + (1.0 - rescale)
    return torch.where(std_out == 0, torch.ones_like(factor), factor)


def _check_stacked_predictions(preds: torch.Tensor) -> None:
    if preds.dim() < 2:
        raise ValueError(
            f"guidance_merge: a preds tensor must be [K, B, *S] (at least 2 dims), got shape {tuple(preds.shape)}"
        )
    if preds.shape[0] == 0:
        raise ValueError("guidance_merge: preds is empty (need at least one prediction)")
    if preds.shape[0] > MAX_PREDS:
        raise ValueError(f"guidance_merge: at most {MAX_PREDS} predictions, got {preds.shape[0]}")
    if preds.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"guidance_merge: preds must be float32, float16 or bfloat16, got {preds.dtype}")


def _prediction_list(preds) -> list[torch.Tensor]:
    if not isinstance(preds, Sequence) or isinstance(preds, (str, bytes)):
        raise TypeError(f"guidance_merge: preds must be a Tensor or a sequence of Tensors, got {type(preds).__name__}")
    pred_list = list(preds)
    for index, pred in enumerate(pred_list):
        if not isinstance(pred, torch.Tensor):
            raise TypeError(f"guidance_merge: preds[{index}] is a {type(pred).__name__}, expected a Tensor")
    if not pred_list:
        raise ValueError("guidance_merge: preds is empty (need at least one prediction)")
    if len(pred_list) > MAX_PREDS:
        raise ValueError(f"guidance_merge: at most {MAX_PREDS} predictions, got {len(pred_list)}")
    _check_predictions_agree(pred_list)
    return pred_list


def _check_predictions_agree(pred_list: list[torch.Tensor]) -> None:
    first = pred_list[0]
    if first.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"guidance_merge: preds must be float32, float16 or bfloat16, got {first.dtype}")
    if first.dim() < 1:
        raise ValueError("guidance_merge: each prediction needs a batch dimension, got a 0-d tensor")
    for index, pred in enumerate(pred_list[1:], start=1):
        if pred.dtype != first.dtype:
            raise TypeError(f"guidance_merge: preds[{index}] has dtype {pred.dtype}, preds[0] has {first.dtype}")
        if pred.device != first.device:
            raise ValueError(f"guidance_merge: preds[{index}] is on {pred.device}, preds[0] on {first.device}")
        if pred.shape != first.shape:
            raise ValueError(
                f"guidance_merge: preds[{index}] has shape {tuple(pred.shape)}, preds[0] has {tuple(first.shape)}"
            )


def _coefficient_list(values, num_preds: int, name: str) -> list[float]:
    if isinstance(values, torch.Tensor) or not isinstance(values, Sequence):
        raise TypeError(f"guidance_merge: {name} must be a sequence of Python floats, got {type(values).__name__}")
    if len(values) != num_preds:
        raise ValueError(f"guidance_merge: got {num_preds} predictions but {len(values)} {name}")
    result = []
    for index, value in enumerate(values):
        # `type(...) is float` first: the common case skips the slower abstract-class check.
        if type(value) is not float and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
            raise TypeError(f"guidance_merge: {name}[{index}] must be a float, got {type(value).__name__}")
        if not math.isfinite(value):
            raise ValueError(f"guidance_merge: {name}[{index}] is not finite ({value})")
        result.append(float(value))
    return result


def _check_rescale(rescale) -> float:
    if isinstance(rescale, bool) or not isinstance(rescale, numbers.Real):
        raise TypeError(f"guidance_merge: rescale must be a float, got {type(rescale).__name__}")
    if not 0.0 <= rescale <= 1.0:  # also rejects NaN
        raise ValueError(f"guidance_merge: rescale must be in [0, 1], got {rescale}")
    return float(rescale)


def _guidance_merge_fake(preds, coeffs, rescale, ref_coeffs):
    first = preds[0]
    for pred in preds[1:]:
        torch._check(pred.shape == first.shape, lambda: "guidance_merge: preds must share one shape")
    return first.new_empty(first.shape)


def _guidance_merge_stacked_fake(preds, coeffs, rescale, ref_coeffs):
    return preds.new_empty(preds.shape[1:])


# Device types the library has kernels for, asked of the dispatcher once (a plain set lookup per call, which
# torch.compile can trace): a CPU-only build (no nvcc at install time) has no CUDA kernel.
_KERNEL_DEVICE_TYPES = frozenset() if EXTENSION_ERROR is not None else frozenset(
    device_type for device_type, key in (("cpu", "CPU"), ("cuda", "CUDA"))
    if torch._C._dispatch_has_kernel_for_dispatch_key("cgkernels::guidance_merge", key)
)

if EXTENSION_ERROR is None:  # fake implementations attach to the ops the library defined
    torch.library.register_fake("cgkernels::guidance_merge", _guidance_merge_fake)
    torch.library.register_fake("cgkernels::guidance_merge.stacked", _guidance_merge_stacked_fake)
