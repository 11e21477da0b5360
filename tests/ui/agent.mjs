// The agent as the dashboard scripts reach it from Node: its API, to set up what a page should
// show and to check what a page did, and a proxy that stands between it and the browser.

import net from 'node:net';
import { fail } from './browser.mjs';

// Calls on the agent at `addr` (host:port). `call` answers {status, body}, the body parsed when
// it is JSON; an error status other than 404 (an answer in itself: no such key) fails the step.
export function agentApi(addr) {
  const base = `http://${addr}`;
  async function call(method, path, body) {
    const init = { method, headers: {} };
    if (body !== undefined) {
      init.body = typeof body === 'string' ? body : JSON.stringify(body);
      if (typeof body !== 'string') init.headers['Content-Type'] = 'application/json';
    }
    const resp = await fetch(base + path, init);
    const text = await resp.text();
    if (!resp.ok && resp.status !== 404) fail(`${method} ${path}: ${resp.status} ${text}`);
    const json = (resp.headers.get('content-type') || '').includes('json');
    return { status: resp.status, body: json && text ? JSON.parse(text) : text };
  }
  return {
    base,
    call,
    register: (service, id, spec) => call('PUT', `/api/v1/services/${service}/instances/${id}`, spec),
    report: (service, id, check, status, output) =>
      call('PUT', `/api/v1/services/${service}/instances/${id}/checks/${check}`, { status, output }),
  };
}

// A TCP proxy on a port of its own to the agent at `target` (host:port), so that a script can
// cut the browser's connections, the watch stream among them: `cut()` closes every connection
// and refuses new ones until `restore()`.
export function proxy(target) {
  const [host, port] = [target.slice(0, target.lastIndexOf(':')), Number(target.slice(target.lastIndexOf(':') + 1))];
  const sockets = new Set();
  let refusing = false;
  const server = net.createServer((client) => {
    if (refusing) {
      client.destroy();
      return;
    }
    const upstream = net.connect(port, host);
    for (const [a, b] of [[client, upstream], [upstream, client]]) {
      sockets.add(a);
      a.on('error', () => b.destroy());
      a.on('close', () => { sockets.delete(a); b.destroy(); });
      a.pipe(b);
    }
  });
  return new Promise((resolve) => server.listen(0, '127.0.0.1', () => resolve({
    addr: `127.0.0.1:${server.address().port}`,
    cut() {
      refusing = true;
      for (const s of sockets) s.destroy();
    },
    restore() {
      refusing = false;
    },
    close() {
      for (const s of sockets) s.destroy();
      server.close();
    },
  })));
}
