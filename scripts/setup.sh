#!/usr/bin/env bash
# Create a virtual environment (Python >= 3.10) with modeling-llama4 and everything the tests, demo and examples use.
#
#   bash scripts/setup.sh                          # .venv: the newest releases pip resolves today
#   bash scripts/setup.sh --transformers 5.24.0    # .venv-tf5.24.0: the same, with transformers pinned to 5.24.0
#
# Prints the environment's folder as its last line (test.sh reads it).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TRANSFORMERS=""
while [ $# -gt 0 ]; do
    case "$1" in
        --transformers) TRANSFORMERS=${2:?"--transformers needs a version, e.g. 5.24.0"}; shift 2 ;;
        *) echo "setup.sh: unknown argument '$1' (expected --transformers X.Y.Z)" >&2; exit 2 ;;
    esac
done
VENV=.venv${TRANSFORMERS:+-tf$TRANSFORMERS}
if [ ! -x "$VENV/bin/python" ]; then
    # Debian's python3 may lack ensurepip (python3-venv); virtualenv from pip does the same job.
    "$PYTHON" -m venv "$VENV" 2>/dev/null || {
        rm -rf "$VENV"
        "$PYTHON" -m pip install -q --user virtualenv && "$PYTHON" -m virtualenv -q "$VENV"
    }
fi
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
# torch first, pinned: this pair is on local disk here (CPU machines) and torchvision imports beside it.
python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
python -m pip install -q -e ".[test,app,peft]" ${TRANSFORMERS:+"transformers==$TRANSFORMERS"}
python -c "import transformers, peft, accelerate, gradio, torch; print('setup.sh: transformers', transformers.__version__, \
'peft', peft.__version__, 'accelerate', accelerate.__version__, 'gradio', gradio.__version__, 'torch', torch.__version__)" >&2
echo "$VENV"
