// A small chat room on the Ferry SDK: nickname, messages (QoS 1, history
// on open), who is online (presence + join/leave). The SDK is served at
// /pkg/ by serve.mjs; the Ferry server URL comes from ?server=.
import { FerryClient, localStorageStorage } from '/pkg/web/index.js';

const CHANNEL = 'chat:lobby';
const params = new URLSearchParams(location.search);
const server = params.get('server') ?? `ws://${location.hostname}:8000/ws`;
const $ = (id) => document.getElementById(id);

let client = null;
const shown = new Set(); // offsets already on screen (history and live overlap)

function addMessage(p) {
  const key = `${p.epoch}:${p.offset}`;
  if (shown.has(key)) return;
  shown.add(key);
  let msg;
  try {
    msg = p.json();
  } catch {
    return;
  }
  const li = document.createElement('li');
  li.dataset.offset = String(p.offset);
  const nick = document.createElement('span');
  nick.className = 'nick';
  nick.textContent = msg.nick ?? p.publisher?.user ?? '?';
  const text = document.createElement('span');
  text.className = 'text';
  text.textContent = String(msg.text ?? '');
  const time = document.createElement('span');
  time.className = 'time';
  time.textContent = new Date(p.timeMs).toLocaleTimeString();
  li.append(time, nick, text);
  // Keep stream order even when history arrives after live messages.
  const list = $('messages');
  const after = [...list.children].find((c) => Number(c.dataset.offset) > p.offset);
  list.insertBefore(li, after ?? null);
  list.scrollTop = list.scrollHeight;
}

async function refreshOnline() {
  try {
    const users = [...new Set((await client.presence(CHANNEL)).map((c) => c.user))].sort();
    $('online').replaceChildren(
      ...users.map((u) => {
        const li = document.createElement('li');
        li.textContent = u;
        return li;
      }),
    );
    $('online-count').textContent = String(users.length);
  } catch {
    // Not connected right now: the next 'connected' refreshes.
  }
}

async function loadHistory() {
  try {
    const h = await client.history(CHANNEL, { limit: 50, reverse: true });
    for (const p of h.publications.reverse()) addMessage(p);
  } catch {
    // Retried on the next connection.
  }
}

function join(nick) {
  client = new FerryClient(server, {
    token: nick, // development auth: the token is the user id
    deviceId: `chat-${nick}`,
    storage: localStorageStorage(), // unsent messages survive a reload
  });
  client.on('state', (s) => {
    $('status').textContent = s.state;
    $('status').className = `status ${s.state}`;
  });
  client.on('connected', () => {
    loadHistory();
    refreshOnline();
  });
  client.subscribe(CHANNEL, {
    qos: 1,
    onPublication: addMessage,
    onJoin: refreshOnline,
    onLeave: refreshOnline,
  });
  client.connect();
  window.chat = { client, nick };
  $('join-form').hidden = true;
  $('chat').hidden = false;
  $('text').focus();
}

$('join-form').addEventListener('submit', (e) => {
  e.preventDefault();
  const nick = $('nick').value.trim();
  if (nick) join(nick);
});

$('send-form').addEventListener('submit', (e) => {
  e.preventDefault();
  const text = $('text').value.trim();
  if (!text || !client) return;
  $('text').value = '';
  client.publish(CHANNEL, { nick: window.chat.nick, text }, { qos: 1 }).catch((err) => {
    $('status').textContent = `send failed: ${err.message}`;
  });
});
