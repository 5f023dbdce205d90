"""rag_settings.json as one typed object (rag_end2end.model.settings.RagSettings): every field survives the file,
bad files are refused naming the file and the key, files of the earlier code load and write back unchanged, and
the model is built from its settings by from_pretrained, by the run's assembly and by the export."""

import dataclasses
import json
import os
import re
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from rag_end2end.kb import search as kb_search
from rag_end2end.model.encoders import PooledEncoder, load_encoder, with_prefix, with_scoring
from rag_end2end.model.rag import CausalGenerator, RagModel, checkpoint_settings
from rag_end2end.model.settings import (
    FALLBACK_GENERATION,
    SETTINGS_FILE,
    Generation,
    RagSettings,
    Scoring,
    SettingsError,
    settings_table,
)
from rag_end2end.training import finetune as finetune_rag

REPO = Path(__file__).resolve().parents[1]
HIDDEN = 32  # rag_end2end.tiny_models

# What the code before RagSettings wrote (RagModel.settings() as a dict, json.dumps(indent=1)): a mean-pooled
# cosine question encoder with a learned tau, a causal generator, a context encoder; and a DPR retriever alone.
EARLIER_CAUSAL = {
    "n_docs": 2,
    "marginal": "sequence",
    "question_prefix": "query: ",
    "question_max_length": 32,
    "rerank_top": 4,
    "doc_scores": "fresh",
    "generation": {"num_beams": 2, "max_new_tokens": 7},
    "passage_prefix": "passage: ",
    "question_encoder": {
        "pooling": "mean",
        "normalize": True,
        "similarity": "cosine",
        "temperature": 0.07000000029802322,
        "learn_temperature": True,
    },
    "generator_family": "causal",
    "template": "{title}: {text}\n{question}\n",
    "max_length": 200,
    "label_smoothing": 0.1,
}
EARLIER_RETRIEVER_ONLY = {
    "n_docs": 5,
    "marginal": "token",
    "question_prefix": "",
    "question_max_length": None,
    "rerank_top": 0,
    "doc_scores": "stored",
    "generation": {},
    "passage_prefix": None,
    "question_encoder": {"similarity": "dot"},
    "generator_family": None,
    "label_smoothing": 0.0,
}


def every_field_set() -> RagSettings:
    """No field at its default, so that a field the file drops shows."""
    return RagSettings(
        n_docs=7,
        marginal="sequence",
        question_prefix="query: ",
        question_max_length=40,
        rerank_top=9,
        doc_scores="fresh",
        generation=Generation(num_beams=3, max_new_tokens=11),
        passage_prefix="passage: ",
        question_encoder=Scoring(
            pooling="mean", normalize=True, similarity="cosine", temperature=0.25, learn_temperature=True
        ),
        generator_family="seq2seq",
        template="{question} || {title}: {text}",
        max_length=77,
        label_smoothing=0.15,
    )


def write(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data, indent=1))
    return path


# ---------------------------------------------------------------- the file


def test_every_field_survives_the_file_with_its_type(tmp_path):
    settings = every_field_set()
    defaults = RagSettings(question_encoder=Scoring(), generator_family=None)
    same = [f.name for f in dataclasses.fields(RagSettings) if getattr(settings, f.name) == getattr(defaults, f.name)]
    assert same == [], "every field differs from its default here"

    loaded = RagSettings.from_json(settings.to_json(tmp_path / SETTINGS_FILE))
    assert loaded == settings
    for f in dataclasses.fields(RagSettings):
        assert type(getattr(loaded, f.name)) is type(getattr(settings, f.name)), f.name
    assert isinstance(loaded.question_encoder.temperature, float) and loaded.generation.num_beams == 3
    assert [p.name for p in tmp_path.iterdir()] == [SETTINGS_FILE]  # the temporary file was renamed, none is left


def test_a_file_of_the_earlier_code_loads_and_writes_back_byte_for_byte(tmp_path):
    for name, data in (("causal", EARLIER_CAUSAL), ("retriever", EARLIER_RETRIEVER_ONLY)):
        file = write(tmp_path / f"{name}.json", data)
        settings = RagSettings.from_json(file)
        assert settings.to_dict() == data
        assert settings.to_json(tmp_path / "again.json").read_bytes() == file.read_bytes()
    settings = RagSettings.from_json(tmp_path / "causal.json")
    assert settings.question_encoder == Scoring("mean", True, "cosine", 0.07000000029802322, True)
    assert settings.generation == Generation(num_beams=2, max_new_tokens=7) and settings.template.endswith("\n")
    retriever = RagSettings.from_json(tmp_path / "retriever.json")
    assert retriever.generator_family is None and retriever.generation == Generation()
    assert "template" not in json.loads(retriever.to_json(tmp_path / "r.json").read_text())  # only with a generator


def test_an_unknown_key_is_refused_naming_the_file_and_the_key(tmp_path):
    file = write(tmp_path / SETTINGS_FILE, EARLIER_CAUSAL | {"n_doc": 3})
    with pytest.raises(SettingsError, match=rf"^{re.escape(str(file))}: unknown key 'n_doc'"):
        RagSettings.from_json(file)
    nested = EARLIER_CAUSAL | {"question_encoder": {"similarity": "dot", "tau": 2}}
    with pytest.raises(SettingsError, match=rf"^{re.escape(str(file))}: unknown key 'question_encoder.tau'"):
        RagSettings.from_json(write(file, nested))


@pytest.mark.parametrize("key", ["question_encoder", "generator_family", "template", "max_length"])
def test_a_missing_required_key_is_refused_naming_the_file_and_the_key(tmp_path, key):
    data = {k: v for k, v in EARLIER_CAUSAL.items() if k != key}
    file = write(tmp_path / SETTINGS_FILE, data)
    with pytest.raises(SettingsError, match=rf"^{re.escape(str(file))}: missing key '{key}'"):
        RagSettings.from_json(file)


def test_a_missing_optional_key_takes_its_default(tmp_path):
    required = ("question_encoder", "generator_family", "template", "max_length")
    file = write(tmp_path / SETTINGS_FILE, {k: EARLIER_CAUSAL[k] for k in required})
    settings = RagSettings.from_json(file)
    assert (settings.n_docs, settings.marginal, settings.question_prefix, settings.rerank_top) == (5, "token", "", 0)
    assert (settings.doc_scores, settings.label_smoothing, settings.generation) == ("stored", 0.0, Generation())
    assert settings.question_max_length is None and settings.passage_prefix is None
    # the retriever alone: no generator, so neither its template nor its length are asked for
    bare = RagSettings.from_json(write(file, {"question_encoder": {}, "generator_family": None}))
    assert bare.question_encoder == Scoring() and bare.template is None


@pytest.mark.parametrize(
    "change, message",
    [
        ({"n_docs": "3"}, r"key 'n_docs' is \"3\", expected int"),
        ({"rerank_top": True}, r"key 'rerank_top' is true, expected int"),
        ({"generation": {"num_beams": 2.5}}, r"key 'generation.num_beams' is 2.5, expected int or null"),
        ({"question_encoder": "dot"}, r"key 'question_encoder' is \"dot\", expected an object"),
        ({"marginal": "tokens"}, r"marginal 'tokens': use one of token, sequence"),
        ({"doc_scores": "new"}, r"doc_scores 'new': use one of fresh, stored"),
    ],
)
def test_a_wrong_type_or_choice_is_refused_naming_the_file_and_the_key(tmp_path, change, message):
    file = write(tmp_path / SETTINGS_FILE, EARLIER_CAUSAL | change)
    with pytest.raises(SettingsError, match=rf"^{re.escape(str(file))}: {message}"):
        RagSettings.from_json(file)


def test_a_float_given_as_an_integer_stays_a_float(tmp_path):
    data = EARLIER_CAUSAL | {"label_smoothing": 0, "question_encoder": {"similarity": "dot", "temperature": 2}}
    settings = RagSettings.from_json(write(tmp_path / SETTINGS_FILE, data))
    assert type(settings.label_smoothing) is float and type(settings.question_encoder.temperature) is float


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    """The fault is a crash between writing and renaming, which no real call causes on demand: os.replace fails."""
    file = every_field_set().to_json(tmp_path / SETTINGS_FILE)
    before = file.read_bytes()

    def fail(*args):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk gone"):
        every_field_set().replace(n_docs=1).to_json(file)
    assert file.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == [SETTINGS_FILE]


def test_replace_refuses_an_unknown_setting():
    with pytest.raises(SettingsError, match=r"unknown setting\(s\) ndocs"):
        every_field_set().replace(ndocs=3)
    assert every_field_set().replace(n_docs=2).n_docs == 2


def test_decoding_takes_the_argument_else_the_runs_else_the_fallback():
    assert Generation().decoding() == Generation(**FALLBACK_GENERATION)
    assert Generation(num_beams=2).decoding() == Generation(2, FALLBACK_GENERATION["max_new_tokens"])
    assert Generation(num_beams=2, max_new_tokens=6).decoding(max_new_tokens=3) == Generation(2, 3)


def test_rescored_follows_the_flags_and_with_scoring_follows_it():
    dpr = Scoring(similarity="dot")
    assert dpr.rescored(None, None) is dpr and dpr.rescored("dot", None) is dpr
    assert dpr.rescored("cosine", None) == Scoring("pooler", True, "cosine", 0.05, False)
    assert dpr.rescored(None, 2, True) == Scoring("pooler", False, "dot", 2.0, True)
    learned = Scoring("mean", True, "cosine", 0.07, True)
    assert learned.rescored(None, None) is learned  # continuing without scoring flags keeps it as saved
    assert learned.rescored(None, None, True) == Scoring("mean", True, "cosine", 0.05, True)  # --learn_temperature


def test_the_docs_hold_the_generated_table():
    assert settings_table() in (REPO / "docs" / "outputs.md").read_text()


# ---------------------------------------------------------------- the model built from its settings


def retriever_and_causal(tiny_models) -> RagModel:
    q = load_encoder(
        tiny_models["question_encoder"],
        "mean",
        side="question",
        similarity="cosine",
        temperature=0.07,
        learn_temperature=True,
    )
    ctx = load_encoder(tiny_models["context_encoder"], "mean", side="context", similarity="cosine")
    generator = CausalGenerator.from_pretrained(
        str(tiny_models["causal_generator"]), "{title}: {text}\n{question}\n", 200, 0.1
    )
    ctx_tok = with_prefix(AutoTokenizer.from_pretrained(tiny_models["context_encoder"]), "passage: ")
    return RagModel(
        q,
        AutoTokenizer.from_pretrained(tiny_models["question_encoder"]),
        generator,
        n_docs=2,
        marginal="sequence",
        ctx_encoder=ctx,
        ctx_tokenizer=ctx_tok,
        question_prefix="query: ",
        rerank_top=4,
        question_max_length=32,
        generation=Generation(2, 7),
    )


def test_a_saved_checkpoint_loads_with_the_same_settings(tiny_models, tmp_path):
    model = retriever_and_causal(tiny_models)
    model.save_pretrained(tmp_path / "ckpt")
    on_disk = RagSettings.from_json(tmp_path / "ckpt" / SETTINGS_FILE)
    assert on_disk.to_dict() == EARLIER_CAUSAL  # the earlier code's file, key for key
    loaded = RagModel.from_pretrained(tmp_path / "ckpt", retriever=object())
    assert loaded.settings() == on_disk == model.settings()


def test_from_pretrained_refuses_a_settings_file_with_an_unknown_key(tiny_models, tmp_path):
    """A misspelt key was ignored before, and the model loaded without the setting."""
    model = RagModel(
        load_encoder(tiny_models["question_encoder"]), AutoTokenizer.from_pretrained(tiny_models["question_encoder"])
    )
    model.save_pretrained(tmp_path / "ckpt")
    file = tmp_path / "ckpt" / SETTINGS_FILE
    file.write_text(json.dumps(json.loads(file.read_text()) | {"ndocs": 3}))
    with pytest.raises(ValueError, match=rf"{re.escape(str(file))}: unknown key 'ndocs'"):
        RagModel.from_pretrained(tmp_path / "ckpt", retriever=object())


@pytest.mark.parametrize("checkpoint", ["ours", "rag_token"])
def test_from_pretrained_builds_the_model_the_given_settings_describe(tiny_models, tmp_path, checkpoint):
    if checkpoint == "ours":
        retriever_and_causal(tiny_models).save_pretrained(tmp_path / "ckpt")
        path = tmp_path / "ckpt"
    else:
        path = tiny_models["rag_token"]
    saved = checkpoint_settings(path)
    wanted = saved.replace(
        n_docs=3,
        template="Q {question} T {title} P {text}",
        label_smoothing=0.3,
        rerank_top=5,
        question_encoder=saved.question_encoder.rescored("cosine", 0.5, True),
        generation=Generation(3, 4),
    )
    model = RagModel.from_pretrained(path, retriever=object(), settings=wanted)
    assert model.settings() == wanted
    q = model.question_encoder
    assert isinstance(q, PooledEncoder) and (q.similarity, q.temperature_value, q.learn_temperature) == (
        "cosine",
        0.5,
        True,
    )
    assert (model.generator.template, model.generator.label_smoothing) == ("Q {question} T {title} P {text}", 0.3)
    # the same encoder as loading the checkpoint as saved and then changing its scoring
    unchanged = RagModel.from_pretrained(path, retriever=object(), load_generator=False).question_encoder
    patched = with_scoring(unchanged, "cosine", 0.5, True)
    assert (patched.pooling, patched.normalize) == (q.pooling, q.normalize)


# ---------------------------------------------------------------- the run's assembly and the export


def test_assembly_builds_from_the_checkpoint_settings_and_the_flags_and_export_carries_them(
    finetune_argv, tiny_models, tiny_kb, tmp_path
):
    pytest.importorskip("sentence_transformers")
    from rag_end2end.deploy import export as export_model

    passages, index = tiny_kb
    flags = [
        "--training_mode",
        "rag_end2end",
        "--prompt_template",
        "{question} || {title}: {text}",
        "--label_smoothing",
        "0.2",
        "--retrieval_temperature",
        "2",
        "--learn_temperature",
        "--n_docs",
        "3",
        "--rerank_top",
        "4",
        "--max_source_length",
        "9",
        "--num_beams",
        "2",
        "--test_max_target_length",
        "6",
        "--question_prefix",
        "q: ",
    ]
    module = finetune_rag.GenerativeQAModule(
        finetune_rag.parse_args(finetune_argv(*flags)), kb_search.KBSearch(str(passages), str(index), HIDDEN)
    )
    expected = checkpoint_settings(tiny_models["rag_token"]).replace(
        n_docs=3,
        question_prefix="q: ",
        question_max_length=9,
        rerank_top=4,
        doc_scores="fresh",
        generation=Generation(num_beams=2, max_new_tokens=6),
        question_encoder=Scoring("pooler", False, "dot", 2.0, True),
        template="{question} || {title}: {text}",
        label_smoothing=0.2,
    )
    assert module.model.settings() == expected
    assert module.model.ctx_encoder is not None  # --context_encoder_name's: the RAG checkpoint holds none

    ckpt = tmp_path / "run" / "checkpoint0"
    module.save_hf_checkpoint(ckpt)
    assert RagSettings.from_json(ckpt / SETTINGS_FILE) == expected
    exported = export_model.export(ckpt, tmp_path / "export")
    assert RagSettings.from_json(exported / SETTINGS_FILE) == expected
    assert RagModel.from_pretrained(exported, retriever=object()).settings() == expected

    # Continued from that checkpoint without scoring or prompt flags: its learned tau, template and context encoder.
    argv = finetune_argv("--training_mode", "rag_end2end", "--label_smoothing", "0.1")
    argv[argv.index("--model_name_or_path") + 1] = str(ckpt)
    args = finetune_rag.parse_args(argv)
    again = finetune_rag.GenerativeQAModule(args, kb_search.KBSearch(str(passages), str(index), HIDDEN))
    assert again.model.settings() == expected.replace(
        label_smoothing=0.1,
        rerank_top=args.rerank_top,
        question_max_length=args.max_source_length,
        generation=Generation(args.num_beams, args.test_max_target_length),
    )
    assert isinstance(again.model.ctx_encoder, type(module.model.ctx_encoder))


def test_no_module_but_settings_names_the_files_keys():
    """The keys only RagSettings names (n_docs, marginal and the like are also flags and argument names)."""
    keys = (
        '"generator_family"',
        '"doc_scores"',
        '"question_max_length"',
        '"passage_prefix"',
        '"rerank_top"',
        '"label_smoothing"',
        '"generation"',
        '"max_new_tokens"',
        '"num_beams"',
    )
    readers = ["model/rag.py", "model/assembly.py", "deploy/export.py", "deploy/answer.py", "evaluation/evaluate.py"]
    found = {name: [k for k in keys if k in (REPO / "rag_end2end" / name).read_text()] for name in readers}
    assert found == {name: [] for name in readers}
