// The mini-program transport and storage adapters, against the real
// `ferry` server, through a shim shaped like WeChat's `wx` API: its
// connectSocket returns a SocketTask (onOpen/onMessage/onClose/onError,
// send({data}), close({code, reason})) wrapping a real WebSocket. The
// global WebSocket is removed first, so the SDK can only use the shim.
import { test } from 'node:test';
import assert from 'node:assert/strict';

import { FerryServer } from './lib/server.mjs';
import { figure } from './lib/figures.mjs';

const RealWebSocket = globalThis.WebSocket;
assert.equal(typeof RealWebSocket, 'function', 'run with node --experimental-websocket (Node 20) or Node >= 22');
// Mini-programs have no window, no WebSocket and no DOM events.
delete globalThis.WebSocket;
assert.equal(typeof globalThis.window, 'undefined');

const { FerryClient, miniProgramTransport, miniProgramStorage, reactNativeTransport } = await import(
  '../pkg/node/index.mjs'
);

const WAIT = 20000;

/** A `wx`-shaped object: connectSocket + sync storage, with call records. */
function makeWx() {
  const store = new Map();
  const wx = {
    sockets: [],
    connectSocket({ url, protocols, header, complete, fail }) {
      const ws = new RealWebSocket(url, protocols);
      ws.binaryType = 'arraybuffer';
      const task = {
        url,
        protocols,
        header,
        sent: 0,
        onOpen: (fn) => ws.addEventListener('open', () => fn({ header: {}, profile: {} })),
        onMessage: (fn) => ws.addEventListener('message', (e) => fn({ data: e.data })),
        onClose: (fn) => ws.addEventListener('close', (e) => fn({ code: e.code, reason: e.reason })),
        onError: (fn) => ws.addEventListener('error', () => fn({ errMsg: 'connectSocket:fail' })),
        send({ data, fail: sendFail }) {
          // WeChat accepts string or ArrayBuffer only (not typed arrays).
          if (typeof data !== 'string' && !(data instanceof ArrayBuffer)) {
            sendFail?.({ errMsg: 'sendSocketMessage:fail invalid data' });
            return;
          }
          task.sent += 1;
          ws.send(data);
        },
        close({ code, reason }) {
          ws.close(code, reason);
        },
      };
      wx.sockets.push(task);
      queueMicrotask(() => complete?.());
      if (typeof url !== 'string') queueMicrotask(() => fail?.({ errMsg: 'connectSocket:fail url' }));
      return task;
    },
    getStorageSync: (k) => store.get(k) ?? '',
    setStorageSync: (k, v) => store.set(k, v),
    store,
  };
  return wx;
}

function until(client, pred, what) {
  return new Promise((resolve, reject) => {
    const stops = [];
    const done = (err) => {
      clearTimeout(timer);
      for (const s of stops) s();
      err ? reject(err) : resolve();
    };
    const check = () => pred() && done();
    const timer = setTimeout(() => done(new Error(`timed out waiting for ${what}`)), WAIT);
    for (const ev of ['state', 'publication', 'ack', 'subscribed']) stops.push(client.on(ev, check));
    check();
  });
}

for (const encoding of ['binary', 'json']) {
  test(`wx.connectSocket adapter (${encoding}): publish, receive, reconnect after kill -9, storage`, async () => {
    const srv = await FerryServer.start();
    const wx = makeWx();
    const got = [];
    let live = 0;
    const client = new FerryClient(srv.url, {
      token: 'mini',
      deviceId: `mini-${encoding}`,
      encoding,
      transport: miniProgramTransport(wx),
      storage: miniProgramStorage(wx),
      backoff: { minMs: 100, maxMs: 500 },
    });
    const errors = [];
    client.on('error', (e) => errors.push(e.message));
    try {
      client.subscribe('mp', { qos: 2, onPublication: (p) => got.push(p.json()), onSubscribed: () => live++ });
      client.connect();
      await until(client, () => live === 1, 'subscribed');
      const proto = encoding === 'json' ? 'ferry.v1.json' : 'ferry.v1';
      assert.deepEqual(wx.sockets[0].protocols, [proto], 'subprotocol passed to connectSocket');
      assert.equal((await client.publish('mp', { n: 1 }, { qos: 1 })).offset, 1);
      assert.equal((await client.publish('mp', { n: 2 }, { qos: 2 })).offset, 2);
      await until(client, () => got.length === 2, 'two publications');

      await srv.kill9();
      await until(client, () => client.state !== 'connected', 'disconnect noticed');
      const queued = client.publish('mp', { n: 3 }, { qos: 2 });
      const saved = JSON.parse(wx.store.get(`ferry:mini-${encoding}`));
      assert.equal(saved.snapshot.outbox.length, 1, 'outbox entry written to wx storage before sending');
      const t0 = Date.now();
      await srv.restart();
      assert.equal((await queued).offset, 3);
      await until(client, () => got.length === 3, 'third publication');
      figure(`mini-program shim (${encoding}): reconnect + outbox after restart (ms)`, Date.now() - t0);
      assert.deepEqual(got, [{ n: 1 }, { n: 2 }, { n: 3 }]);
      assert.ok(wx.sockets.length >= 2, 'a new SocketTask after the restart');
      assert.deepEqual(errors, []);
    } finally {
      client.close();
      await srv.stop();
    }
  });
}

/**
 * A React Native-shaped WebSocket constructor: `new WebSocket(url, protocols,
 * { headers })` (RN's third argument), recording each call, backed by a real
 * WebSocket. It is handed to the adapter explicitly, as an app would when the
 * global one is wrapped.
 */
function makeRnWebSocket() {
  const calls = [];
  class RnWebSocket {
    constructor(url, protocols, options) {
      calls.push({ url, protocols, options });
      const ws = new RealWebSocket(url, protocols);
      this._ws = ws;
      this.onopen = this.onmessage = this.onclose = this.onerror = null;
      ws.addEventListener('open', (e) => this.onopen?.(e));
      ws.addEventListener('message', (e) => this.onmessage?.({ data: e.data }));
      ws.addEventListener('close', (e) => this.onclose?.({ code: e.code, reason: e.reason }));
      ws.addEventListener('error', (e) => this.onerror?.(e));
    }
    get protocol() {
      return this._ws.protocol;
    }
    get readyState() {
      return this._ws.readyState;
    }
    set binaryType(v) {
      this._ws.binaryType = v;
    }
    get binaryType() {
      return this._ws.binaryType;
    }
    send(data) {
      this._ws.send(data);
    }
    close(code, reason) {
      this._ws.close(code, reason);
    }
  }
  return { RnWebSocket, calls };
}

test('React Native adapter: headers and subprotocol reach the constructor; publish, receive, reconnect', async () => {
  const srv = await FerryServer.start();
  const { RnWebSocket, calls } = makeRnWebSocket();
  const got = [];
  let live = 0;
  const client = new FerryClient(srv.url, {
    token: 'rn',
    deviceId: 'rn-device',
    transport: reactNativeTransport({ WebSocket: RnWebSocket, headers: { 'X-App': 'ferry-rn-test' } }),
    backoff: { minMs: 100, maxMs: 500 },
  });
  const errors = [];
  client.on('error', (e) => errors.push(e.message));
  try {
    client.subscribe('rn', { qos: 1, onPublication: (p) => got.push(p.json()), onSubscribed: () => live++ });
    client.connect();
    await until(client, () => live === 1, 'subscribed');
    assert.deepEqual(calls[0].protocols, ['ferry.v1']);
    assert.deepEqual(calls[0].options, { headers: { 'X-App': 'ferry-rn-test' } });
    assert.equal((await client.publish('rn', { n: 1 }, { qos: 1 })).offset, 1);
    await until(client, () => got.length === 1, 'first publication');

    await srv.kill9();
    await until(client, () => client.state !== 'connected', 'disconnect noticed');
    const queued = client.publish('rn', { n: 2 }, { qos: 1 });
    await srv.restart();
    assert.equal((await queued).offset, 2);
    await until(client, () => got.length === 2, 'second publication');
    assert.deepEqual(got, [{ n: 1 }, { n: 2 }]);
    assert.ok(calls.length >= 2, 'a new socket after the restart');
    assert.deepEqual(errors, []);
  } finally {
    client.close();
    await srv.stop();
  }
});
