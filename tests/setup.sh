#!/usr/bin/env bash
# Installs what the test suite drives besides the Rust toolchain, once per machine:
#  - protoc and the well-known protobuf types (Debian's protobuf-compiler and libprotobuf-dev),
#    needed to BUILD the workspace at all: etcd-client's build script compiles etcd's API;
#  - etcd and etcdctl (Debian's etcd-server and etcd-client), which the cluster-mode tests start
#    as real clusters on ports of their own;
#  - dig (Debian's dnsutils), for the DNS test that drives it;
#  - prometheus (Debian's prometheus), which the HTTP service-discovery test starts on a port of
#    its own, pointed at an agent;
#  - py-consul from PyPI and the npm consul package (pinned by its package-lock.json), the
#    unmodified Consul clients of the compatibility tests;
#  - py-eureka-client from PyPI and eureka-js-client from npm (pinned by
#    tests/compat/npm-eureka/package-lock.json), the unmodified Eureka clients of the
#    Eureka compatibility tests;
#  - Chromium and ChromeDriver (Debian's chromium and chromium-driver) and playwright-core,
#    and Firefox ESR (Debian's firefox-esr, which speaks WebDriver BiDi itself) and
#    puppeteer-core (both npm packages pinned by tests/ui/package-lock.json), which drive the
#    dashboard's browser tests.
# Safe to run again: it installs only what is missing. The tests fail, naming this script,
# when something it installs is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PY_CONSUL_VERSION=1.8.0
PY_EUREKA_CLIENT_VERSION=0.13.3

# Debian packages, by the command each provides; protoc's include files are checked by path.
missing=()
command -v protoc >/dev/null 2>&1 || missing+=(protobuf-compiler)
[ -f /usr/include/google/protobuf/descriptor.proto ] || missing+=(libprotobuf-dev)
command -v etcd >/dev/null 2>&1 || missing+=(etcd-server)
command -v etcdctl >/dev/null 2>&1 || missing+=(etcd-client)
command -v dig >/dev/null 2>&1 || missing+=(dnsutils)
command -v prometheus >/dev/null 2>&1 || missing+=(prometheus)
[ -x /usr/bin/chromium ] || missing+=(chromium)
[ -x /usr/bin/chromedriver ] || missing+=(chromium-driver)
[ -x /usr/bin/firefox-esr ] || missing+=(firefox-esr)
if [ "${#missing[@]}" -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
    # etcd-server and prometheus come with system services that the install would start: the
    # tests start their own servers on ports they pick, so none is started. Package scripts
    # ask /usr/sbin/policy-rc.d before starting a service, and 101 means "not allowed"; one
    # that exists already is the machine's own and is left alone. Recommends (prometheus's
    # node exporter, another service) are not installed: the tests need the commands only.
    policy=/usr/sbin/policy-rc.d
    if [ ! -e "$policy" ]; then
        as_root sh -c "printf '#!/bin/sh\nexit 101\n' > $policy && chmod 755 $policy"
        trap 'as_root rm -f "$policy"' EXIT
    fi
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    echo "setup: node and npm are needed for the npm consul and dashboard tests: install Node.js 18 or later" >&2
    exit 1
fi

if ! python3 -c "import importlib.metadata as m, sys; sys.exit(m.version('py-consul') != '$PY_CONSUL_VERSION')" 2>/dev/null; then
    echo "setup: installing py-consul $PY_CONSUL_VERSION"
    PIP_ROOT_USER_ACTION=ignore python3 -m pip install -q --disable-pip-version-check "py-consul==$PY_CONSUL_VERSION"
fi

if ! python3 -c "import importlib.metadata as m, sys; sys.exit(m.version('py-eureka-client') != '$PY_EUREKA_CLIENT_VERSION')" 2>/dev/null; then
    echo "setup: installing py-eureka-client $PY_EUREKA_CLIENT_VERSION"
    PIP_ROOT_USER_ACTION=ignore python3 -m pip install -q --disable-pip-version-check "py-eureka-client==$PY_EUREKA_CLIENT_VERSION"
fi

if [ ! -f tests/compat/npm-eureka/node_modules/eureka-js-client/package.json ] ||
    [ tests/compat/npm-eureka/package-lock.json -nt tests/compat/npm-eureka/node_modules/.package-lock.json ]; then
    echo "setup: installing eureka-js-client"
    (cd tests/compat/npm-eureka && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
fi

if [ ! -f tests/compat/npm-consul/node_modules/consul/package.json ] ||
    [ tests/compat/npm-consul/package-lock.json -nt tests/compat/npm-consul/node_modules/.package-lock.json ]; then
    echo "setup: installing the npm consul package"
    (cd tests/compat/npm-consul && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
fi
if [ ! -f tests/ui/node_modules/playwright-core/package.json ] ||
    [ ! -f tests/ui/node_modules/puppeteer-core/package.json ] ||
    [ tests/ui/package-lock.json -nt tests/ui/node_modules/.package-lock.json ]; then
    echo "setup: installing playwright-core and puppeteer-core for the dashboard tests"
    # The browsers are Debian's: nothing may download one of its own (puppeteer-core does not,
    # and this says so to any package that would).
    (cd tests/ui && PUPPETEER_SKIP_DOWNLOAD=1 npm ci --no-audit --no-fund --loglevel=error >/dev/null)
fi
echo "setup: done"
