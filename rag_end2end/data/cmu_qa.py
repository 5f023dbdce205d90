"""Turn the CMU Question/Answer Dataset v1.2 (S08/, S09/, S10/) into this toolkit's formats, with the gold
passages needed to measure retrieval; the outputs are those of prepare_squad.py.

    python prepare_cmu_qa.py --input_dir Question_Answer_Dataset_v1.2 --output_dir data/cmu_qa \
        [--val_fraction 0.1 --test_fraction 0.1 --seed 42 --distractor_csv other_kb.csv]

Every article file (`S*/data/setN/aM.txt.clean`) becomes one knowledge-base document, titled by its
ArticleTitle with underscores as spaces; files with identical text are kept once. Repeated questions (one
line per answerer) are merged into one question with several answers; NULL or empty answers are dropped,
and a question left without any is skipped and counted. Splits are by article title. Gold passages: of
the passages of the question's article (every stored revision of it) that contain an answer as a run of
SQuAD-normalised words, those that share the most content words with the question (ties kept). The dataset
marks no answer span, and a name such as the article's subject occurs in dozens of its passages: without
the overlap rule a question had up to 178 gold passages, and recall@k measured little. Yes/no answers are
kept as answers but are not searched for.
"""

from __future__ import annotations

import argparse
import codecs
from pathlib import Path

from rag_end2end.data.readers import run_main
from rag_end2end.data.squad import (
    WORDS_PER_PASSAGE,
    Document,
    Question,
    TokenIndex,
    add_common_args,
    check_args,
    clean,
    convert,
    dedupe_answers,
)
from rag_end2end.evaluation.metrics import normalize_answer

COLUMNS = ("ArticleTitle", "Question", "Answer", "ArticleFile")
YES_NO = {"yes", "no"}
# Words that say nothing about which passage answers (normalize_answer already drops a, an, the).
STOP_WORDS = frozenset(
    "of in on at to for from by with and or not is was were are be been being am did does do has have had what "
    "which who whom whose when where why how that this these those it its as than there their they he she his her "
    "you your we our can could would should will".split()
)


def _cp1252_fallback(error: UnicodeDecodeError) -> tuple[str, int]:
    """Decode the bytes that are not UTF-8 as Windows-1252: the dataset mixes both, sometimes in one file."""
    return error.object[error.start : error.end].decode("cp1252", errors="replace"), error.end


codecs.register_error("cp1252_fallback", _cp1252_fallback)


def read_text(path: Path) -> str:
    """A dataset file's text: UTF-8 where valid, Windows-1252 elsewhere."""
    try:
        return path.read_bytes().decode("utf-8", errors="cp1252_fallback")
    except OSError as e:
        raise ValueError(f"{path}: cannot read: {e}") from e


def title_of(article_title: str) -> str:
    """ArticleTitle as a document title: `Abraham_Lincoln` -> `Abraham Lincoln`, `otter` -> `Otter` (the
    years spell some titles in lower case, and one article must not become two split units)."""
    title = clean(article_title.replace("_", " "))
    return title[:1].upper() + title[1:]


def read_qa_file(path: Path) -> list[dict[str, str]]:
    """Rows of one `question_answer_pairs.txt` as dicts keyed by its header, with `line` (1-based) added."""
    lines = read_text(path).split("\n")  # not splitlines(): one field holds a bare carriage return
    header = [h.strip() for h in lines[0].split("\t")]
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        raise ValueError(f"{path}:1: header lacks column(s) {', '.join(missing)}; found {header}")
    rows = []
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.rstrip("\r").split("\t")
        if len(fields) != len(header):
            raise ValueError(f"{path}:{number}: expected {len(header)} tab-separated fields, found {len(fields)}")
        rows.append(dict(zip(header, fields), line=str(number)))
    return rows


def article_index(text: str) -> TokenIndex:
    """Index of a single-spaced text's SQuAD-normalised words, for normalised containment of answers."""
    tokens, owners = [], []
    for i, word in enumerate(text.split(" ")):
        for token in normalize_answer(word).split():
            tokens.append(token)
            owners.append(i)
    return TokenIndex(tokens, owners)


def read_articles(root: Path, file_titles: dict[Path, str]) -> tuple[list[Document], int]:
    """Every article file as a document (the same revision stored for two years only once), and the file count."""
    files = sorted(set(root.glob("S*/data/*/*.txt.clean")) | set(file_titles))
    docs = {}
    for path in files:
        raw = read_text(path)
        title = file_titles.get(path) or title_of(raw.strip().split("\n")[0])  # unreferenced: its first line
        if clean(raw):
            docs.setdefault((title, clean(raw)), Document(title, clean(raw)))
    return list(docs.values()), len(files)


def merge_questions(rows: list[tuple[Path, dict[str, str]]], stats: dict) -> dict[tuple[str, str], tuple[str, list]]:
    """(title, question) -> (id of its first line, answers of all its lines), NULL and empty answers dropped."""
    merged = {}
    for f, row in rows:
        question, answer = clean(row["Question"]), clean(row["Answer"])
        if not question or question == "NULL":
            stats["skipped_empty_questions"] += 1
            continue
        key = (title_of(row["ArticleTitle"]), question)
        _, answers = merged.setdefault(key, (f"{f.parent.name}-{row['line']}", []))
        if answer and answer != "NULL":
            answers.append(answer)
        else:
            stats["skipped_null_answers"] += 1
    return merged


def load_cmu_qa(input_dir: str | Path) -> tuple[list[Document], list[Question], dict]:
    """Read every year's question file and article files into documents and merged, answerable questions."""
    root = Path(input_dir)
    qa_files = sorted(root.glob("S*/question_answer_pairs.txt"))
    if not qa_files:
        raise FileNotFoundError(f"{root}: no S*/question_answer_pairs.txt (expected the CMU QA v1.2 layout)")
    rows = [(f, row) for f in qa_files for row in read_qa_file(f)]
    file_titles = {}  # article file -> title, from the question files
    for f, row in rows:
        path = f.parent / (row["ArticleFile"].strip() + ".txt.clean")
        if not path.is_file():
            raise FileNotFoundError(f"{f}:{row['line']}: field ArticleFile names {path}, which does not exist")
        file_titles.setdefault(path, title_of(row["ArticleTitle"]))
    docs, n_files = read_articles(root, file_titles)

    stats = dict.fromkeys(["skipped_empty_questions", "skipped_null_answers", "skipped_unanswerable"], 0)
    stats |= {"article_files": n_files, "qa_rows": len(rows), "yes_no_only_questions": 0}
    stats["answer_spans_dropped_by_overlap"] = 0
    merged = merge_questions(rows, stats)
    indexes, questions = [article_index(doc.text) for doc in docs], []
    for (title, question), (qid, raw) in merged.items():
        answers = dedupe_answers(raw, key=lambda a: normalize_answer(a) or a)
        if not answers:
            stats["skipped_unanswerable"] += 1
            continue
        q = Question(qid, question, answers, title)
        searchable = [normalize_answer(a) for a in answers if normalize_answer(a) not in YES_NO]
        stats["yes_no_only_questions"] += not searchable
        for d in (d for d, doc in enumerate(docs) if doc.title == title):  # every stored revision of the article
            q.spans.update(
                (d, first, last) for a in searchable for first, last in indexes[d].find(a, whole_tokens=True)
            )
        closest = closest_spans(q.spans, question, docs)
        stats["answer_spans_dropped_by_overlap"] += len(q.spans) - len(closest)
        q.spans = closest
        questions.append(q)
    stats["merged_questions"] = len(merged)
    stats["documents_without_questions"] = sum(d.title not in {q.title for q in questions} for d in docs)
    return docs, questions, stats


def content_words(text: str) -> set[str]:
    return set(normalize_answer(text).split()) - STOP_WORDS


def closest_spans(spans: set[tuple[int, int, int]], question: str, docs: list[Document]) -> set[tuple[int, int, int]]:
    """The answer spans in the passages that share the most content words with the question (ties kept): the
    passages that answer it, not every passage where its answer happens to occur."""
    words, n = content_words(question), WORDS_PER_PASSAGE

    def overlap(d: int, p: int) -> int:  # passages are windows of n words (prepare_squad.split_text)
        return len(words & content_words(" ".join(docs[d].text.split(" ")[p * n : (p + 1) * n])))

    scored = {(d, a, b): max(overlap(d, p) for p in range(a // n, b // n + 1)) for d, a, b in spans}
    best = max(scored.values(), default=0)
    return {span for span, score in scored.items() if score == best}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input_dir", required=True, help="the dataset's root, holding S08/, S09/ and S10/")
    add_common_args(parser)
    return check_args(parser, parser.parse_args(argv))


def main(args: argparse.Namespace) -> dict:
    return convert(args, lambda: load_cmu_qa(args.input_dir), str(args.input_dir))


def cli() -> None:
    """The command line."""
    run_main(main, parse_args())


if __name__ == "__main__":
    cli()
