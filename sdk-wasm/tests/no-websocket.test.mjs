// The nodejs build in a Node process WITHOUT a global WebSocket (test.sh
// runs this file without --experimental-websocket on Node 20, and with
// --no-experimental-websocket on Node >= 22). A missing transport is a
// setup error: connect() must reject at once with a typed error, and the
// client must stop instead of retrying with backoff.
import { test } from 'node:test';
import assert from 'node:assert/strict';

import { FerryServer } from './lib/server.mjs';
import { FerryClient, FerryError } from '../pkg/node/index.mjs';

/** `p` settled as `{ ok, value }` / `{ ok: false, error }`; rejects after `ms`. */
function settled(p, ms, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
  });
  const outcome = Promise.resolve(p).then(
    (value) => ({ ok: true, value }),
    (error) => ({ ok: false, error }),
  );
  return Promise.race([outcome, timeout]).finally(() => clearTimeout(timer));
}

test('no global WebSocket: connect() rejects at once with code config, the client ends closed and never retries', async () => {
  assert.equal(typeof globalThis.WebSocket, 'undefined', 'this test must run without a global WebSocket');
  // A real server, so that nothing but the missing transport stands in the way.
  const srv = await FerryServer.start();
  // The default transport looks the global up once per attempt to open a
  // connection: count the looks, still finding nothing.
  let lookups = 0;
  Object.defineProperty(globalThis, 'WebSocket', {
    configurable: true,
    get() {
      lookups += 1;
      return undefined;
    },
  });
  // Backoff this short would retry within milliseconds if a retry loop existed.
  const c = new FerryClient(srv.url, { token: 'alice', backoff: { minMs: 10, maxMs: 20 } });
  const states = [];
  const errors = [];
  c.on('state', (s) => states.push(s));
  c.on('error', (e) => errors.push(e));
  try {
    await settled(c.ready, 10000, 'the client to load');
    const t0 = Date.now();
    const r = await settled(c.connect(), 2000, 'connect() to settle');
    const took = Date.now() - t0;
    assert.equal(r.ok, false, 'connect() must reject without a transport');
    assert.ok(r.error instanceof FerryError, `a FerryError, not ${r.error}`);
    assert.equal(r.error.code, 'config');
    assert.match(r.error.message, /WebSocket/);
    assert.ok(took < 1000, `rejected at once (${took} ms)`);

    // The terminal state, with the client-side close code for "no transport".
    assert.equal(c.state, 'closed');
    assert.deepEqual(
      states.map((s) => s.state),
      ['connecting', 'closed'],
    );
    assert.equal(states.at(-1).code, 3506);
    // Apps that do not await connect() see it as an 'error' event.
    assert.deepEqual(
      errors.map((e) => e.code),
      ['config'],
    );
    assert.equal(lookups, 1, 'one attempt to open a transport');

    // No reconnect loop: a network change (which ends any backoff at once)
    // starts nothing, and neither does the passing of many backoff periods.
    c.networkChanged(true);
    assert.equal(lookups, 1, 'a network change starts no attempt');
    // An observation window for something that must not happen (there is
    // no event to await for an absence): 20 times the longest backoff.
    await new Promise((resolve) => setTimeout(resolve, 400));
    assert.equal(lookups, 1, 'no further transport opens');
    assert.deepEqual(
      states.map((s) => s.state),
      ['connecting', 'closed'],
    );
    // Publishing to a closed client fails with a typed error too.
    const p = await settled(c.publish('news', { late: true }, { qos: 1 }), 2000, 'publish to settle');
    assert.equal(p.ok, false);
    assert.equal(p.error.code, 'closed');
  } finally {
    c.close();
    delete globalThis.WebSocket;
    await srv.stop();
  }
});

test('a server URL that is not ws:// or wss:// is refused at construction with code config', () => {
  for (const url of ['http://127.0.0.1:9/ws', '127.0.0.1:9', 'ws://', 'ws:// spaced/ws', undefined]) {
    assert.throws(
      () => new FerryClient(url, { deviceId: 'url-check' }),
      (e) => e instanceof FerryError && e.code === 'config',
      String(url),
    );
  }
  const ok = new FerryClient('ws://127.0.0.1:9/ws', { deviceId: 'url-check' });
  ok.close();
});

test('several server URLs: each is checked at construction, and the list may not be empty', () => {
  const ok = 'ws://127.0.0.1:9/ws';
  for (const urls of [[], [ok, 'http://127.0.0.1:9/ws'], ['ws://', ok], [ok, 42]]) {
    assert.throws(
      () => new FerryClient(urls, { deviceId: 'url-check' }),
      (e) => e instanceof FerryError && e.code === 'config',
      JSON.stringify(urls),
    );
  }
  const c = new FerryClient([ok, 'wss://127.0.0.1:10/ws'], { deviceId: 'url-check' });
  assert.deepEqual(c.urls, [ok, 'wss://127.0.0.1:10/ws']);
  assert.equal(c.url, ok);
  c.close();
});
