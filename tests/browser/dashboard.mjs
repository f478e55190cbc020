// Drives the dashboard in headless Chromium (playwright-core, found through NODE_PATH)
// and checks it against the query API. Run by tests/dashboard.rs, which starts clickgate
// with API keys and a known data set, and passes:
//   CG_URL, CG_KEY (an advertiser's key), CG_WRONG_KEY, CG_CAMPAIGNS (the advertiser's
//   campaign ids, comma-separated, ascending), CG_CHROMIUM, CG_SCREENSHOT, CG_PROFILE_DIR.
// Exits 0 when every check passed; otherwise prints what differed and exits 1.
import { createRequire } from 'node:module';
import { mkdirSync } from 'node:fs';
import { dirname } from 'node:path';

const require = createRequire(import.meta.url);
const { chromium } = require('playwright-core');

const env = (name) => {
  const v = process.env[name];
  if (!v) throw new Error(`missing environment variable ${name}`);
  return v;
};
const URL_ = env('CG_URL');
const KEY = env('CG_KEY');
const WRONG = env('CG_WRONG_KEY');
const CAMPAIGNS = env('CG_CAMPAIGNS').split(',');
const SHOT = env('CG_SCREENSHOT');
const TIMEOUT = 30000;

function check(cond, what) {
  if (!cond) throw new Error('check failed: ' + what);
}
function same(actual, expected, what) {
  const a = JSON.stringify(actual), e = JSON.stringify(expected);
  check(a === e, `${what}\n  page: ${a}\n  api:  ${e}`);
}

async function api(path, key = KEY) {
  const r = await fetch(URL_ + path, { headers: { Authorization: 'Bearer ' + key } });
  return { status: r.status, body: await r.json() };
}

// Everything the page shows for (campaign, window), read from the DOM.
async function pageNumbers(page) {
  return page.evaluate(() => {
    const metrics = ['clicks', 'unique_users', 'cost_micros', 'fraud_clicks'];
    const out = { charts: {}, totals: {}, table: [], country: [], device: [], top: [] };
    for (const m of metrics) {
      out.charts[m] = [...document.querySelectorAll(`#chart-${m} rect.bar`)]
        .map((r) => [Number(r.dataset.start), Number(r.dataset.value)]);
      out.totals[m] = Number(document.getElementById('total-' + m).dataset.value);
    }
    out.table = [...document.querySelectorAll('#buckets tbody tr')].map((tr) => [
      Number(tr.dataset.start),
      ...metrics.map((m) => Number(tr.querySelector(`[data-field="${m}"]`).dataset.value)),
    ]);
    for (const by of ['country', 'device']) {
      out[by] = [...document.querySelectorAll(`#by-${by} tbody tr`)]
        .map((tr) => [tr.dataset.key, Number(tr.dataset.clicks), Number(tr.dataset.cost), Number(tr.dataset.fraud)]);
    }
    out.top = [...document.querySelectorAll('#top-ads tbody tr')]
      .map((tr) => [Number(tr.dataset.ad), Number(tr.dataset.campaign), Number(tr.dataset.clicks)]);
    return out;
  });
}

async function compareWithApi(page, campaign, win) {
  const shown = await pageNumbers(page);
  const m = (await api(`/v1/campaigns/${campaign}/metrics?window=${win}`)).body;
  check(m.buckets.length > 0, `campaign ${campaign} has buckets in the API`);
  const metrics = ['clicks', 'unique_users', 'cost_micros', 'fraud_clicks'];
  for (const k of metrics) {
    same(shown.charts[k], m.buckets.map((b) => [b.start, b[k]]), `${campaign}/${win} chart ${k}`);
    const total = k === 'unique_users' ? m.buckets[m.buckets.length - 1][k] : m.buckets.reduce((s, b) => s + b[k], 0);
    same(shown.totals[k], total, `${campaign}/${win} total ${k}`);
  }
  same(shown.table, m.buckets.map((b) => [b.start, ...metrics.map((k) => b[k])]), `${campaign}/${win} bucket table`);
  for (const by of ['country', 'device']) {
    const b = (await api(`/v1/campaigns/${campaign}/breakdown?window=${win}&by=${by}&n=10`)).body;
    same(shown[by], b.values.map((v) => [v.value, v.clicks, v.cost_micros, v.fraud_clicks]), `${campaign}/${win} by ${by}`);
  }
  const top = (await api(`/v1/top?window=${win}&n=10`)).body;
  same(shown.top, top.ads.map((a) => [a.ad_id, a.campaign_id, a.clicks]), `${win} top ads`);
  return shown;
}

const ctx = await chromium.launchPersistentContext(env('CG_PROFILE_DIR'), {
  executablePath: env('CG_CHROMIUM'),
  headless: true,
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  viewport: { width: 1280, height: 1000 },
});
let failed = false;
try {
  // 1. The right key: the page loads with no console errors and shows the API's numbers.
  const page = await ctx.newPage();
  const errors = [];
  page.on('console', (msg) => { if (msg.type() === 'error') errors.push(msg.text()); });
  page.on('pageerror', (e) => errors.push(String(e)));
  await page.goto(URL_ + '/', { waitUntil: 'load' });
  await page.waitForSelector('body[data-state="need-key"]', { timeout: TIMEOUT });
  check(await page.isHidden('#app'), 'no data is shown before a key is given');
  await page.fill('#key', KEY);
  await page.click('#key-form button[type="submit"]');
  await page.waitForSelector(`body[data-state="ready"][data-campaign="${CAMPAIGNS[0]}"]`, { timeout: TIMEOUT });
  const options = await page.$$eval('#campaign option', (os) => os.map((o) => o.value));
  same(options, CAMPAIGNS, 'campaign picker lists exactly the advertiser\'s campaigns');
  const listed = (await api('/v1/campaigns')).body.campaigns.map((c) => String(c.campaign_id));
  same(options, listed, 'campaign picker = /v1/campaigns');
  const first = await compareWithApi(page, CAMPAIGNS[0], '1h');
  check(first.totals.clicks > 0, 'the first campaign has clicks');

  // 2. The picker: another campaign, then another window.
  await page.selectOption('#campaign', CAMPAIGNS[1]);
  await page.waitForSelector(`body[data-campaign="${CAMPAIGNS[1]}"]`, { timeout: TIMEOUT });
  const second = await compareWithApi(page, CAMPAIGNS[1], '1h');
  check(JSON.stringify(first.charts) !== JSON.stringify(second.charts), 'campaigns differ on the page');
  await page.selectOption('#window', '5m');
  await page.waitForSelector(`body[data-campaign="${CAMPAIGNS[1]}"][data-window="5m"]`, { timeout: TIMEOUT });
  await compareWithApi(page, CAMPAIGNS[1], '5m');

  // 3. Live: the page refreshes by itself.
  const before = Number(await page.getAttribute('body', 'data-refreshes'));
  await page.waitForFunction((n) => Number(document.body.dataset.refreshes) > n, before, { timeout: TIMEOUT });
  await compareWithApi(page, CAMPAIGNS[1], '5m');

  mkdirSync(dirname(SHOT), { recursive: true });
  await page.screenshot({ path: SHOT, fullPage: true });
  check(errors.length === 0, 'no console errors with the right key: ' + JSON.stringify(errors));

  // 4. A wrong key is refused: the API says 401 and the page shows no data.
  same((await api('/v1/campaigns', WRONG)).status, 401, 'API status with a wrong key');
  const bad = await ctx.newPage();
  await bad.goto(URL_ + '/', { waitUntil: 'load' });
  await bad.waitForSelector('body[data-state="need-key"]', { timeout: TIMEOUT });
  await bad.fill('#key', WRONG);
  await bad.click('#key-form button[type="submit"]');
  await bad.waitForSelector('body[data-state="unauthorized"]', { timeout: TIMEOUT });
  check(await bad.isHidden('#app'), 'no data shown with a wrong key');
  const msg = await bad.textContent('#auth-error');
  check(/refused/i.test(msg), 'the page says the key was refused: ' + msg);
  check((await bad.$$('#campaign option')).length === 0, 'no campaign listed with a wrong key');
  console.log('dashboard checks passed; screenshot ' + SHOT);
} catch (e) {
  failed = true;
  console.error(e.stack || String(e));
} finally {
  await ctx.close();
}
process.exit(failed ? 1 : 0);
