"""A preallocated KV cache with one slot per batch row, each slot with its own length.

Layout per layer: keys and values [num_slots, kv_heads, capacity, head_dim]. Slot s holds
`lengths[s]` committed positions. A forward over some slots writes its new keys at each
row's own positions lengths[s] .. lengths[s] + q - 1, whatever the other rows' lengths, so rows
never need padding to a common length and position ids never drift. Nothing is committed by
the forward itself: the engine calls `commit(slot, n)` for the tokens it keeps. Rolling back
rejected draft tokens is simply not committing them (as gpt-fast does); the next write
overwrites them and the mask never shows them.

transformers' attention layers call `update(key, value, layer_idx)` and attend over what it
returns; the engine passes a 4D mask from `bind()` and explicit position ids, which transformers
uses as given.

A slot may read a shared prefix (shared_prefix.py): then it stores only its own tokens, and its
positions start after the prefix. `prefix_groups()` tells cascade attention which rows read which
prefix; the prefix's keys are never copied into the slot.

On a GPU the attention sees the cache up to a length rounded up to a multiple of `KV_BUCKET`
keys (the ones past a row's end masked), not one longer each step: on an H200 the first step at
each new attention shape cost 40-100 ms (docs/benchmarks.md), so a run should meet few of them.
The capacity is rounded up alike. On the CPU, where a shape costs nothing the first time, the
length is exact.
"""

from __future__ import annotations

import torch

from .shared_prefix import SharedPrefix

KV_BUCKET = {"cuda": 64}  # device type -> keys the attended length is rounded to (1 where absent)


class SlotKVCache:
    is_compileable = False  # read by some models' mask code; this cache is never torch.compile'd

    def __init__(self, config, num_slots: int, capacity: int, device, dtype: torch.dtype) -> None:
        self.bucket = KV_BUCKET.get(torch.device(device).type, 1)
        capacity = self._rounded(capacity)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        shape = (num_slots, kv_heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.capacity = capacity
        self.num_slots = num_slots
        self.lengths = [0] * num_slots  # committed positions per slot (host-side bookkeeping)
        self.prefixes: list[SharedPrefix | None] = [None] * num_slots  # a shared prefix before the slot's own tokens
        self.device = device
        self._slots = torch.arange(0)
        self._write_pos = torch.zeros(0, 0, dtype=torch.long)
        self._kv_len = 0
        self._real: torch.Tensor | None = None
        self._packed = False
        self._slots_lead = False

    def _rounded(self, n: int) -> int:
        """n rounded up to a multiple of the bucket."""
        return -(-n // self.bucket) * self.bucket

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def reset(self, slot: int, prefix: SharedPrefix | None = None) -> None:
        self.lengths[slot] = 0
        self.prefixes[slot] = prefix

    def offset(self, slot: int) -> int:
        """Position of the slot's first own token: the length of its shared prefix."""
        prefix = self.prefixes[slot]
        return 0 if prefix is None else len(prefix)

    def position(self, slot: int) -> int:
        """Tokens of the sequence the slot holds, its shared prefix included."""
        return self.offset(slot) + self.lengths[slot]

    def truncate(self, slot: int, position: int) -> None:
        """Keep the sequence's first `position` tokens (never fewer than the shared prefix)."""
        self.lengths[slot] = max(0, min(self.lengths[slot], position - self.offset(slot)))

    def prefix_groups(self, slots: list[int]) -> list[tuple[list[int], SharedPrefix]]:
        """(batch rows, prefix) for each shared prefix the rows of `slots` read."""
        groups: dict[int, tuple[list[int], SharedPrefix]] = {}
        for b, slot in enumerate(slots):
            prefix = self.prefixes[slot]
            if prefix is not None:
                groups.setdefault(id(prefix), ([], prefix))[0].append(b)
        return list(groups.values())

    def commit(self, slot: int, num_tokens: int) -> None:
        self.lengths[slot] += num_tokens

    def keep(self, slot: int, chunk_indices: list[int]) -> None:
        """After a tree forward wrote a chunk at the slot's end, move the keys and values of the
        chosen chunk tokens (indices into the chunk) right behind its first token; commit nothing."""
        if not chunk_indices:
            return
        start = self.lengths[slot]
        src = torch.tensor(chunk_indices, device=self.device) + start
        dst = torch.arange(1, len(chunk_indices) + 1, device=self.device) + start
        for cache in self.keys + self.values:
            cache[slot, :, dst] = cache[slot, :, src]

    def bind(
        self,
        slots: list[int],
        q_len: int,
        num_real: list[int] | None = None,
        tree: tuple[torch.Tensor, torch.Tensor] | None = None,
        packed: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prepare a forward of `q_len` new positions for each of `slots`, of which the first
        num_real[b] are real tokens (all, by default) and the rest right padding. A tree forward
        (depth [batch, q_len]: each token's position after the first; visible [batch, q_len, q_len])
        places and masks the new tokens as given instead of as one causal chain.
        Returns (position_ids [batch, q_len], visible [batch, 1, q_len, kv_len], key_positions
        [batch, kv_len]) where kv_len spans the slots' own tokens (a shared prefix is attended to
        separately) and positions are absolute (a shared prefix's length included), for sliding
        windows. packed: the forward's keys come packed (packing.py), [1, kv_heads, T, head_dim]
        with T the real tokens, row after row."""
        num_real = num_real or [q_len] * len(slots)
        starts = torch.tensor([self.lengths[s] for s in slots], device=self.device)  # [batch]
        kv_len = max(self.lengths[s] + n for s, n in zip(slots, num_real))
        if kv_len > self.capacity:
            raise ValueError(f"KV cache capacity {self.capacity} exceeded (need {kv_len})")
        kv_len = min(self._rounded(kv_len), self.capacity)  # keys past a row's end stay masked
        self._slots = torch.tensor(slots, device=self.device)
        self._slots_lead = slots == list(range(len(slots)))
        offsets = torch.arange(q_len, device=self.device)
        self._write_pos = starts[:, None] + offsets  # [batch, q_len]
        # Only real tokens are written: padding never lands past a row's end or over its keys.
        self._real = None if min(num_real) == q_len else offsets < torch.tensor(num_real, device=self.device)[:, None]
        self._packed = packed
        self._kv_len = kv_len
        key_pos = torch.arange(kv_len, device=self.device)
        # Query i of a row sees every key at or before its own position: the committed cache
        # plus this forward's first i + 1 tokens. A padded query sees its row's keys up to
        # kv_len (finite values, outputs discarded); key 0 is always visible, so no query is
        # ever fully masked.
        offsets = torch.tensor([self.offset(s) for s in slots], device=self.device)
        key_positions = key_pos[None, :] + offsets[:, None]  # [batch, kv_len]
        if tree is None:
            visible = key_pos[None, None, :] <= self._write_pos[:, :, None]  # [batch, q_len, kv_len]
            return self._write_pos + offsets[:, None], visible[:, None], key_positions
        depth, chunk_visible = tree
        rel = key_pos[None, :] - starts[:, None]  # [batch, kv_len]: index of each key in the chunk
        in_chunk = (rel >= 0) & (rel < q_len)
        index = rel.clamp(0, q_len - 1)[:, None, :].expand(len(slots), q_len, kv_len)
        visible = (rel < 0)[:, None, :] | (in_chunk[:, None, :] & chunk_visible.gather(2, index))
        # A chunk key sits where the tree placed it, not at its index in the chunk.
        placed = starts[:, None] + offsets[:, None] + depth.gather(1, rel.clamp(0, q_len - 1))
        key_positions = torch.where(in_chunk, placed, key_positions)
        return starts[:, None] + offsets[:, None] + depth, visible[:, None], key_positions

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        """key, value [batch, kv_heads, q_len, head_dim] -> the rows' caches [batch, kv_heads, kv_len, head_dim]."""
        k_cache, v_cache = self.keys[layer_idx], self.values[layer_idx]
        rows = self._slots[:, None].expand_as(self._write_pos)  # [batch, q_len]
        key, value = key.transpose(1, 2), value.transpose(1, 2)  # [batch, q_len, heads, dim]
        if self._real is None and not self._packed:
            k_cache[rows, :, self._write_pos] = key.to(k_cache.dtype)
            v_cache[rows, :, self._write_pos] = value.to(v_cache.dtype)
        else:  # the real tokens only; packed keys ([1, T, heads, dim]) are those already, row after row
            real = self._real if self._real is not None else torch.ones_like(rows, dtype=torch.bool)
            if self._packed:
                key, value = key[0], value[0]
            else:
                key, value = key[real], value[real]
            k_cache[rows[real], :, self._write_pos[real]] = key.to(k_cache.dtype)
            v_cache[rows[real], :, self._write_pos[real]] = value.to(v_cache.dtype)
        if self._slots_lead:
            n = len(self._slots)
            return k_cache[:n, :, : self._kv_len], v_cache[:n, :, : self._kv_len]
        return k_cache[self._slots, :, : self._kv_len], v_cache[self._slots, :, : self._kv_len]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._kv_len
