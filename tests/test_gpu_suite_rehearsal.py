"""The GPU suite's CPU rehearsal: `CGKERNELS_GPU_REHEARSAL=1 OUT=dir bash benchmarks/gpu_suite.sh` runs every stage
at tiny sizes (Triton through the interpreter) and writes the same files the GPU run writes, so the script cannot
rot between GPU sessions.

- The full rehearsal runs with CGKERNELS_GPU_REHEARSAL_BUILD=fail: the build fails and the stages do not see the
  checkout's extension, as on a device whose build failed. Every other stage must still pass, guidance_merge runs
  its reference fallback, and unet-step still records the cgkernels variant, with merge "reference".
- The default build mode (the extension in place) runs the stages that record which merge ran: "extension".
- The driver's pieces that a CPU cannot reach in the rehearsal (budget cut-off, killing a stage's whole process
  group, CUDA_HOME from nvcc, ratios per timer, input rotation) are tested directly."""
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# The driver module only (its stage bodies load in the stage processes), under a name of its own.
_spec = importlib.util.spec_from_file_location("cgkernels_gpu_suite", ROOT / "benchmarks" / "gpu_suite.py")
gpu_suite = sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_suite)
RESULTS_FILE, STAGES = gpu_suite.RESULTS_FILE, gpu_suite.STAGES

META_FIELDS = {"device", "torch", "triton", "cuda", "commit", "rehearsal", "build_running"}
# Records each stage must have written (kind -> at least this many), beyond its stage-end line.
EXPECTED_RECORDS = {
    "env": {"env": 1},
    "kernel-bench": {"bench": 7, "bench-summary": 2},
    "merge-bandwidth": {"merge-bandwidth": 6},
    "kernel-correctness": {"forward": 6, "gradient": 6},
    "extension-correctness": {"extension": 1, "merge": 12, "pipeline": 2},
    "unet-step": {"unet-step": 8, "unet-step-summary": 2},
    "adapter-mix": {"adapter-mix": 15, "adapter-mix-agreement": 3, "adapter-mix-summary": 3},
    "extras": {"end-to-end": 3, "train-step": 2},
    "unet-compiled": {"unet-compiled": 1},
    "cuda-tests": {"pytest": 1},
}
SUMMARY_KINDS = {"bench-summary", "unet-step-summary", "adapter-mix-summary", "merge-bandwidth"}


def _rehearse(out: Path, build_mode: str, **env_extra):
    env = dict(os.environ, CGKERNELS_GPU_REHEARSAL="1", CGKERNELS_GPU_REHEARSAL_BUILD=build_mode, OUT=str(out),
               PYTHON=sys.executable, CGKERNELS_COMMIT="rehearsal-commit",
               # Unloaded, the whole rehearsal takes about a minute on 2 cores; the larger budget keeps the test
               # from failing on a machine that other jobs keep busy.
               CGKERNELS_GPU_SUITE_BUDGET_S="360", **env_extra)
    env.pop("TRITON_INTERPRET", None)  # the driver sets it for its stages; the parent needs no Triton at all
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_suite.sh")], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=420)
    records = [json.loads(line) for line in (out / RESULTS_FILE).read_text().splitlines()]
    return result, records


@pytest.fixture(scope="module")
def failed_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-suite-failed-build")
    result, records = _rehearse(out, "fail")
    return result, records, out


def test_every_stage_ran_in_order_and_only_the_failed_build_is_reported(failed_build):
    result, records, out = failed_build
    ends = [r for r in records if r["kind"] == "stage-end"]
    by_stage = {r["stage"]: r for r in ends}
    assert by_stage["build"]["status"] == "failed"
    not_ok = {name: (end["status"], end.get("seconds")) for name, end in by_stage.items()
              if name != "build" and end["status"] != "ok"}
    assert not not_ok, f"stages not ok: {not_ok}\n{(out / 'stages.log').read_text()[-6000:]}"
    stage_order = [r["stage"] for r in ends if r["stage"] != "build"]
    assert stage_order == [stage.name for stage in STAGES]
    # The build is waited for right before the first stage that needs it (merge-bandwidth), after kernel-bench.
    assert [r["stage"] for r in ends].index("build") == stage_order.index("merge-bandwidth")
    assert result.returncode == 1, "a failed build must make the suite's exit status non-zero"
    assert "simulated build failure" in (out / "build.log").read_text()
    assert "simulated build failure" in by_stage["build"]["log_tail"]
    # The stages did not see the checkout's extension (as after a failed build on the device).
    assert by_stage["build"]["extension_loads"] is not True


def test_each_stage_recorded_its_results_with_metadata(failed_build):
    _, records, out = failed_build
    for record in records:
        if record["stage"] == "build" or record["kind"] == "stage-end" and record["stage"] == "env":
            continue
        meta = record["meta"]
        assert META_FIELDS <= set(meta), record
        assert meta["commit"] == "rehearsal-commit" and meta["rehearsal"] is True
    for stage, kinds in EXPECTED_RECORDS.items():
        for kind, least in kinds.items():
            found = [r for r in records if r["stage"] == stage and r["kind"] == kind]
            assert len(found) >= least, f"{stage}: {len(found)} {kind!r} records, expected >= {least}"
            assert all(r.get("ok", True) for r in found), [r for r in found if not r.get("ok", True)]
    # The kernel checks ran at rank 128 (concatenated pos+neg adapters) against float64, in both layouts.
    assert any(r["kind"] == "forward" and r["rank"] == 128 for r in records)
    assert {r["layout"] for r in records if r["kind"] in ("forward", "gradient")} == {"grouped", "stress"}
    assert "1 passed" in (out / gpu_suite.CUDA_TESTS_LOG).read_text()


def test_failed_build_falls_back_to_the_reference_merge_and_keeps_the_headline(failed_build):
    _, records, _ = failed_build
    cgkernels_steps = [r for r in records if r["kind"] == "unet-step" and r["variant"] == "cgkernels"]
    assert {r["model"] for r in cgkernels_steps} == {"sd15", "sdxl"}
    assert all(r["merge"] == "reference" for r in cgkernels_steps)
    summaries = [r for r in records if r["kind"] == "unet-step-summary"]
    assert summaries and all(r["merge"] == "reference" and "cgkernels_vs_peft-mixed" in r for r in summaries)
    bandwidth = [r for r in records if r["kind"] == "merge-bandwidth"]
    assert bandwidth and all(r["merge"] == "reference" for r in bandwidth)
    assert [r["loaded"] for r in records if r["kind"] == "extension"] == [False]
    assert all(r["merge"] == "reference" for r in records if r["kind"] in ("merge", "pipeline"))


def test_kernel_bench_records_name_their_layout_and_every_summary_its_timer(failed_build):
    _, records, _ = failed_build
    bench = [r for r in records if r["kind"] in ("bench", "bench-summary")]
    assert bench and all(r["layout"] in ("grouped", "interleaved") for r in bench)
    grouped = [r for r in bench if r["layout"] == "grouped"]
    assert grouped and bench[0]["layout"] == "grouped", "the layout the patch emits is measured, and first"
    assert {r["variant"] for r in grouped if r["kind"] == "bench"} == {
        "cublas base-only", "cgkernels", "torch lora path", "peft mixed batch"}
    for record in records:
        if record["kind"] in SUMMARY_KINDS:
            assert record["timer"] == "wall", record  # the CPU rehearsal's only timer
    for record in (r for r in records if r["kind"] in ("bench", "unet-step", "unet-compiled") and "wall" in r):
        stats = record["wall"]
        assert stats["windows"] >= 5 and stats["min_us"] <= stats["median_us"] <= stats["max_us"], record
        assert record["host_us_one_call_after_sync"]["windows"] >= 5
    assert all(r["input_sets"] >= 3 for r in records if r["kind"] == "bench")


def test_default_build_records_the_extension_merge(tmp_path):
    result, records = _rehearse(tmp_path, "check", CGKERNELS_GPU_SUITE_ONLY="env,merge-bandwidth,unet-step")
    ends = {r["stage"]: r["status"] for r in records if r["kind"] == "stage-end"}
    assert ends == {"env": "ok", "build": "ok", "merge-bandwidth": "ok", "unet-step": "ok"}, result.stdout[-3000:]
    assert result.returncode == 0
    merges = {r["merge"] for r in records if r["kind"] in ("merge-bandwidth", "unet-step-summary")}
    assert merges == {"extension"}


# ----------------------------------------------------------------------------------------------------------------
# Driver pieces
# ----------------------------------------------------------------------------------------------------------------
def test_no_stage_starts_with_under_30_s_of_budget_left(tmp_path):
    env = dict(os.environ, CGKERNELS_GPU_SUITE_STARTED_AT=str(time.time() - 100))  # gpu_suite.sh started 100 s ago
    env.pop("TRITON_INTERPRET", None)
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--out", str(tmp_path),
                             "--rehearsal", "--budget-s", "125", "--only", "env,kernel-bench"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    ends = [json.loads(line) for line in (tmp_path / RESULTS_FILE).read_text().splitlines()]
    statuses = {r["stage"]: r["status"] for r in ends if r["kind"] == "stage-end"}
    assert statuses == {"env": "skipped", "kernel-bench": "skipped"}, result.stdout
    assert "budget spent" in ends[0]["reason"]


def test_documented_gpu_budget_fits_one_600_s_call():
    readme = (Path("/work/shared/gpu/README.md"))
    budget = gpu_suite.GPU_BUDGET_S
    if readme.exists():
        text = readme.read_text()
        assert "timeout_s: 600" in text and "CGKERNELS_GPU_SUITE_BUDGET_S=" in text
        budget = int(text.split("CGKERNELS_GPU_SUITE_BUDGET_S=")[1].split(";")[0])
    # The last stage is cut to the budget, then killed within KILL_GRACE_S; the driver's records follow.
    assert budget + gpu_suite.KILL_GRACE_S + 15 <= 600
    assert gpu_suite.MIN_STAGE_START_S == 30
    assert [stage.name for stage in STAGES][-2:] == ["unet-compiled", "cuda-tests"]


def _gone(pid: int, wait_s: float = 5.0) -> bool:
    """The process has exited: no such pid, or a zombie (killed, its parent gone, not yet reaped by this sandbox's
    init, which can take a while: os.kill(pid, 0) still succeeds on a zombie)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state in ("Z", "X"):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def test_stop_session_kills_the_whole_process_group(tmp_path):
    marker = tmp_path / "grandchild.pid"
    process = gpu_suite.start_session(["bash", "-c", f"sleep 300 & echo $! > {marker}; wait"])
    for _ in range(100):
        if marker.exists() and marker.read_text().strip():
            break
        time.sleep(0.05)
    grandchild = int(marker.read_text())
    gpu_suite.stop_session(process)
    assert _gone(grandchild)  # a stage's compiler or worker processes die with it


def test_extension_probe_reports_a_timeout(monkeypatch):
    def hang(*args, **kwargs):
        raise subprocess.TimeoutExpired(args[0], kwargs.get("timeout"))

    monkeypatch.setattr(gpu_suite.subprocess, "run", hang)
    assert "timeout" in gpu_suite._extension_loads(rehearsal=True)[0]


def test_cuda_home_from_nvcc(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    toolkit = tmp_path / "toolkit"
    (toolkit / "bin").mkdir(parents=True)
    nvcc = fake / "nvcc"  # a wrapper elsewhere, as on machines that put nvcc on PATH through a script
    nvcc.write_text(f"#!/bin/sh\necho '#$ _HERE_={toolkit / 'bin'}' >&2\n")
    nvcc.chmod(0o755)
    assert gpu_suite.find_cuda_home({"PATH": str(fake)}) == str(toolkit)
    assert gpu_suite.find_cuda_home({"PATH": str(fake), "CUDA_HOME": "/opt/cuda"}) == "/opt/cuda"


def _stages_module():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_suite_stages
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return gpu_suite_stages


def test_ratios_never_mix_timers():
    stages = _stages_module()

    def stats(us):
        return dict(median_us=us, min_us=us, max_us=us, windows=5, calls_per_window=10)

    times = {"cgkernels": {"graph": stats(10.0), "events": stats(20.0)}, "cublas": {"graph": stats(8.0),
             "events": stats(16.0)}, "peft": {"events": stats(40.0)}}
    pairs = {"vs_cublas": ("cgkernels", "cublas"), "vs_peft": ("cgkernels", "peft")}
    summaries = {s["timer"]: s for s in stages.timer_ratios(times, pairs)}
    assert summaries == {"graph": {"timer": "graph", "vs_cublas": 1.25},
                         "events": {"timer": "events", "vs_cublas": 1.25, "vs_peft": 0.5}}


def test_time_call_rotates_inputs_and_warms_every_set_outside_the_windows():
    stages = _stages_module()
    calls = []
    ctx = SimpleNamespace(device=torch.device("cpu"), rehearsal=True)
    result = stages.time_call(ctx, calls.append, 3, graphable=True, calls=4)
    assert calls[:3] == [0, 1, 2]  # warm-up (compile, autotune) of every set first
    windows = calls[3 + stages.WINDOWS:]  # after the host-time samples
    assert len(windows) == stages.WINDOWS * 6 and windows[:6] == [0, 1, 2, 0, 1, 2]  # whole rotations
    assert result["wall"]["windows"] == stages.WINDOWS and result["wall"]["calls_per_window"] == 6
    assert result["input_sets"] == 3 and "graph" not in result and "events" not in result


def _children(pid: int) -> list[int]:
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children += [int(c) for c in (task / "children").read_text().split()]
    return children


def test_a_stopped_driver_takes_its_running_stage_down(tmp_path):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    driver = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--out", str(tmp_path),
                               "--rehearsal", "--only", "kernel-bench"], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        stage = None
        for _ in range(200):
            children = _children(driver.pid)
            if children:
                stage = children[0]
                break
            time.sleep(0.05)
        assert stage is not None, "the stage process did not start"
        driver.terminate()
        driver.wait(timeout=30)
        assert _gone(stage)
    finally:
        if driver.poll() is None:
            driver.kill()


def test_a_finished_build_is_moved_into_the_package_whole(tmp_path):
    scratch = tmp_path / "scratch"
    (scratch / "lib" / "cgkernels").mkdir(parents=True)
    (scratch / "lib" / "cgkernels" / "_C.cpython-3xx.so").write_bytes(b"\x7fELF built")
    package = tmp_path / "cgkernels"
    package.mkdir()
    build = SimpleNamespace(scratch=SimpleNamespace(name=str(scratch)))
    installed = gpu_suite.BackgroundBuild._install_built_library(build, package)
    assert installed == str(package / "_C.cpython-3xx.so")
    assert sorted(p.name for p in package.iterdir()) == ["_C.cpython-3xx.so"]  # no partial file left behind
    assert (package / "_C.cpython-3xx.so").read_bytes() == b"\x7fELF built"
