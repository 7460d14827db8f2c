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

mod support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_core::codec;
use ferry_core::compress;
use ferry_core::frame::{AckItem, Bytes, ClientFrame, Command, Outcome, Payload, Push, Qos, ReplyBody, ServerFrame};
use ferry_server::config::{Config, Namespace};
use tokio::task::JoinSet;
use tokio::time::Instant as Deadline;

use support::*;

/// Wall-clock budget of one scenario, from the first connect to the last delivery.
const SCENARIO_BUDGET: Duration = Duration::from_secs(45);
/// The whole process exits by itself after this long, whatever happens.
const WATCHDOG: Duration = Duration::from_secs(280);
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
