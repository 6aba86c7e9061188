// Cohorts: the list (GET /api/v1/cohorts) and one cohort: drift per feature over time as a
// heatmap, estimated accuracy with its band against the observed one, the class distribution
// against the profile's reference (GET /api/v1/cohorts/drift), findings in force, and its
// first devices (paged listing, never the whole fleet).

import { api, h, table, td, num, pill, fill, fmtAgo, fmtPct, fmtNum, enc } from '../app.js';
import { heatmap, lines, bars } from '../charts.js';

function list(root) {
  const t = table('cohorts', ['Cohort', '#Windows', '#Devices (latest)', '#Accuracy', '#Battery mV', 'Latest window']);
  const empty = h('div');
  root.append(h('h2', { text: 'Cohorts' }), h('div.card', {}, t.table, empty));
  return async function refresh() {
    const cs = await api('/api/v1/cohorts');
    empty.replaceChildren(fill(t.tbody, cs.map((c) => {
      const der = (c.latest && c.latest.derived) || {};
      return h('tr', { 'data-cohort': c.cohort },
        td(h('a', { href: `#/cohorts/${enc(c.cohort)}`, text: c.cohort })), num(c.windows), num(c.latest_devices),
        td(fmtPct(der.accuracy), 'num'), num(der.battery_avg_mv), td(fmtAgo(c.latest_start_ms), 'muted'));
    }), 'No cohort has reported a window yet.') || '');
  };
}

function detail(root, cohort) {
  const heat = h('div'), acc = h('div'), classes = h('div'), info = h('p.muted');
  const findings = table('findings', ['Kind', 'Scope', 'Window', '#Value', 'Summary']);
  const devs = table('cohort-devices', ['Device', 'State', 'Firmware', 'Last seen', '#Lost']);
  const findingsEmpty = h('div'), devsEmpty = h('div');
  root.append(
    h('h2', {}, h('a', { href: '#/cohorts', text: 'Cohorts' }), ' / ', cohort),
    info,
    h('div.card', {}, h('h3', { text: 'Drift per feature (PSI; outlined: significant)' }), heat),
    h('div.grid', {},
      h('div.card', {}, h('h3', { text: 'Accuracy: estimated (band) and observed' }), acc),
      h('div.card', {}, h('h3', { text: 'Predicted classes: reference and latest window' }), classes)),
    h('div.card', {}, h('h3', { text: 'Findings in force' }), findings.table, findingsEmpty),
    h('div.card', {}, h('h3', {}, 'Devices ',
      h('a', { href: `#/devices`, text: '(all devices)' })), devs.table, devsEmpty),
  );

  return async function refresh() {
    const [d, page] = await Promise.all([
      api(`/api/v1/cohorts/drift?cohort=${enc(cohort)}&limit=48`),
      api(`/api/v1/devices?cohort=${enc(cohort)}&limit=20`),
    ]);
    info.textContent = `Drift scope ${d.scope}; ${d.windows.length} evaluated windows.`;
    const byKey = new Map(d.cells.map((c) => [`${c.feature}|${c.window_start_ms}`, c]));
    heat.replaceChildren(heatmap('drift-heatmap', {
      rows: d.features, cols: d.windows,
      cell: (f, w) => {
        const c = byKey.get(`${f}|${w}`);
        if (!c || c.psi === null || c.psi === undefined) return null;
        const scale = c.psi / Math.max(0.2, 2 * (c.psi_critical || 0.1));
        return {
          scale, significant: c.significant,
          title: `${f} @ ${new Date(w).toISOString().slice(11, 16)}: PSI ${c.psi.toFixed(3)}` +
            `${c.psi_critical ? ` (critical ${c.psi_critical.toFixed(3)})` : ''}, n=${c.n ?? '?'}` +
            `${c.significant ? ', significant' : ''}`,
        };
      },
    }));

    const pts = (k) => d.accuracy.map((a) => ({ x: a.window_start_ms, y: a[k] }));
    const ys = d.accuracy.flatMap((a) => [a.estimated, a.observed, a.reference,
      a.estimated !== null && a.band !== null ? a.estimated - a.band : null]).filter((v) => v !== null && v !== undefined);
    acc.replaceChildren(lines('accuracy', [{
      label: 'accuracy', fmt: (v) => fmtPct(v, 0),
      min: ys.length ? Math.max(0, Math.min(...ys) - 0.05) : 0, max: ys.length ? Math.min(1, Math.max(...ys) + 0.02) : 1,
      series: [
        {
          label: 'estimated (CBPE)', cls: 's0', points: pts('estimated'),
          band: d.accuracy.filter((a) => a.estimated !== null && a.band !== null)
            .map((a) => ({ x: a.window_start_ms, lo: Math.max(0, a.estimated - a.band), hi: Math.min(1, a.estimated + a.band) })),
        },
        { label: 'observed', cls: 's2', points: pts('observed') },
        { label: 'reference', cls: 's5', points: pts('reference') },
      ],
    }]));

    const ref = d.classes.reference || [], cur = d.classes.current || [];
    const k = Math.max(ref.length, cur.length);
    const series = [];
    if (ref.length) series.push({ label: 'reference', cls: 's5', values: ref });
    if (cur.length) series.push({ label: 'latest window', cls: 's0', values: cur });
    classes.replaceChildren(bars('classes', { labels: Array.from({ length: k }, (_, i) => i), series }));

    findingsEmpty.replaceChildren(fill(findings.tbody, d.findings.map((f) => h('tr', {},
      td(pill(f.kind.type)), td(f.kind.feature ? `${scopeId(f.scope)} / ${f.kind.feature}` : scopeId(f.scope)),
      td(fmtAgo(f.window_start_ms)), td(fmtNum(f.value, 3), 'num'), td(f.summary))), 'None.') || '');

    devsEmpty.replaceChildren(fill(devs.tbody, page.devices.map((x) => h('tr', { 'data-device': x.id },
      td(h('a', { href: `#/devices/${enc(x.id)}`, text: x.id })),
      td(pill(x.revoked ? 'revoked' : x.online ? 'online' : x.last_seen_ms ? 'offline' : 'unseen')),
      td(x.fw), td(fmtAgo(x.last_seen_ms)), num(x.lost_summaries))), 'No device runs this cohort now.') ||
      (page.next ? h('p.muted', { text: 'First 20 devices shown.' }) : ''));
  };
}

function scopeId(s) {
  const base = `${s.model_id}@${s.model_version}`;
  if (s.kind === 'model') return base;
  if (s.kind === 'hardware') return `${base}/hw=${s.key}`;
  if (s.kind === 'device') return `${base}/device=${s.key}`;
  return `${base}/${s.key}`;
}

export default function cohorts(root, arg) {
  return arg ? detail(root, arg) : list(root);
}
