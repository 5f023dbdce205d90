"""Which FAISS index at which KB size: build time, memory, search latency and recall of the toolkit's indexes.

For each KB size in --sizes, a seeded synthetic KB of L2-normalised (cosine) vectors shaped like passage
embeddings rather than uniform noise: a mixture of sqrt(n) Gaussian clusters whose points spread along a few
low-dimensional subspaces, plus a little isotropic noise. The queries are held-out points of the same mixture,
not KB rows. The ground truth is the exact top-10 by inner product (faiss.knn, the brute force IndexFlatIP runs).

Every index is built by `kb_encode_utils.build_faiss_index` (what use_own_knowledge_dataset.py and the KB refresh
build), then measured, one index in memory at a time:

- build: seconds for train + add, and vectors/s;
- memory: bytes of the serialised index (the size faiss.serialize_index gives, counted without holding a copy);
- search latency: p50 / p99 ms of single queries (batch 1, --single of them) and of --batches batches of 32;
- recall@10: mean fraction of the exact top-10 found in the index's top-10, over all --queries queries.

An index whose build an estimate puts above --max_build_s is skipped, with the estimate in the table: the same
index's build time at the previous size (or on a 20k-vector pilot) scaled by a rough cost model. Figures are
printed, never asserted; the machine may be shared, so the load average goes with each size.

    python bench/bench_index.py --sizes 10000,50000 --dim 384 --queries 200   # a few minutes on 2 cores
    python bench/bench_index.py                                               # 10k, 100k, 1M at dim 768: hours
    python bench/bench_index.py --factories "Flat;IVF{nlist},Flat@nprobe=8" --json index.json

--factories takes ';'-separated entries (factory strings contain commas): a faiss.index_factory string, or
`flat` / `hnsw` for the toolkit's --index_type (hnsw: M=128), optionally followed by `@` and faiss search
parameters ("nprobe=16", "efSearch=64"). `{nlist}` (about 4 sqrt(n), a power of two) and `{m}` (PQ
sub-quantizers: about dim/8, a divisor of dim) are substituted per size. The default PQ entries end in `np`:
without it index_factory's IVF,PQ runs polysemous training, about 3 CPU-seconds per sub-quantizer on this
machine, for a search mode the toolkit never turns on.

GPU rows (--gpu_factories, run when this faiss has GPU support and sees a GPU; otherwise skipped with the reason
printed): the same index trained on CPU and with its k-means on the GPU (faiss_devices.train_index, what the KB
builder does under --faiss_gpu), then searched on CPU and as a GPU copy (faiss_devices.to_gpu, what the retrieval
actors search): training seconds, batch 1 and batch p50/p99 and recall@10, CPU and GPU side by side in one table.

    python bench/bench_index.py --sizes 100000,1000000 --factories Flat --gpu_factories "Flat;IVF{nlist},Flat@nprobe=16"
"""

from __future__ import annotations

from bench_env import write_json

import argparse
import math
import os
import platform
import re
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import faiss
import numpy as np

from rag_end2end.kb import faiss_devices
from rag_end2end.kb.index import IndexConfig, build_faiss_index, new_faiss_index

REPO = Path(__file__).resolve().parents[1]

K = 10  # recall@K against the exact top-K
PILOT = 20_000  # vectors of the pilot build that sizes the estimate when no smaller size was built
CHUNK = 32_768  # rows generated at a time
SUBSPACES, LATENT = 16, 32  # clusters spread along one of SUBSPACES random LATENT-dim subspaces
# Norms of a point's in-subspace and isotropic offsets from its unit-norm centre: clusters overlap enough that
# IVF lists cut through them (recall@10 ~0.9 at nprobe=16 of 4 sqrt(n) lists), top-1 cosine ~0.55.
SPREAD, NOISE = 2.0, 0.5


def parse_factories(text: str) -> dict[str, dict]:
    """`--factories` entries ("factory[@search params]", ';'-separated) as run()'s `factories`: label -> spec."""
    specs = {}
    for entry in filter(None, (e.strip() for e in text.split(";"))):
        factory, _, params = entry.partition("@")
        kind = {"index_type": factory} if factory in ("flat", "hnsw") else {"factory": factory}
        specs[entry] = {**kind, "search_params": params or None}
    return specs


DEFAULT_FACTORIES = {
    **parse_factories(
        "Flat;hnsw;HNSW32,Flat;IVF{nlist},Flat@nprobe=16;IVF{nlist},Flat@nprobe=64;IVF{nlist},PQ{m}np@nprobe=32"
    ),
    "OPQ{m},IVF{nlist}_HNSW32,PQ{m}np@nprobe=32": {
        "factory": "OPQ{m},IVF{nlist}_HNSW32,PQ{m}np",
        "search_params": "nprobe=32",
        "min_size": 1_000_000,  # its HNSW coarse quantizer pays off with many lists only
    },
}


# The GPU rows: what the retrieval actors and the KB builder put on GPUs under --faiss_gpu (HNSW has no GPU version).
DEFAULT_GPU_FACTORIES = parse_factories("Flat;IVF{nlist},Flat@nprobe=16;IVF{nlist},PQ{m}np@nprobe=32")


def ivf_lists(n: int) -> int:
    """IVF lists for n vectors: 4 sqrt(n) rounded to a power of two (faiss's rule of thumb)."""
    return 2 ** round(math.log2(4 * math.sqrt(n)))


def pq_m(dim: int) -> int:
    """PQ sub-quantizers for `dim`: dim/8 (8-dim sub-vectors, 1 byte each), lowered until it divides dim."""
    m = max(1, dim // 8)
    while dim % m:
        m -= 1
    return m


def index_config(spec: dict, n: int, dim: int, train_size: int) -> IndexConfig:
    """The toolkit's IndexConfig for one `factories` entry at KB size n, placeholders substituted."""
    sub = {"nlist": ivf_lists(n), "m": pq_m(dim)}
    factory, params = spec.get("factory"), spec.get("search_params")
    return IndexConfig(
        index_type=spec.get("index_type", "hnsw"),
        factory=factory.format(**sub) if factory else None,
        train_size=train_size,
        search_params=params.format(**sub) if params else None,
    )


# ---------------------------------------------------------------------- data


def _unit(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def _mixture_points(rng: np.random.Generator, centres: np.ndarray, bases: np.ndarray, m: int) -> np.ndarray:
    """m unit vectors: a random centre, plus an offset in its cluster's subspace, plus isotropic noise."""
    cluster = rng.integers(len(centres), size=m)
    dim = centres.shape[1]
    x = centres[cluster]
    x += rng.standard_normal((m, dim), dtype=np.float32) * np.float32(NOISE / math.sqrt(dim))
    z = rng.standard_normal((m, LATENT), dtype=np.float32)
    for s in range(SUBSPACES):
        rows = np.flatnonzero(cluster % SUBSPACES == s)
        x[rows] += z[rows] @ bases[s]
    return _unit(x)


def synthetic_kb(n: int, dim: int, queries: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded KB of n unit vectors shaped like passage embeddings, and `queries` held-out points of its mixture."""
    rng = np.random.default_rng([seed, n, dim])
    centres = _unit(rng.standard_normal((max(1, round(math.sqrt(n))), dim), dtype=np.float32))
    # Rows of norm ~SPREAD / sqrt(LATENT): z @ basis, z ~ N(0, I), then has norm ~SPREAD.
    bases = rng.standard_normal((SUBSPACES, LATENT, dim), dtype=np.float32)
    bases *= np.float32(SPREAD / math.sqrt(LATENT * dim))
    kb = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, CHUNK):
        chunk_rng = np.random.default_rng([seed, n, dim, 1, start])
        kb[start : start + CHUNK] = _mixture_points(chunk_rng, centres, bases, min(CHUNK, n - start))
    xq = _mixture_points(np.random.default_rng([seed, n, dim, 2]), centres, bases, queries)
    return kb, xq


# ---------------------------------------------------------------------- measures


def build_cost(cfg: IndexConfig, n: int, dim: int) -> float:
    """Rough build cost of `cfg` over n vectors, in k-means distance-table entries (one costs about the same at 8
    and 384 dimensions here, more above: memory-bound below). Only its ratios are used: it scales a measured build
    time to another size. Exponents and weights fitted to CPU seconds of 10k -> 50k builds at dim 384, 1 thread."""
    factory = cfg.factory or ("HNSW" if cfg.index_type == "hnsw" else "Flat")
    entry = max(1.0, dim / 384)  # a full-dimension entry
    cost = n * entry / 100  # copying the vectors
    train = min(n, cfg.train_size)
    if factory.startswith("HNSW"):  # a graph over all vectors; cache misses grow with it
        cost += n**1.25 * math.log2(max(n, 2)) * cfg.ef_construction * entry
    if ivf := re.search(r"IVF(\d+)(_HNSW)?", factory):  # k-means, 25 iterations on <= 256 points a list
        nlist = int(ivf[1])
        cost += (25 * min(train, 256 * nlist) * nlist + n * (500 if ivf[2] else nlist)) * entry
    if pq := re.search(r"PQ(\d+)", factory):  # per sub-quantizer: k-means of 256 on <= 65,536 points, encoding
        m = int(pq[1])
        cost += 25 * min(train, 65_536) * 256 * m + n * 256 * m
        if factory.startswith("OPQ"):  # 50 rotation updates of 4 PQ k-means iterations each
            cost += 200 * min(train, 65_536) * 256 * m
    return cost


def serialized_bytes(index: faiss.Index) -> int:
    """len(faiss.serialize_index(index)), counted as it is written rather than held (3 GB for a 1M x 768 Flat)."""
    total = 0

    def count(chunk: bytes) -> int:
        nonlocal total
        total += len(chunk)
        return len(chunk)

    writer = faiss.PyCallbackIOWriter(count)
    faiss.write_index(index, writer)
    del writer  # flushes its buffer
    return total


@contextmanager
def faiss_stderr(into: list[str]) -> Iterator[None]:
    """Collect what faiss's C++ code prints on stderr (k-means asking for more training points, once per PQ
    sub-quantizer) into `into`, each distinct line once with its count, instead of flooding the output."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            counts = Counter(tmp.read().decode(errors="replace").splitlines())
            into.extend(line + (f" (x{c})" if c > 1 else "") for line, c in counts.items() if line.strip())


def secs(seconds: float) -> str:
    return f"{seconds:,.0f}s" if seconds >= 10 else f"{seconds:.1f}s"


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def search_figures(
    index: faiss.Index, xq: np.ndarray, truth: np.ndarray, single: int, batches: int, batch_size: int
) -> dict:
    """recall@K of `index` (a CPU or GPU index) over all queries, and p50/p99 ms of `single` queries one at a time
    and of `batches` batches of `batch_size`."""
    _, found = index.search(xq, K)  # also warms up
    recall = float((found[:, :, None] == truth[:, None, :]).any(axis=2).mean())
    one = []
    for q in xq[:single]:
        t0 = time.perf_counter()
        index.search(q[None], K)
        one.append(1e3 * (time.perf_counter() - t0))
    blocks = [xq.take(np.arange(b * batch_size, (b + 1) * batch_size), axis=0, mode="wrap") for b in range(batches)]
    many = []
    for block in blocks:
        t0 = time.perf_counter()
        index.search(block, K)
        many.append(1e3 * (time.perf_counter() - t0))
    return {
        "batch1_p50_ms": pct(one, 50),
        "batch1_p99_ms": pct(one, 99),
        "batch_size": batch_size,
        "batch_p50_ms": pct(many, 50),
        "batch_p99_ms": pct(many, 99),
        f"recall_at_{K}": recall,
    }


def measure(
    kb: np.ndarray, xq: np.ndarray, truth: np.ndarray, cfg: IndexConfig, single: int, batches: int, batch_size: int
) -> dict:
    """Build `cfg` over kb with the toolkit's build_faiss_index, time its searches and score its recall."""
    wall, cpu = time.perf_counter(), time.process_time()
    index = build_faiss_index(kb, replace(cfg, faiss_gpu="off"))  # the CPU rows; GPUs: gpu_versus_cpu
    build_s, build_cpu_s = time.perf_counter() - wall, time.process_time() - cpu
    nbytes = serialized_bytes(index)
    searched = search_figures(index, xq, truth, single, batches, batch_size)
    del index
    return {
        "status": "ok",
        "build_s": build_s,
        "build_cpu_s": build_cpu_s,  # / build_s: the cores the build got
        "vectors_per_s": len(kb) / build_s,
        "bytes": nbytes,
        **searched,
    }


def gpu_versus_cpu(kb: np.ndarray, xq: np.ndarray, truth: np.ndarray, label: str, spec: dict, args: dict) -> dict:
    """One GPU row: the index of `spec` trained with faiss_devices.train_index on CPU (--faiss_gpu off) and on the
    GPUs (args["gpu_mode"]), each then filled on CPU and searched where it was trained (the GPU side as a to_gpu
    copy): training seconds, search latencies and recall@K of both, from the same data in the same run."""
    n, dim = kb.shape
    cfg = index_config(spec, n, dim, args["train_size"])
    row = {
        "size": n,
        "dim": dim,
        "index": label,
        "factory": cfg.factory or f"--index_type {cfg.index_type}",
        "search_params": cfg.search_params,
        "gpu_mode": args["gpu_mode"],
    }
    warnings: list[str] = []
    try:
        for side, mode in (("cpu", "off"), ("gpu", args["gpu_mode"])):
            with faiss_stderr(warnings):
                t0 = time.perf_counter()
                index = new_faiss_index(dim, n, replace(cfg, faiss_gpu=mode), kb.__getitem__)
                train_s = time.perf_counter() - t0
                index.add(kb)
                searched = faiss_devices.to_gpu(index, mode)
                if side == "gpu" and searched is index:
                    why = "HNSW has no GPU version in faiss" if faiss_devices.is_hnsw(index) else "faiss kept it on CPU"
                    row.update(status="skipped", note=f"stays on CPU: {why}")
                    break
                row[side] = {
                    "train_s": train_s,
                    **search_figures(searched, xq, truth, args["single"], args["batches"], args["batch_size"]),
                }
            del searched, index
        else:
            row["status"] = "ok"
    except ValueError as err:  # e.g. too few vectors to train this many lists
        row.update(status="failed", note=str(err))
    row["faiss_stderr"] = warnings
    return row


def environment() -> dict:
    """The machine, versions and faiss threads the figures were taken with."""
    cpu_model = ""
    if Path("/proc/cpuinfo").is_file():
        cpu_model = next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            "",
        )
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "machine": platform.machine(),
        "system": platform.system(),
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "ram_gib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30,
        "faiss_threads": faiss.omp_get_max_threads(),
        "load_average": os.getloadavg()[0],
        "python": platform.python_version(),
        "numpy": np.__version__,
        "faiss": faiss.__version__,
        "faiss_compile_options": faiss.get_compile_options().strip(),
        "faiss_gpus": faiss_devices.visible_gpus(),  # 0 with faiss-cpu
    }


# ---------------------------------------------------------------------- run


def bench_index(
    kb: np.ndarray, xq: np.ndarray, truth: np.ndarray, label: str, spec: dict, reference: dict, args: dict
) -> dict:
    """One row: an index of `factories` at KB size len(kb), measured, or skipped when its estimated build is too
    long. `reference` (label -> the latest known (n, cfg, build s)) sizes the estimate and is updated."""
    n, dim = kb.shape
    cfg = index_config(spec, n, dim, args["train_size"])
    kind = f"--index_type {cfg.index_type}" + (f" (M={cfg.hnsw_m})" if cfg.index_type == "hnsw" else "")
    row = {"size": n, "dim": dim, "index": label, "factory": cfg.factory or kind, "search_params": cfg.search_params}
    warnings: list[str] = []
    if label not in reference and n > PILOT:  # nothing smaller to scale from: a pilot build
        pilot_cfg = index_config(spec, PILOT, dim, args["train_size"])
        try:
            start = time.perf_counter()
            with faiss_stderr(warnings):
                build_faiss_index(kb[:PILOT], pilot_cfg)
            reference[label] = (PILOT, pilot_cfg, time.perf_counter() - start)
        except ValueError:
            pass  # the real build will say why
    if label in reference:
        n_ref, cfg_ref, seconds = reference[label]
        row["estimated_build_s"] = seconds * build_cost(cfg, n, dim) / build_cost(cfg_ref, n_ref, dim)
        row["estimated_from_size"] = n_ref
    if row.get("estimated_build_s", 0.0) > args["max_build_s"]:
        row.update(
            status="skipped", note=f"estimated build {secs(row['estimated_build_s'])} > {secs(args['max_build_s'])}"
        )
        reference[label] = (n, cfg, row["estimated_build_s"])
        return row
    try:
        with faiss_stderr(warnings):
            row.update(measure(kb, xq, truth, cfg, args["single"], args["batches"], args["batch_size"]))
        reference[label] = (n, cfg, row["build_s"])
    except ValueError as err:  # e.g. too few vectors to train this many lists
        row.update(status="failed", note=str(err))
    row["faiss_stderr"] = warnings
    return row


def run(
    sizes: list[int],
    dim: int = 768,
    factories: dict | None = None,
    queries: int = 1000,
    seed: int = 0,
    *,
    single: int = 200,
    batches: int = 20,
    batch_size: int = 32,
    max_build_s: float = 900.0,
    train_size: int = 100_000,
    gpu_factories: dict | None = None,
    gpu_mode: str = "replicate",
    log: Callable[[str], None] = print,
) -> dict:
    """Measure every index of `factories` (default DEFAULT_FACTORIES) at every KB size, and every index of
    `gpu_factories` (default none) on CPU and GPU side by side when this faiss has GPUs (else the reason why not is
    printed and recorded); a JSON-serialisable dict."""
    factories = DEFAULT_FACTORIES if factories is None else factories
    gpu_factories = gpu_factories or {}
    args = {
        "sizes": sorted(sizes),
        "dim": dim,
        "queries": queries,
        "seed": seed,
        "k": K,
        "single": single,
        "batches": batches,
        "batch_size": batch_size,
        "max_build_s": max_build_s,
        "train_size": train_size,
        "gpu_mode": gpu_mode,
    }
    env = environment()
    log(header(env))
    gpu = {"factories": gpu_factories, "rows": []} if gpu_factories else None
    if gpu and not env["faiss_gpus"]:
        has = faiss_devices.faiss_has_gpu()
        gpu.update(
            status="skipped",
            reason=f"{faiss_devices.faiss_build()} "
            + (
                "sees no GPU"
                if has
                else (f"has no GPU support (replace faiss-cpu with {faiss_devices.GPU_WHEEL}: docs/large-kbs.md)")
            ),
        )
        log(f"GPU rows skipped: {gpu['reason']}")
    reference: dict[str, tuple[int, IndexConfig, float]] = {}
    rows, data = [], []
    for n in sorted(sizes):
        t0 = time.perf_counter()
        kb, xq = synthetic_kb(n, dim, queries, seed)
        t1 = time.perf_counter()
        _, truth = faiss.knn(xq, kb, K, faiss.METRIC_INNER_PRODUCT)
        t2 = time.perf_counter()
        data.append({"size": n, "generate_s": t1 - t0, "exact_search_s": t2 - t1, "load_average": os.getloadavg()[0]})
        log(
            f"\n## {n:,} x {dim}: data {t1 - t0:.1f}s, exact top-{K} of {queries} queries {t2 - t1:.1f}s, "
            f"load average {data[-1]['load_average']:.1f}"
        )
        for label, spec in factories.items():
            if n >= spec.get("min_size", 0):
                rows.append(bench_index(kb, xq, truth, label, spec, reference, args))
                log(row_line(rows[-1]))
        for label, spec in gpu_factories.items() if gpu and "status" not in gpu else ():
            if n >= spec.get("min_size", 0):
                gpu["rows"].append(gpu_versus_cpu(kb, xq, truth, label, spec, args))
                log(gpu_row_line(gpu["rows"][-1]))
        del kb, xq, truth
    if gpu and "status" not in gpu:
        gpu["status"] = "ok"
    result = {"bench": "index", "environment": env, "params": args, "factories": factories, "data": data, "rows": rows}
    return result | ({"gpu": gpu} if gpu else {})


# ---------------------------------------------------------------------- report


def header(env: dict) -> str:
    """The machine/versions lines printed first; with a warning when other processes keep the cores busy."""
    lines = [
        f"# bench_index  {env['date']}",
        f"machine: {env['machine']} {env['system']}, {env['cpu_model']}, cpu_count={env['cpu_count']}, "
        f"usable cpus={env['usable_cpus']}, RAM {env['ram_gib']:.1f} GiB, faiss threads={env['faiss_threads']}, "
        f"load average {env['load_average']:.1f}",
        f"versions: python {env['python']}, numpy {env['numpy']}, faiss {env['faiss']} "
        f"({env['faiss_compile_options']}), GPUs faiss sees: {env['faiss_gpus']}",
    ]
    if env["load_average"] > env["usable_cpus"] - 0.5:
        lines.append(
            f"warning: load average {env['load_average']:.1f} on {env['usable_cpus']} cpus: other processes share "
            "the cores, and with faiss threads > 1 OpenMP waits for descheduled threads (--threads 1 avoids that)"
        )
    return "\n".join(lines)


def row_line(row: dict) -> str:
    """The progress lines of one row: its figures (or why there are none) and what faiss printed."""
    if row["status"] != "ok":
        line = f"{row['index']}: {row['status']}: {row['note']}"
    else:
        line = (
            f"{row['index']}: build {row['build_s']:.1f}s ({row['vectors_per_s']:,.0f} vectors/s), "
            f"{row['bytes'] / 2**20:,.1f} MiB, batch 1 p50/p99 {row['batch1_p50_ms']:.2f}/"
            f"{row['batch1_p99_ms']:.2f} ms, batch {row['batch_size']} p50/p99 {row['batch_p50_ms']:.1f}/"
            f"{row['batch_p99_ms']:.1f} ms, recall@{K} {row[f'recall_at_{K}']:.3f}"
        )
    return "\n".join([line, *(f"    faiss: {w}" for w in row.get("faiss_stderr", []))])


def gpu_row_line(row: dict) -> str:
    """The progress line of one GPU row: CPU and GPU figures side by side (or why there are none)."""
    if row["status"] != "ok":
        return f"{row['index']} CPU vs GPU: {row['status']}: {row['note']}"
    cpu, gpu = row["cpu"], row["gpu"]
    return (
        f"{row['index']} CPU vs GPU ({row['gpu_mode']}): train {cpu['train_s']:.2f}/{gpu['train_s']:.2f}s, batch 1 "
        f"p50/p99 {cpu['batch1_p50_ms']:.2f}/{cpu['batch1_p99_ms']:.2f} vs {gpu['batch1_p50_ms']:.2f}/"
        f"{gpu['batch1_p99_ms']:.2f} ms, batch {cpu['batch_size']} p50/p99 {cpu['batch_p50_ms']:.1f}/"
        f"{cpu['batch_p99_ms']:.1f} vs {gpu['batch_p50_ms']:.1f}/{gpu['batch_p99_ms']:.1f} ms, recall@{K} "
        f"{cpu[f'recall_at_{K}']:.3f} vs {gpu[f'recall_at_{K}']:.3f}"
    )


def gpu_markdown(gpu: dict, batch_size: int) -> str:
    """The GPU rows as one Markdown table, CPU and GPU side by side; one line when they were skipped."""
    if gpu.get("status") == "skipped":
        return f"GPU rows skipped: {gpu['reason']}"
    lines = [
        f"| KB size | index | train s CPU / GPU | batch 1 p50 / p99 ms CPU | GPU | batch {batch_size} p50 / p99 ms CPU "
        f"| GPU | recall@{K} CPU / GPU | note |",
        "|---|---|--:|--:|--:|--:|--:|--:|---|",
    ]
    for r in gpu["rows"]:
        size = f"{r['size']:,} x {r['dim']}"
        name = f"`{r['factory']}`" + (f" {r['search_params']}" if r["search_params"] else "")
        if r["status"] != "ok":
            lines.append(f"| {size} | {name} | – | – | – | – | – | – | {r['status']}: {r['note']} |")
            continue
        c, g = r["cpu"], r["gpu"]
        cells = [
            f"{c['train_s']:,.2f} / {g['train_s']:,.2f}",
            *(
                f"{side[f'{batch}_p50_ms']:.2f} / {side[f'{batch}_p99_ms']:.2f}"
                for batch in ("batch1", "batch")
                for side in (c, g)
            ),
            f"{c[f'recall_at_{K}']:.3f} / {g[f'recall_at_{K}']:.3f}",
            r["gpu_mode"],
        ]
        lines.append(f"| {size} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(result: dict) -> str:
    """One Markdown table of `run()`'s result: a row per (KB size, index); then the GPU rows, if asked for."""
    bs = result["params"]["batch_size"]
    lines = [
        f"| KB size | index | build s | vectors/s | MiB | batch 1 p50 / p99 ms | batch {bs} p50 / p99 ms "
        f"| recall@{K} | note |",
        "|---|---|--:|--:|--:|--:|--:|--:|---|",
    ]
    for r in result["rows"]:
        size = f"{r['size']:,} x {r['dim']}"
        name = f"`{r['factory']}`" + (f" {r['search_params']}" if r["search_params"] else "")
        if r["status"] != "ok":
            note = r["note"] if len(r["note"]) < 120 else r["note"][:117] + "..."  # the JSON has it all
            lines.append(f"| {size} | {name} | – | – | – | – | – | – | {r['status']}: {note} |")
            continue
        note = f"estimated {secs(r['estimated_build_s'])}" if "estimated_build_s" in r else ""
        lines.append(
            f"| {size} | {name} | {r['build_s']:,.1f} | {r['vectors_per_s']:,.0f} | {r['bytes'] / 2**20:,.1f} "
            f"| {r['batch1_p50_ms']:.2f} / {r['batch1_p99_ms']:.2f} "
            f"| {r['batch_p50_ms']:.1f} / {r['batch_p99_ms']:.1f} | {r[f'recall_at_{K}']:.3f} | {note} |"
        )
    if "gpu" in result:
        lines += ["", gpu_markdown(result["gpu"], bs)]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="10000,100000,1000000", help="comma-separated KB sizes")
    p.add_argument("--dim", type=int, default=768, help="embedding dimension (DPR: 768; the CPU recipes: 384)")
    p.add_argument(
        "--factories",
        default=None,
        help="';'-separated indexes (see above); default: " + "; ".join(DEFAULT_FACTORIES) + " (from 1M vectors)",
    )
    p.add_argument("--queries", type=int, default=1000, help="held-out queries for recall")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--single", type=int, default=200, help="single queries timed (batch 1)")
    p.add_argument("--batches", type=int, default=20, help="batches timed")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--max_build_s", type=float, default=900.0, help="skip an index whose estimated build is longer")
    p.add_argument("--train_size", type=int, default=100_000, help="as --index_train_size: IVF/PQ training sample")
    p.add_argument(
        "--gpu_factories",
        default=";".join(DEFAULT_GPU_FACTORIES),
        help="';'-separated indexes measured on CPU and GPU side by side (skipped, with the reason, without a GPU "
        'faiss); "" for none. Default: %(default)s',
    )
    p.add_argument(
        "--gpu_mode",
        choices=["replicate", "shard"],
        default="replicate",
        help="how the GPU rows spread an index over several GPUs (--faiss_gpu)",
    )
    p.add_argument("--threads", type=int, default=None, help="faiss OpenMP threads (default: faiss's own)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = p.parse_args()
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    factories = parse_factories(args.factories) if args.factories else None
    result = run(
        sizes,
        args.dim,
        factories,
        args.queries,
        args.seed,
        single=args.single,
        batches=args.batches,
        batch_size=args.batch_size,
        max_build_s=args.max_build_s,
        train_size=args.train_size,
        gpu_factories=parse_factories(args.gpu_factories),
        gpu_mode=args.gpu_mode,
    )
    print("\n" + markdown(result))
    write_json(args.json, result)


if __name__ == "__main__":
    main()
