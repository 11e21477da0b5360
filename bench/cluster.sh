#!/usr/bin/env bash
# Cluster mode: three etcd 3.4 members and three agents (release build), all on this machine.
#  1. Registrations acknowledged through etcd: 64 connections (wrk -t64 -c64, one thread per
#     connection, threads dealt over the three agents) PUT registrations with distinct ids over
#     100 services. Reference, same run and same etcd cluster: etcd's own compare-and-set
#     transaction (create the key if absent, then put; the registration's stored value) with
#     64 connections dealt over the three members, through the gateway. A fresh cluster each
#     round; rounds interleaved; medians.
#  2. Propagation: registrations on agent a1 at a fixed rate (200/s, then 1,000/s), each timed
#     from a1's acknowledgement to the answer of a blocking query parked on agent a2 on its
#     service (bench/driver.py propagation: 500 services, one parked query each).
#  3. Heartbeats: 1,000 instances registered on a1, wrk -t2 -c64 cycling through their
#     heartbeat URLs on a1; etcd's revision before and after must be equal (no etcd write).
#     Reference: the same load on a single durable agent (no cluster), interleaved.
#  4. Restart: 100,000 instances over 10,000 services registered through a1 and a2; a3, which
#     holds their copy, is stopped (SIGTERM) and started again, timed from exec until /readyz
#     answers and a discovery read of one service returns its 10 instances.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
PROP_SECONDS=${PROP_SECONDS:-10}
PROP_RATES=${PROP_RATES:-200 1000}
HB_DURATION=${HB_DURATION:-8}
INSTANCES=${INSTANCES:-100000}
SERVICES=${SERVICES:-10000}
RESTART_ROUNDS=${RESTART_ROUNDS:-3}
PER_SERVICE=$((INSTANCES / SERVICES))
REG_SERVICES=100

need_python
need_wrk
need_etcd
need curl curl
build_muster
mkdir -p "$WORK/res"

# shellcheck disable=SC2089,SC2090 # a JSON body, passed to wrk's Lua through the environment
REGISTER_BODY='{"address":"10.0.0.1","port":8080,"tags":["a"],"meta":{"k":"v"},"zone":"z1","ttl":"10m"}'
# shellcheck disable=SC2090
export REGISTER_BODY
ETCD_KEY_B64=$(printf 'bench/' | base64)            # 8 characters: a whole base64 group
export ETCD_KEY_B64
TAGS=(A B C D E F G H I)
cat "$BENCH_DIR/lua/register.lua" "$BENCH_DIR/lua/spread.lua" >"$WORK/cluster_register.lua"
cat "$BENCH_DIR/lua/etcd_cas.lua" "$BENCH_DIR/lua/spread.lua" >"$WORK/cluster_etcd_cas.lua"

# start_cluster NAME: a fresh etcd cluster and agents a1..a3 on it; sets AGENT_PORTS,
# AGENT_PIDS, A3_CMD (a3's command line, for restarts) and everything start_etcd_cluster sets.
start_cluster() {
    local name=$1 i
    start_etcd_cluster "$name"
    AGENT_PORTS=() AGENT_PIDS=()
    for i in 1 2 3; do
        AGENT_PORTS+=("$(pick_port)")
        start_muster "$name-a$i" "${AGENT_PORTS[-1]}" --etcd "$ETCD_ENDPOINTS" --node "a$i" \
            --data-dir "$WORK/$name-a$i" --disable-self-preservation
        AGENT_PIDS+=("$MUSTER_PID")
    done
    A3_CMD=("${MUSTER_CMD[@]}")
}
# Agents first, then etcd, all members at once: a leader stopped after its followers spends
# about 5 s trying to hand over its leadership.
stop_cluster() {
    local pid
    for pid in "${AGENT_PIDS[@]}"; do stop "$pid"; done
    kill -TERM "${ETCD_PIDS[@]}" 2>/dev/null || true
    for pid in "${ETCD_PIDS[@]}"; do stop "$pid"; done
}
etcd_revision() { python3 "$DRIVER" etcd-revision --port "${ETCD_PORTS[0]}"; }
# instances PORT: how many instances the agent on PORT holds.
instances() {
    curl -fsS "http://127.0.0.1:$1/api/v1/status" | python3 -c 'import json,sys; print(json.load(sys.stdin)["instances"])'
}
acked() {
    python3 -c 'import json,sys; print(sum(json.load(open(f))["requests"]-json.load(open(f))["non2xx"] for f in sys.argv[1:]))' "$@"
}
# cpu_of PID...: CPU seconds used so far by these processes together.
cpu_of() {
    local pid total=0
    for pid in "$@"; do total=$(python3 -c "print($total + $(python3 "$DRIVER" usage "$pid" | cut -d' ' -f1))"); done
    echo "$total"
}

# --- 1. registrations through etcd, a fresh cluster each round -----------------------------
ACK_TOTAL=0
STORED=()
: >"$WORK/commit-stats.txt"
for r in $(seq "$ROUNDS"); do
    export RUN_TAG=${TAGS[$((r - 1))]}
    start_cluster "reg$r"
    log "round $r: cluster up (etcd $ETCD_ENDPOINTS, agents ${AGENT_PORTS[*]})"
    export TARGET_PORTS="${AGENT_PORTS[*]}"
    c0=$(cpu_of "${AGENT_PIDS[@]}")
    e0=$(cpu_of "${ETCD_PIDS[@]}")
    SERVICES=$REG_SERVICES run_wrk "$WORK/res/reg-muster-$r.json" "$WORK/cluster_register.lua" 64 64 "$DURATION" \
        "http://127.0.0.1:${AGENT_PORTS[0]}"
    c1=$(cpu_of "${AGENT_PIDS[@]}")
    e1=$(cpu_of "${ETCD_PIDS[@]}")
    python3 - "$WORK/res/reg-muster-$r.json" "$c0" "$c1" "$e0" "$e1" <<'EOF'
import json, sys
f, c0, c1, e0, e1 = sys.argv[1], *map(float, sys.argv[2:])
r = json.load(open(f))
n = max(1, r["requests"])
r["agents_cpu_us_per_req"] = round((c1 - c0) * 1e6 / n, 1)
r["etcd_cpu_us_per_req"] = round((e1 - e0) * 1e6 / n, 1)
json.dump(r, open(f, "w"))
EOF
    log "round $r muster register via etcd: $(cat "$WORK/res/reg-muster-$r.json")"
    ACK_TOTAL=$((ACK_TOTAL + $(acked "$WORK/res/reg-muster-$r.json")))
    # Every agent must hold every acknowledged registration (and the same number).
    sleep 1
    STORED+=("$(for p in "${AGENT_PORTS[@]}"; do instances "$p"; done | paste -sd/)")
    for p in "${AGENT_PORTS[@]}"; do
        curl -fsS "http://127.0.0.1:$p/metrics" |
            grep -E '^muster_store_commit_(batch_size|duration_seconds)_(sum|count) ' >>"$WORK/commit-stats.txt" || true
    done

    # The reference stores the value muster stored for a registration.
    ETCD_VALUE_B64=$(curl -fsS -X POST "http://127.0.0.1:${ETCD_PORTS[0]}/v3/kv/range" \
        -d "{\"key\":\"$(printf '/muster/v1/' | base64)\",\"range_end\":\"$(printf '/muster/v10' | base64)\",\"limit\":100}" |
        python3 -c 'import json,sys,base64; kvs=json.load(sys.stdin)["kvs"]; print(max((k["value"] for k in kvs if b"/inst/" in base64.b64decode(k["key"])), key=len))')
    export ETCD_VALUE_B64
    export TARGET_PORTS="${ETCD_PORTS[*]}"
    e0=$(cpu_of "${ETCD_PIDS[@]}")
    run_wrk "$WORK/res/reg-etcd-$r.json" "$WORK/cluster_etcd_cas.lua" 64 64 "$DURATION" \
        "http://127.0.0.1:${ETCD_PORTS[0]}"
    e1=$(cpu_of "${ETCD_PIDS[@]}")
    python3 - "$WORK/res/reg-etcd-$r.json" "$e0" "$e1" <<'EOF'
import json, sys
f, e0, e1 = sys.argv[1], *map(float, sys.argv[2:])
r = json.load(open(f))
r["etcd_cpu_us_per_req"] = round((e1 - e0) * 1e6 / max(1, r["requests"]), 1)
json.dump(r, open(f, "w"))
EOF
    log "round $r etcd CAS txn: $(cat "$WORK/res/reg-etcd-$r.json")"
    stop_cluster
done
VALUE_BYTES=$(python3 -c 'import base64,os; print(len(base64.b64decode(os.environ["ETCD_VALUE_B64"])))')
read -r BATCH COMMIT_MS < <(python3 -c '
import sys
v = {}
for line in open(sys.argv[1]):
    k, val = line.split()
    v[k] = v.get(k, 0) + float(val)
b = v.get("muster_store_commit_batch_size_sum", 0) / max(1, v.get("muster_store_commit_batch_size_count", 1))
c = v.get("muster_store_commit_duration_seconds_sum", 0) / max(1, v.get("muster_store_commit_duration_seconds_count", 1))
print(f"{b:.1f} {c * 1000:.2f}")' "$WORK/commit-stats.txt")

# --- 2.-4. one cluster ---------------------------------------------------------------------
start_cluster main
A1=${AGENT_PORTS[0]} A2=${AGENT_PORTS[1]} A3=${AGENT_PORTS[2]}
log "cluster up: etcd $ETCD_ENDPOINTS, agents $A1 $A2 $A3"

# --- 2. propagation ----------------------------------------------------------------------------
for r in $(seq "$ROUNDS"); do
    for rate in $PROP_RATES; do
        timeout $((PROP_SECONDS * 3 + 120)) python3 "$DRIVER" propagation --write-port "$A1" \
            --read-port "$A2" --rate "$rate" --seconds "$PROP_SECONDS" --prefix "p$rate-r$r" \
            >"$WORK/res/prop-$rate-$r.json" || die "propagation at $rate/s failed"
        log "round $r propagation at $rate/s: $(cat "$WORK/res/prop-$rate-$r.json")"
    done
done

# --- 3. heartbeats -------------------------------------------------------------------------
log "heartbeats: 1,000 instances on a1, and on a single durable agent"
python3 "$DRIVER" populate --port "$A1" --services 1 --instances 1000 --prefix hb --conns 16 \
    >"$WORK/hb-populate.json"
SPORT=$(pick_port)
start_muster single "$SPORT" --data-dir "$WORK/single" --disable-self-preservation
SINGLE_PID=$MUSTER_PID
python3 "$DRIVER" populate --port "$SPORT" --services 1 --instances 1000 --prefix hb --conns 16 \
    >"$WORK/hb-populate-single.json"
export SERVICE=hb-0
REV_DELTAS=()
for r in $(seq "$ROUNDS"); do
    rev0=$(etcd_revision)
    INSTANCES=1000 run_wrk "$WORK/res/hb-cluster-$r.json" "$BENCH_DIR/lua/heartbeat.lua" 2 64 \
        "$HB_DURATION" "http://127.0.0.1:$A1" "${AGENT_PIDS[0]}"
    rev1=$(etcd_revision)
    REV_DELTAS+=($((rev1 - rev0)))
    log "round $r cluster heartbeat: $(cat "$WORK/res/hb-cluster-$r.json"), etcd revision $rev0 -> $rev1"
    INSTANCES=1000 run_wrk "$WORK/res/hb-single-$r.json" "$BENCH_DIR/lua/heartbeat.lua" 2 64 \
        "$HB_DURATION" "http://127.0.0.1:$SPORT" "$SINGLE_PID"
    log "round $r single-node heartbeat: $(cat "$WORK/res/hb-single-$r.json")"
done
# Diagnostic: the same heartbeats sent to a2, which passes each to the owner, a1.
rev0=$(etcd_revision)
INSTANCES=1000 run_wrk "$WORK/res/hb-forwarded.json" "$BENCH_DIR/lua/heartbeat.lua" 2 64 \
    "$HB_DURATION" "http://127.0.0.1:$A2"
FWD_DELTA=$(($(etcd_revision) - rev0))
log "forwarded heartbeats: $(cat "$WORK/res/hb-forwarded.json"), etcd revision +$FWD_DELTA"
HB_HEALTHY=$(curl -fsS "http://127.0.0.1:$A3/api/v1/services/hb-0" | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["instances"]))')
stop "$SINGLE_PID"

# --- 4. restart of an agent holding 100,000 instances' copy ---------------------------------
log "registering $INSTANCES instances over $SERVICES services through a1 and a2"
timeout 300 python3 "$DRIVER" populate --port "$A1" --services $((SERVICES / 2)) \
    --instances $((INSTANCES / 2)) --prefix sa --conns 32 >"$WORK/populate-a1.json" &
P1=$!
timeout 300 python3 "$DRIVER" populate --port "$A2" --services $((SERVICES / 2)) \
    --instances $((INSTANCES / 2)) --prefix sb --conns 32 >"$WORK/populate-a2.json" &
P2=$!
wait "$P1" || die "populating through a1 failed: $(cat "$WORK/populate-a1.json")"
wait "$P2" || die "populating through a2 failed: $(cat "$WORK/populate-a2.json")"
log "a1: $(cat "$WORK/populate-a1.json")"
log "a2: $(cat "$WORK/populate-a2.json")"
deadline=$((SECONDS + 60))
until [[ "$(instances "$A3")" -ge "$INSTANCES" ]]; do
    ((SECONDS < deadline)) || die "a3 holds only $(instances "$A3") instances"
    sleep 0.5
done
HELD=$(instances "$A3")
RSS_A3=$(rss_kb "${AGENT_PIDS[2]}")
RSS_ETCD=$(rss_kb "${ETCD_PIDS[0]}")
PROBE=sa-42
for r in $(seq "$RESTART_ROUNDS"); do
    stop "${AGENT_PIDS[2]}"
    timeout 120 python3 "$DRIVER" restart --port "$A3" --service "$PROBE" --expect "$PER_SERVICE" \
        --pidfile "$WORK/a3.pid" --log "$WORK/a3-restart.log" -- "${A3_CMD[@]}" \
        >"$WORK/res/restart-$r.json" ||
        { [[ -s "$WORK/a3.pid" ]] && BENCH_PIDS+=("$(cat "$WORK/a3.pid")"); die "restart failed"; }
    AGENT_PIDS[2]=$(cat "$WORK/a3.pid")
    BENCH_PIDS+=("${AGENT_PIDS[2]}")
    log "restart $r: $(cat "$WORK/res/restart-$r.json"), a3 holds $(instances "$A3") instances"
done

stop_cluster

# --- report --------------------------------------------------------------------------------
med() { python3 "$DRIVER" median "$1" "${@:2}" --digits "${DIGITS:-0}"; }
# rounds FILE...: FIELD (default ok_rps) of each round, DIGITS (default 0) decimals.
rounds() { for f in "$@"; do python3 -c 'import json,sys; print(f"{json.load(open(sys.argv[1]))[sys.argv[2]]:.{int(sys.argv[3])}f}", end=" ")' "$f" "${FIELD:-ok_rps}" "${DIGITS:-0}"; done; }
j() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$1" "$2"; }
bad() { python3 -c 'import json,sys; print(sum(json.load(open(f))["non2xx"]+json.load(open(f))["socket_errors"] for f in sys.argv[1:]))' "$@"; }
verdict() { python3 -c "print('met' if $1 else 'MISSED')"; }
row() {
    local f=("$WORK"/res/"$1"-*.json)
    printf '%9s  %9s %8s  %-22s  %s' "$(DIGITS=0 med ok_rps "${f[@]}")" \
        "$(DIGITS=2 med p50_ms "${f[@]}")" "$(DIGITS=2 med p99_ms "${f[@]}")" \
        "$(rounds "${f[@]}")" "$(bad "${f[@]}")"
}
R_M=$(med ok_rps "$WORK"/res/reg-muster-*.json)
R_E=$(med ok_rps "$WORK"/res/reg-etcd-*.json)
R_P99=$(DIGITS=2 med p99_ms "$WORK"/res/reg-muster-*.json)
H_C=$(med ok_rps "$WORK"/res/hb-cluster-*.json)
H_S=$(med ok_rps "$WORK"/res/hb-single-*.json)
prop_rows() {
    local rate f target
    for rate in $PROP_RATES; do
        f=("$WORK"/res/prop-"$rate"-*.json)
        target=$( ((rate <= 200)) && echo 100 || echo 250)
        local p99
        p99=$(DIGITS=1 med p99_ms "${f[@]}")
        printf '%6s/s  %9s  %9s %8s %8s  %12s  %-20s %s  (target p99 < %s ms: %s)\n' "$rate" \
            "$(DIGITS=0 med achieved_per_second "${f[@]}")" "$(DIGITS=1 med p50_ms "${f[@]}")" \
            "$p99" "$(DIGITS=1 med max_ms "${f[@]}")" "$(DIGITS=1 med from_send_p99_ms "${f[@]}")" \
            "$(FIELD=p99_ms DIGITS=1 rounds "${f[@]}")" \
            "$(python3 -c 'import json,sys; print(sum(json.load(open(f))["missing"] + sum(json.load(open(f))["failed"].values()) for f in sys.argv[1:]))' "${f[@]}")" \
            "$target" "$(verdict "$p99 < $target")"
    done
}
RS=$(DIGITS=2 med serving_seconds "$WORK"/res/restart-*.json)
F=$WORK/res/hb-forwarded.json

cat <<EOF

=== cluster mode: 3 etcd 3.4 members + 3 agents on this machine ===
$(machine_info)
registrations through etcd: wrk -t64 -c64 -d${DURATION}s (connections dealt over the 3 agents), distinct ids over $REG_SERVICES services;
reference: etcd CAS txn (create_revision == 0, then put; the $VALUE_BYTES-byte value muster stored) through the gateway,
64 connections dealt over the 3 members; a fresh cluster each round, $ROUNDS rounds interleaved, medians
                              ok/s      p50 ms   p99 ms  per-round ok/s          failed
muster register (3 agents)  $(row reg-muster)
etcd CAS txn (3 members)    $(row reg-etcd)
muster / etcd               $(python3 -c "print(f'{$R_M / $R_E:.2f}')") (medians)
muster registrations/s      $R_M, p99 $R_P99 ms   (target >= 2000/s: $(verdict "$R_M >= 2000"); p99 < 250 ms: $(verdict "$R_P99 < 250"))
CPU per registration        agents $(DIGITS=1 med agents_cpu_us_per_req "$WORK"/res/reg-muster-*.json) us, etcd $(DIGITS=1 med etcd_cpu_us_per_req "$WORK"/res/reg-muster-*.json) us (etcd per CAS txn: $(DIGITS=1 med etcd_cpu_us_per_req "$WORK"/res/reg-etcd-*.json) us)
group commit                mean batch $BATCH registrations, mean etcd txn $COMMIT_MS ms (per agent)
acknowledged / held         $ACK_TOTAL acknowledged; held by a1/a2/a3 per round: ${STORED[*]}

propagation: registered on a1 (open loop, ${PROP_SECONDS}s), seen by a blocking query parked on a2 (500 services), $ROUNDS rounds, medians
      rate  achieved/s     p50 ms   p99 ms   max ms  p99 from send  per-round p99 ms     missing or failed
$(prop_rows)

heartbeats: 1,000 instances, wrk -t2 -c64 -d${HB_DURATION}s, $ROUNDS rounds interleaved, medians
                              ok/s      p50 ms   p99 ms  per-round ok/s          failed
cluster agent (owner)       $(row hb-cluster)
single durable agent        $(row hb-single)
cluster / single            $(python3 -c "print(f'{$H_C / $H_S:.2f}')")
etcd revision change        ${REV_DELTAS[*]} per round   (target 0: $(verdict "$(IFS=+; echo "${REV_DELTAS[*]}") == 0"))
sent to a non-owner (a2)    $(printf '%.0f' "$(j "$F" ok_rps)")/s, p99 $(printf '%.2f' "$(j "$F" p99_ms)") ms, $(j "$F" non2xx) failed (each passed to the owner, a1; diagnostic), etcd revision +$FWD_DELTA
healthy after the load      $HB_HEALTHY of 1000 (read on a3)

restart: a3 holding $HELD instances ($INSTANCES over $SERVICES services, registered through a1 and a2), SIGTERM then exec, $RESTART_ROUNDS rounds
registering                 a1 $(j "$WORK/populate-a1.json" per_second)/s and a2 $(j "$WORK/populate-a2.json" per_second)/s at once (32 connections each)
restart to serving          $RS s (median; readyz $(DIGITS=2 med ready_seconds "$WORK"/res/restart-*.json) s); per round $(FIELD=serving_seconds DIGITS=2 rounds "$WORK"/res/restart-*.json)s   (target <= 10 s: $(verdict "$RS <= 10"))
RSS with the copy           a3 $(python3 -c "print(f'{$RSS_A3 / 1024:.0f}')") MiB, etcd member m1 $(python3 -c "print(f'{$RSS_ETCD / 1024:.0f}')") MiB
EOF
