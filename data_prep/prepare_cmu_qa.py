"""Command line of rag_end2end.data.cmu_qa: `python data_prep/prepare_cmu_qa.py --help`."""

from rag_end2end.data.cmu_qa import cli

if __name__ == "__main__":
    cli()
