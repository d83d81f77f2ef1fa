"""Turn input rows into shards: tokenize, check against the model's context, expand into n
samples, plan prefix groups over the whole job, order, pack.

Deterministic: the same rows, tokenizer and settings give the same shards, which is what
lets a resumed run skip the shards it finished. Requests are ordered by their token ids, so
prompts that share a prefix sit next to each other (ties keep input order, then sample index).
The prefix tree over all of them (decoding/prefix_tree.py) decides the groups, and packing keeps
a group in one shard where it can: a group larger than the room left is split only when the
shard is less than half full or the group is larger than a shard; each part computes its prefix
once in its shard.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from ..decoding.prefix_tree import shared_prefix_lengths
from ..workers.shard import Shard, ShardRequest
from .inputs import InputError, InputRow


@dataclass
class Plan:
    shards: list[Shard]
    errors: list[InputError]
    num_input_rows: int

    @property
    def num_requests(self) -> int:
        return sum(len(s.requests) for s in self.shards)


def request_seed(run_seed: int, request_id: str, sample_index: int) -> int:
    """A per-request seed that depends only on the run's seed and the request itself."""
    digest = hashlib.sha256(f"{run_seed}\x00{request_id}\x00{sample_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def verify_order(request_id: str, sample_index: int) -> bytes:
    """--verify N checks the N requests that come first in this order: spread over the job, the
    same for the same input whatever the shard size or batch."""
    return hashlib.sha256(f"verify\x00{request_id}\x00{sample_index}".encode()).digest()


def render_prompt(row: InputRow, tokenizer) -> tuple[str, list[int]]:
    """The prompt text and its token ids. Raises ValueError with a reason for an error row."""
    if row.messages is not None:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("row has 'messages' but the tokenizer has no chat template; send a 'prompt' instead")
        text = tokenizer.apply_chat_template(row.messages, add_generation_prompt=True, tokenize=False)
        return text, tokenizer(text, add_special_tokens=False)["input_ids"]
    return row.prompt, tokenizer(row.prompt)["input_ids"]


def plan_shards(
    rows: list[InputRow],
    input_errors: list[InputError],
    tokenizer,
    context: int,
    max_new_tokens: int,
    shard_size: int,
    seed: int,
    num_samples: int = 1,
    share_prefixes: bool = True,
    verify: int = 0,
) -> Plan:
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if num_samples < 1:
        raise ValueError(f"the number of samples per prompt (--n) must be >= 1, got {num_samples}")
    errors = list(input_errors)
    requests: list[ShardRequest] = []
    for row in rows:
        try:
            text, ids = render_prompt(row, tokenizer)
        except ValueError as e:
            errors.append(InputError(row.request_id, row.input_index, str(e), stage="tokenize"))
            continue
        if not ids:
            errors.append(InputError(row.request_id, row.input_index, "prompt has no tokens", stage="tokenize"))
            continue
        if len(ids) >= context:
            reason = f"prompt is {len(ids)} tokens; the model's context is {context} (room for at least one new token is needed)"
            errors.append(InputError(row.request_id, row.input_index, reason, stage="tokenize"))
            continue
        requests.extend(
            ShardRequest(
                request_id=row.request_id,
                input_index=row.input_index,
                prompt=text,
                prompt_ids=ids,
                max_new_tokens=row.max_new_tokens or max_new_tokens,
                seed=request_seed(seed, row.request_id, i),
                sample_index=i,
            )
            for i in range(num_samples)
        )
    requests.sort(key=lambda r: (r.prompt_ids, r.input_index, r.sample_index))
    for r in sorted(requests, key=lambda r: verify_order(r.request_id, r.sample_index))[:verify]:
        r.verify = True
    if share_prefixes:
        for r, n in zip(requests, shared_prefix_lengths([r.prompt_ids for r in requests])):
            r.prefix_len = n
    shards = [Shard(f"shard-{i:05d}", part) for i, part in enumerate(pack(requests, shard_size))]
    errors.sort(key=lambda e: e.input_index)
    return Plan(shards, errors, num_input_rows=len(rows) + len(input_errors))


def prefix_groups(requests: list[ShardRequest]) -> list[list[ShardRequest]]:
    """Consecutive runs of requests that share one prefix; an unshared request is a run of one."""
    runs: list[list[ShardRequest]] = []
    for r in requests:
        key = tuple(r.prompt_ids[: r.prefix_len]) if r.prefix_len else None
        last = runs[-1][-1] if runs else None
        if (
            key is not None
            and last is not None
            and last.prefix_len
            and tuple(last.prompt_ids[: last.prefix_len]) == key
        ):
            runs[-1].append(r)
        else:
            runs.append([r])
    return runs


def pack(requests: list[ShardRequest], shard_size: int) -> list[list[ShardRequest]]:
    """Cut the ordered requests into shards of at most shard_size, keeping prefix groups whole
    where that leaves shards at least half full."""
    shards: list[list[ShardRequest]] = [[]]
    for group in prefix_groups(requests):
        room = shard_size - len(shards[-1])
        if len(group) > room and len(shards[-1]) >= shard_size / 2:
            shards.append([])
        while group:
            room = shard_size - len(shards[-1])
            if not room:
                shards.append([])
                continue
            shards[-1].extend(group[:room])
            group = group[room:]
    return [s for s in shards if s]
