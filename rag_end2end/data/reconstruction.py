"""Statement-reconstruction examples from a knowledge base's own documents, for a domain that has no questions
(Siriwardhana et al., TACL 2023, arXiv 2210.02627). A domain statement, marked by RECONSTRUCTION_MARKER so that the
model tells it from a question, is the query; the retriever fetches passages for it and the generator must write
the statement back from them: the RAG loss, with no labels. A statement is a sentence of a KB passage (then the
trainer may cut it out of its passage with `mask_passage`, as the Inverse Cloze Task of Lee et al. 2019 does, so
that retrieval is not string matching) or an external one (--statements_path: abstracts, summaries, highlights).

    python make_reconstruction_data.py --csv_path my_kb.csv --output_dir data/recon \
        [--statements_path summaries.jsonl --per_passage 2 --max_statements 50000 --min_words 8 --max_words 60 \
         --val_fraction 0.05 --seed 42 --log_every 1000 --overwrite]

The KB is a `title<TAB>text` CSV, split into 100-word passages exactly as use_own_knowledge_dataset.py splits it:
passage ids are the rows of the KB it builds from the same CSV. --statements_path: JSONL, one
{"statement": str, "title": optional str} a line. Writes into --output_dir (refused when it holds files, unless
--overwrite: then only the files below are replaced):
  {train,val}.source      one query a line: RECONSTRUCTION_MARKER + statement
  {train,val}.target      the statement
  {train,val}.gold.jsonl  {"id", "title", "answers": [statement], "gold_passage_ids",
                          "mask": {"passage_id", "sentence"} or null}, line-aligned
  stats.json              counts: documents, passages, sentences seen, kept, skipped by each reason, cap hits

A KB statement's gold passage is the passage it was cut from, and `mask.sentence` is its exact text there. An
external statement has no mask; its gold passages are [] unless its title is a KB document's title: then the
passage(s) of that document sharing the most (IDF-weighted) words with it, ties kept.

Sentences: split by `split_sentences` (a regex splitter: line breaks, and . ! ? before a capital or a digit, except
after an abbreviation, an initial or inside a decimal; no model or data download). A sentence is skipped (and counted
by SKIP_REASONS, in that order) when it crosses a passage boundary, has under --min_words or over --max_words words,
is table-like, a reference or a caption, or repeats an earlier one. Of the rest, a seeded choice of at most
--per_passage per passage, then of at most --max_statements in all. The held-out val share (--val_fraction of the
documents, at least one) is split by document: a document is a title (rows that share one, e.g. the contexts of an
article, stay in one split), so no document has statements in both splits.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from rag_end2end.data.readers import InputError, one_line, read_kb_csv, read_lines, run_main
from rag_end2end.evaluation.metrics import normalize_answer
from rag_end2end.files import remove_orphaned_temporaries, temporary_sibling
from rag_end2end.kb.passages import split_documents
from rag_end2end.options import add_debug_arg

# The contract with the trainer, which imports these. A plain-text marker: every tokenizer family encodes it, so no
# spare special token (and no resized embedding matrix) is needed; it tells a statement from a question.
RECONSTRUCTION_MARKER = "statement: "
SPLITS = ("train", "val")
OUTPUT_FILES = (*(f"{s}.{ext}" for s in SPLITS for ext in ("source", "target", "gold.jsonl")), "stats.json")
SKIP_REASONS = (
    "cut_at_passage_boundary",  # starts in one 100-word passage and ends in the next: in neither verbatim
    "too_short",
    "too_long",
    "table_like",
    "reference",
    "caption",
    "duplicate",  # the same sentence (SQuAD-normalised) earlier in the KB: boilerplate, with no one gold passage
)
MIN_LETTER_SHARE = 0.5  # a sentence whose non-space characters are under half letters is a row of numbers
MAX_PIPES = 1  # more `|` than this: a table row

# ----------------------------------------------------------------------------- sentences

# str.splitlines' line boundaries: a statement is one line of .source/.target whatever reads it
_LINE = re.compile(r"[^\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029]+")
# A sentence end: . ! ? (or …), then closing quotes/brackets or a numeric citation like [12] or [3, 4], then a space
_END = re.compile(r"[.!?\u2026]+(?:[\"'\u201d\u2019\u00bb)\]]|\[\d[\d,;\u2013 -]*\])*(?=\s)")
_OPENERS = "\"'\u201c\u2018\u00ab(["
# Words written with a final period inside a sentence (lowercase, without that period). Not "etc.", which mostly ends
# one; single letters (initials) and dotted ones (e.g., i.e., U.S., Ph.D.) are matched by _DOTTED.
ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof sr jr st vs cf al fig figs eq eqs ref refs no nos vol vols pp ca approx resp inc ltd co corp "
    "dept univ jan feb mar apr jun jul aug sep sept oct nov dec".split()
)
_DOTTED = re.compile(r"[^\W\d_]|(?:[^\W\d_]{1,2}\.)+[^\W\d_]{1,2}")
_REFERENCE = re.compile(
    r"\bet al\b|\bdoi\b|https?://|\bwww\.|^\[\d+\]"  # et al., doi, links, a numbered reference-list entry
    r"|\b(?:19|20)\d\d\s*;\s*\d+\s*[:(]"  # a journal citation: 2010;84:123 or 2010; 84(3)
    r"|^\d+\.\s+[A-Z][\w'-]+,?\s+[A-Z]{1,3}[,.]",  # "12. Smith AB, ..." (a numbered reference)
    re.IGNORECASE,
)
# "Figure 3: ...", "Table 2 Baseline ...", "Fig. 4. ..." (not "Figure 1 shows ...", a sentence about the figure)
_CAPTION = re.compile(
    r"(?:Supplementary\s+)?(?:Figs?\.|FIGS?\.|Figure|FIGURE|Table|TABLE|Tab\.)\s*S?\d+[A-Za-z]?(?:\s*[:.|]|\s+[A-Z])"
)


def _stripped(text: str, start: int, end: int) -> tuple[int, int]:
    """[start, end) without the whitespace at either edge."""
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def _starts_sentence(text: str, pos: int, end: int) -> bool:
    """Whether the text after `pos` (spaces, then opening quotes/brackets) starts with a capital or a digit."""
    while pos < end and (text[pos].isspace() or text[pos] in _OPENERS):
        pos += 1
    return pos < end and (text[pos].isupper() or text[pos].isdigit())


def _abbreviation_before(text: str, line_start: int, period: int) -> bool:
    """Whether the word that ends at the period `text[period]` is an abbreviation or an initial (Dr., e.g., J.)."""
    start = period
    while start > line_start and not text[start - 1].isspace():
        start -= 1
    word = text[start:period].lstrip(_OPENERS).lower()
    return word in ABBREVIATIONS or _DOTTED.fullmatch(word) is not None


def split_sentences(text: str) -> list[tuple[int, int]]:
    """(start, end) character spans of the sentences of `text`, so that `text[start:end]` is each one verbatim.
    A line break always ends a sentence; . ! ? (with closing quotes, brackets or a citation like [12]) ends one when
    a space and a capital or a digit follow, unless it is the period of an abbreviation or an initial. A decimal
    (3.5) has no space after its point, so it never splits."""
    spans = []
    for line in _LINE.finditer(text):
        start = line.start()
        for end in _END.finditer(text, line.start(), line.end()):
            if not _starts_sentence(text, end.end(), line.end()):
                continue
            if end.group() == "." and _abbreviation_before(text, line.start(), end.start()):
                continue
            spans.append(_stripped(text, start, end.end()))
            start = end.end()
        spans.append(_stripped(text, start, line.end()))
    return [(start, end) for start, end in spans if start < end]


def is_table_like(sentence: str) -> bool:
    """A table row: several `|`, or mostly digits and symbols."""
    chars = "".join(sentence.split())
    letters = sum(c.isalpha() for c in chars)
    return sentence.count("|") > MAX_PIPES or letters < MIN_LETTER_SHARE * len(chars)


def skip_reason(sentence: str, min_words: int, max_words: int) -> str | None:
    """Why a sentence is no statement (a reason of SKIP_REASONS), or None when it is one; the first reason that holds,
    in SKIP_REASONS' order (the passage boundary and duplicates are the caller's to tell)."""
    words = len(sentence.split())
    if words < min_words:
        return "too_short"
    if words > max_words:
        return "too_long"
    if is_table_like(sentence):
        return "table_like"
    if _REFERENCE.search(sentence):
        return "reference"
    if _CAPTION.match(sentence):
        return "caption"
    return None


def mask_passage(text: str, sentence: str) -> str:
    """`text` with every occurrence of `sentence` cut out, the whitespace around each cut collapsed to one space (none
    at either end): the passage an Inverse-Cloze query must be found from without matching its own words. Unchanged
    when `sentence` is empty or not in `text`."""
    if not sentence:
        return text
    while (start := text.find(sentence)) >= 0:  # each cut shortens the text, so this ends
        before, after = text[:start].rstrip(), text[start + len(sentence) :].lstrip()
        text = f"{before} {after}" if before and after else before or after
    return text


# ----------------------------------------------------------------------------- statements


@dataclass
class Statement:
    """One example: its text, the split unit (its document), its gold passages and, for a KB sentence, the passage
    that holds it verbatim."""

    id: str
    text: str
    unit: str
    title: str | None
    gold_passage_ids: list[int]
    passage_id: int | None = None

    def gold_record(self) -> dict:
        """The line of {split}.gold.jsonl."""
        mask = None if self.passage_id is None else {"passage_id": self.passage_id, "sentence": self.text}
        return {
            "id": self.id,
            "title": self.title,
            "answers": [self.text],
            "gold_passage_ids": self.gold_passage_ids,
            "mask": mask,
        }


def unit_of(title: str, row: int) -> str:
    """A document's split unit: its title (rows sharing one are one document), or its row when it has none."""
    return f"title:{title}" if title else f"row:{row}"


def passage_spans(document: str, passages: list[str], where: str) -> list[tuple[int, int]]:
    """Where each of a document's passages (in order, as split_documents made them) lies in its text."""
    spans, pos = [], 0
    for passage in passages:
        start = document.find(passage, pos)
        if start < 0:  # split_documents cuts a text into consecutive pieces: this cannot happen unless it changes
            raise RuntimeError(f"{where}: a passage split_documents made is not in its document's text")
        spans.append((start, start + len(passage)))
        pos = start + len(passage)
    return spans


def read_statements(path: str | Path) -> list[tuple[int, str, str | None]]:
    """(line, statement, title or None) of a JSONL statements file, one {"statement": str, "title": optional str} a
    line; whitespace (newlines too) is collapsed, so each is one line of .source/.target. A bad line is refused
    with the file, line and field."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f'--statements_path {path}: not found (expected JSONL, one {{"statement": ...}} a line)'
        )
    found = []
    for number, line in enumerate(read_lines(path), start=1):
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{where}: not JSON ({e})") from None
        if not isinstance(record, dict):
            raise InputError(f'{where}: expected a JSON object {{"statement": "...", "title": "..."}}')
        if "statement" not in record:
            raise InputError(f"{where}: missing field `statement`")
        statement, title = record["statement"], record.get("title")
        if not isinstance(statement, str) or not one_line(statement):
            raise InputError(f"{where}: field `statement` must be a non-empty string, found {statement!r:.80}")
        if title is not None and not isinstance(title, str):
            raise InputError(f"{where}: field `title` must be a string or null, found {title!r:.80}")
        found.append((number, one_line(statement), one_line(title) if title else None))
    if not found:
        raise InputError(f"{path}: no statements found")
    return found


def best_passages(statement: str, pids: list[int], texts: list[str]) -> list[int]:
    """Of the passages `pids`, those sharing the most words with `statement`, each word weighted by its rarity among
    them (log(1 + n / passages that hold it): words every passage has count little); [] when none shares a word."""
    words = set(normalize_answer(statement).split())
    shared = {p: words & set(normalize_answer(texts[p]).split()) for p in pids}
    df = Counter(w for common in shared.values() for w in common)
    scores = {p: sum(sorted(math.log(1 + len(pids) / df[w]) for w in common)) for p, common in shared.items()}
    best = max(scores.values(), default=0.0)
    return sorted(p for p, score in scores.items() if score == best) if best > 0 else []


def kb_statements(docs: list[tuple[str, str]], args: argparse.Namespace, stats: dict) -> tuple[list, list, list]:
    """The KB's statements (a seeded choice of at most --per_passage per passage), with the passages' texts and
    document rows; counts go to `stats`."""
    # split_documents itself gives the passage rows; a document's row as its title tells which document each is from
    passages = split_documents([(str(row), text) for row, (_, text) in enumerate(docs)])
    texts, doc_of = passages["text"], [int(row) for row in passages["title"]]
    first = [0] * (len(docs) + 1)
    for row in doc_of:
        first[row + 1] += 1
    for row in range(len(docs)):
        first[row + 1] += first[row]
    rng, seen, statements = random.Random(args.seed), set(), []
    skipped = stats["skipped"]
    for row, (title, document) in enumerate(docs):
        pids = range(first[row], first[row + 1])
        spans = passage_spans(document, [texts[p] for p in pids], f"{args.csv_path}: document {row + 1}")
        candidates = defaultdict(list)  # passage id -> (offset in its text, sentence)
        k = 0
        for start, end in split_sentences(document):
            stats["sentences_seen"] += 1
            while k < len(spans) and spans[k][1] <= start:
                k += 1
            if k == len(spans) or not spans[k][0] <= start < end <= spans[k][1]:
                skipped["cut_at_passage_boundary"] += 1
                continue
            sentence = document[start:end]
            reason = skip_reason(sentence, args.min_words, args.max_words)
            key = normalize_answer(sentence)
            if reason is None and key in seen:
                reason = "duplicate"
            if reason:
                skipped[reason] += 1
                continue
            seen.add(key)
            candidates[pids[k]].append((start - spans[k][0], sentence))
        for pid, found in candidates.items():
            if len(found) > args.per_passage:
                stats["passages_at_per_passage_cap"] += 1
                stats["over_per_passage_cap"] += len(found) - args.per_passage
                found = [found[i] for i in sorted(rng.sample(range(len(found)), args.per_passage))]
            for offset, sentence in found:
                assert texts[pid][offset : offset + len(sentence)] == sentence  # the mask is findable
                statements.append(Statement(f"p{pid}-c{offset}", sentence, unit_of(title, row), title, [pid], pid))
        if (row + 1) % args.log_every == 0:
            print(f"{row + 1:,}/{len(docs):,} documents: {len(statements):,} statements", flush=True)
    return statements, texts, doc_of


def external_statements(
    found: list[tuple[int, str, str | None]], docs: list[tuple[str, str]], texts: list[str], doc_of: list[int]
) -> tuple[list[Statement], int]:
    """The --statements_path statements, and how many have a title that is a KB document's: those are gold at that
    document's best-overlapping passages (best_passages) and go to its split."""
    rows_of = defaultdict(list)
    for row, (title, _) in enumerate(docs):
        rows_of[one_line(title)].append(row)
    pids_of = defaultdict(list)
    for pid, row in enumerate(doc_of):
        pids_of[row].append(pid)
    statements, matched = [], 0
    for number, text, title in found:
        rows = rows_of.get(title, []) if title else []
        gold = best_passages(text, [p for row in rows for p in pids_of[row]], texts) if rows else []
        matched += bool(rows)
        # a matched title joins its document's unit; an unmatched one groups the statements that share it
        unit = unit_of(docs[rows[0]][0], rows[0]) if rows else f"title:{title}" if title else f"statement:{number}"
        statements.append(Statement(f"s{number}", text, unit, title, gold))
    return statements, matched


def split_by_document(statements: list[Statement], val_fraction: float, seed: int) -> dict[str, list[Statement]]:
    """A seeded val share of the documents (at least one, and never all) and train the rest, each shuffled."""
    units = sorted({s.unit for s in statements})
    if len(units) < 2:
        raise ValueError(
            f"the statements kept come from {len(units)} document(s): at least 2 are needed to hold one out for "
            "validation (add documents or --statements_path, or relax --min_words/--max_words)"
        )
    rng = random.Random(f"{seed}-split")
    rng.shuffle(units)
    val = set(units[: min(max(1, round(len(units) * val_fraction)), len(units) - 1)])
    splits = {"train": [s for s in statements if s.unit not in val], "val": [s for s in statements if s.unit in val]}
    for split in SPLITS:
        rng.shuffle(splits[split])
    return splits


# ----------------------------------------------------------------------------- outputs


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Refuse, before any work, an --output_dir that is a file, or that holds files unless --overwrite (what an
    interrupted run of ours left, its temporary files, is removed first)."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--output_dir {out} is a file, not a directory")
    for path in remove_orphaned_temporaries(out):
        print(f"removed {path}: left by an interrupted run")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(
            f"--output_dir {out} is not empty; pass --overwrite to replace the files this script writes there "
            "(others are left alone) or choose another --output_dir"
        )


def output_files(splits: dict[str, list[Statement]], stats: dict) -> dict[str, str]:
    """The contents of every output file, stats.json last."""
    files = {}
    for split in SPLITS:
        items = splits[split]
        files[f"{split}.source"] = "".join(RECONSTRUCTION_MARKER + s.text + "\n" for s in items)
        files[f"{split}.target"] = "".join(s.text + "\n" for s in items)
        files[f"{split}.gold.jsonl"] = "".join(json.dumps(s.gold_record(), ensure_ascii=False) + "\n" for s in items)
    files["stats.json"] = json.dumps(stats, indent=1) + "\n"
    assert tuple(files) == OUTPUT_FILES
    return files


def write_files(out: Path, files: dict[str, str]) -> None:
    """Write every file under a temporary name, then rename them all into place, stats.json last."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = {name: temporary_sibling(out / name) for name in files}
    try:
        for name, path in tmp.items():
            path.write_text(files[name], encoding="utf-8")
        for name, path in tmp.items():
            os.replace(path, out / name)
    finally:
        for path in tmp.values():
            path.unlink(missing_ok=True)  # our own temporary files, left only when writing failed


# ----------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--csv_path", required=True, help="the knowledge base: `title<TAB>text` lines")
    p.add_argument(
        "--statements_path",
        default=None,
        help='more statements: JSONL, one {"statement": str, "title": optional str} a line',
    )
    p.add_argument("--output_dir", required=True, help="where the splits and stats.json go")
    p.add_argument("--per_passage", type=int, default=2, help="at most N statements from one passage")
    p.add_argument("--max_statements", type=int, default=None, help="at most N statements in all (a seeded choice)")
    p.add_argument("--min_words", type=int, default=8, help="skip sentences of fewer words")
    p.add_argument("--max_words", type=int, default=60, help="skip sentences of more words")
    p.add_argument("--val_fraction", type=float, default=0.05, help="share of the documents held out for val")
    p.add_argument("--seed", type=int, default=42, help="seeds the choice of statements and the split")
    p.add_argument("--log_every", type=int, default=1000, help="print progress every N documents")
    p.add_argument("--overwrite", action="store_true", help="replace the files of an earlier run in --output_dir")
    add_debug_arg(p)
    args = p.parse_args(argv)
    for flag in ("per_passage", "min_words", "log_every"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} must be at least 1")
    if args.max_words < args.min_words:
        p.error(f"--max_words ({args.max_words}) must be at least --min_words ({args.min_words})")
    if args.max_statements is not None and args.max_statements < 2:
        p.error("--max_statements must be at least 2 (one for train, one for val)")
    if not 0 < args.val_fraction < 1:
        p.error("--val_fraction must be in (0, 1): the val split holds at least one document")
    return args


def main(args: argparse.Namespace) -> dict:
    """Read the KB (and statements), choose, split and write; returns the stats."""
    out = Path(args.output_dir)
    check_output_dir(out, args.overwrite)
    docs = read_kb_csv(args.csv_path)
    found = read_statements(args.statements_path) if args.statements_path else []
    stats = {
        "csv_path": str(args.csv_path),
        "statements_path": args.statements_path,
        "seed": args.seed,
        "documents": len(docs),
        "passages": 0,
        "sentences_seen": 0,
        "skipped": dict.fromkeys(SKIP_REASONS, 0),
        "passages_at_per_passage_cap": 0,
        "over_per_passage_cap": 0,
    }
    statements, texts, doc_of = kb_statements(docs, args, stats)
    stats["passages"], stats["kb_statements"] = len(texts), len(statements)
    extra, matched = external_statements(found, docs, texts, doc_of)
    stats |= {"external_statements": len(extra), "external_with_kb_title": matched}
    if long := sum(len(s.text.split()) > args.max_words for s in extra):
        warnings.warn(
            f"{args.statements_path}: {long} statement(s) over --max_words {args.max_words} words, kept "
            "(external statements are not filtered); the trainer truncates them",
            stacklevel=1,
        )
    statements += extra
    stats["over_max_statements"] = 0
    if args.max_statements is not None and len(statements) > args.max_statements:
        stats["over_max_statements"] = len(statements) - args.max_statements
        rng = random.Random(f"{args.seed}-max")
        statements = [statements[i] for i in sorted(rng.sample(range(len(statements)), args.max_statements))]
    splits = split_by_document(statements, args.val_fraction, args.seed)
    stats["kept"] = len(statements)
    stats["documents_per_split"] = {split: len({s.unit for s in splits[split]}) for split in SPLITS}
    stats["statements"] = {split: len(splits[split]) for split in SPLITS}
    write_files(out, output_files(splits, stats))
    skipped = ", ".join(f"{n:,} {reason}" for reason, n in stats["skipped"].items() if n) or "none"
    capped = (
        f"{stats['over_per_passage_cap']:,} over --per_passage in {stats['passages_at_per_passage_cap']:,} passages"
    )
    print(
        f"{args.csv_path}: {len(docs):,} documents, {len(texts):,} passages, {stats['sentences_seen']:,} sentences; "
        f"skipped {skipped}; {capped}; {len(extra):,} external ({matched:,} with a KB title); kept "
        f"{len(statements):,}: train {len(splits['train']):,}, val {len(splits['val']):,}; wrote {out}"
    )
    return stats


def cli() -> None:
    """The command line."""
    run_main(main, parse_args())


if __name__ == "__main__":
    cli()
