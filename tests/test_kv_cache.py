"""The slot KV cache: ragged writes at each row's own positions, masks, commit and rollback."""

from __future__ import annotations

import torch
from transformers import LlamaConfig

from specbatch.decoding.kv_cache import SlotKVCache


def make_cache(slots=3, capacity=16) -> SlotKVCache:
    config = LlamaConfig(hidden_size=8, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=1)
    return SlotKVCache(config, slots, capacity, "cpu", torch.float32)


def test_ragged_rows_write_at_their_own_positions():
    cache = make_cache()
    cache.commit(0, 5)
    cache.commit(2, 2)
    position_ids, visible, _ = cache.bind([2, 0], q_len=3)
    assert position_ids.tolist() == [[2, 3, 4], [5, 6, 7]]
    key = torch.arange(2 * 3, dtype=torch.float32).view(2, 1, 3, 1).expand(2, 1, 3, 4)
    k, _ = cache.update(key, key.clone(), 0)
    assert k.shape == (2, 1, 8, 4)  # kv_len = longest row (5) + 3
    assert cache.keys[0][2, 0, 2:5, 0].tolist() == [0.0, 1.0, 2.0]
    assert cache.keys[0][0, 0, 5:8, 0].tolist() == [3.0, 4.0, 5.0]
    # Row of slot 2: query 0 sees keys 0..2 only; row of slot 0: query 2 sees keys 0..7.
    assert visible[0, 0, 0].tolist() == [True] * 3 + [False] * 5
    assert visible[1, 0, 2].tolist() == [True] * 8


def test_rollback_is_not_committing():
    cache = make_cache(slots=1)
    cache.commit(0, 4)
    cache.bind([0], q_len=3)  # e.g. a verify step with two draft tokens
    cache.update(torch.ones(1, 1, 3, 4), torch.ones(1, 1, 3, 4), 0)
    cache.commit(0, 1)  # only the first one is kept
    position_ids, visible, _ = cache.bind([0], q_len=1)
    assert position_ids.tolist() == [[5]]
    assert visible[0, 0, 0].tolist() == [True] * 6  # positions 0..5: the stale 6th is hidden


def test_a_bucketed_cache_attends_over_a_rounded_length_with_the_same_visibility(monkeypatch):
    from specbatch.decoding import kv_cache

    monkeypatch.setitem(kv_cache.KV_BUCKET, "cpu", 4)
    cache = make_cache(capacity=10)
    assert cache.capacity == 12 and cache.keys[0].shape[2] == 12  # rounded up to the bucket
    cache.commit(0, 5)
    cache.commit(2, 2)
    position_ids, visible, key_positions = cache.bind([2, 0], q_len=3)
    assert position_ids.tolist() == [[2, 3, 4], [5, 6, 7]]
    assert key_positions.shape == (2, 8) and visible.shape == (2, 1, 3, 8)  # 8: already a multiple of 4
    cache.commit(0, 1)
    _, visible, key_positions = cache.bind([2, 0], q_len=3)
    assert key_positions.shape == (2, 12)  # 9 keys needed, 12 attended
    assert visible[1, 0, 2].tolist() == [True] * 9 + [False] * 3  # keys past the row's end never visible
    assert visible[0, 0, 0].tolist() == [True] * 3 + [False] * 9


def test_greedy_output_is_the_same_with_a_bucketed_cache_for_every_method(monkeypatch):
    """What a GPU runs (KV_BUCKET["cuda"]), checked on the CPU: plain decoding, prefix sharing
    and every speculative arm (tree drafts, a draft model's own cache) give the tokens of the
    exact-length cache."""
    from specbatch.decoding import Engine, GenerationRequest, kv_cache
    from specbatch.decoding.methods import make_speculation

    from .conftest import EOS, random_prompts, tiny_llama
    from .test_draft_free import RoundRobin, repetitive_prompts

    model, draft = tiny_llama(seed=4, layers=4), tiny_llama(seed=9, layers=1)
    prompts = repetitive_prompts(12, seed=3) + random_prompts(6, seed=31)
    shared = [7] * 6
    prompts += [shared + p for p in random_prompts(6, seed=32)]  # a prefix group
    requests = [
        GenerationRequest(str(i), p, 3 + i % 13, prefix_len=6 if i >= 18 else 0) for i, p in enumerate(prompts)
    ]

    def outputs(method):
        if method == "ar":
            engine = Engine(model, [EOS], 5)
        else:
            proposer, _ = make_speculation(method, model, draft, "fixed", 3)
            engine = Engine(model, [EOS], 5, proposer=proposer, policy=RoundRobin(3))
        return [r.completion_ids for r in engine.generate(requests)]

    exact = {m: outputs(m) for m in ("ar", "auto")}
    assert exact["auto"] == exact["ar"]
    monkeypatch.setitem(kv_cache.KV_BUCKET, "cpu", 8)
    assert {m: outputs(m) for m in ("ar", "auto")} == exact
