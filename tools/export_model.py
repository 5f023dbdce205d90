"""Command line of rag_end2end.deploy.export: `python tools/export_model.py --help`."""

from rag_end2end.deploy.export import cli

if __name__ == "__main__":
    cli()
