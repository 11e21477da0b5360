// Drives muster's Consul-compatible API with the unmodified npm `consul` client.
//
// Usage: node check.mjs HOST:PORT [NODE]
//
// Run by crates/server/tests/it/consul_compat.rs against an agent it starts; exits 0 when
// every step behaves as it does against Consul, and throws with the step, what was expected
// and what came back otherwise. NODE is the agent's node name (read from /v1/agent/self
// when not given).

import { EventEmitter } from "node:events";
import { createRequire } from "node:module";
import http from "node:http";

import Consul from "consul";

const DEADLINE_MS = 20000; // how long any condition may take (HTTP checks run every 1 s)

function step(msg) {
  console.log(`- ${msg}`);
}

function expect(cond, what, got) {
  if (!cond) {
    throw new Error(`${what}; got: ${JSON.stringify(got)}`);
  }
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Polls probe() until it resolves truthy; fails after deadline ms. */
async function eventually(what, probe, deadline = DEADLINE_MS) {
  const end = Date.now() + deadline;
  let last;
  for (;;) {
    last = await probe();
    if (last) return last;
    if (Date.now() > end) {
      throw new Error(`${what}: not true after ${deadline} ms; last probe: ${JSON.stringify(last)}`);
    }
    await sleep(50); // polling interval, not synchronisation
  }
}

/** Resolves with the first value `emitter` emits as `event`, or rejects after ms. */
function nextEvent(emitter, event, ms, what) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      emitter.removeListener(event, on);
      reject(new Error(`${what}: no '${event}' within ${ms} ms`));
    }, ms);
    const on = (...args) => {
      clearTimeout(timer);
      resolve(args);
    };
    emitter.once(event, on);
  });
}

const ids = (entries) => entries.map((e) => e.Service.ID).sort();

/** A context that makes the client resolve with [response, body] (the watch uses it too). */
function withResponse() {
  const ctx = new EventEmitter();
  ctx.includeResponse = true;
  return ctx;
}

/** muster's gauge of parked blocking queries (process-wide; used only to sync). */
async function parkedWatchers(base) {
  try {
    const text = await (await fetch(`${base}/metrics`)).text();
    const line = text.split("\n").find((l) => l.startsWith("muster_parked_watchers "));
    return line ? Number(line.split(" ")[1]) : -1;
  } catch {
    return -1;
  }
}

async function main() {
  const [addr, nodeArg] = process.argv.slice(2);
  if (!addr) {
    console.error("usage: node check.mjs HOST:PORT [NODE]");
    process.exit(2);
  }
  const i = addr.lastIndexOf(":");
  const host = addr.slice(0, i);
  const port = Number(addr.slice(i + 1));
  const base = `http://${host}:${port}`;
  const version = createRequire(import.meta.url)("consul/package.json").version;
  console.log(`npm consul ${version} against ${base}`);

  const consul = new Consul({ host, port });

  step("agent.self / status / catalog.datacenters / agent.members");
  const me = await consul.agent.self();
  expect(me && typeof me.Config === "object", "agent.self() is an object with Config (JSON-decoded)", me);
  const node = nodeArg || me.Config.NodeName;
  expect(me.Config.NodeName === node, `Config.NodeName === ${node}`, me.Config);
  const dc = me.Config.Datacenter;
  expect(typeof dc === "string" && dc !== "", "Config.Datacenter is a non-empty string", me.Config);
  const leader = await consul.status.leader();
  expect(typeof leader === "string" && leader !== "", "status.leader() is a non-empty string", leader);
  const peers = await consul.status.peers();
  expect(Array.isArray(peers) && peers.includes(leader), "status.peers() lists the leader", peers);
  const dcs = await consul.catalog.datacenters();
  expect(JSON.stringify(dcs) === JSON.stringify([dc]), `catalog.datacenters() is [${dc}]`, dcs);
  const members = await consul.agent.members();
  expect(members.some((m) => m.Name === node && m.Status === 1), "agent.members() lists this node alive", members);

  // --- A service with a TTL check ---------------------------------------------------------
  step("register js-web-1 (TTL check, tags, meta)");
  await consul.agent.service.register({
    name: "js-web",
    id: "js-web-1",
    address: "127.0.0.1",
    port: 8080,
    tags: ["v1", "blue"],
    meta: { version: "2.0" },
    check: { ttl: "5m", notes: "heartbeat" },
  });
  let entries = await consul.health.service("js-web");
  expect(JSON.stringify(ids(entries)) === '["js-web-1"]', "health.service lists js-web-1", entries);
  const ttl = entries[0].Checks.find((c) => c.CheckID === "service:js-web-1");
  expect(ttl && ttl.Status === "critical" && ttl.Notes === "heartbeat", "check service:js-web-1 starts critical, with Notes", entries[0].Checks);

  step("health.service passing is empty while critical");
  entries = await consul.health.service({ service: "js-web", passing: true });
  expect(entries.length === 0, "no passing instance", entries);

  step("agent.check.pass -> passing");
  await consul.agent.check.pass({ id: "service:js-web-1", note: "fine" });
  entries = await consul.health.service({ service: "js-web", passing: true });
  expect(JSON.stringify(ids(entries)) === '["js-web-1"]', "js-web-1 passing", entries);

  step("agent.check.warn / fail -> not passing");
  await consul.agent.check.warn("service:js-web-1");
  entries = await consul.health.service({ service: "js-web", passing: true });
  expect(entries.length === 0, "warning is not passing", entries);
  await consul.agent.check.fail({ id: "service:js-web-1", note: "down" });
  entries = await consul.health.service({ service: "js-web", passing: true });
  expect(entries.length === 0, "critical is not passing", entries);
  const critical = await consul.health.state("critical");
  expect(critical.some((c) => c.CheckID === "service:js-web-1" && c.Output === "down"), "health.state('critical') has it, Output = note", critical);
  await consul.agent.check.pass("service:js-web-1");

  step("unknown check: the client rejects with the 404");
  let err;
  try {
    await consul.agent.check.pass("no-such-check");
  } catch (e) {
    err = e;
  }
  expect(err && err.statusCode === 404, "pass(unknown) rejects with statusCode 404", err && err.message);

  step("two checks: service:<id>:1 and :2; tags");
  await consul.agent.service.register({
    name: "js-web",
    id: "js-web-2",
    port: 8081,
    tags: ["v2"],
    checks: [{ ttl: "5m" }, { ttl: "5m", name: "second" }],
  });
  let checks = await consul.health.checks("js-web");
  const two = checks.filter((c) => c.ServiceID === "js-web-2").map((c) => c.CheckID).sort();
  expect(JSON.stringify(two) === '["service:js-web-2:1","service:js-web-2:2"]', "two checks named :1 and :2", two);
  expect(checks.find((c) => c.CheckID === "service:js-web-2:2").Name === "second", "the explicit Name is kept", checks);
  await consul.agent.check.pass("service:js-web-2:1");
  await consul.agent.check.pass("service:js-web-2:2");
  entries = await consul.health.service({ service: "js-web", passing: true });
  expect(JSON.stringify(ids(entries)) === '["js-web-1","js-web-2"]', "both passing", entries);
  entries = await consul.health.service({ service: "js-web", tag: "v2" });
  expect(JSON.stringify(ids(entries)) === '["js-web-2"]', "health.service tag v2", entries);
  let cat = await consul.catalog.service.nodes({ service: "js-web", tag: "v1" });
  expect(cat.length === 1 && cat[0].ServiceID === "js-web-1" && cat[0].ServicePort === 8080, "catalog.service.nodes tag v1", cat);

  step("agent.check.register attached to js-web-1, then deregister");
  await consul.agent.check.register({ name: "extra", id: "js-web-1-extra", serviceid: "js-web-1", ttl: "5m" });
  let agentChecks = await consul.agent.checks();
  expect(agentChecks["js-web-1-extra"] && agentChecks["js-web-1-extra"].ServiceID === "js-web-1", "agent.checks() has the attached check", Object.keys(agentChecks));
  await consul.agent.check.deregister("js-web-1-extra");
  agentChecks = await consul.agent.checks();
  expect(!("js-web-1-extra" in agentChecks), "deregistered", Object.keys(agentChecks));

  step("agent.service.maintenance on/off");
  await consul.agent.service.maintenance({ id: "js-web-2", enable: true, reason: "patching" });
  agentChecks = await consul.agent.checks();
  const maint = agentChecks["_service_maintenance:js-web-2"];
  expect(maint && maint.Status === "critical" && maint.Notes === "patching", "maintenance check", maint);
  entries = await consul.health.service({ service: "js-web", passing: true });
  expect(JSON.stringify(ids(entries)) === '["js-web-1"]', "in maintenance is not passing", entries);
  await consul.agent.service.maintenance({ id: "js-web-2", enable: false });
  entries = await consul.health.service({ service: "js-web", passing: true });
  expect(JSON.stringify(ids(entries)) === '["js-web-1","js-web-2"]', "passing after maintenance", entries);

  // --- An HTTP check against a server of our own -----------------------------------------
  let targetStatus = 200;
  const probeHeaders = [];
  const server = http.createServer((req, res) => {
    probeHeaders.push(req.headers["x-probe"]);
    res.writeHead(targetStatus, { "content-type": "text/plain" });
    res.end(targetStatus === 200 ? "ok\n" : "down\n");
  });
  await new Promise((r) => server.listen(0, "127.0.0.1", r));
  const url = `http://127.0.0.1:${server.address().port}/health`;
  step(`register js-api-1 with an HTTP check on ${url}; wait until passing`);
  await consul.agent.service.register({
    name: "js-api",
    id: "js-api-1",
    port: server.address().port,
    check: { http: url, interval: "1s", timeout: "1s", method: "GET", header: { "X-Probe": ["muster"] } },
  });
  await eventually("js-api-1 passing", async () =>
    (await consul.health.service({ service: "js-api", passing: true })).length === 1);
  expect(probeHeaders.includes("muster"), "the HTTP check sent the Header it was given", probeHeaders);
  targetStatus = 500;
  await eventually("js-api-1 out of passing after the target answers 500", async () =>
    (await consul.health.service({ service: "js-api", passing: true })).length === 0);
  targetStatus = 200;

  // --- Blocking queries: a call with index/wait, and consul.watch ------------------------
  step("health.service with index and wait: parked, then woken by a check change");
  const [res0] = await consul.health.service({ service: "js-web", ctx: withResponse() });
  const idx = BigInt(res0.headers["x-consul-index"]);
  expect(idx >= 1n, "X-Consul-Index >= 1", res0.headers);
  const before = await parkedWatchers(base);
  let settled = false;
  const t0 = Date.now();
  const blocked = consul.health
    .service({ service: "js-web", index: String(idx), wait: "10s", ctx: withResponse() })
    .finally(() => { settled = true; });
  // Give the agent up to 3 s to hold the call. The gauge is process-wide (other tests'
  // agents count too), so this is a hint, not an assertion: if the change lands before
  // the call parks, the call answers at once, which the checks below accept as well.
  const hintEnd = Date.now() + 3000;
  while (!settled && (await parkedWatchers(base)) <= Math.max(before, 0) && Date.now() < hintEnd) {
    await sleep(20);
  }
  expect(!settled, "the blocking call waits while nothing changes");
  await consul.agent.check.warn({ id: "service:js-web-1", note: "woken" });
  const tChange = Date.now();
  const [res1, body1] = await blocked;
  const elapsed = Date.now() - t0;
  const wokeAfter = Date.now() - tChange;
  expect(elapsed < 8000 && wokeAfter < 4000, "woken by the change, well before wait=10s ran out", { elapsed, wokeAfter });
  expect(BigInt(res1.headers["x-consul-index"]) > idx, `a larger index than ${idx}`, res1.headers["x-consul-index"]);
  const woken = body1.flatMap((e) => e.Checks).find((c) => c.CheckID === "service:js-web-1");
  expect(woken && woken.Status === "warning" && woken.Output === "woken", "the answer shows the change", woken);

  step("consul.watch on health.service passing: a change event per change");
  const watch = consul.watch({
    method: consul.health.service,
    options: { service: "js-web", passing: true, wait: "10s" },
    backoffFactor: 50,
  });
  const errors = [];
  watch.on("error", (e) => errors.push(e.message));
  try {
    let [data] = await nextEvent(watch, "change", 5000, "first watch result");
    expect(JSON.stringify(ids(data)) === '["js-web-2"]', "first change: only js-web-2 passing (js-web-1 warns)", data);
    const changed = nextEvent(watch, "change", 20000, "watch woken by ttl pass");
    const tPass = Date.now();
    await consul.agent.check.pass("service:js-web-1");
    [data] = await changed;
    expect(Date.now() - tPass < 8000, "the watch saw the change before its wait (10s) ran out", Date.now() - tPass);
    expect(JSON.stringify(ids(data)) === '["js-web-1","js-web-2"]', "second change: both passing", data);
    expect(errors.length === 0, "the watch reported no error", errors);
  } finally {
    watch.end();
  }

  // --- Catalog and agent views ------------------------------------------------------------
  step("catalog.service.list / catalog.node.list / catalog.node.services");
  const services = await consul.catalog.service.list();
  expect(JSON.stringify([...services["js-web"]].sort()) === '["blue","v1","v2"]', "catalog services: union of tags", services);
  expect(Array.isArray(services["js-api"]) && services["js-api"].length === 0, "a service without tags has []", services);
  const nodes = await consul.catalog.node.list();
  expect(nodes.length === 1 && nodes[0].Node === node, "catalog.node.list() is this node", nodes);
  const nodeServices = await consul.catalog.node.services(node);
  expect(nodeServices.Node.Node === node && nodeServices.Services["js-web-1"].Service === "js-web", "catalog.node.services()", nodeServices);

  step("agent.services / health.node");
  const agentServices = await consul.agent.services();
  expect(agentServices["js-web-1"] && agentServices["js-web-1"].Port === 8080 && agentServices["js-web-1"].Meta.version === "2.0", "agent.services()", agentServices);
  const nodeChecks = await consul.health.node(node);
  expect(nodeChecks.some((c) => c.CheckID === "serfHealth" && c.Status === "passing"), "health.node() has serfHealth passing", nodeChecks);

  // --- Deregistration ---------------------------------------------------------------------
  step("deregister everything");
  for (const id of ["js-web-1", "js-web-2", "js-api-1"]) {
    await consul.agent.service.deregister(id);
  }
  entries = await consul.health.service("js-web");
  expect(entries.length === 0, "health.service is [] after deregistering", entries);
  const after = await consul.catalog.service.list();
  expect(!Object.keys(after).some((k) => k.startsWith("js-")), "catalog lists none of them", after);
  checks = await consul.agent.checks();
  expect(!Object.keys(checks).some((k) => k.startsWith("service:js-")), "their checks are gone", Object.keys(checks));

  server.close();
  consul.destroy();
  console.log("npm consul: all steps passed");
}

main().catch((e) => {
  console.error(`FAILED: ${e.stack || e}`);
  process.exit(1);
});
