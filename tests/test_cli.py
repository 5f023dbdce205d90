"""finetune_rag.py as users run it: a separate process, DDP on CPU, and the reference's launch flags."""

import csv
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(argv: list[str], timeout: int = 400) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, str(REPO / "finetune_rag.py"), *argv],
        cwd=REPO, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _logged(out: Path, name: str) -> list[float]:
    rows = csv.DictReader(open(next((out / "logs").rglob("metrics.csv"))))
    return [float(r[name]) for r in rows if r.get(name)]


def test_ddp_two_cpu_processes_train_and_refresh(ray_local, finetune_argv, tmp_path):
    # The child processes join the Ray that the test session started (its address is in the environment).
    argv = finetune_argv("--devices", "2", "--do_train", "--end2end", "--indexing_freq", "2", "--max_epochs", "2")
    proc = _run(argv)
    out = tmp_path / "out"
    assert "KB refresh: v1 live" in proc.stdout + proc.stderr
    assert max(_logged(out, "index_version")) >= 1
    assert _logged(out, "loss"), "no training loss logged"
    assert sorted(p.name for p in (out / "kb").iterdir() if p.name.startswith("v"))
    # Lightning splits the 40 training examples over 2 ranks: 10 optimizer steps an epoch at batch size 2.
    assert max(_logged(out, "step")) >= 19


def test_reference_launch_flags_run(ray_local, tiny_models, tiny_kb, tmp_path):
    """The flags of the reference test_run/test_finetune.sh, with tiny local models and --gpus 0."""
    passages, index = tiny_kb
    out = tmp_path / "out"
    argv = [
        "--data_dir", str(REPO / "test_run" / "dummy-train-data"), "--output_dir", str(out),
        "--model_name_or_path", str(tiny_models["rag_token"]), "--model_type", "rag_token",
        "--fp16", "--gpus", "0", "--profile", "--do_train", "--end2end", "--do_predict", "--n_val", "-1",
        "--train_batch_size", "1", "--eval_batch_size", "1", "--max_source_length", "128",
        "--max_target_length", "25", "--val_max_target_length", "25", "--test_max_target_length", "25",
        "--label_smoothing", "0.1", "--dropout", "0.1", "--attention_dropout", "0.1", "--weight_decay", "0.001",
        "--adam_epsilon", "1e-08", "--max_grad_norm", "0.1", "--lr_scheduler", "polynomial",
        "--learning_rate", "3e-05", "--num_train_epochs", "10", "--warmup_steps", "500",
        "--gradient_accumulation_steps", "1", "--distributed_retriever", "ray", "--num_retrieval_workers", "4",
        "--index_name", "custom", "--context_encoder_name", str(tiny_models["context_encoder"]),
        "--index_gpus", "2", "--gpu_order", "[2,3,4,5,6,7,8,9,0,1]", "--indexing_freq", "5",
        "--csv_path", str(REPO / "test_run" / "dummy-kb" / "my_knowledge_dataset.csv"),
        "--passages_path", str(passages), "--index_path", str(index), "--shard_dir", str(tmp_path / "shards"),
        "--ray_namespace", "test-reference-flags",
        "--max_steps", "40",  # the one addition: 10 epochs would be 400 steps
    ]  # fmt: skip
    _run(argv)
    assert max(_logged(out, "index_version")) >= 1
    assert (out / "test_results.txt").exists()
    assert not (tmp_path / "shards").exists(), "--shard_dir is accepted but never written (or deleted)"
