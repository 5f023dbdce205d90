"""Is an EM/F1 gap between two recipes larger than the test set's own noise? A paired bootstrap over test questions
of the per-question gap, averaged over the seeds both rows ran (the seed spread does not see this noise: every seed
answers the same questions).

    python experiments/paired_bootstrap.py RESULTS_DIR rag_end2end rag_original --gold DATA/test.gold.jsonl

RESULTS_DIR holds ROW-seedN/test_generations.txt (one answer a line, in test order), as domain_shift_cpu.sh writes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from rag_end2end.data.readers import read_gold, read_lines
from rag_end2end.evaluation.metrics import exact_match_score, f1_score, metric_max_over_ground_truths


def per_question(predictions: list[str], answers: list[list[str]], metric) -> np.ndarray:
    """The metric of each generated answer against its best gold answer."""
    return np.array([metric_max_over_ground_truths(metric, p, g) for p, g in zip(predictions, answers)], float)


def read_generations(path: Path, n_gold: int) -> list[str]:
    """A run's test answers, one a line in test order."""
    predictions = read_lines(path)
    if len(predictions) > n_gold:
        raise ValueError(f"{path}: {len(predictions)} answers for {n_gold} gold questions")
    return predictions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results_dir", type=Path)
    parser.add_argument("row_a")
    parser.add_argument("row_b")
    parser.add_argument("--gold", required=True, help="the test split's gold answers (.gold.jsonl)")
    parser.add_argument("--samples", type=int, default=10_000)
    args = parser.parse_args()

    answers = read_gold(args.gold, "jsonl").answers
    seeds_a = {run.name.rsplit("-seed", 1)[1] for run in args.results_dir.glob(f"{args.row_a}-seed*")}
    seeds = sorted(s for s in seeds_a if (args.results_dir / f"{args.row_b}-seed{s}").is_dir())
    generations = {  # (row, seed) -> answers, read once for both metrics
        (row, s): read_generations(args.results_dir / f"{row}-seed{s}" / "test_generations.txt", len(answers))
        for row in (args.row_a, args.row_b)
        for s in seeds
    }
    rng = np.random.default_rng(0)
    for name, metric in (("EM", exact_match_score), ("F1", f1_score)):
        gaps = [
            per_question(generations[args.row_a, s], answers, metric)
            - per_question(generations[args.row_b, s], answers, metric)
            for s in seeds
        ]
        gap = 100 * np.mean(gaps, axis=0)  # per question, over seeds
        means = [gap[rng.integers(0, len(gap), len(gap))].mean() for _ in range(args.samples)]
        low, high = np.percentile(means, [2.5, 97.5])
        print(
            f"{args.row_a} - {args.row_b}, {name}, seeds {' '.join(seeds)}, {len(gap)} questions: "
            f"{gap.mean():+.2f} (95% interval {low:+.2f} to {high:+.2f})"
        )


if __name__ == "__main__":
    main()
