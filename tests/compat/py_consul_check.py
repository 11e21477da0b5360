#!/usr/bin/env python3
"""Drives muster's Consul-compatible API with the unmodified py-consul client.

Usage: py_consul_check.py HOST:PORT [NODE]

Run by crates/server/tests/it/consul_compat.rs against an agent it starts (with script
checks enabled); exits 0 when every step behaves as it does against Consul, and raises
with the step, what was expected and what came back otherwise. NODE is the agent's node
name (read from /v1/agent/self when not given).
"""

from __future__ import annotations

import base64
import http.server
import importlib.metadata
import json
import sys
import threading
import time
import urllib.request

import consul
from checks import Failed, expect, step
from consul import Check
from consul.exceptions import ACLDisabled, BadRequest, ClientError, ConsulException, NotFound

DEADLINE = 20.0  # seconds any condition may take to come true (HTTP checks run every 1 s)


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


def until_parked(base: str, before: int, done) -> None:
    """Gives the agent up to 3 s to hold a blocking query just sent. The gauge is
    process-wide (other tests' agents count too), so this is a hint, not an assertion: if
    the change lands before the query parks, the query answers at once, which the checks
    after it accept as well."""
    end = time.monotonic() + 3.0
    while not done() and parked_watchers(base) <= max(before, 0) and time.monotonic() < end:
        time.sleep(0.02)


def raises(exc_type, call):
    """The exception call() raises, which must be an exc_type; fails when it returns."""
    try:
        got = call()
    except exc_type as e:
        return e
    raise Failed(f"expected {exc_type.__name__}; the call returned {got!r}")


def b64(data: bytes | str) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def ids(entries) -> list[str]:
    return sorted(e["Service"]["ID"] for e in entries)


def filter_steps(c, node: str) -> None:
    """`filter` (go-bexpr) through py-consul's filter_expr arguments. Expects py-web-1 (tags
    v1/Primary, Meta version=1.2, its TTL check warning), py-web-2 (tag v2, passing) and
    py-multi-1 (three checks)."""
    step("health.service(filter_expr=...)")
    _, entries = c.health.service("py-web", filter_expr='Service.Meta.version == "1.2"')
    expect(ids(entries) == ["py-web-1"], "filter on Service.Meta.version", entries)
    _, entries = c.health.service("py-web", filter_expr='"v2" in Service.Tags')
    expect(ids(entries) == ["py-web-2"], "filter '\"v2\" in Service.Tags'", entries)
    _, entries = c.health.service("py-web", filter_expr='Service.ID matches "-1$" or Service.Port == 8081')
    expect(ids(entries) == ["py-web-1", "py-web-2"], "filter with matches / or / a number", entries)
    _, entries = c.health.service("py-web", filter_expr=f'Node.Node == "{node}" and not ("v1" in Service.Tags)')
    expect(ids(entries) == ["py-web-2"], "filter with and / not / parentheses", entries)
    _, entries = c.health.service("py-web", passing=True, filter_expr='"v1" in Service.Tags')
    expect(entries == [], "passing and filter together (py-web-1 warns)", entries)

    step("catalog.service / catalog.services / catalog.nodes with filter_expr")
    _, cs = c.catalog.service("py-web", filter_expr='ServiceMeta.version == "1.2"')
    expect([e["ServiceID"] for e in cs] == ["py-web-1"], "catalog.service filter on ServiceMeta", cs)
    _, services = c.catalog.services(filter_expr='ServiceName == "py-web"')
    expect(list(services) == ["py-web"], "catalog.services filter on ServiceName", services)
    _, nodes = c.catalog.nodes(filter_expr=f'Node == "{node}"')
    expect([n["Node"] for n in nodes] == [node], "catalog.nodes filter on Node", nodes)
    _, nodes = c.catalog.nodes(filter_expr=f'Node != "{node}"')
    expect(nodes == [], "catalog.nodes filter matching nothing", nodes)

    step("agent.services / agent.checks / health.state with filter_expr")
    svcs = c.agent.services(filter_expr='Service == "py-web" and "v2" in Tags')
    expect(list(svcs) == ["py-web-2"], "agent.services filter on Service and Tags", svcs)
    ac = c.agent.checks(filter_expr='ServiceID == "py-multi-1"')
    expect(sorted(ac) == ["service:py-multi-1:1", "service:py-multi-1:2", "service:py-multi-1:3"],
           "agent.checks filter on ServiceID", sorted(ac))
    _, st = c.health.state("any", filter_expr='ServiceName == "py-web" and Status == "warning"')
    expect([ch["CheckID"] for ch in st] == ["service:py-web-1"], "health.state('any') filter", st)

    step("an invalid filter is a 400 (BadRequest)")
    e = raises(BadRequest, lambda: c.health.service("py-web", filter_expr="Service.Port =="))
    expect("Failed to create boolean expression evaluator" in str(e), "Consul's 400 message", str(e))


def kv_steps(c, base: str) -> None:
    step("kv.put / kv.get: text, binary, empty value, flags")
    expect(c.kv.put("py/kv/text", "hello") is True, "kv.put() returns True")
    idx, pair = c.kv.get("py/kv/text")
    expect(int(idx) >= 1, "X-Consul-Index >= 1", idx)
    expect(isinstance(pair, dict) and pair["Key"] == "py/kv/text" and pair["Value"] == b"hello"
           and pair["Flags"] == 0 and pair["LockIndex"] == 0 and "Session" not in pair
           and pair["CreateIndex"] == pair["ModifyIndex"] >= 1,
           "the pair: Key, Value (base64-decoded), Flags 0, LockIndex 0, Create/ModifyIndex", pair)
    blob = bytes(range(256)) + b"\x00\xff\r\n"
    expect(c.kv.put("py/kv/bin", blob) is True, "kv.put(binary)")
    _, pair = c.kv.get("py/kv/bin")
    expect(pair["Value"] == blob, "binary bytes round-trip", pair["Value"])
    expect(c.kv.put("py/kv/empty", None) is True, "kv.put(None): an empty body")
    _, pair = c.kv.get("py/kv/empty")
    expect(pair is not None and pair["Value"] is None, "an empty value reads back as Value null", pair)
    expect(c.kv.put("py/kv/empty2", b"") is True, "kv.put(b'')")
    _, pair = c.kv.get("py/kv/empty2")
    expect(pair is not None and pair["Value"] is None, "b'' reads back as Value null too", pair)
    expect(c.kv.put("py/kv/flags", "f", flags=42) is True, "kv.put(flags=42)")
    _, pair = c.kv.get("py/kv/flags")
    expect(pair["Flags"] == 42 and pair["Value"] == b"f", "Flags 42", pair)
    first_modify = c.kv.get("py/kv/text")[1]["ModifyIndex"]
    expect(c.kv.put("py/kv/text", "hello again") is True, "overwrite")
    _, pair = c.kv.get("py/kv/text")
    expect(pair["Value"] == b"hello again" and pair["ModifyIndex"] > first_modify
           and pair["CreateIndex"] < pair["ModifyIndex"], "an overwrite bumps ModifyIndex, keeps CreateIndex", pair)

    step("kv.put(cas=...): create-only, then check-and-set")
    expect(c.kv.put("py/kv/cas", "v1", cas=0) is True, "cas=0 creates a missing key")
    expect(c.kv.put("py/kv/cas", "v1b", cas=0) is False, "cas=0 on an existing key is False")
    _, pair = c.kv.get("py/kv/cas")
    expect(pair["Value"] == b"v1", "the failed cas=0 left the value", pair)
    m = pair["ModifyIndex"]
    expect(c.kv.put("py/kv/cas", "v2", cas=m) is True, "cas=<ModifyIndex> succeeds")
    expect(c.kv.put("py/kv/cas", "v3", cas=m) is False, "cas=<stale ModifyIndex> is False")
    _, pair = c.kv.get("py/kv/cas")
    expect(pair["Value"] == b"v2" and pair["ModifyIndex"] > m, "the stale cas left v2", pair)

    step("kv.get(recurse=True) / kv.get(keys=True, separator='/')")
    for k in ("py/tree/a", "py/tree/b/c", "py/tree/b/d", "py/tree/e/"):
        expect(c.kv.put(k, k.upper()) is True, f"kv.put({k!r})")
    _, pairs = c.kv.get("py/tree/", recurse=True)
    expect([p["Key"] for p in pairs] == ["py/tree/a", "py/tree/b/c", "py/tree/b/d", "py/tree/e/"],
           "recurse lists every pair under the prefix, sorted", pairs)
    expect(pairs[1]["Value"] == b"PY/TREE/B/C", "recurse decodes each Value", pairs[1])
    _, keys = c.kv.get("py/tree/", keys=True)
    expect(keys == ["py/tree/a", "py/tree/b/c", "py/tree/b/d", "py/tree/e/"], "keys=True lists keys", keys)
    _, keys = c.kv.get("py/tree/", keys=True, separator="/")
    expect(keys == ["py/tree/a", "py/tree/b/", "py/tree/e/"], "keys up to the separator, deduplicated", keys)
    _, keys = c.kv.get("py/tree/b", keys=True, separator="/")
    expect(keys == ["py/tree/b/"], "a prefix that is no folder", keys)

    step("a missing key: (index, None), also with recurse and keys")
    idx, none = c.kv.get("py/kv/missing")
    expect(none is None and int(idx) >= 1, "kv.get(missing) is (index, None) with an index", (idx, none))
    expect(c.kv.get("py/nothing/", recurse=True)[1] is None, "recurse on an empty prefix is None")
    expect(c.kv.get("py/nothing/", keys=True)[1] is None, "keys on an empty prefix is None")

    step("kv.delete(cas=...) / kv.delete(recurse=True)")
    _, pair = c.kv.get("py/kv/cas")
    m = pair["ModifyIndex"]
    expect(c.kv.delete("py/kv/cas", cas=m - 1) is False, "delete with a stale cas is False")
    expect(c.kv.get("py/kv/cas")[1] is not None, "and leaves the key")
    expect(c.kv.delete("py/kv/cas", cas=m) is True, "delete with the right cas")
    expect(c.kv.get("py/kv/cas")[1] is None, "the key is gone")
    raises(BadRequest, lambda: c.kv.delete("py/tree/", recurse=True, cas=m))
    expect(c.kv.delete("py/tree/b/", recurse=True) is True, "delete recurse a sub-tree")
    _, keys = c.kv.get("py/tree/", keys=True)
    expect(keys == ["py/tree/a", "py/tree/e/"], "only that sub-tree went", keys)
    expect(c.kv.delete("py/tree/a") is True, "delete one key")
    expect(c.kv.delete("py/tree/a") is True, "deleting a missing key is True as well")
    expect(c.kv.delete("py/tree", recurse=True) is True, "delete recurse the rest")
    expect(c.kv.get("py/tree/", recurse=True)[1] is None, "nothing left under py/tree/")

    step("blocking kv.get on a missing key: parked, woken when the key is written")
    idx, none = c.kv.get("py/kv/later")
    expect(none is None, "py/kv/later is missing", none)
    result: dict = {}

    def blocking_get():
        t0 = time.monotonic()
        try:
            result["answer"] = c.kv.get("py/kv/later", index=idx, wait="10s")
        except Exception as e:  # reported by the main thread
            result["error"] = e
        result["elapsed"] = time.monotonic() - t0

    before = parked_watchers(base)
    waiter = threading.Thread(target=blocking_get, daemon=True)
    waiter.start()
    until_parked(base, before, lambda: "elapsed" in result)
    expect("elapsed" not in result, "the blocking get waits while the key is missing", result)
    expect(c.kv.put("py/kv/later", "arrived") is True, "kv.put('py/kv/later')")
    t_change = time.monotonic()
    waiter.join(timeout=20)
    expect(not waiter.is_alive(), "the blocking get returned")
    expect("error" not in result, "the blocking get succeeded", result.get("error"))
    woke_after = time.monotonic() - t_change
    new_idx, pair = result["answer"]
    expect(result["elapsed"] < 8.0 and woke_after < 4.0,
           "woken by the write, well before wait=10s ran out", (result["elapsed"], woke_after))
    expect(int(new_idx) > int(idx), f"a larger index than {idx}", new_idx)
    expect(pair is not None and pair["Value"] == b"arrived", "the answer is the new pair", pair)

    step("blocking kv.get with nothing changing returns after its wait, same index")
    t0 = time.monotonic()
    same_idx, pair = c.kv.get("py/kv/later", index=new_idx, wait="1s")
    elapsed = time.monotonic() - t0
    expect(same_idx == new_idx and pair["Value"] == b"arrived", "the index and pair are unchanged", (new_idx, same_idx, pair))
    expect(0.95 <= elapsed < 3.0, "held for its wait (1s, plus at most wait/16 of jitter)", elapsed)

    expect(c.kv.delete("py/", recurse=True) is True, "clean up py/")
    expect(c.kv.get("py/", recurse=True)[1] is None, "nothing left under py/")


def session_steps(c, node: str) -> None:
    step("session.create (TTL, behavior release) and session.info / list / node")
    s1 = c.session.create(name="py-lock-1", ttl=30, behavior="release")
    s2 = c.session.create(name="py-lock-2", ttl=30)
    expect(isinstance(s1, str) and len(s1) == 36 and s1 != s2, "session.create() returns a UUID", (s1, s2))
    _, info = c.session.info(s1)
    expect(info is not None and info["ID"] == s1 and info["Name"] == "py-lock-1" and info["Node"] == node
           and info["Behavior"] == "release" and info["TTL"] == "30s" and info["LockDelay"] == 15_000_000_000,
           "session.info(): ID, Name, Node, Behavior, TTL '30s', LockDelay 15 s in ns", info)
    _, sessions = c.session.list()
    expect({s1, s2} <= {s["ID"] for s in sessions}, "session.list() has both", sessions)
    _, sessions = c.session.node(node)
    expect({s1, s2} <= {s["ID"] for s in sessions}, "session.node(node) has both", sessions)

    step("lock: acquire with s1, contend with s2, release, s2 acquires")
    key = "py/lock/leader"
    expect(c.kv.put(key, "s1 holds", acquire=s1) is True, "s1 acquires the lock")
    _, pair = c.kv.get(key)
    expect(pair["Session"] == s1 and pair["LockIndex"] == 1 and pair["Value"] == b"s1 holds",
           "the key names s1 as holder, LockIndex 1", pair)
    expect(c.kv.put(key, "s2 wants", acquire=s2) is False, "s2 cannot acquire a held lock")
    expect(c.kv.put(key, "s2 frees", release=s2) is False, "s2 cannot release s1's lock")
    _, pair = c.kv.get(key)
    expect(pair["Session"] == s1 and pair["Value"] == b"s1 holds", "the failed acquire/release changed nothing", pair)
    e = raises(BadRequest, lambda: c.kv.put(key, "x", cas=pair["ModifyIndex"], acquire=s1))
    expect("Conflicting flags" in str(e), "cas with acquire is 400 Conflicting flags", str(e))
    expect(c.kv.put(key, "free", release=s1) is True, "s1 releases")
    _, pair = c.kv.get(key)
    expect("Session" not in pair and pair["Value"] == b"free" and pair["LockIndex"] == 1,
           "released: no Session, the release's value, LockIndex kept", pair)
    expect(c.kv.put(key, "s2 holds", acquire=s2) is True, "s2 acquires after the release")
    _, pair = c.kv.get(key)
    expect(pair["Session"] == s2 and pair["LockIndex"] == 2, "s2 holds it, LockIndex 2", pair)

    step("session.renew / session.destroy")
    renewed = c.session.renew(s1)
    expect(isinstance(renewed, dict) and renewed["ID"] == s1 and renewed["TTL"] == "30s", "session.renew() returns the session", renewed)
    expect(c.session.destroy(s1) is True, "session.destroy(s1) returns True")
    _, info = c.session.info(s1)
    expect(info is None, "session.info(destroyed) is None", info)
    _, sessions = c.session.list()
    expect(s1 not in {s["ID"] for s in sessions} and s2 in {s["ID"] for s in sessions}, "session.list() drops s1 only", sessions)
    raises(NotFound, lambda: c.session.renew(s1))
    _, pair = c.kv.get(key)
    expect(pair["Session"] == s2, "destroying s1 did not touch s2's lock", pair)
    expect(c.session.destroy(s2) is True, "session.destroy(s2)")
    _, pair = c.kv.get(key)
    expect(pair is not None and "Session" not in pair and pair["Value"] == b"s2 holds",
           "behavior release: s2's destroy releases its lock and keeps the key", pair)

    step("a session with behavior delete: its destroy deletes the key it holds")
    s3 = c.session.create(name="py-ephemeral", behavior="delete", ttl=30)
    _, info = c.session.info(s3)
    expect(info["Behavior"] == "delete", "Behavior delete", info)
    expect(c.kv.put("py/lock/ephemeral", "here while s3 lives", acquire=s3) is True, "s3 acquires")
    expect(c.kv.get("py/lock/ephemeral")[1]["Session"] == s3, "held by s3")
    expect(c.session.destroy(s3) is True, "session.destroy(s3)")
    _, pair = c.kv.get("py/lock/ephemeral")
    expect(pair is None, "the key went with the session", pair)
    expect(c.kv.delete("py/", recurse=True) is True, "clean up py/")


def txn_steps(c) -> None:
    step("txn.put: a multi-operation transaction")
    expect(c.kv.put("py/txn/seed", "seed") is True, "seed key")
    out = c.txn.put([
        {"KV": {"Verb": "set", "Key": "py/txn/a", "Value": b64("one")}},
        {"KV": {"Verb": "set", "Key": "py/txn/b", "Value": b64(b"\x00two"), "Flags": 7}},
        {"KV": {"Verb": "get", "Key": "py/txn/seed"}},
    ])
    expect(isinstance(out, dict) and out.get("Errors") is None and len(out.get("Results") or []) == 3,
           "txn.put() returns Results for each operation and no Errors", out)
    res = [r["KV"] for r in out["Results"]]
    expect([r["Key"] for r in res] == ["py/txn/a", "py/txn/b", "py/txn/seed"], "Results in operation order", res)
    expect(res[0]["Value"] is None and res[1]["Flags"] == 7, "set results carry no Value, their Flags", res[:2])
    expect(res[2]["Value"] == b64("seed"), "the get result has the value (base64)", res[2])
    _, pair = c.kv.get("py/txn/b")
    expect(pair["Value"] == b"\x00two" and pair["Flags"] == 7, "the transaction wrote py/txn/b", pair)
    a = c.kv.get("py/txn/a")[1]
    expect(a["Value"] == b"one", "and py/txn/a", a)

    step("txn.put: a failing operation rolls back the whole transaction (409)")
    e = raises(ClientError, lambda: c.txn.put([
        {"KV": {"Verb": "set", "Key": "py/txn/c", "Value": b64("three")}},
        {"KV": {"Verb": "delete", "Key": "py/txn/seed"}},
        {"KV": {"Verb": "cas", "Key": "py/txn/a", "Value": b64("stale"), "Index": a["ModifyIndex"] - 1}},
    ]))
    code, _, body = str(e).partition(" ")
    expect(code == "409", "py-consul raises ClientError('409 ...')", str(e))
    answer = json.loads(body)
    errors = answer.get("Errors") or []
    expect(answer.get("Results") is None and len(errors) == 1 and errors[0].get("OpIndex") == 2
           and "py/txn/a" in errors[0].get("What", ""),
           "Errors name the failing operation (OpIndex 2) and its key", answer)
    expect(c.kv.get("py/txn/c")[1] is None, "the set before it was rolled back")
    expect(c.kv.get("py/txn/seed")[1]["Value"] == b"seed", "the delete before it was rolled back")
    expect(c.kv.get("py/txn/a")[1]["Value"] == b"one", "the cas target is unchanged")
    expect(c.kv.delete("py/", recurse=True) is True, "clean up py/")


def event_steps(c) -> None:
    step("event.fire with a payload / event.list by name")
    ev = c.event.fire("py-deploy", "build 42")
    expect(isinstance(ev, dict) and ev.get("Name") == "py-deploy" and isinstance(ev.get("ID"), str) and ev["ID"]
           and base64.b64decode(ev.get("Payload") or "") == b"build 42",
           "event.fire() returns the event: Name, ID, Payload (base64)", ev)
    other = c.event.fire("py-other")
    expect(other.get("Name") == "py-other" and other.get("Payload") is None, "an event without payload has Payload null", other)
    ev2 = c.event.fire("py-deploy", "build 43")
    expect(ev2["ID"] != ev["ID"], "each event has its own ID", (ev, ev2))
    idx, events = c.event.list(name="py-deploy")
    expect([e["ID"] for e in events] == [ev["ID"], ev2["ID"]], "event.list(name=) has the two events, oldest first", events)
    expect([e["Payload"] for e in events] == [b"build 42", b"build 43"], "with their payloads (decoded)", events)
    expect(int(idx) >= 1, "X-Consul-Index >= 1", idx)
    _, everything = c.event.list()
    expect({ev["ID"], other["ID"], ev2["ID"]} <= {e["ID"] for e in everything}, "event.list() has every event", everything)
    _, none = c.event.list(name="py-no-such-event")
    expect(none == [], "event.list(unknown name) is []", none)


def node_identity_steps(c) -> None:
    step("catalog.register: the same service ID on two nodes sharing an address is two instances")
    for node in ("py-n1", "py-n2"):
        ok = c.catalog.register(node, "10.9.0.1", service={"service": "py-dup", "id": "py-dup", "port": 80})
        expect(ok is True, f"catalog.register on {node}", ok)
    _, entries = c.catalog.service("py-dup")
    pairs = sorted((e["Node"], e["ServiceID"]) for e in entries)
    expect(pairs == [("py-n1", "py-dup"), ("py-n2", "py-dup")], "one instance per node", pairs)
    _, nodes = c.catalog.nodes()
    names = {n["Node"] for n in nodes}
    expect({"py-n1", "py-n2"} <= names, "both nodes listed", names)
    step("catalog.deregister on one node leaves the other's")
    ok = c.catalog.deregister("py-n1", service_id="py-dup")
    expect(ok is True, "catalog.deregister", ok)
    _, entries = c.catalog.service("py-dup")
    expect([e["Node"] for e in entries] == ["py-n2"], "n2's instance stays", entries)
    c.catalog.deregister("py-n2")


def refusal_steps(c) -> None:
    """What Consul refuses, refused the way Consul refuses it (expected from Consul's source)."""
    step("agent.check.register for a ServiceID that does not exist: 404, so False")
    ok = c.agent.check.register("orphan", Check.ttl("10s"), check_id="orphan", service_id="no-such-service")
    expect(ok is False, "check.register(service_id=unknown) returns False (404)", ok)
    expect("orphan" not in c.agent.checks(), "no check was added", c.agent.checks())

    step("session.create on a node that is not in the catalog: 500 Missing node registration")
    e = raises(ConsulException, lambda: c.session.create(name="nowhere", node="no-such-node"))
    expect("500" in str(e) and "Missing node registration" in str(e), "session.create(node=unknown)", str(e))

    step("kv.put with acquire by a session that does not exist: 500 invalid session")
    e = raises(ConsulException, lambda: c.kv.put("py/orphan-lock", "x", acquire="00000000-0000-0000-0000-000000000000"))
    expect("500" in str(e) and "invalid session" in str(e), "kv.put(acquire=unknown)", str(e))
    _, pair = c.kv.get("py/orphan-lock")
    expect(pair is None, "the failed acquire stored nothing", pair)
    expect(c.kv.put("py/orphan-lock", "x", release="00000000-0000-0000-0000-000000000000") is False,
           "kv.put(release=unknown) is False, as in Consul")
    c.kv.delete("py/orphan-lock")

    step("a request for another datacenter: 500 No path to datacenter")
    e = raises(ConsulException, lambda: c.catalog.nodes(dc="elsewhere"))
    expect("No path to datacenter" in str(e), "catalog.nodes(dc='elsewhere')", str(e))
    e = raises(ConsulException, lambda: c.kv.get("py/anything", dc="elsewhere"))
    expect("No path to datacenter" in str(e), "kv.get(dc='elsewhere')", str(e))


def absent_feature_steps(c) -> None:
    """Connect, gateways, config entries, ACLs: answered as a Consul that does not use them."""
    step("connect: no CA roots, no intentions; the default (no ACLs) allows")
    roots = c.connect.ca.roots()
    expect(roots == {"ActiveRootID": "", "TrustDomain": "", "Roots": []}, "connect.ca.roots()", roots)
    intentions = c.connect.intentions.list()
    expect(intentions == [], "connect.intentions.list()", intentions)
    e = raises(ConsulException, lambda: c.connect.ca.configuration())
    expect("Connect must be enabled" in str(e), "connect.ca.configuration() without a CA", str(e))

    step("gateways and connect-capable services: none")
    gw = c.catalog.gateway_services("ingress-gw")
    expect(gw == [], "catalog.gateway_services()", gw)

    step("config entries: none of a known kind; a named one is Consul's 404 (None)")
    entries = c.config.list("service-defaults")
    expect(entries == [], "config.list('service-defaults')", entries)
    got = c.config.get("service-defaults", "web")
    expect(got is None, "config.get() of a missing entry is None (404)", got)

    step("ACLs are not enabled: 401, raised as ACLDisabled")
    e = raises(ACLDisabled, lambda: c.acl.token.list())
    expect("ACL support disabled" in str(e), "acl.token.list()", str(e))


def lenient_steps(c) -> None:
    """What Consul accepts although muster's native API would not (Consul's docs: names that
    are not DNS labels only lose DNS; intervals under the 1 s minimum are raised to it)."""
    name = "py-app#127.0.0.1#3000"
    step(f"agent.service.register({name!r}) with a 200ms TTL check and a 100ms TCP check")
    expect(c.agent.service.register(name, port=3000, check=Check.ttl("200ms")) is True,
           "a name that is no DNS label and a TTL under 1 s are accepted", name)
    expect(c.agent.check.register("py-app-tcp", Check.tcp("127.0.0.1", 1, "100ms"), check_id="py-app-tcp",
                                  service_id=name) is True, "an interval under 1 s is accepted")
    ac = c.agent.checks()
    expect(ac.get("py-app-tcp", {}).get("Interval") == "1s", "the interval is raised to 1s", ac.get("py-app-tcp"))
    expect(name in c.agent.services(), "agent.services() keys it by its ID (the name)", list(c.agent.services()))
    expect(c.agent.check.ttl_pass(f"service:{name}") is True, "its TTL check passes")
    _, entries = c.health.service(name)
    expect([e["Service"]["Service"] for e in entries] == [name], "health.service(name) finds it", entries)
    _, cs = c.catalog.service(name)
    expect([e["ServiceID"] for e in cs] == [name], "catalog.service(name) finds it", cs)
    _, services = c.catalog.services()
    expect(name in services, "catalog.services() lists it", services)

    step("catalog.register of an external service named with dots and underscores")
    expect(c.catalog.register("py-ext-node", "10.1.2.3",
                              service={"Service": "py_db.v2", "ID": "py_db.1", "Port": 5432}) is True,
           "catalog.register() returns True")
    _, entries = c.health.service("py_db.v2")
    expect([(e["Node"]["Node"], e["Service"]["ID"]) for e in entries] == [("py-ext-node", "py_db.1")],
           "health.service('py_db.v2') has it on its node", entries)
    expect(c.catalog.deregister("py-ext-node") is True, "catalog.deregister(node)")
    expect(c.agent.service.deregister(name) is True, f"deregister({name!r})")
    _, entries = c.health.service(name)
    expect(entries == [], "gone after deregistration", entries)


def agent_ops_steps(c, node: str) -> None:
    """agent.metrics, agent.monitor's refusal and the coordinate API (shapes from Consul's API docs)."""
    step("agent.metrics(): Consul's JSON shape")
    m = c.agent.metrics()
    expect(sorted(m) == ["Counters", "Gauges", "Points", "Samples", "Timestamp"], "the five keys", sorted(m))
    expect(m["Timestamp"].endswith(" +0000 UTC"), "a go-metrics Timestamp", m["Timestamp"])
    expect(any(g["Name"] == "muster_instances" and isinstance(g["Value"], (int, float)) for g in m["Gauges"]),
           "a muster_instances gauge", m["Gauges"])
    expect(any(k["Name"] == "muster_http_requests_total" and "route" in k["Labels"] for k in m["Counters"]),
           "HTTP request counters by route", m["Counters"])
    text = c.agent.metrics(format_prometheus=True)
    text = text.decode() if isinstance(text, bytes) else text
    expect("# TYPE muster_instances gauge" in text, "agent.metrics(format_prometheus=True) is Prometheus text", text[:200])

    # A monitor that attaches streams until the client leaves, which py-consul's monitor()
    # cannot do (it returns once the connection ends); the refusal is what it can check.
    step("agent.monitor(loglevel='bogus'): 400 naming the level")
    e = raises(BadRequest, lambda: c.agent.monitor(loglevel="bogus"))
    expect("Unknown log level: bogus" in str(e), "Consul's message", str(e))

    step("coordinate.datacenters / nodes / node / update")
    coord = {"Vec": [0.0] * 8, "Error": 1.5, "Adjustment": 0.0, "Height": 1e-05}
    dcs = c.coordinate.datacenters()
    expect(len(dcs) == 1 and dcs[0]["AreaID"] == "wan" and dcs[0]["Coordinates"][0]["Coord"] == coord,
           "one datacenter, its server at the initial coordinate", dcs)
    idx, nodes = c.coordinate.nodes()
    expect(int(idx) >= 1 and nodes == [{"Node": node, "Segment": "", "Coord": coord}], "coordinate.nodes()", nodes)
    _, mine = c.coordinate.node(node)
    expect(mine == nodes, "coordinate.node(node)", mine)
    expect(c.coordinate.update(node, coord) is True, "coordinate.update() returns True")


def leave_step(c, base: str) -> None:
    """Last: agent.leave() stops the agent, after answering."""
    step("agent.leave(): answered, then the agent stops")
    expect(c.agent.leave() is True, "agent.leave() returns True")

    def stopped():
        try:
            urllib.request.urlopen(f"{base}/v1/agent/self", timeout=2)
        except OSError:
            return True
        return False

    eventually("the agent stops serving after leave", stopped)


def query_steps(c: consul.Consul, base: str) -> None:
    """Prepared queries, with py-consul's own calls (which always create a template query)."""
    step("prepared query: create, get, list, execute by name and ID, limit, tags")
    qid = c.query.create("py-web", name="py-web-q", onlypassing=True, ttl="10s")["ID"]
    got = c.query.get(qid)
    expect(len(got) == 1 and got[0]["Name"] == "py-web-q", "query.get", got)
    expect(got[0]["Service"]["Service"] == "py-web" and got[0]["Service"]["OnlyPassing"] is True, "query service", got)
    expect(got[0]["DNS"]["TTL"] == "10s", "query DNS TTL", got)
    expect(any(q["ID"] == qid for q in c.query.list()), "query.list", c.query.list())
    _, passing = c.health.service("py-web", passing=True)
    want = sorted(e["Service"]["ID"] for e in passing)
    for key in ("py-web-q", qid):
        r = c.query.execute(key)
        expect(r["Service"] == "py-web" and r["Datacenter"] and r["Failovers"] == 0, f"execute({key!r}) shape", r)
        expect(sorted(n["Service"]["ID"] for n in r["Nodes"]) == want, f"execute({key!r}) answers the passing instances", r)
        expect(all({"Node", "Service", "Checks"} <= set(n) for n in r["Nodes"]), "health entries", r)
    r = c.query.execute("py-web-q", limit=1)
    expect(len(r["Nodes"]) == min(1, len(want)), "limit=1", r)
    explained = c.query.explain("py-web-q")
    expect(explained["Query"]["Service"]["Service"] == "py-web", "explain", explained)

    step("a template query fills ${name.suffix} for every name it prefixes")
    raw_put = urllib.request.Request(
        f"{base}/v1/query",
        data=json.dumps(
            {
                "Name": "geo-",
                "Template": {"Type": "name_prefix_match"},
                "Service": {"Service": "${name.suffix}", "OnlyPassing": False},
            }
        ).encode(),
        method="POST",
    )
    with urllib.request.urlopen(raw_put, timeout=10) as resp:
        tid = json.load(resp)["ID"]
    r = c.query.execute("geo-py-web")
    expect(r["Service"] == "py-web", "template renders the service from the suffix", r)
    expect(len(r["Nodes"]) >= len(want), "template executes (passing and warning)", r)

    step("query update and delete; an unknown query is a 404")
    expect(c.query.update(qid, "py-web", name="py-web-q", onlypassing=False) is True, "query.update")
    expect(c.query.get(qid)[0]["Service"]["OnlyPassing"] is False, "update took", c.query.get(qid))
    expect(c.query.delete(qid) is True and c.query.delete(tid) is True, "query.delete")
    try:
        gone = c.query.execute("py-web-q")
    except NotFound:
        gone = None
    expect(gone is None, "execute after delete is a 404", gone)
    e = raises(BadRequest, lambda: c.query.create(""))
    expect("Service name" in str(e), "a query without a service is refused", str(e))


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
    # Consul reports its leader as the server's RPC address, the same in agent/self.
    leader_addr = me.get("Stats", {}).get("consul", {}).get("leader_addr")
    expect(leader == leader_addr and leader.endswith(":8300"),
           "status.leader() is agent/self Stats.consul.leader_addr, ip:8300", (leader, leader_addr))

    step("the consul service of the server")
    _, services = c.catalog.services()
    expect(services.get("consul") == [], "catalog.services() lists consul with no tags", services)
    _, cs = c.catalog.service("consul")
    expect(len(cs) == 1 and cs[0]["Node"] == node and cs[0]["ServiceID"] == "consul"
           and cs[0]["ServicePort"] == 8300, "catalog.service('consul') is this node on port 8300", cs)
    _, hs = c.health.service("consul", passing=True)
    expect([e["Service"]["ID"] for e in hs] == ["consul"]
           and [ch["CheckID"] for ch in hs[0]["Checks"]] == ["serfHealth"],
           "health.service('consul') passes with only the node's serfHealth check", hs)
    expect("consul" not in c.agent.services(), "agent.services() does not list consul", c.agent.services())

    step("catalog.datacenters")
    expect(c.catalog.datacenters() == [dc], f"catalog.datacenters() == [{dc!r}]", c.catalog.datacenters())

    step("agent.members")
    members = c.agent.members()
    expect(isinstance(members, list) and any(m.get("Name") == node and m.get("Status") == 1 for m in members),
           "agent.members() lists this node alive (Status 1)", members)
    tags = members[0].get("Tags", {})
    expect(tags.get("role") == "consul" and tags.get("dc") == dc and tags.get("port") == "8300"
           and tags.get("segment") == "" and all(k in tags for k in ("vsn", "vsn_min", "vsn_max", "build", "id")),
           "a server member's tags: role consul, dc, port 8300, segment, vsn*, build, id", tags)
    wan = c.agent.members(wan=True)
    expect([m.get("Name") for m in wan] == [f"{node}.{dc}"], "agent.members(wan=True) names node.datacenter", wan)

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

    filter_steps(c, node)
    query_steps(c, base)

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

    # --- KV, sessions and locks, transactions, events -------------------------------------
    kv_steps(c, base)
    session_steps(c, node)
    txn_steps(c)
    event_steps(c)
    node_identity_steps(c)
    refusal_steps(c)
    absent_feature_steps(c)
    lenient_steps(c)
    agent_ops_steps(c, node)
    leave_step(c, base)
    print("py-consul: all steps passed", flush=True)


if __name__ == "__main__":
    main()
