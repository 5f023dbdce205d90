"""Turn WikiQA (Microsoft; research use only: the data set is not bundled) into this toolkit's formats, with the gold
passages needed to measure retrieval; the outputs are those of prepare_squad.py.

    python data_prep/prepare_wikiqa.py --input WikiQA-train.tsv.gz WikiQA-dev.tsv.gz WikiQA-test.tsv.gz \
        --output_dir data/wikiqa [--val_fraction 0.1 --test_fraction 0.1 --seed 42 --distractor_csv other_kb.csv]

Input: WikiQA's TSV files (gzipped or not), header `QuestionID Question DocumentID DocumentTitle SentenceID Sentence
Label`, one candidate sentence a line. The files are plain tab-separated text, not CSV: a sentence that starts with
a quote (`"True" sebaceous cysts are ...`) is read as written, quotes kept. Every document (DocumentID; WikiQA's
Wikipedia summary paragraphs) becomes one knowledge-base document, its sentences joined in SentenceID order and titled
by DocumentTitle; a document that several questions (or files) share is written once. A question's answers are its
sentences labelled 1; a question with none (two thirds of WikiQA's) is skipped and counted. Gold passages: the
100-word passages that hold a correct sentence (both, when one spans a passage boundary). Splits are by document,
seeded, across all the files given: WikiQA's own train/dev/test share documents (35 between train and dev), so they
are not kept.
"""

from __future__ import annotations

import argparse
import gzip
from dataclasses import dataclass, field
from pathlib import Path

from rag_end2end.data.readers import InputError, encoding_error, run_main
from rag_end2end.data.squad import (
    Document,
    Question,
    add_common_args,
    check_args,
    clean,
    convert,
)

COLUMNS = ("QuestionID", "Question", "DocumentID", "DocumentTitle", "SentenceID", "Sentence", "Label")


@dataclass
class _Doc:
    title: str
    sentences: dict[int, str] = field(default_factory=dict)  # sentence number -> text


@dataclass
class _Question:
    id: str
    question: str
    document: str
    correct: list[int] = field(default_factory=list)  # sentence numbers labelled 1


def _sentence_number(sentence_id: str, document_id: str, where: str) -> int:
    """`D12-3` -> 3: the sentence's place in its document."""
    prefix, _, number = sentence_id.rpartition("-")
    if prefix != document_id or not number.isdigit():
        raise InputError(f"{where}: field SentenceID {sentence_id!r} is not `{document_id}-<number>`")
    return int(number)


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (expected WikiQA's TSV, e.g. WikiQA-train.tsv.gz)")
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        if path.suffix == ".gz":
            raise InputError(f"{path}: the decompressed text is not UTF-8") from None
        raise encoding_error(path) from None


def read_wikiqa(paths: list[str | Path], docs: dict[str, _Doc], questions: dict[tuple[str, str], _Question]) -> int:
    """Add the rows of WikiQA TSV files to `docs` and `questions` (keyed by file and QuestionID); the row count."""
    rows = 0
    for path in map(Path, paths):
        lines = _read_text(path).split("\n")
        header = lines[0].rstrip("\r").split("\t")
        missing = [c for c in COLUMNS if c not in header]
        if missing:
            raise InputError(f"{path}:1: header lacks column(s) {', '.join(missing)}; found {header}")
        at = {c: header.index(c) for c in COLUMNS}
        for number, line in enumerate(lines[1:], start=2):
            line = line.rstrip("\r")
            if not line.strip():
                continue
            fields = line.split("\t")
            where = f"{path}:{number}"
            if len(fields) != len(header):
                raise InputError(f"{where}: expected {len(header)} tab-separated fields, found {len(fields)}")
            row = {c: fields[i] for c, i in at.items()}
            if row["Label"].strip() not in {"0", "1"}:
                raise InputError(f"{where}: field Label is {row['Label']!r}, expected 0 or 1")
            doc_id = row["DocumentID"].strip()
            n = _sentence_number(row["SentenceID"].strip(), doc_id, where)
            doc = docs.setdefault(doc_id, _Doc(clean(row["DocumentTitle"]) or doc_id))
            doc.sentences.setdefault(n, clean(row["Sentence"]))
            q = questions.setdefault(
                (str(path), row["QuestionID"]), _Question(row["QuestionID"], clean(row["Question"]), doc_id)
            )
            if q.document != doc_id:
                raise InputError(f"{where}: question {q.id} names document {doc_id}, an earlier line {q.document}")
            if row["Label"].strip() == "1":
                q.correct.append(n)
            rows += 1
    return rows


def load_wikiqa(paths: list[str | Path]) -> tuple[list[Document], list[Question], dict]:
    """Documents (each WikiQA document once, sentences in order) and the questions with a correct sentence."""
    docs: dict[str, _Doc] = {}
    raw: dict[tuple[str, str], _Question] = {}
    rows = read_wikiqa(paths, docs, raw)
    documents, first_word = [], {}  # DocumentID -> (index, {sentence number: (first word, last word)})
    for doc_id, doc in docs.items():
        spans, words = {}, 0
        for n in sorted(doc.sentences):
            length = len(doc.sentences[n].split())
            if length:
                spans[n] = (words, words + length - 1)
                words += length
        text = " ".join(doc.sentences[n] for n in sorted(doc.sentences) if doc.sentences[n])
        if not text:
            continue
        first_word[doc_id] = (len(documents), spans)
        documents.append(Document(doc.title, text, unit=doc_id))
    questions, stats = [], {"rows": rows, "wikiqa_questions": len(raw), "skipped_without_correct_sentence": 0}
    for q in raw.values():
        correct = [n for n in dict.fromkeys(q.correct) if docs[q.document].sentences.get(n)]
        if not correct or not q.question:
            stats["skipped_without_correct_sentence"] += 1
            continue
        d, spans = first_word[q.document]
        question = Question(q.id, q.question, [docs[q.document].sentences[n] for n in correct], documents[d].title)
        question.unit = q.document
        question.spans = {(d, *spans[n]) for n in correct}
        questions.append(question)
    if not questions:
        raise InputError(f"{', '.join(map(str, paths))}: no question with a sentence labelled 1")
    return documents, questions, stats


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help="WikiQA TSV file(s), gzipped or not")
    add_common_args(parser)
    return check_args(parser, parser.parse_args(argv))


def main(args: argparse.Namespace) -> dict:
    return convert(args, lambda: load_wikiqa(args.input), [str(p) for p in args.input])


def cli() -> None:
    """The command line."""
    run_main(main, parse_args())


if __name__ == "__main__":
    cli()
