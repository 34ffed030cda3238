#!/usr/bin/env bash
# Build Bouquet's server and client images with no container registry and no internet
# inside the build (air-gapped hosts, and CI on machines that reach no registry):
#
#   1. base image bouquet/base:bookworm-nginx, made from Debian packages: debootstrap --variant=minbase
#      with Debian's python3 + python3-venv and nginx-light (app mode's front, services/appmode/front.py),
#      then `docker import` (no registry pull);
#   2. a wheelhouse of requirements.lock (+ the project's build backend), downloaded on the host,
#      and of your task's extra packages (task/requirements.txt, if there is one) with the
#      dependencies they add to the lock;
#   3. both images built with `pip --no-index --find-links`, the wheelhouse served to the build
#      over 127.0.0.1 only (the build container shares the host's network namespace for that;
#      nothing else is reachable from it on an air-gapped host).
#
# Usage: scripts/build_images_offline.sh [--flavour cpu|gpu|both] [--tag TAG] [--refresh-base]
#   --flavour cpu (default), gpu or both: the tags to build (bouquet/{server,client}:FLAVOUR),
#            the tags the compose files run. The PyTorch CPU wheel index is not reachable
#            offline, so the cpu tags are built from the wheelhouse with PyPI's torch: that
#            torch loads its CUDA libraries at import, so they stay, and the cpu tags are the
#            same image as the gpu tags (it runs on CPU when no GPU is given). With both, the
#            image is built once and tagged twice.
#   --tag TAG  tag the images bouquet/{server,client}:TAG instead (one flavour only): a variant
#            built beside the images compose runs, not over them.
#   --refresh-base  make the base image again with debootstrap (otherwise it is reused).
#
# Your task's pip packages: list them, pinned (name==version), in task/requirements.txt; the
# images install them on top of requirements.lock (docs/tasks.md).
#
# Environment:
#   BOUQUET_CACHE_DIR   cache kept between runs (default ${XDG_CACHE_HOME:-~/.cache}/bouquet):
#                       wheelhouse/ and the base image's tarball. Delete it to start from zero.
#   BOUQUET_WHEEL_PORT  loopback port that serves the wheelhouse to the build (default 3141;
#                       it is part of the build's cache key, keep it fixed)
#   DEBIAN_MIRROR       default http://deb.debian.org/debian
#   PYTHON              host Python 3.11 that downloads the wheels (default python3)
#
# Repeated runs reuse the cache and Docker's layer cache (a code change rebuilds in seconds),
# and remove the images a run superseded, so they do not fill the disk.
set -euo pipefail

flavour=cpu
tag=
refresh_base=
while [ $# -gt 0 ]; do
    case "$1" in
    --flavour) flavour=${2:?--flavour needs cpu, gpu or both}; shift 2 ;;
    --flavour=*) flavour=${1#*=}; shift ;;
    --tag) tag=${2:?--tag needs a tag}; shift 2 ;;
    --tag=*) tag=${1#*=}; shift ;;
    --refresh-base) refresh_base=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "build_images_offline: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done
case "$flavour" in cpu|gpu|both) ;; *) echo "build_images_offline: --flavour must be cpu, gpu or both, not '$flavour'" >&2; exit 2 ;; esac
if [ -n "$tag" ]; then
    [ "$flavour" != both ] || { echo "build_images_offline: --tag '$tag' names one image per program; it does not go with --flavour both" >&2; exit 2; }
    [[ "$tag" =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$ ]] || { echo "build_images_offline: --tag '$tag' is not a Docker tag (letters, digits, _ . -)" >&2; exit 2; }
fi

repo=$(cd "$(dirname "$0")/.." && pwd)
task_requirements=$repo/task/requirements.txt
cache=${BOUQUET_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/bouquet}
wheelhouse=$cache/wheelhouse
suite=bookworm
base_packages=python3,python3-venv,nginx-light
base_image=bouquet/base:$suite-nginx  # named by what it adds: an older base without nginx is not taken for it
base_tar=$cache/base-$suite-nginx.tar
port=${BOUQUET_WHEEL_PORT:-3141}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
python=${PYTHON:-python3}
vendor_label=org.opencontainers.image.vendor=Bouquet
export DOCKER_BUILDKIT=0  # the classic builder: needs no buildx plugin, and --network host works

start=$SECONDS
say() { printf '[build_images_offline +%ss] %s\n' "$((SECONDS - start))" "$*"; }
die() { printf 'build_images_offline: %s\n' "$*" >&2; exit 1; }

docker info >/dev/null 2>&1 || die "cannot reach the Docker daemon (is dockerd running? .ci/docker.sh start starts one)"
"$python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
    || die "$python is not Python 3.11: the wheels must match the images' Python (Debian bookworm's 3.11)"
mkdir -p "$wheelhouse"

# --- 1. base image from Debian packages ----------------------------------------------------------
if [ -n "$refresh_base" ]; then
    rm -f "$base_tar"
    docker image rm "$base_image" >/dev/null 2>&1 || true
fi
if docker image inspect "$base_image" >/dev/null 2>&1; then
    say "base image $base_image: present"
else
    if [ ! -s "$base_tar" ]; then
        [ "$(id -u)" = 0 ] || die "debootstrap needs root to make the base image (run as root once; the result is cached in $base_tar)"
        command -v debootstrap >/dev/null || die "debootstrap is not installed (apt-get install debootstrap)"
        rootfs=$(mktemp -d "$cache/rootfs.XXXXXX")
        trap 'rm -rf "$rootfs"' EXIT
        say "debootstrap --variant=minbase $suite ($base_packages) from $mirror"
        debootstrap --variant=minbase --include="$base_packages" "$suite" "$rootfs" "$mirror" \
            > "$cache/debootstrap.log" 2>&1 || { tail -n 20 "$cache/debootstrap.log" >&2; die "debootstrap failed (log: $cache/debootstrap.log)"; }
        rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/tmp/* "$rootfs"/var/log/*.log
        tar --numeric-owner -C "$rootfs" -cf "$base_tar.partial" .
        mv "$base_tar.partial" "$base_tar"
        rm -rf "$rootfs"
        trap - EXIT
    fi
    say "docker import $base_tar as $base_image"
    docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change "LABEL $vendor_label" \
        --change 'CMD ["python3"]' \
        "$base_tar" "$base_image" >/dev/null
fi

# --- 2. wheelhouse, downloaded on the host -------------------------------------------------------
# requirements.lock pins the whole tree; pip also needs the build backend of `pip install .`.
mapfile -t build_reqs < <("$python" -c 'import sys, tomllib; print("\n".join(tomllib.load(open(sys.argv[1], "rb"))["build-system"]["requires"]))' "$repo/pyproject.toml")
# Drop wheels that the current pins no longer name (an old pin set's wheels would pile up) and
# list the pins that have no wheel yet: only those are downloaded.
mapfile -t missing < <("$python" - "$repo/requirements.lock" "$wheelhouse" <<'PY'
import pathlib, re, sys
lock, wheelhouse = sys.argv[1:]
canon = lambda name: re.sub(r"[-_.]+", "-", name).lower()
pins = {}
for line in pathlib.Path(lock).read_text().splitlines():
    line = line.split("#", 1)[0].strip()
    if "==" in line:
        name, version = line.split("==", 1)
        pins[canon(name)] = (line, version.strip())
present = set()
for wheel in pathlib.Path(wheelhouse).glob("*.whl"):
    name, version = wheel.name.split("-")[:2]
    if canon(name) in pins:
        if pins[canon(name)][1] == version:
            present.add(canon(name))
        else:
            print(f"removing stale {wheel.name}", file=sys.stderr)
            wheel.unlink()
for name, (line, _) in sorted(pins.items()):
    if name not in present:
        print(line)
PY
)
say "wheelhouse $wheelhouse: ${#missing[@]} of requirements.lock's pins to download, + build backend (${build_reqs[*]})"
# The task's packages and what they need beyond the lock, resolved against it (as the image's pip
# will be): only pins that are not in the lock are added.
task_pins() {
    "$python" -m pip install --dry-run --ignore-installed --quiet --report - \
        --find-links "$wheelhouse" --constraint "$repo/requirements.lock" --requirement "$task_requirements" \
    | "$python" -c '
import json, pathlib, re, sys
canon = lambda name: re.sub(r"[-_.]+", "-", name).lower()
lock = {canon(line.split("==")[0]) for line in pathlib.Path(sys.argv[1]).read_text().splitlines() if "==" in line and not line.startswith("#")}
for item in json.load(sys.stdin)["install"]:
    if canon(item["metadata"]["name"]) not in lock:
        print(item["metadata"]["name"] + "==" + item["metadata"]["version"])
' "$repo/requirements.lock"
}
task=()
if [ -f "$task_requirements" ]; then
    task_pins > "$cache/task-pins.txt" 2> "$cache/task-requirements.log" \
        || { tail -n 20 "$cache/task-requirements.log" >&2; die "task/requirements.txt does not resolve against requirements.lock (log: $cache/task-requirements.log)"; }
    mapfile -t task < "$cache/task-pins.txt"
    say "task/requirements.txt: ${#task[@]} packages beyond requirements.lock (${task[*]})"
fi
fetch_wheels() {
    if [ ${#missing[@]} -gt 0 ]; then
        "$python" -m pip wheel --no-deps --wheel-dir "$wheelhouse" "${missing[@]}" || return 1
    fi
    if [ ${#task[@]} -gt 0 ]; then
        "$python" -m pip wheel --no-deps --find-links "$wheelhouse" --wheel-dir "$wheelhouse" "${task[@]}" || return 1
    fi
    # The build backend: from the wheelhouse when it is there already, else downloaded.
    "$python" -m pip wheel --no-index --find-links "$wheelhouse" --wheel-dir "$wheelhouse" "${build_reqs[@]}" \
        || "$python" -m pip wheel --find-links "$wheelhouse" --wheel-dir "$wheelhouse" "${build_reqs[@]}"
}
fetch_wheels > "$cache/wheelhouse.log" 2>&1 \
    || { tail -n 20 "$cache/wheelhouse.log" >&2; die "downloading the wheelhouse failed (log: $cache/wheelhouse.log; the host needs PyPI or a mirror for this step)"; }
say "wheelhouse: $(ls "$wheelhouse" | wc -l) wheels, $(du -sh "$wheelhouse" | cut -f1)"

# --- 3. serve the wheelhouse on loopback, build the images --------------------------------------
# shellcheck source=scripts/lib/wheelhouse.sh
source "$repo/scripts/lib/wheelhouse.sh"
serve_wheelhouse "$wheelhouse" "$port" "$cache/wheel-server.log"
pip_opts="--no-index --find-links http://127.0.0.1:$port/"
revision=$(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo unknown)

case "$flavour" in
cpu) tags=(cpu) ;;
gpu) tags=(gpu) ;;
both) tags=(gpu cpu) ;;
esac
[ -z "$tag" ] || tags=("$tag")
for image in server client; do
    first="bouquet/$image:${tags[0]}"
    # The two Dockerfiles share their common part: the second build takes those layers (torch's
    # among them) from the cache.
    say "docker build $first (Dockerfile.$image; torch from the wheelhouse: PyPI's build)"
    docker build --network host \
        --file "$repo/Dockerfile.$image" \
        --build-arg BASE_IMAGE="$base_image" \
        --build-arg TORCH_FLAVOUR=gpu \
        --build-arg PIP_INSTALL_OPTS="$pip_opts" \
        --build-arg REVISION="$revision" \
        --tag "$first" \
        "$repo" > "$cache/build-$image.log" 2>&1 \
        || { tail -n 30 "$cache/build-$image.log" >&2; die "docker build of $first failed (log: $cache/build-$image.log)"; }
    for tag in "${tags[@]:1}"; do
        docker tag "$first" "bouquet/$image:$tag"
    done
done

# --- 4. remove what this run superseded (old images of these tags, their build layers) ----------
docker image prune --force --filter "label=$vendor_label" >/dev/null
say "done:"
# (filter in docker, indent with sed: the CLI strips a --format's leading spaces)
docker image ls --filter 'reference=bouquet/*' --format '{{.Repository}}:{{.Tag}}  {{.ID}}  {{.Size}}' | sed 's/^/  /'
if [ "$flavour" = cpu ] && [ -z "$tag" ]; then
    # .env's COMPOSE_FILE lists the GPU overlay, whose bouquet/*:gpu tags this run did not make: without
    # the switch, `up` fails with "No such image: bouquet/server:gpu" or a registry error (docs/containers.md)
    say "to run these cpu images: export COMPOSE_FILE=docker-compose.yml (the CPU switch), then docker compose up --no-build"
fi
