#!/usr/bin/env bash
# Health checks: 10,000 instances, each with one check run by the agent (4,000 HTTP, 4,000
# TCP, 2,000 gRPC grpc.health.v1), all at a 10 s interval and 2 s timeout, against a local
# target (crates/server/examples/check_target.rs) that answers all three on 127.0.0.1 and
# records when every probe arrived. The instances are registered as fast as the agent takes
# them (a burst, in shuffled order), in a --dev agent. After a warm-up (one interval plus the
# one second a new check may wait for its first run), a window of 60 s:
#   - agent CPU: utime+stime from /proc/PID/stat over the window, as % of one core, and per
#     check run; also per second, to show whether it comes in bursts
#   - spread: probe arrivals at the target per second (and per 100 ms) over the window:
#     expected 1,000/s; min, max, p99, max/mean (a burst shows as a high max/mean)
#   - runs: muster_checks_run_total over the window / 10,000 (about 6 per check); for HTTP
#     and gRPC checks, which name themselves to the target (?i=N, service cN), runs per
#     check and the time between a check's runs (10 s if on schedule)
#   - timeouts: unreachable results over the window (a run that exceeded its timeout is
#     one); check durations from muster_check_duration_seconds
#   - agent RSS and open files; TIME_WAIT sockets on the machine
# Then every check's last result, through GET /api/v1/services/{s}/checks.
#
#   CHECKS_HTTP=4000 CHECKS_TCP=4000 CHECKS_GRPC=2000 WINDOW=60 bench/checks.sh
#
# The target: built with `cargo build --release -p muster-server --example check_target`
# (unless BENCH_NO_BUILD=1), or CHECK_TARGET_BIN. All figures also go to bench/out/checks.json.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

CHECKS_HTTP=${CHECKS_HTTP:-4000}
CHECKS_TCP=${CHECKS_TCP:-4000}
CHECKS_GRPC=${CHECKS_GRPC:-2000}
PER_SERVICE=${PER_SERVICE:-100}
INTERVAL=${INTERVAL:-10}
TIMEOUT=${TIMEOUT:-2}
WINDOW=${WINDOW:-60}
WARMUP=${WARMUP:-$((INTERVAL + 2))}
JSON_OUT=${JSON_OUT:-$BENCH_DIR/out/checks.json}
CHECK_TARGET_BIN=${CHECK_TARGET_BIN:-$TARGET_DIR/release/examples/check_target}
TOTAL=$((CHECKS_HTTP + CHECKS_TCP + CHECKS_GRPC))
mkdir -p "$(dirname "$JSON_OUT")"

need_python
need curl curl
build_muster
if [[ -z "${BENCH_NO_BUILD:-}" ]]; then
    log "cargo build --release -p muster-server --example check_target"
    (cd "$REPO_DIR" && cargo build --release -p muster-server --example check_target --quiet)
fi
[[ -x "$CHECK_TARGET_BIN" ]] || die "no check target at $CHECK_TARGET_BIN (cargo build --release -p muster-server --example check_target)"
cp "$CHECK_TARGET_BIN" "$WORK/check_target"

# The agent opens a socket per probe; the first runs of all checks fall within about a second.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

spawn target "$WORK/check_target" --out "$WORK/arrivals.txt"
TARGET_PID=$SPAWNED_PID
for _ in $(seq 100); do
    grep -q '^ports ' "$WORK/target.log" 2>/dev/null && break
    sleep 0.05
done
read -r _ H T G < <(grep -m1 '^ports ' "$WORK/target.log") || die "the check target printed no ports: $(cat "$WORK/target.log")"
TH=${H#http=} TT=${T#tcp=} TG=${G#grpc=}
wait_http "http://127.0.0.1:$TH/health" 10
log "check target: http $TH, tcp $TT, grpc $TG (pid $TARGET_PID)"

MPORT=$(pick_port)
start_muster muster "$MPORT" --dev
log "agent on $MPORT (pid $MUSTER_PID), RSS $(rss_kb "$MUSTER_PID") KiB"

# --- register, warm up, measure --------------------------------------------------------------
log "registering $TOTAL instances with one check each ($CHECKS_HTTP HTTP, $CHECKS_TCP TCP, $CHECKS_GRPC gRPC), ${INTERVAL}s interval, ${TIMEOUT}s timeout; then ${WARMUP}s warm-up and a ${WINDOW}s window"
timeout $((WARMUP + WINDOW + 150)) python3 - "$MPORT" "$MUSTER_PID" "$TH" "$TT" "$TG" "$TARGET_PID" \
    "$CHECKS_HTTP" "$CHECKS_TCP" "$CHECKS_GRPC" "$PER_SERVICE" "$INTERVAL" "$TIMEOUT" "$WARMUP" "$WINDOW" \
    >"$WORK/measure.json" <<'PY'
import asyncio, http.client, json, os, random, sys, time
from concurrent.futures import ThreadPoolExecutor

(port, pid, th, tt, tg, tpid, n_http, n_tcp, n_grpc, per, interval, timeout, warmup,
 window) = map(int, sys.argv[1:])
TOTAL = n_http + n_tcp + n_grpc
TCK = os.sysconf("SC_CLK_TCK")


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def get(p, path, timeout=30):
    c = http.client.HTTPConnection("127.0.0.1", p, timeout=timeout)
    try:
        c.request("GET", path)
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def mark():
    """The target's clock (µs) now, with the local monotonic time (s) it corresponds to."""
    t0 = time.monotonic()
    _, body = get(th, "/mark")
    t1 = time.monotonic()
    return int(body), (t0 + t1) / 2


def ticks(p):
    with open(f"/proc/{p}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def status_kb(p, key):
    with open(f"/proc/{p}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def machine_busy():
    """(busy, total) jiffies of the whole machine."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]
    return sum(v[:8]) - idle, sum(v[:8])


def time_wait():
    n = 0
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(name) as f:
                next(f)
                n += sum(1 for line in f if line.split()[3] == "06")
        except OSError:
            pass
    return n


def scrape():
    """muster_check* series from /metrics: {(name, frozenset(labels)): value}."""
    _, body = get(port, "/metrics")
    out = {}
    for line in body.decode().splitlines():
        if not line.startswith("muster_check"):
            continue
        series, _, value = line.rpartition(" ")
        name, _, labels = series.partition("{")
        lab = {}
        for kv in labels.rstrip("}").split(","):
            if "=" in kv:
                k, _, v = kv.partition("=")
                lab[k] = v.strip('"')
        out[(name, tuple(sorted(lab.items())))] = float(value)
    return out


def total(m, name, **want):
    return sum(v for (n, lab), v in m.items()
               if n == name and all(dict(lab).get(k) == w for k, w in want.items()))


def delta(m1, m0, name, **want):
    return total(m1, name, **want) - total(m0, name, **want)


def durations(m1, m0, kind):
    """Runs, mean, p50/p99 (bucket upper bounds) and runs over 1 s, from the histogram."""
    buckets = {}
    for (n, lab), v in m1.items():
        d = dict(lab)
        if n == "muster_check_duration_seconds_bucket" and d.get("kind") == kind:
            le = float("inf") if d["le"] == "+Inf" else float(d["le"])
            buckets[le] = v - m0.get((n, lab), 0.0)
    count = delta(m1, m0, "muster_check_duration_seconds_count", kind=kind)
    total_s = delta(m1, m0, "muster_check_duration_seconds_sum", kind=kind)
    les = sorted(buckets)

    def q(p):
        for le in les:
            if count and buckets[le] >= p * count:
                return le
        return None

    over1 = count - buckets.get(1.0, count)
    return {"runs": int(count), "mean_ms": round(total_s / count * 1e3, 2) if count else None,
            "p50_le_s": q(0.50), "p99_le_s": q(0.99), "max_le_s": q(1.0), "over_1s": int(over1)}


# --- register ---------------------------------------------------------------------------------
def check_of(n):
    if n < n_http:
        return "http", n // per, {"http": f"http://127.0.0.1:{th}/health?i={n}"}
    if n < n_http + n_tcp:
        return "tcp", (n - n_http) // per, {"tcp": f"127.0.0.1:{tt}"}
    return "grpc", (n - n_http - n_tcp) // per, {"grpc": f"127.0.0.1:{tg}", "grpc_service": f"c{n}"}


def request_bytes(n):
    kind, svc, check = check_of(n)
    check.update(interval=f"{interval}s", timeout=f"{timeout}s")
    body = json.dumps({"address": "127.0.0.1", "port": {"http": th, "tcp": tt, "grpc": tg}[kind],
                       "checks": [check]}).encode()
    return (b"PUT /api/v1/services/chk-%s-%d/instances/i-%d HTTP/1.1\r\nHost: bench\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (kind.encode(), svc, n, len(body), body))


async def read_response(reader):
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    body = await reader.readexactly(length) if length else b""
    return int(head[9:12]), body


registered_at = {}  # check number -> local monotonic time the registration was acknowledged
statuses = {}


async def register_all(order):
    it = iter(order)

    async def worker():
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for n in it:
                writer.write(request_bytes(n))
                await writer.drain()
                st, body = await read_response(reader)
                registered_at[n] = time.monotonic()
                statuses[st] = statuses.get(st, 0) + 1
                if st not in (200, 201):
                    log(f"registration {n} answered {st}: {body[:200]!r}")
        finally:
            writer.close()

    await asyncio.gather(*(worker() for _ in range(16)))


order = list(range(TOTAL))
random.Random(1).shuffle(order)
m_pre = scrape()
rss_before = status_kb(pid, "VmRSS")
mark_reg = mark()
t_reg0 = time.monotonic()
asyncio.run(register_all(order))
t_reg1 = time.monotonic()
ok = statuses.get(200, 0) + statuses.get(201, 0)
log(f"registered {ok}/{TOTAL} in {t_reg1 - t_reg0:.2f} s ({ok / (t_reg1 - t_reg0):.0f}/s); statuses {statuses}")
if ok != TOTAL:
    sys.exit(f"only {ok} of {TOTAL} registrations succeeded: {statuses}")

deadline = time.monotonic() + 30
while total(scrape(), "muster_checks_active") < TOTAL:
    if time.monotonic() > deadline:
        sys.exit(f"muster_checks_active stayed below {TOTAL}")
    time.sleep(0.2)
active_after = time.monotonic() - t_reg1
time.sleep(max(0.0, t_reg1 + warmup - time.monotonic()))

# --- the window -------------------------------------------------------------------------------
m0 = scrape()
mark0 = mark()
a0, tg0, mb0, w0 = ticks(pid), ticks(tpid), machine_busy(), time.monotonic()
load0 = os.getloadavg()
per_sec_cpu = []
prev = a0
for i in range(window):
    time.sleep(max(0.0, w0 + i + 1 - time.monotonic()))
    now = ticks(pid)
    per_sec_cpu.append(round((now - prev) / TCK * 100, 1))
    prev = now
a1, tg1, mb1, w1 = ticks(pid), ticks(tpid), machine_busy(), time.monotonic()
mark1 = mark()
m1 = scrape()
load1 = os.getloadavg()
secs = w1 - w0
rss = status_kb(pid, "VmRSS")
hwm = status_kb(pid, "VmHWM")
threads = status_kb(pid, "Threads")
fds = len(os.listdir(f"/proc/{pid}/fd"))
tw = time_wait()

runs = delta(m1, m0, "muster_checks_run_total")
by_kind = {k: int(delta(m1, m0, "muster_checks_run_total", kind=k)) for k in ("http", "tcp", "grpc")}
results = {r: int(delta(m1, m0, "muster_checks_run_total", result=r))
           for r in ("passing", "warning", "critical", "unreachable")}
warm_results = {r: int(delta(m0, m_pre, "muster_checks_run_total", result=r))
                for r in ("passing", "warning", "critical", "unreachable")}
agent_cpu_s = (a1 - a0) / TCK

# --- every check's last result ----------------------------------------------------------------
services = ([f"chk-http-{i}" for i in range((n_http + per - 1) // per)]
            + [f"chk-tcp-{i}" for i in range((n_tcp + per - 1) // per)]
            + [f"chk-grpc-{i}" for i in range((n_grpc + per - 1) // per)])
now_wall = time.time()
seen, status_count, never, timed_out, ages, outputs = 0, {}, 0, 0, [], {}


def fetch(s):
    st, body = get(port, f"/api/v1/services/{s}/checks")
    if st != 200:
        raise SystemExit(f"GET /api/v1/services/{s}/checks answered {st}")
    return json.loads(body)["checks"]


def parse_rfc3339(s):
    # 2026-11-24T12:00:00.123Z
    from datetime import datetime
    return datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()


with ThreadPoolExecutor(4) as ex:
    for checks in ex.map(fetch, services):
        for c in checks:
            seen += 1
            status_count[c["status"]] = status_count.get(c["status"], 0) + 1
            if c.get("last_run") is None:
                never += 1
            else:
                ages.append(now_wall - parse_rfc3339(c["last_run"]))
            out = c.get("output") or ""
            if "timed out" in out:
                timed_out += 1
            if c["status"] != "passing" and len(outputs) < 5:
                outputs[f"{c['service']}/{c['instance']}"] = out[:200]

print(json.dumps({
    "total": TOTAL, "http": n_http, "tcp": n_tcp, "grpc": n_grpc, "interval_s": interval,
    "timeout_s": timeout, "warmup_s": warmup,
    "register": {"seconds": round(t_reg1 - t_reg0, 2), "per_second": round(TOTAL / (t_reg1 - t_reg0)),
                 "active_after_s": round(active_after, 2)},
    "registered_at_target_us": {str(n): round(mark_reg[0] + (t - mark_reg[1]) * 1e6)
                                for n, t in registered_at.items()},
    "window": {"seconds": round(secs, 2), "mark0_us": mark0[0], "mark1_us": mark1[0]},
    "agent_cpu_s": round(agent_cpu_s, 2),
    "agent_cpu_pct": round(agent_cpu_s / secs * 100, 2),
    "agent_cpu_us_per_run": round(agent_cpu_s * 1e6 / runs, 1) if runs else None,
    "agent_cpu_pct_per_second": per_sec_cpu,
    "target_cpu_pct": round((tg1 - tg0) / TCK / secs * 100, 2),
    "machine_busy_pct_of_2": round((mb1[0] - mb0[0]) / max(1, mb1[1] - mb0[1]) * 100, 1),
    "loadavg": [round(x, 2) for x in load0[:1] + load1[:1]],
    "runs": int(runs), "runs_per_check": round(runs / TOTAL, 3), "runs_by_kind": by_kind,
    "results": results, "warmup_results": warm_results,
    "durations": {k: durations(m1, m0, k) for k in ("http", "tcp", "grpc")},
    "active": total(m1, "muster_checks_active"),
    "rss_before_kb": rss_before, "rss_kb": rss, "hwm_kb": hwm, "threads": threads, "fds": fds, "time_wait": tw,
    "states": {"seen": seen, "by_status": status_count, "never_run": never, "timed_out": timed_out,
               "max_age_s": round(max(ages), 2) if ages else None, "examples": outputs},
}))
PY
log "window done: $(python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print("agent CPU %s%% of a core, %s runs per check" % (r["agent_cpu_pct"], r["runs_per_check"]))' "$WORK/measure.json")"
AGENT_SHA=$(sha256sum "$MUSTER_BIN" | cut -c1-16)
stop "$MUSTER_PID"
stop "$TARGET_PID"
[[ -s "$WORK/arrivals.txt" ]] || die "the check target wrote no arrivals"

# --- arrivals at the target, and the report ---------------------------------------------------
python3 - "$WORK/measure.json" "$WORK/arrivals.txt" "$JSON_OUT" "$(machine_info | tr '\n' ';')" \
    "$(git -C "$REPO_DIR" rev-parse --short HEAD 2>/dev/null || echo unknown)" "$AGENT_SHA" <<'PY'
import json, statistics, sys

m = json.load(open(sys.argv[1]))
machine = [x for x in sys.argv[4].split(";") if x]
commit, sha = sys.argv[5], sys.argv[6]
interval_us = m["interval_s"] * 1_000_000
t0, t1 = m["window"]["mark0_us"], m["window"]["mark1_us"]
nsec = int((t1 - t0) // 1_000_000)
end = t0 + nsec * 1_000_000

arr = []  # (t_us, kind, id or None)
with open(sys.argv[2]) as f:
    next(f)
    for line in f:
        t, kind, i = line.split()
        arr.append((int(t), kind, None if i == "-" else int(i)))
arr.sort()


def pct(values, p):
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(round(p / 100.0 * len(s) + 0.5)) - 1))
    return s[k]


def spread(width_us, kind=None):
    n = int((end - t0) // width_us)
    bins = [0] * n
    for t, k, _ in arr:
        if t0 <= t < end and (kind is None or k == kind):
            bins[int((t - t0) // width_us)] += 1
    mean = sum(bins) / n
    return {"bins": n, "mean": round(mean, 1), "min": min(bins), "max": max(bins),
            "p99": pct(bins, 99), "p1": pct(bins, 1), "stdev": round(statistics.pstdev(bins), 1),
            "max_over_mean": round(max(bins) / mean, 3) if mean else None,
            "min_over_mean": round(min(bins) / mean, 3) if mean else None,
            "counts": bins if width_us == 1_000_000 else None}


expected_per_s = m["total"] / m["interval_s"]
per_second = spread(1_000_000)
per_100ms = spread(100_000)
per_kind = {k: spread(1_000_000, k) for k in ("http", "tcp", "grpc")}
in_window = sum(1 for t, _, _ in arr if t0 <= t < end)

# Checks that name themselves: runs in the window, gaps between runs, first run after
# registration.
by_id = {}
for t, k, i in arr:
    if i is not None:
        by_id.setdefault(i, []).append(t)
named = [n for n in range(m["total"]) if n < m["http"] or n >= m["http"] + m["tcp"]]
runs_in_window = [sum(1 for t in by_id.get(n, []) if t0 <= t < end) for n in named]
hist = {}
for c in runs_in_window:
    hist[c] = hist.get(c, 0) + 1
gaps = []
for n in named:
    ts = [t for t in by_id.get(n, []) if t0 - interval_us <= t < end]
    gaps += [(b - a) / 1e3 for a, b in zip(ts, ts[1:])]
late = [g - interval_us / 1e3 for g in gaps]
reg = m.pop("registered_at_target_us")
first = sorted((by_id[n][0] - reg[str(n)]) / 1e3 for n in named if n in by_id and str(n) in reg)
# The second run: the random phase the check keeps from then on.
phase_gap = sorted((by_id[n][1] - by_id[n][0]) / 1e3 for n in named if len(by_id.get(n, [])) > 1)
phase_hist = [0] * (m["interval_s"] + 1)
for g in phase_gap:
    phase_hist[min(m["interval_s"], int(g // 1000))] += 1
at_1s = sum(1 for g in phase_gap if 990 <= g < 1010)
# Start-up: arrivals per second from the first registration to the window.
reg_t0 = min(reg.values())
startup_bins = [0] * max(1, int((t0 - reg_t0) // 1_000_000))
for t, _, _ in arr:
    if reg_t0 <= t < reg_t0 + len(startup_bins) * 1_000_000:
        startup_bins[int((t - reg_t0) // 1_000_000)] += 1

r = dict(m)
r.update({
    "commit": commit, "agent_sha256": sha, "machine": machine,
    "expected_per_s": expected_per_s, "arrivals_in_window": in_window,
    "per_second": per_second, "per_100ms": per_100ms, "per_kind": per_kind,
    "named_checks": len(named), "runs_in_window_hist": {str(k): v for k, v in sorted(hist.items())},
    "gap_ms": {"n": len(gaps), "p50_late": round(pct(late, 50), 1) if late else None,
               "p99_late": round(pct(late, 99), 1) if late else None,
               "max_late": round(max(late), 1) if late else None,
               "min_late": round(min(late), 1) if late else None},
    "first_run_ms": {"n": len(first), "p50": round(pct(first, 50)), "p99": round(pct(first, 99)),
                     "max": round(first[-1])} if first else None,
    "second_run_gap_hist_s": phase_hist, "second_run_at_1s": at_1s,
    "startup_per_second": startup_bins,
})
with open(sys.argv[3], "w") as f:
    json.dump(r, f, indent=1)

ps, p100 = per_second, per_100ms
d = m["durations"]
st = m["states"]
res = m["results"]


def dur(k):
    x = d[k]
    if not x["runs"]:
        return "     0 runs"
    return (f"{x['runs']:>6} runs  mean {x['mean_ms']} ms  p50 <= {x['p50_le_s'] * 1e3:g} ms  "
            f"p99 <= {x['p99_le_s'] * 1e3:g} ms  max <= {x['max_le_s'] * 1e3:g} ms  over 1 s: {x['over_1s']}")


print()
print(f"=== health checks: {m['total']:,} checks ({m['http']:,} HTTP, {m['tcp']:,} TCP, {m['grpc']:,} gRPC), "
      f"{m['interval_s']} s interval, {m['timeout_s']} s timeout, --dev agent ===")
for line in machine:
    print(line)
print(f"commit {commit}, agent binary sha256 {sha}")
print(f"registration        {m['total']:,} in {m['register']['seconds']} s ({m['register']['per_second']:,}/s, 16 connections, "
      f"shuffled); all {int(m['active']):,} checks active {m['register']['active_after_s']} s after the last")
if r["first_run_ms"]:
    print(f"first run           after registration: p50 {r['first_run_ms']['p50']} ms, p99 {r['first_run_ms']['p99']} ms, "
          f"max {r['first_run_ms']['max']} ms (HTTP and gRPC checks)")
print(f"start-up            arrivals per second from the first registration: {' '.join(map(str, startup_bins))}")
print(f"window              {m['window']['seconds']} s, after a {m['warmup_s']} s warm-up; load average {m['loadavg'][0]} -> {m['loadavg'][1]}, "
      f"machine {m['machine_busy_pct_of_2']}% busy (both cores)")
print(f"agent CPU           {m['agent_cpu_pct']}% of one core ({m['agent_cpu_s']} s CPU in {m['window']['seconds']} s), "
      f"{m['agent_cpu_us_per_run']} us per check run")
cpu = m["agent_cpu_pct_per_second"]
print(f"  per second        min {min(cpu)}%, median {statistics.median(cpu)}%, max {max(cpu)}%  (10 ms ticks)")
print(f"target CPU          {m['target_cpu_pct']}% of one core (one thread)")
print(f"spread, per second  expected {expected_per_s:g}/s; mean {ps['mean']}, min {ps['min']}, max {ps['max']}, "
      f"p99 {ps['p99']}, stdev {ps['stdev']}; max/mean {ps['max_over_mean']}, min/mean {ps['min_over_mean']}")
print(f"  per 100 ms        mean {p100['mean']}, min {p100['min']}, max {p100['max']}, p99 {p100['p99']}; max/mean {p100['max_over_mean']}")
for k in ("http", "tcp", "grpc"):
    x = per_kind[k]
    if not x["mean"]:
        continue
    print(f"  {k:<5} per second  mean {x['mean']}, min {x['min']}, max {x['max']}, max/mean {x['max_over_mean']}")
print(f"  per-second counts {' '.join(map(str, ps['counts']))}")
print(f"second run          gap after the first run, by whole seconds 0..{m['interval_s']}: "
      f"{' '.join(map(str, phase_hist))}; within 10 ms of 1 s: {at_1s} of {len(phase_gap)} "
      f"(uniform phases would put {len(phase_gap) * 0.02 / m['interval_s']:.0f} there)")
print(f"runs                {m['runs']:,} in the window = {m['runs_per_check']} per check (expected {nsec / m['interval_s']:g}); "
      f"arrivals at the target {in_window:,}; by kind {m['runs_by_kind']}")
print(f"  runs per check    HTTP+gRPC checks ({len(named):,}), runs in the window -> checks: {r['runs_in_window_hist']}")
g = r["gap_ms"]
print(f"  between runs      {g['n']:,} gaps: interval + p50 {g['p50_late']} ms, p99 {g['p99_late']} ms, max {g['max_late']} ms, min {g['min_late']} ms")
print(f"results             {res}  (warm-up: {m['warmup_results']})")
print(f"timeouts            unreachable in the window: {res['unreachable']}; checks whose last output says timed out: {st['timed_out']}")
for k in ("http", "tcp", "grpc"):
    print(f"  {k:<5} duration   {dur(k)}")
print(f"last results        {st['seen']:,} checks: {st['by_status']}; never run {st['never_run']}; oldest last_run {st['max_age_s']} s ago")
for name, out in st["examples"].items():
    print(f"  not passing       {name}: {out}")
print(f"agent memory        RSS {m['rss_kb'] / 1024:.1f} MiB (peak {m['hwm_kb'] / 1024:.1f} MiB; {m['rss_before_kb'] / 1024:.1f} MiB before registering, "
      f"so {(m['rss_kb'] - m['rss_before_kb']) / m['total']:.1f} KiB per instance with its check), {m['threads']} threads, {m['fds']} open files")
print(f"TIME_WAIT sockets   {m['time_wait']:,} on the machine at the end of the window")
PY
