#!/usr/bin/env bash
# ACL checks on the read path: discovery reads (native GET /api/v1/services/{s} and Consul
# GET /v1/health/service/{s}?passing, 10 instances) from one agent with ACLs off and one with
# ACLs on (default deny, a token whose policy reads every service and node), same bytes, same
# token header sent to both. Each agent is pinned to CPU 0 and wrk (-t1 -c32) to CPU 1; rounds
# interleave off and on (which goes first alternates), and the figure is the median of the
# per-round ratios on/off, of requests/s and of server CPU per request.
# Target (issue: access control): ACLs on >= 0.95x ACLs off.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-8}
SERVICE=disc
SERVER_CPU=${SERVER_CPU:-0}
export WRK_CPU=${WRK_CPU:-1}

need_python
need_wrk
need curl curl
build_muster

OFF=$(pick_port)
ON=$(pick_port)
MGMT=$(python3 -c 'import uuid; print(uuid.uuid4())')
echo "$MGMT" >"$WORK/mgmt.token"

log "starting two agents: ACLs off on $OFF, ACLs on (default deny) on $ON"
start_muster off "$OFF" --dev --disable-self-preservation --http-threads 1
OFF_PID=$MUSTER_PID
start_muster on "$ON" --dev --disable-self-preservation --http-threads 1 \
    --acl --acl-default-policy deny --acl-initial-management-file "$WORK/mgmt.token"
ON_PID=$MUSTER_PID
taskset -apc "$SERVER_CPU" "$OFF_PID" >/dev/null
taskset -apc "$SERVER_CPU" "$ON_PID" >/dev/null

for port in "$OFF" "$ON"; do
    for i in $(seq 0 9); do
        curl -fsS -o /dev/null -X PUT "http://127.0.0.1:$port/api/v1/services/$SERVICE/instances/i-$i" \
            -H 'Content-Type: application/json' -H "X-Consul-Token: $MGMT" \
            -d "{\"address\":\"10.0.0.$((i + 1))\",\"port\":8080,\"tags\":[\"a\"],\"meta\":{\"k\":\"v\"},\"zone\":\"z1\",\"ttl\":\"10m\"}"
    done
done
curl -fsS -o /dev/null -X PUT "http://127.0.0.1:$ON/v1/acl/policy" -H "X-Consul-Token: $MGMT" \
    -d '{"Name":"read-all","Rules":"service_prefix \"\" {\n  policy = \"read\"\n}\nnode_prefix \"\" {\n  policy = \"read\"\n}"}'
ACL_TOKEN=$(curl -fsS -X PUT "http://127.0.0.1:$ON/v1/acl/token" -H "X-Consul-Token: $MGMT" \
    -d '{"Description":"bench reader","Policies":[{"Name":"read-all"}]}' |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["SecretID"])')
export ACL_TOKEN

# The same bytes from both, and the token is needed on the ACL agent.
for path in "/api/v1/services/$SERVICE" "/v1/health/service/$SERVICE?passing"; do
    a=$(curl -fsS -H "X-Consul-Token: $ACL_TOKEN" "http://127.0.0.1:$OFF$path" | python3 -c 'import json,sys; d=json.load(sys.stdin); print(len(d["instances"]) if isinstance(d, dict) else len(d))')
    b=$(curl -fsS -H "X-Consul-Token: $ACL_TOKEN" "http://127.0.0.1:$ON$path" | python3 -c 'import json,sys; d=json.load(sys.stdin); print(len(d["instances"]) if isinstance(d, dict) else len(d))')
    [[ "$a" == 10 && "$b" == 10 ]] || die "$path: $a instances with ACLs off, $b with ACLs on"
    code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$ON$path")
    [[ "$code" == 403 || "$(curl -fsS "http://127.0.0.1:$ON$path")" == *'"instances":[]'* || "$(curl -fsS "http://127.0.0.1:$ON$path")" == '[]' ]] \
        || die "$path: the anonymous token reads it on the ACL agent (HTTP $code)"
done

mkdir -p "$WORK/res"
# A warm-up of each agent on each path, not counted.
for port in "$OFF" "$ON"; do
    for path in "/api/v1/services/$SERVICE" "/v1/health/service/$SERVICE?passing"; do
        run_wrk "$WORK/warmup.json" "$BENCH_DIR/lua/token_get.lua" 1 32 2 "http://127.0.0.1:$port$path"
    done
done
for r in $(seq "$ROUNDS"); do
    for api in native consul; do
        case $api in
            native) path="/api/v1/services/$SERVICE" ;;
            consul) path="/v1/health/service/$SERVICE?passing" ;;
        esac
        # Which agent goes first alternates, so neither always runs on a machine the other
        # just warmed.
        order="off on"
        (( r % 2 == 0 )) && order="on off"
        for t in $order; do
            case $t in
                off) port=$OFF pid=$OFF_PID ;;
                on) port=$ON pid=$ON_PID ;;
            esac
            run_wrk "$WORK/res/$api-$t-$r.json" "$BENCH_DIR/lua/token_get.lua" 1 32 "$DURATION" \
                "http://127.0.0.1:$port$path" "$pid"
            log "round $r $api $t: $(cat "$WORK/res/$api-$t-$r.json")"
        done
    done
done

med() { python3 "$DRIVER" median "$1" "${@:2}" --digits "${DIGITS:-0}"; }
ratio() {
    python3 -c '
import json, statistics, sys
d, api, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
rps = lambda t, i: json.load(open(f"{d}/{api}-{t}-{i}.json"))["ok_rps"]
print("%.3f" % statistics.median(rps("on", i) / rps("off", i) for i in range(1, n + 1)))' "$WORK/res" "$1" "$ROUNDS"
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
load: wrk -t1 -c32 -d${DURATION}s pinned to CPU $WRK_CPU, each agent (--http-threads 1) pinned to CPU $SERVER_CPU,
      $ROUNDS rounds interleaved (off and on, the first alternating), X-Consul-Token sent to both
api     acls     req/s    p99 ms   server CPU us/req
$(row native off)
$(row native on)
$(row consul off)
$(row consul on)
native on/off   req/s $R_NATIVE, CPU-per-request off/on $C_NATIVE (medians of per-round ratios)   (target >= 0.95: $(verdict "$R_NATIVE >= 0.95"))
consul on/off   req/s $R_CONSUL, CPU-per-request off/on $C_CONSUL (medians of per-round ratios)   (target >= 0.95: $(verdict "$R_CONSUL >= 0.95"))
failed requests $BAD
EOF
