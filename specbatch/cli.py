"""The `specbatch` command: run, query, demo. Results go to stdout; logs and progress to stderr.
A user error prints one line (`error: ...`) and exits 2, without a traceback."""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
from pathlib import Path

from .decoding.methods import METHODS
from .errors import SpecbatchError

DEMO_PROMPTS = Path(__file__).resolve().parent / "data" / "demo_prompts.jsonl"

# Offline-friendly defaults, set before Prefect, Ray or transformers are imported.
_ENV_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "RAY_USAGE_STATS_ENABLED": "0",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_DISABLE_TELEMETRY": "1",
}


DEMO_DEFAULTS = {"max_new_tokens": 64, "shard_size": 16}


def _add_run_options(p: argparse.ArgumentParser, skip: tuple[str, ...] = ("input", "out")) -> None:
    """One option per RunConfig field (but those marked cli=False). Values go to RunConfig as
    given, which checks them all."""
    from typing import Literal, get_args, get_origin

    from .config import RunConfig, option

    for name, field in RunConfig.model_fields.items():
        if name in skip or (field.json_schema_extra or {}).get("cli") is False:
            continue
        if field.annotation is bool:  # a switch: --name turns on what is off by default, --no-name the reverse
            p.add_argument(
                option(name) if not field.default else "--no-" + option(name)[2:],
                dest=name,
                action="store_false" if field.default else "store_true",
                default=argparse.SUPPRESS,
                help=field.description,
            )
            continue
        literal = get_origin(field.annotation) is Literal
        choices = list(METHODS) if name == "method" else list(get_args(field.annotation)) if literal else None
        default = "" if field.default is None else f" (default: {field.default})"
        p.add_argument(
            option(name),
            dest=name,
            default=argparse.SUPPRESS,
            choices=choices,
            metavar="N" if name == "verify" else None,
            help=(field.description or "") + default,
        )


def run_config(args, **overrides):
    """The RunConfig of parsed arguments: the options given, over the command's defaults."""
    from .config import RunConfig

    given = {k: v for k, v in vars(args).items() if k in RunConfig.model_fields}
    return RunConfig.parse(**(getattr(args, "defaults", {}) | given | overrides))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="specbatch", description="Offline LLM generation with per-step metrics in SQL."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="generate completions for a prompt file (JSONL or Parquet)")
    run.add_argument(
        "input",
        help="prompts: JSONL rows {id, prompt | messages, max_new_tokens?} (plain, .gz, .zst) or Parquet; "
        "a file, folder or glob; a path or URI (s3://, gs://, hdfs://, file://)",
    )
    run.add_argument("--out", required=True, help="output folder or URI (rerun over it to resume)")
    _add_run_options(run)

    plan = sub.add_parser("plan", help="dry run: plan the job (read, tokenize, group, shard) and print what it holds")
    plan.add_argument("input", help="prompts, as for run")
    _add_run_options(plan, skip=("input", "out", "workers", "batch_size", "device", "ray_address"))

    query = sub.add_parser("query", help="run SQL over an output folder's views")
    query.add_argument("out", help="output folder")
    query.add_argument("sql", help='e.g. "select method, avg(completion_tokens) from requests group by 1"')
    query.add_argument("--format", choices=["table", "csv", "json"], default="table")

    deploy = sub.add_parser(
        "deploy",
        help="serve a scheduled incremental job on a Prefect server: each run takes the input files no run took before",
    )
    deploy.add_argument("name", help="the deployment's name")
    deploy.add_argument("input", help="a folder, glob or object-store prefix that grows")
    deploy.add_argument("--out", required=True, help="the job's root: each run writes a dated folder under it")
    when = deploy.add_mutually_exclusive_group(required=True)
    when.add_argument("--cron", help='a cron schedule, e.g. "0 2 * * *" (UTC)')
    when.add_argument("--interval", type=float, help="run every this many seconds")
    _add_run_options(deploy)

    report = sub.add_parser("report", help="an HTML report (and PNG plots) of output folders, side by side")
    report.add_argument("outs", nargs="+", metavar="OUT", help="output folders or URIs (a run, or an incremental job's root)")
    report.add_argument("--html", default="specbatch-report.html", help="file to write; PNGs go beside it (default: %(default)s)")
    report.add_argument("--label", action="append", help="a name per OUT, in order (default: the run id)")

    bench = sub.add_parser("bench", help="peers side by side on the demo models: tokens/s, identical outputs, MFU")
    bench.add_argument("--out", required=True, help="folder for bench.parquet and bench.png")
    bench.add_argument("--quick", action="store_true", help="small workloads, batch 8 only (a few minutes on 2 cores)")
    bench.add_argument("--device", default="cpu", help="cpu or cuda (bf16 on cuda)")
    bench.add_argument("--batch-sizes", default=None, help="comma-separated (default: 8 with --quick, else 1,8,32)")
    bench.add_argument(
        "--model",
        default="demo",
        help="demo (the bundled pair), random-1b (a random ~0.9B Llama, for GPUs), random-tiny",
    )

    bench.add_argument(
        "--repeat", type=int, default=1, help="runs per system and cell, alternated; the fastest counts (default: 1)"
    )
    bench.add_argument(
        "--cell-seconds",
        type=float,
        default=0.0,
        help="a cell (workload, batch size) that took under this after --repeat rounds runs more, up to eight times "
        "--repeat, of specbatch-ar and the systems held to 0.95x of it (adaptive, auto, the control): short cells, "
        "where a slow spell of a shared machine weighs most (default: 0, exactly --repeat)",
    )
    bench.add_argument(
        "--lean-rounds",
        type=int,
        default=0,
        help="rounds of specbatch-ar and the systems held to 0.95x of it that every cell runs after --repeat, in "
        "pairs, however long it took: long cells (batch 1), which --cell-seconds never reaches (default: 0)",
    )
    bench.add_argument(
        "--systems", default=None, help="comma-separated system names to run (default: all; e.g. specbatch-ar,specbatch-auto)"
    )
    bench.add_argument(
        "--workloads", default=None, help="comma-separated workloads to run (default: all; e.g. long-outputs,independent)"
    )

    demo = sub.add_parser("demo", help="the bundled prompts and demo models, end to end")
    demo.add_argument(
        "--out", default="specbatch-demo", help="output folder (default: ./specbatch-demo): ar/ and draft/ inside"
    )
    _add_run_options(demo)
    demo.set_defaults(defaults=DEMO_DEFAULTS)
    return parser


def cmd_run(config) -> dict:
    from .flows.generate import run

    return run(config)


def cmd_plan(args) -> dict:
    from .flows.generate import dry_run

    return dry_run(run_config(args, out=""))


def cmd_query(args) -> None:
    from .storage import connect

    con = connect(args.out)
    try:
        cursor = con.execute(args.sql)
    except Exception as e:  # duckdb.Error subclasses: parser, binder, catalog...
        raise SpecbatchError(f"query failed: {str(e).splitlines()[0]}") from e
    columns = [d[0] for d in cursor.description or []]
    rows = cursor.fetchall()
    write_rows(columns, rows, args.format)


def cmd_deploy(args) -> None:
    """Register the deployment on the Prefect server PREFECT_API_URL names and serve its runs here
    until interrupted. Runs never overlap: a run due while the last still runs is cancelled (the
    next one takes the files it would have)."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.deployments.runner import EntrypointType
    from prefect.settings import PREFECT_API_URL

    from .flows.generate import check_model
    from .flows.incremental import incremental

    if not PREFECT_API_URL.value():
        raise SpecbatchError(
            "deploy needs a Prefect server that outlives this command: start one (prefect server start "
            "--host 127.0.0.1) and set PREFECT_API_URL=http://127.0.0.1:4200/api"
        )
    here = {k: v if "://" in v else str(Path(v).expanduser().resolve()) for k, v in (("input", args.input), ("out", args.out))}
    config = run_config(args, **here)
    check_model(config)  # a bad model or method fails now, not at 2 a.m.
    incremental.serve(
        name=args.name,
        cron=args.cron,
        interval=args.interval,
        parameters={"config": config.model_dump(mode="json")},
        global_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW),
        entrypoint_type=EntrypointType.MODULE_PATH,
        description=f"specbatch: new files of {config.input} into {config.out}/<time>/",
    )


def cmd_report(args) -> None:
    from .report import write_report

    if args.label and len(args.label) != len(args.outs):
        raise SpecbatchError(f"--label: {len(args.label)} labels for {len(args.outs)} output folders")
    print(write_report(args.outs, args.html, args.label))


def write_rows(columns: list[str], rows: list[tuple], fmt: str) -> None:
    if fmt == "csv":
        w = csv.writer(sys.stdout, lineterminator="\n")
        w.writerow(columns)
        w.writerows(rows)
    elif fmt == "json":
        print(json.dumps([dict(zip(columns, r)) for r in rows], default=str, indent=1))
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table(*columns)
        for r in rows:
            table.add_row(*("" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v) for v in r))
        Console(width=max(100, min(200, 16 * len(columns)))).print(table)


DEMO_QUERIES = [
    (
        "per method",
        "select method, count(*) as requests, sum(completion_tokens) as tokens, "
        "round(sum(completion_tokens) / sum(target_steps), 2) as tokens_per_target_step, "
        "round(sum(accepted_tokens) / nullif(sum(drafted_tokens), 0), 2) as acceptance, "
        "round(sum(draft_seconds) / sum(draft_seconds + target_seconds), 2) as draft_time_share "
        "from requests group by 1",
        ("ar", "draft"),
    ),
    (
        "prefix sharing (runs table): prompt tokens computed, of all",
        "select method, prompt_tokens, prefill_tokens, round(1 - prefill_tokens / prompt_tokens, 2) as saved, "
        "round(peak_kv_bytes / 2 ^ 20, 2) as peak_kv_mib from runs",
        ("ar", "draft"),
    ),
    (
        "acceptance by the K the policy chose (steps table)",
        "select num_draft as k, count(*) as steps, round(avg(accepted), 2) as avg_accepted, "
        "round(avg(emitted), 2) as avg_emitted from steps group by 1 order by 1",
        ("draft",),
    ),
    (
        "three completions",
        "select request_id, replace(right(prompt, 30), chr(10), '⏎') as prompt_end, "
        "replace(left(completion, 60), chr(10), '⏎') as completion, finish_reason "
        "from generations order by input_index limit 3",
        ("draft",),
    ),
]


def cmd_demo(args) -> None:
    """The bundled prompts through the whole pipeline twice, plain and speculative, into
    OUT/ar and OUT/draft; then a comparison and a few queries."""
    from .storage import connect

    root = args.out
    summaries = {}
    for method in ("ar", "draft"):
        summaries[method] = cmd_run(run_config(args, input=str(DEMO_PROMPTS), out=str(Path(root) / method), method=method))
    ar, draft = connect(Path(root) / "ar"), connect(Path(root) / "draft")
    query = "select request_id, completion_token_ids from generations order by request_id"
    same = sum(a == b for a, b in zip(ar.execute(query).fetchall(), draft.execute(query).fetchall()))
    s = summaries["ar"]
    print(
        f"specbatch demo: {s['generations']} generations, {s['errors']} errors, {s['completion_tokens']} tokens, in {root}/ar and {root}/draft"
    )
    print(f"greedy outputs identical between ar and draft: {same}/{s['generations']}")
    print(
        f"wall time of the generation step: ar {summaries['ar']['seconds_this_invocation']}s, "
        f"draft {summaries['draft']['seconds_this_invocation']}s (CPU, {summaries['ar']['workers']} worker(s), batch {summaries['ar']['batch_size']})"
    )
    connections = {"ar": ar, "draft": draft}
    for title, sql, runs in DEMO_QUERIES:
        print(f"\n-- {title}: {sql}")
        columns, rows = [], []
        for run in runs:
            cursor = connections[run].execute(sql)
            columns, rows = [d[0] for d in cursor.description], rows + cursor.fetchall()
        write_rows(columns, rows, "table")
    print(f'\nTry: specbatch query {root}/draft "select * from steps limit 10"')


def cmd_bench(args) -> None:
    from .bench.runner import check_systems, check_workloads, minima, ratios, run_bench

    sizes = [int(b) for b in args.batch_sizes.split(",")] if args.batch_sizes else None
    systems = args.systems.split(",") if args.systems else None
    workloads = args.workloads.split(",") if args.workloads else None
    try:
        check_systems(systems)
        check_workloads(workloads)
    except ValueError as e:
        raise SpecbatchError(str(e)) from e
    if args.repeat < 1:
        raise SpecbatchError(f"--repeat must be >= 1, got {args.repeat}")
    if args.cell_seconds < 0:
        raise SpecbatchError(f"--cell-seconds must be >= 0, got {args.cell_seconds}")
    if args.lean_rounds < 0:
        raise SpecbatchError(f"--lean-rounds must be >= 0, got {args.lean_rounds}")
    table = run_bench(
        Path(args.out), args.quick, args.device, sizes, args.model, systems, args.repeat, workloads, args.cell_seconds,
        args.lean_rounds,
    ).to_pylist()  # fmt: skip
    to_hf = ratios(table, "hf-generate-batch")
    columns = ["workload", "system", "batch", "tok/s", "x hf-generate-batch", "x specbatch-ar", "paired x ar", "identical", "MFU"]
    columns += ["seconds", "accepted", "steps by arm"]
    rows = [
        (
            r["workload"],
            r["system"],
            r["batch_size"],
            round(r["tokens_per_s"], 1),
            to_hf[i],
            r["fastest_x_ar"],
            r["paired_x_ar"],
            r["identical_to_reference"],
            f"{r['mfu']:.2%}",
            round(r["seconds"], 2),
            f"{r['accepted_tokens']}/{r['drafted_tokens']}" if r["drafted_tokens"] else None,
            r["arm_steps"],
        )
        for i, r in enumerate(table)
    ]
    write_rows(columns, rows, "table")
    for line in minima(table):
        print(line)
    print(f"wrote {args.out}/bench.parquet and {args.out}/bench.png")


def _log_to_stderr(logger: logging.Logger) -> None:
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s | %(levelname)-7s | %(name)s - %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False  # Prefect's root console handler would print every line again


def main(argv: list[str] | None = None) -> int:
    for key, value in _ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    args = build_parser().parse_args(argv)
    _log_to_stderr(logging.getLogger("specbatch"))
    try:
        if args.command == "run":
            summary = cmd_run(run_config(args))
            print(json.dumps(summary, indent=1), file=sys.stderr)
        elif args.command == "plan":
            print(json.dumps(cmd_plan(args), indent=1))
        elif args.command == "query":
            cmd_query(args)
        elif args.command == "report":
            cmd_report(args)
        elif args.command == "deploy":
            cmd_deploy(args)
        elif args.command == "demo":
            cmd_demo(args)
        elif args.command == "bench":
            cmd_bench(args)
    except (SpecbatchError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
