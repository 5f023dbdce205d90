"""The QA pairs a run trains and is tested on: line-aligned `{split}.source`/`.target` files, with the questions
tokenised for the question encoder (every generator family tokenises its own prompts and answers: rag_model.py)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from rag_end2end.data.readers import InputError, read_lines

# The kinds of example (and of batch: a training batch holds one kind); the training log names each kind's loss
# train_loss_{kind}.
QA, RECONSTRUCTION = "qa", "recon"


def read_pairs(data_dir: str | Path, split: str) -> tuple[list[str], list[str]]:
    """The questions and answers of `{split}.source` and `.target`: UTF-8, no empty line (data.readers.read_lines),
    as many of each, and at least one; InputError naming the files otherwise. finetune_rag.py reads every split
    through it before any work (training.arguments.check_data_dir), and each dataset again when it is built."""
    source_path, target_path = Path(data_dir) / f"{split}.source", Path(data_dir) / f"{split}.target"
    sources, targets = read_lines(source_path), read_lines(target_path)
    if len(sources) != len(targets):
        raise InputError(
            f"{source_path} has {len(sources)} lines but {target_path} has {len(targets)}; they must be line-aligned"
        )
    if not sources:
        raise InputError(f"{source_path} and {target_path} contain no examples")
    return sources, targets


class QuestionDataset:
    """Question/answer pairs from `{type_path}.source`/`.target`: the texts, and the questions tokenised for
    the question encoder (generators tokenise their own prompts and answers: rag_model.py). `kind` says what the
    pairs are (QA, or RECONSTRUCTION: marked statements and the statements), and `masks` (one per line, before
    n_obs: data.mixing.Mask or None) what may be cut out of a statement's own passage: a statement's item and batch
    carry both (`kind`, `mask`/`masks`); a QA pair's carry neither (its kind is QA)."""

    def __init__(
        self,
        question_tokenizer,
        data_dir: str,
        max_source_length: int,
        type_path: str = "train",
        n_obs: int | None = None,
        prefix: str = "",
        kind: str = QA,
        masks: list | None = None,
    ) -> None:
        source_path = Path(data_dir) / f"{type_path}.source"
        target_path = Path(data_dir) / f"{type_path}.target"
        sources, targets = read_pairs(data_dir, type_path)
        if n_obs is not None and n_obs < -1:
            raise ValueError(f"n_obs must be None, -1 (all) or >= 0, got {n_obs}")
        if question_tokenizer.pad_token_id is None:
            raise ValueError("the question encoder tokenizer has no pad token, which collate_fn needs")
        if masks is not None and len(masks) != len(sources):
            raise ValueError(f"{len(masks)} masks for the {len(sources)} lines of {source_path}")
        if n_obs is not None and n_obs != -1:
            sources, targets = sources[:n_obs], targets[:n_obs]
            masks = masks[:n_obs] if masks is not None else None

        self.question_tokenizer = question_tokenizer
        self.sources = [line.strip() for line in sources]
        self.targets = [line.strip() for line in targets]
        self.source_path, self.target_path = source_path, target_path
        self.kind, self.masks = kind, masks
        texts = [prefix + s for s in self.sources]
        self.question_ids = question_tokenizer(texts)["input_ids"]
        long = warn_cut(
            source_path, "questions", list(map(len, self.question_ids)), max_source_length, "--max_source_length"
        )
        if long:  # only these are tokenised again, cut (the tokenizer keeps the closing special tokens)
            cut = question_tokenizer([texts[i] for i in long], truncation=True, max_length=max_source_length)
            for i, ids in zip(long, cut["input_ids"]):
                self.question_ids[i] = ids

    def cut_targets(self, tokenizer, max_tokens: int, flag: str = "--max_target_length") -> None:
        """Cut the answers longer than `max_tokens` tokens of the generator's `tokenizer` to that many (as the
        reference cut its training labels), with a warning that counts them and names the first."""
        ids = tokenizer(self.targets, add_special_tokens=False)["input_ids"]
        long = warn_cut(self.target_path, "answers", [len(i) for i in ids], max_tokens, flag)
        for i in long:
            self.targets[i] = tokenizer.decode(ids[i][:max_tokens], skip_special_tokens=True).strip()

    def __len__(self) -> int:
        """Number of examples kept (after n_obs)."""
        return len(self.sources)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """The raw texts, the question's unpadded `input_ids` and its line; a statement's kind and mask (or None)."""
        ids = self.question_ids[index]
        item = {
            "source_text": self.sources[index],
            "target_text": self.targets[index],
            "input_ids": ids,
            "index": index,
        }
        if self.kind != QA:
            item |= {"kind": self.kind, "mask": self.masks[index] if self.masks is not None else None}
        return item

    def collate_fn(self, batch: list[dict[str, Any]]) -> dict[str, Any]:
        """Pad the questions to the batch's longest (on the right: CLS pooling reads position 0). A batch is of one
        kind; a statement batch says so (`kind`) and carries each statement's mask (`masks`)."""
        import torch  # here, not at the top: this module is cheap to import without it

        kinds = {ex.get("kind", QA) for ex in batch}
        if len(kinds) != 1:
            raise ValueError(f"a batch of {len(batch)} examples of the kinds {sorted(kinds)}: a batch holds one kind")
        kind = kinds.pop()
        padded = self.question_tokenizer.pad(
            {"input_ids": [ex["input_ids"] for ex in batch]}, padding_side="right", return_tensors="pt"
        )
        return {
            "input_ids": padded["input_ids"],
            "attention_mask": padded["attention_mask"],
            "source_text": [ex["source_text"] for ex in batch],
            "target_text": [ex["target_text"] for ex in batch],
            "index": torch.tensor([ex["index"] for ex in batch]),  # line numbers, to put DDP shards back in order
            **({"kind": kind, "masks": [ex["mask"] for ex in batch]} if kind != QA else {}),
        }


def warn_cut(path: Path, what: str, lengths: list[int], limit: int, flag: str) -> list[int]:
    """The examples longer than `limit` tokens, after a warning that counts them and names the first line."""
    long = [i for i, n in enumerate(lengths) if n > limit]
    if long:
        first = f"line {long[0] + 1}, {lengths[long[0]]} tokens"
        warnings.warn(
            f"{path}: {len(long)} of {len(lengths)} {what} are longer than {flag} {limit} tokens and are "
            f"cut to it (the first: {first})",
            stacklevel=3,
        )
    return long
