#!/usr/bin/env bash
# Discovery reads of one service with 10 instances (registered in a durable agent), against
# references serving the same answers:
#  1. muster's native GET /api/v1/services/disc against nginx serving the identical bytes as a
#     static file at the same path (one worker, keep-alive, no access log);
#  2. muster's Consul GET /v1/health/service/disc?passing against nginx serving that answer's
#     identical bytes at the same path;
#  3. muster's native read against etcd 3.4 reading the same 10 records by prefix through its
#     HTTP/JSON gateway (POST /v3/kv/range).
# Method (as bench/acl.sh): every server runs on CPU 0 (SERVER_CPU) only: the agent with
# --http-threads 1 (taskset -apc on all its threads), nginx with one worker, etcd started
# under taskset, so Go sizes GOMAXPROCS to that one CPU. The two servers of a pair are loaded
# AT THE SAME TIME, each by its own wrk -t1 -c32 pinned to CPU 1 (WRK_CPU): they share the
# server CPU, and whatever else this shared machine does in those seconds slows both alike,
# which measuring one after the other cannot promise. Each round starts fresh servers (which
# starts first alternates) and a 1 s warm-up of each, not counted. The figures are medians
# over rounds of the per-round ratios muster / reference, of requests/s and of server CPU per
# request (reference / muster, so above 1 means muster spends less). Both servers of a pair
# saturate their share of CPU 0, so the two ratios should agree; the summary also shows
# each server's share of CPU 0 and how busy the pair kept it. The etcd comparison is measured
# the same way, muster and etcd loaded at the same time (etcd's Go runtime takes a somewhat
# larger share of the CPU than one event loop does, so there the req/s ratio understates
# the CPU-per-request one; the target is checked on req/s).
#  4. p99 latency at a fixed rate, LAT_LOAD (0.8) x muster's median req/s in the pairs above
#     (its throughput while sharing CPU 0 with the reference, about half of what it serves
#     with CPU 0 to itself, so roughly 40% of its capacity), paced by bench/lua/rate.lua (wrk -t1 -c32, CPU 1): muster and nginx
#     one after the other (a latency tail measured with another server on the CPU would be
#     the scheduler's), still pinned, native then Consul, LAT_ROUNDS rounds with fresh
#     servers, which of the two runs first alternating; medians of p50/p99 over rounds.
#     With one server at a time, a tail set by whatever else runs on CPU 0 (a build, say)
#     is not shared: of this script's figures the p99s move most from one run to the next.
# Targets: muster >= 0.7x nginx, >= 5x etcd (req/s); muster's native p99 < 2 ms.
# Defaults (ROUNDS=5, DURATION=8, LAT_ROUNDS=3, LAT_DURATION=5) take about 5 minutes.
# AA=1 checks the method: a second agent (same build and flags) stands in for nginx and etcd
# is left out, so every ratio should come out near 1.00.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-8}
WARMUP=${WARMUP:-1}
LAT_ROUNDS=${LAT_ROUNDS:-3}
LAT_DURATION=${LAT_DURATION:-5}
LAT_LOAD=${LAT_LOAD:-0.8}
CONNS=32
SERVICE=disc
SERVER_CPU=${SERVER_CPU:-0}
export WRK_CPU=${WRK_CPU:-1}
AA=${AA:-}

(($(nproc) >= 2)) || die "needs two CPUs (the servers on one, wrk on the other)"
need_python
need_wrk
need curl curl
need taskset util-linux
if [[ -z "$AA" ]]; then
    need_nginx
    need_etcd
fi
build_muster

NATIVE=/api/v1/services/$SERVICE
CONSUL="/v1/health/service/$SERVICE?passing"
GET=$BENCH_DIR/lua/get.lua
REF=nginx
[[ -z "$AA" ]] || REF=muster-b
mkdir -p "$WORK/res"

# --- servers ---------------------------------------------------------------------------------

# start_agent NAME: a fresh durable agent (one HTTP thread, every thread pinned to the server
# CPU) holding the 10 instances; sets AGENT_PORT and AGENT_PID.
start_agent() {
    local name=$1 port i
    port=$(pick_port)
    start_muster "$name" "$port" --data-dir "$WORK/$name-data" --disable-self-preservation --http-threads 1
    taskset -apc "$SERVER_CPU" "$MUSTER_PID" >/dev/null
    for i in $(seq 0 9); do
        curl -fsS -o /dev/null -X PUT "http://127.0.0.1:$port/api/v1/services/$SERVICE/instances/i-$i" \
            -H 'Content-Type: application/json' \
            -d "{\"address\":\"10.0.0.$((i + 1))\",\"port\":8080,\"tags\":[\"a\"],\"meta\":{\"k\":\"v\"},\"zone\":\"z1\",\"ttl\":\"10m\"}"
    done
    AGENT_PORT=$port AGENT_PID=$MUSTER_PID
}

# start_nginx1 NAME: nginx with ONE worker (lib.sh's start_nginx runs two), started pinned to
# the server CPU, serving NAME/www with files named like the agent's read paths; sets
# NGINX_PORT, NGINX_PID and NGINX_ROOT. Its files are written by copy_answers.
start_nginx1() {
    local name=$1 dir=$WORK/$1
    NGINX_PORT=$(pick_port)
    NGINX_ROOT=$dir/www
    mkdir -p "$NGINX_ROOT"
    nginx_conf "$dir" 1 "$NGINX_PORT" "root $NGINX_ROOT; default_type application/json;"
    spawn "$name" taskset -c "$SERVER_CPU" nginx -c "$dir/nginx.conf" -e "$dir/error.log"
    NGINX_PID=$SPAWNED_PID
}

# start_etcd1 NAME: a one-member etcd started pinned to the server CPU; sets ETCD_PORT, ETCD_PID.
start_etcd1() {
    local name=$1 peer
    ETCD_PORT=$(pick_port)
    peer=$(pick_port)
    etcd_cmd "$ETCD_PORT" "$peer" "$WORK/$name-data"
    spawn "$name" taskset -c "$SERVER_CPU" "${ETCD_CMD[@]}"
    ETCD_PID=$SPAWNED_PID
}

# start_ref NAME: the reference for the two reads, nginx (or, with AA=1, a second agent);
# sets REF_PORT and REF_PID.
start_ref() {
    if [[ -n "$AA" ]]; then
        start_agent "$1"
        REF_PORT=$AGENT_PORT REF_PID=$AGENT_PID
    else
        start_nginx1 "$1"
        REF_PORT=$NGINX_PORT REF_PID=$NGINX_PID
    fi
}

# copy_answers AGENT_PORT ROOT: the agent's answers to both reads, as files at the same paths
# under ROOT (nginx ignores the query string).
copy_answers() {
    local port=$1 root=$2
    mkdir -p "$root/api/v1/services" "$root/v1/health/service"
    curl -fsS -o "$root$NATIVE" "http://127.0.0.1:$port$NATIVE"
    curl -fsS -o "$root/v1/health/service/$SERVICE" "http://127.0.0.1:$port$CONSUL"
}

# check_same A_PORT B_PORT: both reads answer the same bytes on both, with the 10 instances.
check_same() {
    local a=$1 b=$2 path n
    for path in "$NATIVE" "$CONSUL"; do
        curl -fsS -o "$WORK/a.body" "http://127.0.0.1:$a$path"
        curl -fsS -o "$WORK/b.body" "http://127.0.0.1:$b$path"
        cmp -s "$WORK/a.body" "$WORK/b.body" || die "$path: the reference does not serve the agent's bytes"
        n=$(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(len(d["instances"]) if isinstance(d, dict) else len(d))' "$WORK/a.body")
        [[ "$n" == 10 ]] || die "$path: $n instances, not 10"
    done
}

# check_pinned PID: every thread of PID and of its children may run on the server CPU only.
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

# start_servers NAME_SUFFIX WITH_ETCD: a fresh agent and reference (and etcd), the agent
# first in odd rounds and last in even ones; then the reference gets the agent's bytes and
# etcd its records, and everything is checked. Sets M_PORT/M_PID, REF_PORT/REF_PID and,
# with etcd, E_PORT/E_PID.
start_servers() {
    local s=$1 with_etcd=$2 n=${1##*-}
    if ((n % 2)); then
        start_agent "muster-$s"
        M_PORT=$AGENT_PORT M_PID=$AGENT_PID
        start_ref "$REF-$s"
        [[ -z "$with_etcd" ]] || start_etcd1 "etcd-$s"
    else
        start_ref "$REF-$s"
        [[ -z "$with_etcd" ]] || start_etcd1 "etcd-$s"
        start_agent "muster-$s"
        M_PORT=$AGENT_PORT M_PID=$AGENT_PID
    fi
    if [[ -z "$AA" ]]; then
        copy_answers "$M_PORT" "$NGINX_ROOT"
        wait_http "http://127.0.0.1:$REF_PORT$NATIVE" 10
        [[ $(pgrep -c -P "$REF_PID") == 1 ]] || die "nginx runs $(pgrep -c -P "$REF_PID") workers, not 1"
    fi
    check_same "$M_PORT" "$REF_PORT"
    check_pinned "$M_PID"
    check_pinned "$REF_PID"
    if [[ -n "$with_etcd" ]]; then
        E_PORT=$ETCD_PORT E_PID=$ETCD_PID
        wait_http "http://127.0.0.1:$E_PORT/health" 30
        curl -fsS -o "$WORK/native.body" "http://127.0.0.1:$M_PORT$NATIVE"
        python3 "$DRIVER" etcd-load --port "$E_PORT" --body "$WORK/native.body" \
            --prefix "svc/$SERVICE/" --range-out "$WORK/etcd-range.json" >"$WORK/etcd-load.json"
        ETCD_RANGE_BODY=$(cat "$WORK/etcd-range.json")
        export ETCD_RANGE_BODY
        check_pinned "$E_PID"
    fi
}

# pair NAME LUA_A URL_A PID_A LUA_B URL_B PID_B: the two wrks at once, results in
# res/NAME-muster-$r.json and res/NAME-ref-$r.json.
pair() {
    local name=$1 wa wb
    run_wrk "$WORK/res/$name-muster-$r.json" "$2" 1 "$CONNS" "$DURATION" "$3" "$4" &
    wa=$!
    run_wrk "$WORK/res/$name-ref-$r.json" "$5" 1 "$CONNS" "$DURATION" "$6" "$7" &
    wb=$!
    wait "$wa" || die "wrk against muster ($name) failed"
    wait "$wb" || die "wrk against the reference ($name) failed"
    log "round $r $name muster: $(cat "$WORK/res/$name-muster-$r.json")"
    log "round $r $name ref:    $(cat "$WORK/res/$name-ref-$r.json")"
}

warm() { run_wrk "$WORK/warmup.json" "$1" 1 "$CONNS" "$WARMUP" "$2"; }
reqs() { python3 -c 'import json,sys; print(sum(json.load(open(f))["requests"] for f in sys.argv[1:]))' "$@"; }
scrape_ms() {
    curl -fsS -o /dev/null -w '%{time_total}' "http://127.0.0.1:$1/metrics" |
        python3 -c 'import sys; print(f"{float(sys.stdin.read())*1000:.0f}")'
}

# --- 1-3. max req/s, pairs loaded at the same time -------------------------------------------

WITH_ETCD=yes
[[ -z "$AA" ]] || WITH_ETCD=
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
for r in $(seq "$ROUNDS"); do
    start_servers "$r" "$WITH_ETCD"
    log "round $r: servers up"
    MU=http://127.0.0.1:$M_PORT RU=http://127.0.0.1:$REF_PORT
    if ((r == 1)); then
        NATIVE_BYTES=$(curl -fsS -o /dev/null -w '%{size_download}' "$MU$NATIVE")
        CONSUL_BYTES=$(curl -fsS -o /dev/null -w '%{size_download}' "$MU$CONSUL")
        M_HDR=$(curl -fsS -o /dev/null -o /dev/null -w '%{size_header}/' "$MU$NATIVE" "$MU$CONSUL")
        R_HDR=$(curl -fsS -o /dev/null -o /dev/null -w '%{size_header}/' "$RU$NATIVE" "$RU$CONSUL")
    fi
    RSS0=$(rss_kb "$M_PID")
    for u in "$MU" "$RU"; do
        warm "$GET" "$u$NATIVE"
        warm "$GET" "$u$CONSUL"
    done
    [[ -z "$WITH_ETCD" ]] || warm "$BENCH_DIR/lua/etcd_range.lua" "http://127.0.0.1:$E_PORT/v3/kv/range"
    # Threads started during the warm-up inherit the pinning; check anyway.
    check_pinned "$M_PID"
    check_pinned "$REF_PID"
    pair native "$GET" "$MU$NATIVE" "$M_PID" "$GET" "$RU$NATIVE" "$REF_PID"
    pair consul "$GET" "$MU$CONSUL" "$M_PID" "$GET" "$RU$CONSUL" "$REF_PID"
    [[ -z "$WITH_ETCD" ]] ||
        pair etcd "$GET" "$MU$NATIVE" "$M_PID" "$BENCH_DIR/lua/etcd_range.lua" "http://127.0.0.1:$E_PORT/v3/kv/range" "$E_PID"
    # The agent's memory: before this round's load, after it, and after a /metrics scrape
    # (whose time shows what the metrics recorder accumulated); the last round's is reported.
    RSS1=$(rss_kb "$M_PID")
    M_REQS=$(reqs "$WORK"/res/*-muster-"$r".json)
    SCRAPE_MS=$(scrape_ms "$M_PORT")
    SCRAPE2_MS=$(scrape_ms "$M_PORT")
    RSS2=$(rss_kb "$M_PID")
    stop "$M_PID"
    stop "$REF_PID"
    [[ -z "$WITH_ETCD" ]] || stop "$E_PID"
done

# --- 4. latency at a fixed rate, one server at a time ----------------------------------------

med() { python3 "$DRIVER" median "$1" "${@:2}" --digits "${DIGITS:-0}"; }
rate_of() { python3 -c "print(max(100, int($(med ok_rps "$WORK"/res/"$1"-muster-*.json) * $LAT_LOAD)))"; }
declare -A LAT_RATE=([native]=$(rate_of native) [consul]=$(rate_of consul))
declare -A LPATH=([native]=$NATIVE [consul]=$CONSUL)
log "latency at a fixed rate: native ${LAT_RATE[native]}/s, consul ${LAT_RATE[consul]}/s"
for l in $(seq "$LAT_ROUNDS"); do
    start_servers "lat-$l" ""
    log "latency round $l: servers up"
    declare -A URL=([muster]=http://127.0.0.1:$M_PORT [ref]=http://127.0.0.1:$REF_PORT)
    declare -A PID=([muster]=$M_PID [ref]=$REF_PID)
    order=(muster ref)
    ((l % 2)) || order=(ref muster)
    for who in "${order[@]}"; do
        warm "$GET" "${URL[$who]}$NATIVE"
        warm "$GET" "${URL[$who]}$CONSUL"
        check_pinned "${PID[$who]}"
    done
    for api in native consul; do
        for who in "${order[@]}"; do
            RATE=${LAT_RATE[$api]} run_wrk "$WORK/res/lat-$api-$who-$l.json" "$BENCH_DIR/lua/rate.lua" 1 "$CONNS" \
                "$LAT_DURATION" "${URL[$who]}${LPATH[$api]}" "${PID[$who]}"
            log "latency round $l $api $who: $(cat "$WORK/res/lat-$api-$who-$l.json")"
        done
    done
    stop "$M_PID"
    stop "$REF_PID"
done

# --- report ----------------------------------------------------------------------------------

if [[ -z "$AA" ]]; then
    VERSIONS="$(nginx -v 2>&1 | sed 's/^nginx version: //'), etcd $(etcd --version | awk 'NR==1 {print $3}'), wrk $({ wrk -v 2>&1 || true; } | head -1 | cut -d' ' -f2)"
else
    VERSIONS="AA=1: a second agent (same build, same flags) in nginx's place, etcd left out; every ratio should be ~1.00"
fi
cat <<EOF

=== discovery reads: one service, 10 instances (native body $NATIVE_BYTES bytes, Consul ?passing body $CONSUL_BYTES bytes) ===
$(machine_info)
$VERSIONS
method: servers on CPU $SERVER_CPU only (muster --http-threads 1 via taskset -apc; nginx 1 worker; etcd GOMAXPROCS 1), each of a pair loaded
        at the same time by its own wrk -t1 -c$CONNS -d${DURATION}s pinned to CPU $WRK_CPU; $ROUNDS rounds, fresh servers each round
        (start order alternating), ${WARMUP}s warm-up each; figures are medians over rounds, ratios are medians of per-round ratios
response headers (native/Consul): muster ${M_HDR%/} bytes, $REF ${R_HDR%/} bytes
load average (1/5/15 min) at the start $LOAD_START, at the end $(cut -d' ' -f1-3 /proc/loadavg): other work on the machine
EOF

python3 - "$WORK/res" "$ROUNDS" "$LAT_ROUNDS" "$REF" "$WITH_ETCD" "$LAT_LOAD" "$LAT_DURATION" "$CONNS" "${LAT_RATE[native]}" "${LAT_RATE[consul]}" <<'PY'
import glob, json, statistics, sys

d, n, ln, ref, with_etcd, lat_load, lat_secs, conns, rate_native, rate_consul = sys.argv[1:11]
lat_rate = {"native": int(rate_native), "consul": int(rate_consul)}
n, ln = int(n), int(ln)
med = statistics.median
load = lambda f: json.load(open(f))
R = lambda pair, who, i: load(f"{d}/{pair}-{who}-{i}.json")
verdict = lambda ok: "met" if ok else "MISSED"
aa = ref != "nginx"

pairs = [("native", ref), ("consul", ref)] + ([("etcd", "etcd 3.4")] if with_etcd else [])
print()
print("max req/s, the two servers of a pair sharing the server CPU (medians over rounds)")
print(f"{'pair':<7} {'server':<9} {'req/s':>9} {'p99 ms':>8} {'CPU us/req':>11} {'CPU share':>10}")
for pair, name in pairs:
    for who, label in (("muster", "muster"), ("ref", name)):
        rs = [R(pair, who, i) for i in range(1, n + 1)]
        share = [R(pair, who, i)["ok_rps"] * R(pair, who, i)["cpu_us_per_req"] / 1e4 for i in range(1, n + 1)]
        print(f"{pair:<7} {label:<9} {med(r['ok_rps'] for r in rs):>9.0f} {med(r['p99_ms'] for r in rs):>8.3f} "
              f"{med(r['cpu_us_per_req'] for r in rs):>11.1f} {med(share):>9.0f}%")

print()
print("muster / reference (median of per-round ratios; CPU per request as reference / muster)")
for pair, name in pairs:
    rps = [R(pair, "muster", i)["ok_rps"] / R(pair, "ref", i)["ok_rps"] for i in range(1, n + 1)]
    cpu = [R(pair, "ref", i)["cpu_us_per_req"] / R(pair, "muster", i)["cpu_us_per_req"] for i in range(1, n + 1)]
    busy = [sum(R(pair, w, i)["ok_rps"] * R(pair, w, i)["cpu_us_per_req"] for w in ("muster", "ref")) / 1e4
            for i in range(1, n + 1)]
    target = ""
    if not aa and pair == "native":
        target = f"   (target >= 0.7: {verdict(med(rps) >= 0.7)})"
    elif pair == "etcd":
        target = f"   (target >= 5: {verdict(med(rps) >= 5)})"
    print(f"  {pair:<7} vs {name:<9} req/s {med(rps):6.3f}, CPU/request {med(cpu):6.3f}, server CPU busy {med(busy):3.0f}%{target}")
    print(f"          per round req/s  {' '.join('%.3f' % x for x in rps)}")
    print(f"          per round CPU    {' '.join('%.3f' % x for x in cpu)}")

print()
print(f"latency at a fixed rate: {lat_load} x muster's median req/s above (bench/lua/rate.lua, wrk -t1 -c{conns} -d{lat_secs}s),")
print(f"one server at a time on the server CPU, {ln} rounds (fresh servers, which runs first alternating), medians over rounds")
print(f"{'api':<7} {'server':<9} {'rate/s':>8} {'achieved':>9} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'CPU us/req':>11}   per-round p99 ms")
p99 = {}
for api in ("native", "consul"):
    for who, label in (("muster", "muster"), ("ref", ref)):
        rs = [load(f"{d}/lat-{api}-{who}-{i}.json") for i in range(1, ln + 1)]
        p99[api, who] = med(r["p99_ms"] for r in rs)
        print(f"{api:<7} {label:<9} {lat_rate[api]:>8} {med(r['ok_rps'] for r in rs):>9.0f} "
              f"{med(r['p50_ms'] for r in rs):>8.3f} {p99[api, who]:>8.3f} {med(r['max_ms'] for r in rs):>8.3f} "
              f"{med(r['cpu_us_per_req'] for r in rs):>11.1f}   {' / '.join('%.3f' % r['p99_ms'] for r in rs)}")
for api in ("native", "consul"):
    line = f"muster p99 {api:<7} {p99[api, 'muster']:.3f} ms against {ref}'s {p99[api, 'ref']:.3f} ms at the same rate"
    if api == "native" and not aa:
        line += f"   (target < 2 ms: {verdict(p99[api, 'muster'] < 2)})"
    print(line)

bad = sum(load(f)["non2xx"] + load(f)["socket_errors"] for f in glob.glob(f"{d}/*.json"))
print(f"failed requests (non-2xx or socket errors, all counted runs): {bad}")
PY
cat <<EOF
muster RSS (round $ROUNDS): $((RSS0 / 1024)) MiB before the load, $((RSS1 / 1024)) MiB after $M_REQS requests, $((RSS2 / 1024)) MiB after a /metrics scrape
/metrics scrape: ${SCRAPE_MS} ms the first time after the load, ${SCRAPE2_MS} ms the next
EOF
