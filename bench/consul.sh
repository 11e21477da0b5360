#!/usr/bin/env bash
# The Consul API: GET /v1/health/service/web?passing for one service of 10 instances (each
# with a passing TTL check) in a --dev agent.
# 1. Throughput: wrk -t2 -c64 -d10s --latency against the same bytes served as a static file
#    by nginx (Content-Type: application/json), three rounds interleaved, medians reported.
# 2. Wake-up: 10,000 blocking queries (?passing&index=N&wait=60s) parked by bench/driver.py,
#    then one change (an 11th instance registered through /v1/agent/service/register with a
#    passing TTL check). For each query: time from sending the change request to the kernel's
#    receive timestamp (SO_TIMESTAMPNS) of its answer. Three rounds: the queries are parked
#    again at their new index between rounds. Reference in the same run: one read's round
#    trip while the queries are parked. Agent RSS before parking and with all parked.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ROUNDS=${ROUNDS:-3}
# Seconds the driver leaves the answers unread after the change (they are timed by their
# kernel receive timestamps either way). Reading them as they arrive (DEFER_READS=0) makes the
# Python driver compete with the agent for the two cores during the wake-up.
DEFER_READS=${DEFER_READS:-1}
DURATION=${DURATION:-10}
BLOCKING=${BLOCKING:-10000}
SERVICE=web
INSTANCES=10

need_python
need_wrk
need_nginx
need curl curl
build_muster

# 10,000 client sockets here and as many in the agent.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
(($(ulimit -n) >= BLOCKING + 1000)) || die "ulimit -n is $(ulimit -n): too low for $BLOCKING blocking queries"

MPORT=$(pick_port)
NPORT=$(pick_port)

log "starting muster (--dev), registering $INSTANCES instances of $SERVICE with TTL checks"
# The agent caps open connections (http.max_connections, 4,096 by default); every parked
# watcher holds one, so the cap is raised above what the script opens.
printf '[http]\nmax_connections = %d\n' $((BLOCKING + ${SSE:-0} + 100)) >"$WORK/agent.toml"
start_muster muster "$MPORT" --dev --disable-self-preservation --config "$WORK/agent.toml"
MBASE="http://127.0.0.1:$MPORT"
for i in $(seq 0 $((INSTANCES - 1))); do
    curl -fsS -o /dev/null -X PUT "$MBASE/v1/agent/service/register" \
        -H 'Content-Type: application/json' \
        -d "{\"ID\":\"$SERVICE-$i\",\"Name\":\"$SERVICE\",\"Address\":\"10.0.0.$((i + 1))\",\"Port\":8080,\"Tags\":[\"a\"],\"Meta\":{\"k\":\"v\"},\"Check\":{\"TTL\":\"1h\"}}"
    curl -fsS -o /dev/null -X PUT "$MBASE/v1/agent/check/pass/service:$SERVICE-$i"
done
MPATH="/v1/health/service/$SERVICE?passing"
MURL="$MBASE$MPATH"
mkdir -p "$WORK/www"
curl -fsS -o "$WORK/www/$SERVICE.json" "$MURL"
BODY_BYTES=$(stat -c %s "$WORK/www/$SERVICE.json")
count_passing() {
    python3 -c '
import json, sys
v = json.load(open(sys.argv[1]))
print(sum(all(c["Status"] == "passing" for c in e["Checks"]) for e in v))' "$1"
}
[[ $(count_passing "$WORK/www/$SERVICE.json") == "$INSTANCES" ]] \
    || die "$MPATH did not return $INSTANCES passing instances"

start_nginx "$NPORT" "$WORK/www"
NURL="http://127.0.0.1:$NPORT/$SERVICE.json"
wait_http "$NURL" 10
cmp -s <(curl -fsS "$NURL") "$WORK/www/$SERVICE.json" || die "nginx does not serve the same bytes"
[[ $(curl -fsS -o /dev/null -w '%{content_type}' "$NURL") == application/json ]] \
    || die "nginx does not serve application/json"
cmp -s <(curl -fsS "$MURL") "$WORK/www/$SERVICE.json" || die "muster's answer changed"

# --- 1. throughput ---------------------------------------------------------------------------

mkdir -p "$WORK/res"
RSS0=$(rss_kb "$MUSTER_PID")
for r in $(seq "$ROUNDS"); do
    for t in muster nginx; do
        case $t in
            muster) url=$MURL pid=$MUSTER_PID ;;
            nginx) url=$NURL pid=$NGINX_PID ;;
        esac
        run_wrk "$WORK/res/$t-$r.json" "$BENCH_DIR/lua/get.lua" 2 64 "$DURATION" "$url" "$pid"
        log "round $r $t: $(cat "$WORK/res/$t-$r.json")"
    done
done
RSS1=$(rss_kb "$MUSTER_PID")
# Latency without saturating the two cores: one wrk thread, 4 connections (diagnostic).
run_wrk "$WORK/light-muster.json" "$BENCH_DIR/lua/get.lua" 1 4 5 "$MURL"
run_wrk "$WORK/light-nginx.json" "$BENCH_DIR/lua/get.lua" 1 4 5 "$NURL"
stop "$NGINX_PID"

# --- 2. wake-up --------------------------------------------------------------------------------

# Let the allocator settle before the "before" RSS is taken.
curl -fsS -o /dev/null "$MURL"
sleep 1
log "parking $BLOCKING blocking queries on $MPATH"
CHANGE_BODY="{\"ID\":\"$SERVICE-change-{round}\",\"Name\":\"$SERVICE\",\"Address\":\"10.0.1.{round}\",\"Port\":8080,\"Tags\":[\"a\"],\"Meta\":{\"k\":\"v\"},\"Check\":{\"TTL\":\"1h\",\"Status\":\"passing\"}}"
timeout 170 python3 "$DRIVER" watchers --port "$MPORT" --pid "$MUSTER_PID" --service "$SERVICE" \
    --blocking "$BLOCKING" --sse 0 --rounds "$ROUNDS" \
    --defer-reads "$DEFER_READS" \
    --path "$MPATH" --index-header X-Consul-Index --wait 60s \
    --change-path /v1/agent/service/register --change-body "$CHANGE_BODY" \
    >"$WORK/watchers.json"
curl -fsS -o "$WORK/after.json" "$MURL"
AFTER=$(count_passing "$WORK/after.json")
[[ $AFTER == $((INSTANCES + ROUNDS)) ]] || die "after $ROUNDS changes, $AFTER passing instances (expected $((INSTANCES + ROUNDS)))"

# --- results -----------------------------------------------------------------------------------

med() { python3 "$DRIVER" median "$1" "${@:2}" --digits "${DIGITS:-0}"; }
M_RPS=$(med ok_rps "$WORK"/res/muster-*.json)
N_RPS=$(med ok_rps "$WORK"/res/nginx-*.json)
DIGITS=3
M_P50=$(med p50_ms "$WORK"/res/muster-*.json)
N_P50=$(med p50_ms "$WORK"/res/nginx-*.json)
M_P99=$(med p99_ms "$WORK"/res/muster-*.json)
N_P99=$(med p99_ms "$WORK"/res/nginx-*.json)
DIGITS=1
M_CPU=$(med cpu_us_per_req "$WORK"/res/muster-*.json)
N_CPU=$(med cpu_us_per_req "$WORK"/res/nginx-*.json)
BAD=$(python3 -c 'import json,sys; print(sum(json.load(open(f))["non2xx"]+json.load(open(f))["socket_errors"] for f in sys.argv[1:]))' "$WORK"/res/*.json)
reqs() { python3 -c 'import json,sys; print(sum(json.load(open(f))["requests"] for f in sys.argv[1:]))' "$@"; }
R_NGINX=$(python3 -c "print(f'{$M_RPS / $N_RPS:.2f}')")
verdict() { python3 -c "print('met' if $1 else 'MISSED')"; }
ROUND_RATIO=$(python3 -c '
import json, statistics, sys
d, n = sys.argv[1], int(sys.argv[2])
rps = lambda t, i: json.load(open(f"{d}/{t}-{i}.json"))["ok_rps"]
print("%.2f" % statistics.median(rps("muster", i) / rps("nginx", i) for i in range(1, n + 1)))' "$WORK/res" "$ROUNDS")
per_round() { for f in "$@"; do python3 -c 'import json,sys; print(int(json.load(open(sys.argv[1]))["ok_rps"]), end=" ")' "$f"; done; }
per_round_p99() { for f in "$@"; do python3 -c 'import json,sys; print("%.2f" % json.load(open(sys.argv[1]))["p99_ms"], end=" ")' "$f"; done; }
light() { python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print("%d req/s, p50 %.3f ms, p99 %.3f ms" % (r["ok_rps"], r["p50_ms"], r["p99_ms"]))' "$1"; }

cat <<EOF

=== consul: GET $MPATH, $INSTANCES instances with passing TTL checks, body $BODY_BYTES bytes ===
$(machine_info)
throughput: wrk -t2 -c64 -d${DURATION}s --latency, $ROUNDS rounds interleaved (muster, nginx), medians
                      req/s     p50 ms    p99 ms   server CPU us/req
muster              $(printf '%9s  %9s  %8s  %8s' "$M_RPS" "$M_P50" "$M_P99" "$M_CPU")
nginx static file   $(printf '%9s  %9s  %8s  %8s' "$N_RPS" "$N_P50" "$N_P99" "$N_CPU")
muster / nginx      $R_NGINX (medians), $ROUND_RATIO (median of per-round ratios)   (target >= 0.7: $(verdict "$R_NGINX >= 0.7"))
failed requests     $BAD
per-round req/s     muster $(per_round "$WORK"/res/muster-*.json)| nginx $(per_round "$WORK"/res/nginx-*.json)
per-round p99 ms    muster $(per_round_p99 "$WORK"/res/muster-*.json)| nginx $(per_round_p99 "$WORK"/res/nginx-*.json)
light load (-t1 -c4) muster $(light "$WORK/light-muster.json") | nginx $(light "$WORK/light-nginx.json")
muster RSS          $((RSS0 / 1024)) MiB before the load, $((RSS1 / 1024)) MiB after $(reqs "$WORK"/res/muster-*.json) requests
EOF

python3 - "$WORK/watchers.json" "$MPATH" "$AFTER" "$DEFER_READS" <<'EOF'
import json, statistics, sys
r = json.load(open(sys.argv[1]))
rounds = r["rounds"]
expected = r["blocking"]
med = lambda k: statistics.median(x[k] for x in rounds)
print()
print(f"=== consul wake-up: {expected} blocking queries on {sys.argv[2]}&index=N&wait=60s, one registration per round ===")
print("latency: change request sent -> answer received (kernel receive timestamp); answers read " + (f"{sys.argv[-1]} s after the change, so the driver is idle during the wake-up" if float(sys.argv[-1]) > 0 else "as they arrive"))
print("round  received        p50 ms   p99 ms   max ms   user-space p99  change ack ms  agent CPU us/wake-up")
for x in rounds:
    print(f"{x['round']:>5}  {x['received']:>6}/{x['expected']:<6}  {x['p50_ms']:>7}  {x['p99_ms']:>7}  {x['max_ms']:>7}"
          f"  {str(x['userspace_p99_ms'] or '-'):>14}  {x['change_ms']:>13}  {x['agent_cpu_us_per_watcher']:>20}")
p99 = med("p99_ms")
all_in = all(x["received"] == expected for x in rounds)
ref = r["reference_read_ms"]
print(f"median p99          {p99} ms   (target < 100 ms: {'met' if p99 < 100 else 'MISSED'})")
print(f"median p50 / max    {round(med('p50_ms'), 2)} ms / {round(med('max_ms'), 2)} ms")
print(f"received            {'all' if all_in else 'NOT all'} {expected} in every round   (target: all: {'met' if all_in else 'MISSED'})")
print(f"reference           one read with the queries parked: {ref} ms median round trip;"
      f" p99 wake-up / read = {p99 / ref:.0f}x")
print(f"parking             {r['open_seconds']} s to open and park all {expected}")
print(f"agent RSS           {r['rss_before_kb'] / 1024:.1f} MiB before parking, {r['rss_after_kb'] / 1024:.1f} MiB parked"
      f" -> {r['kb_per_watcher']} KiB per parked query")
print(f"after the rounds    {sys.argv[3]} passing instances")
EOF
