"""The model pairs the benchmarks run: the bundled demo target and draft, or randomly initialised
Llama-style pairs for GPU-sized runs. torch and transformers only, so the engine-only scripts in
benchmarks/ use it on a machine without pyarrow, Ray or Prefect."""

from __future__ import annotations

import torch

from ..workers.models import DEMO_MODELS

# Randomly initialised Llama-style pairs for measuring speed at a size the demo models do not
# reach (their outputs are noise, but every system gets the same noise to reproduce).
RANDOM_MODELS = {
    "random-1b": (
        dict(
            hidden_size=2048,
            intermediate_size=5632,
            num_hidden_layers=16,
            num_attention_heads=16,
            num_key_value_heads=8,
        ),
        dict(
            hidden_size=512, intermediate_size=1408, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4
        ),
    ),
    "random-tiny": (
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
        dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1),
    ),
}


def load_pair(name: str, device: str, dtype: torch.dtype, eos: int):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if name == "demo":
        target = AutoModelForCausalLM.from_pretrained(DEMO_MODELS["demo"], dtype=dtype)
        draft = AutoModelForCausalLM.from_pretrained(DEMO_MODELS["demo-draft"], dtype=dtype)
    elif name in RANDOM_MODELS:
        pair = []
        for seed, shape in enumerate(RANDOM_MODELS[name]):
            torch.manual_seed(seed)
            config = LlamaConfig(
                vocab_size=32000,
                max_position_embeddings=2048,
                eos_token_id=eos,
                pad_token_id=eos,
                bos_token_id=eos,
                **shape,
            )
            pair.append(LlamaForCausalLM(config).to(dtype))
        target, draft = pair
    else:
        raise ValueError(f"unknown bench model {name!r}; use demo, {', '.join(RANDOM_MODELS)}")
    return target.to(device).eval(), draft.to(device).eval()
