"""`specbatch bench` end to end on tiny workloads: every system runs on the real demo models,
rows land in Parquet with the documented columns, greedy rows match hf-generate."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from specbatch.bench import runner
from specbatch.bench.workloads import Workload, make_workloads
from specbatch.cli import main

pytestmark = pytest.mark.slow


def test_workloads_are_deterministic_and_round_trip_through_text():
    from transformers import AutoTokenizer

    from specbatch.workers.models import DEMO_MODELS

    tok = AutoTokenizer.from_pretrained(DEMO_MODELS["demo"])
    first, again = make_workloads(tok, quick=True), make_workloads(tok, quick=True)
    assert [w.prompts for w in first] == [w.prompts for w in again]
    assert [w.name for w in first] == ["shared-prefix", "independent", "n4-sampling", "long-outputs"]
    shared = first[0].prompts
    assert len(shared) == 32 and all(p[:150] == shared[0][:150] for p in shared[:8])  # one group's prefix
    for w in first:
        assert all(tok(tok.decode(p))["input_ids"] == p for p in w.prompts)


def tiny(tokenizer, quick):
    full = make_workloads(tokenizer, quick=True)
    return [
        Workload("shared-prefix", full[0].prompts[:4], max_new_tokens=6),
        Workload("n4-sampling", full[2].prompts[:4], 6, temperature=0.8, samples_per_prompt=4),
    ]


def test_bench_runs_every_system_and_writes_rows(prefect_server, ray_cluster, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(runner, "make_workloads", tiny)
    assert main(["bench", "--quick", "--out", str(tmp_path), "--batch-sizes", "2"]) == 0
    rows = pq.read_table(tmp_path / "bench.parquet").to_pylist()
    systems = {r["system"] for r in rows}
    assert systems == {
        "hf-generate",
        "hf-generate-batch",
        "hf-assisted",
        "specbatch-ar-unshared",
        "specbatch-ar",
        "specbatch-draft-k4",
        "specbatch-draft-adaptive",
        "specbatch-ngram",
        "specbatch-ngram-adaptive",
        "specbatch-lookahead-adaptive",
        "specbatch-auto",
        "specbatch-ar-control",
        "specbatch-pipeline",
    }
    assert set(rows[0]) == set(runner.SCHEMA.names)
    for r in rows:
        assert r["output_tokens"] > 0 and r["seconds"] > 0 and 0 < r["mfu"] < 1
        engine = r["system"].startswith("specbatch-") and r["system"] != "specbatch-pipeline"
        assert (r["arm_steps"] is not None) == (engine and r["method"] != "ar"), r["system"]
        if r["arm_steps"]:  # decode steps by what drafted them, and what that drafting got accepted
            arms = dict(part.split(":") for part in r["arm_steps"].split())
            assert set(arms) <= {"ar", "draft", "ngram", "lookahead", "layerskip"} and all(int(n) > 0 for n in arms.values())
            assert 0 <= r["accepted_tokens"] <= r["drafted_tokens"]
            assert r["drafted_tokens"] == 0 or set(arms) != {"ar"}, r  # (a lookahead window may ride and draft nothing)
        if r["workload"] == "shared-prefix":
            assert r["identical_to_reference"] is True, r["system"]
        else:
            assert r["identical_to_reference"] is None
    assert (tmp_path / "bench.png").stat().st_size > 10_000
    printed = capsys.readouterr().out
    assert "x hf-generate-batch" in printed and "x specbatch-ar" in printed and "paired x ar" in printed
    assert "min x specbatch-ar, specbatch-auto: fastest" in printed and "min x specbatch-ar, specbatch-ar-control: fastest" in printed
    ar = next(r for r in rows if r["system"] == "specbatch-ar")  # the fastest of its runs, one beside each pair under the bar
    for r in rows:
        if r["system"] == "specbatch-pipeline":
            assert r["fastest_x_ar"] is None and r["paired_x_ar"] is None
        elif r["system"] == "specbatch-ar":
            assert r["fastest_x_ar"] == r["paired_x_ar"] == 1.0
        else:  # one round: the fastest run is the paired one, against an ar run no faster than ar's fastest
            assert r["fastest_x_ar"] == r["paired_x_ar"], r
            if r["workload"] == ar["workload"] and r["batch_size"] == ar["batch_size"]:
                assert r["fastest_x_ar"] >= round(ar["seconds"] / r["seconds"], 2) - 0.01, r


def test_bench_on_a_random_model_as_used_for_gpu_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "make_workloads", tiny)
    table = runner.run_bench(tmp_path, quick=True, batch_sizes=[4], model="random-tiny").to_pylist()
    assert {r["model"] for r in table} == {"random-tiny"}
    assert "specbatch-pipeline" not in {r["system"] for r in table}  # the pipeline row serves the demo models
    assert all(r["bandwidth_bound_tokens_per_s"] is None for r in table)  # CPU: no bandwidth bound
    assert all(r["identical_to_reference"] for r in table if r["workload"] == "shared-prefix")


def test_bench_runs_the_systems_asked_for_and_keeps_the_fastest_of_repeats(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "make_workloads", tiny)
    runs = []
    real = runner.SYSTEMS

    def counted(name, fn):
        def run(*args):
            m = fn(*args)
            runs.append((name, m.seconds))
            return m

        return run

    monkeypatch.setattr(runner, "SYSTEMS", [(n, method, counted(n, fn), only) for n, method, fn, only in real])
    table = runner.run_bench(
        tmp_path, quick=True, batch_sizes=[2], model="random-tiny", systems=["hf-generate", "specbatch-auto"], repeat=2
    ).to_pylist()
    assert {r["system"] for r in table} == {"hf-generate", "specbatch-auto"} and len(table) == 4  # 2 workloads
    assert [n for n, _ in runs[:4]] == ["hf-generate", "specbatch-auto", "specbatch-auto", "hf-generate"]  # alternated
    for r, cell in zip(table, [runs[0:4], runs[0:4], runs[4:8], runs[4:8]]):  # rows: hf, auto per workload
        assert r["seconds"] == min(seconds for name, seconds in cell if name == r["system"])
        assert r["fastest_x_ar"] is None and r["paired_x_ar"] is None  # specbatch-ar did not run
    assert all(r["identical_to_reference"] for r in table if r["workload"] == "shared-prefix")
    with pytest.raises(ValueError, match="unknown bench systems"):
        runner.check_systems(["specbatch-nope"])


def test_bench_runs_the_workloads_asked_for(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "make_workloads", tiny)
    table = runner.run_bench(
        tmp_path, quick=True, batch_sizes=[2], model="random-tiny", systems=["specbatch-ar"], workloads=["n4-sampling"]
    ).to_pylist()
    assert [(r["workload"], r["system"]) for r in table] == [("n4-sampling", "specbatch-ar")]
    with pytest.raises(ValueError, match="unknown bench workloads"):
        runner.check_workloads(["shared"])
    assert main(["bench", "--out", str(tmp_path), "--workloads", "shared"]) == 2  # before any model loads


def test_a_short_cell_runs_more_rounds_in_forward_backward_pairs(tmp_path, monkeypatch):
    """--repeat rounds, then, in a cell that took under --cell-seconds, more in pairs, up to
    eight times --repeat; a long cell runs --repeat only."""
    assert [runner.more_rounds(done, 3, 1.0, 10.0) for done in range(25)] == [True] * 24 + [False]
    assert [runner.more_rounds(done, 3, 50.0, 10.0) for done in range(4)] == [True, True, True, False]
    assert runner.more_rounds(3, 2, 50.0, 10.0)  # the second of a pair begun while the cell was short
    assert not runner.more_rounds(2, 2, 1.0, 0.0) and not runner.more_rounds(1, 1, 1.0, 0.0)
    # --lean-rounds: that many more in any cell, however long it took, still in pairs, still capped
    assert [runner.more_rounds(done, 3, 50.0, 10.0, lean=2) for done in range(6)] == [True] * 5 + [False]
    assert [runner.more_rounds(done, 3, 50.0, 0.0, lean=1) for done in range(6)] == [True] * 5 + [False]
    assert [runner.more_rounds(done, 1, 50.0, 0.0, lean=20) for done in range(9)] == [True] * 8 + [False]
    monkeypatch.setattr(runner, "make_workloads", tiny)
    runs = []
    monkeypatch.setattr(
        runner, "SYSTEMS", [(n, m, lambda *a, fn=fn: runs.append(1) or fn(*a), only) for n, m, fn, only in runner.SYSTEMS]
    )
    args = dict(quick=True, batch_sizes=[2], model="random-tiny", systems=["specbatch-ar"], workloads=["n4-sampling"], repeat=2)
    runner.run_bench(tmp_path, **args, cell_seconds=3600.0)
    assert len(runs) == 16
    runs.clear()
    runner.run_bench(tmp_path, **args)
    assert len(runs) == 2
    runs.clear()
    runner.run_bench(tmp_path, **args, lean_rounds=2)
    assert len(runs) == 4
    assert main(["bench", "--out", str(tmp_path), "--cell-seconds", "-1"]) == 2
    assert main(["bench", "--out", str(tmp_path), "--lean-rounds", "-1"]) == 2


def test_a_short_cells_further_rounds_run_plain_decoding_and_the_systems_under_the_bar(tmp_path, monkeypatch):
    """Rounds beyond --repeat are for the paired ratios: specbatch-ar and the adaptive systems,
    auto and the control run in them, the rest only in the first --repeat."""
    names = ["hf-generate", "specbatch-ar", "specbatch-ngram", "specbatch-ngram-adaptive", "specbatch-auto", "specbatch-ar-control"]
    assert runner.lean_round(names) == ["specbatch-ar", "specbatch-ngram-adaptive", "specbatch-auto", "specbatch-ar-control"]
    monkeypatch.setattr(runner, "make_workloads", tiny)
    runs = []
    monkeypatch.setattr(
        runner, "SYSTEMS", [(n, m, lambda *a, n=n, fn=fn: runs.append(n) or fn(*a), only) for n, m, fn, only in runner.SYSTEMS]
    )
    runner.run_bench(
        tmp_path, quick=True, batch_sizes=[2], model="random-tiny", workloads=["n4-sampling"], repeat=1, cell_seconds=3600.0,
        systems=["specbatch-ar", "specbatch-ngram", "specbatch-ngram-adaptive"],
    )  # fmt: skip
    assert runs.count("specbatch-ngram") == 1
    assert runs.count("specbatch-ngram-adaptive") == runner.EXTRA_ROUNDS
    assert runs.count("specbatch-ar") == 2 * runner.EXTRA_ROUNDS  # beside the adaptive one, before and after


def test_the_paired_ratio_is_the_median_of_each_rounds_ratio():
    """A slow spell that lasts a round slows both systems of that round: their ratio holds."""
    assert runner.paired_ratio([1.0, 3.0, 1.1], [1.25, 3.0, 1.0]) == 1.0  # rounds: 0.8, 1.0, 1.1
    assert runner.paired_ratio([1.0, 3.0], [1.0]) is None  # not every round
    assert runner.paired_ratio([], []) is None
    assert runner.to_base([(1.0, 1.25), (3.0, 3.0), (1.1, 1.2)]) == (0.83, 0.92)  # 1.0 / 1.2; rounds 0.8, 1.0, 0.92
    assert runner.to_base([]) == (None, None)


def test_each_system_under_the_bar_runs_between_two_runs_of_plain_decoding():
    """A slow spell of this machine lasts seconds, less than a round: each adaptive system (and
    the control) runs between two specbatch-ar runs, forward and backward, and its ratios are
    taken against their mean (a drift across the three cancels), not a run a dozen systems away."""
    systems = ["hf", "specbatch-ar", "k4", "draft-adaptive", "specbatch-auto", "ngram-adaptive", "specbatch-ar-control"]
    forward, backward = (runner.round_order(systems, i, "specbatch-ar", runner.under_the_bar) for i in (0, 1))
    assert forward == [
        "hf", "k4", "specbatch-ar", "draft-adaptive", "specbatch-ar", "specbatch-auto", "specbatch-ar",
        "ngram-adaptive", "specbatch-ar", "specbatch-ar-control", "specbatch-ar",
    ]  # fmt: skip
    assert backward == forward[::-1]
    for order in (forward, backward):
        for i, s in enumerate(order):
            if runner.under_the_bar(s):
                assert order[i - 1] == order[i + 1] == "specbatch-ar", (s, order)
    assert runner.round_order(["hf", "specbatch-auto"], 0, "specbatch-ar", runner.under_the_bar) == ["hf", "specbatch-auto"]
    seconds = [("hf", 5.0), ("k4", 2.0), ("specbatch-ar", 1.0), ("draft-adaptive", 1.0), ("specbatch-ar", 1.5),
               ("specbatch-auto", 1.4), ("specbatch-ar", 2.5), ("hf", 2.6), ("specbatch-ar", 2.0),
               ("specbatch-ar", 2.75), ("k4", 2.6)]  # fmt: skip
    assert runner.pairs(seconds, "specbatch-ar") == [
        ("hf", (1.0, 5.0)),  # the nearest
        ("k4", (1.0, 2.0)),
        ("specbatch-ar", (1.0, 1.0)),  # itself, not its neighbours
        ("draft-adaptive", (1.25, 1.0)),  # the mean of the two beside it
        ("specbatch-ar", (1.5, 1.5)),
        ("specbatch-auto", (2.0, 1.4)),  # a drift across the three cancels
        ("specbatch-ar", (2.5, 2.5)),
        ("hf", (2.25, 2.6)),
        ("specbatch-ar", (2.0, 2.0)),
        ("specbatch-ar", (2.75, 2.75)),
        ("k4", (2.75, 2.6)),  # one beside it: that one
    ]
    assert runner.pairs([("hf", 1.0)], "specbatch-ar") == []


def test_minima_name_each_adaptive_systems_lowest_cell_and_the_noise_of_plain_against_itself():
    def row(system, workload, batch, fastest, paired):
        return dict(system=system, workload=workload, batch_size=batch, fastest_x_ar=fastest, paired_x_ar=paired)

    rows = [
        row("specbatch-ar", "a", 1, 1.0, 1.0),
        row("specbatch-auto", "a", 1, 1.5, 1.4),
        row("specbatch-ar-control", "a", 1, 0.97, 0.99),
        row("specbatch-ar", "b", 8, 1.0, 1.0),
        row("specbatch-auto", "b", 8, 0.9, 0.93),
        row("specbatch-ngram-adaptive", "b", 8, 0.98, None),
        row("specbatch-ar-control", "b", 8, 0.93, 0.96),
        row("specbatch-draft-k4", "b", 8, 0.5, 0.5),  # not adaptive: not summarised
    ]
    assert runner.minima(rows) == [
        "min x specbatch-ar, specbatch-auto: fastest 0.90 (b b8; 1 of 2 cells < 0.95), paired 0.93 (b b8; 1 of 2 cells < 0.95)",
        "min x specbatch-ar, specbatch-ngram-adaptive: fastest 0.98 (b b8; 0 of 1 cells < 0.95)",
        "min x specbatch-ar, specbatch-ar-control: fastest 0.93 (b b8; 1 of 2 cells < 0.95), paired 0.96 (b b8; 0 of 2 cells < 0.95)",
    ]


def test_ratios_leave_a_cell_without_output_empty():
    rows = [
        dict(workload="w", batch_size=1, system="specbatch-ar", tokens_per_s=0.0),
        dict(workload="w", batch_size=1, system="specbatch-auto", tokens_per_s=5.0),
    ]
    assert runner.ratios(rows, "specbatch-ar") == [None, None]


def test_bench_prompts_are_bundled_not_read_from_the_running_python():
    from specbatch.bench.workloads import SOURCES, held_out_sources

    texts = held_out_sources()
    assert SOURCES.is_file() and len(texts) == 26 and all(4000 < len(t) <= 12000 for t in texts)


def test_rounds_alternate_direction():
    """A machine that drifts slower through a round favours whatever runs first; forward then
    backward rounds put each system early and late alike."""
    systems = ["a", "b", "c"]
    orders = [runner.round_order(systems, i) for i in range(4)]
    assert orders == [["a", "b", "c"], ["c", "b", "a"], ["a", "b", "c"], ["c", "b", "a"]]
    mean_position = {s: sum(o.index(s) for o in orders) / len(orders) for s in systems}
    assert len(set(mean_position.values())) == 1
