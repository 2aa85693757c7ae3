#!/usr/bin/env bash
# Set up a fresh Debian/Ubuntu machine for sockops: system packages, then .venv with sockops installed.
#   scripts/bootstrap.sh          what `sockops deploy --host local` needs
#   scripts/bootstrap.sh --test   also what the test suite needs (sshd, sudo, systemd-analyze, netns tools, CPython build deps,
#                                 prometheus)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mode="${1:-run}"

run_pkgs=(python3 python3-venv python3-dev gcc iproute2)
test_pkgs=(
    openssh-server openssh-client sudo systemd dpkg-dev xz-utils curl ca-certificates prometheus prometheus-alertmanager
    build-essential pkg-config libssl-dev zlib1g-dev libffi-dev libsqlite3-dev libbz2-dev liblzma-dev
    libreadline-dev libncurses-dev uuid-dev libgdbm-dev tk-dev
)
pkgs=("${run_pkgs[@]}")
[ "$mode" = "--test" ] && pkgs+=("${test_pkgs[@]}")

missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "bootstrap: these Debian packages are missing: ${missing[*]}" >&2
        echo "bootstrap: run this script as root (sudo bash scripts/bootstrap.sh $*) or install them first." >&2
        exit 1
    fi
    echo "bootstrap: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # On failure everything apt said is shown; on success all but debconf's "delaying package configuration,
    # since apt-utils is not installed", which is noise to a newcomer.
    apt_err="$(mktemp)"
    if ! apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>"$apt_err"; then
        cat "$apt_err" >&2
        rm -f "$apt_err"
        echo "bootstrap: installing ${missing[*]} failed (see apt's message above)" >&2
        exit 1
    fi
    grep -v '^debconf: delaying package configuration' "$apt_err" >&2 || true
    rm -f "$apt_err"
fi
# The Debian prometheus packages start their own servers (:9090, :9093); the tests run theirs on loopback.
if [ "$mode" = "--test" ] && command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
    systemctl disable --now prometheus prometheus-node-exporter prometheus-alertmanager >/dev/null 2>&1 || true
fi

python="${SOCKOPS_BOOTSTRAP_PYTHON:-python3}"
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 9))'; then
    echo "bootstrap: $python is older than 3.9; sockops' operator side needs 3.9+ (set SOCKOPS_BOOTSTRAP_PYTHON)." >&2
    exit 1
fi
if [ ! -x "$here/.venv/bin/python" ]; then
    "$python" -m venv "$here/.venv"
fi
extras="."
[ "$mode" = "--test" ] && extras=".[test,bench]"
"$here/.venv/bin/python" -m pip install -q --upgrade pip
"$here/.venv/bin/python" -m pip install -q -e "$here/$extras"
echo "bootstrap: ready ($("$here/.venv/bin/python" --version), sockops in $here/.venv)"
