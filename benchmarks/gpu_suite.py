"""The GPU session's driver: priority-ordered stages, each in its own process session with its own timeout, results
appended to OUT/results.jsonl the moment they exist, so a run killed at any point keeps everything that finished.

    python benchmarks/gpu_suite.py --out DIR [--rehearsal] [--budget-s S] [--only STAGE,...]
    (normally through benchmarks/gpu_suite.sh; CGKERNELS_GPU_REHEARSAL=1 there = --rehearsal)

Order (the first GPU minutes go to what matters most; STAGES holds each stage's timeout on the GPU):
  (background)        the extension build (sm_90 only, ninja; CUDA_HOME found from nvcc when unset; OUT/build.log)
                      into a scratch folder, its .so moved into cgkernels/ only once complete; it runs on the CPU
                      while the Triton-only stages use the GPU (their records say build_running in meta)
  env                 device, driver, versions (torch, Triton, CUDA, peft, transformers, diffusers) against our pins
  kernel-bench        multi_lora_linear against cuBLAS base-only, the torch LoRA path and peft's mixed batch, in the
                      grouped layout the patch emits (and the interleaved one as a stress case), SD1.5/SDXL shapes
  -- stages below wait for the build; a failed build is recorded and guidance_merge runs its reference instead --
  merge-bandwidth     guidance_merge GB/s against a device-to-device copy at >= 64 MB, K = 2, 4, 6, +-rescale
  kernel-correctness  multi_lora_linear against float64: gradients and the fp32 route first, then every config of
                      the table once, then SD1.5/SDXL shapes x fp16/bf16 x ranks 8/64/128, each with a forced config
                      (no autotuning: the number of Triton compiles stays bounded)
  extension-correctness  guidance_merge against float64, the patched tiny SD1.5/SDXL pipelines against per-branch
                      references, on the device
  unet-step           one contrastive (6-row) UNet step, SD1.5 512^2 and SDXL 1024^2, fp16: base-only, naive
                      sequential, peft mixed batch, cgkernels eager (with the merge that ran: extension or reference)
  adapter-mix         a different LoRA per prompt: 8 prompts with 1, 3, 8 distinct LoRAs in one CFG step (one call,
                      adapters_per_prompt) against peft's mixed batch, one call per adapter, one per prompt, base-only
  extras              end-to-end sampling (30 steps) and one joint training step
  unet-compiled       the patched UNet under torch.compile(fullgraph=True) (inductor: the longest compile, so late)
  cuda-tests          the op test files' CUDA cases through pytest (own timeout; output streamed to OUT/cuda-tests.log)

Budget (one `run` call of timeout_s=600 holds it all): CGKERNELS_GPU_SUITE_BUDGET_S (the README's command: 540 s)
counts from gpu_suite.sh's start, the wheel install included; no stage starts with under MIN_STAGE_START_S left, and
each stage's timeout is cut to what is left. Estimated on an H100 (16 cores; not yet measured): wheel install 10-20
s, env 5-10 s, build 40-90 s in the background, kernel-bench 60-120 s (autotuning ~30 layer keys, outside the
timings), merge-bandwidth 10-20 s, kernel-correctness 60-100 s (about 40 Triton compiles), extension-correctness
15-25 s, unet-step 40-80 s, adapter-mix 20-40 s, extras 30-60 s, unet-compiled 20-120 s, cuda-tests whatever is left.

Timings (gpu_suite_stages.time_call): the median, min and max of >= 5 windows per timer ("events": CUDA events
around a window of eager calls; "graph": CUDA-graph replays of the same calls; "wall" on the CPU rehearsal), input
sets rotated when one set fits in L2, the first call of every set (Triton compile, autotuning) outside the windows,
and host_us_one_call_after_sync. Every ratio divides two times of one timer; summaries name it.

Every line of results.jsonl carries "stage", "kind" and "meta" (device, versions, commit from CGKERNELS_COMMIT,
rehearsal flag); the driver adds one "stage-end" line per stage (status ok / failed / timeout / skipped, seconds).
Rehearsal (CPU, no GPU): every stage at tiny sizes, Triton through its interpreter; the build is checked, failed on
purpose (the stages then do not see the checkout's extension) or run for real into a scratch folder
(CGKERNELS_GPU_REHEARSAL_BUILD=check|fail|real, see BackgroundBuild).
"""
from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS_FILE = "results.jsonl"
BUILD_LOG = "build.log"
STAGE_LOG = "stages.log"
CUDA_TESTS_LOG = "cuda-tests.log"


@dataclass(frozen=True)
class Stage:
    name: str
    timeout_s: int  # on the GPU
    rehearsal_timeout_s: int
    needs_build: bool = False  # wait for the background extension build first


STAGES = (
    Stage("env", 30, 60),
    Stage("kernel-bench", 150, 90),
    Stage("merge-bandwidth", 40, 60, needs_build=True),
    Stage("kernel-correctness", 120, 90),
    Stage("extension-correctness", 60, 60, needs_build=True),
    Stage("unet-step", 110, 90, needs_build=True),
    Stage("adapter-mix", 60, 60, needs_build=True),
    Stage("extras", 90, 60, needs_build=True),
    Stage("unet-compiled", 120, 60, needs_build=True),
    Stage("cuda-tests", 150, 60, needs_build=True),
)
BUILD_TIMEOUT_S = 240
GPU_BUDGET_S = 530  # a 600 s call: minus the machine's own margin and the results' copy
REHEARSAL_BUDGET_S = 170
MIN_STAGE_START_S = 30  # a stage with less than this left is skipped, not started
STAGE_RESERVE_S = 5  # each stage's timeout leaves this much of the budget for the kill and the driver's records
KILL_GRACE_S = 5  # SIGTERM, then SIGKILL to the whole process group
HIDE_EXTENSION_ENV = "CGKERNELS_GPU_SUITE_HIDE_EXTENSION"


# ----------------------------------------------------------------------------------------------------------------
# Records
# ----------------------------------------------------------------------------------------------------------------
def append_record(out: Path, record: dict) -> None:
    """One JSON line, flushed at once: whatever is written survives a later kill."""
    with open(out / RESULTS_FILE, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, default=str) + "\n")
        f.flush()


def environment_meta(rehearsal: bool) -> dict:
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cuda = torch.cuda.is_available()
    return dict(
        device=torch.cuda.get_device_name() if cuda else f"cpu ({platform.machine()}, {os.cpu_count()} cores)",
        torch=torch.__version__, triton=triton_version, cuda=torch.version.cuda,
        commit=os.environ.get("CGKERNELS_COMMIT") or _git_head(), rehearsal=rehearsal, python=platform.python_version(),
        # The extension build compiles on the CPU while this stage ran: host timings may be disturbed.
        build_running=os.environ.get("CGKERNELS_GPU_SUITE_BUILD_RUNNING") == "1",
    )


def _git_head():
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# ----------------------------------------------------------------------------------------------------------------
# Driver (parent process): stages in order, each a process session with its own timeout
# ----------------------------------------------------------------------------------------------------------------
def start_session(command, **popen_kwargs) -> subprocess.Popen:
    """A child in a process session of its own, so that stop_session reaches everything it started (ninja and the
    compilers, inductor's compile workers, pytest's children).

    A SIGTERM that arrives while the child is being spawned is held until Popen returns (raised inside Popen, it
    would leave a running child that no caller holds), then the child is stopped and the signal raised as
    KeyboardInterrupt, as the driver's handler does."""
    held = []
    in_main_thread = threading.current_thread() is threading.main_thread()  # signal.signal works only there
    if in_main_thread:
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: held.append(signum))
    try:
        process = subprocess.Popen(command, start_new_session=True, **popen_kwargs)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
    if held:
        stop_session(process)
        raise KeyboardInterrupt(f"signal {held[0]}")
    return process


def stop_session(process: subprocess.Popen) -> int:
    """SIGTERM to the child's whole process group, SIGKILL after KILL_GRACE_S; returns the exit status."""
    for sig, grace in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, None)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            return process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            continue
    return process.wait()


def _load_toolkit_module():
    """cgkernels/_cuda_toolkit.py by path: the driver runs before (and without) the package's heavy imports."""
    spec = importlib.util.spec_from_file_location("cgkernels_cuda_toolkit", REPO / "cgkernels" / "_cuda_toolkit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


find_cuda_home = _load_toolkit_module().find_cuda_home


class BackgroundBuild:
    """The extension build, started with the suite and waited for before the first stage that needs it.

    On the GPU the build goes to a scratch folder and its .so is moved into cgkernels/ only when complete, so a
    stage importing cgkernels meanwhile never sees a half-written library."""

    def __init__(self, out: Path, rehearsal: bool):
        self.out, self.rehearsal = out, rehearsal
        self.started = time.monotonic()
        env = dict(os.environ, MAX_JOBS=str(max(1, (os.cpu_count() or 2) - 2)))
        self.scratch = tempfile.TemporaryDirectory(prefix="cgkernels-build-")
        self.install = False
        self.cuda_home = None
        if rehearsal:
            command = self._rehearsal_command(env)
        else:
            self.cuda_home = find_cuda_home(env)
            if self.cuda_home is not None:
                env["CUDA_HOME"] = self.cuda_home
                env["PATH"] = os.pathsep.join([os.path.join(self.cuda_home, "bin"), env.get("PATH", "")])
            env.update(CGKERNELS_CUDA="1", CGKERNELS_CUDA_ARCH="90")
            command = self._scratch_build_command()
            self.install = True
        self.command = command
        self.log = open(out / BUILD_LOG, "w", encoding="utf-8")
        self.log.write(f"$ {' '.join(command)}  (MAX_JOBS={env['MAX_JOBS']}, CUDA_HOME={env.get('CUDA_HOME')})\n")
        self.log.flush()
        self.process = start_session(command, cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.result = None

    def _scratch_build_command(self) -> list:
        return [sys.executable, "setup.py", "-q", "build_ext", "--build-lib", os.path.join(self.scratch.name, "lib"),
                "--build-temp", os.path.join(self.scratch.name, "tmp")]

    def _rehearsal_command(self, env: dict) -> list:
        """CGKERNELS_GPU_REHEARSAL_BUILD: check (default: run setup.py without compiling, ~5 s; the stages use the
        checkout's own extension), fail (a build that fails, and the stages do not see the checkout's extension,
        as on a device whose build failed), real (the CPU build into a scratch folder; minutes on 2 cores)."""
        mode = rehearsal_build_mode()
        env["CGKERNELS_CUDA"] = "0"
        if mode == "check":
            return [sys.executable, "setup.py", "--name"]
        if mode == "fail":
            return [sys.executable, "-c", "import sys; sys.exit('rehearsal: simulated build failure')"]
        return self._scratch_build_command()

    @property
    def running(self) -> bool:
        return self.result is None and self.process.poll() is None

    def wait(self, deadline_s: float) -> dict:
        if self.result is not None:
            return self.result
        remaining = min(BUILD_TIMEOUT_S - (time.monotonic() - self.started), deadline_s)
        try:
            rc = self.process.wait(timeout=max(0.0, remaining))
            status = "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            rc, status = stop_session(self.process), "timeout"
        self.log.close()
        installed = self._install_built_library() if status == "ok" and self.install else None
        self.result = dict(status=status, rc=rc, seconds=round(time.monotonic() - self.started, 1),
                           command=" ".join(self.command), cuda_home=self.cuda_home, installed=installed,
                           extension_loads=_extension_loads(self.rehearsal))
        if status != "ok":  # the reason, in the results themselves (build.log has all of it)
            self.result["log_tail"] = (self.out / BUILD_LOG).read_text(errors="replace")[-3000:]
        self.scratch.cleanup()
        return self.result

    def _install_built_library(self, package_dir: Path = REPO / "cgkernels"):
        """Moves the built cgkernels/_C*.so into the checkout (atomically: copy beside it, then rename)."""
        built = glob.glob(os.path.join(self.scratch.name, "lib", "cgkernels", "_C*.so"))
        if not built:
            return None
        target = package_dir / os.path.basename(built[0])
        staging = target.with_name(target.name + ".partial")
        shutil.copy2(built[0], staging)
        os.replace(staging, target)
        return str(target)

    def stop(self) -> None:
        if self.process.poll() is None:
            stop_session(self.process)
        if not self.log.closed:
            self.log.close()
        self.scratch.cleanup()


def rehearsal_build_mode() -> str:
    mode = os.environ.get("CGKERNELS_GPU_REHEARSAL_BUILD", "check")
    if mode not in ("check", "fail", "real"):
        raise ValueError(f"CGKERNELS_GPU_REHEARSAL_BUILD must be check, fail or real, got {mode!r}")
    return mode


def _extension_loads(rehearsal: bool):
    """Whether cgkernels._C imports in a fresh stage process (True) or the import error (a list of one line)."""
    try:
        probe = subprocess.run([sys.executable, "-c", "import cgkernels._C"], cwd=REPO, capture_output=True,
                               text=True, timeout=60, env=_stage_env(rehearsal))
    except subprocess.TimeoutExpired:
        return ["timeout: importing cgkernels._C took over 60 s"]
    return True if probe.returncode == 0 else probe.stderr.strip().splitlines()[-1:]


def _hidden_extension_path() -> str:
    """A folder whose sitecustomize.py makes `import cgkernels._C` fail in every process that has it on PYTHONPATH:
    what a failed build looks like to the stages (CGKERNELS_GPU_REHEARSAL_BUILD=fail)."""
    folder = Path(tempfile.gettempdir()) / f"cgkernels-hide-extension-{os.getuid()}"
    folder.mkdir(exist_ok=True)
    (folder / "sitecustomize.py").write_text(
        "import sys\n"
        "sys.modules['cgkernels._C'] = None  # the rehearsal of a failed build (benchmarks/gpu_suite.py)\n")
    return str(folder)


def _stage_env(rehearsal: bool, **extra) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", **extra)
    paths = [str(REPO), env.get("PYTHONPATH", "")]
    if rehearsal and rehearsal_build_mode() == "fail":
        paths.insert(0, _hidden_extension_path())
        env[HIDE_EXTENSION_ENV] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    if rehearsal:
        env.update(TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    return env


def suite_started_at() -> float:
    """Wall-clock start of the run: gpu_suite.sh's start (its wheel install counts against the budget)."""
    try:
        return float(os.environ["CGKERNELS_GPU_SUITE_STARTED_AT"])
    except (KeyError, ValueError):
        return time.time()


def _raise_on_sigterm(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def run_suite(out: Path, rehearsal: bool, budget_s: float, only: set | None) -> int:
    out.mkdir(parents=True, exist_ok=True)
    # A SIGTERM to the driver unwinds through the stage and build cleanups (their process groups are killed).
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    deadline = suite_started_at() + budget_s
    started = time.monotonic()
    stage_log = open(out / STAGE_LOG, "a", encoding="utf-8")
    meta = None
    failures = 0
    wanted = [stage for stage in STAGES if only is None or stage.name in only]
    # The build (CPU) runs while the Triton-only stages use the GPU; stages that need it wait for it.
    build = BackgroundBuild(out, rehearsal) if any(stage.needs_build for stage in wanted) else None
    try:
        for stage in wanted:
            if stage.needs_build and build is not None and build.result is None:
                result = build.wait(deadline - time.time() - MIN_STAGE_START_S)
                append_record(out, dict(stage="build", kind="stage-end", meta=meta, **result))
                print(f"[gpu-suite] build: {result['status']} in {result['seconds']} s", flush=True)
                failures += result["status"] != "ok"
            left = deadline - time.time()
            if left < MIN_STAGE_START_S:
                append_record(out, dict(stage=stage.name, kind="stage-end", status="skipped",
                                        reason=f"budget spent ({left:.0f} s left < {MIN_STAGE_START_S} s)", meta=meta))
                print(f"[gpu-suite] {stage.name}: skipped ({left:.0f} s left)", flush=True)
                continue
            timeout = min(stage.rehearsal_timeout_s if rehearsal else stage.timeout_s, left - STAGE_RESERVE_S)
            build_running = build is not None and build.running
            status, seconds, rc = _run_stage(stage.name, out, rehearsal, timeout, stage_log, build_running)
            failures += status != "ok"
            if stage.name == "env":
                meta = _last_meta(out)
            append_record(out, dict(stage=stage.name, kind="stage-end", status=status, rc=rc, seconds=seconds,
                                    timeout_s=round(timeout), build_running=build_running, meta=meta))
            print(f"[gpu-suite] {stage.name}: {status} in {seconds} s (timeout {timeout:.0f} s)", flush=True)
        if build is not None and build.result is None:  # no stage needed it: still record how it went
            result = build.wait(max(1.0, deadline - time.time()))
            append_record(out, dict(stage="build", kind="stage-end", meta=meta, **result))
            failures += result["status"] != "ok"
    finally:
        if build is not None:
            build.stop()
        stage_log.close()
    print(f"[gpu-suite] done in {time.monotonic() - started:.0f} s ({time.time() - suite_started_at():.0f} s since "
          f"gpu_suite.sh started), {failures} stage(s) not ok", flush=True)
    return 1 if failures else 0


def _run_stage(name: str, out: Path, rehearsal: bool, timeout: float, log,
               build_running: bool) -> tuple[str, float, int | None]:
    command = [sys.executable, str(Path(__file__).resolve()), "--stage", name, "--out", str(out)]
    if rehearsal:
        command.append("--rehearsal")
    log.write(f"\n===== {name} (timeout {timeout:.0f} s) =====\n")
    log.flush()
    start = time.monotonic()
    env = _stage_env(rehearsal, CGKERNELS_GPU_STAGE_DEADLINE=str(time.time() + timeout),
                     CGKERNELS_GPU_SUITE_BUILD_RUNNING="1" if build_running else "0")
    process = start_session(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        rc = process.wait(timeout=timeout)
        status = "ok" if rc == 0 else "failed"
    except subprocess.TimeoutExpired:
        rc, status = stop_session(process), "timeout"
    except BaseException:  # the driver itself is stopped (SIGTERM, Ctrl-C): the stage goes with it
        stop_session(process)
        raise
    log.flush()
    return status, round(time.monotonic() - start, 1), rc


def _last_meta(out: Path):
    path = out / RESULTS_FILE
    for line in reversed(path.read_text().splitlines() if path.exists() else []):
        record = json.loads(line)
        if record.get("kind") == "env":
            return record["meta"]
    return None


# ----------------------------------------------------------------------------------------------------------------
# Stage process
# ----------------------------------------------------------------------------------------------------------------
class Context:
    """What a stage needs: where to write, which sizes (GPU or rehearsal), the device, its deadline, and a record
    function."""

    def __init__(self, stage: str, out: Path, rehearsal: bool):
        import torch

        self.stage, self.out, self.rehearsal = stage, out, rehearsal
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if not rehearsal and self.device.type != "cuda":
            raise RuntimeError("the GPU suite needs a CUDA device (use --rehearsal on CPU)")
        self.meta = environment_meta(rehearsal)
        self.deadline = float(os.environ.get("CGKERNELS_GPU_STAGE_DEADLINE", time.time() + 3600))
        self.failures = 0

    def seconds_left(self) -> float:
        return self.deadline - time.time()

    def record(self, kind: str, /, **fields) -> None:
        append_record(self.out, dict(stage=self.stage, kind=kind, **fields, meta=self.meta))

    def check(self, ok: bool, kind: str, /, **fields) -> None:
        """A pass/fail record; a failure makes the stage exit non-zero (after the rest of it ran)."""
        self.failures += not ok
        self.record(kind, ok=bool(ok), **fields)

    def guarded(self, kind: str, fn, /, **fields):
        """Runs fn() (no arguments); an exception is recorded (with its traceback tail) instead of ending the stage;
        fields say what was being done."""
        try:
            return fn()
        except Exception as error:  # noqa: BLE001 (every failure is recorded and counted)
            self.failures += 1
            self.record(kind, ok=False, error=f"{type(error).__name__}: {error}"[:2000],
                        traceback=traceback.format_exc()[-3000:], **fields)
            print(traceback.format_exc(), flush=True)
            return None


def main_stage(name: str, out: Path, rehearsal: bool) -> int:
    from gpu_suite_stages import STAGE_FUNCTIONS  # the stage bodies (heavy imports) live next to this file

    ctx = Context(name, out, rehearsal)
    STAGE_FUNCTIONS[name](ctx)
    return 1 if ctx.failures else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--rehearsal", action="store_true", help="CPU, tiny sizes, Triton interpreter")
    parser.add_argument("--budget-s", type=float, default=None, help="wall-time budget of the whole suite")
    parser.add_argument("--only", default=None, help="comma-separated stage names (default: all)")
    parser.add_argument("--stage", default=None, help=argparse.SUPPRESS)  # internal: run one stage's body
    args = parser.parse_args(argv)
    if args.stage is not None:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        return main_stage(args.stage, args.out, args.rehearsal)
    budget = args.budget_s if args.budget_s is not None else (REHEARSAL_BUDGET_S if args.rehearsal else GPU_BUDGET_S)
    only = None if args.only is None else set(args.only.split(","))
    unknown = (only or set()) - {stage.name for stage in STAGES}
    if unknown:
        parser.error(f"unknown stage(s) {sorted(unknown)}; stages: {[stage.name for stage in STAGES]}")
    if args.rehearsal:
        rehearsal_build_mode()  # a bad mode fails here, before anything starts
    return run_suite(args.out, args.rehearsal, budget, only)


if __name__ == "__main__":
    sys.exit(main())
