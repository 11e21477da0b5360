"""Drives muster's Eureka API with the unmodified py_eureka_client (PyPI).

Usage: python3 py_eureka_check.py HOST:PORT

Registers through the client, heartbeats, discovers an application registered through
muster's native API, follows changes through delta fetches, goes OUT_OF_SERVICE and back,
sees an instance whose heartbeats stop turn DOWN, and deregisters on stop. Exits 0 when
every step behaves as against Eureka; otherwise raises, naming the step.
"""

import asyncio
import json
import sys
import time
import urllib.error
import urllib.request

import py_eureka_client.eureka_basic as basic
from py_eureka_client.eureka_client import EurekaClient

ADDR = sys.argv[1]
EUREKA = f"http://{ADDR}/eureka"
NATIVE = f"http://{ADDR}/api/v1"
DEADLINE = 15.0


def native(method, path, body=None):
    """Calls the native API; (status, decoded JSON or None)."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(NATIVE + path, data=data, method=method,
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            text = r.read()
            return r.status, json.loads(text) if text else None
    except urllib.error.HTTPError as e:
        return e.code, None


def healthy_ids(service):
    status, body = native("GET", f"/services/{service}")
    assert status == 200, f"discover {service}: {status}"
    return sorted(i["id"] for i in body["instances"])


async def eventually(what, check):
    """Polls `check` until it holds, for up to DEADLINE seconds."""
    end = time.monotonic() + DEADLINE
    last = None
    while time.monotonic() < end:
        try:
            last = check()
            if last:
                return last
        except Exception as e:  # noqa: BLE001 - report the last failure below
            last = e
        await asyncio.sleep(0.2)
    raise AssertionError(f"{what}: still not so after {DEADLINE}s (last: {last!r})")


def client_instances(client, app):
    found = client.applications.get_application(app)
    return sorted(i.instanceId for i in found.instances) if found else []


async def main():
    # An application registered through the native API, for discovery.
    status, _ = native("PUT", "/services/inventory/instances/inv-1",
                       {"address": "10.0.0.5", "port": 7000, "ttl": "1h"})
    assert status in (200, 201), f"native register: {status}"

    client = EurekaClient(
        eureka_server=EUREKA,
        app_name="py-app",
        instance_id="py-1",
        instance_host="py-1.local",
        instance_ip="127.0.0.1",
        instance_port=5000,
        renewal_interval_in_secs=1,
        duration_in_secs=3,
        metadata={"lang": "python"},
    )
    await client.start()
    print("registered and fetched the registry")

    # Registered: the same instance in the native API, with the lease as its TTL.
    status, inst = native("GET", "/services/py-app/instances/py-1")
    assert status == 200, f"registration not in the native API: {status}"
    assert inst["address"] == "127.0.0.1" and inst["port"] == 5000, inst
    assert inst["meta"].get("lang") == "python", inst
    assert inst["ttl"] == "3s", inst

    # Discovery of the natively registered application, from the full fetch.
    assert client_instances(client, "INVENTORY") == ["inv-1"], client_instances(client, "INVENTORY")
    app = await basic.get_application(EUREKA, "inventory")
    assert app.instances[0].port.port == 7000, app.instances[0].port.port
    print("discovered the natively registered application")

    # Heartbeats keep the 3 s lease alive past its duration.
    await asyncio.sleep(4.5)
    assert healthy_ids("py-app") == ["py-1"], "heartbeats did not keep the instance"
    print("heartbeats keep it registered")

    # Delta fetches follow changes made elsewhere: an addition, then a removal.
    native("PUT", "/services/inventory/instances/inv-2",
           {"address": "10.0.0.6", "port": 7001, "ttl": "1h"})
    await eventually("delta brings inv-2",
                     lambda: client_instances(client, "INVENTORY") == ["inv-1", "inv-2"])
    native("DELETE", "/services/inventory/instances/inv-2")
    await eventually("delta removes inv-2",
                     lambda: client_instances(client, "INVENTORY") == ["inv-1"])
    print("delta fetches follow additions and removals")

    # OUT_OF_SERVICE hides the instance everywhere; removing the override restores it.
    await client.status_update("OUT_OF_SERVICE")
    assert healthy_ids("py-app") == [], "OUT_OF_SERVICE still discoverable natively"
    got = await basic.get_app_instance(EUREKA, "PY-APP", "py-1")
    assert got.status == "OUT_OF_SERVICE", got.status
    await eventually("client sees OUT_OF_SERVICE through the delta",
                     lambda: client.applications.get_application("PY-APP")
                     .get_instance("py-1").status == "OUT_OF_SERVICE")
    await client.delete_status_override()
    await eventually("back UP natively", lambda: healthy_ids("py-app") == ["py-1"])
    await eventually("client sees UP again",
                     lambda: client.applications.get_application("PY-APP")
                     .get_instance("py-1").status == "UP")
    print("OUT_OF_SERVICE and back")

    # An instance whose heartbeats stop turns DOWN and is hidden.
    lapsing = basic.Instance(
        instanceId="lapse-1", app="PY-LAPSE", hostName="lapse.local", ipAddr="127.0.0.2",
        port=basic.PortWrapper(5001, True), status="UP", overriddenstatus="UNKNOWN",
        vipAddress="py-lapse", dataCenterInfo=basic.DataCenterInfo(),
        leaseInfo=basic.LeaseInfo(renewalIntervalInSecs=1, durationInSecs=1),
        metadata={}, lastDirtyTimestamp=int(time.time() * 1000),
        lastUpdatedTimestamp=int(time.time() * 1000))
    await basic.register(EUREKA, lapsing)
    assert healthy_ids("py-lapse") == ["lapse-1"]
    await eventually("a lapsed heartbeat hides the instance",
                     lambda: healthy_ids("py-lapse") == [])
    lapsed = await basic.get_app_instance(EUREKA, "PY-LAPSE", "lapse-1")
    assert lapsed.status == "DOWN", lapsed.status
    print("a lapsed heartbeat turns the instance DOWN")

    # Stopping deregisters.
    await client.stop()
    status, _ = native("GET", "/services/py-app/instances/py-1")
    assert status == 404, f"still registered after stop: {status}"
    print("stop deregisters")


asyncio.run(main())
print("py_eureka_client: all steps passed")
