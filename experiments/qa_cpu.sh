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
PRE=pretrained
# Sizes; override from the environment. On 2 cores a CMU seed (RAG-original + RAG-end2end) takes about 40
# minutes alone and zero-shot about 10: the 30 training steps of a 135M generator over 2 passages are
# compute-bound (about 17 s a step), and so is a refresh of 6,311 passages.
N_TRAIN=${N_TRAIN:-120}
N_VAL=${N_VAL:-16}
BATCH=${BATCH:-4}
INDEXING_FREQ=${INDEXING_FREQ:-10}
N_TEST=${N_TEST:--1}  # questions for EM/F1 (the first N); recall@k always counts every test question
N_DOCS=${N_DOCS:-2}
LR=${LR:-5e-5}
TEST_FRACTION=${TEST_FRACTION:-0.2}
START=$(date +%s)
stamp() { echo "== $(($(date +%s) - START)) s: $*"; }

python install_pretrained_models.py --output_dir $PRE
case $SET in
    cmu) PREPARE="prepare_cmu_qa.py --input_dir $INPUT" ;;
    covid) PREPARE="prepare_squad.py --input $INPUT" ;;
    *) echo "unknown set $SET: cmu or covid" >&2; exit 2 ;;
esac
[ -e "$OUT/data/stats.json" ] || python $PREPARE --output_dir "$OUT/data" --require_gold_passage \
    --test_fraction "$TEST_FRACTION" --seed 42
[ -e "$OUT/kb/my_knowledge_dataset" ] || python use_own_knowledge_dataset.py --csv_path "$OUT/data/kb.csv" \
    --output_dir "$OUT/kb" --dpr_ctx_encoder_model_name $PRE/minilm --index_type flat --device cpu
stamp "data and KB v0 ready"

# The retriever alone, before any training: recall@k and MRR@k over every test question.
[ -e "$OUT/zero-shot-retrieval.json" ] || python eval_rag.py --eval_mode retrieval \
    --question_encoder_name_or_path $PRE/minilm --passages_path "$OUT/kb/my_knowledge_dataset" \
    --index_path "$OUT/kb/my_knowledge_dataset_hnsw_index.faiss" --evaluation_set "$OUT/data/test.source" \
    --gold_data_path "$OUT/data/test.gold.jsonl" --predictions_path "$OUT/zero-shot-retrieval.txt" \
    --metrics_path "$OUT/zero-shot-retrieval.json"

set -- --generator_type causal --model_type rag_token \
    --question_encoder_name_or_path $PRE/minilm --context_encoder_name $PRE/minilm \
    --generator_name_or_path $PRE/smollm2-135m-instruct \
    --passages_path "$OUT/kb/my_knowledge_dataset" --index_path "$OUT/kb/my_knowledge_dataset_hnsw_index.faiss" \
    --index_type flat --data_dir "$OUT/data" --n_train "$N_TRAIN" --n_val "$N_VAL" --n_test "$N_TEST" \
    --accelerator cpu --devices 1 --num_retrieval_workers 1 \
    --n_docs "$N_DOCS" --eval_batch_size 8 --max_source_length 64 --max_combined_length 256 \
    --max_target_length 24 --val_max_target_length 12 --test_max_target_length 12 \
    --no_test_loss  # test_loss costs a forward pass as long as generating; the table does not need it
TRAIN="--do_train --train_batch_size $BATCH --num_train_epochs 1 --num_sanity_val_steps 0 \
    --learning_rate $LR --warmup_steps 3 --lr_scheduler linear --max_grad_norm 1.0"

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
python make_results_table.py "$OUT/zero-shot" $ORIGINAL $END2END \
    --names zero-shot $(for s in $SEEDS; do printf 'RAG-original '; done) \
    $(for s in $SEEDS; do printf 'RAG-end2end '; done) --output "$OUT/table.md"
echo "qa_cpu.sh: done in $(($(date +%s) - START)) s; table in $OUT/table.md"
