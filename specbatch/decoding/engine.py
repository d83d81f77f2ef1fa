"""Batched decoding with continuous batching over a slot KV cache, plain or speculative.

The engine takes token ids and returns token ids; it knows nothing of text or files. Requests
wait in a queue; whenever slots are free, waiting requests are admitted and prefilled together
(one forward, each row at its own positions). Every decode step then:

    arm, K = policy.choose(batch, view)        # K = 0: a plain step; view: the job left, each row's record
    drafts = proposer.propose(arm, rows, K_b)  # K_b <= K per row (a plan gives each row its own), capped by its limit
    logits = target([last token] + drafts)     # one forward over every row, [batch, max K_b + 1, vocab]
    n_b, t = verify(logits, drafts)            # rejection sampling; greedy: exact argmax match
    commit 1 + n_b positions of row b          # rejected positions are simply not committed
    policy.observe(StepMeasurement(...))       # what the step cost and yielded (cost_model.py)

Shadow drafts: an arm that can say what it would draft without drafting (n-gram lookup: a few dict
lookups, no model; Proposer.shadow) does so for rows it is not drafting for, and the tokens the
row then emits score it as a verification would: the draft's first tokens that match, then a
first mismatch. A greedy verification accepts exactly the matching prefix; a sampled one accepts
a one-hot draft token with probability p(d), the chance that a plain step samples d, so the
matched length has the distribution the accepted length would have. Each request's record and
the arm's acceptance are then known without running the arm: a copying row is found the step its
copying shows, and no probe is spent to learn that an arm would not pay. The lookups stay under
SHADOW_BUDGET of the decoding time. Each score also goes to the request's StepRecord of the step
the shadow stood for (the step after the one that made it), so the `steps` table says, step by
step, what the arm would have drafted and had accepted where it did not run.

A finished row frees its slot at once and the next waiting request takes it, so throughput holds
when output lengths vary. Each row accepts its own number of tokens; its KV cache length and
position ids are its own, so nothing drifts after ragged acceptance. A forward whose rows feed
different numbers of tokens (prompts; a draft in some rows only) runs packed where padding would
be over a quarter of it: the real tokens only, as one sequence (packing.py).

Prefix sharing: requests that carry the same first prefix_len tokens (prefix_tree.py plans them)
form a group. When its first member is admitted the prefix is prefilled once and stored once
(shared_prefix.py); every member's slot holds only its own tokens and reads the prefix through
cascade attention. The prefix is freed when the group's last member finishes.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cached_property

import torch

from .architecture import decoder_layers
from .auto import ArmSet
from .cascade_attention import supports_cascade
from .cost_model import StepMeasurement, record_drafts
from .draft_policy import BatchView
from .forward import forward_size, forward_slots, last_logits, packs, pad_right, prefill_prefixes
from .kv_cache import SlotKVCache
from .params import GenerationRequest, GenerationResult, StepRecord
from .proposer import Proposer, forward_parameters
from .sampling import RowSampling, next_tokens
from .scheduler import Scheduler
from .shared_prefix import SharedPrefix
from .verifier import verify, verify_tree

# Shadow drafts may take at most this share of the decode steps' time. At 0.01 they were 1% of a
# plain step at batch 8 on the CPU, a third of what an adaptive policy's plain steps cost beyond
# plain decoding's; at 0.005 copying at batch 1 kept its 1.4-1.7x.
SHADOW_BUDGET = 0.005


@dataclass
class _Row:
    """A request while it holds a slot."""

    request: GenerationRequest
    slot: int
    index: int  # the request's position in the job
    generator: torch.Generator
    result: GenerationResult
    prefilled_at: float = 0.0
    done: bool = False
    tokens: list[int] = field(default_factory=list)  # emitted; the last is not yet in the target cache
    drafts: dict = field(default_factory=dict)  # arm -> decayed (accepted drafts, trials) of this request's steps
    shadow: tuple[str, int, list[int], int] | None = None  # pending: (arm, at len(tokens), its tokens, the step it stands for)

    @property
    def seq(self) -> list[int]:
        return self.request.prompt_ids + self.tokens

    @property
    def remaining(self) -> int:
        return self.request.max_new_tokens - len(self.tokens)


class _View(BatchView):
    """The batch as the policy sees it before a step (draft_policy.BatchView), each field but
    desync computed when first read: a plain step the policy has settled on reads desync only,
    and the rest cost 4-5 us a step at batch 8, 30 at batch 32 (CPU)."""

    def __init__(self, cache: SlotKVCache, rows: list[_Row], seq_lens: list[int], scheduler: Scheduler) -> None:
        fields = dict(_cache=cache, _rows=rows, _seq_lens=seq_lens, _scheduler=scheduler, desync=scheduler.desync_cost())
        for name, value in fields.items():  # BatchView is frozen
            object.__setattr__(self, name, value)

    @cached_property
    def context_tokens(self) -> int:
        cache, slots = self._cache, [r.slot for r in self._rows]
        prefixes = {id(p): len(p) for p in (cache.prefixes[s] for s in slots) if p is not None}
        return sum(n - cache.offset(s) for s, n in zip(slots, self._seq_lens)) + sum(prefixes.values())

    @cached_property
    def remaining_tokens(self) -> int:
        return sum(r.remaining for r in self._rows) + self._scheduler.waiting_tokens

    @cached_property
    def rows(self) -> list[dict]:
        return [r.drafts for r in self._rows]

    @cached_property
    def wave(self) -> list[int] | None:
        """The job's last wave (no request waits; nobody takes a freed slot): each row's tokens left."""
        return None if self._scheduler.waiting else [r.remaining for r in self._rows]


@dataclass
class EngineStats:
    target_forwards: int = 0
    target_seconds: float = 0.0
    prompt_tokens: int = 0  # prompt tokens of every request
    prefill_tokens: int = 0  # prompt tokens run through the target: shared prefixes count once
    peak_kv_bytes: int = 0  # the target's KV cache: slots plus live shared prefixes


class Engine:
    """Batched decoding for any transformers causal LM.

    model: the target, in eval mode. eos_token_ids: tokens that end a request. max_batch_size:
    slots decoded together. max_prefill_tokens: cap on padded tokens per prefill forward.
    admit_wait: how long freed slots wait for company so that their prefills share one forward,
    in empty slot-steps per slot (scheduler.py); 0 admits at once.
    proposer and policy: speculative decoding (see proposer.py, draft_policy.py); the proposer
    may be an ArmSet of several (auto.py), among which the policy chooses per step. Without them,
    plain autoregressive decoding, which records no per-step rows.
    """

    def __init__(
        self,
        model,
        eos_token_ids: Iterable[int],
        max_batch_size: int = 8,
        max_prefill_tokens: int = 8192,
        proposer: Proposer | None = None,
        policy=None,
        admit_wait: float = 1.0,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if (proposer is None) != (policy is None):
            raise ValueError("a proposer needs a draft policy and vice versa")
        self.model = model
        self.eos = set(int(t) for t in eos_token_ids)
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.admit_wait = admit_wait
        self.proposer = ArmSet.of(proposer) if proposer is not None else None
        self.policy = policy
        if policy is not None:
            policy.bind(
                self.proposer.names,
                self.proposer.chunk_tokens,
                self.proposer.cost_share(forward_parameters(model), len(decoder_layers(model))),
            )
        self.max_positions = getattr(model.config, "max_position_embeddings", None) or 1 << 30
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.stats = EngineStats()  # of the last generate() call
        self._sampling: tuple[list[tuple[int, int]], RowSampling] | None = None  # ((slot, request) per row, settings)
        self._step_cost = (0.0, 0.0)  # seconds of the last decode step, and a plain step's recently
        self._shadow_k = getattr(policy, "shadow_k", 0)  # tokens a shadow draft asks for (0: none)
        self._shadow_arms = self.proposer.shadowable if self.proposer is not None and self._shadow_k else []
        if self._shadow_arms:
            policy.expect_shadows(self._shadow_arms)
        self._shadow_seconds = self._decode_seconds = 0.0

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
        self.stats = EngineStats()
        self._sampling = None
        keys = self._prefix_keys(requests)
        live: dict[tuple[int, ...], SharedPrefix] = {}
        # Only real tokens are written (padding never is), and drafts never pass a row's limit.
        own = [len(r.prompt_ids) - len(k or ()) + r.max_new_tokens for r, k in zip(requests, keys)]
        # A tree step (lookahead) writes its whole chunk before keeping the accepted part.
        capacity = min(self.max_positions, max(own)) + (self.proposer.scratch_positions if self.proposer else 0)
        num_slots = min(self.max_batch_size, len(requests))
        scheduler = Scheduler(requests, keys, num_slots, self.max_prefill_tokens, self.admit_wait)
        cache = SlotKVCache(self.model.config, num_slots, capacity, self.device, self.dtype)
        if self.proposer is not None:
            self.proposer.start(num_slots, capacity)
        self.stats.prompt_tokens += sum(len(r.prompt_ids) for r in requests)
        self.stats.peak_kv_bytes = max(self.stats.peak_kv_bytes, cache.nbytes)
        active: dict[int, _Row] = {}
        results: list[GenerationResult | None] = [None] * len(requests)

        def finish(row: _Row) -> None:
            row.result.decode_seconds = time.perf_counter() - row.prefilled_at
            row.result.completion_ids = row.tokens
            results[row.index] = row.result
            del active[row.slot]
            cache.reset(row.slot)
            if self.proposer is not None:
                self.proposer.release(row.slot)
            if (done_prefix := scheduler.finish(row.slot)) is not None:
                live.pop(done_prefix).release()
            if on_result is not None:
                on_result(row.result)

        self._step_cost = (0.0, 0.0)
        self._shadow_seconds = self._decode_seconds = 0.0
        while scheduler.has_work:
            admitted: list[_Row] = []
            last, plain = self._step_cost
            for a in scheduler.admit(last / plain if last and plain else 1.0):
                req = a.request
                result = GenerationResult(req.request_id, req.sample_index, len(req.prompt_ids), [], "length")
                result.queue_seconds = time.perf_counter() - start
                if a.new_prefix:
                    live[a.prefix_key] = SharedPrefix(list(a.prefix_key))
                    self.stats.prefill_tokens += len(a.prefix_key)
                elif a.prefix_key is not None:  # another member computed it
                    result.cached_prefix_tokens = len(a.prefix_key)
                prefix = live[a.prefix_key] if a.prefix_key is not None else None
                cache.reset(a.slot, prefix)
                if self.proposer is not None:
                    self.proposer.admit(a.slot, prefix)
                row = _Row(req, a.slot, a.index, torch.Generator().manual_seed(req.sampling.seed), result)
                active[a.slot] = row
                admitted.append(row)
            if admitted:
                self._prefill(cache, admitted)
                live_bytes = sum(p.nbytes(self.model) for p in live.values())
                self.stats.peak_kv_bytes = max(self.stats.peak_kv_bytes, cache.nbytes + live_bytes)
                for row in admitted:
                    if row.done:
                        finish(row)
            if active:
                for row in self._decode_step(cache, sorted(active.values(), key=lambda r: r.slot), scheduler):
                    finish(row)
        return results  # type: ignore[return-value]

    def _prefix_keys(self, requests: list[GenerationRequest]) -> list[tuple[int, ...] | None]:
        """Each request's shared prefix tokens, or None: a prefix only one request of this run
        carries is not shared, nor is any where the model cannot read a prefix through cascade attention."""
        keys = [tuple(r.prompt_ids[: r.prefix_len]) if r.prefix_len else None for r in requests]
        counts = Counter(keys)
        if not any(keys) or not supports_cascade(self.model):
            return [None] * len(requests)
        return [k if k is not None and counts[k] > 1 else None for k in keys]

    def _target(self, run) -> torch.Tensor:
        t0 = time.perf_counter()
        logits = run()
        self.stats.target_forwards += 1
        self.stats.target_seconds += time.perf_counter() - t0
        return logits

    def _prefill(self, cache: SlotKVCache, rows: list[_Row]) -> None:
        slots = [r.slot for r in rows]
        # New groups' shared prefixes first, in a forward of their own (the policy sees each
        # forward's size and cost; forward_slots would otherwise compute them inside the next).
        new = {id(p): p for p in (cache.prefixes[s] for s in slots) if p is not None and self.model not in p.kv}
        if new:
            t0 = time.perf_counter()
            self._target(lambda: prefill_prefixes(self.model, list(new.values())))
            if self.policy is not None:
                self.policy.prefilled(len(new) * max(len(p) for p in new.values()), time.perf_counter() - t0)
        t0 = time.perf_counter()
        suffixes = [r.request.prompt_ids[cache.offset(r.slot) :] for r in rows]
        logits = self._target(lambda: last_logits(self.model, cache, slots, suffixes))
        self.stats.prefill_tokens += sum(len(p) for p in suffixes)
        sampling = RowSampling([r.request.sampling for r in rows], [r.generator for r in rows], self.device)
        chosen = next_tokens(logits, sampling).tolist()
        elapsed = time.perf_counter() - t0
        if self.policy is not None:
            self.policy.prefilled(forward_size(self.model, [len(p) for p in suffixes], max(len(p) for p in suffixes)), elapsed)
        for r, token in zip(rows, chosen):
            r.result.target_steps += 1
            r.result.target_seconds += elapsed
            r.result.prefill_seconds = elapsed
            r.prefilled_at = time.perf_counter()
            self._emit(r, [token])

    def _row_sampling(self, rows: list[_Row]) -> RowSampling:
        """The rows' sampling settings as tensors, rebuilt only when the batch's rows change."""
        key = [(r.slot, r.index) for r in rows]
        if self._sampling is None or self._sampling[0] != key:
            self._sampling = (key, RowSampling([r.request.sampling for r in rows], [r.generator for r in rows], self.device))
        return self._sampling[1]

    def _decode_step(self, cache: SlotKVCache, rows: list[_Row], scheduler: Scheduler) -> list[_Row]:
        step_start = time.perf_counter()
        sampling = self._row_sampling(rows)
        slots = [r.slot for r in rows]
        seq_lens = [len(r.request.prompt_ids) + len(r.tokens) for r in rows]
        choice = None
        if self.policy is not None:
            choice = self.policy.choose(len(rows), _View(cache, rows, seq_lens, scheduler))
        k = choice.k if choice is not None else 0
        wanted = list(choice.rows) if choice is not None and choice.rows is not None else [k] * len(rows)
        # Never draft past a row's token limit or the model's context: the bonus token counts too.
        ks = [max(0, min(w, r.remaining - 1, self.max_positions - n - 1)) for w, r, n in zip(wanted, rows, seq_lens)]
        draft, draft_seconds = None, 0.0
        seqs = [r.seq for r in rows] if any(ks) else []
        if seqs and choice.probe and not self.proposer.would_verify(choice.arm, slots, seqs):
            # A probe learns what the arm yields; one with nothing to verify (a lookahead window
            # with no candidate: 9-10 ms for one token against plain's 5.4 at batch 1) learns nothing.
            ks = [0] * len(rows)
        if any(ks):
            before = self.proposer.seconds
            draft = self.proposer.propose(choice.arm, slots, seqs, ks, sampling)
            draft_seconds = self.proposer.seconds - before
        num_draft = draft.num_draft if draft is not None else [0] * len(rows)
        tree = draft.tree if draft is not None else None
        drafts = draft.tokens.tolist() if draft is not None else [[] for _ in rows]
        chunk = [tree.num_tokens[b] if tree else num_draft[b] for b in range(len(rows))]
        # The step is the arm's wherever its proposer wrote into the forward: drafts, or a
        # lookahead window with no candidate yet (wider than a plain step, and paid for as the
        # arm's). A lookup that found nothing leaves a plain step.
        source = draft.source if draft is not None and any(chunk) else "ar"
        inputs = [[r.tokens[-1]] + drafts[b][: chunk[b]] for b, r in enumerate(rows)]
        ids, _ = pad_right(inputs, self.device)
        num_real, width = [len(x) for x in inputs], ids.shape[1]
        layout = None
        if tree is not None:  # several candidates and riders, each placed and masked as the tree says
            layout = (torch.nn.functional.pad(tree.depth, (1, 0)), tree.chunk_visible())
        packed = packs(self.model, num_real, width, layout)
        t0 = time.perf_counter()
        logits = self._target(
            lambda: forward_slots(self.model, cache, slots, ids, None, num_real, layout, packed)
        )  # [batch, width, vocab]
        verdict = verify(logits, draft, sampling) if tree is None else verify_tree(logits, tree, sampling)
        target_seconds = time.perf_counter() - t0
        for b, r in enumerate(rows):
            accepted = verdict.num_accepted[b]
            if verdict.paths is not None:  # the accepted candidate's keys move behind the last token
                cache.keep(r.slot, verdict.paths[b])
                drafts[b] = [inputs[b][i] for i in verdict.paths[b]]
            cache.commit(r.slot, 1 + accepted)
            r.result.target_steps += 1
            r.result.target_seconds += target_seconds
            r.result.draft_seconds += draft_seconds
            r.result.drafted_tokens += num_draft[b]
            r.result.accepted_tokens += accepted
            if num_draft[b]:
                r.drafts[source] = record_drafts(r.drafts.get(source, (0.0, 0.0)), num_draft[b], accepted)
            emitted = self._emit(r, drafts[b][:accepted] + [verdict.next_token[b]])
            if self.proposer is not None:
                r.result.steps.append(StepRecord(len(r.result.steps), wanted[b], num_draft[b], accepted, emitted, source))
        shadows = self._shadows(rows, source, num_draft) if self._shadow_arms else {}
        seconds = time.perf_counter() - step_start
        self._decode_seconds += seconds
        plain = self._step_cost[1]
        if source == "ar":  # what a plain step costs now, for the scheduler's weighing of empty slots
            plain = seconds if not plain else 0.8 * plain + 0.2 * seconds
        self._step_cost = (seconds, plain)
        if self.proposer is not None:
            self.proposer.accepted(slots, seq_lens, verdict.num_accepted, logits)
            self.policy.observe(
                StepMeasurement(
                    arm=source,
                    k=k,
                    num_draft=num_draft,
                    num_accepted=verdict.num_accepted,
                    target_tokens=sum(num_real) if packed else len(rows) * width,
                    target_seconds=target_seconds,
                    propose_seconds=draft_seconds,
                    draft_forwards=self.proposer.last_forwards if draft is not None else [],
                    step_seconds=time.perf_counter() - step_start,
                    shadows=shadows,
                )
            )
        return [r for r in rows if r.done]

    def _shadows(self, rows: list[_Row], source: str, num_draft: list[int]) -> dict[str, tuple[int, int]]:
        """Score the rows' pending shadow drafts against what they emitted, and give rows without
        one a new one (within SHADOW_BUDGET). A row that drafted with the arm this step has its
        real record instead. Returns arm -> (accepted drafts, first rejections) scored this step."""
        t0 = time.perf_counter()
        scored: dict[str, tuple[int, int]] = {}
        fresh = self._shadow_seconds <= SHADOW_BUDGET * self._decode_seconds
        for b, r in enumerate(rows):
            drafted = source if num_draft[b] else None  # the arm this row drafted with for real
            if r.shadow is not None and r.shadow[0] == drafted:
                r.shadow = None  # its record has the real drafts
            if r.shadow is not None:
                arm, at, draft, step = r.shadow
                emitted = r.tokens[at : at + len(draft)]
                matched = next((i for i, (d, t) in enumerate(zip(draft, emitted)) if d != t), len(emitted))
                if matched < len(emitted) or len(emitted) == len(draft) or r.done:
                    rejected = matched < len(emitted)
                    r.drafts[arm] = record_drafts(r.drafts.get(arm, (0.0, 0.0)), matched + rejected, matched)
                    if step < len(r.result.steps):  # the step it stands for ran (a row that stops has none after)
                        record = r.result.steps[step]
                        record.shadow_method, record.shadow_drafted, record.shadow_accepted = arm, len(draft), matched
                    accepted, rejections = scored.get(arm, (0, 0))
                    scored[arm] = (accepted + matched, rejections + rejected)
                    r.shadow = None
            if r.shadow is None and fresh and not r.done:
                for arm in self._shadow_arms:
                    if arm != drafted:
                        draft = self.proposer.shadow(arm, r.slot, r.seq, min(self._shadow_k, r.remaining))
                        if draft:
                            r.shadow = (arm, len(r.tokens), draft, len(r.result.steps))
                            break
        self._shadow_seconds += time.perf_counter() - t0
        return scored

    def _emit(self, row: _Row, tokens: list[int]) -> int:
        """Append tokens to a row up to a stop (EOS, not emitted; the token limit; the context end).
        Returns how many were appended."""
        emitted = 0
        for token in tokens:
            if token in self.eos:
                row.done, row.result.finish_reason = True, "stop"
                break
            row.tokens.append(token)
            emitted += 1
            context_full = len(row.request.prompt_ids) + len(row.tokens) >= self.max_positions
            if row.remaining <= 0 or context_full:
                row.done, row.result.finish_reason = True, "length"
                break
        return emitted
