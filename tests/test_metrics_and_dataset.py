"""Tests for rag_metrics (SQuAD and long-answer metrics) and qa_dataset (the line-aligned QuestionDataset)."""

import argparse
import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_tokenizers import SPECIALS, wordpiece_tokenizer
from transformers import BertTokenizerFast, RagTokenizer

from rag_end2end.data.qa_dataset import QuestionDataset
from rag_end2end.evaluation.metrics import (
    calculate_exact_match,
    calculate_f1,
    corpus_bleu,
    exact_match_score,
    f1_score,
    metric_max_over_ground_truths,
    normalize_answer,
    rouge_l_score,
    sentence_bleu,
)
from rag_end2end.options import GENERATION_METRICS, parse_metrics

SENTENCES = [
    "who wrote hamlet",
    "william shakespeare wrote hamlet and macbeth",
    "what is the capital of france",
    "paris is the capital of france",
    "question: how tall is the eiffel tower",
]


@pytest.fixture(scope="session")
def rag_tokenizer() -> RagTokenizer:
    tok = wordpiece_tokenizer(SENTENCES)
    return RagTokenizer(question_encoder=tok, generator=tok)


@pytest.fixture(scope="session")
def pad4_tokenizer() -> BertTokenizerFast:
    """Pads with id 4, not 0, so padding with a constant 0 (or the wrong tokenizer's pad id) is detectable."""
    return wordpiece_tokenizer(SENTENCES, special_tokens=SPECIALS[1:] + ["[PAD]"])


def write_split(data_dir: Path, source: str, target: str, type_path: str = "train") -> None:
    (data_dir / f"{type_path}.source").write_text(source, encoding="utf-8")
    (data_dir / f"{type_path}.target").write_text(target, encoding="utf-8")


# --- metrics -------------------------------------------------------------------------------------------


def test_normalize_answer_strips_case_punctuation_articles_and_spaces() -> None:
    assert normalize_answer("  The  Quick, brown FOX!! ") == "quick brown fox"
    assert normalize_answer("an apple a day") == "apple day"
    # articles only at word boundaries: "Theatre" and "Anna" keep their letters
    assert normalize_answer("The Theatre of Anna") == "theatre of anna"
    assert normalize_answer("rock'n'roll") == "rocknroll"


def test_exact_match_score() -> None:
    assert exact_match_score("The Eiffel Tower.", "eiffel tower") is True
    assert exact_match_score("Eiffel", "eiffel tower") is False


def test_f1_score_partial_overlap_hand_computed() -> None:
    # pred {brown, fox}, gold {quick, brown, fox, jumps, over}: P = 2/2, R = 2/5, F1 = 2PR/(P+R) = 4/7
    assert f1_score("The brown fox", "quick brown fox jumps over") == pytest.approx(4 / 7)
    # repeated tokens count once per gold occurrence: P = 1/2, R = 1/1, F1 = 2/3
    assert f1_score("fox fox", "fox") == pytest.approx(2 / 3)
    assert f1_score("cat", "dog") == 0.0


def test_f1_score_empty_after_normalisation() -> None:
    assert f1_score("the", "a !") == 1.0
    assert f1_score("the", "paris") == 0.0
    assert f1_score("paris", "") == 0.0


def test_metric_max_over_ground_truths() -> None:
    golds = ["Paris, France", "the city of Paris"]
    assert metric_max_over_ground_truths(exact_match_score, "paris france", golds) is True
    # best of F1(paris, "paris france") = 2/3 and F1(paris, "city of paris") = 1/2
    assert metric_max_over_ground_truths(f1_score, "Paris", golds) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="at least one"):
        metric_max_over_ground_truths(f1_score, "Paris", [])


def test_corpus_metrics_accept_strings_or_lists_of_golds() -> None:
    predictions = ["Paris", "london", "berlin"]
    references = [["Rome", "Paris, France", "paris"], "The London", ["Munich"]]
    assert calculate_exact_match(predictions, references) == pytest.approx(2 / 3)
    assert calculate_f1(predictions, references) == pytest.approx(2 / 3)
    assert calculate_f1(["brown fox"], ["quick brown fox jumps over"]) == pytest.approx(4 / 7)
    assert calculate_exact_match(["a"], ["b"]) == 0.0


def test_corpus_metrics_reject_length_mismatch() -> None:
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        calculate_exact_match(["a", "b"], ["a"])
    with pytest.raises(ValueError):
        calculate_f1(["a"], [])


# --- long-answer metrics -------------------------------------------------------------------------------


def test_first_answer_em_scores_kept_generations_both_ways(tmp_path: Path) -> None:
    """experiments/first_answer_em.py: the old metric (first gold answer) and today's (best answer) on one run."""
    gold = [{"answers": ["Paris", "the city of Paris"]}, {"answers": ["in 1990", "1989"]}, {"answers": ["blue"]}]
    (tmp_path / "gold.jsonl").write_text("".join(json.dumps(g) + "\n" for g in gold))
    run = tmp_path / "seed1"
    run.mkdir()
    (run / "test_generations.txt").write_text("the city of Paris\n1990\nred\n")
    script = Path(__file__).resolve().parent.parent / "experiments" / "first_answer_em.py"
    out = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "gold.jsonl"), str(run)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    # EM: the first answers match none; the best answers match question 1 only ("1990" is not "in 1990").
    # F1 first: 1/2 ("Paris" within "city of paris") + 2/3 ("1990" within "in 1990"); F1 best: 1 + 2/3.
    row = [line for line in out.splitlines() if line.startswith("| seed1 |")][0].split("|")[2:6]
    assert [float(x) for x in row] == pytest.approx(
        [0.0, 100 / 3, 100 * (1 / 2 + 2 / 3) / 3, 100 * (1 + 2 / 3) / 3], abs=0.01
    )


def test_rouge_l_identical_and_disjoint() -> None:
    assert rouge_l_score("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(1.0)
    assert rouge_l_score("dogs bark loudly", "the cat sat on the mat") == 0.0


def test_rouge_l_partial_is_lcs_hand_computed() -> None:
    from rouge_score.rouge_scorer import RougeScorer

    # LCS "the cat on the mat" = 5 of 6 tokens each side: P = R = F = 5/6
    pred, ref = "the cat sat on the mat", "the cat lay on the mat"
    assert rouge_l_score(pred, ref) == pytest.approx(5 / 6)
    unstemmed = RougeScorer(["rougeL"], use_stemmer=False).score(ref, pred)["rougeL"].fmeasure
    assert unstemmed == pytest.approx(5 / 6)  # the stemmer leaves these words alone
    # a subsequence, not a bag of words: same tokens reversed share an LCS of 1 of 2 (token F1 would be 1)
    assert rouge_l_score("mat cat", "cat mat") == pytest.approx(1 / 2)
    # the stemmer is on: cats -> cat, running/runs -> run
    assert rouge_l_score("cats running", "cat runs") == pytest.approx(1.0)


def test_bleu_identical_and_disjoint() -> None:
    ref = "the quick brown fox jumps over the lazy dog"
    assert sentence_bleu(ref, ref) == pytest.approx(100.0)
    assert sentence_bleu("paris", "paris") == pytest.approx(100.0)  # effective order: no 4-grams needed
    assert sentence_bleu("dogs bark loudly at night", ref) < 1.0
    assert corpus_bleu([ref, "the cat sat on the mat"], [ref, "the cat sat on the mat"]) == pytest.approx(100.0)
    assert corpus_bleu(["dogs bark loudly at night", "red green blue"], [ref, "the cat sat on the mat"]) < 1.0


def test_corpus_bleu_rejects_length_mismatch() -> None:
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        corpus_bleu(["a", "b"], ["a"])


def test_parse_metrics_orders_and_always_includes_em_f1() -> None:
    assert GENERATION_METRICS == ("em", "f1", "rouge_l", "bleu")
    assert parse_metrics("bleu") == ("em", "f1", "bleu")
    assert parse_metrics(" bleu, rouge_l ,em,bleu") == ("em", "f1", "rouge_l", "bleu")
    assert parse_metrics("") == ("em", "f1")


def test_parse_metrics_rejects_unknown_name_naming_it(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=r"unknown metric\(s\) 'rouge' .*rouge_l, bleu"):
        parse_metrics("em,rouge")
    parser = argparse.ArgumentParser()
    parser.add_argument("--metrics", type=parse_metrics)
    with pytest.raises(SystemExit):
        parser.parse_args(["--metrics", "rouge"])
    assert "unknown metric(s) 'rouge'" in capsys.readouterr().err  # argparse shows the message, not "invalid value"


# --- dataset -------------------------------------------------------------------------------------------


def test_dataset_reads_aligned_lines_and_tokenises(tmp_path: Path, rag_tokenizer: RagTokenizer) -> None:
    write_split(tmp_path, "who wrote hamlet\n  what is the capital of france \n", "william shakespeare\nparis\n")
    tok = rag_tokenizer.question_encoder
    ds = QuestionDataset(tok, str(tmp_path), max_source_length=32)
    assert len(ds) == 2
    item = ds[1]
    assert set(item) == {"source_text", "target_text", "input_ids", "index"}
    assert item["source_text"] == "what is the capital of france"
    assert item["target_text"] == "paris"
    assert item["index"] == 1
    assert tok.convert_ids_to_tokens(item["input_ids"]) == [
        "[CLS]",
        "what",
        "is",
        "the",
        "capital",
        "of",
        "france",
        "[SEP]",
    ]
    assert ds[0]["target_text"] == "william shakespeare" and ds[0]["index"] == 0


def test_dataset_prefix_truncation_and_n_obs(tmp_path: Path, rag_tokenizer: RagTokenizer) -> None:
    # no trailing newline here: the last line still counts
    write_split(tmp_path, "who wrote hamlet\nhow tall is the eiffel tower\nwho wrote macbeth", "a\nb\nc", "val")
    tok = rag_tokenizer.question_encoder
    ds = QuestionDataset(tok, str(tmp_path), max_source_length=4, type_path="val", prefix="question: ")
    assert len(ds) == 3
    tokens = tok.convert_ids_to_tokens(ds[0]["input_ids"])
    assert tokens == ["[CLS]", "question", ":", "[SEP]"]
    assert ds[0]["source_text"] == "who wrote hamlet"  # the prefix goes to the encoder only
    assert ds[2]["target_text"] == "c"
    assert len(QuestionDataset(tok, str(tmp_path), 8, "val", n_obs=2)) == 2
    assert len(QuestionDataset(tok, str(tmp_path), 8, "val", n_obs=-1)) == 3


def test_dataset_rejects_mismatched_line_counts(tmp_path: Path, rag_tokenizer: RagTokenizer) -> None:
    write_split(tmp_path, "q1\nq2\nq3\n", "a1\na2\n")
    with pytest.raises(ValueError) as err:
        QuestionDataset(rag_tokenizer.question_encoder, str(tmp_path), 16)
    message = str(err.value)
    assert "train.source" in message and "train.target" in message
    assert "3" in message and "2" in message


@pytest.mark.parametrize("blank", ["", "   \t"])
def test_dataset_rejects_blank_line_naming_file_and_line(
    tmp_path: Path, rag_tokenizer: RagTokenizer, blank: str
) -> None:
    write_split(tmp_path, "q1\nq2\nq3\nq4\n", f"a1\na2\n{blank}\na4\n")
    with pytest.raises(ValueError, match=r"train\.target:3"):
        QuestionDataset(rag_tokenizer.question_encoder, str(tmp_path), 16)


def test_dataset_rejects_missing_file(tmp_path: Path, rag_tokenizer: RagTokenizer) -> None:
    (tmp_path / "test.source").write_text("q1\n", encoding="utf-8")
    with pytest.raises(FileNotFoundError, match=r"test\.target"):
        QuestionDataset(rag_tokenizer.question_encoder, str(tmp_path), 16, type_path="test")


def test_dataset_rejects_question_tokenizer_without_pad_token(tmp_path: Path, pad4_tokenizer) -> None:
    write_split(tmp_path, "q1\n", "a1\n")
    no_pad = copy.deepcopy(pad4_tokenizer)
    no_pad.pad_token = None
    assert no_pad.pad_token_id is None
    with pytest.raises(ValueError, match="pad token"):
        QuestionDataset(no_pad, str(tmp_path), 16)


def test_collate_pads_questions_with_the_question_tokenizers_pad_id(tmp_path: Path, pad4_tokenizer) -> None:
    q_pad = pad4_tokenizer.pad_token_id
    assert q_pad == 4
    write_split(tmp_path, "who wrote hamlet\nwhat is the capital of france\n", "william shakespeare\nparis\n")
    ds = QuestionDataset(pad4_tokenizer, str(tmp_path), 32)
    items = [ds[0], ds[1]]
    batch = ds.collate_fn(items)

    assert set(batch) == {"input_ids", "attention_mask", "source_text", "target_text", "index"}
    src_lens = [len(it["input_ids"]) for it in items]
    assert src_lens == [5, 8]
    assert q_pad not in items[0]["input_ids"] + items[1]["input_ids"]  # so a pad in the batch came from collate
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (2, 8)
    assert batch["input_ids"].dtype == batch["attention_mask"].dtype == torch.long

    assert batch["input_ids"][0].tolist() == items[0]["input_ids"] + [q_pad] * 3
    assert batch["input_ids"][1].tolist() == items[1]["input_ids"]
    assert batch["attention_mask"].tolist() == [[1] * 5 + [0] * 3, [1] * 8]
    assert batch["source_text"] == ["who wrote hamlet", "what is the capital of france"]
    assert batch["target_text"] == ["william shakespeare", "paris"]
    assert batch["index"].tolist() == [0, 1]


def test_long_questions_are_cut_with_a_warning_naming_the_first(tmp_path: Path, rag_tokenizer: RagTokenizer) -> None:
    long = " ".join(["hamlet"] * 50)
    write_split(tmp_path, f"who wrote hamlet\n{long}\n{long}\n", "a\nb\nc\n")
    tok = rag_tokenizer.question_encoder
    with pytest.warns(
        UserWarning,
        match=r"train\.source: 2 of 3 questions are longer than --max_source_length 8 "
        r"tokens and are cut to it \(the first: line 2, 52 tokens\)",
    ):
        ds = QuestionDataset(tok, str(tmp_path), max_source_length=8)
    assert [len(ds[i]["input_ids"]) for i in range(3)] == [5, 8, 8]
    assert ds[1]["source_text"] == long  # the text is kept whole; only the encoder's tokens are cut


def test_long_training_answers_are_cut_to_max_target_length(tmp_path: Path, rag_tokenizer: RagTokenizer) -> None:
    write_split(tmp_path, "who wrote hamlet\nwho wrote macbeth\n", "william shakespeare\n" + SENTENCES[1] * 4 + "\n")
    ds = QuestionDataset(rag_tokenizer.question_encoder, str(tmp_path), max_source_length=16)
    generator_tok = rag_tokenizer.generator
    with pytest.warns(UserWarning, match=r"train\.target: 1 of 2 answers are longer than --max_target_length 5"):
        ds.cut_targets(generator_tok, 5)
    assert ds.targets[0] == "william shakespeare"
    cut = generator_tok(ds.targets[1], add_special_tokens=False)["input_ids"]
    assert cut == generator_tok(SENTENCES[1] * 4, add_special_tokens=False)["input_ids"][:5]
