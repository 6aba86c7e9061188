// Fleet overview: presence counts, devices per cohort (model version), health at a glance,
// firing alerts, live rollouts. One call: GET /api/v1/overview (aggregated on the server).

import { api, h, table, td, num, pill, fill, fmtAgo, fmtPct, fmtNum, enc } from '../app.js';
import { hbars } from '../charts.js';

const stat = (id, label, cls = '') => h(`div.stat${cls ? `.${cls}` : ''}`, {}, h('div.label', { text: label }), h(`div.value#${id}`, { text: '0' }));

export default function overview(root) {
  const versions = table('versions', ['Cohort', 'Model', 'Version', 'Hardware', '#Devices', '#Online', '#Offline',
    '#Battery mV', '#RSSI dBm', '#Accuracy', 'Latest window']);
  const alerts = table('active-alerts', ['Severity', 'Alert', 'Scope', 'Since', '#Value', 'Muted']);
  const live = table('live-rollouts', ['Rollout', 'Model', 'Target', 'State', 'Stage', 'Confirmed / targeted', 'Gates']);
  const charts = h('div.grid');
  const versionsEmpty = h('div'), alertsEmpty = h('div'), liveEmpty = h('div');
  root.append(
    h('h2', { text: 'Fleet overview' }),
    h('div.stats', {},
      stat('online-count', 'Online', 'ok'), stat('offline-count', 'Offline', 'bad'),
      stat('unseen-count', 'Never seen'), stat('revoked-count', 'Revoked'),
      stat('firing-count', 'Alerts firing', 'warn'), stat('findings-count', 'Drift findings')),
    charts,
    h('div.card', {}, h('h3', { text: 'Versions in the field' }), versions.table, versionsEmpty),
    h('div.card', {}, h('h3', {}, 'Active alerts ', h('a', { href: '#/alerts', text: '(all)' })), alerts.table, alertsEmpty),
    h('div.card', {}, h('h3', {}, 'Live rollouts ', h('a', { href: '#/rollouts', text: '(all)' })), live.table, liveEmpty),
  );

  return async function refresh() {
    const o = await api('/api/v1/overview');
    const d = o.devices;
    for (const k of ['online', 'offline', 'unseen', 'revoked']) {
      document.getElementById(`${k}-count`).textContent = String(d[k] ?? 0);
    }
    document.getElementById('firing-count').textContent = String(o.alerts.firing);
    document.getElementById('findings-count').textContent = String(o.active_findings);

    charts.replaceChildren(
      h('div.card', {}, h('h3', { text: 'Presence' }), hbars('presence', [
        { label: 'online', value: d.online, cls: 's2' },
        { label: 'offline', value: d.offline, cls: 's3' },
        { label: 'never seen', value: d.unseen, cls: 's5' },
        { label: 'revoked', value: d.revoked, cls: 's5' },
      ])),
      h('div.card', {}, h('h3', { text: 'Devices per cohort' }), hbars('versions',
        o.cohorts.map((c) => ({ label: c.cohort, value: c.devices, cls: 's0', note: `${c.online} online` })))),
    );

    versionsEmpty.replaceChildren(fill(versions.tbody, o.cohorts.map((c) => {
      const der = (c.latest && c.latest.derived) || {};
      return h('tr', { 'data-cohort': c.cohort },
        td(h('a', { href: `#/cohorts/${enc(c.cohort)}`, text: c.cohort })),
        td(c.model_id), td(c.model_version), td(c.hw),
        num(c.devices), num(c.online), num(c.offline),
        num(der.battery_avg_mv), td(fmtNum(der.rssi_avg_dbm, 1), 'num'), td(fmtPct(der.accuracy), 'num'),
        td(c.latest ? fmtAgo(c.latest.start_ms) : 'no window yet', 'muted'));
    }), 'No device has reported a model yet.') || '');

    alertsEmpty.replaceChildren(fill(alerts.tbody, o.alerts.firing_list.map((a) => h('tr', { 'data-alert': a.fingerprint },
      td(pill(a.labels.severity || 'none')), td(a.labels.alertname),
      td(a.labels.device ? h('a', { href: `#/devices/${enc(a.labels.device)}`, text: a.labels.device }) : (a.labels.scope || '')),
      td(fmtAgo(a.starts_at_ms || a.active_at_ms)), td(fmtNum(a.value, 3), 'num'),
      td(a.suppressed ? 'silenced/inhibited' : '', 'muted'))), 'No alert is firing.') || '');

    liveEmpty.replaceChildren(fill(live.tbody, o.rollouts.map((r) => {
      const t = r.totals || {};
      const bar = h('div.bar', {}, h('span'));
      bar.firstChild.style.width = `${t.targeted ? (100 * t.confirmed) / t.targeted : 0}%`;
      return h('tr', { 'data-rollout': r.id },
        td(h('a', { href: `#/rollouts/${enc(r.id)}`, text: r.id })), td(r.model_id), td(r.target && r.target.version),
        td(pill(r.state)), td(`${r.stage + 1} / ${r.stages}`),
        td(h('div', {}, `${fmtNum(t.confirmed)} / ${fmtNum(t.targeted)}`, bar)),
        td(r.verdict ? pill(r.verdict) : ''));
    }), 'No rollout is running.') || '');
  };
}
