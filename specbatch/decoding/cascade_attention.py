"""Cascade attention: each row attends to its group's shared prefix KV (stored once) and to its
own suffix KV, and the two partial softmaxes are merged exactly through their log-sum-exps
(Hydragen, Juravsky et al. 2024; FlashInfer's cascade attention):

    o_x   = softmax(q K_x^T * scale) V_x,   lse_x = logsumexp(q K_x^T * scale)     x in {prefix, suffix}
    lse   = logaddexp(lse_p, lse_s)
    o     = o_p * exp(lse_p - lse) + o_s * exp(lse_s - lse)

The prefix part stacks the queries of all a group's rows against its one copy of the keys (one
matmul per group and layer, as Hydragen's inter-sequence batching does), so the prefix is read,
never copied per row. Every prefix position precedes every suffix position, so the prefix part
needs no mask; the suffix part takes the engine's mask.

Registered with transformers' AttentionInterface under NAME and switched on for the forwards
that need it; the groups reach it as the `specbatch_prefix` keyword of the model's forward, which
transformers passes down to attention.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

NAME = "specbatch_cascade"


@dataclass
class PrefixGroup:
    rows: torch.Tensor  # [n] batch rows that share this prefix
    keys: list[torch.Tensor]  # per layer [kv_heads, prefix_len, head_dim]
    values: list[torch.Tensor]


@dataclass
class CascadeContext:
    groups: list[PrefixGroup]


def cascade_attention(
    module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    specbatch_prefix: CascadeContext | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """query [batch, heads, q, dim]; key, value: the rows' suffixes [batch, kv_heads, kv_len, dim];
    attention_mask [batch, 1, q, kv_len] additive. -> [batch, q, heads, dim]."""
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
    out, lse = attend(q, key, value, mask, scaling)  # [batch, kv_heads, rep * q, dim], [batch, kv_heads, rep * q]
    out, lse = out.float(), lse.float()
    layer = module.layer_idx
    for group in specbatch_prefix.groups:
        k_p, v_p = group.keys[layer], group.values[layer]  # [kv_heads, prefix_len, dim]
        rows, n = group.rows, len(group.rows)
        every_row = n == batch  # the common case: one group, no gather or scatter
        q_g = q if every_row else q[rows]
        q_p = q_g.transpose(0, 1).reshape(kv_heads, n * rep * q_len, dim)
        o_p, lse_p = attend(q_p[None], k_p[None], v_p[None], None, scaling)  # over the one stored prefix
        lse_p = lse_p.float().view(kv_heads, n, rep * q_len).transpose(0, 1)  # [n, kv_heads, rep * q]
        o_p = o_p.float().view(kv_heads, n, rep * q_len, dim).transpose(0, 1)
        # The merge: o = o_p + (o_s - o_p) * w_s with w_s = exp(lse_s) / (exp(lse_s) + exp(lse_p)).
        w_s = torch.sigmoid((lse if every_row else lse[rows]) - lse_p)[..., None]
        if every_row:
            out = o_p + (out - o_p) * w_s
        else:
            out[rows] = o_p + (out[rows] - o_p) * w_s
    out = out.to(query.dtype).reshape(batch, heads, q_len, dim)
    return out.transpose(1, 2).contiguous(), None


def attend(q, k, v, mask, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T * scale + mask) v and the log-sum-exp of each query's scores.
    q [b, h, m, d], k and v [b, h, n, d], mask [b, 1, m, n] additive or None -> [b, h, m, d], [b, h, m].
    On the CPU, PyTorch's fused attention kernel returns both; elsewhere, plain tensor ops."""
    if q.device.type == "cpu" and _FUSED_CPU is not None:
        out, lse = _FUSED_CPU(q, k, v, 0.0, False, attn_mask=mask, scale=scale)
        return out, lse
    scores = (q @ k.transpose(-1, -2)).float() * scale
    if mask is not None:
        scores = scores + mask
    return scores.softmax(-1).to(v.dtype) @ v, scores.logsumexp(-1)


_FUSED_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def supports_cascade(config, max_len: int) -> bool:
    """Cascade attention computes plain softmax attention: not for sliding windows shorter than
    the sequences, logit soft-capping or attention sinks."""
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    if window is not None and window < max_len:
        return False
    return not any(getattr(config, a, None) for a in ("attn_logit_softcapping", "sinks"))


@contextmanager
def cascade_attention_on(model):
    """Route the model's attention through cascade_attention for one forward, then restore its
    own implementation (the model stays usable by anything else, e.g. transformers' generate)."""
    if NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(NAME, cascade_attention)
    config = model.config
    before = config._attn_implementation
    config._attn_implementation = NAME
    try:
        yield
    finally:
        config._attn_implementation = before
