"""The CUDA sources compile for Hopper wherever nvcc is installed, with the flags torch's extension build uses, so a
CUDA error fails CI without a GPU:

- every csrc/*.cu with nvcc -arch=sm_90 and torch's COMMON_NVCC_FLAGS (-D__CUDA_NO_HALF_OPERATORS__,
  -D__CUDA_NO_HALF_CONVERSIONS__, ... : no implicit half/bfloat16 operators or conversions), C++20 as in torch 2.13's
  build; ptxas reports no register spills;
- every csrc/*_cuda.cpp (the torch bindings of the kernels) with the host compiler against torch's CUDA headers
  (c10/cuda/*) and the toolkit's cuda_runtime_api.h, with the flags BuildExtension adds to C++ sources and the same
  macros. The CPU torch wheel lacks one header a CUDA wheel has, the CMake-generated
  c10/cuda/impl/cuda_cmake_macros.h; C10_CUDA_NO_CMAKE_CONFIGURE_FILE (torch's own switch for builds without it)
  skips it (on Linux it only carries C10_CUDA_BUILD_SHARED_LIBS, which matters on Windows). Any other missing torch
  CUDA header skips the test and names the header.
No .cu includes torch (the CPU torch wheel lacks parts of torch's CUDA headers): kernels take raw pointers and a
cudaStream_t, and the torch binding lives in a *_cuda.cpp."""
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from torch.utils.cpp_extension import COMMON_NVCC_FLAGS, include_paths

from cgkernels._cuda_toolkit import find_cuda_home

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
CUDA_SOURCES = sorted(CSRC.glob("*.cu"))
BINDING_SOURCES = sorted(CSRC.glob("*_cuda.cpp"))
TORCH_INCLUDE = re.compile(r'^\s*#\s*include\s*[<"](torch|ATen|c10)/', re.MULTILINE)
ANY_INCLUDE = re.compile(r'^\s*#\s*include\s*[<"]([^>"]+)[>"]', re.MULTILINE)
NVCC = shutil.which("nvcc")
CXX = shutil.which("c++") or shutil.which("g++")
# What torch's BuildExtension adds to every C++ source of an extension (besides the include paths).
TORCH_CXX_FLAGS = ["-std=c++20", "-fPIC", "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C",
                   f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
NVCC_MACROS = [flag for flag in COMMON_NVCC_FLAGS if flag.startswith("-D")]


def source_id(path: Path) -> str:
    return path.name


def _cuda_home():
    """The toolkit of the nvcc on PATH, found as setup.py finds it (nvcc may be a wrapper script)."""
    return find_cuda_home({"PATH": str(Path(NVCC).parent)})


def test_there_are_cuda_sources():
    assert CUDA_SOURCES, f"no .cu files under {CSRC}"
    assert BINDING_SOURCES, f"no *_cuda.cpp bindings under {CSRC}"


def local_headers(path: Path) -> list[Path]:
    names = re.findall(r'^\s*#\s*include\s*"([^"]+)"', path.read_text(), re.MULTILINE)
    return [CSRC / name for name in names if (CSRC / name).exists()]


@pytest.mark.parametrize("source", CUDA_SOURCES, ids=source_id)
def test_cuda_source_includes_no_torch(source):
    for path in [source, *local_headers(source)]:
        match = TORCH_INCLUDE.search(path.read_text())
        assert match is None, f"{path.name} includes a torch header ({match.group(0).strip()}): {source.name} must not"


@pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH")
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=source_id)
def test_cuda_source_compiles_for_sm90_with_torch_nvcc_flags(source, tmp_path):
    command = [NVCC, "-arch=sm_90", "-O3", "-std=c++20", *COMMON_NVCC_FLAGS, "-Xptxas", "-v", f"-I{CSRC}",
               "--compiler-options", "-fPIC", "-c", str(source), "-o", str(tmp_path / f"{source.stem}.o")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    log = result.stdout + result.stderr
    assert result.returncode == 0, f"nvcc failed on {source.name}:\n{log}"
    spills = [line for line in log.splitlines() if re.search(r"[1-9]\d* bytes spill (stores|loads)", line)]
    assert not spills, f"{source.name}: register spills in ptxas -v output:\n" + "\n".join(spills)


def _missing_torch_cuda_headers(source: Path, search: list[Path]) -> list[str]:
    wanted = [name for path in [source, *local_headers(source)] for name in ANY_INCLUDE.findall(path.read_text())
              if name.startswith(("c10/cuda/", "ATen/cuda/", "cuda_runtime"))]
    return [name for name in wanted if not any((folder / name).exists() for folder in search)]


@pytest.mark.skipif(NVCC is None or CXX is None, reason="needs nvcc (for the CUDA headers) and a C++ compiler")
@pytest.mark.parametrize("source", BINDING_SOURCES, ids=source_id)
def test_torch_binding_compiles_against_torch_cuda_headers(source, tmp_path):
    cuda_home = _cuda_home()
    assert cuda_home is not None and (Path(cuda_home) / "include" / "cuda_runtime_api.h").exists(), cuda_home
    search = [Path(p) for p in include_paths("cpu")] + [Path(cuda_home) / "include", CSRC]
    missing = _missing_torch_cuda_headers(source, search)
    if missing:
        pytest.skip(f"torch {torch.__version__} ships without {missing}: {source.name} cannot be compiled here")
    command = [CXX, *TORCH_CXX_FLAGS, *NVCC_MACROS, "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE", "-DCGKERNELS_WITH_CUDA=1",
               "-O0", "-Wall", "-Werror=return-type", *[f"-I{folder}" for folder in search], "-c", str(source),
               "-o", str(tmp_path / f"{source.stem}.o")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{source.name} does not compile against torch's CUDA headers:\n" + (
        result.stdout + result.stderr)[-6000:]
