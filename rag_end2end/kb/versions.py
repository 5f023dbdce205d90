"""The knowledge-base version store: a run's versions live in OUTPUT/kb/vNNNN (passages with embeddings, their
index, READY.json written last, so a directory without it is incomplete), each published whole by one rename; a
checkpoint names the version its weights were trained against in kb_version.json. Also the user's version 0
(`save_kb`), and the builder that indexes what a refresh's encoding actors wrote (`publish_kb_version`, run in the
`KBBuilder` Ray actor)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss
import numpy as np
from datasets import Dataset, load_from_disk
from datasets import config as datasets_config

from rag_end2end.files import atomic_write, atomic_writes, remove_tree, temporary_sibling
from rag_end2end.kb.index import IndexConfig, build_faiss_index, new_faiss_index, read_index
from rag_end2end.kb.parts import (
    declare_dataset,
    encoded_path,
    part_path,
    part_rows,
    part_vectors,
    sample_parts,
    write_passages_part,
)
from rag_end2end.kb.passages import shard_bounds
from rag_end2end.kb.ray_start import quiet_actor
from rag_end2end.kb.similarity import write_kb_info

READY_MARKER = "READY.json"  # written last: a version directory without it is incomplete
VERSION_DIR_RE = re.compile(r"^v(\d{4,})$")
# The KB version a checkpoint's weights were trained against: inside every checkpoint<step>/ and export, and as
# `<name>.kb_version.json` beside each `<name>.ckpt`.
KB_VERSION_FILE = "kb_version.json"


@dataclass
class KBVersion:
    """One knowledge-base version: passages with embeddings plus the index over them."""

    version: int
    passages_path: str
    index_path: str
    embedding_step: int = 0  # optimizer step whose context-encoder weights made the embeddings
    similarity: str = "dot"  # how the embeddings are scored: dot, cosine (unit-length vectors) or l2 (distance)

    def stored(self, base: str | os.PathLike, run_dir: str | os.PathLike | None = None) -> dict:
        """This version as a run saves it: paths inside `run_dir` (default `base`) relative to `base` when `base` is in
        the run too, so that a moved or copied run directory resumes on its own KB versions; other paths (the user's
        version 0, or any for a checkpoint saved outside its run) absolute (checkpoint_kb refuses a relative path
        that leads out of a checkpoint's directory)."""
        inside, here = Path(os.path.abspath(run_dir or base)), Path(os.path.abspath(base))
        moves_with_the_run = here == inside or inside in here.parents  # else a relative path would lead out of it
        fields = asdict(self)
        for key in ("passages_path", "index_path"):
            path = Path(os.path.abspath(fields[key]))
            if moves_with_the_run and (path == inside or inside in path.parents):
                fields[key] = os.path.relpath(path, here)
        return fields

    @classmethod
    def restored(cls, saved: dict, base: str | os.PathLike) -> KBVersion:
        """The version `stored` wrote, its relative paths taken from `base` (absolute ones kept)."""
        paths = {key: os.path.normpath(os.path.join(base, saved[key])) for key in ("passages_path", "index_path")}
        return cls(**(saved | paths))


def version_dir(kb_root: str | os.PathLike, version: int) -> Path:
    return Path(kb_root) / f"v{version:04d}"


def read_version(path: str | os.PathLike) -> KBVersion | None:
    """The version stored in `path`, or None when it is incomplete (no marker)."""
    marker = Path(path) / READY_MARKER
    return KBVersion(**json.loads(marker.read_text())) if marker.is_file() else None


def list_versions(kb_root: str | os.PathLike) -> list[KBVersion]:
    """Complete versions under `kb_root`, oldest first; partial `.tmp-*` directories are ignored."""
    root = Path(kb_root)
    found = [read_version(p) for p in root.iterdir() if VERSION_DIR_RE.match(p.name)] if root.is_dir() else []
    return sorted((v for v in found if v is not None), key=lambda v: v.version)


def prune_versions(
    kb_root: str | os.PathLike, keep: int, protect: set[int] = frozenset(), only: set[int] | None = None
) -> list[int]:
    """Delete all but the newest `keep` complete versions under `kb_root`, sparing `protect` (versions that
    saved checkpoints name) and, when `only` is given, every version not in it (another run's)."""
    if keep < 1:
        return []
    old = [v for v in list_versions(kb_root)[:-keep] if v.version not in protect]
    old = [v for v in old if only is None or v.version in only]
    return [kb.version for kb in old if _remove_version(version_dir(kb_root, kb.version))]


def remove_unreachable_versions(kb_root: str | os.PathLike, live: int, keep: set[int]) -> list[int]:
    """Delete the complete versions newer than `live` that are not in `keep` (those checkpoints name, and those the
    run's restored history made live): built but never made live before the run stopped, or live only after its
    last checkpoint, so a resumed run can never reach them (and pruning, which spares what it did not see go
    live, would keep them for ever)."""
    stale = [v.version for v in list_versions(kb_root) if v.version > live and v.version not in keep]
    return [version for version in stale if _remove_version(version_dir(kb_root, version))]


def _remove_version(path: Path) -> bool:
    """Remove a complete vNNNN that this toolkit wrote; a symbolic link there (a user's, e.g. a version moved to
    another disk) is left as it is, with its target, and named in a warning (shutil.rmtree refused it, naming no
    path, and stopped the run)."""
    if path.is_symlink():
        warnings.warn(
            f"{path} is a symbolic link (to {os.readlink(path)}), not a KB version this run wrote: left as it is, "
            "with what it points to; remove it yourself if it is no longer needed",
            stacklevel=3,
        )
        return False
    remove_tree(path)  # an evaluator reading an old version sees it whole or not at all
    return True


def staging_dir(kb_root: str | os.PathLike, version: int) -> Path:
    """A fresh temporary directory name for `version` while it is written (list_versions ignores it)."""
    return temporary_sibling(version_dir(kb_root, version))


def checkpoint_kb(checkpoint: str | os.PathLike) -> tuple[str, str] | None:
    """The (passages, index) paths a checkpoint or export names in its kb_version.json (relative paths are
    relative to it), or None when it names none."""
    saved = Path(checkpoint) / KB_VERSION_FILE
    if not saved.is_file():
        return None
    kb = json.loads(saved.read_text())  # absolute paths stay as they are
    run = os.path.normpath(Path(checkpoint).absolute().parent)  # what a relative path may reach: its run (or export)
    paths = []
    for key in ("passages_path", "index_path"):
        path = os.path.normpath(Path(checkpoint) / kb[key])
        if not os.path.isabs(kb[key]) and os.path.commonpath([run, os.path.abspath(path)]) != run:
            raise ValueError(
                f"{saved}: {key} {kb[key]!r} leads out of the run directory {run}; a KB elsewhere is named by an "
                "absolute path (what finetune_rag.py writes for one)"
            )
        paths.append(path)
    return tuple(paths)


def kb_fingerprint(passages_path: str | os.PathLike, samples: int = 1000) -> str:
    """What identifies a KB's passages wherever it lies: `N:hash`, N passages and a hash of the titles and texts of
    `samples` of them, evenly spaced, the last included (cheap on 21 M passages; any re-split or another corpus
    changes it, embeddings do not: a refresh re-encodes the same passages)."""
    passages = load_from_disk(str(passages_path)).select_columns(["title", "text"])
    n = len(passages)
    digest = hashlib.sha256(str(n).encode())
    for row in sorted({*range(0, n, max(1, n // samples)), n - 1} - {-1}):
        record = passages[row]
        digest.update(f"{record['title']}\0{record['text']}\0".encode())
    return f"{n}:{digest.hexdigest()[:16]}"


def save_kb(
    dataset: Dataset,
    passages_path: str | os.PathLike,
    index_path: str | os.PathLike,
    cfg: IndexConfig,
    similarity: str = "dot",
):
    """Write the passages dataset (declaring its `similarity`) and its index to user-chosen paths, each under a
    temporary name first. Refuses to replace existing files: a user's KB is never overwritten."""
    passages_path, index_path = Path(passages_path), Path(index_path)
    for path in (passages_path, index_path):
        if path.exists():
            raise FileExistsError(f"{path} already exists; remove it or choose another --output_dir")
    index = build_faiss_index(np.asarray(dataset.with_format("numpy")["embeddings"]), cfg, similarity)
    with atomic_writes([passages_path, index_path], "KB", replace=False) as (tmp_passages, tmp_index):
        dataset.save_to_disk(str(tmp_passages))
        write_kb_info(tmp_passages, similarity)
        faiss.write_index(index, str(tmp_index))


def publish_kb_version(
    kb_root: str,
    version: int,
    embedding_step: int,
    cfg: IndexConfig,
    similarity: str,
    staging: str | os.PathLike,
    *part_rows: int,
) -> KBVersion:
    """Index the part files that the encoding shards wrote under `staging` (`part_rows` rows each, in shard
    order), declare them one passages dataset and publish `kb_root/vNNNN` atomically. The embeddings are read
    a record batch at a time, never merged: the builder holds the index and one batch. Runs in a Ray actor."""
    final, staging = version_dir(kb_root, version), Path(staging)
    with atomic_write(final, "KB version", replace=False, temporary=staging):
        if final.exists():
            raise FileExistsError(f"{final} already exists; refusing to overwrite a knowledge-base version")
        parts = [part_path(staging, i, len(part_rows)) for i in range(len(part_rows))]
        index = index_parts(parts, sum(part_rows), cfg, similarity)
        if index.ntotal != sum(part_rows):
            raise ValueError(f"{staging}: the parts hold {index.ntotal} passages, the encoders wrote {sum(part_rows)}")
        kb = KBVersion(version, str(final / "passages"), str(final / "index.faiss"), embedding_step, similarity)
        _seal(staging, parts, index, kb)
    return kb


def index_parts(parts: list[Path], n_rows: int, cfg: IndexConfig, similarity: str) -> faiss.Index:
    """A new index for `cfg` over the part files' `n_rows` vectors, read a record batch at a time."""
    dim = next(part_vectors(parts[:1]))[1].shape[1]
    index = new_faiss_index(dim, n_rows, cfg, lambda rows: sample_parts(parts, rows), similarity)
    for _, vectors in part_vectors(parts):
        index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return index


def _seal(staging: Path, parts: list[Path], index: faiss.Index, kb: KBVersion) -> None:
    """Make `staging` a complete version: its parts declared one passages dataset, the index, READY.json last."""
    declare_dataset(staging / "passages", parts)
    write_kb_info(staging / "passages", kb.similarity)
    faiss.write_index(index, str(staging / "index.faiss"))
    (staging / READY_MARKER).write_text(json.dumps(asdict(kb), indent=1))


def updates_in_place(index: faiss.Index) -> bool:
    """Whether a partial refresh can replace some vectors of `index` by id (remove_ids, then add_with_ids): an IVF
    index (its trained centroids kept; only the touched lists change). A flat index would renumber the rows after
    those removed, and HNSW cannot remove: both are rebuilt from the version's stored vectors."""
    return faiss.try_extract_index_ivf(index) is not None


def publish_partial_kb_version(
    kb_root: str,
    version: int,
    embedding_step: int,
    cfg: IndexConfig,
    similarity: str,
    staging: str | os.PathLike,
    previous: KBVersion,
    rows: np.ndarray,
    n_blocks: int,
    encoded: list[str],
    *written: int,
) -> KBVersion:
    """Publish `kb_root/vNNNN` (atomically, as publish_kb_version) from `previous` with the sorted `rows` given new
    vectors: those in the .npy files `encoded` (one per encoding actor that had rows, in row order, `written` rows
    each; under `staging` (encoded_path), removed before the version is sealed). The passages are written as
    `n_blocks` part files of contiguous rows (shard_bounds): a block without a new vector whose file `previous`
    already holds under the same name and with the same rows (a version of this run's, written in the same blocks)
    is hard-linked, neither re-encoded nor copied; any other block is written anew, its untouched rows' vectors
    copied from `previous` unchanged. The index is updated in place where its type allows (updates_in_place), else
    rebuilt from the new version's vectors. Before sealing, the parts' rows must add up to the KB's and the index's
    (a ValueError naming the version otherwise). Runs in the builder actor."""
    final, staging = version_dir(kb_root, version), Path(staging)
    with atomic_write(final, "KB version", replace=False, temporary=staging):
        if final.exists():
            raise FileExistsError(f"{final} already exists; refusing to overwrite a knowledge-base version")
        rows = np.asarray(rows, dtype=np.int64)
        new = np.concatenate([np.load(path) for path in encoded])
        if not len(new) == sum(written) == len(rows):
            raise ValueError(f"{staging}: {len(rows)} rows to re-encode, the encoders wrote {len(new)} vectors")
        old = load_from_disk(previous.passages_path)
        old_dir = Path(previous.passages_path)
        # Hard links only to this run's versions (never a user's files) in the same blocks.
        ours = Path(os.path.abspath(old_dir)).parent.parent == Path(os.path.abspath(kb_root))
        bounds = shard_bounds(len(old), n_blocks)
        old_bounds = _part_bounds(old_dir, [part_path(old_dir.parent, j, n_blocks).name for j in range(n_blocks)])
        parts = []
        for j, (start, end) in enumerate(bounds):
            part = part_path(staging, j, n_blocks)
            lo, hi = np.searchsorted(rows, [start, end])
            # The old file holds exactly this block's rows: a version built in other blocks (uneven encoding
            # shards, build_kb_version) may use the same names for other rows.
            if lo == hi and ours and old_bounds is not None and old_bounds[j] == (start, end):
                part.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(old_dir / part.name, part)  # versions are never written after publishing
                except OSError:  # a filesystem without hard links: a copy of the file, still no encoding
                    shutil.copyfile(old_dir / part.name, part)
            else:
                vectors = old.data.table.slice(start, end - start).column("embeddings").combine_chunks()
                vectors = vectors.flatten().to_numpy().reshape(end - start, -1).copy()
                vectors[rows[lo:hi] - start] = new[lo:hi]
                write_passages_part(previous.passages_path, start, end, vectors, part)
            parts.append(part)
        index = read_index(previous.index_path)
        if updates_in_place(index):
            index.remove_ids(rows)
            index.add_with_ids(np.ascontiguousarray(new, dtype=np.float32), rows)
        else:
            index = index_parts(parts, len(old), cfg, similarity)
        in_parts = sum(part_rows(part) for part in parts)
        if not in_parts == index.ntotal == len(old):
            raise ValueError(
                f"{final}: its parts hold {in_parts} passages and its index {index.ntotal}, the KB {len(old)}; "
                "not published"
            )
        shutil.rmtree(encoded_path(staging, 0).parent, ignore_errors=True)  # not part of the version
        kb = KBVersion(version, str(final / "passages"), str(final / "index.faiss"), embedding_step, similarity)
        _seal(staging, parts, index, kb)
    return kb


def _data_files(passages_dir: Path) -> list[str]:
    """The data files a saved passages dataset lists in its state file, in order."""
    state = json.loads((passages_dir / datasets_config.DATASET_STATE_JSON_FILENAME).read_text())
    return [f["filename"] for f in state["_data_files"]]


def _part_bounds(passages_dir: Path, names: list[str]) -> list[tuple[int, int]] | None:
    """The [start, end) rows of each data file of a saved passages dataset when its files are `names` in order
    (counted from the files: part_rows), else None."""
    if _data_files(passages_dir) != names:
        return None
    ends = np.cumsum([part_rows(passages_dir / name) for name in names]).tolist()
    return list(zip([0, *ends[:-1]], ends))


def build_kb_version(
    base_passages_path: str,
    kb_root: str,
    version: int,
    embedding_step: int,
    cfg: IndexConfig,
    similarity: str,
    *shard_embeddings: np.ndarray,
) -> KBVersion:
    """Write encoded shards (in shard order) as part files here, then `publish_kb_version` them: what a refresh
    does across its encoding actors and builder, in one process."""
    n_base, n_vectors = len(load_from_disk(base_passages_path)), sum(len(e) for e in shard_embeddings)
    if n_base != n_vectors:
        raise ValueError(f"{n_base} passages but {n_vectors} embeddings")
    staging, start, rows = staging_dir(kb_root, version), 0, []
    try:
        for i, embeddings in enumerate(shard_embeddings):
            part = part_path(staging, i, len(shard_embeddings))
            rows.append(write_passages_part(base_passages_path, start, start + len(embeddings), embeddings, part))
            start += len(embeddings)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return publish_kb_version(kb_root, version, embedding_step, cfg, similarity, staging, *rows)


class KBBuilder:
    """Body of the Ray actor that runs `publish_kb_version`; kept alive so that a refresh does not pay
    for starting a worker process and importing faiss/datasets each time."""

    def __init__(self, threads: int = 1):
        quiet_actor()
        # Ray starts actors with OMP_NUM_THREADS=1 (num_cpus=0); the build (HNSW inserts, IVF/PQ training) gets
        # the encoders' budget, --index_cpus, instead.
        self.threads = threads
        faiss.omp_set_num_threads(threads)

    def publish(self, *args, threads: int | None = None, partial: bool = False) -> KBVersion:
        """`publish_kb_version(*args)` (`partial`: publish_partial_kb_version), with `threads` FAISS threads for this
        call (when training waits for it)."""
        faiss.omp_set_num_threads(threads or self.threads)
        try:
            return (publish_partial_kb_version if partial else publish_kb_version)(*args)
        finally:
            faiss.omp_set_num_threads(self.threads)
