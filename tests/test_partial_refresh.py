"""Partial refreshes (--refresh_policy rotating|hot, kb.refresh_policy): the rows a partial version re-encodes equal
a full refresh's at the same weights, the others are the previous version's bytes; the rotating slices cover the KB
in K refreshes; the hot set holds the rows retrieved for training; an IVF index is updated in place; a run with a
partial policy resumes, and a changed policy on resume is refused. Real Ray, real FAISS, tiny models."""

import csv
import os
from collections import Counter
from pathlib import Path

import faiss
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from datasets import load_from_disk
from faults import kill_actors

from rag_end2end.kb import build as use_own_knowledge_dataset
from rag_end2end.kb import refresh as kb_refresh
from rag_end2end.kb.index import IndexConfig, read_index
from rag_end2end.kb.parts import encoded_path, part_path
from rag_end2end.kb.refresh import Refresher
from rag_end2end.kb.refresh_policy import RefreshPolicy
from rag_end2end.kb.versions import KBVersion, build_kb_version, publish_partial_kb_version, staging_dir
from rag_end2end.training import finetune as finetune_rag
from rag_end2end.training import run_dir
from rag_end2end.training.callbacks import KBRefreshCallback, restored_hot_counts

N_PASSAGES = 24
QUIET = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False}


@pytest.fixture(scope="module")
def kb24(tiny_models, tmp_path_factory) -> tuple[Path, Path]:
    """Version 0 of a 24-passage KB (one row each), encoded by the tiny context encoder, with a flat index."""
    out = tmp_path_factory.mktemp("kb24")
    csv_path = out / "kb.csv"
    csv_path.write_text("".join(f"Topic {i}\tpassage number {i} about subject {i * 7 % 11}\n" for i in range(24)))
    args = ["--csv_path", str(csv_path), "--output_dir", str(out / "kb"), "--index_type", "flat"]
    args += ["--dpr_ctx_encoder_model_name", str(tiny_models["context_encoder"]), "--device", "cpu"]
    return use_own_knowledge_dataset.main(use_own_knowledge_dataset.parse_args(args))


def _argv(finetune_argv, kb: tuple[Path, Path], *extra: str) -> list[str]:
    return finetune_argv("--passages_path", str(kb[0]), "--index_path", str(kb[1]), *extra)


def vectors(kb: KBVersion | str) -> np.ndarray:
    path = kb.passages_path if isinstance(kb, KBVersion) else kb
    return np.asarray(load_from_disk(str(path)).with_format("numpy")["embeddings"], dtype=np.float32)


def moved(weights: dict, seed: int) -> dict:
    """The context encoder's weights moved a little (seeded): vectors that differ from every earlier version's."""
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in weights.items()}


def refresh(refresher: Refresher, weights: dict, step: int, **kwargs) -> KBVersion:
    """Run one refresh to the end (it goes live) and return the new live version."""
    assert refresher.trigger(weights, step, **kwargs)
    refresher.wait_until_idle(step, timeout=300, must_finish=True)
    return refresher.live_version


def changed_rows(a: np.ndarray, b: np.ndarray) -> set[int]:
    return set(np.flatnonzero((a != b).any(axis=1)).tolist())


def nearest_others(points: np.ndarray, row: int, m: int, similarity: str = "dot") -> list[int]:
    """Brute force: the `m` rows nearest to `row` (itself left out) by inner product, or by distance for l2."""
    scores = -((points - points[row]) ** 2).sum(1) if similarity == "l2" else points @ points[row]
    return [i for i in np.argsort(-scores, kind="stable").tolist() if i != row][:m]


def test_policies_choose_rows():
    rotating = RefreshPolicy("rotating", slices=3)
    history: list[dict] = []
    seen = []
    for _ in range(3):
        rows = rotating.rows(10, history)
        seen.append(rows.tolist())
        history.append({"policy": "rotating"})
    assert seen == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]  # every row once in K refreshes
    assert rotating.rows(10, history).tolist() == seen[0]
    assert RefreshPolicy("rotating", 3, full_every=2).rows(10, [{"policy": "rotating"}]) is None  # the 2nd: full
    assert RefreshPolicy().rows(10, []) is None

    hot = RefreshPolicy("hot", slices=4, hot_random_share=0.5, seed=1)  # budget 5: 2-3 recorded rows, the rest drawn
    recorded = Counter({7: 5, 3: 2, 9: 2, 1: 1, 50: 9})  # row 50 is not in the KB
    rows = hot.rows(20, [], recorded)
    assert len(rows) == 5 and {3, 7}.issubset(rows.tolist()) and 50 not in rows and list(rows) == sorted(rows)
    assert np.array_equal(rows, hot.rows(20, [], recorded))  # seeded: a resumed run draws the same
    assert len(hot.rows(20, [])) == 5  # nothing recorded: all drawn


def test_the_hot_set_takes_the_recorded_rows_neighbours_then_its_random_share():
    """Neighbours by brute force over hand-made points (l2): each recorded row's 2 nearest, the nearest of every
    recorded row before any second nearest; the budget exact; --hot_neighbours 0 chooses what it chose before."""
    points = np.random.default_rng(0).standard_normal((40, 2)).astype(np.float32)

    def search(rows: np.ndarray, k: int) -> np.ndarray:  # what Refresher.nearest_rows answers, exact here
        distances = ((points[rows][:, None] - points[None]) ** 2).sum(-1)
        return np.argsort(distances, axis=1, kind="stable")[:, :k]

    recorded = Counter({5: 3, 12: 2, 30: 1})
    near = {row: nearest_others(points, row, 2, "l2") for row in recorded}
    # budget 20, a quarter (5) at random: the 3 recorded rows, their 2 neighbours each (at most 6), the rest drawn
    policy = RefreshPolicy("hot", slices=2, hot_random_share=0.25, seed=4, hot_neighbours=2)
    rows = policy.rows(40, [], recorded, search)
    assert len(rows) == 20 and len(set(rows.tolist())) == 20 and list(rows) == sorted(rows)
    assert set(recorded) | {n for ns in near.values() for n in ns} <= set(rows.tolist())
    assert np.array_equal(rows, policy.rows(40, [], recorded, search))  # a resumed run chooses the same

    # budget 5, no random share: 3 recorded rows and room for 2 neighbours, the nearest of the two most retrieved.
    tight = RefreshPolicy("hot", slices=8, hot_random_share=0.0, hot_neighbours=2)
    first = list(dict.fromkeys(near[row][0] for row in (5, 12, 30) if near[row][0] not in recorded))
    assert set(tight.rows(40, [], recorded, search).tolist()) == {5, 12, 30, *first[:2]}

    # --hot_neighbours 0: no search, the rows the policy chose before neighbours existed (fb2137f, these seeds).
    def no_search(rows: np.ndarray, k: int) -> np.ndarray:
        raise AssertionError("--hot_neighbours 0 searched")

    old = Counter({7: 5, 3: 2, 9: 2, 1: 1, 50: 9})
    off = RefreshPolicy("hot", slices=4, hot_random_share=0.5, seed=1, hot_neighbours=0)
    assert off.rows(20, [], old, no_search).tolist() == [3, 6, 7, 9, 11]
    off = RefreshPolicy("hot", slices=2, hot_random_share=0.25, seed=3, hot_neighbours=0)
    assert off.rows(20, [{"policy": "hot"}], old, no_search).tolist() == [0, 1, 3, 5, 7, 9, 11, 13, 14, 17]


def test_partial_versions_reencode_their_rows_and_keep_the_others_bytes(ray_local, finetune_argv, kb24, tmp_path):
    """Rotating K=3 over 24 passages with 2 encoding actors: each refresh changes exactly its slice; after 3 every
    row is new; untouched blocks are hard links; the re-encoded rows equal a full refresh's; then a hot refresh
    re-encodes the recorded rows plus its random share."""
    module = finetune_rag.build_module(finetune_rag.parse_args(_argv(finetune_argv, kb24, "--end2end")))
    ctx = module.model.ctx_encoder
    kb_root = tmp_path / "kb"
    refresher = Refresher(
        module.retriever,
        module.base_passages_path,
        str(kb_root),
        ctx,
        module.model.ctx_tokenizer,
        IndexConfig("flat"),
        index_workers=2,
        keep_versions=0,
        policy=RefreshPolicy("rotating", slices=3),
    )
    refresher.wait_for_actors()
    v0 = vectors(str(kb24[0]))
    slices = [set(range(0, 8)), set(range(8, 16)), set(range(16, 24))]
    versions = [v0]
    for i in range(3):
        kb = refresh(refresher, moved(ctx.state_dict(), seed=i), step=i + 1)
        versions.append(vectors(kb))
        assert changed_rows(versions[-2], versions[-1]) == slices[i], f"refresh {i + 1} re-encoded other rows"
        assert refresher.history[-1]["passages_encoded"] == 8 and refresher.history[-1]["policy"] == "rotating"
    assert changed_rows(v0, versions[-1]) == set(range(N_PASSAGES)), "a row was not re-encoded in K refreshes"
    # v3 wrote only its slice: its blocks 0 and 1 are v2's files (block 0 is v1's, linked through v2), not copies.
    v1_block0, v3 = part_path(kb_root / "v0001", 0, 3), kb_root / "v0003"
    assert os.stat(part_path(v3, 0, 3)).st_ino == os.stat(v1_block0).st_ino
    assert os.stat(part_path(v3, 1, 3)).st_ino == os.stat(part_path(kb_root / "v0002", 1, 3)).st_ino
    assert not (v3 / "encoded").exists()

    # The same weights as the last partial refresh, the whole KB: equal at the slice it re-encoded.
    full = refresh(refresher, moved(ctx.state_dict(), seed=2), step=4, full=True)
    assert refresher.history[-1]["passages_encoded"] == N_PASSAGES
    np.testing.assert_allclose(vectors(full)[16:], versions[-1][16:], rtol=1e-5, atol=1e-6)
    assert not np.array_equal(vectors(full)[:16], versions[-1][:16])  # the others had older weights

    # Hot: budget 8: the 3 recorded rows, the nearest neighbour of each in the live index (by the live version's
    # vectors, searched by the retrieval actors), and a random quarter.
    refresher.policy = RefreshPolicy("hot", slices=3, hot_random_share=0.25, hot_neighbours=1)
    before = vectors(refresher.live_version)
    recorded = Counter({3: 4, 17: 1, 20: 2})
    near = {nearest_others(before, row, 1, refresher.live_version.similarity)[0] for row in recorded}
    assert refresher.live_version.similarity == "dot"  # the flat index's inner product, row 3 itself included:
    assert refresher.nearest_rows(np.array([3]), 3)[0].tolist() == np.argsort(-(before @ before[3]))[:3].tolist()
    hot = refresh(refresher, moved(ctx.state_dict(), seed=5), step=5, recorded=recorded)
    changed = changed_rows(before, vectors(hot))
    assert {3, 17, 20} | near <= changed and len(changed) == 8 and refresher.history[-1]["policy"] == "hot"
    # The live index holds the new version's vectors (a flat index: rebuilt from them).
    index = read_index(hot.index_path)
    assert np.array_equal(index.reconstruct_n(0, index.ntotal), vectors(hot))
    refresher.close()
    kill_actors(module)


def test_an_ivf_index_is_updated_in_place(kb24, tmp_path):
    """IVF: the touched rows removed and added again by id, its trained centroids kept (no rebuild)."""
    v0 = vectors(str(kb24[0]))
    cfg = IndexConfig(factory="IVF2,Flat", search_params="nprobe=2")
    kb_root = tmp_path / "kb"
    v1 = build_kb_version(str(kb24[0]), str(kb_root), 1, 0, cfg, "dot", v0[:12], v0[12:])
    rows = np.array([2, 5, 19], dtype=np.int64)
    new = np.random.default_rng(0).standard_normal((3, v0.shape[1])).astype(np.float32) * 10
    staging = staging_dir(kb_root, 2)
    encoded_path(staging, 0).parent.mkdir(parents=True)
    np.save(encoded_path(staging, 0), new)
    v2 = publish_partial_kb_version(
        str(kb_root), 2, 7, cfg, "dot", staging, v1, rows, 2, [str(encoded_path(staging, 0))], 3
    )
    expected = v0.copy()
    expected[rows] = new
    assert np.array_equal(vectors(v2), expected) and v2.embedding_step == 7
    before, after = read_index(v1.index_path), read_index(v2.index_path)
    centroids = [faiss.extract_index_ivf(i).quantizer.reconstruct_n(0, 2) for i in (before, after)]
    assert np.array_equal(*centroids) and after.ntotal == N_PASSAGES
    _, found = after.search(new, 1)
    assert found[:, 0].tolist() == rows.tolist()
    assert not (kb_root / "v0002" / "encoded").exists()


def test_a_part_is_linked_only_when_it_holds_the_blocks_rows(kb24, tmp_path):
    """A version written in uneven parts (10 + 14 rows, build_kb_version) under the names of the 2 even blocks
    (12 + 12): the untouched block 0 is written anew, not linked to the 10-row file of the same name (which gave 22
    passages beside an IVF index of 24 ids, unnoticed); a block whose file holds exactly its rows is linked."""
    v0 = vectors(str(kb24[0]))
    cfg = IndexConfig(factory="IVF2,Flat", search_params="nprobe=2")
    kb_root = tmp_path / "kb"
    v1 = build_kb_version(str(kb24[0]), str(kb_root), 1, 0, cfg, "dot", v0[:10], v0[10:])
    new = np.random.default_rng(1).standard_normal((2, v0.shape[1])).astype(np.float32)

    def publish(version: int, previous: KBVersion, rows: list[int]) -> KBVersion:
        staging = staging_dir(kb_root, version)
        encoded_path(staging, 0).parent.mkdir(parents=True)
        np.save(encoded_path(staging, 0), new)
        files = [str(encoded_path(staging, 0))]
        return publish_partial_kb_version(str(kb_root), version, 3, cfg, "dot", staging, previous, rows, 2, files, 2)

    v2 = publish(2, v1, [15, 20])
    expected = v0.copy()
    expected[[15, 20]] = new
    assert len(load_from_disk(v2.passages_path)) == N_PASSAGES == read_index(v2.index_path).ntotal
    assert np.array_equal(vectors(v2), expected)
    block0 = [Path(v.passages_path) / part_path("", 0, 2).name for v in (v1, v2)]
    assert not os.path.samefile(*block0), "a part of other rows was linked"
    v3 = publish(3, v2, [16, 21])  # v2's block 0 holds rows 0-11: linked
    assert os.path.samefile(block0[1], Path(v3.passages_path) / block0[1].name)
    expected[[16, 21]] = new
    assert np.array_equal(vectors(v3), expected)


class RecordedBeforeTrigger(pl.Callback):
    """Keeps what the refresh callback recorded just before it triggers (placed before it, so it runs first)."""

    def __init__(self, refresh: KBRefreshCallback):
        self.refresh, self.seen = refresh, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seen.append(Counter(self.refresh.recorded))


def test_the_hot_set_holds_the_rows_retrieved_for_training(ray_local, finetune_argv, kb24, tmp_path):
    argv = _argv(finetune_argv, kb24, "--end2end", "--n_docs", "2", "--learning_rate", "1e-3")
    module = finetune_rag.build_module(finetune_rag.parse_args(argv))
    policy = RefreshPolicy("hot", slices=2, hot_random_share=0.0)  # budget 12, all of it for the recorded rows
    refresh = KBRefreshCallback(str(tmp_path / "kb"), 2, IndexConfig("flat"), policy=policy)
    spy = RecordedBeforeTrigger(refresh)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=3, limit_val_batches=0, callbacks=[spy, refresh], **QUIET
    )
    trainer.fit(module)
    recorded = spy.seen[1]  # steps 1 and 2 (batch 2, 2 passages each), read before the trigger at step 2
    assert sum(recorded.values()) == 2 * 2 * 2, "not only the training questions were recorded"
    assert sum(spy.seen[2].values()) == 2 * 2, "the trigger did not start a new hot set"
    (record,) = refresh.history
    assert record["policy"] == "hot" and record["passages_encoded"] == 12
    changed = changed_rows(vectors(str(kb24[0])), vectors(module.kb))
    assert set(recorded) <= changed and len(changed) == 12
    kill_actors(module)


class StateAtStep(pl.Callback):
    """The refresh callback's checkpoint state at `step` (placed after it: just after its trigger there)."""

    def __init__(self, refresh: KBRefreshCallback, step: int):
        self.refresh, self.step, self.state = refresh, step, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            self.state = self.refresh.state_dict()


def test_a_failed_hot_refresh_gives_its_counts_back(ray_local, finetune_argv, kb24, tmp_path, monkeypatch):
    """The hot refresh triggered at step 2 fails (a directory stands where its encoding actor's vectors go): the
    counts it was triggered with are recorded again, beside step 3's, for the next refresh; a checkpoint saved while
    it was in flight keeps them as pending, and a resumed run starts from both."""
    argv = _argv(finetune_argv, kb24, "--end2end", "--n_docs", "2")
    module = finetune_rag.build_module(finetune_rag.parse_args(argv))
    staging = tmp_path / "kb" / "v0001.tmp-test"
    monkeypatch.setattr(kb_refresh, "staging_dir", lambda root, version: staging)
    encoded_path(staging, 0).mkdir(parents=True)  # the vectors' file cannot be renamed into place
    policy = RefreshPolicy("hot", slices=2, hot_random_share=0.0)
    refresh = KBRefreshCallback(str(tmp_path / "kb"), 2, IndexConfig("flat"), policy=policy)
    spy = StateAtStep(refresh, 2)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=3, limit_val_batches=0, callbacks=[refresh, spy], **QUIET
    )
    trainer.fit(module)
    assert refresh.refresher.failures == 1 and not refresh.history
    # 3 steps, batch 2, 2 passages each: steps 1-2's counts came back after the failure
    assert sum(refresh.recorded.values()) == 3 * 2 * 2 and not refresh.pending
    assert sum(dict(spy.state["pending"]).values()) == 2 * 2 * 2 and not spy.state["recorded"]
    assert restored_hot_counts(spy.state) == Counter(dict(spy.state["pending"]))
    kill_actors(module)


@pytest.mark.slow  # ~50 s: CI stays under 15 minutes (docs/tests.md)
def test_a_partial_policy_run_resumes_and_its_policy_is_kept(ray_local, finetune_argv, kb24, tmp_path):
    argv = _argv(finetune_argv, kb24, "--end2end", "--do_train", "--indexing_freq", "2", "--log_every_n_steps", "1")
    argv += ["--refresh_policy", "rotating", "--refresh_slices", "2", "--limit_val_batches", "0"]
    argv += ["--num_sanity_val_steps", "0", "--save_last_every_n_steps", "3", "--staleness_sample", "0"]
    argv += ["--keep_kb_versions", "0"]
    kill_actors(finetune_rag.main(finetune_rag.parse_args([*argv, "--max_steps", "3"])))

    def resume(*extra: str) -> None:
        run_dir.prepare_output_dir(finetune_rag.parse_args([*argv, "--max_steps", "3", "--resume", *extra]))

    with pytest.raises(ValueError, match=r"--refresh_policy hot \(was rotating\)"):
        resume("--refresh_policy", "hot")
    with pytest.raises(ValueError, match=r"--refresh_slices 4 \(was 2\)"):
        resume("--refresh_slices", "4")
    with pytest.raises(ValueError, match=r"--hot_neighbours 0 \(was 2\)"):
        resume("--hot_neighbours", "0")

    again = [*argv, "--max_steps", "7", "--resume", "--allow_changed_settings"]
    module = finetune_rag.main(finetune_rag.parse_args(again))
    kill_actors(module)
    history = [c for c in module.trainer.callbacks if isinstance(c, KBRefreshCallback)][0].history
    # The history the checkpoint kept (the refresh of step 2, if it went live before the save at step 3: on busy
    # cores it may not), then those after the resume: slices 0, 1, 0, ... in turn counted over both segments, each
    # refresh changing exactly its slice. The run waits for its last refresh at the end: one after the resume at least.
    assert any(r["trigger_step"] > 3 for r in history)
    assert all(r["policy"] == "rotating" and r["passages_encoded"] == 12 for r in history)
    out = tmp_path / "out"
    before = vectors(str(kb24[0]))
    for i, record in enumerate(history):
        after = vectors(str(out / "kb" / f"v{record['version']:04d}" / "passages"))
        assert changed_rows(before, after) == set(range(12 * (i % 2), 12 * (i % 2) + 12)), f"refresh {i + 1}"
        before = after
    logged = [r for f in (out / "logs").rglob("metrics.csv") for r in csv.DictReader(open(f))]
    assert any(r.get("passages_encoded") == "12.0" for r in logged)


def test_more_slices_than_passages_are_refused_before_any_work(ray_local, finetune_argv, kb24, tmp_path):
    argv = _argv(finetune_argv, kb24, "--end2end", "--do_train", "--indexing_freq", "2", "--refresh_policy", "rotating")
    with pytest.raises(
        ValueError, match=r"--refresh_slices 25: more slices than the 24 passages of --passages_path "
    ) as e:
        finetune_rag.main(finetune_rag.parse_args([*argv, "--refresh_slices", "25"]))
    assert getattr(e.value, "refusal", False)  # finetune_rag.py: one line, exit status 2
    assert not (tmp_path / "out" / "logs").exists(), "refused after the run started"


def test_partial_policy_flags_are_checked(capsys):
    for flags in (["--refresh_slices", "1"], ["--hot_random_share", "1.5"], ["--full_refresh_every", "-1"]):
        with pytest.raises(SystemExit) as stop:
            finetune_rag.parse_args(["--model_type", "rag_token", *flags])
        assert stop.value.code == 2 and "--refresh_slices must be >= 2" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        finetune_rag.parse_args(["--model_type", "rag_token", "--hot_neighbours", "-1"])
    assert stop.value.code == 2 and "--hot_neighbours must be >= 0" in capsys.readouterr().err
