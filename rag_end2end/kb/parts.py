"""A knowledge base's passages with their vectors, in Arrow: the `embeddings` column, and the part files a refresh
writes streamed (each encoding actor appends its shard's rows with their new vectors to one part file; the builder
reads them back a record batch at a time and declares them one dataset in place, never rewriting them)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
from datasets import Dataset, concatenate_datasets, load_from_disk
from datasets import config as datasets_config
from datasets.fingerprint import generate_random_fingerprint
from datasets.table import InMemoryTable

from rag_end2end.files import atomic_write

PART_BATCH_ROWS = 16_384  # rows per Arrow record batch of a part file: what the builder holds at a time


def vectors_array(embeddings: np.ndarray) -> pa.LargeListArray:
    """(rows, dim) float32 vectors as the Arrow column a KB stores them in, one list per row."""
    flat = np.ascontiguousarray(embeddings, dtype=np.float32).reshape(-1)
    offsets = np.arange(0, flat.size + 1, max(1, embeddings.shape[1]), dtype=np.int64)
    return pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(flat))


def with_embeddings(passages: Dataset, embeddings: np.ndarray) -> Dataset:
    """Return `passages` (title, text) with an `embeddings` column, built in Arrow (no Python loop)."""
    if len(passages) != len(embeddings):
        raise ValueError(f"{len(passages)} passages but {len(embeddings)} embeddings")
    column = vectors_array(embeddings)
    passages = passages.select_columns(["title", "text"])
    if passages._indices is not None:  # a filtered/selected view: materialise rows in their order
        passages = passages.flatten_indices()
    table = passages.data.table.append_column("embeddings", column)
    # A random fingerprint: the default one hashes the whole in-memory table, which lifted the KB builder's peak
    # from 3.3x to 7.4x the embeddings' size (bench/bench_memory.py) and doubled its time.
    return Dataset(InMemoryTable(table), fingerprint=generate_random_fingerprint())


def part_path(staging: str | os.PathLike, part: int, n_parts: int) -> Path:
    """The passages file of encoding shard `part` in a version being written (the name save_to_disk gives it)."""
    return Path(staging) / "passages" / f"data-{part:05d}-of-{n_parts:05d}.arrow"


def encoded_path(staging: str | os.PathLike, part: int) -> Path:
    """The new vectors (.npy) that encoding shard `part` wrote for a partial refresh, under the version being written
    (the builder removes them before publishing it)."""
    return Path(staging) / "encoded" / f"rows-{part:05d}.npy"


@contextmanager
def part_writer(
    base_passages_path: str | os.PathLike, start: int, end: int, path: str | os.PathLike
) -> Iterator[Callable[[np.ndarray], None]]:
    """Write rows [start, end) of the base passages (title, text) with their new vectors to the Arrow stream
    `path`: yields `write(vectors)`, which appends the next rows a record batch at a time. The file keeps a
    temporary name until every row is written (atomic_write)."""
    base = load_from_disk(str(base_passages_path)).select_columns(["title", "text"])
    rows = base.data.table.slice(start, end - start)  # memory-mapped: read a batch at a time
    schema = rows.schema.remove_metadata().append(pa.field("embeddings", pa.large_list(pa.float32())))
    path, written = Path(path), 0

    def write(vectors: np.ndarray) -> None:
        nonlocal written
        for a in range(0, len(vectors), PART_BATCH_ROWS):
            batch = vectors[a : a + PART_BATCH_ROWS]
            chunk = rows.slice(written, len(batch))
            if len(chunk) < len(batch):
                raise ValueError(f"{end - start} passages but more embeddings")
            columns = [*chunk.columns, pa.chunked_array([vectors_array(batch)])]
            writer.write_table(pa.Table.from_arrays(columns, schema=schema))
            written += len(batch)

    with atomic_write(path, "KB passages") as tmp:  # a full or read-only disk: the error names `path`
        path.parent.mkdir(parents=True, exist_ok=True)
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            yield write
        if written != end - start:
            raise ValueError(f"{end - start} passages but {written} embeddings")


def write_passages_part(
    base_passages_path: str | os.PathLike, start: int, end: int, embeddings: np.ndarray, path: str | os.PathLike
) -> int:
    """Rows [start, end) of the base passages with their new `embeddings`, written to the part file `path`
    (part_writer); returns the rows written."""
    if len(embeddings) != end - start:
        raise ValueError(f"{end - start} passages but {len(embeddings)} embeddings")
    with part_writer(base_passages_path, start, end, path) as write:
        write(embeddings)
    return end - start


def part_vectors(parts: list[Path]) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, vectors) of each record batch of the part files in order, read one batch at a time (not
    memory-mapped, so that the builder's memory is one batch plus the index, whatever the KB's size)."""
    row = 0
    for path in parts:
        with pa.OSFile(str(path)) as source:
            for batch in pa.ipc.open_stream(source):
                column = batch.column("embeddings")
                yield row, column.flatten().to_numpy().reshape(len(batch), -1)
                row += len(batch)


def part_rows(path: str | os.PathLike) -> int:
    """The rows in the part file `path`, counted from its record batches' headers (memory-mapped: no vector read)."""
    with pa.memory_map(str(path)) as source:
        return sum(batch.num_rows for batch in pa.ipc.open_stream(source))


def sample_parts(parts: list[Path], rows: np.ndarray) -> np.ndarray:
    """The vectors of sorted global `rows` of the part files, gathered in one pass over them into one array."""
    out = None
    for first, vectors in part_vectors(parts):
        lo, hi = np.searchsorted(rows, [first, first + len(vectors)])
        if out is None:
            out = np.empty((len(rows), vectors.shape[1]), dtype=np.float32)
        out[lo:hi] = vectors[rows[lo:hi] - first]
    return out


def declare_dataset(directory: Path, files: list[Path]) -> None:
    """Make Arrow streams `files` inside `directory` one dataset for `load_from_disk`: the state and info files
    that `Dataset.save_to_disk` writes beside its data files (a test reads the result back)."""
    dataset = concatenate_datasets([Dataset.from_file(str(f)) for f in files])  # memory-mapped: headers only
    state = {
        "_data_files": [{"filename": f.name} for f in files],
        "_fingerprint": generate_random_fingerprint(),
        "_format_columns": None,
        "_format_kwargs": {},
        "_format_type": None,
        "_output_all_columns": False,
        "_split": None,
    }
    (directory / datasets_config.DATASET_STATE_JSON_FILENAME).write_text(json.dumps(state, indent=2, sort_keys=True))
    dataset.info.write_to_directory(str(directory))
