#!/usr/bin/env python3
"""Drives muster's Consul-compatible API with the unmodified py-consul client.

Usage: py_consul_check.py HOST:PORT [NODE]

Run by crates/server/tests/it/consul_compat.rs against an agent it starts (with script
checks enabled); exits 0 when every step behaves as it does against Consul, and raises
with the step, what was expected and what came back otherwise. NODE is the agent's node
name (read from /v1/agent/self when not given).
"""

from __future__ import annotations

import http.server
import importlib.metadata
import sys
import threading
import time
import urllib.request

import consul
from consul import Check

DEADLINE = 20.0  # seconds any condition may take to come true (HTTP checks run every 1 s)


class Failed(AssertionError):
    pass


def step(msg: str) -> None:
    print(f"- {msg}", flush=True)


def expect(cond: bool, what: str, got=None) -> None:
    if not cond:
        raise Failed(f"{what}; got: {got!r}")


def eventually(what: str, probe, deadline: float = DEADLINE):
    """Polls probe() until it returns a truthy value; fails after deadline seconds."""
    end = time.monotonic() + deadline
    last = None
    while True:
        last = probe()
        if last:
            return last
        if time.monotonic() > end:
            raise Failed(f"{what}: not true after {deadline} s; last probe: {last!r}")
        time.sleep(0.05)  # polling interval, not synchronisation


class Target(http.server.BaseHTTPRequestHandler):
    """The HTTP check target: answers `status` (200 until a test flips it)."""

    status = 200
    hits = 0
    probe_headers: list = []

    def do_GET(self):  # noqa: N802 (http.server's naming)
        Target.hits += 1
        Target.probe_headers.append(self.headers.get("X-Probe"))
        body = b"ok\n" if Target.status < 300 else b"down\n"
        self.send_response(Target.status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def parked_watchers(base: str) -> int:
    """muster's gauge of parked blocking queries (process-wide; used only to sync)."""
    try:
        with urllib.request.urlopen(f"{base}/metrics", timeout=5) as r:
            for line in r.read().decode().splitlines():
                if line.startswith("muster_parked_watchers "):
                    return int(float(line.split()[1]))
    except OSError:
        pass
    return -1


def ids(entries) -> list[str]:
    return sorted(e["Service"]["ID"] for e in entries)


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit("usage: py_consul_check.py HOST:PORT [NODE]")
    host, port = sys.argv[1].rsplit(":", 1)
    base = f"http://{host}:{port}"
    try:
        version = importlib.metadata.version("py-consul")
    except importlib.metadata.PackageNotFoundError:
        raise Failed("the consul module is not py-consul (pip install py-consul)") from None
    print(f"py-consul {version} against {base}", flush=True)

    c = consul.Consul(host=host, port=int(port))

    step("agent.self: Config.NodeName and Config.Datacenter")
    me = c.agent.self()
    expect(isinstance(me, dict) and isinstance(me.get("Config"), dict), "agent.self() is an object with Config", me)
    node = sys.argv[2] if len(sys.argv) > 2 else me["Config"]["NodeName"]
    expect(me["Config"].get("NodeName") == node, f"Config.NodeName == {node!r}", me["Config"])
    dc = me["Config"].get("Datacenter")
    expect(isinstance(dc, str) and dc, "Config.Datacenter is a non-empty string", me["Config"])
    expect(all(isinstance(v, dict) or v is None for v in me.values()), "every top-level value of agent/self is an object", me)

    step("status.leader / status.peers")
    leader = c.status.leader()
    expect(isinstance(leader, str) and leader != "", "status.leader() is a non-empty string", leader)
    peers = c.status.peers()
    expect(isinstance(peers, list) and leader in peers, "status.peers() lists the leader", peers)

    step("catalog.datacenters")
    expect(c.catalog.datacenters() == [dc], f"catalog.datacenters() == [{dc!r}]", c.catalog.datacenters())

    step("agent.members")
    members = c.agent.members()
    expect(isinstance(members, list) and any(m.get("Name") == node and m.get("Status") == 1 for m in members),
           "agent.members() lists this node alive (Status 1)", members)

    # --- A service with a TTL check -------------------------------------------------------
    step("register py-web-1 (TTL check, tags, meta)")
    ok = c.agent.service.register(
        "py-web",
        service_id="py-web-1",
        address="127.0.0.1",
        port=8080,
        tags=["v1", "Primary"],
        meta={"version": "1.2"},
        check=Check.ttl("5m"),
    )
    expect(ok is True, "agent.service.register() returns True", ok)

    index, entries = c.health.service("py-web")
    expect(int(index) >= 1, "X-Consul-Index >= 1", index)
    expect(ids(entries) == ["py-web-1"], "health.service('py-web') lists py-web-1 whatever its health", entries)
    checks = {ch["CheckID"]: ch for ch in entries[0]["Checks"]}
    expect("service:py-web-1" in checks, "the single check is named service:py-web-1", list(checks))
    expect(checks["service:py-web-1"]["Status"] == "critical", "a TTL check starts critical", checks["service:py-web-1"])
    expect(checks["service:py-web-1"]["ServiceName"] == "py-web", "the check carries its ServiceName", checks["service:py-web-1"])
    expect(entries[0]["Node"]["Node"] == node, f"Node.Node == {node!r}", entries[0]["Node"])
    svc = entries[0]["Service"]
    expect(svc["Service"] == "py-web" and svc["Port"] == 8080 and svc["Address"] == "127.0.0.1",
           "Service has Service/Port/Address as registered", svc)
    expect(sorted(svc["Tags"]) == ["Primary", "v1"] and svc["Meta"] == {"version": "1.2"}, "Service Tags and Meta as registered", svc)

    step("health.service(passing=True) is empty while the TTL check is critical")
    _, entries = c.health.service("py-web", passing=True)
    expect(entries == [], "no passing instance while critical", entries)

    step("agent.check.ttl_pass makes it passing")
    expect(c.agent.check.ttl_pass("service:py-web-1", "all good") is True, "ttl_pass() returns True")
    _, entries = c.health.service("py-web", passing=True)
    expect(ids(entries) == ["py-web-1"], "py-web-1 passing after ttl_pass", entries)
    out = {ch["CheckID"]: ch for ch in entries[0]["Checks"]}["service:py-web-1"]
    expect(out["Status"] == "passing" and out["Output"] == "all good", "Status passing, Output = the note", out)

    step("agent.check.ttl_warn: warning is not passing")
    expect(c.agent.check.ttl_warn("service:py-web-1", "slow") is True, "ttl_warn() returns True")
    _, entries = c.health.service("py-web", passing=True)
    expect(entries == [], "a warning instance is dropped by passing=True", entries)
    _, entries = c.health.service("py-web")
    expect(ids(entries) == ["py-web-1"], "but still listed without passing", entries)

    step("agent.check.ttl_fail removes it from passing")
    expect(c.agent.check.ttl_pass("service:py-web-1") is True, "ttl_pass() returns True")
    _, entries = c.health.service("py-web", passing=True)
    expect(ids(entries) == ["py-web-1"], "passing again", entries)
    expect(c.agent.check.ttl_fail("service:py-web-1", "broken") is True, "ttl_fail() returns True")
    _, entries = c.health.service("py-web", passing=True)
    expect(entries == [], "gone from passing after ttl_fail", entries)
    _, crit = c.health.state("critical")
    expect(any(ch["CheckID"] == "service:py-web-1" for ch in crit), "health.state('critical') lists the failed check", crit)
    expect(c.agent.check.ttl_pass("service:py-web-1") is True, "ttl_pass() returns True")

    step("unknown IDs: py-consul maps the 404s to False")
    expect(c.agent.check.ttl_pass("no-such-check") is False, "ttl_pass(unknown) is False (404)")
    expect(c.agent.service.deregister("no-such-service") is False, "deregister(unknown) is False (404)")

    # --- Tags -----------------------------------------------------------------------------
    step("register py-web-2 (tag v2) and query by tag")
    expect(c.agent.service.register("py-web", service_id="py-web-2", port=8081, tags=["v2"],
                                    check=Check.ttl("5m")) is True, "register py-web-2")
    expect(c.agent.check.ttl_pass("service:py-web-2") is True, "ttl_pass py-web-2")
    _, entries = c.health.service("py-web", passing=True)
    expect(ids(entries) == ["py-web-1", "py-web-2"], "both passing", entries)
    _, entries = c.health.service("py-web", tag="v1")
    expect(ids(entries) == ["py-web-1"], "health.service(tag='v1')", entries)
    _, entries = c.health.service("py-web", tag="primary")
    expect(ids(entries) == ["py-web-1"], "tag match is case-insensitive (tag='primary')", entries)
    _, entries = c.health.service("py-web", tag=["v1", "v2"])
    expect(entries == [], "several tags must all match", entries)
    _, entries = c.health.service("py-web", tag="v2", passing=True)
    expect(ids(entries) == ["py-web-2"], "tag and passing together", entries)
    _, entries = c.catalog.service("py-web", tag="v2")
    expect([e["ServiceID"] for e in entries] == ["py-web-2"], "catalog.service(tag='v2')", entries)
    _, entries = c.health.service("py-web", node_meta={"no-such-key": "x"})
    expect(entries == [], "a node-meta filter that does not match empties the list", entries)
    _, entries = c.health.service("py-web-absent")
    expect(entries == [], "an unknown service is []", entries)

    # --- Checks registered on their own, maintenance, replace-existing-checks -------------
    step("agent.check.register attaches a check to py-web-1; warn it")
    expect(c.agent.check.register("extra", check=Check.ttl("5m"), check_id="py-web-1-extra",
                                  service_id="py-web-1", notes="attached") is True, "check.register() returns True")
    expect(c.agent.check.ttl_warn("py-web-1-extra", "meh") is True, "ttl_warn on the attached check")
    agent_checks = c.agent.checks()
    extra = agent_checks.get("py-web-1-extra")
    expect(extra is not None and extra["ServiceID"] == "py-web-1" and extra["Status"] == "warning"
           and extra["Name"] == "extra" and extra["Notes"] == "attached",
           "agent.checks() shows the attached check, warning, with Name and Notes", extra)
    _, entries = c.health.service("py-web", passing=True)
    expect(ids(entries) == ["py-web-2"], "py-web-1 leaves passing while one of its checks warns", entries)
    _, hc = c.health.checks("py-web")
    expect({"service:py-web-1", "py-web-1-extra", "service:py-web-2"} <= {ch["CheckID"] for ch in hc},
           "health.checks('py-web') lists every check of the service", hc)

    step("re-register py-web-1 without replace_existing_checks keeps the attached check")
    expect(c.agent.service.register("py-web", service_id="py-web-1", address="127.0.0.1", port=8080,
                                    tags=["v1", "Primary"], meta={"version": "1.2"},
                                    check=Check.ttl("5m")) is True, "re-register")
    expect("py-web-1-extra" in c.agent.checks(), "the attached check stays", list(c.agent.checks()))
    step("... and with replace_existing_checks=True drops it")
    expect(c.agent.service.register("py-web", service_id="py-web-1", address="127.0.0.1", port=8080,
                                    tags=["v1", "Primary"], meta={"version": "1.2"},
                                    check=Check.ttl("5m"), replace_existing_checks=True) is True, "re-register")
    expect("py-web-1-extra" not in c.agent.checks(), "the attached check is gone", list(c.agent.checks()))
    expect(c.agent.check.ttl_pass("service:py-web-1") is True, "ttl_pass py-web-1")
    _, entries = c.health.service("py-web", passing=True)
    expect(ids(entries) == ["py-web-1", "py-web-2"], "both passing again", entries)

    step("agent.check.register + deregister")
    expect(c.agent.check.register("tmp", check=Check.ttl("5m"), check_id="py-web-2-tmp",
                                  service_id="py-web-2") is True, "check.register")
    expect("py-web-2-tmp" in c.agent.checks(), "registered", list(c.agent.checks()))
    expect(c.agent.check.deregister("py-web-2-tmp") is True, "check.deregister() returns True")
    expect("py-web-2-tmp" not in c.agent.checks(), "deregistered", list(c.agent.checks()))

    step("agent.service.maintenance on and off")
    expect(c.agent.service.maintenance("py-web-2", True, "upgrade") is True, "maintenance(True) returns True")
    maint = c.agent.checks().get("_service_maintenance:py-web-2")
    expect(maint is not None and maint["Status"] == "critical" and maint["Notes"] == "upgrade"
           and maint["ServiceID"] == "py-web-2", "a critical _service_maintenance:py-web-2 check with the reason", maint)
    _, entries = c.health.service("py-web", passing=True)
    expect(ids(entries) == ["py-web-1"], "an instance in maintenance is not passing", entries)
    expect(c.agent.service.maintenance("py-web-2", False) is True, "maintenance(False) returns True")
    expect("_service_maintenance:py-web-2" not in c.agent.checks(), "the maintenance check is gone")
    _, entries = c.health.service("py-web", passing=True)
    expect(ids(entries) == ["py-web-1", "py-web-2"], "passing again after maintenance", entries)

    # --- Active checks: HTTP, TCP, script, gRPC --------------------------------------------
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Target)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    target_port = server.server_address[1]
    url = f"http://127.0.0.1:{target_port}/health"

    step(f"register py-api-1 with an HTTP check on {url}; wait until passing")
    expect(c.agent.service.register("py-api", service_id="py-api-1", address="127.0.0.1", port=target_port,
                                    check=Check.http(url, "1s", timeout="1s", header={"X-Probe": ["muster"]})) is True, "register py-api-1")
    eventually("py-api-1 passing through its HTTP check",
               lambda: ids(c.health.service("py-api", passing=True)[1]) == ["py-api-1"])
    expect(Target.hits >= 1, "the agent called the HTTP target", Target.hits)
    expect("muster" in Target.probe_headers, "the HTTP check sent the header it was given", Target.probe_headers)
    http_check = c.agent.checks()["service:py-api-1"]
    expect(http_check["Type"] == "http" and http_check["Definition"].get("HTTP") == url
           and http_check["Definition"].get("Interval") == "1s",
           "agent.checks(): Type http, Definition.HTTP and Interval '1s'", http_check)

    step("the HTTP target answers 503: py-api-1 leaves passing")
    Target.status = 503
    eventually("py-api-1 out of passing", lambda: c.health.service("py-api", passing=True)[1] == [])
    Target.status = 200
    eventually("py-api-1 passing again", lambda: ids(c.health.service("py-api", passing=True)[1]) == ["py-api-1"])

    step("register py-multi-1 with a TTL, a TCP and a script check (service:<id>:<n> IDs)")
    expect(c.agent.service.register(
        "py-multi", service_id="py-multi-1", port=target_port,
        check=Check.ttl("5m"),
        extra_checks=[Check.tcp("127.0.0.1", target_port, "1s", timeout="1s"),
                      Check.script([sys.executable, "-c", "pass"], "1s")],
    ) is True, "register py-multi-1")
    _, hc = c.health.checks("py-multi")
    by_id = {ch["CheckID"]: ch for ch in hc}
    expect(set(by_id) == {"service:py-multi-1:1", "service:py-multi-1:2", "service:py-multi-1:3"},
           "checks named service:py-multi-1:1..3 in registration order", sorted(by_id))
    expect([by_id[f"service:py-multi-1:{n}"]["Type"] for n in (1, 2, 3)] == ["ttl", "tcp", "script"],
           "types ttl, tcp, script", [by_id[k]["Type"] for k in sorted(by_id)])
    expect(c.agent.check.ttl_pass("service:py-multi-1:1") is True, "ttl_pass the TTL check")
    eventually("py-multi-1 passing (TTL passed, TCP connects, script exits 0)",
               lambda: ids(c.health.service("py-multi", passing=True)[1]) == ["py-multi-1"])

    step("register py-grpc-1 with a gRPC check (stored; nothing listens, so never passing)")
    expect(c.agent.service.register("py-grpc", service_id="py-grpc-1", port=1,
                                    check=Check.grpc("127.0.0.1:1/health", "10s")) is True, "register py-grpc-1")
    g = c.agent.checks().get("service:py-grpc-1")
    expect(g is not None and g["Type"] == "grpc" and g["Status"] == "critical", "a critical grpc check", g)

    # --- Blocking queries -----------------------------------------------------------------
    step("blocking health.service: parks, and a TTL change wakes it")
    idx, _ = c.health.service("py-web")
    result: dict = {}

    def blocking_read():
        t0 = time.monotonic()
        try:
            result["answer"] = c.health.service("py-web", index=idx, wait="10s")
        except Exception as e:  # reported by the main thread
            result["error"] = e
        result["elapsed"] = time.monotonic() - t0

    before = parked_watchers(base)
    waiter = threading.Thread(target=blocking_read, daemon=True)
    waiter.start()
    # Give the agent up to 3 s to hold the query. The gauge is process-wide (other tests'
    # agents count too), so this is a hint, not an assertion: if the change lands before
    # the query parks, the query answers at once, which the checks below accept as well.
    hint_end = time.monotonic() + 3.0
    while "elapsed" not in result and parked_watchers(base) <= max(before, 0) and time.monotonic() < hint_end:
        time.sleep(0.02)
    expect("elapsed" not in result, "the blocking query waits while nothing changes", result)
    expect(c.agent.check.ttl_warn("service:py-web-1", "woken") is True, "ttl_warn py-web-1")
    t_change = time.monotonic()
    waiter.join(timeout=20)
    expect(not waiter.is_alive(), "the blocking query returned")
    expect("error" not in result, "the blocking query succeeded", result.get("error"))
    woke_after = time.monotonic() - t_change
    new_idx, entries = result["answer"]
    expect(result["elapsed"] < 8.0 and woke_after < 4.0,
           "woken by the change, well before wait=10s ran out", (result["elapsed"], woke_after))
    expect(int(new_idx) > int(idx), f"a larger index than {idx}", new_idx)
    w = {ch["CheckID"]: ch for e in entries for ch in e["Checks"]}.get("service:py-web-1")
    expect(w is not None and w["Status"] == "warning" and w["Output"] == "woken", "the answer shows the change", w)

    step("blocking health.service with nothing changing returns after its wait, same index")
    t0 = time.monotonic()
    same_idx, _ = c.health.service("py-web", index=new_idx, wait="1s")
    elapsed = time.monotonic() - t0
    expect(same_idx == new_idx, "the index is unchanged", (new_idx, same_idx))
    expect(0.95 <= elapsed < 3.0, "held for its wait (1s, plus at most wait/16 of jitter)", elapsed)

    step("blocking catalog.services woken by a new service")
    cidx, _ = c.catalog.services()
    result.clear()

    def blocking_services():
        # As a client does: block, and block again from the new index until the change
        # it waits for shows (another change may wake it first).
        t0 = time.monotonic()
        i = cidx
        while time.monotonic() - t0 < 15:
            i, services = c.catalog.services(index=i, wait="10s")
            if "py-late" in services:
                result["answer"] = (i, services)
                break
        result["elapsed"] = time.monotonic() - t0

    waiter = threading.Thread(target=blocking_services, daemon=True)
    waiter.start()
    expect(c.agent.service.register("py-late", service_id="py-late-1", port=9) is True, "register py-late-1")
    waiter.join(timeout=30)
    expect(not waiter.is_alive() and "answer" in result, "catalog.services blocking query returned", result)
    nidx, services = result["answer"]
    expect(int(nidx) > int(cidx) and "py-late" in services and result["elapsed"] < 8.0,
           "woken with a larger index and the new service", (cidx, nidx, result["elapsed"], services))

    # --- Catalog and agent views ----------------------------------------------------------
    step("catalog.services")
    _, services = c.catalog.services()
    expect(isinstance(services, dict) and sorted(services.get("py-web", [])) == ["Primary", "v1", "v2"],
           "catalog.services()['py-web'] is the union of the instances' tags", services)
    expect(services.get("py-late") == [], "a service without tags has []", services)

    step("catalog.service")
    _, cs = c.catalog.service("py-web")
    expect([e["ServiceID"] for e in cs] == ["py-web-1", "py-web-2"], "catalog.service lists every instance, sorted", cs)
    e1 = cs[0]
    expect(e1["ServiceName"] == "py-web" and e1["ServicePort"] == 8080 and e1["ServiceAddress"] == "127.0.0.1"
           and e1["Node"] == node and e1["ServiceMeta"] == {"version": "1.2"},
           "CatalogService fields as registered", e1)

    step("catalog.nodes / catalog.node")
    _, nodes = c.catalog.nodes()
    expect([n["Node"] for n in nodes] == [node], "catalog.nodes() is this node", nodes)
    _, nd = c.catalog.node(node)
    expect(nd["Node"]["Node"] == node and {"py-web-1", "py-web-2", "py-api-1"} <= set(nd["Services"]),
           "catalog.node() has the node and its services by ID", nd)
    _, none = c.catalog.node("no-such-node")
    expect(none is None, "catalog.node(unknown) is None (null)", none)

    step("agent.services / agent.service_definition")
    svcs = c.agent.services()
    expect({"py-web-1", "py-web-2", "py-api-1", "py-multi-1"} <= set(svcs), "agent.services() keys are service IDs", list(svcs))
    expect(svcs["py-web-1"]["Service"] == "py-web" and svcs["py-web-1"]["Port"] == 8080
           and svcs["py-web-1"]["Meta"] == {"version": "1.2"}, "agent.services()['py-web-1']", svcs["py-web-1"])
    d = c.agent.service_definition("py-web-2")
    expect(d["ID"] == "py-web-2" and d["Service"] == "py-web", "agent.service_definition('py-web-2')", d)

    step("agent.checks / health.node / health.state('any')")
    ac = c.agent.checks()
    expect({"service:py-web-1", "service:py-web-2", "service:py-api-1", "service:py-multi-1:2"} <= set(ac),
           "agent.checks() keys are check IDs", list(ac))
    _, hn = c.health.node(node)
    expect(any(ch["CheckID"] == "serfHealth" and ch["Status"] == "passing" for ch in hn),
           "health.node() includes serfHealth, passing", hn)
    _, anyc = c.health.state("any")
    expect({"serfHealth", "service:py-web-1"} <= {ch["CheckID"] for ch in anyc}, "health.state('any')", anyc)

    # --- Deregistration -------------------------------------------------------------------
    step("deregister everything")
    for sid in ("py-web-1", "py-web-2", "py-api-1", "py-multi-1", "py-grpc-1", "py-late-1"):
        expect(c.agent.service.deregister(sid) is True, f"deregister({sid!r}) returns True")
    _, entries = c.health.service("py-web")
    expect(entries == [], "health.service('py-web') is [] after deregistering", entries)
    _, services = c.catalog.services()
    expect(not any(k.startswith("py-") for k in services), "catalog.services() lists none of them", services)
    expect(not any(k.startswith("service:py-") for k in c.agent.checks()), "their checks are gone", c.agent.checks())
    server.shutdown()
    print("py-consul: all steps passed", flush=True)


if __name__ == "__main__":
    main()
