"""Cascade attention: each row attends to its group's shared prefix KV (stored once) and to its
own suffix KV, and the two partial softmaxes are merged exactly through their log-sum-exps
(Hydragen, Juravsky et al. 2024; FlashInfer's cascade attention):

    o_x   = softmax(q K_x^T * scale) V_x,   lse_x = logsumexp(q K_x^T * scale)     x in {prefix, suffix}
    lse   = logaddexp(lse_p, lse_s)
    o     = o_p * exp(lse_p - lse) + o_s * exp(lse_s - lse)

The prefix part stacks the queries of all a group's rows against its one copy of the keys (one
matmul per group and layer, as Hydragen's inter-sequence batching does), so the prefix is read,
never copied per row. Every prefix position precedes every suffix position, so the prefix part
needs no causal mask; the suffix part takes the engine's mask. The attention variants of common
models are kept exact:

    sliding window W   a query at position i sees prefix keys j > i - W only (a query past the
                       prefix's window sees none of it: its prefix part is dropped, not merged)
    logit soft-capping scores -> cap * tanh(scores / cap) in both parts (Gemma 2)
    attention sinks    one more logit per head with no value: o *= sigmoid(lse - sink) (gpt-oss)

Registered with transformers' AttentionInterface under NAME and switched on for the forwards
that need it; the groups reach it as the `specbatch_prefix` keyword of the model's forward, which
transformers passes down to attention. A model whose layers do not call the AttentionInterface
(Falcon calls SDPA itself) cannot read a shared prefix: `supports_cascade` finds out once per
model, and the engine then computes every prompt in full.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .architecture import additive_mask, decoder_layers, find_decoder_layers

NAME = "specbatch_cascade"
PROBE = "specbatch_probe"


@dataclass
class PrefixGroup:
    rows: torch.Tensor  # [n] batch rows that share this prefix
    keys: list[torch.Tensor]  # per layer [kv_heads, prefix_len, head_dim]
    values: list[torch.Tensor]


@dataclass
class CascadeContext:
    groups: list[PrefixGroup]
    positions: torch.Tensor  # [batch, q] each query's absolute position (its row's prefix included)
    windows: tuple[int | None, ...]  # per layer: sliding window, None for full attention


def cascade_attention(
    module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    specbatch_prefix: CascadeContext | None = None,
    softcap: float | None = None,
    s_aux: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """query [batch, heads, q, dim]; key, value: the rows' suffixes [batch, kv_heads, kv_len, dim];
    attention_mask [batch, 1, q, kv_len] additive (the layer's own: windowed where it slides);
    softcap: logit soft-capping; s_aux [heads]: attention sinks. -> [batch, q, heads, dim]."""
    if specbatch_prefix is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    batch, heads, q_len, dim = query.shape
    kv_heads = key.shape[1]
    rep = heads // kv_heads  # query heads per kv head, consecutive (as repeat_kv lays them out)
    scaling = dim**-0.5 if scaling is None else scaling
    q = query.reshape(batch, kv_heads, rep * q_len, dim)
    mask = None if attention_mask is None else attention_mask.repeat(1, 1, rep, 1)  # rows r * q_len + t
    out, lse = attend(
        q, key, value, mask, scaling, softcap
    )  # [batch, kv_heads, rep * q, dim], [batch, kv_heads, rep * q]
    out, lse = out.float(), lse.float()
    layer = module.layer_idx
    window = specbatch_prefix.windows[layer]
    for group in specbatch_prefix.groups:
        k_p, v_p = group.keys[layer], group.values[layer]  # [kv_heads, prefix_len, dim]
        rows, n, prefix_len = group.rows, len(group.rows), k_p.shape[1]
        every_row = n == batch  # the common case: one group, no gather or scatter
        q_g = q if every_row else q[rows]
        q_p = q_g.transpose(0, 1).reshape(kv_heads, n * rep * q_len, dim)
        sees = None  # [n, 1, rep * q, 1]: which queries see any of the prefix (None: all see all of it)
        prefix_mask = None
        if window is not None:
            first = specbatch_prefix.positions[rows] - window + 1  # [n, q]: first position each query sees
            if int(first.max()) > 0:
                first = first[:, None, :].expand(n, rep, q_len).reshape(n * rep * q_len, 1)
                seen = torch.arange(prefix_len, device=q.device)[None, :] >= first  # [n * rep * q, prefix_len]
                prefix_mask = additive_mask(seen, q_p.dtype)[None, None]
                sees = seen[:, -1].view(n, 1, rep * q_len, 1)
        o_p, lse_p = attend(q_p[None], k_p[None], v_p[None], prefix_mask, scaling, softcap)  # the one stored prefix
        lse_p = lse_p.float().view(kv_heads, n, rep * q_len).transpose(0, 1)  # [n, kv_heads, rep * q]
        o_p = o_p.float().view(kv_heads, n, rep * q_len, dim).transpose(0, 1)
        lse_g = lse if every_row else lse[rows]
        out_g = out if every_row else out[rows]
        # The merge: o = o_p + (o_s - o_p) * w_s with w_s = exp(lse_s) / (exp(lse_s) + exp(lse_p)).
        merged = o_p + (out_g - o_p) * torch.sigmoid(lse_g - lse_p)[..., None]
        merged_lse = torch.logaddexp(lse_g, lse_p)
        if sees is not None:  # a query past the prefix's window keeps its suffix part as it is
            merged = torch.where(sees, merged, out_g)
            merged_lse = torch.where(sees[..., 0], merged_lse, lse_g)
        if every_row:
            out, lse = merged, merged_lse
        else:
            out[rows], lse[rows] = merged, merged_lse
    if s_aux is not None:  # a sink adds exp(sink) to each head's softmax denominator
        sink = s_aux.float().view(kv_heads, rep, 1).expand(kv_heads, rep, q_len).reshape(kv_heads, rep * q_len)
        out = out * torch.sigmoid(lse - sink)[..., None]
    out = out.to(query.dtype).reshape(batch, heads, q_len, dim)
    return out.transpose(1, 2).contiguous(), None


def attend(q, k, v, mask, scale: float, softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T * scale + mask) v and the log-sum-exp of each query's scores (scores
    soft-capped first where softcap is given).
    q [b, h, m, d], k and v [b, h, n, d], mask [b, 1, m, n] additive or None -> [b, h, m, d], [b, h, m].
    On the CPU, PyTorch's fused attention kernel returns both; elsewhere, plain tensor ops."""
    if q.device.type == "cpu" and _FUSED_CPU is not None and softcap is None:
        out, lse = _FUSED_CPU(q, k, v, 0.0, False, attn_mask=mask, scale=scale)
        return out, lse
    scores = (q @ k.transpose(-1, -2)).float() * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        scores = scores + mask
    return scores.softmax(-1).to(v.dtype) @ v, scores.logsumexp(-1)


_FUSED_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_SUPPORTED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_CONFIGS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def supports_cascade(model) -> bool:
    """Whether each of the model's attention layers calls transformers' AttentionInterface, so
    that cascade attention can take its place. Found once per model by one 2-token forward
    through a probe that records which layers called it."""
    if model not in _SUPPORTED:
        num_layers = len(decoder_layers(model)) if find_decoder_layers(model) else model.config.num_hidden_layers
        called: set[int] = set()

        def probe(module, query, key, value, attention_mask, **kwargs):
            called.add(getattr(module, "layer_idx", -1))
            return torch.zeros_like(query).transpose(1, 2), None

        AttentionInterface.register(PROBE, probe)
        device = next(model.parameters()).device
        try:
            with torch.inference_mode(), attention_implementation(model, PROBE):
                model(input_ids=torch.zeros(1, 2, dtype=torch.long, device=device), use_cache=False)
        except Exception:  # a model that cannot run through the probe cannot run through cascade either
            called.clear()
        _SUPPORTED[model] = len(called - {-1}) == num_layers
    return _SUPPORTED[model]


@contextmanager
def attention_implementation(model, name: str):
    """Route the model's attention through the registered `name` for the forwards inside, then
    restore its own. Every config the model's modules hold is switched (a layer-skipping view
    gives its decoder its own config)."""
    if model not in _CONFIGS:
        found = {id(c): c for c in (getattr(m, "config", None) for m in model.modules()) if c is not None}
        _CONFIGS[model] = list(found.values())
    configs = dict(enumerate(_CONFIGS[model]))
    before = {key: c._attn_implementation for key, c in configs.items()}
    for c in configs.values():
        c._attn_implementation = name
    try:
        yield
    finally:
        for key, c in configs.items():
            c._attn_implementation = before[key]


def register() -> str:
    """Register cascade_attention with transformers (once); its name."""
    if NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(NAME, cascade_attention)
    return NAME
