"""Logits -> the distribution each row samples from, and seeded sampling from it.

Every row carries its own temperature, top-k and top-p, and its own torch.Generator, so a
request's tokens depend on its seed alone, not on which rows share its batch. Greedy rows
(temperature 0) get the one-hot distribution on their argmax: the same code path serves both,
and the verifier of speculative decoding can treat greedy as sampling from a point mass.
"""

from __future__ import annotations

import torch

from .params import SamplingParams


class RowSampling:
    """Per-row sampling settings as tensors, plus one generator per row."""

    def __init__(
        self,
        params: list[SamplingParams],
        generators: list[torch.Generator] | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        self.temperature = torch.tensor([p.temperature for p in params], device=device)  # [batch]
        self.top_k = torch.tensor([p.top_k for p in params], device=device)  # [batch]
        self.top_p = torch.tensor([p.top_p for p in params], device=device)  # [batch]
        self.is_greedy = self.temperature == 0  # [batch]
        self.all_greedy = bool(self.is_greedy.all())
        self.untruncated = all(p.top_k == 0 and p.top_p >= 1.0 for p in params)
        self.generators = generators or [torch.Generator().manual_seed(p.seed) for p in params]
        self.device = device

    def select(self, indices: list[int]) -> RowSampling:
        """The settings of a subset of rows (sharing their generators)."""
        sub = RowSampling.__new__(RowSampling)
        index = torch.tensor(indices, device=self.temperature.device, dtype=torch.long)
        sub.temperature, sub.top_k, sub.top_p = self.temperature[index], self.top_k[index], self.top_p[index]
        sub.is_greedy = self.is_greedy[index]
        sub.all_greedy = bool(sub.is_greedy.all())
        sub.untruncated = self.untruncated
        sub.generators = [self.generators[i] for i in indices]
        sub.device = self.device
        return sub

    def uniforms(self, num: int = 1) -> torch.Tensor:
        """[batch, num] uniforms in [0, 1), each row from its own generator (drawn on the host)."""
        u = torch.stack([torch.rand(num, generator=g) for g in self.generators])
        return u.to(self.device)


def probs_from_logits(logits: torch.Tensor, rows: RowSampling) -> torch.Tensor:
    """logits [batch, ..., vocab] -> probabilities after temperature, top-k and top-p, per row."""
    batch, vocab = logits.shape[0], logits.shape[-1]
    shape = (batch,) + (1,) * (logits.dim() - 1)
    logits = logits.float()
    greedy_probs = torch.nn.functional.one_hot(logits.argmax(-1), vocab).float()
    if rows.all_greedy:
        return greedy_probs
    temperature = torch.where(rows.is_greedy, 1.0, rows.temperature).view(shape)
    scaled = logits / temperature
    if rows.untruncated:  # no top-k or top-p anywhere: no sort over the vocabulary
        return torch.where(rows.is_greedy.view(shape), greedy_probs, scaled.softmax(-1))
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    rank = torch.arange(vocab, device=logits.device)
    top_k = torch.where(rows.top_k > 0, rows.top_k, vocab).view(shape)
    drop = rank >= top_k  # [batch, ..., vocab], in sorted order
    sorted_probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(-1)
    # top-p: keep the smallest prefix whose mass reaches top_p (the first token always stays).
    mass_before = sorted_probs.cumsum(-1) - sorted_probs
    drop = drop | (mass_before >= rows.top_p.view(shape))  # [batch, ..., vocab]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    probs = torch.empty_like(scaled).scatter_(-1, order, sorted_logits.softmax(-1))
    return torch.where(rows.is_greedy.view(shape), greedy_probs, probs)


def next_tokens(logits: torch.Tensor, rows: RowSampling) -> torch.Tensor:
    """logits [batch, vocab] -> one token per row: argmax for greedy rows, a seeded sample otherwise."""
    if rows.all_greedy:
        return logits.argmax(-1)
    return sample(probs_from_logits(logits, rows), rows.uniforms(1).squeeze(-1))


def sample(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling. probs [batch, vocab] (need not be normalized), u [batch] in [0, 1)
    -> token ids [batch]. side='right' never returns a zero-probability token."""
    cdf = probs.cumsum(-1)  # [batch, vocab]
    x = (u * cdf[:, -1]).unsqueeze(-1)  # [batch, 1]
    return torch.searchsorted(cdf, x, right=True).squeeze(-1).clamp_(max=probs.shape[-1] - 1)
