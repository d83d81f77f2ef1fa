"""Draft-free methods through the same verifier: n-gram lookup, lookahead decoding, layer-skip
self-speculation and auto. Greedy output equals plain decoding; sampled output keeps the target's
distribution (one-hot q, several candidates for lookahead), each with a negative control."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from specbatch.decoding import Engine, GenerationRequest, SamplingParams
from specbatch.decoding import verifier as verifier_module
from specbatch.decoding.cost_model import StepMeasurement
from specbatch.decoding.draft_policy import BatchView, Choice, FixedPolicy, GoodputPolicy
from specbatch.decoding.layerskip import default_layers, skip_layers_view
from specbatch.decoding.lookahead import LookaheadProposer
from specbatch.decoding.methods import make_speculation
from specbatch.decoding.ngram import NgramProposer
from specbatch.decoding.sampling import RowSampling

from .conftest import EOS, random_prompts, tiny_llama
from .test_sampling import chi_square_p
from .test_speculative import exact_marginals


def repetitive_prompts(n: int, seed: int) -> list[list[int]]:
    """Prompts that repeat a random phrase, as code and templated text do."""
    return [(p[:6] * 4)[: 6 + 3 * (i % 5)] for i, p in enumerate(random_prompts(n, lo=6, hi=12, seed=seed))]


def run(model, requests, batch, proposer=None, policy=None):
    return Engine(model, [EOS], batch, proposer=proposer, policy=policy).generate(requests)


def assert_greedy_equals_plain(model, batch_size, speculations) -> list[GenerationRequest]:
    """Repetitive and random prompts with ragged token limits: every (proposer, policy) gives
    plain decoding's tokens and finish reasons. Returns the requests."""
    prompts = repetitive_prompts(16, seed=batch_size) + random_prompts(8, seed=30)
    requests = [GenerationRequest(str(i), p, 3 + i % 11) for i, p in enumerate(prompts)]
    reference = run(model, requests, batch_size)
    for proposer, policy in speculations:
        results = run(model, requests, batch_size, proposer, policy)
        assert [r.completion_ids for r in results] == [r.completion_ids for r in reference]
        assert [r.finish_reason for r in results] == [r.finish_reason for r in reference]
    return requests


def test_prompt_lookup_and_the_learned_table():
    proposer = NgramProposer(max_ngram=2)
    proposer.start(num_slots=2, capacity=64)
    sampling = RowSampling([SamplingParams(), SamplingParams()])
    draft = proposer.propose([0, 1], [[7, 8, 9, 1, 7, 8], [3, 4]], [3, 3], sampling)
    assert draft.num_draft == [3, 0] and draft.tokens[0].tolist() == [9, 1, 7]  # "7 8" was followed by "9 1 7"
    # Slot 1's generated tokens (after its 2-token prompt) teach the table; another request then uses it.
    proposer.propose([1], [[3, 4, 20, 21, 22]], [0], sampling)
    proposer.release(1)
    draft = proposer.propose([1], [[50, 20, 21]], [2], RowSampling([SamplingParams()]))
    assert draft.tokens[0].tolist() == [22]  # (20, 21) -> 22, learned from the other request
    # Token recycling: the target's top-k after each token it verified, accepted or not.
    logits = torch.zeros(1, 2, 100)
    logits[0, 0, 60], logits[0, 1, 61] = 2.0, 2.0  # after 21 the target favours 60; after 22, 61
    proposer.accepted([1], [3], [0], logits)
    assert proposer.adjacency[21][0] == 60 and proposer.adjacency[22][0] == 61
    draft = proposer.propose([1], [[90, 91, 22]], [2], RowSampling([SamplingParams()]))
    assert draft.tokens[0].tolist() == [61]  # no prompt match, no trigram: the recycled successor


@pytest.mark.parametrize("batch_size", [1, 5, 16])
def test_greedy_ngram_equals_plain_decoding(batch_size):
    model = tiny_llama(seed=4)
    speculations = [(NgramProposer(), FixedPolicy(4)), (NgramProposer(), GoodputPolicy(max_k=5))]
    requests = assert_greedy_equals_plain(model, batch_size, speculations)
    fixed = run(model, requests, batch_size, NgramProposer(), FixedPolicy(4))
    assert sum(r.drafted_tokens for r in fixed) > 0


def test_ngram_samples_follow_the_target_distribution(monkeypatch):
    target = tiny_llama(seed=21)
    with torch.no_grad():
        target.lm_head.weight.mul_(40.0)
    # A prompt whose tail recurs, so lookup proposes tokens that p often, but not always, picks.
    prompt, settings = [5, 17, 42, 8, 5, 17], dict(temperature=1.0, top_k=5)
    assert_samples_follow_the_target(target, prompt, settings, NgramProposer, monkeypatch)


def assert_samples_follow_the_target(target, prompt, settings, make_proposer, monkeypatch) -> None:
    """Tokens 2 and 3 of 4000 seeded samples against the target's exact marginals (chi-square);
    then the negative control, the rejected token kept in the residual, must be caught."""
    marginals = exact_marginals(target, prompt, settings, depth=3)

    def samples():
        requests = [GenerationRequest(str(i), prompt, 4, SamplingParams(seed=i, **settings)) for i in range(4000)]
        results = run(target, requests, 256, make_proposer(), FixedPolicy(2))
        assert sum(r.accepted_tokens for r in results) > 200  # the proposals matter to the outcome
        return [r.completion_ids for r in results]

    good = samples()
    for position in (1, 2):
        assert chi_square_p([s[position] for s in good], marginals[position]) > 1e-3
    monkeypatch.setattr(verifier_module, "residual_distribution", lambda p, q: p)  # x not removed on rejection
    bad = samples()
    assert min(chi_square_p([s[position] for s in bad], marginals[position]) for position in (1, 2)) < 1e-3


# ---------------------------------------------------------------- lookahead decoding


def test_lookahead_window_layout_and_pool():
    proposer = LookaheadProposer(window=3, ngram=3, max_candidates=2)
    proposer.start(num_slots=1, capacity=64)
    proposer.admit(0, None)
    seq = [7, 8, 9, 7, 8, 5, 7]
    draft = proposer.propose([0], [seq], [2], RowSampling([SamplingParams()]))
    tree = draft.tree
    # Window: 2 levels x 3 columns; then the pool's candidates for the last token 7, most recent first.
    assert tree.depth[0].tolist() == [1, 2, 3, 2, 3, 4, 1, 2, 1, 2]
    assert tree.tokens[0, 6:].tolist() == [8, 5, 8, 9] and tree.candidates == [[[7, 8], [9, 10]]]
    assert draft.num_draft == [2]
    visible = tree.chunk_visible()[0].int()
    assert visible[5].tolist() == [1, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0]  # level 1, column 1: x, w0[0..1], itself
    assert visible[8].tolist() == [1, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0]  # a candidate sees x and its own tokens
    # The window's last level predicts; each column's trajectory becomes a 3-gram of the pool.
    logits = torch.zeros(1, 11, 50)
    logits[0, [4, 5, 6], [40, 41, 42]] = 1.0  # the last level's columns sit at chunk indices 4..6
    window = [list(level) for level in proposer._levels[0]]
    proposer.accepted([0], [len(seq)], [0], logits)
    assert proposer._levels[0] == [window[1], [40, 41, 42]]
    assert (window[1][0], 40) in proposer._pools[0][window[0][0]]


@pytest.mark.parametrize("batch_size", [1, 5, 16])
def test_greedy_lookahead_equals_plain_decoding(batch_size):
    model = tiny_llama(seed=4)
    speculations = [(LookaheadProposer(), FixedPolicy(3)), (LookaheadProposer(2, 3, 6), GoodputPolicy(2))]
    requests = assert_greedy_equals_plain(model, batch_size, speculations)
    fixed = run(model, requests, batch_size, LookaheadProposer(), FixedPolicy(3))
    assert sum(r.accepted_tokens for r in fixed) > 0


def test_lookahead_samples_follow_the_target_distribution(monkeypatch):
    target = tiny_llama(seed=21)
    with torch.no_grad():
        target.lm_head.weight.mul_(40.0)
    # A prompt that holds the target's own greedy continuation of its tail, so the pool (which
    # takes the prompt's n-grams) proposes what p often, but not always, picks.
    greedy = run(target, [GenerationRequest("g", [5, 17], 8)], 1)[0].completion_ids
    prompt, settings = [5, 17] + greedy + [5, 17], dict(temperature=1.0, top_k=5)
    proposer = lambda: LookaheadProposer(window=2, ngram=3, max_candidates=3)  # noqa: E731
    assert_samples_follow_the_target(target, prompt, settings, proposer, monkeypatch)


# ---------------------------------------------------------------- layer skipping and auto


def test_layer_skip_view_shares_the_target_weights():
    model = tiny_llama(seed=4, layers=4)
    view = skip_layers_view(model, [0, 3])
    assert len(view.model.layers) == 2 and len(model.model.layers) == 4  # the target is untouched
    assert view.model.layers[1] is model.model.layers[3] and view.lm_head is model.lm_head
    assert default_layers(6) == [0, 1, 2, 5] and default_layers(4) == [0, 1, 3]
    with pytest.raises(ValueError, match="increasing indices"):
        skip_layers_view(model, [2, 1])
    # One view per model and layers: a new one is probed by cascade attention before its first
    # forward (the bench builds an engine a run, 1% of a run of auto at batch 32).
    assert skip_layers_view(model, [0, 3]) is view and skip_layers_view(model, [0, 1]) is not view


class RoundRobin:
    """A draft policy that switches arm every step: plain, then each arm in turn."""

    def __init__(self, k: int) -> None:
        self.k, self.steps, self.arms = k, 0, []

    def bind(self, arms, chunk=None, share=None) -> None:
        self.arms = ["ar", *arms]

    def choose(self, batch_size: int, view=None) -> Choice:
        self.steps += 1
        arm = self.arms[self.steps % len(self.arms)]
        return Choice(arm, 0 if arm == "ar" else self.k)

    def observe(self, measurement) -> None:
        pass

    def prefilled(self, tokens: int, seconds: float) -> None:
        pass


@pytest.mark.parametrize("batch_size", [1, 5, 16])
def test_greedy_layerskip_and_auto_equal_plain_decoding(batch_size):
    model = tiny_llama(seed=4, layers=4)
    prompts = repetitive_prompts(16, seed=batch_size) + random_prompts(8, seed=30)
    requests = [GenerationRequest(str(i), p, 3 + i % 11) for i, p in enumerate(prompts)]
    reference = run(model, requests, batch_size)
    for method in ("layerskip", "auto"):
        proposer, policy = make_speculation(method, model, tiny_llama(seed=9, layers=1), "fixed", 3)
        if method == "auto":  # every arm in turn (the cost model may well choose plain steps on this tiny model)
            policy = RoundRobin(3)
        results = run(model, requests, batch_size, proposer, policy)
        assert [r.completion_ids for r in results] == [r.completion_ids for r in reference], method
        assert [r.finish_reason for r in results] == [r.finish_reason for r in reference]
        assert sum(r.accepted_tokens for r in results) > 0
        methods = {s.method for r in results for s in r.steps}
        assert methods <= {"ar", "ngram", "lookahead", "layerskip", "draft"}
        if method == "auto":  # its choices recorded per step
            assert proposer.tried.keys() == {"ngram", "lookahead", "layerskip", "draft"}
            assert min(proposer.tried.values()) >= 1 and len(methods) >= 3


def auto_steps(policy: GoodputPolicy, batch: int, steps: int, target_cost, arms: dict, share=None, shadowed=()) -> list[str]:
    """Synthetic steps of a policy over arms: name -> (acceptance, proposing seconds per row).
    Arms in `shadowed` are scored by shadow drafts of K tokens in every row of every step they do
    not run (engine.py). Returns the arm each step ran ("ar" for plain)."""
    rng = np.random.default_rng(0)
    policy.bind(list(arms), lambda arm, k: 24 if arm == "wide" else k, share)
    chosen = []
    for _ in range(steps):
        choice = policy.choose(batch)
        acceptance, host = arms.get(choice.arm, (0.0, 0.0))
        ks = [choice.k] * batch
        accepted = [int(min(choice.k, rng.geometric(1 - acceptance) - 1)) if choice.k else 0 for _ in range(batch)]
        width = 1 + (policy.costs.chunk.get((choice.arm, choice.k), choice.k) if choice.k else 0)
        target = target_cost(batch * width)
        propose = batch * host if choice.k else 0.0
        shadows = {}
        for arm in shadowed:
            if arm != choice.arm or not choice.k:
                runs = [int(min(policy.max_k, rng.geometric(1 - arms[arm][0]) - 1)) for _ in range(batch)]
                shadows[arm] = (sum(runs), sum(n < policy.max_k for n in runs))
        policy.observe(
            StepMeasurement(choice.arm, choice.k, ks, accepted, batch * width, target, propose, step_seconds=target + propose, shadows=shadows)
        )
        chosen.append(choice.arm if choice.k else "ar")
    return chosen


def test_auto_settles_on_the_arm_with_the_best_goodput():
    """Cheap verification (small batch on an accelerator): the accurate, cheap arm wins; the others
    are tried, then only probed now and then."""
    flat = lambda tokens: 0.010 + 0.00001 * tokens  # noqa: E731
    arms = {"slow": (0.8, 0.004), "fast": (0.8, 0.0), "poor": (0.1, 0.0)}
    chosen = auto_steps(GoodputPolicy(max_k=4), 2, 200, flat, arms)
    assert chosen[100:].count("fast") >= 90
    assert {"slow", "poor"} <= set(chosen)  # each was tried


def test_auto_never_runs_an_arm_predicted_slower_than_plain():
    """Compute-bound verification (a large batch on a CPU): a step of K + 1 tokens per row costs
    K + 1 plain steps, so no arm can win; after the first (plain) step and the one opening probe
    (no prefill showed the target at a second size) every step is plain, and the wide arm
    (lookahead's window) is never run at all, even with perfect acceptance."""
    linear = lambda tokens: 0.0005 * tokens  # noqa: E731
    arms = {"ngram": (0.5, 0.0), "wide": (0.99, 0.0)}
    chosen = auto_steps(GoodputPolicy(max_k=4), 32, 300, linear, arms)
    assert chosen[:2] == ["ar", "ngram"] and "wide" not in chosen
    assert chosen[2:].count("ar") >= 295
    # the negative control: cheap verification, the same arms: drafting wins and is chosen
    flat = lambda tokens: 0.010 + 0.00001 * tokens  # noqa: E731
    assert auto_steps(GoodputPolicy(max_k=4), 32, 300, flat, arms)[100:].count("ar") < 10


def test_an_arm_scored_by_shadow_drafts_runs_where_it_pays_and_is_never_probed():
    """Shadow drafts score the n-gram arm every step it sits out: where its acceptance cannot pay
    it stops running as soon as the scores outweigh the prior acceptance, and is never probed
    after; where it pays it runs. The poor arm's lookup costs 0.5 ms a row (a tenth of a plain
    step here), so at 5% acceptance it loses to plain; free, it would gain 5% and run now and
    then near the margin. The negative control, the same poor arm unscored, is probed again and
    again."""
    flat = lambda tokens: 0.010 + 0.00001 * tokens  # noqa: E731
    poor = auto_steps(GoodputPolicy(max_k=4), 2, 300, flat, {"ngram": (0.05, 0.0005)}, shadowed=["ngram"])
    assert poor[10:].count("ngram") == 0
    unscored = auto_steps(GoodputPolicy(max_k=4), 2, 300, flat, {"ngram": (0.05, 0.0005)})
    assert unscored[10:].count("ngram") >= 3
    good = auto_steps(GoodputPolicy(max_k=4), 2, 300, flat, {"ngram": (0.8, 0.0)}, shadowed=["ngram"])
    assert good[50:].count("ngram") >= 240


def test_an_arm_scored_by_shadow_drafts_runs_on_what_it_has_shown_not_on_the_prior():
    """A shadow-scored arm is learned at no cost, so its acceptance is taken a lower bound below
    the estimate (CostModel.caution): at batch 1 with an acceptance of 0.15 (the n-gram arm's
    on sampled text), which does not pay for its 2 ms lookup, it never runs, though over its
    first scores the hopeful prior (0.6,
    four trials) says it would. (The second step is the opening probe: the target not yet seen
    at two sizes.) The negative control, no caution, runs it then."""
    flat = lambda tokens: 0.010 + 0.00001 * tokens  # noqa: E731
    arm = {"ngram": (0.15, 0.002)}
    cautious = auto_steps(GoodputPolicy(max_k=4), 1, 200, flat, arm, shadowed=["ngram"])
    hopeful = GoodputPolicy(max_k=4)
    hopeful.costs.caution = 0.0
    assert cautious[1] == "ngram" and cautious[2:].count("ngram") == 0
    assert auto_steps(hopeful, 1, 200, flat, arm, shadowed=["ngram"])[2:].count("ngram") >= 3


def cohort_steps(acceptance: float, desync: float, apart: int = 0, steps: int = 120, batch: int = 8) -> list[str]:
    """Steps of a one-arm policy on cheap verification, the arm scored by shadow drafts. For the
    first `apart` steps the rows already finish apart; then they form a cohort whose rows would
    be made to finish apart by drafting (view.desync). Returns each step's arm."""
    flat = lambda tokens: 0.010 + 0.00001 * tokens  # noqa: E731
    policy = GoodputPolicy(max_k=4)
    policy.bind(["ngram"], lambda arm, k: k)
    policy.prefilled(batch * 40, flat(batch * 40))  # the target seen at a second size: no opening probe
    rng = np.random.default_rng(1)
    chosen = []
    for step in range(steps):
        view = BatchView(context_tokens=400, remaining_tokens=100_000, desync=desync if step >= apart else 0.0)
        choice = policy.choose(batch, view)
        runs = [int(min(4, rng.geometric(1 - acceptance) - 1)) for _ in range(batch)]
        shadows = {} if choice.k else {"ngram": (sum(runs), sum(n < 4 for n in runs))}
        accepted = [min(n, choice.k) for n in runs] if choice.k else [0] * batch
        width = 1 + choice.k
        policy.observe(
            StepMeasurement(choice.arm, choice.k, [choice.k] * batch, accepted, batch * width, flat(batch * width), step_seconds=flat(batch * width), shadows=shadows)
        )
        chosen.append(choice.arm if choice.k else "ar")
    return chosen


def test_a_cohort_is_broken_only_by_measured_drafting_that_keeps_paying():
    """Rows that would finish together lose a share of every later step once drafting ends them
    apart (desync). An arm known only from its shadow drafts, its steps never measured, does not
    break a cohort however well it would accept (its control: rows already apart, it drafts). One
    measured while the rows were apart keeps drafting in the cohort only where it saves more than
    that share: at 30% a step it stops, though it beats a plain step by the margin; at 70% it
    goes on."""
    assert cohort_steps(acceptance=0.8, desync=0.0)[20:].count("ngram") >= 90
    assert "ngram" not in cohort_steps(acceptance=0.8, desync=0.4)
    weak = cohort_steps(acceptance=0.3, desync=0.4, apart=40)
    assert weak[10:40].count("ngram") >= 25 and "ngram" not in weak[50:]
    strong = cohort_steps(acceptance=0.8, desync=0.4, apart=40)
    assert strong[40:].count("ngram") >= 75


def test_drafting_held_back_by_the_cohort_rule_is_weighed_every_few_steps_and_at_once_when_the_cohort_ends():
    """Weighing every arm and K is most of the policy's own cost (0.1-0.2 ms a step on the CPU).
    Where the cohort rule holds drafting back it is weighed again after recheck_after steps,
    twice as many each time after (up to recheck_most), as where plain won; when the desync moves
    (the cohort ends), at the very next step, which drafts."""
    flat = lambda tokens: 0.010 + 0.00001 * tokens  # noqa: E731
    policy = GoodputPolicy(max_k=4)
    policy.bind(["ngram"], lambda arm, k: k)
    policy.prefilled(8 * 40, flat(8 * 40))
    weighings, real = [0], policy.costs.goodputs

    def counted(*args, **kwargs):
        weighings[0] += 1
        return real(*args, **kwargs)

    policy.costs.goodputs = counted
    weighed, chosen = [], []
    for step in range(61):
        before = weighings[0]
        choice = policy.choose(8, BatchView(context_tokens=400, remaining_tokens=100_000, desync=0.4 if step < 60 else 0.0))
        weighed.append(weighings[0] > before)
        chosen.append(choice.arm if choice.k else "ar")
        shadows = {"ngram": (24, 2)} if not choice.k else {}
        policy.observe(StepMeasurement(choice.arm, choice.k, [choice.k] * 8, [choice.k] * 8, 8 * (1 + choice.k), flat(8), step_seconds=flat(8), shadows=shadows))
    assert chosen[:60] == ["ar"] * 60  # held back: the arm's steps were never measured
    at = [step for step in range(60) if weighed[step]]
    assert [b - a for a, b in zip(at, at[1:])] == [4, 8, 16, 16]
    assert weighed[60] and chosen[60] == "ngram"


def opening_steps(policy: GoodputPolicy, steps: int, matches_from: dict, acceptance: float) -> list[Choice]:
    """Batch-of-one steps on cheap verification where an arm drafts nothing before step
    matches_from[arm] (an n-gram table with no match yet) and then drafts K, `acceptance` of it
    accepted. Returns the choices."""
    flat = lambda tokens: 0.010 + 0.00001 * tokens  # noqa: E731
    policy.bind(list(matches_from), lambda arm, k: k)
    choices = []
    for step in range(steps):
        choice = policy.choose(1)
        drafted = choice.k if not choice.plain and step >= matches_from[choice.arm] else 0
        accepted = int(drafted * acceptance)
        arm = choice.arm if drafted else "ar"
        target = flat(1 + drafted)
        policy.observe(StepMeasurement(arm, choice.k, [drafted], [accepted], 1 + drafted, target, 0.0, step_seconds=target))
        choices.append(choice)
    return choices


def test_a_probe_that_drafts_nothing_does_not_end_the_opening():
    """A batch of one whose prompt repeats nothing yet: the n-gram probe drafts nothing and the
    target is seen at one size only (no prefill reported). After the first, plain, step the
    opening goes on (probing costs a lookup) until a probe drafts, which shows the target at a
    second size; then it drafts where that pays."""
    choices = opening_steps(GoodputPolicy(max_k=4), 60, {"ngram": 5}, acceptance=1.0)
    assert [(c.arm, c.k) for c in choices[:6]] == [("ar", 0)] + [("ngram", 2)] * 5  # drafts from step 5
    assert sum(not c.plain for c in choices[6:]) >= 50

    # auto: an arm that drafts nothing hands the opening to the next one
    choices = opening_steps(GoodputPolicy(max_k=4), 60, {"ngram": 1000, "draft": 0}, acceptance=1.0)
    assert [c.arm for c in choices[:3]] == ["ar", "ngram", "draft"]
    assert sum(c.arm == "draft" for c in choices[3:]) >= 50


def test_auto_prices_a_draft_model_it_has_not_run_by_its_size():
    """A draft forward not yet measured costs its share of the target's (parameters or layers):
    one as costly as the target is never run, however well it might accept; a free one is."""
    flat = lambda tokens: 0.010 + 0.00001 * tokens  # noqa: E731
    arms = {"ngram": (0.0, 0.0), "draft": (0.8, 0.0)}
    heavy = auto_steps(GoodputPolicy(max_k=4), 4, 200, flat, arms, share=lambda arm: 0.0 if arm == "ngram" else 1.0)
    assert "draft" not in heavy
    free = auto_steps(GoodputPolicy(max_k=4), 4, 200, flat, arms, share=lambda arm: 0.0)
    assert free[100:].count("draft") >= 90


def test_the_engine_declares_each_arms_size_to_the_policy():
    model, draft = tiny_llama(seed=4, layers=4), tiny_llama(seed=9, layers=1, hidden=16)
    proposer, policy = make_speculation("auto", model, draft, "adaptive", 3)
    Engine(model, [EOS], 2, proposer=proposer, policy=policy)
    share = policy.costs.share
    assert share["ngram"] == share["lookahead"] == 0.0
    assert share["draft"] == 0.25  # 1 of 4 layers (its parameters are a smaller share)
    assert 0 < share["layerskip"] < 1


class EveryOtherRow(RoundRobin):
    """n-gram steps in which only the even rows draft; records what each row's record was."""

    def __init__(self, k: int) -> None:
        super().__init__(k)
        self.records: list[list[tuple[float, float]]] = []

    def choose(self, batch_size: int, view=None) -> Choice:
        self.records.append([row.get("ngram", (0.0, 0.0)) for row in view.rows])
        return Choice("ngram", self.k, tuple(self.k if b % 2 == 0 else 0 for b in range(batch_size)))


def test_rows_of_one_step_draft_what_the_policy_gives_each_and_verify_packed():
    """Per request: the rows the policy leaves out draft nothing and verify as plain rows in the
    same packed forward; each row's own record of its drafts reaches the policy; greedy output
    is plain decoding's."""
    model = tiny_llama(seed=4, layers=2)
    prompts = repetitive_prompts(4, seed=7)
    requests = [GenerationRequest(str(i), p, 12) for i, p in enumerate(prompts)]
    reference = run(model, requests, 4)
    sizes = []
    model.model.embed_tokens.register_forward_hook(lambda module, args, out: sizes.append(tuple(args[0].shape)))
    policy = EveryOtherRow(3)
    results = run(model, requests, 4, NgramProposer(), policy)
    assert [r.completion_ids for r in results] == [r.completion_ids for r in reference]
    together = min(len(r.steps) for r in results)  # until a row ends, a request keeps its place in the batch
    for i, r in enumerate(results):
        steps = r.steps[:together]
        if i % 2:
            assert all(s.num_draft == 0 and s.drafted == 0 for s in steps)
        else:
            assert any(s.drafted for s in steps) and all(s.num_draft == 3 for s in steps)
    assert max(rows[1][1] for rows in policy.records[:together]) == 0  # trials of row 1: it never drafted
    assert max(rows[0][1] for rows in policy.records[:together]) > 0
    assert (1, 4 + 1 + 1 + 1) in sizes  # row 0's draft and three last tokens, packed


class Waves(RoundRobin):
    """Plain steps; records each step's view of the last wave."""

    def __init__(self) -> None:
        super().__init__(0)
        self.waves: list[list[int] | None] = []

    def choose(self, batch_size: int, view=None) -> Choice:
        self.waves.append(view.wave)
        return Choice("ar", 0)


def test_the_policy_sees_each_rows_tokens_left_once_no_request_waits():
    """The last wave (draft_policy._wave_rate): while requests wait the view has no wave; once
    the last is admitted, each row's tokens left, counting down a step at a time."""
    model = tiny_llama(seed=4, layers=2)
    requests = [GenerationRequest(str(i), p, 4 + i) for i, p in enumerate(random_prompts(5, seed=3))]
    policy = Waves()
    run(model, requests, 2, NgramProposer(), policy)
    first = next(i for i, w in enumerate(policy.waves) if w is not None)
    assert first > 0 and all(w is None for w in policy.waves[:first])
    assert all(w is not None and len(w) <= 2 and min(w) >= 1 for w in policy.waves[first:])
    pairs = list(zip(policy.waves[first:], policy.waves[first + 1 :]))
    assert any(len(a) == len(b) for a, b in pairs)
    for before, after in pairs:
        if len(before) == len(after):  # the same rows (nobody is admitted now): one token each, a plain step
            assert after == [n - 1 for n in before]


def test_the_lookup_index_finds_what_a_scan_of_the_row_finds():
    """The per-slot index grows with the row and answers as a scan backwards through it would:
    the most recent earlier occurrence of the longest tail; a new request in the slot is
    indexed afresh."""

    def scan(seq, k):
        for n in range(min(3, len(seq) - 1), 0, -1):
            for start in range(len(seq) - n - 1, -1, -1):
                if seq[start : start + n] == seq[-n:]:
                    return seq[start + n : start + n + k]
        return None

    rng = np.random.default_rng(5)
    proposer = NgramProposer(table_size=0)
    proposer.start(num_slots=1, capacity=0)
    compared = 0
    for _ in range(50):
        proposer.admit(0, None)
        seq = rng.integers(0, 5, size=int(rng.integers(1, 5))).tolist()
        for _ in range(30):
            expected = scan(seq, 4)
            assert proposer.shadow(0, seq, 4) == (expected or [])
            compared += expected is not None
            seq = seq + rng.integers(0, 5, size=int(rng.integers(1, 4))).tolist()
    assert compared > 1000


class PlainWithShadows(RoundRobin):
    """Every step plain, the n-gram arm scored by shadow drafts of k tokens."""

    def __init__(self, k: int) -> None:
        super().__init__(k)
        self.shadow_k = k
        self.scored = (0, 0)

    def expect_shadows(self, arms) -> None:
        assert arms == ["ngram"]

    def choose(self, batch_size: int, view=None) -> Choice:
        return Choice("ar", 0)

    def observe(self, measurement) -> None:
        accepted, rejections = measurement.shadows.get("ngram", (0, 0))
        self.scored = (self.scored[0] + accepted, self.scored[1] + rejections)


def shadow_scores(prompt: list[int], output: list[int], k: int, limit: int) -> tuple[int, int]:
    """(accepted, first rejections) of one row's shadow drafts, scored from its whole output as
    the engine scores them step by step: one pending at a time, the first made after the first
    decode step, each new one made in the step that resolves the last."""
    lookup = NgramProposer(table_size=0)
    lookup.start(num_slots=1, capacity=0)
    accepted = rejections = 0
    at = 2
    while at < len(output):
        draft = lookup.shadow(0, prompt + output[:at], min(k, limit - at))
        if not draft:
            at += 1
            continue
        emitted = output[at : at + len(draft)]
        matched = next((i for i, (d, t) in enumerate(zip(draft, emitted)) if d != t), len(emitted))
        accepted += matched
        rejections += matched < len(emitted)
        at += matched + 1 if matched < len(emitted) else len(draft)
    return accepted, rejections


def test_shadow_drafts_score_each_row_from_what_it_emits_without_drafting(monkeypatch):
    """With every step plain, the n-gram arm's shadow drafts are scored against the tokens each
    row emits: the totals the policy receives are what scoring each row's output alone gives,
    copying rows accept most of theirs, and nothing is drafted."""
    from specbatch.decoding import engine as engine_module

    monkeypatch.setattr(engine_module, "SHADOW_BUDGET", 1e9)  # score every row at every step
    model = tiny_llama(seed=4, layers=2)
    prompts = repetitive_prompts(6, seed=7) + random_prompts(4, seed=30)
    requests = [GenerationRequest(str(i), p, 16) for i, p in enumerate(prompts)]
    reference = run(model, requests, 4)
    policy = PlainWithShadows(3)
    results = run(model, requests, 4, NgramProposer(table_size=0), policy)
    assert [r.completion_ids for r in results] == [r.completion_ids for r in reference]
    assert all(s.drafted == 0 and s.method == "ar" for r in results for s in r.steps)
    scores = [shadow_scores(q.prompt_ids, r.completion_ids, 3, q.max_new_tokens) for q, r in zip(requests, results)]
    assert policy.scored == tuple(map(sum, zip(*scores)))
    assert policy.scored[0] > policy.scored[1] > 0
    # Each score is also in the row's record of the step it stood for: what the steps table shows.
    for result, (accepted, _) in zip(results, scores):
        shadowed = [s for s in result.steps if s.shadow_method is not None]
        assert all(s.shadow_method == "ngram" and 0 <= s.shadow_accepted <= s.shadow_drafted <= 3 for s in shadowed)
        assert sum(s.shadow_accepted for s in shadowed) == accepted
        assert result.steps[0].shadow_method is None  # the first step's draft was asked before any shadow


class Recorded(FixedPolicy):
    """A fixed K, keeping every step's measurement."""

    def __init__(self, k: int) -> None:
        super().__init__(k)
        self.measured: list[StepMeasurement] = []

    def observe(self, measurement: StepMeasurement) -> None:
        self.measured.append(measurement)
        super().observe(measurement)


def test_a_lookahead_step_with_no_candidate_is_the_arms_step_not_a_plain_one():
    """Lookahead's window rides in every step it runs, candidates or not: a step whose pool had
    none yet still ran the wide forward and is lookahead's to pay for. Reported as a plain step,
    it made plain decoding look 40% dearer to the policy (7.4 ms against 5.1 ms at batch 1 on
    the CPU bench) and lookahead cheaper. A lookup that finds nothing leaves a plain step."""
    model = tiny_llama(seed=4)
    requests = [GenerationRequest(str(i), p, 8) for i, p in enumerate(random_prompts(3, seed=11))]
    policy = Recorded(3)
    results = run(model, requests, 3, LookaheadProposer(), policy)
    empty = [m for m in policy.measured if not any(m.num_draft)]
    assert empty, "random prompts: the pool has no candidate at first"
    assert all(m.arm == "lookahead" and m.target_tokens > len(m.num_draft) for m in empty)
    first = [r.steps[0] for r in results]
    assert all(s.method == "lookahead" and s.drafted == 0 for s in first)

    policy = Recorded(3)
    run(model, requests, 3, NgramProposer(), policy)
    no_match = [m for m in policy.measured if not any(m.num_draft)]
    assert no_match and all(m.arm == "ar" and m.target_tokens == len(m.num_draft) for m in no_match)


class Probes(RoundRobin):
    """Lookahead every step, as probes or not."""

    def __init__(self, k: int, probe: bool) -> None:
        super().__init__(k)
        self.probe = probe

    def choose(self, batch_size: int, view=None) -> Choice:
        return Choice("lookahead", self.k, probe=self.probe)


def test_a_probe_with_nothing_to_verify_is_a_plain_step():
    """A probe is run to learn what an arm yields: a lookahead step whose pool holds no
    candidate after the row's last token (its window alone) would verify nothing, so a probe
    there runs plain; the same choice, not a probe, rides the window. Greedy output is plain
    decoding's either way."""
    model = tiny_llama(seed=4, layers=2)
    repeating = [5, 6, 7, 8] * 4  # its last token is followed by 5, 6, 7 earlier: a candidate in the pool
    requests = [GenerationRequest(str(i), p, 10) for i, p in enumerate(random_prompts(2, seed=5) + [repeating])]
    reference = run(model, requests, 1)
    for probe in (False, True):
        results = run(model, requests, 1, LookaheadProposer(ngram=4), Probes(3, probe))
        assert [r.completion_ids for r in results] == [r.completion_ids for r in reference]
        steps = [s for r in results for s in r.steps]
        window_alone = [s for s in steps if s.method == "lookahead" and s.drafted == 0]  # no candidate after the last token
        if probe:
            assert not window_alone
            assert any(s.method == "lookahead" and s.drafted for s in steps)  # where the pool had one, it drafted
        else:
            assert window_alone
