"""Turn input rows into shards: tokenize, check against the model's context, order, chunk.

Deterministic: the same rows, tokenizer and settings give the same shards, which is what
lets a resumed run skip the shards it finished. Rows are ordered by their token ids, so prompts
that share a prefix sit next to each other and land in the same shard (ties keep input order).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

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
) -> Plan:
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
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
        requests.append(
            ShardRequest(
                request_id=row.request_id,
                input_index=row.input_index,
                prompt=text,
                prompt_ids=ids,
                max_new_tokens=row.max_new_tokens or max_new_tokens,
                seed=request_seed(seed, row.request_id, 0),
            )
        )
    requests.sort(key=lambda r: (r.prompt_ids, r.input_index))
    shards = [
        Shard(f"shard-{i // shard_size:05d}", requests[i : i + shard_size]) for i in range(0, len(requests), shard_size)
    ]
    errors.sort(key=lambda e: e.input_index)
    return Plan(shards, errors, num_input_rows=len(rows) + len(input_errors))
