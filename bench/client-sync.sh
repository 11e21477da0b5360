#!/usr/bin/env bash
# muster-client's views against a release agent (crates/client/benches/sync.rs):
#  (a) propagation: VIEWS clients, one view (one watch connection) each, in one process, see
#      a registration: p50/p99 from the agent's acknowledgement to each view's publish.
#  (b) reconnect: the same clients; the agent is killed, stays down DOWN_MS, and restarts on
#      the same port and data: the largest share of reconnects in any one second.
#  (c) disk: the agent down, a fresh client with a filled cache directory: time from the
#      start of build() to its first pick.
# Prints Markdown rows for BENCHMARKS.md. Smoke run: VIEWS=20 ROUNDS=1 DOWN_MS=300.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

VIEWS=${VIEWS:-1000}
ROUNDS=${ROUNDS:-5}
DOWN_MS=${DOWN_MS:-500}
# BENCH_PROFILE=dev for a quick smoke run without a release build of the bench.
BENCH_PROFILE=${BENCH_PROFILE:-bench}

need_python
need curl curl
build_muster

# Each view holds a connection here and one in the agent.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
(( $(ulimit -n) >= 2 * VIEWS + 200 )) || die "ulimit -n is $(ulimit -n): too low for $VIEWS views"

run() {
    local scenario=$1 port
    port=$(pick_port)
    muster_cmd "$port" --data-dir "$WORK/data-$scenario" --disable-self-preservation
    log "scenario $scenario: $VIEWS views, $ROUNDS rounds"
    (cd "$REPO_DIR" && cargo bench --quiet --profile "$BENCH_PROFILE" -p muster-client --bench sync -- \
        --scenario "$scenario" --url "http://127.0.0.1:$port" --views "$VIEWS" \
        --rounds "$ROUNDS" --down-ms "$DOWN_MS" --cache-dir "$WORK/cache" -- "${MUSTER_CMD[@]}")
}

echo
echo "=== muster-client sync: $VIEWS views, $ROUNDS rounds ==="
machine_info
echo
echo "(a) a registration reaching $VIEWS views"
run propagation
echo
echo "(b) $VIEWS views reconnecting after the agent was down ${DOWN_MS} ms"
run reconnect
echo
echo "(c) first pick from disk with the agent down"
run disk
