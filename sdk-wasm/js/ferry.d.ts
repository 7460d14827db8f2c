// Types of the Ferry client (`ferry.js`). The protocol runs in WebAssembly;
// these are the JavaScript-facing shapes.

/** Delivery guarantee: 0 at most once, 1 at least once, 2 exactly once. */
export type Qos = 0 | 1 | 2;

/** Payload bytes, sent as they are. */
export type BinaryPayload = Uint8Array | ArrayBuffer | ArrayBufferView;

/** A JSON value as `JSON.stringify` writes it (an `undefined` property is left out). */
export type JsonValue =
  | string
  | number
  | boolean
  | null
  | JsonValue[]
  | readonly JsonValue[]
  | { [key: string]: JsonValue | undefined };

/** What `publish` accepts, as one type for annotations: bytes or a JSON value. */
export type PayloadInput = BinaryPayload | JsonValue;

/**
 * `T` when `publish` can send it, else a type nothing is assignable to (so
 * the call does not compile): bytes as they are; strings, numbers,
 * booleans, null; objects with a `toJSON` method (`Date`); arrays and plain
 * objects of those (`undefined` only as an object property, which JSON
 * leaves out). A function, symbol, bigint or `undefined` anywhere, or a
 * class instance with methods and no `toJSON` (`Map`, `Set`: JSON turns
 * them into `{}`), is rejected. Interfaces work as well as type aliases.
 * (A `T` already assignable to {@link PayloadInput} is taken as is, which
 * also keeps the recursive {@link JsonValue} from being expanded.)
 */
export type Payload<T> = T extends PayloadInput ? T : JsonEncodable<T>;

/** @internal The JSON part of {@link Payload}. */
export type JsonEncodable<T> = T extends string | number | boolean | null
  ? T
  : T extends bigint | symbol | undefined | ((...args: never[]) => unknown)
    ? never
    : T extends { toJSON(): unknown }
      ? T
      : T extends readonly unknown[]
        ? { [K in keyof T]: JsonEncodable<T[K]> }
        : T extends object
          ? { [K in keyof T]: JsonProperty<T[K]> }
          : never;

/** @internal An object property: may also be `undefined` (left out). */
export type JsonProperty<T> = T extends undefined ? undefined : JsonEncodable<T>;

/**
 * Stable error codes of {@link FerryError}. `config` is a setup error: the
 * client cannot work as configured here (no global WebSocket and no
 * `transport` option, e.g. Node 20 without `--experimental-websocket`);
 * `connect()` rejects with it and the client ends `closed` without retrying.
 * `no_transport` is what a transport adapter factory or `open` throws when
 * its platform API is missing (the client turns it into `config`).
 */
export type FerryErrorCode =
  | 'outbox_full'
  | 'expired'
  | 'too_large'
  | 'not_connected'
  | 'connection_lost'
  | 'closed'
  | 'rejected'
  | 'server'
  | 'unsubscribed'
  | 'bad_payload'
  | 'bad_qos'
  | 'no_transport'
  | 'config'
  | 'no_storage'
  | 'storage'
  | 'token'
  | 'protocol'
  | 'callback'
  | 'internal'
  | 'unknown';

/** Every error the client reports. */
export class FerryError extends Error {
  readonly name: 'FerryError';
  /** What went wrong, stable across versions. */
  readonly code: FerryErrorCode;
  /** The server's numeric error code (PROTOCOL.md), for `rejected`/`server`/`unsubscribed`. */
  readonly serverCode?: number;
  /** Whether retrying later may succeed (server errors). */
  readonly temporary?: boolean;
  /** The publish this error is about (`publishFailed` events). */
  messageId?: string;
}

/** A position in a channel stream. */
export interface StreamPosition {
  /** Stream generation; changes when history is lost or reset. */
  epoch: string;
  /** Offset of the last publication covered (0 = none). */
  offset: number;
}

/** Who published or is present. */
export interface ClientInfo {
  /** Server-assigned connection id. */
  client: string;
  /** User id from the token ('' = anonymous or backend). */
  user: string;
  /** Connection info from the token, opaque to Ferry. */
  info: Uint8Array | null;
}

/** A publication in a channel stream. */
export class Publication {
  readonly channel: string;
  readonly epoch: string;
  readonly offset: number;
  /** Publisher-chosen unique id (idempotency key). */
  readonly messageId: string;
  readonly qos: Qos;
  readonly publisher: ClientInfo | null;
  /** Server time of the append, Unix milliseconds. */
  readonly timeMs: number;
  /** The payload bytes. */
  readonly data: Uint8Array;
  /** The payload as UTF-8 text. */
  text(): string;
  /** The payload parsed as JSON (what `publish` sent for a non-bytes value). */
  json<T = unknown>(): T;
}

/** The server stored a publish. */
export interface PublishAck {
  messageId: string;
  channel: string;
  epoch: string;
  /** Stored offset in the channel stream. */
  offset: number;
  /** The server had stored this message id before (a retry). */
  duplicate: boolean;
}

/**
 * Connection states. `idle`: not started, or paused by `disconnect()`
 * (`connect()` resumes). `closed`: the terminal state, no reconnect: after
 * `close()` (code 1000, reason 'client closed'), a terminal close code from
 * the server (3500-3999), or no transport here (3506, with a `config` error).
 */
export type ConnectionStateName =
  | 'idle'
  | 'waiting_token'
  | 'connecting'
  | 'connected'
  | 'backoff'
  | 'offline'
  | 'closed';

/** A `state` event. */
export interface StateEvent {
  type: 'state';
  state: ConnectionStateName;
  /** Backoff: attempt number (0-based). */
  attempt?: number;
  /** Backoff: delay before the next attempt, ms. */
  delayMs?: number;
  /** Closed: close code. */
  code?: number;
  /** Closed: reason. */
  reason?: string;
}

/** A `disconnected` event: a connection or attempt ended. */
export interface DisconnectedEvent {
  type: 'disconnected';
  code: number;
  reason: string;
  /** Whether the client reconnects by itself. */
  reconnect: boolean;
}

/** A subscription is live. */
export interface SubscribedEvent {
  type: 'subscribed';
  channel: string;
  /** Granted QoS (may be below the one asked for). */
  qos: Qos;
  /** Delivery continues after this position. */
  position: StreamPosition;
  /** False when a gap was reported. */
  recovered: boolean;
}

/** Publications were missed and cannot be recovered. */
export interface GapEvent {
  type: 'gap';
  channel: string;
  from: StreamPosition | null;
  to: StreamPosition;
  reason: 'epoch_changed' | 'not_retained';
}

/** Someone joined or left a channel. */
export interface PresenceEvent {
  type: 'join' | 'leave';
  channel: string;
  info: ClientInfo;
}

/** Client-level events and their payloads. */
export interface FerryEvents {
  state: StateEvent;
  connected: StateEvent;
  disconnected: DisconnectedEvent;
  /** Problems that do not fail a call: storage, protocol, token provider, callbacks. */
  error: FerryError;
  /** Every publication on every channel. */
  publication: Publication;
  subscribed: SubscribedEvent;
  gap: GapEvent;
  join: PresenceEvent;
  leave: PresenceEvent;
  /** Every acknowledged publish, including ones restored from storage after a reload. */
  ack: PublishAck;
  /** Every publish that failed for good. */
  publishFailed: FerryError;
}

/** A WebSocket-shaped connection returned by a {@link Transport}. */
export interface TransportSocket {
  /** Send one message: ArrayBuffer (binary encoding) or string (json encoding). */
  send(data: ArrayBuffer | string): void;
  /** Close with a WebSocket close code and reason. */
  close(code?: number, reason?: string): void;
  /** The agreed subprotocol, or '' when the transport cannot tell. */
  readonly protocol?: string;
  onopen: ((ev: unknown) => void) | null;
  /** `data` must be an ArrayBuffer (or Uint8Array) for binary messages, a string for text. */
  onmessage: ((ev: { data: ArrayBuffer | Uint8Array | string }) => void) | null;
  onclose: ((ev: { code?: number; reason?: string }) => void) | null;
  onerror: ((ev: unknown) => void) | null;
}

/**
 * Opens connections. Callbacks must fire asynchronously (never from inside
 * `open` or `send`). Shipped: {@link webSocketTransport} (default),
 * {@link miniProgramTransport}, {@link reactNativeTransport}.
 */
export interface Transport {
  /** Open a connection to `url` asking for WebSocket subprotocol `protocol`. */
  open(url: string, protocol: string): TransportSocket;
}

/**
 * Keeps the client's durable state (outbox, stream positions, dedup
 * window) as one text value per key. `save` may return a promise: frames
 * that depend on the state wait for it. Shipped: {@link memoryStorage},
 * {@link localStorageStorage}, {@link indexedDbStorage}, {@link miniProgramStorage}.
 */
export interface StorageAdapter {
  load(key: string): string | null | undefined | Promise<string | null | undefined>;
  save(key: string, value: string): void | Promise<void>;
}

/** Options of {@link FerryClient}. */
export interface FerryClientOptions {
  /** Connection token (with development auth, the user id). */
  token?: string;
  /** Token provider: gives the first token when `token` is absent (retried with backoff if it fails; the client works offline meanwhile), and new ones before expiry and after a token-expired close. */
  getToken?: () => Promise<string> | string;
  /** Stable id of this device/installation; defaults to the stored one, else a random one. */
  deviceId?: string;
  /** Wire encoding: 'binary' (postcard, default) or 'json'. */
  encoding?: 'binary' | 'json';
  /** Durable state; default: in the client's memory only (lost on reload). */
  storage?: StorageAdapter;
  /** Storage key; default `ferry:<deviceId or 'default'>`. */
  storageKey?: string;
  /** Transport; default: the global WebSocket. */
  transport?: Transport;
  /** Offer payload compression (default true). */
  compression?: boolean;
  /** Reconnect delays (default 500 ms to 20 s, with jitter). */
  backoff?: { minMs?: number; maxMs?: number };
  /** Deadline to open and authenticate a connection (default 10 s). */
  connectTimeoutMs?: number;
  /** Deadline for any reply; past it the link counts as dead (default 15 s). */
  requestTimeoutMs?: number;
  /** A publish not stored within this time fails with 'expired' (default 24 h). */
  messageTtlMs?: number;
  /** Outbox bounds (default 1000 messages, 8 MiB). */
  outbox?: { maxMessages?: number; maxBytes?: number };
  /** QoS 0 publish while disconnected: fail (default) or queue in memory. */
  qos0Offline?: 'fail' | 'queue';
  /** Listen to online/offline and visibilitychange (default true). */
  networkEvents?: boolean;
  /**
   * Seed (a non-negative safe integer) for backoff jitter, message-id
   * nonces and the choice of the first server URL; random by default.
   * For reproducible tests.
   */
  seed?: number;
  /** Name and version reported to the server. */
  clientName?: string;
  clientVersion?: string;
}

/** Callbacks and settings of one subscription. */
export interface SubscribeOptions {
  /** Delivery QoS (default 1). QoS 1/2 resume after the last position on reconnect and reload. */
  qos?: Qos;
  /** Subscription token for a private channel. */
  token?: string;
  onPublication?: (p: Publication) => void;
  onJoin?: (who: ClientInfo) => void;
  onLeave?: (who: ClientInfo) => void;
  onGap?: (gap: GapEvent) => void;
  onSubscribed?: (ev: SubscribedEvent) => void;
  /** The server refused or ended the subscription; it is over. */
  onError?: (err: FerryError) => void;
}

/** A subscription handle. */
export class Subscription {
  readonly channel: string;
  /** False once unsubscribed or ended by the server. */
  readonly active: boolean;
  /** Stop this subscription's callbacks (and the server subscription when it is the last one). */
  unsubscribe(): void;
}

/** History query options. */
export interface HistoryOptions {
  /** At most this many publications (default 100; the server caps it). */
  limit?: number;
  /** Newest first. */
  reverse?: boolean;
  sinceOffset?: number;
  untilOffset?: number;
  sinceTimeMs?: number;
  untilTimeMs?: number;
}

/** A history answer. */
export interface HistoryResult {
  publications: Publication[];
  /** The stream's current position. */
  top: StreamPosition;
}

/** A Ferry client. */
export class FerryClient {
  /**
   * `url` is one server URL or several (the nodes of one cluster): the
   * client starts on one picked at random, stays there while it works, and
   * after a failed attempt or a lost connection tries the next one in the
   * list after the usual backoff, recovering subscriptions by offsets.
   * Throws `FerryError` code `config` when a URL is not `ws://host...` or
   * `wss://host...`, or the list is empty.
   */
  constructor(url: string | readonly string[], options?: FerryClientOptions);
  /** The server URLs, in order. */
  readonly urls: readonly string[];
  /** The first server URL. */
  readonly url: string;
  /** Resolves once the wasm module, stored state and first token are loaded. */
  readonly ready: Promise<void>;
  /** The device id in use (after `ready`). */
  readonly deviceId?: string;
  /** The current connection state. */
  readonly state: ConnectionStateName;
  /**
   * Start connecting; the client reconnects by itself until `disconnect` or
   * `close`. Resolves once connecting has started (not once connected: use
   * the `connected` event); with `getToken` and no `token`, once the first
   * token came (or when `disconnect`/`close` call it off). Rejects at once
   * with a {@link FerryError} of code `config` when no transport can be
   * opened here (state `closed` with code 3506, no retry), with `closed`
   * after `close()`, and with the start error if the client could not start.
   */
  connect(): Promise<void>;
  /** Pause: disconnect without reconnecting (state `idle`); queued publishes stay queued; `connect()` resumes. */
  disconnect(): void;
  /** Report a network change (online: reconnect at once). Browsers do this by themselves. */
  networkChanged(online: boolean): void;
  /** Listen to a client-level event; returns a function that stops listening. */
  on<E extends keyof FerryEvents>(event: E, fn: (payload: FerryEvents[E]) => void): () => void;
  /** Subscribe to a channel. */
  subscribe(channel: string, options?: SubscribeOptions): Subscription;
  /**
   * Publish bytes as they are or a JSON value as its UTF-8 JSON text ({@link Payload}
   * says what compiles); resolves when the server stored it, rejects with a {@link FerryError}.
   */
  publish<T>(channel: string, data: T & Payload<T>, options?: { qos?: Qos }): Promise<PublishAck>;
  /** Stored publications of a channel (needs a live connection). */
  history(channel: string, options?: HistoryOptions): Promise<HistoryResult>;
  /** Who is subscribed to a channel (needs a live connection). */
  presence(channel: string): Promise<ClientInfo[]>;
  /** Client and user counts of a channel (needs a live connection). */
  presenceStats(channel: string): Promise<{ clients: number; users: number }>;
  /** Message ids of QoS 1/2 publishes not yet acknowledged. */
  outbox(): string[];
  /**
   * Stop for good and release the client: the last `state` event is
   * `closed` (code 1000, reason 'client closed'); later calls reject with
   * `closed`. Queued QoS 1/2 publishes stay in the storage adapter.
   */
  close(): void;
}

/** Encode a payload the way `publish` does. */
export function encodePayload<T>(data: T & Payload<T>): Uint8Array;

/** The default transport: a WebSocket constructor (default: the global one), binaryType 'arraybuffer'. */
export function webSocketTransport(WebSocketImpl?: unknown): Transport;
/** React Native's WebSocket, optionally with headers (e.g. an allowed Origin). */
export function reactNativeTransport(options?: { headers?: Record<string, string>; WebSocket?: unknown }): Transport;
/** The shape of `wx` / `uni` / `my` that {@link miniProgramTransport} uses. */
export interface MiniProgramSocketApi {
  connectSocket(options: {
    url: string;
    protocols?: string[];
    header?: Record<string, string>;
    timeout?: number;
    complete?: () => void;
    fail?: (err: { errMsg?: string }) => void;
  }): {
    send(options: { data: ArrayBuffer | string; fail?: (err: { errMsg?: string }) => void }): void;
    close(options: { code?: number; reason?: string }): void;
    onOpen(fn: (res: unknown) => void): void;
    onMessage(fn: (res: { data: ArrayBuffer | string }) => void): void;
    onClose(fn: (res: { code?: number; reason?: string }) => void): void;
    onError(fn: (err: { errMsg?: string }) => void): void;
  };
}
/** Mini-program sockets: `miniProgramTransport(wx)` or `miniProgramTransport(uni)`. */
export function miniProgramTransport(
  api: MiniProgramSocketApi,
  extra?: { header?: Record<string, string>; timeout?: number },
): Transport;

/** In-memory storage (shared by clients given the same object; lost on reload). */
export function memoryStorage(): StorageAdapter;
/** `localStorage` (synchronous). */
export function localStorageStorage(ls?: Storage): StorageAdapter;
/** IndexedDB (asynchronous; frames and events wait for each commit, so nothing is shown before it is stored). */
export function indexedDbStorage(dbName?: string, idb?: IDBFactory): StorageAdapter;
/** Mini-program key-value storage (`wx.setStorageSync` / `uni.setStorageSync`). */
export function miniProgramStorage(api: {
  getStorageSync(key: string): unknown;
  setStorageSync(key: string, value: string): void;
}): StorageAdapter;
