"""Faults really caused, and what the run does about them: a retrieval actor, an encoding actor and the
builder killed mid-run, two runs on one Ray cluster, a reused output directory, a trainer killed and resumed,
an unreachable Ray address, a cluster joined by address, and full or read-only disks."""

import argparse
import contextlib
import http.server
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import ray
import torch
from datasets import load_from_disk
from faults import actor_pid, free_port, gated_encoder_factory, kill_actors, small_filesystem

from rag_end2end.kb import build as use_own_knowledge_dataset
from rag_end2end.kb import refresh as kb_refresh
from rag_end2end.kb.index import IndexConfig
from rag_end2end.kb.refresh import RefreshState
from rag_end2end.kb.versions import build_kb_version
from rag_end2end.training import callbacks as callbacks_rag
from rag_end2end.training import finetune as finetune_rag
from rag_end2end.training import run_dir
from rag_end2end.training.callbacks import KBRefreshCallback

REPO = Path(__file__).resolve().parents[1]
QUIET = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False}


def _fit(module, *callbacks, max_steps: int) -> pl.Trainer:
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, limit_val_batches=0, callbacks=list(callbacks), **QUIET
    )
    trainer.fit(module)
    return trainer


def _queries(module, n: int = 3) -> np.ndarray:
    dim = module.model.question_encoder.config.hidden_size
    return np.random.default_rng(0).standard_normal((n, dim)).astype(np.float32)


# ---------------------------------------------------------------- supervised actors


def test_training_survives_a_killed_retrieval_actor(ray_local, finetune_argv):
    module = finetune_rag.build_module(finetune_rag.parse_args(finetune_argv("--num_retrieval_workers", "2")))
    victim = module.retriever.actors[0]
    killed = actor_pid(victim)

    class Kill(pl.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 2:
                os.kill(killed, signal.SIGKILL)

    trainer = _fit(module, Kill(), max_steps=8)
    assert trainer.global_step == 8, "training did not go on after the actor died"
    for _ in range(4):  # every actor answers, from the one live version
        module.retriever.retrieve(_queries(module), 2)
        assert module.retriever.last_version == module.kb.version == 0
    assert actor_pid(victim) != killed, "the dead actor was not restarted"
    assert module.retriever.actor_restarts >= 1
    kill_actors(module)


def test_a_stopped_retrieval_actor_is_restarted_after_the_timeout(ray_local, finetune_argv, caplog):
    """SIGSTOP freezes a retrieval actor without killing it (what a swapping or stopped process looks like): its
    call gets no answer in --retrieval_timeout, the actor is restarted, the other actor answers, with a log line."""
    argv = finetune_argv("--num_retrieval_workers", "2", "--retrieval_timeout", "3")
    module = finetune_rag.build_module(finetune_rag.parse_args(argv))
    retriever = module.retriever
    victim = retriever.actors[retriever._next % 2]  # the next call goes to it
    stopped = actor_pid(victim)
    os.kill(stopped, signal.SIGSTOP)
    try:
        with caplog.at_level(logging.WARNING, logger="distributed_ray_retriever"):
            start = time.monotonic()
            retriever.retrieve(_queries(module), 2)
            elapsed = time.monotonic() - start
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(stopped, signal.SIGCONT)
    assert 3 <= elapsed < 60 and retriever.timeouts == 1
    assert "gave no answer in 3 s" in caplog.text
    for _ in range(4):  # both actors answer again, the restarted one from the live version
        retriever.retrieve(_queries(module), 2)
        assert retriever.last_version == module.kb.version == 0
    assert actor_pid(victim) != stopped, "the stopped actor was not restarted"
    kill_actors(module)


def test_a_refresh_goes_live_after_its_encoder_and_builder_were_killed(ray_local, finetune_argv, tmp_path, monkeypatch):
    """The first refresh is held in the encoding actor (it waits for a file) while its encoder and the builder
    are killed. Ray restarts both and runs their tasks again: that refresh still goes live."""
    gate = str(tmp_path / "release")
    monkeypatch.setattr(kb_refresh, "encoder_factory", gated_encoder_factory(kb_refresh.encoder_factory, gate))
    module = finetune_rag.build_module(finetune_rag.parse_args(finetune_argv("--end2end")))
    refresh = KBRefreshCallback(str(tmp_path / "kb"), 2, IndexConfig("flat"), max_failures=1)

    class Kill(pl.Callback):
        killed: list[int] = []

        def on_train_batch_end(self, trainer, *args):
            if refresh.refresher.state is RefreshState.ENCODING and not self.killed:
                # the encoder waits for the gate, inside the refresh
                self.killed = list(refresh.refresher._pids)
                for pid in self.killed:
                    os.kill(pid, signal.SIGKILL)
                Path(gate).touch()

    kill = Kill()
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=12, limit_val_batches=0, callbacks=[refresh, kill], **QUIET
    )
    trainer.fit(module)
    assert kill.killed, "the refresh was never caught in flight"
    assert refresh.refresher.failures == 0 and refresh.history, "the refresh did not survive its actors' deaths"
    assert refresh.history[0]["version"] == 1 and refresh.refresher.actor_restarts == len(kill.killed) == 2
    kill_actors(module)


def test_refreshes_that_keep_failing_stop_the_run_with_the_cause(ray_local, finetune_argv, tmp_path):
    module = finetune_rag.build_module(finetune_rag.parse_args(finetune_argv("--end2end")))
    with small_filesystem(tmp_path / "ro", read_only=True) as read_only:
        refresh = KBRefreshCallback(str(read_only / "kb"), 1, IndexConfig("flat"), max_failures=2)
        last = callbacks_rag.get_last_checkpoint_callback(str(tmp_path / "out"), every_n_steps=100)
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            max_steps=30,
            limit_val_batches=0,
            logger=False,
            enable_progress_bar=False,
            callbacks=[refresh, last],
        )
        with pytest.raises(RuntimeError, match=r"failed 2 times in a row") as caught:
            trainer.fit(module)
    message = str(caught.value)
    assert str(read_only / "kb") in message and "Read-only file system" in message
    assert trainer.global_step < 30
    assert (tmp_path / "out" / "last.ckpt").is_file(), "the stopped run left nothing to resume from"
    kill_actors(module)


def test_a_failed_refresh_removes_the_parts_its_encoders_wrote(ray_local, finetune_argv, tmp_path, monkeypatch):
    """Of two encoding actors one writes its part and the other cannot (a directory holds its file name): the
    builder never runs, and the refresh's own temporary version directory is removed with what was written."""
    module = finetune_rag.build_module(finetune_rag.parse_args(finetune_argv("--end2end")))
    staging = tmp_path / "kb" / "v0001.tmp-test"
    monkeypatch.setattr(kb_refresh, "staging_dir", lambda root, version: staging)
    (kb_refresh.part_path(staging, 1, 2)).mkdir(parents=True)  # the second part cannot be renamed into place
    ctx = module.model.ctx_encoder
    refresher = kb_refresh.Refresher(
        module.retriever,
        module.base_passages_path,
        str(tmp_path / "kb"),
        ctx,
        module.model.ctx_tokenizer,
        IndexConfig("flat"),
        index_workers=2,
    )
    assert refresher.trigger(ctx.state_dict(), step=1)
    deadline = time.monotonic() + 120
    while refresher.failures == 0 and time.monotonic() < deadline:
        refresher.poll(step=1)
        time.sleep(0.05)
    assert refresher.failures == 1 and refresher.state is RefreshState.IDLE
    assert refresher.live_version.version == 0
    while staging.exists() and time.monotonic() < deadline:  # removed once the other encoder has ended too
        refresher.poll(step=2)
        time.sleep(0.05)
    assert not staging.exists(), "the failed refresh left its parts behind"
    refresher.close()
    kill_actors(module)


def test_a_full_disk_is_reported_with_path_and_errno(tiny_kb, tmp_path):
    passages, _ = tiny_kb
    from datasets import load_from_disk

    n = len(load_from_disk(str(passages)))
    with small_filesystem(tmp_path / "full", size="16k") as full:
        with pytest.raises(OSError) as caught:
            build_kb_version(str(passages), str(full), 1, 0, IndexConfig("flat"), "dot", np.ones((n, 64), np.float32))
        assert caught.value.errno == 28 and str(full / "v0001") in str(caught.value)
        assert not list(full.iterdir()), "a half-written version was left behind"


def test_a_full_disk_while_checkpointing_names_the_checkpoint(ray_local, finetune_argv, tmp_path):
    """torch's write error names no file ("PytorchStreamWriter failed writing file data/0"): the run's error names
    the checkpoint it was writing, and no temporary file is left behind."""
    with small_filesystem(tmp_path / "full", size="1m") as full:
        argv = finetune_argv(
            "--do_train",
            "--max_steps",
            "2",
            "--num_sanity_val_steps",
            "0",
            "--save_last_every_n_steps",
            "1",
            "--check_val_every_n_epoch",
            "1000",
        )
        out = full / "out"
        argv[argv.index("--output_dir") + 1] = str(out)
        with pytest.raises((OSError, RuntimeError)) as caught:
            finetune_rag.main(finetune_rag.parse_args(argv))
        assert f"writing checkpoint {out / 'last.ckpt'} failed" in str(caught.value)
        assert not list(out.glob("*.tmp*")), "a half-written checkpoint was left behind"


# ---------------------------------------------------------------- isolation and output directories


@pytest.fixture(scope="module")
def other_kb(tiny_models, tmp_path_factory) -> tuple[Path, Path]:
    """A second KB with passages of its own."""
    csv = tmp_path_factory.mktemp("other-csv") / "kb.csv"
    csv.write_text("".join(f"Other {i}\tunrelated passage number {i} about nothing\n" for i in range(6)))
    args = use_own_knowledge_dataset.parse_args(
        [
            "--csv_path",
            str(csv),
            "--output_dir",
            str(tmp_path_factory.mktemp("other-kb")),
            "--index_type",
            "flat",
            "--dpr_ctx_encoder_model_name",
            str(tiny_models["context_encoder"]),
            "--device",
            "cpu",
        ]
    )
    return use_own_knowledge_dataset.main(args)


def test_two_runs_on_one_cluster_retrieve_from_their_own_kb(ray_local, finetune_argv, other_kb):
    first = finetune_rag.build_module(finetune_rag.parse_args(finetune_argv("--ray_namespace", "shared")))
    argv = finetune_argv("--ray_namespace", "shared")
    argv[argv.index("--passages_path") + 1], argv[argv.index("--index_path") + 1] = map(str, other_kb)
    second = finetune_rag.build_module(finetune_rag.parse_args(argv))
    assert first.hparams.run_id != second.hparams.run_id
    assert first.retriever.actors[0]._actor_id != second.retriever.actors[0]._actor_id
    titles = {}
    for name, module in (("first", first), ("second", second)):
        _, _, docs = module.retriever.retrieve(_queries(module), 2)
        titles[name] = {t for d in docs for t in d["title"]}
    assert all(t.startswith("Other") for t in titles["second"])
    assert not any(t.startswith("Other") for t in titles["first"])
    kill_actors(first)
    kill_actors(second)


def test_resume_takes_the_newest_last_checkpoint_whatever_lightning_named_it(tmp_path):
    for age, name in ((30, "0.5000-20.ckpt"), (20, "last.ckpt"), (10, "last-v1.ckpt")):  # a copy's resume wrote -v1
        (tmp_path / name).write_text(name)
        os.utime(tmp_path / name, (time.time() - age, time.time() - age))
    assert Path(run_dir.newest_checkpoint(tmp_path)).name == "last-v1.ckpt"
    (tmp_path / "last-v1.ckpt").unlink()
    (tmp_path / "last.ckpt").unlink()
    assert Path(run_dir.newest_checkpoint(tmp_path)).name == "0.5000-20.ckpt"  # no last*: the newest .ckpt


def test_a_reused_output_dir_is_refused_then_moved_aside_never_deleted(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "0.5000-20.ckpt").write_text("earlier")
    (out / "kb").mkdir()
    (out / "kb" / "v0003").mkdir()
    (out / "notes.txt").write_text("the user's own")
    (out / "plots").mkdir()
    (out / "run_info.json").write_text("{}")
    argv = ["--model_type", "rag_token", "--output_dir", str(out), "--do_train"]
    with pytest.raises(FileExistsError, match=r"holds an earlier run .*--resume.*--overwrite_output_dir"):
        run_dir.prepare_output_dir(finetune_rag.parse_args(argv))
    assert (out / "0.5000-20.ckpt").read_text() == "earlier" and (out / "kb" / "v0003").is_dir()
    run_dir.prepare_output_dir(finetune_rag.parse_args([*argv, "--overwrite_output_dir"]))
    (moved,) = (out / "previous_runs").iterdir()
    assert (moved / "0.5000-20.ckpt").read_text() == "earlier" and (moved / "kb" / "v0003").is_dir()
    assert (out / "notes.txt").read_text() == "the user's own" and not (out / "kb").exists()
    assert (moved / "plots").is_dir() and (moved / "run_info.json").is_file() and not (out / "plots").exists()
    # --resume continues from last.ckpt, the newest checkpoint otherwise
    # (these are no checkpoints: the resume is refused, naming the one it picked)
    (out / "0.7500-40.ckpt").write_text("newer")
    args = finetune_rag.parse_args([*argv, "--resume"])
    with pytest.raises(ValueError, match=r"0.7500-40.ckpt: not a checkpoint of finetune_rag.py"):
        run_dir.prepare_output_dir(args)
    assert args.resume_from_checkpoint == str(out / "0.7500-40.ckpt")
    (out / "last.ckpt").write_text("last")
    args = finetune_rag.parse_args([*argv, "--resume"])
    with pytest.raises(ValueError, match=r"last.ckpt: not a checkpoint"):
        run_dir.prepare_output_dir(args)
    assert args.resume_from_checkpoint == str(out / "last.ckpt")


def test_pruning_spares_other_runs_versions_and_pinned_ones(tmp_path):
    from rag_end2end.kb.versions import KBVersion, prune_versions, version_dir

    for v in range(1, 7):
        path = version_dir(tmp_path, v)
        path.mkdir()
        (path / "READY.json").write_text(json.dumps(vars(KBVersion(v, "p", "i"))))
    (tmp_path / "last.kb_version.json").write_text(json.dumps({"version": 3}))
    pinned = callbacks_rag.pinned_kb_versions(tmp_path)
    assert prune_versions(tmp_path, 2, protect=pinned, only={3, 4, 5, 6}) == [4]
    assert sorted(p.name for p in tmp_path.glob("v*")) == ["v0001", "v0002", "v0003", "v0005", "v0006"]


def test_a_symlinked_kb_version_is_left_with_its_target_and_named(tmp_path):
    """A user moved a version to another disk and linked it back: the resume's clean-up met shutil.rmtree's
    "Cannot call rmtree on a symbolic link", naming no path, and stopped."""
    from rag_end2end.kb.versions import KBVersion, prune_versions, remove_unreachable_versions, version_dir

    kb, elsewhere = tmp_path / "kb", tmp_path / "other-disk" / "v0002"
    for v, path in ((1, version_dir(kb, 1)), (2, elsewhere), (3, version_dir(kb, 3))):
        path.mkdir(parents=True)
        (path / "READY.json").write_text(json.dumps(vars(KBVersion(v, "p", "i"))))
    version_dir(kb, 2).symlink_to(elsewhere, target_is_directory=True)
    with pytest.warns(UserWarning, match=rf"kb/v0002 is a symbolic link \(to {elsewhere}\), not a KB version this run"):
        assert remove_unreachable_versions(kb, live=1, keep=set()) == [3]  # v0002 and v0003 were never live
    assert version_dir(kb, 2).is_symlink() and (elsewhere / "READY.json").is_file()
    version_dir(kb, 4).mkdir()
    (version_dir(kb, 4) / "READY.json").write_text(json.dumps(vars(KBVersion(4, "p", "i"))))
    with pytest.warns(UserWarning, match=r"kb/v0002 is a symbolic link"):
        assert prune_versions(kb, 1) == [1]  # the newest, v0004, kept; v0001 removed; v0002 left
    assert (elsewhere / "READY.json").is_file()


# ---------------------------------------------------------------- a killed trainer, resumed


def _finetune_command(argv: list[str]) -> list[str]:
    return [sys.executable, str(REPO / "finetune_rag.py"), *argv]


@pytest.mark.slow  # ~50 s: CI stays under 15 minutes (docs/tests.md)
def test_a_moved_run_resumes_on_its_own_kb_and_a_lost_kb_version_stops_the_resume(ray_local, finetune_argv, tmp_path):
    """Paths inside a run are stored relative to it: a run directory moved elsewhere resumes from its own last.ckpt
    on its own KB version (with absolute paths that version was gone), replacing last.ckpt in place. A KB version
    deleted under a checkpoint stops the resume, unless --reencode_lost_kb re-encodes the KB first."""
    out, moved = tmp_path / "out", tmp_path / "moved"
    argv = finetune_argv(
        "--do_train",
        "--end2end",
        "--indexing_freq",
        "1",
        "--save_last_every_n_steps",
        "2",
        "--max_steps",
        "4",
        "--num_sanity_val_steps",
        "0",
        "--check_val_every_n_epoch",
        "1000",
        "--keep_kb_versions",
        "0",
    )
    first = finetune_rag.main(finetune_rag.parse_args(argv))
    kill_actors(first)
    pin = json.loads((out / "last.kb_version.json").read_text())
    assert pin["version"] >= 1 and pin["passages_path"].startswith("kb/v")  # relative to the run directory
    first_seconds = json.loads((out / "run_info.json").read_text())["train_seconds"]
    shutil.move(out, moved)

    def resume(steps: int, *extra: str):
        again = [str(moved) if a == str(out) else a for a in argv] + ["--resume", "--max_steps", str(steps), *extra]
        again.append("--allow_changed_settings")  # more steps
        return finetune_rag.main(finetune_rag.parse_args(again))

    second = resume(6)
    assert second.trainer.global_step == 6 and Path(second.kb.passages_path).is_relative_to(moved)
    assert not list(moved.glob("last-v*.ckpt")), "the resumed run wrote a second last checkpoint"
    assert json.loads((moved / "run_info.json").read_text())["train_seconds"] > first_seconds  # both segments
    kill_actors(second)

    # A version built but never made live (the run stopped between build and swap) is removed on resume.
    passages = load_from_disk(second.hparams.passages_path)
    build_kb_version(
        second.hparams.passages_path,
        str(moved / "kb"),
        99,
        6,
        IndexConfig("flat"),
        second.similarity,
        np.array(passages["embeddings"], dtype=np.float32),
    )
    lost = json.loads((moved / "last.kb_version.json").read_text())["version"]
    shutil.rmtree(moved / "kb" / f"v{lost:04d}")
    with pytest.raises(FileNotFoundError, match=rf"KB v{lost}, which this checkpoint's .* --reencode_lost_kb"):
        resume(8)
    with torch.serialization.safe_globals([argparse.Namespace]):  # the hyperparameters Lightning saves
        state = torch.load(moved / "last.ckpt", map_location="cpu", weights_only=True)
    (restored,) = [len(s["history"]) for s in state["callbacks"].values() if "history" in s]
    with pytest.warns(UserWarning, match=rf"--reencode_lost_kb: .*v{lost:04d}.* is gone"):
        third = resume(8, "--reencode_lost_kb")
    refresh = next(c for c in third.trainer.callbacks if isinstance(c, KBRefreshCallback))
    first_new = refresh.history[restored]  # this segment's first refresh: before its first step
    assert third.trainer.global_step == 8 and first_new["trigger_step"] == first_new["swap_step"] == 6
    assert not (moved / "kb" / "v0099").exists(), "the never-live version was left behind"
    kill_actors(third)


def test_a_run_resumed_mid_epoch_sees_each_example_of_that_epoch_once(ray_local, finetune_argv, monkeypatch):
    """The training loader's order and position are in the checkpoint: stopped after 3 of an epoch's 20 batches
    and resumed, the run trains on each of the 40 examples once in that epoch (it used to start the epoch over)."""
    seen = []
    real_step = finetune_rag.GenerativeQAModule.training_step

    def recording_step(self, batch, batch_idx):
        seen.extend(batch["index"].tolist())
        return real_step(self, batch, batch_idx)

    monkeypatch.setattr(finetune_rag.GenerativeQAModule, "training_step", recording_step)
    argv = finetune_argv("--do_train", "--num_sanity_val_steps", "0", "--check_val_every_n_epoch", "1000")
    kill_actors(
        finetune_rag.main(finetune_rag.parse_args([*argv, "--max_steps", "3", "--save_last_every_n_steps", "3"]))
    )
    assert len(seen) == 6
    resume = [*argv, "--max_steps", "20", "--resume", "--allow_changed_settings"]
    kill_actors(finetune_rag.main(finetune_rag.parse_args(resume)))
    assert sorted(seen) == list(range(40)), "an example was seen twice, or not at all, in the resumed epoch"


def test_a_killed_trainer_resumes_from_last_ckpt(ray_local, finetune_argv, tmp_path, monkeypatch):
    """The trainer process is killed (SIGKILL) after it wrote a last.ckpt with a refreshed KB version; --resume
    then restores step, optimizer, scheduler and that KB version."""
    out = tmp_path / "out"
    argv = finetune_argv(
        "--do_train",
        "--end2end",
        "--indexing_freq",
        "1",
        "--save_last_every_n_steps",
        "2",
        "--max_epochs",
        "100",
        "--check_val_every_n_epoch",
        "1000",
        "--num_sanity_val_steps",
        "0",
    )
    env = {**os.environ, "RAG_E2E_RAY_ADDRESS": ray.get_runtime_context().gcs_address}  # joins this test's Ray
    proc = subprocess.Popen(
        _finetune_command(argv), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    pin = out / "last.kb_version.json"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if pin.is_file() and json.loads(pin.read_text())["version"] >= 1:
            break
        time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert pin.is_file(), "no last.ckpt with a refreshed KB version before the kill"
    with torch.serialization.safe_globals([argparse.Namespace]):  # the hyperparameters Lightning saves
        state = torch.load(out / "last.ckpt", map_location="cpu", weights_only=True)
    step, kb_version = state["global_step"], state["kb_version"]["version"]
    assert step >= 2 and kb_version >= 1 and state["optimizer_states"][0]["state"]

    with pytest.raises(FileExistsError):  # the killed run's directory is not silently reused
        run_dir.prepare_output_dir(finetune_rag.parse_args(argv))
    seen = {}

    class Observe(pl.Callback):
        def on_train_start(self, trainer, module):
            seen.update(
                step=trainer.global_step,
                kb=module.kb.version,
                optimizer=len(trainer.optimizers[0].state),
                scheduler=trainer.lr_scheduler_configs[0].scheduler.last_epoch,
            )

    trainer_cls = pl.Trainer
    monkeypatch.setattr(
        pl, "Trainer", lambda *a, callbacks=(), **kw: trainer_cls(*a, callbacks=[*callbacks, Observe()], **kw)
    )
    resume = [*argv, "--max_steps", str(step + 2), "--resume", "--allow_changed_settings"]
    module = finetune_rag.main(finetune_rag.parse_args(resume))
    assert seen["step"] == step and seen["scheduler"] == step and seen["kb"] == kb_version
    assert seen["optimizer"] > 0, "optimizer state not restored"
    assert module.trainer.global_step == step + 2
    refresh = next(c for c in module.trainer.callbacks if isinstance(c, KBRefreshCallback))
    assert refresh.history and refresh.history[0]["version"] >= 1  # the killed run's refresh history came back
    kill_actors(module)


def _children(pid: int) -> dict[int, str]:
    """Every descendant process of `pid` (from /proc), with its command line."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = {}, [pid]
    while frontier:
        parent = frontier.pop()
        for child, ppid in parents.items():
            if ppid == parent and child not in found:
                with contextlib.suppress(OSError):
                    found[child] = (Path("/proc") / str(child) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                    frontier.append(child)
    return found


@pytest.mark.slow
def test_a_killed_raylet_ends_the_run_and_leaves_no_actor(finetune_argv, tmp_path):
    """What an OOM killer may pick: Ray ends the trainer at once (from C++, so only the periodic last.ckpt is
    there to resume from), and none of the run's retrieval, encoding or builder actors outlives it."""
    out = tmp_path / "out"
    argv = finetune_argv(
        "--do_train",
        "--end2end",
        "--indexing_freq",
        "2",
        "--save_last_every_n_steps",
        "2",
        "--max_epochs",
        "100",
        "--check_val_every_n_epoch",
        "1000",
        "--num_sanity_val_steps",
        "0",
    )
    env = {k: v for k, v in os.environ.items() if k != "RAG_E2E_RAY_ADDRESS"}  # its own local Ray
    proc = subprocess.Popen(
        _finetune_command(argv), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None and not (out / "kb" / "v0001").is_dir():
        time.sleep(0.5)
    family = _children(proc.pid)
    raylets = [pid for pid, cmd in family.items() if "/raylet" in cmd.split(" ")[0]]
    actors = [pid for pid, cmd in family.items() if cmd.startswith("ray::")]
    assert len(raylets) == 1 and actors, f"no raylet or actors under the trainer: {family}"
    os.kill(raylets[0], signal.SIGKILL)
    try:
        assert proc.wait(timeout=60) != 0
    finally:
        proc.kill()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in actors):
        time.sleep(0.5)
    left = [family[pid] for pid in actors if Path(f"/proc/{pid}").exists()]
    assert not left, f"actors outlived the run: {left}"
    assert (out / "last.ckpt").is_file(), "no periodic last.ckpt to resume from"


# ---------------------------------------------------------------- cluster mode


def test_an_unreachable_ray_address_fails_fast(finetune_argv):
    address = f"127.0.0.1:{free_port()}"
    start = time.monotonic()
    env = {k: v for k, v in os.environ.items() if k != "RAG_E2E_RAY_ADDRESS"}
    done = subprocess.run(
        _finetune_command(finetune_argv("--ray_address", address)),
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0 and time.monotonic() - start < 30
    assert address in done.stderr and "ray start --head" in done.stderr


def test_a_run_without_ray_address_starts_its_own_ray_whatever_ray_start_recorded(tmp_path):
    """`ray start` records its cluster's address in Ray's temp dir (ray_current_cluster), and a bare ray.init() joins
    that cluster, or, when it is gone, hangs for minutes. A run without --ray_address starts its own loopback Ray, and
    says so when Ray's own RAY_ADDRESS names another."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # Ray's socket paths must stay under 108 characters
    (ray_tmp / "ray").mkdir()
    (ray_tmp / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{free_port()}")  # a cluster that is gone
    env = {k: v for k, v in os.environ.items() if k not in ("RAG_E2E_RAY_ADDRESS", "RAY_ADDRESS")}
    start = "import ray; from rag_end2end.kb.ray_start import init_ray; init_ray(None, 't')"
    try:
        done = subprocess.run(
            [sys.executable, "-c", f"{start}; print(ray.get_runtime_context().gcs_address)"],
            env=env | {"RAY_TMPDIR": str(ray_tmp), "RAY_ADDRESS": "127.0.0.1:1"},  # named, not followed
            capture_output=True,
            text=True,
            timeout=180,
        )
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1].startswith("127.0.0.1:"), done.stdout  # its own Ray, on loopback
    assert "RAY_ADDRESS=127.0.0.1:1 is set but not used" in done.stdout and "--ray_address" in done.stdout


def test_a_ray_address_that_is_not_ray_fails_fast(finetune_argv):
    """A service that is not Ray's GCS (here an HTTP server) passes a plain reachability check; the run must still
    stop at once, naming the address, instead of looping in ray.init."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    address = f"127.0.0.1:{server.server_address[1]}"
    env = {k: v for k, v in os.environ.items() if k != "RAG_E2E_RAY_ADDRESS"}
    try:
        start = time.monotonic()
        done = subprocess.run(
            _finetune_command(finetune_argv("--ray_address", address)),
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        server.shutdown()
    assert done.returncode != 0 and time.monotonic() - start < 30
    assert address in done.stderr and "not a Ray head node's GCS" in done.stderr


def test_a_run_joins_a_ray_cluster_by_address_with_relative_paths(tiny_models, tiny_kb, tmp_path):
    """`ray start --head` on loopback, then finetune_rag.py --ray_address from another working directory with
    relative KB paths: the actors (in the cluster's own processes) still find the KB."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAG_E2E_RAY_ADDRESS"}
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"  # stop at once on SIGTERM
    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Ray's socket paths must stay under 108 characters
    ray_start = [
        sys.executable,
        "-m",
        "ray.scripts.scripts",
        "start",
        "--head",
        "--block",
        "--port",
        str(port),
        "--node-ip-address",
        "127.0.0.1",
        "--include-dashboard",
        "false",
        "--num-cpus",
        "2",
        "--temp-dir",
        ray_tmp,
    ]
    head = subprocess.Popen(ray_start, env=env, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "head.log", "w"))
    try:
        passages, index = tiny_kb
        work = passages.parent
        argv = [
            "--model_name_or_path",
            str(tiny_models["rag_token"]),
            "--model_type",
            "rag_token",
            "--context_encoder_name",
            str(tiny_models["context_encoder"]),
            "--passages_path",
            passages.name,
            "--index_path",
            index.name,
            "--data_dir",
            str(REPO / "test_run" / "dummy-train-data"),
            "--output_dir",
            str(tmp_path / "out"),
            "--accelerator",
            "cpu",
            "--devices",
            "1",
            "--train_batch_size",
            "2",
            "--eval_batch_size",
            "4",
            "--index_type",
            "flat",
            "--do_train",
            "--max_steps",
            "2",
            "--num_sanity_val_steps",
            "0",
            "--ray_address",
            f"127.0.0.1:{port}",
        ]
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and head.poll() is None:  # its port opens when it is ready
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail(f"`ray start --head` did not open port {port}: {(tmp_path / 'head.log').read_text()[-2000:]}")
        done = subprocess.run(_finetune_command(argv), cwd=work, env=env, capture_output=True, text=True, timeout=400)
        assert done.returncode == 0, done.stderr[-3000:]
        assert (tmp_path / "out" / "last.ckpt").is_file()
    finally:
        head.send_signal(signal.SIGTERM)  # stopped by its own process id: other Ray instances are left alone
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_a_second_run_in_the_same_output_dir_stops_at_once_and_a_crashed_runs_lock_is_taken_over(
    finetune_argv, tmp_path
):
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])  # a live "first run"
    try:
        lock = out / run_dir.LOCK_FILE
        lock.write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(), "started": "12:00"}))
        args = finetune_rag.parse_args(finetune_argv("--do_train", "--max_steps", "1"))
        with pytest.raises(RuntimeError, match=rf"in use by another run \(pid {holder.pid}.*remove {lock}"):
            finetune_rag.main(args)
        assert [p.name for p in out.iterdir()] == [run_dir.LOCK_FILE]  # nothing else touched
    finally:
        holder.kill()
        holder.wait()
    # The holder is gone (a crash): the next run takes the lock over, with a warning, and gives it back.
    with pytest.warns(UserWarning, match="is gone; taking it over"):
        taken = run_dir.lock_output_dir(out)
    assert json.loads(taken.read_text())["pid"] == os.getpid()
    run_dir.release_lock(taken)
    assert not taken.exists()


def test_leftovers_of_interrupted_saves_are_removed_and_nothing_else(tiny_models, tmp_path):
    """What a killed save leaves (NAME.tmp-PID-HEX of a process that is gone) goes at the next start; a live
    writer's temporary, complete versions and the user's files stay. use_own_knowledge_dataset.py does the same."""
    from rag_end2end.files import remove_orphaned_temporaries

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    out = tmp_path / "out"
    leftovers = [out / f"checkpoint20.tmp-{gone.pid}-0123abcd", out / "kb" / f"v0003.tmp-{gone.pid}-89abcdef"]
    kept = [out / f"checkpoint30.tmp-{os.getpid()}-0123abcd", out / "kb" / "v0002", out / "notes.tmp-mine"]
    for path in leftovers + kept:
        (path / "part").mkdir(parents=True)
    removed = remove_orphaned_temporaries(out) + remove_orphaned_temporaries(out / "kb")
    assert sorted(removed) == sorted(leftovers) and not any(p.exists() for p in leftovers)
    assert all(p.exists() for p in kept)

    kb = tmp_path / "kb"
    (kb / f"my_knowledge_dataset.tmp-{gone.pid}-fedcba98").mkdir(parents=True)
    use_own_knowledge_dataset.main(
        use_own_knowledge_dataset.parse_args(
            [
                "--csv_path",
                str(Path(__file__).parents[1] / "test_run" / "dummy-kb" / "my_knowledge_dataset.csv"),
                "--output_dir",
                str(kb),
                "--index_type",
                "flat",
                "--dpr_ctx_encoder_model_name",
                str(tiny_models["context_encoder"]),
                "--device",
                "cpu",
            ]
        )
    )
    assert sorted(p.name for p in kb.iterdir()) == ["my_knowledge_dataset", "my_knowledge_dataset_hnsw_index.faiss"]


def test_a_run_stopped_inside_a_step_resumes_on_that_step(ray_local, finetune_argv, monkeypatch):
    """Training stopped by an exception inside a step (Ctrl-C, SIGTERM) leaves a last.ckpt whose loader position
    is that of the last finished step: resumed, the run trains on the interrupted batch, sees each of the epoch's
    40 examples once, makes all 20 steps, and still validates at the epoch's end (it used to lose the batch,
    end the epoch one step short and skip the validation, and so test an unvalidated model)."""
    seen, validations, calls = [], [], {"n": 0}
    real_step, real_end = (
        finetune_rag.GenerativeQAModule.training_step,
        finetune_rag.GenerativeQAModule.on_validation_epoch_end,
    )

    def stopping_step(self, batch, batch_idx):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("stopped inside step 5")
        seen.extend(batch["index"].tolist())
        return real_step(self, batch, batch_idx)

    def recording_end(self):
        validations.append(self.trainer.global_step)
        return real_end(self)

    monkeypatch.setattr(finetune_rag.GenerativeQAModule, "training_step", stopping_step)
    monkeypatch.setattr(finetune_rag.GenerativeQAModule, "on_validation_epoch_end", recording_end)
    argv = finetune_argv("--do_train", "--num_sanity_val_steps", "0", "--num_train_epochs", "1")
    with pytest.raises(RuntimeError, match="stopped inside step 5"):
        finetune_rag.main(finetune_rag.parse_args([*argv, "--save_last_every_n_steps", "3"]))
    assert len(seen) == 8  # four steps finished
    module = finetune_rag.main(finetune_rag.parse_args([*argv, "--resume"]))
    kill_actors(module)
    assert sorted(seen) == list(range(40)), "the interrupted batch was lost, or a batch was seen twice"
    assert module.trainer.global_step == 20 and validations == [20], "the resumed epoch ended without validating"


# ---------------------------------------------------------------- what a validation cannot score


def test_retriever_only_validation_leaves_out_the_questions_it_cannot_score(tiny_models, tiny_kb, tmp_path):
    """Two held-out questions have gold passages (0 and 5: each the other's negative), two have neither a gold id
    nor an answer any passage holds. Their batch used to score InfoNCE 0.0, halving val_loss (and a validation of
    such batches alone, 0.0, was kept as the best model for good); now it is left out, counted and warned about,
    and a validation that scores nothing logs NaN, which the checkpoint ranks last."""
    from rag_end2end.kb.search import KBSearch
    from rag_end2end.tiny_models import HIDDEN

    data = tmp_path / "data"
    shutil.copytree(REPO / "test_run" / "dummy-train-data", data)
    questions = ["what is hepcidin?", "what leads to oxidative stress?", "who painted the moon?", "why is it blue?"]
    (data / "val.source").write_text("\n".join(questions) + "\n")
    (data / "val.target").write_text("a peptide hormone\nreactive oxygen\nqqzx vvwy\nzzqx yyvw\n")
    gold = [{"answers": ["a"], "gold_passage_ids": ids} for ids in ([0], [5], [], [])]
    (data / "val.gold.jsonl").write_text("".join(json.dumps(g) + "\n" for g in gold))
    passages, index = map(str, tiny_kb)
    argv = ["--training_mode", "retriever_only", "--model_type", "rag_token", "--index_type", "flat"]
    argv += ["--question_encoder_name_or_path", str(tiny_models["question_encoder"]), "--eval_batch_size", "2"]
    argv += ["--context_encoder_name", str(tiny_models["context_encoder"]), "--passages_path", passages]
    argv += ["--index_path", index, "--data_dir", str(data), "--output_dir", str(tmp_path / "run")]

    def validate(*extra: str) -> tuple[dict, finetune_rag.GenerativeQAModule]:
        module = finetune_rag.GenerativeQAModule(
            finetune_rag.parse_args([*argv, *extra]), KBSearch(passages, index, HIDDEN)
        )
        trainer = pl.Trainer(accelerator="cpu", devices=1, **QUIET)
        with pytest.warns(UserWarning, match=r"val: 2 question\(s\) could not be scored .*: 2 without a positive"):
            (metrics,) = trainer.validate(module, verbose=False)
        return metrics, module

    metrics, module = validate()
    batch = next(iter(module.val_dataloader()))  # the scored questions' batch, alone, as validation ran it
    module.eval()
    with torch.no_grad():
        scored = module.objective.question_losses(module.model, batch, module._mined(batch, "val"))
    assert None not in scored and min(scored) > 0
    assert metrics["val_scored"] == 0.5 and metrics["val_loss"] == pytest.approx(sum(scored) / 2, rel=1e-5)

    (data / "val.source").write_text("\n".join(questions[2:] + questions[:2]) + "\n")  # the unscorable first
    (data / "val.target").write_text("qqzx vvwy\nzzqx yyvw\na peptide hormone\nreactive oxygen\n")
    (data / "val.gold.jsonl").write_text("".join(json.dumps(g) + "\n" for g in gold[2:] + gold[:2]))
    metrics, _ = validate("--n_val", "2")
    assert metrics["val_scored"] == 0 and metrics["val_loss"] != metrics["val_loss"], metrics  # NaN, never 0.0


# ---------------------------------------------------------------- Ray's token


def test_rays_token_is_readable_by_its_owner_alone(tmp_path, monkeypatch):
    """Ray's token auth wrote ~/.ray/auth_token with mode 0644 (readable by other local users where home
    directories are): a local Ray started by the toolkit now finds it written 0600 in a 0700 directory, and works
    with it; a token that others could read is made private, never replaced."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS", "RAG_E2E_RAY_ADDRESS")}
    env["HOME"] = str(tmp_path)
    start = (
        "import ray; from rag_end2end.kb.ray_start import init_ray; init_ray(None, 'token-test'); "
        "print(ray.get(ray.remote(lambda: 'answered').remote())); ray.shutdown()"
    )
    done = subprocess.run([sys.executable, "-c", start], env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0 and "answered" in done.stdout, done.stderr[-3000:]
    token = tmp_path / ".ray" / "auth_token"
    assert token.stat().st_mode & 0o777 == 0o600 and token.parent.stat().st_mode & 0o777 == 0o700
    assert len(token.read_text()) == 64

    from rag_end2end.kb.ray_start import private_ray_token

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_MODE")
    token.chmod(0o644)
    before = token.read_text()
    assert private_ray_token(create=False) == token
    assert token.stat().st_mode & 0o777 == 0o600 and token.read_text() == before
