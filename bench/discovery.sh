#!/usr/bin/env bash
# Discovery reads of one service with 10 instances (registered in a durable agent), against
# references serving the same answers:
#  1. muster's native GET /api/v1/services/disc against nginx serving the identical bytes as a
#     static file at the same path (one worker, keep-alive, no access log);
#  2. muster's Consul GET /v1/health/service/disc?passing against nginx serving that answer's
#     identical bytes at the same path;
#  3. muster's native read against etcd 3.4 reading the same 10 records by prefix through its
#     HTTP/JSON gateway (POST /v3/kv/range).
# What is compared is one server core: every server runs on CPU 0 (SERVER_CPU) only, the agent
# with --http-threads 1 (taskset -apc on all its threads), nginx with one worker, etcd started
# under taskset so Go sizes GOMAXPROCS to that one CPU; the load is one wrk -t1 -c32 pinned to
# CPU 1 (WRK_CPU), and this script's own helpers run on CPU 1 too.
#
# Default method, "alone, interleaved": each server has CPU 0 to itself while it is measured.
# ROUNDS rounds; each starts a fresh set of servers (muster first in odd rounds, last in even
# ones), checks them (same bytes, one nginx worker, every thread pinned) and warms each up
# (WARMUP seconds per server and read, not counted); idle servers stay up while another is
# loaded. Then short runs (DURATION seconds), the two servers of a comparison one right after
# the other, in ABBA order so that a drift of the machine counts against each side alike:
#     odd rounds:  etcd, muster native, nginx native, nginx Consul, muster Consul
#     even rounds: nginx native, muster native, etcd, muster Consul, nginx Consul
# Each round gives a ratio per comparison from its two adjacent runs (etcd's partner is the
# muster native run next to it): requests/s muster / reference, and server CPU per request
# reference / muster (above 1 means muster spends less). The figures are the medians of these
# per-round ratios. CPU per request is what the nginx target is about ("server CPU per request
# at most nginx's for the same bytes, which makes requests/s at least 1.0x nginx on one server
# core"); both ratios agree when the machine is quiet, and CPU per request moves much less
# than requests/s when it is not. Each run also records how much of CPU 0 went to anything but
# the measured server ("others", from /proc/stat: a few points either way while the server
# keeps CPU 0 busy, up to ~10 points low at the part-load rates of part 4), so a round
# disturbed by other work on the machine shows.
# Why fresh servers each round: a server process draws a speed at start that it keeps for its
# lifetime. In one run, the agents of four rounds out of twelve spent ~15% more per request than
# the others, on both reads alike (native 33-35 against 29-31 us), and so did nginx in four
# other rounds (20-22 against 16-18 us); an A/A check (AA=1) with one set of servers for the
# whole run gave CPU ratios of 1.03 and 1.08 instead of 1.00 (about the same offset every
# round), with a fresh set each round 0.99 on both reads. ONE_SET=1 keeps one set of servers
# for all the rounds (started and warmed up once), which is quicker but carries that offset.
# Why 12 rounds of 4 s: the per-round ratios scatter by about +-10% (the two draws above), so
# the median of 6 rounds moved by up to 10% between two runs minutes apart (native 0.612 and
# 0.556 on a quiet machine); with 12 rounds, two runs gave 0.579 and 0.588 (Consul 0.462 and
# 0.463). More, shorter rounds help more than longer runs: a run's own noise is small.
#
# PAIRED=1 is the method of bench/acl.sh: the two servers of a comparison are loaded AT THE
# SAME TIME, sharing CPU 0, each by its own wrk pinned to CPU 1, fresh servers each round (the
# first started alternating), ROUNDS=5 DURATION=8 by default. It is right for muster against
# muster (both suffer alike from sharing a core), not for muster against nginx, where the
# question is one core to itself: two processes switching on one core pollute each other's
# caches and branch predictors, and each pays for its neighbour's working set (at f312f6b a
# native read cost muster 32 us paired against 28-31 alone, nginx 18 against 15-19).
#
#  4. p99 latency at a fixed rate, paced by bench/lua/rate.lua (wrk -t1 -c32, CPU 1): muster
#     and nginx one after the other (a latency tail measured with another server on the CPU
#     would be the scheduler's), native then Consul, LAT_ROUNDS rounds, which of the two runs
#     first alternating; medians of p50/p99 over rounds. The rate is set from muster's CPU per
#     request, which moves less with the machine's noise than its requests/s:
#     LAT_LOAD (0.8) x 1e6 / (muster's median CPU us per request), at most muster's median
#     max requests/s, rounded down to a hundred. The default method uses its last round's
#     servers for it; PAIRED=1 starts fresh ones each latency round, as it did. With one
#     server at a time, a tail set by whatever else runs on CPU 0 (a build, say) is not
#     shared: of this script's figures the p99s move most from one run to the next.
# Targets: muster >= 0.7x nginx and >= 5x etcd (req/s); on one server core, CPU per request at
# most nginx's (the ratio >= 1.0); muster's native p99 < 2 ms.
# Defaults (ROUNDS=12, DURATION=4, WARMUP=1, LAT_ROUNDS=3, LAT_DURATION=5) take about 9 minutes.
# BUSY=1 runs parts 1-3 with a busy loop sharing the server CPU (see below).
# AA=1 checks the method: a second agent (same build and flags) stands in for nginx and etcd
# is left out, so every ratio should come out near 1.00.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

PAIRED=${PAIRED:-}
# FRESH: a fresh set of servers each round of the default method, unless ONE_SET=1.
FRESH=yes
[[ -z "${ONE_SET:-}" ]] || FRESH=

if [[ -n "$PAIRED" ]]; then
    ROUNDS=${ROUNDS:-5}
    DURATION=${DURATION:-8}
    WARMUP=${WARMUP:-1}
else
    ROUNDS=${ROUNDS:-12}
    DURATION=${DURATION:-4}
    WARMUP=${WARMUP:-1}
fi
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
MACHINE=$(machine_info)
# This script's own helpers (curl, python) run beside wrk, not on the server CPU; the servers
# it starts are pinned to the server CPU below.
taskset -pc "$WRK_CPU" $$ >/dev/null

NATIVE=/api/v1/services/$SERVICE
CONSUL="/v1/health/service/$SERVICE?passing"
GET=$BENCH_DIR/lua/get.lua
REF=nginx
[[ -z "$AA" ]] || REF=muster-b
mkdir -p "$WORK/res"

# --- the machine -----------------------------------------------------------------------------

# top_cpu: the three processes that used the most CPU over the next 2 s, and any wrk, cargo or
# rustc running (none of them this script's).
top_cpu() {
    python3 - <<'PY'
import os, time
def snap():
    d = {}
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            s = open(f"/proc/{p}/stat").read()
            f = s.rsplit(")", 1)[1].split()
            d[p] = (s[s.index("(") + 1:s.rindex(")")], int(f[11]) + int(f[12]))
        except (OSError, ValueError):
            pass
    return d
a = snap(); time.sleep(2); b = snap()
tck = os.sysconf("SC_CLK_TCK")
rows = sorted(((b[p][1] - a[p][1]) / tck / 2 * 100, p, b[p][0]) for p in b if p in a)[::-1][:3]
heavy = sorted({c for c, _ in b.values() if c in ("wrk", "cargo") or c.startswith("rustc")})
print(", ".join(f"{c} (pid {p}) {pct:.0f}%" for pct, p, c in rows) +
      f"; wrk/cargo/rustc running: {' '.join(heavy) if heavy else 'none'}")
PY
}

# cpu0_mark: the server CPU's busy time so far (clock ticks) and the time now.
cpu0_mark() {
    awk -v c="cpu$SERVER_CPU" '$1 == c {printf "%d ", $2 + $3 + $4 + $7 + $8 + $9}' /proc/stat
    date +%s.%N
}

# cpu0_note MARK0 MARK1 FILE...: adds to each wrk result the server CPU's busy seconds between
# the two marks (cpu0_busy_s, whoever ran on it) and the seconds between them (cpu0_window_s).
cpu0_note() {
    python3 - "$@" <<'PY'
import json, os, sys
b0, t0, b1, t1 = (float(x) for x in sys.argv[1:5])
for f in sys.argv[5:]:
    r = json.load(open(f))
    r["cpu0_busy_s"] = round((b1 - b0) / os.sysconf("SC_CLK_TCK"), 2)
    r["cpu0_window_s"] = round(t1 - t0, 2)
    json.dump(r, open(f, "w"))
PY
}

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

# start_servers NAME_SUFFIX WITH_ETCD: a fresh agent and reference (and etcd), the agent
# first when the suffix's number is odd and last when it is even; then the reference gets the
# agent's bytes and etcd its records, and everything is checked. Sets M_PORT/M_PID,
# REF_PORT/REF_PID and, with etcd, E_PORT/E_PID.
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

# pair NAME LUA_A URL_A PID_A LUA_B URL_B PID_B: (PAIRED=1) the two wrks at once, results in
# res/NAME-muster-$r.json and res/NAME-ref-$r.json.
pair() {
    local name=$1 wa wb c0
    c0=$(cpu0_mark)
    run_wrk "$WORK/res/$name-muster-$r.json" "$2" 1 "$CONNS" "$DURATION" "$3" "$4" &
    wa=$!
    run_wrk "$WORK/res/$name-ref-$r.json" "$5" 1 "$CONNS" "$DURATION" "$6" "$7" &
    wb=$!
    wait "$wa" || die "wrk against muster ($name) failed"
    wait "$wb" || die "wrk against the reference ($name) failed"
    # shellcheck disable=SC2086 # marks are "ticks time"
    cpu0_note $c0 $(cpu0_mark) "$WORK/res/$name-muster-$r.json" "$WORK/res/$name-ref-$r.json"
    log "round $r $name muster: $(cat "$WORK/res/$name-muster-$r.json")"
    log "round $r $name ref:    $(cat "$WORK/res/$name-ref-$r.json")"
}

# alone NAME WHO LUA URL PID: one server loaded alone, result in res/NAME-WHO-$r.json.
alone() {
    local f=$WORK/res/$1-$2-$r.json c0
    c0=$(cpu0_mark)
    run_wrk "$f" "$3" 1 "$CONNS" "$DURATION" "$4" "$5"
    # shellcheck disable=SC2086 # marks are "ticks time"
    cpu0_note $c0 $(cpu0_mark) "$f"
    log "round $r $1 $2: $(cat "$f")"
}

warm() { run_wrk "$WORK/warmup.json" "$1" 1 "$CONNS" "$WARMUP" "$2"; }
reqs() { python3 -c 'import json,sys; print(sum(json.load(open(f))["requests"] for f in sys.argv[1:]))' "$@"; }
scrape_ms() {
    curl -fsS -o /dev/null -w '%{time_total}' "http://127.0.0.1:$1/metrics" |
        python3 -c 'import sys; print(f"{float(sys.stdin.read())*1000:.0f}")'
}
# sizes MU RU: the body and header sizes, for the report.
sizes() {
    NATIVE_BYTES=$(curl -fsS -o /dev/null -w '%{size_download}' "$1$NATIVE")
    CONSUL_BYTES=$(curl -fsS -o /dev/null -w '%{size_download}' "$1$CONSUL")
    M_HDR=$(curl -fsS -o /dev/null -o /dev/null -w '%{size_header}/' "$1$NATIVE" "$1$CONSUL")
    R_HDR=$(curl -fsS -o /dev/null -o /dev/null -w '%{size_header}/' "$2$NATIVE" "$2$CONSUL")
}
# rss_after_load: the agent's memory after the load and after a /metrics scrape (whose time
# shows what the metrics recorder accumulated).
rss_after_load() {
    RSS1=$(rss_kb "$M_PID")
    SCRAPE_MS=$(scrape_ms "$M_PORT")
    SCRAPE2_MS=$(scrape_ms "$M_PORT")
    RSS2=$(rss_kb "$M_PID")
}

WITH_ETCD=yes
[[ -z "$AA" ]] || WITH_ETCD=
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
TOP_START=$(top_cpu)
log "top CPU users at the start: $TOP_START"

# BUSY=1: a machine getting busier. A busy loop of another process shares the server CPU with
# every server through parts 1-3 (stopped before part 4, whose rates assume the core to
# itself). Compare its ratios with a quiet run's: a server that degrades worse than nginx when
# it has to share its core shows as a lower ratio; the "others" rows show the loop's share.
HOG_PID=
if [[ -n "${BUSY:-}" ]]; then
    spawn busy-loop taskset -c "$SERVER_CPU" sh -c 'while :; do :; done'
    HOG_PID=$SPAWNED_PID
    log "BUSY: a busy loop (pid $HOG_PID) shares CPU $SERVER_CPU with the servers through parts 1-3"
fi

# --- 1-3. max req/s --------------------------------------------------------------------------

# up N: round N's servers (started in its order), warmed up and checked.
up() {
    start_servers "$1" "$WITH_ETCD"
    log "round $1: servers up"
    MU=http://127.0.0.1:$M_PORT RU=http://127.0.0.1:$REF_PORT EU=http://127.0.0.1:${E_PORT:-0}/v3/kv/range
    [[ -n "${NATIVE_BYTES:-}" ]] || sizes "$MU" "$RU"
    RSS0=$(rss_kb "$M_PID")
    for u in "$MU" "$RU"; do
        warm "$GET" "$u$NATIVE"
        warm "$GET" "$u$CONSUL"
    done
    [[ -z "$WITH_ETCD" ]] || warm "$BENCH_DIR/lua/etcd_range.lua" "$EU"
    check_pinned "$M_PID"
    check_pinned "$REF_PID"
    [[ -z "$WITH_ETCD" ]] || check_pinned "$E_PID"
}

if [[ -n "$PAIRED" ]]; then
    # The servers of a pair loaded at the same time, fresh servers each round.
    for r in $(seq "$ROUNDS"); do
        up "$r"
        pair native "$GET" "$MU$NATIVE" "$M_PID" "$GET" "$RU$NATIVE" "$REF_PID"
        pair consul "$GET" "$MU$CONSUL" "$M_PID" "$GET" "$RU$CONSUL" "$REF_PID"
        [[ -z "$WITH_ETCD" ]] ||
            pair etcd "$GET" "$MU$NATIVE" "$M_PID" "$BENCH_DIR/lua/etcd_range.lua" "$EU" "$E_PID"
        # The last round's memory is reported.
        M_REQS=$(reqs "$WORK"/res/*-muster-"$r".json)
        rss_after_load
        stop "$M_PID"
        stop "$REF_PID"
        [[ -z "$WITH_ETCD" ]] || stop "$E_PID"
    done
else
    # Each server loaded alone, the two of a comparison in adjacent runs, ABBA; a fresh set of
    # servers each round, the last round's kept for the latency runs (or, ONE_SET=1, one set
    # for all the rounds).
    run_etcd() { [[ -z "$WITH_ETCD" ]] || alone etcd ref "$BENCH_DIR/lua/etcd_range.lua" "$EU" "$E_PID"; }
    [[ -n "$FRESH" ]] || up 1
    for r in $(seq "$ROUNDS"); do
        [[ -z "$FRESH" ]] || up "$r"
        if ((r % 2)); then
            run_etcd
            alone native muster "$GET" "$MU$NATIVE" "$M_PID"
            alone native ref "$GET" "$RU$NATIVE" "$REF_PID"
            alone consul ref "$GET" "$RU$CONSUL" "$REF_PID"
            alone consul muster "$GET" "$MU$CONSUL" "$M_PID"
        else
            alone native ref "$GET" "$RU$NATIVE" "$REF_PID"
            alone native muster "$GET" "$MU$NATIVE" "$M_PID"
            run_etcd
            alone consul muster "$GET" "$MU$CONSUL" "$M_PID"
            alone consul ref "$GET" "$RU$CONSUL" "$REF_PID"
        fi
        # etcd's partner is the muster native run next to it.
        [[ -z "$WITH_ETCD" ]] || cp "$WORK/res/native-muster-$r.json" "$WORK/res/etcd-muster-$r.json"
        check_pinned "$M_PID"
        check_pinned "$REF_PID"
        check_same "$M_PORT" "$REF_PORT"
        if [[ -n "$FRESH" ]] && ((r < ROUNDS)); then
            stop "$M_PID"
            stop "$REF_PID"
            [[ -z "$WITH_ETCD" ]] || stop "$E_PID"
        fi
    done
    if [[ -n "$FRESH" ]]; then
        M_REQS=$(reqs "$WORK/res/native-muster-$ROUNDS.json" "$WORK/res/consul-muster-$ROUNDS.json")
    else
        M_REQS=$(reqs "$WORK"/res/native-muster-*.json "$WORK"/res/consul-muster-*.json)
    fi
    rss_after_load
fi

# --- 4. latency at a fixed rate, one server at a time ----------------------------------------

[[ -z "$HOG_PID" ]] || stop "$HOG_PID"

med() { python3 "$DRIVER" median "$1" "${@:2}" --digits "${DIGITS:-0}"; }
# rate_of API: LAT_LOAD x 1e6 / muster's median CPU us per request, at most its median req/s,
# rounded down to a hundred.
rate_of() {
    python3 -c "print(max(100, int(min($LAT_LOAD * 1e6 / $(DIGITS=2 med cpu_us_per_req "$WORK"/res/"$1"-muster-*.json), \
        $(med ok_rps "$WORK"/res/"$1"-muster-*.json)) // 100 * 100)))"
}
declare -A LAT_RATE=([native]=$(rate_of native) [consul]=$(rate_of consul))
declare -A LPATH=([native]=$NATIVE [consul]=$CONSUL)
log "latency at a fixed rate: native ${LAT_RATE[native]}/s, consul ${LAT_RATE[consul]}/s"
for l in $(seq "$LAT_ROUNDS"); do
    if [[ -n "$PAIRED" ]]; then
        start_servers "lat-$l" ""
        log "latency round $l: servers up"
    fi
    declare -A URL=([muster]=http://127.0.0.1:$M_PORT [ref]=http://127.0.0.1:$REF_PORT)
    declare -A PID=([muster]=$M_PID [ref]=$REF_PID)
    order=(muster ref)
    ((l % 2)) || order=(ref muster)
    if [[ -n "$PAIRED" ]]; then
        for who in "${order[@]}"; do
            warm "$GET" "${URL[$who]}$NATIVE"
            warm "$GET" "${URL[$who]}$CONSUL"
            check_pinned "${PID[$who]}"
        done
    fi
    for api in native consul; do
        for who in "${order[@]}"; do
            f=$WORK/res/lat-$api-$who-$l.json
            c0=$(cpu0_mark)
            RATE=${LAT_RATE[$api]} run_wrk "$f" "$BENCH_DIR/lua/rate.lua" 1 "$CONNS" \
                "$LAT_DURATION" "${URL[$who]}${LPATH[$api]}" "${PID[$who]}"
            # shellcheck disable=SC2086 # marks are "ticks time"
            cpu0_note $c0 $(cpu0_mark) "$f"
            log "latency round $l $api $who: $(cat "$f")"
        done
    done
    if [[ -n "$PAIRED" ]]; then
        stop "$M_PID"
        stop "$REF_PID"
    fi
done

# --- report ----------------------------------------------------------------------------------

TOP_END=$(top_cpu)
if [[ -z "$AA" ]]; then
    VERSIONS="$(nginx -v 2>&1 | sed 's/^nginx version: //'), etcd $(etcd --version | awk 'NR==1 {print $3}'), wrk $({ wrk -v 2>&1 || true; } | head -1 | cut -d' ' -f2)"
else
    VERSIONS="AA=1: a second agent (same build, same flags) in nginx's place, etcd left out; every ratio should be ~1.00"
fi
if [[ -n "$PAIRED" ]]; then
    METHOD="PAIRED=1: servers on CPU $SERVER_CPU only (muster --http-threads 1 via taskset -apc; nginx 1 worker; etcd GOMAXPROCS 1),
        the two of a pair loaded at the same time, sharing CPU $SERVER_CPU, each by its own wrk -t1 -c$CONNS -d${DURATION}s pinned to
        CPU $WRK_CPU; $ROUNDS rounds, fresh servers each round (start order alternating), ${WARMUP}s warm-up each"
else
    if [[ -n "$FRESH" ]]; then
        SETS="a fresh set of servers each round (start order alternating), ${WARMUP}s warm-up per server and read"
    else
        SETS="one set of servers, started once, ${WARMUP}s warm-up per server and read once"
    fi
    METHOD="alone, interleaved: servers on CPU $SERVER_CPU only (muster --http-threads 1 via taskset -apc; nginx 1 worker; etcd
        GOMAXPROCS 1), each loaded ALONE by wrk -t1 -c$CONNS -d${DURATION}s pinned to CPU $WRK_CPU;
        $SETS;
        $ROUNDS rounds, the two runs of a comparison adjacent, ABBA order (odd rounds: etcd, muster native,
        nginx native, nginx Consul, muster Consul; even rounds: the mirror)"
fi
cat <<EOF

=== discovery reads: one service, 10 instances (native body $NATIVE_BYTES bytes, Consul ?passing body $CONSUL_BYTES bytes) ===
$MACHINE
$VERSIONS
method: $METHOD
        figures are medians over rounds; ratios are medians of per-round ratios
response headers (native/Consul): muster ${M_HDR%/} bytes, $REF ${R_HDR%/} bytes
load average (1/5/15 min) at the start $LOAD_START, at the end $(cut -d' ' -f1-3 /proc/loadavg)
top CPU users (2 s sample) at the start: $TOP_START
                          at the end:   $TOP_END
EOF

python3 - "$WORK/res" "$ROUNDS" "$LAT_ROUNDS" "$REF" "$WITH_ETCD" "$LAT_LOAD" "$LAT_DURATION" "$CONNS" \
    "${LAT_RATE[native]}" "${LAT_RATE[consul]}" "${PAIRED:+paired}" <<'PY'
import glob, json, statistics, sys

d, n, ln, ref, with_etcd, lat_load, lat_secs, conns, rate_native, rate_consul, paired = sys.argv[1:12]
lat_rate = {"native": int(rate_native), "consul": int(rate_consul)}
n, ln = int(n), int(ln)
med = statistics.median
load = lambda f: json.load(open(f))
R = lambda pair, who, i: load(f"{d}/{pair}-{who}-{i}.json")
verdict = lambda ok: "met" if ok else "MISSED"
aa = ref != "nginx"
share = lambda r: r["ok_rps"] * r["cpu_us_per_req"] / 1e4  # the server's % of its CPU
# others: the % of the server CPU that went to anything but the measured server(s) of a run
others_of = lambda rs: (rs[0]["cpu0_busy_s"] - sum(r["server_cpu_s"] for r in rs)) / rs[0]["cpu0_window_s"] * 100

pairs = [("native", ref), ("consul", ref)] + ([("etcd", "etcd 3.4")] if with_etcd else [])
print()
if paired:
    print("max req/s, the two servers of a pair sharing the server CPU (medians over rounds)")
else:
    print("max req/s, each server alone on the server CPU (medians over rounds)")
print(f"{'read':<7} {'server':<9} {'req/s':>9} {'p99 ms':>8} {'CPU us/req':>11} {'its CPU':>8} {'others':>7}")
for pair, name in pairs:
    for who, label in (("muster", "muster"), ("ref", name)):
        if pair == "etcd" and who == "muster" and not paired:
            continue  # the native runs above
        rs = [R(pair, who, i) for i in range(1, n + 1)]
        # others: what else kept the server CPU busy during the run (in the paired method, the
        # other server of the pair is not counted as other)
        mates = [[R(pair, w, i) for w in ("muster", "ref")] if paired else [R(pair, who, i)] for i in range(1, n + 1)]
        others = [others_of(m) for m in mates]
        print(f"{pair:<7} {label:<9} {med(r['ok_rps'] for r in rs):>9.0f} {med(r['p99_ms'] for r in rs):>8.3f} "
              f"{med(r['cpu_us_per_req'] for r in rs):>11.1f} {med(share(r) for r in rs):>7.0f}% {med(others):>6.0f}%")

print()
print("muster / reference, per round and the median of the per-round ratios (CPU per request as reference / muster)")
for pair, name in pairs:
    rps = [R(pair, "muster", i)["ok_rps"] / R(pair, "ref", i)["ok_rps"] for i in range(1, n + 1)]
    cpu = [R(pair, "ref", i)["cpu_us_per_req"] / R(pair, "muster", i)["cpu_us_per_req"] for i in range(1, n + 1)]
    if paired:
        busy = [sum(share(R(pair, w, i)) for w in ("muster", "ref")) for i in range(1, n + 1)]
        extra = f", server CPU busy {med(busy):3.0f}%"
    else:
        extra = ""
    target = ""
    if aa:
        pass
    elif pair == "etcd":
        target = f"   (target >= 5: {verdict(med(rps) >= 5)})"
    elif paired and pair == "native":
        target = f"   (target >= 0.7: {verdict(med(rps) >= 0.7)})"
    elif not paired:
        target = (f"   (req/s >= 0.7: {verdict(med(rps) >= 0.7)}; one core, CPU/request >= 1.0: {verdict(med(cpu) >= 1.0)},"
                  f" req/s >= 1.0: {verdict(med(rps) >= 1.0)})")
    print(f"  {pair:<7} vs {name:<9} req/s {med(rps):6.3f}, CPU/request {med(cpu):6.3f}{extra}{target}")
    row = lambda label, vals: print(f"      {label:<22}" + "".join(f"{v:>7}" for v in vals))
    row("round", range(1, n + 1))
    row("ratio req/s", ["%.3f" % x for x in rps])
    row("ratio CPU/request", ["%.3f" % x for x in cpu])
    if not paired:
        for who, label in (("muster", "muster"), ("ref", name)):
            rs = [R(pair, who, i) for i in range(1, n + 1)]
            row(f"{label} req/s", ["%.0f" % r["ok_rps"] for r in rs])
            row(f"{label} CPU us/req", ["%.1f" % r["cpu_us_per_req"] for r in rs])
        row("others % (muster/ref)", ["%.0f/%.0f" % (others_of([R(pair, "muster", i)]), others_of([R(pair, "ref", i)]))
                                      for i in range(1, n + 1)])

print()
print(f"latency at a fixed rate: {lat_load} x 1e6 / muster's median CPU us per request above, at most its median req/s")
print(f"(bench/lua/rate.lua, wrk -t1 -c{conns} -d{lat_secs}s), one server at a time on the server CPU, {ln} rounds "
      f"({'fresh servers, ' if paired else ''}which runs first alternating), medians over rounds;")
print("an achieved rate below the set one means the server fell behind (others: what else used its CPU)")
print(f"{'read':<7} {'server':<9} {'rate/s':>8} {'achieved':>9} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'CPU us/req':>11} {'others':>7}   per-round p99 ms")
p99 = {}
for api in ("native", "consul"):
    for who, label in (("muster", "muster"), ("ref", ref)):
        rs = [load(f"{d}/lat-{api}-{who}-{i}.json") for i in range(1, ln + 1)]
        p99[api, who] = med(r["p99_ms"] for r in rs)
        print(f"{api:<7} {label:<9} {lat_rate[api]:>8} {med(r['ok_rps'] for r in rs):>9.0f} "
              f"{med(r['p50_ms'] for r in rs):>8.3f} {p99[api, who]:>8.3f} {med(r['max_ms'] for r in rs):>8.3f} "
              f"{med(r['cpu_us_per_req'] for r in rs):>11.1f} {med(others_of([r]) for r in rs):>6.0f}%   "
              f"{' / '.join('%.3f' % r['p99_ms'] for r in rs)}")
for api in ("native", "consul"):
    line = f"muster p99 {api:<7} {p99[api, 'muster']:.3f} ms against {ref}'s {p99[api, 'ref']:.3f} ms at the same rate"
    if api == "native" and not aa:
        line += f"   (target < 2 ms: {verdict(p99[api, 'muster'] < 2)})"
    print(line)

bad = sum(load(f)["non2xx"] + load(f)["socket_errors"] for f in glob.glob(f"{d}/*.json"))
print(f"failed requests (non-2xx or socket errors, all counted runs): {bad}")
PY
if [[ -n "$PAIRED$FRESH" ]]; then
    RSS_WHEN="round $ROUNDS's agent"
else
    RSS_WHEN="the agent"
fi
cat <<EOF
muster RSS ($RSS_WHEN): $((RSS0 / 1024)) MiB before the load, $((RSS1 / 1024)) MiB after $M_REQS requests, $((RSS2 / 1024)) MiB after a /metrics scrape
/metrics scrape: ${SCRAPE_MS} ms the first time after the load, ${SCRAPE2_MS} ms the next
EOF
