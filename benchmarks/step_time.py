"""Time one optimizer step on the hidden matrices of a LLaMA decoder, against AdamW.

No model and no backward pass: every matrix is an nn.Parameter with a random
gradient set once, and we time optimizer.step() alone. SUMO and GaLore find a
new subspace (an SVD) only every update_gap steps, so their normal step and
their refresh step are timed apart and combined into an amortized per-step cost.

    python benchmarks/step_time.py --device cpu --shapes tiny --rank 32
    python benchmarks/step_time.py --device cpu --shapes llama_60m --rank 128 --repeats 5
    python benchmarks/step_time.py --device cuda --shapes llama_1b --rank 512
"""

import argparse
import gc
import json
import shlex
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import slimopt
from slimopt import SUMO, SWAN, GaLore
from slimopt.environment import device_name, git_revision
from slimopt.transforms import orthogonality_error, orthogonalize, standardize_rows, whiten

# name: (hidden, intermediate, layers), as in the GaLore/SUMO LLaMA pre-training configs.
SHAPES = {
    "tiny": (128, 352, 4),
    "llama_60m": (512, 1376, 8),
    "llama_130m": (768, 2048, 12),
    "llama_350m": (1024, 2736, 24),
    "llama_1b": (2048, 5461, 24),
}

LR = 1e-3
WEIGHT_DECAY = 0.1  # the same for every optimizer, so the decay's cost cancels in the ratios

# name: (class, its options, whether it refreshes a subspace every update_gap steps).
# Refreshing optimizers also get rank= and update_gap=. Adding an optimizer is one line.
OPTIMIZERS = {
    "adamw": (torch.optim.AdamW, {"fused": True}, False),  # the baseline every ratio divides by
    "muon": (torch.optim.Muon, {}, False),  # torch's reference: per matrix, Newton–Schulz in bf16
    "galore": (GaLore, {"subspace": "randomized"}, True),
    "galore_svd": (GaLore, {"subspace": "svd"}, True),
    "sumo_polar_express": (SUMO, {"orthogonalizer": "polar_express"}, True),
    "sumo_polar": (SUMO, {"orthogonalizer": "polar"}, True),
    "sumo_svd": (SUMO, {"orthogonalizer": "svd"}, True),
    "sumo_eigh": (SUMO, {"orthogonalizer": "eigh"}, True),
    "sumo_newton_schulz": (SUMO, {"orthogonalizer": "newton_schulz"}, True),
    "swan_polar_express": (SWAN, {"whitening": "polar_express"}, False),
    "swan_polar": (SWAN, {"whitening": "polar"}, False),
    "swan_eigh": (SWAN, {"whitening": "eigh"}, False),
    "swan_newton_schulz": (SWAN, {"whitening": "newton_schulz", "ns_steps": 10}, False),
}

# update_gap of the normal-step run: the first (warmup) step does the initial refresh and the next never comes.
NEVER = 10**9

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--shapes", choices=SHAPES, default="llama_60m")
parser.add_argument("--layers", type=int, help="override the preset's layer count (fewer is faster on CPU)")
parser.add_argument("--rank", type=int, default=128, help="subspace rank of GaLore and SUMO")
parser.add_argument("--update-gap", type=int, default=200, help="steps between subspace refreshes")
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="parameter dtype")
parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (at least 1)")
parser.add_argument("--repeats", type=int, default=10, help="timed steps")
parser.add_argument("--optimizers", nargs="+", choices=OPTIMIZERS, default=list(OPTIMIZERS),
                    help="subset to time; adamw is always timed, as the baseline")
parser.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/step_time_<shapes>_<device>.json)")
args = parser.parse_args()
# The normal-step run relies on the warmup to take the initial refresh out of the timed steps.
if args.warmup < 1 or args.repeats < 1:
    parser.error("--warmup and --repeats must be at least 1")

device = torch.device(args.device)
dtype = getattr(torch, args.dtype)
hidden, intermediate, layers = SHAPES[args.shapes]
layers = args.layers or layers
# Per layer: q, k, v, o (hidden × hidden), gate, up (intermediate × hidden), down (hidden × intermediate),
# as nn.Linear stores them (out_features × in_features). Embeddings, head and norms are left out:
# every optimizer here hands them to AdamW anyway.
matrix_shapes = layers * ([(hidden, hidden)] * 4 + [(intermediate, hidden)] * 2 + [(hidden, intermediate)])
names = ["adamw", *[name for name in args.optimizers if name != "adamw"]]
out = args.out or Path(__file__).parent / "results" / f"step_time_{args.shapes}_{args.device}.json"


def sync():
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_params():
    """Fresh parameters with random gradients; the same values for every optimizer (fixed seed)."""
    generator = torch.Generator(device=device).manual_seed(0)
    params = []
    for shape in matrix_shapes:
        # Drawn in fp32 and then cast, so bf16 runs see the same values rounded.
        param = nn.Parameter(torch.randn(shape, generator=generator, device=device).to(dtype))
        param.grad = torch.randn(shape, generator=generator, device=device).to(dtype)
        params.append(param)
    return params


def build(name, params, update_gap):
    cls, options, refreshes = OPTIMIZERS[name]
    if refreshes:
        options = {**options, "rank": args.rank, "update_gap": update_gap}
    return cls(params, lr=LR, weight_decay=WEIGHT_DECAY, **options)


def time_steps(optimizer):
    """Milliseconds of each of args.repeats steps, after args.warmup untimed ones."""
    for _ in range(args.warmup):
        optimizer.step()
    times = []
    for _ in range(args.repeats):
        sync()  # start from an idle device, so one step's queued work does not leak into the next
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            optimizer.step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            start = time.perf_counter()
            optimizer.step()
            times.append((time.perf_counter() - start) * 1e3)
    return times


def state_bytes(optimizer):
    return sum(v.nbytes for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v))


def step_peak_bytes(optimizer):
    """CUDA only: memory one step allocates on top of params, grads and state (its transient peak)."""
    if device.type != "cuda":
        return None
    sync()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    optimizer.step()
    sync()
    return torch.cuda.max_memory_allocated(device) - before


def step_flops(optimizer):
    """Matrix-multiply FLOPs of one step, as torch's FlopCounterMode counts them (factorizations not included)."""
    with FlopCounterMode(display=False) as counter:
        optimizer.step()
    return counter.get_total_flops()


def achieved_error(optimizer, params):
    """The largest orthogonality error ‖OOᵀO − O‖_F/‖O‖_F of the matrices the method orthogonalizes: SUMO's
    moments, SWAN's standardized gradients, each by the optimizer's own method. None for the others."""
    group = optimizer.param_groups[0]
    if isinstance(optimizer, SUMO):
        matrices = [optimizer.state[p]["M"] for p in params]
        method = group["orthogonalizer"]
    elif isinstance(optimizer, SWAN):
        matrices = [standardize_rows(p.grad.float() if p.shape[0] <= p.shape[1] else p.grad.float().T,
                                     group["norm_eps"]) for p in params]
        method = group["whitening"]
    else:
        return None
    worst = 0.0
    for matrix in matrices:
        if isinstance(optimizer, SUMO):
            _, error = orthogonalize(matrix, method, rtol=group["rank_rtol"], return_error=True)
        else:
            O = whiten(matrix, method, group["ns_steps"], group["rank_rtol"])
            error = orthogonality_error(O - O.mean(dim=-1, keepdim=True))  # as SWAN's update re-centres its rows
        worst = max(worst, float(error))
    return worst


def measure(name, update_gap):
    params = make_params()
    optimizer = build(name, params, update_gap)
    times = time_steps(optimizer)
    flops = step_flops(optimizer)
    result = {
        "median_ms": statistics.median(times),
        "min_ms": min(times),
        "times_ms": times,
        "gemm_flops": flops,
        "gemm_tflops_per_s": flops / (statistics.median(times) * 1e-3) / 1e12,
        "orthogonality_error": achieved_error(optimizer, params),
        "state_bytes": state_bytes(optimizer),
        "step_peak_bytes": step_peak_bytes(optimizer),
    }
    # Free this optimizer's params and state before the next one: at llama_1b each run holds many GB.
    del optimizer, params
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


# ---------------------------------------------------------------- measure

results = []
for name in names:
    print(f"timing {name} ...", file=sys.stderr, flush=True)
    refreshes = OPTIMIZERS[name][2]
    normal = measure(name, NEVER)
    # update_gap=1 makes every step a refresh step, rotating the moment into the new subspace as a
    # real refresh at step > 0 does (the warmup step takes the first one, which has nothing to rotate).
    refresh = measure(name, 1) if refreshes else None
    if refresh:
        amortized = (refresh["median_ms"] + (args.update_gap - 1) * normal["median_ms"]) / args.update_gap
    else:
        amortized = normal["median_ms"]
    results.append({"optimizer": name, "normal": normal, "refresh": refresh, "amortized_ms": amortized,
                    "state_bytes": normal["state_bytes"]})
    # What is measured so far, after each optimizer: a run stopped part-way (a time limit) still leaves it.
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".partial.json").write_text(json.dumps({"optimizers": names, "results": results}) + "\n")

baseline = results[0]
for r in results:
    r["amortized_vs_adamw"] = r["amortized_ms"] / baseline["amortized_ms"]
    r["state_vs_adamw"] = r["state_bytes"] / baseline["state_bytes"]

# ----------------------------------------------------------------- report

command = shlex.join(["python", *sys.argv])
header = {
    "device": device_name(device),
    "torch": torch.__version__,
    "slimopt": f"{slimopt.__version__} ({git_revision() or 'no git'})",
    "shapes": f"{args.shapes}: hidden {hidden}, intermediate {intermediate}, {layers} layers, "
              f"{len(matrix_shapes)} matrices, {sum(m * n for m, n in matrix_shapes) / 1e6:.1f}M params",
    "rank / update_gap": f"{args.rank} / {args.update_gap}",
    "dtype": args.dtype,
    "timing": f"median (min) of {args.repeats} steps after {args.warmup} warmup",
    "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    "command": command,
}


def ms(run):
    return "–" if run is None else f"{run['median_ms']:.2f} ({run['min_ms']:.2f})"


def mb(n):
    return "–" if n is None else f"{n / 2**20:.1f}"


def error(run):
    value = run["orthogonality_error"]
    return "–" if value is None else f"{value:.1e}"


columns = ["optimizer", "normal step ms", "refresh step ms", "amortized ms", "× AdamW-fused", "orth. error",
           "GEMM TFLOP/s", "state MB", "state × AdamW"]
if device.type == "cuda":
    columns += ["step peak MB (normal / refresh)"]
rows = []
for r in results:
    row = [r["optimizer"], ms(r["normal"]), ms(r["refresh"]), f"{r['amortized_ms']:.2f}",
           f"{r['amortized_vs_adamw']:.2f}", error(r["normal"]), f"{r['normal']['gemm_tflops_per_s']:.2f}",
           mb(r["state_bytes"]), f"{r['state_vs_adamw']:.2f}"]
    if device.type == "cuda":
        refresh_peak = mb(r["refresh"]["step_peak_bytes"]) if r["refresh"] else "–"
        row += [f"{mb(r['normal']['step_peak_bytes'])} / {refresh_peak}"]
    rows.append(row)

# One padded markdown table serves both the terminal and the .md file.
widths = [max(len(line[i]) for line in [columns, *rows]) for i in range(len(columns))]
table = [
    "| " + " | ".join(cell.ljust(w) for cell, w in zip(line, widths)) + " |"
    for line in [columns, ["-" * w for w in widths], *rows]
]
report = "\n".join([*(f"- {key}: {value}" for key, value in header.items()), "", *table])
print(report)

out.parent.mkdir(parents=True, exist_ok=True)
config = {**vars(args), "hidden": hidden, "intermediate": intermediate, "layers": layers, "lr": LR,
          "weight_decay": WEIGHT_DECAY}
out.write_text(json.dumps({**header, "config": config, "results": results}, indent=2, default=str) + "\n")
out.with_suffix(".md").write_text(f"# step_time {args.shapes} on {args.device}\n\n{report}\n")
out.with_suffix(".partial.json").unlink(missing_ok=True)
print(f"wrote {out} and {out.with_suffix('.md')}", file=sys.stderr)
