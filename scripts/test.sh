#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole test suite; exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/install_browser.sh  # headless Chromium for the demo's browser test
. .venv/bin/activate
python -m pytest -q "$@"
