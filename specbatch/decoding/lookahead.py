"""Lookahead decoding (Fu et al., 2024, "Break the Sequential Dependency of LLM Inference Using
Lookahead Decoding"), batched: no draft model; each row carries a Jacobi window and an n-gram pool.

After a row's last token x (at position s) every step's forward carries, in one chunk:

    lookahead branch   a window of N - 1 levels x W columns. Level 0 is a causal chain after x
                       (w0[j] at s + 1 + j); token (k, j) of level k >= 1 sits at s + 1 + j + k and
                       sees x, w0[0..j] and the tokens (1..k, j) above it: column j is a trajectory
                       of Jacobi iterations.
    verification       up to G candidates from the pool, keyed by x: chains of up to N - 1 tokens at
                       s + 1, s + 2, ..., each seeing x and its own earlier tokens only.

The target scores everything in one forward (a DraftTree: positions and mask as above); the
verifier checks the candidates (verifier.verify_tree). Then the last level's predictions become the
window's newest level and the oldest is dropped, and each column's trajectory (w0[j], w1[j], ...,
w_{N-2}[j], prediction) is an N-gram added to the pool. As in the reference implementation the window
is not realigned when several tokens are accepted: it only feeds the pool, so staleness costs
acceptance, never correctness. The pool also takes every N-gram of the row's prompt and output
(the reference's POOL_FROM_PROMPT), most recent first, G per key.
"""

from __future__ import annotations

import random
import time
from collections import OrderedDict

import torch

from .sampling import RowSampling
from .verifier import Draft, DraftTree


class LookaheadProposer:
    name = "lookahead"

    def __init__(self, window: int = 4, ngram: int = 4, max_candidates: int = 4) -> None:
        if window < 1 or ngram < 2 or max_candidates < 1:
            raise ValueError(
                f"need window >= 1, ngram >= 2, max_candidates >= 1; got {window}, {ngram}, {max_candidates}"
            )
        self.W, self.N, self.G = window, ngram, max_candidates
        self.seconds = 0.0
        self.last_forwards: list[tuple[int, int, float]] = []  # the window rides in the target's forward
        self.scratch_positions = (ngram - 1) * (window + max_candidates)
        levels, width = ngram - 1, (ngram - 1) * window
        # The window's layout, the same for every row: level k, column j at index k * W + j.
        self.window_depth = torch.tensor([1 + j + k for k in range(levels) for j in range(window)])
        self._causal = torch.ones(ngram - 1, ngram - 1, dtype=torch.bool).tril()
        self.window_visible = torch.zeros(width, width, dtype=torch.bool)
        for k in range(levels):
            for j in range(window):
                row = k * window + j
                self.window_visible[row, : j + 1] = True  # x (implicit), w0[0..j]
                for above in range(1, k + 1):
                    self.window_visible[row, above * window + j] = True  # its trajectory
        self._levels: list[list[list[int]] | None] = []
        self._pools: list[dict[int, OrderedDict]] = []
        self._harvested: list[int] = []
        self._riding: list[tuple[int, int]] = []  # (batch row, slot) whose window rode in the last step

    def chunk_tokens(self, k: int) -> int:
        """Tokens per row a step writes besides the last: the window and up to G candidates of up to k."""
        return (self.N - 1) * self.W + self.G * min(k, self.N - 1)

    def start(self, num_slots: int, capacity: int) -> None:
        self._levels = [None] * num_slots
        self._pools = [{} for _ in range(num_slots)]
        self._harvested = [0] * num_slots

    def admit(self, slot: int, prefix) -> None:
        self._levels[slot], self._pools[slot], self._harvested[slot] = None, {}, 0

    def release(self, slot: int) -> None:
        self._pools[slot] = {}

    def _add(self, pool: dict[int, OrderedDict], gram: tuple[int, ...]) -> None:
        entries = pool.setdefault(gram[0], OrderedDict())
        entries.pop(gram[1:], None)
        entries[gram[1:]] = None  # most recent last
        if len(entries) > self.G:
            entries.popitem(last=False)

    def _observe(self, slot: int, seq: list[int]) -> None:
        """Pool every N-gram of the sequence not yet seen; start the window on a new row."""
        pool, n = self._pools[slot], self.N
        for i in range(max(0, self._harvested[slot] - n + 1), len(seq) - n + 1):
            self._add(pool, tuple(seq[i : i + n]))
        self._harvested[slot] = len(seq)
        if self._levels[slot] is None:  # Jacobi needs a starting guess: tokens from the row itself
            rng = random.Random(len(seq) * 7919 + seq[-1])
            self._levels[slot] = [[rng.choice(seq) for _ in range(self.W)] for _ in range(n - 1)]

    def would_verify(self, slot: int, seq: list[int]) -> bool:
        """Whether the pool holds a candidate after the row's last token."""
        self._observe(slot, seq)
        return bool(self._pools[slot].get(seq[-1]))

    def propose(self, slots: list[int], seqs: list[list[int]], num_draft: list[int], sampling: RowSampling) -> Draft:
        t0 = time.perf_counter()
        rows: list[tuple[list[int], list[int], list[list[int]]]] = []  # (tokens, depth, candidates)
        self._riding = []
        for b, (slot, seq, k) in enumerate(zip(slots, seqs, num_draft)):
            if k == 0:
                rows.append(([], [], []))
                continue
            self._observe(slot, seq)
            window = [t for level in self._levels[slot] for t in level]
            self._riding.append((b, slot))
            tokens, depth, candidates, seen = window, self.window_depth.tolist(), [], set()
            for continuation in reversed(self._pools[slot].get(seq[-1], {})):  # most recent first
                chain = list(continuation[:k])
                if tuple(chain) in seen:
                    continue
                seen.add(tuple(chain))
                start = len(tokens) + 1  # chunk index of its first token (the last token is 0)
                candidates.append(list(range(start, start + len(chain))))
                tokens, depth = tokens + chain, depth + list(range(1, len(chain) + 1))
            rows.append((tokens, depth, candidates))
        width = max(len(t) for t, _, _ in rows)
        batch, window_width = len(rows), len(self.window_depth)
        tokens = torch.zeros(batch, width, dtype=torch.long)
        depth = torch.ones(batch, width, dtype=torch.long)
        visible = torch.zeros(batch, width, width, dtype=torch.bool)
        for b, (t, d, candidates) in enumerate(rows):
            tokens[b, : len(t)], depth[b, : len(d)] = torch.tensor(t, dtype=torch.long), torch.tensor(d)
            if t:
                visible[b, :window_width, :window_width] = self.window_visible
            for chain in candidates:  # a candidate is a causal chain of consecutive chunk tokens
                first, n = chain[0] - 1, len(chain)
                visible[b, first : first + n, first : first + n] = self._causal[:n, :n]
        device = sampling.device
        tree = DraftTree(
            tokens.to(device),
            [len(t) for t, _, _ in rows],
            depth.to(device),
            visible.to(device),
            [c for _, _, c in rows],
        )
        self.seconds += time.perf_counter() - t0
        longest = [max((len(c) for c in candidates), default=0) for _, _, candidates in rows]
        return Draft(tree.tokens, longest, tree=tree)

    def accepted(self, slots: list[int], seq_lens: list[int], num_accepted: list[int], logits=None) -> None:
        """The target's predictions at the window's last level: its next level, and N-grams."""
        if logits is None or not self._riding:
            return
        t0 = time.perf_counter()
        last = 1 + (self.N - 2) * self.W  # chunk index of the last level's first column
        rows = torch.tensor([b for b, _ in self._riding], device=logits.device)
        predictions = logits[rows, last : last + self.W].argmax(-1).tolist()  # [riding, W]
        for (_, slot), new_level in zip(self._riding, predictions):
            levels = self._levels[slot]
            for j in range(self.W):
                self._add(self._pools[slot], tuple(level[j] for level in levels) + (new_level[j],))
            self._levels[slot] = levels[1:] + [new_level]
        self._riding = []
        self.seconds += time.perf_counter() - t0
