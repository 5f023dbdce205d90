"""The RAG marginals every generator family shares: the answer tokens' log-probs under each retrieved passage,
marginalised over the n passages of a question exactly as in Lewis et al. (2020):

    RAG-token:    log p(y|x) = sum_t log sum_k p(z_k|x) p(y_t | x, z_k, y_<t)
    RAG-sequence: log p(y|x) = log sum_k p(z_k|x) prod_t p(y_t | x, z_k, y_<t)

and label smoothing applied to the marginal distribution (as transformers' RAG does), not inside the mixture.
"""

from __future__ import annotations

import torch


def marginal_nll(
    token_lp: torch.Tensor,
    mask: torch.Tensor,
    doc_scores: torch.Tensor,
    marginal: str,
    smoothing: float = 0.0,
    vocab_lp: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-question (B,) RAG NLL per answer token from the answer tokens' log-probs under each passage.

    token_lp (B, n, A): log p(y_t | x, z_k, y_<t); mask (B, A): real answer tokens; doc_scores (B, n).
      token:    -1/|y| sum_t log sum_k p(z_k|x) p(y_t|x,z_k,y_<t)
      sequence: -1/|y| log sum_k p(z_k|x) prod_t p(y_t|x,z_k,y_<t)
    Label smoothing (`smoothing` eps, with `vocab_lp` (B, n, A, V) from answer_logprobs(vocab=True)) smooths
    the marginal next-token distribution p(v | x, y_<t), as transformers' RAG does, not each passage's: a
    passage under which the generator is confident is then not penalised inside the mixture.
    """
    if marginal not in ("token", "sequence"):
        raise ValueError(f"marginal {marginal!r}: use 'token' or 'sequence'")
    doc_lp = doc_scores.float().log_softmax(1)
    length = mask.sum(1).clamp(min=1)
    if marginal == "token":
        nll = -((doc_lp[:, :, None] + token_lp).logsumexp(1) * mask).sum(1)
    else:
        nll = -sequence_loglik(doc_lp, token_lp, mask)
    if not smoothing:
        return nll / length
    if vocab_lp is None:
        raise ValueError("label smoothing of the marginal needs vocab_lp: answer_logprobs(..., vocab=True)")
    # The mixture weights at step t: p(z_k|x) for RAG-token; for RAG-sequence the posterior given the answer so
    # far, p(z_k | x, y_<t), under which sum_t log p(y_t | x, y_<t) is exactly the sequence marginal above.
    weights = doc_lp[:, :, None].expand_as(token_lp)
    if marginal == "sequence":
        before = (token_lp * mask[:, None]).cumsum(2) - token_lp * mask[:, None]
        weights = (weights + before).log_softmax(1)
    mixture = (weights[..., None] + vocab_lp).logsumexp(1)  # (B, A, V): log p(v | x, y_<t)
    uniform_ce = -(mixture.mean(-1) * mask).sum(1)  # cross-entropy of the marginal against the uniform target
    return ((1 - smoothing) * nll + smoothing * uniform_ce) / length


def smoothed_token_lp(token_lp: torch.Tensor, vocab_lp: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Label-smoothed log-likelihood of each answer token under one passage alone (no mixture): the target's
    log-prob with a share `smoothing` of the mean log-prob over the vocabulary."""
    return (1 - smoothing) * token_lp + smoothing * vocab_lp.mean(-1)


def sequence_loglik(doc_lp: torch.Tensor, token_lp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log p(y|x) = log sum_k p(z_k|x) prod_t p(y_t | x, z_k, y_<t) of whole answers (R,), from doc_lp (R, n)
    = log p(z_k|x), token_lp (R, n, A) and the answer mask (R, A): RAG-sequence's loss and its rescoring."""
    return (doc_lp + (token_lp * mask[:, None]).sum(2)).logsumexp(1)


def marginal_next_token_lp(doc_lp: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """log p(v | x, y_<t) = log sum_k p(z_k|x) p(v | x, z_k, y_<t) (B, V): what RAG-token decodes greedily, from
    doc_lp (B, n) and each (question, passage) row's next-token log-probs logp (B*n, V)."""
    return (doc_lp[:, :, None] + logp.view(len(doc_lp), doc_lp.shape[1], -1)).logsumexp(1)


def distinct_candidates(candidates: list[list[int]], n: int) -> list[list[tuple[int, ...]]]:
    """RAG-sequence decoding's answer candidates (one per passage, n a question) grouped by question, each
    distinct candidate once, in first-seen order."""
    return [list(dict.fromkeys(map(tuple, candidates[b : b + n]))) for b in range(0, len(candidates), n)]
