"""Decoder-only generators' side of RAG: each (question, passage) pair becomes one prompt, the answer follows
it, and the loss reads the answer tokens only. Prompts (chat template or `DEFAULT_TEMPLATE`), answer-only
labels, packing, and the answer tokens' log-probs under each passage, which rag_marginals.py marginalises."""

from __future__ import annotations

import torch

from rag_end2end.model.marginals import marginal_nll

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


def answer_logprobs(
    logits: torch.Tensor, labels: torch.Tensor, n_docs: int, vocab: bool = False
) -> tuple[torch.Tensor, ...]:
    """log p(y_t | x, z_k, y_<t) of the answer tokens, aligned across passages: (B, n, A), and the (B, A) mask;
    with `vocab`, also every token's log p(v | x, z_k, y_<t) at the answer steps (B, n, A, V), which label
    smoothing of the marginal needs.

    logits (B*n, T, V) and labels (B*n, T) cover the packed prompt + answer rows; prompts differ in
    length, so each row's answer tokens are gathered to the left of an (A,)-wide grid.
    """
    logits, labels = logits[:, :-1], labels[:, 1:]  # the logits at t predict the token at t + 1
    is_answer = labels != IGNORE
    tokens = labels[is_answer]
    # log_softmax at the answer positions only: the prompt's (much larger) share is never materialised
    logp = logits[is_answer].float().log_softmax(-1)
    token_lp = logp.gather(-1, tokens[:, None]).squeeze(-1)
    rows, _ = is_answer.nonzero(as_tuple=True)
    cols = (is_answer.cumsum(1) - 1)[is_answer]  # the index of each answer token within its answer
    width = int(cols.max()) + 1 if len(cols) else 0
    grid_lp = token_lp.new_zeros(len(labels), width).index_put((rows, cols), token_lp)
    grid_tokens = labels.new_full((len(labels), width), IGNORE).index_put((rows, cols), tokens)
    grid_lp, grid_tokens = grid_lp.view(-1, n_docs, width), grid_tokens.view(-1, n_docs, width)
    if (grid_tokens != grid_tokens[:, :1]).any():
        raise ValueError("the answer tokens differ between the passages of a question: they must be identical")
    if not vocab:
        return grid_lp, grid_tokens[:, 0] != IGNORE
    grid_vocab = logp.new_zeros(len(labels), width, logp.shape[-1]).index_put((rows, cols), logp)
    return grid_lp, grid_tokens[:, 0] != IGNORE, grid_vocab.view(-1, n_docs, width, logp.shape[-1])


def rag_token_loss(logits: torch.Tensor, labels: torch.Tensor, doc_scores: torch.Tensor, n_docs: int) -> torch.Tensor:
    """Per-question (B,) RAG-token NLL per answer token, from packed rows' logits and labels."""
    return marginal_nll(*answer_logprobs(logits, labels, n_docs), doc_scores, "token")


def rag_sequence_loss(
    logits: torch.Tensor, labels: torch.Tensor, doc_scores: torch.Tensor, n_docs: int
) -> torch.Tensor:
    """Per-question (B,) RAG-sequence NLL per answer token, from packed rows' logits and labels."""
    return marginal_nll(*answer_logprobs(logits, labels, n_docs), doc_scores, "sequence")
