"""Evaluation metrics: SQuAD EM/F1 (best over every gold answer), ROUGE-L and BLEU, and retrieval recall@k,
MRR@k and precision@k of gold passages."""

from __future__ import annotations

import functools
import re
import string
from collections import Counter
from collections.abc import Callable
from typing import Any

_PUNCTUATION_TABLE = str.maketrans("", "", string.punctuation)


def normalize_answer(s: str) -> str:
    """Lowercase, drop punctuation and articles, collapse whitespace (SQuAD v1.1 normalisation)."""
    s = s.lower().translate(_PUNCTUATION_TABLE)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match_score(prediction: str, ground_truth: str) -> bool:
    """Whether prediction and gold answer are identical after normalisation."""
    return normalize_answer(prediction) == normalize_answer(ground_truth)


def f1_score(prediction: str, ground_truth: str) -> float:
    """Token bag-of-words F1 between normalised prediction and gold answer."""
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(ground_truth).split()
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)  # both empty is a match, one empty is not
    num_same = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_tokens)
    recall = num_same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def metric_max_over_ground_truths(
    metric_fn: Callable[[str, str], float], prediction: str, ground_truths: list[str]
) -> float:
    """Best score of the prediction against any of the gold answers."""
    if not ground_truths:
        raise ValueError("ground_truths must contain at least one answer")
    return max(metric_fn(prediction, gold) for gold in ground_truths)


def _mean_metric(
    metric_fn: Callable[[str, str], float], predictions: list[str], references: list[str] | list[list[str]]
) -> float:
    """Mean over examples of the best score against each example's gold answer(s)."""
    if len(predictions) != len(references):
        raise ValueError(f"got {len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("cannot average a metric over zero examples")
    total = 0.0
    for prediction, golds in zip(predictions, references):
        golds = [golds] if isinstance(golds, str) else golds
        total += metric_max_over_ground_truths(metric_fn, prediction, golds)
    return total / len(predictions)


def calculate_exact_match(predictions: list[str], references: list[str] | list[list[str]]) -> float:
    """Fraction of predictions that exactly match one of their gold answers, in [0, 1]."""
    return _mean_metric(exact_match_score, predictions, references)


def calculate_f1(predictions: list[str], references: list[str] | list[list[str]]) -> float:
    """Mean over examples of the best token F1 against the gold answers, in [0, 1]."""
    return _mean_metric(f1_score, predictions, references)


@functools.cache
def _rouge_l_scorer() -> Any:
    """The ROUGE-L scorer, built on first use (importing rouge_score pulls in nltk, which is slow)."""
    from rouge_score.rouge_scorer import RougeScorer

    return RougeScorer(["rougeL"], use_stemmer=True)


@functools.cache
def _bleu(effective_order: bool) -> Any:
    """A sacrebleu BLEU metric, built once; effective_order skips n-gram orders a short sentence lacks."""
    from sacrebleu.metrics import BLEU

    return BLEU(effective_order=effective_order)


def rouge_l_score(prediction: str, ground_truth: str) -> float:
    """ROUGE-L F-measure in [0, 1]: longest-common-subsequence overlap, which rewards word order in long answers."""
    return _rouge_l_scorer().score(ground_truth, prediction)["rougeL"].fmeasure


def corpus_bleu(predictions: list[str], references: list[str]) -> float:
    """sacrebleu corpus BLEU in [0, 100], one reference per prediction: n-gram precision pooled over the corpus."""
    if len(predictions) != len(references):
        raise ValueError(f"got {len(predictions)} predictions but {len(references)} references")
    return _bleu(False).corpus_score(predictions, [references]).score


def sentence_bleu(prediction: str, reference: str) -> float:
    """BLEU in [0, 100] of one sentence (effective order), so per-example sums can be averaged across batches."""
    return _bleu(True).sentence_score(prediction, [reference]).score


def _first_hit(items: list, is_hit: Callable[[Any], bool]) -> int | None:
    """1-based rank of the first item that is a hit, or None when none is."""
    return next((rank for rank, item in enumerate(items, start=1) if is_hit(item)), None)


def _mean_at_k(ranks: list[int | None], name: str, ks: tuple[int, ...], score: Callable[[int], float]) -> dict:
    """`name@k`: mean over questions of score(rank) when the first hit is within the top k, else 0; plus `n`."""
    if not ranks:
        return {"n": 0}
    means = {f"{name}@{k}": sum(score(r) for r in ranks if r is not None and r <= k) / len(ranks) for k in ks}
    return {**means, "n": len(ranks)}


def _gold_ranks(retrieved_ids: list[list[int]], gold_ids: list[list[int]]) -> list[int | None]:
    """Rank of the first gold id for each question that has gold ids (the others cannot be scored by id)."""
    if len(retrieved_ids) != len(gold_ids):
        raise ValueError(f"got {len(retrieved_ids)} retrieval results but {len(gold_ids)} gold id lists")
    return [_first_hit(list(r), set(g).__contains__) for r, g in zip(retrieved_ids, gold_ids) if len(g)]


def recall_at_k(
    retrieved_ids: list[list[int]], gold_ids: list[list[int]], ks: tuple[int, ...] = (1, 5, 10, 20)
) -> dict[str, float]:
    """`recall@k`: fraction of questions with a gold passage in the top k, over the `n` questions that have
    gold ids; only `n` when none has."""
    return _mean_at_k(_gold_ranks(retrieved_ids, gold_ids), "recall", ks, lambda rank: 1.0)


def mrr_at_k(
    retrieved_ids: list[list[int]], gold_ids: list[list[int]], ks: tuple[int, ...] = (1, 5, 10, 20)
) -> dict[str, float]:
    """`mrr@k`: mean reciprocal rank of the first gold passage (0 when not in the top k), over the `n`
    questions that have gold ids; only `n` when none has."""
    return _mean_at_k(_gold_ranks(retrieved_ids, gold_ids), "mrr", ks, lambda rank: 1.0 / rank)


def has_answer(passage: str, answers: list[str]) -> bool:
    """Whether a SQuAD-normalised answer occurs in the normalised passage as whole words ("liver" is not
    found in "delivery"); an answer that normalises to nothing never matches."""
    text = f" {normalize_answer(passage)} "
    return any(norm and f" {norm} " in text for norm in map(normalize_answer, answers))


def answer_recall_at_k(
    retrieved_texts: list[list[str]], answers: list[list[str]], ks: tuple[int, ...] = (1, 5, 10, 20)
) -> dict[str, float]:
    """`answer_recall@k`: fraction of questions with a top-k passage that contains one of their answers (the
    usual proxy when gold passages are unknown), over the `n` questions that have answers."""
    if len(retrieved_texts) != len(answers):
        raise ValueError(f"got {len(retrieved_texts)} retrieval results but {len(answers)} answer lists")
    ranks = [
        _first_hit(texts, lambda t, a=golds: has_answer(t, a))
        for texts, golds in zip(retrieved_texts, answers)
        if golds
    ]
    return _mean_at_k(ranks, "answer_recall", ks, lambda rank: 1.0)


def precision_at_k_titles(retrieved_titles: list[list[str]], gold_titles: list[list[str]], k: int) -> dict[str, float]:
    """The reference's provenance `precision@k`: |set(top-k titles) & gold titles| / k, averaged over the `n`
    questions with gold titles (a title retrieved twice counts once, as in the reference)."""
    if len(retrieved_titles) != len(gold_titles):
        raise ValueError(f"got {len(retrieved_titles)} retrieval results but {len(gold_titles)} gold title lists")
    scores = [len(set(r[:k]) & set(g)) / k for r, g in zip(retrieved_titles, gold_titles) if g]
    return {f"precision@{k}": sum(scores) / len(scores), "n": len(scores)} if scores else {"n": 0}
