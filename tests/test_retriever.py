"""Tests for distributed_ray_retriever on a real local Ray: exact retrieval, atomic version swaps, the
round-robin RagRayDistributedRetriever, and loading checks."""

import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import faiss
import numpy as np
import pytest
import ray
from datasets import Dataset

from rag_end2end.kb.actors import RetrievalActor, start_retrieval_actors
from rag_end2end.kb.index import IndexConfig, build_faiss_index, fill_misses
from rag_end2end.kb.parts import with_embeddings
from rag_end2end.kb.retriever import RagRayDistributedRetriever
from rag_end2end.kb.search import Hits, KBSearch
from rag_end2end.kb.versions import KBVersion, build_kb_version

DIM = 8
N_PASSAGES = 40
TITLES = [f"title{i}" for i in range(N_PASSAGES)]
TEXTS = [f"passage number {i} about topic{i % 5}" for i in range(N_PASSAGES)]


def exact_topk(queries: np.ndarray, embeddings: np.ndarray, k: int) -> np.ndarray:
    scores = queries.astype(np.float64) @ embeddings.astype(np.float64).T
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def random_embeddings(seed: int, n: int = N_PASSAGES) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)


@pytest.fixture
def kb_factory(tmp_path):
    """Builds versions over the same passages with given embeddings: `make(version, embeddings) -> KBVersion`."""
    base = tmp_path / "base"
    Dataset.from_dict({"title": TITLES, "text": TEXTS}).save_to_disk(str(base))
    root = tmp_path / "kb"

    def make(version: int, embeddings: np.ndarray) -> KBVersion:
        return build_kb_version(str(base), str(root), version, 0, IndexConfig(index_type="flat"), "dot", embeddings)

    return make


class Actors:
    """Creates retrieval actors for one test and kills them all at its end."""

    def __init__(self):
        self.created = []

    def __call__(self, n: int = 1) -> list:
        handles = [ray.remote(RetrievalActor).options(max_concurrency=2, num_cpus=0).remote() for _ in range(n)]
        self.created.extend(handles)
        return handles

    def named(self, n: int) -> list:
        handles = start_retrieval_actors(n, namespace=f"test_{uuid.uuid4().hex[:8]}")
        self.created.extend(handles)
        return handles


@pytest.fixture
def actors(ray_local):
    pool = Actors()
    yield pool
    for handle in pool.created:
        ray.kill(handle)


def serve(handles: list, kb: KBVersion) -> None:
    assert ray.get([a.stage.remote(kb) for a in handles]) == [kb.version] * len(handles)
    assert ray.get([a.activate.remote(kb.version) for a in handles]) == [kb.version] * len(handles)


def check_docs(docs: list, ids: np.ndarray) -> None:
    """The passages returned for each query are the rows `ids` names, in order."""
    assert [d["title"] for d in docs] == [[TITLES[j] for j in row] for row in ids]
    assert [d["text"] for d in docs] == [[TEXTS[j] for j in row] for row in ids]


def check_result(hits: Hits, queries: np.ndarray, k: int, embeddings_by_version: dict) -> int:
    """Asserts that one retrieve() answer comes entirely from the version it names; returns that version."""
    version = hits.kb.version
    emb = embeddings_by_version[version]
    np.testing.assert_array_equal(hits.ids, exact_topk(queries, emb, k))
    np.testing.assert_array_equal(hits.embeddings, emb[hits.ids])
    check_docs(hits.docs, hits.ids)
    return version


# ----------------------------------------------------------------------------- RetrievalActor


def test_retrieval_returns_exact_topk_with_embeddings_and_docs(kb_factory, actors):
    emb = random_embeddings(0)
    kb = kb_factory(1, emb)
    (actor,) = actors(1)
    with pytest.raises(ray.exceptions.RayTaskError, match="no knowledge-base version is loaded"):
        ray.get(actor.retrieve.remote(np.zeros((1, DIM), np.float32), 2))
    assert ray.get(actor.live_version.remote()) is None

    serve([actor], kb)
    queries = np.random.default_rng(1).standard_normal((4, DIM)).astype(np.float32)
    hits = ray.get(actor.retrieve.remote(queries, 3))
    assert isinstance(hits, Hits) and hits.kb == kb
    assert hits.ids.shape == (4, 3) and hits.embeddings.shape == (4, 3, DIM) and hits.embeddings.dtype == np.float32
    assert len(hits.docs) == 4 and set(hits.docs[0]) == {"title", "text"}
    check_result(hits, queries, 3, {1: emb})
    assert ray.get(actor.live_version.remote()) == kb
    assert ray.get(actor.request_count.remote()) == 2  # the failed call counts too

    with pytest.raises(ray.exceptions.RayTaskError):
        ray.get(actor.activate.remote(7))  # never staged: the live version stays
    assert check_result(ray.get(actor.retrieve.remote(queries, 2)), queries, 2, {1: emb}) == 1


def test_an_empty_actor_loads_the_version_it_is_told(kb_factory, actors):
    """What a restarted actor (a fresh, empty process) does: serves the caller's live version, or the version
    being activated, though it never staged it."""
    emb1, emb2 = random_embeddings(0), random_embeddings(1)
    kb1, kb2 = kb_factory(1, emb1), kb_factory(2, emb2)
    first, second = actors(2)
    queries = np.random.default_rng(1).standard_normal((2, DIM)).astype(np.float32)
    assert check_result(ray.get(first.retrieve.remote(queries, 2, kb1)), queries, 2, {1: emb1}) == 1
    assert ray.get(second.activate.remote(2, kb2)) == 2
    assert check_result(ray.get(second.retrieve.remote(queries, 2, kb1)), queries, 2, {2: emb2}) == 2


def test_swaps_are_atomic_under_concurrent_retrieval(kb_factory, actors):
    embeddings = {v: random_embeddings(10 + v) for v in (1, 2, 3)}
    kbs = {v: kb_factory(v, e) for v, e in embeddings.items()}
    queries = np.random.default_rng(20).standard_normal((6, DIM)).astype(np.float32)
    k = 4
    tops = {v: exact_topk(queries, e, k) for v, e in embeddings.items()}
    assert not np.array_equal(tops[1], tops[2]) and not np.array_equal(tops[2], tops[3])  # versions distinguishable

    handles = actors.named(2)
    serve(handles, kbs[1])
    results, errors, stop = [], [], threading.Event()
    lock = threading.Lock()

    def client(offset: int) -> None:
        i = offset
        while not stop.is_set():
            try:
                result = ray.get(handles[i % len(handles)].retrieve.remote(queries, k))
                with lock:
                    results.append(result)
            except Exception as exc:  # recorded, asserted on below
                errors.append(exc)
                return
            i += 1

    threads = [threading.Thread(target=client, args=(t,), daemon=True) for t in range(4)]
    for t in threads:
        t.start()

    def wait_for(version: int) -> None:
        """Until some call made after this point has been answered by `version`."""
        with lock:
            seen = len(results)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not errors:
            with lock:
                if any(r.kb.version == version for r in results[seen:]):
                    return
            time.sleep(0.01)
        raise AssertionError(f"no answer from version {version}; errors: {errors}")

    try:
        wait_for(1)
        for version in (2, 3, 1, 2):
            staged = [a.stage.remote(kbs[version]) for a in handles]
            assert ray.get(staged) == [version] * len(handles)  # loaded while the searches go on
            ray.get([a.activate.remote(version) for a in handles])
            wait_for(version)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)

    assert not errors, errors
    observed = [check_result(r, queries, k, embeddings) for r in results]
    assert set(observed) == {1, 2, 3}
    assert min(ray.get([a.request_count.remote() for a in handles])) > 0  # both actors served


def test_stage_rejects_index_that_does_not_match_passages(kb_factory, actors, tmp_path):
    emb = random_embeddings(4)
    good = kb_factory(1, emb)
    other = kb_factory(2, emb)
    short_index = tmp_path / "short.faiss"
    faiss.write_index(build_faiss_index(emb[:-3], IndexConfig(index_type="flat")), str(short_index))
    bad = KBVersion(2, other.passages_path, str(short_index))

    (actor,) = actors(1)
    with pytest.raises(ray.exceptions.RayTaskError, match="short.faiss"):
        ray.get(actor.ensure_live.remote(bad))
    assert ray.get(actor.live_version.remote()) is None

    serve([actor], good)
    with pytest.raises(ray.exceptions.RayTaskError) as excinfo:
        ray.get(actor.stage.remote(bad))
    assert isinstance(excinfo.value.cause, ValueError)
    assert str(short_index) in str(excinfo.value)
    assert f"{N_PASSAGES - 3} vectors for {N_PASSAGES} passages" in str(excinfo.value)
    with pytest.raises(ray.exceptions.RayTaskError):
        ray.get(actor.activate.remote(2))  # nothing was staged
    assert ray.get(actor.live_version.remote()) == good


def ivf_kb_with_an_empty_list(tmp_path) -> tuple[KBVersion, np.ndarray, dict[str, np.ndarray]]:
    """A KB whose IVF index (nprobe 1) has three lists: rows 0-2 near centroid (10, 0, ...), the others near
    (-10, 0, ...), and none near (0, 10, ...). Queries: `few` probes the 3-row list, `none` the empty one."""
    centroids = np.zeros((3, DIM), np.float32)
    centroids[0, 0], centroids[1, 0], centroids[2, 1] = 10, -10, 10
    emb = np.random.default_rng(5).normal(0, 0.1, (N_PASSAGES, DIM)).astype(np.float32)
    emb[:3, 0] += 10
    emb[3:, 0] -= 10
    quantizer = faiss.IndexFlatL2(DIM)
    quantizer.add(centroids)
    index = faiss.IndexIVFFlat(quantizer, DIM, 3, faiss.METRIC_INNER_PRODUCT)
    index.is_trained = True  # the lists are the centroids above, not k-means'
    index.add(emb)
    index.nprobe = 1
    faiss.write_index(index, str(tmp_path / "ivf.faiss"))
    passages = Dataset.from_dict({"title": TITLES, "text": TEXTS})
    with_embeddings(passages, emb).save_to_disk(str(tmp_path / "passages"))
    kb = KBVersion(1, str(tmp_path / "passages"), str(tmp_path / "ivf.faiss"))
    return kb, emb, {"few": centroids[:1], "none": centroids[2:]}


def test_a_neighbour_faiss_misses_is_the_best_hit_everywhere_and_no_hit_at_all_is_an_error(tmp_path, actors):
    """One rule for FAISS's id -1 (kb.index.fill_misses), in the Ray actors and the in-process search alike: the
    question's best hit is repeated, never the last passage read through id -1; a question the index finds nothing
    for is refused by name instead of being answered with the last passage."""
    kb, emb, queries = ivf_kb_with_an_empty_list(tmp_path)
    found = exact_topk(queries["few"], emb[:3], 3)[0]  # the probed list holds rows 0-2 only
    want = np.concatenate([found, found[:1], found[:1]])[None]
    (actor,) = actors(1)
    serve([actor], kb)
    hits = ray.get(actor.retrieve.remote(queries["few"], 5))
    np.testing.assert_array_equal(hits.ids, want)
    np.testing.assert_array_equal(hits.embeddings, emb[want])
    check_docs(hits.docs, hits.ids)
    search = KBSearch(kb.passages_path, kb.index_path, DIM)
    stored, ids, docs = search.retrieve(queries["few"], 5)
    np.testing.assert_array_equal(ids, want)
    np.testing.assert_array_equal(stored, emb[want])
    assert docs == hits.docs
    assert search.retrieve(queries["few"], 5, embeddings=False)[0] is None

    with pytest.raises(ValueError, match="the index found no passage for question 0"):
        ray.get(actor.retrieve.remote(queries["none"], 2))
    with pytest.raises(ValueError, match="the index found no passage for question 1"):
        search.retrieve(np.concatenate([queries["few"], queries["none"]]), 2)


def test_fill_misses_repeats_the_best_hit_of_each_question():
    ids = np.array([[7, 3, -1, -1], [2, -1, -1, -1], [5, 6, 8, 9]])
    np.testing.assert_array_equal(fill_misses(ids), [[7, 3, 7, 7], [2, 2, 2, 2], [5, 6, 8, 9]])
    scores = np.array([[0.9, -np.inf], [0.5, 0.4]])  # a miss marked otherwise (a shard's -inf score)
    np.testing.assert_array_equal(fill_misses(scores, ~np.isfinite(scores)), [[0.9, 0.9], [0.5, 0.4]])
    with pytest.raises(ValueError, match="no passage for question 1"):
        fill_misses(np.array([[1, 2], [-1, -1]]))


# ----------------------------------------------------------------------------- RagRayDistributedRetriever


def test_rag_ray_retriever_end_to_end(kb_factory, actors):
    emb0, emb2 = random_embeddings(30), random_embeddings(32)
    kb0, kb2 = kb_factory(0, emb0), kb_factory(2, emb2)
    handles = actors.named(2)
    with pytest.raises(ValueError):
        RagRayDistributedRetriever([])
    retriever = RagRayDistributedRetriever(handles)

    assert retriever.init_retrieval(kb0) == 0
    assert retriever.live_kb == kb0
    assert [v.version for v in ray.get([a.live_version.remote() for a in handles])] == [0, 0]
    assert retriever.init_retrieval(kb2) == 0  # a live version is kept
    assert [v.version for v in ray.get([a.live_version.remote() for a in handles])] == [0, 0]

    rng = np.random.default_rng(33)
    queries = rng.standard_normal((3, DIM)).astype(np.float32)
    for _ in range(7):
        embeds, ids, docs = retriever.retrieve(queries, 2)
        np.testing.assert_array_equal(ids, exact_topk(queries, emb0, 2))
        np.testing.assert_array_equal(embeds, emb0[ids])
        check_docs(docs, ids)
    counts = ray.get([a.request_count.remote() for a in handles])
    assert sum(counts) == 7 and max(counts) - min(counts) <= 1
    assert retriever.last_version == 0

    assert ray.get(retriever.stage(kb2)) == [2, 2]
    retriever.activate(kb2)
    assert retriever.live_kb == kb2
    for _ in range(2):  # one call per actor
        embeds, ids, docs = retriever.retrieve(queries, 2)
        assert retriever.last_version == 2
        np.testing.assert_array_equal(ids, exact_topk(queries, emb2, 2))
        np.testing.assert_array_equal(embeds, emb2[ids])
        check_docs(docs, ids)
    # What recipes that re-encode the passages ask: the same ids and docs, no stored embeddings.
    embeds, ids, docs = retriever.retrieve(queries, 2, embeddings=False)
    assert embeds is None
    np.testing.assert_array_equal(ids, exact_topk(queries, emb2, 2))
    check_docs(docs, ids)
    assert all("embeddings" not in d for d in docs)

    # Another rank starts at another actor, so ranks interleave instead of all hitting actor 0 first.
    before = ray.get([a.request_count.remote() for a in handles])
    other_rank = RagRayDistributedRetriever(handles, rank=1)
    other_rank.retrieve(queries, 2)
    after = ray.get([a.request_count.remote() for a in handles])
    assert [b - a for a, b in zip(before, after)] == [0, 1]
    assert other_rank.last_version == 2
    assert other_rank.live_kb == kb2  # learnt from the answer
    assert retriever.actor_restarts == other_rank.actor_restarts == 0


def test_retrieval_actors_are_named_as_documented_within_their_namespace(ray_local):
    namespace = f"test_{uuid.uuid4().hex[:8]}"
    handles = start_retrieval_actors(2, namespace=namespace)
    try:
        found = ray.get_actor("retrieval_worker_1", namespace=namespace)
        assert found._actor_id == handles[1]._actor_id
        assert start_retrieval_actors(1, namespace=namespace)[0]._actor_id == handles[0]._actor_id  # attached
        with pytest.raises(ValueError):
            ray.get_actor("retrieval_worker_0", namespace=f"{namespace}-other")  # another run's namespace
    finally:
        for handle in handles:
            ray.kill(handle)


def test_local_ray_listens_on_loopback_only(ray_local):
    assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
    assert {node["NodeManagerAddress"] for node in ray.nodes()} == {"127.0.0.1"}


@ray.remote(num_cpus=0)
class _Niceness:
    def get(self) -> int:
        return os.nice(0)


def test_local_ray_workers_run_at_the_trainers_priority(ray_local):
    # At Ray's default niceness (15) the encoding actors starve behind a CPU-bound trainer.
    actor = _Niceness.remote()
    assert ray.get(actor.get.remote()) == os.nice(0)
    ray.kill(actor)


def test_actor_searches_with_its_thread_budget_not_rays_one(ray_local, kb_factory):
    # Ray starts a num_cpus=0 actor with OMP_NUM_THREADS=1, and OpenMP keeps the count per thread: set once in the
    # constructor, the calls (in the actor's thread pool) would still search on one core.
    class ThreadProbe(RetrievalActor):  # defined here so that Ray ships it by value to the worker
        def threads_after_retrieve(self, queries: np.ndarray) -> int:
            self.retrieve(queries, 2)
            return faiss.omp_get_max_threads()  # OpenMP's count for this call's thread

    kb = kb_factory(0, random_embeddings(0))
    handle = ray.remote(ThreadProbe).options(max_concurrency=2, num_cpus=0).remote(128, 3)
    try:
        ray.get(handle.ensure_live.remote(kb))
        assert ray.get([handle.threads_after_retrieve.remote(random_embeddings(1, 2)) for _ in range(4)]) == [3] * 4
    finally:
        ray.kill(handle)


def test_ray_can_start_again_after_shutdown_ray():
    # init_ray leaves its address for DDP children; after shutdown_ray a new init_ray must start a fresh Ray, not try
    # to join the stopped one (a bench run inside the test session once broke every later Ray test this way).
    script = (
        "import os, distributed_ray_retriever as d\n"
        "d.init_ray(None, 'a'); first = os.environ[d.RAY_ADDRESS_ENV]; d.shutdown_ray()\n"
        "assert d.RAY_ADDRESS_ENV not in os.environ\n"
        "d.init_ray(None, 'b'); assert os.environ[d.RAY_ADDRESS_ENV] != first; d.shutdown_ray()\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=Path(__file__).resolve().parents[1], timeout=300)


def test_retrieval_actors_import_no_torch():
    """A retrieval actor's process imports distributed_ray_retriever and never encodes: torch would add ~2.7 s of
    start-up and ~185 MB to every one of them."""
    code = "import sys, distributed_ray_retriever; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        check=True,
    )
    assert proc.stdout.strip() == "[]", proc.stdout
