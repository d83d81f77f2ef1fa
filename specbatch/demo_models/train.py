"""Train the bundled demo pair: a BPE tokenizer and two Llama models that share it.

Corpus: the Python standard library's own source files (every machine with Python has them),
minus tests and site-packages. Files whose name hashes into the held-out bucket are kept for
evaluation. The target is trained first with cross-entropy; the draft is trained with
cross-entropy plus a distillation term (KL to the target's next-token distribution), then on
the target's own continuations of training prefixes (greedy and sampled) with the KL term alone:
on-policy distillation as in DistillSpec (Zhou et al., 2023). That is what raises the draft's
agreement with the target on what the target actually generates, the quantity speculative
decoding lives on.

    python specbatch/demo_models/train.py                # ~20 min on 2 CPU cores
    python specbatch/demo_models/train.py --device cuda  # same recipe on a GPU
    python specbatch/demo_models/train.py --draft-only   # keep the saved target, retrain the draft

Reproducible: fixed seeds, sorted file order, deterministic held-out split.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

EOS = "<|endoftext|>"
CHAT_TEMPLATE = (
    "{% for m in messages %}# {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}# assistant:\n{% endif %}"
)
DEFAULT_OUT = Path(__file__).resolve().parent


def corpus_files() -> tuple[list[Path], list[Path]]:
    """Stdlib .py files, sorted; about 1 in 20 held out by a hash of the relative path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    train, held_out = [], []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if "site-packages" in rel or "/test" in f"/{rel}" or "idle_test" in rel:
            continue
        bucket = int(hashlib.sha256(rel.encode()).hexdigest(), 16) % 20
        (held_out if bucket == 0 else train).append(path)
    return train, held_out


def read(paths: list[Path]) -> list[str]:
    return [p.read_text(encoding="utf-8", errors="replace") for p in paths]


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def encode_all(tok: PreTrainedTokenizerFast, texts: list[str]) -> torch.Tensor:
    """One long stream of token ids, documents separated by EOS."""
    ids: list[int] = []
    for enc in tok(texts, add_special_tokens=False)["input_ids"]:
        ids.extend(enc)
        ids.append(tok.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def batches(stream: torch.Tensor, seq_len: int, batch_size: int, gen: torch.Generator):
    while True:
        starts = torch.randint(0, len(stream) - seq_len - 1, (batch_size,), generator=gen)
        yield torch.stack([stream[s : s + seq_len] for s in starts.tolist()])


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return 0.1 * peak + 0.9 * peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def train(
    model, stream, args, steps: int, lr: float, teacher=None, label: str = "", kl_only=False, seq_len=None
) -> None:
    seq_len = seq_len or args.seq_len
    gen = torch.Generator().manual_seed(args.seed + (1 if teacher is not None else 0) + (2 if kl_only else 0))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    model.train()
    t0 = time.time()
    for step, x in zip(range(steps), batches(stream, seq_len, args.batch_size, gen)):
        x = x.to(args.device)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup=max(1, steps // 20))
        logits = model(input_ids=x).logits[:, :-1]  # [batch, seq - 1, vocab]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        if teacher is not None:
            with torch.no_grad():
                t_logits = teacher(input_ids=x).logits[:, :-1]
            kl = (
                F.kl_div(F.log_softmax(logits, -1), F.log_softmax(t_logits, -1), log_target=True, reduction="batchmean")
                / logits.shape[1]
            )
            loss = kl if kl_only else 0.5 * loss + 0.5 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 25 == 0 or step == steps - 1:
            print(f"[{label}] step {step}/{steps} loss {loss.item():.3f} {time.time() - t0:.0f}s", flush=True)
    model.eval()


@torch.no_grad()
def target_continuations(target, stream, args, eos_id: int) -> torch.Tensor:
    """The target's own continuations of random training prefixes, half greedy and half sampled
    at temperature 0.8, as one stream (separated by EOS) for on-policy distillation."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from specbatch.decoding import Engine, GenerationRequest, SamplingParams

    gen = torch.Generator().manual_seed(args.seed + 3)
    starts = torch.randint(0, len(stream) - 64, (args.onpolicy_sequences,), generator=gen).tolist()
    requests = [
        GenerationRequest(
            str(i),
            stream[s : s + 16 + (s % 48)].tolist(),
            args.onpolicy_tokens,
            SamplingParams(temperature=0.0 if i % 2 == 0 else 0.8, seed=args.seed + i),
        )
        for i, s in enumerate(starts)
    ]
    t0 = time.time()
    results = Engine(target.to("cpu").eval(), [eos_id], max_batch_size=64).generate(requests)
    target.to(args.device)
    ids: list[int] = []
    for req, res in zip(requests, results):
        ids += req.prompt_ids + res.completion_ids + [eos_id]
    print(f"on-policy data: {len(ids):,} tokens from the target in {time.time() - t0:.0f}s", flush=True)
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def evaluate(target, draft, stream, args) -> dict:
    """Held-out loss of both models and the draft's greedy agreement with the target."""
    n = (len(stream) - 1) // args.seq_len
    n = min(n, args.eval_sequences)
    x = stream[: n * args.seq_len].view(n, args.seq_len).to(args.device)
    out = {"held_out_tokens": int(x.numel())}
    argmaxes = {}
    for name, model in (("target", target), ("draft", draft)):
        losses, preds = [], []
        for chunk in x.split(8):
            logits = model(input_ids=chunk).logits[:, :-1]
            losses.append(
                F.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1), reduction="sum")
            )
            preds.append(logits.argmax(-1))
        out[f"{name}_held_out_loss"] = round(float(sum(losses)) / (n * (args.seq_len - 1)), 4)
        argmaxes[name] = torch.cat(preds)
    out["draft_greedy_agreement"] = round(float((argmaxes["target"] == argmaxes["draft"]).float().mean()), 4)
    return out


@torch.no_grad()
def greedy_agreement_on_target_text(target, draft, stream: torch.Tensor, args) -> float:
    """Agreement of the draft's argmax with the target's on the target's greedy continuations of
    held-out prefixes: what greedy speculative decoding sees."""
    n = len(stream) // 128 * 128
    x = stream[:n].view(-1, 128)[:32].to(args.device)
    return round(
        float((target(input_ids=x).logits.argmax(-1) == draft(input_ids=x).logits.argmax(-1)).float().mean()), 4
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--target-steps", type=int, default=550)
    ap.add_argument("--draft-steps", type=int, default=350)
    ap.add_argument("--onpolicy-steps", type=int, default=300)
    ap.add_argument("--onpolicy-sequences", type=int, default=1024)
    ap.add_argument("--onpolicy-tokens", type=int, default=128)
    ap.add_argument("--eval-sequences", type=int, default=64)
    ap.add_argument("--draft-only", action="store_true", help="load the target from --out and retrain only the draft")
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(os.cpu_count() or 1)
    t_start = time.time()
    train_files, held_out_files = corpus_files()
    train_texts, held_out_texts = read(train_files), read(held_out_files)
    print(f"corpus: {len(train_files)} train files, {len(held_out_files)} held out", flush=True)

    tok = train_tokenizer(train_texts, args.vocab_size)
    train_stream, held_out_stream = encode_all(tok, train_texts), encode_all(tok, held_out_texts)
    print(f"tokens: {len(train_stream):,} train, {len(held_out_stream):,} held out", flush=True)

    common = dict(
        vocab_size=len(tok),
        max_position_embeddings=512,
        tie_word_embeddings=True,
        rope_theta=10000.0,
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.eos_token_id,
    )
    target_cfg = LlamaConfig(
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=4,
        **common,
    )
    draft_cfg = LlamaConfig(
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        **common,
    )
    if args.draft_only:
        target = LlamaForCausalLM.from_pretrained(args.out / "target", dtype=torch.float32).to(args.device)
        tok = PreTrainedTokenizerFast.from_pretrained(args.out / "target")
    else:
        target = LlamaForCausalLM(target_cfg).to(args.device)
    draft = LlamaForCausalLM(draft_cfg).to(args.device)
    n_target = sum(p.numel() for p in target.parameters())
    n_draft = sum(p.numel() for p in draft.parameters())
    print(f"params: target {n_target:,}, draft {n_draft:,}", flush=True)

    if not args.draft_only:
        train(target, train_stream, args, args.target_steps, lr=2e-3, label="target")
    target.eval().requires_grad_(False)
    train(draft, train_stream, args, args.draft_steps, lr=3e-3, teacher=target, label="draft")
    onpolicy = target_continuations(target, train_stream, args, tok.eos_token_id)
    train(
        draft,
        onpolicy,
        args,
        args.onpolicy_steps,
        lr=1e-3,
        teacher=target,
        label="draft on-policy",
        kl_only=True,
        seq_len=192,
    )
    metrics = evaluate(target, draft, held_out_stream, args)
    held_out_args = argparse.Namespace(**{**vars(args), "onpolicy_sequences": 64, "seed": args.seed + 100})
    metrics["draft_greedy_agreement_on_target_text"] = greedy_agreement_on_target_text(
        target, draft, target_continuations(target, held_out_stream, held_out_args, tok.eos_token_id), args
    )
    metrics.update(
        target_parameters=n_target,
        draft_parameters=n_draft,
        train_tokens_seen_target=args.target_steps * args.batch_size * args.seq_len,
        train_tokens_seen_draft=args.draft_steps * args.batch_size * args.seq_len,
        onpolicy_steps=args.onpolicy_steps,
        draft_only_retrain=args.draft_only,
        train_files=len(train_files),
        held_out_files=len(held_out_files),
        training_seconds=round(time.time() - t_start),
        device=args.device,
        seed=args.seed,
    )
    print(json.dumps(metrics, indent=2), flush=True)

    for name, model in (("target", target), ("draft", draft)):
        if name == "target" and args.draft_only:
            continue
        path = args.out / name
        model.to("cpu").save_pretrained(path, safe_serialization=True)
        tok.save_pretrained(path)
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    write_card(args.out, metrics, args)


def write_card(out: Path, m: dict, args) -> None:
    (out / "MODEL_CARD.md").write_text(f"""# specbatch demo models

Two Llama-architecture causal LMs sharing one byte-level BPE tokenizer ({args.vocab_size} tokens),
trained by `specbatch/demo_models/train.py` (seed {m["seed"]}, {m["device"]}, {m["training_seconds"]} s) on the
Python standard library's source ({m["train_files"]} files; {m["held_out_files"]} held out by path hash).
They write Python-looking code; they exist to exercise the pipeline and speculative decoding, not
to be useful models.

| | target | draft |
|---|---|---|
| parameters | {m["target_parameters"]:,} | {m["draft_parameters"]:,} |
| layers x hidden | 6 x 256 (GQA 8/4 heads) | 2 x 128 (GQA 4/2 heads) |
| training | {m["train_tokens_seen_target"]:,} tokens, CE | {m["train_tokens_seen_draft"]:,} tokens of CE + KL to the target, then {m["onpolicy_steps"]} steps of KL on the target's own continuations |
| held-out loss (nats/token) | {m["target_held_out_loss"]} | {m["draft_held_out_loss"]} |

Draft greedy agreement with the target (fraction of positions whose argmax agree): on held-out
text **{m["draft_greedy_agreement"]}** over {m["held_out_tokens"]:,} tokens; on the target's own
continuations of held-out prefixes, which is what speculative decoding sees,
**{m["draft_greedy_agreement_on_target_text"]}**.
{"(The draft was retrained with --draft-only against the saved target.)" if m["draft_only_retrain"] else ""}

Context: 512 positions (trained on {args.seq_len}-token windows). Chat template: `# role: content` lines.
""")


if __name__ == "__main__":
    main()
