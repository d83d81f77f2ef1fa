"""The systems compared, each a function (models, workload, batch_size) -> Measurement.

hf-generate: transformers `generate` over static, left-padded batches (the naive pipeline).
hf-generate-batch: transformers continuous batching, `generate_batch` (paged cache).
hf-assisted: transformers assisted generation with the draft, batch size 1 (its only size).
specbatch-*: this engine, plain, with a fixed-K draft and with the adaptive policy, draft-free
(n-gram lookup, fixed and adaptive; lookahead, adaptive) and auto (adaptive: the policy picks the
method and K per step), sharing prefixes as the pipeline plans them; specbatch-ar-unshared
computes every prompt in full.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass

import torch

from ..decoding import Engine, GenerationRequest, SamplingParams
from ..decoding.methods import make_speculation
from ..decoding.prefix_tree import shared_prefix_lengths
from .workloads import Workload


@dataclass
class Models:
    target: object
    draft: object
    eos: int
    device: str


@dataclass
class Measurement:
    outputs: list[list[int]]  # generated tokens per request, EOS excluded
    seconds: float
    target_steps: int | None  # target forwards, where the system reports them
    drafted: int | None = None  # drafted and accepted tokens, where the system reports them
    accepted: int | None = None
    arms: str | None = None  # decode steps by what drafted them ("ngram:9 ar:23"), summed over requests


def _strip(tokens: list[int], eos: int) -> list[int]:
    return tokens[: tokens.index(eos)] if eos in tokens else tokens


def _sampling_kwargs(w: Workload) -> dict:
    if w.greedy:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": w.temperature, "top_k": 0, "top_p": 1.0}


def hf_generate(m: Models, w: Workload, batch_size: int) -> Measurement:
    outputs, steps = [], 0
    t0 = time.perf_counter()
    for start in range(0, len(w.prompts), batch_size):
        batch = w.prompts[start : start + batch_size]
        width = max(len(p) for p in batch)
        ids = torch.full((len(batch), width), m.eos, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for i, p in enumerate(batch):  # left padding, as generate expects for decoder-only models
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        with torch.inference_mode():
            out = m.target.generate(
                ids.to(m.device),
                attention_mask=mask.to(m.device),
                max_new_tokens=w.max_new_tokens,
                pad_token_id=m.eos,
                eos_token_id=m.eos,
                **_sampling_kwargs(w),
            )
        new = out[:, width:].tolist()
        steps += len(new[0])
        outputs += [_strip(t, m.eos) for t in new]
    return Measurement(outputs, time.perf_counter() - t0, steps)


def hf_generate_batch(m: Models, w: Workload, batch_size: int) -> Measurement:
    from transformers import ContinuousBatchingConfig, GenerationConfig

    config = GenerationConfig(
        max_new_tokens=w.max_new_tokens, eos_token_id=m.eos, pad_token_id=m.eos, **_sampling_kwargs(w)
    )
    # Size its paged cache and token budget to the job, as a careful user would: its defaults
    # take about 10 GiB here and make a small CPU job three times slower (measured on the quick
    # shared-prefix workload: 10.9 s and 10 GiB against 3.5 s and 0.4 GiB). Block sharing (its
    # prefix sharing) stays on.
    page = 256
    blocks = sum(-(-(len(p) + w.max_new_tokens) // page) for p in w.prompts) + len(w.prompts)
    cb_config = ContinuousBatchingConfig(
        max_requests_per_batch=batch_size,
        page_size=page,
        num_blocks=blocks,
        max_batch_tokens=max(2048, max(len(p) for p in w.prompts)),
    )
    logging.getLogger("ContinuousBatchingLogger").setLevel(logging.ERROR)
    t0 = time.perf_counter()
    results = m.target.generate_batch(inputs=w.prompts, generation_config=config, continuous_batching_config=cb_config)
    seconds = time.perf_counter() - t0
    outputs = [_strip(list(r.generated_tokens), m.eos) for r in results.values()]
    return Measurement(outputs, seconds, None)


def hf_assisted(m: Models, w: Workload, batch_size: int) -> Measurement:
    outputs = []
    t0 = time.perf_counter()
    for p in w.prompts:
        ids = torch.tensor([p], device=m.device)
        with torch.inference_mode():
            out = m.target.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                assistant_model=m.draft,
                max_new_tokens=w.max_new_tokens,
                pad_token_id=m.eos,
                eos_token_id=m.eos,
                **_sampling_kwargs(w),
            )
        outputs.append(_strip(out[0, len(p) :].tolist(), m.eos))
    return Measurement(outputs, time.perf_counter() - t0, None)


def specbatch_engine(method: str, policy: str | None = None, k: int = 4, share_prefixes: bool = True):
    def run(m: Models, w: Workload, batch_size: int) -> Measurement:
        proposer, pol = make_speculation(method, m.target, m.draft, policy or "fixed", k)
        engine = Engine(m.target, [m.eos], batch_size, proposer=proposer, policy=pol)
        shared = shared_prefix_lengths(w.prompts) if share_prefixes else [0] * len(w.prompts)
        requests = [
            GenerationRequest(str(i), p, w.max_new_tokens, SamplingParams(temperature=w.temperature, seed=i), 0, n)
            for i, (p, n) in enumerate(zip(w.prompts, shared))
        ]
        t0 = time.perf_counter()
        results = engine.generate(requests)
        seconds = time.perf_counter() - t0
        arms = Counter(step.method for r in results for step in r.steps)
        return Measurement(
            [r.completion_ids for r in results],
            seconds,
            sum(r.target_steps for r in results),
            sum(r.drafted_tokens for r in results),
            sum(r.accepted_tokens for r in results),
            " ".join(f"{arm}:{n}" for arm, n in arms.most_common()) or None,
        )

    return run


# (system, method, function, batch sizes it runs at: None = every one, 1 = batch size 1 only)
SYSTEMS = [
    ("hf-generate", "ar", hf_generate, None),
    ("hf-generate-batch", "ar", hf_generate_batch, None),
    ("hf-assisted", "draft", hf_assisted, 1),
    ("specbatch-ar-unshared", "ar", specbatch_engine("ar", share_prefixes=False), None),
    ("specbatch-ar", "ar", specbatch_engine("ar"), None),
    ("specbatch-draft-k4", "draft", specbatch_engine("draft", "fixed", 4), None),
    ("specbatch-draft-adaptive", "draft", specbatch_engine("draft", "adaptive", 6), None),
    ("specbatch-ngram", "ngram", specbatch_engine("ngram", "fixed", 4), None),
    ("specbatch-ngram-adaptive", "ngram", specbatch_engine("ngram", "adaptive", 6), None),
    ("specbatch-lookahead-adaptive", "lookahead", specbatch_engine("lookahead", "adaptive", 3), None),
    ("specbatch-auto", "auto", specbatch_engine("auto", "adaptive", 4), None),
    # specbatch-ar again, placed as the systems under the bar are (runner.round_order): its ratio to
    # specbatch-ar is what the machine's noise alone makes of two identical systems in that cell
    # (runner.minima).
    ("specbatch-ar-control", "ar", specbatch_engine("ar"), None),
]
