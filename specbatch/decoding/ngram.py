"""Draft-free proposals: n-gram lookup in the request itself, then in what the job has produced.

Prompt lookup (as transformers' prompt_lookup_num_tokens and CopySpec do): find the most recent
earlier occurrence of the row's last n tokens (n = max_ngram down to min_ngram) in its own prompt
and output, and propose the tokens that followed it. Failing that, what the job has taught it, over
every request this proposer has served (offline jobs repeat themselves): a trigram table of the
target's own outputs (as ADED keeps), chaining the most frequent successors; and, where the table
has nothing, a top-k adjacency per token recycled from the target's logits at every position it
verified, accepted or not (Token Recycling, Luo et al. 2024), chaining the top successor.

Drafts are deterministic, so q is one-hot: the verifier accepts d with probability p(d) and on
rejection samples from p with d removed, which keeps the target's distribution exactly.

The lookup is an index per slot (each n-gram of the row's sequence -> its latest start, grown with
the sequence), so a proposal costs a few dict lookups, not a scan of the row. It is cheap enough to
run where the arm does not draft: `shadow` says what the arm would propose for a row, and the
engine scores that against the tokens the row then emits (engine.py, "Shadow drafts").
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict

import torch

from .sampling import RowSampling
from .verifier import Draft


class NgramProposer:
    name = "ngram"

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1, table_size: int = 1 << 20) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.table: dict[tuple[int, int], Counter] = defaultdict(Counter)  # (a, b) -> counts of what followed
        self.table_size = table_size
        self.adjacency: dict[int, list[int]] = {}  # token -> the target's top-k next tokens, last seen
        self.top_k = 4
        self._inputs: list[list[int]] = []  # the last step's verified tokens per row
        self.seconds = 0.0
        self.last_forwards: list[tuple[int, int, float]] = []  # always empty: no model runs
        self.scratch_positions = 0
        self._ingested: list[int] = []  # per slot: how much of its sequence the table has seen
        self._prompt_len: list[int] = []
        self._index: list[dict] = []  # per slot: n-gram (a tuple) -> its latest start followed by a token
        self._indexed: list[tuple[int, int]] = []  # per slot: (length, last token) of the sequence indexed

    def start(self, num_slots: int, capacity: int) -> None:
        self._ingested = [-1] * num_slots
        self._prompt_len = [0] * num_slots
        self._index = [{} for _ in range(num_slots)]
        self._indexed = [(0, -1)] * num_slots

    def admit(self, slot: int, prefix) -> None:
        self._ingested[slot] = -1
        self.release(slot)

    def release(self, slot: int) -> None:
        self._index[slot] = {}
        self._indexed[slot] = (0, -1)

    def _learn(self, slot: int, seq: list[int]) -> None:
        """Add the trigrams of the row's generated tokens (the target's own choices) to the table."""
        if self._ingested[slot] < 0:  # a new request: its prompt is the user's, not the target's
            self._ingested[slot] = self._prompt_len[slot] = len(seq) - 1
        start = max(self._ingested[slot], self._prompt_len[slot], 2)
        if len(self.table) < self.table_size:
            for i in range(start, len(seq)):
                self.table[seq[i - 2], seq[i - 1]][seq[i]] += 1
        self._ingested[slot] = len(seq)

    def _grow(self, slot: int, seq: list[int]) -> dict:
        """The slot's index, extended to every n-gram of seq that some token follows. A sequence
        that is not the indexed one grown (a new request in the slot) is indexed afresh."""
        length, last = self._indexed[slot]
        if length > len(seq) or (length and seq[length - 1] != last):
            self._index[slot], length = {}, 0
        index = self._index[slot]
        for n in range(self.min_ngram, self.max_ngram + 1):
            lo, hi = max(length - n, 0), len(seq) - n
            if hi > lo:  # the n-grams starting in [lo, hi), in order: a later start overwrites
                index.update(zip(zip(*(seq[lo + i : hi + i] for i in range(n))), range(lo, hi)))
        self._indexed[slot] = (len(seq), seq[-1] if seq else -1)
        return index

    def _lookup(self, slot: int, seq: list[int], k: int) -> list[int]:
        index = self._grow(slot, seq)
        for n in range(min(self.max_ngram, len(seq) - 1), self.min_ngram - 1, -1):
            start = index.get(tuple(seq[-n:]))  # the most recent earlier occurrence
            if start is not None:
                return seq[start + n : start + n + k]
        out, a, b = [], seq[-2] if len(seq) > 1 else -1, seq[-1]
        while len(out) < k:
            if (a, b) in self.table:
                nxt = self.table[a, b].most_common(1)[0][0]
            elif b in self.adjacency:
                nxt = self.adjacency[b][0]
            else:
                break
            out.append(nxt)
            a, b = b, nxt
        return out

    def propose(self, slots: list[int], seqs: list[list[int]], num_draft: list[int], sampling: RowSampling) -> Draft:
        t0 = time.perf_counter()
        drafts = []
        for slot, seq, k in zip(slots, seqs, num_draft):
            self._learn(slot, seq)
            drafts.append(self._lookup(slot, seq, k) if k else [])
        self._inputs = [[seq[-1]] + d for seq, d in zip(seqs, drafts)]
        width = max(len(d) for d in drafts)
        tokens = torch.zeros(len(slots), width, dtype=torch.long)
        for b, d in enumerate(drafts):
            tokens[b, : len(d)] = torch.tensor(d, dtype=torch.long)
        self.seconds += time.perf_counter() - t0
        return Draft(tokens.to(sampling.device), [len(d) for d in drafts], probs=None)

    def shadow(self, slot: int, seq: list[int], k: int) -> list[int]:
        """What propose would draft for this row now, at most k tokens, without drafting."""
        self._learn(slot, seq)
        return self._lookup(slot, seq, k)

    def accepted(self, slots: list[int], seq_lens: list[int], num_accepted: list[int], logits=None) -> None:
        """Nothing to roll back (the table learns from emitted tokens, at the next propose); recycle
        the target's top-k after each token it verified this step."""
        if logits is None or not self._inputs:
            return
        t0 = time.perf_counter()
        top = logits[:, : max(len(x) for x in self._inputs)].topk(self.top_k, dim=-1).indices.tolist()
        for inputs, row in zip(self._inputs, top):  # [batch][width][top_k]
            for token, successors in zip(inputs, row):
                self.adjacency[token] = successors
        self._inputs = []
        self.seconds += time.perf_counter() - t0
