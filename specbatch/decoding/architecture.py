"""What the engine must know of a model's attention to stay exact: each layer's sliding window,
how the model takes per-layer masks, and the name its forward gives the cache argument.

Sliding-window layers (Mistral, Qwen2 with use_sliding_window, Gemma 2/3, Cohere 2, gpt-oss...)
let a query at position i see only keys at positions j with i - window < j <= i (transformers'
`sliding_window_overlay`). A model whose layers all share one window takes one 4D mask; a model
that mixes windowed and full layers (`config.layer_types`) takes a dict of masks keyed by layer
type, which transformers' models accept in place of the masks they would build.

Attention variants the engine cannot reproduce exactly are refused here, from the config alone,
before any weights load: chunked or linear attention layers, state-space layers, ALiBi.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch
from torch import nn

FULL, SLIDING = "full_attention", "sliding_attention"
ALIBI_MODELS = ("bloom", "mpt")  # position bias built from a 2D mask the engine does not pass


class UnsupportedModel(ValueError):
    """The engine cannot decode this model exactly; the message says why and what to use instead."""


@dataclass(frozen=True)
class AttentionLayout:
    windows: tuple[int | None, ...]  # per decoder layer: its sliding window, None for full attention
    layer_types: tuple[str, ...] | None  # the model's own layer types, when it mixes them

    @property
    def smallest_window(self) -> int | None:
        return min((w for w in self.windows if w is not None), default=None)

    def masks(self, visible: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor, dtype: torch.dtype):
        """visible [batch, 1, q, kv] (causal, or a tree's mask); q_pos [batch, q] and k_pos
        [batch, kv] absolute positions -> the model's attention_mask: one additive 4D mask, or a
        dict of them by layer type where windowed and full layers mix."""
        window = self.smallest_window
        full = additive_mask(visible, dtype)
        if window is None or int(q_pos.max()) < window:  # every window still covers the whole sequence
            return full
        # By absolute position. A padded query may see nothing now: its additive mask is finite
        # everywhere, so its (discarded) output stays finite.
        in_window = k_pos[:, None, None, :] > q_pos[:, None, :, None] - window
        windowed = additive_mask(visible & in_window, dtype)
        if self.layer_types is None:
            return windowed
        return {FULL: full, SLIDING: windowed}


def additive_mask(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    mask = torch.zeros(visible.shape, device=visible.device, dtype=dtype)
    return mask.masked_fill_(~visible, torch.finfo(dtype).min)


def attention_layout(config) -> AttentionLayout:
    """Each layer's window from the config; raises UnsupportedModel for what cannot be exact."""
    model_type = getattr(config, "model_type", type(config).__name__)
    if model_type in ALIBI_MODELS or getattr(config, "alibi", False):
        raise UnsupportedModel(
            f"model type {model_type!r} uses ALiBi position biases, which specbatch's engine does not "
            "reproduce; use transformers' generate for it, or a rotary-position model (Llama, Qwen, Mistral...)"
        )
    num_layers = config.num_hidden_layers
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    types = getattr(config, "layer_types", None)
    if not types:
        return AttentionLayout((window,) * num_layers, None)
    unknown = sorted({t for t in types if t not in (FULL, SLIDING)})
    if unknown:
        raise UnsupportedModel(
            f"model type {model_type!r} has {', '.join(unknown)} layers; specbatch's engine is exact for full "
            "and sliding-window attention only; use transformers' generate for this model"
        )
    if SLIDING in types and window is None:
        raise UnsupportedModel(f"model type {model_type!r} has sliding-window layers but no config.sliding_window")
    windows = tuple(window if t == SLIDING else None for t in types[:num_layers])
    mixed = len(set(windows)) > 1
    return AttentionLayout(windows, tuple(types) if mixed else None)


def cache_argument(model) -> str:
    """The name the model's forward gives its KV cache: `cache` in newer transformers,
    `past_key_values` before (where `cache` is not yet a parameter)."""
    return _cache_argument(type(model))


@functools.cache
def _cache_argument(model_class) -> str:
    parameters = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


# Where transformers' causal LMs keep their decoder layers: Llama, Qwen, Mistral, Gemma, Phi...;
# GPT-2 and Falcon; GPT-NeoX; OPT.
LAYER_PATHS = (("model", "layers"), ("transformer", "h"), ("gpt_neox", "layers"), ("model", "decoder", "layers"))


def find_decoder_layers(model) -> tuple[str, ...] | None:
    """The attribute path from the causal LM to its list of decoder layers, or None."""
    for path in LAYER_PATHS:
        module = model
        for name in path:
            module = getattr(module, name, None)
        if isinstance(module, nn.ModuleList):
            return path
    return None


def decoder_layers(model) -> nn.ModuleList:
    path = find_decoder_layers(model)
    if path is None:
        raise UnsupportedModel(
            f"{type(model).__name__} keeps its decoder layers in none of "
            f"{', '.join('.'.join(p) for p in LAYER_PATHS)}; layer skipping cannot find them"
        )
    module = model
    for name in path:
        module = getattr(module, name)
    return module
