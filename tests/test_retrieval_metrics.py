"""Retrieval metrics on hand-made cases whose values are computed by hand."""

import pytest

from rag_end2end.evaluation.metrics import answer_recall_at_k, has_answer, mrr_at_k, precision_at_k_titles, recall_at_k

# First gold id at rank 1, at rank 3 (one of two gold ids), nowhere; the last question has no gold ids.
RETRIEVED = [[3, 7, 1], [5, 6, 9], [2, 4, 8], [1, 2, 3]]
GOLD = [[3], [9, 5000], [0], []]


def test_recall_at_k_counts_questions_with_a_gold_id_in_the_top_k():
    assert recall_at_k(RETRIEVED, GOLD, ks=(1, 2, 3, 10)) == pytest.approx(
        {"recall@1": 1 / 3, "recall@2": 1 / 3, "recall@3": 2 / 3, "recall@10": 2 / 3, "n": 3}
    )


def test_mrr_at_k_uses_the_first_gold_rank_within_k():
    assert mrr_at_k(RETRIEVED, GOLD, ks=(1, 2, 3, 10)) == pytest.approx(
        {"mrr@1": 1 / 3, "mrr@2": 1 / 3, "mrr@3": (1 + 1 / 3) / 3, "mrr@10": (1 + 1 / 3) / 3, "n": 3}
    )


def test_default_ks_and_questions_without_gold_ids():
    assert set(recall_at_k(RETRIEVED, GOLD)) == {"recall@1", "recall@5", "recall@10", "recall@20", "n"}
    assert recall_at_k([[1, 2]], [[]]) == {"n": 0}
    assert mrr_at_k([], []) == {"n": 0}
    # A gold id that appears twice, and a short result list, change nothing.
    assert mrr_at_k([[4, 4]], [[4]], ks=(50,)) == {"mrr@50": 1.0, "n": 1}


def test_mismatched_lengths_are_rejected():
    with pytest.raises(ValueError, match="2 retrieval results but 1"):
        recall_at_k([[1], [2]], [[1]])
    with pytest.raises(ValueError, match="1 retrieval results but 2"):
        answer_recall_at_k([["a"]], [["a"], ["b"]])
    with pytest.raises(ValueError):
        precision_at_k_titles([["a"]], [], k=1)


def test_has_answer_matches_normalised_whole_words():
    assert has_answer("Hepcidin is made in the Liver.", ["liver"])
    assert has_answer("It costs 1,000 dollars", ["1000"])  # punctuation is dropped on both sides
    assert not has_answer("delivery of drugs", ["liver"])
    assert not has_answer("the end", ["The"])  # normalises to nothing


def test_answer_recall_at_k():
    texts = [["the liver makes it", "x"], ["delivery of drugs", "Hepcidin is made in the Liver."], ["nothing"], ["a"]]
    answers = [["liver"], ["kidney", "liver"], ["liver"], []]
    assert answer_recall_at_k(texts, answers, ks=(1, 2, 5)) == pytest.approx(
        {"answer_recall@1": 1 / 3, "answer_recall@2": 2 / 3, "answer_recall@5": 2 / 3, "n": 3}
    )
    assert answer_recall_at_k([["liver"]], [[]]) == {"n": 0}


def test_precision_at_k_titles_is_the_references():
    retrieved = [["A", "B", "A"], ["C", "D", "E"], ["X"]]
    gold = [["A", "B"], ["Z"], []]  # the last question has no gold titles: excluded
    assert precision_at_k_titles(retrieved, gold, k=1) == {"precision@1": 0.5, "n": 2}
    # "A" twice in the top 3 counts once: (2/3 + 0) / 2.
    assert precision_at_k_titles(retrieved, gold, k=3) == pytest.approx({"precision@3": 1 / 3, "n": 2})
    # k beyond the list: still divided by k, (2/5 + 0) / 2.
    assert precision_at_k_titles(retrieved, gold, k=5) == pytest.approx({"precision@5": 1 / 5, "n": 2})
    assert precision_at_k_titles(retrieved, [[], [], []], k=1) == {"n": 0}
