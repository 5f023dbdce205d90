"""One KB version loaded and searched in this process: `LoadedKB` (its passages memory-mapped, its index read by
kb.index.read_index and put on this process's GPUs where faiss_devices allows), what the Ray retrieval actors
serve, and `KBSearch`, the retriever without Ray that eval_rag.py, rag_answer.py, the LangChain retriever and
RagModel.from_pretrained use (training retrieves through the actors instead).

    search = KBSearch(*checkpoint_kb("OUT/checkpoint1200"), dim)  # the KB version its weights were trained against
    stored, ids, docs = search.retrieve(question_vectors, 5)      # (B, 5, d), (B, 5), [{"title": [...], ...}]
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
from datasets import Dataset, load_from_disk

from rag_end2end.kb.faiss_devices import to_gpu
from rag_end2end.kb.index import fill_misses, read_index
from rag_end2end.kb.versions import KBVersion


@dataclass
class Hits:
    """The top k passages of a batch of queries, all from one KB version: what a retrieval actor answers, a shard's
    part of an answer, and the merge of the shards' parts."""

    ids: np.ndarray  # (queries, k) rows of the version's passages
    embeddings: np.ndarray | None  # (queries, k, dim) the stored vectors; None when not asked for
    docs: list[dict]  # per query: each column's k values (title, text)
    kb: KBVersion | None  # the version they come from (None: a KBSearch that was not told its version)
    scores: np.ndarray | None = None  # (queries, k) inner products, where kept (shards: a miss scores -inf)
    adopted: bool = False  # a shard's: from a version it loaded by itself (after a restart), not one made live


def load_passages(passages_path: str | os.PathLike) -> Dataset:
    """A KB version's passages, memory-mapped, the embeddings read as numpy arrays."""
    passages = load_from_disk(str(passages_path))
    passages.set_format("numpy", columns=["embeddings"], output_all_columns=True)
    return passages


@dataclass
class LoadedKB:
    """One KB version in memory: passages and an index over them (a shard's rows only, from `offset`)."""

    info: KBVersion | None
    passages: Dataset
    index: faiss.Index
    offset: int = 0  # global row of the index's id 0 (a shard's first row)
    # The same memory-mapped rows without the embeddings, for recipes that re-encode the passages they
    # retrieve: 8 x 5 stored 768-d vectors are 123 KB to gather and ship back through Ray (~3 ms a call).
    texts: Dataset = field(init=False)
    on_gpu: bool = False  # `index` is a GPU copy (faiss_devices.to_gpu)
    # A GPU index is not thread-safe, and an actor answers two calls at once: GPU searches take turns.
    _gpu_turn: threading.Lock = field(init=False, default_factory=threading.Lock)

    def __post_init__(self):
        self.texts = self.passages.remove_columns("embeddings").with_format(None)

    @classmethod
    def read(
        cls,
        passages_path: str | os.PathLike,
        index_path: str | os.PathLike,
        info: KBVersion | None = None,
        ef_search: int | None = None,
        faiss_gpu: str = "auto",
    ) -> LoadedKB:
        """A KB version's passages and index, checked to match, the index where `faiss_gpu` says."""
        passages = load_passages(passages_path)
        index = read_index(index_path, ef_search)
        if index.ntotal != len(passages):
            raise ValueError(f"{index_path} holds {index.ntotal} vectors for {len(passages)} passages")
        return cls.placed(info, passages, index, faiss_gpu)

    @classmethod
    def placed(
        cls, info: KBVersion | None, passages: Dataset, index: faiss.Index, mode: str, offset: int = 0
    ) -> LoadedKB:
        """The loaded version with its index on this process's GPUs as `mode` says (the CPU index where it stays)."""
        searched = to_gpu(index, mode)
        return cls(info, passages, searched, offset, on_gpu=searched is not index)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) of the top `k` of each query in this version's index, as FAISS returns them (id -1 for a
        neighbour it did not find), except that an L2 index's squared distances are negated: higher is better for
        every metric, as the shards' merge ranks them."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if not self.on_gpu:
            scores, ids = self.index.search(queries, k)
        else:
            with self._gpu_turn:
                scores, ids = self.index.search(queries, k)
        return (-scores if self.index.metric_type == faiss.METRIC_L2 else scores), ids

    def lookup(self, ids: np.ndarray, embeddings: bool) -> tuple[np.ndarray | None, list[dict]]:
        """Embeddings (queries, k, dim), or None unless `embeddings`, and per-query docs ({column: k values}) of
        rows `ids` (queries, k), read in one gather: a lookup per query costs ~0.25 ms of Arrow overhead each."""
        rows = (self.passages if embeddings else self.texts)[ids.ravel().tolist()]
        embeds = np.asarray(rows.pop("embeddings"), dtype=np.float32).reshape(*ids.shape, -1) if embeddings else None
        k = ids.shape[1]
        docs = [{col: values[i * k : (i + 1) * k] for col, values in rows.items()} for i in range(len(ids))]
        return embeds, docs

    def retrieve(self, queries: np.ndarray, k: int, embeddings: bool = True) -> Hits:
        """The top `k` passages of each query, with their stored vectors if `embeddings`; a neighbour FAISS did not
        find is filled as kb.index.fill_misses says."""
        _, ids = self.search(queries, k)
        ids = fill_misses(ids)
        embeds, docs = self.lookup(ids, embeddings)
        return Hits(ids, embeds, docs, self.info)


class KBSearch:
    """Top-k search of one KB version in this process: what rag_model.RagModel asks of a retriever.
    finetune_rag.GenerativeQAModule takes it too (a module without refreshes, e.g. in unit tests). `dim`: the
    question vectors' size (the reference's CustomHFIndex took it; the index knows its own). `faiss_gpu`
    (faiss_devices): the index is searched on this process's GPUs when it has some and faiss has GPU support
    (auto), else on CPU as it was read."""

    def __init__(self, passages: str, index: str, dim: int, faiss_gpu: str = "auto"):
        for path in (passages, index):
            if not Path(path).exists():
                raise FileNotFoundError(f"{path} not found: the knowledge base is gone (moved or pruned?)")
        self.kb = LoadedKB.read(passages, index, faiss_gpu=faiss_gpu)
        self.live_kb = None

    def init_retrieval(self, kb: KBVersion) -> int:
        """Serve `kb` (a KBVersion of these same passages and index)."""
        self.live_kb = kb
        return kb.version

    def __len__(self) -> int:
        return len(self.kb.passages)

    def retrieve(self, query_vectors: np.ndarray, n_docs: int, embeddings: bool = True):
        """(stored embeddings or None, ids, docs) of the top-`n_docs` passages of each query vector."""
        hits = self.kb.retrieve(query_vectors, n_docs, embeddings)
        return hits.embeddings, hits.ids, hits.docs
