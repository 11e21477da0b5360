#!/usr/bin/env bash
# Discovery reads: muster's GET /api/v1/services/{service} against the same bytes served as a
# static file by nginx, and against etcd 3.4 reading the same 10 records by prefix through its
# HTTP/JSON gateway. wrk -t2 -c64 -d10s --latency, three rounds interleaved, medians reported.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
SERVICE=disc

need_python
need_wrk
need_nginx
need_etcd
need curl curl
build_muster

MPORT=$(pick_port)
NPORT=$(pick_port)
EPORT=$(pick_port)
EPEER=$(pick_port)

log "starting muster (durable, $WORK/muster-data), nginx, etcd"
start_muster muster "$MPORT" --data-dir "$WORK/muster-data" --disable-self-preservation
for i in $(seq 0 9); do
    curl -fsS -o /dev/null -X PUT "http://127.0.0.1:$MPORT/api/v1/services/$SERVICE/instances/i-$i" \
        -H 'Content-Type: application/json' \
        -d "{\"address\":\"10.0.0.$((i + 1))\",\"port\":8080,\"tags\":[\"a\"],\"meta\":{\"k\":\"v\"},\"zone\":\"z1\",\"ttl\":\"10m\"}"
done
MURL="http://127.0.0.1:$MPORT/api/v1/services/$SERVICE"
mkdir -p "$WORK/www"
curl -fsS -o "$WORK/www/disc.json" "$MURL"
BODY_BYTES=$(stat -c %s "$WORK/www/disc.json")
[[ $(python3 -c 'import json,sys; print(len(json.load(open(sys.argv[1]))["instances"]))' "$WORK/www/disc.json") == 10 ]] \
    || die "discovery did not return 10 instances"

start_nginx "$NPORT" "$WORK/www"
NURL="http://127.0.0.1:$NPORT/disc.json"
wait_http "$NURL" 10
cmp -s <(curl -fsS "$NURL") "$WORK/www/disc.json" || die "nginx does not serve the same bytes"

start_etcd "$EPORT" "$EPEER"
python3 "$DRIVER" etcd-load --port "$EPORT" --body "$WORK/www/disc.json" \
    --prefix "svc/$SERVICE/" --range-out "$WORK/etcd-range.json" >"$WORK/etcd-load.json"
ETCD_RANGE_BODY=$(cat "$WORK/etcd-range.json")
export ETCD_RANGE_BODY
EURL="http://127.0.0.1:$EPORT/v3/kv/range"

mkdir -p "$WORK/res"
RSS0=$(rss_kb "$MUSTER_PID")
for r in $(seq "$ROUNDS"); do
    for t in muster nginx etcd; do
        case $t in
            muster) url=$MURL lua=get.lua pid=$MUSTER_PID ;;
            nginx) url=$NURL lua=get.lua pid=$NGINX_PID ;;
            etcd) url=$EURL lua=etcd_range.lua pid=$ETCD_PID ;;
        esac
        run_wrk "$WORK/res/$t-$r.json" "$BENCH_DIR/lua/$lua" 2 64 "$DURATION" "$url" "$pid"
        log "round $r $t: $(cat "$WORK/res/$t-$r.json")"
    done
done
RSS1=$(rss_kb "$MUSTER_PID")
# Latency without saturating the two cores: one wrk thread, 4 connections (diagnostic).
run_wrk "$WORK/light-muster.json" "$BENCH_DIR/lua/get.lua" 1 4 5 "$MURL"
run_wrk "$WORK/light-nginx.json" "$BENCH_DIR/lua/get.lua" 1 4 5 "$NURL"
light() { python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print("%d req/s, p50 %.3f ms, p99 %.3f ms" % (r["ok_rps"], r["p50_ms"], r["p99_ms"]))' "$1"; }
# The first /metrics scrape after the load: its time shows what the recorder accumulated.
SCRAPE_MS=$(curl -fsS -o /dev/null -w '%{time_total}' "http://127.0.0.1:$MPORT/metrics" | python3 -c 'import sys; print(f"{float(sys.stdin.read())*1000:.0f}")')
SCRAPE2_MS=$(curl -fsS -o /dev/null -w '%{time_total}' "http://127.0.0.1:$MPORT/metrics" | python3 -c 'import sys; print(f"{float(sys.stdin.read())*1000:.0f}")')
RSS2=$(rss_kb "$MUSTER_PID")

med() { python3 "$DRIVER" median "$1" "${@:2}" --digits "${DIGITS:-0}"; }
M_RPS=$(med ok_rps "$WORK"/res/muster-*.json)
N_RPS=$(med ok_rps "$WORK"/res/nginx-*.json)
E_RPS=$(med ok_rps "$WORK"/res/etcd-*.json)
DIGITS=3
M_P50=$(med p50_ms "$WORK"/res/muster-*.json)
M_P99=$(med p99_ms "$WORK"/res/muster-*.json)
N_P99=$(med p99_ms "$WORK"/res/nginx-*.json)
E_P99=$(med p99_ms "$WORK"/res/etcd-*.json)
BAD=$(python3 -c 'import json,sys; print(sum(json.load(open(f))["non2xx"]+json.load(open(f))["socket_errors"] for f in sys.argv[1:]))' "$WORK"/res/*.json)
reqs() { python3 -c 'import json,sys; print(sum(json.load(open(f))["requests"] for f in sys.argv[1:]))' "$@"; }
DIGITS=1
M_CPU=$(med cpu_us_per_req "$WORK"/res/muster-*.json)
N_CPU=$(med cpu_us_per_req "$WORK"/res/nginx-*.json)
E_CPU=$(med cpu_us_per_req "$WORK"/res/etcd-*.json)
DIGITS=3
R_NGINX=$(python3 -c "print(f'{$M_RPS / $N_RPS:.2f}')")
R_ETCD=$(python3 -c "print(f'{$M_RPS / $E_RPS:.2f}')")
verdict() { python3 -c "print('met' if $1 else 'MISSED')"; }
# Median over rounds of muster's req/s / the reference's req/s in the same round.
round_ratio() {
    python3 -c '
import json, statistics, sys
d, a, b, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
rps = lambda t, i: json.load(open(f"{d}/{t}-{i}.json"))["ok_rps"]
print("%.2f" % statistics.median(rps(a, i) / rps(b, i) for i in range(1, n + 1)))' "$WORK/res" muster "$1" "$ROUNDS"
}

cat <<EOF

=== discovery: one service, 10 instances, body $BODY_BYTES bytes ===
$(machine_info)
load: wrk -t2 -c64 -d${DURATION}s --latency, $ROUNDS rounds interleaved (muster, nginx, etcd), medians
                      req/s     p50 ms    p99 ms   server CPU us/req
muster              $(printf '%9s  %9s  %8s  %8s' "$M_RPS" "$M_P50" "$M_P99" "$M_CPU")
nginx static file   $(printf '%9s  %9s  %8s  %8s' "$N_RPS" "$(med p50_ms "$WORK"/res/nginx-*.json)" "$N_P99" "$N_CPU")
etcd 3.4 range      $(printf '%9s  %9s  %8s  %8s' "$E_RPS" "$(med p50_ms "$WORK"/res/etcd-*.json)" "$E_P99" "$E_CPU")
muster / nginx      $R_NGINX (medians), $(round_ratio nginx) (median of per-round ratios)   (target >= 0.7: $(verdict "$R_NGINX >= 0.7"))
muster / etcd       $R_ETCD (medians), $(round_ratio etcd) (median of per-round ratios)   (target >= 5: $(verdict "$R_ETCD >= 5"))
muster p99          $M_P99 ms   (target < 2 ms: $(verdict "$M_P99 < 2"))
failed requests     $BAD
light load (-t1 -c4) muster $(light "$WORK/light-muster.json") | nginx $(light "$WORK/light-nginx.json")
muster RSS          $((RSS0 / 1024)) MiB before the load, $((RSS1 / 1024)) MiB after $(reqs "$WORK"/res/muster-*.json) requests, $((RSS2 / 1024)) MiB after a /metrics scrape
/metrics scrape     ${SCRAPE_MS} ms the first time after the load, ${SCRAPE2_MS} ms the next
per-round req/s     muster $(for f in "$WORK"/res/muster-*.json; do python3 -c 'import json,sys; print(int(json.load(open(sys.argv[1]))["ok_rps"]), end=" ")' "$f"; done)| nginx $(for f in "$WORK"/res/nginx-*.json; do python3 -c 'import json,sys; print(int(json.load(open(sys.argv[1]))["ok_rps"]), end=" ")' "$f"; done)| etcd $(for f in "$WORK"/res/etcd-*.json; do python3 -c 'import json,sys; print(int(json.load(open(sys.argv[1]))["ok_rps"]), end=" ")' "$f"; done)
EOF
