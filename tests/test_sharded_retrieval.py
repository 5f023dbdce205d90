"""Tests for sharded retrieval (--index_shards) on a real local Ray with real FAISS: the merged top-k equals one
exact index over all passages, no answer mixes two KB versions while versions are swapped under it, and a
killed shard comes back."""

import contextlib
import logging
import os
import signal
import threading
import time
import uuid

import numpy as np
import pytest
import ray
from datasets import Dataset, load_from_disk
from faults import actor_pid

from rag_end2end.kb.actors import start_shard_actors
from rag_end2end.kb.index import IndexConfig, build_faiss_index
from rag_end2end.kb.passages import shard_bounds
from rag_end2end.kb.retriever import ShardedRetriever, merge_shard_answers
from rag_end2end.kb.search import Hits
from rag_end2end.kb.versions import KBVersion, build_kb_version
from rag_end2end.training import finetune as finetune_rag
from rag_end2end.training.callbacks import KBRefreshCallback

N_PASSAGES, DIM, N_SHARDS = 200, 16, 3
FLAT = IndexConfig(index_type="flat")


class Versions:
    """KB versions whose passages name their version (text `v<N> passage <i>`), with embeddings per version."""

    def __init__(self, root):
        self.root = root
        self.embeddings: dict[int, np.ndarray] = {}
        self.kbs: dict[int, KBVersion] = {}

    def make(self, version: int, embeddings: np.ndarray | None = None) -> KBVersion:
        if embeddings is None:
            embeddings = np.random.default_rng(version).standard_normal((N_PASSAGES, DIM)).astype(np.float32)
        base = self.root / f"base{version}"
        texts = [f"v{version} passage {i}" for i in range(N_PASSAGES)]
        Dataset.from_dict({"title": [f"t{i}" for i in range(N_PASSAGES)], "text": texts}).save_to_disk(str(base))
        kb = build_kb_version(str(base), str(self.root / "kb"), version, 0, FLAT, "dot", embeddings)
        self.embeddings[version], self.kbs[version] = embeddings, kb
        return kb


@pytest.fixture(scope="module")
def versions(tmp_path_factory) -> Versions:
    return Versions(tmp_path_factory.mktemp("sharded"))


@pytest.fixture(scope="module")
def shards(ray_local):
    handles = start_shard_actors(N_SHARDS, FLAT, namespace=f"test_{uuid.uuid4().hex[:8]}")
    yield handles
    for handle in handles:
        ray.kill(handle)


def queries(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)


def check_answer(versions: Versions, answer: Hits, q: np.ndarray, k: int) -> int:
    """One search() answer is exact over the version it names, and every passage comes from that version."""
    kb = answer.kb
    emb = versions.embeddings[kb.version]
    want_scores, want_ids = build_faiss_index(emb, FLAT).search(q, k)  # unsharded exact search, in this process
    np.testing.assert_array_equal(answer.ids, want_ids)
    np.testing.assert_allclose(answer.scores, want_scores, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(answer.embeddings, emb[answer.ids])
    assert [d["text"] for d in answer.docs] == [[f"v{kb.version} passage {i}" for i in row] for row in answer.ids]
    return kb.version


def test_sharded_topk_equals_one_exact_index(versions, shards):
    kb = versions.make(1)
    retriever = ShardedRetriever(shards)
    assert retriever.init_retrieval(kb) == 1
    for seed, k in enumerate([1, 5, 10, 70]):  # 70: more than a shard holds (67), so shards pad with misses
        q = queries(seed, 50)
        assert check_answer(versions, retriever.search(q, k), q, k) == 1
    embeds, ids, docs = retriever.retrieve(q, 4)  # what RagModel calls
    assert ids.shape == (50, 4) and embeds.shape == (50, 4, DIM) and len(docs) == 50
    no_embeds, same_ids, same_docs = retriever.retrieve(q, 4, embeddings=False)
    assert no_embeds is None and same_docs == docs
    np.testing.assert_array_equal(same_ids, ids)
    assert retriever.live_kb == kb and retriever.last_version == 1
    counts = ray.get([s.request_count.remote() for s in shards])
    assert min(counts) >= 5  # every query went to every shard
    with pytest.raises(NotImplementedError, match="ShardedRetriever merges"):  # a shard's top-k is not an answer
        ray.get(shards[0].retrieve.remote(q, 2))


def test_the_merge_fills_what_no_shard_found_with_the_best_hit():
    """Shards mark a miss with a -inf score (it names one of their rows): the merge ranks misses last and fills
    those left in the top k as one index's search does (kb.index.fill_misses); no hit at all is an error."""
    kb = KBVersion(1, "passages", "index")

    def part(scores: list[float], ids: list[int]) -> Hits:
        docs = [{"title": [f"t{i}" for i in ids]}]
        return Hits(np.array([ids]), None, docs, kb, np.array([scores], dtype=np.float32))

    merged = merge_shard_answers([part([0.5, -np.inf], [0, 0]), part([0.9, -np.inf], [10, 10])], 3)
    np.testing.assert_array_equal(merged.ids, [[10, 0, 10]])
    np.testing.assert_array_equal(merged.scores, np.array([[0.9, 0.5, 0.9]], dtype=np.float32))
    assert merged.docs == [{"title": ["t10", "t0", "t10"]}] and merged.kb == kb and merged.embeddings is None
    with pytest.raises(ValueError, match="no passage for question 0"):
        merge_shard_answers([part([-np.inf], [0]), part([-np.inf], [10])], 2)


def test_ties_go_to_the_lower_global_id(versions, shards):
    """Integer vectors score exactly, so rows that repeat across shards tie: the lower row comes first."""
    rng = np.random.default_rng(7)
    emb = rng.integers(-2, 3, (N_PASSAGES, DIM)).astype(np.float32)
    first, second, third = shard_bounds(N_PASSAGES, N_SHARDS)
    emb[second[0] : second[0] + 30] = emb[:30]  # each of rows 0-29 is also in shard 1 and 2
    emb[third[0] : third[0] + 30] = emb[:30]
    kb = versions.make(2, emb)
    ray.get(ShardedRetriever(shards).stage(kb))
    retriever = ShardedRetriever(shards)
    retriever.activate(kb)
    q = rng.integers(-2, 3, (40, DIM)).astype(np.float32)
    answer = retriever.search(q, 12)
    scores, ids = answer.scores, answer.ids
    assert answer.kb == kb
    exact = q.astype(np.int64) @ emb.astype(np.int64).T
    order = np.lexsort((np.broadcast_to(np.arange(N_PASSAGES), exact.shape), -exact), axis=1)[:, :12]
    np.testing.assert_array_equal(ids, order)
    np.testing.assert_array_equal(scores, np.take_along_axis(exact, order, 1))


def test_shards_half_way_through_an_activation_answer_from_one_version(versions, shards):
    """Shard 0 already serves the new version, the others still the old one: they answer from the new one."""
    old, new = versions.make(3), versions.make(4)
    retriever = ShardedRetriever(shards)
    ray.get(retriever.stage(old))
    retriever.activate(old)
    ray.get(retriever.stage(new))
    ray.get(shards[0].activate.remote(new.version))  # the activation has reached one shard so far
    q = queries(30, 8)
    assert check_answer(versions, retriever.search(q, 6), q, 6) == new.version
    retriever.activate(new)
    assert check_answer(versions, retriever.search(q, 6), q, 6) == new.version


def test_swaps_racing_queries_never_mix_versions(versions, shards):
    kbs = [versions.make(v) for v in range(10, 16)]
    admin = ShardedRetriever(shards)  # stages and activates, as rank 0's Refresher does
    ray.get(admin.stage(kbs[0]))
    admin.activate(kbs[0])
    answers, errors, stop = [], [], threading.Event()
    q, k = queries(40, 6), 8

    def client() -> None:
        retriever = ShardedRetriever(shards, rank=1)  # another rank's retriever
        try:
            while not stop.is_set():
                answers.append(retriever.search(q, k))
        except Exception as exc:  # asserted on below
            errors.append(exc)

    thread = threading.Thread(target=client, daemon=True)
    thread.start()
    try:
        for kb in kbs[1:]:
            for ref in admin.stage(kb):
                ray.get(ref)
            served = len(answers)
            admin.activate(kb)
            while len(answers) < served + 3 and not errors and thread.is_alive():  # some queries on each version
                stop.wait(0.01)
    finally:
        stop.set()
        thread.join(timeout=30)
    assert not errors, errors
    seen = [check_answer(versions, answer, q, k) for answer in answers]
    assert seen == sorted(seen), "a later answer came from an older version"
    assert set(seen) >= {kbs[-1].version} and len(set(seen)) >= 4


def test_a_killed_shard_is_restarted_and_queries_go_on(versions, shards):
    old, new = versions.make(20), versions.make(21)
    admin = ShardedRetriever(shards)
    ray.get(admin.stage(old))
    admin.activate(old)
    ray.get(admin.stage(new))
    admin.activate(new)
    # A rank that has only seen the old version: the restarted shard first loads that one, finds the other
    # shards serve the new one, and loads the new one too.
    stale = ShardedRetriever(shards, rank=1)
    stale.live_kb = old
    ray.kill(shards[1], no_restart=False)
    q = queries(50, 10)
    for _ in range(3):
        assert check_answer(versions, stale.search(q, 5), q, 5) == new.version
    assert stale.actor_restarts >= 1
    assert [v.version for v in ray.get([s.live_version.remote() for s in shards])] == [new.version] * N_SHARDS


def test_a_stopped_shard_is_restarted_after_the_timeout(versions, shards, caplog):
    """SIGSTOP freezes a shard without killing it: the fan-out gets no answer in the timeout, the stopped shard
    (only it) is restarted, and the query is answered exactly, with a log line."""
    kb = versions.make(30)
    admin = ShardedRetriever(shards)
    ray.get(admin.stage(kb))
    admin.activate(kb)
    retriever = ShardedRetriever(shards, timeout_s=3)
    retriever.live_kb = kb
    pids = [actor_pid(s) for s in shards]
    os.kill(pids[2], signal.SIGSTOP)
    q = queries(60, 4)
    try:
        with caplog.at_level(logging.WARNING, logger="distributed_ray_retriever"):
            start = time.monotonic()
            assert check_answer(versions, retriever.search(q, 5), q, 5) == kb.version
            elapsed = time.monotonic() - start
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pids[2], signal.SIGCONT)
    assert 3 <= elapsed < 60 and retriever.timeouts == 1
    assert "retrieval actor 2 gave no answer in 3 s" in caplog.text
    assert [actor_pid(s) for s in shards][:2] == pids[:2] and actor_pid(shards[2]) != pids[2]


def test_training_with_index_shards_refreshes_every_shard(ray_local, finetune_argv):
    """finetune_rag.py with --index_shards 2: end-to-end training whose refreshes reach both shards, and
    retrieval that is exact over the newest version's embeddings."""
    argv = finetune_argv(
        "--index_shards",
        "2",
        "--end2end",
        "--indexing_freq",
        "2",
        "--do_train",
        "--max_steps",
        "4",
        "--num_sanity_val_steps",
        "0",
        "--keep_kb_versions",
        "0",
    )
    module = finetune_rag.main(finetune_rag.parse_args(argv))
    try:
        refresh = next(c for c in module.trainer.callbacks if isinstance(c, KBRefreshCallback))
        assert isinstance(module.retriever, ShardedRetriever) and len(module.retriever.actors) == 2
        assert refresh.history and module.kb.version == refresh.history[-1]["version"] >= 1
        emb = np.array(load_from_disk(module.kb.passages_path)["embeddings"][:], dtype=np.float32)
        q = np.random.default_rng(7).standard_normal((4, emb.shape[1])).astype(np.float32)
        _, ids, docs = module.retriever.retrieve(q, 3)
        assert module.retriever.last_version == module.kb.version
        np.testing.assert_array_equal(ids, np.argsort(-(q @ emb.T), axis=1, kind="stable")[:, :3])
    finally:
        for actor in module.retriever.actors:
            ray.kill(actor)
