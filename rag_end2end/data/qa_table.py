"""Turn a table of questions into this toolkit's formats, with the gold passages that measure retrieval: DALM's CSV
(`Passage,Query,Answer`, or `Passage,Query` for its retriever-only mode) or any CSV, TSV or JSONL file with a
question, its answer(s) and, optionally, the passage that answers it and that passage's title.

    python data_prep/prepare_dalm_csv.py --input toy_data_train.csv --output_dir data/dalm
    python data_prep/prepare_qa_table.py --input qa.jsonl --output_dir data/mine \
        [--question_column Query --answer_column Answer --passage_column Passage --title_column Title \
         --delimiter tab --val_fraction 0.1 --test_fraction 0.1 --seed 42 --distractor_csv other_kb.csv]

The outputs are those of prepare_squad.py (kb.csv, {train,val,test}.{source,target,gold.jsonl}, stats.json).

Columns: each flag names a header; by default the first header that matches one of the usual names, ignoring case
(question/query, answers/answer, passage/context/text, title), so DALM's headers need no flag. CSV and TSV are read
as the CSV convention says (csv module, strict): a field that holds the delimiter, a quote or a line break is quoted
whole, with each quote inside doubled; a field that starts with a quote it does not close cleanly is refused with its
line. The delimiter: `--delimiter`, else tab for .tsv/.tab, else tab when the header line holds one, else comma.
JSONL: one object a line; an answer field may hold one answer or a list of them. In CSV/TSV `--answer_separator`
splits a cell into several answers.

Knowledge base: every distinct passage once (whitespace-normalised), titled by its title column, else by its first
sentence cut to MAX_TITLE_WORDS words (DALM's passages have no titles; a title is what the context encoder reads
before the text and what answers show as the source). Splits: by passage (by title when a title column is given:
an article's passages stay together), seeded, so no passage has questions in two splits; a question without a
passage is its own unit. Rows with the same question on the same passage are merged (their answers kept).
Gold passages: the 100-word passages of the question's passage that hold an answer, else every 100-word passage of
it (DALM's passages are mostly shorter than 100 words: one gold passage). Without an answer column (DALM's
retriever-only CSV) the .target line is the passage itself: retriever_only never reads it, and a generator would
learn to copy the passage.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
from collections.abc import Iterator
from pathlib import Path

from rag_end2end.data.readers import MAX_LINE_CHARS, InputError, encoding_error, run_main
from rag_end2end.data.squad import (
    Document,
    Question,
    add_common_args,
    check_args,
    clean,
    convert,
    dedupe_answers,
    lowercase_index,
)

FIELDS = ("question", "answer", "passage", "title")
DEFAULT_NAMES = {
    "question": ("question", "query"),
    "answer": ("answers", "answer"),
    "passage": ("passage", "context", "text"),
    "title": ("title",),
}
DELIMITERS = {"comma": ",", "tab": "\t", "semicolon": ";"}
MAX_TITLE_WORDS = 10
_SENTENCE_END = re.compile(r"(?<=[.!?])\s")


def derived_title(text: str) -> str:
    """A title for a passage that has none: its first sentence, cut to MAX_TITLE_WORDS words ("..." when cut)."""
    words = _SENTENCE_END.split(text, maxsplit=1)[0].split()
    return " ".join(words[:MAX_TITLE_WORDS]) + ("..." if len(words) > MAX_TITLE_WORDS else "")


def resolve_columns(path: Path, header: list[str], wanted: dict[str, str | None]) -> dict[str, str | None]:
    """Field -> header name: the one named (refused, with the headers found, when absent), else the first header
    matching a usual name ignoring case, else None. The question and an answer or a passage are required."""
    lowered = {h.strip().lower(): h for h in header}
    columns = {}
    for name in FIELDS:
        given = wanted.get(name)
        if given is not None:
            if given not in header:
                raise InputError(
                    f"{path}:1: no column {given!r} (--{name}_column); the header holds {', '.join(map(repr, header))}"
                )
            columns[name] = given
        else:
            columns[name] = next((lowered[n] for n in DEFAULT_NAMES[name] if n in lowered), None)
    if columns["question"] is None:
        raise InputError(
            f"{path}:1: no question column (looked for {', '.join(DEFAULT_NAMES['question'])}, any case); "
            f"the header holds {', '.join(map(repr, header))}: name it with --question_column"
        )
    if columns["answer"] is None and columns["passage"] is None:
        raise InputError(
            f"{path}:1: neither an answer nor a passage column (looked for "
            f"{', '.join(DEFAULT_NAMES['answer'] + DEFAULT_NAMES['passage'])}, any case): name one with "
            "--answer_column or --passage_column"
        )
    return columns


def _delimiter(path: Path, flag: str | None, first_line: str) -> str:
    if flag:
        return DELIMITERS.get(flag, flag)
    if path.suffix.lower() in {".tsv", ".tab"} or "\t" in first_line:
        return "\t"
    return ","


def read_rows(path: str | Path, args: argparse.Namespace) -> Iterator[tuple[int, dict[str, object]]]:
    """(line, {field: value}) of every row of a CSV, TSV or JSONL file, fields as `resolve_columns` maps them;
    a malformed row stops the reading with its file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (expected a CSV, TSV or JSONL table of questions)")
    wanted = {name: getattr(args, f"{name}_column") for name in FIELDS}
    try:
        if path.suffix.lower() in {".jsonl", ".json"}:
            yield from _read_jsonl(path, wanted)
        else:
            yield from _read_csv(path, wanted, args)
    except UnicodeDecodeError:
        raise encoding_error(path) from None


def _read_jsonl(path: Path, wanted: dict[str, str | None]) -> Iterator[tuple[int, dict[str, object]]]:
    columns = None
    with path.open(encoding="utf-8-sig") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{number}: not JSON ({e})") from None
            if not isinstance(record, dict):
                raise InputError(f'{path}:{number}: expected a JSON object, e.g. {{"question": ..., "answers": [...]}}')
            if columns is None:  # the first object's keys are the header
                columns = resolve_columns(path, list(record), wanted)
            yield number, {name: record.get(key) for name, key in columns.items() if key is not None}


def _read_csv(path: Path, wanted: dict[str, str | None], args) -> Iterator[tuple[int, dict[str, object]]]:
    limit = csv.field_size_limit(MAX_LINE_CHARS)  # process-wide: restored below
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            delimiter = _delimiter(path, args.delimiter, f.readline())
            f.seek(0)
            reader = csv.reader(f, delimiter=delimiter, strict=True)
            start, header = 1, None
            while True:
                try:
                    row = next(reader)
                except StopIteration:
                    break
                except csv.Error as e:
                    raise InputError(
                        f"{path}:{start}: malformed row ({e}); a field that holds {delimiter!r}, a quote or a line "
                        'break must be quoted whole, with each quote inside doubled: "say ""hi"" here"'
                    ) from None
                if header is None:
                    header = [h.strip() for h in row]
                    columns = resolve_columns(path, header, wanted)
                    position = {name: header.index(key) for name, key in columns.items() if key is not None}
                elif any(field.strip() for field in row):
                    if len(row) != len(header):
                        raise InputError(
                            f"{path}:{start}: expected {len(header)} fields separated by {delimiter!r} (as the "
                            f"header), found {len(row)}"
                        )
                    yield start, {name: row[i] for name, i in position.items()}
                start = reader.line_num + 1
    finally:
        csv.field_size_limit(limit)
    if header is None:
        raise InputError(f"{path}: empty file (expected a header line, e.g. Passage,Query,Answer)")


def _answers(value: object, separator: str | None) -> list[str]:
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    texts = [str(v) for v in values if v is not None]
    if separator and not isinstance(value, list):
        texts = [part for text in texts for part in text.split(separator)]
    return dedupe_answers(texts)


def load_table(path: str | Path, args: argparse.Namespace) -> tuple[list[Document], list[Question], dict]:
    """Documents (each distinct passage once) and questions (rows merged by question and passage) of a table."""
    path = Path(path)
    stats = dict.fromkeys(["rows", "merged_rows", "skipped_without_answer", "questions_without_passage"], 0)
    stats |= dict.fromkeys(["answers_found_in_passage", "answers_not_in_passage"], 0)
    docs: dict[tuple[str, str], int] = {}  # (title or "", text) -> index in `documents`
    documents: list[Document] = []
    merged: dict[tuple[str, int | None], Question] = {}
    has_answer_column = None
    for number, row in read_rows(path, args):
        stats["rows"] += 1
        question = clean(str(row.get("question") or ""))
        if not question:
            raise InputError(f"{path}:{number}: the question field is empty")
        if has_answer_column is None:
            has_answer_column = "answer" in row
        answers = _answers(row.get("answer"), args.answer_separator)
        passage = clean(str(row.get("passage") or ""))
        given_title = clean(str(row.get("title") or ""))
        if has_answer_column and not answers:
            stats["skipped_without_answer"] += 1
            continue
        if not has_answer_column and not passage:
            raise InputError(f"{path}:{number}: the passage field is empty, and the table has no answer column")
        d = None
        if passage:
            key = (given_title, passage) if "title" in row else ("", passage)
            if key not in docs:
                docs[key] = len(documents)
                title = given_title or derived_title(passage)
                documents.append(Document(title, passage, unit=given_title or passage))
            d = docs[key]
        else:
            stats["questions_without_passage"] += 1
        q = merged.get((question, d))
        if q is not None:
            stats["merged_rows"] += 1
            q.answers = dedupe_answers(q.answers + answers)
            continue
        if d is None:
            unit = given_title or f"question at line {number}"
            q = Question(f"{path.stem}-{number}", question, answers, given_title, unit=unit)
        else:
            doc = documents[d]
            q = Question(f"{path.stem}-{number}", question, answers, doc.title, unit=doc.split_key)
            q.target = "" if answers else doc.text
        merged[(question, d)] = q
    questions = list(merged.values())
    indexes = {}
    for (_, d), q in merged.items():
        if d is None:
            continue
        text = documents[d].text
        index = indexes.setdefault(d, lowercase_index(text))
        for answer in q.answers:
            q.spans.update((d, first, last) for first, last in index.find(answer.lower(), whole_tokens=False))
        found = bool(q.spans)
        stats["answers_found_in_passage" if found else "answers_not_in_passage"] += bool(q.answers)
        if not found:  # no answer, or none occurs in it: the passage as a whole is gold
            q.spans.add((d, 0, len(text.split(" ")) - 1))
    if not questions:
        raise InputError(f"{path}: no questions found (rows: {stats['rows']})")
    if not documents and not args.distractor_csv:
        raise InputError(
            f"{path}: no passages (no passage column, or every one empty): give the knowledge base to retrieve from "
            "with --distractor_csv kb.csv (`title<TAB>text`)"
        )
    stats["distinct_passages"] = len(documents)
    stats["without_answer_column"] = not has_answer_column
    return documents, questions, stats


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="a CSV, TSV (.tsv) or JSONL (.jsonl) file, one question a row")
    for name in FIELDS:
        usual = "/".join(DEFAULT_NAMES[name])
        parser.add_argument(f"--{name}_column", default=None, help=f"header of the {name} (default: {usual}, any case)")
    parser.add_argument("--delimiter", default=None, help="comma, tab, semicolon or one character (default: guessed)")
    parser.add_argument("--answer_separator", default=None, help="splits a CSV answer cell into several answers")
    add_common_args(parser)
    args = check_args(parser, parser.parse_args(argv))
    if args.delimiter and len(DELIMITERS.get(args.delimiter, args.delimiter)) != 1:
        parser.error(f"--delimiter {args.delimiter!r}: use comma, tab, semicolon or a single character")
    return args


def main(args: argparse.Namespace) -> dict:
    return convert(args, lambda: load_table(args.input, args), str(args.input))


def cli() -> None:
    """The command line (prepare_qa_table.py, and prepare_dalm_csv.py: the same converter)."""
    run_main(main, parse_args())


if __name__ == "__main__":
    cli()
