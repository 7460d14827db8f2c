// The Ferry admin console. Plain browser JavaScript, no build step: it is
// compiled into the `ferry` binary as is. Every value from the server is
// put in the page as text (textContent), never as HTML.
'use strict';

const $ = (id) => document.getElementById(id);
const POLL_MS = 2000;

/** Thrown for any answer that is not 2xx; `status` is the HTTP status. */
class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function call(method, path, body) {
  const opts = { method, credentials: 'same-origin', headers: {} };
  if (body !== undefined) {
    opts.headers['Content-Type'] = 'application/json';
    opts.body = JSON.stringify(body);
  }
  const resp = await fetch('/admin/api/' + path, opts);
  let json = null;
  try {
    json = await resp.json();
  } catch (_) {
    // Not JSON: reported below by status.
  }
  if (!resp.ok) {
    const msg = json && json.error ? json.error.message : 'HTTP ' + resp.status;
    if (resp.status === 401 && path !== 'login') showLogin('');
    throw new ApiError(resp.status, msg);
  }
  return json;
}

const get = (path) => call('GET', path);
const post = (path, body) => call('POST', path, body ?? {});

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function row(cells) {
  const tr = document.createElement('tr');
  for (const c of cells) {
    if (c instanceof Node) {
      const td = document.createElement('td');
      td.append(c);
      tr.append(td);
    } else if (c && typeof c === 'object') {
      tr.append(el('td', c.text, c.cls));
    } else {
      tr.append(el('td', c));
    }
  }
  return tr;
}

function fill(tableId, rows, empty) {
  const body = $(tableId).tBodies[0];
  body.replaceChildren(...rows);
  if (rows.length === 0 && empty) {
    const tr = document.createElement('tr');
    const td = el('td', empty, 'muted');
    td.colSpan = $(tableId).tHead.rows[0].cells.length;
    tr.append(td);
    body.append(tr);
  }
}

function button(text, onClick, cls) {
  const b = el('button', text, cls);
  b.type = 'button';
  b.addEventListener('click', onClick);
  return b;
}

const fmtTime = (ms) => (ms ? new Date(ms).toISOString().replace('T', ' ').replace(/\.\d+Z$/, 'Z') : '');
function fmtAgo(ms) {
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  if (s < 60) return s + ' s ago';
  if (s < 3600) return Math.floor(s / 60) + ' min ago';
  return Math.floor(s / 3600) + ' h ago';
}
function fmtSecs(s) {
  if (!s) return 'no age limit';
  if (s % 86400 === 0) return s / 86400 + ' d';
  if (s % 3600 === 0) return s / 3600 + ' h';
  return s + ' s';
}
function showError(msg) {
  $('error').textContent = msg || '';
}

// ---- login -----------------------------------------------------------

let polling = null;

function showLogin(msg) {
  stopPolling();
  $('dash').hidden = true;
  $('logout').hidden = true;
  $('node-line').textContent = '';
  // Nothing of a previous session stays in the page.
  for (const t of ['nodes', 'connections', 'channels', 'presence', 'history']) fill(t, []);
  $('counters').replaceChildren();
  $('channel-view').hidden = true;
  $('login-view').hidden = false;
  $('login-error').textContent = msg;
}

function showDash() {
  $('login-view').hidden = true;
  $('dash').hidden = false;
  $('logout').hidden = false;
  startPolling();
}

$('login-form').addEventListener('submit', async (ev) => {
  ev.preventDefault();
  $('login-error').textContent = '';
  try {
    await post('login', { password: $('password').value });
    $('password').value = '';
    showDash();
  } catch (e) {
    $('login-error').textContent = e.status === 401 ? 'Wrong password.' : e.message;
  }
});

$('logout').addEventListener('click', async () => {
  try {
    await post('logout');
  } catch (_) {
    // Logged out either way.
  }
  showLogin('Logged out.');
});

// ---- polling ---------------------------------------------------------

function startPolling() {
  stopPolling();
  const tick = async () => {
    try {
      await refresh();
      showError('');
    } catch (e) {
      if (e.status === 401) return; // showLogin stopped polling
      showError(e.message);
    }
    if (polling !== null) polling = setTimeout(tick, POLL_MS);
  };
  polling = setTimeout(tick, 0);
}

function stopPolling() {
  if (polling !== null) clearTimeout(polling);
  polling = null;
}

async function refresh() {
  const open = hist.channel ? [loadPresence()] : [];
  await Promise.all([refreshInfo(), refreshMetrics(), refreshConnections(), refreshChannels(), ...open]);
}

/** After an action: everything shown again at once, not at the next tick. */
function refreshNow() {
  return refresh().catch((e) => {
    if (e.status !== 401) showError(e.message);
  });
}

// ---- info, nodes, counters -------------------------------------------

async function refreshInfo() {
  const [info, nodes] = await Promise.all([get('info'), get('nodes')]);
  $('node-line').textContent =
    `ferry ${info.version} · node ${info.node} · ${location.host} · up ${info.uptime_secs} s · auth ${info.auth}`;
  fill(
    'nodes',
    nodes.nodes.map((n) => {
      const beat = n.beat_ago_ms === null ? 'embedded (single node)' : (n.beat_ago_ms / 1000).toFixed(1) + ' s ago';
      const late = n.beat_ago_ms !== null && n.beat_ago_ms > 3000;
      return row([n.id + (n.this ? ' (this node)' : ''), info.engine + (info.engine_up ? '' : ' (unreachable)'),
        { text: beat, cls: late ? 'dead' : '' }]);
    }),
  );
}

// Counters shown, with the rate of the counters that only grow.
const COUNTERS = [
  ['ferry_connections', 'connections'],
  ['ferry_subscriptions', 'subscriptions'],
  ['ferry_channels', 'active channels'],
  ['ferry_messages_in_total', 'messages in', true],
  ['ferry_messages_out_total', 'messages out', true],
  ['ferry_publications_stored_total', 'publications stored', true],
  ['ferry_bytes_in_total', 'bytes in', true],
  ['ferry_bytes_out_total', 'bytes out', true],
  ['ferry_acks_pending', 'acks pending'],
  ['ferry_slow_consumer_disconnects_total', 'slow consumers cut'],
  ['ferry_webhook_failures_total', 'webhook failures'],
  ['ferry_engine_up', 'engine up'],
];
let lastMetrics = null;

async function refreshMetrics() {
  const m = await get('metrics');
  const boxes = COUNTERS.map(([name, label, rate]) => {
    const v = m.metrics[name] ?? 0;
    const box = el('div', null, 'counter');
    box.dataset.metric = name;
    box.append(el('div', v, 'v'));
    let k = label;
    if (rate && lastMetrics) {
      const dt = (m.time_ms - lastMetrics.time_ms) / 1000;
      const dv = v - (lastMetrics.metrics[name] ?? 0);
      if (dt > 0) k += ` · ${(dv / dt).toFixed(1)}/s`;
    }
    box.append(el('div', k, 'k'));
    return box;
  });
  $('counters').replaceChildren(...boxes);
  $('metrics-age').textContent = 'at ' + fmtTime(m.time_ms);
  lastMetrics = m;
}

// ---- connections -----------------------------------------------------

const conn = { after: null, next: null, user: '' };

async function refreshConnections() {
  const q = new URLSearchParams({ limit: '50' });
  if (conn.after) q.set('after', conn.after);
  if (conn.user) q.set('user', conn.user);
  const r = await get('connections?' + q);
  conn.next = r.next;
  $('conn-summary').textContent = `${r.total} on this node, ${r.users} users online`;
  $('conn-next').disabled = !r.next;
  $('conn-first').disabled = !conn.after;
  fill(
    'connections',
    r.connections.map((c) => {
      const tr = row([
        { text: c.client, cls: 'mono' },
        c.user || '(anonymous)',
        c.device,
        c.channels.join(', '),
        fmtAgo(c.since_ms),
        button('Disconnect', () => disconnect(c), 'danger'),
      ]);
      tr.dataset.client = c.client;
      tr.dataset.user = c.user;
      return tr;
    }),
    'No connections.',
  );
}

async function disconnect(c) {
  const who = c.user ? `user ${c.user} (connection ${c.client})` : `connection ${c.client}`;
  if (!window.confirm(`Disconnect ${who}? It is told not to reconnect.`)) return;
  try {
    const r = await post('disconnect', { user: c.user, client: c.client, reconnect: false });
    showError('');
    $('pub-result').textContent = `Disconnected ${r.disconnected} connection(s) of ${who}.`;
    await refreshNow();
  } catch (e) {
    showError(e.message);
  }
}

$('conn-filter').addEventListener('submit', (ev) => {
  ev.preventDefault();
  conn.user = $('conn-user').value.trim();
  conn.after = null;
  refreshConnections().catch((e) => showError(e.message));
});
$('conn-next').addEventListener('click', () => {
  conn.after = conn.next;
  refreshConnections().catch((e) => showError(e.message));
});
$('conn-first').addEventListener('click', () => {
  conn.after = null;
  refreshConnections().catch((e) => showError(e.message));
});

// ---- channels --------------------------------------------------------

const chan = { after: null, next: null };

async function refreshChannels() {
  const q = new URLSearchParams({ limit: '50' });
  if (chan.after) q.set('after', chan.after);
  if ($('chan-active').checked) q.set('active', 'true');
  const r = await get('channels?' + q);
  chan.next = r.next;
  $('chan-summary').textContent = `${r.total} known to this node`;
  $('chan-next').disabled = !r.next;
  $('chan-first').disabled = !chan.after;
  fill(
    'channels',
    r.channels.map((c) => {
      const retained = c.retained ? `${c.retained} (${c.first}–${c.top})` : 'none';
      const tr = row([
        { text: c.name, cls: 'mono' },
        { text: c.top, cls: 'num' },
        retained,
        `${c.history_size} / ${fmtSecs(c.history_ttl_secs)}`,
        { text: c.subscribers, cls: 'num' },
        button('Open', () => openChannel(c.name), 'link'),
      ]);
      tr.dataset.channel = c.name;
      return tr;
    }),
    'No channels yet.',
  );
}

$('chan-active').addEventListener('change', () => {
  chan.after = null;
  refreshChannels().catch((e) => showError(e.message));
});
$('chan-next').addEventListener('click', () => {
  chan.after = chan.next;
  refreshChannels().catch((e) => showError(e.message));
});
$('chan-first').addEventListener('click', () => {
  chan.after = null;
  refreshChannels().catch((e) => showError(e.message));
});

// ---- one channel: presence and history -------------------------------

// The history page shows offsets up to `until` (null = the newest),
// newest first.
const hist = { channel: null, until: null, top: 0, oldest: null, newest: null };

async function openChannel(name) {
  hist.channel = name;
  hist.until = null;
  $('cv-name').textContent = name;
  $('pub-channel').value = name;
  $('channel-view').hidden = false;
  await Promise.all([loadPresence(), loadHistory()]);
  $('channel-view').scrollIntoView({ block: 'start' });
}

async function loadPresence() {
  $('presence-error').textContent = '';
  try {
    const p = await post('presence', { channel: hist.channel, limit: 100 });
    $('presence-stats').textContent = `${p.stats.clients} connections, ${p.stats.users} users`;
    fill('presence', p.clients.map((c) => row([{ text: c.client, cls: 'mono' }, c.user || '(anonymous)'])), 'Nobody.');
  } catch (e) {
    if (e.status === 401) return;
    fill('presence', []);
    $('presence-stats').textContent = '';
    $('presence-error').textContent = e.message;
  }
}

function pageSize() {
  return Number($('hist-size').value);
}

async function loadHistory() {
  $('hist-error').textContent = '';
  const body = { channel: hist.channel, limit: pageSize(), reverse: true };
  if (hist.until !== null) body.until_offset = hist.until;
  let h;
  try {
    h = await post('history', body);
  } catch (e) {
    if (e.status !== 401) $('hist-error').textContent = e.message;
    return;
  }
  const pubs = h.publications;
  hist.top = h.top.offset;
  hist.newest = pubs.length ? pubs[0].offset : null;
  hist.oldest = pubs.length ? pubs[pubs.length - 1].offset : null;
  $('hist-range').textContent = pubs.length
    ? `offsets ${hist.oldest}–${hist.newest} of ${hist.top} (epoch ${h.top.epoch})`
    : `nothing here (top ${hist.top})`;
  $('hist-newer').disabled = hist.until === null || hist.until >= hist.top;
  $('hist-newest').disabled = hist.until === null;
  $('hist-older').disabled = !pubs.length || pubs.length < pageSize() || hist.oldest <= 1;
  fill(
    'history',
    pubs.map((p) => {
      const data = p.data !== undefined ? JSON.stringify(p.data) : `base64: ${p.b64data}`;
      const by = p.publisher ? `${p.publisher.user || '(anonymous)'} / ${p.publisher.client}` : 'backend';
      const tr = row([{ text: p.offset, cls: 'num' }, fmtTime(p.time_ms), { text: p.message_id, cls: 'mono' }, by,
        { text: data, cls: 'data' }]);
      tr.dataset.offset = p.offset;
      return tr;
    }),
    'No publications in this range.',
  );
}

$('hist-older').addEventListener('click', () => {
  if (hist.oldest === null) return;
  hist.until = hist.oldest - 1;
  loadHistory();
});
$('hist-newer').addEventListener('click', () => {
  const next = (hist.until ?? hist.top) + pageSize();
  hist.until = next >= hist.top ? null : next;
  loadHistory();
});
$('hist-newest').addEventListener('click', () => {
  hist.until = null;
  loadHistory();
});
$('hist-size').addEventListener('change', () => {
  if (hist.channel) loadHistory();
});

// ---- publish ---------------------------------------------------------

$('publish-form').addEventListener('submit', async (ev) => {
  ev.preventDefault();
  $('pub-result').textContent = '';
  const text = $('pub-data').value;
  let data;
  try {
    data = JSON.parse(text);
  } catch (_) {
    data = text;
  }
  const channel = $('pub-channel').value.trim();
  try {
    const r = await post('publish', { channel, data, qos: Number($('pub-qos').value) });
    $('pub-result').textContent = `Published to ${r.channel} at offset ${r.offset} (epoch ${r.epoch}).`;
    showError('');
    if (hist.channel === channel) {
      hist.until = null;
      await loadHistory();
    }
    await refreshNow();
  } catch (e) {
    showError('Publish failed: ' + e.message);
  }
});

// ---- start -----------------------------------------------------------

get('session')
  .then(showDash)
  .catch((e) => {
    if (e.status !== 401) showLogin(e.message);
  });
