"""What the flow hands a worker: a shard of tokenized requests, stored in the output folder by
planning (one Parquet file per shard) and named by a ShardRef."""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa


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


@dataclass(frozen=True)
class ShardRef:
    """A planned shard: where its requests are, and how much work it holds."""

    shard_id: str
    path: str  # relative to the output folder: a Parquet file with one row group per shard
    row_group: int
    num_requests: int
    prompt_tokens: int
    prefill_tokens: int  # prompt tokens computed: shared prefixes once

    def load(self, out) -> Shard:
        return Shard(self.shard_id, requests_of(out.read_row_group(self.path, self.row_group)))


REQUEST_SCHEMA = pa.schema(
    [
        ("request_id", pa.string()),
        ("input_index", pa.int64()),
        ("prompt", pa.string()),
        ("prompt_ids", pa.list_(pa.int32())),
        ("max_new_tokens", pa.int32()),
        ("seed", pa.int64()),
        ("sample_index", pa.int32()),
        ("prefix_len", pa.int32()),
        ("verify", pa.bool_()),
    ]
)


def requests_table(requests: list[ShardRequest]) -> pa.Table:
    columns = {name: [getattr(r, name) for r in requests] for name in REQUEST_SCHEMA.names}
    return pa.table(columns, schema=REQUEST_SCHEMA)


def requests_of(table: pa.Table) -> list[ShardRequest]:
    columns = [table.column(name).to_pylist() for name in REQUEST_SCHEMA.names]
    return [ShardRequest(*values) for values in zip(*columns)]
