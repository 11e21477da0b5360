#!/usr/bin/env bash
# DNS: muster answering 1,000 services of 5 instances each (A and SRV questions mixed)
# against NSD serving the same records as a static zone, in the same run, on this machine.
# What is compared is one server core, as in bench/discovery.sh: muster (--http-threads 1;
# started under taskset, so it runs one DNS UDP worker, as many as the CPUs it may use) and NSD
# (server-count 1, started under taskset) run on CPU 0 (SERVER_CPU) only; dnsperf is pinned
# to CPU 1 (WRK_CPU), and so are this script's own helpers (dig, python).
# Server CPU per query: the server's user+system CPU time (with its children: NSD's server and
# xfrd processes) over a run, from /proc/PID/stat (bench/driver.py usage), divided by the
# queries completed in it.
# "its CPU" is queries/s x CPU per query: the share of the server CPU the server kept
# busy; well below 100% means something else shared that core (or the load set the pace).
# Each server is loaded ALONE, dnsperf flat out (-c 8 -q 200) for throughput, CPU per query
# and lost queries. ROUNDS rounds; each starts a fresh muster (registered anew) and NSD (muster
# first in odd rounds, last in even ones: a process draws a speed at start that it keeps, see
# bench/discovery.sh), checks them (same answers, every thread pinned) and warms each up
# (WARMUP seconds, not counted); then a DURATION-second run of each, one right after the other,
# muster first in odd rounds and NSD first in even ones. Figures are medians over rounds; the
# ratios, queries/s muster / NSD and CPU per query NSD / muster (above 1 means muster spends
# less), are medians of the per-round ratios. Then, on the last round's servers, one run each
# at a fixed RATE with per-query output, for latency percentiles.
#
#   ROUNDS=10 DURATION=5 RATE=20000 bench/dns.sh
#
# Defaults take about 3.5 minutes. Writes the result table (a "## DNS" section for BENCHMARKS.md)
# to bench/out/dns.md and stdout.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ROUNDS=${ROUNDS:-10}
DURATION=${DURATION:-5}
WARMUP=${WARMUP:-1}
RATE=${RATE:-20000}
LAT_DURATION=${LAT_DURATION:-10}
SERVICES=${SERVICES:-1000}
PER=${PER:-5}
OUT=${OUT:-$BENCH_DIR/out/dns.md}
SERVER_CPU=${SERVER_CPU:-0}
WRK_CPU=${WRK_CPU:-1}
mkdir -p "$(dirname "$OUT")"

(($(nproc) >= 2)) || die "needs two CPUs (the servers on one, dnsperf on the other)"
need_python
need curl curl
need dig dnsutils
need dnsperf dnsperf
need nsd nsd
need taskset util-linux
build_muster
MACHINE=$(machine_info)
# This script's own helpers (dig, python) and dnsperf run on the load CPU, not on the server
# CPU; the servers it starts are pinned to the server CPU.
taskset -pc "$WRK_CPU" $$ >/dev/null

log "writing the records of $SERVICES services x $PER instances as an NSD zone, and the queries"
python3 - "$SERVICES" "$PER" "$WORK" <<'PY'
import random, sys
services, per, work = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]

def ip(s, i):
    n = s * per + i
    return f"10.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}"

# The zone NSD serves: what muster answers for the same questions.
with open(f"{work}/muster.zone", "w") as z:
    z.write("$ORIGIN muster.\n$TTL 0\n")
    z.write("@ IN SOA ns.muster. hostmaster.muster. 1 3600 600 86400 0\n")
    z.write("@ IN NS bench.node.dc1.muster.\nbench.node.dc1 IN A 127.0.0.1\n")
    for s in range(services):
        for i in range(per):
            a = ip(s, i)
            hexa = "".join(f"{int(o):02x}" for o in a.split("."))
            z.write(f"s{s}.service IN A {a}\n")
            z.write(f"_s{s}._tcp.service IN SRV 1 1 {8000 + i} {hexa}.addr.dc1.muster.\n")
            z.write(f"{hexa}.addr.dc1 IN A {a}\n")

rng = random.Random(1)
with open(f"{work}/queries.txt", "w") as q:
    for _ in range(100_000):
        s = rng.randrange(services)
        if rng.random() < 0.5:
            q.write(f"s{s}.service.muster A\n")
        else:
            q.write(f"_s{s}._tcp.service.muster SRV\n")
PY

# register HTTP_PORT: the same records into an agent, each instance with its own address.
register() {
    python3 - "$1" "$SERVICES" "$PER" <<'PY'
import concurrent.futures, json, sys, urllib.request
port, services, per = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])

def ip(s, i):
    n = s * per + i
    return f"10.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}"

def put(job):
    s, i = job
    body = json.dumps({"address": ip(s, i), "port": 8000 + i, "ttl": "1h"}).encode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/v1/services/s{s}/instances/i{i}",
        data=body, method="PUT", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.status in (200, 201), r.status

with concurrent.futures.ThreadPoolExecutor(32) as ex:
    list(ex.map(put, [(s, i) for s in range(services) for i in range(per)]))
PY
}

# start_agent R: a fresh --dev agent started pinned to the server CPU (one HTTP thread, one DNS
# UDP worker), holding the records; sets MDNS and MUSTER_PID.
start_agent() {
    local hport
    hport=$(pick_port)
    MDNS=$(pick_port)
    # Not start_muster: that picks a DNS port of its own, and this run needs to know it.
    spawn "muster-$1" taskset -c "$SERVER_CPU" "$MUSTER_BIN" agent --http-addr "127.0.0.1:$hport" \
        --dns-addr "127.0.0.1:$MDNS" --log warn --dev --disable-self-preservation --http-threads 1
    MUSTER_PID=$SPAWNED_PID
    wait_http "http://127.0.0.1:$hport/readyz" 30
    register "$hport"
}

# start_nsd R: a fresh NSD (one server process) started pinned to the server CPU, serving the
# zone; sets NDNS and NSD_PID.
start_nsd() {
    local dir=$WORK/nsd-$1
    NDNS=$(pick_port)
    mkdir -p "$dir"
    cat >"$dir/nsd.conf" <<EOF
server:
    ip-address: 127.0.0.1
    port: $NDNS
    server-count: 1
    reuseport: yes
    username: ""
    chroot: ""
    zonesdir: "$WORK"
    database: ""
    pidfile: "$dir/nsd.pid"
    xfrdfile: "$dir/xfrd.state"
    zonelistfile: "$dir/zone.list"
    logfile: "$dir/nsd.log"
    verbosity: 0
    hide-version: yes
remote-control:
    control-enable: no
zone:
    name: muster
    zonefile: muster.zone
EOF
    nsd-checkconf "$dir/nsd.conf" || die "bad nsd.conf"
    spawn "nsd-$1" taskset -c "$SERVER_CPU" nsd -d -c "$dir/nsd.conf"
    NSD_PID=$SPAWNED_PID
}

# check_servers: both give the same answers (PER of them), every thread of both pinned.
check_servers() {
    local q m n
    for _ in $(seq 100); do
        dig @127.0.0.1 -p "$NDNS" +short +tries=1 +time=1 muster SOA 2>/dev/null | grep -q hostmaster && break
        sleep 0.1
    done
    for q in "s7.service.muster A" "_s7._tcp.service.muster SRV"; do
        # shellcheck disable=SC2086
        m=$(dig @127.0.0.1 -p "$MDNS" +short $q | sort)
        # shellcheck disable=SC2086
        n=$(dig @127.0.0.1 -p "$NDNS" +short $q | sort)
        [[ -n "$m" && "$m" == "$n" ]] || die "muster and NSD differ for $q: [$m] vs [$n]"
        [[ $(wc -l <<<"$m") == "$PER" ]] || die "expected $PER answers for $q, got [$m]"
    done
    check_pinned "$MUSTER_PID"
    check_pinned "$NSD_PID"
}

# run_perf NAME PORT PID SECONDS OUT: one flat-out dnsperf run, its figures in OUT as JSON
# (ok_rps: queries/s; requests: queries completed; lost; avg_latency_us) with PID's CPU per
# query added, as run_wrk does (cpu_us_per_req).
run_perf() {
    local name=$1 port=$2 pid=$3 secs=$4 out=$5 u0 u1
    u0=$(python3 "$DRIVER" usage "$pid")
    timeout $((secs + 30)) dnsperf -s 127.0.0.1 -p "$port" -d "$WORK/queries.txt" \
        -l "$secs" -c 8 -q 200 -t 2 >"$out.txt" 2>&1 || die "dnsperf failed: $(tail -5 "$out.txt")"
    u1=$(python3 "$DRIVER" usage "$pid")
    python3 - "$out.txt" >"$out" <<'PY'
import json, re, sys
t = open(sys.argv[1]).read()
def f(p):
    m = re.search(p, t)
    if not m:
        sys.exit(f"dnsperf printed no {p!r}: {t[-300:]}")
    return float(m.group(1))
print(json.dumps({"ok_rps": f(r"Queries per second:\s+([\d.]+)"), "requests": int(f(r"Queries completed:\s+(\d+)")),
                  "lost": int(f(r"Queries lost:\s+(\d+)")), "avg_latency_us": round(f(r"Average Latency \(s\):\s+([\d.]+)") * 1e6, 1)}))
PY
    # shellcheck disable=SC2086 # u0/u1 are "cpu_seconds write_bytes"
    python3 "$DRIVER" annotate "$out" $u0 $u1
}

alone() {
    case $1 in
        muster) run_perf muster "$MDNS" "$MUSTER_PID" "$DURATION" "$WORK/res/muster-$r.json" ;;
        nsd) run_perf nsd "$NDNS" "$NSD_PID" "$DURATION" "$WORK/res/nsd-$r.json" ;;
    esac
    log "round $r $1: $(cat "$WORK/res/$1-$r.json")"
}

# run_latency NAME PORT: dnsperf at $RATE q/s with per-query output; "name p50 p99 p999 lost".
run_latency() {
    local name=$1 port=$2 out="$WORK/lat-$1.txt"
    timeout $((LAT_DURATION + 30)) dnsperf -s 127.0.0.1 -p "$port" -d "$WORK/queries.txt" \
        -l "$LAT_DURATION" -c 8 -Q "$RATE" -t 2 -v >"$out" 2>&1 || die "dnsperf -v failed"
    python3 - "$out" "$name" >>"$WORK/latency.tsv" <<'PY'
import re, sys
lat = []
for line in open(sys.argv[1]):
    if line.startswith("> "):
        try:
            lat.append(float(line.split()[-1]))
        except ValueError:
            pass
lat.sort()
t = open(sys.argv[1]).read()
lost = re.search(r"Queries lost:\s+(\d+)", t)
def pct(p):
    return lat[min(len(lat) - 1, int(len(lat) * p))] * 1e6 if lat else float("nan")
print(sys.argv[2], f"{pct(0.5):.0f}", f"{pct(0.99):.0f}", f"{pct(0.999):.0f}",
      lost.group(1) if lost else "nan", len(lat), sep="\t")
PY
    log "latency $name at $RATE q/s: $(tail -1 "$WORK/latency.tsv")"
}

mkdir -p "$WORK/res"
: >"$WORK/latency.tsv"
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
for r in $(seq "$ROUNDS"); do
    if ((r % 2)); then
        start_agent "$r"
        start_nsd "$r"
    else
        start_nsd "$r"
        start_agent "$r"
    fi
    check_servers
    if [[ -z "${SRV_ADDITIONAL:-}" ]]; then
        SRV_ADDITIONAL=$(dig @127.0.0.1 -p "$MDNS" _s7._tcp.service.muster SRV | grep -c 'IN	A' || true)
        log "muster SRV answer carries $SRV_ADDITIONAL additional A records"
    fi
    run_perf muster "$MDNS" "$MUSTER_PID" "$WARMUP" "$WORK/warmup.json"
    run_perf nsd "$NDNS" "$NSD_PID" "$WARMUP" "$WORK/warmup.json"
    if ((r % 2)); then
        alone muster
        alone nsd
    else
        alone nsd
        alone muster
    fi
    check_pinned "$MUSTER_PID"
    check_pinned "$NSD_PID"
    if ((r < ROUNDS)); then
        stop "$MUSTER_PID"
        stop "$NSD_PID"
    fi
done
run_latency muster "$MDNS"
run_latency nsd "$NDNS"
MUSTER_RSS=$(rss_kb "$MUSTER_PID")
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)
R_QPS=$(round_ratio "$WORK/res" muster nsd)
R_CPU=$(round_ratio "$WORK/res" muster nsd cpu)
PER_ROUND=$(ratio_rounds "$WORK/res" muster nsd muster NSD)

python3 - "$WORK/res" "$WORK/latency.tsv" "$OUT" "$ROUNDS" "$DURATION" "$RATE" \
    "$SERVICES" "$PER" "$MUSTER_RSS" "$MACHINE" "$(nsd -v 2>&1 | head -1)" \
    "$(dnsperf -h 2>&1 | grep -m1 Version)" "$SERVER_CPU" "$WRK_CPU" "$WARMUP" "$LAT_DURATION" \
    "$R_QPS" "$R_CPU" "$PER_ROUND" "$LOAD_START" "$LOAD_END" <<'PY'
import json, statistics, sys
(d, lat, out, rounds, dur, rate, services, per, rss, machine, nsdv, perfv, scpu, wcpu, warm,
 lat_dur, r_qps, r_cpu, per_round, load0, load1) = sys.argv[1:22]
n = int(rounds)
R = {name: [json.load(open(f"{d}/{name}-{i}.json")) for i in range(1, n + 1)] for name in ("muster", "nsd")}
med = lambda name, k: statistics.median(r[k] for r in R[name])
tot = lambda name, k: sum(r[k] for r in R[name])
busy = lambda name: statistics.median(r["ok_rps"] * r["cpu_us_per_req"] / 1e4 for r in R[name])
lats = {l.split("\t")[0]: l.rstrip("\n").split("\t") for l in open(lat) if l.strip()}
lines = [
    "## DNS",
    "",
    "`bench/dns.sh`: queries/s, server CPU per query, lost queries and latency of muster's DNS against NSD.",
    "",
    f"One server core: muster (one DNS UDP worker, --http-threads 1) and NSD ({nsdv.strip()}, server-count 1) "
    f"on CPU {scpu} only, each loaded alone by dnsperf ({perfv.strip()}) -c 8 -q 200 pinned to CPU {wcpu}; "
    f"{dur} s per run, {rounds} rounds, a fresh muster and NSD each round (start order alternating), {warm} s warm-up each, "
    "which server runs first alternating; figures are medians over rounds, ratios medians of per-round ratios. "
    f"{services} services x {per} instances, questions half A, half SRV (5 SRV + 5 additional A), "
    "random over all services; NSD serves the same records as a static zone.",
    f"Machine: {machine.strip().replace(chr(10), '; ')}. Load average (1/5/15 min) at the start {load0}, at the end {load1}.",
    "",
    "| server | queries/s (median) | CPU µs/query (median) | its CPU | lost (all rounds) | completed (all rounds) | avg latency | "
    f"p50 at {rate} q/s | p99 at {rate} q/s | p99.9 at {rate} q/s |",
    "|---|---|---|---|---|---|---|---|---|---|",
]
for name, label in (("muster", "muster"), ("nsd", "NSD")):
    l = lats.get(name, [name, "nan", "nan", "nan"])
    lines.append(
        f"| {label} | {med(name, 'ok_rps'):,.0f} | {med(name, 'cpu_us_per_req'):.1f} | {busy(name):.0f}% | {tot(name, 'lost')} | "
        f"{tot(name, 'requests'):,} | {med(name, 'avg_latency_us'):.0f} µs | {l[1]} µs | {l[2]} µs | {l[3]} µs |")
ok = float(r_qps) >= 0.75
lines += ["", f"muster / NSD queries/s: **{float(r_qps):.2f}x** (target: at least 0.75x: {'met' if ok else 'MISSED'}); "
          f"CPU per query NSD / muster: **{float(r_cpu):.2f}** (above 1: muster spends less). "
          f"Latency: one {lat_dur} s run each at {rate} q/s on the last round's servers. "
          f"muster resident memory after the runs: {int(rss) / 1024:.0f} MiB.",
          "", "Per round:", "", "```", per_round, "```"]
text = "\n".join(lines) + "\n"
open(out, "w").write(text)
print(text)
PY
log "written to $OUT"
