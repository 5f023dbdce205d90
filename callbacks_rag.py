"""Lightning callbacks: the asynchronous knowledge-base refresh, checkpointing, early stopping and
the run's files (metrics.json, test_results.txt, test_generations.txt)."""

from __future__ import annotations

import json
import os
import shutil
import time
from enum import Enum
from pathlib import Path

import pytorch_lightning as pl
import ray
import torch
from datasets import load_from_disk
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from ray.exceptions import RayActorError

from kb_encode_utils import (
    IndexConfig,
    KBBuilder,
    KBVersion,
    ShardEncoder,
    list_versions,
    prune_versions,
    shard_bounds,
)
from rag_encoders import encoder_factory

ACTOR_TASK_RETRIES = 2  # how often Ray re-runs an encoding or build task whose actor died


class RefreshState(str, Enum):
    IDLE = "idle"
    ENCODING = "encoding"  # encoding actors re-encode their shards, then a task builds the index
    SWAPPING = "swapping"  # retrieval actors load the new version beside the live one


class KBRefreshCallback(pl.Callback):
    """Re-encodes the knowledge base with the current context encoder every `indexing_freq` optimizer
    steps and swaps the new index in, without making any training rank wait.

    IDLE -> ENCODING (snapshot weights, encode shards, build vNNNN) -> SWAPPING (actors stage it)
    -> IDLE (actors activate it). Global rank 0 alone drives it; every rank shares the actors, so
    no collective is needed. Each state change is polled with `ray.wait(timeout=0)` at batch end.
    """

    def __init__(
        self,
        kb_root: str,
        indexing_freq: int,
        index_config: IndexConfig,
        index_workers: int = 1,
        index_gpus: int = 0,
        encode_batch_size: int = 64,
        keep_versions: int = 3,
        refresh_before_validation: bool = False,
        max_failures: int = 3,
    ):
        if indexing_freq < 1:
            raise ValueError(f"--indexing_freq must be >= 1, got {indexing_freq}")
        self.kb_root = kb_root
        self.indexing_freq = indexing_freq
        self.index_config = index_config
        self.index_workers = index_workers
        self.index_gpus = index_gpus
        self.encode_batch_size = encode_batch_size
        self.keep_versions = keep_versions
        self.refresh_before_validation = refresh_before_validation
        self.max_failures = max_failures
        self.state = RefreshState.IDLE
        self.encoders: list = []
        self.builder = None
        self._pending: list = []
        self._build_ref = None
        self._new_kb: KBVersion | None = None
        self._trigger_step = 0
        self._trigger_time = 0.0
        self._last_trigger_step = 0
        self._restored: dict | None = None
        # What happened, for logs and tests: one dict per completed refresh.
        self.history: list[dict] = []
        self.skipped_triggers = 0
        self.failures = 0
        self.consecutive_failures = 0
        self.actor_restarts = 0  # encoding actors and builder that died and were restarted by Ray
        self._pids: list[int | None] = []
        self.n_rows = 0

    # --------------------------------------------------------------- start-up

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or not trainer.is_global_zero:
            return
        versions = list_versions(self.kb_root)
        self._next_version = max([pl_module.kb.version] + [v.version for v in versions]) + 1
        base = pl_module.base_passages_path
        self.n_rows = n_rows = len(load_from_disk(base))
        ctx = pl_module.context_encoder
        # Ray restarts a dead encoder or builder (a fresh process, same constructor arguments) and runs the
        # task it was doing again there; a task that fails ACTOR_TASK_RETRIES more times fails the refresh.
        options = {"num_cpus": 0, "max_restarts": -1, "max_task_retries": ACTOR_TASK_RETRIES}
        if self.index_gpus > ray.cluster_resources().get("GPU", 0):
            rank_zero_warn(f"--index_gpus {self.index_gpus}: the Ray cluster has fewer GPUs; encoding on CPU")
            self.index_gpus = 0
        if self.index_gpus:
            options["num_gpus"] = self.index_gpus / self.index_workers
        remote_cls = ray.remote(ShardEncoder).options(**options)
        self.encoders = [
            remote_cls.remote(base, start, end, pl_module.context_tokenizer, encoder_factory(ctx), ctx.config)
            for start, end in shard_bounds(n_rows, self.index_workers)
        ]
        self.builder = ray.remote(KBBuilder).options(**{**options, "num_gpus": 0}).remote()
        rank_zero_info(f"KB refresh: {len(self.encoders)} encoding actor(s) over {n_rows} passages")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning restores callback state after `setup` and before `on_fit_start`.
        if not (trainer.is_global_zero and self._restored):
            return
        # The module has already swapped to the checkpoint's KB version (GenerativeQAModule.on_load_checkpoint).
        self._last_trigger_step = self._restored["last_trigger_step"]
        self.history = self._restored["history"]
        rank_zero_info(f"KB refresh: resumed on v{pl_module.kb.version}")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Actors start (imports, tokenising their shard) while the sanity check runs; waiting here once
        # keeps that start-up out of the first refresh's timings.
        if trainer.is_global_zero:
            self._pids = self._actor_pids()

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
        self.actor_restarts += sum(old is not None and new is not None and old != new
                                   for old, new in zip(self._pids, pids))  # fmt: skip
        self._pids = [new if new is not None else old for old, new in zip(self._pids, pids)]

    # --------------------------------------------------------------- the state machine

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if trainer.is_global_zero:
            done_before = len(self.history)
            self._poll(trainer, pl_module)
            if len(self.history) > done_before:
                pl_module.log("reindex_seconds", self.history[-1]["reindex_seconds"], rank_zero_only=True)
            if step > 0 and step - self._last_trigger_step >= self.indexing_freq:
                self._last_trigger_step = step
                self._trigger(trainer, pl_module)
            restarts = self.actor_restarts + pl_module.retriever.actor_restarts
            pl_module.log_dict({"refresh_failures": float(self.failures), "actor_restarts": float(restarts)},
                               rank_zero_only=True)  # fmt: skip
        pl_module.log("index_version", float(pl_module.kb.version), rank_zero_only=True)
        pl_module.log("index_staleness_steps", float(step - pl_module.kb.embedding_step), rank_zero_only=True)

    def _trigger(self, trainer, pl_module, threads: int | None = None) -> None:
        if self.state is not RefreshState.IDLE:
            self.skipped_triggers += 1
            rank_zero_info(f"KB refresh: trigger at step {trainer.global_step} skipped ({self.state.value})")
            pl_module.log("reindex_skipped", float(self.skipped_triggers), rank_zero_only=True)
            return
        # Snapshot on the trainer's thread: copies to CPU, so later optimizer steps cannot change it.
        state = {k: v.detach().to("cpu", copy=True) for k, v in pl_module.context_encoder.state_dict().items()}
        weights = ray.put(state)
        shards = [e.encode.remote(weights, self.encode_batch_size, threads) for e in self.encoders]
        self._build_ref = self.builder.build.remote(
            pl_module.base_passages_path,
            self.kb_root,
            self._next_version,
            trainer.global_step,
            self.index_config,
            pl_module.kb.similarity,
            *shards,
        )
        self._next_version += 1
        self._trigger_step, self._trigger_time = trainer.global_step, time.perf_counter()
        self.state = RefreshState.ENCODING
        rank_zero_info(f"KB refresh: started at step {trainer.global_step}")

    def _poll(self, trainer, pl_module) -> None:
        try:
            if self.state is RefreshState.ENCODING:
                done, _ = ray.wait([self._build_ref], timeout=0)
                if done:
                    self._new_kb = ray.get(self._build_ref)
                    self._pending = pl_module.retriever.stage(self._new_kb)
                    self.state = RefreshState.SWAPPING
            elif self.state is RefreshState.SWAPPING:
                done, _ = ray.wait(self._pending, num_returns=len(self._pending), timeout=0)
                if len(done) == len(self._pending):
                    for ref in self._pending:
                        try:
                            ray.get(ref)
                        except RayActorError:  # restarted empty: activate() loads the new version there
                            pass
                    self._finish_swap(trainer, pl_module)
        except Exception as err:  # one failed refresh must not kill hours of training; several in a row do
            self._failed(pl_module, err)

    def _failed(self, pl_module, err: Exception) -> None:
        self.failures += 1
        self.consecutive_failures += 1
        self.state = RefreshState.IDLE
        self._count_restarts()
        cause = getattr(err, "cause", None) or err  # the error inside an actor, without Ray's wrapper
        cause = f"{type(cause).__name__}: {cause}"
        if self.consecutive_failures >= self.max_failures:
            raise RuntimeError(
                f"KB refresh failed {self.consecutive_failures} times in a row; stopping rather than training on "
                f"an index that no longer moves (v{pl_module.kb.version}, --max_refresh_failures "
                f"{self.max_failures}). Last error: {cause}"
            ) from err
        rank_zero_warn(f"KB refresh failed ({self.failures} so far), keeping v{pl_module.kb.version}; retried at "
                       f"the next trigger: {cause}")  # fmt: skip

    def _finish_swap(self, trainer, pl_module) -> None:
        pl_module.retriever.activate(self._new_kb)
        pl_module.kb = self._new_kb
        seconds = time.perf_counter() - self._trigger_time
        record = {
            "version": self._new_kb.version,
            "trigger_step": self._trigger_step,
            "swap_step": trainer.global_step,
            "steps_during_refresh": trainer.global_step - self._trigger_step,
            "reindex_seconds": seconds,
        }
        self.history.append(record)
        self.state = RefreshState.IDLE
        self.consecutive_failures = 0
        self._count_restarts()
        created = {r["version"] for r in self.history}  # by this run, resumed parts included: nothing else
        pinned = pinned_kb_versions(pl_module.hparams.output_dir)
        prune_versions(self.kb_root, self.keep_versions, protect=pinned | {self._new_kb.version}, only=created)
        rank_zero_info(
            f"KB refresh: v{self._new_kb.version} live at step {trainer.global_step}: {self.n_rows:,} passages in "
            f"{seconds:.1f} s ({self.n_rows / seconds:.1f} passages/s), over steps {self._trigger_step}-"
            f"{trainer.global_step}"
        )
        # Straight to the loggers: this also runs from on_train_end, where self.log is not allowed.
        metrics = pl_module.retrieval_metrics("val")
        for lg in trainer.loggers if metrics else []:
            lg.log_metrics(metrics, step=trainer.global_step)

    def wait_until_idle(self, trainer, pl_module, timeout: float = 300.0) -> None:
        """Let an in-flight refresh finish and swap in, so no work is orphaned at the end of training."""
        deadline = time.monotonic() + timeout
        while self.state is not RefreshState.IDLE and time.monotonic() < deadline:
            self._poll(trainer, pl_module)
            time.sleep(0.05)
        if self.state is not RefreshState.IDLE:
            rank_zero_warn(f"KB refresh still {self.state.value} after {timeout:.0f}s; abandoned")

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            self.wait_until_idle(trainer, pl_module)
            for actor in [*self.encoders, self.builder]:
                ray.kill(actor)
            self.encoders, self.builder = [], None

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        for actor in [*self.encoders, self.builder] if trainer.is_global_zero and self.builder else []:
            ray.kill(actor)
        self.encoders, self.builder = [], None

    def on_validation_start(self, trainer, pl_module) -> None:
        """With refresh_before_validation: validate (and so checkpoint and test) against an index re-encoded
        with the current weights. Training pauses for it; the asynchronous refreshes in between do not."""
        if not self.refresh_before_validation or trainer.sanity_checking or trainer.state.fn != "fit":
            return
        if trainer.is_global_zero:
            self.wait_until_idle(trainer, pl_module, timeout=24 * 3600)
            if pl_module.kb.embedding_step < trainer.global_step:
                self._last_trigger_step = trainer.global_step
                # Training waits, so the encoders may take every core of this machine.
                self._trigger(trainer, pl_module, threads=max(1, (os.cpu_count() or 1) // len(self.encoders)))
                self.wait_until_idle(trainer, pl_module, timeout=24 * 3600)
        trainer.strategy.barrier("kb_refreshed_for_validation")  # no rank validates against the old index

    # --------------------------------------------------------------- checkpoint state

    def state_dict(self) -> dict:
        return {"last_trigger_step": self._last_trigger_step, "history": self.history}

    def load_state_dict(self, state_dict: dict) -> None:
        # Applied in `setup("fit")` only: `trainer.test(ckpt_path=...)` restores callback state too, and
        # testing must not rewind the refresh history or swap the index.
        self._restored = state_dict


def _process_id(actor) -> int:
    return os.getpid()


def pinned_kb_versions(output_dir: str | os.PathLike) -> set[int]:
    """KB versions that the checkpoints in `output_dir` were saved with: pruning never deletes them."""
    out = Path(output_dir)
    files = [*out.glob("*/kb_version.json"), *out.glob("*.kb_version.json")]
    return {json.loads(p.read_text())["version"] for p in files}


class RagCheckpoint(ModelCheckpoint):
    """Lightning's checkpointing, written to a temporary name and renamed (a crash never leaves a torn
    `.ckpt`), with `<name>.kb_version.json` beside each one (the KB version its weights were trained
    against, which pruning spares) and, with `export`, a transformers-format `checkpoint<step>/` that is
    removed when Lightning removes its `.ckpt`: exports stay as few as the checkpoints kept."""

    def __init__(self, *args, export: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.export = export
        self._written: dict[str, Path] = {}  # .ckpt path -> the export this callback wrote beside it

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        tmp = f"{filepath}.tmp"
        trainer.save_checkpoint(tmp, self.save_weights_only)  # every rank takes part; rank 0 writes
        if trainer.is_global_zero:
            os.replace(tmp, filepath)
            kb = getattr(trainer.lightning_module, "kb", None)
            if kb is not None:
                _write_atomically(kb_pin_path(filepath), json.dumps(vars(kb), indent=1))
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(self)
        export = export_dir(filepath, trainer.global_step)
        if self.export and trainer.is_global_zero and not export.exists():  # an earlier run's is not ours
            trainer.lightning_module.save_hf_checkpoint(export)
            self._written[filepath] = export

    def _remove_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        super()._remove_checkpoint(trainer, filepath)
        if trainer.is_global_zero:
            kb_pin_path(filepath).unlink(missing_ok=True)
        export = self._written.pop(filepath, None)
        kept = {checkpoint_step(p) for p in [*self.best_k_models, self.last_model_path] if p}
        # Only an export this callback wrote in this run (it holds kb_version.json) that no kept checkpoint shares.
        if export is not None and checkpoint_step(filepath) not in kept and (export / "kb_version.json").is_file():
            shutil.rmtree(export)


class LastCheckpoint(RagCheckpoint):
    """`last.ckpt` only: every N optimizer steps, at the end of training, and when training stops on an
    exception (Ctrl-C, a refresh that keeps failing), so a run resumes from where it stopped."""

    def __init__(self, dirpath: str, every_n_steps: int):
        super().__init__(dirpath=dirpath, save_top_k=0, save_last=True, every_n_train_steps=every_n_steps,
                         save_on_exception=True, export=False)  # fmt: skip

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self._should_save_on_exception(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def kb_pin_path(filepath: str) -> Path:
    """`<name>.kb_version.json` beside `<name>.ckpt`."""
    return Path(filepath).with_suffix(".kb_version.json")


def checkpoint_step(filepath: str) -> int | None:
    """The step in a `<metric>-<step>.ckpt` name (get_checkpoint_callback's pattern)."""
    tail = Path(filepath).stem.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else None


def export_dir(filepath: str, step: int) -> Path:
    """Where the transformers-format export of the checkpoint at `filepath` (taken at `step`) goes."""
    return Path(filepath).parent / f"checkpoint{step}"


def get_checkpoint_callback(output_dir: str, metric: str = "em", save_top_k: int = 1) -> ModelCheckpoint:
    """Keep the best `save_top_k` checkpoints by `val_<metric>` (max for em/f1, min for loss), each with its
    transformers-format export."""
    if metric not in {"em", "f1", "loss"}:
        raise NotImplementedError(f"checkpointing on {metric!r} is not supported (em, f1, loss)")
    return RagCheckpoint(
        dirpath=output_dir,
        filename=f"{{val_{metric}:.4f}}-{{step}}",
        monitor=f"val_{metric}",
        mode="min" if metric == "loss" else "max",
        save_top_k=save_top_k,
        auto_insert_metric_name=False,
    )


def get_last_checkpoint_callback(output_dir: str, every_n_steps: int) -> LastCheckpoint:
    """`last.ckpt` every `every_n_steps` optimizer steps and at the end of training: the point `--resume`
    continues from (optimizer, scheduler, step, KB version and refresh history included)."""
    return LastCheckpoint(output_dir, every_n_steps)


def get_early_stopping_callback(metric: str, patience: int) -> EarlyStopping:
    """Stop when `val_<metric>` has not improved for `patience` validations."""
    return EarlyStopping(
        monitor=f"val_{metric}", mode="min" if "loss" in metric else "max", patience=patience, verbose=True
    )


class Seq2SeqLoggingCallback(pl.Callback):
    """Parameter counts at start, metrics.json after each validation, test results and generations."""

    def on_train_start(self, trainer, pl_module) -> None:
        n_params = sum(p.numel() for p in pl_module.parameters())
        n_trainable = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
        pl_module.log_dict({"n_params": float(n_params), "grad_params": float(n_trainable)}, rank_zero_only=True)

    @staticmethod
    def _scalar_metrics(trainer) -> dict:
        return {k: v.item() if isinstance(v, torch.Tensor) else v for k, v in trainer.callback_metrics.items()}

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero or trainer.sanity_checking:
            return
        path = Path(pl_module.hparams.output_dir) / "metrics.json"
        history = json.loads(path.read_text()) if path.exists() else []
        history.append({"step": trainer.global_step, **self._scalar_metrics(trainer)})
        path.write_text(json.dumps(history, indent=1))

    def on_test_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        out = Path(pl_module.hparams.output_dir)
        metrics = self._scalar_metrics(trainer)
        (out / "test_results.txt").write_text("".join(f"{k}: {metrics[k]}\n" for k in sorted(metrics)))
        (out / "test_generations.txt").write_text("".join(p + "\n" for p in pl_module.test_predictions))
