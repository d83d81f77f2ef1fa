"""Benchmark workloads, generated deterministically from bundled data: Python standard library
source (held-out files of the demo corpus, so the prompts are real code the demo models have not
trained on). No downloads."""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Workload:
    name: str
    prompts: list[list[int]]  # one entry per request (an n-sample prompt appears n times)
    max_new_tokens: int
    temperature: float = 0.0
    samples_per_prompt: int = 1

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)


SOURCES = Path(__file__).resolve().parent.parent / "data" / "bench_sources.jsonl.gz"


def held_out_sources() -> list[str]:
    """The bundled source texts: the CPython 3.11 standard library files in the demo corpus's
    held-out bucket (sha256 of the path relative to the stdlib, mod 20 == 0; tests and
    site-packages left out; longer than 4,000 characters), each cut to its first 12,000
    characters, sorted by path. Bundled rather than read from the running Python, whose stdlib
    differs by version and build, so every machine benchmarks the same prompts."""
    with gzip.open(SOURCES, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


WORKLOADS = ["shared-prefix", "independent", "n4-sampling", "long-outputs"]


def make_workloads(tokenizer, quick: bool) -> list[Workload]:
    sources = [tokenizer(t)["input_ids"] for t in held_out_sources()]
    scale = 1 if quick else 2
    groups, members, prefix_len = 4 * scale, 8, 192
    shared = []
    for g in range(groups):  # a long common prefix, then each member's own next lines
        ids = sources[g]
        for m in range(members):
            shared.append(ids[:prefix_len] + ids[prefix_len + 40 * m : prefix_len + 40 * m + 16])
    independent = [src[400 + 64 * i : 400 + 64 * i + 48] for i in range(4 * scale) for src in sources[8:16]]
    sampled = [src[200:260] for src in sources[16 : 16 + 4 * scale] for _ in range(4)]
    long = [src[100:140] for src in sources[24 : 24 + 2 * scale]]

    def canonical(prompts: list[list[int]]) -> list[list[int]]:
        """Token slices re-encoded from their text, so a run that starts from text (the pipeline
        row) sees the same ids."""
        return [tokenizer(text)["input_ids"] for text in tokenizer.batch_decode(prompts)]

    shared, independent, sampled, long = (canonical(w) for w in (shared, independent, sampled, long))
    workloads = [
        Workload("shared-prefix", shared, max_new_tokens=32),
        Workload("independent", independent, max_new_tokens=32),
        Workload("n4-sampling", sampled, max_new_tokens=32, temperature=0.8, samples_per_prompt=4),
        Workload("long-outputs", long, max_new_tokens=128 * scale),
    ]
    assert [w.name for w in workloads] == WORKLOADS and all(w.prompts for w in workloads)
    return workloads
