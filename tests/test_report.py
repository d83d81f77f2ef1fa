"""specbatch report: numbers from DuckDB over real output tables (the demo pair, run by the worker's
ShardRunner, no Prefect or Ray needed here), and an HTML page that a real headless browser
(Debian's chromium) renders with every plot decoded."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import pyarrow as pa
import pytest

from specbatch.cli import main
from specbatch.config import RunConfig
from specbatch.report import load
from specbatch.storage import OutputDir
from specbatch.storage.schema import ERRORS
from specbatch.workers.models import load_tokenizer
from specbatch.workers.shard import Shard, ShardRequest
from specbatch.workers.shard_runner import ShardRunner

PROMPTS = ["def add(a, b):\n", "def add(a, b):\n    return", "import os\nimport sys\n", "class Point:\n    def __init__(self"]


def _run(out: Path, method: str) -> None:
    # a fixed K: the report reads what drafted; the adaptive policy may leave a job this short plain
    config = RunConfig.parse(
        input="unused", out=str(out), method=method, max_new_tokens=12, batch_size=4, draft_policy="fixed"
    ).resolved()
    tok = load_tokenizer(config.model)
    requests = [
        ShardRequest(f"p{i}", i + 1, text, tok(text)["input_ids"], 12, seed=i) for i, text in enumerate(PROMPTS)
    ]
    output = OutputDir(out)
    ShardRunner(config).run([Shard("shard-00000", requests[:2]), Shard("shard-00001", requests[2:])], output)
    errors = pa.Table.from_pylist([{"request_id": "bad", "input_index": 9, "stage": "input", "reason": "'prompt' is empty"}], schema=ERRORS)
    output.write_unit("errors-extra", {"errors": errors})


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("report")
    _run(root / "ar", "ar")
    _run(root / "draft", "draft")
    return root / "ar", root / "draft"


def test_report_numbers_come_from_the_tables(runs):
    ar, draft = (load(str(p)) for p in runs)
    assert ar.summary["requests"] == draft.summary["requests"] == len(PROMPTS)
    assert ar.summary["error rows"] == 1 and ar.errors == [("input", "'prompt' is empty", 1)]
    assert ar.methods[0][0] == "ar" and ar.methods[0][2] == 1.0  # one token per target step
    assert draft.methods[0][0] == "draft" and draft.methods[0][2] > 1.0 and 0 < draft.methods[0][3] <= 1
    assert ar.positions == [] and draft.positions and draft.positions[0][1] == 1
    assert all(0 <= p[2] <= 1 for p in draft.positions)
    assert {t[0] for t in draft.throughput} == {"worker-0"} and draft.throughput[-1][2] == draft.summary["completion tokens"]
    assert draft.time_split[0] > 0 and ar.time_split[0] == 0  # only the draft run spends time drafting


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def _distinct_rows(png: bytes) -> int:
    """How many distinct scanlines a (non-interlaced, 8-bit) PNG has: a blank page has one."""
    width, height = _png_size(png)
    data, pos, chunks = png[8:], 0, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        if kind == b"IDAT":
            chunks.append(data[pos + 8 : pos + 8 + length])
        pos += 12 + length
    raw = zlib.decompress(b"".join(chunks))
    stride = len(raw) // height
    return len({raw[i * stride + 1 : (i + 1) * stride] for i in range(height)})


def test_report_renders_its_plots_in_a_headless_browser(runs, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    assert browser, "the report test needs a real browser: apt-get install chromium (Debian's package)"
    html = tmp_path / "report.html"
    assert main(["report", *map(str, runs), "--label", "ar", "--label", "draft", "--html", str(html)]) == 0
    pngs = sorted(tmp_path.glob("report-*.png"))
    assert len(pngs) == 7 and all(_png_size(p.read_bytes())[0] > 300 for p in pngs)
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run(
        [browser, *flags, "--virtual-time-budget=5000", "--dump-dom", html.as_uri()],
        capture_output=True, text=True, timeout=120,
    ).stdout  # fmt: skip
    # the page's own script counts the plots the browser decoded (naturalWidth > 0)
    body = re.search(r"<body[^>]*>", dom)
    assert body, dom[:500]
    assert 'data-plots="7"' in body.group(0) and 'data-plots-rendered="7"' in body.group(0), body.group(0)
    assert "Acceptance by draft position" in dom and ("&#39;prompt&#39; is empty" in dom or "'prompt' is empty" in dom)
    shot = tmp_path / "shot.png"
    subprocess.run(
        [browser, *flags, "--window-size=1200,2400", f"--screenshot={shot}", html.as_uri()],
        capture_output=True, timeout=120, check=True,
    )  # fmt: skip
    assert _png_size(shot.read_bytes()) == (1200, 2400) and _distinct_rows(shot.read_bytes()) > 200
