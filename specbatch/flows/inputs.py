"""Prompt sets: find the files, stream them in bounded batches, turn each row into a request row
or an error row (a bad row never stops the rest).

An input is a file, a folder (every prompt file under it) or a glob, as a local path or any URI
that pyarrow's filesystems (s3://, gs://, hdfs://, file://) or fsspec's understand. Files are
JSONL (plain, .gz or .zst; a UTF-8 byte order mark is skipped) or Parquet.

A row is `{"id": ..., "prompt": "..."}` or `{"id": ..., "messages": [{"role", "content"}, ...]}`,
with an optional `max_new_tokens`. `prompt_column` names another column holding the prompt text
or the messages (`text`, `question`, `conversations`...), `id_column` another id column. Message
content may be a list of text parts (OpenAI style); ShareGPT's {"from", "value"} turns are read
too. Without an id, a row is named after its place: `line-7` in JSONL, `row-7` in Parquet
(1-based; prefixed by the file's name when the input has several files). The later of two rows
with one id is an error (see planning.py).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ..errors import SpecbatchError

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".ndjson", ".ndjson.gz", ".ndjson.zst")
PARQUET_SUFFIXES = (".parquet",)
BATCH_ROWS = 4096  # Parquet rows handed to one planning task
BATCH_BYTES = 2 << 20  # JSONL bytes handed to one planning task
BOM = b"\xef\xbb\xbf"
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass
class InputRow:
    request_id: str
    input_index: int  # 1-based, counted over the whole input (lines of JSONL, rows of Parquet)
    prompt: str | None = None
    messages: list[dict] | None = None
    max_new_tokens: int | None = None


@dataclass
class InputError:
    request_id: str | None
    input_index: int
    reason: str
    stage: str = "input"


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a URI."""
    if "://" not in uri:
        return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())
    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError):
        pass
    try:
        import fsspec
    except ImportError:
        raise SpecbatchError(f"no filesystem for {uri!r} (pyarrow does not know it; install fsspec)") from None
    try:
        fs, path = fsspec.core.url_to_fs(uri)
    except (ImportError, ValueError) as e:
        raise SpecbatchError(f"no filesystem for {uri!r}: {e}") from None
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


@dataclass(frozen=True)
class InputFile:
    path: str  # inside the filesystem
    name: str  # as row ids and messages show it: relative to the folder or glob base
    size: int
    mtime_ns: int | None = None

    @property
    def is_parquet(self) -> bool:
        return self.path.endswith(PARQUET_SUFFIXES)


@dataclass
class InputSource:
    uri: str
    fs: pafs.FileSystem
    files: list[InputFile] = field(default_factory=list)
    named: bool = False  # default row ids carry the file's name even when there is one file

    @property
    def qualified_ids(self) -> bool:
        return self.named or len(self.files) > 1

    @property
    def num_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def fingerprint(self) -> str:
        """sha256 over every file's name and bytes: the run's identity holds it."""
        h = hashlib.sha256()
        for f in self.files:
            h.update(f"{f.name}\x00{f.size}\x00".encode())
            with self.fs.open_input_stream(f.path, compression=None) as stream:
                while block := stream.read(1 << 22):
                    h.update(block)
        return h.hexdigest()


def glob_regex(pattern: str) -> re.Pattern:
    """A glob as a regex: `*` and `?` stay within a folder, `**` crosses folders."""
    out, i = "", 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
            continue
        if pattern.startswith("**", i):
            out, i = out + ".*", i + 2
            continue
        if c == "[" and (end := pattern.find("]", i + 1)) > 0:
            out, i = out + pattern[i : end + 1], end + 1
            continue
        out += "[^/]*" if c == "*" else "[^/]" if c == "?" else re.escape(c)
        i += 1
    return re.compile(out + r"\Z")


def _is_prompt_file(path: str) -> bool:
    name = path.rsplit("/", 1)[-1]
    return not name.startswith((".", "_")) and path.endswith(JSONL_SUFFIXES + PARQUET_SUFFIXES)


def open_source(uri: str, only: Sequence[str] | None = None, allow_empty: bool = False) -> InputSource:
    """Find the prompt files of an input; a user error when there are none (unless allow_empty: a
    folder that grows may hold none yet). only: just these files (by name, as a folder or glob
    input names them: an incremental run's share), whose default row ids then always carry the
    file's name."""
    source = _find(uri, allow_empty)
    if only is None:
        return source
    by_name = {f.name: f for f in source.files}
    missing = [name for name in only if name not in by_name]
    if missing:
        raise SpecbatchError(f"input {uri!r} no longer holds {', '.join(map(repr, missing[:5]))}")
    return InputSource(uri, source.fs, [by_name[name] for name in only], named=True)


def _find(uri: str, allow_empty: bool = False) -> InputSource:
    parts = uri.split("/")
    glob_at = next((i for i, p in enumerate(parts) if any(c in p for c in "*?[")), None)
    base_uri = "/".join(parts[:glob_at]) if glob_at is not None else uri
    fs, base = filesystem(base_uri or ".")
    info = fs.get_file_info(base)
    if info.type == pafs.FileType.NotFound:
        raise SpecbatchError(f"input {uri!r} does not exist")
    if info.type == pafs.FileType.File and glob_at is None:
        return InputSource(uri, fs, [InputFile(base, base.rsplit("/", 1)[-1], info.size, info.mtime_ns)])
    pattern = glob_regex("/".join([base.rstrip("/")] + parts[glob_at:])) if glob_at is not None else None
    found = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    files = [
        InputFile(f.path, f.path[len(base) :].lstrip("/"), f.size, f.mtime_ns)
        for f in sorted(found, key=lambda f: f.path)
        if f.type == pafs.FileType.File
        and _is_prompt_file(f.path)
        and (pattern is None or pattern.match(f.path))
    ]
    if not files and not allow_empty:
        kinds = ", ".join(JSONL_SUFFIXES[:3] + PARQUET_SUFFIXES)
        raise SpecbatchError(f"input {uri!r} holds no prompt files ({kinds})")
    return InputSource(uri, fs, files)


@dataclass
class RawBatch:
    """Rows of one file, as read: whole JSONL lines (one bytes object, about BATCH_BYTES) or a
    Parquet record batch (BATCH_ROWS). The reader never splits lines itself: it only cuts at a
    newline and counts them, so reading costs the driver next to nothing per row."""

    file: str  # InputFile.name; "" when the input is one file
    first_index: int  # input_index of the first row
    first_local: int  # its line or row number within its file
    num_rows: int
    data: bytes | None = None
    table: pa.RecordBatch | None = None


def read_batches(source: InputSource, columns: list[str] | None = None) -> Iterator[RawBatch]:
    """Stream the input in batches, in order; never more than one batch of a file in memory."""
    index = 1
    for f in source.files:
        label = f.name if source.qualified_ids else ""
        if f.is_parquet:
            try:
                parquet = pq.ParquetFile(source.fs.open_input_file(f.path))
                wanted = [c for c in columns or [] if c in parquet.schema_arrow.names] if columns else None
                local = 1
                for batch in parquet.iter_batches(batch_size=BATCH_ROWS, columns=wanted):
                    yield RawBatch(label, index, local, batch.num_rows, table=batch)
                    index, local = index + batch.num_rows, local + batch.num_rows
            except (OSError, pa.ArrowException) as e:
                raise SpecbatchError(f"cannot read Parquet file {f.name!r}: {e}") from e
            continue
        local = 1
        for data, lines in _jsonl_blocks(source.fs, f.path):
            yield RawBatch(label, index, local, lines, data=data)
            index, local = index + lines, local + lines


def _jsonl_blocks(fs: pafs.FileSystem, path: str) -> Iterator[tuple[bytes, int]]:
    """(whole lines, how many) of about BATCH_BYTES each; the last line may lack its newline."""
    with fs.open_input_stream(path, compression="detect") as stream:
        pending, first = b"", True
        while block := stream.read(BATCH_BYTES):
            if first:
                block, first = block.removeprefix(BOM), False
            pending += block
            cut = pending.rfind(b"\n") + 1
            if cut:
                yield pending[:cut], pending.count(b"\n", 0, cut)
                pending = pending[cut:]
        if pending:
            yield pending, 1


def parse_batch(
    batch: RawBatch, prompt_column: str | None = None, id_column: str = "id"
) -> tuple[list[InputRow], list[InputError]]:
    """Each row of a batch as a request row or an error row (duplicates are found later, over the job)."""
    rows: list[InputRow] = []
    errors: list[InputError] = []
    where = f"{batch.file} " if batch.file else ""
    for offset, record in enumerate(_records(batch)):
        index, local = batch.first_index + offset, batch.first_local + offset
        if record is None:  # a blank line
            continue
        if isinstance(record, str):
            errors.append(InputError(None, index, f"{where}{record.replace('#', str(local))}"))
            continue
        place = "row" if batch.table is not None else "line"
        raw_id = record.get(id_column)
        request_id = f"{batch.file + ':' if batch.file else ''}{place}-{local}" if raw_id is None else str(raw_id)
        row = InputRow(request_id, index, max_new_tokens=record.get("max_new_tokens"))
        if reason := _fill(row, record, prompt_column):
            errors.append(InputError(request_id, index, reason))
        else:
            rows.append(row)
    return rows, errors


def _records(batch: RawBatch) -> Iterator[dict | str | None]:
    """Each row as a dict, or a reason with '#' for its line number, or None for a blank line."""
    if batch.table is not None:
        yield from batch.table.to_pylist()
        return
    lines = (batch.data or b"").split(b"\n")
    for line in lines[: batch.num_rows]:
        text = line.decode("utf-8", errors="replace")
        if not text.strip():
            yield None
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as e:
            yield f"line # is not valid JSON ({e.msg} at column {e.colno})"
            continue
        if not isinstance(record, dict):
            yield f"line # is a JSON {type(record).__name__}, not an object"
            continue
        yield record


def _fill(row: InputRow, record: dict, prompt_column: str | None) -> str | None:
    """Set the row's prompt or messages from the record; the reason it cannot be generated, or None."""
    if prompt_column is not None:
        if record.get(prompt_column) is None:
            return f"row has no {prompt_column!r}"
        value = record[prompt_column]
        name = prompt_column
    elif record.get("prompt") is not None:
        value, name = record["prompt"], "prompt"
    elif record.get("messages") is not None:
        value, name = record["messages"], "messages"
    else:
        return "row has neither 'prompt' nor 'messages'"
    if isinstance(value, str):
        if not value.strip():
            return f"{name!r} is empty"
        row.prompt = value
    elif isinstance(value, list) and value:
        messages = [_message(m) for m in value]
        if any(m is None for m in messages):
            return (
                f"{name!r} must be a non-empty list of messages "
                '({"role": str, "content": str or a list of text parts} or {"from": str, "value": str})'
            )
        row.messages = messages
    elif name == "messages" or isinstance(value, list):
        return f"{name!r} must be a non-empty list of messages"
    else:
        return f"{name!r} must be a string or a list of messages, got {type(value).__name__}"
    limit = row.max_new_tokens
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        return f"'max_new_tokens' must be a positive integer, got {limit!r}"
    return None


def _message(m) -> dict | None:
    """A chat message as {"role", "content": str}, or None when it is not one."""
    if not isinstance(m, dict):
        return None
    if "from" in m and "value" in m and "role" not in m:  # ShareGPT
        role = SHAREGPT_ROLES.get(m["from"])
        return {"role": role, "content": m["value"]} if role and isinstance(m["value"], str) else None
    role, content = m.get("role"), m.get("content")
    if isinstance(content, list):  # OpenAI's content parts: text only
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            return None
        content = "\n".join(p["text"] for p in content)
    if not isinstance(role, str) or not isinstance(content, str):
        return None
    return {"role": role, "content": content}


def read_prompts(uri: str | Path, prompt_column: str | None = None, id_column: str = "id"):
    """Every row of a (small) input at once, duplicates included: for tests and tools."""
    rows: list[InputRow] = []
    errors: list[InputError] = []
    for batch in read_batches(open_source(str(uri))):
        good, bad = parse_batch(batch, prompt_column, id_column)
        rows += good
        errors += bad
    return rows, errors
