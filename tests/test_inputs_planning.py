"""Reading prompt files (every kind of bad row becomes an error, the rest survive) and planning
shards (deterministic, prefix-grouped, context-checked)."""

from __future__ import annotations

import gzip
import json
import uuid
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from specbatch.config import RunConfig
from specbatch.errors import SpecbatchError
from specbatch.flows.inputs import read_prompts
from specbatch.flows.planner import Plan, plan_job
from specbatch.storage import OutputDir, connect
from specbatch.workers.shard import Shard


class ByteTokenizer:
    """A tokenizer with one token per byte and no chat template (the engine never sees text)."""

    chat_template = None

    def __call__(self, text, add_special_tokens=True):
        if isinstance(text, list):
            return {"input_ids": [list(t.encode()) for t in text]}
        return {"input_ids": list(text.encode())}


class ChatTokenizer(ByteTokenizer):
    chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"


def write_jsonl(path, lines):
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


@dataclass
class Planned:
    plan: Plan
    shards: list[Shard]
    errors: dict  # input_index -> (request_id, stage, reason)


def plan_file(path, tmp_path, tokenizer=None, context=32, **settings) -> Planned:
    """Plan an input in this process (the same tasks the cluster runs), into a fresh folder."""
    out = OutputDir(tmp_path / f"plan-{uuid.uuid4().hex[:6]}")
    config = RunConfig(input=str(path), out=out.uri, **({"max_new_tokens": 8, "shard_size": 2} | settings))
    plan = plan_job(config, context, out, use_ray=False, tokenizer=tokenizer or ByteTokenizer())
    errors = connect(out.uri).execute("select input_index, request_id, stage, reason from errors").fetchall()
    return Planned(plan, [ref.load(out) for ref in plan.shards], {i: rest for i, *rest in [tuple(e) for e in errors]})


def ids(planned: Planned) -> list[list[str]]:
    return [[r.request_id for r in s.requests] for s in planned.shards]


def test_bad_rows_become_errors_and_good_rows_survive(tmp_path):
    path = write_jsonl(
        tmp_path / "p.jsonl",
        [
            {"id": "a", "prompt": "hello"},
            {"id": "b", "prompt": "   "},
            "{not json",
            {"id": "c"},
            {"id": "d", "prompt": 7},
            {"id": "a", "prompt": "again"},
            {"prompt": "no id", "max_new_tokens": 3},
            "",
            [1, 2],
            {"id": 5, "prompt": "numeric id"},
            {"id": "e", "prompt": "x", "max_new_tokens": -1},
            {"id": "f", "messages": [{"role": "user"}]},
        ],
    )
    planned = plan_file(path, tmp_path, shard_size=8)
    requests = sorted((r.request_id, r.input_index, r.max_new_tokens) for s in planned.shards for r in s.requests)
    assert requests == [("5", 10, 8), ("a", 1, 8), ("line-7", 7, 3)]
    reasons = {i: reason for i, (_, _, reason) in planned.errors.items()}
    assert sorted(reasons) == [2, 3, 4, 5, 6, 9, 11, 12]
    assert "empty" in reasons[2]
    assert "line 3 is not valid JSON" in reasons[3]
    assert "neither 'prompt' nor 'messages'" in reasons[4]
    assert "must be a string or a list of messages, got int" in reasons[5]
    assert "duplicate id 'a'" in reasons[6] and "row 1" in reasons[6]
    assert "not an object" in reasons[9]
    assert "positive integer" in reasons[11]
    assert "'messages' must be" in reasons[12]
    assert planned.plan.num_input_rows == 11 and planned.plan.num_errors == 8  # the blank line is no row


def test_parquet_input_names_rows_by_number(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": ["one", "", "three"]}), path)
    rows, errors = read_prompts(path)
    assert [r.request_id for r in rows] == ["row-1", "row-3"]
    assert [(e.request_id, e.input_index) for e in errors] == [("row-2", 2)]


def test_missing_input_is_a_user_error(tmp_path):
    with pytest.raises(SpecbatchError, match="does not exist"):
        read_prompts(tmp_path / "nope.jsonl")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(SpecbatchError, match="holds no prompt files"):
        read_prompts(tmp_path / "empty")


ROWS = [{"id": f"r{i}", "prompt": f"prompt number {i}"} for i in range(5)]


def test_compressed_jsonl_and_a_byte_order_mark_read_like_plain_jsonl(tmp_path):
    text = "".join(json.dumps(r) + "\n" for r in ROWS).encode()
    (tmp_path / "p.jsonl.gz").write_bytes(gzip.compress(text))
    with pa.CompressedOutputStream(str(tmp_path / "p.jsonl.zst"), "zstd") as f:
        f.write(text)
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + text)
    for name in ("p.jsonl.gz", "p.jsonl.zst", "bom.jsonl"):
        rows, errors = read_prompts(tmp_path / name)
        assert errors == [] and [(r.request_id, r.prompt) for r in rows] == [(r["id"], r["prompt"]) for r in ROWS], name


def test_a_folder_or_glob_of_files_is_one_input_numbered_across_files(tmp_path):
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    write_jsonl(data / "a.jsonl", [ROWS[0], {"prompt": "unnamed"}])
    pq.write_table(pa.Table.from_pylist(ROWS[1:3]), data / "b.parquet")
    pq.write_table(pa.Table.from_pylist([ROWS[3], {"id": None, "prompt": "unnamed too"}]), data / "sub" / "c.parquet")
    (data / "README.md").write_text("not a prompt file")
    (data / "_SUCCESS").write_text("")
    rows, errors = read_prompts(data)
    assert errors == []
    assert [(r.request_id, r.input_index) for r in rows] == [
        ("r0", 1), ("a.jsonl:line-2", 2), ("r1", 3), ("r2", 4), ("r3", 5), ("sub/c.parquet:row-2", 6)
    ]  # fmt: skip
    rows, _ = read_prompts(f"{data}/*.parquet")
    assert [r.request_id for r in rows] == ["r1", "r2"]
    rows, _ = read_prompts(f"{data}/**/*.parquet")
    assert [r.request_id for r in rows] == ["r1", "r2", "r3", "sub/c.parquet:row-2"]
    rows, _ = read_prompts(f"file://{data}/a.jsonl")
    assert [r.request_id for r in rows] == ["r0", "line-2"]


def test_prompt_and_id_columns_and_message_shapes(tmp_path):
    path = write_jsonl(
        tmp_path / "p.jsonl",
        [
            {"key": "q1", "question": "what is 2 + 2?"},
            {"key": "q2", "question": [{"role": "user", "content": [{"type": "text", "text": "part one"}, {"type": "text", "text": "two"}]}]},
            {"key": "q3", "question": [{"from": "human", "value": "sharegpt turn"}]},
            {"key": "q4", "question": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]},
            {"key": "q5", "prompt": "no question"},
        ],
    )  # fmt: skip
    rows, errors = read_prompts(path, prompt_column="question", id_column="key")
    assert [r.request_id for r in rows] == ["q1", "q2", "q3"]
    assert rows[0].prompt == "what is 2 + 2?"
    assert rows[1].messages == [{"role": "user", "content": "part one\ntwo"}]
    assert rows[2].messages == [{"role": "user", "content": "sharegpt turn"}]
    assert [(e.request_id, e.input_index) for e in errors] == [("q4", 4), ("q5", 5)]
    assert "text parts" in errors[0].reason and "no 'question'" in errors[1].reason


def test_plan_is_deterministic_prefix_grouped_and_context_checked(tmp_path):
    path = write_jsonl(
        tmp_path / "p.jsonl",
        [
            {"id": "z", "prompt": "zeta"},
            {"id": "s1", "prompt": "shared prefix one"},
            {"id": "long", "prompt": "x" * 40},
            {"id": "q", "prompt": "quux"},
            {"id": "s2", "prompt": "shared prefix two"},
            {"id": "chat", "messages": [{"role": "user", "content": "hi"}]},
        ],
    )
    planned = plan_file(path, tmp_path)
    again = plan_file(path, tmp_path)
    assert planned.shards == again.shards
    # Sorted by token ids; the prefix group (s1, s2) is kept whole in a shard of its own.
    assert ids(planned) == [["q"], ["s1", "s2"], ["z"]]
    assert [s.shard_id for s in planned.shards] == ["shard-00000", "shard-00001", "shard-00002"]
    s1, s2 = planned.shards[1].requests
    assert s1.prefix_len == s2.prefix_len == len("shared prefix ")
    reasons = {request_id: reason for request_id, _, reason in planned.errors.values()}
    assert "40 tokens" in reasons["long"] and "context is 32" in reasons["long"]
    assert "no chat template" in reasons["chat"]
    assert planned.plan.num_input_rows == 6
    assert planned.plan.summary()["prefill_tokens"] == sum(len(r.prompt_ids) for s in planned.shards for r in s.requests) - len("shared prefix ")
    seeds = {r.request_id: r.seed for s in planned.shards for r in s.requests}
    assert len(set(seeds.values())) == 4
    other_seed = plan_file(path, tmp_path, seed=1)
    assert {r.request_id: r.seed for s in other_seed.shards for r in s.requests} != seeds


def test_buckets_plan_apart_yet_keep_prefix_groups_and_determinism(tmp_path, monkeypatch):
    """Many buckets (as a large input gets): a prefix group still lands in one bucket, and the
    shards are the same on every planning."""
    import specbatch.flows.planning as planning

    prefixes = ["system prompt number one: ", "another quite long system prompt: ", ""]
    rows = [{"id": f"r{i}", "prompt": prefixes[i % 3] + f"question {i * 7919 % 1000}"} for i in range(60)]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    monkeypatch.setattr(planning, "BUCKET_BYTES", 100)
    planned = plan_file(path, tmp_path, context=128, shard_size=8)
    assert planning.num_buckets(path.stat().st_size) > 8
    assert planned.shards == plan_file(path, tmp_path, context=128, shard_size=8).shards
    assert sorted(r.request_id for s in planned.shards for r in s.requests) == sorted(r["id"] for r in rows)
    for prefix in prefixes[:2]:  # each system prompt's 20 rows share it in one or two shards
        holding = [s for s in planned.shards if any(r.prompt.startswith(prefix) for r in s.requests)]
        assert len(holding) <= 3
        assert all(r.prefix_len >= len(prefix) for s in holding for r in s.requests if r.prompt.startswith(prefix))


def test_messages_use_the_chat_template(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"id": "c", "messages": [{"role": "user", "content": "hi"}]}])
    planned = plan_file(path, tmp_path, tokenizer=ChatTokenizer(), context=64)
    (request,) = planned.shards[0].requests
    assert request.prompt == "<user>hi<assistant>"
    assert request.prompt_ids == list(b"<user>hi<assistant>")


def test_n_samples_share_their_prompt_and_get_their_own_seeds(tmp_path):
    path = write_jsonl(
        tmp_path / "p.jsonl", [{"id": "a", "prompt": "a prompt of some length"}, {"id": "b", "prompt": "b"}]
    )
    planned = plan_file(path, tmp_path, context=64, shard_size=8, n=3)
    requests = [r for s in planned.shards for r in s.requests]
    assert [(r.request_id, r.sample_index) for r in requests] == [
        ("a", 0),
        ("a", 1),
        ("a", 2),
        ("b", 0),
        ("b", 1),
        ("b", 2),
    ]
    assert len({r.seed for r in requests}) == 6
    # a's samples share all but its last token; b's one-token prompt leaves nothing to share
    assert [r.prefix_len for r in requests] == [22] * 3 + [0] * 3
    unshared = plan_file(path, tmp_path, context=64, shard_size=8, n=3, prefix_sharing=False)
    assert [r.prefix_len for s in unshared.shards for r in s.requests] == [0] * 6


def test_packing_keeps_prefix_groups_whole_unless_too_large():
    from specbatch.flows.planning import pack
    from specbatch.workers.shard import ShardRequest

    def group(tag: int, size: int, shared: int = 10):
        return [ShardRequest(f"{tag}-{i}", 0, "", [tag] * shared + [i], 4, 0, prefix_len=shared) for i in range(size)]

    lone = [ShardRequest("lone", 0, "", [0, 1], 4, 0)]
    shards = pack(lone * 3 + group(1, 3) + group(2, 3), shard_size=4)
    assert [[r.request_id for r in s] for s in shards] == [
        ["lone", "lone", "lone"],  # the group of 3 did not fit in the room left: a new shard
        ["1-0", "1-1", "1-2"],
        ["2-0", "2-1", "2-2"],
    ]
    shards = pack(group(1, 9) + lone, shard_size=4)  # larger than a shard: split, its prefix once per part
    assert [len(s) for s in shards] == [4, 4, 2]
    shards = pack(lone + group(1, 4), shard_size=4)  # a shard under half full is filled first
    assert [len(s) for s in shards] == [4, 1]


def test_planning_on_ray_tasks_gives_the_plan_planned_here(ray_cluster, tmp_path, monkeypatch):
    """The cluster path (tasks on Ray, stage files in the output folder, several buckets) and the
    in-process path plan the same shards, duplicates and errors included."""
    import specbatch.flows.planning as planning

    rows = [{"id": f"r{i % 50}", "prompt": ["shared system prompt: ", "other prefix text: "][i % 2] + f"q {i}"} for i in range(60)]
    path = write_jsonl(tmp_path / "p.jsonl", rows + ["not json"])
    monkeypatch.setattr(planning, "BUCKET_BYTES", 300)
    from specbatch.workers.models import DEMO_MODELS, load_tokenizer

    settings = dict(model=str(DEMO_MODELS["demo"]), max_new_tokens=8, shard_size=4, n=2, verify=5)
    here = plan_file(path, tmp_path, tokenizer=load_tokenizer(settings["model"]), context=512, **settings)
    out = OutputDir(tmp_path / "on-ray")
    config = RunConfig(input=str(path), out=out.uri, **settings)
    on_ray = plan_job(config, 512, out, use_ray=True)
    assert [ref.load(out) for ref in on_ray.shards] == here.shards
    assert on_ray.summary() | {"planning_seconds": 0} == here.plan.summary() | {"planning_seconds": 0}
    errors = connect(out.uri).execute("select input_index, request_id, stage, reason from errors").fetchall()
    assert {i: rest for i, *rest in errors} == here.errors
    assert sum("duplicate id" in reason for _, _, reason in here.errors.values()) == 10
    assert not out.list("plan/stage")  # scratch files are gone once the plan is complete


def test_plan_command_describes_the_job_without_running_it(tmp_path, capsys):
    from specbatch.cli import main

    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "def f(x):\n    return x\n"}] * 3 + ["{bad"])
    assert main(["plan", str(path), "--shard-size", "2", "--n", "2"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed | {"planning_seconds": 0} == printed | {
        "input_rows": 4, "error_rows": 1, "requests": 6, "shards": 3, "planning_seconds": 0
    }  # fmt: skip
    assert 0 < printed["prefix_sharing_saves"] < 1 and printed["prefill_tokens"] < printed["prompt_tokens"]
