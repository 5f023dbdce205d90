"""Plot the training curves of finetune_rag.py runs (loss, validation EM/F1 and recall@k, KB index staleness, its
measured drift and refresh time) as PNG files, several runs overlaid on the same axes, each KB refresh marked by a
dashed line.

    python plot_run.py OUT/rag-end2end                                          # writes OUT/rag-end2end/plots/*.png
    python plot_run.py OUT/rag-original OUT/rag-end2end --out OUT/comparison    # one colour per run

Reads the CSVLogger files OUTPUT/logs/version_*/metrics.csv; the versions of a resumed run are joined, the newer
one replacing the older one from the step it resumed at. Panels without data are skipped.
"""

from __future__ import annotations

import argparse
import re
import warnings
from pathlib import Path

import pandas as pd

# name of the PNG -> (title, regex of the columns to plot against the step); all found columns go in one panel
PANELS = {
    "loss": ("training and validation loss", r"(val_)?loss"),
    "val_em_f1": ("validation EM / F1", r"val_(em|f1)"),
    "val_recall": ("validation recall@k", r"val_recall@\d+"),
    "val_mrr": ("validation MRR@k", r"val_mrr@\d+"),
    "index_staleness": ("KB index staleness (steps since its embeddings were made)", r"index_staleness_steps"),
    "index_drift": ("KB index drift: cosine of stored vs current passage vectors", r"staleness_cosine_(mean|min)"),
    "stale_vs_fresh": (
        "validation recall@k / MRR@k, stale vs fresh vectors (exact search)",
        r"val_(stale|fresh)_(recall|mrr)@\d+",
    ),
    "lr": ("learning rate", r"lr-.+"),
}


def read_metrics(run_dir: str | Path) -> pd.DataFrame:
    """All logged rows of a run sorted by step, so that a resumed run reads as one curve."""
    paths = Path(run_dir).glob("logs/version_*/metrics.csv")
    frames = []
    for path in sorted(paths, key=lambda p: int(re.sub(r"\D", "", p.parent.name) or -1)):
        try:
            df = pd.read_csv(path, on_bad_lines="skip").apply(pd.to_numeric, errors="coerce")
        except (pd.errors.EmptyDataError, pd.errors.ParserError, OSError) as err:
            warnings.warn(f"{path}: skipped ({err})", stacklevel=2)
            continue
        if "step" not in df or df["step"].isna().all():
            continue
        df = df.dropna(subset=["step"])
        if "loss" in df and df["loss"].notna().any():  # a training run: it replaces what it re-trained
            resumed_at = df["step"].min()
            frames = [f[f["step"] < resumed_at] for f in frames]
        frames.append(df)
    if not frames:
        return pd.DataFrame(columns=["step"])
    return pd.concat(frames, ignore_index=True).sort_values("step", kind="stable", ignore_index=True)


def refresh_steps(df: pd.DataFrame) -> list[int]:
    """The steps at which a new KB index went live: where the logged index_version goes up."""
    if "index_version" not in df or "step" not in df:
        return []
    versions = df[["step", "index_version"]].dropna()
    return [int(step) for step in versions["step"][versions["index_version"].diff() > 0]]


def refresh_seconds(df: pd.DataFrame) -> pd.Series:
    """Seconds of each refresh, indexed by the step it was logged at."""
    if "reindex_seconds" not in df:
        return pd.Series(dtype=float)
    s = df.set_index("step")["reindex_seconds"].dropna()
    return s[s.ne(s.shift())]  # Lightning repeats the last value on every logged row until the next refresh


def _columns(df: pd.DataFrame, pattern: str) -> list[str]:
    found = [c for c in df.columns if re.fullmatch(pattern, c) and df[c].notna().any()]
    return sorted(found, key=lambda c: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", c)])  # @5 < @20


def panel_series(runs: dict[str, pd.DataFrame], pattern: str) -> list[tuple[str, str, pd.Series]]:
    """(run, column, values indexed by step) for every run and every column matching `pattern`."""
    return [(run, col, df.set_index("step")[col].dropna()) for run, df in runs.items() for col in _columns(df, pattern)]


def _run_names(run_dirs: list[Path]) -> list[str]:
    names = [d.resolve().name for d in run_dirs]
    return names if len(set(names)) == len(names) else [str(d) for d in run_dirs]


def plot_runs(run_dirs: list[str | Path], out_dir: str | Path) -> list[Path]:
    """Write one PNG per panel with data to out_dir and return their paths; warns, never raises, on odd logs."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        warnings.warn(f"plot_run: matplotlib is missing ({err}); no plots written", stacklevel=2)
        return []
    run_dirs = [Path(d) for d in run_dirs]
    runs, refreshes = {}, {}
    for name, run_dir in zip(_run_names(run_dirs), run_dirs):
        try:
            runs[name] = read_metrics(run_dir)
            refreshes[name] = refresh_steps(runs[name])
        except Exception as err:
            warnings.warn(f"plot_run: {run_dir} skipped ({err!r})", stacklevel=2)
    several = len(runs) > 1
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    run_colour = {run: colours[i % len(colours)] for i, run in enumerate(runs)}
    styles = ["-", "--", ":", "-."]

    written: list[Path] = []

    def save(fig, name: str) -> None:
        out = Path(out_dir) / f"{name}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=120, bbox_inches="tight")
        written.append(out)

    for name, (title, pattern) in PANELS.items():
        fig = None
        try:
            series = panel_series(runs, pattern)
            if not series:
                continue
            fig, ax = plt.subplots(figsize=(8, 4.5))
            columns = list(dict.fromkeys(col for _, col, _ in series))
            for run, col, s in series:
                i = columns.index(col)
                if several:  # a colour per run, a line style per column
                    colour, style = run_colour[run], styles[i % len(styles)]
                else:
                    colour, style = colours[i % len(colours)], "-"
                label = (run if len(columns) == 1 else f"{run} {col}") if several else col
                if col == "loss" and len(s) >= 10:  # noisy: faint raw values under an exponential moving average
                    ax.plot(s.index, s.values, color=colour, alpha=0.25, linewidth=0.8)
                    s = s.ewm(span=max(5, len(s) // 20)).mean()
                ax.plot(
                    s.index,
                    s.values,
                    style,
                    color=colour,
                    label=label,
                    marker="o" if len(s) < 30 else None,
                    markersize=3,
                )
            for run, steps in refreshes.items():
                if steps:  # one call for all (there may be thousands), full height whatever the y range
                    colour, label = (run_colour[run], f"KB refresh ({run})") if several else ("grey", "KB refresh")
                    ax.vlines(
                        steps,
                        0,
                        1,
                        transform=ax.get_xaxis_transform(),
                        colors=colour,
                        linestyles="--",
                        linewidth=0.7,
                        alpha=0.5,
                        label=label,
                    )
            ax.set(title=title, xlabel="step")
            ax.grid(alpha=0.3)
            ax.legend(fontsize="small")
            save(fig, name)
        except Exception as err:
            warnings.warn(f"plot_run: panel {name} skipped ({err!r})", stacklevel=2)
        finally:
            if fig is not None:
                plt.close(fig)

    fig = None
    try:
        seconds = {run: refresh_seconds(df) for run, df in runs.items()}
        if any(len(s) for s in seconds.values()):
            fig, ax = plt.subplots(figsize=(8, 4.5))
            for run, s in seconds.items():
                if len(s):
                    ax.plot(s.index, s.values, "o-", color=run_colour[run], label=run, markersize=4)
            ax.set(
                title="KB refresh time (re-encode + index build)",
                xlabel="step the new index went live",
                ylabel="seconds",
                ylim=(0, None),
            )
            ax.grid(alpha=0.3)
            if several:
                ax.legend(fontsize="small")
            save(fig, "refresh_seconds")
    except Exception as err:
        warnings.warn(f"plot_run: panel refresh_seconds skipped ({err!r})", stacklevel=2)
    finally:
        if fig is not None:
            plt.close(fig)
    return written


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", help="output directories of finetune_rag.py runs")
    parser.add_argument("--out", default=None, help="where to write the PNGs (default: RUN/plots for one run)")
    args = parser.parse_args(argv)
    if args.out is None:
        if len(args.run_dirs) > 1:
            parser.error("--out is required with several run directories")
        args.out = str(Path(args.run_dirs[0]) / "plots")
    for d in args.run_dirs:
        if not any(Path(d).glob("logs/version_*/metrics.csv")):
            parser.error(f"{d}: no logs/version_*/metrics.csv (is it a finetune_rag.py --output_dir?)")
    return args


def main(argv: list[str] | None = None) -> list[Path]:
    args = parse_args(argv)
    written = plot_runs(args.run_dirs, args.out)
    for path in written:
        print(path)
    return written


def cli() -> None:
    """The command line."""
    main()


if __name__ == "__main__":
    cli()
