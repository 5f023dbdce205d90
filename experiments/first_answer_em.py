"""EM and F1 of kept test generations scored two ways: against each question's first gold answer (how
finetune_rag.py scored before 2026-12-02) and against the best of its gold answers (SQuAD's way, today's),
so that a table measured with the old metric can be set beside one measured with the new.

    python experiments/first_answer_em.py OUT/data/test.gold.jsonl OUT/zero-shot OUT/rag-original-seed1 ...

Each run directory holds the test_generations.txt that `finetune_rag.py --do_predict` wrote, one answer a
line in the order of the gold file.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rag_end2end.data.readers import read_gold
from rag_end2end.evaluation.metrics import calculate_exact_match, calculate_f1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("gold", type=Path, help="the test split's gold file (jsonl with `answers`)")
    parser.add_argument("runs", type=Path, nargs="+", help="run directories with test_generations.txt")
    args = parser.parse_args()
    answers = read_gold(str(args.gold), "jsonl").answers
    first = [a[:1] for a in answers]
    print(f"{args.gold}: {len(answers)} questions, {sum(len(a) > 1 for a in answers)} with several answers")
    print("| run | EM first answer | EM best answer | F1 first answer | F1 best answer |")
    print("|---|---:|---:|---:|---:|")
    for run in args.runs:
        predictions = (run / "test_generations.txt").read_text(encoding="utf-8").split("\n")[: len(answers)]
        if len(predictions) < len(answers):
            raise ValueError(f"{run}/test_generations.txt: {len(predictions)} lines for {len(answers)} questions")
        metrics = (calculate_exact_match, calculate_f1)
        scores = [100 * metric(predictions, gold) for metric in metrics for gold in (first, answers)]
        print(f"| {run.name} | " + " | ".join(f"{s:.2f}" for s in scores) + " |")


if __name__ == "__main__":
    main()
