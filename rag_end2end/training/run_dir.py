"""A run's output directory: its lock, refusing or moving an earlier run's files, the checkpoint a resume
starts from, and the run id that names the run's Ray actors."""

from __future__ import annotations

import argparse
import json
import os
import socket
import time
import uuid
import warnings
from pathlib import Path

from rag_end2end.files import process_alive
from rag_end2end.kb.versions import KB_VERSION_FILE

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
