"""Build the small dummy KB and QA files in test_run/ from the real COVID-QA data set.

The outputs are committed, so tests and demos need no network; this script only documents and
reproduces them (deterministically) from a local copy of COVID-QA's SQuAD-format JSON.
"""

import argparse
import csv
import json
import re
import shutil
from pathlib import Path

N_PAPERS = 5
SPLIT_CYCLE = ("train",) * 5 + ("val", "test")  # round-robin: 5 train, 1 val, 1 test


def one_line(text: str) -> str:
    return " ".join(text.split())


def paper_title_and_body(context: str) -> tuple[str, str]:
    """The first line of a COVID-QA context is the title; the body follows the metadata header."""
    title, _, rest = context.partition("\n")
    # Most papers carry "URL / SHA / Authors / Date / DOI / License:" before "Abstract: ...".
    license_line = re.search(r"^License:.*$", rest, re.MULTILINE)
    if license_line and license_line.start() < 3000:
        rest = rest[license_line.end() :]
    body = re.sub(r"^\s*Abstract:\s*", "", rest)
    return one_line(title).rstrip(" ,"), body


def select_papers(
    data: list[dict], max_words: int, max_answer_words: int
) -> list[tuple[str, str, list[tuple[str, str]]]]:
    """(title, kept text, [(question, answer)]) for the papers with the most usable questions."""
    papers = []
    for article in data:
        for paragraph in article["paragraphs"]:
            title, body = paper_title_and_body(paragraph["context"])
            text = " ".join(body.split()[:max_words])
            pairs = []
            for qa in paragraph["qas"]:
                question = one_line(qa["question"])
                # Some answer spans are cut mid-token with stray punctuation at either end.
                answer = one_line(qa["answers"][0]["text"]).strip(" .,;:[(")
                if question and answer and len(answer.split()) <= max_answer_words and answer in text:
                    pairs.append((question, answer))
            papers.append((title, text, pairs))
    # Stable sort: ties keep the file's order, so the choice is deterministic.
    chosen = sorted(range(len(papers)), key=lambda i: -len(papers[i][2]))[:N_PAPERS]
    return [papers[i] for i in sorted(chosen)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--covid_qa", required=True, type=Path, help="path to 200423_covidQA.json")
    parser.add_argument("--out_dir", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument("--max_words", type=int, default=800, help="words kept from each paper")
    parser.add_argument("--max_answer_words", type=int, default=6)
    args = parser.parse_args()

    papers = select_papers(json.loads(args.covid_qa.read_text())["data"], args.max_words, args.max_answer_words)

    kb_dir = args.out_dir / "dummy-kb"
    kb_dir.mkdir(parents=True, exist_ok=True)
    with open(kb_dir / "my_knowledge_dataset.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f, delimiter="\t", lineterminator="\n").writerows((t, text) for t, text, _ in papers)
    license_file = args.covid_qa.parent / "LICENSE"
    if license_file.exists():
        shutil.copyfile(license_file, kb_dir / "LICENSE-COVID-QA")

    splits: dict[str, list[tuple[str, str]]] = {name: [] for name in SPLIT_CYCLE}
    all_pairs = [pair for _, _, pairs in papers for pair in pairs]
    for i, pair in enumerate(all_pairs):
        splits[SPLIT_CYCLE[i % len(SPLIT_CYCLE)]].append(pair)

    qa_dir = args.out_dir / "dummy-train-data"
    qa_dir.mkdir(parents=True, exist_ok=True)
    for name, pairs in splits.items():
        (qa_dir / f"{name}.source").write_text("".join(q + "\n" for q, _ in pairs), encoding="utf-8")
        (qa_dir / f"{name}.target").write_text("".join(a + "\n" for _, a in pairs), encoding="utf-8")

    print(f"{len(papers)} KB documents: " + "; ".join(t for t, _, _ in papers))
    print(", ".join(f"{name} {len(pairs)}" for name, pairs in splits.items()) + " QA pairs")


if __name__ == "__main__":
    main()
