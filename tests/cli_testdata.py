"""What the command-line tests share: a saved tiny pipeline with two LoRA files, and launching a script on
2 CPU processes under accelerate."""
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
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
    """`accelerate launch --multi_gpu --num_processes 2 script args` on the CPU (torchrun underneath, gloo).
    Returns stdout; fails the test on an error or after `timeout` seconds, then with every process the launch
    started killed: torchrun starts its workers in sessions of their own, so killing the launcher's process group
    leaves them running (and, with their output on pipes, a hung worker once hung the whole test run)."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()), str(script), *map(str, args)]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        proc = subprocess.Popen(command, env=env, cwd=ROOT, stdout=stdout, stderr=stderr, text=True,
                                start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_process_tree(proc.pid)
            proc.wait()
            pytest.fail(f"2-process {Path(script).name} did not finish in {timeout} s: {_read(stderr)[-4000:]}")
        assert proc.returncode == 0, _read(stderr)[-4000:]
        return _read(stdout)


def _read(file) -> str:
    file.seek(0)
    return file.read()


def kill_process_tree(pid: int) -> None:
    """SIGKILL `pid` and every process below it, whichever session or process group they are in (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (command)": state, ppid, ...
        except (OSError, IndexError):
            continue  # the process ended while we looked
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, queue = [], [pid]
    while queue:
        tree.append(queue.pop())
        queue.extend(children.get(tree[-1], []))
    for member in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(member, signal.SIGKILL)
