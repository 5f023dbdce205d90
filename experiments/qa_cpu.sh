#!/bin/sh
# Zero-shot vs RAG-original vs RAG-end2end with real pretrained weights on a 2-core CPU, on one QA set:
#   sh experiments/qa_cpu.sh cmu   /path/to/Question_Answer_Dataset_v1.2 OUT [SEEDS]
#   sh experiments/qa_cpu.sh covid /path/to/200423_covidQA.json          OUT [SEEDS]
# Models: all-MiniLM-L6-v2 as question and context encoder (two copies), scored as its authors trained it
# (mean pooling, cosine similarity, read from its sentence-transformers files; retrieval temperature 0.05,
# the scale of its training loss), and SmolLM2-135M-Instruct as a causal RAG-token generator over N_DOCS passages.
# Data: the questions whose answer occurs in their article, split by article; the KB holds every article
# of the set, so the other articles are distractors. Every test question counts for EM, F1 and recall@k.
# Zero-shot runs once (nothing in it depends on the seed); the trained runs once per seed.
# Finished steps are skipped when the script is run again; nothing existing is overwritten.
set -e
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
SET=${1:?usage: sh experiments/qa_cpu.sh cmu|covid INPUT OUT [SEEDS]}
INPUT=${2:?usage: sh experiments/qa_cpu.sh cmu|covid INPUT OUT [SEEDS]}
OUT=${3:?usage: sh experiments/qa_cpu.sh cmu|covid INPUT OUT [SEEDS]}
SEEDS=${4:-1}
. experiments/cpu_setting.sh
case $SET in
    cmu) PREPARE="data_prep/prepare_cmu_qa.py --input_dir $INPUT" ;;
    covid) PREPARE="data_prep/prepare_squad.py --input $INPUT" ;;
    *) echo "unknown set $SET: cmu or covid" >&2; exit 2 ;;
esac
[ -e "$OUT/data/stats.json" ] || python $PREPARE --output_dir "$OUT/data" --require_gold_passage \
    --test_fraction "$TEST_FRACTION" --seed 42
build_kb
stamp "data and KB v0 ready"

# The retriever alone, before any training: recall@k and MRR@k over every test question.
[ -e "$OUT/zero-shot-retrieval.json" ] || python eval_rag.py --eval_mode retrieval \
    --question_encoder_name_or_path $PRE/minilm --passages_path "$OUT/kb/my_knowledge_dataset" \
    --index_path "$OUT/kb/my_knowledge_dataset_hnsw_index.faiss" --evaluation_set "$OUT/data/test.source" \
    --gold_data_path "$OUT/data/test.gold.jsonl" --predictions_path "$OUT/zero-shot-retrieval.txt" \
    --metrics_path "$OUT/zero-shot-retrieval.json"

[ -e "$OUT/zero-shot/test_results.txt" ] || python finetune_rag.py "$@" --output_dir "$OUT/zero-shot" --do_predict
stamp "zero-shot tested"
for SEED in $SEEDS; do
    # RAG-original: the context encoder stays frozen and the KB is never re-encoded.
    RUN="$OUT/rag-original-seed$SEED"
    [ -e "$RUN/test_results.txt" ] || python finetune_rag.py "$@" --output_dir "$RUN" $TRAIN --seed "$SEED" \
        --do_predict
    stamp "RAG-original seed $SEED trained and tested"
    # RAG-end2end: the context encoder learns too; Ray actors re-encode the KB every INDEXING_FREQ steps
    # while training goes on, and once more with the final weights before validation (on 2 cores a refresh
    # takes longer than the whole run's training, so without it the index tested would be version 0 or 1).
    RUN="$OUT/rag-end2end-seed$SEED"
    [ -e "$RUN/test_results.txt" ] || python finetune_rag.py "$@" --output_dir "$RUN" $TRAIN --seed "$SEED" \
        --do_predict --end2end --indexing_freq "$INDEXING_FREQ" --refresh_before_validation
    stamp "RAG-end2end seed $SEED trained and tested"
done

ORIGINAL=$(for s in $SEEDS; do printf '%s ' "$OUT/rag-original-seed$s"; done)
END2END=$(for s in $SEEDS; do printf '%s ' "$OUT/rag-end2end-seed$s"; done)
python tools/make_results_table.py "$OUT/zero-shot" $ORIGINAL $END2END \
    --names zero-shot $(for s in $SEEDS; do printf 'RAG-original '; done) \
    $(for s in $SEEDS; do printf 'RAG-end2end '; done) --output "$OUT/table.md"
echo "qa_cpu.sh: done in $(($(date +%s) - START)) s; table in $OUT/table.md"
