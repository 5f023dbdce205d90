#!/bin/sh
# The SQuAD recipe of the RAG-end2end paper (RAG-original EM 28.12 -> RAG-end2end 40.02), on GPUs.
# Edit the paths under "Your files" (or set them in the environment), then:   sh finetune_rag_ray_end2end.sh
# Every setting below is a variable with the recipe's default: GPUS=1 INDEX_GPUS=0 sh finetune_rag_ray_end2end.sh
# Flags after the script name go to finetune_rag.py last, so they win:  sh finetune_rag_ray_end2end.sh --seed 7
# The baseline with the same settings (context encoder frozen, no refresh): sh finetune_rag_ray_original.sh
# Then one table of both:  python tools/make_results_table.py $RUNS/rag-original $RUNS/rag-end2end
# Effective batch = train_batch_size x gradient_accumulation_steps x gpus = 4 x 8 x 2 = 64.
set -e
cd "$(dirname "$0")"

# ---- Your files -------------------------------------------------------------------------------
SQUAD_JSON=${SQUAD_JSON:-/DIR/train-v1.1.json} # any SQuAD-format file; data_prep/prepare_squad.py turns it into DATA_DIR
DATA_DIR=${DATA_DIR:-/DIR/squad-training-data} # {train,val,test}.{source,target}, *.gold.jsonl (for recall@k), kb.csv
KB_CSV=${KB_CSV:-$DATA_DIR/kb.csv}           # title<TAB>text, no header: every SQuAD context once
KB_DIR=${KB_DIR:-/DIR/SQUAD-KB}              # use_own_knowledge_dataset.py writes the initial KB here
RUNS=${RUNS:-/DIR/model_checkpoints}         # each run writes checkpoints, logs and its KB versions in RUNS/<name>
CTX_ENCODER=${CTX_ENCODER:-facebook/dpr-ctx_encoder-multiset-base} # hub name or a local directory
# ---- The recipe's settings -----------------------------------------------------------------------
MODEL=${MODEL:-facebook/rag-token-base}      # hub name or a local directory (a RAG checkpoint)
MODEL_TYPE=${MODEL_TYPE:-rag_token}
GPUS=${GPUS:-2}                              # training GPUs (DDP)
INDEX_GPUS=${INDEX_GPUS:-1}                  # GPUs that re-encode the KB (0: the encoders run on CPU)
INDEXING_FREQ=${INDEXING_FREQ:-500}          # optimizer steps between refreshes
PRECISION_FLAG=${PRECISION_FLAG---fp16}      # 16-bit mixed precision; "--precision bf16-mixed"; "" for 32-bit
EPOCHS=${EPOCHS:-10}

# ---- 0. QA pairs split by article, gold answers and gold passage ids, and the KB CSV ------------
if [ ! -e "$DATA_DIR/stats.json" ]; then
    python data_prep/prepare_squad.py --input "$SQUAD_JSON" --output_dir "$DATA_DIR"
fi

# ---- 1. The initial knowledge base (version 0): 100-word passages, DPR embeddings, HNSW index ----
if [ ! -e "$KB_DIR/my_knowledge_dataset" ]; then
    python use_own_knowledge_dataset.py --csv_path "$KB_CSV" --output_dir "$KB_DIR" \
        --dpr_ctx_encoder_model_name "$CTX_ENCODER"
fi

# ---- 2. RAG-end2end, or with END2END=0 (finetune_rag_ray_original.sh) the RAG-original baseline.
if [ "${END2END:-1}" = 1 ]; then
    OUTPUT_DIR=$RUNS/rag-end2end
    # train the context encoder; re-encode the KB and swap the index every INDEXING_FREQ steps on INDEX_GPUS
    E2E_FLAGS="--end2end --indexing_freq $INDEXING_FREQ --index_gpus $INDEX_GPUS"
else
    OUTPUT_DIR=$RUNS/rag-original
    E2E_FLAGS=""
fi
# Train. Ray starts locally on loopback; add --ray_address auto to join a `ray start` cluster.
# With --index_gpus N, N GPUs that training does not use encode the KB (CUDA_VISIBLE_DEVICES must show
# them to this process; docs/gpus.md); with --index_gpus 0 the encoders run on CPU.
python finetune_rag.py \
    --data_dir "$DATA_DIR" \
    --output_dir "$OUTPUT_DIR" \
    --model_name_or_path "$MODEL" \
    --model_type "$MODEL_TYPE" \
    --context_encoder_name "$CTX_ENCODER" \
    --passages_path "$KB_DIR/my_knowledge_dataset" \
    --index_path "$KB_DIR/my_knowledge_dataset_hnsw_index.faiss" \
    --index_name custom \
    --gpus "$GPUS" \
    $PRECISION_FLAG \
    --do_train --do_predict \
    $E2E_FLAGS \
    --index_type hnsw --hnsw_m 32 --hnsw_ef_construction 200 --hnsw_ef_search 128 \
    --num_retrieval_workers 4 `# Ray actors serving the index; requests are spread round-robin` \
    --n_val -1 \
    --train_batch_size 4 --eval_batch_size 1 \
    --gradient_accumulation_steps 8 \
    --max_source_length 128 --max_target_length 25 --val_max_target_length 25 --test_max_target_length 25 \
    --label_smoothing 0.1 --dropout 0.1 --attention_dropout 0.1 \
    --weight_decay 0.001 --adam_epsilon 1e-08 --max_grad_norm 0.1 \
    --lr_scheduler polynomial --learning_rate 3e-05 --warmup_steps 500 \
    --num_train_epochs "$EPOCHS" \
    --val_check_interval 1.0 `# once an epoch; a number > 1 means every N training batches` \
    "$@"
