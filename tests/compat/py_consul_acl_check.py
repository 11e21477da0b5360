#!/usr/bin/env python3
"""Drives muster's ACLs with the unmodified py-consul client, as a Consul user would.

Usage: py_consul_acl_check.py HOST:PORT NODE MANAGEMENT_SECRET

Run by crates/server/tests/it/acl.rs against an agent it starts with ACLs on, the default
policy `deny` and MANAGEMENT_SECRET as `acl.tokens.initial_management`. Exits 0 when every
step behaves as it does against Consul; raises naming the step otherwise.
"""

from __future__ import annotations

import json
import sys
import threading
import urllib.error
import urllib.request

import consul
from checks import Failed, expect, step
from consul.exceptions import ACLPermissionDenied, ConsulException


def raises(kind, call, what: str):
    try:
        got = call()
    except kind as e:
        return e
    raise Failed(f"{what}: expected {kind.__name__}, got {got!r}")


def raw(method: str, url: str, token: str | None = None, body: bytes | None = None):
    req = urllib.request.Request(url, data=body, method=method)
    if token:
        req.add_header("X-Consul-Token", token)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def main() -> None:
    host, port = sys.argv[1].rsplit(":", 1)
    node = sys.argv[2]
    management = sys.argv[3]
    base = f"http://{host}:{port}"
    anon = consul.Consul(host=host, port=int(port))
    root = consul.Consul(host=host, port=int(port), token=management)

    step("the initial management token exists and reads itself, secret included")
    me = root.acl.token.read_self()
    expect(me["Description"] == "Initial Management Token", "read_self description", me)
    expect(me["SecretID"] == management, "read_self shows the caller its own secret", me)
    expect(
        [p["Name"] for p in me.get("Policies", [])] == ["global-management"],
        "linked to global-management",
        me,
    )

    step("bootstrapping is used up by the initial management token")
    e = raises(ACLPermissionDenied, lambda: anon.acl.bootstrap(), "bootstrap")
    expect("ACL bootstrap no longer allowed (reset index:" in str(e), "bootstrap refusal", str(e))

    step("under default deny, the anonymous token may not write, and the error is Consul's")
    e = raises(ACLPermissionDenied, lambda: anon.kv.put("app/config", "v1"), "anonymous kv put")
    expect(
        "Permission denied: anonymous token lacks permission 'key:write' on \"app/config\"" in str(e),
        "anonymous denial text",
        str(e),
    )
    status, headers, _ = raw("GET", f"{base}/v1/catalog/services")
    expect(headers.get("x-consul-default-acl-policy") == "deny", "default policy header", headers)

    # py-consul sends `rules` through json.dumps: a dict becomes Consul's JSON rules form.
    step("policies from py-consul (JSON rules) and raw HCL; bad rules are refused naming the problem")
    web = root.acl.policy.create(name="web-write", rules={"service": {"web": {"policy": "write"}}})
    expect(web["Name"] == "web-write" and web["ID"], "policy create", web)
    app = root.acl.policy.create(
        name="app-keys",
        rules={
            "key_prefix": {
                "app/": {"policy": "write"},
                "app/secret/": {"policy": "deny"},
            },
            "session_prefix": {"": {"policy": "write"}},
        },
    )
    e = raises(
        ConsulException,
        lambda: root.acl.policy.create(name="broken", rules={"service": {"web": {"policy": "sudo"}}}),
        "invalid rules",
    )
    expect("sudo" in str(e), "the refusal names the bad value", str(e))
    names = {p["Name"] for p in root.acl.policy.list()}
    expect({"global-management", "web-write", "app-keys"} <= names, "policy list", names)
    expect("broken" not in names, "a refused policy is not stored", names)

    step("a write refused without a grant is allowed once the policy is linked")
    t = root.acl.token.create(description="deployer")
    deployer = consul.Consul(host=host, port=int(port), token=t["SecretID"])
    e = raises(
        ACLPermissionDenied,
        lambda: deployer.agent.service.register("web", service_id="web-1", port=8080),
        "register without a grant",
    )
    expect(
        f"token with AccessorID '{t['AccessorID']}' lacks permission 'service:write' on \"web\"" in str(e),
        "named-token denial text",
        str(e),
    )
    root.acl.token.update(t["AccessorID"], description="deployer", policies_name=["web-write"])
    expect(
        deployer.agent.service.register("web", service_id="web-1", port=8080) is True,
        "register after the grant",
    )
    raises(
        ACLPermissionDenied,
        lambda: deployer.agent.service.register("db", service_id="db-1", port=5432),
        "register of another service",
    )
    expect(root.agent.service.register("db", service_id="db-1", port=5432) is True, "root registers db")

    step("the token's secret is hidden on reads, and shown once at creation")
    read = root.acl.token.read(t["AccessorID"])
    expect(read["SecretID"] == "<hidden>", "secret hidden on read", read)
    expect([p["Name"] for p in read["Policies"]] == ["web-write"], "links carry names", read)

    step("lists are filtered per token, with X-Consul-Results-Filtered-By-ACLs")
    # The HCL form, as the Consul CLI and Terraform send it.
    status, _, body = raw(
        "PUT",
        f"{base}/v1/acl/policy",
        token=management,
        body=json.dumps(
            {"Name": "web-read", "Rules": 'service "web" {\n  policy = "read"\n}\nnode_prefix "" {\n  policy = "read"\n}\n'}
        ).encode(),
    )
    expect(status == 200, "HCL policy create", body)
    reader_policy = json.loads(body)
    reader = root.acl.token.create(description="reader", policies_id=[reader_policy["ID"]])
    rc = consul.Consul(host=host, port=int(port), token=reader["SecretID"])
    _, services = rc.catalog.services()
    expect(set(services) == {"web"}, "reader sees web only", services)
    _, all_services = root.catalog.services()
    expect({"web", "db", "consul"} <= set(all_services), "root sees everything", all_services)
    _, nodes = rc.health.service("web")
    expect([n["Service"]["ID"] for n in nodes] == ["web-1"], "reader's health answer", nodes)
    _, nodes = rc.health.service("db")
    expect(nodes == [], "db's health is filtered to nothing", nodes)
    status, headers, _ = raw("GET", f"{base}/v1/catalog/services", token=reader["SecretID"])
    expect(headers.get("x-consul-results-filtered-by-acls") == "true", "filtered header", headers)
    status, headers, _ = raw("GET", f"{base}/v1/catalog/services", token=management)
    expect("x-consul-results-filtered-by-acls" not in headers, "no header when nothing is filtered", headers)
    agent_services = rc.agent.services()
    expect(set(agent_services) == {"web-1"}, "agent services filtered", agent_services)

    step("KV with prefix rules: the longest prefix wins, recurse reads are filtered")
    kv = root.acl.token.create(description="app", policies_name=["app-keys"])
    kc = consul.Consul(host=host, port=int(port), token=kv["SecretID"])
    expect(kc.kv.put("app/config", "v1") is True, "write under app/")
    expect(root.kv.put("app/secret/password", "hunter2") is True, "root writes the secret")
    raises(ACLPermissionDenied, lambda: kc.kv.get("app/secret/password"), "read under the denied prefix")
    raises(ACLPermissionDenied, lambda: kc.kv.put("other", "x"), "write outside app/")
    _, entries = kc.kv.get("app/", recurse=True)
    expect([x["Key"] for x in entries] == ["app/config"], "recursive read filtered", entries)
    raises(
        ACLPermissionDenied,
        lambda: kc.kv.delete("app/", recurse=True),
        "recursive delete over a denied sub-prefix",
    )
    _, still = root.kv.get("app/secret/password")
    expect(still and still["Value"] == b"hunter2", "nothing deleted by the refused delete", still)

    step("sessions need session:write on the node")
    raises(ACLPermissionDenied, lambda: deployer.session.create(), "session without session rules")
    sid = kc.session.create(name="lock")
    expect(kc.kv.put("app/leader", "me", acquire=sid) is True, "lock taken with the session")

    step("roles: a token linked to a role gets its policies; deleting the role takes them away")
    role = root.acl.role.create(name="web-operators", policies_name=["web-write"])
    expect(role["Name"] == "web-operators" and role["Policies"][0]["Name"] == "web-write", "role create", role)
    expect(root.acl.role.read_by_name("web-operators")["ID"] == role["ID"], "role read by name")
    expect([r["Name"] for r in root.acl.role.list()] == ["web-operators"], "role list")
    op = root.acl.token.create(description="operator", roles_name=["web-operators"])
    expect([r["Name"] for r in op["Roles"]] == ["web-operators"], "token role links", op)
    oc = consul.Consul(host=host, port=int(port), token=op["SecretID"])
    expect(oc.agent.service.register("web", service_id="web-2", port=8081) is True, "register through the role")
    expect(root.acl.role.delete(role["ID"]) is True, "role delete")
    raises(
        ACLPermissionDenied,
        lambda: oc.agent.service.register("web", service_id="web-3", port=8082),
        "register after the role is gone",
    )
    root.agent.service.deregister("web-2")

    step("the management token can read every token; clone makes a new secret with the same links")
    tokens = root.acl.token.list()
    accessors = {x["AccessorID"] for x in tokens}
    expect(
        {t["AccessorID"], reader["AccessorID"], kv["AccessorID"], "00000000-0000-0000-0000-000000000002"}
        <= accessors,
        "token list",
        accessors,
    )
    expect(all(x["SecretID"] == "<hidden>" for x in tokens), "secrets hidden in the list", tokens)
    clone = root.acl.token.clone(t["AccessorID"], description="deployer 2")
    expect(clone["SecretID"] != t["SecretID"] and clone["AccessorID"] != t["AccessorID"], "clone ids", clone)
    expect([p["Name"] for p in clone["Policies"]] == ["web-write"], "clone links", clone)

    step("a deleted token is refused everywhere with 'ACL not found'")
    expect(root.acl.token.delete(t["AccessorID"]) is True, "delete")
    e = raises(ACLPermissionDenied, lambda: deployer.catalog.services(), "read with a deleted token")
    expect("ACL not found" in str(e), "deleted token text", str(e))
    expect(root.acl.token.read(t["AccessorID"]) is None, "read of a deleted token is None (404)")

    step("tokens without acl permissions cannot manage ACLs")
    e = raises(ACLPermissionDenied, lambda: rc.acl.token.list(), "reader lists tokens")
    expect("lacks permission 'acl:read'" in str(e), "acl:read denial", str(e))

    step("a policy update takes effect on the next request")
    root.acl.policy.update(
        reader_policy["ID"],
        name="web-read",
        rules={"service_prefix": {"": {"policy": "read"}}, "node_prefix": {"": {"policy": "read"}}},
    )
    _, services = rc.catalog.services()
    expect({"web", "db"} <= set(services), "reader sees every service after the update", services)

    step("the anonymous token can be granted policies")
    anon_id = "00000000-0000-0000-0000-000000000002"
    root.acl.token.update(anon_id, description="Anonymous Token", policies_name=["web-read"])
    _, services = anon.catalog.services()
    expect({"web", "db"} <= set(services), "anonymous reads after the grant", services)

    step(f"agent endpoints need agent rules on node {node!r}")
    e = raises(ACLPermissionDenied, lambda: kc.agent.self(), "agent self without agent:read")
    expect(f"'agent:read' on \"{node}\"" in str(e), "agent:read denial names the node", str(e))
    # py-consul's agent.self() sends no token at all, so it acts as the anonymous token.
    status, _, body = raw("GET", f"{base}/v1/agent/self", token=management)
    expect(status == 200 and json.loads(body)["Config"]["NodeName"] == node, "management reads agent self", body)
    print("py-consul ACL flow: ok")


if __name__ == "__main__":
    main()
