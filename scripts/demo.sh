#!/usr/bin/env bash
# The main job: set up .venv (scripts/setup.sh), then serve the Llama 4 chat demo on http://127.0.0.1:7860.
# Arguments go to the demo, e.g. `bash scripts/demo.sh --model path/to/converted --port 8000` (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m app "$@"
