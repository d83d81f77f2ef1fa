"""Model forwards: over some slots of a SlotKVCache (ragged inputs right-padded, each row at its
own positions, logits only where they are needed; rows that read a shared prefix go through
cascade attention), and over whole shared prefixes to compute their KV once."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from . import cascade_attention, packing
from .architecture import attention_layout, cache_argument
from .cascade_attention import CascadeContext, PrefixGroup, attention_implementation, supports_cascade
from .cost_model import ragged
from .kv_cache import SlotKVCache
from .shared_prefix import SharedPrefix


def pad_right(seqs: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """-> ids [batch, longest] (padding 0), lengths [batch]."""
    sizes = [len(s) for s in seqs]
    width = max(sizes)
    ids = torch.tensor([s if n == width else s + [0] * (width - n) for s, n in zip(seqs, sizes)], dtype=torch.long)
    return ids.to(device), torch.tensor(sizes)


def packs(model, num_real: list[int] | None, width: int, tree=None) -> bool:
    """Whether forward_slots runs these rows packed (packing.py): ragged enough to pay for it,
    not a tree (its chunk is one mask), and a model whose attention can be routed."""
    return num_real is not None and ragged(num_real, width) and tree is None and supports_cascade(model)


def forward_size(model, num_real: list[int], width: int, tree=None) -> int:
    """Tokens forward_slots computes for rows of num_real real tokens in `width` columns."""
    return sum(num_real) if packs(model, num_real, width, tree) else len(num_real) * width


def forward_slots(
    model,
    cache: SlotKVCache,
    slots: list[int],
    input_ids: torch.Tensor,
    logits_at=None,
    num_real: list[int] | None = None,
    tree: tuple[torch.Tensor, torch.Tensor] | None = None,
    packed: bool | None = None,
) -> torch.Tensor:
    """input_ids [batch, q] for `slots`, the first num_real[b] of each row real (default: all) ->
    logits [batch, q, vocab] (or [batch, len(logits_at), vocab]). Writes the real tokens' keys
    into the cache; commits nothing. Computes the model's KV of any shared prefix the rows read
    and that it lacks. tree: (depth, visible) of a tree forward, see SlotKVCache.bind. packed:
    run the real tokens only, packed (packing.py); None: where `packs` says so."""
    dtype = next(model.parameters()).dtype
    layout = attention_layout(model.config)
    batch, width = input_ids.shape
    device = input_ids.device
    if packed is None:
        packed = packs(model, num_real, width, tree)
    packed_rows = packing.Packing.of(num_real or [width] * batch, width, device) if packed else None
    position_ids, visible, key_positions = cache.bind(slots, width, num_real, tree, packed)
    mask = layout.masks(visible, position_ids, key_positions, dtype)
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions:  # only padded queries can reach past the context; keep them in range
        position_ids = position_ids.clamp(max=max_positions - 1)
    extra, attention = {}, nullcontext()
    groups = cache.prefix_groups(slots)
    if groups or packed:
        prefill_prefixes(model, [p for _, p in groups if model not in p.kv])
        # Packed, every forward's attention goes through cascade attention (with no prefix where
        # none is read): it keeps soft-capping and sinks, which SDPA would drop.
        extra["specbatch_prefix"] = CascadeContext(
            [PrefixGroup(torch.tensor(rows, device=device), *p.kv[model]) for rows, p in groups],
            position_ids,
            layout.windows,
        )
        attention = attention_implementation(model, (packing if packed else cascade_attention).register())
    if packed:
        extra["specbatch_packing"] = packed_rows
        input_ids, position_ids = packed_rows.pack(input_ids), packed_rows.pack(position_ids)
        if logits_at is not None:  # the packed places of each row's wanted columns (a padded column: its last real token)
            last = torch.tensor(num_real, device=device)[:, None] - 1
            columns = torch.minimum(logits_at.to(device)[None, :], last)  # [batch, n]
            rows = torch.arange(batch, device=device)[:, None] * width
            logits_at = torch.searchsorted(packed_rows.index, (rows + columns).flatten())
    with attention:
        out = model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=position_ids,
            use_cache=True,
            logits_to_keep=0 if logits_at is None else logits_at,
            **{cache_argument(model): cache},
            **extra,
        )
    if not packed:
        return out.logits
    if logits_at is not None:  # [1, batch * n, vocab]
        return out.logits.view(batch, -1, out.logits.shape[-1])
    return packed_rows.unpack(out.logits)


def last_logits(model, cache: SlotKVCache, slots: list[int], seqs: list[list[int]]) -> torch.Tensor:
    """Feed each row its own tokens (ragged) and return the logits after each row's last one,
    [batch, vocab]. Commits every fed token."""
    device = cache.device
    ids, lengths = pad_right(seqs, device)
    keep, where = torch.unique(lengths - 1, return_inverse=True)
    logits = forward_slots(model, cache, slots, ids, keep.to(device), lengths.tolist())
    for slot, n in zip(slots, lengths.tolist()):
        cache.commit(slot, n)
    return logits[torch.arange(len(seqs), device=device), where.to(device)]  # [batch, vocab]


class _PrefixWriter:
    """A cache for one forward over whole prefixes: keeps each row's keys and values (its real
    positions only, so the stored copy is exact-size) and attends over the forward's own."""

    def __init__(self, lengths: list[int]) -> None:
        self.lengths = lengths
        self.keys: dict[int, list[torch.Tensor]] = {}
        self.values: dict[int, list[torch.Tensor]] = {}

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        self.keys[layer_idx] = [key[b, :, :n].clone() for b, n in enumerate(self.lengths)]
        self.values[layer_idx] = [value[b, :, :n].clone() for b, n in enumerate(self.lengths)]
        return key, value

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0


def prefill_prefixes(model, prefixes: list[SharedPrefix]) -> int:
    """Compute `model`'s KV for each prefix (one forward, ragged prefixes right-padded).
    Returns the number of tokens computed."""
    if not prefixes:
        return 0
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    ids, lengths = pad_right([p.ids for p in prefixes], device)
    width = ids.shape[1]
    positions = torch.arange(width, device=device)
    visible = positions[None, :] <= positions[:, None]  # causal [q, kv]; padded queries are discarded
    writer = _PrefixWriter(lengths.tolist())
    rows = positions[None].expand(len(prefixes), width)
    model(
        input_ids=ids,
        attention_mask=attention_layout(model.config).masks(
            visible[None, None].expand(len(prefixes), 1, width, width), rows, rows, dtype
        ),
        position_ids=rows,
        use_cache=True,
        logits_to_keep=1,
        **{cache_argument(model): writer},
    )
    # Indexed by each attention layer's layer_idx (a layer-skipping view runs only some of them).
    layers = range(max(writer.keys) + 1)
    for b, prefix in enumerate(prefixes):
        prefix.kv[model] = (
            [writer.keys[i][b] if i in writer.keys else None for i in layers],
            [writer.values[i][b] if i in writer.values else None for i in layers],
        )
    return int(lengths.sum())
