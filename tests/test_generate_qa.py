"""data_prep/generate_qa.py: parsing replies, each filter, the split by document, resuming after an interruption,
the round-trip filter, and end-to-end runs (the tiny random Llama for real, and fixed well-formed replies) whose
output the trainer and use_own_knowledge_dataset.py accept."""

import csv
import json
import re
import zlib
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from rag_end2end.data import generate_qa as gq
from rag_end2end.data import qa_table
from rag_end2end.data.qa_dataset import QuestionDataset
from rag_end2end.data.readers import read_kb_csv, read_lines
from rag_end2end.evaluation.metrics import has_answer, normalize_answer
from rag_end2end.kb.passages import split_documents

REPO = Path(__file__).resolve().parents[1]
DUMMY_CSV = REPO / "test_run" / "dummy-kb" / "my_knowledge_dataset.csv"
PASSAGE = (
    "The Eiffel Tower was completed in 1889 for the World's Fair in Paris and was designed by the engineering "
    "company of Gustave Eiffel, whose engineers drew the plans."
)
PROMPT_RE = re.compile(
    r"Title: (.*?)\nPassage: (.*?)\n\n(?:Write one question|Question: |Copy from the passage|Write a question about)",
    re.DOTALL,
)


# ---------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Question: When was the tower completed?\nAnswer: 1889", ("When was the tower completed?", "1889")),
        ("Question: Who designed it?\nAnswer: Gustave Eiffel.\n", ("Who designed it?", "Gustave Eiffel")),
        (
            "Question:   Who   designed it?  \n\nAnswer:\n\n  the company of Gustave Eiffel  ",
            ("Who designed it?", "the company of Gustave Eiffel"),
        ),
        ("Question: Where is it? Answer: Paris", ("Where is it?", "Paris")),  # one line
        ("Question: Which country? Answer: the U.S.", ("Which country?", "the U.S.")),  # an abbreviation keeps its dot
        ('Question: "What was built?"\nAnswer: "the tower"', ("What was built?", "the tower")),
        ("Question: What year?\nAnswer: The answer is: 1889", ("What year?", "1889")),
    ],
)
def test_parse_pair_well_formed(text, expected):
    assert gq.parse_pair(text) == expected


def test_parse_pair_ignores_chatter_around_the_pair():
    text = (
        "Sure! Here is a question about the passage.\n\n**Question:** Who designed the Eiffel Tower?\n"
        "(based on the second sentence)\n**Answer:** Gustave Eiffel\n\nExplanation: the passage says so.\n"
        "Question: Another one?\nAnswer: no"
    )
    assert gq.parse_pair(text) == ("Who designed the Eiffel Tower?", "Gustave Eiffel")
    assert gq.parse_pair("Question: What year?\nAnswer: 1889 Question: And then?") == ("What year?", "1889")


@pytest.mark.parametrize(
    "text",
    [
        "",
        "The Eiffel Tower was completed in 1889.",  # no labels
        "Question: When was the Eiffel Tower completed?",  # partial: no answer
        "Question: When was the Eiffel Tower completed?\nAnswer:",  # empty answer
        "Question: When was it completed?\nAnswer:   \n\n",
        "Question: When was it completed?\nAnswer: The answer is:",  # an answer that announces itself only
        "Question:\nAnswer: 1889",  # empty question
        "Answer: 1889\nQuestion: When was it completed?",  # answer before its question
        "question: when was it completed?\nanswer : 1889",  # not the labels the prompt asks for
        "Question: ** **\nAnswer: 1889",
    ],
)
def test_parse_pair_malformed(text):
    assert gq.parse_pair(text) is None


# ---------------------------------------------------------------- filters


@pytest.mark.parametrize(
    "question, answer, reason",
    [
        ("When was the Eiffel Tower completed?", "1889", None),
        ("Who designed the tower?", "the engineering company of Gustave Eiffel", None),
        ("When completed?", "1889", "question_too_short"),
        (" ".join(["word"] * 41) + "?", "1889", "question_too_long"),
        ("What does the passage say?", " ".join(PASSAGE.split()[:21]), "answer_too_long"),
        ("When was the Eiffel Tower completed?", "1899", "answer_not_in_passage"),
        ("Who drew the plans?", "Eiffel Tower company", "answer_not_in_passage"),  # words, but not as a run
        ("Who drew the plans?", "engineer", "answer_not_in_passage"),  # whole words only ("engineers")
        ("Who designed what opened in 1889 for the World's Fair in Paris?", "Gustave Eiffel", None),  # 7 in a row
        ("Who designed what was completed in 1889 for the World's Fair in Paris?", "Gustave Eiffel", "quotes_passage"),
        ("Who designed the tower?", " GUSTAVE   eiffel.", None),  # matched as SQuAD-normalised words
        ("Who designed the tower?", "Gustave Eiffels", "answer_not_in_passage"),
        ("When was the Eiffel Tower completed in 1889?", "1889", "answer_in_question"),
        ("What is the answer to the question: what is the answer to it?", "1889", "question_repeats_itself"),
    ],
)
def test_filter_reason(question, answer, reason):
    seen = set()
    assert gq.filter_reason(question, answer, PASSAGE, seen) == reason
    assert seen == ({normalize_answer(question)} if reason is None else set())  # only a kept question is seen


def test_quote_filter_counts_normalised_consecutive_words():
    assert gq.QUOTE_RUN_WORDS == 8
    seven = "was completed in 1889 for the World's Fair"  # 7 words once normalised ("the" dropped, "worlds")
    assert not gq.quotes_passage(f"Why {seven}?", PASSAGE)
    assert gq.quotes_passage(f"Why {seven} in?", PASSAGE)  # 8
    assert gq.quotes_passage("WHY, the EIFFEL Tower... WAS COMPLETED in 1889 for the WORLD'S?", PASSAGE)


def test_answer_candidates_are_short_runs_of_the_passage_between_function_words():
    candidates = gq.answer_candidates(PASSAGE)
    assert candidates == [
        "Eiffel Tower",
        "completed",
        "1889",
        "World's Fair",
        "Paris",
        "designed",
        "engineering company",
        "Gustave Eiffel",
        "whose engineers drew",
        "plans",
    ]
    assert all(has_answer(PASSAGE, [c]) for c in candidates)
    long_run = "Alpha Beta Gamma Delta Epsilon Zeta met in 1900."  # six words without a break: not an answer
    assert gq.answer_candidates(long_run) == ["1900"]
    assert gq.answer_candidates("Alpha Beta Gamma Delta Epsilon Zeta.", max_words=6) == [
        "Alpha Beta Gamma Delta Epsilon Zeta"
    ]
    assert gq.answer_candidates("It was as it is.") == []
    cited = "It is like dengue fever [12]. It spread in India [12, 16] (Shi et al., 2015; Ng et al., 2015) in 2007."
    assert gq.answer_candidates(cited) == ["like dengue fever", "spread", "India", "2007"]  # no citation numbers


def test_answers_decoded_among_the_candidates_only(tiny_models, one_thread):
    # a random model left free writes random tokens; constrained, greedy or sampled, it writes one candidate or, with
    # none, nothing
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_models["causal_generator"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["causal_generator"])
    texts = [PASSAGE, "Paris is the capital of France, on the Seine.", "It was as it is."]
    prompts = [gq.pick_prompt(tokenizer, "T", text) for text in texts]
    candidates = [gq.candidate_token_ids(tokenizer, gq.answer_candidates(text)) for text in texts]
    assert [len(c) for c in candidates] == [10, 4, 0]
    spelt = [{tokenizer.decode(ids).strip() for ids in c} for c in candidates]  # this tokenizer lowercases
    free = gq.generate_texts(model, tokenizer, prompts, False, 0, 8)
    assert any(answer.strip() not in phrases for answer, phrases in zip(free, spelt))
    for sample, seed in ((False, 0), (True, 1), (True, 2)):
        answers = gq.generate_texts(model, tokenizer, prompts, sample, seed, 40, candidates=candidates)
        assert answers[2] == ""
        assert all(a.strip() in phrases for a, phrases in zip(answers[:2], spelt))


def newline_model():
    """A random tiny Llama over a handful of byte-level tokens, newline among them: unlike the WordPiece tiny
    generator, it writes line breaks, leading ones too."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tokens = ["<pad>", "</s>", *"abcdefghij?", "\u0120", "\u010a", "\u010a\u010a"]  # byte-level: Ġ space, Ċ \n
    vocab = {token: i for i, token in enumerate(tokens)}
    backend = Tokenizer(models.BPE(vocab, merges=[("\u010a", "\u010a")]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", pad_token="<pad>")
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=1,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval(), tokenizer


def test_questions_stop_after_their_first_line_and_keep_it(one_thread):
    # generation stopped row by row after the first complete line (what question prompts keep) keeps that line as the
    # full generation writes it, greedy and sampled: the same tokens up to the stop, whatever the other rows do
    model, tokenizer = newline_model()
    prompts = ["a b", "b\nc?", "ab ba?", "d", "\n\nj", "? e\n", "fgh", "b i b"]  # lengths differ: left padding
    stopped = leading = 0
    for sample, seed in ((False, 0), (True, 1), (True, 2), (True, 3), (True, 4)):
        full = gq.generate_texts(model, tokenizer, prompts, sample, seed, 24)
        short = gq.generate_texts(model, tokenizer, prompts, sample, seed, 24, first_line=True)
        assert [gq._first_line(t) for t in short] == [gq._first_line(t) for t in full]
        assert all(f.startswith(s) for s, f in zip(short, full))
        for s, f in zip(short, full):
            stopped += len(s) < len(f)
            leading += s.startswith("\n") and "\n" in s.lstrip()  # a blank line first, then a whole line
    assert stopped >= 10 and leading >= 2  # rows did stop early, some after a blank first line


def test_duplicate_questions_are_normalised_and_non_extractive_answers_allowed():
    seen = set()
    assert gq.filter_reason("When was the Eiffel Tower completed?", "1889", PASSAGE, seen) is None
    assert gq.filter_reason("when was Eiffel Tower completed", "1889", PASSAGE, seen) == "duplicate_question"
    assert gq.filter_reason("Who designed the tower?", "a French engineer", PASSAGE, seen) == "answer_not_in_passage"
    assert gq.filter_reason("Who designed the tower?", "a French engineer", PASSAGE, seen, extractive=False) is None


def test_filter_generations_counts_every_reason_in_passage_order():
    kb = gq.KnowledgeBase(["Tower", "Tower"], [PASSAGE, "Paris is the capital of France."], [], "test")
    generations = {
        (1, 0): "Question: What is the capital of France?\nAnswer: Paris",
        (0, 1): "Question: When was the Eiffel Tower completed?\nAnswer: 1889",  # the duplicate below is dropped
        (0, 0): "Question: When was the Eiffel Tower completed ?\nAnswer: in 1889",
        (0, 2): "nothing useful",
        (1, 1): "Question: What is the capital of Spain?\nAnswer: Madrid",
    }
    pairs, rejected = gq.filter_generations(generations, kb)
    assert [(p.passage_id, p.sample, p.answer) for p in pairs] == [(0, 0, "in 1889"), (1, 0, "Paris")]
    assert pairs[0].id == "p0-s0" and pairs[0].title == "Tower"
    assert rejected == {"duplicate_question": 1, "unparseable": 1, "answer_not_in_passage": 1}


# ---------------------------------------------------------------- selection, batches, splits


def make_pairs(n_docs: int = 12, per_doc: int = 3) -> list[gq.Pair]:
    return [
        gq.Pair(d * 10 + i, 0, f"question {d} {i}?", "a", f"doc {d}") for d in range(n_docs) for i in range(per_doc)
    ]


def test_split_by_document_is_disjoint_complete_and_seeded():
    pairs = make_pairs()
    splits = gq.split_by_document(pairs, 0.2, 0.2, seed=3)
    titles = {s: {p.title for p in splits[s]} for s in gq.SPLITS}
    assert not (titles["train"] & titles["val"] or titles["train"] & titles["test"] or titles["val"] & titles["test"])
    assert sorted(p.id for s in gq.SPLITS for p in splits[s]) == sorted(p.id for p in pairs)  # each exactly once
    assert [len(titles[s]) for s in gq.SPLITS] == [8, 2, 2]
    assert gq.split_by_document(pairs, 0.2, 0.2, seed=3) == splits
    other = gq.split_by_document(pairs, 0.2, 0.2, seed=4)
    assert {p.title for p in other["val"]} != titles["val"] or {p.title for p in other["test"]} != titles["test"]
    assert gq.split_by_document([], 0.1, 0.1, seed=0) == {"train": [], "val": [], "test": []}


def test_select_passages_and_plan_batches():
    assert gq.select_passages(5, None, 0) == [0, 1, 2, 3, 4]
    rows = gq.select_passages(100, 7, seed=1)
    assert rows == sorted(set(rows)) and len(rows) == 7 and rows == gq.select_passages(100, 7, seed=1)
    assert rows != gq.select_passages(100, 7, seed=2)
    batches = gq.plan_batches([1, 2, 3], 2, set(), 2)
    assert batches == [[(1, 0), (2, 0)], [(3, 0)], [(1, 1), (2, 1)], [(3, 1)]]  # greedy and sampled never mixed
    assert gq.plan_batches([1, 2, 3], 2, {(1, 0), (2, 0), (1, 1)}, 2) == [[(3, 0)], [(2, 1), (3, 1)]]
    assert gq.batch_seed(42, 1, 1) == gq.batch_seed(42, 1, 1) != gq.batch_seed(42, 2, 1)


# ---------------------------------------------------------------- generations file


def test_read_generations_tolerates_an_unfinished_last_line(tmp_path):
    path = tmp_path / gq.GENERATIONS_FILE
    assert gq.read_generations(path) == {} and not gq.drop_unfinished_line(path)
    lines = [{"passage_id": 3, "sample": 0, "text": "a"}, {"passage_id": 3, "sample": 1, "text": "b"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"passage_id": 4, "sam')
    assert gq.read_generations(path) == {(3, 0): "a", (3, 1): "b"}
    assert gq.drop_unfinished_line(path) and path.read_text().endswith('"b"}\n')
    assert not gq.drop_unfinished_line(path)
    path.write_text(
        '{"passage_id": 3, "sample": 0, "text": "a"}\nnot json\n{"passage_id": 1, "sample": 0, "text": ""}\n'
    )
    with pytest.raises(ValueError, match=r"generations.jsonl:2: not a generation record"):
        gq.read_generations(path)


# ---------------------------------------------------------------- round trip


def test_roundtrip_hits_ranks_the_source_passage_among_all():
    passages = np.eye(4, dtype=np.float32)
    questions = np.array([[0.9, 0.1, 0, 0], [0.6, 0.5, 0, 0], [0, 0, 0.2, 0.3]], dtype=np.float32)
    assert gq.roundtrip_hits(questions, passages, [0, 1, 3], k=1) == [True, False, True]
    assert gq.roundtrip_hits(questions, passages, [0, 1, 2], k=2) == [True, True, True]
    assert gq.roundtrip_hits(questions, passages, [1, 1, 0], k=10) == [True, True, True]  # k above the KB's size


# ---------------------------------------------------------------- end to end


def fake_reply(title: str, passage: str, sample: bool, seed: int) -> str:
    """A well-formed reply built from the passage, or (for some passages) one that a filter drops."""
    words, kind = passage.split(), zlib.crc32(passage.encode()) % 6
    if kind == 0 or len(words) < 25:
        return "I cannot think of a question."
    answer = "zebra crossing" if kind == 1 else " ".join(words[20:22])
    variant = f" (variant {seed % 1000})" if sample else ""
    return f"Question: Which words follow '{words[5]} {words[6]} {words[7]}' in the text{variant}?\nAnswer: {answer}\n"


def make_fake_generate(calls: list):
    """generate_texts replaced: the question, or for an answer prompt the answer, of fake_reply; the batch size of
    each question call is recorded."""

    def fake(model, tokenizer, prompts, sample, seed, *args, **kwargs):
        answering = prompts[0].endswith(gq.ANSWER_CUE)  # an answer prompt, or answer first the pick prompt
        if not answering:
            calls.append(len(prompts))
        replies = [fake_reply(*PROMPT_RE.search(p).groups(), sample, seed) for p in prompts]
        if answering:
            return [reply.split("Answer:", 1)[1] if "Answer:" in reply else "" for reply in replies]
        return [reply[len(gq.CUE) :].split("\nAnswer:")[0] for reply in replies]

    return fake


@pytest.fixture
def run_qa(tiny_models, tmp_path, one_thread):
    """Run generate_qa.main on the dummy KB with the tiny causal model; extra flags are appended."""

    def run(out: Path, *extra: str, kb: tuple[str, str] = ("--csv_path", str(DUMMY_CSV))) -> dict | None:
        argv = [
            *kb,
            "--generator_name_or_path",
            str(tiny_models["causal_generator"]),
            "--output_dir",
            str(out),
            "--device",
            "cpu",
            "--max_new_tokens",
            "6",
            "--batch_size",
            "8",
            *extra,
        ]
        return gq.main(gq.parse_args(argv))

    return run


@pytest.mark.filterwarnings("ignore:.*source empty")
def test_tiny_random_model_runs_and_its_answers_are_passage_phrases(run_qa, tmp_path, capsys):
    # real generation, greedy and sampled, of random tokens: the script writes the labels; answer first, every answer
    # is a phrase of its passage even from a random model, and question first the filters drop every pair
    out = tmp_path / "qa"
    stats = run_qa(out, "--max_passages", "5", "--per_passage", "2", "--batch_size", "3")
    assert "passages/s" in capsys.readouterr().out
    records = [json.loads(line) for line in (out / gq.GENERATIONS_FILE).read_text().splitlines()]
    assert len(records) == 10 and len({(r["passage_id"], r["sample"]) for r in records}) == 10
    assert all(r["text"].startswith(gq.CUE) and f"\n{gq.ANSWER_CUE} " in r["text"] for r in records)
    passages = split_documents(read_kb_csv(DUMMY_CSV))["text"]
    for r in records:
        answer = r["text"].split(f"\n{gq.ANSWER_CUE} ", 1)[1]
        assert answer in gq.answer_candidates(passages[r["passage_id"]]), r
    assert stats["generations"] == 10 and stats["selected_passages"] == 5 and stats["passages"] == 40
    assert stats["rejected"]["answer_not_in_passage"] == 0
    assert sum(stats["rejected"].values()) + stats["kept"] == stats["generations"]
    assert all((out / name).exists() for name in gq.OUTPUT_FILES)
    settings = json.loads((out / gq.SETTINGS_FILE).read_text())
    assert settings["prompt"] == "plain" and settings["passages"] == 40 and settings["order"] == "answer_first"

    out = tmp_path / "question-first"
    with pytest.warns(UserWarning, match="train.source, val.source, test.source empty"):
        stats = run_qa(out, "--max_passages", "5", "--per_passage", "2", "--batch_size", "3", "--question_first")
    assert stats["generations"] == 10 and stats["kept"] == 0 and (out / "train.source").read_text() == ""
    assert json.loads((out / gq.SETTINGS_FILE).read_text())["order"] == "question_first"


def test_end_to_end_output_is_what_the_trainer_and_kb_builder_read(
    run_qa, tmp_path, monkeypatch, tiny_models, finetune_argv
):
    from rag_end2end.kb import build as use_own_knowledge_dataset
    from rag_end2end.training import arguments
    from rag_end2end.training import finetune as finetune_rag

    calls = []
    monkeypatch.setattr(gq, "generate_texts", make_fake_generate(calls))
    out = tmp_path / "qa"
    stats = run_qa(out, "--per_passage", "2", "--val_fraction", "0.2", "--test_fraction", "0.2")
    assert stats["generations"] == 80 and calls == [8] * 10
    assert sum(stats["rejected"].values()) + stats["kept"] == 80
    assert stats["rejected"]["unparseable"] > 0 and stats["rejected"]["answer_not_in_passage"] > 0
    assert stats["kept"] > 20 and stats["questions"] == {s: len(read_lines(out / f"{s}.source")) for s in gq.SPLITS}

    passages = split_documents(read_kb_csv(out / "kb.csv"))
    original = split_documents(read_kb_csv(DUMMY_CSV))
    assert passages["title"] == original["title"] and passages["text"] == original["text"]
    titles = {}
    for split in gq.SPLITS:
        sources, targets = read_lines(out / f"{split}.source"), read_lines(out / f"{split}.target")
        gold = [json.loads(line) for line in (out / f"{split}.gold.jsonl").read_text().splitlines()]
        assert [g["question"] for g in gold] == sources and [g["answers"] for g in gold] == [[t] for t in targets]
        for g in gold:
            assert set(g) == {"id", "question", "answers", "title", "gold_passage_ids"}
            (row,) = g["gold_passage_ids"]
            assert passages[row]["title"] == g["title"] and has_answer(passages[row]["text"], g["answers"])
            assert g["id"].startswith(f"p{row}-s")
        titles[split] = {g["title"] for g in gold}
        assert titles[split], f"{split} is empty"
    assert not (titles["train"] & titles["val"] or titles["train"] & titles["test"] or titles["val"] & titles["test"])

    # use_own_knowledge_dataset.py rebuilds the very passage rows that gold_passage_ids name
    kb_args = use_own_knowledge_dataset.parse_args(
        [
            "--csv_path",
            str(out / "kb.csv"),
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
    from datasets import load_from_disk

    built = load_from_disk(str(use_own_knowledge_dataset.main(kb_args)[0]))
    assert built["title"] == passages["title"] and built["text"] == passages["text"]

    # DALM's CSV of every kept pair, which DALM's users (and prepare_dalm_csv.py) read back
    with (out / gq.DALM_FILE).open(newline="", encoding="utf-8") as f:
        dalm = list(csv.DictReader(f))
    assert len(dalm) == stats["kept"] and set(dalm[0]) == {"Passage", "Query", "Answer"}
    assert {r["Query"] for r in dalm} == {q for s in gq.SPLITS for q in read_lines(out / f"{s}.source")}
    assert all(r["Passage"] in original["text"] and r["Answer"] in r["Passage"] for r in dalm)
    read_back = ["--input", str(out / gq.DALM_FILE), "--output_dir", str(tmp_path / "dalm")]
    again = qa_table.main(qa_table.parse_args(read_back))
    assert sum(again["questions"].values()) == stats["kept"]

    args = finetune_rag.parse_args(finetune_argv("--data_dir", str(out), "--do_train", "--do_predict"))
    arguments.check_data_dir(args)
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["question_encoder"])
    dataset = QuestionDataset(tokenizer, str(out), 64, "train")
    assert len(dataset) == stats["questions"]["train"] and dataset[0]["input_ids"]


def test_resume_after_interruption_matches_an_uninterrupted_run(run_qa, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(gq, "generate_texts", make_fake_generate(calls))
    flags = ("--max_passages", "20", "--per_passage", "2", "--batch_size", "6", "--seed", "7")
    whole = tmp_path / "whole"
    run_qa(whole, *flags)
    assert calls == [6, 6, 6, 2] * 2

    part = tmp_path / "part"
    calls.clear()
    assert run_qa(part, *flags, "--max_batches", "1") is None  # stopped: no split files yet
    assert calls == [6] and len((part / gq.GENERATIONS_FILE).read_text().splitlines()) == 6
    assert not any((part / name).exists() for name in gq.OUTPUT_FILES)
    assert run_qa(part, *flags, "--max_batches", "2") is None  # two more batches
    # a crash while writing: half a record at the end of the file
    with (part / gq.GENERATIONS_FILE).open("a") as f:
        f.write('{"passage_id": 39, "sample": 0, "te')
    calls.clear()
    run_qa(part, *flags)
    assert calls == [2, 6, 6, 6, 2]  # only what was left: 40 generations in all, none twice

    records = [json.loads(line) for line in (part / gq.GENERATIONS_FILE).read_text().splitlines()]
    assert len(records) == 40 and len({(r["passage_id"], r["sample"]) for r in records}) == 40
    assert (part / gq.GENERATIONS_FILE).read_text() == (whole / gq.GENERATIONS_FILE).read_text()
    for name in gq.OUTPUT_FILES:
        assert (part / name).read_text() == (whole / name).read_text(), name


def test_ctrl_c_loses_at_most_the_batch_in_flight(run_qa, tmp_path, monkeypatch, capsys):
    calls, fake = [], make_fake_generate([])

    def interrupted_on_the_third_batch(model, tokenizer, prompts, *args, **kwargs):
        calls.append(prompts[0].endswith(gq.CUE))
        if sum(calls) == 3:
            raise KeyboardInterrupt
        return fake(model, tokenizer, prompts, *args, **kwargs)

    monkeypatch.setattr(gq, "generate_texts", interrupted_on_the_third_batch)
    out = tmp_path / "qa"
    with pytest.raises(KeyboardInterrupt):
        run_qa(out, "--max_passages", "20", "--batch_size", "6")
    assert "rerun the command to resume" in capsys.readouterr().out
    assert [json.loads(line)["passage_id"] for line in (out / gq.GENERATIONS_FILE).read_text().splitlines()] == (
        gq.select_passages(40, 20, 42)[:12]
    )
    monkeypatch.setattr(gq, "generate_texts", fake)
    resumed = run_qa(out, "--max_passages", "20", "--batch_size", "6")
    assert resumed["generations"] == 20 and len(read_lines(out / gq.GENERATIONS_FILE)) == 20


def test_finished_output_is_kept_unless_filters_change_or_overwrite_reusing_the_generations(
    run_qa, tmp_path, monkeypatch
):
    calls = []
    monkeypatch.setattr(gq, "generate_texts", make_fake_generate(calls))
    out = tmp_path / "qa"
    first = run_qa(out, "--max_passages", "12")
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        run_qa(out, "--max_passages", "12")
    calls.clear()
    again = run_qa(out, "--max_passages", "12", "--no_extractive")  # other filters: no --overwrite needed
    assert calls == []  # nothing generated again: only filtered and written anew
    assert again["kept"] == first["kept"] + first["rejected"]["answer_not_in_passage"]
    with pytest.raises(FileExistsError, match="pass --overwrite"):  # the same filters again: nothing would change
        run_qa(out, "--max_passages", "12", "--no_extractive")
    with pytest.raises(ValueError, match=r"other settings \(max_new_tokens: 6 -> 7"):
        run_qa(out, "--max_passages", "12", "--overwrite", "--max_new_tokens", "7")
    (out / gq.GENERATIONS_FILE).unlink()  # its generations gone: new filters would generate everything anew
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        run_qa(out, "--max_passages", "12")  # the extractive filter back on


@pytest.mark.filterwarnings("ignore:.*source empty")  # random encoders: top-1 round trips keep few documents
def test_roundtrip_filter_with_the_tiny_encoders(run_qa, tmp_path, monkeypatch, tiny_models, tiny_kb):
    monkeypatch.setattr(gq, "generate_texts", make_fake_generate([]))
    q_enc, ctx_enc = str(tiny_models["question_encoder"]), str(tiny_models["context_encoder"])
    base = run_qa(tmp_path / "off")
    everything = run_qa(
        tmp_path / "all",
        "--roundtrip_k",
        "40",
        "--question_encoder_name_or_path",
        q_enc,
        "--context_encoder_name_or_path",
        ctx_enc,
    )
    assert everything["rejected"]["roundtrip_miss"] == 0 and everything["kept"] == base["kept"]
    top1 = run_qa(
        tmp_path / "top1",
        "--roundtrip_k",
        "1",
        "--question_encoder_name_or_path",
        q_enc,
        "--context_encoder_name_or_path",
        ctx_enc,
    )
    assert 0 < top1["rejected"]["roundtrip_miss"] and top1["kept"] + top1["rejected"]["roundtrip_miss"] == base["kept"]

    # a built KB: its passages and its own embeddings (made by the same tiny context encoder)
    passages_path, _ = tiny_kb
    kb = ("--passages_path", str(passages_path))
    from_kb = run_qa(tmp_path / "kb", kb=kb)
    assert from_kb["kept"] == base["kept"]  # the same passages, in the same rows
    kb_csv = split_documents(read_kb_csv(tmp_path / "kb" / "kb.csv"))
    assert kb_csv["text"] == split_documents(read_kb_csv(DUMMY_CSV))["text"]
    stored = run_qa(tmp_path / "kb-rt", "--roundtrip_k", "1", "--question_encoder_name_or_path", q_enc, kb=kb)
    assert stored["rejected"]["roundtrip_miss"] == top1["rejected"]["roundtrip_miss"]


def test_prompts_plain_and_chat(tiny_models):
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["causal_generator"])
    plain = gq.build_prompt(tokenizer, "Tower", PASSAGE)
    assert gq.prompt_kind(tokenizer) == "plain" and plain.startswith("Title: Tower\nPassage: The Eiffel")
    assert plain.endswith("\n\nWrite one question that this passage answers.\n\nQuestion:")
    answer = gq.build_prompt(tokenizer, "Tower", PASSAGE, "Who designed it?")
    assert answer.endswith(
        "\n\nQuestion: Who designed it?\n\nAnswer in at most five words, copied exactly from the passage.\n\nAnswer:"
    )
    assert PROMPT_RE.search(plain).groups() == PROMPT_RE.search(answer).groups() == ("Tower", PASSAGE)
    pick = gq.pick_prompt(tokenizer, "Tower", PASSAGE)
    assert pick.startswith("Title: Tower\nPassage: The Eiffel") and pick.endswith("as its answer.\n\nAnswer:")
    asked = gq.question_for_answer_prompt(tokenizer, "Tower", PASSAGE, "1889")
    assert asked.endswith('whose answer is "1889". Do not put the answer in the question.\n\nQuestion:')
    assert PROMPT_RE.search(pick).groups() == PROMPT_RE.search(asked).groups() == ("Tower", PASSAGE)
    tokenizer.chat_template = "{% for m in messages %}<user>{{ m['content'] }}{% endfor %}<assistant>"
    chat = gq.build_prompt(tokenizer, "Tower", PASSAGE)
    assert gq.prompt_kind(tokenizer) == "chat"
    assert chat == f"<user>{gq.QUESTION_INSTRUCTION.format(title='Tower', text=PASSAGE)}<assistant>Question:"


def test_parse_args_rejects_bad_flags():
    base = ["--csv_path", "kb.csv", "--generator_name_or_path", "m", "--output_dir", "o"]
    assert gq.parse_args(base).extractive and gq.parse_args([*base, "--no_extractive"]).extractive is False
    for bad in (
        ["--roundtrip_k", "5"],
        ["--per_passage", "0"],
        ["--val_fraction", "0.6", "--test_fraction", "0.4"],
        ["--passages_path", "kb"],
        ["--top_p", "0"],
        ["--threads", "0"],
    ):
        with pytest.raises(SystemExit):
            gq.parse_args([*base, *bad])
