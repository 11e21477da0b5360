#!/usr/bin/env bash
# Scale: 100,000 instances over 10,000 services in a durable agent.
#  - the agent's RSS with them (reference: etcd 3.4 holding the same 100,000 records, same run)
#  - restart: SIGTERM, then time from exec until /readyz answers 200 AND a discovery read of
#    one service returns its 10 instances (reference: etcd restarted on its data, timed until
#    /health answers and a prefix range returns the same service's 10 keys)
#  - `cargo bench -p muster-core --bench lookup`, "healthy lookup", when that bench exists
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

INSTANCES=${INSTANCES:-100000}
SERVICES=${SERVICES:-10000}
PER_SERVICE=$((INSTANCES / SERVICES))
PROBE=scale-4242   # the service read after the restart

need_python
need_etcd
need curl curl
build_muster

MPORT=$(pick_port)
EPORT=$(pick_port)
EPEER=$(pick_port)
start_muster muster "$MPORT" --data-dir "$WORK/muster-data" --disable-self-preservation
start_etcd "$EPORT" "$EPEER"
RSS_EMPTY=$(rss_kb "$MUSTER_PID")
E_RSS_EMPTY=$(rss_kb "$ETCD_PID")

log "registering $INSTANCES instances over $SERVICES services"
timeout 150 python3 "$DRIVER" populate --port "$MPORT" --services "$SERVICES" \
    --instances "$INSTANCES" --prefix scale --conns 64 --depth 1 >"$WORK/populate.json"
log "muster: $(cat "$WORK/populate.json")"
log "putting the same $INSTANCES records into etcd"
timeout 150 python3 "$DRIVER" populate --etcd --port "$EPORT" --services "$SERVICES" \
    --instances "$INSTANCES" --prefix scale --conns 64 --depth 1 >"$WORK/populate-etcd.json"
log "etcd: $(cat "$WORK/populate-etcd.json")"

STATUS=$(curl -fsS "http://127.0.0.1:$MPORT/api/v1/status")
COUNT=$(python3 -c 'import json,sys; d=json.loads(sys.argv[1]); print(d["instances"], d["services"])' "$STATUS")
[[ "$COUNT" == "$INSTANCES $SERVICES" ]] || die "the agent holds $COUNT instances/services"
sleep 2
RSS_FULL=$(rss_kb "$MUSTER_PID")
E_RSS_FULL=$(rss_kb "$ETCD_PID")
DATA_BYTES=$(du -sb "$WORK/muster-data" | cut -f1)
E_DATA_BYTES=$(du -sb "$WORK/etcd-data" | cut -f1)

log "restarting muster"
stop "$MUSTER_PID"
timeout 90 python3 "$DRIVER" restart --port "$MPORT" --service "$PROBE" --expect "$PER_SERVICE" \
    --pidfile "$WORK/muster.pid" --log "$WORK/muster-restart.log" -- "${MUSTER_CMD[@]}" \
    >"$WORK/restart.json" || { [[ -s "$WORK/muster.pid" ]] && BENCH_PIDS+=("$(cat "$WORK/muster.pid")"); die "restart failed"; }
MUSTER_PID=$(cat "$WORK/muster.pid")
BENCH_PIDS+=("$MUSTER_PID")
sleep 2
RSS_RESTARTED=$(rss_kb "$MUSTER_PID")

log "restarting etcd"
stop "$ETCD_PID"
etcd_cmd "$EPORT" "$EPEER"
timeout 90 python3 "$DRIVER" restart --etcd --port "$EPORT" --service "$PROBE" --expect "$PER_SERVICE" \
    --pidfile "$WORK/etcd.pid" --log "$WORK/etcd-restart.log" -- "${ETCD_CMD[@]}" \
    >"$WORK/restart-etcd.json" || { [[ -s "$WORK/etcd.pid" ]] && BENCH_PIDS+=("$(cat "$WORK/etcd.pid")"); die "etcd restart failed"; }
ETCD_PID=$(cat "$WORK/etcd.pid")
BENCH_PIDS+=("$ETCD_PID")

j() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$1" "$2"; }
verdict() { python3 -c "print('met' if $1 else 'MISSED')"; }
mib() { python3 -c "print(f'{$1 / 1024:.1f}')"; }
M_READY=$(j "$WORK/restart.json" ready_seconds)
M_SERVE=$(j "$WORK/restart.json" serving_seconds)
E_SERVE=$(j "$WORK/restart-etcd.json" serving_seconds)

# The lookup micro-benchmark, when someone has written it.
LOOKUP_FILE="$REPO_DIR/crates/core/benches/lookup.rs"
if grep -q 'criterion_group\|criterion_main' "$LOOKUP_FILE" 2>/dev/null; then
    log "cargo bench -p muster-core --bench lookup"
    (cd "$REPO_DIR" && timeout 600 cargo bench -p muster-core --bench lookup) >"$WORK/lookup.txt" 2>&1 \
        || die "cargo bench failed: $(tail -5 "$WORK/lookup.txt")"
    # Every benchmark's estimate (the middle of criterion's [low estimate high]); the healthy
    # lookup is the one whose name mentions both "lookup" and "healthy".
    LOOKUP_LINE=$(python3 - "$WORK/lookup.txt" <<'EOF'
import re, sys
lines = open(sys.argv[1]).read().splitlines()
found = []
for i, line in enumerate(lines):
    m = re.search(r"time:\s+\[(\S+ \S+) (\S+ \S+) (\S+ \S+)\]", line)
    if m:
        name = line.split("time:")[0].strip() or lines[i - 1].strip()
        found.append((name, m.group(2), f"[{m.group(1)} .. {m.group(3)}]"))
out = []
for name, est, rng in found:
    if "lookup" in name.lower() and "healthy" in name.lower():
        v, unit = est.split()
        ns = float(v) * {"ps": 1e-3, "ns": 1, "µs": 1e3, "us": 1e3, "ms": 1e6, "s": 1e9}[unit]
        out.insert(0, f"healthy lookup      {est} {rng}  \"{name}\"   (target < 1 us: {'met' if ns < 1000 else 'MISSED'})")
    else:
        out.append(f"  other benchmark   {est} {rng}  \"{name}\"")
if not any(o.startswith("healthy lookup") for o in out):
    out.insert(0, "healthy lookup      not found in the bench output")
print("\n".join(out))
EOF
)
else
    LOOKUP_LINE="healthy lookup      skipped: crates/core/benches/lookup.rs is a stub (no criterion benchmark)"
fi

cat <<EOF

=== scale: $INSTANCES instances over $SERVICES services (durable) ===
$(machine_info)
registering         muster $(j "$WORK/populate.json" per_second)/s, etcd $(j "$WORK/populate-etcd.json" per_second)/s (64 keep-alive connections, no pipelining)
                        RSS empty   RSS loaded   on disk
muster              $(printf '%9s MiB  %7s MiB  %6s MiB' "$(mib "$RSS_EMPTY")" "$(mib "$RSS_FULL")" "$(mib $((DATA_BYTES / 1024)))")
etcd 3.4            $(printf '%9s MiB  %7s MiB  %6s MiB' "$(mib "$E_RSS_EMPTY")" "$(mib "$E_RSS_FULL")" "$(mib $((E_DATA_BYTES / 1024)))")
muster / etcd RSS   $(python3 -c "print(f'{$RSS_FULL / $E_RSS_FULL:.2f}')")
muster RSS loaded   $(mib "$RSS_FULL") MiB   (target < 200 MB: $(verdict "$RSS_FULL * 1024 < 200e6"))
muster RSS          $(mib "$RSS_RESTARTED") MiB right after the restart (same data)
restart to serving  muster $M_SERVE s (readyz $M_READY s), etcd $E_SERVE s (health $(j "$WORK/restart-etcd.json" ready_seconds) s)
muster / etcd       $(python3 -c "print(f'{$M_SERVE / $E_SERVE:.2f}')") (time; lower is better)
muster restart      $M_SERVE s   (target < 2 s: $(verdict "$M_SERVE < 2"))
$LOOKUP_LINE
EOF
