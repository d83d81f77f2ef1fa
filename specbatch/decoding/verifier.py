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

Several deterministic candidates per row (a DraftTree, e.g. lookahead's n-grams) are verified by
recursive rejection (SpecInfer, Miao et al. 2024, for one-hot drafts): at each depth try the
distinct next tokens x of the candidates still alive, in order; accept x with probability p(x),
else remove x from p (p <- norm(p with p(x) = 0)) and try the next; if none is accepted, sample
from what is left of p. Each trial is the one-hot case above, so the output keeps p exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .sampling import RowSampling, next_tokens, probs_from_logits, sample


@dataclass
class DraftTree:
    """Candidate continuations plus tokens that ride along unverified (lookahead's Jacobi window),
    scored in one target forward. A row's chunk is its last emitted token (index 0) followed by
    tokens[b, : num_tokens[b]] (indices 1, 2, ...)."""

    tokens: torch.Tensor  # [batch, width] long
    num_tokens: list[int]
    depth: torch.Tensor  # [batch, width] long: position after the last emitted token (>= 1)
    visible: torch.Tensor  # [batch, width, width] bool: chunk token i attends to chunk token j
    candidates: list[list[list[int]]]  # per row, candidate chains of chunk indices (>= 1)

    def chunk_visible(self) -> torch.Tensor:
        """[batch, width + 1, width + 1] with the last emitted token: everyone sees it, it sees itself."""
        batch, width = self.tokens.shape
        full = torch.zeros(batch, width + 1, width + 1, dtype=torch.bool, device=self.tokens.device)
        full[:, :, 0] = True
        full[:, 1:, 1:] = self.visible
        return full


@dataclass
class Draft:
    """What a proposer hands the verifier (rows padded to the longest draft)."""

    tokens: torch.Tensor  # [batch, max_k] long; padding beyond num_draft[b] is ignored
    num_draft: list[int]  # K_b per row, 0 allowed (for a tree: its longest candidate)
    probs: torch.Tensor | None = None  # [batch, max_k, vocab] draft distributions q; None = one-hot on tokens
    tree: DraftTree | None = None  # several candidates per row instead of one chain
    source: str = ""  # the method that proposed it, when a proposer chooses among several (auto)


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
    paths: list[list[int]] | None = None  # tree drafts: the chunk indices of the accepted tokens


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


def verify_tree(target_logits: torch.Tensor, tree: DraftTree, sampling: RowSampling) -> Verdict:
    """target_logits [batch, width + 1, vocab] over each row's chunk. Returns, per row, the accepted
    candidate's tokens (as chunk indices in `paths`) and the next token."""
    argmax = target_logits.argmax(-1).tolist()  # [batch][width + 1]
    tokens = tree.tokens.tolist()
    num_accepted, next_token, paths = [], [], []
    for b, candidates in enumerate(tree.candidates):
        path: list[int] = []
        if sampling.all_greedy or bool(sampling.is_greedy[b]):
            for chain in candidates:  # the longest run of argmax matches wins
                n, node = 0, 0
                while n < len(chain) and tokens[b][chain[n] - 1] == argmax[b][node]:
                    node, n = chain[n], n + 1
                if n > len(path):
                    path = chain[:n]
            token = argmax[b][path[-1] if path else 0]
        else:
            path, token = _sample_tree(target_logits[b], tokens[b], candidates, sampling.select([b]))
        num_accepted.append(len(path))
        next_token.append(token)
        paths.append(path)
    return Verdict(num_accepted, next_token, paths)


def _sample_tree(logits: torch.Tensor, tokens: list[int], candidates: list[list[int]], row: RowSampling):
    """Recursive rejection for one sampled row. logits [width + 1, vocab]."""
    generator = row.generators[0]
    path, node, alive = [], 0, list(candidates)
    while True:
        p = probs_from_logits(logits[node][None], row)[0]  # [vocab]
        tried, accepted = set(), None
        for chain in alive:
            if len(chain) <= len(path) or tokens[chain[len(path)] - 1] in tried:
                continue
            x = tokens[chain[len(path)] - 1]
            tried.add(x)
            if float(torch.rand(1, generator=generator)) < float(p[x] / p.sum()):
                accepted = x
                break
            # Rejected: the next trial (or the final sample) draws from norm(p with x removed).
            p = residual_distribution(p, torch.nn.functional.one_hot(torch.tensor(x, device=p.device), p.shape[-1]))
        if accepted is None:
            u = torch.rand(1, generator=generator).to(p.device)
            return path, int(sample(p[None], u)[0])
        alive = [c for c in alive if len(c) > len(path) and tokens[c[len(path)] - 1] == accepted]
        node = alive[0][len(path)]
        path.append(node)
