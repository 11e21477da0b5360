// The dashboard of an agent in cluster mode, in Debian's headless Chromium
// (crates/server/tests/it/ui.rs):
//
//   node cluster.mjs AGENT_ADDR joined MEMBER,MEMBER,...   every agent listed, etcd reached
//   node cluster.mjs AGENT_ADDR cut MEMBER,MEMBER,...      the agent is cut off from etcd
//
// Exits 0 when every step passed.

import { assert, noGarbage, session } from './browser.mjs';

const [addr, phase, memberList] = process.argv.slice(2);
if (!addr || !['joined', 'cut'].includes(phase) || !memberList) {
  console.error('usage: node cluster.mjs AGENT_ADDR joined|cut MEMBER,MEMBER,...');
  process.exit(2);
}
const members = memberList.split(',');
const UI = `http://${addr}/ui/`;

await session(async ({ page, run }) => {
  await run(`the agents page lists every agent of the cluster (${phase})`, async () => {
    await page.goto(`${UI}#/agents`);
    await page.waitForSelector('#members');
    const listed = await page.$$eval('#members tbody tr', (trs) => trs.map((tr) => tr.dataset.member).sort());
    assert(JSON.stringify(listed) === JSON.stringify([...members].sort()), `members listed: ${listed}`);
    const text = await page.textContent('#agents');
    assert(text.includes('cluster (etcd)') && text.includes('Member in use'), `no etcd section: ${text}`);
    await noGarbage(page, 'agents');
  });

  if (phase === 'joined') {
    await run('an agent that reaches etcd is not flagged', async () => {
      await page.waitForFunction(() => /Known leaderyes/.test(document.querySelector('#agents').textContent));
      assert(await page.$('#badge-cutoff') === null, 'flagged as cut off');
    });
  } else {
    await run('an agent cut off from etcd is flagged on every page', async () => {
      await page.waitForSelector('#badge-cutoff', { timeout: 5000 });
      await page.waitForFunction(() => /Known leaderno/.test(document.querySelector('#agents').textContent));
      await page.goto(`${UI}#/services`);
      await page.waitForSelector('#badge-cutoff');
      await page.waitForSelector('#live[data-state="live"]');
    });
  }
});
