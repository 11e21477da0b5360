#!/usr/bin/env python3
"""Load driver and small helpers for the muster benchmarks (Python 3.11, standard library only).

Subcommands:
  populate    register many instances over many keep-alive connections, print the rate
  watchers    park blocking queries and SSE subscribers, make changes, time the wake-ups
              (the native API by default; --path/--index-header/--change-* for another)
  restart     exec the agent (or etcd) and time it until it is ready and serves a service
  etcd-load   put the instances of a discovery answer into etcd, print the range request
  etcd-leases grant etcd leases, write their ids one per line
  median      median of a field over wrk/driver JSON result files
  annotate    add a server's CPU and bytes written during a wrk run to its JSON result
  usage       CPU seconds and bytes written so far by a process and its descendants
"""

import argparse
import asyncio
import base64
import http.client
import json
import os
import resource
import socket
import statistics
import struct
import subprocess
import sys
import time

SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
SCM_TIMESTAMPNS = SO_TIMESTAMPNS
TIMESPEC = struct.Struct("qq")

REGISTER_BODY = {
    "address": "10.0.0.1",
    "port": 8080,
    "tags": ["a"],
    "meta": {"k": "v"},
    "zone": "z1",
    "ttl": "10m",
}


def out(obj):
    print(json.dumps(obj), flush=True)


def raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def request(port, method, path, body=None, timeout=10):
    """One HTTP request on a fresh connection: (status, headers dict, body bytes)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        payload = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, payload
    finally:
        conn.close()


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def metric(port, name):
    _, _, body = request(port, "GET", "/metrics")
    total = 0.0
    for line in body.decode().splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def pct(values, p):
    if not values:
        return None
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(round(p / 100.0 * len(s) + 0.5)) - 1))
    return s[k]


# --- populate -----------------------------------------------------------------------------


async def read_response(reader):
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    if length:
        await reader.readexactly(length)
    return status


def register_request(service, iid, body):
    return (b"PUT /api/v1/services/%s/instances/%s HTTP/1.1\r\nHost: bench\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (service.encode(), iid.encode(), len(body), body))


def etcd_put_request(service, iid, body):
    payload = json.dumps({"key": b64(f"svc/{service}/{iid}"), "value": b64(body)}).encode()
    return (b"POST /v3/kv/put HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))


async def populate_worker(port, jobs, depth, counts, make_request):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = json.dumps(REGISTER_BODY).encode()
    try:
        while True:
            batch = []
            for _ in range(depth):
                try:
                    batch.append(next(jobs))
                except StopIteration:
                    break
            if not batch:
                return
            for service, iid in batch:
                writer.write(make_request(service, iid, body))
            await writer.drain()
            for _ in batch:
                status = await read_response(reader)
                counts[status] = counts.get(status, 0) + 1
    finally:
        writer.close()


def cmd_populate(a):
    def jobs():
        for i in range(a.instances):
            svc = i % a.services
            yield f"{a.prefix}-{svc}", f"i-{i // a.services}"

    counts = {}
    it = jobs()

    make = etcd_put_request if a.etcd else register_request

    async def main():
        await asyncio.gather(*(populate_worker(a.port, it, a.depth, counts, make)
                               for _ in range(a.conns)))

    started = time.monotonic()
    asyncio.run(main())
    secs = time.monotonic() - started
    ok = counts.get(200, 0) + counts.get(201, 0)
    out({"instances": a.instances, "services": a.services, "ok": ok, "statuses": counts,
         "seconds": round(secs, 3), "per_second": round(ok / secs, 1)})
    if ok != a.instances:
        sys.exit(f"populate: only {ok} of {a.instances} registrations succeeded: {counts}")


# --- watchers -----------------------------------------------------------------------------


class Waiter:
    """One parked blocking query or SSE subscriber on a raw non-blocking socket."""

    __slots__ = ("sock", "sse", "buf", "armed", "t_kernel", "t_user", "status", "index",
                 "ready", "closed")

    def __init__(self, sock, sse):
        self.sock = sock
        self.sse = sse
        self.buf = bytearray()
        self.armed = False  # a change is in flight and this waiter has not seen it yet
        self.t_kernel = None
        self.t_user = None
        self.status = None
        self.index = None
        self.ready = False  # SSE: snapshot received
        self.closed = False


def kernel_ts(ancdata):
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == SCM_TIMESTAMPNS and len(data) >= 16:
            sec, nsec = TIMESPEC.unpack(data[:16])
            return sec * 1_000_000_000 + nsec
    return None


def on_readable(w, state):
    while True:
        try:
            data, anc, _, _ = w.sock.recvmsg(65536, 64)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data, anc = b"", []
        if not data:
            w.closed = True
            asyncio.get_running_loop().remove_reader(w.sock.fileno())
            return
        ts = kernel_ts(anc) or time.time_ns()
        w.buf += data
        if w.sse:
            if not w.ready:
                if b"event: snapshot" in w.buf and b"\n\n" in w.buf[w.buf.find(b"event: snapshot"):]:
                    w.ready = True
                    w.buf.clear()
                continue
            if w.armed and b"event: change" in w.buf:
                w.t_kernel, w.t_user, w.armed = ts, time.time_ns(), False
                tail = w.buf[w.buf.find(b"event: change"):]
                for line in tail.split(b"\n"):
                    if line.startswith(b"id:"):
                        try:
                            w.index = int(line[3:].strip())
                        except ValueError:
                            pass
                        break
                w.status = 200
                w.buf.clear()
                state["pending"] -= 1
        else:
            if w.armed and w.t_kernel is None:
                w.t_kernel, w.t_user = ts, time.time_ns()
            end = w.buf.find(b"\r\n\r\n")
            if end < 0:
                continue
            head = bytes(w.buf[:end]).split(b"\r\n")
            length = 0
            index = None
            for line in head[1:]:
                k, _, v = line.partition(b":")
                k = k.strip().lower()
                if k == b"content-length":
                    length = int(v)
                elif k == state["index_header"]:
                    index = int(v)
            if len(w.buf) < end + 4 + length:
                continue
            w.status = int(head[0][9:12])
            w.index = index
            del w.buf[: end + 4 + length]
            if w.armed:
                w.armed = False
                state["pending"] -= 1
            else:
                state["early"] += 1


async def open_waiter(loop, port, sse, request_bytes, sem):
    async with sem:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setblocking(False)
        await loop.sock_connect(s, ("127.0.0.1", port))
        await loop.sock_sendall(s, request_bytes)
        return Waiter(s, sse)


async def wait_until(pred, timeout, what):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise SystemExit(f"watchers: timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def watchers_main(a):
    loop = asyncio.get_running_loop()
    svc = a.service
    # The read the blocking queries watch: the native discovery read unless --path names one.
    path = a.path or f"/api/v1/services/{svc}"
    header = a.index_header.lower()
    status, headers, _ = request(a.port, "GET", path)
    if status != 200:
        raise SystemExit(f"watchers: {path} answered {status}")
    index = int(headers[header])
    rss_before = rss_kb(a.pid)
    state = {"pending": 0, "early": 0, "index_header": header.encode()}
    sep = "&" if "?" in path else "?"

    def blocking_req(idx):
        return (f"GET {path}{sep}index={idx}&wait={a.wait} HTTP/1.1\r\n"
                f"Host: bench\r\n\r\n").encode()

    sse_req = (f"GET /api/v1/watch?service={svc} HTTP/1.1\r\nHost: bench\r\n"
               f"Accept: text/event-stream\r\n\r\n").encode()
    sem = asyncio.Semaphore(256)
    t_open = time.monotonic()
    tasks = [open_waiter(loop, a.port, True, sse_req, sem) for _ in range(a.sse)]
    tasks += [open_waiter(loop, a.port, False, blocking_req(index), sem) for _ in range(a.blocking)]
    waiters = await asyncio.gather(*tasks)
    for w in waiters:
        loop.add_reader(w.sock.fileno(), on_readable, w, state)
    sse = [w for w in waiters if w.sse]
    blocking = [w for w in waiters if not w.sse]

    def parked():
        return metric(a.port, "muster_parked_watchers")

    await wait_until(lambda: all(w.ready for w in sse), 120, "SSE snapshots")
    await wait_until(lambda: parked() >= a.blocking, 120, "blocking queries to park")
    open_secs = time.monotonic() - t_open
    await asyncio.sleep(1.0)
    rss_after = rss_kb(a.pid)
    if state["early"]:
        raise SystemExit(f"watchers: {state['early']} blocking queries answered before any change")
    # Reference: a plain discovery read's round trip on a keep-alive connection, same agent,
    # same moment (watchers parked).
    conn = http.client.HTTPConnection("127.0.0.1", a.port, timeout=5)
    reads = []
    for _ in range(200):
        t = time.perf_counter()
        conn.request("GET", path)
        conn.getresponse().read()
        reads.append((time.perf_counter() - t) * 1e3)
    conn.close()

    rounds = []
    for r in range(a.rounds):
        if r > 0:
            # Park the blocking queries again at the index they were answered with.
            for w in blocking:
                if not w.closed:
                    w.sock.send(blocking_req(w.index))
            await wait_until(lambda: parked() >= sum(not w.closed for w in blocking), 60,
                             "blocking queries to park again")
            await asyncio.sleep(0.5)
        for w in waiters:
            w.t_kernel = w.t_user = None
            w.armed = not w.closed
            w.buf.clear() if not w.sse else None
        state["pending"] = sum(w.armed for w in waiters)
        # The change: a registration in the service (native by default, else --change-path
        # with --change-body, "{round}" in either replaced by the round number).
        if a.change_path:
            change_path = a.change_path.replace("{round}", str(r)).encode()
            body = (a.change_body or "").replace("{round}", str(r)).encode()
        else:
            change_path = b"/api/v1/services/%s/instances/change-%d" % (svc.encode(), r)
            body = json.dumps(REGISTER_BODY).encode()
        if a.defer_reads:
            # Read nothing while the agent answers: the answers wait in the kernel's socket
            # buffers with their arrival timestamps, and the driver takes no CPU from the
            # agent on these two shared cores (as clients on other machines would not).
            for w in waiters:
                if not w.closed:
                    loop.remove_reader(w.sock.fileno())
        reader, writer = await asyncio.open_connection("127.0.0.1", a.port)
        cpu0 = cpu_seconds(a.pid)
        mono0 = time.clock_gettime(time.CLOCK_MONOTONIC)
        t0 = time.time_ns()
        writer.write(
            b"PUT %s HTTP/1.1\r\nHost: bench\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (change_path, len(body), body))
        await writer.drain()
        change_status = await read_response(reader)
        t_change_done = time.time_ns()
        writer.close()
        if a.defer_reads:
            await asyncio.sleep(a.defer_reads)
            for w in waiters:
                if not w.closed:
                    loop.add_reader(w.sock.fileno(), on_readable, w, state)
        deadline = time.monotonic() + a.timeout
        while state["pending"] > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        mono1 = time.clock_gettime(time.CLOCK_MONOTONIC)
        agent_cpu = cpu_seconds(a.pid) - cpu0
        got_b = [w for w in blocking if w.t_kernel is not None and w.status == 200 and w.index and w.index > index]
        got_s = [w for w in sse if w.t_kernel is not None]
        lat = [(w.t_kernel - t0) / 1e6 for w in got_b + got_s]
        lat_user = [(w.t_user - t0) / 1e6 for w in got_b + got_s]
        lat_b = [(w.t_kernel - t0) / 1e6 for w in got_b]
        lat_s = [(w.t_kernel - t0) / 1e6 for w in got_s]
        rounds.append({
            "round": r + 1,
            "change_status": change_status,
            "change_ms": round((t_change_done - t0) / 1e6, 2),
            "received": len(got_b) + len(got_s),
            "received_blocking": len(got_b),
            "received_sse": len(got_s),
            "expected": a.blocking + a.sse,
            "p50_ms": round(pct(lat, 50), 2) if lat else None,
            "p99_ms": round(pct(lat, 99), 2) if lat else None,
            "max_ms": round(max(lat), 2) if lat else None,
            "blocking_p99_ms": round(pct(lat_b, 99), 2) if lat_b else None,
            "sse_p99_ms": round(pct(lat_s, 99), 2) if lat_s else None,
            # With deferred reads, user-space times are when the driver got round to reading.
            "userspace_p99_ms": round(pct(lat_user, 99), 2) if lat_user and not a.defer_reads else None,
            "agent_cpu_ms": round(agent_cpu * 1e3),
            "agent_cpu_us_per_watcher": round(agent_cpu * 1e6 / max(1, len(got_b) + len(got_s)), 1),
            "monotonic": [round(mono0, 3), round(mono1, 3)],
        })
        index = max((w.index or 0) for w in got_b) if got_b else index
    for w in waiters:
        try:
            loop.remove_reader(w.sock.fileno())
        except (ValueError, OSError):
            pass
        w.sock.close()
    out({
        "blocking": a.blocking,
        "sse": a.sse,
        "open_seconds": round(open_secs, 2),
        "rss_before_kb": rss_before,
        "rss_after_kb": rss_after,
        "kb_per_watcher": round((rss_after - rss_before) / (a.blocking + a.sse), 2),
        "reference_read_ms": round(statistics.median(reads), 3),
        "rounds": rounds,
    })


def cmd_watchers(a):
    raise_nofile()
    asyncio.run(watchers_main(a))


# --- restart ------------------------------------------------------------------------------


def cmd_restart(a):
    log = open(a.log, "ab")
    t0 = time.monotonic()
    proc = subprocess.Popen(a.agent_cmd, stdout=log, stderr=log)
    with open(a.pidfile, "w") as f:
        f.write(str(proc.pid))
    t_ready = t_serving = None
    deadline = t0 + a.timeout
    path = f"/api/v1/services/{a.service}"
    prefix = f"svc/{a.service}/"
    rng = {"key": b64(prefix), "range_end": b64(prefix[:-1] + "0")}
    while time.monotonic() < deadline and t_serving is None:
        if proc.poll() is not None:
            raise SystemExit(f"restart: the server exited with {proc.returncode}")
        try:
            if t_ready is None:
                status, _, _ = request(a.port, "GET", "/health" if a.etcd else "/readyz", timeout=1)
                if status == 200:
                    t_ready = time.monotonic()
            if t_ready is not None:
                if a.etcd:
                    status, _, body = request(a.port, "POST", "/v3/kv/range", rng, timeout=1)
                    found = int(json.loads(body).get("count", 0)) if status == 200 else 0
                else:
                    status, _, body = request(a.port, "GET", path, timeout=1)
                    found = len(json.loads(body)["instances"]) if status == 200 else 0
                if found >= a.expect:
                    t_serving = time.monotonic()
                    break
        except (OSError, http.client.HTTPException):
            pass
        time.sleep(0.002)
    if t_serving is None:
        raise SystemExit("restart: the agent did not serve the service in time")
    out({"pid": proc.pid, "ready_seconds": round(t_ready - t0, 3),
         "serving_seconds": round(t_serving - t0, 3)})


# --- etcd ---------------------------------------------------------------------------------


def b64(s):
    return base64.b64encode(s.encode() if isinstance(s, str) else s).decode()


def cmd_etcd_load(a):
    with open(a.body, "rb") as f:
        disc = json.load(f)
    for inst in disc["instances"]:
        key = a.prefix + inst["id"]
        value = json.dumps(inst, separators=(",", ":"))
        status, _, body = request(a.port, "POST", "/v3/kv/put",
                                  {"key": b64(key), "value": b64(value)})
        if status != 200:
            raise SystemExit(f"etcd put answered {status}: {body[:200]!r}")
    end = a.prefix[:-1] + chr(ord(a.prefix[-1]) + 1)
    rng = {"key": b64(a.prefix), "range_end": b64(end)}
    status, _, body = request(a.port, "POST", "/v3/kv/range", rng)
    count = int(json.loads(body).get("count", 0))
    if status != 200 or count != len(disc["instances"]):
        raise SystemExit(f"etcd range answered {status} with {count} keys")
    with open(a.range_out, "w") as f:
        json.dump(rng, f)
    out({"keys": count, "range_response_bytes": len(body)})


def cmd_etcd_leases(a):
    ids = []
    for _ in range(a.count):
        status, _, body = request(a.port, "POST", "/v3/lease/grant", {"TTL": a.ttl})
        if status != 200:
            raise SystemExit(f"etcd lease grant answered {status}: {body[:200]!r}")
        ids.append(json.loads(body)["ID"])
    with open(a.out, "w") as f:
        f.write("\n".join(ids) + "\n")
    out({"leases": len(ids)})


# --- small helpers ------------------------------------------------------------------------


def cmd_median(a):
    vals = []
    for path in a.files:
        with open(path) as f:
            v = json.load(f)
        for part in a.field.split("."):
            v = v[int(part)] if isinstance(v, list) else v[part]
        vals.append(float(v))
    print(f"{statistics.median(vals):.{a.digits}f}")


def cmd_annotate(a):
    """Adds a server's CPU and bytes written during a wrk run to the run's JSON result."""
    with open(a.file) as f:
        r = json.load(f)
    n = max(1, r["requests"])
    r["server_cpu_s"] = round(a.cpu1 - a.cpu0, 2)
    r["cpu_us_per_req"] = round((a.cpu1 - a.cpu0) * 1e6 / n, 1)
    r["write_bytes_per_req"] = round((a.w1 - a.w0) / n, 1)
    with open(a.file, "w") as f:
        json.dump(r, f)


def descendants(pid):
    children = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(d))
        except OSError:
            pass
    out_, todo = [], [pid]
    while todo:
        p = todo.pop()
        out_.append(p)
        todo.extend(children.get(p, []))
    return out_


def cmd_usage(a):
    """CPU seconds and bytes written to storage by a process and its descendants."""
    tck = os.sysconf("SC_CLK_TCK")
    ticks = written = 0
    for p in descendants(a.pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])
            with open(f"/proc/{p}/io") as f:
                for line in f:
                    if line.startswith("write_bytes:"):
                        written += int(line.split()[1])
        except OSError:
            pass
    print(f"{ticks / tck:.2f} {written}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="sub", required=True)

    s = sub.add_parser("populate")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--services", type=int, required=True)
    s.add_argument("--instances", type=int, required=True)
    s.add_argument("--prefix", default="svc")
    s.add_argument("--conns", type=int, default=128)
    s.add_argument("--depth", type=int, default=1, help="requests pipelined per connection")
    s.add_argument("--etcd", action="store_true",
                   help="put svc/<service>/<id> into etcd (gateway) instead of registering")
    s.set_defaults(fn=cmd_populate)

    s = sub.add_parser("watchers")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--pid", type=int, required=True)
    s.add_argument("--service", required=True)
    s.add_argument("--blocking", type=int, default=10000)
    s.add_argument("--sse", type=int, default=1000)
    s.add_argument("--rounds", type=int, default=3)
    s.add_argument("--timeout", type=float, default=20)
    s.add_argument("--path", help="the read to block on (default: /api/v1/services/SERVICE)")
    s.add_argument("--index-header", default="X-Muster-Index",
                   help="the response header carrying the index")
    s.add_argument("--wait", default="5m", help="the blocking queries' wait parameter")
    s.add_argument("--change-path",
                   help="PUT here to make the change ({round} is replaced by the round number);"
                        " default: register an instance in SERVICE through the native API")
    s.add_argument("--change-body", help="the change's JSON body ({round} replaced as well)")
    s.add_argument("--defer-reads", type=float, default=0,
                   help="seconds to leave the answers unread after the change (their kernel "
                        "receive timestamps still time them), so the driver takes no CPU from "
                        "the agent meanwhile; 0 reads them as they come")
    s.set_defaults(fn=cmd_watchers)

    s = sub.add_parser("restart")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--service", required=True)
    s.add_argument("--expect", type=int, required=True)
    s.add_argument("--pidfile", required=True)
    s.add_argument("--log", required=True)
    s.add_argument("--timeout", type=float, default=60)
    s.add_argument("--etcd", action="store_true",
                   help="the server is etcd: /health, then a prefix range over svc/<service>/")
    s.add_argument("agent_cmd", nargs=argparse.REMAINDER)
    s.set_defaults(fn=cmd_restart)

    s = sub.add_parser("etcd-load")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--body", required=True)
    s.add_argument("--prefix", required=True)
    s.add_argument("--range-out", required=True)
    s.set_defaults(fn=cmd_etcd_load)

    s = sub.add_parser("etcd-leases")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--count", type=int, required=True)
    s.add_argument("--ttl", type=int, default=600)
    s.add_argument("--out", required=True)
    s.set_defaults(fn=cmd_etcd_leases)

    s = sub.add_parser("median")
    s.add_argument("field")
    s.add_argument("files", nargs="+")
    s.add_argument("--digits", type=int, default=1)
    s.set_defaults(fn=cmd_median)

    s = sub.add_parser("annotate")
    s.add_argument("file")
    s.add_argument("cpu0", type=float)
    s.add_argument("w0", type=float)
    s.add_argument("cpu1", type=float)
    s.add_argument("w1", type=float)
    s.set_defaults(fn=cmd_annotate)

    s = sub.add_parser("usage")
    s.add_argument("pid", type=int)
    s.set_defaults(fn=cmd_usage)

    a = p.parse_args()
    if a.sub == "restart" and a.agent_cmd[:1] == ["--"]:
        a.agent_cmd = a.agent_cmd[1:]
    a.fn(a)


if __name__ == "__main__":
    main()
