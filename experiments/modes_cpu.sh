#!/bin/sh
# Every --training_mode on one CPU-sized setting, one table (README: "Training recipes compared"):
#   sh experiments/modes_cpu.sh /path/to/Question_Answer_Dataset_v1.2 OUT [SEEDS] [MODES]
# The setting of experiments/qa_cpu.sh (CMU Wikipedia QA, questions whose answer is in their article, split by
# article, the whole set's articles as the KB): all-MiniLM-L6-v2 as question and context encoder (mean pooling,
# cosine, tau 0.05, as its authors trained it), SmolLM2-135M-Instruct as a causal RAG-token generator over
# N_DOCS passages, the same 30 optimizer steps, learning rate and seeds for every recipe. Recipes whose
# context encoder learns re-encode the KB every INDEXING_FREQ steps and once more before validation, so
# each is tested against an index of its final weights. retriever_only has no generator: EM/F1 are dashes.
# Finished runs are skipped when the script is run again; nothing existing is overwritten.
set -e
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
INPUT=${1:?usage: sh experiments/modes_cpu.sh CMU_QA_DIR OUT [SEEDS] [MODES]}
OUT=${2:?usage: sh experiments/modes_cpu.sh CMU_QA_DIR OUT [SEEDS] [MODES]}
SEEDS=${3:-1}
MODES=${4:-"retriever_only lsr ralt dalm rag_original rag_end2end"}
PRE=pretrained
N_TRAIN=${N_TRAIN:-120}
N_VAL=${N_VAL:-16}
BATCH=${BATCH:-4}
INDEXING_FREQ=${INDEXING_FREQ:-10}
N_TEST=${N_TEST:--1}
N_DOCS=${N_DOCS:-2}
LR=${LR:-5e-5}
HARD_NEGATIVES=${HARD_NEGATIVES:-3}
START=$(date +%s)
stamp() { echo "== $(($(date +%s) - START)) s: $*"; }

python install_pretrained_models.py --output_dir $PRE
[ -e "$OUT/data/stats.json" ] || python prepare_cmu_qa.py --input_dir "$INPUT" --output_dir "$OUT/data" \
    --require_gold_passage --test_fraction 0.2 --seed 42
[ -e "$OUT/kb/my_knowledge_dataset" ] || python use_own_knowledge_dataset.py --csv_path "$OUT/data/kb.csv" \
    --output_dir "$OUT/kb" --dpr_ctx_encoder_model_name $PRE/minilm --index_type flat --device cpu
stamp "data and KB v0 ready"

set -- --generator_type causal --model_type rag_token \
    --question_encoder_name_or_path $PRE/minilm --context_encoder_name $PRE/minilm \
    --generator_name_or_path $PRE/smollm2-135m-instruct \
    --passages_path "$OUT/kb/my_knowledge_dataset" --index_path "$OUT/kb/my_knowledge_dataset_hnsw_index.faiss" \
    --index_type flat --data_dir "$OUT/data" --n_train "$N_TRAIN" --n_val "$N_VAL" --n_test "$N_TEST" \
    --accelerator cpu --devices 1 --num_retrieval_workers 1 \
    --n_docs "$N_DOCS" --eval_batch_size 8 --max_source_length 64 --max_combined_length 256 \
    --max_target_length 24 --val_max_target_length 12 --test_max_target_length 12 --no_test_loss \
    --do_train --do_predict --train_batch_size "$BATCH" --num_train_epochs 1 --num_sanity_val_steps 0 \
    --learning_rate "$LR" --warmup_steps 3 --lr_scheduler linear --max_grad_norm 1.0

RUNS="" NAMES=""
for SEED in $SEEDS; do
    for MODE in $MODES; do
        RUN="$OUT/$MODE-seed$SEED"
        case $MODE in
            rag_end2end | lsr | dalm) EXTRA="--indexing_freq $INDEXING_FREQ --refresh_before_validation" ;;
            retriever_only) EXTRA="--indexing_freq $INDEXING_FREQ --refresh_before_validation \
                --hard_negatives $HARD_NEGATIVES" ;;
            *) EXTRA="" ;;
        esac
        [ -e "$RUN/test_results.txt" ] || python finetune_rag.py "$@" --output_dir "$RUN" --seed "$SEED" \
            --training_mode "$MODE" $EXTRA
        stamp "$MODE seed $SEED trained and tested"
        RUNS="$RUNS $RUN" NAMES="$NAMES $MODE"
    done
done
python make_results_table.py $RUNS --names $NAMES --output "$OUT/table.md"
echo "modes_cpu.sh: done in $(($(date +%s) - START)) s; table in $OUT/table.md"
