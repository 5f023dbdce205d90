#!/bin/sh
# Questions generated from the KB instead of written by people (docs/results/generated-questions-2026-11-30.md):
#   sh experiments/generated_qa_cpu.sh /path/to/Question_Answer_Dataset_v1.2 OUT [SEEDS] [MAX_PASSAGES]
# The setting of experiments/modes_cpu.sh (pass the same OUT to reuse its data, KB and retriever_only runs):
# data_prep/generate_qa.py writes a question, then its answer, for MAX_PASSAGES (default 300) seeded KB passages with the
# packaged SmolLM2-135M-Instruct; retriever_only trains on the generated train split (validation on the generated
# val split: no real question is seen before the test), and is tested on the REAL test questions, beside the
# zero-shot retriever and retriever_only trained on the real training questions (same steps, seeds and flags).
# The answers play no part in retriever_only, and the 135M model's are rarely copied from the passage, so the
# generated pairs are filtered without the extractive filter (its counts are kept in generated-extractive-stats.json).
# Finished steps are skipped when the script is run again; nothing existing is overwritten.
set -e
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
USAGE="usage: sh experiments/generated_qa_cpu.sh CMU_QA_DIR OUT [SEEDS] [MAX_PASSAGES]"
INPUT=${1:?$USAGE}
OUT=${2:?$USAGE}
SEEDS=${3:-1}
MAX_PASSAGES=${4:-300}
. experiments/cpu_setting.sh
HARD_NEGATIVES=${HARD_NEGATIVES:-3}
prepare_cmu
build_kb
stamp "data and KB v0 ready"

GEN="$OUT/generated"
GENERATE="data_prep/generate_qa.py --passages_path $OUT/kb/my_knowledge_dataset --generator_name_or_path \
    $PRE/smollm2-135m-instruct --output_dir $GEN --max_passages $MAX_PASSAGES --max_new_tokens 40 --seed 42"
if [ ! -e "$OUT/generated-extractive-stats.json" ]; then
    python $GENERATE
    cp "$GEN/stats.json" "$OUT/generated-extractive-stats.json"
fi
grep -q '"extractive": false' "$GEN/stats.json" || python $GENERATE --overwrite --no_extractive  # refilter only
stamp "questions generated"

# Generated train and val splits, the real test split.
DATA="$OUT/data-generated"
if [ ! -e "$DATA/test.source" ]; then
    mkdir -p "$DATA"
    for f in train.source train.target train.gold.jsonl val.source val.target val.gold.jsonl; do
        cp "$GEN/$f" "$DATA/$f"
    done
    cp "$OUT/data/test.source" "$OUT/data/test.target" "$OUT/data/test.gold.jsonl" "$DATA/"
fi

RETRIEVER="--training_mode retriever_only --indexing_freq $INDEXING_FREQ --refresh_before_validation \
    --hard_negatives $HARD_NEGATIVES"
[ -e "$OUT/zero-shot-retriever/test_results.txt" ] || python finetune_rag.py "$@" \
    --output_dir "$OUT/zero-shot-retriever" --do_predict --training_mode retriever_only
RUNS="$OUT/zero-shot-retriever" NAMES="zero-shot"
for SEED in $SEEDS; do
    RUN="$OUT/retriever_only-seed$SEED"  # real training questions: modes_cpu.sh's run
    [ -e "$RUN/test_results.txt" ] || python finetune_rag.py "$@" --output_dir "$RUN" $TRAIN --seed "$SEED" \
        --do_predict $RETRIEVER
    RUN="$OUT/retriever_only-generated-seed$SEED"
    [ -e "$RUN/test_results.txt" ] || python finetune_rag.py "$@" --data_dir "$DATA" --output_dir "$RUN" $TRAIN \
        --seed "$SEED" --do_predict $RETRIEVER
    stamp "seed $SEED trained and tested"
    RUNS="$RUNS $OUT/retriever_only-seed$SEED $RUN" NAMES="$NAMES real-questions generated-questions"
done
python tools/make_results_table.py $RUNS --names $NAMES --output "$OUT/generated-table.md"
echo "generated_qa_cpu.sh: done in $(($(date +%s) - START)) s; table in $OUT/generated-table.md"
