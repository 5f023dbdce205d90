"""DALM's CSV (`Passage,Query[,Answer]`) -> this toolkit's formats: the converter of data_prep/prepare_qa_table.py under
the name DALM's users look for (`python data_prep/prepare_dalm_csv.py --help`)."""

from rag_end2end.data.qa_table import cli

if __name__ == "__main__":
    cli()
