#!/usr/bin/env bash
# The Eureka API, on one durable agent:
# 1. Reads: GET /eureka/apps/BENCH10 (10 instances registered through the Eureka API), as JSON
#    (Accept: application/json) and as XML (no Accept, Eureka's default), against the same
#    bytes served as static files by nginx with the same Content-Type. wrk -t2 -c64 -d10s
#    --latency, three rounds interleaved, medians reported.
# 2. Renewals: 1,000 instances registered through the Eureka API; wrk -t2 -c64 cycles through
#    their renewals (PUT /eureka/apps/RENEW/r-K?status=UP&lastDirtyTimestamp=1). Reference in
#    the same rounds: the native heartbeat of 1,000 instances on the same agent.
# 3. Delta visibility: registrations at 50/s through one connection; after each
#    acknowledgement, /eureka/apps/delta is fetched through another connection until it shows
#    the new instance. The delta's apps__hashcode is checked against a full fetch's.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
RENEWALS=${RENEWALS:-1000}
DELTA_COUNT=${DELTA_COUNT:-500}
DELTA_RATE=${DELTA_RATE:-50}

need_python
need_wrk
need_nginx
need curl curl
build_muster

MPORT=$(pick_port)
NPORT=$(pick_port)
MBASE="http://127.0.0.1:$MPORT"

log "starting muster (durable, $WORK/muster-data)"
start_muster muster "$MPORT" --data-dir "$WORK/muster-data" --disable-self-preservation
python3 "$DRIVER" eureka-register --port "$MPORT" --app BENCH10 --prefix i --count 10 >/dev/null
python3 "$DRIVER" eureka-register --port "$MPORT" --app RENEW --prefix r --count "$RENEWALS" >/dev/null
python3 - "$MPORT" "$RENEWALS" <<'EOF'
# The native reference: as many instances with a TTL, heartbeated through the native API.
import http.client, json, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
for k in range(n):
    c.request("PUT", f"/api/v1/services/native/instances/i-{k}",
              body=json.dumps({"address": "10.0.0.1", "port": 8080, "ttl": "10m"}),
              headers={"Content-Type": "application/json"})
    r = c.getresponse()
    r.read()
    if r.status not in (200, 201):
        raise SystemExit(f"native registration answered {r.status}")
EOF

APP_PATH=/eureka/apps/BENCH10
mkdir -p "$WORK/www"
curl -fsS -H 'Accept: application/json' -o "$WORK/www/app.json" "$MBASE$APP_PATH"
curl -fsS -o "$WORK/www/app.xml" "$MBASE$APP_PATH"
JSON_BYTES=$(stat -c %s "$WORK/www/app.json")
XML_BYTES=$(stat -c %s "$WORK/www/app.xml")
[[ $(python3 -c 'import json,sys; print(len(json.load(open(sys.argv[1]))["application"]["instance"]))' "$WORK/www/app.json") == 10 ]] \
    || die "$APP_PATH did not return 10 instances"
[[ $(grep -o '<instance>' "$WORK/www/app.xml" | wc -l) == 10 ]] || die "$APP_PATH as XML did not hold 10 instances"

start_nginx "$NPORT" "$WORK/www"
NBASE="http://127.0.0.1:$NPORT"
wait_http "$NBASE/app.json" 10
for f in json xml; do
    cmp -s <(curl -fsS "$NBASE/app.$f") "$WORK/www/app.$f" || die "nginx does not serve the same $f bytes"
    [[ $(curl -fsS -o /dev/null -w '%{content_type}' "$NBASE/app.$f") == "application/$f" ]] \
        || die "nginx does not serve application/$f"
    accept=()
    [[ $f == xml ]] || accept=(-H 'Accept: application/json')
    [[ $(curl -fsS -o /dev/null -w '%{content_type}' "${accept[@]}" "$MBASE$APP_PATH") == "application/$f" ]] \
        || die "muster does not answer application/$f"
done
# The answers carry no per-request field: the same bytes on every read.
cmp -s <(curl -fsS -H 'Accept: application/json' "$MBASE$APP_PATH") "$WORK/www/app.json" || die "muster's JSON answer changed"
cmp -s <(curl -fsS "$MBASE$APP_PATH") "$WORK/www/app.xml" || die "muster's XML answer changed"

# --- 1. reads and 2. renewals ------------------------------------------------------------------

mkdir -p "$WORK/res"
for r in $(seq "$ROUNDS"); do
    for t in muster-json nginx-json muster-xml nginx-xml; do
        case $t in
            muster-json) url=$MBASE$APP_PATH accept=application/json pid=$MUSTER_PID ;;
            nginx-json) url=$NBASE/app.json accept=application/json pid=$NGINX_PID ;;
            # No Accept header at all would be the purest "default", but wrk's request always
            # carries the headers given; */* selects XML as no Accept does.
            muster-xml) url=$MBASE$APP_PATH accept='*/*' pid=$MUSTER_PID ;;
            nginx-xml) url=$NBASE/app.xml accept='*/*' pid=$NGINX_PID ;;
        esac
        ACCEPT=$accept run_wrk "$WORK/res/$t-$r.json" "$BENCH_DIR/lua/accept.lua" 2 64 "$DURATION" "$url" "$pid"
        log "round $r $t: $(cat "$WORK/res/$t-$r.json")"
    done
    SERVICE=RENEW INSTANCES=$RENEWALS HEARTBEAT_PATH='/eureka/apps/%s/r-%d?status=UP&lastDirtyTimestamp=1' \
        run_wrk "$WORK/res/renew-$r.json" "$BENCH_DIR/lua/heartbeat.lua" \
        2 64 "$DURATION" "$MBASE" "$MUSTER_PID"
    log "round $r renew: $(cat "$WORK/res/renew-$r.json")"
    SERVICE=native INSTANCES=$RENEWALS run_wrk "$WORK/res/heartbeat-$r.json" "$BENCH_DIR/lua/heartbeat.lua" \
        2 64 "$DURATION" "$MBASE" "$MUSTER_PID"
    log "round $r native heartbeat: $(cat "$WORK/res/heartbeat-$r.json")"
done
# Renewals went to instances that exist: every one of them must still be there and UP.
UP=$(curl -fsS -H 'Accept: application/json' "$MBASE/eureka/apps/RENEW" \
    | python3 -c 'import json,sys; print(sum(i["status"] == "UP" for i in json.load(sys.stdin)["application"]["instance"]))')
[[ $UP == "$RENEWALS" ]] || die "after the renewals, $UP of $RENEWALS instances are UP"

# --- 3. delta visibility -----------------------------------------------------------------------

log "delta visibility: $DELTA_COUNT registrations at $DELTA_RATE/s"
python3 "$DRIVER" eureka-delta --port "$MPORT" --count "$DELTA_COUNT" --rate "$DELTA_RATE" >"$WORK/delta.json"
log "delta: $(cat "$WORK/delta.json")"

# --- results -----------------------------------------------------------------------------------

med() { python3 "$DRIVER" median "$1" "${@:2}" --digits "${DIGITS:-0}"; }
ratio() { python3 -c "print(f'{$1 / $2:.2f}')"; }
verdict() { python3 -c "print('met' if $1 else 'MISSED')"; }
per_round() { for f in "$@"; do python3 -c 'import json,sys; print(int(json.load(open(sys.argv[1]))["ok_rps"]), end=" ")' "$f"; done; }
round_ratio() {
    python3 -c '
import json, statistics, sys
d, a, b, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
rps = lambda t, i: json.load(open(f"{d}/{t}-{i}.json"))["ok_rps"]
print("%.2f" % statistics.median(rps(a, i) / rps(b, i) for i in range(1, n + 1)))' "$WORK/res" "$1" "$2" "$ROUNDS"
}
BAD=$(python3 -c 'import json,sys; print(sum(json.load(open(f))["non2xx"]+json.load(open(f))["socket_errors"] for f in sys.argv[1:]))' "$WORK"/res/*.json)
row() {
    local t=$1
    DIGITS=0 med ok_rps "$WORK"/res/"$t"-*.json | tr -d '\n'
    printf '  p50 %s ms  p99 %s ms  CPU %s us/req' \
        "$(DIGITS=3 med p50_ms "$WORK"/res/"$t"-*.json)" "$(DIGITS=3 med p99_ms "$WORK"/res/"$t"-*.json)" \
        "$(DIGITS=1 med cpu_us_per_req "$WORK"/res/"$t"-*.json)"
}
MJ=$(med ok_rps "$WORK"/res/muster-json-*.json)
NJ=$(med ok_rps "$WORK"/res/nginx-json-*.json)
MX=$(med ok_rps "$WORK"/res/muster-xml-*.json)
NX=$(med ok_rps "$WORK"/res/nginx-xml-*.json)
RJ=$(ratio "$MJ" "$NJ")
RX=$(ratio "$MX" "$NX")
RENEW=$(med ok_rps "$WORK"/res/renew-*.json)
HB=$(med ok_rps "$WORK"/res/heartbeat-*.json)

cat <<EOF

=== eureka: GET $APP_PATH (10 instances; JSON $JSON_BYTES bytes, XML $XML_BYTES bytes) ===
$(machine_info)
wrk -t2 -c64 -d${DURATION}s --latency, $ROUNDS rounds interleaved, medians (req/s)
muster JSON        $(row muster-json)
nginx  JSON        $(row nginx-json)
muster / nginx     $RJ (medians), $(round_ratio muster-json nginx-json) (median of per-round ratios)   (target >= 0.7: $(verdict "$RJ >= 0.7"))
muster XML         $(row muster-xml)
nginx  XML         $(row nginx-xml)
muster / nginx     $RX (medians), $(round_ratio muster-xml nginx-xml) (median of per-round ratios)   (target >= 0.7: $(verdict "$RX >= 0.7"))
per-round req/s    JSON muster $(per_round "$WORK"/res/muster-json-*.json)| nginx $(per_round "$WORK"/res/nginx-json-*.json)
                   XML  muster $(per_round "$WORK"/res/muster-xml-*.json)| nginx $(per_round "$WORK"/res/nginx-xml-*.json)

=== eureka renewals: PUT /eureka/apps/RENEW/r-K over $RENEWALS instances, wrk -t2 -c64 ===
renewals           $(row renew)   (target >= 50,000/s: $(verdict "$RENEW >= 50000"))
native heartbeats  $(row heartbeat)   (same agent, same rounds)
renew / heartbeat  $(ratio "$RENEW" "$HB") (medians), $(round_ratio renew heartbeat) (median of per-round ratios)
per-round req/s    renew $(per_round "$WORK"/res/renew-*.json)| heartbeat $(per_round "$WORK"/res/heartbeat-*.json)
failed requests    $BAD (all parts)
EOF

python3 - "$WORK/delta.json" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
ok = d["missing"] == 0 and d["p99_ms"] is not None and d["p99_ms"] < 100
print()
print(f"=== eureka delta: {d['registrations']} registrations at {d['rate']}/s; delta fetched by another connection after each acknowledgement ===")
print(f"seen by the first delta after the acknowledgement  {d['seen_by_first_delta_after_ack']}/{d['registrations']}, missing {d['missing']}")
print(f"acknowledgement -> visible in a delta   p50 {d['p50_ms']} ms, p99 {d['p99_ms']} ms, max {d['max_ms']} ms   (target p99 < 100 ms: {'met' if ok else 'MISSED'})")
print(f"delta apps__hashcode equals the full registry's: {d['hashcode_matches']} ({d['apps__hashcode']})")
EOF
