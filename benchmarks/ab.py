"""Two or more `specbatch bench` systems on one cell (workload, batch size), alternated, in one
process: the A/B a full bench run is too noisy for, on a shared machine.

    python benchmarks/ab.py WORKLOAD BATCH [--repeat 3] [--sandwich] SYSTEM [SYSTEM...]

SYSTEM is a bench system name (`specbatch-ar`, `specbatch-auto`, ...), optionally with
`:ADMIT_WAIT` to run the engine with that admit_wait. Prints each one's fastest run, its ratio to
the first system's fastest, the median of the per-round ratios to the first, every run's seconds,
and its decode steps by arm. Demo models, CPU, fp32, the bench's prompts.

--sandwich runs the first system before and after each other one (A B A C A ..., reversed every
other round), and a round's ratio is the mean of the two runs of A around a run over that run: a
drift of the machine's speed over the three runs cancels, where a ratio to one neighbour keeps it.
It is how `specbatch bench` pairs the systems under issue 14's bar (runner.round_order, pairs).
Read the paired ratio then: "x first" sets each one's fastest against the fastest of the first's
runs, one more a round than all the others' together, which favours the first.
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoTokenizer

from specbatch.bench import systems
from specbatch.bench.models import load_pair
from specbatch.bench.runner import paired_ratio, pairs, round_order
from specbatch.bench.workloads import WORKLOADS, make_workloads
from specbatch.decoding import engine
from specbatch.decoding.host_memory import hold_freed_memory
from specbatch.workers.models import DEMO_MODELS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workload", choices=WORKLOADS)
    parser.add_argument("batch", type=int)
    parser.add_argument("systems", nargs="+")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--sandwich", action="store_true", help="each system between two runs of the first")
    args = parser.parse_args()
    torch.set_num_threads(2)
    hold_freed_memory()  # as the bench and the workers do
    tokenizer = AutoTokenizer.from_pretrained(DEMO_MODELS["demo"])
    target, draft = load_pair("demo", "cpu", torch.float32, tokenizer.eos_token_id)
    models = systems.Models(target, draft, tokenizer.eos_token_id, "cpu")
    workload = {w.name: w for w in make_workloads(tokenizer, quick=False)}[args.workload]
    runs = {name: fn for name, _, fn, _ in systems.SYSTEMS}
    if len(set(args.systems)) < len(args.systems):
        parser.error("a system is named twice; to run one twice, give it as SYSTEM:1.0 as well")
    for spec in args.systems:
        if spec.partition(":")[0] not in runs:
            parser.error(f"unknown system {spec!r}; known: {', '.join(runs)}")
    real_init = engine.Engine.__init__
    times: dict[str, list[float]] = {spec: [] for spec in args.systems}
    arms: dict[str, str | None] = {}
    base = args.systems[0]
    beside: dict[str, list[float]] = {spec: [] for spec in args.systems}  # per run, the first's run(s) beside it (runner.pairs)
    for round_index in range(args.repeat):
        order = round_order(args.systems, round_index, base, beside=lambda s: args.sandwich)
        done = []  # this round's (system, seconds), in the order run
        for spec in order:
            name, _, wait = spec.partition(":")

            def init(self, *a, _wait=wait, **k):
                if _wait:
                    k["admit_wait"] = float(_wait)
                real_init(self, *a, **k)

            engine.Engine.__init__ = init
            m = runs[name](models, workload, args.batch)
            engine.Engine.__init__ = real_init
            times[spec].append(m.seconds)
            arms[spec] = m.arms
            done.append((spec, m.seconds))
        for spec, (seconds, _) in pairs(done, base):
            beside[spec].append(seconds)
    first = times[base]
    for spec in args.systems:
        paired = paired_ratio(beside[spec], times[spec])
        print(
            f"{args.workload} b{args.batch} {spec:34} fastest {min(times[spec]):.3f}s  x first {min(first) / min(times[spec]):.2f}"
            f"  paired {paired:.2f}  runs {[round(t, 2) for t in times[spec]]}  {arms[spec] or ''}"
        )


if __name__ == "__main__":
    main()
