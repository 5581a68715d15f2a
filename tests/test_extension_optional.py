"""A failed extension build leaves the package usable: multi_lora_linear imports and runs, and guidance_merge falls
back to the reference merge with one warning naming the failed load (or raises under CGKERNELS_REQUIRE_EXTENSION=1),
so the patched pipelines keep working on a machine whose C++/CUDA build failed."""
import os
import subprocess
import sys
from pathlib import Path

import torch

from cgkernels.ops.guidance_merge import extension_available, merge_implementation

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import sys
import warnings
sys.modules["cgkernels._C"] = None  # what a missing or unloadable build looks like to `import cgkernels._C`
import torch
import cgkernels
from cgkernels.ops import guidance_merge, guidance_merge_reference, multi_lora_linear, multi_lora_linear_reference
from cgkernels.ops.guidance_merge import extension_available, merge_implementation

assert not extension_available()
assert merge_implementation("cpu") == merge_implementation("cuda") == "reference"
x, w = torch.randn(5, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
a, b = torch.randn(1, 2, 4, dtype=torch.float64), torch.randn(1, 3, 2, dtype=torch.float64)
y = multi_lora_linear(x, w, None, a, b, [0, 2, 5], [0, -1], backend="torch")
torch.testing.assert_close(y, multi_lora_linear_reference(x, w, None, a, b, [0, 2, 5], [0, -1]))

preds = torch.randn(3, 2, 4, 5, dtype=torch.float16)
coeffs, ref_coeffs = [-1.5, 2.0, 0.5], [0.0, 1.0, 0.0]
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    stacked = guidance_merge(preds, coeffs, rescale=0.7, ref_coeffs=ref_coeffs)
    listed = guidance_merge(list(preds.unbind(0)), coeffs)  # a second call: no second warning
fallback = [w for w in caught if issubclass(w.category, RuntimeWarning)]
assert len(fallback) == 1, [str(w.message) for w in caught]
assert "cgkernels._C" in str(fallback[0].message) and "reference merge" in str(fallback[0].message)
expected = guidance_merge_reference(preds.double(), coeffs, rescale=0.7, ref_coeffs=ref_coeffs)
assert stacked.dtype == torch.float16 and listed.dtype == torch.float16
torch.testing.assert_close(stacked.double(), expected, rtol=0, atol=5e-3 * expected.abs().max().item())
torch.testing.assert_close(listed.double(), guidance_merge_reference(preds.double(), coeffs),
                           rtol=0, atol=5e-3 * expected.abs().max().item())
# The patched core's merge under torch.compile: the fallback traces into plain torch ops, no graph break.
compiled = torch.compile(lambda p: guidance_merge(p, coeffs, rescale=0.7, ref_coeffs=ref_coeffs), fullgraph=True,
                         backend="eager")
torch.testing.assert_close(compiled(preds), stacked)
try:  # argument checks still run first
    guidance_merge(preds, [1.0, 2.0])
except ValueError as error:
    assert "3 predictions but 2 coeffs" in str(error)
else:
    raise AssertionError("bad coeffs accepted")
print("fallback ok")
"""


def _run(script, **env):
    return subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, **env))


def test_package_works_without_the_extension_and_merge_falls_back_once():
    result = _run(SCRIPT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("fallback ok")


def test_required_extension_turns_the_fallback_into_an_error():
    script = SCRIPT.split("preds = torch.randn")[0] + (
        "try:\n    guidance_merge(torch.randn(2, 3, 4), [1.0, 2.0])\n"
        "except RuntimeError as error:\n    assert 'CGKERNELS_REQUIRE_EXTENSION' in str(error), error\n"
        "    print('required')\n")
    result = _run(script, CGKERNELS_REQUIRE_EXTENSION="1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("required")


def test_merge_implementation_names_the_kernel_per_device_type():
    # The checkout's extension is built here; a CPU-only build has no CUDA kernel, so CUDA predictions would take
    # the reference merge there (asked of the dispatcher: no GPU needed).
    assert extension_available()
    assert merge_implementation("cpu") == "extension"
    has_cuda_kernel = torch._C._dispatch_has_kernel_for_dispatch_key("cgkernels::guidance_merge", "CUDA")
    assert merge_implementation(torch.device("cuda")) == ("extension" if has_cuda_kernel else "reference")
    assert merge_implementation("meta") == "reference"
