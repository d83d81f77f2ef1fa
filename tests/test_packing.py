"""Packed forwards (packing.py): rows of different lengths run as one sequence of their real
tokens, with the same logits and the same cache as the padded forward."""

from __future__ import annotations

import copy

import torch

from specbatch.decoding.forward import forward_size, forward_slots, last_logits, packs, pad_right
from specbatch.decoding.kv_cache import SlotKVCache

from .conftest import random_prompts


def _cache_with_history(model, prompts):
    cache = SlotKVCache(model.config, len(prompts), 64, "cpu", torch.float32)
    last_logits(model, cache, list(range(len(prompts))), prompts)
    return cache


def _embedded_shapes(model):
    shapes = []
    model.model.embed_tokens.register_forward_hook(lambda module, args, out: shapes.append(tuple(args[0].shape)))
    return shapes


def test_a_packed_forward_runs_only_the_real_tokens_and_matches_the_padded_one(tiny_model):
    model = copy.deepcopy(tiny_model)
    shapes = _embedded_shapes(model)
    history = random_prompts(4, seed=3)
    chunks = [[5, 6, 7, 8], [9], [10, 11], [12]]  # a draft for some rows, the last token alone for others
    ids, lengths = pad_right(chunks, "cpu")
    slots = [0, 1, 2, 3]
    out = {}
    for packed in (False, True):
        cache = _cache_with_history(model, history)
        shapes.clear()
        with torch.inference_mode():
            out[packed] = (forward_slots(model, cache, slots, ids, None, lengths.tolist(), packed=packed), cache)
        assert shapes == [(1, 8) if packed else (4, 4)]
    (padded, padded_cache), (packed, packed_cache) = out[False], out[True]
    for b, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(packed[b, :n], padded[b, :n], rtol=1e-5, atol=1e-5)
        start = padded_cache.lengths[b]
        for layer in range(len(padded_cache.keys)):
            torch.testing.assert_close(
                packed_cache.keys[layer][b, :, : start + n], padded_cache.keys[layer][b, :, : start + n], rtol=1e-5, atol=1e-5
            )
            torch.testing.assert_close(
                packed_cache.values[layer][b, :, : start + n], padded_cache.values[layer][b, :, : start + n], rtol=1e-5, atol=1e-5
            )


def test_prompts_of_different_lengths_prefill_packed_with_the_same_last_logits(tiny_model):
    prompts = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [13, 14], [15, 16, 17], [18]]
    assert packs(tiny_model, [len(p) for p in prompts], 12)  # 18 real tokens of 48
    with torch.inference_mode():
        packed = last_logits(tiny_model, SlotKVCache(tiny_model.config, 4, 32, "cpu", torch.float32), [0, 1, 2, 3], prompts)
        alone = torch.cat(
            [last_logits(tiny_model, SlotKVCache(tiny_model.config, 1, 32, "cpu", torch.float32), [0], [p]) for p in prompts]
        )
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)


def test_only_a_ragged_enough_forward_is_packed(tiny_model):
    assert forward_size(tiny_model, [5, 1, 1, 1], 5) == 8  # 8 real of 20
    assert forward_size(tiny_model, [5, 5, 5, 4], 5) == 20  # 19 of 20: padding costs less than packing
    assert not packs(tiny_model, [3, 1], 3, tree=(torch.zeros(2, 3), torch.ones(2, 3, 3)))  # a tree is one mask
