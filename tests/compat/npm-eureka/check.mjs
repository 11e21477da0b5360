// Drives muster's Eureka API with the unmodified eureka-js-client (npm).
//
// Usage: node check.mjs HOST:PORT
//
// Registers through the client (under its default /eureka/v2/apps/ path), heartbeats,
// discovers an application registered through muster's native API, follows changes through
// delta fetches, sees an instance go OUT_OF_SERVICE and back and another whose heartbeats
// stop turn DOWN, and deregisters on stop. Exits 0 when every step behaves as against
// Eureka; otherwise throws, naming the step.

import assert from 'node:assert/strict';
import { setTimeout as sleep } from 'node:timers/promises';
import eureka from 'eureka-js-client';

const { Eureka } = eureka;
const [host, port] = process.argv[2].split(':');
const BASE = `http://${host}:${port}`;
const DEADLINE_MS = 15000;

async function native(method, path, body) {
  const r = await fetch(`${BASE}/api/v1${path}`, {
    method,
    headers: { 'content-type': 'application/json' },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await r.text();
  return { status: r.status, body: text ? JSON.parse(text) : null };
}

async function healthyIds(service) {
  const r = await native('GET', `/services/${service}`);
  assert.equal(r.status, 200, `discover ${service}`);
  return r.body.instances.map((i) => i.id).sort();
}

async function eventually(what, check) {
  const end = Date.now() + DEADLINE_MS;
  let last;
  while (Date.now() < end) {
    try {
      last = await check();
      if (last) return last;
    } catch (e) {
      last = e;
    }
    await sleep(200);
  }
  throw new Error(`${what}: still not so after ${DEADLINE_MS} ms (last: ${last})`);
}

function client(app, id, ip, instancePort, overrides = {}) {
  const c = new Eureka({
    instance: {
      app,
      instanceId: id,
      hostName: `${id}.local`,
      ipAddr: ip,
      port: { $: instancePort, '@enabled': true },
      vipAddress: app,
      statusPageUrl: `http://${ip}:${instancePort}/info`,
      dataCenterInfo: {
        '@class': 'com.netflix.appinfo.InstanceInfo$DefaultDataCenterInfo',
        name: 'MyOwn',
      },
      leaseInfo: { renewalIntervalInSecs: 1, durationInSecs: 3 },
      ...overrides.instance,
    },
    // Deltas after the first full fetch, as a long-running client would use them.
    shouldUseDelta: true,
    eureka: {
      host,
      port: Number(port),
      heartbeatInterval: 1000,
      registryFetchInterval: 500,
      maxRetries: 0,
      ...overrides.eureka,
    },
  });
  c.logger.level('warn');
  return c;
}

const start = (c) => new Promise((ok, fail) => c.start((e) => (e ? fail(e) : ok())));
const stop = (c) => new Promise((ok, fail) => c.stop((e) => (e ? fail(e) : ok())));
// The statuses the client holds for `app` (its own cache: getInstancesByAppId warns when empty).
const statusOf = (c, app) => (c.cache.app[app] || []).map((i) => i.status).join(',');

// An application registered through the native API, for discovery.
let r = await native('PUT', '/services/inventory/instances/inv-1', {
  address: '10.0.0.5', port: 7000, ttl: '1h',
});
assert.ok(r.status === 200 || r.status === 201, `native register: ${r.status}`);

const js = client('js-app', 'js-1', '127.0.0.1', 6000);
await start(js);
console.log('registered and fetched the registry');

r = await native('GET', '/services/js-app/instances/js-1');
assert.equal(r.status, 200, 'registration not in the native API');
assert.equal(r.body.address, '127.0.0.1');
assert.equal(r.body.port, 6000);
assert.equal(r.body.ttl, '3s');

const inventory = js.getInstancesByAppId('INVENTORY');
assert.equal(inventory.length, 1);
assert.equal(inventory[0].ipAddr, '10.0.0.5');
assert.equal(inventory[0].port.$, 7000);
assert.equal(js.getInstancesByVipAddress('inventory').length, 1);
console.log('discovered the natively registered application');

await sleep(4500);
assert.deepEqual(await healthyIds('js-app'), ['js-1'], 'heartbeats did not keep the instance');
console.log('heartbeats keep it registered');

await native('PUT', '/services/catalog/instances/cat-1', { address: '10.0.0.8', port: 7100, ttl: '1h' });
await eventually('delta brings catalog', () => js.getInstancesByAppId('CATALOG').length === 1);
await native('DELETE', '/services/catalog/instances/cat-1');
await eventually('delta removes catalog', () => js.getInstancesByAppId('CATALOG').length === 0);
console.log('delta fetches follow additions and removals');

r = await fetch(`${BASE}/eureka/v2/apps/JS-APP/js-1/status?value=OUT_OF_SERVICE`, { method: 'PUT' });
assert.equal(r.status, 200);
assert.deepEqual(await healthyIds('js-app'), [], 'OUT_OF_SERVICE still discoverable natively');
await eventually('client sees OUT_OF_SERVICE', () => statusOf(js, 'JS-APP') === 'OUT_OF_SERVICE');
r = await fetch(`${BASE}/eureka/v2/apps/JS-APP/js-1/status`, { method: 'DELETE' });
assert.equal(r.status, 200);
await eventually('back UP natively', async () => (await healthyIds('js-app')).length === 1);
await eventually('client sees UP again', () => statusOf(js, 'JS-APP') === 'UP');
console.log('OUT_OF_SERVICE and back');

// A client that stops heartbeating (its interval is far beyond its 1 s lease).
const lapser = client('js-lapse', 'lapse-1', '127.0.0.2', 6001, {
  instance: { leaseInfo: { renewalIntervalInSecs: 1, durationInSecs: 1 } },
  eureka: { heartbeatInterval: 600000, fetchRegistry: false },
});
await start(lapser);
assert.deepEqual(await healthyIds('js-lapse'), ['lapse-1']);
await eventually('a lapsed heartbeat hides the instance natively',
  async () => (await healthyIds('js-lapse')).length === 0);
await eventually('the client sees the lapsed instance DOWN',
  () => statusOf(js, 'JS-LAPSE') === 'DOWN');
console.log('a lapsed heartbeat turns the instance DOWN');
await stop(lapser);

await stop(js);
r = await native('GET', '/services/js-app/instances/js-1');
assert.equal(r.status, 404, 'still registered after stop');
console.log('stop deregisters');
console.log('eureka-js-client: all steps passed');
process.exit(0);
