"""causal_rag.py on tiny random models: prompts, answer-only labels, the RAG marginals against a direct
computation, gradients end to end, and greedy generation."""

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    DPRConfig,
    DPRContextEncoder,
    DPRQuestionEncoder,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from rag_end2end.model.causal import (
    IGNORE,
    build_prompts,
    encode_prompts,
    rag_sequence_loss,
    rag_token_loss,
    tokenize_for_loss,
    truncate_left,
)
from rag_end2end.model.marginals import marginal_nll
from rag_end2end.model.rag import CausalGenerator, RagModel

pytestmark = pytest.mark.usefixtures("one_thread")

KB = [
    ("Paris", "Paris is the capital and largest city of France."),
    ("Berlin", "Berlin is the capital of Germany, on the river Spree."),
    ("Rome", "Rome was founded, legend says, by Romulus and Remus."),
    ("Oslo", "Oslo is the capital of Norway, at the end of a fjord."),
]
QUESTIONS = ["what is the capital of France?", "who founded Rome?"]
ANSWERS = ["Paris", "Romulus and Remus"]
HIDDEN = 32


def make_tokenizer(pad: bool = True) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (as Llama 3, SmolLM2, GPT-NeoX) trained on the texts above."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<eos>", "<unk>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    corpus = [f"Context: {t} / {x}\nQuestion: {q}\nAnswer: {a}" for t, x in KB for q, a in zip(QUESTIONS, ANSWERS)]
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>", **({"pad_token": "<pad>"} if pad else {})
    )


class FakeRetriever:
    """Question i gets passages i, i+1, ... of KB, with fixed random stored embeddings."""

    def __init__(self):
        self.embeds = np.random.default_rng(0).standard_normal((len(KB), HIDDEN)).astype(np.float32)

    def retrieve(self, q: np.ndarray, n_docs: int, embeddings: bool = True):
        ids = np.array([[(i + k) % len(KB) for k in range(n_docs)] for i in range(len(q))])
        docs = [{"title": [KB[j][0] for j in row], "text": [KB[j][1] for j in row]} for row in ids]
        return self.embeds[ids], ids, docs


@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(0)
    tok = make_tokenizer()
    generator = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=HIDDEN,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=256,
            initializer_range=0.2,
            bos_token_id=None,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
    ).eval()
    dpr = DPRConfig(
        vocab_size=len(tok),
        hidden_size=HIDDEN,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=256,
        projection_dim=0,
    )
    # absolute positions, unlike Llama's rotary ones: left padding must not shift them
    gpt2 = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=len(tok),
            n_embd=HIDDEN,
            n_layer=2,
            n_head=2,
            n_positions=256,
            initializer_range=0.2,
            bos_token_id=None,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
    ).eval()
    # eval(): no dropout, so that two retrievals of one batch give the same doc scores
    return {
        "tok": tok,
        "generator": generator,
        "gpt2": gpt2,
        "q_enc": DPRQuestionEncoder(dpr).eval(),
        "ctx_enc": DPRContextEncoder(dpr).eval(),
    }


def make_rag(parts, n_docs=2, mode="token", end2end=False, generator="generator") -> RagModel:
    return RagModel(
        parts["q_enc"],
        parts["tok"],
        CausalGenerator(parts[generator], parts["tok"]),
        FakeRetriever(),
        n_docs=n_docs,
        marginal=mode,
        ctx_encoder=parts["ctx_enc"] if end2end else None,
        ctx_tokenizer=parts["tok"] if end2end else None,
    )


def questions_batch(tok, questions=QUESTIONS):
    enc = tok(questions, padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def loss_batch(tok, n_docs=2, max_length=512):
    docs = FakeRetriever().retrieve(np.zeros((len(QUESTIONS), HIDDEN)), n_docs)[2]
    prompts = build_prompts(QUESTIONS, docs, tok, None, n_docs)
    return tokenize_for_loss(prompts, ANSWERS, tok, max_length)


# ---------------------------------------------------------------- prompts and labels


def test_build_prompts_question_major_and_chat_template(parts):
    tok = copy.deepcopy(parts["tok"])
    docs = FakeRetriever().retrieve(np.zeros((2, HIDDEN)), 3)[2]
    prompts = build_prompts(QUESTIONS, docs, tok, None, 2)
    assert prompts[1] == f"Context: Berlin / {KB[1][1]}\nQuestion: {QUESTIONS[0]}\nAnswer:"
    assert [p.split(" /")[0][len("Context: ") :] for p in prompts] == ["Paris", "Berlin", "Berlin", "Rome"]
    assert build_prompts(QUESTIONS[:1], docs[:1], tok, "{title}|{question}", 2) == [
        f"Paris|{QUESTIONS[0]}",
        f"Berlin|{QUESTIONS[0]}",
    ]
    tok.chat_template = "{% for m in messages %}<user>{{ m['content'] }}{% endfor %}<assistant>"
    assert build_prompts(QUESTIONS[:1], docs[:1], tok, None, 1) == [f"<user>{prompts[0]}<assistant>"]
    assert build_prompts(QUESTIONS[:1], docs[:1], tok, "{title}", 1) == ["Paris"]  # an explicit template wins


def test_tokenize_for_loss_labels_the_answer_only(parts):
    tok = parts["tok"]
    batch = loss_batch(tok)
    for ids, mask, labels, answer in zip(
        batch["input_ids"], batch["attention_mask"], batch["labels"], [a for a in ANSWERS for _ in range(2)]
    ):
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any()  # right padding
        assert (ids[n:] == tok.pad_token_id).all() and (labels[n:] == IGNORE).all()
        answer_pos = (labels != IGNORE).nonzero().squeeze(1)
        assert answer_pos.tolist() == list(range(answer_pos[0], n))  # a contiguous answer at the end
        assert (labels[answer_pos] == ids[answer_pos]).all()
        assert tok.decode(ids[answer_pos]) == f" {answer}<eos>"
        assert tok.decode(ids[: answer_pos[0]]).endswith("\nAnswer:")


def test_tokenize_for_loss_truncates_prompt_from_the_left_and_pads_with_eos(parts):
    tok = make_tokenizer(pad=False)
    full = loss_batch(tok)
    short = loss_batch(tok, max_length=20)
    assert short["input_ids"].shape[1] == 20
    for row in range(len(full["input_ids"])):
        f_ids = full["input_ids"][row][full["attention_mask"][row].bool()]
        s_ids = short["input_ids"][row][short["attention_mask"][row].bool()]
        assert s_ids.tolist() == f_ids[-len(s_ids) :].tolist()  # the tail of the prompt, the whole answer
        assert (short["labels"][row] != IGNORE).sum() == (full["labels"][row] != IGNORE).sum()
    assert (full["input_ids"][0][~full["attention_mask"][0].bool()] == tok.eos_token_id).all()
    with pytest.raises(ValueError, match="split evenly"):
        tokenize_for_loss(["a", "b", "c"], ["x", "y"], tok, 10)


def test_truncate_left_keeps_bos():
    assert truncate_left([1, 5, 6, 7, 8], 3, bos_id=1) == [1, 7, 8]
    assert truncate_left([5, 6, 7, 8], 3, bos_id=1) == [6, 7, 8]
    assert truncate_left([1, 5], 3, bos_id=1) == [1, 5]


# ---------------------------------------------------------------- losses


def direct_losses(generator, batch, doc_scores, n_docs) -> tuple[list[float], list[float]]:
    """RAG-token and RAG-sequence per-token NLL, one unpadded prompt at a time, loops in float64 Python."""
    gen = copy.deepcopy(generator).double()
    token_lp = []  # token_lp[row][t] = log p(y_t | x, z, y_<t)
    for ids, mask, labels in zip(batch["input_ids"], batch["attention_mask"], batch["labels"]):
        ids, labels = ids[mask.bool()], labels[mask.bool()]
        with torch.no_grad():
            logp = gen(ids[None]).logits[0].log_softmax(-1)
        token_lp.append([logp[t - 1, ids[t]].item() for t in range(len(ids)) if labels[t] != IGNORE])
    token_losses, seq_losses = [], []
    for b, scores in enumerate(doc_scores.double().tolist()):
        norm = math.log(sum(math.exp(s) for s in scores))
        doc_lp = [s - norm for s in scores]
        rows = token_lp[b * n_docs : (b + 1) * n_docs]
        length = len(rows[0])
        per_token = [math.log(sum(math.exp(doc_lp[k] + rows[k][t]) for k in range(n_docs))) for t in range(length)]
        token_losses.append(-sum(per_token) / length)
        seq_losses.append(-math.log(sum(math.exp(doc_lp[k] + sum(rows[k])) for k in range(n_docs))) / length)
    return token_losses, seq_losses


def test_losses_equal_direct_computation(parts):
    tok, generator = parts["tok"], parts["generator"]
    batch = loss_batch(tok)  # two questions, two passages each, answers of different lengths
    assert len({int((row != IGNORE).sum()) for row in batch["labels"]}) == 2
    doc_scores = torch.tensor([[0.3, -1.2], [2.0, 0.5]])
    expected_token, expected_seq = direct_losses(generator, batch, doc_scores, 2)
    with torch.no_grad():
        logits = copy.deepcopy(generator).double()(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits32 = generator(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    for loss_fn, expected in ((rag_token_loss, expected_token), (rag_sequence_loss, expected_seq)):
        assert loss_fn(logits, batch["labels"], doc_scores, 2).tolist() == pytest.approx(expected, abs=1e-5)
        assert loss_fn(logits32, batch["labels"], doc_scores, 2).tolist() == pytest.approx(expected, abs=1e-4)
    assert expected_token != pytest.approx(expected_seq)  # the two marginals differ


@pytest.mark.parametrize("loss_fn", [rag_token_loss, rag_sequence_loss])
def test_loss_depends_on_answer_positions_only(parts, loss_fn):
    batch = loss_batch(parts["tok"])
    logits = torch.randn(*batch["input_ids"].shape, len(parts["tok"]), requires_grad=True)
    doc_scores = torch.randn(2, 2)
    loss_fn(logits, batch["labels"], doc_scores, 2).sum().backward()
    predicts_answer = batch["labels"][:, 1:] != IGNORE  # the logits at t predict the token at t + 1
    assert torch.equal(logits.grad[:, :-1].abs().sum(-1) > 0, predicts_answer)
    assert not logits.grad[:, -1].any()
    with torch.no_grad():  # so any change of the other logits leaves the loss as it is
        other = torch.cat([~predicts_answer, torch.ones_like(predicts_answer[:, :1])], 1)
        changed = logits + 10 * torch.randn_like(logits) * other[:, :, None]
        assert torch.equal(
            loss_fn(changed, batch["labels"], doc_scores, 2), loss_fn(logits, batch["labels"], doc_scores, 2)
        )


@pytest.mark.parametrize("loss_fn", [rag_token_loss, rag_sequence_loss])
def test_one_passage_loss_is_mean_cross_entropy_over_answer_tokens(parts, loss_fn):
    batch = loss_batch(parts["tok"], n_docs=1)
    logits = torch.randn(*batch["input_ids"].shape, len(parts["tok"]))
    token_ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], reduction="none")
    expected = token_ce.sum(1) / (batch["labels"] != IGNORE).sum(1)
    assert torch.allclose(loss_fn(logits, batch["labels"], torch.zeros(2, 1), 1), expected, atol=1e-5)


def test_different_answers_across_passages_raise(parts):
    labels = torch.tensor([[IGNORE, IGNORE, 5, 6], [IGNORE, 5, 7, IGNORE]])
    with pytest.raises(ValueError, match="differ between the passages"):
        rag_token_loss(torch.randn(2, 4, 10), labels, torch.zeros(1, 2), 2)


# ---------------------------------------------------------------- the module


@pytest.mark.parametrize("end2end", [False, True])
def test_doc_scores_are_question_passage_dot_products(parts, end2end):
    tok = parts["tok"]
    rag = make_rag(parts, n_docs=3, end2end=end2end)
    q_ids, q_mask = questions_batch(tok)
    with torch.no_grad():
        r = rag.retrieve(q_ids, q_mask)
        scores, docs = r.doc_scores, r.docs
        q = parts["q_enc"](q_ids, attention_mask=q_mask).pooler_output
        stored = torch.from_numpy(FakeRetriever().retrieve(q.numpy(), 3)[0])
        for b, k in np.ndindex(2, 3):
            if end2end:  # one passage alone, unpadded: the fresh embedding
                ids = tok(docs[b]["title"][k], docs[b]["text"][k], return_tensors="pt")["input_ids"]
                d = parts["ctx_enc"](ids).pooler_output[0]
            else:
                d = stored[b, k]
            assert scores[b, k].item() == pytest.approx((q[b] @ d).item(), abs=1e-4)


@pytest.mark.parametrize("mode", ["token", "sequence"])
def test_forward_loss_equals_loss_over_full_logits(parts, mode):
    rag = make_rag(parts, mode=mode)
    q_ids, q_mask = questions_batch(parts["tok"])
    with torch.no_grad():
        loss, doc_scores = rag(q_ids, q_mask, QUESTIONS, ANSWERS)
        batch = loss_batch(parts["tok"])
        logits = parts["generator"](batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = (rag_token_loss if mode == "token" else rag_sequence_loss)(logits, batch["labels"], doc_scores, 2)
    assert doc_scores.shape == (2, 2)
    assert loss.tolist() == pytest.approx(expected.tolist(), abs=1e-5)  # one loss per question


@pytest.mark.parametrize("end2end", [True, False])
def test_gradients_reach_the_trained_parts(parts, end2end):
    rag = make_rag(parts, mode="sequence", end2end=end2end)
    rag.zero_grad(set_to_none=True)
    parts["ctx_enc"].zero_grad(set_to_none=True)
    q_ids, q_mask = questions_batch(parts["tok"])
    rag(q_ids, q_mask, QUESTIONS, ANSWERS)[0].mean().backward()
    for name in ("q_enc", "generator") + (("ctx_enc",) if end2end else ()):
        no_grad = [n for n, p in parts[name].named_parameters() if p.grad is None or not p.grad.any()]
        assert not no_grad, f"{name}: no gradient for {no_grad}"
    if not end2end:
        assert all(p.grad is None for p in parts["ctx_enc"].parameters())


@pytest.mark.parametrize("mode", ["token", "sequence"])
def test_generate_returns_strings(parts, mode):
    rag = make_rag(parts, n_docs=3, mode=mode)
    answers = rag.generate(*questions_batch(parts["tok"]), QUESTIONS, max_new_tokens=5)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


@pytest.mark.parametrize("name", ["generator", "gpt2"])
@pytest.mark.parametrize("mode", ["token", "sequence"])
def test_one_passage_generation_is_plain_greedy(parts, mode, name):
    tok, generator = parts["tok"], parts[name]
    rag = make_rag(parts, n_docs=1, mode=mode, generator=name)
    answers = rag.generate(*questions_batch(tok), QUESTIONS, max_new_tokens=8)
    docs = FakeRetriever().retrieve(np.zeros((2, HIDDEN)), 1)[2]
    for prompt_ids, answer in zip(encode_prompts(build_prompts(QUESTIONS, docs, tok, None, 1), tok), answers):
        out = generator.generate(torch.tensor([prompt_ids]), max_new_tokens=8, do_sample=False)
        assert answer == tok.decode(out[0, len(prompt_ids) :], skip_special_tokens=True).strip()


@pytest.mark.parametrize("mode", ["token", "sequence"])
def test_generation_stops_at_eos(parts, mode):
    tok, generator = make_tokenizer(), parts["generator"]
    docs = FakeRetriever().retrieve(np.zeros((2, HIDDEN)), 1)[2]
    prompt_ids = encode_prompts(build_prompts(QUESTIONS, docs, tok, None, 1), tok)
    first = torch.tensor(prompt_ids[:1])
    greedy = generator.generate(first, max_new_tokens=8, do_sample=False)[0, first.shape[1] :]
    tok.eos_token = tok.convert_ids_to_tokens(int(greedy[2]))  # a token the model emits at the third step
    rag = RagModel(parts["q_enc"], tok, CausalGenerator(generator, tok), FakeRetriever(), n_docs=1, marginal=mode)
    answers = rag.generate(*questions_batch(tok), QUESTIONS, max_new_tokens=8)
    for b, (p, answer) in enumerate(zip(prompt_ids, answers)):
        out = generator.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False, eos_token_id=tok.eos_token_id)
        assert answer == tok.decode(out[0, len(p) :], skip_special_tokens=True).strip()
        assert b > 0 or len(out[0]) - len(p) <= 3  # the first question stops early, the second may not


def generate_with_prompts(parts, mode: str) -> tuple[list[str], torch.Tensor, list[list[int]]]:
    """RagModel's answers (3 passages, 6 new tokens), its doc scores and every (question, passage) prompt's
    ids, question-major: what a direct re-computation of its decoding starts from."""
    tok = parts["tok"]
    rag = make_rag(parts, n_docs=3, mode=mode)
    q_ids, q_mask = questions_batch(tok)
    answers = rag.generate(q_ids, q_mask, QUESTIONS, max_new_tokens=6)
    with torch.no_grad():
        r = rag.retrieve(q_ids, q_mask)
        doc_scores, docs = r.doc_scores, r.docs
    return answers, doc_scores, encode_prompts(build_prompts(QUESTIONS, docs, tok, None, 3), tok)


def test_token_generation_equals_marginal_decoding_without_cache(parts):
    tok, generator = parts["tok"], parts["generator"]
    answers, doc_scores, all_prompt_ids = generate_with_prompts(parts, "token")
    for b, answer in enumerate(answers):
        generated = []
        for _ in range(6):  # each step: every passage's prompt + the tokens so far, alone, from scratch
            with torch.no_grad():
                logp = torch.stack(
                    [
                        generator(torch.tensor([p + generated])).logits[0, -1].log_softmax(-1)
                        for p in all_prompt_ids[b * 3 : (b + 1) * 3]
                    ]
                )
            generated.append(int((doc_scores[b].log_softmax(0)[:, None] + logp).logsumexp(0).argmax()))
            if generated[-1] == tok.eos_token_id:
                break
        assert answer == tok.decode(generated, skip_special_tokens=True).strip()


def sequence_log_likelihood(generator, prompt_ids: list[list[int]], doc_lp: torch.Tensor, cand: list[int]) -> float:
    """log sum_k p(z_k|x) prod_t p(y_t | x, z_k, y_<t), one passage at a time."""
    per_doc = []
    for k, p in enumerate(prompt_ids):
        with torch.no_grad():
            logp = generator(torch.tensor([p + cand])).logits[0, len(p) - 1 : -1].log_softmax(-1)
        per_doc.append(doc_lp[k] + logp.gather(1, torch.tensor(cand)[:, None]).sum())
    return torch.stack(per_doc).logsumexp(0).item()


def test_sequence_generation_keeps_the_most_likely_candidate(parts):
    tok, generator = parts["tok"], parts["generator"]
    answers, doc_scores, all_prompt_ids = generate_with_prompts(parts, "sequence")
    for b, answer in enumerate(answers):
        prompt_ids = all_prompt_ids[b * 3 : (b + 1) * 3]
        candidates = [
            generator.generate(torch.tensor([p]), max_new_tokens=6, do_sample=False)[0, len(p) :].tolist()
            for p in prompt_ids
        ]
        assert b > 0 or len(set(map(tuple, candidates))) > 1  # a real choice
        doc_lp = doc_scores[b].log_softmax(0)
        best = max(candidates, key=lambda c: sequence_log_likelihood(generator, prompt_ids, doc_lp, c))
        assert answer == tok.decode(best, skip_special_tokens=True).strip()


# ---------------------------------------------------------------- label smoothing of the marginal, by hand


def test_label_smoothing_smooths_the_mixture_not_each_passage():
    """Two passages, each giving the one-token answer (token 0) p = 0.5, with equal doc scores: the marginal
    is [0.5, 0.375, 0.125] whichever passage is confident about the rest, so p(z|x,y) stays 0.5 / 0.5.
    Smoothing each passage inside the log-sum-exp instead would weigh them 0.30 / 0.70."""
    eps = 0.1
    probs = torch.tensor([[[[0.5, 0.5, 1e-12]], [[0.5, 0.25, 0.25]]]], dtype=torch.float64)  # (B=1, n=2, A=1, V=3)
    vocab_lp = probs.log()
    token_lp, mask = vocab_lp[..., 0], torch.ones(1, 1, dtype=torch.bool)
    doc_scores = torch.zeros(1, 2, dtype=torch.float64, requires_grad=True)
    mixture = [0.5, 0.375, 0.125]
    expected = -(1 - eps) * math.log(0.5) - eps * sum(math.log(p) for p in mixture) / 3
    for marginal in ("token", "sequence"):  # one answer token: the two marginals coincide
        loss = marginal_nll(token_lp, mask, doc_scores, marginal, eps, vocab_lp)
        assert float(loss) == pytest.approx(expected, rel=1e-6)
    # The posterior the NLL term implies is exactly uniform: its gradient on the doc scores is zero.
    nll = marginal_nll(token_lp, mask, doc_scores, "token")
    (grad,) = torch.autograd.grad(nll, doc_scores)
    assert grad.abs().max() < 1e-12
    # What per-passage smoothing would have given: the confident passage loses most of the posterior.
    per_passage = (1 - eps) * token_lp + eps * vocab_lp.mean(-1)
    posterior = per_passage[0, :, 0].softmax(0).tolist()
    assert posterior == pytest.approx([0.30, 0.70], abs=0.01)
    with pytest.raises(ValueError, match="vocab_lp"):
        marginal_nll(token_lp, mask, doc_scores, "token", eps)


def test_sequence_smoothing_weighs_passages_by_the_answer_so_far():
    """RAG-sequence's next-token distribution at step t mixes the passages by p(z | x, y_<t): after a first
    token only passage 0 explains, the second step's smoothing is (almost) passage 0's alone."""
    eps = 0.2
    p0 = torch.tensor([[0.9, 0.05, 0.05], [0.1, 0.8, 0.1]], dtype=torch.float64)  # passage 0: y = (0, 1) likely
    p1 = torch.tensor([[1e-6, 0.5, 0.5 - 1e-6], [1 / 3, 1 / 3, 1 / 3]], dtype=torch.float64)
    vocab_lp = torch.stack([p0, p1])[None].log()  # (1, 2, 2, 3)
    labels = torch.tensor([0, 1])
    token_lp = vocab_lp.gather(-1, labels.view(1, 1, 2, 1).expand(1, 2, 2, 1)).squeeze(-1)
    mask = torch.ones(1, 2, dtype=torch.bool)
    doc_scores = torch.zeros(1, 2, dtype=torch.float64)
    w1 = torch.tensor([0.5 * 0.9, 0.5 * 1e-6], dtype=torch.float64)
    w1 = w1 / w1.sum()
    steps = [0.5 * p0[0] + 0.5 * p1[0], w1[0] * p0[1] + w1[1] * p1[1]]
    nll = -math.log(0.5 * 0.9 * 0.8 + 0.5 * 1e-6 * (1 / 3))
    smooth = -sum(float(s.log().mean()) for s in steps)
    expected = ((1 - eps) * nll + eps * smooth) / 2
    assert float(marginal_nll(token_lp, mask, doc_scores, "sequence", eps, vocab_lp)) == pytest.approx(expected)
