"""Every --training_mode on tiny models with an in-process retriever (no Ray): what trains and nothing else,
that the loss falls, that checkpoints reload in eval_rag.py; the recipes' losses against direct computations."""

import json
import math
import random
import shutil
from pathlib import Path

import pytest
import torch
from device_probe import HostTensorProbe

from rag_end2end.evaluation import evaluate as eval_rag
from rag_end2end.kb import search as kb_search
from rag_end2end.model.encoders import load_encoder, load_tokenizer
from rag_end2end.model.rag import RagModel
from rag_end2end.recipes import (
    MODES,
    Positives,
    distillation_kl,
    entropy,
    gather_candidates,
    infonce,
    mine,
    teacher_loglik,
)
from rag_end2end.training import finetune as finetune_rag

pytestmark = pytest.mark.usefixtures("one_thread")
DUMMY_DATA = Path(__file__).resolve().parents[1] / "test_run" / "dummy-train-data"
HIDDEN = 32  # test_run/make_tiny_models.py
# What each recipe trains, written out here rather than read from training_modes.py.
TRAINS = {
    "rag_end2end": {"question_encoder", "ctx_encoder", "generator"},
    "rag_original": {"question_encoder", "generator"},
    "retriever_only": {"question_encoder", "ctx_encoder"},
    "dalm": {"question_encoder", "ctx_encoder", "generator"},
    "lsr": {"question_encoder", "ctx_encoder"},
    "ralt": {"generator"},
}


@pytest.fixture
def gold_data(tmp_path) -> Path:
    """The dummy QA set with a gold passage per question (line i: passage i % 8 of the 40)."""
    data = tmp_path / "data"
    shutil.copytree(DUMMY_DATA, data)
    for split in ("train", "val", "test"):
        n = len((data / f"{split}.source").read_text().splitlines())
        rows = [json.dumps({"answers": ["x"], "gold_passage_ids": [i % 8]}) for i in range(n)]
        (data / f"{split}.gold.jsonl").write_text("\n".join(rows) + "\n")
    return data


@pytest.fixture
def make_module(finetune_argv, tiny_models, tiny_kb):
    def make(mode: str, *extra: str, data: Path | None = None, causal: bool = False):
        argv = finetune_argv("--training_mode", mode, "--hard_negatives", "2", "--n_docs", "3", *extra)
        i = argv.index("--model_name_or_path")
        generator = tiny_models["causal_generator" if causal else "generator"]
        question_encoder = (
            [] if "--init_from" in extra else ["--question_encoder_name_or_path", str(tiny_models["question_encoder"])]
        )
        argv[i : i + 2] = [
            *question_encoder,
            "--generator_name_or_path",
            str(generator),
            "--generator_type",
            "causal" if causal else "seq2seq",
        ]
        if data is not None:
            argv[argv.index("--data_dir") + 1] = str(data)
        passages, index = tiny_kb
        torch.manual_seed(0)
        args = finetune_rag.parse_args(argv)
        return finetune_rag.GenerativeQAModule(args, kb_search.KBSearch(str(passages), str(index), HIDDEN))

    return make


def _batch(module, n: int = 4) -> dict:
    return next(iter(module._dataloader("train", n, shuffle=False)))


def _parts(module) -> dict:
    model = module.model
    return {"question_encoder": model.question_encoder, "ctx_encoder": model.ctx_encoder, "generator": model.generator}


@pytest.mark.parametrize("mode", sorted(MODES))
def test_gradients_reach_exactly_the_parts_the_mode_trains(make_module, gold_data, mode):
    module = make_module(mode, data=gold_data, causal=mode == "dalm")
    module.training_step(_batch(module), 0).backward()
    for name, part in _parts(module).items():
        if part is None:
            assert name not in TRAINS[mode], f"{mode}: {name} is not even loaded"
            continue
        params = list(part.parameters())
        if name in TRAINS[mode]:
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params), f"{mode}: no gradient in {name}"
        else:
            assert not any(p.requires_grad or p.grad is not None for p in params), f"{mode}: {name} should be frozen"
    assert (module.model.generator is None) == (mode == "retriever_only")
    assert module.objective.refreshes == ("ctx_encoder" in TRAINS[mode])


# Each recipe, and the variants that take other code paths: both InfoNCE directions, the LM teacher and Atlas's
# re-ranking, RAG-sequence with label smoothing of the marginal, decoder-only generators.
DEVICE_CASES = [
    *((mode, (), mode == "dalm") for mode in sorted(MODES)),
    ("retriever_only", ("--symmetric_infonce",), False),
    ("rag_end2end", ("--retriever_loss", "pdist", "--rerank_top", "5"), True),
    ("rag_end2end", ("--model_type", "rag_sequence", "--label_smoothing", "0.1"), False),
    ("rag_original", ("--model_type", "rag_sequence", "--label_smoothing", "0.1"), True),
]


@pytest.mark.parametrize(("mode", "extra", "causal"), DEVICE_CASES)
def test_every_tensor_a_recipe_makes_follows_the_device_of_its_inputs(make_module, gold_data, mode, extra, causal):
    """A tensor made without `device=` is on the CPU of a GPU run, and CUDA refuses an op that mixes it with the
    GPU's tensors (retriever_only and dalm crashed at their first CUDA step). HostTensorProbe shows that on the
    CPU: the model and the batch stand for GPU tensors, what a factory makes without a device for CPU ones."""
    module = make_module(mode, *extra, data=gold_data, causal=causal)
    batch = _batch(module)  # made before the probe: as Lightning moved it, "on the GPU"
    with HostTensorProbe() as probe:
        module.training_step(batch, 0).backward()
        if module.model.generator is not None:  # validation and test decode
            with torch.no_grad():
                module.model.generate(batch["input_ids"], batch["attention_mask"], batch["source_text"], 4)
    assert probe.host_made > 0  # the probe saw the tokenizers' CPU tensors
    assert probe.mixed == [], f"{mode} {extra}: ops that mix CPU and GPU tensors on a GPU run: {probe.mixed}"


@pytest.mark.parametrize("mode", sorted(MODES))
def test_loss_falls_over_a_few_steps(make_module, gold_data, mode):
    module = make_module(mode, data=gold_data, causal=mode == "dalm")
    module.model.eval()  # no dropout: one batch, one loss
    if mode == "lsr":  # a random generator likes every passage alike (to 1e-5): judge them by length instead
        module.model.generator.passage_mean_loglik = lambda q, docs, a: torch.tensor(
            [[len(t) / 100 for t in d["text"]] for d in docs]
        )
    batch = _batch(module)
    optimizer = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=3e-3)

    def loss() -> torch.Tensor:
        return module.objective.loss(module.model, batch, module._mined(batch, "train"))[0]

    with torch.no_grad():
        before = float(loss())
    for _ in range(8):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    with torch.no_grad():
        after = float(loss())
    assert after < before, f"{mode}: {before:.4f} -> {after:.4f}"


@pytest.mark.parametrize("mode", sorted(MODES))
def test_checkpoints_reload_in_eval_rag(make_module, gold_data, mode, tmp_path):
    module = make_module(mode, data=gold_data)
    module.training_step(_batch(module), 0).backward()
    with torch.no_grad():  # a step, so the saved weights are not the ones training started from
        for p in module.parameters():
            if p.grad is not None:
                p -= 0.1 * p.grad
    ckpt = tmp_path / "checkpoint1"
    module.save_hf_checkpoint(ckpt)
    questions = (gold_data / "test.source").read_text().splitlines()
    common = [
        "--model_name_or_path",
        str(ckpt),
        "--evaluation_set",
        str(gold_data / "test.source"),
        "--n_docs",
        "3",
        "--eval_batch_size",
        "4",
    ]
    preds = tmp_path / "retrieval.txt"
    gold = str(gold_data / "test.gold.jsonl")
    eval_rag.main(
        eval_rag.parse_args(
            [*common, "--eval_mode", "retrieval", "--gold_data_path", gold, "--predictions_path", str(preds)]
        )
    )
    lines = preds.with_name("retrieval.ids.txt").read_text().splitlines()
    got = [list(map(int, line.split("\t")))[:3] for line in lines]
    model = module.model.eval()
    enc = model.question_tokenizer(questions, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = model.retrieve(enc["input_ids"], enc["attention_mask"]).ids.tolist()
    assert got == expected
    if model.generator is None:
        return
    preds = tmp_path / "answers.txt"
    targets = str(gold_data / "test.target")
    eval_rag.main(
        eval_rag.parse_args(
            [
                *common,
                "--gold_data_path",
                targets,
                "--predictions_path",
                str(preds),
                "--max_length",
                "5",
                "--num_beams",
                "1",
            ]
        )
    )
    with torch.no_grad():
        answers = model.generate(enc["input_ids"], enc["attention_mask"], questions, 5)
    assert preds.read_text().splitlines() == [" ".join(a.split()) for a in answers]


# ---------------------------------------------------------------- the losses, by hand


def test_distillation_kl_equals_a_direct_computation():
    scores = [[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]]
    loglik = [[-0.5, -2.0, -1.0], [-3.0, -1.0, -1.5]]
    tau = 0.5

    def softmax(xs):
        z = sum(math.exp(x) for x in xs)
        return [math.exp(x) / z for x in xs]

    expected = 0.0
    for s, ll in zip(scores, loglik):
        p_r, p_lm = softmax(s), softmax([x / tau for x in ll])
        expected += sum(t * math.log(t / r) for t, r in zip(p_lm, p_r)) / len(scores)
    s = torch.tensor(scores, requires_grad=True)
    ll = torch.tensor(loglik, requires_grad=True)
    kl = distillation_kl(s, ll, tau)
    assert float(kl) == pytest.approx(expected, rel=1e-6)
    kl.backward()
    assert s.grad.abs().sum() > 0 and ll.grad is None  # the LM side is a fixed target


def test_infonce_equals_a_direct_computation_and_skips_copies_of_the_positive():
    q = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    p = torch.tensor([[0.5, 0.5], [1.0, -1.0], [2.0, 0.0]])
    owner = torch.tensor([10, 20, 10])  # column 2 is another copy of question 0's positive
    positive = torch.tensor([0, 1])
    s = (q @ p.T).tolist()
    q0 = -s[0][0] + math.log(math.exp(s[0][0]) + math.exp(s[0][1]))  # column 2 masked for question 0
    q1 = -s[1][1] + math.log(sum(math.exp(x) for x in s[1]))
    assert float(infonce(q, p, owner, positive)) == pytest.approx((q0 + q1) / 2, rel=1e-6)
    by_passage = [[s[0][0], s[1][0]], [s[0][1], s[1][1]]]  # positive of question i against each question
    p0 = -by_passage[0][0] + math.log(sum(math.exp(x) for x in by_passage[0]))
    p1 = -by_passage[1][1] + math.log(sum(math.exp(x) for x in by_passage[1]))
    symmetric = ((q0 + q1) / 2 + (p0 + p1) / 2) / 2
    assert float(infonce(q, p, owner, positive, symmetric=True)) == pytest.approx(symmetric, rel=1e-6)


def test_lsr_loss_is_the_kl_of_in_graph_scores_and_reaches_every_encoder_parameter(make_module):
    module = make_module("lsr")
    model = module.model.eval()
    batch = _batch(module)
    loss, _ = module.objective.loss(model, batch, None)
    with torch.no_grad():
        r = model.retrieve(batch["input_ids"], batch["attention_mask"])
        loglik = model.generator.passage_mean_loglik(batch["source_text"], r.docs, batch["target_text"])
        expected = distillation_kl(r.doc_scores, loglik, module.hparams.lm_temperature)
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    loss.backward()
    for name in ("question_encoder", "ctx_encoder"):
        missing = [n for n, p in getattr(model, name).named_parameters() if p.grad is None or not p.grad.any()]
        assert not missing, f"{name}: no gradient for {missing}"
    assert all(p.grad is None for p in model.generator.parameters())


def test_pdist_adds_the_distillation_to_the_marginal_nll(make_module):
    module = make_module("rag_end2end", "--retriever_loss", "pdist", "--lm_temperature", "2")
    model = module.model.eval()
    batch = _batch(module)
    with torch.no_grad():
        loss, logs = module.objective.loss(model, batch, None)
        r = model.retrieve(batch["input_ids"], batch["attention_mask"])
        nll = model.generator.loss(batch["source_text"], r.docs, r.doc_scores, batch["target_text"], model.marginal)
        loglik = model.generator.passage_mean_loglik(batch["source_text"], r.docs, batch["target_text"])
        kl = distillation_kl(r.doc_scores, loglik, 2.0)
    assert float(loss) == pytest.approx(float(nll.mean() + kl), rel=1e-5)
    assert logs["distill_kl"] == pytest.approx(float(kl), rel=1e-5) and float(kl) > 0


# ---------------------------------------------------------------- mining, reranking, flags


class RankedModel:
    """A stand-in for RagModel's retrieval: every question gets the passages in `ranking` order."""

    def __init__(self, passages: list[dict], ranking: list[int]):
        self.passages, self.ranking = passages, ranking

    def encode_questions(self, input_ids, attention_mask):
        return torch.zeros(len(input_ids), 2)

    def search(self, q, n, embeddings=True):
        ids = [self.ranking[:n]] * len(q)
        docs = [{k: [self.passages[i][k] for i in row] for k in ("title", "text")} for row in ids]
        return None, ids, docs


def test_hard_negatives_never_include_a_gold_passage_or_an_answer():
    rng = random.Random(0)
    texts = [
        "a snake in the desert",
        "the rod of moses",
        "pokemon cards",
        "a large snake",
        "the river nile",
        "mount sinai",
        "pikachu",
        "the red sea",
    ]
    passages = [{"title": f"t{i}", "text": t} for i, t in enumerate(texts)]
    batch = {"input_ids": torch.zeros(1, 3), "attention_mask": torch.ones(1, 3), "target_text": ["snake"]}
    for _ in range(50):
        ranking = rng.sample(range(len(texts)), len(texts))
        gold = rng.sample(range(len(texts)), rng.randint(1, 3))
        mined = mine(RankedModel(passages, ranking), batch, passages, [gold], n_hard=3, pool=8)
        negatives = {p[1] for p in mined.negatives[0]}
        assert not negatives & {texts[g] for g in gold}
        assert not any("snake" in t for t in negatives)
        best = next(i for i in ranking if i in gold)  # the best-ranked gold passage, as DPR takes it
        assert mined.positive[0] == (f"t{best}", texts[best])
        expected = [texts[i] for i in ranking if i not in gold and "snake" not in texts[i]][:3]
        assert [p[1] for p in mined.negatives[0]] == expected  # the best-ranked ones
    # No gold passage in the pool: the lowest gold id.
    mined = mine(RankedModel(passages, [1, 3, 0, 2]), batch, passages, [[6, 5]], n_hard=2, pool=4)
    assert mined.positive[0] == ("t5", "mount sinai")
    # Without gold ids: the best-ranked passage that holds the answer.
    mined = mine(RankedModel(passages, [1, 3, 0, 2]), batch, passages, None, n_hard=2, pool=4)
    assert mined.positive[0] == ("t3", "a large snake") and [p[1] for p in mined.negatives[0]] == texts[1:3]


def test_rerank_keeps_the_top_passages_by_fresh_embeddings(tiny_models):
    passages = [
        {"title": f"t{i}", "text": t}
        for i, t in enumerate(["moses rod", "a snake", "aaron", "pokemon", "pikachu", "egypt"])
    ]

    class Stale:
        def retrieve(self, q, n, embeddings=True):
            ids = [list(range(n))] * len(q)
            docs = [{k: [passages[i][k] for i in row] for k in ("title", "text")} for row in ids]
            return torch.zeros(len(q), n, HIDDEN).numpy(), ids, docs

    q_enc = load_encoder(str(tiny_models["question_encoder"]), side="question").eval()
    ctx = load_encoder(str(tiny_models["context_encoder"]), side="context").eval()
    tok = load_tokenizer(str(tiny_models["question_encoder"]))
    model = RagModel(q_enc, tok, None, Stale(), n_docs=2, ctx_encoder=ctx, ctx_tokenizer=tok, rerank_top=6)
    enc = tok(["what did the rod become ?"], return_tensors="pt")
    with torch.no_grad():
        r = model.retrieve(enc["input_ids"], enc["attention_mask"])
        q = q_enc(**enc)[0][0]
        fresh = [float(q @ model.encode_passages([p["title"]], [p["text"]])[0]) for p in passages]
    best = sorted(range(6), key=lambda i: -fresh[i])[:2]
    assert r.ids.tolist() == [best] and r.docs[0]["text"] == [passages[i]["text"] for i in best]
    assert r.doc_scores[0].tolist() == pytest.approx([fresh[i] for i in best], abs=1e-4)


def test_query_side_only_freezes_the_context_encoder(make_module, gold_data):
    module = make_module("retriever_only", "--query_side_only", data=gold_data)
    assert not module.objective.refreshes and module.model.ctx_encoder is not None
    module.training_step(_batch(module), 0).backward()
    assert all(p.grad is None and not p.requires_grad for p in module.model.ctx_encoder.parameters())
    assert any(p.grad is not None and p.grad.any() for p in module.model.question_encoder.parameters())


def test_end2end_is_the_old_name_of_rag_end2end(capsys):
    assert finetune_rag.parse_args(["--model_type", "rag_token", "--end2end"]).training_mode == "rag_end2end"
    assert finetune_rag.parse_args(["--model_type", "rag_token"]).training_mode == "rag_original"
    with pytest.raises(SystemExit):
        finetune_rag.parse_args(["--model_type", "rag_token", "--end2end", "--training_mode", "ralt"])
    assert "conflicts with --training_mode ralt" in capsys.readouterr().err


def test_init_from_continues_a_retriever_only_checkpoint_with_ralt(make_module, gold_data, tmp_path):
    first = make_module("retriever_only", data=gold_data)
    first.training_step(_batch(first), 0).backward()
    with torch.no_grad():
        for p in first.parameters():
            if p.grad is not None:
                p -= 0.1 * p.grad
    ckpt = tmp_path / "checkpoint1"
    first.save_hf_checkpoint(ckpt)
    second = make_module("ralt", "--init_from", str(ckpt), data=gold_data)
    trained = first.model.question_encoder.state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in second.model.question_encoder.state_dict().items())
    assert second.hparams.passages_path == json.loads((ckpt / "kb_version.json").read_text())["passages_path"]
    assert second.model.generator is not None and second.model.ctx_encoder is None  # from the flags; not needed
    second.training_step(_batch(second), 0).backward()
    assert all(p.grad is None for p in second.model.question_encoder.parameters())


# ---------------------------------------------------------------- LoRA


@pytest.mark.parametrize("causal", [False, True])
def test_lora_trains_only_adapters_and_reloads_identically(make_module, gold_data, tmp_path, causal):
    module = make_module("rag_end2end", "--peft", "both", "--lora_r", "4", data=gold_data, causal=causal)
    module.training_step(_batch(module), 0).backward()
    for name, part in _parts(module).items():
        trained = [n for n, p in part.named_parameters() if p.requires_grad]
        assert trained and all("lora_" in n for n in trained), f"{name}: {trained[:3]}"
        assert any(p.grad is not None and p.grad.any() for n, p in part.named_parameters() if "lora_B" in n), name
    with torch.no_grad():  # lora_B starts at zero: a step makes the adapters change the outputs
        for p in module.parameters():
            if p.grad is not None:
                p -= 0.5 * p.grad
    ckpt = tmp_path / "checkpoint1"
    module.save_hf_checkpoint(ckpt)
    reloaded = RagModel.from_pretrained(str(ckpt), retriever=module.retriever, load_context_encoder=True).eval()
    model = module.model.eval()
    batch = _batch(module)
    args = (batch["input_ids"], batch["attention_mask"], batch["source_text"])
    with torch.no_grad():
        assert reloaded.generate(*args, 6) == model.generate(*args, 6)
        expected = model(*args, batch["target_text"])[0]
        torch.testing.assert_close(reloaded(*args, batch["target_text"])[0], expected, rtol=1e-4, atol=1e-4)
    assert not any("lora" in k for k in reloaded.state_dict())  # a plain model: eval_rag.py needs no peft


def test_the_refresh_encodes_with_the_merged_lora_weights(make_module, gold_data):
    from rag_end2end.model.lora import merged

    module = make_module("retriever_only", "--peft", "retriever", data=gold_data)
    ctx = module.model.ctx_encoder
    with torch.no_grad():
        for name, p in ctx.named_parameters():
            if "lora_B" in name:
                p.normal_()
    plain = merged(ctx).eval()
    assert set(plain.state_dict()) == set(
        load_encoder(module.hparams.context_encoder_name, side="context").state_dict()
    )
    enc = module.model.ctx_tokenizer(["moses"], ["the rod became a snake"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(plain(**enc).pooler_output, ctx.eval()(**enc).pooler_output, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- the training signal: teacher, dropout, rates


def test_the_default_lm_teacher_is_sharp_where_tau_1_was_flat():
    """A 0.5-nat gap in per-token mean log-likelihood: [0.62, 0.38] at tau_lm 1, decisive at the default."""
    default = finetune_rag.parse_args(["--model_type", "rag_token"]).lm_temperature
    loglik = torch.tensor([[-1.0, -1.5]])
    flat = (loglik / 1.0).softmax(1)[0].tolist()
    sharp = (loglik / default).softmax(1)[0].tolist()
    assert flat == pytest.approx([0.622, 0.378], abs=1e-3)
    assert sharp[0] > 0.99
    assert entropy(loglik / default) < 0.1 < 0.6 < entropy(loglik)


def test_pdist_teacher_is_scored_without_dropout_while_the_generator_trains(make_module):
    module = make_module("rag_end2end", "--retriever_loss", "pdist")
    model, batch = module.model, _batch(module)
    assert model.generator.training  # set_modes: the generator learns, with dropout
    with torch.no_grad():
        r = model.retrieve(batch["input_ids"], batch["attention_mask"])
        args = (batch["source_text"], r.docs, batch["target_text"])
        noisy = [model.generator.passage_mean_loglik(*args) for _ in range(2)]
        assert not torch.allclose(*noisy)  # dropout is on in the generator: each pass differs
        teacher = [teacher_loglik(model.generator, *args) for _ in range(2)]
    assert torch.equal(*teacher)
    assert model.generator.training and all(m.training for m in model.generator.modules())  # restored
    loss, logs = module.objective.loss(model, batch, None)
    assert all(0 <= logs[k] <= math.log(3) + 1e-6 for k in ("teacher_entropy", "doc_entropy"))


def test_retriever_dropout_off_keeps_the_encoders_training_without_noise(make_module):
    module = make_module("rag_end2end", "--retriever_dropout", "off")
    model, batch = module.model, _batch(module)
    assert not model.question_encoder.training and not model.ctx_encoder.training and model.generator.training
    scores = [model.retrieve(batch["input_ids"], batch["attention_mask"]).doc_scores for _ in range(2)]
    assert torch.equal(scores[0].detach(), scores[1].detach())
    module.training_step(batch, 0).backward()
    for part in (model.question_encoder, model.ctx_encoder):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())
    noisy = make_module("rag_end2end").model  # the default keeps dropout: two passes differ
    noisy_scores = [noisy.retrieve(batch["input_ids"], batch["attention_mask"]).doc_scores for _ in range(2)]
    assert not torch.allclose(noisy_scores[0], noisy_scores[1])


def test_retriever_learning_rate_and_no_decay_on_every_norm_and_bias(make_module):
    module = make_module(
        "rag_end2end", "--retriever_learning_rate", "1e-5", "--learning_rate", "1e-3", "--weight_decay", "0.01"
    )
    groups = module.param_groups()
    lr_of = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        lr, decay = lr_of[id(p)]
        assert lr == (1e-3 if name.startswith("model.generator.") else 1e-5), name
        assert decay == (0.01 if p.dim() >= 2 else 0.0), name
    names = {n for n, p in module.named_parameters() if p.requires_grad and lr_of[id(p)][1] == 0.0}
    assert any("layernorm_embedding" in n for n in names)  # BART's, which a list of names had missed


def test_a_batch_without_positives_reaches_every_trained_parameter(make_module, gold_data):
    module = make_module("dalm", data=gold_data)
    batch = _batch(module)
    empty = Positives([None] * len(batch["source_text"]), [[] for _ in batch["source_text"]])
    loss, logs = module.objective.loss(module.model, batch, empty)
    loss.backward()
    assert logs["with_positive"] == 0.0
    trained = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    assert trained and all(p.grad is not None for _, p in trained)  # zeros, but present: DDP finds them all


def _gather_worker(rank: int, world: int, port: int, out: str) -> None:
    """One DDP rank: 2 (rank 0) or 3 (rank 1) candidate passages, rank 1's last a copy of rank 0's first."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(rank)
    p = torch.randn(2 + rank, 4, requires_grad=True)
    owner = torch.tensor([10, 11] if rank == 0 else [20, 21, 10])
    q = torch.randn(1, 4)
    vectors, owners, offset = gather_candidates(p, owner)
    loss = infonce(q, vectors, owners, torch.tensor([offset]))
    loss.backward()
    torch.save(
        {
            "p": p.detach(),
            "q": q,
            "grad": p.grad,
            "owners": owners,
            "offset": offset,
            "loss": loss.detach(),
            "vectors": vectors.detach(),
        },
        f"{out}/rank{rank}.pt",
    )
    dist.destroy_process_group()


def test_infonce_negatives_are_gathered_across_ddp_ranks(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_gather_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    every = torch.cat([r0["p"], r1["p"]])
    for r in (r0, r1):
        assert torch.equal(r["vectors"], every) and r["owners"].tolist() == [10, 11, 20, 21, 10]
        # Each rank's loss is InfoNCE of its questions against all five passages, computed in one process.
        expected = infonce(r["q"], every, r["owners"], torch.tensor([r["offset"]]))
        assert float(r["loss"]) == pytest.approx(float(expected))
    assert (r0["offset"], r1["offset"]) == (0, 2)
    # Rank 1's passages reach rank 0's loss: their gradient (summed over ranks) is the sum of both losses'.
    both = every.clone().requires_grad_(True)
    total = sum(infonce(r["q"], both, r["owners"], torch.tensor([r["offset"]])) for r in (r0, r1))
    total.backward()
    assert torch.allclose(r0["grad"], both.grad[:2], atol=1e-6) and torch.allclose(r1["grad"], both.grad[2:], atol=1e-6)


def test_a_learned_temperature_trains_beside_lora_adapters(make_module, gold_data):
    module = make_module(
        "rag_end2end", "--peft", "both", "--learn_temperature", "--retrieval_temperature", "0.5", data=gold_data
    )
    encoder = module.model.question_encoder
    assert encoder.log_temperature.requires_grad  # LoRA freezes every weight but its adapters: not tau
    module.training_step(_batch(module), 0).backward()
    assert encoder.log_temperature.grad is not None and encoder.log_temperature.grad.abs() > 0
    assert any(p is encoder.log_temperature for g in module.param_groups() for p in g["params"])


def test_validation_em_takes_the_best_of_every_gold_answer(make_module, tmp_path):
    """val_em is 1 when each prediction is one of the question's gold answers, though not its .target line."""
    import pytorch_lightning as pl

    def validate(module) -> dict:
        trainer = pl.Trainer(
            accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False
        )
        return trainer.validate(module, verbose=False)[0]

    data = tmp_path / "data"
    shutil.copytree(DUMMY_DATA, data)
    module = make_module("rag_original", "--val_max_target_length", "4", data=data)
    module.model.eval()
    with torch.no_grad():
        preds = [
            a
            for b in module.val_dataloader()
            for a in module.model.generate(b["input_ids"], b["attention_mask"], b["source_text"], 4)
        ]
    targets = (data / "val.target").read_text().splitlines()
    assert not any(p.strip() == t for p, t in zip(preds, targets))
    assert validate(module)["val_em"] == 0.0
    rows = [json.dumps({"answers": [t, " ".join(p.split())], "gold_passage_ids": []}) for t, p in zip(targets, preds)]
    (data / "val.gold.jsonl").write_text("\n".join(rows) + "\n")
    assert validate(make_module("rag_original", "--val_max_target_length", "4", data=data))["val_em"] == 1.0


def test_retriever_dropout_off_survives_lightnings_validation_loop(make_module):
    """Lightning puts modules in eval mode for validation and back afterwards: the encoders must come back in eval
    mode (no dropout), the generator in train mode."""
    import pytorch_lightning as pl

    module = make_module("rag_end2end", "--retriever_dropout", "off", "--max_steps", "2", "--val_check_interval", "1")
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=2,
        val_check_interval=1,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    seen = []

    class Modes(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            m = pl_module.model
            seen.append((m.question_encoder.training, m.ctx_encoder.training, m.generator.training))

    trainer.callbacks.append(Modes())
    trainer.fit(module)
    assert len(seen) == 2 and all(modes == (False, False, True) for modes in seen), seen


# ---------------------------------------------------------------- gradient checkpointing


def _without_dropout(causal: bool, *flags: str) -> tuple[str, ...]:
    """The generator's dropout (BART's are plain floats in its layers; Llama has only attention dropout, 0) and
    LoRA's set to 0 by flags; the encoders' nn.Dropout modules by `_quiet`."""
    return (*flags, *(() if causal else ("--dropout", "0", "--attention_dropout", "0")), "--lora_dropout", "0")


def _quiet(module) -> None:
    for m in module.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0


class _Recomputes:
    """Counts, per part, the forward calls of its linear layers made during backward: the recomputed forwards of
    checkpointed layers (a part that keeps its activations makes none)."""

    def __init__(self, parts: dict):
        self.backward, self.counts = False, dict.fromkeys(parts, 0)
        for name, part in parts.items():
            for m in part.modules() if part is not None else ():
                if isinstance(m, torch.nn.Linear):
                    m.register_forward_hook(lambda *_, name=name: self._seen(name))

    def _seen(self, name: str) -> None:
        self.counts[name] += self.backward


def _step(module, batch) -> tuple[torch.Tensor, dict, dict]:
    """One training step's loss and the gradients it gives, with the forwards each part repeated in backward."""
    recomputes = _Recomputes(_parts(module))
    torch.manual_seed(1)
    loss = module.training_step(batch, 0)
    recomputes.backward = True
    loss.backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    return loss.detach(), grads, recomputes.counts


@pytest.mark.parametrize("mode", sorted(MODES))
def test_gradient_checkpointing_is_on_in_exactly_the_parts_that_train(make_module, gold_data, mode):
    from rag_end2end.model.assembly import is_checkpointing

    module = make_module(mode, "--gradient_checkpointing", data=gold_data, causal=mode == "dalm")
    for name, part in _parts(module).items():
        if part is not None:
            assert is_checkpointing(part) == (name in TRAINS[mode]), f"{mode}: {name}"
    plain = make_module(mode, data=gold_data, causal=mode == "dalm")
    assert not any(is_checkpointing(part) for part in _parts(plain).values() if part is not None)


@pytest.mark.parametrize(("causal", "peft"), [(False, "none"), (True, "none"), (False, "both"), (True, "both")])
def test_gradient_checkpointing_leaves_the_loss_and_gradients_unchanged(make_module, gold_data, causal, peft):
    """rag_end2end trains all three parts: each one's layers run again in backward with the flag (none without),
    and the loss and every gradient equal those of the same step without it; LoRA's adapters get theirs."""
    results = {}
    for flag in ((), ("--gradient_checkpointing",)):
        module = make_module(
            "rag_end2end", *_without_dropout(causal, "--peft", peft, *flag), data=gold_data, causal=causal
        )
        _quiet(module)
        results[bool(flag)] = _step(module, _batch(module))
    (loss, grads, plain_counts), (ckpt_loss, ckpt_grads, counts) = results[False], results[True]
    assert all(n == 0 for n in plain_counts.values()), plain_counts
    assert all(n > 0 for n in counts.values()), counts  # every part recomputed its layers
    torch.testing.assert_close(ckpt_loss, loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ckpt_grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    if peft == "both":
        assert all("lora_" in name for name in grads)
        for part in ("question_encoder", "ctx_encoder", "generator"):
            lora_b = [g for n, g in ckpt_grads.items() if n.startswith(f"model.{part}.") and "lora_B" in n]
            assert lora_b and all(g.abs().sum() > 0 for g in lora_b), part


def test_gradient_checkpointing_with_retriever_dropout_off_warns_and_recomputes_the_generator(make_module):
    """transformers checkpoints only modules in training mode: the eval-mode encoders keep their activations."""
    with pytest.warns(UserWarning, match="--retriever_dropout off"):
        module = make_module("rag_end2end", "--gradient_checkpointing", "--retriever_dropout", "off")
    counts = _step(module, _batch(module))[2]
    assert counts["generator"] > 0 and counts["question_encoder"] == counts["ctx_encoder"] == 0, counts


# Each recipe with the flag, and LoRA on a decoder-only generator: a short run of Lightning's Trainer.
CHECKPOINTED_RUNS = [*((mode, (), mode == "dalm") for mode in sorted(MODES)), ("rag_end2end", ("--peft", "both"), True)]


@pytest.mark.parametrize(("mode", "extra", "causal"), CHECKPOINTED_RUNS)
def test_every_recipe_trains_with_gradient_checkpointing(make_module, gold_data, mode, extra, causal):
    import pytorch_lightning as pl

    from rag_end2end.model.assembly import is_checkpointing

    module = make_module(mode, "--gradient_checkpointing", *extra, data=gold_data, causal=causal)
    before = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=2,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module)
    assert trainer.global_step == 2
    assert all(is_checkpointing(getattr(module.model, part)) for part in TRAINS[mode])
    moved = {
        part: any(
            not torch.equal(p, before[n])
            for n, p in module.named_parameters()
            if n in before and n.startswith(f"model.{part}.")
        )
        for part in TRAINS[mode]
    }
    assert all(moved.values()), f"{mode} {extra}: {moved}"
