# shellcheck shell=bash disable=SC2034  # sourced; callers use the *_PID variables set here
# Shared helpers for the bench scripts. Source it from a script that runs with
# `set -euo pipefail`; it installs a trap that stops every server started through it.
#
# Environment:
#   MUSTER_BIN       the agent binary (default: release/muster under $CARGO_TARGET_DIR, or target/)
#   BENCH_NO_BUILD=1 do not run `cargo build --release -p muster` (run-all.sh builds once)
#   BENCH_KEEP=1     keep the scratch directory (logs, data dirs) after the run

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$BENCH_DIR/.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$REPO_DIR/target}
[[ "$TARGET_DIR" == /* ]] || TARGET_DIR=$REPO_DIR/$TARGET_DIR
MUSTER_BIN=${MUSTER_BIN:-$TARGET_DIR/release/muster}
DRIVER="$BENCH_DIR/driver.py"
WORK=$(mktemp -d /tmp/muster-bench.XXXXXX)
BENCH_PIDS=()

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

bench_cleanup() {
    local pid i
    for ((i = ${#BENCH_PIDS[@]} - 1; i >= 0; i--)); do
        pid=${BENCH_PIDS[$i]}
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${BENCH_PIDS[@]}"; do
        for _ in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
    done
    BENCH_PIDS=()
    if [[ -z "${BENCH_KEEP:-}" ]]; then
        rm -rf "$WORK"
    else
        log "kept $WORK"
    fi
}
trap bench_cleanup EXIT
trap 'exit 130' INT TERM

# --- installing what is missing -----------------------------------------------------------

_apt_updated=
apt_install() {
    export DEBIAN_FRONTEND=noninteractive
    # Keep package scripts from starting system services (nginx, etcd) on default ports.
    local guard=
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        guard=1
    fi
    if [[ -z "$_apt_updated" ]]; then
        apt-get update -qq >/dev/null
        _apt_updated=1
    fi
    apt-get install -y -qq "$@" >/dev/null
    [[ -n "$guard" ]] && rm -f /usr/sbin/policy-rc.d
    return 0
}

# need BINARY PACKAGE...: install PACKAGE... when BINARY is not on the PATH.
need() {
    local bin=$1
    shift
    command -v "$bin" >/dev/null 2>&1 && return 0
    log "installing $* (for $bin)"
    apt_install "$@"
    command -v "$bin" >/dev/null 2>&1 || die "$bin still missing after installing $*"
}

need_python() { need python3 python3; }
need_wrk() { need wrk wrk; }
need_nginx() {
    command -v nginx >/dev/null 2>&1 && return 0
    log "installing nginx"
    apt_install nginx-light || apt_install nginx
    command -v nginx >/dev/null 2>&1 || die "nginx still missing"
}
need_etcd() { need etcd etcd-server; }

# Builds the agent (unless BENCH_NO_BUILD=1) and runs it from a private copy, so a rebuild of
# target/ by someone else during the run cannot swap the binary between measurements.
build_muster() {
    if [[ -z "${BENCH_NO_BUILD:-}" ]]; then
        log "cargo build --release -p muster"
        (cd "$REPO_DIR" && cargo build --release -p muster --quiet)
    fi
    [[ -x "$MUSTER_BIN" ]] || die "no agent binary at $MUSTER_BIN"
    cp "$MUSTER_BIN" "$WORK/muster"
    MUSTER_BIN="$WORK/muster"
    log "agent binary sha256 $(sha256sum "$MUSTER_BIN" | cut -c1-16)"
}

# --- processes ------------------------------------------------------------------------------

# A free TCP port on 127.0.0.1 (bound once by the kernel, then released).
pick_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# wait_http URL [SECONDS]: until URL answers 2xx.
wait_http() {
    local url=$1 secs=${2:-20}
    local deadline=$((SECONDS + secs))
    until curl -fsS -o /dev/null --max-time 1 "$url" 2>/dev/null; do
        ((SECONDS < deadline)) || die "$url did not answer within ${secs}s"
        sleep 0.05
    done
}

# spawn NAME CMD...: start CMD in the background, logs in $WORK/NAME.log; sets SPAWNED_PID.
spawn() {
    local name=$1
    shift
    "$@" >"$WORK/$name.log" 2>&1 &
    SPAWNED_PID=$!
    BENCH_PIDS+=("$SPAWNED_PID")
}

# stop PID: TERM, wait up to 10 s, then KILL; drops it from the cleanup list.
stop() {
    local pid=$1 p keep=()
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    for p in "${BENCH_PIDS[@]}"; do [[ "$p" == "$pid" ]] || keep+=("$p"); done
    BENCH_PIDS=("${keep[@]+"${keep[@]}"}")
}

# muster_cmd PORT ARGS...: sets MUSTER_CMD, the agent on 127.0.0.1:PORT with ARGS. Agents
# that also serve DNS get a picked port for it, so runs never collide on the default 8600.
_muster_has_dns=
muster_cmd() {
    local port=$1
    shift
    if [[ -z "$_muster_has_dns" ]]; then
        if "$MUSTER_BIN" agent --help 2>/dev/null | grep -q -- '--dns-addr'; then
            _muster_has_dns=yes
        else
            _muster_has_dns=no
        fi
    fi
    MUSTER_CMD=("$MUSTER_BIN" agent --http-addr "127.0.0.1:$port" --log warn)
    [[ "$_muster_has_dns" == yes ]] && MUSTER_CMD+=(--dns-addr "127.0.0.1:$(pick_port)")
    MUSTER_CMD+=("$@")
}

# start_muster NAME PORT ARGS...: the agent on 127.0.0.1:PORT; sets MUSTER_PID.
start_muster() {
    local name=$1 port=$2
    shift 2
    muster_cmd "$port" "$@"
    spawn "$name" "${MUSTER_CMD[@]}"
    MUSTER_PID=$SPAWNED_PID
    wait_http "http://127.0.0.1:$port/readyz" 30
}

# nginx_conf DIR WORKERS PORT SERVER_BODY [HTTP_EXTRA]: writes DIR/nginx.conf, an nginx with
# WORKERS workers, keep-alive, no access log, listening on 127.0.0.1:PORT with SERVER_BODY
# inside its server block and HTTP_EXTRA in its http block.
nginx_conf() {
    local dir=$1 workers=$2 port=$3 body=$4 extra=${5:-}
    mkdir -p "$dir/tmp"
    cat >"$dir/nginx.conf" <<EOF
user root;
worker_processes $workers;
daemon off;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 16384; }
http {
    access_log off;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_timeout 65;
    keepalive_requests 1000000;
    open_file_cache max=100 inactive=60s;
    client_body_temp_path $dir/tmp/body;
    proxy_temp_path $dir/tmp/proxy;
    fastcgi_temp_path $dir/tmp/fastcgi;
    uwsgi_temp_path $dir/tmp/uwsgi;
    scgi_temp_path $dir/tmp/scgi;
    default_type application/octet-stream;
    $extra
    server {
        listen 127.0.0.1:$port;
        $body
    }
}
EOF
}

# start_nginx PORT ROOT: static files from ROOT (JSON and XML with their types), two workers;
# sets NGINX_PID.
start_nginx() {
    local port=$1 root=$2 dir="$WORK/nginx"
    nginx_conf "$dir" 2 "$port" "root $root;" "types { application/json json; application/xml xml; }"
    spawn nginx nginx -c "$dir/nginx.conf" -e "$dir/error.log"
    NGINX_PID=$SPAWNED_PID
}

# etcd_cmd CLIENT_PORT PEER_PORT [DATA_DIR]: sets ETCD_CMD, a one-member etcd with its data
# in DATA_DIR (default $WORK/etcd-data).
etcd_cmd() {
    local cport=$1 pport=$2 data=${3:-$WORK/etcd-data}
    ETCD_CMD=(etcd --name bench --data-dir "$data"
        --listen-client-urls "http://127.0.0.1:$cport"
        --advertise-client-urls "http://127.0.0.1:$cport"
        --listen-peer-urls "http://127.0.0.1:$pport"
        --initial-advertise-peer-urls "http://127.0.0.1:$pport"
        --initial-cluster "bench=http://127.0.0.1:$pport"
        --logger zap --log-level warn)
}

# start_etcd CLIENT_PORT PEER_PORT [DATA_DIR]: sets ETCD_PID.
start_etcd() {
    etcd_cmd "$@"
    spawn etcd "${ETCD_CMD[@]}"
    ETCD_PID=$SPAWNED_PID
    wait_http "http://127.0.0.1:$1/health" 30
}

# start_etcd_cluster NAME: three etcd members (NAME-m1..m3) on picked loopback ports, data in
# $WORK/NAME-m*, with periodic auto-compaction and a backend quota as a registry's etcd runs;
# sets ETCD_ENDPOINTS (comma-separated client URLs), ETCD_PORTS (client ports) and ETCD_PIDS.
start_etcd_cluster() {
    local name=$1 i peers=() cluster
    ETCD_PORTS=() ETCD_PIDS=()
    for i in 1 2 3; do
        ETCD_PORTS+=("$(pick_port)")
        peers+=("$(pick_port)")
    done
    cluster="m1=http://127.0.0.1:${peers[0]},m2=http://127.0.0.1:${peers[1]},m3=http://127.0.0.1:${peers[2]}"
    for i in 0 1 2; do
        spawn "$name-m$((i + 1))" etcd --name "m$((i + 1))" --data-dir "$WORK/$name-m$((i + 1))" \
            --listen-client-urls "http://127.0.0.1:${ETCD_PORTS[$i]}" \
            --advertise-client-urls "http://127.0.0.1:${ETCD_PORTS[$i]}" \
            --listen-peer-urls "http://127.0.0.1:${peers[$i]}" \
            --initial-advertise-peer-urls "http://127.0.0.1:${peers[$i]}" \
            --initial-cluster "$cluster" --initial-cluster-state new --initial-cluster-token "$name" \
            --auto-compaction-mode periodic --auto-compaction-retention 5m \
            --quota-backend-bytes $((4 * 1024 * 1024 * 1024)) --logger zap --log-level warn
        ETCD_PIDS+=("$SPAWNED_PID")
    done
    for i in 0 1 2; do wait_http "http://127.0.0.1:${ETCD_PORTS[$i]}/health" 30; done
    ETCD_ENDPOINTS=$(printf 'http://127.0.0.1:%s,' "${ETCD_PORTS[@]}")
    ETCD_ENDPOINTS=${ETCD_ENDPOINTS%,}
}

# --- one server core: pinning and per-round ratios --------------------------------------------
# The scripts that compare muster with a reference on one server core (see bench/discovery.sh)
# run the servers on $SERVER_CPU and the load generator and their own helpers on $WRK_CPU.

# start_nginx_pinned NAME PORT ROOT: nginx with ONE worker (start_nginx runs two), started pinned to
# $SERVER_CPU, serving ROOT (JSON and XML with their types); sets NGINX_PID. Once it answers,
# check_workers "$NGINX_PID" 1 checks the worker count.
start_nginx_pinned() {
    local name=$1 port=$2 root=$3 dir=$WORK/$1
    nginx_conf "$dir" 1 "$port" "root $root;" "types { application/json json; application/xml xml; }"
    spawn "$name" taskset -c "$SERVER_CPU" nginx -c "$dir/nginx.conf" -e "$dir/error.log"
    NGINX_PID=$SPAWNED_PID
}

# check_workers PID N: PID (nginx's master) has N children.
check_workers() {
    local n
    n=$(pgrep -c -P "$1" || true)
    [[ "$n" == "$2" ]] || die "pid $1 runs $n workers, not $2"
}

# check_pinned PID: every thread of PID and of its children may run on $SERVER_CPU only.
check_pinned() {
    local pid=$1 p f cpus
    # shellcheck disable=SC2046 # one word per child pid
    for p in "$pid" $(pgrep -P "$pid" || true); do
        for f in /proc/"$p"/task/*/status; do
            cpus=$(awk '/^Cpus_allowed_list:/ {print $2}' "$f" 2>/dev/null) || continue
            [[ -z "$cpus" || "$cpus" == "$SERVER_CPU" ]] || die "pid $p (${f#/proc/}) may run on CPUs $cpus, not $SERVER_CPU only"
        done
    done
}

# round_ratio DIR A B [cpu]: the median over rounds 1..$ROUNDS of A's requests/s / B's in the
# same round, from DIR/A-R.json and DIR/B-R.json; with cpu, of B's server CPU per request / A's
# (above 1 means A spends less per request).
round_ratio() {
    python3 - "$1" "$2" "$3" "$ROUNDS" "${4:-rps}" <<'PY'
import json, statistics, sys
d, a, b, n, what = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
R = lambda t, i: json.load(open(f"{d}/{t}-{i}.json"))
if what == "cpu":
    r = [R(b, i)["cpu_us_per_req"] / R(a, i)["cpu_us_per_req"] for i in range(1, n + 1)]
else:
    r = [R(a, i)["ok_rps"] / R(b, i)["ok_rps"] for i in range(1, n + 1)]
print("%.3f" % statistics.median(r))
PY
}

# ratio_rounds DIR A B LABEL_A LABEL_B: the per-round figures behind round_ratio, one line each:
# the two ratios, then each side's requests/s and server CPU us per request.
ratio_rounds() {
    python3 - "$@" "$ROUNDS" <<'PY'
import json, sys
d, a, b, la, lb, n = sys.argv[1:7]
n = int(n)
R = lambda t, i: json.load(open(f"{d}/{t}-{i}.json"))
row = lambda label, vals: print(f"    {label:<24}" + "".join(f"{v:>8}" for v in vals))
row("round", range(1, n + 1))
row("ratio req/s", ["%.3f" % (R(a, i)["ok_rps"] / R(b, i)["ok_rps"]) for i in range(1, n + 1)])
row("ratio CPU/request", ["%.3f" % (R(b, i)["cpu_us_per_req"] / R(a, i)["cpu_us_per_req"]) for i in range(1, n + 1)])
for t, label in ((a, la), (b, lb)):
    row(f"{label} req/s", ["%.0f" % R(t, i)["ok_rps"] for i in range(1, n + 1)])
    row(f"{label} CPU us/req", ["%.1f" % R(t, i)["cpu_us_per_req"] for i in range(1, n + 1)])
PY
}

# busy FILE...: the median share of its CPU the server kept busy in these runs, in percent
# (requests/s x CPU per request): near 100 means the server, not the load generator, set the pace.
busy() {
    python3 -c '
import json, statistics, sys
print("%.0f%%" % statistics.median(json.load(open(f))["ok_rps"] * json.load(open(f))["cpu_us_per_req"] / 1e4 for f in sys.argv[1:]))' "$@"
}

# Resident set size of PID in KiB.
rss_kb() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }

# --- wrk ------------------------------------------------------------------------------------

# run_wrk OUT.json LUA THREADS CONNS SECONDS URL [PID]: one wrk run; its lua script is LUA
# followed by lua/report.lua, whose done() prints one JSON line (rps, ok_rps, latency
# percentiles). With PID, the CPU time and bytes written of PID and its descendants during
# the run are added (cpu_us_per_req, write_bytes_per_req). With WRK_CPU set, wrk runs pinned
# to that CPU list (taskset -c).
run_wrk() {
    local out=$1 lua=$2 threads=$3 conns=$4 secs=$5 url=$6 pid=${7:-} script u0='' u1='' pin=()
    script="$WORK/$(basename "$lua" .lua)-run.lua"
    cat "$lua" "$BENCH_DIR/lua/report.lua" >"$script"
    [[ -z "${WRK_CPU:-}" ]] || pin=(taskset -c "$WRK_CPU")
    [[ -z "$pid" ]] || u0=$(python3 "$DRIVER" usage "$pid")
    timeout $((secs + 30)) ${pin[@]+"${pin[@]}"} wrk -t"$threads" -c"$conns" -d"${secs}s" --latency -s "$script" "$url" \
        >"$out.txt" 2>&1 || die "wrk failed: $(tail -5 "$out.txt")"
    [[ -z "$pid" ]] || u1=$(python3 "$DRIVER" usage "$pid")
    grep '^WRKJSON ' "$out.txt" | tail -1 | cut -d' ' -f2- >"$out"
    [[ -s "$out" ]] || die "wrk printed no result: $(tail -5 "$out.txt")"
    # shellcheck disable=SC2086 # u0/u1 are "cpu_seconds write_bytes"
    [[ -z "$pid" ]] || python3 "$DRIVER" annotate "$out" $u0 $u1
}

# Machine description, one line each.
machine_info() {
    echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), nproc $(nproc)"
    echo "memory: $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo)"
    echo "kernel: $(uname -r)"
}
