"""Command line of rag_end2end.pretrained: `python tools/install_pretrained_models.py --help`."""

from rag_end2end.pretrained import cli

if __name__ == "__main__":
    cli()
