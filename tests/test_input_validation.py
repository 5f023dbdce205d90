"""Bad input is refused before any work, naming the file, the line and the field: encodings, stray quotes, long
lines, duplicate documents, prepare_*.py outputs that would replace an earlier run's; plus property-based tests of
the KB CSV reader and the line readers."""

import csv
import json
import warnings
from pathlib import Path

import faiss
import numpy as np
import pytest
from datasets import load_from_disk
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rag_end2end.data import cmu_qa as prepare_cmu_qa
from rag_end2end.data import squad as prepare_squad
from rag_end2end.data.readers import MAX_LINE_CHARS, InputError, check_model_path, read_gold, read_kb_csv, read_lines
from rag_end2end.model import assembly as rag_assembly
from rag_end2end.training import arguments
from rag_end2end.training import finetune as finetune_rag

REPO = Path(__file__).resolve().parents[1]
DUMMY_CSV = REPO / "test_run" / "dummy-kb" / "my_knowledge_dataset.csv"
FEW = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def write_bytes(tmp_path: Path, data: bytes, name: str = "kb.tsv") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def error_of(read, path: Path) -> str:
    """The message of the InputError that reading `path` raises."""
    with pytest.raises(InputError) as excinfo:
        read(path)
    return str(excinfo.value)


# ----------------------------------------------------------------------------- encodings

ENCODED = {  # how a file is encoded -> (its bytes, line and byte offset of the first bad byte, what the error says)
    "cp1252": ("t1\tone\nt2\tcafé au lait\n".encode("cp1252"), 2, 13, "iconv -f CP1252 -t UTF-8"),
    "utf-16-bom": ("t1\tone\n".encode("utf-16"), 1, 0, "UTF-16LE byte-order mark"),
    "utf-16be-bom": (b"\xfe\xff" + "t1\tone\n".encode("utf-16-be"), 1, 0, "UTF-16BE byte-order mark"),
    "utf-16le-no-bom": ("t1\tone\n".encode("utf-16-le"), 1, 1, "as in UTF-16LE text without a byte-order mark"),
    "unknown": (b"t1\tone\nt2\t\x81\x8d\n", 2, 10, "re-save the file as UTF-8"),
}


@pytest.mark.parametrize("case", ENCODED, ids=list(ENCODED))
def test_kb_csv_not_utf8_names_file_line_offset_and_encoding(tmp_path, case):
    data, line, offset, says = ENCODED[case]
    path = write_bytes(tmp_path, data)
    message = error_of(read_kb_csv, path)
    assert message.startswith(f"{path}:{line}: ")
    assert f"at byte offset {offset} " in message
    assert says in message


@pytest.mark.parametrize("case", ["cp1252", "utf-16-bom", "utf-16le-no-bom"])
def test_source_and_gold_files_not_utf8_name_file_line_and_encoding(tmp_path, case):
    data, line, offset, says = ENCODED[case]
    source = write_bytes(tmp_path, data, "train.source")
    message = error_of(read_lines, source)
    assert message.startswith(f"{source}:{line}: ") and f"at byte offset {offset} " in message and says in message
    gold = write_bytes(tmp_path, b'{"answers": ["x"]}\n' + "\xe9t\xe9\n".encode("latin-1"), "test.gold.jsonl")
    message = error_of(lambda p: read_gold(str(p), "jsonl"), gold)
    assert message.startswith(f"{gold}:2: not UTF-8: 0xe9 at byte offset 19 (byte 1 of line 2)")
    assert "Windows-1252" in message


def test_utf8_byte_order_mark_is_not_part_of_the_first_line(tmp_path):
    assert read_kb_csv(write_bytes(tmp_path, b"\xef\xbb\xbft1\tone\n")) == [("t1", "one")]
    assert read_lines(write_bytes(tmp_path, b"\xef\xbb\xbfwho?\n", "q.source")) == ["who?"]


# ----------------------------------------------------------------------------- stray quotes


def test_stray_quote_that_merges_documents_is_refused_with_its_line_and_field(tmp_path):
    # the quote opening line 2 closes on line 5: csv would read lines 2-5 as one field
    path = write_bytes(tmp_path, b't1\tone\n"t2\ttwo\nt3\tthree\nt4\tfour\nt5\t"five\nt6\tsix\n')
    message = error_of(read_kb_csv, path)
    assert message.startswith(f'{path}:2: field `title` (column 1) starts with a quote (") that is not closed on that')
    assert "lines 2-5 were read as one field" in message
    assert 'write `"t2` as `"""t2"`' in message


def test_stray_quote_closed_at_a_tab_on_a_later_line_is_refused(tmp_path):
    # csv parses this without complaint: ['t2\ttwo\nt3', 'three'], two documents merged into one
    path = write_bytes(tmp_path, b't1\tone\n"t2\ttwo\nt3"\tthree\nt4\tfour\n')
    message = error_of(read_kb_csv, path)
    assert message.startswith(f"{path}:2: field `title` (column 1) starts with a quote")
    assert "lines 2-3 were read as one field" in message


def test_quote_that_closes_before_the_field_ends_is_refused_with_the_fix(tmp_path):
    path = write_bytes(tmp_path, b't1\tone\nt2\t"five" is a number\nt3\tthree\n')
    message = error_of(read_kb_csv, path)
    assert message.startswith(f'{path}:2: field `text` (column 2) starts with a quote (") that closes before')
    assert 'write `"five" is a number` as `"""five"" is a number"`' in message


def test_quote_never_closed_is_refused_with_its_line(tmp_path):
    path = write_bytes(tmp_path, b't1\tone\nt2\ttwo\nt3\t"three\n')
    message = error_of(read_kb_csv, path)
    assert message.startswith(f'{path}:3: field `text` (column 2) starts with a quote (") that is never closed')


def test_well_formed_quoting_still_reads(tmp_path):
    data = b't1\t"say ""hi"" twice"\nt2\the is 5" tall\n"multi\nline title"\ttext\nt4\t"a\ttab"\n'
    assert read_kb_csv(write_bytes(tmp_path, data)) == [
        ("t1", 'say "hi" twice'),
        ("t2", 'he is 5" tall'),
        ("multi\nline title", "text"),
        ("t4", "a\ttab"),
    ]


def test_wrong_field_count_names_the_line_the_row_starts_on(tmp_path):
    path = write_bytes(tmp_path, b't1\tone\n"t2\nspans"\ttwo\textra\n')
    assert error_of(read_kb_csv, path).startswith(f"{path}:2: expected 2 tab-separated fields (title, text), found 3")


def test_nul_bytes_in_a_kb_field_are_refused(tmp_path):
    path = write_bytes(tmp_path, b"t1\tone\nt2\ttw\x00o\n")
    message = error_of(read_kb_csv, path)
    assert message.startswith(f"{path}:2: a NUL byte, which UTF-8 text never holds: 0x00 at byte offset 12")
    assert message.endswith("remove it (is this a binary file?)")


# ----------------------------------------------------------------------------- long lines


def test_kb_field_over_the_limit_is_refused_and_one_at_the_limit_is_read(tmp_path):
    ok = write_bytes(tmp_path, b"t1\tone\nt2\t" + b"x" * MAX_LINE_CHARS + b"\n", "ok.tsv")
    assert len(read_kb_csv(ok)[1][1]) == MAX_LINE_CHARS  # over csv's own default limit (131,072)
    path = write_bytes(tmp_path, b"t1\tone\nt2\t" + b"x" * (MAX_LINE_CHARS + 1) + b"\n")
    message = error_of(read_kb_csv, path)
    assert message.startswith(f"{path}:2: field `text` (column 2) is over the limit of {MAX_LINE_CHARS:,} characters")


def test_long_field_from_an_unclosed_quote_points_at_the_quote(tmp_path):
    path = write_bytes(tmp_path, b't1\tone\n"t2\ttwo\n' + (b"t\t" + b"x" * 1000 + b"\n") * (MAX_LINE_CHARS // 1000))
    message = error_of(read_kb_csv, path)
    assert message.startswith(f"{path}:2: field `title` (column 1) is over the limit")
    assert 'it starts with a quote (") not closed on that line' in message


def test_question_line_over_the_limit_is_refused(tmp_path):
    read_lines(write_bytes(tmp_path, b"q\n" + b"x" * MAX_LINE_CHARS + b"\n", "ok.source"))
    path = write_bytes(tmp_path, b"q\n" + b"x" * (MAX_LINE_CHARS + 1) + b"\n", "train.source")
    message = error_of(read_lines, path)
    assert message.startswith(f"{path}:2: line is {MAX_LINE_CHARS + 1:,} characters long, over the limit")


# ----------------------------------------------------------------------------- duplicates and gold fields


def test_duplicate_documents_warn_with_count_and_lines_and_are_kept(tmp_path):
    path = write_bytes(tmp_path, b"t1\tone\nt2\ttwo\nt1\tone\nt2\t two \nt3\tthree\n")
    with pytest.warns(UserWarning, match=r"kb\.tsv: 2 duplicate document\(s\) .*line 3 repeats line 1"):
        docs = read_kb_csv(path)
    assert docs == [("t1", "one"), ("t2", "two"), ("t1", "one"), ("t2", "two"), ("t3", "three")]


def test_gold_jsonl_field_errors_name_file_line_and_field(tmp_path):
    path = write_bytes(tmp_path, b'{"answers": ["a"]}\n{"answers": ["b"], "gold_passage_ids": ["x"]}\n', "g.jsonl")
    message = error_of(lambda p: read_gold(str(p), "jsonl"), path)
    assert message.startswith(f"{path}:2: field `gold_passage_ids` must list passage ids")
    path.write_text('{"answers": ["a"]}\n[1]\n', encoding="utf-8")
    assert error_of(lambda p: read_gold(str(p), "jsonl"), path).startswith(f"{path}:2: expected a JSON object")


# ----------------------------------------------------------------------------- prepare_*.py outputs


@pytest.fixture
def squad_file(tmp_path) -> Path:
    context = " ".join(f"word{i}" for i in range(30))
    answer = {"text": "word3", "answer_start": 18}
    qas = [{"id": "q", "question": "Which word?", "answers": [answer]}]
    articles = [{"title": f"A{n}", "paragraphs": [{"context": context, "qas": qas}]} for n in range(5)]
    path = tmp_path / "squad.json"
    path.write_text(json.dumps({"data": articles}), encoding="utf-8")
    return path


def run_squad(squad: Path, out: Path, *extra: str) -> dict:
    return prepare_squad.main(prepare_squad.parse_args(["--input", str(squad), "--output_dir", str(out), *extra]))


@pytest.mark.parametrize("existing", ["train.source", "test.gold.jsonl", "stats.json"])
def test_prepare_squad_refuses_to_replace_any_output_without_overwrite(tmp_path, squad_file, existing):
    out = tmp_path / "out"
    out.mkdir()
    (out / existing).write_text("the user's own file\n", encoding="utf-8")  # and no kb.csv
    with pytest.raises(FileExistsError, match=rf"{out / existing} already exists; pass --overwrite"):
        run_squad(squad_file, out)
    assert sorted(p.name for p in out.iterdir()) == [existing]
    assert (out / existing).read_text(encoding="utf-8") == "the user's own file\n"
    run_squad(squad_file, out, "--overwrite")
    assert sorted(p.name for p in out.iterdir()) == sorted(prepare_squad.OUTPUT_FILES)  # no temporary files left


def test_prepare_scripts_refuse_before_reading_their_input(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "val.target").write_text("a\n", encoding="utf-8")
    with pytest.raises(FileExistsError, match=r"val\.target already exists"):
        run_squad(tmp_path / "missing.json", out)
    args = prepare_cmu_qa.parse_args(["--input_dir", str(tmp_path / "missing"), "--output_dir", str(out)])
    with pytest.raises(FileExistsError, match=r"val\.target already exists"):
        prepare_cmu_qa.main(args)


def test_prepare_squad_failing_midway_leaves_no_partial_outputs(tmp_path, squad_file, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(prepare_squad, "split_titles", fail)  # after kb.csv is written, before the splits
    with pytest.raises(RuntimeError, match="disk full"):
        run_squad(squad_file, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


# ----------------------------------------------------------------------------- properties

FIELD_CHARS = st.characters(exclude_categories=["Cs"], exclude_characters="\n\r\x00\ufeff")
LINE_CHARS = st.characters(exclude_categories=["Cs"], exclude_characters="\n\x00\ufeff")
DOCUMENTS = st.lists(
    st.tuples(st.text(FIELD_CHARS, max_size=20), st.text(FIELD_CHARS, max_size=40).filter(str.strip)),
    min_size=1,
    max_size=8,
)
PIECES = [b"\t", b"\n", b"\r", b'"', b"a", b" ", b"\xe9", b"\xc3\xa9", b"\x00", b"\xff\xfe"]
BYTE_SOUP = st.one_of(st.binary(max_size=200), st.lists(st.sampled_from(PIECES), max_size=40).map(b"".join))


@FEW
@given(docs=DOCUMENTS)
def test_property_csv_writer_output_round_trips_through_read_kb_csv(tmp_path_factory, docs):
    path = tmp_path_factory.mktemp("kb") / "kb.tsv"
    with path.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f, delimiter="\t", lineterminator="\n").writerows(docs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate documents
        assert read_kb_csv(path) == [(title.strip(), text.strip()) for title, text in docs]


@FEW
@given(lines=st.lists(st.text(LINE_CHARS, max_size=30).filter(str.strip), max_size=8))
def test_property_utf8_lines_round_trip_through_read_lines(tmp_path_factory, lines):
    path = tmp_path_factory.mktemp("lines") / "train.source"
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    assert read_lines(path) == [line.removesuffix("\r") for line in lines]  # \r\n ends a line as \n does


@FEW
@given(data=BYTE_SOUP)
def test_property_any_bytes_read_or_raise_an_error_naming_the_file(tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("bytes")
    for read, name in ((read_kb_csv, "kb.tsv"), (read_lines, "train.source")):
        path = write_bytes(folder, data, name)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                read(path)
        except InputError as e:  # never a bare UnicodeDecodeError or csv.Error
            assert str(e).startswith(f"{path}:"), str(e)


# ---------------------------------------------------------------- finetune_rag.py refuses before any work


def test_a_model_directory_that_does_not_exist_is_named(tmp_path):
    (tmp_path / "pretrained").mkdir()
    with pytest.raises(FileNotFoundError, match=r"--generator_name_or_path .*pretrained/smollm: no such directory"):
        check_model_path("generator_name_or_path", str(tmp_path / "pretrained" / "smollm"))
    check_model_path("model_name_or_path", "facebook/rag-token-base")  # a hub name stays one


def test_a_kb_that_cannot_serve_the_model_is_refused_naming_its_path(tiny_kb, tmp_path):
    passages, index = map(str, tiny_kb)
    kb = load_from_disk(passages)
    dim, n = len(kb[0]["embeddings"]), len(kb)
    rag_assembly.check_kb(passages, index, dim, n_docs=n)  # the good case
    with pytest.raises(
        ValueError, match=rf"{passages}: embeddings of size {dim}, the question encoder makes {2 * dim}"
    ):
        rag_assembly.check_kb(passages, index, 2 * dim, n_docs=2)
    with pytest.raises(ValueError, match=rf"--n_docs {n + 1} is more than the {n} passages of {passages}"):
        rag_assembly.check_kb(passages, index, dim, n_docs=n + 1)
    no_embeddings = str(tmp_path / "plain")
    kb.remove_columns("embeddings").save_to_disk(no_embeddings)
    with pytest.raises(ValueError, match=rf"{no_embeddings}: no `embeddings` column"):
        rag_assembly.check_kb(no_embeddings, index, dim, n_docs=2)
    other = faiss.IndexFlatIP(2 * dim)
    other.add(np.zeros((n, 2 * dim), np.float32))
    faiss.write_index(other, str(tmp_path / "other.faiss"))
    with pytest.raises(ValueError, match=rf"other.faiss: {n} vectors of size {2 * dim} for {n} passages of size {dim}"):
        rag_assembly.check_kb(passages, str(tmp_path / "other.faiss"), dim, n_docs=2)


def test_a_missing_test_split_is_found_before_training(tmp_path):
    for name in ("train.source", "train.target", "val.source", "val.target", "test.source"):
        (tmp_path / name).write_text("x\n")
    argv = ["--model_type", "rag_token", "--data_dir", str(tmp_path), "--do_train"]
    arguments.check_data_dir(finetune_rag.parse_args(argv))
    with pytest.raises(FileNotFoundError, match=rf"--data_dir {tmp_path} lacks test.target"):
        arguments.check_data_dir(finetune_rag.parse_args([*argv, "--do_predict"]))


def test_indexing_freq_zero_is_refused(capsys):
    with pytest.raises(SystemExit):
        finetune_rag.parse_args(["--model_type", "rag_token", "--end2end", "--indexing_freq", "0"])
    assert "--indexing_freq must be >= 1" in capsys.readouterr().err


def test_a_qa_file_with_bare_carriage_returns_is_refused(tmp_path):
    """Old Mac line ends (\r alone) would read the whole file as one example."""
    path = tmp_path / "train.source"
    path.write_bytes(b"who wrote hamlet\rwhat is the capital of france\r")
    with pytest.raises(InputError, match=r"train\.source: lines end in a bare carriage return .*tr '\\r' '\\n'"):
        read_lines(path)
    path.write_bytes(b"who wrote hamlet\r\nwhat is the capital of france\r\n")  # Windows line ends are fine
    assert read_lines(path) == ["who wrote hamlet", "what is the capital of france"]


def test_generate_qa_names_a_missing_model_directory(tmp_path, capsys):
    """Not the hub's "Repo id must be in the form 'repo_name'" error: the flag and the path."""
    from rag_end2end.data import generate_qa

    (tmp_path / "models").mkdir()
    missing = tmp_path / "models" / "smollm"
    with pytest.raises(SystemExit):
        generate_qa.parse_args(
            ["--csv_path", "kb.csv", "--output_dir", str(tmp_path / "qa"), "--generator_name_or_path", str(missing)]
        )
    assert f"--generator_name_or_path {missing}: no such directory" in capsys.readouterr().err


def test_an_encoder_directory_without_its_tokenizer_is_refused_naming_it(tiny_models, tmp_path):
    """Without tokenizer.json, transformers builds a tokenizer of the 5 special tokens from the rest of the directory:
    every word became [UNK], and the KB build, training and refreshes went on. A tokenizer with more tokens than the
    embedding table has rows is refused too."""
    import shutil

    from rag_end2end.kb import build as use_own_knowledge_dataset
    from rag_end2end.model.encoders import check_tokenizer, load_encoder, load_tokenizer
    from rag_end2end.recipes import make_objective

    ctx = tmp_path / "ctx"
    shutil.copytree(tiny_models["context_encoder"], ctx)
    (ctx / "tokenizer.json").unlink()
    refusal = rf"{ctx}: its tokenizer has 5 tokens, the context encoder's embedding table 2,000 rows: most words .*"
    refusal += r"tokenizer\.json missing \(the directory holds config\.json, model\.safetensors, tokenizer_config"
    build = ["--csv_path", str(DUMMY_CSV), "--output_dir", str(tmp_path / "kb"), "--device", "cpu"]
    with pytest.raises(ValueError, match=refusal):
        use_own_knowledge_dataset.main(
            use_own_knowledge_dataset.parse_args([*build, "--dpr_ctx_encoder_model_name", str(ctx)])
        )
    assert not (tmp_path / "kb").exists()

    args = finetune_rag.parse_args(
        ["--model_type", "rag_token", "--end2end", "--model_name_or_path", str(tiny_models["rag_token"])]
        + ["--context_encoder_name", str(ctx), "--passages_path", str(tmp_path), "--index_path", str(tmp_path)]
    )
    with pytest.raises(ValueError, match=refusal):  # the context encoder a run refreshes the KB with
        rag_assembly.build_model(args, make_objective(args), None)

    grown = load_tokenizer(tiny_models["context_encoder"])
    grown.add_tokens([f"extra{i}" for i in range(10)])
    grown.save_pretrained(tmp_path / "grown")
    encoder = load_encoder(tiny_models["context_encoder"], side="context")
    with pytest.raises(ValueError, match=r"grown: its tokenizer has 2,010 tokens.*ids up to 2009 would index past"):
        check_tokenizer(load_tokenizer(tmp_path / "grown"), encoder, "context encoder")
    check_tokenizer(load_tokenizer(tiny_models["context_encoder"]), encoder)  # its own fits


DUMMY_DATA = REPO / "test_run" / "dummy-train-data"


def _spoil(data: Path, case: str) -> str:
    """Break a copy of the dummy QA files as `case` says; the refusal expected."""
    if case == "not utf-8":
        (data / "val.source").write_bytes((DUMMY_DATA / "val.source").read_bytes() + "caf\xe9\n".encode("cp1252"))
        return r"val\.source:9: not UTF-8: 0xe9"
    if case == "lines differ":
        (data / "train.target").write_text("".join((DUMMY_DATA / "train.target").read_text().splitlines(True)[:-1]))
        return r"train\.source has 40 lines but .*train\.target has 39; they must be line-aligned"
    if case == "empty line":
        lines = (DUMMY_DATA / "train.source").read_text().splitlines(True)
        (data / "train.source").write_text("".join([*lines[:4], "\n", *lines[5:]]))
        return r"train\.source:5: empty or whitespace-only line"
    if case == "empty split":
        (data / "val.source").write_text("")
        (data / "val.target").write_text("")
        return r"val\.source and .*val\.target contain no examples"
    if case == "gold outside the KB":
        rows = [json.dumps({"answers": ["x"], "gold_passage_ids": [0 if i != 6 else 100_000]}) for i in range(8)]
        (data / "val.gold.jsonl").write_text("\n".join(rows) + "\n")
        return r"val\.gold\.jsonl:7: field `gold_passage_ids`: 100000 is no passage of --passages_path"
    (data / "val.gold.jsonl").write_text(json.dumps({"answers": ["x"], "gold_passage_ids": [0]}) + "\n")
    return r"val\.gold\.jsonl has 1 lines but .*val\.source has 8: one line a question"


@pytest.mark.parametrize(
    "case", ["not utf-8", "lines differ", "empty line", "empty split", "gold outside the KB", "gold lines"]
)
def test_qa_files_are_refused_before_ray_or_a_model_starts(finetune_argv, tmp_path, case):
    """They used to arrive after Ray, the model and the encoding actors had started, as a traceback, and leave logs/
    behind, so that the corrected rerun was refused as an earlier run. Ray here is an address where nothing listens:
    reaching it would be another error."""
    import shutil
    import socket

    data = tmp_path / "data"
    shutil.copytree(DUMMY_DATA, data)
    expected = _spoil(data, case)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = finetune_argv("--do_train", "--data_dir", str(data), "--ray_address", f"127.0.0.1:{port}")
    with pytest.raises(InputError, match=expected):
        finetune_rag.main(finetune_rag.parse_args(argv))
    assert not (tmp_path / "out" / "logs").exists()
    assert not [p for p in (tmp_path / "out").iterdir()], "the refused run left files in --output_dir"


def test_a_qa_file_refusal_is_one_line_with_exit_status_2(finetune_argv, tmp_path):
    import shutil
    import subprocess
    import sys

    data = tmp_path / "data"
    shutil.copytree(DUMMY_DATA, data)
    _spoil(data, "empty line")
    argv = finetune_argv("--do_train", "--data_dir", str(data))
    done = subprocess.run(
        [sys.executable, "finetune_rag.py", *argv], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "train.source:5: empty or whitespace-only line" in errors[0], done.stderr[-3000:]
    assert "Traceback" not in done.stderr and not (tmp_path / "out" / "logs").exists()


def test_a_negative_learning_rate_is_refused_and_a_zero_one_warned(capsys):
    base = ["--model_type", "rag_token"]
    for flag in ("--learning_rate", "--retriever_learning_rate"):
        with pytest.raises(SystemExit):
            finetune_rag.parse_args([*base, flag, "-1"])
        assert f"{flag} must be >= 0, got -1" in capsys.readouterr().err
    with pytest.warns(UserWarning, match=r"--learning_rate 0: the parts it sets do not learn"):
        finetune_rag.parse_args([*base, "--learning_rate", "0"])


def test_passages_per_question_and_empty_questions_are_refused_in_one_line(tiny_models, tiny_kb, tmp_path, capsys):
    """n_docs 0 in rag_settings.json ended in FAISS's bare `assert k > 0`; more than the KB holds repeated its best
    hit; an empty question was answered."""
    from rag_end2end.deploy import answer as rag_answer
    from rag_end2end.model.rag import RagModel
    from rag_end2end.model.settings import RagSettings, Scoring, SettingsError

    path = RagSettings(question_encoder=Scoring(similarity="dot"), generator_family=None).to_json(tmp_path / "s.json")
    path.write_text(path.read_text().replace('"n_docs": 5', '"n_docs": 0'))
    with pytest.raises(SettingsError, match=rf"^{path}: n_docs 0: passages per question must be >= 1$"):
        RagSettings.from_json(path)

    kb = (str(tiny_kb[0]), str(tiny_kb[1]))
    model = RagModel.from_pretrained(str(tiny_models["rag_token"]), kb=kb).eval()
    size = len(model.retriever)
    with pytest.raises(ValueError, match=r"^question 2 of 2 is empty$"):
        model.answer(["what is hepcidin?", "  "])
    for n in (0, size + 1):
        with pytest.raises(
            ValueError, match=rf"^n_docs: {n} passages per question; give 1 to the KB's size \({size}\)"
        ):
            model.answer(["what is hepcidin?"], n_docs=n)
    assert len(model.answer(["what is hepcidin?"], n_docs=size)[0]["passages"]) == size
    model.n_docs = size + 1
    with pytest.raises(ValueError, match=rf"n_docs \(rag_settings.json\) for the KB .*: {size + 1} passages per"):
        model.attach_kb(kb)

    with pytest.raises(SystemExit):
        rag_answer.main(["--model", str(tiny_models["rag_token"]), "--question", " "])
    assert "--question: an empty question" in capsys.readouterr().err


def test_an_incomplete_checkpoint_is_refused_naming_what_is_missing(tiny_models, tiny_kb, tmp_path):
    """A checkpoint<step>/ being saved or removed lacks parts: its reader got the hub's "Repo id must be in the
    form" error, or (no kb_version.json) a model without a retriever: "'NoneType' object has no attribute
    'retrieve'"."""
    import shutil

    from rag_end2end.model.rag import RagModel

    kb = (str(tiny_kb[0]), str(tiny_kb[1]))
    checkpoint = tmp_path / "checkpoint8"
    RagModel.from_pretrained(str(tiny_models["rag_token"]), kb=kb).save_pretrained(checkpoint)
    shutil.rmtree(checkpoint / "generator")
    with pytest.raises(FileNotFoundError, match=rf"^{checkpoint}: not a complete checkpoint: generator/ missing"):
        RagModel.from_pretrained(checkpoint)
    retriever_only = RagModel.from_pretrained(checkpoint, load_generator=False).eval()  # no kb_version.json
    with pytest.raises(ValueError, match=r"^no KB to retrieve from: the checkpoint names none \(no kb_version.json\)"):
        retriever_only.answer(["what is hepcidin?"])
    assert retriever_only.attach_kb(kb).answer(["what is hepcidin?"])[0]["passages"]
    shutil.rmtree(checkpoint / "question_encoder")
    with pytest.raises(FileNotFoundError, match=r"checkpoint8: not a complete checkpoint: question_encoder/ missing"):
        RagModel.from_pretrained(checkpoint, load_generator=False)
