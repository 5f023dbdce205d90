"""The RagModel that finetune_rag.py's flags describe: loaded from a checkpoint or assembled from parts, with
only the parts the recipe needs, LoRA where --peft says, gradient checkpointing where --gradient_checkpointing says,
and checked against its KB before any work."""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import torch
from datasets import load_from_disk
from transformers import AutoTokenizer, PreTrainedModel

from rag_end2end.data.readers import check_model_path
from rag_end2end.kb.index import read_index
from rag_end2end.kb.similarity import check_kb_similarity
from rag_end2end.model.encoders import context_side, encoder_similarity, load_encoder, load_tokenizer
from rag_end2end.model.lora import add_lora, train_only_lora
from rag_end2end.model.rag import RAG_TEMPLATE, CausalGenerator, RagModel, Seq2SeqGenerator, checkpoint_settings
from rag_end2end.model.settings import Generation, RagSettings
from rag_end2end.options import MODEL_FLAGS, MODEL_TYPES


def assemble(hp: argparse.Namespace, objective, retriever) -> RagModel:
    """The model of a run: its files checked first, then built (`build_model`), checked against the KB it will
    retrieve from, frozen where the recipe does not train it, given LoRA adapters with --peft and
    gradient checkpointing in the parts that train with --gradient_checkpointing."""
    if hp.model_type not in MODEL_TYPES:
        raise ValueError(f"--model_type {hp.model_type!r} is not supported here; use rag_token or rag_sequence")
    for path in (hp.passages_path, hp.index_path):
        if not Path(path).exists():
            raise FileNotFoundError(f"{path} not found: build the KB first with use_own_knowledge_dataset.py")
    for flag in MODEL_FLAGS:
        check_model_path(flag, getattr(hp, flag))
    model = build_model(hp, objective, retriever)
    # The similarity the question encoder scores with (declared by its checkpoint, or --similarity); the KB
    # must hold embeddings made for it, checked before any work is done.
    q_name = hp.question_encoder_name_or_path or hp.model_name_or_path
    check_kb_similarity(hp.passages_path, f"the question encoder {q_name}", encoder_similarity(model.question_encoder))
    check_kb(hp.passages_path, hp.index_path, model.question_encoder.config.hidden_size, model.n_docs)
    objective.freeze(model)
    if hp.peft != "none":
        apply_lora(model, hp, objective.trains)
    if hp.gradient_checkpointing:
        for name in objective.trains:
            if getattr(model, name, None) is not None:
                checkpoint_activations(getattr(model, name), f"--gradient_checkpointing: the {name}")
    objective.set_modes(model)  # dropout on in the parts that learn, off in the frozen ones
    return model


def build_model(hp: argparse.Namespace, objective, retriever) -> RagModel:
    """The RagModel the flags describe, with only the parts the recipe needs (no generator for retriever_only, no
    context encoder where passage embeddings never change): built from a checkpoint's settings as the flags change
    them (`run_settings`), or from the parts the flags name."""
    source = hp.init_from or hp.model_name_or_path
    if source:
        if hp.question_pooling or hp.shared_encoder:
            raise ValueError(
                "--question_pooling and --shared_encoder build the question encoder: pass --question_"
                "encoder_name_or_path and --generator_name_or_path, not a RAG checkpoint"
            )
        saved = checkpoint_settings(source, hp.cache_dir)
        generator = ctx = None
        if objective.needs_generator and saved.generator_family is None:
            # e.g. retriever_only's checkpoint, continued by ralt (RA-DIT's order)
            if not hp.generator_name_or_path:
                raise ValueError(
                    f"{source} holds no generator: --training_mode {objective.name} needs --generator_name_or_path"
                )
            generator = load_generator(hp)
        if objective.uses_context_encoder and saved.doc_scores != "fresh":  # the checkpoint holds none
            ctx = load_context_encoder(hp)
        model = RagModel.from_pretrained(
            source,
            retriever,
            objective.needs_generator,
            objective.uses_context_encoder,
            cache_dir=hp.cache_dir,
            settings=run_settings(saved, hp),
            generator=generator,
            context_encoder=ctx,
        )
        if objective.uses_context_encoder and model.ctx_encoder is None:
            raise FileNotFoundError(
                f"{source}: its doc scores came from a context encoder (doc_scores fresh), but it "
                "holds no context_encoder/"
            )
    else:
        if not hp.question_encoder_name_or_path or (objective.needs_generator and not hp.generator_name_or_path):
            raise ValueError(
                "give --model_name_or_path, or --question_encoder_name_or_path and --generator_name_or_"
                f"path (--training_mode {objective.name} needs a generator: "
                f"{objective.needs_generator})"
            )
        q_name = hp.question_encoder_name_or_path
        question_encoder = load_encoder(
            q_name,
            hp.question_pooling,
            hp.cache_dir,
            "question",
            hp.similarity,
            hp.retrieval_temperature,
            hp.learn_temperature,
        )
        prefix = hp.question_prefix or getattr(question_encoder.config, "prefix", None) or ""
        generator = load_generator(hp) if objective.needs_generator else None
        ctx = load_context_encoder(hp, question_encoder) if objective.uses_context_encoder else None
        ctx_encoder, ctx_tokenizer = ctx or (None, None)
        q_tokenizer = AutoTokenizer.from_pretrained(q_name, cache_dir=hp.cache_dir)
        model = RagModel(
            question_encoder,
            q_tokenizer,
            generator,
            retriever,
            hp.n_docs or 5,
            hp.model_type.removeprefix("rag_"),
            ctx_encoder=ctx_encoder,
            ctx_tokenizer=ctx_tokenizer,
            question_prefix=prefix,
            rerank_top=hp.rerank_top,
            question_max_length=hp.max_source_length,
            generation=run_generation(hp),
        )
    if ctx is not None:  # one the flags named
        check_context_encoder(model, hp.context_encoder_name)
    return model


def run_generation(hp: argparse.Namespace) -> Generation:
    """How --do_predict decodes (saved with the model, so that eval_rag.py decodes exactly as it did)."""
    return Generation(num_beams=hp.num_beams, max_new_tokens=hp.test_max_target_length)


def run_settings(saved: RagSettings, hp: argparse.Namespace) -> RagSettings:
    """A checkpoint's settings as this run's flags change them: the marginal (--model_type), re-ranking, question
    length and test decoding always; passages per question, the question prefix and the prompt template where
    given; the question encoder's scoring as --similarity, --retrieval_temperature and --learn_temperature say (a
    RAG checkpoint's DPR encoder scores with dot products at tau 1 unless told otherwise); --label_smoothing."""
    return saved.replace(
        marginal=hp.model_type.removeprefix("rag_"),
        rerank_top=hp.rerank_top,
        question_max_length=hp.max_source_length,
        generation=run_generation(hp),
        n_docs=hp.n_docs or saved.n_docs,
        question_prefix=saved.question_prefix if hp.question_prefix is None else hp.question_prefix,
        template=hp.prompt_template or saved.template,
        question_encoder=saved.question_encoder.rescored(hp.similarity, hp.retrieval_temperature, hp.learn_temperature),
        label_smoothing=hp.label_smoothing,
    )


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


# Non-reentrant checkpointing: gradients reach the parameters inside a checkpointed layer (LoRA's adapters under a
# frozen embedding too) without its input having to require grad, and the recompute replays the forward's RNG.
CHECKPOINT_KWARGS = {"use_reentrant": False}


def transformers_in(part: torch.nn.Module) -> list[PreTrainedModel]:
    """The outermost transformers models inside a part that can checkpoint their layers: the generator's model,
    a PooledEncoder's, the BertModel inside a DPR encoder (DPR's own classes declare no support), found through
    peft's wrappers."""
    if isinstance(part, PreTrainedModel) and part.supports_gradient_checkpointing:
        return [part]
    return [model for child in part.children() for model in transformers_in(child)]


def checkpoint_activations(part: torch.nn.Module, what: str = "the part") -> None:
    """Gradient checkpointing in every transformer layer of a part (`transformers_in`), in place: in training mode
    each layer keeps only its input and runs its forward again in the backward pass. transformers checkpoints only
    modules in training mode, so a part kept in eval mode (frozen, or --retriever_dropout off) is not affected."""
    models = transformers_in(part)
    if not models:
        raise ValueError(f"{what} ({type(part).__name__}) holds no transformers model that supports checkpointing")
    for model in models:
        if model.is_activation_checkpointing:  # --shared_encoder: met again as the other side
            continue
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=CHECKPOINT_KWARGS)


def is_checkpointing(part: torch.nn.Module) -> bool:
    """Every transformers model of the part checkpoints its layers (transformers' own flag)."""
    models = transformers_in(part)
    return bool(models) and all(model.is_activation_checkpointing for model in models)


def load_generator(hp: argparse.Namespace):
    """The generator of an assembled model, with the flags' dropout, prompt and length settings."""
    config = {
        name: getattr(hp, name)
        for name in ("dropout", "attention_dropout", "encoder_layerdrop", "decoder_layerdrop")
        if getattr(hp, name) is not None
    }
    name = hp.generator_name_or_path
    if hp.generator_type == "causal":
        return CausalGenerator.from_pretrained(
            name, hp.prompt_template, hp.max_combined_length, hp.label_smoothing, hp.cache_dir, **config
        )
    template = hp.prompt_template or (hp.prefix or "") + RAG_TEMPLATE
    return Seq2SeqGenerator.from_pretrained(
        name, template, hp.max_combined_length, hp.label_smoothing, hp.cache_dir, **config
    )


def load_context_encoder(hp: argparse.Namespace, question_encoder: torch.nn.Module | None = None) -> tuple:
    """(context encoder, tokenizer) the recipe re-encodes passages with: --context_encoder_name with
    --context_pooling and --passage_prefix, or with --shared_encoder the question encoder's transformer."""
    ctx_name = hp.context_encoder_name
    if hp.shared_encoder:  # one transformer encodes questions and passages
        context_encoder = context_side(question_encoder)
    else:
        context_encoder = load_encoder(ctx_name, hp.context_pooling, hp.cache_dir, "context", hp.similarity)
    tokenizer = load_tokenizer(hp.context_encoder_tokenizer_name or ctx_name, hp.passage_prefix, hp.cache_dir)
    return context_encoder, tokenizer


def check_context_encoder(model: RagModel, ctx_name: str) -> None:
    """A context encoder must score like the question encoder, in vectors of its size."""
    similarity = encoder_similarity(model.question_encoder)
    if encoder_similarity(model.ctx_encoder) != similarity:
        raise ValueError(
            f"the context encoder {ctx_name} scores with {encoder_similarity(model.ctx_encoder)} similarity, "
            f"the question encoder with {similarity}: pass --similarity dot or cosine"
        )
    q_dim = model.question_encoder.config.hidden_size
    if model.ctx_encoder.config.hidden_size != q_dim:
        raise ValueError(
            f"context encoder {ctx_name} has size {model.ctx_encoder.config.hidden_size}, the question "
            f"encoder {q_dim}: their dot product needs one size"
        )


def check_kb(passages_path: str, index_path: str, dim: int, n_docs: int) -> None:
    """Refuse a KB that cannot serve this model before any work: no embeddings, another vector size, fewer
    passages than --n_docs, or an index that does not match its passages."""
    passages = load_from_disk(passages_path)
    if "embeddings" not in passages.column_names:
        raise ValueError(
            f"{passages_path}: no `embeddings` column (columns: {', '.join(passages.column_names)}); "
            "build the KB with use_own_knowledge_dataset.py"
        )
    kb_dim = len(passages[0]["embeddings"])
    if kb_dim != dim:
        raise ValueError(
            f"{passages_path}: embeddings of size {kb_dim}, the question encoder makes {dim}: "
            "re-encode the KB with the matching context encoder"
        )
    if n_docs > len(passages):
        raise ValueError(f"--n_docs {n_docs} is more than the {len(passages)} passages of {passages_path}")
    index = read_index(index_path, mmap=True)
    if index.d != kb_dim or index.ntotal != len(passages):
        raise ValueError(
            f"{index_path}: {index.ntotal} vectors of size {index.d} for {len(passages)} passages "
            f"of size {kb_dim} in {passages_path}: build them together"
        )
