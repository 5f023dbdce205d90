"""Files written whole or not at all, for the whole package: each is written under a temporary sibling name
(NAME.tmp-PID-HEX) and renamed into place, so that a crash, Ctrl-C or a full disk never leaves a torn file where a
reader looks; what an interrupted write left is recognised by its name and removed at the next start.

    with atomic_write(out / "index.faiss", "the index") as tmp:    # a file or a directory
        faiss.write_index(index, str(tmp))                          # renamed onto out/index.faiss when the block ends
    with atomic_writes([a, b]) as (tmp_a, tmp_b): ...               # several, renamed together once all are written
    atomic_write_text(path, text)                                   # one text file
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

_TEMPORARY = re.compile(r"\.tmp-(\d+)-[0-9a-f]{8}$")  # temporary_sibling's suffix: the writer's PID, then 8 hex


def temporary_sibling(path: str | os.PathLike) -> Path:
    """Where `path` is written before its rename into place: NAME.tmp-PID-HEX (the PID tells a live writer)."""
    path = Path(path)
    return path.with_name(f"{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def process_alive(pid: int) -> bool:
    """Whether a process of this host has this pid."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_orphaned_temporaries(directory: str | os.PathLike, of: str = "") -> list[Path]:
    """Remove the `temporary_sibling`s in `directory` (of the file named `of` only, if given) whose writing process
    is gone: what an interrupted save left (Ctrl-C, SIGKILL, a full disk). Nothing else, and no temporary that a
    live process still writes."""
    removed = []
    pattern = f"{glob.escape(of) if of else '*'}.tmp-*"
    for path in sorted(Path(directory).glob(pattern)) if Path(directory).is_dir() else []:
        match = _TEMPORARY.search(path.name)
        if not match or process_alive(int(match[1])):
            continue
        shutil.rmtree(path) if path.is_dir() else path.unlink()
        removed.append(path)
    return removed


def remove_tree(path: str | os.PathLike) -> None:
    """Remove a directory as a reader can bear it: renamed aside to a `temporary_sibling` first (one atomic step),
    then deleted, so that a reader finds the whole directory or none, never half of one; what a crash leaves is a
    temporary that `remove_orphaned_temporaries` clears."""
    aside = temporary_sibling(path)
    os.rename(path, aside)
    shutil.rmtree(aside)


@contextmanager
def writing(what: str, path: str | os.PathLike, *temporaries: str | os.PathLike) -> Iterator[None]:
    """Name `path` in the errors of writing it (a full or read-only disk gives an errno and no path; faiss's and
    torch's write errors neither), after removing the `temporaries` the write left (our own `.tmp` names)."""
    try:
        yield
    except BaseException as err:
        for tmp in map(Path, temporaries):
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) and not isinstance(err, FileExistsError):  # the same kind, e.g. FileNotFoundError
            detail = f"writing {what} {path} failed: {err}"
            raise type(err)(*((detail,) if err.errno is None else (err.errno, detail, err.filename))) from err
        if isinstance(err, RuntimeError):
            raise RuntimeError(f"writing {what} {path} failed: {err}") from err
        raise


@contextmanager
def atomic_writes(
    paths: Sequence[str | os.PathLike],
    what: str = "file",
    *,
    replace: bool = True,
    temporaries: Sequence[str | os.PathLike] | None = None,
    rename: bool = True,
) -> Iterator[list[Path]]:
    """The one way this package writes files or directories atomically: yields the temporary paths to write
    (`temporaries`, else a fresh `temporary_sibling` of each), renamed onto `paths` in order when the block ends
    without error; on an error they are removed and the error names the paths (`writing`). The rename is
    `os.replace`: an existing file is replaced, an existing non-empty directory is not (OSError); `replace=False`
    refuses any existing path (FileExistsError). `rename=False`: this process's share of a write that another
    process renames (the DDP ranks of one checkpoint: every rank takes part, rank 0 writes)."""
    paths = [Path(p) for p in paths]
    tmps = [Path(t) for t in temporaries] if temporaries is not None else [temporary_sibling(p) for p in paths]
    with writing(what, ", ".join(map(str, paths)), *tmps):
        yield tmps
        for path, tmp in zip(paths, tmps) if rename else ():
            if not replace and path.exists():
                raise FileExistsError(f"{path} already exists; refusing to overwrite it")
            os.replace(tmp, path)


@contextmanager
def atomic_write(
    path: str | os.PathLike,
    what: str = "file",
    *,
    replace: bool = True,
    temporary: str | os.PathLike | None = None,
    rename: bool = True,
) -> Iterator[Path]:
    """`atomic_writes` of one file or directory: yields its temporary path."""
    temporaries = None if temporary is None else [temporary]
    with atomic_writes([path], what, replace=replace, temporaries=temporaries, rename=rename) as (tmp,):
        yield tmp


def atomic_write_text(path: str | os.PathLike, text: str, what: str = "file") -> None:
    """Write `text` (UTF-8) to `path` atomically (`atomic_writes`)."""
    with atomic_write(path, what) as tmp:
        tmp.write_text(text, encoding="utf-8")
