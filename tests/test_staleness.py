"""The measured staleness of the live KB index (kb.staleness, logged by KBRefreshCallback at every refresh it starts):
the drift of the stored vectors from the current context encoder's, and what it costs retrieval, on tiny models."""

import csv

import numpy as np
import pytest
import torch
from datasets import load_from_disk
from faults import kill_actors
from test_finetune_rag import _data_with_gold_passages

from rag_end2end.kb.staleness import StalenessProbe, sample_rows
from rag_end2end.model.lora import merged
from rag_end2end.training import finetune as finetune_rag


def _run(finetune_argv, tiny_kb, tmp_path, *extra: str) -> list[dict]:
    """A real end-to-end run refreshing every 2 steps, with gold passages for its validation questions; the
    metrics.csv rows that hold the measured staleness."""
    (tmp_path / "data").mkdir()
    data = _data_with_gold_passages(tmp_path / "data", tiny_kb[0])
    argv = finetune_argv("--end2end", "--indexing_freq", "2", "--max_steps", "3", "--log_every_n_steps", "1")
    kill_actors(finetune_rag.main(finetune_rag.parse_args([*argv, "--data_dir", str(data), "--do_train", *extra])))
    rows = list(csv.DictReader(open(next((tmp_path / "out" / "logs").rglob("metrics.csv")))))
    return [r for r in rows if r.get("staleness_cosine_mean")]


def test_cosine_is_one_when_the_encoder_has_not_moved(ray_local, finetune_argv, tiny_kb, tmp_path):
    (row,) = _run(finetune_argv, tiny_kb, tmp_path, "--learning_rate", "0")  # the refresh triggered at step 2
    assert row["step"] == "2"
    assert abs(float(row["staleness_cosine_mean"]) - 1.0) < 1e-5 and abs(float(row["staleness_cosine_min"]) - 1) < 1e-5
    for k in ("recall@1", "recall@5", "mrr@5"):  # the same vectors: the same search
        assert row[f"val_stale_{k}"] == row[f"val_fresh_{k}"] != ""


def test_cosine_falls_once_training_moves_the_context_encoder(ray_local, finetune_argv, tiny_kb, tmp_path):
    (row,) = _run(finetune_argv, tiny_kb, tmp_path, "--learning_rate", "1e-3")
    assert float(row["staleness_cosine_mean"]) < 1 - 1e-4
    assert float(row["staleness_cosine_min"]) <= float(row["staleness_cosine_mean"])
    assert all(0.0 <= float(row[f"val_{side}_recall@5"]) <= 1.0 for side in ("stale", "fresh"))
    plots = tmp_path / "out" / "plots"
    assert (plots / "index_drift.png").is_file() and (plots / "stale_vs_fresh.png").is_file()


def test_a_negative_sample_is_refused(capsys):
    with pytest.raises(SystemExit) as stop:
        finetune_rag.parse_args(["--model_type", "rag_token", "--staleness_sample", "-1"])
    assert stop.value.code == 2 and "--staleness_sample must be >= 0" in capsys.readouterr().err


def test_stale_against_fresh_recall_on_a_known_case(ray_local, finetune_argv, tmp_path):
    """Stored vectors that are the fresh ones moved one row on: each question, the fresh vector of its gold passage
    searched by l2, finds its gold passage first among the fresh vectors (distance 0) and never among the stale."""
    module = finetune_rag.build_module(finetune_rag.parse_args(finetune_argv("--end2end")))
    kill_actors(module)
    encoder = merged(module.model.ctx_encoder)
    passages = load_from_disk(module.base_passages_path)
    n = len(passages)
    gold = [[i] for i in range(n)]
    probe = StalenessProbe(module.base_passages_path, module.model.ctx_tokenizer, 256, 0, gold)
    assert probe.rows.tolist() == list(range(n))  # a KB no larger than the sample: searched whole
    fresh = probe.fresh_vectors(encoder)
    stale = passages.remove_columns("embeddings").add_column("embeddings", np.roll(fresh, 1, axis=0).tolist())
    stale.save_to_disk(str(tmp_path / "stale"))
    metrics = probe.measure(encoder, str(tmp_path / "stale"), fresh, "l2")
    assert metrics["val_fresh_recall@1"] == 1.0 and metrics["val_fresh_mrr@5"] == 1.0
    assert metrics["val_stale_recall@1"] == 0.0
    cosines = [np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b) for a, b in zip(np.roll(fresh, 1, 0), fresh)]
    expected = np.mean(cosines)
    assert abs(metrics["staleness_cosine_mean"] - expected) < 1e-5


def test_measuring_moves_no_rng_and_keeps_the_training_mode(ray_local, finetune_argv):
    module = finetune_rag.build_module(finetune_rag.parse_args(finetune_argv("--end2end")))
    kill_actors(module)
    encoder = module.model.ctx_encoder
    encoder.train()
    probe = StalenessProbe(module.base_passages_path, module.model.ctx_tokenizer, 3, 0)
    before = torch.get_rng_state(), np.random.get_state()[1].copy()
    metrics = probe.measure(encoder, module.kb.passages_path)
    assert torch.equal(torch.get_rng_state(), before[0]) and np.array_equal(np.random.get_state()[1], before[1])
    assert encoder.training and abs(metrics["staleness_cosine_mean"] - 1.0) < 1e-5
    n = len(load_from_disk(module.base_passages_path))
    assert len(probe.sample) == min(3, n) and probe.sample.tolist() == sample_rows(n, 3, 0).tolist()
