"""Turn input rows into shards, in two stages that run anywhere (planner.py runs them on Ray).

Stage 1, `prepare`, per batch of rows: render and tokenize (the fast tokenizer, a batch at a
time), check against the model's context, expand into n samples, and send each request to a
bucket by a hash of its first BUCKET_KEY_TOKENS tokens, so prompts that share a longer prefix
always meet in one bucket.

Stage 2, `plan_bucket`, per bucket: order the requests by their token ids (prompts that share a
prefix sit next to each other; ties keep input order, then sample index), let the prefix tree
(decoding/prefix_tree.py) decide the groups, and pack. Packing keeps a group in one shard where
it can: a group larger than the room left is split only when the shard is less than half full
or the group is larger than a shard; each part computes its prefix once in its shard.

Deterministic: the same input, tokenizer and settings give the same shards, whatever the
cluster, which is what lets a resumed run skip the shards it finished.
"""

from __future__ import annotations

import hashlib
import zlib
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from ..decoding.prefix_tree import shared_prefix_lengths_sorted
from ..workers.shard import ShardRequest
from .inputs import InputError, InputRow

BUCKET_KEY_TOKENS = 16  # prompts sharing fewer tokens than this are planned apart: too few to matter
BUCKET_BYTES = 16 << 20  # input bytes per bucket: one bucket (one global plan) for small inputs, and
# enough buckets for stage 2 to keep every core busy on large ones
MAX_BUCKETS = 256

def num_buckets(input_bytes: int) -> int:
    return max(1, min(MAX_BUCKETS, input_bytes // BUCKET_BYTES))


def bucket_of(ids: list[int], buckets: int) -> int:
    if buckets == 1:
        return 0
    return zlib.crc32(np.asarray(ids[:BUCKET_KEY_TOKENS], dtype="<u4").tobytes()) % buckets


def request_seed(run_seed: int, request_id: str, sample_index: int) -> int:
    """A per-request seed that depends only on the run's seed and the request itself."""
    digest = hashlib.sha256(f"{run_seed}\x00{request_id}\x00{sample_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def verify_order(request_id: str, sample_index: int) -> bytes:
    """--verify N checks the N requests that come first in this order: spread over the job, the
    same for the same input whatever the shard size or batch."""
    return hashlib.sha256(f"verify\x00{request_id}\x00{sample_index}".encode()).digest()


def id_hash(request_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(request_id.encode(), digest_size=8).digest(), "little", signed=True)


def encode(tokenizer, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
    """Token ids of texts, as tokenizer(texts) gives them. A fast tokenizer's Rust backend is
    called directly (transformers' per-row Python conversion costs as much again), once it gave
    the same ids on these texts' first few."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    fast = getattr(backend, "encode_batch_fast", None)
    if fast is not None and getattr(tokenizer, "is_fast", False):
        head = texts[:8]
        if [e.ids for e in fast(head, add_special_tokens=add_special_tokens)] == [
            list(ids) for ids in tokenizer(head, add_special_tokens=add_special_tokens)["input_ids"]
        ]:
            return [e.ids for e in fast(texts, add_special_tokens=add_special_tokens)]
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]]


def render(rows: list[InputRow], tokenizer) -> list[tuple[str, list[int]] | str]:
    """Each row's prompt text and token ids, or the reason it has none; one tokenizer call per kind."""
    out: list[tuple[str, list[int]] | str] = [""] * len(rows)
    plain = [i for i, r in enumerate(rows) if r.messages is None]
    chats = [i for i, r in enumerate(rows) if r.messages is not None]
    if plain:
        texts = [rows[i].prompt for i in plain]
        for i, text, ids in zip(plain, texts, encode(tokenizer, texts)):
            out[i] = (text, ids)
    if chats:
        if not getattr(tokenizer, "chat_template", None):
            for i in chats:
                out[i] = "row has messages but the tokenizer has no chat template; send a prompt instead"
            return out
        texts = []
        for i in chats:
            try:
                texts.append(tokenizer.apply_chat_template(rows[i].messages, add_generation_prompt=True, tokenize=False))
            except Exception as e:  # the template's own checks (roles out of order...) raise jinja errors
                texts.append(None)
                out[i] = f"the chat template refused the messages: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ok = [(i, t) for i, t in zip(chats, texts) if t is not None]
        if ok:
            ids = encode(tokenizer, [t for _, t in ok], add_special_tokens=False)
            for (i, text), row_ids in zip(ok, ids):
                out[i] = (text, row_ids)
    return out


@dataclass
class Prepared:
    """What stage 1 makes of one batch."""

    buckets: dict[int, list[ShardRequest]]
    errors: list[InputError]
    ids: np.ndarray  # [rows, 2] int64: (hash of the request id, input_index), to find duplicates
    verify: list[tuple[bytes, int, str, int]]  # the batch's first candidates in verify order


def prepare(
    rows: list[InputRow],
    errors: list[InputError],
    tokenizer,
    context: int,
    max_new_tokens: int,
    seed: int,
    num_samples: int = 1,
    buckets: int = 1,
    verify: int = 0,
) -> Prepared:
    errors = list(errors)
    out: dict[int, list[ShardRequest]] = {}
    ids = np.array([(id_hash(r.request_id), r.input_index) for r in rows], dtype=np.int64).reshape(-1, 2)
    candidates = []
    for row, rendered in zip(rows, render(rows, tokenizer)):
        if isinstance(rendered, str):
            errors.append(InputError(row.request_id, row.input_index, rendered, stage="tokenize"))
            continue
        text, prompt_ids = rendered
        if not prompt_ids:
            errors.append(InputError(row.request_id, row.input_index, "prompt has no tokens", stage="tokenize"))
            continue
        if len(prompt_ids) >= context:
            reason = f"prompt is {len(prompt_ids)} tokens; the model's context is {context} (room for at least one new token is needed)"
            errors.append(InputError(row.request_id, row.input_index, reason, stage="tokenize"))
            continue
        bucket = out.setdefault(bucket_of(prompt_ids, buckets), [])
        for i in range(num_samples):
            bucket.append(
                ShardRequest(
                    request_id=row.request_id,
                    input_index=row.input_index,
                    prompt=text,
                    prompt_ids=prompt_ids,
                    max_new_tokens=row.max_new_tokens or max_new_tokens,
                    seed=request_seed(seed, row.request_id, i),
                    sample_index=i,
                )
            )
            if verify:
                candidates.append((verify_order(row.request_id, i), row.input_index, row.request_id, i))
    return Prepared(out, errors, ids, sorted(candidates)[:verify])


def duplicates(ids: np.ndarray) -> dict[int, int]:
    """input_index -> input_index of the first row with its id, for every later row with a used id.
    ids: [rows, 2] (id hash, input_index) over the whole job."""
    if len(ids) < 2:
        return {}
    order = np.lexsort((ids[:, 1], ids[:, 0]))
    hashes, indexes = ids[order, 0], ids[order, 1]
    later = np.flatnonzero(hashes[1:] == hashes[:-1]) + 1
    first_of_run = np.maximum.accumulate(np.where(np.r_[True, hashes[1:] != hashes[:-1]], np.arange(len(hashes)), 0))
    return {int(indexes[i]): int(indexes[first_of_run[i]]) for i in later}


def plan_bucket(
    table: pa.Table,
    shard_size: int,
    share_prefixes: bool = True,
    drop: dict[int, int] | None = None,
    verify: set[tuple[str, int]] | None = None,
) -> tuple[list[pa.Table], list[int], list[InputError]]:
    """Order, group and pack one bucket's requests (a table of REQUEST_SCHEMA), column-wise.
    drop: duplicate rows (input_index -> the first row with that id) become errors; verify: the
    (request_id, sample_index) to re-decode. Returns the shards' tables, the prompt tokens each
    computes (prefill), and the errors."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    errors = []
    if drop:
        dropped = np.isin(table["input_index"].to_numpy(), np.fromiter(drop, np.int64, len(drop)))
        if dropped.any():
            gone = table.filter(pa.array(dropped)).to_pylist()
            errors = [
                InputError(r["request_id"], r["input_index"], f"duplicate id {r['request_id']!r} (first used by row {drop[r['input_index']]})")
                for r in gone
                if r["sample_index"] == 0
            ]
            table = table.filter(pa.array(~dropped))
    n = table.num_rows
    ids = table["prompt_ids"].combine_chunks()
    offsets = ids.offsets.to_numpy()
    flat = ids.values.to_numpy().astype(">u4").tobytes()
    keys = [flat[4 * offsets[i] : 4 * offsets[i + 1]] for i in range(n)]
    index, sample = table["input_index"].to_pylist(), table["sample_index"].to_pylist()
    order = sorted(range(n), key=lambda i: (keys[i], index[i], sample[i]))
    keys = [keys[i] for i in order]
    table = table.take(pa.array(order, pa.int64()))
    shared = shared_prefix_lengths_sorted(keys) if share_prefixes else [0] * n
    table = table.set_column(table.schema.get_field_index("prefix_len"), "prefix_len", pa.array(shared, pa.int32()))
    if verify:
        chosen = [(rid, k) in verify for rid, k in zip(table["request_id"].to_pylist(), table["sample_index"].to_pylist())]
        table = table.set_column(table.schema.get_field_index("verify"), "verify", pa.array(chosen, pa.bool_()))
    groups = [(p, key[: 4 * p]) if p else None for key, p in zip(keys, shared)]
    shards, prefill, start = [], [], 0
    for size in cut([len(g) for g in _runs(groups)], shard_size):
        shards.append(table.slice(start, size))
        prefill.append(prefill_tokens(keys[start : start + size], groups[start : start + size]))
        start += size
    return shards, prefill, errors


def _runs(groups: list) -> list[list]:
    """Consecutive runs of one prefix group; an unshared request is a run of one."""
    runs: list[list] = []
    for g in groups:
        if g is not None and runs and runs[-1][-1] == g:
            runs[-1].append(g)
        else:
            runs.append([g])
    return runs


def prefill_tokens(keys: list[bytes], groups: list) -> int:
    """Prompt tokens the engine computes for these requests run together: a group's prefix once
    (a group with one member here is computed in full, as the engine does)."""
    counts = Counter(g for g in groups if g is not None)
    total = sum(len(g[1]) // 4 for g in counts if counts[g] > 1)
    for key, g in zip(keys, groups):
        total += (len(key) - (len(g[1]) if g is not None and counts[g] > 1 else 0)) // 4
    return total


def cut(group_sizes: list[int], shard_size: int) -> list[int]:
    """Shard sizes for ordered groups: at most shard_size each, groups kept whole where that
    leaves shards at least half full."""
    shards = [0]
    for group in group_sizes:
        if group > shard_size - shards[-1] and shards[-1] >= shard_size / 2:
            shards.append(0)
        while group:
            room = shard_size - shards[-1]
            if not room:
                shards.append(0)
                continue
            take = min(room, group)
            shards[-1] += take
            group -= take
    return [s for s in shards if s]


def pack(requests: list[ShardRequest], shard_size: int) -> list[list[ShardRequest]]:
    """Cut ordered requests into shards as plan_bucket does."""
    groups = [(r.prefix_len, tuple(r.prompt_ids[: r.prefix_len])) if r.prefix_len else None for r in requests]
    shards, start = [], 0
    for size in cut([len(g) for g in _runs(groups)], shard_size):
        shards.append(requests[start : start + size])
        start += size
    return shards
