#!/bin/sh
# End-to-end fine-tuning with real pretrained weights on CPU; not part of CI. all-MiniLM-L6-v2 with mean
# pooling (how it was trained) serves as question and context encoder, SmolLM2-135M-Instruct as a causal
# RAG-token generator; all three learn, and the dummy KB is re-encoded and re-indexed during training.
# Prints validation EM/F1 before training (step 0) and after every epoch, then the test split scored by
# the best checkpoint (by val EM) against the KB version saved with it.
# About 6 minutes on 2 idle cores with EPOCHS=1; writes ~2.7 GB under $OUT.
# Run from the repository root: sh test_run/test_finetune_pretrained.sh
set -e
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

PRE=pretrained
KB=test_run/dummy-kb-minilm-cosine  # mean pooling, cosine: as MiniLM declares
OUT=${OUT:-test_run/model_checkpoints/pretrained-$(date +%Y%m%d-%H%M%S)}
EPOCHS=${EPOCHS:-1}
START=$(date +%s)

python tools/install_pretrained_models.py --output_dir $PRE
if [ ! -e $KB/my_knowledge_dataset ]; then
    python use_own_knowledge_dataset.py --csv_path test_run/dummy-kb/my_knowledge_dataset.csv --output_dir $KB \
        --dpr_ctx_encoder_model_name $PRE/minilm --pooling mean --index_type flat --device cpu
fi

# Prompts are at most ~300 generator tokens, gold answers at most ~12.
python finetune_rag.py --generator_type causal --model_type rag_token \
    --question_encoder_name_or_path $PRE/minilm --question_pooling mean \
    --context_encoder_name $PRE/minilm --context_pooling mean \
    --generator_name_or_path $PRE/smollm2-135m-instruct --end2end --indexing_freq 10 \
    --passages_path $KB/my_knowledge_dataset --index_path $KB/my_knowledge_dataset_hnsw_index.faiss \
    --index_type flat --data_dir test_run/dummy-train-data --output_dir "$OUT" \
    --accelerator cpu --devices 1 --num_retrieval_workers 1 \
    --n_docs 3 --eval_batch_size 4 --max_source_length 64 --max_combined_length 320 \
    --max_target_length 25 --val_max_target_length 16 --test_max_target_length 16 \
    --do_train --validate_before_training --do_predict \
    --train_batch_size 2 --num_train_epochs "$EPOCHS" --num_sanity_val_steps 0 \
    --learning_rate 5e-5 --warmup_steps 2 --lr_scheduler linear --max_grad_norm 1.0

python - "$OUT" <<'PY'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
for row in json.loads((out / "metrics.json").read_text()):
    when = "before training" if row["step"] == 0 else f"step {row['step']}"
    print(f"val  {when:>15}: EM {row['val_em']:.3f}  F1 {row['val_f1']:.3f}  loss {row['val_loss']:.3f}")
test = dict(line.split(": ") for line in (out / "test_results.txt").read_text().splitlines())
print(f"test after training: EM {float(test['test_em']):.3f}  F1 {float(test['test_f1']):.3f}")
preds = (out / "test_generations.txt").read_text().splitlines()
golds = Path("test_run/dummy-train-data/test.target").read_text().splitlines()
print("test prediction | gold:", *(f"{p} | {g}" for p, g in zip(preds, golds)), sep="\n  ")
PY
echo "test_finetune_pretrained.sh: OK in $(($(date +%s) - START)) s; $OUT"
