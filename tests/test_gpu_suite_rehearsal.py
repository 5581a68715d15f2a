"""The GPU suite's CPU rehearsal: `CGKERNELS_GPU_REHEARSAL=1 OUT=dir bash benchmarks/gpu_suite.sh` runs every stage
at tiny sizes (Triton through the interpreter) and writes the same files the GPU run writes, so the script cannot
rot between GPU sessions. The build is made to fail on purpose: the other stages must run regardless (the rehearsal
uses the checkout's own extension), and the failure must be on record."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The driver module only (its stage bodies load in the stage processes), under a name of its own.
_spec = importlib.util.spec_from_file_location("cgkernels_gpu_suite", ROOT / "benchmarks" / "gpu_suite.py")
gpu_suite = sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_suite)
RESULTS_FILE, STAGES = gpu_suite.RESULTS_FILE, gpu_suite.STAGES

META_FIELDS = {"device", "torch", "triton", "cuda", "commit", "rehearsal"}
# Records each stage must have written (kind -> at least this many), beyond its stage-end line.
EXPECTED_RECORDS = {
    "env": {"env": 1},
    "kernel-correctness": {"forward": 6, "gradient": 3},
    "kernel-bench": {"bench": 4, "bench-summary": 1},
    "extension-correctness": {"extension": 1, "merge": 12, "pipeline": 2},
    "unet-step": {"unet-step": 8, "unet-step-summary": 2},
    "merge-bandwidth": {"merge-bandwidth": 6},
    "unet-compiled": {"unet-compiled": 1},
    "extras": {"end-to-end": 3, "train-step": 2},
    "cuda-tests": {"pytest": 1},
}


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-suite")
    env = dict(os.environ, CGKERNELS_GPU_REHEARSAL="1", CGKERNELS_GPU_REHEARSAL_BUILD="fail", OUT=str(out),
               PYTHON=sys.executable, CGKERNELS_COMMIT="rehearsal-commit",
               # Unloaded, the rehearsal takes about a minute and a half on 2 cores; the larger budget keeps the test
               # from failing on a machine that other jobs keep busy.
               CGKERNELS_GPU_SUITE_BUDGET_S="360")
    env.pop("TRITON_INTERPRET", None)  # the driver sets it for its stages; the parent needs no Triton at all
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_suite.sh")], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=400)
    records = [json.loads(line) for line in (out / RESULTS_FILE).read_text().splitlines()]
    return result, records, out


def test_every_stage_ran_and_only_the_failed_build_is_reported(rehearsal):
    result, records, out = rehearsal
    ends = {r["stage"]: r for r in records if r["kind"] == "stage-end"}
    assert ends["build"]["status"] == "failed"
    not_ok = {name: (end["status"], end.get("seconds")) for name, end in ends.items()
              if name != "build" and end["status"] != "ok"}
    assert not not_ok, f"stages not ok: {not_ok}\n{(out / 'stages.log').read_text()[-6000:]}"
    assert set(ends) == {stage.name for stage in STAGES} | {"build"}
    assert result.returncode == 1, "a failed build must make the suite's exit status non-zero"
    assert "simulated build failure" in (out / "build.log").read_text()
    assert "simulated build failure" in ends["build"]["log_tail"]


def test_each_stage_recorded_its_results_with_metadata(rehearsal):
    _, records, _ = rehearsal
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
    # The kernel checks ran at rank 128 (concatenated pos+neg adapters) against float64.
    assert any(r["kind"] == "forward" and r["rank"] == 128 for r in records)
