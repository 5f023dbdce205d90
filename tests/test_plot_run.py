"""tools/plot_run.py: CSVLogger metrics of finetune_rag.py runs -> PNG plots, refreshes marked, runs overlaid."""

import csv
import struct
from pathlib import Path

import pandas as pd
import pytest

from rag_end2end.training import plots as plot_run


def write_metrics(run: Path, version: int, rows: list[dict]) -> Path:
    """A metrics.csv as Lightning's CSVLogger writes it: every column in the header, empty cells where not logged."""
    columns = sorted({key for row in rows for key in row})
    path = run / "logs" / f"version_{version}" / "metrics.csv"
    path.parent.mkdir(parents=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
    return path


def training_rows(steps: range, versions: dict[int, int], seconds: dict[int, float] | None = None) -> list[dict]:
    """Sparse rows: lr alone, then loss + KB state, and validation every 4 steps, as finetune_rag.py logs them."""
    rows, version, last_seconds = [], 0, None
    for step in steps:
        version = versions.get(step, version)
        last_seconds = (seconds or {}).get(step, last_seconds)  # Lightning repeats it until the next refresh
        rows.append({"step": step, "lr-AdamW/pg1": 1e-3 / (step + 1)})
        row = {
            "step": step,
            "epoch": 0,
            "loss": 10.0 - step / 10,
            "index_version": float(version),
            "index_staleness_steps": float(step % 3),
            "refresh_failures": 0.0,
        }
        if last_seconds is not None:
            row["reindex_seconds"] = last_seconds
        rows.append(row)
        if step in versions:  # the staleness measured when that refresh started (KBRefreshCallback._log_staleness)
            drift = {"staleness_cosine_mean": 0.99, "staleness_cosine_min": 0.9, "staleness_seconds": 0.1}
            rows.append({"step": step, **drift, "val_stale_recall@1": 0.2, "val_fresh_recall@1": 0.3})
        if step % 4 == 3:
            rows.append(
                {
                    "step": step,
                    "epoch": 0,
                    "val_em": step / 100,
                    "val_f1": step / 50,
                    "val_loss": 9.0,
                    "val_recall@1": 0.1,
                    "val_recall@5": 0.3,
                    "val_recall@20": 0.5,
                    "val_mrr@5": 0.2,
                }
            )
    return rows


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    width, height = struct.unpack(">II", data[16:24])  # from the IHDR chunk, always first
    assert width > 0 and height > 0, path


@pytest.fixture
def end2end(tmp_path) -> Path:
    run = tmp_path / "rag-end2end"
    write_metrics(run, 1, training_rows(range(12), {5: 1, 9: 2}, {5: 1.5, 9: 2.5}))
    return run


def test_refresh_steps_are_where_the_index_version_goes_up():
    df = pd.DataFrame({"step": [0, 1, 1, 2, 3, 4, 5, 6], "index_version": [0, 0, None, 0, 2, 2, None, 3]})
    assert plot_run.refresh_steps(df) == [3, 6]  # the first value is the start, not a refresh; NaN rows ignored
    assert plot_run.refresh_steps(pd.DataFrame({"step": [0, 1], "loss": [1.0, 2.0]})) == []


def test_refresh_seconds_one_value_per_refresh(end2end):
    df = plot_run.read_metrics(end2end)
    assert plot_run.refresh_seconds(df).to_dict() == {5: 1.5, 9: 2.5}
    assert plot_run.refresh_steps(df) == [5, 9]


def test_resumed_versions_join_the_newer_replacing_the_older(tmp_path):
    run = tmp_path / "run"
    (run / "logs" / "version_0").mkdir(parents=True)  # TensorBoard's: no metrics.csv
    write_metrics(run, 1, training_rows(range(10), {3: 1, 6: 2}))
    write_metrics(run, 3, training_rows(range(5, 12), {5: 1, 8: 5}))  # resumed from step 5, index v1
    write_metrics(run, 4, [{"step": 8, "test_em": 0.5}])  # --do_predict alone: replaces nothing
    df = plot_run.read_metrics(run)
    losses = df.dropna(subset=["loss"])
    assert losses["step"].tolist() == list(range(12))  # steps 5..9 once, from version_3
    assert plot_run.refresh_steps(df) == [3, 8]  # not 6: version_1 past step 5 was re-trained
    assert df["test_em"].notna().sum() == 1


def test_plots_are_valid_pngs_with_a_panel_per_metric_group(end2end, tmp_path):
    written = plot_run.plot_runs([end2end], tmp_path / "plots")
    names = {p.stem for p in written}
    assert names == {
        *("loss", "val_em_f1", "val_recall", "val_mrr", "index_staleness", "lr", "refresh_seconds"),
        *("index_drift", "stale_vs_fresh"),
    }
    for path in written:
        assert path.parent == tmp_path / "plots"
        assert_png(path)


def test_missing_columns_and_odd_logs_never_raise(tmp_path):
    loss_only = tmp_path / "loss-only"
    write_metrics(loss_only, 0, [{"step": s, "loss": 1.0 / (s + 1)} for s in range(20)])
    empty = tmp_path / "empty"
    (empty / "logs" / "version_0").mkdir(parents=True)
    (empty / "logs" / "version_0" / "metrics.csv").write_text("")
    garbage = tmp_path / "garbage"
    write_metrics(garbage, 0, [{"step": "x", "loss": "nan?"}, {"epoch": 1}])
    no_logs = tmp_path / "no-logs"
    with pytest.warns(UserWarning, match="skipped"):
        written = plot_run.plot_runs([loss_only, empty, garbage, no_logs], tmp_path / "plots")
    assert [p.stem for p in written] == ["loss"]
    assert_png(written[0])
    assert plot_run.plot_runs([no_logs], tmp_path / "none") == []


def test_two_runs_overlay_on_the_same_axes(end2end, tmp_path):
    original = tmp_path / "rag-original"
    write_metrics(original, 1, [r for r in training_rows(range(12), {}) if "index_version" not in r])
    runs = {"rag-original": plot_run.read_metrics(original), "rag-end2end": plot_run.read_metrics(end2end)}
    series = plot_run.panel_series(runs, plot_run.PANELS["val_em_f1"][1])
    assert [(run, col) for run, col, _ in series] == [
        ("rag-original", "val_em"),
        ("rag-original", "val_f1"),
        ("rag-end2end", "val_em"),
        ("rag-end2end", "val_f1"),
    ]
    assert series[0][2].to_dict() == {3: 0.03, 7: 0.07, 11: 0.11}
    recall = plot_run.panel_series(runs, plot_run.PANELS["val_recall"][1])
    assert [col for _, col, _ in recall[:3]] == ["val_recall@1", "val_recall@5", "val_recall@20"]
    written = plot_run.plot_runs([original, end2end], tmp_path / "cmp")
    assert {p.stem for p in written} >= {"loss", "val_em_f1", "refresh_seconds"}


def test_cli_defaults_to_the_run_plots_directory(end2end, tmp_path, capsys):
    written = plot_run.main([str(end2end)])
    assert written and all(p.parent == end2end / "plots" and p.exists() for p in written)
    assert capsys.readouterr().out.split() == [str(p) for p in written]
    with pytest.raises(SystemExit):
        plot_run.main([str(end2end), str(end2end)])  # several runs: --out is required
    with pytest.raises(SystemExit):
        plot_run.main([str(tmp_path / "missing"), "--out", str(tmp_path / "x")])


def test_a_run_and_its_resume_each_log_tensorboard_and_csv_in_one_version_folder(tmp_path):
    """finetune_rag.build_loggers under Lightning's Trainer: each fit (a run, then a resume) writes its TensorBoard
    events and CSV metrics into one new logs/version_N (each logger used to take its own N: four folders)."""
    import argparse

    import pytorch_lightning as pl
    from pytorch_lightning.demos.boring_classes import BoringModel

    from rag_end2end.training.finetune import build_loggers

    class Logged(BoringModel):
        def training_step(self, batch, batch_idx):
            out = super().training_step(batch, batch_idx)
            self.log("train_loss", out["loss"])
            return out

    args = argparse.Namespace(output_dir=str(tmp_path), logger_name="default")
    for _ in range(2):
        trainer = pl.Trainer(
            logger=build_loggers(args),
            max_steps=2,
            log_every_n_steps=1,
            limit_val_batches=1,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            accelerator="cpu",
        )
        trainer.fit(Logged())
    folders = sorted((tmp_path / "logs").iterdir())
    assert [f.name for f in folders] == ["version_0", "version_1"]
    for folder in folders:
        assert (folder / "metrics.csv").is_file() and list(folder.glob("events.out.tfevents.*"))
