#!/bin/sh
# End-to-end fine-tuning with real pretrained weights on CPU; not part of CI. all-MiniLM-L6-v2 serves as DPR
# question and context encoders, SmolLM2-135M-Instruct as a causal RAG-token generator; all three learn,
# and the dummy KB is re-encoded and re-indexed during training.
# The test split is scored twice by the same code (trainer.test): by the untrained models, then by the best
# checkpoint (by val EM; Lightning keeps the earliest on a tie, so with EPOCHS=1 it is the trained model).
# Validation EM/F1/loss is printed after every epoch. On 2 cores: about 7 minutes when the machine is idle
# (19 under heavy concurrent load); EPOCHS=2 about 13 minutes. Each run writes ~2.7 GB under $OUT.
# Run from the repository root: sh test_run/test_finetune_pretrained.sh
set -e
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

PRE=pretrained
KB=test_run/dummy-kb-minilm
OUT=${OUT:-test_run/model_checkpoints/pretrained-$(date +%Y%m%d-%H%M%S)}
EPOCHS=${EPOCHS:-1}
START=$(date +%s)

python install_pretrained_models.py --output_dir $PRE
if [ ! -e $KB/my_knowledge_dataset ]; then
    python use_own_knowledge_dataset.py --csv_path test_run/dummy-kb/my_knowledge_dataset.csv --output_dir $KB \
        --dpr_ctx_encoder_model_name $PRE/dpr-minilm-context --index_type flat --device cpu
fi

# Shared by both runs: models, KB, data and lengths (prompts are at most ~300 generator tokens, gold
# answers at most ~12).
set -- --generator_type causal --model_type rag_token \
    --question_encoder_name_or_path $PRE/dpr-minilm-question \
    --generator_name_or_path $PRE/smollm2-135m-instruct \
    --context_encoder_name $PRE/dpr-minilm-context --end2end \
    --passages_path $KB/my_knowledge_dataset --index_path $KB/my_knowledge_dataset_hnsw_index.faiss \
    --index_type flat --data_dir test_run/dummy-train-data \
    --accelerator cpu --devices 1 --num_retrieval_workers 1 \
    --n_docs 3 --eval_batch_size 4 --max_source_length 64 --max_combined_length 320 \
    --max_target_length 25 --val_max_target_length 16 --test_max_target_length 16

echo "== before training: test split, untrained models"
python finetune_rag.py "$@" --output_dir "$OUT/before" --do_predict
BEFORE=$(date +%s)

echo "== training ($EPOCHS epochs), then the test split with the best checkpoint"
python finetune_rag.py "$@" --output_dir "$OUT/after" --do_train --do_predict \
    --indexing_freq 10 --train_batch_size 2 --num_train_epochs "$EPOCHS" --num_sanity_val_steps 0 \
    --learning_rate 5e-5 --warmup_steps 2 --lr_scheduler linear --max_grad_norm 1.0

python - "$OUT" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
def scores(path: Path, prefix: str) -> str:
    m = {k.strip(): float(v) for k, v in (line.split(":", 1) for line in path.read_text().splitlines())}
    return f"EM {m[prefix + '_em']:.3f}  F1 {m[prefix + '_f1']:.3f}  loss {m[prefix + '_loss']:.3f}"
print(f"test  before training: {scores(out / 'before' / 'test_results.txt', 'test')}")
for row in json.loads((out / "after" / "metrics.json").read_text()):
    print(f"val   step {row['step']:>3}: EM {row['val_em']:.3f}  F1 {row['val_f1']:.3f}  loss {row['val_loss']:.3f}")
print(f"test  after training:  {scores(out / 'after' / 'test_results.txt', 'test')}")
preds = (out / "after" / "test_generations.txt").read_text().splitlines()
golds = Path("test_run/dummy-train-data/test.target").read_text().splitlines()
print("after training, prediction | gold:", *(f"{p} | {g}" for p, g in zip(preds, golds)), sep="\n  ")
EOF
echo "test_finetune_pretrained.sh: OK in $(($(date +%s) - START)) s (training run $(($(date +%s) - BEFORE)) s); $OUT"
