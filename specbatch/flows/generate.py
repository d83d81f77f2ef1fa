"""The generation flow: plan shards on the cluster, dispatch them to Ray workers, collect, finalize.

The flow's one parameter is the run's RunConfig (config.py), checked before anything starts.

Resume: the output folder's run.json records the run's identity (model, method, sampling
settings, shard size, dtype and a fingerprint of the input's files). Running again over the same
folder with the same identity reuses the finished plan, skips the shards the manifest lists as
complete and retries the rest; a different identity is refused with a message naming what
changed (use a new --out).
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import ray
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from ..config import RunConfig
from ..decoding.architecture import UnsupportedModel, attention_layout
from ..decoding.methods import METHODS, applies
from ..errors import SpecbatchError
from ..storage import OutputDir, connect
from ..storage.output import PLAN
from ..workers.models import check_same_vocabulary, context_length, load_config, resolve_dtype, skeleton
from ..workers.pool import DispatchReport, WorkerPool
from .inputs import InputSource, open_source
from .planner import Plan, load_plan, on_cluster, plan_job
from .progress import RunProgress


def identity(config: RunConfig, source: InputSource) -> dict:
    """What shapes the outputs: a resumed run must match it exactly. config: resolved."""
    draft = {}
    if config.method != "ar":
        draft = {"num_draft_tokens": config.num_draft_tokens, "draft_policy": config.draft_policy}
    if config.draft is not None:
        draft["draft"] = config.draft
    return draft | {
        "model": config.model,
        "method": config.method,
        "max_new_tokens": config.max_new_tokens,
        "temperature": config.temperature,
        "top_p": config.top_p,
        "top_k": config.top_k,
        "seed": config.seed,
        "n": config.n,
        "prefix_sharing": config.prefix_sharing,  # changes how requests are packed into shards
        "shard_size": config.shard_size,
        "prompt_column": config.prompt_column,
        "id_column": config.id_column,
        "dtype": str(resolve_dtype(config.dtype, config.device)).removeprefix("torch."),
        "input_sha256": fingerprint(source),
    }


def fingerprint(source: InputSource) -> str:
    """The input's content hash, computed once per process for files that have not changed."""
    key = (source.uri, tuple((f.path, f.size, f.mtime_ns) for f in source.files))
    if key not in _FINGERPRINTS:
        _FINGERPRINTS[key] = source.fingerprint()
    return _FINGERPRINTS[key]


_FINGERPRINTS: dict[tuple, str] = {}


def check_model(config: RunConfig) -> RunConfig:
    """Refuse models and methods the engine cannot run exactly, from the config alone (no weights).
    Returns the config with the model and draft resolved."""
    resolved = config.resolved()
    model_config = load_config(resolved.model, resolved.trust_remote_code)
    try:  # attention variants the engine cannot reproduce exactly are refused here, from the config
        attention_layout(model_config)
    except UnsupportedModel as e:
        raise SpecbatchError(str(e)) from e
    target = skeleton(model_config)
    if target is not None and (reason := applies(METHODS[config.method], target, resolved.draft)) is not None:
        raise SpecbatchError(
            f"--method {config.method} does not apply to model {config.model!r}: {reason}; "
            f"use another --method ({', '.join(m for m in METHODS if m != config.method)})"
        )
    if resolved.draft is not None:
        check_same_vocabulary(resolved.model, resolved.draft, resolved.trust_remote_code)
    return resolved


def check_run(config: RunConfig) -> dict:
    """Validate what can be checked cheaply, before any worker starts. Returns run.json's content."""
    source = open_source(config.input, config.input_files)
    resolved = check_model(config)
    ident = identity(resolved, source)
    existing = OutputDir(config.out).read_run()
    if existing is None:
        return {
            "run_id": uuid.uuid4().hex[:12],
            "identity": ident,
            "created_at": _now().isoformat(),
            "invocations": 0,
        }
    # A setting an older run did not record reads as its default (None), so upgrading mid-job resumes.
    different = [k for k, v in ident.items() if existing["identity"].get(k) != v]
    if different:
        changed = ", ".join(
            f"{k} ({existing['identity'].get(k)!r} -> {ident[k]!r})" if k != "input_sha256" else "the input files' content"
            for k in different
        )
        raise SpecbatchError(
            f"{config.out} holds run {existing['run_id']} made with other settings: {changed}; "
            "use a new --out (or delete that folder) to start a new run"
        )
    return existing


@contextlib.contextmanager
def ray_connection(address: str | None):
    """Join the cluster at address, or start a local one; shut down only what was started here."""
    started = not ray.is_initialized()
    if started:
        if address:
            ray.init(address=address, logging_level=logging.WARNING)
        else:
            # "local": a new instance of our own, even where another one runs on this machine
            ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING, object_store_memory=256 * 1024**2)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


@task(cache_policy=NO_CACHE)
def plan(config: RunConfig, out: OutputDir) -> Plan:
    """The finished plan of an earlier invocation, or a new one made on the cluster."""
    existing = load_plan(out)
    if existing is not None:
        get_run_logger().info("resuming: the plan of %d shards is already made", len(existing.shards))
        return existing
    result = plan_job(config, context_length(load_config(config.model, config.trust_remote_code)), out)
    get_run_logger().info(
        "planned %d requests in %d shards in %.1fs; %d rows rejected",
        result.num_requests,
        len(result.shards),
        result.seconds,
        result.num_errors,
    )
    return result


def dry_run(config: RunConfig) -> dict:
    """`specbatch plan`: plan into a temporary folder and describe the plan; no model weights, no workers."""
    source = open_source(config.input, config.input_files)
    resolved = config.resolved()
    cluster = ray_connection(config.ray_address) if on_cluster(source) else contextlib.nullcontext()
    with tempfile.TemporaryDirectory(prefix="specbatch-plan-") as folder, cluster:
        result = plan_job(resolved, context_length(load_config(resolved.model, resolved.trust_remote_code)), OutputDir(folder))
    return {"input": config.input, "files": len(source.files), "input_bytes": source.num_bytes} | result.summary()


@task(cache_policy=NO_CACHE)
def dispatch(plan: Plan, config: RunConfig, out: OutputDir, pool: WorkerPool | None = None) -> tuple[DispatchReport, float]:
    """Run the shards not yet complete; pool: workers started earlier (shut down here either way)."""
    complete = out.complete_units()
    todo = [s for s in plan.shards if s.shard_id not in complete]
    skipped = len(plan.shards) - len(todo)
    if skipped:
        get_run_logger().info("resuming: %d of %d shards already complete", skipped, len(plan.shards))
    if not todo:
        if pool is not None:
            pool.shutdown()
        return DispatchReport(), 0.0
    t0 = time.perf_counter()
    if pool is None:
        pool = WorkerPool(config, min(config.workers, len(todo)))
    pool.shrink(len(todo))
    try:
        done_before = plan.num_requests - sum(s.num_requests for s in todo)
        with RunProgress(plan.num_requests, done_before, "generating") as progress:
            report = pool.run(todo, out, on_progress=progress.update)
    finally:
        pool.shutdown()
    return report, time.perf_counter() - t0


@task(cache_policy=NO_CACHE)
def finalize(config: RunConfig, run: dict, plan: Plan, report: DispatchReport, seconds: float, out: OutputDir) -> dict:
    con = connect(out.uri)
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
            "method": config.method,
            "config": config.model_dump_json(),
            "input_path": config.input if "://" in config.input else str(Path(config.input).resolve()),
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
        "out": out.uri,
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
        "workers": config.workers,
        "batch_size": config.batch_size,
    }
    if config.verify:
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
        description=f"specbatch run {run['run_id']} into {out.uri}",
    )
    return summary


@flow(name="specbatch-generate", log_prints=True)
def generate(config: RunConfig) -> dict:
    """Generate completions for every row of config.input into config.out."""
    run = check_run(config)
    run["invocations"] += 1
    config = config.resolved()
    output = OutputDir(config.out)
    output.make()
    output.clean()
    output.write_run(run)
    with ray_connection(config.ray_address):
        # Workers load their models while the driver plans, unless planning runs on the cluster's CPUs.
        pool = _take_early_workers(config)
        if pool is None and not on_cluster(open_source(config.input, config.input_files)):
            pool = WorkerPool(config, config.workers)
        try:
            the_plan = plan(config, output)
        except BaseException:
            if pool is not None:
                pool.shutdown()
            raise
        dispatched, seconds = dispatch(the_plan, config, output, pool)
    summary = finalize(config, run, the_plan, dispatched, seconds, output)
    summary["report"] = report_or_warn(output)
    return summary


def run(config: RunConfig) -> dict:
    """`specbatch run`: check the run, start Ray and the workers, then the flow. The workers load
    their models while Prefect's temporary server starts and the driver plans; the flow takes them."""
    check_run(config)  # fail fast, in one line, before Prefect and Ray start
    resolved = config.resolved()
    with ray_connection(config.ray_address):
        if not on_cluster(open_source(config.input, config.input_files)):
            _EARLY_WORKERS.append(WorkerPool(resolved, resolved.workers))
        try:
            return generate(config)
        finally:  # the flow failed before taking them
            while _EARLY_WORKERS:
                _EARLY_WORKERS.pop().shutdown()


_EARLY_WORKERS: list[WorkerPool] = []  # started by run() for the flow it calls


def _take_early_workers(config: RunConfig) -> WorkerPool | None:
    """The pool run() started for this config (resolved), if any."""
    for i, pool in enumerate(_EARLY_WORKERS):
        if pool.config == config:
            return _EARLY_WORKERS.pop(i)
    return None


def report_or_warn(out: OutputDir) -> str | None:
    """publish_report; the outputs are complete by then, so a report that cannot be drawn is a
    warning, not a failed run."""
    try:
        return publish_report(out)
    except Exception as e:
        logging.getLogger("specbatch").warning("no report written: %s (`specbatch report %s` retries it)", e, out.uri)
        return None


@task(cache_policy=NO_CACHE)
def publish_report(out: OutputDir) -> str:
    """The run's HTML report (and its PNGs) into OUT/report/, and a Prefect artifact pointing at it."""
    from ..report import write_report

    with tempfile.TemporaryDirectory(prefix="specbatch-report-") as folder:
        write_report([out.uri], Path(folder) / "report.html")
        for f in sorted(Path(folder).iterdir()):
            out.write_bytes(f.read_bytes(), f"report/{f.name}")
    where = Path(out.path("report/report.html")).as_uri() if out.local else f"{out.uri.rstrip('/')}/report/report.html"
    create_markdown_artifact(
        markdown=f"**specbatch report**: [{where}]({where})\n\nOpen it in a browser, or rebuild it with `specbatch report {out.uri}`.",
        key="specbatch-report",
        description="the run's HTML report",
    )
    return where


def verification_summary(con) -> tuple[int, list[str]]:
    """(requests compared token by token, ids of those that differed)."""
    rows = con.execute(
        "select request_id || '#' || sample_index, status from verification "
        "where status in ('match', 'mismatch') order by request_id, sample_index"
    ).fetchall()
    return len(rows), [key for key, status in rows if status == "mismatch"]


def _now() -> datetime:
    return datetime.now(UTC)
