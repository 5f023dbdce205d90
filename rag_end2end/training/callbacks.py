"""Lightning callbacks: the asynchronous knowledge-base refresh, checkpointing, early stopping and
the run's files (metrics.json, test_results.txt, test_generations.txt)."""

from __future__ import annotations

import copy
import json
import os
import time
from collections import Counter
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint
from pytorch_lightning.utilities import rank_zero_info

from rag_end2end.files import atomic_write, atomic_write_text, remove_tree
from rag_end2end.kb.index import IndexConfig
from rag_end2end.kb.refresh import Refresher, RefreshState, rank_zero_wait_s
from rag_end2end.kb.refresh_policy import RefreshPolicy
from rag_end2end.kb.staleness import StalenessProbe
from rag_end2end.kb.versions import KB_VERSION_FILE, remove_unreachable_versions
from rag_end2end.model.lora import merged
from rag_end2end.model.settings import checkpoint_dir
from rag_end2end.options import DDP_TIMEOUT_S


class KBRefreshCallback(pl.Callback):
    """Drives a `kb_refresh.Refresher` from the training loop: every `indexing_freq` optimizer steps it
    hands the refresher the context encoder's weights, and polls it after every batch, so no training rank
    ever waits. Global rank 0 alone drives it; every rank shares the retrieval actors (no collective). At each
    refresh it starts, it measures how stale the live index has become (kb.staleness, `staleness_sample` passages
    drawn with `seed`; 0: not measured). `policy` says which passages each refresh re-encodes; for the hot set it
    records the rows the retriever returned for training questions (on rank 0) since the last refresh."""

    def __init__(
        self,
        kb_root: str,
        indexing_freq: int,
        index_config: IndexConfig,
        index_workers: int = 1,
        index_gpus: float = 0,
        encode_batch_size: int = 64,
        keep_versions: int = 3,
        refresh_before_validation: bool = False,
        max_failures: int = 3,
        index_cpus: int = 1,
        wait_timeout: float = rank_zero_wait_s(DDP_TIMEOUT_S),
        staleness_sample: int = 0,
        seed: int = 0,
        policy: RefreshPolicy | None = None,
    ):
        if indexing_freq < 1:
            raise ValueError(f"--indexing_freq must be >= 1, got {indexing_freq}")
        self.kb_root, self.indexing_freq, self.index_config = kb_root, indexing_freq, index_config
        self.refresher_options = {
            "index_workers": index_workers,
            "index_gpus": index_gpus,
            "index_cpus": index_cpus,
            "max_failures": max_failures,
            "encode_batch_size": encode_batch_size,
            "keep_versions": keep_versions,
            "wait_timeout": wait_timeout,
            "policy": policy,
        }
        self.policy = policy or RefreshPolicy()
        self.recorded: Counter = Counter()  # hot set: times each row was retrieved for training since the last refresh
        # The counts the refresh in flight was triggered with: dropped when it goes live, merged back into `recorded`
        # when it fails (and on resume: the checkpoint's refresh in flight never goes live), so no hot row is lost.
        self.pending: Counter = Counter()
        self._failures_at_trigger = 0
        # The longest rank 0 waits for a refresh (or the actors' start) while the other ranks sit in a barrier.
        self.wait_timeout = wait_timeout
        self.refresh_before_validation = refresh_before_validation
        self.refresher: Refresher | None = None
        self.staleness_sample, self.seed = staleness_sample, seed
        self.staleness: StalenessProbe | None = None
        self._last_trigger_step = 0
        self._restored: dict | None = None

    @property
    def history(self) -> list[dict]:
        return self.refresher.history if self.refresher else []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or not trainer.is_global_zero:
            return
        output_dir = pl_module.hparams.output_dir
        self.refresher = Refresher(
            pl_module.retriever,
            pl_module.base_passages_path,
            self.kb_root,
            merged(pl_module.model.ctx_encoder),
            pl_module.model.ctx_tokenizer,
            self.index_config,
            pinned=lambda: pinned_kb_versions(output_dir),
            **self.refresher_options,
        )
        if self.staleness_sample and pl_module.model.ctx_encoder is not None:
            gold = pl_module.gold["val"][1].passage_ids if "val" in pl_module.gold else None
            self.staleness = StalenessProbe(
                pl_module.base_passages_path,
                pl_module.model.ctx_tokenizer,
                self.staleness_sample,
                self.seed,
                gold,
                self.refresher_options["encode_batch_size"],
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning restores callback state after `setup` and before `on_fit_start`.
        if not (trainer.is_global_zero and self._restored):
            return
        # The module has already swapped to the checkpoint's KB version (GenerativeQAModule.on_load_checkpoint).
        self._last_trigger_step = self._restored["last_trigger_step"]
        self.refresher.history = self._restored["history"]
        self.recorded = restored_hot_counts(self._restored)
        rank_zero_info(f"KB refresh: resumed on v{pl_module.kb.version}")
        keep = pinned_kb_versions(pl_module.hparams.output_dir) | {r["version"] for r in self.refresher.history}
        for version in remove_unreachable_versions(self.kb_root, pl_module.kb.version, keep):
            rank_zero_info(f"KB refresh: removed v{version:04d}, which the stopped run built but no checkpoint reaches")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            self.refresher.wait_for_actors()
        if getattr(pl_module, "reencode_on_start", False):  # the resumed weights' KB version is gone: make it anew
            if trainer.is_global_zero:
                self._refresh_now(trainer, pl_module)
            pl_module.reencode_on_start = False
            trainer.strategy.barrier("kb_reencoded")  # no rank trains on the old version after this

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.is_global_zero and self.policy.name == "hot":  # the training questions' retrievals alone
            pl_module.retriever.recorder = self.recorded

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if trainer.is_global_zero:
            pl_module.retriever.recorder = None  # validation's and the refresh's own searches are not recorded
            record = self.refresher.poll(step)
            self._settle_pending()
            if record:
                pl_module.log("reindex_seconds", record["reindex_seconds"], rank_zero_only=True)
                total = self.refresher.passages_encoded
                encoded = {"passages_encoded": float(record["passages_encoded"]), "passages_encoded_total": total}
                pl_module.log_dict({k: float(v) for k, v in encoded.items()}, rank_zero_only=True)
                self._log_retrieval(trainer, pl_module)
            if step > 0 and step - self._last_trigger_step >= self.indexing_freq:
                self._last_trigger_step = step
                self._trigger(trainer, pl_module)
            restarts = self.refresher.actor_restarts + pl_module.retriever.actor_restarts
            pl_module.log_dict(
                {"refresh_failures": float(self.refresher.failures), "actor_restarts": float(restarts)},
                rank_zero_only=True,
            )
        pl_module.log("index_version", float(pl_module.kb.version), rank_zero_only=True)
        pl_module.log("index_staleness_steps", float(step - pl_module.kb.embedding_step), rank_zero_only=True)

    def _refresh_now(self, trainer, pl_module, timeout: float | None = None) -> None:
        """Re-encode the KB with the current weights and wait until it is live (rank 0), at most `timeout` s
        (wait_timeout): a TimeoutError naming the actors it still waits for, before the other ranks' barrier times
        out."""
        self._last_trigger_step = trainer.global_step
        # Training waits, so the encoders may take every core of this machine; the whole KB, whatever the policy.
        threads = max(1, (os.cpu_count() or 1) // len(self.refresher.encoders))
        self._trigger(trainer, pl_module, threads=threads, full=True)
        self._wait(trainer, pl_module, self.wait_timeout if timeout is None else timeout, must_finish=True)

    def _trigger(self, trainer, pl_module, threads: int | None = None, full: bool = False) -> None:
        encoder = merged(pl_module.model.ctx_encoder)  # the actors encode without peft
        if not self.refresher.trigger(encoder.state_dict(), trainer.global_step, threads, self.recorded, full):
            pl_module.log("reindex_skipped", float(self.refresher.skipped_triggers), rank_zero_only=True)
            return
        # The next hot set: what training retrieves from now on; these counts wait for the refresh's outcome.
        self.pending, self.recorded = self.recorded, Counter()
        self._failures_at_trigger = self.refresher.failures
        if self.staleness is not None:  # the live index at its stalest, against the vectors the refresh will write
            self._log_staleness(trainer, pl_module, encoder)

    @torch.no_grad()
    def _log_staleness(self, trainer, pl_module, encoder: torch.nn.Module) -> None:
        kb = pl_module.kb
        questions = None
        if "val" in pl_module.gold:
            questions = torch.cat(pl_module.model.question_vectors(pl_module.gold["val"][0])).float().cpu().numpy()
        metrics = self.staleness.measure(encoder, kb.passages_path, questions, kb.similarity)
        for lg in trainer.loggers:  # straight to the loggers, as _log_retrieval: also from on_validation_start
            lg.log_metrics(metrics, step=trainer.global_step)

    @staticmethod
    def _log_retrieval(trainer, pl_module) -> None:
        # Straight to the loggers: this also runs from on_train_end, where self.log is not allowed.
        metrics = pl_module.retrieval_metrics("val")
        for lg in trainer.loggers if metrics else []:
            lg.log_metrics(metrics, step=trainer.global_step)

    def _settle_pending(self) -> None:
        """Once the refresh in flight has ended: its hot counts dropped if it went live, merged back if it failed."""
        if self.refresher.state is not RefreshState.IDLE or not self.pending:
            return
        if self.refresher.failures > self._failures_at_trigger:
            self.recorded.update(self.pending)  # retried at the next trigger
        self.pending = Counter()

    def _wait(self, trainer, pl_module, timeout: float, must_finish: bool = False) -> None:
        before = len(self.refresher.history)
        try:
            self.refresher.wait_until_idle(trainer.global_step, timeout, must_finish)
        finally:
            self._settle_pending()
        if len(self.refresher.history) > before:
            self._log_retrieval(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            self._wait(trainer, pl_module, 300.0)
            self.refresher.close()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if trainer.is_global_zero and self.refresher is not None:
            self.refresher.close()

    def on_validation_start(self, trainer, pl_module) -> None:
        """With refresh_before_validation: validate (and so checkpoint and test) against an index re-encoded
        with the current weights. Training pauses for it; the asynchronous refreshes in between do not."""
        if not self.refresh_before_validation or trainer.sanity_checking or trainer.state.fn != "fit":
            return
        if trainer.is_global_zero:
            # One bound for both waits: the other ranks wait in the barrier below for all of it.
            deadline = time.monotonic() + self.wait_timeout
            self._wait(trainer, pl_module, self.wait_timeout, must_finish=True)
            if pl_module.kb.embedding_step < trainer.global_step:
                self._refresh_now(trainer, pl_module, max(0.0, deadline - time.monotonic()))
        trainer.strategy.barrier("kb_refreshed_for_validation")  # no rank validates against the old index

    def state_dict(self) -> dict:
        # (row, times retrieved): plain lists in the checkpoint; `pending`: the refresh in flight's.
        recorded, pending = sorted(self.recorded.items()), sorted(self.pending.items())
        state = {"last_trigger_step": self._last_trigger_step, "history": self.history, "recorded": recorded}
        return state | {"pending": pending}

    def load_state_dict(self, state_dict: dict) -> None:
        # Applied in `on_fit_start` only: `trainer.test(ckpt_path=...)` restores callback state too, and
        # testing must not rewind the refresh history or swap the index.
        self._restored = state_dict


def restored_hot_counts(state: dict) -> Counter:
    """The hot set's counts a resumed run starts from: those recorded since the last refresh plus those of the refresh
    that was in flight when the checkpoint was saved (it never goes live in the resumed run)."""
    counts = Counter(dict(state.get("recorded", [])))
    counts.update(dict(state.get("pending", [])))
    return counts


def pinned_kb_versions(output_dir: str | os.PathLike) -> set[int]:
    """KB versions that the checkpoints in `output_dir` were saved with: pruning never deletes them."""
    out = Path(output_dir)
    files = [*out.glob(f"*/{KB_VERSION_FILE}"), *out.glob(f"*.{KB_VERSION_FILE}")]
    return {json.loads(p.read_text())["version"] for p in files}


class RagCheckpoint(ModelCheckpoint):
    """Lightning's checkpointing, written to a temporary name and renamed (a crash never leaves a torn
    `.ckpt`), with `<name>.kb_version.json` beside each one (the KB version its weights were trained
    against, which pruning spares) and, with `export`, a RagModel `checkpoint<step>/` export that is
    removed when Lightning removes its `.ckpt`: exports stay as few as the checkpoints kept."""

    def __init__(self, *args, export: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.export = export
        self._written: dict[str, Path] = {}  # .ckpt path -> the export this callback wrote beside it

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        # Every rank takes part in the save and rank 0 writes and renames, so the temporary name is the same on
        # every rank (not a per-process temporary_sibling). A full disk names the file.
        tmp = f"{filepath}.tmp"
        with atomic_write(filepath, "checkpoint", temporary=tmp, rename=trainer.is_global_zero):
            trainer.save_checkpoint(tmp, self.save_weights_only)
        if trainer.is_global_zero:
            kb = getattr(trainer.lightning_module, "kb", None)
            if kb is not None:
                pin = kb.stored(Path(filepath).parent)
                atomic_write_text(kb_pin_path(filepath), json.dumps(pin, indent=1), "KB pin")
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(self)
        export = export_dir(filepath, trainer.global_step)
        if self.export and trainer.is_global_zero and not export.exists():  # an earlier run's is not ours
            trainer.lightning_module.save_hf_checkpoint(export)
            self._written[filepath] = export

    def check_monitor_top_k(self, trainer: pl.Trainer, current: torch.Tensor | None = None) -> bool:
        """Lightning's rule, but a tie with the k-th best goes to the later step: on a small validation set EM ties
        often (0.0 all through a short run), and the first checkpoint would otherwise stay "best" for good."""
        if current is None or self.save_top_k < 1 or len(self.best_k_models) < self.save_top_k:
            return super().check_monitor_top_k(trainer, current)
        at_least_as_good = {"min": torch.le, "max": torch.ge}[self.mode]
        better = at_least_as_good(current, self.best_k_models[self.kth_best_model_path])
        return trainer.strategy.reduce_boolean_decision(bool(better))

    def _remove_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        super()._remove_checkpoint(trainer, filepath)
        if trainer.is_global_zero:
            kb_pin_path(filepath).unlink(missing_ok=True)
        export = self._written.pop(filepath, None)
        kept = {checkpoint_step(p) for p in [*self.best_k_models, self.last_model_path] if p}
        # Only an export this callback wrote in this run (it holds kb_version.json) that no kept checkpoint shares.
        if export is not None and checkpoint_step(filepath) not in kept and (export / KB_VERSION_FILE).is_file():
            remove_tree(export)  # a reader of it (eval_rag.py --eval_all_checkpoints) never sees half of it


class LastCheckpoint(RagCheckpoint):
    """`last.ckpt` only: every N optimizer steps, at the end of training, and when training stops on an
    exception (Ctrl-C, a refresh that keeps failing), so a run resumes from where it stopped."""

    def __init__(self, dirpath: str, every_n_steps: int):
        # No version counter: a resumed (or copied) run replaces its last.ckpt (atomically) instead of writing a
        # last-v1.ckpt beside it that the next --resume would not pick.
        super().__init__(
            dirpath=dirpath,
            save_top_k=0,
            save_last=True,
            every_n_train_steps=every_n_steps,
            save_on_exception=True,
            export=False,
            enable_version_counter=False,
        )
        self._loader_at_step_end: list[dict] | None = None  # the training loader's position after the last step
        self._stepped = False  # a step finished in this run segment
        self._saving_inside_step = False

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._loader_at_step_end = None  # the last epoch's final position is not this epoch's

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        loader = trainer.fit_loop._combined_loader
        self._loader_at_step_end = copy.deepcopy(loader._state_dicts()) if loader is not None else None
        self._stepped = True

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if not self._should_save_on_exception(trainer):
            return
        progress = trainer.fit_loop.epoch_loop.batch_progress.current
        # Stopped inside a step: the loader has already yielded this batch (and prefetched the next), so its
        # position now would skip the batch on resume, end the epoch a step short and skip the epoch-end
        # validation. Save the position after the last finished step instead. No step finished in this run
        # segment: nothing was learned since the checkpoint it started from, so keep that one. (Stopped in an
        # epoch's first step, the batch is still lost: a rare case that saving keeps the earlier steps of.)
        inside_step = progress.ready > progress.processed
        if inside_step and not self._stepped:
            return
        self._saving_inside_step = inside_step and self._loader_at_step_end is not None
        try:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        finally:
            self._saving_inside_step = False
        self._save_final_weights(trainer)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        if self._saving_inside_step:
            checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"] = self._loader_at_step_end

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        self._save_final_weights(trainer)

    def _save_final_weights(self, trainer: pl.Trainer) -> None:
        """The weights training ended (or stopped) with, as a `checkpoint<step>/` export that eval_rag.py, the
        exporter and answering read: a run that ends before its first validation (or whose best is an earlier
        step) still leaves a usable model of what it trained. Never removed by the best-k pruning."""
        if trainer.is_global_zero and trainer.global_step > 0:
            trainer.lightning_module.save_hf_checkpoint(checkpoint_dir(self.dirpath, trainer.global_step))


def kb_pin_path(filepath: str) -> Path:
    """`<name>.kb_version.json` beside `<name>.ckpt`."""
    return Path(filepath).with_suffix(f".{KB_VERSION_FILE}")


def checkpoint_step(filepath: str) -> int | None:
    """The step in a `<metric>-<step>.ckpt` name (get_checkpoint_callback's pattern)."""
    tail = Path(filepath).stem.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else None


def export_dir(filepath: str, step: int) -> Path:
    """Where the RagModel export of the checkpoint at `filepath` (taken at `step`) goes."""
    return checkpoint_dir(Path(filepath).parent, step)


def get_checkpoint_callback(output_dir: str, metric: str = "em", save_top_k: int = 1) -> ModelCheckpoint:
    """Keep the best `save_top_k` checkpoints by `val_<metric>` (max for em/f1, min for loss), each with its
    RagModel export."""
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
    """Stop when `val_<metric>` has not improved for `patience` validations (a NaN one, retriever_only's that scored
    no question, counts as no improvement rather than stopping the run)."""
    return EarlyStopping(
        monitor=f"val_{metric}",
        mode="min" if "loss" in metric else "max",
        patience=patience,
        verbose=True,
        check_finite=False,
    )


class RunFilesCallback(pl.Callback):
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
