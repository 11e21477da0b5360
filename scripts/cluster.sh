#!/usr/bin/env bash
# A local muster cluster to try cluster mode: a three-member etcd cluster and three agents
# sharing one registry through it. Run `scripts/cluster.sh --help` for the details.
set -euo pipefail

REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

usage() {
    cat <<'EOF'
Usage: scripts/cluster.sh [OPTIONS] [-- AGENT-FLAGS...]

Starts a three-member etcd cluster (Debian's etcd 3.4: apt-get install etcd-server
etcd-client, or bash tests/setup.sh) and three muster agents, a1, a2 and a3, that share one
registry through it; waits until every agent answers /readyz; prints how to reach them; and
runs until Ctrl-C (or SIGTERM), then stops everything it started. A process that dies on
its way (say, an agent you killed to see what the others do) is reported; the rest keep
running.

Ports (127.0.0.1), unless --free-ports:
  etcd m1, m2, m3   clients 23791, 23792, 23793; peers 23801, 23802, 23803
  agent a1, a2, a3  HTTP 8511, 8512, 8513; DNS (UDP and TCP) 8611, 8612, 8613

etcd runs with periodic auto-compaction (5m of history kept) and a 2 GiB backend quota, as
an etcd holding a registry should: without compaction its database only grows.

Options:
  --dir DIR       keep data and logs in DIR (etcd in DIR/m1..m3, agents in DIR/a1..a3, logs
                  DIR/*.log), kept afterwards: running again with the same DIR restarts the
                  same cluster with its catalog. Default: a temporary directory, deleted at exit
  --free-ports    use ports the kernel picks instead of the fixed ones
  --lease-ttl D   the agents' etcd lease TTL (--etcd-lease-ttl; default 30s)
  --bin PATH      the muster binary (default: the release build,
                  ${CARGO_TARGET_DIR:-target}/release/muster, built first if missing)
  --build         run `cargo build --release -p muster` first even if the binary exists
  -h, --help      this text

Anything after `--` is passed to every agent (for example `-- --log debug`).
EOF
}

DIR=
FREE_PORTS=
LEASE_TTL=
BIN=
BUILD=
AGENT_EXTRA=()
while (($#)); do
    case $1 in
    --dir) DIR=${2:?--dir needs a directory}; shift 2 ;;
    --free-ports) FREE_PORTS=1; shift ;;
    --lease-ttl) LEASE_TTL=${2:?--lease-ttl needs a duration such as 10s}; shift 2 ;;
    --bin) BIN=${2:?--bin needs a path}; shift 2 ;;
    --build) BUILD=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; AGENT_EXTRA=("$@"); break ;;
    *) echo "cluster.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

say() { printf 'cluster.sh: %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }

command -v etcd >/dev/null 2>&1 ||
    die "etcd is not installed: apt-get install etcd-server etcd-client (or bash tests/setup.sh)"
command -v curl >/dev/null 2>&1 || die "curl is not installed: apt-get install curl"

# --- the binary ------------------------------------------------------------------------------

TARGET_DIR=${CARGO_TARGET_DIR:-$REPO_DIR/target}
[[ "$TARGET_DIR" == /* ]] || TARGET_DIR=$REPO_DIR/$TARGET_DIR
if [[ -z "$BIN" ]]; then
    BIN=$TARGET_DIR/release/muster
    if [[ -n "$BUILD" || ! -x "$BIN" ]]; then
        say "building the agent: cargo build --release -p muster"
        (cd "$REPO_DIR" && cargo build --release -p muster)
    fi
fi
[[ -x "$BIN" ]] || die "no muster binary at $BIN"

# --- directories and ports -------------------------------------------------------------------

if [[ -n "$DIR" ]]; then
    mkdir -p "$DIR"
    DIR=$(cd "$DIR" && pwd)
    KEEP_DIR=1
else
    DIR=$(mktemp -d /tmp/muster-cluster.XXXXXX)
    KEEP_DIR=
fi

# A port the kernel considers free on 127.0.0.1 (bound once, then released).
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])' ||
        die "--free-ports needs python3"
}
# Whether something accepts TCP connections on 127.0.0.1:PORT.
port_taken() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

if [[ -n "$FREE_PORTS" ]]; then
    ETCD_CLIENT=() ETCD_PEER=() HTTP=() DNS=()
    for i in 0 1 2; do
        ETCD_CLIENT+=("$(free_port)")
        ETCD_PEER+=("$(free_port)")
        HTTP+=("$(free_port)")
        DNS+=("$(free_port)")
    done
else
    ETCD_CLIENT=(23791 23792 23793)
    ETCD_PEER=(23801 23802 23803)
    HTTP=(8511 8512 8513)
    DNS=(8611 8612 8613)
    for p in "${ETCD_CLIENT[@]}" "${ETCD_PEER[@]}" "${HTTP[@]}" "${DNS[@]}"; do
        port_taken "$p" &&
            die "port $p on 127.0.0.1 is in use (another cluster.sh?); stop it or use --free-ports"
    done
fi

ENDPOINTS=$(printf 'http://127.0.0.1:%s,' "${ETCD_CLIENT[@]}")
ENDPOINTS=${ENDPOINTS%,}
INITIAL_CLUSTER=$(printf 'm1=http://127.0.0.1:%s,m2=http://127.0.0.1:%s,m3=http://127.0.0.1:%s' \
    "${ETCD_PEER[@]}")

# --- processes -------------------------------------------------------------------------------

NAMES=()
PIDS=()

# stop SECONDS INDEX...: SIGTERM to the processes at INDEX..., then waits up to SECONDS for
# them and kills what is left.
stop() {
    local grace=$1 i pid
    shift
    for i in "$@"; do kill -TERM "${PIDS[$i]}" 2>/dev/null || true; done
    local deadline=$((SECONDS + grace))
    for i in "$@"; do
        pid=${PIDS[$i]}
        while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
}

stop_all() {
    local i agents=() members=()
    for i in "${!NAMES[@]}"; do
        if [[ "${NAMES[$i]}" == a* ]]; then agents+=("$i"); else members+=("$i"); fi
    done
    # Agents first, while etcd is there for them; then etcd. A member that was leader tries
    # to hand leadership over to members that are stopping too, and gives up only after
    # about 5 s; etcd made every commit durable before answering it, so killing it after
    # 3 s loses nothing.
    ((${#agents[@]} == 0)) || stop 10 "${agents[@]}"
    ((${#members[@]} == 0)) || stop 3 "${members[@]}"
    if [[ -z "$KEEP_DIR" ]]; then
        rm -rf "$DIR"
    elif ((${#NAMES[@]})); then
        say "data and logs kept in $DIR"
    fi
}

trap stop_all EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# start NAME LOG CMD...: runs CMD in the background with its output in LOG.
start() {
    local name=$1 log=$2
    shift 2
    "$@" >"$log" 2>&1 &
    NAMES+=("$name")
    PIDS+=("$!")
}

# wait_ready NAME URL: until URL answers 2xx; gives up when NAME's process died or after 60 s.
wait_ready() {
    local name=$1 url=$2 i deadline=$((SECONDS + 60))
    for i in "${!NAMES[@]}"; do [[ "${NAMES[$i]}" == "$name" ]] && break; done
    until curl -fsS -o /dev/null --max-time 1 "$url" 2>/dev/null; do
        kill -0 "${PIDS[$i]}" 2>/dev/null ||
            die "$name exited before it was ready; the end of $DIR/$name.log:
$(tail -n 15 "$DIR/$name.log")"
        ((SECONDS < deadline)) || die "$name did not answer $url within 60 s; see $DIR/$name.log"
        sleep 0.1
    done
}

for i in 0 1 2; do
    m=m$((i + 1))
    start "$m" "$DIR/$m.log" etcd --name "$m" --data-dir "$DIR/$m" \
        --listen-client-urls "http://127.0.0.1:${ETCD_CLIENT[$i]}" \
        --advertise-client-urls "http://127.0.0.1:${ETCD_CLIENT[$i]}" \
        --listen-peer-urls "http://127.0.0.1:${ETCD_PEER[$i]}" \
        --initial-advertise-peer-urls "http://127.0.0.1:${ETCD_PEER[$i]}" \
        --initial-cluster "$INITIAL_CLUSTER" --initial-cluster-state new \
        --initial-cluster-token muster-cluster-sh \
        --auto-compaction-mode periodic --auto-compaction-retention 5m \
        --quota-backend-bytes $((2 * 1024 * 1024 * 1024)) \
        --logger zap --log-outputs stderr --log-level warn
done
for i in 0 1 2; do
    wait_ready "m$((i + 1))" "http://127.0.0.1:${ETCD_CLIENT[$i]}/health"
done
say "etcd is up: $ENDPOINTS"

LEASE_FLAGS=()
[[ -z "$LEASE_TTL" ]] || LEASE_FLAGS=(--etcd-lease-ttl "$LEASE_TTL")
for i in 0 1 2; do
    a=a$((i + 1))
    start "$a" "$DIR/$a.log" "$BIN" agent --etcd "$ENDPOINTS" --node "$a" \
        --http-addr "127.0.0.1:${HTTP[$i]}" --dns-addr "127.0.0.1:${DNS[$i]}" \
        --data-dir "$DIR/$a" "${LEASE_FLAGS[@]+"${LEASE_FLAGS[@]}"}" \
        "${AGENT_EXTRA[@]+"${AGENT_EXTRA[@]}"}"
done
for i in 0 1 2; do
    wait_ready "a$((i + 1))" "http://127.0.0.1:${HTTP[$i]}/readyz"
done

cat <<EOF

muster cluster ready: three agents share one registry through a three-member etcd cluster.

  agent  HTTP              DNS               log
  a1     127.0.0.1:${HTTP[0]}    127.0.0.1:${DNS[0]}    $DIR/a1.log
  a2     127.0.0.1:${HTTP[1]}    127.0.0.1:${DNS[1]}    $DIR/a2.log
  a3     127.0.0.1:${HTTP[2]}    127.0.0.1:${DNS[2]}    $DIR/a3.log
  etcd   $ENDPOINTS   (logs $DIR/m1.log ...)

Register on one agent, find it on another:

  curl -s -X PUT 127.0.0.1:${HTTP[0]}/api/v1/services/web/instances/web-1 -d '{"address":"10.0.0.5","port":8080,"ttl":"1m"}'
  curl -s 127.0.0.1:${HTTP[1]}/api/v1/services/web
  dig @127.0.0.1 -p ${DNS[2]} web.service.muster
  MUSTER_HTTP_ADDR=127.0.0.1:${HTTP[2]} $BIN members
  curl -s 127.0.0.1:${HTTP[0]}/api/v1/status
  ETCDCTL_API=3 etcdctl --endpoints $ENDPOINTS get --prefix /muster/v1/ --keys-only

Stop one agent (kill <pid>: a1 ${PIDS[3]}, a2 ${PIDS[4]}, a3 ${PIDS[5]}) or etcd member (m1 ${PIDS[0]},
m2 ${PIDS[1]}, m3 ${PIDS[2]}) to see what the others do. Ctrl-C stops everything.
EOF

# Reports each process that exits; returns when all have.
reported=()
while :; do
    alive=0
    for i in "${!PIDS[@]}"; do
        if kill -0 "${PIDS[$i]}" 2>/dev/null; then
            alive=$((alive + 1))
        elif [[ -z "${reported[$i]:-}" ]]; then
            reported[i]=1
            status=0
            wait "${PIDS[$i]}" 2>/dev/null || status=$?
            say "${NAMES[$i]} (pid ${PIDS[$i]}) exited with status $status; see $DIR/${NAMES[$i]}.log"
        fi
    done
    ((alive > 0)) || { say "every process has exited"; exit 1; }
    sleep 1
done
