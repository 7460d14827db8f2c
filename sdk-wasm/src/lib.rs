//! # ferry-wasm
//!
//! The browser, Node and mini-program driver of `ferry_core::client::ClientSession`,
//! compiled to `wasm32-unknown-unknown` with wasm-bindgen and packaged by
//! wasm-pack. Applications use the JavaScript API in `js/ferry.js`
//! (`FerryClient`); this crate exports one low-level class, [`Driver`],
//! that the JavaScript wrapper owns.
//!
//! The driver moves bytes and arms one timer; every protocol rule lives in
//! the core. One drive step looks like this:
//!
//! 1. An input arrives: a command from JavaScript (`publish`, `subscribe`,
//!    ...), a transport callback, the timer, or a storage write finishing.
//!    Transport, timer and storage callbacks only queue the input; whoever
//!    holds the session handles the queue before letting go of it.
//! 2. The session is drained until it answers `Output::Timeout`: `Open`
//!    opens a socket through the transport adapter (or the global
//!    `WebSocket`), `Transmit` frames are held, `Persist` changes are applied
//!    to a [`Snapshot`], app events are queued, and the timeout arms a single
//!    `setTimeout` on `globalThis`.
//! 3. If durable state changed, it is written to the storage adapter, and the
//!    held frames leave only once that write has finished (see
//!    [`Driver`] for the exact guarantee).
//! 4. With the session released, queued events go to the JavaScript
//!    callback one by one. A callback that calls back into the driver (say, a
//!    publish from a message handler) runs a fresh step of its own; its
//!    events join the queue, so no callback ever runs while the session is
//!    borrowed.
//!
//! ```text
//! // From JavaScript, through the wrapper (see README.md):
//! const client = new FerryClient('ws://127.0.0.1:8000/ws', { token: 'alice' });
//! client.subscribe('chat:lobby', { onPublication: (p) => console.log(p.json()) });
//! client.connect();
//! await client.publish('chat:lobby', { text: 'hi' }, { qos: 1 });
//! ```

mod convert;
mod host;

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::{Rc, Weak};

use ferry_core::client::{ClientConfig, ClientSession, ConnId, Input, Output, Qos0Offline, Snapshot};
use ferry_core::codec::Encoding;
use ferry_core::frame::{ClientVersion, Command, HistoryBound, HistoryRequest, Qos};
use ferry_core::Instant;
use js_sys::{Function, Promise, Uint8Array};
use wasm_bindgen::prelude::*;
use wasm_bindgen::JsCast;

use host::{Socket, Storage, Transport};

/// Longest single `setTimeout` armed (browsers overflow past 2^31-1 ms).
/// A timer that fires early is harmless: the session re-arms it.
const MAX_TIMER_MS: f64 = 3_600_000.0;
/// Inputs handled in one drive step before yielding (a bound, not a tuning knob).
const MAX_INPUTS_PER_STEP: usize = 100_000;
/// Outputs drained in one step before giving up (a session never produces this many).
const MAX_OUTPUTS_PER_STEP: usize = 1_000_000;

/// The version of the persisted envelope (`{ v, device_id, snapshot }`).
const STORAGE_VERSION: u32 = 1;

/// Inputs that arrive through callbacks and wait for the session.
enum HostInput {
    Opened(ConnId),
    Message(ConnId, Vec<u8>),
    Closed(ConnId, Option<u16>, String),
    /// No transport can be opened here at all (a setup error).
    Unavailable(ConnId, String),
    Timer,
    Saved(Result<(), String>),
}

/// What the JavaScript side shares with the callbacks: the session (in
/// `inner`), the input queue, and the event queue.
struct Shared {
    inner: RefCell<Inner>,
    inbox: RefCell<VecDeque<HostInput>>,
    events: RefCell<VecDeque<JsValue>>,
    delivering: Cell<bool>,
    on_event: Function,
}

/// One open transport and the callbacks that keep it talking to us.
struct Link {
    conn: ConnId,
    socket: Socket,
    _callbacks: Vec<Closure<dyn FnMut(JsValue)>>,
}

impl Link {
    /// Unhook, then close: a transport may fire its events synchronously
    /// from `close()`, and they must not reach closures about to be freed.
    fn shut(self, code: u16, reason: &str) {
        let socket: Socket = self.socket.clone().unchecked_into();
        drop(self);
        // Browsers accept only 1000 and 3000-4999 from scripts.
        if socket.close_with(code, reason).is_err() {
            let _ = socket.close_with(1000, reason);
        }
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        // A socket outlives our interest in it (its close event comes later);
        // the closures die here, so unhook them first or a late event would
        // call a freed closure.
        self.socket.set_onopen(None);
        self.socket.set_onmessage(None);
        self.socket.set_onclose(None);
        self.socket.set_onerror(None);
    }
}

struct Timer {
    handle: JsValue,
    at: Instant,
    _callback: Closure<dyn FnMut()>,
}

struct Inner {
    weak: Weak<Shared>,
    session: ClientSession,
    /// Server URLs; the session names one by index in `Output::Open`.
    urls: Vec<String>,
    encoding: Encoding,
    transport: Option<Transport>,
    link: Option<Link>,
    timer: Option<Timer>,
    clock: host::Clock,
    storage: Option<(Storage, String)>,
    device_id: String,
    snapshot: Snapshot,
    /// Durable state changed since the last write started.
    dirty: bool,
    /// A storage write is in flight; frames wait for it.
    saving: bool,
    save_callbacks: Vec<Closure<dyn FnMut(JsValue)>>,
    /// Frames waiting for durable state to be written.
    held: VecDeque<(ConnId, Vec<u8>)>,
    /// How many leading `held` frames the write in flight covers (they go
    /// when it ends; later ones wait for the next write). Without this
    /// prefix, steady traffic would keep a write always in flight and hold
    /// every frame until the traffic paused.
    held_covered: usize,
    /// App events not yet handed to `Shared::events`: those of the current
    /// step, and all events while a storage write is in flight.
    events: Vec<JsValue>,
    /// How many leading `events` the write in flight covers.
    events_covered: usize,
    /// How many leading `events` may be handed over at the end of this step.
    events_ready: usize,
    /// `close()` is running: events go at once, not after a write.
    closing: bool,
}

/// The low-level driver behind `FerryClient`: owns one `ClientSession`,
/// its transport, its timer and its storage writes.
///
/// Storage guarantee: after every step, if durable state (outbox, positions,
/// dedup window, message-id sequence) changed, the whole snapshot is written
/// with `storage.save(key, json)`; frames produced in that step or while a
/// write is in flight are held and sent, in order, only after the write
/// finished (synchronously, or when its promise settles). So a publish never
/// reaches the server before its outbox entry is stored, and an ack never
/// confirms a delivery whose position is not stored. App events wait the
/// same way, so with asynchronous storage (IndexedDB) a publication reaches
/// the app only once its position is committed: an app killed mid-write
/// gets it again on the next start and has never shown it, rather than
/// showing it twice. `close()` releases at once the events the write in
/// flight covers (it still commits) and drops later ones, which the next
/// start receives again; the `closed` state event that ends the session
/// always comes. A failed write is reported as a
/// `storage_error` event and the frames go anyway (the state then survives
/// only in memory).
#[wasm_bindgen]
pub struct Driver {
    shared: Rc<Shared>,
}

#[wasm_bindgen]
impl Driver {
    /// Create a driver. `options` holds `urls` (or one `url`) and the optional settings the
    /// JavaScript wrapper documents; `saved` is what the storage adapter
    /// returned for the key (or `undefined`); `on_event` receives every event.
    #[wasm_bindgen(constructor)]
    pub fn new(options: JsValue, saved: Option<String>, on_event: Function) -> Result<Driver, JsError> {
        let o = convert::Opts(options);
        // `urls` (an array, from the wrapper) or a single `url`.
        let urls: Vec<String> = match o.get("urls") {
            Some(v) if js_sys::Array::is_array(&v) => {
                let a: js_sys::Array = v.unchecked_into();
                let mut urls = Vec::with_capacity(a.length() as usize);
                for v in a.iter() {
                    urls.push(v.as_string().ok_or_else(|| JsError::new("options.urls must hold strings"))?);
                }
                urls
            }
            _ => o.string("url").into_iter().collect(),
        };
        if urls.is_empty() {
            return Err(JsError::new("options.urls (or options.url) is required"));
        }
        let seed = (u64::from(o.u32("seedHi").unwrap_or(0)) << 32) | u64::from(o.u32("seedLo").unwrap_or(0));

        let restored = match saved.as_deref() {
            Some(text) if !text.is_empty() => Some(
                convert::parse_saved(text)
                    .map_err(|e| JsError::new(&format!("stored client state is unreadable: {e}")))?,
            ),
            _ => None,
        };
        let device_id = o
            .string("deviceId")
            .filter(|d| !d.is_empty())
            .or_else(|| restored.as_ref().map(|(d, _)| d.clone()).filter(|d| !d.is_empty()))
            .unwrap_or_else(|| format!("web-{seed:016x}"));

        let mut cfg = ClientConfig::new(device_id.clone());
        cfg.token = o.string("token").unwrap_or_default();
        cfg.refreshable = o.bool("refreshable").unwrap_or(false);
        cfg.client = ClientVersion {
            name: o.string("clientName").unwrap_or_else(|| "ferry-wasm".into()),
            version: o.string("clientVersion").unwrap_or_else(|| env!("CARGO_PKG_VERSION").into()),
        };
        cfg.encoding = match o.string("encoding").as_deref() {
            None | Some("binary") => Encoding::Binary,
            Some("json") => Encoding::Json,
            Some(other) => return Err(JsError::new(&format!("unknown encoding {other:?} (binary or json)"))),
        };
        if let Some(c) = o.bool("compression") {
            cfg.compression = c;
        }
        if let Some(v) = o.ms("backoffMinMs") {
            cfg.backoff_min = v;
        }
        if let Some(v) = o.ms("backoffMaxMs") {
            cfg.backoff_max = v;
        }
        if let Some(v) = o.ms("connectTimeoutMs") {
            cfg.connect_timeout = v;
        }
        if let Some(v) = o.ms("requestTimeoutMs") {
            cfg.request_timeout = v;
        }
        if let Some(v) = o.ms("messageTtlMs") {
            cfg.message_ttl = v;
        }
        if let Some(v) = o.u32("outboxMaxMessages") {
            cfg.outbox_max_messages = v as usize;
        }
        if let Some(v) = o.u32("outboxMaxBytes") {
            cfg.outbox_max_bytes = v as usize;
        }
        if o.string("qos0Offline").as_deref() == Some("queue") {
            cfg.qos0_offline = Qos0Offline::Queue;
        }
        // The core picks among the URLs by index (PROTOCOL.md 9.2).
        cfg.endpoints = urls.len();
        let encoding = cfg.encoding;
        let dedup = cfg.dedup_window;

        let transport = o.get("transport").filter(|t| t.is_object()).map(JsCast::unchecked_into::<Transport>);
        let storage = o.get("storage").filter(|s| s.is_object()).map(|s| {
            let key = o.string("storageKey").unwrap_or_else(|| format!("ferry:{device_id}"));
            (s.unchecked_into::<Storage>(), key)
        });

        let clock = host::Clock::new();
        let now = clock.now();
        let (session, snapshot) = match restored {
            Some((_, snap)) => {
                let session = ClientSession::restore(cfg, seed, &snap, now);
                // The session's view: expiry instants clamped to this load's clock.
                let snap = session.snapshot();
                (session, snap)
            }
            None => (ClientSession::new(cfg, seed), Snapshot { seen_cap: dedup, ..Snapshot::default() }),
        };

        let shared = Rc::new_cyclic(|weak| Shared {
            inner: RefCell::new(Inner {
                weak: weak.clone(),
                session,
                urls,
                encoding,
                transport,
                link: None,
                timer: None,
                clock,
                storage,
                device_id,
                snapshot,
                dirty: false,
                saving: false,
                save_callbacks: Vec::new(),
                held: VecDeque::new(),
                held_covered: 0,
                events: Vec::new(),
                events_covered: 0,
                events_ready: 0,
                closing: false,
            }),
            inbox: RefCell::new(VecDeque::new()),
            events: RefCell::new(VecDeque::new()),
            delivering: Cell::new(false),
            on_event,
        });
        // The first drain persists the message-id identity of a new session.
        shared.step(|_, _| ());
        Ok(Driver { shared })
    }

    /// The device id in use (given, restored, or generated).
    #[wasm_bindgen(js_name = deviceId)]
    pub fn device_id(&self) -> String {
        self.shared.inner.borrow().device_id.clone()
    }

    /// Start connecting; reconnects until `disconnect` or a terminal close.
    pub fn connect(&self) {
        self.shared.step(|i, now| i.session.connect(now));
    }

    /// Close without reconnecting; the outbox is kept.
    pub fn disconnect(&self) {
        self.shared.step(|i, now| i.session.disconnect(now));
    }

    /// Subscribe (`qos` 0, 1 or 2; `token` for a private channel, or empty).
    pub fn subscribe(&self, channel: &str, qos: u8, token: &str) -> Result<(), JsError> {
        let qos = qos_from(qos)?;
        self.shared.step(|i, now| i.session.subscribe_with_token(now, channel, qos, token.to_string()));
        Ok(())
    }

    /// Unsubscribe and forget the channel's position.
    pub fn unsubscribe(&self, channel: &str) {
        self.shared.step(|i, now| i.session.unsubscribe(now, channel));
    }

    /// Publish; returns the message id that the later `ack` or
    /// `publish_failed` event names, or throws an error object
    /// `{ code, message, ... }`.
    pub fn publish(&self, channel: &str, data: Vec<u8>, qos: u8) -> Result<String, JsValue> {
        let qos = qos_from(qos)?;
        self.shared.step(|i, now| i.session.publish(now, channel, data, qos)).map_err(|e| convert::publish_error(&e))
    }

    /// History of a channel; the answer comes as a `call` event with the
    /// returned id. `options`: `limit`, `reverse`, `sinceOffset`,
    /// `untilOffset`, `sinceTimeMs`, `untilTimeMs`.
    pub fn history(&self, channel: &str, options: JsValue) -> Result<f64, JsValue> {
        let o = convert::Opts(options);
        let bound = |offset: &str, time: &str| match (o.f64(offset), o.f64(time)) {
            (Some(v), _) => Some(HistoryBound::Offset(v as u64)),
            (None, Some(t)) => Some(HistoryBound::TimeMs(t as u64)),
            (None, None) => None,
        };
        let req = HistoryRequest {
            channel: channel.into(),
            since: bound("sinceOffset", "sinceTimeMs"),
            until: bound("untilOffset", "untilTimeMs"),
            limit: o.u32("limit").unwrap_or(100),
            reverse: o.bool("reverse").unwrap_or(false),
        };
        self.call(Command::History(req))
    }

    /// Who is subscribed to a channel (answer as a `call` event).
    pub fn presence(&self, channel: &str) -> Result<f64, JsValue> {
        self.call(Command::Presence { channel: channel.into() })
    }

    /// Client and user counts of a channel (answer as a `call` event).
    #[wasm_bindgen(js_name = presenceStats)]
    pub fn presence_stats(&self, channel: &str) -> Result<f64, JsValue> {
        self.call(Command::PresenceStats { channel: channel.into() })
    }

    /// Supply a token after a `token` event.
    #[wasm_bindgen(js_name = setToken)]
    pub fn set_token(&self, token: String) {
        self.shared.step(|i, now| i.session.set_token(now, token));
    }

    /// The token provider failed; `terminal` stops the client.
    #[wasm_bindgen(js_name = tokenFailed)]
    pub fn token_failed(&self, terminal: bool) {
        self.shared.step(|i, now| i.session.token_failed(now, terminal));
    }

    /// The network went away or came back (or the page became visible):
    /// `online` after being offline or in backoff reconnects at once.
    #[wasm_bindgen(js_name = networkChanged)]
    pub fn network_changed(&self, online: bool) {
        self.shared.step(|i, now| i.session.handle_input(now, Input::NetworkChanged { online }));
    }

    /// The connection state as a `state` event object.
    pub fn state(&self) -> JsValue {
        convert::state(&self.shared.inner.borrow().session.state())
    }

    /// Message ids waiting in the outbox (QoS 1/2, persisted), oldest first.
    pub fn outbox(&self) -> Vec<String> {
        self.shared.inner.borrow().session.snapshot().outbox.into_iter().map(|r| r.message_id).collect()
    }

    /// Whether a storage write is in flight (frames are held until it ends).
    #[wasm_bindgen(js_name = savePending)]
    pub fn save_pending(&self) -> bool {
        let i = self.shared.inner.borrow();
        i.saving || i.dirty
    }

    /// Stop for good: hand over the events the storage write in flight
    /// covers, close the session (its last event is the `closed` state),
    /// cancel the timer and unhook the transport.
    pub fn close(&self) {
        // The write in flight still commits, and nothing would deliver what it
        // covers again, so the app sees that now. Later events are dropped:
        // no write will store their positions (the driver is going away), so
        // the next start gets them from the server; showing them now would
        // show them twice.
        let waiting: Vec<JsValue> = {
            let mut i = self.shared.inner.borrow_mut();
            let covered = i.events_ready.max(i.events_covered).min(i.events.len());
            i.events_covered = 0;
            i.events_ready = 0;
            let waiting = i.events.drain(..covered).collect();
            i.events.clear();
            i.closing = true;
            waiting
        };
        self.shared.events.borrow_mut().extend(waiting);
        // What closing itself reports (the `closed` state, failed calls)
        // depends on no durable state, so `closing` lets it through even
        // while a write is in flight.
        self.shared.step(|i, now| i.session.close(now));
        let mut i = self.shared.inner.borrow_mut();
        if let Some(t) = i.timer.take() {
            host::clear_timeout(&t.handle);
        }
        if let Some(l) = i.link.take() {
            l.shut(1000, "client closed");
        }
        // A storage promise may still settle after the driver is freed; its
        // callbacks must stay callable (they find no driver and do nothing).
        for cb in i.save_callbacks.drain(..) {
            cb.forget();
        }
    }
}

impl Driver {
    fn call(&self, cmd: Command) -> Result<f64, JsValue> {
        self.shared.step(|i, now| i.session.call(now, cmd)).map(|id| id as f64).map_err(|e| convert::call_error(&e))
    }
}

fn qos_from(q: u8) -> Result<Qos, JsError> {
    Qos::from_u8(q).ok_or_else(|| JsError::new("qos must be 0, 1 or 2"))
}

impl Shared {
    /// Run `f` on the session, handle queued inputs, drain, then deliver
    /// events with the session released.
    fn step<R>(self: &Rc<Self>, f: impl FnOnce(&mut Inner, Instant) -> R) -> R {
        let r = {
            let mut inner = self.inner.borrow_mut();
            let now = inner.clock.now();
            let r = f(&mut inner, now);
            self.settle(&mut inner);
            r
        };
        self.deliver();
        r
    }

    /// A callback queued an input: handle it now unless someone holds the
    /// session (they handle the queue before letting go).
    fn pump(self: &Rc<Self>) {
        let Ok(mut inner) = self.inner.try_borrow_mut() else {
            return;
        };
        self.settle(&mut inner);
        drop(inner);
        self.deliver();
    }

    /// Drain the session, then handle queued inputs until none is left.
    fn settle(&self, inner: &mut Inner) {
        for _ in 0..MAX_INPUTS_PER_STEP {
            inner.drain();
            let next = self.inbox.borrow_mut().pop_front();
            match next {
                Some(input) => inner.handle(input),
                None => break,
            }
        }
        let ready = inner.events_ready.min(inner.events.len());
        self.events.borrow_mut().extend(inner.events.drain(..ready));
        inner.events_covered = inner.events_covered.saturating_sub(ready);
        inner.events_ready = 0;
    }

    /// Hand queued events to JavaScript, one at a time, outside any borrow.
    fn deliver(&self) {
        if self.delivering.replace(true) {
            // An outer delivery loop is running (we are inside a callback):
            // it will pick these up in order.
            return;
        }
        loop {
            let next = self.events.borrow_mut().pop_front();
            let Some(ev) = next else { break };
            // The wrapper catches its own handlers' errors; an exception
            // escaping here must not stop the remaining events.
            let _ = self.on_event.call1(&JsValue::NULL, &ev);
        }
        self.delivering.set(false);
    }

    fn push(self: &Rc<Self>, input: HostInput) {
        self.inbox.borrow_mut().push_back(input);
        self.pump();
    }
}

impl Inner {
    fn handle(&mut self, input: HostInput) {
        let now = self.clock.now();
        match input {
            HostInput::Opened(conn) => {
                let Some(link) = self.link.as_ref().filter(|l| l.conn == conn) else { return };
                // A transport that reports the agreed subprotocol must agree to ours.
                let expected = self.encoding.subprotocol();
                match link.socket.protocol() {
                    Some(p) if !p.is_empty() && p != expected => {
                        if let Some(l) = self.link.take() {
                            l.shut(1000, "subprotocol mismatch");
                        }
                        let reason = format!("server did not agree to subprotocol {expected}");
                        self.session.handle_input(now, Input::TransportClosed { conn, code: None, reason });
                    }
                    _ => self.session.handle_input(now, Input::TransportOpened { conn }),
                }
            }
            HostInput::Message(conn, data) => {
                self.session.handle_input(now, Input::TransportMessage { conn, data: &data });
            }
            HostInput::Closed(conn, code, reason) => {
                if self.link.as_ref().is_some_and(|l| l.conn == conn) {
                    if let Some(l) = self.link.take() {
                        l.shut(1000, "");
                    }
                }
                self.session.handle_input(now, Input::TransportClosed { conn, code, reason });
            }
            HostInput::Unavailable(conn, reason) => {
                self.session.handle_input(now, Input::TransportUnavailable { conn, reason });
            }
            HostInput::Timer => {
                self.timer = None;
                self.session.handle_input(now, Input::Timeout);
            }
            HostInput::Saved(result) => {
                self.saving = false;
                self.save_callbacks.clear();
                if let Err(e) = result {
                    // Reported with what the failed write covered, not after later events.
                    let at = self.events_covered.min(self.events.len());
                    self.events.insert(at, convert::simple("storage_error", &e));
                    self.events_covered = at + 1;
                }
                // What the write covered goes now; the rest waits for `drain`.
                let covered = std::mem::take(&mut self.held_covered);
                self.flush(covered);
                self.events_ready = self.events_ready.max(std::mem::take(&mut self.events_covered));
            }
        }
    }

    /// Poll until the session waits; then persist and release frames.
    fn drain(&mut self) {
        let mut deadline = None;
        for _ in 0..MAX_OUTPUTS_PER_STEP {
            let now = self.clock.now();
            match self.session.poll_output(now) {
                Output::Timeout(t) => {
                    deadline = t;
                    break;
                }
                Output::Open { conn, endpoint } => self.open(conn, endpoint),
                Output::Transmit { conn, data } => self.held.push_back((conn, data)),
                Output::Close { conn, code, reason } => self.close_link(conn, code, &reason),
                Output::Event(ferry_core::client::Event::Persist(change)) => {
                    self.snapshot.apply(&change);
                    self.dirty = true;
                }
                Output::Event(e) => self.events.push(convert::event(e)),
            }
        }
        self.arm(deadline);
        if self.dirty && !self.saving {
            self.save();
            if self.saving {
                // The snapshot being written includes every change behind
                // the frames and events so far.
                self.held_covered = self.held.len();
                self.events_covered = self.events.len();
            }
        }
        if !self.saving {
            self.flush(self.held.len());
        }
        if !self.saving || self.closing {
            self.events_ready = self.events.len();
        }
    }

    fn arm(&mut self, deadline: Option<Instant>) {
        if self.timer.as_ref().map(|t| t.at) == deadline {
            return;
        }
        if let Some(t) = self.timer.take() {
            host::clear_timeout(&t.handle);
        }
        let Some(at) = deadline else { return };
        let delay = (at.as_millis().saturating_sub(self.clock.now().as_millis()) as f64).min(MAX_TIMER_MS);
        let weak = self.weak.clone();
        let cb = Closure::<dyn FnMut()>::new(move || {
            if let Some(s) = weak.upgrade() {
                s.push(HostInput::Timer);
            }
        });
        let handle = host::set_timeout(cb.as_ref().unchecked_ref(), delay);
        self.timer = Some(Timer { handle, at, _callback: cb });
    }

    fn save(&mut self) {
        let Some((storage, key)) = &self.storage else {
            self.dirty = false;
            return;
        };
        self.dirty = false;
        let text = convert::saved_text(STORAGE_VERSION, &self.device_id, &self.snapshot);
        match storage.save(key, &text) {
            Ok(r) if r.is_undefined() || r.is_null() => {}
            Ok(r) => {
                // Asynchronous storage (IndexedDB): frames wait for the promise.
                self.saving = true;
                let ok = self.weak.clone();
                let err = self.weak.clone();
                let on_ok = Closure::<dyn FnMut(JsValue)>::new(move |_| {
                    if let Some(s) = ok.upgrade() {
                        s.push(HostInput::Saved(Ok(())));
                    }
                });
                let on_err = Closure::<dyn FnMut(JsValue)>::new(move |e: JsValue| {
                    if let Some(s) = err.upgrade() {
                        s.push(HostInput::Saved(Err(host::describe(&e))));
                    }
                });
                let _ = Promise::resolve(&r).then2(&on_ok, &on_err);
                self.save_callbacks = vec![on_ok, on_err];
            }
            Err(e) => self.events.push(convert::simple("storage_error", &host::describe(&e))),
        }
    }

    /// Send the first `n` held frames on the current link; frames for an
    /// older link are dropped.
    fn flush(&mut self, n: usize) {
        for _ in 0..n {
            let Some((conn, data)) = self.held.pop_front() else { break };
            let Some(link) = self.link.as_ref().filter(|l| l.conn == conn) else {
                continue;
            };
            let msg = if self.encoding.is_text() {
                JsValue::from_str(&String::from_utf8_lossy(&data))
            } else {
                let arr = Uint8Array::new_with_length(data.len() as u32);
                arr.copy_from(&data);
                arr.buffer().into()
            };
            if let Err(e) = link.socket.send(&msg) {
                let reason = format!("send failed: {}", host::describe(&e));
                self.held.clear();
                self.held_covered = 0;
                if let Some(s) = self.weak.upgrade() {
                    s.inbox.borrow_mut().push_back(HostInput::Closed(conn, None, reason));
                }
                return;
            }
        }
    }

    fn close_link(&mut self, conn: ConnId, code: u16, reason: &str) {
        if !self.saving {
            // Frames the session queued before deciding to close still go first.
            self.flush(self.held.len());
        }
        // Drop this link's frames, keeping the covered prefix count right.
        let covered = self.held_covered;
        let mut kept_covered = 0;
        let mut i = 0;
        self.held.retain(|(c, _)| {
            let keep = *c != conn;
            if keep && i < covered {
                kept_covered += 1;
            }
            i += 1;
            keep
        });
        self.held_covered = kept_covered;
        if self.link.as_ref().is_some_and(|l| l.conn == conn) {
            if let Some(l) = self.link.take() {
                l.shut(code, reason);
            }
        }
    }

    fn open(&mut self, conn: ConnId, endpoint: usize) {
        if let Some(l) = self.link.take() {
            l.shut(1000, "replaced");
        }
        let proto = self.encoding.subprotocol();
        // The core keeps `endpoint` below the URL count.
        let url = &self.urls[endpoint % self.urls.len()];
        let socket = match &self.transport {
            Some(t) => host::open_with(t, url, proto),
            None => host::open_websocket(url, proto),
        };
        let socket = match socket {
            Ok(s) => s,
            Err(e) => {
                let input = match e {
                    host::OpenError::Unavailable(reason) => HostInput::Unavailable(conn, reason),
                    host::OpenError::Failed(e) => {
                        HostInput::Closed(conn, None, format!("cannot open transport: {}", host::describe(&e)))
                    }
                };
                if let Some(s) = self.weak.upgrade() {
                    s.inbox.borrow_mut().push_back(input);
                }
                return;
            }
        };
        let w = self.weak.clone();
        let on_open = Closure::<dyn FnMut(JsValue)>::new(move |_ev: JsValue| {
            if let Some(s) = w.upgrade() {
                s.push(HostInput::Opened(conn));
            }
        });
        let w = self.weak.clone();
        let on_message = Closure::<dyn FnMut(JsValue)>::new(move |ev: JsValue| {
            let Some(s) = w.upgrade() else { return };
            match host::message_bytes(&ev) {
                Ok(data) => s.push(HostInput::Message(conn, data)),
                Err(e) => s.push(HostInput::Closed(conn, None, e)),
            }
        });
        let w = self.weak.clone();
        let on_close = Closure::<dyn FnMut(JsValue)>::new(move |ev: JsValue| {
            let Some(s) = w.upgrade() else { return };
            let (code, reason) = host::close_info(&ev);
            s.push(HostInput::Closed(conn, code, reason));
        });
        let w = self.weak.clone();
        let on_error = Closure::<dyn FnMut(JsValue)>::new(move |ev: JsValue| {
            let Some(s) = w.upgrade() else { return };
            // An error ends the attempt; a close event that may follow is
            // for a connection the session has already let go of.
            s.push(HostInput::Closed(conn, None, format!("transport error: {}", host::describe(&ev))));
        });
        socket.set_onopen(Some(on_open.as_ref().unchecked_ref()));
        socket.set_onmessage(Some(on_message.as_ref().unchecked_ref()));
        socket.set_onclose(Some(on_close.as_ref().unchecked_ref()));
        socket.set_onerror(Some(on_error.as_ref().unchecked_ref()));
        self.link = Some(Link { conn, socket, _callbacks: vec![on_open, on_message, on_close, on_error] });
    }
}
