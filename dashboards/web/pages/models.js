// Models: registered versions per model (GET /api/v1/models/{id}/versions) next to their
// monitoring profiles (GET /api/v1/models); a profile opens below (features, class prior,
// reference accuracy, calibration).

import { api, h, table, td, num, fill, fmtAgo, fmtTime, fmtNum, fmtPct, enc } from '../app.js';
import { bars } from '../charts.js';

export default function models(root) {
  const t = table('models', ['Model', 'Version', '#Seq', 'Hardware', '#Size', 'SHA-256', 'Registered', 'Profile']);
  const empty = h('div'), panel = h('div');
  let open = null; // [model, version] of the profile shown
  root.append(h('h2', { text: 'Models' }), h('div.card', {}, t.table, empty), panel);

  async function showProfile() {
    if (!open) { panel.replaceChildren(); return; }
    const [m, v] = open;
    const p = await api(`/api/v1/models/${enc(m)}/${enc(v)}/profile`);
    const total = (p.classes || []).reduce((a, b) => a + b, 0) || 1;
    const ft = table('profile-features', ['Feature', '#Bins', '#Low', '#High']);
    fill(ft.tbody, (p.features || []).map((f) => {
      const upper = f.hist.upper || [];
      return h('tr', {}, td(f.name), num(upper.length), td(fmtNum(f.hist.lo, 3), 'num'), td(fmtNum(upper[upper.length - 1], 3), 'num'));
    }));
    panel.replaceChildren(h('div.card#profile', { 'data-model': m, 'data-version': v },
      h('h3', {}, `Monitoring profile ${m}@${v} `, h('button', { type: 'button', text: 'Close', onclick: () => { open = null; panel.replaceChildren(); } })),
      h('dl.kv', {},
        h('dt', { text: 'reference rows' }), h('dd', { text: fmtNum(p.n) }),
        h('dt', { text: 'labelled rows' }), h('dd', { text: fmtNum(p.labelled) }),
        h('dt', { text: 'reference accuracy' }), h('dd', { text: p.accuracy === null ? 'no labels' : fmtPct(p.accuracy) }),
        h('dt', { text: 'confidence bins' }), h('dd', { text: String(p.conf_bins) })),
      h('div.grid', {},
        h('div', {}, h('h3', { text: 'Class prior' }), bars('profile-classes', {
          labels: (p.classes || []).map((_, i) => i),
          series: [{ label: 'reference share', cls: 's5', values: (p.classes || []).map((c) => c / total) }],
        })),
        h('div', {}, h('h3', { text: 'Calibration (accuracy per confidence bin)' }), bars('profile-calibration', {
          labels: (p.calibration || []).map((_, i) => i),
          series: [{ label: 'accuracy', cls: 's2', values: p.calibration || [] }],
        }))),
      h('h3', { text: 'Features' }), ft.table));
  }

  return async function refresh() {
    const [profiles, overview] = await Promise.all([api('/api/v1/models'), api('/api/v1/overview')]);
    const ids = [...new Set([...profiles.map((p) => p.model_id), ...overview.cohorts.map((c) => c.model_id)])].sort();
    const versions = (await Promise.all(ids.map((id) => api(`/api/v1/models/${enc(id)}/versions`).catch(() => []))))
      .flat();
    const prof = new Map(profiles.map((p) => [`${p.model_id}@${p.model_version}`, p]));
    const rows = versions.map((v) => ({ ...v, profile: prof.get(`${v.model_id}@${v.model_version}`) }));
    // Profiles of versions that were never registered for OTA are listed too.
    for (const p of profiles) {
      if (!versions.some((v) => v.model_id === p.model_id && v.model_version === p.model_version)) {
        rows.push({ model_id: p.model_id, model_version: p.model_version, profile: p });
      }
    }
    empty.replaceChildren(fill(t.tbody, rows.map((r) => h('tr', { 'data-model': r.model_id, 'data-version': r.model_version },
      td(r.model_id), td(r.model_version), num(r.seq), td(r.hw), num(r.size),
      td(r.sha256 ? h('code', { text: r.sha256.slice(0, 12), title: r.sha256 }) : 'not registered'),
      td(r.created_ms ? `${fmtTime(r.created_ms)} by ${r.created_by}` : ''),
      td(r.profile
        ? h('button', { type: 'button', 'data-profile': `${r.model_id}@${r.model_version}`, text: `view (${fmtAgo(r.profile.updated_ms)})`,
          onclick: () => { open = [r.model_id, r.model_version]; showProfile().catch((e) => panel.replaceChildren(h('p.empty', { text: e.message }))); } })
        : h('span.muted', { text: 'none' })))), 'No model version is registered and no profile stored.') || '');
    if (open && !panel.firstChild) await showProfile();
  };
}
