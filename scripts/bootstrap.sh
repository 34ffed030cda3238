#!/usr/bin/env bash
# Create (or refresh) the project's environment in .venv at the repo root, from the one pin
# set requirements.lock, with the project itself (services, benchmarks) installed in editable
# mode, which is how scripts/*.py import it. Idempotent: does nothing when .venv already
# matches the lock and pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
stamp=.venv/.requirements.lock
project_stamp=.venv/.pyproject.toml
if [ -x .venv/bin/python ] && cmp -s requirements.lock "$stamp" && cmp -s pyproject.toml "$project_stamp"; then
    exit 0
fi
if ! { [ -x .venv/bin/python ] && cmp -s requirements.lock "$stamp"; }; then
    echo "bootstrap: creating .venv from requirements.lock (torch with CUDA wheels: ~6 GB, ~2 min)"
    "$python" -m venv .venv
    .venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.lock
    cp requirements.lock "$stamp"
fi
# Again whenever pyproject.toml changes: the editable install maps the packages it lists.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -e .
cp pyproject.toml "$project_stamp"
echo "bootstrap: .venv ready"
