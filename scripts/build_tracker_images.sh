#!/usr/bin/env bash
# Build the images of compose's `metrics` and `tracking` profiles with no container registry,
# from Debian's packages, the way scripts/build_images_offline.sh makes bouquet/base:
#
#   bouquet/prometheus:bookworm   debootstrap --variant=minbase --include=prometheus, docker import
#                                 (Debian's Prometheus 2.42; the `metrics` profile)
#   bouquet/tracking:bookworm     debootstrap --include=postgresql,python3,python3-venv, docker
#                                 import, then MLflow's server from docker/tracking/requirements.lock
#                                 installed from a wheelhouse downloaded on the host and served to
#                                 the build over 127.0.0.1 (the `tracking` profile: PostgreSQL and
#                                 `mlflow server` in one container, docker/tracking/start.sh)
#
# Usage: scripts/build_tracker_images.sh [prometheus] [tracking]   (default: both)
# Environment: BOUQUET_CACHE_DIR, DEBIAN_MIRROR, BOUQUET_WHEEL_PORT (default 3142), PYTHON, as in
# scripts/build_images_offline.sh. The rootfs tarballs are cached; delete them to rebuild.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cache=${BOUQUET_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/bouquet}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
port=${BOUQUET_WHEEL_PORT:-3142}
python=${PYTHON:-python3}
suite=bookworm
vendor_label=org.opencontainers.image.vendor=Bouquet
export DOCKER_BUILDKIT=0
start=$SECONDS
say() { printf '[build_tracker_images +%ss] %s\n' "$((SECONDS - start))" "$*" >&2; }
die() { printf 'build_tracker_images: %s\n' "$*" >&2; exit 1; }

wanted=("$@")
[ ${#wanted[@]} -gt 0 ] || wanted=(prometheus tracking)
for name in "${wanted[@]}"; do
    case "$name" in prometheus|tracking) ;; *) die "unknown image '$name' (prometheus, tracking)" ;; esac
done
docker info >/dev/null 2>&1 || die "cannot reach the Docker daemon"
# shellcheck source=scripts/lib/wheelhouse.sh
source "$repo/scripts/lib/wheelhouse.sh"
mkdir -p "$cache"

# rootfs NAME PACKAGES: a Debian minbase with PACKAGES, as a cached tarball
rootfs() {
    local name=$1 packages=$2 tar=$cache/$1-$suite.tar dir
    if [ ! -s "$tar" ]; then
        [ "$(id -u)" = 0 ] || die "debootstrap needs root"
        command -v debootstrap >/dev/null || die "debootstrap is not installed (apt-get install debootstrap)"
        dir=$(mktemp -d "$cache/rootfs-$name.XXXXXX")
        say "debootstrap --variant=minbase --include=$packages $suite"
        debootstrap --variant=minbase --include="$packages" "$suite" "$dir" "$mirror" > "$cache/debootstrap-$name.log" 2>&1 \
            || { rm -rf "$dir"; tail -n 20 "$cache/debootstrap-$name.log" >&2; die "debootstrap failed (log: $cache/debootstrap-$name.log)"; }
        rm -rf "$dir"/var/cache/apt/archives/*.deb "$dir"/var/lib/apt/lists/* "$dir"/tmp/* "$dir"/var/log/*.log
        tar --numeric-owner -C "$dir" -cf "$tar.partial" .
        mv "$tar.partial" "$tar"
        rm -rf "$dir"
    fi
    echo "$tar"
}

for name in "${wanted[@]}"; do
    case "$name" in
    prometheus)
        tar=$(rootfs prometheus prometheus)
        say "docker import $tar as bouquet/prometheus:$suite"
        docker import \
            --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
            --change "LABEL $vendor_label" \
            --change 'USER prometheus' \
            --change 'WORKDIR /var/lib/prometheus' \
            --change 'ENTRYPOINT ["/usr/bin/prometheus"]' \
            --change 'CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/var/lib/prometheus/metrics2"]' \
            "$tar" "bouquet/prometheus:$suite" >/dev/null
        ;;
    tracking)
        tar=$(rootfs tracking postgresql,python3,python3-venv)
        say "docker import $tar as bouquet/tracking-base:$suite"
        docker import --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' --change 'ENV LANG=C.UTF-8' \
            --change "LABEL $vendor_label" "$tar" "bouquet/tracking-base:$suite" >/dev/null
        wheels=$cache/wheelhouse-tracking
        mkdir -p "$wheels"
        say "wheelhouse $wheels from docker/tracking/requirements.lock"
        "$python" -m pip wheel -q --no-deps --wheel-dir "$wheels" -r "$repo/docker/tracking/requirements.lock" > "$cache/wheelhouse-tracking.log" 2>&1 \
            || { tail -n 20 "$cache/wheelhouse-tracking.log" >&2; die "downloading the tracking wheelhouse failed"; }
        serve_wheelhouse "$wheels" "$port" "$cache/wheel-server-tracking.log"
        say "docker build bouquet/tracking:$suite (docker/tracking/Dockerfile)"
        docker build --network host --file "$repo/docker/tracking/Dockerfile" \
            --build-arg BASE_IMAGE="bouquet/tracking-base:$suite" \
            --build-arg PIP_INSTALL_OPTS="--no-index --find-links http://127.0.0.1:$port/" \
            --tag "bouquet/tracking:$suite" "$repo/docker/tracking" > "$cache/build-tracking.log" 2>&1 \
            || { tail -n 30 "$cache/build-tracking.log" >&2; die "docker build of bouquet/tracking failed (log: $cache/build-tracking.log)"; }
        stop_wheelhouse
        ;;
    esac
done
say "done:"
docker image ls --filter 'reference=bouquet/prometheus' --filter 'reference=bouquet/tracking' --format '{{.Repository}}:{{.Tag}}  {{.ID}}  {{.Size}}' | sed 's/^/  /'
