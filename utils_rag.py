"""Dataset and SQuAD-style metrics for end-to-end RAG fine-tuning."""

import re
import string
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from transformers import RagTokenizer

_PUNCTUATION_TABLE = str.maketrans("", "", string.punctuation)


def _read_lines(path: Path) -> list[str]:
    """Read a one-example-per-line file, rejecting blank lines so source/target stay aligned."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: expected a UTF-8 text file with one example per line")
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    if lines[-1] == "":  # the final newline (or an empty file) does not start another line
        lines.pop()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            raise ValueError(f"{path}:{number}: empty or whitespace-only line")
    return lines


def _pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists to the longest one; return (ids, attention mask)."""
    width = max(len(seq) for seq in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids, mask


class Seq2SeqDataset(Dataset):
    """Question/answer pairs from `{type_path}.source`/`.target`, tokenised for a RAG model."""

    def __init__(
        self,
        tokenizer: RagTokenizer,
        data_dir: str,
        max_source_length: int,
        max_target_length: int,
        type_path: str = "train",
        n_obs: int | None = None,
        prefix: str = "",
    ) -> None:
        source_path = Path(data_dir) / f"{type_path}.source"
        target_path = Path(data_dir) / f"{type_path}.target"
        sources, targets = _read_lines(source_path), _read_lines(target_path)
        if len(sources) != len(targets):
            raise ValueError(
                f"{source_path} has {len(sources)} lines but {target_path} has {len(targets)}; "
                "they must be line-aligned"
            )
        if not sources:
            raise ValueError(f"{source_path} and {target_path} contain no examples")
        if n_obs is not None and n_obs < -1:
            raise ValueError(f"n_obs must be None, -1 (all) or >= 0, got {n_obs}")
        for name in ("question_encoder", "generator"):
            if getattr(tokenizer, name).pad_token_id is None:
                raise ValueError(f"the {name} tokenizer has no pad token, which collate_fn needs")
        if n_obs is not None and n_obs != -1:
            sources, targets = sources[:n_obs], targets[:n_obs]

        self.question_tokenizer = tokenizer.question_encoder
        self.generator_tokenizer = tokenizer.generator
        self.sources = [line.strip() for line in sources]
        self.targets = [line.strip() for line in targets]
        self.max_source_length = max_source_length
        self.max_target_length = max_target_length
        self.prefix = prefix

    def __len__(self) -> int:
        """Number of examples kept (after n_obs)."""
        return len(self.sources)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Return the raw texts plus unpadded `input_ids` (question encoder) and `labels` (generator)."""
        source, target = self.sources[index], self.targets[index]
        source_enc = self.question_tokenizer(self.prefix + source, truncation=True, max_length=self.max_source_length)
        target_enc = self.generator_tokenizer(target, truncation=True, max_length=self.max_target_length)
        input_ids, labels = source_enc["input_ids"], target_enc["input_ids"]
        return {"source_text": source, "target_text": target, "input_ids": input_ids, "labels": labels}

    def collate_fn(self, batch: list[dict[str, Any]]) -> dict[str, Any]:
        """Pad a list of examples to the batch's longest sequence, each side with its own pad id."""
        question_pad = self.question_tokenizer.pad_token_id
        input_ids, attention_mask = _pad([ex["input_ids"] for ex in batch], question_pad)
        labels, _ = _pad([ex["labels"] for ex in batch], self.generator_tokenizer.pad_token_id)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "source_text": [ex["source_text"] for ex in batch],
            "target_text": [ex["target_text"] for ex in batch],
        }


def normalize_answer(s: str) -> str:
    """Lowercase, drop punctuation and articles, collapse whitespace (SQuAD v1.1 normalisation)."""
    s = s.lower().translate(_PUNCTUATION_TABLE)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match_score(prediction: str, ground_truth: str) -> bool:
    """Whether prediction and gold answer are identical after normalisation."""
    return normalize_answer(prediction) == normalize_answer(ground_truth)


def f1_score(prediction: str, ground_truth: str) -> float:
    """Token bag-of-words F1 between normalised prediction and gold answer."""
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(ground_truth).split()
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)  # both empty is a match, one empty is not
    num_same = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_tokens)
    recall = num_same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def metric_max_over_ground_truths(
    metric_fn: Callable[[str, str], float], prediction: str, ground_truths: list[str]
) -> float:
    """Best score of the prediction against any of the gold answers."""
    if not ground_truths:
        raise ValueError("ground_truths must contain at least one answer")
    return max(metric_fn(prediction, gold) for gold in ground_truths)


def _mean_metric(
    metric_fn: Callable[[str, str], float], predictions: list[str], references: list[str] | list[list[str]]
) -> float:
    """Mean over examples of the best score against each example's gold answer(s)."""
    if len(predictions) != len(references):
        raise ValueError(f"got {len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("cannot average a metric over zero examples")
    total = 0.0
    for prediction, golds in zip(predictions, references):
        golds = [golds] if isinstance(golds, str) else golds
        total += metric_max_over_ground_truths(metric_fn, prediction, golds)
    return total / len(predictions)


def calculate_exact_match(predictions: list[str], references: list[str] | list[list[str]]) -> float:
    """Fraction of predictions that exactly match one of their gold answers, in [0, 1]."""
    return _mean_metric(exact_match_score, predictions, references)


def calculate_f1(predictions: list[str], references: list[str] | list[list[str]]) -> float:
    """Mean over examples of the best token F1 against the gold answers, in [0, 1]."""
    return _mean_metric(f1_score, predictions, references)
