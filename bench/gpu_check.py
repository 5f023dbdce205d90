"""The measurements of the GPU check (bench/gpu_check.sh runs this after the GPU tests), side by side in one run:

1. encode: passages/s of a whole KB refresh (encoding actor on the GPU, bf16; index built, version swapped
   in) against a bare bf16 forward pass of the same encoder over the same passages, in this process.
2. train: the tiny models end to end (rag_end2end, bf16-mixed on CUDA) without a refresh and with one every
   `--indexing_freq` steps whose encoding actor shares the GPU (`--index_gpus 0.5`), alternated `--repeats`
   times: step time median and p95 of each, their ratios, generator tokens/s, peak GPU memory: the trainer's
   own (its CUDA allocator) and the whole device's (every process's, so the encoding actor's too).

    python bench/gpu_check.py --out OUT            # on a GPU (what gpu_check.sh runs)
    python bench/gpu_check.py --out OUT --cpu      # the CPU dry run: the same steps, float32, no GPU actor

Writes OUT/gpu_check.json (with the versions, the device, and what was skipped and why) after each part, so that
a run stopped by gpu_check.sh's timeout still leaves the parts it finished.
"""

from __future__ import annotations

from bench_env import REPO  # first: the environment Ray and transformers need, before they are imported

import argparse
import json
import platform
import resource
import tempfile
import threading
import time
from pathlib import Path

import bench_refresh
import datasets
import faiss
import pytorch_lightning as pl
import ray
import torch
import transformers
from bench_encode import bare_forward, build_kb, whole_refresh

from rag_end2end.kb.actors import start_retrieval_actors
from rag_end2end.kb.index import IndexConfig
from rag_end2end.kb.ray_start import init_ray
from rag_end2end.kb.refresh import Refresher
from rag_end2end.kb.retriever import RagRayDistributedRetriever
from rag_end2end.model.encoders import load_encoder, load_tokenizer
from rag_end2end.tiny_models import tiny_run_argv

DUMMY_DATA = REPO / "test_run" / "dummy-train-data"


class TokensAndMemory(pl.Callback):
    """Generator tokens fed in training forward passes (a pre-hook on the generator's transformer counts its
    attention masks), the seconds they took, and the peak memory: CUDA's allocator on a GPU, else the process's
    peak RSS."""

    def __init__(self) -> None:
        self.tokens, self.seconds, self.peak_mib = 0, 0.0, 0.0
        self._handle, self._start = None, 0.0

    def on_train_start(self, trainer, pl_module) -> None:
        def count(module, args, kwargs):
            if module.training:
                mask = kwargs.get("attention_mask")
                self.tokens += int(mask.sum()) if mask is not None else kwargs["input_ids"].numel()

        self._handle = pl_module.model.generator.model.register_forward_pre_hook(count, with_kwargs=True)
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        self._start = time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:
        self.seconds = time.perf_counter() - self._start
        self._handle.remove()
        if pl_module.device.type == "cuda":
            self.peak_mib = torch.cuda.max_memory_allocated() / 2**20
        else:
            self.peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class DeviceMemory:
    """GPU memory in use on the whole device while a block runs, sampled every `interval` s from a thread:
    cudaMemGetInfo (torch.cuda.mem_get_info) counts every process's memory, so the Ray encoding actor's (another
    process, which the trainer's allocator peak leaves out) and each process's CUDA context too. `before_mib` is
    the use when the block starts (after this process's cached blocks are released), `peak_mib` the highest
    sample; a peak shorter than `interval` can be missed. Records nothing without CUDA."""

    def __init__(self, enabled: bool, interval: float = 0.02) -> None:
        self.enabled, self.interval = enabled, interval
        self.before_mib: float | None = None
        self.peak_mib: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def used_mib() -> float:
        free, total = torch.cuda.mem_get_info()
        return (total - free) / 2**20

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_mib = max(self.peak_mib, self.used_mib())

    def __enter__(self) -> DeviceMemory:
        if self.enabled:
            torch.cuda.empty_cache()
            self.before_mib = self.peak_mib = self.used_mib()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak_mib = max(self.peak_mib, self.used_mib())


def device_memory(blocks: list[DeviceMemory]) -> dict:
    """The highest device-wide use over `blocks` and the use before the block that reached it (None on CPU)."""
    top = max(blocks, key=lambda b: b.peak_mib or 0.0)
    return {
        "device_memory_peak_mib": top.peak_mib,
        "device_memory_before_mib": top.before_mib,
        "device_memory_of": f"cudaMemGetInfo: every process on the GPU, sampled every {top.interval * 1e3:g} ms"
        if top.enabled
        else "not measured (no CUDA)",
    }


def versions() -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "lightning": pl.__version__,
        "ray": ray.__version__,
        "faiss": faiss.__version__,
        "datasets": datasets.__version__,
    }


def encode(work: Path, models: dict, args: argparse.Namespace, gpu: bool) -> dict:
    """A whole refresh against a bare forward pass of the same encoder, alternated `args.repeats` times."""
    encoder = load_encoder(str(models["context_encoder"]), side="context").eval()
    tokenizer = load_tokenizer(str(models["context_encoder"]))
    cfg = IndexConfig(factory="Flat")
    kb = build_kb(work / "encode", args.passages, encoder.config.hidden_size, cfg)
    retriever = RagRayDistributedRetriever(start_retrieval_actors(1, namespace=f"gpu-check-{time.time_ns()}"))
    retriever.init_retrieval(kb)
    refresher = Refresher(
        retriever,
        kb.passages_path,
        str(work / "encode" / "versions"),
        encoder,
        tokenizer,
        cfg,
        index_gpus=0.5 if gpu else 0,
        encode_batch_size=args.batch_size,
        keep_versions=2,
    )
    refresher.wait_for_actors()
    weights = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
    passages = datasets.load_from_disk(kb.passages_path).select_columns(["title", "text"])
    device, bare, refresh, memory = "cuda" if gpu else "cpu", [], [], []
    for repeat in range(args.repeats):
        bare.append(bare_forward(encoder, tokenizer, passages, args.batch_size, torch.get_num_threads(), device, gpu))
        with DeviceMemory(gpu) as sampled:  # the refresh encodes in the actor: another process
            refresh.append(whole_refresh(refresher, weights, repeat + 1, None))
        memory.append(sampled)
    refresher.close()
    for actor in retriever.actors:
        ray.kill(actor)
    b, r = bench_refresh.pct(bare, 50), bench_refresh.pct(refresh, 50)
    return {
        "passages": args.passages,
        "batch_size": args.batch_size,
        "bf16": gpu,
        "encoding_actor_gpus": 0.5 * gpu,
        "bare_forward_passages_per_s": b,
        "refresh_passages_per_s": r,
        "refresh_vs_bare": r / b,
        "bare_runs": bare,
        "refresh_runs": refresh,
        **device_memory(memory),
    }


def train(work: Path, models: dict, passages: Path, index: Path, args: argparse.Namespace, gpu: bool) -> dict:
    """Step times without and with a refresh sharing the GPU, alternated; tokens/s and peak memory of the latter."""

    def argv(name: str, *extra: str, steps: int = args.steps) -> list[str]:
        return [
            *tiny_run_argv(models, (passages, index), DUMMY_DATA, work / f"out-{name}"),
            "--training_mode",
            "rag_end2end",
            "--do_train",
            "--accelerator",
            "gpu" if gpu else "cpu",
            "--devices",
            "1",
            "--precision",
            "bf16-mixed" if gpu else "32",
            "--train_batch_size",
            "2",
            "--max_steps",
            str(steps),
            "--max_epochs",
            "100000",
            "--num_sanity_val_steps",
            "0",
            "--check_val_every_n_epoch",
            "100000",
            "--ray_namespace",
            f"gpu-check-{name}-{time.time_ns()}",
            *extra,
        ]

    refresh_flags = ("--indexing_freq", str(args.indexing_freq), *(("--index_gpus", "0.5") if gpu else ()))
    # An untimed first run pays what only a process's first training pays (CUDA context and kernels, lazy imports).
    bench_refresh.train_run("warm-up", argv("warm-up", steps=4), 0)
    runs = {"no_refresh": [], "refresh": []}
    counters, memory = [], []
    for repeat in range(args.repeats):
        runs["no_refresh"].append(bench_refresh.train_run(f"plain-{repeat}", argv(f"plain-{repeat}"), args.warmup))
        counters.append(TokensAndMemory())
        with DeviceMemory(gpu) as sampled:  # the trainer, its retrieval actor and the encoding actor on the GPU
            runs["refresh"].append(
                bench_refresh.train_run(
                    f"refresh-{repeat}", argv(f"refresh-{repeat}", *refresh_flags), args.warmup, counters[-1]
                )
            )
        memory.append(sampled)
    plain = [ms for run in runs["no_refresh"] for _, ms in run.steps]
    busy = [ms for run in runs["refresh"] for _, ms in run.steps]
    pct = bench_refresh.pct
    last = runs["refresh"][-1]
    return {
        "steps": args.steps,
        "repeats": args.repeats,
        "batch_size": 2,
        "precision": "bf16-mixed" if gpu else "32",
        "indexing_freq": args.indexing_freq,
        "encoding_actor_gpus": 0.5 * gpu,
        "step_ms_median": pct(busy, 50),
        "step_ms_p95": pct(busy, 95),
        "step_ms_median_no_refresh": pct(plain, 50),
        "step_ms_p95_no_refresh": pct(plain, 95),
        "step_ratio_median": pct(busy, 50) / pct(plain, 50),
        "step_ratio_p95": pct(busy, 95) / pct(plain, 95),
        "tokens_per_s": sum(c.tokens for c in counters) / sum(c.seconds for c in counters),
        "peak_memory_mib": max(c.peak_mib for c in counters),
        "peak_memory_of": "cuda allocator" if gpu else "cpu rss",
        **device_memory(memory),
        "refreshes": len(last.refresh.history) if last.refresh else 0,
        "kb_version_served": last.module.kb.version,
        "final_loss": float(last.module.trainer.callback_metrics.get("loss", float("nan"))),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--cpu", action="store_true", help="the dry run: every step on CPU, float32")
    p.add_argument("--passages", type=int, default=None, help="KB size of the encode figures (GPU 20000, CPU 300)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps a training run (GPU 120, CPU 10)")
    p.add_argument("--indexing_freq", type=int, default=None, help="refresh every K steps (GPU 20, CPU 3)")
    p.add_argument("--repeats", type=int, default=None, help="alternations of each pair (GPU 3, CPU 1)")
    p.add_argument("--warmup", type=int, default=2, help="first step intervals left out")
    p.add_argument("--batch_size", type=int, default=64, help="encoding batch size")
    p.add_argument("--tests_rc", type=int, default=None, help="the GPU tests' exit status (gpu_check.sh)")
    args = p.parse_args(argv)
    gpu = not args.cpu
    if gpu and not torch.cuda.is_available():
        p.error("no CUDA device: run with --cpu for the dry run")
    defaults = {"passages": (20000, 300), "steps": (120, 10), "indexing_freq": (20, 3), "repeats": (3, 1)}
    for name, (on_gpu, on_cpu) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, on_gpu if gpu else on_cpu)
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    result = {
        "mode": "gpu" if gpu else "cpu",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "versions": versions(),
        "skipped": {},
    }
    result["device"] = torch.cuda.get_device_name(0) if gpu else f"{platform.machine()} CPU"
    if not gpu:
        result["skipped"]["cuda"] = "no CUDA: float32 on CPU, no bf16, the encoding actor on CPU"
    result["skipped"]["real_weights"] = (
        "the packaged MiniLM (~90 MB) and SmolLM2-135M (~270 MB) do not fit a "
        "64 MiB call (../shared/reference/gpu-device.md)"
    )
    if args.tests_rc is not None:
        result["gpu_tests"] = {"returncode": args.tests_rc}
    if not gpu:
        result["skipped"]["device_memory"] = "no CUDA: the device-wide memory is not measured"
    start = time.perf_counter()

    def save() -> None:  # after each part: a run stopped by the timeout keeps what it finished
        result["seconds"] = time.perf_counter() - start
        (args.out / "gpu_check.json").write_text(json.dumps(result, indent=1))

    models, passages, index = bench_refresh.build_inputs(work, 4, "flat")
    init_ray(None, f"gpu-check-{time.time_ns()}")
    result["encode"] = encode(work, models, args, gpu)
    print(f"encode: {json.dumps(result['encode'])}", flush=True)
    save()
    result["train"] = train(work, models, passages, index, args, gpu)
    print(f"train: {json.dumps(result['train'])}", flush=True)
    result["refresh"] = {k: result["train"][k] for k in ("step_ratio_median", "step_ratio_p95")}
    save()
    ray.shutdown()
    return result


if __name__ == "__main__":
    main()
