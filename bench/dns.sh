#!/usr/bin/env bash
# DNS: muster answering 1,000 services of 5 instances each (A and SRV questions mixed)
# against NSD serving the same records as a static zone, in the same run, on this machine.
# dnsperf flat out for throughput and lost queries, then at a fixed rate with per-query
# output for latency percentiles. Rounds are interleaved; medians are reported.
#
#   ROUNDS=3 DURATION=10 RATE=20000 bench/dns.sh
#
# Writes the result table (a "## DNS" section for BENCHMARKS.md) to bench/out/dns.md and stdout.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
RATE=${RATE:-20000}
SERVICES=${SERVICES:-1000}
PER=${PER:-5}
OUT=${OUT:-$BENCH_DIR/out/dns.md}
mkdir -p "$(dirname "$OUT")"

need_python
need curl curl
need dig dnsutils
need dnsperf dnsperf
need nsd nsd
build_muster

HPORT=$(pick_port)
MDNS=$(pick_port)
NDNS=$(pick_port)

log "starting muster (--dev): http $HPORT, dns $MDNS"
# Not start_muster: that picks a DNS port of its own, and this run needs to know it.
spawn muster "$MUSTER_BIN" agent --http-addr "127.0.0.1:$HPORT" --dns-addr "127.0.0.1:$MDNS" \
    --log warn --dev --disable-self-preservation
MUSTER_PID=$SPAWNED_PID
wait_http "http://127.0.0.1:$HPORT/readyz" 30

log "registering $SERVICES services x $PER instances; writing the same records as an NSD zone"
python3 - "$HPORT" "$SERVICES" "$PER" "$WORK" <<'PY'
import concurrent.futures, json, random, sys, urllib.request
port, services, per, work = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]

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

mkdir -p "$WORK/nsd"
cat >"$WORK/nsd/nsd.conf" <<EOF
server:
    ip-address: 127.0.0.1
    port: $NDNS
    server-count: 2
    reuseport: yes
    username: ""
    chroot: ""
    zonesdir: "$WORK"
    database: ""
    pidfile: "$WORK/nsd/nsd.pid"
    xfrdfile: "$WORK/nsd/xfrd.state"
    zonelistfile: "$WORK/nsd/zone.list"
    logfile: "$WORK/nsd/nsd.log"
    verbosity: 0
    hide-version: yes
remote-control:
    control-enable: no
zone:
    name: muster
    zonefile: muster.zone
EOF
nsd-checkconf "$WORK/nsd/nsd.conf" || die "bad nsd.conf"
log "starting NSD on $NDNS"
spawn nsd nsd -d -c "$WORK/nsd/nsd.conf"
NSD_PID=$SPAWNED_PID
for _ in $(seq 100); do
    dig @127.0.0.1 -p "$NDNS" +short +tries=1 +time=1 muster SOA 2>/dev/null | grep -q hostmaster && break
    sleep 0.1
done

# Both must give the same answers before they are compared.
for q in "s7.service.muster A" "_s7._tcp.service.muster SRV"; do
    # shellcheck disable=SC2086
    m=$(dig @127.0.0.1 -p "$MDNS" +short $q | sort)
    # shellcheck disable=SC2086
    n=$(dig @127.0.0.1 -p "$NDNS" +short $q | sort)
    [[ -n "$m" && "$m" == "$n" ]] || die "muster and NSD differ for $q: [$m] vs [$n]"
    [[ $(wc -l <<<"$m") == "$PER" ]] || die "expected $PER answers for $q, got [$m]"
done
m=$(dig @127.0.0.1 -p "$MDNS" _s7._tcp.service.muster SRV | grep -c 'IN	A' || true)
log "muster SRV answer carries $m additional A records"

# run_perf NAME PORT ROUND: one flat-out dnsperf run; appends "name qps lost completed avg".
run_perf() {
    local name=$1 port=$2 round=$3 out="$WORK/perf-$1-$3.txt"
    timeout $((DURATION + 30)) dnsperf -s 127.0.0.1 -p "$port" -d "$WORK/queries.txt" \
        -l "$DURATION" -c 8 -q 200 -t 2 >"$out" 2>&1 || die "dnsperf failed: $(tail -5 "$out")"
    python3 - "$out" "$name" "$round" >>"$WORK/perf.tsv" <<'PY'
import re, sys
t = open(sys.argv[1]).read()
def f(p):
    m = re.search(p, t)
    return m.group(1) if m else "nan"
print(sys.argv[2], sys.argv[3], f(r"Queries per second:\s+([\d.]+)"),
      f(r"Queries lost:\s+(\d+)"), f(r"Queries completed:\s+(\d+)"),
      f(r"Average Latency \(s\):\s+([\d.]+)"), sep="\t")
PY
    log "round $round $name: $(tail -1 "$WORK/perf.tsv")"
}

# run_latency NAME PORT: dnsperf at $RATE q/s with per-query output; "name p50 p99 p999 lost".
run_latency() {
    local name=$1 port=$2 out="$WORK/lat-$1.txt"
    timeout $((DURATION + 30)) dnsperf -s 127.0.0.1 -p "$port" -d "$WORK/queries.txt" \
        -l "$DURATION" -c 8 -Q "$RATE" -t 2 -v >"$out" 2>&1 || die "dnsperf -v failed"
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

: >"$WORK/perf.tsv"
: >"$WORK/latency.tsv"
for r in $(seq "$ROUNDS"); do
    run_perf muster "$MDNS" "$r"
    run_perf nsd "$NDNS" "$r"
done
run_latency muster "$MDNS"
run_latency nsd "$NDNS"
MUSTER_RSS=$(rss_kb "$MUSTER_PID")

python3 - "$WORK/perf.tsv" "$WORK/latency.tsv" "$OUT" "$ROUNDS" "$DURATION" "$RATE" \
    "$SERVICES" "$PER" "$MUSTER_RSS" "$(machine_info | tr '\n' ';')" "$(nsd -v 2>&1 | head -1)" \
    "$(dnsperf -h 2>&1 | grep -m1 Version)" <<'PY'
import statistics, sys
perf, lat, out, rounds, dur, rate, services, per, rss, machine, nsdv, perfv = sys.argv[1:13]
rows = [l.rstrip("\n").split("\t") for l in open(perf) if l.strip()]
def med(name, col):
    return statistics.median(float(r[col]) for r in rows if r[0] == name)
def tot(name, col):
    return sum(int(r[col]) for r in rows if r[0] == name)
lats = {l.split("\t")[0]: l.rstrip("\n").split("\t") for l in open(lat) if l.strip()}
mq, nq = med("muster", 2), med("nsd", 2)
lines = [
    "## DNS",
    "",
    "`bench/dns.sh`: queries/s, lost queries and latency of muster's DNS against NSD.",
    "",
    f"dnsperf ({perfv.strip()}) -c 8 -q 200, {dur} s per run, {rounds} rounds interleaved (medians); "
    f"{services} services x {per} instances, questions half A, half SRV (5 SRV + 5 additional A), "
    f"random over all services. NSD ({nsdv.strip()}, server-count 2) serves the same records as a static zone.",
    f"Machine: {machine.strip(';').replace(';', '; ')}. dnsperf runs on the same 2 cores.",
    "",
    "| server | queries/s (median) | lost (all rounds) | completed (all rounds) | avg latency | "
    f"p50 at {rate} q/s | p99 at {rate} q/s | p99.9 at {rate} q/s |",
    "|---|---|---|---|---|---|---|---|",
]
for name in ("muster", "nsd"):
    l = lats.get(name, [name, "nan", "nan", "nan"])
    lines.append(
        f"| {name} | {med(name, 2):,.0f} | {tot(name, 3)} | {tot(name, 4):,} | "
        f"{med(name, 5) * 1e6:.0f} µs | {l[1]} µs | {l[2]} µs | {l[3]} µs |")
lines += ["", f"muster / NSD queries/s: **{mq / nq:.2f}x** (target: at least 0.75x). "
          f"muster resident memory after the runs: {int(rss) / 1024:.0f} MiB."]
text = "\n".join(lines) + "\n"
open(out, "w").write(text)
print(text)
PY
log "written to $OUT"
