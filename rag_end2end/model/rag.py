"""The one model contract: a question encoder, an optional context encoder and a generator, with RAG's
retrieval, doc scores, marginal loss and generation, for seq2seq and decoder-only generators alike.

    model = RagModel.from_pretrained("OUT/checkpoint120", retriever=search)
    losses, doc_scores = model(question_ids, question_mask, questions, answers)  # (B,) NLL per answer token
    answers = model.generate(question_ids, question_mask, questions, max_new_tokens=20)

A generator answers the same calls whatever its family: `answer_logprobs(questions, docs, answers)` (each
answer token's log-prob under each passage, aligned across passages), `loss(...)` (the RAG marginal of
those, per answer token), `generate(questions, docs, doc_scores, ...)` and `save_pretrained`. The training
objectives (training_modes.py), the training step and eval_rag.py are written against these calls and
never ask which family they hold. A retriever is anything with `retrieve(q, n, embeddings=True) -> (embeddings,
ids, docs)`, the stored embeddings being optional (None) when `embeddings` is False: the Ray actors in training,
an in-process FAISS index in eval_rag.py and in tests.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    RagConfig,
    RagTokenForGeneration,
    RagTokenizer,
)

from rag_end2end.kb.search import KBSearch
from rag_end2end.kb.versions import KB_VERSION_FILE, checkpoint_kb
from rag_end2end.model.causal import (
    DEFAULT_TEMPLATE,
    IGNORE,
    answer_logprobs,
    build_prompts,
    encode_prompts,
    pack,
    pad_id,
    tokenize_for_loss,
    truncate_left,
)
from rag_end2end.model.encoders import (
    check_tokenizer,
    encoder_scoring,
    load_encoder,
    load_tokenizer,
    passage_scores,
    with_scoring,
)
from rag_end2end.model.lora import has_lora, merged
from rag_end2end.model.marginals import (
    distinct_candidates,
    marginal_next_token_lp,
    marginal_nll,
    sequence_loglik,
    smoothed_token_lp,
)
from rag_end2end.model.settings import (
    FALLBACK_GENERATION,  # noqa: F401  (re-exported: the decoding of a checkpoint that saved none)
    MARGINALS,
    QUESTION_MAX_LENGTH,
    SETTINGS_FILE,
    Generation,
    RagSettings,
    Scoring,
    refuse_training_state,
)
from rag_end2end.precision import LOAD_DTYPE

RAG_TEMPLATE = "{title} / {text} // {question}"  # transformers' RAG prompt: title_sep " / ", doc_sep " // "


class RagGenerator(torch.nn.Module):
    """What every generator offers the rest of the toolkit; subclasses define how prompts become log-probs."""

    family = ""
    auto_class = None  # the transformers Auto class that loads this family
    default_max_length = 512  # prompt (+ answer) tokens

    def __init__(self, model, tokenizer, template: str | None, max_length: int, label_smoothing: float = 0.0):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        self.template, self.max_length, self.label_smoothing = template, max_length, label_smoothing

    def prompts(self, questions: list[str], docs: list[dict]) -> list[str]:
        return build_prompts(questions, docs, self.tokenizer, self.template, len(docs[0]["title"]))

    def answer_logprobs(
        self, questions: list[str], docs: list[dict], answers: list[str], vocab: bool = False
    ) -> tuple[torch.Tensor, ...]:
        """log p(y_t | x, z_k, y_<t) of each answer token under each passage (B, n, A), and the (B, A) mask; with
        `vocab`, also the whole next-token distribution at each answer step (B, n, A, V). Never smoothed."""
        raise NotImplementedError

    def loss(
        self,
        questions: list[str],
        docs: list[dict],
        doc_scores: torch.Tensor,
        answers: list[str],
        marginal: str,
        smoothing: float = 0.0,
    ) -> torch.Tensor:
        """Each question's RAG NLL per answer token (B,): one reduction for every family. `smoothing` (training
        only: pass self.label_smoothing) smooths the marginal distribution (rag_marginals.marginal_nll)."""
        token_lp, mask, *vocab = self.answer_logprobs(questions, docs, answers, vocab=bool(smoothing))
        return marginal_nll(token_lp, mask, doc_scores, marginal, smoothing, *vocab)

    def passage_mean_loglik(
        self, questions: list[str], docs: list[dict], answers: list[str], smoothing: float = 0.0
    ) -> torch.Tensor:
        """Mean log-prob per answer token under each passage alone (B, n): how much each passage helps;
        label-smoothed per passage with `smoothing` (each passage is its own prediction here, no mixture)."""
        token_lp, mask, *vocab = self.answer_logprobs(questions, docs, answers, vocab=bool(smoothing))
        if smoothing:
            token_lp = smoothed_token_lp(token_lp, vocab[0], smoothing)
        return (token_lp * mask[:, None]).sum(2) / mask.sum(1, keepdim=True).clamp(min=1)

    def generate(
        self,
        questions: list[str],
        docs: list[dict],
        doc_scores: torch.Tensor,
        max_new_tokens: int,
        marginal: str = "token",
        num_beams: int = 1,
    ) -> list[str]:
        raise NotImplementedError

    def _greedy(self, step, rows: int, max_new_tokens: int, doc_lp: torch.Tensor | None = None) -> list[list[int]]:
        """The one greedy decoding loop of every family. `step(token)` feeds each of the `rows` (question, passage)
        rows its last chosen token (None at the start) and returns their next-token log-probs (rows, V). With
        doc_lp (B, n), the n rows of a question advance together, each token the argmax of
        sum_k p(z_k|x) p(y_t | x, z_k, y_<t) (RAG-token); without, each row alone (RAG-sequence's candidates)."""
        eos = torch.tensor(sorted(self.eos_ids), dtype=torch.long, device=self.device)
        token, steps = None, []
        done = torch.zeros(rows, dtype=torch.bool, device=self.device)
        for _ in range(max_new_tokens):
            logp = step(token)
            if doc_lp is not None:
                logp = marginal_next_token_lp(doc_lp, logp).repeat_interleave(doc_lp.shape[1], 0)
            token = logp.argmax(-1)
            steps.append(token)
            done |= torch.isin(token, eos)
            if done.all():
                break
        return [self._cut(row) for row in torch.stack(steps, 1).tolist()]

    def _rescore(self, inputs, candidates: list[list[int]], doc_lp: torch.Tensor) -> list[list[int]]:
        """RAG-sequence's "thorough" decoding: for each question, its distinct candidates (one per passage) scored
        by log p(y|x) = log sum_k p(z_k|x) p(y | x, z_k) under all n passages; the best."""
        n = doc_lp.shape[1]
        groups = distinct_candidates(candidates, n)
        owners = [b for b, group in enumerate(groups) for _ in group]  # the question of each (question, candidate)
        flat = [list(c) for group in groups for c in group]
        token_lp, mask = self._candidate_logprobs(inputs, owners, flat, n)
        score = sequence_loglik(doc_lp[owners], token_lp, mask)  # log p(y|x), not per token
        best, start = [], 0
        for group in groups:
            best.append(flat[start + int(score[start : start + len(group)].argmax())])
            start += len(group)
        return best

    def _candidate_logprobs(self, inputs, owners: list[int], candidates: list[list[int]], n: int) -> tuple:
        """log p(y_t | x, z_k, y_<t) (R, n, A) of each candidate under its question's n passages, and the mask."""
        raise NotImplementedError

    def _cut(self, ids: list[int]) -> list[int]:
        """A generated row up to and including its first EOS: what follows is noise."""
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def save_pretrained(self, directory: str | Path) -> None:
        self.model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        template: str | None = None,
        max_length: int | None = None,
        label_smoothing: float = 0.0,
        cache_dir: str | None = None,
        **config,
    ):
        """The model at `path` (hub name or directory) in float32 whatever dtype it was saved in (precision.py),
        and its tokenizer; `config` overrides config values (e.g. dropout)."""
        model = cls.auto_class.from_pretrained(path, cache_dir=cache_dir, dtype=LOAD_DTYPE, **config)
        tokenizer = AutoTokenizer.from_pretrained(path, cache_dir=cache_dir)
        return cls(model, tokenizer, template, max_length or cls.default_max_length, label_smoothing)


class Seq2SeqGenerator(RagGenerator):
    """An encoder-decoder generator (BART, T5): the prompt is encoded, the answer decoded from it."""

    family = "seq2seq"
    auto_class = AutoModelForSeq2SeqLM
    default_max_length = 300  # transformers' RAG default (max_combined_length)

    def __init__(self, model, tokenizer, template=None, max_length=300, label_smoothing=0.0):
        super().__init__(model, tokenizer, template or RAG_TEMPLATE, max_length, label_smoothing)
        # The token that ends an answer: the model's own (a BERT-style vocabulary has no tokenizer EOS).
        eos = model.generation_config.eos_token_id
        eos = eos if eos is not None else model.config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if tokenizer.eos_token_id is not None:
            self.eos_ids.add(tokenizer.eos_token_id)

    @classmethod
    def from_pretrained(cls, path, template=None, max_length=None, label_smoothing=0.0, cache_dir=None, **config):
        """As RagGenerator's, with prompts no longer than the model's positions (transformers' RAG default, 300,
        may be more than a small model has)."""
        generator = super().from_pretrained(path, template, max_length, label_smoothing, cache_dir, **config)
        positions = getattr(generator.model.config, "max_position_embeddings", None)
        generator.max_length = min(generator.max_length, positions or generator.max_length)
        return generator

    def _encode(self, prompts: list[str]):
        enc = self.tokenizer(prompts, truncation=True, max_length=self.max_length, padding=True, return_tensors="pt")
        return {k: enc[k].to(self.device) for k in ("input_ids", "attention_mask")}

    def _logprobs(self, enc, labels: torch.Tensor, n: int, vocab: bool = False) -> tuple[torch.Tensor, ...]:
        labels = labels.to(self.device)
        decoder_input_ids = self.model.prepare_decoder_input_ids_from_labels(labels=labels)
        out = self.model(
            input_ids=enc["input_ids"],
            attention_mask=enc["attention_mask"],
            decoder_input_ids=decoder_input_ids,
            use_cache=False,
        )
        logp = out.logits.float().log_softmax(-1)
        is_answer = labels != IGNORE
        token_lp = logp.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
        width = labels.shape[1]
        out = (token_lp * is_answer).view(-1, n, width), is_answer.view(-1, n, width)[:, 0]
        return (*out, logp.view(-1, n, width, logp.shape[-1])) if vocab else out

    def answer_logprobs(self, questions, docs, answers, vocab=False):
        n = len(docs[0]["title"])
        repeated = [a for a in answers for _ in range(n)]
        labels = self.tokenizer(
            text_target=repeated, truncation=True, max_length=self.max_length, padding=True, return_tensors="pt"
        )["input_ids"]
        labels[labels == self.tokenizer.pad_token_id] = IGNORE
        return self._logprobs(self._encode(self.prompts(questions, docs)), labels, n, vocab)

    @torch.no_grad()
    def generate(self, questions, docs, doc_scores, max_new_tokens, marginal="token", num_beams=1):
        """RAG-token: greedy over the marginal next-token distribution. RAG-sequence: a (beam) candidate per
        passage, kept by its marginal likelihood over all passages ("thorough" decoding)."""
        n = len(docs[0]["title"])
        enc = self._encode(self.prompts(questions, docs))
        doc_lp = doc_scores.float().log_softmax(1).to(self.device)
        if marginal == "sequence":
            out = self.model.generate(**enc, max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False)
            candidates = [self._cut(row[1:]) for row in out.tolist()]  # without the decoder start token
            best = self._rescore(enc, candidates, doc_lp)
        else:
            best = self._greedy(self._decoder(enc), len(enc["input_ids"]), max_new_tokens, doc_lp)[::n]
        return [self.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in best]

    def _cut(self, ids: list[int]) -> list[int]:
        """Up to and including the first EOS, without padding."""
        end = next((t + 1 for t, i in enumerate(ids) if i in self.eos_ids), len(ids))
        return [i for i in ids[:end] if i != self.tokenizer.pad_token_id]

    def _decoder(self, enc):
        """The decoder's `step` for RagGenerator._greedy: the prompts encoded once, the decoder's cache carried."""
        encoder_outputs = self.model.get_encoder()(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        start = torch.full((len(enc["input_ids"]), 1), self.model.config.decoder_start_token_id, device=self.device)
        past = None

        def step(token: torch.Tensor | None) -> torch.Tensor:
            nonlocal past
            out = self.model(
                encoder_outputs=encoder_outputs,
                attention_mask=enc["attention_mask"],
                decoder_input_ids=start if token is None else token[:, None],
                past_key_values=past,
                use_cache=True,
            )
            past = out.past_key_values
            return out.logits[:, -1].float().log_softmax(-1)

        return step

    def _candidate_logprobs(self, enc, owners, candidates, n):
        rows = [c for c in candidates for _ in range(n)]
        width = max(len(r) for r in rows) or 1
        labels = torch.tensor([r + [IGNORE] * (width - len(r)) for r in rows])
        prompt_rows = torch.tensor([b * n + k for b in owners for k in range(n)], device=self.device)
        return self._logprobs({k: v[prompt_rows] for k, v in enc.items()}, labels, n)


class CausalGenerator(RagGenerator):
    """A decoder-only generator (any AutoModelForCausalLM): the answer follows each prompt; labels on it only."""

    family = "causal"
    auto_class = AutoModelForCausalLM

    def __init__(self, model, tokenizer, template=None, max_length=512, label_smoothing=0.0):
        super().__init__(model, tokenizer, template, max_length, label_smoothing)
        self._has_logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.eos_ids = set() if tokenizer.eos_token_id is None else {tokenizer.eos_token_id}

    def answer_logprobs(self, questions, docs, answers, vocab=False):
        batch = tokenize_for_loss(self.prompts(questions, docs), answers, self.tokenizer, self.max_length)
        logits, labels = self._logits({k: v.to(self.device) for k, v in batch.items()})
        return answer_logprobs(logits, labels, len(docs[0]["title"]), vocab)

    def _logits(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Generator logits of packed rows from the earliest answer's last prompt token on (`logits_to_keep`:
        the prompts' own (T, V) predictions are never used and dominate memory), and the matching labels."""
        first_answer = int((batch["labels"] != IGNORE).int().argmax(1).min())
        keep = {"logits_to_keep": batch["labels"].shape[1] - first_answer + 1} if self._has_logits_to_keep else {}
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False, **keep)
        return out.logits, batch["labels"][:, -out.logits.shape[1] :]

    @torch.no_grad()
    def generate(self, questions, docs, doc_scores, max_new_tokens, marginal="token", num_beams=1):
        """Greedy answers (num_beams does not apply): RAG-token decodes the marginal next-token distribution;
        RAG-sequence decodes one candidate per passage and keeps the most likely under all passages."""
        tok = self.tokenizer
        if max_new_tokens < 1:
            return [""] * len(questions)
        n = len(docs[0]["title"])
        doc_lp = doc_scores.float().log_softmax(1).to(self.device)
        room = self.max_length - max_new_tokens
        prompt_ids = [
            truncate_left(ids, room, tok.bos_token_id) for ids in encode_prompts(self.prompts(questions, docs), tok)
        ]
        step = self._decoder(prompt_ids)
        if marginal == "token":
            answers = self._greedy(step, len(prompt_ids), max_new_tokens, doc_lp)[::n]
        else:
            answers = self._rescore(prompt_ids, self._greedy(step, len(prompt_ids), max_new_tokens), doc_lp)
        return [tok.decode(a, skip_special_tokens=True).strip() for a in answers]

    def _cut(self, ids: list[int]) -> list[int]:
        eos = next(iter(self.eos_ids), None)
        return ids[: ids.index(eos) + 1] if eos in ids else ids

    def _decoder(self, prompt_ids: list[list[int]]):
        """The model's `step` for RagGenerator._greedy: the prompts left-padded so that every row's next token
        lines up, positions counting real tokens only, the cache carried."""
        pad = pad_id(self.tokenizer)
        width = max(len(p) for p in prompt_ids)
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompt_ids], device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids], device=self.device)
        position_ids = (mask.cumsum(1) - 1).clamp(min=0)
        keep = {"logits_to_keep": 1} if self._has_logits_to_keep else {}
        past = None

        def step(token: torch.Tensor | None) -> torch.Tensor:
            nonlocal input_ids, mask, position_ids, past
            if token is not None:
                input_ids, position_ids = token[:, None], position_ids[:, -1:] + 1
                mask = torch.cat([mask, mask.new_ones(len(mask), 1)], 1)
            out = self.model(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=position_ids,
                past_key_values=past,
                use_cache=True,
                **keep,
            )
            past = out.past_key_values
            return out.logits[:, -1].float().log_softmax(-1)

        return step

    def _candidate_logprobs(self, prompt_ids, owners, candidates, n):
        rows_prompt = [prompt_ids[b * n + k] for b in owners for k in range(n)]
        rows_answer = [c for c in candidates for _ in range(n)]
        tok = self.tokenizer
        batch = pack(rows_prompt, rows_answer, pad_id(tok), self.max_length, tok.bos_token_id)
        logits, labels = self._logits({k: v.to(self.device) for k, v in batch.items()})
        return answer_logprobs(logits, labels, n)


GENERATORS = {cls.family: cls for cls in (Seq2SeqGenerator, CausalGenerator)}


@dataclass
class Retrieved:
    """One batch's retrieval: question vectors (in the graph), doc scores (B, n), passages and their KB rows."""

    q: torch.Tensor
    doc_scores: torch.Tensor
    docs: list[dict]
    ids: np.ndarray


class RagModel(torch.nn.Module):
    """Question encoder -> retriever -> doc scores -> generator. With a context encoder, the doc scores use
    fresh in-graph embeddings of the retrieved passages (their gradient trains it); else the KB's stored ones.
    The question encoder's vectors carry 1/tau (rag_encoders.PooledEncoder): doc scores are similarity / tau."""

    def __init__(
        self,
        question_encoder: torch.nn.Module,
        question_tokenizer,
        generator: RagGenerator | None = None,
        retriever=None,
        n_docs: int = 5,
        marginal: str = "token",
        ctx_encoder: torch.nn.Module | None = None,
        ctx_tokenizer=None,
        question_prefix: str = "",
        rerank_top: int = 0,
        question_max_length: int | None = None,
        generation: Generation | None = None,
    ):
        super().__init__()
        if marginal not in MARGINALS:
            raise ValueError(f"marginal {marginal!r}: use 'token' or 'sequence'")
        if (ctx_encoder is None) != (ctx_tokenizer is None):
            raise ValueError("give both ctx_encoder and ctx_tokenizer, or neither")
        check_tokenizer(question_tokenizer, question_encoder, "question encoder")
        if ctx_encoder is not None:
            check_tokenizer(ctx_tokenizer, ctx_encoder, "context encoder")
        self.question_encoder, self.question_tokenizer = question_encoder, question_tokenizer
        self.generator = generator
        self.ctx_encoder, self.ctx_tokenizer = ctx_encoder, ctx_tokenizer
        self.retriever = retriever
        self.n_docs, self.marginal = n_docs, marginal
        self.question_prefix = question_prefix  # callers put it before the questions they tokenise
        self.rerank_top = rerank_top
        self.question_max_length = question_max_length  # the truncation of questions in training (None: default)
        self.generation = generation or Generation()  # how the run decoded its test answers

    # ------------------------------------------------------------------ retrieval

    def encode_questions(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.question_encoder(input_ids, attention_mask=attention_mask)[0]

    def tokenize_questions(self, questions: list[str]) -> dict[str, torch.Tensor]:
        """input_ids and attention_mask of questions, with the prefix and truncation training used."""
        texts = [self.question_prefix + q for q in questions]
        enc = self.question_tokenizer(
            texts,
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=self.question_max_length or QUESTION_MAX_LENGTH,
        )
        device = next(self.question_encoder.parameters()).device
        return {k: enc[k].to(device) for k in ("input_ids", "attention_mask")}

    def set_context_encoder_for_training(self, ctx_encoder: torch.nn.Module) -> None:
        """The reference's setter (transformers' `RagModel.set_context_encoder_for_training`): doc scores then come
        from `ctx_encoder`'s fresh embeddings of the retrieved passages, whose gradient trains it. Its tokenizer
        comes with `set_ctx_encoder_tokenizer` (the reference set it on the retriever; here the model encodes)."""
        self.ctx_encoder = ctx_encoder

    def set_ctx_encoder_tokenizer(self, ctx_tokenizer) -> None:
        """The reference's `RagRetriever.set_ctx_encoder_tokenizer`: the tokenizer of the context encoder."""
        self.ctx_tokenizer = ctx_tokenizer

    def encode_passages(self, titles: list[str], texts: list[str]) -> torch.Tensor:
        """Fresh (len, d) embeddings of passages from the context encoder, in the autograd graph."""
        enc = self.ctx_tokenizer(titles, texts, truncation=True, padding="longest", return_tensors="pt")
        enc = enc.to(next(self.ctx_encoder.parameters()).device)
        return self.ctx_encoder(enc["input_ids"], attention_mask=enc["attention_mask"], return_dict=True).pooler_output

    def search(self, q: torch.Tensor, n: int, embeddings: bool = True) -> tuple[np.ndarray | None, np.ndarray, list]:
        """The KB's top-n for each question vector: stored embeddings (B, n, d) (None may come back unless
        `embeddings`), rows (B, n) and passages."""
        if self.retriever is None:
            raise ValueError(
                f"no KB to retrieve from: the checkpoint names none (no {KB_VERSION_FILE}); attach one with "
                "model.attach_kb((passages_path, index_path)), or load with RagModel.from_pretrained(path, kb=...)"
            )
        return self.retriever.retrieve(q.detach().float().cpu().numpy(), n, embeddings=embeddings)

    @torch.no_grad()
    def question_vectors(self, questions: list[str], batch_size: int = 32) -> list[torch.Tensor]:
        """The questions' vectors, a tensor per `batch_size` questions, the question encoder in eval mode (then as it
        was): what retrieval metrics search with (top_passages, the staleness measure)."""
        encoder = self.question_encoder
        was_training = encoder.training
        encoder.eval()
        try:
            return [
                self.encode_questions(**self.tokenize_questions(questions[start : start + batch_size]))
                for start in range(0, len(questions), batch_size)
            ]
        finally:
            encoder.train(was_training)

    @torch.no_grad()
    def top_passages(self, questions: list[str], n: int, batch_size: int = 32) -> tuple[list[list[int]], list[dict]]:
        """Each question's top-n KB rows and passages: what recall@k and MRR@k score, in training (the live index)
        and offline alike."""
        ids, docs = [], []
        for q in self.question_vectors(questions, batch_size):
            _, batch_ids, batch_docs = self.search(q, n, embeddings=False)
            ids += np.asarray(batch_ids).tolist()
            docs += list(batch_docs)
        return ids, docs

    def retrieve(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_docs: int | None = None) -> Retrieved:
        """Top-n passages and their doc scores. With `rerank_top` L > n and a context encoder, L passages are
        fetched from the (possibly stale) index and re-ranked with fresh embeddings first (Atlas)."""
        n = n_docs or self.n_docs
        q = self.encode_questions(input_ids, attention_mask)
        fresh = self.ctx_encoder is not None
        if fresh and self.ctx_tokenizer is None:
            raise ValueError("a context encoder without its tokenizer: call set_ctx_encoder_tokenizer(tokenizer)")
        fetch = max(n, self.rerank_top) if fresh else n
        stored, ids, docs = self.search(q, fetch, embeddings=not fresh)  # fresh: the passages are re-encoded
        if fetch > n:
            with torch.no_grad():
                d = self.encode_passages(*_flat(docs)).view(len(q), fetch, -1)
                keep = passage_scores("bd,bnd->bn", q, d, self.question_encoder).topk(n, dim=1).indices.cpu().numpy()
            ids = np.take_along_axis(np.asarray(ids), keep, 1)
            docs = [{key: [doc[key][k] for k in row] for key in ("title", "text")} for doc, row in zip(docs, keep)]
        if fresh:
            d = self.encode_passages(*_flat(docs)).view(len(q), n, -1)
        else:
            d = torch.tensor(np.asarray(stored), device=q.device)  # a copy: Ray hands read-only arrays
        return Retrieved(q, passage_scores("bd,bnd->bn", q, d, self.question_encoder), docs, np.asarray(ids))

    # ------------------------------------------------------------------ the RAG loss and generation

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, questions: list[str], answers: list[str]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each question's RAG NLL per answer token (B,), and the doc scores (B, n)."""
        r = self.retrieve(input_ids, attention_mask)
        return self.generator.loss(questions, r.docs, r.doc_scores, answers, self.marginal), r.doc_scores

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        questions: list[str],
        max_new_tokens: int = 32,
        num_beams: int = 1,
    ) -> list[str]:
        """Answers decoded over the retrieved passages; dropout stays as the caller set it (call `.eval()`)."""
        if self.generator is None:
            raise ValueError("this model has no generator (a retriever_only checkpoint): evaluate its retrieval")
        r = self.retrieve(input_ids, attention_mask)
        return self.generator.generate(questions, r.docs, r.doc_scores, max_new_tokens, self.marginal, num_beams)

    @torch.no_grad()
    def answer(
        self,
        questions: list[str],
        max_new_tokens: int | None = None,
        num_beams: int | None = None,
        n_docs: int | None = None,
    ) -> list[dict]:
        """Each question's answer (None without a generator: a retriever_only checkpoint) and the passages it drew
        on, best first: KB row `id`, `title`, `text`, `score` (the doc score, similarity / tau) and `probability`
        (p(z|x), their softmax). Decoding defaults to the run's (`generation`); call `.eval()` first. An empty
        question, or `n_docs` outside 1..the KB's size, is refused (ValueError)."""
        empty = [i for i, q in enumerate(questions) if not str(q).strip()]
        if not questions or empty:
            raise ValueError(f"question {empty[0] + 1} of {len(questions)} is empty" if empty else "no question given")
        if n_docs is not None:
            self._check_n_docs(n_docs, "n_docs")
        enc = self.tokenize_questions(questions)
        r = self.retrieve(enc["input_ids"], enc["attention_mask"], n_docs)
        answers = [None] * len(questions)
        if self.generator is not None:
            g = self.generation.decoding(max_new_tokens, num_beams)
            answers = self.generator.generate(
                questions, r.docs, r.doc_scores, g.max_new_tokens, self.marginal, g.num_beams
            )
        scores, probs = r.doc_scores.float().cpu(), r.doc_scores.float().softmax(1).cpu()
        return [
            {
                "question": q,
                "answer": a,
                "passages": [
                    {
                        "id": int(r.ids[b][k]),
                        "title": r.docs[b]["title"][k],
                        "text": r.docs[b]["text"][k],
                        "score": float(scores[b, k]),
                        "probability": float(probs[b, k]),
                    }
                    for k in scores[b].argsort(descending=True, stable=True).tolist()  # best first, whatever
                ],  # the index's order (fresh doc scores rank re-encoded passages anew)
            }
            for b, (q, a) in enumerate(zip(questions, answers))
        ]

    # ------------------------------------------------------------------ saving and loading

    def settings(self) -> RagSettings:
        """What rag_settings.json holds for this model as it stands: everything but weights that reproduces its
        retrieval, prompts and decoding, each part's own settings read from the part (a learned tau's value now)."""
        g = self.generator
        return RagSettings(
            n_docs=self.n_docs,
            marginal=self.marginal,
            question_prefix=self.question_prefix,
            question_max_length=self.question_max_length,
            rerank_top=self.rerank_top,
            # fresh: doc scores from the context encoder's embeddings of the retrieved passages (saved beside)
            doc_scores="fresh" if self.ctx_encoder is not None else "stored",
            generation=self.generation,
            passage_prefix=getattr(self.ctx_tokenizer, "prefix", None),
            question_encoder=encoder_scoring(self.question_encoder),
            generator_family=g.family if g is not None else None,
            template=g.template if g is not None else None,
            max_length=g.max_length if g is not None else None,
            label_smoothing=g.label_smoothing if g is not None else 0.0,
        )

    def save_pretrained(self, directory: str | Path) -> None:
        """question_encoder/, generator/ and context_encoder/ (each with its tokenizer, LoRA adapters merged into
        the weights) and rag_settings.json; with a LoRA generator also generator_adapter/ (peft's adapter alone,
        which export_model.py --adapters ships beside the base model)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        merged(self.question_encoder).save_pretrained(directory / "question_encoder")  # LoRA folded in
        self.question_tokenizer.save_pretrained(directory / "question_encoder")
        if self.generator is not None:
            merged(self.generator).save_pretrained(directory / "generator")
            if has_lora(self.generator):
                self.generator.model.save_pretrained(directory / "generator_adapter")  # the PeftModel: adapter only
        if self.ctx_encoder is not None:
            merged(self.ctx_encoder).save_pretrained(directory / "context_encoder")
            self.ctx_tokenizer.save_pretrained(directory / "context_encoder")
        self.settings().to_json(directory / SETTINGS_FILE)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        retriever=None,
        load_generator: bool = True,
        load_context_encoder: bool | None = None,
        cache_dir: str | None = None,
        kb: tuple[str, str] | None = None,
        settings: RagSettings | None = None,
        generator: RagGenerator | None = None,
        context_encoder: tuple[torch.nn.Module, object] | None = None,
        **overrides,
    ) -> RagModel:
        """What `save_pretrained` (or export_model.py) wrote, or a transformers RAG checkpoint (hub name or
        directory, e.g. facebook/rag-token-base), built from settings: `settings` (e.g. `checkpoint_settings(path)`
        as a run's flags change it), else the checkpoint's own, with `overrides` (RagSettings fields: n_docs,
        marginal, ...) replaced. The question encoder loads with the settings' scoring, the generator with their
        template, length and smoothing. The context encoder loads when the settings' doc scores came from it
        (None), or as told. `generator` and `context_encoder` (encoder, tokenizer) are parts to use instead of the
        checkpoint's (assembly's, where the checkpoint holds none). Without a `retriever`, the model searches in
        this process the KB `kb` (passages, index) or else the KB version the checkpoint names (its
        kb_version.json): the one its weights were trained against."""
        refuse_training_state(path)
        directory = Path(path)
        ours = (directory / SETTINGS_FILE).is_file()
        if not ours and directory.is_dir() and not (directory / "config.json").is_file():
            raise FileNotFoundError(
                f"{path}: not a checkpoint (no {SETTINGS_FILE}, no config.json): give a "
                "checkpoint<step> of finetune_rag.py or an export_model.py export"
            )
        settings = (settings or checkpoint_settings(path, cache_dir)).replace(**overrides)
        load_generator = load_generator and generator is None
        if ours:
            if load_context_encoder is None:
                load_context_encoder = settings.doc_scores == "fresh"
            load_context_encoder = load_context_encoder and context_encoder is None
            q, q_tok, loaded, ctx = _load_parts(directory, settings, load_generator, load_context_encoder)
        else:
            (q, q_tok, loaded), ctx = _transformers_rag_parts(str(path), settings, load_generator, cache_dir), None
        ctx_encoder, ctx_tokenizer = context_encoder or ctx or (None, None)
        model = cls(
            q,
            q_tok,
            generator or loaded,
            retriever,
            n_docs=settings.n_docs,
            marginal=settings.marginal,
            ctx_encoder=ctx_encoder,
            ctx_tokenizer=ctx_tokenizer,
            question_prefix=settings.question_prefix,
            rerank_top=settings.rerank_top,
            question_max_length=settings.question_max_length,
            generation=settings.generation,
        )
        kb = kb or (checkpoint_kb(directory) if ours else None)
        return model.attach_kb(kb) if retriever is None and kb else model

    def attach_kb(self, kb: tuple[str, str]) -> RagModel:
        """Search the KB (passages, index) in this process (kb_search.KBSearch); returns the model. A KB of fewer
        passages than n_docs is refused (FAISS would fill the rest with the best hit again)."""
        self.retriever = KBSearch(*kb, self.question_encoder.config.hidden_size)
        self._check_n_docs(self.n_docs, f"n_docs (rag_settings.json) for the KB {kb[0]}")
        return self

    def _check_n_docs(self, n_docs: int, what: str) -> None:
        """1 <= n_docs <= the KB's size (when the retriever knows it), else a one-line ValueError naming `what`."""
        size = len(self.retriever) if hasattr(self.retriever, "__len__") else None
        if not isinstance(n_docs, int) or n_docs < 1 or (size is not None and n_docs > size):
            raise ValueError(f"{what}: {n_docs!r} passages per question; give 1 to the KB's size ({size or '?'})")


def checkpoint_settings(path: str | Path, cache_dir: str | None = None) -> RagSettings:
    """The settings a checkpoint was saved with: its rag_settings.json, or for a transformers RAG checkpoint
    (RagToken/RagSequenceForGeneration) those its config implies: its DPR question encoder scoring by dot products
    at tau 1, its BART/T5 generator prompted as transformers' RAG prompts it."""
    file = Path(path) / SETTINGS_FILE
    if file.is_file():
        return RagSettings.from_json(file)
    config = RagConfig.from_pretrained(str(path), cache_dir=cache_dir)
    return RagSettings(
        n_docs=config.n_docs,
        marginal="sequence" if "RagSequenceForGeneration" in (config.architectures or []) else "token",
        question_prefix=getattr(config.question_encoder, "prefix", None) or "",
        question_encoder=Scoring(similarity="dot"),
        generator_family=Seq2SeqGenerator.family,
        template=(getattr(config.generator, "prefix", None) or "") + RAG_TEMPLATE,
        max_length=config.max_combined_length,
    )


def _load_parts(directory: Path, settings: RagSettings, load_generator: bool, load_context_encoder: bool) -> tuple:
    """(question encoder, its tokenizer, generator or None, (context encoder, tokenizer) or None) of a directory
    that save_pretrained wrote, each built as `settings` say. A part that the settings say is there but is not (an
    interrupted save, a checkpoint being removed) is refused naming it, not met as the hub's "Repo id" error."""
    parts = ["question_encoder", *(["generator"] if load_generator and settings.generator_family else [])]
    missing = [f"{name}/" for name in parts if not (directory / name / "config.json").is_file()]
    if missing:
        raise FileNotFoundError(
            f"{directory}: not a complete checkpoint: {' and '.join(missing)} missing beside its {SETTINGS_FILE} (a "
            "save that was interrupted, or a checkpoint being replaced); give a complete checkpoint<step> or export"
        )
    scoring = settings.question_encoder
    q = load_encoder(
        str(directory / "question_encoder"),
        scoring.pooling,
        side="question",
        similarity=scoring.similarity,
        temperature=scoring.temperature,
        learn_temperature=scoring.learn_temperature,
    )
    generator = None
    if load_generator and settings.generator_family:
        if settings.generator_family not in GENERATORS:
            raise ValueError(
                f"{directory / SETTINGS_FILE}: generator_family {settings.generator_family!r}: use one "
                f"of {', '.join(GENERATORS)}"
            )
        generator = GENERATORS[settings.generator_family].from_pretrained(
            str(directory / "generator"), settings.template, settings.max_length, settings.label_smoothing
        )
    ctx = None
    if load_context_encoder and (directory / "context_encoder").is_dir():
        ctx = (
            load_encoder(str(directory / "context_encoder"), side="context"),
            load_tokenizer(str(directory / "context_encoder"), settings.passage_prefix),
        )
    return q, load_tokenizer(str(directory / "question_encoder")), generator, ctx


def _transformers_rag_parts(name: str, settings: RagSettings, load_generator: bool, cache_dir: str | None) -> tuple:
    """(question encoder, its tokenizer, generator or None) of a transformers RAG checkpoint: its DPR question
    encoder (scoring as `settings` say) and its BART/T5 generator, in float32 (precision.py)."""
    config = RagConfig.from_pretrained(name, cache_dir=cache_dir)
    # float32 parts: RagConfig declares no sub_configs, so transformers builds each part in the dtype its own
    # config declares, whatever `dtype=` says
    config.question_encoder.dtype = config.generator.dtype = LOAD_DTYPE
    # both classes hold the same weights
    rag = RagTokenForGeneration.from_pretrained(name, config=config, cache_dir=cache_dir, dtype=LOAD_DTYPE)
    tokenizer = RagTokenizer.from_pretrained(name, cache_dir=cache_dir)
    generator = None
    if load_generator:
        generator = Seq2SeqGenerator(
            rag.rag.generator,
            tokenizer.generator,
            settings.template,
            settings.max_length or Seq2SeqGenerator.default_max_length,
            settings.label_smoothing,
        )
    s = settings.question_encoder
    # the DPR encoder as it is, unless the settings scale or normalise it (then wrapped as a PooledEncoder)
    q = with_scoring(rag.rag.question_encoder, s.similarity, s.temperature, bool(s.learn_temperature))
    return q, tokenizer.question_encoder, generator


def is_rag_checkpoint(path: str) -> bool:
    """A directory this module saved, or a transformers RAG checkpoint (by its config's model_type)."""
    if (Path(path) / SETTINGS_FILE).is_file():
        return True
    try:
        return AutoConfig.from_pretrained(path).model_type == "rag"
    except (OSError, ValueError):
        return False


def _flat(docs: list[dict]) -> tuple[list[str], list[str]]:
    return [t for d in docs for t in d["title"]], [t for d in docs for t in d["text"]]


__all__ = ["DEFAULT_TEMPLATE", "RAG_TEMPLATE", "CausalGenerator", "RagModel", "Seq2SeqGenerator", "checkpoint_settings"]
