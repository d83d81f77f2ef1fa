"""Prefix sharing: the plan (prefix tree), cascade attention, and the engine computing and storing
each shared prefix once, with outputs token-identical to computing every prompt in full."""

from __future__ import annotations

import random

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from specbatch.decoding import Engine, GenerationRequest, SamplingParams
from specbatch.decoding import cascade_attention as cascade_module
from specbatch.decoding.cascade_attention import CascadeContext, PrefixGroup, cascade_attention
from specbatch.decoding.methods import make_speculation
from specbatch.decoding.prefix_tree import GROUP_OVERHEAD_TOKENS, shared_prefix_lengths

from .conftest import EOS, random_prompts, tiny_llama

# ---------------------------------------------------------------- the plan


def plan_cost(prompts, shared) -> int:
    """Prompt tokens prefilled under a plan, each group's overhead included."""
    groups = {tuple(p[:n]) for p, n in zip(prompts, shared) if n}
    return sum(len(p) - n for p, n in zip(prompts, shared)) + sum(len(g) + GROUP_OVERHEAD_TOKENS for g in groups)


def best_cost(prompts) -> int:
    """Reference: the same optimisation, by plain recursion over the prefix tree."""

    def lcp(group):
        k = 0
        while all(len(p) > k for p in group) and len({p[k] for p in group}) == 1:
            k += 1
        return k

    def best(group) -> int:
        if len(group) == 1:
            return len(group[0])
        d = lcp(group)
        p = min(d, min(map(len, group)) - 1)
        share = p + sum(map(len, group)) - len(group) * p + GROUP_OVERHEAD_TOKENS if p > 0 else 1 << 60
        children: dict = {}
        for q in group:
            children.setdefault(q[d] if len(q) > d else None, []).append(q)
        if None in children:  # prompts that end at this node are leaves of their own
            ends = children.pop(None)
            split = sum(map(len, ends)) + sum(best(c) for c in children.values())
        else:
            split = sum(best(c) for c in children.values())
        return min(share, split)

    return best(prompts)


def test_plan_shares_a_system_prompt_across_every_row():
    system = list(range(100, 300))
    prompts = [system + [1, 2, 3], system + [4, 5], system + [6]]
    assert shared_prefix_lengths(prompts) == [200, 200, 200]


def test_plan_prefers_deeper_groups_when_they_save_more():
    rng = random.Random(0)
    system = list(range(100, 300))
    prompts = []
    for a in range(5):  # 5 few-shot blocks of 100 tokens, each under 6 queries of 20
        shots = [1000 + a] + [rng.randrange(5000) for _ in range(99)]
        prompts += [system + shots + [rng.randrange(5000) for _ in range(20)] for _ in range(6)]
    rng.shuffle(prompts)
    assert set(shared_prefix_lengths(prompts)) == {300}


def test_plan_samples_of_one_prompt_share_all_but_its_last_token():
    prompt = list(range(20))
    assert shared_prefix_lengths([prompt] * 4) == [19] * 4
    assert shared_prefix_lengths([[1, 2], [3, 4], [1, 2, 3]]) == [0, 0, 0]  # nothing worth a group
    assert shared_prefix_lengths([prompt]) == [0] and shared_prefix_lengths([]) == []


def test_plan_is_optimal_against_a_reference():
    rng = random.Random(3)
    for _ in range(200):
        stems = [[rng.randrange(4) for _ in range(rng.randrange(0, 30))] for _ in range(rng.randrange(1, 4))]
        prompts = [
            rng.choice(stems)[: rng.randrange(0, 31)] + [rng.randrange(4) for _ in range(rng.randrange(1, 12))]
            for _ in range(rng.randrange(1, 12))
        ]
        shared = shared_prefix_lengths(prompts)
        for p, n in zip(prompts, shared):
            assert 0 <= n < len(p)
            members = [q for q, m in zip(prompts, shared) if m == n and q[:n] == p[:n]]
            assert n == 0 or len(members) >= 2
        assert plan_cost(prompts, shared) == best_cost(prompts), prompts


# ---------------------------------------------------------------- cascade attention


class _Layer:
    layer_idx = 0
    num_key_value_groups = 2  # query heads per kv head
    is_causal = True


@pytest.mark.parametrize("fused", [True, False])
def test_cascade_attention_equals_attention_over_prefix_plus_suffix(fused, monkeypatch):
    """Two groups and an unshared row, GQA, a ragged suffix mask, 3 queries per row: the merged
    result equals plain SDPA over each row's prefix and suffix keys concatenated (with PyTorch's
    fused CPU kernel for the parts, and with the plain tensor ops used elsewhere)."""
    if not fused:
        monkeypatch.setattr(cascade_module, "_FUSED_CPU", None)
    g = torch.Generator().manual_seed(0)
    batch, heads, kv_heads, q_len, dim, suffix = 4, 4, 2, 3, 8, 6
    query = torch.randn(batch, heads, q_len, dim, generator=g)
    keys, values = torch.randn(batch, kv_heads, suffix, dim, generator=g), torch.randn(batch, kv_heads, suffix, dim)
    lengths = [6, 4, 5, 3]  # each row's own keys; query i sees the first lengths - q_len + i + 1
    visible = torch.zeros(batch, 1, q_len, suffix, dtype=torch.bool)
    for b, n in enumerate(lengths):
        for i in range(q_len):
            visible[b, 0, i, : n - q_len + i + 1] = True
    mask = torch.zeros(visible.shape).masked_fill_(~visible, torch.finfo(torch.float32).min)
    prefixes = [(torch.randn(kv_heads, 7, dim, generator=g), torch.randn(kv_heads, 7, dim, generator=g)) for _ in "ab"]
    rows_of = {0: [0, 2], 1: [1]}  # row 3 reads no prefix
    context = CascadeContext(
        [PrefixGroup(torch.tensor(r), [prefixes[i][0]], [prefixes[i][1]]) for i, r in rows_of.items()],
        positions=torch.zeros(batch, q_len, dtype=torch.long),  # read for sliding windows only
        windows=(None,),
    )
    out, _ = cascade_attention(_Layer(), query, keys, values, mask, scaling=dim**-0.5, specbatch_prefix=context)
    for b in range(batch):
        group = next((i for i, r in rows_of.items() if b in r), None)
        k, v, m = keys[b : b + 1], values[b : b + 1], mask[b : b + 1]
        if group is not None:
            k_p, v_p = prefixes[group]
            k, v = torch.cat([k_p[None], k], 2), torch.cat([v_p[None], v], 2)
            m = torch.cat([torch.zeros(1, 1, q_len, 7), m], -1)
        ref, _ = sdpa_attention_forward(_Layer(), query[b : b + 1], k, v, m, scaling=dim**-0.5)
        torch.testing.assert_close(out[b : b + 1], ref, atol=1e-5, rtol=1e-5)
        if group is not None:  # the prefix really contributes: without it the answer differs
            alone, _ = sdpa_attention_forward(
                _Layer(), query[b : b + 1], keys[b : b + 1], values[b : b + 1], mask[b : b + 1]
            )
            assert not torch.allclose(out[b : b + 1], alone, atol=1e-3)


# ---------------------------------------------------------------- the engine


def shared_workload(prefix_len: int = 120, members: int = 12, suffix: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(0, EOS, (prefix_len,), generator=g).tolist()
    return [prefix + torch.randint(0, EOS, (suffix,), generator=g).tolist() for _ in range(members)]


def generate(model, prompts, share: bool, batch_size: int, method: str = "ar", draft=None, max_new: int = 16, **sp):
    shared = shared_prefix_lengths(prompts) if share else [0] * len(prompts)
    proposer, policy = make_speculation(method, model, draft, "fixed", 3, 0.0)
    engine = Engine(model, [EOS], max_batch_size=batch_size, proposer=proposer, policy=policy)
    requests = [
        GenerationRequest(f"r{i}", p, max_new, SamplingParams(seed=i, **sp), prefix_len=n)
        for i, (p, n) in enumerate(zip(prompts, shared))
    ]
    return engine.generate(requests), engine.stats


@pytest.mark.parametrize("method", ["ar", "draft", "ngram", "lookahead", "layerskip", "auto"])
@pytest.mark.parametrize("batch_size", [1, 4, 16])
def test_greedy_outputs_identical_with_and_without_sharing(tiny_model, method, batch_size):
    """Two prefix groups, n copies of one prompt, and unrelated rows mixed, admitted as slots free."""
    prompts = shared_workload(40, 6, 5) + random_prompts(4, seed=5) + shared_workload(25, 4, 3, seed=1)
    prompts += [prompts[0][:30] + [7, 8]] * 3
    draft = tiny_llama(seed=1, layers=1) if method == "draft" else None
    plain, plain_stats = generate(tiny_model, prompts, False, batch_size, method, draft)
    shared, stats = generate(tiny_model, prompts, True, batch_size, method, draft)
    assert [r.completion_ids for r in shared] == [r.completion_ids for r in plain]
    assert [r.finish_reason for r in shared] == [r.finish_reason for r in plain]
    assert stats.prompt_tokens == plain_stats.prompt_tokens == plain_stats.prefill_tokens
    # Each group's prefix was computed once: what no row recomputed is what the rows read cached.
    assert stats.prefill_tokens == stats.prompt_tokens - sum(r.cached_prefix_tokens for r in shared)
    assert stats.prefill_tokens < stats.prompt_tokens
    assert tiny_model.config._attn_implementation == "sdpa"  # cascade attention was on only for our forwards


def test_ninety_percent_shared_prompt_tokens():
    """The issue's bar: prefill compute drops by >= 80% and the KV cache at its peak is at most
    1.1 x (prefix + members x own tokens) instead of members x (prefix + own tokens)."""
    tiny_model = tiny_llama(max_positions=256)
    prefix, members, suffix, max_new = 180, 16, 20, 8
    prompts = shared_workload(prefix, members, suffix)
    plain, plain_stats = generate(tiny_model, prompts, False, members, max_new=max_new)
    shared, stats = generate(tiny_model, prompts, True, members, max_new=max_new)
    assert [r.completion_ids for r in shared] == [r.completion_ids for r in plain]
    assert 1 - stats.prefill_tokens / plain_stats.prefill_tokens >= 0.8
    c = tiny_model.config
    per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads) * 4
    own = suffix + max_new
    assert stats.peak_kv_bytes <= 1.1 * (prefix + members * own) * per_token
    assert plain_stats.peak_kv_bytes >= members * (prefix + own) * per_token
    assert [r.cached_prefix_tokens for r in shared] == [0] + [prefix] * (members - 1)


def test_samples_of_one_prompt_share_it_and_keep_their_own_seeds(tiny_model):
    prompt = random_prompts(1, 30, 31, seed=9)[0]
    sampled, stats = generate(tiny_model, [prompt] * 4, True, 4, temperature=1.0)
    plain, _ = generate(tiny_model, [prompt] * 4, False, 4, temperature=1.0)
    assert stats.prefill_tokens == len(prompt) - 1 + 4  # the shared part once, each sample's last token
    assert len({tuple(r.completion_ids) for r in sampled}) > 1  # the samples differ
    # The same seeds give the same samples with or without sharing (the same distributions).
    assert [r.completion_ids for r in sampled] == [r.completion_ids for r in plain]


def test_a_prefix_only_one_request_carries_is_not_shared(tiny_model):
    prompts = shared_workload(30, 2, 4)
    engine = Engine(tiny_model, [EOS], max_batch_size=2)
    requests = [GenerationRequest("a", prompts[0], 4, prefix_len=30), GenerationRequest("b", prompts[1][:20], 4)]
    results = engine.generate(requests)
    assert [r.cached_prefix_tokens for r in results] == [0, 0]
    assert engine.stats.prefill_tokens == engine.stats.prompt_tokens
    with pytest.raises(ValueError, match="prefix_len must be in"):
        GenerationRequest("c", [1, 2, 3], 4, prefix_len=3)
