//! Fan-out benchmark for the Ferry server.
//!
//! For each scenario it starts an in-process server on `127.0.0.1:0` with a
//! fresh data directory, connects S raw WebSocket subscribers (binary
//! subprotocol `ferry.v1`, one channel at QoS 1, acking cumulatively), and
//! lets one or more publishers send M pipelined QoS 1 publishes of P bytes.
//! Every subscriber checks that it receives each publication exactly once,
//! in offset order, with an intact payload; any violation, refusal or
//! disconnect is printed as an `ERROR` line and the process exits non-zero.
//!
//! Reported per scenario: deliveries and deliveries/s, acknowledged
//! publishes/s, end-to-end latency (publisher send instant to subscriber
//! receive, from a sequence number in the payload), latency from the
//! publication's server `time_ms`, publish-to-`published` latency, and CPU
//! time of the server runtime, the sequencer thread and the clients.
//!
//! The default scenarios keep 128 publishes in flight and raise the
//! benchmark channels' `history_size` from 1000 to 100,000: with larger
//! windows the server disconnects live subscribers with 3003 "fan-out
//! queue full", and with 1000 a subscriber that the fan-out leaves far
//! enough behind is disconnected with 3004 and would lose messages. The
//! extra scenarios (run only when named) reproduce both.
//!
//! Run with `cargo bench -p ferry-server --bench fanout`. Environment:
//! `FERRY_BENCH_WINDOW` (publishes in flight per publisher, overriding
//! every scenario's own window),
//! `FERRY_BENCH_ONLY` (comma-separated scenario names to run, including
//! the extra ones that are not run by default),
//! `FERRY_LOG` (server log filter, default `warn`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ferry_core::codec::{self, Encoding};
use ferry_core::compress;
use ferry_core::frame::{
    AckItem, Bytes, ClientFrame, ClientVersion, Command, Connect, Outcome, Payload, Push, Qos, ReplyBody, ServerFrame,
    SubscribeRequest, SubscribeResult, PROTOCOL_VERSION, SUBPROTOCOL_BINARY,
};
use ferry_server::config::{Config, Namespace};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::Instant as Deadline;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// The wire encoding every client speaks.
const ENC: Encoding = Encoding::Binary;
/// Wall-clock budget of one scenario, from the first connect to the last delivery.
const SCENARIO_BUDGET: Duration = Duration::from_secs(45);
/// The whole process exits by itself after this long, whatever happens.
const WATCHDOG: Duration = Duration::from_secs(280);
/// Budget for one WebSocket + `connect` handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Subscriber handshakes in progress at once.
const CONNECT_PARALLEL: usize = 64;
/// A publisher coalesces at most this many publish frames into one message ...
const PUBLISH_MSG_FRAMES: usize = 64;
/// ... and at most this many bytes (well inside the 64 KiB message limit).
const PUBLISH_MSG_BYTES: usize = 32 * 1024;
/// Default publishes in flight (sent, `published` not yet received) per
/// publisher. With 512 the server intermittently disconnects live, acking
/// subscribers with 3003 "fan-out queue full" when the machine is busy
/// (see `s100-w512`).
const DEFAULT_WINDOW: usize = 128;
/// Publisher index (u32) and sequence number (u64) open every payload.
const HEADER: usize = 12;
/// Compressible filler after the header.
const FILLER: &[u8] = b"Ferry fan-out benchmark payload; the quick brown fox jumps over the lazy dog. ";
/// Linux USER_HZ, the unit of per-thread CPU times in /proc.
const CLOCK_TICKS_PER_SEC: f64 = 100.0;

#[derive(Clone, Copy, Debug)]
struct Scenario {
    name: &'static str,
    subscribers: usize,
    publishers: usize,
    /// Total messages, split evenly over the publishers.
    messages: usize,
    payload: usize,
    /// Publishes in flight per publisher (`FERRY_BENCH_WINDOW` overrides).
    window: usize,
    /// Publishes per second over all publishers; 0 = as fast as the window allows.
    rate: u32,
    /// `history_size` of the `bench` namespace; 0 = the server default.
    history: usize,
}

/// Retention of the benchmark channels in the default scenarios (see
/// [`SCENARIOS`]).
const BENCH_HISTORY: usize = 100_000;
/// The server's default `history_size`.
const DEFAULT_HISTORY: usize = 0;

/// A scenario: name, subscribers, publishers, messages, payload bytes,
/// window per publisher, publishes per second (0 = unpaced), history size.
#[allow(clippy::too_many_arguments)]
const fn sc(
    name: &'static str,
    subscribers: usize,
    publishers: usize,
    messages: usize,
    payload: usize,
    window: usize,
    rate: u32,
    history: usize,
) -> Scenario {
    Scenario { name, subscribers, publishers, messages, payload, window, rate, history }
}

/// Run by default. They raise the channels' `history_size` to
/// [`BENCH_HISTORY`]: with the default of 1000, a live subscriber that the
/// fan-out leaves more than 1000 publications behind (easy when the machine
/// is busy) is disconnected with 3004 and would lose messages; the
/// `*-hist1000` scenarios keep the default and show it.
const SCENARIOS: &[Scenario] = &[
    sc("s10", 10, 1, 5000, 100, DEFAULT_WINDOW, 0, BENCH_HISTORY),
    sc("s100", 100, 1, 2000, 100, DEFAULT_WINDOW, 0, BENCH_HISTORY),
    sc("s500", 500, 1, 500, 100, DEFAULT_WINDOW, 0, BENCH_HISTORY),
    // Four publishers with the same total in flight as one; 4 x 128 fails
    // (see `s100-4pub-w128`).
    sc("s100-4pub", 100, 4, 2000, 100, DEFAULT_WINDOW / 4, 0, BENCH_HISTORY),
    // Payloads above compress_min (1024): the compression path.
    sc("s100-4k", 100, 1, 1000, 4000, DEFAULT_WINDOW, 0, BENCH_HISTORY),
    // Paced: latency below saturation.
    sc("s100-r1k", 100, 1, 2000, 100, DEFAULT_WINDOW, 1000, BENCH_HISTORY),
    sc("s500-r200", 500, 1, 1000, 100, DEFAULT_WINDOW, 200, BENCH_HISTORY),
];

/// Run only when named in `FERRY_BENCH_ONLY`: they make the server
/// disconnect live, acking subscribers on a 2-core machine, always or when
/// it is busy (3003 "fan-out queue full", 3004 "stream position no longer
/// retained").
const EXTRA_SCENARIOS: &[Scenario] = &[
    sc("s100-w512", 100, 1, 2000, 100, 512, 0, BENCH_HISTORY),
    sc("s500-w512", 500, 1, 500, 100, 512, 0, BENCH_HISTORY),
    sc("s10-w512-hist1000", 10, 1, 5000, 100, 512, 0, DEFAULT_HISTORY),
    sc("s100-w512-hist1000", 100, 1, 2000, 100, 512, 0, DEFAULT_HISTORY),
    sc("s100-4pub-w128", 100, 4, 2000, 100, 128, 0, BENCH_HISTORY),
    sc("s100-4pub-w128-hist1000", 100, 4, 2000, 100, 128, 0, DEFAULT_HISTORY),
    sc("s10-w1024", 10, 1, 5000, 100, 1024, 0, BENCH_HISTORY),
    sc("s100-w1024", 100, 1, 2000, 100, 1024, 0, BENCH_HISTORY),
];

/// State shared by the publishers and subscribers of one scenario.
struct Shared {
    origin: Instant,
    /// Send instant of every message as nanoseconds since `origin` plus one
    /// (0 = not sent yet); index `publisher * per_pub + seq`.
    sent_ns: Vec<AtomicU64>,
    publishers: usize,
    per_pub: usize,
    payload: usize,
    channel: String,
    tag: String,
    /// Highest offset any publisher has had acknowledged (the stream's top as far as we know).
    top: AtomicU64,
    /// Publishes sent by all publishers so far: an upper bound of the stream's top.
    sent: AtomicU64,
}

impl Shared {
    /// Where the stream's top lies, as far as the publishers know.
    fn top_bounds(&self) -> String {
        format!(
            "stream top between {} (acknowledged) and {} (sent)",
            self.top.load(Ordering::Relaxed),
            self.sent.load(Ordering::Relaxed)
        )
    }
    fn stamp(&self) -> u64 {
        self.origin.elapsed().as_nanos() as u64 + 1
    }
    fn index(&self, publisher: usize, seq: usize) -> usize {
        publisher * self.per_pub + seq
    }
    fn message_id(&self, publisher: usize, seq: usize) -> String {
        format!("{}:p{publisher}:{seq}", self.tag)
    }
}

fn wall_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

fn micros(ns: u64) -> u32 {
    u32::try_from(ns / 1000).unwrap_or(u32::MAX)
}

fn filler_byte(seq: usize, i: usize) -> u8 {
    FILLER[(i + seq) % FILLER.len()]
}

fn make_payload(publisher: usize, seq: usize, len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(len);
    v.extend_from_slice(&(publisher as u32).to_le_bytes());
    v.extend_from_slice(&(seq as u64).to_le_bytes());
    for i in HEADER..len {
        v.push(filler_byte(seq, i));
    }
    v
}

/// The publisher and sequence number of an intact payload.
fn parse_payload(d: &[u8], len: usize) -> Option<(usize, usize)> {
    if d.len() != len {
        return None;
    }
    let publisher = u32::from_le_bytes(d[0..4].try_into().ok()?) as usize;
    let seq = usize::try_from(u64::from_le_bytes(d[4..HEADER].try_into().ok()?)).ok()?;
    d[HEADER..].iter().enumerate().all(|(j, &b)| b == filler_byte(seq, HEADER + j)).then_some((publisher, seq))
}

/// Open a WebSocket with the binary subprotocol and Nagle off.
async fn open_ws(url: &str) -> Result<Ws, String> {
    let mut req = url.into_client_request().map_err(|e| format!("bad url: {e}"))?;
    req.headers_mut().insert("Sec-WebSocket-Protocol", HeaderValue::from_static(SUBPROTOCOL_BINARY));
    let (ws, resp) =
        tokio::time::timeout(CONNECT_TIMEOUT, tokio_tungstenite::connect_async_with_config(req, None, true))
            .await
            .map_err(|_| "websocket handshake timed out".to_string())?
            .map_err(|e| format!("websocket handshake failed: {e}"))?;
    let proto = resp.headers().get("sec-websocket-protocol").and_then(|v| v.to_str().ok());
    if proto != Some(SUBPROTOCOL_BINARY) {
        return Err(format!("server selected subprotocol {proto:?}"));
    }
    Ok(ws)
}

async fn send(ws: &mut Ws, data: Vec<u8>, deadline: Deadline, who: &str) -> Result<(), String> {
    match tokio::time::timeout_at(deadline, ws.send(Message::Binary(data.into()))).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("{who}: write failed: {e}")),
        Err(_) => Err(format!("{who}: write timed out")),
    }
}

/// Read the next Ferry message; returns its frames and size in bytes.
async fn recv_frames(
    ws: &mut Ws,
    deadline: Deadline,
    limit: usize,
    who: &str,
) -> Result<(Vec<ServerFrame>, usize), String> {
    loop {
        let msg = match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return Err(format!("{who}: timed out waiting for the server")),
            Ok(None) => return Err(format!("{who}: connection ended without a close frame")),
            Ok(Some(Err(e))) => return Err(format!("{who}: websocket error: {e}")),
            Ok(Some(Ok(m))) => m,
        };
        match msg {
            Message::Binary(b) => {
                let frames = codec::decode_server(ENC, &b, limit)
                    .map_err(|e| format!("{who}: undecodable server message of {} bytes: {e}", b.len()))?;
                return Ok((frames, b.len()));
            }
            Message::Close(Some(f)) => {
                return Err(format!(
                    "{who}: server closed the connection: code {} reason {:?}",
                    u16::from(f.code),
                    f.reason.as_str()
                ))
            }
            Message::Close(None) => return Err(format!("{who}: server closed the connection without a code")),
            Message::Text(_) => return Err(format!("{who}: text message on a binary connection")),
            _ => continue,
        }
    }
}

/// What a connection learned from `connected`.
struct Session {
    epoch: String,
    from: u64,
    /// Largest server message to accept (twice the announced limit).
    max_in: usize,
    /// Inflate limit (the announced limit).
    inflate_limit: usize,
    compress_min: Option<u32>,
}

/// A QoS 1 subscription without a recovery position. Built through serde so
/// that optional fields (`since`, and any added later with a default, such
/// as a subscription token) take their defaults.
fn subscribe_request(channel: &str) -> Result<SubscribeRequest, String> {
    serde_json::from_value(serde_json::json!({ "channel": channel, "qos": Qos::AtLeastOnce.as_u8() }))
        .map_err(|e| format!("cannot build a subscribe request: {e}"))
}

/// Send `connect` (optionally subscribing to `channel`) and wait for `connected`.
async fn handshake(ws: &mut Ws, device: &str, channel: Option<&str>, who: &str) -> Result<Session, String> {
    let deadline = Deadline::now() + CONNECT_TIMEOUT;
    let subs = match channel {
        Some(c) => vec![subscribe_request(c)?],
        None => Vec::new(),
    };
    let connect = ClientFrame::Request {
        id: 1,
        cmd: Command::Connect(Connect {
            version: PROTOCOL_VERSION,
            token: String::new(),
            device_id: device.to_string(),
            client: ClientVersion { name: "ferry-fanout-bench".into(), version: env!("CARGO_PKG_VERSION").into() },
            subs,
            compression: true,
        }),
    };
    send(ws, codec::encode_client(ENC, &connect), deadline, who).await?;
    let (frames, _) = recv_frames(ws, deadline, 2 * codec::DEFAULT_MAX_MESSAGE_SIZE, who).await?;
    if frames.len() != 1 {
        return Err(format!("{who}: expected only the connect reply, got {} frames", frames.len()));
    }
    let c = match frames.into_iter().next() {
        Some(ServerFrame::Reply { id: 1, outcome: Outcome::Ok(ReplyBody::Connected(c)) }) => c,
        other => return Err(format!("{who}: connect answered with {other:?}")),
    };
    let limit = c.max_message_size as usize;
    let mut session = Session {
        epoch: String::new(),
        from: 1,
        max_in: 2 * limit,
        inflate_limit: limit,
        compress_min: c.compress_min,
    };
    if channel.is_some() {
        match c.subs.as_slice() {
            [SubscribeResult::Ok(s)] => {
                if s.qos != Qos::AtLeastOnce || s.top != 0 || s.from != 1 || !s.recovered {
                    return Err(format!("{who}: unexpected subscription result {s:?}"));
                }
                session.epoch = s.epoch.clone();
                session.from = s.from;
            }
            other => return Err(format!("{who}: subscription refused or missing: {other:?}")),
        }
    }
    Ok(session)
}

#[derive(Default)]
struct SubReport {
    id: usize,
    e2e_us: Vec<u32>,
    srv_us: Vec<u32>,
    messages: u64,
    bytes: u64,
    compressed: u64,
    /// Stamp of the last delivery.
    done_at: u64,
}

/// Read, verify and ack every publication of the scenario.
async fn subscriber(
    i: usize,
    mut ws: Ws,
    s: Session,
    shared: Arc<Shared>,
    deadline: Deadline,
) -> Result<(SubReport, Ws), String> {
    let who = format!("subscriber {i}");
    let total = (shared.publishers * shared.per_pub) as u64;
    let last = s.from + total - 1;
    let mut next = s.from;
    let mut next_seq = vec![0usize; shared.publishers];
    let mut r = SubReport {
        id: i,
        e2e_us: Vec::with_capacity(total as usize),
        srv_us: Vec::with_capacity(total as usize),
        ..SubReport::default()
    };
    while next <= last {
        let (frames, size) = recv_frames(&mut ws, deadline, s.max_in, &who).await?;
        let now = shared.stamp();
        let wall = wall_us();
        r.messages += 1;
        r.bytes += size as u64;
        let before = next;
        let mut pong = false;
        for f in frames {
            let p = match f {
                ServerFrame::Push(Push::Publication(p)) => p,
                ServerFrame::Push(Push::Ping) => {
                    pong = true;
                    continue;
                }
                ServerFrame::Push(Push::Join { .. } | Push::Leave { .. }) => continue,
                ServerFrame::Push(Push::Disconnect { code, reason, reconnect }) => {
                    return Err(format!(
                        "{who}: disconnect push code {code} reason {reason:?} reconnect {reconnect}; received \
                         up to offset {} of {total}; {}",
                        next - 1,
                        shared.top_bounds()
                    ))
                }
                other => return Err(format!("{who}: unexpected frame {other:?}")),
            };
            if p.channel != shared.channel || p.epoch != s.epoch {
                return Err(format!(
                    "{who}: publication of {}/{} on a subscription to {}/{}",
                    p.channel, p.epoch, shared.channel, s.epoch
                ));
            }
            if p.offset < next {
                return Err(format!("{who}: duplicate delivery of offset {} (next expected {next})", p.offset));
            }
            if p.offset > next {
                return Err(format!("{who}: gap: offset {} arrived while {next} was expected", p.offset));
            }
            if p.offset > last {
                return Err(format!("{who}: offset {} beyond the {total} messages published", p.offset));
            }
            let data = if p.payload.z {
                r.compressed += 1;
                compress::inflate(&p.payload.data.0, s.inflate_limit)
                    .map_err(|e| format!("{who}: offset {}: bad compressed payload: {e}", p.offset))?
            } else {
                p.payload.data.0
            };
            let Some((publisher, seq)) = parse_payload(&data, shared.payload) else {
                return Err(format!("{who}: offset {}: corrupt payload of {} bytes", p.offset, data.len()));
            };
            if publisher >= shared.publishers || seq != next_seq[publisher] {
                return Err(format!(
                    "{who}: offset {} carries publisher {publisher} seq {seq}, out of send order",
                    p.offset
                ));
            }
            if p.message_id != shared.message_id(publisher, seq) {
                return Err(format!(
                    "{who}: offset {} has message id {:?} for publisher {publisher} seq {seq}",
                    p.offset, p.message_id
                ));
            }
            next_seq[publisher] += 1;
            let sent = shared.sent_ns[shared.index(publisher, seq)].load(Ordering::Acquire);
            if sent == 0 {
                return Err(format!("{who}: offset {} arrived before it was sent", p.offset));
            }
            r.e2e_us.push(micros(now.saturating_sub(sent)));
            let srv = wall.saturating_sub(p.time_ms.saturating_mul(1000));
            r.srv_us.push(u32::try_from(srv).unwrap_or(u32::MAX));
            next += 1;
        }
        let mut out = Vec::new();
        if next > before {
            let ack = ClientFrame::Ack(vec![AckItem {
                channel: shared.channel.clone(),
                epoch: s.epoch.clone(),
                offset: next - 1,
            }]);
            codec::encode_into(ENC, &ack, &mut out);
            r.done_at = now;
        }
        if pong {
            codec::encode_into(ENC, &ClientFrame::Pong, &mut out);
        }
        if !out.is_empty() {
            if let Err(e) = send(&mut ws, out, deadline, &who).await {
                let why = why_closed(&mut ws).await;
                return Err(format!(
                    "{e}; received up to offset {} of {total}; {}; {why}",
                    next - 1,
                    shared.top_bounds()
                ));
            }
        }
    }
    Ok((r, ws))
}

struct PubReport {
    id: usize,
    ack_us: Vec<u32>,
    /// Stamp of the last `published` reply.
    done_at: u64,
    epoch: String,
}

/// Publish `per_pub` messages with up to `window` in flight.
async fn publisher(
    k: usize,
    mut ws: Ws,
    s: Session,
    shared: Arc<Shared>,
    window: usize,
    rate: u32,
    deadline: Deadline,
) -> Result<(PubReport, Ws), String> {
    let start = Deadline::now();
    let who = format!("publisher {k}");
    let n = shared.per_pub;
    let mut offsets = vec![0u64; n];
    let mut r = PubReport { id: k, ack_us: Vec::with_capacity(n), done_at: 0, epoch: String::new() };
    let (mut next, mut acked) = (0usize, 0usize);
    // Paced: message `seq` of this publisher is due `seq * interval` after `start`.
    let interval_ns = match rate {
        0 => 0,
        r => 1_000_000_000 * shared.publishers as u64 / u64::from(r),
    };
    let due = |seq: usize| start + Duration::from_nanos(interval_ns * seq as u64);
    while acked < n {
        while next < n && next - acked < window && due(next) <= Deadline::now() {
            let first = next;
            let mut buf = Vec::with_capacity(PUBLISH_MSG_BYTES + shared.payload + 64);
            while next < n
                && next - acked < window
                && (next == first || due(next) <= Deadline::now())
                && next - first < PUBLISH_MSG_FRAMES
                && (next == first || buf.len() + shared.payload + 64 <= PUBLISH_MSG_BYTES)
            {
                let frame = ClientFrame::Request {
                    id: next as u32 + 2,
                    cmd: Command::Publish {
                        channel: shared.channel.clone(),
                        message_id: shared.message_id(k, next),
                        qos: Qos::AtLeastOnce,
                        payload: Payload { z: false, data: Bytes(make_payload(k, next, shared.payload)) },
                    },
                };
                codec::encode_into(ENC, &frame, &mut buf);
                next += 1;
            }
            let t = shared.stamp();
            for seq in first..next {
                shared.sent_ns[shared.index(k, seq)].store(t, Ordering::Release);
            }
            shared.sent.fetch_add((next - first) as u64, Ordering::Relaxed);
            send(&mut ws, buf, deadline, &who).await?;
        }
        // Wait for replies, or until the next paced publish is due.
        let wake = if next < n && next - acked < window { due(next).min(deadline) } else { deadline };
        // Cancel-safe: an interrupted read leaves its bytes in the stream.
        let frames = match tokio::time::timeout_at(wake, recv_frames(&mut ws, deadline, s.max_in, &who)).await {
            Ok(r) => r?.0,
            Err(_) => continue,
        };
        let now = shared.stamp();
        let mut pong = false;
        for f in frames {
            let (id, outcome) = match f {
                ServerFrame::Reply { id, outcome } => (id, outcome),
                ServerFrame::Push(Push::Ping) => {
                    pong = true;
                    continue;
                }
                ServerFrame::Push(Push::Disconnect { code, reason, reconnect }) => {
                    return Err(format!(
                        "{who}: disconnect push code {code} reason {reason:?} reconnect {reconnect} \
                         after {acked} of {n} publishes acknowledged"
                    ))
                }
                other => return Err(format!("{who}: unexpected frame {other:?}")),
            };
            let seq = (id as usize).wrapping_sub(2);
            if seq >= next || offsets[seq] != 0 {
                return Err(format!("{who}: reply to unknown or answered request {id}"));
            }
            match outcome {
                Outcome::Ok(ReplyBody::Published { epoch, offset, duplicate }) => {
                    if duplicate || offset == 0 {
                        return Err(format!("{who}: publish {seq} answered offset {offset} duplicate {duplicate}"));
                    }
                    if r.epoch.is_empty() {
                        r.epoch = epoch;
                    } else if r.epoch != epoch {
                        return Err(format!("{who}: epoch changed from {} to {epoch}", r.epoch));
                    }
                    offsets[seq] = offset;
                    shared.top.fetch_max(offset, Ordering::Relaxed);
                    acked += 1;
                    let sent = shared.sent_ns[shared.index(k, seq)].load(Ordering::Acquire);
                    r.ack_us.push(micros(now.saturating_sub(sent)));
                    r.done_at = now;
                }
                Outcome::Error(e) => {
                    return Err(format!(
                        "{who}: publish {seq} refused: error {} {:?} (temporary {}) \
                         after {acked} of {n} acknowledged",
                        e.code, e.message, e.temporary
                    ))
                }
                Outcome::Ok(other) => return Err(format!("{who}: publish {seq} answered {other:?}")),
            }
        }
        if pong {
            send(&mut ws, codec::encode_client(ENC, &ClientFrame::Pong), deadline, &who).await?;
        }
    }
    if let Some(w) = offsets.windows(2).find(|w| w[1] <= w[0]) {
        return Err(format!(
            "{who}: publishes of one connection stored out of send order (offset {} then {})",
            w[0], w[1]
        ));
    }
    Ok((r, ws))
}

/// After a failed write: what the server said before it closed, if anything.
async fn why_closed(ws: &mut Ws) -> String {
    let end = Deadline::now() + Duration::from_secs(1);
    loop {
        match tokio::time::timeout_at(end, ws.next()).await {
            Ok(Some(Ok(Message::Binary(b)))) => {
                let frames = codec::decode_server(ENC, &b, 1 << 20).unwrap_or_default();
                for f in frames {
                    if let ServerFrame::Push(Push::Disconnect { code, reason, .. }) = f {
                        return format!("server had sent disconnect push code {code} reason {reason:?}");
                    }
                }
            }
            Ok(Some(Ok(Message::Close(Some(f))))) => {
                return format!("server closed with code {} reason {:?}", u16::from(f.code), f.reason.as_str())
            }
            Ok(Some(Ok(_))) => {}
            _ => return "no disconnect push or close frame was readable".into(),
        }
    }
}

/// Close politely; any publication still arriving is a delivery too many.
async fn close_checked(who: String, mut ws: Ws, limit: usize) -> Result<(), String> {
    let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
    let end = Deadline::now() + Duration::from_secs(2);
    loop {
        match tokio::time::timeout_at(end, ws.next()).await {
            Err(_) | Ok(None) | Ok(Some(Err(_))) => return Ok(()),
            Ok(Some(Ok(Message::Binary(b)))) => {
                if let Ok(frames) = codec::decode_server(ENC, &b, limit) {
                    if let Some(ServerFrame::Push(Push::Publication(p))) =
                        frames.iter().find(|f| matches!(f, ServerFrame::Push(Push::Publication(_))))
                    {
                        return Err(format!("{who}: extra delivery of offset {} after all messages arrived", p.offset));
                    }
                }
            }
            Ok(Some(Ok(_))) => {}
        }
    }
}

/// Latency percentiles, milliseconds.
#[derive(Clone, Copy, Default)]
struct Pct {
    p50: f64,
    p99: f64,
    max: f64,
}

fn percentiles(v: &mut [u32]) -> Pct {
    if v.is_empty() {
        return Pct::default();
    }
    v.sort_unstable();
    let at = |q: usize| f64::from(v[(v.len() * q / 100).min(v.len() - 1)]) / 1000.0;
    Pct { p50: at(50), p99: at(99), max: f64::from(v[v.len() - 1]) / 1000.0 }
}

/// CPU ticks of (server runtime threads, sequencer thread, client threads,
/// whole process).
fn cpu_ticks() -> [u64; 4] {
    let mut t = [0u64; 4];
    if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
        t[3] = stat_ticks(&stat).1;
    }
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return t;
    };
    for e in dir.flatten() {
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        let (comm, ticks) = stat_ticks(&stat);
        let slot = if comm.starts_with("ferry-srv") {
            0
        } else if comm.starts_with("ferry-seq") {
            1
        } else if comm.starts_with("bench-cli") {
            2
        } else {
            continue;
        };
        t[slot] += ticks;
    }
    t
}

/// The command name and user + system CPU ticks of a /proc `stat` line.
fn stat_ticks(stat: &str) -> (&str, u64) {
    let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
        return ("", 0);
    };
    // Fields after the command: state is field 3, utime 14, stime 15.
    let f: Vec<&str> = stat[close + 1..].split_whitespace().collect();
    let get = |i: usize| f.get(i).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
    (&stat[open + 1..close], get(11) + get(12))
}

struct Row {
    sc: Scenario,
    deliveries: u64,
    secs: f64,
    deliveries_per_s: f64,
    publishes_per_s: f64,
    e2e: Pct,
    srv: Pct,
    ack: Pct,
    compressed_pct: f64,
    /// CPU use as a percentage of one core: server runtime, sequencer,
    /// clients, whole process.
    cpu: [f64; 4],
}

/// A server of this process on its own runtime, serving one scenario.
struct Server {
    url: String,
    dir: std::path::PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), String>>,
}

async fn start_server(rt: &tokio::runtime::Handle, name: &str, history: usize) -> Result<Server, String> {
    let dir = std::env::temp_dir().join(format!("ferry-bench-fanout-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    let mut cfg = Config { data_dir: dir.clone(), ..Config::default() };
    // Measure fan-out capacity, not the abuse limits: the default publish
    // rate (100/s per connection, burst 200) refuses pipelined publishing,
    // and every client comes from 127.0.0.1.
    cfg.limits.publish_rate = 0;
    cfg.limits.connections_per_ip_per_minute = 0;
    if history > 0 {
        // Benchmark channels are `bench:...`.
        cfg.namespaces.insert("bench".into(), Namespace { history_size: history, ..Namespace::default() });
    }
    let (addr_tx, addr_rx) = tokio::sync::oneshot::channel();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    // Bound inside the server runtime so its reactor drives the listener.
    let task = rt.spawn(async move {
        let listener = match tokio::net::TcpListener::bind("127.0.0.1:0").await {
            Ok(l) => l,
            Err(e) => {
                let _ = addr_tx.send(Err(format!("bind: {e}")));
                return Ok(());
            }
        };
        let _ = addr_tx.send(listener.local_addr().map_err(|e| e.to_string()));
        ferry_server::run(listener, cfg, async move {
            let _ = stopped.await;
        })
        .await
        .map_err(|e| format!("server: {e:#}"))
    });
    let addr = tokio::time::timeout(CONNECT_TIMEOUT, addr_rx)
        .await
        .map_err(|_| "server did not bind in time".to_string())?
        .map_err(|_| "server task ended before binding".to_string())??;
    Ok(Server { url: format!("ws://{addr}/ws"), dir, stop: Some(stop), task })
}

impl Server {
    async fn stop(mut self) -> Result<(), String> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let r = match tokio::time::timeout(Duration::from_secs(10), &mut self.task).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => Err(format!("server task failed: {e}")),
            Err(_) => {
                self.task.abort();
                Err("server did not shut down within 10 s".into())
            }
        };
        let _ = std::fs::remove_dir_all(&self.dir);
        r
    }
}

/// Join every task of a set, gathering results and errors (bounded by `deadline`).
async fn join_all<T: 'static>(
    set: &mut JoinSet<Result<T, String>>,
    deadline: Deadline,
    what: &str,
    errors: &mut Vec<String>,
) -> Vec<T> {
    let mut out = Vec::new();
    loop {
        match tokio::time::timeout_at(deadline, set.join_next()).await {
            Ok(None) => break,
            Ok(Some(Ok(Ok(v)))) => out.push(v),
            Ok(Some(Ok(Err(e)))) => errors.push(e),
            Ok(Some(Err(e))) if e.is_cancelled() => {}
            Ok(Some(Err(e))) => errors.push(format!("{what} task failed: {e}")),
            Err(_) => {
                errors.push(format!("{} {what} task(s) still running at the deadline; aborted", set.len()));
                set.abort_all();
                break;
            }
        }
    }
    out
}

async fn run_scenario(sc: Scenario, server_rt: &tokio::runtime::Handle) -> Result<Row, Vec<String>> {
    let server = start_server(server_rt, sc.name, sc.history).await.map_err(|e| vec![e])?;
    let mut errors = Vec::new();
    let row = drive(sc, &server.url, &mut errors).await;
    let t_stop = Instant::now();
    if let Err(e) = server.stop().await {
        errors.push(e);
    }
    println!("  server shut down in {:.2} s", t_stop.elapsed().as_secs_f64());
    match row {
        Some(row) if errors.is_empty() => Ok(row),
        _ => Err(errors),
    }
}

async fn drive(sc: Scenario, url: &str, errors: &mut Vec<String>) -> Option<Row> {
    let window = sc.window;
    let deadline = Deadline::now() + SCENARIO_BUDGET;
    let shared = Arc::new(Shared {
        origin: Instant::now(),
        sent_ns: (0..sc.messages).map(|_| AtomicU64::new(0)).collect(),
        publishers: sc.publishers,
        per_pub: sc.messages / sc.publishers,
        payload: sc.payload,
        channel: format!("bench:fanout-{}", sc.name),
        tag: format!("fanout-{}-{}", sc.name, std::process::id()),
        top: AtomicU64::new(0),
        sent: AtomicU64::new(0),
    });

    // Connect every subscriber (a bounded number at a time).
    let t_connect = Instant::now();
    let gate = Arc::new(tokio::sync::Semaphore::new(CONNECT_PARALLEL));
    let mut set = JoinSet::new();
    for i in 0..sc.subscribers {
        let (url, gate, channel) = (url.to_string(), gate.clone(), shared.channel.clone());
        set.spawn(async move {
            let _permit = gate.acquire_owned().await.map_err(|e| e.to_string())?;
            let who = format!("subscriber {i}");
            let mut ws = open_ws(&url).await.map_err(|e| format!("{who}: {e}"))?;
            let s = handshake(&mut ws, &format!("bench-sub-{i}"), Some(&channel), &who).await?;
            Ok((i, ws, s))
        });
    }
    let mut subs = join_all(&mut set, deadline, "subscriber connect", errors).await;
    let mut pubs = Vec::new();
    for k in 0..sc.publishers {
        let who = format!("publisher {k}");
        let r = async {
            let mut ws = open_ws(url).await.map_err(|e| format!("{who}: {e}"))?;
            let s = handshake(&mut ws, &format!("bench-pub-{k}"), None, &who).await?;
            Ok::<_, String>((k, ws, s))
        };
        match r.await {
            Ok(p) => pubs.push(p),
            Err(e) => errors.push(e),
        }
    }
    if !errors.is_empty() {
        return None;
    }
    let connect_secs = t_connect.elapsed().as_secs_f64();
    let epoch = subs[0].2.epoch.clone();
    let compress_min = subs[0].2.compress_min;
    subs.sort_by_key(|s| s.0);

    // Go: subscribers read, publishers publish.
    let cpu0 = cpu_ticks();
    let start = shared.stamp();
    let mut sub_set = JoinSet::new();
    for (i, ws, s) in subs {
        sub_set.spawn(subscriber(i, ws, s, shared.clone(), deadline));
    }
    let mut pub_set = JoinSet::new();
    for (k, ws, s) in pubs {
        pub_set.spawn(publisher(k, ws, s, shared.clone(), window, sc.rate, deadline));
    }
    let backstop = deadline + Duration::from_secs(5);
    let pub_reports = join_all(&mut pub_set, backstop, "publisher", errors).await;
    if pub_reports.len() < sc.publishers {
        // Not everything was published: the subscribers cannot finish.
        errors.push(format!("{} subscriber(s) stopped because a publisher failed", sub_set.len()));
        sub_set.abort_all();
    }
    let sub_reports = join_all(&mut sub_set, backstop, "subscriber", errors).await;
    let cpu1 = cpu_ticks();
    let end = shared.stamp();

    // Close everything; a publication arriving now would be one too many.
    let mut close_set = JoinSet::new();
    let mut subs_out = Vec::new();
    for (r, ws) in sub_reports {
        close_set.spawn(close_checked(format!("subscriber {}", r.id), ws, 1 << 20));
        subs_out.push(r);
    }
    let mut pubs_out = Vec::new();
    for (r, ws) in pub_reports {
        close_set.spawn(close_checked(format!("publisher {}", r.id), ws, 1 << 20));
        pubs_out.push(r);
    }
    join_all(&mut close_set, Deadline::now() + Duration::from_secs(10), "close", errors).await;
    if !errors.is_empty() {
        return None;
    }
    for p in &pubs_out {
        if p.epoch != epoch {
            errors.push(format!("publishes stored in epoch {} but subscribers see epoch {epoch}", p.epoch));
            return None;
        }
    }

    let secs_between = |a: u64, b: u64| b.saturating_sub(a) as f64 / 1e9;
    let deliver_end = subs_out.iter().map(|r| r.done_at).max().unwrap_or(end);
    let publish_end = pubs_out.iter().map(|r| r.done_at).max().unwrap_or(end);
    let deliveries: u64 = subs_out.iter().map(|r| r.e2e_us.len() as u64).sum();
    let compressed: u64 = subs_out.iter().map(|r| r.compressed).sum();
    let messages_in: u64 = subs_out.iter().map(|r| r.messages).sum();
    let bytes_in: u64 = subs_out.iter().map(|r| r.bytes).sum();
    let mut e2e: Vec<u32> = subs_out.iter().flat_map(|r| r.e2e_us.iter().copied()).collect();
    let mut srv: Vec<u32> = subs_out.iter().flat_map(|r| r.srv_us.iter().copied()).collect();
    let mut ack: Vec<u32> = pubs_out.iter().flat_map(|r| r.ack_us.iter().copied()).collect();
    let secs = secs_between(start, deliver_end);
    let wall = secs_between(start, end).max(1e-9);
    let cpu = [0, 1, 2, 3].map(|i| (cpu1[i].saturating_sub(cpu0[i])) as f64 / CLOCK_TICKS_PER_SEC / wall * 100.0);
    println!(
        "  connect {:.2} s; delivered in {:.2} s; last publish acked at {:.2} s; \
         {:.1} publications per subscriber read ({} reads, {:.1} MB in); compressed {}/{} \
         (compress_min {:?})",
        connect_secs,
        secs,
        secs_between(start, publish_end),
        deliveries as f64 / messages_in.max(1) as f64,
        messages_in,
        bytes_in as f64 / 1e6,
        compressed,
        deliveries,
        compress_min,
    );
    Some(Row {
        sc,
        deliveries,
        secs,
        deliveries_per_s: deliveries as f64 / secs.max(1e-9),
        publishes_per_s: sc.messages as f64 / secs_between(start, publish_end).max(1e-9),
        e2e: percentiles(&mut e2e),
        srv: percentiles(&mut srv),
        ack: percentiles(&mut ack),
        compressed_pct: compressed as f64 * 100.0 / deliveries.max(1) as f64,
        cpu,
    })
}

/// Errors grouped by their text with every number replaced by `#`, most frequent first.
fn error_kinds(errors: &[String]) -> Vec<(String, usize)> {
    let mut kinds: std::collections::BTreeMap<String, usize> = Default::default();
    for e in errors {
        let mut k = String::with_capacity(e.len());
        for c in e.chars() {
            if c.is_ascii_digit() {
                if !k.ends_with('#') {
                    k.push('#');
                }
            } else {
                k.push(c);
            }
        }
        *kinds.entry(k).or_default() += 1;
    }
    let mut v: Vec<_> = kinds.into_iter().collect();
    v.sort_by_key(|k| std::cmp::Reverse(k.1));
    v
}

fn machine() -> String {
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    format!("nproc {cpus}, {model}")
}

/// The 1, 5 and 15 minute load averages.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

/// Soft limit on open files, from /proc.
fn open_file_limit() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..].split_whitespace().next()?.parse().ok()
}

fn print_table(rows: &[Row]) {
    println!();
    println!(
        "{:<10} {:>4} {:>3} {:>4} {:>5} {:>5} {:>5} {:>7} {:>5} {:>7} {:>6} | {:>21} | {:>21} | {:>13} | {:>3} | {:>19}",
        "scenario",
        "S",
        "pub",
        "win",
        "rate",
        "M",
        "P",
        "deliv",
        "secs",
        "deliv/s",
        "pub/s",
        "e2e ms p50/p99/max",
        "time_ms p50/p99/max",
        "pub-ack p50/p99",
        "z%",
        "cpu% srv/seq/cli/all"
    );
    for r in rows {
        let rate = if r.sc.rate == 0 { "-".to_string() } else { r.sc.rate.to_string() };
        println!(
            "{:<10} {:>4} {:>3} {:>4} {:>5} {:>5} {:>5} {:>7} {:>5.2} {:>7.0} {:>6.0} | {:>6.1} {:>6.1} {:>7.1} | {:>6.1} {:>6.1} {:>7.1} | {:>6.1} {:>6.1} | {:>3.0} | {:>4.0} {:>4.0} {:>4.0} {:>4.0}",
            r.sc.name,
            r.sc.subscribers,
            r.sc.publishers,
            r.sc.window,
            rate,
            r.sc.messages,
            r.sc.payload,
            r.deliveries,
            r.secs,
            r.deliveries_per_s,
            r.publishes_per_s,
            r.e2e.p50,
            r.e2e.p99,
            r.e2e.max,
            r.srv.p50,
            r.srv.p99,
            r.srv.max,
            r.ack.p50,
            r.ack.p99,
            r.compressed_pct,
            r.cpu[0],
            r.cpu[1],
            r.cpu[2],
            r.cpu[3],
        );
    }
}

fn main() {
    std::thread::spawn(|| {
        std::thread::sleep(WATCHDOG);
        eprintln!("ERROR: watchdog: the benchmark ran longer than {WATCHDOG:?}; exiting");
        std::process::exit(3);
    });
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .try_init();

    let window = std::env::var("FERRY_BENCH_WINDOW").ok().and_then(|v| v.parse::<usize>().ok()).filter(|&w| w > 0);
    let only: Option<Vec<String>> =
        std::env::var("FERRY_BENCH_ONLY").ok().map(|v| v.split(',').map(|s| s.trim().to_string()).collect());
    let scenarios: Vec<Scenario> = match &only {
        None => SCENARIOS.to_vec(),
        Some(names) => {
            SCENARIOS.iter().chain(EXTRA_SCENARIOS).filter(|s| names.iter().any(|n| n == s.name)).copied().collect()
        }
    }
    .into_iter()
    .map(|s| Scenario { window: window.unwrap_or(s.window), ..s })
    .collect();
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);

    println!("Ferry fan-out benchmark");
    println!("machine: {}", machine());
    let need = scenarios.iter().map(|s| 2 * (s.subscribers + s.publishers) as u64 + 64).max().unwrap_or(0);
    match open_file_limit() {
        Some(l) if l < need => {
            println!("ERROR: open-file limit {l} is below the {need} this run needs; raise it (ulimit -n)");
            std::process::exit(1);
        }
        Some(l) => println!("open-file limit: {l} (need about {need})"),
        None => println!("open-file limit: unknown (need about {need})"),
    }
    println!(
        "setup: in-process server on 127.0.0.1 (own tokio runtime, {cpus} workers) and clients \
         (own runtime, {cpus} workers) share the machine; binary ferry.v1, QoS 1 publish and \
         subscribe, anonymous, compression offered; publishes pipelined (window per publisher \
         below), up to {PUBLISH_MSG_FRAMES} frames / {} KiB per publisher message; one ack per \
         subscriber read; server limits.publish_rate and limits.connections_per_ip_per_minute \
         set to 0 (off)",
        PUBLISH_MSG_BYTES / 1024
    );

    let build = |name: &str| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(cpus)
            .thread_name(name)
            .enable_all()
            .build()
            .expect("tokio runtime")
    };
    let server_rt = build("ferry-srv");
    let client_rt = build("bench-cli");
    let mut rows = Vec::new();
    let mut failed = false;
    for sc in scenarios {
        assert!(sc.payload >= HEADER && sc.messages % sc.publishers == 0, "bad scenario {sc:?}");
        let pace = match sc.rate {
            0 => "unpaced".to_string(),
            r => format!("paced at {r}/s"),
        };
        println!(
            "\n[{}] S={} subscribers, {} publisher(s) with {} in flight each ({pace}), M={} messages of P={} bytes, \
             history_size {}; load average before: {}",
            sc.name,
            sc.subscribers,
            sc.publishers,
            sc.window,
            sc.messages,
            sc.payload,
            if sc.history == 0 { "default (1000)".to_string() } else { sc.history.to_string() },
            load_average()
        );
        match client_rt.block_on(run_scenario(sc, server_rt.handle())) {
            Ok(row) => rows.push(row),
            Err(errors) => {
                failed = true;
                for e in errors.iter().take(10) {
                    println!("ERROR: [{}] {e}", sc.name);
                }
                if errors.len() > 10 {
                    println!("ERROR: [{}] {} errors in all; by kind (numbers as #):", sc.name, errors.len());
                    for (kind, n) in error_kinds(&errors) {
                        println!("ERROR: [{}]   {n:>4} x {kind}", sc.name);
                    }
                }
            }
        }
    }
    client_rt.shutdown_timeout(Duration::from_secs(5));
    server_rt.shutdown_timeout(Duration::from_secs(5));

    print_table(&rows);
    println!("load average after: {}", load_average());
    println!(
        "\ne2e: publisher send instant to subscriber receive (from a sequence number in the \
         payload). time_ms: subscriber wall clock minus the publication's server time_ms \
         (ms resolution, stamped before the durable commit). pub-ack: publish sent to \
         `published` received. secs, deliv/s, pub/s: from the first publish to the last \
         delivery / last `published`. cpu%: of one core (100% = one of the machine's cores), \
         over the delivery phase; all = whole process."
    );
    if failed {
        println!("FAILED: see the ERROR lines above");
        std::process::exit(1);
    }
}
