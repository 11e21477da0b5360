#!/usr/bin/env bash
# Installs what the test suite drives besides the Rust toolchain, once per machine:
#  - dig (Debian's dnsutils), for the DNS test that drives it;
#  - py-consul from PyPI and the npm consul package (pinned by its package-lock.json), the
#    unmodified Consul clients of the compatibility tests.
# Safe to run again: it installs only what is missing. The tests fail, naming this script,
# when something it installs is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PY_CONSUL_VERSION=1.8.0

if ! command -v dig >/dev/null 2>&1; then
    echo "setup: installing dnsutils (dig)"
    if [ "$(id -u)" -eq 0 ]; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq && apt-get install -y -qq dnsutils >/dev/null
    else
        sudo apt-get update -qq && sudo apt-get install -y -qq dnsutils >/dev/null
    fi
fi

if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    echo "setup: node and npm are needed for the npm consul test: install Node.js 18 or later" >&2
    exit 1
fi

if ! python3 -c "import importlib.metadata as m, sys; sys.exit(m.version('py-consul') != '$PY_CONSUL_VERSION')" 2>/dev/null; then
    echo "setup: installing py-consul $PY_CONSUL_VERSION"
    PIP_ROOT_USER_ACTION=ignore python3 -m pip install -q --disable-pip-version-check "py-consul==$PY_CONSUL_VERSION"
fi

if [ ! -f tests/compat/npm-consul/node_modules/consul/package.json ] ||
    [ tests/compat/npm-consul/package-lock.json -nt tests/compat/npm-consul/node_modules/.package-lock.json ]; then
    echo "setup: installing the npm consul package"
    (cd tests/compat/npm-consul && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
fi
echo "setup: done"
