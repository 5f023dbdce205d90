"""Knowledge-base plumbing: split documents into passages, encode them, build FAISS indexes and
save knowledge-base versions atomically (written under a temporary name, then renamed)."""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import faiss
import numpy as np
import pyarrow as pa
from datasets import Dataset, concatenate_datasets, load_from_disk
from datasets import config as datasets_config
from datasets.fingerprint import generate_random_fingerprint
from datasets.table import InMemoryTable
from tqdm.auto import tqdm

from rag_end2end.kb.faiss_devices import train_index

# torch is imported by the functions that encode: retrieval actors and index builders import this module and never
# encode, and torch costs each of them ~2.7 s of start-up and ~185 MB of memory.
if TYPE_CHECKING:
    import torch

READY_MARKER = "READY.json"  # written last: a version directory without it is incomplete
VERSION_DIR_RE = re.compile(r"^v(\d{4,})$")
KB_INFO_FILE = "rag_kb.json"  # inside a passages directory: how its embeddings are to be scored
UNIT_NORM_TOLERANCE = 1e-3


# ----------------------------------------------------------------------------- passages


def split_text(text: str, n: int = 100, character: str = " ") -> list[str]:
    """Split `text` every `n` occurrences of `character` (100-word passages, as the reference)."""
    words = text.split(character)
    return [character.join(words[i : i + n]).strip() for i in range(0, len(words), n)]


def split_documents(docs: list[tuple[str, str]], n_words: int = 100) -> Dataset:
    """Turn (title, text) documents into a `datasets.Dataset` of 100-word passages."""
    titles, texts = [], []
    for title, text in docs:
        for passage in split_text(text, n_words):
            if passage:
                titles.append(title)
                texts.append(passage)
    return Dataset.from_dict({"title": titles, "text": texts})


# ----------------------------------------------------------------------------- encoding


def passage_embeddings(encoder: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """The one place that says how a context encoder turns tokens into a passage vector."""
    return encoder(input_ids=input_ids, attention_mask=attention_mask, return_dict=True).pooler_output


def tokenize_passages(tokenizer, titles: list[str], texts: list[str]) -> list[list[int]]:
    """Tokenise (title, text) pairs exactly as the RAG retriever does for the in-graph encoder."""
    return tokenizer(list(titles), list(texts), truncation=True)["input_ids"]


def encode_token_ids(
    encoder: torch.nn.Module,
    token_ids: list[list[int]] | np.ndarray,
    pad_token_id: int,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    progress: bool = True,
    offsets: np.ndarray | None = None,
    bf16: bool = False,
) -> np.ndarray:
    """Encode pre-tokenised passages in eval mode; batches are sorted by length to cut padding. `token_ids`: a
    list of ids per passage (tokenize_passages), or, with `offsets`, all passages' ids one after another in one
    integer array, passage i being `token_ids[offsets[i] : offsets[i + 1]]` (ShardEncoder's compact form).
    `bf16`: autocast the forward pass to bfloat16 (the refresh on GPUs); the vectors come back as float32."""
    import torch

    if offsets is None:  # the same batches, gathered from one flat copy
        offsets = np.zeros(len(token_ids) + 1, dtype=np.int64)
        np.cumsum([len(ids) for ids in token_ids], out=offsets[1:])
        token_ids = np.fromiter(itertools.chain.from_iterable(token_ids), dtype=np.int64, count=int(offsets[-1]))
    encoder.eval()
    lengths = np.diff(offsets)
    order = np.argsort(lengths, kind="stable")
    out = None
    for start in tqdm(range(0, len(order), batch_size), desc="encoding passages", disable=not progress):
        rows = order[start : start + batch_size]
        width = int(lengths[rows].max())
        mask = np.arange(width) < lengths[rows, None]  # row j: passage rows[j]'s ids, then padding
        ids = np.full(mask.shape, pad_token_id, dtype=np.int64)
        ids[mask] = token_ids[(offsets[rows, None] + np.arange(width))[mask]]
        ids, mask = torch.from_numpy(ids), torch.from_numpy(mask.astype(np.int64))
        with torch.inference_mode(), torch.autocast(torch.device(device).type, torch.bfloat16, enabled=bf16):
            emb = passage_embeddings(encoder, ids.to(device), mask.to(device)).float().cpu().numpy()
        if out is None:
            out = np.empty((len(lengths), emb.shape[1]), dtype=np.float32)
        out[rows] = emb
    return out


def quiet_actor() -> None:
    """In a Ray actor: no progress bars or info chatter from datasets and transformers, which Ray would
    copy to the user's console on every refresh (errors still reach the trainer as exceptions)."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()


class ShardEncoder:
    """Body of a Ray encoding actor: holds one contiguous shard of the KB, tokenised once at start-up,
    and re-encodes it with whatever context-encoder weights it is handed."""

    TOKENIZE_CHUNK = 4096  # passages tokenised at a time at start-up
    ENCODE_WINDOW = 65_536  # passages sorted by length, encoded and written at a time by encode_to

    def __init__(
        self,
        passages_path: str,
        start: int,
        end: int,
        tokenizer,
        build_encoder,
        encoder_config,
        threads: int = 1,
        device: str = "cpu",
    ):
        import torch

        quiet_actor()
        # Where to encode is the driver's word (kb_refresh.Refresher): "cuda" for an actor Ray gave a GPU share (Ray
        # makes that GPU its only visible one), "cpu" for one that asked for none. CUDA_VISIBLE_DEVICES is no guide:
        # Ray 2.60 leaves an exported one (SLURM's) in place for actors without GPUs (ray-project/ray#62492).
        self.device = device
        if device != "cpu" and not torch.cuda.is_available():
            import ray

            raise RuntimeError(
                f"this encoding actor holds GPU {ray.get_gpu_ids()} (CUDA_VISIBLE_DEVICES="
                f"{os.environ.get('CUDA_VISIBLE_DEVICES')}), but torch finds no CUDA device here (torch "
                f"{torch.__version__}): install a CUDA build of torch where the encoding actors run, or --index_gpus 0"
            )
        if device == "cpu":
            # An explicit budget (--index_cpus): the trainer shares these cores, and both slow down badly when
            # their threads together outnumber the cores.
            torch.set_num_threads(threads)
        # The shard's token ids in compact form (encode_token_ids' `offsets`): one int32 array of all its passages'
        # ids, 4 bytes a token where lists of Python ints take ~40, tokenised a chunk at a time so that neither
        # the texts nor the tokenizer's lists are ever held for the whole shard.
        passages = load_from_disk(passages_path).select_columns(["title", "text"])
        ids, lengths = [np.empty(0, dtype=np.int32)], [np.zeros(1, dtype=np.int64)]
        for chunk in range(start, end, self.TOKENIZE_CHUNK):
            rows = passages[chunk : min(chunk + self.TOKENIZE_CHUNK, end)]
            chunk_ids = tokenize_passages(tokenizer, rows["title"], rows["text"])
            lengths.append(np.array([len(x) for x in chunk_ids], dtype=np.int64))
            flat = itertools.chain.from_iterable(chunk_ids)
            ids.append(np.fromiter(flat, dtype=np.int32, count=int(lengths[-1].sum())))
        self.passages_path, self.start, self.end = passages_path, start, end
        self.token_ids = np.concatenate(ids)
        self.offsets = np.cumsum(np.concatenate(lengths))  # passage i: token_ids[offsets[i] : offsets[i + 1]]
        self.pad_token_id = tokenizer.pad_token_id
        self.encoder = build_encoder(encoder_config).to(self.device).eval()  # e.g. a class, or encoder_factory(...)

    @contextmanager
    def _weights(self, state_dict: dict, threads: int | None) -> Iterator[None]:
        """Load `state_dict`, with `threads` CPU threads until the block ends (when training waits for it)."""
        import torch

        self.encoder.load_state_dict(state_dict)
        before = torch.get_num_threads()
        if threads and self.device == "cpu":
            torch.set_num_threads(threads)
        try:
            yield
        finally:
            torch.set_num_threads(before)
            if self.device != "cpu":
                # Hand the refresh's activations back to the GPU: PyTorch's allocator keeps freed blocks cached for
                # this process, and a training process sharing the GPU (--index_gpus 0.5) would go short of them
                # until the next refresh. The weights stay (the next refresh loads into them).
                torch.cuda.empty_cache()

    def _encode(self, offsets: np.ndarray, batch_size: int) -> np.ndarray:
        from rag_end2end.precision import native_bf16  # torch, which this module imports only where it encodes

        # bf16 on GPUs that have it: twice the throughput, and the KB is only searched with these vectors
        # (rag_end2end re-encodes the retrieved passages in float32 inside the graph).
        bf16 = self.device != "cpu" and native_bf16()  # not emulated (pre-Ampere): that would be slower
        return encode_token_ids(
            self.encoder, self.token_ids, self.pad_token_id, batch_size, self.device, False, offsets, bf16
        )

    def encode(self, state_dict: dict, batch_size: int = 64, threads: int | None = None) -> np.ndarray:
        """The shard's embeddings under `state_dict`; `threads` CPU threads for this call."""
        with self._weights(state_dict, threads):
            return self._encode(self.offsets, batch_size)

    def encode_to(self, state_dict: dict, path: str, batch_size: int = 64, threads: int | None = None) -> int:
        """Encode the shard `ENCODE_WINDOW` passages at a time, appending each window's rows and vectors to the
        part file `path` of a version being built; returns the rows. The actor never holds the whole shard's
        vectors, and they go to disk from here instead of through Ray's object store to the builder."""
        n = len(self.offsets) - 1
        with self._weights(state_dict, threads), part_writer(self.passages_path, self.start, self.end, path) as write:
            for a in range(0, n, self.ENCODE_WINDOW):
                write(self._encode(self.offsets[a : min(a + self.ENCODE_WINDOW, n) + 1], batch_size))
        return n


def shard_bounds(n_rows: int, n_shards: int) -> list[tuple[int, int]]:
    """Balanced, non-empty, contiguous [start, end) row ranges; merging them in order restores row order."""
    if n_rows < 1 or n_shards < 1:
        raise ValueError(f"cannot split {n_rows} rows into {n_shards} shards")
    n_shards = min(n_shards, n_rows)
    base, extra = divmod(n_rows, n_shards)
    bounds, start = [], 0
    for i in range(n_shards):
        end = start + base + (i < extra)
        bounds.append((start, end))
        start = end
    return bounds


# ----------------------------------------------------------------------------- index and versions


@dataclass
class IndexConfig:
    """FAISS index settings; inner product throughout, as DPR scores are dot products. `factory` (any
    `faiss.index_factory` string: "Flat", "HNSW32,Flat", "IVF4096,PQ64", ...) replaces `index_type` when set."""

    index_type: str = "hnsw"  # "flat" (exact) or "hnsw"
    hnsw_m: int = 32  # bench_index.py: M=128 (the reference's) built 1.5x slower, searched 1.6x slower, same recall
    ef_construction: int = 200
    ef_search: int = 128
    factory: str | None = None
    train_size: int = 100_000  # IVF/PQ indexes are trained on a random sample of at most this many vectors
    search_params: str | None = None  # faiss.ParameterSpace string stored in the index, e.g. "nprobe=32"
    faiss_gpu: str = "auto"  # faiss_devices mode: IVF/PQ training (and shard actors' search) on GPUs when here

    @classmethod
    def from_args(cls, args) -> IndexConfig:
        """The index settings of a CLI that called `add_index_args` (and finetune_rag.py's --faiss_gpu)."""
        return cls(args.index_type, args.hnsw_m, args.hnsw_ef_construction, args.hnsw_ef_search,
                   args.index_factory, args.index_train_size, args.index_search_params,
                   getattr(args, "faiss_gpu", "auto"))  # fmt: skip


def new_faiss_index(dim: int, n_rows: int, cfg: IndexConfig, sample: Callable[[np.ndarray], np.ndarray]) -> faiss.Index:
    """An empty inner-product index for `cfg`, trained (IVF centroids, PQ codebooks) when it needs it on
    `sample(rows)`: the vectors of a seeded sorted sample of at most `cfg.train_size` of the `n_rows` rows. The
    training's k-means runs on this process's GPUs when `cfg.faiss_gpu` and faiss_devices allow; the index is a CPU
    index either way."""
    if cfg.factory:
        try:
            index = faiss.index_factory(dim, cfg.factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as err:
            raise ValueError(f"--index_factory {cfg.factory!r}: not a FAISS factory string ({err})") from None
    elif cfg.index_type == "flat":
        index = faiss.IndexFlatIP(dim)
    elif cfg.index_type == "hnsw":
        index = faiss.IndexHNSWFlat(dim, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
    else:
        raise ValueError(f"unknown index type {cfg.index_type!r}; choose flat or hnsw, or give --index_factory")
    if not index.is_trained:
        rows = np.sort(np.random.default_rng(0).permutation(n_rows)[: cfg.train_size])
        try:
            train_index(index, np.ascontiguousarray(sample(rows), dtype=np.float32), cfg.faiss_gpu)
        except RuntimeError as err:  # e.g. fewer training vectors than IVF centroids
            raise ValueError(
                f"--index_factory {cfg.factory!r}: training on {len(rows):,} vectors failed; a KB this size needs "
                f"fewer IVF lists or PQ centroids, e.g. IVF{max(1, int(np.sqrt(n_rows)))},Flat ({err})"
            ) from None
    if hasattr(index, "hnsw"):
        index.hnsw.efConstruction = cfg.ef_construction
        index.hnsw.efSearch = cfg.ef_search
    if cfg.search_params:  # written with the index (nprobe, efSearch), so every reader searches the same way
        try:
            faiss.ParameterSpace().set_index_parameters(index, cfg.search_params)
        except RuntimeError as err:
            kind = cfg.factory or cfg.index_type
            raise ValueError(f"--index_search_params {cfg.search_params!r} do not apply to {kind} ({err})") from None
    return index


def build_faiss_index(embeddings: np.ndarray, cfg: IndexConfig) -> faiss.Index:
    """Build an inner-product index over `embeddings` (row i gets FAISS id i)."""
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    index = new_faiss_index(embeddings.shape[1], len(embeddings), cfg, embeddings.__getitem__)
    index.add(embeddings)
    return index


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


def vectors_array(embeddings: np.ndarray) -> pa.LargeListArray:
    """(rows, dim) float32 vectors as the Arrow column a KB stores them in, one list per row."""
    flat = np.ascontiguousarray(embeddings, dtype=np.float32).reshape(-1)
    offsets = np.arange(0, flat.size + 1, max(1, embeddings.shape[1]), dtype=np.int64)
    return pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(flat))


def temporary_sibling(path: Path) -> Path:
    """Where `path` is written before its rename into place: NAME.tmp-PID-HEX (the PID tells a live writer)."""
    return path.with_name(f"{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


_TEMPORARY = re.compile(r"\.tmp-(\d+)-[0-9a-f]{8}$")


def remove_orphaned_temporaries(directory: str | Path) -> list[Path]:
    """Remove the `temporary_sibling`s in `directory` whose writing process is gone: what an interrupted save left
    (Ctrl-C, SIGKILL, a full disk). Nothing else, and no temporary that a live process still writes."""
    removed = []
    for path in sorted(Path(directory).glob("*.tmp-*")) if Path(directory).is_dir() else []:
        match = _TEMPORARY.search(path.name)
        if not match or process_alive(int(match[1])):
            continue
        shutil.rmtree(path) if path.is_dir() else path.unlink()
        removed.append(path)
    return removed


def process_alive(pid: int) -> bool:
    """Whether a process of this host has this pid."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@contextmanager
def writing(what: str, path: str | os.PathLike, *temporaries: str | os.PathLike) -> Iterator[None]:
    """Name `path` in the errors of writing it (a full or read-only disk gives an errno and no path; faiss's and
    torch's write errors neither), after removing the `temporaries` the write left (our own `.tmp` names)."""
    try:
        yield
    except BaseException as err:
        for tmp in map(Path, temporaries):
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) and not isinstance(err, FileExistsError):
            raise OSError(err.errno, f"writing {what} {path} failed: {err}", err.filename) from err
        if isinstance(err, RuntimeError):
            raise RuntimeError(f"writing {what} {path} failed: {err}") from err
        raise


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
    index = build_faiss_index(np.asarray(dataset.with_format("numpy")["embeddings"]), cfg)
    tmp_passages, tmp_index = temporary_sibling(passages_path), temporary_sibling(index_path)
    with writing("KB", passages_path, tmp_passages, tmp_index):
        dataset.save_to_disk(str(tmp_passages))
        write_kb_info(tmp_passages, similarity)
        faiss.write_index(index, str(tmp_index))
        os.rename(tmp_passages, passages_path)
        os.rename(tmp_index, index_path)


# ----------------------------------------------------------------------------- similarity


def write_kb_info(passages_path: str | os.PathLike, similarity: str) -> None:
    """Declare how a KB's embeddings are scored (`dot` or `cosine`), inside its passages directory."""
    (Path(passages_path) / KB_INFO_FILE).write_text(json.dumps({"similarity": similarity}, indent=1))


def kb_similarity(passages_path: str | os.PathLike) -> tuple[str, str]:
    """(similarity, how it is known) of a KB: what it declares, else inferred from its embeddings' norms
    (all unit length: cosine) for KBs written before the declaration existed or by other tools."""
    info = Path(passages_path) / KB_INFO_FILE
    if info.is_file():
        return json.loads(info.read_text())["similarity"], f"declared in {info}"
    passages = load_from_disk(str(passages_path))
    if "embeddings" not in passages.column_names:
        raise ValueError(f"{passages_path}: the passages dataset has no `embeddings` column")
    sample = np.asarray(passages.select(range(min(256, len(passages))))["embeddings"], dtype=np.float32)
    unit = np.abs(np.linalg.norm(sample, axis=1) - 1).max() < UNIT_NORM_TOLERANCE
    return ("cosine" if unit else "dot"), "inferred from its embedding norms"


def check_kb_similarity(passages_path: str | os.PathLike, side: str, similarity: str) -> str:
    """Stop when a KB's embeddings were made for another similarity than `side` (e.g. "the question encoder
    pretrained/minilm") scores with; returns the KB's similarity."""
    kb_sim, how = kb_similarity(passages_path)
    if kb_sim != similarity:
        raise ValueError(
            f"the knowledge base {passages_path} holds {kb_sim} embeddings ({how}), but {side} scores with "
            f"{similarity} similarity: rebuild the KB with use_own_knowledge_dataset.py --similarity {similarity}, "
            f"or pass --similarity {kb_sim}"
        )
    return kb_sim


@dataclass
class KBVersion:
    """One knowledge-base version: passages with embeddings plus the index over them."""

    version: int
    passages_path: str
    index_path: str
    embedding_step: int = 0  # optimizer step whose context-encoder weights made the embeddings
    similarity: str = "dot"  # how the embeddings are scored: dot or cosine (unit-length vectors)

    def stored(self, base: str | os.PathLike, run_dir: str | os.PathLike | None = None) -> dict:
        """This version as a run saves it: paths inside `run_dir` (default `base`) relative to `base`, so that a
        moved or copied run directory resumes on its own KB versions; other paths (the user's version 0)
        absolute."""
        inside = Path(os.path.abspath(run_dir or base))
        fields = asdict(self)
        for key in ("passages_path", "index_path"):
            path = Path(os.path.abspath(fields[key]))
            if path == inside or inside in path.parents:
                fields[key] = os.path.relpath(path, os.path.abspath(base))
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
    for kb in old:
        shutil.rmtree(version_dir(kb_root, kb.version))  # a complete vNNNN that this toolkit wrote
    return [kb.version for kb in old]


def remove_unreachable_versions(kb_root: str | os.PathLike, live: int, keep: set[int]) -> list[int]:
    """Delete the complete versions newer than `live` that are not in `keep` (those checkpoints name, and those the
    run's restored history made live): built but never made live before the run stopped, or live only after its
    last checkpoint, so a resumed run can never reach them (and pruning, which spares what it did not see go
    live, would keep them for ever)."""
    stale = [v.version for v in list_versions(kb_root) if v.version > live and v.version not in keep]
    for version in stale:
        shutil.rmtree(version_dir(kb_root, version))
    return stale


# ----------------------------------------------------------------------------- writing a version, streamed

PART_BATCH_ROWS = 16_384  # rows per Arrow record batch of a part file: what the builder holds at a time


def staging_dir(kb_root: str | os.PathLike, version: int) -> Path:
    """A fresh temporary directory name for `version` while it is written (list_versions ignores it)."""
    return temporary_sibling(version_dir(kb_root, version))


def part_path(staging: str | os.PathLike, part: int, n_parts: int) -> Path:
    """The passages file of encoding shard `part` in a version being written (the name save_to_disk gives it)."""
    return Path(staging) / "passages" / f"data-{part:05d}-of-{n_parts:05d}.arrow"


@contextmanager
def part_writer(
    base_passages_path: str | os.PathLike, start: int, end: int, path: str | os.PathLike
) -> Iterator[Callable[[np.ndarray], None]]:
    """Write rows [start, end) of the base passages (title, text) with their new vectors to the Arrow stream
    `path`: yields `write(vectors)`, which appends the next rows a record batch at a time. The file keeps a
    temporary name until every row is written."""
    base = load_from_disk(str(base_passages_path)).select_columns(["title", "text"])
    rows = base.data.table.slice(start, end - start)  # memory-mapped: read a batch at a time
    schema = rows.schema.remove_metadata().append(pa.field("embeddings", pa.large_list(pa.float32())))
    path = Path(path)
    tmp, written = temporary_sibling(path), 0

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

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            yield write
        if written != end - start:
            raise ValueError(f"{end - start} passages but {written} embeddings")
        os.rename(tmp, path)
    except OSError as err:  # a full or read-only disk: say where, and the errno
        raise OSError(err.errno, f"writing KB passages {path} failed: {err}", err.filename) from err
    finally:
        tmp.unlink(missing_ok=True)  # gone after the rename; what is left of a failed write


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


def _part_vectors(parts: list[Path]) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, vectors) of each record batch of the part files in order, read one batch at a time (not
    memory-mapped, so that the builder's memory is one batch plus the index, whatever the KB's size)."""
    row = 0
    for path in parts:
        with pa.OSFile(str(path)) as source:
            for batch in pa.ipc.open_stream(source):
                column = batch.column("embeddings")
                yield row, column.flatten().to_numpy().reshape(len(batch), -1)
                row += len(batch)


def _sample_parts(parts: list[Path], rows: np.ndarray) -> np.ndarray:
    """The vectors of sorted global `rows` of the part files, gathered in one pass over them into one array."""
    out = None
    for first, vectors in _part_vectors(parts):
        lo, hi = np.searchsorted(rows, [first, first + len(vectors)])
        if out is None:
            out = np.empty((len(rows), vectors.shape[1]), dtype=np.float32)
        out[lo:hi] = vectors[rows[lo:hi] - first]
    return out


def _declare_dataset(directory: Path, files: list[Path]) -> None:
    """Make Arrow streams `files` inside `directory` one dataset for `load_from_disk`: the state and info files
    that `Dataset.save_to_disk` writes beside its data files (a test reads the result back)."""
    dataset = concatenate_datasets([Dataset.from_file(str(f)) for f in files])  # memory-mapped: headers only
    state = {"_data_files": [{"filename": f.name} for f in files], "_fingerprint": generate_random_fingerprint(),
             "_format_columns": None, "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False,
             "_split": None}  # fmt: skip
    (directory / datasets_config.DATASET_STATE_JSON_FILENAME).write_text(json.dumps(state, indent=2, sort_keys=True))
    dataset.info.write_to_directory(str(directory))


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
    with writing("KB version", final, staging):
        if final.exists():
            raise FileExistsError(f"{final} already exists; refusing to overwrite a knowledge-base version")
        parts = [part_path(staging, i, len(part_rows)) for i in range(len(part_rows))]
        dim = next(_part_vectors(parts[:1]))[1].shape[1]
        index = new_faiss_index(dim, sum(part_rows), cfg, lambda rows: _sample_parts(parts, rows))
        for _, vectors in _part_vectors(parts):
            index.add(np.ascontiguousarray(vectors, dtype=np.float32))
        if index.ntotal != sum(part_rows):
            raise ValueError(f"{staging}: the parts hold {index.ntotal} passages, the encoders wrote {sum(part_rows)}")
        _declare_dataset(staging / "passages", parts)
        write_kb_info(staging / "passages", similarity)
        faiss.write_index(index, str(staging / "index.faiss"))
        kb = KBVersion(version, str(final / "passages"), str(final / "index.faiss"), embedding_step, similarity)
        (staging / READY_MARKER).write_text(json.dumps(asdict(kb), indent=1))
        os.rename(staging, final)
    return kb


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

    def publish(self, *args, threads: int | None = None) -> KBVersion:
        """`publish_kb_version(*args)`, with `threads` FAISS threads for this call (when training waits for it)."""
        faiss.omp_set_num_threads(threads or self.threads)
        try:
            return publish_kb_version(*args)
        finally:
            faiss.omp_set_num_threads(self.threads)
