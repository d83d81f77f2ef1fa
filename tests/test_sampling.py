"""Sampling: truncation semantics on crafted logits, and statistical tests that the engine's
samples follow the model's distribution, with a negative control the test must reject."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from specbatch.decoding import Engine, GenerationRequest, SamplingParams
from specbatch.decoding.sampling import RowSampling, probs_from_logits, sample

from .conftest import EOS, tiny_llama


def rows(*params: SamplingParams) -> RowSampling:
    return RowSampling(list(params))


def test_top_k_top_p_and_temperature_on_crafted_logits():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.1]] * 4))
    p = probs_from_logits(
        logits,
        rows(
            SamplingParams(temperature=1.0),
            SamplingParams(temperature=1.0, top_k=2),
            SamplingParams(temperature=1.0, top_p=0.7),  # 0.5 + 0.25 reaches 0.7: two tokens stay
            SamplingParams(temperature=0.0),
        ),
    )
    torch.testing.assert_close(p[0], torch.tensor([0.5, 0.25, 0.15, 0.1]))
    torch.testing.assert_close(p[1], torch.tensor([2 / 3, 1 / 3, 0.0, 0.0]))
    torch.testing.assert_close(p[2], torch.tensor([2 / 3, 1 / 3, 0.0, 0.0]))
    torch.testing.assert_close(p[3], torch.tensor([1.0, 0.0, 0.0, 0.0]))
    hot = probs_from_logits(logits[:1], rows(SamplingParams(temperature=0.5)))
    expected = torch.tensor([0.5, 0.25, 0.15, 0.1]) ** 2
    torch.testing.assert_close(hot[0], expected / expected.sum())


def test_top_p_keeps_the_first_token_even_when_it_alone_exceeds_top_p():
    logits = torch.log(torch.tensor([[0.9, 0.05, 0.05]]))
    p = probs_from_logits(logits, rows(SamplingParams(temperature=1.0, top_p=0.1)))
    torch.testing.assert_close(p[0], torch.tensor([1.0, 0.0, 0.0]))


def test_sample_never_returns_a_zero_probability_token():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0]]).repeat(1000, 1)
    u = torch.rand(1000, generator=torch.Generator().manual_seed(0))
    u[:3] = torch.tensor([0.0, 0.5, 0.9999999])
    tokens = sample(probs, u)
    assert set(tokens.tolist()) == {1, 3}


def chi_square_p(samples: list[int], probs: np.ndarray) -> float:
    support = probs > 0
    assert all(support[s] for s in samples), "a token outside the distribution's support was sampled"
    counts = np.bincount(samples, minlength=len(probs))[support]
    expected = probs[support] / probs[support].sum() * len(samples)
    return chisquare(counts, expected).pvalue


@pytest.fixture(scope="module")
def sharp_model():
    model = tiny_llama(seed=21)
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)  # a random init is nearly uniform; give it shape
    return model


def test_engine_samples_follow_the_model_distribution(sharp_model):
    """First tokens of 3000 seeded requests against softmax(logits / T) under top-k, and a
    negative control: the same samples against the distribution at another temperature must fail."""
    prompt = [5, 17, 42, 8]
    settings = dict(temperature=0.8, top_k=12)
    requests = [GenerationRequest(str(i), prompt, 1, SamplingParams(seed=i, **settings)) for i in range(3000)]
    samples = [
        r.completion_ids[0] if r.completion_ids else EOS for r in Engine(sharp_model, [], 256).generate(requests)
    ]
    with torch.no_grad():
        logits = sharp_model(torch.tensor([prompt])).logits[:, -1]
    target = probs_from_logits(logits, rows(SamplingParams(**settings)))[0].double().numpy()
    assert chi_square_p(samples, target) > 1e-3
    wrong = probs_from_logits(logits, rows(SamplingParams(temperature=1.1, top_k=12)))[0].double().numpy()
    assert chi_square_p(samples, wrong) < 1e-3, "negative control: a wrong distribution must be rejected"
