// The syft-router dashboard: vanilla JS over /dashboard/api (JSON) and /dashboard/events (SSE).
// The session cookie is HttpOnly; the page keeps only the CSRF token it is given.
'use strict';

const $ = (sel) => document.querySelector(sel);
const MIN = 60e6, HOUR = 3600e6, DAY = 86400e6;
const RANGES = {
  '1h': { span: HOUR, by: 'minute', step: MIN },
  '24h': { span: DAY, by: 'hour', step: HOUR },
  '7d': { span: 7 * DAY, by: 'hour', step: HOUR },
  '30d': { span: 30 * DAY, by: 'day', step: DAY },
};
const state = { me: null, csrf: '', currency: 'USD', source: null, charts: {},
  transfers: { pages: [''], status: '' }, history: { pages: [''] }, liveIds: new Set(),
  refreshTimer: null, selectedEndpoint: '' };

class HttpError extends Error {
  constructor(status, detail) { super(detail); this.status = status; }
}

async function api(path, body) {
  const init = { credentials: 'same-origin', headers: { Accept: 'application/json' } };
  if (body !== undefined) {
    init.method = 'POST';
    init.headers['Content-Type'] = 'application/json';
    init.headers['X-CSRF-Token'] = state.csrf;
    init.body = JSON.stringify(body);
  }
  const resp = await fetch(path, init);
  const data = await resp.json().catch(() => ({}));
  if (!resp.ok) {
    if (resp.status === 401 && path !== '/dashboard/login') showSignIn();
    throw new HttpError(resp.status, data.detail || resp.statusText);
  }
  return data;
}

function money(micros, currency) {
  const fmt = new Intl.NumberFormat(undefined, { style: 'currency', currency: currency || state.currency,
    minimumFractionDigits: 2, maximumFractionDigits: 6 });
  return fmt.format((micros || 0) / 1e6);
}
const count = (n) => new Intl.NumberFormat().format(n || 0);
// Never 100 % with a failure nor 0 % with a success: rounded toward the side it is not on.
const pct = (r) => {
  const v = 100 * (r || 0);
  const shown = v >= 99.95 && v < 100 ? 99.9 : (v > 0 && v < 0.05 ? 0.1 : Math.round(v * 10) / 10);
  return `${new Intl.NumberFormat(undefined, { minimumFractionDigits: 1, maximumFractionDigits: 1 }).format(shown)} %`;
};
// The browser's time, with its zone named: the revenue of "today" is the UTC day's, and a time
// without a zone could be read as either.
// (Named fields: `dateStyle` cannot be combined with `timeZoneName`, Intl throws.)
const when = (micros) => (micros ? new Date(micros / 1000).toLocaleString(undefined,
  { year: 'numeric', month: 'numeric', day: 'numeric', hour: 'numeric', minute: '2-digit',
    second: '2-digit', timeZoneName: 'short' }) : '–');
// A live row's time: the time alone when it is today's, else with its date.
const whenLive = (micros) => {
  const d = new Date(micros / 1000);
  return d.toDateString() === new Date().toDateString()
    ? d.toLocaleTimeString(undefined, { timeZoneName: 'short' }) : when(micros);
};

function setMoney(sel, micros) {
  const el = $(sel);
  el.textContent = money(micros);
  el.dataset.micros = String(micros || 0);
}

function cell(text, cls) {
  const td = document.createElement('td');
  td.textContent = text;
  if (cls) td.className = cls;
  return td;
}

function row(cells) {
  const tr = document.createElement('tr');
  cells.forEach((c) => tr.appendChild(c instanceof Node ? c : cell(c)));
  return tr;
}

function fill(sel, rows, empty) {
  const body = $(`${sel} tbody`);
  body.replaceChildren(...rows);
  if (!rows.length) {
    const td = cell(empty || 'Nothing yet', 'empty');
    td.colSpan = $(`${sel} thead tr`).children.length;
    body.appendChild(row([td]));
  }
}

// Why the sign-in form is back, carried over the reload that clears the previous account's page.
const NOTE = 'syft-dashboard-note';

function showSignIn() {
  if (state.source) { state.source.close(); state.source = null; }
  if (state.me) {
    // Signed in until now (the session ended or was refused): a fresh page, so nothing of this
    // account (its alert endpoints, a signing secret just shown, its tables) is left for whoever
    // signs in next in this tab.
    state.me = null;
    sessionStorage.setItem(NOTE, 'Your session ended: sign in again.');
    window.location.reload();
    return;
  }
  $('#app').hidden = true;
  $('#who').hidden = true;
  $('#signin').hidden = false;
  $('#signin-error').textContent = sessionStorage.getItem(NOTE) || '';
  sessionStorage.removeItem(NOTE);
}

async function start() {
  const me = await api('/dashboard/api/me');
  if (!me.signed_in) { showSignIn(); return; }
  state.me = me;
  state.csrf = me.csrf;
  state.currency = me.currency;
  $('#signin').hidden = true;
  $('#app').hidden = false;
  $('#who').hidden = false;
  $('#who-email').textContent = me.admin ? 'admin (every account)' : me.email;
  $('#tab-user').hidden = me.admin;
  $('#tab-alerts').hidden = me.admin;
  connectLive();
  await refreshAll();
}

async function refreshAll() {
  await Promise.all([refreshMoney(), refreshOwner(), loadTransfers(), loadLive()]);
  if (!state.me.admin) await Promise.all([refreshUser(), loadAlerts()]);
  document.body.dataset.loaded = 'true';
}

async function refreshMoney() {
  if (state.me.admin) {
    ['#balance', '#held', '#available'].forEach((s) => { $(s).textContent = '–'; });
    return;
  }
  const me = await api('/dashboard/api/me');
  setMoney('#balance', me.balance_micros);
  setMoney('#held', me.held_micros);
  setMoney('#available', me.available_micros);
}

function stats(params) {
  return api(`/dashboard/api/stats?${new URLSearchParams(params)}`);
}

// The start of the range's first whole bucket.
const startOf = (now, range) => String(Math.floor((now - range.span) / range.step) * range.step);

const total = (s) => (s.groups[0] ? s.groups[0].measures : {});

async function refreshOwner() {
  const now = Date.now() * 1000;
  const today = Math.floor(now / DAY) * DAY;
  const range = RANGES[$('#range').value];
  // The range starts at a whole bucket (a day for 30 days, an hour for 7 days), so the chart's
  // first bucket is whole and the ledger reads whole rollup buckets (docs/analytics.md).
  const since = startOf(now, range);
  // Each panel stands alone: an answer refused (more groups than one answer holds, e.g. users a
  // free router's callers named at will) empties its own panel with the reason, where it used to
  // leave the whole page, the user tab and the alerts unloaded.
  const answers = await Promise.allSettled([
    stats({ role: 'owner', since: String(today) }),
    stats({ role: 'owner', since: String(now - 7 * DAY) }),
    stats({ role: 'owner', since: String(now - 30 * DAY) }),
    stats({ role: 'owner', since, group_by: range.by }),
    stats({ role: 'owner', since }),
    stats({ role: 'owner', since, group_by: 'app,endpoint' }),
    // The ten biggest users, ranked by the ledger (so a range with more than 10,000 users still
    // has them), with spend and requests only: no percentiles to compute per user.
    ...['revenue', 'requests'].map((by) => stats({ role: 'owner', since, group_by: 'user',
      sums_only: 'true', top: '10', top_by: by })),
  ]);
  const signedOut = answers.find((a) => a.status === 'rejected' && a.reason instanceof HttpError
    && a.reason.status === 401);
  if (signedOut) throw signedOut.reason;
  answers.filter((a) => a.status === 'rejected').forEach((a) => report(a.reason));
  const [day, week, month, series, all, byApp, bySpend] = answers.map((a) => a.value);
  const refused = (a) => `Not shown: ${a.reason.message || a.reason}`;
  // A figure whose answer was refused shows '–', not the previous range's value.
  [['#rev-today', day], ['#rev-7d', week], ['#rev-30d', month]].forEach(([sel, s]) => {
    if (s) setMoney(sel, total(s).revenue_micros); else $(sel).textContent = '–';
  });
  // Given back after capture (revenue still counts the charge): the owner's refunds.
  if (month) setMoney('#refunded-30d', month.refunded_micros); else $('#refunded-30d').textContent = '–';
  $('#requests-range').textContent = all ? count(total(all).requests) : '–';
  $('#success-range').textContent = all && total(all).requests ? pct(total(all).success_rate) : '–';
  // A refused or failed answer empties the charts, with the reason: they kept the previous
  // range's lines under the new range's name.
  if (series) drawOwnerCharts(series, range); else clearOwnerCharts(refused(answers[3]));
  fill('#by-app', byApp ? byApp.groups.map((g) => row([appName(byApp, g), g.key[1] || '/',
    count(g.measures.requests), pct(g.measures.success_rate), count(g.measures.total_tokens),
    String(g.measures.latency_ms.p95), money(g.measures.revenue_micros, byApp.currency)])) : [],
  byApp ? undefined : refused(answers[5]));
  const top = (answer, measure, show) => (answer.value ? answer.value.groups
    .map((g) => row([g.key[0] || '(anonymous)', show(g.measures[measure])])) : []);
  const why = (answer) => (answer.value ? undefined : refused(answer));
  fill('#top-spend', top(answers[6], 'revenue_micros', (m) => money(m, bySpend.currency)),
    why(answers[6]));
  fill('#top-requests', top(answers[7], 'requests', count), why(answers[7]));
}

// An app's name, with its owner where the answer holds apps of several owners (the admin's view):
// two owners may name an app alike, and the ledger keeps their figures apart.
function appName(answer, g, at = 0) {
  const name = g.key[at] || '(none)';
  const owners = new Set(answer.groups.map((x) => x.app_owner));
  return owners.size > 1 && g.app_owner ? `${name} (${g.app_owner})` : name;
}

// Every bucket of the range, so a quiet hour draws as zero instead of a line across it.
function buckets(s, range) {
  const xs = [];
  for (let t = Math.floor(s.since / range.step) * range.step; t < s.until; t += range.step) xs.push(t);
  return xs;
}

function byTime(s) {
  const m = new Map();
  s.groups.forEach((g) => m.set(g.key[0], g.measures));
  return m;
}

function chart(id, labels, data, opts) {
  const el = $(id);
  if (state.charts[id]) state.charts[id].destroy();
  // A reason left by `clearOwnerCharts` goes with the chart that replaces it.
  el.textContent = '';
  const width = Math.max(200, el.clientWidth || el.parentElement.clientWidth || 300);
  const colors = ['#2563eb', '#dc2626', '#16a34a', '#9333ea', '#ea580c', '#0891b2'];
  // Sparse series (no value in quiet buckets) join their points and show them.
  const sparse = opts && opts.sparse;
  const series = [{}].concat(labels.map((label, i) => ({ label, stroke: colors[i % colors.length],
    width: 2, value: opts && opts.value, spanGaps: !!sparse, points: { show: sparse ? true : undefined } })));
  state.charts[id] = new uPlot({ width, height: 200, series, legend: { live: false },
    axes: [{}, { size: 60 }], scales: { x: { time: true }, y: opts && opts.yRange ? { range: opts.yRange } : {} } }, data, el);
  // A screen reader hears the figures, not only "a chart": each series' latest, highest and,
  // for counts, total value over the range.
  el.setAttribute('role', 'img');
  el.setAttribute('aria-label', `${el.dataset.title}: ${summary(labels, data, opts)}`);
}

function summary(labels, data, opts) {
  const show = (v) => (opts && opts.value ? opts.value(null, v) : count(Math.round(v * 10) / 10));
  const [xs] = data;
  if (!xs.length) return 'no data in this range';
  const from = when(xs[0] * 1e6);
  const parts = labels.map((label, i) => {
    const ys = data[i + 1].map((v, j) => [v, j]).filter(([v]) => v != null);
    if (!ys.length) return `${label}: no values`;
    const [top, at] = ys.reduce((a, b) => (b[0] > a[0] ? b : a));
    const total = ys.reduce((a, [v]) => a + v, 0);
    const sum = opts && opts.summed ? `, total ${show(total)}` : '';
    return `${label}: latest ${show(ys[ys.length - 1][0])}, highest ${show(top)} at ${when(xs[at] * 1e6)}${sum}`;
  });
  return `from ${from}. ${parts.join('; ')}`;
}

const OWNER_CHARTS = ['#chart-requests', '#chart-success', '#chart-tokens', '#chart-latency'];

function clearOwnerCharts(why) {
  OWNER_CHARTS.forEach((id) => {
    if (state.charts[id]) state.charts[id].destroy();
    delete state.charts[id];
    // Text, not an image: a screen reader was told a chart was there.
    $(id).removeAttribute('role');
    $(id).removeAttribute('aria-label');
    $(id).textContent = why;
  });
}

function drawOwnerCharts(s, range) {
  const xs = buckets(s, range);
  const m = byTime(s);
  const get = (f) => xs.map((x) => (m.has(x) ? f(m.get(x)) : null));
  const t = xs.map((x) => x / 1e6);
  const zero = (f) => xs.map((x) => (m.has(x) ? f(m.get(x)) : 0));
  chart('#chart-requests', ['requests', 'failures'], [t, zero((v) => v.requests), zero((v) => v.failures)], { summed: true });
  chart('#chart-success', ['success %'], [t, get((v) => 100 * v.success_rate)], { sparse: true, yRange: [0, 100] });
  chart('#chart-tokens', ['prompt', 'completion'], [t, zero((v) => v.prompt_tokens), zero((v) => v.completion_tokens)], { summed: true });
  chart('#chart-latency', ['p50', 'p95', 'p99'], [t, get((v) => v.latency_ms.p50), get((v) => v.latency_ms.p95), get((v) => v.latency_ms.p99)], { sparse: true });
}

// Most apps the spend chart draws; the rest are summed as one series.
const MAX_SPEND_SERIES = 8;

async function refreshUser() {
  // The tokens (with their Revoke buttons) and the history load whatever the chart does: any
  // account can record usage rows naming this user (docs/design.md, "Known gaps"), enough of them
  // to make the split by app too large to answer.
  await Promise.all([refreshSpend().catch(report), loadTokens(), loadHistory()]);
}

async function refreshSpend() {
  const now = Date.now() * 1000;
  const range = RANGES[$('#range').value];
  const since = startOf(now, range);
  const s = await stats({ role: 'user', since, group_by: `${range.by},app` })
    .catch((e) => {
      if (e instanceof HttpError && e.status === 401) throw e;
      return stats({ role: 'user', since, group_by: range.by });
    });
  const xs = buckets(s, range);
  // Only apps this user spent money at are drawn (rows of free requests, or rows recorded in
  // this user's name by others, cost nothing), the biggest first.
  const byApp = new Map();
  // A payer may pay two owners whose apps share a name: the series are named with the owner.
  const appOf = (g) => (g.key.length > 1 ? `${g.key[1]} (${g.app_owner})` : 'all apps');
  s.groups.forEach((g) => {
    const app = appOf(g);
    byApp.set(app, (byApp.get(app) || 0) + g.measures.revenue_micros);
  });
  const ranked = [...byApp].filter(([, v]) => v > 0).sort((a, b) => b[1] - a[1]).map(([a]) => a);
  const shown = ranked.slice(0, MAX_SPEND_SERIES);
  const other = ranked.length > shown.length ? 'other apps' : null;
  const seriesOf = (app) => (shown.includes(app) ? app : other);
  const spend = new Map();
  s.groups.forEach((g) => {
    const series = seriesOf(appOf(g));
    if (!series) return;
    const k = `${g.key[0]}|${series}`;
    spend.set(k, (spend.get(k) || 0) + g.measures.revenue_micros / 1e6);
  });
  const labels = other ? shown.concat([other]) : shown;
  const data = [xs.map((x) => x / 1e6)].concat(labels.map((a) => xs.map((x) => spend.get(`${x}|${a}`) || 0)));
  chart('#chart-spend', labels.length ? labels : ['spend'], labels.length ? data : [data[0], xs.map(() => 0)],
    { value: (u, v) => (v == null ? '–' : money(v * 1e6)), summed: true });
}

async function loadTokens() {
  // The tokens this user issued (the ones they can revoke): any account can issue tokens naming
  // anyone as their recipient, and 100 of those used to push the user's own off the list.
  const { tokens } = await api('/dashboard/api/tokens?role=sender&page_size=100');
  const now = Date.now() * 1000;
  fill('#tokens', tokens.map((t) => {
    const active = !t.revoked_at && !(t.expires_at && t.expires_at <= now);
    const action = document.createElement('td');
    if (active && t.sender_email === state.me.email) {
      const b = document.createElement('button');
      b.type = 'button';
      b.textContent = 'Revoke';
      b.setAttribute('aria-label', `Revoke token ${t.id}`);
      b.addEventListener('click', () => revoke(t.id));
      action.appendChild(b);
    }
    // A token id (a UUIDv7) begins with its creation time, so tokens issued minutes apart showed
    // the same first characters: the random end is shown, the whole id on hover.
    const id = cell(`…${t.id.slice(-8)}`);
    id.title = t.id;
    return row([id, t.sender_email, t.recipient_email,
      t.spend_limit_micros == null ? 'none' : money(t.spend_limit_micros, t.currency),
      t.limit_per_day_micros == null ? 'none' : money(t.limit_per_day_micros, t.currency),
      money(t.spent_micros, t.currency), t.expires_at ? when(t.expires_at) : 'never',
      t.revoked_at ? 'revoked' : (active ? 'active' : 'expired'), action]);
  }), 'No tokens');
}

async function revoke(id) {
  if (!window.confirm('Revoke this token? Routers holding it can no longer charge it.')) return;
  await api('/dashboard/api/tokens/revoke', { id });
  await loadTokens();
  // Its button went with its row: focus stays in the table, not back at the page's top.
  focusTable('#tokens');
}

// Moves focus to a table a keyboard user acted on (its row or button was replaced).
function focusTable(sel) {
  const t = $(sel);
  t.tabIndex = -1;
  t.focus();
}

function transferRow(t, mine) {
  const cells = [when(t.created_at)];
  if (!mine) cells.push(t.sender_email);
  cells.push(t.recipient_email, t.app_name || '–', t.status.toLowerCase(),
    money(t.amount_micros, t.currency), money(t.captured_micros, t.currency));
  return row(cells);
}

async function loadTransfers() {
  const p = state.transfers;
  const token = p.pages[p.pages.length - 1];
  const q = new URLSearchParams({ page_size: '20', status: p.status, page_token: token });
  const page = await api(`/dashboard/api/transfers?${q}`);
  p.next = page.next_page_token;
  $('#transfers-next').disabled = !p.next;
  $('#transfers-first').disabled = p.pages.length === 1;
  fill('#transfers', page.transfers.map((t) => transferRow(t, false)), 'No transfers');
}

async function loadHistory() {
  const p = state.history;
  const q = new URLSearchParams({ page_size: '20', role: 'sender', page_token: p.pages[p.pages.length - 1] });
  const page = await api(`/dashboard/api/transfers?${q}`);
  p.next = page.next_page_token;
  $('#history-next').disabled = !p.next;
  $('#history-first').disabled = p.pages.length === 1;
  fill('#history', page.transfers.map((t) => transferRow(t, true)), 'No payments yet');
}

function usageRow(u) {
  // The owner is the account that recorded the row: one naming this user, recorded by someone
  // else, says so.
  const tr = row([whenLive(u.created_at), u.owner_email || '–', u.app_name || '–',
    u.endpoint || '/', u.user_email || '–', u.reason ? `${u.status} (${u.reason})` : u.status,
    count(u.total_tokens), String(u.latency_ms),
    money(u.cost_micros, u.currency)]);
  tr.dataset.id = u.id;
  return tr;
}

async function loadLive() {
  const since = String(Date.now() * 1000 - DAY);
  const { rows } = await api(`/dashboard/api/usage?page_size=25&since=${since}`);
  state.liveIds = new Set(rows.map((u) => u.id));
  fill('#live', rows.map(usageRow), 'No requests in the last 24 hours');
}

function addLive(rows) {
  const body = $('#live tbody');
  const fresh = rows.filter((u) => !state.liveIds.has(u.id)).reverse();
  if (!fresh.length) return;
  body.querySelectorAll('td.empty').forEach((td) => td.parentElement.remove());
  fresh.forEach((u) => { state.liveIds.add(u.id); body.prepend(usageRow(u)); });
  // The ids kept are those of the rows shown: kept for every row ever pushed, another account's
  // flood of rows naming this user grew an open tab by about 100 MB an hour.
  while (body.children.length > 50) {
    state.liveIds.delete(body.lastElementChild.dataset.id);
    body.lastElementChild.remove();
  }
}

function connectLive() {
  if (state.source) state.source.close();
  const source = new EventSource('/dashboard/events');
  state.source = source;
  // Back after a drop (the ledger or its database was away): the figures are read again at once.
  // They stayed '–' until the next usage row, however long that took.
  let dropped = false;
  const refreshAll = () => Promise.all([refreshMoney(), refreshOwner(), loadTransfers()]).catch(report);
  source.addEventListener('open', () => {
    $('#live-status').textContent = 'live';
    if (dropped) { dropped = false; refreshAll(); }
  });
  source.addEventListener('usage', (e) => {
    addLive(JSON.parse(e.data).rows);
    // The figures follow the rows, at most once a second (the server sends no more often).
    clearTimeout(state.refreshTimer);
    state.refreshTimer = setTimeout(refreshAll, 300);
  });
  source.addEventListener('error', () => {
    dropped = true;
    $('#live-status').textContent = 'reconnecting';
    // Closed for good (the browser gives up on any refusal): signed out, or refused while signed
    // in, e.g. by the cap on one account's open pages. It said "reconnecting" forever.
    if (source.readyState === EventSource.CLOSED && state.me) {
      api('/dashboard/api/me').then((me) => {
        if (!me.signed_in) showSignIn();
        else $('#live-status').textContent = 'not live: the ledger refused this page\'s updates (at most 8 pages of an account are live); reload to try again';
      }).catch(() => {});
    }
  });
}

async function loadAlerts() {
  $('#alert-form').hidden = !state.me.alerts;
  if (!state.me.alerts) {
    $('#alerts-note').textContent = 'Alerts are off on this ledger: start it with --alerts-key.';
    fill('#alert-endpoints', [], 'Alerts are off');
    return;
  }
  const { endpoints } = await api('/dashboard/api/alerts');
  fill('#alert-endpoints', endpoints.map((e) => {
    const actions = document.createElement('td');
    // A disabled endpoint is enabled (its pending events kept), not tested: a test to it is refused.
    const first = e.disabled
      ? ['Enable', () => api('/dashboard/api/alerts/enable', { id: e.id }).then(loadAlerts)]
      : ['Test', () => api('/dashboard/api/alerts/test', { id: e.id }).then(() => loadDeliveries(e.id))];
    [first,
      ['Deliveries', () => loadDeliveries(e.id)],
      ['Remove', () => window.confirm('Remove this endpoint?') && api('/dashboard/api/alerts/remove', { id: e.id }).then(loadAlerts)],
    ].forEach(([label, act]) => {
      const b = document.createElement('button');
      b.type = 'button';
      b.textContent = label;
      b.setAttribute('aria-label', `${label} ${e.url}`);
      b.addEventListener('click', () => Promise.resolve(act()).catch(report));
      actions.appendChild(b);
    });
    const stateText = e.disabled ? 'disabled' : (e.failing_since_unix_micros ? 'failing' : 'ok');
    return row([e.url, e.rules.map((r) => r.event).join(', '), `${stateText}, ${e.pending_events} pending`, actions]);
  }), 'No endpoints');
}

async function loadDeliveries(id) {
  state.selectedEndpoint = id;
  $('#deliveries-of').textContent = id;
  const { deliveries } = await api(`/dashboard/api/alerts/deliveries?id=${encodeURIComponent(id)}`);
  fill('#deliveries', deliveries.map((d) => row([when(d.started_at_unix_micros), d.event_type, String(d.attempt),
    d.status_code == null ? '–' : String(d.status_code), String(d.latency_ms), d.outcome,
    d.next_attempt_at_unix_micros ? when(d.next_attempt_at_unix_micros) : '–'])), 'No attempts yet');
}

// An amount typed as text (`5`, `5.25`, `5,25`), to micros exactly: never through a float.
function toMicros(text) {
  // At most 9 whole digits: micros stay below 2^53, where a JS number is exact.
  const m = /^\s*(\d{1,9})(?:[.,](\d{1,6}))?\s*$/.exec(text);
  const micros = m ? Number(m[1]) * 1e6 + Number((m[2] || '').padEnd(6, '0')) : 0;
  if (!m || micros <= 0) throw new Error('the threshold must be an amount above 0 and below 1,000,000,000, with at most 6 decimals, e.g. 5.00');
  return micros;
}

// A whole number in [lo, hi] typed as text; `what` names it in the error.
function whole(text, lo, hi, what) {
  const t = String(text).trim();
  if (!/^\d+$/.test(t) || Number(t) < lo || Number(t) > hi) {
    throw new Error(`${what} must be a whole number from ${lo} to ${hi}`);
  }
  return Number(t);
}

function ruleOf(event, value) {
  switch (event) {
    case 'balance.low': return { event, below_micros: toMicros(value) };
    case 'spend.threshold': return { event, side: 'spend', above_micros: toMicros(value) };
    case 'budget.threshold': return { event, steps: value.split(',').map((s) => whole(s, 1, 100, 'each step (%)')) };
    case 'errors.spike': return { event, percent: whole(value, 1, 100, 'the error percentage'), window_minutes: 5, min_requests: 10 };
    default: return { event, hour: whole(value, 0, 23, 'the hour (UTC)') };
  }
}

async function addAlert(ev) {
  ev.preventDefault();
  $('#alert-error').textContent = '';
  try {
    const res = await api('/dashboard/api/alerts', { url: $('#alert-url').value,
      format: $('#alert-format').value, rules: [ruleOf($('#alert-event').value, $('#alert-value').value)] });
    $('#alert-secret').textContent = `Signing secret (shown once, keep it now): ${res.secret}`;
    $('#alert-form').reset();
    await loadAlerts();
  } catch (e) {
    $('#alert-error').textContent = e.message;
  }
}

async function signIn(ev) {
  ev.preventDefault();
  $('#signin-error').textContent = '';
  let res;
  try {
    res = await api('/dashboard/login', { email: $('#signin-email').value, secret: $('#signin-secret').value });
  } catch (e) {
    $('#signin-error').textContent = e.status === 401 ? 'Wrong email or secret.' : e.message;
    return;
  }
  try {
    state.csrf = res.csrf;
    $('#signin-form').reset();
    await start();
    // Focus on the page that replaced the form (it fell back to the document's top).
    $('#tab-owner').focus();
  } catch (e) {
    // Signed in, and the session still refused: the ledger says why (two session cookies, one
    // set by another site of this domain), where "Wrong email or secret" was shown.
    $('#signin-error').textContent = e.message;
  }
}

async function signOut() {
  $('#signout-error').textContent = '';
  try {
    await api('/dashboard/logout', {});
  } catch (e) {
    // Signed out only once the ledger ended the session: a page that showed the form while the
    // session lived on signed its owner back in at the next reload. (401: it had ended already.)
    if (!(e instanceof HttpError && e.status === 401)) {
      $('#signout-error').textContent = `Not signed out: ${e.message || 'the ledger did not answer'}. Try again.`;
      return;
    }
  }
  state.me = null;
  sessionStorage.setItem(NOTE, 'Signed out.');
  window.location.reload();
}

function select(tab) {
  ['owner', 'user', 'alerts'].forEach((t) => {
    $(`#tab-${t}`).setAttribute('aria-selected', String(t === tab));
    // One tab stop for the tab list (ARIA tabs): the arrow keys move between its tabs.
    $(`#tab-${t}`).tabIndex = t === tab ? 0 : -1;
    $(`#view-${t}`).hidden = t !== tab;
  });
  if (tab === 'user') refreshUser().catch(report);
  // Charts drawn while their tab was hidden had no width to measure and took 300 px: they take
  // their container's width once shown.
  Object.entries(state.charts).forEach(([id, c]) => {
    const width = $(id).clientWidth;
    if (width > 0 && Math.abs(c.width - width) > 1) c.setSize({ width, height: 200 });
  });
}

function report(e) {
  if (!(e instanceof HttpError && e.status === 401)) console.warn('dashboard:', e.message || e);
}

function wire() {
  $('#signin-form').addEventListener('submit', signIn);
  $('#signout').addEventListener('click', () => signOut().catch(report));
  $('#alert-form').addEventListener('submit', addAlert);
  ['owner', 'user', 'alerts'].forEach((t) => $(`#tab-${t}`).addEventListener('click', () => select(t)));
  $('#tablist').addEventListener('keydown', (ev) => {
    const tabs = [...document.querySelectorAll('#tablist [role=tab]')].filter((t) => !t.hidden);
    const at = tabs.indexOf(document.activeElement);
    const to = { ArrowRight: at + 1, ArrowLeft: at - 1, Home: 0, End: tabs.length - 1 }[ev.key];
    if (at < 0 || to === undefined) return;
    ev.preventDefault();
    const next = tabs[(to + tabs.length) % tabs.length];
    next.focus();
    select(next.id.replace('tab-', ''));
  });
  $('#range').addEventListener('change', () => {
    refreshOwner().catch(report);
    if (!state.me.admin) refreshUser().catch(report);
  });
  $('#transfer-status').addEventListener('change', () => {
    state.transfers = { pages: [''], status: $('#transfer-status').value };
    loadTransfers().catch(report);
  });
  // A pager button that disabled itself (the last or first page) would drop the focus: it goes
  // to the table it paged.
  const paged = (sel, button) => () => {
    if ($(button).disabled || document.activeElement === document.body) focusTable(sel);
  };
  $('#transfers-next').addEventListener('click', () => { state.transfers.pages.push(state.transfers.next); loadTransfers().then(paged('#transfers', '#transfers-next')).catch(report); });
  $('#transfers-first').addEventListener('click', () => { state.transfers.pages = ['']; loadTransfers().then(paged('#transfers', '#transfers-first')).catch(report); });
  $('#history-next').addEventListener('click', () => { state.history.pages.push(state.history.next); loadHistory().then(paged('#history', '#history-next')).catch(report); });
  $('#history-first').addEventListener('click', () => { state.history.pages = ['']; loadHistory().then(paged('#history', '#history-first')).catch(report); });
  let resize;
  window.addEventListener('resize', () => {
    clearTimeout(resize);
    resize = setTimeout(() => { if (state.me) refreshOwner().catch(report); }, 250);
  });
}

wire();
start().catch(report);
