"""Dataset and SQuAD-style metrics for end-to-end RAG fine-tuning."""

from __future__ import annotations

import argparse
import ast
import codecs
import csv
import functools
import json
import re
import string
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

_PUNCTUATION_TABLE = str.maketrans("", "", string.punctuation)
MAX_LINE_CHARS = 1_000_000  # a longer question, answer or KB field is a wrong file or a missing newline
# Byte-order marks that tell a file's encoding, with the name iconv knows it by (it then drops the mark).
_BOMS = (
    (codecs.BOM_UTF32_LE, "UTF-32LE", "UTF-32"),
    (codecs.BOM_UTF32_BE, "UTF-32BE", "UTF-32"),
    (codecs.BOM_UTF16_LE, "UTF-16LE", "UTF-16"),
    (codecs.BOM_UTF16_BE, "UTF-16BE", "UTF-16"),
)


class InputError(ValueError):
    """A user's input file is malformed; the message names the file, the line and the field where there is one."""


def guess_encoding(data: bytes) -> tuple[str, str] | None:
    """(iconv name, why) of the encoding that bytes which are not UTF-8 look like, when it can be told cheaply:
    a byte-order mark, NULs in every other byte (UTF-16 without a mark) or text that decodes as Windows-1252."""
    for bom, name, iconv_name in _BOMS:
        if data.startswith(bom):
            return iconv_name, f"it starts with a {name} byte-order mark"
    sample = data[:4096]
    even, odd = sample[0::2].count(0), sample[1::2].count(0)
    if max(even, odd) > len(sample) // 4:  # ASCII text in UTF-16: one byte of each pair is NUL
        name = "UTF-16LE" if odd > even else "UTF-16BE"
        return name, f"every other byte is NUL, as in {name} text without a byte-order mark"
    try:
        data.decode("cp1252")
    except UnicodeDecodeError:
        return None
    return "CP1252", "it decodes as Windows-1252 (cp1252, which covers Latin-1's letters)"


def encoding_error(path: str | Path) -> InputError:
    """The error for a file that is not UTF-8 text: the first bad byte (or NUL) by line and byte offset, and the
    encoding the file looks like, with the command that converts it."""
    path = Path(path)
    data = path.read_bytes()
    start, end, what = len(data), len(data), "a NUL byte, which UTF-8 text never holds"
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        start, end, what = e.start, e.end, "not UTF-8"
    nul = data.find(b"\x00")
    if 0 <= nul < start:
        start, end, what = nul, nul + 1, "a NUL byte, which UTF-8 text never holds"
    if start == len(data):
        return InputError(f"{path}: cannot be read as UTF-8 text")
    line = data.count(b"\n", 0, start) + 1
    column = start - data.rfind(b"\n", 0, start)
    shown = " ".join(f"0x{b:02x}" for b in data[start : min(end, start + 4)])
    message = f"{path}:{line}: {what}: {shown} at byte offset {start} (byte {column} of line {line})"
    guess = guess_encoding(data)
    if data[start] == 0 and (guess is None or guess[0] == "CP1252"):  # a NUL in text that is otherwise fine
        return InputError(f"{message}; remove it (is this a binary file?)")
    if guess is None:
        return InputError(f"{message}; re-save the file as UTF-8")
    name, why = guess
    fixed = path.with_name(f"{path.stem}.utf8{path.suffix}")
    return InputError(f"{message}; {why}: convert it to UTF-8, e.g. `iconv -f {name} -t UTF-8 {path} > {fixed}`")


def read_lines(path: str | Path) -> list[str]:
    """Read a one-example-per-line UTF-8 file, rejecting blank and over-long lines so source/target stay aligned."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: expected a UTF-8 text file with one example per line")
    try:
        # -sig: a UTF-8 byte-order mark is not part of line 1; newline="": a lone \r inside a line splits nothing
        with path.open(encoding="utf-8-sig", newline="") as f:
            text = f.read()
    except UnicodeDecodeError:
        raise encoding_error(path) from None
    if "\x00" in text:
        raise encoding_error(path)
    lines = [line.removesuffix("\r") for line in text.split("\n")]  # \r\n line ends too
    if lines[-1] == "":  # the final newline (or an empty file) does not start another line
        lines.pop()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            raise InputError(f"{path}:{number}: empty or whitespace-only line")
        if len(line) > MAX_LINE_CHARS:
            raise InputError(
                f"{path}:{number}: line is {len(line):,} characters long, over the limit of {MAX_LINE_CHARS:,} "
                "(utils_rag.MAX_LINE_CHARS): one example a line, is a newline missing?"
            )
    return lines


def _pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists to the longest one; return (ids, attention mask)."""
    import torch  # here, not at the top: retrieval actors import this module (kb_encode_utils) and never need it

    width = max(len(seq) for seq in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids, mask


class Seq2SeqDataset:
    """Question/answer pairs from `{type_path}.source`/`.target`: the texts, and the questions tokenised for
    the question encoder (generators tokenise their own prompts and answers: rag_model.py)."""

    def __init__(
        self,
        question_tokenizer,
        data_dir: str,
        max_source_length: int,
        type_path: str = "train",
        n_obs: int | None = None,
        prefix: str = "",
    ) -> None:
        source_path = Path(data_dir) / f"{type_path}.source"
        target_path = Path(data_dir) / f"{type_path}.target"
        sources, targets = read_lines(source_path), read_lines(target_path)
        if len(sources) != len(targets):
            raise ValueError(
                f"{source_path} has {len(sources)} lines but {target_path} has {len(targets)}; "
                "they must be line-aligned"
            )
        if not sources:
            raise ValueError(f"{source_path} and {target_path} contain no examples")
        if n_obs is not None and n_obs < -1:
            raise ValueError(f"n_obs must be None, -1 (all) or >= 0, got {n_obs}")
        if question_tokenizer.pad_token_id is None:
            raise ValueError("the question encoder tokenizer has no pad token, which collate_fn needs")
        if n_obs is not None and n_obs != -1:
            sources, targets = sources[:n_obs], targets[:n_obs]

        self.question_tokenizer = question_tokenizer
        self.sources = [line.strip() for line in sources]
        self.targets = [line.strip() for line in targets]
        self.max_source_length = max_source_length
        self.prefix = prefix

    def __len__(self) -> int:
        """Number of examples kept (after n_obs)."""
        return len(self.sources)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """The raw texts and the question's unpadded `input_ids`."""
        source, target = self.sources[index], self.targets[index]
        enc = self.question_tokenizer(self.prefix + source, truncation=True, max_length=self.max_source_length)
        return {"source_text": source, "target_text": target, "input_ids": enc["input_ids"], "index": index}

    def collate_fn(self, batch: list[dict[str, Any]]) -> dict[str, Any]:
        """Pad the questions to the batch's longest."""
        import torch

        input_ids, attention_mask = _pad([ex["input_ids"] for ex in batch], self.question_tokenizer.pad_token_id)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "source_text": [ex["source_text"] for ex in batch],
            "target_text": [ex["target_text"] for ex in batch],
            "index": torch.tensor([ex["index"] for ex in batch]),  # line numbers, to put DDP shards back in order
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


# ----------------------------------------------------------------------------- long-answer metrics

GENERATION_METRICS = ("em", "f1", "rouge_l", "bleu")


@functools.cache
def _rouge_l_scorer() -> Any:
    """The ROUGE-L scorer, built on first use (importing rouge_score pulls in nltk, which is slow)."""
    from rouge_score.rouge_scorer import RougeScorer

    return RougeScorer(["rougeL"], use_stemmer=True)


@functools.cache
def _bleu(effective_order: bool) -> Any:
    """A sacrebleu BLEU metric, built once; effective_order skips n-gram orders a short sentence lacks."""
    from sacrebleu.metrics import BLEU

    return BLEU(effective_order=effective_order)


def rouge_l_score(prediction: str, ground_truth: str) -> float:
    """ROUGE-L F-measure in [0, 1]: longest-common-subsequence overlap, which rewards word order in long answers."""
    return _rouge_l_scorer().score(ground_truth, prediction)["rougeL"].fmeasure


def corpus_bleu(predictions: list[str], references: list[str]) -> float:
    """sacrebleu corpus BLEU in [0, 100], one reference per prediction: n-gram precision pooled over the corpus."""
    if len(predictions) != len(references):
        raise ValueError(f"got {len(predictions)} predictions but {len(references)} references")
    return _bleu(False).corpus_score(predictions, [references]).score


def sentence_bleu(prediction: str, reference: str) -> float:
    """BLEU in [0, 100] of one sentence (effective order), so per-example sums can be averaged across batches."""
    return _bleu(True).sentence_score(prediction, [reference]).score


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


# ----------------------------------------------------------------------------- retrieval metrics


def _first_hit(items: list, is_hit: Callable[[Any], bool]) -> int | None:
    """1-based rank of the first item that is a hit, or None when none is."""
    return next((rank for rank, item in enumerate(items, start=1) if is_hit(item)), None)


def _mean_at_k(ranks: list[int | None], name: str, ks: tuple[int, ...], score: Callable[[int], float]) -> dict:
    """`name@k`: mean over questions of score(rank) when the first hit is within the top k, else 0; plus `n`."""
    if not ranks:
        return {"n": 0}
    means = {f"{name}@{k}": sum(score(r) for r in ranks if r is not None and r <= k) / len(ranks) for k in ks}
    return {**means, "n": len(ranks)}


def _gold_ranks(retrieved_ids: list[list[int]], gold_ids: list[list[int]]) -> list[int | None]:
    """Rank of the first gold id for each question that has gold ids (the others cannot be scored by id)."""
    if len(retrieved_ids) != len(gold_ids):
        raise ValueError(f"got {len(retrieved_ids)} retrieval results but {len(gold_ids)} gold id lists")
    return [_first_hit(list(r), set(g).__contains__) for r, g in zip(retrieved_ids, gold_ids) if len(g)]


def recall_at_k(
    retrieved_ids: list[list[int]], gold_ids: list[list[int]], ks: tuple[int, ...] = (1, 5, 10, 20)
) -> dict[str, float]:
    """`recall@k`: fraction of questions with a gold passage in the top k, over the `n` questions that have
    gold ids; only `n` when none has."""
    return _mean_at_k(_gold_ranks(retrieved_ids, gold_ids), "recall", ks, lambda rank: 1.0)


def mrr_at_k(
    retrieved_ids: list[list[int]], gold_ids: list[list[int]], ks: tuple[int, ...] = (1, 5, 10, 20)
) -> dict[str, float]:
    """`mrr@k`: mean reciprocal rank of the first gold passage (0 when not in the top k), over the `n`
    questions that have gold ids; only `n` when none has."""
    return _mean_at_k(_gold_ranks(retrieved_ids, gold_ids), "mrr", ks, lambda rank: 1.0 / rank)


def has_answer(passage: str, answers: list[str]) -> bool:
    """Whether a SQuAD-normalised answer occurs in the normalised passage as whole words ("liver" is not
    found in "delivery"); an answer that normalises to nothing never matches."""
    text = f" {normalize_answer(passage)} "
    return any(norm and f" {norm} " in text for norm in map(normalize_answer, answers))


def answer_recall_at_k(
    retrieved_texts: list[list[str]], answers: list[list[str]], ks: tuple[int, ...] = (1, 5, 10, 20)
) -> dict[str, float]:
    """`answer_recall@k`: fraction of questions with a top-k passage that contains one of their answers (the
    usual proxy when gold passages are unknown), over the `n` questions that have answers."""
    if len(retrieved_texts) != len(answers):
        raise ValueError(f"got {len(retrieved_texts)} retrieval results but {len(answers)} answer lists")
    ranks = [
        _first_hit(texts, lambda t, a=golds: has_answer(t, a))
        for texts, golds in zip(retrieved_texts, answers)
        if golds
    ]
    return _mean_at_k(ranks, "answer_recall", ks, lambda rank: 1.0)


def precision_at_k_titles(retrieved_titles: list[list[str]], gold_titles: list[list[str]], k: int) -> dict[str, float]:
    """The reference's provenance `precision@k`: |set(top-k titles) & gold titles| / k, averaged over the `n`
    questions with gold titles (a title retrieved twice counts once, as in the reference)."""
    if len(retrieved_titles) != len(gold_titles):
        raise ValueError(f"got {len(retrieved_titles)} retrieval results but {len(gold_titles)} gold title lists")
    scores = [len(set(r[:k]) & set(g)) / k for r, g in zip(retrieved_titles, gold_titles) if g]
    return {f"precision@{k}": sum(scores) / len(scores), "n": len(scores)} if scores else {"n": 0}


# ----------------------------------------------------------------------------- gold data


@dataclass
class Gold:
    """Per question: gold answers, gold passage ids (rows of the KB) and gold titles; each may be empty."""

    answers: list[list[str]]
    passage_ids: list[list[int]]
    titles: list[list[str]]


def one_line(text: str) -> str:
    """Whitespace (tabs, newlines) collapsed to single spaces: one prediction a line, one title a field."""
    return " ".join(text.split())


def _as_list(value) -> list:
    """A JSON field that holds one value or a list of them, as a list."""
    return [] if value is None else list(value) if isinstance(value, list | tuple) else [value]


def read_gold(path: str, mode: str) -> Gold:
    """Read gold data: `ans` one answer per line, `qa` the reference's `question<TAB>[answer list]` (a Python
    literal), `jsonl` the converters' {"answers", "gold_passage_ids", "title"}, `titles` tab-separated titles."""
    answers, ids, titles = [], [], []
    for number, line in enumerate(read_lines(Path(path)), start=1):
        where = f"{path}:{number}"
        if mode == "ans":
            answers.append([line.strip()])
        elif mode == "titles":
            titles.append([one_line(t) for t in line.split("\t") if t.strip()])
        elif mode == "qa":
            fields = next(csv.reader([line], delimiter="\t"))
            try:
                parsed = ast.literal_eval(fields[-1].strip()) if len(fields) >= 2 else None
            except (ValueError, SyntaxError) as e:
                raise InputError(f"{where}: the answer list is not a Python literal ({e})") from None
            parsed = [parsed] if isinstance(parsed, str) else parsed
            if not isinstance(parsed, list | tuple) or not all(isinstance(a, str) for a in parsed):
                raise InputError(f"{where}: expected `question<TAB>['answer', ...]`")
            answers.append(list(parsed))
        elif mode == "jsonl":
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{where}: not JSON ({e})") from None
            if not isinstance(record, dict):
                raise InputError(f'{where}: expected a JSON object {{"answers": [...], "gold_passage_ids": [...]}}')
            answers.append([str(a) for a in _as_list(record.get("answers"))])
            try:
                ids.append([int(i) for i in _as_list(record.get("gold_passage_ids"))])
            except (TypeError, ValueError):
                raise InputError(
                    f"{where}: field `gold_passage_ids` must list passage ids (integers), "
                    f"found {record['gold_passage_ids']!r}"
                ) from None
            titles.append([one_line(str(t)) for t in _as_list(record.get("title")) if str(t).strip()])
        else:
            raise ValueError(f"unknown --gold_data_mode {mode!r}")
    n = max(len(answers), len(ids), len(titles))
    return Gold(answers or [[]] * n, ids or [[]] * n, titles or [[]] * n)


def infer_gold_mode(path: str) -> str:
    """`jsonl` for .jsonl, `qa` for .tsv/.csv (the reference's qa files), else `ans` (e.g. a .target file)."""
    suffix = Path(path).suffix.lower()
    return "jsonl" if suffix == ".jsonl" else "qa" if suffix in {".tsv", ".csv"} else "ans"
