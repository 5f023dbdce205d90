"""Tests for kb_encode_utils: passages, CSV reading, embeddings columns, FAISS indexes, KB versions, encoding."""

import json

import faiss
import numpy as np
import pytest
import torch
from datasets import Dataset, load_from_disk
from transformers import DPRConfig, DPRContextEncoder

from rag_end2end.data.readers import read_kb_csv
from rag_end2end.kb import faiss_devices
from rag_end2end.kb import parts as kb_parts
from rag_end2end.kb.encoding import encode_token_ids
from rag_end2end.kb.index import IndexConfig, build_faiss_index
from rag_end2end.kb.parts import part_path, with_embeddings, write_passages_part
from rag_end2end.kb.passages import shard_bounds, split_documents, split_text
from rag_end2end.kb.similarity import check_kb_similarity, kb_similarity, write_kb_info
from rag_end2end.kb.versions import (
    READY_MARKER,
    KBVersion,
    build_kb_version,
    list_versions,
    publish_kb_version,
    read_version,
    save_kb,
    staging_dir,
    version_dir,
)


def words(n: int, stem: str = "w") -> list[str]:
    return [f"{stem}{i}" for i in range(n)]


def exact_topk(queries: np.ndarray, embeddings: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = queries.astype(np.float64) @ embeddings.astype(np.float64).T
    ids = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return ids, np.take_along_axis(scores, ids, axis=1)


def passages_dataset(n: int) -> Dataset:
    return Dataset.from_dict(
        {"title": [f"title {i}" for i in range(n)], "text": [f"text of passage {i}" for i in range(n)]}
    )


# ----------------------------------------------------------------------------- passages


def test_split_text_makes_100_word_passages_in_order():
    text_words = words(250)
    passages = split_text(" ".join(text_words))
    assert [len(p.split(" ")) for p in passages] == [100, 100, 50]
    assert passages[0].split(" ") == text_words[:100]
    assert " ".join(passages).split(" ") == text_words


def test_split_text_exact_multiple_and_custom_size():
    assert [len(p.split()) for p in split_text(" ".join(words(200)))] == [100, 100]
    assert split_text("a b c d e", n=2) == ["a b", "c d", "e"]


def test_split_documents_keeps_title_per_passage():
    a, b = words(150, "a"), words(30, "b")
    ds = split_documents([("Title A", " ".join(a)), ("Title B", " ".join(b))])
    assert ds["title"] == ["Title A", "Title A", "Title B"]
    assert ds["text"] == [" ".join(a[:100]), " ".join(a[100:]), " ".join(b)]


# ----------------------------------------------------------------------------- CSV


def write(tmp_path, content: str, name: str = "kb.tsv"):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "content, line, fragment",
    [
        ("t1\tone\nt2\ttwo\textra\n", 2, "found 3"),
        ("t1\tone\nt2\ttwo\nonly-one-field\n", 3, "found 1"),
        ("t1\tone\n\nt2\ttwo\n", 2, "empty line"),
        ("t1\tone\nt2\ttwo\nt3\t   \n", 3, "`text`"),
        ('t1\t"spans\ntwo lines"\nbad\n', 3, "found 1"),  # line numbers count physical lines
    ],
    ids=["three-fields", "one-field", "empty-line", "empty-text", "after-multiline-field"],
)
def test_read_kb_csv_errors_name_file_and_line(tmp_path, content, line, fragment):
    path = write(tmp_path, content)
    with pytest.raises(ValueError) as excinfo:
        read_kb_csv(path)
    message = str(excinfo.value)
    assert f"{path}:{line}:" in message
    assert fragment in message


def test_read_kb_csv_quoted_fields_with_tabs(tmp_path):
    path = write(tmp_path, '"a\ttitle"\t"text with\ta tab"\nplain\t  padded text  \n')
    assert read_kb_csv(str(path)) == [("a\ttitle", "text with\ta tab"), ("plain", "padded text")]


def test_read_kb_csv_missing_and_empty_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.tsv"):
        read_kb_csv(tmp_path / "missing.tsv")
    with pytest.raises(ValueError, match="no documents"):
        read_kb_csv(write(tmp_path, ""))


# ----------------------------------------------------------------------------- embeddings column


def stored_embeddings(ds: Dataset) -> np.ndarray:
    return np.asarray(ds.with_format("numpy")["embeddings"])


def test_with_embeddings_round_trips_exactly():
    rng = np.random.default_rng(0)
    ds = passages_dataset(7).add_column("extra", list(range(7)))
    emb = rng.standard_normal((7, 5)).astype(np.float32)
    out = with_embeddings(ds, emb)
    assert out.column_names == ["title", "text", "embeddings"]
    assert out["title"] == ds["title"]
    np.testing.assert_array_equal(stored_embeddings(out), emb)


@pytest.mark.parametrize("rows", [[5, 0, 3], range(2, 6)], ids=["indices-mapping", "contiguous-slice"])
def test_with_embeddings_on_selected_view(rows):
    rng = np.random.default_rng(1)
    view = passages_dataset(8).select(rows)
    emb = rng.standard_normal((len(view), 4)).astype(np.float32)
    out = with_embeddings(view, emb)
    assert out["title"] == [f"title {i}" for i in rows]
    assert out["text"] == [f"text of passage {i}" for i in rows]
    np.testing.assert_array_equal(stored_embeddings(out), emb)


def test_with_embeddings_rejects_length_mismatch():
    with pytest.raises(ValueError, match="3 passages but 4 embeddings"):
        with_embeddings(passages_dataset(3), np.zeros((4, 2), dtype=np.float32))


# ----------------------------------------------------------------------------- FAISS


def test_flat_index_returns_exact_inner_product_topk():
    rng = np.random.default_rng(2)
    emb = rng.standard_normal((200, 16)).astype(np.float32)
    queries = rng.standard_normal((6, 16)).astype(np.float32)
    index = build_faiss_index(emb, IndexConfig(index_type="flat"))
    assert index.ntotal == 200
    scores, ids = index.search(queries, 5)
    want_ids, want_scores = exact_topk(queries, emb, 5)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-5)


def test_hnsw_index_top1_matches_exact_on_small_set():
    rng = np.random.default_rng(3)
    emb = rng.standard_normal((150, 8)).astype(np.float32)
    queries = rng.standard_normal((20, 8)).astype(np.float32)
    cfg = IndexConfig(index_type="hnsw", hnsw_m=16, ef_construction=200, ef_search=256)
    index = build_faiss_index(emb, cfg)
    assert index.ntotal == 150 and index.hnsw.efSearch == 256
    _, ids = index.search(queries, 1)
    np.testing.assert_array_equal(ids[:, 0], exact_topk(queries, emb, 1)[0][:, 0])


def test_unknown_index_type_is_rejected():
    with pytest.raises(ValueError, match="ivf"):
        build_faiss_index(np.zeros((2, 2), dtype=np.float32), IndexConfig(index_type="ivf"))


def test_factory_ivf_index_is_trained_and_keeps_its_search_params(tmp_path):
    rng = np.random.default_rng(4)
    centres = rng.standard_normal((8, 16)).astype(np.float32)
    emb = (centres[rng.integers(0, 8, 2000)] + 0.1 * rng.standard_normal((2000, 16))).astype(np.float32)
    queries = emb[rng.choice(2000, 50, replace=False)]
    cfg = IndexConfig(factory="IVF8,Flat", train_size=500, search_params="nprobe=8")
    index = build_faiss_index(emb, cfg)
    assert index.is_trained and index.ntotal == 2000
    faiss.write_index(index, str(tmp_path / "ivf.faiss"))
    reread = faiss.read_index(str(tmp_path / "ivf.faiss"))
    assert faiss.extract_index_ivf(reread).nprobe == 8  # every list searched: exact
    _, ids = reread.search(queries, 5)
    np.testing.assert_array_equal(ids, exact_topk(queries, emb, 5)[0])


def test_factory_pq_index_finds_most_exact_neighbours():
    rng = np.random.default_rng(5)
    emb = rng.standard_normal((3000, 32)).astype(np.float32)
    queries = emb[:40] + 0.01 * rng.standard_normal((40, 32)).astype(np.float32)
    index = build_faiss_index(emb, IndexConfig(factory="PQ8x6"))
    _, ids = index.search(queries, 1)
    assert (ids[:, 0] == np.arange(40)).mean() >= 0.8  # compressed 16x, near-duplicates still found first


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        (IndexConfig(factory="NotAnIndex12"), "not a FAISS factory string"),
        (IndexConfig(factory="IVF512,Flat"), "IVF14,Flat"),
        (IndexConfig(factory="IVF4,Flat", search_params="efSearch=3"), "do not apply"),
    ],
)
def test_factory_errors_say_what_to_change(cfg, message):
    emb = np.random.default_rng(6).standard_normal((200, 8)).astype(np.float32)
    with pytest.raises(ValueError, match=message):
        build_faiss_index(emb, cfg)


# ----------------------------------------------------------------------------- FAISS on GPUs, with a CPU faiss
# (tests/test_faiss_gpu.py compares GPU and CPU where a GPU faiss runs)

cpu_faiss_only = pytest.mark.skipif(faiss_devices.visible_gpus() > 0, reason="FAISS has GPUs here: test_faiss_gpu.py")


@cpu_faiss_only
@pytest.mark.parametrize(
    "cfg",
    [
        IndexConfig(index_type="flat"),
        IndexConfig(factory="IVF8,Flat", train_size=500, search_params="nprobe=4"),
        IndexConfig(index_type="hnsw", hnsw_m=8),
    ],
)
def test_without_gpus_the_index_stays_the_cpu_index(cfg):
    emb = np.random.default_rng(7).standard_normal((600, 16)).astype(np.float32)
    index = build_faiss_index(emb, cfg)
    before = index.search(emb[:5], 4)
    for mode in ("auto", "off"):
        assert faiss_devices.to_gpu(index, mode) is index  # the very object: no copy, no wrapper
    np.testing.assert_array_equal(index.search(emb[:5], 4)[1], before[1])


@cpu_faiss_only
def test_forcing_gpus_without_them_names_the_flag():
    index = build_faiss_index(np.eye(4, dtype=np.float32), IndexConfig(index_type="flat"))
    with pytest.raises(ValueError, match="--faiss_gpu shard: .*no GPU"):
        faiss_devices.to_gpu(index, "shard")
    # IVF training takes the same road (train_index): refused before any k-means
    emb = np.random.default_rng(8).standard_normal((300, 8)).astype(np.float32)
    with pytest.raises(ValueError, match="--faiss_gpu replicate: .*no GPU"):
        build_faiss_index(emb, IndexConfig(factory="IVF4,Flat", faiss_gpu="replicate"))
    with pytest.raises(ValueError, match="--faiss_gpu 'gpu': choose one of auto, off, replicate, shard"):
        faiss_devices.to_gpu(index, "gpu")


@pytest.mark.skipif(faiss_devices.faiss_has_gpu(), reason="this faiss has GPU support")
@pytest.mark.parametrize("mode", ["replicate", "shard"])
def test_finetune_refuses_a_forced_gpu_mode_on_faiss_cpu_in_one_line(mode, capsys):
    from rag_end2end.training import arguments

    with pytest.raises(SystemExit) as stop:
        arguments.parse_args(["--model_type", "rag_token", "--faiss_gpu", mode, "--index_gpus", "1"])
    assert stop.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"error: --faiss_gpu {mode}: faiss {faiss.__version__}, a CPU-only build has no GPU support" in last
    assert arguments.parse_args(["--model_type", "rag_token"]).faiss_gpu == "auto"  # the default runs anywhere


@cpu_faiss_only
@pytest.mark.parametrize("factory", ["IVF16,Flat", "IVF16,PQ4np", "OPQ4,IVF16_HNSW8,PQ4np"])
def test_ivf_training_on_cpu_gives_the_index_it_always_did(factory):
    """new_faiss_index now trains through faiss_devices.train_index: without GPUs, byte for byte what faiss's own
    train() on the same seeded sample gives."""
    emb = np.random.default_rng(9).standard_normal((1500, 16)).astype(np.float32)
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # k-means sums in one order, so that two trainings can be compared byte for byte
    try:
        built = build_faiss_index(emb, IndexConfig(factory=factory, train_size=800))
        plain = faiss.index_factory(16, factory, faiss.METRIC_INNER_PRODUCT)
        plain.train(emb[np.sort(np.random.default_rng(0).permutation(1500)[:800])])
        plain.add(emb)
    finally:
        faiss.omp_set_num_threads(threads)
    assert np.array_equal(faiss.serialize_index(built), faiss.serialize_index(plain))


@pytest.mark.parametrize(
    ("index_gpus", "actors", "cluster", "share"),
    [
        (0.5, 2, 1, 0.25),
        (0.5, 3, 1, 0.1666),
        (1, 2, 1, 0.0),
        (0.75, 1, 1, 0.25),
        (2, 2, 4, 1.0),
        (4, 3, 8, 1.0),
        (4, 1, 8, 4.0),
        (0, 2, 4, 0.0),
        (2, 2, 1, 0.0),
    ],
)
def test_faiss_actors_share_what_the_encoders_leave(index_gpus, actors, cluster, share):
    assert faiss_devices.gpu_share(index_gpus, actors, cluster) == share


@pytest.mark.skipif(faiss_devices.faiss_has_gpu(), reason="this faiss has GPU support")
def test_faiss_actors_ask_ray_for_no_gpu_with_faiss_cpu():
    assert faiss_devices.faiss_actor_gpus("auto", 0.5, 2) == (0.0, "off")  # placed exactly as before
    with pytest.raises(ValueError, match="--faiss_gpu shard: .*no GPU support"):
        faiss_devices.faiss_actor_gpus("shard", 0.5, 2)


# ----------------------------------------------------------------------------- save_kb


def test_save_kb_writes_passages_and_index(tmp_path):
    emb = np.random.default_rng(4).standard_normal((9, 6)).astype(np.float32)
    ds = with_embeddings(passages_dataset(9), emb)
    save_kb(ds, tmp_path / "passages", tmp_path / "index.faiss", IndexConfig(index_type="flat"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.faiss", "passages"]  # no temporaries left
    index = faiss.read_index(str(tmp_path / "index.faiss"))
    assert index.ntotal == 9
    loaded = load_from_disk(str(tmp_path / "passages"))
    assert loaded["title"] == ds["title"]
    np.testing.assert_array_equal(stored_embeddings(loaded), emb)
    np.testing.assert_array_equal(index.reconstruct_n(0, 9), emb)


@pytest.mark.parametrize("existing", ["passages", "index.faiss"])
def test_save_kb_refuses_existing_paths(tmp_path, existing):
    ds = with_embeddings(passages_dataset(3), np.ones((3, 2), dtype=np.float32))
    (tmp_path / existing).write_text("user data")
    with pytest.raises(FileExistsError, match=existing):
        save_kb(ds, tmp_path / "passages", tmp_path / "index.faiss", IndexConfig(index_type="flat"))
    assert (tmp_path / existing).read_text() == "user data"
    assert [p.name for p in tmp_path.iterdir()] == [existing]  # nothing else written


def test_kb_declares_its_similarity_and_a_mismatch_names_both(tmp_path):
    emb = np.random.default_rng(6).standard_normal((5, 4)).astype(np.float32)
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    ds = with_embeddings(passages_dataset(5), unit)
    save_kb(ds, tmp_path / "cos", tmp_path / "cos.faiss", IndexConfig(index_type="flat"), similarity="cosine")
    assert kb_similarity(tmp_path / "cos")[0] == "cosine"
    assert check_kb_similarity(tmp_path / "cos", "the question encoder q", "cosine") == "cosine"
    with pytest.raises(ValueError, match=r"cos holds cosine embeddings.*the question encoder q scores with dot"):
        check_kb_similarity(tmp_path / "cos", "the question encoder q", "dot")


@pytest.mark.parametrize(("unit_length", "expected"), [(True, "cosine"), (False, "dot")])
def test_kb_without_a_declaration_is_judged_by_its_norms(tmp_path, unit_length, expected):
    emb = np.random.default_rng(7).standard_normal((5, 4)).astype(np.float32) * 3
    if unit_length:
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    with_embeddings(passages_dataset(5), emb).save_to_disk(str(tmp_path / "legacy"))  # written by other tools
    assert kb_similarity(tmp_path / "legacy") == (expected, "inferred from its embedding norms")
    write_kb_info(tmp_path / "legacy", "dot")  # a declaration wins
    assert kb_similarity(tmp_path / "legacy")[0] == "dot"


# ----------------------------------------------------------------------------- versions


@pytest.fixture
def base_passages(tmp_path):
    path = tmp_path / "base"
    passages_dataset(10).save_to_disk(str(path))
    return str(path)


def test_build_kb_version_publishes_and_lists(tmp_path, base_passages):
    root = tmp_path / "kb"
    emb = np.random.default_rng(5).standard_normal((10, 8)).astype(np.float32)
    shards = [emb[0:4], emb[4:8], emb[8:10]]
    kb = build_kb_version(base_passages, str(root), 3, 17, IndexConfig(index_type="flat"), "cosine", *shards)

    final = root / "v0003"
    assert version_dir(root, 3) == final
    assert kb == KBVersion(3, str(final / "passages"), str(final / "index.faiss"), 17, "cosine")
    assert kb_similarity(kb.passages_path)[0] == "cosine"  # every version declares what it holds
    assert sorted(p.name for p in root.iterdir()) == ["v0003"]  # the temporary directory was renamed
    assert json.loads((final / READY_MARKER).read_text())["version"] == 3
    assert read_version(final) == kb

    stored = load_from_disk(kb.passages_path)
    assert stored["title"] == [f"title {i}" for i in range(10)]
    np.testing.assert_array_equal(stored_embeddings(stored), emb)  # shards merged in order
    index = faiss.read_index(kb.index_path)
    assert index.ntotal == 10
    np.testing.assert_array_equal(index.reconstruct_n(0, 10), emb)

    (root / "v0004.tmp-123").mkdir()
    (root / "v0005").mkdir()  # no marker: incomplete
    (root / "v0005" / "passages").mkdir()
    assert read_version(root / "v0005") is None
    assert list_versions(root) == [kb]
    assert list_versions(tmp_path / "nowhere") == []


def test_list_versions_sorted_oldest_first(tmp_path, base_passages):
    root = tmp_path / "kb"
    emb = np.zeros((10, 2), dtype=np.float32)
    cfg = IndexConfig(index_type="flat")
    kbs = [build_kb_version(base_passages, str(root), v, v, cfg, "dot", emb) for v in (12, 2, 7)]
    assert [v.version for v in list_versions(root)] == [2, 7, 12]
    assert list_versions(root)[0] == kbs[1]


def test_build_kb_version_refuses_to_overwrite(tmp_path, base_passages):
    root = tmp_path / "kb"
    cfg = IndexConfig(index_type="flat")
    first = np.ones((10, 4), dtype=np.float32)
    kb = build_kb_version(base_passages, str(root), 1, 0, cfg, "dot", first)
    marker = (root / "v0001" / READY_MARKER).read_text()
    with pytest.raises(FileExistsError, match="v0001"):
        build_kb_version(base_passages, str(root), 1, 5, cfg, "dot", np.zeros((10, 4), dtype=np.float32))
    assert (root / "v0001" / READY_MARKER).read_text() == marker
    assert sorted(p.name for p in root.iterdir()) == ["v0001"]
    np.testing.assert_array_equal(stored_embeddings(load_from_disk(kb.passages_path)), first)


def test_build_kb_version_rejects_wrong_row_count(tmp_path, base_passages):
    with pytest.raises(ValueError, match="10 passages but 9 embeddings"):
        build_kb_version(base_passages, str(tmp_path / "kb"), 1, 0, IndexConfig(), "dot", np.zeros((9, 4), np.float32))
    assert list_versions(tmp_path / "kb") == []


@pytest.mark.parametrize("n_rows, n_shards", [(10, 1), (10, 3), (10, 4), (10, 6), (10, 10), (3, 5), (1, 4), (101, 7)])
def test_shard_bounds_cover_rows_contiguously(n_rows, n_shards):
    bounds = shard_bounds(n_rows, n_shards)
    assert 1 <= len(bounds) <= n_shards
    assert bounds[0][0] == 0 and bounds[-1][1] == n_rows
    assert all(start < end for start, end in bounds)
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    if n_rows < n_shards:
        assert bounds == [(i, i + 1) for i in range(n_rows)]


# ----------------------------------------------------------------------------- encoding


def test_encode_token_ids_matches_single_passage_encoding():
    torch.manual_seed(0)
    config = DPRConfig(
        vocab_size=100,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    encoder = DPRContextEncoder(config)
    encoder.train()  # dropout on: encode_token_ids must switch to eval itself
    rng = np.random.default_rng(6)
    lengths = [7, 3, 12, 5, 20, 3, 9, 15, 4, 11]
    token_ids = [[2, *rng.integers(5, 100, size=n - 2).tolist(), 3] for n in lengths]

    out = encode_token_ids(encoder, token_ids, pad_token_id=0, batch_size=3, progress=False)

    assert not encoder.training
    assert torch.is_grad_enabled()
    assert all(p.grad is None for p in encoder.parameters())
    assert isinstance(out, np.ndarray) and out.shape == (len(token_ids), 16) and out.dtype == np.float32
    with torch.no_grad():
        for i, ids in enumerate(token_ids):
            alone = encoder(input_ids=torch.tensor([ids])).pooler_output[0].numpy()
            np.testing.assert_allclose(out[i], alone, atol=1e-5, rtol=0)
    assert not np.allclose(out[0], out[1])  # different passages really give different vectors
    low = encode_token_ids(encoder, token_ids, pad_token_id=0, batch_size=3, progress=False, bf16=True)
    assert low.dtype == np.float32 and not np.array_equal(low, out)  # really computed in bfloat16 ...
    np.testing.assert_allclose(low, out, atol=0.05 * np.abs(out).max())  # ... and close to float32


def test_a_version_is_streamed_from_part_files_into_one_dataset_and_index(tmp_path, base_passages, monkeypatch):
    """The refresh's path: each encoding shard writes its rows with their vectors as a part file, and the builder
    indexes the parts a record batch at a time (never all vectors at once) and declares them one dataset."""
    monkeypatch.setattr(kb_parts, "PART_BATCH_ROWS", 3)  # several batches per part, the last one short
    emb = np.random.default_rng(2).standard_normal((10, 8)).astype(np.float32)
    root, bounds = tmp_path / "kb", [(0, 4), (4, 9), (9, 10)]
    staging = staging_dir(root, 2)
    rows = [
        write_passages_part(base_passages, a, b, emb[a:b], part_path(staging, i, 3)) for i, (a, b) in enumerate(bounds)
    ]
    batches = [len(v) for _, v in kb_parts.part_vectors([part_path(staging, i, 3) for i in range(3)])]
    assert rows == [4, 5, 1] and batches == [3, 1, 3, 2, 1]
    cfg = IndexConfig(factory="IVF2,Flat", train_size=7, search_params="nprobe=2")  # trained on rows of all parts
    kb = publish_kb_version(str(root), 2, 5, cfg, "dot", staging, *rows)

    assert not staging.exists() and list_versions(root) == [kb]
    stored = load_from_disk(kb.passages_path)
    assert stored["title"] == [f"title {i}" for i in range(10)] and stored["text"][9] == "text of passage 9"
    np.testing.assert_array_equal(stored_embeddings(stored), emb)
    assert len(stored.cache_files) == 3  # the parts themselves, memory-mapped, not a merged copy
    queries = np.random.default_rng(3).standard_normal((4, 8)).astype(np.float32)
    streamed, merged = faiss.read_index(kb.index_path), build_faiss_index(emb, cfg)
    np.testing.assert_array_equal(streamed.search(queries, 10)[1], merged.search(queries, 10)[1])
    np.testing.assert_array_equal(streamed.search(queries, 10)[1], exact_topk(queries, emb, 10)[0])


def test_publishing_parts_that_miss_rows_fails_and_leaves_nothing(tmp_path, base_passages):
    emb = np.ones((10, 4), dtype=np.float32)
    staging = staging_dir(tmp_path / "kb", 1)
    rows = write_passages_part(base_passages, 0, 10, emb, part_path(staging, 0, 1))
    with pytest.raises(ValueError, match="the parts hold 10 passages, the encoders wrote 11"):
        publish_kb_version(str(tmp_path / "kb"), 1, 0, IndexConfig("flat"), "dot", staging, rows + 1)
    assert not staging.exists() and list_versions(tmp_path / "kb") == []
    with pytest.raises(ValueError, match="3 passages but 2 embeddings"):
        write_passages_part(base_passages, 0, 3, emb[:2], part_path(staging, 0, 1))
