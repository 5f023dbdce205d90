"""RAG with a decoder-only generator (any `AutoModelForCausalLM`): prompts, answer-only labels, the
RAG-token and RAG-sequence marginals, and a `CausalRag` module that trains and generates with them.

transformers' RAG classes only take encoder-decoder generators. Here each (question, passage) pair
becomes one prompt, the answer follows it, and the answer tokens' log-probs are marginalised over the
n passages of a question exactly as in Lewis et al. (2020):

    RAG-token:    log p(y|x) = sum_t log sum_k p(z_k|x) p(y_t | x, z_k, y_<t)
    RAG-sequence: log p(y|x) = log sum_k p(z_k|x) prod_t p(y_t | x, z_k, y_<t)
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rag_encoders import load_encoder

DEFAULT_TEMPLATE = "Context: {title} / {text}\nQuestion: {question}\nAnswer:"
IGNORE = -100  # label of the tokens the loss skips (prompt and padding), as in torch's cross_entropy


def build_prompts(questions: list[str], docs: list[dict], tokenizer, template: str | None, n_docs: int) -> list[str]:
    """One prompt per (question, passage), question-major: q0d0, q0d1, ..., q1d0, ...

    `docs[i]` holds the passages of question i as lists: {"title": [...], "text": [...]}. Without a
    template, a tokenizer with a chat template wraps the default prompt as one user turn.
    """
    chat = template is None and getattr(tokenizer, "chat_template", None)
    template = template or DEFAULT_TEMPLATE
    prompts = []
    for question, passages in zip(questions, docs, strict=True):
        for title, text in zip(passages["title"][:n_docs], passages["text"][:n_docs], strict=True):
            prompt = template.format(title=title, text=text, question=question)
            if chat:
                messages = [{"role": "user", "content": prompt}]
                prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            prompts.append(prompt)
    return prompts


def _add_special_tokens(tokenizer, prompt: str) -> bool:
    # Chat templates write the BOS text themselves: adding it again would double it.
    return tokenizer.bos_token is None or not prompt.startswith(tokenizer.bos_token)


def encode_prompts(prompts: list[str], tokenizer) -> list[list[int]]:
    """Token ids of each prompt, with the tokenizer's usual leading special tokens (e.g. BOS)."""
    return [tokenizer(p, add_special_tokens=_add_special_tokens(tokenizer, p))["input_ids"] for p in prompts]


def encode_answers(prompts: list[str], prompt_ids: list[list[int]], answers: list[str], tokenizer) -> list[list[int]]:
    """Token ids of `sep + answer + eos` as they follow each prompt (sep: a space, unless the prompt ends in one).

    The answer is tokenised together with its prompt, so its first token is the one the model
    generates after the prompt (e.g. "▁Paris", not "▁" + "Paris"); if that tokenisation does not
    extend the prompt's, the answer is tokenised alone.
    """
    out = []
    for prompt, ids, answer in zip(prompts, prompt_ids, answers, strict=True):
        sep = "" if prompt[-1:].isspace() else " "
        full = tokenizer(prompt + sep + answer, add_special_tokens=_add_special_tokens(tokenizer, prompt))["input_ids"]
        if full[: len(ids)] == ids:
            answer_ids = full[len(ids) :]
        else:
            answer_ids = tokenizer(sep + answer, add_special_tokens=False)["input_ids"]
        out.append(answer_ids + [tokenizer.eos_token_id])
    return out


def truncate_left(ids: list[int], room: int, bos_id: int | None) -> list[int]:
    """The last `room` tokens of a prompt (its question and answer cue), keeping a leading BOS."""
    if len(ids) <= room:
        return ids
    if bos_id is not None and ids[0] == bos_id:
        return ids[:1] + ids[len(ids) - room + 1 :]
    return ids[len(ids) - room :]


def pad_id(tokenizer) -> int:
    """The generator's padding id: its pad token, or EOS for tokenizers without one (Llama, GPT-NeoX)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def pack(
    prompt_ids: list[list[int]], answer_ids: list[list[int]], pad: int, max_length: int, bos_id: int | None = None
) -> dict[str, torch.Tensor]:
    """Right-padded prompt + answer rows, with labels only on the answer; prompts are cut from the left."""
    rows, labels = [], []
    for prompt, answer in zip(prompt_ids, answer_ids, strict=True):
        answer = answer[: max_length - 1]  # cut only if the answer alone does not fit
        prompt = truncate_left(prompt, max_length - len(answer), bos_id)
        rows.append(prompt + answer)
        labels.append([IGNORE] * len(prompt) + answer)
    width = max(len(r) for r in rows)
    return {
        "input_ids": torch.tensor([r + [pad] * (width - len(r)) for r in rows]),
        "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
        "labels": torch.tensor([lab + [IGNORE] * (width - len(lab)) for lab in labels]),
    }


def tokenize_for_loss(prompts: list[str], answers: list[str], tokenizer, max_length: int) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask and labels for prompt + answer + eos, the labels on the answer tokens only.

    `answers` holds one answer per prompt, or one per question (then repeated for its passages).
    """
    if len(prompts) % len(answers):
        raise ValueError(f"{len(prompts)} prompts do not split evenly among {len(answers)} answers")
    answers = [a for a in answers for _ in range(len(prompts) // len(answers))]
    prompt_ids = encode_prompts(prompts, tokenizer)
    answer_ids = encode_answers(prompts, prompt_ids, answers, tokenizer)
    return pack(prompt_ids, answer_ids, pad_id(tokenizer), max_length, tokenizer.bos_token_id)


def answer_logprobs(logits: torch.Tensor, labels: torch.Tensor, n_docs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(y_t | x, z_k, y_<t) of the answer tokens, aligned across passages: (B, n, A), and the (B, A) mask.

    logits (B*n, T, V) and labels (B*n, T) cover the packed prompt + answer rows; prompts differ in
    length, so each row's answer tokens are gathered to the left of an (A,)-wide grid.
    """
    logits, labels = logits[:, :-1], labels[:, 1:]  # the logits at t predict the token at t + 1
    is_answer = labels != IGNORE
    tokens = labels[is_answer]
    # log_softmax at the answer positions only: the prompt's (much larger) share is never materialised
    token_lp = logits[is_answer].float().log_softmax(-1).gather(-1, tokens[:, None]).squeeze(-1)
    rows, _ = is_answer.nonzero(as_tuple=True)
    cols = (is_answer.cumsum(1) - 1)[is_answer]  # the index of each answer token within its answer
    width = int(cols.max()) + 1 if len(cols) else 0
    grid_lp = token_lp.new_zeros(len(labels), width).index_put((rows, cols), token_lp)
    grid_tokens = labels.new_full((len(labels), width), IGNORE).index_put((rows, cols), tokens)
    grid_lp, grid_tokens = grid_lp.view(-1, n_docs, width), grid_tokens.view(-1, n_docs, width)
    if (grid_tokens != grid_tokens[:, :1]).any():
        raise ValueError("the answer tokens differ between the passages of a question: they must be identical")
    return grid_lp, grid_tokens[:, 0] != IGNORE


def rag_token_loss(logits: torch.Tensor, labels: torch.Tensor, doc_scores: torch.Tensor, n_docs: int) -> torch.Tensor:
    """Per-question (B,) RAG-token NLL per answer token: -1/|y| sum_t log sum_k p(z_k|x) p(y_t|x,z_k,y_<t)."""
    token_lp, mask = answer_logprobs(logits, labels, n_docs)
    doc_lp = doc_scores.float().log_softmax(1)
    marginal = (doc_lp[:, :, None] + token_lp).logsumexp(1)  # (B, A)
    return -(marginal * mask).sum(1) / mask.sum(1).clamp(min=1)


def rag_sequence_loss(
    logits: torch.Tensor, labels: torch.Tensor, doc_scores: torch.Tensor, n_docs: int
) -> torch.Tensor:
    """Per-question (B,) RAG-sequence NLL per answer token: -1/|y| log sum_k p(z_k|x) prod_t p(y_t|x,z_k,y_<t)."""
    token_lp, mask = answer_logprobs(logits, labels, n_docs)
    doc_lp = doc_scores.float().log_softmax(1)
    marginal = (doc_lp + (token_lp * mask[:, None]).sum(2)).logsumexp(1)  # (B,)
    return -marginal / mask.sum(1).clamp(min=1)


RAG_LOSSES = {"token": rag_token_loss, "sequence": rag_sequence_loss}


class CausalRag(torch.nn.Module):
    """RAG over a decoder-only generator: question encoder -> retriever -> doc scores -> one prompt per passage
    -> generator -> RAG-token or RAG-sequence marginal. With `ctx_encoder`, the doc scores use fresh in-graph
    embeddings of the retrieved passages (end-to-end training); otherwise the retriever's stored ones."""

    def __init__(
        self,
        question_encoder: torch.nn.Module,
        generator: torch.nn.Module,
        question_tokenizer,
        generator_tokenizer,
        retriever,
        n_docs: int = 5,
        mode: str = "token",
        template: str | None = None,
        ctx_encoder: torch.nn.Module | None = None,
        ctx_tokenizer=None,
        max_length: int = 512,
        question_prefix: str = "",
    ):
        super().__init__()
        if mode not in RAG_LOSSES:
            raise ValueError(f"mode {mode!r}: use 'token' or 'sequence'")
        if (ctx_encoder is None) != (ctx_tokenizer is None):
            raise ValueError("give both ctx_encoder and ctx_tokenizer, or neither")
        self.question_encoder = question_encoder
        self.generator = generator
        self.ctx_encoder = ctx_encoder
        self.question_tokenizer = question_tokenizer
        self.generator_tokenizer = generator_tokenizer
        self.ctx_tokenizer = ctx_tokenizer
        self.retriever = retriever
        self.n_docs = n_docs
        self.mode = mode
        self.template = template
        self.max_length = max_length  # of prompt + answer, in generator tokens
        self.question_prefix = question_prefix  # callers put it before questions they tokenise; saved for them
        self._has_logits_to_keep = "logits_to_keep" in inspect.signature(generator.forward).parameters

    @property
    def rag(self) -> CausalRag:
        """Itself: `model.rag.question_encoder` / `model.rag.ctx_encoder` then read alike for this class and
        transformers' RAG models."""
        return self

    def save_pretrained(self, directory: Path) -> None:
        """The question encoder and generator with their tokenizers (the context encoder is saved apart)."""
        for name, model, tokenizer in (
            ("question_encoder", self.question_encoder, self.question_tokenizer),
            ("generator", self.generator, self.generator_tokenizer),
        ):
            model.save_pretrained(directory / name)
            tokenizer.save_pretrained(directory / name)
        settings = {"n_docs": self.n_docs, "mode": self.mode, "template": self.template, "max_length": self.max_length,
                    "question_prefix": self.question_prefix}  # fmt: skip
        (directory / "causal_rag.json").write_text(json.dumps(settings, indent=1))

    @classmethod
    def from_pretrained(cls, directory: str | Path, retriever, **overrides) -> CausalRag:
        """Load what `save_pretrained` wrote, with `retriever` over the matching KB (or None, to be set before
        use); `overrides` (e.g. n_docs) replace saved settings."""
        directory = Path(directory)
        settings = json.loads((directory / "causal_rag.json").read_text()) | overrides
        return cls(
            load_encoder(str(directory / "question_encoder"), side="question"),
            AutoModelForCausalLM.from_pretrained(directory / "generator"),
            AutoTokenizer.from_pretrained(directory / "question_encoder"),
            AutoTokenizer.from_pretrained(directory / "generator"),
            retriever,
            **settings,
        )

    def retrieve(
        self, question_input_ids: torch.Tensor, question_attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, list[dict]]:
        """Doc scores (B, n) = question embedding . passage embedding, and the retrieved passages. The question
        encoder's vectors carry 1/tau (rag_encoders.PooledEncoder), so these are similarity / tau."""
        q = self.question_encoder(question_input_ids, attention_mask=question_attention_mask)[0]  # (B, d)
        stored, _, docs = self.retriever.retrieve(q.detach().float().cpu().numpy(), self.n_docs)
        if self.ctx_encoder is None:
            d = torch.tensor(stored, device=q.device)  # a copy: Ray hands read-only arrays
        else:
            titles = [t for doc in docs for t in doc["title"]]
            texts = [t for doc in docs for t in doc["text"]]
            enc = self.ctx_tokenizer(titles, texts, truncation=True, padding="longest", return_tensors="pt")
            enc = enc.to(q.device)
            d = self.ctx_encoder(enc["input_ids"], attention_mask=enc["attention_mask"], return_dict=True)
            d = d.pooler_output.view(len(q), self.n_docs, -1)
        return torch.einsum("bd,bnd->bn", q.float(), d.float()), docs

    def _logits(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Generator logits of packed rows, and the labels they line up with.

        Only positions from the earliest answer's last prompt token on are kept (`logits_to_keep`):
        the prompts' own predictions are never used, and their (T, V) logits dominate memory.
        """
        first_answer = int((batch["labels"] != IGNORE).int().argmax(1).min())
        keep = {"logits_to_keep": batch["labels"].shape[1] - first_answer + 1} if self._has_logits_to_keep else {}
        out = self.generator(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False, **keep
        )
        return out.logits, batch["labels"][:, -out.logits.shape[1] :]

    def forward(
        self,
        question_input_ids: torch.Tensor,
        question_attention_mask: torch.Tensor,
        questions: list[str],
        answers: list[str],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each question's per-token RAG NLL (B,), and the doc scores (B, n); the caller reduces the batch."""
        doc_scores, docs = self.retrieve(question_input_ids, question_attention_mask)
        prompts = build_prompts(questions, docs, self.generator_tokenizer, self.template, self.n_docs)
        batch = tokenize_for_loss(prompts, answers, self.generator_tokenizer, self.max_length)
        logits, labels = self._logits({k: v.to(doc_scores.device) for k, v in batch.items()})
        return RAG_LOSSES[self.mode](logits, labels, doc_scores, self.n_docs), doc_scores

    @torch.no_grad()
    def generate(
        self,
        question_input_ids: torch.Tensor,
        question_attention_mask: torch.Tensor,
        questions: list[str],
        max_new_tokens: int = 32,
    ) -> list[str]:
        """Greedy answers: RAG-token decodes the marginal next-token distribution; RAG-sequence decodes one
        candidate per passage and keeps the one with the highest marginal likelihood ("thorough" decoding).
        Dropout stays as the caller set it: call `.eval()` first."""
        tok = self.generator_tokenizer
        if max_new_tokens < 1:
            return [""] * len(questions)
        doc_scores, docs = self.retrieve(question_input_ids, question_attention_mask)
        doc_lp = doc_scores.log_softmax(1)
        prompts = build_prompts(questions, docs, tok, self.template, self.n_docs)
        room = self.max_length - max_new_tokens
        prompt_ids = [truncate_left(ids, room, tok.bos_token_id) for ids in encode_prompts(prompts, tok)]
        if self.mode == "token":
            answers = self._greedy(prompt_ids, max_new_tokens, doc_lp)[:: self.n_docs]
        else:
            answers = self._rescore(prompt_ids, self._greedy(prompt_ids, max_new_tokens), doc_lp)
        return [tok.decode(a, skip_special_tokens=True).strip() for a in answers]

    def _greedy(
        self, prompt_ids: list[list[int]], max_new_tokens: int, doc_lp: torch.Tensor | None = None
    ) -> list[list[int]]:
        """Greedy continuation of each prompt, up to and including EOS. With doc_lp (B, n), the n prompts of a
        question advance together, each token the argmax of sum_k p(z_k|x) p(y_t | x, z_k, y_<t) (RAG-token)."""
        pad, eos = pad_id(self.generator_tokenizer), self.generator_tokenizer.eos_token_id
        device = next(self.generator.parameters()).device
        width = max(len(p) for p in prompt_ids)
        # Left padding lines up every row's next token; positions count real tokens only.
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompt_ids], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids], device=device)
        position_ids = (mask.cumsum(1) - 1).clamp(min=0)
        keep = {"logits_to_keep": 1} if self._has_logits_to_keep else {}
        past, steps = None, []
        done = torch.zeros(len(prompt_ids), dtype=torch.bool, device=device)
        for _ in range(max_new_tokens):
            out = self.generator(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=position_ids,
                past_key_values=past,
                use_cache=True,
                **keep,
            )
            past = out.past_key_values
            logp = out.logits[:, -1].float().log_softmax(-1)
            if doc_lp is not None:
                n = doc_lp.shape[1]
                logp = (doc_lp[:, :, None] + logp.view(-1, n, logp.shape[-1])).logsumexp(1).repeat_interleave(n, 0)
            token = logp.argmax(-1)
            steps.append(token)
            done |= token == eos
            if done.all():
                break
            input_ids, position_ids = token[:, None], position_ids[:, -1:] + 1
            mask = torch.cat([mask, mask.new_ones(len(mask), 1)], 1)
        rows = torch.stack(steps, 1).tolist()
        return [row[: row.index(eos) + 1] if eos in row else row for row in rows]  # what follows EOS is noise

    def _rescore(
        self, prompt_ids: list[list[int]], candidates: list[list[int]], doc_lp: torch.Tensor
    ) -> list[list[int]]:
        """For each question, its distinct candidates' RAG-sequence log-likelihood under all n passages; the best."""
        n = self.n_docs
        groups = [list(dict.fromkeys(map(tuple, candidates[b * n : (b + 1) * n]))) for b in range(len(doc_lp))]
        owners = [b for b, group in enumerate(groups) for _ in group]  # the question of each (question, candidate)
        flat = [list(c) for group in groups for c in group]
        rows_prompt = [prompt_ids[b * n + k] for b in owners for k in range(n)]
        rows_answer = [c for c in flat for _ in range(n)]
        tok = self.generator_tokenizer
        batch = pack(rows_prompt, rows_answer, pad_id(tok), self.max_length, tok.bos_token_id)
        logits, labels = self._logits({k: v.to(doc_lp.device) for k, v in batch.items()})
        token_lp, mask = answer_logprobs(logits, labels, n)
        score = (doc_lp[owners] + (token_lp * mask[:, None]).sum(2)).logsumexp(1)  # log p(y|x), not per token
        best, start = [], 0
        for group in groups:
            best.append(flat[start + int(score[start : start + len(group)].argmax())])
            start += len(group)
        return best
