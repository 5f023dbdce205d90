"""Command line of rag_end2end.training.plots: `python tools/plot_run.py --help`."""

from rag_end2end.training.plots import cli

if __name__ == "__main__":
    cli()
