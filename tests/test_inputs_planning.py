"""Reading prompt files (every kind of bad row becomes an error, the rest survive) and planning
shards (deterministic, prefix-grouped, context-checked)."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from specbatch.errors import SpecbatchError
from specbatch.flows.inputs import read_prompts
from specbatch.flows.planning import plan_shards


class ByteTokenizer:
    """A tokenizer with one token per byte and no chat template (the engine never sees text)."""

    chat_template = None

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": list(text.encode())}


class ChatTokenizer(ByteTokenizer):
    chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"


def write_jsonl(path, lines):
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


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
    rows, errors = read_prompts(path)
    assert [(r.request_id, r.input_index) for r in rows] == [("a", 1), ("line-7", 7), ("5", 10)]
    assert rows[1].max_new_tokens == 3
    reasons = {e.input_index: e.reason for e in errors}
    assert sorted(reasons) == [2, 3, 4, 5, 6, 9, 11, 12]
    assert "empty" in reasons[2]
    assert "not valid JSON" in reasons[3]
    assert "neither 'prompt' nor 'messages'" in reasons[4]
    assert "must be a string, got int" in reasons[5]
    assert "duplicate id 'a'" in reasons[6] and "row 1" in reasons[6]
    assert "not an object" in reasons[9]
    assert "positive integer" in reasons[11]
    assert "'messages' must be" in reasons[12]


def test_parquet_input_names_rows_by_number(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": ["one", "", "three"]}), path)
    rows, errors = read_prompts(path)
    assert [r.request_id for r in rows] == ["row-1", "row-3"]
    assert [(e.request_id, e.input_index) for e in errors] == [("row-2", 2)]


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(SpecbatchError, match="does not exist"):
        read_prompts(tmp_path / "nope.jsonl")


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
    rows, errors = read_prompts(path)
    plan = plan_shards(rows, errors, ByteTokenizer(), context=32, max_new_tokens=8, shard_size=2, seed=0)
    again = plan_shards(*read_prompts(path), ByteTokenizer(), context=32, max_new_tokens=8, shard_size=2, seed=0)
    assert plan == again
    # Sorted by token ids; the prefix group (s1, s2) is kept whole in a shard of its own.
    assert [[r.request_id for r in s.requests] for s in plan.shards] == [["q"], ["s1", "s2"], ["z"]]
    assert [s.shard_id for s in plan.shards] == ["shard-00000", "shard-00001", "shard-00002"]
    s1, s2 = plan.shards[1].requests
    assert s1.prefix_len == s2.prefix_len == len("shared prefix ")
    reasons = {e.request_id: e.reason for e in plan.errors}
    assert "40 tokens" in reasons["long"] and "context is 32" in reasons["long"]
    assert "no chat template" in reasons["chat"]
    assert plan.num_input_rows == 6
    seeds = {r.request_id: r.seed for s in plan.shards for r in s.requests}
    assert len(set(seeds.values())) == 4
    other_seed = plan_shards(*read_prompts(path), ByteTokenizer(), 32, 8, 2, seed=1)
    assert {r.request_id: r.seed for s in other_seed.shards for r in s.requests} != seeds


def test_messages_use_the_chat_template(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"id": "c", "messages": [{"role": "user", "content": "hi"}]}])
    plan = plan_shards(*read_prompts(path), ChatTokenizer(), 64, 8, 4, 0)
    (request,) = plan.shards[0].requests
    assert request.prompt == "<user>hi<assistant>"
    assert request.prompt_ids == list(b"<user>hi<assistant>")


def test_n_samples_share_their_prompt_and_get_their_own_seeds(tmp_path):
    path = write_jsonl(
        tmp_path / "p.jsonl", [{"id": "a", "prompt": "a prompt of some length"}, {"id": "b", "prompt": "b"}]
    )
    plan = plan_shards(
        *read_prompts(path), ByteTokenizer(), context=64, max_new_tokens=8, shard_size=8, seed=0, num_samples=3
    )
    requests = [r for s in plan.shards for r in s.requests]
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
    unshared = plan_shards(
        *read_prompts(path),
        ByteTokenizer(),
        context=64,
        max_new_tokens=8,
        shard_size=8,
        seed=0,
        num_samples=3,
        share_prefixes=False,
    )
    assert [r.prefix_len for s in unshared.shards for r in s.requests] == [0] * 6
    with pytest.raises(ValueError, match="--n"):
        plan_shards(
            *read_prompts(path), ByteTokenizer(), context=64, max_new_tokens=8, shard_size=8, seed=0, num_samples=0
        )


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
