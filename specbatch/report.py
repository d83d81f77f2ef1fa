"""`specbatch report OUT [OUT ...]`: one self-contained HTML file (and its plots as PNGs) of a run,
or of several runs side by side. Every number comes from DuckDB over the runs' Parquet (the views
of storage/views.py); the plots are matplotlib's, embedded as base64 PNGs so the file opens
anywhere, offline, with nothing beside it.

What it shows, per run: tokens per target step and acceptance by method; acceptance by draft
position; the K the draft policy chose over the run; throughput over time per worker;
prefix-sharing savings; the decode time split between draft, target and the rest; error rows by
reason.
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field, replace
from pathlib import Path

from .storage import connect

MAX_POSITIONS = 16  # draft positions shown (the most K may be)


@dataclass
class Section:
    title: str
    what: str  # one line on how to read it
    png: bytes | None = None
    table: tuple[list[str], list[tuple]] | None = None


@dataclass
class RunData:
    label: str
    summary: dict
    methods: list[tuple]  # method, requests, tokens/target step, acceptance, completion tokens
    positions: list[tuple]  # the request's method, position, acceptance at that position
    chosen_k: list[tuple]  # the request's method, decode step, mean K
    throughput: list[tuple]  # worker, finished_at (s from start), cumulative completion tokens
    time_split: tuple  # draft s, target s, other s (summed over requests)
    errors: list[tuple] = field(default_factory=list)  # stage, reason, rows


def load(out: str, label: str | None = None) -> RunData:
    con = connect(out)
    q = lambda sql: con.execute(sql).fetchall()  # noqa: E731
    (summary,) = q(
        """select count(*), coalesce(sum(prompt_tokens), 0), coalesce(sum(cached_prefix_tokens), 0),
                  coalesce(sum(completion_tokens), 0), coalesce(sum(target_steps), 0) from requests"""
    )
    (errors,) = q("select count(*) from errors")
    runs = q("select run_id, model, method from runs order by finished_at")
    requests, prompt, cached, completion, steps = summary
    return RunData(
        label=label or (runs[-1][0] if runs else Path(str(out).rstrip("/")).name),
        summary={
            "runs": ", ".join(r[0] for r in runs) or "(not finished)",
            "model": ", ".join(sorted({Path(r[1]).name for r in runs})),
            "method": ", ".join(sorted({r[2] for r in runs})),
            "requests": requests,
            "error rows": errors[0],
            "prompt tokens": prompt,
            "prefix-cached prompt tokens": cached,
            "prefix sharing saves": f"{cached / prompt:.1%}" if prompt else "-",
            "completion tokens": completion,
            "tokens per target step": round(completion / steps, 3) if steps else "-",
        },
        methods=q(
            """select method, count(*), sum(completion_tokens) / nullif(sum(target_steps), 0),
                      sum(accepted_tokens) / nullif(sum(drafted_tokens), 0), sum(completion_tokens)
               from requests group by 1 order by 1"""
        ),
        positions=q(
            f"""select r.method, p.pos, count(*) filter (where s.accepted >= p.pos) / count(*)
                from steps s join requests r using (request_id, sample_index), range(1, {MAX_POSITIONS + 1}) p(pos)
                where s.drafted >= p.pos group by 1, 2 order by 1, 2"""
        ),
        chosen_k=q(
            """select r.method, s.step, avg(s.num_draft) from steps s join requests r using (request_id, sample_index)
               group by 1, 2 order by 1, 2"""
        ),
        throughput=q(
            """select worker, epoch(finished_at) - min(epoch(finished_at) - seconds) over (),
                      sum(completion_tokens) over (partition by worker order by finished_at)
               from shards order by worker, finished_at"""
        ),
        time_split=q(
            """select coalesce(sum(draft_seconds), 0), coalesce(sum(target_seconds), 0),
                      coalesce(sum(greatest(decode_seconds + prefill_seconds - target_seconds - draft_seconds, 0)), 0)
               from requests"""
        )[0],
        errors=q("select stage, reason, count(*) from errors group by 1, 2 order by 3 desc, 1, 2 limit 20"),
    )


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def sections(runs: list[RunData]) -> list[Section]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    bars = [(r.label, m[0], m[2] or 0.0, m[3]) for r in runs for m in r.methods]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.4))
    names = [f"{label}\n{method}" for label, method, _, _ in bars]
    left.bar(names, [b[2] for b in bars], color="#4477aa")
    left.set_ylabel("tokens per target step")
    right.bar(names, [b[3] or 0.0 for b in bars], color="#ee6677")
    right.set_ylabel("acceptance (accepted / drafted)")
    right.set_ylim(0, 1)
    for ax in (left, right):
        ax.tick_params(axis="x", labelsize=8)
    out.append(
        Section(
            "Tokens per target step and acceptance, by method",
            "Completion tokens per forward of the target (1.0 is plain decoding), and the share of drafted tokens the target accepted.",
            _png(fig),
            (["run", "method", "requests", "tokens / target step", "acceptance", "completion tokens"],
             [(r.label, m[0], m[1], _round(m[2]), _round(m[3]), m[4]) for r in runs for m in r.methods]),
        )
    )

    fig, ax = plt.subplots(figsize=(6, 3.4))
    for r in runs:
        for method in sorted({p[0] for p in r.positions}):
            points = [(p[1], p[2]) for p in r.positions if p[0] == method]
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"{r.label} {method}")
    _finish(ax, "draft position", "P(accepted | drafted)", bool(any(r.positions for r in runs)))
    ax.set_ylim(0, 1)
    out.append(Section("Acceptance by draft position", "Of the steps that drafted a token at this position, the share whose token there was accepted.", _png(fig)))

    fig, ax = plt.subplots(figsize=(6, 3.4))
    for r in runs:
        for method in sorted({k[0] for k in r.chosen_k}):
            points = [(k[1], k[2]) for k in r.chosen_k if k[0] == method]
            ax.plot([p[0] for p in points], [p[1] for p in points], label=f"{r.label} {method}")
    _finish(ax, "decode step of a request", "mean K chosen", bool(any(r.chosen_k for r in runs)))
    out.append(Section("The K the policy chose over the run", "Tokens the draft policy asked for, averaged over the requests at each of their decode steps (0: it drafted nothing).", _png(fig)))

    fig, ax = plt.subplots(figsize=(6, 3.4))
    for r in runs:
        for worker in sorted({t[0] for t in r.throughput}):
            points = [(t[1], t[2]) for t in r.throughput if t[0] == worker]
            ax.step([0] + [p[0] for p in points], [0] + [p[1] for p in points], where="post", label=f"{r.label} {worker}")
    _finish(ax, "seconds since the first shard began", "completion tokens written", bool(any(r.throughput for r in runs)))
    out.append(Section("Throughput over time, per worker", "Cumulative completion tokens of the shards each worker finished; the slope is its tokens/s.", _png(fig)))

    fig, ax = plt.subplots(figsize=(6, 3.0))
    labels = [r.label for r in runs]
    prompt = [r.summary["prompt tokens"] for r in runs]
    cached = [r.summary["prefix-cached prompt tokens"] for r in runs]
    ax.barh(labels, [p - c for p, c in zip(prompt, cached)], color="#4477aa", label="computed")
    ax.barh(labels, cached, left=[p - c for p, c in zip(prompt, cached)], color="#228833", label="shared prefix, computed once")
    _finish(ax, "prompt tokens", "", True)
    out.append(Section("Prefix sharing", "Prompt tokens the target computed, and those a shared prefix saved.", _png(fig)))

    fig, ax = plt.subplots(figsize=(6, 3.0))
    parts = [("draft", 0, "#ee6677"), ("target", 1, "#4477aa"), ("other (host work, sampling, verify)", 2, "#bbbbbb")]
    left_edge = [0.0] * len(runs)
    for name, i, color in parts:
        total = [sum(r.time_split) or 1.0 for r in runs]
        share = [r.time_split[i] / t for r, t in zip(runs, total)]
        ax.barh(labels, share, left=left_edge, color=color, label=name)
        left_edge = [a + b for a, b in zip(left_edge, share)]
    _finish(ax, "share of request decode time", "", True)
    ax.set_xlim(0, 1)
    out.append(Section("Where decode time went", "Per request, summed over requests: draft forwards, target forwards, and the rest of each step.", _png(fig)))

    rows = [(r.label, e[0], e[1], e[2]) for r in runs for e in r.errors]
    fig, ax = plt.subplots(figsize=(6, max(1.6, 0.4 * len(rows) + 0.8)))
    if rows:
        ax.barh([f"{lab}: {stage}: {reason[:50]}" for lab, stage, reason, _ in rows][::-1], [n for *_, n in rows][::-1], color="#aa3377")
    _finish(ax, "error rows", "", False, empty="no error rows" if not rows else None)
    out.append(Section("Error rows by reason", "Input rows that produced no generation, grouped by stage and reason.", _png(fig), (["run", "stage", "reason", "rows"], rows)))
    return out


def _round(x):
    return round(x, 3) if isinstance(x, float) else x


def _finish(ax, xlabel: str, ylabel: str, legend: bool, empty: str | None = None) -> None:
    ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    if legend and ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    if not ax.has_data() or empty:
        ax.text(0.5, 0.5, empty or "nothing drafted in these runs", ha="center", va="center", transform=ax.transAxes, color="#777777")
    ax.grid(alpha=0.3)


def _html_table(columns: list[str], rows: list[tuple]) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render(runs: list[RunData], parts: list[Section]) -> str:
    summary = _html_table(["", *[r.label for r in runs]], [(k, *[r.summary[k] for r in runs]) for k in runs[0].summary])
    blocks = []
    for i, s in enumerate(parts):
        img = ""
        if s.png is not None:
            data = base64.b64encode(s.png).decode()
            img = f'<img class="plot" alt="{html.escape(s.title)}" src="data:image/png;base64,{data}" id="plot-{i}">'
        table = _html_table(*s.table) if s.table and s.table[1] else ""
        blocks.append(f"<section><h2>{html.escape(s.title)}</h2><p>{html.escape(s.what)}</p>{img}{table}</section>")
    # The page marks itself once every plot has decoded (tests read it from a headless browser).
    script = """<script>
window.addEventListener('load', () => {
  const plots = [...document.querySelectorAll('img.plot')];
  const drawn = plots.filter(p => p.complete && p.naturalWidth > 0).length;
  document.body.dataset.plots = plots.length;
  document.body.dataset.plotsRendered = drawn;
});
</script>"""
    style = """<style>
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: .6em 0; } td, th { border: 1px solid #ddd; padding: 3px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; } section { margin: 2em 0; } img.plot { max-width: 100%; }
h2 { font-size: 1.15em; margin-bottom: .2em; } p { color: #555; margin-top: 0; }
</style>"""
    title = "specbatch report: " + ", ".join(r.label for r in runs)
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>{style}</head>"
        f"<body><h1>{html.escape(title)}</h1>{summary}{''.join(blocks)}{script}</body></html>"
    )


def write_report(outs: list[str], html_path: str | Path, labels: list[str] | None = None) -> Path:
    """Write the HTML report of these output folders, and each plot as a PNG beside it."""
    runs = [load(out, label) for out, label in zip(outs, labels or [None] * len(outs))]
    if len({r.label for r in runs}) < len(runs):  # the same run twice, or folders without runs rows
        runs = [replace(r, label=f"{i + 1}: {r.label}") for i, r in enumerate(runs)]
    parts = sections(runs)
    path = Path(html_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(runs, parts))
    for i, s in enumerate(parts):
        if s.png is not None:
            (path.parent / f"{path.stem}-{i + 1}.png").write_bytes(s.png)
    return path
