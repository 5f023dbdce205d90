"""bench/bench_index.py on tiny KBs: its figures are well-formed, not what they are (timings are never asserted)."""

import json
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    import bench_index

    return bench_index


@pytest.fixture(autouse=True)
def one_faiss_thread(bench):
    """Tiny indexes build several times faster on one thread than with OpenMP threads waiting on a busy machine."""
    threads = bench.faiss.omp_get_max_threads()
    bench.faiss.omp_set_num_threads(1)
    yield
    bench.faiss.omp_set_num_threads(threads)


def test_placeholders(bench):
    assert [bench.ivf_lists(n) for n in (10_000, 100_000, 1_000_000)] == [512, 1024, 4096]
    assert [bench.pq_m(d) for d in (768, 384, 100)] == [96, 48, 10]
    cfg = bench.index_config(bench.DEFAULT_FACTORIES["IVF{nlist},PQ{m}np@nprobe=32"], 10_000, 384, 1000)
    assert (cfg.factory, cfg.search_params, cfg.train_size) == ("IVF512,PQ48np", "nprobe=32", 1000)
    specs = bench.parse_factories("hnsw; HNSW32,Flat@efSearch=64;")
    assert specs == {
        "hnsw": {"index_type": "hnsw", "search_params": None},
        "HNSW32,Flat@efSearch=64": {"factory": "HNSW32,Flat", "search_params": "efSearch=64"},
    }


def test_synthetic_kb(bench):
    kb, xq = bench.synthetic_kb(3000, 16, 20, seed=1)
    assert kb.shape == (3000, 16) and xq.shape == (20, 16) and kb.dtype == np.float32
    assert np.allclose(np.linalg.norm(kb, axis=1), 1, atol=1e-5)
    assert np.array_equal(kb, bench.synthetic_kb(3000, 16, 20, seed=1)[0])
    assert (xq @ kb.T).max() < 0.9999  # held out: no query is a KB row


def test_run_and_markdown(bench):
    factories = bench.parse_factories("Flat;HNSW32,Flat;IVF{nlist},Flat@nprobe=4")
    lines = []
    result = bench.run([500, 2000], 8, factories, queries=20, single=5, batches=2, max_build_s=1e9, log=lines.append)
    json.dumps(result)  # serialisable as it is
    rows = {(r["size"], r["factory"]): r for r in result["rows"]}
    assert len(rows) == 6 and all(r["status"] == "ok" for r in rows.values())
    assert rows[(500, "Flat")]["recall_at_10"] == 1.0
    assert rows[(2000, "IVF128,Flat")]["search_params"] == "nprobe=4"
    assert 0 < rows[(2000, "IVF128,Flat")]["recall_at_10"] <= 1
    assert rows[(2000, "Flat")]["bytes"] > 2000 * 8 * 4
    assert "estimated_build_s" in rows[(2000, "HNSW32,Flat")]  # scaled from the 500-vector build
    table = bench.markdown(result).splitlines()
    assert len(table) == 2 + 6 and table[0].startswith("| KB size | index |")
    assert lines[0].startswith("# bench_index")


def test_skips_a_build_estimated_too_long(bench):
    factories = bench.parse_factories("HNSW32,Flat")
    result = bench.run([300, 1000], 8, factories, queries=10, single=2, batches=1, max_build_s=1e-6, log=print)
    assert [r["status"] for r in result["rows"]] == ["ok", "skipped"]
    assert "skipped: estimated build" in bench.markdown(result)


def test_gpu_rows_side_by_side_or_skipped_with_the_reason(bench):
    factories = bench.parse_factories("Flat")
    gpu_factories = bench.parse_factories("Flat;IVF{nlist},Flat@nprobe=4;hnsw")
    lines = []
    result = bench.run(
        [800],
        8,
        factories,
        queries=20,
        single=3,
        batches=2,
        max_build_s=1e9,
        gpu_factories=gpu_factories,
        log=lines.append,
    )
    json.dumps(result)
    gpu, table = result["gpu"], bench.markdown(result)
    assert len(result["rows"]) == 1 and result["environment"]["faiss_gpus"] == bench.faiss_devices.visible_gpus()
    if not result["environment"]["faiss_gpus"]:  # faiss-cpu: one printed line says why, and no figures
        assert gpu["status"] == "skipped" and gpu["rows"] == []
        assert "has no GPU support" in gpu["reason"] or "sees no GPU" in gpu["reason"]
        assert f"GPU rows skipped: {gpu['reason']}" in lines and table.endswith(f"GPU rows skipped: {gpu['reason']}")
        return
    rows = {r["factory"]: r for r in gpu["rows"]}
    assert rows["--index_type hnsw"]["status"] == "skipped"  # faiss has no GPU HNSW
    for factory in ("Flat", "IVF128,Flat"):
        assert rows[factory]["status"] == "ok" and set(rows[factory]) >= {"cpu", "gpu"}
    assert rows["Flat"]["gpu"]["recall_at_10"] == rows["Flat"]["cpu"]["recall_at_10"] == 1.0
    assert "train s CPU / GPU" in table
