"""Batched decoding with continuous batching over a slot KV cache.

The engine takes token ids and returns token ids; it knows nothing of text or files. Requests
wait in a queue; whenever slots are free, waiting requests are admitted and prefilled together
(one forward, ragged prompts right-padded, each row at its own positions), and every decode
step runs one forward over all active rows. A finished row frees its slot at once and the next
waiting request takes it, so throughput holds when output lengths vary.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from .kv_cache import SlotKVCache
from .params import GenerationRequest, GenerationResult
from .sampling import RowSampling, next_tokens


@dataclass
class _Row:
    """A request while it holds a slot."""

    request: GenerationRequest
    slot: int
    generator: torch.Generator
    result: GenerationResult
    pending: int = -1  # the last chosen token: emitted, not yet in the KV cache
    admitted_at: float = 0.0
    prefilled_at: float = 0.0
    done: bool = False
    tokens: list[int] = field(default_factory=list)


@dataclass
class EngineStats:
    target_forwards: int = 0
    target_seconds: float = 0.0
    prefill_tokens: int = 0  # prompt tokens run through the target
    peak_kv_bytes: int = 0


class Engine:
    """Batched autoregressive decoding for any transformers causal LM.

    model: a transformers causal LM in eval mode. eos_token_ids: tokens that end a request.
    max_batch_size: slots decoded together. max_prefill_tokens: cap on padded tokens per
    prefill forward (bounds activation memory when many long prompts arrive at once).
    """

    def __init__(
        self,
        model,
        eos_token_ids: Iterable[int],
        max_batch_size: int = 8,
        max_prefill_tokens: int = 8192,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.model = model
        self.eos = set(int(t) for t in eos_token_ids)
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.max_positions = getattr(model.config, "max_position_embeddings", None) or 1 << 30
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.stats = EngineStats()

    @torch.inference_mode()
    def generate(
        self,
        requests: list[GenerationRequest],
        on_result: Callable[[GenerationResult], None] | None = None,
    ) -> list[GenerationResult]:
        """Run every request to completion; results come back in request order."""
        for r in requests:
            if len(r.prompt_ids) >= self.max_positions:
                raise ValueError(
                    f"request {r.request_id!r}: prompt of {len(r.prompt_ids)} tokens does not fit the "
                    f"model's context of {self.max_positions}"
                )
        if not requests:
            return []
        start = time.perf_counter()
        capacity = min(self.max_positions, max(len(r.prompt_ids) + r.max_new_tokens for r in requests))
        num_slots = min(self.max_batch_size, len(requests))
        cache = SlotKVCache(self.model.config, num_slots, capacity, self.device, self.dtype)
        self.stats.peak_kv_bytes = max(self.stats.peak_kv_bytes, cache.nbytes)
        waiting = deque(enumerate(requests))
        free = list(range(num_slots - 1, -1, -1))
        active: dict[int, _Row] = {}
        results: list[GenerationResult | None] = [None] * len(requests)
        order: dict[int, int] = {}

        def finish(row: _Row) -> None:
            row.result.decode_seconds = time.perf_counter() - row.prefilled_at
            row.result.completion_ids = row.tokens
            results[order[row.slot]] = row.result
            del active[row.slot]
            free.append(row.slot)
            if on_result is not None:
                on_result(row.result)

        while waiting or active:
            admitted: list[_Row] = []
            longest = 0
            while waiting and free:
                index, req = waiting[0]
                longest = max(longest, len(req.prompt_ids))
                if admitted and longest * (len(admitted) + 1) > self.max_prefill_tokens:
                    break
                waiting.popleft()
                slot = free.pop()
                cache.reset(slot)
                order[slot] = index
                row = _Row(
                    request=req,
                    slot=slot,
                    generator=torch.Generator().manual_seed(req.sampling.seed),
                    result=GenerationResult(req.request_id, req.sample_index, len(req.prompt_ids), [], "length"),
                    admitted_at=time.perf_counter(),
                )
                row.result.queue_seconds = row.admitted_at - start
                active[slot] = row
                admitted.append(row)
            if admitted:
                self._prefill(cache, admitted)
                for row in admitted:
                    if row.done:
                        finish(row)
            if active:
                for row in self._decode_step(cache, sorted(active.values(), key=lambda r: r.slot)):
                    finish(row)
        return results  # type: ignore[return-value]

    def _forward(self, cache: SlotKVCache, slots: list[int], input_ids: torch.Tensor, logits_at=None):
        """One target forward of input_ids [batch, q] for `slots`; logits [batch, q or len(logits_at), vocab]."""
        position_ids, visible = cache.bind(slots, input_ids.shape[1])
        mask = torch.zeros(visible.shape, device=self.device, dtype=self.dtype)
        mask.masked_fill_(~visible, torch.finfo(self.dtype).min)
        t0 = time.perf_counter()
        out = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=0 if logits_at is None else logits_at,
        )
        self.stats.target_forwards += 1
        self.stats.target_seconds += time.perf_counter() - t0
        return out.logits

    def _prefill(self, cache: SlotKVCache, rows: list[_Row]) -> None:
        t0 = time.perf_counter()
        lengths = [len(r.request.prompt_ids) for r in rows]
        ids = torch.zeros(len(rows), max(lengths), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : lengths[i]] = torch.tensor(r.request.prompt_ids)
        last = torch.tensor(lengths) - 1  # [batch]
        keep, where = torch.unique(last, return_inverse=True)
        logits = self._forward(cache, [r.slot for r in rows], ids.to(self.device), keep.to(self.device))
        logits = logits[torch.arange(len(rows)), where.to(self.device)]  # [batch, vocab]
        for r, n in zip(rows, lengths):
            cache.commit(r.slot, n)
        self.stats.prefill_tokens += sum(lengths)
        self._emit(rows, logits)
        elapsed = time.perf_counter() - t0
        for r in rows:
            r.prefilled_at = time.perf_counter()
            r.result.prefill_seconds = elapsed

    def _decode_step(self, cache: SlotKVCache, rows: list[_Row]) -> list[_Row]:
        ids = torch.tensor([[r.pending] for r in rows], device=self.device)  # [batch, 1]
        logits = self._forward(cache, [r.slot for r in rows], ids)[:, -1]  # [batch, vocab]
        for r in rows:
            cache.commit(r.slot, 1)
        self._emit(rows, logits)
        return [r for r in rows if r.done]

    def _emit(self, rows: list[_Row], logits: torch.Tensor) -> None:
        """Choose each row's next token from logits [batch, vocab] and check its stop conditions."""
        sampling = RowSampling([r.request.sampling for r in rows], [r.generator for r in rows], self.device)
        chosen = next_tokens(logits, sampling).tolist()
        for r, token in zip(rows, chosen):
            r.result.target_steps += 1
            if token in self.eos:
                r.done, r.result.finish_reason = True, "stop"
                continue
            r.tokens.append(token)
            r.pending = token
            context_full = len(r.request.prompt_ids) + len(r.tokens) >= self.max_positions
            if len(r.tokens) >= r.request.max_new_tokens or context_full:
                r.done, r.result.finish_reason = True, "length"
