#!/usr/bin/env bash
# The GPU check: one command for a lent GPU machine (a few minutes on one GPU; under 8 by its timeouts),
# and its CPU dry run, which CI runs (tests/test_gpu_check.py) so the check works before any lease.
#   bash bench/gpu_check.sh          # on the GPU machine, in the device tool's last call (OUT=$OUT there)
#   bash bench/gpu_check.sh --cpu    # every step on CPU; the CUDA parts are skipped, and it says so
# Steps: (1) install the carried wheels (bench/gpu_carry.py: Ray, FAISS, datasets, which that machine lacks)
# into /tmp/site; (2) the GPU tests (tests/test_gpu.py, skipped without CUDA); (3) bench/gpu_check.py: a KB
# refresh against a bare bf16 forward pass, and the tiny models trained end to end in bf16-mixed without and
# with a refresh whose encoding actor shares the GPU. Writes $OUT/gpu_check.json and $OUT/gpu_check.log.
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=gpu
[ "${1:-}" = "--cpu" ] && MODE=cpu
OUT=${OUT:-/tmp/gpu-check}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
echo "# gpu_check ($MODE), $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false RAY_AUTH_MODE=disabled HF_DATASETS_DISABLE_PROGRESS_BARS=1

# 1. The wheels the GPU machine lacks, carried in one or more calls (none in the dry run: the venv has them).
if compgen -G ".gpu-carry/call*" > /dev/null || [ -f /tmp/gpu-carry-stash/manifest.json ]; then
    $PY bench/gpu_carry.py install --target /tmp/site
    rc=$?
    [ $rc -eq 3 ] && { echo "gpu_check: parts staged; send the next call now"; exit 0; }
    [ $rc -eq 0 ] || exit $rc
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
$PY -c "import ray, faiss, datasets" || { echo "gpu_check: ray, faiss or datasets missing (bench/gpu_carry.py)"; exit 2; }
if [ "$MODE" = gpu ] && ! $PY -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "gpu_check: no CUDA device here; run with --cpu for the dry run"; exit 2
fi

# 2. The GPU tests.
timeout 180 $PY -m pytest -q -rs -m gpu tests/test_gpu.py -p no:cacheprovider
TESTS_RC=$?
[ $TESTS_RC -eq 5 ] && TESTS_RC=0  # none collected would be a bug, but pytest says 5 when all are deselected
if [ "$MODE" = cpu ]; then echo "gpu_check: the GPU tests skipped (no CUDA)"; fi

# 3. The figures, side by side in one run.
CPU_FLAG=""
[ "$MODE" = cpu ] && CPU_FLAG="--cpu" && echo "gpu_check: CUDA parts skipped (no CUDA): float32, encoding actor on CPU"
timeout 270 $PY bench/gpu_check.py --out "$OUT" $CPU_FLAG --tests_rc $TESTS_RC
RC=$?
echo "gpu_check: done (tests $TESTS_RC, measurements $RC); $OUT/gpu_check.json"
exit $RC
