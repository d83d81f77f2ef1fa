"""Draft-free n-gram proposals through the same verifier: greedy output equals plain decoding;
sampled output keeps the target's distribution (one-hot q), with a negative control."""

from __future__ import annotations

import pytest
import torch

from specbatch.decoding import Engine, GenerationRequest, SamplingParams
from specbatch.decoding import verifier as verifier_module
from specbatch.decoding.draft_policy import FixedPolicy, GoodputPolicy
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


@pytest.mark.parametrize("batch_size", [1, 5, 16])
def test_greedy_ngram_equals_plain_decoding(batch_size):
    model = tiny_llama(seed=4)
    prompts = repetitive_prompts(16, seed=batch_size) + random_prompts(8, seed=30)
    requests = [GenerationRequest(str(i), p, 3 + i % 11) for i, p in enumerate(prompts)]
    reference = run(model, requests, batch_size)
    for policy in (FixedPolicy(4), GoodputPolicy(max_k=5)):
        results = run(model, requests, batch_size, NgramProposer(), policy)
        assert [r.completion_ids for r in results] == [r.completion_ids for r in reference]
        assert [r.finish_reason for r in results] == [r.finish_reason for r in reference]
    fixed = run(model, requests, batch_size, NgramProposer(), FixedPolicy(4))
    assert sum(r.drafted_tokens for r in fixed) > 0


def test_ngram_samples_follow_the_target_distribution(monkeypatch):
    target = tiny_llama(seed=21)
    with torch.no_grad():
        target.lm_head.weight.mul_(40.0)
    # A prompt whose tail recurs, so lookup proposes tokens that p often, but not always, picks.
    prompt, settings = [5, 17, 42, 8, 5, 17], dict(temperature=1.0, top_k=5)
    marginals = exact_marginals(target, prompt, settings, depth=3)

    def samples():
        requests = [GenerationRequest(str(i), prompt, 4, SamplingParams(seed=i, **settings)) for i in range(4000)]
        results = run(target, requests, 256, NgramProposer(), FixedPolicy(2))
        assert sum(r.accepted_tokens for r in results) > 200  # the drafts matter to the outcome
        return [r.completion_ids for r in results]

    good = samples()
    for position in (1, 2):
        assert chi_square_p([s[position] for s in good], marginals[position]) > 1e-3
    monkeypatch.setattr(verifier_module, "residual_distribution", lambda p, q: p)  # d not removed on rejection
    bad = samples()
    assert min(chi_square_p([s[position] for s in bad], marginals[position]) for position in (1, 2)) < 1e-3
