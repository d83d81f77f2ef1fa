"""The generation flow: plan shards, dispatch them to Ray workers, collect, finalize.

Resume: the output folder's run.json records the run's identity (model, method, sampling
settings, shard size, dtype and the input file's sha256). Running again over the same folder
with the same identity skips the shards the manifest lists as complete and retries the rest; a
different identity is refused with a message naming what changed (use a new --out).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import ray
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from ..decoding.architecture import UnsupportedModel, attention_layout
from ..decoding.methods import METHODS, applies
from ..errors import SpecbatchError
from ..storage import OutputDir, connect
from ..storage.output import PLAN
from ..storage.schema import ERRORS
from ..workers.config import WorkerConfig
from ..workers.models import (
    check_same_vocabulary,
    context_length,
    default_draft,
    load_config,
    load_tokenizer,
    resolve_dtype,
    resolve_model,
    skeleton,
)
from ..workers.pool import DispatchReport, WorkerPool
from .inputs import file_sha256, read_prompts
from .planning import Plan, plan_shards
from .progress import RunProgress


@dataclass(frozen=True)
class RunParams:
    """Every option of `specbatch run`; the flow's parameters are these."""

    input: str
    out: str
    model: str = "demo"
    method: str = "ar"
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    n: int = 1
    prefix_sharing: bool = True
    workers: int = 1
    shard_size: int = 64
    batch_size: int = 8
    device: str = "cpu"
    dtype: str = "auto"
    ray_address: str | None = None
    draft: str | None = None
    num_draft_tokens: int = 4
    draft_policy: str = "adaptive"
    verify: int = 0  # requests re-decoded by transformers' generate to check the method's output

    def resolved_draft(self) -> str | None:
        """The draft model: --draft, or the demo draft with the demo target; auto uses it where there is one."""
        if self.method not in METHODS or not METHODS[self.method].uses_draft:
            return None
        return resolve_model(self.draft) if self.draft else default_draft(resolve_model(self.model))

    def worker_config(self) -> WorkerConfig:
        return WorkerConfig(
            model=resolve_model(self.model),
            draft=self.resolved_draft(),
            num_draft_tokens=self.num_draft_tokens,
            draft_policy=self.draft_policy,
            method=self.method,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            batch_size=self.batch_size,
            device=self.device,
            dtype=self.dtype,
        )

    def identity(self) -> dict:
        """What shapes the outputs: a resumed run must match it exactly."""
        draft = {}
        if self.method != "ar":
            draft = {"num_draft_tokens": self.num_draft_tokens, "draft_policy": self.draft_policy}
        if self.resolved_draft() is not None:
            draft["draft"] = self.resolved_draft()
        return draft | {
            "model": resolve_model(self.model),
            "method": self.method,
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "seed": self.seed,
            "n": self.n,
            "prefix_sharing": self.prefix_sharing,  # changes how requests are packed into shards
            "shard_size": self.shard_size,
            "dtype": str(resolve_dtype(self.dtype, self.device)).removeprefix("torch."),
            "input_sha256": file_sha256(Path(self.input)),
        }


def check_run(params: RunParams) -> dict:
    """Validate what can be checked cheaply, before any worker starts. Returns run.json's content."""
    if not Path(params.input).is_file():
        raise SpecbatchError(f"input file {params.input!r} does not exist")
    if params.n < 1:
        raise SpecbatchError(f"--n (samples per prompt) must be >= 1, got {params.n}")
    if params.verify < 0:
        raise SpecbatchError(f"--verify (requests to re-decode) must be >= 0, got {params.verify}")
    try:
        config = params.worker_config()
    except ValueError as e:
        raise SpecbatchError(str(e)) from e
    model_config = load_config(config.model)
    try:  # attention variants the engine cannot reproduce exactly are refused here, from the config
        attention_layout(model_config)
    except UnsupportedModel as e:
        raise SpecbatchError(str(e)) from e
    target = skeleton(model_config)
    if target is not None and (reason := applies(METHODS[params.method], target, config.draft)) is not None:
        raise SpecbatchError(
            f"--method {params.method} does not apply to model {params.model!r}: {reason}; "
            f"use another --method ({', '.join(m for m in METHODS if m != params.method)})"
        )
    if config.draft is not None:
        check_same_vocabulary(config.model, config.draft)
    identity = params.identity()
    existing = OutputDir(params.out).read_run()
    if existing is None:
        return {
            "run_id": uuid.uuid4().hex[:12],
            "identity": identity,
            "created_at": _now().isoformat(),
            "invocations": 0,
        }
    if existing["identity"] != identity:
        changed = ", ".join(
            f"{k} ({existing['identity'].get(k)!r} -> {v!r})" if k != "input_sha256" else "the input file's content"
            for k, v in identity.items()
            if existing["identity"].get(k) != v
        )
        raise SpecbatchError(
            f"{params.out} holds run {existing['run_id']} made with other settings: {changed}; "
            "use a new --out (or delete that folder) to start a new run"
        )
    return existing


@task(cache_policy=NO_CACHE)
def plan(params: RunParams) -> Plan:
    rows, input_errors = read_prompts(params.input)
    model = resolve_model(params.model)
    tokenizer = load_tokenizer(model)
    result = plan_shards(
        rows,
        input_errors,
        tokenizer,
        context_length(load_config(model)),
        params.max_new_tokens,
        params.shard_size,
        params.seed,
        num_samples=params.n,
        share_prefixes=params.prefix_sharing,
        verify=params.verify,
    )
    get_run_logger().info(
        "planned %d requests in %d shards; %d rows rejected",
        result.num_requests,
        len(result.shards),
        len(result.errors),
    )
    return result


@task(cache_policy=NO_CACHE)
def dispatch(plan: Plan, params: RunParams, out: OutputDir) -> tuple[DispatchReport, float]:
    todo = [s for s in plan.shards if not out.is_complete(s.shard_id)]
    skipped = len(plan.shards) - len(todo)
    if skipped:
        get_run_logger().info("resuming: %d of %d shards already complete", skipped, len(plan.shards))
    if not todo:
        return DispatchReport(), 0.0
    started_ray = not ray.is_initialized()
    if started_ray:
        if params.ray_address:
            ray.init(address=params.ray_address, logging_level=logging.WARNING)
        else:
            ray.init(include_dashboard=False, logging_level=logging.WARNING, object_store_memory=256 * 1024**2)
    t0 = time.perf_counter()
    pool = WorkerPool(params.worker_config(), min(params.workers, len(todo)))
    try:
        done_before = plan.num_requests - sum(len(s.requests) for s in todo)
        with RunProgress(plan.num_requests, done_before, "generating") as progress:
            report = pool.run(todo, out, on_progress=progress.update)
    finally:
        pool.shutdown()
        if started_ray:
            ray.shutdown()
    return report, time.perf_counter() - t0


@task(cache_policy=NO_CACHE)
def finalize(params: RunParams, run: dict, plan: Plan, report: DispatchReport, seconds: float, out: OutputDir) -> dict:
    con = connect(out.root)
    generated, tokens = con.execute("select count(*), coalesce(sum(completion_tokens), 0) from requests").fetchone()
    (errors,) = con.execute("select count(*) from errors").fetchone()
    new_tokens = sum(s.completion_tokens for s in report.summaries)
    shards = [e["summary"] for e in out.manifest() if e["unit"] != PLAN and not e["summary"].get("failed")]
    prompt_tokens = sum(s.get("prompt_tokens", 0) for s in shards)
    prefill_tokens = sum(s.get("prefill_tokens", 0) for s in shards)
    verified, mismatched = verification_summary(con)
    out.write_runs(
        {
            "run_id": run["run_id"],
            "model": run["identity"]["model"],
            "draft_model": run["identity"].get("draft"),
            "method": params.method,
            "config": json.dumps(asdict(params) | {"identity": run["identity"]}, sort_keys=True),
            "input_path": str(Path(params.input).resolve()),
            "input_sha256": run["identity"]["input_sha256"],
            "num_input_rows": plan.num_input_rows,
            "num_shards": len(plan.shards),
            "num_generations": generated,
            "num_errors": errors,
            "prompt_tokens": prompt_tokens,
            "prefill_tokens": prefill_tokens,
            "peak_kv_bytes": max((s.get("peak_kv_bytes", 0) for s in shards), default=0),
            "verified_requests": verified,
            "verification_mismatches": len(mismatched),
            "invocations": run["invocations"],
            "created_at": datetime.fromisoformat(run["created_at"]),
            "finished_at": _now(),
        }
    )
    summary = {
        "run_id": run["run_id"],
        "out": str(out.root),
        "input_rows": plan.num_input_rows,
        "generations": generated,
        "errors": errors,
        "shards": len(plan.shards),
        "shards_run_now": len(report.summaries),
        "failed_shards": len(report.failed_shards),
        "retries": report.retries,
        "completion_tokens": tokens,
        "prefill_tokens_computed": f"{prefill_tokens} of {prompt_tokens} prompt tokens",
        "seconds_this_invocation": round(seconds, 2),
        "tokens_per_second_this_invocation": round(new_tokens / seconds, 1) if seconds else None,
    }
    if params.verify:
        (not_compared,) = con.execute("select count(*) from verification where status = 'not_compared'").fetchone()
        summary["verified"] = f"{verified - len(mismatched)} of {verified} match plain greedy decoding" + (
            f"; {not_compared} sampled, not compared token by token" if not_compared else ""
        )
        if mismatched:
            summary["verification_mismatches"] = mismatched
            logging.getLogger("specbatch").warning(
                "--verify: %d of %d re-decoded requests differ from transformers' greedy generate: %s "
                "(see the verification table)",
                len(mismatched),
                verified,
                ", ".join(mismatched[:10]),
            )
    create_table_artifact(
        table=[{"metric": k, "value": str(v)} for k, v in summary.items()],
        key="specbatch-run-summary",
        description=f"specbatch run {run['run_id']} into {out.root}",
    )
    return summary


@flow(name="specbatch-generate", log_prints=True)
def generate(
    input: str,
    out: str,
    model: str = "demo",
    method: str = "ar",
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    n: int = 1,
    prefix_sharing: bool = True,
    workers: int = 1,
    shard_size: int = 64,
    batch_size: int = 8,
    device: str = "cpu",
    dtype: str = "auto",
    ray_address: str | None = None,
    draft: str | None = None,
    num_draft_tokens: int = 4,
    draft_policy: str = "adaptive",
    verify: int = 0,
) -> dict:
    """Generate completions for every row of `input` into the folder `out`."""
    params = RunParams(**locals())  # the flow parameters are exactly RunParams' fields
    run = check_run(params)
    run["invocations"] += 1
    output = OutputDir(out)
    output.root.mkdir(parents=True, exist_ok=True)
    output.clean()
    output.write_run(run)
    the_plan = plan(params)
    output.write_unit("plan", {"errors": _errors_table(the_plan)})
    report, seconds = dispatch(the_plan, params, output)
    return finalize(params, run, the_plan, report, seconds, output)


def verification_summary(con) -> tuple[int, list[str]]:
    """(requests compared token by token, ids of those that differed)."""
    rows = con.execute(
        "select request_id || '#' || sample_index, status from verification "
        "where status in ('match', 'mismatch') order by request_id, sample_index"
    ).fetchall()
    return len(rows), [key for key, status in rows if status == "mismatch"]


def _errors_table(plan: Plan) -> pa.Table:
    return pa.Table.from_pylist(
        [
            {"request_id": e.request_id, "input_index": e.input_index, "stage": e.stage, "reason": e.reason}
            for e in plan.errors
        ],
        schema=ERRORS,
    )


def _now() -> datetime:
    return datetime.now(UTC)
