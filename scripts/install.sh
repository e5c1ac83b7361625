#!/usr/bin/env bash
# Install dsmoe (editable) into the current Python. Usage: bash scripts/install.sh [--test]
#
# torch is pinned to 2.13.0 only when no torch is present: an unpinned install would pull the newest
# CUDA build (several GB). An existing torch that satisfies the package's range is left alone.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  "$PY" -m pip install --quiet "torch==2.13.0"
fi
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"
"$PY" -m pip install --quiet --disable-pip-version-check -e ".${extras}"
