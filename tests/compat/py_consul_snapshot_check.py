#!/usr/bin/env python3
"""Saves a snapshot of one agent with py-consul and restores it into a fresh one.

Usage: py_consul_snapshot_check.py HOST:PORT_A HOST:PORT_B

Run by crates/server/tests/it/snapshot.rs against two agents it starts. Fills A through
py-consul's own calls, saves A's snapshot, restores it into B, and checks that B answers
every read as A does; a corrupted archive is refused with nothing changed.
"""

from __future__ import annotations

import sys

import consul
from checks import Failed, expect, step
from consul import Check
from consul.exceptions import ConsulException


def client(addr: str) -> consul.Consul:
    host, port = addr.rsplit(":", 1)
    return consul.Consul(host=host, port=int(port))


def view(c: consul.Consul) -> dict:
    """Everything a client reads, in a form that compares across agents."""
    _, services = c.catalog.services()
    health = {}
    for name in services:
        _, entries = c.health.service(name)
        health[name] = sorted(
            (e["Service"]["ID"], e["Service"]["Port"], tuple(sorted(e["Service"]["Tags"])),
             tuple(sorted(e["Service"]["Meta"].items())))
            for e in entries
        )
    _, kv = c.kv.get("", recurse=True)
    keys = sorted((e["Key"], e["Value"], e["Flags"], bool(e.get("Session"))) for e in kv or [])
    _, sessions = c.session.list()
    queries = sorted((q["Name"], q["Service"]["Service"]) for q in c.query.list())
    return {
        "services": {k: sorted(v) for k, v in services.items()},
        "health": health,
        "kv": keys,
        "sessions": sorted((s["ID"], s["Name"], s["Behavior"]) for s in sessions),
        "queries": queries,
    }


def main() -> None:
    a, b = client(sys.argv[1]), client(sys.argv[2])

    step("fill agent A: services with checks, tags and meta, keys with flags, a lock, a query")
    a.agent.service.register("web", service_id="web-1", port=8080, tags=["v1"], meta={"zone": "a"},
                             check=Check.ttl("30s"))
    a.agent.check.ttl_pass("service:web-1")
    a.agent.service.register("web", service_id="web-2", port=8081, tags=["v2"])
    a.agent.service.register("db", service_id="db-1", port=5432)
    a.kv.put("app/config", "v1", flags=42)
    a.kv.put("app/feature", "on")
    sid = a.session.create(name="leader-election", behavior="delete", ttl=60)
    expect(a.kv.put("app/leader", "web-1", acquire=sid) is True, "lock taken")
    a.query.create("web", name="web-q")
    before = view(a)

    step("snapshot.save on A is a gzip archive")
    data = a.snapshot.save()
    expect(isinstance(data, bytes) and data[:2] == b"\x1f\x8b", "gzip magic", data[:8])

    step("a truncated or corrupted archive is refused and B keeps what it has")
    b.kv.put("only/on/b", "x")
    b_before = view(b)
    for bad in (data[: len(data) // 2], data[:20] + bytes([data[20] ^ 0xFF]) + data[21:], b"not a snapshot"):
        try:
            b.snapshot.restore(bad)
        except ConsulException as e:
            expect("snapshot" in str(e), "the refusal says what is wrong", str(e))
        else:
            raise Failed("a damaged archive was accepted")
    expect(view(b) == b_before, "nothing changed on B", view(b))

    step("snapshot.restore into B replaces what B holds with A's registry")
    expect(b.snapshot.restore(data) is True, "restore")
    after = view(b)
    for part in before:
        expect(after[part] == before[part], f"B answers {part} as A did", (after[part], before[part]))
    _, gone = b.kv.get("only/on/b")
    expect(gone is None, "a key only B had is gone", gone)

    step("the restored lock is held by the restored session")
    _, leader = b.kv.get("app/leader")
    expect(leader is not None and leader.get("Session") == sid, "lock holder", leader)
    print("py-consul snapshot flow: ok")


if __name__ == "__main__":
    main()
