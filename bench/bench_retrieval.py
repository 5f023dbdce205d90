"""What Ray adds to a retrieval: the same search through a Ray actor and in this process, by KB size and index.

For each KB size in --sizes and index in --indexes (`flat`: exact inner product, `hnsw`: HNSW with the toolkit's
M=32, both built by `kb_encode_utils.build_kb_version` as a refresh builds them), a seeded synthetic KB: passages
of 100 words drawn from the dummy KB's vocabulary and --dim unit-length float32 embeddings (bench_memory's
generators). Then the same call, `retrieve(--queries questions, --n_docs)` (search, then one Arrow gather of the
passages' text and embeddings), is timed --calls times each way after --warmup calls:

- in process: `RetrievalActor.retrieve` called directly (FAISS and the passages, no Ray);
- through Ray: `RagRayDistributedRetriever.retrieve` on one actor of `start_retrieval_actors` (what training
  calls: the request, the search in the actor, the answer pickled back).

Each way twice: with the stored embeddings (`rag_original` scores with them) and without (`embeddings=False`:
what every recipe with a context encoder in the graph asks, as it re-encodes the passages it retrieves).

Both sides search with the same FAISS threads (--threads, default every core) and alternate in --blocks blocks of
calls, so that other load on the machine falls on both. Reported per (size, index): p50 / p95 ms of each side,
Ray p50 ÷ in-process p50 (the target is <= 1.5) and Ray p50 minus in-process p50 (what Ray adds to a call, in
ms), with embeddings and (`_texts`) without; and whether every side returned the same ids. Once per run, the
round trip of a no-op actor method (`request_count`) on an empty actor: the floor any Ray call pays. Figures are
printed, never asserted.

    python bench/bench_retrieval.py --sizes 1000 --dim 64 --calls 30       # ~20 s on 2 cores
    python bench/bench_retrieval.py --json retrieval.json   # 1k, 10k, 100k x 768: the 100k HNSW build takes minutes
"""

from __future__ import annotations

from bench_env import write_json

import argparse
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import bench_memory  # (sets Ray's environment and puts the repository on the path first)
import numpy as np
import ray

from rag_end2end.kb.actors import RetrievalActor, start_retrieval_actors
from rag_end2end.kb.index import IndexConfig
from rag_end2end.kb.ray_start import init_ray, shutdown_ray
from rag_end2end.kb.retriever import RagRayDistributedRetriever
from rag_end2end.kb.versions import KBVersion, build_kb_version


def timed(call: Callable[[], object], n: int) -> list[float]:
    """Milliseconds of `n` calls of `call`."""
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        call()
        out.append(1e3 * (time.perf_counter() - t0))
    return out


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def noop_round_trip(calls: int, warmup: int) -> dict:
    """p50 / p95 ms of `request_count` (returns an int) on an empty retrieval actor: Ray's floor per call."""
    actor = start_retrieval_actors(1, namespace=f"bench-retrieval-{uuid.uuid4().hex[:8]}")[0]
    timed(lambda: ray.get(actor.request_count.remote()), warmup)
    ms = timed(lambda: ray.get(actor.request_count.remote()), calls)
    ray.kill(actor)
    return {"p50_ms": pct(ms, 50), "p95_ms": pct(ms, 95)}


def compare(
    kb: KBVersion, queries: np.ndarray, n_docs: int, calls: int, warmup: int, blocks: int, threads: int | None
) -> dict:
    """One row: `retrieve` on `kb` in process and through one Ray actor, alternating in `blocks` blocks."""
    local = RetrievalActor(threads=threads)
    local.ensure_live(kb)
    actor = start_retrieval_actors(1, namespace=f"bench-retrieval-{uuid.uuid4().hex[:8]}", threads=threads)
    remote = RagRayDistributedRetriever(actor)
    remote.init_retrieval(kb)
    sides = {
        "local": lambda: local.retrieve(queries, n_docs).ids,  # the actor's Hits
        "ray": lambda: remote.retrieve(queries, n_docs)[1],  # the retriever's (embeddings, ids, docs)
        "local_texts": lambda: local.retrieve(queries, n_docs, embeddings=False).ids,
        "ray_texts": lambda: remote.retrieve(queries, n_docs, embeddings=False)[1],
    }
    same_ids = len({sides[name]().tobytes() for name in sides}) == 1
    ms: dict[str, list[float]] = {name: [] for name in sides}
    for call in sides.values():
        timed(call, warmup)
    for b in range(blocks):  # in-process first in even blocks, Ray first in odd ones
        order = list(sides) if b % 2 == 0 else list(reversed(sides))
        for name in order:
            ms[name] += timed(sides[name], calls // blocks + (b < calls % blocks))
    ray.kill(actor[0])
    row = {"calls": calls, "same_ids": same_ids, "load_average": os.getloadavg()[0]}
    for name in ms:
        row[f"{name}_p50_ms"], row[f"{name}_p95_ms"] = pct(ms[name], 50), pct(ms[name], 95)
    for suffix in ("", "_texts"):
        row[f"ratio{suffix}_p50"] = row[f"ray{suffix}_p50_ms"] / row[f"local{suffix}_p50_ms"]
        row[f"overhead{suffix}_p50_ms"] = row[f"ray{suffix}_p50_ms"] - row[f"local{suffix}_p50_ms"]
    return row


def run(
    sizes: list[int],
    dim: int = 768,
    indexes: tuple[str, ...] = ("flat", "hnsw"),
    *,
    queries: int = 8,
    n_docs: int = 5,
    calls: int = 200,
    warmup: int = 10,
    blocks: int = 4,
    threads: int | None = None,
    seed: int = 0,
    workdir: str | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Measure every (size, index); a JSON-serialisable dict (`markdown` turns it into a table)."""
    params = {
        "sizes": sorted(sizes),
        "dim": dim,
        "indexes": list(indexes),
        "queries": queries,
        "n_docs": n_docs,
        "calls": calls,
        "warmup": warmup,
        "blocks": blocks,
        "threads": threads or os.cpu_count(),
        "seed": seed,
    }
    for n in sizes:  # inside a user-chosen --workdir: never delete what this run did not write
        if workdir and (Path(workdir) / f"kb-{n}x{dim}").exists():
            raise FileExistsError(f"{workdir}/kb-{n}x{dim} exists (an earlier run's?): remove it or choose another")
    env = bench_memory.environment()
    log(bench_memory.header(env).replace("# bench_memory", "# bench_retrieval", 1))
    if params["threads"] > 1 and env["load_average"] > env["usable_cpus"] - 0.5:
        log(
            f"warning: load average {env['load_average']:.1f} on {env['usable_cpus']} cpus: with FAISS threads > 1 "
            "OpenMP waits for descheduled threads, on both sides but unevenly (--threads 1 avoids that)"
        )
    started_ray = not ray.is_initialized()
    init_ray(None, f"bench-retrieval-{uuid.uuid4().hex[:8]}")
    work = Path(workdir or tempfile.mkdtemp(prefix="bench-retrieval-"))
    rows = []
    try:
        noop = noop_round_trip(calls, warmup)
        log(f"no-op actor call (request_count): p50 {noop['p50_ms']:.3f} ms, p95 {noop['p95_ms']:.3f} ms")
        q = bench_memory.unit_queries(queries, dim, seed)
        for n in sorted(sizes):
            size_dir = work / f"kb-{n}x{dim}"
            try:
                bench_memory.make_passages(size_dir / "base", n, seed)
                embeddings = bench_memory.unit_embeddings(n, dim, seed)
                for version, kind in enumerate(indexes, start=1):
                    t0 = time.perf_counter()
                    kb = build_kb_version(
                        str(size_dir / "base"),
                        str(size_dir / "kb"),
                        version,
                        0,
                        IndexConfig(index_type=kind),
                        "cosine",
                        embeddings,
                    )
                    row = {"size": n, "dim": dim, "index": kind, "build_s": time.perf_counter() - t0}
                    row.update(compare(kb, q, n_docs, calls, warmup, blocks, threads))
                    rows.append(row)
                    log(row_line(row))
            finally:
                shutil.rmtree(size_dir, ignore_errors=True)
    finally:
        if started_ray:
            shutdown_ray()
        if not workdir:
            shutil.rmtree(work, ignore_errors=True)
    return {"bench": "retrieval", "environment": env, "params": params, "noop": noop, "rows": rows}


def row_line(r: dict) -> str:
    return (
        f"{r['size']:,} x {r['dim']} {r['index']}: in process p50/p95 {r['local_p50_ms']:.2f}/"
        f"{r['local_p95_ms']:.2f} ms, Ray {r['ray_p50_ms']:.2f}/{r['ray_p95_ms']:.2f} ms, ratio "
        f"{r['ratio_p50']:.2f}, Ray adds {r['overhead_p50_ms']:.2f} ms; without embeddings in process "
        f"{r['local_texts_p50_ms']:.2f}, Ray {r['ray_texts_p50_ms']:.2f} ms, ratio {r['ratio_texts_p50']:.2f}; "
        f"same ids {r['same_ids']} "
        f"(build {r['build_s']:.1f}s, load average {r['load_average']:.1f})"
    )


def markdown(result: dict) -> str:
    """One Markdown table of `run()`'s result: a row per (KB size, index), then the no-op round trip."""
    p, noop = result["params"], result["noop"]
    lines = [
        f"`retrieve`: {p['queries']} queries x {p['n_docs']} docs, {p['calls']} calls a side, "
        f"{p['threads']} FAISS threads",
        "",
        "| passages | index | in process p50 / p95 ms | Ray p50 / p95 ms | Ray ÷ in process, p50 "
        "| Ray adds, p50 ms | without embeddings: in process / Ray p50 ms | Ray ÷ in process, p50 | same ids |",
        "|--:|---|--:|--:|--:|--:|--:|--:|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['size']:,} x {r['dim']} | `{r['index']}` | {r['local_p50_ms']:.2f} / "
            f"{r['local_p95_ms']:.2f} | {r['ray_p50_ms']:.2f} / {r['ray_p95_ms']:.2f} | {r['ratio_p50']:.2f} "
            f"| {r['overhead_p50_ms']:.2f} | {r['local_texts_p50_ms']:.2f} / {r['ray_texts_p50_ms']:.2f} "
            f"| {r['ratio_texts_p50']:.2f} | {r['same_ids']} |"
        )
    lines += [
        "",
        f"No-op actor call (the floor of any Ray call): p50 {noop['p50_ms']:.3f} ms, p95 {noop['p95_ms']:.3f} ms.",
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1000,10000,100000", help="comma-separated KB sizes (passages)")
    p.add_argument("--dim", type=int, default=768, help="embedding dimension (DPR: 768)")
    p.add_argument("--indexes", default="flat,hnsw", help="comma-separated --index_type values (hnsw: M=32)")
    p.add_argument("--queries", type=int, default=8, help="questions a call (a training batch)")
    p.add_argument("--n_docs", type=int, default=5)
    p.add_argument("--calls", type=int, default=200, help="timed calls a side")
    p.add_argument("--warmup", type=int, default=10, help="untimed calls a side first")
    p.add_argument("--blocks", type=int, default=4, help="alternating blocks the calls are split into")
    p.add_argument("--threads", type=int, default=None, help="FAISS threads of both sides (default: every core)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None, help="default: a temporary directory, removed at the end")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = p.parse_args()
    result = run(
        [int(s) for s in args.sizes.split(",") if s.strip()],
        args.dim,
        tuple(i.strip() for i in args.indexes.split(",") if i.strip()),
        queries=args.queries,
        n_docs=args.n_docs,
        calls=args.calls,
        warmup=args.warmup,
        blocks=args.blocks,
        threads=args.threads,
        seed=args.seed,
        workdir=args.workdir,
    )
    print("\n" + markdown(result))
    write_json(args.json, result)


if __name__ == "__main__":
    main()
