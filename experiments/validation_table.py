"""The last validation of several runs side by side, to choose a setting on validation, never on test.

    python experiments/validation_table.py OUT/rag_end2end-seed1 OUT/rag_end2end-dropout_on-seed1 ...

Each run's figures are the last row of its CSV log (RUN/logs/version_N/metrics.csv, the newest version that
validated, or RUN/metrics.csv as copied into experiments/results) that carries `val_loss`: the validation after
the last refresh. Recall@k and MRR@5 count every validation question with a gold passage; F1 and loss the
first --n_val.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

COLUMNS = {
    "recall@1": "val_recall@1",
    "recall@5": "val_recall@5",
    "recall@20": "val_recall@20",
    "MRR@5": "val_mrr@5",
    "F1": "val_f1",
    "loss": "val_loss",
}


def last_validation(run_dir: Path) -> dict[str, str]:
    """The final validation row of a run's newest CSV log that has one."""
    logs = sorted((run_dir / "logs").glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name[8:]))
    logs = [run_dir / "metrics.csv"] if (run_dir / "metrics.csv").exists() else logs
    for path in reversed(logs):
        rows = [row for row in csv.DictReader(path.open(encoding="utf-8")) if row.get("val_loss")]
        if rows:
            return rows[-1]
    raise FileNotFoundError(f"{run_dir}: no metrics.csv with a val_loss row (did the run validate?)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", type=Path)
    args = parser.parse_args()
    print("| run | step | " + " | ".join(COLUMNS) + " |")
    print("|---" * (len(COLUMNS) + 2) + "|")
    for run_dir in args.run_dirs:
        row = last_validation(run_dir)
        cells = [
            f"{float(row[key]):.3f}" if name == "loss" else f"{100 * float(row[key]):.2f}"
            for name, key in COLUMNS.items()
        ]
        print(f"| {run_dir.name} | {row['step']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
