"""Command line of rag_end2end.kb.build: `python use_own_knowledge_dataset.py --help`."""

from rag_end2end.kb.build import cli

if __name__ == "__main__":
    cli()
