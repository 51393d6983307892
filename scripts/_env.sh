# Sourced by the set-up scripts: create or reuse .venv and install the project into it.
# Reinstalls only when setup.cfg, pyproject.toml or this file changed since the last install
# (stamp in .venv).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MDT_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual env $VENV"
  "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.mdt-installed"
WANT="$(cat "$ROOT/setup.cfg" "$ROOT/pyproject.toml" "$ROOT/scripts/_env.sh" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  echo "[setup] installing dependencies into $VENV (first run takes a minute)"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # CPU build of torch from local disk; an unpinned torch would pull a multi-GB CUDA build.
  "$VENV/bin/python" -m pip install -q "torch==2.13.*"
  "$VENV/bin/python" -m pip install -q -e "$ROOT[test]"
  # Test-only reference for the FID Inception (tests/test_evaluate.py imports two of its modules).
  # --no-deps: it requires torchvision, whose PyPI build does not import beside our CPU torch
  # ("operator torchvision::nms does not exist"); the two modules the tests use need torch only.
  "$VENV/bin/python" -m pip install -q --no-deps "torch-fidelity==0.4.0"
  echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
cd "$ROOT"
