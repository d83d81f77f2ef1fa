"""The output folder, local or on an object store: one Parquet file per table per unit (a shard,
or the plan), and a manifest that says which units are complete.

    out/                           a local path or a URI: s3://bucket/jobs/run-7, gs://..., file://...
      run.json                     identity of the run (fingerprint of model, config, input)
      plan/shards.parquet          the planned shards (ids, request files, sizes)
      plan/shards/000.parquet      a bucket's shards' requests, a row group per shard, read by the worker
      generations/shard-00003.parquet
      requests/shard-00003.parquet
      steps/shard-00003.parquet
      errors/plan-000001.parquet   bad input rows, found while planning
      errors/shard-00003.parquet   requests that failed while generating
      runs/run.parquet
      manifest/shard-00003.json    written last: the unit's files are all in place

A unit's data files are written first, each atomically, then its manifest entry. The views read
only files named by manifest entries, so a unit cut off between files is invisible and, having
no entry, is redone on resume (its files are replaced under the same names: nothing is
duplicated). Locally a file is written under a temporary name and renamed; on an object store a
PUT (or a multipart upload, completed on close) is atomic by itself, so no rename is needed.
"""

from __future__ import annotations

import io
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .atomic import remove_stale_temporaries, write_bytes, write_parquet
from .schema import TABLES

PLAN = "plan"
INCREMENTAL_MARKER = "incremental.json"
INCREMENTAL_INPUTS = "inputs.json"


class OutputDir:
    def __init__(self, uri: Path | str) -> None:
        from ..flows.inputs import filesystem

        self.uri = str(uri)
        self.fs, self.base = filesystem(self.uri)
        self.local = isinstance(self.fs, pafs.LocalFileSystem)

    def __repr__(self) -> str:
        return f"OutputDir({self.uri!r})"

    def __reduce__(self):  # travels to workers as its URI
        return OutputDir, (self.uri,)

    def path(self, relative: str) -> str:
        return f"{self.base.rstrip('/')}/{relative}"

    # -- files ------------------------------------------------------------------------------

    def exists(self, relative: str = "") -> bool:
        return self.fs.get_file_info(self.path(relative) if relative else self.base).type != pafs.FileType.NotFound

    def make(self) -> None:
        if self.local:
            self.fs.create_dir(self.base, recursive=True)

    def write_table(self, table: pa.Table, relative: str, durable: bool = True) -> None:
        """Atomically; durable=False skips the fsync, for scratch files that are remade on a crash."""
        if self.local:
            write_parquet(table, Path(self.path(relative)), durable)
        else:
            pq.write_table(table, self.path(relative), filesystem=self.fs, compression="zstd")

    def read_table(self, relative: str) -> pa.Table:
        return pq.read_table(self.path(relative), filesystem=self.fs)

    def write_row_groups(self, tables: list[pa.Table], relative: str, durable: bool = True) -> None:
        """One Parquet file, one row group per table (read back one at a time with read_row_group)."""
        if self.local:
            write_parquet(tables, Path(self.path(relative)), durable)
            return
        with pq.ParquetWriter(self.path(relative), tables[0].schema, filesystem=self.fs, compression="zstd") as w:
            for t in tables:
                w.write_table(t, row_group_size=max(1, t.num_rows))

    def read_row_group(self, relative: str, index: int) -> pa.Table:
        with self.fs.open_input_file(self.path(relative)) as f:
            return pq.ParquetFile(f).read_row_group(index)

    def write_json(self, obj, relative: str) -> None:
        self.write_bytes((json.dumps(obj, indent=2, sort_keys=True) + "\n").encode(), relative)

    def write_bytes(self, data: bytes, relative: str) -> None:
        if self.local:
            write_bytes(data, Path(self.path(relative)))
        else:
            with self.fs.open_output_stream(self.path(relative), compression=None) as f:
                f.write(data)

    def read_json(self, relative: str):
        try:
            with self.fs.open_input_stream(self.path(relative), compression=None) as f:
                return json.load(io.BytesIO(f.read()))
        except FileNotFoundError:
            return None

    def list(self, folder: str, suffix: str = "") -> list[str]:
        """Files under a folder, relative to the root, sorted; none when it does not exist."""
        selector = pafs.FileSelector(self.path(folder), recursive=True, allow_not_found=True)
        start = len(self.base.rstrip("/")) + 1
        return sorted(
            f.path[start:]
            for f in self.fs.get_file_info(selector)
            if f.type == pafs.FileType.File and f.path.endswith(suffix) and "/." not in f.path[start - 1 :]
        )

    def delete(self, folder: str) -> None:
        try:
            self.fs.delete_dir(self.path(folder))
        except FileNotFoundError:
            pass

    def clean(self) -> int:
        """Remove what writers that died mid-file left (local only: object stores keep nothing partial)."""
        return remove_stale_temporaries(Path(self.base)) if self.local else 0

    # -- an incremental job's root: dated runs under one folder (flows/incremental.py) -------

    def is_incremental_root(self) -> bool:
        return self.exists(INCREMENTAL_MARKER)

    def dated_runs(self) -> list[str]:
        """The run folders under an incremental root, oldest first (each holds inputs.json)."""
        selector = pafs.FileSelector(self.base, recursive=False, allow_not_found=True)
        folders = [f.base_name for f in self.fs.get_file_info(selector) if f.type == pafs.FileType.Directory]
        return sorted(name for name in folders if self.exists(f"{name}/{INCREMENTAL_INPUTS}"))

    def child(self, name: str) -> OutputDir:
        return OutputDir(f"{self.uri.rstrip('/')}/{name}")

    def runs(self) -> list[OutputDir]:
        """The run folders this folder's tables come from: itself, or an incremental root's runs."""
        return [self.child(n) for n in self.dated_runs()] if self.is_incremental_root() else [self]

    # -- the run, units and the manifest ----------------------------------------------------

    def read_run(self) -> dict | None:
        return self.read_json("run.json")

    def write_run(self, meta: dict) -> None:
        self.write_json(meta, "run.json")

    def write_unit(
        self, unit: str, tables: dict[str, pa.Table], summary: dict | None = None, files: dict | None = None
    ) -> None:
        """Write a unit's tables, then its manifest entry. files: more table files (name -> list
        of relative paths) already written, that the entry commits too."""
        entry = dict(files or {})
        for name, table in tables.items():
            if name not in TABLES:
                raise ValueError(f"unknown table {name!r}")
            relative = f"{name}/{unit}.parquet"
            self.write_table(table.cast(TABLES[name]), relative)
            entry[name] = entry.get(name, []) + [relative]
        self.write_json({"unit": unit, "files": entry, "summary": summary or {}}, f"manifest/{unit}.json")

    def entry(self, unit: str) -> dict | None:
        return self.read_json(f"manifest/{unit}.json")

    def is_complete(self, unit: str) -> bool:
        """Finished for good: a shard that ran out of attempts is not, so a rerun retries it."""
        entry = self.entry(unit)
        return entry is not None and not entry["summary"].get("failed", False)

    def manifest(self) -> list[dict]:
        names = self.list("manifest", ".json")
        if len(names) < 8 or self.local:
            return [self.read_json(n) for n in names]
        with ThreadPoolExecutor(32) as pool:  # one round trip each on an object store
            return list(pool.map(self.read_json, names))

    def complete_units(self) -> set[str]:
        return {e["unit"] for e in self.manifest() if not e["summary"].get("failed", False)}

    def files_of(self, table: str, manifest: list[dict] | None = None) -> list[str]:
        """The complete files of one table (paths inside the filesystem), in unit order."""
        files = []
        for e in self.manifest() if manifest is None else manifest:
            named = e["files"].get(table, [])
            files += [self.path(f) for f in ([named] if isinstance(named, str) else named)]
        if table == "runs":
            files += [self.path(f) for f in self.list("runs", ".parquet")]
        return files

    def write_runs(self, row: dict) -> None:
        self.write_table(pa.Table.from_pylist([row], schema=TABLES["runs"]), "runs/run.parquet")
