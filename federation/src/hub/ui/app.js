// fedmesh hub web UI: a small single-page app over the hub's admin API (/api/v1/*).
//
// Everything the API returns is treated as hostile: span names, attributes and service names
// come from any OTLP sender. The DOM is therefore built only with createElement(NS) and
// textContent (see h() and s() below), never from HTML strings, and no attribute that could run
// code (on*, href with a scheme, style) is ever set from API data. The hub serves this file under
// a strict Content-Security-Policy, so there is no inline script or style anywhere either; the
// few computed geometries (bar positions, indentation) are set through the CSSOM.
'use strict';

const TOKEN_KEY = 'fedmesh.adminToken';
const PALETTE_SIZE = 8; // .c0 … .c7 in app.css
const GATEWAY_TAG = 'gateway';

// ---------------------------------------------------------------------------------------------
// DOM helpers

/** An HTML element with attributes and children (strings become text nodes). */
const h = (tag, attrs, ...children) => build(document.createElement(tag), attrs, children);
/** An SVG element, same conventions as h(). */
const s = (tag, attrs, ...children) => build(document.createElementNS('http://www.w3.org/2000/svg', tag), attrs, children);

function build(e, attrs, children) {
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === 'class') e.setAttribute('class', v);
    else if (k === 'dataset') Object.assign(e.dataset, v);
    else if (k.startsWith('on') && typeof v === 'function') e.addEventListener(k.slice(2), v);
    else if (k === 'style' || k.startsWith('on')) throw new Error('refusing attribute ' + k);
    else e.setAttribute(k, v === true ? '' : String(v));
  }
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

const $ = (sel) => document.querySelector(sel);

/** A link inside the app; `parts` are path segments, each URI-encoded. */
function appHref(...parts) {
  return '#/' + parts.map((p) => encodeURIComponent(p)).join('/');
}

// ---------------------------------------------------------------------------------------------
// Formatting

function fmtDuration(ns) {
  const n = Number(ns) || 0;
  if (n === 0) return '0';
  if (n < 1e3) return `${n} ns`;
  if (n < 1e6) return `${(n / 1e3).toFixed(n < 1e4 ? 1 : 0)} µs`;
  if (n < 1e9) return `${(n / 1e6).toFixed(n < 1e7 ? 2 : 1)} ms`;
  return `${(n / 1e9).toFixed(2)} s`;
}

function fmtMs(ms) {
  const n = Number(ms) || 0;
  return n >= 100 ? `${n.toFixed(0)} ms` : `${n.toFixed(n >= 10 ? 1 : 2)} ms`;
}

function fmtSignedMs(ns) {
  const ms = (Number(ns) || 0) / 1e6;
  return `${ms < 0 ? '−' : '+'}${Math.abs(ms).toFixed(2)} ms`;
}

function fmtRate(r) {
  const n = Number(r) || 0;
  if (n === 0) return '0';
  return n >= 100 ? n.toFixed(0) : n >= 1 ? n.toFixed(2) : n.toPrecision(2);
}

function fmtPercent(share) {
  const p = (Number(share) || 0) * 100;
  return p === 0 ? '0%' : p < 0.1 ? '<0.1%' : `${p.toFixed(p < 10 ? 1 : 0)}%`;
}

const pad = (n, w = 2) => String(n).padStart(w, '0');

/** Local wall-clock time of a Unix time in nanoseconds (with the date when not today). */
function fmtTime(unixNano) {
  const d = new Date(Number(unixNano) / 1e6);
  if (Number.isNaN(d.getTime())) return '?';
  const t = `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}.${pad(d.getMilliseconds(), 3)}`;
  const now = new Date();
  return d.toDateString() === now.toDateString()
    ? t
    : `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${t}`;
}

function fmtAgo(seconds) {
  if (seconds === null || seconds === undefined) return 'never';
  const n = Number(seconds);
  if (n < 60) return `${n} s ago`;
  if (n < 3600) return `${Math.floor(n / 60)} min ago`;
  if (n < 86400) return `${Math.floor(n / 3600)} h ago`;
  return `${Math.floor(n / 86400)} d ago`;
}

const plural = (n, one, many = one + 's') => `${n} ${n === 1 ? one : many}`;

/** `text` cut to `max` characters with an ellipsis (SVG labels cannot wrap). */
function clip(text, max) {
  const t = String(text);
  return t.length > max ? t.slice(0, max - 1) + '…' : t;
}

// ---------------------------------------------------------------------------------------------
// Token and API

class AuthError extends Error {}
class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

const getToken = () => sessionStorage.getItem(TOKEN_KEY) || '';
const setToken = (t) => sessionStorage.setItem(TOKEN_KEY, t);
const clearToken = () => sessionStorage.removeItem(TOKEN_KEY);

/** `/ui#token=…`: keep the token in this tab and take it out of the address bar at once. */
function takeTokenFromAddress() {
  const m = /^#token=([^&]*)/.exec(location.hash);
  if (!m) return;
  const t = safeDecode(m[1]).trim();
  if (t) setToken(t);
  history.replaceState(null, '', location.pathname + '#/');
}

/** The API's message from an error response (`{"error": "..."}`), or the status line. */
async function errorMessage(res) {
  let text = '';
  try {
    text = await res.text();
    const body = JSON.parse(text);
    if (body && typeof body.error === 'string' && body.error) return body.error;
  } catch {
    // not JSON: fall through to the text or status
  }
  const status = `HTTP ${res.status} ${res.statusText}`.trim();
  const brief = text.trim().slice(0, 300);
  return brief ? `${status}: ${brief}` : status;
}

/** GET an admin API path; throws AuthError on 401 (after forgetting the token), ApiError else. */
async function api(path, parse = JSON.parse) {
  const token = getToken();
  if (!token) throw new AuthError('');
  let res;
  try {
    res = await fetch(path, {
      headers: { Authorization: `Bearer ${token}`, Accept: 'application/json' },
      cache: 'no-store',
      credentials: 'omit',
    });
  } catch (e) {
    throw new ApiError(0, `Cannot reach the hub (${path}): ${e.message}`);
  }
  if (res.status === 401) {
    const msg = await errorMessage(res);
    clearToken();
    throw new AuthError(msg);
  }
  if (!res.ok) throw new ApiError(res.status, await errorMessage(res));
  try {
    return parse(await res.text());
  } catch (e) {
    throw new ApiError(res.status, `${path}: the hub sent a body that is not JSON`);
  }
}

// ---------------------------------------------------------------------------------------------
// Cluster colours: a stable palette by sorted cluster name (the hub's clusters plus any others
// the current view shows), so a cluster keeps its colour across views.

let knownClusters = [];

async function loadClusters() {
  const list = await api('/api/v1/clusters');
  knownClusters = [...new Set(list.map((c) => String(c.name)))].sort();
  return list;
}

/** `promise`, or `fallback` when it fails for any reason but a refused token. */
const orElse = (promise, fallback) => promise.catch((e) => {
  if (e instanceof AuthError) throw e;
  return fallback;
});
/** Loads the hub's cluster names for the palette; a failure only costs colour stability. */
const loadClusterNamesQuietly = () => orElse(loadClusters(), []);

function palette(extra = []) {
  const names = [...new Set([...knownClusters, ...extra.map(String)])].filter((n) => n).sort();
  const map = new Map(names.map((n, i) => [n, `c${i % PALETTE_SIZE}`]));
  return (name) => map.get(String(name)) || 'cu';
}

function clusterChip(name, colour, suffix) {
  const label = name ? String(name) : 'unknown';
  return h('span', { class: `chip ${colour(name)}`, title: `cluster ${label}` }, label, suffix ? ` ${suffix}` : null);
}

// ---------------------------------------------------------------------------------------------
// Page frame: banner, token form, navigation, routing

function showBanner(message) {
  const b = $('#banner');
  b.replaceChildren(h('strong', null, 'Error:'), h('span', { class: 'banner-text' }, String(message)),
    h('button', { type: 'button', class: 'btn small ghost', onclick: () => { b.hidden = true; } }, 'Dismiss'));
  b.hidden = false;
}

const clearBanner = () => { $('#banner').hidden = true; };

/** Shows the buttons that only make sense with a token. */
function showSessionControls(on) {
  $('#refresh').hidden = !on;
  $('#forget').hidden = !on;
  if (!on) $('#updated').textContent = '';
}

function showTokenForm(message) {
  document.title = 'Admin token · fedmesh hub';
  markNav(null);
  showSessionControls(false);
  const input = h('input', {
    type: 'password', id: 'token', name: 'token', autocomplete: 'off', required: true,
    spellcheck: 'false', 'data-testid': 'token-input', placeholder: 'admin token',
  });
  const form = h('form', { class: 'token-form', 'data-testid': 'token-form' },
    h('h1', null, 'Admin token needed'),
    message ? h('p', { class: 'notice fail', 'data-testid': 'token-error' }, `The hub refused the token: ${message}`) : null,
    h('p', null, 'The hub wrote its admin token to ', h('code', null, '<data-dir>/admin-token'),
      ' when it started. Paste it here; it is kept only in this browser tab.'),
    h('label', { for: 'token' }, 'Admin token'),
    h('div', { class: 'row' }, input, h('button', { type: 'submit', class: 'btn primary' }, 'Open')));
  form.addEventListener('submit', (ev) => {
    ev.preventDefault();
    const t = input.value.trim();
    if (!t) return;
    setToken(t);
    render();
  });
  $('#main').replaceChildren(form);
  input.focus();
}

function markNav(active) {
  for (const a of document.querySelectorAll('[data-nav]')) {
    if (a.dataset.nav === active) a.setAttribute('aria-current', 'page');
    else a.removeAttribute('aria-current');
  }
}

function safeDecode(part) {
  try { return decodeURIComponent(part); } catch { return part; }
}

/** The view a hash names: `#/`, `#/graph`, `#/traces?…`, `#/trace/ID`, `#/service/NS/NAME`. */
function parseRoute(hash) {
  let path = hash.replace(/^#/, '');
  let qs = '';
  const q = path.indexOf('?');
  if (q >= 0) {
    qs = path.slice(q + 1);
    path = path.slice(0, q);
  }
  const query = new URLSearchParams(qs);
  const parts = path.split('/').filter((p) => p).map(safeDecode);
  if (parts.length === 0) return { view: 'clusterset', nav: 'clusterset', query };
  if (parts[0] === 'graph' && parts.length === 1) return { view: 'graph', nav: 'graph', query };
  if (parts[0] === 'traces' && parts.length === 1) return { view: 'traces', nav: 'traces', query };
  if (parts[0] === 'rollouts' && parts.length === 1) return { view: 'rollouts', nav: 'rollouts', query };
  if (parts[0] === 'trace' && parts.length === 2) return { view: 'trace', nav: 'traces', id: parts[1], query };
  if (parts[0] === 'service' && parts.length === 3) {
    return { view: 'service', nav: 'clusterset', ns: parts[1], name: parts[2], query };
  }
  return { view: 'notfound', nav: null, query };
}

const VIEWS = {
  clusterset: viewClusterset,
  service: viewService,
  graph: viewGraph,
  traces: viewTraces,
  trace: viewTrace,
  rollouts: viewRollouts,
  notfound: async (v) => {
    v.title('Not found');
    return [h('h1', null, 'No such page'), h('p', null, 'Try the ', h('a', { href: '#/' }, 'clusterset overview'), '.')];
  },
};

let renderSeq = 0;

/** Renders the view the address names. A newer navigation makes older, slower renders moot. */
async function render() {
  const seq = ++renderSeq;
  clearBanner();
  const hash = location.hash;
  const route = parseRoute(hash);
  markNav(route.nav);
  if (!getToken()) {
    showTokenForm('');
    return;
  }
  showSessionControls(true);
  const main = $('#main');
  main.setAttribute('aria-busy', 'true');
  if (!main.querySelector('.view')) main.replaceChildren(h('p', { class: 'muted' }, 'Loading…'));
  const view = {
    alive: () => seq === renderSeq,
    title: (t) => { document.title = `${t} · fedmesh hub`; },
  };
  try {
    const content = await VIEWS[route.view](view, route);
    if (!view.alive()) return;
    main.replaceChildren(h('div', { class: `view view-${route.view}`, 'data-route': hash }, content));
    $('#updated').textContent = `updated ${fmtTime(Date.now() * 1e6).slice(-12, -4)}`;
  } catch (e) {
    if (!view.alive()) return;
    if (e instanceof AuthError) {
      showTokenForm(e.message);
      return;
    }
    showBanner(e.message || String(e));
    main.replaceChildren(h('div', { class: 'view', 'data-route': hash }, h('p', { class: 'muted' },
      'This view could not be loaded (the reason is above). Refresh to try again, or go back to the ',
      h('a', { href: '#/' }, 'clusterset'), '.')));
  } finally {
    if (seq === renderSeq) main.removeAttribute('aria-busy');
  }
}

// ---------------------------------------------------------------------------------------------
// Clusterset overview (#/)

/** The one word that best describes how the hub sees a cluster, and its badge class. */
function clusterState(c) {
  if (c.expired) return ['expired', 'fail', 'silent too long: its exports are withdrawn'];
  if (c.stale) return ['stale', 'warn', 'not heard from recently: its exports stay routable for now'];
  if (!c.connected) return ['disconnected', 'warn', 'no control plane holds a stream to the hub'];
  return ['fresh', 'ok', 'connected and heard from recently'];
}

function countOf(v) {
  if (Array.isArray(v)) return v.length;
  if (typeof v === 'number') return v;
  if (v && typeof v === 'object') return Object.keys(v).length;
  return v ? 1 : 0;
}

function kv(label, ...value) {
  return [h('dt', null, label), h('dd', null, ...value)];
}

function clusterCard(c, colour) {
  const [word, cls, why] = clusterState(c);
  const behind = Number(c.acked_version) < Number(c.published_version);
  const gateways = (c.gateways || []).map((g) => h('code', { class: 'gw' }, String(g)));
  const problems = c.problems || [];
  return h('article', { class: `card cluster-card ${colour(c.name)}`, 'data-testid': 'cluster-card', 'data-cluster': String(c.name) },
    h('header', { class: 'card-head' },
      h('span', { class: `swatch ${colour(c.name)}` }),
      h('h3', null, String(c.name)),
      h('span', { class: `badge ${cls}`, title: why, 'data-testid': 'cluster-state' }, word)),
    h('dl', { class: 'kv' },
      kv('Trust domain', h('code', null, String(c.trust_domain ?? ''))),
      kv('Region', c.region ? String(c.region) : h('span', { class: 'muted' }, 'none')),
      kv('Last seen', h('span', { title: c.last_seen ? String(c.last_seen) : '' }, fmtAgo(c.seconds_since_seen))),
      kv('Gateways', gateways.length ? gateways : h('span', { class: 'muted' }, 'none')),
      kv('Bundle', c.bundle_sequence === null || c.bundle_sequence === undefined
        ? h('span', { class: 'muted' }, 'none yet') : `sequence ${c.bundle_sequence}`),
      kv('Exports', String(c.exports ?? 0)),
      kv('Config', `published v${c.published_version}, acked v${c.acked_version}`,
        behind ? h('span', { class: 'badge warn', title: 'the cluster has not acknowledged the newest view yet' }, 'behind') : null),
      kv('Protocol', `v${c.protocol_version}`),
      c.hub_replica ? kv('Hub replica', String(c.hub_replica)) : null),
    problems.length
      ? h('div', { class: 'problems' },
        h('h4', null, plural(problems.length, 'problem')),
        h('ul', null, problems.map((p) => h('li', null,
          h('strong', null, `${p.kind} ${p.name}`), ` ${p.condition}: ${p.reason}`,
          p.message ? h('div', { class: 'muted' }, String(p.message)) : null,
          (p.services || []).length ? h('div', { class: 'small' }, 'services: ', (p.services || []).join(', ')) : null))))
      : null);
}

function portsText(ports) {
  return (ports || []).map((p) => `${p.name ? p.name + ' ' : ''}${p.port}/${p.protocol}`).join(', ');
}

function splitService(key) {
  const k = String(key);
  const i = k.indexOf('/');
  return i < 0 ? ['', k] : [k.slice(0, i), k.slice(i + 1)];
}

function exporterChips(svc, colour) {
  return (svc.clusters || []).map((e) => {
    const full = e.ready_endpoints === e.total_endpoints && e.total_endpoints > 0;
    const chip = clusterChip(e.cluster, colour, `${e.ready_endpoints}/${e.total_endpoints}`);
    chip.title = `${e.cluster}: ${e.ready_endpoints} of ${e.total_endpoints} endpoints ready${e.stale ? ' (stale)' : ''}`;
    return h('span', { class: 'exporter' }, chip,
      e.stale ? h('span', { class: 'badge warn' }, 'stale') : null,
      full ? null : h('span', { class: 'badge fail' }, e.total_endpoints ? 'not all ready' : 'no endpoints'));
  });
}

function servicesTable(services, colour) {
  if (!services.length) return h('p', { class: 'empty' }, 'No services are exported yet. A cluster exports a service with a ServiceExport; every joined cluster then imports it.');
  return h('table', { class: 'table' },
    h('thead', null, h('tr', null, ['Service', 'Type', 'Ports', 'Exported by', 'Conflicts'].map((t) => h('th', null, t)))),
    h('tbody', null, services.map((svc) => {
      const [ns, name] = splitService(svc.service);
      const conflicts = svc.conflicts || [];
      return h('tr', { class: conflicts.length ? 'conflict' : null, 'data-testid': 'service-row' },
        h('td', null, h('a', { href: appHref('service', ns, name) }, String(svc.service))),
        h('td', null, String(svc.type)),
        h('td', null, portsText(svc.ports)),
        h('td', null, exporterChips(svc, colour)),
        h('td', null, conflicts.length
          ? h('ul', { class: 'plain' }, conflicts.map((c) => h('li', { class: 'fail-text' },
            `${c.cluster}: ${c.field} (winner ${c.winner})`, c.message ? h('div', { class: 'small' }, String(c.message)) : null)))
          : h('span', { class: 'muted' }, 'none')));
    })));
}

function bundlesTable(bundles, colour) {
  if (!bundles.length) return h('p', { class: 'empty' }, 'The hub holds no trust bundles yet.');
  return h('table', { class: 'table' },
    h('thead', null, h('tr', null, h('th', null, 'Trust domain'), h('th', null, 'Cluster'),
      ['Sequence', 'X.509 authorities', 'JWT authorities'].map((t) => h('th', { class: 'num' }, t)))),
    h('tbody', null, bundles.map((b) => h('tr', null,
      h('td', null, h('code', null, String(b.trust_domain))),
      h('td', null, clusterChip(b.cluster, colour)),
      h('td', { class: 'num' }, String(b.sequence)),
      h('td', { class: 'num' }, String(countOf(b.x509_authorities))),
      h('td', { class: 'num' }, String(countOf(b.jwt_authorities)))))));
}

async function viewClusterset(v) {
  v.title('Clusterset');
  const [clusters, services, bundles] = await Promise.all([
    loadClusters(), api('/api/v1/services'), api('/api/v1/bundles')]);
  const colour = palette();
  const connected = clusters.filter((c) => clusterState(c)[0] === 'fresh').length;
  return [
    h('h1', null, 'Clusterset'),
    h('p', { class: 'lead' }, `${plural(clusters.length, 'cluster')} joined, ${connected} fresh; ${plural(services.length, 'service')} exported.`),
    clusters.length
      ? h('div', { class: 'cards' }, clusters.map((c) => clusterCard(c, colour)))
      : h('p', { class: 'empty' }, 'No cluster has joined yet. Create a join token (POST /api/v1/tokens) and run the agent in a cluster.'),
    h('h2', null, 'Services'),
    servicesTable(services, colour),
    h('h2', null, 'Trust bundles'),
    bundlesTable(bundles, colour),
  ];
}

// ---------------------------------------------------------------------------------------------
// Service page (#/service/NS/NAME)

const MARKS = { ok: '✓', warn: '!', fail: '✗' };

function explainCard(cluster, result, colour) {
  if (result.status === 'rejected') {
    return h('article', { class: 'card explain', 'data-testid': 'explain', 'data-cluster': cluster },
      h('header', { class: 'card-head' }, h('h3', null, 'From ', clusterChip(cluster, colour)), h('span', { class: 'badge fail' }, 'error')),
      h('p', { class: 'fail-text' }, result.reason.message || String(result.reason)));
  }
  const x = result.value;
  return h('article', { class: 'card explain', 'data-testid': 'explain', 'data-cluster': cluster },
    h('header', { class: 'card-head' },
      h('h3', null, 'From ', clusterChip(cluster, colour)),
      h('span', { class: `badge ${x.routable ? 'ok' : 'fail'}` }, x.routable ? 'routable' : 'not routable')),
    h('ol', { class: 'steps' }, (x.steps || []).map((st) => {
      const status = MARKS[st.status] ? st.status : 'warn';
      return h('li', { class: `step ${status}` },
        h('span', { class: `mark ${status}`, title: status }, MARKS[status]), h('span', null, String(st.message)));
    })));
}

async function viewService(v, route) {
  const key = `${route.ns}/${route.name}`;
  v.title(`Service ${key}`);
  const [clusters, services] = await Promise.all([loadClusters(), api('/api/v1/services')]);
  const colour = palette();
  const svc = services.find((x) => x.service === key);
  const names = clusters.map((c) => String(c.name));
  const explains = await Promise.allSettled(names.map((c) =>
    api(`/api/v1/explain?service=${encodeURIComponent(key)}&from=${encodeURIComponent(c)}`)));
  const auth = explains.find((r) => r.status === 'rejected' && r.reason instanceof AuthError);
  if (auth) throw auth.reason;

  const head = [
    h('p', { class: 'crumbs' }, h('a', { href: '#/' }, 'Clusterset'), ' › service'),
    h('h1', null, 'Service ', h('code', null, key)),
    h('p', { class: 'actions' },
      h('a', { class: 'btn', href: `#/traces?service=${encodeURIComponent(route.name)}` }, `Traces of ${route.name}`),
      h('a', { class: 'btn ghost', href: '#/graph' }, 'Service graph')),
  ];
  let body;
  if (!svc) {
    body = [h('p', { class: 'notice warn' }, `No cluster exports ${key} (or it was withdrawn). What each cluster would do with it:`)];
  } else {
    const conflicts = svc.conflicts || [];
    body = [
      h('dl', { class: 'kv wide' }, kv('Type', String(svc.type)), kv('Ports', portsText(svc.ports) || 'none')),
      conflicts.length ? h('div', { class: 'notice fail' }, h('strong', null, plural(conflicts.length, 'conflict')),
        h('ul', null, conflicts.map((c) => h('li', null, `${c.cluster}: ${c.field} differs (winner ${c.winner})`,
          c.message ? ` — ${c.message}` : '')))) : null,
      h('h2', null, 'Exported by'),
      h('table', { class: 'table' },
        h('thead', null, h('tr', null, h('th', null, 'Cluster'), h('th', { class: 'num' }, 'Ready endpoints'),
          ['Localities', 'State', 'Exported'].map((t) => h('th', null, t)))),
        h('tbody', null, (svc.clusters || []).map((e) => h('tr', null,
          h('td', null, clusterChip(e.cluster, colour)),
          h('td', { class: e.ready_endpoints < e.total_endpoints || !e.total_endpoints ? 'num fail-text' : 'num' },
            `${e.ready_endpoints} / ${e.total_endpoints}`),
          h('td', null, (e.localities || []).join(', ') || h('span', { class: 'muted' }, 'none')),
          h('td', null, e.stale ? h('span', { class: 'badge warn' }, 'stale') : h('span', { class: 'badge ok' }, 'fresh')),
          h('td', null, e.exported_unix ? fmtTime(Number(e.exported_unix) * 1e9).replace(/\.000$/, '') : '?'))))),
    ];
  }
  return [head, body,
    h('h2', null, 'Explain: how each cluster routes to it'),
    names.length
      ? h('div', { class: 'cards' }, names.map((c, i) => explainCard(c, explains[i], colour)))
      : h('p', { class: 'empty' }, 'No clusters have joined.')];
}

// ---------------------------------------------------------------------------------------------
// Service graph (#/graph)

const G = { boxW: 220, nodeW: 184, nodeH: 42, nodeGap: 24, pad: 24, head: 40, margin: 16 };

/** Deterministic layout: one column per cluster (sorted), nodes stacked by name. */
function layoutGraph(graph) {
  // Clusters with services in the window, by name; an unknown cluster ("") last.
  const clusterNames = [...new Set(graph.nodes.map((n) => String(n.cluster)))]
    .sort((a, b) => (a === '') - (b === '') || a.localeCompare(b));
  const byCluster = new Map(clusterNames.map((c) => [c, []]));
  for (const n of graph.nodes) byCluster.get(String(n.cluster)).push(n);
  const rows = Math.max(1, ...[...byCluster.values()].map((l) => l.length));
  const gap = clusterNames.length > 3 ? 200 : 250; // many clusters: narrower gaps (the SVG also scales to fit)
  const boxH = G.head + G.pad + rows * (G.nodeH + G.nodeGap);
  const boxes = [];
  const pos = new Map();
  clusterNames.forEach((c, col) => {
    const x = G.margin + col * (G.boxW + gap);
    boxes.push({ cluster: c, x, y: G.margin, w: G.boxW, h: boxH, col });
    byCluster.get(c).sort((a, b) => String(a.id).localeCompare(String(b.id))).forEach((n, i) => {
      pos.set(n.id, { node: n, col, x: x + (G.boxW - G.nodeW) / 2, y: G.margin + G.head + i * (G.nodeH + G.nodeGap), w: G.nodeW, h: G.nodeH });
    });
  });
  const width = G.margin * 2 + clusterNames.length * G.boxW + Math.max(0, clusterNames.length - 1) * gap;
  return { boxes, pos, width, height: boxH + G.margin * 2 };
}

/**
 * The path of an edge between two laid-out nodes, and where its label goes. Between clusters
 * the edge curves to the target's height, then runs straight into it: the label sits on that
 * straight part, so labels of edges to different services never overlap. Within a cluster the
 * edge bulges out to the right of the nodes.
 */
function edgeGeometry(a, b, labelW) {
  const ay = a.y + a.h / 2;
  const by = b.y + b.h / 2;
  if (a === b) {
    const x = a.x + a.w;
    return { d: `M${x},${ay - 8} C${x + 60},${ay - 40} ${x + 60},${ay + 40} ${x},${ay + 8}`, lx: x + 50 + labelW / 2, ly: ay };
  }
  if (a.col === b.col) {
    const x = a.x + a.w;
    const bulge = 46 + Math.abs(by - ay) / 4;
    return { d: `M${x},${ay} C${x + bulge},${ay} ${x + bulge},${by} ${x},${by}`, lx: x + bulge * 0.75 + labelW / 2 + 4, ly: (ay + by) / 2 };
  }
  const dir = a.col < b.col ? 1 : -1;
  const off = -5 * dir; // A→B and B→A do not overlap
  const x1 = dir > 0 ? a.x + a.w : a.x;
  const x2 = dir > 0 ? b.x : b.x + b.w;
  const xs = x2 - dir * (labelW + 30); // where the straight part begins
  const dx = (xs - x1) / 2;
  const y1 = ay + off;
  const y2 = by + off;
  return {
    d: `M${x1},${y1} C${x1 + dx},${y1} ${xs - dx},${y2} ${xs},${y2} L${x2},${y2}`,
    lx: xs + dir * (labelW / 2 + 6), ly: y2,
  };
}

function edgeClass(e, cross) {
  const err = Number(e.error_share) || 0;
  if (err >= 0.05) return 'err-high';
  if (err > 0) return 'err-some';
  return cross ? 'cross' : 'plain';
}

function edgeDetails(e, nodes) {
  const name = (id) => {
    const n = nodes.get(id);
    return n ? `${n.service}${n.namespace ? '.' + n.namespace : ''} (${n.cluster || 'unknown cluster'})` : String(id);
  };
  const list = (items, none) => ((items || []).length
    ? h('ul', { class: 'plain' }, items.map((x) => h('li', null, h('code', null, String(x)))))
    : h('span', { class: 'muted' }, none));
  return [
    h('h3', null, `${name(e.source)} → ${name(e.target)}`),
    h('dl', { class: 'kv' },
      kv('Protocol', String(e.protocol)),
      kv('Requests', `≈ ${fmtRate(e.requests)} (${fmtRate(e.requests_per_second)}/s), from ${plural(e.sampled, 'kept span')}`),
      kv('Errors', fmtPercent(e.error_share)),
      kv('Latency', `p50 ${fmtMs(e.p50_ms)}, p99 ${fmtMs(e.p99_ms)}`),
      kv('Callers', list(e.callers, 'not recorded')),
      kv('Callees', list(e.callees, 'none reached (the requests failed before a server answered)')),
      kv('Gateways', list(e.gateways, 'none (direct)'))),
  ];
}

function drawGraph(graph, colour, info) {
  const L = layoutGraph(graph);
  const nodes = new Map(graph.nodes.map((n) => [n.id, n]));
  const hint = h('p', { class: 'muted' }, 'Hover over or click an edge to see who called whom, and through which gateways.');
  let pinned = null;
  const showInfo = (e) => info.replaceChildren(...(e ? edgeDetails(e, nodes) : [hint]));
  showInfo(null);

  const marker = (id) => s('marker', { id: `arrow-${id}`, class: `arrow ${id}`, viewBox: '0 0 10 10', refX: '9', refY: '5', markerUnits: 'userSpaceOnUse', markerWidth: '12', markerHeight: '12', orient: 'auto-start-reverse' },
    s('path', { d: 'M0,0 L10,5 L0,10 z' }));
  const svg = s('svg', { class: 'graph', viewBox: `0 0 ${L.width} ${L.height}`, role: 'img', 'aria-label': 'Service graph' },
    s('defs', null, ['plain', 'cross', 'err-some', 'err-high'].map(marker)));
  // Natural size at most; a narrower window scales it down to 70 %, then scrolls.
  svg.style.maxWidth = `${L.width}px`;
  svg.style.minWidth = `${Math.round(L.width * 0.7)}px`;

  for (const b of L.boxes) {
    svg.append(s('g', { class: `cluster-box ${colour(b.cluster)}`, 'data-testid': 'cluster-box', 'data-cluster': b.cluster },
      s('rect', { x: b.x, y: b.y, width: b.w, height: b.h, rx: 10 }),
      s('text', { class: 'cluster-label', x: b.x + 12, y: b.y + 24 }, clip(b.cluster || 'unknown cluster', 28))));
  }

  const placed = []; // label boxes already drawn, to keep labels from overlapping
  const edgeLayer = s('g', { class: 'edges' });
  for (const e of graph.edges) {
    const a = L.pos.get(e.source);
    const b = L.pos.get(e.target);
    if (!a || !b) continue;
    const cross = a.node.cluster !== b.node.cluster;
    const cls = edgeClass(e, cross);
    const line1 = `${fmtRate(e.requests_per_second)} req/s`;
    const line2 = `${fmtPercent(e.error_share)} err · p99 ${fmtMs(e.p99_ms)}`;
    const lw = Math.max(line1.length, line2.length) * 6.2 + 12;
    const geo = edgeGeometry(a, b, lw);
    const lh = 30;
    let ly = geo.ly - lh / 2;
    const lx = geo.lx - lw / 2;
    while (placed.some((p) => lx < p.x + p.w && p.x < lx + lw && ly < p.y + p.h && p.y < ly + lh)) ly += 6;
    placed.push({ x: lx, y: ly, w: lw, h: lh });
    const g = s('g', {
      class: `edge ${cls}${cross ? ' is-cross' : ''}`, tabindex: '0', 'data-testid': 'graph-edge',
      'data-source': String(e.source), 'data-target': String(e.target), 'data-cross': cross ? 'true' : 'false',
    },
    s('title', null, `${e.source} → ${e.target}: ${line1}, ${line2}`),
    s('path', { class: 'edge-line', d: geo.d, 'marker-end': `url(#arrow-${cls})` }),
    s('path', { class: 'edge-hit', d: geo.d }),
    s('g', { class: 'edge-label' },
      s('rect', { x: lx, y: ly, width: lw, height: lh, rx: 4 }),
      s('text', { x: lx + 5, y: ly + 12 }, line1),
      s('text', { x: lx + 5, y: ly + 25 }, line2)));
    g.addEventListener('mouseenter', () => showInfo(e));
    g.addEventListener('mouseleave', () => showInfo(pinned));
    g.addEventListener('focus', () => showInfo(e));
    g.addEventListener('click', () => {
      for (const x of svg.querySelectorAll('.edge.selected')) x.classList.remove('selected');
      pinned = pinned === e ? null : e;
      if (pinned) g.classList.add('selected');
      showInfo(pinned);
    });
    edgeLayer.append(g);
  }

  for (const p of L.pos.values()) {
    const n = p.node;
    svg.append(s('g', { class: `node ${colour(n.cluster)}`, 'data-testid': 'graph-node', 'data-id': String(n.id), 'data-cluster': String(n.cluster) },
      s('title', null, String(n.id)),
      s('rect', { x: p.x, y: p.y, width: p.w, height: p.h, rx: 6 }),
      s('text', { class: 'node-name', x: p.x + 10, y: p.y + 18 }, clip(n.service, 22)),
      s('text', { class: 'node-ns', x: p.x + 10, y: p.y + 33 }, clip(n.namespace ? `ns ${n.namespace}` : 'no namespace', 28))));
  }
  svg.append(edgeLayer); // edges (and their labels) above the nodes
  return svg;
}

async function viewGraph(v, route) {
  v.title('Service graph');
  const allowed = ['5', '15', '60'];
  const minutes = allowed.includes(route.query.get('minutes')) ? route.query.get('minutes') : '15';
  const [graph, , rollouts] = await Promise.all([api(`/api/v1/graph?minutes=${minutes}`), loadClusterNamesQuietly(),
    orElse(api('/api/v1/rollouts'), [])]);
  graph.nodes = graph.nodes || [];
  graph.edges = graph.edges || [];
  const colour = palette(graph.nodes.map((n) => n.cluster));
  const select = h('select', { id: 'window', 'data-testid': 'graph-window' },
    allowed.map((m) => h('option', { value: m, selected: m === minutes }, `last ${m} minutes`)));
  select.addEventListener('change', () => { location.hash = `#/graph?minutes=${select.value}`; });
  const info = h('aside', { class: 'edge-info card', 'data-testid': 'edge-info' });
  const head = [
    h('div', { class: 'title-row' }, h('h1', null, 'Service graph'), h('label', { class: 'inline' }, 'Window ', select)),
    h('p', { class: 'lead' }, `Requests between services in the last ${minutes} minutes, from ${plural(graph.spans, 'kept client span')}; `
      + 'rates are estimates (sampled spans count for the requests they stand for).'),
    rolloutStrip(rollouts, colour),
  ];
  if (!graph.edges.length) {
    return [head, h('p', { class: 'empty' }, `No requests between services were recorded in the last ${minutes} minutes. `
      + 'The graph is drawn from the traces the hub keeps (a sample of requests plus every failed or slow one): '
      + 'send traffic through the mesh, or choose a longer window.')];
  }
  const idle = knownClusters.filter((c) => !graph.nodes.some((n) => n.cluster === c));
  return [head,
    idle.length ? h('p', { class: 'muted' }, `No requests recorded from or to: ${idle.join(', ')}.`) : null,
    h('div', { class: 'legend' },
      h('span', { class: 'leg plain' }, 'same cluster'), h('span', { class: 'leg cross' }, 'cross-cluster'),
      h('span', { class: 'leg err-some' }, 'some errors'), h('span', { class: 'leg err-high' }, '≥ 5% errors')),
    h('div', { class: 'graph-wrap' }, drawGraph(graph, colour, info)),
    info];
}

// ---------------------------------------------------------------------------------------------
// Rollouts (#/rollouts): every Rollout of the clusterset, cluster by cluster, and its timeline

/** A phase's badge class. */
function phaseClass(phase) {
  if (phase === 'Promoted') return 'ok';
  if (phase === 'RolledBack' || phase === 'Aborted' || phase === 'Invalid') return 'fail';
  if (phase === 'Progressing') return 'info';
  return 'warn';
}

/** Beside the service graph: each rollout and where it stands in each cluster. */
function rolloutStrip(rollouts, colour) {
  if (!rollouts || !rollouts.length) return null;
  return h('aside', { class: 'card rollout-strip', 'data-testid': 'graph-rollouts' },
    h('strong', null, 'Rollouts '),
    rollouts.map((r) => h('span', { class: 'rollout-chip' },
      h('a', { href: '#/rollouts' }, `${r.rollout} → ${r.canary}`), ' ',
      (r.clusters || []).map((c) => clusterChip(c.cluster, colour, `${c.phase} ${c.canary_weight}%`)))));
}

function fmtNumbers(d) {
  if (d.success_rate === null || d.success_rate === undefined || !d.requests) return '';
  const p99 = d.latency_p99_ms === null || d.latency_p99_ms === undefined ? '' : `, p99 ${Number(d.latency_p99_ms).toFixed(1)} ms`;
  return `${d.requests} requests, ${Number(d.success_rate).toFixed(2)}% success${p99}`;
}

async function viewRollouts(v) {
  v.title('Rollouts');
  const [rollouts] = await Promise.all([api('/api/v1/rollouts'), loadClusterNamesQuietly()]);
  const head = [h('h1', null, 'Rollouts'),
    h('p', { class: 'lead' }, 'Every Rollout of the clusterset as each cluster\'s control plane reports it every 2 s: where it stands in each '
      + 'cluster, and every decision with the numbers it was made on (the canary\'s requests as its callers\' sidecars measured them).')];
  if (!rollouts.length) {
    return [head, h('p', { class: 'empty' }, 'No rollouts. Write a Rollout (fedmesh.io/v1alpha1) in a cluster; its control plane reports it here.')];
  }
  const colour = palette(rollouts.flatMap((r) => (r.clusters || []).map((c) => c.cluster)));
  return [head, rollouts.map((r) => {
    const clusters = r.clusters || [];
    const timeline = clusters.flatMap((c) => (c.decisions || []).map((d) => ({ ...d, cluster: c.cluster })))
      .sort((a, b) => (a.time < b.time ? 1 : a.time > b.time ? -1 : 0));
    return h('section', { class: 'card rollout', 'data-testid': 'rollout' },
      h('h2', null, `${r.rollout}: ${r.stable} → ${r.canary}`, ' ',
        h('span', { class: 'badge info' }, r.waves ? 'in waves' : 'one cluster each')),
      h('table', { class: 'table' },
        h('thead', null, h('tr', null, ['Wave', 'Cluster', 'Phase', 'Step', 'Canary', 'Step analysis', 'Gate'].map((t) => h('th', null, t)))),
        h('tbody', null, clusters.map((c) => h('tr', { 'data-testid': 'rollout-cluster' },
          h('td', null, r.waves ? String(c.wave) : '-'),
          h('td', null, clusterChip(c.cluster, colour)),
          h('td', null, h('span', { class: `badge ${phaseClass(c.phase)}` }, String(c.phase))),
          h('td', null, `${Math.min(c.step + 1, c.steps)}/${c.steps}`),
          h('td', null, `${c.canary_weight}%`),
          h('td', null, fmtNumbers(c) || h('span', { class: 'muted' }, 'no requests yet')),
          h('td', null, c.gate ? [h('span', { class: `badge ${c.gate === 'GO' ? 'ok' : c.gate === 'HOLD' ? 'warn' : 'fail'}` }, String(c.gate)),
            c.reason ? h('div', { class: 'small muted' }, String(c.reason)) : null] : h('span', { class: 'muted' }, '-')))))),
      h('h3', null, 'Timeline'),
      h('ol', { class: 'timeline', 'data-testid': 'rollout-timeline' }, timeline.map((d) => h('li', { 'data-testid': 'rollout-decision' },
        h('span', { class: 'muted small' }, String(d.time)), ' ',
        clusterChip(d.cluster, colour), ' ',
        h('span', { class: `badge ${phaseClass(d.action === 'Advanced' || d.action === 'Started' || d.action === 'Resumed' ? 'Progressing' : d.action)}` }, String(d.action)), ' ',
        h('strong', null, `${d.canary_weight}% to the canary`), ' ',
        fmtNumbers(d) ? h('span', { class: 'small' }, `(${fmtNumbers(d)})`) : null,
        h('div', { class: 'small' }, String(d.message))))));
  })];
}

// ---------------------------------------------------------------------------------------------
// Trace search (#/traces?service=…&cluster=…&error=true&min_duration_ms=…&limit=…)

const TRACE_PARAMS = ['service', 'cluster', 'error', 'min_duration_ms', 'limit'];

function traceForm(query, clusterNames, serviceNames) {
  const service = h('input', { name: 'service', id: 'q-service', list: 'service-names', value: query.get('service') || '', placeholder: 'any', autocomplete: 'off' });
  const cluster = h('select', { name: 'cluster', id: 'q-cluster' },
    h('option', { value: '' }, 'any'),
    clusterNames.map((c) => h('option', { value: c, selected: c === query.get('cluster') }, c)));
  const errors = h('input', { type: 'checkbox', name: 'error', id: 'q-error', checked: query.get('error') === 'true' });
  const minDur = h('input', { type: 'number', name: 'min_duration_ms', id: 'q-min', min: '0', step: 'any', value: query.get('min_duration_ms') || '', placeholder: '0' });
  const limit = h('select', { name: 'limit', id: 'q-limit' },
    ['20', '50', '100', '200'].map((n) => h('option', { value: n, selected: n === (query.get('limit') || '50') }, n)));
  const form = h('form', { class: 'search', 'data-testid': 'trace-search' },
    h('datalist', { id: 'service-names' }, serviceNames.map((n) => h('option', { value: n }))),
    h('label', { for: 'q-service' }, 'Service', service),
    h('label', { for: 'q-cluster' }, 'Cluster', cluster),
    h('label', { for: 'q-min' }, 'Min duration (ms)', minDur),
    h('label', { for: 'q-limit' }, 'Show', limit),
    h('label', { for: 'q-error', class: 'check' }, errors, 'Errors only'),
    h('button', { type: 'submit', class: 'btn primary' }, 'Search'));
  form.addEventListener('submit', (ev) => {
    ev.preventDefault();
    const q = new URLSearchParams();
    if (service.value.trim()) q.set('service', service.value.trim());
    if (cluster.value) q.set('cluster', cluster.value);
    if (errors.checked) q.set('error', 'true');
    if (minDur.value.trim()) q.set('min_duration_ms', minDur.value.trim());
    if (limit.value !== '50') q.set('limit', limit.value);
    const next = `#/traces${q.toString() ? '?' + q : ''}`;
    if (location.hash === next) render();
    else location.hash = next;
  });
  return form;
}

function traceRow(t, colour) {
  const clusters = t.clusters || [];
  const href = appHref('trace', t.trace_id);
  const open = (ev) => { if (!ev.target.closest('a')) location.hash = href; }; // the whole row opens it
  return h('tr', { onclick: open, class: t.error ? 'trace-row has-error' : 'trace-row', 'data-testid': 'trace-row', 'data-trace-id': String(t.trace_id), 'data-cluster-count': String(clusters.length) },
    h('td', { class: 'nowrap' }, fmtTime(t.start_unix_nano)),
    h('td', null, h('a', { href }, String(t.root || '(no root span)'))),
    h('td', null, clusters.map((c) => clusterChip(c, colour))),
    h('td', { class: 'services' }, (t.services || []).join(', ')),
    h('td', { class: 'num' }, String(t.spans)),
    h('td', { class: 'num' }, fmtDuration(t.duration_ns)),
    h('td', null, t.error ? h('span', { class: 'badge fail' }, 'error') : h('span', { class: 'muted' }, '—')));
}

async function viewTraces(v, route) {
  v.title('Traces');
  const q = new URLSearchParams();
  for (const k of TRACE_PARAMS) {
    const val = route.query.get(k);
    if (val) q.set(k, val);
  }
  if (!q.has('limit')) q.set('limit', '50');
  const [traces, clusters, services] = await Promise.all([
    api(`/api/v1/traces?${q}`),
    orElse(loadClusters(), []),
    orElse(api('/api/v1/services'), []),
  ]);
  const colour = palette(traces.flatMap((t) => t.clusters || []));
  const serviceNames = [...new Set(services.map((x) => splitService(x.service)[1]))].sort();
  const form = traceForm(route.query, clusters.map((c) => String(c.name)).sort(), serviceNames);
  const results = traces.length
    ? h('table', { class: 'table traces', 'data-testid': 'trace-results' },
      h('thead', null, h('tr', null, ['Start', 'Root', 'Clusters', 'Services'].map((t) => h('th', null, t)),
        h('th', { class: 'num' }, 'Spans'), h('th', { class: 'num' }, 'Duration'), h('th', null, 'Error'))),
      h('tbody', null, traces.map((t) => traceRow(t, colour))))
    : h('p', { class: 'empty' }, 'No traces match. The hub keeps a sample of requests (1% by default) plus every failed or slow one, '
      + 'for a limited window: loosen the search or wait for traffic.');
  return [h('h1', null, 'Traces'), form,
    h('p', { class: 'muted' }, `${plural(traces.length, 'trace')}, newest first.`), results];
}

// ---------------------------------------------------------------------------------------------
// Trace waterfall (#/trace/ID)

/** The skew line above the waterfall, and the offset of each cluster's clock (ns). */
function describeSkew(skewResult, clusters) {
  if (skewResult.status === 'rejected') {
    return { text: `Clock skew not estimated (${skewResult.reason.message}); spans are shown as recorded.`, offset: () => 0 };
  }
  const sk = skewResult.value || {};
  const offsets = (sk.offsets || []).filter((o) => o && o.cluster);
  const uncorrected = sk.uncorrected || [];
  const map = new Map(offsets.map((o) => [String(o.cluster), Number(o.offset_ns) || 0]));
  let text;
  if (offsets.length) {
    const pairs = offsets.reduce((n, o) => n + (Number(o.pairs) || 0), 0);
    text = `Clock skew estimated from ${plural(pairs, 'client/server pair')} and corrected: `
      + offsets.map((o) => `${o.cluster} ${fmtSignedMs(o.offset_ns)}`).join(', ')
      + ` relative to ${sk.reference}.`;
  } else if (clusters.length <= 1) {
    text = 'No clock skew correction needed: the trace stayed in one cluster.';
  } else {
    text = 'No clock skew correction possible: no client/server pair crosses clusters.';
  }
  if (offsets.length && uncorrected.length) {
    text += ` Shown as recorded (no pair links them to ${sk.reference}): ${uncorrected.join(', ')}.`;
  }
  return { text, offset: (c) => map.get(String(c)) || 0 };
}

/** The spans in tree order with depths; spans whose parent is missing are roots. */
function spanTree(spans, start) {
  const byId = new Map();
  for (const sp of spans) if (!byId.has(sp.span_id)) byId.set(sp.span_id, sp);
  const kids = new Map();
  const roots = [];
  for (const sp of spans) {
    const p = sp.parent_span_id;
    if (p && p !== sp.span_id && byId.has(p)) {
      if (!kids.has(p)) kids.set(p, []);
      kids.get(p).push(sp);
    } else {
      roots.push(sp);
    }
  }
  const order = (a, b) => start(a) - start(b) || String(a.name).localeCompare(String(b.name));
  const out = [];
  const seen = new Set();
  const walk = (sp, depth) => { // iterative-safe: `seen` breaks parent cycles in hostile data
    if (seen.has(sp)) return;
    seen.add(sp);
    out.push({ span: sp, depth });
    for (const k of (kids.get(sp.span_id) || []).sort(order)) walk(k, depth + 1);
  };
  for (const r of roots.sort(order)) walk(r, 0);
  for (const sp of spans) if (!seen.has(sp)) walk(sp, 0); // members of a parent cycle
  return out;
}

const isGateway = (sp) => (sp.resource || {})['fedmesh.proxy'] === GATEWAY_TAG;

function fmtBytes(v) {
  const n = Number(v);
  if (!Number.isFinite(n)) return '?';
  return n < 1024 ? `${n} B` : n < 1048576 ? `${(n / 1024).toFixed(1)} KiB` : `${(n / 1048576).toFixed(1)} MiB`;
}

/** What a span did, in a few words: the request line and its answer. */
function spanSummary(sp) {
  const a = sp.attributes || {};
  const parts = [];
  if (a['rpc.service'] || a['rpc.method']) parts.push(`${a['rpc.service'] || ''}/${a['rpc.method'] || ''}`);
  else if (a['http.request.method'] || a['url.path']) parts.push(`${a['http.request.method'] || ''} ${a['url.path'] || ''}`.trim());
  if (a['server.address'] && sp.kind === 'client') parts.push(`→ ${a['server.address']}`);
  if (a['http.response.status_code'] !== undefined) parts.push(`HTTP ${a['http.response.status_code']}`);
  if (a['rpc.grpc.status_code'] !== undefined) parts.push(`grpc ${a['rpc.grpc.status_code']}`);
  return parts.join(' ');
}

/** The badges of a span row: errors, gateway hop, retries, failover, route and backend. */
function spanBadges(sp, ctx) {
  const a = sp.attributes || {};
  const out = [];
  if (sp.error) out.push(h('span', { class: 'badge fail', title: 'error.type / status' }, `error: ${sp.error}`));
  if (a['fedmesh.proxy_error'] && a['fedmesh.proxy_error'] !== sp.error) out.push(h('span', { class: 'badge fail' }, `proxy: ${a['fedmesh.proxy_error']}`));
  if (isGateway(sp)) {
    const sni = a['tls.client.server_name'] || '?';
    const ep = a['fedmesh.endpoint'] || (a['fedmesh.admitted'] === 'false' ? `refused: ${a['fedmesh.refusal'] || '?'}` : '?');
    const bytes = a['fedmesh.bytes.received'] !== undefined
      ? `${fmtBytes(a['fedmesh.bytes.received'])} in / ${fmtBytes(a['fedmesh.bytes.sent'])} out` : 'bytes not recorded yet';
    out.push(h('span', { class: 'badge gateway', 'data-testid': 'gateway-hop' }, `gateway hop: SNI ${sni} / endpoint ${ep} / ${bytes}`));
  }
  const attempts = Number(a['fedmesh.attempts']);
  if (attempts > 1) {
    out.push(h('span', { class: 'badge warn', title: a['fedmesh.tried'] ? `tried ${a['fedmesh.tried']}` : '' }, `retried: ${attempts} attempts`));
  }
  if (sp.kind === 'client') {
    const src = a['fedmesh.source.cluster'] || sp.cluster;
    const dst = a['fedmesh.destination.cluster'];
    const tier = a['fedmesh.locality'];
    if (dst && src && dst !== src) {
      out.push(h('span', { class: 'badge failover', title: `served by cluster ${dst}, not the caller's own (${src})${tier ? '; locality tier ' + tier : ''}` },
        `failover → ${dst}${tier ? ` (${tier})` : ''}`));
    } else if (tier && tier !== 'same-zone') {
      out.push(h('span', { class: 'badge failover', title: 'served outside the caller\'s zone' }, `failover: ${tier}`));
    }
  }
  if (a['fedmesh.route']) out.push(h('span', { class: 'badge info' }, `route ${a['fedmesh.route']}`));
  if (a['fedmesh.backend']) out.push(h('span', { class: 'badge info' }, `backend ${a['fedmesh.backend']}`));
  // The connection through the remote gateway: opened by this request (the gateway span is its
  // child) or an earlier one (then this span links to it).
  const conn = a['fedmesh.connection.id'];
  if (conn && !isGateway(sp)) {
    const gw = ctx.byId.get(conn);
    if (gw && gw.parent_span_id === sp.span_id) {
      out.push(h('span', { class: 'badge info' }, `opened gateway connection ${conn}`));
    } else {
      const link = (sp.links || []).map(String).find((l) => l.endsWith(`-${conn}`));
      const traceId = link ? link.split('-')[0] : '';
      const target = gw ? ctx.jump(conn) : traceId && traceId !== ctx.traceId ? appHref('trace', traceId) : null;
      const text = `rode gateway connection ${conn} (opened by an earlier request${traceId && traceId !== ctx.traceId ? ' in another trace' : ''})`;
      out.push(target
        ? h('a', { class: 'badge info link', href: target, onclick: (ev) => ev.stopPropagation() }, text)
        : h('span', { class: 'badge info' }, text));
    }
  }
  return out;
}

function kvTable(title, obj) {
  const keys = Object.keys(obj || {}).sort();
  return h('div', { class: 'kv-block' }, h('h4', null, title),
    keys.length
      ? h('table', { class: 'attrs' }, h('tbody', null, keys.map((k) => h('tr', null, h('th', null, k), h('td', null, String(obj[k]))))))
      : h('p', { class: 'muted' }, 'none'));
}

function spanDetails(sp, offset) {
  const off = offset(sp.cluster);
  return h('div', { class: 'span-details', 'data-testid': 'span-details' },
    kvTable('Span', {
      name: sp.name, 'span id': sp.span_id, 'parent span id': sp.parent_span_id || '(root)', kind: sp.kind,
      service: sp.service, cluster: sp.cluster, 'start (recorded)': `${fmtTime(sp.start_unix_nano)} (${sp.start_unix_nano} ns)`,
      ...(off ? { 'start (corrected)': `${fmtTime(Number(sp.start_unix_nano) - off)} (${fmtSignedMs(-off)})` } : {}),
      duration: fmtDuration(sp.duration_ns), error: sp.error ?? 'none', links: (sp.links || []).join(', ') || 'none',
    }),
    kvTable('Attributes', sp.attributes),
    kvTable('Resource', sp.resource));
}

/**
 * Parses a trace's spans keeping `start_unix_nano` exact: Unix nanoseconds exceed 2^53, so they
 * are quoted before JSON.parse turns them into rounded doubles. (Inside JSON strings a quote is
 * always escaped, so the pattern only matches the real field.)
 */
function parseSpans(text) {
  return JSON.parse(text.replace(/"start_unix_nano":\s*(\d+)/g, '"start_unix_nano":"$1"'));
}

function toBigInt(v) {
  try { return BigInt(v); } catch { return 0n; }
}

/** The waterfall's header: the time axis with ticks at fifths of the trace. */
function timeAxis(total, count) {
  return h('div', { class: 'wf-axis' }, h('div', { class: 'wf-label muted' }, plural(count, 'span')),
    h('div', { class: 'wf-time' }, [0, 1, 2, 3, 4, 5].map((i) => {
      const t = h('span', { class: i === 5 ? 'tick last' : 'tick' }, fmtDuration((total * i) / 5));
      t.style.left = `${i * 20}%`;
      return t;
    })));
}

/** One span's row: label indented by depth, its bar on the time axis, badges; click for details. */
function spanRow(sp, depth, ctx) {
  const gw = isGateway(sp);
  const colour = ctx.colour(sp.cluster);
  const left = ((ctx.start(sp) - ctx.t0) / ctx.total) * 100;
  const width = ((Number(sp.duration_ns) || 0) / ctx.total) * 100;
  const bar = h('div', { class: `bar ${colour}${sp.error ? ' error' : ''}${gw ? ' gateway' : ''}`, title: `${sp.cluster}: ${fmtDuration(sp.duration_ns)}` });
  bar.style.left = `${Math.min(100, Math.max(0, left))}%`;
  bar.style.width = `${Math.max(0, Math.min(width, 100 - left))}%`;
  const dur = h('span', { class: 'bar-text' }, fmtDuration(sp.duration_ns));
  dur.style.left = `${Math.min(100, Math.max(0, left + width))}%`;
  const label = h('div', { class: 'wf-label' },
    h('span', { class: 'twisty', 'aria-hidden': 'true' }, '▸'),
    h('span', { class: `chip ${colour}`, title: `cluster ${sp.cluster}` }, String(sp.service || '?')),
    h('span', { class: 'span-name' }, String(sp.name)),
    h('span', { class: 'kind' }, String(sp.kind)),
    sp.error ? h('span', { class: 'err-mark', title: 'error' }, '✗') : null);
  label.style.paddingLeft = `${6 + depth * 16}px`;
  const summary = spanSummary(sp);
  const badges = spanBadges(sp, ctx);
  const sub = summary || badges.length
    ? h('div', { class: 'wf-sub' }, summary ? h('span', { class: 'summary' }, summary) : null, badges) : null;
  if (sub) sub.style.paddingLeft = `${28 + depth * 16}px`;
  const row = h('div', {
    class: `span-row${sp.error ? ' has-error' : ''}${gw ? ' is-gateway' : ''}`, 'data-testid': 'span-row', tabindex: '0',
    role: 'button', 'aria-expanded': 'false', 'data-cluster': String(sp.cluster), 'data-kind': String(sp.kind),
    'data-gateway': gw ? 'true' : null, 'data-span-id': String(sp.span_id),
  }, h('div', { class: 'wf-main' }, label, h('div', { class: 'wf-time' }, bar, dur)), sub);
  let details = null;
  const toggle = () => {
    if (details) details.remove();
    details = details ? null : spanDetails(sp, ctx.skew.offset);
    if (details) row.after(details);
    row.setAttribute('aria-expanded', details ? 'true' : 'false');
    row.classList.toggle('open', Boolean(details));
  };
  row.addEventListener('click', toggle);
  row.addEventListener('keydown', (ev) => {
    if (ev.key !== 'Enter' && ev.key !== ' ') return;
    ev.preventDefault();
    toggle();
  });
  return { row, toggle };
}

async function viewTrace(v, route) {
  const id = String(route.id);
  v.title(`Trace ${id.slice(0, 8)}`);
  const path = `/api/v1/traces/${encodeURIComponent(id)}`;
  const [spansR, skewR] = await Promise.allSettled([api(path, parseSpans), api(`${path}/skew`), loadClusterNamesQuietly()]);
  if (spansR.status === 'rejected') throw spansR.reason;
  if (skewR.status === 'rejected' && skewR.reason instanceof AuthError) throw skewR.reason;
  const spans = Array.isArray(spansR.value) ? spansR.value : [];
  const clusters = [...new Set(spans.map((sp) => String(sp.cluster)))].sort();
  const colour = palette(clusters);
  const skew = describeSkew(skewR, clusters);
  // Starts as exact nanoseconds after the earliest recorded one, then moved onto the reference
  // cluster's clock; t0 … t1 is the time axis.
  const big = new Map(spans.map((sp) => [sp, toBigInt(sp.start_unix_nano)]));
  const base = spans.length ? [...big.values()].reduce((m, b) => (b < m ? b : m)) : 0n;
  const start = (sp) => Number(big.get(sp) - base) - skew.offset(sp.cluster);
  let t0 = Infinity;
  let t1 = -Infinity;
  for (const sp of spans) {
    t0 = Math.min(t0, start(sp));
    t1 = Math.max(t1, start(sp) + (Number(sp.duration_ns) || 0));
  }
  if (!spans.length) t0 = t1 = 0;
  const total = Math.max(1, t1 - t0);
  const tree = spanTree(spans, start);
  const root = tree.length ? tree[0].span : null;
  const errors = spans.filter((sp) => sp.error).length;

  const ctx = {
    traceId: id, colour, skew, start, t0, total,
    byId: new Map(spans.map((sp) => [sp.span_id, sp])),
    jump: (spanId) => `#/trace/${encodeURIComponent(id)}?span=${encodeURIComponent(spanId)}`,
  };
  const rows = h('div', { class: 'waterfall', 'data-testid': 'waterfall' }, timeAxis(total, spans.length));
  const rowById = new Map();
  for (const { span: sp, depth } of tree) {
    const r = spanRow(sp, depth, ctx);
    if (!rowById.has(sp.span_id)) rowById.set(sp.span_id, r);
    rows.append(r.row);
  }
  // `?span=ID` (from a "rode gateway connection" link): open that span and bring it into view.
  const focus = rowById.get(route.query.get('span'));
  if (focus) {
    focus.toggle();
    focus.row.classList.add('focused');
    setTimeout(() => focus.row.scrollIntoView({ block: 'center' }), 0);
  }

  return [
    h('p', { class: 'crumbs' }, h('a', { href: '#/traces' }, 'Traces'), ' › trace'),
    h('h1', null, 'Trace ', root ? `${root.service}: ${root.name}` : ''),
    h('p', { class: 'lead' }, h('code', null, id), ` · ${fmtTime(Number(base) + t0)} · ${fmtDuration(total)} · ${plural(spans.length, 'span')}`,
      ` · ${plural(clusters.length, 'cluster')}`, errors ? h('span', { class: 'badge fail' }, plural(errors, 'error')) : null),
    h('div', { class: 'legend', 'data-testid': 'legend' }, h('span', { class: 'muted' }, 'Clusters: '),
      clusters.map((c) => h('span', { class: 'legend-item' }, h('span', { class: `swatch ${colour(c)}` }), c || 'unknown'))),
    h('p', { class: 'skew', 'data-testid': 'skew' }, skew.text),
    spans.length ? rows : h('p', { class: 'empty' }, 'The trace has no spans.'),
    h('p', { class: 'muted small' }, 'Click a span to see all of its attributes.'),
  ];
}

// ---------------------------------------------------------------------------------------------
// Start

function start() {
  takeTokenFromAddress();
  window.addEventListener('hashchange', () => {
    if (/^#token=/.test(location.hash)) takeTokenFromAddress();
    render();
  });
  $('#refresh').addEventListener('click', () => render());
  $('#forget').addEventListener('click', () => {
    clearToken();
    showTokenForm('');
  });
  render();
}

start();
