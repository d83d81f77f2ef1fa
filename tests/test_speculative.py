"""Speculative decoding with a draft model: lossless for greedy (token-identical to plain
decoding) and for sampling (the target's distribution, checked analytically and statistically,
each with a negative control that must fail)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from specbatch.decoding import Engine, GenerationRequest, SamplingParams
from specbatch.decoding import verifier as verifier_module
from specbatch.decoding.cost_model import CostModel, LinearCost, Recent, StepMeasurement
from specbatch.decoding.draft_policy import BatchView, Choice, FixedPolicy, GoodputPolicy
from specbatch.decoding.proposer import DraftModelProposer
from specbatch.decoding.sampling import RowSampling, probs_from_logits
from specbatch.decoding.verifier import acceptance_probability, residual_distribution

from .conftest import EOS, random_prompts, tiny_llama
from .test_sampling import chi_square_p

# ---------------------------------------------------------------- the acceptance rule, exactly


def output_distribution(p: torch.Tensor, q: torch.Tensor, residual=residual_distribution) -> torch.Tensor:
    """The distribution of the token emitted at one draft position: the draft token d ~ q is
    kept with probability a(d) = min(1, p(d)/q(d)); otherwise a token comes from the residual."""
    accept = acceptance_probability(p, q)  # [vocab], a(d) for every candidate d
    kept = q * accept  # P(d drafted and kept)
    return kept + (1 - kept.sum()) * residual(p, q)


def pairs() -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(20):
        p = torch.rand(12, generator=g, dtype=torch.float64) ** 3
        q = torch.rand(12, generator=g, dtype=torch.float64) ** 3
        out.append((f"random-{i}", p / p.sum(), q / q.sum()))
    p = torch.tensor([0.5, 0.3, 0.2, 0, 0, 0], dtype=torch.float64)
    out += [
        ("p equals q", p, p.clone()),
        ("disjoint supports", p, torch.tensor([0, 0, 0, 0.2, 0.3, 0.5], dtype=torch.float64)),
        ("zeros in q", p, torch.tensor([0.0, 0.6, 0.2, 0.2, 0, 0], dtype=torch.float64)),
        ("one-hot q (deterministic draft)", p, torch.tensor([0, 1.0, 0, 0, 0, 0], dtype=torch.float64)),
        ("one-hot q outside p", p, torch.tensor([0, 0, 0, 0, 1.0, 0], dtype=torch.float64)),
        ("one-hot p (greedy)", torch.tensor([0, 0, 1.0, 0, 0, 0], dtype=torch.float64), p),
        ("q flatter than p", p, torch.full((6,), 1 / 6, dtype=torch.float64)),
    ]
    return out


@pytest.mark.parametrize("name,p,q", pairs(), ids=[n for n, _, _ in pairs()])
def test_acceptance_plus_residual_reproduces_p_exactly(name, p, q):
    torch.testing.assert_close(output_distribution(p, q), p, atol=1e-12, rtol=0)


def test_negative_control_a_wrong_residual_is_caught():
    """Sampling the residual from p itself (a classic bug) changes the output distribution;
    the analytic check above must see it on the pairs where it matters."""
    caught = sum(
        not torch.allclose(output_distribution(p, q, residual=lambda p, q: p), p, atol=1e-6) for _, p, q in pairs()
    )
    assert caught >= 20  # every random pair, and the adversarial ones with overlap


# ---------------------------------------------------------------- greedy: token-identical to ar


@pytest.fixture(scope="module")
def target():
    return tiny_llama(seed=0)


def noisy_copy(model, scale: float, seed: int):
    """A draft that agrees with the target often but not always."""
    draft = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in draft.parameters():
            param.add_(torch.randn(param.shape, generator=g) * scale * param.std())
    return draft


def run(model, requests, batch_size, draft=None, policy=None, eos=(EOS,), confidence=0.0):
    proposer = DraftModelProposer(draft, confidence_threshold=confidence) if draft is not None else None
    engine = Engine(model, list(eos), batch_size, proposer=proposer, policy=policy)
    return engine.generate(requests)


@pytest.mark.parametrize("batch_size", [1, 4, 16, 64])
@pytest.mark.parametrize("draft_kind", ["related", "unrelated"])
def test_greedy_speculative_equals_plain_decoding(target, batch_size, draft_kind):
    draft = noisy_copy(target, 0.3, seed=1) if draft_kind == "related" else tiny_llama(seed=9, layers=1, hidden=32)
    prompts = random_prompts(40, lo=2, hi=30, seed=batch_size)
    limits = [1 + (i * 7) % 13 for i in range(40)]  # 1..13: limits land inside drafts
    # Pick a stop token that the target emits mid-output, so EOS also lands inside drafts.
    plain = run(target, [GenerationRequest(str(i), p, 13) for i, p in enumerate(prompts)], 8, eos=())
    stop = max(
        set(t for r in plain for t in r.completion_ids[1:]),
        key=lambda t: sum(r.completion_ids[1:].count(t) for r in plain),
    )
    requests = [GenerationRequest(str(i), p, n) for i, (p, n) in enumerate(zip(prompts, limits))]
    reference = run(target, requests, batch_size, eos=(EOS, stop))
    assert any(r.finish_reason == "stop" for r in reference) and any(r.finish_reason == "length" for r in reference)
    for policy, confidence in ((FixedPolicy(3), 0.0), (FixedPolicy(4), 0.5), (GoodputPolicy(max_k=5), 0.3)):
        results = run(target, requests, batch_size, draft, policy, eos=(EOS, stop), confidence=confidence)
        for r, ref in zip(results, reference):
            assert (r.completion_ids, r.finish_reason) == (ref.completion_ids, ref.finish_reason), (
                f"request {r.request_id} differs from plain decoding under {type(policy).__name__}"
            )
        if draft_kind == "related" and isinstance(policy, FixedPolicy):
            # The comparison above covered accepted drafts too (the goodput policy may rightly
            # stop drafting here: this draft is as large as the target).
            assert sum(r.accepted_tokens for r in results) > 0


def test_step_records_add_up(target):
    draft = noisy_copy(target, 0.3, seed=2)
    requests = [GenerationRequest(str(i), p, 12) for i, p in enumerate(random_prompts(10, seed=4))]
    for r in run(target, requests, 4, draft, FixedPolicy(3), eos=()):
        assert r.target_steps == len(r.steps) + 1  # + the prefill, which emits the first token
        assert sum(s.emitted for s in r.steps) + 1 == r.completion_tokens
        assert sum(s.drafted for s in r.steps) == r.drafted_tokens
        assert sum(s.accepted for s in r.steps) == r.accepted_tokens
        for s in r.steps:
            assert s.accepted <= s.drafted <= s.num_draft == 3
            assert s.emitted <= s.accepted + 1
        assert r.draft_seconds > 0 and r.target_seconds > 0


def test_draft_equal_to_target_accepts_everything(target):
    requests = [GenerationRequest(str(i), p, 11) for i, p in enumerate(random_prompts(6, seed=8))]
    results = run(target, requests, 3, copy.deepcopy(target), FixedPolicy(4), eos=())
    assert all(r.accepted_tokens == r.drafted_tokens > 0 for r in results)
    assert all(r.target_steps == 3 for r in results)  # prefill 1 token, then 5 + 5


def test_a_draft_cache_is_allocated_at_its_first_proposal_with_the_rows_prefixes(target):
    """auto's draft arms that never draft in a run allocate no KV cache; one that starts late
    allocates it then, with each admitted row's shared prefix, and the output stays exact."""
    draft = noisy_copy(target, 0.3, seed=1)
    proposer = DraftModelProposer(draft)
    allocated, shared = [], []  # before each step: the cache allocated; every slot reading the prefix

    class LateDraft(FixedPolicy):  # plain for three steps, then K = 2
        steps = 0

        def choose(self, batch_size, view=None):
            self.steps += 1
            allocated.append(proposer.cache is not None)
            if proposer.cache is not None:
                shared.append(all(p is not None for p in proposer.cache.prefixes))
            return Choice(self.arm, 0 if self.steps <= 3 else 2)

    prefix = random_prompts(1, lo=12, hi=13, seed=5)[0]
    prompts = [prefix + p for p in random_prompts(6, lo=2, hi=8, seed=6)]
    requests = [GenerationRequest(str(i), p, 10, SamplingParams(), 0, len(prefix)) for i, p in enumerate(prompts)]
    plain = run(target, requests, 3, eos=())
    engine = Engine(target, [], 3, proposer=proposer, policy=LateDraft(2))
    drafted = engine.generate(requests)
    assert [r.completion_ids for r in drafted] == [r.completion_ids for r in plain]
    assert allocated[:4] == [False] * 4 and allocated[4] and shared[0]
    assert any(r.cached_prefix_tokens for r in drafted)  # the rows did read a shared prefix
    assert sum(r.drafted_tokens for r in drafted) > 0
    idle = DraftModelProposer(draft)
    Engine(target, [], 3, proposer=idle, policy=FixedPolicy(0)).generate(requests)
    assert idle.cache is None


# ---------------------------------------------------------------- sampling: the target's distribution


@pytest.fixture(scope="module")
def sharp_pair():
    target = tiny_llama(seed=21)
    with torch.no_grad():
        target.lm_head.weight.mul_(40.0)
    return target, noisy_copy(target, 0.5, seed=3)


def exact_marginals(target, prompt: list[int], settings: dict, depth: int) -> list[np.ndarray]:
    """The exact distributions of the tokens at positions 1..depth under the target alone,
    by enumerating every prefix (top-k keeps the tree small)."""
    rows = RowSampling([SamplingParams(**settings)])
    frontier = [([], 1.0)]
    marginals = []
    for _ in range(depth):
        vocab = target.config.vocab_size
        marginal = np.zeros(vocab)
        nxt = []
        for prefix, weight in frontier:
            with torch.no_grad():
                logits = target(torch.tensor([prompt + prefix])).logits[:, -1]
            p = probs_from_logits(logits, rows)[0].double().numpy()
            marginal += weight * p
            nxt += [(prefix + [t], weight * p[t]) for t in np.flatnonzero(p > 0)]
        marginals.append(marginal)
        frontier = nxt
    return marginals


def speculative_samples(target, draft, prompt, settings, n: int, confidence: float = 0.0) -> list[list[int]]:
    requests = [GenerationRequest(str(i), prompt, 4, SamplingParams(seed=i, **settings)) for i in range(n)]
    return [r.completion_ids for r in run(target, requests, 256, draft, FixedPolicy(2), eos=(), confidence=confidence)]


def test_speculative_samples_follow_the_target_distribution(sharp_pair, monkeypatch):
    """4000 seeded requests of 4 tokens with K = 2: tokens 2 and 3 come out of one verify step
    (draft accepted, or residual), and their marginals must match the target's. Negative
    control: the same engine with the residual taken from p instead of norm(max(0, p - q))
    must be rejected."""
    target, draft = sharp_pair
    prompt, settings = [5, 17, 42, 8], dict(temperature=1.0, top_k=5)
    marginals = exact_marginals(target, prompt, settings, depth=3)
    samples = speculative_samples(target, draft, prompt, settings, 4000)
    for position in (1, 2):
        assert chi_square_p([s[position] for s in samples], marginals[position]) > 1e-3
    # With the confidence stop, rows draft different numbers of tokens in one step.
    cut = speculative_samples(target, draft, prompt, settings, 4000, confidence=0.6)
    for position in (1, 2):
        assert chi_square_p([s[position] for s in cut], marginals[position]) > 1e-3

    monkeypatch.setattr(verifier_module, "residual_distribution", lambda p, q: p)
    wrong = speculative_samples(target, draft, prompt, settings, 4000)
    worst = min(chi_square_p([s[position] for s in wrong], marginals[position]) for position in (1, 2))
    assert worst < 1e-3, "negative control: a wrong residual must be detected"


# ---------------------------------------------------------------- the adaptive policy


def feed(policy: GoodputPolicy, batch: int, acceptance: float, target_cost, draft_cost, steps: int = 60) -> None:
    """Synthetic steps: each row accepts a geometric run of drafts with the given rate."""
    rng = np.random.default_rng(0)
    policy.bind(["draft"])
    for _ in range(steps):
        k = policy.choose(batch).k
        ks = [k] * batch
        accepted = [int(min(k, rng.geometric(1 - acceptance) - 1)) if k else 0 for _ in range(batch)]
        policy.observe(
            StepMeasurement(
                arm="draft" if k else "ar",
                k=k,
                num_draft=ks,
                num_accepted=accepted,
                target_tokens=batch * (k + 1),
                target_seconds=target_cost(batch * (k + 1)),
                propose_seconds=k * draft_cost(batch),
                draft_forwards=[(batch, batch, draft_cost(batch))] * k,
            )
        )


def overhead_bound(tokens):  # small batches on a GPU: a forward costs about the same for 1 or 64 tokens
    return 0.010 + 0.00001 * tokens


def compute_bound(tokens):  # a large batch: cost grows with every token verified
    return 0.0005 * tokens


def test_policy_drafts_long_when_acceptance_is_high_and_verification_cheap():
    policy = GoodputPolicy(max_k=6)
    feed(policy, 4, 0.9, overhead_bound, lambda rows: 0.001)
    assert policy.choose(4).k >= 5


def test_policy_falls_to_plain_steps_when_acceptance_is_low():
    policy = GoodputPolicy(max_k=6, explore_budget=0.05)
    feed(policy, 4, 0.05, overhead_bound, lambda rows: 0.003)
    assert policy.acceptance < 0.25  # down from the prior 0.6, on the few probes the budget allows
    assert policy.choose(4).plain


def test_policy_shrinks_k_when_the_batch_is_large():
    policy = GoodputPolicy(max_k=6)
    feed(policy, 64, 0.6, compute_bound, lambda rows: 0.0001 * rows)
    large = policy.choose(64).k
    small = GoodputPolicy(max_k=6)
    feed(small, 2, 0.6, overhead_bound, lambda rows: 0.001)
    assert large < small.choose(2).k
    assert large == 0  # verifying 64 x (K + 1) tokens costs K + 1 plain steps


def test_policy_probes_again_after_plain_steps():
    policy = GoodputPolicy(max_k=6, probe_after=4, explore_budget=1.0)  # the waits alone
    feed(policy, 4, 0.05, overhead_bound, lambda rows: 0.003)
    choices = [policy.choose(4).k for _ in range(80)]  # each losing probe doubled the wait: 64 steps now
    assert 0 in choices and max(choices) > 0


def test_a_confidence_stop_that_ends_every_row_early_still_verifies(target, sharp_pair):
    """Threshold above 1: every row stops after its first draft token, fewer than the K asked.
    The draft handed to the verifier must be as wide as what was drafted, greedy and sampled."""
    draft = noisy_copy(target, 0.3, seed=2)
    proposer = DraftModelProposer(draft, confidence_threshold=1.01)
    proposer.start(num_slots=2, capacity=64)
    sampling = RowSampling([SamplingParams(), SamplingParams(temperature=1.0, seed=1)])
    proposed = proposer.propose([0, 1], [[1, 2, 3], [4, 5]], [4, 3], sampling)
    assert proposed.num_draft == [1, 1] and proposed.tokens.shape[1] == 1 and proposed.probs.shape[1] == 1

    requests = [GenerationRequest(str(i), p, 9) for i, p in enumerate(random_prompts(6, seed=12))]
    plain = run(target, requests, 3, eos=())
    stopped = run(target, requests, 3, draft, FixedPolicy(4), eos=(), confidence=1.01)
    assert [r.completion_ids for r in stopped] == [r.completion_ids for r in plain]
    sharp_target, sharp_draft = sharp_pair
    sampled = [GenerationRequest(str(i), [5, 17, 42, 8], 6, SamplingParams(temperature=1.0, seed=i)) for i in range(8)]
    assert all(len(r.completion_ids) == 6 for r in run(sharp_target, sampled, 8, sharp_draft, FixedPolicy(4), (), 1.01))


def test_the_engine_feeds_the_policy_what_each_step_cost(target, sharp_pair):
    """One StepMeasurement per decode step reaches the cost model: the target's forwards, the
    draft's steady forwards by rows, its catch-up (the draft's prefill of new rows), acceptance."""
    draft = noisy_copy(target, 0.3, seed=2)
    # priced as free and accepting well, so that it drafts (a copy of the target never would)
    # (a short job: an unbounded budget and payoff, or whether its one try fits and pays would
    # rest on this machine's timings: on a slow spell the probe waited for the second wave and
    # then did not pay for the 7 tokens left a row)
    policy = GoodputPolicy(
        max_k=3, explore_budget=float("inf"), probe_payoff=float("inf"),
        costs=CostModel(prior_acceptance=0.95, share={"draft": 0.0}),
    )  # fmt: skip
    seen = []
    observe = policy.observe
    policy.observe = lambda m: (seen.append(m), observe(m))
    requests = [GenerationRequest(str(i), p, 8) for i, p in enumerate(random_prompts(6, seed=5))]
    run(target, requests, 3, draft, policy, eos=())
    costs = policy.costs
    assert policy.arms == ["draft"] and costs.target.known
    assert costs.measured("draft") and costs.draft["draft"].known  # steady draft forwards, by rows
    assert not any(seen[0].num_draft)  # the prefill showed the target at a second size: plain, then predicted
    first = next(m for m in seen if any(m.num_draft)).draft_forwards  # fed every row's prompt to the draft
    assert any(tokens > 2 * rows for rows, tokens, _ in first)
    assert any(arm == "draft" and k > 0 for arm, _, k in costs.step) and ("ar", 3, 0) in costs.step


def test_catch_up_is_charged_after_sitting_out_not_for_the_opening_prefill():
    """An arm's first step feeds the draft every prompt (charged to no one: any use pays it
    once); a later forward over tokens the draft skipped is the arm's catch-up."""
    costs = CostModel()

    def step(draft_forwards):
        costs.observe(StepMeasurement("draft", 2, [2, 2], [1, 1], 6, 0.01, 0.004, draft_forwards, step_seconds=0.02))

    step([(2, 40, 0.005), (2, 2, 0.001)])  # the opening: both prompts, then a steady forward
    assert costs.catch_up("draft") == 0.0
    step([(2, 2, 0.001)])
    assert costs.catch_up("draft") == 0.0
    step([(2, 20, 0.003), (2, 2, 0.001)])  # back after sitting out: 10 skipped tokens a row
    assert 0.0 < costs.catch_up("draft") <= 0.003


def test_recent_costs_are_means_without_stalls():
    """A stall (another process on the machine) is left out; otherwise the mean, not a low
    quantile, which would price whatever varies most (a draft step) below its average."""
    stalled = Recent(0.010)
    for value in (0.010, 0.010, 0.011, 0.009, 0.080):
        stalled.add(value)
    assert stalled.value == pytest.approx(0.010)
    varied = Recent(0.010)
    for value in (0.030, 0.020, 0.012, 0.028):
        varied.add(value)
    assert varied.value == pytest.approx(0.02)


def test_plain_is_priced_at_the_median_of_its_recent_steps():
    """While an arm drafts, plain steps are few (the refreshes) and their window spans a slow
    spell or two: at batch 1 on sampled text, plain steps of 5.3-5.4 ms beside spell values of
    8-12 ms priced plain at 7.4 ms, and a draft step of 9.5 ms for 1.9 tokens (5 ms a token)
    looked to gain over 15% where it gained 5%. Plain's cost hardly varies but for the machine,
    and a spell only adds time: its lower median. A drafting step is still priced at its mean."""
    costs = CostModel()
    for seconds in (0.010, 0.016, 0.010, 0.016, 0.010, 0.016, 0.010, 0.010):  # three in a spell, none a stall
        costs.observe(StepMeasurement("ar", 0, [0], [0], 1, seconds, step_seconds=seconds))
    for _ in range(10):  # 2 tokens in 19.5 ms: 2.5% more than plain's 1 in 10 ms
        costs.observe(StepMeasurement("draft", 2, [2], [1], 3, 0.0125, 0.007, [(1, 1, 0.0035)] * 2, 0.0195))
    assert costs.seconds("ar", 1, 0) == pytest.approx(0.010)
    assert costs.goodput("draft", 1, 2) < (1 + GoodputPolicy().switch_margin) * costs.goodput("ar", 1, 0)
    # the negative control: at the mean of the same steps drafting clears the margin
    assert 2 / 0.0195 > (1 + GoodputPolicy().switch_margin) / costs.step["ar", 1, 0].value


def test_what_the_policy_weighs_at_once_is_what_it_weighed_one_at_a_time():
    """The fitted line is kept between adds, and goodputs prices every K of an arm with what they
    share looked up once: both give the very numbers the plain formulas give, at every state a
    run passes through (the line from one size and from several; arms measured, unmeasured and
    shadow-scored; a hypothetical acceptance)."""
    rng = np.random.default_rng(0)
    line = LinearCost()

    def fitted(size: float) -> float:  # the least squares line, worked out afresh
        if size in line.by_size:
            return line.by_size[size].value
        mean_x, mean_y = line.sx / line.n, line.sy / line.n
        var = line.sxx / line.n - mean_x * mean_x
        if var <= 1e-9 * max(mean_x * mean_x, 1.0):
            return mean_y * size / max(mean_x, 1e-9)
        slope = max((line.sxy / line.n - mean_x * mean_y) / var, 0.0)
        return max(mean_y - slope * mean_x, 0.0) + slope * size

    for size in [8, 8, 8, *rng.integers(1, 300, 40)]:
        line.add(int(size), 0.004 + 0.00003 * int(size) * rng.uniform(0.8, 1.2))
        for probe in (3, 17, 301.5, 1000):
            assert line.predict(probe) == fitted(probe)

    costs = CostModel()
    costs.chunk.update({("window", k): 4 * k for k in range(1, 7)})
    costs.share.update({"draft": 0.3})
    costs.prefilled(400, 0.05)
    ks = [1, 2, 3, 4, 5, 6]
    for step in range(60):
        batch = int(rng.integers(1, 9))
        arm, k = [("ar", 0), ("draft", int(rng.integers(1, 7))), ("window", 2), ("lookup", 3)][step % 4]
        accepted = [int(rng.integers(0, k + 1)) for _ in range(batch)]
        forwards = [(batch, batch, 0.001)] * k if arm == "draft" else []
        shadows = {"lookup": (2, 1)} if arm != "lookup" else {}
        seconds = 0.01 + 0.002 * k * rng.uniform(0.5, 1.5)
        costs.observe(StepMeasurement(arm, k, [k] * batch, accepted, batch * (k + 1), 0.8 * seconds, 0.1 * seconds, forwards, seconds, shadows))
        if step % 10 == 5:
            costs.prefilled(200, 0.02)  # a freed slot refilled: admission is priced per token emitted
        for a in ("ar", "draft", "window", "lookup", "never-run"):
            for acceptance in (None, 0.9):
                assert costs.goodputs(a, batch, ks, acceptance) == [costs.goodput(a, batch, k, acceptance) for k in ks]


def test_prefill_of_admitted_rows_is_a_cost_of_every_token():
    """The prefills after the first decode step fill what earlier steps freed: charged per
    emitted token, they shrink a draft step's predicted gain over a plain step (rows finish
    sooner, more prefill). The job's first prefill is no one's cost; every prefill shows what the
    target costs at its size."""

    def gain(admission_seconds: float) -> tuple[float, CostModel]:
        costs = CostModel(calibrated=False)  # the admission term alone
        costs.prefilled(400, 0.05)  # the first admission: every slot
        for _ in range(8):
            costs.observe(StepMeasurement("ar", 0, [0] * 4, [0] * 4, 4, 0.008, step_seconds=0.010))
            costs.prefilled(40, admission_seconds)
            costs.observe(StepMeasurement("draft", 3, [3] * 4, [3] * 4, 16, 0.012, 0.008, [(4, 4, 0.002)] * 4, 0.024))
            costs.prefilled(40, admission_seconds)
        assert costs.admission == pytest.approx(16 * admission_seconds / (8 * 4 + 8 * 16), rel=0.1)
        return costs.goodput("draft", 4, 3) / costs.goodput("ar", 4, 0), costs

    free, costs = gain(0.0)
    assert free == pytest.approx(16 / 0.024 / (4 / 0.010)) and costs.admission == 0.0
    assert 400 in costs.target.by_size and costs.target.by_size[400].value == 0.05
    assert 1.0 < gain(0.012)[0] < free - 0.2


def spell_steps(policy: GoodputPolicy, steps: int = 200) -> list[str]:
    """A batch of 4 where drafting gains less than plain steps do, at any speed, on a machine
    that was three times slower for the first (plain) step. Returns each step's arm."""
    policy.bind(["draft"], share=lambda arm: 0.0)
    chosen = []
    for step in range(steps):
        slow = 3.0 if step == 0 else 1.0
        choice = policy.choose(4)
        k = choice.k
        target = slow * (0.008 + 0.0005 * 4 * (k + 1))
        draft = [(4, 4, slow * 0.004)] * k
        seconds = target + sum(f[2] for f in draft)
        policy.observe(StepMeasurement(choice.arm, k, [k] * 4, [min(k, 1)] * 4, 4 * (k + 1), target, seconds - target, draft, seconds))
        chosen.append(choice.arm if k else "ar")
    return chosen


def test_a_drafting_arm_is_checked_against_plain_as_it_costs_now():
    """Plain steps last measured in a slow spell made a losing arm look good for the rest of the
    job. While it drafts, one step in refresh_after is plain; once the spell is over, plain
    measures faster than drafting and the policy stops drafting."""
    assert spell_steps(GoodputPolicy(max_k=2, refresh_after=8))[100:].count("ar") >= 95
    # the negative control: without the refresh, plain stays priced at the slow spell
    assert spell_steps(GoodputPolicy(max_k=2, refresh_after=10**9))[100:].count("draft") >= 50


def close_call_steps(policy: GoodputPolicy, steps: int = 60) -> list[str]:
    """A batch of 4 where a draft step yields 7 tokens in 19.5 ms (359 tok/s) and a plain step 4 in
    10 ms (400 tok/s), but the first plain step took 13.5 ms (296 tok/s): drafting looks about
    20% better and loses 10%. Returns each step's arm."""
    policy.bind(["draft"], share=lambda arm: 0.0)
    chosen = []
    for step in range(steps):
        choice = policy.choose(4)
        if choice.k:
            m = StepMeasurement("draft", 1, [1] * 4, [1, 1, 1, 0], 8, 0.0125, 0.007, [(4, 4, 0.007)], 0.0195)
        else:
            seconds = 0.010 * (1.35 if step == 0 else 1.0)
            m = StepMeasurement("ar", 0, [0] * 4, [0] * 4, 4, seconds, step_seconds=seconds)
        policy.observe(m)
        chosen.append(choice.arm if choice.k else "ar")
    return chosen


def test_a_close_call_is_checked_against_plain_sooner():
    """The smaller a drafting arm's predicted gain, the more often plain is re-measured at that
    batch size (a refresh costs about gain / (1 + gain) of a step: one in gain / refresh_cost
    steps costs under refresh_cost): a gain that was only a stale, slow plain step is found out
    sooner. The negative control re-measures only every refresh_after steps and drafts at a loss
    for longer."""
    policy = GoodputPolicy(max_k=1, costs=CostModel(calibrated=False))  # the refresh alone (calibration finds it out too)
    assert policy.refresh_interval(0.0) == 4 and policy.refresh_interval(0.1) == 10
    assert policy.refresh_interval(1.0) == policy.refresh_after
    sooner = close_call_steps(policy)
    later = close_call_steps(GoodputPolicy(max_k=1, refresh_cost=1e-9, costs=CostModel(calibrated=False)))
    assert sooner.count("draft") <= 22 and later.count("draft") >= policy.refresh_after
    assert sooner[40:] == later[40:] == ["ar"] * 20  # both find it out in the end


def first_tries(policy: GoodputPolicy, steps: int = 100) -> list[Choice]:
    """Three model-free arms (lookups: no draft forward) on a forward that costs about the same for
    any size, all predicted to win at the prior
    acceptance, none accepting anything: a try costs a plain step plus 4 ms per drafted token
    per row. Returns each step's choice."""
    policy.bind(["a", "b", "c"], chunk=lambda arm, k: k, share=lambda arm: 0.0)
    chosen = []
    for _ in range(steps):
        choice = policy.choose(4)
        k = choice.k
        target, lookup = overhead_bound(4 * (k + 1)), 0.004 * 4 * k
        policy.observe(StepMeasurement(choice.arm if k else "ar", k, [k] * 4, [0] * 4, 4 * (k + 1), target, lookup, step_seconds=target + lookup))
        chosen.append(choice)
    return chosen


def test_an_arm_never_run_is_tried_as_a_probe_within_the_budget():
    """An arm never run is predicted from the prior acceptance; its first try is exploration: a
    short draft (probe_k), and only within the exploration budget. Three losing arms: with no
    budget, the first is tried and the others never; with an unbounded one, each in turn."""
    tried = [[c for c in first_tries(GoodputPolicy(max_k=6, explore_budget=b)) if not c.plain] for b in (0.0, float("inf"))]
    assert [c.arm for c in tried[0]] == ["a"] and tried[0][0].k == 2
    assert {c.arm for c in tried[1]} == {"a", "b", "c"} and all(c.k == 2 for c in tried[1])


def test_probes_stay_within_the_exploration_budget():
    """Probes of an arm that keeps losing take what plain steps would not have: with no budget,
    one probe and no more; with a small one, a few, their losses within it (plus the one probe
    that crossed it); with an unbounded one, as many as the waits between probes allow."""
    budgets = (0.0, 0.005, float("inf"))
    policies = [GoodputPolicy(max_k=6, probe_after=1, explore_budget=budget) for budget in budgets]
    for policy in policies:
        feed(policy, 4, 0.05, overhead_bound, lambda rows: 0.003, steps=400)
    none, small, unbounded = (p.probes for p in policies)
    assert none == 1 and none < small < unbounded
    one_probe = 2 * 0.003 + overhead_bound(4 * 3)
    assert policies[1].explored <= 0.005 * policies[1].elapsed + one_probe


def test_a_probe_runs_only_where_what_is_left_of_the_budget_affords_it_whole():
    """Probes may lose explore_budget (1%) of the job's time: so far, and to come in plain steps as
    the view says. A probe must fit what is left of that whole, not only start within it. An arm
    never run, that would win at its prior acceptance, whose two-token try is predicted to cost
    3 ms more than a plain step of 10 ms: on a job of 20 plain steps (2 ms of budget) it is never
    tried; on one of 1,000 at the first weighing."""

    def first_try(remaining_steps: int) -> int | None:
        policy = GoodputPolicy(max_k=6, costs=CostModel(prior_acceptance=0.9))
        policy.bind(["window"], chunk=lambda arm, k: k + 2, share=lambda arm: 0.0)  # a window of 2 besides the draft
        policy.prefilled(800, 0.090)  # with plain steps of 8 tokens in 10 ms: 0.1 ms a token more
        for step in range(10):
            choice = policy.choose(8, BatchView(context_tokens=800, remaining_tokens=8 * (remaining_steps - step)))
            if choice.k:
                assert choice.probe and choice.k == 2
                return step
            policy.observe(StepMeasurement("ar", 0, [0] * 8, [0] * 8, 8, 0.010, step_seconds=0.010))
        return None

    assert first_try(20) is None
    assert first_try(1_000) == 1


def mispredicted_steps(policy: GoodputPolicy, steps: int = 100) -> list[int]:
    """A model-free arm at batch 4 whose every step costs 1.4x what the target's line (a plain
    step, a 400-token prefill) predicts, at any K: each K not yet run looks 20-35% better than
    plain, and each loses 3-15%. Returns each step's K."""
    policy.bind(["lookup"], chunk=lambda arm, k: k, share=lambda arm: 0.0)
    policy.prefilled(400, 0.050)
    chosen = []
    for _ in range(steps):
        k = policy.choose(4).k
        seconds = 1.4 * (0.0099 + 0.0004 * (k + 1)) if k else 0.010
        accepted = [min(k, 1), 0, 0, min(k, 1)]
        policy.observe(StepMeasurement("lookup" if k else "ar", k, [k] * 4, accepted, 4 * (k + 1), seconds, step_seconds=seconds))
        chosen.append(k)
    return chosen


def test_a_miss_every_k_shares_is_learned_once():
    """Calibration: a prediction from the step's parts is multiplied by the arm's recent bias
    (seconds taken over the parts' sum), so a miss the parts do not show, measured at one K, is
    expected at the others: a few Ks are tried, no more. Without it (the negative control) each K
    is tried, and lost, in turn."""
    calibrated = [k for k in mispredicted_steps(GoodputPolicy(max_k=6)) if k]
    uncalibrated = [k for k in mispredicted_steps(GoodputPolicy(max_k=6, costs=CostModel(calibrated=False))) if k]
    assert len(set(calibrated)) <= 3 and len(calibrated) <= 4 and len(set(uncalibrated)) == 6
    costs = CostModel()
    costs.prefilled(400, 0.050)
    costs.observe(StepMeasurement("ar", 0, [0] * 4, [0] * 4, 4, 0.010, step_seconds=0.010))
    took = 1.4 * costs.parts("lookup", 4, 2)
    costs.observe(StepMeasurement("lookup", 2, [2] * 4, [0] * 4, 12, took, step_seconds=took))
    assert costs.bias("lookup") == pytest.approx((1.4 + 2) / 3)  # drawn toward 1 by a prior of two steps
    parts = costs.parts("lookup", 4, 5)
    assert costs.seconds("lookup", 4, 5) == pytest.approx(costs.bias("lookup") * parts + costs.admission * 4 * costs.expected_tokens("lookup", 5))
    assert costs.seconds("lookup", 4, 2) == pytest.approx(took + costs.admission * 4 * costs.expected_tokens("lookup", 2))  # measured: as measured
    assert costs.bias("ar") == 1.0  # the first plain step had nothing to check it against


def test_a_plain_step_is_calibrated_only_where_its_prediction_is_used():
    """seconds() prices a plain step at a batch size where one ran by what it took, and by the
    parts' sum times plain's bias only at a size where none ran: a plain step moves the bias at
    a size seen for the first time, not at every step after (the host work of every plain step)."""
    costs = CostModel()
    costs.prefilled(400, 0.050)
    costs.observe(StepMeasurement("ar", 0, [0] * 4, [0] * 4, 4, 0.010, step_seconds=0.010))
    costs.observe(StepMeasurement("ar", 0, [0] * 3, [0] * 3, 3, 0.009, step_seconds=0.018))  # size 3: twice its parts
    moved = costs.bias("ar")
    assert moved > 1.0
    costs.observe(StepMeasurement("ar", 0, [0] * 3, [0] * 3, 3, 0.009, step_seconds=0.036))  # size 3 again
    assert costs.bias("ar") == moved
    assert costs.seconds("ar", 3, 0) == pytest.approx(0.018 + costs.admission * 3)  # measured there: the median (the lower of 18 and 36 ms)
    costs.observe(StepMeasurement("ar", 0, [0] * 2, [0] * 2, 2, 0.008, step_seconds=0.016))  # size 2: first seen
    assert costs.bias("ar") != moved


def test_an_unlucky_draft_is_counted_in_acceptance_not_again_in_the_bias():
    """A step that cost what its parts predicted but had its drafts rejected lowers the arm's
    acceptance and leaves its bias at 1: counted in seconds per token, the miss was counted
    twice (once in acceptance, once in bias), and an n-gram arm's bias swung 0.89-1.60 at batch
    1 on the CPU, holding it off half the steps where fixed n-gram gained 1.5x."""
    costs = CostModel()
    costs.prefilled(400, 0.050)
    costs.observe(StepMeasurement("ar", 0, [0] * 4, [0] * 4, 4, 0.010, step_seconds=0.010))
    before = costs.acceptance("lookup")
    took = costs.parts("lookup", 4, 4)
    costs.observe(StepMeasurement("lookup", 4, [4] * 4, [0] * 4, 20, took, step_seconds=took))
    assert costs.acceptance("lookup") < before
    assert costs.bias("lookup") == pytest.approx(1.0)


def lockstep_steps(view: BatchView | None, steps: int = 60) -> list[int]:
    """A model-free arm at batch 8 that gains 30% over plain steps: 2 tokens a row in 15.4 ms,
    against 1 in 10 ms. Returns each step's K."""
    policy = GoodputPolicy(max_k=1)
    policy.bind(["lookup"], chunk=lambda arm, k: k, share=lambda arm: 0.0)
    policy.prefilled(800, 0.090)
    chosen = []
    for _ in range(steps):
        k = policy.choose(8, view).k
        seconds = 0.0154 if k else 0.010
        policy.observe(StepMeasurement("lookup" if k else "ar", k, [k] * 8, [k] * 8, 8 * (k + 1), seconds, step_seconds=seconds))
        chosen.append(k)
    return chosen


def test_rows_that_finish_together_stay_together_unless_drafting_pays_for_it():
    """Where the batch's rows will finish in one step and be refilled in one prefill, drafting
    would end them apart for the rest of the job (view.desync: 25% at 32-token rows): a 30% gain
    does not pay for that and the 15% margin; neither does a probe to find it. Once the rows are
    apart anyway (desync 0), or with no view, it drafts (with no view, its first try waits for
    the job so far to afford it: the exploration budget is a share of the time spent)."""
    together = lockstep_steps(BatchView(context_tokens=800, remaining_tokens=100_000, desync=0.25))
    assert not any(together)
    assert sum(lockstep_steps(BatchView(context_tokens=800, remaining_tokens=100_000, desync=0.0))) >= 50
    assert sum(lockstep_steps(None)) >= 40


def test_a_probe_that_feeds_a_draft_every_row_waits_for_a_job_long_enough_to_repay_it():
    """A draft model's first try feeds it every row's context (its share of a target forward
    over them). On a short job what the arm could save never repays that; on a long one it does."""

    def first_try(remaining_tokens: int) -> bool:
        policy = GoodputPolicy(max_k=4, costs=CostModel(prior_acceptance=0.8))
        policy.bind(["draft"], share=lambda arm: 0.4)
        policy.prefilled(32 * 100, 0.020)  # 32 rows of 100 tokens: the target's cost at their size
        view = BatchView(context_tokens=32 * 100, remaining_tokens=remaining_tokens)
        for _ in range(20):
            choice = policy.choose(32, view)
            if choice.k:
                return True
            policy.observe(StepMeasurement("ar", 0, [0] * 32, [0] * 32, 32, 0.010, step_seconds=0.010))
        return False

    assert not first_try(remaining_tokens=200)  # 63 ms of plain steps left, to save ~20% of: the draft's prefill is 8 ms
    assert first_try(remaining_tokens=200_000)


def test_a_probe_is_not_worth_its_step_near_the_end_of_the_job():
    """An arm without a draft model prefills nothing to try, but its step costs more than a
    plain one should it accept nothing (a wide lookahead window: 33 tokens a row at K = 2). With a step or
    two of the job left, what it could save never repays that; with the job ahead, it does."""

    def probed(remaining_tokens: int) -> bool:
        policy = GoodputPolicy(max_k=4, probe_after=1, costs=CostModel(prior_acceptance=0.8))
        policy.bind(["window"], chunk=lambda arm, k: 16 * k, share=lambda arm: 0.0)
        policy.prefilled(800, 0.090)
        view = BatchView(context_tokens=400, remaining_tokens=remaining_tokens)
        for _ in range(20):
            if policy.choose(2, view).k:
                return True
            policy.observe(StepMeasurement("ar", 0, [0] * 2, [0] * 2, 2, 0.010, step_seconds=0.010))
        return False

    assert not probed(remaining_tokens=4)  # two plain steps left (20 ms), a probe step costs ~6 ms more
    assert probed(remaining_tokens=2_000)


def test_where_plain_wins_drafting_is_weighed_again_only_every_few_steps():
    """Weighing every arm and K is host work on every step (0.1 ms, 2% of a plain step at batch 1
    on the CPU): where plain won, it stays plain recheck_after steps before weighing again, twice
    as many each time plain wins again (up to recheck_most), and recheck_after again once rows come."""

    def weighings(recheck_after: int, recheck_most: int = 16, prefill_every: int = 0) -> list[int]:
        policy = GoodputPolicy(max_k=6, recheck_after=recheck_after, recheck_most=recheck_most, explore_budget=0.0)
        feed(policy, 4, 0.05, overhead_bound, lambda rows: 0.003)
        calls = []
        best = policy.best
        policy.best = lambda *a, **kw: (calls.append(a), best(*a, **kw))[1]
        weighed = []
        for step in range(60):
            if step == 0 or prefill_every and step % prefill_every == 0:  # rows come
                policy.prefilled(4 * 20, 0.012)
            before = len(calls)
            assert policy.choose(4).plain
            policy.observe(StepMeasurement("ar", 0, [0] * 4, [0] * 4, 4, 0.010, step_seconds=0.010))
            if len(calls) > before:
                weighed.append(step)
        return weighed

    # (The wait set by feed's last plain step runs out at step 2.)
    assert weighings(1, recheck_most=1) == list(range(60))
    assert weighings(4, recheck_most=4) == list(range(2, 60, 4))
    assert weighings(4) == [2, 6, 14, 30, 46]
    # Rows come at steps 20 and 40: a wait set before them runs out, the next is 4 again.
    assert weighings(4, prefill_every=20) == [2, 6, 14, 30, 34, 42, 46, 54]


def plan_policy(per_token: float) -> GoodputPolicy:
    """A lookup arm that ran: a forward of 8 tokens takes 10 ms, each token more per_token."""
    policy = GoodputPolicy(max_k=6, arms=["lookup"])
    policy.costs.target.add(8, 0.010)
    policy.costs.target.add(40, 0.010 + 32 * per_token)
    policy.costs.observe(StepMeasurement("lookup", 2, [2] * 8, [0] * 8, 24, 0.015, step_seconds=0.015))
    policy.costs._bias.clear()  # its steps took what they were predicted to
    policy._steps = policy._last_run["lookup"] = policy._plain_at[8] = 100  # the arm and plain just ran
    return policy


def test_rows_of_one_batch_draft_what_their_own_acceptance_pays_for():
    """Per request: at batch 8, where the arm accepted nothing so far (drafting every row loses),
    a plan lets the row that copies (19 of 20 drafts accepted) draft long and the row whose
    drafts fail (2 of 20) and rows without a record of their own draft nothing, all in one
    packed forward; dearer tokens shorten the copying row's draft; a batch where no row copies
    stays plain; a window wider than the draft (one tree forward) plans nothing."""
    copying, failing, new = {"lookup": (19.0, 20.0)}, {"lookup": (2.0, 20.0)}, {}
    view = BatchView(10_000, 10_000, 0.0, [copying, failing] + [new] * 6)
    choice = plan_policy(0.0003).choose(8, view)
    assert choice.arm == "lookup" and choice.rows is not None
    assert choice.rows[0] >= 4 and choice.rows[1:] == (0,) * 7 and choice.k == choice.rows[0]
    dearer = plan_policy(0.0006).choose(8, view)
    assert dearer.rows is not None and 0 < dearer.rows[0] < choice.rows[0]
    assert plan_policy(0.0003).choose(8, BatchView(10_000, 10_000, 0.0, [failing, new] * 4)).plain
    tree = plan_policy(0.0003)
    tree.costs.chunk["lookup", 6] = 12
    assert tree.choose(8, view).plain


def test_in_the_last_wave_only_tokens_that_bring_the_end_nearer_count():
    """With no request waiting, the batch ends when its slowest row does: where the rows that
    would draft are not the ones furthest from their end, drafting ends them early and every
    step still runs the rest (independent prompts at batch 32 on the CPU: 0.93x of plain). So a
    plan that pays while requests wait is dropped in the last wave where the rows that write
    freely have as far to go, and kept where the copying rows have furthest to go or every row
    copies. Only where shadow drafts keep each row's record current does that record speak for
    the row; otherwise every row is taken at the arm's acceptance."""
    copying, failing = {"lookup": (19.0, 20.0)}, {"lookup": (2.0, 20.0)}
    rows = [copying] * 2 + [failing] * 6

    def choose(rows, wave, shadowed=True):
        policy = plan_policy(0.0003)
        if shadowed:
            policy.costs.expect_shadows("lookup")
        return policy.choose(8, BatchView(10_000, 10_000, 0.0, rows, wave))

    assert not choose(rows, None).plain  # requests wait: the copying rows free their slots for them
    assert choose(rows, [20] * 8).plain
    assert not choose(rows, [30, 30] + [5] * 6).plain
    assert not choose([copying] * 8, [20] * 8).plain
    assert choose(rows, [20] * 8, shadowed=False) == choose(rows, None, shadowed=False)


def test_a_plan_is_calibrated_against_its_own_parts():
    """A plan's step is not one of (arm, B, K)'s: its cost is predicted from its parts (a packed
    forward over each row's own tokens) and checked against them. A plan that took twice its
    parts moves the arm's bias as one step of two would, and the next plan is priced at that
    bias; the plan's own prediction, not a grid step's at its largest K (the packed forward is
    smaller), is what it was checked against."""
    copying, new = {"lookup": (19.0, 20.0)}, {}
    policy = plan_policy(0.0003)
    choice = policy.choose(8, BatchView(10_000, 10_000, 0.0, [copying] + [new] * 7))
    assert choice.rows is not None
    parts = policy._planned
    assert parts == pytest.approx(policy.costs.plan_parts("lookup", list(choice.rows)))
    assert parts < policy.costs.parts("lookup", 8, choice.k)
    tokens = sum(choice.rows) + 8
    policy.observe(StepMeasurement("lookup", choice.k, list(choice.rows), list(choice.rows), tokens, 2 * parts, step_seconds=2 * parts))
    assert policy.costs.bias("lookup") == pytest.approx((2 + 2) / 3)
    lengths = list(choice.rows)
    assert policy.costs.plan_seconds("lookup", lengths, 12.0) == pytest.approx(
        policy.costs.bias("lookup") * policy.costs.plan_parts("lookup", lengths) + policy.costs.catch_up("lookup") + policy.costs.admission * 12.0
    )
