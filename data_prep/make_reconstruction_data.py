"""Command line of rag_end2end.data.reconstruction (statement-reconstruction examples from the KB's own documents,
for a domain with no questions): `python data_prep/make_reconstruction_data.py --help`."""

from rag_end2end.data.reconstruction import cli

if __name__ == "__main__":
    cli()
