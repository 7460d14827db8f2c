//! One WebSocket connection: a task that drives the core's
//! [`ServerSession`] and answers its events with the hub.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use ferry_core::codec::Encoding;
use ferry_core::frame::*;
use ferry_core::server::{Accept, ServerEvent, ServerOutput, ServerSession, SharedPublication};
use ferry_core::{CloseCode, ErrorCode, Instant};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;

use crate::channel;
use crate::hub::{now_ms, ConnHandle, ConnMsg, Hub, ReplyTo};

/// Live publications handed to the session per wake at most.
const MAX_DRAIN: usize = 256;

/// A write that takes longer than this means the peer is gone or stalled.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Monotonic milliseconds for the session clock.
fn clock(origin: tokio::time::Instant) -> Instant {
    Instant::from_millis(origin.elapsed().as_millis() as u64)
}

struct Conn {
    hub: Arc<Hub>,
    session: ServerSession,
    origin: tokio::time::Instant,
    handle: Option<ConnHandle>,
    ctl_tx: mpsc::UnboundedSender<ConnMsg>,
    data_tx: mpsc::Sender<Arc<SharedPublication>>,
    id: u64,
    channels: Vec<String>,
    /// Fetches the session asked for, waiting for socket room.
    fetches: std::collections::VecDeque<(String, String, u64, usize)>,
    /// A fetch is being read from the store.
    fetching: bool,
    /// In-flight count last added to the global gauge.
    last_inflight: usize,
    /// The session's QoS 0 drops already added to the metric.
    last_dropped: u64,
    /// Subscriptions behind their stream as last told to the hub: channel
    /// and the oldest offset still to push.
    holds: Vec<Held>,
    /// Publish rate limit.
    bucket: TokenBucket,
    /// The peer's address, for the logs.
    peer: std::net::SocketAddr,
    /// How the session ended: close code and reason.
    closed: Option<(u16, String)>,
}

/// How long a subscription that caught up keeps holding publishers back.
const HOLD_RELEASE: Duration = Duration::from_secs(1);

/// A subscription whose position the hub holds (backpressure).
struct Held {
    channel: String,
    /// Position last told to the hub.
    reported: u64,
    /// Since when it is no longer behind.
    caught_up: Option<Instant>,
}

/// A token bucket: `rate` per second sustained, `burst` at once.
struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    fn new(rate: u32, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        TokenBucket { rate: f64::from(rate), burst, tokens: burst, at: Instant::from_millis(0) }
    }

    fn take(&mut self, now: Instant) -> bool {
        if self.rate <= 0.0 {
            return true;
        }
        let secs = now.since(self.at).as_secs_f64();
        self.at = now;
        self.tokens = (self.tokens + secs * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Bytes of catch-up handed to the socket per fetch.
const FETCH_CHUNK_BYTES: usize = 64 * 1024;

impl Conn {
    /// Hand a publication to the session, counting what it pushes.
    fn deliver(&mut self, now: Instant, p: &Arc<SharedPublication>) {
        let before = self.session.stats().delivered;
        self.session.deliver(now, p);
        let pushed = self.session.stats().delivered - before;
        if pushed > 0 {
            let q = self.session.subscription_qos(&p.publication().channel).map(|q| q.as_u8() as usize).unwrap_or(0);
            self.hub.metrics.deliveries[q].fetch_add(pushed, Ordering::Relaxed);
        }
    }

    /// Keep the global acks-pending gauge and QoS 0 drop counter in step
    /// with this session.
    fn sync_inflight(&mut self) {
        let now = self.session.inflight();
        if now != self.last_inflight {
            self.hub.metrics.acks_pending.fetch_add(now as i64 - self.last_inflight as i64, Ordering::Relaxed);
            self.last_inflight = now;
        }
        let dropped = self.session.stats().dropped_at_most_once;
        if dropped != self.last_dropped {
            self.hub.metrics.qos0_dropped.fetch_add(dropped - self.last_dropped, Ordering::Relaxed);
            self.last_dropped = dropped;
        }
        self.sync_holds(clock(self.origin));
    }

    /// Tell the hub where QoS 1/2 subscriptions that are, or were just,
    /// behind stand (backpressure). A subscription keeps its hold for
    /// [`HOLD_RELEASE`] after it caught up: publishers held back would
    /// otherwise all retry at once and overrun it again. A position is
    /// reported again only once it moved by a sixteenth of the history:
    /// an older one only makes the check stricter, and a lagging
    /// subscriber must not take the hub lock on every delivery.
    fn sync_holds(&mut self, now: Instant) {
        let Some(h) = &self.handle else { return };
        let id = h.id;
        for (ch, next) in self.session.behind() {
            match self.holds.iter_mut().find(|x| x.channel == ch) {
                Some(x) => x.caught_up = None,
                None => {
                    self.holds.push(Held { channel: ch.to_string(), reported: next, caught_up: None });
                    self.hub.hold(id, ch, Some(next));
                }
            }
        }
        if self.holds.is_empty() {
            return;
        }
        let (session, hub) = (&self.session, &self.hub);
        self.holds.retain_mut(|x| {
            let Some(next) = session.position(&x.channel) else {
                hub.hold(id, &x.channel, None);
                return false;
            };
            if x.caught_up.is_none() && !session.behind().any(|(c, _)| c == x.channel) {
                x.caught_up = Some(now);
            }
            if x.caught_up.is_some_and(|t| t.plus(HOLD_RELEASE) <= now) {
                hub.hold(id, &x.channel, None);
                return false;
            }
            let step = (hub.config().namespace(&x.channel).history_size as u64 / 16).max(1);
            if next >= x.reported + step || next < x.reported {
                x.reported = next;
                hub.hold(id, &x.channel, Some(next));
            }
            true
        });
    }

    /// Start the next waiting fetch if the socket has drained enough.
    fn serve_fetch(&mut self, queued: usize, low_water: usize) {
        if self.fetching || queued > low_water {
            return;
        }
        let Some((channel, epoch, from, limit)) = self.fetches.pop_front() else {
            return;
        };
        self.fetching = true;
        let hub = self.hub.clone();
        let tx = self.ctl_tx.clone();
        tokio::spawn(async move {
            // While the engine is unreachable the fetch waits and tries
            // again (the connection stays up; its position stays valid),
            // until the connection is gone.
            let mut delay = std::time::Duration::from_millis(100);
            loop {
                if let Some((pubs, end)) = hub.fetch(&channel, &epoch, from, limit, FETCH_CHUNK_BYTES).await {
                    let _ = tx.send(ConnMsg::Fetched { channel, pubs, end });
                    return;
                }
                if tx.is_closed() {
                    return;
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(std::time::Duration::from_secs(2));
            }
        });
    }
}

/// Bytes waiting for one connection's socket: messages not yet handed to
/// it, and bytes handed to it but not yet flushed.
struct Outbox {
    queue: VecDeque<Message>,
    /// Bytes in `queue` plus `unflushed`.
    queued: usize,
    /// Bytes fed to the socket since the last completed flush.
    unflushed: usize,
    /// Since when bytes have waited without a completed flush.
    waiting_since: Option<tokio::time::Instant>,
    /// A write failed: nothing more goes out.
    failed: bool,
}

/// What the socket did in one poll.
enum Io {
    Read(Option<Result<Message, axum::Error>>),
    /// A flush completed (room for more, and progress for the timeout).
    Wrote,
    WriteFailed,
}

impl Outbox {
    fn push(&mut self, m: Message) {
        self.queued += message_len(&m);
        self.waiting_since.get_or_insert_with(tokio::time::Instant::now);
        self.queue.push_back(m);
    }

    /// Hand every queued message the socket takes, then flush once: many
    /// frames per syscall under load, no added latency when idle. Ready
    /// when a flush completed or a write failed.
    fn poll_write(&mut self, ws: &mut WebSocket, cx: &mut std::task::Context<'_>) -> Poll<Io> {
        use futures_util::Sink;
        if self.failed {
            return Poll::Pending;
        }
        let mut ws = Pin::new(ws);
        while !self.queue.is_empty() {
            match ws.as_mut().poll_ready(cx) {
                Poll::Ready(Ok(())) => {
                    let m = self.queue.pop_front().expect("not empty");
                    self.unflushed += message_len(&m);
                    if ws.as_mut().start_send(m).is_err() {
                        return self.fail();
                    }
                }
                Poll::Ready(Err(_)) => return self.fail(),
                Poll::Pending => break,
            }
        }
        if self.unflushed == 0 {
            return Poll::Pending;
        }
        match ws.poll_flush(cx) {
            Poll::Ready(Ok(())) => {
                self.queued -= self.unflushed;
                self.unflushed = 0;
                self.waiting_since = if self.queue.is_empty() { None } else { Some(tokio::time::Instant::now()) };
                Poll::Ready(Io::Wrote)
            }
            Poll::Ready(Err(_)) => self.fail(),
            Poll::Pending => Poll::Pending,
        }
    }

    fn fail(&mut self) -> Poll<Io> {
        self.failed = true;
        self.queue.clear();
        Poll::Ready(Io::WriteFailed)
    }
}

/// Serve one upgraded WebSocket until it closes.
///
/// Design: one task reads and writes the socket. Writes are polled inside
/// the same `select` as reads, timers and the hub's channels, so a peer
/// that stops reading never blocks this loop: timers (pong deadline, token
/// expiry) keep firing, and bytes waiting for the socket count against the
/// per-connection send-queue limit. (A separate writer task cost a wake, a
/// channel and a lock of the split socket per delivery.)
pub async fn serve(
    hub: Arc<Hub>,
    mut ws: WebSocket,
    enc: Encoding,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
    peer: std::net::SocketAddr,
) {
    let origin = tokio::time::Instant::now();
    let (ctl_tx, mut ctl_rx) = mpsc::unbounded_channel();
    let (data_tx, mut data_rx) = mpsc::channel(hub.config().limits.fanout_queue.max(1));
    let id = hub.conn_id();
    let session = ServerSession::new(hub.config().session(), enc, clock(origin));
    let max_queued = hub.config().limits.max_queued_bytes;
    let mut c = Conn {
        hub: hub.clone(),
        session,
        origin,
        handle: None,
        ctl_tx,
        data_tx,
        id,
        channels: Vec::new(),
        fetches: Default::default(),
        fetching: false,
        last_inflight: 0,
        last_dropped: 0,
        holds: Vec::new(),
        bucket: TokenBucket::new(hub.config().limits.publish_rate, hub.config().limits.publish_burst),
        peer,
        closed: None,
    };
    let mut out = Outbox { queue: VecDeque::new(), queued: 0, unflushed: 0, waiting_since: None, failed: false };
    let low_water = (max_queued / 4).max(FETCH_CHUNK_BYTES);
    let mut deadline: Option<Instant>;
    loop {
        // Drain the session: writes, host work, and the next deadline. One
        // clock read per wake: the session counts milliseconds, and reading
        // the clock per output was 5 % of a fan-out profile.
        let now = clock(c.origin);
        loop {
            match c.session.poll_output(now) {
                ServerOutput::Transmit(data) => {
                    let msg = if enc.is_text() {
                        match String::from_utf8(data) {
                            Ok(s) => Message::Text(Utf8Bytes::from(s)),
                            Err(_) => continue,
                        }
                    } else {
                        Message::Binary(data.into())
                    };
                    let len = message_len(&msg);
                    c.hub.metrics.messages_out.fetch_add(1, Ordering::Relaxed);
                    c.hub.metrics.bytes_out.fetch_add(len as u64, Ordering::Relaxed);
                    if out.queued + len > max_queued {
                        c.session.disconnect(now, CloseCode::SlowConsumer, "send queue full");
                    }
                    if out.failed {
                        c.session.handle_closed(now);
                    } else {
                        out.push(msg);
                    }
                }
                ServerOutput::Event(e) => c.on_event(e),
                ServerOutput::Close { code, reason } => {
                    let reason: String = reason.chars().take(100).collect();
                    out.push(Message::Close(Some(CloseFrame { code, reason: Utf8Bytes::from(reason) })));
                }
                ServerOutput::Timeout(t) => {
                    deadline = t;
                    break;
                }
            }
        }
        if c.session.is_closed() {
            break;
        }
        c.serve_fetch(out.queued, low_water);
        let sleep = async {
            match deadline {
                Some(t) => {
                    let wait = t.as_millis().saturating_sub(clock(c.origin).as_millis());
                    tokio::time::sleep(Duration::from_millis(wait)).await
                }
                None => std::future::pending().await,
            }
        };
        let waiting_since = out.waiting_since;
        let stalled = async {
            match waiting_since {
                Some(t) => tokio::time::sleep_until(t + WRITE_TIMEOUT).await,
                None => std::future::pending().await,
            }
        };
        let io = std::future::poll_fn(|cx| {
            // Writes first, then the read side is always polled too: under
            // steady output every wake completes a flush, and returning on
            // that alone would starve acks and pongs.
            let wrote = match out.poll_write(&mut ws, cx) {
                Poll::Ready(Io::WriteFailed) => return Poll::Ready(Io::WriteFailed),
                Poll::Ready(_) => true,
                Poll::Pending => false,
            };
            match ws.poll_next_unpin(cx) {
                Poll::Ready(m) => Poll::Ready(Io::Read(m)),
                Poll::Pending if wrote => Poll::Ready(Io::Wrote),
                Poll::Pending => Poll::Pending,
            }
        });
        tokio::select! {
            io = io => {
                let now = clock(c.origin);
                match io {
                    Io::Read(msg) => c.on_message(now, enc, msg),
                    // Room in the socket: the loop serves a waiting fetch.
                    Io::Wrote => {}
                    Io::WriteFailed => c.session.handle_closed(now),
                }
            }
            Some(m) = ctl_rx.recv() => c.on_ctl(m),
            Some(p) = data_rx.recv() => {
                let now = clock(c.origin);
                c.deliver(now, &p);
                // Everything already queued, before the next write: one
                // flush (one syscall) carries them all.
                for _ in 0..MAX_DRAIN {
                    let Ok(p) = data_rx.try_recv() else { break };
                    c.deliver(now, &p);
                }
            }
            _ = sleep => c.session.handle_timeout(clock(c.origin)),
            // A peer that reads nothing for this long is gone or stalled.
            _ = stalled => c.session.handle_closed(clock(c.origin)),
            _ = shutdown.changed() => {
                c.session.disconnect(clock(c.origin), CloseCode::Shutdown, "server shutting down");
            }
        }
        c.sync_inflight();
    }
    // Drain pending host events (Closed) so the hub forgets us.
    loop {
        match c.session.poll_output(clock(c.origin)) {
            ServerOutput::Event(e) => c.on_event(e),
            ServerOutput::Timeout(_) => break,
            ServerOutput::Transmit(_) => {}
            ServerOutput::Close { code, reason } => {
                out.push(Message::Close(Some(CloseFrame { code, reason: Utf8Bytes::from(reason) })));
            }
        }
    }
    c.sync_inflight();
    if c.hub.redis().is_some() {
        // Subscribes on Redis finish asynchronously and register only while
        // the connection is registered: unregister first, then every
        // channel it is in is final.
        if let Some(h) = &c.handle {
            c.hub.unregister(h);
        }
        let channels = c.hub.channels_of(c.id);
        c.hub.remove_conn(c.id, &channels);
    } else {
        c.hub.remove_conn(c.id, &c.channels);
        if let Some(h) = &c.handle {
            c.hub.unregister(h);
        }
    }
    if c.hub.logs.connections.allow() {
        let (code, reason) = c.closed.take().unwrap_or((0, String::new()));
        let user = c.handle.as_ref().map_or("-", |h| if h.info.user.is_empty() { "(anonymous)" } else { &h.info.user });
        tracing::info!(
            client = %format_args!("{:x}", c.id),
            user,
            peer = %c.peer,
            code,
            %reason,
            duration_ms = c.origin.elapsed().as_millis() as u64,
            "connection closed"
        );
    }
    // What is still queued (the close frame last) goes out, bounded by the
    // write timeout; the hub has already forgotten this connection.
    if !out.failed {
        let rest = async {
            for m in out.queue.drain(..) {
                ws.feed(m).await?;
            }
            ws.flush().await?;
            ws.close().await
        };
        let _ = tokio::time::timeout(WRITE_TIMEOUT, rest).await;
    }
}

fn message_len(m: &Message) -> usize {
    match m {
        Message::Text(t) => t.len(),
        Message::Binary(b) => b.len(),
        _ => 16,
    }
}

impl Conn {
    fn now(&self) -> Instant {
        clock(self.origin)
    }

    /// One message (or the end) read from the socket.
    fn on_message(&mut self, now: Instant, enc: Encoding, msg: Option<Result<Message, axum::Error>>) {
        if let Some(Ok(m)) = &msg {
            let m_ = &self.hub.metrics;
            m_.messages_in.fetch_add(1, Ordering::Relaxed);
            m_.bytes_in.fetch_add(message_len(m) as u64, Ordering::Relaxed);
        }
        match msg {
            Some(Ok(Message::Binary(b))) if !enc.is_text() => self.session.handle_message(now, &b),
            Some(Ok(Message::Text(t))) if enc.is_text() => self.session.handle_message(now, t.as_bytes()),
            Some(Ok(Message::Binary(_) | Message::Text(_))) => {
                self.session.disconnect(now, CloseCode::ProtocolViolation, "wrong message type for the subprotocol")
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            Some(Ok(Message::Close(_))) | None => self.session.handle_closed(now),
            Some(Err(e)) => {
                let text = e.to_string();
                if text.contains("too long") || text.contains("Space limit") {
                    self.session.disconnect(now, CloseCode::MessageTooLarge, "message too large");
                } else {
                    self.session.handle_closed(now);
                }
            }
        }
    }

    fn on_event(&mut self, e: ServerEvent) {
        let now = self.now();
        match e {
            ServerEvent::Connect { req, connect } => self.on_connect(now, req, connect),
            ServerEvent::Subscribe { req, sub } => {
                let Some(h) = self.handle.clone() else { return };
                if let Some(pending) = self.hub.subscribe_remote(&h, &sub) {
                    let tx = self.ctl_tx.clone();
                    let channel = sub.channel.clone();
                    tokio::spawn(async move {
                        let result = pending.await;
                        let _ = tx.send(ConnMsg::Subscribed { req, channel, result: Box::new(result) });
                    });
                    return;
                }
                match self.hub.subscribe(&h, &sub) {
                    Ok(start) => {
                        self.channels.push(sub.channel.clone());
                        self.session.subscribe_ok(now, req, start);
                    }
                    Err(err) => self.session.reply_error(now, req, err),
                }
            }
            ServerEvent::Unsubscribed { channel } => {
                self.hub.unsubscribe(self.id, &channel);
                self.channels.retain(|c| *c != channel);
            }
            ServerEvent::Publish { req, channel, message_id, qos, data } => {
                let Some(h) = self.handle.clone() else { return };
                if !self.bucket.take(now) {
                    let err = ErrorReply::with_message(ErrorCode::TooManyRequests, "publish rate limit");
                    return self.session.reply_error(now, req, err);
                }
                if let Err(err) = channel::validate(&channel) {
                    return self.session.reply_error(now, req, err);
                }
                let ns = self.hub.config().namespace(&channel);
                if channel::personal_owner(&channel).is_some() && !ns.personal_publish {
                    return self.session.reply_error(
                        now,
                        req,
                        ErrorReply::with_message(
                            ErrorCode::PermissionDenied,
                            "personal channels take publishes from the backend API only (see personal_publish)",
                        ),
                    );
                }
                if !ns.client_publish {
                    return self.session.reply_error(
                        now,
                        req,
                        ErrorReply::with_message(ErrorCode::PermissionDenied, "clients may not publish here"),
                    );
                }
                if qos > ns.max_qos() {
                    return self.session.reply_error(now, req, ErrorReply::new(ErrorCode::QosNotAllowed));
                }
                self.hub.publish(
                    channel,
                    message_id,
                    qos,
                    data,
                    Some(h.info.clone()),
                    ReplyTo::Conn(self.ctl_tx.clone(), req),
                );
            }
            ServerEvent::Release { message_id } => self.hub.release(message_id),
            ServerEvent::Call { req, cmd } => self.on_call(req, cmd),
            ServerEvent::Refresh { req, token } => match self.hub.auth().verify(&token) {
                Ok(id) if Some(&id.user) == self.handle.as_ref().map(|h| &h.info.user) => {
                    self.session.refresh_ok(now, req, id.expires_in(now_ms() / 1000))
                }
                Ok(_) => {
                    use crate::auth::{Credential, Failure};
                    self.hub.auth().record_failure(Credential::Token, Failure::WrongSubject);
                    self.session.reply_error(
                        now,
                        req,
                        ErrorReply::with_message(ErrorCode::Unauthorized, "the new token is for another user"),
                    )
                }
                Err(e) => self.session.reply_error(now, req, e),
            },
            ServerEvent::Acked { channel, epoch, offset } => {
                if let Some(h) = &self.handle {
                    self.hub.ack(h, &channel, epoch, offset);
                }
            }
            ServerEvent::Fetch { channel, epoch, from, limit } => {
                // Served when the socket has room: catch-up is paced by
                // how fast this peer reads, never dumped into memory.
                self.fetches.push_back((channel, epoch, from, limit));
            }
            ServerEvent::Closed { code, reason } => {
                if code == CloseCode::SlowConsumer as u16 {
                    self.hub.metrics.slow_consumers.fetch_add(1, Ordering::Relaxed);
                }
                self.closed = Some((code, reason));
            }
        }
    }

    fn on_connect(&mut self, now: Instant, req: u32, connect: Connect) {
        let id = match self.hub.auth().verify(&connect.token) {
            Ok(id) => id,
            Err(e) => {
                let close = if e.code == ErrorCode::TokenExpired as u16 {
                    CloseCode::TokenExpired
                } else if e.code == ErrorCode::Unavailable as u16 {
                    // The key may be known after a refetch: reconnect allowed.
                    CloseCode::ServerError
                } else {
                    CloseCode::Unauthorized
                };
                return self.session.reject(now, req, e, close);
            }
        };
        let max_per_user = self.hub.config().limits.max_connections_per_user as usize;
        if max_per_user > 0 && !id.user.is_empty() && self.hub.connections_of(&id.user) >= max_per_user {
            let err = ErrorReply::with_message(ErrorCode::LimitExceeded, "too many connections for this user");
            return self.session.reject(now, req, err, CloseCode::Banned);
        }
        let expires_in = id.expires_in(now_ms() / 1000);
        let user = id.user.clone();
        let info = ClientInfo { client: format!("{:x}", self.id), user, info: id.info.clone() };
        let handle = ConnHandle {
            id: self.id,
            info: info.clone(),
            device: connect.device_id.clone(),
            grants: id.channels.clone(),
            since_ms: now_ms(),
            lagged: Default::default(),
            ctl: self.ctl_tx.clone(),
            data: self.data_tx.clone(),
        };
        if self.hub.logs.connections.allow() {
            let user = if info.user.is_empty() { "(anonymous)" } else { &info.user };
            tracing::info!(client = %info.client, user, peer = %self.peer, "connection open");
        }
        // Online before its subscriptions, for webhooks and presence.
        self.hub.register(&handle);
        let remote = self.hub.redis().is_some();
        let mut subs = Vec::with_capacity(connect.subs.len());
        let mut pending = Vec::new();
        for s in &connect.subs {
            if remote {
                pending.push(self.hub.subscribe_remote(&handle, s));
                continue;
            }
            let r = self.hub.subscribe(&handle, s);
            if r.is_ok() {
                self.channels.push(s.channel.clone());
            }
            subs.push(r);
        }
        self.handle = Some(handle);
        // The token's channels, for the client to subscribe to: valid names
        // only, and no more than one connection may hold.
        let max = self.hub.config().limits.max_subscriptions;
        let subscribe: Vec<String> = id
            .channels
            .iter()
            .filter(|c| crate::channel::validate(c).is_ok() && !connect.subs.iter().any(|s| &s.channel == *c))
            .take(max)
            .cloned()
            .collect();
        if remote && !pending.is_empty() {
            // On Redis the recovered subscriptions read Redis first; the
            // reply waits for all of them (within the handshake deadline).
            let tx = self.ctl_tx.clone();
            let names: Vec<String> = connect.subs.iter().map(|s| s.channel.clone()).collect();
            tokio::spawn(async move {
                let mut subs = Vec::with_capacity(pending.len());
                for p in pending.into_iter().flatten() {
                    subs.push(p.await);
                }
                let accept = Accept { client: info, expires_in, subs, time_ms: now_ms(), subscribe };
                let _ = tx.send(ConnMsg::Accepted { req, channels: names, accept: Box::new(accept) });
            });
            return;
        }
        self.session.accept(now, req, Accept { client: info, expires_in, subs, time_ms: now_ms(), subscribe });
    }

    fn on_call(&mut self, req: u32, cmd: Command) {
        let hub = self.hub.clone();
        let tx = self.ctl_tx.clone();
        match cmd {
            Command::History(h) => {
                tokio::spawn(async move {
                    let result = hub.history(&h).await;
                    let _ = tx.send(ConnMsg::Reply { req, result: Box::new(result) });
                });
            }
            Command::Presence { channel } => {
                // The client protocol returns the first page; the backend API pages further.
                tokio::spawn(async move {
                    let result =
                        hub.presence(&channel, None, 1000).await.map(|clients| ReplyBody::Presence { clients });
                    let _ = tx.send(ConnMsg::Reply { req, result: Box::new(result) });
                });
            }
            Command::PresenceStats { channel } => {
                tokio::spawn(async move {
                    let result = hub
                        .presence_stats(&channel)
                        .await
                        .map(|s| ReplyBody::PresenceStats { clients: s.clients, users: s.users });
                    let _ = tx.send(ConnMsg::Reply { req, result: Box::new(result) });
                });
            }
            _ => self.answer(req, Err(ErrorReply::new(ErrorCode::MethodNotFound))),
        }
    }

    fn answer(&mut self, req: u32, r: Result<ReplyBody, ErrorReply>) {
        let now = self.now();
        match r {
            Ok(body) => self.session.reply(now, req, body),
            Err(e) => self.session.reply_error(now, req, e),
        }
    }

    fn on_ctl(&mut self, m: ConnMsg) {
        let now = self.now();
        match m {
            ConnMsg::Published { req, result } => match result {
                Ok(s) => self.session.publish_ok(now, req, s.epoch, s.offset, s.duplicate),
                Err(e) => self.session.reply_error(now, req, e),
            },
            ConnMsg::Fetched { channel, pubs, end } => {
                self.fetching = false;
                // A socket-sized slice; the session asks for the rest.
                for p in &pubs {
                    self.deliver(now, p);
                }
                self.session.fetch_done(now, &channel, end);
            }
            ConnMsg::Reply { req, result } => self.answer(req, *result),
            ConnMsg::Subscribed { req, channel, result } => match *result {
                Ok(start) => {
                    self.channels.push(channel);
                    self.session.subscribe_ok(now, req, start);
                }
                Err(e) => self.session.reply_error(now, req, e),
            },
            ConnMsg::Accepted { req, channels, accept } => {
                for (ch, r) in channels.into_iter().zip(&accept.subs) {
                    if r.is_ok() {
                        self.channels.push(ch);
                    }
                }
                self.session.accept(now, req, *accept);
            }
            ConnMsg::Notice(p) => self.session.push_notice(now, *p),
            ConnMsg::Kick(code, reason) => self.session.disconnect(now, code, &reason),
            ConnMsg::Lagged => {
                if let Some(h) = &self.handle {
                    // Cleared first: a drop after this point raises it again.
                    h.lagged.store(false, Ordering::Release);
                }
                for ch in self.channels.clone() {
                    if let Some((epoch, top)) = self.hub.stream_top(&ch) {
                        self.session.stream_advanced(now, &ch, &epoch, top);
                    }
                }
            }
        }
    }
}
