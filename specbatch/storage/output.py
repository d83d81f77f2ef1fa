"""The output folder: one Parquet file per table per shard, and a manifest that says which
shards are complete.

    out/
      run.json                     identity of the run (fingerprint of model, config, input)
      generations/shard-00003.parquet
      requests/shard-00003.parquet
      steps/shard-00003.parquet
      errors/plan.parquet          bad input rows, found while planning
      errors/shard-00003.parquet   requests that failed while generating
      runs/run.parquet
      manifest/shard-00003.json    written last: the shard's files are all in place

A shard's data files are written first, each atomically, then its manifest entry. The views
read only files named by manifest entries, so a shard cut off between files is invisible and,
having no entry, is redone on resume (its files are replaced under the same names: nothing is
duplicated).
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa

from .atomic import remove_stale_temporaries, write_json, write_parquet
from .schema import TABLES

PLAN = "plan"


class OutputDir:
    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    @property
    def run_file(self) -> Path:
        return self.root / "run.json"

    def manifest_file(self, unit: str) -> Path:
        return self.root / "manifest" / f"{unit}.json"

    def table_file(self, table: str, unit: str) -> Path:
        return self.root / table / f"{unit}.parquet"

    def read_run(self) -> dict | None:
        return json.loads(self.run_file.read_text()) if self.run_file.exists() else None

    def write_run(self, meta: dict) -> None:
        write_json(meta, self.run_file)

    def clean(self) -> int:
        return remove_stale_temporaries(self.root)

    def write_unit(self, unit: str, tables: dict[str, pa.Table], summary: dict | None = None) -> None:
        """Write a shard's (or the plan's) tables, then its manifest entry."""
        files = {}
        for name, table in tables.items():
            if name not in TABLES:
                raise ValueError(f"unknown table {name!r}")
            table = table.cast(TABLES[name])
            path = self.table_file(name, unit)
            write_parquet(table, path)
            files[name] = str(path.relative_to(self.root))
        write_json({"unit": unit, "files": files, "summary": summary or {}}, self.manifest_file(unit))

    def is_complete(self, unit: str) -> bool:
        """Finished for good: a shard that ran out of attempts is not, so a rerun retries it."""
        path = self.manifest_file(unit)
        return path.exists() and not json.loads(path.read_text())["summary"].get("failed", False)

    def manifest(self) -> list[dict]:
        folder = self.root / "manifest"
        if not folder.exists():
            return []
        return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]

    def files_of(self, table: str) -> list[Path]:
        """The complete files of one table, in unit order."""
        files = [self.root / e["files"][table] for e in self.manifest() if table in e["files"]]
        if table == "runs":
            files += sorted((self.root / "runs").glob("*.parquet"))
        return files

    def write_runs(self, row: dict) -> None:
        write_parquet(pa.Table.from_pylist([row], schema=TABLES["runs"]), self.root / "runs" / "run.parquet")
