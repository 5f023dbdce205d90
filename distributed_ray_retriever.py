"""Retrieval over Ray: named actors that each hold one knowledge-base version in memory, and the retriever
the RAG model calls, which spreads searches over them."""

from __future__ import annotations

import itertools
import os
import socket
import threading
import time
from dataclasses import dataclass

import faiss
import numpy as np
import ray
from datasets import Dataset, load_from_disk
from ray._private import ray_constants
from ray.exceptions import RayActorError

from kb_encode_utils import KBVersion, quiet_actor

RAY_ADDRESS_ENV = "RAG_E2E_RAY_ADDRESS"  # how DDP child processes find the Ray started by rank 0
# A dead actor comes back within seconds (a new process that imports faiss and loads the KB): 40 tries
# 0.5 s apart ride that out, or go round the other actors.
MAX_RETRIEVAL_ATTEMPTS = 40
RETRY_PAUSE_S = 0.5


def init_ray(address: str | None = None, namespace: str = "rag") -> None:
    """Join `address` (a running cluster) or start a local Ray that listens on loopback only."""
    if ray.is_initialized():
        return
    address = address or os.environ.get(RAY_ADDRESS_ENV)
    if address:
        check_reachable(address)
        # The cluster's workers import this toolkit's modules from the same path (a shared or identical checkout).
        here = os.path.dirname(os.path.abspath(__file__))
        ray.init(address=address, namespace=namespace, runtime_env={"env_vars": {"PYTHONPATH": here}})
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


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail within seconds when nothing listens at a `host:port` Ray address (ray.init would retry for minutes)."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto", or a form Ray resolves itself
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as err:
        raise ConnectionError(
            f"--ray_address {address}: nothing answers there ({err}). Start the head node with "
            f"`ray start --head --port {port}` on {host}, or leave --ray_address out to start a local Ray."
        ) from None


@dataclass
class _LoadedKB:
    info: KBVersion
    passages: Dataset
    index: faiss.Index


class RetrievalActor:
    """Serves top-k search over one KB version. A new version is loaded beside the live one (`stage`)
    and made live by one assignment (`activate`), so each search sees exactly one version."""

    def __init__(self, ef_search: int = 128):
        quiet_actor()
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

    def retrieve(self, question_hidden_states: np.ndarray, n_docs: int, fallback: KBVersion | None = None):
        """Top-`n_docs` passages of the live version; an actor Ray restarted (so empty) first loads `fallback`."""
        self.requests = next(self._requests)
        kb = self._live  # read the pointer once: the whole answer comes from this version
        if kb is None and fallback is not None:
            self.ensure_live(fallback)
            kb = self._live
        if kb is None:
            raise RuntimeError("no knowledge-base version is loaded in this retrieval actor")
        queries = np.ascontiguousarray(question_hidden_states, dtype=np.float32)
        _, ids = kb.index.search(queries, n_docs)
        # HNSW may return -1 when it finds fewer than n_docs neighbours: repeat the best hit instead.
        ids = np.where(ids < 0, ids[:, :1], ids)
        docs = [kb.passages[row.tolist()] for row in ids]
        embeds = np.stack([d.pop("embeddings") for d in docs]).astype(np.float32)
        return embeds, ids, docs, kb.info


def start_retrieval_actors(n: int, ef_search: int = 128, namespace: str = "rag") -> list:
    """Create (or, from other ranks, attach to) the actors `retrieval_worker_<i>` of Ray namespace `namespace`.
    Ray restarts one that dies (a fresh, empty process); the retriever reloads it on its next call."""
    # Two threads: a search can run while a new version is staged; num_cpus=0 because they mostly wait.
    options = {"get_if_exists": True, "max_concurrency": 2, "num_cpus": 0, "namespace": namespace,
               "max_restarts": -1}  # fmt: skip
    remote_cls = ray.remote(RetrievalActor)
    return [remote_cls.options(name=f"retrieval_worker_{i}", **options).remote(ef_search) for i in range(n)]


class RagRayDistributedRetriever:
    """Top-k search in the Ray retrieval actors, spread round-robin: `retrieve(q, n) -> (embeddings, ids,
    docs)`, what rag_model.RagModel asks of any retriever. A call whose actor died is retried on the next
    actor (or the same one once Ray has restarted it), so training never sees the death; `actor_restarts`
    counts the actors that came back. `live_kb` is the newest version this rank has seen served or made live."""

    def __init__(self, actor_handles: list, rank: int = 0):
        if not actor_handles:
            raise ValueError("RagRayDistributedRetriever needs at least one retrieval actor")
        self.actors = list(actor_handles)
        self._next = rank  # ranks start at different actors so their requests interleave
        self.live_kb: KBVersion | None = None
        self.last_version: int | None = None
        self.actor_restarts = 0
        self._dead: set[int] = set()  # actors whose last call failed because they died

    def init_retrieval(self, kb: KBVersion) -> int:
        """Make sure every actor serves a version, loading `kb` if none; returns the newest version served."""
        self.live_kb = self.live_kb or kb
        versions = ray.get([a.ensure_live.remote(kb) for a in self.actors])
        return max(versions)

    def retrieve(self, question_hidden_states: np.ndarray, n_docs: int):
        error = None
        for _ in range(MAX_RETRIEVAL_ATTEMPTS):
            i = self._next % len(self.actors)
            self._next += 1
            try:
                embeds, ids, docs, kb = ray.get(self.actors[i].retrieve.remote(question_hidden_states, n_docs,
                                                                              self.live_kb))  # fmt: skip
            except RayActorError as err:  # died mid-call, or restarting: Ray brings it back, we move on
                self._dead.add(i)
                error = err
                time.sleep(RETRY_PAUSE_S)
                continue
            if i in self._dead:
                self._dead.discard(i)
                self.actor_restarts += 1
            if self.live_kb is None or kb.version >= self.live_kb.version:
                self.live_kb = kb
            self.last_version = kb.version
            return embeds, ids, docs
        raise RuntimeError(f"no retrieval actor answered in {MAX_RETRIEVAL_ATTEMPTS} attempts") from error

    def stage(self, kb: KBVersion) -> list:
        """Start loading `kb` in every actor; returns the object refs to poll (an actor that dies meanwhile
        loads it in `activate`)."""
        return [a.stage.remote(kb) for a in self.actors]

    def activate(self, kb: KBVersion) -> None:
        """Switch every actor to `kb` (milliseconds: a pointer assignment each, for actors that staged it)."""
        for i, actor in enumerate(self.actors):
            for attempt in range(MAX_RETRIEVAL_ATTEMPTS):
                try:
                    ray.get(actor.activate.remote(kb.version, kb))
                    break
                except RayActorError:
                    if attempt == MAX_RETRIEVAL_ATTEMPTS - 1:
                        raise
                    self._dead.add(i)
                    time.sleep(RETRY_PAUSE_S)
        self.live_kb = kb
