"""The decoding loop's own cost at batch size 1: wall time outside the target model's forward,
per generated token, for this engine and for transformers' `generate` on the same prompts.

    python benchmarks/overhead.py [--prompts 16] [--max-new-tokens 64] [--repeat 3]

Both run the demo target, greedy, one prompt at a time (the bench's shared-prefix prompts); the
model's forward is timed by hooks on the model itself, so what is left is each loop's host work:
sampling, masks, cache bookkeeping, stopping checks. The runs alternate --repeat times and the
fastest of each counts (noise on a shared machine only ever adds). Outputs are checked identical.
"""

from __future__ import annotations

import argparse
import time

import torch


def timed_forwards(model) -> list[float]:
    """Hooks that add each forward's seconds to the returned list's only element."""
    spent, started = [0.0], [0.0]

    def before(*_):
        started[0] = time.perf_counter()

    def after(*_):
        spent[0] += time.perf_counter() - started[0]

    model.register_forward_pre_hook(before)
    model.register_forward_hook(after)
    return spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from specbatch.bench.workloads import make_workloads
    from specbatch.decoding import Engine, GenerationRequest
    from specbatch.workers.models import DEMO_MODELS, load_model

    tok = AutoTokenizer.from_pretrained(DEMO_MODELS["demo"])
    model = load_model(str(DEMO_MODELS["demo"]))
    eos = tok.eos_token_id
    prompts = make_workloads(tok, quick=True)[0].prompts[: args.prompts]
    spent = timed_forwards(model)

    def hf() -> list[list[int]]:
        outputs = []
        for p in prompts:
            ids = torch.tensor([p])
            with torch.inference_mode():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                                     do_sample=False, pad_token_id=eos, eos_token_id=eos)  # fmt: skip
            new = out[0, len(p) :].tolist()
            outputs.append(new[: new.index(eos)] if eos in new else new)
        return outputs

    def engine() -> list[list[int]]:
        requests = [GenerationRequest(str(i), p, args.max_new_tokens) for i, p in enumerate(prompts)]
        return [r.completion_ids for r in Engine(model, [eos], max_batch_size=1).generate(requests)]

    best: dict[str, tuple[float, float, int]] = {}
    outputs = {}
    for _ in range(args.repeat):
        for name, run in (("hf-generate", hf), ("specbatch", engine)):
            spent[0] = 0.0
            t0 = time.perf_counter()
            outputs[name] = run()
            wall = time.perf_counter() - t0
            tokens = sum(len(o) for o in outputs[name])
            if name not in best or wall < best[name][0]:
                best[name] = (wall, spent[0], tokens)
    assert outputs["hf-generate"] == outputs["specbatch"], "outputs differ"
    print("| loop | tokens | wall s | in the model's forward s | outside it, ms per token |")
    print("|---|---:|---:|---:|---:|")
    for name, (wall, forward, tokens) in best.items():
        print(f"| {name} | {tokens} | {wall:.2f} | {forward:.2f} | {(wall - forward) / tokens * 1000:.2f} |")


if __name__ == "__main__":
    main()
