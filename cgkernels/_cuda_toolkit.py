"""Where the CUDA toolkit is, for the extension build (setup.py) and the GPU suite: no torch import, loadable by path.

torch.utils.cpp_extension takes CUDA_HOME from the environment, else from `which nvcc` (two levels up), else
/usr/local/cuda. Where nvcc on PATH is a wrapper script (/usr/local/bin/nvcc -> /usr/local/cuda-13.0/bin/nvcc) the
second guess is /usr/local, whose include/ has no cuda_runtime.h, and the build fails; nvcc itself knows where it
lives (`nvcc --dryrun` prints _HERE_).
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
from pathlib import Path


def find_cuda_home(env) -> str | None:
    """CUDA_HOME (or CUDA_PATH) if set in env, else the toolkit of the nvcc on env's PATH (asked for its own
    location), else the newest /usr/local/cuda*; None without any."""
    for name in ("CUDA_HOME", "CUDA_PATH"):
        if env.get(name):
            return env[name]
    nvcc = shutil.which("nvcc", path=env.get("PATH"))
    if nvcc is not None:
        try:
            dryrun = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                                    capture_output=True, text=True, timeout=30)
            here = re.search(r"^#\$ _HERE_=(.+)$", dryrun.stdout + dryrun.stderr, re.MULTILINE)
            if here:
                return str(Path(here.group(1).strip()).resolve().parent)
        except (OSError, subprocess.SubprocessError):
            pass
        home = Path(nvcc).resolve().parent.parent
        if (home / "include" / "cuda_runtime.h").exists():
            return str(home)
    candidates = sorted(glob.glob("/usr/local/cuda*/bin/nvcc"))
    return str(Path(candidates[-1]).parent.parent) if candidates else None
