"""The command line of finetune_rag.py: every flag (the reference's names kept, with the ones Ray makes moot
accepted with a warning) and the names each choice may take.

A leaf: it imports nothing of the project, so that any module can read its choices here (a recipe's name, a
LoRA target, a metric) without importing the command line's checks. The checks that need the model, the KB or
the machine, and the translation to Lightning's Trainer, are in training/arguments.py."""

from __future__ import annotations

import argparse

USAGE = """Fine-tune RAG end to end: question encoder, context encoder and generator learn together while
Ray actors re-encode the knowledge base and rebuild its FAISS index in the background.

    python finetune_rag.py --model_name_or_path facebook/rag-token-base --model_type rag_token \\
        --passages_path KB/my_knowledge_dataset --index_path KB/my_knowledge_dataset_hnsw_index.faiss \\
        --data_dir DATA --output_dir OUT --do_train --training_mode rag_end2end --indexing_freq 500

--training_mode picks the recipe (rag_end2end/recipes.py): rag_end2end, rag_original, retriever_only, dalm, lsr
or ralt; --end2end is rag_end2end's old name.
"""

MODEL_TYPES = ("rag_token", "rag_sequence")  # the generator's marginal: RAG-token or RAG-sequence
MODEL_FLAGS = (  # the flags that name a model (a hub name or a directory)
    "model_name_or_path",
    "question_encoder_name_or_path",
    "generator_name_or_path",
    "context_encoder_name",
    "tokenizer_name",
    "context_encoder_tokenizer_name",
)
RECIPES = ("rag_end2end", "rag_original", "retriever_only", "dalm", "lsr", "ralt")  # recipes.MODES, in this order
SCHEDULERS = {
    "linear": "linear",
    "cosine": "cosine",
    "cosine_w_restarts": "cosine_with_restarts",
    "polynomial": "polynomial",
}
PEFT_CHOICES = ("none", "generator", "retriever", "both")
FAISS_GPU_MODES = ("auto", "off", "replicate", "shard")
REFRESH_POLICIES = ("full", "rotating", "hot")  # which passages a refresh re-encodes: kb.refresh_policy
# How questions and passages are scored: dot product, cosine (unit-length vectors) or l2 (negative squared distance)
SIMILARITIES = ("dot", "cosine", "l2")
DDP_TIMEOUT_S = 7200.0  # --ddp_timeout's default: 2 h, four times torch's; docs/gpus.md says how to size it
GENERATION_METRICS = ("em", "f1", "rouge_l", "bleu")
DUMMY_KB = ("test_run/dummy-kb/my_knowledge_dataset", "test_run/dummy-kb/my_knowledge_dataset_hnsw_index.faiss")


def str2bool(value: str) -> bool:
    if value.lower() in {"1", "true", "yes", "y"}:
        return True
    if value.lower() in {"0", "false", "no", "n"}:
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {value!r}")


def parse_metrics(value: str) -> tuple[str, ...]:
    """The `--metrics` names (comma-separated) in GENERATION_METRICS order; em and f1 are always computed."""
    names = {name.strip() for name in value.split(",") if name.strip()}
    unknown = sorted(names - set(GENERATION_METRICS))
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown metric(s) {', '.join(map(repr, unknown))} in --metrics {value!r}; "
            f"choose from {', '.join(GENERATION_METRICS)}"
        )
    return tuple(name for name in GENERATION_METRICS if name in names or name in ("em", "f1"))


def add_index_args(parser) -> None:
    """The index flags of every script that builds one (use_own_knowledge_dataset.py, finetune_rag.py's refresh)."""
    parser.add_argument("--index_type", choices=["flat", "hnsw"], default="hnsw")
    parser.add_argument(
        "--hnsw_m", "--m", type=int, default=32, help="HNSW links per node (the reference: 128, slower and no better)"
    )
    parser.add_argument("--hnsw_ef_construction", type=int, default=200)
    parser.add_argument("--hnsw_ef_search", type=int, default=128)
    parser.add_argument(
        "--index_factory",
        default=None,
        help='any faiss.index_factory string, e.g. "HNSW32,Flat" or "IVF4096,PQ64" (replaces '
        "--index_type; bench/README.md compares them)",
    )
    parser.add_argument(
        "--index_train_size",
        type=int,
        default=100_000,
        help="IVF/PQ indexes are trained on a random sample of this many passages at most",
    )
    parser.add_argument(
        "--index_search_params",
        default=None,
        help='faiss search parameters stored in the index, e.g. "nprobe=32" for IVF',
    )


def add_debug_arg(parser) -> None:
    parser.add_argument("--debug", action="store_true", help="show the traceback of a refusal, not one line")


def add_model_specific_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model")
    g.add_argument("--model_name_or_path", default=None, help="RAG checkpoint: hub name or local directory")
    g.add_argument(
        "--question_encoder_name_or_path",
        default=None,
        help="with --generator_name_or_path, assemble a RAG model instead of loading one",
    )
    g.add_argument("--generator_name_or_path", default=None)
    g.add_argument("--model_type", choices=MODEL_TYPES, required=True)
    g.add_argument(
        "--generator_type",
        choices=["seq2seq", "causal"],
        default="seq2seq",
        help="causal: any AutoModelForCausalLM, with RAG marginalisation over the retrieved passages",
    )
    g.add_argument(
        "--prompt_template",
        default=None,
        help="causal prompt with {title} {text} {question}; default: the chat template if any",
    )
    g.add_argument("--config_name", default="", help="accepted for compatibility; the model's own config is used")
    g.add_argument(
        "--tokenizer_name", default=None, help="accepted for compatibility; each part's own tokenizer is used"
    )
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
        choices=SIMILARITIES,
        default=None,
        help="how questions and passages are scored (cosine: L2-normalised vectors; l2: negative squared "
        "Euclidean distance, FAISS IndexFlatL2 and L2 indexes); default: what the encoder checkpoints declare "
        "(sentence-transformers' Normalize, pooling.json), else dot",
    )
    g.add_argument(
        "--retrieval_temperature",
        type=float,
        default=None,
        help="doc scores = similarity / tau before RAG's softmax over passages; default: the question "
        "encoder checkpoint's, else 1 for dot and l2 and 0.05 for cosine",
    )
    g.add_argument("--learn_temperature", action="store_true", help="learn tau (as log tau) with the model")
    g.add_argument("--temperature_learning_rate", type=float, default=1e-2, help="learning rate of the learned log tau")
    g.add_argument("--n_docs", type=int, default=None, help="passages per question (default: the config's)")
    g.add_argument("--prefix", default=None)
    g.add_argument("--max_combined_length", type=int, default=None, help="passage + question tokens for the generator")
    for name in ("encoder_layerdrop", "decoder_layerdrop", "dropout", "attention_dropout"):
        g.add_argument(f"--{name}", type=float, default=None, help="set in the generator config")
    g.add_argument("--label_smoothing", type=float, default=0.0)

    g = parser.add_argument_group("training recipe (training_modes.py)")
    g.add_argument(
        "--training_mode",
        choices=sorted(RECIPES),
        default=None,
        help="what trains and with which loss (docs/recipes.md); default rag_original, or rag_end2end with --end2end",
    )
    g.add_argument(
        "--query_side_only",
        action="store_true",
        help="freeze the context encoder of any recipe: the KB never goes stale, no refresh",
    )
    g.add_argument(
        "--hard_negatives",
        type=int,
        default=0,
        help="retriever_only/dalm: negatives per question mined from the live index (top-ranked "
        "passages that are not gold and hold no answer)",
    )
    g.add_argument("--symmetric_infonce", action="store_true", help="InfoNCE in both directions (q->p and p->q)")
    g.add_argument(
        "--retriever_loss",
        choices=["none", "pdist"],
        default="none",
        help="rag_end2end: add Atlas's perplexity distillation (generator -> retriever)",
    )
    g.add_argument(
        "--lm_temperature",
        type=float,
        default=0.1,
        help="tau_lm of lsr and pdist: softmax(per-token mean answer log-likelihood per passage / "
        "tau_lm); Atlas uses 0.01 (at 1 a 0.5-nat gap gives a near-flat [0.62, 0.38]; at 0.1, "
        "[0.99, 0.01])",
    )
    g.add_argument(
        "--init_from",
        default=None,
        help="start from a checkpoint<step> of an earlier run, of any recipe (e.g. retriever_only, then "
        "ralt): its parts, and its KB version (the index its encoders were trained against); parts it "
        "lacks come from the model flags",
    )
    g.add_argument(
        "--peft",
        choices=PEFT_CHOICES,
        default="none",
        help="LoRA adapters (peft) instead of full fine-tuning for the generator, the encoders or both; "
        "checkpoints and KB refreshes use the merged weights",
    )
    g.add_argument("--lora_r", type=int, default=8)
    g.add_argument("--lora_alpha", type=int, default=16)
    g.add_argument("--lora_dropout", type=float, default=0.05)
    g.add_argument(
        "--lora_target_modules",
        default=None,
        help="comma-separated module names (default: peft's per family, e.g. query,value for BERT "
        "encoders, q_proj,v_proj for Llama and BART)",
    )
    g.add_argument(
        "--gradient_checkpointing",
        action="store_true",
        help="recompute each transformer layer's activations in the backward pass instead of keeping them, in "
        "every part that trains (generator, encoders; LoRA too): far less activation memory for about a third "
        "more compute (bench/README.md); the loss and gradients are unchanged",
    )
    g.add_argument(
        "--rerank_top",
        type=int,
        default=0,
        help="fetch L passages from the (stale) index, re-score them with the current context "
        "encoder, keep the top n_docs (Atlas); 0: off",
    )

    g = parser.add_argument_group("data")
    g.add_argument("--data_dir", default="test_run/dummy-train-data", help="holds {train,val,test}.{source,target}")
    g.add_argument("--output_dir", default="test_run/model_checkpoints")
    g.add_argument("--max_source_length", type=int, default=128)
    g.add_argument("--max_target_length", type=int, default=25)
    g.add_argument("--val_max_target_length", type=int, default=25)
    g.add_argument("--test_max_target_length", type=int, default=25)
    for split in ("train", "val", "test"):
        g.add_argument(f"--n_{split}", type=int, default=-1, help="-1: all examples")
    g.add_argument("--num_workers", type=int, default=0, help="DataLoader workers")
    g.add_argument(
        "--reconstruction_dir",
        default=None,
        help="statement reconstruction (Siriwardhana et al. 2023): train.source/.target/.gold.jsonl of "
        "data_prep/make_reconstruction_data.py, whose marked statements train beside the QA pairs: the "
        "retriever fetches passages for a statement, the generator writes it back from them "
        "(docs/recipes.md)",
    )
    g.add_argument(
        "--reconstruction_ratio",
        type=float,
        default=None,
        help="with --reconstruction_dir: the share R of training batches that are statement batches, "
        "0 < R <= 1 (a batch is all QA pairs or all statements, in a seeded order); 1: the documents only, "
        "no QA training pairs needed (--data_dir's val split still validates)",
    )
    g.add_argument(
        "--mask_probability",
        type=float,
        default=1.0,
        help="with --reconstruction_dir: how often a statement is cut out of its own passage wherever the "
        "generator or the in-graph context encoder reads that passage (drawn per statement and step), so "
        "that it is reconstructed, not copied; ORQA's Inverse Cloze Task left it in 10%% of the time "
        "(0.9)",
    )

    g = parser.add_argument_group("optimisation")
    g.add_argument("--learning_rate", type=float, default=5e-5)
    g.add_argument(
        "--retriever_learning_rate",
        type=float,
        default=None,
        help="learning rate of the question and context encoders (Atlas: 1e-5 against the reader's 1e-4; "
        "tau keeps --temperature_learning_rate); default: --learning_rate",
    )
    g.add_argument(
        "--retriever_dropout",
        choices=["on", "off"],
        default="on",
        help="off: the encoders that train run without dropout (eval mode; their gradients flow), so "
        "the FAISS query, the doc scores and the re-encoded passages carry no dropout noise (x 1/tau), "
        "as the stored vectors of rag_original do not",
    )
    g.add_argument("--lr_scheduler", choices=sorted(SCHEDULERS), default="linear")
    g.add_argument("--weight_decay", type=float, default=0.0)
    g.add_argument("--adam_epsilon", type=float, default=1e-8)
    g.add_argument("--warmup_steps", type=int, default=0)
    g.add_argument("--adafactor", action="store_true")
    g.add_argument("--train_batch_size", type=int, default=32)
    g.add_argument("--eval_batch_size", type=int, default=32)
    g.add_argument("--num_beams", type=int, default=1, help="beam size for validation generation")
    g.add_argument(
        "--metrics",
        type=parse_metrics,
        default=("em", "f1"),
        help="validation and test metrics, e.g. em,f1,rouge_l,bleu (em and f1 always)",
    )
    g.add_argument("--early_stopping_patience", type=int, default=-1, help="-1 disables; counts validations")
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--logger_name", choices=["default", "wandb", "wandb_shared"], default="default")


def add_retriever_specific_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("retrieval and index refresh")
    g.add_argument("--index_name", default="custom", help="only `custom` (your own KB) is supported")
    g.add_argument("--passages_path", default=DUMMY_KB[0])
    g.add_argument("--index_path", default=DUMMY_KB[1])
    g.add_argument("--distributed_retriever", choices=["ray", "pytorch"], default="ray")
    g.add_argument(
        "--use_dummy_dataset",
        type=str2bool,
        default=False,
        help="true: the bundled dummy KB (the default paths); refused with other paths",
    )
    g.add_argument("--indexing_freq", type=int, default=None, help="refresh the KB every N optimizer steps")
    g.add_argument(
        "--index_workers", type=int, default=None, help="encoding actors (default: max(1, ceil(index_gpus)))"
    )
    g.add_argument(
        "--index_gpus",
        type=float,
        default=0,
        help="GPUs for the encoding actors, shared among them; 0 encodes on CPU. A fraction (e.g. 0.5) "
        "lets one actor share a GPU with training",
    )
    g.add_argument(
        "--index_cpus",
        type=int,
        default=1,
        help="torch threads of each CPU encoding actor in asynchronous refreshes (those of "
        "--refresh_before_validation, which training waits for, take every core)",
    )
    add_index_args(g)
    g.add_argument(
        "--faiss_gpu",
        choices=FAISS_GPU_MODES,
        default="auto",
        help="FAISS search and IVF/PQ training on the index GPUs (--index_gpus; the retrieval actors and "
        "the index builder then ask Ray for a share beside the encoders). auto: when faiss has GPU "
        "support (faiss-gpu) and a share is left, else CPU; replicate: a copy of the index on each GPU; "
        "shard: 1/n of it on each; off: CPU. HNSW stays on CPU (faiss has no GPU HNSW). "
        "docs/large-kbs.md",
    )
    g.add_argument("--encode_batch_size", type=int, default=64)
    g.add_argument(
        "--refresh_before_validation",
        action="store_true",
        help="re-encode the KB with the current weights (training waits) before every validation, so "
        "validation, the checkpoint and the test pass use an index that is not stale",
    )
    g.add_argument(
        "--reencode_lost_kb",
        action="store_true",
        help="resume even when the checkpoint's KB version is gone, re-encoding the KB with the restored "
        "weights before training goes on (without it, such a resume stops)",
    )
    g.add_argument(
        "--max_refresh_failures", type=int, default=3, help="stop the run after this many KB refreshes in a row fail"
    )
    g.add_argument(
        "--keep_kb_versions",
        type=int,
        default=3,
        help="refreshed versions kept in OUTPUT/kb (plus those checkpoints use); 0 keeps all",
    )
    g.add_argument(
        "--staleness_sample",
        type=int,
        default=256,
        help="at every refresh it starts, measure the live index's drift on this many passages (a seeded sample): "
        "cosine of stored vs current vectors, and validation recall@k/MRR@5 of stale vs fresh vectors; 0: off",
    )
    g.add_argument(
        "--refresh_policy",
        choices=REFRESH_POLICIES,
        default="full",
        help="which passages a refresh re-encodes: full (all); rotating (slice i mod K of the KB at the i-th, so "
        "each passage at most K refreshes old); hot (the passages retrieved for the training questions since the "
        "last refresh, their nearest neighbours in the index, plus a random share). Partial versions keep the other "
        "vectors. docs/refresh.md",
    )
    g.add_argument(
        "--refresh_slices",
        type=int,
        default=4,
        help="K: a rotating or hot refresh re-encodes 1/K of the KB (rounded up)",
    )
    g.add_argument(
        "--hot_random_share",
        type=float,
        default=0.25,
        help="hot: this share of each refresh's budget is drawn at random from the passages not already chosen "
        "(retrieved ones the rest of the budget left out among them)",
    )
    g.add_argument(
        "--hot_neighbours",
        type=int,
        default=2,
        help="hot: after the retrieved passages, each one's M nearest neighbours in the live index (by their stored "
        "vectors), the nearest of each first, while the budget has room; 0: none",
    )
    g.add_argument(
        "--full_refresh_every",
        type=int,
        default=0,
        help="with a rotating or hot policy, every N-th refresh re-encodes the whole KB; 0: never",
    )
    g.add_argument("--csv_path", default=None, help="accepted for compatibility; refreshes re-encode --passages_path")
    g.add_argument("--shard_dir", default=None, help="accepted for compatibility; shards travel through Ray")
    g.add_argument("--gpu_order", default=None, help="accepted for compatibility; Ray places encoders")

    g = parser.add_argument_group("ray")
    g.add_argument(
        "--ray_address",
        "--ray-address",
        default=None,
        help="join this Ray cluster (e.g. auto); default: start a local Ray on loopback",
    )
    g.add_argument("--ray_namespace", default="rag", help="prefix of this run's Ray namespace, RAY_NAMESPACE-RUN_ID")
    g.add_argument(
        "--run_id",
        default=None,
        help="names this run's Ray actors (default: new for every run); give "
        "every node of a multi-node run the same one",
    )
    g.add_argument("--num_retrieval_workers", type=int, default=1)
    g.add_argument(
        "--retrieval_timeout",
        type=float,
        default=300.0,
        help="seconds a retrieval call may take (a restarted actor first loads the live KB inside the "
        "call); an actor that gives no answer in time is restarted, the call retried elsewhere",
    )
    g.add_argument(
        "--retrieval_threads",
        type=int,
        default=None,
        help="FAISS threads of each retrieval actor (default: every core of its machine, divided among "
        "the --index_shards; training waits for every search)",
    )
    g.add_argument(
        "--index_shards",
        type=int,
        default=1,
        help="S > 1: S retrieval actors each hold 1/S of the passages and build their own index over "
        "them (with the index flags) when a KB version loads; a query fans out to every shard and the "
        "results are merged exactly (top-k by score). Ray's scheduler places the actors, so with "
        "--ray_address the shards spread over the cluster's machines. One replica per shard: not with "
        "--num_retrieval_workers > 1",
    )
    g.add_argument("--distributed-port", dest="distributed_port", type=int, default=-1, help="unused")


def add_trainer_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("trainer (passed to pytorch_lightning.Trainer)")
    g.add_argument("--do_train", action="store_true")
    g.add_argument("--do_predict", action="store_true", help="test the best checkpoint after training")
    g.add_argument(
        "--no_test_loss",
        action="store_true",
        help="skip test_loss (a forward pass as long as generating): EM/F1 and retrieval only",
    )
    g.add_argument("--validate_before_training", action="store_true", help="one validation of the untrained model")
    g.add_argument(
        "--trainer_threads",
        type=int,
        default=None,
        help="torch threads of each training process (default: torch's, every core); with --index_cpus "
        "a CPU budget that does not oversubscribe the cores",
    )
    g.add_argument("--accelerator", default=None, help="cpu, gpu, auto (default: gpu if --gpus > 0, else auto)")
    g.add_argument("--devices", default=None, help="number of devices or a list (default: auto / --gpus)")
    g.add_argument("--gpus", type=int, default=None, help="shorthand for --accelerator gpu --devices N")
    g.add_argument("--num_nodes", type=int, default=1)
    g.add_argument("--strategy", default="auto")
    g.add_argument(
        "--ddp_timeout",
        type=float,
        default=DDP_TIMEOUT_S,
        help="seconds a DDP rank waits in a collective (Lightning's DDPStrategy(timeout)): the other ranks "
        "wait there while rank 0 waits for the Ray actors (their start, --refresh_before_validation, "
        "--reencode_lost_kb), which give up a tenth earlier naming the actor; raise it for KBs of millions "
        "of passages (docs/gpus.md)",
    )
    g.add_argument("--precision", default=None, help="e.g. 32, bf16-mixed, 16-mixed")
    g.add_argument("--fp16", action="store_true", help="16-bit mixed precision on GPUs")
    g.add_argument("--fp16_opt_level", default="O2", help="unused (apex)")
    g.add_argument("--n_tpu_cores", dest="tpu_cores", type=int, default=None, help="unused")
    g.add_argument("--num_train_epochs", "--max_epochs", dest="max_epochs", type=int, default=3)
    g.add_argument("--max_steps", type=int, default=-1)
    g.add_argument(
        "--val_check_interval", type=float, default=1.0, help="fraction of an epoch (<=1) or a number of batches (>1)"
    )
    g.add_argument("--check_val_every_n_epoch", type=int, default=1)
    g.add_argument("--limit_train_batches", type=float, default=1.0)
    g.add_argument("--limit_val_batches", type=float, default=1.0)
    g.add_argument("--num_sanity_val_steps", type=int, default=2)
    g.add_argument("--log_every_n_steps", type=int, default=10)
    g.add_argument(
        "--gradient_accumulation_steps",
        "--accumulate_grad_batches",
        dest="accumulate_grad_batches",
        type=int,
        default=1,
    )
    g.add_argument("--max_grad_norm", "--gradient_clip_val", dest="gradient_clip_val", type=float, default=1.0)
    g.add_argument("--profile", action="store_true", help="attach Lightning's simple profiler")
    g.add_argument("--resume_from_checkpoint", default=None, help="a Lightning .ckpt to resume from")
    g.add_argument("--resume", action="store_true", help="continue the run in --output_dir from its last.ckpt")
    g.add_argument(
        "--allow_changed_settings",
        action="store_true",
        help="with --resume: accept new learning rates, steps, epochs, logging and validation intervals (a resume "
        "that changes them is refused otherwise; the model, recipe, data and KB can never change)",
    )
    g.add_argument(
        "--overwrite_output_dir",
        action="store_true",
        help="train into an earlier run's output dir; its files move to OUTPUT/previous_runs/",
    )
    add_debug_arg(g)
    g.add_argument(
        "--save_last_every_n_steps",
        type=int,
        default=50,
        help="write OUTPUT/last.ckpt (the resume point) every N optimizer steps and at the end",
    )


def build_parser() -> argparse.ArgumentParser:
    """Every flag of finetune_rag.py."""
    parser = argparse.ArgumentParser(description=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_specific_args(parser)
    add_retriever_specific_args(parser)
    add_trainer_args(parser)
    return parser
