#!/usr/bin/env bash
# The Consul API: GET /v1/health/service/web?passing for one service of 10 instances (each
# with a passing TTL check) in a --dev agent.
# What is compared is one server core, as in bench/discovery.sh: the agent runs on CPU 0
# (SERVER_CPU) only, with --http-threads 1 (taskset -apc on all its threads), and so does
# nginx, one worker started under taskset; the load is one wrk -t1 -c32 pinned to CPU 1
# (WRK_CPU), and this script's own helpers (curl, the Python driver) run on CPU 1 too.
# Server CPU per request: the server's user+system CPU time (with its children, nginx's
# worker) over a run, from /proc/PID/stat, divided by the requests answered in the run.
# "its CPU" is requests/s x CPU per request: the share of the server CPU the server kept
# busy; well below 100% means something else shared that core (or the load set the pace).
# 1. Throughput: against the same bytes served as a static file by nginx (Content-Type:
#    application/json), each server loaded ALONE. ROUNDS rounds; each starts a fresh agent and
#    nginx (the agent first in odd rounds, last in even ones: a process draws a speed at start
#    that it keeps, see bench/discovery.sh), checks them (same bytes, one nginx worker, every
#    thread pinned) and warms each up (WARMUP seconds, not counted); then a DURATION-second run
#    of each, one right after the other, muster first in odd rounds and nginx first in even
#    ones. Figures are medians over rounds; the ratios, requests/s muster / nginx and CPU per
#    request nginx / muster (above 1 means muster spends less), are medians of the per-round
#    ratios. A light load (wrk -t1 -c4, 5 s) on the last round's servers shows latency
#    without saturation (diagnostic).
# 2. Wake-up, on a fresh agent as it runs by default (its default HTTP event loops, not
#    pinned; nor is the Python driver): 10,000 blocking queries (?passing&index=N&wait=60s) parked
#    by bench/driver.py, then one change (an 11th instance registered through
#    /v1/agent/service/register with a passing TTL check). For each query: time from sending
#    the change request to the kernel's receive timestamp (SO_TIMESTAMPNS) of its answer.
#    WAKE_ROUNDS rounds: the queries are parked again at their new index between rounds.
#    Reference in the same run: one read's round trip while the queries are parked. Agent RSS
#    before parking and with all parked, agent CPU per wake-up.
# Defaults (ROUNDS=16, DURATION=4, WARMUP=1, WAKE_ROUNDS=3) take about 4 minutes: with 12
# rounds, two runs minutes apart gave req/s ratios of 1.27 and 1.16.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ROUNDS=${ROUNDS:-16}
DURATION=${DURATION:-4}
WARMUP=${WARMUP:-1}
WAKE_ROUNDS=${WAKE_ROUNDS:-3}
CONNS=32
# Seconds the driver leaves the answers unread after the change (they are timed by their
# kernel receive timestamps either way). Reading them as they arrive (DEFER_READS=0) keeps
# the Python driver busy on CPU 1 during the wake-up.
DEFER_READS=${DEFER_READS:-1}
BLOCKING=${BLOCKING:-10000}
SERVICE=web
INSTANCES=10
SERVER_CPU=${SERVER_CPU:-0}
export WRK_CPU=${WRK_CPU:-1}

(($(nproc) >= 2)) || die "needs two CPUs (the servers on one, wrk on the other)"
need_python
need_wrk
need_nginx
need curl curl
need taskset util-linux
build_muster
MACHINE=$(machine_info)
# This script's own helpers (curl, python) run beside wrk, not on the server CPU; the servers
# it starts are pinned to the server CPU below.
taskset -pc "$WRK_CPU" $$ >/dev/null

# 10,000 client sockets here and as many in the agent.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
(($(ulimit -n) >= BLOCKING + 1000)) || die "ulimit -n is $(ulimit -n): too low for $BLOCKING blocking queries"

# The agent caps open connections (http.max_connections, 4,096 by default); every parked
# watcher holds one, so the cap is raised above what the script opens.
printf '[http]\nmax_connections = %d\n' $((BLOCKING + ${SSE:-0} + 100)) >"$WORK/agent.toml"
MPATH="/v1/health/service/$SERVICE?passing"
count_passing() {
    python3 -c '
import json, sys
v = json.load(open(sys.argv[1]))
print(sum(all(c["Status"] == "passing" for c in e["Checks"]) for e in v))' "$1"
}

# start_agent R: a fresh agent (one HTTP thread, every thread pinned to the server CPU)
# holding the 10 instances with passing TTL checks; sets MPORT, MBASE, MURL and MUSTER_PID.
start_agent() {
    local i
    MPORT=$(pick_port)
    if [[ -n "${UNPINNED:-}" ]]; then
        start_muster "muster-$1" "$MPORT" --dev --disable-self-preservation --config "$WORK/agent.toml"
    else
        start_muster "muster-$1" "$MPORT" --dev --disable-self-preservation --http-threads 1 --config "$WORK/agent.toml"
        taskset -apc "$SERVER_CPU" "$MUSTER_PID" >/dev/null
    fi
    MBASE="http://127.0.0.1:$MPORT"
    MURL="$MBASE$MPATH"
    for i in $(seq 0 $((INSTANCES - 1))); do
        curl -fsS -o /dev/null -X PUT "$MBASE/v1/agent/service/register" \
            -H 'Content-Type: application/json' \
            -d "{\"ID\":\"$SERVICE-$i\",\"Name\":\"$SERVICE\",\"Address\":\"10.0.0.$((i + 1))\",\"Port\":8080,\"Tags\":[\"a\"],\"Meta\":{\"k\":\"v\"},\"Check\":{\"TTL\":\"1h\"}}"
        curl -fsS -o /dev/null -X PUT "$MBASE/v1/agent/check/pass/service:$SERVICE-$i"
    done
}

# start_ref R: a fresh nginx (one worker, pinned to the server CPU) serving R's www/ (written
# by copy_answer); sets NPORT, NURL, NGINX_PID and WWW.
start_ref() {
    NPORT=$(pick_port)
    WWW=$WORK/www-$1
    mkdir -p "$WWW"
    start_nginx_pinned "nginx-$1" "$NPORT" "$WWW"
    NURL="http://127.0.0.1:$NPORT/$SERVICE.json"
}

# check_servers: nginx serves the agent's bytes as application/json, with one worker; the 10
# instances are passing; every thread of both servers may run on the server CPU only.
check_servers() {
    curl -fsS -o "$WORK/m.body" "$MURL"
    [[ $(count_passing "$WORK/m.body") == "$INSTANCES" ]] || die "$MPATH did not return $INSTANCES passing instances"
    cmp -s <(curl -fsS "$NURL") "$WORK/m.body" || die "nginx does not serve the agent's bytes"
    [[ $(curl -fsS -o /dev/null -w '%{content_type}' "$NURL") == application/json ]] \
        || die "nginx does not serve application/json"
    check_workers "$NGINX_PID" 1
    check_pinned "$MUSTER_PID"
    check_pinned "$NGINX_PID"
}

# alone WHO: one DURATION-second run against WHO (muster or nginx) alone, in res/WHO-$r.json.
alone() {
    local f=$WORK/res/$1-$r.json
    case $1 in
        muster) run_wrk "$f" "$BENCH_DIR/lua/get.lua" 1 "$CONNS" "$DURATION" "$MURL" "$MUSTER_PID" ;;
        nginx) run_wrk "$f" "$BENCH_DIR/lua/get.lua" 1 "$CONNS" "$DURATION" "$NURL" "$NGINX_PID" ;;
    esac
    log "round $r $1: $(cat "$f")"
}

# --- 1. throughput ---------------------------------------------------------------------------

mkdir -p "$WORK/res"
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
for r in $(seq "$ROUNDS"); do
    if ((r % 2)); then
        start_agent "$r"
        start_ref "$r"
    else
        start_ref "$r"
        start_agent "$r"
    fi
    curl -fsS -o "$WWW/$SERVICE.json" "$MURL"
    wait_http "$NURL" 10
    check_servers
    [[ -n "${BODY_BYTES:-}" ]] || BODY_BYTES=$(stat -c %s "$WWW/$SERVICE.json")
    RSS0=$(rss_kb "$MUSTER_PID")
    for u in "$MURL" "$NURL"; do
        run_wrk "$WORK/warmup.json" "$BENCH_DIR/lua/get.lua" 1 "$CONNS" "$WARMUP" "$u"
    done
    if ((r % 2)); then
        alone muster
        alone nginx
    else
        alone nginx
        alone muster
    fi
    check_pinned "$MUSTER_PID"
    check_pinned "$NGINX_PID"
    cmp -s <(curl -fsS "$MURL") "$WWW/$SERVICE.json" || die "muster's answer changed"
    RSS1=$(rss_kb "$MUSTER_PID")
    if ((r < ROUNDS)); then
        stop "$MUSTER_PID"
        stop "$NGINX_PID"
    fi
done
# Latency without saturating the server CPU: one wrk thread, 4 connections (diagnostic).
run_wrk "$WORK/light-muster.json" "$BENCH_DIR/lua/get.lua" 1 4 5 "$MURL"
run_wrk "$WORK/light-nginx.json" "$BENCH_DIR/lua/get.lua" 1 4 5 "$NURL"
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)
stop "$NGINX_PID"

# --- 2. wake-up --------------------------------------------------------------------------------

# The wake-up target is the agent's as it runs by default, on the whole machine: a fresh agent
# with its default HTTP event loops on every CPU, and the driver unpinned too.
stop "$MUSTER_PID"
taskset -pc "0-$(($(getconf _NPROCESSORS_ONLN) - 1))" $$ >/dev/null
UNPINNED=1 start_agent wake
# Let the allocator settle before the "before" RSS is taken.
curl -fsS -o /dev/null "$MURL"
sleep 1
log "parking $BLOCKING blocking queries on $MPATH"
CHANGE_BODY="{\"ID\":\"$SERVICE-change-{round}\",\"Name\":\"$SERVICE\",\"Address\":\"10.0.1.{round}\",\"Port\":8080,\"Tags\":[\"a\"],\"Meta\":{\"k\":\"v\"},\"Check\":{\"TTL\":\"1h\",\"Status\":\"passing\"}}"
timeout 170 python3 "$DRIVER" watchers --port "$MPORT" --pid "$MUSTER_PID" --service "$SERVICE" \
    --blocking "$BLOCKING" --sse 0 --rounds "$WAKE_ROUNDS" \
    --defer-reads "$DEFER_READS" \
    --path "$MPATH" --index-header X-Consul-Index --wait 60s \
    --change-path /v1/agent/service/register --change-body "$CHANGE_BODY" \
    >"$WORK/watchers.json"
curl -fsS -o "$WORK/after.json" "$MURL"
AFTER=$(count_passing "$WORK/after.json")
[[ $AFTER == $((INSTANCES + WAKE_ROUNDS)) ]] || die "after $WAKE_ROUNDS changes, $AFTER passing instances (expected $((INSTANCES + WAKE_ROUNDS)))"

# --- results -----------------------------------------------------------------------------------

med() { python3 "$DRIVER" median "$1" "${@:2}" --digits "${DIGITS:-0}"; }
BAD=$(python3 -c 'import json,sys; print(sum(json.load(open(f))["non2xx"]+json.load(open(f))["socket_errors"] for f in sys.argv[1:]))' "$WORK"/res/*.json)
reqs() { python3 -c 'import json,sys; print(sum(json.load(open(f))["requests"] for f in sys.argv[1:]))' "$@"; }
verdict() { python3 -c "print('met' if $1 else 'MISSED')"; }
R_RPS=$(round_ratio "$WORK/res" muster nginx)
R_CPU=$(round_ratio "$WORK/res" muster nginx cpu)
row() {
    local f=("$WORK"/res/"$1"-*.json)
    printf '%9s  %9s  %8s  %10s  %7s' "$(DIGITS=0 med ok_rps "${f[@]}")" "$(DIGITS=3 med p50_ms "${f[@]}")" \
        "$(DIGITS=3 med p99_ms "${f[@]}")" "$(DIGITS=1 med cpu_us_per_req "${f[@]}")" "$(busy "${f[@]}")"
}
per_round_p99() {
    local i
    for i in $(seq "$ROUNDS"); do
        python3 -c 'import json,sys; print("%.2f" % json.load(open(sys.argv[1]))["p99_ms"], end=" ")' "$WORK/res/$1-$i.json"
    done
}
light() { python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print("%d req/s, p50 %.3f ms, p99 %.3f ms" % (r["ok_rps"], r["p50_ms"], r["p99_ms"]))' "$1"; }

cat <<EOF

=== consul: GET $MPATH, $INSTANCES instances with passing TTL checks, body $BODY_BYTES bytes ===
$MACHINE
$(nginx -v 2>&1 | sed 's/^nginx version: //'), wrk $({ wrk -v 2>&1 || true; } | head -1 | cut -d' ' -f2)
throughput: one server core: muster (--http-threads 1, taskset -apc) and nginx (1 worker) on CPU $SERVER_CPU only,
      each loaded ALONE by wrk -t1 -c$CONNS -d${DURATION}s --latency pinned to CPU $WRK_CPU; $ROUNDS rounds, a fresh agent
      and nginx each round (start order alternating), ${WARMUP}s warm-up each, muster first in odd rounds and
      nginx first in even ones; figures are medians over rounds, ratios medians of per-round ratios
load average (1/5/15 min) at the start $LOAD_START, at the end of part 1 $LOAD_END
                      req/s     p50 ms    p99 ms   CPU us/req  its CPU
muster              $(row muster)
nginx static file   $(row nginx)
muster / nginx      req/s $R_RPS, CPU/request (nginx / muster) $R_CPU   (target req/s >= 0.7: $(verdict "$R_RPS >= 0.7"))
$(ratio_rounds "$WORK/res" muster nginx muster nginx)
failed requests     $BAD
per-round p99 ms    muster $(per_round_p99 muster)| nginx $(per_round_p99 nginx)
light load (-t1 -c4) muster $(light "$WORK/light-muster.json") | nginx $(light "$WORK/light-nginx.json")
muster RSS          (round $ROUNDS's agent) $((RSS0 / 1024)) MiB before the load, $((RSS1 / 1024)) MiB after $(reqs "$WORK/res/muster-$ROUNDS.json") requests
EOF

python3 - "$WORK/watchers.json" "$MPATH" "$AFTER" "$DEFER_READS" "$SERVER_CPU" "$WRK_CPU" <<'EOF'
import json, statistics, sys
r = json.load(open(sys.argv[1]))
rounds = r["rounds"]
expected = r["blocking"]
med = lambda k: statistics.median(x[k] for x in rounds)
print()
print(f"=== consul wake-up: {expected} blocking queries on {sys.argv[2]}&index=N&wait=60s, one registration per round ===")
print("a fresh agent with its default HTTP event loops, unpinned, as is the Python driver")
print("latency: change request sent -> answer received (kernel receive timestamp); answers read " + (f"{sys.argv[4]} s after the change, so the driver is idle during the wake-up" if float(sys.argv[4]) > 0 else "as they arrive"))
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
