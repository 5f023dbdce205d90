#!/bin/sh
# Small-scale RAG-end2end on a 2-core CPU with real pretrained weights: zero-shot, RAG-original and
# RAG-end2end side by side on the CMU Wikipedia QA set, then one Markdown table (EM, F1, recall@5).
#   sh experiments/cmu_qa_cpu.sh /path/to/Question_Answer_Dataset_v1.2 [OUT]
# Models: all-MiniLM-L6-v2 with mean pooling as question and context encoder (two copies, as in RAG),
# SmolLM2-135M-Instruct as a causal RAG-token generator over n_docs passages.
# Data: questions whose answer occurs in their article (yes/no answers have nothing to retrieve); the KB
# holds all 129 articles (6,311 100-word passages), so every other article is a distractor.
# Finished steps are skipped when the script is run again; nothing existing is overwritten.
set -e
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
CMU=${1:?usage: sh experiments/cmu_qa_cpu.sh CMU_QA_DIR [OUT]}
OUT=${2:-experiments/runs/cmu_qa_cpu}
PRE=pretrained
# Sizes, chosen to finish in under an hour on 2 cores; override from the environment.
N_TRAIN=${N_TRAIN:-200}
N_VAL=${N_VAL:-40}
BATCH=${BATCH:-4}
INDEXING_FREQ=${INDEXING_FREQ:-20}
N_DOCS=${N_DOCS:-3}
START=$(date +%s)
stamp() { echo "== $(($(date +%s) - START)) s: $*"; }

python install_pretrained_models.py --output_dir $PRE
[ -e "$OUT/data/stats.json" ] || python prepare_cmu_qa.py --input_dir "$CMU" --output_dir "$OUT/data" \
    --require_gold_passage
[ -e "$OUT/kb/my_knowledge_dataset" ] || python use_own_knowledge_dataset.py --csv_path "$OUT/data/kb.csv" \
    --output_dir "$OUT/kb" --dpr_ctx_encoder_model_name $PRE/minilm --pooling mean --index_type flat --device cpu
stamp "data and KB v0 ready"

set -- --generator_type causal --model_type rag_token \
    --question_encoder_name_or_path $PRE/minilm --question_pooling mean \
    --context_encoder_name $PRE/minilm --context_pooling mean \
    --generator_name_or_path $PRE/smollm2-135m-instruct \
    --passages_path "$OUT/kb/my_knowledge_dataset" --index_path "$OUT/kb/my_knowledge_dataset_hnsw_index.faiss" \
    --index_type flat --data_dir "$OUT/data" --n_train "$N_TRAIN" --n_val "$N_VAL" \
    --accelerator cpu --devices 1 --num_retrieval_workers 1 \
    --n_docs "$N_DOCS" --eval_batch_size 8 --max_source_length 64 --max_combined_length 256 \
    --max_target_length 24 --val_max_target_length 16 --test_max_target_length 16
TRAIN="--do_train --train_batch_size $BATCH --num_train_epochs 1 --num_sanity_val_steps 0 \
    --learning_rate 5e-5 --warmup_steps 5 --lr_scheduler linear --max_grad_norm 1.0"

[ -e "$OUT/zero-shot/test_results.txt" ] || python finetune_rag.py "$@" --output_dir "$OUT/zero-shot" --do_predict
stamp "zero-shot tested"
# RAG-original: the context encoder stays frozen and the KB is never re-encoded.
[ -e "$OUT/rag-original/test_results.txt" ] || python finetune_rag.py "$@" --output_dir "$OUT/rag-original" \
    $TRAIN --do_predict
stamp "RAG-original trained and tested"
# RAG-end2end: the context encoder learns too; Ray actors re-encode the KB every INDEXING_FREQ steps.
[ -e "$OUT/rag-end2end/test_results.txt" ] || python finetune_rag.py "$@" --output_dir "$OUT/rag-end2end" \
    $TRAIN --do_predict --end2end --indexing_freq "$INDEXING_FREQ"
stamp "RAG-end2end trained and tested"

python make_results_table.py "$OUT/zero-shot" "$OUT/rag-original" "$OUT/rag-end2end" \
    --names zero-shot RAG-original RAG-end2end --output "$OUT/table.md"
echo "cmu_qa_cpu.sh: done in $(($(date +%s) - START)) s; table in $OUT/table.md"
