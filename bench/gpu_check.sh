#!/usr/bin/env bash
# The GPU check: one command for a lent GPU machine (under 8 minutes on one H100 by its timeouts), and its CPU
# dry run, which CI runs (tests/test_gpu_check.py) so the check works before any lease. bench/README.md, "The GPU
# check", says what to run in which device-tool call.
#   bash bench/gpu_check.sh          # on the GPU machine, in each device-tool call (OUT=$OUT there): the
#                                    # first ones stage the wheels' parts they carry, the last one runs it all
#   bash bench/gpu_check.sh --cpu    # every step on CPU; the CUDA parts are skipped, and it says so
# Steps: (1) install the carried wheels (bench/gpu_carry.py: Ray, FAISS, datasets, torchdata and what they need,
# which that machine lacks) into /tmp/site, pip check them (a conflict among carried packages stops the check),
# and import what the check imports; (2) the GPU tests (tests/test_gpu.py, skipped without CUDA): every recipe a
# few CUDA steps in bf16-mixed and 16-mixed, a refresh sharing the GPU, bf16 encoding, CUDA against CPU; and the
# other files marked gpu (tests/test_faiss_gpu.py: skipped there unless a GPU faiss is installed);
# (3) bench/gpu_check.py: a KB refresh against a bare bf16 forward pass, and the tiny models trained end to end
# in bf16-mixed without and with a refresh whose encoding actor shares the GPU, with the trainer's and the whole
# device's memory. Writes $OUT/gpu_check.json and $OUT/gpu_check.log.
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=gpu
[ "${1:-}" = "--cpu" ] && MODE=cpu
OUT=${OUT:-/tmp/gpu-check}
PY=${PYTHON:-python3}
# Timeouts send SIGINT first (pytest then still prints its summary and each test's time), SIGKILL 15 s later.
TESTS_TIMEOUT=190    # s; the GPU tests
FIGURES_TIMEOUT=230  # s; bench/gpu_check.py, which writes its JSON after each part, so a timeout keeps the first
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
echo "# gpu_check ($MODE), $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false RAY_AUTH_MODE=disabled HF_DATASETS_DISABLE_PROGRESS_BARS=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # the package of this checkout: the GPU machine does not install it

# 1. The wheels the GPU machine lacks, carried in one or more calls (not in the dry run: the venv has them, and
# the planned wheels are for the GPU machine's Python).
CARRIED=$(compgen -G ".gpu-carry/call*" || compgen -G /tmp/gpu-carry-stash/manifest.json)
if [ "$MODE" = gpu ] && [ -n "$CARRIED" ]; then
    $PY bench/gpu_carry.py install --target /tmp/site
    rc=$?
    [ $rc -eq 3 ] && { echo "gpu_check: parts staged; send the next call now"; exit 0; }
    [ $rc -eq 0 ] || exit $rc
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
$PY bench/gpu_carry.py check || { echo "gpu_check: carried packages conflict (bench/gpu_carry.py PACKAGES)"; exit 2; }
# Everything the tests and the figures import, before any of them runs: one clear failure instead of many.
IMPORTS="ray, faiss, datasets, torchdata, rag_end2end.training.finetune, rag_end2end.evaluation.evaluate, rag_end2end.deploy.answer"
$PY -c "import $IMPORTS" || { echo "gpu_check: an import failed (bench/gpu_carry.py PACKAGES)"; exit 2; }
if [ "$MODE" = gpu ] && ! $PY -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "gpu_check: no CUDA device here; run with --cpu for the dry run"; exit 2
fi

# 2. The GPU tests: every test file marked gpu (tests/test_gpu.py, tests/test_faiss_gpu.py, ...).
GPU_TESTS=$(grep -lE 'pytest\.mark\.gpu\b' tests/test_*.py)
echo "gpu_check: GPU tests in" $GPU_TESTS
timeout -s INT -k 15 $TESTS_TIMEOUT $PY -m pytest -v -rs --durations=0 -m gpu $GPU_TESTS -p no:cacheprovider
TESTS_RC=$?
[ $TESTS_RC -eq 124 ] && echo "gpu_check: the GPU tests were stopped at ${TESTS_TIMEOUT} s"
[ $TESTS_RC -eq 5 ] && TESTS_RC=0  # none collected would be a bug, but pytest says 5 when all are deselected
if [ "$MODE" = cpu ]; then echo "gpu_check: the GPU tests skipped (no CUDA)"; fi

# 3. The figures, side by side in one run.
CPU_FLAG=""
[ "$MODE" = cpu ] && CPU_FLAG="--cpu" && echo "gpu_check: CUDA parts skipped (no CUDA): float32, encoding actor on CPU"
timeout -s INT -k 15 $FIGURES_TIMEOUT $PY bench/gpu_check.py --out "$OUT" $CPU_FLAG --tests_rc $TESTS_RC
RC=$?
[ $RC -eq 124 ] && echo "gpu_check: the figures were stopped at ${FIGURES_TIMEOUT} s (the JSON holds the parts done)"
echo "gpu_check: done (tests $TESTS_RC, measurements $RC); $OUT/gpu_check.json"
[ $TESTS_RC -eq 0 ] || exit $TESTS_RC
exit $RC
