#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the test suite; exits non-zero on any failure, and when no test ran.
#
#   bash scripts/test.sh [PYTEST ARGS]                          # .venv, newest releases (+ headless Chromium)
#   bash scripts/test.sh --transformers 5.24.0 [PYTEST ARGS]    # .venv-tf5.24.0, transformers pinned
#
# Only the first form installs the browser of the demo's browser test (scripts/install_browser.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
SETUP_ARGS=()
if [ "${1:-}" = "--transformers" ]; then
    SETUP_ARGS=(--transformers "${2:?"--transformers needs a version, e.g. 5.24.0"}")
    shift 2
fi
VENV=$(bash scripts/setup.sh "${SETUP_ARGS[@]}" | tail -n 1)
if [ ${#SETUP_ARGS[@]} -eq 0 ]; then
    bash scripts/install_browser.sh  # headless Chromium for the demo's browser test
fi
. "$VENV/bin/activate"
status=0
python -m pytest -q "$@" || status=$?
if [ "$status" -eq 5 ]; then
    echo "test.sh: pytest collected no tests (arguments: $*)" >&2
fi
exit "$status"
