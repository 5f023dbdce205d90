"""Retrieval over Ray: named actors that each hold one knowledge-base version in memory, and a
`RagRetriever` subclass that the RAG model calls as it would call transformers' own."""

from __future__ import annotations

import itertools
import os
import threading
from dataclasses import dataclass

import faiss
import numpy as np
import ray
from datasets import Dataset, load_from_disk
from ray._private import ray_constants
from transformers import RagRetriever
from transformers.models.rag.retrieval_rag import Index

from kb_encode_utils import KBVersion

RAY_ADDRESS_ENV = "RAG_E2E_RAY_ADDRESS"  # how DDP child processes find the Ray started by rank 0


def init_ray(address: str | None = None, namespace: str = "rag") -> None:
    """Join `address` (a running cluster) or start a local Ray that listens on loopback only."""
    if ray.is_initialized():
        return
    address = address or os.environ.get(RAY_ADDRESS_ENV)
    if address:
        ray.init(address=address, namespace=namespace, log_to_driver=True)
        return
    # Keep every Ray listener on 127.0.0.1: `_node_ip_address` alone does not. Ray reads this variable
    # when it is imported, so set it for the processes ray.init starts and patch the imported constant.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    # Ray starts its workers at niceness 15: behind a training process that keeps every core busy, the
    # encoding actors then get almost no CPU and a refresh never finishes. Equal priority, unless the
    # user's environment says otherwise.
    os.environ.setdefault(ray_constants.RAY_WORKER_NICENESS, "0")
    ray.init(namespace=namespace, include_dashboard=False, _node_ip_address="127.0.0.1")
    os.environ[RAY_ADDRESS_ENV] = ray.get_runtime_context().gcs_address


@dataclass
class _LoadedKB:
    info: KBVersion
    passages: Dataset
    index: faiss.Index


class RetrievalActor:
    """Serves top-k search over one KB version. A new version is loaded beside the live one (`stage`)
    and made live by one assignment (`activate`), so each search sees exactly one version."""

    def __init__(self, ef_search: int = 128):
        self.ef_search = ef_search
        self._live: _LoadedKB | None = None
        self._staged: dict[int, _LoadedKB] = {}
        self._lock = threading.Lock()  # guards staging; searches never take it
        self._requests = itertools.count(1)  # next() is atomic, unlike += across the two threads
        self.requests = 0

    def _load(self, kb: KBVersion) -> _LoadedKB:
        passages = load_from_disk(kb.passages_path)
        passages.set_format("numpy", columns=["embeddings"], output_all_columns=True)
        index = faiss.read_index(kb.index_path)
        if hasattr(index, "hnsw"):
            index.hnsw.efSearch = self.ef_search
        if index.ntotal != len(passages):
            raise ValueError(f"{kb.index_path} holds {index.ntotal} vectors for {len(passages)} passages")
        return _LoadedKB(kb, passages, index)

    def stage(self, kb: KBVersion) -> int:
        loaded = self._load(kb)
        with self._lock:
            self._staged[kb.version] = loaded
        return kb.version

    def activate(self, version: int) -> int:
        with self._lock:
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

    def retrieve(self, question_hidden_states: np.ndarray, n_docs: int):
        self.requests = next(self._requests)
        kb = self._live  # read the pointer once: the whole answer comes from this version
        if kb is None:
            raise RuntimeError("no knowledge-base version is loaded in this retrieval actor")
        queries = np.ascontiguousarray(question_hidden_states, dtype=np.float32)
        _, ids = kb.index.search(queries, n_docs)
        # HNSW may return -1 when it finds fewer than n_docs neighbours: repeat the best hit instead.
        ids = np.where(ids < 0, ids[:, :1], ids)
        docs = [kb.passages[row.tolist()] for row in ids]
        embeds = np.stack([d.pop("embeddings") for d in docs]).astype(np.float32)
        return embeds, ids, docs, kb.info.version


def start_retrieval_actors(n: int, ef_search: int = 128, namespace: str = "rag") -> list:
    """Create (or, from other ranks, attach to) the actors `retrieval_worker_<i>` of Ray namespace `namespace`."""
    # Two threads: a search can run while a new version is staged; num_cpus=0 because they mostly wait.
    options = {"get_if_exists": True, "max_concurrency": 2, "num_cpus": 0, "namespace": namespace}
    remote_cls = ray.remote(RetrievalActor)
    return [remote_cls.options(name=f"retrieval_worker_{i}", **options).remote(ef_search) for i in range(n)]


class _RemoteIndex(Index):
    """Placeholder so `RagRetriever.__init__` does not load an index in the training process."""

    def is_initialized(self) -> bool:
        return True


class RagRayDistributedRetriever(RagRetriever):
    """A `RagRetriever` whose searches run in the Ray retrieval actors, spread round-robin."""

    def __init__(self, config, question_encoder_tokenizer, generator_tokenizer, actor_handles, rank: int = 0):
        if not actor_handles:
            raise ValueError("RagRayDistributedRetriever needs at least one retrieval actor")
        super().__init__(
            config, question_encoder_tokenizer, generator_tokenizer, index=_RemoteIndex(), init_retrieval=False
        )
        self.actors = list(actor_handles)
        self._next = rank  # ranks start at different actors so their requests interleave
        self.last_version: int | None = None

    def init_retrieval(self, kb: KBVersion | None = None) -> int:
        """Make sure every actor serves a version, loading `kb` (default: the config's paths) if none."""
        kb = kb or KBVersion(0, self.config.passages_path, self.config.index_path)
        versions = ray.get([a.ensure_live.remote(kb) for a in self.actors])
        return max(versions)

    def retrieve(self, question_hidden_states: np.ndarray, n_docs: int):
        actor = self.actors[self._next % len(self.actors)]
        self._next += 1
        embeds, ids, docs, version = ray.get(actor.retrieve.remote(question_hidden_states, n_docs))
        self.last_version = version
        return embeds, ids, docs

    def stage(self, kb: KBVersion) -> list:
        """Start loading `kb` in every actor; returns the object refs to poll."""
        return [a.stage.remote(kb) for a in self.actors]

    def activate(self, version: int) -> None:
        """Switch every actor to a staged version (milliseconds: a pointer assignment each)."""
        ray.get([a.activate.remote(version) for a in self.actors])
