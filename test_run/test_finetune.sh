#!/bin/sh
# End-to-end check of an install: builds tiny random models and the dummy KB, then trains RAG with
# the question encoder, context encoder and generator all learning, re-encoding the KB and swapping
# in a new index every 5 optimizer steps while training goes on. CPU by default, GPUs when present.
# Run from the repository root: sh test_run/test_finetune.sh
set -e
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

MODELS=test_run/tiny-models
KB=test_run/dummy-kb
OUT=${OUT:-test_run/model_checkpoints/run-$(date +%Y%m%d-%H%M%S)}

python test_run/make_tiny_models.py --output_dir $MODELS
if [ ! -e $KB/my_knowledge_dataset ]; then
    python use_own_knowledge_dataset.py --csv_path $KB/my_knowledge_dataset.csv --output_dir $KB \
        --dpr_ctx_encoder_model_name $MODELS/context_encoder
fi

GPUS=$(python -c "import torch; print(torch.cuda.device_count())")
# Training on GPU 0, the encoding actors on the others (docs/gpus.md); with one GPU they share half of it.
if [ "$GPUS" -gt 1 ]; then DEVICE_FLAGS="--gpus 1 --index_gpus $((GPUS - 1))"
elif [ "$GPUS" -eq 1 ]; then DEVICE_FLAGS="--gpus 1 --index_gpus 0.5"
else DEVICE_FLAGS="--accelerator cpu --devices 1"; fi

python finetune_rag.py \
    --model_name_or_path $MODELS/rag_token \
    --model_type rag_token \
    --context_encoder_name $MODELS/context_encoder \
    --passages_path $KB/my_knowledge_dataset \
    --index_path $KB/my_knowledge_dataset_hnsw_index.faiss \
    --data_dir test_run/dummy-train-data \
    --output_dir $OUT \
    $DEVICE_FLAGS \
    --do_train --do_predict --end2end \
    --indexing_freq 5 \
    --num_retrieval_workers 2 \
    --train_batch_size 2 --eval_batch_size 4 \
    --num_train_epochs 3 \
    --learning_rate 1e-3 --warmup_steps 5 --lr_scheduler polynomial \
    --label_smoothing 0.1 --max_grad_norm 1.0 \
    --max_source_length 128 --max_target_length 25 --val_max_target_length 25 --test_max_target_length 25

echo "test_finetune.sh: OK. Logs, checkpoints and KB versions are in $OUT"
