"""How many tokens to draft each step. Plain Python: no tensors, no model.

FixedPolicy always asks for K. GoodputPolicy chooses K each step to maximise expected tokens per
second for the whole batch, after SmartSpec (Liu et al. 2024, "Optimizing Speculative Decoding
for Serving Large Language Models Using Goodput"):

    tokens(K)  = B * (1 - a^(K+1)) / (1 - a)          a: per-token acceptance rate (measured)
    seconds(K) = the measured wall time of whole steps with this batch size and K (drafting,
                 verification and bookkeeping together), and for (B, K) not yet seen:
                 T_target(B * (K + 1)) + K * T_draft(B), from the measured forwards
    K*         = argmax_{0 <= K <= K_max} tokens(K) / seconds(K)

With low acceptance or a large batch (where verifying B * (K + 1) tokens costs nearly (K + 1)
times one plain step) K* falls, down to 0: a plain decoding step with no draft forward at all.
When it has chosen 0 for a while it probes with a short draft, so that a recovering acceptance
rate is noticed; it leaves plain steps only for a predicted gain of over 5% (hysteresis: the
draft must first catch up on the steps it sat out); while probes keep confirming 0, the wait between them doubles (a probe costs the
draft a catch-up forward over everything it skipped). Before anything is measured it drafts the
short probe length, not the maximum, then one plain step, so that the target's cost is seen at
two sizes before the model is trusted.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class FixedPolicy:
    def __init__(self, k: int) -> None:
        if k < 0:
            raise ValueError(f"num_draft_tokens must be >= 0, got {k}")
        self.k = k

    def choose(self, batch_size: int) -> int:
        return self.k

    def observe(self, **measurement) -> None:
        pass


def remember(averages: dict, key, value: float, capacity: int) -> None:
    """A running average per key (new values weigh 0.2), forgetting the least recently seen key
    beyond capacity: popped and re-inserted, a key moves to the end of the dict's order."""
    seen = averages.pop(key, None)
    averages[key] = value if seen is None else 0.8 * seen + 0.2 * value
    if len(averages) > capacity:
        del averages[next(iter(averages))]


@dataclass
class LinearCost:
    """Seconds per forward as a function of tokens in it: the running average at each size seen
    (real costs are steps, not lines: a 1-token forward takes another kernel path than a
    3-token one), and for sizes not seen, online least squares of c0 + c1 * tokens with
    exponential forgetting."""

    decay: float = 0.98
    n: float = 0.0
    sx: float = 0.0
    sy: float = 0.0
    sxx: float = 0.0
    sxy: float = 0.0
    smallest: float = float("inf")
    largest: float = 0.0
    by_size: dict = field(default_factory=dict)  # tokens -> running average seconds
    max_sizes: int = 256

    def add(self, tokens: float, seconds: float) -> None:
        self.smallest, self.largest = min(self.smallest, tokens), max(self.largest, tokens)
        remember(self.by_size, tokens, seconds, self.max_sizes)
        d = self.decay
        self.n = d * self.n + 1
        self.sx = d * self.sx + tokens
        self.sy = d * self.sy + seconds
        self.sxx = d * self.sxx + tokens * tokens
        self.sxy = d * self.sxy + tokens * seconds

    @property
    def known(self) -> bool:
        return self.n > 0

    @property
    def has_slope(self) -> bool:
        """Seen at two sizes at least: the fixed cost and the per-token cost can be told apart."""
        return self.largest > self.smallest

    def predict(self, tokens: float) -> float:
        if tokens in self.by_size:
            return self.by_size[tokens]
        if self.n == 0:
            return 0.0
        mean_x, mean_y = self.sx / self.n, self.sy / self.n
        var = self.sxx / self.n - mean_x * mean_x
        if var <= 1e-9 * max(mean_x * mean_x, 1.0):  # one size seen so far: assume cost grows with tokens
            return mean_y * tokens / max(mean_x, 1e-9)
        slope = max((self.sxy / self.n - mean_x * mean_y) / var, 0.0)
        intercept = max(mean_y - slope * mean_x, 0.0)
        return intercept + slope * tokens


@dataclass
class GoodputPolicy:
    max_k: int = 6
    prior_acceptance: float = 0.6
    acceptance_decay: float = 0.95
    probe_after: int = 16  # plain steps in a row before a probing draft of probe_k
    probe_k: int = 2
    switch_margin: float = 0.05  # leave plain steps only for a predicted gain above this
    target_cost: LinearCost = field(default_factory=LinearCost)
    draft_cost: LinearCost = field(default_factory=LinearCost)
    step_cost: dict = field(default_factory=dict)  # (batch, K) -> running average step seconds
    _accepted: float = 0.0
    _trials: float = 0.0
    _plain_streak: int = 0
    _probe_interval: int = 0

    @property
    def acceptance(self) -> float:
        """Per-token acceptance: accepted / (accepted + first rejections), a geometric-run estimate."""
        prior_weight = 4.0
        a = (self._accepted + prior_weight * self.prior_acceptance) / (self._trials + prior_weight)
        return min(max(a, 0.0), 0.999)

    def expected_tokens(self, k: int) -> float:
        a = self.acceptance
        return (1 - a ** (k + 1)) / (1 - a)

    def seconds(self, batch_size: int, k: int) -> float:
        if (batch_size, k) in self.step_cost:
            return self.step_cost[batch_size, k]
        draft = k * self.draft_cost.predict(batch_size) if k else 0.0
        return self.target_cost.predict(batch_size * (k + 1)) + draft

    def choose(self, batch_size: int) -> int:
        # A draft cost never measured counts as 0: proposers without forwards (n-gram lookup) have none.
        if not self.target_cost.known:
            return min(self.probe_k, self.max_k)  # nothing measured yet: draft a little, learn the costs
        if not self.target_cost.has_slope:
            return 0  # a plain step measures verification at a second size
        goodput = [
            batch_size * self.expected_tokens(k) / max(self.seconds(batch_size, k), 1e-12)
            for k in range(self.max_k + 1)
        ]
        best = max(range(self.max_k + 1), key=goodput.__getitem__)
        if self._plain_streak and goodput[best] < (1 + self.switch_margin) * goodput[0]:
            best = 0  # the draft would first have to catch up: not worth it for a marginal gain
        if best == 0:
            self._plain_streak += 1
            self._probe_interval = self._probe_interval or self.probe_after
            if self._plain_streak >= self._probe_interval:
                self._plain_streak = 0
                self._probe_interval *= 2  # reset only when drafting pays again
                return min(self.probe_k, self.max_k)
        else:
            self._plain_streak = 0
            self._probe_interval = self.probe_after
        return best

    def observe(
        self,
        *,
        num_draft: list[int],
        num_accepted: list[int],
        target_tokens: int,
        target_seconds: float,
        draft_forwards: int,
        draft_rows: int,
        draft_seconds: float,
        k: int | None = None,
        step_seconds: float | None = None,
        caught_up: bool = False,
    ) -> None:
        """One step's outcome: per-row drafted and accepted counts, the forwards' costs, and the
        whole step's wall time for the K chosen (not counted when the draft had to catch up on
        skipped steps: that is the price of having sat out, not of drafting)."""
        self.target_cost.add(target_tokens, target_seconds)
        if k is not None and step_seconds is not None and not caught_up:
            key = (len(num_draft), k)
            remember(self.step_cost, key, step_seconds, 512)
        if draft_forwards:
            self.draft_cost.add(draft_rows, draft_seconds / draft_forwards)
        d = self.acceptance_decay
        accepted = sum(num_accepted)
        rejections = sum(1 for k, a in zip(num_draft, num_accepted) if k and a < k)
        if any(num_draft):
            self._accepted = d * self._accepted + accepted
            self._trials = d * self._trials + accepted + rejections


def make_policy(name: str, num_draft_tokens: int):
    if name == "fixed":
        return FixedPolicy(num_draft_tokens)
    if name == "adaptive":
        return GoodputPolicy(max_k=num_draft_tokens)
    raise ValueError(f"unknown draft policy {name!r}; use fixed or adaptive")
