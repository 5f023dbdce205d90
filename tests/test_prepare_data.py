"""data_prep/prepare_squad.py and data_prep/prepare_cmu_qa.py on tiny hand-built QA sets: counts, splits by article,
gold passages that really hold their answers, line alignment, distractors, seeding and clear errors on bad input."""

import json
from pathlib import Path

import pytest

from rag_end2end.data import cmu_qa as prepare_cmu_qa
from rag_end2end.data import squad as prepare_squad
from rag_end2end.data.readers import read_kb_csv
from rag_end2end.evaluation.metrics import normalize_answer
from rag_end2end.kb.passages import split_documents

SPLITS = ("train", "val", "test")
FILLER = "rock layers were mapped by field teams across several long seasons while instruments logged data".split()


def make_context(n_words: int, plant: dict[int, str]) -> tuple[str, dict[str, int]]:
    """`n_words` filler words, with each planted phrase starting at the given word, separated by spaces, tabs and
    blank lines (as real contexts are); returns the text and each phrase's character offset."""
    words = [FILLER[i % len(FILLER)] for i in range(n_words)]
    for at, phrase in plant.items():
        words[at : at + len(phrase.split())] = phrase.split()
    text, starts = "", []
    for i, word in enumerate(words):
        text += ("\n\n" if i % 37 == 36 else " \t" if i % 29 == 28 else " ") if i else ""
        starts.append(len(text))
        text += word
    return text, {phrase: starts[at] for at, phrase in plant.items()}


def squad_qa(qid: str, question: str, answers: list[tuple[str, int]], **extra) -> dict:
    return {"id": qid, "question": question, "answers": [{"text": t, "answer_start": s} for t, s in answers], **extra}


def exact(context: str, offsets: dict[str, int], phrase: str) -> tuple[str, int]:
    """The answer as SQuAD stores it: the context's own characters at the phrase's offset."""
    start = offsets[phrase]
    end = context.index(phrase.split()[-1], start) + len(phrase.split()[-1])
    return context[start:end], start


@pytest.fixture(scope="module")
def squad_json(tmp_path_factory) -> Path:
    """SQuAD v2: 4 articles (one without a title, as COVID-QA), 5 contexts of 150-220 words (11 passages)."""
    a0, o_a0 = make_context(180, {10: "basaltic lava flows"})
    a1, o_a1 = make_context(220, {98: "deep caldera collapse event"})  # words 98-101: passages 0 and 1
    b0, o_b0 = make_context(160, {20: "ice sheet", 130: "moraine deposits", 150: "ice cap"})
    c0, o_c0 = make_context(200, {60: "dune fields"})
    d0, o_d0 = make_context(150, {120: "thaw slumps"})
    squad = {
        "version": "v2.0",
        "data": [
            {
                "title": "Volcano",
                "paragraphs": [
                    {
                        "context": a0,
                        "qas": [
                            squad_qa("q1", "What built the shield?", [exact(a0, o_a0, "basaltic lava flows")]),
                            squad_qa(
                                "q2",
                                "Who named the volcano?",
                                [],
                                is_impossible=True,
                                plausible_answers=[{"text": "rock layers", "answer_start": 0}],
                            ),
                        ],
                    },
                    {
                        "context": a1,
                        "qas": [
                            squad_qa("q3", "What formed the crater?", [exact(a1, o_a1, "deep caldera collapse event")]),
                        ],
                    },
                ],
            },
            {
                "title": "Glacier",
                "paragraphs": [
                    {
                        "context": b0,
                        "qas": [
                            # a wrong answer_start, twice (duplicate answers): found by searching the context
                            squad_qa(
                                "q4",
                                "What did the glacier leave?",
                                [("moraine deposits", o_b0["moraine deposits"] + 7)] * 2,
                            ),
                            squad_qa(
                                "q5",
                                "What covered the land?",
                                [exact(b0, o_b0, "ice sheet"), exact(b0, o_b0, "ice cap")],
                            ),
                        ],
                    }
                ],
            },
            {
                "title": "Desert",
                "paragraphs": [
                    {
                        "context": c0,
                        "qas": [
                            squad_qa("q6", "What covers the\tbasin?", [exact(c0, o_c0, "dune fields")]),
                            squad_qa("q7", "How hot is it?", []),  # no answers, no is_impossible: still unanswerable
                            squad_qa("q8", "Where is the water?", [("a hidden oasis", 3)]),  # in no passage
                        ],
                    }
                ],
            },
            {
                "paragraphs": [
                    {
                        "context": d0,
                        "document_id": 7,
                        "qas": [
                            squad_qa("q9", "What forms on thawing slopes?", [exact(d0, o_d0, "thaw slumps")]),
                        ],
                    }
                ]
            },
        ],
    }
    path = tmp_path_factory.mktemp("squad") / "tiny-squad-v2.json"
    path.write_text(json.dumps(squad), encoding="utf-8")
    return path


def run_squad(squad_json: Path, out: Path, *extra: str) -> dict:
    args = prepare_squad.parse_args(["--input", str(squad_json), "--output_dir", str(out), *extra])
    return prepare_squad.main(args)


def read_split(out: Path, split: str) -> tuple[list[str], list[str], list[dict]]:
    source = (out / f"{split}.source").read_text(encoding="utf-8").splitlines()
    target = (out / f"{split}.target").read_text(encoding="utf-8").splitlines()
    gold = [json.loads(line) for line in (out / f"{split}.gold.jsonl").read_text(encoding="utf-8").splitlines()]
    return source, target, gold


def all_gold(out: Path) -> dict[str, dict]:
    return {row["id"]: row for split in SPLITS for row in read_split(out, split)[2]}


def check_outputs(out: Path, normalize) -> None:
    """Line alignment, no article in two splits, and every gold passage holds an answer (or part of one that
    runs into the next or previous passage), checked against the passages use_own_knowledge_dataset.py makes."""
    passages = split_documents(read_kb_csv(out / "kb.csv"))
    texts = [normalize(t) for t in passages["text"]]
    titles_by_split = {}
    for split in SPLITS:
        source, target, gold = read_split(out, split)
        assert len(source) == len(target) == len(gold)
        assert all(line.strip() == line and line for line in source + target)
        for q, a, row in zip(source, target, gold):
            assert set(row) == {"id", "question", "answers", "title", "gold_passage_ids"}
            assert (q, a) == (row["question"], row["answers"][0])
            for g in row["gold_passage_ids"]:
                assert passages["title"][g] == row["title"]
                windows = [texts[g]] + [" ".join(texts[i : i + 2]) for i in (g - 1, g) if 0 <= i < len(texts) - 1]
                assert any(normalize(ans) in w for ans in row["answers"] for w in windows), (row, texts[g])
        titles_by_split[split] = {row["title"] for row in gold}
    train, val, test = titles_by_split.values()
    assert not (train & val or train & test or val & test)


def lower(text: str) -> str:
    return " ".join(text.lower().split())


def test_squad_counts_splits_and_gold(squad_json, tmp_path):
    out = tmp_path / "out"
    stats = run_squad(squad_json, out)
    assert stats == json.loads((out / "stats.json").read_text())
    assert stats["documents"] == stats["qa_documents"] == 5 and stats["distractor_documents"] == 0
    assert stats["passages"] == 2 + 3 + 2 + 2 + 2 == len(split_documents(read_kb_csv(out / "kb.csv")))
    assert stats["skipped_unanswerable"] == 2 and sum(stats["questions"].values()) == 7
    assert (stats["answers_at_offset"], stats["answers_found_by_search"], stats["answers_not_found"]) == (6, 2, 1)
    assert sum(stats["questions_without_gold_passage"].values()) == 1
    # 4 articles, default fractions 0.1: at least one article each for val and test
    assert sum(stats["documents_per_split"].values()) == 5 and min(stats["documents_per_split"].values()) >= 1
    check_outputs(out, lower)

    gold = all_gold(out)
    assert "q2" not in gold and "q7" not in gold
    assert gold["q1"]["gold_passage_ids"] == [0]  # Volcano's first context: passages 0-1
    assert gold["q3"]["gold_passage_ids"] == [2, 3]  # across the boundary of its context's passages 2-4
    assert gold["q4"]["gold_passage_ids"] == [6] and gold["q4"]["answers"] == ["moraine deposits"]
    assert gold["q5"]["gold_passage_ids"] == [5, 6] and gold["q5"]["answers"] == ["ice sheet", "ice cap"]
    assert gold["q6"]["question"] == "What covers the basin?"
    assert gold["q8"]["gold_passage_ids"] == []
    assert gold["q9"]["gold_passage_ids"] == [10]
    untitled = gold["q9"]["title"]  # the first line of the context, shortened
    assert untitled.endswith("...") and len(untitled) <= 103 and untitled[:-3] in " ".join(FILLER * 3)


def test_squad_distractors_are_appended_and_keep_gold_ids(squad_json, tmp_path):
    run_squad(squad_json, tmp_path / "plain")
    ocean = " ".join(make_context(230, {})[0].split())  # 230 words: 3 passages
    distractors = tmp_path / "distractors.tsv"
    distractors.write_text(f"Ocean\t{ocean}\nRiver\tcurrents\tcarry\tsilt\n", encoding="utf-8")
    with pytest.raises(ValueError, match="distractors.tsv:2: expected 2 tab-separated fields"):
        run_squad(squad_json, tmp_path / "bad", "--distractor_csv", str(distractors))

    distractors.write_text(f"Ocean\t{ocean}\nRiver\tcurrents carry silt\n", encoding="utf-8")
    stats = run_squad(squad_json, tmp_path / "more", "--distractor_csv", str(distractors))
    assert (stats["documents"], stats["distractor_documents"], stats["passages"]) == (7, 2, 11 + 3 + 1)
    plain, more = read_kb_csv(tmp_path / "plain" / "kb.csv"), read_kb_csv(tmp_path / "more" / "kb.csv")
    assert more[:5] == plain and [title for title, _ in more[5:]] == ["Ocean", "River"]
    for split in SPLITS:
        assert (tmp_path / "plain" / f"{split}.gold.jsonl").read_bytes() == (
            tmp_path / "more" / f"{split}.gold.jsonl"
        ).read_bytes()


def test_squad_seed_and_cap(squad_json, tmp_path):
    def split_titles(out: Path) -> list[set[str]]:
        return [{row["title"] for row in read_split(out, split)[2]} for split in SPLITS]

    run_squad(squad_json, tmp_path / "a")
    run_squad(squad_json, tmp_path / "b")
    for name in ("kb.csv", "stats.json", *(f"{s}.{ext}" for s in SPLITS for ext in ("source", "target", "gold.jsonl"))):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    others = []
    for seed in range(5):
        run_squad(squad_json, tmp_path / f"seed{seed}", "--seed", str(seed))
        others.append(split_titles(tmp_path / f"seed{seed}"))
    assert any(other != split_titles(tmp_path / "a") for other in others)

    stats = run_squad(squad_json, tmp_path / "capped", "--max_questions_per_split", "1")
    assert all(n <= 1 for n in stats["questions"].values())
    check_outputs(tmp_path / "capped", lower)
    with pytest.raises(FileExistsError, match="--overwrite"):
        run_squad(squad_json, tmp_path / "a")
    run_squad(squad_json, tmp_path / "a", "--overwrite", "--seed", "3")


def test_squad_bad_input_names_file_and_field(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"data": [{"title": "T", "paragraphs": [{"qas": []}]}]}), encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.json: data\[0\]\.paragraphs\[0\]: missing field 'context'"):
        run_squad(bad, tmp_path / "out")
    bad.write_text(json.dumps({"data": [{"paragraphs": [{"context": "x y", "qas": [{"answers": []}]}]}]}))
    with pytest.raises(ValueError, match=r"bad\.json: data\[0\]\.paragraphs\[0\]\.qas\[0\]: missing field 'question'"):
        run_squad(bad, tmp_path / "out")
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=r"bad\.json: cannot read SQuAD JSON"):
        run_squad(bad, tmp_path / "out")
    with pytest.raises(ValueError, match=r"missing\.json: cannot read"):
        run_squad(tmp_path / "missing.json", tmp_path / "out")
    with pytest.raises(SystemExit):
        prepare_squad.parse_args(
            ["--input", "x", "--output_dir", "y", "--val_fraction", "0.6", "--test_fraction", "0.5"]
        )


HEADER = b"ArticleTitle\tQuestion\tAnswer\tDifficultyFromQuestioner\tDifficultyFromAnswerer\tArticleFile\n"


@pytest.fixture(scope="module")
def cmu_dir(tmp_path_factory) -> Path:
    """Two articles (the first also stored, identical, for a second year) and a question file with a repeated
    question, NULL answers, yes/no answers, an empty question and one Windows-1252 byte."""
    root = tmp_path_factory.mktemp("cmu")
    kangaroo = (
        "kangaroo\n\n\n\nA kangaroo is a marsupial from the family Macropodidae. "
        + make_context(
            200,
            {
                85: "They graze on grasses and shrubs at dusk.",  # words 98-100 of the file: passages 0 and 1
                150: "Macropodidae fossils are rare.",
            },  # the answer again, in a passage that shares no question word
        )[0]
    )
    coulomb = "Charles-Augustin_de_Coulomb\n\nCoulomb was born in Angoulême, France. " + make_context(120, {})[0]
    for year, name, text in [("S08", "a1", kangaroo), ("S08", "a2", coulomb), ("S09", "a1", kangaroo)]:
        (root / year / "data" / "set1").mkdir(parents=True, exist_ok=True)
        (root / year / "data" / "set1" / f"{name}.txt.clean").write_text(text, encoding="utf-8")
    rows = [
        b"Kangaroo\tWhat family do kangaroos belong to?\tMacropodidae\teasy\teasy\tdata/set1/a1",
        b"Kangaroo\tWhat family do kangaroos belong to?\tthe family Macropodidae.\teasy\tmedium\tdata/set1/a1",
        b"kangaroo\tAre kangaroos marsupials?\tyes\teasy\teasy\tdata/set1/a1",
        b"Kangaroo\tAre kangaroos marsupials?\tYes.\teasy\teasy\tdata/set1/a1",
        b"Kangaroo\tHow fast can a kangaroo hop?\tNULL\thard\tNULL\tdata/set1/a1",
        b"Kangaroo\tWhat do kangaroos eat?\tNULL\tmedium\tNULL\tdata/set1/a1",
        b"Kangaroo\tWhat do kangaroos eat?\tgrasses and shrubs\tmedium\tmedium\tdata/set1/a1",
        b"Charles-Augustin_de_Coulomb\tWhere was Coulomb born?\tAngoul\xeame\teasy\teasy\tdata/set1/a2",
        b"Charles-Augustin_de_Coulomb\t\tNULL\tNULL\tNULL\tdata/set1/a2",
    ]
    (root / "S08" / "question_answer_pairs.txt").write_bytes(HEADER + b"\n".join(rows) + b"\n")
    return root


def run_cmu(input_dir: Path, out: Path, *extra: str) -> dict:
    args = prepare_cmu_qa.parse_args(["--input_dir", str(input_dir), "--output_dir", str(out), *extra])
    return prepare_cmu_qa.main(args)


def test_cmu_counts_merging_and_gold(cmu_dir, tmp_path):
    out = tmp_path / "out"
    stats = run_cmu(cmu_dir, out, "--val_fraction", "0.5", "--test_fraction", "0")
    assert stats == json.loads((out / "stats.json").read_text())
    assert (stats["article_files"], stats["documents"], stats["documents_without_questions"]) == (3, 2, 0)
    assert (stats["qa_rows"], stats["merged_questions"], stats["skipped_empty_questions"]) == (9, 5, 1)
    assert (stats["skipped_null_answers"], stats["skipped_unanswerable"], stats["yes_no_only_questions"]) == (2, 1, 1)
    assert (
        sorted([stats["questions"]["train"], stats["questions"]["val"]]) == [1, 3] and stats["questions"]["test"] == 0
    )
    assert sum(stats["questions_without_gold_passage"].values()) == 1
    check_outputs(out, normalize_answer)

    gold = {row["question"]: row for row in all_gold(out).values()}
    assert [kb_title for kb_title, _ in read_kb_csv(out / "kb.csv")] == ["Kangaroo", "Charles-Augustin de Coulomb"]
    assert gold["What family do kangaroos belong to?"]["answers"] == ["Macropodidae", "the family Macropodidae."]
    assert gold["What family do kangaroos belong to?"]["gold_passage_ids"] == [0]  # not 1: no question word there
    assert stats["answer_spans_dropped_by_overlap"] == 1  # passage 1's Macropodidae
    assert gold["Are kangaroos marsupials?"] | {"gold_passage_ids": []} == gold["Are kangaroos marsupials?"]
    assert gold["Are kangaroos marsupials?"]["answers"] == ["yes"]
    assert gold["What do kangaroos eat?"]["gold_passage_ids"] == [0, 1]  # across the passage boundary
    assert gold["Where was Coulomb born?"]["answers"] == ["Angoulême"]  # the 1252 byte decoded, found in UTF-8 text
    assert gold["Where was Coulomb born?"]["gold_passage_ids"] == [3]


def test_cmu_require_gold_passage_drops_and_counts_the_rest(cmu_dir, tmp_path):
    out = tmp_path / "out"
    stats = run_cmu(cmu_dir, out, "--val_fraction", "0.5", "--test_fraction", "0", "--require_gold_passage")
    assert sum(stats["skipped_without_gold_passage"].values()) == 1  # the yes/no question
    assert sum(stats["questions"].values()) == 3
    rows = all_gold(out).values()
    assert {row["question"] for row in rows} == {
        "What family do kangaroos belong to?",
        "What do kangaroos eat?",
        "Where was Coulomb born?",
    }
    assert all(row["gold_passage_ids"] for row in rows)
    check_outputs(out, normalize_answer)


def test_cmu_bad_input_names_file_and_field(cmu_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="no S\\*/question_answer_pairs.txt"):
        run_cmu(tmp_path, tmp_path / "out")
    qa = tmp_path / "S08" / "question_answer_pairs.txt"
    qa.parent.mkdir()
    qa.write_bytes(HEADER + b"Kangaroo\tWhy?\tBecause\teasy\teasy\tdata/set9/a1\n")
    with pytest.raises(FileNotFoundError, match=r"question_answer_pairs.txt:2: field ArticleFile names"):
        run_cmu(tmp_path, tmp_path / "out")
    qa.write_bytes(b"Title\tQuestion\tAnswer\n")
    with pytest.raises(ValueError, match=r"question_answer_pairs.txt:1: header lacks column\(s\) ArticleTitle"):
        run_cmu(tmp_path, tmp_path / "out")
    qa.write_bytes(HEADER + b"Kangaroo\tWhy?\tBecause\n")
    with pytest.raises(ValueError, match=r"question_answer_pairs.txt:2: expected 6 tab-separated fields, found 3"):
        run_cmu(tmp_path, tmp_path / "out")
