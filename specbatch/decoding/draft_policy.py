"""What each decode step does: which proposer drafts ("arm") and how many tokens (K), or a plain
step. Plain Python: no tensors, no model.

FixedPolicy always drafts K with its one proposer. GoodputPolicy chooses the arm and K each step to
maximise expected tokens per second for the whole batch, after SmartSpec (Liu et al. 2024,
"Optimizing Speculative Decoding for Serving Large Language Models Using Goodput"), from the
measured costs and acceptance of cost_model.CostModel:

    (arm, K)* = argmax over arms and 0 <= K <= K_max of goodput(arm, B, K)

and it drafts only where that beats a plain step by `switch_margin` (15%): with low acceptance or
a large batch (where verifying B * (K + 1) tokens costs nearly K + 1 plain steps) every step is
plain, with no draft forward at all. The margin covers what a step's prediction misses: one-step
estimates on a shared machine move by 10% and more, and drafting costs beyond its own steps (rows
finish apart, so freed slots wait for company or take prefills of their own and the batch drains
unevenly at the end; the draft catches up on admitted rows). On the CPU bench a draft model
predicted to gain 5-15% at batch 8 and 32 measured 0.8-0.9x of plain decoding. While it drafts,
some steps are plain, so what plain costs at this batch size is measured now, not in whatever
spell of a shared machine it was last seen (a stale plain cost from a slow spell kept a losing
draft arm running): the closer the call, the more often (refresh_interval). One policy serves a
single method under `--draft-policy adaptive` (arms: that method) and `--method auto` (arms:
every method that applies).

Drafting's costs beyond its own steps are the scheduler's to see, so the engine passes a
BatchView before each step. Where the batch's rows will finish in one step and be refilled in one
prefill (one cohort, one token limit, requests waiting), drafting ends them apart for the rest of
the job (Scheduler.desync_cost): a share of every step from here on, which only the steps that
draft pay back. So the cohort is broken only once drafting has been predicted to save more than
that share of the recent steps' time (`saving`: a decayed mean over steps, 0 for each step where
plain won), not for one step that would gain it, and only by an arm whose predictions have been
checked against its steps; what a probe might find must gain it on top of the margin. On the CPU
bench (independent prompts, batch 8, 32-token rows) 3-5 probes and 5-16 drafting steps took a
job from 8 prefill forwards to 19 and to 0.77-0.87x of plain decoding,
though the drafting steps themselves measured about plain's goodput. A probe of a draft model
first feeds it every row's context; on a short job that never pays (`_worth`).

Per request: the rows of one batch differ (one copies its prompt, the next writes freely), and
the engine runs a step whose rows feed different numbers of tokens packed (packing.py), so a row
that drafts nothing costs what it costs in a plain step. Besides drafting K in every row, each
arm that ran (and whose chunk is its draft: lookahead's window is one tree forward) is weighed
as a plan: each row drafts the length its own record of acceptance with that arm pays for (the
engine keeps one per request and passes them in the view), and the plan runs where it beats
plain by the margin and every step that drafts K in all rows (`_plan`).

The last wave: once no request waits, the batch ends when its slowest row does, and a row that
drafts its way to an early finish frees a slot nobody takes. There a step is weighed by how far
it brings the wave's end nearer (`_wave_rate`): by the rows with the furthest to go, at their
own acceptance, not by every row's tokens.

An arm that can shadow (n-gram lookup: engine.py, "Shadow drafts") is never probed: its acceptance,
each row's included, is scored every step from what it would have drafted, so it runs where
that acceptance pays and sits out, at no cost, where it does not. Learned for free, it needs no
hope: the arm's acceptance is taken at a lower bound (CostModel.caution), and it runs on what
it has shown, not on the prior.

Exploration is priced, not scheduled. Costs are shared: the target's forward costs the same
whoever proposed, so a plain step teaches what a draft step's verification will cost. An arm
never run is predicted with a prior acceptance and the chunk its proposer declares (lookahead's
window is wide), and is tried only where that prediction beats plain, and then as a probe, with a
short draft (an n-gram arm's first try on sampled text yielded a third of what the prior
predicted). An arm that sits out is probed again, with a short draft, only where it would win at
a hopeful acceptance; each probe that does not win doubles the wait before the next one of that
arm (a probe may cost a draft catch-up forward over everything it skipped). A probe whose
step would verify nothing (lookahead with no candidate after any row's last token: its window
alone, 9-10 ms for one token at batch 1 against plain's 5.4) runs plain (engine.py). Probes share a
budget: what they took beyond what plain steps would have taken for the same tokens stays under
`explore_budget` of the job's time, so far and (where the engine says what is left) to come in
plain steps. A probe runs only where its predicted cost fits what is left of the budget whole
(a probe at batch 32 that first feeds the draft every row it skipped cost four plain steps; of
lookahead at batch 8, 2-3 plain steps: started on an unspent budget, the first probes of the draft
model and lookahead took 1-2% of every 1-2 s job of the CPU bench at batch 8, where neither won).

The first step is plain. The engine reports each prefill forward, which shows the target's cost
at another size, so the steps after it are predicted. Without one (the target seen at one size: a
batch of one-token prompts), it drafts the short probe length with its first arm, then takes one
plain step; where a probe drafts nothing (an n-gram lookup with no match) the next arm opens
instead, in turn, so a batch of one whose prompt repeats nothing still learns what drafting
costs. (A drafting opening at batch 32 cost what ten plain steps do: lookahead's window over
every row, or the draft model's prefill of every prompt.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .cost_model import PLAIN, CostModel, StepMeasurement


@dataclass(frozen=True)
class Choice:
    arm: str  # a proposer's name, or "ar" for a plain step
    k: int  # 0 for a plain step
    rows: tuple[int, ...] | None = None  # each row's own draft length (a plan); None: every row K
    probe: bool = False  # a try to learn what the arm yields: plain where it would verify nothing (engine.py)

    @property
    def plain(self) -> bool:
        return self.k == 0 or self.arm == PLAIN


PLAIN_STEP = Choice(PLAIN, 0)


@dataclass(frozen=True)
class BatchView:
    """What the engine's scheduler knows before a step, beyond its width."""

    context_tokens: int  # tokens in the rows' contexts, each shared prefix once: what a draft that saw none must prefill
    remaining_tokens: int  # tokens the job may still emit: the rows' limits and the waiting requests'
    desync: float = 0.0  # share of the job's time rows made to finish apart would cost (Scheduler.desync_cost)
    rows: list[dict] | None = None  # per row: arm -> its decayed (accepted drafts, trials), as CostModel.acceptance counts
    wave: list[int] | None = None  # per row: tokens it may still emit, where no request waits (the job's last wave); else None


class FixedPolicy:
    """Always K, with the one proposer it is bound to."""

    def __init__(self, k: int) -> None:
        if k < 0:
            raise ValueError(f"num_draft_tokens must be >= 0, got {k}")
        self.k = k
        self.arm = PLAIN

    def bind(self, arms: list[str], chunk=None, share=None) -> None:
        self.arm = arms[0]

    def choose(self, batch_size: int, view: BatchView | None = None) -> Choice:
        return Choice(self.arm, self.k)

    def observe(self, measurement: StepMeasurement) -> None:
        pass

    def prefilled(self, tokens: int, seconds: float) -> None:
        pass


@dataclass
class GoodputPolicy:
    max_k: int = 6
    fixed_k: bool = False  # only plain or K = max_k (auto under --draft-policy fixed)
    probe_after: int = 16  # steps an arm sits out before its first probe
    probe_k: int = 2
    switch_margin: float = 0.15  # draft only for a predicted gain above this over a plain step (see the docstring)
    hopeful_acceptance: float = 0.9  # an arm sitting out is probed only if it would win at this acceptance
    refresh_after: int = 32  # at most this many drafting steps at a batch size before a plain step re-measures plain
    refresh_cost: float = 0.01  # re-measuring plain may cost this share of a drafting arm's predicted time
    explore_budget: float = 0.01  # probes may lose at most this share of the job's time against plain steps
    recheck_after: int = 4  # plain steps at a batch size before drafting is weighed there again
    recheck_most: int = 16  # ... doubling each time plain is chosen again there, up to this many (see choose)
    probe_payoff: float = 0.25  # a probe's draft prefill must cost under this share of the gain it might find
    row_prior: float = 2.0  # trials of the arm's acceptance a row's own record starts from
    shadows: bool = True  # learn acceptance from shadow drafts where an arm can give them (engine.py)
    costs: CostModel = field(default_factory=CostModel)
    arms: list[str] = field(default_factory=list)
    _steps: int = 0
    _last_run: dict = field(default_factory=dict)  # arm -> step it last drafted
    _wait: dict = field(default_factory=dict)  # arm -> steps to sit out before its next probe
    _probing: str | None = None
    _opening: int = 0  # opening probes that ran plain (drafted nothing)
    _opened: bool = False  # an opening probe drafted
    _opening_probe: bool = False
    _margin: float = 0.0  # the gain over plain this step's drafting must predict
    saving_decay: float = 0.9  # per step: the saving below remembers about the last ten steps
    saving: float = 0.0  # decayed share of each recent step's time that drafting was predicted to save (0: plain won)
    _settled: dict = field(default_factory=dict)  # batch size -> (the step before which it stays plain unweighed, saving, desync)
    _plain_wait: dict = field(default_factory=dict)  # batch size -> the wait set by the last of the weighings in a row that chose plain there since rows last came
    _plain_at: dict = field(default_factory=dict)  # batch size -> the last plain step at it
    _planned: float | None = None  # this step's plan: the seconds its parts were predicted to take (CostModel.plan_parts)
    probes: int = 0  # probes so far: an opening, an arm's first try, an arm sitting out
    elapsed: float = 0.0  # seconds of every step so far
    explored: float = 0.0  # seconds probes took beyond what plain steps would have for their tokens

    def bind(self, arms: list[str], chunk=None, share=None) -> None:
        """The proposers it chooses among (the engine's, unless given at construction),
        chunk(arm, k): the tokens per row each writes besides the last, and share(arm): a draft
        forward's cost as a share of the target's, until one is measured."""
        if not self.arms:
            self.arms = list(arms)
        for arm in self.arms:
            if chunk is not None:
                for k in self.candidate_ks:
                    self.costs.chunk.setdefault((arm, k), chunk(arm, k))
            if share is not None:
                self.costs.share.setdefault(arm, share(arm))

    def expect_shadows(self, arms: list[str]) -> None:
        """The engine scores these arms by shadow drafts: none is probed, even before its first score."""
        for arm in arms:
            self.costs.expect_shadows(arm)

    @property
    def shadow_k(self) -> int:
        """Tokens the engine's shadow drafts ask for: what a step may draft (0: none)."""
        return self.max_k if self.shadows else 0

    @property
    def candidate_ks(self) -> list[int]:
        return [self.max_k] if self.fixed_k else list(range(1, self.max_k + 1))

    @property
    def acceptance(self) -> float:
        """The acceptance of the only arm (single-method policies)."""
        return self.costs.acceptance(self.arms[0] if self.arms else PLAIN)

    def best(self, batch_size: int, arms: list[str], acceptance: float | None = None) -> tuple[float, Choice]:
        """(predicted goodput, choice) of the best drafting step among arms."""
        ks, best = self.candidate_ks, (0.0, PLAIN_STEP)
        for arm in arms:
            for k, rate in zip(ks, self.costs.goodputs(arm, batch_size, ks, acceptance)):
                if rate > best[0] or best[1] is PLAIN_STEP:
                    best = (rate, Choice(arm, k))
        return best

    def choose(self, batch_size: int, view: BatchView | None = None) -> Choice:
        """The next step's arm and K for a batch of batch_size rows; view, where given, lets a
        probe be weighed against the job left (see _worth)."""
        self._steps += 1
        self._probing = None
        self._opening_probe = False
        self._planned = None
        if not self.arms or self.max_k == 0:
            return PLAIN_STEP
        if self._steps == 1:
            return PLAIN_STEP  # what plain costs, measured: every choice is weighed against it
        if not self.costs.target.has_slope:  # the target not yet measured at two sizes
            if self._opened:
                return PLAIN_STEP  # a probe drafted: a plain step measures the target at a second size
            # Draft a little to learn the costs. A probe can draft nothing (an n-gram lookup that
            # finds no match; a batch of one never changes size): then the next arm opens.
            self._opening_probe = True
            return self._probe(self.arms[self._opening % len(self.arms)], self.max_k)
        desync = view.desync if view is not None else 0.0
        until, held, settled_desync = self._settled.get(batch_size, (0, 0.0, 0.0))
        if self._steps < until and desync == settled_desync:
            # Plain won here a step or two ago, or drafting waited for the cohort rule: the costs
            # move slowly, and weighing every arm and K took 0.2-0.4 ms a step, 4-5% of a plain
            # step at batch 8 on the CPU. The saving goes on as it was last weighed.
            self.saving = self.saving_decay * self.saving + (1 - self.saving_decay) * held
            return PLAIN_STEP
        self._margin = self.switch_margin
        plain = self.costs.goodput(PLAIN, batch_size, 0)
        rate, choice = self._best_or_plain(batch_size, self.arms, plain)
        if not choice.plain and not self.costs.measured(choice.arm) and not self.costs.shadowed(choice.arm):
            # Never run: its predicted gain rests on the prior acceptance. Trying it is exploration,
            # a short probe within the budget, like any probe (an n-gram arm's first try on sampled
            # text yielded a third of its prediction).
            if self._worth(choice.arm, batch_size, rate, plain, view):
                return self._probe(choice.arm, choice.k)
            rate, choice = self._best_or_plain(batch_size, [a for a in self.arms if self.costs.measured(a)], plain)
        elif not choice.plain and not self.costs.measured(choice.arm):  # its shadow drafts are not scored yet
            rate, choice = plain, PLAIN_STEP
        if batch_size > 1 and view is not None and view.rows is not None:
            rate, choice = self._plan(batch_size, view.rows, rate, choice, plain)
        if not choice.plain and batch_size > 1 and view is not None and view.wave is not None:
            rate, choice = self._wave_best(batch_size, view, rate, choice, plain)
        d = self.saving_decay
        saved = 0.0 if choice.plain else 1 - plain / rate
        self.saving = d * self.saving + (1 - d) * saved
        gated = not choice.plain and desync > 0 and (desync > self.saving or not self.costs.has_bias(choice.arm))
        if gated:
            # Rows that finish together and are refilled in one prefill would be made to finish
            # apart for the rest of the job (Scheduler.desync_cost): a share of every step from
            # here on, paid back only by the steps that draft. It waits until drafting has saved
            # more than that share of recent steps (drafting now and then breaks the cohort and
            # pays for little of it), and never rests on an arm whose steps were never measured
            # against their prediction (a shadow-scored arm's acceptance is known, its cost in a
            # packed step is not: the first plans at batch 32 took 1.5-2x their prediction).
            rate, choice = plain, PLAIN_STEP
            self._planned = None
        for arm in self.arms:  # an arm sitting out long enough, that could win if it accepted well
            if arm == choice.arm or self.costs.shadowed(arm) or self._steps - self._last_run.get(arm, 0) < self._wait.get(arm, self.probe_after):
                continue
            if self.explored >= self._budget(view, plain):
                break
            hope, _ = self.best(batch_size, [arm], self.hopeful_acceptance)
            if hope >= (1 + self._margin + desync) * rate and self._worth(arm, batch_size, hope, rate, view):
                return self._probe(arm, self.max_k)
        if choice.plain:
            # Weighed again in a few steps, or as soon as the desync moves; the wait doubles each
            # time plain is chosen again, until rows come (prefilled) or drafting is chosen. The
            # same rows rarely turn within a few steps, a saving held back by the cohort rule goes
            # on as last weighed, and weighing every four steps was a third of auto's own host
            # work at batch 8 on the CPU (about 0.6% of the job).
            last = self._plain_wait.get(batch_size)
            wait = self.recheck_after if last is None else max(min(2 * last, self.recheck_most), self.recheck_after)
            self._plain_wait[batch_size] = wait
            self._settled[batch_size] = (self._steps + wait, saved, desync)
            return choice
        self._plain_wait.pop(batch_size, None)
        if self._steps - self._plain_at.get(batch_size, 0) > self.refresh_interval(rate / plain - 1):
            return PLAIN_STEP
        return self._ran(choice)

    def _plan(self, batch_size: int, rows: list[dict], rate: float, choice: Choice, plain: float) -> tuple[float, Choice]:
        """The best of (rate, choice) and a plan per arm: each row drafts its own length. The
        rows of one batch differ (one copies its prompt, the next writes freely), and a packed
        forward (packing.py) runs each row's own tokens only, so a row drafts j tokens where
        what they add to the step, j x CostModel.token_seconds with the margin, is below what
        the tokens it is expected to accept save: a plain step's seconds per row each. A row's
        acceptance is its own record with the arm, drawn toward the arm's by row_prior trials
        (a row without one drafts as the arm's acceptance says, and so starts a record). A plan
        runs where its predicted goodput (calibrated by the arm's bias) beats plain by the
        margin and the best step that drafts K in every row. Arms with a chunk wider than the
        draft (lookahead's window: one tree forward, never packed) and arms never run plan
        nothing."""
        value = self.costs.seconds(PLAIN, batch_size, 0) / batch_size
        best = (max(rate, (1 + self._margin) * plain), None)
        k = self.max_k
        for arm in self.arms:
            if self.costs.chunk.get((arm, k), k) != k or not self.costs.measured(arm):
                continue
            prior = self.costs.acceptance(arm)
            price = (1 + self._margin) * self.costs.token_seconds(arm)
            lengths, tokens, seen = [], 0.0, {}
            for row in rows:
                record = row.get(arm, (0.0, 0.0))
                if record not in seen:
                    a = self._row_acceptance(record, prior)
                    gain, j = max((value * (a - a ** (j + 1)) / (1 - a) - price * j, j) for j in range(1, k + 1))
                    j = j if gain > 0 else 0
                    seen[record] = (j, (1 - a ** (j + 1)) / (1 - a))
                j, expected = seen[record]
                lengths.append(j)
                tokens += expected
            if not any(lengths):
                continue
            parts = self.costs.plan_parts(arm, lengths)
            planned = tokens / max(self.costs.plan_seconds(arm, lengths, tokens, parts), 1e-12)
            if planned > best[0]:
                best = (planned, (Choice(arm, max(lengths), tuple(lengths)), parts))
        if best[1] is None:
            return rate, choice
        plan, self._planned = best[1]
        return best[0], plan

    def _row_acceptance(self, record: tuple[float, float], prior: float) -> float:
        """A row's acceptance with an arm: its own (accepted drafts, trials), drawn toward the
        arm's acceptance `prior` by row_prior trials."""
        return min((record[0] + self.row_prior * prior) / (record[1] + self.row_prior), 0.999)

    def _wave_best(self, batch_size: int, view: BatchView, rate: float, choice: Choice, plain: float) -> tuple[float, Choice]:
        """In the job's last wave: the best of the choice and every K of each measured arm by
        _wave_rate, where it beats plain by the margin; else plain."""
        best = (self._wave_rate(choice, rate, view), choice)
        for arm in self.arms:
            if self.costs.measured(arm):
                for k, goodput in zip(self.candidate_ks, self.costs.goodputs(arm, batch_size, self.candidate_ks)):
                    if (wave := self._wave_rate(Choice(arm, k), goodput, view)) > best[0]:
                        best = (wave, Choice(arm, k))
        if best[0] < (1 + self._margin) * plain:
            best = (plain, PLAIN_STEP)
        if best[1] is not choice:
            self._planned = None  # a plan's parts were predicted for the plan
        return best

    def _wave_rate(self, choice: Choice, rate: float, view: BatchView) -> float:
        """The choice's goodput `rate`, counting only the tokens that bring the job's end nearer.
        With no request waiting the batch is the job's last wave, which ends when its slowest
        row does; a freed slot takes nobody, so what a row emits beyond the wave's pace is worth
        nothing. Row b has rem_b tokens to go and would emit r_b a step (its own acceptance, as
        _plan estimates it; 1 where it drafts nothing): the wave takes max_b rem_b / r_b such
        steps instead of max_b rem_b plain ones, so of the step's sum_b r_b expected tokens,
        B x max_b rem_b / max_b (rem_b / r_b) count. Rows copying alike keep their gain (the
        long outputs of the CPU bench: 1.8x); where some rows copy and the rest write freely
        (independent prompts, batch 32, the second of two waves), drafting ended the copying
        rows early, every step still took the rest, and the job ran at 0.93x of plain decoding."""
        prior = self.costs.acceptance(choice.arm)
        lengths = choice.rows or (choice.k,) * len(view.wave)
        # A row's own record stands for it only where shadow drafts keep it current while the
        # arm sits out; elsewhere one early rejection (no record moves while the arm is
        # withheld) held lookahead off for the rest of a long-outputs wave: 1.10x of plain, was 1.35x.
        fresh = view.rows is not None and self.costs.shadowed(choice.arm)
        records = view.rows if fresh else [{}] * len(view.wave)
        rates = []
        for left, j, record in zip(view.wave, lengths, records):
            a = self._row_acceptance(record.get(choice.arm, (0.0, 0.0)), prior)
            rates.append((1 - a ** (max(0, min(j, left - 1)) + 1)) / (1 - a))
        steps = max(left / r for left, r in zip(view.wave, rates))
        return rate * len(rates) * max(view.wave) / steps / sum(rates)

    def _best_or_plain(self, batch_size: int, arms: list[str], plain: float) -> tuple[float, Choice]:
        """The best drafting step among arms where it beats plain goodput by the margin, else plain."""
        rate, choice = self.best(batch_size, arms)
        return (rate, choice) if rate >= (1 + self._margin) * plain else (plain, PLAIN_STEP)

    def _worth(self, arm: str, batch_size: int, rate: float, plain: float, view: BatchView | None) -> bool:
        """Whether a probe of arm fits what is left of the exploration budget, and the job left
        is long enough for it to pay. A probe costs what its draft must first prefill (every
        row's context, at most; the draft's share of a target forward over it) and what its step
        costs beyond plain's should it accept nothing: that must fit the budget whole, not only
        start within it (a probe of lookahead at batch 8 took 17-27 ms against plain's 7.4, of
        the draft model the prefill of eight prompts; started on an unspent budget, such probes
        took 1-2% of a 1.1 s job, every job of the CPU bench). Where rows now finish together it
        also costs their lockstep: a probe of two tokens ended the first wave's rows two steps
        apart, and they stayed apart (view.desync of the rest of the job). All of it must stay
        under probe_payoff of what the arm would save over the rest of the job if it ran at
        `rate` against `plain` (both tokens per second). A probe of the draft model at batch 32
        fed it 32 prompts, a tenth of a 64-request job; on a long job the same probe is cheap.
        Near the job's end nothing is: lookahead and the draft model probed with two rows and
        a few tokens left took 15-17 ms for 4 tokens against plain's 7 ms for 2."""
        if not plain > 0:
            return False
        step = self.costs.seconds(arm, batch_size, min(self.probe_k, self.max_k)) - batch_size / plain
        cost = max(step, 0.0)
        if view is not None:  # (without one, what the draft would prefill is not known)
            cost += self.costs.share.get(arm, 0.0) * self.costs.target.predict(view.context_tokens)
        if self.explored + cost > self._budget(view, plain):
            return False
        if view is None:
            return True
        if not rate > plain:
            return False
        left = view.remaining_tokens / plain  # seconds, in plain steps
        return cost + view.desync * left <= self.probe_payoff * (1 - plain / rate) * left

    def _budget(self, view: BatchView | None, plain: float) -> float:
        """Seconds probes may lose in all: explore_budget of the job's time so far and, where the
        view says what is left, of what that takes in plain steps (plain: tokens per second)."""
        left = view.remaining_tokens / plain if view is not None and plain > 0 else 0.0
        return self.explore_budget * (self.elapsed + left)

    def _probe(self, arm: str, k: int) -> Choice:
        """A short draft of an arm to learn what it yields: exploration, charged to the budget."""
        self._probing = arm
        self._planned = None  # every row drafts the probe's K
        self.probes += 1
        return self._ran(Choice(arm, min(self.probe_k, k), probe=True))

    def refresh_interval(self, gain: float) -> int:
        """Drafting steps at one batch size between plain steps that re-measure plain there, for an
        arm predicted to gain `gain` (0.1: 10% more tokens per second). A plain step instead of
        such a draft step loses about gain / (1 + gain) of a step: one every gain / refresh_cost
        steps costs under refresh_cost. A close call is checked often (its plain estimate, one
        noisy step from long ago, may be all that makes drafting look better), a clear win
        seldom."""
        return min(max(int(gain / self.refresh_cost), 4), self.refresh_after)

    def _ran(self, choice: Choice) -> Choice:
        self._last_run[choice.arm] = self._steps
        return choice

    def prefilled(self, tokens: int, seconds: float) -> None:
        """A prefill forward ran (see CostModel.prefilled): rows came, and are weighed afresh."""
        self.costs.prefilled(tokens, seconds)
        self._plain_wait.clear()

    def observe(self, measurement: StepMeasurement) -> None:
        batch = len(measurement.num_draft)
        seconds = measurement.step_seconds or measurement.target_seconds + measurement.propose_seconds
        self.elapsed += seconds
        if self._probing is not None:  # beyond what plain steps would have taken for its tokens
            plain = self.costs.goodput(PLAIN, batch, 0)
            tokens = batch + sum(measurement.num_accepted)
            self.explored = max(self.explored + seconds - (tokens / plain if plain > 0 else 0.0), 0.0)
        ran_plain = measurement.arm == PLAIN
        self.costs.observe(measurement, None if ran_plain else self._planned)
        if ran_plain:
            self._plain_at[batch] = self._steps
        if self._opening_probe:
            if not ran_plain:
                self._opened = True
            else:
                self._opening += 1
        arm = self._probing
        if arm is not None:  # a probe that would not be chosen now waits twice as long for the next
            won = self.best(batch, [arm])[0] >= (1 + self._margin) * self.costs.goodput(PLAIN, batch, 0)
            self._wait[arm] = self.probe_after if won else 2 * self._wait.get(arm, self.probe_after)


def make_policy(name: str, num_draft_tokens: int, arms: list[str] | None = None):
    """The policy for one method (arms None: the engine's proposer) or auto's (arms: all of them,
    with a fixed K under --draft-policy fixed)."""
    if name not in ("fixed", "adaptive"):
        raise ValueError(f"unknown draft policy {name!r}; use fixed or adaptive")
    if arms is not None:
        return GoodputPolicy(max_k=num_draft_tokens, fixed_k=name == "fixed", arms=list(arms))
    return FixedPolicy(num_draft_tokens) if name == "fixed" else GoodputPolicy(max_k=num_draft_tokens)
