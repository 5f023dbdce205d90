"""How large a knowledge base one machine holds: the peak memory of every process that holds a KB.

For each KB size in --sizes, a seeded synthetic KB: passages of 100 words drawn from the dummy KB's vocabulary
(a title of 1-4 words each) and --dim float32 unit-length embeddings, generated in chunks. The KB versions are
written the way a refresh writes them: --builder_shards part files of rows and vectors (what each encoding
actor writes), then a `KBBuilder` Ray actor runs `publish_kb_version` over them, once per index in --factories.
Then, each in a fresh Ray actor, one at a time:

- **builder**: peak RSS of the `KBBuilder` actor while it indexes the part files a record batch at a time
  (training IVF/PQ on a sample of them first), declares them one dataset and writes the index;
- **retrieval**: a `RetrievalActor` (start_retrieval_actors) after `init_retrieval` (`ensure_live`) of the
  version and --searches calls of 8 queries; and, for the first index, --index_shards `ShardActor`s
  (start_shard_actors with a Flat IndexConfig; each builds its own index over its rows, as `--index_shards`
  does). Whether the passages are memory-mapped: the resident part of the mappings of the passages' Arrow files
  (/proc/<pid>/smaps) against their size, and the actor's RSS growth against the passages' text size;
- **encoding**: a `ShardEncoder` actor (the tiny random context encoder of test_run/make_tiny_models.py with a
  projection to --dim outputs, loaded and handed over as kb_refresh.Refresher does) over the first
  --encode_rows passages of the first size: the memory it holds after tokenising its shard at start-up, its
  peak in one `encode` call (returning the shard's vectors, as refreshes did before) and in one `encode_to`
  call (encoding and writing its part file a window of passages at a time, as refreshes do);
- **disk**: the size of the version's passages directory and of its index file.

Memory is read from /proc/<pid>/status of each actor process (pid from the actor itself): VmHWM (peak RSS),
VmRSS and its anonymous / file-backed / shared parts. "Over idle" subtracts the same kind of actor holding
nothing (the encoder: holding 4,096 passages, so that the tokenizer's first batch counts as idle), i.e. the
imports, the model and Ray's worker: for the builder and the encode call their peak over that RSS, for the
actors that serve or hold a shard the anonymous memory they hold (file-backed pages, such as the mmapped
passages they read, are page cache the kernel can evict). The peak of a phase is isolated by resetting VmHWM
(/proc/<pid>/clear_refs) before it. A size whose builder would not fit in 80% of MemAvailable (its peak
extrapolated from the previous size) is skipped, not run into the OOM killer. Every figure is per process: the
processes of a refresh run side by side, so the conclusion adds them up per phase of a refresh (the builder
beside the live retrieval actor; the swap, where a retrieval actor holds two versions) and extrapolates
linearly in the number of passages to the largest KB that fits --machine_gib minus --reserve_gib (the trainer,
the OS and Ray's own processes).

    python bench/bench_memory.py --sizes 100000            # about 3 minutes on 2 CPU cores, 3 GiB
    python bench/bench_memory.py --sizes 100000,300000 --json memory.json   # 7 minutes, 7 GiB
    python bench/bench_memory.py --parts encoder --sizes 100000   # only the encoding actor

The default index pair is "Flat" (exact) and "IVF1024,PQ64np" (inverted lists of 64-byte PQ codes; `np` skips
the polysemous training that index_factory adds to IVF,PQ, minutes of CPU for a search mode the toolkit never
turns on; the index in memory is the same). Figures are printed, never asserted. Linux only (reads /proc).
"""

from __future__ import annotations

from bench_env import REPO, write_json

import argparse
import os
import platform
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import datasets
import faiss
import numpy as np
import pyarrow as pa
import ray
import torch
import transformers
from datasets.table import InMemoryTable

from rag_end2end import tiny_models
from rag_end2end.kb.actors import start_retrieval_actors, start_shard_actors
from rag_end2end.kb.encoding import ShardEncoder
from rag_end2end.kb.index import IndexConfig
from rag_end2end.kb.parts import part_path, write_passages_part
from rag_end2end.kb.passages import shard_bounds
from rag_end2end.kb.ray_start import init_ray, shutdown_ray
from rag_end2end.kb.retriever import RagRayDistributedRetriever, ShardedRetriever
from rag_end2end.kb.versions import KBBuilder, KBVersion, staging_dir
from rag_end2end.model import encoders as rag_encoders

DUMMY_CSV = REPO / "test_run" / "dummy-kb" / "my_knowledge_dataset.csv"
DEFAULT_FACTORIES = ("Flat", "IVF1024,PQ64np")
WORDS_PER_PASSAGE = 100
CHUNK = 50_000  # passages / embedding rows generated at a time
MIB = 2**20
STATUS_FIELDS = ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem")
BUILDER_RATIO_GUESS = 5.0  # builder peak / embeddings bytes before one is measured (2.5-4.7 at 100k and 1M)


# ---------------------------------------------------------------------- /proc


def memory(pid: int) -> dict[str, int]:
    """Peak and current RSS of a process, in bytes (/proc/<pid>/status: VmHWM, VmRSS and its parts)."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in STATUS_FIELDS:
            out[key] = int(value.split()[0]) * 1024
    return out


def reset_peak(pid: int) -> bool:
    """Reset a process's VmHWM to its current RSS (Linux >= 4.0), so that the next reading is a phase's peak."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def mapped(pid: int, directory: Path) -> dict[str, int]:
    """Size and resident bytes of a process's mappings of files under `directory` (/proc/<pid>/smaps)."""
    size = rss = files = 0
    inside = False
    prefix = str(directory.resolve()) + os.sep
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split()
        if re.match(r"^[0-9a-f]+-[0-9a-f]+$", head[0]):  # a mapping's first line: range perms offset dev inode path
            inside = len(head) >= 6 and head[5].startswith(prefix)
            files += inside
        elif inside and head[0] in ("Size:", "Rss:"):
            value = int(head[1]) * 1024
            size, rss = (size + value, rss) if head[0] == "Size:" else (size, rss + value)
    return {"mapped_bytes": size, "mapped_resident_bytes": rss, "mappings": files}


def actor_pid(actor) -> int:
    """The process id of a Ray actor; waits until its constructor has run."""
    return ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))


def anon(mem: dict, idle: dict) -> int:
    """Anonymous memory a process holds beyond `idle`'s: what it cannot give back (file-backed pages, such as the
    mmapped passages it read, are page cache that the kernel evicts under pressure)."""
    return mem["RssAnon"] - idle["RssAnon"]


def available_memory() -> int:
    """MemAvailable of /proc/meminfo, in bytes."""
    line = next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemAvailable:"))
    return int(line.split()[1]) * 1024


def du(path: Path) -> int:
    """Bytes of a file, or of all files under a directory."""
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ---------------------------------------------------------------------- synthetic KB


def vocabulary() -> list[str]:
    """The dummy KB's distinct lower-case words: realistic word lengths, and in the tiny tokenizer's vocabulary."""
    return sorted(set(re.findall(r"[a-z]+", DUMMY_CSV.read_text(encoding="utf-8").lower())))


def make_passages(path: Path, n: int, seed: int) -> int:
    """Save `n` passages (title, text) of WORDS_PER_PASSAGE seeded random words; returns their text bytes."""
    words = vocabulary()
    rng = np.random.default_rng(seed)
    tables = []
    for start in range(0, n, CHUNK):
        rows = min(CHUNK, n - start)
        idx = rng.integers(0, len(words), (rows, WORDS_PER_PASSAGE)).tolist()
        n_title = rng.integers(1, 5, rows).tolist()
        texts = [" ".join([words[j] for j in row]) for row in idx]
        titles = [" ".join([words[j] for j in row[:k]]).title() for row, k in zip(idx, n_title)]
        tables.append(pa.table({"title": titles, "text": texts}))
    table = pa.concat_tables(tables)
    datasets.Dataset(InMemoryTable(table)).save_to_disk(str(path))
    return table.nbytes


def unit_embeddings(rows: int, dim: int, seed: int) -> np.ndarray:
    """`rows` x `dim` float32 vectors of unit length, generated CHUNK rows at a time."""
    rng = np.random.default_rng(seed)
    out = np.empty((rows, dim), dtype=np.float32)
    for start in range(0, rows, CHUNK):
        block = rng.standard_normal((min(CHUNK, rows - start), dim), dtype=np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        out[start : start + len(block)] = block
    return out


def unit_queries(n: int, dim: int, seed: int) -> np.ndarray:
    return unit_embeddings(n, dim, seed + 10_000)


# ---------------------------------------------------------------------- the measured processes


def measure_builder(
    base: Path, kb_root: Path, version: int, n: int, dim: int, shards: int, cfg: IndexConfig, seed: int
) -> tuple[KBVersion, dict]:
    """Publish version `version` in a fresh KBBuilder actor from `shards` part files, written here as the encoding
    actors of a refresh write them (their memory is measured with the encoder), as a refresh does."""
    staging = staging_dir(kb_root, version)
    rows = []
    for i, (start, end) in enumerate(shard_bounds(n, shards)):
        vectors = unit_embeddings(end - start, dim, seed + i)
        rows.append(write_passages_part(base, start, end, vectors, part_path(staging, i, shards)))
    builder = ray.remote(KBBuilder).options(num_cpus=0, max_restarts=0).remote()
    pid = actor_pid(builder)
    idle = memory(pid)
    reset_peak(pid)
    t0 = time.perf_counter()
    kb = ray.get(builder.publish.remote(str(kb_root), version, 0, cfg, "cosine", str(staging), *rows))
    seconds = time.perf_counter() - t0
    after = memory(pid)
    ray.kill(builder)
    return kb, {
        "idle": idle,
        "peak": after["VmHWM"],
        "after_rss": after["VmRSS"],
        "seconds": seconds,
        "embeddings_bytes": n * dim * 4,
    }


def measure_serving(actors: list, retriever, kb: KBVersion, dim: int, searches: int, seed: int) -> dict:
    """Each actor's memory idle, then after `retriever` loads `kb` and makes `searches` calls of 8 queries."""
    pids = [actor_pid(a) for a in actors]
    idle = [memory(pid) for pid in pids]
    t0 = time.perf_counter()
    retriever.init_retrieval(kb)
    load_s = time.perf_counter() - t0
    queries = unit_queries(8, dim, seed)
    for _ in range(searches):
        retriever.retrieve(queries, 5)
    served = [{**memory(pid), **mapped(pid, Path(kb.passages_path))} for pid in pids]
    for actor in actors:
        ray.kill(actor)
    return {"load_s": load_s, "idle": idle, "served": served}


def measure_retrieval(kb: KBVersion, dim: int, searches: int, seed: int) -> dict:
    """One RetrievalActor: idle, then serving `kb` after init_retrieval and `searches` calls of 8 queries."""
    actors = start_retrieval_actors(1, namespace=f"bench-memory-{uuid.uuid4().hex[:8]}")
    m = measure_serving(actors, RagRayDistributedRetriever(actors), kb, dim, searches, seed)
    return {"idle": m["idle"][0], "load_s": m["load_s"], **m["served"][0]}


def measure_shards(kb: KBVersion, n_shards: int, dim: int, searches: int, seed: int) -> dict:
    """`n_shards` ShardActors (Flat) serving `kb`, each building its own index over its rows."""
    cfg = IndexConfig(factory="Flat")
    actors = start_shard_actors(n_shards, cfg, namespace=f"bench-memory-{uuid.uuid4().hex[:8]}")
    m = measure_serving(actors, ShardedRetriever(actors), kb, dim, searches, seed)
    return {"shards": n_shards, "load_s": m["load_s"], "idle": m["idle"], "per_shard": m["served"]}


def measure_encoder(passages_path: str, rows: int, model_dir: Path) -> dict:
    """A ShardEncoder actor over the first `rows` passages: after tokenising at start-up, and during one encode."""
    encoder = rag_encoders.load_encoder(model_dir, side="context")
    tokenizer = rag_encoders.load_tokenizer(model_dir)
    make = rag_encoders.encoder_factory(encoder)
    remote = ray.remote(ShardEncoder).options(num_cpus=0, max_restarts=0)

    # The same actor over a few passages: imports, model, Ray's worker, and the tokenizer's first batch.
    idle_rows = min(4096, rows // 2) or 1
    baseline = remote.remote(passages_path, 0, idle_rows, tokenizer, make, encoder.config, 1)
    idle = memory(actor_pid(baseline))
    ray.kill(baseline)

    t0 = time.perf_counter()
    actor = remote.remote(passages_path, 0, rows, tokenizer, make, encoder.config, 1)
    pid = actor_pid(actor)
    start_s = time.perf_counter() - t0
    tokenised = memory(pid)
    # the shard's token ids: a list of lists, or one flat array (a lambda travels to the actor by value)
    tokens = ray.get(
        actor.__ray_call__.remote(
            lambda self: (
                int(np.size(self.token_ids)) if hasattr(self.token_ids, "size") else sum(map(len, self.token_ids))
            )
        )
    )
    # Now: `encode_to` encodes and writes a window of passages at a time to its part file, as in a refresh. First:
    # the object-store pages of a returned shard stay mapped in the actor and would count in any later peak.
    reset_peak(pid)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        written = ray.get(actor.encode_to.remote(encoder.state_dict(), f"{scratch}/part.arrow", 64, 1))
    encode_s = time.perf_counter() - t0
    encoded = memory(pid)
    # Before: `encode` returns the whole shard's vectors (what a refresh handed the builder until 2026-12-01).
    reset_peak(pid)
    t0 = time.perf_counter()
    ray.get(actor.encode.remote(encoder.state_dict(), 64, 1))
    returned_s, returned = time.perf_counter() - t0, memory(pid)
    ray.kill(actor)
    return {
        "rows": rows,
        "idle_rows": idle_rows,
        "tokens": tokens,
        "idle": idle,
        "start_s": start_s,
        "encode_s": encode_s,
        "tokenised": tokenised,
        "encoded": encoded,
        "written": written,
        "window": ShardEncoder.ENCODE_WINDOW,
        "returned_s": returned_s,
        "returned": returned,
    }


# ---------------------------------------------------------------------- run


def tiny_context_encoder(work: Path, dim: int) -> Path:
    """The tiny random context encoder that tests/conftest.py builds (rag_end2end.tiny_models), with DPR's
    projection to `dim` outputs: the vectors an actor holds are the KB's size, the encoding stays cheap."""
    tiny = Path(tiny_models.build_tiny_models(work / "tiny-models")["context_encoder"])
    config = transformers.DPRConfig.from_pretrained(tiny)
    config.projection_dim = dim
    out = work / f"context-encoder-{dim}"
    transformers.DPRContextEncoder(config).save_pretrained(out)
    rag_encoders.load_tokenizer(tiny).save_pretrained(out)
    return out


def environment() -> dict:
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": platform.machine(),
        "system": platform.system(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "ram_gib": ram / 2**30,
        "load_average": os.getloadavg()[0],
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "ray": ray.__version__,
        "faiss": faiss.__version__,
        "datasets": datasets.__version__,
        "pyarrow": pa.__version__,
        "transformers": transformers.__version__,
    }


def measure_size(n: int, work: Path, model_dir: Path | None, params: dict, log: Callable[[str], None]) -> dict:
    """Every measurement of `params["parts"]` on a KB of `n` passages built under `work`."""
    dim, seed, searches = params["dim"], params["seed"], params["searches"]
    parts = params["parts"]
    t0 = time.perf_counter()
    base = work / "base-passages"
    text_bytes = make_passages(base, n, seed)
    row = {
        "size": n,
        "dim": dim,
        "text_bytes": text_bytes,
        "generate_s": time.perf_counter() - t0,
        "load_average": os.getloadavg()[0],
        "indexes": {},
    }
    log(
        f"\n## {n:,} passages x {dim}: text {text_bytes / MIB:,.0f} MiB, generated in {row['generate_s']:.1f}s, "
        f"load average {row['load_average']:.1f}"
    )
    kbs = {}
    factories = params["factories"] if parts & {"builder", "retrieval"} else params["factories"][:1]
    for version, factory in enumerate(factories, start=1):
        cfg = IndexConfig(factory=factory, train_size=params["train_size"])
        kb, build = measure_builder(base, work / "kb", version, n, dim, params["builder_shards"], cfg, seed)
        kbs[factory] = kb
        disk = {"passages_bytes": du(Path(kb.passages_path)), "index_bytes": du(Path(kb.index_path))}
        entry = row["indexes"][factory] = {"builder": build, "disk": disk}
        log(
            f"{factory}: builder peak {build['peak'] / MIB:,.0f} MiB (idle {build['idle']['VmRSS'] / MIB:,.0f}) in "
            f"{build['seconds']:.1f}s; on disk: passages {disk['passages_bytes'] / MIB:,.0f} MiB, index "
            f"{disk['index_bytes'] / MIB:,.0f} MiB"
        )
        if "retrieval" in parts:
            r = entry["retrieval"] = measure_retrieval(kb, dim, searches, seed)
            log(
                f"{factory}: retrieval actor peak {mib(r['VmHWM'])} MiB, RSS {mib(r['VmRSS'])} MiB (idle "
                f"{mib(r['idle']['VmRSS'])}; anon {mib(r['RssAnon'])}, file {mib(r['RssFile'])}); passages mapped "
                f"{mib(r['mapped_bytes'])} MiB, resident {mib(r['mapped_resident_bytes'])}; "
                f"load {r['load_s']:.1f}s"
            )
    first = kbs[factories[0]]
    if "retrieval" in parts and params["index_shards"] > 1:
        s = row["shards"] = measure_shards(first, params["index_shards"], dim, searches, seed)
        held = [anon(m, i) for m, i in zip(s["per_shard"], s["idle"])]
        peaks = ", ".join(mib(m["VmHWM"]) for m in s["per_shard"])
        log(f"{s['shards']} Flat shard actors: peak {peaks} MiB, held - idle {', '.join(map(mib, held))} MiB")
    if model_dir is not None:
        rows = min(n, params["encode_rows"])
        e = row["encoder"] = measure_encoder(first.passages_path, rows, model_dir)
        log(
            f"encoding actor over {rows:,} passages ({e['tokens'] / rows:.0f} tokens each): start-up "
            f"{e['start_s']:.1f}s, peak {e['tokenised']['VmHWM'] / MIB:,.0f} MiB, then holds "
            f"{mib(anon(e['tokenised'], e['idle']))} MiB (anonymous) over idle; encode (returning the vectors) "
            f"{e['returned_s']:.1f}s, peak {e['returned']['VmHWM'] / MIB:,.0f} MiB; encode_to {e['encode_s']:.1f}s, "
            f"peak {e['encoded']['VmHWM'] / MIB:,.0f} MiB"
        )
    return row


def run(
    sizes: list[int],
    dim: int = 768,
    factories: tuple[str, ...] = DEFAULT_FACTORIES,
    *,
    parts: tuple[str, ...] = ("builder", "retrieval", "encoder"),
    encode_rows: int = 50_000,
    builder_shards: int = 2,
    index_shards: int = 2,
    searches: int = 20,
    train_size: int = 100_000,
    machine_gib: float = 24.0,
    reserve_gib: float = 6.0,
    seed: int = 0,
    workdir: str | None = None,
    keep: bool = False,
    log: Callable[[str], None] = print,
) -> dict:
    """Measure every KB size; a JSON-serialisable dict (`markdown` turns it into a table). The builder always
    runs: it writes the versions that the other parts load."""
    params = {
        "sizes": sorted(sizes),
        "dim": dim,
        "factories": list(factories),
        "parts": set(parts),
        "encode_rows": encode_rows,
        "builder_shards": builder_shards,
        "index_shards": index_shards,
        "searches": searches,
        "train_size": train_size,
        "machine_gib": machine_gib,
        "reserve_gib": reserve_gib,
        "seed": seed,
    }
    env = environment()
    log(header(env))
    started_ray = not ray.is_initialized()
    init_ray(None, f"bench-memory-{uuid.uuid4().hex[:8]}")
    work = Path(workdir or tempfile.mkdtemp(prefix="bench-memory-"))
    model_dir = tiny_context_encoder(work, dim) if "encoder" in parts else None
    rows = []
    try:
        for n in sorted(sizes):
            # The builder's peak is the largest: skip a size where it would not fit (or take the machine down).
            ratios = [
                (x["builder"]["peak"] - x["builder"]["idle"]["VmRSS"]) / x["builder"]["embeddings_bytes"]
                for r in rows
                for x in r.get("indexes", {}).values()
            ]
            ratio = max(ratios, default=BUILDER_RATIO_GUESS)
            need, free = ratio * n * dim * 4, available_memory()
            if need > 0.8 * free:
                basis = f"measured {ratio:.1f}x" if ratios else f"guessed {ratio:.1f}x, no smaller size measured"
                rows.append(
                    {
                        "size": n,
                        "dim": dim,
                        "skipped": f"the builder would peak at ~{need / 2**30:.1f} GiB "
                        f"({basis} the embeddings), {free / 2**30:.1f} GiB is available",
                    }
                )
                log(f"\n## {n:,} passages: skipped: {rows[-1]['skipped']}")
                continue
            size_dir = work / f"kb-{n}"
            if size_dir.exists():  # inside a user-chosen --workdir: never delete what we did not write now
                raise FileExistsError(f"{size_dir} exists (an earlier run's?): remove it or choose another --workdir")
            encoder = "encoder" in parts and not any("encoder" in r for r in rows)  # its shard: encode_rows at most
            try:
                rows.append(measure_size(n, size_dir, model_dir if encoder else None, params, log))
            finally:
                if not keep:
                    shutil.rmtree(size_dir, ignore_errors=True)
    finally:
        if started_ray:
            shutdown_ray()
        if not keep and not workdir:
            shutil.rmtree(work, ignore_errors=True)
    params["parts"] = sorted(params["parts"])
    result = {
        "bench": "memory",
        "environment": env,
        "params": params,
        "rows": rows,
        "driver_peak": memory(os.getpid())["VmHWM"],
    }
    result["conclusion"] = conclusion(result)
    return result


# ---------------------------------------------------------------------- conclusion


def fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    """(bytes a passage, bytes regardless of size) of a figure measured at (size, bytes) points: a least-squares
    line through two sizes or more, else through the origin."""
    if len({n for n, _ in points}) < 2:
        n, value = points[-1]
        return value / n, 0.0
    slope, intercept = np.polyfit([n for n, _ in points], [v for _, v in points], 1)
    return float(slope), float(intercept)


def conclusion(result: dict) -> dict:
    """Per index: bytes a passage in each process (fitted over the sizes measured), and the largest KB that fits
    the machine when a retrieval actor alone holds it, and through refreshes, in the worse of their two phases:
    the build (the builder's peak beside the live retrieval actor) and the swap (the retrieval actor holds the old
    and the new version, beside what the builder kept). The encoding actors hold their token ids all along."""
    p = result["params"]
    budget = (p["machine_gib"] - p["reserve_gib"]) * 2**30
    out = {"budget_bytes": budget, "indexes": {}}
    encoders = [r["encoder"] for r in result["rows"] if "encoder" in r]
    enc = None
    if encoders:
        e = encoders[-1]
        # its token ids a passage; a window of vectors and the model's activations (its peak in encode_to over what
        # it holds) whatever the shard's size
        per = anon(e["tokenised"], e["idle"]) / (e["rows"] - e["idle_rows"])
        window = max(0, e["encoded"]["VmHWM"] - e["tokenised"]["VmRSS"])
        enc = out["encoder"] = {"per_passage": per, "fixed": e["idle"]["VmRSS"] + window}
    for factory in p["factories"]:
        rows = [r for r in result["rows"] if "retrieval" in r.get("indexes", {}).get(factory, {})]
        if not rows:
            continue
        entries = [(r["size"], r["indexes"][factory]) for r in rows]
        last = entries[-1][1]
        ret_idle, build_idle = last["retrieval"]["idle"]["VmRSS"], last["builder"]["idle"]["VmRSS"]
        ret = fit([(n, anon(x["retrieval"], x["retrieval"]["idle"])) for n, x in entries])
        peak = fit([(n, x["builder"]["peak"] - x["builder"]["idle"]["VmRSS"]) for n, x in entries])
        kept = fit([(n, x["builder"]["after_rss"] - x["builder"]["idle"]["VmRSS"]) for n, x in entries])
        disk = fit([(n, x["disk"]["index_bytes"] + x["disk"]["passages_bytes"]) for n, x in entries])
        c = {
            "sizes": [n for n, _ in entries],
            "index_per_passage": last["disk"]["index_bytes"] / entries[-1][0],
            "retrieval_per_passage": ret[0],
            "builder_peak_per_passage": peak[0],
            "builder_kept_per_passage": kept[0],
            "disk_per_passage": disk[0],
            "serving_max": int((budget - ret_idle - ret[1]) / ret[0]),
            "builder_max": int((budget - build_idle - peak[1]) / peak[0]),
        }
        if enc:
            fixed = ret_idle + build_idle + enc["fixed"]
            phases = {  # (bytes a passage, fixed bytes)
                "build": (ret[0] + peak[0] + enc["per_passage"], fixed + ret[1] + peak[1]),
                "swap": (2 * ret[0] + kept[0] + enc["per_passage"], fixed + ret_idle + 2 * ret[1] + kept[1]),
            }
            most = {name: int((budget - b) / a) for name, (a, b) in phases.items()}
            c["binding_phase"] = min(most, key=most.get)
            c["refresh_per_passage"] = phases[c["binding_phase"]][0]
            c["refresh_max"] = most[c["binding_phase"]]
        out["indexes"][factory] = c
    return out


# ---------------------------------------------------------------------- report


def header(env: dict) -> str:
    return "\n".join(
        [
            f"# bench_memory  {env['date']}",
            f"machine: {env['machine']} {env['system']}, cpu_count={env['cpu_count']}, "
            f"usable cpus={env['usable_cpus']}, RAM {env['ram_gib']:.1f} GiB, load average {env['load_average']:.1f}",
            f"versions: python {env['python']}, numpy {env['numpy']}, torch {env['torch']}, ray {env['ray']}, faiss "
            f"{env['faiss']}, datasets {env['datasets']}, pyarrow {env['pyarrow']}, transformers {env['transformers']}",
        ]
    )


def mib(x: float) -> str:
    return f"{x / MIB:,.0f}"


def markdown(result: dict) -> str:
    """One Markdown table of `run()`'s result: a row per (KB size, process or file)."""
    lines = [
        "| passages | process: what is over idle | index | peak RSS MiB | over idle MiB | B / passage | note |",
        "|--:|---|---|--:|--:|--:|---|",
    ]

    def add(n, what, index, peak, held, note, per=None):
        per = held / n if per is None and held is not None else per
        cells = [
            f"{n:,}",
            what,
            index,
            "–" if peak is None else mib(peak),
            "–" if held is None else mib(held),
            "–" if per is None else f"{per:,.0f}",
            note,
        ]
        lines.append("| " + " | ".join(cells) + " |")

    for row in result["rows"]:
        n = row["size"]
        if "skipped" in row:
            add(n, "(not measured)", "–", None, None, "skipped: " + row["skipped"])
            continue
        for factory, entry in row["indexes"].items():
            b, d = entry["builder"], entry["disk"]
            ratio = (b["peak"] - b["idle"]["VmRSS"]) / b["embeddings_bytes"]
            add(
                n,
                "builder: peak",
                f"`{factory}`",
                b["peak"],
                b["peak"] - b["idle"]["VmRSS"],
                f"{ratio:.2f}x the embeddings; then holds {mib(b['after_rss'])} MiB; {b['seconds']:.0f}s",
            )
            if "retrieval" in entry:
                r = entry["retrieval"]
                held = anon(r, r["idle"])
                mapping = (
                    f"mmapped, {mib(r['mapped_resident_bytes'])} of {mib(r['mapped_bytes'])} MiB resident"
                    if r["mappings"]
                    else "NOT mmapped"
                )
                add(
                    n,
                    "retrieval actor: anon held",
                    f"`{factory}`",
                    r["VmHWM"],
                    held,
                    f"index {mib(d['index_bytes'])} MiB; beyond it {mib(held - d['index_bytes'])} MiB, against "
                    f"{mib(row['text_bytes'])} MiB of text: passages {mapping}",
                )
            add(
                n,
                "on disk: passages + index",
                f"`{factory}`",
                None,
                None,
                f"{mib(d['passages_bytes'])} + {mib(d['index_bytes'])} MiB",
                per=(d["passages_bytes"] + d["index_bytes"]) / n,
            )
        if "shards" in row:
            s = row["shards"]
            held = sum(anon(m, i) for m, i in zip(s["per_shard"], s["idle"]))
            peak = sum(m["VmHWM"] for m in s["per_shard"])
            add(
                n,
                f"{s['shards']} shard actors: anon held, together",
                "`Flat`",
                peak,
                held,
                "each builds its own index from the mmapped embeddings",
            )
        if "encoder" in row:
            e = row["encoder"]
            held, tokens = anon(e["tokenised"], e["idle"]), e["tokens"] / e["rows"]
            per = held / (e["rows"] - e["idle_rows"])  # over an actor holding idle_rows passages
            add(
                e["rows"],
                "encoding actor: anon held after start-up",
                "–",
                e["tokenised"]["VmHWM"],
                held,
                f"idle: over {e['idle_rows']:,} passages; {tokens:.0f} tokens a passage, {per / tokens:.1f} bytes "
                f"a token; start-up {e['start_s']:.0f}s",
                per=per,
            )
            peak = e["returned"]["VmHWM"]
            add(
                e["rows"],
                "encoding actor: peak in encode (before: returns the shard's vectors)",
                "–",
                peak,
                peak - e["idle"]["VmRSS"],
                f"{e['returned_s']:.0f}s",
            )
            peak = e["encoded"]["VmHWM"]
            add(
                e["rows"],
                "encoding actor: peak in encode_to (writes its part a window at a time)",
                "–",
                peak,
                peak - e["idle"]["VmRSS"],
                f"{e['encode_s']:.0f}s; windows of {e['window']:,} passages",
            )
    return "\n".join(lines)


def conclusion_text(result: dict) -> str:
    c, p = result["conclusion"], result["params"]
    if not c["indexes"]:
        return "No retrieval actor was measured: no conclusion."
    sizes = next(iter(c["indexes"].values()))["sizes"]
    lines = [
        f"Largest KB on one {p['machine_gib']:g} GiB machine ({p['reserve_gib']:g} GiB kept for the "
        f"trainer, the OS and Ray; dim {p['dim']}; one retrieval actor; linear in the passages, fitted "
        f"over {', '.join(f'{n:,}' for n in sizes)}):"
    ]
    for factory, f in c["indexes"].items():
        line = (
            f"- `{factory}`: retrieval actor {f['retrieval_per_passage']:,.0f} B/passage (index "
            f"{f['index_per_passage']:,.0f}), builder peak {f['builder_peak_per_passage']:,.0f} B/passage: "
            f"a retrieval actor alone holds ~{f['serving_max'] / 1e6:,.1f}M passages, the builder alone writes "
            f"~{f['builder_max'] / 1e6:,.1f}M"
        )
        if "refresh_max" in f:
            line += (
                f"; with refreshes ~{f['refresh_max'] / 1e6:,.1f}M ({f['binding_phase']} phase binds: "
                f"{f['refresh_per_passage']:,.0f} B/passage with the encoder's "
                f"{c['encoder']['per_passage']:,.0f})"
            )
        line += f"; disk {f['disk_per_passage']:,.0f} B/passage a version"
        lines.append(line)
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="100000,1000000", help="comma-separated KB sizes (passages)")
    p.add_argument("--dim", type=int, default=768, help="embedding dimension (DPR: 768)")
    p.add_argument(
        "--factories",
        default=";".join(DEFAULT_FACTORIES),
        help="';'-separated faiss.index_factory strings, one KB version each",
    )
    p.add_argument("--parts", default="builder,retrieval,encoder", help="what to measure (the builder always runs)")
    p.add_argument("--encode_rows", type=int, default=50_000, help="passages of the encoding actor's shard")
    p.add_argument("--builder_shards", type=int, default=2, help="part files (encoding actors) the builder indexes")
    p.add_argument("--index_shards", type=int, default=2, help="ShardActors over the first index's version (0: none)")
    p.add_argument("--searches", type=int, default=20, help="retrieve calls (8 queries, 5 docs) before reading")
    p.add_argument("--train_size", type=int, default=100_000, help="as --index_train_size: IVF/PQ training sample")
    p.add_argument("--machine_gib", type=float, default=24.0, help="the machine of the conclusion")
    p.add_argument("--reserve_gib", type=float, default=6.0, help="of it, kept for the trainer, the OS and Ray")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None, help="default: a temporary directory, removed at the end")
    p.add_argument("--keep", action="store_true", help="keep the KBs written")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = p.parse_args()
    result = run(
        [int(s) for s in args.sizes.split(",") if s.strip()],
        args.dim,
        tuple(f for f in args.factories.split(";") if f.strip()),
        parts=tuple(args.parts.split(",")),
        encode_rows=args.encode_rows,
        builder_shards=args.builder_shards,
        index_shards=args.index_shards,
        searches=args.searches,
        train_size=args.train_size,
        machine_gib=args.machine_gib,
        reserve_gib=args.reserve_gib,
        seed=args.seed,
        workdir=args.workdir,
        keep=args.keep,
    )
    print(f"\nthis process: peak RSS {mib(result['driver_peak'])} MiB\n")
    print(markdown(result))
    print("\n" + conclusion_text(result))
    write_json(args.json, result)


if __name__ == "__main__":
    main()
