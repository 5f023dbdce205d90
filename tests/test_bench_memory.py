"""bench/bench_memory.py's helpers and report (no Ray), and the encoding actor's compact token ids it measures."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset, load_from_disk
from tiny_tokenizers import wordpiece_tokenizer
from transformers import DPRConfig, DPRContextEncoder

from rag_end2end.kb.encoding import ShardEncoder, encode_token_ids
from rag_end2end.kb.passages import tokenize_passages

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    import bench_memory

    return bench_memory


def test_memory_readings_of_this_process(bench, tmp_path):
    mem = bench.memory(os.getpid())
    assert set(mem) == set(bench.STATUS_FIELDS)
    assert mem["VmHWM"] >= mem["VmRSS"] > 0
    data = np.memmap(tmp_path / "blob", dtype=np.uint8, mode="w+", shape=(1 << 20,))
    data[:] = 1  # touch every page: all of it resident
    found = bench.mapped(os.getpid(), tmp_path)
    assert found["mappings"] == 1
    assert found["mapped_bytes"] == found["mapped_resident_bytes"] == 1 << 20
    assert bench.mapped(os.getpid(), tmp_path / "elsewhere")["mappings"] == 0
    del data
    assert bench.du(tmp_path) == 1 << 20


def test_synthetic_passages_and_embeddings(bench, tmp_path):
    text_bytes = bench.make_passages(tmp_path / "p", 120, seed=1)
    passages = load_from_disk(str(tmp_path / "p"))
    assert len(passages) == 120 and passages.column_names == ["title", "text"]
    assert all(len(t.split()) == bench.WORDS_PER_PASSAGE for t in passages["text"])
    assert text_bytes > 120 * bench.WORDS_PER_PASSAGE * 2
    emb = bench.unit_embeddings(7, 16, seed=1)
    assert emb.dtype == np.float32 and emb.shape == (7, 16)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)


def test_report_and_conclusion_from_a_result(bench):
    mib = bench.MIB
    idle = {"VmHWM": 400 * mib, "VmRSS": 400 * mib, "RssAnon": 300 * mib, "RssFile": 100 * mib, "RssShmem": 0}
    n, dim = 100_000, 768
    retrieval = {
        **idle,
        "VmHWM": 700 * mib,
        "VmRSS": 700 * mib,
        "RssAnon": 600 * mib,
        "idle": idle,
        "load_s": 0.1,
        "mapped_bytes": 370 * mib,
        "mapped_resident_bytes": 20 * mib,
        "mappings": 1,
    }
    builder = {
        "idle": idle,
        "peak": 1400 * mib,
        "after_rss": 500 * mib,
        "seconds": 4.0,
        "embeddings_bytes": n * dim * 4,
    }
    row = {
        "size": n,
        "dim": dim,
        "text_bytes": 80 * mib,
        "generate_s": 1.0,
        "load_average": 1.0,
        "indexes": {
            "Flat": {
                "builder": builder,
                "retrieval": retrieval,
                "disk": {"passages_bytes": 370 * mib, "index_bytes": 293 * mib},
            }
        },
        "encoder": {
            "rows": 50_000,
            "idle_rows": 4096,
            "tokens": 5_000_000,
            "idle": idle,
            "start_s": 1.0,
            "encode_s": 1.0,
            "tokenised": {**idle, "RssAnon": 320 * mib},
            "encoded": {**idle, "VmHWM": 450 * mib},
            "written": 50_000,
            "window": 65_536,
            "returned": {**idle, "VmHWM": 600 * mib},
            "returned_s": 1.0,
        },
    }
    params = {"sizes": [n], "dim": dim, "factories": ["Flat"], "machine_gib": 24.0, "reserve_gib": 6.0}
    result = {"params": params, "rows": [row], "driver_peak": 0}
    result["conclusion"] = bench.conclusion(result)
    flat = result["conclusion"]["indexes"]["Flat"]
    assert flat["retrieval_per_passage"] == pytest.approx(300 * mib / n)
    assert flat["serving_max"] == int((18 * 2**30 - 400 * mib) / (300 * mib / n))
    assert flat["binding_phase"] == "build"  # 1000 MiB of builder beats a second 300 MiB retrieval copy
    encoder = result["conclusion"]["encoder"]  # token ids a passage; its window of vectors is a fixed cost
    assert encoder["per_passage"] == pytest.approx(20 * mib / (50_000 - 4096))
    assert encoder["fixed"] == 450 * mib
    result["rows"].append({"size": 10**6, "dim": dim, "skipped": "the builder would peak at ~22 GiB"})
    table = bench.markdown(result)
    assert (
        table.count("\n") == 1 + 7
        and "passages mmapped, 20 of 370 MiB resident" in table
        and "skipped: the builder" in table
    )
    assert "Largest KB" in bench.conclusion_text(result)


def test_fit_separates_per_passage_bytes_from_fixed_ones(bench):
    assert bench.fit([(100, 5000.0)]) == (50.0, 0.0)
    slope, fixed = bench.fit([(100, 1500.0), (300, 3500.0)])
    assert slope == pytest.approx(10.0) and fixed == pytest.approx(500.0)


@pytest.fixture
def kb(tmp_path):
    rng = np.random.default_rng(3)
    words = "the cat sat on a mat while paris stayed the capital of france and rome was founded".split()
    texts = [" ".join(rng.choice(words, size=int(rng.integers(1, 60)))) for _ in range(40)]
    titles = [" ".join(rng.choice(words, size=int(rng.integers(1, 4)))) for _ in range(40)]
    emb = rng.standard_normal((40, 8)).astype(np.float32)
    path = tmp_path / "kb"
    Dataset.from_dict({"title": titles, "text": texts, "embeddings": list(emb)}).save_to_disk(str(path))
    return path, titles, texts


def test_shard_encoder_keeps_its_token_ids_compact_and_encodes_as_from_lists(kb, monkeypatch):
    path, titles, texts = kb
    tokenizer = wordpiece_tokenizer(texts, vocab_size=120)
    torch.manual_seed(0)
    config = DPRConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=128,
    )
    encoder = DPRContextEncoder(config)
    monkeypatch.setattr(ShardEncoder, "TOKENIZE_CHUNK", 7)  # several chunks, the last one short
    shard = ShardEncoder(str(path), 3, 33, tokenizer, DPRContextEncoder, config)

    expected = tokenize_passages(tokenizer, titles[3:33], texts[3:33])
    assert shard.token_ids.dtype == np.int32 and shard.token_ids.ndim == 1
    assert len(shard.offsets) == 31 and shard.offsets[0] == 0 and shard.offsets[-1] == len(shard.token_ids)
    got = [shard.token_ids[a:b].tolist() for a, b in zip(shard.offsets, shard.offsets[1:])]
    assert got == expected
    out = shard.encode(encoder.state_dict(), batch_size=4)
    lists = encode_token_ids(encoder, expected, tokenizer.pad_token_id, batch_size=4, progress=False)
    np.testing.assert_array_equal(out, lists)  # the same batches, so the very same floats


def test_encode_token_ids_takes_the_flat_form():
    torch.manual_seed(0)
    encoder = DPRContextEncoder(
        DPRConfig(
            vocab_size=50,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=32,
        )
    )
    lists = [[2, 7, 9, 3], [2, 3], [2, 11, 12, 13, 14, 3], [2, 5, 3]]
    flat = np.array([t for ids in lists for t in ids], dtype=np.int32)
    offsets = np.cumsum([0, *map(len, lists)])
    a = encode_token_ids(encoder, lists, 0, batch_size=2, progress=False)
    b = encode_token_ids(encoder, flat, 0, batch_size=2, progress=False, offsets=offsets)
    np.testing.assert_array_equal(a, b)


def test_a_partial_refreshs_encoder_holds_one_window_of_vectors(tmp_path):
    """encode_rows_to (a partial refresh's encoding actor, run in-process) writes each window of its rows into the
    .npy file as it goes: the vectors are encode()'s rows, and numpy's peak during the call (tracemalloc: the memory
    map is not counted, torch's activations are not numpy's) stays under half the rows' vectors; gathering every
    window and saving once held them twice."""
    import tracemalloc

    rng = np.random.default_rng(5)
    words = "the cat sat on a mat while paris stayed the capital of france and rome was founded".split()
    n = 1600
    texts = [" ".join(rng.choice(words, size=int(rng.integers(1, 12)))) for _ in range(n)]
    path = tmp_path / "kb"
    Dataset.from_dict({"title": ["t"] * n, "text": texts}).save_to_disk(str(path))
    tokenizer = wordpiece_tokenizer(texts, vocab_size=120)
    torch.manual_seed(0)
    config = DPRConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    encoder = DPRContextEncoder(config)
    shard = ShardEncoder(str(path), 0, n, tokenizer, DPRContextEncoder, config)
    shard.ENCODE_WINDOW = 50
    rows = np.flatnonzero(np.arange(n) % 7 != 3)  # gaps: each window its own rows
    out = tmp_path / "encoded" / "rows-00000.npy"
    tracemalloc.start()
    try:
        assert shard.encode_rows_to(encoder.state_dict(), rows, str(out), batch_size=16) == len(rows)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    expected = shard.encode(encoder.state_dict(), batch_size=16)[rows]
    np.testing.assert_allclose(np.load(out), expected, atol=1e-5)
    assert peak < expected.nbytes / 2, f"peak {peak:,} B for {expected.nbytes:,} B of vectors"
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temporary left
