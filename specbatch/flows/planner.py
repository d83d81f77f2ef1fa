"""Plan a job on the cluster. The driver streams the input in bounded batches to planning tasks
and keeps only counts, id hashes and shard descriptions; requests never gather in one process.

    read_batches (driver, streaming) --> prepare tasks: parse, tokenize, bucket -> plan/stage/NNNNNN.parquet (a row group per bucket)
    duplicates over the id hashes (driver)
    one task per bucket: order, group, pack -> plan/shards/BBB.parquet, a row group per shard
    plan/shards.parquet + manifest/plan.json (written last: the plan is complete)

Everything lands in the output folder, so on a cluster with shared storage any node can run any
task and the workers read their shards from there. Without Ray (tests, tools) the same tasks run
in this process, one after another.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import heapq
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..config import RunConfig
from ..storage import OutputDir
from ..storage.output import PLAN
from ..storage.schema import ERRORS
from ..workers.shard import REQUEST_SCHEMA, ShardRef, requests_table
from .inputs import InputError, RawBatch, open_source, parse_batch, read_batches
from .planning import duplicates, num_buckets, plan_bucket, prepare

log = logging.getLogger("specbatch")
SHARDS_FILE = "plan/shards.parquet"
LOCAL_PLAN_BYTES = 16 << 20  # smaller inputs are planned in this process: a Ray task's start costs more
SHARD_SCHEMA = pa.schema(
    [
        ("shard_id", pa.string()),
        ("path", pa.string()),
        ("row_group", pa.int32()),
        ("num_requests", pa.int64()),
        ("prompt_tokens", pa.int64()),
        ("prefill_tokens", pa.int64()),
    ]
)


@dataclass
class Plan:
    shards: list[ShardRef]
    num_input_rows: int
    num_errors: int
    error_files: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def num_requests(self) -> int:
        return sum(s.num_requests for s in self.shards)

    def summary(self) -> dict:
        prompt = sum(s.prompt_tokens for s in self.shards)
        prefill = sum(s.prefill_tokens for s in self.shards)
        return {
            "input_rows": self.num_input_rows,
            "error_rows": self.num_errors,
            "requests": self.num_requests,
            "shards": len(self.shards),
            "prompt_tokens": prompt,
            "prefill_tokens": prefill,
            "prefix_sharing_saves": round(1 - prefill / prompt, 4) if prompt else 0.0,
            "planning_seconds": round(self.seconds, 2),
        }


def errors_table(errors: list[InputError]) -> pa.Table:
    return pa.Table.from_pylist(
        [{"request_id": e.request_id, "input_index": e.input_index, "stage": e.stage, "reason": e.reason} for e in errors],
        schema=ERRORS,
    )


@functools.lru_cache(maxsize=4)
def _tokenizer(model: str, trust_remote_code: bool):
    from ..workers.models import load_tokenizer

    return load_tokenizer(model, trust_remote_code)


@contextlib.contextmanager
def gc_paused():
    """A batch makes a few million small objects (token ids) that live exactly as long as the call:
    the collector, triggered every few hundred allocations, would scan them again and again."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


@gc_paused()
def prepare_batch(
    batch: RawBatch, number: int, config: RunConfig, context: int, buckets: int, out: OutputDir, tokenizer=None
) -> dict:
    """Stage 1 over one batch; its requests go to stage files, its errors to an errors file."""
    rows, errors = parse_batch(batch, config.prompt_column, config.id_column)
    prepared = prepare(
        rows,
        errors,
        tokenizer or _tokenizer(config.model, config.trust_remote_code),
        context,
        config.max_new_tokens,
        config.seed,
        config.n,
        buckets,
        config.verify,
    )
    buckets = sorted(prepared.buckets)
    if buckets:  # one scratch file per batch, a row group per bucket
        tables = [requests_table(prepared.buckets[b]) for b in buckets]
        out.write_row_groups(tables, f"plan/stage/{number:06d}.parquet", durable=False)
    error_file = None
    if prepared.errors:
        error_file = f"errors/plan-{number:06d}.parquet"
        out.write_table(errors_table(prepared.errors), error_file)
    return {
        "rows": len(rows) + len(errors),
        "errors": len(prepared.errors),
        "error_file": error_file,
        "ids": prepared.ids,
        "verify": prepared.verify,
        "parts": {b: (f"plan/stage/{number:06d}.parquet", k) for k, b in enumerate(buckets)},
    }


@gc_paused()
def plan_one_bucket(
    bucket: int,
    parts: list[tuple[str, int]],
    config: RunConfig,
    out: OutputDir,
    drop: dict[int, int],
    verify: set[tuple[str, int]],
) -> dict:
    """Stage 2 over one bucket (its row groups in the scratch files): its shards' requests (one
    file, a row group each), and their descriptions."""
    table = pa.concat_tables([out.read_row_group(f, k) for f, k in parts]).cast(REQUEST_SCHEMA)
    shards, prefill, errors = plan_bucket(table, config.shard_size, config.prefix_sharing, drop, verify)
    path = f"plan/shards/{bucket:03d}.parquet"
    if shards:
        out.write_row_groups(shards, path)
    described = [
        (path, k, shard.num_rows, pc.sum(pc.list_value_length(shard["prompt_ids"])).as_py() or 0, tokens)
        for k, (shard, tokens) in enumerate(zip(shards, prefill))
    ]
    error_file = None
    if errors:
        error_file = f"errors/plan-duplicates-{bucket:03d}.parquet"
        out.write_table(errors_table(errors), error_file)
    return {"bucket": bucket, "shards": described, "errors": len(errors), "error_file": error_file}


def _tasks(fn: Callable, calls: Iterable[tuple], use_ray: bool, max_in_flight: int) -> Iterator:
    """fn(*args) for each args, on Ray tasks (at most max_in_flight at once) or here; results as they finish."""
    if not use_ray:
        for args in calls:
            yield fn(*args)
        return
    import ray

    remote = ray.remote(num_cpus=1, max_retries=2)(fn)
    in_flight = []
    for args in calls:
        if len(in_flight) >= max_in_flight:
            done, in_flight = ray.wait(in_flight, num_returns=1)
            yield ray.get(done[0])
        in_flight.append(remote.remote(*args))
    while in_flight:
        done, in_flight = ray.wait(in_flight, num_returns=1)
        yield ray.get(done[0])


def on_cluster(source) -> bool:
    """Whether plan_job plans this input on Ray by default."""
    return source.num_bytes > LOCAL_PLAN_BYTES


def plan_job(config: RunConfig, context: int, out: OutputDir, use_ray: bool | None = None, tokenizer=None) -> Plan:
    """Plan the whole input into out; returns the shard descriptions. use_ray: plan on the
    cluster (default: for inputs over LOCAL_PLAN_BYTES); tokenizer: instead of the model's."""
    t0 = time.perf_counter()
    source = open_source(config.input, config.input_files)
    buckets = num_buckets(source.num_bytes)
    if use_ray is None:
        use_ray = on_cluster(source)
    in_flight = 2
    if use_ray:
        import ray

        in_flight = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
    for folder in ("plan/stage", "plan/shards"):
        out.delete(folder)
    wanted = [config.prompt_column] if config.prompt_column else ["prompt", "messages"]
    batches = read_batches(source, wanted + [config.id_column, "max_new_tokens"])
    calls = ((batch, i, config, context, buckets, out, tokenizer) for i, batch in enumerate(batches))
    rows = errors = 0
    error_files, ids, verify, parts = [], [], [], {}
    for i, result in enumerate(_tasks(prepare_batch, calls, use_ray, in_flight)):
        rows += result["rows"]
        errors += result["errors"]
        error_files += [result["error_file"]] if result["error_file"] else []
        ids.append(result["ids"])
        # the first candidates in verify order; a few spare, for those that turn out duplicates
        verify = heapq.nsmallest(config.verify + 64, verify + result["verify"]) if config.verify else []
        for bucket, part in result["parts"].items():
            parts.setdefault(bucket, []).append(part)
        if (i + 1) % 50 == 0:
            log.info("planning: %d rows read, %d rejected", rows, errors)
    log.info("planning: %d rows read and tokenized in %.1fs; grouping %d buckets", rows, time.perf_counter() - t0, len(parts))
    drop = duplicates(np.concatenate(ids) if ids else np.zeros((0, 2), np.int64))
    chosen = {(rid, sample) for _, index, rid, sample in [v for v in verify if v[1] not in drop][: config.verify]}
    calls = ((b, sorted(parts[b]), config, out, drop, chosen) for b in sorted(parts))
    planned = sorted(_tasks(plan_one_bucket, calls, use_ray, in_flight), key=lambda r: r["bucket"])
    shards = []
    for result in planned:
        errors += result["errors"]
        error_files += [result["error_file"]] if result["error_file"] else []
        for path, row_group, n, prompt, prefill in result["shards"]:
            shards.append(ShardRef(f"shard-{len(shards):05d}", path, row_group, n, prompt, prefill))
    plan = Plan(shards, rows, errors, sorted(error_files), time.perf_counter() - t0)
    out.write_table(pa.Table.from_pylist([s.__dict__ for s in shards], schema=SHARD_SCHEMA), SHARDS_FILE)
    out.write_unit(PLAN, {}, summary=plan.summary(), files={"errors": plan.error_files})
    out.delete("plan/stage")
    return plan


def load_plan(out: OutputDir) -> Plan | None:
    """The plan a previous invocation finished, or None."""
    entry = out.entry(PLAN)
    if entry is None:
        return None
    shards = [ShardRef(**row) for row in out.read_table(SHARDS_FILE).to_pylist()]
    s = entry["summary"]
    return Plan(shards, s["input_rows"], s["error_rows"], entry["files"].get("errors", []))
