"""The data path at scale: planning throughput and the driver's memory, and how much of the
engine's throughput a whole `specbatch run` keeps.

    python benchmarks/scale.py planning [--rows 100000,1000000] [--words 100]
    python benchmarks/scale.py e2e [--rows 2000] [--words 112] [--batch-size 16] [--max-new-tokens 32] [--repeat 3]

planning: writes ROWS generated prompts (JSONL: one of 20 shared system prompts, then WORDS/2
words of its own; about 1.2 demo-tokenizer tokens a word) and runs `specbatch plan` on them in a child
process, sampling that process's resident memory (the driver; Ray's task processes are
reported apart). Prints rows/s, prompt tokens/s and the driver's peak.

e2e: ROWS prompts of about 160 tokens (WORDS words) in 20 shared-prefix groups, MAX_NEW_TOKENS each, greedy,
the demo target. The engine alone (this process: tokenize, plan prefixes, one Engine.generate
over every request) against `specbatch run` (a child process: Prefect, Ray, one worker,
Parquet) on the same prompts; checks the outputs are identical and prints tokens/s of both,
for the generation phase and for the whole command; --repeat N alternates the two N times.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

WORDS = (
    "the of and to in is that for it as with was on be by this are from at or an have not which but all "
    "data model token batch cache prefix shard worker plan query table row column value index file path "
    "return def class import self list dict string number print open read write close start stop run"
).split()


def system_prompts(count: int, words: int, rng: random.Random) -> list[str]:
    return [f"System {g}: " + " ".join(rng.choices(WORDS, k=words)) + "\n" for g in range(count)]


def write_prompts(path: Path, rows: int, words: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    systems = system_prompts(20, words // 2, rng)
    with open(path, "w") as f:
        for i in range(rows):
            own = " ".join(rng.choices(WORDS, k=words - words // 2))
            f.write(json.dumps({"id": f"q{i}", "prompt": systems[i % 20] + f"Question {i}: {own}"}) + "\n")


def peak_rss(proc: subprocess.Popen, every: float = 0.05) -> tuple[list[int], threading.Thread]:
    """Sample the child's resident memory until it exits; peak[0] is the high-water mark."""
    peak = [0]

    def sample() -> None:
        p = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                peak[0] = max(peak[0], p.memory_info().rss)
            except psutil.Error:
                break
            time.sleep(every)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    return peak, thread


def cmd_planning(args) -> None:
    print("| prompts | input MiB | planning s | prompts/s | prompt tokens/s | shards | saved by sharing | driver peak MiB |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for rows in [int(r) for r in args.rows.split(",")]:
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "prompts.jsonl"
            write_prompts(path, rows, args.words)
            t0 = time.perf_counter()
            proc = subprocess.Popen(
                [sys.executable, "-m", "specbatch.cli", "plan", str(path), "--max-new-tokens", "32"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            peak, thread = peak_rss(proc)
            out, err = proc.communicate()
            seconds = time.perf_counter() - t0
            thread.join()
            if proc.returncode:
                raise SystemExit(err[-3000:])
            s = json.loads(out)
            print(
                f"| {rows:,} | {s['input_bytes'] / 2**20:.0f} | {seconds:.1f} | {rows / seconds:,.0f} | "
                f"{s['prompt_tokens'] / seconds / 1e6:.2f} M | {s['shards']:,} | {s['prefix_sharing_saves']:.0%} | "
                f"{peak[0] / 2**20:.0f} |",
                flush=True,
            )


def engine_alone(path: Path, batch_size: int, max_new_tokens: int) -> tuple[float, dict]:
    """The engine on the same prompts in one process: tokenize, plan prefixes, generate."""
    import torch
    from transformers import AutoTokenizer

    from specbatch.decoding import Engine, GenerationRequest
    from specbatch.decoding.prefix_tree import shared_prefix_lengths
    from specbatch.workers.models import DEMO_MODELS, eos_token_ids, load_model

    torch.set_num_threads(psutil.cpu_count(logical=False) or 2)
    tok = AutoTokenizer.from_pretrained(DEMO_MODELS["demo"])
    model = load_model(str(DEMO_MODELS["demo"]))
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    ids = tok([r["prompt"] for r in rows])["input_ids"]
    order = sorted(range(len(ids)), key=lambda i: ids[i])
    shared = shared_prefix_lengths([ids[i] for i in order])
    requests = [GenerationRequest(rows[i]["id"], ids[i], max_new_tokens, prefix_len=n) for i, n in zip(order, shared)]
    engine = Engine(model, eos_token_ids(model, tok), max_batch_size=batch_size)
    t0 = time.perf_counter()
    results = engine.generate(requests)
    seconds = time.perf_counter() - t0
    return sum(r.completion_tokens for r in results) / seconds, {r.request_id: r.completion_ids for r in results}


def pipeline(path: Path, out: Path, args) -> tuple[float, float, dict, list]:
    """`specbatch run` in a child process: (generation-phase tok/s, whole-command seconds, summary, outputs)."""
    command = [sys.executable, "-m", "specbatch.cli", "run", str(path), "--out", str(out), "--batch-size",
               str(args.batch_size), "--max-new-tokens", str(args.max_new_tokens), "--workers", "1"]  # fmt: skip
    t0 = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=os.environ)
    wall = time.perf_counter() - t0
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    err = done.stderr
    summary = json.loads(err[err.rindex("\n{") : err.rindex("\n}") + 2])
    from specbatch.storage import connect

    rows = connect(out).execute("select request_id, completion_token_ids from generations").fetchall()
    return summary["tokens_per_second_this_invocation"], wall, summary, rows


def cmd_e2e(args) -> None:
    """The engine alone and the pipeline, alternated --repeat times (this machine's speed drifts by
    several percent between back-to-back runs of the same code: pairs taken together compare fairly)."""
    print("| pair | tokens | engine alone tok/s | specbatch run: generation phase tok/s (ratio) | whole command s, tok/s (ratio) | identical |")
    print("|---:|---:|---:|---:|---:|---:|")
    ratios = []
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "prompts.jsonl"
        write_prompts(path, args.rows, args.words)
        for i in range(args.repeat):
            engine_tps, engine_out = engine_alone(path, args.batch_size, args.max_new_tokens)
            phase, wall, summary, rows = pipeline(path, Path(folder) / f"out-{i}", args)
            identical = sum(engine_out[rid] == list(ids) for rid, ids in rows)
            tokens = summary["completion_tokens"]
            ratios.append((phase / engine_tps, tokens / wall / engine_tps))
            print(
                f"| {i + 1} | {tokens:,} | {engine_tps:.0f} | {phase:.0f} ({ratios[-1][0]:.2f}) | "
                f"{wall:.1f}, {tokens / wall:.0f} ({ratios[-1][1]:.2f}) | {identical}/{len(rows)} |",
                flush=True,
            )
    if len(ratios) > 1:
        print(
            f"mean ratio over {len(ratios)} pairs: generation phase {sum(r[0] for r in ratios) / len(ratios):.3f}, "
            f"whole command {sum(r[1] for r in ratios) / len(ratios):.3f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    planning = sub.add_parser("planning")
    planning.add_argument("--rows", default="100000,1000000")
    planning.add_argument("--words", type=int, default=100)
    e2e = sub.add_parser("e2e")
    e2e.add_argument("--rows", type=int, default=2000)
    e2e.add_argument("--words", type=int, default=112)
    e2e.add_argument("--batch-size", type=int, default=16)
    e2e.add_argument("--max-new-tokens", type=int, default=32)
    e2e.add_argument("--repeat", type=int, default=1, help="engine-alone / pipeline pairs, alternated")
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    (cmd_planning if args.what == "planning" else cmd_e2e)(args)


if __name__ == "__main__":
    main()
