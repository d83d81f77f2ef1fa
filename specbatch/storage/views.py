"""DuckDB views over an output folder (local or a URI): one view per table, named after it.

    con = connect("out/")          # or connect("s3://bucket/jobs/run-7")
    con.execute("select method, avg(completion_tokens) from requests group by 1").fetchall()

Views read only complete files (those named by the manifest). Local files are read by DuckDB
itself; files on an object store through pyarrow's filesystem (a dataset DuckDB scans lazily),
so no DuckDB extension needs downloading. A table with no files yet is an empty view with the
right columns, so queries never fail on a fresh or partial run. An incremental job's root
(flows/incremental.py) reads as the union of its dated runs.
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import pyarrow.dataset as ds

from .output import OutputDir
from .schema import TABLES


def _sql_list(paths: list[str]) -> str:
    return "[" + ", ".join("'" + p.replace("'", "''") + "'" for p in paths) + "]"


def connect(out_dir: Path | str, database: str = ":memory:") -> duckdb.DuckDBPyConnection:
    out = OutputDir(out_dir)
    if not out.exists():
        raise FileNotFoundError(f"output folder {out.uri!r} does not exist")
    con = duckdb.connect(database)
    runs = [(run, run.manifest()) for run in out.runs()]
    for name, schema in TABLES.items():
        files = [f for run, manifest in runs for f in run.files_of(name, manifest)]
        if files and out.local:
            # by name: files an older version wrote (a resumed or incremental job) lack newer columns
            con.execute(f"CREATE OR REPLACE VIEW {name} AS SELECT * FROM read_parquet({_sql_list(files)}, union_by_name = true)")
            continue
        source = ds.dataset(files, schema=schema, filesystem=out.fs, format="parquet") if files else schema.empty_table()
        con.register(f"_{name}_source", source)
        con.execute(f"CREATE OR REPLACE VIEW {name} AS SELECT * FROM _{name}_source")
    return con
