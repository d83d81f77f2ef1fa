"""End to end through a real Prefect server, a real local Ray cluster, real Parquet and DuckDB,
and the bundled demo target model."""

from __future__ import annotations

import json

import pytest
import torch

from specbatch.cli import main
from specbatch.config import RunConfig
from specbatch.errors import SpecbatchError
from specbatch.storage import connect
from specbatch.workers.actor import FAULT_ENV
from specbatch.workers.models import DEMO_MODELS

pytestmark = pytest.mark.slow

GOOD = [
    {"id": "add", "prompt": "def add(a, b):\n"},
    {"id": "cls", "prompt": "class Stack:\n    def __init__(self):\n"},
    {"prompt": "import os\n\n", "max_new_tokens": 5},
    {"id": "imp", "prompt": "import sys\nimport os\n"},
    {"id": "chat", "messages": [{"role": "user", "content": "reverse a string"}]},
    {"id": "doc", "prompt": '    """Return the'},
    {"id": "for", "prompt": "for i in range(10):\n"},
    {"id": "try", "prompt": "try:\n    import threading\nexcept ImportError:\n"},
]
BAD = [
    '{"id": "empty", "prompt": ""}',
    "this is not json",
    '{"id": "add", "prompt": "dup"}',
    '{"id": "n", "prompt": 3}',
    json.dumps({"id": "huge", "prompt": "x = 1\n" * 600}),
]
SETTINGS = dict(model="demo", max_new_tokens=12, shard_size=3, batch_size=4, workers=2)


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("input") / "prompts.jsonl"
    lines = [json.dumps(r) for r in GOOD]
    for i, bad in enumerate(BAD):  # bad rows mixed in at lines 2, 4, 6, ...
        lines.insert(1 + 2 * i, bad)
    path.write_text("\n".join(lines) + "\n")
    return path


def snapshot(out) -> dict:
    con = connect(out)
    timing = "exclude (queue_seconds, prefill_seconds, decode_seconds)"
    return {
        "generations": con.execute("select * from generations order by all").fetchall(),
        "requests": con.execute(f"select * {timing} from requests order by all").fetchall(),
        "errors": con.execute("select * from errors order by all").fetchall(),
    }


def run_flow(prompts_file, out, **overrides):
    from specbatch.flows.generate import generate

    return generate(RunConfig(input=str(prompts_file), out=str(out), **(SETTINGS | overrides)))


@pytest.fixture(scope="module")
def finished_run(prefect_server, ray_cluster, prompts_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    summary = run_flow(prompts_file, out)
    return out, summary


def test_rows_in_equal_generations_plus_errors(finished_run, prompts_file):
    out, summary = finished_run
    con = connect(out)
    num_lines = len(prompts_file.read_text().splitlines())
    generations = con.execute("select count(*) from generations").fetchone()[0]
    errors = con.execute("select count(*) from errors").fetchone()[0]
    assert (generations, errors) == (len(GOOD), len(BAD))
    assert generations + errors == num_lines == summary["input_rows"]
    bad_lines = [i for i, line in enumerate(prompts_file.read_text().splitlines(), 1) if line in BAD]
    assert [r[0] for r in con.execute("select input_index from errors order by 1").fetchall()] == bad_lines
    ids = [r[0] for r in con.execute("select request_id from generations").fetchall()]
    assert len(ids) == len(set(ids)) and "line-5" in ids  # the row without an id, at line 5
    reasons = dict(con.execute("select request_id, reason from errors where request_id is not null").fetchall())
    assert "context is 512" in reasons["huge"] and "duplicate id 'add'" in reasons["add"]
    run = con.execute("select run_id, method, model, num_generations, num_errors from runs").fetchall()
    assert run == [(summary["run_id"], "ar", str(DEMO_MODELS["demo"]), len(GOOD), len(BAD))]


def test_greedy_completions_equal_transformers_generate(finished_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = finished_run
    path = DEMO_MODELS["demo"]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    rows = (
        connect(out)
        .execute(
            "select g.request_id, g.prompt_token_ids, g.completion_token_ids, g.completion, g.finish_reason "
            "from generations g order by g.request_id"
        )
        .fetchall()
    )
    for request_id, prompt_ids, completion_ids, completion, finish in rows:
        limit = 5 if request_id == "line-5" else 12
        ids = torch.tensor([prompt_ids])
        ref = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=limit,
            do_sample=False,
            pad_token_id=tok.eos_token_id,
        )[0, len(prompt_ids) :].tolist()
        if tok.eos_token_id in ref:
            ref = ref[: ref.index(tok.eos_token_id)]
            assert finish == "stop"
        assert completion_ids == ref, f"{request_id}: engine differs from transformers generate"
        assert completion == tok.decode(ref, skip_special_tokens=True)


def test_metrics_are_consistent(finished_run):
    out, _ = finished_run
    con = connect(out)
    bad = con.execute(
        "select request_id from requests where target_steps != completion_tokens + (finish_reason = 'stop')::int "
        "or drafted_tokens != 0 or acceptance_rate is not null or method != 'ar'"
    ).fetchall()
    assert bad == []
    assert con.execute("select count(*) from steps").fetchone() == (0,)  # plain decoding records no steps


def test_rerun_changes_nothing_and_changed_settings_are_refused(finished_run, prompts_file):
    out, first = finished_run
    before = snapshot(out)
    again = run_flow(prompts_file, out)
    assert again["shards_run_now"] == 0 and again["run_id"] == first["run_id"]
    assert snapshot(out) == before
    with pytest.raises(SpecbatchError, match=r"temperature \(0.0 -> 0.5\)"):
        run_flow(prompts_file, out, temperature=0.5)


def test_a_worker_dying_mid_shard_is_retried_on_another(
    prefect_server, ray_cluster, prompts_file, tmp_path, finished_run, monkeypatch
):
    monkeypatch.setenv(FAULT_ENV, "shard-00001")
    summary = run_flow(prompts_file, tmp_path)
    assert (tmp_path / ".fault-injected-shard-00001").exists()
    assert summary["retries"] >= 1 and summary["failed_shards"] == 0
    con = connect(tmp_path)
    attempts = dict(con.execute("select shard_id, max(attempt) from requests group by 1").fetchall())
    # shard-00001 ran again; a shard that shared its worker's call may have, if it was unfinished
    assert attempts["shard-00001"] == 2 and set(attempts.values()) <= {1, 2}
    clean_out, _ = finished_run
    assert snapshot(tmp_path)["generations"] == snapshot(clean_out)["generations"]  # nothing lost or duplicated


def test_cli_query_formats(finished_run, capsys):
    out, _ = finished_run
    assert main(["query", str(out), "select method, count(*) as n from requests group by 1", "--format", "csv"]) == 0
    assert capsys.readouterr().out == f"method,n\nar,{len(GOOD)}\n"
    assert main(["query", str(out), "select count(*) as n from errors", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == [{"n": len(BAD)}]
    assert main(["query", str(out), "select nope from requests"]) == 2
    assert "query failed" in capsys.readouterr().err


def test_cli_one_line_errors(tmp_path, capsys):
    assert main(["run", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"error: input '{tmp_path / 'missing.jsonl'}' does not exist"
    (tmp_path / "p.jsonl").write_text('{"prompt": "x"}\n')
    assert main(["run", str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "o"), "--model", "./no-such-model"]) == 2
    assert "model folder './no-such-model' does not exist" in capsys.readouterr().err
    # Options are checked once, up front: one line and exit 2, before Prefect or Ray start.
    for option, value, message in [
        ("--temperature", "-1", "--temperature: input should be greater than or equal to 0, got '-1'"),
        ("--top-p", "1.5", "--top-p: input should be less than or equal to 1, got '1.5'"),
        ("--top-p", "0", "--top-p: input should be greater than 0, got '0'"),
        ("--batch-size", "x", "--batch-size: input should be a valid integer"),
    ]:
        assert main(["run", str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "o"), option, value]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {message}") and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()


def test_demo_command_end_to_end(prefect_server, ray_cluster, tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--max-new-tokens", "8"]) == 0
    printed = capsys.readouterr().out
    assert "specbatch demo: 32 generations, 0 errors" in printed
    assert "greedy outputs identical between ar and draft: 32/32" in printed
    for method in ("ar", "draft"):
        con = connect(out / method)
        assert con.execute("select count(*), min(method), max(method) from requests").fetchone() == (32, method, method)
        limits = dict(con.execute("select request_id, max(completion_tokens) from requests group by 1").fetchall())
        assert limits.pop("files-3") <= 24  # this bundled row sets its own max_new_tokens
        assert max(limits.values()) == 8
    assert connect(out / "draft").execute("select count(*) > 0 from steps").fetchone() == (True,)


def test_draft_method_end_to_end_equals_ar(finished_run, prompts_file, tmp_path):
    """--method draft through Prefect and Ray: the same greedy generations as --method ar,
    per-step rows in `steps`, acceptance in `requests`, the draft in `runs`."""
    ar_out, _ = finished_run
    summary = run_flow(prompts_file, tmp_path, method="draft", num_draft_tokens=3, draft_policy="fixed")
    assert summary["generations"] == len(GOOD)
    assert snapshot(tmp_path)["generations"] == snapshot(ar_out)["generations"]
    con = connect(tmp_path)
    drafted, accepted, steps = con.execute(
        "select sum(drafted_tokens), sum(accepted_tokens), sum(target_steps) from requests"
    ).fetchone()
    assert 0 < accepted <= drafted
    step_rows = con.execute("select count(*), sum(drafted), sum(accepted), max(num_draft) from steps").fetchone()
    assert step_rows == (steps - len(GOOD), drafted, accepted, 3)  # every step but the prefills
    assert con.execute("select draft_model, method from runs").fetchone() == (str(DEMO_MODELS["demo-draft"]), "draft")
    assert con.execute("select count(*) from requests where draft_seconds <= 0").fetchone() == (0,)


def test_a_draft_with_another_vocabulary_is_refused(tmp_path, capsys):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    other = tmp_path / "other-draft"
    config = LlamaConfig(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    LlamaForCausalLM(config).save_pretrained(other)
    AutoTokenizer.from_pretrained(DEMO_MODELS["demo"]).save_pretrained(other)
    (tmp_path / "p.jsonl").write_text('{"prompt": "x"}\n')
    code = main(
        ["run", str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "o"), "--method", "draft", "--draft", str(other)]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "does not share the target's vocabulary" in err and "300 logits" in err
    assert not (tmp_path / "o").exists()


def test_a_shard_failing_every_attempt_becomes_errors_and_is_retried_later(ray_cluster, tmp_path):
    from specbatch.storage import OutputDir
    from specbatch.workers.pool import WorkerPool
    from specbatch.workers.shard import ShardRef, ShardRequest, requests_table

    out = OutputDir(tmp_path)
    good = ShardRequest("ok", 1, "def f():\n", [1, 2, 3], 4, seed=0)
    # A prompt longer than the model's context: the engine refuses it on every attempt.
    bad = ShardRequest("too-long", 2, "x", [5] * 600, 4, seed=0)
    refs = []
    for i, request in enumerate([good, bad]):
        out.write_table(requests_table([request]), f"plan/shards/{i}.parquet")
        refs.append(ShardRef(f"shard-0000{i}", f"plan/shards/{i}.parquet", 0, 1, len(request.prompt_ids), 0))
    config = RunConfig(input="-", out=out.uri, model=str(DEMO_MODELS["demo"]))
    pool = WorkerPool(config, num_workers=1)
    try:
        report = pool.run(refs, out, max_attempts=2)
    finally:
        pool.shutdown()
    # Both went in one call, which failed; each was retried on its own: the good one finished.
    assert report.failed_shards == ["shard-00001"] and report.retries == 2
    con = connect(tmp_path)
    assert con.execute("select request_id from generations").fetchall() == [("ok",)]
    (request_id, stage, reason) = con.execute("select request_id, stage, reason from errors").fetchone()
    assert (request_id, stage) == ("too-long", "generate")
    assert "failed 2 times" in reason and "does not fit the model's context" in reason
    assert out.is_complete("shard-00000") and not out.is_complete("shard-00001")  # a rerun retries it


@pytest.mark.parametrize("method", ["ngram", "lookahead", "layerskip", "auto"])
def test_draft_free_methods_end_to_end_equal_ar(finished_run, prompts_file, tmp_path, method):
    ar_out, _ = finished_run
    summary = run_flow(prompts_file, tmp_path, method=method, num_draft_tokens=3, draft_policy="fixed")
    assert summary["generations"] == len(GOOD)
    assert snapshot(tmp_path)["generations"] == snapshot(ar_out)["generations"]
    con = connect(tmp_path)
    assert con.execute("select min(method), max(method) from requests").fetchone() == (method, method)
    assert con.execute("select sum(drafted_tokens) > 0, sum(draft_seconds) >= 0 from requests").fetchone() == (
        True,
        True,
    )
    step_methods = {m for (m,) in con.execute("select distinct method from steps").fetchall()}
    if method == "auto":  # its choices, step by step (an arm's first try is a budgeted probe); it may use the demo draft
        assert step_methods - {"ar"} and step_methods <= {"ar", "ngram", "lookahead", "layerskip", "draft"}
        assert con.execute("select draft_model from runs").fetchone() == (str(DEMO_MODELS["demo-draft"]),)
    else:
        assert step_methods <= {method, "ar"}
        assert con.execute("select draft_model from runs").fetchone() == (None,)


def test_prefix_sharing_end_to_end_identical_to_computing_every_prompt(prefect_server, ray_cluster, tmp_path):
    """The bundled prompts come in groups that share a prefix: the plan groups them, workers compute
    each shared prefix once per shard, and the outputs equal a --no-prefix-sharing run."""
    from specbatch.cli import DEMO_PROMPTS

    settings = dict(max_new_tokens=6, shard_size=16, batch_size=8)
    run_flow(DEMO_PROMPTS, tmp_path / "shared", **settings)
    run_flow(DEMO_PROMPTS, tmp_path / "full", prefix_sharing=False, **settings)
    shared, full = connect(tmp_path / "shared"), connect(tmp_path / "full")
    query = "select request_id, completion_token_ids from generations order by all"
    assert shared.execute(query).fetchall() == full.execute(query).fetchall()
    totals = "select prompt_tokens, prefill_tokens, peak_kv_bytes from runs"
    prompt_tokens, prefill_tokens, peak_kv = shared.execute(totals).fetchone()
    full_prompt_tokens, full_prefill_tokens, full_peak_kv = full.execute(totals).fetchone()
    assert prompt_tokens == full_prompt_tokens == full_prefill_tokens
    assert prefill_tokens < 0.8 * prompt_tokens and peak_kv < full_peak_kv
    (cached,) = shared.execute("select sum(cached_prefix_tokens) from requests").fetchone()
    assert cached == prompt_tokens - prefill_tokens
    assert full.execute("select sum(cached_prefix_tokens) from requests").fetchone() == (0,)


def test_n_samples_per_prompt(prefect_server, ray_cluster, prompts_file, tmp_path):
    assert (
        main(
            [
                "run",
                str(prompts_file),
                "--out",
                str(tmp_path),
                "--n",
                "4",
                "--temperature",
                "1.0",
                "--max-new-tokens",
                "6",
                "--shard-size",
                "8",
            ]
        )
        == 0
    )
    con = connect(tmp_path)
    per_prompt = con.execute(
        "select request_id, list(sample_index order by sample_index), count(distinct completion_token_ids) "
        "from generations group by 1"
    ).fetchall()
    assert len(per_prompt) == len(GOOD)
    assert all(samples == [0, 1, 2, 3] for _, samples, _ in per_prompt)
    assert sum(distinct > 1 for *_, distinct in per_prompt) >= len(GOOD) // 2  # samples differ
    # Samples of one prompt share it: three of each four read it from the cache (a 3-token prompt
    # saves too little to be worth a group).
    reading = con.execute(
        "select request_id, count(*) filter (cached_prefix_tokens > 0) from requests group by 1"
    ).fetchall()
    assert {n for _, n in reading} <= {0, 3} and sum(n for _, n in reading) >= 3 * (len(GOOD) - 1)


def test_verify_compares_requests_with_transformers_generate(finished_run, prompts_file, tmp_path, caplog):
    """--verify 3 with lookahead: three requests re-decoded by transformers' generate, each a
    `match` row; a mismatch (planted here, as a wrong method would produce) is a warning and in
    the summary, never a silent pass."""
    import pyarrow as pa

    from specbatch.storage import OutputDir
    from specbatch.storage.schema import VERIFICATION

    summary = run_flow(prompts_file, tmp_path, method="lookahead", verify=3)
    con = connect(tmp_path)
    assert con.execute("select status, count(*) from verification group by 1").fetchall() == [("match", 3)]
    assert con.execute("select verified_requests, verification_mismatches from runs").fetchone() == (3, 0)
    assert summary["verified"] == "3 of 3 match plain greedy decoding"
    planted = {"request_id": "add", "sample_index": 0, "status": "mismatch", "first_difference": 4}
    OutputDir(tmp_path).write_unit("planted", {"verification": pa.Table.from_pylist([planted], schema=VERIFICATION)})
    with caplog.at_level("WARNING", logger="specbatch"):
        again = run_flow(prompts_file, tmp_path, method="lookahead", verify=3)
    assert again["verification_mismatches"] == ["add#0"] and again["verified"].startswith("3 of 4 match")
    assert "1 of 4 re-decoded requests differ" in caplog.text
    assert connect(tmp_path).execute("select verification_mismatches from runs").fetchone() == (1,)
