"""FAISS on GPUs against FAISS on CPU: searches of a GPU copy (faiss_devices.to_gpu), IVF/PQ training with its
k-means on the GPU (faiss_devices.train_index), a retrieval actor that loads its index onto the GPU, and the
benchmark's GPU rows. Skipped without a GPU faiss (faiss-gpu in place of faiss-cpu, docs/large-kbs.md) and a CUDA
device; the CPU side of the same rules is tested in test_kb_encode_utils.py."""

import faiss
import numpy as np
import pytest

from rag_end2end.kb import faiss_devices
from rag_end2end.kb.actors import RetrievalActor
from rag_end2end.kb.index import IndexConfig, build_faiss_index
from rag_end2end.kb.parts import with_embeddings
from rag_end2end.kb.passages import split_documents
from rag_end2end.kb.versions import KBVersion, save_kb

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(faiss_devices.visible_gpus() == 0, reason="needs a GPU faiss (faiss-gpu) and a CUDA device"),
]


def clustered(n: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n unit vectors around 32 centres, and 50 held-out queries near KB rows."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((32, dim)).astype(np.float32)
    x = centres[rng.integers(0, 32, n)] + 0.3 * rng.standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    queries = x[rng.choice(n, 50, replace=False)] + 0.05 * rng.standard_normal((50, dim)).astype(np.float32)
    return x, queries


def exact(queries: np.ndarray, x: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-(queries @ x.T), axis=1, kind="stable")[:, :k]


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float((found[:, :, None] == truth[:, None, :]).any(axis=2).mean())


@pytest.mark.parametrize("mode", ["auto", "replicate", "shard"])
def test_flat_search_on_gpu_gives_the_cpu_answers(mode):
    x, queries = clustered(20_000, 64, 0)
    index = build_faiss_index(x, IndexConfig(index_type="flat", faiss_gpu=mode))
    gpu = faiss_devices.to_gpu(index, mode)
    assert gpu is not index and index.ntotal == gpu.ntotal == 20_000
    (cpu_scores, cpu_ids), (gpu_scores, gpu_ids) = index.search(queries, 10), gpu.search(queries, 10)
    np.testing.assert_allclose(gpu_scores, cpu_scores, rtol=1e-4, atol=1e-4)
    assert (gpu_ids == cpu_ids).mean() > 0.99  # ties in float32 may swap a neighbour


def test_hnsw_stays_on_cpu():
    x, _ = clustered(2000, 32, 1)
    index = build_faiss_index(x, IndexConfig(index_type="hnsw", hnsw_m=8))
    assert faiss_devices.to_gpu(index, "replicate") is index


@pytest.mark.parametrize(
    ("factory", "params"),
    [("IVF256,Flat", "nprobe=256"), ("IVF256,PQ16np", "nprobe=32"), ("IVF64,PQ96np", "nprobe=16")],
)
def test_ivf_trained_on_gpu_is_a_cpu_index_that_searches_like_cpu_training(factory, params, tmp_path):
    dim = 96 if "PQ96" in factory else 64
    x, queries = clustered(30_000, dim, 2)
    truth = exact(queries, x, 10)
    built = {}
    for mode in ("off", "auto"):
        cfg = IndexConfig(factory=factory, train_size=20_000, search_params=params, faiss_gpu=mode)
        built[mode] = build_faiss_index(x, cfg)
    cpu, gpu_trained = built["off"], built["auto"]
    assert type(faiss.downcast_index(gpu_trained)) is type(faiss.downcast_index(cpu))  # stored as a CPU index
    faiss.write_index(gpu_trained, str(tmp_path / "gpu.faiss"))
    reread = faiss.read_index(str(tmp_path / "gpu.faiss"))
    assert faiss.extract_index_ivf(gpu_trained).clustering_index is None  # no pointer to a freed GPU index
    assert faiss.extract_index_ivf(reread).nprobe == faiss.extract_index_ivf(cpu).nprobe
    r_cpu, r_gpu = recall(cpu.search(queries, 10)[1], truth), recall(reread.search(queries, 10)[1], truth)
    assert r_gpu >= r_cpu - 0.05, (r_cpu, r_gpu)
    if params == "nprobe=256":  # every list searched: both exact
        assert r_cpu == r_gpu == 1.0
    # and searched on the GPU: the same neighbours as the CPU search of the same index
    on_gpu = faiss_devices.to_gpu(reread, "auto")
    assert on_gpu is not reread
    agree = recall(on_gpu.search(queries, 10)[1], reread.search(queries, 10)[1])
    assert agree > 0.95, agree


def test_retrieval_actor_searches_its_index_on_the_gpu(tmp_path):
    x, queries = clustered(3000, 32, 3)
    passages = split_documents([(f"t{i}", f"passage {i}") for i in range(3000)])
    save_kb(with_embeddings(passages, x), tmp_path / "p", tmp_path / "i.faiss", IndexConfig(index_type="flat"))
    kb = KBVersion(0, str(tmp_path / "p"), str(tmp_path / "i.faiss"))
    answers = {}
    for mode in ("off", "auto"):
        actor = RetrievalActor(faiss_gpu=mode)
        actor.ensure_live(kb)
        assert actor._live.on_gpu == (mode == "auto")
        hits = actor.retrieve(queries, 5, embeddings=True)
        answers[mode] = (hits.ids, hits.embeddings)
    assert (answers["auto"][0] == answers["off"][0]).mean() > 0.99
    # the stored vectors of the passages found, read from the passages (the same rows: the same vectors)
    same = answers["auto"][0] == answers["off"][0]
    np.testing.assert_array_equal(answers["auto"][1][same], answers["off"][1][same])


def test_bench_gpu_rows_measure_both_sides():
    import bench_index as bench

    gpu_factories = bench.parse_factories("Flat;IVF{nlist},Flat@nprobe=16")
    result = bench.run(
        [5000],
        32,
        bench.parse_factories("Flat"),
        queries=50,
        single=10,
        batches=3,
        gpu_factories=gpu_factories,
        log=print,
    )
    rows = result["gpu"]["rows"]
    assert result["gpu"]["status"] == "ok" and [r["status"] for r in rows] == ["ok", "ok"]
    assert rows[0]["gpu"]["recall_at_10"] == rows[0]["cpu"]["recall_at_10"] == 1.0
    assert rows[1]["gpu"]["train_s"] > 0 and rows[1]["cpu"]["train_s"] > 0
