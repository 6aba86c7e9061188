// Hand-written SVG charts. Each returns <svg class="chart" data-chart="name" data-points="n">,
// n being the number of data points drawn. Colours come from CSS classes s0..s5.

const NS = 'http://www.w3.org/2000/svg';

function el(tag, attrs = {}, parent = null, text = null) {
  const e = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) if (v !== null && v !== undefined) e.setAttribute(k, String(v));
  if (text !== null) e.textContent = text;
  if (parent) parent.append(e);
  return e;
}

function frame(name, w, hgt) {
  const svg = el('svg', { class: 'chart', 'data-chart': name, viewBox: `0 0 ${w} ${hgt}`, role: 'img', 'aria-label': name });
  return svg;
}

function done(svg, n) {
  svg.setAttribute('data-points', String(n));
  if (n === 0) {
    const [, , w, hgt] = svg.getAttribute('viewBox').split(' ').map(Number);
    el('text', { x: w / 2, y: hgt / 2, 'text-anchor': 'middle' }, svg, 'no data yet');
  }
  return svg;
}

const fmtShort = (v) => (Math.abs(v) >= 1000 ? `${(v / 1000).toFixed(1)}k` : Math.abs(v) < 1 && v !== 0 ? v.toFixed(2) : v.toFixed(0));
const clock = (ms) => new Date(ms).toISOString().slice(11, 19);

/** Interpolates white -> amber -> red for t in [0, 1]. */
export function heat(t) {
  const x = Math.max(0, Math.min(1, t));
  const [r, g, b] = x < 0.5
    ? [255, 255 - x * 2 * 64, 255 - x * 2 * 200]
    : [255 - (x - 0.5) * 2 * 48, 191 - (x - 0.5) * 2 * 150, 55 - (x - 0.5) * 2 * 20];
  return `rgb(${r | 0},${g | 0},${b | 0})`;
}

/**
 * Heatmap: rows x cols, one rect.cell each. cell(r, c) -> {value, scale (0..1), significant,
 * title} or null (drawn as missing).
 */
export function heatmap(name, { rows, cols, cell, colLabel = clock }) {
  const W = 800, left = 110, top = 8, cw = (W - left - 10) / Math.max(1, cols.length), ch = 22;
  const hgt = top + ch * rows.length + 24;
  const svg = frame(name, W, Math.max(hgt, 60));
  let n = 0;
  rows.forEach((r, i) => {
    el('text', { x: left - 6, y: top + i * ch + ch / 2 + 4, 'text-anchor': 'end' }, svg, String(r).slice(0, 20));
    cols.forEach((c, j) => {
      const v = cell(r, c);
      const rect = el('rect', {
        class: `cell${v ? '' : ' missing'}${v && v.significant ? ' significant' : ''}`,
        x: left + j * cw, y: top + i * ch, width: cw, height: ch,
        fill: v ? heat(v.scale) : null, 'data-row': r, 'data-col': c,
      }, svg);
      el('title', {}, rect, v ? v.title : `${r} @ ${colLabel(c)}: not tested`);
      n++;
    });
  });
  const step = Math.max(1, Math.ceil(cols.length / 6));
  cols.forEach((c, j) => {
    if (j % step === 0) el('text', { x: left + j * cw, y: top + ch * rows.length + 16 }, svg, colLabel(c));
  });
  return done(svg, n);
}

/**
 * Line chart in lanes (each lane its own y scale), shared x (time in ms).
 * lanes: [{label, series: [{label, cls, points: [{x, y}], band: [{x, lo, hi}]}], min, max, fmt}]
 */
export function lines(name, lanes, { height = 140 } = {}) {
  const W = 800, left = 56, right = 12, laneH = height, gap = 18;
  const H = lanes.length * (laneH + gap) + 20;
  const svg = frame(name, W, H);
  const xs = lanes.flatMap((l) => l.series.flatMap((s) => [...s.points.map((p) => p.x), ...(s.band || []).map((p) => p.x)]));
  let n = 0;
  if (xs.length === 0) return done(svg, 0);
  let x0 = Math.min(...xs), x1 = Math.max(...xs);
  if (x0 === x1) { x0 -= 60000; x1 += 60000; }
  const sx = (x) => left + ((x - x0) / (x1 - x0)) * (W - left - right);
  lanes.forEach((lane, li) => {
    const top = li * (laneH + gap) + 6, bottom = top + laneH;
    const ys = lane.series.flatMap((s) => [...s.points.map((p) => p.y), ...(s.band || []).flatMap((b) => [b.lo, b.hi])])
      .filter((v) => v !== null && v !== undefined && Number.isFinite(v));
    let y0 = lane.min ?? (ys.length ? Math.min(...ys) : 0), y1 = lane.max ?? (ys.length ? Math.max(...ys) : 1);
    if (y0 === y1) { y0 -= 1; y1 += 1; }
    const sy = (y) => bottom - ((y - y0) / (y1 - y0)) * (laneH - 10);
    el('line', { class: 'axis', x1: left, x2: W - right, y1: bottom, y2: bottom }, svg);
    el('line', { class: 'axis', x1: left, x2: left, y1: top, y2: bottom }, svg);
    const fmt = lane.fmt || fmtShort;
    el('text', { x: left - 4, y: sy(y1) + 4, 'text-anchor': 'end' }, svg, fmt(y1));
    el('text', { x: left - 4, y: sy(y0), 'text-anchor': 'end' }, svg, fmt(y0));
    const legend = el('g', { class: 'legend' }, svg);
    let lx = left + 8;
    el('text', { x: lx, y: top + 10 }, legend, lane.label);
    lx += lane.label.length * 7 + 12;
    lane.series.forEach((s, si) => {
      const cls = s.cls || `s${si}`;
      const band = (s.band || []).filter((b) => Number.isFinite(b.lo) && Number.isFinite(b.hi));
      if (band.length) {
        const pts = [...band.map((b) => `${sx(b.x)},${sy(b.hi)}`), ...band.slice().reverse().map((b) => `${sx(b.x)},${sy(b.lo)}`)];
        el('polygon', { class: `band ${cls}`, points: pts.join(' ') }, svg);
      }
      const pts = s.points.filter((p) => p.y !== null && p.y !== undefined && Number.isFinite(p.y));
      if (pts.length > 1) {
        el('path', { class: `line ${cls}`, d: pts.map((p, i) => `${i ? 'L' : 'M'}${sx(p.x).toFixed(1)},${sy(p.y).toFixed(1)}`).join('') }, svg);
      }
      for (const p of pts) {
        const dot = el('circle', { class: `dot ${cls}`, cx: sx(p.x), cy: sy(p.y), r: 2.5 }, svg);
        el('title', {}, dot, `${s.label} ${clock(p.x)}: ${fmt(p.y)}`);
      }
      n += pts.length;
      el('rect', { class: cls, x: lx, y: top + 3, width: 10, height: 8 }, legend);
      el('text', { x: lx + 14, y: top + 10 }, legend, s.label);
      lx += s.label.length * 7 + 28;
    });
  });
  el('text', { x: left, y: H - 4 }, svg, clock(x0));
  el('text', { x: W - right, y: H - 4, 'text-anchor': 'end' }, svg, clock(x1));
  return done(svg, n);
}

/** Grouped vertical bars: labels along x, one bar per series per label (values 0..max). */
export function bars(name, { labels, series, fmt = (v) => `${(v * 100).toFixed(1)}%` }) {
  const W = 800, H = 200, left = 48, bottom = H - 24, top = 18;
  const svg = frame(name, W, H);
  const max = Math.max(1e-9, ...series.flatMap((s) => s.values.filter(Number.isFinite)));
  const gw = (W - left - 8) / Math.max(1, labels.length);
  const bw = Math.max(2, (gw - 6) / Math.max(1, series.length));
  let n = 0;
  el('line', { class: 'axis', x1: left, x2: W - 8, y1: bottom, y2: bottom }, svg);
  el('text', { x: left - 4, y: top + 4, 'text-anchor': 'end' }, svg, fmt(max));
  labels.forEach((lab, i) => {
    series.forEach((s, si) => {
      const v = s.values[i];
      if (!Number.isFinite(v)) return;
      const hgt = (v / max) * (bottom - top);
      const r = el('rect', { class: s.cls || `s${si}`, x: left + i * gw + 3 + si * bw, y: bottom - hgt, width: bw - 1, height: Math.max(hgt, 0.5) }, svg);
      el('title', {}, r, `${s.label} ${lab}: ${fmt(v)}`);
      n++;
    });
    if (labels.length <= 40 || i % Math.ceil(labels.length / 40) === 0) {
      el('text', { x: left + i * gw + gw / 2, y: bottom + 14, 'text-anchor': 'middle' }, svg, String(lab));
    }
  });
  const legend = el('g', { class: 'legend' }, svg);
  let lx = left + 8;
  series.forEach((s, si) => {
    el('rect', { class: s.cls || `s${si}`, x: lx, y: 4, width: 10, height: 8 }, legend);
    el('text', { x: lx + 14, y: 12 }, legend, s.label);
    lx += s.label.length * 7 + 28;
  });
  return done(svg, n);
}

/** Horizontal bars (a funnel, or counts by category): rows [{label, value, cls, note}]. */
export function hbars(name, rows, { max = null } = {}) {
  const W = 800, rowH = 26, left = 150, right = 110;
  const svg = frame(name, W, rows.length * rowH + 8);
  const m = Math.max(1e-9, max ?? Math.max(0, ...rows.map((r) => r.value || 0)));
  let n = 0;
  rows.forEach((r, i) => {
    const y = 4 + i * rowH;
    el('text', { x: left - 8, y: y + 16, 'text-anchor': 'end' }, svg, r.label);
    const w = ((r.value || 0) / m) * (W - left - right);
    const rect = el('rect', { class: r.cls || 's0', x: left, y: y + 3, width: Math.max(w, r.value ? 1 : 0), height: rowH - 8, 'data-value': r.value }, svg);
    el('title', {}, rect, `${r.label}: ${r.value}`);
    el('text', { x: left + w + 6, y: y + 16 }, svg, `${(r.value ?? 0).toLocaleString()}${r.note ? `  ${r.note}` : ''}`);
    n++;
  });
  return done(svg, rows.length ? n : 0);
}
