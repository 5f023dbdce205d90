"""The LightningModule and a real in-process training run: gradients, refresh, swap, checkpoints, logs."""

import csv
import json
import shutil
from pathlib import Path

import faiss
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from datasets import load_from_disk
from faults import gated_encoder_factory
from faults import kill_actors as _kill_actors
from transformers import DPRContextEncoder

from rag_end2end.data.readers import read_lines
from rag_end2end.evaluation import evaluate as eval_rag
from rag_end2end.evaluation.metrics import has_answer, rouge_l_score, sentence_bleu
from rag_end2end.kb import refresh as kb_refresh
from rag_end2end.kb import search as kb_search
from rag_end2end.kb.index import IndexConfig
from rag_end2end.kb.refresh import RefreshState
from rag_end2end.kb.versions import checkpoint_kb, read_version
from rag_end2end.model.encoders import PooledEncoder, load_tokenizer
from rag_end2end.model.rag import RagModel
from rag_end2end.tiny_models import tiny_run_argv
from rag_end2end.training import finetune as finetune_rag
from rag_end2end.training.callbacks import KBRefreshCallback

DUMMY_DATA = Path(__file__).parents[1] / "test_run" / "dummy-train-data"


def _batch(module, n=4):
    return next(iter(module._dataloader("train", n, shuffle=False)))


def _refresh_callback(module) -> KBRefreshCallback:
    return next(c for c in module.trainer.callbacks if isinstance(c, KBRefreshCallback))


def _best_checkpoint(out: Path) -> Path:
    (best,) = [p for p in out.glob("*.ckpt") if p.name != "last.ckpt"]
    return best


@pytest.mark.parametrize("model", ["rag_token", "rag_sequence"])
def test_context_encoder_gets_gradient_with_end2end(ray_local, finetune_argv, model):
    module = finetune_rag.build_module(finetune_rag.parse_args(finetune_argv("--end2end", model=model)))
    module.training_step(_batch(module), 0).backward()
    grads = {n: p.grad for n, p in module.context_encoder.named_parameters()}
    assert grads, "no context-encoder parameters"
    missing = [n for n, g in grads.items() if g is None or not g.abs().sum() > 0]
    assert not missing, f"context-encoder parameters without gradient: {missing}"
    _kill_actors(module)


def test_no_context_encoder_training_without_end2end(ray_local, finetune_argv):
    module = finetune_rag.build_module(finetune_rag.parse_args(finetune_argv()))
    assert module.context_encoder is None
    assert not [n for n, _ in module.named_parameters() if "ctx_encoder" in n]
    module.training_step(_batch(module), 0).backward()
    # The retrieval scores still train the question encoder.
    q_grads = [p.grad for p in module.model.question_encoder.parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in q_grads)
    _kill_actors(module)


def test_assembles_rag_from_question_encoder_and_generator(ray_local, finetune_argv, tiny_models):
    argv = finetune_argv("--end2end")
    argv[argv.index("--model_name_or_path") : argv.index("--model_name_or_path") + 2] = [
        "--question_encoder_name_or_path",
        str(tiny_models["question_encoder"]),
        "--generator_name_or_path",
        str(tiny_models["generator"]),
    ]
    module = finetune_rag.build_module(finetune_rag.parse_args(argv))
    generator = module.model.generator
    assert generator.max_length <= generator.model.config.max_position_embeddings
    batch = _batch(module)
    assert torch.isfinite(module.training_step(batch, 0))
    out = module.model.generate(batch["input_ids"], batch["attention_mask"], batch["source_text"], max_new_tokens=6)
    assert len(out) == len(batch["input_ids"]) and all(isinstance(a, str) for a in out)
    _kill_actors(module)


def _data_with_gold_passages(directory: Path, passages_path: Path) -> Path:
    """The dummy QA data plus val.gold.jsonl: the ids of the KB passages that contain each answer."""
    texts = load_from_disk(str(passages_path))["text"][:]
    for path in DUMMY_DATA.iterdir():
        shutil.copy(path, directory / path.name)
    answers = (DUMMY_DATA / "val.target").read_text().splitlines()
    with open(directory / "val.gold.jsonl", "w") as f:
        for answer in answers:
            ids = [i for i, text in enumerate(texts) if has_answer(text, [answer])]
            f.write(json.dumps({"answers": [answer], "gold_passage_ids": ids}) + "\n")
    return directory


@pytest.fixture(scope="module")
def trained(ray_local, tiny_models, tiny_kb, tmp_path_factory):
    """One real run: end-to-end training with a refresh every 2 optimizer steps, then a test pass."""
    out = tmp_path_factory.mktemp("run") / "out"
    passages, index = tiny_kb
    data = _data_with_gold_passages(tmp_path_factory.mktemp("data"), passages)
    argv = [
        *tiny_run_argv(tiny_models, tiny_kb, data, out),
        "--train_batch_size",
        "2",
        "--eval_batch_size",
        "4",
        "--max_epochs",
        "2",
        "--learning_rate",
        "1e-3",
        "--end2end",
        "--indexing_freq",
        "2",
        "--keep_kb_versions",
        "0",
        "--do_train",
        "--do_predict",
        "--ray_namespace",
        "test-trained",
        "--log_every_n_steps",
        "1",
    ]
    module = finetune_rag.main(finetune_rag.parse_args(argv))
    module.argv = argv
    yield module, _refresh_callback(module), out
    _kill_actors(module)


def test_refresh_publishes_new_versions_with_new_embeddings(trained):
    module, refresh, out = trained
    versions = [h["version"] for h in refresh.history]
    assert len(versions) >= 2 and versions == sorted(versions) and versions[0] >= 1
    newest = read_version(out / "kb" / f"v{versions[-1]:04d}")
    old = load_from_disk(module.base_passages_path)
    new = load_from_disk(newest.passages_path)
    assert new["text"][:] == old["text"][:] and new["title"][:] == old["title"][:]
    old_emb, new_emb = np.array(old["embeddings"][:]), np.array(new["embeddings"][:])
    assert old_emb.shape == new_emb.shape
    assert not np.allclose(old_emb, new_emb, atol=1e-4), "re-encoding did not change the embeddings"


def test_retrieval_comes_from_the_new_index(trained):
    module, refresh, _ = trained
    new = np.array(load_from_disk(module.kb.passages_path)["embeddings"][:], dtype=np.float32)
    queries = np.random.default_rng(0).standard_normal((3, new.shape[1])).astype(np.float32)
    _, ids, _ = module.retriever.retrieve(queries, 3)
    assert module.retriever.last_version == module.kb.version
    expected = np.argsort(-(queries @ new.T), axis=1)[:, :3]
    np.testing.assert_array_equal(ids, expected)


def test_predict_tests_the_best_checkpoint_against_its_kb_version(trained):
    module, refresh, out = trained
    step = int(_best_checkpoint(out).stem.rsplit("-", 1)[1])
    saved = json.loads((out / f"checkpoint{step}" / "kb_version.json").read_text())
    # Ties in val_em keep the earliest checkpoint, so the best one predates the last refreshes.
    assert saved["version"] < refresh.history[-1]["version"]
    assert module.kb.version == saved["version"]
    assert module.retriever.last_version == saved["version"], "the test pass retrieved from another index"


def test_training_goes_on_while_a_refresh_is_held_back(ray_local, finetune_argv, tmp_path, monkeypatch):
    """The encoding actor's encoder waits for a file that only the training loop creates, after HOLD more
    optimizer steps: if training waited on the refresh, it would never get there (the encoder gives up
    waiting after a minute and the test fails). Then the swap must follow."""
    hold, gate = 4, str(tmp_path / "release")

    class Release(pl.Callback):
        trigger_step, released_at = None, None

        def on_train_batch_end(self, trainer, module, *args):
            if self.trigger_step is None and refresh.refresher.state is not RefreshState.IDLE:
                self.trigger_step = trainer.global_step
            if self.trigger_step is not None and self.released_at is None and not refresh.history:
                if trainer.global_step >= self.trigger_step + hold:
                    Path(gate).touch()
                    self.released_at = trainer.global_step

    monkeypatch.setattr(kb_refresh, "encoder_factory", gated_encoder_factory(kb_refresh.encoder_factory, gate))
    module = finetune_rag.build_module(finetune_rag.parse_args(finetune_argv("--end2end")))
    refresh = KBRefreshCallback(str(tmp_path / "kb"), 2, IndexConfig("flat"))
    release = Release()
    quiet = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False}
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=16, limit_val_batches=0, callbacks=[refresh, release], **quiet
    )
    trainer.fit(module)
    _kill_actors(module)
    assert release.released_at is not None, "training stopped while the refresh was held back"
    first = refresh.history[0]
    assert first["trigger_step"] == release.trigger_step and first["swap_step"] > release.released_at
    assert first["steps_during_refresh"] >= hold and module.kb.version >= 1


def test_logs_and_run_files(trained):
    module, _, out = trained
    rows = list(csv.DictReader(open(next((out / "logs").rglob("metrics.csv")))))
    columns = set(rows[0])
    for name in ("loss", "index_version", "index_staleness_steps", "reindex_seconds", "val_em", "val_f1"):
        assert name in columns, f"{name} not logged"
    assert max(float(r["index_version"]) for r in rows if r["index_version"]) >= 1
    for group in ("generator", "retriever"):  # each part's learning rate (--retriever_learning_rate)
        assert any(r.get(f"lr-AdamW/{group}") for r in rows), f"learning rate of the {group} not logged"
    assert list((out / "logs").rglob("events.out.tfevents.*")), "no TensorBoard events"
    # Retrieval metrics against the live index: at every validation and after every refresh.
    recall_steps = {r["step"] for r in rows if r.get("val_recall@5")}
    val_steps = {r["step"] for r in rows if r.get("val_em")}
    assert recall_steps > val_steps, "val_recall@5 not logged after refreshes"
    assert all(0.0 <= float(r["val_mrr@20"]) <= 1.0 for r in rows if r.get("val_mrr@20"))
    history = json.loads((out / "metrics.json").read_text())
    assert {"val_em", "val_f1"} <= set(history[-1])
    assert 0.0 <= history[-1]["val_em"] <= 1.0
    generations = (out / "test_generations.txt").read_text().splitlines()
    assert len(generations) == 8  # one per test question
    assert "test_em" in (out / "test_results.txt").read_text()
    assert (out / "plots" / "loss.png").is_file() and (out / "plots" / "index_staleness.png").is_file()


def test_checkpoint_reloads_and_generates(trained):
    module, _, out = trained
    checkpoints = sorted(out.glob("checkpoint*"))
    assert checkpoints, "no exported checkpoint"
    ckpt = checkpoints[-1]
    kb = json.loads((ckpt / "kb_version.json").read_text())  # inside the run: relative, so it moves with it
    assert kb["passages_path"].startswith("../kb/v") and all(map(Path.exists, map(Path, checkpoint_kb(ckpt))))
    settings = json.loads((ckpt / "rag_settings.json").read_text())
    assert settings["generator_family"] == "seq2seq" and settings["n_docs"] == module.model.n_docs
    model = RagModel.from_pretrained(str(ckpt)).eval()
    model.retriever = kb_search.KBSearch(*checkpoint_kb(ckpt), 8)
    inputs = model.question_tokenizer(["what causes tuberculosis ?"], return_tensors="pt")
    answers = model.generate(inputs["input_ids"], inputs["attention_mask"], ["what causes tuberculosis ?"], 8)
    assert len(answers) == 1 and isinstance(answers[0], str)
    # The trained context encoder is saved beside it and differs from the one training started from.
    saved_ctx = DPRContextEncoder.from_pretrained(str(ckpt / "context_encoder"))
    start_ctx = DPRContextEncoder.from_pretrained(str(module.hparams.context_encoder_name))
    changed = [not torch.equal(a, b) for a, b in zip(saved_ctx.state_dict().values(), start_ctx.state_dict().values())]
    assert any(changed)


def test_resume_goes_on_from_the_checkpoint_and_its_kb_version(trained):
    module, _, out = trained
    ckpt = _best_checkpoint(out)
    step = int(ckpt.stem.rsplit("-", 1)[1])
    saved_kb = json.loads((out / f"checkpoint{step}" / "kb_version.json").read_text())
    argv = [a if a != "test-trained" else "test-resume" for a in module.argv if a != "--do_predict"]
    argv += ["--max_epochs", "3", "--resume_from_checkpoint", str(ckpt), "--allow_changed_settings"]
    resumed = finetune_rag.main(finetune_rag.parse_args(argv))
    history = _refresh_callback(resumed).history
    restored = [h for h in history if h["swap_step"] <= step]
    new = [h for h in history if h["trigger_step"] > step]
    assert restored and restored[-1]["version"] == saved_kb["version"], "refresh history not restored"
    assert new and all(h["version"] > max(r["version"] for r in restored) for h in new)
    assert resumed.trainer.global_step == 60  # 3 epochs of 20 steps, counted from the checkpoint's step
    _kill_actors(resumed)


def _causal_argv(finetune_argv, tiny_models, *extra: str) -> list[str]:
    argv = finetune_argv(
        "--generator_type",
        "causal",
        "--max_target_length",
        "8",
        "--val_max_target_length",
        "8",
        "--test_max_target_length",
        "8",
        *extra,
    )
    i = argv.index("--model_name_or_path")
    argv[i : i + 2] = [
        "--question_encoder_name_or_path",
        str(tiny_models["question_encoder"]),
        "--generator_name_or_path",
        str(tiny_models["causal_generator"]),
    ]
    return argv


@pytest.mark.parametrize("model_type", ["rag_token", "rag_sequence"])
def test_causal_generator_trains_every_part(ray_local, finetune_argv, tiny_models, model_type):
    argv = _causal_argv(finetune_argv, tiny_models, "--end2end")
    argv[argv.index("--model_type") + 1] = model_type
    module = finetune_rag.build_module(finetune_rag.parse_args(argv))
    module.training_step(_batch(module), 0).backward()
    for name, part in (
        ("context", module.context_encoder),
        ("question", module.model.question_encoder),
        ("generator", module.model.generator),
    ):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters()), name
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.context_encoder.parameters())
    _kill_actors(module)


def test_causal_generator_end_to_end_run_refreshes_and_saves(ray_local, finetune_argv, tiny_models, tmp_path):
    argv = _causal_argv(
        finetune_argv,
        tiny_models,
        "--end2end",
        "--indexing_freq",
        "2",
        "--do_train",
        "--max_steps",
        "12",
        "--val_check_interval",
        "6",
        "--validate_before_training",
    )
    module = finetune_rag.main(finetune_rag.parse_args(argv))
    assert _refresh_callback(module).history, "no refresh with a causal generator"
    validations = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert [v["step"] for v in validations] == [0, 6, 12] and all("val_em" in v for v in validations)
    ckpt = sorted((tmp_path / "out").glob("checkpoint*"))[-1]
    settings = json.loads((ckpt / "rag_settings.json").read_text())
    assert settings["marginal"] == "token" and settings["n_docs"] == module.model.n_docs
    assert settings["generator_family"] == "causal"
    saved_ctx = DPRContextEncoder.from_pretrained(str(ckpt / "context_encoder"))
    start_ctx = DPRContextEncoder.from_pretrained(str(tiny_models["context_encoder"]))
    assert any(not torch.equal(a, b) for a, b in zip(saved_ctx.state_dict().values(), start_ctx.state_dict().values()))
    _kill_actors(module)


def test_causal_mean_pooled_shared_encoder_refreshes_and_evaluates(ray_local, finetune_argv, tiny_models, tmp_path):
    pooling = ["--question_pooling", "mean", "--context_pooling", "mean", "--shared_encoder"]
    prefixes = ["--question_prefix", "query: ", "--passage_prefix", "passage: "]
    argv = _causal_argv(
        finetune_argv,
        tiny_models,
        "--end2end",
        "--indexing_freq",
        "2",
        "--do_train",
        "--max_steps",
        "10",
        *pooling,
        *prefixes,
    )
    module = finetune_rag.main(finetune_rag.parse_args(argv))
    # one transformer for both sides (the context side unscaled by the retrieval temperature)
    assert module.context_encoder.model is module.model.question_encoder.model
    assert module.model.question_encoder.pooling == "mean"
    history = _refresh_callback(module).history
    assert history, "no refresh with a mean-pooled shared encoder"
    assert module.kb.version == history[-1]["version"] and Path(module.kb.index_path).exists()
    _kill_actors(module)

    _evaluates_as_trained(module, tmp_path, prefix="query: ")


def test_seq2seq_with_a_mean_pooled_question_encoder(ray_local, finetune_argv, tiny_models, tmp_path):
    argv = finetune_argv(
        "--end2end",
        "--indexing_freq",
        "2",
        "--do_train",
        "--max_steps",
        "6",
        "--question_pooling",
        "mean",
        "--context_pooling",
        "mean",
    )
    i = argv.index("--model_name_or_path")
    argv[i : i + 2] = [
        "--question_encoder_name_or_path",
        str(tiny_models["question_encoder"]),
        "--generator_name_or_path",
        str(tiny_models["generator"]),
    ]
    module = finetune_rag.main(finetune_rag.parse_args(argv))
    encoder = module.model.question_encoder
    assert isinstance(encoder, PooledEncoder) and encoder.pooling == "mean"
    start = PooledEncoder.from_pretrained(str(tiny_models["question_encoder"]), "mean", side="question")
    assert any(not torch.equal(a, b) for a, b in zip(encoder.state_dict().values(), start.state_dict().values()))
    assert _refresh_callback(module).history, "no refresh with a mean-pooled seq2seq RAG"
    _kill_actors(module)
    _evaluates_as_trained(module, tmp_path, prefix="")


def _evaluates_as_trained(module, tmp_path: Path, prefix: str) -> None:
    """eval_rag.py reads the saved checkpoint back (pooling, prefix, KB version) and retrieves exactly as the
    trained module's question encoder with FAISS; its e2e mode writes one answer per question."""
    ckpt = tmp_path / "final" / f"checkpoint{module.global_step}"
    module.save_hf_checkpoint(ckpt)
    questions, answers = str(DUMMY_DATA / "test.source"), str(DUMMY_DATA / "test.target")
    common = [
        "--model_name_or_path",
        str(ckpt),
        "--evaluation_set",
        questions,
        "--gold_data_path",
        answers,
        "--eval_batch_size",
        "3",
    ]
    preds = tmp_path / "eval" / "retrieval.txt"
    eval_rag.main(
        eval_rag.parse_args([*common, "--eval_mode", "retrieval", "--ks", "1,5", "--predictions_path", str(preds)])
    )
    lines = preds.with_name("retrieval.ids.txt").read_text().splitlines()
    got = [list(map(int, line.split("\t")))[:5] for line in lines]
    encoder = module.model.question_encoder.eval()
    enc = module.model.question_tokenizer(
        [prefix + q for q in read_lines(questions)], padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        q = encoder(enc["input_ids"], attention_mask=enc["attention_mask"])[0].numpy()
    _, expected = faiss.read_index(module.kb.index_path).search(q, 5)
    assert got == expected.tolist()
    preds = tmp_path / "eval" / "answers.txt"
    metrics = eval_rag.main(
        eval_rag.parse_args([*common, "--predictions_path", str(preds), "--max_length", "4", "--num_beams", "1"])
    )
    assert len(preds.read_text().split("\n")) == 8 + 1 and 0 <= metrics[str(ckpt)]["f1"] <= 1


# ---------------------------------------------------------------- scoring, losses, saved settings


def test_a_kb_built_for_another_similarity_is_refused(ray_local, finetune_argv):
    with pytest.raises(ValueError, match=r"holds dot embeddings .* scores with cosine similarity"):
        finetune_rag.build_module(finetune_rag.parse_args(finetune_argv("--similarity", "cosine")))


def test_learned_temperature_trains_at_its_own_rate(ray_local, finetune_argv):
    argv = finetune_argv("--retrieval_temperature", "2", "--learn_temperature", "--temperature_learning_rate", "0.1")
    module = finetune_rag.build_module(finetune_rag.parse_args(argv))
    encoder = module.model.question_encoder
    assert isinstance(encoder, PooledEncoder) and encoder.temperature_value == pytest.approx(2.0)
    module.training_step(_batch(module), 0).backward()
    assert encoder.log_temperature.grad.abs() > 0, "no gradient reaches the temperature"
    module.trainer = type("T", (), {"estimated_stepping_batches": 10})()  # what configure_optimizers reads
    groups = module.configure_optimizers()["optimizer"].param_groups
    tau_group = next(g for g in groups if any(p is encoder.log_temperature for p in g["params"]))
    assert tau_group["weight_decay"] == 0.0 and len(tau_group["params"]) == 1
    assert tau_group["initial_lr"] == 0.1
    _kill_actors(module)


def test_eval_loss_is_the_mean_over_questions(ray_local, finetune_argv, tiny_models):
    """val_loss = mean over questions of each question's RAG NLL per answer token, whatever the batch size."""
    argv = _causal_argv(finetune_argv, tiny_models, "--eval_batch_size", "4")
    module = finetune_rag.build_module(finetune_rag.parse_args(argv))
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    logged = trainer.validate(module)[0]["val_loss"]
    module.eval()
    with torch.no_grad():
        losses = torch.cat(
            [
                module.model(b["input_ids"], b["attention_mask"], b["source_text"], b["target_text"])[0]
                for b in module.val_dataloader()
            ]
        )
    assert len(losses) == 8
    assert logged == pytest.approx(float(losses.mean()), rel=1e-4)
    _kill_actors(module)


def test_seq2seq_checkpoint_keeps_question_and_passage_prefixes(ray_local, finetune_argv, tmp_path):
    argv = finetune_argv("--end2end", "--question_prefix", "query: ", "--passage_prefix", "passage: ")
    module = finetune_rag.build_module(finetune_rag.parse_args(argv))
    ckpt = tmp_path / "checkpoint0"
    module.save_hf_checkpoint(ckpt)
    _kill_actors(module)
    args = eval_rag.parse_args(["--model_name_or_path", str(ckpt), "--evaluation_set", "q", "--gold_data_path", "g"])
    model = eval_rag.load_model(str(ckpt), args)
    tokenizer = module.model.question_tokenizer
    assert model.tokenize_questions(["who?"])["input_ids"].tolist() == [tokenizer("query: who?")["input_ids"]]
    passages = load_tokenizer(ckpt / "context_encoder")
    assert passages.prefix == "passage: "


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--model_type", "bart"], "invalid choice"),
        (["--use_dummy_dataset", "true", "--passages_path", "elsewhere"], "selects the bundled dummy KB"),
    ],
)
def test_flags_that_would_be_ignored_are_refused(extra, message, capsys):
    with pytest.raises(SystemExit):
        finetune_rag.parse_args(["--model_type", "rag_token", *extra])
    assert message in capsys.readouterr().err
    assert finetune_rag.parse_args(["--model_type", "rag_token", "--use_dummy_dataset", "true"]).use_dummy_dataset


def test_ddp_padding_duplicates_count_once_in_validation_and_test_means():
    # Rank 1's shard is padded with line 0 again: its scores count once, not twice.
    shards = [[(0, [1.0, 0.5]), (2, [0.0, 1.5])], [(1, [0.0, 2.5]), (0, [1.0, 0.5])]]
    assert finetune_rag.per_question_means(shards) == pytest.approx([1 / 3, 4.5 / 3])
    assert finetune_rag.per_question_means([[], []]) is None


def test_ddp_shards_of_test_answers_are_put_back_in_line_order():
    # DistributedSampler deals lines round-robin and pads the last shard with a repeat of line 0
    shards = [[(0, "a"), (2, "c"), (4, "e")], [(1, "b"), (3, "d"), (0, "a")]]
    assert finetune_rag.in_line_order(shards) == ["a", "b", "c", "d", "e"]


def test_refresh_before_validation_validates_against_the_current_weights(ray_local, finetune_argv, tmp_path):
    argv = finetune_argv(
        "--do_train",
        "--end2end",
        "--indexing_freq",
        "100",
        "--refresh_before_validation",
        "--max_steps",
        "4",
        "--val_check_interval",
        "4",
        "--num_sanity_val_steps",
        "0",
    )
    module = finetune_rag.main(finetune_rag.parse_args(argv))
    _kill_actors(module)
    (refresh,) = _refresh_callback(module).history  # no periodic trigger in 4 steps: this one is the pre-validation
    assert refresh["trigger_step"] == refresh["swap_step"] == 4
    assert module.kb.embedding_step == 4
    saved = json.loads((tmp_path / "out" / "checkpoint4" / "kb_version.json").read_text())
    assert saved["version"] == refresh["version"] == 1  # the checkpoint was validated against this index


def test_no_test_loss_skips_only_the_loss_and_long_answer_metrics_are_logged(ray_local, finetune_argv):
    argv = finetune_argv("--no_test_loss", "--metrics", "rouge_l,bleu", "--eval_batch_size", "3")
    module = finetune_rag.build_module(finetune_rag.parse_args(argv))
    results = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False).test(module)[0]
    _kill_actors(module)
    assert "test_loss" not in results and 0.0 <= results["test_em"] <= 1.0
    assert len(module.test_predictions) == 8
    targets = read_lines(DUMMY_DATA / "test.target")
    pairs = list(zip(module.test_predictions, targets))
    assert results["test_rouge_l"] == pytest.approx(sum(rouge_l_score(p, g) for p, g in pairs) / 8, abs=1e-6)
    assert results["test_bleu"] == pytest.approx(sum(sentence_bleu(p, g) for p, g in pairs) / 8, abs=1e-4)
