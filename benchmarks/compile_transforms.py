"""Does torch.compile (or, on CUDA, CUDA graphs) speed up the exact transforms? Eager against compiled.

Each case is a pure transform on a stack of same-shape matrices, as one batched optimizer call runs it: the
polar orthogonalizer on SUMO's r × n moments, and SWAN's whole matrix update (standardize rows, whiten by
polar, rescale). ``fullgraph=True``: a graph break fails the case instead of hiding in the timing.

    python benchmarks/compile_transforms.py --device cpu
    python benchmarks/compile_transforms.py --device cuda   # adds mode="reduce-overhead" (CUDA graphs)
    python benchmarks/compile_transforms.py --cases polar_express   # only the cases whose name has this
"""

import argparse
import json
import shlex
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

import slimopt
from slimopt.environment import device_name, git_revision
from slimopt.transforms import scale_to_unit_rms, standardize_rows, whiten
from slimopt.transforms.hardware import low_precision
from slimopt.transforms.polar import polar
from slimopt.transforms.polar_express import polar_express


def express(M):
    """The iterative route as "auto" runs it on this device (the dtype is read outside the compiled graph)."""
    return polar_express(M, low_precision=LOW)


LOW = torch.bfloat16

# name: (function, stack shape (B, m, n)); shapes of the tiny and llama_60m presets at rank hidden/4.
CASES = {
    "polar, SUMO tiny (32×128)": (lambda M: polar(M)[0], (16, 32, 128)),
    "polar, SUMO llama_60m (128×512)": (lambda M: polar(M)[0], (16, 128, 512)),
    "polar, SUMO llama_60m (128×1376)": (lambda M: polar(M)[0], (8, 128, 1376)),
    "SWAN update, tiny (128×352)": (
        lambda G: scale_to_unit_rms(whiten(standardize_rows(G, 1e-8), "polar")), (8, 128, 352)),
    "SWAN update, llama_60m (512×1376)": (
        lambda G: scale_to_unit_rms(whiten(standardize_rows(G, 1e-8), "polar")), (4, 512, 1376)),
    "polar_express, SUMO tiny (32×128)": (express, (16, 32, 128)),
    "polar_express, SUMO llama_60m (128×512)": (express, (16, 128, 512)),
    "polar_express, SWAN llama_60m (512×512)": (express, (8, 512, 512)),
    "SWAN update (polar_express), llama_60m (512×1376)": (
        lambda G: scale_to_unit_rms(express(standardize_rows(G, 1e-8))), (4, 512, 1376)),
}


def timed(function, x, repeats, device):
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        function(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--cases", default="", help="run only the cases whose name contains this text")
    parser.add_argument("--eager-only", action="store_true", help="time eager only (the GPU suite's CPU smoke run)")
    parser.add_argument("--out", type=Path, help="JSON path (default: results/compile_transforms_<device>.json)")
    args = parser.parse_args()
    device = torch.device(args.device)
    global LOW
    LOW = low_precision(device)
    out = args.out or Path(__file__).parent / "results" / f"compile_transforms_{args.device}.json"
    modes = [] if args.eager_only else ["default"] + (["reduce-overhead"] if device.type == "cuda" else [])

    results = []
    for name, (function, shape) in CASES.items():
        if args.cases not in name:
            continue
        print(f"{name} ...", file=sys.stderr, flush=True)
        x = torch.randn(shape, generator=torch.Generator(device=device).manual_seed(0), device=device)
        function(x)  # warm up eager (library initialization)
        row = {"case": name, "shape": list(shape), "eager_ms": timed(function, x, args.repeats, device)}
        for mode in modes:
            torch._dynamo.reset()
            compiled = torch.compile(function, fullgraph=True, dynamic=False, mode=mode)
            start = time.perf_counter()
            try:
                reference, result = function(x), compiled(x)
            except Exception as error:  # a graph break or a lowering failure: report it, do not hide it
                row[mode] = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"}
                continue
            compile_s = time.perf_counter() - start
            row[mode] = {"ms": timed(compiled, x, args.repeats, device), "compile_s": compile_s,
                         "max_abs_diff": float((result - reference).abs().max())}
        results.append(row)

    header = {"device": device_name(device), "torch": torch.__version__,
              "slimopt": f"{slimopt.__version__} ({git_revision() or 'no git'})",
              "timing": f"median of {args.repeats} calls after one warm-up",
              "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "command": shlex.join(["python", *sys.argv])}
    lines = ["| case | eager ms | " + " | ".join(f"compiled ({m}) ms | speedup | compile s | max |Δ|" for m in modes)
             + " |", "|---|---:|" + "---:|---:|---:|---:|" * len(modes)]
    for row in results:
        cells = [row["case"], f"{row['eager_ms']:.2f}"]
        for mode in modes:
            run = row[mode]
            cells += ([run["error"], "–", "–", "–"] if "error" in run else
                      [f"{run['ms']:.2f}", f"{row['eager_ms'] / run['ms']:.2f}×", f"{run['compile_s']:.0f}",
                       f"{run['max_abs_diff']:.1e}"])
        lines.append("| " + " | ".join(cells) + " |")
    report = "\n".join([*(f"- {k}: {v}" for k, v in header.items()), "", *lines])
    print(report)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**header, "results": results}, indent=2) + "\n")
    out.with_suffix(".md").write_text(f"# torch.compile of the transforms\n\n{report}\n")


if __name__ == "__main__":
    main()
