// Drives the dashboard at /ui/ in Debian's headless Chromium through playwright-core, against
// agents the Rust test started (crates/server/tests/it/ui.rs):
//
//   node dashboard.mjs AGENT_ADDR PRESERVING_AGENT_ADDR SCREENSHOT_DIR
//
// AGENT_ADDR is an empty agent; the browser reaches it through a TCP proxy of this script's,
// so the test can cut the watch stream. PRESERVING_AGENT_ADDR is an agent whose only renewer
// lapsed, so it is in self-preservation. Screenshots of the main pages, at a desktop and a
// phone size, go to SCREENSHOT_DIR. Exits 0 when every step passed; stops at the first
// failure, saying which step and what the page showed.

import { agentApi, proxy } from './agent.mjs';
import { assert, fail, session, shoot as shootAt } from './browser.mjs';

const [agentAddr, preservingAddr, shotDir] = process.argv.slice(2);
if (!agentAddr || !preservingAddr || !shotDir) {
  console.error('usage: node dashboard.mjs AGENT_ADDR PRESERVING_AGENT_ADDR SCREENSHOT_DIR');
  process.exit(2);
}
const { base: AGENT, call, register, report } = agentApi(agentAddr);
// What "live" means in the issue: a change shows within a second, without a reload.
const LIVE_MS = 1000;

// ---------------------------------------------------------------- the fleet shown

async function seed() {
  const ok = (r) => assert(r.status < 300, `seeding failed: ${JSON.stringify(r.body)}`);
  ok(await register('web', 'web-1', {
    address: '10.0.0.5', port: 8080, zone: 'eu-1a', tags: ['v2', 'primary'], weight: 10,
    meta: { version: '2.3.1', git: '4f2c9e1' },
    checks: [{ name: 'ready', ttl: '10m' }, { name: 'agent-http', http: `${AGENT}/healthz`, interval: '1s' }],
  }));
  ok(await register('web', 'web-2', {
    address: '10.0.0.6', port: 8080, zone: 'eu-1b', tags: ['v2'], meta: { version: '2.3.1' },
    checks: [{ name: 'ready', ttl: '10m' }],
  }));
  ok(await report('web', 'web-1', 'ready', 'passing', 'serving 1,204 req/s, p99 41 ms'));
  ok(await report('web', 'web-2', 'ready', 'passing', 'serving 1,187 req/s, p99 44 ms'));
  ok(await register('api', 'api-1', {
    address: '10.0.1.7', port: 9090, zone: 'eu-1a', tags: ['grpc', 'v1'],
    checks: [{ name: 'latency', ttl: '10m' }],
  }));
  ok(await report('api', 'api-1', 'latency', 'warning', 'p99 420 ms, above the 300 ms objective'));
  ok(await register('db', 'db-1', { address: '10.0.2.3', port: 5432, zone: 'eu-1b', tags: ['primary'], ttl: '10m' }));
  ok(await call('PUT', '/api/v1/services/db/instances/db-1/maintenance', { reason: 'disk replacement' }));
  // A heartbeat that never comes: critical within a second, with its TTL as the reason.
  ok(await register('cache', 'cache-1', { address: '10.0.3.9', port: 6379, zone: 'eu-1a', ttl: '1s' }));
  for (const [k, v] of [['app/config/db-url', 'postgres://db.service.consul:5432/app'],
    ['app/config/features', '{"checkout_v2": true, "dark_mode": false}'], ['app/name', 'storefront'],
    ['deploy/lock', '']]) {
    assert((await call('PUT', `/v1/kv/${k}`, v)).body === true, `KV put ${k} failed`);
  }
}

// ---------------------------------------------------------------- the pages

const proxied = await proxy(agentAddr);
await session(async ({ page, run, expectFailures }) => {
  const rows = () => page.$$eval('#services tbody tr', (trs) => trs.map((tr) => tr.dataset.service));
  const shoot = (name) => shootAt(page, shotDir, name);
  // While the test cuts the stream on purpose, the requests that fail then are expected.
  let cutting = false;
  expectFailures(() => cutting);
  const UI = `http://${proxied.addr}/ui/`;
  await seed();

  await run('the services page lists every registered service with health counts, tags and zones', async () => {
    await page.goto(UI);
    await page.waitForSelector('#live[data-state="live"]', { timeout: 5000 });
    await page.waitForSelector('tr[data-service="web"]');
    assert(JSON.stringify(await rows()) === JSON.stringify(['api', 'cache', 'db', 'web']), `rows: ${await rows()}`);
    // The HTTP check is critical until its first run, a second after registering.
    await page.waitForFunction(() => document.querySelector('tr[data-service="web"]').textContent.includes('2 passing'),
      null, { timeout: 5000 }).catch(() => fail('web never showed 2 passing'));
    const web = await page.textContent('tr[data-service="web"]');
    for (const want of ['2 passing', 'v2', 'primary', 'eu-1a', 'eu-1b']) assert(web.includes(want), `web row lacks ${want}: ${web}`);
    assert((await page.textContent('tr[data-service="api"]')).includes('1 warning'), 'api is not shown warning');
    assert((await page.textContent('tr[data-service="db"]')).includes('1 maintenance'), 'db is not shown in maintenance');
    await page.waitForSelector('tr[data-service="cache"] .pill.critical', { timeout: 3000 });
  });

  await run('a registration, a health change and a deregistration show within a second', async () => {
    await register('billing', 'billing-1', { address: '10.0.4.1', port: 7000, zone: 'us-1a', tags: ['beta'], checks: [{ name: 'ready', ttl: '10m', status: 'passing' }] });
    await page.waitForSelector('tr[data-service="billing"]', { timeout: LIVE_MS });
    await report('billing', 'billing-1', 'ready', 'critical', 'payment gateway unreachable');
    await page.waitForSelector('tr[data-service="billing"] .pill.critical', { timeout: LIVE_MS });
    await call('DELETE', '/api/v1/services/billing/instances/billing-1');
    await page.waitForSelector('tr[data-service="billing"]', { state: 'detached', timeout: LIVE_MS });
  });

  await run('search and the tag, zone and health filters narrow the list', async () => {
    const expect = async (what, want) => {
      await page.waitForFunction((w) => JSON.stringify([...document.querySelectorAll('#services tbody tr')]
        .map((tr) => tr.dataset.service)) === w, JSON.stringify(want), { timeout: 2000 })
        .catch(() => fail(`${what}: expected ${want}`));
    };
    await page.fill('#f-q', 'WE');
    await expect('search "WE"', ['web']);
    await page.fill('#f-q', 'grpc');
    await expect('search by tag "grpc"', ['api']);
    await page.fill('#f-q', '');
    await page.selectOption('#f-tag', 'primary');
    await expect('tag primary', ['db', 'web']);
    await page.selectOption('#f-zone', 'eu-1a');
    await expect('tag primary, zone eu-1a', ['web']);
    await page.selectOption('#f-tag', '');
    await expect('zone eu-1a', ['api', 'cache', 'web']);
    await page.selectOption('#f-zone', '');
    await page.selectOption('#f-health', 'maintenance');
    await expect('health maintenance', ['db']);
    await page.selectOption('#f-health', 'critical');
    await expect('health critical', ['cache']);
    assert((await page.textContent('#summary')).includes('1 of 4'), 'the summary does not count what is shown');
    await page.selectOption('#f-health', '');
    await expect('no filter', ['api', 'cache', 'db', 'web']);
  });
  await shoot('services');

  await run('the service page shows instances, their checks with output, and why they are unhealthy', async () => {
    await page.click('tr[data-service="web"] a');
    await page.waitForSelector('[data-instance="web-1"] [data-check="ready"]');
    const card = '[data-instance="web-1"]';
    const text = await page.textContent(card);
    for (const want of ['10.0.0.5:8080', 'eu-1a', 'version=2.3.1', 'primary', '10']) assert(text.includes(want), `web-1 lacks ${want}`);
    assert((await page.textContent(`${card} [data-check="ready"]`)).includes('serving 1,204 req/s'), 'the TTL check output is missing');
    // The HTTP check runs every second against the agent's /healthz.
    await page.waitForFunction((sel) => /200/.test(document.querySelector(sel)?.textContent || ''),
      `${card} [data-check="agent-http"] .output`, { timeout: 8000 })
      .catch(() => fail('the HTTP check output never showed its 200'));
    assert(/\d{4}-\d\d-\d\d \d\d:\d\d:\d\d/.test(await page.textContent(`${card} [data-check="ready"]`)), 'no last change time');
    await page.goto(`${UI}#/services/cache`);
    await page.waitForSelector('[data-instance="cache-1"] .reason');
    assert((await page.textContent('[data-instance="cache-1"] .reason')).includes('TTL lapsed'), 'cache-1 does not say its TTL lapsed');
    await page.goto(`${UI}#/services/api`);
    await page.waitForSelector('[data-instance="api-1"] .reason');
    assert((await page.textContent('[data-instance="api-1"] .reason')).includes('latency (warning)'), 'api-1 does not name its failing check');
  });

  await run('maintenance is switched on and off from the page, and the API agrees', async () => {
    await page.goto(`${UI}#/services/web`);
    await page.waitForSelector('[data-instance="web-2"] .maint-on');
    await page.fill('[data-instance="web-2"] .maint-reason', 'kernel upgrade');
    await page.click('[data-instance="web-2"] .maint-on');
    await page.waitForSelector('[data-instance="web-2"] .maint-off', { timeout: LIVE_MS });
    assert((await page.textContent('[data-instance="web-2"] .reason')).includes('maintenance: kernel upgrade'), 'no maintenance reason');
    let inst = (await call('GET', '/api/v1/services/web/instances/web-2')).body;
    assert(inst.health === 'maintenance' && inst.maintenance_reason === 'kernel upgrade', `API: ${JSON.stringify(inst)}`);
    await page.click('[data-instance="web-2"] .maint-off');
    await page.waitForSelector('[data-instance="web-2"] .maint-on', { timeout: LIVE_MS });
    inst = (await call('GET', '/api/v1/services/web/instances/web-2')).body;
    assert(inst.health === 'passing' && inst.maintenance_reason === null, `API after: ${JSON.stringify(inst)}`);
  });

  await run('an error from the API is shown, not swallowed', async () => {
    // The agent under test takes KV values of at most 512 bytes.
    const excused = expectFailures((url) => url.includes('/v1/kv/app/too-big'));
    await page.goto(`${UI}#/kv/app/`);
    await page.waitForSelector('[data-key="app/name"]');
    await page.fill('#new-key', 'too-big');
    await page.fill('#new-value', 'x'.repeat(600));
    await page.click('form.create button[type="submit"]');
    await page.waitForSelector('#error:not([hidden])', { timeout: 2000 });
    const message = await page.textContent('#error');
    assert(message.includes('413') && message.includes('512 byte limit'), `error banner: ${message}`);
    assert((await call('GET', '/v1/kv/app/too-big')).status === 404, 'the refused key exists');
    excused();
  });
  await page.goto(`${UI}#/services/web`);
  await page.waitForFunction(() => /200/.test(document.querySelector('[data-instance="web-1"] [data-check="agent-http"] .output')?.textContent || ''));
  await shoot('service');

  await run('a lost stream is shown, and the page reconnects by itself without missing a change', async () => {
    await page.goto(`${UI}#/services`);
    await page.waitForSelector('#live[data-state="live"]');
    cutting = true;
    proxied.cut();
    await page.waitForSelector('#live[data-state="lost"]', { timeout: 3000 });
    const shown = await page.textContent('#live');
    assert(/lost/.test(shown), `the indicator says ${shown}`);
    await register('search', 'search-1', { address: '10.0.5.1', port: 9200, zone: 'eu-1b', ttl: '10m' });
    proxied.restore();
    await page.waitForSelector('#live[data-state="live"]', { timeout: 8000 });
    await page.waitForSelector('tr[data-service="search"]', { timeout: LIVE_MS });
    cutting = false;
  });

  await run('key/value: browse, create, edit from the page and from the API, delete', async () => {
    await page.goto(`${UI}#/kv/`);
    await page.waitForSelector('[data-key="app/"]');
    const top = await page.$$eval('#keys li', (lis) => lis.map((l) => l.dataset.key));
    assert(JSON.stringify(top) === JSON.stringify(['app/', 'deploy/']), `root: ${top}`);
    await page.click('[data-key="app/"] a');
    await page.waitForSelector('[data-key="app/config/"]');
    await page.waitForSelector('[data-key="app/name"]');
    await page.fill('#new-key', 'release');
    await page.fill('#new-value', 'v42');
    await page.fill('#new-flags', '7');
    await page.click('form.create button[type="submit"]');
    await page.waitForSelector('#kv-value');
    await page.waitForFunction(() => document.querySelector('#kv-value').value === 'v42');
    let info = await page.textContent('#kv-info');
    for (const want of ['Flags7', 'CreateIndex', 'ModifyIndex', 'LockIndex0', 'Sessionnone']) assert(info.includes(want), `key info lacks ${want}: ${info}`);
    let kv = (await call('GET', '/v1/kv/app/release')).body[0];
    assert(Buffer.from(kv.Value, 'base64').toString() === 'v42' && kv.Flags === 7, `API: ${JSON.stringify(kv)}`);

    await page.fill('#kv-value', 'v43');
    await page.click('#kv-save');
    await page.waitForFunction(async () => {
      const r = await fetch('/v1/kv/app/release?raw');
      return (await r.text()) === 'v43';
    }, null, { timeout: 2000 }).catch(() => fail('the edit did not reach the agent'));
    kv = (await call('GET', '/v1/kv/app/release')).body[0];
    await page.waitForFunction((idx) => document.querySelector('#kv-info').textContent.includes(`ModifyIndex${idx}`), kv.ModifyIndex, { timeout: LIVE_MS });

    // A change made elsewhere shows without a reload (a blocking query).
    await call('PUT', '/v1/kv/app/release?flags=9', 'v44');
    await page.waitForFunction(() => document.querySelector('#kv-value').value === 'v44', null, { timeout: LIVE_MS })
      .catch(() => fail('a change made through the API did not show'));
    assert((await page.inputValue('#kv-flags')) === '9', 'flags did not follow');

    // Creating a key that exists is refused, and the page says so.
    await page.goto(`${UI}#/kv/app/`);
    await page.waitForSelector('[data-key="app/release"]');
    await page.fill('#new-key', 'release');
    await page.fill('#new-value', 'clobber');
    await page.click('form.create button[type="submit"]');
    await page.waitForSelector('#error:not([hidden])', { timeout: 2000 });
    assert((await page.textContent('#error')).includes('already exists'), 'no error for an existing key');
    assert((await call('GET', '/v1/kv/app/release?raw')).status === 200, 'the key went away');

    await page.click('[data-key="app/release"] a');
    await page.waitForFunction(() => document.querySelector('#kv-value')?.value === 'v44');
    await page.click('#kv-delete');
    await page.click('#kv-delete-yes');
    await page.waitForSelector('[data-key="app/name"]');
    assert(await page.$('[data-key="app/release"]') === null, 'the deleted key is still listed');
    assert((await call('GET', '/v1/kv/app/release')).status === 404, 'the key was not deleted');
  });
  await page.goto(`${UI}#/kv/app/config/features`);
  await page.waitForFunction(() => document.querySelector('#kv-value')?.value.includes('checkout_v2'));
  await shoot('kv');

  await run('the agents page shows this agent', async () => {
    await page.goto(`${UI}#/agents`);
    await page.waitForSelector('[data-agent]');
    const status = (await call('GET', '/api/v1/status')).body;
    const text = await page.textContent('#agents');
    for (const want of [status.node, status.version, status.datacenter, 'single agent', 'Self-preservation']) {
      assert(text.includes(want), `agents page lacks ${want}: ${text}`);
    }
    assert(await page.$('#badge-preservation') === null, 'a self-preservation badge on an agent not in it');
  });
  await shoot('agents');

  await run('an agent in self-preservation is flagged on every page', async () => {
    await page.goto(`http://${preservingAddr}/ui/#/agents`);
    await page.waitForSelector('#badge-preservation', { timeout: 5000 });
    await page.waitForFunction(() => document.querySelector('#agents').textContent.includes('active'), null, { timeout: 5000 });
    await page.goto(`http://${preservingAddr}/ui/#/services`);
    await page.waitForSelector('#badge-preservation');
  });

  await run('the token is kept in the browser and sent with every request', async () => {
    await page.goto(UI);
    await page.waitForSelector('#live[data-state="live"]');
    await page.fill('#token', 's3cret-token');
    await page.click('#token-form button');
    const seen = [];
    const listener = (req) => {
      const path = new URL(req.url()).pathname;
      if (path.startsWith('/api/') || path.startsWith('/v1/')) {
        seen.push([req.url(), req.headers()['x-muster-token'], req.headers()['x-consul-token']]);
      }
    };
    page.on('request', listener);
    await page.reload();
    await page.goto(`${UI}#/kv/app/`);
    await page.waitForSelector('#live[data-state="live"]');
    await page.waitForSelector('[data-key="app/name"]');
    await page.waitForRequest((r) => r.url().includes('/api/v1/status'), { timeout: 5000 });
    page.off('request', listener);
    assert((await page.inputValue('#token')) === 's3cret-token', 'the token was not kept');
    assert(seen.some(([u]) => u.includes('/api/v1/watch')) && seen.some(([u]) => u.includes('/v1/kv/')), `requests seen: ${seen.map(([u]) => u)}`);
    const bare = seen.filter(([, m, c]) => m !== 's3cret-token' || c !== 's3cret-token');
    assert(bare.length === 0, `requests without the token: ${bare.map(([u]) => u)}`);
  });
});
proxied.close();
