// Rollouts: the list, and one rollout: state, stage funnel, per-stage counts, gate values and
// verdicts, the audit log (fetched incrementally), and for operators pause / resume / advance /
// abort, each asking for a reason in an inline form.

import { api, h, table, td, num, pill, fill, fmtAgo, fmtTime, fmtNum, fmtPct, enc, showError, clearError } from '../app.js';
import { hbars } from '../charts.js';

function list(root) {
  const t = table('rollouts', ['Rollout', 'Model', 'Target', 'State', 'Stage', '#Targeted', '#Confirmed', '#Failed', 'Gates', 'Created']);
  const empty = h('div');
  root.append(h('h2', { text: 'Rollouts' }), h('div.card', {}, t.table, empty));
  return async function refresh() {
    const rs = await api('/api/v1/rollouts');
    empty.replaceChildren(fill(t.tbody, rs.map((r) => h('tr.clickable', {
      'data-rollout': r.id, onclick: (e) => { if (e.target.tagName !== 'A') location.hash = `#/rollouts/${enc(r.id)}`; },
    },
    td(h('a', { href: `#/rollouts/${enc(r.id)}`, text: r.id })), td(r.model_id), td(`${r.target.version} (seq ${r.target.seq})`),
    td(pill(r.state)), td(`${r.stage + 1} / ${r.stages.length}`), num(r.totals.targeted), num(r.totals.confirmed),
    num(r.totals.failed + r.totals.rejected + r.totals.reverted + r.totals.timed_out),
    td(r.gates ? pill(r.gates.verdict) : ''), td(fmtAgo(r.created_ms)))), 'No rollout yet.') || '');
  };
}

const ACTIONS = [
  ['pause', 'Pause', 'No new offers until resumed.'],
  ['resume', 'Resume', 'Offers start again; the stage deadline starts over.'],
  ['advance', 'Advance', 'Open the next stage (or complete) now, whatever the gates say.'],
  ['abort', 'Abort', 'Withdraw the offers and roll back every device that took the new version.'],
];

const interval = (i) => (i ? `${fmtPct(i.estimate)} [${fmtPct(i.low)}, ${fmtPct(i.high)}]` : '');
const cause = (c) => (typeof c === 'string' ? c : Object.entries(c || {}).map(([k, v]) => `${k}:${v}`).join(' '));

function gateRows(g) {
  const rows = [];
  const inst = g.install;
  for (const [scope, ev] of [['rollout', inst.cumulative], ['stage', inst.stage]]) {
    for (const k of ['failure', 'revert', 'timeout']) {
      const c = ev[k];
      rows.push(h('tr', { 'data-gate': `install.${scope}.${k}` }, td('install'), td(`${k} rate (${scope})`),
        td(`${fmtNum(c.bad)} / ${fmtNum(c.done)}`), td(interval(c.rate)), td(fmtPct(c.limit), 'num'), td(pill(c.verdict))));
    }
  }
  const q = g.quality;
  for (const k of ['labelled', 'estimated', 'latency', 'resets', 'classes', 'drift']) {
    const c = q[k];
    if (!c) continue;
    const harm = c.harm ? `${fmtNum(c.harm.estimate, 4)} [${fmtNum(c.harm.low, 4)}, ${fmtNum(c.harm.high, 4)}]` : '';
    rows.push(h('tr', { 'data-gate': `quality.${k}` }, td('quality'), td(k),
      td(`canary ${fmtNum(c.canary, 4)} (n=${fmtNum(c.n_canary)}) / control ${fmtNum(c.control, 4)} (n=${fmtNum(c.n_control)})`),
      td(harm), td(fmtNum(c.limit, 4), 'num'), td(pill(c.verdict))));
  }
  return rows;
}

function detail(root, id, ctx) {
  const head = h('div.card'), funnel = h('div');
  const stages = table('stages', ['Stage', '#Share', 'State', '#Targeted', '#Offered', '#Pending', '#Downloading', '#Installed',
    '#Confirmed', '#Failed', '#Rejected', '#Reverted', '#Timed out', 'Opened', 'Soak until', 'Deadline']);
  const gates = table('gates', ['Gate', 'Check', 'Sample', 'Value [interval]', '#Limit', 'Verdict']);
  const audit = table('audit', ['#', 'At', 'Event', 'Stage', 'Cause', 'Note', 'Gates']);
  const gateNote = h('p#gate-verdict'), auditEmpty = h('div');
  const actions = h('div#actions.toolbar'), form = h('div');
  let entries = []; // audit records so far, oldest first

  if (ctx.operator) {
    for (const [op, label, help] of ACTIONS) {
      actions.append(h(`button${op === 'abort' ? '.danger' : ''}`, {
        type: 'button', 'data-action': op, text: label, title: help, onclick: () => ask(op, label, help),
      }));
    }
  }
  root.append(h('h2', {}, h('a', { href: '#/rollouts', text: 'Rollouts' }), ' / ', id), head,
    ctx.operator ? h('div.card', {}, h('h3', { text: 'Operator actions' }), actions, form) : '',
    h('div.card', {}, h('h3', { text: 'Progress (all stages)' }), funnel),
    h('div.card', {}, h('h3', { text: 'Stages' }), stages.table),
    h('div.card', {}, h('h3', { text: 'Gates now' }), gateNote, gates.table),
    h('div.card', {}, h('h3', { text: 'Audit log (newest first)' }), audit.table, auditEmpty));

  function ask(op, label, help) {
    const input = h('input#action-reason', { type: 'text', placeholder: 'reason (recorded in the audit log)', maxlength: '1024' });
    const confirm = h('button#action-confirm.primary', { type: 'button', text: `Confirm ${label.toLowerCase()}` });
    confirm.addEventListener('click', () => run(op, input.value, confirm));
    input.addEventListener('keydown', (e) => { if (e.key === 'Enter') confirm.click(); });
    form.replaceChildren(h('div.inline-form#action-form', { 'data-action': op },
      h('strong', { text: `${label}: ` }), h('span.muted', { text: help }), input, confirm,
      h('button#action-cancel', { type: 'button', text: 'Cancel', onclick: () => form.replaceChildren() })));
    input.focus();
  }

  async function run(op, reason, button) {
    button.disabled = true;
    try {
      const status = await api(`/api/v1/rollouts/${enc(id)}/${op}`, { method: 'POST', body: { reason } });
      if (!ctx.alive()) return;
      clearError();
      form.replaceChildren(h('p.notice#action-done', { text: `${op}: done, now ${status.state}.` }));
      render(status);
      await refreshAudit();
    } catch (e) {
      if (!ctx.alive()) return;
      showError(e.message, 'action');
      button.disabled = false;
    }
  }

  function render(r) {
    const t = r.totals;
    head.replaceChildren(h('dl.kv', {},
      h('dt', { text: 'state' }), h('dd', {}, h('span#rollout-state', { 'data-state': r.state, text: r.state })),
      h('dt', { text: 'model' }), h('dd', { text: `${r.model_id}: ${(r.replaces || []).map((v) => v.version).join(', ') || '-'} -> ${r.target.version} (seq ${r.target.seq})` }),
      h('dt', { text: 'stage' }), h('dd', { text: `${r.stage + 1} of ${r.stages.length}` }),
      h('dt', { text: 'created' }), h('dd', { text: fmtTime(r.created_ms) }),
      r.holding ? [h('dt', { text: 'holding' }), h('dd', { text: r.holding })] : '',
      r.paused ? [h('dt', { text: 'paused' }), h('dd', { text: `${fmtAgo(r.paused.at_ms)} by ${cause(r.paused.cause)}${r.paused.note ? `: ${r.paused.note}` : ''}` })] : '',
      r.rollback ? [h('dt', { text: 'rollback' }), h('dd', { text: `${fmtNum(r.rollback.devices)} devices; ${fmtNum(r.rollback.counts.confirmed)} back${r.rollback.completed_ms ? ', completed' : ''}` })] : ''));
    const failed = t.failed + t.rejected + t.reverted + t.timed_out;
    funnel.replaceChildren(hbars('funnel', [
      { label: 'targeted', value: t.targeted, cls: 's5' },
      { label: 'offered', value: t.offered, cls: 's0' },
      { label: 'started', value: t.offered - t.pending, cls: 's0' },
      { label: 'installed', value: t.installed + t.confirmed, cls: 's4' },
      { label: 'confirmed', value: t.confirmed, cls: 's2' },
      { label: 'failed, reverted', value: failed, cls: 's3', note: 'incl. rejected, timed out' },
    ], { max: t.targeted || 1 }));
    fill(stages.tbody, r.stages.map((s) => {
      const c = s.counts;
      return h('tr', { 'data-stage': s.index }, td(s.index + 1), td(fmtPct(s.share, 0), 'num'), td(pill(s.state)),
        num(c.targeted), num(c.offered), num(c.pending), num(c.downloading), num(c.installed), num(c.confirmed),
        num(c.failed), num(c.rejected), num(c.reverted), num(c.timed_out),
        td(fmtTime(s.opened_ms)), td(fmtTime(s.soak_until_ms)), td(fmtTime(s.deadline_ms)));
    }));
    const g = r.gates;
    gateNote.replaceChildren(...(g ? [pill(g.verdict), ` stage ${g.stage + 1}, evaluated ${fmtAgo(g.at_ms)}${g.reason ? `: ${g.reason}` : ''}`]
      : ['Gates are evaluated while the rollout runs or is paused.']));
    fill(gates.tbody, g ? gateRows(g) : []);
  }

  async function refreshAudit() {
    for (;;) {
      const after = entries.length ? entries[entries.length - 1].id : 0;
      const more = await api(`/api/v1/rollouts/${enc(id)}/audit?after=${after}&limit=1000`);
      entries = entries.concat(more);
      if (more.length < 1000) break;
    }
    if (!ctx.alive()) return;
    auditEmpty.replaceChildren(fill(audit.tbody, entries.slice().reverse().map((a) => h('tr', { 'data-audit': a.id, 'data-event': a.event },
      num(a.id), td(fmtTime(a.at_ms)), td(a.event), td(a.stage === null || a.stage === undefined ? '' : a.stage + 1),
      td(cause(a.cause)), td(a.note), td(a.gates ? pill(a.gates.verdict) : ''))), 'No record yet.') || '');
  }

  return async function refresh() {
    const r = await api(`/api/v1/rollouts/${enc(id)}`);
    if (!ctx.alive()) return;
    render(r);
    await refreshAudit();
  };
}

export default function rollouts(root, arg, ctx) {
  return arg ? detail(root, arg, ctx) : list(root);
}
