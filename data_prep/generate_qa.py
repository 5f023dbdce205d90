"""Command line of rag_end2end.data.generate_qa: `python data_prep/generate_qa.py --help`."""

from rag_end2end.data.generate_qa import cli

if __name__ == "__main__":
    cli()
