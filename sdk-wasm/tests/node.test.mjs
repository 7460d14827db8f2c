// Node end-to-end test of the nodejs build against the real `ferry` server.
// Node 20 runs it with --experimental-websocket (the global WebSocket).
import { test } from 'node:test';
import { createHmac } from 'node:crypto';
import assert from 'node:assert/strict';

import { FerryServer } from './lib/server.mjs';
import { figure } from './lib/figures.mjs';
import { FerryClient, FerryError, memoryStorage, webSocketTransport } from '../pkg/node/index.mjs';

const WAIT = 20000;

/** Resolve when `pred()` holds, checking on every client event; reject after `ms`. */
function until(client, pred, what, ms = WAIT) {
  return new Promise((resolve, reject) => {
    const stops = [];
    const done = (err) => {
      clearTimeout(timer);
      for (const s of stops) s();
      err ? reject(err) : resolve();
    };
    const check = () => {
      try {
        if (pred()) done();
      } catch (e) {
        done(e);
      }
    };
    const timer = setTimeout(() => done(new Error(`timed out waiting for ${what}`)), ms);
    for (const ev of ['state', 'publication', 'ack', 'subscribed', 'join', 'leave', 'publishFailed']) {
      stops.push(client.on(ev, check));
    }
    check();
  });
}

function client(url, user, extra = {}) {
  const c = new FerryClient(url, { token: user, backoff: { minMs: 100, maxMs: 500 }, ...extra });
  const seen = [];
  const errors = [];
  c.on('error', (e) => errors.push(e.message));
  return { c, seen, errors };
}

test('nodejs build: publish at QoS 0/1/2, receive, history, presence, typed errors', async () => {
  const srv = await FerryServer.start();
  const a = client(srv.url, 'alice');
  const b = client(srv.url, 'bob', { encoding: 'json' });
  try {
    for (const x of [a, b]) {
      x.live = false;
      x.c.subscribe('news', { qos: 2, onPublication: (p) => x.seen.push(p), onSubscribed: () => (x.live = true) });
      x.c.connect();
    }
    // Both subscriptions live before anything is published (QoS 0 is not replayed).
    await until(a.c, () => a.live, 'alice subscribed');
    await until(b.c, () => b.live, 'bob subscribed');

    const acks = [];
    acks.push(await a.c.publish('news', { n: 0 }, { qos: 0 }));
    acks.push(await a.c.publish('news', { n: 1 }, { qos: 1 }));
    acks.push(await b.c.publish('news', { n: 2 }, { qos: 2 }));
    acks.push(await a.c.publish('news', new Uint8Array([9, 8, 7]), { qos: 2 }));
    assert.deepEqual(
      acks.map((x) => x.offset),
      [1, 2, 3, 4],
    );
    for (const x of [a, b]) {
      await until(x.c, () => x.seen.length >= 4, 'four publications');
      assert.deepEqual(
        x.seen.map((p) => p.offset),
        [1, 2, 3, 4],
      );
      assert.deepEqual(x.seen[2].json(), { n: 2 });
      assert.deepEqual(Array.from(x.seen[3].data), [9, 8, 7]);
    }
    const h = await b.c.history('news', { limit: 2, reverse: true });
    assert.deepEqual(
      h.publications.map((p) => p.offset),
      [4, 3],
    );
    assert.equal(h.top.offset, 4);
    const who = (await a.c.presence('news')).map((c) => c.user).sort();
    assert.deepEqual(who, ['alice', 'bob']);

    // Typed errors: a payload over the limit, and QoS 0 while disconnected.
    await assert.rejects(a.c.publish('news', new Uint8Array(200 * 1024), { qos: 1 }), (e) => {
      assert.ok(e instanceof FerryError);
      assert.equal(e.code, 'too_large');
      return true;
    });
    a.c.disconnect();
    await assert.rejects(a.c.publish('news', { late: true }, { qos: 0 }), (e) => e.code === 'not_connected');
    await assert.rejects(a.c.history('news'), (e) => e.code === 'not_connected');
    assert.deepEqual(a.errors, []);
    assert.deepEqual(b.errors, []);
    figure('node: messages exchanged (QoS 0/1/2, binary+JSON)', 8);
  } finally {
    a.c.close();
    b.c.close();
    await srv.stop();
  }
});

test('close() ends in the terminal closed state; disconnect() pauses in idle and connect() resumes', async () => {
  const srv = await FerryServer.start();
  const x = client(srv.url, 'carol');
  const states = [];
  x.c.on('state', (s) => states.push(s));
  try {
    await x.c.connect();
    await until(x.c, () => x.c.state === 'connected', 'connected');
    x.c.disconnect();
    assert.equal(states.at(-1).state, 'idle', 'disconnect() is a pause');
    await x.c.connect();
    await until(x.c, () => x.c.state === 'connected', 'connected again after disconnect()');
    const before = states.length;
    x.c.close();
    assert.deepEqual(
      states.slice(before).map((s) => s.state),
      ['closed'],
      'close() ends in closed, with no idle on the way',
    );
    assert.equal(states.at(-1).code, 1000);
    assert.equal(states.at(-1).reason, 'client closed');
    assert.equal(x.c.state, 'closed');
    await assert.rejects(x.c.publish('news', { late: true }, { qos: 1 }), (e) => e.code === 'closed');
    await assert.rejects(x.c.connect(), (e) => e.code === 'closed');
    // Nothing follows the terminal state (a pending timer or socket event
    // would come within a macrotask turn or two).
    await new Promise((resolve) => setImmediate(resolve));
    assert.equal(states.at(-1).state, 'closed');
    assert.deepEqual(x.errors, []);
  } finally {
    x.c.close();
    await srv.stop();
  }
});

test('nodejs build: outbox survives a client restart (memoryStorage) and a server kill -9', async () => {
  const srv = await FerryServer.start();
  const storage = memoryStorage();
  const opts = { storage, deviceId: 'node-pub' };
  const sub = client(srv.url, 'bob');
  let pub = client(srv.url, 'alice', opts);
  try {
    sub.c.subscribe('jobs', { qos: 2, onPublication: (p) => sub.seen.push(p) });
    sub.c.connect();
    pub.c.connect();
    await until(pub.c, () => pub.c.state === 'connected', 'publisher connected');
    await until(sub.c, () => sub.c.state === 'connected', 'subscriber connected');
    await pub.c.publish('jobs', { i: 0 }, { qos: 1 });

    await srv.kill9();
    await until(pub.c, () => pub.c.state !== 'connected', 'publisher notices the kill');
    const queued = [1, 2, 3, 4, 5].map((i) => pub.c.publish('jobs', { i }, { qos: i % 2 ? 2 : 1 }));
    for (const p of queued) p.catch(() => {});
    assert.equal(pub.c.outbox().length, 5);
    // "Restart the app": a new client on the same storage takes over the outbox.
    pub.c.close();
    for (const p of queued) await assert.rejects(p, (e) => e.code === 'closed');
    pub = client(srv.url, 'alice', opts);
    await pub.c.ready;
    assert.equal(pub.c.outbox().length, 5, 'outbox restored from storage');
    pub.c.connect();

    const t0 = Date.now();
    await srv.restart();
    const acked = [];
    pub.c.on('ack', (a) => acked.push(a));
    await until(pub.c, () => acked.length >= 5, 'restored publishes acknowledged');
    await until(sub.c, () => sub.seen.length >= 6, 'subscriber has everything');
    figure('node: kill -9 -> outbox delivered after restart (ms)', Date.now() - t0);
    assert.deepEqual(
      sub.seen.map((p) => p.json().i),
      [0, 1, 2, 3, 4, 5],
    );
    assert.equal(new Set(sub.seen.map((p) => p.messageId)).size, 6);
    assert.equal(pub.c.outbox().length, 0);
  } finally {
    pub.c.close();
    sub.c.close();
    await srv.stop();
  }
});

test('callbacks may call back into the client: events are queued, never re-entrant', async () => {
  const srv = await FerryServer.start();
  const echo = client(srv.url, 'echo');
  const asker = client(srv.url, 'asker');
  const N = 50;
  try {
    // The echo client answers every question from inside its publication
    // callback, i.e. while the driver is delivering events; a re-entrant
    // call into the core would throw ("recursive use of an object").
    let echoLive = false;
    let askerLive = false;
    const replies = [];
    echo.c.subscribe('q', {
      qos: 1,
      onPublication: (p) => {
        echo.seen.push(p);
        const reply = echo.c.publish('a', { re: p.json().i }, { qos: 1 });
        // The last one is cut short by close() below, on purpose.
        reply.catch(() => {});
        replies.push(reply);
      },
      onSubscribed: () => (echoLive = true),
    });
    asker.c.subscribe('a', {
      qos: 1,
      onPublication: (p) => asker.seen.push(p.json().re),
      onSubscribed: () => (askerLive = true),
    });
    echo.c.connect();
    asker.c.connect();
    await until(echo.c, () => echoLive, 'echo subscribed');
    await until(asker.c, () => askerLive, 'asker subscribed');
    for (let i = 0; i < N; i++) asker.c.publish('q', { i }, { qos: 1 });
    await until(asker.c, () => asker.seen.length >= N, 'all answers');
    assert.deepEqual(
      asker.seen,
      Array.from({ length: N }, (_, i) => i),
      'answers in order, each once',
    );
    const acks = await Promise.all(replies);
    assert.equal(acks.length, N);
    assert.equal(new Set(acks.map((a) => a.offset)).size, N);
    assert.deepEqual(echo.errors, []);
    assert.deepEqual(asker.errors, []);

    // close() from inside a callback is safe too.
    let closedInside = false;
    echo.c.on('publication', () => {
      if (!closedInside) {
        closedInside = true;
        echo.c.close();
      }
    });
    await asker.c.publish('q', { i: N }, { qos: 1 });
    await until(asker.c, () => closedInside, 'echo closed from its callback');
    assert.equal(echo.c.outbox().length, 0);
  } finally {
    echo.c.close();
    asker.c.close();
    await srv.stop();
  }
});

/** An HS256 JWT for `sub`, valid for `ttlSecs`. */
function jwt(secret, sub, ttlSecs) {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString('base64url');
  const body = `${b64({ alg: 'HS256', typ: 'JWT' })}.${b64({ sub, exp: Math.floor(Date.now() / 1000) + ttlSecs })}`;
  return `${body}.${createHmac('sha256', secret).update(body).digest('base64url')}`;
}

test('getToken: first token from the provider, refreshed before expiry without a reconnect', async () => {
  const secret = 'test-secret-test-secret-test-secret-0123';
  const srv = await FerryServer.start(`\n[auth]\nhmac_secret = "${secret}"\nleeway_secs = 0\n`);
  let calls = 0;
  let fourth;
  const refreshed = new Promise((resolve) => (fourth = resolve));
  const t = client(srv.url, undefined, {
    getToken: async () => {
      calls += 1;
      // The first call fails (say, the app starts offline): retried.
      if (calls === 1) throw new Error('token service unreachable');
      if (calls === 5) fourth();
      return jwt(secret, 'dana', 4);
    },
  });
  const disconnects = [];
  t.c.on('disconnected', (d) => disconnects.push(d));
  try {
    t.c.connect();
    await until(t.c, () => t.c.state === 'connected', 'connected with the provider token');
    const t0 = Date.now();
    assert.equal(calls, 2);
    assert.deepEqual(t.errors, ['getToken failed: token service unreachable']);
    // Tokens live 4 s and are refreshed at half-life: three refreshes take
    // the connection well past the first token's expiry.
    let timer;
    await Promise.race([
      refreshed,
      new Promise((_, reject) => (timer = setTimeout(() => reject(new Error(`only ${calls} getToken calls`)), WAIT))),
    ]);
    clearTimeout(timer);
    assert.ok(Date.now() - t0 > 4000, 'past the first token expiry');
    assert.equal(t.c.state, 'connected');
    assert.deepEqual(disconnects, [], 'refresh happened on the live connection');
    const ack = await t.c.publish('tok', { still: 'here' }, { qos: 1 });
    assert.equal(ack.offset, 1);
    assert.equal(t.errors.length, 1);
    figure('node: token refreshes on one connection', calls - 2);
  } finally {
    t.c.close();
    await srv.stop();
  }
});

/**
 * An asynchronous storage adapter (like IndexedDB) whose writes commit only
 * when the test says so. `committed` is what survives a crash.
 */
function manualStorage() {
  const st = {
    committed: null,
    manual: false,
    pending: [],
    waiters: [],
    load: async () => st.committed,
    save(_key, value) {
      return new Promise((resolve) => {
        const commit = () => {
          st.committed = value;
          resolve();
        };
        if (!st.manual) return queueMicrotask(commit);
        st.pending.push(commit);
        for (const w of st.waiters.splice(0)) w();
      });
    },
    /** Resolves when the next write starts (manual mode). */
    nextWrite: () => new Promise((r) => st.waiters.push(r)),
  };
  return st;
}

test('asynchronous storage: a publication reaches the app only once its position is committed', async () => {
  const srv = await FerryServer.start();
  const storage = manualStorage();
  // JSON encoding, so the spy transport below can read the frames.
  const opts = { storage, deviceId: 'bob-phone', encoding: 'json' };
  const spy = spyTransport();
  const publications = () => spy.received.filter((t) => t.includes('"publication"')).length;
  const pub = client(srv.url, 'alice');
  // What the user saw, across "app runs"; a crashed run sees nothing more.
  const shown = [];
  let run = 1;
  const start = async (n, extra = {}) => {
    const s = client(srv.url, 'bob', { ...opts, ...extra });
    await s.c.ready;
    let live = false;
    s.c.subscribe('feed', {
      qos: 1,
      onPublication: (p) => run === n && shown.push(p.json().n),
      onSubscribed: () => (live = true),
    });
    s.c.connect();
    await until(s.c, () => live, `run ${n} subscribed`);
    return s;
  };
  let sub = await start(1);
  try {
    pub.c.connect();
    await pub.c.publish('feed', { n: 1 }, { qos: 1 });
    await until(sub.c, () => shown.length === 1, 'first publication');

    // The position write for n=2 is in flight: the app must not see n=2 yet.
    storage.manual = true;
    let write = storage.nextWrite();
    await pub.c.publish('feed', { n: 2 }, { qos: 1 });
    await write;
    assert.deepEqual(shown, [1], 'not shown before its position is committed');
    storage.pending.shift()();
    await until(sub.c, () => shown.length === 2, 'shown once committed');

    // n=3's write never commits: the app is killed first. The next run gets
    // n=3 from the server, and the user sees it once.
    write = storage.nextWrite();
    await pub.c.publish('feed', { n: 3 }, { qos: 1 });
    await write;
    assert.deepEqual(shown, [1, 2]);
    run = 2; // the killed run's callbacks no longer reach the user
    storage.pending = [];
    sub.c.close();
    storage.manual = false;
    sub = await start(2, { transport: spy.transport });
    await until(sub.c, () => shown.length === 3, 'n=3 after the crash');

    // A graceful close with a write in flight: the app sees n=4 (covered by
    // that write) at close; n=5, received after the write began, is not shown
    // since no write stores its position. The next run gets n=5 from the
    // server and shows nothing twice.
    storage.manual = true;
    write = storage.nextWrite();
    await pub.c.publish('feed', { n: 4 }, { qos: 1 });
    await write;
    const before = publications();
    await pub.c.publish('feed', { n: 5 }, { qos: 1 });
    await spy.until(() => publications() === before + 1, 'n=5 received while the write for n=4 is in flight');
    assert.deepEqual(shown, [1, 2, 3]);
    sub.c.close();
    assert.deepEqual(shown, [1, 2, 3, 4], 'close hands over what the write in flight covers, and only that');
    for (const commit of storage.pending.splice(0)) commit();
    storage.manual = false;
    run = 3;
    sub = await start(3);
    await until(sub.c, () => shown.length >= 5, 'n=5 on the next start');
    await pub.c.publish('feed', { n: 6 }, { qos: 1 });
    await until(sub.c, () => shown.length >= 6, 'n=6');
    assert.deepEqual(shown, [1, 2, 3, 4, 5, 6], 'each publication shown exactly once');
  } finally {
    sub.c.close();
    pub.c.close();
    await srv.stop();
  }
});

/**
 * A transport over the global WebSocket that records the frames the client
 * sends and received, and calls `until` checks after the client has handled
 * each received frame.
 */
function spyTransport() {
  const spy = { sent: [], received: [], checks: new Set() };
  spy.transport = {
    open(url, protocol) {
      const ws = new WebSocket(url, protocol);
      const sock = {
        onopen: null,
        onmessage: null,
        onclose: null,
        onerror: null,
        get protocol() {
          return ws.protocol;
        },
        send(d) {
          spy.sent.push(String(d));
          ws.send(d);
        },
        close: (c, r) => ws.close(c, r),
      };
      ws.onopen = (e) => sock.onopen?.(e);
      ws.onclose = (e) => sock.onclose?.(e);
      ws.onerror = (e) => sock.onerror?.(e);
      ws.onmessage = (e) => {
        sock.onmessage?.(e);
        spy.received.push(String(e.data));
        for (const c of [...spy.checks]) c();
      };
      return sock;
    },
  };
  spy.until = (pred, what) =>
    new Promise((resolve, reject) => {
      const check = () => {
        if (!pred()) return;
        spy.checks.delete(check);
        clearTimeout(timer);
        resolve();
      };
      const timer = setTimeout(() => {
        spy.checks.delete(check);
        reject(new Error(`timed out waiting for ${what}`));
      }, WAIT);
      spy.checks.add(check);
      check();
    });
  return spy;
}

test('asynchronous storage: a finished write releases what it covered even when the next write starts at once', async () => {
  const srv = await FerryServer.start();
  const storage = manualStorage();
  const spy = spyTransport();
  const pub = client(srv.url, 'alice');
  // JSON encoding, so the test can read the frames.
  const sub = client(srv.url, 'bob', { storage, deviceId: 'bob-steady', encoding: 'json', transport: spy.transport });
  const shown = [];
  let live = false;
  const publications = () => spy.received.filter((t) => t.includes('"publication"')).length;
  const acked = (offset) => spy.sent.some((t) => t.startsWith('{"ack"') && t.includes(`"offset":${offset}`));
  try {
    await sub.c.ready;
    sub.c.subscribe('steady', { qos: 1, onPublication: (p) => shown.push(p.json().n), onSubscribed: () => (live = true) });
    sub.c.connect();
    pub.c.connect();
    await until(sub.c, () => live, 'subscribed');

    // Steady traffic: n=2 arrives while the write for n=1 (W1) is in flight,
    // so a second write (W2) is due the moment W1 ends.
    storage.manual = true;
    let write = storage.nextWrite();
    await pub.c.publish('steady', { n: 1 }, { qos: 1 });
    await write;
    await pub.c.publish('steady', { n: 2 }, { qos: 1 });
    await spy.until(() => publications() === 2, 'n=2 received while W1 is in flight');
    assert.deepEqual(shown, []);
    assert.ok(!acked(1), 'no ack before its position is stored');

    write = storage.nextWrite();
    storage.pending.shift()(); // W1 commits; W2 starts
    await write;
    await until(sub.c, () => shown.length === 1, 'n=1 released by W1');
    assert.ok(acked(1), 'the ack W1 covered is sent');
    assert.ok(!acked(2), 'the ack W2 covers waits for W2');
    assert.deepEqual(shown, [1], 'n=2 waits for W2');

    storage.pending.shift()(); // W2 commits
    await until(sub.c, () => shown.length === 2, 'n=2 released by W2');
    assert.ok(acked(2));
    assert.deepEqual(sub.errors, []);
  } finally {
    sub.c.close();
    pub.c.close();
    await srv.stop();
  }
});

/** A loopback URL nothing listens on: bind port 0, note it, close it. */
async function deadUrl() {
  const { createServer } = await import('node:net');
  const l = createServer();
  await new Promise((r) => l.listen(0, '127.0.0.1', r));
  const { port } = l.address();
  await new Promise((r) => l.close(r));
  return `ws://127.0.0.1:${port}/ws`;
}

/** The global WebSocket, recording every URL opened. */
function recordingTransport(opened) {
  const inner = webSocketTransport();
  return { open: (url, protocol) => (opened.push(url), inner.open(url, protocol)) };
}

test('several URLs: [deadUrl, liveUrl] connects to the live one', async () => {
  const srv = await FerryServer.start();
  const dead = await deadUrl();
  let startedDead = 0;
  try {
    // Fixed seeds: the first URL comes from the seed, so some start on the
    // dead one and the move to the next is exercised deterministically.
    for (let seed = 0; seed < 6; seed++) {
      const opened = [];
      const x = client([dead, srv.url], 'urls', {
        deviceId: `urls-${seed}`,
        seed,
        transport: recordingTransport(opened),
        backoff: { minMs: 20, maxMs: 200 },
      });
      try {
        x.c.connect();
        await until(x.c, () => x.c.state === 'connected', `seed ${seed} connected`);
        assert.equal(opened.at(-1), srv.url, `seed ${seed}: on the live URL`);
        assert.ok(opened.every((u) => u === dead || u === srv.url));
        if (opened[0] === dead) startedDead++;
        const ack = await x.c.publish('urls', { seed }, { qos: 1 });
        assert.equal(ack.offset, seed + 1);
      } finally {
        x.c.close();
      }
    }
    assert.ok(startedDead > 0, 'no seed started on the dead URL: the failover path was not exercised');
  } finally {
    await srv.stop();
  }
});

test('several URLs: when the server in use is killed, the client moves to the other and works there', async () => {
  const a = await FerryServer.start();
  const b = await FerryServer.start();
  const opened = [];
  const x = client([a.url, b.url], 'carol', {
    deviceId: 'urls-failover',
    transport: recordingTransport(opened),
    backoff: { minMs: 20, maxMs: 200 },
  });
  try {
    let subscribed = 0;
    x.c.subscribe('chat:fo', { qos: 1, onPublication: (p) => x.seen.push(p), onSubscribed: () => subscribed++ });
    x.c.connect();
    await until(x.c, () => x.c.state === 'connected' && subscribed === 1, 'connected and subscribed');
    const first = opened.at(-1);
    const [gone, other] = first === a.url ? [a, b] : [b, a];
    const t0 = Date.now();
    await gone.kill9();
    await until(x.c, () => x.c.state !== 'connected', 'the client notices the kill');
    await until(x.c, () => x.c.state === 'connected' && subscribed === 2, 'connected and subscribed again');
    figure('node: kill -9 of the node in use -> connected to the other (ms)', Date.now() - t0);
    assert.equal(opened.at(-1), other.url, 'moved to the other URL');
    const ack = await x.c.publish('chat:fo', { after: 'failover' }, { qos: 1 });
    await until(x.c, () => x.seen.length === 1, 'the publication on the other node');
    assert.equal(x.seen[0].offset, ack.offset);
    assert.deepEqual(x.seen[0].json(), { after: 'failover' });
  } finally {
    x.c.close();
    await a.stop();
    await b.stop();
  }
});
