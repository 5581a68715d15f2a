#!/usr/bin/env bash
# Everything a lent GPU session runs, in one call (see ../shared/gpu/README.md):
#   here:   ../shared/gpu/wheels.sh                         # diffusers & co. into .whl/ (the device image lacks them)
#   device: CGKERNELS_COMMIT=<sha of HEAD here> bash benchmarks/gpu_suite.sh   # carry [".whl"]; results in $OUT
#           (the device gets the working tree without .git, so the commit measured is passed in)
# CPU rehearsal of the same script (tiny sizes, Triton interpreter; tests/test_gpu_suite_rehearsal.py runs it):
#   CGKERNELS_GPU_REHEARSAL=1 OUT=<dir> bash benchmarks/gpu_suite.sh   (CGKERNELS_GPU_SUITE_BUDGET_S=<s> overrides
#   the total budget: 530 s on the GPU, 170 s in the rehearsal)
#
# benchmarks/gpu_suite.py runs the stages in priority order, each in its own process with its own timeout, and
# appends results to $OUT/results.jsonl as they happen; the extension build runs in the background meanwhile
# ($OUT/build.log) and a failed build does not stop the Triton stages. Budget: 9 minutes in all on the GPU.
# Commit $OUT/results.jsonl (and the logs) under benchmarks/results/.
set -uo pipefail
OUT=${OUT:-gpu-results}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
rehearsal=()
if [ "${CGKERNELS_GPU_REHEARSAL:-0}" = "1" ]; then
  rehearsal=(--rehearsal)
elif ls .whl/*.whl >/dev/null 2>&1 && ! "$PYTHON" -c "import diffusers" 2>/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
budget=()
if [ -n "${CGKERNELS_GPU_SUITE_BUDGET_S:-}" ]; then budget=(--budget-s "$CGKERNELS_GPU_SUITE_BUDGET_S"); fi
exec "$PYTHON" benchmarks/gpu_suite.py --out "$OUT" "${rehearsal[@]}" "${budget[@]}"
