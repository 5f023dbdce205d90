"""Converters of question tables: DALM's CSV (`Passage,Query[,Answer]`), any CSV/TSV/JSONL of questions and WikiQA's
TSV, on fixtures written here (WikiQA's licence is research-only: its format, none of its rows). Splits by passage,
gold passages that hold their answers, quoted fields, clear refusals, the warning for a split too small to measure;
and a 20-row DALM CSV converted, built into a KB and trained retriever_only and dalm without a hand step."""

import csv
import gzip
import json
import uuid
import warnings
from pathlib import Path

import pytest

from rag_end2end.data import qa_table, wikiqa
from rag_end2end.data.readers import InputError, read_kb_csv
from rag_end2end.kb import build as use_own_knowledge_dataset
from rag_end2end.kb import search as kb_search
from rag_end2end.kb.passages import split_documents
from rag_end2end.training import finetune as finetune_rag

SPLITS = ("train", "val", "test")
HIDDEN = 32  # the tiny models' width (tiny_models.py)
TOPICS = [
    ("glaciers", "Glaciers carve valleys over centuries, and their meltwater feeds rivers far downstream."),
    ("volcanoes", 'A "shield" volcano builds gentle slopes from fluid basaltic lava, layer after layer.'),
    ("deltas", "River deltas form where sediment settles as a current slows at the sea."),
    ("dunes", "Sand dunes migrate downwind, driven by grains that hop along their windward side."),
    ("caves", "Limestone caves open as carbonic acid dissolves rock along cracks and bedding planes."),
    ("reefs", "Coral reefs grow from the skeletons of tiny polyps in warm, clear and shallow water."),
    ("geysers", "Geysers erupt when groundwater heated by magma flashes to steam under pressure."),
    ("fjords", "Fjords are drowned glacial valleys, deep and steep-sided, along cold coastlines."),
    ("moraines", "Moraines are ridges of rock debris that a glacier pushed and left behind."),
    ("atolls", "Atolls are ring-shaped reefs around a lagoon where a volcanic island sank."),
]
ANSWERS = ["meltwater", "basaltic lava", "sediment", "grains", "carbonic acid", "polyps", "steam", "drowned", "ridges"]


HELD_OUT = ("--val_fraction", "0.2", "--test_fraction", "0.2")  # 2 of the 10 passages each


def dalm_rows() -> list[tuple[str, str, str]]:
    """20 rows, 10 passages with 2 questions each, the answer a span of the passage (DALM's toy_data_train.csv
    layout); one passage spans two lines inside its quotes."""
    rows = []
    for i, (topic, passage) in enumerate(TOPICS):
        answer = ANSWERS[i] if i < len(ANSWERS) else "lagoon"
        if i == 3:
            passage = passage.replace("downwind, ", "downwind,\n")
        rows += [(passage, f"What do {topic} involve?", answer), (passage, f"Tell me about {topic}, briefly", answer)]
    return rows


def write_dalm_csv(path: Path, rows, header=("Passage", "Query", "Answer"), delimiter=",") -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(row[: len(header)] for row in rows)
    return path


def convert(input_path: Path, out: Path, *extra: str, module=qa_table) -> dict:
    return module.main(module.parse_args(["--input", str(input_path), "--output_dir", str(out), *extra]))


def passages_of(out: Path) -> list[str]:
    return list(split_documents(read_kb_csv(out / "kb.csv"))["text"])


def read_split(out: Path, split: str) -> tuple[list[str], list[str], list[dict]]:
    lines = {ext: (out / f"{split}.{ext}").read_text().splitlines() for ext in ("source", "target", "gold.jsonl")}
    return lines["source"], lines["target"], [json.loads(line) for line in lines["gold.jsonl"]]


def test_dalm_csv_becomes_a_kb_of_its_passages_split_by_passage_with_gold(tmp_path):
    out = tmp_path / "out"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 2 passages a held-out split: measurable, no warning
        stats = convert(write_dalm_csv(tmp_path / "toy.csv", dalm_rows()), out, *HELD_OUT)
    kb = read_kb_csv(out / "kb.csv")
    assert len(kb) == 10 and stats["distinct_passages"] == 10 and stats["rows"] == 20
    # titles: the passage's first sentence, cut to 10 words
    assert kb[1] == (
        'A "shield" volcano builds gentle slopes from fluid basaltic lava,...',
        " ".join(TOPICS[1][1].split()),
    )
    assert kb[0][0] == "Glaciers carve valleys over centuries, and their meltwater feeds rivers..."
    passages = passages_of(out)
    seen = {}
    for split in SPLITS:
        sources, targets, gold = read_split(out, split)
        assert len(sources) == len(targets) == len(gold) > 0
        for question, target, g in zip(sources, targets, gold):
            assert g["question"] == question and g["answers"] == [target]
            assert len(g["gold_passage_ids"]) == 1
            text = passages[g["gold_passage_ids"][0]]
            assert target.lower() in text.lower()
            assert seen.setdefault(text, split) == split, "a passage with questions in two splits"
    assert sorted(stats["questions"].values()) == [4, 4, 12]  # 2 questions a passage: 6/2/2 passages


def test_a_retriever_only_tsv_without_answers_targets_the_passage(tmp_path):
    rows = [(p, q) for p, q, _ in dalm_rows()]
    path = write_dalm_csv(tmp_path / "retriever.tsv", rows, header=("passage", "query"), delimiter="\t")
    out = tmp_path / "out"
    stats = convert(path, out, *HELD_OUT)
    assert stats["without_answer_column"] is True and stats["questions"]["train"] == 12
    passages = passages_of(out)
    for split in SPLITS:
        sources, targets, gold = read_split(out, split)
        for target, g in zip(targets, gold):
            assert g["answers"] == [] and [passages[i] for i in g["gold_passage_ids"]] == [target]


def test_a_split_too_small_to_measure_is_warned_about(tmp_path):
    path = write_dalm_csv(tmp_path / "toy.csv", dalm_rows())
    with pytest.warns(UserWarning, match=r"val\.source: 2 question\(s\) on 1 document\(s\) is too small to measure"):
        stats = convert(path, tmp_path / "out")  # the default 0.1 of 10 passages: 1 passage, 2 questions
    assert stats["documents_per_split"]["val"] == 1


def test_named_columns_merged_rows_answer_lists_and_passages_found_by_answer(tmp_path):
    long_passage = " ".join(f"w{i}" for i in range(150)) + " the answer is cobalt blue."
    rows = [
        {"q": "Which colour?", "a": ["cobalt blue", "blue"], "ctx": long_passage, "t": "Pigments"},
        {"q": "Which colour?", "a": "cobalt", "ctx": long_passage, "t": "Pigments"},
        *({"q": f"Question {i}?", "a": f"w{i}", "ctx": long_passage, "t": "Pigments"} for i in range(3)),
        *({"q": f"Other {i}?", "a": f"x{i}", "ctx": f"x{i} is here, twice x{i}.", "t": f"T{i}"} for i in range(4)),
    ]
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    flags = ["--question_column", "q", "--answer_column", "a", "--passage_column", "ctx", "--title_column", "t"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # splits of 1 document
        stats = convert(path, out, *flags)
    assert stats["merged_rows"] == 1 and stats["distinct_passages"] == 5
    passages = passages_of(out)
    gold = [g for split in SPLITS for g in read_split(out, split)[2]]
    colour = next(g for g in gold if g["question"] == "Which colour?")
    assert colour["answers"] == ["cobalt blue", "blue", "cobalt"] and colour["title"] == "Pigments"
    assert [("cobalt" in passages[i]) for i in colour["gold_passage_ids"]] == [True]  # passage 2 of 2 only
    titles = {g["title"]: {s for s in SPLITS if g in read_split(out, s)[2]} for g in gold}
    assert all(len(splits) == 1 for splits in titles.values())  # by title: the article's questions together


def test_a_quote_that_does_not_close_cleanly_is_refused_with_its_line(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text('Passage,Query,Answer\nFine text,Fine question?,text\n"Quoted" then more,Why?,more\n')
    with pytest.raises(InputError, match=r"bad\.csv:3: malformed row .*quoted whole"):
        convert(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_missing_column_or_field_count_is_refused_before_anything_is_written(tmp_path):
    path = write_dalm_csv(tmp_path / "toy.csv", dalm_rows())
    with pytest.raises(InputError, match=r"toy\.csv:1: no column 'Question' \(--question_column\); the header holds"):
        convert(path, tmp_path / "out", "--question_column", "Question")
    path.write_text("Passage,Query,Answer\na,b,c\nd,e\n")
    with pytest.raises(InputError, match=r"toy\.csv:3: expected 3 fields"):
        convert(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_script_refuses_in_one_line(tmp_path, monkeypatch, capsys):
    path = tmp_path / "x.csv"
    path.write_text("Title,Body\na,b\n")
    monkeypatch.setattr("sys.argv", ["prepare_dalm_csv.py", "--input", str(path), "--output_dir", str(tmp_path / "o")])
    with pytest.raises(SystemExit) as exit_info:
        qa_table.cli()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "x.csv:1: no question column" in err


# ---------------------------------------------------------------------- WikiQA: its format, made-up rows

WIKIQA_HEADER = "QuestionID\tQuestion\tDocumentID\tDocumentTitle\tSentenceID\tSentence\tLabel"


def wikiqa_fixture() -> str:
    """Six made-up documents of WikiQA's shape; sentence 0 of the first starts with a quote it closes mid-field, as
    WikiQA's own sentences do. Each document's question has one correct sentence, except D6's (none)."""
    lines = [WIKIQA_HEADER]
    for d in range(1, 7):
        sentences = [f"Topic {d} opens with words about place {d} ."] + [
            " ".join(f"filler{d}x{s}w{k}" for k in range(30)) + " ." for s in range(1, 5)
        ]
        if d == 1:
            sentences[0] = '"Odd" mountains rise above the plain of the first topic .'
        for qi in range(2 if d <= 2 else 1):
            correct = -1 if d == 6 else (3 if qi else 0)  # 3: words 71-101 or 73-103
            for s, sentence in enumerate(sentences):
                qid = f"Q{d}{qi}"
                lines.append(
                    f"{qid}\tquestion {qi} on topic {d}?\tD{d}\tTopic {d}\tD{d}-{s}\t{sentence}\t{int(s == correct)}"
                )
    return "\n".join(lines) + "\n"


def test_wikiqa_documents_sentences_labelled_1_and_quotes_kept(tmp_path):
    text = wikiqa_fixture()
    train = tmp_path / "WikiQA-train.tsv.gz"
    train.write_bytes(gzip.compress(text.encode()))
    out = tmp_path / "out"
    stats = convert(train, out, "--val_fraction", "0.2", "--test_fraction", "0.2", module=wikiqa)
    assert stats["wikiqa_questions"] == 8 and stats["skipped_without_correct_sentence"] == 1
    kb = read_kb_csv(out / "kb.csv")
    assert len(kb) == 6 and kb[0][0] == "Topic 1"
    assert kb[0][1].startswith('"Odd" mountains rise')  # read as written, then quoted in kb.csv as CSV says
    passages = passages_of(out)
    seen = {}
    for split in SPLITS:
        for g in read_split(out, split)[2]:
            (answer,) = g["answers"]
            joined = " ".join(passages[i] for i in g["gold_passage_ids"])
            assert answer in joined, (answer, g)
            assert len(g["gold_passage_ids"]) == (2 if answer.startswith("filler") else 1)  # across a boundary
            assert seen.setdefault(g["title"], split) == split
    assert sum(stats["questions"].values()) == 7


def test_wikiqa_bad_rows_are_refused_with_file_and_line(tmp_path):
    path = tmp_path / "w.tsv"
    path.write_text(WIKIQA_HEADER + "\nQ1\tq?\tD1\tT\tD1-0\ts .\tyes\n")
    with pytest.raises(InputError, match=r"w\.tsv:2: field Label is 'yes'"):
        convert(path, tmp_path / "out", module=wikiqa)
    path.write_text("QuestionID\tQuestion\n")
    with pytest.raises(InputError, match=r"w\.tsv:1: header lacks column\(s\) DocumentID"):
        convert(path, tmp_path / "out", module=wikiqa)


# ---------------------------------------------------------------------- DALM's CSV trained without a hand step


def run_on_converted(tiny_models, data: Path, tmp_path: Path, mode: str) -> list[str]:
    """The KB of a converter's kb.csv built with the tiny context encoder, and finetune_rag.py's flags for a `mode`
    run of the tiny encoders over it and the converter's splits."""
    kb_args = ["--csv_path", str(data / "kb.csv"), "--output_dir", str(tmp_path / "kb"), "--index_type", "flat"]
    kb_args += ["--dpr_ctx_encoder_model_name", str(tiny_models["context_encoder"]), "--device", "cpu"]
    passages, index = use_own_knowledge_dataset.main(use_own_knowledge_dataset.parse_args(kb_args))
    flags = {
        "training_mode": mode,
        "model_type": "rag_token",
        "question_encoder_name_or_path": tiny_models["question_encoder"],
        "context_encoder_name": tiny_models["context_encoder"],
        "passages_path": passages,
        "index_path": index,
        "index_type": "flat",
        "data_dir": data,
        "output_dir": tmp_path / "run",
    }
    return [arg for name, value in flags.items() for arg in (f"--{name}", str(value))]


@pytest.mark.parametrize("mode", ["retriever_only", "dalm"])
def test_a_20_row_dalm_csv_trains_retriever_only_and_dalm(ray_local, tiny_models, tmp_path, mode):
    data = tmp_path / "data"
    convert(write_dalm_csv(tmp_path / "toy.csv", dalm_rows()), data, *HELD_OUT)
    generator = [] if mode == "retriever_only" else ["--generator_name_or_path", str(tiny_models["generator"])]
    argv = [
        *run_on_converted(tiny_models, data, tmp_path, mode),
        *generator,
        "--accelerator",
        "cpu",
        "--devices",
        "1",
        "--train_batch_size",
        "4",
        "--eval_batch_size",
        "4",
        "--n_docs",
        "2",
        "--do_train",
        "--max_steps",
        "3",
        "--val_check_interval",
        "3",
        "--ray_namespace",
        f"test-{uuid.uuid4().hex[:8]}",
    ]
    module = finetune_rag.main(finetune_rag.parse_args(argv))
    validations = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [v["step"] for v in validations] == [3]  # one epoch: 12 training questions, 4 a batch
    assert all(v["val_loss"] > 0 for v in validations), validations  # 2 passages a batch: a real InfoNCE / NLL
    assert module.global_step == 3 and (tmp_path / "run" / "checkpoint3").is_dir()


def test_an_infonce_validation_without_negatives_says_so(tiny_models, tmp_path):
    """The default split of the 20 rows holds out 1 passage (2 questions): the batch's only candidate is their own
    positive, InfoNCE is 0.0: the validation leaves them out and warns instead of reporting a perfect retriever."""
    data = tmp_path / "data"
    with pytest.warns(UserWarning, match="too small to measure"):
        convert(write_dalm_csv(tmp_path / "toy.csv", dalm_rows()), data)
    args = finetune_rag.parse_args(run_on_converted(tiny_models, data, tmp_path, "retriever_only"))
    module = finetune_rag.GenerativeQAModule(args, kb_search.KBSearch(args.passages_path, args.index_path, HIDDEN))
    batch = next(iter(module._dataloader("val", 4, shuffle=False)))
    assert len(batch["source_text"]) == 2
    module.validation_step(batch, 0)
    with pytest.warns(
        UserWarning, match=r"val: 2 question\(s\) could not be scored .* 2 with no negative in their batch"
    ):
        module._eval_epoch_end("val")
