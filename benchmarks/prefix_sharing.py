"""Prefix sharing against computing every prompt in full, on a job whose prompt tokens are 90% shared.

    python benchmarks/prefix_sharing.py [--groups 2] [--members 32] [--batch-sizes 8,32] [--device cpu]

Engine only (no Ray or Prefect), the demo target (and demo draft for --method draft). Each group
is a 360-token prefix (a held-out stdlib file's opening) and `members` prompts that continue it
with 40 tokens of their own (later lines of the same file): 360 of every 400 prompt tokens are
shared. The plan comes from the same prefix tree the pipeline uses. Prints a markdown table:
prefill tokens computed, the drop, peak KV-cache bytes against the issue's bound
1.1 x (prefixes in flight + batch x own tokens) (own: a row's 40 prompt tokens and its new
tokens), wall seconds, and whether every output is
token-identical to the unshared run.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoTokenizer

from specbatch.bench.models import load_pair
from specbatch.bench.workloads import held_out_sources
from specbatch.decoding import Engine, GenerationRequest
from specbatch.decoding.methods import make_speculation
from specbatch.decoding.prefix_tree import shared_prefix_lengths
from specbatch.workers.models import DEMO_MODELS

PREFIX, OWN = 360, 40


def workload(tok, groups: int, members: int) -> list[list[int]]:
    need = PREFIX + OWN * members
    sources = [ids for ids in (tok(s)["input_ids"] for s in held_out_sources()) if len(ids) >= need][:groups]
    if len(sources) < groups:
        raise SystemExit(f"only {len(sources)} held-out files have {need} tokens; use fewer --groups or --members")
    return [ids[:PREFIX] + ids[PREFIX + OWN * m : PREFIX + OWN * (m + 1)] for ids in sources for m in range(members)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--groups", type=int, default=2)
    ap.add_argument("--members", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch-sizes", default="8,32")
    ap.add_argument("--methods", default="ar,ngram,draft")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    tok = AutoTokenizer.from_pretrained(DEMO_MODELS["demo"])
    target, draft = load_pair("demo", args.device, dtype, tok.eos_token_id)
    prompts = workload(tok, args.groups, args.members)
    planned = shared_prefix_lengths(prompts)
    c = target.config
    per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
    per_token *= torch.finfo(dtype).bits // 8
    shared_fraction = sum(planned) / sum(len(p) for p in prompts)
    print(
        f"{len(prompts)} requests in {args.groups} groups, {sum(len(p) for p in prompts)} prompt tokens, "
        f"{shared_fraction:.0%} in shared prefixes; {args.max_new_tokens} new tokens, greedy, {args.device}, "
        f"{torch.get_num_threads()} threads\n"
    )
    print(
        "| method | batch | sharing | prefill tokens computed | drop | peak KV (KiB) | bound (KiB) "
        "| wall (s) | speedup | identical |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for method in args.methods.split(","):
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            results = {}
            for share in (False, True):
                proposer, policy = make_speculation(method, target, draft, "adaptive", 4)
                engine = Engine(target, [tok.eos_token_id], batch, proposer=proposer, policy=policy)
                requests = [
                    GenerationRequest(str(i), p, args.max_new_tokens, prefix_len=n if share else 0)
                    for i, (p, n) in enumerate(zip(prompts, planned))
                ]
                t0 = time.perf_counter()
                outputs = [r.completion_ids for r in engine.generate(requests)]
                results[share] = (outputs, time.perf_counter() - t0, engine.stats)
            base_out, base_s, base = results[False]
            for share in (False, True):
                outputs, seconds, stats = results[share]
                # The bound for the rows in flight: each slot's own tokens, plus one prefix per
                # group that can be in flight at once (while one group's last rows finish, the
                # next group's first rows start).
                in_flight_groups = min(args.groups, -(-batch // args.members) + 1)
                own = PREFIX * (0 if share else 1) + OWN + args.max_new_tokens
                bound = 1.1 * (in_flight_groups * PREFIX + batch * (OWN + args.max_new_tokens)) * per_token
                print(
                    f"| {method} | {batch} | {'on' if share else 'off'} | {stats.prefill_tokens} of {stats.prompt_tokens} "
                    f"| {1 - stats.prefill_tokens / stats.prompt_tokens:.0%} | {stats.peak_kv_bytes / 1024:.0f} "
                    f"| {bound / 1024 if share else batch * own * per_token / 1024:.0f} | {seconds:.2f} "
                    f"| {base_s / seconds:.2f}x | {outputs == base_out} |"
                )


if __name__ == "__main__":
    main()
