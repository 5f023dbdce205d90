"""Build the initial knowledge base (version 0) from a `title<TAB>text` CSV: split documents into
100-word passages, embed them with a context encoder (DPR, or any encoder with --pooling) and index them with FAISS.
The embeddings are made for the encoder's similarity (`dot`, or `cosine`: unit-length vectors), which the
checkpoint declares (e.g. all-MiniLM's sentence-transformers files) or --similarity sets; the KB records it
(my_knowledge_dataset/rag_kb.json) and finetune_rag.py / eval_rag.py refuse a question encoder that scores otherwise.

    python use_own_knowledge_dataset.py --csv_path my_kb.csv --output_dir KB \
        --dpr_ctx_encoder_model_name facebook/dpr-ctx_encoder-multiset-base

writes KB/my_knowledge_dataset (a `datasets` directory: title, text, embeddings) and
KB/my_knowledge_dataset_hnsw_index.faiss, the paths finetune_rag.py takes as --passages_path and
--index_path. Both are written under temporary names and renamed; existing files are never replaced.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import torch
from transformers import AutoTokenizer

from rag_end2end.data.readers import read_kb_csv, run_main
from rag_end2end.files import remove_orphaned_temporaries
from rag_end2end.kb.encoding import encode_token_ids
from rag_end2end.kb.index import IndexConfig
from rag_end2end.kb.parts import with_embeddings
from rag_end2end.kb.passages import split_documents, tokenize_passages
from rag_end2end.kb.versions import save_kb
from rag_end2end.model.encoders import check_tokenizer, encoder_similarity, load_encoder, with_prefix
from rag_end2end.options import SIMILARITIES, add_debug_arg, add_index_args


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--csv_path", default="test_run/dummy-kb/my_knowledge_dataset.csv")
    p.add_argument("--output_dir", default="test_run/dummy-kb")
    p.add_argument("--dpr_ctx_encoder_model_name", default="facebook/dpr-ctx_encoder-multiset-base")
    p.add_argument("--context_encoder_tokenizer_name", default=None, help="default: the encoder's name")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument(
        "--pooling",
        choices=["cls", "mean", "pooler"],
        default=None,
        help="for a non-DPR encoder (default: DPR's own, or the checkpoint's sentence-transformers setting)",
    )
    p.add_argument("--passage_prefix", default=None, help='text put before every passage title, e.g. "passage: "')
    p.add_argument(
        "--similarity",
        choices=SIMILARITIES,
        default=None,
        help="cosine: L2-normalised embeddings; l2: an L2 index (IndexFlatL2, L2 HNSW and factories) "
        "(default: the encoder's declaration, else dot)",
    )
    add_index_args(p)
    p.add_argument("--d", type=int, default=None, help="unused: the encoder's size is read from its config")
    p.add_argument("--rag_model_name", default=None, help="unused (kept for the reference's scripts)")
    p.add_argument("--question", default=None, help="unused (kept for the reference's scripts)")
    p.add_argument("--num_proc", type=int, default=None, help="unused (kept for the reference's scripts)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_debug_arg(p)
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> tuple[Path, Path]:
    for flag in ("d", "rag_model_name", "question", "num_proc"):
        if getattr(args, flag) is not None:
            warnings.warn(f"--{flag} has no effect here", stacklevel=1)
    out = Path(args.output_dir)
    passages_path, index_path = out / "my_knowledge_dataset", out / "my_knowledge_dataset_hnsw_index.faiss"
    for path in remove_orphaned_temporaries(out):  # an earlier build's, interrupted (its process is gone)
        print(f"removed {path}: left by an interrupted build")
    for path in (passages_path, index_path):
        if path.exists():  # checked before the (long) encoding, not after
            raise FileExistsError(f"{path} already exists; remove it or choose another --output_dir")

    passages = split_documents(read_kb_csv(args.csv_path))
    print(f"{args.csv_path}: {len(passages)} passages")
    tokenizer = AutoTokenizer.from_pretrained(args.context_encoder_tokenizer_name or args.dpr_ctx_encoder_model_name)
    tokenizer = with_prefix(tokenizer, args.passage_prefix)
    encoder = load_encoder(args.dpr_ctx_encoder_model_name, args.pooling, side="context", similarity=args.similarity)
    check_tokenizer(tokenizer, encoder, "context encoder")
    encoder = encoder.to(args.device)
    similarity = encoder_similarity(encoder)
    print(f"{args.dpr_ctx_encoder_model_name}: {similarity} similarity")
    token_ids = tokenize_passages(tokenizer, passages["title"], passages["text"])
    embeddings = encode_token_ids(encoder, token_ids, tokenizer.pad_token_id, args.batch_size, args.device)

    out.mkdir(parents=True, exist_ok=True)
    save_kb(with_embeddings(passages, embeddings), passages_path, index_path, IndexConfig.from_args(args), similarity)
    print(f"wrote {passages_path} and {index_path}")
    return passages_path, index_path


def cli() -> None:
    """The command line."""
    run_main(main, parse_args())


if __name__ == "__main__":
    cli()
