// Devices: the paged listing (cursor paging, 50 a page, filters by state, cohort and tag) and
// one device: presence, versions, latest health, OTA progress, health history (battery and
// RSSI per window) and the versions it ran over its windows.

import { api, h, table, td, num, pill, fill, fmtAgo, fmtTime, fmtNum, fmtPct, enc, showError } from '../app.js';
import { lines } from '../charts.js';

const PAGE = 50;

function list(root) {
  const t = table('devices', ['Device', 'State', 'Cohort', 'Firmware', 'Tags', 'Last seen', '#Lost summaries']);
  const state = h('select#filter-state', {}, ['', 'online', 'offline', 'unseen', 'revoked'].map((s) => h('option', { value: s, text: s || 'any state' })));
  const cohort = h('input#filter-cohort', { type: 'text', placeholder: 'cohort model@version/hw' });
  const tag = h('input#filter-tag', { type: 'text', placeholder: 'tag key=value' });
  const prev = h('button#prev-page', { type: 'button', text: 'Previous' });
  const next = h('button#next-page', { type: 'button', text: 'Next' });
  const where = h('span.muted');
  const empty = h('div');
  let cursors = [null]; // cursor of each page shown so far; the last is the current page
  let nextCursor = null;
  let refresh;
  const restart = () => { cursors = [null]; refresh().catch((e) => showError(e.message)); };
  state.addEventListener('change', restart);
  for (const i of [cohort, tag]) i.addEventListener('keydown', (e) => { if (e.key === 'Enter') restart(); });
  prev.addEventListener('click', () => { if (cursors.length > 1) { cursors.pop(); refresh().catch((e) => showError(e.message)); } });
  next.addEventListener('click', () => { if (nextCursor) { cursors.push(nextCursor); refresh().catch((e) => showError(e.message)); } });
  root.append(h('h2', { text: 'Devices' }),
    h('div.toolbar', {}, state, cohort, tag, h('button', { type: 'button', text: 'Filter', onclick: restart }), prev, next, where),
    h('div.card', {}, t.table, empty));

  refresh = async function () {
    const q = new URLSearchParams({ limit: String(PAGE) });
    if (state.value) q.set('state', state.value);
    if (cohort.value.trim()) q.set('cohort', cohort.value.trim());
    if (tag.value.trim()) q.set('tag', tag.value.trim());
    const after = cursors[cursors.length - 1];
    if (after) q.set('after', after);
    const page = await api(`/api/v1/devices?${q}`);
    nextCursor = page.next;
    prev.disabled = cursors.length <= 1;
    next.disabled = !page.next;
    where.textContent = `page ${cursors.length}`;
    empty.replaceChildren(fill(t.tbody, page.devices.map((d) => h('tr', { 'data-device': d.id },
      td(h('a', { href: `#/devices/${enc(d.id)}`, text: d.id })),
      td(pill(d.revoked ? 'revoked' : d.online ? 'online' : d.last_seen_ms ? 'offline' : 'unseen')),
      td(d.cohort ? h('a', { href: `#/cohorts/${enc(d.cohort)}`, text: d.cohort }) : ''),
      td(d.fw), td(Object.entries(d.tags || {}).map(([k, v]) => `${k}=${v}`).join(', ')),
      td(fmtAgo(d.last_seen_ms)), num(d.lost_summaries))), 'No device matches.') || '');
  };
  return refresh;
}

const kv = (pairs) => h('dl.kv', {}, pairs.filter(([, v]) => v !== null && v !== undefined && v !== '')
  .flatMap(([k, v]) => [h('dt', { text: k }), h('dd', {}, v)]));

function detail(root, id) {
  const summary = h('div.grid'), chart = h('div'), history = table('install-history', ['From', 'To', 'Cohort', '#Windows']);
  const historyEmpty = h('div');
  root.append(
    h('h2', {}, h('a', { href: '#/devices', text: 'Devices' }), ' / ', id),
    summary,
    h('div.card', {}, h('h3', { text: 'Health per window (last 2 hours seen)' }), chart),
    h('div.card', {}, h('h3', { text: 'Versions over its windows' }), history.table, historyEmpty),
  );

  return async function refresh() {
    const d = await api(`/api/v1/devices/${enc(id)}`);
    const st = d.state || {};
    const since = (st.last_seen_ms || Date.now()) - 2 * 3600 * 1000;
    const windows = await api(`/api/v1/devices/${enc(id)}/windows?since=${since}&limit=240`);
    const p = st.presence || {};
    const state = d.device.revoked_ms ? 'revoked' : !d.state ? 'unseen' : p.online ? 'online' : 'offline';
    const ota = d.ota;
    summary.replaceChildren(
      h('div.card', {}, h('h3', {}, 'Device ', h('span#device-state', {}, pill(state))), kv([
        ['presence', p.offline_reason ? `offline (${p.offline_reason})` : state],
        ['last seen', st.last_seen_ms ? `${fmtTime(st.last_seen_ms)} (${fmtAgo(st.last_seen_ms)})` : 'never'],
        ['tags', Object.entries(d.device.tags || {}).map(([k, v]) => `${k}=${v}`).join(', ')],
        ['provisioned', fmtTime(d.device.created_ms)],
        ['revoked', d.device.revoked_ms ? fmtTime(d.device.revoked_ms) : null],
        ['summaries', fmtNum(st.summaries)], ['lost summaries', fmtNum(st.lost_summaries)],
      ])),
      h('div.card', {}, h('h3', { text: 'Versions' }), kv([
        ['model', st.model_id ? `${st.model_id}@${st.model_version} (seq ${st.model_seq ?? '?'})` : null],
        ['cohort', st.model_id && st.hw ? h('a', { href: `#/cohorts/${enc(`${st.model_id}@${st.model_version}/${st.hw}`)}`, text: `${st.model_id}@${st.model_version}/${st.hw}` }) : null],
        ['hardware', st.hw], ['firmware', st.fw], ['capabilities', st.caps],
        ['OTA', ota ? `${ota.state_name ?? ota.state} (manifest seq ${ota.manifest_seq}, ${fmtNum(ota.bytes)} bytes` +
          `${ota.error ? `, error ${ota.error}` : ''}) ${fmtAgo(ota.received_ms)}` : 'no OTA report'],
      ])),
      h('div.card', {}, h('h3', { text: 'Latest health' }), st.health
        ? kv([...Object.entries(st.health).map(([k, v]) => [k, String(v)]), ['uptime', st.health_uptime_ms ? `${Math.round(st.health_uptime_ms / 1000)} s` : null]])
        : h('p.empty', { text: 'No summary yet.' })),
    );

    const pts = (k) => windows.map((w) => ({ x: w.start_ms, y: w.window.derived ? w.window.derived[k] : null }));
    chart.replaceChildren(lines('health', [
      { label: 'battery (mV)', series: [{ label: 'battery avg', cls: 's0', points: pts('battery_avg_mv') }] },
      { label: 'RSSI (dBm)', series: [{ label: 'rssi avg', cls: 's1', points: pts('rssi_avg_dbm') }] },
      { label: 'accuracy', min: 0, max: 1, fmt: (v) => fmtPct(v, 0), series: [{ label: 'observed', cls: 's2', points: pts('accuracy') }] },
    ], { height: 100 }));

    const runs = [];
    for (const w of windows) {
      const last = runs[runs.length - 1];
      if (last && last.cohort === w.cohort) { last.to = w.start_ms; last.n++; } else runs.push({ cohort: w.cohort, from: w.start_ms, to: w.start_ms, n: 1 });
    }
    historyEmpty.replaceChildren(fill(history.tbody, runs.reverse().map((r) => h('tr', {},
      td(fmtTime(r.from)), td(fmtTime(r.to)), td(h('a', { href: `#/cohorts/${enc(r.cohort)}`, text: r.cohort })), num(r.n))),
    'No window in the last two hours it was seen.') || '');
  };
}

export default function devices(root, arg) {
  return arg ? detail(root, arg) : list(root);
}
