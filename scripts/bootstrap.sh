#!/usr/bin/env bash
# Create (or refresh) the project's environment in .venv at the repo root, from the one pin
# set requirements.lock. Idempotent: does nothing when .venv already matches the lock.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
stamp=.venv/.requirements.lock
if [ -x .venv/bin/python ] && cmp -s requirements.lock "$stamp"; then
    exit 0
fi
echo "bootstrap: creating .venv from requirements.lock (torch with CUDA wheels: ~6 GB, ~2 min)"
"$python" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.lock
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -e .
cp requirements.lock "$stamp"
echo "bootstrap: .venv ready"
