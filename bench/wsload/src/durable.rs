//! (e) Durable QoS 1 publish throughput: publishers keep a window of
//! QoS 1 publishes in flight, closed loop. Ferry answers a QoS 1 publish
//! only after the commit that stored it (one fsync per batch: group
//! commit), so the figure is stored-and-acknowledged publishes per second.
//! NATS core has no durable publish; this scenario runs against Ferry only.
//!
//! Each publisher owns one channel and ids its messages uniquely, so the
//! offsets it gets back must be exactly 1, 2, 3, ... in order: a gap, a
//! repeat or a duplicate flag is counted and fails the run.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::{Duration, Instant};

use ferry_core::codec::Encoding;
use ferry_core::frame::{Outcome, Push, Qos, ReplyBody, ServerFrame};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::client::{self, PAYLOAD};
use crate::ferry;
use crate::server::{Bins, Kind, Server};
use crate::stats::{histogram, make_payload};
use crate::sys::CpuMeter;

/// Request ids cycle through this many slots, each remembering its send
/// instant; the window must stay below it.
const RING: usize = 1 << 16;
/// Publishes per WebSocket message at most (about 170 B each).
const MAX_PER_MESSAGE: usize = 256;
/// Budget for the in-flight publishes to be answered after the window.
const DRAIN: Duration = Duration::from_secs(20);

/// The sizes of one (e) measurement.
#[derive(Clone, Debug, Serialize)]
pub struct DurablePlan {
    /// Publisher connections, one channel each.
    pub publishers: usize,
    /// QoS 1 publishes in flight per publisher.
    pub window: usize,
    /// Seconds of warm-up before the measured window.
    pub warm_secs: f64,
    /// Seconds measured.
    pub secs: f64,
}

/// What (e) measured.
#[derive(Clone, Debug, Serialize)]
pub struct Durable {
    /// Server name.
    pub server: String,
    /// The plan.
    pub plan: DurablePlan,
    /// Publishes acknowledged (stored) within the measured window.
    pub acked: u64,
    /// `acked` per second.
    pub acked_per_s: f64,
    /// Durable commits within the window (`ferry_store_commits_total`).
    pub commits: u64,
    /// Publishes per commit.
    pub per_commit: f64,
    /// Publish → acknowledgement, ms.
    pub p50_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
    /// Maximum, ms.
    pub max_ms: f64,
    /// Server CPU over the window, % of one core.
    pub server_cpu: f64,
    /// Generator CPU, % of one core.
    pub gen_cpu: f64,
    /// Every other process, % of one core.
    pub other_cpu: f64,
    /// The generator may have been the bottleneck.
    pub generator_bound: bool,
    /// Publishes refused by the server (error replies).
    pub errors: u64,
    /// Offsets that were not the next one expected, or flagged duplicate.
    pub offset_faults: u64,
    /// Publishes never answered within the drain.
    pub unanswered: u64,
    /// Notes: the first error, faults.
    pub why: Vec<String>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Warm,
    Measure,
    Stop,
}

/// State shared by the publisher tasks (one thread).
struct Shared {
    phase: Cell<Phase>,
    latency: RefCell<Histogram<u64>>,
    acked: Cell<u64>,
    errors: Cell<u64>,
    faults: Cell<u64>,
    unanswered: Cell<u64>,
    why: RefCell<Vec<String>>,
}

impl Shared {
    fn note(&self, why: String) {
        let mut w = self.why.borrow_mut();
        if w.len() < 5 {
            w.push(why);
        }
    }
}

/// Run (e) against a fresh Ferry server on `cpus`.
pub async fn run(bins: &Bins, cpus: &str, enc: Encoding, plan: &DurablePlan) -> anyhow::Result<Durable> {
    anyhow::ensure!(plan.window > 0 && plan.window < RING / 2, "window must be 1..{}", RING / 2);
    let mut server = Server::start(Kind::Ferry, bins, cpus)?;
    let shared = Rc::new(Shared {
        phase: Cell::new(Phase::Warm),
        latency: RefCell::new(histogram()),
        acked: Cell::new(0),
        errors: Cell::new(0),
        faults: Cell::new(0),
        unanswered: Cell::new(0),
        why: RefCell::new(Vec::new()),
    });
    let mut tasks = Vec::new();
    for k in 0..plan.publishers {
        let ws = connect(enc, &server.url, k).await.map_err(|e| anyhow::anyhow!("publisher {k}: {e}"))?;
        tasks.push(tokio::task::spawn_local(publisher(enc, ws, k, plan.window, shared.clone())));
    }
    tokio::time::sleep(Duration::from_secs_f64(plan.warm_secs)).await;
    let commits0 = metric(&server.url, "ferry_store_commits_total").await?;
    let cpu = CpuMeter::start(server.pid());
    let t0 = Instant::now();
    shared.phase.set(Phase::Measure);
    tokio::time::sleep(Duration::from_secs_f64(plan.secs)).await;
    shared.phase.set(Phase::Stop);
    let secs = t0.elapsed().as_secs_f64();
    let (server_cpu, gen_cpu, other_cpu) = cpu.stop();
    let commits = metric(&server.url, "ferry_store_commits_total").await? - commits0;
    for t in tasks {
        let _ = t.await;
    }
    anyhow::ensure!(server.alive(), "the server exited during (e)");
    let acked = shared.acked.get();
    let h = shared.latency.borrow();
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let (errors, faults, unanswered) = (shared.errors.get(), shared.faults.get(), shared.unanswered.get());
    let mut why = shared.why.borrow().clone();
    if errors + faults + unanswered > 0 {
        why.insert(0, format!("{errors} refused, {faults} offset faults, {unanswered} unanswered"));
    }
    Ok(Durable {
        server: Kind::Ferry.name().into(),
        plan: plan.clone(),
        acked,
        acked_per_s: acked as f64 / secs,
        commits,
        per_commit: acked as f64 / commits.max(1) as f64,
        p50_ms: ms(0.5),
        p99_ms: ms(0.99),
        max_ms: h.max() as f64 / 1000.0,
        server_cpu,
        gen_cpu,
        other_cpu,
        generator_bound: gen_cpu >= crate::bench::GENERATOR_BOUND_PCT,
        errors,
        offset_faults: faults,
        unanswered,
        why,
    })
}

async fn connect(enc: Encoding, url: &str, k: usize) -> Result<client::Ws, String> {
    let mut ws = client::open(url, Some(enc.subprotocol())).await?;
    let mut msg = Vec::new();
    ferry::append(enc, &ferry::connect(&format!("wsload-durable-{k}"), &[]), &mut msg);
    ws.send(client::frame_message(enc, msg)).await.map_err(|e| e.to_string())?;
    let m = ws.next().await.ok_or("ended")?.map_err(|e| e.to_string())?;
    let inb = ferry::read(enc, client::payload_of(&m).unwrap_or_default(), 1 << 20)?;
    match inb.other.first() {
        Some(ServerFrame::Reply { outcome: Outcome::Ok(_), .. }) => Ok(ws),
        other => Err(format!("connect refused: {other:?}")),
    }
}

/// One closed-loop publisher: refill the window with one WebSocket message
/// whenever replies came back, until the measured window ends, then wait
/// for the rest (bounded).
async fn publisher(enc: Encoding, mut ws: client::Ws, k: usize, window: usize, sh: Rc<Shared>) {
    let channel = format!("bench:d{k}");
    let prefix = client::id_prefix(k);
    let origin = Instant::now();
    let mut sent_us = vec![0u64; RING];
    // Request id 1 was the connect.
    let mut next_id: u32 = 2;
    let mut msg_no: u64 = 0;
    let mut inflight = 0usize;
    let mut expect_offset = 1u64;
    let mut drain_until: Option<Instant> = None;
    loop {
        if sh.phase.get() == Phase::Stop {
            let end = *drain_until.get_or_insert_with(|| Instant::now() + DRAIN);
            if inflight == 0 || Instant::now() >= end {
                sh.unanswered.set(sh.unanswered.get() + inflight as u64);
                return;
            }
        } else {
            // Messages below the server's 64 KiB limit.
            while inflight < window {
                let mut out = Vec::with_capacity(MAX_PER_MESSAGE * (PAYLOAD + 64));
                for _ in 0..MAX_PER_MESSAGE.min(window - inflight) {
                    msg_no += 1;
                    let f = ferry::publish(
                        next_id,
                        &channel,
                        format!("{prefix}-{msg_no}"),
                        Qos::AtLeastOnce,
                        make_payload(0, k as u32, msg_no, 0, PAYLOAD),
                    );
                    sent_us[next_id as usize % RING] = origin.elapsed().as_micros() as u64;
                    next_id = if next_id == u32::MAX { 2 } else { next_id + 1 };
                    ferry::append(enc, &f, &mut out);
                    inflight += 1;
                }
                if let Err(e) = ws.send(client::frame_message(enc, out)).await {
                    sh.note(format!("publisher {k} write failed: {e}"));
                    sh.unanswered.set(sh.unanswered.get() + inflight as u64);
                    return;
                }
            }
        }
        // Wake at least every 100 ms to notice the end of the window.
        let m = match tokio::time::timeout(Duration::from_millis(100), ws.next()).await {
            Err(_) => continue,
            Ok(Some(Ok(m))) => m,
            Ok(other) => {
                sh.note(format!("publisher {k} connection ended: {other:?}"));
                sh.unanswered.set(sh.unanswered.get() + inflight as u64);
                return;
            }
        };
        let Some(data) = client::payload_of(&m) else { continue };
        let frames = match ferry::read(enc, data, 1 << 22) {
            Ok(inb) => inb.other,
            Err(e) => {
                sh.note(format!("publisher {k}: {e}"));
                continue;
            }
        };
        let now_us = origin.elapsed().as_micros() as u64;
        let mut pong = Vec::new();
        for f in frames {
            match f {
                ServerFrame::Reply { id, outcome } => {
                    inflight = inflight.saturating_sub(1);
                    match outcome {
                        Outcome::Ok(ReplyBody::Published { offset, duplicate, .. }) => {
                            if duplicate || offset != expect_offset {
                                sh.faults.set(sh.faults.get() + 1);
                                sh.note(format!(
                                    "publisher {k}: offset {offset} (duplicate {duplicate}), expected {expect_offset}"
                                ));
                            }
                            expect_offset = offset + 1;
                            if sh.phase.get() == Phase::Measure {
                                sh.acked.set(sh.acked.get() + 1);
                                let us = now_us.saturating_sub(sent_us[id as usize % RING]).max(1);
                                let _ = sh.latency.borrow_mut().record(us);
                            }
                        }
                        Outcome::Ok(other) => sh.note(format!("publisher {k}: unexpected reply {other:?}")),
                        Outcome::Error(e) => {
                            sh.errors.set(sh.errors.get() + 1);
                            sh.note(format!("publish refused: {} {}", e.code, e.message));
                        }
                    }
                }
                ServerFrame::Push(Push::Ping) => ferry::append(enc, &ferry::pong(), &mut pong),
                ServerFrame::Push(Push::Disconnect { code, reason, .. }) => {
                    sh.note(format!("publisher {k} disconnected: {code} {reason}"));
                }
                _ => {}
            }
        }
        if !pong.is_empty() && ws.send(client::frame_message(enc, pong)).await.is_err() {
            sh.unanswered.set(sh.unanswered.get() + inflight as u64);
            return;
        }
    }
}

/// One counter from the server's `/metrics` (same port as `/ws`).
async fn metric(ws_url: &str, name: &str) -> anyhow::Result<u64> {
    let addr = ws_url.trim_start_matches("ws://").split('/').next().unwrap_or_default().to_string();
    let mut s = tokio::net::TcpStream::connect(&addr).await?;
    s.write_all(format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes()).await?;
    let mut body = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut body)).await??;
    body.lines()
        .find_map(|l| {
            // `name{node="..."} 12`
            let r = l.strip_prefix(name)?;
            let r = if r.starts_with('{') { &r[r.find('}')? + 1..] } else { r };
            r.trim().parse::<f64>().ok()
        })
        .map(|v| v as u64)
        .ok_or_else(|| anyhow::anyhow!("{name} not in /metrics"))
}
