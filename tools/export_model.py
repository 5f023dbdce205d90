"""Command line of rag_end2end.export: `python tools/export_model.py --help`."""

from rag_end2end.export import cli

if __name__ == "__main__":
    cli()
