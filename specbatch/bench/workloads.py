"""Benchmark workloads, generated deterministically from local data: the Python standard
library's source (held-out files of the demo corpus, so the prompts are real code the demo models
have not trained on). No downloads."""

from __future__ import annotations

import hashlib
import sysconfig
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


def held_out_sources(limit: int = 40) -> list[str]:
    """Stdlib files in the demo corpus's held-out bucket, sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if "site-packages" in rel or "/test" in f"/{rel}":
            continue
        if int(hashlib.sha256(rel.encode()).hexdigest(), 16) % 20 == 0:
            text = path.read_text(encoding="utf-8", errors="replace")
            if len(text) > 4000:
                texts.append(text)
        if len(texts) == limit:
            break
    return texts


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
    return [
        Workload("shared-prefix", shared, max_new_tokens=32),
        Workload("independent", independent, max_new_tokens=32),
        Workload("n4-sampling", sampled, max_new_tokens=32, temperature=0.8, samples_per_prompt=4),
        Workload("long-outputs", long, max_new_tokens=128 * scale),
    ]
