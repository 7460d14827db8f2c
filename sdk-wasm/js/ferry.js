// Ferry client for browsers, Node, workers and mini-programs.
//
// This file is the JavaScript face of the package; the protocol (heartbeat,
// reconnect with backoff, outbox and resend, acks, dedup, recovery) runs in
// the WebAssembly `Driver` (ferry-core's ClientSession). Each build target
// (web, bundler, nodejs) has an entry file that tells this module how to
// load its wasm-bindgen glue with `_setGlueLoader`, then re-exports it.

let glueLoader = null;
let gluePromise = null;

/** @internal Called once by the target's entry file. */
export function _setGlueLoader(load) {
  glueLoader = load;
}

function loadGlue() {
  if (!gluePromise) {
    if (!glueLoader) throw new Error('ferry: import the package entry (web, bundler or node), not ferry.js');
    gluePromise = Promise.resolve().then(glueLoader);
  }
  return gluePromise;
}

// ---- errors ------------------------------------------------------------

/** Every error the client reports: a stable `code` plus server details. */
export class FerryError extends Error {
  constructor(code, message, details = {}) {
    super(message);
    this.name = 'FerryError';
    this.code = code;
    if (details.serverCode !== undefined) this.serverCode = details.serverCode;
    if (details.temporary !== undefined) this.temporary = details.temporary;
  }
}

function toError(e) {
  if (e instanceof FerryError) return e;
  if (e && typeof e === 'object' && typeof e.code === 'string') {
    return new FerryError(e.code, e.message ?? e.code, e);
  }
  return new FerryError('internal', e instanceof Error ? e.message : String(e));
}

/** The close code of the `closed` state when no transport can be opened here (PROTOCOL.md 12.2). */
const CLOSE_TRANSPORT_UNAVAILABLE = 3506;

function configError(reason) {
  return new FerryError('config', `cannot connect: ${reason}`);
}

// ---- payloads ----------------------------------------------------------

const encoder = typeof TextEncoder !== 'undefined' ? new TextEncoder() : null;
const decoder = typeof TextDecoder !== 'undefined' ? new TextDecoder() : null;

/** Bytes as given; anything else as its JSON text in UTF-8. */
export function encodePayload(data) {
  if (data instanceof Uint8Array) return data;
  if (data instanceof ArrayBuffer) return new Uint8Array(data);
  if (ArrayBuffer.isView(data)) return new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
  const text = JSON.stringify(data);
  if (text === undefined) throw new FerryError('bad_payload', 'payload is neither bytes nor JSON-serialisable');
  if (!encoder) throw new FerryError('bad_payload', 'TextEncoder is missing: add a polyfill');
  return encoder.encode(text);
}

/** A publication as subscribers and `history` see it. */
export class Publication {
  constructor(raw) {
    this.channel = raw.channel;
    this.epoch = raw.epoch;
    this.offset = raw.offset;
    this.messageId = raw.messageId;
    this.qos = raw.qos;
    this.publisher = raw.publisher;
    this.timeMs = raw.timeMs;
    this.data = raw.data;
  }
  /** The payload as UTF-8 text. */
  text() {
    if (!decoder) throw new FerryError('bad_payload', 'TextDecoder is missing: add a polyfill');
    return decoder.decode(this.data);
  }
  /** The payload parsed as JSON (what `publish` sent for a non-bytes value). */
  json() {
    return JSON.parse(this.text());
  }
}

// ---- transports --------------------------------------------------------

/** The default transport: a WebSocket constructor (the global one by default). */
export function webSocketTransport(WebSocketImpl) {
  return {
    open(url, protocol) {
      const Ctor = WebSocketImpl ?? globalThis.WebSocket;
      if (typeof Ctor !== 'function') {
        // The driver treats this code as a setup error: connect() rejects with 'config'.
        throw new FerryError('no_transport', 'no global WebSocket (Node 20: run with --experimental-websocket)');
      }
      const ws = new Ctor(url, protocol);
      ws.binaryType = 'arraybuffer';
      return ws;
    },
  };
}

/**
 * React Native: its WebSocket takes a third argument with headers (e.g. an
 * Origin the server allows) and supports binaryType 'arraybuffer'.
 */
export function reactNativeTransport(options = {}) {
  return {
    open(url, protocol) {
      const Ctor = options.WebSocket ?? globalThis.WebSocket;
      const ws = options.headers ? new Ctor(url, [protocol], { headers: options.headers }) : new Ctor(url, [protocol]);
      ws.binaryType = 'arraybuffer';
      return ws;
    },
  };
}

// A SocketTask from wx.connectSocket / uni.connectSocket / my.connectSocket,
// dressed as the WebSocket-shaped socket the driver expects.
class MiniProgramSocket {
  constructor(api, url, protocol, extra) {
    this.onopen = null;
    this.onmessage = null;
    this.onclose = null;
    this.onerror = null;
    // SocketTask does not report the agreed subprotocol; an empty string
    // tells the driver not to check it.
    this.protocol = '';
    this._done = false;
    const fail = (e) => this._error(e);
    this._task = api.connectSocket({
      url,
      protocols: [protocol],
      header: extra.header,
      timeout: extra.timeout,
      // uni-app returns the task only when a callback is given.
      complete: () => {},
      fail,
    });
    if (!this._task) throw new FerryError('no_transport', 'connectSocket returned no SocketTask');
    this._task.onOpen(() => this.onopen?.({}));
    this._task.onMessage((m) => this.onmessage?.({ data: m.data }));
    this._task.onClose((c) => {
      this._done = true;
      this.onclose?.({ code: c?.code ?? 1006, reason: c?.reason ?? '' });
    });
    this._task.onError(fail);
  }
  _error(e) {
    if (this._done) return;
    this.onerror?.({ message: e?.errMsg ?? e?.message ?? 'socket error' });
  }
  send(data) {
    this._task.send({ data, fail: (e) => this._error(e) });
  }
  close(code, reason) {
    this._done = true;
    this._task.close({ code, reason });
  }
}

/**
 * Mini-program transport: pass `wx` (WeChat), `uni` (uni-app), `my` (Alipay)
 * or any object with a compatible `connectSocket`. `extra.header` adds
 * request headers; `extra.timeout` is the connect timeout in ms.
 */
export function miniProgramTransport(api, extra = {}) {
  if (!api || typeof api.connectSocket !== 'function') {
    throw new FerryError('no_transport', 'miniProgramTransport needs an object with connectSocket (wx, uni, my)');
  }
  return { open: (url, protocol) => new MiniProgramSocket(api, url, protocol, extra) };
}

// ---- storage -----------------------------------------------------------

/** State in a Map: survives reconnects and new clients in the same process, not reloads. */
export function memoryStorage() {
  const m = new Map();
  return {
    load: (key) => m.get(key) ?? null,
    save: (key, value) => {
      m.set(key, value);
    },
  };
}

/** State in `localStorage` (synchronous: written before any frame leaves). */
export function localStorageStorage(ls = globalThis.localStorage) {
  if (!ls) throw new FerryError('no_storage', 'localStorage is not available here');
  return {
    load: (key) => ls.getItem(key),
    save: (key, value) => {
      ls.setItem(key, value);
    },
  };
}

/** State in IndexedDB (asynchronous: frames and app events wait for the transaction to commit). */
export function indexedDbStorage(dbName = 'ferry', idb = globalThis.indexedDB) {
  if (!idb) throw new FerryError('no_storage', 'indexedDB is not available here');
  let dbp = null;
  const db = () =>
    (dbp ??= new Promise((resolve, reject) => {
      const req = idb.open(dbName, 1);
      req.onupgradeneeded = () => req.result.createObjectStore('state');
      req.onsuccess = () => resolve(req.result);
      req.onerror = () => reject(req.error);
    }));
  const tx = async (mode, body) => {
    const d = await db();
    return new Promise((resolve, reject) => {
      const t = d.transaction('state', mode, { durability: 'strict' });
      const result = body(t.objectStore('state'));
      t.oncomplete = () => resolve(result.result ?? null);
      t.onerror = () => reject(t.error);
      t.onabort = () => reject(t.error ?? new Error('transaction aborted'));
    });
  };
  return {
    load: (key) => tx('readonly', (s) => s.get(key)),
    save: async (key, value) => {
      await tx('readwrite', (s) => s.put(value, key));
    },
  };
}

/** State in a mini-program's synchronous key-value storage (`wx`, `uni`). */
export function miniProgramStorage(api) {
  return {
    load: (key) => api.getStorageSync(key) || null,
    save: (key, value) => api.setStorageSync(key, value),
  };
}

// ---- the client --------------------------------------------------------

/** Events buffered for a restored channel nobody has subscribed to yet. */
const ORPHAN_CAP = 10000;

function randomSeed() {
  const c = globalThis.crypto;
  if (c && typeof c.getRandomValues === 'function') return c.getRandomValues(new Uint32Array(2));
  return [Math.floor(Math.random() * 2 ** 32), Math.floor(Math.random() * 2 ** 32)];
}

function qosOf(q, fallback) {
  const v = q ?? fallback;
  if (v !== 0 && v !== 1 && v !== 2) throw new FerryError('bad_qos', `qos must be 0, 1 or 2, not ${q}`);
  return v;
}

/** A subscription handle: `unsubscribe()` stops its callbacks. */
export class Subscription {
  constructor(client, channel, options) {
    this.client = client;
    this.channel = channel;
    this.options = options;
    this.active = true;
  }
  unsubscribe() {
    if (!this.active) return;
    this.active = false;
    this.client._detach(this);
  }
  _emit(ev) {
    const o = this.options;
    const call = (fn, arg) => {
      if (typeof fn !== 'function') return;
      try {
        fn(arg);
      } catch (e) {
        this.client._report(e);
      }
    };
    switch (ev.type) {
      case 'publication':
        return call(o.onPublication, new Publication(ev));
      case 'join':
        return call(o.onJoin, ev.info);
      case 'leave':
        return call(o.onLeave, ev.info);
      case 'gap':
        return call(o.onGap, ev);
      case 'subscribed':
        return call(o.onSubscribed, ev);
      case 'subscribe_failed':
        this.active = false;
        return call(o.onError, toError(ev.error));
      case 'unsubscribed':
        this.active = false;
        return call(o.onError, new FerryError('unsubscribed', ev.reason, { serverCode: ev.code }));
    }
  }
}

const CHANNEL_EVENTS = new Set(['publication', 'join', 'leave', 'gap', 'subscribed', 'subscribe_failed', 'unsubscribed']);

/**
 * A Ferry connection. Construction is synchronous; loading the wasm module,
 * the stored state and the first token happen in the background (`ready`),
 * and calls made meanwhile run, in order, once it is done.
 */
export class FerryClient {
  constructor(url, options = {}) {
    // Several URLs are the nodes of one cluster; the core picks which one
    // each attempt opens (PROTOCOL.md 9.2). A URL no transport can open is
    // a setup error: say so now instead of retrying it forever as if the
    // network were down.
    const urls = Array.isArray(url) ? [...url] : [url];
    if (urls.length === 0) {
      throw new FerryError('config', 'server URL list is empty: give at least one ws:// or wss:// URL');
    }
    for (const u of urls) {
      if (typeof u !== 'string' || !/^wss?:\/\/[^\s/?#]+/i.test(u)) {
        throw new FerryError('config', `server URL ${JSON.stringify(u)}: must be ws://host/... or wss://host/...`);
      }
    }
    /** The server URLs, in order. */
    this.urls = urls;
    /** The first server URL (kept for code written for one URL). */
    this.url = urls[0];
    this.options = options;
    this._listeners = new Map();
    this._channels = new Map(); // channel -> Set<Subscription>
    this._orphans = new Map(); // channel -> events for a restored channel not yet subscribed
    this._publishes = new Map(); // message id -> { resolve, reject }
    this._calls = new Map(); // call id -> { resolve, reject, map }
    this._ops = [];
    this._driver = null;
    this._closed = false;
    this._state = { type: 'state', state: 'idle' };
    this._needToken = false;
    this._connectWanted = false;
    // connect() promises waiting for the first token from getToken.
    this._connectWaiters = [];
    this._unhook = [];
    this.ready = this._start();
    // A failed start is reported as an 'error' event; `ready` still rejects
    // for callers who await it.
    this.ready.catch((e) => this._emit('error', toError(e)));
  }

  async _start() {
    const glue = await loadGlue();
    const o = this.options;
    const key = o.storageKey ?? `ferry:${o.deviceId ?? 'default'}`;
    const saved = o.storage ? await o.storage.load(key) : null;
    if (this._closed) return;
    const token = o.token ?? '';
    // Without a token, the first one comes from getToken; until then the
    // client works offline (publishes go to the outbox) and connects later.
    this._needToken = !token && typeof o.getToken === 'function';
    // A fixed seed replays backoff jitter and the choice of the first URL.
    const fixed = Number.isSafeInteger(o.seed) && o.seed >= 0;
    const [hi, lo] = fixed ? [Math.floor(o.seed / 2 ** 32), o.seed >>> 0] : randomSeed();
    const driverOptions = {
      urls: this.urls,
      token,
      refreshable: typeof o.getToken === 'function',
      deviceId: o.deviceId,
      encoding: o.encoding ?? 'binary',
      transport: o.transport,
      storage: o.storage,
      storageKey: key,
      seedHi: hi,
      seedLo: lo,
      compression: o.compression,
      backoffMinMs: o.backoff?.minMs,
      backoffMaxMs: o.backoff?.maxMs,
      connectTimeoutMs: o.connectTimeoutMs,
      requestTimeoutMs: o.requestTimeoutMs,
      messageTtlMs: o.messageTtlMs,
      outboxMaxMessages: o.outbox?.maxMessages,
      outboxMaxBytes: o.outbox?.maxBytes,
      qos0Offline: o.qos0Offline,
      clientName: o.clientName,
      clientVersion: o.clientVersion,
    };
    const onEvent = (ev) => this._onEvent(ev);
    try {
      this._driver = new glue.Driver(driverOptions, saved ?? undefined, onEvent);
    } catch (e) {
      if (!saved) throw e;
      // Unreadable stored state must not leave the app without a client:
      // say so, and start afresh (the next save replaces it).
      this._emit('error', new FerryError('storage', `${e?.message ?? e}; starting with empty state`));
      this._driver = new glue.Driver(driverOptions, undefined, onEvent);
    }
    this.deviceId = this._driver.deviceId();
    if (o.networkEvents !== false) this._watchNetwork();
    const ops = this._ops;
    this._ops = [];
    for (const op of ops) op(this._driver);
    if (this._needToken) this._firstToken(0);
  }

  // Ask getToken for the first token, retrying with capped backoff (the app
  // may start offline); connect once it comes if connect() was called.
  _firstToken(attempt) {
    Promise.resolve()
      .then(this.options.getToken)
      .then(
        (t) => {
          if (this._closed || !this._driver) return;
          this._needToken = false;
          this._driver.setToken(String(t));
          const waiters = this._connectWaiters;
          this._connectWaiters = [];
          if (this._connectWanted) {
            const err = this._startConnecting(this._driver);
            for (const w of waiters) err ? w.reject(err) : w.resolve();
          } else {
            for (const w of waiters) w.resolve();
          }
        },
        (e) => {
          if (this._closed) return;
          this._emit('error', new FerryError('token', `getToken failed: ${e?.message ?? e}`));
          const delay = Math.min(30000, 1000 * 2 ** Math.min(attempt, 5));
          setTimeout(() => this._firstToken(attempt + 1), delay);
        },
      );
  }

  // Run `op` with the driver now, or once it exists.
  _do(op) {
    if (this._closed) throw new FerryError('closed', 'client closed');
    if (this._driver) op(this._driver);
    else this._ops.push(op);
  }

  _watchNetwork() {
    const g = globalThis;
    const listen = (target, name, fn) => {
      if (target && typeof target.addEventListener === 'function') {
        target.addEventListener(name, fn);
        this._unhook.push(() => target.removeEventListener(name, fn));
      }
    };
    listen(g, 'online', () => this.networkChanged(true));
    listen(g, 'offline', () => this.networkChanged(false));
    // A page coming back to the foreground skips whatever backoff was left:
    // timers in background tabs are throttled, and the user is looking now.
    listen(g.document, 'visibilitychange', () => {
      const s = this._state.state;
      if (g.document.visibilityState === 'visible' && (s === 'backoff' || s === 'offline')) this.networkChanged(true);
    });
  }

  /** Subscribe to client-level events; returns a function that unsubscribes. */
  on(event, fn) {
    let set = this._listeners.get(event);
    if (!set) this._listeners.set(event, (set = new Set()));
    set.add(fn);
    return () => set.delete(fn);
  }

  _emit(event, arg) {
    const set = this._listeners.get(event);
    if (!set || set.size === 0) {
      if (event === 'error' && arg) console.warn('ferry:', arg.message ?? arg);
      return;
    }
    for (const fn of [...set]) {
      try {
        fn(arg);
      } catch (e) {
        if (event !== 'error') this._report(e);
        else console.error(e);
      }
    }
  }

  _report(e) {
    this._emit('error', new FerryError('callback', `a callback threw: ${e?.message ?? e}`));
  }

  /** The current connection state (`{ state: 'connected' | 'backoff' | ... }`). */
  get state() {
    return this._state.state;
  }

  /**
   * Start connecting (and keep reconnecting until `disconnect` or `close`).
   * Resolves once connecting has started (not once connected: watch the
   * `connected` event); with `getToken` and no `token`, once the first token
   * came. Rejects at once with `FerryError` code `config` when no transport
   * can be opened here (no global WebSocket and no `transport` option): the
   * client is then `closed` and does not retry. Also rejects with `closed`
   * when called after `close()`, and with the start error if the client
   * failed to start. One waiting for its first token resolves when
   * `disconnect()` or `close()` call it off.
   */
  connect() {
    return new Promise((resolve, reject) => {
      this.ready.catch((e) => reject(toError(e)));
      this._do((d) => {
        if (this._needToken) {
          this._connectWanted = true;
          this._connectWaiters.push({ resolve, reject });
          return;
        }
        const err = this._startConnecting(d);
        err ? reject(err) : resolve();
      });
    });
  }

  // Tell the driver to connect; a setup error is known by the time it
  // returns (the driver tries to open the transport at once).
  _startConnecting(d) {
    d.connect();
    const s = d.state();
    return s.state === 'closed' && s.code === CLOSE_TRANSPORT_UNAVAILABLE ? configError(s.reason) : null;
  }

  /**
   * Pause: close the connection without reconnecting (state `idle`); queued
   * publishes stay queued and `connect()` resumes.
   */
  disconnect() {
    this._connectWanted = false;
    const waiters = this._connectWaiters;
    this._connectWaiters = [];
    for (const w of waiters) w.resolve();
    this._do((d) => d.disconnect());
  }

  /** Tell the client the network went away or came back (e.g. from wx.onNetworkStatusChange). */
  networkChanged(online) {
    this._do((d) => d.networkChanged(online));
  }

  /** Subscribe to a channel; callbacks in `options`. QoS 1 by default. */
  subscribe(channel, options = {}) {
    const qos = qosOf(options.qos, 1);
    const sub = new Subscription(this, channel, options);
    let set = this._channels.get(channel);
    if (!set) this._channels.set(channel, (set = new Set()));
    set.add(sub);
    this._do((d) => d.subscribe(channel, qos, options.token ?? ''));
    const buffered = this._orphans.get(channel);
    if (buffered) {
      this._orphans.delete(channel);
      // Not from inside subscribe(): callbacks run after it returns.
      queueMicrotask(() => {
        for (const ev of buffered) if (sub.active) sub._emit(ev);
      });
    }
    return sub;
  }

  _detach(sub) {
    const set = this._channels.get(sub.channel);
    if (!set) return;
    set.delete(sub);
    if (set.size === 0) {
      this._channels.delete(sub.channel);
      if (!this._closed) this._do((d) => d.unsubscribe(sub.channel));
    }
  }

  /**
   * Publish `data` (a Uint8Array/ArrayBuffer as is, anything else as JSON).
   * Resolves with `{ messageId, channel, epoch, offset, duplicate }` when the
   * server has stored it (QoS 2: after the release step); rejects with a
   * FerryError. QoS 1 by default.
   */
  publish(channel, data, options = {}) {
    return new Promise((resolve, reject) => {
      const qos = qosOf(options.qos, 1);
      const bytes = encodePayload(data);
      this._do((d) => {
        let id;
        try {
          id = d.publish(channel, bytes, qos);
        } catch (e) {
          reject(toError(e));
          return;
        }
        this._publishes.set(id, { resolve, reject });
      });
    });
  }

  _call(start, map) {
    return new Promise((resolve, reject) => {
      this._do((d) => {
        let id;
        try {
          id = start(d);
        } catch (e) {
          reject(toError(e));
          return;
        }
        this._calls.set(id, { resolve, reject, map });
      });
    });
  }

  /** Stored publications: `{ publications, top }`. Options: limit, reverse, sinceOffset, untilOffset, sinceTimeMs, untilTimeMs. */
  history(channel, options = {}) {
    return this._call(
      (d) => d.history(channel, options),
      (v) => ({ publications: v.publications.map((p) => new Publication(p)), top: v.top }),
    );
  }

  /** Who is subscribed: `[{ client, user, info }]`. */
  presence(channel) {
    return this._call((d) => d.presence(channel), (v) => v);
  }

  /** `{ clients, users }` counts of a channel. */
  presenceStats(channel) {
    return this._call((d) => d.presenceStats(channel), (v) => v);
  }

  /** Message ids of QoS 1/2 publishes not yet acknowledged (persisted with the storage adapter). */
  outbox() {
    return this._driver ? this._driver.outbox() : [];
  }

  /**
   * Stop for good and release everything: the last `state` event is
   * `closed` (code 1000, reason 'client closed'); the client cannot be used
   * again (calls reject with `closed`). Queued QoS 1/2 publishes stay in the
   * storage adapter for the next client.
   */
  close() {
    if (this._closed) return;
    this._closed = true;
    for (const u of this._unhook) u();
    this._unhook = [];
    if (this._driver) {
      const d = this._driver;
      this._driver = null;
      d.close();
      // Not now: close() may be called from an event callback while a
      // driver method is still on the stack.
      queueMicrotask(() => d.free());
    }
    const err = new FerryError('closed', 'client closed');
    for (const p of this._publishes.values()) p.reject(err);
    for (const c of this._calls.values()) c.reject(err);
    // A connect() still waiting for its first token was called off, like by
    // disconnect(): nothing failed, so it resolves.
    for (const w of this._connectWaiters) w.resolve();
    this._publishes.clear();
    this._calls.clear();
    this._connectWaiters = [];
  }

  _onEvent(ev) {
    if (CHANNEL_EVENTS.has(ev.type)) {
      const set = this._channels.get(ev.channel);
      if (set && set.size > 0) {
        for (const sub of [...set]) sub._emit(ev);
        if (ev.type === 'subscribe_failed' || ev.type === 'unsubscribed') this._channels.delete(ev.channel);
      } else if (ev.type !== 'subscribe_failed' && ev.type !== 'unsubscribed') {
        // A channel restored from storage that the app has not subscribed
        // to again yet: keep its events for when it does.
        let q = this._orphans.get(ev.channel);
        if (!q) this._orphans.set(ev.channel, (q = []));
        if (q.length < ORPHAN_CAP) q.push(ev);
      }
      if (ev.type === 'publication') this._emit('publication', new Publication(ev));
      else this._emit(ev.type, ev);
      return;
    }
    switch (ev.type) {
      case 'state':
        this._state = ev;
        this._emit('state', ev);
        if (ev.state === 'connected') this._emit('connected', ev);
        // Also for apps that do not await connect(): a setup error must be seen.
        if (ev.state === 'closed' && ev.code === CLOSE_TRANSPORT_UNAVAILABLE) this._emit('error', configError(ev.reason));
        return;
      case 'ack': {
        const p = this._publishes.get(ev.messageId);
        this._publishes.delete(ev.messageId);
        const ack = { messageId: ev.messageId, channel: ev.channel, epoch: ev.epoch, offset: ev.offset, duplicate: ev.duplicate };
        p?.resolve(ack);
        this._emit('ack', ack);
        return;
      }
      case 'publish_failed': {
        const p = this._publishes.get(ev.messageId);
        this._publishes.delete(ev.messageId);
        const err = toError(ev.error);
        err.messageId = ev.messageId;
        p?.reject(err);
        this._emit('publishFailed', err);
        return;
      }
      case 'call': {
        const c = this._calls.get(ev.call);
        this._calls.delete(ev.call);
        if (!c) return;
        if (ev.ok) c.resolve(c.map(ev.value));
        else c.reject(toError(ev.error));
        return;
      }
      case 'token':
        this._refreshToken();
        return;
      case 'error':
        this._emit('error', new FerryError('protocol', ev.message));
        return;
      case 'storage_error':
        this._emit('error', new FerryError('storage', ev.message));
        return;
      default:
        this._emit(ev.type, ev);
    }
  }

  _refreshToken() {
    const get = this.options.getToken;
    if (typeof get !== 'function') {
      this._do((d) => d.tokenFailed(true));
      return;
    }
    Promise.resolve()
      .then(get)
      .then(
        (t) => {
          if (!this._closed) this._do((d) => d.setToken(String(t)));
        },
        (e) => {
          this._emit('error', new FerryError('token', `getToken failed: ${e?.message ?? e}`));
          if (!this._closed) this._do((d) => d.tokenFailed(false));
        },
      );
  }
}
