"""A run's output directory: its lock, refusing or moving an earlier run's files, the checkpoint a resume
starts from, and the run id that names the run's Ray actors."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import time
import uuid
import warnings
from pathlib import Path

import torch

from rag_end2end.files import process_alive
from rag_end2end.kb.versions import KB_VERSION_FILE, kb_fingerprint
from rag_end2end.options import MODEL_FLAGS, build_parser

RUN_ID_ENV = "RAG_E2E_RUN_ID"  # how DDP child processes learn the run id of the first one
RUN_FILES = (
    "*.ckpt",
    f"*.{KB_VERSION_FILE}",
    "checkpoint*",
    "metrics.json",
    "test_results.txt",
    "test_generations.txt",
    "logs",
    "kb",
    "plots",
    "run_info.json",
)


def prepare_output_dir(args: argparse.Namespace) -> None:
    """Refuse to train into an earlier run's directory unless told to continue it (--resume) or start over
    (--overwrite_output_dir: its files move to OUTPUT/previous_runs/, nothing is deleted)."""
    out = Path(args.output_dir)
    if args.resume and not args.resume_from_checkpoint:
        args.resume_from_checkpoint = newest_checkpoint(out)
    if args.do_train and args.resume_from_checkpoint:
        check_resume_settings(args)
    if not args.do_train or args.resume_from_checkpoint or not is_first_process():
        return
    earlier = sorted({p.name for pattern in RUN_FILES for p in out.glob(pattern)}) if out.is_dir() else []
    if not earlier:
        return
    if not args.overwrite_output_dir:
        raise FileExistsError(
            f"--output_dir {out} holds an earlier run ({', '.join(earlier[:6])}): pass --resume to continue it, "
            "--overwrite_output_dir to start over (its files move to OUTPUT/previous_runs/), or another directory"
        )
    dest = out / "previous_runs" / time.strftime("%Y%m%d-%H%M%S")
    dest.mkdir(parents=True)
    for name in earlier:
        (out / name).rename(dest / name)
    print(f"--overwrite_output_dir: the earlier run's files are in {dest}")


LOCK_FILE = ".run.lock"


def lock_output_dir(out: Path) -> Path | None:
    """Take OUTPUT/.run.lock (pid, host, start time) for this run, so that a second run into the same directory
    stops at once instead of interleaving checkpoints and KB versions with it. A lock whose process is gone (a
    crashed run on this host) is taken over with a warning. DDP ranks > 0 run under rank 0's lock."""
    if not is_first_process():
        return None
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_FILE
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                holder = json.loads(path.read_text())
            except (OSError, ValueError):  # being written by a run starting this instant
                holder = {"pid": None, "host": "?", "started": "?"}
            if holder.get("host") == me["host"] and holder.get("pid") and not process_alive(holder["pid"]):
                warnings.warn(
                    f"{path}: the run that held it (pid {holder['pid']}, since {holder['started']}) is "
                    "gone; taking it over",
                    stacklevel=2,
                )
                path.unlink(missing_ok=True)
                continue
            raise RuntimeError(
                f"--output_dir {out} is in use by another run (pid {holder.get('pid')} on {holder.get('host')}, "
                f"since {holder.get('started')}): wait for it to end or use another directory; if that run is "
                f"gone, remove {path}"
            ) from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return path
    raise RuntimeError(f"{path}: could not take the lock")


def release_lock(path: Path) -> None:
    """Remove this run's lock (only if it is still this process's)."""
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass


def newest_checkpoint(output_dir: Path) -> str:
    """The newest `last*.ckpt` (Lightning named a copy's `last-v1.ckpt` before last.ckpt was replaced in place),
    else the newest checkpoint."""
    found = sorted(output_dir.glob("last*.ckpt"), key=lambda p: p.stat().st_mtime)
    found = found or sorted(output_dir.glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"--resume: no checkpoint (*.ckpt) in {output_dir}")
    return str(found[-1])


def is_first_process() -> bool:
    """Global rank 0 before the Trainer exists (Lightning's and torchrun's launchers set these variables)."""
    return all(int(os.environ.get(name, 0)) == 0 for name in ("RANK", "NODE_RANK", "LOCAL_RANK"))


def resolve_run_id(run_id: str | None) -> str:
    """The id that names this run's Ray actors: the flag, else the one the first process of this run exported
    (DDP ranks re-run this script), else the launcher's job id, else a new one."""
    run_id = run_id or (None if is_first_process() else os.environ.get(RUN_ID_ENV))
    run_id = run_id or os.environ.get("TORCHELASTIC_RUN_ID") or os.environ.get("SLURM_JOB_ID")
    run_id = run_id or f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    os.environ[RUN_ID_ENV] = run_id
    return run_id


# ---------------------------------------------------------------------- what a resume may change

# What a run is: a resume that changes any of these would put checkpoints of other models, recipes, marginals,
# data or KBs in one run directory (a changed --training_mode, or the LoRA settings, also fail to load its weights).
RUN_SETTINGS = (
    *MODEL_FLAGS,
    "init_from",
    "generator_type",
    "training_mode",
    "model_type",
    "n_docs",
    "similarity",
    "question_pooling",
    "context_pooling",
    "shared_encoder",
    "query_side_only",
    "retriever_loss",
    "peft",
    "lora_r",
    "lora_alpha",
    "lora_target_modules",
    "reconstruction_ratio",
    "train_batch_size",
    "accumulate_grad_batches",
    "lr_scheduler",
    "adafactor",
    "seed",
    "refresh_policy",  # which passages each refresh re-encodes: the KB versions the run's weights met
    "refresh_slices",
    "hot_random_share",
    "hot_neighbours",
    "full_refresh_every",
)
# The partial policies' parameters: compared only when the saved or the new --refresh_policy is partial (under
# `full` they do nothing).
PARTIAL_POLICY_SETTINGS = ("refresh_slices", "hot_random_share", "hot_neighbours", "full_refresh_every")
# Safe to change on a resume (how fast, how long, how often it logs and validates), with --allow_changed_settings.
# Flags in neither list are not compared: e.g. --gradient_checkpointing, which trades memory for time and leaves the
# loss and gradients as they were.
SAFE_SETTINGS = (
    "learning_rate",
    "retriever_learning_rate",
    "temperature_learning_rate",
    "max_steps",
    "max_epochs",
    "log_every_n_steps",
    "logger_name",
    "val_check_interval",
    "check_val_every_n_epoch",
    # How many processes train: fewer after a node is lost. The global batch (train_batch_size per process) changes.
    "num_nodes",
    "devices",
    "gpus",
)
MODEL_PATHS = RUN_SETTINGS[:7]  # compared as the directories they name, when they are local


def data_fingerprint(directory: str | os.PathLike) -> str:
    """A hash of the QA files a run reads from a --data_dir (each split's .source, .target and .gold.jsonl that is
    there), so that the same data moved elsewhere matches and edited or other data does not."""
    digest = hashlib.sha256()
    for split in ("train", "val", "test"):
        for name in (f"{split}.source", f"{split}.target", f"{split}.gold.jsonl"):
            path = Path(directory) / name
            if path.is_file():
                digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def run_fingerprints(args: argparse.Namespace) -> dict[str, str]:
    """The identities of a run's data, kept in its checkpoints (`fingerprints`): its --data_dir's QA files, its base
    KB's passages (--passages_path), its statements (--reconstruction_dir)."""
    prints = {"data_dir": data_fingerprint(args.data_dir), "passages_path": kb_fingerprint(args.passages_path)}
    if getattr(args, "reconstruction_dir", None):
        prints["reconstruction_dir"] = data_fingerprint(args.reconstruction_dir)
    return prints


def _flag_names() -> dict[str, str]:
    """Each option's dest -> the flag a user types (--num_train_epochs for max_epochs)."""
    return {a.dest: a.option_strings[0] for a in build_parser()._actions if a.option_strings}


def _model_path(value):
    return os.path.abspath(value) if isinstance(value, str) and os.path.exists(value) else value


def check_resume_settings(args: argparse.Namespace) -> None:
    """Refuse, in one line naming each changed flag with both values, to resume a checkpoint under other settings
    than it was trained with (RUN_SETTINGS; its data and base KB by fingerprint, wherever they now lie); changes of
    SAFE_SETTINGS only with --allow_changed_settings, which lists them. A checkpoint of an earlier version of the
    toolkit, without fingerprints, has its data and KB compared by path."""
    path = args.resume_from_checkpoint
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):  # the hyperparameters Lightning saves
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"--resume_from_checkpoint {path}: no such file") from None
    except Exception as err:  # a torn or foreign file: say which
        raise ValueError(f"{path}: not a checkpoint of finetune_rag.py ({type(err).__name__}: {err})") from None
    saved = state.get("hyper_parameters") or {}
    saved = dict(vars(saved) if isinstance(saved, argparse.Namespace) else saved)
    prints = state.get("fingerprints")
    names = _flag_names()
    changed, safe = [], []
    partial = {saved.get("refresh_policy", "full"), getattr(args, "refresh_policy", "full")} != {"full"}
    for name in (*RUN_SETTINGS, *SAFE_SETTINGS):
        if name not in saved or not hasattr(args, name) or (name in PARTIAL_POLICY_SETTINGS and not partial):
            continue
        old, new = saved[name], getattr(args, name)
        if name in MODEL_PATHS:
            old, new = _model_path(old), _model_path(new)
        if old != new:
            (safe if name in SAFE_SETTINGS else changed).append(f"{names.get(name, name)} {new} (was {old})")
    if prints is not None:
        now = run_fingerprints(args)
        what = {
            "data_dir": "its QA files differ",
            "passages_path": "another KB",
            "reconstruction_dir": "other statements",
        }
        for name, old in prints.items():
            if now.get(name) != old:
                changed.append(f"--{name} {getattr(args, name, None)} ({what[name]}: {now.get(name)}, was {old})")
    else:
        for name in ("data_dir", "passages_path"):
            if name in saved and saved[name] != getattr(args, name):
                changed.append(f"--{name} {getattr(args, name)} (was {saved[name]})")
    allow = getattr(args, "allow_changed_settings", False)
    if changed or (safe and not allow):
        hint = (
            "resume with the checkpoint's values, or start a new run from its weights in another --output_dir "
            "(--init_from OUTPUT/checkpoint<step>)"
        )
        if safe and not changed:
            hint = "pass --allow_changed_settings to resume with these, or resume with the checkpoint's values"
        raise ValueError(f"--resume: {path} was trained with other settings: {'; '.join(changed + safe)}: {hint}")
    if safe:
        print(f"--allow_changed_settings: resuming {path} with {'; '.join(safe)}")
