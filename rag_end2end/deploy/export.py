"""Export a trained checkpoint to the libraries its users already run: sentence-transformers for the encoders
(a vector store, LangChain), plain transformers for the generator (vLLM, TGI, `generate`), and the KB version
that matches the weights.

    python export_model.py --checkpoint OUT/checkpoint120 --output_dir DIR

    DIR/question_encoder/   SentenceTransformer(DIR/question_encoder).encode(questions, prompt_name="query")
    DIR/context_encoder/    SentenceTransformer(DIR/context_encoder).encode([(prefix + title, text), ...])
    DIR/generator/          AutoModelForCausalLM / AutoModelForSeq2SeqLM.from_pretrained(DIR/generator); with
                            --adapters the base model instead, and DIR/generator_adapter/ its LoRA adapter (peft)
    DIR/kb/                 the checkpoint's KB version: passages (with embeddings) and index.faiss
    DIR/rag_settings.json   with kb_version.json (relative paths): RagModel.from_pretrained(DIR), rag_answer.py
    DIR/rag/                DPR + BART/T5 checkpoints only: a transformers RagTokenForGeneration (or
                            RagSequenceForGeneration) directory whose retriever is DIR/kb (index_name "custom")
    DIR/README.md           the model card: recipe, base models, data, steps, test metrics, how to use it

The encoders keep the pooling they were trained with (a Pooling module), `Normalize` when they score by cosine,
the question prefix as the prompt "query" and the passage prefix as "document", and the truncation length.
A passage is encoded as the text pair (passage prefix + title, text), exactly as the KB was: give
sentence-transformers that pair, not a joined string. Question vectors of the toolkit are divided by the
retrieval temperature tau (in the card and rag_settings.json); sentence-transformers gives them undivided.
LoRA adapters are merged (checkpoints hold the merged weights); `--adapters` ships a LoRA generator as its
base model and the adapter instead. Needs sentence-transformers.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertModel,
    DPRContextEncoder,
    DPRQuestionEncoder,
    RagConfig,
    RagSequenceForGeneration,
    RagTokenForGeneration,
    RagTokenizer,
)

from rag_end2end.files import atomic_write, remove_orphaned_temporaries
from rag_end2end.kb.versions import KB_VERSION_FILE, checkpoint_kb
from rag_end2end.model.encoders import PooledEncoder, encoder_similarity
from rag_end2end.model.rag import RAG_TEMPLATE, RagModel
from rag_end2end.model.settings import QUESTION_MAX_LENGTH, SETTINGS_FILE, RagSettings, refuse_training_state

RUN_FILES = ("run_info.json", "test_results.txt")  # beside the checkpoints, in the run's output dir


def plain_encoder(encoder: torch.nn.Module) -> tuple[torch.nn.Module, str, bool]:
    """(a model sentence-transformers' Transformer module loads with AutoModel, its pooling, normalize). DPR's
    BERT becomes a BertModel with a BERT config (AutoModel would read a DPR config as a DPRQuestionEncoder,
    whose first output is no token embedding); its pooler output is the [CLS] vector: cls pooling."""
    model, pooling, normalize = encoder, "cls", False
    if isinstance(encoder, PooledEncoder):
        model, pooling, normalize = encoder.model, encoder.pooling, encoder.normalize
    for cls, attr in ((DPRQuestionEncoder, "question_encoder"), (DPRContextEncoder, "ctx_encoder")):
        if isinstance(model, cls):
            model = getattr(model, attr)
    if hasattr(model, "bert_model"):  # a DPREncoder
        if getattr(model, "projection_dim", 0):
            raise ValueError(
                "this DPR encoder projects its [CLS] vector (projection_dim > 0): not exportable as a "
                "Transformer + Pooling sentence-transformers model"
            )
        pooling = "cls" if pooling == "pooler" else pooling
        keys = BertConfig().to_dict().keys()
        config = BertConfig(**{k: v for k, v in model.bert_model.config.to_dict().items() if k in keys})
        bert = BertModel(config, add_pooling_layer=False)
        bert.load_state_dict(model.bert_model.state_dict())
        model = bert
    if pooling not in ("cls", "mean"):
        raise ValueError(
            f"pooling {pooling!r}: sentence-transformers' Pooling has cls and mean, not the "
            "model's own pooler; train with --question_pooling/--context_pooling cls or mean"
        )
    return model, pooling, normalize


def write_sentence_transformer(encoder, tokenizer, directory: Path, prompts: dict, max_seq_length: int) -> None:
    """`encoder` as a sentence-transformers model directory, saved by sentence-transformers itself."""
    try:
        from sentence_transformers import SentenceTransformer, models
    except ImportError as e:
        raise ImportError("export_model.py needs sentence-transformers: pip install sentence-transformers") from e
    model, pooling, normalize = plain_encoder(encoder)
    base = directory / "transformer.tmp"
    model.save_pretrained(base)
    getattr(tokenizer, "tokenizer", tokenizer).save_pretrained(base)  # a PrefixedTokenizer's own tokenizer
    # The toolkit encodes (title, text) pairs without token type ids (segment 0 throughout, as the reference's
    # use_own_knowledge_dataset.py did): a tokenizer that returns none makes sentence-transformers do the same.
    AutoTokenizer.from_pretrained(base, model_input_names=["input_ids", "attention_mask"]).save_pretrained(base)
    modules = [
        models.Transformer(str(base), max_seq_length=max_seq_length),
        models.Pooling(model.config.hidden_size, pooling_mode=pooling),
    ]
    modules += [models.Normalize()] if normalize else []
    st = SentenceTransformer(
        modules=modules,
        prompts={k: v for k, v in prompts.items() if v},
        # sentence-transformers' "euclidean" is -||q - d|| (not squared): the same ranking as the toolkit's l2 scores
        similarity_fn_name={"cosine": "cosine", "dot": "dot", "l2": "euclidean"}[encoder_similarity(encoder)],
    )
    st.save(str(directory))
    shutil.rmtree(base)


def write_transformers_rag(model: RagModel, settings: RagSettings, directory: Path, kb: tuple[Path, Path]) -> bool:
    """transformers' own RAG directory, for what its classes hold: a DPR question encoder scoring by dot product
    at tau 1 and a seq2seq generator. `from_pretrained` loads it with its retriever over `kb` (absolute paths:
    transformers reads them as given). False (nothing written) for any other model."""
    q = model.question_encoder
    if not isinstance(q, DPRQuestionEncoder) or getattr(model.generator, "family", None) != "seq2seq":
        return False
    generator = model.generator
    if generator.template != (getattr(generator.model.config, "prefix", None) or "") + RAG_TEMPLATE:
        return False  # another prompt than transformers' RAG builds
    rag_class = RagSequenceForGeneration if settings.marginal == "sequence" else RagTokenForGeneration
    config = RagConfig.from_question_encoder_generator_configs(
        q.config,
        generator.model.config,
        n_docs=settings.n_docs,
        max_combined_length=generator.max_length,
        index_name="custom",
        passages_path=str(kb[0]),
        index_path=str(kb[1]),
        use_dummy_dataset=False,
        architectures=[rag_class.__name__],
        # decoding reads these from the RAG config itself, as facebook/rag-token-base has them
        **{
            k: getattr(generator.model.config, k, None)
            for k in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id", "forced_eos_token_id")
        },
    )
    rag = rag_class(config=config, question_encoder=q, generator=generator.model)
    rag.save_pretrained(directory)
    RagTokenizer(model.question_tokenizer, generator.tokenizer).save_pretrained(directory)
    return True


def model_card(checkpoint: Path, settings: RagSettings, kb: dict, wrote_rag: bool = False) -> str:
    """DIR/README.md: what was trained, from what, on what, and how well; how to use each part."""
    run = checkpoint.parent
    info = json.loads((run / "run_info.json").read_text()) if (run / "run_info.json").is_file() else {}
    hparams = next(run.glob("logs/version_*/hparams.yaml"), None)
    tested = (run / "test_results.txt").read_text().strip() if (run / "test_results.txt").is_file() else "not tested"
    q, prefix = settings.question_encoder, settings.passage_prefix or ""
    tau = q.temperature if q.temperature is not None else 1.0
    lines = [
        f"# RAG model exported from `{checkpoint}`",
        "",
        f"- recipe: {info.get('training_mode', 'unknown')} (trained: {', '.join(info.get('trains', [])) or '?'}), "
        f"step {checkpoint.name.removeprefix('checkpoint') or '?'}, {info.get('refreshes', 0)} KB refreshes",
        f"- retrieval: {q.pooling or 'cls'} pooling, {q.similarity or 'dot'} similarity, doc scores = "
        f"similarity / tau with tau = {tau}; {settings.n_docs} passages per question, "
        f"RAG-{settings.marginal} marginal",
        f"- question prefix {settings.question_prefix!r}, passage prefix {prefix!r}",
        f"- generator: {settings.generator_family or 'none'} (template {settings.template!r})",
        f"- KB: version {kb.get('version', 0)}, embeddings of step {kb.get('embedding_step', 0)}, in `kb/`",
        f"- hyper-parameters: `{hparams}`" if hparams else "- hyper-parameters: not found beside the checkpoint",
        "",
        "## Test metrics of the run",
        "",
        "```",
        tested,
        "```",
        "",
        "## Use",
        "",
        "```python",
        "from sentence_transformers import SentenceTransformer",
        "q = SentenceTransformer('question_encoder').encode(['your question'], prompt_name='query')",
        f"p = SentenceTransformer('context_encoder').encode([({prefix!r} + title, text)])",
        "# the toolkit's doc score is q @ p.T / tau; rank by q @ p.T",
        "",
        "from rag_model import RagModel  # this toolkit: retrieval, generation and the KB together",
        "RagModel.from_pretrained('.').eval().answer(['your question'])",
        "```",
        "",
        "A passage is encoded as the text pair (passage prefix + title, text), as the KB in `kb/` was.",
    ]
    if wrote_rag:
        lines += [
            "",
            "`rag/` is a transformers RAG model with its retriever over `kb/`:",
            "",
            "```python",
            "from transformers import RagRetriever, RagTokenForGeneration, RagTokenizer",
            "retriever = RagRetriever.from_pretrained('rag')  # index_name 'custom': kb/passages, kb/index.faiss",
            "model = RagTokenForGeneration.from_pretrained('rag', retriever=retriever)",
            "```",
        ]
    return "\n".join(lines) + "\n"


def write_adapters(checkpoint: Path, model: RagModel, directory: Path) -> None:
    """The generator's base model at generator/ and the run's LoRA adapter beside it at generator_adapter/:
    `PeftModel.from_pretrained(AutoModelFor...LM.from_pretrained("generator"), "generator_adapter")`."""
    adapter = checkpoint / "generator_adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise FileNotFoundError(
            f"--adapters: {adapter} not found: the run trained no LoRA generator "
            "(--peft generator|both), or predates saving adapters"
        )
    config = json.loads((adapter / "adapter_config.json").read_text())
    base_name = config["base_model_name_or_path"]
    base = model.generator.auto_class.from_pretrained(base_name)
    base.save_pretrained(directory / "generator")
    model.generator.tokenizer.save_pretrained(directory / "generator")
    shutil.copytree(adapter, directory / "generator_adapter")
    config |= {"base_model_name_or_path": "../generator", "trained_from": base_name}
    (directory / "generator_adapter" / "adapter_config.json").write_text(json.dumps(config, indent=1))


def write_export(
    checkpoint: Path, model: RagModel, settings: RagSettings, kb_paths: tuple, tmp: Path, final: Path, adapters: bool
) -> None:
    """The export's files, written into `tmp`, which is renamed to `final` once they are all there."""
    tmp.mkdir()
    q_length = settings.question_max_length or QUESTION_MAX_LENGTH
    prompts = {"query": settings.question_prefix, "document": settings.passage_prefix}
    write_sentence_transformer(
        model.question_encoder, model.question_tokenizer, tmp / "question_encoder", prompts, q_length
    )
    if model.ctx_encoder is not None:
        ctx_length = min(model.ctx_tokenizer.model_max_length, model.ctx_encoder.config.max_position_embeddings)
        write_sentence_transformer(model.ctx_encoder, model.ctx_tokenizer, tmp / "context_encoder", prompts, ctx_length)
    for part in ("question_encoder", "context_encoder"):  # this toolkit's own files, read by RagModel
        for name in ("pooling.json", "text_prefix.json"):
            if (checkpoint / part / name).is_file() and (tmp / part).is_dir():
                shutil.copy(checkpoint / part / name, tmp / part / name)
    if model.generator is not None and adapters:
        write_adapters(checkpoint, model, tmp)
    elif model.generator is not None:
        model.generator.save_pretrained(tmp / "generator")
    (tmp / "kb").mkdir()
    shutil.copytree(kb_paths[0], tmp / "kb" / "passages")
    shutil.copy(kb_paths[1], tmp / "kb" / "index.faiss")
    final_kb = (final / "kb" / "passages", final / "kb" / "index.faiss")  # after the rename
    wrote_rag = write_transformers_rag(model, settings, tmp / "rag", final_kb)
    kb = json.loads((checkpoint / KB_VERSION_FILE).read_text())
    (tmp / KB_VERSION_FILE).write_text(
        json.dumps(kb | {"passages_path": "kb/passages", "index_path": "kb/index.faiss"}, indent=1)
    )
    if model.ctx_encoder is None:  # the checkpoint holds none: the export scores with the KB's stored vectors
        settings = settings.replace(doc_scores="stored")
    settings.to_json(tmp / SETTINGS_FILE)
    (tmp / "README.md").write_text(model_card(checkpoint, settings, kb, wrote_rag))


def export(checkpoint: str | Path, output_dir: str | Path, adapters: bool = False) -> Path:
    """Write the export into a temporary directory beside `output_dir` (files.atomic_write), then rename it into
    place: a reader never sees half an export, and a failed one leaves nothing."""
    checkpoint, out = Path(checkpoint), Path(output_dir)
    refuse_training_state(checkpoint)
    if not (checkpoint / SETTINGS_FILE).is_file():
        raise FileNotFoundError(
            f"--checkpoint {checkpoint}: not a checkpoint<step> of finetune_rag.py (no {SETTINGS_FILE})"
        )
    if out.exists():
        raise FileExistsError(f"--output_dir {out} exists: nothing is overwritten; name a new directory")
    kb_paths = checkpoint_kb(checkpoint)
    if kb_paths is None:
        raise FileNotFoundError(f"{checkpoint}/{KB_VERSION_FILE} not found: the checkpoint names no KB version")
    settings = RagSettings.from_json(checkpoint / SETTINGS_FILE)
    # KBSearch refuses a KB version that is gone, naming it, before anything is written
    model = RagModel.from_pretrained(checkpoint, load_context_encoder=True, kb=kb_paths, settings=settings).eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_orphaned_temporaries(out.parent, of=out.name)  # what an export that was killed left
    with atomic_write(out, "export", replace=False) as tmp:
        write_export(checkpoint, model, settings, kb_paths, tmp, out.absolute(), adapters)
    return out


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="OUT/checkpoint<step>, written by finetune_rag.py")
    p.add_argument("--output_dir", required=True, help="a new directory (an existing one is refused)")
    p.add_argument(
        "--adapters", action="store_true", help="a LoRA generator as its base model and the peft adapter, not merged"
    )
    args = p.parse_args(argv)
    out = export(args.checkpoint, args.output_dir, args.adapters)
    print(f"exported {args.checkpoint} to {out} (model card: {out / 'README.md'})")
    return out


def cli() -> None:
    """The command line."""
    main()


if __name__ == "__main__":
    cli()
