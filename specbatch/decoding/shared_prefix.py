"""A group's shared prefix: its token ids and, per model that reads it (the target, a draft), its
KV computed once and stored once, per layer [kv_heads, prefix_len, head_dim].

The engine creates one when the group's first member is admitted and releases it when the last
member finishes; slot caches (kv_cache.py) hold references to it, and a model's KV is computed
the first time a forward over that model needs it (`prefill_prefixes`, one batched forward for
all prefixes missing at once, in forward.py).
"""

from __future__ import annotations

import torch


class SharedPrefix:
    def __init__(self, ids: list[int]) -> None:
        self.ids = ids
        self.kv: dict[torch.nn.Module, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}

    def __len__(self) -> int:
        return len(self.ids)

    def nbytes(self, model) -> int:
        keys, values = self.kv.get(model, ([], []))
        return sum(t.numel() * t.element_size() for t in keys + values if t is not None)

    def release(self) -> None:
        self.kv.clear()
