#!/usr/bin/env python3
"""Drives muster's HTTPS listener with the unmodified py-consul client, as a Consul user would.

Usage: py_consul_tls_check.py HOST:PORT DIR

Run by crates/server/tests/it/consul_compat.rs against an agent serving HTTPS with mutual TLS
(`tls.verify_incoming`): DIR holds ca.pem (the CA that signed the agent's and the client's
certificates), client.pem and client.key. Exits 0 when every step behaves as it does against
Consul; raises naming the step otherwise.
"""

from __future__ import annotations

import os
import sys

import consul
from checks import Failed, expect, step
import requests


def refused(call, what: str) -> None:
    """The handshake fails: requests raises an SSL or connection error, never an answer."""
    try:
        got = call()
    except (requests.exceptions.SSLError, requests.exceptions.ConnectionError) as e:
        print(f"  refused: {type(e).__name__}", flush=True)
        return
    raise Failed(f"{what}: expected the handshake to fail, got {got!r}")


def main() -> None:
    host, port = sys.argv[1].rsplit(":", 1)
    files = sys.argv[2]
    ca = os.path.join(files, "ca.pem")
    cert = (os.path.join(files, "client.pem"), os.path.join(files, "client.key"))
    c = consul.Consul(host=host, port=int(port), scheme="https", verify=ca, cert=cert)

    step("kv put and get over HTTPS with a client certificate")
    expect(c.kv.put("tls/greeting", "hello") is True, "kv.put returns True")
    _, entry = c.kv.get("tls/greeting")
    expect(entry is not None and entry["Value"] == b"hello", "kv.get reads it back", entry)

    step("agent service register, seen in the catalog")
    expect(
        c.agent.service.register("web", service_id="web-1", address="10.0.0.5", port=8080, tags=["tls"])
        is True,
        "agent.service.register returns True",
    )
    _, services = c.catalog.services()
    expect(services.get("web") == ["tls"], "catalog.services lists web with its tag", services)
    _, nodes = c.catalog.service("web")
    expect([n["ServicePort"] for n in nodes] == [8080], "catalog.service shows the port", nodes)
    expect("web-1" in c.agent.services(), "agent.services lists web-1", c.agent.services())

    step("a client without a certificate is refused")
    anonymous = consul.Consul(host=host, port=int(port), scheme="https", verify=ca)
    refused(lambda: anonymous.kv.get("tls/greeting"), "no client certificate")

    step("a client that does not trust the agent's CA is refused")
    stranger = consul.Consul(host=host, port=int(port), scheme="https", verify=True, cert=cert)
    refused(lambda: stranger.kv.get("tls/greeting"), "the agent's CA not trusted")

    step("plain HTTP to the HTTPS port gets 400, not an answer")
    plain = consul.Consul(host=host, port=int(port), scheme="http")
    try:
        plain.kv.get("tls/greeting")
    except consul.ConsulException as e:
        expect("400" in str(e) or "HTTPS" in str(e), "the error says why", str(e))
    except requests.exceptions.ConnectionError as e:
        print(f"  closed: {type(e).__name__}", flush=True)
    else:
        raise Failed("plain HTTP to the HTTPS port got an answer")

    print("py-consul over HTTPS with mutual TLS: all steps passed")


if __name__ == "__main__":
    main()
