//! Wire helpers shared by the benchmarks (`mod support;` in each): raw
//! WebSocket clients speaking the binary subprotocol, percentiles, /proc
//! CPU times, machine facts. Not every benchmark uses every item.
#![allow(dead_code)]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ferry_core::codec::{self, Encoding};
use ferry_core::frame::{
    ClientFrame, ClientVersion, Command, Connect, Outcome, Push, Qos, ReplyBody, ServerFrame, SubscribeRequest,
    SubscribeResult, PROTOCOL_VERSION, SUBPROTOCOL_BINARY,
};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::Instant as Deadline;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// The wire encoding every client speaks.
pub const ENC: Encoding = Encoding::Binary;

/// Budget for one WebSocket + `connect` handshake.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Publisher index (u32) and sequence number (u64) open every payload.
pub const HEADER: usize = 12;
/// Compressible filler after the header.
pub const FILLER: &[u8] = b"Ferry fan-out benchmark payload; the quick brown fox jumps over the lazy dog. ";

/// Linux USER_HZ, the unit of per-thread CPU times in /proc.
pub const CLOCK_TICKS_PER_SEC: f64 = 100.0;

pub fn wall_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

pub fn micros(ns: u64) -> u32 {
    u32::try_from(ns / 1000).unwrap_or(u32::MAX)
}

pub fn filler_byte(seq: usize, i: usize) -> u8 {
    FILLER[(i + seq) % FILLER.len()]
}

pub fn make_payload(publisher: usize, seq: usize, len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(len);
    v.extend_from_slice(&(publisher as u32).to_le_bytes());
    v.extend_from_slice(&(seq as u64).to_le_bytes());
    for i in HEADER..len {
        v.push(filler_byte(seq, i));
    }
    v
}

/// The publisher and sequence number of an intact payload.
pub fn parse_payload(d: &[u8], len: usize) -> Option<(usize, usize)> {
    if d.len() != len {
        return None;
    }
    let publisher = u32::from_le_bytes(d[0..4].try_into().ok()?) as usize;
    let seq = usize::try_from(u64::from_le_bytes(d[4..HEADER].try_into().ok()?)).ok()?;
    d[HEADER..].iter().enumerate().all(|(j, &b)| b == filler_byte(seq, HEADER + j)).then_some((publisher, seq))
}

/// Open a WebSocket with the binary subprotocol and Nagle off.
pub async fn open_ws(url: &str) -> Result<Ws, String> {
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

pub async fn send(ws: &mut Ws, data: Vec<u8>, deadline: Deadline, who: &str) -> Result<(), String> {
    match tokio::time::timeout_at(deadline, ws.send(Message::Binary(data.into()))).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("{who}: write failed: {e}")),
        Err(_) => Err(format!("{who}: write timed out")),
    }
}

/// Read the next Ferry message; returns its frames and size in bytes.
pub async fn recv_frames(
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
pub struct Session {
    pub epoch: String,
    pub from: u64,
    /// Largest server message to accept (twice the announced limit).
    pub max_in: usize,
    /// Inflate limit (the announced limit).
    pub inflate_limit: usize,
    pub compress_min: Option<u32>,
}

/// A QoS 1 subscription without a recovery position. Built through serde so
/// that optional fields (`since`, and any added later with a default, such
/// as a subscription token) take their defaults.
pub fn subscribe_request(channel: &str) -> Result<SubscribeRequest, String> {
    serde_json::from_value(serde_json::json!({ "channel": channel, "qos": Qos::AtLeastOnce.as_u8() }))
        .map_err(|e| format!("cannot build a subscribe request: {e}"))
}

/// Send `connect` (optionally subscribing to `channel`) and wait for `connected`.
pub async fn handshake(ws: &mut Ws, device: &str, channel: Option<&str>, who: &str) -> Result<Session, String> {
    handshake_at(ws, device, channel, 0, who).await
}

/// [`handshake`] on a channel whose stream already holds `top` publications
/// (the subscription must start right after them).
pub async fn handshake_at(
    ws: &mut Ws,
    device: &str,
    channel: Option<&str>,
    top: u64,
    who: &str,
) -> Result<Session, String> {
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
            client: ClientVersion {
                name: concat!("ferry-", env!("CARGO_CRATE_NAME"), "-bench").into(),
                version: env!("CARGO_PKG_VERSION").into(),
            },
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
                if s.qos != Qos::AtLeastOnce || s.top != top || s.from != top + 1 || !s.recovered {
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

/// After a failed write: what the server said before it closed, if anything.
pub async fn why_closed(ws: &mut Ws) -> String {
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
pub async fn close_checked(who: String, mut ws: Ws, limit: usize) -> Result<(), String> {
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
pub struct Pct {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

pub fn percentiles(v: &mut [u32]) -> Pct {
    if v.is_empty() {
        return Pct::default();
    }
    v.sort_unstable();
    let at = |q: usize| f64::from(v[(v.len() * q / 100).min(v.len() - 1)]) / 1000.0;
    Pct { p50: at(50), p99: at(99), max: f64::from(v[v.len() - 1]) / 1000.0 }
}

/// The command name and user + system CPU ticks of a /proc `stat` line.
pub fn stat_ticks(stat: &str) -> (&str, u64) {
    let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
        return ("", 0);
    };
    // Fields after the command: state is field 3, utime 14, stime 15.
    let f: Vec<&str> = stat[close + 1..].split_whitespace().collect();
    let get = |i: usize| f.get(i).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
    (&stat[open + 1..close], get(11) + get(12))
}

/// Join every task of a set, gathering results and errors (bounded by `deadline`).
pub async fn join_all<T: 'static>(
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

/// Errors grouped by their text with every number replaced by `#`, most frequent first.
pub fn error_kinds(errors: &[String]) -> Vec<(String, usize)> {
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

pub fn machine() -> String {
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
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

/// Soft limit on open files, from /proc.
pub fn open_file_limit() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..].split_whitespace().next()?.parse().ok()
}
