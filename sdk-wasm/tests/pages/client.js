// A test page: one FerryClient configured from the query string, recording
// everything it sees in `window.rec` for the test to poll.
//   ?url=ws://...&user=alice&device=d1&storage=none|local|idb&channel=room&qos=1&encoding=binary
import * as ferry from '/pkg/web/index.js';

const q = new URLSearchParams(location.search);
const t0 = performance.now();
const rec = {
  states: [],
  pubs: [],
  acks: [],
  joins: [],
  leaves: [],
  gaps: [],
  errors: [],
  subscribed: [],
  ready: false,
};
window.rec = rec;
window.ferry = ferry;

const storageKind = q.get('storage') ?? 'none';
const storage =
  storageKind === 'local'
    ? ferry.localStorageStorage()
    : storageKind === 'idb'
      ? ferry.indexedDbStorage('ferry-test')
      : undefined;

const client = new ferry.FerryClient(q.get('url'), {
  token: q.get('user') ?? 'anon',
  deviceId: q.get('device') ?? undefined,
  encoding: q.get('encoding') ?? 'binary',
  storage,
  backoff: { minMs: Number(q.get('bmin') ?? 200), maxMs: Number(q.get('bmax') ?? 1000) },
  requestTimeoutMs: 5000,
});
window.client = client;

client.on('state', (s) => {
  rec.states.push({ state: s.state, t: performance.now() - t0, at: performance.now() });
  document.getElementById('status').textContent = s.state;
});
client.on('error', (e) => rec.errors.push(`${e.code}: ${e.message}`));
client.on('ack', (a) => rec.acks.push(a));

const channel = q.get('channel') ?? 'room';
if (q.get('subscribe') !== '0') {
  window.sub = client.subscribe(channel, {
    qos: Number(q.get('qos') ?? 1),
    onPublication: (p) => {
      let body;
      try {
        body = p.json();
      } catch {
        body = Array.from(p.data);
      }
      rec.pubs.push({ offset: p.offset, messageId: p.messageId, body, user: p.publisher?.user ?? null, at: performance.now() });
    },
    onJoin: (who) => rec.joins.push(who.user),
    onLeave: (who) => rec.leaves.push(who.user),
    onGap: (g) => rec.gaps.push(g),
    onSubscribed: (s) => rec.subscribed.push({ recovered: s.recovered, offset: s.position.offset }),
  });
}
client.connect();

/** Publish and record the outcome (without awaiting, so tests can publish while offline). */
window.pending = [];
window.publish = (data, qos) => {
  const entry = { data, qos, done: false, ok: null, ack: null, error: null };
  window.pending.push(entry);
  const payload = data && data.bytes ? new Uint8Array(data.bytes) : data;
  client.publish(channel, payload, { qos }).then(
    (ack) => Object.assign(entry, { done: true, ok: true, ack }),
    (e) => Object.assign(entry, { done: true, ok: false, error: `${e.code}: ${e.message}` }),
  );
};
client.ready.then(() => {
  rec.ready = true;
});
