"""bench/bench_retrieval.py on a tiny KB: its figures are well-formed, not what they are (timings are never
asserted), and the Ray path answers what the in-process one does."""

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    import bench_retrieval

    return bench_retrieval


def test_main_writes_one_row_per_size_and_index(bench, ray_local, tmp_path, monkeypatch, capsys):
    # ray_local: the bench joins the session's Ray (and leaves it running) instead of starting one of its own
    out, work = tmp_path / "retrieval.json", tmp_path / "mine"
    work.mkdir()
    (work / "keep.txt").write_text("the user's")
    argv = [
        "bench_retrieval.py",
        "--sizes",
        "300",
        "--dim",
        "16",
        "--calls",
        "20",
        "--warmup",
        "3",
        "--indexes",
        "flat,hnsw",
        "--threads",
        "1",
        "--workdir",
        str(work),
        "--json",
        str(out),
    ]
    monkeypatch.setattr(sys, "argv", argv)
    bench.main()
    printed = capsys.readouterr().out
    assert printed.startswith("# bench_retrieval")

    result = json.loads(out.read_text())
    assert result["bench"] == "retrieval" and result["params"]["threads"] == 1
    assert result["noop"]["p95_ms"] >= result["noop"]["p50_ms"] > 0
    rows = {(r["size"], r["index"]): r for r in result["rows"]}
    assert sorted(rows) == [(300, "flat"), (300, "hnsw")] and len(result["rows"]) == 2
    for r in rows.values():
        assert r["same_ids"] is True  # Ray and in process: the same top-k for the same queries
        assert r["local_p95_ms"] >= r["local_p50_ms"] > 0 and r["ray_p95_ms"] >= r["ray_p50_ms"] > 0
        assert r["ratio_p50"] == pytest.approx(r["ray_p50_ms"] / r["local_p50_ms"])
        assert r["overhead_p50_ms"] == pytest.approx(r["ray_p50_ms"] - r["local_p50_ms"])
        assert r["ratio_texts_p50"] == pytest.approx(r["ray_texts_p50_ms"] / r["local_texts_p50_ms"])
        assert r["local_texts_p95_ms"] >= r["local_texts_p50_ms"] > 0
        assert r["calls"] == 20 and r["dim"] == 16

    table = bench.markdown(result)
    assert table.count("\n| 300 x 16 |") == 2 and "No-op actor call" in table
    assert table in printed
    assert sorted(p.name for p in work.iterdir()) == ["keep.txt"]  # only what the bench wrote is gone


def test_refuses_a_kb_directory_it_did_not_write(bench, tmp_path):
    (tmp_path / "kb-300x16").mkdir()
    with pytest.raises(FileExistsError, match="kb-300x16"):
        bench.run([300], 16, workdir=str(tmp_path), log=print)
    assert (tmp_path / "kb-300x16").is_dir()
