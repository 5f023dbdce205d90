"""Command line of rag_end2end.tiny_models: `python test_run/make_tiny_models.py --help`."""

from rag_end2end.tiny_models import cli

if __name__ == "__main__":
    cli()
