#!/usr/bin/env bash
# Discovery reads over HTTPS: muster's GET /api/v1/services/{service} (10 instances) on its
# HTTPS listener against nginx serving the same bytes as a static file over HTTPS, with the
# same certificate and key (ECDSA P-256, made here with openssl). The agent
# (--http-threads 1) and nginx (one worker) are pinned to CPU 0, wrk (-t1 -c32) to CPU 1;
# rounds interleave muster and nginx, and the figures are medians of per-round ratios.
#
#   keep-alive   requests on open connections: the cost of TLS records on top of HTTP
#   handshakes   wrk with `Connection: close`: every request on a new connection, so a TCP
#                connection and a TLS handshake each (wrk's OpenSSL offers the session it
#                got before, so these are resumed handshakes where the server resumes)
#   full         `openssl s_time -new -www PATH`: every connection a full TLS 1.3 handshake
#                (no resumption) and one HTTP/1.0 GET of the same body, one connection at a
#                time per client, $STIME_CLIENTS clients on CPU 1
#
# Target (issue: access control, TLS): keep-alive reads >= 0.7x nginx.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-8}
SERVICE=disc
SERVER_CPU=${SERVER_CPU:-0}
STIME_CLIENTS=${STIME_CLIENTS:-2}
export WRK_CPU=${WRK_CPU:-1}

need_python
need_wrk
need_nginx
need curl curl
need openssl openssl
build_muster

# One certificate and key for both servers: a CA and a server certificate for 127.0.0.1.
CERTS="$WORK/certs"
mkdir -p "$CERTS"
(
    cd "$CERTS"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
        -subj /CN=bench-ca -keyout ca.key -out ca.pem 2>/dev/null
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=bench \
        -keyout server.key -out server.csr 2>/dev/null
    printf 'subjectAltName=IP:127.0.0.1\n' >san.ext
    openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 \
        -extfile san.ext -out server.pem 2>/dev/null
)

MPORT=$(pick_port)
MTLS=$(pick_port)
NPORT=$(pick_port)

log "starting muster (HTTPS on $MTLS) and nginx (HTTPS on $NPORT), both on CPU $SERVER_CPU"
start_muster muster "$MPORT" --dev --disable-self-preservation --http-threads 1 \
    --tls-cert "$CERTS/server.pem" --tls-key "$CERTS/server.key" --https-addr "127.0.0.1:$MTLS"
taskset -apc "$SERVER_CPU" "$MUSTER_PID" >/dev/null
for i in $(seq 0 9); do
    curl -fsS -o /dev/null -X PUT "http://127.0.0.1:$MPORT/api/v1/services/$SERVICE/instances/i-$i" \
        -H 'Content-Type: application/json' \
        -d "{\"address\":\"10.0.0.$((i + 1))\",\"port\":8080,\"tags\":[\"a\"],\"meta\":{\"k\":\"v\"},\"zone\":\"z1\",\"ttl\":\"10m\"}"
done
MURL="https://127.0.0.1:$MTLS/api/v1/services/$SERVICE"
mkdir -p "$WORK/www"
curl -fsS --cacert "$CERTS/ca.pem" -o "$WORK/www/disc.json" "$MURL"
BODY_BYTES=$(stat -c %s "$WORK/www/disc.json")
[[ $(python3 -c 'import json,sys; print(len(json.load(open(sys.argv[1]))["instances"]))' "$WORK/www/disc.json") == 10 ]] \
    || die "discovery did not return 10 instances"

NDIR="$WORK/nginx"
nginx_conf "$NDIR" 1 "$NPORT ssl" "root $WORK/www;
        ssl_certificate $CERTS/server.pem;
        ssl_certificate_key $CERTS/server.key;
        ssl_protocols TLSv1.2 TLSv1.3;" \
    "types { application/json json; }"
spawn nginx taskset -c "$SERVER_CPU" nginx -c "$NDIR/nginx.conf" -e "$NDIR/error.log"
NGINX_PID=$SPAWNED_PID
NURL="https://127.0.0.1:$NPORT/disc.json"
deadline=$((SECONDS + 10))
until curl -fsS --cacert "$CERTS/ca.pem" -o /dev/null --max-time 1 "$NURL" 2>/dev/null; do
    ((SECONDS < deadline)) || die "nginx did not answer on $NURL"
    sleep 0.05
done
cmp -s <(curl -fsS --cacert "$CERTS/ca.pem" "$NURL") "$WORK/www/disc.json" \
    || die "nginx does not serve the same bytes"
# What each server negotiates with an OpenSSL client like wrk's, and whether it resumes a
# session (a second connection offering the ticket the first one got).
negotiated() {
    local port=$1 got
    got=$(openssl s_client -connect "127.0.0.1:$port" -CAfile "$CERTS/ca.pem" </dev/null 2>/dev/null |
        awk '/^New, / {v=$2; c=$NF} /^Server Temp Key/ {k=$4} /Verify return code/ {r=$4}
             END {sub(",", "", v); sub(",", "", k); printf "%s %s %s, verify %s", v, c, k, r}')
    sleep 1 | openssl s_client -connect "127.0.0.1:$port" -CAfile "$CERTS/ca.pem" \
        -sess_out "$WORK/session.$port" >/dev/null 2>&1 || true
    if openssl s_client -connect "127.0.0.1:$port" -CAfile "$CERTS/ca.pem" \
        -sess_in "$WORK/session.$port" </dev/null 2>/dev/null | grep -q '^Reused'; then
        echo "$got, resumes sessions"
    else
        echo "$got, does not resume sessions"
    fi
}
M_TLS=$(negotiated "$MTLS")
N_TLS=$(negotiated "$NPORT")

# s_time PORT PATH SECS OUT: connections/s (each a full handshake and a GET of PATH) from
# STIME_CLIENTS `openssl s_time -new` on CPU 1, for SECS seconds. Without a request the client
# would close before reading the server's session tickets, and muster would count a failed
# handshake per connection.
s_time() {
    local port=$1 path=$2 secs=$3 out=$4 i pids=()
    for i in $(seq "$STIME_CLIENTS"); do
        taskset -c "$WRK_CPU" openssl s_time -connect "127.0.0.1:$port" -new -www "$path" \
            -time "$secs" >"$out.$i.txt" 2>&1 &
        pids+=($!)
    done
    # These clients only: a bare `wait` would also wait for the servers this script started.
    wait "${pids[@]}"
    # "N connections in T real seconds, B bytes read per connection": T is whole seconds, so
    # divide by the run's length; B shows the body came back.
    python3 -c '
import re, sys
secs, body, files = float(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
n = 0
for f in files:
    m = re.search(r"(\d+) connections in \d+ real seconds, (\d+) bytes read per", open(f).read())
    if not m or int(m.group(2)) < body:
        sys.exit(f"s_time did not read the body: {open(f).read()[-300:]}")
    n += int(m.group(1))
print("{\"ok_rps\": %.1f}" % (n / secs))' "$secs" "$BODY_BYTES" "$out".*.txt >"$out"
}

mkdir -p "$WORK/res"
for r in $(seq "$ROUNDS"); do
    for t in muster nginx; do
        case $t in
            muster) url=$MURL pid=$MUSTER_PID port=$MTLS path=/api/v1/services/$SERVICE ;;
            nginx) url=$NURL pid=$NGINX_PID port=$NPORT path=/disc.json ;;
        esac
        run_wrk "$WORK/res/keepalive-$t-$r.json" "$BENCH_DIR/lua/get.lua" 1 32 "$DURATION" "$url" "$pid"
        log "round $r keep-alive $t: $(cat "$WORK/res/keepalive-$t-$r.json")"
        run_wrk "$WORK/res/close-$t-$r.json" "$BENCH_DIR/lua/close_get.lua" 1 32 "$DURATION" "$url" "$pid"
        log "round $r connection-close $t: $(cat "$WORK/res/close-$t-$r.json")"
        s_time "$port" "$path" "$DURATION" "$WORK/res/full-$t-$r.json"
        log "round $r full handshakes $t: $(cat "$WORK/res/full-$t-$r.json")"
    done
done

HS_FAILED=$(curl -fsS "http://127.0.0.1:$MPORT/metrics" |
    awk '/^muster_tls_handshake_failures_total/ {s += $2} END {print s + 0}')

med() { python3 "$DRIVER" median "$1" "${@:2}" --digits "${DIGITS:-0}"; }
# Median over rounds of muster / nginx in the same round, for KIND.
ratio() {
    python3 -c '
import json, statistics, sys
d, kind, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
rps = lambda t, i: json.load(open(f"{d}/{kind}-{t}-{i}.json"))["ok_rps"]
print("%.2f" % statistics.median(rps("muster", i) / rps("nginx", i) for i in range(1, n + 1)))' "$WORK/res" "$1" "$ROUNDS"
}
per_round() {
    for f in "$WORK"/res/"$1"-*.json; do
        python3 -c 'import json,sys; print(int(json.load(open(sys.argv[1]))["ok_rps"]), end=" ")' "$f"
    done
}
BAD=$(python3 -c 'import json,sys; print(sum(json.load(open(f))["non2xx"]+json.load(open(f))["socket_errors"] for f in sys.argv[1:]))' "$WORK"/res/keepalive-*.json "$WORK"/res/close-*.json)
verdict() { python3 -c "print('met' if $1 else 'MISSED')"; }
row() {
    local kind=$1 t=$2
    DIGITS=0
    printf '%-11s %-7s %9s' "$kind" "$t" "$(med ok_rps "$WORK"/res/"$kind-$t"-*.json)"
    if [[ $kind != full ]]; then
        DIGITS=3
        printf '  %8s' "$(med p99_ms "$WORK"/res/"$kind-$t"-*.json)"
        DIGITS=1
        printf '  %8s' "$(med cpu_us_per_req "$WORK"/res/"$kind-$t"-*.json)"
    fi
    printf '\n'
}
R_KA=$(ratio keepalive)
R_CLOSE=$(ratio close)
R_FULL=$(ratio full)

cat <<EOF

=== discovery over HTTPS: one service, 10 instances, body $BODY_BYTES bytes ===
$(machine_info)
certificate: ECDSA P-256 from a CA, the same files for both; negotiated with openssl s_client:
      muster $M_TLS | nginx $(nginx -v 2>&1 | cut -d/ -f2) $N_TLS
load: wrk -t1 -c32 -d${DURATION}s pinned to CPU $WRK_CPU; muster (--http-threads 1) and nginx (1 worker)
      pinned to CPU $SERVER_CPU; $ROUNDS rounds interleaved (muster, nginx); full handshakes:
      $STIME_CLIENTS x openssl s_time -new -www PATH -time $DURATION on CPU $WRK_CPU
kind        server      req/s    p99 ms   server CPU us/req
$(row keepalive muster)
$(row keepalive nginx)
$(row close muster)
$(row close nginx)
$(row full muster)
$(row full nginx)
keep-alive muster/nginx   $R_KA (median of per-round ratios)   (target >= 0.7: $(verdict "$R_KA >= 0.7"))
conn-close muster/nginx   $R_CLOSE (median of per-round ratios)
full hs    muster/nginx   $R_FULL (median of per-round ratios)
failed requests           $BAD; handshakes muster counted as failed: $HS_FAILED
per-round req/s   keep-alive muster $(per_round keepalive-muster)| nginx $(per_round keepalive-nginx)
                  conn-close muster $(per_round close-muster)| nginx $(per_round close-nginx)
                  full hs    muster $(per_round full-muster)| nginx $(per_round full-nginx)
EOF
