"""A failed extension build leaves the rest of the package usable: multi_lora_linear imports and runs, and
guidance_merge raises a clear error naming the failed load instead of breaking `import cgkernels`."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import sys
sys.modules["cgkernels._C"] = None  # what a missing or unloadable build looks like to `import cgkernels._C`
import torch
import cgkernels
from cgkernels.ops import guidance_merge, guidance_merge_reference, multi_lora_linear, multi_lora_linear_reference
from cgkernels.ops.guidance_merge import extension_available

assert not extension_available()
x, w = torch.randn(5, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
a, b = torch.randn(1, 2, 4, dtype=torch.float64), torch.randn(1, 3, 2, dtype=torch.float64)
y = multi_lora_linear(x, w, None, a, b, [0, 2, 5], [0, -1], backend="torch")
torch.testing.assert_close(y, multi_lora_linear_reference(x, w, None, a, b, [0, 2, 5], [0, -1]))
preds = torch.randn(2, 3, 4)
guidance_merge_reference(preds, [1.0, 2.0])
try:
    guidance_merge(preds, [1.0, 2.0])
except RuntimeError as error:
    assert "cgkernels._C" in str(error) and "build" in str(error), error
    print("clear error")
"""


def test_package_imports_and_multi_lora_runs_without_the_extension():
    result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("clear error")
