# Sourced by scripts/build_images_offline.sh and scripts/build_tracker_images.sh: serve a
# wheelhouse to `docker build --network host` on 127.0.0.1 only (pip --no-index --find-links),
# the one way the offline builds get Python packages into an image.
#
#   serve_wheelhouse DIR PORT LOG   start it (dies if the port is taken), stopped at exit
#   stop_wheelhouse                 stop it now
# Needs $python and a die function from the sourcing script.

serve_wheelhouse() {
    local dir=$1 port=$2 log=$3
    if "$python" -c 'import socket, sys; socket.create_connection(("127.0.0.1", int(sys.argv[1])), 1)' "$port" 2>/dev/null; then
        die "127.0.0.1:$port is taken; set BOUQUET_WHEEL_PORT to a free port"
    fi
    "$python" -m http.server --bind 127.0.0.1 --directory "$dir" "$port" > "$log" 2>&1 &
    wheelhouse_server_pid=$!
    trap 'kill "$wheelhouse_server_pid" 2>/dev/null || true' EXIT
    for _ in $(seq 50); do
        "$python" -c 'import socket, sys; socket.create_connection(("127.0.0.1", int(sys.argv[1])), 1)' "$port" 2>/dev/null && return 0
        sleep 0.1
    done
    die "the wheelhouse server on 127.0.0.1:$port did not start (log: $log)"
}

stop_wheelhouse() {
    kill "$wheelhouse_server_pid" 2>/dev/null || true
    trap - EXIT
}
