#!/bin/sh
# The CPU table (docs/results/cpu-table-2026-11-30.md): CMU Wikipedia QA with three seeds and COVID-QA with one, each zero-shot,
# RAG-original and RAG-end2end (experiments/qa_cpu.sh). The first seed of each set runs first, so an
# interrupted run still holds one complete comparison per set; run it again to go on where it stopped.
#   sh experiments/cpu_table.sh SHARED_DATA_DIR [OUT]
# SHARED_DATA_DIR holds cmu_qa/ (the CMU Question/Answer Dataset v1.2) and covid_qa/200423_covidQA.json.
set -e
cd "$(dirname "$0")/.."
DATA=${1:?usage: sh experiments/cpu_table.sh SHARED_DATA_DIR [OUT]}
OUT=${2:-experiments/runs}
START=$(date +%s)
sh experiments/qa_cpu.sh cmu "$DATA/cmu_qa" "$OUT/cmu" 1
N_TEST=${N_TEST:-160} sh experiments/qa_cpu.sh covid "$DATA/covid_qa/200423_covidQA.json" "$OUT/covid" 1
sh experiments/qa_cpu.sh cmu "$DATA/cmu_qa" "$OUT/cmu" "1 2 3"
echo "cpu_table.sh: done in $(($(date +%s) - START)) s; tables in $OUT/cmu/table.md and $OUT/covid/table.md"
