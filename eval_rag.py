"""Command line of rag_end2end.evaluation.evaluate: `python eval_rag.py --help`."""

from rag_end2end.evaluation.evaluate import cli

if __name__ == "__main__":
    cli()
