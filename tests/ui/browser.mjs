// What the dashboard scripts share: a browser started headless with a fresh profile (Debian's
// Chromium through playwright-core, Firefox ESR through puppeteer-core over WebDriver BiDi),
// every error a page logs collected, and steps that stop at the first failure. Each driver is
// loaded by the session that uses it, so a script needs only its own.

import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

export const DESKTOP = { width: 1280, height: 800 };
export const PHONE = { width: 390, height: 844 };
// The flags this machine's Chromium needs: no sandbox as root, and none of the background
// connections a closed network refuses.
const FLAGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync'];

export function fail(message) {
  throw new Error(message);
}

export function assert(cond, message) {
  if (!cond) fail(message);
}

// Runs `body({...given, run})`, where `run(name, fn)` is one step, then checks that `problems`
// (what the page logged) is empty. Prints one line per step and a closing count; on a failure
// exits non-zero, saying which step failed and what `shown()` says the page showed.
async function steps(problems, shown, given, body) {
  let step = 'start';
  let passed = 0;
  const run = async (name, fn) => {
    step = name;
    await fn();
    passed += 1;
    console.log(`ok - ${name}`);
  };
  try {
    await body({ ...given, run });
    step = 'no page logged an error';
    assert(problems.length === 0, `the page logged errors:\n${problems.join('\n')}`);
    console.log(`${passed} passed, 0 failed`);
  } catch (e) {
    let page = '';
    try {
      page = `\n${await shown()}`;
    } catch { /* the page itself is gone */ }
    console.error(`not ok - ${step}: ${e.message}${page}`);
    if (problems.length) console.error(`--- errors the page logged\n${problems.join('\n')}`);
    console.log(`${passed} passed, 1 failed`);
    process.exitCode = 1;
  }
}

// What a page shows, for a failure's message.
async function describe(page) {
  const text = await page.evaluate(() => document.body.textContent);
  return `--- page ${page.url()}\n${text.replace(/\s+\n/g, '\n').slice(0, 3000)}`;
}

// Starts Chromium and runs `body({page, run, expectFailures})`, then checks that no page
// logged an error. `expectFailures(test)` excuses the failed requests whose URL passes `test`
// (a request a step provokes); Chromium's note on a KV listing's 404 (Consul's answer for "no
// such prefix", which the page shows as an empty folder) is always excused.
export async function session(body) {
  const { chromium } = await import('playwright-core');
  const userDataDir = mkdtempSync(join(tmpdir(), 'muster-ui-'));
  const ctx = await chromium.launchPersistentContext(userDataDir, {
    executablePath: '/usr/bin/chromium', headless: true, args: FLAGS, viewport: DESKTOP,
  });
  const page = ctx.pages()[0] || await ctx.newPage();
  const problems = [];
  const excused = [(url, text) => text.includes('404') && url.includes('/v1/kv/')];
  page.on('pageerror', (e) => problems.push(`uncaught: ${e.message}`));
  page.on('console', (m) => {
    if (m.type() !== 'error' && m.type() !== 'warning') return;
    const url = m.location().url || '';
    if (m.text().startsWith('Failed to load resource') && excused.some((ok) => ok(url, m.text()))) return;
    problems.push(`console ${m.type()}: ${m.text()} (${url})`);
  });
  const expectFailures = (test) => {
    excused.push(test);
    return () => excused.splice(excused.indexOf(test), 1);
  };
  try {
    await steps(problems, () => describe(page), { page, expectFailures }, body);
  } finally {
    await ctx.close();
    rmSync(userDataDir, { recursive: true, force: true });
  }
}

// Debian's Firefox ESR, which speaks WebDriver BiDi itself: puppeteer-core drives it as it is.
const FIREFOX = '/usr/bin/firefox-esr';
// Puppeteer waits 30 s for Firefox to start by default; on two cores shared with a whole test
// run that was seen to run out.
const FIREFOX_START_MS = 90000;

// Starts Firefox ESR with a fresh profile (puppeteer's own, removed on close) and runs
// `body({page, run})` with a puppeteer page, then checks that no page logged an error or a
// warning. Firefox does not log failed requests to the console, so nothing needs excusing.
export async function firefoxSession(body) {
  const { default: puppeteer } = await import('puppeteer-core');
  const browser = await puppeteer.launch({
    browser: 'firefox', executablePath: FIREFOX, headless: true, defaultViewport: DESKTOP,
    timeout: FIREFOX_START_MS,
  });
  const page = (await browser.pages())[0] || await browser.newPage();
  const problems = [];
  page.on('pageerror', (e) => problems.push(`uncaught: ${e.message}`));
  page.on('console', (m) => {
    if (m.type() !== 'error' && m.type() !== 'warn') return;
    problems.push(`console ${m.type()}: ${m.text()} (${m.location().url || ''})`);
  });
  try {
    await steps(problems, () => describe(page), { page }, body);
  } finally {
    await browser.close();
  }
}

// Text a page must never show: a value rendered without being looked at.
export async function noGarbage(page, name) {
  const text = await page.evaluate(() => document.body.textContent);
  const bad = text.match(/\[object \w+\]|\bundefined\b|\bNaN\b|\bnull\b/);
  assert(!bad, `the ${name} page shows "${bad && bad[0]}": ${text.replace(/\s+/g, ' ').slice(0, 400)}`);
}

// Screenshots of the page at a desktop and a phone size, checking that neither scrolls
// sideways.
export async function shoot(page, dir, name) {
  await noGarbage(page, name);
  for (const [size, viewport] of [['desktop', DESKTOP], ['phone', PHONE]]) {
    await page.setViewportSize(viewport);
    await page.evaluate(() => new Promise((done) => requestAnimationFrame(() => done())));
    const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
    assert(overflow <= 0, `${name} at ${size} size is ${overflow} px wider than the screen`);
    await page.screenshot({ path: join(dir, `${name}-${size}.png`), fullPage: size === 'phone' });
  }
  await page.setViewportSize(DESKTOP);
}
