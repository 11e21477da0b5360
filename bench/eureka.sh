#!/usr/bin/env bash
# The Eureka API, on durable agents (--data-dir):
# 1. Reads: GET /eureka/apps/BENCH10 (10 instances registered through the Eureka API), as JSON
#    (Accept: application/json) and as XML (Accept: */*, which selects Eureka's default as no
#    Accept does), against the same bytes served as static files by nginx with the same
#    Content-Type.
# 2. Renewals: 1,000 instances registered through the Eureka API; wrk cycles through their
#    renewals (PUT /eureka/apps/RENEW/r-K?status=UP&lastDirtyTimestamp=1). Reference in the
#    same rounds: the native heartbeat of 1,000 instances on the same agent.
# What is compared is one server core, as in bench/discovery.sh: the agent runs on CPU 0
# (SERVER_CPU) only, with --http-threads 1 (taskset -apc on all its threads), and so does
# nginx, one worker started under taskset; the load is one wrk -t1 -c32 pinned to CPU 1
# (WRK_CPU), and this script's own helpers (curl, the Python driver) run on CPU 1 too.
# Server CPU per request: the server's user+system CPU time (with its children, nginx's
# worker) over a run, from /proc/PID/stat, divided by the requests answered in the run.
# "its CPU" is requests/s x CPU per request: the share of the server CPU the server kept
# busy; well below 100% means something else shared that core (or the load set the pace).
# Each server is loaded ALONE. ROUNDS rounds; each starts a fresh agent and nginx (the agent
# first in odd rounds, last in even ones: a process draws a speed at start that it keeps, see
# bench/discovery.sh), registers the instances, checks both servers (same bytes and
# Content-Type, one nginx worker, every thread pinned) and warms up each read (WARMUP seconds,
# not counted); then DURATION-second runs, the two of a comparison one right after the other,
# in ABBA order:
#     odd rounds:  muster JSON, nginx JSON, nginx XML, muster XML, renewals, heartbeats
#     even rounds: nginx JSON, muster JSON, muster XML, nginx XML, heartbeats, renewals
# Figures are medians over rounds; the ratios, requests/s muster / nginx (renewals /
# heartbeats) and CPU per request nginx / muster (heartbeats / renewals; above 1 means the
# first spends less), are medians of the per-round ratios.
# 3. Delta visibility, on the last round's agent (still pinned to CPU 0; the driver on
#    CPU 1): registrations at 50/s through one connection; after each acknowledgement,
#    /eureka/apps/delta is fetched through another connection until it shows the new
#    instance. The delta's apps__hashcode is checked against a full fetch's.
# Defaults (ROUNDS=8, DURATION=3, WARMUP=1) take about 5 minutes.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ROUNDS=${ROUNDS:-8}
DURATION=${DURATION:-3}
WARMUP=${WARMUP:-1}
CONNS=32
RENEWALS=${RENEWALS:-1000}
DELTA_COUNT=${DELTA_COUNT:-500}
DELTA_RATE=${DELTA_RATE:-50}
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

APP_PATH=/eureka/apps/BENCH10

# start_agent R: a fresh durable agent (one HTTP thread, every thread pinned to the server
# CPU) holding BENCH10's 10 instances, RENEW's $RENEWALS and as many native ones with a TTL;
# sets MPORT, MBASE and MUSTER_PID.
start_agent() {
    MPORT=$(pick_port)
    MBASE="http://127.0.0.1:$MPORT"
    start_muster "muster-$1" "$MPORT" --data-dir "$WORK/muster-$1" --disable-self-preservation --http-threads 1
    taskset -apc "$SERVER_CPU" "$MUSTER_PID" >/dev/null
    python3 "$DRIVER" eureka-register --port "$MPORT" --app BENCH10 --prefix i --count 10 >/dev/null
    python3 "$DRIVER" eureka-register --port "$MPORT" --app RENEW --prefix r --count "$RENEWALS" >/dev/null
    python3 - "$MPORT" "$RENEWALS" <<'EOF'
# The native reference: as many instances with a TTL, heartbeated through the native API.
import http.client, json, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
for k in range(n):
    c.request("PUT", f"/api/v1/services/native/instances/i-{k}",
              body=json.dumps({"address": "10.0.0.1", "port": 8080, "ttl": "10m"}),
              headers={"Content-Type": "application/json"})
    r = c.getresponse()
    r.read()
    if r.status not in (200, 201):
        raise SystemExit(f"native registration answered {r.status}")
EOF
}

# start_ref R: a fresh nginx (one worker, pinned to the server CPU) serving R's www/ (written
# by copy_answers); sets NBASE, NGINX_PID and WWW.
start_ref() {
    local port
    port=$(pick_port)
    NBASE="http://127.0.0.1:$port"
    WWW=$WORK/www-$1
    mkdir -p "$WWW"
    start_nginx_pinned "nginx-$1" "$port" "$WWW"
}

# copy_answers: the agent's JSON and XML answers, as nginx's app.json and app.xml.
copy_answers() {
    curl -fsS -H 'Accept: application/json' -o "$WWW/app.json" "$MBASE$APP_PATH"
    curl -fsS -o "$WWW/app.xml" "$MBASE$APP_PATH"
    [[ $(python3 -c 'import json,sys; print(len(json.load(open(sys.argv[1]))["application"]["instance"]))' "$WWW/app.json") == 10 ]] \
        || die "$APP_PATH did not return 10 instances"
    [[ $(grep -o '<instance>' "$WWW/app.xml" | wc -l) == 10 ]] || die "$APP_PATH as XML did not hold 10 instances"
}

# check_servers: both serve the same bytes with the same Content-Type, nginx with one worker,
# and every thread of both may run on the server CPU only.
check_servers() {
    local f accept
    for f in json xml; do
        cmp -s <(curl -fsS "$NBASE/app.$f") "$WWW/app.$f" || die "nginx does not serve the same $f bytes"
        [[ $(curl -fsS -o /dev/null -w '%{content_type}' "$NBASE/app.$f") == "application/$f" ]] \
            || die "nginx does not serve application/$f"
        accept=()
        [[ $f == xml ]] || accept=(-H 'Accept: application/json')
        [[ $(curl -fsS -o /dev/null -w '%{content_type}' "${accept[@]}" "$MBASE$APP_PATH") == "application/$f" ]] \
            || die "muster does not answer application/$f"
    done
    # The answers carry no per-request field: the same bytes on every read.
    cmp -s <(curl -fsS -H 'Accept: application/json' "$MBASE$APP_PATH") "$WWW/app.json" || die "muster's JSON answer changed"
    cmp -s <(curl -fsS "$MBASE$APP_PATH") "$WWW/app.xml" || die "muster's XML answer changed"
    check_workers "$NGINX_PID" 1
    check_pinned "$MUSTER_PID"
    check_pinned "$NGINX_PID"
}

# load T SECONDS OUT: wrk against T (json-muster, json-nginx, xml-muster, xml-nginx, renew,
# heartbeat) for SECONDS, its result in OUT; the server's CPU is counted unless OUT is the
# warm-up's.
load() {
    local t=$1 secs=$2 out=$3 url accept pid
    case $t in
        json-muster) url=$MBASE$APP_PATH accept=application/json pid=$MUSTER_PID ;;
        json-nginx) url=$NBASE/app.json accept=application/json pid=$NGINX_PID ;;
        # No Accept header at all would be the purest "default", but wrk's request always
        # carries the headers given; */* selects XML as no Accept does.
        xml-muster) url=$MBASE$APP_PATH accept='*/*' pid=$MUSTER_PID ;;
        xml-nginx) url=$NBASE/app.xml accept='*/*' pid=$NGINX_PID ;;
        renew | heartbeat) url=$MBASE pid=$MUSTER_PID ;;
    esac
    [[ $out != "$WORK/warmup.json" ]] || pid=
    case $t in
        renew)
            SERVICE=RENEW INSTANCES=$RENEWALS HEARTBEAT_PATH='/eureka/apps/%s/r-%d?status=UP&lastDirtyTimestamp=1' \
                run_wrk "$out" "$BENCH_DIR/lua/heartbeat.lua" 1 "$CONNS" "$secs" "$url" ${pid:+"$pid"} ;;
        heartbeat)
            SERVICE=native INSTANCES=$RENEWALS run_wrk "$out" "$BENCH_DIR/lua/heartbeat.lua" 1 "$CONNS" "$secs" "$url" ${pid:+"$pid"} ;;
        *)
            ACCEPT=$accept run_wrk "$out" "$BENCH_DIR/lua/accept.lua" 1 "$CONNS" "$secs" "$url" ${pid:+"$pid"} ;;
    esac
}

alone() {
    load "$1" "$DURATION" "$WORK/res/$1-$r.json"
    log "round $r $1: $(cat "$WORK/res/$1-$r.json")"
}

# --- 1. reads and 2. renewals ------------------------------------------------------------------

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
    copy_answers
    wait_http "$NBASE/app.json" 10
    check_servers
    [[ -n "${JSON_BYTES:-}" ]] || JSON_BYTES=$(stat -c %s "$WWW/app.json") XML_BYTES=$(stat -c %s "$WWW/app.xml")
    for t in json-muster json-nginx xml-muster xml-nginx; do
        load "$t" "$WARMUP" "$WORK/warmup.json"
    done
    if ((r % 2)); then
        order=(json-muster json-nginx xml-nginx xml-muster renew heartbeat)
    else
        order=(json-nginx json-muster xml-muster xml-nginx heartbeat renew)
    fi
    for t in "${order[@]}"; do alone "$t"; done
    check_pinned "$MUSTER_PID"
    check_pinned "$NGINX_PID"
    # Renewals went to instances that exist: every one of them must still be there and UP.
    UP=$(curl -fsS -H 'Accept: application/json' "$MBASE/eureka/apps/RENEW" \
        | python3 -c 'import json,sys; print(sum(i["status"] == "UP" for i in json.load(sys.stdin)["application"]["instance"]))')
    [[ $UP == "$RENEWALS" ]] || die "after the renewals, $UP of $RENEWALS instances are UP"
    stop "$NGINX_PID"
    ((r == ROUNDS)) || stop "$MUSTER_PID"
done
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)

# --- 3. delta visibility -----------------------------------------------------------------------

log "delta visibility: $DELTA_COUNT registrations at $DELTA_RATE/s"
python3 "$DRIVER" eureka-delta --port "$MPORT" --count "$DELTA_COUNT" --rate "$DELTA_RATE" >"$WORK/delta.json"
log "delta: $(cat "$WORK/delta.json")"

# --- results -----------------------------------------------------------------------------------

med() { python3 "$DRIVER" median "$1" "${@:2}" --digits "${DIGITS:-0}"; }
verdict() { python3 -c "print('met' if $1 else 'MISSED')"; }
BAD=$(python3 -c 'import json,sys; print(sum(json.load(open(f))["non2xx"]+json.load(open(f))["socket_errors"] for f in sys.argv[1:]))' "$WORK"/res/*.json)
row() {
    local f=("$WORK"/res/"$1"-*.json)
    printf '%9s  %8s  %8s  %10s  %7s' "$(DIGITS=0 med ok_rps "${f[@]}")" "$(DIGITS=3 med p50_ms "${f[@]}")" \
        "$(DIGITS=3 med p99_ms "${f[@]}")" "$(DIGITS=1 med cpu_us_per_req "${f[@]}")" "$(busy "${f[@]}")"
}
RJ=$(round_ratio "$WORK/res" json-muster json-nginx)
CJ=$(round_ratio "$WORK/res" json-muster json-nginx cpu)
RX=$(round_ratio "$WORK/res" xml-muster xml-nginx)
CX=$(round_ratio "$WORK/res" xml-muster xml-nginx cpu)
RR=$(round_ratio "$WORK/res" renew heartbeat)
CR=$(round_ratio "$WORK/res" renew heartbeat cpu)
RENEW=$(med ok_rps "$WORK"/res/renew-*.json)

cat <<EOF

=== eureka: GET $APP_PATH (10 instances; JSON $JSON_BYTES bytes, XML $XML_BYTES bytes) ===
$MACHINE
$(nginx -v 2>&1 | sed 's/^nginx version: //'), wrk $({ wrk -v 2>&1 || true; } | head -1 | cut -d' ' -f2)
method: one server core: muster (--http-threads 1, taskset -apc) and nginx (1 worker) on CPU $SERVER_CPU only, each loaded
        ALONE by wrk -t1 -c$CONNS -d${DURATION}s --latency pinned to CPU $WRK_CPU; $ROUNDS rounds, a fresh agent and nginx each
        round (start order alternating), ${WARMUP}s warm-up per read, ABBA order (odd rounds: muster JSON, nginx
        JSON, nginx XML, muster XML, renewals, heartbeats; even rounds: the mirror); figures are medians
        over rounds, ratios medians of per-round ratios
load average (1/5/15 min) at the start $LOAD_START, at the end of parts 1-2 $LOAD_END
                       req/s    p50 ms    p99 ms  CPU us/req  its CPU
muster JSON        $(row json-muster)
nginx  JSON        $(row json-nginx)
muster / nginx     req/s $RJ, CPU/request (nginx / muster) $CJ   (target req/s >= 0.7: $(verdict "$RJ >= 0.7"))
$(ratio_rounds "$WORK/res" json-muster json-nginx muster nginx)
muster XML         $(row xml-muster)
nginx  XML         $(row xml-nginx)
muster / nginx     req/s $RX, CPU/request (nginx / muster) $CX   (target req/s >= 0.7: $(verdict "$RX >= 0.7"))
$(ratio_rounds "$WORK/res" xml-muster xml-nginx muster nginx)

=== eureka renewals: PUT /eureka/apps/RENEW/r-K over $RENEWALS instances, wrk -t1 -c$CONNS, same agents and rounds ===
                       req/s    p50 ms    p99 ms  CPU us/req  its CPU
renewals           $(row renew)   (target >= 50,000/s: $(verdict "$RENEW >= 50000"))
native heartbeats  $(row heartbeat)
renew / heartbeat  req/s $RR, CPU/request (heartbeat / renew) $CR
$(ratio_rounds "$WORK/res" renew heartbeat renew heartbeat)
failed requests    $BAD (all parts)
EOF

python3 - "$WORK/delta.json" "$ROUNDS" "$SERVER_CPU" "$WRK_CPU" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
ok = d["missing"] == 0 and d["p99_ms"] is not None and d["p99_ms"] < 100
print()
print(f"=== eureka delta: {d['registrations']} registrations at {d['rate']}/s; delta fetched by another connection after each acknowledgement ===")
print(f"on round {sys.argv[2]}'s agent (on CPU {sys.argv[3]} only); the driver on CPU {sys.argv[4]}")
print(f"seen by the first delta after the acknowledgement  {d['seen_by_first_delta_after_ack']}/{d['registrations']}, missing {d['missing']}")
print(f"acknowledgement -> visible in a delta   p50 {d['p50_ms']} ms, p99 {d['p99_ms']} ms, max {d['max_ms']} ms   (target p99 < 100 ms: {'met' if ok else 'MISSED'})")
print(f"delta apps__hashcode equals the full registry's: {d['hashcode_matches']} ({d['apps__hashcode']})")
EOF
