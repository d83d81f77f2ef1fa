"""What the flow hands a worker: a shard of tokenized requests."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ShardRequest:
    request_id: str
    input_index: int
    prompt: str
    prompt_ids: list[int]
    max_new_tokens: int
    seed: int
    sample_index: int = 0
    prefix_len: int = 0  # leading tokens shared with its prefix group (0: none), see prefix_tree.py
    verify: bool = False  # re-decode with plain greedy decoding and record whether the output matched (--verify)


@dataclass
class Shard:
    shard_id: str
    requests: list[ShardRequest] = field(default_factory=list)

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(r.prompt_ids) for r in self.requests)
