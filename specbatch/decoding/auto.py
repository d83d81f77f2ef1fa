"""--method auto: choose the proposer step by step from measured goodput.

Arms: plain decoding ("ar": propose nothing) and every proposer the job can use (ngram, lookahead,
layerskip, and draft when a draft model is given). Each step's goodput is the tokens it emitted
(accepted drafts plus one per row) over the wall time from its proposal to the next step's, so the
draft's forwards, a wider target forward, the verifier and the per-token bookkeeping are all paid for. The arms are first tried in
turn (`warmup` steps each, interleaved, so they see the same batches), then the arm with the best
running mean (exponential, `decay`) is used. Estimates go stale while an arm sits out, so every
`contend_every` steps a close contender (within `contend_ratio` of the best) gets a step, and every
`probe_every` steps the arm tried least recently does, whatever its estimate: a change in the job
(other prompts, a smaller batch at the tail) is noticed without paying often for a clearly worse arm. Each step's choice goes to the Draft's `source` and from there to the `steps` table.

All arms see every admission and release; only the arm that proposed is told what was accepted.
The draft-model arms catch up lazily on steps they sat out, so switching costs one wider draft
forward, never correctness: the verifier checks whatever is proposed.
"""

from __future__ import annotations

import time

import torch

from .sampling import RowSampling
from .verifier import Draft


class AutoProposer:
    name = "auto"

    def __init__(
        self,
        arms: dict,
        warmup: int = 3,
        contend_every: int = 4,
        contend_ratio: float = 0.75,
        probe_every: int = 32,
        decay: float = 0.8,
        clock=time.perf_counter,
    ) -> None:
        """arms: name -> proposer; "ar" is added (no proposal). clock: seconds (tests pass their own)."""
        self.clock = clock
        self.contend_every, self.contend_ratio = contend_every, contend_ratio
        self.arms = dict(arms)
        self.names = ["ar", *self.arms]
        self.warmup, self.probe_every, self.decay = warmup, probe_every, decay
        self.goodput: dict[str, float | None] = {n: None for n in self.names}  # tokens / second
        self.tried: dict[str, int] = {n: 0 for n in self.names}
        self.last_step: dict[str, int] = {n: -1 for n in self.names}
        self.steps = 0
        self.chosen: str | None = None
        self._t0 = 0.0
        self._pending: tuple[str, int] | None = None  # (arm, tokens) of the step not yet timed
        self.seconds = 0.0
        self.last_forwards: list[tuple[int, int, float]] = []
        self.scratch_positions = max((p.scratch_positions for p in self.arms.values()), default=0)

    def start(self, num_slots: int, capacity: int) -> None:
        for p in self.arms.values():
            p.start(num_slots, capacity)

    def admit(self, slot: int, prefix) -> None:
        for p in self.arms.values():
            p.admit(slot, prefix)

    def release(self, slot: int) -> None:
        for p in self.arms.values():
            p.release(slot)

    def choose(self) -> str:
        untried = [n for n in self.names if self.tried[n] < self.warmup]
        if untried:  # interleaved warm-up: ar, ngram, ..., ar, ngram, ...
            return min(untried, key=lambda n: (self.tried[n], self.names.index(n)))
        if self.steps % self.probe_every == 0:
            return min(self.names, key=lambda n: self.last_step[n])
        rate = {n: self.goodput[n] or 0.0 for n in self.names}
        best = max(self.names, key=rate.get)
        if self.steps % self.contend_every == 0:
            close = [n for n in self.names if n != best and rate[n] >= self.contend_ratio * rate[best]]
            if close:
                return min(close, key=lambda n: self.last_step[n])
        return best

    def propose(self, slots: list[int], seqs: list[list[int]], num_draft: list[int], sampling: RowSampling) -> Draft:
        now = self.clock()
        if self._pending is not None:  # the last step, from its proposal to this one: all its costs
            name, tokens = self._pending
            self._record(name, tokens / max(now - self._t0, 1e-9))
            self._pending = None
        self._t0 = now
        self.chosen = self.choose()
        self.steps += 1
        if self.chosen == "ar":
            draft = Draft(torch.zeros(len(slots), 0, dtype=torch.long, device=sampling.device), [0] * len(slots))
            self.last_forwards = []
        else:
            proposer = self.arms[self.chosen]
            before = proposer.seconds
            draft = proposer.propose(slots, seqs, num_draft, sampling)
            self.seconds += proposer.seconds - before
            self.last_forwards = proposer.last_forwards
        draft.source = self.chosen
        return draft

    def accepted(self, slots: list[int], seq_lens: list[int], num_accepted: list[int], logits=None) -> None:
        name = self.chosen
        if name is None:
            return
        if name != "ar":
            self.arms[name].accepted(slots, seq_lens, num_accepted, logits)
        self._pending = (name, sum(num_accepted) + len(slots))  # timed when the next step starts
        self.tried[name] += 1
        self.last_step[name] = self.steps
        self.chosen = None

    def _record(self, name: str, rate: float) -> None:
        samples = self.tried[name] - 1  # an arm's first step pays its catch-up (a draft's prefill): not counted
        if samples:  # a running mean at first, then an exponential one
            weight = max(1 / samples, 1 - self.decay)
            self.goodput[name] = (1 - weight) * (self.goodput[name] or 0.0) + weight * rate
