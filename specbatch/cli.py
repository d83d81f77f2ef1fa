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


def _add_run_options(p: argparse.ArgumentParser, demo: bool = False) -> None:
    p.add_argument("--model", default="demo", help="local folder or hub id (default: the bundled demo target)")
    p.add_argument(
        "--method",
        default="ar",
        choices=list(METHODS),
        help="; ".join(f"{m.name}: {m.help}" for m in METHODS.values()),
    )
    p.add_argument(
        "--draft", default=None, help="draft model for --method draft (default with the demo target: the demo draft)"
    )
    p.add_argument(
        "--num-draft-tokens", type=int, default=4, help="K: tokens drafted per step (the adaptive policy's maximum)"
    )
    p.add_argument(
        "--draft-policy",
        default="adaptive",
        choices=["fixed", "adaptive"],
        help="fixed: always K; adaptive: K from measured acceptance and cost, down to 0 (default)",
    )
    p.add_argument("--max-new-tokens", type=int, default=64 if demo else 128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--n", type=int, default=1, help="samples per prompt (sample_index 0..N-1); they share the prompt's KV"
    )
    p.add_argument(
        "--no-prefix-sharing",
        dest="prefix_sharing",
        action="store_false",
        help="compute every prompt in full (for comparison; outputs are the same)",
    )
    p.add_argument("--workers", type=int, default=1, help="Ray actors, each holding the model")
    p.add_argument("--shard-size", type=int, default=16 if demo else 64, help="requests per shard")
    p.add_argument("--batch-size", type=int, default=8, help="rows decoded together in a worker")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--ray-address", default=None, help="join this Ray cluster (default: a local one)")
    p.add_argument(
        "--verify",
        type=int,
        default=0,
        metavar="N",
        help="re-decode N requests (chosen deterministically) with transformers' greedy generate and record "
        "whether each output matched, in the verification table (default 0)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="specbatch", description="Offline LLM generation with per-step metrics in SQL."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="generate completions for a prompt file (JSONL or Parquet)")
    run.add_argument("input", help="prompt file: JSONL rows {id, prompt | messages, max_new_tokens?} or Parquet")
    run.add_argument("--out", required=True, help="output folder (rerun over it to resume)")
    _add_run_options(run)

    query = sub.add_parser("query", help="run SQL over an output folder's views")
    query.add_argument("out", help="output folder")
    query.add_argument("sql", help='e.g. "select method, avg(completion_tokens) from requests group by 1"')
    query.add_argument("--format", choices=["table", "csv", "json"], default="table")

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

    demo = sub.add_parser("demo", help="the bundled prompts and demo models, end to end")
    demo.add_argument(
        "--out", default="specbatch-demo", help="output folder (default: ./specbatch-demo): ar/ and draft/ inside"
    )
    _add_run_options(demo, demo=True)
    return parser


def cmd_run(args, input_path: str) -> dict:
    from .flows.generate import RunParams, check_run, generate

    params = RunParams(
        input=input_path,
        out=args.out,
        model=args.model,
        method=args.method,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        n=args.n,
        prefix_sharing=args.prefix_sharing,
        workers=args.workers,
        shard_size=args.shard_size,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        ray_address=args.ray_address,
        draft=args.draft,
        num_draft_tokens=args.num_draft_tokens,
        draft_policy=args.draft_policy,
        verify=args.verify,
    )
    check_run(params)  # fail fast, in one line, before Prefect and Ray start
    from dataclasses import asdict

    return generate(**asdict(params))


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
        args.method, args.out = method, str(Path(root) / method)
        summaries[method] = cmd_run(args, str(DEMO_PROMPTS))
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
        f"draft {summaries['draft']['seconds_this_invocation']}s (CPU, {args.workers} worker(s), batch {args.batch_size})"
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
    from .bench.runner import run_bench

    sizes = [int(b) for b in args.batch_sizes.split(",")] if args.batch_sizes else None
    table = run_bench(Path(args.out), args.quick, args.device, sizes, args.model).to_pylist()
    base = {(r["workload"], r["batch_size"]): r["tokens_per_s"] for r in table if r["system"] == "hf-generate-batch"}
    columns = ["workload", "system", "batch", "tok/s", "x hf-generate-batch", "identical", "MFU", "seconds"]
    rows = [
        (
            r["workload"],
            r["system"],
            r["batch_size"],
            round(r["tokens_per_s"], 1),
            round(r["tokens_per_s"] / base[r["workload"], r["batch_size"]], 2)
            if (r["workload"], r["batch_size"]) in base
            else None,
            r["identical_to_reference"],
            f"{r['mfu']:.2%}",
            round(r["seconds"], 2),
        )
        for r in table
    ]
    write_rows(columns, rows, "table")
    print(f"wrote {args.out}/bench.parquet and {args.out}/bench.png")


def _log_to_stderr(logger: logging.Logger) -> None:
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s | %(levelname)-7s | %(name)s - %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    for key, value in _ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    args = build_parser().parse_args(argv)
    _log_to_stderr(logging.getLogger("specbatch"))
    try:
        if args.command == "run":
            summary = cmd_run(args, args.input)
            print(json.dumps(summary, indent=1), file=sys.stderr)
        elif args.command == "query":
            cmd_query(args)
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
