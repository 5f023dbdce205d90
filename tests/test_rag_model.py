"""rag_model.py on the tiny random models of test_run/make_tiny_models.py: Seq2SeqGenerator's log-probs,
RAG marginals, label smoothing and decoding against direct float64 computations (one unpadded
(question, passage) prompt at a time, marginals in plain Python), and RagModel's save/load round trips,
for our own checkpoints and for transformers' RAG ones."""

import copy
import math

import numpy as np
import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    BartForConditionalGeneration,
    DPRQuestionEncoder,
    RagConfig,
)

from rag_end2end.model.encoders import PooledEncoder, load_encoder, with_prefix
from rag_end2end.model.rag import RAG_TEMPLATE, CausalGenerator, RagModel, Seq2SeqGenerator, is_rag_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

HIDDEN = 32  # the tiny models' hidden size (make_tiny_models.HIDDEN)
KB = [
    ("Tuberculosis in China", "A 2010 survey in Shandong, a province of 94 million people, estimated TB prevalence."),
    ("Hepcidin in calves", "Serum hepcidin and oxidant status were measured in calves with neonatal septicemia."),
    ("Japanese encephalitis", "Approved drugs were screened for inhibitors of Japanese encephalitis virus infection."),
    ("Chikungunya", "Chikungunya virus is a mosquito-borne pathogen that causes fever, headache and rash."),
]
QUESTIONS = ["What is the population of Shandong province?", "What was the age range for the people surveyed?"]
ANSWERS = ["94 million", "15 years old or above"]  # 4 and 7 label tokens: [CLS] answer [SEP]
DOC_SCORES = torch.tensor([[0.3, -1.2, 0.8], [2.0, 0.5, -0.4]])
MAX_LENGTH = 128


class FakeRetriever:
    """Question i gets passages i, i+1, ... of KB, with fixed random stored embeddings."""

    def __init__(self):
        self.embeds = np.random.default_rng(0).standard_normal((len(KB), HIDDEN)).astype(np.float32)

    def retrieve(self, q: np.ndarray, n_docs: int, embeddings: bool = True):
        ids = np.array([[(i + k) % len(KB) for k in range(n_docs)] for i in range(len(q))])
        docs = [{"title": [KB[j][0] for j in row], "text": [KB[j][1] for j in row]} for row in ids]
        return self.embeds[ids], ids, docs


def passages(n_docs: int) -> list[dict]:
    return FakeRetriever().retrieve(np.zeros((len(QUESTIONS), HIDDEN)), n_docs)[2]


def prompts_of(b: int, docs: list[dict], template: str = RAG_TEMPLATE) -> list[str]:
    """Question b's prompts, one per passage, written here rather than by build_prompts."""
    d = docs[b]
    return [template.format(title=t, text=x, question=QUESTIONS[b]) for t, x in zip(d["title"], d["text"])]


def generator_tokenizer(path):
    """The tiny generator's WordPiece tokenizer without token_type_ids, as BART's and T5's own tokenizers
    (see test_sequence_generation_with_a_tokenizer_that_returns_token_type_ids)."""
    return AutoTokenizer.from_pretrained(path, model_input_names=["input_ids", "attention_mask"])


@pytest.fixture(scope="module")
def bart(tiny_models):
    """A tiny BART of the tiny generator's architecture (float32, eval mode), its tokenizer and a float64 copy
    for the direct computations. Re-initialised with larger weights: at the default init_std (0.02) every
    passage gives almost the same, almost uniform next-token distribution, and nothing would be tested."""
    config = AutoConfig.from_pretrained(tiny_models["generator"])
    config.init_std = 0.3
    torch.manual_seed(0)
    model = BartForConditionalGeneration(config).eval()
    return model, generator_tokenizer(tiny_models["generator"]), copy.deepcopy(model).double()


@pytest.fixture(scope="module")
def early_eos_bart(bart):
    """`bart` with the output rows of [SEP] (its EOS) and "laboratory" (a token it often emits) swapped: the
    same decoding, but answers that end after 2 to 5 tokens, or not at all within 6."""
    model, tok, _ = bart
    swapped = copy.deepcopy(model)
    perm = torch.arange(len(tok))
    sep, other = tok.sep_token_id, tok.convert_tokens_to_ids("laboratory")
    perm[[sep, other]] = perm[[other, sep]]
    with torch.no_grad():
        swapped.lm_head.weight = torch.nn.Parameter(model.lm_head.weight[perm].clone())  # unties it from the input
        swapped.final_logits_bias.copy_(model.final_logits_bias[:, perm])
    return swapped, tok, copy.deepcopy(swapped).double()


def seq2seq(bart, smoothing: float = 0.0) -> Seq2SeqGenerator:
    return Seq2SeqGenerator(bart[0], bart[1], RAG_TEMPLATE, MAX_LENGTH, smoothing)


# ---------------------------------------------------------------- direct computations


def encode_alone(tok, prompt: str) -> dict[str, torch.Tensor]:
    enc = tok(prompt, return_tensors="pt")
    assert enc["input_ids"].shape[1] < MAX_LENGTH, "the prompt must not be truncated"
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


@torch.no_grad()
def direct_logprobs(model64, tok, prompt: str, answer: str, smoothing: float = 0.0) -> list[float]:
    """log p(y_t | x, z, y_<t) of each label token of `answer` ([CLS] answer [SEP]), one prompt alone."""
    labels = tok(text_target=answer, return_tensors="pt")["input_ids"]
    decoder_input_ids = model64.prepare_decoder_input_ids_from_labels(labels=labels)
    logp = model64(**encode_alone(tok, prompt), decoder_input_ids=decoder_input_ids).logits[0].log_softmax(-1)
    token_lp = logp[torch.arange(labels.shape[1]), labels[0]]
    if smoothing:
        token_lp = (1 - smoothing) * token_lp + smoothing * logp.mean(-1)
    return token_lp.tolist()


def rag_nll(rows: list[list[float]], scores: list[float], marginal: str) -> float:
    """RAG NLL per answer token from rows[k][t] = log p(y_t | x, z_k, y_<t) and the doc scores, in floats."""
    norm = math.log(sum(math.exp(s) for s in scores))
    doc_lp = [s - norm for s in scores]
    n, length = len(rows), len(rows[0])
    if marginal == "token":
        return -sum(math.log(sum(math.exp(doc_lp[k] + rows[k][t]) for k in range(n))) for t in range(length)) / length
    return -math.log(sum(math.exp(doc_lp[k] + sum(rows[k])) for k in range(n))) / length


@torch.no_grad()
def next_token_logprobs(model64, tok, prompts: list[str], prefix: list[int]) -> torch.Tensor:
    """(n, V) log p(. | x, z_k, prefix) under each prompt alone, decoded from scratch (no cache)."""
    start = model64.config.decoder_start_token_id
    decoder_input_ids = torch.tensor([[start, *prefix]])
    return torch.stack(
        [
            model64(**encode_alone(tok, p), decoder_input_ids=decoder_input_ids).logits[0, -1].log_softmax(-1)
            for p in prompts
        ]
    )


def cut_at_eos(ids: list[int], tok) -> list[int]:
    ids = ids[: ids.index(tok.sep_token_id) + 1] if tok.sep_token_id in ids else ids
    return [i for i in ids if i != tok.pad_token_id]


@torch.no_grad()
def sequence_loglik(model64, tok, prompts: list[str], doc_lp: list[float], candidate: list[int]) -> float:
    """log sum_k p(z_k|x) prod_t p(y_t | x, z_k, y_<t) of a candidate (its tokens after the decoder start)."""
    start = model64.config.decoder_start_token_id
    decoder_input_ids = torch.tensor([[start, *candidate[:-1]]])
    per_doc = []
    for k, p in enumerate(prompts):
        logp = model64(**encode_alone(tok, p), decoder_input_ids=decoder_input_ids).logits[0].log_softmax(-1)
        per_doc.append(doc_lp[k] + sum(logp[t, y].item() for t, y in enumerate(candidate)))
    return math.log(sum(math.exp(s) for s in per_doc))


# ---------------------------------------------------------------- Seq2SeqGenerator: log-probs and losses


def test_answer_logprobs_and_losses_equal_direct_computation(bart):
    _, tok, model64 = bart
    generator, docs = seq2seq(bart), passages(3)
    with torch.no_grad():
        token_lp, mask = generator.answer_logprobs(QUESTIONS, docs, ANSWERS)
        losses = {m: generator.loss(QUESTIONS, docs, DOC_SCORES, ANSWERS, m).tolist() for m in ("token", "sequence")}
    lengths = [len(tok(text_target=a)["input_ids"]) for a in ANSWERS]
    assert lengths[0] != lengths[1]  # the shorter answer's labels are padded
    assert token_lp.shape == (2, 3, max(lengths)) and mask.sum(1).tolist() == lengths
    for b in range(2):
        rows = [direct_logprobs(model64, tok, p, ANSWERS[b]) for p in prompts_of(b, docs)]
        for k in range(3):
            assert token_lp[b, k, : lengths[b]].tolist() == pytest.approx(rows[k], abs=1e-4)
            assert not token_lp[b, k, lengths[b] :].any()  # padding contributes nothing
        for marginal, loss in losses.items():
            assert loss[b] == pytest.approx(rag_nll(rows, DOC_SCORES[b].tolist(), marginal), abs=1e-4)
    assert losses["token"] != pytest.approx(losses["sequence"])  # the two marginals differ


@torch.no_grad()
def direct_distributions(model64, tok, prompt: str, answer: str) -> tuple[list[int], torch.Tensor]:
    """The label tokens of `answer` and the (A, V) next-token log-probs at each of them, one prompt alone."""
    labels = tok(text_target=answer, return_tensors="pt")["input_ids"]
    decoder_input_ids = model64.prepare_decoder_input_ids_from_labels(labels=labels)
    logp = model64(**encode_alone(tok, prompt), decoder_input_ids=decoder_input_ids).logits[0].log_softmax(-1)
    return labels[0].tolist(), logp


def smoothed_rag_nll(dists: list[torch.Tensor], labels: list[int], scores: list[float], marginal: str, eps: float):
    """Label-smoothed RAG NLL per answer token, smoothing the marginal next-token distribution (transformers'
    RAG): at step t the mixture sum_k w_k(t) p_k(v), w = p(z|x) (token) or p(z | x, y_<t) (sequence)."""
    prior = torch.tensor(scores, dtype=torch.float64).softmax(0)
    total = 0.0
    for t, y in enumerate(labels):
        if marginal == "token":
            w = prior
        else:
            w = prior * torch.stack([d[:t, :].gather(1, torch.tensor(labels[:t])[:, None]).sum().exp() for d in dists])
            w = w / w.sum()
        mix = sum(w[k] * dists[k][t].exp() for k in range(len(dists)))
        total += -(1 - eps) * math.log(mix[y]) - eps * float(mix.log().mean())
    return total / len(labels)


@pytest.mark.parametrize("marginal", ["token", "sequence"])
def test_label_smoothing_smooths_the_marginal_not_each_passage(bart, marginal):
    _, tok, model64 = bart
    eps, docs = 0.1, passages(3)
    generator = seq2seq(bart, eps)
    with torch.no_grad():
        smoothed = generator.loss(QUESTIONS, docs, DOC_SCORES, ANSWERS, marginal, eps).tolist()
        plain = generator.loss(QUESTIONS, docs, DOC_SCORES, ANSWERS, marginal).tolist()
        token_lp, mask = generator.answer_logprobs(QUESTIONS, docs, ANSWERS)
    for b in range(2):
        out = [direct_distributions(model64, tok, p, ANSWERS[b]) for p in prompts_of(b, docs)]
        labels, dists = out[0][0], [d for _, d in out]
        rows = [[float(d[t, y]) for t, y in enumerate(labels)] for d in dists]
        assert smoothed[b] == pytest.approx(
            smoothed_rag_nll(dists, labels, DOC_SCORES[b].tolist(), marginal, eps), abs=1e-4
        )
        # Without smoothing (validation, test, teachers, decoding) the plain RAG NLL and log-probs, whatever the
        # generator's own label_smoothing.
        assert plain[b] == pytest.approx(rag_nll(rows, DOC_SCORES[b].tolist(), marginal), abs=1e-4)
        for k in range(3):
            assert token_lp[b, k, : len(labels)].tolist() == pytest.approx(rows[k], abs=1e-4)
    assert smoothed != pytest.approx(plain)


def test_passage_loglik_smooths_each_passage_alone(bart):
    """ralt and dalm score each passage alone (no mixture): there, label smoothing is the usual per-passage one."""
    _, tok, model64 = bart
    eps, docs = 0.1, passages(2)
    with torch.no_grad():
        smoothed = seq2seq(bart).passage_mean_loglik(QUESTIONS, docs, ANSWERS, eps)
        plain = seq2seq(bart, eps).passage_mean_loglik(QUESTIONS, docs, ANSWERS)
    for b in range(2):
        for k, prompt in enumerate(prompts_of(b, docs)):
            expected = direct_logprobs(model64, tok, prompt, ANSWERS[b], smoothing=eps)
            assert float(smoothed[b, k]) == pytest.approx(sum(expected) / len(expected), abs=1e-4)
            unsmoothed = direct_logprobs(model64, tok, prompt, ANSWERS[b])
            assert float(plain[b, k]) == pytest.approx(sum(unsmoothed) / len(unsmoothed), abs=1e-4)


# ---------------------------------------------------------------- Seq2SeqGenerator: decoding


@pytest.mark.parametrize(
    "model_fixture",
    [
        "bart",
        "early_eos_bart",
    ],
)
def test_token_generation_with_one_passage_is_plain_greedy(request, model_fixture):
    model, tok, _ = parts = request.getfixturevalue(model_fixture)
    docs = passages(1)
    answers = seq2seq(parts).generate(QUESTIONS, docs, torch.zeros(2, 1), max_new_tokens=6, marginal="token")
    for b, answer in enumerate(answers):
        # The tiny BART's generation config forces [SEP] at the last step: plain greedy must not.
        out = model.generate(
            **encode_alone(tok, prompts_of(b, docs)[0]),
            max_new_tokens=6,
            do_sample=False,
            num_beams=1,
            forced_eos_token_id=None,
            forced_bos_token_id=None,
            min_length=0,
        )
        expected = tok.decode(out[0], skip_special_tokens=True).strip()
        assert expected and answer == expected


def test_token_generation_decodes_the_marginal_over_passages(bart):
    _, tok, model64 = bart
    docs, steps = passages(3), 6
    answers = seq2seq(bart).generate(QUESTIONS, docs, DOC_SCORES, max_new_tokens=steps, marginal="token")
    real_choice = False
    for b, answer in enumerate(answers):
        prompts, doc_lp = prompts_of(b, docs), DOC_SCORES[b].double().log_softmax(0)
        generated = []
        for _ in range(steps):  # each step: argmax_y sum_k p(z_k|x) p(y | x, z_k, y_<t), every prompt alone
            logp = next_token_logprobs(model64, tok, prompts, generated)
            marginal = (doc_lp[:, None] + logp).logsumexp(0)
            real_choice |= len({int(logp[k].argmax()) for k in range(3)} | {int(marginal.argmax())}) > 1
            generated.append(int(marginal.argmax()))
            if generated[-1] == tok.sep_token_id:
                break
        assert answer == tok.decode(generated, skip_special_tokens=True).strip()
    assert real_choice, "some step must pick a token that some passage alone would not"


@pytest.mark.parametrize("model_fixture, num_beams", [("bart", 1), ("bart", 2), ("early_eos_bart", 1)])
def test_sequence_generation_keeps_the_most_likely_candidate(request, model_fixture, num_beams):
    model, tok, model64 = parts = request.getfixturevalue(model_fixture)
    docs, steps = passages(3), 6
    answers = seq2seq(parts).generate(QUESTIONS, docs, DOC_SCORES, steps, marginal="sequence", num_beams=num_beams)
    real_choice, lengths = False, set()
    for b, answer in enumerate(answers):
        prompts, doc_lp = prompts_of(b, docs), DOC_SCORES[b].double().log_softmax(0).tolist()
        # The candidates: each passage's own decoding, with the generator's generation config as it is.
        candidates = [
            cut_at_eos(
                model.generate(**encode_alone(tok, p), max_new_tokens=steps, do_sample=False, num_beams=num_beams)[
                    0, 1:
                ].tolist(),
                tok,
            )
            for p in prompts
        ]
        scores = [sequence_loglik(model64, tok, prompts, doc_lp, c) for c in candidates]
        real_choice |= len({tok.decode(c, skip_special_tokens=True) for c in candidates}) > 1
        lengths |= {len(c) for c in candidates}
        best = candidates[max(range(3), key=scores.__getitem__)]
        assert answer == tok.decode(best, skip_special_tokens=True).strip()
    assert real_choice, "the passages must propose different candidates"
    assert model_fixture == "bart" or len(lengths) > 1, "candidates of different lengths: a sum, not a mean"


# ---------------------------------------------------------------- RagModel: save and load


def make_generator(tiny_models, family: str):
    if family == "seq2seq":
        model = BartForConditionalGeneration.from_pretrained(tiny_models["generator"])
        tok = generator_tokenizer(tiny_models["generator"])
        return Seq2SeqGenerator(model, tok, "{question} || {title}: {text}", 100, label_smoothing=0.1)
    model = AutoModelForCausalLM.from_pretrained(tiny_models["causal_generator"])
    tok = AutoTokenizer.from_pretrained(tiny_models["causal_generator"])
    return CausalGenerator(model, tok, "{title}: {text}\n{question}\n", 200, label_smoothing=0.1)


def make_rag(tiny_models, encoders: str, family: str) -> RagModel:
    """DPR encoders as saved, or their transformers mean-pooled and compared by cosine (PooledEncoder)."""
    q_path, ctx_path = tiny_models["question_encoder"], tiny_models["context_encoder"]
    if encoders == "dpr":
        q_enc, ctx_enc = load_encoder(q_path, side="question"), load_encoder(ctx_path, side="context")
    else:
        q_enc = load_encoder(q_path, "mean", side="question", similarity="cosine")
        ctx_enc = load_encoder(ctx_path, "mean", side="context", similarity="cosine")
    ctx_tok = with_prefix(AutoTokenizer.from_pretrained(ctx_path), "passage: ")
    return RagModel(
        q_enc,
        AutoTokenizer.from_pretrained(q_path),
        make_generator(tiny_models, family),
        retriever=FakeRetriever(),
        n_docs=2,
        marginal="sequence",
        ctx_encoder=ctx_enc,
        ctx_tokenizer=ctx_tok,
        question_prefix="query: ",
    ).eval()


def question_batch(model: RagModel) -> tuple[torch.Tensor, torch.Tensor]:
    enc = model.question_tokenizer([model.question_prefix + q for q in QUESTIONS], padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


@torch.no_grad()
def outputs(model: RagModel) -> tuple[torch.Tensor, torch.Tensor, dict[str, list[str]]]:
    """The loss and doc scores on the test batch, and the answers under both marginals."""
    ids, mask = question_batch(model)
    loss, doc_scores = model(ids, mask, QUESTIONS, ANSWERS)
    answers = {}
    for marginal in ("token", "sequence"):
        model.marginal, saved = marginal, model.marginal
        answers[marginal] = model.generate(ids, mask, QUESTIONS, max_new_tokens=6)
        model.marginal = saved
    return loss, doc_scores, answers


@pytest.mark.parametrize("family", ["seq2seq", "causal"])
@pytest.mark.parametrize("encoders", ["dpr", "mean-cosine"])
def test_save_and_load_round_trip(tiny_models, tmp_path, encoders, family):
    model = make_rag(tiny_models, encoders, family)
    model.save_pretrained(tmp_path / "rag")
    loaded = RagModel.from_pretrained(tmp_path / "rag", retriever=FakeRetriever(), load_context_encoder=True).eval()

    assert loaded.settings() == model.settings()
    assert (loaded.n_docs, loaded.marginal, loaded.question_prefix) == (2, "sequence", "query: ")
    assert type(loaded.question_encoder) is type(model.question_encoder)
    assert type(loaded.ctx_encoder) is type(model.ctx_encoder)
    if encoders == "mean-cosine":
        for side in ("question_encoder", "ctx_encoder"):
            q, q0 = getattr(loaded, side), getattr(model, side)
            assert isinstance(q, PooledEncoder)
            assert (q.pooling, q.similarity, q.temperature) == ("mean", "cosine", q0.temperature)
        assert loaded.question_encoder.temperature == 0.05 and loaded.ctx_encoder.temperature is None
    else:
        assert isinstance(loaded.question_encoder, DPRQuestionEncoder)
    g, g0 = loaded.generator, model.generator
    assert type(g) is type(g0)
    assert (g.template, g.max_length, g.label_smoothing) == (g0.template, g0.max_length, 0.1)
    assert loaded.ctx_tokenizer.prefix == "passage: "

    loss, doc_scores, answers = outputs(model)
    loaded_loss, loaded_scores, loaded_answers = outputs(loaded)
    assert torch.allclose(loaded_scores, doc_scores, atol=1e-6)
    assert torch.allclose(loaded_loss, loss, atol=1e-6)
    assert loaded_answers == answers

    bare = RagModel.from_pretrained(
        tmp_path / "rag", retriever=FakeRetriever(), load_generator=False, load_context_encoder=False
    )
    assert bare.generator is None and bare.ctx_encoder is None
    assert bare.settings().n_docs == 2 and is_rag_checkpoint(str(tmp_path / "rag"))
    # By default, the context encoder comes back when the saved model's doc scores came from it.
    assert model.settings().doc_scores == "fresh"
    assert RagModel.from_pretrained(tmp_path / "rag", load_generator=False).ctx_encoder is not None


def test_round_trip_keeps_a_seq2seq_generator_without_template(tiny_models, tmp_path):
    model = make_rag(tiny_models, "dpr", "seq2seq")
    g = model.generator
    model.generator = Seq2SeqGenerator(g.model, g.tokenizer, None, g.max_length)
    assert model.generator.template == RAG_TEMPLATE  # transformers' RAG prompt, saved as such
    model.save_pretrained(tmp_path / "rag")
    loaded = RagModel.from_pretrained(tmp_path / "rag", retriever=FakeRetriever(), load_context_encoder=True).eval()
    docs = passages(1)
    assert loaded.generator.prompts(QUESTIONS, docs) == model.generator.prompts(QUESTIONS, docs)


# ---------------------------------------------------------------- RagModel: transformers' RAG checkpoints


@pytest.mark.parametrize("name, marginal", [("rag_token", "token"), ("rag_sequence", "sequence")])
def test_from_transformers_rag_checkpoint(tiny_models, name, marginal):
    path = str(tiny_models[name])
    model = RagModel.from_pretrained(path, retriever=FakeRetriever()).eval()
    assert is_rag_checkpoint(path) and not is_rag_checkpoint(str(tiny_models["generator"]))
    assert (model.marginal, model.n_docs, model.question_prefix) == (marginal, 3, "")
    assert isinstance(model.question_encoder, DPRQuestionEncoder) and model.ctx_encoder is None
    g = model.generator
    assert isinstance(g, Seq2SeqGenerator)
    assert g.template == RAG_TEMPLATE == "{title} / {text} // {question}"
    assert g.max_length == RagConfig.from_pretrained(path).max_combined_length == 128
    docs, tiny_bart = passages(2), Seq2SeqGenerator.from_pretrained(str(tiny_models["generator"])).eval()
    with torch.no_grad():  # the very BART it was built from
        expected = tiny_bart.loss(QUESTIONS, docs, DOC_SCORES[:, :2], ANSWERS, marginal)
        assert torch.allclose(g.loss(QUESTIONS, docs, DOC_SCORES[:, :2], ANSWERS, marginal), expected, atol=1e-6)

    changed = RagModel.from_pretrained(path, load_generator=False, n_docs=2, marginal="token")
    assert (changed.n_docs, changed.marginal, changed.generator) == (2, "token", None)


def test_sequence_generation_with_a_tokenizer_that_returns_token_type_ids(tiny_models):
    """The tiny rag_sequence checkpoint's generator tokenizer is BERT-style (it returns token_type_ids)."""
    model = RagModel.from_pretrained(str(tiny_models["rag_sequence"]), retriever=FakeRetriever()).eval()
    assert "token_type_ids" in model.generator.tokenizer("a question")
    answers = model.generate(*question_batch(model), QUESTIONS, max_new_tokens=4)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


def test_the_references_setters_make_the_context_encoder_train(tiny_models):
    """transformers' `set_context_encoder_for_training` and the retriever's `set_ctx_encoder_tokenizer`, as the
    reference's users call them: the doc scores then come from the context encoder, and its weights get a gradient."""
    model = make_rag(tiny_models, "dpr", "seq2seq")
    ctx_encoder, ctx_tokenizer = model.ctx_encoder, model.ctx_tokenizer
    model.ctx_encoder = model.ctx_tokenizer = None  # a model scoring with the KB's stored vectors
    assert model.settings().doc_scores == "stored"
    model.set_context_encoder_for_training(ctx_encoder)
    with pytest.raises(ValueError, match="set_ctx_encoder_tokenizer"):
        model(*question_batch(model), QUESTIONS, ANSWERS)
    model.set_ctx_encoder_tokenizer(ctx_tokenizer)
    loss, _ = model.train()(*question_batch(model), QUESTIONS, ANSWERS)
    loss.mean().backward()
    grads = [p.grad for p in ctx_encoder.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    assert model.settings().doc_scores == "fresh"
