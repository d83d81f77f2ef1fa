"""Which requests hold the engine's slots: the waiting queue, the free slots, the prefill budget
and the reference counts of prefix groups. Plain Python: no tensors, no model. The engine
(engine.py) asks it what to admit before each step and tells it which slots finished; the step
itself (propose, forward, verify) is the engine's.

Admission is first come, first served. A prefill forward right-pads its rows to the longest
suffix, so admitting stops before rows x longest suffix would pass max_prefill_tokens (one row is
always admitted, however long). A prefix group's first admitted member computes its prefix; the
prefix is freed when the group's last member finishes.

Prefills are gathered: while other rows decode, freed slots wait for company until they have
stood empty for `admit_wait` x num_slots slot-steps in all (one free slot waits num_slots steps,
four wait a quarter of that; a slot-step of a draft step that costs three plain ones counts three
times: what waiting wastes is time), or every waiting request can go (vLLM's scheduler_delay_factor
answers the same problem). A prefill forward of one row costs about what one of eight does, and
rows that finish apart (speculative decoding accepts a different number of tokens per row; so do
rows that stop at EOS) would otherwise take a forward each: at batch 8 on the CPU that was a
tenth of a job's time. Empty slot-steps cost less: a decode step's cost hardly falls with its
rows, so a step's worth of them costs about one decode step, about a prefill forward's fixed
cost. Rows admitted together also finish together again under plain steps.

Rows admitted in one prefill form a cohort. While the batch is one cohort of rows with the same
token limit and requests wait, plain steps end them in one step and refill every slot in one
prefill; speculative steps, where rows accept differently, end them apart, and from then on the
job pays what `desync_cost` estimates, for good (rows admitted apart finish apart under plain
steps too). The draft policy weighs that against what drafting would gain (draft_policy.py).
"""

from __future__ import annotations

import math
from collections import Counter, deque
from dataclasses import dataclass

from .params import GenerationRequest


@dataclass(frozen=True)
class Admission:
    index: int  # the request's position in the job
    request: GenerationRequest
    slot: int
    prefix_key: tuple[int, ...] | None  # its shared prefix's tokens, None when it has none
    new_prefix: bool  # the first of its group: the prefix is computed now


class Scheduler:
    def __init__(
        self,
        requests: list[GenerationRequest],
        prefix_keys: list[tuple[int, ...] | None],
        num_slots: int,
        max_prefill_tokens: int,
        admit_wait: float = 0.0,
    ) -> None:
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        if admit_wait < 0:
            raise ValueError(f"admit_wait must be >= 0, got {admit_wait}")
        self.requests, self.keys = requests, prefix_keys
        self.max_prefill_tokens = max_prefill_tokens
        self.admit_wait = admit_wait
        self.patience = admit_wait * num_slots  # empty slot-steps before a prefill goes anyway
        self.idle = 0  # empty slot-steps since a slot was freed and not yet filled
        self.waiting = deque(range(len(requests)))
        self.waiting_tokens = sum(r.max_new_tokens for r in requests)  # the waiting requests' token limits
        self.free = list(range(num_slots - 1, -1, -1))  # popped from the end: slot 0 first
        self.active: dict[int, int] = {}  # slot -> request index
        self.cohort: dict[int, int] = {}  # slot -> the prefill that admitted it
        self.prefills = 0
        self.members = Counter(k for k in prefix_keys if k is not None)  # per group: members yet to finish
        self.live: set[tuple[int, ...]] = set()  # groups whose prefix is computed and held
        self._desync: float | None = None  # desync_cost until the next admission or finish

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.active)

    def admit(self, step_cost: float = 1.0) -> list[Admission]:
        """Waiting requests for the free slots, as many as the prefill budget takes; none yet
        while rows decode, some must wait, and the free slots have not yet stood empty long.
        step_cost: what a decode step now costs in plain steps (a draft step costs several);
        each empty slot wastes that much of a slot-step while it waits."""
        wasted = len(self.free) * step_cost
        if self.active and len(self.free) < len(self.waiting) and self.idle + wasted <= self.patience:
            self.idle += wasted
            return []
        self.idle = 0
        self.prefills += 1
        self._desync = None
        admitted: list[Admission] = []
        longest = 0
        while self.waiting and self.free:
            index = self.waiting[0]
            request, key = self.requests[index], self.keys[index]
            longest = max(longest, len(request.prompt_ids) - len(key or ()))
            if admitted and longest * (len(admitted) + 1) > self.max_prefill_tokens:
                break
            self.waiting.popleft()
            self.waiting_tokens -= request.max_new_tokens
            slot = self.free.pop()
            self.active[slot] = index
            self.cohort[slot] = self.prefills
            new = key is not None and key not in self.live
            if new:
                self.live.add(key)
            admitted.append(Admission(index, request, slot, key, new))
        return admitted

    def desync_cost(self) -> float:
        """The share of the job's time lost from here on if the batch's rows, now one cohort of
        one token limit L with requests waiting, were made to finish apart; 0 where they will not
        finish together anyway. Rows ending evenly over a wave of L steps free slots at B / L a
        step, and a prefill goes once t^2 B / (2L) empty slot-steps reach the patience a B: every
        sqrt(2aL) steps, each costing about 1 + a steps (its forward's fixed cost, about a decode
        step's, and the waiting); at a = 0, a prefill for every row, B - 1 more a wave (none at
        batch 1). On the CPU bench (L = 32, a = 1, batch 8: 22% by this estimate) six drafting
        steps early in an otherwise plain job made it 7% slower (15 prefills against 8); drafting
        now and then throughout, 15-30% (19 prefills)."""
        if self._desync is None:  # asked every step; it changes only where rows come and go
            self._desync = self._desync_cost()
        return self._desync

    def _desync_cost(self) -> float:
        if not self.waiting or len(set(self.cohort[s] for s in self.active)) != 1:
            return 0.0
        limits = {self.requests[i].max_new_tokens for i in self.active.values()}
        if len(limits) != 1:
            return 0.0
        wave, a = limits.pop(), self.admit_wait
        every_row = (len(self.active) - 1) / wave  # a batch of one takes a prefill a row anyway
        return min(every_row, (1 + a) / math.sqrt(2 * a * wave)) if a > 0 else every_row

    def finish(self, slot: int) -> tuple[int, ...] | None:
        """Free the slot. Returns the prefix key of the group whose last member this was (the
        engine frees that prefix), else None."""
        index = self.active.pop(slot)
        del self.cohort[slot]
        self._desync = None
        self.free.append(slot)
        key = self.keys[index]
        if key is None:
            return None
        self.members[key] -= 1
        if self.members[key]:
            return None
        self.live.discard(key)
        return key
