#!/usr/bin/env bash
# Create .venv (Python >= 3.10) and install modeling-llama4 with everything the tests, demo and examples use.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first, pinned: this pair is on local disk here (CPU machines) and torchvision imports beside it.
python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
python -m pip install -q -e ".[test,app,peft]"
