"""Fine-tune RAG end to end: question encoder, context encoder and generator learn together while
Ray actors re-encode the knowledge base and rebuild its FAISS index in the background.

    python finetune_rag.py --model_name_or_path facebook/rag-token-base --model_type rag_token \
        --passages_path KB/my_knowledge_dataset --index_path KB/my_knowledge_dataset_hnsw_index.faiss \
        --data_dir DATA --output_dir OUT --do_train --training_mode rag_end2end --indexing_freq 500

--training_mode picks the recipe (training_modes.py): rag_end2end, rag_original, retriever_only, dalm, lsr
or ralt; --end2end is rag_end2end's old name.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import time
import uuid
import warnings
from pathlib import Path

import faiss
import pytorch_lightning as pl
import ray
import torch
from datasets import load_from_disk
from pytorch_lightning.callbacks import LearningRateMonitor
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from torch.utils.data import DataLoader
from transformers import AutoTokenizer, get_scheduler
from transformers.optimization import Adafactor

from callbacks_rag import (
    KBRefreshCallback,
    Seq2SeqLoggingCallback,
    get_checkpoint_callback,
    get_early_stopping_callback,
    get_last_checkpoint_callback,
)
from distributed_ray_retriever import (
    RagRayDistributedRetriever,
    ShardedRetriever,
    init_ray,
    start_retrieval_actors,
    start_shard_actors,
)
from kb_encode_utils import (
    IndexConfig,
    KBVersion,
    add_index_args,
    check_kb_similarity,
    process_alive,
    remove_orphaned_temporaries,
    temporary_sibling,
)
from lora import PEFT_CHOICES, add_lora, train_only_lora
from plot_run import plot_runs
from rag_encoders import context_side, encoder_similarity, load_encoder, load_tokenizer, with_scoring
from rag_model import RAG_TEMPLATE, SETTINGS_FILE, CausalGenerator, RagModel, Seq2SeqGenerator
from training_modes import MODES, make_objective, mine
from utils_rag import (
    GENERATION_METRICS,
    Seq2SeqDataset,
    exact_match_score,
    f1_score,
    metric_max_over_ground_truths,
    mrr_at_k,
    parse_metrics,
    read_gold,
    read_lines,
    recall_at_k,
    rouge_l_score,
    sentence_bleu,
)

# Epoch-level metrics here are already gathered across ranks (all_gather_object) before they are logged.
warnings.filterwarnings("ignore", ".*sync_dist=True.*")

MARGINALS = ("rag_token", "rag_sequence")
SCHEDULERS = {"linear": "linear", "cosine": "cosine", "cosine_w_restarts": "cosine_with_restarts",
              "polynomial": "polynomial"}  # fmt: skip
# Per-example scores summed over an epoch: EM, F1 and ROUGE-L in [0, 1], sentence BLEU in [0, 100].
METRIC_FNS = {"em": exact_match_score, "f1": f1_score, "rouge_l": rouge_l_score, "bleu": sentence_bleu}
MODEL_FLAGS = ("model_name_or_path", "question_encoder_name_or_path", "generator_name_or_path", "context_encoder_name",
               "tokenizer_name", "context_encoder_tokenizer_name")  # fmt: skip
RUN_ID_ENV = "RAG_E2E_RUN_ID"  # how DDP child processes learn the run id of the first one
DUMMY_KB = ("test_run/dummy-kb/my_knowledge_dataset", "test_run/dummy-kb/my_knowledge_dataset_hnsw_index.faiss")


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
        if hp.model_type not in MARGINALS:
            raise ValueError(f"--model_type {hp.model_type!r} is not supported here; use rag_token or rag_sequence")
        for path in (hp.passages_path, hp.index_path):
            if not Path(path).exists():
                raise FileNotFoundError(f"{path} not found: build the KB first with use_own_knowledge_dataset.py")
        for flag in MODEL_FLAGS:
            check_model_path(flag, getattr(hp, flag))
        self.objective = make_objective(hp)
        self.retriever = retriever
        self.base_passages_path = hp.passages_path  # the passages every refresh re-encodes
        self.model = build_model(hp, self.objective, retriever)
        # The similarity the question encoder scores with (declared by its checkpoint, or --similarity); the KB
        # must hold embeddings made for it, checked before any work is done.
        self.similarity = encoder_similarity(self.model.question_encoder)
        q_name = hp.question_encoder_name_or_path or hp.model_name_or_path
        check_kb_similarity(hp.passages_path, f"the question encoder {q_name}", self.similarity)
        check_kb(hp.passages_path, hp.index_path, self.model.question_encoder.config.hidden_size, self.model.n_docs)
        retriever.init_retrieval(KBVersion(0, hp.passages_path, hp.index_path, embedding_step=0,
                                           similarity=self.similarity))  # fmt: skip
        self.objective.freeze(self.model)
        if hp.peft != "none":
            apply_lora(self.model, hp, self.objective.trains)
        self.objective.set_modes(self.model)  # dropout on in the parts that learn, off in the frozen ones

        self.target_lens = {"train": hp.max_target_length, "val": hp.val_max_target_length,
                            "test": hp.test_max_target_length}  # fmt: skip
        self.n_obs = {"train": hp.n_train, "val": hp.n_val, "test": hp.n_test}
        # Optional gold passages ({split}.gold.jsonl, written by the converters): retrieval metrics, and the
        # positives of the contrastive recipes.
        self.gold = {
            split: (read_lines(Path(hp.data_dir) / f"{split}.source"), read_gold(str(path), "jsonl"))
            for split in ("train", "val", "test")
            if (path := Path(hp.data_dir) / f"{split}.gold.jsonl").exists()
        }
        self.passages = load_from_disk(hp.passages_path) if self.objective.needs_positives else None
        self._eval_rows: list[tuple[int, list[float]]] = []  # (line, [metrics..., loss, seconds]) on this rank
        self._test_rows: list[tuple[int, str]] = []  # (line of test.source, generated answer) on this rank
        self.test_predictions: list[str] = []  # every rank's answers, in test.source order

    @property
    def kb(self) -> KBVersion:
        """The KB version retrieval serves now (the refresh swaps it; a resumed run restores it)."""
        return self.retriever.live_kb

    @property
    def context_encoder(self) -> torch.nn.Module | None:
        return self.model.ctx_encoder

    # ------------------------------------------------------------------ training

    def _mined(self, batch: dict, split: str):
        """Positives and hard negatives for the contrastive recipes; None for the others."""
        if not self.objective.needs_positives:
            return None
        gold = self.gold[split][1].passage_ids if split in self.gold else None
        gold = [gold[int(i)] for i in batch["index"]] if gold is not None else None
        return mine(self.model, batch, self.passages, gold, self.hparams.hard_negatives)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, logs = self.objective.loss(self.model, batch, self._mined(batch, "train"))
        n = len(batch["source_text"])
        self.log("loss", loss, prog_bar=True, batch_size=n)
        self.log_dict({f"train_{k}": v for k, v in logs.items()}, batch_size=n)
        if self.hparams.learn_temperature:
            self.log("retrieval_temperature", self.model.question_encoder.temperature_value, batch_size=n)
        return loss

    def gold_answers(self, split: str, batch: dict) -> list[list[str]]:
        """Every gold answer of each question of a batch: its .target line, and the others {split}.gold.jsonl
        lists. EM/F1 take the best of them, as SQuAD and eval_rag.py do."""
        listed = self.gold[split][1].answers if split in self.gold else None
        return [list(dict.fromkeys([target, *(listed[int(i)] if listed else [])]))
                for target, i in zip(batch["target_text"], batch["index"])]  # fmt: skip

    def _generative_step(self, batch: dict, split: str) -> None:
        start = time.perf_counter()
        questions, n = batch["source_text"], len(batch["source_text"])
        scores = {name: [0.0] * n for name in GENERATION_METRICS}
        preds = []
        if self.model.generator is None:  # retriever_only: its own loss on held-out questions
            losses = [float(self.objective.loss(self.model, batch, self._mined(batch, split))[0])] * n
        else:
            preds = self.model.generate(batch["input_ids"], batch["attention_mask"], questions,
                                        self.target_lens[split], self.hparams.num_beams)  # fmt: skip
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
        means = per_question_means(every_rank(self._eval_rows))
        self._eval_rows = []
        if means is None:
            return
        *means, loss, seconds = means
        metrics = {f"{prefix}_gen_time": seconds}
        if self.model.generator is not None:
            metrics |= {f"{prefix}_{name}": value for name, value in zip(GENERATION_METRICS, means)
                        if name in self.hparams.metrics}  # fmt: skip
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
        encoder = self.model.question_encoder
        was_training = encoder.training
        encoder.eval()
        retrieved = []
        for start in range(0, len(questions), 32):
            q = self.model.encode_questions(**self.model.tokenize_questions(questions[start : start + 32]))
            _, ids, _ = self.retriever.retrieve(q.float().cpu().numpy(), max(ks), embeddings=False)
            retrieved.extend(ids.tolist())
        encoder.train(was_training)
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

    def _dataloader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader:
        dataset = Seq2SeqDataset(
            self.model.question_tokenizer,
            self.hparams.data_dir,
            max_source_length=self.hparams.max_source_length,
            type_path=split,
            n_obs=self.n_obs[split],
            prefix=self.model.question_prefix,
        )
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, collate_fn=dataset.collate_fn,
                          num_workers=self.hparams.num_workers)  # fmt: skip

    def train_dataloader(self) -> DataLoader:
        return self._dataloader("train", self.hparams.train_batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._dataloader("val", self.hparams.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._dataloader("test", self.hparams.eval_batch_size, shuffle=False)

    # ------------------------------------------------------------------ saving

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["kb_version"] = vars(self.kb)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Test or resume against the KB version whose embeddings match the restored weights."""
        saved = checkpoint.get("kb_version")
        if not saved:
            return
        kb = KBVersion(**saved)
        # Every rank loads the same checkpoint and so takes the same branches here (each rank's own live
        # version may differ: it is the newest that rank has seen served), and meets the barrier below.
        if not Path(kb.index_path).exists():
            warnings.warn(f"{kb.index_path} (KB v{kb.version} of this checkpoint) is gone; "
                          f"keeping v{self.kb.version}", stacklevel=1)  # fmt: skip
            return
        if self.global_rank == 0 and kb.version != self.kb.version:  # the actors are shared: one rank swaps them
            ray.get(self.retriever.stage(kb))
            self.retriever.activate(kb)
        self.retriever.live_kb = kb
        self.trainer.strategy.barrier("kb_swapped")  # no rank retrieves from the old version after this

    def save_hf_checkpoint(self, directory: Path) -> None:
        """Write the model (rag_model.RagModel.save_pretrained: every part with its tokenizer, and
        rag_settings.json) and the KB version whose index matches these weights."""
        if directory.exists():
            return  # this step is already saved
        tmp = temporary_sibling(directory)
        self.model.save_pretrained(tmp)
        (tmp / "kb_version.json").write_text(json.dumps(vars(self.kb), indent=1))
        os.rename(tmp, directory)


def build_model(hp: argparse.Namespace, objective, retriever) -> RagModel:
    """The RagModel the flags describe, with only the parts the recipe needs (no generator for
    retriever_only, no context encoder where passage embeddings never change)."""
    marginal = hp.model_type.removeprefix("rag_")
    # Saved with the model, so that eval_rag.py retrieves and decodes exactly as --do_predict did.
    settings = {"rerank_top": hp.rerank_top, "question_max_length": hp.max_source_length,
                "generation": {"num_beams": hp.num_beams, "max_new_tokens": hp.test_max_target_length}}  # fmt: skip
    source = hp.init_from or hp.model_name_or_path
    if source:
        if hp.question_pooling or hp.shared_encoder:
            raise ValueError("--question_pooling and --shared_encoder build the question encoder: pass --question_"
                             "encoder_name_or_path and --generator_name_or_path, not a RAG checkpoint")  # fmt: skip
        overrides = {"marginal": marginal, **settings}
        overrides |= {"n_docs": hp.n_docs} if hp.n_docs else {}
        overrides |= {"question_prefix": hp.question_prefix} if hp.question_prefix is not None else {}
        model = RagModel.from_pretrained(source, retriever, objective.needs_generator, objective.uses_context_encoder,
                                         cache_dir=hp.cache_dir, **overrides)  # fmt: skip
        # A RAG checkpoint's DPR question encoder scores with dot products at tau 1, unless told otherwise.
        model.question_encoder = with_scoring(model.question_encoder, hp.similarity, hp.retrieval_temperature,
                                              hp.learn_temperature)  # fmt: skip
        if model.generator is not None:
            if hp.prompt_template:
                model.generator.template = hp.prompt_template
            model.generator.label_smoothing = hp.label_smoothing
        elif objective.needs_generator:  # e.g. retriever_only's checkpoint, continued by ralt (RA-DIT's order)
            if not hp.generator_name_or_path:
                raise ValueError(f"{source} holds no generator: --training_mode {objective.name} needs "
                                 "--generator_name_or_path")  # fmt: skip
            model.generator = load_generator(hp)
    else:
        if not hp.question_encoder_name_or_path or (objective.needs_generator and not hp.generator_name_or_path):
            raise ValueError("give --model_name_or_path, or --question_encoder_name_or_path and --generator_name_or_"
                             f"path (--training_mode {objective.name} needs a generator: "
                             f"{objective.needs_generator})")  # fmt: skip
        q_name = hp.question_encoder_name_or_path
        question_encoder = load_encoder(q_name, hp.question_pooling, hp.cache_dir, "question", hp.similarity,
                                        hp.retrieval_temperature, hp.learn_temperature)  # fmt: skip
        prefix = hp.question_prefix or getattr(question_encoder.config, "prefix", None) or ""
        generator = load_generator(hp) if objective.needs_generator else None
        q_tokenizer = AutoTokenizer.from_pretrained(q_name, cache_dir=hp.cache_dir)
        model = RagModel(question_encoder, q_tokenizer, generator, retriever, hp.n_docs or 5, marginal,
                         question_prefix=prefix, **settings)  # fmt: skip
    if objective.uses_context_encoder and model.ctx_encoder is None:
        attach_context_encoder(model, hp)
    if not objective.uses_context_encoder:
        model.ctx_encoder = model.ctx_tokenizer = None
    return model


def apply_lora(model: RagModel, hp: argparse.Namespace, trains: tuple[str, ...]) -> None:
    """LoRA adapters on the parts --peft names that the recipe trains; only the adapters then learn."""
    names = {"generator": ["generator"], "retriever": ["question_encoder", "ctx_encoder"]}
    chosen = [p for p in names.get(hp.peft, [*names["generator"], *names["retriever"]]) if p in trains]
    targets = hp.lora_target_modules.split(",") if hp.lora_target_modules else None
    q, ctx = model.question_encoder, model.ctx_encoder
    shared = ctx is not None and getattr(ctx, "model", None) is not None and ctx.model is getattr(q, "model", None)
    for name in chosen:
        part = getattr(model, name)
        if name == "ctx_encoder" and shared:  # --shared_encoder: the adapters are already in its transformer
            ctx.model = q.model
            continue
        add_lora(part, hp.lora_r, hp.lora_alpha, hp.lora_dropout, targets)
        train_only_lora(part)
    if not chosen:
        warnings.warn(f"--peft {hp.peft}: --training_mode {hp.training_mode} trains none of those parts", stacklevel=1)


def load_generator(hp: argparse.Namespace):
    """The generator of an assembled model, with the flags' dropout, prompt and length settings."""
    config = {name: getattr(hp, name) for name in ("dropout", "attention_dropout", "encoder_layerdrop",
                                                   "decoder_layerdrop") if getattr(hp, name) is not None}  # fmt: skip
    if hp.generator_type == "causal":
        return CausalGenerator.from_pretrained(hp.generator_name_or_path, hp.prompt_template, hp.max_combined_length,
                                               hp.label_smoothing, hp.cache_dir, **config)  # fmt: skip
    template = hp.prompt_template or (hp.prefix or "") + RAG_TEMPLATE
    generator = Seq2SeqGenerator.from_pretrained(hp.generator_name_or_path, template, hp.max_combined_length,
                                                 hp.label_smoothing, hp.cache_dir, **config)  # fmt: skip
    # Passage + question must fit the generator's positions (transformers' RAG default, 300, may not).
    positions = getattr(generator.model.config, "max_position_embeddings", None)
    generator.max_length = min(generator.max_length, positions or generator.max_length)
    return generator


def attach_context_encoder(model: RagModel, hp: argparse.Namespace) -> None:
    """The context encoder the recipe re-encodes passages with (--shared_encoder: the question encoder's
    transformer), checked to score like the question encoder."""
    ctx_name = hp.context_encoder_name
    if hp.shared_encoder:  # one transformer encodes questions and passages
        context_encoder = context_side(model.question_encoder)
    else:
        context_encoder = load_encoder(ctx_name, hp.context_pooling, hp.cache_dir, "context", hp.similarity)
    similarity = encoder_similarity(model.question_encoder)
    if encoder_similarity(context_encoder) != similarity:
        raise ValueError(
            f"the context encoder {ctx_name} scores with {encoder_similarity(context_encoder)} similarity, "
            f"the question encoder with {similarity}: pass --similarity dot or cosine"
        )
    q_dim = model.question_encoder.config.hidden_size
    if context_encoder.config.hidden_size != q_dim:
        raise ValueError(f"context encoder {ctx_name} has size {context_encoder.config.hidden_size}, the question "
                         f"encoder {q_dim}: their dot product needs one size")  # fmt: skip
    model.ctx_encoder = context_encoder
    model.ctx_tokenizer = load_tokenizer(hp.context_encoder_tokenizer_name or ctx_name, hp.passage_prefix,
                                         hp.cache_dir)  # fmt: skip


def build_module(args: argparse.Namespace) -> GenerativeQAModule:
    """Start (or join) Ray and this run's retrieval actors, then build the module around them."""
    init_ray(args.ray_address, args.ray_namespace)
    # This run's own actors: two runs on one cluster never share them (nor see each other's KB versions).
    namespace = f"{args.ray_namespace}-{args.run_id}"
    if args.index_shards > 1:
        shards = start_shard_actors(args.index_shards, IndexConfig.from_args(args), namespace, args.retrieval_threads)
        return GenerativeQAModule(args, ShardedRetriever(shards, local_rank_from_env()))
    actors = start_retrieval_actors(args.num_retrieval_workers, args.hnsw_ef_search, namespace, args.retrieval_threads)
    return GenerativeQAModule(args, RagRayDistributedRetriever(actors, local_rank_from_env()))


def every_rank(rows: list) -> list[list]:
    """Each rank's `rows` (all_gather_object), in rank order; [rows] without torch.distributed."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [rows]
    shards = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(shards, rows)
    return shards


def per_question_means(shards: list[list[tuple[int, list[float]]]]) -> list[float] | None:
    """Column means of every rank's (line, values) rows, each line once (DistributedSampler pads the ranks'
    shards to one length with repeated lines); None without rows."""
    rows = list(dict(row for shard in shards for row in shard).values())
    return torch.tensor(rows, dtype=torch.float64).mean(0).tolist() if rows else None


def in_line_order(shards: list[list[tuple[int, str]]]) -> list[str]:
    """Answers of every rank's (line, answer) rows in line order; a line that DistributedSampler gave two
    ranks (it pads shards to equal length) is kept once."""
    return [answer for _, answer in sorted(dict(row for shard in shards for row in shard).items())]


def check_model_path(flag: str, name: str | None) -> None:
    """Refuse a local model directory that does not exist, instead of letting the hub call it a bad repo id."""
    if not name or Path(name).exists():
        return
    parent = Path(name).expanduser().parent
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or (parent != Path(".") and parent.is_dir()):
        raise FileNotFoundError(f"--{flag} {name}: no such directory (a hub model is named org/name)")


def check_kb(passages_path: str, index_path: str, dim: int, n_docs: int) -> None:
    """Refuse a KB that cannot serve this model before any work: no embeddings, another vector size, fewer
    passages than --n_docs, or an index that does not match its passages."""
    passages = load_from_disk(passages_path)
    if "embeddings" not in passages.column_names:
        raise ValueError(f"{passages_path}: no `embeddings` column (columns: {', '.join(passages.column_names)}); "
                         "build the KB with use_own_knowledge_dataset.py")  # fmt: skip
    kb_dim = len(passages[0]["embeddings"])
    if kb_dim != dim:
        raise ValueError(f"{passages_path}: embeddings of size {kb_dim}, the question encoder makes {dim}: "
                         "re-encode the KB with the matching context encoder")  # fmt: skip
    if n_docs > len(passages):
        raise ValueError(f"--n_docs {n_docs} is more than the {len(passages)} passages of {passages_path}")
    index = faiss.read_index(str(index_path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    if index.d != kb_dim or index.ntotal != len(passages):
        raise ValueError(f"{index_path}: {index.ntotal} vectors of size {index.d} for {len(passages)} passages "
                         f"of size {kb_dim} in {passages_path}: build them together")  # fmt: skip


RUN_FILES = ("*.ckpt", "*.kb_version.json", "checkpoint*", "metrics.json", "test_results.txt",
             "test_generations.txt", "logs", "kb")  # fmt: skip


def check_data_dir(args: argparse.Namespace) -> None:
    """Every split the run will read exists, before hours of training reach the test pass."""
    splits = [*(["train", "val"] if args.do_train else []), *(["test"] if args.do_predict else [])]
    names = [f"{split}.{ext}" for split in splits for ext in ("source", "target")]
    missing = [name for name in names if not (Path(args.data_dir) / name).is_file()]
    if missing:
        raise FileNotFoundError(f"--data_dir {args.data_dir} lacks {', '.join(missing)}")


def prepare_output_dir(args: argparse.Namespace) -> None:
    """Refuse to train into an earlier run's directory unless told to continue it (--resume) or start over
    (--overwrite_output_dir: its files move to OUTPUT/previous_runs/, nothing is deleted)."""
    out = Path(args.output_dir)
    if args.resume and not args.resume_from_checkpoint:
        args.resume_from_checkpoint = newest_checkpoint(out)
    if not args.do_train or args.resume_from_checkpoint or not is_first_process():
        return
    earlier = sorted({p.name for pattern in RUN_FILES for p in out.glob(pattern)}) if out.is_dir() else []
    if not earlier:
        return
    if not args.overwrite_output_dir:
        raise FileExistsError(
            f"--output_dir {out} holds an earlier run ({', '.join(earlier[:6])}): pass --resume to continue it, "
            "--overwrite_output_dir to start over (its files move to OUTPUT/previous_runs/), or another directory"
        )
    dest = out / "previous_runs" / time.strftime("%Y%m%d-%H%M%S")
    dest.mkdir(parents=True)
    for name in earlier:
        (out / name).rename(dest / name)
    print(f"--overwrite_output_dir: the earlier run's files are in {dest}")


LOCK_FILE = ".run.lock"


def lock_output_dir(out: Path) -> Path | None:
    """Take OUTPUT/.run.lock (pid, host, start time) for this run, so that a second run into the same directory
    stops at once instead of interleaving checkpoints and KB versions with it. A lock whose process is gone (a
    crashed run on this host) is taken over with a warning. DDP ranks > 0 run under rank 0's lock."""
    if not is_first_process():
        return None
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_FILE
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                holder = json.loads(path.read_text())
            except (OSError, ValueError):  # being written by a run starting this instant
                holder = {"pid": None, "host": "?", "started": "?"}
            if holder.get("host") == me["host"] and holder.get("pid") and not process_alive(holder["pid"]):
                warnings.warn(f"{path}: the run that held it (pid {holder['pid']}, since {holder['started']}) is "
                              "gone; taking it over", stacklevel=2)  # fmt: skip
                path.unlink(missing_ok=True)
                continue
            raise RuntimeError(
                f"--output_dir {out} is in use by another run (pid {holder.get('pid')} on {holder.get('host')}, "
                f"since {holder.get('started')}): wait for it to end or use another directory; if that run is "
                f"gone, remove {path}"
            ) from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return path
    raise RuntimeError(f"{path}: could not take the lock")


def release_lock(path: Path) -> None:
    """Remove this run's lock (only if it is still this process's)."""
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass


def newest_checkpoint(output_dir: Path) -> str:
    """`last.ckpt` if the run wrote one, else its newest checkpoint."""
    if (output_dir / "last.ckpt").is_file():
        return str(output_dir / "last.ckpt")
    found = sorted(output_dir.glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"--resume: no checkpoint (*.ckpt) in {output_dir}")
    return str(found[-1])


def is_first_process() -> bool:
    """Global rank 0 before the Trainer exists (Lightning's and torchrun's launchers set these variables)."""
    return all(int(os.environ.get(name, 0)) == 0 for name in ("RANK", "NODE_RANK", "LOCAL_RANK"))


def resolve_run_id(run_id: str | None) -> str:
    """The id that names this run's Ray actors: the flag, else the one the first process of this run exported
    (DDP ranks re-run this script), else the launcher's job id, else a new one."""
    run_id = run_id or (None if is_first_process() else os.environ.get(RUN_ID_ENV))
    run_id = run_id or os.environ.get("TORCHELASTIC_RUN_ID") or os.environ.get("SLURM_JOB_ID")
    run_id = run_id or f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    os.environ[RUN_ID_ENV] = run_id
    return run_id


# ---------------------------------------------------------------------- command line


def str2bool(value: str) -> bool:
    if value.lower() in {"1", "true", "yes", "y"}:
        return True
    if value.lower() in {"0", "false", "no", "n"}:
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {value!r}")


def add_model_specific_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model")
    g.add_argument("--model_name_or_path", default=None, help="RAG checkpoint: hub name or local directory")
    g.add_argument("--question_encoder_name_or_path", default=None, help="with --generator_name_or_path, "
                   "assemble a RAG model instead of loading one")  # fmt: skip
    g.add_argument("--generator_name_or_path", default=None)
    g.add_argument("--model_type", choices=MARGINALS, required=True)
    g.add_argument(
        "--generator_type",
        choices=["seq2seq", "causal"],
        default="seq2seq",
        help="causal: any AutoModelForCausalLM, with RAG marginalisation over the retrieved passages",
    )
    g.add_argument("--prompt_template", default=None,
                   help="causal prompt with {title} {text} {question}; default: the chat template if any")  # fmt: skip
    g.add_argument("--config_name", default="", help="accepted for compatibility; the model's own config is used")
    g.add_argument("--tokenizer_name", default=None, help="accepted for compatibility; each part's own tokenizer "
                   "is used")  # fmt: skip
    g.add_argument("--cache_dir", default=None, help="HF cache for downloads (never deleted)")
    g.add_argument("--context_encoder_name", default="facebook/dpr-ctx_encoder-multiset-base")
    g.add_argument("--context_encoder_tokenizer_name", default=None, help="default: --context_encoder_name")
    g.add_argument("--end2end", action="store_true", help="old name of --training_mode rag_end2end")
    g.add_argument(
        "--question_pooling",
        choices=["cls", "mean", "pooler"],
        default=None,
        help="pool any AutoModel question encoder (a seq2seq RAG must then be assembled); default: DPR, or the "
        "checkpoint's sentence-transformers setting",
    )
    g.add_argument("--context_pooling", choices=["cls", "mean", "pooler"], default=None, help="the same for passages")
    g.add_argument("--question_prefix", default=None, help='text put before every question, e.g. "query: "')
    g.add_argument("--passage_prefix", default=None, help='text put before every passage title, e.g. "passage: "')
    g.add_argument("--shared_encoder", action="store_true", help="one encoder for questions and passages")
    g.add_argument(
        "--similarity",
        choices=["dot", "cosine"],
        default=None,
        help="how questions and passages are scored (cosine: L2-normalised vectors); default: what the "
        "encoder checkpoints declare (sentence-transformers' Normalize, pooling.json), else dot",
    )
    g.add_argument(
        "--retrieval_temperature",
        type=float,
        default=None,
        help="doc scores = similarity / tau before RAG's softmax over passages; default: the question "
        "encoder checkpoint's, else 1 for dot and 0.05 for cosine",
    )
    g.add_argument("--learn_temperature", action="store_true", help="learn tau (as log tau) with the model")
    g.add_argument("--temperature_learning_rate", type=float, default=1e-2,
                   help="learning rate of the learned log tau")  # fmt: skip
    g.add_argument("--n_docs", type=int, default=None, help="passages per question (default: the config's)")
    g.add_argument("--prefix", default=None)
    g.add_argument("--max_combined_length", type=int, default=None, help="passage + question tokens for the generator")
    for name in ("encoder_layerdrop", "decoder_layerdrop", "dropout", "attention_dropout"):
        g.add_argument(f"--{name}", type=float, default=None, help="set in the generator config")
    g.add_argument("--label_smoothing", type=float, default=0.0)

    g = parser.add_argument_group("training recipe (training_modes.py)")
    g.add_argument("--training_mode", choices=sorted(MODES), default=None,
                   help="what trains and with which loss (README: training recipes); default rag_original, or "
                   "rag_end2end with --end2end")  # fmt: skip
    g.add_argument("--query_side_only", action="store_true",
                   help="freeze the context encoder of any recipe: the KB never goes stale, no refresh")  # fmt: skip
    g.add_argument("--hard_negatives", type=int, default=0,
                   help="retriever_only/dalm: negatives per question mined from the live index (top-ranked "
                   "passages that are not gold and hold no answer)")  # fmt: skip
    g.add_argument("--symmetric_infonce", action="store_true", help="InfoNCE in both directions (q->p and p->q)")
    g.add_argument("--retriever_loss", choices=["none", "pdist"], default="none",
                   help="rag_end2end: add Atlas's perplexity distillation (generator -> retriever)")  # fmt: skip
    g.add_argument("--lm_temperature", type=float, default=0.1,
                   help="tau_lm of lsr and pdist: softmax(per-token mean answer log-likelihood per passage / "
                   "tau_lm); Atlas uses 0.01 (at 1 a 0.5-nat gap gives a near-flat [0.62, 0.38]; at 0.1, "
                   "[0.99, 0.01])")  # fmt: skip
    g.add_argument("--init_from", default=None,
                   help="start from a checkpoint<step> of an earlier run, of any recipe (e.g. retriever_only, then "
                   "ralt): its parts, and its KB version (the index its encoders were trained against); parts it "
                   "lacks come from the model flags")  # fmt: skip
    g.add_argument("--peft", choices=PEFT_CHOICES, default="none",
                   help="LoRA adapters (peft) instead of full fine-tuning for the generator, the encoders or both; "
                   "checkpoints and KB refreshes use the merged weights")  # fmt: skip
    g.add_argument("--lora_r", type=int, default=8)
    g.add_argument("--lora_alpha", type=int, default=16)
    g.add_argument("--lora_dropout", type=float, default=0.05)
    g.add_argument("--lora_target_modules", default=None,
                   help="comma-separated module names (default: peft's per family, e.g. query,value for BERT "
                   "encoders, q_proj,v_proj for Llama and BART)")  # fmt: skip
    g.add_argument("--rerank_top", type=int, default=0,
                   help="fetch L passages from the (stale) index, re-score them with the current context "
                   "encoder, keep the top n_docs (Atlas); 0: off")  # fmt: skip

    g = parser.add_argument_group("data")
    g.add_argument("--data_dir", default="test_run/dummy-train-data",
                   help="holds {train,val,test}.{source,target}")  # fmt: skip
    g.add_argument("--output_dir", default="test_run/model_checkpoints")
    g.add_argument("--max_source_length", type=int, default=128)
    g.add_argument("--max_target_length", type=int, default=25)
    g.add_argument("--val_max_target_length", type=int, default=25)
    g.add_argument("--test_max_target_length", type=int, default=25)
    for split in ("train", "val", "test"):
        g.add_argument(f"--n_{split}", type=int, default=-1, help="-1: all examples")
    g.add_argument("--num_workers", type=int, default=0, help="DataLoader workers")

    g = parser.add_argument_group("optimisation")
    g.add_argument("--learning_rate", type=float, default=5e-5)
    g.add_argument("--retriever_learning_rate", type=float, default=None,
                   help="learning rate of the question and context encoders (Atlas: 1e-5 against the reader's 1e-4; "
                   "tau keeps --temperature_learning_rate); default: --learning_rate")  # fmt: skip
    g.add_argument("--retriever_dropout", choices=["on", "off"], default="on",
                   help="off: the encoders that train run without dropout (eval mode; their gradients flow), so "
                   "the FAISS query, the doc scores and the re-encoded passages carry no dropout noise (x 1/tau), "
                   "as the stored vectors of rag_original do not")  # fmt: skip
    g.add_argument("--lr_scheduler", choices=sorted(SCHEDULERS), default="linear")
    g.add_argument("--weight_decay", type=float, default=0.0)
    g.add_argument("--adam_epsilon", type=float, default=1e-8)
    g.add_argument("--warmup_steps", type=int, default=0)
    g.add_argument("--adafactor", action="store_true")
    g.add_argument("--train_batch_size", type=int, default=32)
    g.add_argument("--eval_batch_size", type=int, default=32)
    g.add_argument("--num_beams", type=int, default=1, help="beam size for validation generation")
    g.add_argument("--metrics", type=parse_metrics, default=("em", "f1"),
                   help="validation and test metrics, e.g. em,f1,rouge_l,bleu (em and f1 always)")  # fmt: skip
    g.add_argument("--early_stopping_patience", type=int, default=-1, help="-1 disables; counts validations")
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--logger_name", choices=["default", "wandb", "wandb_shared"], default="default")


def add_retriever_specific_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("retrieval and index refresh")
    g.add_argument("--index_name", default="custom", help="only `custom` (your own KB) is supported")
    g.add_argument("--passages_path", default=DUMMY_KB[0])
    g.add_argument("--index_path", default=DUMMY_KB[1])
    g.add_argument("--distributed_retriever", choices=["ray", "pytorch"], default="ray")
    g.add_argument("--use_dummy_dataset", type=str2bool, default=False,
                   help="true: the bundled dummy KB (the default paths); refused with other paths")  # fmt: skip
    g.add_argument("--indexing_freq", type=int, default=None, help="refresh the KB every N optimizer steps")
    g.add_argument("--index_workers", type=int, default=None,
                   help="encoding actors (default: max(1, ceil(index_gpus)))")  # fmt: skip
    g.add_argument("--index_gpus", type=float, default=0,
                   help="GPUs for the encoding actors, shared among them; 0 encodes on CPU. A fraction (e.g. 0.5) "
                   "lets one actor share a GPU with training")  # fmt: skip
    g.add_argument("--index_cpus", type=int, default=1,
                   help="torch threads of each CPU encoding actor in asynchronous refreshes (those of "
                   "--refresh_before_validation, which training waits for, take every core)")  # fmt: skip
    add_index_args(g)
    g.add_argument("--encode_batch_size", type=int, default=64)
    g.add_argument("--refresh_before_validation", action="store_true",
                   help="re-encode the KB with the current weights (training waits) before every validation, so "
                   "validation, the checkpoint and the test pass use an index that is not stale")  # fmt: skip
    g.add_argument("--max_refresh_failures", type=int, default=3,
                   help="stop the run after this many KB refreshes in a row fail")  # fmt: skip
    g.add_argument("--keep_kb_versions", type=int, default=3,
                   help="refreshed versions kept in OUTPUT/kb (plus those checkpoints use); 0 keeps all")  # fmt: skip
    g.add_argument("--csv_path", default=None, help="accepted for compatibility; refreshes re-encode --passages_path")
    g.add_argument("--shard_dir", default=None, help="accepted for compatibility; shards travel through Ray")
    g.add_argument("--gpu_order", default=None, help="accepted for compatibility; Ray places encoders")

    g = parser.add_argument_group("ray")
    g.add_argument("--ray_address", "--ray-address", default=None,
                   help="join this Ray cluster (e.g. auto); default: start a local Ray on loopback")  # fmt: skip
    g.add_argument("--ray_namespace", default="rag", help="prefix of this run's Ray namespace, RAY_NAMESPACE-RUN_ID")
    g.add_argument("--run_id", default=None, help="names this run's Ray actors (default: new for every run); give "
                   "every node of a multi-node run the same one")  # fmt: skip
    g.add_argument("--num_retrieval_workers", type=int, default=1)
    g.add_argument("--retrieval_threads", type=int, default=None,
                   help="FAISS threads of each retrieval actor (default: every core of its machine, divided among "
                   "the --index_shards; training waits for every search)")  # fmt: skip
    g.add_argument("--index_shards", type=int, default=1,
                   help="S > 1: S retrieval actors each hold 1/S of the passages and build their own index over "
                   "them (with the index flags) when a KB version loads; a query fans out to every shard and the "
                   "results are merged exactly (top-k by score). Ray's scheduler places the actors, so with "
                   "--ray_address the shards spread over the cluster's machines. One replica per shard: not with "
                   "--num_retrieval_workers > 1")  # fmt: skip
    g.add_argument("--distributed-port", dest="distributed_port", type=int, default=-1, help="unused")


def add_trainer_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("trainer (passed to pytorch_lightning.Trainer)")
    g.add_argument("--do_train", action="store_true")
    g.add_argument("--do_predict", action="store_true", help="test the best checkpoint after training")
    g.add_argument("--no_test_loss", action="store_true",
                   help="skip test_loss (a forward pass as long as generating): EM/F1 and retrieval only")  # fmt: skip
    g.add_argument("--validate_before_training", action="store_true", help="one validation of the untrained model")
    g.add_argument("--trainer_threads", type=int, default=None,
                   help="torch threads of each training process (default: torch's, every core); with --index_cpus "
                   "a CPU budget that does not oversubscribe the cores")  # fmt: skip
    g.add_argument("--accelerator", default=None, help="cpu, gpu, auto (default: gpu if --gpus > 0, else auto)")
    g.add_argument("--devices", default=None, help="number of devices or a list (default: auto / --gpus)")
    g.add_argument("--gpus", type=int, default=None, help="shorthand for --accelerator gpu --devices N")
    g.add_argument("--num_nodes", type=int, default=1)
    g.add_argument("--strategy", default="auto")
    g.add_argument("--precision", default=None, help="e.g. 32, bf16-mixed, 16-mixed")
    g.add_argument("--fp16", action="store_true", help="16-bit mixed precision on GPUs")
    g.add_argument("--fp16_opt_level", default="O2", help="unused (apex)")
    g.add_argument("--n_tpu_cores", dest="tpu_cores", type=int, default=None, help="unused")
    g.add_argument("--num_train_epochs", "--max_epochs", dest="max_epochs", type=int, default=3)
    g.add_argument("--max_steps", type=int, default=-1)
    g.add_argument("--val_check_interval", type=float, default=1.0,
                   help="fraction of an epoch (<=1) or a number of batches (>1)")  # fmt: skip
    g.add_argument("--check_val_every_n_epoch", type=int, default=1)
    g.add_argument("--limit_train_batches", type=float, default=1.0)
    g.add_argument("--limit_val_batches", type=float, default=1.0)
    g.add_argument("--num_sanity_val_steps", type=int, default=2)
    g.add_argument("--log_every_n_steps", type=int, default=10)
    g.add_argument("--gradient_accumulation_steps", "--accumulate_grad_batches", dest="accumulate_grad_batches",
                   type=int, default=1)  # fmt: skip
    g.add_argument("--max_grad_norm", "--gradient_clip_val", dest="gradient_clip_val", type=float, default=1.0)
    g.add_argument("--profile", action="store_true", help="attach Lightning's simple profiler")
    g.add_argument("--resume_from_checkpoint", default=None, help="a Lightning .ckpt to resume from")
    g.add_argument("--resume", action="store_true", help="continue the run in --output_dir from its last.ckpt")
    g.add_argument("--overwrite_output_dir", action="store_true",
                   help="train into an earlier run's output dir; its files move to OUTPUT/previous_runs/")  # fmt: skip
    g.add_argument("--save_last_every_n_steps", type=int, default=50,
                   help="write OUTPUT/last.ckpt (the resume point) every N optimizer steps and at the end")  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_specific_args(parser)
    add_retriever_specific_args(parser)
    add_trainer_args(parser)
    args = parser.parse_args(argv)
    for flag in ("gpu_order", "shard_dir", "csv_path", "tpu_cores"):
        if getattr(args, flag) is not None:
            warnings.warn(f"--{flag} has no effect here (Ray places and ships the KB shards)", stacklevel=1)
    if args.distributed_retriever != "ray":
        warnings.warn("--distributed_retriever pytorch: retrieval always runs in Ray actors", stacklevel=1)
    if args.index_name != "custom":
        parser.error(f"--index_name {args.index_name}: only custom (your own KB, with --passages_path) is supported")
    if args.use_dummy_dataset and (args.passages_path, args.index_path) != DUMMY_KB:
        parser.error("--use_dummy_dataset true selects the bundled dummy KB (test_run/dummy-kb); it conflicts with "
                     f"--passages_path {args.passages_path} --index_path {args.index_path}")  # fmt: skip
    if args.retrieval_temperature is not None and args.retrieval_temperature <= 0:
        parser.error(f"--retrieval_temperature must be positive, got {args.retrieval_temperature}")
    if args.indexing_freq is not None and args.indexing_freq < 1:
        parser.error(f"--indexing_freq must be >= 1 (optimizer steps between refreshes), got {args.indexing_freq}")
    if args.end2end and args.training_mode not in (None, "rag_end2end"):
        parser.error(
            f"--end2end is --training_mode rag_end2end; it conflicts with --training_mode {args.training_mode}"
        )
    args.training_mode = args.training_mode or ("rag_end2end" if args.end2end else "rag_original")
    args.end2end = args.training_mode == "rag_end2end"
    refreshes = make_objective(args).refreshes
    if args.indexing_freq and not refreshes:
        warnings.warn(f"--indexing_freq: --training_mode {args.training_mode} keeps the context encoder frozen, so "
                      "the KB is never refreshed", stacklevel=1)  # fmt: skip
    if refreshes and not args.indexing_freq:
        warnings.warn(f"--training_mode {args.training_mode} without --indexing_freq: the KB is never re-encoded "
                      "while the context encoder learns", stacklevel=1)  # fmt: skip
    if args.lm_temperature <= 0 or args.hard_negatives < 0 or args.rerank_top < 0:
        parser.error("--lm_temperature must be positive, --hard_negatives and --rerank_top >= 0")
    if args.index_shards < 1:
        parser.error(f"--index_shards must be >= 1, got {args.index_shards}")
    if args.index_shards > 1 and args.num_retrieval_workers > 1:
        parser.error(f"--index_shards {args.index_shards} serves one replica of each shard: it cannot be combined "
                     f"with --num_retrieval_workers {args.num_retrieval_workers}")  # fmt: skip
    if args.max_refresh_failures < 1 or args.save_last_every_n_steps < 1:
        parser.error("--max_refresh_failures and --save_last_every_n_steps must be >= 1")
    if args.init_from:
        if args.model_name_or_path:
            parser.error("--init_from and --model_name_or_path both name the model to start from: give one")
        saved = Path(args.init_from) / "kb_version.json"
        if not (Path(args.init_from) / SETTINGS_FILE).is_file() or not saved.is_file():
            parser.error(f"--init_from {args.init_from}: not a checkpoint<step> directory of finetune_rag.py "
                         f"(it needs {SETTINGS_FILE} and kb_version.json)")  # fmt: skip
        kb = json.loads(saved.read_text())
        args.passages_path, args.index_path = kb["passages_path"], kb["index_path"]
    # Ray actors run in other working directories (on other machines, with --ray_address): absolute paths only.
    for name in ("passages_path", "index_path", "output_dir", "data_dir", *(["init_from"] if args.init_from else [])):
        setattr(args, name, os.path.abspath(getattr(args, name)))
    args.run_id = resolve_run_id(args.run_id)
    if args.index_workers is None:
        args.index_workers = max(1, math.ceil(args.index_gpus))
    val = args.val_check_interval
    args.val_check_interval = int(val) if val > 1 else val
    return args


def trainer_kwargs(args: argparse.Namespace) -> dict:
    """Translate the reference's flags (--gpus, --fp16, --profile) to Lightning 2 Trainer arguments."""
    accelerator, devices = args.accelerator, args.devices
    if args.gpus is not None:
        accelerator = accelerator or ("gpu" if args.gpus > 0 else "cpu")
        devices = devices or max(args.gpus, 1)
    accelerator = accelerator or "auto"
    if isinstance(devices, str):
        devices = int(devices) if devices.isdigit() else devices
    precision = args.precision
    if args.fp16 and precision is None:
        if accelerator == "gpu" or (accelerator == "auto" and torch.cuda.is_available()):
            precision = "16-mixed"
        else:
            warnings.warn("--fp16 ignored: 16-bit mixed precision needs a GPU", stacklevel=1)
    return {
        "accelerator": accelerator,
        "devices": devices or "auto",
        "num_nodes": args.num_nodes,
        "strategy": args.strategy,
        "precision": precision or "32-true",
        "max_epochs": args.max_epochs,
        "max_steps": args.max_steps,
        "val_check_interval": args.val_check_interval,
        "check_val_every_n_epoch": args.check_val_every_n_epoch,
        "limit_train_batches": args.limit_train_batches,
        "limit_val_batches": args.limit_val_batches,
        "num_sanity_val_steps": args.num_sanity_val_steps,
        "log_every_n_steps": args.log_every_n_steps,
        "accumulate_grad_batches": args.accumulate_grad_batches,
        "gradient_clip_val": args.gradient_clip_val,
        "profiler": "simple" if args.profile else None,
    }


def build_loggers(args: argparse.Namespace) -> list:
    loggers = [TensorBoardLogger(args.output_dir, name="logs"), CSVLogger(args.output_dir, name="logs")]
    if args.logger_name.startswith("wandb"):
        from pytorch_lightning.loggers import WandbLogger  # needs `pip install wandb`

        project = "rag-end2end" if args.logger_name == "wandb_shared" else f"rag-{Path(args.output_dir).name}"
        loggers.append(WandbLogger(project=project, save_dir=args.output_dir))
    return loggers


def main(args: argparse.Namespace) -> GenerativeQAModule:
    """Train and/or test as the flags say, holding --output_dir's lock throughout."""
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
        Seq2SeqLoggingCallback(),
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
            )
        )
    trainer = pl.Trainer(
        **trainer_kwargs(args), callbacks=callbacks, logger=build_loggers(args), default_root_dir=args.output_dir
    )
    start = time.perf_counter()
    if args.do_train:
        if args.validate_before_training:  # the untrained score, logged at step 0 beside the later ones
            trainer.validate(model)
        trainer.fit(model, ckpt_path=args.resume_from_checkpoint)
    train_seconds = time.perf_counter() - start
    if args.do_predict:
        best = callbacks[0].best_model_path if args.do_train else ""
        trainer.test(model, ckpt_path=best or None)
    if args.do_train and trainer.is_global_zero:  # PNG curves in OUTPUT/plots; warns, never raises
        plot_runs([args.output_dir], Path(args.output_dir) / "plots")
        refresh = next((c for c in callbacks if isinstance(c, KBRefreshCallback)), None)
        info = {"training_mode": args.training_mode, "trains": list(model.objective.trains),
                "train_seconds": train_seconds, "refreshes": len(refresh.history) if refresh else 0}  # fmt: skip
        (Path(args.output_dir) / "run_info.json").write_text(json.dumps(info, indent=1))
    return model


if __name__ == "__main__":
    main(parse_args())
    if ray.is_initialized():
        ray.shutdown()
