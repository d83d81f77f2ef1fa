"""The per-job equivalence check (--verify N): a few requests of the job are decoded again on
the same worker by transformers' own `generate` (greedy, each prompt alone, no cache tricks,
nothing of this engine), and each output is recorded as matching it or not. Greedy decoding
with any method must give the reference's tokens exactly (float32; in bf16 or fp16 a batch's
numerics can tip a near-tie, which a mismatch row then shows). Sampled outputs have no
token-by-token reference; they are recorded as not compared, never as a pass.
"""

from __future__ import annotations

import torch

from ..decoding import GenerationResult
from .shard import ShardRequest

REFERENCE = "transformers.generate (greedy)"


@torch.inference_mode()
def reference_greedy(model, request: ShardRequest, eos: list[int], context: int) -> list[int]:
    """transformers' greedy output for one prompt, cut as the engine cuts: before the first EOS
    (not emitted), at the token limit or at the context's end."""
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    ids = torch.tensor([request.prompt_ids], device=device)
    limit = min(request.max_new_tokens, context - len(request.prompt_ids))
    config = GenerationConfig(  # a fresh config: none of the checkpoint's sampling or penalty defaults
        do_sample=False, max_new_tokens=limit, eos_token_id=eos or None, pad_token_id=eos[0] if eos else 0
    )
    out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
    tokens = out[0, len(request.prompt_ids) :].tolist()
    stops = [i for i, t in enumerate(tokens) if t in set(eos)]
    return tokens[: stops[0]] if stops else tokens


def verification_rows(
    model,
    requests: list[ShardRequest],
    results: list[GenerationResult],
    eos: list[int],
    context: int,
    greedy: bool,
    shard_id: str,
    method: str,
    worker: str,
) -> list[dict]:
    rows = []
    for req, res in zip(requests, results):
        if not req.verify:
            continue
        row = {
            "request_id": req.request_id,
            "sample_index": req.sample_index,
            "shard_id": shard_id,
            "method": method,
            "reference": REFERENCE,
            "completion_tokens": res.completion_tokens,
            "worker": worker,
        }
        if not greedy:
            rows.append(row | {"status": "not_compared"})
            continue
        expected = reference_greedy(model, req, eos, context)
        got = res.completion_ids
        first = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), None)
        if first is None and len(got) != len(expected):
            first = min(len(got), len(expected))
        status = "match" if first is None else "mismatch"
        rows.append(row | {"status": status, "reference_tokens": len(expected), "first_difference": first})
    return rows
