"""Benchmark the asynchronous knowledge-base refresh, side by side in one run.

1. Training step time: `finetune_rag.main()` on the same tiny models, KB and data, with
   `--training_mode rag_end2end` alone, with `--indexing_freq K` too (once per `--splits` thread budget,
   trainer threads:encoding-actor threads, and each `--policies` refresh policy), and as `rag_original` (no
   context encoder, no refresh), so the cost of re-encoding the KB and rebuilding its index in Ray actors while
   the trainer keeps stepping shows up as step-time and wall-time ratios; the steps at which a new version was
   swapped in, against the median step; the passages each policy re-encoded.
2. Retrieval through the Ray actors (`RagRayDistributedRetriever.retrieve`, 8 queries a call): latency
   alone, and while new KB versions are staged and activated (the swap a refresh ends with), against the same
   search in this process (RetrievalActor.retrieve called directly: FAISS and the passages, no Ray).

Prints figures only (no asserts on timings). CPU by default:

    python bench/bench_refresh.py                     # ~1.5 minutes on 2 idle CPU cores
    python bench/bench_refresh.py --accelerator gpu --devices 1 --index_gpus 1
    python bench/bench_refresh.py --splits 1:1 --policies full,rotating:4,rotating:4@same,hot:4

Unknown flags go to finetune_rag.py for both runs. One training process only: with --devices > 1,
Lightning's DDP launcher would re-run this script in every rank. Linux only (reads /proc).
"""

from __future__ import annotations

from bench_env import REPO

import argparse
import csv
import dataclasses
import json
import logging
import os
import platform
import re
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import datasets
import faiss
import numpy as np
import pytorch_lightning as pl
import ray
import torch
import transformers

from rag_end2end import tiny_models
from rag_end2end.data.readers import read_kb_csv
from rag_end2end.kb import build as use_own_knowledge_dataset
from rag_end2end.kb.actors import RetrievalActor, start_retrieval_actors
from rag_end2end.kb.retriever import RagRayDistributedRetriever
from rag_end2end.kb.versions import KBVersion, list_versions
from rag_end2end.options import REFRESH_POLICIES
from rag_end2end.training import finetune as finetune_rag
from rag_end2end.training.callbacks import KBRefreshCallback

DUMMY_CSV = REPO / "test_run" / "dummy-kb" / "my_knowledge_dataset.csv"
DUMMY_DATA = REPO / "test_run" / "dummy-train-data"
POLICY_SYNTAX = "NAME[:K[/N]][@F|@same]"
HOT_FULL_EVERY = 5  # hot's --full_refresh_every unless /N says otherwise: without one, rarely retrieved rows age
# finetune_rag.py flags each setting sets itself: passed through, they would come last and make every setting the same
SETTING_FLAGS = {
    "--refresh_policy": "--policies",
    "--refresh_slices": "--policies",
    "--full_refresh_every": "--policies",
    "--trainer_threads": "--splits",  # only with --splits: without it, passing them sets every run's budget
    "--index_cpus": "--splits",
}


@dataclass(frozen=True)
class PolicySetting:
    """One `--policies` entry, NAME[:K[/N]][@F|@same]: --refresh_policy NAME, --refresh_slices K (partial policies
    only, required), --full_refresh_every N (default 0; hot's HOT_FULL_EVERY), --indexing_freq F (default the
    bench's). `@same` refreshes as often as it takes to re-encode about as many passages as the full refresh at
    the bench's --indexing_freq: that frequency times the share of the KB a refresh encodes on average, rounded."""

    spec: str
    policy: str = "full"
    slices: int = 0
    full_every: int = 0
    every: str = ""  # "", "same" or a number of optimizer steps

    @property
    def share(self) -> float:
        """The share of the KB a refresh re-encodes on average (1/K, with one full refresh in N)."""
        if self.policy == "full":
            return 1.0
        if self.full_every:
            return ((self.full_every - 1) / self.slices + 1) / self.full_every
        return 1 / self.slices

    def indexing_freq(self, base: int) -> int:
        """This setting's --indexing_freq, given the bench's."""
        if self.every == "same":
            return max(1, int(base * self.share + 0.5))
        return int(self.every) if self.every else base

    def argv(self, base: int) -> tuple[str, ...]:
        """finetune_rag.py's flags for this setting (`full` adds no policy flag: the runs the bench always made)."""
        flags = ("--indexing_freq", str(self.indexing_freq(base)))
        if self.policy == "full":
            return flags
        partial = ("--refresh_slices", str(self.slices), "--full_refresh_every", str(self.full_every))
        return (*flags, "--refresh_policy", self.policy, *partial)

    @property
    def dir_suffix(self) -> str:
        """This setting's part of its run directories' names: the spec with ':' '/' '@' spelled -k -n -at, so that
        no two specs share one (`rotating:4/5` and `rotating:4@5` would both sanitise to rotating-4-5)."""
        if self.spec == "full":
            return ""  # the run directories the bench always made
        return "-" + self.spec.replace(":", "-k").replace("/", "-n").replace("@", "-at")


def parse_policies(text: str) -> list[PolicySetting]:
    """`--policies`: comma-separated POLICY_SYNTAX entries; ValueError naming the first bad one."""
    settings = []
    for spec in (s.strip() for s in text.split(",")):
        match = re.fullmatch(r"([a-z]+)(?::(\d+)(?:/(\d+))?)?(?:@(same|\d+))?", spec)
        if not match or match[1] not in REFRESH_POLICIES:
            raise ValueError(f"--policies: {spec!r} is not {POLICY_SYNTAX}, NAME one of {', '.join(REFRESH_POLICIES)}")
        name, slices, full_every, every = match.groups()
        if name == "full" and (slices or every == "same"):
            raise ValueError(f"--policies: {spec!r}: full re-encodes the whole KB; it takes no :K nor @same")
        if name != "full" and not slices:
            raise ValueError(f"--policies: {spec!r}: {name} needs :K, the slices (e.g. {name}:4)")
        if slices and int(slices) < 2:
            raise ValueError(f"--policies: {spec!r}: K (--refresh_slices) must be >= 2")
        if every and every != "same" and int(every) < 1:
            raise ValueError(f"--policies: {spec!r}: F (--indexing_freq) must be >= 1")
        if full_every is None:
            full_every = HOT_FULL_EVERY if name == "hot" else 0
        settings.append(PolicySetting(spec, name, int(slices or 0), int(full_every), every or ""))
    if len({s.spec for s in settings}) < len(settings):
        raise ValueError(f"--policies: {text!r} names a setting twice")
    return settings


def parse_args() -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--accelerator", default="cpu", help="passed to finetune_rag.py (cpu, gpu, auto)")
    p.add_argument("--devices", default="1", help="passed to finetune_rag.py; one device only")
    p.add_argument("--kb_copies", type=int, default=20, help="repeat the dummy KB documents N times")
    p.add_argument("--indexing_freq", type=int, default=10, help="refresh every K optimizer steps")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps per training run")
    p.add_argument("--repeats", type=int, default=2, help="alternate the two training runs this many times")
    p.add_argument("--warmup", type=int, default=5, help="first step intervals left out of the figures")
    p.add_argument("--train_batch_size", type=int, default=2)
    p.add_argument("--index_type", choices=["flat", "hnsw"], default="hnsw")
    p.add_argument("--retrieval_seconds", type=float, default=3.0, help="length of the idle retrieval phase")
    p.add_argument("--swaps", type=int, default=20, help="KB versions staged and activated under load")
    p.add_argument("--workdir", default=None, help="default: a fresh temporary directory")
    p.add_argument(
        "--splits",
        default="",
        help='thread budgets of the refresh runs, "T:I,...": --trainer_threads T --index_cpus I '
        "(default: one refresh setting with finetune_rag.py's defaults)",
    )
    p.add_argument(
        "--policies",
        default="full",
        help=f'refresh policies, each run with every split, "{POLICY_SYNTAX},...": --refresh_policy NAME '
        f"--refresh_slices K --full_refresh_every N (default 0; hot: {HOT_FULL_EVERY}) at --indexing_freq F (default "
        "the bench's; same: as often as re-encodes about the full refresh's passages), e.g. "
        "full,rotating:4,rotating:4@same,hot:4 (default: full)",
    )
    p.add_argument("--json", default=None, help="also write the summary here (bench/run_all.py reads it)")
    args, passthrough = p.parse_known_args()
    if args.devices.isdigit() and int(args.devices) > 1:
        p.error("--devices: this bench times one training process; use 1")
    try:
        args.policies = parse_policies(args.policies)
    except ValueError as e:
        p.error(str(e))
    for token in passthrough:
        name = token.split("=")[0]
        # finetune_rag.py's parser takes unambiguous abbreviations: --refresh_pol is --refresh_policy there
        for flag, use in SETTING_FLAGS.items():
            if name.startswith("--") and len(name) > 2 and flag.startswith(name) and (use != "--splits" or args.splits):
                p.error(f"{token}: {use} sets {flag} for each setting; passed through it would override them all")
    return args, passthrough


def plan_settings(
    args: argparse.Namespace,
) -> tuple[dict[str, tuple[str, ...]], dict[str, str], dict[str, tuple[str, PolicySetting]]]:
    """The bench's settings in the order they alternate: name -> the flags it adds to every run's, name -> the
    stem of its run directories (unique: a run refuses a directory holding an earlier run), and the refresh
    settings alone: name -> (its split, its policy)."""
    settings = {"no-refresh": (), "rag_original": ("--training_mode", "rag_original")}
    dirs = {name: name for name in settings}
    refreshing: dict[str, tuple[str, PolicySetting]] = {}
    for split in [s for s in args.splits.split(",") if s] or [""]:
        threads = ()
        if split:
            trainer_threads, index_cpus = split.split(":")
            threads = ("--trainer_threads", trainer_threads, "--index_cpus", index_cpus)
        for policy in args.policies:
            name = f"refresh-{split}" if split else "refresh"
            name += "" if policy.spec == "full" else f" {policy.spec}"
            settings[name] = (*policy.argv(args.indexing_freq), *threads)
            dirs[name] = re.sub(r"[^\w.-]", "-", f"refresh-{split}" if split else "refresh") + policy.dir_suffix
            refreshing[name] = (split, policy)
    return settings, dirs, refreshing


def swap_setting(refreshing: dict[str, tuple[str, PolicySetting]]) -> str:
    """The setting whose newest KB version section 2 swaps with v0: the last split's first full refresh, a whole
    re-encoded KB like the one it starts from; without one, that split's first setting (the report names it)."""
    last_split = list(refreshing.values())[-1][0]
    candidates = [name for name, (split, _) in refreshing.items() if split == last_split]
    return next((name for name in candidates if refreshing[name][1].policy == "full"), candidates[0])


# ---------------------------------------------------------------------- inputs


def build_inputs(work: Path, kb_copies: int, index_type: str) -> tuple[dict[str, Path], Path, Path]:
    """Tiny models (as tests/conftest.py builds them) and a KB of `kb_copies` copies of the dummy CSV.

    Each copy gets its own titles, so the copies are distinct passages that all have to be re-encoded."""
    models = tiny_models.build_tiny_models(work / "tiny-models")
    kb_dir = work / f"kb-{kb_copies}x-{index_type}"
    passages, index = kb_dir / "my_knowledge_dataset", kb_dir / "my_knowledge_dataset_hnsw_index.faiss"
    if not index.exists():
        kb_dir.mkdir(parents=True, exist_ok=True)
        csv_path = kb_dir / "kb.csv"
        with csv_path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, delimiter="\t")
            for copy in range(kb_copies):
                writer.writerows((f"{title} (copy {copy})", text) for title, text in read_kb_csv(DUMMY_CSV))
        kb_args = use_own_knowledge_dataset.parse_args(
            [
                "--csv_path",
                str(csv_path),
                "--output_dir",
                str(kb_dir),
                "--index_type",
                index_type,
                "--dpr_ctx_encoder_model_name",
                str(models["context_encoder"]),
                "--device",
                "cpu",
            ]
        )
        use_own_knowledge_dataset.main(kb_args)
    return models, passages, index


# ---------------------------------------------------------------------- other load on the machine


@dataclass
class CpuSnapshot:
    """CPU seconds used so far by the whole machine (/proc/stat) and by each of this bench's processes
    (this one and its descendants, Ray's included). Linux only, as this bench."""

    machine: float
    ours: dict[int, float]  # pid -> CPU seconds, its waited-for children's included
    at: float

    @classmethod
    def take(cls) -> CpuSnapshot:
        tick = os.sysconf("SC_CLK_TCK")
        busy = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        procs = {}
        for path in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = path.read_text().rsplit(")", 1)[1].split()
            except OSError:  # the process ended meanwhile
                continue
            procs[int(path.parent.name)] = (int(fields[1]), sum(int(x) for x in fields[11:15]) / tick)
        ours, frontier = {os.getpid()}, [os.getpid()]
        while frontier:
            parent = frontier.pop()
            children = [pid for pid, (ppid, _) in procs.items() if ppid == parent and pid not in ours]
            ours.update(children)
            frontier.extend(children)
        machine = (sum(busy) - busy[3] - busy[4]) / tick  # all but idle and iowait
        return cls(machine, {pid: procs[pid][1] for pid in ours if pid in procs}, time.perf_counter())

    def others_cores(self) -> float:
        """Cores that other processes kept busy since this snapshot: on a shared machine, it says whether
        the timings taken meanwhile can be trusted. An upper bound: one of our processes that ended
        meanwhile counts as others' (Ray's raylet does not wait for its workers, so their time is lost)."""
        now = CpuSnapshot.take()
        ours = sum(cpu - self.ours.get(pid, 0.0) for pid, cpu in now.ours.items())
        return max(now.machine - self.machine - ours, 0.0) / (now.at - self.at)


# ---------------------------------------------------------------------- training runs


class StepTimer(pl.Callback):
    """Records when each training batch ends; it runs after KBRefreshCallback, so a step's interval
    includes the refresh's polling, weight snapshot and swap work done at that batch end."""

    def __init__(self) -> None:
        self.marks: list[tuple[int, int, float]] = []  # (batch_idx, global_step, perf_counter)
        self._cpu: CpuSnapshot | None = None
        self.others_cores = float("nan")  # other processes' CPU over the training steps

    def on_train_start(self, trainer, pl_module) -> None:
        self._cpu = CpuSnapshot.take()  # after KBRefreshCallback's start-up: its actors are ready
        self.started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        self.marks.append((batch_idx, trainer.global_step, time.perf_counter()))
        if trainer.global_step == trainer.max_steps:  # before on_train_end kills the refresh actors
            self.others_cores = self._cpu.others_cores()

    def step_ms(self, warmup: int) -> list[tuple[int, float]]:
        """(global step, ms) per step; an epoch's first batch is left out (it includes the epoch change)."""
        pairs = zip(self.marks, self.marks[1:])
        return [(step, 1e3 * (t - t0)) for (_, _, t0), (i, step, t) in pairs if i > 0][warmup:]


@contextmanager
def extra_callbacks(*extra: pl.Callback) -> Iterator[None]:
    """finetune_rag.main() builds its own Trainer: for one call, add our callbacks to it (and drop the
    progress bar and model summary, which only add noise), without editing the repository."""

    class Trainer(pl.Trainer):
        def __init__(self, *args, callbacks: list | None = None, **kwargs):
            kwargs.update(enable_progress_bar=False, enable_model_summary=False)
            super().__init__(*args, callbacks=[*(callbacks or []), *extra], **kwargs)

    with mock.patch.object(finetune_rag.pl, "Trainer", Trainer):
        yield


@dataclass
class RunResult:
    name: str
    steps: list[tuple[int, float]]  # (global step, ms)
    module: finetune_rag.GenerativeQAModule
    refresh: KBRefreshCallback | None = None
    wall_s: float = 0.0
    others_cores: float = float("nan")  # CPU that other processes used during the steps, in cores
    loop_s: float = float("nan")  # the training loop: from on_train_start (the actors started) to the last step's end

    @property
    def passages_encoded(self) -> int:
        """The passages this run's refreshes re-encoded (the refresher's own count; 0 without one)."""
        return self.refresh.refresher.passages_encoded if self.refresh and self.refresh.refresher else 0

    def in_flight_steps(self) -> set[int]:
        """Steps whose interval overlaps a refresh: after its trigger, up to and including its swap."""
        history = self.refresh.history if self.refresh else []
        return {s for h in history for s in range(h["trigger_step"] + 1, h["swap_step"] + 1)}


def train_run(name: str, argv: list[str], warmup: int, *callbacks: pl.Callback) -> RunResult:
    """One `finetune_rag.main()` call with a StepTimer (and `callbacks`) attached; the retrieval actors are
    killed after."""
    timer = StepTimer()
    start = time.perf_counter()
    with extra_callbacks(timer, *callbacks):
        module = finetune_rag.main(finetune_rag.parse_args(argv))
    wall = time.perf_counter() - start
    for actor in module.retriever.actors:
        ray.kill(actor)
    refresh = next((c for c in module.trainer.callbacks if isinstance(c, KBRefreshCallback)), None)
    loop = timer.marks[-1][2] - timer.started if timer.marks else float("nan")
    return RunResult(name, timer.step_ms(warmup), module, refresh, wall, timer.others_cores, loop)


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


# ---------------------------------------------------------------------- retrieval


def encode_questions(module: finetune_rag.GenerativeQAModule, n: int) -> np.ndarray:
    """Question-encoder vectors for the first `n` training questions: realistic queries for the index."""
    questions = (DUMMY_DATA / "train.source").read_text(encoding="utf-8").splitlines()[:n]
    model = module.model  # rag_model.RagModel
    device = next(model.question_encoder.parameters()).device
    texts = [model.question_prefix + q for q in questions]  # as training tokenises them
    tokens = model.question_tokenizer(texts, return_tensors="pt", padding=True, truncation=True).to(device)
    with torch.no_grad():
        return model.encode_questions(tokens["input_ids"], tokens["attention_mask"]).float().cpu().numpy()


def bench_retrieval(module, kbs: list[KBVersion], n_queries: int, idle_s: float, swaps: int) -> dict[str, float]:
    """Retrieval latency from a thread that keeps calling `retrieve`, first alone, then while the main
    thread stages and activates `swaps` new versions (alternating between the paths in `kbs`)."""
    actors = start_retrieval_actors(1, module.hparams.hnsw_ef_search, f"bench-retrieval-{uuid.uuid4().hex[:6]}")
    retriever = RagRayDistributedRetriever(actors, rank=0)
    retriever.init_retrieval(kbs[0])
    queries, n_docs = encode_questions(module, n_queries), module.model.n_docs
    for _ in range(20):  # warm-up: first calls pay for the actor's lazy imports and caches
        retriever.retrieve(queries, n_docs)

    calls: list[tuple[float, float, int]] = []  # (start, end, version served)
    stop = threading.Event()

    def keep_retrieving() -> None:
        while not stop.is_set():
            t0 = time.perf_counter()
            retriever.retrieve(queries, n_docs)
            calls.append((t0, time.perf_counter(), retriever.last_version))

    cpu = CpuSnapshot.take()
    thread = threading.Thread(target=keep_retrieving, daemon=True)
    thread.start()
    time.sleep(idle_s)
    idle_end = time.perf_counter()
    windows, stage_ms, activate_ms = [], [], []
    for version in range(1, swaps + 1):
        time.sleep(0.2)  # retrieval alone between swaps
        kb = kbs[version % len(kbs)]
        t0 = time.perf_counter()
        new = dataclasses.replace(kb, version=version)  # the same passages and index, as a new version
        ray.get(retriever.stage(new))
        t1 = time.perf_counter()
        retriever.activate(new)
        t2 = time.perf_counter()
        windows.append((t0, t2))
        stage_ms.append(1e3 * (t1 - t0))
        activate_ms.append(1e3 * (t2 - t1))
    stop.set()
    thread.join()
    others = cpu.others_cores()
    for actor in actors:
        ray.kill(actor)

    local = RetrievalActor(module.hparams.hnsw_ef_search)  # the same search and passage lookup, without Ray
    local.ensure_live(kbs[0])
    local_ms = []
    for _ in range(max(20, len(calls))):
        t0 = time.perf_counter()
        local.retrieve(queries, n_docs)
        local_ms.append(1e3 * (time.perf_counter() - t0))
    idle = [1e3 * (e - s) for s, e, _ in calls if e <= idle_end]
    during = [1e3 * (e - s) for s, e, _ in calls if any(s < w1 and e > w0 for w0, w1 in windows)]
    versions = [v for _, _, v in calls]
    return {
        "n_docs": n_docs,
        "idle_calls": len(idle),
        "idle_median": pct(idle, 50),
        "idle_p95": pct(idle, 95),
        "local_median": pct(local_ms[5:], 50),
        "swap_calls": len(during),
        "swap_median": pct(during, 50),
        "swap_p95": pct(during, 95),
        "stage_median": pct(stage_ms, 50),
        "activate_median": pct(activate_ms, 50),
        "swap_total_median": pct([s + a for s, a in zip(stage_ms, activate_ms)], 50),
        "monotonic": all(a <= b for a, b in zip(versions, versions[1:])),
        "last_version": versions[-1] if versions else -1,
        "others_cores": others,
    }


# ---------------------------------------------------------------------- report


def print_header(args: argparse.Namespace) -> None:
    device = args.accelerator
    if args.accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        device = f"{args.accelerator} ({torch.cuda.get_device_name(0)})"
    print(f"# bench_refresh  {time.strftime('%Y-%m-%d %H:%M')}")
    print(
        f"machine: {platform.machine()} {platform.system()}, cpu_count={os.cpu_count()}, "
        f"usable cpus={len(os.sched_getaffinity(0))}, torch threads={torch.get_num_threads()}, device={device}, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print(
        f"versions: python {platform.python_version()}, torch {torch.__version__}, lightning {pl.__version__}, "
        f"ray {ray.__version__}, transformers {transformers.__version__}, faiss {faiss.__version__}, "
        f"datasets {datasets.__version__}"
    )


def report_training(
    args: argparse.Namespace, runs: dict[str, list[RunResult]], refreshing: dict[str, tuple[str, PolicySetting]]
) -> tuple[list[tuple[str, str]], list[dict]]:
    """Print each run and the refreshes; return the summary rows (the runs of a setting pooled) and one dict of
    figures for each setting of `refreshing` (name -> (its split, its policy))."""
    print(
        f"\n## 1. training steps (batch {args.train_batch_size}, {args.steps} steps a run, "
        f"refresh every {args.indexing_freq} steps unless the setting says otherwise)"
    )
    for run in [r for group in runs.values() for r in group]:
        ms = [m for _, m in run.steps]
        refreshes = ""
        if run.refresh:
            refreshes = f", {len(run.refresh.history)} refreshes, {run.passages_encoded} passages encoded"
        print(
            f"{run.name:>22}: median {pct(ms, 50):7.1f} ms  p95 {pct(ms, 95):7.1f} ms  (run {run.wall_s:.1f}s, "
            f"loop {run.loop_s:.1f}s, other processes {run.others_cores:.2f} cores{refreshes})"
        )
    base = [ms for run in runs["no-refresh"] for _, ms in run.steps]
    original_wall = pct([run.wall_s for run in runs["rag_original"]], 50)
    original_loop = pct([run.loop_s for run in runs["rag_original"]], 50)
    rows = [
        ("step median / p95, end2end without refresh (ms)", f"{pct(base, 50):.1f} / {pct(base, 95):.1f}"),
        ("wall time, rag_original (s, median)", f"{original_wall:.1f}"),
        ("training loop time, rag_original (s, median; the wall time less start-up)", f"{original_loop:.1f}"),
    ]
    encoded_a_run = {name: float(np.mean([run.passages_encoded for run in runs[name]])) for name in refreshing}
    full_of_split = {split: name for name, (split, policy) in refreshing.items() if policy.spec == "full"}
    table = []
    for name, (split, policy) in refreshing.items():
        group = runs[name]
        k = policy.indexing_freq(args.indexing_freq)
        steps = [ms for run in group for _, ms in run.steps]
        busy = [ms for run in group for step, ms in run.steps if step in run.in_flight_steps()]
        swaps = [ms for run in group for step, ms in run.steps if step in {h["swap_step"] for h in run.refresh.history}]
        history = [h for run in group for h in run.refresh.history]
        skipped = sum(run.refresh.refresher.skipped_triggers for run in group)
        failures = sum(run.refresh.refresher.failures for run in group)
        wall = pct([run.wall_s for run in group], 50)
        loop = pct([run.loop_s for run in group], 50)
        print(
            f"{name}: steps with a refresh in flight {len(busy)} of {len(steps)}, median {pct(busy, 50):.1f} ms; "
            f"refreshes {len(history)}, skipped triggers {skipped}, failures {failures}; trigger -> swap step: "
            + ", ".join(f"{h['trigger_step']}->{h['swap_step']} {h['reindex_seconds']:.1f}s" for h in history)
        )
        longest_swap = max(swaps, default=float("nan"))
        encoded = encoded_a_run[name]
        full = encoded_a_run.get(full_of_split.get(split, ""), float("nan"))
        figures = {
            "setting": name,
            "split": split,
            "policy": policy.spec,
            "indexing_freq": k,
            "argv": list(policy.argv(args.indexing_freq)),
            "refreshes_a_run": len(history) / len(group),
            "skipped_a_run": skipped / len(group),
            "failures": failures,
            "passages_encoded_a_run": encoded,
            "encoded_vs_full": encoded / full,
            "step_median_ms": pct(steps, 50),
            "step_p95_ms": pct(steps, 95),
            "ratio_median": pct(steps, 50) / pct(base, 50),
            "ratio_p95": pct(steps, 95) / pct(base, 95),
            "wall_vs_original": wall / original_wall,
            "loop_vs_original": loop / original_loop,
        }
        table.append(figures)
        rows += [
            (f"{name}: step median / p95, refresh every {k} (ms)", f"{pct(steps, 50):.1f} / {pct(steps, 95):.1f}"),
            (
                f"{name}: ratio to no refresh, median / p95",
                f"{pct(steps, 50) / pct(base, 50):.2f} / {pct(steps, 95) / pct(base, 95):.2f}",
            ),
            (f"{name}: step median while a refresh is in flight (ms)", f"{pct(busy, 50):.1f}"),
            (f"{name}: longest step at a swap / median step", f"{longest_swap / pct(steps, 50):.2f}"),
            (f"{name}: a swap adds (median swap step - median step, ms)", f"{pct(swaps, 50) - pct(steps, 50):.1f}"),
            (f"{name}: wall time / rag_original's (same steps)", f"{wall / original_wall:.2f}"),
            (f"{name}: refreshes / skipped triggers / failures", f"{len(history)} / {skipped} / {failures}"),
            (f"{name}: reindex_seconds, median", f"{pct([h['reindex_seconds'] for h in history], 50):.2f}"),
        ]
        rows.append((f"{name}: training loop time / rag_original's (no start-up)", f"{loop / original_loop:.2f}"))
        if policy.spec != "full":  # the rows of the default run stay as they were
            rows.append((f"{name}: passages encoded a run (÷ full's)", f"{encoded:.0f} ({encoded / full:.2f})"))
    return rows, table


def policy_table(table: list[dict]) -> str:
    """The refresh settings side by side, as Markdown."""
    lines = [
        "| setting | refresh every | refreshes / skipped a run | passages encoded a run (÷ full's) "
        "| step median / p95 (ms) | ÷ no refresh, median / p95 | wall ÷ rag_original | loop ÷ rag_original |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for f in table:
        lines.append(
            f"| {f['setting']} | {f['indexing_freq']} | {f['refreshes_a_run']:.1f} / {f['skipped_a_run']:.1f} "
            f"| {f['passages_encoded_a_run']:.0f} ({f['encoded_vs_full']:.2f}) "
            f"| {f['step_median_ms']:.1f} / {f['step_p95_ms']:.1f} | {f['ratio_median']:.2f} / {f['ratio_p95']:.2f} "
            f"| {f['wall_vs_original']:.2f} | {f['loop_vs_original']:.2f} |"
        )
    return "\n".join(lines)


def report_retrieval(r: dict, others: float, swapped: str) -> list[tuple[str, str]]:
    """Print the retrieval figures (`swapped`: which KB versions the swaps alternate); return the summary rows."""
    print(f"\n## 2. retrieval, 8 queries x {r['n_docs']} docs, one actor (other processes {others:.2f} cores)")
    print(f"swaps between {swapped}")
    print(f"alone:        {r['idle_calls']} calls, median {r['idle_median']:.2f} ms, p95 {r['idle_p95']:.2f} ms")
    print(
        f"in process:   median {r['local_median']:.2f} ms (RetrievalActor.retrieve called directly; Ray / in process "
        f"{r['idle_median'] / r['local_median']:.2f})"
    )
    print(f"during swaps: {r['swap_calls']} calls, median {r['swap_median']:.2f} ms, p95 {r['swap_p95']:.2f} ms")
    print(
        f"swap: stage median {r['stage_median']:.1f} ms + activate median {r['activate_median']:.2f} ms; "
        f"versions served in order: {r['monotonic']} (last v{r['last_version']})"
    )
    return [
        ("retrieve (8 queries) median / p95 (ms)", f"{r['idle_median']:.2f} / {r['idle_p95']:.2f}"),
        ("retrieve in process (the same call, no Ray), median (ms)", f"{r['local_median']:.2f}"),
        ("retrieve through Ray / in process, median", f"{r['idle_median'] / r['local_median']:.2f}"),
        ("retrieve during swaps median / p95 (ms)", f"{r['swap_median']:.2f} / {r['swap_p95']:.2f}"),
        ("swap: stage + activate, median (ms)", f"{r['stage_median']:.1f} + {r['activate_median']:.2f}"),
    ]


def main() -> None:
    args, passthrough = parse_args()
    transformers.utils.logging.disable_progress_bar()
    for name in ("pytorch_lightning", "lightning_fabric"):  # our summary lists the refreshes
        logging.getLogger(name).setLevel(logging.WARNING)
    # each output dir holds logs/; the baseline runs refresh nothing on purpose
    warnings.filterwarnings("ignore", ".*(exists and is not empty|LeafSpec|without --indexing_freq).*")
    print_header(args)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-refresh-"))
    start = time.perf_counter()
    models, passages, index = build_inputs(work, args.kb_copies, args.index_type)
    n_passages = len(datasets.load_from_disk(str(passages)))
    outputs = Path(tempfile.mkdtemp(prefix="runs-", dir=work))  # fresh each time: a reused --workdir holds earlier runs
    print(
        f"inputs: {n_passages} passages ({args.kb_copies} copies, {args.index_type}) in {work} "
        f"({time.perf_counter() - start:.1f}s)"
    )

    def argv(name: str, *extra: str) -> list[str]:
        return [
            *tiny_models.tiny_run_argv(models, (passages, index), DUMMY_DATA, outputs / name),
            "--accelerator",
            args.accelerator,
            "--devices",
            args.devices,
            "--train_batch_size",
            str(args.train_batch_size),
            "--index_type",
            args.index_type,
            "--max_steps",
            str(args.steps),
            "--max_epochs",
            "100000",
            "--num_sanity_val_steps",
            "0",
            "--check_val_every_n_epoch",
            "100000",  # no validation or checkpoints: training steps only
            "--do_train",
            "--training_mode",
            "rag_end2end",
            "--ray_namespace",
            f"bench-{name}-{uuid.uuid4().hex[:6]}",
            *extra,
            *passthrough,
        ]

    # Alternating the settings spreads any other load on the machine over all of them.
    settings, dirs, refreshing = plan_settings(args)
    runs: dict[str, list[RunResult]] = {name: [] for name in settings}
    for rep in range(args.repeats):
        for name, extra in settings.items():
            runs[name].append(train_run(f"{name}-{rep}", argv(f"{dirs[name]}-{rep}", *extra), args.warmup))
    rows, table = report_training(args, runs, refreshing)
    swapped = swap_setting(refreshing)
    refr = runs[swapped]

    refreshed = list_versions(Path(refr[-1].module.hparams.output_dir) / "kb")[-1:]  # swap v0 <-> newest
    r = bench_retrieval(
        refr[-1].module, [KBVersion(0, str(passages), str(index)), *refreshed], 8, args.retrieval_seconds, args.swaps
    )
    r_others = r["others_cores"]
    source = f"{swapped}-{args.repeats - 1}"
    versions = f"v0 and {source}'s newest KB version, v{refreshed[0].version}" if refreshed else f"v0 ({source}: none)"
    rows += report_retrieval(r, r_others, versions)
    every_run = [run for group in runs.values() for run in group]
    others = " / ".join(f"{run.others_cores:.2f}" for run in every_run)
    rows.append(("other processes' CPU: each training run / retrieval (cores)", f"{others} / {r_others:.2f}"))

    print(
        f"\n## summary ({n_passages} passages, {args.repeats} x {args.steps} steps a setting, {args.accelerator}, "
        f"total {time.perf_counter() - start:.0f}s)\n"
    )
    print("| metric | value |\n|---|---|")
    print("\n".join(f"| {name} | {value} |" for name, value in rows))
    print(f"\n## refresh settings side by side\n\n{policy_table(table)}")
    if args.json:
        result = {"bench": "refresh", "passages": n_passages, "rows": rows, "settings": table}
        Path(args.json).write_text(json.dumps(result, indent=1))
    busiest = max(run.others_cores for run in every_run)
    if busiest > 0.2:
        print(
            f"\nWARNING: other processes kept up to {busiest:.2f} cores busy during training: these step times "
            "measure the machine's other load as much as the refresh; run again on a quiet machine."
        )
    ray.shutdown()


if __name__ == "__main__":
    main()
