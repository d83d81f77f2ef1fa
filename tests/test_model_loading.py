"""Safe model loading: weights come from safetensors only unless --allow-pickle-weights (a pickled
checkpoint can run code when read), and a model's own Python code never runs unless
--trust-remote-code. Both are off by default, from the CLI through RunConfig to the loaders."""

from __future__ import annotations

import json

import pytest
import torch

from specbatch.cli import build_parser, run_config
from specbatch.errors import SpecbatchError
from specbatch.workers.models import load_config, load_model

from .conftest import tiny_llama


def test_pickled_weights_are_refused_unless_allowed(tmp_path):
    model = tiny_llama()
    pickled = tmp_path / "pickled"  # a checkpoint as older tools wrote it: config + a torch pickle
    model.config.save_pretrained(pickled)
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(SpecbatchError, match="--allow-pickle-weights"):
        load_model(str(tmp_path / "pickled"))
    loaded = load_model(str(tmp_path / "pickled"), allow_pickle=True)
    torch.testing.assert_close(loaded.lm_head.weight, model.lm_head.weight)

    model.save_pretrained(tmp_path / "safe")  # safetensors: loads with the defaults
    torch.testing.assert_close(load_model(str(tmp_path / "safe")).lm_head.weight, model.lm_head.weight)


def test_remote_code_does_not_run_by_default(tmp_path):
    folder = tmp_path / "custom"
    folder.mkdir()
    marker = tmp_path / "code-ran"
    (folder / "configuration_evil.py").write_text(
        "from pathlib import Path\n"
        f"Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import LlamaConfig\n"
        "class EvilConfig(LlamaConfig):\n    model_type = 'evil'\n"
    )
    (folder / "config.json").write_text(
        json.dumps({"model_type": "evil", "auto_map": {"AutoConfig": "configuration_evil.EvilConfig"}})
    )
    with pytest.raises(SpecbatchError):
        load_config(str(folder))
    assert not marker.exists()
    load_config(str(folder), trust_remote_code=True)  # asked for: the folder's code runs
    assert marker.read_text() == "ran"


def test_the_switches_are_off_unless_given():
    parser = build_parser()
    config = run_config(parser.parse_args(["run", "in.jsonl", "--out", "o"]))
    assert config.trust_remote_code is False and config.allow_pickle_weights is False
    config = run_config(parser.parse_args(["run", "in.jsonl", "--out", "o", "--trust-remote-code", "--allow-pickle-weights"]))
    assert config.trust_remote_code is True and config.allow_pickle_weights is True
