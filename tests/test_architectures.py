"""Exact on the common transformers architectures: tiny random models built from their configs
(2 layers, hidden 64, larger-than-default initialisation so that attention patterns matter),
every method that applies, with and without prefix sharing, at batch sizes 1 and 4, each row's
greedy output compared with transformers' own `generate` on that prompt alone. The prompts cross
the sliding windows (16 tokens); negative controls check that the window, soft-capping and sinks
change the output here, so the comparisons can fail."""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers as T

from specbatch.decoding import Engine, GenerationRequest, packing
from specbatch.decoding import cascade_attention as cascade_module
from specbatch.decoding.architecture import (
    AttentionLayout,
    UnsupportedModel,
    additive_mask,
    attention_layout,
    find_decoder_layers,
)
from specbatch.decoding.cascade_attention import supports_cascade
from specbatch.decoding.methods import METHODS, applies, make_speculation

from .conftest import EOS, VOCAB
from .test_engine import hf_greedy

WINDOW, NEW_TOKENS = 16, 8
COMMON = dict(vocab_size=VOCAB, eos_token_id=EOS, pad_token_id=EOS, bos_token_id=EOS, initializer_range=0.1)
MIXED = ["sliding_attention", "full_attention"]


def decoder(cls, **kw):
    base = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    return cls(**COMMON, **(base | kw))


LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}

CONFIGS = {
    "llama": lambda: decoder(T.LlamaConfig),
    "llama-rope-llama3": lambda: decoder(T.LlamaConfig, rope_parameters=LLAMA3_ROPE),
    "qwen2": lambda: decoder(T.Qwen2Config),
    "qwen2-sliding": lambda: decoder(
        T.Qwen2Config, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1
    ),
    "qwen3": lambda: decoder(T.Qwen3Config, head_dim=16),
    "mistral-sliding": lambda: decoder(T.MistralConfig, sliding_window=WINDOW),
    "phi3": lambda: decoder(T.Phi3Config),
    "gemma": lambda: decoder(T.GemmaConfig, head_dim=16),
    "gemma2": lambda: decoder(
        T.Gemma2Config, head_dim=16, sliding_window=WINDOW, layer_types=MIXED, attn_logit_softcapping=1.0
    ),
    "gemma3": lambda: decoder(T.Gemma3TextConfig, head_dim=16, sliding_window=WINDOW, layer_types=MIXED),
    "olmo2": lambda: decoder(T.Olmo2Config),
    "starcoder2-sliding": lambda: decoder(T.Starcoder2Config, sliding_window=WINDOW),
    "cohere": lambda: decoder(T.CohereConfig),
    "cohere2": lambda: decoder(T.Cohere2Config, sliding_window=WINDOW, layer_types=MIXED),
    "granite": lambda: decoder(T.GraniteConfig),
    "phi": lambda: decoder(T.PhiConfig),
    "gpt-oss": lambda: decoder(
        T.GptOssConfig,
        head_dim=16,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=WINDOW,
        layer_types=MIXED,
    ),
    "gpt2": lambda: T.GPT2Config(**COMMON, n_embd=64, n_layer=2, n_head=4, n_positions=256),
    "gpt-neox": lambda: T.GPTNeoXConfig(
        **COMMON, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4
    ),
    "opt": lambda: T.OPTConfig(
        **COMMON, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=64
    ),
    "falcon": lambda: T.FalconConfig(
        **COMMON,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_kv_heads=2,
        new_decoder_architecture=True,
    ),
}
SLIDING = ["qwen2-sliding", "mistral-sliding", "gemma2", "gemma3", "starcoder2-sliding", "cohere2", "gpt-oss"]


def build(name: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    config = CONFIGS[name]()
    for key, value in overrides.items():
        setattr(config, key, value)
    # Soft-capping needs eager attention: transformers' SDPA path drops it (5.0 defaults Gemma 2 to SDPA).
    kwargs = {"attn_implementation": "eager"} if getattr(config, "attn_logit_softcapping", None) else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. gpt-oss's YaRN defaults on a tiny context
        return T.AutoModelForCausalLM.from_config(config, **kwargs).eval()


def make_prompts() -> tuple[list[list[int]], int]:
    """Four prompts that share a 40-token prefix (longer than the window) and four of their own,
    ragged (4 to 40 tokens); every row ends past the window. -> (prompts, shared prefix length)."""
    g = torch.Generator().manual_seed(0)
    shared = torch.randint(0, EOS, (40,), generator=g).tolist()
    grouped = [shared + torch.randint(0, EOS, (k,), generator=g).tolist() for k in (3, 6, 1, 9)]
    alone = [torch.randint(0, EOS, (k,), generator=g).tolist() for k in (4, 30, 11, 40)]
    return grouped + alone, len(shared)


@pytest.fixture(scope="module")
def arch(request):
    """(model, a one-layer draft of the same architecture, prompts, shared length, generate's outputs)."""
    model = build(request.param)
    draft = build(request.param, seed=1, num_hidden_layers=1)
    if getattr(draft.config, "layer_types", None):
        draft.config.layer_types = draft.config.layer_types[:1]
    prompts, shared = make_prompts()
    return model, draft, prompts, shared, [hf_greedy(model, p, NEW_TOKENS) for p in prompts]


def engine_outputs(model, draft, method, prompts, shared, share, batch_size):
    requests = [
        GenerationRequest(str(i), p, NEW_TOKENS, prefix_len=shared if share and i < 4 else 0)
        for i, p in enumerate(prompts)
    ]
    proposer, policy = make_speculation(method, model, draft if METHODS[method].uses_draft else None, "fixed", 3)
    engine = Engine(model, [EOS], batch_size, proposer=proposer, policy=policy)
    return [r.completion_ids for r in engine.generate(requests)], engine


@pytest.mark.parametrize("arch", list(CONFIGS), indirect=True)
@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_equals_generate(arch, method):
    model, draft, prompts, shared, expected = arch
    assert applies(METHODS[method], model, draft) is None, f"{method} refused a common layout"
    for share in (False, True):
        for batch_size in (1, 4):
            got, _ = engine_outputs(model, draft, method, prompts, shared, share, batch_size)
            for i, (g, e) in enumerate(zip(got, expected)):
                assert g == e, f"row {i}: {method}, prefix sharing {share}, batch {batch_size}"


def test_prefix_sharing_is_used_where_the_model_routes_attention(request):
    """Cascade attention replaces the model's attention function; Falcon calls SDPA itself, so
    its prompts are computed in full (exact, without the saving) rather than read wrongly."""
    prompts, shared = make_prompts()
    for name, expected in (("llama", True), ("gemma2", True), ("gpt-oss", True), ("gpt2", True), ("falcon", False)):
        model = build(name)
        assert supports_cascade(model) is expected, name
        _, engine = engine_outputs(model, None, "ar", prompts, shared, True, 4)
        computed = engine.stats.prefill_tokens
        total = sum(map(len, prompts))
        assert computed == (total - 3 * shared if expected else total), name


@pytest.mark.parametrize("name", ["llama", "gemma2", "gpt-oss", "gpt2", "cohere2"])
def test_ragged_forwards_run_packed_and_stay_exact(name, monkeypatch):
    """The prompts (4 to 49 tokens) prefill packed, and n-gram steps where some rows draft and
    others do not verify packed: through packed attention, with soft-capping, sinks and windows
    kept (every method's exactness above runs these paths too)."""
    model, (prompts, _) = build(name), make_prompts()
    expected = [hf_greedy(model, p, NEW_TOKENS) for p in prompts]
    calls = []
    original = packing.packed_attention

    def counted(*args, **kwargs):
        calls.append(kwargs["specbatch_packing"].index.numel())
        return original(*args, **kwargs)

    monkeypatch.setitem(T.AttentionInterface._global_mapping, packing.register(), counted)
    for method in ("ar", "ngram"):
        calls.clear()
        got, _ = engine_outputs(model, None, method, prompts, 0, False, 4)
        assert got == expected, method
        assert calls, f"{method}: nothing ran packed"


@pytest.mark.parametrize("name", SLIDING)
def test_negative_control_the_window_changes_these_outputs(name, monkeypatch):
    """With every window ignored (the engine's old full-causal mask), outputs differ from
    generate's: the prompts cross the window where it matters."""
    model, (prompts, _) = build(name), make_prompts()
    expected = [hf_greedy(model, p, NEW_TOKENS) for p in prompts]
    monkeypatch.setattr(AttentionLayout, "masks", lambda self, visible, q, k, dtype: additive_mask(visible, dtype))
    got, _ = engine_outputs(model, None, "ar", prompts, 0, False, 4)
    assert got != expected


@pytest.mark.parametrize(
    "name, dropped",
    [("gemma2", "softcap"), ("gpt-oss", "s_aux"), ("mistral-sliding", "window"), ("gemma3", "window")],
)
def test_negative_control_cascade_needs_each_variant(name, dropped, monkeypatch):
    """Cascade attention without soft-capping, sinks or the prefix's window gives other tokens."""
    model, (prompts, shared) = build(name), make_prompts()
    expected = [hf_greedy(model, p, NEW_TOKENS) for p in prompts]
    original = cascade_module.cascade_attention

    def without(*args, specbatch_prefix=None, **kwargs):
        if dropped == "window" and specbatch_prefix is not None:
            specbatch_prefix.windows = (None,) * len(specbatch_prefix.windows)
        kwargs.pop(dropped, None)
        return original(*args, specbatch_prefix=specbatch_prefix, **kwargs)

    monkeypatch.setitem(T.AttentionInterface._global_mapping, cascade_module.NAME, without)
    got, _ = engine_outputs(model, None, "ar", prompts, shared, True, 4)
    assert got[:4] != expected[:4]


def test_layer_layouts_are_found():
    assert find_decoder_layers(build("llama")) == ("model", "layers")
    assert find_decoder_layers(build("gpt2")) == ("transformer", "h")
    assert find_decoder_layers(build("falcon")) == ("transformer", "h")
    assert find_decoder_layers(build("gpt-neox")) == ("gpt_neox", "layers")
    assert find_decoder_layers(build("opt")) == ("model", "decoder", "layers")


def test_auto_uses_only_the_arms_that_apply():
    model = build("llama")
    model.model._modules["blocks"] = model.model._modules.pop("layers")  # a layout layer skipping does not know
    assert "decoder layers in none of model.layers" in applies(METHODS["layerskip"], model)
    assert "needs a draft" in applies(METHODS["draft"], model)
    with pytest.raises(ValueError, match="does not apply"):
        make_speculation("layerskip", model)
    proposer, policy = make_speculation("auto", build("llama"))
    assert set(proposer.names) == set(policy.arms) == {"ngram", "lookahead", "layerskip"}  # and plain steps
    proposer, policy = make_speculation("auto", model)
    assert set(proposer.names) == set(policy.arms) == {"ngram", "lookahead"}


def test_attention_variants_that_cannot_be_exact_are_refused():
    chunked = decoder(T.LlamaConfig)
    chunked.layer_types = ["chunked_attention", "full_attention"]
    with pytest.raises(UnsupportedModel, match="'llama' has chunked_attention layers"):
        attention_layout(chunked)
    with pytest.raises(UnsupportedModel, match="'bloom' uses ALiBi"):
        attention_layout(T.BloomConfig(n_layer=2))
    layout = attention_layout(CONFIGS["gemma3"]())
    assert layout.windows == (WINDOW, None) and layout.layer_types == tuple(MIXED)
    assert attention_layout(CONFIGS["mistral-sliding"]()).layer_types is None  # one window: one mask
    assert attention_layout(CONFIGS["qwen2"]()).windows == (None, None)


def test_no_deprecation_warning_from_transformers():
    model = build("llama")
    prompts, shared = make_prompts()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine_outputs(model, None, "ar", prompts, shared, True, 4)
    assert not [w for w in caught if "deprecated" in str(w.message)], [str(w.message) for w in caught]
