"""Command line of rag_end2end.training.finetune: `python finetune_rag.py --help`."""

from rag_end2end.training.finetune import cli

if __name__ == "__main__":
    cli()
