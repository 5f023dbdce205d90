"""Statement-reconstruction examples mixed into training (--reconstruction_dir, --reconstruction_ratio): their files
read and checked, the masks that say which sentence to cut out of which passage, and the training loader's batches,
each all QA pairs or all statements, in a seeded order that gives statements the share R of an epoch's batches.

An epoch is one pass over the QA pairs (so --num_train_epochs keeps its meaning) plus round(n_qa * R / (1 - R))
statement batches, drawn from seeded passes over the statements; with R = 1 (documents only) it is one pass over the
statements. Every DDP rank gets its own share of both streams (padded as DistributedSampler pads) and the same order
of batch kinds, so all ranks take the same number of steps. The order depends on (seed, epoch) alone, so a run
resumed mid-epoch gets it back and torchdata's StatefulDataLoader skips the batches already trained on.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from torch.utils.data import BatchSampler, Sampler

from rag_end2end.data.qa_dataset import QuestionDataset
from rag_end2end.data.readers import InputError, read_gold, read_lines

RECONSTRUCTION_FILES = ("source", "target", "gold.jsonl")  # {split}.* of a --reconstruction_dir, line-aligned


class Mask(NamedTuple):
    """The sentence that a statement is: cut out of KB row `passage_id` wherever training shows that passage."""

    passage_id: int
    sentence: str


@dataclass
class ReconstructionGold:
    """Per statement of a split: its gold passages (KB rows) and its mask (None: nothing to cut)."""

    passage_ids: list[list[int]]
    masks: list[Mask | None]


def read_masks(path: str | Path) -> list[Mask | None]:
    """The `mask` field of each line of a reconstruction {split}.gold.jsonl: null, or {"passage_id": KB row,
    "sentence": the exact text of the statement in that passage}. A bad field is refused with its file and line."""
    masks = []
    for number, line in enumerate(read_lines(path), start=1):
        try:
            mask = json.loads(line).get("mask")
        except (json.JSONDecodeError, AttributeError):
            raise InputError(f"{path}:{number}: not a JSON object") from None
        if mask is None:
            masks.append(None)
            continue
        pid, sentence = (mask.get("passage_id"), mask.get("sentence")) if isinstance(mask, dict) else (None, None)
        if type(pid) is not int or pid < 0 or not isinstance(sentence, str) or not sentence:  # (a bool is no row)
            raise InputError(
                f'{path}:{number}: field `mask` must be null or {{"passage_id": a KB row (integer >= 0), '
                f'"sentence": a non-empty string}}, found {json.dumps(mask)[:120]}'
            )
        masks.append(Mask(pid, sentence))
    return masks


def read_reconstruction(directory: str | Path, split: str = "train") -> ReconstructionGold:
    """A --reconstruction_dir's {split} files, checked: all three there, line-aligned, the gold lines well-formed
    (errors name the file and line). Returns the gold passages and masks, by line."""
    directory = Path(directory)
    paths = [directory / f"{split}.{ext}" for ext in RECONSTRUCTION_FILES]
    if missing := [path.name for path in paths if not path.is_file()]:
        raise FileNotFoundError(
            f"--reconstruction_dir {directory} lacks {', '.join(missing)} (written by "
            "data_prep/make_reconstruction_data.py)"
        )
    counts = [len(read_lines(path)) for path in paths[:2]]
    gold = read_gold(str(paths[2]), "jsonl")
    masks = read_masks(paths[2])
    counts.append(len(masks))
    if len(set(counts)) != 1:
        sizes = ", ".join(f"{path} {n} lines" for path, n in zip(paths, counts))
        raise InputError(f"{sizes}: a reconstruction split must be line-aligned (one statement a line)")
    if not counts[0]:
        raise InputError(f"{paths[0]}: no statements")
    return ReconstructionGold(gold.passage_ids, masks)


def check_masks_in_kb(masks: list[Mask | None], passages, gold_path: str | Path, kb_name: str) -> None:
    """Every mask's sentence is in the text of its KB row of `passages` (a datasets.Dataset): data built from
    another KB would silently cut nothing. Refused with the gold file's line."""
    ids = sorted({m.passage_id for m in masks if m is not None})
    if not ids:
        return
    if ids[-1] >= len(passages):
        line = next(i for i, m in enumerate(masks, 1) if m is not None and m.passage_id == ids[-1])
        raise InputError(
            f"{gold_path}:{line}: mask passage_id {ids[-1]} is not a row of {kb_name} ({len(passages)} "
            "passages): was it built from another knowledge base?"
        )
    texts = dict(zip(ids, passages.select(ids)["text"]))
    for line, mask in enumerate(masks, start=1):
        if mask is not None and mask.sentence not in texts[mask.passage_id]:
            raise InputError(
                f"{gold_path}:{line}: the mask's sentence is not in passage {mask.passage_id} of "
                f"{kb_name}: was it built from another knowledge base?"
            )


def draw_masks(masks: list[Mask | None], lines: list[int], probability: float, seed: int, step: int) -> list:
    """Which statements of a batch are cut out of their passages this step: each mask kept with `probability`, by a
    draw seeded with (seed, step, the statement's line), so a resumed run draws the same."""
    if probability >= 1:
        return list(masks)
    return [
        m if m is not None and np.random.default_rng([seed, step, line]).random() < probability else None
        for m, line in zip(masks, lines)
    ]


# ----------------------------------------------------------------------------- the mixed training loader


class MixedDataset:
    """The QA pairs (rows 0 .. n_qa - 1; none with --reconstruction_ratio 1) then the statements, as one dataset."""

    def __init__(self, qa: QuestionDataset | None, statements: QuestionDataset):
        self.qa, self.statements = qa, statements
        self.n_qa = len(qa) if qa is not None else 0

    def __len__(self) -> int:
        return self.n_qa + len(self.statements)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.qa[index] if index < self.n_qa else self.statements[index - self.n_qa]

    def collate_fn(self, batch: list[dict[str, Any]]) -> dict[str, Any]:
        return self.statements.collate_fn(batch)  # both parts tokenise questions with the same tokenizer


def reconstruction_batches(qa_batches: int, ratio: float) -> int:
    """Statement batches beside `qa_batches` QA batches, so that they are the share `ratio` (< 1) of all."""
    return max(1, round(qa_batches * ratio / (1 - ratio)))  # a ratio above 0 trains on statements, however small


def _rank_share(order: np.ndarray, replicas: int, rank: int) -> list[int]:
    """This rank's share of `order`, padded from its start to a multiple of `replicas` (as DistributedSampler)."""
    padded = np.resize(order, math.ceil(len(order) / replicas) * replicas) if len(order) else order
    return padded[rank::replicas].tolist()


def _chunks(items: list[int], size: int) -> list[list[int]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


class MixedBatchSampler(BatchSampler):
    """The training batches of a MixedDataset, each all QA pairs or all statements, in a seeded order (module doc).

    `sampler` only says which DDP rank this is, which epoch and which seed (a DistributedSampler: Lightning calls its
    set_epoch every epoch, and under DDP puts its own in, with the rank and the run's seed); the batches follow from
    those alone. Batches are drawn lazily, at the first batch of an iteration, when the epoch is set."""

    def __init__(
        self,
        sampler: Sampler,
        batch_size: int,
        drop_last: bool = False,
        n_qa: int = 0,
        n_statements: int = 0,
        ratio: float = 1.0,
    ):
        super().__init__(sampler, batch_size, drop_last)
        if not 0 < ratio <= 1 or n_statements < 1 or (ratio < 1) != (n_qa > 0):
            raise ValueError(f"MixedBatchSampler: ratio {ratio} with {n_qa} QA pairs and {n_statements} statements")
        self.n_qa, self.n_statements, self.ratio = n_qa, n_statements, ratio

    @property
    def _replicas(self) -> tuple[int, int]:
        return getattr(self.sampler, "num_replicas", 1), getattr(self.sampler, "rank", 0)

    def counts(self) -> tuple[int, int]:
        """(QA batches, statement batches) of each rank in an epoch."""
        replicas, _ = self._replicas
        per_rank = math.ceil(self.n_qa / replicas)
        qa = math.ceil(per_rank / self.batch_size)
        if self.ratio == 1:
            return 0, math.ceil(math.ceil(self.n_statements / replicas) / self.batch_size)
        return qa, reconstruction_batches(qa, self.ratio)

    def __len__(self) -> int:
        return sum(self.counts())

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches (rows of the MixedDataset) in `epoch`, in order."""
        replicas, rank = self._replicas
        seed = getattr(self.sampler, "seed", 0)
        n_qa_batches, n_statement_batches = self.counts()
        rng = np.random.default_rng([seed, epoch, 0])
        qa = _chunks(_rank_share(rng.permutation(self.n_qa), replicas, rank), self.batch_size)
        if self.ratio == 1:  # one pass over the statements
            order = np.random.default_rng([seed, epoch, 1, 0]).permutation(self.n_statements)
            mine = _rank_share(order, replicas, rank)
        else:  # as many statements as the batches take, from seeded passes over them all
            wanted = n_statement_batches * self.batch_size * replicas
            passes = math.ceil(wanted / self.n_statements)
            order = np.concatenate(
                [np.random.default_rng([seed, epoch, 1, k]).permutation(self.n_statements) for k in range(passes)]
            )[:wanted]
            mine = order[rank::replicas].tolist()
        statements = _chunks([self.n_qa + i for i in mine], self.batch_size)
        assert (len(qa), len(statements)) == (n_qa_batches, n_statement_batches)
        total = n_qa_batches + n_statement_batches
        slots = set(np.random.default_rng([seed, epoch, 2]).permutation(total)[:n_statement_batches].tolist())
        qa_iter, statement_iter = iter(qa), iter(statements)
        return [next(statement_iter) if t in slots else next(qa_iter) for t in range(total)]

    def __iter__(self):
        yield from self.epoch_batches(getattr(self.sampler, "epoch", 0))
