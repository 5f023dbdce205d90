"""Zero-shot retrieval of a candidate domain-shift set, measured before training on it: is the packaged MiniLM
weak there, as it is on COVID-QA (recall@1 18.2)? End-to-end training is tested where the retriever is weak.

    python experiments/zero_shot_candidates.py pubmedqa ../shared/data/pubmedqa/ori_pqal.json
    python experiments/zero_shot_candidates.py wikiqa ../shared/data/wikiqa/WikiQA-test.tsv.gz

PubMedQA: every abstract section is a passage (title: the PubMed id), the gold passages of a question are its
own abstract's sections, over all 1,000 labelled items. WikiQA: every sentence of the split is a passage (title:
its Wikipedia page), gold are the sentences labelled 1, over the questions that have one. Passages are
tokenised and encoded as the KB builder does; questions as the question encoder does, cut at 64 tokens.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from rag_end2end.evaluation.metrics import mrr_at_k, recall_at_k
from rag_end2end.kb.encoding import encode_token_ids
from rag_end2end.kb.passages import tokenize_passages
from rag_end2end.model.encoders import load_encoder, load_tokenizer

KS = (1, 5, 20)


def pubmedqa(path: str) -> tuple[list[str], list[str], list[str], list[list[int]]]:
    """(titles, texts, questions, gold passage ids) of PubMedQA's labelled set."""
    titles, texts, questions, gold = [], [], [], []
    for pmid, item in json.loads(Path(path).read_text()).items():
        gold.append(list(range(len(texts), len(texts) + len(item["CONTEXTS"]))))
        titles += [pmid] * len(item["CONTEXTS"])
        texts += item["CONTEXTS"]
        questions.append(item["QUESTION"])
    return titles, texts, questions, gold


def wikiqa(path: str) -> tuple[list[str], list[str], list[str], list[list[int]]]:
    """(titles, texts, questions, gold passage ids) of a WikiQA split; questions with no correct sentence left out."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    passage_id: dict[str, int] = {}
    titles, texts = [], []
    for row in rows:
        if row["SentenceID"] not in passage_id:
            passage_id[row["SentenceID"]] = len(texts)
            titles.append(row["DocumentTitle"])
            texts.append(row["Sentence"])
    question, gold = {}, defaultdict(list)
    for row in rows:
        question[row["QuestionID"]] = row["Question"]
        if row["Label"] == "1":
            gold[row["QuestionID"]].append(passage_id[row["SentenceID"]])
    return titles, texts, [question[q] for q in gold], list(gold.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", choices=["pubmedqa", "wikiqa"])
    parser.add_argument("path")
    parser.add_argument("--encoder", default="pretrained/minilm")
    parser.add_argument("--max_source_length", type=int, default=64)
    args = parser.parse_args()

    titles, texts, questions, gold = {"pubmedqa": pubmedqa, "wikiqa": wikiqa}[args.dataset](args.path)
    tokenizer = load_tokenizer(args.encoder)
    ctx_encoder = load_encoder(args.encoder, side="context")
    q_encoder = load_encoder(args.encoder, side="question").eval()
    passages = encode_token_ids(ctx_encoder, tokenize_passages(tokenizer, titles, texts), tokenizer.pad_token_id)
    batch = tokenizer(questions, truncation=True, max_length=args.max_source_length, padding=True, return_tensors="pt")
    with torch.inference_mode():  # both encoders score as declared: MiniLM's vectors come out unit-length (cosine)
        queries = q_encoder(**batch).pooler_output.numpy()
    top = np.argsort(-(queries @ passages.T), axis=1)[:, : max(KS)].tolist()
    scores = {**recall_at_k(top, gold, KS), **mrr_at_k(top, gold, (5,))}
    print(json.dumps({"dataset": args.dataset, "passages": len(texts), "questions": len(questions), **scores}))


if __name__ == "__main__":
    main()
