#!/usr/bin/env bash
# Runs the whole test suite (installs what it needs first). Extra args go to pytest.
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
# Progress reaches a CI log as it happens, not when a pipe buffer fills.
export PYTHONUNBUFFERED=1
exec python -m pytest "$@"
