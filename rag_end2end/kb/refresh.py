"""The asynchronous knowledge-base refresh: Ray actors re-encode the passages with a snapshot of the context
encoder, a builder writes the new version's FAISS index, and the retrieval actors swap it in.

    refresher = Refresher(retriever, passages_path, kb_root, ctx_encoder, ctx_tokenizer, index_config)
    refresher.trigger(ctx_encoder.state_dict(), step)   # returns at once (re-encodes what `policy` chooses)
    refresher.poll(step)                                # call often; a dict when a new version went live
    refresher.live_version                              # the KBVersion that retrieval serves now

IDLE -> ENCODING (encode shards, build vNNNN) -> SWAPPING (retrieval actors stage it) -> IDLE (activate).
Each state change is polled with `ray.wait(timeout=0)`: nothing here makes the caller wait.
"""

from __future__ import annotations

import os
import shutil
import time
from collections import Counter
from collections.abc import Callable
from enum import Enum
from pathlib import Path

import numpy as np
import ray
import torch
from datasets import load_from_disk
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from ray.exceptions import RayActorError

from rag_end2end.kb.encoding import ShardEncoder
from rag_end2end.kb.faiss_devices import faiss_actor_gpus
from rag_end2end.kb.index import IndexConfig
from rag_end2end.kb.parts import encoded_path, part_path
from rag_end2end.kb.passages import shard_bounds
from rag_end2end.kb.ray_start import actor_nodes, alive_nodes, spread_over_nodes
from rag_end2end.kb.refresh_policy import RefreshPolicy
from rag_end2end.kb.versions import KBBuilder, KBVersion, list_versions, prune_versions, staging_dir
from rag_end2end.model.encoders import encoder_factory
from rag_end2end.options import DDP_TIMEOUT_S

ACTOR_TASK_RETRIES = 2  # how often Ray re-runs an encoding or build task whose actor died
# Rank 0 waits for these actors (their start, a refresh that training waits for) while the other DDP ranks sit in
# a collective: each wait is bounded below --ddp_timeout, and says every PROGRESS_S what it is waiting for.
PROGRESS_S = 60.0


def rank_zero_wait_s(ddp_timeout: float) -> float:
    """How long rank 0 may wait for the Ray actors while the other ranks sit in a collective that times out after
    `ddp_timeout` s: a tenth (at most 5 minutes) less, so that rank 0's error naming the pending actor comes first,
    rather than the collective's timeout on every rank, which names none."""
    return ddp_timeout - min(300.0, ddp_timeout / 10)


def encoder_options(index_gpus: float, index_workers: int) -> dict:
    """Ray options of each encoding actor: `index_gpus` shared evenly among `index_workers` of them (none: CPU).
    Ray restarts a dead one (a fresh process, same constructor arguments) and runs the task it was doing again there;
    a task that fails ACTOR_TASK_RETRIES more times fails the refresh. Where each goes: `spread_over_nodes`."""
    options = {"num_cpus": 0, "max_restarts": -1, "max_task_retries": ACTOR_TASK_RETRIES}
    return {**options, "num_gpus": index_gpus / index_workers} if index_gpus else options


def demand(options: dict) -> str:
    """What an actor with Ray `options` asks of the cluster, for messages: "GPU 0.5", "no GPU"."""
    asked = {"GPU": options.get("num_gpus", 0), **options.get("resources", {})}
    return ", ".join(f"{name} {amount:g}" for name, amount in asked.items() if amount) or "no GPU"


def check_placeable(what: str, options: dict) -> None:
    """Refuse at once actors that no node of the Ray cluster can ever hold: Ray would keep them pending, silently,
    for ever (a ValueError naming `what` and the demand)."""
    asked = {"GPU": options.get("num_gpus", 0), "CPU": options.get("num_cpus", 1), **options.get("resources", {})}
    asked = {name: amount for name, amount in asked.items() if amount}
    nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
    if not any(all(node.get(name, 0) >= amount for name, amount in asked.items()) for node in nodes):
        largest = {name: max(node.get(name, 0) for node in nodes) for name in asked}
        raise ValueError(
            f"{what} ask {demand(options)} each, which no node of the Ray cluster has (the most on one node: "
            f"{', '.join(f'{name} {amount:g}' for name, amount in largest.items())})"
        )


def _free() -> str:
    """The Ray cluster's free resources (GPU and custom ones; CPU too on a cluster, where each actor asks a share of
    one: spread_over_nodes), for messages."""
    free, total = ray.available_resources(), ray.cluster_resources()
    names = [n for n in total if n not in ("CPU", "memory", "object_store_memory") and not n.startswith("node:")]
    names += ["CPU"] if alive_nodes() > 1 else []
    return ", ".join(f"{n} {free.get(n, 0):g} of {total[n]:g}" for n in sorted(names)) or "no GPU in the cluster"


def wait_for(refs: list, names: list[str], timeout_s: float, doing: str, progress_s: float | None = None) -> None:
    """Wait until every one of `refs` (the calls of the actors `names`, each named with its demand) is done, at most
    `timeout_s`, with a progress line every `progress_s` (PROGRESS_S) naming those still pending; then a
    TimeoutError naming them, what they were to do (`doing`) and the cluster's free resources. An actor Ray cannot
    place (its GPUs are taken) or that hangs so stops the run with its name, instead of holding it silently."""
    progress_s = progress_s or PROGRESS_S
    start, pending = time.monotonic(), list(refs)
    while pending:
        left = timeout_s - (time.monotonic() - start)
        if left <= 0:
            still = [name for ref, name in zip(refs, names) if ref in pending]
            raise TimeoutError(
                f"{', '.join(still)} did not {doing} in {timeout_s:.0f} s (free in the Ray cluster: {_free()}); "
                "if they only need longer, raise --ddp_timeout"
            )
        _, pending = ray.wait(pending, num_returns=len(pending), timeout=min(progress_s, left))
        if pending:
            still = [name for ref, name in zip(refs, names) if ref in pending]
            rank_zero_info(
                f"waiting {time.monotonic() - start:.0f} s (at most {timeout_s:.0f}) for {', '.join(still)}"
                f" to {doing}; free in the Ray cluster: {_free()}"
            )


class RefreshState(str, Enum):
    IDLE = "idle"
    ENCODING = "encoding"  # encoding actors re-encode their shards, then a task builds the index
    SWAPPING = "swapping"  # retrieval actors load the new version beside the live one


class Refresher:
    """Re-encodes the KB in Ray actors and swaps each new version into `retriever` (a
    RagRayDistributedRetriever). Failures are counted; `max_failures` in a row raise. `policy` says which passages
    each refresh re-encodes (all of them by default; kb.refresh_policy)."""

    def __init__(
        self,
        retriever,
        passages_path: str,
        kb_root: str,
        context_encoder: torch.nn.Module,
        context_tokenizer,
        index_config: IndexConfig,
        index_workers: int = 1,
        index_gpus: float = 0,
        index_cpus: int = 1,
        encode_batch_size: int = 64,
        keep_versions: int = 3,
        max_failures: int = 3,
        pinned: Callable[[], set[int]] = set,
        wait_timeout: float = rank_zero_wait_s(DDP_TIMEOUT_S),
        policy: RefreshPolicy | None = None,
    ):
        self.retriever = retriever
        self.policy = policy or RefreshPolicy()
        self.passages_path, self.kb_root = passages_path, kb_root
        self.index_config = index_config
        self.encode_batch_size, self.keep_versions, self.max_failures = encode_batch_size, keep_versions, max_failures
        self.pinned = pinned  # versions that checkpoints use: never pruned
        self.wait_timeout = wait_timeout  # the longest the caller waits for these actors (wait_for_actors, ...)
        self.state = RefreshState.IDLE
        self.history: list[dict] = []  # one dict per completed refresh
        self.skipped_triggers = self.failures = self.consecutive_failures = 0
        self.actor_restarts = 0  # encoding actors and builder that died and were restarted by Ray
        self._build_ref = None
        self._staging: Path | None = None  # the directory the refresh in flight writes its version to
        self._parts: list = []  # its encoding tasks (each returns the rows it wrote)
        self._part_names: list[str] = []  # the encoding actors running them, for messages
        self._encoding: dict = {}  # what the refresh in flight re-encodes, for its record: policy, passages_encoded
        self._abandoned: list[tuple[Path, list]] = []  # a failed refresh's directory, removed once its encoders end
        self._pending: list = []
        self._new_kb: KBVersion | None = None
        self._trigger_step, self._trigger_time = 0, 0.0
        self._next_version = max([self.live_version.version] + [v.version for v in list_versions(kb_root)]) + 1
        self.n_rows = len(load_from_disk(passages_path))
        self.policy.check_kb(self.n_rows, passages_path)  # finetune_rag.py refuses it before any work
        self.shards = shard_bounds(self.n_rows, index_workers)  # each encoding actor's rows [start, end)

        options = encoder_options(index_gpus, index_workers)
        *nodes, builder_node = spread_over_nodes(len(self.shards) + 1)  # on a cluster, dealt over its nodes
        check_placeable("--index_gpus: the encoding actors", options | nodes[0])  # what they ask, placement included
        # Each actor is told where to encode: on the GPU Ray gives it (Ray makes it the actor's only visible one, so
        # `cuda` is that GPU), or on CPU when it asked for none, whatever CUDA_VISIBLE_DEVICES it inherited (Ray
        # 2.60 leaves a SLURM-exported one in place for such actors, ray-project/ray#62492).
        device = "cuda" if options.get("num_gpus") else "cpu"
        remote_cls = ray.remote(ShardEncoder)
        make = encoder_factory(context_encoder)
        self.encoders = [
            remote_cls.options(**(options | node)).remote(
                passages_path, start, end, context_tokenizer, make, context_encoder.config, index_cpus, device
            )
            for node, (start, end) in zip(nodes, self.shards)
        ]
        # The builder trains IVF/PQ indexes on its GPU share when FAISS goes on GPU (--faiss_gpu), else none, as before.
        builder_gpus, _ = faiss_actor_gpus(index_config.faiss_gpu, index_gpus, len(retriever.actors) + 1)
        builder_options = {**options, "num_gpus": builder_gpus, **builder_node}
        self.builder = ray.remote(KBBuilder).options(**builder_options).remote(index_cpus)
        # Each actor by name and demand, for the bounded waits' messages (wait_for): the encoders, then the builder.
        self.actor_names = [f"encoding actor {i} ({demand(options)})" for i in range(len(self.encoders))]
        self.actor_names.append(f"the index builder ({demand({'num_gpus': builder_gpus})})")
        self._pids: list[int | None] = []
        rank_zero_info(f"KB refresh: {len(self.encoders)} encoding actor(s) over {self.n_rows} passages")

    @property
    def live_version(self) -> KBVersion:
        return self.retriever.live_kb

    @property
    def passages_encoded(self) -> int:
        """The passages the run's refreshes that went live re-encoded (resumed segments included: the history)."""
        return sum(r.get("passages_encoded", 0) for r in self.history)

    def wait_for_actors(self) -> None:
        """Actors start (imports, tokenising their shard) in the background; waiting once keeps that start-up
        out of the first refresh's timings, and records their process ids. At most `wait_timeout`: an actor Ray
        cannot place, or one that failed to start, stops the run here with its name."""
        actors = [*self.encoders, self.builder]
        refs = [a.__ray_call__.remote(_process_id) for a in actors]
        wait_for(refs, self.actor_names, self.wait_timeout, "start")
        for name, ref in zip(self.actor_names, refs):
            try:
                ray.get(ref)
            except RayActorError as err:  # its constructor raised: Ray does not restart it
                raise RuntimeError(f"KB refresh: {name} failed to start: {err}") from None
        self._pids = self._actor_pids()
        if alive_nodes() > 1:  # where Ray placed them: said once, for a run on a cluster
            rank_zero_info(
                f"Ray nodes: retrieval actors on {', '.join(actor_nodes(self.retriever.actors))}; encoding actors "
                f"and the index builder on {', '.join(actor_nodes(actors))}"
            )

    def pending_actors(self) -> list[str]:
        """The actors the refresh in flight still waits for: encoding actors, else the builder, else retrieval
        actors loading the new version."""
        if self.state is RefreshState.ENCODING:
            _, left = ray.wait(self._parts, num_returns=len(self._parts), timeout=0)
            encoding = [name for ref, name in zip(self._parts, self._part_names) if ref in left]
            return encoding or self.actor_names[-1:]
        if self.state is RefreshState.SWAPPING:
            _, left = ray.wait(self._pending, num_returns=len(self._pending), timeout=0)
            return [f"retrieval actor {i}" for i, ref in enumerate(self._pending) if ref in left]
        return []

    # --------------------------------------------------------------- the state machine

    def trigger(
        self,
        weights: dict[str, torch.Tensor],
        step: int,
        threads: int | None = None,
        recorded: Counter | None = None,
        full: bool = False,
    ) -> bool:
        """Start re-encoding with these context-encoder weights (copied now, so later optimizer steps cannot
        change them) the passages the policy chooses (`recorded`: how often each row was retrieved for training
        questions since the last refresh, for the hot set), or all of them if `full`; False if a refresh is still
        running."""
        if self.state is not RefreshState.IDLE:
            self.skipped_triggers += 1
            rank_zero_info(f"KB refresh: trigger at step {step} skipped ({self.state.value})")
            return False
        rows = None if full else self.policy.rows(self.n_rows, self.history, recorded, self.nearest_rows)
        snapshot = ray.put({k: v.detach().to("cpu", copy=True) for k, v in weights.items()})
        self._staging = staging_dir(self.kb_root, self._next_version)
        common = (self.kb_root, self._next_version, step, self.index_config, self.live_version.similarity)
        if rows is None:
            # Each encoding actor writes its rows with their new vectors into the version's directory, and the
            # builder indexes those files a batch at a time: no process ever holds every vector
            # (bench/bench_memory.py).
            n = len(self.encoders)
            self._parts = [
                e.encode_to.remote(snapshot, str(part_path(self._staging, i, n)), self.encode_batch_size, threads)
                for i, e in enumerate(self.encoders)
            ]
            self._part_names = self.actor_names[:n]
            self._build_ref = self.builder.publish.remote(*common, str(self._staging), *self._parts, threads=threads)
        else:
            # A partial refresh: each encoding actor encodes the chosen rows of its shard into a .npy file, and the
            # builder writes the new version from the live one with those rows' vectors replaced.
            files, self._parts, self._part_names = [], [], []
            for i, (encoder, (start, end)) in enumerate(zip(self.encoders, self.shards)):
                mine = rows[(rows >= start) & (rows < end)]
                if len(mine):
                    files.append(str(encoded_path(self._staging, i)))
                    self._parts.append(
                        encoder.encode_rows_to.remote(snapshot, mine, files[-1], self.encode_batch_size, threads)
                    )
                    self._part_names.append(self.actor_names[i])
            previous = self.live_version  # the version whose other vectors the new one keeps
            extra = (previous, rows, self.policy.slices, files)
            self._build_ref = self.builder.publish.remote(
                *common, str(self._staging), *extra, *self._parts, threads=threads, partial=True
            )
        self._encoding = {
            "policy": "full" if rows is None else self.policy.name,
            "passages_encoded": self.n_rows if rows is None else len(rows),
        }
        self._next_version += 1
        self._trigger_step, self._trigger_time = step, time.perf_counter()
        self.state = RefreshState.ENCODING
        rank_zero_info(
            f"KB refresh: started at step {step} ({self._encoding['policy']}: "
            f"{self._encoding['passages_encoded']:,} of {self.n_rows:,} passages)"
        )
        return True

    def nearest_rows(self, rows: np.ndarray, k: int) -> np.ndarray:
        """(len(rows), k) ids: the `k` nearest passages of each of `rows` in the live index (the retrieval actors'
        search, the KB's similarity), searched with the rows' vectors as the live version stores them (gathered from
        its memory-mapped passages: only those rows are read). The hot policy's neighbours; not recorded as
        retrieved for training."""
        stored = load_from_disk(self.live_version.passages_path).with_format("numpy", columns=["embeddings"])
        queries = np.asarray(stored[rows.tolist()]["embeddings"], dtype=np.float32)
        return self.retriever.search(queries, k, embeddings=False).ids

    def poll(self, step: int) -> dict | None:
        """Advance the state machine without waiting; the refresh's record when its version just went live."""
        self._remove_abandoned()
        try:
            if self.state is RefreshState.ENCODING:
                if ray.wait([self._build_ref], timeout=0)[0]:
                    self._new_kb = ray.get(self._build_ref)
                    self._pending = self.retriever.stage(self._new_kb)
                    self.state = RefreshState.SWAPPING
            elif self.state is RefreshState.SWAPPING:
                done, _ = ray.wait(self._pending, num_returns=len(self._pending), timeout=0)
                if len(done) == len(self._pending):
                    for ref in self._pending:
                        try:
                            ray.get(ref)
                        except RayActorError:  # restarted empty: activate() loads the new version there
                            pass
                    return self._finish_swap(step)
        except Exception as err:  # one failed refresh must not kill hours of training; several in a row do
            self._failed(err)
        return None

    def _failed(self, err: Exception) -> None:
        self._abandoned.append((self._staging, self._parts))
        self.failures += 1
        self.consecutive_failures += 1
        self.state = RefreshState.IDLE
        self._count_restarts()
        cause = getattr(err, "cause", None) or err  # the error inside an actor, without Ray's wrapper
        cause = f"{type(cause).__name__}: {cause}"
        live = self.live_version.version
        if self.consecutive_failures >= self.max_failures:
            raise RuntimeError(
                f"KB refresh failed {self.consecutive_failures} times in a row; stopping rather than training on "
                f"an index that no longer moves (v{live}, --max_refresh_failures {self.max_failures}). "
                f"Last error: {cause}"
            ) from err
        rank_zero_warn(
            f"KB refresh failed ({self.failures} so far), keeping v{live}; retried at the next trigger: {cause}"
        )

    def _remove_abandoned(self, wait: bool = False) -> None:
        """Remove failed refreshes' temporary directories (parts some encoders wrote for a version never published),
        each once all its encoding tasks have ended: one still running would write its part again."""
        for staging, parts in list(self._abandoned):
            if wait or len(ray.wait(parts, num_returns=len(parts), timeout=0)[0]) == len(parts):
                shutil.rmtree(staging, ignore_errors=True)  # this refresh's own `.tmp-` directory
                self._abandoned.remove((staging, parts))

    def _finish_swap(self, step: int) -> dict:
        self.retriever.activate(self._new_kb)
        seconds = time.perf_counter() - self._trigger_time
        record = {
            "version": self._new_kb.version,
            "trigger_step": self._trigger_step,
            "swap_step": step,
            "steps_during_refresh": step - self._trigger_step,
            "reindex_seconds": seconds,
            **self._encoding,
        }
        self.history.append(record)
        self.state = RefreshState.IDLE
        self.consecutive_failures = 0
        self._count_restarts()
        created = {r["version"] for r in self.history}  # by this run, resumed parts included: nothing else
        prune_versions(self.kb_root, self.keep_versions, protect=self.pinned() | {self._new_kb.version}, only=created)
        rank_zero_info(
            f"KB refresh: v{self._new_kb.version} live at step {step}: {record['passages_encoded']:,} passages "
            f"encoded in {seconds:.1f} s ({record['passages_encoded'] / seconds:.1f} passages/s), over steps "
            f"{self._trigger_step}-{step}"
        )
        return record

    def wait_until_idle(self, step: int, timeout: float = 300.0, must_finish: bool = False) -> None:
        """Let an in-flight refresh finish and swap in, so no work is orphaned, saying every PROGRESS_S what it
        waits for. Still running after `timeout`: abandoned with a warning, or, if `must_finish` (training waits
        for that version), a TimeoutError naming the actors it waits for."""
        start = said = time.monotonic()
        while self.state is not RefreshState.IDLE and time.monotonic() - start < timeout:
            self.poll(step)
            time.sleep(0.05)
            if self.state is not RefreshState.IDLE and time.monotonic() - said >= PROGRESS_S:
                said = time.monotonic()
                rank_zero_info(
                    f"KB refresh: {self.state.value} for {said - start:.0f} s (at most {timeout:.0f}), "
                    f"waiting for {', '.join(self.pending_actors())}"
                )
        if self.state is RefreshState.IDLE:
            return
        pending = ", ".join(self.pending_actors())
        stuck = f"KB refresh still {self.state.value} after {timeout:.0f} s, waiting for {pending}"
        if must_finish:
            raise TimeoutError(
                f"{stuck} (free in the Ray cluster: {_free()}); if it only needs longer, raise --ddp_timeout"
            )
        rank_zero_warn(f"{stuck}; abandoned")

    def close(self) -> None:
        for actor in [*self.encoders, self.builder] if self.builder is not None else []:
            ray.kill(actor)
        self.encoders, self.builder = [], None
        self._remove_abandoned(wait=True)  # their encoders are gone: nothing writes there any more

    # --------------------------------------------------------------- actor restarts

    def _actor_pids(self, timeout: float | None = None) -> list[int | None]:
        """Each actor's process id (None if it does not answer in time): a new one means Ray restarted it."""
        refs = [a.__ray_call__.remote(_process_id) for a in [*self.encoders, self.builder]]
        ray.wait(refs, num_returns=len(refs), timeout=timeout)
        pids = []
        for ref in refs:
            try:
                pids.append(ray.get(ref, timeout=0))
            except Exception:  # still restarting, or gone: looked at again after the next refresh
                pids.append(None)
        return pids

    def _count_restarts(self) -> None:
        pids = self._actor_pids(timeout=30)
        self.actor_restarts += sum(
            old is not None and new is not None and old != new for old, new in zip(self._pids, pids)
        )
        self._pids = [new if new is not None else old for old, new in zip(self._pids, pids)]


def _process_id(actor) -> int:
    return os.getpid()
