"""From a domain's documents to an adapted model, in one command: the KB, statements from its sentences, training
on them (alone, or mixed with the questions of --qa_dir), and the test. Every flag it does not name is
finetune_rag.py's (the models, --indexing_freq, --max_steps ...): `python tools/adapt_from_documents.py --help`.

    python tools/adapt_from_documents.py --csv_path test_run/dummy-kb/my_knowledge_dataset.csv --output_dir work \
        --context_encoder pretrained/minilm \
        --model_type rag_token --question_encoder_name_or_path pretrained/minilm --generator_type causal \
        --generator_name_or_path pretrained/smollm2-135m-instruct --indexing_freq 10 --max_steps 120
"""

from rag_end2end.api import adapt_cli

if __name__ == "__main__":
    adapt_cli()
