"""How the retrieval temperature shapes RAG's passage prior, before any training: for each tau, the zero-shot
RAG-token NLL of the gold answers (per answer token, mean over questions) and the prior's entropy, with the
generator's per-passage log-likelihoods computed once (they do not depend on tau).

    python experiments/temperature_sweep.py --data_dir DATA --passages_path KB/my_knowledge_dataset \
        --index_path KB/my_knowledge_dataset_hnsw_index.faiss --output sweep.json

The question encoder scores as its checkpoint declares, at tau = 1 (raw similarities); tau is applied here.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rag_end2end.data.readers import read_lines
from rag_end2end.kb.search import KBSearch
from rag_end2end.model.encoders import load_encoder, load_tokenizer
from rag_end2end.model.marginals import marginal_nll
from rag_end2end.model.rag import CausalGenerator, RagModel


@torch.no_grad()
def sweep(args: argparse.Namespace) -> dict:
    encoder = load_encoder(args.question_encoder, side="question", temperature=1.0).eval()
    q_tok = load_tokenizer(args.question_encoder)
    g_tok = AutoTokenizer.from_pretrained(args.generator)
    generator = CausalGenerator(
        AutoModelForCausalLM.from_pretrained(args.generator).eval(), g_tok, None, args.max_length
    )
    search = KBSearch(args.passages_path, args.index_path, encoder.config.hidden_size)
    rag = RagModel(encoder, q_tok, generator, search, n_docs=max(args.n_docs)).eval()
    questions = read_lines(Path(args.data_dir) / f"{args.split}.source")[: args.n]
    answers = read_lines(Path(args.data_dir) / f"{args.split}.target")[: args.n]
    rows = {(k, tau): [] for k in args.n_docs for tau in args.taus}
    for start in range(0, len(questions), args.batch_size):
        qs, ans = questions[start : start + args.batch_size], answers[start : start + args.batch_size]
        enc = q_tok(
            [rag.question_prefix + q for q in qs], padding=True, truncation=True, max_length=64, return_tensors="pt"
        )
        retrieved = rag.retrieve(enc["input_ids"], enc["attention_mask"])
        scores = retrieved.doc_scores  # raw similarities (B, n)
        for k in args.n_docs:
            top = [{"title": d["title"][:k], "text": d["text"][:k]} for d in retrieved.docs]
            # log p(y_t | x, z_k, y_<t) under each of the top k passages: the same for every tau
            token_lp, mask = generator.answer_logprobs(qs, top, ans)
            for tau in args.taus:
                prior = (scores[:, :k] / tau).log_softmax(1)
                entropy = -(prior.exp() * prior).sum(1) / math.log(k)  # 1: uniform over the k passages
                nll = marginal_nll(token_lp, mask, scores[:, :k] / tau, "token")
                rows[k, tau] += list(zip(nll.tolist(), entropy.tolist(), strict=True))
        print(f"{start + len(qs)}/{len(questions)} questions", flush=True)
    return {
        f"n_docs={k} tau={tau}": {
            "nll_per_token": sum(r[0] for r in rows[k, tau]) / len(rows[k, tau]),
            "prior_entropy_normalised": sum(r[1] for r in rows[k, tau]) / len(rows[k, tau]),
            "questions": len(rows[k, tau]),
        }
        for k in args.n_docs
        for tau in args.taus
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--passages_path", required=True)
    parser.add_argument("--index_path", required=True)
    parser.add_argument("--question_encoder", default="pretrained/minilm")
    parser.add_argument("--generator", default="pretrained/smollm2-135m-instruct")
    parser.add_argument("--split", default="val")
    parser.add_argument("--n", type=int, default=1000, help="the first N questions of the split")
    parser.add_argument("--n_docs", type=int, nargs="+", default=[2, 5])
    parser.add_argument("--taus", type=float, nargs="+", default=[0.01, 0.02, 0.05, 0.1, 0.2, 1.0])
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_length", type=int, default=256)
    parser.add_argument("--output", default=None)
    return parser.parse_args(argv)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)  # beside a running experiment on a small machine
    args = parse_args()
    result = sweep(args)
    for name, row in result.items():
        print(f"{name}: NLL/token {row['nll_per_token']:.4f}, prior entropy {row['prior_entropy_normalised']:.3f}")
    if args.output is not None:
        Path(args.output).write_text(json.dumps(result, indent=1) + "\n")
