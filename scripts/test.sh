#!/usr/bin/env bash
# Set up (if needed), then lint, type-check and run the tests (unit + integration; the
# `slow` tier runs with: bash scripts/test.sh -m slow). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
echo "== ruff"
.venv/bin/ruff check kdcache pipelines tests bench
.venv/bin/ruff format --check kdcache pipelines tests bench
echo "== mypy"
.venv/bin/mypy kdcache
echo "== pytest"
exec .venv/bin/python -m pytest "$@"
