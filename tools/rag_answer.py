"""Command line of rag_end2end.answer: `python tools/rag_answer.py --help`."""

from rag_end2end.answer import cli

if __name__ == "__main__":
    cli()
