#!/usr/bin/env bash
# Runs the whole test suite (installs what it needs first). Extra args go to pytest.
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
exec python -m pytest "$@"
