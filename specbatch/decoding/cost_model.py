"""What a decode step costs and yields, learned from the steps the engine runs. Plain Python: no
tensors, no model. One CostModel serves the draft-length policy and auto's choice of method alike.

Every decode step reaches the policy as one StepMeasurement, every prefill as its size and
seconds (`prefilled`). From them the model keeps:

    target(tokens)        seconds of a target forward over `tokens` (batch x chunk width), the same
                          whichever method proposed: a plain step measures it as well as a draft step,
                          and a prefill at a size decode steps rarely reach
    step[arm, B, K]       the measured wall time of whole steps (proposing, the forward, verifying,
                          bookkeeping), where that combination has run
    draft[arm](rows)      seconds of one draft-model forward over `rows` rows (draft, layerskip)
    host[arm]             proposing's seconds per row outside model forwards (n-gram lookups, trees)
    rest[arm]             the rest of a step per row: sampling, emitting, records
    catch_up[arm]         seconds per step of draft forwards over what the draft had not seen (new
                          rows' prompts, steps it sat out): a price of the arm, whatever K
    admission             seconds per emitted token of prefilling the rows admitted into freed
                          slots: a row frees its slot after so many tokens, whatever drafted them,
                          so this is a cost of every token, and a draft step's gain over a plain
                          step is smaller than their steps alone say
    acceptance[arm]       per-token acceptance: accepted / (accepted + first rejections), of the
                          arm's steps and of its shadow drafts (what it would have drafted, scored
                          against what the rows emitted: engine.py)

Seconds are means of recent values without stalls (Recent); a plain step's are their lower
median. Plain's cost hardly varies but for the machine, and a slow spell only adds time; while an
arm drafts, plain steps are few (the policy's refreshes), so their window spans hundreds of steps
and a spell or two: at batch 1 on sampled text, plain steps of 5.3-5.4 ms beside 8-12 ms ones from
spells were priced at 7.4 ms by their mean, and draft steps gaining 5% were predicted to gain over
the margin. The median leans to plain where the two are close.

and predicts, for an arm not yet run at (B, K):

    seconds(arm, B, K) = bias[arm] x parts(arm, B, K) + catch_up[arm] + admission * tokens(arm, B, K)
    parts(arm, B, K)   = target(B * (1 + chunk(arm, K))) + K * draft[arm](B) + B * (host[arm] + rest[arm])
                         (measured steps: step[arm, B, K] + catch_up[arm] + admission * tokens)
    tokens(arm, B, K)  = B * (1 - a^(K+1)) / (1 - a)          a = acceptance[arm]
                         (B x the measured tokens per row of (arm, K)'s steps, once it has run)
    goodput            = tokens / seconds;  plain ("ar", K = 0): B / seconds("ar", B, 0)

A plan, in which each row drafts a length of its own (draft_policy), is priced from the parts
(plan_parts): the target's forward over the tokens it runs (packed, where the engine packs it),
a draft forward per depth over the rows still drafting, and the rest as above; its steps are not
(arm, B, K)'s.

bias[arm] is how far the arm's recent steps fell short of the sum of their parts: seconds taken
(less their catch-up) over parts predicted before they ran, for every step of the arm, whether
(arm, B, K) was measured or not. It multiplies what is predicted from parts, never a measured
step's cost (that already is what such steps took). A policy that picks the best of many noisy
estimates (every arm and K) picks the one whose noise flattered it most (the optimizer's curse),
and a draft step costs in ways its parts do not show (a packed forward, rows that draft fewer
than K near their end): on the CPU bench the first plans at batch 32 took 1.5-2x the sum of
their parts. The bias is of cost only. It once was of seconds per token
emitted, and so counted a draft that was rejected twice, once in the acceptance and again in the
bias: an n-gram arm's swung 0.89-1.60 within 50 steps at batch 1 and held it off half the steps
where fixed n-gram gained 1.5x.

chunk(arm, K) is what the proposer writes per row besides the last token: K for a draft, more for
lookahead's window and candidates (each proposer says so: Proposer.chunk_tokens). Before a draft
forward is measured, draft[arm](B) = share[arm] x target(B): the larger of the draft's share of
the target's parameters and of its layers (a draft model's, a layer-skip view's kept layers; 0
for model-free arms), so an arm whose draft costs more than drafting could gain is never run to
find that out.

An arm's prior acceptance (prior_acceptance, worth four trials) is hopeful: an arm that must be
run to be learned is tried where it might win. An arm scored by shadow drafts is learned at no
cost every step, and hope there only runs it on what it has not shown: at batch 1 on sampled
text the n-gram arm, a raw 0.15 in shadow and 0.18 in its own steps, was priced at 0.3-0.57 by
the prior over its first 40 steps, and drafted 30-44 steps a job, most for one token (11 of 159
drafts accepted in one run: 0.93x of plain decoding). Its acceptance is taken `caution`
standard errors below the estimate, sqrt(a (1 - a) / (trials + 4)): a copying arm's, 0.9 over a
hundred trials, loses 0.03; one accepted of its first two, 0.2. (At two standard errors copying
at batch 1 kept 1.43x of plain decoding where it had 1.51x; at one, 1.49x.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

PLAIN = "ar"
PACK_BELOW = 0.75  # a ragged forward is packed where its real tokens are at most this share of its padded size


def ragged(num_real: list[int], width: int) -> bool:
    """Whether rows of num_real real tokens in `width` columns are ragged enough to pack: on the
    CPU a packed forward with no padding took 10% longer than the padded one (forward.packs)."""
    return sum(num_real) <= PACK_BELOW * len(num_real) * width


ROW_DECAY = 0.9  # per step a request drafts: its own record follows its text faster than an arm's (acceptance_decay)


def record_drafts(record: tuple[float, float], drafted: int, accepted: int) -> tuple[float, float]:
    """A request's own decayed (accepted drafts, trials) after a step in which it drafted
    `drafted` tokens and `accepted` of them were accepted, counted as CostModel.acceptance
    counts an arm's: a trial for each accepted draft and one for a first rejection."""
    seen, trials = record
    return ROW_DECAY * seen + accepted, ROW_DECAY * trials + accepted + (accepted < drafted)


class Recent:
    """The mean of a key's last `window` values, leaving out stalls: values above twice their
    median. On a shared machine a step can take several times its cost while another process
    runs; one such value would move a plain mean far. A low quantile instead (as timeit reports
    the best of its runs) favours whatever varies most: a draft step's cost varies with how far
    each row drafted and what it caught up on, a plain step's hardly, so a low quantile priced
    drafting below its average and chose it where it lost."""

    window = 8

    def __init__(self, value: float) -> None:
        self.values = [value]
        self._summary: tuple[float, float] | None = (value, value)  # (mean, median); None: values changed since

    def add(self, value: float) -> None:
        # Summarized when read, not here: a plain step adds to three of these and the policy,
        # settled on plain, reads them once every few steps.
        self.values = self.values[1 - self.window :] + [value]
        self._summary = None

    @property
    def value(self) -> float:
        return self._summarize()[0]

    @property
    def median(self) -> float:
        return self._summarize()[1]

    def _summarize(self) -> tuple[float, float]:
        if self._summary is None:
            ordered = sorted(self.values)
            median = ordered[(len(ordered) - 1) // 2]  # the lower one of an even count
            kept = [v for v in ordered if v <= 2 * median]
            self._summary = (sum(kept) / len(kept), median)
        return self._summary


def remember(estimates: dict, key, value: float, capacity: int) -> None:
    """Record value under key (a Recent), forgetting the least recently seen key beyond capacity:
    popped and re-inserted, a key moves to the end of the dict's order."""
    seen = estimates.pop(key, None)
    if seen is None:
        seen = Recent(value)
    else:
        seen.add(value)
    estimates[key] = seen
    if len(estimates) > capacity:
        del estimates[next(iter(estimates))]


@dataclass
class LinearCost:
    """Seconds per forward as a function of its size: the running average at each size seen
    (real costs are steps, not lines: a 1-token forward takes another kernel path than a
    3-token one), and for sizes not seen, online least squares of c0 + c1 * size with
    exponential forgetting."""

    decay: float = 0.98
    n: float = 0.0
    sx: float = 0.0
    sy: float = 0.0
    sxx: float = 0.0
    sxy: float = 0.0
    smallest: float = float("inf")
    largest: float = 0.0
    by_size: dict = field(default_factory=dict)  # size -> Recent seconds
    max_sizes: int = 256
    _line: tuple | None = None  # (intercept, slope, None) fitted since the last add, (mean cost, None, mean size), or None

    def add(self, size: float, seconds: float) -> None:
        self.smallest, self.largest = min(self.smallest, size), max(self.largest, size)
        remember(self.by_size, size, seconds, self.max_sizes)
        d = self.decay
        self.n = d * self.n + 1
        self.sx = d * self.sx + size
        self.sy = d * self.sy + seconds
        self.sxx = d * self.sxx + size * size
        self.sxy = d * self.sxy + size * seconds
        self._line = None

    @property
    def known(self) -> bool:
        return self.n > 0

    @property
    def has_slope(self) -> bool:
        """Seen at two sizes at least: the fixed cost and the per-token cost can be told apart."""
        return self.largest > self.smallest

    @property
    def slope(self) -> float:
        """Seconds per unit of size beyond the fixed cost (0 until two sizes are seen)."""
        if self.n == 0:
            return 0.0
        mean_x, mean_y = self.sx / self.n, self.sy / self.n
        var = self.sxx / self.n - mean_x * mean_x
        if var <= 1e-9 * max(mean_x * mean_x, 1.0):
            return 0.0
        return max((self.sxy / self.n - mean_x * mean_y) / var, 0.0)

    def predict(self, size: float) -> float:
        seen = self.by_size.get(size)
        if seen is not None:
            return seen.value
        if self.n == 0:
            return 0.0
        if self._line is None:  # fitted once per add: the policy predicts dozens of sizes a step
            mean_x, mean_y = self.sx / self.n, self.sy / self.n
            var = self.sxx / self.n - mean_x * mean_x
            if var <= 1e-9 * max(mean_x * mean_x, 1.0):  # one size seen so far: assume cost grows with size
                self._line = (mean_y, None, max(mean_x, 1e-9))
            else:
                slope = max((self.sxy / self.n - mean_x * mean_y) / var, 0.0)
                self._line = (max(mean_y - slope * mean_x, 0.0), slope, None)
        intercept, slope, mean_x = self._line
        if slope is None:  # intercept is the mean cost at the mean size
            return intercept * size / mean_x
        return intercept + slope * size


@dataclass
class StepMeasurement:
    """One decode step, as the engine measured it."""

    arm: str  # what proposed: "ar" for a plain step (nothing drafted, no lookahead window)
    k: int  # the K chosen
    num_draft: list[int]  # per row: draft tokens proposed
    num_accepted: list[int]  # per row: of those, accepted
    target_tokens: int  # the target forward's size: rows x chunk width
    target_seconds: float  # the forward and the verifier
    propose_seconds: float = 0.0  # the proposer's wall time, its model forwards included
    draft_forwards: list[tuple[int, int, float]] = field(default_factory=list)  # (rows, tokens, seconds) of each
    step_seconds: float = 0.0  # the whole step
    shadows: dict = field(default_factory=dict)  # arm -> (accepted, first rejections) of shadow drafts scored (engine.py)


@dataclass
class CostModel:
    prior_acceptance: float = 0.6
    caution: float = 1.0  # standard errors below its estimate a shadow-scored arm's acceptance is taken
    acceptance_decay: float = 0.95
    admission_decay: float = 0.98  # per step; admissions come in bursts: remembered over about 50 steps
    target: LinearCost = field(default_factory=LinearCost)
    step: dict = field(default_factory=dict)  # (arm, batch, K) -> Recent step seconds
    draft: dict = field(default_factory=dict)  # arm -> LinearCost over rows of one draft forward
    host: dict = field(default_factory=dict)  # arm -> Recent proposing seconds per row
    rest: dict = field(default_factory=dict)  # arm -> Recent seconds per row of the step's other work (bookkeeping)
    chunk: dict = field(default_factory=dict)  # (arm, K) -> tokens per row besides the last, declared
    share: dict = field(default_factory=dict)  # arm -> a draft forward's cost over the target's, declared
    tokens: dict = field(default_factory=dict)  # (arm, K) -> decayed (tokens emitted, rows) of its steps
    _catch_up: dict = field(default_factory=dict)  # arm -> decayed (catch-up seconds, steps)
    _admission: tuple = (0.0, 0.0)  # decayed (seconds prefilling admitted rows, tokens emitted)
    _decoding: bool = False  # a decode step has run: prefills from now on fill freed slots
    calibrated: bool = True  # predictions divided by the arm's bias (False: the parts' sum alone)
    bias_decay: float = 0.9  # per step of the arm: about the last ten
    _bias: dict = field(default_factory=dict)  # arm -> decayed (seconds taken, seconds predicted, steps)
    _accepted: dict = field(default_factory=dict)  # arm -> decayed accepted drafts
    _trials: dict = field(default_factory=dict)  # arm -> decayed accepted drafts + first rejections
    _shadowed: set = field(default_factory=set)  # arms with shadow drafts scored

    def acceptance(self, arm: str) -> float:
        """Per-token acceptance: accepted / (accepted + first rejections), a geometric-run estimate
        drawn toward the prior. For an arm scored by shadow drafts, a lower bound: `caution`
        standard errors below (see the module docstring)."""
        prior_weight = 4.0
        trials = self._trials.get(arm, 0.0) + prior_weight
        a = (self._accepted.get(arm, 0.0) + prior_weight * self.prior_acceptance) / trials
        if arm in self._shadowed:
            a -= self.caution * math.sqrt(max(a * (1 - a), 0.0) / trials)
        return min(max(a, 0.0), 0.999)

    def measured(self, arm: str) -> bool:
        return self._trials.get(arm, 0.0) > 0

    def shadowed(self, arm: str) -> bool:
        """Its acceptance is learned from shadow drafts, whether it runs or not."""
        return arm in self._shadowed

    def expect_shadows(self, arm: str) -> None:
        self._shadowed.add(arm)

    def _count(self, arm: str, accepted: int, rejections: int, decay: float) -> None:
        self._accepted[arm] = decay * self._accepted.get(arm, 0.0) + accepted
        self._trials[arm] = decay * self._trials.get(arm, 0.0) + accepted + rejections

    def expected_tokens(self, arm: str, k: int, acceptance: float | None = None) -> float:
        """Tokens a row emits in a step that asks for k drafts: accepted drafts plus the target's
        own. Measured where (arm, k) has run (a proposer may draft fewer than k, as a confidence
        stop does); else from the arm's acceptance, or the one given."""
        if k == 0 or arm == PLAIN:
            return 1.0
        if acceptance is None and (measured := self.tokens.get((arm, k))) and measured[1] >= 4:
            return measured[0] / measured[1]
        a = self.acceptance(arm) if acceptance is None else acceptance
        return (1 - a ** (k + 1)) / (1 - a)

    def seconds(self, arm: str, batch: int, k: int) -> float:
        if arm == PLAIN:
            k = 0
        if k == 0:
            admission = self.admission * batch * self.expected_tokens(arm, k)
            measured = self.step.get((arm, batch, 0))
            return admission + (measured.median if measured is not None else self._calibrated(arm, self.parts(arm, batch, 0)))
        return self._draft_seconds(arm, batch, k, self._shared(arm, batch), self.expected_tokens(arm, k))

    def _shared(self, arm: str, batch: int) -> tuple:
        """What a drafting step of the arm costs at this batch size whatever its K: (the step's
        other work, catch-up, one draft forward (None: not yet measured), proposing per row,
        admission per token, the calibration bias)."""
        rest = batch * self.rest[arm].value if arm in self.rest else 0.0
        forward = self.draft[arm].predict(batch) if arm in self.draft else None
        host = self.host[arm].value if arm in self.host else 0.0
        return rest, self.catch_up(arm), forward, host, self.admission, self._bias_of(arm)

    def _draft_seconds(self, arm: str, batch: int, k: int, shared: tuple, tokens: float) -> float:
        """seconds(arm, batch, k) for k > 0, from _shared(arm, batch) and the tokens a row is
        expected to emit."""
        rest, catch_up, forward, host, admitting, bias = shared
        admission = admitting * batch * tokens
        if (arm, batch, k) in self.step:
            return self.step[arm, batch, k].value + catch_up + admission
        return bias * self._draft_parts(arm, batch, k, forward, host, rest) + catch_up + admission

    def _draft_parts(self, arm: str, batch: int, k: int, forward: float | None, host: float, rest: float) -> float:
        chunk = self.chunk.get((arm, k), k)
        if forward is not None:
            draft = k * forward
        else:  # not yet measured: its share of a target forward over the same rows
            draft = k * self.share.get(arm, 0.0) * self.target.predict(batch)
        return self.target.predict(batch * (1 + chunk)) + draft + batch * host + rest

    def parts(self, arm: str, batch: int, k: int) -> float:
        """The sum of a step's parts (the target's forward, the draft's, proposing, the rest),
        before calibration and without catch-up or admission: what the bias corrects."""
        if arm == PLAIN or k == 0:  # every plain step asks (observe): only what it needs
            return self.target.predict(batch) + (batch * self.rest[arm].value if arm in self.rest else 0.0)
        rest, _, forward, host, _, _ = self._shared(arm, batch)
        return self._draft_parts(arm, batch, k, forward, host, rest)

    def plan_parts(self, arm: str, lengths: list[int]) -> float:
        """parts() of a step in which row b drafts lengths[b] (0 allowed): the target's forward
        over the real tokens where the engine packs it, and each draft forward over the rows
        still drafting."""
        batch, width = len(lengths), 1 + max(lengths)
        real = [1 + n for n in lengths]
        size = sum(real) if ragged(real, width) else batch * width
        draft = 0.0
        for j in range(1, width):
            rows = sum(1 for n in lengths if n >= j)
            draft += self.draft[arm].predict(rows) if arm in self.draft else self.share.get(arm, 0.0) * self.target.predict(rows)
        host = batch * self.host[arm].value if arm in self.host else 0.0
        rest = batch * self.rest[arm].value if arm in self.rest else 0.0
        return self.target.predict(size) + draft + host + rest

    def plan_seconds(self, arm: str, lengths: list[int], tokens: float, parts: float | None = None) -> float:
        """Predicted seconds of a plan's step whose rows emit `tokens`: its parts (plan_parts, unless
        given), calibrated, and the arm's catch-up and admission as seconds()."""
        parts = self.plan_parts(arm, lengths) if parts is None else parts
        return self._calibrated(arm, parts) + self.catch_up(arm) + self.admission * tokens

    def token_seconds(self, arm: str) -> float:
        """What one more drafted token of one row adds to a step: a token more in the target's
        (packed) forward and a row more in a draft forward."""
        draft = self.draft[arm].slope if arm in self.draft else self.share.get(arm, 0.0) * self.target.slope
        return self.target.slope + draft

    def goodput(self, arm: str, batch: int, k: int, acceptance: float | None = None) -> float:
        """Predicted tokens per second of a step of this arm and K over `batch` rows; at a given
        acceptance (a hypothesis, not a forecast) where given."""
        return batch * self.expected_tokens(arm, k, acceptance) / max(self.seconds(arm, batch, k), 1e-12)

    def goodputs(self, arm: str, batch: int, ks: list[int], acceptance: float | None = None) -> list[float]:
        """goodput(arm, batch, k, acceptance) for each k of ks, with what every K shares looked up
        once: the policy weighs every arm and K, and one at a time that took 5 us each, 0.15 ms
        a weighing at batch 8 on the CPU."""
        if arm == PLAIN or 0 in ks:
            return [self.goodput(arm, batch, k, acceptance) for k in ks]
        shared, out = self._shared(arm, batch), []
        for k in ks:
            own = self.expected_tokens(arm, k)  # what seconds() prices admission by, whatever acceptance is given
            tokens = own if acceptance is None else self.expected_tokens(arm, k, acceptance)
            out.append(batch * tokens / max(self._draft_seconds(arm, batch, k, shared, own), 1e-12))
        return out

    def has_bias(self, arm: str) -> bool:
        """Steps of the arm have been measured against their prediction (calibrate)."""
        return arm in self._bias

    def bias(self, arm: str) -> float:
        """Seconds the arm's recent steps took over the sum of their parts predicted before they
        ran (1: as predicted), drawn toward 1 by a prior of two steps."""
        taken, predicted, steps = self._bias.get(arm, (0.0, 0.0, 0.0))
        prior = 2.0 * predicted / steps if steps else 0.0
        return (taken + prior) / (predicted + prior) if predicted else 1.0

    def _bias_of(self, arm: str) -> float:
        return self.bias(arm) if self.calibrated else 1.0

    def _calibrated(self, arm: str, parts: float) -> float:
        return parts * self._bias_of(arm)

    def calibrate(self, arm: str, predicted: float, seconds: float) -> None:
        """A step of the arm took `seconds` (its catch-up left out), its parts predicted to take
        `predicted` before it ran. A stall counts at most 4x."""
        taken = min(max(seconds, predicted / 4), 4 * predicted)
        d = self.bias_decay
        old = self._bias.get(arm, (0.0, 0.0, 0.0))
        self._bias[arm] = (d * old[0] + taken, d * old[1] + predicted, d * old[2] + 1)

    def observe(self, m: StepMeasurement, planned: float | None = None) -> None:
        """planned: rows drafted lengths of their own (a plan), whose parts were predicted to take
        `planned` seconds (plan_parts); the step is not one of (arm, batch, K)'s. None: every row
        was asked for K."""
        grid = planned is None
        batch = len(m.num_draft)
        arm, k = (m.arm, m.k) if m.arm != PLAIN else (PLAIN, 0)
        # A draft forward over more than two tokens a row feeds what the draft has not seen: new
        # rows' prompts, steps it sat out. Not a cost of this step's K: charged to the arm apart.
        steady = [(rows, seconds) for rows, tokens, seconds in m.draft_forwards if tokens <= 2 * rows]
        forwards = sum(seconds for _, _, seconds in m.draft_forwards)
        catch_up = forwards - sum(seconds for _, seconds in steady)
        # A prediction to check. A plain step's is only ever used where no plain step at its size
        # has been measured (seconds()): calibrated there alone, not on every plain step (the
        # parts' sum and the bias took 18 us of a plain step's 45 us of policy work at batch 8).
        if m.step_seconds and self.target.has_slope and (arm != PLAIN or (PLAIN, batch, 0) not in self.step):
            self.calibrate(arm, self.parts(arm, batch, k) if planned is None else planned, m.step_seconds - catch_up)
        self.target.add(m.target_tokens, m.target_seconds)
        self._emitted(sum(m.num_accepted) + batch)
        for shadow, (accepted, rejections) in m.shadows.items():  # decayed once a step, as a step that ran it
            self._shadowed.add(shadow)
            self._count(shadow, accepted, rejections, 1.0 if shadow == arm else self.acceptance_decay)
        if m.step_seconds and grid:
            remember(self.step, (arm, batch, k), m.step_seconds - catch_up, 1024)
            rest = m.step_seconds - m.target_seconds - m.propose_seconds
            remember(self.rest, arm, max(rest, 0.0) / batch, 64)
        if arm == PLAIN:
            return
        for rows, seconds in steady:
            self.draft.setdefault(arm, LinearCost()).add(rows, seconds)
        remember(self.host, arm, max(m.propose_seconds - forwards, 0.0) / batch, 64)
        d = self.acceptance_decay
        # An arm's first step feeds the draft every row's prompt: the prefill any use of it pays
        # once, not a cost of having sat out. Charged as catch-up, one slow opening would price
        # the arm out for good (it is never run again to average it away).
        if arm in self._catch_up:
            spent, steps = self._catch_up[arm]
            self._catch_up[arm] = (d * spent + catch_up, d * steps + 1)
        else:
            self._catch_up[arm] = (0.0, 1.0)
        accepted = sum(m.num_accepted)
        if grid:
            emitted, rows = self.tokens.get((arm, k), (0.0, 0.0))
            self.tokens[arm, k] = (d * emitted + accepted + batch, d * rows + batch)
        rejections = sum(1 for n, a in zip(m.num_draft, m.num_accepted) if n and a < n)
        self._count(arm, accepted, rejections, d)

    def prefilled(self, tokens: int, seconds: float) -> None:
        """A prefill forward over `tokens` (rows x padded width) took `seconds`. It shows the target's
        cost at a size decode steps rarely reach, so the first plain step already tells the fixed
        cost from the per-token one. After the first decode step, prefills fill freed slots: a
        cost of every emitted token, since a row frees its slot after so many of them, whoever
        drafted them."""
        self.target.add(tokens, seconds)
        if self._decoding:
            self._admission = (self._admission[0] + seconds, self._admission[1])

    def _emitted(self, tokens: int) -> None:
        d = self.admission_decay
        self._admission = (d * self._admission[0], d * self._admission[1] + tokens)
        self._decoding = True

    @property
    def admission(self) -> float:
        """Seconds of prefill per emitted token, recently."""
        spent, tokens = self._admission
        return spent / tokens if tokens else 0.0

    def catch_up(self, arm: str) -> float:
        """Seconds per step the arm has spent feeding its draft what it had not seen (recent steps)."""
        spent, steps = self._catch_up.get(arm, (0.0, 0.0))
        return spent / steps if steps else 0.0
