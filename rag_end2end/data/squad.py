"""Turn a SQuAD-format QA set (v1.1 or v2.0, e.g. COVID-QA) into this toolkit's formats, with the gold
passages needed to measure retrieval (recall@k of a passage that contains the answer).

    python prepare_squad.py --input 200423_covidQA.json --output_dir data/covid_qa \
        [--val_fraction 0.1 --test_fraction 0.1 --seed 42 --distractor_csv other_kb.csv]

writes into --output_dir:
  kb.csv                     `title<TAB>text`, one line per context (then the distractors), for
                             use_own_knowledge_dataset.py --csv_path; passage ids are the rows of
                             kb_encode_utils.split_documents(read_kb_csv(kb.csv))
  {train,val,test}.source    one question per line
  {train,val,test}.target    its first gold answer
  {train,val,test}.gold.jsonl  {"id", "question", "answers", "title", "gold_passage_ids"}, line-aligned
  stats.json                 counts

Splits are by article (every context of an article lands in one split). A gold passage holds an answer:
located by `answer_start` when the answer really occurs there, else by a case-insensitive search of its
context; an answer across a passage boundary makes both passages gold. Unanswerable questions (v2) are
skipped and counted.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import warnings
from bisect import bisect_right
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import accumulate
from pathlib import Path

from rag_end2end.data.readers import read_kb_csv, run_main
from rag_end2end.files import atomic_writes
from rag_end2end.kb.passages import split_documents, split_text
from rag_end2end.options import add_debug_arg

WORDS_PER_PASSAGE = 100  # split_text's default, which use_own_knowledge_dataset.py uses
SPLITS = ("train", "val", "test")
OUTPUT_FILES = ("kb.csv", *(f"{s}.{ext}" for s in SPLITS for ext in ("source", "target", "gold.jsonl")), "stats.json")
MAX_TITLE_CHARS = 100


@dataclass
class Document:
    """One knowledge-base document: its title names the article; `text` is single-spaced. `unit`: what the split
    keeps together, its title unless set (e.g. the passage itself, when titles are made up)."""

    title: str
    text: str
    unit: str = ""

    @property
    def split_key(self) -> str:
        return self.unit or self.title


@dataclass
class Question:
    """A question with its gold answers and the (document, first word, last word) spans that hold one."""

    id: str
    question: str
    answers: list[str]
    title: str
    spans: set[tuple[int, int, int]] = field(default_factory=set)
    unit: str = ""  # the split unit (its document's), when not the title
    target: str = ""  # the .target line, when not the first answer (a set without answers)

    @property
    def split_key(self) -> str:
        return self.unit or self.title

    def gold_passage_ids(self, offsets: list[int]) -> list[int]:
        """Passage ids of the spans, given each document's first passage id."""
        n = WORDS_PER_PASSAGE
        return sorted({offsets[d] + p for d, first, last in self.spans for p in range(first // n, last // n + 1)})


def clean(text: str) -> str:
    """Collapse all whitespace (tabs, newlines included) to single spaces, so `split_text` words are real words."""
    return " ".join(text.replace("\x00", " ").split())


def dedupe_answers(answers: list[str], key: Callable[[str], str] | None = None) -> list[str]:
    """Whitespace-normalised, non-empty answers without duplicates (by `key`), first occurrence kept."""
    seen, out = set(), []
    for answer in map(clean, answers):
        k = key(answer) if key else answer
        if answer and k not in seen:
            seen.add(k)
            out.append(answer)
    return out


def word_starts(text: str) -> list[int]:
    """Character offset of every `text.split()` word, in order."""
    starts, pos = [], 0
    for word in text.split():
        pos = text.index(word, pos)
        starts.append(pos)
        pos += len(word)
    return starts


def span_to_words(starts: list[int], begin: int, end: int) -> tuple[int, int]:
    """(first, last) word index covering the non-space characters [begin, end) of a text."""
    return bisect_right(starts, begin) - 1, bisect_right(starts, end - 1) - 1


class TokenIndex:
    """A document's tokens joined by single spaces, to find every occurrence of an answer and map it back to
    word positions (`owners[i]` is the word that token i comes from)."""

    def __init__(self, tokens: list[str], owners: list[int]):
        self.text = " ".join(tokens)
        self.starts = list(accumulate((len(t) + 1 for t in tokens[:-1]), initial=0)) if tokens else []
        self.owners = owners

    def find(self, needle: str, whole_tokens: bool) -> list[tuple[int, int]]:
        """(first word, last word) of every occurrence of `needle` (overlapping ones included)."""
        if not needle or not self.owners:
            return []
        hay, pad = (f" {self.text} ", f" {needle} ") if whole_tokens else (self.text, needle)
        found, pos = [], hay.find(pad)
        while pos >= 0:  # in the padded case `pos` is already the needle's offset in self.text
            first, last = span_to_words(self.starts, pos, pos + len(needle))
            found.append((self.owners[first], self.owners[last]))
            pos = hay.find(pad, pos + 1)
        return found


def lowercase_index(text: str) -> TokenIndex:
    """Index of a single-spaced text's words, lowercased one by one (so offsets stay word-aligned)."""
    words = text.split(" ")
    return TokenIndex([w.lower() for w in words], list(range(len(words))))


def split_titles(titles: list[str], val_fraction: float, test_fraction: float, seed: int) -> dict[str, set[str]]:
    """Seeded split of the articles (titles); at least one each for val/test when there are three or more."""
    keys = sorted(set(titles))
    random.Random(seed).shuffle(keys)
    n = len(keys)
    n_val, n_test = (max(round(n * f), int(f > 0 and n >= 3)) for f in (val_fraction, test_fraction))
    if n_val + n_test >= n and n > 0:
        raise ValueError(f"{n} articles cannot be split into val={n_val}, test={n_test} and a non-empty train")
    return {"val": set(keys[:n_val]), "test": set(keys[n_val : n_val + n_test]), "train": set(keys[n_val + n_test :])}


def read_distractors(paths: list[str]) -> list[Document]:
    """Distractor documents from `title<TAB>text` files, read with the toolkit's own CSV reader."""
    return [Document(clean(t), clean(x)) for path in paths for t, x in read_kb_csv(path)]


def check_output_dir(output_dir: str | Path, overwrite: bool) -> None:
    """Refuse, before any work, to replace a file of an earlier run in `output_dir` unless `--overwrite`."""
    out = Path(output_dir)
    existing = [out / name for name in OUTPUT_FILES if (out / name).exists()]
    if existing and not overwrite:
        more = f" (and {len(existing) - 1} more of the files this script writes)" if len(existing) > 1 else ""
        raise FileExistsError(
            f"{existing[0]} already exists{more}; pass --overwrite to replace them or choose another --output_dir"
        )


def write_outputs(docs: list[Document], questions: list[Question], args: argparse.Namespace, extra_stats: dict) -> dict:
    """Write kb.csv, the split files and stats.json, each under a temporary name renamed into place once all are
    written; return the stats."""
    out = Path(args.output_dir)
    check_output_dir(out, args.overwrite)
    distractors = read_distractors(args.distractor_csv or [])
    out.mkdir(parents=True, exist_ok=True)
    with atomic_writes([out / name for name in OUTPUT_FILES], "the prepared data") as tmp:
        stats = _write_files(docs, distractors, questions, args, extra_stats, dict(zip(OUTPUT_FILES, tmp)))
    return stats


def _write_files(
    docs: list[Document],
    distractors: list[Document],
    questions: list[Question],
    args: argparse.Namespace,
    extra_stats: dict,
    paths: dict[str, Path],
) -> dict:
    """Write every output file to `paths[name]` and return the stats."""
    kb_path = Path(args.output_dir) / "kb.csv"
    kb = docs + distractors  # distractors last: the QA documents' passage ids do not move
    n_passages = [len(split_text(d.text, WORDS_PER_PASSAGE)) for d in kb]
    offsets = list(accumulate(n_passages, initial=0))
    with paths["kb.csv"].open("w", newline="", encoding="utf-8") as f:
        csv.writer(f, delimiter="\t", lineterminator="\n").writerows((d.title, d.text) for d in kb)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        n_read = len(split_documents(read_kb_csv(paths["kb.csv"])))
    for warning in caught:  # e.g. duplicate documents: name the file that the user gets
        warnings.warn(str(warning.message).replace(str(paths["kb.csv"]), str(kb_path)), stacklevel=3)
    if n_read != offsets[-1]:  # the contract gold ids rely on
        raise RuntimeError(f"{kb_path} does not read back as {offsets[-1]} passages")

    titles = split_titles([q.split_key for q in questions], args.val_fraction, args.test_fraction, args.seed)
    rng = random.Random(args.seed)
    stats = {"documents": len(kb), "qa_documents": len(docs), "distractor_documents": len(distractors)}
    stats |= {"passages": offsets[-1], "qa_passages": offsets[len(docs)], **extra_stats}
    stats |= {"documents_per_split": {}, "questions": {}, "questions_without_gold_passage": {}}
    for split in SPLITS:
        chosen = [q for q in questions if q.split_key in titles[split]]
        if args.require_gold_passage:  # e.g. yes/no answers: nothing in the KB to retrieve for them
            kept = [q for q in chosen if q.gold_passage_ids(offsets)]
            stats.setdefault("skipped_without_gold_passage", {})[split] = len(chosen) - len(kept)
            chosen = kept
        rng.shuffle(chosen)
        chosen = chosen[: args.max_questions_per_split]
        gold = [q.gold_passage_ids(offsets) for q in chosen]
        paths[f"{split}.source"].write_text("".join(q.question + "\n" for q in chosen), encoding="utf-8")
        paths[f"{split}.target"].write_text(
            "".join((q.target or q.answers[0]) + "\n" for q in chosen), encoding="utf-8"
        )
        rows = [
            {"id": q.id, "question": q.question, "answers": q.answers, "title": q.title, "gold_passage_ids": g}
            for q, g in zip(chosen, gold)
        ]
        paths[f"{split}.gold.jsonl"].write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
        )
        stats["documents_per_split"][split] = sum(d.split_key in titles[split] for d in docs)
        stats["questions"][split] = len(chosen)
        stats["questions_without_gold_passage"][split] = sum(not g for g in gold)
    paths["stats.json"].write_text(json.dumps(stats, indent=1) + "\n", encoding="utf-8")
    warn_unmeasurable(stats, args)
    return stats


MIN_HELD_OUT = 2  # questions, and documents: fewer leaves a held-out split that measures nothing


def warn_unmeasurable(stats: dict, args: argparse.Namespace) -> None:
    """Warn about a val or test split asked for that is too small to measure: fewer than MIN_HELD_OUT questions (EM
    moves in steps of one question), or its questions all on fewer than MIN_HELD_OUT documents (in-batch InfoNCE,
    retriever_only's and dalm's validation loss, then has no negative: the loss is 0.0 whatever the retriever)."""
    for split, fraction in (("val", args.val_fraction), ("test", args.test_fraction)):
        n_questions, n_docs = stats["questions"][split], stats["documents_per_split"][split]
        few_docs = stats["qa_documents"] > 0 and n_docs < MIN_HELD_OUT
        if fraction > 0 and (n_questions < MIN_HELD_OUT or few_docs):
            warnings.warn(
                f"{Path(args.output_dir) / split}.source: {n_questions} question(s) on {n_docs} document(s) is too "
                f"small to measure (EM moves in steps of 1/{max(n_questions, 1)}; in-batch InfoNCE has no negative "
                f"when every question shares one passage, and its loss is 0.0); raise --{split}_fraction (now "
                f"{fraction}) or add questions",
                stacklevel=3,
            )


def _get(obj: dict, key: str, path: Path, where: str):
    """obj[key], or an error that names the file and the field."""
    if not isinstance(obj, dict) or key not in obj:
        raise ValueError(f"{path}: {where}: missing field {key!r}")
    return obj[key]


def article_title(article: dict, index: int) -> str:
    """The article's title, else the first line of its first context (at most ~100 chars), else its id."""
    title = clean(str(article.get("title") or ""))
    if title:
        return title
    paragraphs = article.get("paragraphs") or [{}]
    line = clean(str(paragraphs[0].get("context", "")).strip().split("\n")[0])
    if len(line) > MAX_TITLE_CHARS:
        line = line[:MAX_TITLE_CHARS].rsplit(" ", 1)[0] + "..."
    return line or f"document {paragraphs[0].get('document_id', index)}"


def squad_answer_spans(
    context: str, starts: list[int], index: TokenIndex, text: str, start
) -> tuple[list[tuple[int, int]], str]:
    """Word spans of one answer and how they were found: at `answer_start` when the text really is there,
    else every occurrence in the context (case-insensitive, whitespace-normalised)."""
    if isinstance(start, int) and text.strip() and context[start : start + len(text)] == text:
        begin = start + len(text) - len(text.lstrip())
        return [span_to_words(starts, begin, begin + len(text.strip()))], "answers_at_offset"
    spans = index.find(clean(text).lower(), whole_tokens=False)
    return spans, "answers_found_by_search" if spans else "answers_not_found"


def load_squad(path: str | Path) -> tuple[list[Document], list[Question], dict]:
    """Read a SQuAD v1.1/v2.0 JSON file into documents (one per context) and answerable questions."""
    path = Path(path)
    try:
        squad = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read SQuAD JSON: {e}") from e
    docs, questions = [], []
    counts = ["skipped_unanswerable", "skipped_empty_question", "answers_at_offset", "answers_found_by_search"]
    stats = dict.fromkeys([*counts, "answers_not_found"], 0)
    for i, article in enumerate(_get(squad, "data", path, "top level")):
        paragraphs = _get(article, "paragraphs", path, f"data[{i}]")
        title = article_title(article, i)
        for j, paragraph in enumerate(paragraphs):
            where = f"data[{i}].paragraphs[{j}]"
            context = str(_get(paragraph, "context", path, where))
            if not context.strip():
                raise ValueError(f"{path}: {where}: field 'context' is empty")
            docs.append(Document(title, clean(context)))
            starts, index = word_starts(context), lowercase_index(docs[-1].text)
            for k, qa in enumerate(_get(paragraph, "qas", path, where)):
                question = clean(str(_get(qa, "question", path, f"{where}.qas[{k}]")))
                raw = [] if qa.get("is_impossible") else _get(qa, "answers", path, f"{where}.qas[{k}]")
                texts = [str(_get(a, "text", path, f"{where}.qas[{k}].answers[{n}]")) for n, a in enumerate(raw)]
                answers = dedupe_answers(texts)
                if not answers or not question:
                    stats["skipped_unanswerable" if not answers else "skipped_empty_question"] += 1
                    continue
                q = Question(str(qa.get("id", f"{i}-{j}-{k}")), question, answers, title)
                for a, text in zip(raw, texts):
                    spans, how = squad_answer_spans(context, starts, index, text, a.get("answer_start"))
                    q.spans.update((len(docs) - 1, first, last) for first, last in spans)
                    stats[how] += 1
                questions.append(q)
    return docs, questions, stats


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """Output, split and distractor flags shared by the prepare_* scripts."""
    add_debug_arg(parser)
    parser.add_argument("--output_dir", required=True, help="where kb.csv, the splits and stats.json go")
    parser.add_argument("--val_fraction", type=float, default=0.1, help="fraction of articles for val")
    parser.add_argument("--test_fraction", type=float, default=0.1, help="fraction of articles for test")
    parser.add_argument("--seed", type=int, default=42, help="seeds the article split and the question order")
    parser.add_argument("--max_questions_per_split", type=int, default=None, help="keep the first N per split")
    parser.add_argument("--distractor_csv", nargs="+", default=None, help="extra `title<TAB>text` documents")
    parser.add_argument(
        "--require_gold_passage", action="store_true", help="skip (and count) questions whose answer is in no passage"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace the files of an earlier run")


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Reject impossible split fractions and caps."""
    if not (0 <= args.val_fraction < 1 and 0 <= args.test_fraction < 1 and args.val_fraction + args.test_fraction < 1):
        parser.error("--val_fraction and --test_fraction must be in [0, 1) and sum to less than 1")
    if args.max_questions_per_split is not None and args.max_questions_per_split < 1:
        parser.error("--max_questions_per_split must be at least 1")
    return args


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="a SQuAD-format JSON file (v1.1 or v2.0)")
    add_common_args(parser)
    return check_args(parser, parser.parse_args(argv))


def convert(args: argparse.Namespace, load: Callable[[], tuple[list, list, dict]], source: str | list[str]) -> dict:
    """Every converter's main: refuse an output directory of an earlier run, read the QA set (`load`: documents,
    questions, stats), write the KB CSV, splits, gold passages and stats.json, print the stats and return them."""
    check_output_dir(args.output_dir, args.overwrite)
    docs, questions, stats = load()
    stats = write_outputs(docs, questions, args, {"input": source, **stats})
    print(json.dumps(stats, indent=1))
    return stats


def main(args: argparse.Namespace) -> dict:
    return convert(args, lambda: load_squad(args.input), str(args.input))


def cli() -> None:
    """The command line."""
    run_main(main, parse_args())


if __name__ == "__main__":
    cli()
