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

/** The error `promise` rejects with; fails when it resolves. */
async function rejects(promise, what) {
  try {
    const got = await promise;
    throw new Error(`${what}: expected a rejection; resolved with ${JSON.stringify(got)}`);
  } catch (e) {
    if (e.isResponse) return e;
    throw e;
  }
}

/** What a KV write answered (true or false): the client resolves a `false` answer as
 * undefined (papi drops falsy results, against Consul too), so read the body itself. */
async function answered(kv, method, opts) {
  const [res, body] = await kv[method]({ ...opts, ctx: withResponse() });
  expect(res.statusCode === 200 && typeof body === "boolean", `kv.${method} answers 200 true/false`, [res.statusCode, body]);
  return body;
}

const same = (a, b) => JSON.stringify(a) === JSON.stringify(b);
const b64 = (s) => Buffer.from(s).toString("base64");

/** Resolves when the agent holds a blocking call just sent (a hint: see parkedWatchers). */
async function untilParked(base, before, isSettled) {
  const end = Date.now() + 3000;
  while (!isSettled() && (await parkedWatchers(base)) <= Math.max(before, 0) && Date.now() < end) {
    await sleep(20);
  }
}

/** `filter` (go-bexpr) through the client's `filter` option. Expects js-web-1 (tags v1/blue,
 * Meta version=2.0) and js-web-2 (tag v2, checks service:js-web-2:1/:2), all passing. */
async function filterSteps(consul, node) {
  step("health.service({ filter })");
  let entries = await consul.health.service({ service: "js-web", filter: 'Service.Meta.version == "2.0"' });
  expect(same(ids(entries), ["js-web-1"]), "filter on Service.Meta.version", entries);
  entries = await consul.health.service({ service: "js-web", filter: '"v2" in Service.Tags' });
  expect(same(ids(entries), ["js-web-2"]), "filter '\"v2\" in Service.Tags'", entries);
  entries = await consul.health.service({
    service: "js-web",
    passing: true,
    filter: `Node.Node == "${node}" and (Service.Port == 8080 or Service.ID matches "-2$")`,
  });
  expect(same(ids(entries), ["js-web-1", "js-web-2"]), "passing plus a filter with and / or / matches", entries);
  entries = await consul.health.service({ service: "js-web", filter: 'not ("blue" in Service.Tags)' });
  expect(same(ids(entries), ["js-web-2"]), "filter with not and parentheses", entries);

  step("catalog.service.nodes / catalog.service.list / agent.services / agent.checks / health.state with filter");
  const cat = await consul.catalog.service.nodes({ service: "js-web", filter: 'ServiceTags contains "v2"' });
  expect(same(cat.map((e) => e.ServiceID), ["js-web-2"]), "catalog.service.nodes filter on ServiceTags", cat);
  const services = await consul.catalog.service.list({ filter: 'ServiceName == "js-web"' });
  expect(same(Object.keys(services), ["js-web"]), "catalog.service.list filter on ServiceName", services);
  const agentServices = await consul.agent.services({ filter: 'Service == "js-web" and Meta.version == "2.0"' });
  expect(same(Object.keys(agentServices), ["js-web-1"]), "agent.services filter on Service and Meta", agentServices);
  const agentChecks = await consul.agent.checks({ filter: 'ServiceID == "js-web-2"' });
  expect(same(Object.keys(agentChecks).sort(), ["service:js-web-2:1", "service:js-web-2:2"]), "agent.checks filter on ServiceID", Object.keys(agentChecks));
  const state = await consul.health.state({ state: "any", filter: 'ServiceName == "js-web" and Name == "second"' });
  expect(same(state.map((c) => c.CheckID), ["service:js-web-2:2"]), "health.state('any') filter", state);

  step("an invalid filter: the client rejects with the 400");
  const err = await rejects(consul.health.service({ service: "js-web", filter: "Service.Port ==" }), "invalid filter");
  expect(err.statusCode === 400 && String(err.response.body).includes("Failed to create boolean expression evaluator"),
    "400 with Consul's message", [err.statusCode, String(err.response && err.response.body)]);
}

async function kvSteps(consul, base) {
  step("kv.set / kv.get: text, binary (buffer and raw), empty value, flags");
  expect((await consul.kv.set("js/kv/text", "hello")) === true, "kv.set() resolves true");
  let pair = await consul.kv.get("js/kv/text");
  expect(pair && pair.Key === "js/kv/text" && pair.Value === "hello" && pair.Flags === 0 && pair.LockIndex === 0
    && !("Session" in pair) && pair.CreateIndex === pair.ModifyIndex && pair.ModifyIndex >= 1,
    "the pair: Key, Value (decoded), Flags 0, LockIndex 0, Create/ModifyIndex", pair);
  const blob = Buffer.concat([Buffer.from([...Array(256).keys()]), Buffer.from([0, 0xff, 13, 10])]);
  expect((await consul.kv.set({ key: "js/kv/bin", value: blob })) === true, "kv.set(Buffer)");
  pair = await consul.kv.get({ key: "js/kv/bin", buffer: true });
  expect(Buffer.isBuffer(pair.Value) && pair.Value.equals(blob), "binary bytes round-trip (buffer: true)", pair.Value);
  const raw = await consul.kv.get({ key: "js/kv/bin", raw: true });
  expect(Buffer.isBuffer(raw) && raw.equals(blob), "raw: true gives the bytes themselves", raw);
  expect((await consul.kv.set("js/kv/empty", "")) === true, "kv.set('')");
  pair = await consul.kv.get("js/kv/empty");
  expect(pair && pair.Value === null, "an empty value reads back as Value null", pair);
  expect((await consul.kv.set({ key: "js/kv/flags", value: "f", flags: 42 })) === true, "kv.set(flags: 42)");
  pair = await consul.kv.get("js/kv/flags");
  expect(pair.Flags === 42 && pair.Value === "f", "Flags 42", pair);

  step("kv.set({ cas }): create-only, then check-and-set");
  expect((await consul.kv.set({ key: "js/kv/cas", value: "v1", cas: 0 })) === true, "cas 0 creates a missing key");
  expect((await consul.kv.set({ key: "js/kv/cas", value: "v1b", cas: 0 })) === undefined,
    "a failed cas resolves undefined (the client drops the false answer)");
  expect((await answered(consul.kv, "set", { key: "js/kv/cas", value: "v1b", cas: 0 })) === false, "cas 0 on an existing key answers false");
  pair = await consul.kv.get("js/kv/cas");
  expect(pair.Value === "v1", "the failed cas 0 left the value", pair);
  const m = pair.ModifyIndex;
  expect((await consul.kv.set({ key: "js/kv/cas", value: "v2", cas: m })) === true, "cas = ModifyIndex succeeds");
  expect((await answered(consul.kv, "set", { key: "js/kv/cas", value: "v3", cas: m })) === false, "cas = a stale ModifyIndex is false");
  pair = await consul.kv.get("js/kv/cas");
  expect(pair.Value === "v2" && pair.ModifyIndex > m, "the stale cas left v2", pair);

  step("kv.get({ recurse }) / kv.keys / kv.keys({ separator })");
  for (const k of ["js/tree/a", "js/tree/b/c", "js/tree/b/d", "js/tree/e/"]) {
    expect((await consul.kv.set(k, k.toUpperCase())) === true, `kv.set(${k})`);
  }
  const pairs = await consul.kv.get({ key: "js/tree/", recurse: true });
  expect(same(pairs.map((p) => p.Key), ["js/tree/a", "js/tree/b/c", "js/tree/b/d", "js/tree/e/"]),
    "recurse lists every pair under the prefix, sorted", pairs);
  expect(pairs[1].Value === "JS/TREE/B/C", "recurse decodes each Value", pairs[1]);
  let keys = await consul.kv.keys("js/tree/");
  expect(same(keys, ["js/tree/a", "js/tree/b/c", "js/tree/b/d", "js/tree/e/"]), "kv.keys lists keys", keys);
  keys = await consul.kv.keys({ key: "js/tree/", separator: "/" });
  expect(same(keys, ["js/tree/a", "js/tree/b/", "js/tree/e/"]), "keys up to the separator, deduplicated", keys);

  step("a missing key: undefined (404)");
  expect((await consul.kv.get("js/kv/missing")) === undefined, "kv.get(missing) resolves undefined");
  expect((await consul.kv.get({ key: "js/nothing/", recurse: true })) === undefined, "recurse on an empty prefix is undefined");
  const noKeys = await rejects(consul.kv.keys("js/nothing/"), "kv.keys(empty prefix)");
  expect(noKeys.statusCode === 404, "kv.keys on an empty prefix rejects with the 404", noKeys.message);

  step("kv.del({ cas }) / kv.del({ recurse })");
  pair = await consul.kv.get("js/kv/cas");
  expect((await answered(consul.kv, "del", { key: "js/kv/cas", cas: pair.ModifyIndex - 1 })) === false, "delete with a stale cas is false");
  expect((await consul.kv.get("js/kv/cas")) !== undefined, "and leaves the key");
  expect((await consul.kv.del({ key: "js/kv/cas", cas: pair.ModifyIndex })) === true, "delete with the right cas");
  expect((await consul.kv.get("js/kv/cas")) === undefined, "the key is gone");
  const conflict = await rejects(consul.kv.del({ key: "js/tree/", recurse: true, cas: 1 }), "recurse with cas");
  expect(conflict.statusCode === 400, "recurse with cas rejects with a 400", conflict.message);
  expect((await consul.kv.del({ key: "js/tree/b/", recurse: true })) === true, "delete recurse a sub-tree");
  keys = await consul.kv.keys("js/tree/");
  expect(same(keys, ["js/tree/a", "js/tree/e/"]), "only that sub-tree went", keys);
  expect((await consul.kv.del("js/tree/a")) === true, "delete one key");
  expect((await consul.kv.delete("js/tree/a")) === true, "deleting a missing key resolves true as well");
  expect((await consul.kv.del({ key: "js/tree", recurse: true })) === true, "delete recurse the rest");
  expect((await consul.kv.get({ key: "js/tree/", recurse: true })) === undefined, "nothing left under js/tree/");

  step("blocking kv.get on a missing key: parked, woken when the key is written");
  const [res0, none] = await consul.kv.get({ key: "js/kv/later", ctx: withResponse() });
  expect(res0.statusCode === 404 && none === undefined, "js/kv/later is missing (404)", res0.statusCode);
  const idx = BigInt(res0.headers["x-consul-index"]);
  expect(idx >= 1n, "the 404 carries X-Consul-Index >= 1", res0.headers);
  const before = await parkedWatchers(base);
  let settled = false;
  const t0 = Date.now();
  const blocked = consul.kv
    .get({ key: "js/kv/later", index: String(idx), wait: "10s", ctx: withResponse() })
    .finally(() => { settled = true; });
  await untilParked(base, before, () => settled);
  expect(!settled, "the blocking get waits while the key is missing");
  expect((await consul.kv.set("js/kv/later", "arrived")) === true, "kv.set(js/kv/later)");
  const tChange = Date.now();
  const [res1, later] = await blocked;
  const elapsed = Date.now() - t0;
  const wokeAfter = Date.now() - tChange;
  expect(elapsed < 8000 && wokeAfter < 4000, "woken by the write, well before wait=10s ran out", { elapsed, wokeAfter });
  expect(BigInt(res1.headers["x-consul-index"]) > idx, `a larger index than ${idx}`, res1.headers["x-consul-index"]);
  expect(later && later.Value === "arrived", "the answer is the new pair", later);

  expect((await consul.kv.del({ key: "js/", recurse: true })) === true, "clean up js/");
  expect((await consul.kv.get({ key: "js/", recurse: true })) === undefined, "nothing left under js/");
}

async function sessionSteps(consul, node) {
  step("session.create (TTL, behavior release) and session.info / list / node");
  const { ID: s1 } = await consul.session.create({ name: "js-lock-1", ttl: "30s", behavior: "release" });
  const { ID: s2 } = await consul.session.create({ name: "js-lock-2", ttl: "30s" });
  expect(typeof s1 === "string" && s1.length === 36 && s1 !== s2, "session.create() resolves { ID: <uuid> }", [s1, s2]);
  let info = await consul.session.info(s1);
  expect(info && info.ID === s1 && info.Name === "js-lock-1" && info.Node === node && info.Behavior === "release"
    && info.TTL === "30s" && info.LockDelay === 15e9,
    "session.info(): ID, Name, Node, Behavior, TTL '30s', LockDelay 15 s in ns", info);
  let list = await consul.session.list();
  expect([s1, s2].every((s) => list.some((x) => x.ID === s)), "session.list() has both", list);
  list = await consul.session.node(node);
  expect([s1, s2].every((s) => list.some((x) => x.ID === s)), "session.node(node) has both", list);

  step("lock: acquire with s1, contend with s2, release, s2 acquires");
  const key = "js/lock/leader";
  expect((await consul.kv.set({ key, value: "s1 holds", acquire: s1 })) === true, "s1 acquires the lock");
  let pair = await consul.kv.get(key);
  expect(pair.Session === s1 && pair.LockIndex === 1 && pair.Value === "s1 holds", "the key names s1, LockIndex 1", pair);
  expect((await answered(consul.kv, "set", { key, value: "s2 wants", acquire: s2 })) === false, "s2 cannot acquire a held lock");
  expect((await answered(consul.kv, "set", { key, value: "s2 frees", release: s2 })) === false, "s2 cannot release s1's lock");
  pair = await consul.kv.get(key);
  expect(pair.Session === s1 && pair.Value === "s1 holds", "the failed acquire/release changed nothing", pair);
  expect((await consul.kv.set({ key, value: "free", release: s1 })) === true, "s1 releases");
  pair = await consul.kv.get(key);
  expect(!("Session" in pair) && pair.Value === "free" && pair.LockIndex === 1, "released: no Session, LockIndex kept", pair);
  expect((await consul.kv.set({ key, value: "s2 holds", acquire: s2 })) === true, "s2 acquires after the release");
  pair = await consul.kv.get(key);
  expect(pair.Session === s2 && pair.LockIndex === 2, "s2 holds it, LockIndex 2", pair);

  step("session.renew / session.destroy");
  const renewed = await consul.session.renew(s1);
  expect(Array.isArray(renewed) && renewed.length === 1 && renewed[0].ID === s1 && renewed[0].TTL === "30s",
    "session.renew() resolves [session]", renewed);
  await consul.session.destroy(s1);
  info = await consul.session.info(s1);
  expect(info === undefined, "session.info(destroyed) resolves undefined ([])", info);
  list = await consul.session.list();
  expect(!list.some((x) => x.ID === s1) && list.some((x) => x.ID === s2), "session.list() drops s1 only", list);
  const gone = await rejects(consul.session.renew(s1), "renew(destroyed)");
  expect(gone.statusCode === 404, "renew(destroyed) rejects with the 404", gone.message);
  pair = await consul.kv.get(key);
  expect(pair.Session === s2, "destroying s1 did not touch s2's lock", pair);
  await consul.session.destroy(s2);
  pair = await consul.kv.get(key);
  expect(pair && !("Session" in pair) && pair.Value === "s2 holds", "behavior release: s2's destroy releases its lock, keeps the key", pair);

  step("a session with behavior delete: its destroy deletes the key it holds");
  const { ID: s3 } = await consul.session.create({ name: "js-ephemeral", behavior: "delete", ttl: "30s" });
  expect((await consul.session.info(s3)).Behavior === "delete", "Behavior delete");
  expect((await consul.kv.set({ key: "js/lock/ephemeral", value: "here while s3 lives", acquire: s3 })) === true, "s3 acquires");
  expect((await consul.kv.get("js/lock/ephemeral")).Session === s3, "held by s3");
  await consul.session.destroy(s3);
  pair = await consul.kv.get("js/lock/ephemeral");
  expect(pair === undefined, "the key went with the session", pair);
  expect((await consul.kv.del({ key: "js/", recurse: true })) === true, "clean up js/");
}

async function txnSteps(consul) {
  step("transaction.create: a multi-operation transaction");
  expect((await consul.kv.set("js/txn/seed", "seed")) === true, "seed key");
  const out = await consul.transaction.create([
    { KV: { Verb: "set", Key: "js/txn/a", Value: b64("one") } },
    { KV: { Verb: "set", Key: "js/txn/b", Value: b64("two"), Flags: 7 } },
    { KV: { Verb: "get", Key: "js/txn/seed" } },
  ]);
  expect(out && out.Errors === null && Array.isArray(out.Results) && out.Results.length === 3,
    "transaction.create() resolves Results for each operation, Errors null", out);
  const res = out.Results.map((r) => r.KV);
  expect(same(res.map((r) => r.Key), ["js/txn/a", "js/txn/b", "js/txn/seed"]), "Results in operation order", res);
  expect(res[0].Value === null && res[1].Flags === 7 && res[2].Value === b64("seed"),
    "set results carry no Value; the get result has the value (base64)", res);
  const a = await consul.kv.get("js/txn/a");
  expect(a.Value === "one", "the transaction wrote js/txn/a", a);
  expect((await consul.kv.get("js/txn/b")).Flags === 7, "and js/txn/b with its Flags");

  step("transaction.create: a failing operation rolls back the whole transaction (409)");
  const err = await rejects(consul.transaction.create([
    { KV: { Verb: "set", Key: "js/txn/c", Value: b64("three") } },
    { KV: { Verb: "delete", Key: "js/txn/seed" } },
    { KV: { Verb: "cas", Key: "js/txn/a", Value: b64("stale"), Index: a.ModifyIndex - 1 } },
  ]), "a failing transaction");
  const body = err.response && err.response.body;
  expect(err.statusCode === 409, "rejects with statusCode 409", [err.statusCode, err.message]);
  expect(body && body.Results === null && Array.isArray(body.Errors) && body.Errors.length === 1
    && body.Errors[0].OpIndex === 2 && String(body.Errors[0].What).includes("js/txn/a"),
    "the body's Errors name the failing operation (OpIndex 2) and its key", body);
  expect((await consul.kv.get("js/txn/c")) === undefined, "the set before it was rolled back");
  expect((await consul.kv.get("js/txn/seed")).Value === "seed", "the delete before it was rolled back");
  expect((await consul.kv.get("js/txn/a")).Value === "one", "the cas target is unchanged");
  expect((await consul.kv.del({ key: "js/", recurse: true })) === true, "clean up js/");
}

async function eventSteps(consul) {
  step("event.fire with a payload / event.list by name");
  const ev = await consul.event.fire("js-deploy", "build 7");
  expect(ev && ev.Name === "js-deploy" && typeof ev.ID === "string" && ev.ID && ev.Payload === "build 7",
    "event.fire() resolves the event: Name, ID, Payload (decoded)", ev);
  const bin = Buffer.from([0, 1, 2, 0xfe, 0xff]);
  const evBin = await consul.event.fire({ name: "js-bin", payload: bin });
  expect(Buffer.isBuffer(evBin.Payload) && evBin.Payload.equals(bin), "a Buffer payload comes back as a Buffer", evBin);
  const other = await consul.event.fire("js-other");
  expect(other.Name === "js-other" && other.Payload === null, "an event without payload has Payload null", other);
  const ev2 = await consul.event.fire("js-deploy", "build 8");
  expect(ev2.ID !== ev.ID, "each event has its own ID", [ev, ev2]);
  const events = await consul.event.list("js-deploy");
  expect(same(events.map((e) => e.ID), [ev.ID, ev2.ID]), "event.list(name) has the two events, oldest first", events);
  expect(same(events.map((e) => e.Payload), ["build 7", "build 8"]), "with their payloads (decoded)", events);
  const bins = await consul.event.list({ name: "js-bin", buffer: true });
  expect(bins.length === 1 && Buffer.isBuffer(bins[0].Payload) && bins[0].Payload.equals(bin), "binary payload in the list", bins);
  const all = await consul.event.list();
  expect([ev.ID, evBin.ID, other.ID, ev2.ID].every((id) => all.some((e) => e.ID === id)), "event.list() has every event", all);
  const none = await consul.event.list("js-no-such-event");
  expect(Array.isArray(none) && none.length === 0, "event.list(unknown name) is []", none);
}

/** What Consul refuses, refused the way Consul refuses it (expected from Consul's source). */
async function refusalSteps(consul) {
  step("agent.check.register for a ServiceID that does not exist rejects with the 404");
  const orphan = await rejects(
    consul.agent.check.register({ name: "orphan", id: "orphan", serviceid: "no-such-service", ttl: "10s" }),
    "check.register(unknown ServiceID)",
  );
  expect(orphan.statusCode === 404 && /ServiceID "no-such-service" does not exist/.test(orphan.message),
    "404 ServiceID \"...\" does not exist", [orphan.statusCode, orphan.message]);

  step("session.create on a node not in the catalog rejects with 500 Missing node registration");
  const noNode = await rejects(consul.session.create({ node: "no-such-node" }), "session.create(unknown node)");
  expect(noNode.statusCode === 500 && /Missing node registration/.test(noNode.message),
    "500 Missing node registration", [noNode.statusCode, noNode.message]);

  step("kv.set with acquire by a session that does not exist rejects with 500 invalid session");
  const ghost = "00000000-0000-0000-0000-000000000000";
  const noSession = await rejects(consul.kv.set({ key: "js/orphan-lock", value: "x", acquire: ghost }), "acquire(unknown)");
  expect(noSession.statusCode === 500 && /invalid session/.test(noSession.message),
    "500 invalid session", [noSession.statusCode, noSession.message]);

  step("another datacenter rejects with 500 No path to datacenter");
  const noDc = await rejects(consul.catalog.node.list({ dc: "elsewhere" }), "catalog.node.list(dc=elsewhere)");
  expect(noDc.statusCode === 500 && /No path to datacenter/.test(noDc.message),
    "500 No path to datacenter", [noDc.statusCode, noDc.message]);
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
  const leaderAddr = me.Stats && me.Stats.consul && me.Stats.consul.leader_addr;
  expect(leader === leaderAddr && leader.endsWith(":8300"), "status.leader() is agent.self() Stats.consul.leader_addr (ip:8300)", [leader, leaderAddr]);
  const tags = members[0].Tags || {};
  expect(tags.role === "consul" && tags.dc === dc && tags.port === "8300", "a server member's tags: role consul, dc, port 8300", tags);
  const consulNodes = await consul.catalog.service.nodes("consul");
  expect(consulNodes.length === 1 && consulNodes[0].Node === node && consulNodes[0].ServicePort === 8300,
    "catalog.service.nodes('consul') is this node on port 8300", consulNodes);

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

  await filterSteps(consul, node);

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

  // --- KV, sessions and locks, transactions, events ---------------------------------------
  await kvSteps(consul, base);
  await sessionSteps(consul, node);
  await txnSteps(consul);
  await eventSteps(consul);
  await refusalSteps(consul);

  consul.destroy();
  console.log("npm consul: all steps passed");
}

main().catch((e) => {
  console.error(`FAILED: ${e.stack || e}`);
  process.exit(1);
});
