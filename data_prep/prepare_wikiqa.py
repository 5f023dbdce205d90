"""Command line of rag_end2end.data.wikiqa: `python data_prep/prepare_wikiqa.py --help`."""

from rag_end2end.data.wikiqa import cli

if __name__ == "__main__":
    cli()
