"""data_prep/make_reconstruction_data.py (rag_end2end.data.reconstruction): statement-reconstruction examples from
a KB's own documents. Gold ids are the rows of the KB use_own_knowledge_dataset.py builds, every mask is its
passage's text, the filters and caps hold, the choice is seeded, the split is by document, bad input is refused."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from rag_end2end.data import reconstruction as recon
from rag_end2end.data.readers import InputError, read_kb_csv, read_lines
from rag_end2end.kb.passages import split_documents

REPO = Path(__file__).resolve().parents[1]
DUMMY_CSV = REPO / "test_run" / "dummy-kb" / "my_knowledge_dataset.csv"


def write_kb(path: Path, docs: list[tuple[str, str]]) -> Path:
    """A `title<TAB>text` CSV, quoted by the csv module where needed (as the converters write it)."""
    with path.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f, delimiter="\t", lineterminator="\n").writerows(docs)
    return path


def sentences(prefix: str, n: int) -> str:
    """n distinct ten-word sentences."""
    return " ".join(f"The {prefix} sample number {i} was measured in the laboratory." for i in range(n))


def run(csv_path: Path, out: Path, *extra: str) -> tuple[dict, dict[str, list]]:
    """Run the command's main; return its stats and, per split, (source, target, gold record) triples."""
    stats = recon.main(recon.parse_args(["--csv_path", str(csv_path), "--output_dir", str(out), *extra]))
    rows = {}
    for split in recon.SPLITS:
        sources, targets = read_lines(out / f"{split}.source"), read_lines(out / f"{split}.target")
        gold = [json.loads(line) for line in read_lines(out / f"{split}.gold.jsonl")]
        assert len(sources) == len(targets) == len(gold) == stats["statements"][split] > 0
        rows[split] = list(zip(sources, targets, gold))
    assert json.loads((out / "stats.json").read_text()) == stats
    return stats, rows


def all_rows(rows: dict[str, list]) -> list:
    return [row for split in recon.SPLITS for row in rows[split]]


def test_gold_ids_are_rows_of_the_kb_use_own_knowledge_dataset_builds(tmp_path, tiny_models):
    """Several passages per document, an all-blank 100-word window that split_documents drops (the ids after it move
    up by one), a line break and double spaces inside a document: each statement is verbatim in the built KB's row
    that its gold id names, under that row's title, and its mask is that text."""
    from datasets import load_from_disk

    from rag_end2end.kb import build as use_own_knowledge_dataset

    docs = [
        ("Alpha", sentences("alpha", 25)),  # 250 words: 3 passages
        ("Gap", sentences("gap", 10) + " " * 150 + sentences("after", 10)),  # 100 words, a dropped window, 100 more
        (
            "Gamma",
            "Our first line holds a sentence with enough words to keep.\nThe second  line holds another "
            "sentence with  double spaces inside it.",
        ),
        ("Delta", sentences("delta", 12)),
    ]
    csv_path = write_kb(tmp_path / "kb.csv", docs)
    kb_args = use_own_knowledge_dataset.parse_args(
        [
            "--csv_path",
            str(csv_path),
            "--output_dir",
            str(tmp_path / "kb"),
            "--index_type",
            "flat",
            "--dpr_ctx_encoder_model_name",
            str(tiny_models["context_encoder"]),
            "--device",
            "cpu",
        ]
    )
    built = load_from_disk(str(use_own_knowledge_dataset.main(kb_args)[0]))
    assert len(built) == 3 + 3 + 1 + 2  # the blank window is no passage

    stats, rows = run(csv_path, tmp_path / "out", "--per_passage", "20", "--val_fraction", "0.3")
    assert stats["passages"] == len(built)
    seen_titles = set()
    for source, target, gold in all_rows(rows):
        (pid,) = gold["gold_passage_ids"]
        assert source == recon.RECONSTRUCTION_MARKER + target and gold["answers"] == [target]
        assert gold["mask"] == {"passage_id": pid, "sentence": target}
        assert target in built[pid]["text"] and built[pid]["title"] == gold["title"]
        assert any(target in text for title, text in docs if title == gold["title"])
        seen_titles.add(gold["title"])
    targets = {target for _, target, _ in all_rows(rows)}
    assert "The second  line holds another sentence with  double spaces inside it." in targets
    assert "The after sample number 9 was measured in the laboratory." in targets  # after the dropped window
    assert seen_titles == {"Alpha", "Gap", "Gamma", "Delta"}
    # the directory alone is a --data_dir the trainer reads (no questions needed)
    from transformers import AutoTokenizer

    from rag_end2end.data.qa_dataset import QuestionDataset

    tokenizer = AutoTokenizer.from_pretrained(tiny_models["question_encoder"])
    for split in recon.SPLITS:
        assert len(QuestionDataset(tokenizer, str(tmp_path / "out"), 64, split)) == stats["statements"][split]


def test_masks_are_the_sentence_in_its_passage_on_the_dummy_kb(tmp_path, capsys):
    passages = split_documents(read_kb_csv(DUMMY_CSV))
    stats, rows = run(DUMMY_CSV, tmp_path / "out", "--log_every", "2")
    printed = capsys.readouterr().out
    assert "2/5 documents" in printed and "4/5 documents" in printed and "5/5" not in printed
    assert f"kept {stats['kept']}" in printed  # the summary
    assert stats["documents"] == 5 and stats["passages"] == len(passages) and stats["kept"] > 20
    for source, target, gold in all_rows(rows):
        mask = gold["mask"]
        text = passages[mask["passage_id"]]["text"]
        assert mask["sentence"] == target and target in text and source.startswith(recon.RECONSTRUCTION_MARKER)
        assert gold["id"] == f"p{mask['passage_id']}-c{text.index(target)}"
        assert len(target.split()) >= 8 and target not in recon.mask_passage(text, target)


def test_split_sentences_keeps_abbreviations_decimals_and_initials():
    text = (
        "Dr. Smith et al. measured 3.5 mg of e.g. zinc in the U.S. lab. The rate rose by 2.4% (Fig. 2) in vivo! "
        'Was it real? "Yes," said J. Doe.\nA new line starts here. 12 patients were seen [3]. Then it ended'
    )
    got = [text[start:end] for start, end in recon.split_sentences(text)]
    assert got == [
        "Dr. Smith et al. measured 3.5 mg of e.g. zinc in the U.S. lab.",
        "The rate rose by 2.4% (Fig. 2) in vivo!",
        "Was it real?",
        '"Yes," said J. Doe.',
        "A new line starts here.",
        "12 patients were seen [3].",
        "Then it ended",
    ]


GOOD = [
    "Coronaviruses infect the upper airways of many mammals and birds.",
    "The spike protein binds a receptor on the surface of the host cell.",
]
BAD = {
    "table_like": "| Age | 12 | 34 | 56 | 78 | 90 | 11 | 13 |",
    "reference": "[12] Smith J, Doe A, Roe B and colleagues described the virus in detail",
    "too_short": "Results were mixed.",
    "caption": "Figure 2: Viral load in the lungs of infected mice over seven days.",
    "too_long": " ".join(["word"] * 61) + ".",
}


def test_filters_skip_and_count_each_kind(tmp_path):
    """A document of two good sentences and one fragment of each kind (each on its own line), and the first good
    sentence again, and one of a sentence too long: each skipped and counted under its reason, the good ones kept."""
    short_ones = [BAD[reason] for reason in BAD if reason != "too_long"]
    text = "\n".join([GOOD[0], *short_ones, GOOD[1], GOOD[0]])
    assert len(text.split(" ")) <= 100  # one passage each (split_text counts words between spaces): none cut
    docs = [("Filters", text), ("Long", BAD["too_long"]), ("Other", sentences("other", 3))]
    stats, rows = run(write_kb(tmp_path / "kb.csv", docs), tmp_path / "out", "--per_passage", "10")
    expected = dict.fromkeys(recon.SKIP_REASONS, 0) | dict.fromkeys(BAD, 1) | {"duplicate": 1}
    assert stats["skipped"] == expected
    kept = {target for _, target, gold in all_rows(rows) if gold["title"] == "Filters"}
    assert kept == set(GOOD)
    assert stats["sentences_seen"] == len(GOOD) + len(BAD) + 1 + 3


@pytest.mark.parametrize("reason", sorted(BAD))
def test_skip_reason_of_each_fragment(reason):
    assert recon.skip_reason(BAD[reason], 8, 60) == reason
    assert [recon.skip_reason(s, 8, 60) for s in GOOD] == [None, None]


def test_caps_per_passage_and_in_total(tmp_path):
    stats, rows = run(DUMMY_CSV, tmp_path / "one", "--per_passage", "1")
    pids = [gold["mask"]["passage_id"] for _, _, gold in all_rows(rows)]
    assert len(pids) == len(set(pids)) == stats["kept"]
    assert (
        stats["passages_at_per_passage_cap"] > 0
        and stats["over_per_passage_cap"] >= stats["passages_at_per_passage_cap"]
    )
    uncapped, _ = run(DUMMY_CSV, tmp_path / "all", "--per_passage", "100")
    assert (
        uncapped["passages_at_per_passage_cap"] == 0
        and uncapped["kept"] == stats["kept"] + stats["over_per_passage_cap"]
    )
    total, rows = run(DUMMY_CSV, tmp_path / "seven", "--max_statements", "7")
    assert total["kept"] == len(all_rows(rows)) == 7 and total["over_max_statements"] == total["kb_statements"] - 7


def test_choice_is_seeded(tmp_path):
    def chosen(name: str, seed: str) -> tuple[dict, set[str]]:
        run(DUMMY_CSV, tmp_path / name, "--per_passage", "1", "--seed", seed)
        files = {n: (tmp_path / name / n).read_text() for n in recon.OUTPUT_FILES}
        return files, set(read_lines(tmp_path / name / "train.target") + read_lines(tmp_path / name / "val.target"))

    first, again, other = chosen("a", "1"), chosen("b", "1"), chosen("c", "2")
    assert first[0] == again[0]  # byte for byte
    assert first[1] != other[1]


def test_split_is_by_document_and_rows_sharing_a_title_stay_together(tmp_path):
    """Three titles of four rows each (an article's contexts): the val share is one title, all of its rows."""
    docs = [(title, sentences(f"{title}{row}", 3)) for title in "ABC" for row in range(4)]
    stats, rows = run(write_kb(tmp_path / "kb.csv", docs), tmp_path / "out", "--val_fraction", "0.3")
    titles = {split: [gold["title"] for _, _, gold in rows[split]] for split in recon.SPLITS}
    assert len(set(titles["val"])) == 1 == stats["documents_per_split"]["val"]
    assert len(set(titles["train"])) == 2 == stats["documents_per_split"]["train"]
    assert not set(titles["train"]) & set(titles["val"])
    assert len(titles["val"]) == 4 * 2 and len(titles["train"]) == 2 * 4 * 2  # every row's 2 statements in its split


def test_a_single_document_is_refused(tmp_path):
    csv_path = write_kb(tmp_path / "kb.csv", [("Only", sentences("only", 5))])
    with pytest.raises(ValueError, match="at least 2 are needed"):
        recon.main(recon.parse_args(["--csv_path", str(csv_path), "--output_dir", str(tmp_path / "out")]))
    assert not (tmp_path / "out" / "stats.json").exists()


def test_external_statements_gold_at_their_titled_document(tmp_path):
    """A statement titled as a KB document is gold at the passage that shares its rare words and joins that
    document's split; an untitled one has no gold passage; neither has a mask."""
    alpha = (
        sentences("alpha", 10)
        + " Penguins huddle together to survive the Antarctic winter storms. "
        + sentences("beta", 10)
    )  # passage 0: 100 words; passage 1 starts with the penguin sentence
    csv_path = write_kb(tmp_path / "kb.csv", [("Alpha", alpha), ("Other", sentences("other", 5))])
    statements = tmp_path / "s.jsonl"
    statements.write_text(
        json.dumps({"statement": "Penguins huddle in winter storms to survive.", "title": "Alpha"})
        + "\n"
        + json.dumps({"statement": "An abstract  that\nsays something new about the domain."})
        + "\n",
    )
    stats, rows = run(csv_path, tmp_path / "out", "--statements_path", str(statements))
    assert stats["external_statements"] == 2 and stats["external_with_kb_title"] == 1
    by_id = {gold["id"]: (split, gold) for split in recon.SPLITS for _, _, gold in rows[split]}
    titled = by_id["s1"][1]
    assert titled["gold_passage_ids"] == [1] and titled["mask"] is None and titled["title"] == "Alpha"
    untitled = by_id["s2"][1]
    assert untitled["gold_passage_ids"] == [] and untitled["mask"] is None
    assert untitled["answers"] == ["An abstract that says something new about the domain."]  # one line
    for seed in range(8):  # three documents, two in val: the titled statement is always where its document is
        _, rows = run(
            csv_path,
            tmp_path / f"seed{seed}",
            "--statements_path",
            str(statements),
            "--seed",
            str(seed),
            "--val_fraction",
            "0.5",
        )
        splits = {split for split in recon.SPLITS for _, _, g in rows[split] if g["title"] == "Alpha"}
        assert len(splits) == 1, f"seed {seed}: statements titled Alpha in {splits}"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"title": "T"}', "missing field `statement`"),
        ('{"statement": 3}', "field `statement` must be a non-empty string"),
        ('{"statement": "Fine text here.", "title": 5}', "field `title` must be a string or null"),
        ('{"statement": "unclosed', "not JSON"),
        ('["statement"]', "expected a JSON object"),
    ],
)
def test_bad_statements_file_is_refused_with_its_line(tmp_path, line, message):
    path = tmp_path / "s.jsonl"
    path.write_text(json.dumps({"statement": "A good statement first."}) + "\n" + line + "\n")
    with pytest.raises(InputError) as err:
        recon.read_statements(path)
    assert str(err.value).startswith(f"{path}:2: ") and message in str(err.value)


def test_bad_statements_file_stops_the_command_in_one_line_before_writing(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"statement": "ok"}\n{"title": "T"}\n')
    out = tmp_path / "out"
    script = REPO / "data_prep" / "make_reconstruction_data.py"
    argv = [
        sys.executable,
        str(script),
        "--csv_path",
        str(DUMMY_CSV),
        "--output_dir",
        str(out),
        "--statements_path",
        str(path),
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0
    assert f"{path}:2: missing field `statement`" in done.stderr
    assert not out.exists()


def test_existing_output_is_refused_unless_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--overwrite"):
        recon.main(recon.parse_args(["--csv_path", str(DUMMY_CSV), "--output_dir", str(out)]))
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    run(DUMMY_CSV, out, "--overwrite")
    assert (out / "notes.txt").read_text() == "mine"  # only the script's own files are replaced
    assert sorted(p.name for p in out.iterdir()) == sorted([*recon.OUTPUT_FILES, "notes.txt"])


def test_mask_passage_cuts_the_sentence_and_keeps_the_rest():
    text = "First part here.  The cut sentence sits here.\nLast part. The cut sentence sits here."
    masked = recon.mask_passage(text, "The cut sentence sits here.")
    assert masked == "First part here. Last part."
    assert recon.mask_passage("The cut sentence sits here. Rest.", "The cut sentence sits here.") == "Rest."
    assert recon.mask_passage(text, "absent") == text and recon.mask_passage(text, "") == text


@pytest.mark.parametrize(
    "flags",
    [
        ["--per_passage", "0"],
        ["--min_words", "9", "--max_words", "8"],
        ["--val_fraction", "0"],
        ["--max_statements", "1"],
    ],
)
def test_impossible_settings_are_refused(flags, capsys):
    with pytest.raises(SystemExit):
        recon.parse_args(["--csv_path", "kb.csv", "--output_dir", "o", *flags])
    assert f"{flags[0]}" in capsys.readouterr().err
