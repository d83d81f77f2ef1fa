"""Every decoding method against plain decoding on the demo models and the bundled prompts.

    python benchmarks/methods.py [--max-new-tokens 64] [--repeat 1] [--batch-sizes 1,8,32]
                                 [--methods ...] [--device cpu]

Engine only (no Ray or Prefect), greedy. For each batch size: plain decoding (ar), then each
method. Prints a markdown table: tokens per target step, acceptance (accepted / drafted, where a
tree's "drafted" is its longest candidate), wall seconds, speedup over ar, whether every output is
token-identical to ar, and for auto the steps each arm took. --repeat N runs the prompts N times
over (a longer job, where adaptive choices are amortized).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import torch
from transformers import AutoTokenizer

from specbatch.bench.models import load_pair
from specbatch.decoding import Engine, GenerationRequest
from specbatch.decoding.host_memory import hold_freed_memory
from specbatch.decoding.methods import make_speculation
from specbatch.workers.models import DEMO_MODELS

PROMPTS = Path(__file__).resolve().parents[1] / "specbatch" / "data" / "demo_prompts.jsonl"
# (label, method, draft-length policy, K)
METHODS = {
    "draft-k2": ("draft", "fixed", 2),
    "draft-k4": ("draft", "fixed", 4),
    "draft-adaptive": ("draft", "adaptive", 6),
    "ngram": ("ngram", "fixed", 4),
    "lookahead": ("lookahead", "fixed", 3),
    "layerskip": ("layerskip", "fixed", 3),
    "layerskip-adaptive": ("layerskip", "adaptive", 4),
    "auto": ("auto", "adaptive", 4),  # as the CLI's default and the bench run it
    "auto-fixed": ("auto", "fixed", 3),
}


def load_prompts(tok) -> list[list[int]]:
    out = []
    for line in PROMPTS.read_text().splitlines():
        row = json.loads(line)
        if "messages" in row:
            text = tok.apply_chat_template(row["messages"], add_generation_prompt=True, tokenize=False)
            out.append(tok(text, add_special_tokens=False)["input_ids"])
        else:
            out.append(tok(row["prompt"])["input_ids"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--batch-sizes", default="1,8,32")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated from {', '.join(METHODS)}")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    hold_freed_memory()  # as the bench and the workers do
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    tok = AutoTokenizer.from_pretrained(DEMO_MODELS["demo"])
    target, draft = load_pair("demo", args.device, dtype, tok.eos_token_id)
    prompts = load_prompts(tok) * args.repeat
    eos = [tok.eos_token_id]

    def requests():
        return [GenerationRequest(str(i), p, args.max_new_tokens) for i, p in enumerate(prompts)]

    print(
        f"{len(prompts)} requests x {args.max_new_tokens} new tokens, greedy, {args.device}, "
        f"{torch.get_num_threads()} threads\n"
    )
    print(
        "| batch | method | tokens/target step | acceptance | seconds | speedup vs ar | identical to ar | steps by method |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        t0 = time.perf_counter()
        reference = Engine(target, eos, batch).generate(requests())
        ar_seconds = time.perf_counter() - t0
        print(f"| {batch} | ar | 1.00 | - | {ar_seconds:.2f} | 1.00 | - | |", flush=True)
        for label in args.methods.split(","):
            method, policy, k = METHODS[label]
            proposer, pol = make_speculation(method, target, draft, policy, k)
            t0 = time.perf_counter()
            results = Engine(target, eos, batch, proposer=proposer, policy=pol).generate(requests())
            seconds = time.perf_counter() - t0
            tokens = sum(r.completion_tokens for r in results)
            steps = sum(r.target_steps for r in results)
            acceptance = sum(r.accepted_tokens for r in results) / max(1, sum(r.drafted_tokens for r in results))
            same = all(r.completion_ids == ref.completion_ids for r, ref in zip(results, reference))
            arms = Counter(s.method for r in results for s in r.steps) if method == "auto" else Counter()
            print(
                f"| {batch} | {label} | {tokens / steps:.2f} | {acceptance:.2f} | {seconds:.2f} | "
                f"{ar_seconds / seconds:.2f} | {'yes' if same else 'NO'} | "
                f"{', '.join(f'{m} {n}' for m, n in arms.most_common())} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
