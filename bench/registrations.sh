#!/usr/bin/env bash
# Durable writes and heartbeats.
#  1. Registrations: 64 connections (wrk -t1 -c64) PUT registrations with distinct instance
#     ids (spread over 100 services) into a durable agent (redb, fsync per commit) vs etcd 3.4
#     puts of distinct keys through its gateway, same body. Each server starts empty and is
#     loaded ALONE (started, loaded, stopped): muster first in odd rounds, etcd first in even
#     ones.
#  2. Registry carried over: three more runs into one agent without restarting it, to show
#     how the rate depends on what the registry already holds (diagnostic, no target).
#  3. Heartbeats: 1,000 registered instances, wrk cycling through their heartbeat URLs with 64
#     connections, vs etcd lease keep-alives cycling through 1,000 leases (gateway). Each round
#     starts a fresh agent and etcd (the agent first in odd rounds, last in even ones: a
#     process draws a speed at start that it keeps, see bench/discovery.sh), warms each up
#     (WARMUP seconds, not counted), then loads each alone, muster first in odd rounds and
#     etcd first in even ones.
# What is compared is one server core, as in bench/discovery.sh: every server runs on CPU 0
# (SERVER_CPU) only, the agent with --http-threads 1 (taskset -apc on all its threads), etcd
# started under taskset so Go sizes GOMAXPROCS to that one CPU; wrk runs pinned to CPU 1
# (WRK_CPU), and this script's own helpers (curl, the Python driver) run on CPU 1 too.
# Server CPU per request: the server's user+system CPU time over a run, from /proc/PID/stat,
# divided by the requests answered in it (written B/req likewise, from /proc/PID/io).
# "its CPU" is requests/s x CPU per request: the share of the server CPU the server kept
# busy; well below 100% means something else shared that core (or the load set the pace).
# Figures are medians over rounds; the ratios, requests/s muster / etcd and CPU per request
# etcd / muster (above 1 means muster spends less), are medians of the per-round ratios.
# Defaults (ROUNDS=8, DURATION=5, GROWTH_DURATION=8, HB_DURATION=4, WARMUP=1) take about 4.5
# minutes.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ROUNDS=${ROUNDS:-8}
DURATION=${DURATION:-5}
GROWTH_DURATION=${GROWTH_DURATION:-8}
HB_DURATION=${HB_DURATION:-4}
WARMUP=${WARMUP:-1}
CONNS=64
SERVICES=100
SERVER_CPU=${SERVER_CPU:-0}
export WRK_CPU=${WRK_CPU:-1}
# One letter per round in the etcd keys (bench/lua/etcd_put.lua).
TAGS=({A..Z})
((ROUNDS <= ${#TAGS[@]})) || die "at most ${#TAGS[@]} rounds"

(($(nproc) >= 2)) || die "needs two CPUs (the servers on one, wrk on the other)"
need_python
need_wrk
need_etcd
need curl curl
need taskset util-linux
build_muster
MACHINE=$(machine_info)
# This script's own helpers (curl, python) run beside wrk, not on the server CPU; the servers
# it starts are pinned to the server CPU below.
taskset -pc "$WRK_CPU" $$ >/dev/null
mkdir -p "$WORK/res"

# shellcheck disable=SC2089,SC2090 # a JSON body, passed to wrk's Lua through the environment
REGISTER_BODY='{"address":"10.0.0.1","port":8080,"tags":["a"],"meta":{"k":"v"},"zone":"z1","ttl":"10m"}'
# shellcheck disable=SC2090
export REGISTER_BODY SERVICES
ETCD_KEY_B64=$(printf 'bench/' | base64)            # 8 characters: a whole base64 group
ETCD_VALUE_B64=$(printf '%s' "$REGISTER_BODY" | base64 -w0)
export ETCD_KEY_B64 ETCD_VALUE_B64

instances() {
    curl -fsS "http://127.0.0.1:$1/api/v1/status" | python3 -c 'import json,sys; print(json.load(sys.stdin)["instances"])'
}
acked() {
    python3 -c 'import json,sys; print(sum(json.load(open(f))["requests"]-json.load(open(f))["non2xx"] for f in sys.argv[1:]))' "$@"
}

# start_agent NAME: a durable agent in $WORK/NAME (one HTTP thread, every thread pinned to the
# server CPU); sets MPORT and MUSTER_PID.
start_agent() {
    MPORT=$(pick_port)
    start_muster "$1" "$MPORT" --data-dir "$WORK/$1" --disable-self-preservation --http-threads 1
    taskset -apc "$SERVER_CPU" "$MUSTER_PID" >/dev/null
    check_pinned "$MUSTER_PID"
}

# start_etcd1 NAME: a one-member etcd with its data in $WORK/NAME, started pinned to the server
# CPU; sets EPORT and ETCD_PID.
start_etcd1() {
    EPORT=$(pick_port)
    etcd_cmd "$EPORT" "$(pick_port)" "$WORK/$1"
    spawn "$1" taskset -c "$SERVER_CPU" "${ETCD_CMD[@]}"
    ETCD_PID=$SPAWNED_PID
    wait_http "http://127.0.0.1:$EPORT/health" 30
    check_pinned "$ETCD_PID"
}

# --- 1. registrations, fresh servers each round -------------------------------------------
ACK_TOTAL=0
STORED_TOTAL=0
: >"$WORK/commit-stats.txt"
# reg_muster / reg_etcd: round $r's run into a fresh, empty server, stopped after it.
reg_muster() {
    start_agent "muster-$r"
    run_wrk "$WORK/res/reg-muster-$r.json" "$BENCH_DIR/lua/register.lua" 1 "$CONNS" "$DURATION" \
        "http://127.0.0.1:$MPORT" "$MUSTER_PID"
    log "round $r muster register: $(cat "$WORK/res/reg-muster-$r.json")"
    check_pinned "$MUSTER_PID"
    # Every acknowledged registration must be there (wrk stops with up to 64 in flight,
    # which the agent may complete unseen).
    ACK_TOTAL=$((ACK_TOTAL + $(acked "$WORK/res/reg-muster-$r.json")))
    STORED_TOTAL=$((STORED_TOTAL + $(instances "$MPORT")))
    curl -fsS "http://127.0.0.1:$MPORT/metrics" |
        grep -E '^muster_store_commit_(batch_size|duration_seconds)_(sum|count) ' >>"$WORK/commit-stats.txt" || true
    stop "$MUSTER_PID"
}
reg_etcd() {
    start_etcd1 "etcd-$r"
    run_wrk "$WORK/res/reg-etcd-$r.json" "$BENCH_DIR/lua/etcd_put.lua" 1 "$CONNS" "$DURATION" \
        "http://127.0.0.1:$EPORT" "$ETCD_PID"
    log "round $r etcd put: $(cat "$WORK/res/reg-etcd-$r.json")"
    check_pinned "$ETCD_PID"
    stop "$ETCD_PID"
}
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
for r in $(seq "$ROUNDS"); do
    export RUN_TAG=${TAGS[$((r - 1))]}
    if ((r % 2)); then
        reg_muster
        reg_etcd
    else
        reg_etcd
        reg_muster
    fi
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
start_agent muster-growth
GPORT=$MPORT
GROWTH=()
for g in 1 2 3; do
    export RUN_TAG=G$g
    before=$(instances "$GPORT")
    run_wrk "$WORK/res/growth-$g.json" "$BENCH_DIR/lua/register.lua" 1 "$CONNS" "$GROWTH_DURATION" \
        "http://127.0.0.1:$GPORT" "$MUSTER_PID"
    GROWTH+=("$(python3 - "$WORK/res/growth-$g.json" "$before" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"{int(r['ok_rps'])}/s starting from {int(sys.argv[2]):,} instances, {r['cpu_us_per_req']} us agent CPU per registration")
EOF
)")
    log "growth run $g: ${GROWTH[-1]}"
done
check_pinned "$MUSTER_PID"
stop "$MUSTER_PID"

# --- 3. heartbeats, fresh servers each round ---------------------------------------------------
export SERVICE=hb-0 INSTANCES=1000 LEASES_FILE="$WORK/leases.txt"
# hb_agent / hb_etcd: round $r's agent with 1,000 instances, etcd with 1,000 leases.
hb_agent() {
    start_agent "muster-hb-$r"
    HPORT=$MPORT HB_PID=$MUSTER_PID
    python3 "$DRIVER" populate --port "$HPORT" --services 1 --instances 1000 --prefix hb \
        --conns 16 >"$WORK/hb-populate.json"
}
hb_etcd() {
    start_etcd1 "etcd-hb-$r"
    python3 "$DRIVER" etcd-leases --port "$EPORT" --count 1000 --out "$LEASES_FILE" >/dev/null
}
# hb_run muster|etcd SECONDS OUT [PID]
hb_run() {
    case $1 in
        muster) run_wrk "$3" "$BENCH_DIR/lua/heartbeat.lua" 1 "$CONNS" "$2" "http://127.0.0.1:$HPORT" ${4:+"$4"} ;;
        etcd) run_wrk "$3" "$BENCH_DIR/lua/etcd_keepalive.lua" 1 "$CONNS" "$2" "http://127.0.0.1:$EPORT" ${4:+"$4"} ;;
    esac
}
log "heartbeats: each round a fresh agent with 1,000 instances and etcd with 1,000 leases"
HB_HEALTHY=
for r in $(seq "$ROUNDS"); do
    if ((r % 2)); then
        hb_agent
        hb_etcd
        order=(muster etcd)
    else
        hb_etcd
        hb_agent
        order=(etcd muster)
    fi
    hb_run muster "$WARMUP" "$WORK/warmup.json"
    hb_run etcd "$WARMUP" "$WORK/warmup.json"
    for t in "${order[@]}"; do
        pid=$HB_PID
        [[ $t == muster ]] || pid=$ETCD_PID
        hb_run "$t" "$HB_DURATION" "$WORK/res/hb-$t-$r.json" "$pid"
        log "round $r $t heartbeat: $(cat "$WORK/res/hb-$t-$r.json")"
    done
    check_pinned "$HB_PID"
    check_pinned "$ETCD_PID"
    healthy=$(curl -fsS "http://127.0.0.1:$HPORT/api/v1/services/hb-0" | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["instances"]))')
    [[ -n "$HB_HEALTHY" && "$HB_HEALTHY" -le "$healthy" ]] || HB_HEALTHY=$healthy
    stop "$HB_PID"
    stop "$ETCD_PID"
done
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)

# --- report --------------------------------------------------------------------------------
med() { python3 "$DRIVER" median "$1" "${@:2}" --digits "${DIGITS:-0}"; }
bad() { python3 -c 'import json,sys; print(sum(json.load(open(f))["non2xx"]+json.load(open(f))["socket_errors"] for f in sys.argv[1:]))' "$@"; }
verdict() { python3 -c "print('met' if $1 else 'MISSED')"; }
row() {
    local f=("$WORK"/res/"$1"-*.json)
    printf '%9s  %9s %8s  %10s  %7s  %13s  %s' "$(DIGITS=0 med ok_rps "${f[@]}")" \
        "$(DIGITS=2 med p50_ms "${f[@]}")" "$(DIGITS=2 med p99_ms "${f[@]}")" "$(DIGITS=1 med cpu_us_per_req "${f[@]}")" \
        "$(busy "${f[@]}")" "$(DIGITS=0 med write_bytes_per_req "${f[@]}")" "$(bad "${f[@]}")"
}
R_RATIO=$(round_ratio "$WORK/res" reg-muster reg-etcd)
R_CPU=$(round_ratio "$WORK/res" reg-muster reg-etcd cpu)
H_RATIO=$(round_ratio "$WORK/res" hb-muster hb-etcd)
H_CPU=$(round_ratio "$WORK/res" hb-muster hb-etcd cpu)
H_M=$(med ok_rps "$WORK"/res/hb-muster-*.json)

cat <<EOF

=== registrations (durable) and heartbeats ===
$MACHINE
etcd $(etcd --version | awk 'NR==1 {print $3}'), wrk $({ wrk -v 2>&1 || true; } | head -1 | cut -d' ' -f2)
method: one server core: muster (--http-threads 1, taskset -apc) and etcd (GOMAXPROCS 1) on CPU $SERVER_CPU only, each
        loaded ALONE by wrk -t1 -c$CONNS pinned to CPU $WRK_CPU; $ROUNDS rounds, which server runs first alternating;
        figures are medians over rounds, ratios medians of per-round ratios (CPU per request as etcd / muster)
load average (1/5/15 min) at the start $LOAD_START, at the end $LOAD_END
registrations: -d${DURATION}s, distinct ids over $SERVICES services, each server fresh and empty for its run
                            ok/s      p50 ms   p99 ms  CPU us/req  its CPU  written B/req  failed
muster register (redb)  $(row reg-muster)
etcd 3.4 put (gateway)  $(row reg-etcd)
muster / etcd           ok/s $R_RATIO, CPU/request (etcd / muster) $R_CPU   (target ok/s >= 3: $(verdict "$R_RATIO >= 3"))
$(ratio_rounds "$WORK/res" reg-muster reg-etcd muster etcd)
acknowledged / stored   $ACK_TOTAL acknowledged, $STORED_TOTAL instances in the agents
muster group commit     mean batch $BATCH registrations, mean commit $COMMIT_MS ms
registry carried over   one agent, three ${GROWTH_DURATION}s runs in a row:
                          ${GROWTH[0]}
                          ${GROWTH[1]}
                          ${GROWTH[2]}

heartbeats: 1,000 instances / 1,000 leases, -d${HB_DURATION}s, a fresh agent and etcd each round (start order alternating), ${WARMUP}s warm-up each
                            ok/s      p50 ms   p99 ms  CPU us/req  its CPU  written B/req  failed
muster heartbeat        $(row hb-muster)
etcd lease keepalive    $(row hb-etcd)
muster / etcd           ok/s $H_RATIO, CPU/request (etcd / muster) $H_CPU
$(ratio_rounds "$WORK/res" hb-muster hb-etcd muster etcd)
muster heartbeats/s     $H_M   (target >= 50000: $(verdict "$H_M >= 50000"))
healthy after the load  $HB_HEALTHY of 1000 (the fewest of any round)
EOF
