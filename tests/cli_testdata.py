"""What the command-line tests share: a saved tiny pipeline with two LoRA files, and launching a script on
2 CPU processes under accelerate."""
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from cgkernels.testing import add_random_lora, save_lora, tiny_sd_pipeline

ROOT = Path(__file__).resolve().parents[1]


def save_pipeline_with_loras(root: Path) -> Path:
    """root/model (a tiny SD1.5 pipeline), root/pos and root/neg (LoRA folders of different ranks)."""
    pipe = tiny_sd_pipeline("sd15", seed=7)
    pipe.save_pretrained(root / "model")
    add_random_lora(pipe, "pos", rank=4, seed=1)
    add_random_lora(pipe, "neg", rank=2, seed=2)
    save_lora(pipe, "pos", root / "pos")
    save_lora(pipe, "neg", root / "neg")
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two(script, *args, timeout: int = 300) -> str:
    """`accelerate launch --multi_gpu --num_processes 2 script args` on the CPU (torchrun underneath, gloo), in its
    own process group so that a timeout kills the workers too. Returns stdout; fails the test on an error."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()), str(script), *map(str, args)]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"2-process {Path(script).name} did not finish in {timeout} s: {stderr[-4000:]}")
    assert proc.returncode == 0, stderr[-4000:]
    return stdout
