# The CPU setting that experiments/qa_cpu.sh and experiments/modes_cpu.sh share, sourced by both after they
# have read their own arguments (INPUT, OUT): sizes, models, the KB built from OUT/data/kb.csv, and the
# finetune_rag.py flags of every run ($@ after `set --` below; $TRAIN adds the training flags), so that
# both tables measure one setting.
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
# This checkout's package, also for the scripts in tools/ and data_prep/ and for Ray's workers, whatever an
# editable install elsewhere points at (a long run from a `git worktree` at a fixed commit).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
stamp() { echo "== $(($(date +%s) - START)) s: $*"; }

python tools/install_pretrained_models.py --output_dir $PRE

prepare_cmu() {  # OUT/data from the CMU QA set: questions whose answer is in their article, split by article
    [ -e "$OUT/data/stats.json" ] || python data_prep/prepare_cmu_qa.py --input_dir "$INPUT" --output_dir "$OUT/data" \
        --require_gold_passage --test_fraction "$TEST_FRACTION" --seed 42
}

build_kb() {  # KB version 0 of OUT/data/kb.csv, encoded by MiniLM as its authors use it
    [ -e "$OUT/kb/my_knowledge_dataset" ] || python use_own_knowledge_dataset.py --csv_path "$OUT/data/kb.csv" \
        --output_dir "$OUT/kb" --dpr_ctx_encoder_model_name $PRE/minilm --index_type flat --device cpu
}

# --max_target_length 256: training answers are not cut short of the 256 prompt + answer tokens, as in every run
# of these tables (finetune_rag.py cut no training labels before 2026-12-02; COVID-QA answers are long spans).
set -- --generator_type causal --model_type rag_token \
    --question_encoder_name_or_path $PRE/minilm --context_encoder_name $PRE/minilm \
    --generator_name_or_path $PRE/smollm2-135m-instruct \
    --passages_path "$OUT/kb/my_knowledge_dataset" --index_path "$OUT/kb/my_knowledge_dataset_hnsw_index.faiss" \
    --index_type flat --data_dir "$OUT/data" --n_train "$N_TRAIN" --n_val "$N_VAL" --n_test "$N_TEST" \
    --accelerator cpu --devices 1 --num_retrieval_workers 1 \
    --n_docs "$N_DOCS" --eval_batch_size 8 --max_source_length 64 --max_combined_length 256 \
    --max_target_length 256 --val_max_target_length 12 --test_max_target_length 12 \
    --no_test_loss  # test_loss costs a forward pass as long as generating; the table does not need it
TRAIN="--do_train --train_batch_size $BATCH --num_train_epochs 1 --num_sanity_val_steps 0 \
    --learning_rate $LR --warmup_steps 3 --lr_scheduler linear --max_grad_norm 1.0"
