//! The generator's connections: subscribers (one task each, reading and
//! recording) and publishers (one task each, pacing steps on command).

use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use ferry_core::codec::{Encoding, DEFAULT_MAX_MESSAGE_SIZE};
use ferry_core::frame::{Outcome, Push, Qos, ReplyBody, ServerFrame, SubscribeResult};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::stats::{make_payload, Stats};
use crate::{ferry, nats};

pub(crate) type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Budget for opening one connection and subscribing.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);
/// A QoS 1 subscriber acks after this many deliveries...
const ACK_EVERY: u64 = 32;
/// ...or this long after the first unacked one (PROTOCOL.md 7.2 asks for
/// well under 500 ms; the server's in-flight window is 256).
const ACK_DELAY: Duration = Duration::from_millis(20);
/// Publications per WebSocket message from a publisher (both protocols
/// allow many; Ferry caps a message at 64 KiB).
const PUBLISH_BATCH: usize = 200;
/// Payload size of every publication.
pub const PAYLOAD: usize = 100;

/// What the generator speaks to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// Ferry with this subprotocol encoding, subscribing at this QoS.
    Ferry(Encoding, Qos),
    /// NATS over WebSocket (core NATS: at most once).
    Nats,
}

impl Target {
    /// The subject or channel name of channel `c`.
    pub fn channel(self, c: usize) -> String {
        match self {
            Target::Ferry(..) => format!("bench:c{c}"),
            Target::Nats => format!("bench.c{c}"),
        }
    }
}

/// Small buffers: 10,000 connections in one generator process.
fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default().read_buffer_size(8 * 1024).write_buffer_size(0).max_message_size(Some(1 << 22))
}

pub(crate) async fn open(url: &str, subprotocol: Option<&'static str>) -> Result<Ws, String> {
    let mut req = url.into_client_request().map_err(|e| format!("bad url: {e}"))?;
    if let Some(p) = subprotocol {
        req.headers_mut().insert("Sec-WebSocket-Protocol", HeaderValue::from_static(p));
    }
    let (ws, _) = tokio_tungstenite::connect_async_with_config(req, Some(ws_config()), true)
        .await
        .map_err(|e| format!("websocket handshake failed: {e}"))?;
    Ok(ws)
}

pub(crate) fn closed_reason(m: &Message) -> Option<String> {
    match m {
        Message::Close(Some(f)) => Some(format!("closed by the server: {} {}", u16::from(f.code), f.reason.as_str())),
        Message::Close(None) => Some("closed by the server".into()),
        _ => None,
    }
}

/// Connect subscriber `sub` to channel `c` and record until the
/// connection ends. `ramp` marks connections of the measured ramp, whose
/// connect time goes into the connect histogram.
pub async fn subscriber(target: Target, url: String, sub: usize, c: usize, stats: Rc<RefCell<Stats>>, ramp: bool) {
    let t0 = Instant::now();
    let result = match target {
        Target::Ferry(enc, qos) => ferry_subscriber(enc, qos, &url, sub, c, &stats, t0, ramp).await,
        Target::Nats => nats_subscriber(&url, sub, c, &stats, t0, ramp).await,
    };
    let mut s = stats.borrow_mut();
    match result {
        Err(Phase::Connect(e)) => {
            s.connect_failures += 1;
            *s.reasons.entry(format!("connect: {e}")).or_default() += 1;
        }
        Err(Phase::Live(e)) => s.lost(sub, e),
        Ok(()) => s.lost(sub, "connection ended".into()),
    }
}

enum Phase {
    Connect(String),
    Live(String),
}

fn connected(stats: &Rc<RefCell<Stats>>, sub: usize, t0: Instant, ramp: bool) {
    let mut s = stats.borrow_mut();
    s.alive[sub] = true;
    if ramp {
        let us = u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX);
        let _ = s.connect.record(us.max(1));
    }
}

#[allow(clippy::too_many_arguments)]
async fn ferry_subscriber(
    enc: Encoding,
    qos: Qos,
    url: &str,
    sub: usize,
    c: usize,
    stats: &Rc<RefCell<Stats>>,
    t0: Instant,
    ramp: bool,
) -> Result<(), Phase> {
    let channel = Target::Ferry(enc, qos).channel(c);
    let limit = 2 * DEFAULT_MAX_MESSAGE_SIZE;
    let handshake = async {
        let mut ws = open(url, Some(enc.subprotocol())).await?;
        let mut msg = Vec::new();
        ferry::append(enc, &ferry::connect(&format!("wsload-{sub}"), &[(&channel, qos)]), &mut msg);
        ws.send(frame_message(enc, msg)).await.map_err(|e| format!("write failed: {e}"))?;
        loop {
            let m = ws.next().await.ok_or("ended before connected")?.map_err(|e| format!("read failed: {e}"))?;
            if let Some(r) = closed_reason(&m) {
                return Err(r);
            }
            let Some(data) = payload_of(&m) else { continue };
            let inb = ferry::read(enc, data, limit)?;
            for f in inb.other {
                match f {
                    ServerFrame::Reply { id: 1, outcome: Outcome::Ok(ReplyBody::Connected(cn)) } => {
                        return match cn.subs.into_iter().next() {
                            Some(SubscribeResult::Ok(s)) => Ok((ws, s.epoch, s.from)),
                            other => Err(format!("subscription refused: {other:?}")),
                        };
                    }
                    ServerFrame::Reply { outcome: Outcome::Error(e), .. } => {
                        return Err(format!("connect refused: {} {}", e.code, e.message))
                    }
                    _ => {}
                }
            }
        }
    };
    let (mut ws, epoch, from) = tokio::time::timeout(CONNECT_TIMEOUT, handshake)
        .await
        .map_err(|_| Phase::Connect("timed out".into()))?
        .map_err(Phase::Connect)?;
    connected(stats, sub, t0, ramp);
    let ch = c as u32;
    // QoS 1: the highest offset delivered with no gap, and the last acked.
    let (mut contig, mut acked) = (from.saturating_sub(1), from.saturating_sub(1));
    let mut since_unacked: Option<Instant> = None;
    loop {
        let next = if let Some(first) = since_unacked {
            tokio::select! {
                m = ws.next() => m,
                // Time to ack what is pending: an empty stand-in message
                // goes through the same path below.
                () = tokio::time::sleep_until((first + ACK_DELAY).into()) => Some(Ok(Message::Pong(Default::default()))),
            }
        } else {
            ws.next().await
        };
        let m = match next {
            None => return Err(Phase::Live("connection ended without a close".into())),
            Some(Err(e)) => return Err(Phase::Live(format!("read failed: {e}"))),
            Some(Ok(m)) => m,
        };
        if let Some(r) = closed_reason(&m) {
            return Err(Phase::Live(r));
        }
        let mut reply = Vec::new();
        if let Some(data) = payload_of(&m) {
            let inb = ferry::read(enc, data, limit).map_err(Phase::Live)?;
            let now = stats.borrow().now_ns();
            let mut s = stats.borrow_mut();
            let mut on = |p: ferry::PubView<'_>| {
                s.deliver(sub, ch, p.data, now);
                if p.offset == contig + 1 {
                    contig = p.offset;
                }
            };
            inb.pubs.into_iter().for_each(&mut on);
            ferry::owned_publications(&inb.other).for_each(&mut on);
            drop(s);
            for f in &inb.other {
                match f {
                    ServerFrame::Push(Push::Ping) => ferry::append(enc, &ferry::pong(), &mut reply),
                    ServerFrame::Push(Push::Disconnect { code, reason, .. }) => {
                        return Err(Phase::Live(format!("disconnect push {code} {reason}")))
                    }
                    _ => {}
                }
            }
        }
        if qos != Qos::AtMostOnce && contig > acked {
            let due = since_unacked.get_or_insert_with(Instant::now);
            if contig - acked >= ACK_EVERY || due.elapsed() >= ACK_DELAY {
                ferry::append(enc, &ferry::ack(&channel, &epoch, contig), &mut reply);
                acked = contig;
                since_unacked = None;
            }
        }
        if !reply.is_empty() {
            ws.send(frame_message(enc, reply)).await.map_err(|e| Phase::Live(format!("write failed: {e}")))?;
        }
    }
}

async fn nats_subscriber(
    url: &str,
    sub: usize,
    c: usize,
    stats: &Rc<RefCell<Stats>>,
    t0: Instant,
    ramp: bool,
) -> Result<(), Phase> {
    let mut parser = nats::Parser::default();
    let handshake = async {
        let mut ws = open(url, None).await?;
        let mut hello = nats::CONNECT.to_vec();
        nats::sub(&Target::Nats.channel(c), 1, &mut hello);
        hello.extend_from_slice(nats::PING);
        ws.send(Message::Binary(hello.into())).await.map_err(|e| format!("write failed: {e}"))?;
        // The PONG to our PING says CONNECT and SUB were processed.
        loop {
            let m = ws.next().await.ok_or("ended before PONG")?.map_err(|e| format!("read failed: {e}"))?;
            if let Some(r) = closed_reason(&m) {
                return Err(r);
            }
            let Some(data) = payload_of(&m) else { continue };
            let (mut pong, mut err) = (false, None);
            parser.feed(data, |e| match e {
                nats::Event::Pong => pong = true,
                nats::Event::Err(e) => err = Some(e),
                _ => {}
            })?;
            if let Some(e) = err {
                return Err(e);
            }
            if pong {
                return Ok(ws);
            }
        }
    };
    let mut ws = tokio::time::timeout(CONNECT_TIMEOUT, handshake)
        .await
        .map_err(|_| Phase::Connect("timed out".into()))?
        .map_err(Phase::Connect)?;
    connected(stats, sub, t0, ramp);
    let ch = c as u32;
    loop {
        let m = match ws.next().await {
            None => return Err(Phase::Live("connection ended without a close".into())),
            Some(Err(e)) => return Err(Phase::Live(format!("read failed: {e}"))),
            Some(Ok(m)) => m,
        };
        if let Some(r) = closed_reason(&m) {
            return Err(Phase::Live(r));
        }
        let Some(data) = payload_of(&m) else { continue };
        let (mut pings, mut err) = (0, None);
        {
            let now = stats.borrow().now_ns();
            let mut s = stats.borrow_mut();
            parser
                .feed(data, |e| match e {
                    nats::Event::Msg { payload, .. } => s.deliver(sub, ch, payload, now),
                    nats::Event::Ping => pings += 1,
                    nats::Event::Err(e) => err = Some(e),
                    _ => {}
                })
                .map_err(Phase::Live)?;
        }
        if let Some(e) = err {
            return Err(Phase::Live(e));
        }
        if pings > 0 {
            ws.send(Message::Binary(nats::PONG.repeat(pings).into()))
                .await
                .map_err(|e| Phase::Live(format!("write failed: {e}")))?;
        }
    }
}

pub(crate) fn payload_of(m: &Message) -> Option<&[u8]> {
    match m {
        Message::Binary(b) => Some(b),
        Message::Text(t) => Some(t.as_bytes()),
        _ => None,
    }
}

pub(crate) fn frame_message(enc: Encoding, data: Vec<u8>) -> Message {
    if enc.is_text() {
        // The codec wrote JSON, which is UTF-8.
        Message::Text(String::from_utf8(data).unwrap_or_default().into())
    } else {
        Message::Binary(data.into())
    }
}

/// How long a publisher waits after a step for the replies to its publishes.
const REPLY_WAIT: Duration = Duration::from_secs(10);

/// One paced step for a publisher.
pub struct StepOrder {
    /// Step number carried in every payload.
    pub step: u32,
    /// Messages per second from this publisher.
    pub rate: f64,
    /// How long.
    pub duration: Duration,
    /// Where to answer.
    pub done: oneshot::Sender<StepDone>,
}

/// What a publisher did in one step.
#[derive(Default, Debug)]
pub struct StepDone {
    /// Messages sent per channel index.
    pub per_channel: Vec<(usize, u64)>,
    /// Messages sent in all.
    pub sent: u64,
    /// Seconds it took.
    pub secs: f64,
    /// Publishes the server refused (Ferry error replies).
    pub errors: u64,
    /// Replies of either kind (Ferry answers every publish).
    pub replies: u64,
    /// The first refusal or failure, if any.
    pub error: Option<String>,
}

/// A connected publisher task; send it [`StepOrder`]s.
pub struct Publisher {
    /// Orders go here.
    pub orders: mpsc::UnboundedSender<StepOrder>,
}

impl Publisher {
    /// Connect publisher `k`, owning `channels`, and start its task.
    pub async fn start(
        target: Target,
        url: &str,
        k: usize,
        channels: Vec<usize>,
        stats: Rc<RefCell<Stats>>,
    ) -> Result<Publisher, String> {
        let enc = match target {
            Target::Ferry(enc, _) => Some(enc),
            Target::Nats => None,
        };
        let mut ws = open(url, enc.map(Encoding::subprotocol)).await?;
        match enc {
            Some(enc) => {
                let mut msg = Vec::new();
                ferry::append(enc, &ferry::connect(&format!("wsload-pub-{k}"), &[]), &mut msg);
                ws.send(frame_message(enc, msg)).await.map_err(|e| e.to_string())?;
                let m = ws.next().await.ok_or("publisher: ended")?.map_err(|e| e.to_string())?;
                let inb = ferry::read(enc, payload_of(&m).unwrap_or_default(), 1 << 20)?;
                if !matches!(inb.other.first(), Some(ServerFrame::Reply { outcome: Outcome::Ok(_), .. })) {
                    return Err(format!("publisher connect refused: {:?}", inb.other));
                }
            }
            None => {
                let mut hello = nats::CONNECT.to_vec();
                hello.extend_from_slice(nats::PING);
                ws.send(Message::Binary(hello.into())).await.map_err(|e| e.to_string())?;
            }
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let names: Vec<String> = channels.iter().map(|&c| target.channel(c)).collect();
        tokio::task::spawn_local(publisher_task(target, ws, k, channels, names, rx, stats));
        Ok(Publisher { orders: tx })
    }
}

/// A unique prefix for message ids: Ferry deduplicates them server-wide.
pub(crate) fn id_prefix(k: usize) -> String {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros());
    format!("w{}-{t:x}-{k}", std::process::id())
}

async fn publisher_task(
    target: Target,
    mut ws: Ws,
    k: usize,
    channels: Vec<usize>,
    names: Vec<String>,
    mut orders: mpsc::UnboundedReceiver<StepOrder>,
    stats: Rc<RefCell<Stats>>,
) {
    let prefix = id_prefix(k);
    // Request id 1 was the connect; the server drops a reused id.
    let mut next_id: u32 = 2;
    let mut msg_no: u64 = 0;
    let mut parser = nats::Parser::default();
    let mut broken: Option<String> = None;
    // Between steps: answer pings and note refusals.
    loop {
        let order = tokio::select! {
            o = orders.recv() => match o { Some(o) => o, None => return },
            m = ws.next(), if broken.is_none() => {
                let mut done = StepDone::default();
                if let Err(e) = handle_inbound(target, &mut ws, m, &mut parser, &mut done).await {
                    broken = Some(e);
                }
                continue;
            }
        };
        let mut done = StepDone { per_channel: channels.iter().map(|&c| (c, 0)).collect(), ..Default::default() };
        if let Some(e) = &broken {
            done.error = Some(e.clone());
            let _ = order.done.send(done);
            continue;
        }
        let start = Instant::now();
        let end = start + order.duration;
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        // At most 20 ms worth per tick, so that a publisher that fell
        // behind shows a lower achieved rate instead of a burst.
        let cap = ((order.rate * 0.02) as u64).max(1);
        let mut rr = 0usize;
        'step: loop {
            tokio::select! {
                _ = tick.tick() => {
                    let now = Instant::now();
                    if now >= end {
                        break 'step;
                    }
                    let due = (order.rate * (now - start).as_secs_f64()) as u64;
                    let mut n = due.saturating_sub(done.sent).min(cap);
                    while n > 0 {
                        let batch = (n as usize).min(PUBLISH_BATCH);
                        let sent_ns = stats.borrow().now_ns();
                        let mut out = Vec::with_capacity(batch * (PAYLOAD + 64));
                        for _ in 0..batch {
                            let i = rr % channels.len();
                            rr += 1;
                            let (c, seq) = &mut done.per_channel[i];
                            let payload = make_payload(order.step, *c as u32, *seq, sent_ns, PAYLOAD);
                            *seq += 1;
                            match target {
                                Target::Ferry(enc, _) => {
                                    msg_no += 1;
                                    let f = ferry::publish(next_id, &names[i], format!("{prefix}-{msg_no}"), Qos::AtMostOnce, payload);
                                    next_id = next_id.checked_add(1).unwrap_or(2);
                                    ferry::append(enc, &f, &mut out);
                                }
                                Target::Nats => nats::publish(&names[i], &payload, &mut out),
                            }
                        }
                        let m = match target {
                            Target::Ferry(enc, _) => frame_message(enc, out),
                            Target::Nats => Message::Binary(out.into()),
                        };
                        if let Err(e) = ws.send(m).await {
                            done.error = Some(format!("publisher write failed: {e}"));
                            broken = done.error.clone();
                            break 'step;
                        }
                        done.sent += batch as u64;
                        n -= batch as u64;
                    }
                }
                m = ws.next() => {
                    if let Err(e) = handle_inbound(target, &mut ws, m, &mut parser, &mut done).await {
                        done.error = Some(e.clone());
                        broken = Some(e);
                        break 'step;
                    }
                }
            }
        }
        done.secs = start.elapsed().as_secs_f64();
        // Every publish of the step answered (bounded): a refusal that came
        // after the step would otherwise count as accepted and then as lost.
        if matches!(target, Target::Ferry(..)) {
            let until = tokio::time::Instant::now() + REPLY_WAIT;
            while done.replies < done.sent && broken.is_none() {
                match tokio::time::timeout_at(until, ws.next()).await {
                    Err(_) => break,
                    Ok(m) => {
                        if let Err(e) = handle_inbound(target, &mut ws, m, &mut parser, &mut done).await {
                            done.error = Some(e.clone());
                            broken = Some(e);
                        }
                    }
                }
            }
        }
        let _ = order.done.send(done);
    }
}

/// A message to a publisher: replies (Ferry), pings (both), errors.
async fn handle_inbound(
    target: Target,
    ws: &mut Ws,
    m: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>,
    parser: &mut nats::Parser,
    done: &mut StepDone,
) -> Result<(), String> {
    let m = match m {
        None => return Err("publisher connection ended".into()),
        Some(Err(e)) => return Err(format!("publisher read failed: {e}")),
        Some(Ok(m)) => m,
    };
    if let Some(r) = closed_reason(&m) {
        return Err(format!("publisher {r}"));
    }
    let Some(data) = payload_of(&m) else { return Ok(()) };
    match target {
        Target::Ferry(enc, _) => {
            let inb = ferry::read(enc, data, 1 << 22)?;
            let mut reply = Vec::new();
            for f in inb.other {
                match f {
                    ServerFrame::Reply { outcome: Outcome::Error(e), .. } => {
                        done.errors += 1;
                        done.replies += 1;
                        done.error.get_or_insert_with(|| format!("publish refused: {} {}", e.code, e.message));
                    }
                    ServerFrame::Reply { .. } => done.replies += 1,
                    ServerFrame::Push(Push::Ping) => ferry::append(enc, &ferry::pong(), &mut reply),
                    ServerFrame::Push(Push::Disconnect { code, reason, .. }) => {
                        return Err(format!("publisher got disconnect {code} {reason}"))
                    }
                    _ => {}
                }
            }
            if !reply.is_empty() {
                ws.send(frame_message(enc, reply)).await.map_err(|e| e.to_string())?;
            }
        }
        Target::Nats => {
            let (mut pings, mut err) = (0, None);
            parser.feed(data, |e| match e {
                nats::Event::Ping => pings += 1,
                nats::Event::Err(e) => err = Some(e),
                _ => {}
            })?;
            if let Some(e) = err {
                done.errors += 1;
                done.error.get_or_insert(e);
            }
            if pings > 0 {
                ws.send(Message::Binary(nats::PONG.repeat(pings).into())).await.map_err(|e| e.to_string())?;
            }
        }
    }
    Ok(())
}
