"""A knowledge base's FAISS index: the settings (`IndexConfig`), building one, the one reader every part of the
package reads an index with, and the one rule for a neighbour FAISS did not find (`fill_misses`)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import faiss
import numpy as np

from rag_end2end.kb.faiss_devices import train_index


@dataclass
class IndexConfig:
    """FAISS index settings. The metric is the KB's similarity's (`faiss_metric`: inner product for dot and cosine,
    L2 for l2), not a setting. `factory` (any `faiss.index_factory` string: "Flat", "HNSW32,Flat", "IVF4096,PQ64", ...)
    replaces `index_type` when set."""

    index_type: str = "hnsw"  # "flat" (exact) or "hnsw"
    hnsw_m: int = 32  # bench_index.py: M=128 (the reference's) built 1.5x slower, searched 1.6x slower, same recall
    ef_construction: int = 200
    ef_search: int = 128
    factory: str | None = None
    train_size: int = 100_000  # IVF/PQ indexes are trained on a random sample of at most this many vectors
    search_params: str | None = None  # faiss.ParameterSpace string stored in the index, e.g. "nprobe=32"
    faiss_gpu: str = "auto"  # faiss_devices mode: IVF/PQ training (and shard actors' search) on GPUs when here

    @classmethod
    def from_args(cls, args) -> IndexConfig:
        """The index settings of a CLI that called `add_index_args` (and finetune_rag.py's --faiss_gpu)."""
        return cls(
            args.index_type,
            args.hnsw_m,
            args.hnsw_ef_construction,
            args.hnsw_ef_search,
            args.index_factory,
            args.index_train_size,
            args.index_search_params,
            getattr(args, "faiss_gpu", "auto"),
        )


def faiss_metric(similarity: str) -> int:
    """The FAISS metric that ranks as `similarity` does: L2 for l2, inner product for dot and cosine."""
    return faiss.METRIC_L2 if similarity == "l2" else faiss.METRIC_INNER_PRODUCT


def new_faiss_index(
    dim: int, n_rows: int, cfg: IndexConfig, sample: Callable[[np.ndarray], np.ndarray], similarity: str = "dot"
) -> faiss.Index:
    """An empty index for `cfg` with `similarity`'s metric (IndexFlatIP or IndexFlatL2, HNSW or a factory), trained
    (IVF centroids, PQ codebooks) when it needs it on `sample(rows)`: the vectors of a seeded sorted sample of at most
    `cfg.train_size` of the `n_rows` rows. The training's k-means runs on this process's GPUs when `cfg.faiss_gpu` and
    faiss_devices allow; the index is a CPU index either way."""
    if cfg.factory:
        try:
            index = faiss.index_factory(dim, cfg.factory, faiss_metric(similarity))
        except RuntimeError as err:
            raise ValueError(f"--index_factory {cfg.factory!r}: not a FAISS factory string ({err})") from None
    elif cfg.index_type == "flat":
        index = faiss.IndexFlatL2(dim) if similarity == "l2" else faiss.IndexFlatIP(dim)
    elif cfg.index_type == "hnsw":
        index = faiss.IndexHNSWFlat(dim, cfg.hnsw_m, faiss_metric(similarity))
    else:
        raise ValueError(f"unknown index type {cfg.index_type!r}; choose flat or hnsw, or give --index_factory")
    if not index.is_trained:
        rows = np.sort(np.random.default_rng(0).permutation(n_rows)[: cfg.train_size])
        try:
            train_index(index, np.ascontiguousarray(sample(rows), dtype=np.float32), cfg.faiss_gpu)
        except RuntimeError as err:  # e.g. fewer training vectors than IVF centroids
            raise ValueError(
                f"--index_factory {cfg.factory!r}: training on {len(rows):,} vectors failed; a KB this size needs "
                f"fewer IVF lists or PQ centroids, e.g. IVF{max(1, int(np.sqrt(n_rows)))},Flat ({err})"
            ) from None
    if hasattr(index, "hnsw"):
        index.hnsw.efConstruction = cfg.ef_construction
        index.hnsw.efSearch = cfg.ef_search
    if cfg.search_params:  # written with the index (nprobe, efSearch), so every reader searches the same way
        try:
            faiss.ParameterSpace().set_index_parameters(index, cfg.search_params)
        except RuntimeError as err:
            kind = cfg.factory or cfg.index_type
            raise ValueError(f"--index_search_params {cfg.search_params!r} do not apply to {kind} ({err})") from None
    return index


def build_faiss_index(embeddings: np.ndarray, cfg: IndexConfig, similarity: str = "dot") -> faiss.Index:
    """Build an index over `embeddings` (row i gets FAISS id i) with `similarity`'s metric."""
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    index = new_faiss_index(embeddings.shape[1], len(embeddings), cfg, embeddings.__getitem__, similarity)
    index.add(embeddings)
    return index


def read_index(path: str | os.PathLike, ef_search: int | None = None, mmap: bool = False) -> faiss.Index:
    """Read a KB's index: what every part of the package that reads one calls (the retrieval actors, the in-process
    search, the check of a KB before training). `ef_search` replaces the HNSW search depth the index was written
    with (--hnsw_ef_search); `mmap` maps the file read-only instead of loading it (to read its size and count)."""
    index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0)
    if ef_search is not None and hasattr(index, "hnsw"):
        index.hnsw.efSearch = ef_search
    return index


def fill_misses(ids: np.ndarray, missed: np.ndarray | None = None) -> np.ndarray:
    """The one rule for a neighbour FAISS did not find, used by every search of the package: in (queries, k)
    `ids` (or any array aligned with them: positions, scores), each `missed` entry (default: FAISS's id -1) takes
    its query's best hit, the first column. FAISS misses when it finds fewer than k neighbours: a KB (or an index
    shard) smaller than k, an HNSW graph that reached fewer, an IVF search whose probed lists hold fewer.

    Why the best hit repeated: the model needs k passages per question (fixed shapes for the doc scores and the
    generator's batch), and -1 used as a row would read the last passage, unrelated to the question. The best hit
    is a passage the question did find, so no unrelated passage reaches the generator; a repeat adds no gold
    passage, so recall@k and MRR@k are unchanged. A question with no hit at all has nothing to repeat: ValueError."""
    missed = ids < 0 if missed is None else missed
    if missed.size and missed[:, 0].any():
        question = int(np.flatnonzero(missed[:, 0])[0])
        raise ValueError(
            f"the index found no passage for question {question}: an empty index, or an IVF index that probes too "
            "few lists (raise nprobe with --index_search_params)"
        )
    return np.where(missed, ids[:, :1], ids)
