"""The Ray actors that serve retrieval: a `RetrievalActor` holds one KB version in memory (loading the next one
beside it, then swapping by one assignment) and answers top-k searches; with `--index_shards S` each of S
`ShardActor`s holds 1/S of the passages and its own index over them, and answers its part of every query, which
kb.retriever.ShardedRetriever merges. Answers are `Hits` (kb.search)."""

from __future__ import annotations

import itertools
import os
import threading
from dataclasses import replace

import faiss
import numpy as np
import ray

from rag_end2end.kb.faiss_devices import faiss_actor_gpus
from rag_end2end.kb.index import IndexConfig, build_faiss_index
from rag_end2end.kb.passages import shard_bounds
from rag_end2end.kb.ray_start import quiet_actor, spread_over_nodes
from rag_end2end.kb.search import Hits, LoadedKB, load_passages
from rag_end2end.kb.versions import KBVersion


class RetrievalActor:
    """Serves top-k search over one KB version. A new version is loaded beside the live one (`stage`)
    and made live by one assignment (`activate`), so each search sees exactly one version."""

    def __init__(self, ef_search: int = 128, threads: int | None = None, faiss_gpu: str = "auto"):
        quiet_actor()
        # Ray sets OMP_NUM_THREADS=1 in an actor with num_cpus=0, so FAISS would search on one core while the
        # trainer, which waits for the answer, leaves the others idle (100k x 768 Flat, 8 queries: 207 -> 120 ms).
        # OpenMP keeps the count per thread, and calls run in the actor's thread pool: each search (and shard
        # index build) sets it.
        self.threads = threads or os.cpu_count() or 1
        self.ef_search = ef_search
        # faiss_devices mode: the index goes on the GPUs Ray gave this actor (none: it stays on CPU, as before)
        self.faiss_gpu = faiss_gpu
        self._live: LoadedKB | None = None
        self._staged: dict[int, LoadedKB] = {}
        self._lock = threading.Lock()  # guards staging; searches never take it
        self._requests = itertools.count(1)  # next() is atomic, unlike += across the two threads
        self.requests = 0

    def _load(self, kb: KBVersion) -> LoadedKB:
        return LoadedKB.read(kb.passages_path, kb.index_path, kb, self.ef_search, self.faiss_gpu)

    def stage(self, kb: KBVersion) -> int:
        loaded = self._load(kb)
        with self._lock:
            self._staged[kb.version] = loaded
        return kb.version

    def activate(self, version: int, kb: KBVersion | None = None) -> int:
        """Make staged `version` live; a restarted actor, which lost what was staged, loads `kb` instead."""
        with self._lock:
            if version not in self._staged and kb is not None and kb.version == version:
                self._staged[version] = self._load(kb)
            self._live = self._staged.pop(version)
            self._staged = {v: kb for v, kb in self._staged.items() if v > version}
        return version

    def ensure_live(self, kb: KBVersion) -> int:
        """Load `kb` unless some version is already live; returns the live version."""
        with self._lock:
            if self._live is None:
                self._live = self._load(kb)
            return self._live.info.version

    def live_version(self) -> KBVersion | None:
        return None if self._live is None else self._live.info

    def request_count(self) -> int:
        return self.requests

    def _serving(self, fallback: KBVersion | None) -> LoadedKB:
        """The live version, read once so that a whole answer comes from it; an actor Ray restarted (so empty)
        first loads `fallback`."""
        faiss.omp_set_num_threads(self.threads)
        kb = self._live
        if kb is None and fallback is not None:
            self.ensure_live(fallback)
            kb = self._live
        if kb is None:
            raise RuntimeError(f"no knowledge-base version is loaded in this {type(self).__name__}")
        return kb

    def retrieve(
        self,
        query_vectors: np.ndarray,
        n_docs: int,
        fallback: KBVersion | None = None,
        embeddings: bool = True,
    ) -> Hits:
        """Top-`n_docs` passages of the live version, with their stored embeddings if `embeddings`; an actor Ray
        restarted (so empty) first loads `fallback`."""
        self.requests = next(self._requests)
        return self._serving(fallback).retrieve(query_vectors, n_docs, embeddings)


def _serving_options(namespace: str, gpus: float) -> dict:
    """Ray options of an actor that serves searches: found again by name (get_if_exists), restarted for ever when it
    dies (on another node if its own is gone), two threads (a search can run while a new version is staged),
    num_cpus=0 because it mostly waits (on a cluster a small share, so that `spread_over_nodes` can place it)."""
    options = {"get_if_exists": True, "max_concurrency": 2, "num_cpus": 0, "namespace": namespace, "max_restarts": -1}
    return options | ({"num_gpus": gpus} if gpus else {})


def start_retrieval_actors(
    n: int,
    ef_search: int = 128,
    namespace: str = "rag",
    threads: int | None = None,
    faiss_gpu: str = "auto",
    index_gpus: float = 0,
) -> list:
    """Create (or, from other ranks, attach to) the actors `retrieval_worker_<i>` of Ray namespace `namespace`.
    Ray restarts one that dies (a fresh, empty process); the retriever reloads it on its next call. With
    `faiss_gpu` (--faiss_gpu) on and index GPUs (--index_gpus), each asks Ray for its share of a GPU and searches
    its index there (faiss_devices.faiss_actor_gpus: the builder of refreshes counts as one more)."""
    gpus, faiss_gpu = faiss_actor_gpus(faiss_gpu, index_gpus, n + 1)
    options = _serving_options(namespace, gpus)
    remote_cls = ray.remote(RetrievalActor)
    return [
        remote_cls.options(name=f"retrieval_worker_{i}", **(options | node)).remote(ef_search, threads, faiss_gpu)
        for i, node in enumerate(spread_over_nodes(n))
    ]


class ShardActor(RetrievalActor):
    """Serves top-k search over shard `shard` of `n_shards` (contiguous rows) of a KB version: it builds its own
    index over those rows' embeddings, read from the memory-mapped passages. A version it replaces stays
    beside the new live one until `release`, so while an activation travels over the shards each of them
    can still answer from either version (`search(want=...)`)."""

    def __init__(self, shard: int, n_shards: int, index_config: IndexConfig, threads: int | None = None):
        # A query reaches every shard at once: shards that share a machine share its cores.
        super().__init__(
            index_config.ef_search, threads or max(1, (os.cpu_count() or 1) // n_shards), index_config.faiss_gpu
        )
        self.shard, self.n_shards, self.index_config = shard, n_shards, index_config
        self._previous: LoadedKB | None = None
        self._adopted = False  # the live version was loaded by ensure_live or search, not made live by activate

    def _load(self, kb: KBVersion) -> LoadedKB:
        passages = load_passages(kb.passages_path)
        bounds = shard_bounds(len(passages), self.n_shards)
        if len(bounds) < self.n_shards:
            raise ValueError(f"{kb.passages_path}: {len(passages)} passages cannot fill {self.n_shards} index shards")
        start, end = bounds[self.shard]
        embeddings = passages.with_format("numpy", columns=["embeddings"])[start:end]["embeddings"]
        faiss.omp_set_num_threads(self.threads)
        # IVF/PQ training on this actor's GPUs when it has some (index_config.faiss_gpu), then search there
        index = build_faiss_index(embeddings, self.index_config, kb.similarity)
        return LoadedKB.placed(kb, passages, index, self.faiss_gpu, offset=start)

    def _find(self, version: int) -> LoadedKB | None:
        """The loaded `version` if this shard holds it (live, staged or the previous live); call with the lock held."""
        held = [self._live, self._previous, *self._staged.values()]
        return next((kb for kb in held if kb is not None and kb.info.version == version), None)

    def ensure_live(self, kb: KBVersion) -> int:
        """Load `kb` unless some version is already live (marked as not activated); returns the live version."""
        with self._lock:
            if self._live is None:
                self._live, self._adopted = self._load(kb), True
            return self._live.info.version

    def activate(self, version: int, kb: KBVersion | None = None) -> int:
        """Make `version` live, keeping the version it replaces until `release`; a restarted actor, which lost
        what was staged, loads `kb` instead."""
        with self._lock:
            loaded = self._find(version)
            if loaded is None and kb is not None and kb.version == version:
                loaded = self._load(kb)
            if loaded is None:
                raise KeyError(f"version {version} was never staged in retrieval shard {self.shard}")
            if loaded is not self._live:
                self._previous, self._live = self._live, loaded
            self._staged.pop(version, None)
            self._adopted = False
        return version

    def release(self, version: int) -> None:
        """Drop what only an activation in progress needed, once `version` is live on every shard."""
        with self._lock:
            if self._live is not None and self._live.info.version == version:
                self._previous = None
                self._staged = {v: kb for v, kb in self._staged.items() if v > version}

    def retrieve(self, *args, **kwargs):
        raise NotImplementedError(
            "a retrieval shard answers `search`: its top-k is one part of the answer, which ShardedRetriever merges"
        )

    def search(
        self,
        queries: np.ndarray,
        n_docs: int,
        want: KBVersion | None = None,
        fallback: KBVersion | None = None,
        embeddings: bool = True,
    ) -> Hits | None:
        """This shard's top-`n_docs` from its live version, or from `want` when asked: None if it no longer holds
        `want` (a later activation released it). A restarted (empty) actor loads `fallback` for a live version,
        and one whose live version never came through `activate` loads `want`."""
        self.requests = next(self._requests)
        faiss.omp_set_num_threads(self.threads)
        if want is None:
            kb = self._serving(fallback)
        else:
            with self._lock:
                kb = self._find(want.version)
                if kb is None and (self._live is None or self._adopted):
                    self._live, self._adopted = self._load(want), True
                    kb = self._live
            if kb is None:
                return None
        adopted = self._adopted and kb is self._live
        scores, local = kb.search(queries, n_docs)
        # FAISS pads with -1 past the shard's size, and HNSW may find fewer. A miss is left to the merge, which fills
        # what the whole KB missed as kb.index.fill_misses says (another shard may hold the hit): it names a real
        # row, so that the lookup reads one, and scores -inf, so that the merge ranks it last.
        found = local >= 0
        ids = np.where(found, local + kb.offset, kb.offset)
        scores = np.where(found, scores, -np.inf).astype(np.float32)
        embeds, docs = kb.lookup(ids, embeddings)
        return Hits(ids, embeds, docs, kb.info, scores, adopted)


def start_shard_actors(
    n_shards: int, index_config: IndexConfig, namespace: str = "rag", threads: int | None = None, index_gpus: float = 0
) -> list:
    """Create (or attach to) the actors `retrieval_shard_<i>` of Ray namespace `namespace`, dealt over the
    cluster's machines (`spread_over_nodes`). Ray restarts one that dies (empty); the retriever reloads it. With
    `index_config.faiss_gpu` on and index GPUs, each asks Ray for its share of a GPU, as start_retrieval_actors."""
    gpus, faiss_gpu = faiss_actor_gpus(index_config.faiss_gpu, index_gpus, n_shards + 1)
    index_config = replace(index_config, faiss_gpu=faiss_gpu)
    options = _serving_options(namespace, gpus)
    remote_cls = ray.remote(ShardActor)
    return [
        remote_cls.options(name=f"retrieval_shard_{i}", **(options | node)).remote(i, n_shards, index_config, threads)
        for i, node in enumerate(spread_over_nodes(n_shards))
    ]
