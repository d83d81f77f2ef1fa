"""One target forward with some rows drafting and the others not: padded to the widest row,
packed (the real tokens only, packing.py), and a plain step of the same rows, for comparison.

    python benchmarks/packing.py [--context 200] [--repeat 30]

The demo target, float32, CPU, every row with `--context` tokens already in its cache; rows
drafting feed 5 tokens (the last one and 4 drafts), the others 1. Prints the mean milliseconds
of each (after 3 warm-up forwards).
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoModelForCausalLM

from specbatch.decoding.forward import forward_slots, pad_right
from specbatch.decoding.kv_cache import SlotKVCache
from specbatch.workers.models import DEMO_MODELS

CASES = [(8, 1), (8, 4), (32, 4), (32, 16), (32, 32), (32, 0)]  # (rows, rows drafting); the last two: no padding


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(DEMO_MODELS["demo"], dtype=torch.float32).eval()
    batch = max(rows for rows, _ in CASES)
    cache = SlotKVCache(model.config, batch, args.context + 16, "cpu", torch.float32)
    slots = list(range(batch))
    with torch.inference_mode():
        ids, lengths = pad_right([[5] * args.context] * batch, "cpu")
        forward_slots(model, cache, slots, ids, None, lengths.tolist(), packed=False)
        for s in slots:
            cache.commit(s, args.context)

        def ms(rows: int, real: list[int], packed: bool) -> float:
            ids = torch.full((rows, max(real)), 7)
            run = lambda: forward_slots(model, cache, slots[:rows], ids, None, real, packed=packed)  # noqa: E731
            for _ in range(3):
                run()
            start = time.perf_counter()
            for _ in range(args.repeat):
                run()
            return (time.perf_counter() - start) / args.repeat * 1e3

        print("rows  drafting  padded ms  packed ms  plain ms")
        for rows, drafting in CASES:
            real = [5] * drafting + [1] * (rows - drafting)
            print(
                f"{rows:4d}  {drafting:8d}  {ms(rows, real, False):9.2f}  {ms(rows, real, True):9.2f}  "
                f"{ms(rows, [1] * rows, False):8.2f}"
            )


if __name__ == "__main__":
    main()
