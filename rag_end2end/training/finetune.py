"""Fine-tune RAG end to end: question encoder, context encoder and generator learn together while
Ray actors re-encode the knowledge base and rebuild its FAISS index in the background.

    python finetune_rag.py --training_mode rag_end2end --indexing_freq 500 --model_name_or_path \
        facebook/rag-token-base --model_type rag_token --passages_path KB/my_knowledge_dataset \
        --index_path KB/my_knowledge_dataset_hnsw_index.faiss --data_dir DATA --output_dir OUT --do_train

This file is the LightningModule (the step under a recipe, validation, test, optimizer, saves) and the run
(Ray, callbacks, Trainer). The flags live in rag_options.py, the model's assembly in rag_assembly.py, the
recipes in training_modes.py, the output directory's handling in run_dir.py.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from pathlib import Path

import pytorch_lightning as pl
import ray
import torch
from datasets import load_from_disk
from pytorch_lightning.callbacks import LearningRateMonitor
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from torch.utils.data import DataLoader, DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader
from transformers import get_scheduler
from transformers.optimization import Adafactor

from rag_end2end.data.mixing import MixedBatchSampler, MixedDataset, draw_masks, read_reconstruction
from rag_end2end.data.qa_dataset import QA, RECONSTRUCTION, QuestionDataset
from rag_end2end.data.readers import read_gold, read_lines, refusing, run_main
from rag_end2end.evaluation.metrics import (
    exact_match_score,
    f1_score,
    metric_max_over_ground_truths,
    mrr_at_k,
    recall_at_k,
    rouge_l_score,
    sentence_bleu,
)
from rag_end2end.files import atomic_write, remove_orphaned_temporaries
from rag_end2end.kb.actors import start_retrieval_actors, start_shard_actors
from rag_end2end.kb.index import IndexConfig
from rag_end2end.kb.ray_start import init_ray, spread_over_nodes, visible_gpu_ids
from rag_end2end.kb.refresh import check_placeable, encoder_options, rank_zero_wait_s, wait_for
from rag_end2end.kb.refresh_policy import RefreshPolicy
from rag_end2end.kb.retriever import RagRayDistributedRetriever, ShardedRetriever
from rag_end2end.kb.versions import KB_VERSION_FILE, KBVersion
from rag_end2end.model.assembly import assemble
from rag_end2end.model.encoders import encoder_similarity
from rag_end2end.options import GENERATION_METRICS, SCHEDULERS
from rag_end2end.recipes import for_generator, make_objective, mask_positives, masked_retrieval, mine
from rag_end2end.training.arguments import check_data_dir, gpu_plan, parse_args, trainer_kwargs
from rag_end2end.training.callbacks import (
    KBRefreshCallback,
    RunFilesCallback,
    get_checkpoint_callback,
    get_early_stopping_callback,
    get_last_checkpoint_callback,
)
from rag_end2end.training.plots import plot_runs
from rag_end2end.training.run_dir import (
    is_first_process,
    lock_output_dir,
    prepare_output_dir,
    release_lock,
    run_fingerprints,
)

# Epoch-level metrics here are already gathered across ranks (all_gather_object) before they are logged.
warnings.filterwarnings("ignore", ".*sync_dist=True.*")
warnings.filterwarnings("ignore", ".*'set_vital' is deprecated.*")  # torchdata's StatefulDataLoader, every epoch

# Per-example scores averaged over an epoch: EM, F1 and ROUGE-L in [0, 1], sentence BLEU in [0, 100].
METRIC_FNS = {"em": exact_match_score, "f1": f1_score, "rouge_l": rouge_l_score, "bleu": sentence_bleu}


def local_rank_from_env() -> int:
    """The rank before the Trainer exists: Lightning's launcher sets LOCAL_RANK in its child processes."""
    return int(os.environ.get("LOCAL_RANK", 0))


class GenerativeQAModule(pl.LightningModule):
    """RAG for generative QA under one training recipe (`--training_mode`): the step, validation and test.

    The retriever comes from outside (Ray actors from `build_module`, or any in-process search in tests), so
    the module itself never starts Ray; the KB refresh (callbacks_rag.KBRefreshCallback) only swaps what that
    retriever serves, which the module reads as `self.kb`."""

    def __init__(self, hparams: argparse.Namespace, retriever):
        super().__init__()
        self.save_hyperparameters(hparams)
        hp = self.hparams
        self.objective = make_objective(hp)
        self.retriever = retriever
        self.base_passages_path = hp.passages_path  # the passages every refresh re-encodes
        self.model = assemble(hp, self.objective, retriever)
        self.similarity = encoder_similarity(self.model.question_encoder)
        retriever.init_retrieval(
            KBVersion(0, hp.passages_path, hp.index_path, embedding_step=0, similarity=self.similarity)
        )

        self.target_lens = {
            "train": hp.max_target_length,
            "val": hp.val_max_target_length,
            "test": hp.test_max_target_length,
        }
        self.n_obs = {"train": hp.n_train, "val": hp.n_val, "test": hp.n_test}
        # Optional gold passages ({split}.gold.jsonl, written by the converters): retrieval metrics, and the
        # positives of the contrastive recipes.
        self.gold = {
            split: (read_lines(Path(hp.data_dir) / f"{split}.source"), read_gold(str(path), "jsonl"))
            for split in ("train", "val", "test")
            if (path := Path(hp.data_dir) / f"{split}.gold.jsonl").exists()
        }
        self.passages = load_from_disk(hp.passages_path) if self.objective.needs_positives else None
        # Statement reconstruction: the training statements' gold passages and masks (checked by parse_args).
        self.reconstruction = read_reconstruction(hp.reconstruction_dir) if hp.reconstruction_dir else None
        self._eval_rows: list[tuple[int, list[float]]] = []  # (line, [metrics..., loss, seconds]) on this rank
        self._unscored = [0, 0]  # retriever_only: held-out questions of this epoch without a positive, a negative
        self._test_rows: list[tuple[int, str]] = []  # (line of test.source, generated answer) on this rank
        self.test_predictions: list[str] = []  # every rank's answers, in test.source order
        self.reencode_on_start = False  # a resumed checkpoint's KB version was lost (--reencode_lost_kb)
        self.earlier_train_seconds, self._fit_started = 0.0, None  # training time of the segments before a resume
        self._fingerprints: dict[str, str] | None = None

    @property
    def kb(self) -> KBVersion:
        """The KB version retrieval serves now (the refresh swaps it; a resumed run restores it)."""
        return self.retriever.live_kb

    @property
    def context_encoder(self) -> torch.nn.Module | None:
        return self.model.ctx_encoder

    # ------------------------------------------------------------------ training

    def _mined(self, batch: dict, split: str, masks: list | None = None):
        """Positives and hard negatives for the contrastive recipes (with `masks` applied to the positives: a training
        statement's positive is its own passage without it, the Inverse Cloze Task); None for the others."""
        if not self.objective.needs_positives:
            return None
        if split == "train" and batch.get("kind") == RECONSTRUCTION:
            gold = self.reconstruction.passage_ids
        else:
            gold = self.gold[split][1].passage_ids if split in self.gold else None
        gold = [gold[int(i)] for i in batch["index"]] if gold is not None else None
        mined = mine(self.model, batch, self.passages, gold, self.hparams.hard_negatives)
        return mask_positives(mined, masks) if masks else mined

    def _masks(self, batch: dict) -> list | None:
        """This step's masks of a statement batch (each kept with --mask_probability); None for QA pairs."""
        if batch.get("kind") != RECONSTRUCTION:
            return None
        hp = self.hparams
        return draw_masks(batch["masks"], batch["index"].tolist(), hp.mask_probability, hp.seed, self.global_step)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        masks = self._masks(batch)
        # A statement batch: each statement cut out of its own passage in everything this step retrieves or mines,
        # and the generator's question the marker alone; training batches only (validation and test read as ever).
        with masked_retrieval(self.model, masks):
            batch = for_generator(batch)
            loss, logs = self.objective.loss(self.model, batch, self._mined(batch, "train", masks))
        n = len(batch["source_text"])
        self.log("loss", loss, prog_bar=True, batch_size=n)
        if self.hparams.reconstruction_dir:
            self._log_kind_loss(batch.get("kind", QA), loss, n)
        self.log_dict({f"train_{k}": v for k, v in logs.items()}, batch_size=n)
        if self.hparams.learn_temperature:
            self.log("retrieval_temperature", self.model.question_encoder.temperature_value, batch_size=n)
        return loss

    def _log_kind_loss(self, kind: str, loss: torch.Tensor, n: int) -> None:
        """train_loss_qa or train_loss_recon beside `loss`, at the steps of that kind's batches only. Lightning keeps
        each step value it was given and logs it again at every later logging step until it is given a new one,
        which would show a QA loss of steps ago at a statement batch's step: the other kind's is dropped (its
        entry in Lightning's step results, an internal that the mixed run of tests/test_reconstruction_training.py
        pins)."""
        self.log(f"train_loss_{kind}", loss, batch_size=n)
        results = self._trainer._results if self._trainer is not None else None
        for other in (QA, RECONSTRUCTION):
            if other != kind and results is not None and (key := f"training_step.train_loss_{other}") in results:
                results[key].reset()

    def gold_answers(self, split: str, batch: dict) -> list[list[str]]:
        """Every gold answer of each question of a batch: its .target line, and the others {split}.gold.jsonl
        lists. EM/F1 take the best of them, as SQuAD and eval_rag.py do."""
        listed = self.gold[split][1].answers if split in self.gold else None
        return [
            list(dict.fromkeys([target, *(listed[int(i)] if listed else [])]))
            for target, i in zip(batch["target_text"], batch["index"])
        ]

    def _generative_step(self, batch: dict, split: str) -> None:
        start = time.perf_counter()
        batch = for_generator(batch)  # held-out statements (--data_dir the --reconstruction_dir): not in the prompt
        questions, n = batch["source_text"], len(batch["source_text"])
        scores = {name: [0.0] * n for name in GENERATION_METRICS}
        preds = []
        if self.model.generator is None:  # retriever_only: its own loss on the held-out questions it can score
            mined = self._mined(batch, split)
            losses = self.objective.question_losses(self.model, batch, mined)
            unscored = [i for i, loss in enumerate(losses) if loss is None]
            no_positive = sum(mined.positive[i] is None for i in unscored)
            self._unscored[0] += no_positive
            self._unscored[1] += len(unscored) - no_positive
            losses = [float("nan") if loss is None else loss for loss in losses]  # left out of the mean
        else:
            preds = self.model.generate(
                batch["input_ids"], batch["attention_mask"], questions, self.target_lens[split], self.hparams.num_beams
            )
            golds = self.gold_answers(split, batch)
            for name in self.hparams.metrics:
                scores[name] = [metric_max_over_ground_truths(METRIC_FNS[name], p, g) for p, g in zip(preds, golds)]
            # The plain RAG NLL (no label smoothing), whatever the recipe, so that modes compare; a forward pass as
            # long as generating, so --no_test_loss skips it.
            if split == "test" and self.hparams.no_test_loss:
                losses = [float("nan")] * n
            else:
                losses = self.model(batch["input_ids"], batch["attention_mask"], questions, batch["target_text"])[0]
                losses = losses.tolist()
        seconds = (time.perf_counter() - start) / n
        for i, row in enumerate(zip(*scores.values(), losses)):
            self._eval_rows.append((int(batch["index"][i]), [*map(float, row), seconds]))
        if split == "test":  # one answer a line
            self._test_rows.extend((int(i), " ".join(p.split())) for i, p in zip(batch["index"], preds))

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._generative_step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._generative_step(batch, "test")

    def _eval_epoch_end(self, prefix: str) -> None:
        # Every rank's per-question rows, each question once: DistributedSampler pads the ranks' shards to one
        # length with repeated questions, which a plain sum over ranks would count twice.
        shards = every_rank(self._eval_rows)
        means = per_question_means(shards)
        self._eval_rows = []
        (no_positive, no_negative), self._unscored = self._unscored, [0, 0]
        if means is None:
            return
        *means, loss, seconds = means
        metrics = {f"{prefix}_gen_time": seconds}
        if self.model.generator is None:  # retriever_only: NaN (ranked last by the checkpoint) when none was scored
            losses = [values[-2] for values in dict(row for shard in shards for row in shard).values()]
            metrics[f"{prefix}_loss"] = loss
            metrics[f"{prefix}_scored"] = sum(x == x for x in losses) / len(losses)
            if no_positive or no_negative:  # this rank's count
                warnings.warn(
                    f"{prefix}: {no_positive + no_negative} question(s) could not be scored and are left out of "
                    f"{prefix}_loss ({prefix}_scored: the share scored): {no_positive} without a positive passage "
                    f"(no gold id, and no answer in the passages retrieved), {no_negative} with no negative in their "
                    "batch (every candidate passage was their own positive); hold out questions on more passages "
                    "(prepare_*.py --val_fraction), raise --eval_batch_size or pass --hard_negatives",
                    stacklevel=2,
                )
        else:
            metrics |= {
                f"{prefix}_{name}": value
                for name, value in zip(GENERATION_METRICS, means)
                if name in self.hparams.metrics
            }
        if loss == loss:  # not NaN: the loss was computed
            metrics[f"{prefix}_loss"] = loss
        self.log_dict(metrics, prog_bar=True)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")
        if self.trainer.is_global_zero and not self.trainer.sanity_checking:
            self.log_dict(self.retrieval_metrics("val"), rank_zero_only=True)

    @torch.no_grad()
    def retrieval_metrics(self, split: str = "val", ks: tuple[int, ...] = (1, 5, 10, 20)) -> dict[str, float]:
        """Recall@k and MRR@k of the gold passages against the live index; {} without gold data.
        Logged at every validation and after every refresh, to show whether the retriever moved."""
        if split not in self.gold:
            return {}
        questions, gold = self.gold[split]
        retrieved, _ = self.model.top_passages(questions, max(ks))
        metrics = {**recall_at_k(retrieved, gold.passage_ids, ks), **mrr_at_k(retrieved, gold.passage_ids, ks)}
        return {f"{split}_{name}": float(value) for name, value in metrics.items() if name != "n"}

    def on_test_epoch_start(self) -> None:
        self._test_rows, self.test_predictions = [], []

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")
        self.test_predictions = in_line_order(every_rank(self._test_rows))
        if self.trainer.is_global_zero:
            self.log_dict(self.retrieval_metrics("test"), rank_zero_only=True)

    # ------------------------------------------------------------------ optimisation and data

    def param_groups(self) -> list[dict]:
        """What trains, in named groups (LearningRateMonitor logs lr-AdamW/<name>): the encoders ("retriever") at
        --retriever_learning_rate, the generator at --learning_rate, tau at its own; no weight decay on biases
        and norms (every 1-D weight, as nanoGPT: the "*_no_decay" groups)."""
        hp = self.hparams
        rates = {"generator": hp.learning_rate, "retriever": hp.retriever_learning_rate or hp.learning_rate}
        groups = {}
        for name, p in self.named_parameters():  # a shared encoder's weights come once, as question_encoder
            if not p.requires_grad:
                continue
            if name.endswith("log_temperature"):  # one scalar: at the encoders' rate it would hardly move in a run
                group, lr, decay = "temperature", hp.temperature_learning_rate, 0.0
            else:
                group = "generator" if name.startswith("model.generator.") else "retriever"
                lr, decay = rates[group], hp.weight_decay if p.dim() >= 2 else 0.0
                group += "" if p.dim() >= 2 else "_no_decay"
            groups.setdefault(group, {"name": group, "params": [], "lr": lr, "weight_decay": decay})
            groups[group]["params"].append(p)
        return list(groups.values())

    def configure_optimizers(self):
        hp = self.hparams
        groups = self.param_groups()
        if hp.adafactor:
            optimizer = Adafactor(groups, lr=hp.learning_rate, scale_parameter=False, relative_step=False)
        else:
            optimizer = torch.optim.AdamW(groups, lr=hp.learning_rate, eps=hp.adam_epsilon)
        scheduler = get_scheduler(
            SCHEDULERS[hp.lr_scheduler],
            optimizer,
            num_warmup_steps=hp.warmup_steps,
            num_training_steps=self.trainer.estimated_stepping_batches,
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _dataset(self, directory: str, split: str, kind: str = QA, masks: list | None = None) -> QuestionDataset:
        dataset = QuestionDataset(
            self.model.question_tokenizer,
            directory,
            max_source_length=self.hparams.max_source_length,
            type_path=split,
            n_obs=self.n_obs[split] if kind == QA else None,
            prefix=self.model.question_prefix,
            kind=kind,
            masks=masks,
        )
        if split == "train" and self.model.generator is not None:  # labels cut as the reference cut them
            dataset.cut_targets(self.model.generator.tokenizer, self.hparams.max_target_length)
        return dataset

    def _dataloader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader:
        hp = self.hparams
        if split == "train" and hp.reconstruction_dir:
            return self._mixed_dataloader(batch_size)
        # Held-out statements (--data_dir is the --reconstruction_dir) are validated as statements: for_generator.
        statements = bool(hp.reconstruction_dir) and Path(hp.data_dir) == Path(hp.reconstruction_dir)
        dataset = self._dataset(hp.data_dir, split, RECONSTRUCTION if statements else QA)
        # Stateful: the checkpoint holds the epoch's order and position, so a run resumed mid-epoch sees each
        # example of that epoch once (Lightning saves and restores the loader's state_dict).
        loader = StatefulDataLoader if split == "train" else DataLoader
        return loader(
            dataset, batch_size=batch_size, shuffle=shuffle, collate_fn=dataset.collate_fn, num_workers=hp.num_workers
        )

    def _mixed_dataloader(self, batch_size: int) -> StatefulDataLoader:
        """QA pairs and statements in batches of one kind, statements the share --reconstruction_ratio of them
        (data.mixing). The DistributedSampler only carries seed and epoch here (and, under DDP, Lightning's own
        carries the rank); the batch sampler's order follows from them, so a mid-epoch resume skips ahead in it."""
        hp = self.hparams
        qa = self._dataset(hp.data_dir, "train") if hp.reconstruction_ratio < 1 else None
        statements = self._dataset(hp.reconstruction_dir, "train", RECONSTRUCTION, self.reconstruction.masks)
        dataset = MixedDataset(qa, statements)
        carrier = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=False, seed=hp.seed)
        batches = MixedBatchSampler(
            carrier, batch_size, n_qa=dataset.n_qa, n_statements=len(statements), ratio=hp.reconstruction_ratio
        )
        if hp.reconstruction_ratio < 1 and not batches.counts()[1]:
            warnings.warn(
                f"--reconstruction_ratio {hp.reconstruction_ratio}: no statement batch among the "
                f"{len(batches)} of an epoch",
                stacklevel=1,
            )
        return StatefulDataLoader(
            dataset, batch_sampler=batches, collate_fn=dataset.collate_fn, num_workers=hp.num_workers
        )

    def train_dataloader(self) -> DataLoader:
        return self._dataloader("train", self.hparams.train_batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._dataloader("val", self.hparams.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._dataloader("test", self.hparams.eval_batch_size, shuffle=False)

    # ------------------------------------------------------------------ saving

    def on_fit_start(self) -> None:
        self._fit_started = time.perf_counter()

    def on_train_start(self) -> None:
        # Lightning #20550: estimated_stepping_batches (configure_optimizers) built the training loader before a
        # resumed checkpoint was restored, so the loader's saved position was never loaded and the epoch would
        # start over. Load it now and iterate anew, as Lightning's own resume path does (its fix, PR #21765).
        # Only mid-epoch: a checkpoint taken at an epoch's end starts the next epoch afresh, as without the bug.
        loop = self.trainer.fit_loop
        epoch = loop.epoch_loop
        if loop.restarted_mid_epoch and epoch.restarted_on_train_batch_end and epoch.batch_progress.is_last_batch:
            # Saved at an epoch's last step (a finished run's last.ckpt is one): Lightning counts that epoch done, but
            # would run the next on the spent loader, without on_train_epoch_start: 0 steps (a finished run extended
            # by one epoch trained none). The next epoch starts afresh instead, as after an epoch's end.
            loop._combined_loader_states_to_load = []
            loop.reset_restart_stage()
            iter(loop._data_fetcher)
            return
        if loop._combined_loader_states_to_load and loop._combined_loader is not None and loop.restarted_mid_epoch:
            loop._combined_loader._load_state_dicts(loop._combined_loader_states_to_load)
            iter(loop._data_fetcher)
        loop._combined_loader_states_to_load = []

    @property
    def train_seconds(self) -> float:
        """Seconds in trainer.fit, over every segment of a resumed run (a killed one's up to its last save)."""
        now = time.perf_counter() - self._fit_started if self._fit_started is not None else 0.0
        return self.earlier_train_seconds + now

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["kb_version"] = self.kb.stored(self.hparams.output_dir)
        checkpoint["train_seconds"] = self.train_seconds
        if self._fingerprints is None:  # the run's data and base KB, which --resume compares (run_dir)
            self._fingerprints = run_fingerprints(self.hparams)
        checkpoint["fingerprints"] = self._fingerprints

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Test or resume against the KB version whose embeddings match the restored weights."""
        if self._fit_started is None:  # resuming (not testing after fit): the earlier segments' training time
            self.earlier_train_seconds = checkpoint.get("train_seconds", 0.0)
        saved = checkpoint.get("kb_version")
        if not saved:
            return
        kb = KBVersion.restored(saved, self.hparams.output_dir)  # this run directory's, wherever it now is
        # Every rank loads the same checkpoint and so takes the same branches here (each rank's own live
        # version may differ: it is the newest that rank has seen served), and meets the barrier below.
        if not Path(kb.index_path).exists():
            if not self.hparams.reencode_lost_kb:  # training on another version's vectors would go unnoticed
                raise FileNotFoundError(
                    f"{kb.index_path}: KB v{kb.version}, which this checkpoint's weights were trained against, is gone"
                    ": restore it, or pass --reencode_lost_kb to re-encode the KB with the restored weights first"
                )
            warnings.warn(
                f"--reencode_lost_kb: {kb.index_path} (KB v{kb.version}) is gone; serving v{self.kb.version}"
                " until the KB is re-encoded with the restored weights",
                stacklevel=1,
            )
            self.reencode_on_start = True  # KBRefreshCallback.on_train_start
            return
        if self.global_rank == 0 and kb.version != self.kb.version:  # the actors are shared: one rank swaps them
            staged = self.retriever.stage(kb)  # bounded: the other ranks wait in the barrier below
            names = [f"retrieval actor {i}" for i in range(len(staged))]
            wait_for(staged, names, rank_zero_wait_s(self.hparams.ddp_timeout), f"load KB v{kb.version}")
            ray.get(staged)
            self.retriever.activate(kb)
        self.retriever.live_kb = kb
        self.trainer.strategy.barrier("kb_swapped")  # no rank retrieves from the old version after this

    def save_hf_checkpoint(self, directory: Path) -> None:
        """Write the model (rag_model.RagModel.save_pretrained: every part with its tokenizer, and
        rag_settings.json) and the KB version whose index matches these weights."""
        if directory.exists():
            return  # this step is already saved
        with atomic_write(directory, "checkpoint") as tmp:  # a full disk names the directory
            self.model.save_pretrained(tmp)
            kb = self.kb.stored(directory, run_dir=self.hparams.output_dir)  # ../kb/vNNNN: moves with the run
            (tmp / KB_VERSION_FILE).write_text(json.dumps(kb, indent=1))


def build_module(args: argparse.Namespace) -> GenerativeQAModule:
    """Start (or join) Ray and this run's retrieval actors, then build the module around them. A local Ray gets the
    GPUs the plan sets aside for the encoding actors (rag_options.gpu_plan), and no other: training's stay its own."""
    init_ray(args.ray_address, args.ray_namespace, gpu_plan(args).ray_gpus(visible_gpu_ids()))
    if args.index_gpus:  # a joined cluster may lack them: refused now rather than pending for ever at the first refresh
        encoders = encoder_options(args.index_gpus, args.index_workers) | spread_over_nodes(1)[0]
        check_placeable("--index_gpus: the encoding actors", encoders)
    # This run's own actors: two runs on one cluster never share them (nor see each other's KB versions).
    namespace = f"{args.ray_namespace}-{args.run_id}"
    if args.index_shards > 1:
        shards = start_shard_actors(
            args.index_shards, IndexConfig.from_args(args), namespace, args.retrieval_threads, args.index_gpus
        )
        return GenerativeQAModule(args, ShardedRetriever(shards, local_rank_from_env(), args.retrieval_timeout))
    actors = start_retrieval_actors(
        args.num_retrieval_workers,
        args.hnsw_ef_search,
        namespace,
        args.retrieval_threads,
        args.faiss_gpu,
        args.index_gpus,
    )
    return GenerativeQAModule(args, RagRayDistributedRetriever(actors, local_rank_from_env(), args.retrieval_timeout))


def every_rank(rows: list) -> list[list]:
    """Each rank's `rows` (all_gather_object), in rank order; [rows] without torch.distributed."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [rows]
    shards = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(shards, rows)
    return shards


def per_question_means(shards: list[list[tuple[int, list[float]]]]) -> list[float] | None:
    """Column means of every rank's (line, values) rows, each line once (DistributedSampler pads the ranks'
    shards to one length with repeated lines), NaN values left out (a loss not computed, a question not scored);
    None without rows."""
    rows = list(dict(row for shard in shards for row in shard).values())
    return torch.tensor(rows, dtype=torch.float64).nanmean(0).tolist() if rows else None


def in_line_order(shards: list[list[tuple[int, str]]]) -> list[str]:
    """Answers of every rank's (line, answer) rows in line order; a line that DistributedSampler gave two
    ranks (it pads shards to equal length) is kept once."""
    return [answer for _, answer in sorted(dict(row for shard in shards for row in shard).items())]


def build_loggers(args: argparse.Namespace) -> list:
    """TensorBoard and CSV logs of this run (or resume) in one new `logs/version_N`. Left to choose, each picks the
    next free N when it first writes, after the other has taken it: two folders a run, two more a resume."""
    version = CSVLogger(args.output_dir, name="logs").version  # the next free N, no folder made yet
    loggers = [
        TensorBoardLogger(args.output_dir, name="logs", version=version),
        CSVLogger(args.output_dir, name="logs", version=version),
    ]
    if args.logger_name.startswith("wandb"):
        from pytorch_lightning.loggers import WandbLogger  # needs `pip install wandb`

        project = "rag-end2end" if args.logger_name == "wandb_shared" else f"rag-{Path(args.output_dir).name}"
        loggers.append(WandbLogger(project=project, save_dir=args.output_dir))
    return loggers


def main(args: argparse.Namespace) -> GenerativeQAModule:
    """Train and/or test as the flags say, holding --output_dir's lock throughout."""
    with refusing():
        lock = lock_output_dir(Path(args.output_dir)) if args.do_train or args.do_predict else None
    try:
        return run(args)
    finally:
        if lock is not None:
            release_lock(lock)


def run(args: argparse.Namespace) -> GenerativeQAModule:
    pl.seed_everything(args.seed, workers=True)
    if args.trainer_threads:
        torch.set_num_threads(args.trainer_threads)
    with refusing():  # bad flags, files or set-up: one line, before any work
        check_data_dir(args)
        prepare_output_dir(args)
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        if is_first_process():  # under this run's lock: what an interrupted save of an earlier segment left
            out = Path(args.output_dir)
            for path in remove_orphaned_temporaries(out) + remove_orphaned_temporaries(out / "kb"):
                print(f"removed {path}: left by an interrupted save")
        model = build_module(args)
    if not (args.do_train or args.do_predict):
        print(f"RAG model built with its retriever for --training_mode {args.training_mode}; nothing to train.")
        return model

    # Recipes without a generator are judged by their own loss on validation questions.
    metric = "em" if model.model.generator is not None else "loss"
    callbacks = [
        get_checkpoint_callback(args.output_dir, metric),
        get_last_checkpoint_callback(args.output_dir, args.save_last_every_n_steps),
        RunFilesCallback(),
        LearningRateMonitor(logging_interval="step"),
    ]
    if args.early_stopping_patience >= 0:
        callbacks.append(get_early_stopping_callback(metric, args.early_stopping_patience))
    if model.objective.refreshes and args.indexing_freq:
        callbacks.append(
            KBRefreshCallback(
                str(Path(args.output_dir) / "kb"),
                args.indexing_freq,
                IndexConfig.from_args(args),
                args.index_workers,
                args.index_gpus,
                args.encode_batch_size,
                args.keep_kb_versions,
                args.refresh_before_validation,
                args.max_refresh_failures,
                index_cpus=args.index_cpus,
                wait_timeout=rank_zero_wait_s(args.ddp_timeout),
                staleness_sample=args.staleness_sample,
                seed=args.seed,
                policy=RefreshPolicy(
                    args.refresh_policy,
                    args.refresh_slices,
                    args.hot_random_share,
                    args.full_refresh_every,
                    args.seed,
                    args.hot_neighbours,
                ),
            )
        )
    trainer = pl.Trainer(
        **trainer_kwargs(args), callbacks=callbacks, logger=build_loggers(args), default_root_dir=args.output_dir
    )
    if args.do_train:
        if args.validate_before_training:  # the untrained score, logged at step 0 beside the later ones
            trainer.validate(model)
        trainer.fit(model, ckpt_path=args.resume_from_checkpoint)
    train_seconds = model.train_seconds  # every segment of a resumed run
    if args.do_predict:
        best = callbacks[0].best_model_path if args.do_train else ""
        trainer.test(model, ckpt_path=best or None)
    if args.do_train and trainer.is_global_zero:  # PNG curves in OUTPUT/plots; warns, never raises
        plot_runs([args.output_dir], Path(args.output_dir) / "plots")
        refresh = next((c for c in callbacks if isinstance(c, KBRefreshCallback)), None)
        info = {
            "training_mode": args.training_mode,
            "trains": list(model.objective.trains),
            "train_seconds": train_seconds,
            "refreshes": len(refresh.history) if refresh else 0,
            "passages_encoded": refresh.refresher.passages_encoded if refresh and refresh.refresher else 0,
        }
        (Path(args.output_dir) / "run_info.json").write_text(json.dumps(info, indent=1))
    return model


def cli() -> None:
    """The command line."""
    run_main(main, parse_args(), marked_only=True)
    if ray.is_initialized():
        ray.shutdown()


if __name__ == "__main__":
    cli()
