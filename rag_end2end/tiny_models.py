"""Build tiny, randomly initialised RAG parts (DPR encoders, BART generator, RAG models) for CPU tests.

No model hub is reachable from the project's machines, so tests build their models here: one WordPiece
tokenizer made from the dummy data, shared by every part, and configs small enough to train in
milliseconds a step. Same seed and corpus, same weights.
"""

import argparse
import time
from collections import Counter
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    BertTokenizerFast,
    DPRConfig,
    DPRContextEncoder,
    DPRQuestionEncoder,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    RagSequenceForGeneration,
    RagTokenForGeneration,
    RagTokenizer,
)

TEST_RUN = Path(__file__).resolve().parents[1] / "test_run"  # the dummy data of a checkout: the default corpus
DEFAULT_CORPUS = [
    TEST_RUN / "dummy-kb" / "my_knowledge_dataset.csv",
    *(
        TEST_RUN / "dummy-train-data" / f"{split}.{side}"
        for split in ("train", "val", "test")
        for side in ("source", "target")
    ),
]
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
MAX_LENGTH = 128
HIDDEN = 32
RAG_KWARGS = {
    "n_docs": 3,
    "retrieval_vector_size": HIDDEN,
    "index_name": "custom",
    "max_combined_length": MAX_LENGTH,
}
_SPECIAL_IDS = ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id")
PARTS = ("question_encoder", "context_encoder", "generator", "rag_token", "rag_sequence", "causal_generator")


def train_tokenizer(corpus_files: list[str | Path], vocab_size: int = 2000) -> PreTrainedTokenizerBase:
    """A lower-cased BERT-style WordPiece tokenizer whose vocabulary comes from the given text files."""
    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    counts: Counter[str] = Counter()
    for path in corpus_files:
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            counts.update(word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(line)))
    # tokenizers' WordPieceTrainer picks a different vocabulary on each run (huggingface/tokenizers#1794),
    # so build it here: every character, alone and as a "##" continuation, the most frequent words, then
    # frequent prefixes and "##" suffixes so that unseen words split into a few pieces.
    pieces: Counter[str] = Counter()
    for word, count in counts.items():
        for i in range(2, len(word)):
            pieces.update({word[:i]: count, "##" + word[-i:]: count})
    chars = sorted({char for word in counts for char in word})
    ranked = [*sorted(counts, key=lambda w: (-counts[w], w)), *sorted(pieces, key=lambda p: (-pieces[p], p))]
    tokens = list(dict.fromkeys([*SPECIAL_TOKENS, *chars, *("##" + c for c in chars), *ranked]))[:vocab_size]
    backend = Tokenizer(models.WordPiece(dict(zip(tokens, range(len(tokens)))), unk_token="[UNK]"))
    backend.normalizer = normalizer
    backend.pre_tokenizer = pre_tokenizer
    backend.decoder = decoders.WordPiece(prefix="##")
    # BertTokenizerFast adds the "[CLS] A [SEP]" post-processor itself.
    return BertTokenizerFast(tokenizer_object=backend, model_max_length=MAX_LENGTH)


def dpr_config(tokenizer: PreTrainedTokenizerBase) -> DPRConfig:
    return DPRConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=MAX_LENGTH,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=0,
    )


def bart_config(tokenizer: PreTrainedTokenizerBase) -> BartConfig:
    # Targets are "[CLS] answer [SEP]" and RAG feeds the target itself to the decoder: start with [CLS].
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    return BartConfig(
        vocab_size=len(tokenizer),
        d_model=HIDDEN,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=2 * MAX_LENGTH,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=cls,
        eos_token_id=sep,
        decoder_start_token_id=cls,
        forced_eos_token_id=sep,
    )


def causal_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """The same vocabulary for a decoder-only generator: no [CLS]/[SEP] around texts, [SEP] ends an answer."""
    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.post_processor = None
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        model_max_length=2 * MAX_LENGTH,
        eos_token="[SEP]",
        pad_token="[PAD]",
        unk_token="[UNK]",
    )


def llama_config(tokenizer: PreTrainedTokenizerBase) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=2 * MAX_LENGTH,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
    )


def build_tiny_models(
    output_dir: str | Path, corpus_files: list[str | Path] | None = None, seed: int = 0, force: bool = False
) -> dict[str, Path]:
    """Write question_encoder/, context_encoder/, generator/, rag_token/, rag_sequence/ and causal_generator/
    (a Llama) under output_dir.

    Returns {part name: directory}. Skips the work when output_dir/.complete exists, unless force.
    """
    out = Path(output_dir)
    dirs = {name: out / name for name in PARTS}
    if (out / ".complete").exists() and not force:
        return dirs
    (out / ".complete").unlink(missing_ok=True)

    tokenizer = train_tokenizer(corpus_files or DEFAULT_CORPUS)
    generator_config = bart_config(tokenizer)
    torch.manual_seed(seed)
    for name, model in (
        ("question_encoder", DPRQuestionEncoder(dpr_config(tokenizer))),
        ("context_encoder", DPRContextEncoder(dpr_config(tokenizer))),
        ("generator", BartForConditionalGeneration(generator_config)),
    ):
        model.save_pretrained(dirs[name])
        tokenizer.save_pretrained(dirs[name])

    rag_tokenizer = RagTokenizer(question_encoder=tokenizer, generator=tokenizer)
    # The generator's special ids are repeated on the RAG config itself (as in the hub's RAG configs):
    # RagTokenForGeneration.shift_tokens_right reads config.decoder_start_token_id, which is None otherwise.
    token_ids = {k: getattr(generator_config, k) for k in _SPECIAL_IDS}
    for name, rag_class in (("rag_token", RagTokenForGeneration), ("rag_sequence", RagSequenceForGeneration)):
        # RagConfig rejects pathlib.Path values, hence str().
        rag = rag_class.from_pretrained_question_encoder_generator(
            str(dirs["question_encoder"]), str(dirs["generator"]), **RAG_KWARGS, **token_ids
        )
        rag.save_pretrained(dirs[name])
        rag_tokenizer.save_pretrained(dirs[name])

    causal = causal_tokenizer(tokenizer)
    LlamaForCausalLM(llama_config(causal)).save_pretrained(dirs["causal_generator"])
    causal.save_pretrained(dirs["causal_generator"])

    (out / ".complete").write_text("ok\n")
    return dirs


def tiny_run_argv(
    models: dict[str, Path], kb: tuple[Path, Path], data_dir: Path, output_dir: Path, model: str = "rag_token"
) -> list[str]:
    """finetune_rag.py's flags for a run of the tiny models (`build_tiny_models`) over a KB (passages, index) on one
    CPU: the flags every test and benchmark run shares. Add the run's own after them (repeated: the last wins)."""
    flags = {
        "model_name_or_path": models[model],
        "model_type": model,
        "context_encoder_name": models["context_encoder"],
        "passages_path": kb[0],
        "index_path": kb[1],
        "index_type": "flat",
        "data_dir": data_dir,
        "output_dir": output_dir,
        "accelerator": "cpu",
        "devices": 1,
    }
    return [arg for name, value in flags.items() for arg in (f"--{name}", str(value))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", required=True, type=Path)
    parser.add_argument("--corpus", nargs="+", type=Path, help="text files for the tokenizer (default: dummy data)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="rebuild even if output_dir/.complete exists")
    args = parser.parse_args()
    transformers.utils.logging.disable_progress_bar()
    start = time.perf_counter()
    dirs = build_tiny_models(args.output_dir, args.corpus, args.seed, args.force)
    print(f"tiny models in {args.output_dir} ({time.perf_counter() - start:.1f} s): " + ", ".join(dirs))


def cli() -> None:
    """The command line."""
    main()


if __name__ == "__main__":
    cli()
