"""Run the engine over a few shards at once and write each shard's tables as soon as its last
request finishes. One engine call over several shards keeps the batch full across shard
boundaries: a batch drains (rows finishing with nobody to take their slots) once per call, not
once per shard. Plain Python: the Ray actor wraps it, and tests drive it directly."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime

import pyarrow as pa

from ..config import RunConfig
from ..decoding import Engine, GenerationRequest, GenerationResult, SamplingParams
from ..decoding.host_memory import hold_freed_memory
from ..decoding.methods import make_speculation
from ..storage import OutputDir
from ..storage.schema import ERRORS, GENERATIONS, REQUESTS, SHARDS, STEPS, VERIFICATION
from .models import check_same_vocabulary, context_length, eos_token_ids, load_model, load_tokenizer, resolve_dtype
from .shard import Shard, ShardRequest
from .verify import verification_rows


@dataclass
class ShardSummary:
    shard_id: str
    num_requests: int
    num_errors: int
    prompt_tokens: int
    prefill_tokens: int  # prompt tokens computed: shared prefixes once
    peak_kv_bytes: int  # the target's KV cache at its largest
    completion_tokens: int
    target_steps: int
    seconds: float
    worker: str
    attempt: int
    node: str = ""  # the Ray node it ran on


class ShardRunner:
    def __init__(self, config: RunConfig, worker: str = "worker-0", node: str = "") -> None:
        self.config = config
        self.worker = worker
        self.node = node
        hold_freed_memory()  # a worker's steps reuse what the last one freed (decoding/host_memory.py)
        self.tokenizer = load_tokenizer(config.model, config.trust_remote_code)
        dtype = resolve_dtype(config.dtype, config.device)
        trust = {"trust_remote_code": config.trust_remote_code, "allow_pickle": config.allow_pickle_weights}
        self.model = load_model(config.model, config.device, dtype, **trust)
        draft = None
        if config.draft is not None:
            check_same_vocabulary(config.model, config.draft, config.trust_remote_code)
            draft = load_model(config.draft, config.device, dtype, **trust)
        # One proposer per worker: the n-gram table is shared by every request it serves.
        proposer, policy = make_speculation(
            config.method, self.model, draft, config.draft_policy, config.num_draft_tokens, config.draft_confidence
        )
        self.eos = eos_token_ids(self.model, self.tokenizer)
        self.engine = Engine(
            self.model,
            self.eos,
            max_batch_size=config.batch_size,
            proposer=proposer,
            policy=policy,
        )
        self.requests_done = 0
        self.tokens_done = 0

    def _engine_request(self, r: ShardRequest) -> GenerationRequest:
        c = self.config
        sampling = SamplingParams(temperature=c.temperature, top_p=c.top_p, top_k=c.top_k, seed=r.seed)
        return GenerationRequest(r.request_id, r.prompt_ids, r.max_new_tokens, sampling, r.sample_index, r.prefix_len)

    def _count(self, result: GenerationResult) -> None:
        self.requests_done += 1
        self.tokens_done += result.completion_tokens

    def run(self, shards: list[Shard], out: OutputDir, attempt: int = 1, on_result=None) -> list[ShardSummary]:
        """Run the shards' requests together; each shard is written when its last request is done."""
        owner, pending, results = {}, [], [{} for _ in shards]
        for i, shard in enumerate(shards):
            pending.append(len(shard.requests))
            for r in shard.requests:
                owner[r.request_id, r.sample_index] = i
        summaries: list[ShardSummary] = []
        last = time.perf_counter()

        def finished(result: GenerationResult) -> None:
            nonlocal last
            self._count(result)
            i = owner[result.request_id, result.sample_index]
            results[i][result.request_id, result.sample_index] = result
            pending[i] -= 1
            if not pending[i]:
                shard = shards[i]
                done = [results[i][r.request_id, r.sample_index] for r in shard.requests]
                summaries.append(self._write(shard, done, out, attempt, time.perf_counter() - last))
                last = time.perf_counter()
            if on_result is not None:
                on_result(result)

        requests = [self._engine_request(r) for shard in shards for r in shard.requests]
        self.engine.generate(requests, on_result=finished)
        return summaries

    def _write(
        self, shard: Shard, results: list[GenerationResult], out: OutputDir, attempt: int, seconds: float
    ) -> ShardSummary:
        texts = self.tokenizer.batch_decode([r.completion_ids for r in results], skip_special_tokens=True)
        tables = self.tables(shard, results, texts, attempt)
        verified = verification_rows(
            self.model,
            shard.requests,
            results,
            self.eos,
            context_length(self.model.config),
            greedy=self.config.temperature == 0,
            shard_id=shard.shard_id,
            method=self.config.method,
            worker=self.worker,
        )
        tables["verification"] = pa.Table.from_pylist(verified, schema=VERIFICATION)
        summary = ShardSummary(
            shard_id=shard.shard_id,
            num_requests=len(results),
            num_errors=0,
            prompt_tokens=sum(r.prompt_tokens for r in results),
            prefill_tokens=sum(r.prompt_tokens - r.cached_prefix_tokens for r in results),
            peak_kv_bytes=self.engine.stats.peak_kv_bytes,
            completion_tokens=sum(r.completion_tokens for r in results),
            target_steps=sum(r.target_steps for r in results),
            seconds=seconds,
            worker=self.worker,
            attempt=attempt,
            node=self.node,
        )
        row = {k: v for k, v in summary.__dict__.items() if k in SHARDS.names} | {"finished_at": datetime.now(UTC)}
        tables["shards"] = pa.Table.from_pylist([row], schema=SHARDS)
        out.write_unit(shard.shard_id, tables, summary=summary.__dict__)
        return summary

    def tables(
        self, shard: Shard, results: list[GenerationResult], texts: list[str], attempt: int
    ) -> dict[str, pa.Table]:
        generations, requests, steps = [], [], []
        for req, res, text in zip(shard.requests, results, texts):
            key = {"request_id": req.request_id, "sample_index": req.sample_index}
            generations.append(
                key
                | {
                    "input_index": req.input_index,
                    "prompt": req.prompt,
                    "prompt_token_ids": req.prompt_ids,
                    "completion": text,
                    "completion_token_ids": res.completion_ids,
                    "finish_reason": res.finish_reason,
                }
            )
            requests.append(
                key
                | {
                    "shard_id": shard.shard_id,
                    "method": self.config.method,
                    "prompt_tokens": res.prompt_tokens,
                    "cached_prefix_tokens": res.cached_prefix_tokens,
                    "completion_tokens": res.completion_tokens,
                    "finish_reason": res.finish_reason,
                    "target_steps": res.target_steps,
                    "drafted_tokens": res.drafted_tokens,
                    "accepted_tokens": res.accepted_tokens,
                    "acceptance_rate": res.accepted_tokens / res.drafted_tokens if res.drafted_tokens else None,
                    "tokens_per_target_step": res.completion_tokens / res.target_steps if res.target_steps else None,
                    "queue_seconds": res.queue_seconds,
                    "prefill_seconds": res.prefill_seconds,
                    "decode_seconds": res.decode_seconds,
                    "target_seconds": res.target_seconds,
                    "draft_seconds": res.draft_seconds,
                    "worker": self.worker,
                    "attempt": attempt,
                }
            )
            steps.extend(key | s.__dict__ for s in res.steps)
        return {
            "generations": pa.Table.from_pylist(generations, schema=GENERATIONS),
            "requests": pa.Table.from_pylist(requests, schema=REQUESTS),
            "steps": pa.Table.from_pylist(steps, schema=STEPS),
            "errors": ERRORS.empty_table(),
        }
