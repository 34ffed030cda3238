#!/usr/bin/env bash
# Docker steps of CI, called by .ci/run (which owns the order of things):
#
#   bash .ci/docker.sh up     install docker.io, docker-compose (1.29) and debootstrap from Debian
#                             if missing, start dockerd if none is running, wait for it, and build
#                             the cpu images offline (scripts/build_images_offline.sh)
#   BOUQUET_REQUIRE_DOCKER=1 <pytest ...>     the compose smoke test then fails instead of skipping
#   bash .ci/docker.sh down   stop the dockerd that `up` started (leaves one it found running)
#
# Also: `start` / `stop` (the daemon only), `build` (images only). Or `source .ci/docker.sh`
# and call docker_install, docker_start, docker_build_images, docker_stop.
# Caches (wheelhouse, base image) live in ~/.cache/bouquet between runs; see the script.

BOUQUET_REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DOCKERD_PIDFILE=${DOCKERD_PIDFILE:-${TMPDIR:-/tmp}/bouquet-ci-dockerd.pid}
DOCKERD_LOG=${DOCKERD_LOG:-${TMPDIR:-/tmp}/bouquet-ci-dockerd.log}

docker_install() {
    local missing=()
    command -v dockerd >/dev/null || missing+=(docker.io)
    command -v docker-compose >/dev/null || missing+=(docker-compose)
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    if [ ${#missing[@]} -gt 0 ]; then
        echo "docker.sh: apt-get install ${missing[*]}"
        apt-get update -qq || return 1
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null || return 1
    fi
}

docker_start() {
    if docker info >/dev/null 2>&1; then
        echo "docker.sh: a Docker daemon is already running; using it"
        return 0
    fi
    echo "docker.sh: starting dockerd (log: $DOCKERD_LOG)"
    dockerd >"$DOCKERD_LOG" 2>&1 &
    echo $! >"$DOCKERD_PIDFILE"
    local waited=0
    until docker info >/dev/null 2>&1; do
        if ! kill -0 "$(cat "$DOCKERD_PIDFILE")" 2>/dev/null || [ $waited -ge 60 ]; then
            tail -n 20 "$DOCKERD_LOG" >&2
            echo "docker.sh: dockerd did not come up" >&2
            return 1
        fi
        sleep 1
        waited=$((waited + 1))
    done
    echo "docker.sh: dockerd is up (pid $(cat "$DOCKERD_PIDFILE"))"
}

docker_build_images() {
    bash "$BOUQUET_REPO/scripts/build_images_offline.sh" --flavour cpu
}

docker_stop() {
    [ -s "$DOCKERD_PIDFILE" ] || return 0
    local pid
    pid=$(cat "$DOCKERD_PIDFILE")
    rm -f "$DOCKERD_PIDFILE"
    # Only the dockerd that docker_start started (a stale pid file may name a reused pid).
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = dockerd ] || return 0
    echo "docker.sh: stopping dockerd (pid $pid)"
    kill -TERM "$pid"
    for _ in $(seq 30); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 1
    done
    echo "docker.sh: dockerd (pid $pid) still running after 30 s; sending KILL" >&2
    kill -KILL "$pid" 2>/dev/null || true
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    set -euo pipefail
    case "${1:-}" in
    up) docker_install && docker_start && docker_build_images ;;
    down) docker_stop ;;
    start) docker_start ;;
    stop) docker_stop ;;
    build) docker_build_images ;;
    *) echo "usage: $0 up|down|start|stop|build" >&2; exit 2 ;;
    esac
fi
