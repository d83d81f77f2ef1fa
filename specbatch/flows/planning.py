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

from ..decoding.prefix_tree import shared_prefix_lengths
from ..workers.shard import ShardRequest
from .inputs import InputError, InputRow

BUCKET_KEY_TOKENS = 16  # prompts sharing fewer tokens than this are planned apart: too few to matter
BUCKET_BYTES = 64 << 20  # input bytes per bucket: one bucket (one global plan) for small inputs
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


def render(rows: list[InputRow], tokenizer) -> list[tuple[str, list[int]] | str]:
    """Each row's prompt text and token ids, or the reason it has none; one tokenizer call per kind."""
    out: list[tuple[str, list[int]] | str] = [""] * len(rows)
    plain = [i for i, r in enumerate(rows) if r.messages is None]
    chats = [i for i, r in enumerate(rows) if r.messages is not None]
    if plain:
        texts = [rows[i].prompt for i in plain]
        for i, text, ids in zip(plain, texts, tokenizer(texts)["input_ids"]):
            out[i] = (text, list(ids))
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
            ids = tokenizer([t for _, t in ok], add_special_tokens=False)["input_ids"]
            for (i, text), row_ids in zip(ok, ids):
                out[i] = (text, list(row_ids))
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
    requests: list[ShardRequest],
    shard_size: int,
    share_prefixes: bool = True,
    drop: dict[int, int] | None = None,
    verify: set[tuple[str, int]] | None = None,
) -> tuple[list[list[ShardRequest]], list[InputError]]:
    """Order, group and pack one bucket's requests. drop: duplicate rows (input_index -> the first
    row with that id) become errors; verify: the (request_id, sample_index) to re-decode."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    errors = []
    if drop:
        for r in requests:
            if r.input_index in drop and r.sample_index == 0:
                reason = f"duplicate id {r.request_id!r} (first used by row {drop[r.input_index]})"
                errors.append(InputError(r.request_id, r.input_index, reason))
        requests = [r for r in requests if r.input_index not in drop]
    keys = [token_key(r.prompt_ids) for r in requests]
    order = sorted(range(len(requests)), key=lambda i: (keys[i], requests[i].input_index, requests[i].sample_index))
    requests = [requests[i] for i in order]
    for r in requests:
        r.verify = bool(verify) and (r.request_id, r.sample_index) in verify
    if share_prefixes:
        for r, n in zip(requests, shared_prefix_lengths([r.prompt_ids for r in requests])):
            r.prefix_len = n
    return pack(requests, shard_size), errors


def token_key(ids: list[int]) -> bytes:
    """Bytes that sort as the token ids do (big-endian, so a prefix sorts first)."""
    return np.asarray(ids, dtype=">u4").tobytes()


def prefill_tokens(requests: list[ShardRequest]) -> int:
    """Prompt tokens the engine computes for these requests run together: a group's prefix once."""
    keys = [tuple(r.prompt_ids[: r.prefix_len]) if r.prefix_len else None for r in requests]
    counts = Counter(k for k in keys if k is not None)
    total = sum(len(k) for k in counts if counts[k] > 1)
    for r, k in zip(requests, keys):
        total += len(r.prompt_ids) - (len(k) if k is not None and counts[k] > 1 else 0)
    return total


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

