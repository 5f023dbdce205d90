"""Readers of the user's input files, each refusing bad input with the file, line and field before any work:
line-aligned QA files, gold data (answers and gold passages), the knowledge-base CSV and model paths; and how the
scripts report such a refusal (one line, the traceback with --debug)."""

from __future__ import annotations

import argparse
import ast
import codecs
import csv
import itertools
import json
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    if "\r" in text and "\n" not in text.rstrip("\r"):  # old Mac line ends: the file would read as one example
        raise InputError(
            f"{path}: lines end in a bare carriage return (\\r), so the file reads as one line; "
            f"convert it: tr '\\r' '\\n' < {path} > fixed && mv fixed {path}"
        )
    lines = [line.removesuffix("\r") for line in text.split("\n")]  # \r\n line ends too
    if lines[-1] == "":  # the final newline (or an empty file) does not start another line
        lines.pop()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            raise InputError(f"{path}:{number}: empty or whitespace-only line")
        if len(line) > MAX_LINE_CHARS:
            raise InputError(
                f"{path}:{number}: line is {len(line):,} characters long, over the limit of {MAX_LINE_CHARS:,} "
                "(input_readers.MAX_LINE_CHARS): one example a line, is a newline missing?"
            )
    return lines


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


def check_gold_ids(gold: Gold, path: str | Path, kb_size: int, kb: str) -> None:
    """Refuse gold passage ids that are no row of the KB (`kb`: how to name it, with its `kb_size` passages), naming
    the file and line: scored as misses, or taken as positives, they would go unnoticed."""
    for number, ids in enumerate(gold.passage_ids, start=1):
        bad = next((i for i in ids if not 0 <= i < kb_size), None)
        if bad is not None:
            raise InputError(
                f"{path}:{number}: field `gold_passage_ids`: {bad} is no passage of {kb} ({kb_size} passages, ids "
                f"0-{kb_size - 1}): was the gold file written for another KB?"
            )


def infer_gold_mode(path: str) -> str:
    """`jsonl` for .jsonl, `qa` for .tsv/.csv (the reference's qa files), else `ans` (e.g. a .target file)."""
    suffix = Path(path).suffix.lower()
    return "jsonl" if suffix == ".jsonl" else "qa" if suffix in {".tsv", ".csv"} else "ans"


KB_FIELDS = ("title", "text")

_UNQUOTED_FIELD = re.compile(r"[^\t\r\n]*")

_NEWLINE = re.compile(r"\r\n?|\n")  # how a file opened with newline="" splits lines, hence csv's line_num


def _field_name(column: int) -> str:
    """`title` (column 1), `text` (column 2), else just the column."""
    return f"field `{KB_FIELDS[column - 1]}` (column {column})" if column <= len(KB_FIELDS) else f"column {column}"


def _closing_quote_end(raw: str, pos: int) -> int | None:
    """End of the quoted field that opens at `raw[pos]` (doubled quotes are part of it), None when unclosed."""
    pos += 1
    while (pos := raw.find('"', pos)) >= 0:
        if raw[pos + 1 : pos + 2] != '"':
            return pos + 1
        pos += 2
    return None


def _quote_fix(field: str) -> str:
    """How to write a field that starts with a quote (`field`: as typed) so that it reads back as typed."""
    example = field if len(field) <= 60 else '"hi" she said'
    quoted = '"' + example.replace('"', '""') + '"'
    return f"quote the whole field and double each quote inside it: write `{example}` as `{quoted}`"


def _merged_lines_error(where: str, first: int, last: int, typed: str) -> InputError:
    """A field that opens a quote which a later line closes: the lines between became one field."""
    return InputError(
        f'{where} starts with a quote (") that is not closed on that line, so lines {first}-{last} were read as one '
        f"field (documents merged into one); if the quote is part of the text, {_quote_fix(typed)}"
    )


def _row_error(path: Path, start: int, raw: str, error: csv.Error) -> InputError:
    """Explain a csv error in the row that starts on line `start` (`raw`: its lines read so far): the first field
    that opens a quote it does not close cleanly, or one over MAX_LINE_CHARS."""
    pos, column, line = 0, 1, start
    while pos < len(raw):
        typed = _UNQUOTED_FIELD.match(raw, pos).group()  # a quoted field as typed: up to the end of its line or a tab
        quoted = raw[pos] == '"'
        closed = _closing_quote_end(raw, pos) if quoted else pos + len(typed)
        end = len(raw) if closed is None else closed
        where, lines = f"{path}:{line}: {_field_name(column)}", len(_NEWLINE.findall(raw, pos, end))
        if end - pos > MAX_LINE_CHARS:
            stray = f'; it starts with a quote (") not closed on that line: {_quote_fix(typed)}'
            return InputError(
                f"{where} is over the limit of {MAX_LINE_CHARS:,} characters (input_readers.MAX_LINE_CHARS)"
                + (stray if quoted and lines else "; split it into several documents")
            )
        if closed is None:
            return InputError(
                f'{where} starts with a quote (") that is never closed, so every line after it would be read '
                f"into that field; if the quote is part of the text, {_quote_fix(typed)}"
            )
        if quoted and lines:
            return _merged_lines_error(where, line, line + lines, typed)
        if quoted and end < len(raw) and raw[end] not in "\t\r\n":
            return InputError(
                f'{where} starts with a quote (") that closes before the field ends, so the quotes would be lost; '
                f"{_quote_fix(typed)}"
            )
        line += lines
        if raw[end : end + 1] != "\t":
            break
        pos, column = end + 1, column + 1
    return InputError(f"{path}:{start}: malformed row ({error})")


def _check_row(path: Path, row: list[str], start: int) -> tuple[str, str]:
    """The (title, text) of a parsed row that starts on line `start`, or the error that names its line and field."""
    line = start
    for column, field in enumerate(row, start=1):
        if "\t" in field and _NEWLINE.search(field):  # only a quote can put both in a field
            typed = '"' + re.split(r"[\t\r\n]", field, maxsplit=1)[0]
            last = line + len(_NEWLINE.findall(field))
            raise _merged_lines_error(f"{path}:{line}: {_field_name(column)}", line, last, typed)
        line += len(_NEWLINE.findall(field))
    if not row or all(not field.strip() for field in row):
        raise InputError(f"{path}:{start}: empty line; every line must be `title<TAB>text`")
    if len(row) != 2:
        raise InputError(f"{path}:{start}: expected 2 tab-separated fields (title, text), found {len(row)}")
    title, text = row
    if not text.strip():
        raise InputError(f"{path}:{start}: field `text` (column 2) is empty")
    if "\x00" in title or "\x00" in text:
        raise encoding_error(path)
    return title.strip(), text.strip()


def read_kb_csv(csv_path: str | os.PathLike) -> list[tuple[str, str]]:
    """Read a tab-separated UTF-8 `title<TAB>text` file (no header), failing on the first bad row with its line and
    field; warns about duplicate documents, which would be retrieved side by side."""
    path = Path(csv_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: knowledge-base CSV not found (expected `title<TAB>text` lines)")
    docs, first_line, duplicates = [], {}, []
    limit = csv.field_size_limit(MAX_LINE_CHARS)  # process-wide: restored below
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            # strict: a field that opens a quote and closes it before its end is an error, not silently unquoted
            reader = csv.reader(f, delimiter="\t", strict=True)
            while True:
                start = reader.line_num + 1
                try:
                    row = next(reader)
                except StopIteration:
                    break
                except csv.Error as e:
                    f.seek(0)
                    raw = "".join(itertools.islice(f, start - 1, reader.line_num))
                    raise _row_error(path, start, raw, e) from None
                doc = _check_row(path, row, start)
                if doc in first_line:
                    duplicates.append((first_line[doc], start))
                first_line.setdefault(doc, start)
                docs.append(doc)
    except UnicodeDecodeError:
        raise encoding_error(path) from None
    finally:
        csv.field_size_limit(limit)
    if not docs:
        raise InputError(f"{path}: no documents found")
    if duplicates:
        first, again = duplicates[0]
        warnings.warn(
            f"{path}: {len(duplicates)} duplicate document(s) (same title and text), e.g. line {again} repeats line "
            f"{first}; each copy becomes passages of its own, retrieved side by side",
            stacklevel=2,
        )
    return docs


def check_model_path(flag: str, name: str | None) -> None:
    """Refuse a local model directory that does not exist, instead of letting the hub call it a bad repo id."""
    if not name or Path(name).exists():
        return
    parent = Path(name).expanduser().parent
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or (parent != Path(".") and parent.is_dir()):
        raise FileNotFoundError(f"--{flag} {name}: no such directory (a hub model is named org/name)")


# ---------------------------------------------------------------------- refusals

REFUSALS = (ValueError, OSError, RuntimeError)  # what the checks above and the scripts' own checks raise


@contextmanager
def refusing() -> Iterator[None]:
    """Errors raised inside are refusals (bad input or set-up, met before any work), which `run_main` reports in
    one line; errors outside keep their traceback (a crash mid-training is not a refusal)."""
    try:
        yield
    except REFUSALS as err:
        err.refusal = True
        raise


def run_main(main: Callable[[argparse.Namespace], Any], args: argparse.Namespace, marked_only: bool = False) -> Any:
    """A script's `main(args)`, whose refusal ends the script with one line, `script.py: error: ...`, and exit
    status 2, as argparse's own errors do; `--debug` shows the traceback. A refusal is an error raised inside
    `refusing()`, or with `marked_only` False any ValueError, OSError or RuntimeError."""
    try:
        return main(args)
    except REFUSALS as err:
        if getattr(args, "debug", False) or (marked_only and not getattr(err, "refusal", False)):
            raise
        print(f"{Path(sys.argv[0]).name}: error: {err} (--debug shows the traceback)", file=sys.stderr)
        raise SystemExit(2) from None
