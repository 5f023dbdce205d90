"""Turn the test metrics of several runs into one Markdown table (EM, F1, retrieval recall@k, MRR@5).

    python make_results_table.py OUT/rag-original OUT/rag-end2end [--names RAG-original RAG-end2end] \
        [--output table.md]

Runs given the same name (e.g. one per seed) make one row: the mean, +- the sample standard deviation,
and the number of runs in the `runs` column.

Each run directory holds the `test_results.txt` that `finetune_rag.py --do_predict` writes; recall@k and
MRR@k are there when the data directory had `test.gold.jsonl` (written by prepare_squad.py/prepare_cmu_qa.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

COLUMNS = {
    "EM": "test_em",
    "F1": "test_f1",
    "recall@1": "test_recall@1",
    "recall@5": "test_recall@5",
    "recall@20": "test_recall@20",
    "MRR@5": "test_mrr@5",
    "loss": "test_loss",
    "train min": "train_minutes",
    "refreshes": "refreshes",
}
UNSCALED = {"loss": 3, "train min": 1, "refreshes": 0}  # digits of the columns that are not percentages


def read_test_results(run_dir: str | Path) -> dict[str, float | str]:
    """The `name: value` lines of RUN/test_results.txt (errors name the file and line), and RUN/run_info.json."""
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
    info = Path(run_dir) / "run_info.json"  # finetune_rag.py's: recipe, what trained, wall time, refreshes
    if info.exists():
        run = json.loads(info.read_text())
        metrics |= {
            "train_minutes": run["train_seconds"] / 60,
            "refreshes": run["refreshes"],
            "trains": " + ".join(run["trains"]),
        }
    return metrics


def _cell(values: list[float], column: str) -> str:
    """One value, or mean +- sample standard deviation of several; percentages except the loss."""
    scale, digits = (1, UNSCALED[column]) if column in UNSCALED else (100, 2)
    mean = f"{scale * statistics.fmean(values):.{digits}f}"
    return mean if len(values) == 1 else f"{mean} ± {scale * statistics.stdev(values):.{digits}f}"


def results_table(runs: list[tuple[str, dict[str, float]]]) -> str:
    """A Markdown table, one row a name (runs of one name are averaged); a dash where the runs lack a metric."""
    groups: dict[str, list[dict[str, float]]] = {}
    for name, metrics in runs:
        groups.setdefault(name, []).append(metrics)
    present = [c for c, key in COLUMNS.items() if any(key in m for _, m in runs)]
    repeated = any(len(group) > 1 for group in groups.values())
    trains = any("trains" in m for _, m in runs)
    header = ["run", *(["trains"] if trains else []), *(["runs"] if repeated else []), *present]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for name, group in groups.items():
        cells = [group[0].get("trains", "-")] if trains else []
        cells += [str(len(group))] if repeated else []
        for column in present:
            values = [m[COLUMNS[column]] for m in group if COLUMNS[column] in m]
            cells.append(_cell(values, column) if len(values) == len(group) else "-")
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
    table = results_table([(name, read_test_results(d)) for name, d in zip(names, args.run_dirs)])
    if args.output:
        Path(args.output).write_text(table, encoding="utf-8")
    print(table, end="")
    return table


def cli() -> None:
    """The command line."""
    main(parse_args())


if __name__ == "__main__":
    cli()
