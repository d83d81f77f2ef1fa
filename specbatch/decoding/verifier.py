"""One verifier for every way of drafting: modified rejection sampling.

Leviathan et al. 2023 ("Fast Inference from Transformers via Speculative Decoding") and Chen et
al. 2023 ("Accelerating LLM Decoding with Speculative Sampling"). For each draft token d_i,
drafted from q_i and scored by the target as p_i:

    accept d_i with probability min(1, p_i(d_i) / q_i(d_i))
      q >= p: accept with probability p/q;  q < p: always accept
    on the first rejection, sample from norm(max(0, p_i - q_i)) and stop
    if all K are accepted, sample a bonus token from p_{K+1}

The output token then has distribution exactly p_i at every position. A deterministic draft
(n-gram lookup, greedy drafting) is a one-hot q: accept with probability p(d), else sample from p
with d removed and renormalized. Greedy rows are the point-mass case: accept while d_i equals
the target's argmax, then emit the argmax; that path uses exact comparisons, no floats.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .sampling import RowSampling, next_tokens, probs_from_logits, sample


@dataclass
class Draft:
    """What a proposer hands the verifier (rows padded to the longest draft)."""

    tokens: torch.Tensor  # [batch, max_k] long; padding beyond num_draft[b] is ignored
    num_draft: list[int]  # K_b per row, 0 allowed
    probs: torch.Tensor | None = None  # [batch, max_k, vocab] draft distributions q; None = one-hot on tokens


def acceptance_probability(p_d: torch.Tensor, q_d: torch.Tensor) -> torch.Tensor:
    """min(1, p(d) / q(d)) for the drafted token d. Where q(d) = 0 (d could not have been drawn),
    the ratio is taken as 1 if p(d) > 0."""
    return torch.where(q_d > 0, (p_d / q_d.clamp_min(1e-30)).clamp(max=1.0), (p_d > 0).to(p_d.dtype))


def residual_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p - q)) over the last dim. If p <= q everywhere (then p == q and rejection has
    probability 0), fall back to p so the result is always a distribution."""
    r = (p - q).clamp_min(0)
    mass = r.sum(-1, keepdim=True)
    return torch.where(mass > 0, r / mass.clamp_min(1e-30), p)


@dataclass
class Verdict:
    num_accepted: list[int]  # accepted draft tokens per row
    next_token: list[int]  # the token after them: residual sample on a rejection, else the bonus


def verify(target_logits: torch.Tensor, draft: Draft | None, sampling: RowSampling) -> Verdict:
    """target_logits [batch, max_k + 1, vocab]: the target's logits at the row's last emitted token
    and at each draft token. Returns how many drafts each row accepts and its next token."""
    batch, width, vocab = target_logits.shape
    device = target_logits.device
    max_k = width - 1
    if draft is None or max_k == 0:
        return Verdict([0] * batch, next_tokens(target_logits[:, 0], sampling).tolist())
    num_draft = torch.tensor(draft.num_draft, device=device)  # [batch]
    tokens = draft.tokens  # [batch, max_k]
    valid = torch.arange(max_k, device=device) < num_draft[:, None]  # [batch, max_k]
    rows = torch.arange(batch, device=device)
    greedy = sampling.is_greedy  # [batch]

    # Greedy rows: accept while the draft equals the target's argmax.
    target_argmax = target_logits.argmax(-1)  # [batch, max_k + 1]
    accept = tokens == target_argmax[:, :max_k]  # [batch, max_k]
    if sampling.all_greedy:
        num_accepted = (accept & valid).long().cumprod(-1).sum(-1)  # [batch]
        return Verdict(num_accepted.tolist(), target_argmax[rows, num_accepted].tolist())

    p = probs_from_logits(target_logits, sampling)  # [batch, max_k + 1, vocab]
    q = draft.probs if draft.probs is not None else torch.nn.functional.one_hot(tokens, vocab).to(p.dtype)
    u = sampling.uniforms(max_k + 1)  # [batch, max_k + 1]: one per draft, one for the next token
    p_d = p[:, :max_k].gather(-1, tokens[..., None]).squeeze(-1)  # [batch, max_k]
    q_d = q.gather(-1, tokens[..., None]).squeeze(-1)  # [batch, max_k]
    accept = torch.where(greedy[:, None], accept, u[:, :max_k] < acceptance_probability(p_d, q_d))
    num_accepted = (accept & valid).long().cumprod(-1).sum(-1)  # [batch]

    p_next = p[rows, num_accepted]  # [batch, vocab]
    rejected = num_accepted < num_draft  # [batch]
    q_next = q[rows, num_accepted.clamp(max=max_k - 1)] * rejected[:, None]  # [batch, vocab]
    sampled = sample(residual_distribution(p_next, q_next), u[:, max_k])
    next_token = torch.where(greedy, target_argmax[rows, num_accepted], sampled)
    return Verdict(num_accepted.tolist(), next_token.tolist())
