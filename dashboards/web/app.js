// tinyfleet web UI: login, the API helper, DOM helpers and the hash router.
// Every page module exports a function (root, arg, ctx) that builds the page's skeleton and
// returns an async refresh(); the router calls refresh() now and then every POLL_MS while the
// page is shown, and marks main#page with data-loaded="true" after the first one.

import overview from './pages/overview.js';
import cohorts from './pages/cohorts.js';
import devices from './pages/devices.js';
import models from './pages/models.js';
import rollouts from './pages/rollouts.js';
import alerts from './pages/alerts.js';

const PAGES = { overview, cohorts, devices, models, rollouts, alerts };
const POLL_MS = 5000;
const TOKEN_KEY = 'tinyfleet.token';

export const session = { token: null, name: null, role: null };
export const isOperator = () => session.role === 'operator';

// ---- API ----

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

/** Calls the API with the session's token; JSON in and out. Throws ApiError. */
export async function api(path, { method = 'GET', body, login = false } = {}) {
  const headers = { Authorization: `Bearer ${session.token}` };
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  let resp;
  try {
    resp = await fetch(path, {
      method, headers, cache: 'no-store',
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (e) {
    throw new ApiError(0, `cannot reach the server (${e.message})`);
  }
  const text = await resp.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch { data = null; }
  if (!resp.ok) {
    const msg = (data && data.error) || text || resp.statusText;
    if (resp.status === 401 && !login) {
      logout('The token is no longer accepted; sign in again.');
    }
    throw new ApiError(resp.status, `${method} ${path}: ${resp.status} ${msg}`);
  }
  return data;
}

// ---- DOM helpers ----

/** h('tag.class#id', {attrs}, ...children); attrs starting with "on" are listeners. */
export function h(spec, attrs = {}, ...children) {
  const [, tag = 'div', rest = ''] = spec.match(/^([a-z0-9]*)(.*)$/i) || [];
  const el = document.createElement(tag || 'div');
  for (const part of rest.match(/[.#][^.#]+/g) || []) {
    if (part[0] === '.') el.classList.add(part.slice(1)); else el.id = part.slice(1);
  }
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith('on') && typeof v === 'function') el.addEventListener(k.slice(2), v);
    else if (k === 'text') el.textContent = v;
    else el.setAttribute(k, v === true ? '' : String(v));
  }
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

/** A table with a header row; returns {table, tbody}. */
export function table(id, headers) {
  const tbody = h('tbody');
  const table = h(`table#${id}`, {}, h('thead', {}, h('tr', {},
    headers.map((t) => (t.startsWith('#') ? h('th.num', { text: t.slice(1) }) : h('th', { text: t }))))), tbody);
  return { table, tbody };
}

export const td = (v, cls) => h(cls ? `td.${cls}` : 'td', {}, v ?? '');
export const num = (v) => td(v === null || v === undefined ? '' : fmtNum(v), 'num');
export const pill = (v) => h(`span.pill.${String(v).replace(/[^a-z_]/gi, '')}`, { text: v });

/** Replaces a container's children, or shows `empty` text when there are none. */
export function fill(container, nodes, empty) {
  container.replaceChildren(...nodes);
  return nodes.length === 0 && empty ? h('p.empty', { text: empty }) : null;
}

export function fmtNum(v, digits = 0) {
  if (v === null || v === undefined || Number.isNaN(v)) return '';
  return Number(v).toLocaleString(undefined, { maximumFractionDigits: digits });
}
export const fmtPct = (v, d = 1) => (v === null || v === undefined ? '' : `${(v * 100).toFixed(d)}%`);
export function fmtTime(ms) {
  if (!ms) return '';
  const d = new Date(ms);
  return d.toISOString().replace('T', ' ').slice(0, 19);
}
export function fmtAgo(ms) {
  if (!ms) return 'never';
  const s = Math.round((Date.now() - ms) / 1000);
  if (s < 0) return `in ${fmtDur(-s)}`;
  return `${fmtDur(s)} ago`;
}
export function fmtDur(s) {
  if (s < 90) return `${s}s`;
  if (s < 5400) return `${Math.round(s / 60)}m`;
  if (s < 172800) return `${Math.round(s / 3600)}h`;
  return `${Math.round(s / 86400)}d`;
}
export const enc = encodeURIComponent;

// ---- errors ----

const errorBox = () => document.getElementById('error');
let errorSource = null;

/** Shows an error in #error; `source` lets a later success of the same kind clear it. */
export function showError(msg, source = 'page') {
  const box = errorBox();
  box.textContent = msg;
  box.hidden = false;
  errorSource = source;
}
export function clearError(source) {
  if (source && source !== errorSource) return;
  const box = errorBox();
  box.textContent = '';
  box.hidden = true;
  errorSource = null;
}

// ---- router ----

let generation = 0;
let timer = null;

function parseHash() {
  const path = location.hash.replace(/^#\/?/, '');
  const [name, ...rest] = path.split('/');
  const arg = rest.length && rest.join('/') ? decodeURIComponent(rest.join('/')) : null;
  return { name, arg };
}

function route() {
  if (!session.token) return;
  const { name, arg } = parseHash();
  if (!PAGES[name]) {
    location.replace('#/overview'); // fires hashchange, which routes
    return;
  }
  const my = ++generation;
  clearTimeout(timer);
  clearError();
  const main = document.getElementById('page');
  main.replaceChildren();
  main.dataset.page = name;
  main.removeAttribute('data-loaded');
  for (const a of document.querySelectorAll('nav a[data-page]')) {
    a.classList.toggle('active', a.dataset.page === name);
  }
  const ctx = { arg, alive: () => my === generation && session.token !== null, operator: isOperator() };
  const refresh = PAGES[name](main, arg, ctx);
  let first = true;
  const tick = async () => {
    if (!ctx.alive()) return;
    if (first || !document.hidden) {
      try {
        await refresh();
        if (ctx.alive()) {
          clearError('poll');
          document.getElementById('live').textContent = `updated ${new Date().toLocaleTimeString()}`;
        }
      } catch (e) {
        if (ctx.alive()) showError(e.message, 'poll');
      }
      if (ctx.alive() && first) main.dataset.loaded = 'true';
      first = false;
    }
    if (ctx.alive()) timer = setTimeout(tick, POLL_MS);
  };
  tick();
}

// ---- login ----

function showLogin() {
  document.getElementById('app').hidden = true;
  document.getElementById('login-view').hidden = false;
  document.getElementById('token').focus();
}

async function login(token) {
  session.token = token;
  try {
    const me = await api('/api/v1/whoami', { login: true });
    session.name = me.name;
    session.role = me.role;
  } catch (e) {
    session.token = null;
    sessionStorage.removeItem(TOKEN_KEY);
    showLogin();
    showError(e.status === 401 ? 'Unknown token.' : e.message, 'login');
    return;
  }
  sessionStorage.setItem(TOKEN_KEY, token);
  clearError();
  const who = document.getElementById('whoami');
  who.textContent = `${session.name} (${session.role})`;
  who.dataset.role = session.role;
  document.body.dataset.role = session.role;
  document.getElementById('login-view').hidden = true;
  document.getElementById('app').hidden = false;
  route();
}

export function logout(message) {
  generation++;
  clearTimeout(timer);
  session.token = session.name = session.role = null;
  sessionStorage.removeItem(TOKEN_KEY);
  document.getElementById('page').replaceChildren();
  document.getElementById('whoami').textContent = '';
  delete document.body.dataset.role;
  document.getElementById('token').value = '';
  showLogin();
  if (message) showError(message, 'login'); else clearError();
}

document.getElementById('login-form').addEventListener('submit', (ev) => {
  ev.preventDefault();
  const token = document.getElementById('token').value.trim();
  if (token) login(token);
});
document.getElementById('logout').addEventListener('click', () => logout());
window.addEventListener('hashchange', route);

const saved = sessionStorage.getItem(TOKEN_KEY);
if (saved) login(saved); else showLogin();
