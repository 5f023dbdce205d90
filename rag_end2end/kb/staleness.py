"""How stale the live KB index is, measured rather than counted in steps: on a fixed seeded sample of passages, the
cosine between the vector a KB version stores and the current context encoder's vector of the same passage (the
drift since that version was encoded), and on questions with gold passages, recall@k and MRR@k of an exact search
over the stored vectors against the same search over freshly re-encoded ones (what the drift costs retrieval).

    probe = StalenessProbe(passages_path, ctx_tokenizer, sample_size=256, seed=0, gold_ids=gold.passage_ids)
    probe.measure(ctx_encoder, live_kb.passages_path, question_vectors, live_kb.similarity)
    # {"staleness_cosine_mean": 0.97, "staleness_cosine_min": 0.91, "val_stale_recall@1": 0.4, ...}

Both searches score the same candidates (the sample plus the questions' gold passages; the whole KB when it has no
more passages than the sample) exactly, so the gap between them is the drift's alone, not the index's approximation.
Every KB version holds the same passages in the same rows (a refresh re-encodes them), so one sample serves all.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np

from rag_end2end.evaluation.metrics import mrr_at_k, recall_at_k
from rag_end2end.kb.encoding import encode_token_ids
from rag_end2end.kb.index import IndexConfig, build_faiss_index
from rag_end2end.kb.passages import tokenize_passages
from rag_end2end.kb.search import load_passages

if TYPE_CHECKING:
    import torch

RECALL_KS = (1, 5)  # recall@1/5 and MRR@5: what the refresh trade-off is read by
MRR_KS = (5,)


def sample_rows(n_rows: int, size: int, seed: int) -> np.ndarray:
    """A sorted sample of min(size, n_rows) rows, drawn by its own generator: the training's RNG streams never move."""
    return np.sort(np.random.default_rng(seed).permutation(n_rows)[: min(size, n_rows)])


class StalenessProbe:
    """The passages to measure on, tokenised once as the refresh tokenises them (kb.passages.tokenize_passages), so
    that an encoder unchanged since a version was written gives that version's vectors back (cosine 1)."""

    def __init__(
        self,
        passages_path: str,
        tokenizer,
        sample_size: int = 256,
        seed: int = 0,
        gold_ids: list[list[int]] | None = None,
        batch_size: int = 64,
    ):
        passages = load_passages(passages_path)
        self.sample = sample_rows(len(passages), sample_size, seed)
        gold = {int(i) for ids in gold_ids or [] for i in ids if 0 <= int(i) < len(passages)}
        # The rows both searches rank: the sample and every gold passage (a question's gold must be there to be found).
        self.rows = np.union1d(self.sample, np.fromiter(gold, dtype=np.int64, count=len(gold))).astype(np.int64)
        self.in_rows = np.searchsorted(self.rows, self.sample)  # the sample's positions in self.rows
        self.gold_ids = gold_ids
        texts = passages.select_columns(["title", "text"])[self.rows.tolist()]
        self.token_ids = tokenize_passages(tokenizer, texts["title"], texts["text"])
        self.pad_token_id, self.batch_size = tokenizer.pad_token_id, batch_size

    def fresh_vectors(self, encoder: torch.nn.Module) -> np.ndarray:
        """The current encoder's vectors of `self.rows`, in eval mode without gradient (encode_token_ids), the
        encoder's training mode put back after: no dropout is drawn, so no RNG stream moves."""
        was_training = encoder.training
        device = next(encoder.parameters()).device
        try:
            return encode_token_ids(encoder, self.token_ids, self.pad_token_id, self.batch_size, device, False)
        finally:
            encoder.train(was_training)

    def measure(
        self,
        encoder: torch.nn.Module,
        stored_passages_path: str,
        question_vectors: np.ndarray | None = None,
        similarity: str = "dot",
        prefix: str = "val",
    ) -> dict[str, float]:
        """staleness_cosine_mean/min over the sample between the vectors stored in `stored_passages_path` (a KB
        version) and `encoder`'s; with `question_vectors` (one per gold_ids entry) `{prefix}_stale_recall@k`,
        `{prefix}_fresh_recall@k` and the same for mrr@5; and staleness_seconds, what measuring took."""
        start = time.perf_counter()
        fresh = self.fresh_vectors(encoder)
        stored = np.asarray(load_passages(stored_passages_path)[self.rows.tolist()]["embeddings"], dtype=np.float32)
        a, b = stored[self.in_rows], fresh[self.in_rows]
        cosine = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
        metrics = {"staleness_cosine_mean": float(cosine.mean()), "staleness_cosine_min": float(cosine.min())}
        if question_vectors is not None and self.gold_ids is not None and len(question_vectors):
            for name, vectors in (("stale", stored), ("fresh", fresh)):
                ranked = self.exact_search(vectors, question_vectors, max(RECALL_KS + MRR_KS), similarity)
                scores = {**recall_at_k(ranked, self.gold_ids, RECALL_KS), **mrr_at_k(ranked, self.gold_ids, MRR_KS)}
                metrics |= {f"{prefix}_{name}_{k}": float(v) for k, v in scores.items() if k != "n"}
        metrics["staleness_seconds"] = time.perf_counter() - start
        return metrics

    def exact_search(self, vectors: np.ndarray, queries: np.ndarray, k: int, similarity: str) -> list[list[int]]:
        """Each query's top k KB rows among `self.rows` (whose vectors are `vectors`), scored exactly as the KB's
        similarity ranks (a flat index of its metric)."""
        index = build_faiss_index(vectors, IndexConfig(index_type="flat"), similarity)
        _, local = index.search(np.ascontiguousarray(queries, dtype=np.float32), min(k, len(self.rows)))
        return self.rows[local].tolist()
