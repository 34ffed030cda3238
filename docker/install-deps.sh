#!/bin/sh
# Install Bouquet's one pin set (requirements.lock) into the active virtualenv, for one
# torch flavour. Used by both Dockerfiles in their shared dependency layer.
#
#   install-deps.sh [--print] FLAVOUR LOCKFILE
#
#   gpu  the lock as is: PyPI's torch (CUDA build) with its nvidia-* / cuda-* / triton wheels.
#   cpu  torch and torchvision from $TORCH_CPU_INDEX (the PyTorch CPU wheel index), same
#        versions with the +cpu local label, and without the nvidia-*, cuda-* and triton
#        lines, which only the CUDA build needs (nvidia-ml-py stays: it is NVML's Python
#        binding, not a CUDA wheel).
#
# $PIP_INSTALL_OPTS is passed to pip (the offline build: --no-index --find-links URL).
# --print writes the requirements that would be installed and installs nothing.
set -eu

print_only=
if [ "${1:-}" = --print ]; then print_only=1; shift; fi
[ $# -eq 2 ] || { echo "usage: $0 [--print] gpu|cpu LOCKFILE" >&2; exit 2; }
flavour=$1
lock=$2

extra_index=
case "$flavour" in
gpu)
    requirements=$(grep -v '^[[:space:]]*#' "$lock")
    ;;
cpu)
    if [ -z "${TORCH_CPU_INDEX:-}" ]; then
        echo "install-deps: the cpu flavour needs TORCH_CPU_INDEX (the PyTorch CPU wheel index)" >&2
        exit 2
    fi
    extra_index=$TORCH_CPU_INDEX
    requirements=$(grep -v '^[[:space:]]*#' "$lock" \
        | grep -Eiv '^(nvidia-|cuda-|triton==)' ; grep -Ei '^nvidia-ml-py==' "$lock")
    requirements=$(printf '%s\n' "$requirements" \
        | sed -E 's/^(torch|torchvision)==([^+[:space:]]+)[[:space:]]*$/\1==\2+cpu/')
    ;;
*)
    echo "install-deps: unknown flavour '$flavour' (allowed: gpu, cpu)" >&2
    exit 2
    ;;
esac

if [ -n "$print_only" ]; then
    printf '%s\n' "$requirements"
    exit 0
fi

file=$(mktemp)
printf '%s\n' "$requirements" > "$file"
# The lock is a complete freeze, so --no-deps: pip installs exactly these lines and resolves nothing.
# shellcheck disable=SC2086  # PIP_INSTALL_OPTS is a list of options
pip install --no-deps ${extra_index:+--extra-index-url "$extra_index"} ${PIP_INSTALL_OPTS:-} -r "$file"
rm -f "$file"
echo "install-deps: installed the $flavour flavour ($(printf '%s\n' "$requirements" | grep -c .) pins)"
