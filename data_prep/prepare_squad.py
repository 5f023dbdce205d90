"""Command line of rag_end2end.data.squad: `python data_prep/prepare_squad.py --help`."""

from rag_end2end.data.squad import cli

if __name__ == "__main__":
    cli()
