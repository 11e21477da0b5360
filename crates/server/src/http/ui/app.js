// The muster dashboard: one module, no dependencies, no build step.
//
// Pages are chosen by the URL fragment: #/services, #/services/{name}, #/kv/{prefix/ or key},
// #/agents. Services follow the native watch stream (/api/v1/watch), read with fetch rather
// than EventSource because EventSource cannot send the token headers; the key/value pages
// follow Consul blocking queries; the agent's status is polled.

const TOKEN_KEY = 'muster.token';
const HEALTHS = ['passing', 'warning', 'critical', 'maintenance'];
// Waits before reconnecting the stream, by attempt; the last one repeats.
const RECONNECT_MS = [250, 1000, 2000, 5000];
// The agent sends a comment on an idle stream every 15 s: this much silence is a dead link.
const SILENCE_MS = 40000;
const STATUS_POLL_MS = 2000;
const CHECKS_POLL_MS = 5000;
const KV_WAIT = '60s';

// ---------------------------------------------------------------- DOM

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v == null || v === false) continue;
    if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else if (k === 'class') el.className = v;
    else if (k === 'value') el.value = v;
    else el.setAttribute(k, v === true ? '' : String(v));
  }
  return add(el, children);
}

// Adds children to an element: nested arrays flattened, null and false left out, anything
// else as text.
function add(el, ...children) {
  for (const c of children.flat(Infinity)) {
    if (c == null || c === false) continue;
    el.append(c instanceof Node ? c : String(c));
  }
  return el;
}

// Replaces an element's children, as `add` takes them.
function put(el, ...children) {
  el.replaceChildren();
  return add(el, children);
}

const $ = (sel) => document.querySelector(sel);
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function pill(health, text) {
  return h('span', { class: `pill ${health}` }, text ?? health);
}

function dl(pairs) {
  return h('dl', {}, pairs.filter(([, v]) => v != null && v !== '')
    .map(([k, v]) => [h('dt', {}, k), h('dd', {}, v)]));
}

function chips(values, cls = 'chip') {
  return values.length ? values.map((v) => h('span', { class: cls }, v)) : h('span', { class: 'muted' }, 'none');
}

// ---------------------------------------------------------------- API

function token() {
  return localStorage.getItem(TOKEN_KEY) || '';
}

// Every request carries the token under both names: the native API's and Consul's.
function withToken(extra) {
  const hs = { ...extra };
  const t = token();
  if (t) {
    hs['X-Muster-Token'] = t;
    hs['X-Consul-Token'] = t;
  }
  return hs;
}

// The message of an error answer: the native API's {"error": {"message"}} or Consul's text.
function errorText(text, fallback) {
  try {
    const v = JSON.parse(text);
    if (v && v.error && v.error.message) return v.error.message;
  } catch { /* not JSON: Consul answers errors as text */ }
  return text.trim() || fallback;
}

// Calls the agent. Answers {status, headers, data}; throws an Error naming the request and
// the agent's message on a failure (a 404 is an answer when `allow404`).
async function api(method, path, { body, signal, allow404 } = {}) {
  const init = { method, signal, cache: 'no-store', headers: withToken({}) };
  if (body !== undefined) {
    if (typeof body === 'string') {
      init.body = body;
    } else {
      init.body = JSON.stringify(body);
      init.headers['Content-Type'] = 'application/json';
    }
  }
  let resp;
  try {
    resp = await fetch(path, init);
  } catch (e) {
    if (signal && signal.aborted) throw e;
    throw new Error(`${method} ${path}: the agent did not answer (${e.message})`);
  }
  noteHeaders(resp.headers);
  const text = await resp.text();
  if (!resp.ok && !(allow404 && resp.status === 404)) {
    throw new Error(`${method} ${path} failed (${resp.status}): ${errorText(text, resp.statusText)}`);
  }
  let data = text;
  if ((resp.headers.get('content-type') || '').includes('json') && text) data = JSON.parse(text);
  return { status: resp.status, headers: resp.headers, data };
}

const enc = encodeURIComponent;
// A KV key in a URL path: each segment encoded, the separators kept.
const encKey = (key) => key.split('/').map(enc).join('/');

// ---------------------------------------------------------------- errors and badges

function showError(message) {
  const box = $('#error');
  put(box, h('span', {}, message),
    h('button', { type: 'button', class: 'link', onclick: clearError, 'aria-label': 'Dismiss' }, '×'));
  box.hidden = false;
}

function clearError() {
  $('#error').hidden = true;
}

const agent = { preserving: false, cutOff: false, status: null, statusError: null };

function noteHeaders(hs) {
  const p = hs.get('x-muster-self-preservation');
  if (p) agent.preserving = p === 'true';
  const k = hs.get('x-muster-known-leader') || hs.get('x-consul-knownleader');
  if (k) agent.cutOff = k === 'false';
  renderBadges();
}

function renderBadges() {
  const badges = [];
  if (agent.preserving) {
    badges.push(h('span', {
      class: 'badge warn', id: 'badge-preservation',
      title: 'Too few instances renewed in time: expirations are held back (see Agents)',
    }, 'self-preservation'));
  }
  if (agent.cutOff) {
    badges.push(h('span', {
      class: 'badge bad', id: 'badge-cutoff',
      title: 'This agent cannot reach etcd: what it shows may be stale',
    }, 'cut off from etcd'));
  }
  put($('#badges'), ...badges);
}

async function pollStatus() {
  for (;;) {
    try {
      const r = await api('GET', '/api/v1/status');
      agent.status = r.data;
      agent.statusError = null;
      agent.preserving = Boolean(r.data.self_preservation && r.data.self_preservation.active);
      agent.cutOff = Boolean(r.data.cluster && r.data.cluster.known_leader === false);
      renderBadges();
    } catch (e) {
      agent.statusError = e.message;
    }
    if (page && page.onStatus) page.onStatus();
    await sleep(STATUS_POLL_MS);
  }
}

// ---------------------------------------------------------------- the watch stream

const live = { services: new Map(), index: 0, loaded: false, lastId: null, controller: null };

function setLive(state, detail) {
  const el = $('#live');
  el.dataset.state = state;
  el.textContent = { live: 'live', connecting: 'connecting…', lost: 'stream lost: reconnecting' }[state];
  el.title = detail || (state === 'live' ? `following the watch stream at index ${live.index}` : '');
}

// Applies one server-sent event: a `snapshot` replaces everything, a `change` carries the
// services that changed with their whole instance lists (empty when gone).
function dispatch(block) {
  let event = 'message';
  let id = null;
  const data = [];
  for (const line of block.split('\n')) {
    if (!line || line.startsWith(':')) continue;
    const colon = line.indexOf(':');
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? '' : line.slice(colon + 1);
    if (value.startsWith(' ')) value = value.slice(1);
    if (field === 'event') event = value;
    else if (field === 'data') data.push(value);
    else if (field === 'id') id = value;
  }
  if (!data.length) return;
  const msg = JSON.parse(data.join('\n'));
  if (event === 'snapshot') live.services = new Map();
  for (const [name, list] of Object.entries(msg.services)) {
    if (list.length) live.services.set(name, list);
    else live.services.delete(name);
  }
  if (id !== null) live.lastId = id;
  live.index = msg.index;
  live.loaded = true;
  scheduleUpdate();
}

// Follows /api/v1/watch for ever: reconnects after any loss, resuming from the last event
// id, so nothing is missed or applied twice.
async function follow() {
  let attempt = 0;
  for (;;) {
    const ctl = new AbortController();
    live.controller = ctl;
    let silence;
    const arm = () => {
      clearTimeout(silence);
      silence = setTimeout(() => ctl.abort(new Error(`no data for ${SILENCE_MS / 1000} s`)), SILENCE_MS);
    };
    try {
      setLive('connecting');
      const hs = withToken({ Accept: 'text/event-stream' });
      if (live.lastId) hs['Last-Event-ID'] = live.lastId;
      arm();
      const resp = await fetch('/api/v1/watch?health=any', { headers: hs, signal: ctl.signal, cache: 'no-store' });
      noteHeaders(resp.headers);
      if (!resp.ok) {
        throw new Error(`the agent refused the stream (${resp.status}): ${errorText(await resp.text(), resp.statusText)}`);
      }
      const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
      setLive('live');
      attempt = 0;
      let buf = '';
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        arm();
        buf += value;
        let at;
        while ((at = buf.indexOf('\n\n')) >= 0) {
          dispatch(buf.slice(0, at));
          buf = buf.slice(at + 2);
        }
        setLive('live');
      }
      throw new Error('the agent closed the stream');
    } catch (e) {
      clearTimeout(silence);
      if (e === 'restart') continue;
      const wait = RECONNECT_MS[Math.min(attempt, RECONNECT_MS.length - 1)];
      attempt += 1;
      setLive('lost', `${e.message || e}; retrying in ${wait} ms`);
      await sleep(wait);
    }
  }
}

// ---------------------------------------------------------------- routing

let page = null;
let updatePending = false;

function scheduleUpdate() {
  if (updatePending) return;
  updatePending = true;
  setTimeout(() => {
    updatePending = false;
    if (page && page.update) page.update();
  }, 0);
}

function route() {
  if (page && page.leave) page.leave();
  page = null;
  clearError();
  const hash = location.hash.replace(/^#/, '') || '/services';
  const main = $('#main');
  put(main);
  const section = hash.split('/')[1];
  for (const a of document.querySelectorAll('[data-nav]')) {
    if (a.dataset.nav === section) a.setAttribute('aria-current', 'page');
    else a.removeAttribute('aria-current');
  }
  let m;
  try {
    if (hash === '/services') page = servicesPage(main);
    else if ((m = hash.match(/^\/services\/([^/]+)$/))) page = servicePage(main, decodeURIComponent(m[1]));
    else if (hash.startsWith('/kv/')) page = kvPage(main, hash.slice(4).split('/').map(decodeURIComponent).join('/'));
    else if (hash === '/agents') page = agentsPage(main);
  } catch (e) {
    if (!(e instanceof URIError)) throw e;
  }
  if (!page) {
    main.append(h('h1', {}, 'No such page'), h('p', {}, h('a', { href: '#/services' }, 'Back to the services')));
    return;
  }
  document.title = `${page.title} · muster`;
  if (page.update) page.update();
}

// ---------------------------------------------------------------- services

// Kept across pages, so coming back to the list keeps the filters.
const filters = { q: '', tag: '', zone: '', health: '' };

function summarize(name, list) {
  const counts = Object.fromEntries(HEALTHS.map((x) => [x, 0]));
  const tags = new Set();
  const zones = new Set();
  for (const i of list) {
    counts[i.health] = (counts[i.health] || 0) + 1;
    for (const t of i.tags) tags.add(t);
    if (i.zone) zones.add(i.zone);
  }
  return { name, total: list.length, counts, tags: [...tags].sort(), zones: [...zones].sort() };
}

function healthPills(counts) {
  const shown = HEALTHS.filter((x) => counts[x] > 0);
  return shown.length ? shown.map((x) => pill(x, `${counts[x]} ${x}`)) : h('span', { class: 'muted' }, 'no instances');
}

function servicesPage(main) {
  const setFilter = (key) => (e) => {
    filters[key] = e.target.value;
    update();
  };
  const search = h('input', {
    type: 'search', id: 'f-q', placeholder: 'Search by name or tag', 'aria-label': 'Search services',
    value: filters.q, oninput: setFilter('q'),
  });
  const tag = h('select', { id: 'f-tag', 'aria-label': 'Tag', onchange: setFilter('tag') });
  const zone = h('select', { id: 'f-zone', 'aria-label': 'Zone', onchange: setFilter('zone') });
  const health = h('select', { id: 'f-health', 'aria-label': 'Health', onchange: setFilter('health') },
    h('option', { value: '' }, 'any health'), HEALTHS.map((x) => h('option', { value: x }, `has ${x}`)));
  health.value = filters.health;
  const summary = h('p', { class: 'muted', id: 'summary' });
  const body = h('tbody');
  main.append(
    h('h1', {}, 'Services'),
    h('div', { class: 'filters' }, search, tag, zone, health),
    summary,
    h('table', { class: 'cards', id: 'services' },
      h('thead', {}, h('tr', {}, ['Service', 'Instances', 'Health', 'Tags', 'Zones'].map((t) => h('th', {}, t)))),
      body),
  );

  // Fills a filter's options from what is registered, keeping a chosen value that is gone.
  function options(select, anyLabel, values, current) {
    const all = new Set(values);
    if (current) all.add(current);
    const wanted = ['', ...[...all].sort()];
    const have = [...select.options].map((o) => o.value);
    if (wanted.join('\n') !== have.join('\n')) {
      put(select, ...wanted.map((v) => h('option', { value: v }, v || anyLabel)));
    }
    select.value = current;
  }

  function matches(s) {
    const q = filters.q.trim().toLowerCase();
    if (q && !s.name.toLowerCase().includes(q) && !s.tags.some((t) => t.toLowerCase().includes(q))) return false;
    if (filters.tag && !s.tags.includes(filters.tag)) return false;
    if (filters.zone && !s.zones.includes(filters.zone)) return false;
    if (filters.health && !(s.counts[filters.health] > 0)) return false;
    return true;
  }

  function row(s) {
    return h('tr', { 'data-service': s.name },
      h('td', { 'data-label': 'Service' }, h('a', { href: `#/services/${enc(s.name)}` }, s.name)),
      h('td', { 'data-label': 'Instances' }, s.total),
      h('td', { 'data-label': 'Health' }, healthPills(s.counts)),
      h('td', { 'data-label': 'Tags' }, chips(s.tags)),
      h('td', { 'data-label': 'Zones' }, chips(s.zones)));
  }

  function update() {
    const all = [...live.services].sort(([a], [b]) => a.localeCompare(b)).map(([n, l]) => summarize(n, l));
    options(tag, 'any tag', all.flatMap((s) => s.tags), filters.tag);
    options(zone, 'any zone', all.flatMap((s) => s.zones), filters.zone);
    if (!live.loaded) {
      summary.textContent = 'Waiting for the watch stream…';
      return;
    }
    const shown = all.filter(matches);
    put(body, ...shown.map(row));
    summary.textContent = all.length === 0
      ? 'No services are registered.'
      : `${shown.length} of ${all.length} service${all.length === 1 ? '' : 's'}`;
  }

  return { title: 'Services', update };
}

// ---------------------------------------------------------------- one service

// Why an instance has its health: the maintenance reason, the checks not passing, a lapsed
// TTL (critical with no critical check can only be the heartbeat).
function reasonOf(i) {
  if (i.health === 'maintenance') {
    return i.maintenance_reason ? `maintenance: ${i.maintenance_reason}` : 'the node is in maintenance';
  }
  const parts = [];
  const failing = i.checks.filter((c) => c.status !== 'passing');
  if (failing.length) parts.push(`failing checks: ${failing.map((c) => `${c.name} (${c.status})`).join(', ')}`);
  if (i.health === 'critical' && !failing.some((c) => c.status === 'critical')) {
    parts.push(i.ttl ? `TTL lapsed: no heartbeat within ${i.ttl}` : 'its lease lapsed');
  }
  return parts.join('; ');
}

function servicePage(main, name) {
  const instancesPath = (id) => `/api/v1/services/${enc(name)}/instances/${enc(id)}`;
  const drafts = new Map(); // maintenance reasons being typed, by instance
  let checks = new Map(); // instance id -> checks with results
  let checksError = null;
  let shown = null;
  let alive = true;
  let seen = null;
  const summary = h('p', { class: 'muted', id: 'summary' });
  const list = h('div', { class: 'instances', id: 'instances' });
  main.append(h('h1', {}, h('a', { href: '#/services' }, 'Services'), ' / ', name), summary, list);

  async function loadChecks() {
    try {
      const r = await api('GET', `/api/v1/services/${enc(name)}/checks`);
      const next = new Map();
      for (const c of r.data.checks) {
        if (!next.has(c.instance)) next.set(c.instance, []);
        next.get(c.instance).push(c);
      }
      checks = next;
      checksError = null;
    } catch (e) {
      checksError = e.message;
    }
    if (alive) render();
  }

  // Results change without the service changing (a passing check's output): poll them too.
  (async () => {
    while (alive) {
      await sleep(CHECKS_POLL_MS);
      if (alive) await loadChecks();
    }
  })();

  async function act(button, request) {
    button.disabled = true;
    try {
      await request();
      clearError();
    } catch (e) {
      showError(e.message);
      button.disabled = false;
    }
  }

  function maintenanceControls(i) {
    if (i.maintenance_reason != null) {
      const end = h('button', { type: 'button', class: 'maint-off' }, 'End maintenance');
      end.onclick = () => act(end, () => api('DELETE', `${instancesPath(i.id)}/maintenance`));
      return h('div', { class: 'actions' }, end);
    }
    const reason = h('input', {
      type: 'text', class: 'maint-reason', placeholder: 'reason (optional)', 'aria-label': `Maintenance reason for ${i.id}`,
      value: drafts.get(i.id) || '', oninput: (e) => drafts.set(i.id, e.target.value),
    });
    const start = h('button', { type: 'button', class: 'maint-on' }, 'Start maintenance');
    start.onclick = () => act(start, async () => {
      const text = reason.value.trim();
      await api('PUT', `${instancesPath(i.id)}/maintenance`, { body: text ? { reason: text } : {} });
      drafts.delete(i.id);
    });
    return h('div', { class: 'actions' }, reason, start);
  }

  function checkTable(i) {
    const results = checks.get(i.id) || [];
    if (!i.checks.length) return h('p', { class: 'muted' }, 'No checks: the instance keeps itself alive by ', i.ttl ? `heartbeats (TTL ${i.ttl})` : `lease ${i.lease}`, '.');
    const byName = new Map(results.map((c) => [c.name, c]));
    return h('table', { class: 'cards checks' },
      h('thead', {}, h('tr', {}, ['Check', 'Kind', 'Status', 'Output', 'Last change'].map((t) => h('th', {}, t)))),
      h('tbody', {}, i.checks.map((brief) => {
        const c = byName.get(brief.name) || {};
        return h('tr', { 'data-check': brief.name },
          h('td', { 'data-label': 'Check' }, brief.name),
          h('td', { 'data-label': 'Kind' }, brief.kind),
          h('td', { 'data-label': 'Status' }, pill(c.status || brief.status)),
          h('td', { 'data-label': 'Output' }, h('pre', { class: 'output' }, c.output || '')),
          h('td', { 'data-label': 'Last change' }, c.last_change ? h('time', { datetime: c.last_change }, c.last_change.replace('T', ' ').replace(/\.\d+Z$/, 'Z')) : ''));
      })));
  }

  function card(i) {
    const meta = Object.entries(i.meta || {});
    const reason = reasonOf(i);
    return h('section', { class: `instance ${i.health}`, 'data-instance': i.id },
      h('header', {},
        h('h2', {}, i.id), pill(i.health),
        reason ? h('span', { class: 'reason' }, reason) : null),
      dl([
        ['Address', `${i.address}:${i.port}`],
        ['Zone', i.zone || h('span', { class: 'muted' }, 'none')],
        ['Weight', i.weight],
        ['Tags', chips(i.tags)],
        ['Meta', meta.length ? meta.map(([k, v]) => h('span', { class: 'chip' }, `${k}=${v}`)) : h('span', { class: 'muted' }, 'none')],
        ['Kept by', i.lease != null ? `lease ${i.lease}` : i.ttl ? `heartbeat, TTL ${i.ttl}` : 'checks'],
        ['Index', `created ${i.create_index}, modified ${i.modify_index}`],
      ]),
      checkTable(i),
      maintenanceControls(i));
  }

  function render() {
    const instances = live.services.get(name) || [];
    const key = JSON.stringify([instances, [...checks], checksError]);
    if (key === shown) return; // nothing changed: keep what is being typed and focused
    shown = key;
    if (!live.loaded) {
      summary.textContent = 'Waiting for the watch stream…';
      return;
    }
    if (!instances.length) {
      summary.textContent = `No instance of ${name} is registered.`;
      put(list);
      return;
    }
    const counts = summarize(name, instances).counts;
    put(summary, `${instances.length} instance${instances.length === 1 ? '' : 's'}: `, healthPills(counts));
    const sorted = [...instances].sort((a, b) => a.id.localeCompare(b.id));
    put(list,
      checksError ? h('p', { class: 'error inline' }, `Check results unavailable: ${checksError}`) : null,
      ...sorted.map(card));
  }

  function update() {
    const instances = live.services.get(name) || [];
    const key = JSON.stringify(instances);
    if (key !== seen) {
      seen = key;
      loadChecks();
    }
    render();
  }

  return { title: name, update, leave: () => { alive = false; } };
}

// ---------------------------------------------------------------- key/value

function decodeValue(b64) {
  if (b64 == null) return { text: '', binary: false, size: 0 };
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  try {
    return { text: new TextDecoder('utf-8', { fatal: true }).decode(bytes), binary: false, size: bytes.length };
  } catch {
    return { text: b64, binary: true, size: bytes.length };
  }
}

function crumbs(path) {
  const parts = path.split('/');
  const out = [h('a', { href: '#/kv/' }, 'Key/value')];
  let acc = '';
  parts.forEach((p, n) => {
    if (n === parts.length - 1 && p === '') return;
    acc += n === parts.length - 1 ? p : `${p}/`;
    out.push(' / ', n === parts.length - 1 ? h('span', {}, p) : h('a', { href: `#/kv/${encKey(acc)}` }, p));
  });
  return h('h1', {}, out);
}

// Follows a Consul read with blocking queries until `leave`; `onAnswer(r)` gets each answer.
function blockingLoop(url, onAnswer, onError) {
  const ctl = new AbortController();
  (async () => {
    let index = 0;
    while (!ctl.signal.aborted) {
      const started = Date.now();
      try {
        const sep = url.includes('?') ? '&' : '?';
        const r = await api('GET', index ? `${url}${sep}index=${index}&wait=${KV_WAIT}` : url, { signal: ctl.signal, allow404: true });
        const next = Number(r.headers.get('x-consul-index')) || 0;
        // An index that went back (a restored agent) starts over; one that did not move on
        // an answer that did not wait must not spin.
        const stuck = next <= index && Date.now() - started < 100;
        index = next < index ? 0 : next;
        onAnswer(r);
        if (stuck) await sleep(1000);
      } catch (e) {
        if (ctl.signal.aborted) return;
        onError(e.message);
        await sleep(2000);
      }
    }
  })();
  return () => ctl.abort();
}

function kvPage(main, path) {
  return path === '' || path.endsWith('/') ? kvFolder(main, path) : kvKey(main, path);
}

function kvFolder(main, prefix) {
  const listing = h('ul', { class: 'keys', id: 'keys' });
  const note = h('p', { class: 'muted', id: 'summary' }, 'Loading…');
  const name = h('input', { type: 'text', id: 'new-key', required: true, placeholder: 'name, or folder/name', 'aria-label': 'New key name' });
  const value = h('textarea', { id: 'new-value', rows: 3, placeholder: 'value', 'aria-label': 'New key value' });
  const flags = h('input', { type: 'number', id: 'new-flags', min: 0, value: '0', 'aria-label': 'Flags' });
  const create = h('form', {
    class: 'create',
    onsubmit: async (e) => {
      e.preventDefault();
      const key = prefix + name.value;
      try {
        // cas=0 creates only: an existing key is not overwritten from this form.
        const r = await api('PUT', `/v1/kv/${encKey(key)}?cas=0&flags=${Number(flags.value) || 0}`, { body: value.value });
        if (r.data !== true) throw new Error(`${key} already exists: open it to edit it`);
        location.hash = `#/kv/${encKey(key)}`;
      } catch (err) {
        showError(err.message);
      }
    },
  }, h('h2', {}, `New key under ${prefix || 'the root'}`),
  h('label', {}, 'Name ', name), h('label', {}, 'Flags ', flags), h('label', { class: 'wide' }, 'Value ', value),
  h('button', { type: 'submit' }, 'Create'));
  main.append(crumbs(prefix), note, listing, create);

  const leave = blockingLoop(`/v1/kv/${encKey(prefix)}?keys&separator=/`, (r) => {
    const keys = r.status === 404 ? [] : r.data;
    note.textContent = keys.length ? `${keys.length} entr${keys.length === 1 ? 'y' : 'ies'}` : `No keys under ${prefix || 'the root'}.`;
    put(listing, ...keys.map((k) => {
      const rest = k.slice(prefix.length) || k;
      const folder = k.endsWith('/');
      return h('li', { 'data-key': k, class: folder ? 'folder' : 'key' },
        h('a', { href: `#/kv/${encKey(k)}` }, rest));
    }));
  }, (msg) => {
    note.textContent = msg;
  });
  return { title: prefix || 'Key/value', leave };
}

function kvKey(main, key) {
  const parent = key.slice(0, key.lastIndexOf('/') + 1);
  const info = h('div', { id: 'kv-info' }, h('p', { class: 'muted' }, 'Loading…'));
  const value = h('textarea', { id: 'kv-value', rows: 8, 'aria-label': 'Value', spellcheck: 'false' });
  const flags = h('input', { type: 'number', id: 'kv-flags', min: 0, 'aria-label': 'Flags' });
  const stale = h('p', { class: 'note', hidden: true });
  const save = h('button', { type: 'submit', id: 'kv-save' }, 'Save');
  const del = h('button', { type: 'button', id: 'kv-delete', class: 'danger' }, 'Delete');
  const confirmBox = h('span', { class: 'confirm', hidden: true });
  const editor = h('form', { class: 'edit', hidden: true },
    h('label', { class: 'wide' }, 'Value ', value), h('label', {}, 'Flags ', flags), stale,
    h('div', { class: 'actions' }, save, del, confirmBox));
  main.append(crumbs(key), info, editor);
  let entry = null;
  let dirty = false;
  value.addEventListener('input', () => { dirty = true; });
  flags.addEventListener('input', () => { dirty = true; });

  function show(e) {
    const v = decodeValue(e.Value);
    put(info, dl([
      ['Flags', e.Flags],
      ['CreateIndex', e.CreateIndex],
      ['ModifyIndex', e.ModifyIndex],
      ['LockIndex', e.LockIndex],
      ['Session', e.Session || h('span', { class: 'muted' }, 'none')],
      ['Size', `${v.size} bytes${v.binary ? ' (not UTF-8: shown as base64, read-only)' : ''}`],
    ]));
    if (!dirty || !entry) {
      value.value = v.text;
      flags.value = String(e.Flags);
      dirty = false;
      stale.hidden = true;
    } else if (entry.ModifyIndex !== e.ModifyIndex) {
      stale.hidden = false;
      stale.textContent = `Changed on the agent (ModifyIndex ${e.ModifyIndex}) while you edit: saving will be refused.`;
    }
    value.readOnly = v.binary;
    save.disabled = v.binary;
    if (!entry || !dirty) entry = e;
    editor.hidden = false;
  }

  editor.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    try {
      // cas: refuse to overwrite a change made since this value was loaded.
      const r = await api('PUT', `/v1/kv/${encKey(key)}?cas=${entry.ModifyIndex}&flags=${Number(flags.value) || 0}`, { body: value.value });
      if (r.data !== true) throw new Error(`${key} changed on the agent since it was loaded; your edit was not saved (reload to see it)`);
      dirty = false;
      clearError();
    } catch (err) {
      showError(err.message);
    }
  });
  del.addEventListener('click', () => {
    confirmBox.hidden = false;
    put(confirmBox, `Delete ${key}? `,
      h('button', {
        type: 'button', id: 'kv-delete-yes', class: 'danger',
        onclick: async () => {
          try {
            const r = await api('DELETE', `/v1/kv/${encKey(key)}?cas=${entry.ModifyIndex}`);
            if (r.data !== true) throw new Error(`${key} changed on the agent since it was loaded; it was not deleted`);
            location.hash = `#/kv/${encKey(parent)}`;
          } catch (err) {
            showError(err.message);
          }
        },
      }, 'Yes, delete'),
      h('button', { type: 'button', onclick: () => { confirmBox.hidden = true; } }, 'Cancel'));
  });

  const leave = blockingLoop(`/v1/kv/${encKey(key)}`, (r) => {
    if (r.status === 404) {
      entry = null;
      editor.hidden = true;
      put(info, h('p', {}, `No key named ${key}. `, h('a', { href: `#/kv/${encKey(parent)}` }, `Back to ${parent || 'the root'}`)));
      return;
    }
    show(r.data[0]);
  }, (msg) => {
    put(info, h('p', { class: 'error inline' }, msg));
  });
  return { title: key, leave };
}

// ---------------------------------------------------------------- agents

function agentsPage(main) {
  const body = h('div', { id: 'agents' }, h('p', { class: 'muted' }, 'Loading…'));
  main.append(h('h1', {}, 'Agents'), body);

  function onStatus() {
    const s = agent.status;
    if (!s) {
      put(body, h('p', { class: 'error inline' }, agent.statusError || 'Loading…'));
      return;
    }
    const p = s.self_preservation || {};
    const c = s.cluster;
    const preservation = p.active
      ? h('span', {}, pill('critical', 'active'), ` ${p.renewers_alive} of ${p.renewers_expected} renewers in time (threshold ${p.threshold})`)
      : h('span', {}, p.enabled ? pill('passing', 'off') : pill('maintenance', 'disabled'), p.renewers_expected ? ` ${p.renewers_alive} of ${p.renewers_expected} renewers in time` : '');
    const parts = [
      agent.statusError ? h('p', { class: 'error inline' }, `Showing the last answer: ${agent.statusError}`) : null,
      h('section', { class: 'agent', 'data-agent': s.node },
        h('h2', {}, s.node, ' ', h('span', { class: 'muted' }, '(this agent)')),
        dl([
          ['Version', s.version],
          ['Datacenter', s.datacenter],
          ['Index', s.index],
          ['Services', s.services],
          ['Instances', s.instances],
          ['Leases', s.leases],
          ['Uptime', `${s.uptime_seconds} s`],
          ['Node maintenance', s.node_maintenance || 'off'],
          ['Self-preservation', preservation],
          ['Mode', c ? 'cluster (etcd)' : 'single agent, own store'],
        ])),
    ];
    if (c) {
      parts.push(h('section', { class: 'agent' },
        h('h2', {}, 'etcd'),
        dl([
          ['Endpoints', (c.etcd || []).join(', ')],
          ['Member in use', c.etcd_member || 'none'],
          ['Known leader', c.known_leader ? pill('passing', 'yes') : pill('critical', 'no: cut off')],
          ['Last contact', `${c.last_contact_ms} ms ago`],
          ['Ready', c.ready ? 'yes' : 'no'],
          ['Agent lease', c.lease],
        ])),
      h('h2', {}, `Members (${c.members.length})`),
      h('table', { class: 'cards', id: 'members' },
        h('thead', {}, h('tr', {}, ['Agent', 'HTTP', 'Version'].map((t) => h('th', {}, t)))),
        h('tbody', {}, c.members.map((m) => h('tr', { 'data-member': m.name },
          h('td', { 'data-label': 'Agent' }, m.name, m.name === s.node ? ' (this one)' : ''),
          h('td', { 'data-label': 'HTTP' }, h('a', { href: `http://${m.http}/ui/` }, m.http)),
          h('td', { 'data-label': 'Version' }, m.version))))));
    }
    put(body, ...parts);
  }

  return { title: 'Agents', update: onStatus, onStatus };
}

// ---------------------------------------------------------------- start

function start() {
  const input = $('#token');
  input.value = token();
  $('#token-form').addEventListener('submit', (e) => {
    e.preventDefault();
    const t = input.value.trim();
    if (t) localStorage.setItem(TOKEN_KEY, t);
    else localStorage.removeItem(TOKEN_KEY);
    // Start over with the new token: the stream and the page's own requests.
    if (live.controller) live.controller.abort('restart');
    route();
  });
  window.addEventListener('hashchange', route);
  route();
  follow();
  pollStatus();
}

start();
