// Weir dashboard: polls the job's REST API (Flink's shapes, plus Weir's `weir` fields) once a
// second and redraws. Plain ES2020 and inline SVG, no build step, so it works offline.
'use strict';

const POLL_MS = 1000;
const TERMINAL = new Set(['FINISHED', 'CANCELED', 'FAILED']);
// The API keeps only the last few checkpoints; the page keeps more, across polls.
const HISTORY_KEEP = 200;
const CHART_BARS = 40;
const TOKEN_KEY = 'weir-rest-token';

const state = {
  jid: null,
  history: new Map(), // checkpoint id → entry (the newest copy seen)
  vertexDetails: new Map(), // vertex id → /vertices/:vid response
  cpConfig: null,
  finished: false,
  busy: false, // an action (savepoint, stop, cancel) is in flight
};

const $ = (id) => document.getElementById(id);

// ---------- formatting ----------

function esc(s) {
  return String(s ?? '').replace(/[&<>"']/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' }[c]));
}

function fmtBytes(n) {
  if (n == null || n < 0 || !Number.isFinite(n)) return '—';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i === 0 ? String(Math.round(n)) : n.toFixed(n < 10 ? 2 : n < 100 ? 1 : 0)) + ' ' + units[i];
}

function fmtMs(ms) {
  if (ms == null || ms < 0 || !Number.isFinite(ms)) return '—';
  if (ms < 1) return ms === 0 ? '0 ms' : ms.toFixed(2) + ' ms';
  if (ms < 10) return ms.toFixed(1) + ' ms';
  if (ms < 1000) return Math.round(ms) + ' ms';
  const s = ms / 1000;
  if (s < 60) return +s.toFixed(s < 10 ? 2 : 1) + ' s'; // the unary + drops trailing zeros: "1 s", not "1.00 s"
  const m = Math.floor(s / 60), h = Math.floor(m / 60), d = Math.floor(h / 24);
  if (d > 0) return `${d}d ${h % 24}h ${m % 60}m`;
  if (h > 0) return `${h}h ${m % 60}m ${Math.floor(s % 60)}s`;
  return `${m}m ${Math.floor(s % 60)}s`;
}

function fmtCount(n) {
  if (n == null || !Number.isFinite(n)) return '—';
  const a = Math.abs(n);
  if (a >= 1e9) return (n / 1e9).toFixed(2) + 'G';
  if (a >= 1e6) return (n / 1e6).toFixed(2) + 'M';
  if (a >= 1e4) return (n / 1e3).toFixed(1) + 'k';
  return Number.isInteger(n) ? String(n) : n.toFixed(1);
}

function fmtTime(ms) {
  if (!ms || ms < 0) return '—';
  const d = new Date(ms);
  const p = (x) => String(x).padStart(2, '0');
  return `${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}.${String(d.getMilliseconds()).padStart(3, '0')}`;
}

// Flink's thresholds: ratio of time backpressured < 0.1 ok, < 0.5 low, else high.
function bpLevel(ratio) {
  return ratio < 0.1 ? 'ok' : ratio < 0.5 ? 'low' : 'high';
}

// ---------- fetching ----------

async function getJson(path) {
  const r = await fetch(path, { cache: 'no-store' });
  if (!r.ok) {
    let msg = `${r.status} ${r.statusText}`;
    try { const b = await r.json(); if (b.errors) msg += ': ' + b.errors.join('; '); } catch (_) { /* not JSON */ }
    throw new Error(`GET ${path}: ${msg}`);
  }
  return r.json();
}

// An optional part of the page: its failure must not blank the rest.
async function optional(path) {
  try { return await getJson(path); } catch (e) { console.warn(e.message); return null; }
}

async function findJob() {
  const o = await getJson('/jobs/overview');
  if (!o.jobs || o.jobs.length === 0) throw new Error('no job on this server');
  return o.jobs[0].jid;
}

async function poll() {
  if (!state.jid) state.jid = await findJob();
  const base = `/jobs/${encodeURIComponent(state.jid)}`;
  const [job, cpsOrNull, gpu, latency] = await Promise.all([
    getJson(base), optional(`${base}/checkpoints`), optional(`${base}/gpu`), optional(`${base}/latency`),
  ]);
  const cps = cpsOrNull || { counts: {}, history: [] };
  if (!state.cpConfig) state.cpConfig = await optional(`${base}/checkpoints/config`);
  const details = await Promise.all((job.vertices || []).map((v) => optional(`${base}/vertices/${encodeURIComponent(v.id)}`)));
  (job.vertices || []).forEach((v, i) => { if (details[i]) state.vertexDetails.set(v.id, details[i]); });
  for (const c of cps.history || []) state.history.set(c.id, c);
  while (state.history.size > HISTORY_KEEP) state.history.delete(Math.min(...state.history.keys()));
  return { job, cps, gpu, latency };
}

function setLive(kind, text) {
  $('live').className = 'live ' + kind;
  $('live-text').textContent = text;
}

async function tick() {
  try {
    const data = await poll();
    render(data);
    if (TERMINAL.has(data.job.state)) {
      state.finished = true;
      setLive('done', 'job ' + data.job.state.toLowerCase());
      updateButtons(data.job.state);
      return; // the final state is shown; nothing changes any more
    }
    setLive('ok', 'live');
  } catch (e) {
    console.error('poll failed:', e.message);
    setLive('error', 'disconnected');
    $('live').title = e.message;
  }
  setTimeout(tick, POLL_MS);
}

// ---------- rendering ----------

function render({ job, cps, gpu, latency }) {
  renderHeader(job);
  renderGraph(job);
  renderCheckpoints(cps);
  renderLatency(latency);
  renderGpu(gpu);
  updateButtons(job.state);
}

function renderHeader(job) {
  document.title = `${job.name} · Weir`;
  $('job-name').textContent = job.name;
  $('job-state').textContent = job.state;
  $('job-state').className = 'badge state-' + job.state;
  $('job-id').textContent = job.jid;
  const uptime = job.duration >= 0 ? job.duration : (job.now || Date.now()) - job['start-time'];
  $('job-uptime').textContent = fmtMs(uptime);
  const w = job.weir || {};
  $('job-restarts').textContent = w.restarts ?? '—';
  const read = w['records-read'], total = w['records-total'];
  $('job-records').textContent = fmtCount(read) + (total != null ? ` / ${fmtCount(total)}` : '');
  $('job-records').title = total ? `${(100 * read / total).toFixed(1)} %` : '';
  $('job-updated').textContent = fmtTime(Date.now()).slice(0, 8);
  const fail = $('failure');
  fail.hidden = !w.failure;
  fail.textContent = w.failure ? 'Failure: ' + w.failure : '';
}

// Sums rates over subtasks; takes the worst busy, backpressure and p99 of any subtask.
function vertexFigures(v) {
  const d = state.vertexDetails.get(v.id);
  const f = { inRate: 0, outRate: 0, busy: 0, bp: 0, p99: null, records: v.metrics || {} };
  for (const s of (d && d.subtasks) || []) {
    const w = s.weir || {};
    f.inRate += w['records-in-per-second'] || 0;
    f.outRate += w['records-out-per-second'] || 0;
    f.busy = Math.max(f.busy, (w['busy-ms-per-second'] || 0) / 10);
    f.bp = Math.max(f.bp, (w['backpressured-ms-per-second'] || 0) / 1000);
    if (w.latency && w.latency.count > 0) f.p99 = Math.max(f.p99 ?? 0, w.latency.p99);
  }
  return f;
}

const NODE_W = 250, NODE_H = 104, COL_GAP = 90, ROW_GAP = 24;

// Left to right by depth (longest path from a source), top to bottom by position in the plan.
function layout(nodes) {
  const byId = new Map(nodes.map((n) => [n.id, n]));
  const depth = new Map();
  const depthOf = (n, seen = new Set()) => {
    if (depth.has(n.id)) return depth.get(n.id);
    if (seen.has(n.id)) return 0; // a cycle would be a bug upstream; do not hang the page
    seen.add(n.id);
    const ins = (n.inputs || []).map((i) => byId.get(i.id)).filter(Boolean);
    const d = ins.length ? 1 + Math.max(...ins.map((m) => depthOf(m, seen))) : 0;
    depth.set(n.id, d);
    return d;
  };
  const cols = [];
  for (const n of nodes) { const d = depthOf(n); (cols[d] = cols[d] || []).push(n); }
  const rows = Math.max(1, ...cols.map((c) => (c ? c.length : 0)));
  const height = rows * NODE_H + (rows - 1) * ROW_GAP + 40;
  const pos = new Map();
  cols.forEach((col, ci) => {
    if (!col) return;
    const colH = col.length * NODE_H + (col.length - 1) * ROW_GAP;
    col.forEach((n, ri) => pos.set(n.id, { x: 10 + ci * (NODE_W + COL_GAP), y: (height - colH) / 2 + ri * (NODE_H + ROW_GAP) }));
  });
  return { pos, width: 20 + cols.length * NODE_W + (cols.length - 1) * COL_GAP, height };
}

function renderGraph(job) {
  const nodes = (job.plan && job.plan.nodes) || [];
  if (!nodes.length) { $('job-graph').innerHTML = '<div class="empty">No operators yet.</div>'; return; }
  const verts = new Map((job.vertices || []).map((v) => [v.id, v]));
  const { pos, width, height } = layout(nodes);
  const parts = [];
  for (const n of nodes) {
    const to = pos.get(n.id);
    for (const inp of n.inputs || []) {
      const from = pos.get(inp.id);
      if (!from) continue;
      const x1 = from.x + NODE_W, y1 = from.y + NODE_H / 2, x2 = to.x, y2 = to.y + NODE_H / 2, mx = (x1 + x2) / 2;
      parts.push(`<path class="edge" marker-end="url(#arrow)" d="M${x1},${y1} C${mx},${y1} ${mx},${y2} ${x2 - 2},${y2}"/>`);
      parts.push(`<text class="edge-label" x="${mx}" y="${(y1 + y2) / 2 - 6}" text-anchor="middle">${esc(inp.ship_strategy || '')}</text>`);
    }
  }
  for (const n of nodes) {
    const v = verts.get(n.id) || { id: n.id, name: n.description, parallelism: n.parallelism };
    const f = vertexFigures(v);
    const lvl = bpLevel(f.bp);
    const { x, y } = pos.get(n.id);
    const name = v.name || n.description || n.id;
    const short = name.length > 30 ? name.slice(0, 29) + '…' : name;
    const tip = `${name}\nid ${v.id}\nrecords in ${f.records['read-records'] ?? '—'}, out ${f.records['write-records'] ?? '—'}` +
      `\nbackpressured ${(f.bp * 100).toFixed(0)} % of the time`;
    const busyW = Math.min(100, f.busy) / 100 * (NODE_W - 24);
    parts.push(`<g class="node" data-vertex-id="${esc(v.id)}" data-vertex-name="${esc(name)}" transform="translate(${x},${y})">
      <title>${esc(tip)}</title>
      <rect class="box bp-${lvl}" width="${NODE_W}" height="${NODE_H}" rx="6"/>
      <rect class="bp-${lvl}" width="6" height="${NODE_H}" rx="3"/>
      <text class="title" x="14" y="20">${esc(short)}</text>
      <text class="sub" x="14" y="37">Parallelism ${esc(v.parallelism)} · ${esc(v.status || '')}</text>
      <text x="14" y="56">in ${fmtCount(f.inRate)}/s · out ${fmtCount(f.outRate)}/s</text>
      <text x="14" y="74">busy ${f.busy.toFixed(0)}% · bp ${lvl}${f.p99 != null ? ' · p99 ' + fmtMs(f.p99) : ''}</text>
      <rect x="14" y="86" width="${NODE_W - 24}" height="6" rx="3" fill="#edf0f3"/>
      <rect x="14" y="86" width="${busyW}" height="6" rx="3" fill="${busyColour(f.busy)}"/>
    </g>`);
  }
  $('job-graph').innerHTML = `<svg width="${width}" height="${height}" viewBox="0 0 ${width} ${height}" role="img" aria-label="job graph">
    <defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" orient="auto">
      <path d="M0,0 L10,5 L0,10 z" fill="#9aa8b8"/></marker></defs>${parts.join('')}</svg>`;
}

// Flink colours busy operators from blue (idle) to red (busy).
function busyColour(pct) {
  const t = Math.max(0, Math.min(1, pct / 100));
  const hue = 210 - 210 * t;
  return `hsl(${hue}, 75%, 50%)`;
}

function cpType(c) {
  return c.checkpoint_type || (c.is_savepoint ? 'SAVEPOINT' : 'CHECKPOINT');
}

function renderCheckpoints(cps) {
  const n = cps.counts || {};
  const latest = (cps.latest && cps.latest.completed) || null;
  const restored = cps.latest && cps.latest.restored;
  const card = (label, value) => `<div class="count"><b>${esc(value ?? '—')}</b><span>${label}</span></div>`;
  let latestText = 'none yet';
  if (latest) {
    latestText = `#${latest.id} at ${fmtTime(latest.latest_ack_timestamp).slice(0, 8)} · ${fmtMs(latest.end_to_end_duration)}` +
      ` · ${fmtBytes(latest.checkpointed_size)} written · ${fmtBytes(latest.state_size)} state`;
  }
  $('checkpoint-counts').innerHTML = card('Completed', n.completed) + card('Failed', n.failed) + card('In progress', n.in_progress) +
    card('Restored', n.restored) + card('Triggered', n.total) +
    `<div class="count latest"><b>${esc(latestText)}</b><span>Latest completed${restored ? ` · restored from #${esc(restored.id)}` : ''}</span></div>`;

  const cfg = state.cpConfig;
  if (cfg) {
    const off = cfg.interval >= 0x7fffffffffff;
    const w = cfg.weir || {};
    $('checkpoint-config').textContent = (off ? 'periodic checkpoints off' : `every ${fmtMs(cfg.interval)}`) +
      ` · ${cfg.state_backend || ''}${w.incremental ? ' · incremental' : ''} · ${cfg.mode || ''}`;
  }

  const all = [...state.history.values()].sort((a, b) => b.id - a.id);
  const rows = all.map((c) => {
    const w = c.weir || {};
    const type = cpType(c);
    const tip = c.failure_message ? ` title="${esc(c.failure_message)}"` : c.external_path ? ` title="${esc(c.external_path)}"` : '';
    return `<tr data-checkpoint-id="${esc(c.id)}" data-status="${esc(c.status)}" class="${type === 'SAVEPOINT' ? 'savepoint' : ''}"${tip}>
      <td class="num">${esc(c.id)}</td><td><span class="badge st-${esc(c.status)}">${esc(c.status)}</span></td>
      <td>${esc(type)}${w.is_final ? ' (final)' : ''}</td><td>${fmtTime(c.trigger_timestamp)}</td>
      <td class="num">${fmtMs(c.end_to_end_duration)}</td><td class="num">${fmtBytes(c.checkpointed_size)}</td>
      <td class="num">${fmtBytes(c.state_size)}</td><td class="num">${fmtMs(w.barrier_ms)}</td>
      <td class="num">${fmtMs(w.sync_ms)}</td><td class="num">${fmtMs(w.async_ms)}</td>
      <td>${w.incremental ? 'yes' : 'no'}</td></tr>`;
  });
  $('checkpoint-history').tBodies[0].innerHTML = rows.length ? rows.join('') : '<tr><td colspan="11" class="empty">No checkpoints yet.</td></tr>';
  renderCheckpointChart(all.slice(0, CHART_BARS).reverse());
}

// Stacked bars (barrier, sync, async ms) per checkpoint, and checkpointed size as a line on the
// right axis.
function renderCheckpointChart(list) {
  const W = 1000, H = 220, L = 56, R = 64, T = 24, B = 28;
  const pw = W - L - R, ph = H - T - B;
  if (!list.length) { $('checkpoint-chart').innerHTML = ''; return; }
  const parts = (c) => { const w = c.weir || {}; return [w.barrier_ms || 0, w.sync_ms || 0, w.async_ms || 0]; };
  const maxMs = niceMax(Math.max(1, ...list.map((c) => parts(c).reduce((a, b) => a + b, 0))));
  // Round in the unit the labels show (KiB, MiB, ...), so that the ticks read well.
  const sizeTop = Math.max(1, ...list.map((c) => c.checkpointed_size || 0));
  const unit = Math.pow(1024, Math.floor(Math.log(sizeTop) / Math.log(1024)));
  const maxSize = niceMax(sizeTop / unit) * unit;
  const slot = pw / Math.max(list.length, 10);
  const bw = Math.max(3, slot * 0.62);
  const out = [];
  for (let i = 0; i <= 4; i++) {
    const y = T + ph - (ph * i) / 4;
    out.push(`<line class="grid" x1="${L}" x2="${W - R}" y1="${y}" y2="${y}"/>`);
    out.push(`<text x="${L - 6}" y="${y + 3}" text-anchor="end">${fmtMs((maxMs * i) / 4)}</text>`);
    out.push(`<text x="${W - R + 6}" y="${y + 3}">${fmtBytes((maxSize * i) / 4)}</text>`);
  }
  const colours = ['var(--barrier)', 'var(--sync)', 'var(--async)'];
  const pts = [];
  list.forEach((c, i) => {
    const x = L + slot * i + (slot - bw) / 2;
    let y = T + ph;
    parts(c).forEach((ms, k) => {
      const h = (ms / maxMs) * ph;
      y -= h;
      if (h > 0) out.push(`<rect x="${x}" y="${y}" width="${bw}" height="${h}" fill="${colours[k]}"/>`);
    });
    const failed = c.status === 'FAILED';
    out.push(`<rect x="${x}" y="${T}" width="${bw}" height="${ph}" fill="transparent"${failed ? ' stroke="#cf1322" stroke-dasharray="3 3"' : ''}>` +
      `<title>#${c.id} ${cpType(c)} ${c.status}: barrier ${fmtMs(parts(c)[0])}, sync ${fmtMs(parts(c)[1])}, async ${fmtMs(parts(c)[2])}, ` +
      `end to end ${fmtMs(c.end_to_end_duration)}, ${fmtBytes(c.checkpointed_size)}</title></rect>`);
    if (list.length <= 20 || i % Math.ceil(list.length / 20) === 0) {
      const sp = cpType(c) === 'SAVEPOINT' ? ' style="fill:var(--size);font-weight:700"' : '';
      out.push(`<text x="${x + bw / 2}" y="${H - B + 14}" text-anchor="middle"${sp}>${c.id}${sp ? ' SP' : ''}</text>`);
    }
    if (c.status === 'COMPLETED') pts.push(`${x + bw / 2},${T + ph - ((c.checkpointed_size || 0) / maxSize) * ph}`);
  });
  if (pts.length > 1) out.push(`<polyline class="size-line" points="${pts.join(' ')}"/>`);
  pts.forEach((p) => { const [x, y] = p.split(','); out.push(`<circle cx="${x}" cy="${y}" r="2.5" fill="var(--size)"/>`); });
  const keys = [['barrier', colours[0]], ['sync', colours[1]], ['async', colours[2]], ['checkpointed size', 'var(--size)']];
  keys.forEach(([k, col], i) => {
    out.push(`<rect x="${L + i * 110}" y="4" width="10" height="10" fill="${col}"/><text class="key" x="${L + i * 110 + 14}" y="13">${k}</text>`);
  });
  out.push(`<text x="${W - R}" y="13" text-anchor="end">duration (ms) by checkpoint id</text>`);
  $('checkpoint-chart').innerHTML = `<svg viewBox="0 0 ${W} ${H}" preserveAspectRatio="none">${out.join('')}</svg>`;
}

// A round number at least v whose quarters are round too: the axis has four ticks.
function niceMax(v) {
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 1.2, 1.6, 2, 2.4, 3, 4, 5, 6, 8, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}

function renderLatency(lat) {
  const el = $('latency');
  const verts = (lat && lat.vertices) || [];
  const rows = verts.map((v) => {
    const subs = (v.subtasks || []).filter((s) => s.count > 0);
    if (!subs.length) return null;
    const m = (k) => Math.max(...subs.map((s) => s[k]));
    return { name: v.name, p50: m('p50'), p95: m('p95'), p99: m('p99'), max: m('max'), count: subs.reduce((a, s) => a + s.count, 0) };
  }).filter(Boolean);
  if (!rows.length) {
    const off = lat && lat.interval_ms == null;
    el.innerHTML = `<div class="empty">${off ? 'Latency tracking is off (metrics.latency.interval).' : 'No latency samples yet.'}</div>`;
    return;
  }
  const top = Math.max(...rows.map((r) => r.p99), 0.001);
  el.innerHTML = `<table><thead><tr><th>Operator</th><th class="num">p50</th><th class="num">p95</th><th class="num">p99</th>
    <th class="num">max</th><th>p99</th><th class="num">samples</th></tr></thead><tbody>${rows.map((r) => `<tr>
    <td>${esc(r.name)}</td><td class="num">${fmtMs(r.p50)}</td><td class="num">${fmtMs(r.p95)}</td><td class="num">${fmtMs(r.p99)}</td>
    <td class="num">${fmtMs(r.max)}</td><td style="width:22%"><div class="bar"><i style="width:${(100 * r.p99) / top}%;background:var(--accent)"></i></div></td>
    <td class="num">${fmtCount(r.count)}</td></tr>`).join('')}</tbody></table>
    <div class="muted">Worst subtask of each operator over its last report intervals.</div>`;
}

function renderGpu(gpu) {
  const el = $('gpu');
  if (!gpu || gpu.available === false) {
    el.innerHTML = `<div class="empty">${gpu ? 'No GPU: this job runs on the CPU only.' : 'GPU figures unavailable.'}</div>`;
    return;
  }
  const budget = gpu.pool_budget_bytes || Math.max(gpu.pool_reserved_bytes || 0, 1);
  const pct = (b) => Math.min(100, (100 * (b || 0)) / budget).toFixed(2);
  const ops = gpu.operators || [];
  el.innerHTML = `<dl class="kv">
      <dt>Adapter</dt><dd>${esc(gpu.adapter)}</dd><dt>Backend</dt><dd>${esc(gpu.backend)}</dd>
      <dt>Device type</dt><dd>${esc(gpu.device_type)}</dd>
      <dt>Batches</dt><dd>${fmtCount(gpu.batches)} (${esc(gpu.batches_in_flight)} in flight)</dd>
      <dt>Transferred</dt><dd>${fmtBytes(gpu.bytes_up)} up · ${fmtBytes(gpu.bytes_down)} down</dd></dl>
    <div class="muted">Memory pool: ${fmtBytes(gpu.pool_in_use_bytes)} in use · ${fmtBytes(gpu.pool_reserved_bytes)} reserved ·
      ${fmtBytes(gpu.pool_budget_bytes)} budget · peak ${fmtBytes(gpu.pool_peak_bytes)}</div>
    <div class="bar pool"><i class="reserved" style="width:${pct(gpu.pool_reserved_bytes)}%"></i>
      <i class="inuse" style="width:${pct(gpu.pool_in_use_bytes)}%"></i><i class="peak" style="left:${pct(gpu.pool_peak_bytes)}%"></i></div>
    ${ops.length ? `<table><thead><tr><th>Operator</th><th class="num">Batches</th><th class="num">Kernel</th>
      <th class="num">Transfer</th><th class="num">S = T<sub>cpu</sub>/T<sub>gpu</sub></th></tr></thead><tbody>
      ${ops.map((o) => `<tr><td>${esc(o.name)}</td><td class="num">${fmtCount(o.batches)}</td><td class="num">${fmtMs(o.kernel_ms)}</td>
      <td class="num">${fmtMs(o.transfer_ms)}</td><td class="num">${o.speedup != null ? o.speedup.toFixed(2) + '×' : '—'}</td></tr>`).join('')}
      </tbody></table>` : '<div class="empty">No GPU operator has run a batch yet.</div>'}`;
}

// ---------- actions ----------

function updateButtons(jobState) {
  const off = state.busy || jobState !== 'RUNNING';
  for (const id of ['btn-savepoint', 'btn-stop', 'btn-cancel']) $(id).disabled = off;
}

function showAction(text, kind = '') {
  const el = $('action-status');
  el.hidden = false;
  el.className = 'action-status ' + kind;
  el.textContent = text;
}

function token() {
  let t = sessionStorage.getItem(TOKEN_KEY);
  if (!t) {
    t = (window.prompt('Bearer token of the REST API (in ~/.weir/rest-<port>.token on the job\'s machine):') || '').trim();
    if (!t) return null;
    sessionStorage.setItem(TOKEN_KEY, t);
  }
  return t;
}

async function post(path, body, method = 'POST') {
  const t = token();
  if (!t) throw new Error('no token given');
  const r = await fetch(path, {
    method, headers: { 'Content-Type': 'application/json', Authorization: 'Bearer ' + t }, body: body == null ? undefined : JSON.stringify(body),
  });
  let json = {};
  try { json = await r.json(); } catch (_) { /* empty body */ }
  if (r.status === 401) sessionStorage.removeItem(TOKEN_KEY); // ask again next time
  if (!r.ok) throw new Error(`${r.status}: ${(json.errors || [r.statusText]).join('; ')}`);
  return json;
}

// Polls an asynchronous operation (savepoint, stop) until it completes or fails.
async function follow(what, trigger) {
  const path = `/jobs/${encodeURIComponent(state.jid)}/savepoints/${encodeURIComponent(trigger)}`;
  for (;;) {
    let s;
    try { s = await getJson(path); } catch (e) {
      // After stop-with-savepoint the job may end and its server with it before the last poll.
      showAction(`${what}: trigger ${trigger}; status unknown (${e.message})`, 'bad');
      return;
    }
    const op = s.operation;
    if (s.status && s.status.id === 'COMPLETED') {
      if (op && op['failure-cause']) showAction(`${what} failed: ${op['failure-cause']['stack-trace']}`, 'bad');
      else showAction(`${what} completed${op && op.location ? ': ' + op.location : ''}`, 'good');
      return;
    }
    showAction(`${what}: in progress (trigger ${trigger})…`);
    await new Promise((res) => setTimeout(res, 700));
  }
}

async function act(what, fn) {
  if (!state.jid || state.busy) return;
  state.busy = true;
  updateButtons('busy');
  try {
    showAction(`${what}: sending…`);
    await fn(`/jobs/${encodeURIComponent(state.jid)}`);
  } catch (e) {
    showAction(`${what} refused: ${e.message}`, 'bad');
  } finally {
    state.busy = false;
    updateButtons(state.finished ? 'FINISHED' : $('job-state').textContent);
  }
}

function wireButtons() {
  $('btn-savepoint').onclick = () => act('Savepoint', async (base) => {
    const r = await post(`${base}/savepoints`, { 'target-directory': null, 'cancel-job': false, formatType: 'CANONICAL' });
    await follow('Savepoint', r['request-id']);
  });
  $('btn-stop').onclick = () => act('Stop with savepoint', async (base) => {
    if (!window.confirm('Stop the job with a savepoint?')) { showAction('Stop with savepoint: not sent'); return; }
    const r = await post(`${base}/stop`, { targetDirectory: null, drain: false });
    await follow('Stop with savepoint', r['request-id']);
  });
  $('btn-cancel').onclick = () => act('Cancel', async (base) => {
    if (!window.confirm('Cancel the job without a savepoint?')) { showAction('Cancel: not sent'); return; }
    await post(`${base}/cancel`, null);
    showAction('Cancel requested', 'good');
  });
}

wireButtons();
updateButtons('CREATED');
tick();
