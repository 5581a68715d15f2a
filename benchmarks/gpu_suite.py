"""The GPU session's driver: priority-ordered stages, each in its own subprocess with its own timeout, results
appended to OUT/results.jsonl the moment they exist, so a run killed at any point keeps everything that finished.

    python benchmarks/gpu_suite.py --out DIR [--rehearsal] [--budget-s S] [--only STAGE,...]
    (normally through benchmarks/gpu_suite.sh; CGKERNELS_GPU_REHEARSAL=1 there = --rehearsal)

Order (the first GPU minutes go to what matters most; see STAGES for each stage's timeout):
  (background)        the extension build starts first (sm_90 only, ninja, parallel jobs; OUT/build.log) and runs
                      on the CPU while the Triton-only stages use the GPU
  env                 device, driver, torch/triton/CUDA versions, packages, commit
  kernel-correctness  multi_lora_linear against float64 at SD1.5/SDXL shapes (image and 2x77-row text segments),
                      fp16/bf16, ranks 8/64/128, every config forced once, gradients on one shape, fp32 routing
  kernel-bench        GPU time (CUDA graph replay, else events) and host us per call: cuBLAS base-only, cgkernels,
                      the unfused torch LoRA path, peft mixed batch; SD1.5 and SDXL shapes, ranks 8 and 64
  -- waits for the build (a failed build is recorded; the stages below record the extension error and go on) --
  extension-correctness  guidance_merge against float64, the patched tiny SD1.5/SDXL pipelines against per-branch
                      references, on the device
  unet-step           one contrastive (6-row) UNet step, SD1.5 512^2 and SDXL 1024^2, fp16: base-only, naive
                      sequential, peft mixed batch, cgkernels eager
  merge-bandwidth     guidance_merge GB/s against a device-to-device copy at >= 64 MB, K = 2, 4, 6, with/without rescale
  unet-compiled       the patched UNet under torch.compile(fullgraph=True) (the error is recorded if it fails)
  extras              end-to-end sampling (30 steps) and one joint training step
  cuda-tests          the op test files' CUDA cases through pytest (summary line recorded)

Estimated GPU-machine time (H100/H200, 16 cores; not yet measured): wheels 10 s, env 10 s, build 60-120 s in the
background, kernel-correctness 100-130 s (first Triton compiles of ~70 kernel variants, ~50 autotuned keys),
kernel-bench ~60 s, extension-correctness ~20 s, unet-step 60-90 s, merge-bandwidth ~15 s, unet-compiled 20 s (fails
fast) to 120 s (inductor), extras ~40 s, cuda-tests whatever is left of the 530 s budget.

Every line of results.jsonl carries "stage", "kind" and "meta" (device, versions, commit from CGKERNELS_COMMIT,
rehearsal flag); the driver adds one "stage-end" line per stage (status ok / failed / timeout / skipped, seconds).
Rehearsal (CPU, no GPU): every stage at tiny sizes, Triton through its interpreter; the build is checked, failed on
purpose or run for real into a scratch folder (CGKERNELS_GPU_REHEARSAL_BUILD=check|fail|real, see BackgroundBuild).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS_FILE = "results.jsonl"
BUILD_LOG = "build.log"
STAGE_LOG = "stages.log"


@dataclass(frozen=True)
class Stage:
    name: str
    timeout_s: int  # on the GPU
    rehearsal_timeout_s: int
    needs_build: bool = False  # wait for the background extension build first


STAGES = (
    Stage("env", 30, 60),
    Stage("kernel-correctness", 150, 60),
    Stage("kernel-bench", 150, 60),
    Stage("extension-correctness", 60, 60, needs_build=True),
    Stage("unet-step", 110, 60, needs_build=True),
    Stage("merge-bandwidth", 40, 60, needs_build=True),
    Stage("unet-compiled", 120, 60, needs_build=True),
    Stage("extras", 90, 60, needs_build=True),
    Stage("cuda-tests", 150, 60, needs_build=True),
    Stage("adapter-mix", 60, 60, needs_build=True),
)
BUILD_TIMEOUT_S = 240
GPU_BUDGET_S = 530  # 9 minutes minus a margin for the shell script's wheel install
REHEARSAL_BUDGET_S = 170
STAGE_RESERVE_S = 3  # each stage's timeout leaves this much of the budget for the driver's own records


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
    )


def _git_head():
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# ----------------------------------------------------------------------------------------------------------------
# Driver (parent process): stages in order, each a subprocess with its own timeout
# ----------------------------------------------------------------------------------------------------------------
class BackgroundBuild:
    """The extension build, started with the suite and waited for before the first stage that needs it."""

    def __init__(self, out: Path, rehearsal: bool):
        self.out, self.rehearsal = out, rehearsal
        self.started = time.monotonic()
        env = dict(os.environ, MAX_JOBS=str(max(1, (os.cpu_count() or 2) - 2)))
        self.scratch = None
        if rehearsal:
            command = self._rehearsal_command(env)
        else:
            env.update(CGKERNELS_CUDA="1", CGKERNELS_CUDA_ARCH="90")
            command = [sys.executable, "setup.py", "-q", "build_ext", "--inplace"]
        self.command = command
        self.log = open(out / BUILD_LOG, "w", encoding="utf-8")
        self.log.write(f"$ {' '.join(command)}  (MAX_JOBS={env['MAX_JOBS']})\n")
        self.log.flush()
        self.process = subprocess.Popen(command, cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.result = None

    def _rehearsal_command(self, env: dict) -> list:
        """CGKERNELS_GPU_REHEARSAL_BUILD: check (default: run setup.py without compiling, ~5 s), fail (a build
        that fails: the stages must carry on), real (the CPU build into a scratch folder; minutes on 2 cores).
        The rehearsal's stages use the checkout's own extension either way."""
        mode = os.environ.get("CGKERNELS_GPU_REHEARSAL_BUILD", "check")
        env["CGKERNELS_CUDA"] = "0"
        if mode == "check":
            return [sys.executable, "setup.py", "--name"]
        if mode == "fail":
            return [sys.executable, "-c", "import sys; sys.exit('rehearsal: simulated build failure')"]
        if mode == "real":
            self.scratch = tempfile.TemporaryDirectory(prefix="cgkernels-rehearsal-build-")
            return [sys.executable, "setup.py", "-q", "build_ext", "--build-lib", self.scratch.name,
                    "--build-temp", os.path.join(self.scratch.name, "tmp")]
        raise ValueError(f"CGKERNELS_GPU_REHEARSAL_BUILD must be check, fail or real, got {mode!r}")

    def wait(self, deadline_s: float) -> dict:
        if self.result is not None:
            return self.result
        remaining = min(BUILD_TIMEOUT_S - (time.monotonic() - self.started), deadline_s)
        try:
            rc = self.process.wait(timeout=max(0.0, remaining))
            status = "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            self.process.kill()
            rc, status = self.process.wait(), "timeout"
        self.log.close()
        loads = _extension_loads() if status == "ok" and not self.rehearsal else None
        self.result = dict(status=status, rc=rc, seconds=round(time.monotonic() - self.started, 1),
                           command=" ".join(self.command), extension_loads=loads)
        if status != "ok":  # the reason, in the results themselves (build.log has all of it)
            self.result["log_tail"] = (self.out / BUILD_LOG).read_text(errors="replace")[-3000:]
        if self.scratch is not None:
            self.scratch.cleanup()
        return self.result


def _extension_loads():
    """Whether cgkernels._C imports in a fresh process (True) or the import error."""
    probe = subprocess.run([sys.executable, "-c", "import cgkernels._C"], cwd=REPO, capture_output=True, text=True,
                           timeout=60, env=_stage_env(False))
    return True if probe.returncode == 0 else probe.stderr.strip().splitlines()[-1:]


def _stage_env(rehearsal: bool) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    if rehearsal:
        env.update(TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    return env


def run_suite(out: Path, rehearsal: bool, budget_s: float, only: set | None) -> int:
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    stage_log = open(out / STAGE_LOG, "a", encoding="utf-8")
    meta = None
    failures = 0
    wanted = [stage for stage in STAGES if only is None or stage.name in only]
    # The build (CPU) runs while the Triton-only stages use the GPU; stages that need it wait for it.
    build = BackgroundBuild(out, rehearsal) if any(stage.needs_build for stage in wanted) else None
    for stage in wanted:
        left = budget_s - (time.monotonic() - started) - STAGE_RESERVE_S
        if stage.needs_build and build is not None and build.result is None:
            result = build.wait(left)
            append_record(out, dict(stage="build", kind="stage-end", meta=meta, **result))
            print(f"[gpu-suite] build: {result['status']} in {result['seconds']} s", flush=True)
            failures += result["status"] != "ok"
            left = budget_s - (time.monotonic() - started) - STAGE_RESERVE_S
        timeout = min(stage.rehearsal_timeout_s if rehearsal else stage.timeout_s, left)
        if timeout < 5:
            append_record(out, dict(stage=stage.name, kind="stage-end", status="skipped", reason="budget spent",
                                    meta=meta))
            continue
        status, seconds, rc = _run_stage(stage.name, out, rehearsal, timeout, stage_log)
        failures += status != "ok"
        if stage.name == "env":
            meta = _last_meta(out)
        append_record(out, dict(stage=stage.name, kind="stage-end", status=status, rc=rc, seconds=seconds,
                                timeout_s=round(timeout), meta=meta))
        print(f"[gpu-suite] {stage.name}: {status} in {seconds} s (timeout {timeout:.0f} s)", flush=True)
    if build is not None and build.result is None:  # no stage needed it: still record how it went
        result = build.wait(max(1.0, budget_s - (time.monotonic() - started)))
        append_record(out, dict(stage="build", kind="stage-end", meta=meta, **result))
    stage_log.close()
    print(f"[gpu-suite] done in {time.monotonic() - started:.0f} s, {failures} stage(s) not ok", flush=True)
    return 1 if failures else 0


def _run_stage(name: str, out: Path, rehearsal: bool, timeout: float, log) -> tuple[str, float, int | None]:
    command = [sys.executable, str(Path(__file__).resolve()), "--stage", name, "--out", str(out)]
    if rehearsal:
        command.append("--rehearsal")
    log.write(f"\n===== {name} (timeout {timeout:.0f} s) =====\n")
    log.flush()
    start = time.monotonic()
    process = subprocess.Popen(command, cwd=REPO, env=_stage_env(rehearsal), stdout=log, stderr=subprocess.STDOUT)
    try:
        rc = process.wait(timeout=timeout)
        status = "ok" if rc == 0 else "failed"
    except subprocess.TimeoutExpired:
        process.kill()
        rc, status = process.wait(), "timeout"
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
    """What a stage needs: where to write, which sizes (GPU or rehearsal), the device, and a record function."""

    def __init__(self, stage: str, out: Path, rehearsal: bool):
        import torch

        self.stage, self.out, self.rehearsal = stage, out, rehearsal
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if not rehearsal and self.device.type != "cuda":
            raise RuntimeError("the GPU suite needs a CUDA device (use --rehearsal on CPU)")
        self.meta = environment_meta(rehearsal)
        self.failures = 0

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
    return run_suite(args.out, args.rehearsal, budget, only)


if __name__ == "__main__":
    sys.exit(main())
