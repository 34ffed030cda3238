#!/usr/bin/env bash
# Three Docker hosts on one machine, to try Bouquet's Swarm stack (deploy/swarm/) without three
# VMs: three extra dockerd, each in a network namespace of its own (so each is a separate host to
# Swarm, with its own address, iptables, bridges and overlay endpoint), joined as one swarm: node
# 1 the manager, nodes 2 and 3 workers. tests/test_swarm.py drives the same commands.
#
#   scripts/swarm_local.sh up             namespaces, daemons, the images (below), the swarm
#   scripts/swarm_local.sh host N         print DOCKER_HOST for node N (eval "export DOCKER_HOST=$(...)")
#   scripts/swarm_local.sh stop-host N    stop node N's dockerd as a host shutting down does
#                                         (its containers are stopped; Swarm marks the node down)
#   scripts/swarm_local.sh down           stop every daemon and process of these hosts, remove the
#                                         namespaces and the state folder; safe to repeat, and
#                                         after a failed `up`
#
# Needs root (ip netns, dockerd), dockerd/docker/ip/unshare, and the images in the machine's own
# daemon (scripts/build_images_offline.sh). That daemon is only read from (`docker save`): the
# swarm is never initialised on it, and its networks and iptables rules are not touched.
#
# Network: a namespace <prefix>-hub holds a bridge; each node's namespace <prefix>-nN has one veth
# into it (eth0, 192.168.213.1N/24) and its loopback. Nothing is connected to the machine's own
# network: the nodes reach each other and nothing else. The docker CLI on the machine reaches
# each daemon through its Unix socket, which is a file and needs no network.
#
# Images: one `docker save` of all of them (the server and client images share almost every
# layer, so the stream carries them once) piped into node 1's `docker load`: no registry, no
# tarball on disk. Nodes 2 and 3 get node 1's image store as hard links (clone_images says why).
#
# Environment:
#   BOUQUET_SWARM_DIR     state: per node data root, exec root, socket, pid file, log
#                         (default /tmp/bouquet-swarm; keep the path short: sockets live there)
#   BOUQUET_SWARM_PREFIX  names of the namespaces (default bqs); two swarms need two prefixes
#   BOUQUET_SWARM_IMAGES  images to load (default "bouquet/server:cpu bouquet/client:cpu")
#   BOUQUET_SWARM_HEARTBEAT  Swarm's dispatcher heartbeat (default 2s: a stopped host is marked
#                         down, and its tasks rescheduled, within seconds; Swarm's default is 5s)
set -euo pipefail

STATE=${BOUQUET_SWARM_DIR:-/tmp/bouquet-swarm}
PREFIX=${BOUQUET_SWARM_PREFIX:-bqs}
IMAGES=${BOUQUET_SWARM_IMAGES:-bouquet/server:cpu bouquet/client:cpu}
HEARTBEAT=${BOUQUET_SWARM_HEARTBEAT:-2s}
NODES=(1 2 3)
SUBNET=192.168.213
HUB=$PREFIX-hub

say() { echo "swarm_local: $*" >&2; }
die() { say "$*"; exit 1; }
address() { echo "$SUBNET.1$1"; }
netns() { echo "$PREFIX-n$1"; }
node_dir() { echo "$STATE/n$1"; }
socket() { echo "unix://$(node_dir "$1")/docker.sock"; }
on() { local n=$1; shift; docker -H "$(socket "$n")" "$@"; }

# --- network ----------------------------------------------------------------------------------

make_network() {
    ip netns add "$HUB"
    ip -n "$HUB" link set lo up
    ip -n "$HUB" link add br0 type bridge
    ip -n "$HUB" link set br0 up
    for n in "${NODES[@]}"; do
        local ns
        ns=$(netns "$n")
        ip netns add "$ns"
        ip -n "$ns" link set lo up
        # Made inside the node's namespace, its peer put straight into the hub's: the machine's
        # own namespace never holds either end.
        ip -n "$ns" link add eth0 type veth peer name "n$n" netns "$HUB"
        ip -n "$HUB" link set "n$n" master br0 up
        ip -n "$ns" addr add "$(address "$n")/24" dev eth0
        ip -n "$ns" link set eth0 up
    done
}

# --- daemons ----------------------------------------------------------------------------------

start_daemon() {
    local n=$1 dir
    dir=$(node_dir "$n")
    mkdir -p "$dir/data" "$dir/exec"
    echo '{}' >"$dir/daemon.json"  # not the machine's /etc/docker/daemon.json
    # Only the network namespace is entered (`ip netns exec` would mount a sysfs without the
    # cgroup hierarchies, and dockerd refuses to start). Its own UTS namespace: the node's
    # hostname (Swarm's node name) is <prefix>-nN. Its own mount namespace (receiving the
    # machine's mounts): the daemon's overlay and netns mounts go when its processes do.
    # Its own containerd (started by dockerd under the exec root), in namespaces named after the
    # node, so nothing is shared with the machine's daemon even where a system containerd runs.
    nsenter --net="/run/netns/$(netns "$n")" unshare --uts --mount --propagation slave \
        sh -c 'hostname "$0" && exec "$@"' "$(netns "$n")" \
        dockerd \
        --config-file "$dir/daemon.json" \
        --data-root "$dir/data" \
        --exec-root "$dir/exec" \
        --pidfile "$dir/dockerd.pid" \
        -H "$(socket "$n")" \
        --containerd-namespace "$(netns "$n")" \
        --containerd-plugins-namespace "$(netns "$n")-plugins" \
        >"$dir/dockerd.log" 2>&1 &
    echo $! >"$dir/launched.pid"
}

wait_for_daemon() {
    local n=$1 deadline=$((SECONDS + 60))
    until on "$n" info >/dev/null 2>&1; do
        if ! kill -0 "$(cat "$(node_dir "$n")/launched.pid")" 2>/dev/null || [ $SECONDS -ge $deadline ]; then
            tail -n 20 "$(node_dir "$n")/dockerd.log" >&2
            die "node $n's dockerd did not come up (log: $(node_dir "$n")/dockerd.log)"
        fi
        sleep 0.2
    done
}

daemon_pid() {
    local pidfile
    pidfile="$(node_dir "$1")/dockerd.pid"
    [ -s "$pidfile" ] || return 1
    local pid
    pid=$(cat "$pidfile")
    # Only a dockerd of this node (a stale pid file may name a reused pid).
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = dockerd ] || return 1
    grep -qF -- "$(node_dir "$1")/data" "/proc/$pid/cmdline" 2>/dev/null || return 1
    echo "$pid"
}

stop_daemon() {
    local n=$1 pid
    pid=$(daemon_pid "$n") || return 0
    say "stopping node $n's dockerd (pid $pid; it stops its containers first)"
    kill -TERM "$pid" 2>/dev/null || return 0
    local deadline=$((SECONDS + 60))
    while kill -0 "$pid" 2>/dev/null; do
        if [ $SECONDS -ge $deadline ]; then
            say "node $n's dockerd still running after 60 s; killing it"
            kill -KILL "$pid" 2>/dev/null || true
            break
        fi
        sleep 0.2
    done
}

# Whatever a daemon left running (it was killed, or a stop failed): its containers' processes,
# found through their cgroups (container ids from the node's own data root), then whatever runs
# in the node's namespace (containerd, shims). Only processes of this node are ever signalled.
kill_leftovers() {
    local n=$1 dir id pid
    dir=$(node_dir "$n")
    if [ -d "$dir/data/containers" ]; then
        for id in $(ls "$dir/data/containers"); do
            for procs in /sys/fs/cgroup/pids/docker/"$id"/cgroup.procs /sys/fs/cgroup/system.slice/docker-"$id".scope/cgroup.procs /sys/fs/cgroup/docker/"$id"/cgroup.procs; do
                [ -r "$procs" ] || continue
                for pid in $(cat "$procs"); do kill -KILL "$pid" 2>/dev/null || true; done
            done
        done
    fi
    if ip netns list | grep -qw "$(netns "$n")"; then
        for pid in $(ip netns pids "$(netns "$n")" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
    fi
}

# --- images and swarm -------------------------------------------------------------------------

load_images() {
    local started=$SECONDS
    # shellcheck disable=SC2086  # IMAGES is a list
    docker save $IMAGES | on 1 load -q >&2 || die "docker save | docker load into node 1 failed"
    say "docker save | docker load of $IMAGES into node 1: $((SECONDS - started)) s"
}

# Nodes 2 and 3 get node 1's image store as hard links (seconds, no disk): `docker load` into
# each would write the images three times over, plus a whole copy of the stream each while it
# loads (20.10 unpacks the archive before it applies the layers): ~40 GB and minutes for
# Bouquet's 6.75 GB images. Only image layers and metadata are linked, which Docker writes once
# and never changes (a container's changes go to its own upper layer); node 1's daemon is
# stopped meanwhile. On real hosts each one runs `docker load` (docs/swarm.md).
clone_images() {
    local n=$1 from to
    from=$(node_dir 1)/data
    to=$(node_dir "$n")/data
    mkdir -p "$to"
    cp -a --link "$from/image" "$from/overlay2" "$to/"
}

make_swarm() {
    on 1 swarm init --advertise-addr "$(address 1)" --listen-addr "$(address 1):2377" --dispatcher-heartbeat "$HEARTBEAT" >/dev/null
    local token n
    token=$(on 1 swarm join-token -q worker)
    for n in "${NODES[@]:1}"; do
        on "$n" swarm join --token "$token" --advertise-addr "$(address "$n")" --listen-addr "$(address "$n"):2377" "$(address 1):2377" >/dev/null
    done
    local deadline=$((SECONDS + 60))
    until [ "$(on 1 node ls --format '{{.Status}}' | grep -c '^Ready$')" = "${#NODES[@]}" ]; do
        [ $SECONDS -lt $deadline ] || die "the swarm has not got ${#NODES[@]} ready nodes after 60 s: $(on 1 node ls)"
        sleep 0.2
    done
}

# --- commands ---------------------------------------------------------------------------------

up() {
    [ "$(id -u)" = 0 ] || die "needs root (network namespaces, dockerd)"
    for tool in dockerd docker ip unshare nsenter; do command -v $tool >/dev/null || die "$tool is not installed"; done
    # shellcheck disable=SC2086
    docker image inspect $IMAGES >/dev/null || die "the machine's Docker daemon lacks $IMAGES (scripts/build_images_offline.sh builds them)"
    if ip netns list | grep -qw "$HUB" || [ -e "$STATE" ]; then
        die "a swarm of prefix $PREFIX or the folder $STATE exists already: \`$0 down\` first"
    fi
    mkdir -p "$STATE"
    local started=$SECONDS
    make_network
    start_daemon 1
    wait_for_daemon 1
    load_images
    stop_daemon 1
    for n in "${NODES[@]:1}"; do clone_images "$n"; done
    for n in "${NODES[@]}"; do start_daemon "$n"; done
    for n in "${NODES[@]}"; do wait_for_daemon "$n"; done
    say "3 daemons up with the images in $((SECONDS - started)) s"
    make_swarm
    say "swarm of 3 nodes ready in $((SECONDS - started)) s; manager: export DOCKER_HOST=$(socket 1)"
    on 1 node ls >&2
}

down() {
    local n started=$SECONDS
    for n in "${NODES[@]}"; do stop_daemon "$n" || true; done
    say "daemons stopped in $((SECONDS - started)) s"
    for n in "${NODES[@]}"; do kill_leftovers "$n" || true; done
    for ns in "$HUB" $(for n in "${NODES[@]}"; do netns "$n"; done); do
        if ip netns list | grep -qw "$ns"; then ip netns del "$ns" || say "could not remove namespace $ns"; fi
    done
    if [ -d "$STATE" ]; then
        # A mount left behind under the data root would make rm fail halfway: say which.
        if grep -qF " $STATE/" /proc/mounts; then
            grep -F " $STATE/" /proc/mounts | awk '{print $2}' | sort -r | xargs -r -n1 umount -l || true
        fi
        rm -rf "$STATE" || die "could not remove $STATE"
    fi
    say "down in $((SECONDS - started)) s"
}

case "${1:-}" in
up) up ;;
down) down ;;
host) [ -n "${2:-}" ] || die "usage: $0 host N"; socket "$2" ;;
stop-host) [ -n "${2:-}" ] || die "usage: $0 stop-host N"; stop_daemon "$2" ;;
*) echo "usage: $0 up | host N | stop-host N | down" >&2; exit 2 ;;
esac
