"""The Parquet schemas of the output tables. Each table is a folder of Parquet files under the
output directory and a DuckDB view of the same name (see views.py); docs/schema.md documents them."""

from __future__ import annotations

import pyarrow as pa

GENERATIONS = pa.schema(
    [
        ("request_id", pa.string()),
        ("sample_index", pa.int32()),
        ("input_index", pa.int64()),  # 1-based line (JSONL) or row (Parquet) number in the input
        ("prompt", pa.string()),
        ("prompt_token_ids", pa.list_(pa.int32())),
        ("completion", pa.string()),
        ("completion_token_ids", pa.list_(pa.int32())),
        ("finish_reason", pa.string()),  # "stop" (EOS) or "length" (token limit / context end)
    ]
)

REQUESTS = pa.schema(
    [
        ("request_id", pa.string()),
        ("sample_index", pa.int32()),
        ("shard_id", pa.string()),
        ("method", pa.string()),
        ("prompt_tokens", pa.int32()),
        ("cached_prefix_tokens", pa.int32()),
        ("completion_tokens", pa.int32()),
        ("finish_reason", pa.string()),
        ("target_steps", pa.int32()),  # target forwards this request took part in, prefill included
        ("drafted_tokens", pa.int32()),
        ("accepted_tokens", pa.int32()),
        ("acceptance_rate", pa.float64()),  # accepted / drafted; null when nothing was drafted
        ("tokens_per_target_step", pa.float64()),
        ("queue_seconds", pa.float64()),
        ("prefill_seconds", pa.float64()),
        ("decode_seconds", pa.float64()),
        ("target_seconds", pa.float64()),  # wall time of the target forwards it took part in
        ("draft_seconds", pa.float64()),  # wall time of the draft forwards of its steps
        ("worker", pa.string()),
        ("attempt", pa.int32()),
    ]
)

STEPS = pa.schema(
    [
        ("request_id", pa.string()),
        ("sample_index", pa.int32()),
        ("step", pa.int32()),
        ("num_draft", pa.int32()),  # K chosen for this request in the step (rows of one step may differ)
        ("drafted", pa.int32()),
        ("accepted", pa.int32()),
        ("emitted", pa.int32()),
        ("method", pa.string()),  # what proposed: the run's method, or auto's choice; "ar" for a plain step (nothing drafted, no lookahead window)
        # where a method that can say what it would draft without running (n-gram) did not draft:
        # what it would have drafted here and had accepted (null where no shadow draft was scored)
        ("shadow_method", pa.string()),
        ("shadow_drafted", pa.int32()),
        ("shadow_accepted", pa.int32()),
    ]
)

ERRORS = pa.schema(
    [
        ("request_id", pa.string()),  # null when the row had no usable id
        ("input_index", pa.int64()),  # 1-based line (JSONL) or row (Parquet) number
        ("stage", pa.string()),  # "input", "tokenize" or "generate"
        ("reason", pa.string()),
    ]
)

VERIFICATION = pa.schema(
    [
        ("request_id", pa.string()),
        ("sample_index", pa.int32()),
        ("shard_id", pa.string()),
        ("method", pa.string()),
        ("status", pa.string()),  # "match", "mismatch", or "not_compared" (sampled: no token-by-token reference)
        ("reference", pa.string()),  # what the output was compared with: "transformers.generate (greedy)"
        ("completion_tokens", pa.int32()),  # the method's output
        ("reference_tokens", pa.int32()),  # the reference's output; null when not compared
        ("first_difference", pa.int32()),  # index of the first differing token; null unless a mismatch
        ("worker", pa.string()),
    ]
)

SHARDS = pa.schema(
    [
        ("shard_id", pa.string()),
        ("worker", pa.string()),
        ("node", pa.string()),  # the Ray node id it ran on
        ("attempt", pa.int32()),
        ("num_requests", pa.int32()),
        ("prompt_tokens", pa.int64()),
        ("prefill_tokens", pa.int64()),  # prompt tokens computed: shared prefixes once
        ("completion_tokens", pa.int64()),
        ("target_steps", pa.int64()),
        ("peak_kv_bytes", pa.int64()),
        ("seconds", pa.float64()),  # from the end of the worker's previous shard (or its call's start) to this one's end
        ("finished_at", pa.timestamp("us", tz="UTC")),
    ]
)
RUNS = pa.schema(
    [
        ("run_id", pa.string()),
        ("model", pa.string()),  # the resolved local path or hub id
        ("draft_model", pa.string()),
        ("method", pa.string()),
        ("config", pa.string()),  # JSON of every setting that shapes the outputs
        ("input_path", pa.string()),
        ("input_sha256", pa.string()),
        ("num_input_rows", pa.int64()),
        ("num_shards", pa.int32()),
        ("num_generations", pa.int64()),
        ("num_errors", pa.int64()),
        ("prompt_tokens", pa.int64()),  # prompt tokens of every generated request
        ("prefill_tokens", pa.int64()),  # of those, run through the target: a shared prefix counts once per shard
        ("peak_kv_bytes", pa.int64()),  # the target's KV cache at its largest, in any one shard
        ("verified_requests", pa.int64()),  # requests re-decoded by --verify (status match or mismatch)
        ("verification_mismatches", pa.int64()),  # of those, how many differ from the reference
        ("invocations", pa.int32()),  # how many times the run was started (resumes + 1)
        ("created_at", pa.timestamp("us", tz="UTC")),
        ("finished_at", pa.timestamp("us", tz="UTC")),
    ]
)

TABLES: dict[str, pa.Schema] = {
    "generations": GENERATIONS,
    "requests": REQUESTS,
    "steps": STEPS,
    "errors": ERRORS,
    "verification": VERIFICATION,
    "shards": SHARDS,
    "runs": RUNS,
}
