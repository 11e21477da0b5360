#!/usr/bin/env bash
# ACL checks on the read path: discovery reads (native GET /api/v1/services/{s} and Consul
# GET /v1/health/service/{s}?passing, 10 instances) from one agent with ACLs off and one with
# ACLs on (default deny, a token whose policy reads every service and node), same bytes, same
# token header sent to both. Both agents are pinned to CPU 0 and loaded at the same time, each
# by its own wrk (-t1 -c32, both pinned to CPU 1), so they share the server CPU and whatever
# else the machine does. Every round starts a fresh pair (which starts first alternates); the
# figure is the median of the per-round ratios on/off, of requests/s and of server CPU per
# request. ACL_AA=1 runs the same with ACLs off on both
# agents: the check of the method, whose ratios should be 1.
# Target (issue: access control): ACLs on >= 0.95x ACLs off.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ROUNDS=${ROUNDS:-8}
DURATION=${DURATION:-8}
SERVICE=disc
SERVER_CPU=${SERVER_CPU:-0}
export WRK_CPU=${WRK_CPU:-1}

need_python
need_wrk
need curl curl
build_muster

MGMT=$(python3 -c 'import uuid; print(uuid.uuid4())')
echo "$MGMT" >"$WORK/mgmt.token"
# ACL_AA=1 checks the method: both agents run with ACLs off, so the ratio should be 1.
ON_FLAGS=(--acl --acl-default-policy deny --acl-initial-management-file "$WORK/mgmt.token")
[[ -z "${ACL_AA:-}" ]] || ON_FLAGS=()

# start_agent off|on: a fresh agent (pinned to the server CPU) holding the 10 instances, and
# on the ACL agent the reading token; sets OFF/OFF_PID or ON/ON_PID, and ACL_TOKEN.
start_agent() {
    local t=$1 port pid
    port=$(pick_port)
    if [[ $t == off ]]; then
        start_muster "off-$r" "$port" --dev --disable-self-preservation --http-threads 1
    else
        start_muster "on-$r" "$port" --dev --disable-self-preservation --http-threads 1 ${ON_FLAGS[@]+"${ON_FLAGS[@]}"}
    fi
    pid=$MUSTER_PID
    taskset -apc "$SERVER_CPU" "$pid" >/dev/null
    for i in $(seq 0 9); do
        curl -fsS -o /dev/null -X PUT "http://127.0.0.1:$port/api/v1/services/$SERVICE/instances/i-$i" \
            -H 'Content-Type: application/json' -H "X-Consul-Token: $MGMT" \
            -d "{\"address\":\"10.0.0.$((i + 1))\",\"port\":8080,\"tags\":[\"a\"],\"meta\":{\"k\":\"v\"},\"zone\":\"z1\",\"ttl\":\"10m\"}"
    done
    if [[ $t == off ]]; then
        OFF=$port OFF_PID=$pid
        return
    fi
    ON=$port ON_PID=$pid
    [[ -z "${ACL_AA:-}" ]] || return 0
    curl -fsS -o /dev/null -X PUT "http://127.0.0.1:$ON/v1/acl/policy" -H "X-Consul-Token: $MGMT" \
        -d '{"Name":"read-all","Rules":"service_prefix \"\" {\n  policy = \"read\"\n}\nnode_prefix \"\" {\n  policy = \"read\"\n}"}'
    ACL_TOKEN=$(curl -fsS -X PUT "http://127.0.0.1:$ON/v1/acl/token" -H "X-Consul-Token: $MGMT" \
        -d '{"Description":"bench reader","Policies":[{"Name":"read-all"}]}' |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["SecretID"])')
    export ACL_TOKEN
}

# The same bytes from both, and the token is needed on the ACL agent.
check_pair() {
    local path a b code
    for path in "/api/v1/services/$SERVICE" "/v1/health/service/$SERVICE?passing"; do
        a=$(curl -fsS -H "X-Consul-Token: $ACL_TOKEN" "http://127.0.0.1:$OFF$path" | python3 -c 'import json,sys; d=json.load(sys.stdin); print(len(d["instances"]) if isinstance(d, dict) else len(d))')
        b=$(curl -fsS -H "X-Consul-Token: $ACL_TOKEN" "http://127.0.0.1:$ON$path" | python3 -c 'import json,sys; d=json.load(sys.stdin); print(len(d["instances"]) if isinstance(d, dict) else len(d))')
        [[ "$a" == 10 && "$b" == 10 ]] || die "$path: $a instances with ACLs off, $b with ACLs on"
        [[ -z "${ACL_AA:-}" ]] || continue
        code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$ON$path")
        [[ "$code" == 403 || "$(curl -fsS "http://127.0.0.1:$ON$path")" == *'"instances":[]'* || "$(curl -fsS "http://127.0.0.1:$ON$path")" == '[]' ]] \
            || die "$path: the anonymous token reads it on the ACL agent (HTTP $code)"
    done
}

ACL_TOKEN=none
mkdir -p "$WORK/res"
# Each round starts a fresh pair of agents, the first started alternating: a process can be
# a few percent faster than another of the same build for reasons of its own (where its
# memory landed, the order it started in), which would otherwise count for or against ACLs
# in every round. Both agents are then loaded at the same time, sharing the server CPU, each
# by its own wrk: whatever else the machine does in those seconds slows both alike, which
# measuring one after the other cannot promise on a shared machine.
for r in $(seq "$ROUNDS"); do
    first=off second=on
    (( r % 2 == 0 )) && first=on second=off
    start_agent $first
    start_agent $second
    check_pair
    # A warm-up of each agent on each path, not counted.
    for port in "$OFF" "$ON"; do
        for path in "/api/v1/services/$SERVICE" "/v1/health/service/$SERVICE?passing"; do
            run_wrk "$WORK/warmup.json" "$BENCH_DIR/lua/token_get.lua" 1 32 1 "http://127.0.0.1:$port$path"
        done
    done
    for api in native consul; do
        case $api in
            native) path="/api/v1/services/$SERVICE" ;;
            consul) path="/v1/health/service/$SERVICE?passing" ;;
        esac
        run_wrk "$WORK/res/$api-off-$r.json" "$BENCH_DIR/lua/token_get.lua" 1 32 "$DURATION" \
            "http://127.0.0.1:$OFF$path" "$OFF_PID" &
        w_off=$!
        run_wrk "$WORK/res/$api-on-$r.json" "$BENCH_DIR/lua/token_get.lua" 1 32 "$DURATION" \
            "http://127.0.0.1:$ON$path" "$ON_PID" &
        w_on=$!
        wait "$w_off" || die "wrk against the agent with ACLs off failed"
        wait "$w_on" || die "wrk against the agent with ACLs on failed"
        for t in off on; do
            log "round $r $api $t: $(cat "$WORK/res/$api-$t-$r.json")"
        done
    done
    stop "$OFF_PID"
    stop "$ON_PID"
done

med() { python3 "$DRIVER" median "$1" "${@:2}" --digits "${DIGITS:-0}"; }
ratio() {
    python3 -c '
import json, statistics, sys
d, api, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
rps = lambda t, i: json.load(open(f"{d}/{api}-{t}-{i}.json"))["ok_rps"]
print("%.3f" % statistics.median(rps("on", i) / rps("off", i) for i in range(1, n + 1)))' "$WORK/res" "$1" "$ROUNDS"
}
# How busy the two agents kept the server CPU, in percent (median over rounds): near 100
# means the agents, not wrk, set the pace.
busy() {
    python3 -c '
import json, statistics, sys
d, n = sys.argv[1], int(sys.argv[2])
def b(api, i):
    rs = [json.load(open(f"{d}/{api}-{t}-{i}.json")) for t in ("off", "on")]
    return sum(r["ok_rps"] * r["cpu_us_per_req"] for r in rs) / 1e4
print("native %.0f%%, consul %.0f%%" % tuple(statistics.median(b(api, i) for i in range(1, n + 1)) for api in ("native", "consul")))' "$WORK/res" "$ROUNDS"
}
# The per-round ratios, to show the spread behind the median.
rounds() {
    python3 -c '
import json, sys
d, api, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
rps = lambda t, i: json.load(open(f"{d}/{api}-{t}-{i}.json"))["ok_rps"]
print(" ".join("%.3f" % (rps("on", i) / rps("off", i)) for i in range(1, n + 1)))' "$WORK/res" "$1" "$ROUNDS"
}
BAD=$(python3 -c 'import json,sys; print(sum(json.load(open(f))["non2xx"]+json.load(open(f))["socket_errors"] for f in sys.argv[1:]))' "$WORK"/res/*.json)
verdict() { python3 -c "print('met' if $1 else 'MISSED')"; }
R_NATIVE=$(ratio native)
R_CONSUL=$(ratio consul)
cpu_ratio() {
    python3 -c '
import json, statistics, sys
d, api, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
cpu = lambda t, i: json.load(open(f"{d}/{api}-{t}-{i}.json"))["cpu_us_per_req"]
print("%.3f" % statistics.median(cpu("off", i) / cpu("on", i) for i in range(1, n + 1)))' "$WORK/res" "$1" "$ROUNDS"
}
C_NATIVE=$(cpu_ratio native)
C_CONSUL=$(cpu_ratio consul)
row() {
    local api=$1 t=$2
    DIGITS=0
    printf '%-7s %-4s %9s' "$api" "$t" "$(med ok_rps "$WORK"/res/"$api-$t"-*.json)"
    DIGITS=3
    printf '  %8s' "$(med p99_ms "$WORK"/res/"$api-$t"-*.json)"
    DIGITS=1
    printf '  %8s\n' "$(med cpu_us_per_req "$WORK"/res/"$api-$t"-*.json)"
}

cat <<EOF

=== ACL checks on discovery reads: one service, 10 instances ===
$(machine_info)
load: one wrk -t1 -c32 -d${DURATION}s per agent, both pinned to CPU $WRK_CPU; both agents (--http-threads 1) pinned
      to CPU $SERVER_CPU and loaded at the same time; $ROUNDS rounds, each with a fresh pair of agents (the
      first started alternating); X-Consul-Token sent to both${ACL_AA:+; ACL_AA=1: ACLs off on both (a check of the method)}
server CPU busy with the two agents: $(busy)
api     acls     req/s    p99 ms   server CPU us/req
$(row native off)
$(row native on)
$(row consul off)
$(row consul on)
native on/off   req/s $R_NATIVE, CPU-per-request off/on $C_NATIVE (medians of per-round ratios)   (target >= 0.95: $(verdict "$R_NATIVE >= 0.95"))
consul on/off   req/s $R_CONSUL, CPU-per-request off/on $C_CONSUL (medians of per-round ratios)   (target >= 0.95: $(verdict "$R_CONSUL >= 0.95"))
per-round req/s on/off, native: $(rounds native)
per-round req/s on/off, consul: $(rounds consul)
failed requests $BAD
EOF
