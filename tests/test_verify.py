"""--verify N: which requests are checked (deterministic, spread over the job), and what is
recorded for each: a match, a mismatch with where it starts, or no token-by-token comparison
for sampled output."""

from __future__ import annotations

import json

import pytest

from specbatch.config import RunConfig
from specbatch.decoding import Engine, GenerationRequest
from specbatch.errors import SpecbatchError
from specbatch.flows.generate import check_run
from specbatch.workers.shard import ShardRequest
from specbatch.workers.verify import verification_rows

from .conftest import EOS, random_prompts, tiny_llama
from .test_inputs_planning import plan_file


def test_the_same_requests_are_verified_whatever_the_shard_size(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"id": f"r{i}", "prompt": f"prompt {i % 7} {i}"}) + "\n" for i in range(40)))

    def verified(shard_size: int, n: int) -> set[tuple[str, int]]:
        planned = plan_file(path, tmp_path, context=64, max_new_tokens=4, shard_size=shard_size, n=2, verify=n)
        return {(r.request_id, r.sample_index) for s in planned.shards for r in s.requests if r.verify}

    five = verified(4, 5)
    assert len(five) == 5 and verified(16, 5) == five
    assert five < verified(4, 9)  # asking for more checks a superset
    assert len({rid for rid, _ in verified(4, 20)}) > 10  # spread over the job, not the first rows
    assert verified(4, 0) == set() and len(verified(4, 500)) == 80


def test_each_checked_request_is_a_match_a_mismatch_or_not_compared():
    model = tiny_llama(seed=5)
    prompts = random_prompts(4, seed=3)
    shard = [ShardRequest(f"r{i}", i, "", p, 6, seed=0, verify=i != 3) for i, p in enumerate(prompts)]
    results = Engine(model, [EOS], 4).generate([GenerationRequest(r.request_id, r.prompt_ids, 6) for r in shard])
    results[1].completion_ids = results[1].completion_ids[:2] + [7, 7, 7]  # as a wrong method would
    rows = verification_rows(model, shard, results, [EOS], 128, True, "shard-0", "ngram", "w")
    assert [r["request_id"] for r in rows] == ["r0", "r1", "r2"]  # r3 is not asked for
    assert [r["status"] for r in rows] == ["match", "mismatch", "match"]
    assert rows[1]["first_difference"] == 2 and rows[0]["first_difference"] is None
    assert rows[0]["reference_tokens"] == rows[0]["completion_tokens"] == len(results[0].completion_ids)
    sampled = verification_rows(model, shard, results, [EOS], 128, False, "shard-0", "ngram", "w")
    assert {r["status"] for r in sampled} == {"not_compared"} and len(sampled) == 3


def test_a_model_whose_attention_cannot_be_exact_is_refused_before_anything_starts(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import BloomConfig, BloomForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path / "bloom"
    BloomForCausalLM(BloomConfig(vocab_size=32, hidden_size=16, n_layer=1, n_head=2)).save_pretrained(folder)
    tokenizer = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    PreTrainedTokenizerFast(tokenizer_object=tokenizer).save_pretrained(folder)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a"}\n')
    with pytest.raises(SpecbatchError, match="model type 'bloom' uses ALiBi"):
        check_run(RunConfig(input=str(prompts), out=str(tmp_path / "out"), model=str(folder)))
    with pytest.raises(SpecbatchError, match="--verify: input should be greater than or equal to 0, got -1"):
        RunConfig.parse(input=str(prompts), out=str(tmp_path / "out"), verify=-1)
