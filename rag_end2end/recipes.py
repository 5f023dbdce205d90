"""Training recipes (`--training_mode`): which parts train, the loss built from the model contract
(rag_model.RagModel), and whether passage embeddings change, so whether the KB is refreshed.

    mode           trains                       loss                                           KB refresh
    rag_end2end    question, context, generator RAG marginal NLL, fresh passage embeddings      yes
    rag_original   question, generator          RAG marginal NLL, stored passage embeddings     no
    retriever_only question, context            InfoNCE: gold passage vs in-batch + hard negs   yes
    dalm           question, context, generator InfoNCE in-batch + NLL on the gold passage      yes
    lsr            question, context            KL(LM's passage preference || retriever's)      yes
    ralt           generator                    NLL of the answer under each top-k passage      no

`--query_side_only` freezes the context encoder of any mode (no refresh needed). A new recipe is one small
class here with its test.

Statement batches (--reconstruction_dir) go through the same losses: the marked statement is the question, the
statement the answer; `masked_retrieval` and `mask_positives` cut each statement out of its own passage wherever
the recipe reads that passage, and `for_generator` leaves the generator only the marker of the question.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from rag_end2end.data.mixing import Mask
from rag_end2end.data.qa_dataset import RECONSTRUCTION
from rag_end2end.data.reconstruction import RECONSTRUCTION_MARKER, mask_passage
from rag_end2end.evaluation.metrics import has_answer
from rag_end2end.model.encoders import passage_scores
from rag_end2end.model.rag import RagModel

PARTS = ("question_encoder", "ctx_encoder", "generator")


@dataclass
class Positives:
    """Per question of a batch: the positive passage (title, text) or None, and its hard negatives; the positive's
    KB row where it is known."""

    positive: list[tuple[str, str] | None]
    negatives: list[list[tuple[str, str]]]
    positive_ids: list[int | None] = field(default_factory=list)


def infonce(
    q: torch.Tensor,
    p: torch.Tensor,
    owner: torch.Tensor,
    positive: torch.Tensor,
    symmetric: bool = False,
    question_encoder: torch.nn.Module | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Contrastive loss of B questions (B, d) against P candidate passages (P, d), scores q.p (the question
    vectors carry 1/tau). positive[i]: the column of question i's positive; owner[j]: the passage id of
    column j, so that a copy of a question's positive elsewhere in the batch is not taken for a negative (both on
    the vectors' device). symmetric adds the passage -> question direction over the positives' columns. Scores are
    float32 even under autocast; `question_encoder` says the similarity (l2: negative squared distances / tau,
    model.encoders.passage_scores), dot products without it. reduction "none": each question's loss."""
    scores = passage_scores("bd,pd->bp", q, p, question_encoder)  # (B, P)
    rows = torch.arange(len(q), device=scores.device)
    same = owner[None, :] == owner[positive][:, None]  # the same passage as question i's positive
    same[rows, positive] = False
    loss = F.cross_entropy(scores.masked_fill(same, float("-inf")), positive, reduction=reduction)
    if symmetric:
        by_passage = scores[:, positive].T  # (B, B): positive of i against every question
        dup = owner[positive][None, :] == owner[positive][:, None]
        dup.fill_diagonal_(False)
        loss = (loss + F.cross_entropy(by_passage.masked_fill(dup, float("-inf")), rows, reduction=reduction)) / 2
    return loss


def passage_key(title: str, text: str) -> int:
    """A passage's identity as an integer that every process computes alike (Python's str hash is salted per
    process, so DDP ranks would not recognise each other's copies of a passage)."""
    digest = hashlib.blake2b(f"{title}\x00{text}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # int64-safe


def gather_candidates(p: torch.Tensor, owner: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Every DDP rank's candidate passages (P_all, d) and their owners, and the column where this rank's start:
    in-batch negatives from the whole global batch, as DPR trains. The gather is autograd-aware, so each rank's
    loss also trains the passages the other ranks encoded. Unchanged without torch.distributed."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return p, owner, 0
    from torch.distributed.nn.functional import all_gather  # the differentiable gather

    world, rank = dist.get_world_size(), dist.get_rank()
    sizes = [torch.zeros(1, dtype=torch.long, device=p.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([len(p)], device=p.device))
    sizes = [int(size) for size in sizes]
    width = max(sizes)  # all_gather needs one shape: pad, gather, then drop the padding rows
    vectors = torch.cat(all_gather(F.pad(p, (0, 0, 0, width - len(p)))))
    owners = [torch.zeros(width, dtype=torch.long, device=p.device) for _ in range(world)]
    dist.all_gather(owners, F.pad(owner.to(p.device), (0, width - len(owner))))
    keep = torch.cat([torch.arange(size, device=p.device) + r * width for r, size in enumerate(sizes)])
    return vectors[keep], torch.cat(owners)[keep], sum(sizes[:rank])


def distillation_kl(retriever_scores: torch.Tensor, lm_loglik: torch.Tensor, lm_temperature: float) -> torch.Tensor:
    """Mean over questions of KL(p_LM || p_R): p_R = softmax(doc scores) (already similarity / tau_r),
    p_LM = softmax(answer log-likelihood per passage / tau_lm) (REPLUG-LSR; Atlas's perplexity distillation).
    The LM side is a fixed target: no gradient flows into it."""
    target = (lm_loglik.detach().float() / lm_temperature).log_softmax(1)
    return F.kl_div(retriever_scores.float().log_softmax(1), target, log_target=True, reduction="batchmean")


def entropy(scores: torch.Tensor) -> float:
    """Mean entropy (nats) of softmax(scores) over the rows: log n is a flat distribution over n passages, 0 a
    one-hot one. Logged for p(z|x) and for the LM teacher, so that a flat training signal shows."""
    logp = scores.detach().float().log_softmax(-1)
    return float(-(logp.exp() * logp).sum(-1).mean())


def teacher_loglik(generator, questions: list[str], docs: list[dict], answers: list[str]) -> torch.Tensor:
    """The LM's per-token mean log-likelihood of each answer under each passage alone (B, n), without gradient
    and without dropout (eval mode, restored after), as Atlas scores its passages for perplexity distillation."""
    modes = {module: module.training for module in generator.modules()}
    generator.eval()
    try:
        with torch.no_grad():
            return generator.passage_mean_loglik(questions, docs, answers)
    finally:
        for module, training in modes.items():
            module.train(training)


def mine(
    model: RagModel, batch: dict, passages, gold_ids: list[list[int]] | None, n_hard: int, pool: int = 20
) -> Positives:
    """Positives and hard negatives from the live index (`pool` passages per question). The positive, as DPR
    takes it: the best-ranked gold passage of the pool when gold ids are known (the lowest gold id when none of
    them is in the pool), else the best-ranked passage that holds the answer (distant supervision).
    Hard negatives: the best-ranked retrieved passages that are no gold passage and hold no answer."""
    with torch.no_grad():
        q = model.encode_questions(batch["input_ids"], batch["attention_mask"])
        _, ids, docs = model.search(q, max(pool, n_hard + 1), embeddings=False)
    positives, negatives, positive_ids = [], [], []
    for i, (row, found) in enumerate(zip(np.asarray(ids).tolist(), docs)):
        answer = [batch["target_text"][i]]
        gold = set(gold_ids[i]) if gold_ids is not None else set()
        ranked = list(zip(row, found["title"], found["text"]))
        if gold:
            pid = next((pid for pid, _, _ in ranked if pid in gold), min(gold))
            positive = (passages[pid]["title"], passages[pid]["text"])
        else:
            pid, positive = next(((p, (t, x)) for p, t, x in ranked if has_answer(x, answer)), (None, None))
        positives.append(positive)
        positive_ids.append(pid)
        negatives.append([(t, x) for pid, t, x in ranked if pid not in gold and not has_answer(x, answer)][:n_hard])
    return Positives(positives, negatives, positive_ids)


# ---------------------------------------------------------------- statement batches: what the model may read


def mask_docs(docs: list[dict], ids, masks: list[Mask | None]) -> list[dict]:
    """Retrieved passages (per question: {"title": [...], "text": [...], ...} and their KB rows `ids`) with each
    question's mask applied: its sentence cut out of the passage whose row is the mask's. New dicts; the others
    are passed through as they are."""
    out = []
    for row, doc, mask in zip(np.asarray(ids).tolist(), docs, masks):
        if mask is None or mask.passage_id not in row:
            out.append(doc)
            continue
        texts = [
            mask_passage(text, mask.sentence) if pid == mask.passage_id else text for pid, text in zip(row, doc["text"])
        ]
        out.append({**doc, "text": texts})
    return out


class MaskingRetriever:
    """A model's retriever whose answers (the passages of every search the step makes: those the generator reads,
    those the context encoder re-encodes in the graph, reranking's and mining's) have each question's mask applied.
    The index and the stored KB are never touched; nor the stored embeddings that recipes without a context encoder
    score passages with (those of the KB version being served)."""

    def __init__(self, retriever, masks: list[Mask | None]):
        self.retriever, self.masks = retriever, masks

    def retrieve(self, query_vectors, n_docs: int, embeddings: bool = True):
        stored, ids, docs = self.retriever.retrieve(query_vectors, n_docs, embeddings=embeddings)
        return stored, ids, mask_docs(docs, ids, self.masks)


@contextmanager
def masked_retrieval(model: RagModel, masks: list[Mask | None] | None) -> Iterator[None]:
    """Within: `model` retrieves through a MaskingRetriever for the questions of one batch (`masks`, in batch order;
    nothing changes when every one is None)."""
    if not masks or all(m is None for m in masks):
        yield
        return
    retriever = model.retriever
    model.retriever = MaskingRetriever(retriever, masks)
    try:
        yield
    finally:
        model.retriever = retriever


def mask_positives(mined: Positives, masks: list[Mask | None]) -> Positives:
    """The positives with each question's mask applied where the positive is the mask's passage (its KB row): the
    Inverse Cloze Task's positive, the passage with the statement removed. Hard negatives came through the
    MaskingRetriever already."""
    positive = [
        (p[0], mask_passage(p[1], m.sentence)) if p is not None and m is not None and pid == m.passage_id else p
        for p, pid, m in zip(mined.positive, mined.positive_ids or [None] * len(masks), masks)
    ]
    return Positives(positive, mined.negatives, mined.positive_ids)


def for_generator(batch: dict) -> dict:
    """The batch as the generator reads it: a statement batch's questions are the marker alone, which tells a statement
    from a question, without the statement (the generator would copy the answer from its own prompt, and the
    marginal would give the retriever no gradient). The question encoder still reads the whole query (input_ids).
    QA batches are passed through."""
    if batch.get("kind") != RECONSTRUCTION:
        return batch
    return {**batch, "source_text": [RECONSTRUCTION_MARKER.strip()] * len(batch["source_text"])}


class Objective:
    """A training recipe. `trains` names the RagModel parts that learn; every other parameter is frozen."""

    name = ""
    trains: tuple[str, ...] = ()
    needs_generator = True
    always_encodes_passages = False  # the loss encodes passages in the graph even with the context encoder frozen
    needs_positives = False

    def __init__(self, args):
        self.args = args
        self.trains = tuple(p for p in self.trains if not (p == "ctx_encoder" and args.query_side_only))

    @property
    def refreshes(self) -> bool:
        """The passage embeddings change, so the KB must be re-encoded as training goes on."""
        return "ctx_encoder" in self.trains

    @property
    def uses_context_encoder(self) -> bool:
        """The context encoder is loaded: it trains (and the KB refreshes), or the loss encodes passages with it."""
        return self.always_encodes_passages or self.refreshes

    def freeze(self, model: RagModel) -> None:
        """requires_grad only on the parts this recipe trains (a shared encoder trains if either side does)."""
        for part in PARTS:
            module = getattr(model, part, None)
            if module is not None:
                module.requires_grad_(False)
        for part in self.trains:
            module = getattr(model, part, None)
            if module is not None:
                module.requires_grad_(True)
                _keep_unused_pooler_frozen(module)

    def set_modes(self, model: RagModel) -> None:
        """Train mode for the parts that learn; eval mode (no dropout) for the frozen ones, which only judge or
        retrieve, and with --retriever_dropout off for the encoders too. from_pretrained leaves modules in eval
        mode, and Lightning keeps the mode it finds."""
        model.train()
        quiet = ("question_encoder", "ctx_encoder") if getattr(self.args, "retriever_dropout", "on") == "off" else ()
        for part in PARTS:
            module = getattr(model, part, None)
            if module is not None and (part not in self.trains or part in quiet):
                module.eval()

    def loss(self, model: RagModel, batch: dict, mined: Positives | None) -> tuple[torch.Tensor, dict]:
        """The scalar to minimise and the figures to log (per question)."""
        raise NotImplementedError


def _keep_unused_pooler_frozen(module: torch.nn.Module) -> None:
    if hasattr(module, "freeze_unused_pooler"):  # a PooledEncoder (model.encoders): the rule lives there
        module.freeze_unused_pooler()


class RagEnd2End(Objective):
    """RAG's marginal NLL into all three parts, passages re-encoded in the graph (Siriwardhana et al. 2023);
    `--retriever_loss pdist` adds Atlas's perplexity distillation."""

    name = "rag_end2end"
    trains = ("question_encoder", "ctx_encoder", "generator")

    def loss(self, model, batch, mined=None):
        r = model.retrieve(batch["input_ids"], batch["attention_mask"])
        questions, answers = batch["source_text"], batch["target_text"]
        loss = model.generator.loss(
            questions, r.docs, r.doc_scores, answers, model.marginal, model.generator.label_smoothing
        ).mean()
        logs = {"nll": float(loss.detach()), "doc_entropy": entropy(r.doc_scores)}
        if self.args.retriever_loss == "pdist":  # a second, dropout-free pass scores the passages
            loglik = teacher_loglik(model.generator, questions, r.docs, answers)
            kl = distillation_kl(r.doc_scores, loglik, self.args.lm_temperature)
            loss, logs["distill_kl"] = loss + kl, float(kl.detach())
            logs["teacher_entropy"] = entropy(loglik / self.args.lm_temperature)
        return loss, logs


class RagOriginal(RagEnd2End):
    """RAG as Lewis et al. trained it: the context encoder and the KB stay as built."""

    name = "rag_original"
    trains = ("question_encoder", "generator")


class RetrieverOnly(Objective):
    """DALM's train-retriever-only, with hard negatives: InfoNCE of each question against its positive
    passage, the other questions' positives and `--hard_negatives` mined from the live index. No generator."""

    name = "retriever_only"
    trains = ("question_encoder", "ctx_encoder")
    needs_generator = False
    always_encodes_passages = True
    needs_positives = True

    def loss(self, model, batch, mined):
        keep = [i for i, p in enumerate(mined.positive) if p is not None]
        if not keep:  # no question of this batch has a positive: a zero that reaches every trained parameter
            zero = sum(p.sum() for p in model.parameters() if p.requires_grad) * 0.0  # (DDP expects them all)
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                # The other ranks gather candidates, forward and backward (a collective): take part, with none.
                none = torch.zeros(
                    0, model.question_encoder.config.hidden_size, requires_grad=True, device=batch["input_ids"].device
                )
                owners = torch.zeros(0, dtype=torch.long, device=none.device)
                zero = zero + gather_candidates(none, owners)[0].sum() * 0.0
            return zero, {"infonce": 0.0, "with_positive": 0.0, "without_negative": 0.0}
        passages = [mined.positive[i] for i in keep]
        for i in keep:
            passages += mined.negatives[i]
        q = model.encode_questions(batch["input_ids"][keep], batch["attention_mask"][keep])
        owner = torch.tensor([passage_key(*p) for p in passages], device=q.device)
        p, owner, offset = gather_candidates(model.encode_passages(*map(list, zip(*passages))), owner)
        positive = torch.arange(len(keep), device=p.device) + offset
        loss = infonce(q, p, owner, positive, self.args.symmetric_infonce, model.question_encoder)
        # A question whose every candidate is its own positive (one passage in the batch, no hard negative) adds a
        # loss of exactly 0 that measures nothing: counted, so that a validation of such batches says so.
        lonely = int(((owner[None, :] != owner[positive][:, None]).sum(1) == 0).sum())
        logs = {"infonce": float(loss.detach()), "with_positive": len(keep) / len(mined.positive)}
        return loss, logs | {"without_negative": float(lonely)}

    def question_losses(self, model, batch, mined) -> list[float | None]:
        """Each held-out question's InfoNCE loss against its batch's candidates, or None where it cannot be scored:
        no positive (no gold id, no answer in the passages retrieved), or no candidate but its own positive (a loss
        of exactly 0.0 whatever the retriever does). Validation averages the scored ones only, so that a batch it
        cannot score never reads as a perfect retriever (its val_loss 0.0 was kept as the best model for good)."""
        keep = [i for i, p in enumerate(mined.positive) if p is not None]
        passages = [mined.positive[i] for i in keep] + [n for i in keep for n in mined.negatives[i]]
        device = batch["input_ids"].device
        if passages:
            vectors = model.encode_passages(*map(list, zip(*passages)))
            owner = torch.tensor([passage_key(*p) for p in passages], device=vectors.device)
        else:
            vectors = torch.zeros(0, model.question_encoder.config.hidden_size, device=device)
            owner = torch.zeros(0, dtype=torch.long, device=device)
        p, owner, offset = gather_candidates(vectors, owner)  # a collective under DDP: every rank takes part
        losses: list[float | None] = [None] * len(mined.positive)
        if not keep:
            return losses
        q = model.encode_questions(batch["input_ids"][keep], batch["attention_mask"][keep])
        positive = torch.arange(len(keep), device=p.device) + offset
        each = infonce(q, p, owner, positive, self.args.symmetric_infonce, model.question_encoder, reduction="none")
        others = (owner[None, :] != owner[positive][:, None]).sum(1)  # candidates that are not its positive
        for j, i in enumerate(keep):
            if others[j] > 0:
                losses[i] = float(each[j])
        return losses


class Dalm(RetrieverOnly):
    """DALM's joint recipe, done right: in-batch InfoNCE plus the generator's NLL of the answer (its tokens
    only) given the question and its gold passage."""

    name = "dalm"
    trains = ("question_encoder", "ctx_encoder", "generator")
    needs_generator = True

    def loss(self, model, batch, mined):
        contrastive, logs = super().loss(model, batch, mined)
        keep = [i for i, p in enumerate(mined.positive) if p is not None]
        if not keep:
            return contrastive, logs
        docs = [{"title": [mined.positive[i][0]], "text": [mined.positive[i][1]]} for i in keep]
        questions = [batch["source_text"][i] for i in keep]
        answers = [batch["target_text"][i] for i in keep]
        smoothing = model.generator.label_smoothing
        nll = -model.generator.passage_mean_loglik(questions, docs, answers, smoothing)[:, 0].mean()
        return contrastive + nll, {**logs, "nll": float(nll.detach())}


class Lsr(Objective):
    """LM-supervised retrieval (REPLUG-LSR): the retriever's distribution over its top-k, from question and
    passages re-encoded in the graph, learns the frozen generator's preference among those passages."""

    name = "lsr"
    trains = ("question_encoder", "ctx_encoder")
    always_encodes_passages = True

    def loss(self, model, batch, mined=None):
        r = model.retrieve(batch["input_ids"], batch["attention_mask"])
        loglik = teacher_loglik(model.generator, batch["source_text"], r.docs, batch["target_text"])
        kl = distillation_kl(r.doc_scores, loglik, self.args.lm_temperature)
        logs = {"lsr_kl": float(kl.detach()), "doc_entropy": entropy(r.doc_scores)}
        return kl, logs | {"teacher_entropy": entropy(loglik / self.args.lm_temperature)}


class Ralt(Objective):
    """Retrieval-augmented generator tuning (RA-DIT): retriever frozen, each top-k passage in its own
    prompt, the NLL of the answer tokens averaged over passages."""

    name = "ralt"
    trains = ("generator",)

    def loss(self, model, batch, mined=None):
        with torch.no_grad():
            r = model.retrieve(batch["input_ids"], batch["attention_mask"])
        smoothing = model.generator.label_smoothing
        nll = -model.generator.passage_mean_loglik(batch["source_text"], r.docs, batch["target_text"], smoothing).mean()
        return nll, {"nll": float(nll.detach())}


MODES = {cls.name: cls for cls in (RagEnd2End, RagOriginal, RetrieverOnly, Dalm, Lsr, Ralt)}


def make_objective(args) -> Objective:
    if args.training_mode not in MODES:
        raise ValueError(f"--training_mode {args.training_mode!r}: use one of {', '.join(MODES)}")
    return MODES[args.training_mode](args)
