#!/usr/bin/env bash
# Runs the checks and the whole test suite (installs what it needs first). Extra args go to pytest.
# Order: lint (ruff) and layering (import-linter contracts in setup.cfg) take seconds and fail
# fast; then pytest.
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
echo "[checks] ruff"
ruff check .
echo "[checks] import layering"
lint-imports --no-cache
# Progress reaches a CI log as it happens, not when a pipe buffer fills.
export PYTHONUNBUFFERED=1
exec python -m pytest "$@"
