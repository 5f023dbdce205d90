"""Command line of rag_end2end.deploy.answer: `python tools/rag_answer.py --help`."""

from rag_end2end.deploy.answer import cli

if __name__ == "__main__":
    cli()
