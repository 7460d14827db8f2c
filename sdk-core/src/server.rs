//! The server half of one connection as a sans-IO state machine.
//!
//! Same grammar as [`crate::client::ClientSession`]: the host feeds inputs
//! (`handle_message`, `handle_timeout`, `handle_closed`) and answers the
//! session's [`ServerEvent`]s with verdicts (`accept`, `subscribe_ok`,
//! `publish_ok`, `reply`, `deliver`, ...), then drains
//! [`ServerSession::poll_output`] until [`ServerOutput::Timeout`].
//!
//! Protocol rules live here: the handshake deadline, the ping schedule and
//! pong deadline, replies to QoS 1/2 publishes only once the host confirms a
//! durable write, coalescing of duplicate publishes in flight, the QoS 2
//! release step, the bounded in-flight window of QoS 1/2 deliveries with
//! redelivery, catch-up from the store when a subscriber falls behind, and
//! close codes. Storage, auth and fan-out are the host's.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use crate::codec::{self, Batcher, DecodeError, Encoding};
use crate::compress;
use crate::error::{CloseCode, ErrorCode, MESSAGE_ID_REUSED};
use crate::frame::*;
use crate::time::ms;
use crate::timer::Timers;
use crate::Instant;

/// Server-side settings for one connection.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Ping every this often.
    pub ping_interval: Duration,
    /// Close when no pong within this long after a ping.
    pub pong_timeout: Duration,
    /// Close when no `connect` within this long after the transport opened.
    pub handshake_timeout: Duration,
    /// Largest inbound message and inflated payload, bytes.
    pub max_message_size: usize,
    /// Subscriptions per connection.
    pub max_subscriptions: usize,
    /// Unacknowledged QoS 1/2 deliveries per connection.
    pub inflight_window: usize,
    /// Redeliver an unacknowledged delivery after this long.
    pub ack_timeout: Duration,
    /// Close as a slow consumer after this many redeliveries of one message.
    pub max_redeliveries: u32,
    /// Compress payloads at least this large for clients that agree; none = off.
    pub compress_min: Option<u32>,
    /// Close as a slow consumer when this many bytes wait to be written.
    pub max_queued_bytes: usize,
    /// Request ids remembered to drop duplicated requests.
    pub request_id_window: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            ping_interval: Duration::from_secs(25),
            pong_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            max_message_size: codec::DEFAULT_MAX_MESSAGE_SIZE,
            max_subscriptions: 256,
            inflight_window: 256,
            ack_timeout: Duration::from_secs(30),
            max_redeliveries: 5,
            compress_min: Some(1024),
            max_queued_bytes: 4 << 20,
            request_id_window: 1024,
        }
    }
}

/// A request id, echoed by the verdict methods.
pub type RequestId = u32;

/// What the session needs from the host.
#[derive(Clone, Debug, PartialEq)]
pub enum ServerEvent {
    /// Authenticate; answer with [`ServerSession::accept`] or [`ServerSession::reject`].
    Connect {
        /// Request id.
        req: RequestId,
        /// The command.
        connect: Connect,
    },
    /// Authorize and locate the stream; answer with
    /// [`ServerSession::subscribe_ok`] or [`ServerSession::reply_error`].
    Subscribe {
        /// Request id.
        req: RequestId,
        /// The request.
        sub: SubscribeRequest,
    },
    /// A subscription ended (client's unsubscribe; already answered).
    Unsubscribed {
        /// Channel.
        channel: String,
    },
    /// Store (deduplicating by `message_id`) and fan out; answer with
    /// [`ServerSession::publish_ok`] after the durable write (QoS 1/2).
    Publish {
        /// Request id.
        req: RequestId,
        /// Channel.
        channel: String,
        /// Idempotency key.
        message_id: String,
        /// QoS of the publish.
        qos: Qos,
        /// Payload, inflated and size-checked.
        data: Vec<u8>,
    },
    /// QoS 2: forget the dedup entry of `message_id` (already answered).
    Release {
        /// Message id.
        message_id: String,
    },
    /// History, presence or presence stats; answer with [`ServerSession::reply`].
    Call {
        /// Request id.
        req: RequestId,
        /// The command.
        cmd: Command,
    },
    /// Verify a new token; answer with [`ServerSession::refresh_ok`] or `reply_error`.
    Refresh {
        /// Request id.
        req: RequestId,
        /// The token.
        token: String,
    },
    /// The client has everything in `channel` up to `offset` (moves forward only).
    Acked {
        /// Channel.
        channel: String,
        /// Epoch.
        epoch: String,
        /// Offset.
        offset: u64,
    },
    /// The subscriber is behind: [`ServerSession::deliver`] publications
    /// `from..` (at most `limit`, in order) from the store, then call
    /// [`ServerSession::fetch_done`].
    Fetch {
        /// Channel.
        channel: String,
        /// Epoch.
        epoch: String,
        /// First offset wanted.
        from: u64,
        /// At most this many.
        limit: usize,
    },
    /// The session ended; drop its subscriptions and presence.
    Closed {
        /// Close code.
        code: u16,
        /// Reason.
        reason: String,
    },
}

/// Outputs to the host.
#[derive(Debug, PartialEq)]
pub enum ServerOutput {
    /// Write one WebSocket message (text when the encoding is JSON).
    Transmit(Vec<u8>),
    /// Something the host must act on.
    Event(ServerEvent),
    /// Close the transport with this code.
    Close {
        /// Close code.
        code: u16,
        /// Reason.
        reason: String,
    },
    /// Nothing more now; call `handle_timeout` at this instant.
    Timeout(Option<Instant>),
}

/// The host's verdict on a `connect`.
#[derive(Clone, Debug)]
pub struct Accept {
    /// Connection identity (shown in presence and as publisher).
    pub client: ClientInfo,
    /// Token lifetime from now; none = never expires.
    pub expires_in: Option<Duration>,
    /// One result per requested subscription, in request order.
    pub subs: Vec<Result<StreamStart, ErrorReply>>,
    /// Server wall time, Unix milliseconds.
    pub time_ms: u64,
    /// Channels the client should subscribe to (the token's channel list).
    pub subscribe: Vec<String>,
}

/// Where a subscription's delivery starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamStart {
    /// Granted QoS.
    pub qos: Qos,
    /// Stream epoch.
    pub epoch: String,
    /// Newest offset now.
    pub top: u64,
    /// First offset to deliver.
    pub from: u64,
    /// Whether delivery continues exactly after the requested position.
    pub recovered: bool,
}

/// How a fetch ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FetchEnd {
    /// Everything asked for that exists was delivered.
    Done,
    /// The store no longer holds the first offset asked for (or the epoch
    /// changed): the client must reconnect and recover with a gap.
    Lost,
    /// Retention trimmed the offsets asked for: the stream (same epoch) now
    /// starts at `first`. Lost at QoS 1/2; at QoS 0 the subscription
    /// skips ahead to `first`.
    Trimmed {
        /// The oldest offset retained.
        first: u64,
    },
}

/// A publication prepared once for every subscriber: encoded lazily once
/// per (encoding, compressed) variant and shared by reference.
#[derive(Debug)]
pub struct SharedPublication {
    plain: Publication,
    packed: OnceLock<Option<Publication>>,
    encoded: [OnceLock<Vec<u8>>; 4],
}

impl SharedPublication {
    /// Wrap a publication whose payload is not compressed.
    pub fn new(plain: Publication) -> Arc<Self> {
        Arc::new(SharedPublication { plain, packed: OnceLock::new(), encoded: Default::default() })
    }
    /// The publication.
    pub fn publication(&self) -> &Publication {
        &self.plain
    }
    /// The publication frame, encoded, for a connection with this
    /// encoding and compression threshold.
    pub fn frame(&self, enc: Encoding, compress_min: Option<u32>) -> &[u8] {
        let packed = compress_min.and_then(|min| {
            self.packed
                .get_or_init(|| {
                    let p = compress::pack(self.plain.payload.data.0.clone(), Some(min));
                    p.z.then(|| Publication { payload: p, ..self.plain.clone() })
                })
                .as_ref()
        });
        let idx = usize::from(enc == Encoding::Json) * 2 + usize::from(packed.is_some());
        self.encoded[idx].get_or_init(|| {
            let p = packed.unwrap_or(&self.plain).clone();
            codec::encode(enc, &ServerFrame::Push(Push::Publication(p)))
        })
    }
}

#[derive(Debug)]
enum Phase {
    /// Waiting for `connect`.
    Handshake,
    /// `connect` handed to the host.
    Authenticating(RequestId, Vec<SubscribeRequest>),
    Live,
    Closed,
}

#[derive(Clone, Copy, Debug)]
enum Timer {
    Handshake = 0,
    Ping,
    Pong,
    Redeliver,
    Expiry,
}
const TIMERS: usize = 5;

#[derive(Debug)]
struct InFlight {
    offset: u64,
    sent: Instant,
    redeliveries: u32,
    publication: Arc<SharedPublication>,
}

#[derive(Debug)]
struct Sub {
    qos: Qos,
    epoch: String,
    /// Next offset to push.
    next: u64,
    /// Highest offset known to exist.
    top: u64,
    /// Highest offset acknowledged.
    acked: u64,
    inflight: VecDeque<InFlight>,
    /// A fetch from this offset is outstanding.
    fetching: Option<u64>,
}

#[derive(Debug)]
enum PendingKind {
    Subscribe(SubscribeRequest),
    Publish(String),
    Call,
    Refresh,
}

/// Counters for metrics and tests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServerStats {
    /// Publications pushed (first time).
    pub delivered: u64,
    /// Publications pushed again after an ack timeout.
    pub redelivered: u64,
    /// Duplicate requests dropped.
    pub duplicate_requests: u64,
    /// Publishes coalesced with one already in flight.
    pub coalesced_publishes: u64,
    /// QoS 0 publications skipped because the host dropped them (lag).
    pub dropped_at_most_once: u64,
}

/// One connection's protocol state.
pub struct ServerSession {
    cfg: ServerConfig,
    enc: Encoding,
    phase: Phase,
    timers: Timers<TIMERS>,
    client_compress: bool,
    /// Boxed: a map node holds room for 11 entries, mostly unused.
    subs: BTreeMap<String, Box<Sub>>,
    pending: HashMap<RequestId, PendingKind>,
    /// Message ids handed to the host and not yet answered → (fingerprint
    /// of channel and data, waiting requests).
    publishing: HashMap<String, (u64, Vec<RequestId>)>,
    seen_reqs: (VecDeque<RequestId>, HashSet<RequestId>),
    inflight_total: usize,
    out: Batcher,
    events: VecDeque<ServerOutput>,
    stats: ServerStats,
}

impl ServerSession {
    /// A session for a transport that just opened.
    pub fn new(cfg: ServerConfig, enc: Encoding, now: Instant) -> Self {
        let mut timers = Timers::default();
        timers.set(Timer::Handshake as usize, now.plus(cfg.handshake_timeout));
        ServerSession {
            cfg,
            enc,
            phase: Phase::Handshake,
            timers,
            client_compress: false,
            subs: BTreeMap::new(),
            pending: HashMap::new(),
            publishing: HashMap::new(),
            seen_reqs: (VecDeque::new(), HashSet::new()),
            inflight_total: 0,
            out: Batcher::default(),
            events: VecDeque::new(),
            stats: ServerStats::default(),
        }
    }

    // ---- getters -------------------------------------------------------

    /// Whether the handshake completed and the session is not closed.
    pub fn is_live(&self) -> bool {
        matches!(self.phase, Phase::Live)
    }
    /// Whether the session has closed.
    pub fn is_closed(&self) -> bool {
        matches!(self.phase, Phase::Closed)
    }
    /// The encoding.
    pub fn encoding(&self) -> Encoding {
        self.enc
    }
    /// Unacknowledged QoS 1/2 deliveries.
    pub fn inflight(&self) -> usize {
        self.inflight_total
    }
    /// QoS 1 and 2 subscriptions that are behind their stream: each
    /// channel with the oldest offset it still has to push. The host holds
    /// publishers back while such an offset is near the end of retention
    /// (backpressure), because a trimmed position closes the connection.
    pub fn behind(&self) -> impl Iterator<Item = (&str, u64)> {
        self.subs
            .iter()
            .filter(|(_, s)| s.qos != Qos::AtMostOnce && s.next <= s.top)
            .map(|(ch, s)| (ch.as_str(), s.next))
    }
    /// The next offset a QoS 1 or 2 subscription will push (`None` for
    /// QoS 0 or no subscription).
    pub fn position(&self, channel: &str) -> Option<u64> {
        self.subs.get(channel).filter(|s| s.qos != Qos::AtMostOnce).map(|s| s.next)
    }
    /// Bytes waiting to be written.
    pub fn queued_bytes(&self) -> usize {
        self.out.bytes()
    }
    /// Subscribed channels.
    pub fn channels(&self) -> impl Iterator<Item = &str> {
        self.subs.keys().map(String::as_str)
    }
    /// The granted QoS of a subscription.
    pub fn subscription_qos(&self, channel: &str) -> Option<Qos> {
        self.subs.get(channel).map(|s| s.qos)
    }
    /// Threshold for compressing payloads to this client.
    pub fn compress_min(&self) -> Option<u32> {
        if self.client_compress {
            self.cfg.compress_min
        } else {
            None
        }
    }
    /// Counters.
    pub fn stats(&self) -> &ServerStats {
        &self.stats
    }
    /// Highest acknowledged offset of a subscription.
    pub fn acked(&self, channel: &str) -> Option<u64> {
        self.subs.get(channel).map(|s| s.acked)
    }

    // ---- inputs --------------------------------------------------------

    /// One WebSocket message from the client.
    pub fn handle_message(&mut self, now: Instant, data: &[u8]) {
        if self.is_closed() {
            return;
        }
        let frames = match codec::decode_client(self.enc, data, self.cfg.max_message_size) {
            Ok(f) => f,
            Err(DecodeError::TooLarge { .. }) => {
                return self.close(CloseCode::MessageTooLarge, "message too large");
            }
            Err(e) => return self.close(CloseCode::ProtocolViolation, &e.to_string()),
        };
        for f in frames {
            if self.is_closed() {
                return;
            }
            self.on_frame(now, f);
        }
    }

    /// A deadline from [`ServerOutput::Timeout`] passed.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.is_closed() {
            return;
        }
        if self.timers.take_due(Timer::Handshake as usize, now) && !self.is_live() {
            return self.close(CloseCode::HandshakeTimeout, "no connect in time");
        }
        if self.timers.take_due(Timer::Pong as usize, now) {
            return self.close(CloseCode::HeartbeatTimeout, "no pong in time");
        }
        if self.timers.take_due(Timer::Expiry as usize, now) {
            return self.close(CloseCode::TokenExpired, "token expired");
        }
        if self.timers.take_due(Timer::Ping as usize, now) && self.is_live() {
            self.push(Push::Ping);
            if self.timers.get(Timer::Pong as usize).is_none() {
                self.timers.set(Timer::Pong as usize, now.plus(self.cfg.pong_timeout));
            }
            self.timers.set(Timer::Ping as usize, now.plus(self.cfg.ping_interval));
        }
        if self.timers.take_due(Timer::Redeliver as usize, now) {
            self.redeliver(now);
        }
    }

    /// The transport closed under us.
    pub fn handle_closed(&mut self, _now: Instant) {
        if !self.is_closed() {
            self.finish(CloseCode::HeartbeatTimeout as u16, "transport closed".into());
        }
    }

    /// Next output.
    pub fn poll_output(&mut self, _now: Instant) -> ServerOutput {
        if let Some(e) = self.events.pop_front() {
            // Frames queued before a close go out before it.
            if matches!(e, ServerOutput::Close { .. }) && !self.out.is_empty() {
                self.events.push_front(e);
            } else {
                return e;
            }
        }
        if let Some(msg) = self.out.next_message(self.enc, self.cfg.max_message_size) {
            return ServerOutput::Transmit(msg);
        }
        if let Some(e) = self.events.pop_front() {
            return e;
        }
        ServerOutput::Timeout(if self.is_closed() { None } else { self.timers.earliest() })
    }

    // ---- verdicts from the host ----------------------------------------

    /// Accept a `connect`.
    pub fn accept(&mut self, now: Instant, req: RequestId, a: Accept) {
        let Phase::Authenticating(r, wanted) = std::mem::replace(&mut self.phase, Phase::Live) else {
            return;
        };
        if r != req {
            self.phase = Phase::Authenticating(r, wanted);
            return;
        }
        self.timers.clear(Timer::Handshake as usize);
        self.timers.set(Timer::Ping as usize, now.plus(self.cfg.ping_interval));
        self.timers.set_opt(Timer::Expiry as usize, a.expires_in.map(|d| now.plus(d)));
        let mut results = Vec::with_capacity(wanted.len());
        let mut starts = Vec::new();
        for (w, r) in wanted.into_iter().zip(
            a.subs
                .into_iter()
                .chain(std::iter::repeat_with(|| Err(ErrorReply::with_message(ErrorCode::Internal, "no verdict")))),
        ) {
            match r {
                Ok(start) if starts.len() < self.cfg.max_subscriptions => {
                    results.push(SubscribeResult::Ok(subscribed(&w.channel, &start)));
                    starts.push((w.channel, start));
                }
                Ok(_) => results.push(SubscribeResult::Error {
                    channel: w.channel,
                    error: ErrorReply::new(ErrorCode::LimitExceeded),
                }),
                Err(error) => results.push(SubscribeResult::Error { channel: w.channel, error }),
            }
        }
        let connected = Connected {
            client: a.client.client.clone(),
            ping_interval_ms: ms(self.cfg.ping_interval),
            pong_timeout_ms: ms(self.cfg.pong_timeout),
            compress_min: self.compress_min(),
            max_message_size: self.cfg.max_message_size as u32,
            expires_in_ms: a.expires_in.map(ms),
            subs: results,
            time_ms: a.time_ms,
            subscribe: a.subscribe,
        };
        self.reply_ok(req, ReplyBody::Connected(connected));
        for (ch, start) in starts {
            self.start_sub(ch, start);
        }
    }

    /// Refuse a `connect` (or anything else) and close with `close`.
    pub fn reject(&mut self, _now: Instant, req: RequestId, err: ErrorReply, close: CloseCode) {
        self.send_frame(&ServerFrame::Reply { id: req, outcome: Outcome::Error(err) });
        self.close(close, close.reason());
    }

    /// A subscription is authorized; delivery starts at `start.from`.
    pub fn subscribe_ok(&mut self, _now: Instant, req: RequestId, start: StreamStart) {
        let Some(PendingKind::Subscribe(sub)) = self.pending.remove(&req) else {
            return;
        };
        if self.subs.contains_key(&sub.channel) {
            return self.reply_error(_now, req, ErrorReply::new(ErrorCode::AlreadySubscribed));
        }
        self.reply_ok(req, ReplyBody::Subscribed(subscribed(&sub.channel, &start)));
        self.start_sub(sub.channel, start);
    }

    /// A publish was stored (durably, for QoS 1/2) at this position.
    pub fn publish_ok(&mut self, _now: Instant, req: RequestId, epoch: String, offset: u64, duplicate: bool) {
        let Some(PendingKind::Publish(mid)) = self.pending.remove(&req) else {
            return;
        };
        let (_, waiting) = self.publishing.remove(&mid).unwrap_or_default();
        for (i, r) in waiting.into_iter().enumerate() {
            self.pending.remove(&r);
            let body = ReplyBody::Published { epoch: epoch.clone(), offset, duplicate: duplicate || i > 0 };
            self.reply_ok(r, body);
        }
    }

    /// Answer a call or a refresh with a success body.
    pub fn reply(&mut self, _now: Instant, req: RequestId, body: ReplyBody) {
        if self.pending.remove(&req).is_some() {
            self.reply_ok(req, body);
        }
    }

    /// Answer any pending request with an error.
    pub fn reply_error(&mut self, _now: Instant, req: RequestId, err: ErrorReply) {
        match self.pending.remove(&req) {
            Some(PendingKind::Publish(mid)) => {
                for r in self.publishing.remove(&mid).unwrap_or_default().1 {
                    self.pending.remove(&r);
                    self.send_frame(&ServerFrame::Reply { id: r, outcome: Outcome::Error(err.clone()) });
                }
            }
            Some(_) => self.send_frame(&ServerFrame::Reply { id: req, outcome: Outcome::Error(err) }),
            None => {}
        }
    }

    /// A new token was accepted.
    pub fn refresh_ok(&mut self, now: Instant, req: RequestId, expires_in: Option<Duration>) {
        if let Some(PendingKind::Refresh) = self.pending.remove(&req) {
            self.timers.set_opt(Timer::Expiry as usize, expires_in.map(|d| now.plus(d)));
            self.reply_ok(req, ReplyBody::Refreshed { expires_in_ms: expires_in.map(ms) });
        }
    }

    /// Offer a publication (live fan-out or a fetch answer). It is pushed
    /// when it is next in line for a subscription with window room;
    /// otherwise the session remembers it is behind and asks for a fetch.
    pub fn deliver(&mut self, now: Instant, p: &Arc<SharedPublication>) {
        if !self.is_live() {
            return;
        }
        let pb = p.publication();
        let room = self.cfg.inflight_window.saturating_sub(self.inflight_total);
        let Some(sub) = self.subs.get_mut(&pb.channel) else {
            return;
        };
        if pb.epoch != sub.epoch {
            return self.close(CloseCode::InsufficientState, "stream epoch changed");
        }
        sub.top = sub.top.max(pb.offset);
        if pb.offset < sub.next {
            return;
        }
        if sub.qos == Qos::AtMostOnce {
            // Live only: skip ahead over anything missed, counted (a
            // fetch's copies below `next` are refused from now on).
            self.stats.dropped_at_most_once += pb.offset - sub.next;
            sub.next = pb.offset.saturating_add(1);
            self.stats.delivered += 1;
            let frame = p.frame(self.enc, self.compress_min()).to_vec();
            return self.queue_frame(frame);
        }
        if pb.offset == sub.next && room > 0 {
            sub.next += 1;
            sub.inflight.push_back(InFlight { offset: pb.offset, sent: now, redeliveries: 0, publication: p.clone() });
            self.inflight_total += 1;
            self.stats.delivered += 1;
            let frame = p.frame(self.enc, self.compress_min()).to_vec();
            self.queue_frame(frame);
            self.arm_redeliver();
        }
        let ch = pb.channel.clone();
        self.maybe_fetch(&ch);
    }

    /// The host skipped live publications for this connection (its queue
    /// was full): the stream now reaches `top`, so fetch what is missing.
    /// At QoS 0 a position no longer retained skips ahead to the oldest
    /// one retained (`fetch_done`).
    pub fn stream_advanced(&mut self, _now: Instant, channel: &str, epoch: &str, top: u64) {
        let Some(sub) = self.subs.get_mut(channel) else { return };
        if sub.epoch != epoch {
            return self.close(CloseCode::InsufficientState, "stream epoch changed");
        }
        sub.top = sub.top.max(top);
        self.maybe_fetch(channel);
    }

    /// A fetch finished.
    pub fn fetch_done(&mut self, _now: Instant, channel: &str, end: FetchEnd) {
        // The window is shared by every subscription of the connection.
        let room = self.cfg.inflight_window.saturating_sub(self.inflight_total);
        let Some(sub) = self.subs.get_mut(channel) else {
            return;
        };
        let Some(from) = sub.fetching.take() else {
            return;
        };
        if let (FetchEnd::Trimmed { first }, Qos::AtMostOnce) = (end, sub.qos) {
            // At most once allows the drop: skip to what is retained and
            // count what was skipped. Closing (3004) instead cut every
            // lagging QoS 0 subscriber of a short history again and again
            // under overload, though none of them could get more.
            if first > sub.next {
                self.stats.dropped_at_most_once += first - sub.next;
                sub.next = first;
            }
            return self.maybe_fetch(channel);
        }
        if matches!(end, FetchEnd::Lost | FetchEnd::Trimmed { .. }) {
            return self.close(CloseCode::InsufficientState, "stream position no longer retained");
        }
        if sub.next == from && (room > 0 || sub.qos == Qos::AtMostOnce) {
            // Nothing came back although there was room: the stream ends
            // before where we thought. Wait for the next live publication.
            // (Without room, what came back could not be pushed: the next
            // ack fetches it again.)
            sub.top = sub.next.saturating_sub(1);
        }
        self.maybe_fetch(channel);
    }

    /// Push a join, leave or unsubscribed notice.
    pub fn push_notice(&mut self, _now: Instant, push: Push) {
        if !self.is_live() {
            return;
        }
        if let Push::Unsubscribed { channel, .. } = &push {
            if let Some(sub) = self.subs.remove(channel) {
                self.inflight_total -= sub.inflight.len();
            }
        }
        self.push(push);
    }

    /// Close from the server side (shutdown, kick, ...).
    pub fn disconnect(&mut self, _now: Instant, code: CloseCode, reason: &str) {
        self.close(code, reason);
    }

    // ---- internals -----------------------------------------------------

    fn on_frame(&mut self, now: Instant, f: ClientFrame) {
        match (&self.phase, f) {
            (Phase::Handshake, ClientFrame::Request { id, cmd: Command::Connect(c) }) => {
                if c.version != PROTOCOL_VERSION {
                    let err = ErrorReply::with_message(ErrorCode::BadRequest, "unsupported protocol version");
                    return self.reject(now, id, err, CloseCode::UnsupportedVersion);
                }
                self.remember_request(id);
                self.client_compress = c.compression;
                self.phase = Phase::Authenticating(id, c.subs.clone());
                self.events.push_back(ServerOutput::Event(ServerEvent::Connect { req: id, connect: c }));
            }
            (Phase::Authenticating(r, _), ClientFrame::Request { id, cmd: Command::Connect(_) }) if *r == id => {
                // A duplicated connect frame.
                self.stats.duplicate_requests += 1;
            }
            (Phase::Handshake | Phase::Authenticating(..), _) => {
                self.close(CloseCode::ProtocolViolation, "connect must come first, alone")
            }
            (Phase::Live, ClientFrame::Pong) => self.timers.clear(Timer::Pong as usize),
            (Phase::Live, ClientFrame::Ack(items)) => {
                for a in items {
                    self.on_ack(now, a);
                }
            }
            (Phase::Live, ClientFrame::Request { id, cmd }) => {
                if !self.remember_request(id) {
                    self.stats.duplicate_requests += 1;
                    return;
                }
                self.on_command(now, id, cmd);
            }
            (Phase::Closed, _) => {}
        }
    }

    /// False when `id` was seen recently (a duplicated frame).
    fn remember_request(&mut self, id: RequestId) -> bool {
        let (order, set) = &mut self.seen_reqs;
        if !set.insert(id) {
            return false;
        }
        order.push_back(id);
        if order.len() > self.cfg.request_id_window {
            if let Some(old) = order.pop_front() {
                set.remove(&old);
            }
        }
        true
    }

    fn on_command(&mut self, _now: Instant, id: RequestId, cmd: Command) {
        match cmd {
            Command::Connect(_) => self.close(CloseCode::ProtocolViolation, "already connected"),
            Command::Subscribe(sub) => {
                let pending_subs = self.pending.values().filter(|p| matches!(p, PendingKind::Subscribe(_))).count();
                if self.subs.contains_key(&sub.channel)
                    || self.pending.values().any(|p| matches!(p, PendingKind::Subscribe(s) if s.channel == sub.channel))
                {
                    self.reply_err(id, ErrorReply::new(ErrorCode::AlreadySubscribed));
                } else if self.subs.len() + pending_subs >= self.cfg.max_subscriptions {
                    self.reply_err(id, ErrorReply::new(ErrorCode::LimitExceeded));
                } else {
                    self.pending.insert(id, PendingKind::Subscribe(sub.clone()));
                    self.events.push_back(ServerOutput::Event(ServerEvent::Subscribe { req: id, sub }));
                }
            }
            Command::Unsubscribe { channel } => match self.subs.remove(&channel) {
                Some(sub) => {
                    self.inflight_total -= sub.inflight.len();
                    self.events.push_back(ServerOutput::Event(ServerEvent::Unsubscribed { channel }));
                    self.reply_ok(id, ReplyBody::Unsubscribed);
                }
                None => {
                    // A subscribe still with the host is cancelled: its
                    // reply goes now, and the host's late verdict is ignored.
                    let pending = self.pending.iter().find_map(|(r, p)| match p {
                        PendingKind::Subscribe(s) if s.channel == channel => Some(*r),
                        _ => None,
                    });
                    match pending {
                        Some(r) => {
                            self.pending.remove(&r);
                            let err =
                                ErrorReply::with_message(ErrorCode::NotSubscribed, "unsubscribed before subscribed");
                            self.reply_err(r, err);
                            self.events.push_back(ServerOutput::Event(ServerEvent::Unsubscribed { channel }));
                            self.reply_ok(id, ReplyBody::Unsubscribed);
                        }
                        None => self.reply_err(id, ErrorReply::new(ErrorCode::NotSubscribed)),
                    }
                }
            },
            Command::Publish { channel, message_id, qos, payload } => {
                let data = match compress::unpack(&payload, self.cfg.max_message_size) {
                    Ok(d) => d,
                    Err(DecodeError::InflateLimit { .. }) => {
                        return self.reply_err(id, ErrorReply::new(ErrorCode::MessageTooLarge));
                    }
                    Err(e) => {
                        return self.reply_err(id, ErrorReply::with_message(ErrorCode::BadRequest, e.to_string()))
                    }
                };
                if payload.z && !self.client_compress {
                    return self
                        .reply_err(id, ErrorReply::with_message(ErrorCode::BadRequest, "compression not agreed"));
                }
                let print = publish_fingerprint(&channel, &data);
                if let Some((first, waiting)) = self.publishing.get_mut(&message_id) {
                    if *first != print {
                        // Same rule as the host's dedup: only a retry of the
                        // same publish shares its result.
                        let msg = format!("{MESSAGE_ID_REUSED}: {message_id:?} is being published with another channel or data; use a fresh id");
                        return self.reply_err(id, ErrorReply::with_message(ErrorCode::BadRequest, msg));
                    }
                    // A retry of a publish the host is still storing: answer
                    // both with the one result instead of storing twice.
                    waiting.push(id);
                    self.pending.insert(id, PendingKind::Publish(message_id));
                    self.stats.coalesced_publishes += 1;
                    return;
                }
                self.publishing.insert(message_id.clone(), (print, vec![id]));
                self.pending.insert(id, PendingKind::Publish(message_id.clone()));
                self.events.push_back(ServerOutput::Event(ServerEvent::Publish {
                    req: id,
                    channel,
                    message_id,
                    qos,
                    data,
                }));
            }
            Command::Release { message_id } => {
                self.events.push_back(ServerOutput::Event(ServerEvent::Release { message_id }));
                self.reply_ok(id, ReplyBody::Released);
            }
            Command::Refresh { token } => {
                self.pending.insert(id, PendingKind::Refresh);
                self.events.push_back(ServerOutput::Event(ServerEvent::Refresh { req: id, token }));
            }
            cmd @ (Command::Presence { .. } | Command::PresenceStats { .. } | Command::History(_)) => {
                self.pending.insert(id, PendingKind::Call);
                self.events.push_back(ServerOutput::Event(ServerEvent::Call { req: id, cmd }));
            }
        }
    }

    fn on_ack(&mut self, _now: Instant, a: AckItem) {
        let Some(sub) = self.subs.get_mut(&a.channel) else {
            return;
        };
        if a.epoch != sub.epoch || a.offset <= sub.acked {
            return;
        }
        // Never beyond what was sent: a client cannot ack the future.
        let offset = a.offset.min(sub.next.saturating_sub(1));
        if offset <= sub.acked {
            return;
        }
        sub.acked = offset;
        let before = sub.inflight.len();
        while sub.inflight.front().is_some_and(|f| f.offset <= offset) {
            sub.inflight.pop_front();
        }
        self.inflight_total -= before - sub.inflight.len();
        self.events.push_back(ServerOutput::Event(ServerEvent::Acked {
            channel: a.channel.clone(),
            epoch: a.epoch,
            offset,
        }));
        self.arm_redeliver();
        // Room freed: channels that fell behind can catch up.
        let behind: Vec<String> =
            self.subs.iter().filter(|(_, s)| s.fetching.is_none() && s.next <= s.top).map(|(c, _)| c.clone()).collect();
        for ch in behind {
            self.maybe_fetch(&ch);
        }
    }

    fn start_sub(&mut self, channel: String, start: StreamStart) {
        let sub = Sub {
            qos: start.qos,
            epoch: start.epoch,
            next: start.from,
            top: start.top,
            acked: start.from.saturating_sub(1),
            inflight: VecDeque::new(),
            fetching: None,
        };
        self.subs.insert(channel.clone(), Box::new(sub));
        self.maybe_fetch(&channel);
    }

    fn maybe_fetch(&mut self, channel: &str) {
        let room = self.cfg.inflight_window.saturating_sub(self.inflight_total);
        let Some(sub) = self.subs.get_mut(channel) else {
            return;
        };
        if sub.fetching.is_some() || sub.next > sub.top {
            return;
        }
        let limit = if sub.qos == Qos::AtMostOnce { self.cfg.inflight_window } else { room };
        if limit == 0 {
            return;
        }
        sub.fetching = Some(sub.next);
        self.events.push_back(ServerOutput::Event(ServerEvent::Fetch {
            channel: channel.into(),
            epoch: sub.epoch.clone(),
            from: sub.next,
            limit,
        }));
    }

    fn redeliver(&mut self, now: Instant) {
        let timeout = self.cfg.ack_timeout;
        let mut frames = Vec::new();
        let mut too_slow = false;
        for sub in self.subs.values_mut() {
            for f in sub.inflight.iter_mut() {
                if f.sent.plus(timeout) <= now {
                    f.redeliveries += 1;
                    if f.redeliveries > self.cfg.max_redeliveries {
                        too_slow = true;
                    }
                    f.sent = now;
                    frames.push(f.publication.clone());
                }
            }
        }
        if too_slow {
            return self.close(CloseCode::SlowConsumer, "deliveries not acknowledged");
        }
        for p in frames {
            self.stats.redelivered += 1;
            let frame = p.frame(self.enc, self.compress_min()).to_vec();
            self.queue_frame(frame);
        }
        self.arm_redeliver();
    }

    fn arm_redeliver(&mut self) {
        let at = self.subs.values().filter_map(|s| s.inflight.iter().map(|f| f.sent).min()).min();
        self.timers.set_opt(Timer::Redeliver as usize, at.map(|t| t.plus(self.cfg.ack_timeout)));
    }

    fn reply_ok(&mut self, id: RequestId, body: ReplyBody) {
        self.send_frame(&ServerFrame::Reply { id, outcome: Outcome::Ok(body) });
    }

    fn reply_err(&mut self, id: RequestId, err: ErrorReply) {
        self.send_frame(&ServerFrame::Reply { id, outcome: Outcome::Error(err) });
    }

    fn push(&mut self, p: Push) {
        self.send_frame(&ServerFrame::Push(p));
    }

    fn send_frame(&mut self, f: &ServerFrame) {
        let bytes = codec::encode(self.enc, f);
        self.queue_frame(bytes);
    }

    fn queue_frame(&mut self, bytes: Vec<u8>) {
        if self.is_closed() {
            return;
        }
        self.out.push(bytes);
        if self.out.bytes() > self.cfg.max_queued_bytes {
            // Design: drop the backlog rather than grow; the client's
            // recovery refills the gap after it reconnects.
            self.out.clear();
            self.close(CloseCode::SlowConsumer, "send queue full");
        }
    }

    fn close(&mut self, code: CloseCode, reason: &str) {
        if self.is_closed() {
            return;
        }
        let reconnect = CloseCode::reconnects(code as u16);
        self.push(Push::Disconnect { code: code as u16, reason: reason.into(), reconnect });
        self.events.push_back(ServerOutput::Close { code: code as u16, reason: reason.into() });
        self.finish(code as u16, reason.into());
    }

    fn finish(&mut self, code: u16, reason: String) {
        self.phase = Phase::Closed;
        self.timers = Timers::default();
        self.subs.clear();
        self.inflight_total = 0;
        self.pending.clear();
        self.publishing.clear();
        self.events.push_back(ServerOutput::Event(ServerEvent::Closed { code, reason }));
    }
}

/// Tells publishes apart that share a message id on one connection. Only
/// compared in memory while a publish is pending, so any stable-per-process
/// hash does (collisions could only come from the client itself).
fn publish_fingerprint(channel: &str, data: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    channel.hash(&mut h);
    data.hash(&mut h);
    h.finish()
}

fn subscribed(channel: &str, s: &StreamStart) -> Subscribed {
    Subscribed {
        channel: channel.into(),
        qos: s.qos,
        epoch: s.epoch.clone(),
        top: s.top,
        from: s.from,
        recovered: s.recovered,
    }
}
