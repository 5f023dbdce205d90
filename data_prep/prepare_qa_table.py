"""Command line of rag_end2end.data.qa_table: `python data_prep/prepare_qa_table.py --help`."""

from rag_end2end.data.qa_table import cli

if __name__ == "__main__":
    cli()
