"""Memory of one training step, dense + AdamW against RSO, and a short loss comparison.

For a LLaMA with llama_60m shapes it measures, per configuration and each in a fresh subprocess:

- saved activations: bytes of the distinct storages saved for backward during the forward
  (torch.autograd.graph.saved_tensors_hooks; parameters and buffers left out), in total and inside
  the decoder layers, where RSO acts;
- peak memory of a training step (forward, backward, optimizer step) after a warm-up step, so the
  optimizer state exists: on CPU the peak RSS (VmHWM of /proc/self/status, reset by writing 5 to
  /proc/self/clear_refs, glibc told to return large blocks at once), on CUDA max_memory_allocated;
- optimizer state and gradient bytes.

Then it trains a small LLaMA on offline Shakespeare with AdamW and with RSO, same seed and batches.

    python benchmarks/rso_memory.py --device cpu --layers 4       # about 4 minutes on 2 CPU cores
    python benchmarks/rso_memory.py --device cuda --batch 16 --seq-len 1024
"""

import argparse
import importlib.util
import json
import math
import os
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import slimopt
import slimopt.rso
from slimopt.environment import device_name, git_revision

# name: (optimizer, share_inputs); dense + AdamW comes first, every ratio divides by it.
CONFIGS = {
    "dense_adamw": ("adamw", None),
    "rso_shared": ("rso", True),
    "rso_unshared": ("rso", False),
}

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights (pure, no autocast)")
parser.add_argument("--layers", type=int, default=4, help="llama_60m has 8; fewer keep a CPU run short")
parser.add_argument("--vocab", type=int, default=32000, help="llama_60m's (T5 tokenizer) vocabulary")
parser.add_argument("--batch", type=int, default=16, help="16 × 256 tokens: activations outweigh weights and state")
parser.add_argument("--seq-len", type=int, default=256)
parser.add_argument("--rank", type=int, default=128)
parser.add_argument("--loss-steps", type=int, default=300, help="steps of the loss comparison (0 skips it)")
parser.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/rso_memory_<device>.json)")
parser.add_argument("--worker", choices=CONFIGS, help=argparse.SUPPRESS)  # one measurement, in a subprocess
args = parser.parse_args()

HIDDEN, INTERMEDIATE, HEADS = 512, 1376, 8  # llama_60m
LR = 1e-3
device = torch.device(args.device)
dtype = getattr(torch, args.dtype)


def build_model():
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                         num_hidden_layers=args.layers, num_attention_heads=HEADS, num_key_value_heads=HEADS,
                         max_position_embeddings=max(1024, args.seq_len), tie_word_embeddings=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(device, dtype)


def build_optimizer(name, model):
    kind, share_inputs = CONFIGS[name]
    if kind == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    return slimopt.rso.RSO(model, lr=LR, rank=args.rank, share_inputs=share_inputs)


# ---------------------------------------------------------------- worker


def rss_peak_bytes():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def rss_bytes():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def reset_peak():
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM ← VmRSS


def current_bytes():
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else rss_bytes()


def peak_bytes():
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(device)
    return rss_peak_bytes()


def saved_activations(model, ids):
    """Run the forward; return its loss and the bytes saved for backward, in total and inside decoder layers."""
    weights = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    saved, in_layers = {}, set()
    inside = [False]

    def pack(tensor):
        ptr = tensor.untyped_storage().data_ptr()
        if ptr not in weights:
            saved[ptr] = tensor.untyped_storage().nbytes()
            if inside[0]:
                in_layers.add(ptr)
        return tensor

    hooks = []
    for layer in model.model.layers:
        hooks.append(layer.register_forward_pre_hook(lambda *_: inside.__setitem__(0, True)))
        hooks.append(layer.register_forward_hook(lambda *_: inside.__setitem__(0, False)))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(ids, labels=ids).loss
    for hook in hooks:
        hook.remove()
    return loss, sum(saved.values()), sum(saved[ptr] for ptr in in_layers)


def worker(name):
    baseline = current_bytes()  # the runtime alone (CPU) or nothing (CUDA)
    model = build_model()
    optimizer = build_optimizer(name, model)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq_len), generator=generator).to(device)

    loss = model(ids, labels=ids).loss  # warm-up step: allocates the optimizer state
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    del loss

    before = current_bytes()
    reset_peak()
    start = time.perf_counter()
    loss, saved_total, saved_layers = saved_activations(model, ids)
    loss.backward()
    grad_bytes = sum(p.grad.nbytes for p in model.parameters() if p.grad is not None)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = peak_bytes()
    state_bytes = sum(v.nbytes for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))
    print(json.dumps({
        "config": name,
        "saved_activation_bytes": saved_total,
        "saved_activation_bytes_in_layers": saved_layers,
        "peak_bytes": peak,
        "peak_above_runtime_bytes": peak - baseline,
        "before_step_bytes": before,
        "step_increase_bytes": peak - before,
        "param_bytes": sum(p.nbytes for p in model.parameters()),
        "grad_bytes": grad_bytes,
        "state_bytes": state_bytes,
        "state_numel": slimopt.rso.state_numel(optimizer),
        "step_seconds": seconds,
        "loss": loss.item(),
    }))


if args.worker:
    worker(args.worker)
    sys.exit()

# --------------------------------------------------------------- measure


def measure(name):
    print(f"measuring {name} ...", file=sys.stderr, flush=True)
    # A fixed mmap threshold makes glibc hand large freed blocks back at once, so RSS follows live memory.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 17), "MALLOC_TRIM_THRESHOLD_": str(1 << 17)}
    command = [sys.executable, __file__, "--worker", name, "--device", args.device, "--dtype", args.dtype,
               "--layers", str(args.layers), "--vocab", str(args.vocab), "--batch", str(args.batch),
               "--seq-len", str(args.seq_len), "--rank", str(args.rank)]
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode:
        raise SystemExit(f"{name} failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


memory = [measure(name) for name in CONFIGS]
dense = memory[0]
for r in memory:
    for key in ("saved_activation_bytes", "saved_activation_bytes_in_layers", "peak_bytes",
                "peak_above_runtime_bytes", "state_bytes", "grad_bytes"):
        r[f"{key}_vs_dense"] = r[key] / dense[key]

# ------------------------------------------------------ loss comparison

spec = importlib.util.spec_from_file_location(
    "compare_optimizers", Path(__file__).parents[1] / "examples" / "compare_optimizers.py")
compare = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare)

# The main job's small LLaMA and schedule (examples/compare_optimizers.py), on the CPU in fp32.
LOSS_SETUP = dict(hidden=96, layers=3, batch=16, seq_len=128, lr=3e-3, rank=32, update_gap=50, seed=0)
LOSS_RUNS = {
    "adamw": lambda model: torch.optim.AdamW(model.parameters(), lr=LOSS_SETUP["lr"], weight_decay=0.0),
    "rso_shared": lambda model: slimopt.rso.RSO(model, lr=LOSS_SETUP["lr"], rank=LOSS_SETUP["rank"],
                                                update_gap=LOSS_SETUP["update_gap"], share_inputs=True),
    "rso_unshared": lambda model: slimopt.rso.RSO(model, lr=LOSS_SETUP["lr"], rank=LOSS_SETUP["rank"],
                                                  update_gap=LOSS_SETUP["update_gap"], share_inputs=False),
}


def train(name, train_tokens, val_tokens, steps):
    model = compare.build_model(LOSS_SETUP["hidden"], LOSS_SETUP["layers"], LOSS_SETUP["seed"])
    optimizer = LOSS_RUNS[name](model)
    warmup = max(1, steps // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) * (
        0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, s / steps)))))
    generator = torch.Generator().manual_seed(LOSS_SETUP["seed"])
    losses, start = [], time.perf_counter()
    for _ in range(steps):
        x = compare.sample_batch(train_tokens, LOSS_SETUP["batch"], LOSS_SETUP["seq_len"], generator)
        loss = model(x, labels=x).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    return {"first_5": sum(losses[:5]) / 5, "last_20": sum(losses[-20:]) / 20,
            "val_loss": compare.evaluate(model, val_tokens, LOSS_SETUP["batch"], LOSS_SETUP["seq_len"]),
            "seconds": time.perf_counter() - start}


losses = {}
if args.loss_steps:
    train_tokens, val_tokens = compare.split_tokens(compare.load_shakespeare())
    for name in LOSS_RUNS:
        print(f"training {name} ...", file=sys.stderr, flush=True)
        losses[name] = train(name, train_tokens, val_tokens, args.loss_steps)

# ----------------------------------------------------------------- report


def mb(n):
    return f"{n / 2**20:.1f}"


peak_name = "peak RSS" if device.type == "cpu" else "peak allocated"
header = {
    "device": device_name(device),
    "torch": torch.__version__,
    "slimopt": f"{slimopt.__version__} ({git_revision() or 'no git'})",
    "model": f"LLaMA hidden {HIDDEN}, intermediate {INTERMEDIATE}, {HEADS} heads, {args.layers} layers, "
             f"vocab {args.vocab} (llama_60m shapes), {args.dtype}",
    "step": f"batch {args.batch} × seq {args.seq_len} = {args.batch * args.seq_len} tokens, after one warm-up step",
    "RSO": f"rank {args.rank}, lr {LR}, all q/k/v/o/gate/up/down adapted",
    "peak": ("peak RSS (VmHWM) of the measured step, and minus the RSS after imports (runtime)"
             if device.type == "cpu" else "torch.cuda.max_memory_allocated over the measured step"),
    "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    "command": shlex.join(["python", *sys.argv]),
}

columns = ["config", "saved act. MB", "× dense", "in layers MB", "× dense", f"{peak_name} MB", "× dense",
           "peak − runtime MB", "× dense", "state MB", "grads MB"]
rows = [[r["config"], mb(r["saved_activation_bytes"]), f"{r['saved_activation_bytes_vs_dense']:.3f}",
         mb(r["saved_activation_bytes_in_layers"]), f"{r['saved_activation_bytes_in_layers_vs_dense']:.3f}",
         mb(r["peak_bytes"]), f"{r['peak_bytes_vs_dense']:.3f}", mb(r["peak_above_runtime_bytes"]),
         f"{r['peak_above_runtime_bytes_vs_dense']:.3f}", mb(r["state_bytes"]), mb(r["grad_bytes"])]
        for r in memory]
loss_columns = ["optimizer", "loss, first 5 steps", "train loss, last 20", "val loss", "time (s)"]
loss_rows = [[name, f"{r['first_5']:.3f}", f"{r['last_20']:.3f}", f"{r['val_loss']:.3f}", f"{r['seconds']:.1f}"]
             for name, r in losses.items()]


def table(columns, rows):
    widths = [max(len(line[i]) for line in [columns, *rows]) for i in range(len(columns))]
    return ["| " + " | ".join(cell.ljust(w) for cell, w in zip(line, widths)) + " |"
            for line in [columns, ["-" * w for w in widths], *rows]]


lines = [*(f"- {key}: {value}" for key, value in header.items()), "", *table(columns, rows)]
if losses:
    setup = ", ".join(f"{k} {v}" for k, v in LOSS_SETUP.items())
    lines += ["", f"Loss on offline Shakespeare ({args.loss_steps} steps; {setup}; warm-up + cosine schedule, "
              "CPU fp32; RSO trains embeddings, head and norms with AdamW):", "", *table(loss_columns, loss_rows)]
report = "\n".join(lines)
print(report)

out = args.out or Path(__file__).parent / "results" / f"rso_memory_{args.device}.json"
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text(json.dumps({**header, "config": {k: v for k, v in vars(args).items() if k != "worker"},
                           "loss_setup": LOSS_SETUP, "memory": memory, "loss": losses},
                          indent=2, default=str) + "\n")
out.with_suffix(".md").write_text(f"# rso_memory on {args.device}\n\n{report}\n")
print(f"wrote {out} and {out.with_suffix('.md')}", file=sys.stderr)
