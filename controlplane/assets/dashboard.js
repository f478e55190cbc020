// clickgate advertiser dashboard: reads the query API every REFRESH_MS and draws plain
// SVG bar charts. Every number drawn is also in the DOM (data-value attributes and the
// bucket table) so tests can compare the page with the API. No framework, no CDN.
'use strict';
(() => {
  const KEY = 'clickgate.key';
  const REFRESH_MS = 5000;
  const WINDOW_MS = { '5m': 300000, '1h': 3600000, '1d': 86400000 };
  const METRICS = ['clicks', 'unique_users', 'cost_micros', 'fraud_clicks'];
  const SVG = 'http://www.w3.org/2000/svg';
  const $ = (id) => document.getElementById(id);
  const body = document.body;
  const keysRequired = body.dataset.keysRequired === 'true';
  let timer = null;
  let generation = 0;

  class AuthError extends Error {}

  const key = () => sessionStorage.getItem(KEY) || '';

  async function api(path) {
    const headers = {};
    if (key()) headers.Authorization = 'Bearer ' + key();
    const r = await fetch(path, { headers, cache: 'no-store' });
    const b = await r.json().catch(() => ({}));
    if (r.status === 401 || r.status === 429) throw new AuthError(b.error || r.statusText);
    if (!r.ok) throw new Error(`${path}: HTTP ${r.status} ${b.error || ''}`);
    return b;
  }

  const fmtInt = (n) => Number(n).toLocaleString('en-US');
  const fmtCost = (micros) => (Number(micros) / 1e6).toLocaleString('en-US', { minimumFractionDigits: 2, maximumFractionDigits: 2 });
  const fmt = (metric, v) => (metric === 'cost_micros' ? fmtCost(v) : fmtInt(v));
  const iso = (ms) => new Date(ms).toISOString().replace('.000Z', 'Z');

  function el(tag, attrs = {}, text) {
    const e = tag === 'svg' || ['rect', 'line', 'text', 'title', 'g'].includes(tag)
      ? document.createElementNS(SVG, tag) : document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function showAuth(message) {
    $('app').hidden = true;
    $('key-form').hidden = false;
    const err = $('auth-error');
    err.textContent = message || '';
    err.hidden = !message;
    body.dataset.state = message ? 'unauthorized' : 'need-key';
  }

  function drawChart(div, metric, buckets, windowMs) {
    const W = 600, H = 160, L = 56, B = 18, T = 8;
    const svg = el('svg', { viewBox: `0 0 ${W} ${H}`, role: 'img', 'aria-label': metric });
    const max = Math.max(1, ...buckets.map((b) => b[metric]));
    const x0 = buckets.length ? buckets[0].start : 0;
    const x1 = buckets.length ? buckets[buckets.length - 1].start + windowMs : 1;
    const sx = (t) => L + ((t - x0) / Math.max(1, x1 - x0)) * (W - L - 4);
    const sy = (v) => H - B - (v / max) * (H - B - T);
    svg.append(el('line', { x1: L, y1: H - B, x2: W, y2: H - B }));
    svg.append(el('line', { x1: L, y1: T, x2: W, y2: T }));
    svg.append(el('text', { x: L - 4, y: T + 8, 'text-anchor': 'end' }, fmt(metric, max)));
    svg.append(el('text', { x: L - 4, y: H - B, 'text-anchor': 'end' }, '0'));
    if (buckets.length) {
      svg.append(el('text', { x: L, y: H - 4 }, iso(x0)));
      svg.append(el('text', { x: W - 4, y: H - 4, 'text-anchor': 'end' }, iso(x1)));
    }
    const bw = Math.max(1, sx(x0 + windowMs) - sx(x0) - 1);
    for (const b of buckets) {
      const v = b[metric];
      const r = el('rect', {
        class: 'bar', x: sx(b.start).toFixed(2), y: sy(v).toFixed(2), width: bw.toFixed(2),
        height: Math.max(0, H - B - sy(v)).toFixed(2), 'data-start': b.start, 'data-value': v,
      });
      r.append(el('title', {}, `${iso(b.start)}: ${fmt(metric, v)}`));
      svg.append(r);
    }
    div.replaceChildren(svg);
    div.dataset.points = buckets.length;
  }

  function fillRows(table, rows) {
    table.tBodies[0].replaceChildren(...rows);
  }

  function render(campaign, win, m, byCountry, byDevice, top) {
    const buckets = m.buckets;
    for (const metric of METRICS) {
      const total = metric === 'unique_users'
        ? (buckets.length ? buckets[buckets.length - 1].unique_users : 0)
        : buckets.reduce((s, b) => s + b[metric], 0);
      const t = $('total-' + metric);
      t.dataset.value = total;
      t.textContent = fmt(metric, total);
      drawChart($('chart-' + metric), metric, buckets, WINDOW_MS[win]);
    }
    fillRows($('buckets'), buckets.map((b) => {
      const tr = el('tr', { 'data-start': b.start });
      tr.append(el('td', {}, iso(b.start)));
      for (const metric of METRICS) tr.append(el('td', { 'data-field': metric, 'data-value': b[metric] }, fmt(metric, b[metric])));
      return tr;
    }));
    for (const [table, data] of [[$('by-country'), byCountry], [$('by-device'), byDevice]]) {
      fillRows(table, data.values.map((v) => {
        const tr = el('tr', { 'data-key': v.value, 'data-clicks': v.clicks, 'data-cost': v.cost_micros, 'data-fraud': v.fraud_clicks });
        tr.append(el('td', {}, v.value), el('td', {}, fmtInt(v.clicks)), el('td', {}, fmtCost(v.cost_micros)), el('td', {}, fmtInt(v.fraud_clicks)));
        return tr;
      }));
    }
    fillRows($('top-ads'), top.ads.map((a) => {
      const tr = el('tr', { 'data-ad': a.ad_id, 'data-campaign': a.campaign_id, 'data-clicks': a.clicks });
      if (String(a.campaign_id) === campaign) tr.className = 'mine';
      tr.append(el('td', {}, String(a.ad_id)), el('td', {}, String(a.campaign_id)), el('td', {}, fmtInt(a.clicks)));
      return tr;
    }));
  }

  function fillCampaigns(list) {
    const sel = $('campaign');
    const keep = sel.value || new URLSearchParams(location.hash.slice(1)).get('campaign');
    const ids = list.map((c) => String(c.campaign_id));
    if (ids.join() !== [...sel.options].map((o) => o.value).join()) {
      sel.replaceChildren(...list.map((c) => el('option', { value: c.campaign_id }, `${c.campaign_id} (advertiser ${c.advertiser_id})`)));
    }
    if (keep && ids.includes(keep)) sel.value = keep;
  }

  async function refresh() {
    clearTimeout(timer);
    const gen = ++generation;
    try {
      const list = (await api('/v1/campaigns')).campaigns;
      if (gen !== generation) return;
      $('key-form').hidden = keysRequired && !!key();
      $('auth-error').hidden = true;
      $('app').hidden = false;
      fillCampaigns(list);
      $('empty').hidden = list.length > 0;
      if (list.length) {
        const c = $('campaign').value;
        const w = $('window').value;
        const base = `/v1/campaigns/${c}`;
        const [m, bc, bd, top] = await Promise.all([
          api(`${base}/metrics?window=${w}`),
          api(`${base}/breakdown?window=${w}&by=country&n=10`),
          api(`${base}/breakdown?window=${w}&by=device&n=10`),
          api(`/v1/top?window=${w}&n=10`),
        ]);
        if (gen !== generation) return;
        render(c, w, m, bc, bd, top);
        body.dataset.campaign = c;
        body.dataset.window = w;
      }
      $('status').textContent = 'updated ' + new Date().toISOString().slice(11, 19) + ' UTC';
      body.dataset.refreshes = String(Number(body.dataset.refreshes || 0) + 1);
      body.dataset.state = 'ready';
    } catch (e) {
      if (gen !== generation) return;
      if (e instanceof AuthError) {
        showAuth('Key refused: ' + e.message);
        return;
      }
      $('status').textContent = 'error: ' + e.message + ' (retrying)';
      body.dataset.state = 'error';
    }
    timer = setTimeout(refresh, REFRESH_MS);
  }

  $('key-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    const k = $('key').value.trim();
    if (!k) return;
    sessionStorage.setItem(KEY, k);
    $('key').value = '';
    refresh();
  });
  $('forget').addEventListener('click', () => {
    sessionStorage.removeItem(KEY);
    clearTimeout(timer);
    generation++;
    showAuth('');
  });
  const changed = () => {
    history.replaceState(null, '', '#campaign=' + encodeURIComponent($('campaign').value));
    refresh();
  };
  $('campaign').addEventListener('change', changed);
  $('window').addEventListener('change', refresh);

  if (keysRequired && !key()) showAuth('');
  else refresh();
})();
