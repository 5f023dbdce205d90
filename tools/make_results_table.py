"""Command line of rag_end2end.evaluation.results_table: `python tools/make_results_table.py --help`."""

from rag_end2end.evaluation.results_table import cli

if __name__ == "__main__":
    cli()
