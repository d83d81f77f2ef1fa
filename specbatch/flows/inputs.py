"""Read a prompt file (JSONL or Parquet) into good rows and error rows; a bad row never stops the rest.

A row is `{"id": ..., "prompt": "..."}` or `{"id": ..., "messages": [{"role", "content"}, ...]}`,
with an optional `max_new_tokens`. Without an id, a row is named after its place: `line-7` in
JSONL, `row-7` in Parquet (1-based). The later of two rows with one id is an error.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from ..errors import SpecbatchError


@dataclass
class InputRow:
    request_id: str
    input_index: int  # 1-based line or row number
    prompt: str | None = None
    messages: list[dict] | None = None
    max_new_tokens: int | None = None


@dataclass
class InputError:
    request_id: str | None
    input_index: int
    reason: str
    stage: str = "input"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _raw_rows(path: Path):
    """Yield (input_index, dict or error reason, default id) for each row of the file."""
    if path.suffix == ".parquet":
        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow raises several types for a damaged file
            raise SpecbatchError(f"cannot read Parquet file {str(path)!r}: {e}") from e
        for i, record in enumerate(table.to_pylist(), start=1):
            yield i, record, f"row-{i}"
        return
    with open(path, encoding="utf-8", errors="replace") as f:
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                yield i, f"line {i} is not valid JSON ({e.msg} at column {e.colno})", None
                continue
            if not isinstance(record, dict):
                yield i, f"line {i} is a JSON {type(record).__name__}, not an object", None
                continue
            yield i, record, f"line-{i}"


def _check(record: dict) -> str | None:
    """The reason a row cannot be generated, or None."""
    prompt, messages = record.get("prompt"), record.get("messages")
    if prompt is None and messages is None:
        return "row has neither 'prompt' nor 'messages'"
    if prompt is not None:
        if not isinstance(prompt, str):
            return f"'prompt' must be a string, got {type(prompt).__name__}"
        if not prompt.strip():
            return "'prompt' is empty"
    else:
        ok = (
            isinstance(messages, list)
            and messages
            and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages
            )
        )
        if not ok:
            return '\'messages\' must be a non-empty list of {"role": str, "content": str} objects'
    limit = record.get("max_new_tokens")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        return f"'max_new_tokens' must be a positive integer, got {limit!r}"
    return None


def read_prompts(path: Path | str) -> tuple[list[InputRow], list[InputError]]:
    path = Path(path)
    if not path.is_file():
        raise SpecbatchError(f"input file {str(path)!r} does not exist")
    rows: list[InputRow] = []
    errors: list[InputError] = []
    first_seen: dict[str, int] = {}
    for index, record, default_id in _raw_rows(path):
        if isinstance(record, str):
            errors.append(InputError(None, index, record))
            continue
        raw_id = record.get("id")
        request_id = default_id if raw_id is None else str(raw_id)
        if reason := _check(record):
            errors.append(InputError(request_id, index, reason))
            continue
        if request_id in first_seen:
            errors.append(
                InputError(
                    request_id, index, f"duplicate id {request_id!r} (first used by row {first_seen[request_id]})"
                )
            )
            continue
        first_seen[request_id] = index
        rows.append(
            InputRow(request_id, index, record.get("prompt"), record.get("messages"), record.get("max_new_tokens"))
        )
    return rows, errors
