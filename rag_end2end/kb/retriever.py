"""Retrieval over Ray: named actors that each hold one knowledge-base version in memory, and the retriever
the RAG model calls, which spreads searches over them. With `--index_shards S` each of S shard actors holds
1/S of the passages and its own index over them instead; a query fans out to all and their top-k are merged."""

from __future__ import annotations

import itertools
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import faiss
import numpy as np
import ray
from datasets import Dataset, load_from_disk
from ray._private import ray_constants
from ray.exceptions import GetTimeoutError, RayActorError

from rag_end2end.kb.encode import IndexConfig, KBVersion, build_faiss_index, quiet_actor, shard_bounds
from rag_end2end.kb.faiss_devices import faiss_actor_gpus, to_gpu

RAY_ADDRESS_ENV = "RAG_E2E_RAY_ADDRESS"  # how DDP child processes find the Ray started by rank 0
# A dead actor comes back within seconds (a new process that imports faiss and loads the KB): 40 tries
# 0.5 s apart ride that out, or go round the other actors.
MAX_RETRIEVAL_ATTEMPTS = 40
RETRY_PAUSE_S = 0.5
# A search takes milliseconds, but an actor Ray restarted first loads the live KB inside the call (minutes for a
# large one): an actor that gives no answer for this long is stuck (stopped, swapping, deadlocked) and restarted.
RETRIEVAL_TIMEOUT_S = 300.0
RELOAD_TIMEOUT_S = 1800.0  # the first call to an actor being restarted, which loads the KB before it answers
log = logging.getLogger(__name__)
PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])  # the folder that holds rag_end2end/


@dataclass(frozen=True)
class GpuPlan:
    """Which of this machine's visible GPUs train and which encode the KB, as positions among them (torch's
    `cuda:i`, the i-th entry of CUDA_VISIBLE_DEVICES). Built by `plan_gpus`, the one placement rule."""

    train: tuple[int, ...]  # Lightning's devices
    encode: tuple[int, ...]  # what a local Ray may hand to encoding actors; shares `train` only for a fraction
    per_actor: float  # num_gpus of each encoding actor; 0: they encode on CPU

    def ray_gpus(self, visible_ids: Sequence[str]) -> list[str]:
        """The encoding GPUs as CUDA_VISIBLE_DEVICES names them (`visible_ids`: visible_gpu_ids()), for init_ray."""
        return [visible_ids[i] for i in self.encode]


def visible_gpu_ids() -> list[str]:
    """This process's GPUs as CUDA_VISIBLE_DEVICES names them (SLURM exports physical ids, e.g. "4,5,6"), in
    torch's order: `cuda:i` is entry i."""
    import torch  # not at module level: retrieval actors import this module and never need torch

    count = torch.cuda.device_count()
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    return listed.split(",")[:count] if listed else [str(i) for i in range(count)]


def plan_gpus(
    visible: int | None, train: Sequence[int], index_gpus: float, index_workers: int, train_flags: str = ""
) -> GpuPlan:
    """Split `visible` GPUs between training (`train`, Lightning's device positions) and the `index_workers`
    encoding actors that share `index_gpus`. A whole --index_gpus takes the first GPUs training does not use, so
    no encoder lands beside a training rank; a fraction below 1 shares the last training GPU (rank 0's stays
    whole where there are several: it also drives the refresh and scores retrieval). `visible` None: the encoding
    GPUs are a joined Ray cluster's, not this machine's; only the shares are checked. Impossible settings raise
    ValueError, one line naming the flags (`train_flags`: those that chose `train`, e.g. "--gpus 2") and counts."""
    train = tuple(train)
    if index_gpus < 0 or index_workers < 1:
        raise ValueError(f"--index_gpus must be >= 0 and --index_workers >= 1, got {index_gpus:g} and {index_workers}")
    per_actor = index_gpus / index_workers
    if per_actor > 1:  # Ray also refuses a share above 1 that is not whole (1.5), when the actor is created
        raise ValueError(
            f"--index_gpus {index_gpus:g} --index_workers {index_workers} asks {per_actor:g} GPUs of each encoding "
            f"actor, which encodes on one GPU: give --index_workers {math.ceil(index_gpus)} or more"
        )
    if index_gpus > 1 and index_gpus != int(index_gpus):
        raise ValueError(f"--index_gpus {index_gpus:g}: give a whole number of GPUs (kept apart from training) or a "
                         "fraction below 1 (a share of a training GPU)")  # fmt: skip
    if index_gpus == 0 or visible is None:
        return GpuPlan(train, (), per_actor)
    asked = f"{train_flags or f'{len(train)} training GPU(s)'} --index_gpus {index_gpus:g}"
    if index_gpus < 1:
        if visible < 1:
            raise ValueError(f"{asked}: a share of a GPU, but no GPU is visible here{_visible_note()}; give "
                             "--index_gpus 0 to encode on CPU")  # fmt: skip
        return GpuPlan(train, train[-1:] or (0,), per_actor)
    free = [d for d in range(visible) if d not in train]
    if len(free) < index_gpus:
        raise ValueError(
            f"{asked} need {len(train) + int(index_gpus)} GPUs, {visible} visible{_visible_note()}: lower "
            "--index_gpus, or give a fraction (--index_gpus 0.5) to share a training GPU, or 0 to encode on CPU"
        )
    return GpuPlan(train, tuple(free[: int(index_gpus)]), per_actor)


def _visible_note() -> str:
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    return f" (CUDA_VISIBLE_DEVICES={listed})" if listed is not None else ""


@contextmanager
def _visible_to_ray(gpus: Sequence[str] | None):
    """CUDA_VISIBLE_DEVICES set to `gpus` while the block starts a local Ray, then restored: the raylet and every
    worker it starts inherit the environment of that moment, and Ray numbers and hands out only those GPUs."""
    if gpus is None:
        yield {}
        return
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
    try:
        yield {"num_gpus": len(gpus)}
    finally:
        if before is None:
            del os.environ["CUDA_VISIBLE_DEVICES"]
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = before


def init_ray(address: str | None = None, namespace: str = "rag", gpus: Sequence[str] | None = None) -> None:
    """Join `address` (a running cluster) or start a local Ray that listens on loopback only. A local Ray gets
    exactly the GPUs `gpus` (CUDA_VISIBLE_DEVICES ids: GpuPlan.ray_gpus) to hand to actors, none if empty: left to
    itself it takes every GPU it sees and hands them out from the first, which is training rank 0's. None: Ray's
    own count (a joined cluster's GPUs are whatever its nodes were started with)."""
    if ray.is_initialized():
        return
    address = address or os.environ.get(RAY_ADDRESS_ENV)
    if address:
        check_reachable(address)
        # The cluster's workers import this toolkit from the same path (a shared or identical checkout or install).
        ray.init(address=address, namespace=namespace, runtime_env={"env_vars": {"PYTHONPATH": PACKAGE_ROOT}})
        return
    # Keep every Ray listener on 127.0.0.1: `_node_ip_address` alone does not. Ray reads this variable
    # when it is imported, so set it for the processes ray.init starts and patch the imported constant.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    # Ray starts its workers at niceness 15: behind a training process that keeps every core busy, the
    # encoding actors then get almost no CPU and a refresh never finishes. Equal priority, unless the
    # user's environment says otherwise.
    os.environ.setdefault(ray_constants.RAY_WORKER_NICENESS, "0")
    with _visible_to_ray(gpus) as resources:
        ray.init(namespace=namespace, include_dashboard=False, _node_ip_address="127.0.0.1", **resources)
    os.environ[RAY_ADDRESS_ENV] = ray.get_runtime_context().gcs_address


def shutdown_ray() -> None:
    """`ray.shutdown()`, and forget the address init_ray left for DDP children when it started this Ray: a later
    init_ray in this process would otherwise try to join the Ray that just stopped."""
    if ray.is_initialized() and os.environ.get(RAY_ADDRESS_ENV) == ray.get_runtime_context().gcs_address:
        del os.environ[RAY_ADDRESS_ENV]
    ray.shutdown()


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail within seconds when no Ray head node answers at a `host:port` address: nothing listens there, or
    something that is not Ray's GCS does (ray.init would retry for minutes, or loop on the host's own address)."""
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
    if address.startswith("ray://"):
        return  # a Ray Client server speaks its own protocol
    import grpc  # Ray's own dependency; the GCS answers GetClusterId to every client that joins
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    with grpc.insecure_channel(f"{host}:{port}") as channel:
        try:
            gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel).GetClusterId(
                gcs_service_pb2.GetClusterIdRequest(), timeout=timeout
            )
        except grpc.RpcError as err:
            raise ConnectionError(
                f"--ray_address {address}: something listens there, but not a Ray head node's GCS ({err.code().name}"
                f"). Give the head's GCS address (`ray start --head` prints it; port 6379 by default)."
            ) from None


@dataclass
class _LoadedKB:
    info: KBVersion
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

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) of the top `k` of each query (float32, contiguous) in this version's index."""
        if not self.on_gpu:
            return self.index.search(queries, k)
        with self._gpu_turn:
            return self.index.search(queries, k)

    @classmethod
    def placed(cls, info: KBVersion, passages: Dataset, index: faiss.Index, mode: str, offset: int = 0) -> _LoadedKB:
        """The loaded version with its index on this actor's GPUs as `mode` says (the CPU index where it stays)."""
        searched = to_gpu(index, mode)
        return cls(info, passages, searched, offset, on_gpu=searched is not index)


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
        return _LoadedKB.placed(kb, passages, index, self.faiss_gpu)

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

    def _serving(self, fallback: KBVersion | None) -> _LoadedKB:
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

    @staticmethod
    def _lookup(kb: _LoadedKB, ids: np.ndarray, embeddings: bool) -> tuple[np.ndarray | None, list[dict]]:
        """Embeddings (queries, k, dim), or None unless `embeddings`, and per-query docs ({column: k values}) of
        rows `ids` (queries, k), read in one gather: a lookup per query costs ~0.25 ms of Arrow overhead each."""
        rows = (kb.passages if embeddings else kb.texts)[ids.ravel().tolist()]
        embeds = np.asarray(rows.pop("embeddings"), dtype=np.float32).reshape(*ids.shape, -1) if embeddings else None
        k = ids.shape[1]
        docs = [{col: values[i * k : (i + 1) * k] for col, values in rows.items()} for i in range(len(ids))]
        return embeds, docs

    def retrieve(
        self,
        query_vectors: np.ndarray,
        n_docs: int,
        fallback: KBVersion | None = None,
        embeddings: bool = True,
    ):
        """Top-`n_docs` passages of the live version, with their stored embeddings if `embeddings`; an actor Ray
        restarted (so empty) first loads `fallback`."""
        self.requests = next(self._requests)
        kb = self._serving(fallback)
        queries = np.ascontiguousarray(query_vectors, dtype=np.float32)
        _, ids = kb.search(queries, n_docs)
        # HNSW may return -1 when it finds fewer than n_docs neighbours: repeat the best hit instead.
        ids = np.where(ids < 0, ids[:, :1], ids)
        embeds, docs = self._lookup(kb, ids, embeddings)
        return embeds, ids, docs, kb.info


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
    # Two threads: a search can run while a new version is staged; num_cpus=0 because they mostly wait.
    options = {"get_if_exists": True, "max_concurrency": 2, "num_cpus": 0, "namespace": namespace,
               "max_restarts": -1, **({"num_gpus": gpus} if gpus else {})}  # fmt: skip
    remote_cls = ray.remote(RetrievalActor)
    return [
        remote_cls.options(name=f"retrieval_worker_{i}", **options).remote(ef_search, threads, faiss_gpu)
        for i in range(n)
    ]


@dataclass
class ShardAnswer:
    """One shard's top-k for a batch of queries, all from one KB version; a miss scores -inf."""

    scores: np.ndarray  # (queries, k) inner products, as FAISS returns them
    ids: np.ndarray  # (queries, k) global rows
    embeddings: np.ndarray | None  # (queries, k, dim), None when not asked for
    docs: list[dict]  # per query: each column's k values
    kb: KBVersion
    adopted: bool  # from a version the shard loaded by itself (after a restart), not one `activate` made live


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
        self._previous: _LoadedKB | None = None
        self._adopted = False  # the live version was loaded by ensure_live or search, not made live by activate

    def _load(self, kb: KBVersion) -> _LoadedKB:
        passages = load_from_disk(kb.passages_path)
        passages.set_format("numpy", columns=["embeddings"], output_all_columns=True)
        bounds = shard_bounds(len(passages), self.n_shards)
        if len(bounds) < self.n_shards:
            raise ValueError(f"{kb.passages_path}: {len(passages)} passages cannot fill {self.n_shards} index shards")
        start, end = bounds[self.shard]
        embeddings = passages.with_format("numpy", columns=["embeddings"])[start:end]["embeddings"]
        faiss.omp_set_num_threads(self.threads)
        # IVF/PQ training on this actor's GPUs when it has some (index_config.faiss_gpu), then search there
        index = build_faiss_index(embeddings, self.index_config)
        return _LoadedKB.placed(kb, passages, index, self.faiss_gpu, offset=start)

    def _find(self, version: int) -> _LoadedKB | None:
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
        raise TypeError("a shard answers `search`: its top-k is one part of the answer that ShardedRetriever merges")

    def search(
        self,
        queries: np.ndarray,
        n_docs: int,
        want: KBVersion | None = None,
        fallback: KBVersion | None = None,
        embeddings: bool = True,
    ) -> ShardAnswer | None:
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
        scores, local = kb.search(np.ascontiguousarray(queries, dtype=np.float32), n_docs)
        found = local >= 0  # FAISS pads with -1 past the shard's size, and HNSW may find fewer
        ids = np.where(found, local + kb.offset, kb.offset)  # a miss names a real row; its -inf sorts it last
        scores = np.where(found, scores, -np.inf).astype(np.float32)
        embeds, docs = self._lookup(kb, ids, embeddings)
        return ShardAnswer(scores, ids, embeds, docs, kb.info, adopted)


def start_shard_actors(
    n_shards: int, index_config: IndexConfig, namespace: str = "rag", threads: int | None = None, index_gpus: float = 0
) -> list:
    """Create (or attach to) the actors `retrieval_shard_<i>` of Ray namespace `namespace`, spread over the
    cluster's machines by Ray's scheduler. Ray restarts one that dies (empty); the retriever reloads it. With
    `index_config.faiss_gpu` on and index GPUs, each asks Ray for its share of a GPU, as start_retrieval_actors."""
    gpus, faiss_gpu = faiss_actor_gpus(index_config.faiss_gpu, index_gpus, n_shards + 1)
    index_config = replace(index_config, faiss_gpu=faiss_gpu)
    options = {"get_if_exists": True, "max_concurrency": 2, "num_cpus": 0, "namespace": namespace,
               "max_restarts": -1, "scheduling_strategy": "SPREAD", **({"num_gpus": gpus} if gpus else {})}  # fmt: skip
    remote_cls = ray.remote(ShardActor)
    return [
        remote_cls.options(name=f"retrieval_shard_{i}", **options).remote(i, n_shards, index_config, threads)
        for i in range(n_shards)
    ]


class RagRayDistributedRetriever:
    """Top-k search in the Ray retrieval actors, spread round-robin: `retrieve(q, n, embeddings=True) ->
    (embeddings or None, ids, docs)`, what rag_model.RagModel asks of any retriever. A call whose actor died is
    retried on the next actor (or the same one once Ray has restarted it), so training never sees the death;
    `actor_restarts` counts the actors that came back. `live_kb` is the newest version this rank has seen served
    or made live."""

    def __init__(self, actor_handles: list, rank: int = 0, timeout_s: float = RETRIEVAL_TIMEOUT_S):
        if not actor_handles:
            raise ValueError("RagRayDistributedRetriever needs at least one retrieval actor")
        self.actors = list(actor_handles)
        self.timeout_s = timeout_s
        self.timeouts = 0  # calls that got no answer in timeout_s (their actor was restarted)
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

    def retrieve(self, query_vectors: np.ndarray, n_docs: int, embeddings: bool = True):
        """Top-`n_docs` passages for each query vector (the pooled question vector, already divided by tau: its
        inner product with a stored passage vector is the doc score), from one KB version."""
        error = None
        for _ in range(MAX_RETRIEVAL_ATTEMPTS):
            i = self._next % len(self.actors)
            self._next += 1
            ref = self.actors[i].retrieve.remote(query_vectors, n_docs, self.live_kb, embeddings)
            try:
                embeds, ids, docs, kb = ray.get(ref, timeout=self._timeout([i]))
            except GetTimeoutError as err:
                self._restart_stuck([i])
                error = err
                continue
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

    def _timeout(self, actors) -> float:
        """How long a call to these actors may take: longer while one is being restarted (it loads the KB first)."""
        return max(self.timeout_s, RELOAD_TIMEOUT_S) if self._dead.intersection(actors) else self.timeout_s

    def _restart_stuck(self, stuck: list[int]) -> None:
        """Kill the actors that gave no answer in timeout_s; Ray restarts them (max_restarts=-1) and the next
        call goes to another actor, or to the restarted one, which first loads the live version."""
        self.timeouts += len(stuck)
        for i in stuck:
            log.warning("retrieval actor %d gave no answer in %.0f s: restarting it, retrying the call elsewhere", i,
                        self.timeout_s)  # fmt: skip
            ray.kill(self.actors[i], no_restart=False)
            self._dead.add(i)

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


def merge_shard_answers(
    answers: list[ShardAnswer], n_docs: int
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, list]:
    """(scores, embeddings or None, ids, docs) of the best `n_docs` over the shards' answers: by score, ties to
    the lower global id, so that the result is what one exact index over all rows returns."""
    scores = np.concatenate([a.scores for a in answers], axis=1)
    ids = np.concatenate([a.ids for a in answers], axis=1)
    order = np.lexsort((ids, -scores), axis=1)[:, :n_docs]
    # Fewer hits than n_docs over all shards (HNSW misses): repeat the best one, as RetrievalActor does.
    order = np.where(np.isfinite(np.take_along_axis(scores, order, 1)), order, order[:, :1])
    embeds = None if answers[0].embeddings is None else np.concatenate([a.embeddings for a in answers], axis=1)
    docs = []
    for query, picks in enumerate(order):
        pooled = {col: [v for a in answers for v in a.docs[query][col]] for col in answers[0].docs[query]}
        docs.append({col: [values[j] for j in picks] for col, values in pooled.items()})
    top_embeds = None if embeds is None else np.take_along_axis(embeds, order[:, :, None], 1)
    return np.take_along_axis(scores, order, 1), top_embeds, np.take_along_axis(ids, order, 1), docs


class ShardedRetriever(RagRayDistributedRetriever):
    """Exact top-k over shard actors (start_shard_actors): each query goes to every shard at once and their
    answers are merged by score. An answer never mixes KB versions: while an activation travels over the
    shards they may answer from two versions, and the odd ones are asked again for one version all hold."""

    def __init__(self, shard_handles: list, rank: int = 0, timeout_s: float = RETRIEVAL_TIMEOUT_S):
        super().__init__(shard_handles, rank, timeout_s)
        self._index_of = {handle._actor_id.hex(): i for i, handle in enumerate(self.actors)}

    def retrieve(self, query_vectors: np.ndarray, n_docs: int, embeddings: bool = True):
        _, embeds, ids, docs, _ = self.search(query_vectors, n_docs, embeddings)
        return embeds, ids, docs

    def search(
        self, queries: np.ndarray, n_docs: int, embeddings: bool = True
    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, list, KBVersion]:
        """(scores, embeddings or None, ids, docs, version) of the top-`n_docs` over all shards, from one version."""
        error = None
        for _ in range(MAX_RETRIEVAL_ATTEMPTS):
            refs = [s.search.remote(queries, n_docs, None, self.live_kb, embeddings) for s in self.actors]
            try:
                answers = ray.get(refs, timeout=self._timeout(range(len(refs))))
                answers = self._one_version(queries, n_docs, answers, embeddings)
            except GetTimeoutError as err:
                _, pending = ray.wait(refs, num_returns=len(refs), timeout=0)
                self._restart_stuck([refs.index(r) for r in pending])
                error = err
                continue
            except RayActorError as err:  # a shard died mid-call, or is restarting: Ray brings it back
                if err.actor_id in self._index_of:
                    self._dead.add(self._index_of[err.actor_id])
                error = err
                time.sleep(RETRY_PAUSE_S)
                continue
            if answers is None:  # a second activation overtook this query: ask again
                continue
            self.actor_restarts += len(self._dead)
            self._dead.clear()
            kb = answers[0].kb
            if self.live_kb is None or kb.version >= self.live_kb.version:
                self.live_kb = kb
            self.last_version = kb.version
            return *merge_shard_answers(answers, n_docs), kb
        raise RuntimeError(f"the retrieval shards gave no answer in {MAX_RETRIEVAL_ATTEMPTS} attempts") from error

    def _one_version(
        self, queries: np.ndarray, n_docs: int, answers: list[ShardAnswer], embeddings: bool
    ) -> list[ShardAnswer] | None:
        """`answers` all from one version: the shards that answered from another are asked for it. None when
        no version was found that every shard still holds."""
        # Activated versions first (a restarted shard's own pick may be stale), newest first: every shard holds
        # a version being activated (staged, live or just replaced) until `activate` releases it.
        preference = sorted({(not a.adopted, a.kb.version): a.kb for a in answers}.items(), reverse=True)
        tried = set()
        for (_, version), kb in preference:
            odd = [i for i, a in enumerate(answers) if a.kb.version != version]
            if not odd:
                return answers
            if version in tried:
                continue
            tried.add(version)
            again = ray.get([self.actors[i].search.remote(queries, n_docs, kb, None, embeddings) for i in odd])
            if all(a is not None for a in again):
                return [again[odd.index(i)] if i in odd else a for i, a in enumerate(answers)]
        return None

    def activate(self, kb: KBVersion) -> None:
        """Switch every shard to `kb` (each staged it), then let each drop the version it replaced."""
        super().activate(kb)
        for shard in self.actors:
            try:
                ray.get(shard.release.remote(kb.version))
            except RayActorError:  # restarted: it holds nothing to release
                pass
