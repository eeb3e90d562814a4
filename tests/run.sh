#!/usr/bin/env bash
# Installs what the tests need (a virtualenv, Python packages, Debian's chromium) and runs lint + pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then "$PY" -m venv .venv; fi
.venv/bin/pip install -q --disable-pip-version-check -r requirements-dev.txt
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq chromium >/dev/null
  else
    echo "chromium is missing: sudo apt-get install -y chromium (the browser test needs it)" >&2
  fi
fi
.venv/bin/ruff check llm_backends tests benchmarks app.py chat_history.py
.venv/bin/python -m pytest "$@"
