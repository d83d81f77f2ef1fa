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
