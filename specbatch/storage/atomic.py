"""Atomic file writes: a reader sees the whole file or none of it.

The bytes go to a temporary name in the same folder that no reader's glob matches (a leading
dot and a `.partial` suffix, so `*.parquet` never picks it up), are flushed to disk, and are
then renamed over the final name with os.replace, which is atomic on POSIX filesystems.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def temp_path_for(path: Path) -> Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_parquet(table: pa.Table | list[pa.Table], path: Path, durable: bool = True) -> None:
    """One table, or a list of tables written as one row group each."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(path)
    try:
        if isinstance(table, list):
            with pq.ParquetWriter(tmp, table[0].schema, compression="zstd") as w:
                for t in table:
                    w.write_table(t, row_group_size=max(1, t.num_rows))
        else:
            pq.write_table(table, tmp, compression="zstd")
        if durable:
            _fsync(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(data: bytes, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(path)
    try:
        tmp.write_bytes(data)
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def remove_stale_temporaries(folder: Path) -> int:
    """Delete the leftovers of writers that died mid-file; returns how many."""
    stale = list(folder.rglob(".*.partial")) if folder.exists() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return len(stale)
