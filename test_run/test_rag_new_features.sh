#!/bin/sh
# Builds the RAG model with a trainable context encoder (--end2end) and the Ray retriever, without training:
# checks that this install assembles them. The reference's setters, set_context_encoder_for_training and
# set_ctx_encoder_tokenizer, are RagModel methods here (tests/test_rag_model.py calls them as its users do).
set -e
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
python test_run/make_tiny_models.py --output_dir test_run/tiny-models
if [ ! -e test_run/dummy-kb/my_knowledge_dataset ]; then
    python use_own_knowledge_dataset.py --output_dir test_run/dummy-kb \
        --dpr_ctx_encoder_model_name test_run/tiny-models/context_encoder
fi
python finetune_rag.py --model_name_or_path test_run/tiny-models/rag_token --model_type rag_token \
    --context_encoder_name test_run/tiny-models/context_encoder --end2end --index_name custom \
    --accelerator cpu --output_dir test_run/model_checkpoints/new-features
