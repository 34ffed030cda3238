#!/bin/sh
# Entry point of both Bouquet images (compose runs it under tini: `init: true`).
#
# Started as the image's user (bouquet, uid 1000; how clients run): just runs the command.
#
# Started as root (how compose runs the server, to write into the host folder mounted at
# $FL_RESULTS_DIR): steps down before running the command, to the owner of that folder, so
# result files belong to the host user who owns ./results. A folder owned by root (Docker
# creates a missing ./results as root) is handed to bouquet first. The command never runs
# as root. The step-down keeps bouquet's group as a supplementary group so the server can
# share the data cache volume with the clients.
#
# BOUQUET_AMBIENT_CAPS (e.g. sys_ptrace): capabilities the command keeps after the step-down, as
# ambient capabilities (the container must have them: cap_add). The memory sidecar needs
# SYS_PTRACE to read other containers' /proc entries, and nothing else of root.
set -eu
umask 0002  # the data cache is shared by group bouquet (setgid folder), whatever uid writes it

if [ "$(id -u)" != 0 ]; then
    exec "$@"
fi

# copy_tls FROM TO UID GID: the TLS files present in FROM, owned by UID:GID and private to it.
copy_tls() {
    for name in ca.crt server.crt server.key; do
        if [ -e "$1/$name" ]; then
            install -m 0600 -o "$3" -g "$4" "$1/$name" "$2/$name" || return 1
        fi
    done
    chown "$3:$4" "$2"
}

results=${FL_RESULTS_DIR:-/results}
mkdir -p "$results"
uid=$(stat -c %u "$results")
gid=$(stat -c %g "$results")
if [ "$uid" = 0 ]; then
    chown bouquet:bouquet "$results"
    uid=$(id -u bouquet)
    gid=$(id -g bouquet)
fi
[ "$gid" != 0 ] || gid=$(id -g bouquet)
if [ "$uid" = "$(id -u bouquet)" ]; then
    export HOME=/home/bouquet  # not root's: caches (matplotlib, torch) are written under HOME
else
    export HOME=/tmp  # a host uid has no home in the image
fi
echo "bouquet-entrypoint: running as uid $uid gid $gid (owner of $results)" >&2

# TLS (FL_TLS_DIR; compose mounts the host folder read-only at /tls). The server must read
# server.key, which scripts/make_certs.py (like any careful operator) leaves readable by its
# owner only, and that owner need not be the uid stepped down to: certificates made as root
# (CI, sudo), or by another user than the owner of ./results. Root reads the files here and
# gives that uid a private copy (0600 in a 0700 folder), so the host folder's owner and modes
# never matter. A file root cannot read either is not copied around: the program then names it.
if [ -n "${FL_TLS_DIR:-}" ] && [ -d "$FL_TLS_DIR" ]; then
    copy=/run/bouquet-tls
    if rm -rf "$copy" && mkdir -m 0700 "$copy" && copy_tls "$FL_TLS_DIR" "$copy" "$uid" "$gid"; then
        export BOUQUET_TLS_SOURCE="$FL_TLS_DIR" FL_TLS_DIR="$copy"
    else
        rm -rf "$copy"
    fi
fi
if [ -n "${BOUQUET_AMBIENT_CAPS:-}" ]; then
    keep=+$(echo "$BOUQUET_AMBIENT_CAPS" | sed 's/,/,+/g')
    exec setpriv --reuid="$uid" --regid="$gid" --groups="$(id -g bouquet)" --inh-caps="$keep" --ambient-caps="$keep" -- "$@"
fi
exec setpriv --reuid="$uid" --regid="$gid" --groups="$(id -g bouquet)" --inh-caps=-all -- "$@"
