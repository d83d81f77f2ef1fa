"""Ragged forwards without padding: the rows' real tokens packed into one sequence.

A step where rows feed different numbers of tokens (a draft for the rows whose lookup found one,
the last token alone for the others; prompts of different lengths) pads every row to the longest,
and every layer's projections and MLP then run over the padding too. Packed, the model sees one
row of the real tokens only ([1, T], each at its own position), as vLLM's flattened batches do:
everything but attention is per token, so it needs nothing else. Attention is per row: around it
the queries are unpacked to the padded [batch, width] layout, attended over each row's cache with
the engine's mask (through cascade attention, which keeps every variant the engine supports
exact: sliding windows, soft-capping, sinks, shared prefixes), and packed again. The cache writes
each packed key at its row's slot and position (SlotKVCache.bind(packed=True)).

The model runs once either way, so the weights are read once: what a row's draft costs is the
tokens it adds, not the batch's widest row times every row. On the CPU (demo target, batch 32,
four rows drafting 4 tokens) that is 48 tokens instead of 160.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AttentionInterface

from . import cascade_attention

NAME = "specbatch_packed"


@dataclass
class Packing:
    index: torch.Tensor  # [T] each packed token's place in the padded [batch * width] layout
    batch: int
    width: int

    @classmethod
    def of(cls, num_real: list[int], width: int, device) -> Packing:
        real = torch.arange(width)[None, :] < torch.tensor(num_real)[:, None]  # [batch, width]
        return cls(real.flatten().nonzero().squeeze(-1).to(device), len(num_real), width)

    def pack(self, padded: torch.Tensor) -> torch.Tensor:
        """[batch, width, ...] -> [1, T, ...]: the real entries."""
        return padded.flatten(0, 1)[self.index][None]

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """[1, T, ...] -> [batch, width, ...], zeros where rows are padded."""
        out = packed.new_zeros((self.batch * self.width,) + packed.shape[2:])
        out[self.index] = packed[0]
        return out.view((self.batch, self.width) + packed.shape[2:])


def packed_attention(module, query, key, value, attention_mask, specbatch_packing: Packing | None = None, **kwargs):
    """query [1, heads, T, dim] of packed tokens; key, value [batch, kv_heads, kv_len, dim] of the
    rows' caches; attention_mask [batch, 1, width, kv_len] -> [1, T, heads, dim]."""
    padded = specbatch_packing.unpack(query.transpose(1, 2))  # [batch, width, heads, dim]
    cascade = AttentionInterface._global_mapping[cascade_attention.NAME]  # as registered (tests swap it)
    out, weights = cascade(module, padded.transpose(1, 2), key, value, attention_mask, **kwargs)
    return specbatch_packing.pack(out), weights  # out [batch, width, heads, dim]


def register() -> str:
    """Register packed_attention with transformers (once; cascade attention too); its name."""
    cascade_attention.register()
    if NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(NAME, packed_attention)
    return NAME
