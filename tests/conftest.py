"""Shared fixtures: tiny random models for engine tests; one Prefect server and one Ray
cluster for the whole session for the end-to-end tests."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


VOCAB = 300
EOS = 299


def tiny_llama(seed: int = 0, layers: int = 2, hidden: int = 64, max_positions: int = 128):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        eos_token_id=EOS,
        pad_token_id=EOS,
        bos_token_id=EOS,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_model():
    return tiny_llama()


def random_prompts(n: int, lo: int = 3, hi: int = 20, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi, (n,), generator=g).tolist()
    return [torch.randint(0, EOS, (k,), generator=g).tolist() for k in lengths]


@pytest.fixture(scope="session")
def prefect_server():
    from prefect import flow
    from prefect.testing.utilities import prefect_test_harness

    @flow
    def warm_up() -> None:
        """Prefect (re)configures its log handlers, bound to the sys.stderr of the moment, when a
        process first talks to the server. Do it here: inside a test that captures output
        (capsys), the handlers would keep writing to that test's closed capture stream."""

    with prefect_test_harness(server_startup_timeout=120):
        warm_up()
        yield


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=128 * 1024**2, logging_level="WARNING")
    yield
    ray.shutdown()
