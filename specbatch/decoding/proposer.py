"""Proposers: every way of drafting implements this one small protocol, and one verifier
(verifier.py) checks them all.

A proposer sees each row as its slot and its token sequence so far (prompt + emitted tokens, the
last of which the target has not yet consumed), and returns up to K draft tokens per row with the
distributions they were drawn from. After verification it is told how many were accepted.
"""

from __future__ import annotations

import time
from typing import Protocol

import torch

from .architecture import decoder_layers
from .cascade_attention import supports_cascade
from .forward import last_logits
from .kv_cache import SlotKVCache
from .sampling import RowSampling, probs_from_logits, sample
from .shared_prefix import SharedPrefix
from .verifier import Draft


def forward_parameters(model) -> int:
    """Parameters a forward multiplies: all but the input embedding (a lookup)."""
    return sum(p.numel() for name, p in model.named_parameters() if "embed_tokens" not in name)


class Proposer(Protocol):
    name: str  # the method, as the steps table records it
    seconds: float  # wall time spent proposing, cumulative
    last_forwards: list[tuple[int, int, float]]  # (rows, tokens, seconds) of each model forward of the last propose
    scratch_positions: int  # target cache positions a step may write beyond a row's token limit (tree drafts)
    # Optional: chunk_tokens(k) -> tokens per row a step writes besides the last token, where it is
    # not k (lookahead's window); the cost model prices a method it has not run yet by it.
    # Optional: parameters and layers -> what a draft forward runs (a draft model's, the layers a
    # layer-skip view keeps); the cost model prices a draft forward not yet run by its share of
    # the target's. Model-free proposers have neither.
    # Optional: shadow(slot, seq, k) -> the tokens propose would draft for that row now, without
    # drafting; a deterministic proposer that needs no model (n-gram lookup) can say so for every
    # row at every step, and the engine learns its acceptance from what the rows emit.
    # Optional: would_verify(slot, seq) -> whether propose would give that row something to
    # verify now; a proposer whose step can carry nothing to verify (lookahead with no pool entry
    # after the last token: its window alone) says so, and a probe, which is run to learn the
    # arm's acceptance, is then a plain step.

    def start(self, num_slots: int, capacity: int) -> None:
        """A new engine run: size per-slot state."""

    def admit(self, slot: int, prefix: SharedPrefix | None) -> None:
        """A new request takes the slot; `prefix` is the shared prefix it reads, if any (a
        proposer with a KV cache reads it too rather than storing it per row)."""

    def release(self, slot: int) -> None:
        """The slot's request is done."""

    def propose(self, slots: list[int], seqs: list[list[int]], num_draft: list[int], sampling: RowSampling) -> Draft:
        """Up to num_draft[b] tokens for each row (0 allowed)."""

    def accepted(self, slots: list[int], seq_lens: list[int], num_accepted: list[int], logits: torch.Tensor) -> None:
        """seq_lens: each row's sequence length when proposing; num_accepted: drafts the target kept;
        logits: the target's [batch, chunk, vocab] of the step (lookahead harvests its window there)."""


class DraftModelProposer:
    """A smaller model of the same vocabulary drafts autoregressively, with its own slot KV cache.

    The draft cache lags by design: before drafting, each row feeds whatever of its sequence the
    draft has not seen (its whole prompt the first time, the bonus token and a fully accepted last
    draft afterwards, or several steps' worth after steps that drafted nothing), so one ragged
    forward does the draft's prefill, its catch-up and its first proposal. After verification the
    draft cache is cut back to the accepted prefix, as the target's is. Rows of a prefix group read
    the draft's KV of the shared prefix, computed once, as the target's rows read the target's.

    confidence_threshold: a row stops drafting once the draft's probability of its own token falls
    below it (0 = never), as in SVIP and Kangaroo's early exit: the tokens after an unsure one are
    rarely accepted.
    """

    name = "draft"

    def __init__(self, model, confidence_threshold: float = 0.0) -> None:
        self.model = model
        self.parameters, self.layers = forward_parameters(model), len(decoder_layers(model))
        self.confidence_threshold = confidence_threshold
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.cache: SlotKVCache | None = None
        self.scratch_positions = 0
        self.seconds = 0.0  # wall time in draft forwards
        self.last_forwards: list[tuple[int, int, float]] = []  # (rows, tokens, seconds) of the last propose

    def start(self, num_slots: int, capacity: int) -> None:
        # The cache is allocated at the first proposal: auto's arms that never draft in a run (a
        # batch of 32 that stays plain) would zero a KV cache each, the layer-skip view's the
        # size of the target's.
        self.cache = None
        self._size = (num_slots, capacity)
        self._prefixes: list[SharedPrefix | None] = [None] * num_slots

    def admit(self, slot: int, prefix: SharedPrefix | None) -> None:
        if prefix is not None and not supports_cascade(self.model):
            prefix = None
        self._prefixes[slot] = prefix
        if self.cache is not None:
            self.cache.reset(slot, prefix)

    def release(self, slot: int) -> None:
        self._prefixes[slot] = None
        if self.cache is not None:
            self.cache.reset(slot)

    def _allocated(self) -> SlotKVCache:
        if self.cache is None:
            self.cache = SlotKVCache(self.model.config, *self._size, self.device, self.dtype)
            for slot, prefix in enumerate(self._prefixes):
                self.cache.reset(slot, prefix)
        return self.cache

    @torch.inference_mode()
    def propose(self, slots: list[int], seqs: list[list[int]], num_draft: list[int], sampling: RowSampling) -> Draft:
        t0 = time.perf_counter()
        batch, max_k = len(slots), max(num_draft)
        vocab = self.model.config.vocab_size
        tokens = torch.zeros(batch, max_k, dtype=torch.long, device=self.device)
        probs = torch.zeros(batch, max_k, vocab, device=self.device)
        drafted = [0] * batch
        live = [b for b in range(batch) if num_draft[b] > 0]
        cache = self._allocated()
        feeds = [seqs[b][cache.position(slots[b]) :] for b in live]
        self.last_forwards = []
        t_forward = time.perf_counter()
        logits = last_logits(self.model, cache, [slots[b] for b in live], feeds)  # [live, vocab]
        self._timed(len(live), sum(len(f) for f in feeds), t_forward)
        for i in range(max_k):
            rows = sampling.select(live)
            q = probs_from_logits(logits, rows)  # [live, vocab]
            d = q.argmax(-1)
            if not rows.all_greedy:
                d = torch.where(rows.is_greedy, d, sample(q, rows.uniforms(1).squeeze(-1)))
            index = torch.tensor(live, device=self.device)
            tokens[index, i] = d
            probs[index, i] = q
            confident = (q.gather(-1, d[:, None]).squeeze(-1) >= self.confidence_threshold).tolist()
            chosen = d.tolist()
            going = []  # (row, its token) of the rows that draft on
            for j, b in enumerate(live):
                drafted[b] += 1
                if drafted[b] < num_draft[b] and confident[j]:
                    going.append((b, chosen[j]))
            if not going:
                break
            live = [b for b, _ in going]
            t_forward = time.perf_counter()
            logits = last_logits(self.model, cache, [slots[b] for b in live], [[t] for _, t in going])
            self._timed(len(live), len(live), t_forward)
        self.seconds += time.perf_counter() - t0
        width = max(drafted)  # a confidence stop can end every row before max_k
        return Draft(tokens[:, :width], drafted, probs[:, :width])

    def _timed(self, rows: int, tokens: int, since: float) -> None:
        self.last_forwards.append((rows, tokens, time.perf_counter() - since))

    def accepted(self, slots: list[int], seq_lens: list[int], num_accepted: list[int], logits=None) -> None:
        for slot, n, a in zip(slots, seq_lens, num_accepted):
            self.cache.truncate(slot, n + a)
