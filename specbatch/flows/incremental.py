"""Incremental jobs over a growing input: the flow a scheduled deployment runs (`specbatch deploy`).

Each run takes the input files (a folder, a glob or a prefix on an object store) that no earlier
run under the same root took, and generates them into a dated folder of its own:

    ROOT/incremental.json             marks ROOT as an incremental job's root (and names its input)
    ROOT/20261203T020000Z/            one ordinary run folder (run.json, manifest/, generations/...)
    ROOT/20261203T020000Z/inputs.json the files that run took, written before it starts

A run that was cut off (no `runs` row yet) is resumed first, over the same files, before any new
file is taken. A file is taken by its name: append rows in new files, not to old ones (a file
whose size or time changed after it was taken is logged, not read again). `specbatch query ROOT`
and `specbatch report ROOT` read every dated run as one set of tables.
"""

# no `from __future__ import annotations`: Prefect validates the parameters of a served run against
# the real RunConfig class, which a string annotation would leave undefined in its model

import logging
from datetime import UTC, datetime

from prefect import flow, get_run_logger

from ..config import RunConfig
from ..errors import SpecbatchError
from ..storage import OutputDir
from ..storage.output import INCREMENTAL_INPUTS as INPUTS
from ..storage.output import INCREMENTAL_MARKER as MARKER
from .generate import generate, report_or_warn
from .inputs import open_source


@flow(name="specbatch-incremental", log_prints=True)
def incremental(config: RunConfig) -> dict:
    """Generate the input files no earlier run under config.out took, into config.out/<UTC time>/."""
    log = get_run_logger()
    root = OutputDir(config.out)
    root.make()
    if not root.exists(MARKER):
        if root.exists("run.json"):
            raise SpecbatchError(f"{config.out} holds a single run; give an incremental job a root of its own")
        root.write_json({"input": config.input}, MARKER)
    source = open_source(config.input, allow_empty=True)
    now = {f.name: f for f in source.files}
    taken: dict[str, dict] = {}
    unfinished = []
    for name in root.dated_runs():
        files = root.read_json(f"{name}/{INPUTS}")["files"]
        taken |= {f["name"]: f for f in files}
        if not root.child(name).exists("runs/run.parquet"):
            unfinished.append((name, [f["name"] for f in files]))
    for name, f in taken.items():
        if name in now and (now[name].size, now[name].mtime_ns) != (f["size"], f["mtime_ns"]):
            logging.getLogger("specbatch").warning("%s changed after a run took it; it is not read again", name)

    summaries = []
    for name, files in unfinished:
        log.info("resuming %s (%d files)", name, len(files))
        summaries.append(_run(config, name, files))
    new = [f for f in source.files if f.name not in taken]
    if not new:
        log.info("no new input files under %s", config.input)
    else:
        name = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        files = [{"name": f.name, "size": f.size, "mtime_ns": f.mtime_ns} for f in new]
        root.write_json({"files": files}, f"{name}/{INPUTS}")
        log.info("%s takes %d new files: %s", name, len(new), ", ".join(f.name for f in new[:10]))
        summaries.append(_run(config, name, [f.name for f in new]))
    return {
        "root": config.out,
        "report": report_or_warn(root) if summaries else None,  # the whole job so far, in one report
        "runs": [s["out"] for s in summaries],
        "new_files": [f.name for f in new],
        "resumed": [name for name, _ in unfinished],
        "generations": sum(s["generations"] for s in summaries),
    }


def _run(config: RunConfig, name: str, files: list[str]) -> dict:
    out = OutputDir(config.out).child(name).uri
    return generate(config.model_copy(update={"out": out, "input_files": tuple(files)}))
