#!/usr/bin/env python3
"""Load driver and small helpers for the muster benchmarks (Python 3.11, standard library only).

Subcommands:
  populate    register many instances over many keep-alive connections, print the rate
  watchers    park blocking queries and SSE subscribers, make changes, time the wake-ups
              (the native API by default; --path/--index-header/--change-* for another)
  restart     exec the agent (or etcd) and time it until it is ready and serves a service
  propagation register on one agent at a fixed rate, time when blocking queries parked on
              another agent see each registration (cluster mode)
  etcd-load   put the instances of a discovery answer into etcd, print the range request
  etcd-leases grant etcd leases, write their ids one per line
  etcd-revision  etcd's current revision (through its gateway)
  median      median of a field over wrk/driver JSON result files
  annotate    add a server's CPU and bytes written during a wrk run to its JSON result
  usage       CPU seconds and bytes written so far by a process and its descendants
  gw-swap     register and deregister instances with a route tag, time until the gateway
              routes (or stops routing) each change
  hold        open many keep-alive connections, send one request on each, keep them open
  eureka-register  register Eureka instances <prefix>-0 .. -N-1 of one application
  eureka-delta  register Eureka instances through one connection at a fixed rate; after each
              acknowledgement, fetch the delta through another until it shows the instance
"""

import argparse
import asyncio
import base64
import http.client
import json
import os
import resource
import signal
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


async def populate_worker(port, jobs, depth, counts, make_request, route_tags=False):
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
                if route_tags:
                    # A gateway route per service, as a tagged fleet would have.
                    body = json.dumps(dict(REGISTER_BODY, tags=["a", f"urlprefix-/{service}"])).encode()
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
        await asyncio.gather(*(populate_worker(a.port, it, a.depth, counts, make, a.route_tags)
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


# --- propagation --------------------------------------------------------------------------


async def read_http(reader):
    """One HTTP/1.1 response with a Content-Length: (status, headers dict, body)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0][9:12])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(b":")
        if k:
            headers[k.strip().lower().decode()] = v.strip().decode()
    body = await reader.readexactly(int(headers.get("content-length", 0)))
    return status, headers, body


async def propagation_main(a):
    """Registrations go to agent A (--write-port) at --rate per second, open loop: the k-th is
    due at start + k/rate, sent on the first free one of --conns connections. Each lands in
    one of --lanes services, each watched on agent B (--read-port) by one blocking query that
    is parked again at once with the index it was answered with. A registration is seen when
    its service's query on B first answers with an index at or past the registration's
    modify_index; its propagation time runs from A's acknowledgement (and, second figure,
    from sending it) to that answer."""
    lanes = [f"{a.prefix}-{i}" for i in range(a.lanes)]
    body = json.dumps(REGISTER_BODY).encode()
    loop = asyncio.get_running_loop()

    # Every lane gets one instance first, so each query starts parked on an existing service.
    async def seed(lane_ids):
        reader, writer = await asyncio.open_connection("127.0.0.1", a.write_port)
        for lane in lane_ids:
            writer.write(register_request(lanes[lane], "seed", body))
            await writer.drain()
            status, _, _ = await read_http(reader)
            if status not in (200, 201):
                raise SystemExit(f"propagation: seeding {lanes[lane]} answered {status}")
        writer.close()

    await asyncio.gather(*(seed(range(i, a.lanes, 16)) for i in range(16)))
    answers = [[] for _ in lanes]  # per lane: (monotonic time, index), in arrival order
    stop = asyncio.Event()

    async def park(lane):
        reader, writer = await asyncio.open_connection("127.0.0.1", a.read_port)
        path = f"/api/v1/services/{lanes[lane]}"
        index = 0
        deadline = time.monotonic() + 30
        while index == 0:  # wait until B's copy has the seed
            writer.write(f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
            status, headers, payload = await read_http(reader)
            if status == 200 and json.loads(payload)["instances"]:
                index = int(headers["x-muster-index"])
            elif time.monotonic() > deadline:
                raise SystemExit(f"propagation: {path} not on the reading agent after 30 s")
            else:
                await asyncio.sleep(0.05)
        answers[lane].append((time.monotonic(), index))
        try:
            while not stop.is_set():
                writer.write(f"GET {path}?index={index}&wait=30s HTTP/1.1\r\nHost: bench\r\n\r\n"
                             .encode())
                status, headers, _ = await read_http(reader)
                t = time.monotonic()
                if status != 200:
                    raise SystemExit(f"propagation: blocking query on {path} answered {status}")
                index = int(headers["x-muster-index"])
                answers[lane].append((t, index))
        finally:
            writer.close()

    parkers = [asyncio.create_task(park(i)) for i in range(a.lanes)]
    await wait_until(lambda: all(answers), 60, "the blocking queries to start")
    await asyncio.sleep(0.5)

    total = int(a.rate * a.seconds)
    queue = asyncio.Queue()
    sent = []  # per registration: lane, due, sent, acked, status, index

    async def feeder():
        t0 = time.monotonic() + 0.1
        for k in range(total):
            due = t0 + k / a.rate
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            queue.put_nowait((k, due))
        for _ in range(a.conns):
            queue.put_nowait(None)

    async def writer_conn():
        reader, writer = await asyncio.open_connection("127.0.0.1", a.write_port)
        try:
            while (job := await queue.get()) is not None:
                k, due = job
                lane = k % a.lanes
                t_send = time.monotonic()
                writer.write(register_request(lanes[lane], f"p{k}", body))
                await writer.drain()
                status, _, payload = await read_http(reader)
                t_ack = time.monotonic()
                index = None
                if status in (200, 201):
                    index = json.loads(payload)["instance"]["modify_index"]
                sent.append((lane, due, t_send, t_ack, status, index))
        finally:
            writer.close()

    started = time.monotonic()
    await asyncio.gather(feeder(), *(writer_conn() for _ in range(a.conns)))
    send_secs = time.monotonic() - started
    last = {}
    for lane, _, _, _, _, index in sent:
        if index is not None:
            last[lane] = max(last.get(lane, 0), index)

    def caught_up():
        return all(answers[lane][-1][1] >= idx for lane, idx in last.items())

    try:
        await wait_until(caught_up, a.settle, "the reading agent to see every registration")
    except SystemExit:
        pass  # reported as missing below
    stop.set()
    for t in parkers:
        t.cancel()
    await asyncio.gather(*parkers, return_exceptions=True)

    from bisect import bisect_left
    from_ack, from_send, ack, missing, failed, late = [], [], [], 0, {}, 0
    for lane, due, t_send, t_ack, status, index in sent:
        if t_send - due > 0.010:
            late += 1
        if index is None:
            failed[status] = failed.get(status, 0) + 1
            continue
        ack.append((t_ack - t_send) * 1e3)
        seen_idx = [i for _, i in answers[lane]]
        pos = bisect_left(seen_idx, index)
        if pos == len(seen_idx):
            missing += 1
            continue
        t_seen = answers[lane][pos][0]
        from_ack.append((t_seen - t_ack) * 1e3)
        from_send.append((t_seen - t_send) * 1e3)

    def r(v):
        return None if v is None else round(v, 2)

    out({
        "rate": a.rate,
        "seconds": a.seconds,
        "lanes": a.lanes,
        "sent": len(sent),
        "acked": len(ack),
        "achieved_per_second": round(len(ack) / send_secs, 1),
        "failed": failed,
        "late_sends": late,
        "seen": len(from_ack),
        "missing": missing,
        "ack_p50_ms": r(pct(ack, 50)),
        "ack_p99_ms": r(pct(ack, 99)),
        "p50_ms": r(pct(from_ack, 50)),
        "p99_ms": r(pct(from_ack, 99)),
        "max_ms": r(max(from_ack) if from_ack else None),
        "seen_before_ack": sum(1 for v in from_ack if v < 0),
        "from_send_p50_ms": r(pct(from_send, 50)),
        "from_send_p99_ms": r(pct(from_send, 99)),
    })


def cmd_propagation(a):
    raise_nofile()
    asyncio.run(propagation_main(a))


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


# --- eureka -------------------------------------------------------------------------------


def eureka_instance(app, iid, n):
    return {"instance": {
        "instanceId": iid, "hostName": f"{iid}.bench", "app": app,
        "ipAddr": f"10.9.{n // 250}.{n % 250 + 1}", "status": "UP",
        "overriddenstatus": "UNKNOWN",
        "port": {"$": 8080, "@enabled": "true"},
        "securePort": {"$": 8443, "@enabled": "false"},
        "countryId": 1,
        "dataCenterInfo": {"@class": "com.netflix.appinfo.InstanceInfo$DefaultDataCenterInfo",
                           "name": "MyOwn"},
        "leaseInfo": {"renewalIntervalInSecs": 30, "durationInSecs": 600},
        "metadata": {"k": "v"},
        "vipAddress": app.lower(), "secureVipAddress": app.lower(),
        "lastDirtyTimestamp": "1",
    }}


def cmd_eureka_register(a):
    conn = http.client.HTTPConnection("127.0.0.1", a.port, timeout=10)
    for n in range(a.count):
        eureka_post(conn, a.app, f"{a.prefix}-{n}", n)
    out({"registered": a.count})


def eureka_post(conn, app, iid, n):
    """Registers instance `iid` of `app` (the n-th) on `conn`; exits unless answered 204."""
    conn.request("POST", f"/eureka/apps/{app}",
                 body=json.dumps(eureka_instance(app, iid, n)).encode(),
                 headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    resp.read()
    if resp.status != 204:
        raise SystemExit(f"registration {iid} answered {resp.status}")


def delta_ids(body, app):
    ids = set()
    for a in json.loads(body)["applications"].get("application", []):
        if a["name"] == app:
            for i in a.get("instance", []):
                ids.add(i["instanceId"])
    return ids


def cmd_eureka_delta(a):
    """Registration -> visible in the next delta fetch by another client."""
    writer = http.client.HTTPConnection("127.0.0.1", a.port, timeout=10)
    reader = http.client.HTTPConnection("127.0.0.1", a.read_port or a.port, timeout=10)
    json_accept = {"Accept": "application/json"}

    def get(conn, path):
        conn.request("GET", path, headers=json_accept)
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            raise SystemExit(f"GET {path} answered {resp.status}: {body[:200]!r}")
        return body

    visible_ms, first_hit, missing = [], 0, 0
    start = time.monotonic()
    for n in range(a.count):
        due = start + n / a.rate
        now = time.monotonic()
        if due > now:
            time.sleep(due - now)
        iid = f"{a.prefix}-{n}"
        eureka_post(writer, a.app, iid, n)
        acked = time.monotonic()
        fetches = 0
        while True:
            fetches += 1
            if iid in delta_ids(get(reader, "/eureka/apps/delta"), a.app):
                visible_ms.append((time.monotonic() - acked) * 1000)
                first_hit += fetches == 1
                break
            if time.monotonic() - acked > a.give_up:
                missing += 1
                break
    # Clients compare the delta's hashcode with the registry they rebuilt from it; it must
    # match a full fetch taken at the same index.
    delta = json.loads(get(reader, "/eureka/apps/delta"))["applications"]
    full = json.loads(get(reader, "/eureka/apps"))["applications"]
    r = lambda v: None if v is None else round(v, 3)
    out({
        "registrations": a.count,
        "rate": a.rate,
        "seen_by_first_delta_after_ack": first_hit,
        "missing": missing,
        "p50_ms": r(pct(visible_ms, 50)),
        "p99_ms": r(pct(visible_ms, 99)),
        "max_ms": r(max(visible_ms) if visible_ms else None),
        "hashcode_matches": delta["apps__hashcode"] == full["apps__hashcode"],
        "apps__hashcode": full["apps__hashcode"],
    })


# --- small helpers ------------------------------------------------------------------------


def cmd_etcd_revision(a):
    status, _, body = request(a.port, "POST", "/v3/kv/range", {"key": b64("\0")})
    if status != 200:
        raise SystemExit(f"etcd range answered {status}: {body[:200]!r}")
    print(json.loads(body)["header"]["revision"])


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


# --- gateway ------------------------------------------------------------------------------


class KeepAlive:
    """One keep-alive HTTP/1.1 connection for polling; reconnects when the server closes."""

    def __init__(self, port):
        self.port = port
        self.conn = None

    def get(self, path):
        for attempt in (0, 1):
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
            try:
                self.conn.request("GET", path)
                resp = self.conn.getresponse()
                resp.read()
                if resp.will_close:
                    self.conn.close()
                    self.conn = None
                return resp.status
            except (OSError, http.client.HTTPException):
                self.conn.close()
                self.conn = None
                if attempt:
                    raise
        return None


def cmd_gw_swap(a):
    """Round k registers swap-k (tagged urlprefix-/swap-k strip=/swap-k, pointing at the
    upstream) and times from the agent's answer until GET /swap-k<path> through the gateway
    answers 200; then deregisters it and times until the gateway stops answering 200 (404:
    the route went with its last instance). Polls on one keep-alive connection."""
    gw = KeepAlive(a.gateway_port)
    agent = http.client.HTTPConnection("127.0.0.1", a.agent_port, timeout=10)
    added, removed, failures = [], [], []

    def agent_call(method, path, body=None):
        data = None if body is None else json.dumps(body).encode()
        agent.request(method, path, body=data,
                      headers={"Content-Type": "application/json"} if data else {})
        resp = agent.getresponse()
        resp.read()
        return resp.status

    def wait_for(path, want_routed, k, what):
        deadline = time.monotonic() + a.timeout
        while True:
            status = gw.get(path)
            routed = status == 200
            if routed == want_routed:
                if not routed and status != 404:
                    failures.append(f"{what} {k}: the gateway answered {status}, not 404")
                return True
            if status not in (200, 404):
                failures.append(f"{what} {k}: the gateway answered {status} meanwhile")
            if time.monotonic() > deadline:
                failures.append(f"{what} {k}: not routed as expected after {a.timeout}s")
                return False

    for k in range(a.rounds):
        svc = f"swap-{k}"
        route = f"/{svc}{a.path}"
        if gw.get(route) != 404:
            failures.append(f"round {k}: {route} answered before registering")
        body = dict(REGISTER_BODY, address="127.0.0.1", port=a.upstream_port,
                    tags=[f"urlprefix-/{svc} strip=/{svc}"])
        status = agent_call("PUT", f"/api/v1/services/{svc}/instances/i-0", body)
        t0 = time.monotonic()
        if status not in (200, 201):
            failures.append(f"register {k}: the agent answered {status}")
            continue
        if wait_for(route, True, k, "register"):
            added.append((time.monotonic() - t0) * 1000)
        status = agent_call("DELETE", f"/api/v1/services/{svc}/instances/i-0")
        t0 = time.monotonic()
        if status not in (200, 204):
            failures.append(f"deregister {k}: the agent answered {status}")
            continue
        if wait_for(route, False, k, "deregister"):
            removed.append((time.monotonic() - t0) * 1000)

    both = added + removed
    r = lambda v: None if v is None else round(v, 2)
    out({"rounds": a.rounds, "swaps": len(both), "failures": len(failures),
         "failure_samples": failures[:5],
         "p50_ms": r(pct(both, 50)), "p99_ms": r(pct(both, 99)),
         "max_ms": r(max(both) if both else None),
         "register_p50_ms": r(pct(added, 50)), "register_p99_ms": r(pct(added, 99)),
         "deregister_p50_ms": r(pct(removed, 50)), "deregister_p99_ms": r(pct(removed, 99))})
    if failures:
        sys.exit(1)


def cmd_hold(a):
    """Opens --conns connections, sends GET --path on each (all at once), reads the answers,
    prints one JSON line, then keeps the connections open and idle until SIGTERM."""
    raise_nofile()
    req = b"GET %s HTTP/1.1\r\nHost: bench\r\n\r\n" % a.path.encode()

    async def one(counts, held):
        reader, writer = await asyncio.open_connection("127.0.0.1", a.port)
        writer.write(req)
        status = await read_response(reader)
        counts[status] = counts.get(status, 0) + 1
        held.append(writer)

    async def main():
        counts, held = {}, []
        sem = asyncio.Semaphore(100)

        async def limited():
            async with sem:
                await one(counts, held)

        await asyncio.gather(*(limited() for _ in range(a.conns)))
        out({"open": len(held), "statuses": counts})
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        for w in held:
            w.close()

    asyncio.run(main())


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
    s.add_argument("--route-tags", action="store_true",
                   help="tag each instance urlprefix-/<service>: one gateway route per service")
    s.set_defaults(fn=cmd_populate)

    s = sub.add_parser("gw-swap")
    s.add_argument("--agent-port", type=int, required=True)
    s.add_argument("--gateway-port", type=int, required=True)
    s.add_argument("--upstream-port", type=int, required=True,
                   help="what the instances point at: serves --path with 200")
    s.add_argument("--path", default="/bench/200b")
    s.add_argument("--rounds", type=int, default=100)
    s.add_argument("--timeout", type=float, default=5, help="seconds a change may take")
    s.set_defaults(fn=cmd_gw_swap)

    s = sub.add_parser("hold")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--conns", type=int, required=True)
    s.add_argument("--path", required=True)
    s.set_defaults(fn=cmd_hold)

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

    s = sub.add_parser("propagation")
    s.add_argument("--write-port", type=int, required=True, help="agent A: registrations")
    s.add_argument("--read-port", type=int, required=True, help="agent B: blocking queries")
    s.add_argument("--rate", type=float, required=True, help="registrations per second")
    s.add_argument("--seconds", type=float, default=10)
    s.add_argument("--lanes", type=int, default=500, help="services, one blocking query each")
    s.add_argument("--conns", type=int, default=128, help="connections to agent A")
    s.add_argument("--prefix", default="prop")
    s.add_argument("--settle", type=float, default=10,
                   help="seconds to wait after the last registration for B to see them all")
    s.set_defaults(fn=cmd_propagation)

    s = sub.add_parser("eureka-register")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--app", required=True)
    s.add_argument("--prefix", required=True)
    s.add_argument("--count", type=int, required=True)
    s.set_defaults(fn=cmd_eureka_register)

    s = sub.add_parser("eureka-delta")
    s.add_argument("--port", type=int, required=True, help="the agent registrations go to")
    s.add_argument("--read-port", type=int, help="the agent delta fetches go to (default: --port)")
    s.add_argument("--app", default="BENCH")
    s.add_argument("--prefix", default="d")
    s.add_argument("--count", type=int, default=300)
    s.add_argument("--rate", type=float, default=50, help="registrations per second")
    s.add_argument("--give-up", type=float, default=5, help="seconds before a registration counts as missing")
    s.set_defaults(fn=cmd_eureka_delta)

    s = sub.add_parser("etcd-revision")
    s.add_argument("--port", type=int, required=True)
    s.set_defaults(fn=cmd_etcd_revision)

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
