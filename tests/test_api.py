"""The Python API (`import rag_end2end as rag`): examples/python_api.py run as a user runs it, and the API's own
refusals, which come before any work."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import rag_end2end as rag

REPO = Path(__file__).resolve().parents[1]


def test_the_example_builds_trains_evaluates_answers_and_exports(tmp_path):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, str(REPO / "examples" / "python_api.py"), str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith(("trained:", "kept", "evaluated:"))]
    assert len(lines) == 3, done.stdout[-3000:]
    # What the example's calls left on disk: a KB of the dummy documents, a run with its checkpoint, an export.
    assert len(list((tmp_path / "kb" / "my_knowledge_dataset").glob("*.arrow"))) >= 1
    checkpoints = sorted((tmp_path / "run").glob("checkpoint*"))
    assert checkpoints and (checkpoints[0] / "rag_settings.json").is_file()
    history = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [row["step"] for row in history] == [5, 10]  # val_check_interval=5, max_steps=10
    assert (tmp_path / "run" / "test_results.txt").is_file()
    assert (tmp_path / "export" / "README.md").is_file()
    # The run trained on the pairs the example passed in memory, written where the user can read them.
    train_source = (tmp_path / "run" / "data" / "train.source").read_text().splitlines()
    assert train_source == (REPO / "test_run" / "dummy-train-data" / "train.source").read_text().splitlines()
    metrics = json.loads((tmp_path / "eval" / "predictions.json").read_text())
    assert metrics["n"] == len((REPO / "test_run" / "dummy-train-data" / "test.source").read_text().splitlines())
    assert not (checkpoints[0] / "eval").exists()  # nothing written into the user's checkpoint
    # Each call answers its own questions: a second call with other questions (as many) is not scored on the
    # first call's predictions.
    model = rag.load(checkpoints[0])
    for question in ("Who turned the rod into a snake?", "Where did the river run red?"):
        expected = model.answer([question])[0]["answer"]
        scores = rag.evaluate(checkpoints[0], [question], [expected])
        assert scores["em"] == 1.0 and scores["n"] == 1
    with pytest.raises(FileExistsError, match="eval"):
        rag.evaluate(checkpoints[0], ["q"], ["a"], output_dir=tmp_path / "eval")


def test_train_refuses_a_keyword_that_is_no_flag_before_any_work(tmp_path):
    kb_dir = tmp_path / "kb"
    (kb_dir / "my_knowledge_dataset").mkdir(parents=True)
    (kb_dir / "my_knowledge_dataset_hnsw_index.faiss").write_bytes(b"")
    with pytest.raises(TypeError, match="learning_rte="):
        rag.train(tmp_path / "run", kb=kb_dir, train=[("q", "a")], val=[("q", "a")], learning_rte=1e-3)
    assert not (tmp_path / "run" / "logs").exists()


@pytest.mark.parametrize(
    "pairs, message", [([("two\nlines", "a")], "one non-empty line"), ([], "no \\(question, answer\\) pairs")]
)
def test_train_refuses_pairs_it_cannot_write_as_lines(tmp_path, pairs, message):
    kb_dir = tmp_path / "kb"
    (kb_dir / "my_knowledge_dataset").mkdir(parents=True)
    (kb_dir / "my_knowledge_dataset_hnsw_index.faiss").write_bytes(b"")
    with pytest.raises(ValueError, match=message):
        rag.train(tmp_path / "run", kb=kb_dir, train=pairs, val=[("q", "a")], model_type="rag_token")


def test_a_kb_folder_without_a_kb_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        rag.KB.at(tmp_path)


def test_train_without_questions_needs_the_documents_alone_flags(tmp_path):
    kb_dir = tmp_path / "kb"
    (kb_dir / "my_knowledge_dataset").mkdir(parents=True)
    (kb_dir / "my_knowledge_dataset_hnsw_index.faiss").write_bytes(b"")
    with pytest.raises(ValueError, match="reconstruction_ratio=1"):
        rag.train(tmp_path / "run", kb=kb_dir, train=None, val=[("q", "a")], model_type="rag_token")
    assert not (tmp_path / "run").exists()


def test_adapt_goes_from_documents_alone_to_a_tested_model(tiny_models, tmp_path):
    """KB CSV -> KB, statements, training on them only (validated on held-out statements), with no question."""
    csv = REPO / "test_run" / "dummy-kb" / "my_knowledge_dataset.csv"
    run = rag.adapt(csv, tmp_path / "work", context_encoder=str(tiny_models["context_encoder"]),
                    kb_flags={"index_type": "flat", "device": "cpu"}, model_type="rag_token",
                    model_name_or_path=str(tiny_models["rag_token"]), indexing_freq=2, max_steps=4,
                    val_check_interval=4, train_batch_size=2, eval_batch_size=4, log_every_n_steps=1,
                    max_target_length=64, accelerator="cpu", devices=1)  # fmt: skip
    stats = json.loads((tmp_path / "work" / "statements" / "stats.json").read_text())
    assert stats["kept"] > 0
    assert run.checkpoint is not None and (run.checkpoint / "rag_settings.json").is_file()
    assert [step for step, _ in run.losses] == [0, 1, 2, 3]
    logged = (next((tmp_path / "work" / "run" / "logs").glob("version_*/metrics.csv"))).read_text()
    assert "train_loss_recon" in logged and "train_loss_qa" not in logged
    assert not (tmp_path / "work" / "run" / "data").exists()  # nothing was trained as a question


def test_adapt_can_generate_its_questions_from_the_documents(tiny_models, tmp_path, monkeypatch):
    """KB CSV -> KB, statements, questions generated from the passages (the tiny random generator cannot write one:
    its replies are test_generate_qa's fake ones), training on both kinds, validated on generated questions."""
    from rag_end2end.data import generate_qa
    from tests.test_generate_qa import make_fake_generate

    monkeypatch.setattr(generate_qa, "generate_texts", make_fake_generate([]))
    csv = REPO / "test_run" / "dummy-kb" / "my_knowledge_dataset.csv"
    generation = {"generator_name_or_path": str(tiny_models["causal_generator"]), "device": "cpu", "val_fraction": 0.2}
    run = rag.adapt(csv, tmp_path / "work", context_encoder=str(tiny_models["context_encoder"]),
                    generate_questions=generation, kb_flags={"index_type": "flat", "device": "cpu"},
                    model_type="rag_token", model_name_or_path=str(tiny_models["rag_token"]), max_steps=4,
                    val_check_interval=4, train_batch_size=2, eval_batch_size=4, log_every_n_steps=1,
                    max_target_length=64, accelerator="cpu", devices=1)  # fmt: skip
    generated = tmp_path / "work" / "generated"
    trained_on = (tmp_path / "work" / "run" / "data" / "train.source").read_text().splitlines()
    assert trained_on and trained_on == (generated / "train.source").read_text().splitlines()
    validated_on = (tmp_path / "work" / "run" / "data" / "val.source").read_text().splitlines()
    assert validated_on == (generated / "val.source").read_text().splitlines()
    logged = (next((tmp_path / "work" / "run" / "logs").glob("version_*/metrics.csv"))).read_text()
    assert "train_loss_recon" in logged and "train_loss_qa" in logged
    assert run.checkpoint is not None
    with pytest.raises(ValueError, match="give one source"):
        rag.adapt(csv, tmp_path / "x", context_encoder="-", questions=[("q", "a")], generate_questions=generation)


def test_switches_and_valued_booleans_become_the_flags_they_are(tmp_path):
    """A store_true switch is the flag alone; a flag that takes a value gets "true"/"false"; False for a switch that
    is off adds nothing, and the flags the call sets itself are refused, not dropped."""
    from rag_end2end import api
    from rag_end2end.options import build_parser

    parser = build_parser()
    parsed = parser.parse_args(["--model_type", "rag_token"])
    argv = api._flags(parsed, {"end2end": True, "use_dummy_dataset": False, "fp16": False}, "train", parser)
    assert argv == ["--end2end", "--use_dummy_dataset", "false"]
    assert parser.parse_args(["--model_type", "rag_token", *argv]).end2end is True
    with pytest.raises(TypeError, match="do_train="):
        api._flags(parsed, {"do_train": False}, "train", parser)


def test_a_failed_build_leaves_no_kb_csv_behind(tmp_path):
    with pytest.raises((OSError, ValueError)):  # the encoder directory is not there
        rag.build_kb([("t", "some text")], tmp_path / "kb", context_encoder=str(tmp_path / "no-such-encoder"))
    assert not (tmp_path / "kb" / "kb.csv").exists()
