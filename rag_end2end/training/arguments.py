"""finetune_rag.py's flags checked against what they name (the recipe, the checkpoint to start from, the GPUs,
FAISS's build) before any work, and translated to Lightning's Trainer arguments. The flags themselves, and
the checks that need nothing else, are in rag_end2end/options.py."""

from __future__ import annotations

import argparse
import inspect
import math
import os
import warnings
from datetime import timedelta
from pathlib import Path

import torch
from datasets import load_from_disk
from lightning_fabric.utilities.device_parser import _normalize_parse_gpu_string_input
from pytorch_lightning.strategies import StrategyRegistry

from rag_end2end.data.mixing import check_masks_in_kb, read_reconstruction
from rag_end2end.data.qa_dataset import read_pairs
from rag_end2end.data.readers import REFUSALS, InputError, check_gold_ids, read_gold
from rag_end2end.kb.faiss_devices import forced_gpu_refusal
from rag_end2end.kb.ray_start import GpuPlan, plan_gpus
from rag_end2end.kb.refresh_policy import RefreshPolicy
from rag_end2end.kb.versions import KB_VERSION_FILE, checkpoint_kb
from rag_end2end.model.rag import SETTINGS_FILE
from rag_end2end.options import DUMMY_KB, build_parser
from rag_end2end.precision import native_bf16
from rag_end2end.recipes import make_objective
from rag_end2end.training.run_dir import resolve_run_id


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """finetune_rag.py's flags, checked: a setting that cannot work stops here with one line (exit 2)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for flag in ("gpu_order", "shard_dir", "csv_path", "tpu_cores"):
        if getattr(args, flag) is not None:
            warnings.warn(f"--{flag} has no effect here (Ray places and ships the KB shards)", stacklevel=1)
    if args.distributed_retriever != "ray":
        warnings.warn("--distributed_retriever pytorch: retrieval always runs in Ray actors", stacklevel=1)
    if args.index_name != "custom":
        parser.error(f"--index_name {args.index_name}: only custom (your own KB, with --passages_path) is supported")
    if args.use_dummy_dataset and (args.passages_path, args.index_path) != DUMMY_KB:
        parser.error(
            "--use_dummy_dataset true selects the bundled dummy KB (test_run/dummy-kb); it conflicts with "
            f"--passages_path {args.passages_path} --index_path {args.index_path}"
        )
    if args.retrieval_temperature is not None and args.retrieval_temperature <= 0:
        parser.error(f"--retrieval_temperature must be positive, got {args.retrieval_temperature}")
    if args.indexing_freq is not None and args.indexing_freq < 1:
        parser.error(f"--indexing_freq must be >= 1 (optimizer steps between refreshes), got {args.indexing_freq}")
    if args.staleness_sample < 0:
        parser.error(f"--staleness_sample must be >= 0 (passages; 0 measures nothing), got {args.staleness_sample}")
    if args.refresh_slices < 2 or args.full_refresh_every < 0 or not 0 <= args.hot_random_share <= 1:
        parser.error(
            f"--refresh_slices must be >= 2 (got {args.refresh_slices}), --full_refresh_every >= 0 (got "
            f"{args.full_refresh_every}), --hot_random_share between 0 and 1 (got {args.hot_random_share:g})"
        )
    if args.hot_neighbours < 0:
        parser.error(
            f"--hot_neighbours must be >= 0 (neighbours of each retrieved passage; 0: none), got {args.hot_neighbours}"
        )
    if args.end2end and args.training_mode not in (None, "rag_end2end"):
        parser.error(
            f"--end2end is --training_mode rag_end2end; it conflicts with --training_mode {args.training_mode}"
        )
    args.training_mode = args.training_mode or ("rag_end2end" if args.end2end else "rag_original")
    args.end2end = args.training_mode == "rag_end2end"
    refreshes = make_objective(args).refreshes
    if args.indexing_freq and not refreshes:
        warnings.warn(
            f"--indexing_freq: --training_mode {args.training_mode} keeps the context encoder frozen, so "
            "the KB is never refreshed",
            stacklevel=1,
        )
    if refreshes and not args.indexing_freq:
        warnings.warn(
            f"--training_mode {args.training_mode} without --indexing_freq: the KB is never re-encoded "
            "while the context encoder learns",
            stacklevel=1,
        )
    for flag in ("learning_rate", "retriever_learning_rate", "temperature_learning_rate"):
        rate = getattr(args, flag)
        if rate is not None and not rate >= 0:  # NaN too
            parser.error(f"--{flag} must be >= 0, got {rate:g}")
        if rate == 0:
            warnings.warn(f"--{flag} 0: the parts it sets do not learn (the run only validates them)", stacklevel=1)
    if args.gradient_checkpointing and args.retriever_dropout == "off":
        warnings.warn(
            "--gradient_checkpointing with --retriever_dropout off: the encoders train in eval mode, where "
            "transformers checkpoints nothing, so they keep their activations; the generator's are recomputed",
            stacklevel=1,
        )
    if args.lm_temperature <= 0 or args.hard_negatives < 0 or args.rerank_top < 0:
        parser.error("--lm_temperature must be positive, --hard_negatives and --rerank_top >= 0")
    if args.retrieval_timeout <= 0:
        parser.error(f"--retrieval_timeout must be positive, got {args.retrieval_timeout}")
    if args.index_shards < 1:
        parser.error(f"--index_shards must be >= 1, got {args.index_shards}")
    if refusal := forced_gpu_refusal(args.faiss_gpu, args.index_gpus):
        parser.error(refusal)
    if args.index_shards > 1 and args.num_retrieval_workers > 1:
        parser.error(
            f"--index_shards {args.index_shards} serves one replica of each shard: it cannot be combined "
            f"with --num_retrieval_workers {args.num_retrieval_workers}"
        )
    if args.max_refresh_failures < 1 or args.save_last_every_n_steps < 1:
        parser.error("--max_refresh_failures and --save_last_every_n_steps must be >= 1")
    if args.init_from:
        if args.model_name_or_path:
            parser.error("--init_from and --model_name_or_path both name the model to start from: give one")
        saved = Path(args.init_from) / KB_VERSION_FILE
        if not (Path(args.init_from) / SETTINGS_FILE).is_file() or not saved.is_file():
            parser.error(
                f"--init_from {args.init_from}: not a checkpoint<step> directory of finetune_rag.py "
                f"(it needs {SETTINGS_FILE} and {KB_VERSION_FILE})"
            )
        args.passages_path, args.index_path = checkpoint_kb(args.init_from)  # relative to it, when inside its run
    # Ray actors run in other working directories (on other machines, with --ray_address): absolute paths only.
    for name in (
        "passages_path",
        "index_path",
        "output_dir",
        "data_dir",
        *(["init_from"] if args.init_from else []),
        *(["reconstruction_dir"] if args.reconstruction_dir else []),
    ):
        setattr(args, name, os.path.abspath(getattr(args, name)))
    if refusal := reconstruction_refusal(args):
        parser.error(refusal)
    args.run_id = resolve_run_id(args.run_id)
    if args.index_workers is None:
        args.index_workers = max(1, math.ceil(args.index_gpus))
    if args.ddp_timeout <= 0:
        parser.error(f"--ddp_timeout must be positive, got {args.ddp_timeout:g}")
    try:
        gpu_plan(args)  # refuses GPUs that are not there, or shares Ray cannot place, before any work
    except ValueError as err:
        parser.error(str(err))
    val = args.val_check_interval
    args.val_check_interval = int(val) if val > 1 else val
    return args


def reconstruction_refusal(args: argparse.Namespace) -> str | None:
    """Why the statement-reconstruction flags cannot work (one line), or None: --reconstruction_ratio in (0, 1] and
    given with --reconstruction_dir only, --mask_probability in [0, 1], the directory's training files there and
    line-aligned, each mask's sentence in its passage of the KB (when the KB is there to read)."""
    ratio, directory = args.reconstruction_ratio, args.reconstruction_dir
    if not 0 <= args.mask_probability <= 1:
        return f"--mask_probability must be in [0, 1], got {args.mask_probability:g}"
    if directory is None:
        if ratio is not None:
            return "--reconstruction_ratio needs --reconstruction_dir (the statements to mix in)"
        if args.mask_probability != 1:
            warnings.warn("--mask_probability has no effect without --reconstruction_dir", stacklevel=2)
        return None
    if ratio is None:
        return (
            f"--reconstruction_dir {directory}: give --reconstruction_ratio, the share of training batches that "
            "are statements (0 < R <= 1; 1: the documents only)"
        )
    if not 0 < ratio <= 1:
        return (
            f"--reconstruction_ratio must be in (0, 1] (the share of training batches that are statements), got "
            f"{ratio:g}"
        )
    if ratio < 1 and Path(args.data_dir) == Path(directory):
        return (
            f"--data_dir is the --reconstruction_dir {directory}: its train split is statements, not QA pairs to mix "
            "them with; train on them alone with --reconstruction_ratio 1"
        )
    try:
        gold = read_reconstruction(directory)
        if Path(args.passages_path).is_dir():  # else the KB's own check names it, later
            check_masks_in_kb(
                gold.masks,
                load_from_disk(args.passages_path),
                Path(directory) / "train.gold.jsonl",
                f"--passages_path {args.passages_path}",
            )
    except REFUSALS as err:
        return str(err)
    return None


def check_data_dir(args: argparse.Namespace) -> None:
    """Every split the run will read exists and reads (UTF-8, no empty line, .source and .target line-aligned, not
    empty), and so does each gold file beside them (one line a question, each gold passage a row of the KB), before
    Ray or a model starts and before hours of training reach the test pass (no QA training pairs when statements are
    all a run trains on: --reconstruction_ratio 1). A partial --refresh_policy needs no more --refresh_slices than
    the KB has passages."""
    documents_only = args.reconstruction_dir is not None and args.reconstruction_ratio == 1
    train = [] if documents_only else ["train"]
    splits = [*([*train, "val"] if args.do_train else []), *(["test"] if args.do_predict else [])]
    names = [f"{split}.{ext}" for split in splits for ext in ("source", "target")]
    missing = [name for name in names if not (Path(args.data_dir) / name).is_file()]
    if missing:
        raise FileNotFoundError(f"--data_dir {args.data_dir} lacks {', '.join(missing)}")
    for split in splits:
        read_pairs(args.data_dir, split)
    kb_size = len(load_from_disk(args.passages_path)) if Path(args.passages_path).is_dir() else None
    if kb_size is not None:
        RefreshPolicy(args.refresh_policy, args.refresh_slices).check_kb(
            kb_size, f"--passages_path {args.passages_path}"
        )
    for split in ("train", "val", "test"):  # the module reads every gold file there is (GenerativeQAModule.gold)
        gold_path = Path(args.data_dir) / f"{split}.gold.jsonl"
        if not gold_path.is_file():
            continue
        gold, questions = read_gold(str(gold_path), "jsonl"), read_pairs(args.data_dir, split)[0]
        if len(gold.answers) != len(questions):
            raise InputError(
                f"{gold_path} has {len(gold.answers)} lines but {Path(args.data_dir) / split}.source has "
                f"{len(questions)}: one line a question"
            )
        if kb_size is not None:
            check_gold_ids(gold, gold_path, kb_size, f"--passages_path {args.passages_path}")


def lightning_devices(args: argparse.Namespace) -> tuple[str, int | str]:
    """(accelerator, devices) for Lightning's Trainer, from --accelerator, --devices and the reference's --gpus."""
    accelerator, devices = args.accelerator, args.devices
    if args.gpus is not None:
        accelerator = accelerator or ("gpu" if args.gpus > 0 else "cpu")
        devices = devices or max(args.gpus, 1)
    if isinstance(devices, str):
        devices = int(devices) if devices.isdigit() else devices
    return accelerator or "auto", devices or "auto"


def training_gpus(accelerator: str, devices: int | str, visible: int) -> tuple[int, ...]:
    """Positions (cuda:i) of the GPUs Lightning trains on with these Trainer arguments, of `visible` GPUs: N means
    the first N, "auto" or -1 all, "1,3" those; () when it trains on CPU."""
    if accelerator not in ("gpu", "cuda", "auto") or (accelerator == "auto" and visible == 0):
        return ()
    wanted = -1 if devices == "auto" else _normalize_parse_gpu_string_input(devices)  # Lightning's own parsing
    if wanted == -1:
        return tuple(range(visible))
    return tuple(range(wanted)) if isinstance(wanted, int) else tuple(wanted)


def gpu_plan(args: argparse.Namespace) -> GpuPlan:
    """Which of this machine's GPUs train and which the encoding actors get (distributed_ray_retriever.plan_gpus);
    ValueError, one line naming the flags, when they do not fit. With --ray_address the encoding actors' GPUs are
    the cluster's: only the shares are checked here, the GPUs when Ray is joined (kb_refresh.check_placeable)."""
    accelerator, devices = lightning_devices(args)
    visible = torch.cuda.device_count()
    train = training_gpus(accelerator, devices, visible)
    if args.gpus is not None:
        flags = f"--gpus {args.gpus}"
    else:
        flags = f"--devices {args.devices}" if args.devices is not None else f"--accelerator {accelerator}"
    return plan_gpus(None if args.ray_address else visible, train, args.index_gpus, args.index_workers, flags)


def ddp_strategy(args: argparse.Namespace, accelerator: str, devices: int | str) -> object:
    """--strategy for Lightning, as an instance with --ddp_timeout as its collectives' timeout when it is a DDP (or
    other process-group) strategy: "auto" over several processes is Lightning's "ddp", built here so that it takes
    the timeout. Lightning's default (torch's, 30 minutes) is shorter than rank 0's longest wait for the Ray actors."""
    name = args.strategy
    gpus = training_gpus(accelerator, devices, torch.cuda.device_count())
    processes = len(gpus) if gpus else devices if isinstance(devices, int) else 1
    if name == "auto" and processes * args.num_nodes > 1:
        name = "ddp"  # Lightning's choice for several processes launched from a script
    if name not in StrategyRegistry:
        return name  # "auto" on one process, or a name Lightning resolves (and refuses) itself
    entry = StrategyRegistry[name]  # the class and the settings the name stands for (e.g. find_unused_parameters)
    if "timeout" not in inspect.signature(entry["strategy"]).parameters:
        return name
    return entry["strategy"](**entry["init_params"], timeout=timedelta(seconds=args.ddp_timeout))


def trainer_kwargs(args: argparse.Namespace) -> dict:
    """Translate the reference's flags (--gpus, --fp16, --profile) to Lightning 2 Trainer arguments."""
    accelerator, devices = lightning_devices(args)
    precision = args.precision
    if args.fp16 and precision is None:
        if accelerator == "gpu" or (accelerator == "auto" and torch.cuda.is_available()):
            precision = "16-mixed"
        else:
            warnings.warn("--fp16 ignored: 16-bit mixed precision needs a GPU", stacklevel=1)
    on_gpu = accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available()
    if str(precision).startswith("bf16") and on_gpu and not native_bf16():
        warnings.warn(
            f"--precision {precision}: this GPU has no native bf16 (compute capability below 8.0) and would "
            "emulate it, at a fraction of fp16's speed: use --precision 16-mixed",
            stacklevel=1,
        )
    return {
        "accelerator": accelerator,
        "devices": devices or "auto",
        "num_nodes": args.num_nodes,
        "strategy": ddp_strategy(args, accelerator, devices),
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
