"""Run every system on every workload, write one Parquet row per system x workload x batch
size, print the table and plot tokens/s.

Each decode step of a batch reads every weight once, so on a GPU, where decoding is bound by
memory bandwidth, batch x bandwidth / weight bytes bounds output tokens/s; the rows carry that
bound (null on the CPU, where these small models are bound by per-call overhead instead).

MFU here is useful model FLOPs (2 x non-embedding parameters x (prompt + output tokens)) per
second over the device's measured fp32 (CPU) or bf16 (GPU) matmul peak: the same work counts for
every system, whatever it recomputes.
"""

from __future__ import annotations

import gc
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

import pyarrow as pa
import torch

from ..decoding.host_memory import hold_freed_memory
from ..storage.atomic import write_parquet
from ..workers.models import DEMO_MODELS
from .models import load_pair
from .systems import SYSTEMS, Measurement, Models
from .workloads import WORKLOADS, Workload, make_workloads

SCHEMA = pa.schema(
    [
        ("system", pa.string()),
        ("workload", pa.string()),
        ("method", pa.string()),
        ("batch_size", pa.int32()),
        ("num_requests", pa.int32()),
        ("prompt_tokens", pa.int64()),
        ("output_tokens", pa.int64()),
        ("seconds", pa.float64()),
        ("tokens_per_s", pa.float64()),
        ("target_steps", pa.int64()),
        ("drafted_tokens", pa.int64()),
        ("accepted_tokens", pa.int64()),
        ("arm_steps", pa.string()),  # decode steps by what drafted them, e.g. "ngram:9 ar:23"
        ("identical_to_reference", pa.bool_()),  # greedy rows vs hf-generate; null when sampled
        ("peak_memory_bytes", pa.int64()),  # peak RSS growth (CPU: freed memory is held for reuse, so what fits in it shows none) or peak allocated (GPU) during the run
        ("mfu", pa.float64()),
        ("bandwidth_bound_tokens_per_s", pa.float64()),  # GPU: batch x bandwidth / weight bytes; null on CPU
        # this system's fastest run against the fastest of the specbatch-ar runs nearest it (runner.pairs)
        ("fastest_x_ar", pa.float64()),
        # median over the rounds of the nearest specbatch-ar run's seconds / this system's
        ("paired_x_ar", pa.float64()),
        ("model", pa.string()),
        ("device", pa.string()),
    ]
)


def memory_bandwidth(device: str) -> float | None:
    """Bytes per second of a device-to-device copy (read + write), on CUDA; None elsewhere."""
    if not device.startswith("cuda"):
        return None
    x = torch.empty(1 << 28, dtype=torch.float32, device=device)  # 1 GiB
    y = torch.empty_like(x)
    y.copy_(x)
    torch.cuda.synchronize()
    t0, count = time.perf_counter(), 0
    while time.perf_counter() - t0 < 1.0:
        y.copy_(x)
        count += 1
    torch.cuda.synchronize()
    return 2 * x.numel() * x.element_size() * count / (time.perf_counter() - t0)


def matmul_peak_flops(device: str, dtype: torch.dtype, seconds: float = 1.0) -> float:
    n = 1024 if device == "cpu" else 8192
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        count += 1
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return 2 * n**3 * count / (time.perf_counter() - t0)


class PeakMemory:
    """Peak resident memory growth during a block (sampled every 10 ms), or CUDA's own counter."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.peak = 0

    def __enter__(self) -> PeakMemory:
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        import psutil

        self.process = psutil.Process()
        self.base = self.process.memory_info().rss
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.stop.wait(0.01):
            self.peak = max(self.peak, self.process.memory_info().rss - self.base)

    def __exit__(self, *exc) -> None:
        if self.device.startswith("cuda"):
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self.stop.set()
            self.thread.join()


def pipeline_row(workload: Workload, tokenizer, batch_size: int) -> tuple[Measurement, str] | None:
    """The workload as a JSONL file through the whole pipeline: Prefect flow, Ray worker, Parquet."""
    try:
        from ..config import RunConfig
        from ..flows.generate import generate
        from ..storage import connect
    except ImportError as e:  # a GPU box with the engine only
        print(f"pipeline row skipped: {e}")
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "prompts.jsonl"
        texts = tokenizer.batch_decode(workload.prompts)
        path.write_text("".join(json.dumps({"id": f"{i:05d}", "prompt": t}) + "\n" for i, t in enumerate(texts)))
        t0 = time.perf_counter()
        generate(
            RunConfig(
                input=str(path),
                out=str(Path(tmp) / "out"),
                max_new_tokens=workload.max_new_tokens,
                batch_size=batch_size,
                shard_size=len(texts),
                workers=1,
            )
        )
        seconds = time.perf_counter() - t0
        rows = (
            connect(Path(tmp) / "out")
            .execute("select prompt_token_ids, completion_token_ids from generations order by request_id")
            .fetchall()
        )
    same_prompts = all(list(p) == q for (p, _), q in zip(rows, workload.prompts))
    return Measurement([list(c) for _, c in rows], seconds, None), "ar" if same_prompts else "ar (retokenized)"


def check_systems(systems: list[str] | None) -> list[str]:
    """The systems to run: those named (each must be known), or all."""
    return _check("systems", systems, [name for name, *_ in SYSTEMS] + ["specbatch-pipeline"])


def check_workloads(workloads: list[str] | None) -> list[str]:
    """The workloads to run: those named (each must be known), or all."""
    return _check("workloads", workloads, WORKLOADS)


def _check(what: str, names: list[str] | None, known: list[str]) -> list[str]:
    if unknown := sorted(set(names or ()) - set(known)):
        raise ValueError(f"unknown bench {what} {unknown}; choose from {', '.join(known)}")
    return names or known


def run_bench(
    out_dir: Path,
    quick: bool,
    device: str = "cpu",
    batch_sizes: list[int] | None = None,
    model: str = "demo",
    systems: list[str] | None = None,
    repeat: int = 1,
    workloads: list[str] | None = None,
    cell_seconds: float = 0.0,
    lean_rounds: int = 0,
) -> pa.Table:
    """systems: names from SYSTEMS (and specbatch-pipeline) to run; None: all of them. workloads:
    names from make_workloads; None: all of them. repeat:
    rounds per cell; the fastest run of each system is recorded (as timeit does: on a shared
    machine noise only ever adds time), and beside it two ratios to specbatch-ar, each against
    specbatch-ar's runs beside it in its round (pairs: round_order runs every system under the
    bar between two): fastest against fastest, and paired, the median over rounds of the runs'
    ratio, seconds apart, so a slow spell or a drift hits both sides of a ratio alike. cell_seconds: a cell
    that has taken less than this after `repeat` rounds runs more, in forward-backward pairs, up
    to EXTRA_ROUNDS times `repeat` in all: a slow spell of the machine lasts 5-10 s, a round of the short cells
    (batch 8 and 32) 7-35 s, so their fastest runs and medians rest on few spell-free rounds
    (plain decoding against itself measured 0.97-1.06 over a full run's cells with up to eight).
    Those further rounds run only what the paired ratios are for: specbatch-ar and the systems
    under the bar (lean_round); the others' fastest runs are of the first `repeat` rounds.
    lean_rounds: such rounds every cell runs after `repeat`, however long it took (in pairs): at
    batch 1 a cell's `repeat` rounds take longer than any cell_seconds worth giving the short
    cells, and which of five runs of a system missed the machine's slow spells decided its
    fastest (ngram-adaptive's 0.90 at n4-sampling b1; 0.96 with four lean rounds)."""
    from transformers import AutoTokenizer

    wanted = set(check_systems(systems))
    workloads = check_workloads(workloads)
    hold_freed_memory()  # as a worker does: page faults were a cost and a noise (decoding/host_memory.py)

    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    batch_sizes = batch_sizes or ([8] if quick else [1, 8, 32])
    tokenizer = AutoTokenizer.from_pretrained(DEMO_MODELS["demo"])  # workloads use the demo tokenizer's ids
    target, draft = load_pair(model, device, dtype, tokenizer.eos_token_id)
    models = Models(target, draft, tokenizer.eos_token_id, device)
    non_embedding = sum(p.numel() for n, p in target.named_parameters() if "embed" not in n)
    weight_bytes = sum(p.numel() * p.element_size() for p in target.parameters())
    peak = matmul_peak_flops(device, dtype)
    bandwidth = memory_bandwidth(device)
    print(
        f"device {device}: measured matmul peak {peak / 1e9:.1f} GFLOP/s"
        + (f", copy bandwidth {bandwidth / 1e9:.0f} GB/s" if bandwidth else "")
        + f"; target {model}: {non_embedding:,} non-embedding parameters"
    )
    rows = []

    def record(system, method, w: Workload, batch, m: Measurement, memory: int, reference, to_ar=(None, None)):
        out_tokens = sum(len(o) for o in m.outputs)
        identical = None if not w.greedy or reference is None else m.outputs == reference
        rows.append(
            dict(
                system=system,
                workload=w.name,
                method=method,
                batch_size=batch,
                num_requests=len(w.prompts),
                prompt_tokens=w.prompt_tokens,
                output_tokens=out_tokens,
                seconds=m.seconds,
                tokens_per_s=out_tokens / m.seconds,
                target_steps=m.target_steps,
                drafted_tokens=m.drafted,
                accepted_tokens=m.accepted,
                arm_steps=m.arms,
                identical_to_reference=identical,
                peak_memory_bytes=memory,
                mfu=2 * non_embedding * (w.prompt_tokens + out_tokens) / m.seconds / peak,
                bandwidth_bound_tokens_per_s=batch * bandwidth / weight_bytes if bandwidth else None,
                fastest_x_ar=to_ar[0],
                paired_x_ar=to_ar[1],
                model=model,
                device=device,
            )
        )
        r = rows[-1]
        print(
            f"{w.name:14s} {system:26s} batch {batch:3d}: {r['tokens_per_s']:8.1f} tok/s  {m.seconds:6.2f}s  "
            f"identical={identical}" + (f"  accepted {m.accepted}/{m.drafted}  steps {m.arms}" if m.arms else ""),
            flush=True,
        )

    for w in make_workloads(tokenizer, quick):
        if w.name not in workloads:
            continue
        for batch in batch_sizes:
            best: dict[str, tuple[Measurement, int]] = {}
            paired: dict[str, list[tuple[float, float]]] = {}  # per system: (nearest specbatch-ar run, its run), each round
            runs = {  # system: its run and the batch size it runs at (None: every one)
                system: (run, size) for system, _, run, size in SYSTEMS
                if system in wanted and (size is None or batch == batch_sizes[0])  # batch-size-1 systems: once per workload
            }  # fmt: skip
            started, round_index = time.perf_counter(), 0
            while more_rounds(round_index, repeat, time.perf_counter() - started, cell_seconds, lean_rounds):
                # the systems alternate, so a slow spell of the machine hits them alike
                seconds = []
                names = list(runs) if round_index < repeat else lean_round(list(runs))
                for system in round_order(names, round_index, base="specbatch-ar", beside=under_the_bar):
                    run, size = runs[system]
                    gc.collect()  # the last run's garbage is not this run's to collect
                    with PeakMemory(device) as memory:
                        m = run(models, w, size or batch)
                    seconds.append((system, m.seconds))
                    if system not in best or m.seconds < best[system][0].seconds:
                        best[system] = (m, memory.peak)
                for system, pair in pairs(seconds, "specbatch-ar"):
                    paired.setdefault(system, []).append(pair)
                round_index += 1
            reference = best["hf-generate"][0].outputs if "hf-generate" in best else None
            for system, method, _, size in SYSTEMS:
                if system in best:
                    record(system, method, w, size or batch, *best[system], reference, to_base(paired.get(system, [])))
            if w.name == "shared-prefix" and batch == batch_sizes[-1] and model == "demo" and "specbatch-pipeline" in wanted:
                with PeakMemory(device) as memory:
                    result = pipeline_row(w, tokenizer, batch)
                if result is not None:
                    record("specbatch-pipeline", result[1], w, batch, result[0], memory.peak, reference)
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_parquet(table, out_dir / "bench.parquet")
    plot(table, out_dir / "bench.png")
    return table


EXTRA_ROUNDS = 8  # a short cell runs up to this many times --repeat rounds (more_rounds)


def more_rounds(done: int, repeat: int, elapsed: float, cell_seconds: float, lean: int = 0) -> bool:
    """Whether a cell runs another round: `repeat` of them and `lean` more, then, while the cell
    has taken under cell_seconds, more; those beyond `repeat` in forward-backward pairs
    (round_order), up to EXTRA_ROUNDS times `repeat` in all."""
    if done < repeat:
        return True
    return done < EXTRA_ROUNDS * repeat and (done < repeat + lean or (done - repeat) % 2 == 1 or elapsed < cell_seconds)


def lean_round(systems: list[str]) -> list[str]:
    """A cell's rounds beyond --repeat: specbatch-ar and the systems under the bar, whose paired
    ratios (a median over rounds) those rounds are for. Run with the other half-dozen, a round at
    batch 8 took 35-45 s, so a cell of 180 s ran the five rounds of --repeat 5 and no more, and
    each of its medians rested on five ratios (a system that ran only plain steps, as
    specbatch-ar does, measured 0.89 paired in one such cell)."""
    return [s for s in systems if s == "specbatch-ar" or under_the_bar(s)]


def under_the_bar(system: str) -> bool:
    """The systems issue 14 holds to 0.95x of specbatch-ar, and the control that measures how
    far noise alone puts specbatch-ar from itself under the same pairing."""
    return system.endswith(("-adaptive", "-auto")) or system == "specbatch-ar-control"


def round_order(systems: list[str], round_index: int, base: str | None = None, beside=lambda s: False) -> list[str]:
    """Rounds run the systems forward, then backward (A B C, C B A, ...): this machine drifts by
    20-30% over a few minutes (one system alone, 14 runs in a row: 1.28 s to 1.74 s), so a fixed
    order makes the systems late in a round slower than those early in it.

    Where `base` is among them, the systems `beside` selects run last, each between two runs of
    base (X Y base A base B base): a slow spell of this machine lasts 5-10 s (plain decoding
    alone, 14 runs of 1 s: eleven at 0.97-1.04 s, three in a row at 1.23-1.33 s), shorter than a
    round of a dozen systems, so a ratio to base's one run a round elsewhere could land in a
    spell on one side only (plain decoding against itself, base once a round: 0.77-0.87 at the
    lowest cell of a full run), and a ratio to the mean of the runs either side of it cancels a
    drift across the three (pairs)."""
    order = systems
    held = [s for s in systems if s != base and beside(s)]
    if base in systems and held:
        order = [s for s in systems if s != base and not beside(s)] + [base]
        for s in held:
            order += [s, base]
    return order if round_index % 2 == 0 else order[::-1]


def pairs(seconds: list[tuple[str, float]], base: str) -> list[tuple[str, tuple[float, float]]]:
    """Each run of a round, (system, seconds) in the order run, with the seconds of base beside
    it: the mean of base's runs right before and after it where both are base's (round_order's
    sandwich), else base's run nearest it (the earlier on a tie); base is paired with itself.
    Empty where base did not run."""
    at = [i for i, (s, _) in enumerate(seconds) if s == base]
    if not at:
        return []

    def beside(i: int) -> float:
        if seconds[i][0] != base and 0 < i < len(seconds) - 1 and seconds[i - 1][0] == seconds[i + 1][0] == base:
            return (seconds[i - 1][1] + seconds[i + 1][1]) / 2
        return seconds[min(at, key=lambda j: (abs(j - i), j))][1]

    return [(s, (beside(i), t)) for i, (s, t) in enumerate(seconds)]


def to_base(pairs: list[tuple[float, float]]) -> tuple[float | None, float | None]:
    """From (base's seconds, a system's seconds) per round: the fastest against the fastest and
    the median of the ratios, rounded; None where there are none or a run took no time."""
    if not pairs or min(t for _, t in pairs) <= 0:
        return None, None
    fastest = min(b for b, _ in pairs) / min(t for _, t in pairs)
    return round(fastest, 2), paired_ratio([b for b, _ in pairs], [t for _, t in pairs])


def paired_ratio(base: list[float], seconds: list[float]) -> float | None:
    """The median over rounds of base's seconds over the system's in the same round; None where
    either did not run each round or a run took no time."""
    if not base or len(base) != len(seconds) or min(seconds) <= 0:
        return None
    return round(statistics.median(x / y for x, y in zip(base, seconds)), 2)


def ratios(rows: list[dict], system: str) -> list[float | None]:
    """Each row's tok/s as a ratio to `system`'s on the same workload at the same batch size."""
    base = {(r["workload"], r["batch_size"]): r["tokens_per_s"] for r in rows if r["system"] == system}
    return [
        round(r["tokens_per_s"] / base[key], 2) if base.get(key := (r["workload"], r["batch_size"])) else None
        for r in rows
    ]


def minima(rows: list[dict], bar: float = 0.95) -> list[str]:
    """Per system under the bar (adaptive, auto), the lowest ratio to specbatch-ar over every
    cell where both ran, fastest and paired (fastest_x_ar, paired_x_ar), with the cell and how
    many cells fall below `bar`; then the same for specbatch-ar-control, plain decoding against
    itself: how far from 1 noise alone puts a system that is specbatch-ar."""
    lines = []
    names = [r["system"] for r in rows if under_the_bar(r["system"])]
    for system in sorted(set(names), key=lambda n: (n == "specbatch-ar-control", names.index(n))):
        parts = []
        for label, column in (("fastest", "fastest_x_ar"), ("paired", "paired_x_ar")):
            values = [(r[column], r) for r in rows if r["system"] == system and r[column] is not None]
            if values:
                low, r = min(values, key=lambda v: v[0])
                below = sum(1 for x, _ in values if x < bar)
                parts.append(f"{label} {low:.2f} ({r['workload']} b{r['batch_size']}; {below} of {len(values)} cells < {bar})")
        if parts:
            lines.append(f"min x specbatch-ar, {system}: " + ", ".join(parts))
    return lines


def plot(table: pa.Table, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = table.to_pylist()
    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    systems = list(dict.fromkeys(r["system"] for r in rows))
    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.8 / len(systems)
    for i, system in enumerate(systems):
        best = [
            max((r["tokens_per_s"] for r in rows if r["system"] == system and r["workload"] == w), default=0)
            for w in workloads
        ]
        color = plt.cm.tab20(i % 20)  # more systems than the default cycle's 10 colours
        ax.bar([x + i * width for x in range(len(workloads))], best, width, label=system, color=color)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(workloads))], workloads)
    ax.set_ylabel("output tokens / s (best batch size)")
    ax.set_title(f"specbatch bench: {rows[0]['model']} on {rows[0]['device']}")
    ax.legend(fontsize=8, ncols=2)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.partial.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)
    plt.close(fig)
