"""One model forward over some slots of a SlotKVCache: ragged inputs right-padded, each row at
its own positions, logits only where they are needed."""

from __future__ import annotations

import torch

from .kv_cache import SlotKVCache


def pad_right(seqs: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """-> ids [batch, longest] (padding 0), lengths [batch]."""
    lengths = torch.tensor([len(s) for s in seqs])
    ids = torch.zeros(len(seqs), int(lengths.max()), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return ids.to(device), lengths


def forward_slots(
    model,
    cache: SlotKVCache,
    slots: list[int],
    input_ids: torch.Tensor,
    logits_at=None,
    num_real: list[int] | None = None,
) -> torch.Tensor:
    """input_ids [batch, q] for `slots`, the first num_real[b] of each row real (default: all) ->
    logits [batch, q, vocab] (or [batch, len(logits_at), vocab]). Writes the real tokens' keys
    into the cache; commits nothing."""
    dtype = next(model.parameters()).dtype
    position_ids, visible = cache.bind(slots, input_ids.shape[1], num_real)
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions:  # only padded queries can reach past the context; keep them in range
        position_ids = position_ids.clamp(max=max_positions - 1)
    mask = torch.zeros(visible.shape, device=input_ids.device, dtype=dtype)
    mask.masked_fill_(~visible, torch.finfo(dtype).min)
    out = model(
        input_ids=input_ids,
        attention_mask=mask,
        position_ids=position_ids,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=0 if logits_at is None else logits_at,
    )
    return out.logits


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
