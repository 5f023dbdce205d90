"""The numerics of the GPU paths, shown on the CPU (precision.py): every model loads in float32 whatever dtype its
checkpoint declares, doc and InfoNCE scores stay float32 under autocast, bf16 counts as supported only where a GPU
computes it natively, and LoRA merges onto the CPU without touching the model in training. Which device each
recipe's tensors are made on: tests/test_training_modes.py, with tests/device_probe.py."""

import copy
import json
import shutil
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from device_probe import HostTensorProbe
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    BertConfig,
    BertModel,
    RagTokenForGeneration,
)

from rag_end2end import precision
from rag_end2end.kb import search as kb_search
from rag_end2end.model.encoders import PooledEncoder, load_encoder
from rag_end2end.model.lora import _inner, add_lora, has_lora, merged
from rag_end2end.model.rag import CausalGenerator, RagModel, Seq2SeqGenerator
from rag_end2end.recipes import infonce
from rag_end2end.training import finetune as finetune_rag
from rag_end2end.training.arguments import trainer_kwargs

pytestmark = pytest.mark.usefixtures("one_thread")
HIDDEN = 32  # test_run/make_tiny_models.py


def dtypes(module: torch.nn.Module) -> set[torch.dtype]:
    return {p.dtype for p in module.parameters()}


# ---------------------------------------------------------------- models load in float32


@pytest.fixture(scope="module")
def bf16_models(tiny_models, tmp_path_factory) -> dict[str, Path]:
    """The tiny models saved in bfloat16, their config.json declaring it, as most hub generators are."""
    out = tmp_path_factory.mktemp("bf16-models")
    dirs = {}
    for name, path in tiny_models.items():
        dirs[name] = out / name
        shutil.copytree(path, dirs[name])
        model = getattr(transformers, AutoConfig.from_pretrained(path).architectures[0]).from_pretrained(path)
        model.to(torch.bfloat16)
        for config in (
            model.config,
            *(getattr(model.config, side, None) for side in ("question_encoder", "generator")),
        ):
            if config is not None:  # a RAG config declares a dtype for each part too
                config.dtype = torch.bfloat16
        model.save_pretrained(dirs[name])
    # a BERT (AutoModel) encoder besides the tiny DPR ones
    torch.manual_seed(0)
    bert = BertModel(
        BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    )
    bert.to(torch.bfloat16).save_pretrained(out / "bert")
    dirs["bert"] = out / "bert"
    return dirs


def test_the_bf16_checkpoints_declare_bf16_and_transformers_loads_them_so(bf16_models):
    """The premise: transformers 5 loads a checkpoint in the dtype its config declares (a RAG checkpoint's parts
    even when asked for float32)."""
    for name in ("generator", "causal_generator", "question_encoder", "bert", "rag_token"):
        assert json.loads((bf16_models[name] / "config.json").read_text())["dtype"] == "bfloat16", name
    assert AutoModelForCausalLM.from_pretrained(bf16_models["causal_generator"]).dtype == torch.bfloat16
    # and a RAG checkpoint's parts, even when asked for float32
    rag = RagTokenForGeneration.from_pretrained(bf16_models["rag_token"], dtype=torch.float32)
    assert dtypes(rag) == {torch.bfloat16}


@pytest.mark.parametrize(("family", "name"), [(Seq2SeqGenerator, "generator"), (CausalGenerator, "causal_generator")])
def test_generators_load_in_float32_whatever_their_checkpoint_declares(bf16_models, family, name):
    assert dtypes(family.from_pretrained(str(bf16_models[name]))) == {torch.float32}


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("question_encoder", {"side": "question"}),  # a DPRQuestionEncoder as it is
        ("context_encoder", {"side": "context"}),
        ("question_encoder", {"side": "question", "pooling": "cls"}),  # a PooledEncoder over its DPREncoder
        ("bert", {"pooling": "mean", "similarity": "cosine"}),  # any AutoModel
    ],
)
def test_encoders_load_in_float32_whatever_their_checkpoint_declares(bf16_models, name, options):
    assert dtypes(load_encoder(str(bf16_models[name]), **options)) == {torch.float32}


def test_a_pooled_dpr_encoder_saved_in_bf16_loads_in_float32(bf16_models, tmp_path):
    encoder = PooledEncoder.from_pretrained(str(bf16_models["question_encoder"]), "cls", side="question")
    encoder.to(torch.bfloat16).save_pretrained(tmp_path / "pooled")  # architectures: DPREncoder
    assert dtypes(load_encoder(str(tmp_path / "pooled"))) == {torch.float32}


@pytest.mark.parametrize("name", ["rag_token", "rag_sequence"])
def test_transformers_rag_checkpoints_in_bf16_load_in_float32(bf16_models, name):
    model = RagModel.from_pretrained(str(bf16_models[name]), retriever=object())
    assert dtypes(model) == {torch.float32}


def test_a_checkpoint_of_ours_saved_in_bf16_loads_in_float32(bf16_models, tiny_models, tmp_path):
    q = load_encoder(str(tiny_models["question_encoder"]), "cls")
    ctx = load_encoder(str(tiny_models["context_encoder"]), "cls", side="context")
    tok = AutoTokenizer.from_pretrained(tiny_models["question_encoder"])
    generator = CausalGenerator.from_pretrained(str(tiny_models["causal_generator"]))
    model = RagModel(q, tok, generator, ctx_encoder=ctx, ctx_tokenizer=tok).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "ckpt")
    assert dtypes(RagModel.from_pretrained(tmp_path / "ckpt", retriever=object())) == {torch.float32}


@pytest.mark.parametrize(
    "parts",
    [
        {"--model_name_or_path": "rag_token"},
        {"--question_encoder_name_or_path": "question_encoder", "--generator_name_or_path": "causal_generator"},
    ],
)
def test_a_run_on_bf16_checkpoints_trains_float32_weights(bf16_models, finetune_argv, tiny_kb, parts):
    """16-mixed needs float32 master weights (fp16 ones fail its first step), and AdamW's small steps round away
    on bf16 weights: every part of the module that trains is float32."""
    argv = finetune_argv(
        "--training_mode", "rag_end2end", "--context_encoder_name", str(bf16_models["context_encoder"])
    )
    i = argv.index("--model_name_or_path")
    del argv[i : i + 2]
    for flag, name in parts.items():
        argv += [flag, str(bf16_models[name])]
    argv += ["--generator_type", "causal"] if "causal_generator" in parts.values() else []
    module = finetune_rag.GenerativeQAModule(
        finetune_rag.parse_args(argv), kb_search.KBSearch(*map(str, tiny_kb), HIDDEN)
    )
    model = module.model
    assert model.ctx_encoder is not None and model.generator is not None
    assert dtypes(model) == {torch.float32}


# ---------------------------------------------------------------- scores in float32 under autocast


class StoredRetriever:
    """Question i gets passages i, i+1, ... of four, with fixed stored embeddings of DPR's size (norm ~ 10)."""

    def __init__(self):
        self.embeds = np.random.default_rng(0).standard_normal((4, HIDDEN)).astype(np.float32) * 2

    def retrieve(self, q: np.ndarray, n_docs: int, embeddings: bool = True):
        ids = np.array([[(i + k) % 4 for k in range(n_docs)] for i in range(len(q))])
        docs = [{"title": [f"title {j}" for j in row], "text": [f"passage number {j}" for j in row]} for row in ids]
        return self.embeds[ids], ids, docs


@pytest.mark.parametrize("fresh", [False, True])
def test_doc_scores_are_float32_under_bf16_autocast(tiny_models, fresh):
    """Under bf16 autocast a `.float()` einsum is recast to bf16: scores near 10 moved in steps of 1/16 and
    p(z|x) with them. precision.float32_scores turns autocast off for the product."""
    tok = AutoTokenizer.from_pretrained(tiny_models["question_encoder"])
    q_enc = load_encoder(str(tiny_models["question_encoder"]), "cls", temperature=0.1).eval()  # |q| ~ 10 / tau
    ctx = (
        {
            "ctx_encoder": load_encoder(str(tiny_models["context_encoder"]), side="context").eval(),
            "ctx_tokenizer": tok,
            "rerank_top": 3,
        }
        if fresh
        else {}
    )
    model = RagModel(q_enc, tok, None, StoredRetriever(), n_docs=2, **ctx)
    enc = model.tokenize_questions(["what is the capital of france?", "who founded rome?"])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        r = model.retrieve(enc["input_ids"], enc["attention_mask"])
        if fresh:
            titles = [t for d in r.docs for t in d["title"]]
            d = model.encode_passages(titles, [t for d in r.docs for t in d["text"]]).view(2, 2, -1)
        else:
            d = torch.from_numpy(StoredRetriever().embeds[r.ids])
    expected = torch.einsum("bd,bnd->bn", r.q.double(), d.double())
    assert r.doc_scores.dtype == torch.float32
    assert expected.abs().max() > 4  # big enough for bf16's steps to show
    torch.testing.assert_close(r.doc_scores.double(), expected, rtol=1e-6, atol=1e-5)


def test_infonce_is_float32_under_bf16_autocast():
    generator = torch.Generator().manual_seed(0)
    q, p = torch.randn(3, 16, generator=generator) * 3, torch.randn(6, 16, generator=generator) * 3
    owner, positive = torch.arange(6), torch.tensor([0, 1, 2])
    expected = F.cross_entropy(q.double() @ p.double().T, positive)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = infonce(q, p, owner, positive, symmetric=False)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- bf16 only where it is native


def fake_gpu(monkeypatch, major: int) -> None:
    """A CUDA device of compute capability `major`.x on which bf16 tensors can be made (emulated below 8)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: SimpleNamespace(major=major, minor=0))
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda device: True)
    monkeypatch.setattr(torch.version, "hip", None)


@pytest.mark.parametrize(("major", "native"), [(7, False), (8, True), (9, True)])
def test_bf16_counts_as_supported_only_where_the_gpu_has_it(monkeypatch, major, native):
    fake_gpu(monkeypatch, major)
    assert torch.cuda.is_bf16_supported()  # torch's default also counts emulation (V100, T4)
    assert precision.native_bf16() is native


def test_bf16_is_not_native_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert precision.native_bf16() is False


@pytest.mark.parametrize(("major", "warns"), [(7, True), (8, False)])
def test_bf16_mixed_on_a_gpu_without_native_bf16_warns(monkeypatch, major, warns):
    fake_gpu(monkeypatch, major)
    args = finetune_rag.parse_args(["--model_type", "rag_token", "--accelerator", "gpu", "--precision", "bf16-mixed"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert trainer_kwargs(args)["precision"] == "bf16-mixed"
    assert any("no native bf16" in str(w.message) for w in caught) is warns


# ---------------------------------------------------------------- LoRA merged on the CPU


def _old_merge(part: torch.nn.Module) -> torch.nn.Module:
    """What lora.merged did before: a deep copy of the whole part (on its own device), merged there."""
    part = copy.deepcopy(part)
    holder, attr = _inner(part)
    setattr(holder, attr, getattr(holder, attr).merge_and_unload())
    return part


def _tied_groups(state: dict[str, torch.Tensor]) -> set[frozenset[str]]:
    groups: dict[int, set[str]] = {}
    for name, t in state.items():
        groups.setdefault(t.untyped_storage().data_ptr(), set()).add(name)
    return {frozenset(g) for g in groups.values() if len(g) > 1}


LORA_PARTS = {
    "causal_generator": lambda path: CausalGenerator.from_pretrained(path),
    "generator": lambda path: Seq2SeqGenerator.from_pretrained(path),  # BART: tied embeddings
    "question_encoder": lambda path: load_encoder(path, "cls"),  # PooledEncoder
    "context_encoder": lambda path: load_encoder(path, side="context"),  # DPRContextEncoder
}


@pytest.mark.parametrize("name", sorted(LORA_PARTS))
def test_merged_folds_lora_on_the_cpu_and_leaves_the_trained_part_alone(tiny_models, name):
    torch.manual_seed(0)
    part = LORA_PARTS[name](str(tiny_models[name]))
    add_lora(part, r=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        for param_name, p in part.named_parameters():
            if "lora_B" in param_name:
                p.normal_()  # lora_B starts at zero: the adapters change the weights
    before = {k: (v.clone(), v.device, v.requires_grad) for k, v in part.state_dict(keep_vars=True).items()}
    reference = _old_merge(part).state_dict()

    with HostTensorProbe() as probe:  # the part's tensors stand for GPU ones
        copy_ = merged(part)
    state = copy_.state_dict()
    assert not has_lora(copy_) and not any("lora" in k for k in state)
    assert state.keys() == reference.keys()
    for k in state:
        assert torch.equal(state[k], reference[k]), k
    assert _tied_groups(state) == _tied_groups(reference)
    assert probe.gpu_bytes_made == 0  # nothing was copied on the part's device ...
    assert all(probe.on_host(t) for t in copy_.state_dict(keep_vars=True).values())  # ... the copy is on the CPU
    assert all(t.device.type == "cpu" for t in state.values())

    assert has_lora(part)  # the part in training: adapters, weights, devices and requires_grad as they were
    after = part.state_dict(keep_vars=True)
    assert after.keys() == before.keys()
    for k, (value, device, requires_grad) in before.items():
        assert torch.equal(after[k], value) and after[k].device == device and after[k].requires_grad == requires_grad
    memory = {t.untyped_storage().data_ptr() for t in after.values()}
    assert not any(t.untyped_storage().data_ptr() in memory for t in state.values())  # an optimizer step cannot
    # change a copy that is being saved or encoded with
