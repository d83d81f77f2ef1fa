"""Find and load models: the bundled demo pair by name, anything else through from_pretrained.

Safe by default: a model's own Python code (`trust_remote_code`) runs only when the user asks for
it, and weights load from safetensors only; pickled checkpoints (.bin, .pt), which can run code
when read, need allow_pickle."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import SpecbatchError

DEMO_DIR = Path(__file__).resolve().parents[1] / "demo_models"
DEMO_MODELS = {"demo": DEMO_DIR / "target", "demo-target": DEMO_DIR / "target", "demo-draft": DEMO_DIR / "draft"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model(name: str) -> str:
    """'demo', 'demo-target', 'demo-draft', a local folder (made absolute) or a hub id (as is)."""
    if name in DEMO_MODELS:
        return str(DEMO_MODELS[name])
    path = Path(name).expanduser()
    if path.exists():
        return str(path.resolve())
    if name.startswith(("/", "./", "../", "~")):
        raise SpecbatchError(f"model folder {name!r} does not exist")
    return name


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if dtype not in DTYPES:
        raise SpecbatchError(f"unknown dtype {dtype!r}; use auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _first_line(e: Exception) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]


def load_tokenizer(model: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
    except Exception as e:  # transformers raises OSError, ValueError, HF hub errors...
        raise SpecbatchError(f"cannot load the tokenizer of model {model!r}: {_first_line(e)}") from e


def load_config(model: str, trust_remote_code: bool = False):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise SpecbatchError(f"cannot load model {model!r}: {_first_line(e)}") from e


def skeleton(config):
    """The model's module tree on the meta device: no weights, nothing computed, seconds for any
    size; enough to check which methods apply before any worker starts. None where the model
    cannot be built that way (the worker then checks the loaded model)."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except Exception:
        return None


def context_length(config) -> int:
    return getattr(config, "max_position_embeddings", None) or 1 << 30


def load_model(
    model: str,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
):
    from transformers import AutoModelForCausalLM

    # Logit soft-capping (Gemma 2) is computed by eager attention only: transformers' SDPA path
    # drops it, and transformers 5.0 defaults Gemma 2 to SDPA.
    softcap = getattr(load_config(model, trust_remote_code), "attn_logit_softcapping", None)
    options = {"attn_implementation": "eager"} if softcap else {}
    try:
        lm = AutoModelForCausalLM.from_pretrained(
            model, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=not allow_pickle, **options
        )
    except Exception as e:
        hint = "" if allow_pickle else " (weights load from safetensors only; --allow-pickle-weights also reads .bin/.pt pickles, which can run code)"
        raise SpecbatchError(f"cannot load model {model!r}: {_first_line(e)}{hint}") from e
    return lm.to(device).eval()


def eos_token_ids(model, tokenizer) -> list[int]:
    ids = getattr(model.generation_config, "eos_token_id", None) or model.config.eos_token_id
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def default_draft(target: str) -> str | None:
    """The demo draft for the demo target; no default for other models."""
    return str(DEMO_MODELS["demo-draft"]) if Path(target) == DEMO_MODELS["demo"] else None


def check_same_vocabulary(target: str, draft: str, trust_remote_code: bool = False) -> None:
    """Speculative decoding compares token ids: the draft must use the target's tokenizer."""
    t_config, d_config = load_config(target, trust_remote_code), load_config(draft, trust_remote_code)
    t_vocab = load_tokenizer(target, trust_remote_code).get_vocab()
    d_vocab = load_tokenizer(draft, trust_remote_code).get_vocab()
    if t_vocab != d_vocab or t_config.vocab_size != d_config.vocab_size:
        raise SpecbatchError(
            f"draft model {draft!r} does not share the target's vocabulary (draft: {len(d_vocab)} tokens, "
            f"{d_config.vocab_size} logits; target {target!r}: {len(t_vocab)} tokens, {t_config.vocab_size} logits); "
            "speculative decoding needs a draft trained with the target's tokenizer"
        )
