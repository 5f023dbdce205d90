"""Turn the test metrics of several runs into one Markdown table (EM, F1, retrieval recall@5).

    python make_results_table.py OUT/rag-original OUT/rag-end2end [--names RAG-original RAG-end2end] \
        [--output table.md]

Each run directory holds the `test_results.txt` that `finetune_rag.py --do_predict` writes; recall@k and
MRR@k are there when the data directory had `test.gold.jsonl` (written by prepare_squad.py/prepare_cmu_qa.py).
"""

from __future__ import annotations

import argparse
from pathlib import Path

COLUMNS = {"EM": "test_em", "F1": "test_f1", "recall@5": "test_recall@5", "MRR@5": "test_mrr@5",
           "recall@20": "test_recall@20", "loss": "test_loss"}  # fmt: skip


def read_test_results(run_dir: str | Path) -> dict[str, float]:
    """The `name: value` lines of RUN/test_results.txt, with errors that name the file and line."""
    path = Path(run_dir) / "test_results.txt"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run finetune_rag.py with --do_predict and --output_dir {run_dir}")
    metrics = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        name, _, value = line.partition(":")
        try:
            metrics[name.strip()] = float(value)
        except ValueError:
            raise ValueError(f"{path}:{number}: expected `name: number`, got {line!r}") from None
    return metrics


def results_table(runs: dict[str, dict[str, float]]) -> str:
    """A Markdown table, one row a run; EM/F1/recall as percentages, a dash where a run lacks a metric."""
    present = [c for c, key in COLUMNS.items() if any(key in m for m in runs.values())]
    lines = ["| run | " + " | ".join(present) + " |", "|---|" + "---:|" * len(present)]
    for name, metrics in runs.items():
        cells = []
        for column in present:
            value = metrics.get(COLUMNS[column])
            if value is None:
                cells.append("-")
            else:
                cells.append(f"{value:.3f}" if column == "loss" else f"{100 * value:.2f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", help="output directories of finetune_rag.py runs")
    parser.add_argument("--names", nargs="+", default=None, help="row names (default: the directory names)")
    parser.add_argument("--output", default=None, help="also write the table to this file")
    args = parser.parse_args(argv)
    if args.names is not None and len(args.names) != len(args.run_dirs):
        parser.error(f"--names has {len(args.names)} names for {len(args.run_dirs)} run directories")
    return args


def main(args: argparse.Namespace) -> str:
    names = args.names or [Path(d).name for d in args.run_dirs]
    table = results_table({name: read_test_results(d) for name, d in zip(names, args.run_dirs)})
    if args.output:
        Path(args.output).write_text(table, encoding="utf-8")
    print(table, end="")
    return table


if __name__ == "__main__":
    main(parse_args())
