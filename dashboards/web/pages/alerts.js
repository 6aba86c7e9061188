// Alerts and silences: every alert (pending, firing, recently resolved) with why it is muted,
// the silences, and for operators a form to create a silence (prefilled from an alert) and
// buttons to expire one.

import { api, h, table, td, pill, fill, fmtAgo, fmtTime, fmtNum, enc, showError, clearError } from '../app.js';

const ORDER = { firing: 0, pending: 1, resolved: 2 };
const SEVERITY = { critical: 0, warning: 1, info: 2 };
const MATCHER = /^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*(.*?)\s*$/;

/** "alertname=FeatureDrift, device=~d1.*" -> matchers. */
export function parseMatchers(text) {
  return text.split(',').filter((p) => p.trim()).map((p) => {
    const m = p.match(MATCHER);
    if (!m) throw new Error(`matcher ${JSON.stringify(p.trim())}: use name=value, name!=value, name=~regex or name!~regex`);
    return { name: m[1], op: m[2], value: m[3] };
  });
}

export default function alerts(root, arg, ctx) {
  const at = table('alerts', ['State', 'Severity', 'Alert', 'Scope', 'Labels', 'Value', 'Since', 'Muted by', '']);
  const st = table('silences', ['State', 'Matchers', 'Starts', 'Ends', 'Created by', 'Comment', '']);
  const filter = h('select#alert-state', {}, ['', 'firing', 'pending', 'resolved'].map((s) => h('option', { value: s, text: s || 'all states' })));
  const alertsEmpty = h('div'), silencesEmpty = h('div');
  const matchers = h('input#silence-matchers', { type: 'text', placeholder: 'alertname=FeatureDrift, device=d1' });
  const duration = h('input#silence-duration', { type: 'number', min: '1', value: '60', title: 'minutes' });
  const comment = h('input#silence-comment', { type: 'text', placeholder: 'why (required)' });
  const create = h('button#silence-create.primary', { type: 'button', text: 'Create silence' });
  let refresh;

  create.addEventListener('click', async () => {
    try {
      const body = {
        matchers: parseMatchers(matchers.value),
        duration_secs: Math.round(Number(duration.value) * 60),
        comment: comment.value.trim(),
      };
      if (!body.comment) throw new Error('a silence needs a comment');
      if (!body.matchers.length) throw new Error('a silence needs at least one matcher');
      await api('/api/v1/silences', { method: 'POST', body });
      clearError();
      matchers.value = comment.value = '';
      await refresh();
    } catch (e) {
      showError(e.message, 'action');
    }
  });
  filter.addEventListener('change', () => refresh().catch((e) => showError(e.message)));

  root.append(h('h2', { text: 'Alerts and silences' }),
    h('div.card', {}, h('div.toolbar', {}, h('h3', { text: 'Alerts' }), filter), at.table, alertsEmpty),
    h('div.card', {}, h('h3', { text: 'Silences' }),
      ctx.operator ? h('div.inline-form', {}, h('label', { for: 'silence-matchers', text: 'Silence' }), matchers,
        h('label', { for: 'silence-duration', text: 'for (minutes)' }), duration, comment, create) : '',
      st.table, silencesEmpty));

  const silenceFrom = (a) => {
    const keys = ['alertname', 'scope', 'device', 'feature'].filter((k) => a.labels[k]);
    matchers.value = keys.map((k) => `${k}=${a.labels[k]}`).join(', ');
    comment.focus();
  };

  refresh = async function () {
    const [list, silences] = await Promise.all([
      api(`/api/v1/alerts${filter.value ? `?state=${enc(filter.value)}` : ''}`),
      api('/api/v1/silences'),
    ]);
    list.sort((a, b) => (ORDER[a.state] - ORDER[b.state]) ||
      ((SEVERITY[a.labels.severity] ?? 9) - (SEVERITY[b.labels.severity] ?? 9)) || (b.active_at_ms - a.active_at_ms));
    alertsEmpty.replaceChildren(fill(at.tbody, list.map((a) => {
      const { alertname, severity, scope, ...rest } = a.labels;
      const muted = [...(a.silenced_by || []).map((s) => `silence ${s}`), ...(a.inhibited_by || []).map((s) => `inhibited by ${s}`)];
      return h('tr', { 'data-alert': a.fingerprint, 'data-state': a.state },
        td(pill(a.state)), td(pill(severity || 'none')), td(alertname, null),
        td(rest.device ? h('a', { href: `#/devices/${enc(rest.device)}`, text: scope || rest.device }) : scope),
        td(Object.entries(rest).map(([k, v]) => `${k}=${v}`).join(', '), 'muted'),
        td(fmtNum(a.value, 3), 'num'),
        td(a.state === 'resolved' ? `resolved ${fmtAgo(a.ends_at_ms)}` : fmtAgo(a.starts_at_ms || a.active_at_ms)),
        td(muted.join(', '), 'muted'),
        td(ctx.operator && a.state !== 'resolved' ? h('button', { type: 'button', 'data-silence-alert': a.fingerprint, text: 'Silence…', onclick: () => silenceFrom(a) }) : ''));
    }), 'No alert.') || '');

    silences.sort((a, b) => (a.state === 'expired') - (b.state === 'expired') || b.ends_at_ms - a.ends_at_ms);
    silencesEmpty.replaceChildren(fill(st.tbody, silences.map((s) => h('tr', { 'data-silence': s.id, 'data-state': s.state },
      td(pill(s.state)), td(s.matchers.map((m) => `${m.name}${m.op}${m.value}`).join(', ')),
      td(fmtTime(s.starts_at_ms)), td(fmtTime(s.ends_at_ms)), td(s.created_by), td(s.comment),
      td(ctx.operator && s.state !== 'expired' ? h('button.danger', {
        type: 'button', 'data-expire': s.id, text: 'Expire',
        onclick: async () => {
          try {
            await api(`/api/v1/silences/${enc(s.id)}`, { method: 'DELETE' });
            clearError();
            await refresh();
          } catch (e) { showError(e.message, 'action'); }
        },
      }) : ''))), 'No silence.') || '');
  };
  return refresh;
}
