"""Device selection that means the same thing on a CPU machine and on a GPU machine.

- `device`: every op test runs on CPU, and additionally on CUDA where a GPU is present. A test parametrized with
  `backend` gets its Triton cases only where Triton can run them: CPU tensors under the interpreter (set here on
  machines without CUDA), CUDA tensors with the compiler. The other combination is skipped with its reason (on a
  GPU machine the same check runs as the CUDA case), never silently moved to another device.
- `triton_device`: the one device Triton kernels run on here (CPU under the interpreter, else CUDA).
- `@pytest.mark.cuda`: skipped where there is no CUDA device.
"""
import os

import pytest

# Without a GPU, Triton kernels run through the interpreter. This must be set before triton is imported.
try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
TRITON_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device (runs in the GPU session's suite)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip_cuda)


def triton_runs_on(device_type: str) -> bool:
    """Whether Triton kernels can run on tensors of this device type in this process."""
    return device_type == ("cpu" if TRITON_INTERPRETED else "cuda")


@pytest.fixture(params=["cpu"] + (["cuda"] if _HAS_CUDA else []))
def device(request):
    """CPU everywhere, CUDA too where present; Triton cases only on the device Triton runs on here."""
    callspec = getattr(request.node, "callspec", None)
    backend = callspec.params.get("backend") if callspec is not None else None
    if backend == "triton" and not triton_runs_on(request.param):
        needs = "TRITON_INTERPRET=1 (set only without CUDA)" if request.param == "cpu" else "TRITON_INTERPRET unset"
        pytest.skip(f"Triton on {request.param} tensors needs {needs}; the same check runs on the device Triton uses")
    return torch.device(request.param)


@pytest.fixture
def triton_device():
    """The device Triton kernels run on in this process: CPU under the interpreter, else CUDA."""
    if not TRITON_INTERPRETED and not _HAS_CUDA:  # pragma: no cover (conftest sets the interpreter without CUDA)
        pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1")
    return torch.device("cpu" if TRITON_INTERPRETED else "cuda")


@pytest.fixture(scope="session", autouse=True)
def _one_intra_op_thread():
    """The test models are tiny and gain nothing from intra-op threads, while OpenMP spinning on an oversubscribed
    2-core machine makes them tens of times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
