#!/usr/bin/env bash
# The gateway (`muster gateway`) against nginx and HAProxy as reverse proxies to the same
# upstream, all on this machine (reference/client-gateway.md part B4):
#  - CPU0: the load generator (wrk), the upstream (a separate nginx, one worker, answering a
#    fixed 200-byte body from memory) and the agent (`--dev`) the gateway follows.
#  - CPU1: the proxy under test, one worker each: muster gateway (--threads 1, a tag route to
#    the upstream), nginx (worker_processes 1, upstream keepalive 64, HTTP/1.1 upstream) and
#    HAProxy 2.6 (nbthread 1, http-reuse always). Each adds X-Forwarded-For,
#    X-Forwarded-Proto and a request id, as the gateway does. No access logs.
# Parts:
#  1. Max rps: wrk -t1 -c64 -d${DURATION}s on the direct URL (baseline) and through each
#     proxy, plus the gateway with every policy on (API key, a rate limit that never refuses,
#     2 retries, the access log written to /dev/null); rounds interleaved, medians; proxy
#     CPU time per request from /proc/<pid>/stat.
#  2. Added latency at a fixed rate (LAT_LOAD x nginx's median max rps, paced by
#     bench/lua/rate.lua): p50/p99 of each proxy minus the direct baseline's.
#  3. Rolling restart of three upstream instances (deregister, stop, start, register, one
#     after the other) under 1,000 req/s through the gateway: non-2xx answers.
#  4. RSS of a fresh gateway following 1,000 services x 5 instances, each service with a
#     urlprefix- tag route: idle, then with 1,000 open idle keep-alive connections.
#  5. Table swap: 100 times, register an instance with a new route tag and time from the
#     agent's answer until the gateway routes it; deregister it and time until it stops
#     (bench/driver.py gw-swap, with the 5,000 instances of part 4 in the catalog).
#
# QUICK=1: one round of 3 s, 3 s latency runs, 20 swaps: checks that the script works.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

if [[ -n "${QUICK:-}" ]]; then
    : "${ROUNDS:=1}" "${DURATION:=3}" "${WARMUP:=1}" "${LAT_DURATION:=3}" "${SWAPS:=20}"
fi
ROUNDS=${ROUNDS:-6}
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-5}
LAT_DURATION=${LAT_DURATION:-30}
LAT_LOAD=${LAT_LOAD:-0.5}
SWAPS=${SWAPS:-100}
ROLL_RATE=${ROLL_RATE:-1000}
SERVICES=${SERVICES:-1000}
PER_SERVICE=${PER_SERVICE:-5}
IDLE_CONNS=${IDLE_CONNS:-1000}
CONNS=64
LOAD_CPU=0
PROXY_CPU=1
export WRK_CPU=$LOAD_CPU

(($(nproc) >= 2)) || die "needs two CPUs (the proxy on one, the load and upstream on the other)"
# 1,000 idle connections and their upstream side need more than the usual 1,024 descriptors.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

need_python
need_wrk
need_nginx
need haproxy haproxy
need curl curl
need taskset util-linux
build_muster
mkdir -p "$WORK/res" "$WORK/www/bench"
BODY_200=$(head -c 200 /dev/zero | tr '\0' 'x')
printf '%s' "$BODY_200" >"$WORK/www/bench/200b"
PATH_200=/bench/200b

# --- servers ---------------------------------------------------------------------------------

# nginx_on CPU NAME PORT SERVER_BODY [HTTP_EXTRA]: one nginx worker pinned to CPU, listening on
# PORT with SERVER_BODY inside its server block; sets NGINX_PID.
nginx_on() {
    local cpu=$1 name=$2 port=$3 body=$4 extra=${5:-} dir="$WORK/$2"
    nginx_conf "$dir" 1 "$port" "$body" "$extra"
    spawn "$name" taskset -c "$cpu" nginx -c "$dir/nginx.conf" -e "$dir/error.log"
    NGINX_PID=$SPAWNED_PID
}
# upstream NAME PORT: the fixed-body upstream on the load CPU: the 200 bytes from memory
# (`return`, no file to open or sendfile), so that it and wrk leave the proxy the bottleneck.
upstream() { nginx_on "$LOAD_CPU" "$1" "$2" "root $WORK/www; location = $PATH_200 { return 200 '$BODY_200'; }"; }

agent() { echo "http://127.0.0.1:$AGENT_PORT/api/v1/services/$1/instances/$2"; }
# register SERVICE ID PORT TAG: an instance at 127.0.0.1:PORT with one tag.
register() {
    curl -fsS -o /dev/null -X PUT "$(agent "$1" "$2")" -H 'Content-Type: application/json' \
        -d "{\"address\":\"127.0.0.1\",\"port\":$3,\"tags\":[\"$4\"],\"ttl\":\"24h\"}"
}
deregister() { curl -fsS -o /dev/null -X DELETE "$(agent "$1" "$2")"; }
# route_instances ADMIN_PORT PATH: instances behind the gateway's route for PATH (0: none).
route_instances() {
    curl -fsS "http://127.0.0.1:$1/routes" | python3 -c '
import json, sys
routes = [r for r in json.load(sys.stdin)["routes"] if r["path"] == sys.argv[1]]
print(sum(s["instances"] for r in routes for s in r["sides"]))' "$2"
}
# caught_up ADMIN_PORT: "yes" once the gateway's table was built at the agent's index or later.
caught_up() {
    local agent gw
    agent=$(curl -fsS "http://127.0.0.1:$AGENT_PORT/api/v1/status" | python3 -c 'import json,sys; print(json.load(sys.stdin)["index"])')
    gw=$(curl -fsS "http://127.0.0.1:$1/routes" | python3 -c 'import json,sys; print(json.load(sys.stdin)["index"])')
    ((gw >= agent)) && echo yes || echo "table index $gw, agent $agent"
}
routes_count() { curl -fsS "http://127.0.0.1:$1/routes" | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["routes"]))'; }
# until_eq SECONDS WANT CMD...: polls CMD until it prints WANT.
until_eq() {
    local secs=$1 want=$2 got
    shift 2
    local deadline=$((SECONDS + secs))
    until got=$("$@") && [[ "$got" == "$want" ]]; do
        ((SECONDS < deadline)) || die "$* printed ${got:-nothing}, not $want, within ${secs}s"
        sleep 0.02
    done
}
# gateway_on NAME PORT ADMIN_PORT ARGS...: the gateway pinned to the proxy CPU, one worker;
# stdout (its access log, when on) goes to /dev/null; GATEWAY_ENV (NAME=VALUE...) is added to
# its environment. Sets GATEWAY_PID.
gateway_on() {
    local name=$1 port=$2 admin=$3
    shift 3
    # shellcheck disable=SC2086 # GATEWAY_ENV is a list of NAME=VALUE words
    spawn "$name" env ${GATEWAY_ENV:-} bash -c 'exec "$@" >/dev/null' _ taskset -c "$PROXY_CPU" "$MUSTER_BIN" gateway \
        --listen "127.0.0.1:$port" --admin "127.0.0.1:$admin" --agent "127.0.0.1:$AGENT_PORT" \
        --threads 1 --log warn "$@"
    GATEWAY_PID=$SPAWNED_PID
    wait_http "http://127.0.0.1:$admin/readyz" 30
}

UP_PORT=$(pick_port)
AGENT_PORT=$(pick_port)
GW_PORT=$(pick_port) GW_ADMIN=$(pick_port)
POL_PORT=$(pick_port) POL_ADMIN=$(pick_port)
NX_PORT=$(pick_port)
HA_PORT=$(pick_port)

log "starting the upstream (nginx, 1 worker, CPU$LOAD_CPU) and the agent (--dev, CPU$LOAD_CPU)"
upstream upstream "$UP_PORT"
UP_PID=$NGINX_PID
wait_http "http://127.0.0.1:$UP_PORT$PATH_200" 10
muster_cmd "$AGENT_PORT" --dev
spawn agent taskset -c "$LOAD_CPU" "${MUSTER_CMD[@]}"
wait_http "http://127.0.0.1:$AGENT_PORT/readyz" 30
register bench u-0 "$UP_PORT" "urlprefix-/bench"

log "starting the proxies on CPU$PROXY_CPU"
gateway_on gateway "$GW_PORT" "$GW_ADMIN"
GW_PID=$GATEWAY_PID
until_eq 10 1 route_instances "$GW_ADMIN" /bench

API_KEY=bench-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')
export API_KEY
echo "bench $API_KEY" >"$WORK/api-keys.txt"
cat >"$WORK/policy-routes.toml" <<EOF
# Every policy on, none of them refusing: the API key is the right one and the rate limit is
# far above what one core can serve.
[[route]]
name = "bench"
path = "/bench"
service = "bench"
retries = 2
[route.auth]
api_keys_file = "api-keys.txt"
[route.rate_limit]
per_second = 10000000.0
burst = 10000000
key = "client_ip"
EOF
gateway_on gateway-policies "$POL_PORT" "$POL_ADMIN" --routes "$WORK/policy-routes.toml" --access-log
POL_PID=$GATEWAY_PID
until_eq 10 1 route_instances "$POL_ADMIN" /bench

nginx_on "$PROXY_CPU" nginx-proxy "$NX_PORT" "
        location / {
            proxy_pass http://up;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
            proxy_set_header Host \$host;
            proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto \$scheme;
            proxy_set_header X-Request-ID \$request_id;
            add_header X-Request-ID \$request_id;
        }" "upstream up { server 127.0.0.1:$UP_PORT; keepalive 64; keepalive_requests 1000000; }"
NX_PID=$NGINX_PID

cat >"$WORK/haproxy.cfg" <<EOF
global
    nbthread 1
    maxconn 8000
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    http-reuse always
    option forwardfor
    unique-id-format %{+X}o\ %ci:%cp_%fi:%fp_%Ts_%rt
frontend bench
    bind 127.0.0.1:$HA_PORT
    http-request set-header X-Forwarded-Proto http
    http-request set-header X-Request-ID %[unique-id]
    http-response set-header X-Request-ID %[unique-id]
    default_backend upstream
backend upstream
    server u0 127.0.0.1:$UP_PORT
EOF
haproxy -c -q -f "$WORK/haproxy.cfg" || die "haproxy refused its configuration"
spawn haproxy taskset -c "$PROXY_CPU" haproxy -db -f "$WORK/haproxy.cfg"
HA_PID=$SPAWNED_PID

TARGETS=(direct gateway nginx haproxy gateway-policies)
declare -A URL PID LUA
URL[direct]="http://127.0.0.1:$UP_PORT$PATH_200" PID[direct]=$UP_PID
URL[gateway]="http://127.0.0.1:$GW_PORT$PATH_200" PID[gateway]=$GW_PID
URL[nginx]="http://127.0.0.1:$NX_PORT$PATH_200" PID[nginx]=$NX_PID
URL[haproxy]="http://127.0.0.1:$HA_PORT$PATH_200" PID[haproxy]=$HA_PID
URL[gateway-policies]="http://127.0.0.1:$POL_PORT$PATH_200" PID[gateway-policies]=$POL_PID
cat >"$WORK/apikey.lua" <<'EOF'
-- The API key the policies gateway's route asks for.
wrk.headers["x-api-key"] = os.getenv("API_KEY")
EOF
for t in "${TARGETS[@]}"; do LUA[$t]=$BENCH_DIR/lua/get.lua; done
LUA[gateway-policies]=$WORK/apikey.lua

for t in "${TARGETS[@]}"; do
    [[ $t == gateway-policies ]] || wait_http "${URL[$t]}" 10
    size=$(curl -fsS -o /dev/null -w '%{size_download}' -H "x-api-key: $API_KEY" "${URL[$t]}")
    [[ "$size" == 200 ]] || die "$t answered $size bytes, not 200"
done
# Without the key the policies gateway must refuse: the policy is really on.
code=$(curl -sS -o /dev/null -w '%{http_code}' "${URL[gateway-policies]}")
[[ "$code" == 401 ]] || die "the policies gateway answered $code without an API key, not 401"

# --- 1. max rps ------------------------------------------------------------------------------
log "warm-up, ${WARMUP}s each"
for t in "${TARGETS[@]}"; do
    run_wrk "$WORK/warmup-$t.json" "${LUA[$t]}" 1 "$CONNS" "$WARMUP" "${URL[$t]}"
done
for r in $(seq "$ROUNDS"); do
    # Odd rounds in the listed order, even rounds reversed (ABBA): a drift of the machine's
    # speed during a round pair weighs on every target alike.
    order=("${TARGETS[@]}")
    ((r % 2)) || mapfile -t order < <(printf '%s\n' "${TARGETS[@]}" | tac)
    for t in "${order[@]}"; do
        run_wrk "$WORK/res/$t.max-$r.json" "${LUA[$t]}" 1 "$CONNS" "$DURATION" "${URL[$t]}" "${PID[$t]}"
        log "round $r $t: $(cat "$WORK/res/$t.max-$r.json")"
    done
done
med() { python3 "$DRIVER" median "$1" "${@:2}" --digits "${DIGITS:-0}"; }
max_rps() { med ok_rps "$WORK"/res/"$1".max-*.json; }
N_MAX=$(max_rps nginx)
RATE=$(python3 -c "print(max(100, int($N_MAX * $LAT_LOAD)))")
RSS_GW_LOADED=$(rss_kb "$GW_PID")

# --- 2. added latency at a fixed rate --------------------------------------------------------
log "latency at $RATE req/s (${LAT_LOAD} x nginx's $N_MAX), ${LAT_DURATION}s each"
for t in direct gateway nginx haproxy; do
    RATE=$RATE run_wrk "$WORK/res/lat-$t.json" "$BENCH_DIR/lua/rate.lua" 1 "$CONNS" "$LAT_DURATION" \
        "${URL[$t]}" "${PID[$t]}"
    log "latency $t: $(cat "$WORK/res/lat-$t.json")"
done
stop "$POL_PID"
stop "$NX_PID"
stop "$HA_PID"

# --- 3. rolling restart under load -----------------------------------------------------------
log "rolling restart of three instances under $ROLL_RATE req/s"
declare -A ROLL_PORT ROLL_PID
for i in 1 2 3; do
    ROLL_PORT[$i]=$(pick_port)
    upstream "roll-$i" "${ROLL_PORT[$i]}"
    ROLL_PID[$i]=$NGINX_PID
    wait_http "http://127.0.0.1:${ROLL_PORT[$i]}$PATH_200" 10
    register roll "r-$i" "${ROLL_PORT[$i]}" "urlprefix-/roll strip=/roll"
done
until_eq 10 3 route_instances "$GW_ADMIN" /roll
ROLL_SECS=${ROLL_SECS:-20}
RATE=$ROLL_RATE run_wrk "$WORK/res/roll.json" "$BENCH_DIR/lua/rate.lua" 1 16 "$ROLL_SECS" \
    "http://127.0.0.1:$GW_PORT/roll$PATH_200" &
ROLL_WRK=$!
sleep 2 # steady load before the first instance goes
roll_started=$SECONDS
for i in 1 2 3; do
    deregister roll "r-$i"
    until_eq 10 2 route_instances "$GW_ADMIN" /roll
    stop "${ROLL_PID[$i]}"
    upstream "roll-$i" "${ROLL_PORT[$i]}"
    ROLL_PID[$i]=$NGINX_PID
    wait_http "http://127.0.0.1:${ROLL_PORT[$i]}$PATH_200" 10
    register roll "r-$i" "${ROLL_PORT[$i]}" "urlprefix-/roll strip=/roll"
    until_eq 10 3 route_instances "$GW_ADMIN" /roll
    log "instance $i restarted"
done
ROLL_TOOK=$((SECONDS - roll_started))
((ROLL_TOOK + 2 < ROLL_SECS)) || log "warning: the restarts took ${ROLL_TOOK}s, past the load's end"
wait "$ROLL_WRK" || die "the load during the rolling restart failed"
log "rolling restart: $(cat "$WORK/res/roll.json")"

# --- 4. RSS with 1,000 services x 5 instances -------------------------------------------------
log "registering $SERVICES services x $PER_SERVICE instances, each service with a route tag"
python3 "$DRIVER" populate --port "$AGENT_PORT" --services "$SERVICES" \
    --instances $((SERVICES * PER_SERVICE)) --prefix svc --conns 16 --route-tags >"$WORK/populate.json"
ROUTES_WANT=$((SERVICES + 2))
# The first 1,000 registrations make the routes; wait for the table to hold all 5,000.
CATCH_UP_STARTED=$SECONDS
until_eq 60 yes caught_up "$GW_ADMIN"
CATCH_UP=$((SECONDS - CATCH_UP_STARTED))
[[ "$(routes_count "$GW_ADMIN")" == "$ROUTES_WANT" ]] || die "the gateway holds $(routes_count "$GW_ADMIN") routes, not $ROUTES_WANT"
RSS_PORT=$(pick_port) RSS_ADMIN=$(pick_port)
gateway_on gateway-rss "$RSS_PORT" "$RSS_ADMIN"
RSS_PID=$GATEWAY_PID
until_eq 30 yes caught_up "$RSS_ADMIN"
[[ "$(routes_count "$RSS_ADMIN")" == "$ROUTES_WANT" ]] || die "the fresh gateway holds $(routes_count "$RSS_ADMIN") routes, not $ROUTES_WANT"
curl -fsS -o /dev/null "http://127.0.0.1:$RSS_PORT$PATH_200"
# Idle: the answers just made (/routes is 1,000 routes of JSON) are garbage the allocator gives
# back within a second (the gateway releases free memory every second); 5 s is well past that.
sleep 5
RSS_IDLE=$(rss_kb "$RSS_PID")
spawn hold taskset -c "$LOAD_CPU" python3 "$DRIVER" hold --port "$RSS_PORT" --conns "$IDLE_CONNS" --path "$PATH_200"
HOLD_PID=$SPAWNED_PID
deadline=$((SECONDS + 60))
until grep -q '"open"' "$WORK/hold.log" 2>/dev/null; do
    kill -0 "$HOLD_PID" 2>/dev/null || die "holding connections failed: $(tail -3 "$WORK/hold.log")"
    ((SECONDS < deadline)) || die "$IDLE_CONNS connections not open within 60s"
    sleep 0.1
done
HOLD=$(grep '"open"' "$WORK/hold.log")
RSS_CONNS=$(rss_kb "$RSS_PID")
stop "$HOLD_PID"
stop "$RSS_PID"
# --- 5. table swap ---------------------------------------------------------------------------
log "table swap: $SWAPS registrations and deregistrations"
python3 "$DRIVER" gw-swap --agent-port "$AGENT_PORT" --gateway-port "$GW_PORT" \
    --upstream-port "$UP_PORT" --path "$PATH_200" --rounds "$SWAPS" >"$WORK/res/swap.json" ||
    log "table swap had failures: $(cat "$WORK/res/swap.json")"
RSS_GW_END=$(rss_kb "$GW_PID")

# --- report ----------------------------------------------------------------------------------
j() { python3 -c 'import json,sys; v=json.load(open(sys.argv[1]))[sys.argv[2]]; print(v)' "$1" "$2"; }
f1() { python3 -c "print(f'{$1:.${2:-1}f}')"; }
signed() { python3 -c "print(f'{$1:+.0f}')"; }
verdict() { python3 -c "print('met' if $1 else 'MISSED')"; }
bad() { python3 -c 'import json,sys; print(sum(json.load(open(f))["non2xx"]+json.load(open(f))["socket_errors"] for f in sys.argv[1:]))' "$@"; }
rounds() { for f in "$@"; do python3 -c 'import json,sys; print(int(json.load(open(sys.argv[1]))["ok_rps"]), end=" ")' "$f"; done; }
mib() { python3 -c "print(f'{$1 / 1024:.1f}')"; }
G_MAX=$(max_rps gateway) H_MAX=$(max_rps haproxy) P_MAX=$(max_rps gateway-policies)
max_row() {
    local t=$1 f=("$WORK"/res/"$1".max-*.json) cpu
    cpu=$(DIGITS=1 med cpu_us_per_req "${f[@]}")
    printf '%-18s %9s  %8s %8s  %7s  %9s  %-24s %s' "$t" "$(max_rps "$t")" \
        "$(DIGITS=3 med p50_ms "${f[@]}")" "$(DIGITS=3 med p99_ms "${f[@]}")" "$cpu" \
        "$(python3 -c "print(int(1e6 / $cpu) if $cpu > 0 else '-')")" "$(rounds "${f[@]}")" "$(bad "${f[@]}")"
}
# ratio T [A] [FIELD]: per-round ratio of A's FIELD (default the gateway's ok_rps) to T's,
# median over rounds.
ratio() {
    python3 -c '
import json, statistics, sys
d, a, b, n, field = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
get = lambda t, i: json.load(open(f"{d}/{t}.max-{i}.json"))[field]
print("%.2f" % statistics.median(get(a, i) / get(b, i) for i in range(1, n + 1)))' "$WORK/res" "${2:-gateway}" "$1" "$ROUNDS" "${3:-ok_rps}"
}
L() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]] * 1000)' "$WORK/res/lat-$1.json" "$2"; }
lat_row() {
    local t=$1 file=$WORK/res/lat-$1.json
    printf '%-10s %8s/s  %8s  %8s  %8s  %9s  %9s  %s' "$t" "$(f1 "$(j "$file" ok_rps)" 0)" \
        "$(f1 "$(L "$t" p50_ms)" 0)" "$(f1 "$(L "$t" p99_ms)" 0)" "$(f1 "$(L "$t" max_ms)" 0)" \
        "$(signed "$(L "$t" p50_ms) - $(L direct p50_ms)")" "$(signed "$(L "$t" p99_ms) - $(L direct p99_ms)")" \
        "$(bad "$file")"
}
G_P50=$(L gateway p50_ms) N_P50=$(L nginx p50_ms) G_P99=$(L gateway p99_ms) N_P99=$(L nginx p99_ms)
R_N=$(ratio nginx) R_H=$(ratio haproxy)
# The proxies' own CPU per request: T's over the gateway's (above 1: the gateway spends less).
C_N=$(ratio gateway nginx cpu_us_per_req) C_H=$(ratio gateway haproxy cpu_us_per_req)
POL_LOSS=$(python3 -c "print(f'{(1 - $(ratio gateway gateway-policies)) * 100:.1f}')")
S=$WORK/res/swap.json
ROLL_BAD=$(bad "$WORK/res/roll.json")

cat <<EOF

=== gateway: muster gateway, nginx and HAProxy proxying to one upstream (200-byte body) ===
$(machine_info)
$(nginx -v 2>&1 | sed 's/^nginx version: //'), $(haproxy -v | head -1 | cut -d' ' -f1-3), wrk $(wrk -v 2>&1 | head -1 | cut -d' ' -f2)
pinning: proxies on CPU$PROXY_CPU (one worker each); wrk, the upstream (nginx, 1 worker) and the agent on CPU$LOAD_CPU
max rps: wrk -t1 -c$CONNS -d${DURATION}s, ${WARMUP}s warm-up, $ROUNDS rounds interleaved (${TARGETS[*]}), medians
                       req/s    p50 ms   p99 ms  CPU us/req  req/CPU-s  per-round req/s          non-2xx+errors
$(for t in "${TARGETS[@]}"; do max_row "$t"; echo; done)
gateway / nginx      $(f1 "$G_MAX / $N_MAX" 2) (medians), $R_N (median of per-round ratios)   (target >= 1.0: $(verdict "$R_N >= 1.0"))
gateway / haproxy    $(f1 "$G_MAX / $H_MAX" 2) (medians), $R_H (median of per-round ratios)   (target >= 1.0: $(verdict "$R_H >= 1.0"))
CPU per request     nginx / gateway $C_N, HAProxy / gateway $C_H (medians of per-round ratios; above 1: the gateway spends less)
policies on          $(f1 "$P_MAX" 0) req/s against $(f1 "$G_MAX" 0) off: $POL_LOSS% fewer (median of per-round ratios)   (target <= 15%: $(verdict "$POL_LOSS <= 15"))

added latency at $RATE req/s ($LAT_LOAD x nginx's max; bench/lua/rate.lua, -c$CONNS, ${LAT_DURATION}s each), microseconds
               achieved     p50       p99       max  p50-direct  p99-direct  non-2xx+errors
$(for t in direct gateway nginx haproxy; do lat_row "$t"; echo; done)
gateway p50 vs nginx $(f1 "$G_P50 - $N_P50" 0) us   (target <= +50 us: $(verdict "$G_P50 - $N_P50 <= 50"))
gateway p99 vs nginx $(f1 "$G_P99" 0) against $(f1 "$N_P99" 0) us   (target no worse: $(verdict "$G_P99 <= $N_P99"))

rolling restart      3 instances deregistered, stopped, started, registered in ${ROLL_TOOK}s under $(f1 "$(j "$WORK/res/roll.json" rps)" 0) req/s: $(j "$WORK/res/roll.json" requests) requests, $ROLL_BAD non-2xx or errors   (target 0: $(verdict "$ROLL_BAD == 0"))
RSS, fresh gateway   $(mib "$RSS_IDLE") MiB idle with $SERVICES services x $PER_SERVICE instances ($ROUTES_WANT routes)   (target <= 30 MB: $(verdict "$RSS_IDLE * 1024 <= 30e6"))
                     $(mib "$RSS_CONNS") MiB with $IDLE_CONNS idle connections open ($HOLD)   (target <= 64 MB: $(verdict "$RSS_CONNS * 1024 <= 64e6"))
RSS, loaded gateway  $(mib "$RSS_GW_LOADED") MiB after the max-rps rounds, $(mib "$RSS_GW_END") MiB at the end
catching up          the loaded gateway's table reached the agent's index ${CATCH_UP}s after $((SERVICES * PER_SERVICE)) registrations ended ($(j "$WORK/populate.json" per_second)/s)
table swap           $(j "$S" swaps) changes with $SERVICES services in the catalog: p50 $(j "$S" p50_ms) ms, p99 $(j "$S" p99_ms) ms, max $(j "$S" max_ms) ms (register p99 $(j "$S" register_p99_ms), deregister p99 $(j "$S" deregister_p99_ms)); $(j "$S" failures) failures   (target p99 <= 100 ms, 0 failures: $(verdict "$(j "$S" p99_ms) <= 100 and $(j "$S" failures) == 0"))
EOF
