#!/usr/bin/env bash
# Parked watchers: 10,000 blocking queries (?index=N&wait=5m) and 1,000 SSE subscribers on one
# service of a durable agent, then one change (a registration in that service). For each
# watcher: time from sending the change request to the kernel's receive timestamp
# (SO_TIMESTAMPNS) of its answer or `change` event, so the driver's own event-loop delay is
# left out (the user-space figure is printed next to it). Three rounds: the blocking queries
# are parked again at their new index between rounds; the SSE streams stay open.
# Reference in the same run: a plain discovery read's round trip (median of 200) on the same
# agent while the watchers are parked.
# Memory per watcher: the agent's VmRSS before and after parking / number of watchers.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

BLOCKING=${BLOCKING:-10000}
SSE=${SSE:-1000}
ROUNDS=${ROUNDS:-3}
# Seconds the driver leaves the answers unread after the change (they are timed by their
# kernel receive timestamps either way). Reading them as they arrive (DEFER_READS=0) makes the
# Python driver compete with the agent for the two cores during the wake-up.
DEFER_READS=${DEFER_READS:-1}
SERVICE=watched

need_python
need curl curl
build_muster

# 11,000 client sockets here and as many in the agent.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
(( $(ulimit -n) >= BLOCKING + SSE + 1000 )) || die "ulimit -n is $(ulimit -n): too low for $((BLOCKING + SSE)) watchers"

MPORT=$(pick_port)
# The agent caps open connections (http.max_connections, 4,096 by default); every parked
# watcher holds one, so the cap is raised above what the script opens.
printf '[http]\nmax_connections = %d\n' $((BLOCKING + ${SSE:-0} + 100)) >"$WORK/agent.toml"
start_muster muster "$MPORT" --data-dir "$WORK/muster-data" --disable-self-preservation --config "$WORK/agent.toml"
for i in $(seq 0 9); do
    curl -fsS -o /dev/null -X PUT "http://127.0.0.1:$MPORT/api/v1/services/$SERVICE/instances/i-$i" \
        -H 'Content-Type: application/json' \
        -d "{\"address\":\"10.0.0.$((i + 1))\",\"port\":8080,\"tags\":[\"a\"],\"meta\":{\"k\":\"v\"},\"zone\":\"z1\",\"ttl\":\"10m\"}"
done
# Let the allocator settle after start-up before the "before" RSS is taken.
curl -fsS -o /dev/null "http://127.0.0.1:$MPORT/api/v1/services/$SERVICE"
sleep 1

log "parking $BLOCKING blocking queries and $SSE SSE subscribers"
timeout 170 python3 "$DRIVER" watchers --port "$MPORT" --pid "$MUSTER_PID" --service "$SERVICE" \
    --blocking "$BLOCKING" --sse "$SSE" --rounds "$ROUNDS" \
    --defer-reads "$DEFER_READS" \
    >"$WORK/watchers.json"

python3 - "$WORK/watchers.json" "$(machine_info | tr '\n' ';')" "$DEFER_READS" <<'EOF'
import json, statistics, sys
r = json.load(open(sys.argv[1]))
rounds = r["rounds"]
expected = r["blocking"] + r["sse"]
med = lambda k: statistics.median(x[k] for x in rounds)
print()
print(f"=== watchers: {r['blocking']} blocking queries + {r['sse']} SSE subscribers on one service ===")
for line in sys.argv[2].split(";"):
    if line:
        print(line)
print("latency: change request sent -> answer/event received (kernel receive timestamp); answers read " + (f"{sys.argv[-1]} s after the change, so the driver is idle during the wake-up" if float(sys.argv[-1]) > 0 else "as they arrive"))
print("round  received        p50 ms   p99 ms   max ms   blocking p99  SSE p99  user-space p99  change ack ms  agent CPU us/wake-up")
for x in rounds:
    print(f"{x['round']:>5}  {x['received']:>6}/{x['expected']:<6}  {x['p50_ms']:>7}  {x['p99_ms']:>7}  {x['max_ms']:>7}"
          f"  {x['blocking_p99_ms']:>12}  {x['sse_p99_ms']:>7}  {str(x['userspace_p99_ms'] or '-'):>14}  {x['change_ms']:>13}"
          f"  {x['agent_cpu_us_per_watcher']:>20}")
p99 = med("p99_ms")
all_in = all(x["received"] == expected for x in rounds)
ref = r["reference_read_ms"]
print(f"median p99          {p99} ms   (target < 100 ms: {'met' if p99 < 100 else 'MISSED'})")
print(f"median p50 / max    {med('p50_ms')} ms / {med('max_ms')} ms")
print(f"received            {'all' if all_in else 'NOT all'} {expected} in every round   (target: all: {'met' if all_in else 'MISSED'})")
print(f"reference           one discovery read with the watchers parked: {ref} ms median round trip;"
      f" p99 wake-up / read = {p99 / ref:.0f}x")
print(f"parking             {r['open_seconds']} s to open and park all {expected}")
print(f"agent RSS           {r['rss_before_kb'] / 1024:.1f} MiB before parking, {r['rss_after_kb'] / 1024:.1f} MiB parked"
      f" -> {r['kb_per_watcher']} KiB per parked watcher")
EOF
