//! The client half of the protocol as a sans-IO state machine.
//!
//! Grammar (shared with [`crate::server::ServerSession`]): the host feeds
//! inputs ([`ClientSession::handle_input`]) and commands (`connect`,
//! `subscribe`, `publish`, ...), each with the current [`Instant`], and after
//! every one drains [`ClientSession::poll_output`] until it returns
//! [`Output::Timeout`], then calls `handle_input(now, Input::Timeout)` when
//! that instant comes.
//!
//! The session never reads a clock or draws ambient randomness: backoff
//! jitter and message-id nonces come from the seed given to [`ClientSession::new`].

mod backoff;
mod inbox;
mod outbox;
mod snapshot;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::Duration;

pub use backoff::Backoff;
pub use outbox::{OutboxRecord, StoredAt};
pub use snapshot::{Change, Snapshot, SubRecord};

use inbox::{Arrival, Inbox};
use outbox::{Outbox, Wire};

use crate::codec::{self, Encoding};
use crate::compress;
use crate::error::{CloseCode, ErrorCode};
use crate::frame::*;
use crate::rng::Rng;
use crate::time::ms;
use crate::timer::Timers;
use crate::Instant;

/// Identifies one transport (WebSocket) attempt; inputs carrying an old id
/// are ignored, so a late callback from a dead socket cannot disturb a new one.
pub type ConnId = u64;

/// What a QoS 0 publish does while disconnected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Qos0Offline {
    /// Fail at once with [`PublishError::NotConnected`].
    #[default]
    Fail,
    /// Queue in memory (not persisted) and send on the next connection.
    Queue,
}

/// Client settings. Every field has a production default in [`ClientConfig::new`].
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Stable id of this device/installation.
    pub device_id: String,
    /// Connection token (empty = anonymous).
    pub token: String,
    /// The host can answer [`Event::TokenRequested`] (a token provider exists).
    pub refreshable: bool,
    /// SDK or app name and version sent at connect.
    pub client: ClientVersion,
    /// Frame encoding.
    pub encoding: Encoding,
    /// Offer payload compression.
    pub compression: bool,
    /// Compress own publishes only from this size up (never below the
    /// server's announced threshold); none = the server's threshold.
    pub compress_min: Option<u32>,
    /// Smallest reconnect delay.
    pub backoff_min: Duration,
    /// Largest reconnect delay.
    pub backoff_max: Duration,
    /// Deadline for opening the transport and getting `connected`.
    pub connect_timeout: Duration,
    /// Deadline for a reply to any command; past it the link counts as dead.
    pub request_timeout: Duration,
    /// Extra wait for a ping beyond the announced interval; none = the
    /// server's announced pong timeout.
    pub ping_grace: Option<Duration>,
    /// Outbox bound: messages.
    pub outbox_max_messages: usize,
    /// Outbox bound: payload bytes.
    pub outbox_max_bytes: usize,
    /// Publishes not stored within this time fail with [`PublishError::Expired`].
    pub message_ttl: Duration,
    /// Publishes on the wire at once.
    pub max_in_flight: usize,
    /// QoS 0 publishes while disconnected.
    pub qos0_offline: Qos0Offline,
    /// Out-of-order publications held per channel.
    pub reorder_buffer: usize,
    /// Message ids remembered per channel for deduplication.
    pub dedup_window: usize,
    /// Ask for a new token this long before expiry (at most half the lifetime).
    pub refresh_margin: Duration,
    /// Largest message before the server announces its own limit.
    pub max_message_size: usize,
    /// Retry delay after a temporary publish error.
    pub retry_delay: Duration,
    /// QoS of the subscriptions the server asks for in `connected.subscribe`
    /// (the token's channel list); the namespace may grant less.
    pub auto_subscribe_qos: Qos,
    /// How many server endpoints (URLs, nodes of one cluster) the host
    /// knows; [`Output::Open`] names one by index in `0..endpoints`. The
    /// first is drawn from the seed, and the session moves to the next
    /// after a failure (see [`ClientSession::endpoint`]). 0 counts as 1.
    pub endpoints: usize,
}

impl ClientConfig {
    /// Defaults for a device id.
    pub fn new(device_id: impl Into<String>) -> Self {
        ClientConfig {
            device_id: device_id.into(),
            token: String::new(),
            refreshable: false,
            client: ClientVersion { name: "ferry-core".into(), version: env!("CARGO_PKG_VERSION").into() },
            encoding: Encoding::Binary,
            compression: true,
            compress_min: None,
            backoff_min: Duration::from_millis(500),
            backoff_max: Duration::from_secs(20),
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(15),
            ping_grace: None,
            outbox_max_messages: 1000,
            outbox_max_bytes: 8 << 20,
            message_ttl: Duration::from_secs(24 * 3600),
            max_in_flight: 128,
            qos0_offline: Qos0Offline::Fail,
            reorder_buffer: 1024,
            dedup_window: 1024,
            refresh_margin: Duration::from_secs(30),
            max_message_size: codec::DEFAULT_MAX_MESSAGE_SIZE,
            retry_delay: Duration::from_secs(1),
            auto_subscribe_qos: Qos::AtLeastOnce,
            endpoints: 1,
        }
    }
}

/// Inputs from the host.
#[derive(Debug)]
pub enum Input<'a> {
    /// The transport `conn` is open.
    TransportOpened {
        /// Which transport.
        conn: ConnId,
    },
    /// One WebSocket message arrived on `conn`.
    TransportMessage {
        /// Which transport.
        conn: ConnId,
        /// The message bytes (text messages as UTF-8).
        data: &'a [u8],
    },
    /// The transport `conn` closed or failed.
    TransportClosed {
        /// Which transport.
        conn: ConnId,
        /// WebSocket close code, when one was received.
        code: Option<u16>,
        /// Close reason or error text.
        reason: String,
    },
    /// The host cannot open transport `conn`, nor any other: there is no
    /// WebSocket implementation (or no usable one) in this runtime. A setup
    /// error, not a network one, so the session closes for good with
    /// [`CloseCode::TransportUnavailable`] instead of retrying.
    TransportUnavailable {
        /// Which transport.
        conn: ConnId,
        /// What the host found missing.
        reason: String,
    },
    /// A deadline from [`Output::Timeout`] passed.
    Timeout,
    /// The network changed; `online` says whether there is one now.
    NetworkChanged {
        /// Whether the device is online.
        online: bool,
    },
}

/// Outputs to the host, drained with [`ClientSession::poll_output`].
#[derive(Debug, PartialEq)]
pub enum Output {
    /// Open a transport to endpoint `endpoint` and report it with `conn`.
    Open {
        /// Id for inputs about this transport.
        conn: ConnId,
        /// Which endpoint (the host's URL list index, below
        /// [`ClientConfig::endpoints`]).
        endpoint: usize,
    },
    /// Send one WebSocket message (text when the encoding is JSON).
    Transmit {
        /// Transport.
        conn: ConnId,
        /// Message bytes.
        data: Vec<u8>,
    },
    /// Close the transport with this code; no input about it is needed.
    Close {
        /// Transport.
        conn: ConnId,
        /// Close code.
        code: u16,
        /// Reason.
        reason: String,
    },
    /// Something for the app.
    Event(Event),
    /// Nothing more now; call back with `Input::Timeout` at this instant
    /// (none = only on other inputs).
    Timeout(Option<Instant>),
}

/// Connection state as the app sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConnectionState {
    /// Not started, or paused by [`ClientSession::disconnect`] (a later
    /// `connect` resumes).
    Idle,
    /// Waiting for the host to supply a token.
    WaitingToken,
    /// Opening a transport and authenticating.
    Connecting,
    /// Live.
    Connected,
    /// Waiting before the next attempt.
    Backoff {
        /// Attempt number (0-based).
        attempt: u32,
        /// Delay, milliseconds.
        delay_ms: u64,
    },
    /// The host reported no network.
    Offline,
    /// Stopped for good: by the app ([`ClientSession::close`], code 1000),
    /// by a terminal close code from the server, or because no transport
    /// can be opened here (3506). Does not reconnect by itself.
    Closed {
        /// Close code.
        code: u16,
        /// Reason.
        reason: String,
    },
}

/// Why a publish failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PublishError {
    /// The outbox is at its message or byte bound.
    #[error("outbox full")]
    OutboxFull,
    /// Not stored within the message TTL (it may or may not have been stored).
    #[error("expired before the server acknowledged it")]
    Expired,
    /// The payload exceeds the message size limit.
    #[error("payload of {size} bytes exceeds the limit of {limit}")]
    TooLarge {
        /// Payload size.
        size: usize,
        /// Limit.
        limit: usize,
    },
    /// QoS 0 while disconnected (with [`Qos0Offline::Fail`]).
    #[error("not connected")]
    NotConnected,
    /// QoS 0: the connection dropped before the reply (it may have been stored).
    #[error("connection lost before the reply")]
    ConnectionLost,
    /// The session is closed for good.
    #[error("session closed")]
    Closed,
    /// The server refused it.
    #[error("rejected by the server: {0:?}")]
    Rejected(ErrorReply),
}

/// Why a call (history, presence) failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CallError {
    /// Not connected now.
    #[error("not connected")]
    NotConnected,
    /// The connection dropped before the reply.
    #[error("connection lost before the reply")]
    ConnectionLost,
    /// The server answered with an error.
    #[error("server error: {0:?}")]
    Server(ErrorReply),
}

/// Why a gap was reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GapReason {
    /// The stream's epoch changed (history lost or reset).
    EpochChanged,
    /// The wanted publications are no longer retained.
    NotRetained,
}

/// Events for the app.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// The connection state changed.
    State(ConnectionState),
    /// A connection (or an attempt) ended: why, and whether the session
    /// will try again.
    Disconnected {
        /// Close code (the server's `disconnect` code when it sent one; 1006
        /// when the transport failed without one).
        code: u16,
        /// Reason.
        reason: String,
        /// Whether a reconnect follows.
        reconnect: bool,
    },
    /// A subscription is live; `recovered` is false when a gap was reported.
    Subscribed {
        /// Channel.
        channel: String,
        /// Granted QoS.
        qos: Qos,
        /// Position delivery continues after.
        position: StreamPosition,
        /// Whether nothing was missed since the previous position.
        recovered: bool,
    },
    /// Publications were missed and cannot be recovered.
    Gap {
        /// Channel.
        channel: String,
        /// Last position surfaced before the gap, if any.
        from: Option<StreamPosition>,
        /// Position delivery resumes after.
        to: StreamPosition,
        /// Why.
        reason: GapReason,
    },
    /// A subscribe was refused; the subscription is removed.
    SubscribeFailed {
        /// Channel.
        channel: String,
        /// The server's error.
        error: ErrorReply,
    },
    /// The server ended a subscription.
    Unsubscribed {
        /// Channel.
        channel: String,
        /// Code.
        code: u16,
        /// Reason.
        reason: String,
    },
    /// A publication, with its payload inflated. For QoS 2, persist the
    /// [`Change::Position`] that follows together with handling this.
    Publication(Publication),
    /// Someone joined a channel.
    Join {
        /// Channel.
        channel: String,
        /// Who.
        info: ClientInfo,
    },
    /// Someone left a channel.
    Leave {
        /// Channel.
        channel: String,
        /// Who.
        info: ClientInfo,
    },
    /// A publish was acknowledged (QoS 2: the exactly-once handshake is done).
    PublishAcked {
        /// Message id returned by `publish`.
        message_id: String,
        /// Channel.
        channel: String,
        /// Stored position.
        position: StreamPosition,
        /// The server had stored it before.
        duplicate: bool,
    },
    /// A publish failed for good.
    PublishFailed {
        /// Message id returned by `publish`.
        message_id: String,
        /// Channel.
        channel: String,
        /// Why.
        error: PublishError,
    },
    /// Result of a history/presence call.
    CallResult {
        /// Id returned by the call.
        call: u64,
        /// The reply.
        result: Result<ReplyBody, CallError>,
    },
    /// Supply a token with [`ClientSession::set_token`] (or `token_failed`).
    TokenRequested,
    /// Durable state changed; apply to a [`Snapshot`] and persist.
    Persist(Change),
    /// A non-fatal problem (a malformed message, a corrupt payload, ...).
    Error(String),
}

#[derive(Debug, Clone)]
enum State {
    Idle,
    WaitingToken,
    Connecting { conn: ConnId },
    Handshaking { conn: ConnId },
    Live(Live),
    Backoff { attempt: u32, delay_ms: u64 },
    Offline,
    Closed { code: u16, reason: String },
}

#[derive(Debug, Clone)]
struct Live {
    conn: ConnId,
    ping_wait: u64,
    compress_min: Option<u32>,
    max_message_size: usize,
}

/// Named timers.
#[derive(Clone, Copy, Debug)]
enum Timer {
    /// Connect/handshake deadline.
    Connect = 0,
    /// No ping by then: the link is dead.
    PingDeadline,
    /// End of backoff.
    Reconnect,
    /// Earliest reply deadline.
    Request,
    /// Ask the host for a new token.
    Refresh,
    /// Earliest outbox expiry.
    Expiry,
    /// Retry of publishes held back after a temporary error.
    Retry,
}
const TIMERS: usize = 7;

#[derive(Debug, Clone)]
enum Pending {
    Connect,
    Subscribe(String),
    Unsubscribe,
    Publish(String),
    Release(String),
    Refresh,
    Call(u64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SubPhase {
    /// Sent on the next connection (or now, if live).
    Wanted,
    /// Subscribe sent, waiting for the reply.
    Pending,
    /// Delivering.
    Active,
}

#[derive(Debug, Clone)]
struct Sub {
    qos: Qos,
    granted: Qos,
    phase: SubPhase,
    position: Option<StreamPosition>,
    inbox: Inbox,
    /// Publications that arrived before the subscribe reply.
    early: Vec<Publication>,
    /// Something arrived since the last ack: send one (again, for
    /// duplicates, since the server may have missed the earlier ack).
    ack_due: bool,
    /// Subscription token for a private channel (not persisted: tokens
    /// expire; after a restart the app subscribes again with a fresh one).
    token: String,
    /// Subscribe again at this instant, on the same connection, after a
    /// temporary refusal (the server's engine was briefly unavailable).
    retry_at: Option<Instant>,
}

enum Queued {
    Frame(ConnId, Vec<u8>),
    Out(Output),
}

/// Counters for tests and metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientStats {
    /// Publications dropped as duplicates.
    pub duplicates: u64,
    /// Publications held for reordering.
    pub reordered: u64,
    /// Publications dropped because the reorder buffer was full.
    pub overflowed: u64,
    /// Connections established.
    pub connects: u64,
    /// Publishes (re)sent.
    pub publishes_sent: u64,
}

/// The client protocol state machine.
pub struct ClientSession {
    cfg: ClientConfig,
    rng: Rng,
    state: State,
    backoff: Backoff,
    timers: Timers<TIMERS>,
    next_conn: ConnId,
    next_req: u32,
    pending: HashMap<u32, (Pending, Instant)>,
    subs: BTreeMap<String, Sub>,
    outbox: Outbox,
    nonce: u64,
    next_seq: u64,
    volatile_nonce: u64,
    volatile_seq: u64,
    next_call: u64,
    /// A close code the server announced in a `disconnect` push.
    announced: Option<(u16, String, bool)>,
    /// An attempt should start once the host supplies a token.
    token_pending: bool,
    /// A `TokenRequested` is outstanding.
    token_requested: bool,
    queue: VecDeque<Queued>,
    stats: ClientStats,
    /// Index of the endpoint the next (or current) attempt goes to.
    endpoint: usize,
}

impl ClientSession {
    /// A new session; `seed` drives jitter and the message-id nonce.
    pub fn new(cfg: ClientConfig, seed: u64) -> Self {
        let mut rng = Rng::new(seed);
        let nonce = rng.next_u64();
        let mut s = Self::blank(cfg, seed, rng, nonce, 1);
        s.emit(Event::Persist(Change::Ids { nonce, next_seq: 1 }));
        s
    }

    /// A session restored from durable state saved by an earlier process.
    /// Entries' expiry instants are clamped to `now + message_ttl`.
    pub fn restore(cfg: ClientConfig, seed: u64, snapshot: &Snapshot, now: Instant) -> Self {
        let rng = Rng::new(seed);
        let mut s = Self::blank(cfg, seed, rng, snapshot.nonce, snapshot.next_seq.max(1));
        let cap = now.plus(s.cfg.message_ttl);
        for rec in &snapshot.outbox {
            let mut rec = rec.clone();
            rec.expires_at = rec.expires_at.min(cap);
            s.outbox.push(rec);
        }
        for r in &snapshot.subs {
            let mut sub = Sub::new(r.qos);
            sub.position = r.position.clone();
            for id in &r.seen {
                sub.inbox.seen.insert(id.clone(), s.cfg.dedup_window);
            }
            s.subs.insert(r.channel.clone(), sub);
        }
        s.arm_outbox_timers(now);
        s
    }

    fn blank(cfg: ClientConfig, seed: u64, mut rng: Rng, nonce: u64, next_seq: u64) -> Self {
        // Design: the first endpoint comes from its own stream of the seed,
        // so that clients with different seeds spread over the nodes while
        // jitter and ids stay exactly what they were with one endpoint.
        let endpoint = (Rng::new(seed ^ 0x656E_6470_6F69_6E74).next_u64() % cfg.endpoints.max(1) as u64) as usize;
        ClientSession {
            endpoint,
            volatile_nonce: rng.next_u64(),
            volatile_seq: 0,
            backoff: Backoff::new(cfg.backoff_min, cfg.backoff_max),
            cfg,
            rng,
            state: State::Idle,
            timers: Timers::default(),
            next_conn: 1,
            next_req: 1,
            pending: HashMap::new(),
            subs: BTreeMap::new(),
            outbox: Outbox::default(),
            nonce,
            next_seq,
            next_call: 1,
            announced: None,
            token_pending: false,
            token_requested: false,
            queue: VecDeque::new(),
            stats: ClientStats::default(),
        }
    }

    // ---- getters -------------------------------------------------------

    /// The state as the app sees it.
    pub fn state(&self) -> ConnectionState {
        match &self.state {
            State::Idle => ConnectionState::Idle,
            State::WaitingToken => ConnectionState::WaitingToken,
            State::Connecting { .. } | State::Handshaking { .. } => ConnectionState::Connecting,
            State::Live(_) => ConnectionState::Connected,
            State::Backoff { attempt, delay_ms } => ConnectionState::Backoff { attempt: *attempt, delay_ms: *delay_ms },
            State::Offline => ConnectionState::Offline,
            State::Closed { code, reason } => ConnectionState::Closed { code: *code, reason: reason.clone() },
        }
    }

    /// Index of the endpoint in use: the one the current connection (or
    /// attempt) went to, or the one the next attempt goes to. Always below
    /// [`ClientConfig::endpoints`].
    ///
    /// Policy: the session stays on an endpoint while it works. After an
    /// attempt fails or a connection is lost for a reconnecting reason, the
    /// next attempt (after the usual backoff) goes to the next endpoint,
    /// round robin; a token-expiry close keeps the endpoint (the node is
    /// fine). A network change, going offline, `disconnect` and `connect`
    /// keep it too, so the first attempt after them retries the current
    /// endpoint.
    pub fn endpoint(&self) -> usize {
        self.endpoint
    }

    /// Whether live.
    pub fn is_connected(&self) -> bool {
        matches!(self.state, State::Live(_))
    }

    /// The settings.
    pub fn config(&self) -> &ClientConfig {
        &self.cfg
    }

    /// Entries in the outbox.
    pub fn outbox_len(&self) -> usize {
        self.outbox.len()
    }

    /// Payload bytes in the outbox.
    pub fn outbox_bytes(&self) -> usize {
        self.outbox.bytes()
    }

    /// Publishes on the wire now.
    pub fn in_flight(&self) -> usize {
        self.outbox.in_flight()
    }

    /// Largest reorder buffer among subscriptions.
    pub fn max_reorder_buffered(&self) -> usize {
        self.subs.values().map(|s| s.inbox.buffered()).max().unwrap_or(0)
    }

    /// Largest dedup window among subscriptions.
    pub fn max_dedup_window(&self) -> usize {
        self.subs.values().map(|s| s.inbox.seen.len()).max().unwrap_or(0)
    }

    /// Last surfaced position of a subscription.
    pub fn position(&self, channel: &str) -> Option<StreamPosition> {
        self.subs.get(channel).and_then(|s| s.position.clone())
    }

    /// Subscribed channels.
    pub fn channels(&self) -> impl Iterator<Item = &str> {
        self.subs.keys().map(String::as_str)
    }

    /// Counters.
    pub fn stats(&self) -> &ClientStats {
        &self.stats
    }

    /// The whole durable state.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            nonce: self.nonce,
            next_seq: self.next_seq,
            outbox: self
                .outbox
                .entries
                .iter()
                .filter(|e| e.rec.qos != Qos::AtMostOnce)
                .map(|e| e.rec.clone())
                .collect(),
            subs: self
                .subs
                .iter()
                .map(|(c, s)| SubRecord {
                    channel: c.clone(),
                    qos: s.qos,
                    position: s.position.clone(),
                    seen: s.inbox.seen.iter().cloned().collect(),
                })
                .collect(),
            seen_cap: self.cfg.dedup_window,
        }
    }

    // ---- commands ------------------------------------------------------

    /// Start connecting (and keep reconnecting until `disconnect` or a
    /// terminal close). Also leaves `Closed` for a fresh start.
    pub fn connect(&mut self, now: Instant) {
        match self.state {
            State::Idle | State::Closed { .. } | State::Backoff { .. } | State::Offline => {
                self.backoff.reset();
                self.start_attempt(now);
            }
            _ => {}
        }
    }

    /// Pause by the app's wish: no reconnect until the next
    /// [`Self::connect`]; the state becomes [`ConnectionState::Idle`]. The
    /// outbox is kept (see [`Self::snapshot`]); calls in progress fail.
    pub fn disconnect(&mut self, now: Instant) {
        self.drop_transport(now, CloseCode::Normal as u16, "client disconnect".into());
        self.timers.clear(Timer::Reconnect as usize);
        self.set_state(State::Idle);
        self.arm_outbox_timers(now);
    }

    /// The app is done with this session: close the transport (code 1000)
    /// and end in [`ConnectionState::Closed`] `{ code: 1000, reason: "client
    /// closed" }`, the terminal state: no reconnect, and the host may stop
    /// driving it. Publishes then fail with [`PublishError::Closed`]; the
    /// outbox stays in [`Self::snapshot`] for the next session. A session
    /// already closed (say by a terminal code from the server) keeps that
    /// state and its code. Unlike [`Self::disconnect`], this is not a pause.
    pub fn close(&mut self, now: Instant) {
        if matches!(self.state, State::Closed { .. }) {
            return;
        }
        let code = CloseCode::Normal as u16;
        self.drop_transport(now, code, "client closed".into());
        self.token_pending = false;
        self.token_requested = false;
        self.timers.clear(Timer::Reconnect as usize);
        self.set_state(State::Closed { code, reason: "client closed".into() });
        // As after any terminal close: only outbox expiry stays armed.
        self.arm_outbox_timers(now);
    }

    /// Supply a token after [`Event::TokenRequested`].
    pub fn set_token(&mut self, now: Instant, token: String) {
        self.cfg.token = token.clone();
        self.token_pending = false;
        self.token_requested = false;
        match &self.state {
            State::WaitingToken => self.start_attempt(now),
            State::Live(live) => {
                let conn = live.conn;
                self.request(now, conn, Pending::Refresh, Command::Refresh { token });
            }
            // Any other state: the next attempt uses the new token.
            _ => {}
        }
    }

    /// The host could not get a token; `terminal` stops the session.
    pub fn token_failed(&mut self, now: Instant, terminal: bool) {
        self.token_requested = false;
        if terminal {
            self.token_pending = false;
            self.drop_transport(now, CloseCode::Unauthorized as u16, "no token".into());
            self.set_state(State::Closed { code: CloseCode::Unauthorized as u16, reason: "no token".into() });
            return;
        }
        match self.state {
            // Still no usable token: wait a backoff step, then ask again;
            // never reconnect with the token that expired.
            State::WaitingToken => {
                self.token_pending = true;
                self.schedule_reconnect(now);
            }
            // A refresh could not get a token: ask again while the current
            // one is still valid.
            State::Live(_) => self.timers.set(Timer::Refresh as usize, now.plus(self.cfg.retry_delay)),
            _ => {}
        }
    }

    /// Subscribe; delivery starts after the current position if this
    /// channel was subscribed before (restored), else at the stream's top.
    pub fn subscribe(&mut self, now: Instant, channel: &str, qos: Qos) {
        self.subscribe_with_token(now, channel, qos, String::new());
    }

    /// Subscribe to a private channel with a subscription token (used for
    /// this subscription's subscribes until the session ends).
    pub fn subscribe_with_token(&mut self, now: Instant, channel: &str, qos: Qos, token: String) {
        let live_conn = match &self.state {
            State::Live(l) => Some(l.conn),
            _ => None,
        };
        match self.subs.get_mut(channel) {
            Some(s) if s.qos == qos => {
                if !token.is_empty() {
                    s.token = token;
                }
                return;
            }
            Some(s) => {
                if !token.is_empty() {
                    s.token = token.clone();
                }
                // A QoS change needs a fresh server-side subscription.
                let was_on_server = s.phase != SubPhase::Wanted;
                s.qos = qos;
                s.phase = SubPhase::Wanted;
                if let (true, Some(conn)) = (was_on_server, live_conn) {
                    self.request(now, conn, Pending::Unsubscribe, Command::Unsubscribe { channel: channel.into() });
                }
            }
            None => {
                let mut sub = Sub::new(qos);
                sub.token = token;
                self.subs.insert(channel.to_string(), sub);
            }
        }
        self.emit(Event::Persist(Change::Subscribe { channel: channel.into(), qos }));
        if let Some(conn) = live_conn {
            self.send_subscribe(now, conn, channel);
        }
    }

    /// Unsubscribe; forgets the position.
    pub fn unsubscribe(&mut self, now: Instant, channel: &str) {
        if self.subs.remove(channel).is_none() {
            return;
        }
        self.emit(Event::Persist(Change::Unsubscribe { channel: channel.into() }));
        if let State::Live(live) = &self.state {
            let conn = live.conn;
            self.request(now, conn, Pending::Unsubscribe, Command::Unsubscribe { channel: channel.into() });
        }
    }

    /// Publish; returns the message id that later events name.
    pub fn publish(&mut self, now: Instant, channel: &str, data: Vec<u8>, qos: Qos) -> Result<String, PublishError> {
        if let State::Closed { .. } = self.state {
            return Err(PublishError::Closed);
        }
        let limit = self.max_payload();
        if data.len() > limit {
            return Err(PublishError::TooLarge { size: data.len(), limit });
        }
        let live = self.is_connected();
        if qos == Qos::AtMostOnce && !live && self.cfg.qos0_offline == Qos0Offline::Fail {
            return Err(PublishError::NotConnected);
        }
        // QoS 0 ids come from a per-process nonce so that they need no
        // durable write, and can never collide with a persisted id.
        let message_id = if qos == Qos::AtMostOnce {
            self.volatile_seq += 1;
            format!("{}:{:016x}:v{}", self.cfg.device_id, self.volatile_nonce, self.volatile_seq)
        } else {
            format!("{}:{:016x}:{}", self.cfg.device_id, self.nonce, self.next_seq)
        };
        let rec = OutboxRecord {
            message_id: message_id.clone(),
            channel: channel.into(),
            qos,
            data,
            expires_at: now.plus(self.cfg.message_ttl),
            stored: None,
        };
        if !self.outbox.fits(&rec, self.cfg.outbox_max_messages, self.cfg.outbox_max_bytes) {
            return Err(PublishError::OutboxFull);
        }
        if qos != Qos::AtMostOnce {
            self.next_seq += 1;
            self.emit(Event::Persist(Change::OutboxAdd { record: rec.clone(), next_seq: self.next_seq }));
        }
        self.outbox.push(rec);
        self.pump_outbox(now);
        self.arm_outbox_timers(now);
        Ok(message_id)
    }

    /// History, presence or presence stats; the answer comes as
    /// [`Event::CallResult`] with the returned id.
    pub fn call(&mut self, now: Instant, cmd: Command) -> Result<u64, CallError> {
        let conn = match &self.state {
            State::Live(l) => l.conn,
            _ => return Err(CallError::NotConnected),
        };
        let id = self.next_call;
        self.next_call += 1;
        self.request(now, conn, Pending::Call(id), cmd);
        Ok(id)
    }

    // ---- inputs --------------------------------------------------------

    /// Feed one input.
    pub fn handle_input(&mut self, now: Instant, input: Input<'_>) {
        match input {
            Input::TransportOpened { conn } => self.on_open(now, conn),
            Input::TransportMessage { conn, data } => self.on_message(now, conn, data),
            Input::TransportClosed { conn, code, reason } => self.on_closed(now, conn, code, reason),
            Input::TransportUnavailable { conn, reason } => {
                if self.current_conn() == Some(conn) {
                    let code = CloseCode::TransportUnavailable as u16;
                    self.after_close(now, code, reason, false, false);
                }
            }
            Input::Timeout => self.on_timeout(now),
            Input::NetworkChanged { online } => self.on_network(now, online),
        }
    }

    /// Next output; ends with [`Output::Timeout`] when nothing else is due.
    pub fn poll_output(&mut self, _now: Instant) -> Output {
        self.flush_acks();
        let Some(front) = self.queue.pop_front() else {
            return Output::Timeout(self.timers.earliest());
        };
        match front {
            Queued::Out(o) => o,
            Queued::Frame(conn, first) => {
                let max = self.max_message_size();
                let mut data = first;
                let mut frames = 1;
                while let Some(Queued::Frame(c, next)) = self.queue.front() {
                    let sep = usize::from(self.cfg.encoding == Encoding::Json);
                    if *c != conn || data.len() + sep + next.len() > max || frames == codec::MAX_FRAMES_PER_MESSAGE {
                        break;
                    }
                    frames += 1;
                    let Some(Queued::Frame(_, next)) = self.queue.pop_front() else { unreachable!() };
                    codec::join_into(self.cfg.encoding, &next, &mut data);
                }
                Output::Transmit { conn, data }
            }
        }
    }

    // ---- internals: connection lifecycle -------------------------------

    fn current_conn(&self) -> Option<ConnId> {
        match &self.state {
            State::Connecting { conn } | State::Handshaking { conn } => Some(*conn),
            State::Live(l) => Some(l.conn),
            _ => None,
        }
    }

    fn max_message_size(&self) -> usize {
        match &self.state {
            State::Live(l) => l.max_message_size,
            _ => self.cfg.max_message_size,
        }
    }

    /// Payload budget: the message limit less room for the frame around it.
    fn max_payload(&self) -> usize {
        self.max_message_size().saturating_sub(512)
    }

    fn set_state(&mut self, st: State) {
        self.state = st;
        let s = self.state();
        self.emit(Event::State(s));
    }

    fn emit(&mut self, e: Event) {
        self.queue.push_back(Queued::Out(Output::Event(e)));
    }

    fn start_attempt(&mut self, now: Instant) {
        self.timers.clear(Timer::Reconnect as usize);
        if self.token_pending {
            if !self.token_requested {
                self.token_requested = true;
                self.emit(Event::TokenRequested);
            }
            self.set_state(State::WaitingToken);
            return;
        }
        let conn = self.next_conn;
        self.next_conn += 1;
        let endpoint = self.endpoint;
        self.queue.push_back(Queued::Out(Output::Open { conn, endpoint }));
        self.timers.set(Timer::Connect as usize, now.plus(self.cfg.connect_timeout));
        self.set_state(State::Connecting { conn });
    }

    fn on_open(&mut self, now: Instant, conn: ConnId) {
        if !matches!(self.state, State::Connecting { conn: c } if c == conn) {
            return;
        }
        let subs = self
            .subs
            .iter()
            .map(|(ch, s)| SubscribeRequest {
                channel: ch.clone(),
                qos: s.qos,
                since: if s.qos == Qos::AtMostOnce { None } else { s.position.clone() },
                token: s.token.clone(),
            })
            .collect();
        for s in self.subs.values_mut() {
            s.phase = SubPhase::Pending;
        }
        let cmd = Command::Connect(Connect {
            version: PROTOCOL_VERSION,
            token: self.cfg.token.clone(),
            device_id: self.cfg.device_id.clone(),
            client: self.cfg.client.clone(),
            subs,
            compression: self.cfg.compression,
        });
        self.state = State::Handshaking { conn };
        self.announced = None;
        self.request(now, conn, Pending::Connect, cmd);
    }

    fn on_closed(&mut self, now: Instant, conn: ConnId, code: Option<u16>, reason: String) {
        if self.current_conn() != Some(conn) {
            return;
        }
        let (code, reason, reconnect) = match self.announced.take() {
            Some(a) => a,
            None => {
                let c = code.unwrap_or(1006);
                (c, reason, CloseCode::reconnects(c))
            }
        };
        self.after_close(now, code, reason, reconnect, false);
    }

    /// Common path once a transport is gone. `we_closed` asks the host to close it.
    fn after_close(&mut self, now: Instant, code: u16, reason: String, reconnect: bool, we_closed: bool) {
        if we_closed {
            self.drop_transport(now, code, reason.clone());
        } else {
            self.cleanup_connection(now);
        }
        self.emit(Event::Disconnected { code, reason: reason.clone(), reconnect });
        if !reconnect {
            self.set_state(State::Closed { code, reason });
            return;
        }
        // Design: a failed attempt or a lost connection may mean the node is
        // gone, so the next attempt tries the next one; recovery by offsets
        // makes the move as cheap as any reconnect. An expired token says
        // nothing about the node.
        if code != CloseCode::TokenExpired as u16 {
            self.endpoint = (self.endpoint + 1) % self.cfg.endpoints.max(1);
        }
        if code == CloseCode::TokenExpired as u16 {
            if !self.cfg.refreshable {
                self.set_state(State::Closed { code, reason });
                return;
            }
            self.token_pending = true;
            self.token_requested = true;
            self.emit(Event::TokenRequested);
        }
        self.schedule_reconnect(now);
    }

    fn schedule_reconnect(&mut self, now: Instant) {
        let attempt = self.backoff.attempt();
        let delay = self.backoff.next_delay(&mut self.rng);
        self.timers.set(Timer::Reconnect as usize, now.add_ms(delay));
        self.set_state(State::Backoff { attempt, delay_ms: delay });
    }

    /// Tell the host to close the current transport (if any) and forget it.
    fn drop_transport(&mut self, now: Instant, code: u16, reason: String) {
        if let Some(conn) = self.current_conn() {
            self.queue.push_back(Queued::Out(Output::Close { conn, code, reason }));
        }
        self.cleanup_connection(now);
    }

    /// Per-connection state goes; durable state stays.
    fn cleanup_connection(&mut self, now: Instant) {
        let old = self.current_conn();
        self.queue.retain(|q| !matches!(q, Queued::Frame(c, _) if Some(*c) == old));
        for t in [Timer::Connect, Timer::PingDeadline, Timer::Request, Timer::Refresh] {
            self.timers.clear(t as usize);
        }
        let pending = std::mem::take(&mut self.pending);
        let mut calls: Vec<u64> =
            pending.values().filter_map(|(p, _)| if let Pending::Call(id) = p { Some(*id) } else { None }).collect();
        calls.sort_unstable();
        for call in calls {
            self.emit(Event::CallResult { call, result: Err(CallError::ConnectionLost) });
        }
        // QoS 0 publishes on the wire are not retried.
        let mut i = 0;
        while i < self.outbox.len() {
            let e = &self.outbox.entries[i];
            if e.rec.qos == Qos::AtMostOnce && e.wire != Wire::Idle {
                let e = self.outbox.remove(i).expect("index valid");
                self.emit(Event::PublishFailed {
                    message_id: e.rec.message_id,
                    channel: e.rec.channel,
                    error: PublishError::ConnectionLost,
                });
            } else {
                i += 1;
            }
        }
        self.outbox.reset_wire();
        for s in self.subs.values_mut() {
            s.phase = SubPhase::Wanted;
            s.early.clear();
            s.ack_due = false;
        }
        if matches!(self.state, State::Connecting { .. } | State::Handshaking { .. } | State::Live(_)) {
            // Transitional: the caller moves on to Backoff, Closed or Idle.
            self.state = State::Backoff { attempt: self.backoff.attempt(), delay_ms: 0 };
        }
        self.arm_outbox_timers(now);
    }

    fn on_network(&mut self, now: Instant, online: bool) {
        match (&self.state, online) {
            (State::Idle | State::Closed { .. } | State::WaitingToken, _) => {}
            (_, false) => {
                self.drop_transport(now, CloseCode::Normal as u16, "network lost".into());
                self.timers.clear(Timer::Reconnect as usize);
                self.set_state(State::Offline);
            }
            (State::Offline | State::Backoff { .. }, true) => {
                self.backoff.reset();
                self.start_attempt(now);
            }
            // Design: after a network change the old route is usually gone
            // and a dead socket can take minutes to notice; recovery makes a
            // fresh connection cheap, so reconnect at once.
            (State::Live(_) | State::Connecting { .. } | State::Handshaking { .. }, true) => {
                self.drop_transport(now, CloseCode::Normal as u16, "network changed".into());
                self.backoff.reset();
                self.start_attempt(now);
            }
        }
    }

    fn on_timeout(&mut self, now: Instant) {
        if self.timers.take_due(Timer::Reconnect as usize, now) && matches!(self.state, State::Backoff { .. }) {
            self.start_attempt(now);
        }
        if self.timers.take_due(Timer::Connect as usize, now)
            && matches!(self.state, State::Connecting { .. } | State::Handshaking { .. })
        {
            let code = CloseCode::HandshakeTimeout as u16;
            self.after_close(now, code, "connect timeout".into(), true, true);
        }
        if self.timers.take_due(Timer::PingDeadline as usize, now) && self.is_connected() {
            let code = CloseCode::HeartbeatTimeout as u16;
            self.after_close(now, code, "no ping from server".into(), true, true);
        }
        if self.timers.take_due(Timer::Request as usize, now) {
            if self.pending.values().any(|(_, d)| *d <= now) && self.is_connected() {
                let code = CloseCode::RequestTimeout as u16;
                self.after_close(now, code, "no reply from server".into(), true, true);
            } else {
                self.arm_request_timer();
            }
        }
        if self.timers.take_due(Timer::Refresh as usize, now) && self.cfg.refreshable {
            self.emit(Event::TokenRequested);
        }
        if self.timers.take_due(Timer::Expiry as usize, now) {
            self.expire(now);
        }
        if self.timers.take_due(Timer::Retry as usize, now) {
            self.pump_outbox(now);
            self.retry_subscribes(now);
        }
        self.arm_outbox_timers(now);
    }

    fn expire(&mut self, now: Instant) {
        let mut i = 0;
        while i < self.outbox.len() {
            let e = &self.outbox.entries[i];
            if e.rec.stored.is_none() && e.rec.expires_at <= now {
                let e = self.outbox.remove(i).expect("index valid");
                if let Wire::Sent(req) = e.wire {
                    // A late reply must not be taken for another message.
                    self.pending.remove(&req);
                }
                if e.rec.qos != Qos::AtMostOnce {
                    self.emit(Event::Persist(Change::OutboxRemove { message_id: e.rec.message_id.clone() }));
                }
                self.emit(Event::PublishFailed {
                    message_id: e.rec.message_id,
                    channel: e.rec.channel,
                    error: PublishError::Expired,
                });
            } else {
                i += 1;
            }
        }
        self.pump_outbox(now);
    }

    fn arm_outbox_timers(&mut self, now: Instant) {
        self.timers.set_opt(Timer::Expiry as usize, self.outbox.next_expiry());
        let retry = if self.is_connected() {
            let subs = self.subs.values().filter(|s| s.phase == SubPhase::Wanted).filter_map(|s| s.retry_at).min();
            match (self.outbox.next_retry(now), subs) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            }
        } else {
            None
        };
        self.timers.set_opt(Timer::Retry as usize, retry);
    }

    /// Subscribes refused as temporary whose retry time has come.
    fn retry_subscribes(&mut self, now: Instant) {
        let State::Live(l) = &self.state else { return };
        let conn = l.conn;
        let due: Vec<String> = self
            .subs
            .iter()
            .filter(|(_, s)| s.phase == SubPhase::Wanted && s.retry_at.is_some_and(|t| t <= now))
            .map(|(c, _)| c.clone())
            .collect();
        for ch in due {
            self.send_subscribe(now, conn, &ch);
        }
    }

    fn arm_request_timer(&mut self) {
        let at = self.pending.values().map(|(_, d)| *d).min();
        self.timers.set_opt(Timer::Request as usize, at);
    }

    // ---- internals: frames ---------------------------------------------

    fn send(&mut self, conn: ConnId, frame: &ClientFrame) {
        self.queue.push_back(Queued::Frame(conn, codec::encode(self.cfg.encoding, frame)));
    }

    fn request(&mut self, now: Instant, conn: ConnId, p: Pending, cmd: Command) -> u32 {
        let id = self.next_req;
        self.next_req = self.next_req.checked_add(1).unwrap_or(1);
        let deadline = match p {
            Pending::Connect => now.plus(self.cfg.connect_timeout),
            _ => now.plus(self.cfg.request_timeout),
        };
        self.pending.insert(id, (p, deadline));
        self.send(conn, &ClientFrame::Request { id, cmd });
        self.arm_request_timer();
        id
    }

    fn on_message(&mut self, now: Instant, conn: ConnId, data: &[u8]) {
        if self.current_conn() != Some(conn) {
            return;
        }
        let frames = match codec::decode_server(self.cfg.encoding, data, self.max_message_size().max(1 << 20)) {
            Ok(f) => f,
            Err(e) => {
                // A peer that sends garbage cannot be trusted with our state.
                self.emit(Event::Error(format!("undecodable message: {e}")));
                let code = CloseCode::ProtocolViolation as u16;
                self.after_close(now, code, e.to_string(), true, true);
                return;
            }
        };
        for f in frames {
            if self.current_conn() != Some(conn) {
                return;
            }
            match f {
                ServerFrame::Reply { id, outcome } => self.on_reply(now, conn, id, outcome),
                ServerFrame::Push(p) => self.on_push(now, conn, p),
            }
        }
    }

    fn on_reply(&mut self, now: Instant, conn: ConnId, id: u32, outcome: Outcome) {
        let Some((p, _)) = self.pending.remove(&id) else {
            return;
        };
        self.arm_request_timer();
        match (p, outcome) {
            (Pending::Connect, Outcome::Ok(ReplyBody::Connected(c))) => self.on_connected(now, conn, c),
            (Pending::Connect, Outcome::Error(e)) => {
                // The close code that goes with each refusal (PROTOCOL.md
                // 5.1), so the reconnect decision does not depend on the
                // server's close frame arriving.
                let code = match ErrorCode::from_u16(e.code) {
                    Some(ErrorCode::TokenExpired) => CloseCode::TokenExpired,
                    Some(ErrorCode::LimitExceeded) => CloseCode::Banned,
                    Some(ErrorCode::TooManyRequests) => CloseCode::ForceReconnect,
                    Some(ErrorCode::BadRequest) if e.message.contains("version") => CloseCode::UnsupportedVersion,
                    Some(ErrorCode::BadRequest) => CloseCode::ProtocolViolation,
                    _ if e.temporary => CloseCode::ServerError,
                    _ => CloseCode::Unauthorized,
                } as u16;
                let reconnect = CloseCode::reconnects(code);
                self.after_close(now, code, e.message, reconnect, true);
            }
            (Pending::Subscribe(ch), Outcome::Ok(ReplyBody::Subscribed(s))) if s.channel == ch => self.on_subscribed(s),
            (Pending::Subscribe(ch), Outcome::Error(e)) => self.on_subscribe_error(now, ch, e),
            (Pending::Publish(mid), Outcome::Ok(ReplyBody::Published { epoch, offset, duplicate })) => {
                self.on_published(now, conn, &mid, StoredAt { epoch, offset, duplicate })
            }
            (Pending::Publish(mid), Outcome::Error(e)) => self.on_publish_error(now, &mid, e),
            (Pending::Release(mid), Outcome::Ok(ReplyBody::Released)) => self.on_released(now, &mid),
            (Pending::Release(mid), Outcome::Error(_)) => {
                // Releasing is idempotent: an error means the server no longer
                // knows the id, which is the state we wanted.
                self.on_released(now, &mid)
            }
            (Pending::Refresh, Outcome::Ok(ReplyBody::Refreshed { expires_in_ms })) => {
                self.arm_refresh(now, expires_in_ms)
            }
            (Pending::Refresh, Outcome::Error(e)) => {
                // The current token stays in force; try another while it lasts.
                self.emit(Event::Error(format!("token refresh refused: {}", e.message)));
                self.timers.set(Timer::Refresh as usize, now.plus(self.cfg.retry_delay));
            }
            (Pending::Call(call), Outcome::Ok(body)) => self.emit(Event::CallResult { call, result: Ok(body) }),
            (Pending::Call(call), Outcome::Error(e)) => {
                self.emit(Event::CallResult { call, result: Err(CallError::Server(e)) })
            }
            (Pending::Unsubscribe, _) => {}
            (p, o) => self.emit(Event::Error(format!("unexpected reply {o:?} to {p:?}"))),
        }
    }

    fn on_connected(&mut self, now: Instant, conn: ConnId, c: Connected) {
        self.timers.clear(Timer::Connect as usize);
        let grace = self.cfg.ping_grace.map(ms).unwrap_or(c.pong_timeout_ms);
        let ping_wait = c.ping_interval_ms.saturating_add(grace);
        let live = Live {
            conn,
            ping_wait,
            compress_min: if self.cfg.compression {
                c.compress_min.map(|m| m.max(self.cfg.compress_min.unwrap_or(0)))
            } else {
                None
            },
            max_message_size: (c.max_message_size as usize).max(1024),
        };
        self.timers.set(Timer::PingDeadline as usize, now.add_ms(ping_wait));
        self.backoff.reset();
        self.stats.connects += 1;
        self.set_state(State::Live(live));
        self.arm_refresh(now, c.expires_in_ms);
        let wanted: Vec<String> = self.subs.keys().cloned().collect();
        for r in c.subs {
            match r {
                SubscribeResult::Ok(s) => self.on_subscribed(s),
                SubscribeResult::Error { channel, error } => self.on_subscribe_error(now, channel, error),
            }
        }
        // Design: the token's channels become ordinary client subscriptions
        // (persisted, recovered, acked like any other) rather than a second,
        // server-side kind; a channel the app already has keeps its QoS.
        for ch in c.subscribe {
            if !self.subs.contains_key(&ch) {
                self.subscribe(now, &ch, self.cfg.auto_subscribe_qos);
            }
        }
        // Subscriptions the server did not answer for (or added meanwhile);
        // those refused as temporary wait for their retry time.
        for ch in wanted {
            if self.subs.get(&ch).is_some_and(|s| s.phase != SubPhase::Active && s.retry_at.is_none()) {
                self.send_subscribe(now, conn, &ch);
            }
        }
        self.pump_outbox(now);
    }

    fn arm_refresh(&mut self, now: Instant, expires_in_ms: Option<u64>) {
        match expires_in_ms {
            Some(t) if self.cfg.refreshable => {
                let margin = ms(self.cfg.refresh_margin).min(t / 2);
                self.timers.set(Timer::Refresh as usize, now.add_ms(t - margin));
            }
            _ => self.timers.clear(Timer::Refresh as usize),
        }
    }

    fn send_subscribe(&mut self, now: Instant, conn: ConnId, ch: &str) {
        let Some(s) = self.subs.get_mut(ch) else {
            return;
        };
        if s.phase == SubPhase::Pending {
            return;
        }
        s.phase = SubPhase::Pending;
        s.retry_at = None;
        let since = if s.qos == Qos::AtMostOnce { None } else { s.position.clone() };
        let req = SubscribeRequest { channel: ch.into(), qos: s.qos, since, token: s.token.clone() };
        self.request(now, conn, Pending::Subscribe(ch.into()), Command::Subscribe(req));
    }

    fn on_subscribed(&mut self, r: Subscribed) {
        let cap = self.cfg.reorder_buffer;
        let seen_cap = self.cfg.dedup_window;
        let Some(sub) = self.subs.get_mut(&r.channel) else {
            return;
        };
        sub.phase = SubPhase::Active;
        sub.granted = r.qos;
        // Within one epoch a position only moves forward: if the server
        // offers to start earlier than what was already surfaced, the
        // overlap is dropped as duplicates.
        let from = match &sub.position {
            // The stream lost offsets this client saw (a failover to a
            // replica without them): they are void and will be reused, so
            // delivery continues after what the stream still has.
            Some(p) if p.epoch == r.epoch && p.offset > r.top => r.from.max(r.top.saturating_add(1)),
            Some(p) if p.epoch == r.epoch => r.from.max(p.offset.saturating_add(1)),
            _ => r.from,
        };
        let resumed = StreamPosition { epoch: r.epoch.clone(), offset: from.saturating_sub(1) };
        let gap = match &sub.position {
            Some(p) if p.epoch != r.epoch => Some(GapReason::EpochChanged),
            Some(p) if !r.recovered || p.offset > r.top => Some(GapReason::NotRetained),
            _ => None,
        };
        let old = sub.position.clone();
        sub.inbox.start(r.epoch.clone(), from);
        let changed = old.as_ref() != Some(&resumed);
        sub.position = Some(resumed.clone());
        let early = std::mem::take(&mut sub.early);
        let qos = sub.granted;
        if changed {
            self.emit(Event::Persist(Change::Position {
                channel: r.channel.clone(),
                position: resumed.clone(),
                surfaced: vec![],
            }));
        }
        if let Some(reason) = gap {
            self.emit(Event::Gap { channel: r.channel.clone(), from: old, to: resumed.clone(), reason });
        }
        self.emit(Event::Subscribed { channel: r.channel.clone(), qos, position: resumed, recovered: gap.is_none() });
        for p in early {
            self.arrive(&r.channel, p, cap, seen_cap);
        }
    }

    fn on_subscribe_error(&mut self, now: Instant, channel: String, error: ErrorReply) {
        if error.code == ErrorCode::AlreadySubscribed as u16 {
            // The server holds a subscription we do not track (its reply was
            // lost): replace it with a fresh one so we learn where it starts.
            if let (Some(s), State::Live(l)) = (self.subs.get_mut(&channel), &self.state) {
                let conn = l.conn;
                s.phase = SubPhase::Wanted;
                self.request(now, conn, Pending::Unsubscribe, Command::Unsubscribe { channel: channel.clone() });
                self.send_subscribe(now, conn, &channel);
            }
            return;
        }
        if error.temporary {
            // Kept and retried after `retry_delay` on this connection (a
            // connection that stays up would otherwise never ask again),
            // or by the next connection.
            if let Some(s) = self.subs.get_mut(&channel) {
                if s.phase == SubPhase::Pending {
                    s.phase = SubPhase::Wanted;
                    s.retry_at = Some(now.plus(self.cfg.retry_delay));
                }
            }
            self.arm_outbox_timers(now);
            return;
        }
        if self.subs.remove(&channel).is_some() {
            self.emit(Event::Persist(Change::Unsubscribe { channel: channel.clone() }));
        }
        self.emit(Event::SubscribeFailed { channel, error });
    }

    fn on_push(&mut self, now: Instant, conn: ConnId, p: Push) {
        match p {
            Push::Ping => {
                if let State::Live(l) = &self.state {
                    let wait = l.ping_wait;
                    self.timers.set(Timer::PingDeadline as usize, now.add_ms(wait));
                    self.send(conn, &ClientFrame::Pong);
                }
            }
            Push::Publication(p) => {
                let ch = p.channel.clone();
                self.arrive(&ch, p, self.cfg.reorder_buffer, self.cfg.dedup_window);
            }
            Push::Join { channel, info } => {
                if self.subs.contains_key(&channel) {
                    self.emit(Event::Join { channel, info })
                }
            }
            Push::Leave { channel, info } => {
                if self.subs.contains_key(&channel) {
                    self.emit(Event::Leave { channel, info })
                }
            }
            Push::Unsubscribed { channel, code, reason } => {
                if CloseCode::reconnects(code) {
                    if let Some(s) = self.subs.get_mut(&channel) {
                        s.phase = SubPhase::Wanted;
                        self.send_subscribe(now, conn, &channel);
                    }
                } else if self.subs.remove(&channel).is_some() {
                    self.emit(Event::Persist(Change::Unsubscribe { channel: channel.clone() }));
                    self.emit(Event::Unsubscribed { channel, code, reason });
                }
            }
            Push::Disconnect { code, reason, reconnect } => {
                self.announced = Some((code, reason, reconnect && CloseCode::reconnects(code)));
            }
        }
    }

    fn arrive(&mut self, ch: &str, mut p: Publication, cap: usize, seen_cap: usize) {
        let Some(sub) = self.subs.get_mut(ch) else {
            return;
        };
        match sub.phase {
            SubPhase::Active => {}
            SubPhase::Pending => {
                // Pushes can overtake the subscribe reply on a reordering
                // transport; hold a bounded number until it comes.
                if sub.early.len() < cap {
                    sub.early.push(p);
                }
                return;
            }
            SubPhase::Wanted => return,
        }
        let limit = match &self.state {
            State::Live(l) => l.max_message_size,
            _ => self.cfg.max_message_size,
        };
        if p.payload.z {
            // A payload that cannot be inflated still takes its place in the
            // stream (reported, not surfaced), so it cannot stall delivery.
            if let Ok(d) = compress::unpack(&p.payload, limit) {
                p.payload = Payload { z: false, data: Bytes(d) };
            }
        }
        let before = sub.inbox.next;
        let qos = sub.granted;
        let arrival = sub.inbox.arrive(p, qos, cap, seen_cap);
        let moved = sub.inbox.next != before;
        if qos != Qos::AtMostOnce {
            sub.ack_due = true;
        }
        let epoch = sub.inbox.epoch.clone();
        let delivered = sub.inbox.delivered();
        match arrival {
            Arrival::Deliver(run) => {
                let ids: Vec<String> = run.iter().map(|p| p.message_id.clone()).collect();
                sub.position = Some(StreamPosition { epoch: epoch.clone(), offset: delivered });
                for p in run {
                    if p.payload.z {
                        self.emit(Event::Error(format!(
                            "publication {}@{} dropped: its payload does not inflate within {limit} bytes",
                            p.channel, p.offset
                        )));
                    } else {
                        self.emit(Event::Publication(p));
                    }
                }
                self.emit(Event::Persist(Change::Position {
                    channel: ch.into(),
                    position: StreamPosition { epoch, offset: delivered },
                    surfaced: ids,
                }));
            }
            Arrival::Duplicate => {
                self.stats.duplicates += 1;
                if moved {
                    sub.position = Some(StreamPosition { epoch: epoch.clone(), offset: delivered });
                    self.emit(Event::Persist(Change::Position {
                        channel: ch.into(),
                        position: StreamPosition { epoch, offset: delivered },
                        surfaced: vec![],
                    }));
                }
            }
            Arrival::Buffered => self.stats.reordered += 1,
            Arrival::Dropped => self.stats.overflowed += 1,
            Arrival::WrongEpoch => {}
        }
    }

    fn flush_acks(&mut self) {
        let Some(conn) = (match &self.state {
            State::Live(l) => Some(l.conn),
            _ => None,
        }) else {
            return;
        };
        let mut items = Vec::new();
        for (ch, s) in self.subs.iter_mut() {
            if !s.ack_due || s.phase != SubPhase::Active {
                continue;
            }
            s.ack_due = false;
            let d = s.inbox.delivered();
            if d > 0 {
                items.push(AckItem { channel: ch.clone(), epoch: s.inbox.epoch.clone(), offset: d });
            }
        }
        if !items.is_empty() {
            self.send(conn, &ClientFrame::Ack(items));
        }
    }

    // ---- internals: outbox ---------------------------------------------

    /// Put idle entries on the wire, in order, within the in-flight bound.
    fn pump_outbox(&mut self, now: Instant) {
        let (conn, zmin) = match &self.state {
            State::Live(l) => (l.conn, l.compress_min),
            _ => return,
        };
        let mut budget = self.cfg.max_in_flight.saturating_sub(self.outbox.in_flight());
        let mut sends = Vec::new();
        for (i, e) in self.outbox.entries.iter().enumerate() {
            if budget == 0 {
                break;
            }
            if e.wire == Wire::Idle && e.not_before <= now {
                sends.push(i);
                budget -= 1;
            }
        }
        for i in sends {
            let e = &self.outbox.entries[i];
            let (p, cmd) = match &e.rec.stored {
                Some(_) => (
                    Pending::Release(e.rec.message_id.clone()),
                    Command::Release { message_id: e.rec.message_id.clone() },
                ),
                None => (
                    Pending::Publish(e.rec.message_id.clone()),
                    Command::Publish {
                        channel: e.rec.channel.clone(),
                        message_id: e.rec.message_id.clone(),
                        qos: e.rec.qos,
                        payload: compress::pack(e.rec.data.clone(), zmin),
                    },
                ),
            };
            if e.rec.stored.is_none() {
                self.stats.publishes_sent += 1;
            }
            let req = self.request(now, conn, p, cmd);
            self.outbox.entries[i].wire = Wire::Sent(req);
        }
    }

    fn on_published(&mut self, now: Instant, conn: ConnId, mid: &str, at: StoredAt) {
        let Some(i) = self.outbox.position(mid) else {
            return;
        };
        let e = &mut self.outbox.entries[i];
        if e.rec.qos == Qos::ExactlyOnce {
            // Second step: the server must keep the dedup entry until we
            // release it, so a late retry can never be stored twice.
            e.rec.stored = Some(at.clone());
            let message_id = e.rec.message_id.clone();
            self.emit(Event::Persist(Change::OutboxStored { message_id: message_id.clone(), stored: at }));
            let req = self.request(now, conn, Pending::Release(message_id.clone()), Command::Release { message_id });
            self.outbox.entries[i].wire = Wire::Sent(req);
            return;
        }
        let e = self.outbox.remove(i).expect("index valid");
        if e.rec.qos != Qos::AtMostOnce {
            self.emit(Event::Persist(Change::OutboxRemove { message_id: e.rec.message_id.clone() }));
        }
        self.emit(Event::PublishAcked {
            message_id: e.rec.message_id,
            channel: e.rec.channel,
            position: StreamPosition { epoch: at.epoch, offset: at.offset },
            duplicate: at.duplicate,
        });
        self.pump_outbox(now);
        self.arm_outbox_timers(now);
    }

    fn on_released(&mut self, now: Instant, mid: &str) {
        let Some(i) = self.outbox.position(mid) else {
            return;
        };
        let e = self.outbox.remove(i).expect("index valid");
        self.emit(Event::Persist(Change::OutboxRemove { message_id: e.rec.message_id.clone() }));
        let at = e.rec.stored.unwrap_or(StoredAt { epoch: String::new(), offset: 0, duplicate: false });
        self.emit(Event::PublishAcked {
            message_id: e.rec.message_id,
            channel: e.rec.channel,
            position: StreamPosition { epoch: at.epoch, offset: at.offset },
            duplicate: at.duplicate,
        });
        self.pump_outbox(now);
        self.arm_outbox_timers(now);
    }

    fn on_publish_error(&mut self, now: Instant, mid: &str, err: ErrorReply) {
        let Some(i) = self.outbox.position(mid) else {
            return;
        };
        if err.temporary && self.outbox.entries[i].rec.qos != Qos::AtMostOnce {
            let e = &mut self.outbox.entries[i];
            e.wire = Wire::Idle;
            e.not_before = now.plus(self.cfg.retry_delay);
            self.arm_outbox_timers(now);
            return;
        }
        let e = self.outbox.remove(i).expect("index valid");
        if e.rec.qos != Qos::AtMostOnce {
            self.emit(Event::Persist(Change::OutboxRemove { message_id: e.rec.message_id.clone() }));
        }
        self.emit(Event::PublishFailed {
            message_id: e.rec.message_id,
            channel: e.rec.channel,
            error: PublishError::Rejected(err),
        });
        self.pump_outbox(now);
        self.arm_outbox_timers(now);
    }
}

impl Sub {
    fn new(qos: Qos) -> Self {
        Sub {
            qos,
            granted: qos,
            phase: SubPhase::Wanted,
            position: None,
            inbox: Inbox::default(),
            early: Vec::new(),
            ack_due: false,
            token: String::new(),
            retry_at: None,
        }
    }
}
