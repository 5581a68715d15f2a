"""Builds cgkernels._C: CPU kernels always, CUDA kernels when torch has CUDA and nvcc is found.

CGKERNELS_CUDA=auto (default) | 1 (force: fail if CUDA cannot be built) | 0 (skip CUDA).
CGKERNELS_CUDA_ARCH=90 (or 80,90, ...): only these SM binaries (default: sm_80, sm_90 and sm_90 PTX).
Install with `pip install --no-build-isolation .` so the extension builds against the torch already installed.
"""
import glob
import importlib.util
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _find_cuda_home():
    # cgkernels/_cuda_toolkit.py by path: importing the package would import torch and all of cgkernels.
    spec = importlib.util.spec_from_file_location("cgkernels_cuda_toolkit",
                                                  os.path.join(ROOT, "cgkernels", "_cuda_toolkit.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.find_cuda_home(os.environ)


# Before torch.utils.cpp_extension reads it: the toolkit of the nvcc on PATH where CUDA_HOME is unset (torch's own
# guess is wrong when nvcc is a wrapper script outside the toolkit).
if not os.environ.get("CUDA_HOME") and not os.environ.get("CUDA_PATH"):
    _cuda_home = _find_cuda_home()
    if _cuda_home is not None:
        os.environ["CUDA_HOME"] = _cuda_home

from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402
import torch  # noqa: E402


def cuda_build_wanted() -> bool:
    mode = os.environ.get("CGKERNELS_CUDA", "auto").strip().lower()
    available = torch.version.cuda is not None and CUDA_HOME is not None
    if mode in ("0", "off", "skip", "false", "no"):
        return False
    if mode in ("1", "on", "force", "true", "yes"):
        if not available:
            raise RuntimeError(
                "CGKERNELS_CUDA=1 but CUDA cannot be built: "
                f"torch.version.cuda={torch.version.cuda!r}, CUDA_HOME={CUDA_HOME!r}"
            )
        return True
    if mode != "auto":
        raise RuntimeError(f"CGKERNELS_CUDA must be auto, 1 or 0, got {mode!r}")
    return available


def nvcc_arch_flags() -> list[str]:
    """Default: sm_80 and sm_90 binaries plus sm_90 PTX, so newer GPUs can JIT the kernels.

    CGKERNELS_CUDA_ARCH="90" (comma-separated SM numbers) builds only those binaries, no PTX: the GPU suite uses it
    to halve the build time on a known machine.
    """
    archs = os.environ.get("CGKERNELS_CUDA_ARCH", "").replace(" ", "")
    if not archs:
        return ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
                "-gencode=arch=compute_90,code=compute_90"]
    flags = []
    for arch in archs.split(","):
        if not arch.isdigit():
            raise RuntimeError(f"CGKERNELS_CUDA_ARCH must list SM numbers such as 90 or 80,90, got {archs!r}")
        flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
    return flags


def sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", pattern)))


def extension():
    # *_cuda.cpp hold the torch bindings of the .cu kernels; they need torch's CUDA headers.
    cpu_sources = [s for s in sources("*.cpp") if not s.endswith("_cuda.cpp")]
    # No -std flag: torch's BuildExtension adds the standard its headers need (C++20 for torch 2.13); an explicit
    # -std=c++17 overrides it and the headers then warn (and the CUDA ones break).
    cxx_flags = ["-O3"]
    if cuda_build_wanted():
        return CUDAExtension(
            "cgkernels._C",
            cpu_sources + sources("*_cuda.cpp") + sources("*.cu"),
            define_macros=[("CGKERNELS_WITH_CUDA", "1")],
            extra_compile_args={
                "cxx": cxx_flags,
                "nvcc": ["-O3", *nvcc_arch_flags()],
            },
        )
    return CppExtension("cgkernels._C", cpu_sources, extra_compile_args=cxx_flags)


setup(ext_modules=[extension()], cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)})
