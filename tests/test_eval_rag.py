"""eval_rag.py on a tiny checkpoint trained end to end in-process: generated answers, retrieval metrics
against a knowledge base whose embeddings the test sets, every checkpoint with its own KB version."""

import argparse
import json
import shutil
import uuid
from pathlib import Path

import faiss
import numpy as np
import pytest
import ray
import torch
from datasets import load_from_disk
from transformers import AutoTokenizer, DPRQuestionEncoder

from rag_end2end.data.readers import InputError
from rag_end2end.evaluation import evaluate as eval_rag
from rag_end2end.evaluation.metrics import corpus_bleu, has_answer, mrr_at_k, recall_at_k
from rag_end2end.kb import search as kb_search
from rag_end2end.kb.index import IndexConfig
from rag_end2end.kb.parts import with_embeddings
from rag_end2end.kb.versions import checkpoint_kb, save_kb
from rag_end2end.model.rag import RagModel
from rag_end2end.training import finetune as finetune_rag

DATA = Path(__file__).resolve().parents[1] / "test_run" / "dummy-train-data"
QUESTIONS, ANSWERS = DATA / "test.source", DATA / "test.target"
A, B, C = 7, 3, 30  # the passages the controlled KB ranks first, second and third for every question


def _evaluate(*argv: str) -> dict[str, dict]:
    return eval_rag.main(eval_rag.parse_args([str(a) for a in argv]))


def _controlled_kb(checkpoint: Path, out: Path) -> tuple[Path, Path]:
    """The checkpoint's passages with embeddings chosen so that every test question ranks A, B, C, then
    the others by increasing id: A, B, C lie along the mean question direction, the others against it."""
    model = RagModel.from_pretrained(str(checkpoint), load_generator=False)
    questions = QUESTIONS.read_text().splitlines()
    with torch.no_grad():
        q = model.question_encoder(**model.question_tokenizer(questions, return_tensors="pt", padding=True))[0].numpy()
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    direction = q.mean(0) / np.linalg.norm(q.mean(0))
    assert (q @ direction > 0.1).all(), "the test questions do not share a direction"
    passages = load_from_disk(checkpoint_kb(checkpoint)[0])
    scale = -(1 + np.arange(len(passages)) / 100)  # below zero, decreasing with the id
    scale[[A, B, C]] = [10, 5, 2]
    kb = (out / "passages", out / "index.faiss")
    save_kb(with_embeddings(passages, scale[:, None] * direction[None, :]), *kb, IndexConfig("flat"))
    return kb


def _gold_records(passages) -> list[dict]:
    """One gold record per test question; ranks in the controlled KB: A 1, B 2, C 3, id 0 4, id 39 40."""
    words = " ".join(passages[A]["text"].split()[5:8])  # three words of passage A, found at rank 1
    gold = [[A], [C], [B, C], [0], [], [], [A], [39]]
    answers = [["x"]] * 4 + [[words], ["zzzz qqqq"], ["x"], ["x"]]
    records = [{"answers": a, "gold_passage_ids": g} for a, g in zip(answers, gold)]
    records[6]["title"], records[7]["title"] = passages[A]["title"], "No such title"
    return records


def test_eval_rag_end_to_end(ray_local, finetune_argv, tmp_path, monkeypatch):
    namespace = f"test-eval-{uuid.uuid4().hex[:8]}"
    argv = finetune_argv(
        "--do_train",
        "--end2end",
        "--indexing_freq",
        "2",
        "--max_steps",
        "12",
        "--val_check_interval",
        "5",
        "--ray_namespace",
        namespace,
    )
    module = finetune_rag.main(finetune_rag.parse_args(argv))
    for actor in module.retriever.actors:
        ray.kill(actor)
    run = tmp_path / "out"
    # The best of the validations at steps 5 and 10 (EM ties go to the later) and the final weights, on the last KB
    checkpoints = sorted(run.glob("checkpoint*"), key=lambda p: int(p.name[len("checkpoint") :]))
    assert [p.name for p in checkpoints] == ["checkpoint10", "checkpoint12"]
    last = checkpoints[-1]

    # e2e: one generated answer per question, EM/F1 in [0, 1].
    preds = tmp_path / "e2e" / "preds.txt"
    common = ["--model_name_or_path", last, "--evaluation_set", QUESTIONS, "--eval_batch_size", 3]
    metrics = _evaluate(
        *common,
        "--gold_data_path",
        ANSWERS,
        "--predictions_path",
        preds,
        "--num_beams",
        2,
        "--max_length",
        8,
        "--n_docs",
        2,
    )[str(last)]
    assert len(preds.read_text().split("\n")) == 8 + 1
    assert set(metrics) == {"em", "f1", "n"} and metrics["n"] == 8
    assert 0 <= metrics["em"] <= metrics["f1"] <= 1
    assert json.loads(preds.with_suffix(".json").read_text()) == metrics

    # Existing predictions are scored as they are unless --recalculate: the gold answers score 1.
    preds.write_text(ANSWERS.read_text())
    rescored = _evaluate(*common, "--gold_data_path", ANSWERS, "--predictions_path", preds)[str(last)]
    assert rescored == {"em": 1.0, "f1": 1.0, "n": 8}

    # Retrieval against the controlled KB, with gold passage ids, answers and titles.
    kb = _controlled_kb(last, tmp_path / "controlled-kb")
    passages = load_from_disk(str(kb[0]))
    gold = tmp_path / "test.gold.jsonl"
    gold.write_text("".join(json.dumps(r) + "\n" for r in _gold_records(passages)))
    preds = tmp_path / "retrieval" / "preds.txt"
    retrieval = [
        *common,
        "--eval_mode",
        "retrieval",
        "--gold_data_path",
        gold,
        "--predictions_path",
        preds,
        "--passages_path",
        kb[0],
        "--index_path",
        kb[1],
    ]
    metrics = _evaluate(*retrieval)[str(last)]
    assert metrics == pytest.approx(
        {
            "recall@1": 2 / 6,
            "recall@5": 5 / 6,
            "recall@10": 5 / 6,
            "recall@20": 5 / 6,
            "n_gold_ids": 6,
            "mrr@1": 2 / 6,
            "mrr@5": (1 + 1 / 3 + 1 / 2 + 1 / 4 + 1) / 6,
            "mrr@10": (1 + 1 / 3 + 1 / 2 + 1 / 4 + 1) / 6,
            "mrr@20": (1 + 1 / 3 + 1 / 2 + 1 / 4 + 1) / 6,
            "answer_recall@1": 0.5,
            "answer_recall@5": 0.5,
            "answer_recall@10": 0.5,
            "answer_recall@20": 0.5,
            "n_answers_only": 2,
            "precision@1": 0.5,
            "n_titles": 2,
            "n": 8,
        }
    )
    rows = preds.read_text().splitlines()
    assert len(rows) == 8 and all(len(r.split("\t")) == 20 for r in rows)
    expected_ids = [A, B, C, *(i for i in range(len(passages)) if i not in (A, B, C))][:20]
    ids_file = preds.with_name("preds.ids.txt").read_text().splitlines()
    assert ids_file == ["\t".join(map(str, expected_ids))] * 8
    assert rows[0].split("\t")[:3] == [passages[i]["title"] for i in (A, B, C)]
    # Rescoring the stored ids (no model) agrees, and refuses a k beyond what they hold.
    rescored = _evaluate(*retrieval, "--ks", "1,5")[str(last)]
    assert rescored == {k: v for k, v in metrics.items() if not k.endswith(("@10", "@20"))}
    with pytest.raises(ValueError, match="--recalculate"):
        _evaluate(*retrieval, "--ks", "30")

    # --eval_all_checkpoints: every checkpoint in step order, each with the KB version it names.
    used, kb_paths = [], eval_rag.kb_paths

    def recording_kb_paths(checkpoint, args):
        used.append(kb_paths(checkpoint, args))
        return used[-1]

    monkeypatch.setattr(eval_rag, "kb_paths", recording_kb_paths)
    preds = tmp_path / "all" / "preds.txt"
    results = _evaluate(
        "--model_name_or_path",
        run,
        "--eval_all_checkpoints",
        "--eval_mode",
        "retrieval",
        "--evaluation_set",
        QUESTIONS,
        "--gold_data_path",
        ANSWERS,
        "--predictions_path",
        preds,
        "--ks",
        "1,40",
    )
    assert list(results) == [str(c) for c in checkpoints]
    named = [json.loads((c / "kb_version.json").read_text()) for c in checkpoints]
    assert used == [checkpoint_kb(c) for c in checkpoints]
    assert named[0]["version"] < named[-1]["version"]
    summary = json.loads((tmp_path / "all" / "preds.json").read_text())
    assert list(summary) == [c.name for c in checkpoints]
    for c in checkpoints:
        assert len((tmp_path / "all" / f"preds.{c.name}.txt").read_text().splitlines()) == 8
        # Every passage is among the top 40 of a 40-passage KB: every answer in the KB is found.
        assert summary[c.name]["answer_recall@40"] == summary[checkpoints[0].name]["answer_recall@40"] > 0


def test_long_answer_metrics_against_the_best_gold_answer():
    gold = eval_rag.Gold(
        answers=[["the cat lay on the mat", "a dog"], ["paris"]], passage_ids=[[], []], titles=[[], []]
    )
    predictions = ["the cat sat on the mat", "rome"]
    scores = eval_rag.score_e2e(predictions, gold, "gold.jsonl", ("em", "f1", "rouge_l", "bleu"))
    assert scores["rouge_l"] == pytest.approx((5 / 6 + 0.0) / 2)  # LCS 5 of 6 words; no word in common
    assert scores["bleu"] == pytest.approx(corpus_bleu(predictions, ["the cat lay on the mat", "paris"]))
    assert set(eval_rag.score_e2e(predictions, gold, "gold.jsonl")) == {"em", "f1", "n"}


def test_read_gold_formats(tmp_path):
    qa = tmp_path / "nq.qa.tsv"
    qa.write_text('who wrote it ?\t[\'Ann\', "Bo\'s"]\nwhen ?\t["1999"]\n')
    assert eval_rag.infer_gold_mode(str(qa)) == "qa"
    assert eval_rag.read_gold(str(qa), "qa").answers == [["Ann", "Bo's"], ["1999"]]
    qa.write_text("who ?\t__import__('os').system('true')\n")
    with pytest.raises(ValueError, match=r"nq.qa.tsv:1: the answer list is not a Python literal"):
        eval_rag.read_gold(str(qa), "qa")
    jsonl = tmp_path / "test.gold.jsonl"
    jsonl.write_text('{"answers": ["a", "b"], "gold_passage_ids": [3, 4], "title": "T"}\n{"answers": ["c"]}\n')
    gold = eval_rag.read_gold(str(jsonl), eval_rag.infer_gold_mode(str(jsonl)))
    assert (gold.answers, gold.passage_ids, gold.titles) == ([["a", "b"], ["c"]], [[3, 4], []], [["T"], []])
    assert eval_rag.infer_gold_mode(str(ANSWERS)) == "ans"
    assert eval_rag.read_gold(str(ANSWERS), "ans").answers[1] == ["liver"]


def test_checkpoint_dirs_in_step_order(tmp_path):
    for name in ("checkpoint100", "checkpoint20", "checkpoint3.tmp-1234abcd", "kb", "checkpoint5"):
        (tmp_path / name).mkdir()
    assert [Path(p).name for p in eval_rag.checkpoint_dirs(str(tmp_path), True)] == [
        "checkpoint5",
        "checkpoint20",
        "checkpoint100",
    ]
    assert eval_rag.checkpoint_dirs("some/dir", False) == ["some/dir"]
    with pytest.raises(FileNotFoundError):
        eval_rag.checkpoint_dirs(str(tmp_path / "kb"), True)


def test_zero_shot_retrieval_of_a_question_encoder_alone(tiny_models, tiny_kb, tmp_path):
    """--question_encoder_name_or_path: no RAG model, no training; the metrics equal a direct FAISS search with
    the encoder's own vectors, and a KB made for another similarity is refused."""
    passages, index = tiny_kb
    texts = load_from_disk(str(passages))["text"][:]
    answers = ANSWERS.read_text().splitlines()
    gold = [[i for i, text in enumerate(texts) if has_answer(text, [a])] for a in answers]
    gold_path = tmp_path / "test.gold.jsonl"
    gold_path.write_text(
        "".join(json.dumps({"answers": [a], "gold_passage_ids": g}) + "\n" for a, g in zip(answers, gold))
    )
    assert sum(map(bool, gold)) >= 4, "too few questions with a gold passage to test anything"
    encoder = str(tiny_models["question_encoder"])
    common = [
        "--eval_mode",
        "retrieval",
        "--question_encoder_name_or_path",
        encoder,
        "--passages_path",
        passages,
        "--index_path",
        index,
        "--evaluation_set",
        QUESTIONS,
        "--gold_data_path",
        gold_path,
        "--ks",
        "1,5,20",
        "--predictions_path",
        tmp_path / "zs.txt",
        "--metrics_path",
        tmp_path / "zero-shot.json",
    ]
    metrics = _evaluate(*common)[encoder]
    assert json.loads((tmp_path / "zero-shot.json").read_text()) == metrics

    model, tokenizer = DPRQuestionEncoder.from_pretrained(encoder).eval(), AutoTokenizer.from_pretrained(encoder)
    with torch.no_grad():
        q = model(**tokenizer(QUESTIONS.read_text().splitlines(), padding=True, return_tensors="pt")).pooler_output
    _, ids = faiss.read_index(str(index)).search(q.numpy(), 20)
    expected = {**recall_at_k(ids.tolist(), gold, (1, 5, 20)), **mrr_at_k(ids.tolist(), gold, (1, 5, 20))}
    for key in ("recall@1", "recall@5", "recall@20", "mrr@20"):
        assert metrics[key] == pytest.approx(expected[key]) and 0.0 <= metrics[key] <= 1.0
    with pytest.raises(ValueError, match=r"holds dot embeddings .* scores with cosine"):
        _evaluate(*common, "--similarity", "cosine", "--recalculate")


def test_eval_rag_refuses_gold_without_answers_and_a_missing_model_directory(tiny_models, tiny_kb, tmp_path):
    """Before any model loads: a gold file with nothing to score against (it used to exit 0 with empty metrics),
    and a model directory that does not exist (it used to meet the hub's "Repo id" error)."""
    passages, index = tiny_kb
    n = len(QUESTIONS.read_text().splitlines())
    empty = tmp_path / "test.gold.jsonl"
    empty.write_text('{"answers": [], "gold_passage_ids": []}\n' * n)
    common = [
        "--eval_mode",
        "retrieval",
        "--passages_path",
        passages,
        "--index_path",
        index,
        "--evaluation_set",
        QUESTIONS,
        "--predictions_path",
        tmp_path / "p.txt",
    ]
    encoder = ["--question_encoder_name_or_path", str(tiny_models["question_encoder"])]
    with pytest.raises(InputError, match=r"test\.gold\.jsonl: no gold answers, passage ids or titles on any line"):
        _evaluate(*common, *encoder, "--gold_data_path", empty)
    n_kb = len(load_from_disk(str(passages)))
    outside = tmp_path / "outside.gold.jsonl"  # line 3 names a passage the KB does not have
    outside.write_text(
        "".join(json.dumps({"answers": ["a"], "gold_passage_ids": [n_kb if i == 2 else 0]}) + "\n" for i in range(n))
    )
    with pytest.raises(InputError, match=rf"outside\.gold\.jsonl:3: field `gold_passage_ids`: {n_kb} is no passage of"):
        _evaluate(*common, *encoder, "--gold_data_path", outside)
    assert not (tmp_path / "p.txt").exists()  # nothing predicted, nothing written
    missing = tmp_path / "runs" / "checkpoint40"
    (tmp_path / "runs").mkdir()
    with pytest.raises(FileNotFoundError, match=r"--model_name_or_path .*checkpoint40: no such directory"):
        _evaluate(*common, "--model_name_or_path", missing, "--gold_data_path", ANSWERS, "--gold_data_mode", "ans")


def test_kb_search_repeats_the_best_hit_where_faiss_finds_none(tiny_kb):
    """FAISS pads with id -1 (and a zero vector) past what it finds: never the last passage in disguise."""
    passages, index = tiny_kb
    search = kb_search.KBSearch(str(passages), str(index), 32)
    n = len(search)
    q = np.random.default_rng(0).standard_normal((2, 32)).astype(np.float32)
    stored, ids, docs = search.retrieve(q, n + 3)
    assert (ids >= 0).all() and (ids[:, n:] == ids[:, :1]).all()
    np.testing.assert_array_equal(np.asarray(stored)[:, n:], np.repeat(np.asarray(stored)[:, :1], 3, 1))
    kb = load_from_disk(str(passages))
    assert docs[0]["title"][n:] == [kb[int(ids[0, 0])]["title"]] * 3


def test_eval_rag_reproduces_the_do_predict_that_wrote_the_checkpoint(ray_local, finetune_argv, tmp_path):
    """One checkpoint, one answer set: eval_rag.py with no flag but the files gives the answers, EM/F1 (best
    over every gold answer) and recall@k that --do_predict logged, with n_docs, re-ranking, question length,
    beams and the context encoder's fresh doc scores all read from the checkpoint."""
    data = tmp_path / "data"
    shutil.copytree(DATA, data)
    targets = (data / "test.target").read_text().splitlines()
    records = [{"answers": [t, f"other answer {i}"], "gold_passage_ids": [i, 20 + i]} for i, t in enumerate(targets)]
    (data / "test.gold.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    argv = finetune_argv(
        "--do_train",
        "--do_predict",
        "--end2end",
        "--indexing_freq",
        "2",
        "--max_steps",
        "4",
        "--val_check_interval",
        "4",
        "--num_sanity_val_steps",
        "0",
        "--n_docs",
        "3",
        "--rerank_top",
        "5",
        "--max_source_length",
        "9",
        "--test_max_target_length",
        "6",
        "--num_beams",
        "2",
        model="rag_sequence",
    )
    argv[argv.index("--data_dir") + 1] = str(data)
    module = finetune_rag.main(finetune_rag.parse_args(argv))
    for actor in module.retriever.actors:
        ray.kill(actor)
    run = tmp_path / "out"
    logged = module.trainer.callback_metrics
    (checkpoint,) = run.glob("checkpoint*")  # the one validation's, which --do_predict tested
    settings = json.loads((checkpoint / "rag_settings.json").read_text())
    assert (settings["n_docs"], settings["rerank_top"], settings["question_max_length"]) == (3, 5, 9)
    assert settings["generation"] == {"num_beams": 2, "max_new_tokens": 6} and settings["doc_scores"] == "fresh"

    common = [
        "--model_name_or_path",
        checkpoint,
        "--evaluation_set",
        data / "test.source",
        "--gold_data_path",
        data / "test.gold.jsonl",
        "--eval_batch_size",
        3,
    ]
    e2e = _evaluate(*common, "--predictions_path", tmp_path / "preds.txt")[str(checkpoint)]
    assert (tmp_path / "preds.txt").read_text() == (run / "test_generations.txt").read_text()
    assert e2e["em"] == pytest.approx(float(logged["test_em"])) and e2e["f1"] == pytest.approx(float(logged["test_f1"]))
    retrieval = _evaluate(*common, "--eval_mode", "retrieval", "--predictions_path", tmp_path / "ids.txt")
    for k in (1, 5, 10, 20):
        assert retrieval[str(checkpoint)][f"recall@{k}"] == pytest.approx(float(logged[f"test_recall@{k}"]))
    assert 0 < float(logged["test_recall@20"])


def test_eval_rag_on_parts_with_peft_adapters(tiny_models, tiny_kb, tmp_path):
    """A question encoder, a KB and a generator, each given apart with a peft adapter (DALM's eval-rag): eval_rag.py
    scores the answers and passages of those parts with the adapters live (RagModel.answer with peft's models),
    the adapters folded in; without the adapters the passages differ, so the adapters are applied; an adapter of
    another model, or none in the directory, is refused."""
    from peft import PeftModel

    from rag_end2end.model.encoders import load_encoder, load_tokenizer
    from rag_end2end.model.lora import add_lora
    from rag_end2end.model.rag import Seq2SeqGenerator

    passages, index = tiny_kb
    base = tmp_path / "generator"  # the tiny generator at init scale emits only [CLS]: larger weights, real answers
    generator = Seq2SeqGenerator.from_pretrained(str(tiny_models["generator"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in generator.model.parameters():
            p.normal_(0, 0.3)
    generator.save_pretrained(base)
    q_name = str(tiny_models["question_encoder"])
    question_encoder = load_encoder(q_name, side="question")
    adapters = {"generator": tmp_path / "g_adapter", "question_encoder": tmp_path / "q_adapter"}
    for part, where in ((generator, adapters["generator"]), (question_encoder, adapters["question_encoder"])):
        add_lora(part, 4, 8, 0.0)
        with torch.no_grad():
            for name, p in part.named_parameters():
                if "lora_B" in name:  # peft starts B at zero: an adapter that changes nothing
                    p.normal_(0, 1.0)
        [peft_model] = [m for m in part.modules() if isinstance(m, PeftModel)]
        peft_model.save_pretrained(where)
    live = RagModel(question_encoder, load_tokenizer(q_name), generator, kb_search.KBSearch(passages, index, 32), 3)
    questions = QUESTIONS.read_text().splitlines()
    expected = live.eval().answer(questions, max_new_tokens=8)

    common = [
        "--question_encoder_name_or_path",
        q_name,
        "--passages_path",
        passages,
        "--index_path",
        index,
        "--evaluation_set",
        QUESTIONS,
        "--gold_data_path",
        ANSWERS,
        "--gold_data_mode",
        "ans",
        "--n_docs",
        "3",
        "--max_length",
        "8",
        "--metrics",
        "em,f1,bleu,rouge_l",
    ]
    with_adapters = ["--question_encoder_adapter", adapters["question_encoder"]]
    g = ["--generator_name_or_path", base, "--generator_adapter", adapters["generator"]]
    metrics = _evaluate(*common, *with_adapters, *g, "--predictions_path", tmp_path / "e2e.txt")[q_name]
    predictions = (tmp_path / "e2e.txt").read_text().splitlines()
    assert predictions == [r["answer"].strip() for r in expected] and any(predictions)
    assert set(metrics) >= {"em", "f1", "bleu", "rouge_l"} and metrics["n"] == len(questions)

    gold = tmp_path / "test.gold.jsonl"  # each question's gold passage: the live model's top one
    gold.write_text("".join(json.dumps({"gold_passage_ids": [r["passages"][0]["id"]]}) + "\n" for r in expected))
    retrieval = [*common[:8], "--gold_data_path", gold, "--eval_mode", "retrieval", "--ks", "1,40"]
    adapted = _evaluate(*retrieval, *with_adapters, "--predictions_path", tmp_path / "r.txt")[q_name]
    assert adapted["recall@1"] == 1.0
    ids = (tmp_path / "r.ids.txt").read_text().splitlines()
    assert [line.split("\t")[:3] for line in ids] == [[str(p["id"]) for p in r["passages"]] for r in expected]
    _evaluate(*retrieval, "--predictions_path", tmp_path / "r0.txt")
    assert (tmp_path / "r0.ids.txt").read_text().splitlines() != ids, "the question encoder's adapter changed nothing"

    with pytest.raises(ValueError, match="q_adapter"):  # a BERT adapter on a BART generator
        _evaluate(*common, "--generator_name_or_path", base, "--generator_adapter", adapters["question_encoder"])
    with pytest.raises(FileNotFoundError, match=r"generator: no adapter_config\.json"):
        _evaluate(*common, "--generator_name_or_path", base, "--generator_adapter", base)
    with pytest.raises(SystemExit):  # parts without a generator score retrieval only
        _evaluate(*common)


def test_a_gone_kb_version_is_named_with_what_to_pass(tmp_path):
    """A checkpoint whose KB version was pruned: the message says so; a path the user passed is named as theirs."""
    checkpoint = tmp_path / "run" / "checkpoint40"
    checkpoint.mkdir(parents=True)
    pruned = {"version": 3, "passages_path": "../kb/v0003/passages", "index_path": "../kb/v0003/index.faiss"}
    (checkpoint / "kb_version.json").write_text(json.dumps(pruned))
    args = argparse.Namespace(passages_path=None, index_path=None)
    with pytest.raises(FileNotFoundError, match=r"v0003/passages not found: the KB version that .*kb_version\.json"):
        eval_rag.kb_paths(str(checkpoint), args)
    args.passages_path = str(tmp_path / "mine")
    with pytest.raises(FileNotFoundError, match=r"^--passages_path .*mine not found$"):
        eval_rag.kb_paths(str(checkpoint), args)
