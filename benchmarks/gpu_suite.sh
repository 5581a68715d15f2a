#!/usr/bin/env bash
# Everything a lent GPU session runs, in one call (see ../shared/gpu/README.md):
#   here:   ../shared/gpu/wheels.sh hypothesis sortedcontainers attrs   # diffusers & co. into .whl/ (the device image
#           lacks them; hypothesis and its dependencies for the cuda-tests stage)
#   device: (run tool: carry [".whl"], timeout_s 600)
#           export PYTHONUNBUFFERED=1 CGKERNELS_COMMIT=<sha of HEAD here> CGKERNELS_GPU_SUITE_BUDGET_S=540;
#           bash benchmarks/gpu_suite.sh 2>&1 | tail -c 200000 > $OUT/suite.log; true
#           (the device gets the working tree without .git, so the commit measured is passed in)
# CPU rehearsal of the same script (tiny sizes, Triton interpreter; tests/test_gpu_suite_rehearsal.py runs it):
#   CGKERNELS_GPU_REHEARSAL=1 OUT=<dir> bash benchmarks/gpu_suite.sh
#   CGKERNELS_GPU_REHEARSAL_BUILD=fail: the build fails and the stages do not see the checkout's extension (what a
#   failed build looks like on the device): guidance_merge falls back to its reference and the records say so.
#
# CGKERNELS_GPU_SUITE_BUDGET_S: the whole run's wall-time budget in seconds, counted from this script's start (the
# wheel install included); default 530 on the GPU, 170 in the rehearsal. Keep it about 60 s under the call's
# timeout_s. CGKERNELS_GPU_SUITE_ONLY=stage,stage runs only those stages.
# benchmarks/gpu_suite.py runs the stages in priority order, each in its own process session with its own timeout
# (killed whole), and appends results to $OUT/results.jsonl as they happen; the extension build runs in the
# background meanwhile ($OUT/build.log). Commit $OUT's files under benchmarks/results/.
set -uo pipefail
export CGKERNELS_GPU_SUITE_STARTED_AT=${CGKERNELS_GPU_SUITE_STARTED_AT:-$(date +%s.%N)}
OUT=${OUT:-gpu-results}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
args=(--out "$OUT")
if [ "${CGKERNELS_GPU_REHEARSAL:-0}" = "1" ]; then
  args+=(--rehearsal)
elif ls .whl/*.whl >/dev/null 2>&1 && ! "$PYTHON" -c "import diffusers" 2>/dev/null; then
  echo "[gpu-suite] installing .whl/ into /tmp/site"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
if [ -n "${CGKERNELS_GPU_SUITE_BUDGET_S:-}" ]; then args+=(--budget-s "$CGKERNELS_GPU_SUITE_BUDGET_S"); fi
if [ -n "${CGKERNELS_GPU_SUITE_ONLY:-}" ]; then args+=(--only "$CGKERNELS_GPU_SUITE_ONLY"); fi
exec "$PYTHON" benchmarks/gpu_suite.py "${args[@]}"
