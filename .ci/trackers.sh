#!/usr/bin/env bash
# The tracking servers of tests/test_tracking.py and scripts/bench_tracking.py, on this machine:
#   prometheus (+ promtool)  Debian's package: the Prometheus that compose's `metrics` profile runs
#   mlflow server           MLflow's full package (web UI, SQL backends), pinned in
#                           docker/tracking/requirements.lock, in its own venv in the cache,
#                           ${BOUQUET_CACHE_DIR:-~/.cache/bouquet}/mlflow-server: Bouquet's own pin
#                           set (requirements.lock) carries only MLflow's client, mlflow-skinny.
# The tests find them there (or where BOUQUET_MLFLOW / BOUQUET_PROMETHEUS / BOUQUET_PROMTOOL name)
# and skip when they are missing, unless BOUQUET_REQUIRE_TRACKERS=1 (CI sets it): then they fail.
#
#   bash .ci/trackers.sh        install (idempotent), or `source` it and call trackers_install

trackers_install() {
    local repo venv lock python
    repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    venv=${BOUQUET_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/bouquet}/mlflow-server
    lock=$repo/docker/tracking/requirements.lock
    python=${PYTHON:-python3}
    if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
        echo "trackers.sh: apt-get install prometheus"
        apt-get update -q >/dev/null || return 1
        apt-get install -y -q --no-install-recommends prometheus >/dev/null || return 1
        # Debian's package starts its service where there is an init; the tests start their own
        if command -v systemctl >/dev/null && systemctl is-active --quiet prometheus 2>/dev/null; then systemctl stop prometheus || true; fi
    fi
    prometheus --version | head -1
    if [ -x "$venv/bin/mlflow" ] && cmp -s "$lock" "$venv/.requirements.lock"; then
        echo "trackers.sh: mlflow server already in $venv"
    else
        echo "trackers.sh: pip install -r $lock into $venv"
        "$python" -m venv --clear "$venv" || return 1
        "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$lock" || return 1
        cp "$lock" "$venv/.requirements.lock"
    fi
    "$venv/bin/mlflow" --version || { echo "trackers.sh: $venv/bin/mlflow does not run" >&2; return 1; }
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    set -euo pipefail
    trackers_install
fi
