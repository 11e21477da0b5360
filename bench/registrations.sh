#!/usr/bin/env bash
# Durable writes and heartbeats.
#  1. Registrations: 64 connections (wrk -t2 -c64) PUT registrations with distinct instance
#     ids (spread over 100 services) into a durable agent (redb, fsync per commit) vs etcd 3.4
#     puts of distinct keys through its gateway, same body. Each round starts both servers
#     empty; rounds interleaved; medians of successful answers/s.
#  2. Registry carried over: three more runs into one agent without restarting it, to show
#     how the rate depends on what the registry already holds (diagnostic, no target).
#  3. Heartbeats: 1,000 registered instances, wrk cycling through their heartbeat URLs with 64
#     connections, vs etcd lease keep-alives cycling through 1,000 leases (gateway).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
GROWTH_DURATION=${GROWTH_DURATION:-8}
HB_DURATION=${HB_DURATION:-8}
SERVICES=100

need_python
need_wrk
need_etcd
need curl curl
build_muster
mkdir -p "$WORK/res"

# shellcheck disable=SC2089,SC2090 # a JSON body, passed to wrk's Lua through the environment
REGISTER_BODY='{"address":"10.0.0.1","port":8080,"tags":["a"],"meta":{"k":"v"},"zone":"z1","ttl":"10m"}'
# shellcheck disable=SC2090
export REGISTER_BODY SERVICES
ETCD_KEY_B64=$(printf 'bench/' | base64)            # 8 characters: a whole base64 group
ETCD_VALUE_B64=$(printf '%s' "$REGISTER_BODY" | base64 -w0)
export ETCD_KEY_B64 ETCD_VALUE_B64
TAGS=(A B C D E F G H I)

instances() {
    curl -fsS "http://127.0.0.1:$1/api/v1/status" | python3 -c 'import json,sys; print(json.load(sys.stdin)["instances"])'
}
acked() {
    python3 -c 'import json,sys; print(sum(json.load(open(f))["requests"]-json.load(open(f))["non2xx"] for f in sys.argv[1:]))' "$@"
}

# --- 1. registrations, fresh servers each round -------------------------------------------
ACK_TOTAL=0
STORED_TOTAL=0
: >"$WORK/commit-stats.txt"
for r in $(seq "$ROUNDS"); do
    export RUN_TAG=${TAGS[$((r - 1))]}
    MPORT=$(pick_port)
    start_muster "muster-$r" "$MPORT" --data-dir "$WORK/muster-$r" --disable-self-preservation
    run_wrk "$WORK/res/reg-muster-$r.json" "$BENCH_DIR/lua/register.lua" 2 64 "$DURATION" \
        "http://127.0.0.1:$MPORT" "$MUSTER_PID"
    log "round $r muster register: $(cat "$WORK/res/reg-muster-$r.json")"
    # Every acknowledged registration must be there (wrk stops with up to 64 in flight,
    # which the agent may complete unseen).
    ACK_TOTAL=$((ACK_TOTAL + $(acked "$WORK/res/reg-muster-$r.json")))
    STORED_TOTAL=$((STORED_TOTAL + $(instances "$MPORT")))
    curl -fsS "http://127.0.0.1:$MPORT/metrics" |
        grep -E '^muster_store_commit_(batch_size|duration_seconds)_(sum|count) ' >>"$WORK/commit-stats.txt" || true
    stop "$MUSTER_PID"

    EPORT=$(pick_port)
    start_etcd "$EPORT" "$(pick_port)" "$WORK/etcd-$r"
    run_wrk "$WORK/res/reg-etcd-$r.json" "$BENCH_DIR/lua/etcd_put.lua" 2 64 "$DURATION" \
        "http://127.0.0.1:$EPORT" "$ETCD_PID"
    log "round $r etcd put: $(cat "$WORK/res/reg-etcd-$r.json")"
    stop "$ETCD_PID"
done
read -r BATCH COMMIT_MS < <(python3 -c '
import sys
v = {}
for line in open(sys.argv[1]):
    k, val = line.split()
    v[k] = v.get(k, 0) + float(val)
b = v.get("muster_store_commit_batch_size_sum", 0) / max(1, v.get("muster_store_commit_batch_size_count", 1))
c = v.get("muster_store_commit_duration_seconds_sum", 0) / max(1, v.get("muster_store_commit_duration_seconds_count", 1))
print(f"{b:.1f} {c * 1000:.2f}")' "$WORK/commit-stats.txt")

# --- 2. registry carried over ----------------------------------------------------------------
GPORT=$(pick_port)
start_muster muster-growth "$GPORT" --data-dir "$WORK/muster-growth" --disable-self-preservation
GROWTH=()
for g in 1 2 3; do
    export RUN_TAG=G$g
    before=$(instances "$GPORT")
    run_wrk "$WORK/res/growth-$g.json" "$BENCH_DIR/lua/register.lua" 2 64 "$GROWTH_DURATION" \
        "http://127.0.0.1:$GPORT" "$MUSTER_PID"
    GROWTH+=("$(python3 - "$WORK/res/growth-$g.json" "$before" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"{int(r['ok_rps'])}/s starting from {int(sys.argv[2]):,} instances, {r['cpu_us_per_req']} us agent CPU per registration")
EOF
)")
    log "growth run $g: ${GROWTH[-1]}"
done
stop "$MUSTER_PID"

# --- 3. heartbeats -------------------------------------------------------------------------
log "heartbeats: fresh agent with 1,000 instances, 1,000 etcd leases"
HPORT=$(pick_port)
start_muster muster-hb "$HPORT" --data-dir "$WORK/muster-hb" --disable-self-preservation
HB_PID=$MUSTER_PID
python3 "$DRIVER" populate --port "$HPORT" --services 1 --instances 1000 --prefix hb \
    --conns 16 >"$WORK/hb-populate.json"
EPORT=$(pick_port)
start_etcd "$EPORT" "$(pick_port)" "$WORK/etcd-hb"
python3 "$DRIVER" etcd-leases --port "$EPORT" --count 1000 --out "$WORK/leases.txt" >/dev/null
export SERVICE=hb-0 INSTANCES=1000 LEASES_FILE="$WORK/leases.txt"
for r in $(seq "$ROUNDS"); do
    run_wrk "$WORK/res/hb-muster-$r.json" "$BENCH_DIR/lua/heartbeat.lua" 2 64 "$HB_DURATION" \
        "http://127.0.0.1:$HPORT" "$HB_PID"
    log "round $r muster heartbeat: $(cat "$WORK/res/hb-muster-$r.json")"
    run_wrk "$WORK/res/hb-etcd-$r.json" "$BENCH_DIR/lua/etcd_keepalive.lua" 2 64 "$HB_DURATION" \
        "http://127.0.0.1:$EPORT" "$ETCD_PID"
    log "round $r etcd keepalive: $(cat "$WORK/res/hb-etcd-$r.json")"
done
HB_HEALTHY=$(curl -fsS "http://127.0.0.1:$HPORT/api/v1/services/hb-0" | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["instances"]))')

# --- report --------------------------------------------------------------------------------
med() { python3 "$DRIVER" median "$1" "${@:2}" --digits "${DIGITS:-0}"; }
rounds() { for f in "$@"; do python3 -c 'import json,sys; print(int(json.load(open(sys.argv[1]))["ok_rps"]), end=" ")' "$f"; done; }
bad() { python3 -c 'import json,sys; print(sum(json.load(open(f))["non2xx"]+json.load(open(f))["socket_errors"] for f in sys.argv[1:]))' "$@"; }
verdict() { python3 -c "print('met' if $1 else 'MISSED')"; }
# Median over rounds of muster's figure / the reference's figure in the same round.
round_ratio() {
    python3 - "$WORK/res" "$1" "$2" "$ROUNDS" <<'EOF'
import json, statistics, sys
d, a, b, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
r = [json.load(open(f"{d}/{a}-{i}.json"))["ok_rps"] / json.load(open(f"{d}/{b}-{i}.json"))["ok_rps"] for i in range(1, n + 1)]
print(f"{statistics.median(r):.2f}")
EOF
}
row() {
    local f=("$WORK"/res/"$1"-*.json)
    printf '%9s  %9s %8s  %10s  %13s  %-18s  %s' "$(DIGITS=0 med ok_rps "${f[@]}")" \
        "$(DIGITS=2 med p50_ms "${f[@]}")" "$(DIGITS=2 med p99_ms "${f[@]}")" "$(DIGITS=1 med cpu_us_per_req "${f[@]}")" \
        "$(DIGITS=0 med write_bytes_per_req "${f[@]}")" "$(rounds "${f[@]}")" "$(bad "${f[@]}")"
}
R_M=$(med ok_rps "$WORK"/res/reg-muster-*.json)
R_E=$(med ok_rps "$WORK"/res/reg-etcd-*.json)
R_RATIO=$(python3 -c "print(f'{$R_M / $R_E:.2f}')")
H_M=$(med ok_rps "$WORK"/res/hb-muster-*.json)
H_E=$(med ok_rps "$WORK"/res/hb-etcd-*.json)

cat <<EOF

=== registrations (durable) and heartbeats ===
$(machine_info)
registrations: wrk -t2 -c64 -d${DURATION}s, distinct ids over $SERVICES services, both servers empty at each round's start, $ROUNDS rounds interleaved, medians
                            ok/s      p50 ms   p99 ms  CPU us/req  written B/req  per-round ok/s      failed
muster register (redb)  $(row reg-muster)
etcd 3.4 put (gateway)  $(row reg-etcd)
muster / etcd           $R_RATIO (medians), $(round_ratio reg-muster reg-etcd) (median of per-round ratios)   (target >= 3: $(verdict "$R_RATIO >= 3"))
acknowledged / stored   $ACK_TOTAL acknowledged, $STORED_TOTAL instances in the agents
muster group commit     mean batch $BATCH registrations, mean commit $COMMIT_MS ms
registry carried over   one agent, three ${GROWTH_DURATION}s runs in a row:
                          ${GROWTH[0]}
                          ${GROWTH[1]}
                          ${GROWTH[2]}

heartbeats: 1,000 instances, wrk -t2 -c64 -d${HB_DURATION}s, $ROUNDS rounds interleaved, medians
                            ok/s      p50 ms   p99 ms  CPU us/req  written B/req  per-round ok/s      failed
muster heartbeat        $(row hb-muster)
etcd lease keepalive    $(row hb-etcd)
muster / etcd           $(python3 -c "print(f'{$H_M / $H_E:.2f}')") (medians), $(round_ratio hb-muster hb-etcd) (median of per-round ratios)
muster heartbeats/s     $H_M   (target >= 50000: $(verdict "$H_M >= 50000"))
healthy after the load  $HB_HEALTHY of 1000
EOF
