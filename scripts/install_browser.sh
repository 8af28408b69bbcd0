#!/usr/bin/env bash
# Install headless Chromium and its WebDriver (Debian packages) for the demo's browser test (tests/test_app.py).
# Idempotent: returns at once when both are already installed. Needs root (or sudo) and apt.
set -euo pipefail
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "install_browser.sh: needs root or sudo to apt-get install chromium" >&2; exit 1; }
    SUDO="sudo"
fi
command -v apt-get >/dev/null 2>&1 || { echo "install_browser.sh: apt-get not found (Debian/Ubuntu only); install chromium and chromedriver yourself" >&2; exit 1; }
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq chromium chromium-driver >/dev/null
chromium --version
