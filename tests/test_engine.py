"""The engine against transformers `generate`: exact greedy equality in float32 on the CPU,
seeded sampling reproducibility, stop conditions and continuous batching."""

from __future__ import annotations

import pytest
import torch

from specbatch.decoding import Engine, GenerationRequest, SamplingParams

from .conftest import EOS, random_prompts, tiny_llama


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=EOS,
        pad_token_id=EOS,
    )
    tokens = out[0, len(prompt) :].tolist()
    return tokens[: tokens.index(EOS)] if EOS in tokens else tokens


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_batched_greedy_equals_hf_generate(tiny_model, batch_size):
    prompts = random_prompts(11)  # ragged lengths 3..19; 11 requests > batch: slots get reused
    expected = [hf_greedy(tiny_model, p, 12) for p in prompts]
    engine = Engine(tiny_model, [EOS], max_batch_size=batch_size)
    results = engine.generate([GenerationRequest(str(i), p, 12) for i, p in enumerate(prompts)])
    assert [r.request_id for r in results] == [str(i) for i in range(len(prompts))]
    for r, exp in zip(results, expected):
        assert r.completion_ids == exp, f"request {r.request_id} differs from transformers generate"


def test_eos_stops_a_row_and_is_not_emitted():
    model = tiny_llama(seed=3)
    prompts = random_prompts(6, seed=5)
    # Make EOS the greedy choice right after a chosen token: the row must stop there.
    first = Engine(model, [EOS], max_batch_size=6).generate(
        [GenerationRequest(str(i), p, 6) for i, p in enumerate(prompts)]
    )
    stop_token = first[0].completion_ids[2]
    results = Engine(model, [EOS, stop_token], max_batch_size=6).generate(
        [GenerationRequest(str(i), p, 6) for i, p in enumerate(prompts)]
    )
    assert results[0].completion_ids == first[0].completion_ids[:2]
    assert results[0].finish_reason == "stop"
    assert results[0].target_steps == 3
    for r, f in zip(results[1:], first[1:]):
        cut = next((i for i, t in enumerate(f.completion_ids) if t == stop_token), None)
        assert r.completion_ids == (f.completion_ids if cut is None else f.completion_ids[:cut])


def test_token_limit_and_context_end(tiny_model):
    engine = Engine(tiny_model, [], max_batch_size=4)
    results = engine.generate([GenerationRequest("a", [1, 2, 3], 5), GenerationRequest("b", list(range(120)), 50)])
    assert len(results[0].completion_ids) == 5 and results[0].finish_reason == "length"
    # max_position_embeddings is 128: 120 prompt tokens leave room for 8 new ones.
    assert len(results[1].completion_ids) == 8 and results[1].finish_reason == "length"
    with pytest.raises(ValueError, match="does not fit the model's context"):
        engine.generate([GenerationRequest("c", list(range(128)), 5)])


def test_seeded_sampling_is_reproducible_across_batches(tiny_model):
    prompts = random_prompts(9, seed=7)

    def run(batch_size: int, seed_offset: int = 0):
        sampling = [SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=i + seed_offset) for i in range(9)]
        reqs = [GenerationRequest(str(i), p, 10, s) for i, (p, s) in enumerate(zip(prompts, sampling))]
        return [r.completion_ids for r in Engine(tiny_model, [EOS], max_batch_size=batch_size).generate(reqs)]

    assert run(2) == run(2)
    assert run(2) == run(9)  # a request's tokens depend on its seed, not on its batch neighbours
    assert run(2) != run(2, seed_offset=100)


def test_greedy_and_sampled_rows_mix(tiny_model):
    prompts = random_prompts(4, seed=11)
    greedy = Engine(tiny_model, [EOS], 4).generate([GenerationRequest(str(i), p, 8) for i, p in enumerate(prompts)])
    mixed = Engine(tiny_model, [EOS], 4).generate(
        [
            GenerationRequest(str(i), p, 8, SamplingParams(temperature=0.0 if i % 2 == 0 else 1.5, seed=i))
            for i, p in enumerate(prompts)
        ]
    )
    assert mixed[0].completion_ids == greedy[0].completion_ids
    assert mixed[2].completion_ids == greedy[2].completion_ids


def test_continuous_batching_refills_freed_slots(tiny_model):
    # Two slots, one long request first and eight short ones. Static batching would pair the
    # long one with one short one and make the other seven wait for it; refilling lets them all
    # pass through the second slot while the long one decodes.
    prompts = random_prompts(9, seed=13)
    limits = [40] + [2] * 8
    finished: list[str] = []
    engine = Engine(tiny_model, [], max_batch_size=2)
    results = engine.generate(
        [GenerationRequest(str(i), p, n) for i, (p, n) in enumerate(zip(prompts, limits))],
        on_result=lambda r: finished.append(r.request_id),
    )
    assert [len(r.completion_ids) for r in results] == limits
    assert finished[-1] == "0" and sorted(finished[:-1]) == [str(i) for i in range(1, 9)]
    # 1 shared prefill + 7 prefills of refills + 39 decode steps, shared by both slots.
    assert engine.stats.target_forwards == 1 + 7 + 39
