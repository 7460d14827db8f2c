//! Cluster benchmark: the embedded engine on one node beside 1, 2 and 3
//! Ferry nodes sharing one `redis-server`, measured in one run on one
//! machine (docs/CLUSTER.md section 8).
//!
//! Every node is an in-process server on its own `127.0.0.1:0` port, all
//! of them on one server tokio runtime (the machine has few cores; one
//! runtime per node would only add threads competing for them). Redis is a
//! private `redis-server` child on a free loopback port, started afresh for
//! each Redis setup and stopped by its pid. Subscribers and publishers are
//! raw WebSocket clients (binary `ferry.v1`, QoS 1) on a client runtime of
//! their own, spread round-robin over the nodes.
//!
//! Per setup it runs three workloads:
//! * `fan1`: one channel, 300 subscribers, three paced publishers. The
//!   publish rate doubles until a step fails (loss above 0.1 %, delivery
//!   p99 above 200 ms, a disconnect or a refused publish), then bisects
//!   between the last passing and the first failing rate; the highest
//!   passing step is reported.
//! * `fan30`: 30 channels with 10 subscribers each, same search.
//! * `ack`: a fixed, moderate 300 publishes/s over 30 channels with one
//!   subscriber each: publish-to-`published` latency of QoS 1.
//!
//! Delivery latency runs from the instant a publish was *due* by the pacing
//! schedule (not when it was sent), so a publisher held back by its window
//! shows up as latency instead of hiding it. Every subscriber checks that
//! it gets every publication of its channel once, in offset order and in
//! each publisher's send order, with the right message id and an intact
//! payload; violations are printed as `ERROR` lines and make the process
//! exit non-zero. CPU time comes from /proc: the server threads, the client
//! threads, the redis-server process, and the whole machine (to show the
//! load of whatever else shares it).
//!
//! Run with `cargo bench -p ferry-server --bench cluster`. Environment:
//! `FERRY_BENCH_SMOKE=1` (tiny sizes, one step per workload, nothing timed
//! asserted), `FERRY_BENCH_SETUPS` (comma-separated subset of `embedded`,
//! `redis1`, `redis2`, `redis3`), `FERRY_BENCH_WORKLOADS` (subset of
//! `fan1`, `fan30`, `ack`), `FERRY_BENCH_RATES` (comma-separated fixed
//! publish rates instead of the search, to reproduce a step),
//! `FERRY_BENCH_REDIS_ARGS` (extra
//! `redis-server` arguments, e.g. `--appendonly yes --appendfsync
//! everysec`), `FERRY_LOG` (server log filter, default `warn`). Needs
//! `redis-server` on PATH.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command as Process, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_core::codec;
use ferry_core::compress;
use ferry_core::frame::{AckItem, Bytes, ClientFrame, Command, Outcome, Payload, Push, Qos, ReplyBody, ServerFrame};
use ferry_server::config::{Config, Namespace};
use futures_util::StreamExt;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant as Deadline;
use tokio_tungstenite::tungstenite::Message;

use support::*;

/// Payload bytes of every publish (below compress_min: no compression).
const PAYLOAD: usize = 100;
/// Publishers per step, spread round-robin over the nodes.
const PUBLISHERS: usize = 3;
/// QoS 1 publishes in flight per publisher (the fan-out benchmark's default).
const WINDOW: usize = 128;
/// A publisher coalesces at most this many due publishes into one message ...
const PUBLISH_MSG_FRAMES: usize = 64;
/// ... and at most this many bytes.
const PUBLISH_MSG_BYTES: usize = 32 * 1024;
/// A step passes with a delivery p99 at most this high ...
const P99_LIMIT_MS: f64 = 200.0;
/// ... and at most this fraction of deliveries missing at its deadline.
const LOSS_LIMIT: f64 = 0.001;
/// Bisection steps after the doubling found a failing rate.
const BISECT_STEPS: usize = 3;
/// Subscriber handshakes in progress at once.
const CONNECT_PARALLEL: usize = 64;
/// `history_size` of the benchmark channels: with the default of 1000 a
/// subscriber left that far behind at saturation is disconnected with 3004
/// (see the fan-out benchmark), which would end the search on retention
/// rather than on latency.
const HISTORY: usize = 100_000;
/// Other processes using more than this (% of one core) during a step
/// make it "disturbed"; see [`run_one`].
const DISTURBED_PCT: f64 = 30.0;
/// Extra attempts of a disturbed step.
const DISTURBED_RETRIES: usize = 2;
/// Budget for a node to answer `/readyz` with 200 (Redis link up).
const READY_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Clone, Copy, Debug)]
enum Engine {
    Embedded,
    Redis { nodes: usize },
}

impl Engine {
    fn name(self) -> String {
        match self {
            Engine::Embedded => "embedded".into(),
            Engine::Redis { nodes } => format!("redis{nodes}"),
        }
    }
    fn nodes(self) -> usize {
        match self {
            Engine::Embedded => 1,
            Engine::Redis { nodes } => nodes,
        }
    }
}

const SETUPS: [Engine; 4] =
    [Engine::Embedded, Engine::Redis { nodes: 1 }, Engine::Redis { nodes: 2 }, Engine::Redis { nodes: 3 }];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// Find the highest passing rate.
    Search,
    /// One step at the start rate.
    Fixed,
}

#[derive(Clone, Copy, Debug)]
struct Workload {
    name: &'static str,
    channels: usize,
    /// Total; subscriber `i` takes channel `i % channels`.
    subscribers: usize,
    /// Publishes per second over all publishers, first step.
    start_rate: u32,
    /// Doubling stops here (the result is then "at least").
    max_rate: u32,
    kind: Kind,
}

/// Sizes and budgets of a run.
struct Plan {
    smoke: bool,
    /// Seconds of paced publishing per step.
    step_secs: f64,
    /// After the last due publish, how long the deliveries may take.
    drain: Duration,
    workloads: Vec<Workload>,
    watchdog: Duration,
}

impl Plan {
    fn full() -> Plan {
        Plan {
            smoke: false,
            step_secs: 2.5,
            drain: Duration::from_secs(5),
            workloads: vec![
                Workload {
                    name: "fan1",
                    channels: 1,
                    subscribers: 300,
                    start_rate: 50,
                    max_rate: 51_200,
                    kind: Kind::Search,
                },
                Workload {
                    name: "fan30",
                    channels: 30,
                    subscribers: 300,
                    start_rate: 250,
                    max_rate: 64_000,
                    kind: Kind::Search,
                },
                Workload {
                    name: "ack",
                    channels: 30,
                    subscribers: 30,
                    start_rate: 300,
                    max_rate: 300,
                    kind: Kind::Fixed,
                },
            ],
            watchdog: Duration::from_secs(15 * 60),
        }
    }

    fn smoke() -> Plan {
        Plan {
            smoke: true,
            step_secs: 1.0,
            drain: Duration::from_secs(10),
            workloads: vec![
                Workload {
                    name: "fan1",
                    channels: 1,
                    subscribers: 20,
                    start_rate: 50,
                    max_rate: 50,
                    kind: Kind::Fixed,
                },
                Workload {
                    name: "fan30",
                    channels: 5,
                    subscribers: 20,
                    start_rate: 100,
                    max_rate: 100,
                    kind: Kind::Fixed,
                },
                Workload { name: "ack", channels: 5, subscribers: 5, start_rate: 50, max_rate: 50, kind: Kind::Fixed },
            ],
            watchdog: Duration::from_secs(4 * 60),
        }
    }
}

// ---------------------------------------------------------------------------
// Child processes: redis-server, killed by the watchdog too.

/// Children to kill if the watchdog fires (std::process::exit runs no
/// destructors, and an orphaned redis-server would outlive the run).
static CHILDREN: Mutex<Vec<Child>> = Mutex::new(Vec::new());

fn kill_children() {
    if let Ok(mut c) = CHILDREN.lock() {
        for child in c.iter_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
        c.clear();
    }
}

/// Extra `redis-server` arguments from `FERRY_BENCH_REDIS_ARGS`
/// (whitespace-separated), e.g. `--appendonly yes --appendfsync everysec`
/// to measure with the persistence docs/CLUSTER.md recommends.
fn redis_extra_args() -> Vec<String> {
    std::env::var("FERRY_BENCH_REDIS_ARGS")
        .map(|v| v.split_whitespace().map(String::from).collect())
        .unwrap_or_default()
}

/// A private `redis-server` on a free loopback port, no persistence
/// unless `FERRY_BENCH_REDIS_ARGS` asks for it.
struct RedisServer {
    pid: u32,
    port: u16,
    dir: std::path::PathBuf,
}

impl RedisServer {
    fn start(tag: &str) -> Result<RedisServer, String> {
        let mut last = String::new();
        // The free port can be taken between probing and binding: retry.
        for attempt in 0..3 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map_err(|e| format!("probe a free port: {e}"))?
                .port();
            let dir = std::env::temp_dir().join(format!("ferry-bench-redis-{}-{tag}-{attempt}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
            let mut child = Process::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
                .arg("--dir")
                .arg(&dir)
                .args(redis_extra_args())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .map_err(|e| format!("cannot start redis-server (is it installed?): {e}"))?;
            let pid = child.id();
            let out = child.stdout.take().ok_or("no redis-server stdout")?;
            let (tx, rx) = std::sync::mpsc::channel();
            // Reads until ready, then keeps draining so redis never blocks on a full pipe.
            std::thread::spawn(move || {
                let mut tx = Some(tx);
                for line in BufReader::new(out).lines() {
                    let Ok(line) = line else { break };
                    if line.contains("Ready to accept connections") {
                        if let Some(tx) = tx.take() {
                            let _ = tx.send(());
                        }
                    } else if line.contains(" # ") && tx.is_none() {
                        // Warnings after start-up (e.g. a client closed for
                        // its output buffer limit) explain odd steps.
                        println!("  redis-server: {line}");
                    }
                }
            });
            CHILDREN.lock().map_err(|_| "child list poisoned")?.push(child);
            let server = RedisServer { pid, port, dir };
            match rx.recv_timeout(Duration::from_secs(10)) {
                Ok(()) => return Ok(server),
                Err(_) => {
                    last = format!("redis-server on port {port} did not become ready");
                    server.stop();
                }
            }
        }
        Err(last)
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    fn stop(self) {
        if let Ok(mut c) = CHILDREN.lock() {
            if let Some(i) = c.iter().position(|ch| ch.id() == self.pid) {
                let mut child = c.swap_remove(i);
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ---------------------------------------------------------------------------
// Nodes: in-process servers.

struct Node {
    addr: std::net::SocketAddr,
    dir: std::path::PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), String>>,
}

impl Node {
    fn url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    async fn start(rt: &tokio::runtime::Handle, name: &str, redis: Option<String>) -> Result<Node, String> {
        let dir = std::env::temp_dir().join(format!("ferry-bench-cluster-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        let mut cfg = Config { data_dir: dir.clone(), ..Config::default() };
        // Capacity, not abuse limits, is measured: pipelined publishing would
        // trip the per-connection publish rate, and every client comes from
        // 127.0.0.1.
        cfg.limits.publish_rate = 0;
        cfg.limits.connections_per_ip_per_minute = 0;
        cfg.namespaces.insert("bench".into(), Namespace { history_size: HISTORY, ..Namespace::default() });
        if let Some(url) = redis {
            cfg.redis.urls = vec![url];
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
        let node = Node { addr, dir, stop: Some(stop), task };
        // Ready = engine up (for Redis: the pub/sub link is established).
        let end = Deadline::now() + READY_TIMEOUT;
        loop {
            if node.task.is_finished() {
                let _ = std::fs::remove_dir_all(&node.dir);
                return Err(format!("node {name} stopped while starting: {:?}", node.task.await));
            }
            if readyz(addr).await {
                return Ok(node);
            }
            if Deadline::now() > end {
                let _ = node.stop().await;
                return Err(format!("node {name} not ready within {READY_TIMEOUT:?}"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

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

/// `GET /readyz` answered 200 (one short-lived HTTP/1.1 request).
async fn readyz(addr: std::net::SocketAddr) -> bool {
    // Blocking std I/O with 1 s timeouts on a blocking thread: this is only
    // the start-up probe, and needs no HTTP client.
    let probe = move || -> Option<bool> {
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
        s.write_all(b"GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").ok()?;
        let mut head = [0u8; 12];
        s.read_exact(&mut head).ok()?;
        Some(head.starts_with(b"HTTP/1.1 200"))
    };
    tokio::task::spawn_blocking(probe).await.ok().flatten().unwrap_or(false)
}

/// One setup's processes.
struct Cluster {
    engine: Engine,
    nodes: Vec<Node>,
    redis: Option<RedisServer>,
    /// Steps run so far: every step gets channels of its own.
    steps: std::sync::atomic::AtomicUsize,
}

impl Cluster {
    async fn start(engine: Engine, rt: &tokio::runtime::Handle) -> Result<Cluster, String> {
        let redis = match engine {
            Engine::Embedded => None,
            Engine::Redis { .. } => Some(RedisServer::start(&engine.name())?),
        };
        let mut cluster = Cluster { engine, nodes: Vec::new(), redis, steps: Default::default() };
        for i in 0..engine.nodes() {
            let url = cluster.redis.as_ref().map(RedisServer::url);
            match Node::start(rt, &format!("{}-n{i}", engine.name()), url).await {
                Ok(n) => cluster.nodes.push(n),
                Err(e) => {
                    let _ = cluster.stop().await;
                    return Err(e);
                }
            }
        }
        Ok(cluster)
    }

    async fn stop(self) -> Vec<String> {
        let mut errors = Vec::new();
        for n in self.nodes {
            if let Err(e) = n.stop().await {
                errors.push(e);
            }
        }
        if let Some(r) = self.redis {
            r.stop();
        }
        errors
    }

    fn redis_pid(&self) -> Option<u32> {
        self.redis.as_ref().map(|r| r.pid)
    }
}

// ---------------------------------------------------------------------------
// CPU accounting from /proc.

#[derive(Clone, Copy, Default)]
struct CpuSnap {
    /// Server runtime threads and the nodes' sequencer threads.
    ferry: u64,
    /// Client runtime threads (the load generator).
    client: u64,
    redis: u64,
    /// Busy ticks of the whole machine.
    machine: u64,
}

fn cpu_snap(redis: Option<u32>) -> CpuSnap {
    let mut s = CpuSnap::default();
    if let Ok(dir) = std::fs::read_dir("/proc/self/task") {
        for e in dir.flatten() {
            let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
                continue;
            };
            let (comm, ticks) = stat_ticks(&stat);
            if comm.starts_with("ferry-srv") || comm.starts_with("ferry-seq") {
                s.ferry += ticks;
            } else if comm.starts_with("bench-cli") {
                s.client += ticks;
            }
        }
    }
    if let Some(pid) = redis {
        // /proc/<pid>/stat counts every thread of the process.
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            s.redis = stat_ticks(&stat).1;
        }
    }
    if let Ok(stat) = std::fs::read_to_string("/proc/stat") {
        if let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) {
            let v: Vec<u64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
            // user nice system idle iowait irq softirq steal: busy = all but idle and iowait.
            let total: u64 = v.iter().take(8).sum();
            s.machine = total.saturating_sub(v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0));
        }
    }
    s
}

/// CPU use over a step, each as % of one core.
#[derive(Clone, Copy, Default)]
struct Cpu {
    ferry: f64,
    redis: f64,
    client: f64,
    /// Machine busy time not accounted to the three above (other processes).
    other: f64,
}

fn cpu_between(a: CpuSnap, b: CpuSnap, secs: f64) -> Cpu {
    let pct = |x: u64, y: u64| y.saturating_sub(x) as f64 / CLOCK_TICKS_PER_SEC / secs.max(1e-9) * 100.0;
    let (ferry, redis, client) = (pct(a.ferry, b.ferry), pct(a.redis, b.redis), pct(a.client, b.client));
    Cpu { ferry, redis, client, other: (pct(a.machine, b.machine) - ferry - redis - client).max(0.0) }
}

// ---------------------------------------------------------------------------
// One step: connect, publish at a rate for a while, check every delivery.

/// What every task of a step knows.
struct StepPlan {
    tag: String,
    channels: Vec<String>,
    /// Seqs of publisher `k` sent to channel `c`, in send order: `seqs[c][k]`.
    seqs: Vec<Vec<Vec<u32>>>,
    per_pub: usize,
    origin: Instant,
    /// Nanoseconds after `origin` when message 0 is due.
    start_ns: u64,
    interval_ns: u64,
}

impl StepPlan {
    /// Message `seq` of publisher `k` is the `g`-th of the step overall.
    fn global(seq: usize, k: usize) -> usize {
        seq * PUBLISHERS + k
    }
    fn channel_of(&self, seq: usize, k: usize) -> usize {
        Self::global(seq, k) % self.channels.len()
    }
    fn due_ns(&self, seq: usize, k: usize) -> u64 {
        self.start_ns + Self::global(seq, k) as u64 * self.interval_ns
    }
    fn now_ns(&self) -> u64 {
        self.origin.elapsed().as_nanos() as u64
    }
    fn message_id(&self, k: usize, seq: usize) -> String {
        format!("{}:p{k}:{seq}", self.tag)
    }
    fn expected(&self, c: usize) -> usize {
        self.seqs[c].iter().map(Vec::len).sum()
    }
}

/// A subscriber's step, kept even when it ended early.
struct SubOut {
    id: usize,
    channel: usize,
    expected: u64,
    received: u64,
    e2e_us: Vec<u32>,
    /// Nanoseconds after `origin` of the last delivery.
    last_ns: u64,
    violations: Vec<String>,
    /// Why it stopped before receiving everything (None = complete).
    end: Option<String>,
    ws: Option<Ws>,
}

async fn subscriber(
    i: usize,
    c: usize,
    mut ws: Ws,
    s: Session,
    plan: Arc<StepPlan>,
    deadline: Deadline,
    mut stop: watch::Receiver<bool>,
) -> SubOut {
    let who = format!("subscriber {i} ({})", plan.channels[c]);
    let expected = plan.expected(c) as u64;
    let mut out = SubOut {
        id: i,
        channel: c,
        expected,
        received: 0,
        e2e_us: Vec::with_capacity(expected as usize),
        last_ns: 0,
        violations: Vec::new(),
        end: None,
        ws: None,
    };
    let last = s.from + expected - 1;
    let mut next = s.from;
    // Position in `plan.seqs[c][k]` of publisher k's next publication.
    let mut next_idx = [0usize; PUBLISHERS];
    while next <= last {
        let read = tokio::select! {
            r = recv_frames(&mut ws, deadline, s.max_in, &who) => r,
            _ = stop.changed() => {
                out.end = Some(format!("{who}: stopped early (a publisher failed)"));
                break;
            }
        };
        let frames = match read {
            Ok((f, _)) => f,
            Err(e) => {
                out.end = Some(format!("{e}; received {} of {expected}", out.received));
                return out;
            }
        };
        let now = plan.now_ns();
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
                    out.end = Some(format!(
                        "{who}: disconnect push code {code} reason {reason:?} reconnect {reconnect}; received {} of \
                         {expected}",
                        out.received
                    ));
                    return out;
                }
                other => {
                    out.violations.push(format!("{who}: unexpected frame {other:?}"));
                    continue;
                }
            };
            if p.channel != plan.channels[c] || p.epoch != s.epoch {
                out.violations.push(format!(
                    "{who}: publication of {}/{} on a subscription to {}/{}",
                    p.channel, p.epoch, plan.channels[c], s.epoch
                ));
                continue;
            }
            if p.offset < next {
                out.violations.push(format!("{who}: duplicate delivery of offset {} (next expected {next})", p.offset));
                continue;
            }
            if p.offset > last {
                out.violations.push(format!("{who}: offset {} beyond the {expected} messages published", p.offset));
                continue;
            }
            if p.offset > next {
                out.violations.push(format!("{who}: gap: offset {} arrived while {next} was expected", p.offset));
                next = p.offset;
            }
            next += 1;
            let data = if p.payload.z {
                match compress::inflate(&p.payload.data.0, s.inflate_limit) {
                    Ok(d) => d,
                    Err(e) => {
                        out.violations.push(format!("{who}: offset {}: bad compressed payload: {e}", p.offset));
                        continue;
                    }
                }
            } else {
                p.payload.data.0
            };
            let Some((k, seq)) = parse_payload(&data, PAYLOAD) else {
                out.violations.push(format!("{who}: offset {}: corrupt payload of {} bytes", p.offset, data.len()));
                continue;
            };
            let order = plan.seqs[c].get(k);
            if order.and_then(|o| o.get(next_idx[k])).map(|&x| x as usize) != Some(seq) {
                out.violations
                    .push(format!("{who}: offset {} carries publisher {k} seq {seq}, out of send order", p.offset));
                // Resynchronise after it, so one misplaced message counts once.
                if let Some(pos) = order.and_then(|o| o.iter().position(|&x| x as usize == seq)) {
                    next_idx[k] = pos + 1;
                }
                continue;
            }
            next_idx[k] += 1;
            if p.message_id != plan.message_id(k, seq) {
                out.violations.push(format!(
                    "{who}: offset {} has message id {:?} for publisher {k} seq {seq}",
                    p.offset, p.message_id
                ));
            }
            out.received += 1;
            out.e2e_us.push(micros(now.saturating_sub(plan.due_ns(seq, k))));
            out.last_ns = now;
        }
        let mut buf = Vec::new();
        if next > before {
            let ack = ClientFrame::Ack(vec![AckItem {
                channel: plan.channels[c].clone(),
                epoch: s.epoch.clone(),
                offset: next - 1,
            }]);
            codec::encode_into(ENC, &ack, &mut buf);
        }
        if pong {
            codec::encode_into(ENC, &ClientFrame::Pong, &mut buf);
        }
        if !buf.is_empty() {
            if let Err(e) = send(&mut ws, buf, deadline, &who).await {
                let why = why_closed(&mut ws).await;
                out.end = Some(format!("{e}; received {} of {expected}; {why}", out.received));
                return out;
            }
        }
    }
    out.ws = Some(ws);
    out
}

struct PubOut {
    ack_us: Vec<u32>,
    /// Largest lateness of a send behind its due instant, microseconds.
    behind_us: u32,
    /// Epoch of each channel as the `published` replies say.
    epochs: Vec<String>,
    violations: Vec<String>,
    end: Option<String>,
    ws: Option<Ws>,
}

async fn publisher(
    k: usize,
    mut ws: Ws,
    s: Session,
    plan: Arc<StepPlan>,
    deadline: Deadline,
    stop_tx: Arc<watch::Sender<bool>>,
) -> PubOut {
    let who = format!("publisher {k}");
    let n = plan.per_pub;
    let mut out = PubOut {
        ack_us: Vec::with_capacity(n),
        behind_us: 0,
        epochs: vec![String::new(); plan.channels.len()],
        violations: Vec::new(),
        end: None,
        ws: None,
    };
    let mut stop = stop_tx.subscribe();
    let mut offsets = vec![0u64; n];
    let mut sent_ns = vec![0u64; n];
    let (mut next, mut acked) = (0usize, 0usize);
    let due = |seq: usize| plan.due_ns(seq, k);
    let fail = |out: &mut PubOut, e: String| {
        out.end = Some(e);
        // The subscribers cannot complete without this publisher.
        let _ = stop_tx.send(true);
    };
    while acked < n {
        if *stop.borrow() {
            out.end = Some(format!("{who}: stopped early (another publisher failed)"));
            return out;
        }
        while next < n && next - acked < WINDOW && due(next) <= plan.now_ns() {
            let first = next;
            let mut buf = Vec::with_capacity(PUBLISH_MSG_BYTES + PAYLOAD + 64);
            while next < n
                && next - acked < WINDOW
                && (next == first || due(next) <= plan.now_ns())
                && next - first < PUBLISH_MSG_FRAMES
                && (next == first || buf.len() + PAYLOAD + 64 <= PUBLISH_MSG_BYTES)
            {
                let frame = ClientFrame::Request {
                    id: next as u32 + 2,
                    cmd: Command::Publish {
                        channel: plan.channels[plan.channel_of(next, k)].clone(),
                        message_id: plan.message_id(k, next),
                        qos: Qos::AtLeastOnce,
                        payload: Payload { z: false, data: Bytes(make_payload(k, next, PAYLOAD)) },
                    },
                };
                codec::encode_into(ENC, &frame, &mut buf);
                next += 1;
            }
            let t = plan.now_ns();
            out.behind_us = out.behind_us.max(micros(t.saturating_sub(due(first))));
            for x in &mut sent_ns[first..next] {
                *x = t;
            }
            if let Err(e) = send(&mut ws, buf, deadline, &who).await {
                fail(&mut out, e);
                return out;
            }
        }
        // Wait for replies, or until the next paced publish is due.
        let wake = if next < n && next - acked < WINDOW {
            let ahead = Duration::from_nanos(due(next).saturating_sub(plan.now_ns()));
            (Deadline::now() + ahead).min(deadline)
        } else {
            deadline
        };
        // Cancel-safe: an interrupted read leaves its bytes in the stream.
        let read = tokio::select! {
            r = tokio::time::timeout_at(wake, recv_frames(&mut ws, deadline, s.max_in, &who)) => r,
            _ = stop.changed() => continue,
        };
        let frames = match read {
            Ok(Ok((f, _))) => f,
            Ok(Err(e)) => {
                fail(&mut out, format!("{e}; {acked} of {n} publishes acknowledged"));
                return out;
            }
            Err(_) => continue,
        };
        let now = plan.now_ns();
        let mut pong = false;
        for f in frames {
            let (id, outcome) = match f {
                ServerFrame::Reply { id, outcome } => (id, outcome),
                ServerFrame::Push(Push::Ping) => {
                    pong = true;
                    continue;
                }
                ServerFrame::Push(Push::Disconnect { code, reason, reconnect }) => {
                    fail(
                        &mut out,
                        format!(
                            "{who}: disconnect push code {code} reason {reason:?} reconnect {reconnect} after {acked} \
                             of {n} publishes acknowledged"
                        ),
                    );
                    return out;
                }
                other => {
                    out.violations.push(format!("{who}: unexpected frame {other:?}"));
                    continue;
                }
            };
            let seq = (id as usize).wrapping_sub(2);
            if seq >= next || offsets[seq] != 0 {
                out.violations.push(format!("{who}: reply to unknown or answered request {id}"));
                continue;
            }
            match outcome {
                Outcome::Ok(ReplyBody::Published { epoch, offset, duplicate }) => {
                    if duplicate || offset == 0 {
                        out.violations
                            .push(format!("{who}: publish {seq} answered offset {offset} duplicate {duplicate}"));
                    }
                    let c = plan.channel_of(seq, k);
                    if out.epochs[c].is_empty() {
                        out.epochs[c] = epoch;
                    } else if out.epochs[c] != epoch {
                        out.violations.push(format!(
                            "{who}: epoch of {} changed from {} to {epoch}",
                            plan.channels[c], out.epochs[c]
                        ));
                    }
                    offsets[seq] = offset.max(1);
                    acked += 1;
                    out.ack_us.push(micros(now.saturating_sub(sent_ns[seq])));
                }
                Outcome::Error(e) => {
                    // Under overload a temporary refusal is saturation, not a bug.
                    fail(
                        &mut out,
                        format!(
                            "{who}: publish {seq} refused: error {} {:?} (temporary {}) after {acked} of {n} \
                             acknowledged",
                            e.code, e.message, e.temporary
                        ),
                    );
                    return out;
                }
                Outcome::Ok(other) => out.violations.push(format!("{who}: publish {seq} answered {other:?}")),
            }
        }
        if pong {
            if let Err(e) = send(&mut ws, codec::encode_client(ENC, &ClientFrame::Pong), deadline, &who).await {
                fail(&mut out, e);
                return out;
            }
        }
    }
    // One connection's publishes to a channel are stored in send order.
    let mut last = vec![0u64; plan.channels.len()];
    for (seq, &off) in offsets.iter().enumerate() {
        let c = plan.channel_of(seq, k);
        if off <= last[c] {
            out.violations.push(format!(
                "{who}: publishes to {} stored out of send order (offset {} then {off})",
                plan.channels[c], last[c]
            ));
        }
        last[c] = off;
    }
    out.ws = Some(ws);
    out
}

/// The figures of one step.
#[derive(Clone, Default)]
struct Step {
    rate: u32,
    expected: u64,
    delivered: u64,
    deliveries_per_s: f64,
    e2e: Pct,
    ack: Pct,
    behind_ms: f64,
    cpu: Cpu,
    /// Why it did not pass (None = passed).
    failure: Option<String>,
    /// Correctness errors.
    violations: Vec<String>,
}

impl Step {
    fn passed(&self) -> bool {
        self.failure.is_none() && self.violations.is_empty()
    }
}

/// Subscriber `i` of a workload: its channel and node. Each channel's
/// subscribers rotate over the nodes, starting one node further for each
/// channel, so every node serves every channel and an equal share of
/// subscribers.
fn placement(i: usize, channels: usize, nodes: usize) -> (usize, usize) {
    let c = i % channels;
    (c, (c + i / channels) % nodes)
}

async fn run_step(cluster: &Cluster, wl: Workload, rate: u32, step: usize, plan: &Plan) -> Step {
    let nodes = cluster.nodes.len();
    let per_pub = ((f64::from(rate) * plan.step_secs / PUBLISHERS as f64).ceil() as usize).max(1);
    let channels: Vec<String> =
        (0..wl.channels).map(|c| format!("bench:{}-{}-s{step}-c{c}", cluster.engine.name(), wl.name)).collect();
    let mut seqs = vec![vec![Vec::new(); PUBLISHERS]; wl.channels];
    for seq in 0..per_pub {
        for k in 0..PUBLISHERS {
            seqs[StepPlan::global(seq, k) % wl.channels][k].push(seq as u32);
        }
    }
    let mut st = Step { rate, ..Step::default() };
    let mut errors = Vec::new();
    let connect_deadline = Deadline::now() + Duration::from_secs(30);

    // One publish per channel first, so the step measures streams that
    // exist: creating a channel's stream costs more than appending (in the
    // embedded engine a write transaction of its own), and with 30 new
    // channels in a 750-publish step that alone would set the ack p99.
    if let Err(e) = warm_up(&cluster.nodes[0].url(), &channels).await {
        st.failure = Some(format!("warm-up failed: {e}"));
        st.violations.push(format!("warm-up: {e}"));
        return st;
    }

    // Connect the subscribers (a bounded number at a time), then the publishers.
    let gate = Arc::new(tokio::sync::Semaphore::new(CONNECT_PARALLEL));
    let mut set = JoinSet::new();
    for i in 0..wl.subscribers {
        let (c, node) = placement(i, wl.channels, nodes);
        let (url, gate, channel) = (cluster.nodes[node].url(), gate.clone(), channels[c].clone());
        set.spawn(async move {
            let _permit = gate.acquire_owned().await.map_err(|e| e.to_string())?;
            let who = format!("subscriber {i}");
            let mut ws = open_ws(&url).await.map_err(|e| format!("{who}: {e}"))?;
            let s = handshake_at(&mut ws, &format!("bench-sub-{i}"), Some(&channel), 1, &who).await?;
            Ok((i, c, ws, s))
        });
    }
    let mut subs = join_all(&mut set, connect_deadline, "subscriber connect", &mut errors).await;
    let mut set = JoinSet::new();
    for k in 0..PUBLISHERS {
        let url = cluster.nodes[k % nodes].url();
        set.spawn(async move {
            let who = format!("publisher {k}");
            let mut ws = open_ws(&url).await.map_err(|e| format!("{who}: {e}"))?;
            let s = handshake(&mut ws, &format!("bench-pub-{k}"), None, &who).await?;
            Ok((k, ws, s))
        });
    }
    let mut pubs = join_all(&mut set, connect_deadline, "publisher connect", &mut errors).await;
    if !errors.is_empty() {
        st.failure = Some(format!("connect failed: {}", errors[0]));
        st.violations = errors;
        return st;
    }
    subs.sort_by_key(|s| s.0);
    pubs.sort_by_key(|p| p.0);
    // Every subscriber of a channel must have been told the same epoch.
    let mut epochs: Vec<Option<String>> = vec![None; wl.channels];
    for (i, c, _, s) in &subs {
        match &epochs[*c] {
            None => epochs[*c] = Some(s.epoch.clone()),
            Some(e) if *e != s.epoch => st.violations.push(format!(
                "subscriber {i}: {} is in epoch {} but another subscriber was told {e}",
                channels[*c], s.epoch
            )),
            Some(_) => {}
        }
    }

    let origin = Instant::now();
    // A short lead so every publisher and subscriber task is running at the first due instant.
    let lead = Duration::from_millis(50);
    let sp = Arc::new(StepPlan {
        tag: format!("cluster-{}-{}-{}-s{step}", std::process::id(), cluster.engine.name(), wl.name),
        channels: channels.clone(),
        seqs,
        per_pub,
        origin,
        start_ns: lead.as_nanos() as u64,
        interval_ns: 1_000_000_000 / u64::from(rate.max(1)),
    });
    let last_due = Duration::from_nanos(sp.due_ns(per_pub - 1, PUBLISHERS - 1));
    let deadline = Deadline::now() + last_due + plan.drain;
    let (stop_tx, stop_rx) = watch::channel(false);
    let stop_tx = Arc::new(stop_tx);
    let redis_pid = cluster.redis_pid();
    let cpu0 = cpu_snap(redis_pid);
    let t0 = Instant::now();
    let mut sub_set = JoinSet::new();
    for (i, c, ws, s) in subs {
        sub_set.spawn(subscriber(i, c, ws, s, sp.clone(), deadline, stop_rx.clone()));
    }
    let mut pub_set = JoinSet::new();
    for (k, ws, s) in pubs {
        pub_set.spawn(publisher(k, ws, s, sp.clone(), deadline, stop_tx.clone()));
    }
    let backstop = deadline + Duration::from_secs(5);
    let pub_outs = join_outs(&mut pub_set, backstop, "publisher", &mut st.violations).await;
    let sub_outs = join_outs(&mut sub_set, backstop, "subscriber", &mut st.violations).await;
    let secs = t0.elapsed().as_secs_f64();
    let cpu1 = cpu_snap(redis_pid);
    st.cpu = cpu_between(cpu0, cpu1, secs);

    // Figures and verdict.
    let mut ends = Vec::new();
    let mut ack = Vec::new();
    let mut close = JoinSet::new();
    for p in pub_outs {
        st.behind_ms = st.behind_ms.max(f64::from(p.behind_us) / 1000.0);
        for (c, e) in p.epochs.iter().enumerate() {
            if let Some(seen) = epochs[c].as_ref().filter(|s| !e.is_empty() && *s != e) {
                st.violations.push(format!("publishes to {} stored in epoch {e}, subscribers see {seen}", channels[c]));
            }
        }
        st.violations.extend(p.violations);
        ends.extend(p.end);
        ack.extend(p.ack_us);
        if let Some(ws) = p.ws {
            close.spawn(async move {
                let mut ws = ws;
                let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
                Ok(())
            });
        }
    }
    let mut e2e = Vec::new();
    let mut last_ns = 0;
    for mut s in sub_outs {
        st.expected += s.expected;
        st.delivered += s.received;
        last_ns = last_ns.max(s.last_ns);
        st.violations.append(&mut s.violations);
        if let Some(end) = s.end.take() {
            ends.push(end);
        }
        e2e.append(&mut s.e2e_us);
        if let Some(ws) = s.ws.take() {
            // Complete: anything still arriving is a delivery too many.
            close.spawn(close_counting_extras(format!("subscriber {} ({})", s.id, channels[s.channel]), ws));
        }
    }
    join_all(&mut close, Deadline::now() + Duration::from_secs(10), "close", &mut st.violations).await;
    let active = (last_ns.saturating_sub(sp.start_ns)) as f64 / 1e9;
    st.deliveries_per_s = st.delivered as f64 / active.max(1e-9);
    st.e2e = percentiles(&mut e2e);
    st.ack = percentiles(&mut ack);
    let expected_all = (wl.subscribers / wl.channels.max(1)) as u64 * (per_pub * PUBLISHERS) as u64;
    let loss = 1.0 - st.delivered as f64 / st.expected.max(1) as f64;
    st.failure = if !ends.is_empty() {
        Some(format!("{} connection(s) ended early, first: {}", ends.len(), ends[0]))
    } else if st.expected < expected_all {
        Some(format!("{} of {expected_all} deliveries had no subscriber", expected_all - st.expected))
    } else if loss > LOSS_LIMIT {
        Some(format!("{:.2} % not delivered by the deadline", loss * 100.0))
    } else if st.e2e.p99 > P99_LIMIT_MS {
        Some(format!("delivery p99 {:.1} ms above {P99_LIMIT_MS} ms", st.e2e.p99))
    } else {
        None
    };
    st
}

/// Publish one message to each channel and wait for every `published`.
async fn warm_up(url: &str, channels: &[String]) -> Result<(), String> {
    let who = "warm-up publisher";
    let deadline = Deadline::now() + Duration::from_secs(20);
    let mut ws = open_ws(url).await?;
    let s = handshake(&mut ws, "bench-warm-up", None, who).await?;
    let mut buf = Vec::new();
    for (c, ch) in channels.iter().enumerate() {
        let frame = ClientFrame::Request {
            id: c as u32 + 2,
            cmd: Command::Publish {
                channel: ch.clone(),
                message_id: format!("warm-up:{}:{ch}", std::process::id()),
                qos: Qos::AtLeastOnce,
                payload: Payload { z: false, data: Bytes(b"warm-up".to_vec()) },
            },
        };
        codec::encode_into(ENC, &frame, &mut buf);
    }
    send(&mut ws, buf, deadline, who).await?;
    let mut answered = 0;
    while answered < channels.len() {
        for f in recv_frames(&mut ws, deadline, s.max_in, who).await?.0 {
            match f {
                ServerFrame::Reply { outcome: Outcome::Ok(ReplyBody::Published { offset: 1, .. }), .. } => {
                    answered += 1
                }
                ServerFrame::Push(Push::Ping) => {}
                other => return Err(format!("{who}: unexpected answer {other:?}")),
            }
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
    Ok(())
}

/// Close a subscriber that has everything; every publication still
/// arriving (for up to 2 s) is a delivery too many. Reports how many and
/// which offsets, to tell one stray redelivery from a replayed range.
async fn close_counting_extras(who: String, mut ws: Ws) -> Result<(), String> {
    let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
    let end = Deadline::now() + Duration::from_secs(2);
    let mut extra: Vec<u64> = Vec::new();
    loop {
        match tokio::time::timeout_at(end, ws.next()).await {
            Err(_) | Ok(None) | Ok(Some(Err(_))) => break,
            Ok(Some(Ok(Message::Binary(b)))) => {
                for f in codec::decode_server(ENC, &b, 1 << 20).unwrap_or_default() {
                    if let ServerFrame::Push(Push::Publication(p)) = f {
                        extra.push(p.offset);
                    }
                }
            }
            Ok(Some(Ok(_))) => {}
        }
    }
    match (extra.iter().min(), extra.iter().max()) {
        (Some(lo), Some(hi)) => Err(format!(
            "{who}: {} extra deliver{} (offsets {lo}..={hi}) after all messages arrived",
            extra.len(),
            if extra.len() == 1 { "y" } else { "ies" }
        )),
        _ => Ok(()),
    }
}

/// Join tasks that return their own outcome (bounded by `deadline`).
async fn join_outs<T: 'static>(
    set: &mut JoinSet<T>,
    deadline: Deadline,
    what: &str,
    errors: &mut Vec<String>,
) -> Vec<T> {
    let mut out = Vec::new();
    loop {
        match tokio::time::timeout_at(deadline, set.join_next()).await {
            Ok(None) => break,
            Ok(Some(Ok(v))) => out.push(v),
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

fn print_step(setup: &str, wl: &Workload, st: &Step) {
    let verdict = match (&st.failure, st.violations.is_empty()) {
        (_, false) => format!("VIOLATIONS ({})", st.violations.len()),
        (None, true) => "pass".into(),
        (Some(why), true) => format!("fail: {why}"),
    };
    println!(
        "  {setup:<8} {:<5} rate {:>6}/s: {:>8}/{:<8} delivered, {:>8.0} deliv/s, e2e p50 {:>6.1} p99 {:>6.1} max \
         {:>7.1} ms, ack p50 {:>5.1} p99 {:>6.1} ms, behind {:>6.1} ms, cpu% ferry {:>3.0} redis {:>3.0} client \
         {:>3.0} other {:>3.0} | {verdict}",
        wl.name,
        st.rate,
        st.delivered,
        st.expected,
        st.deliveries_per_s,
        st.e2e.p50,
        st.e2e.p99,
        st.e2e.max,
        st.ack.p50,
        st.ack.p99,
        st.behind_ms,
        st.cpu.ferry,
        st.cpu.redis,
        st.cpu.client,
        st.cpu.other,
    );
}

/// The result of one workload on one setup.
struct Outcome1 {
    setup: String,
    workload: &'static str,
    /// The reported step (highest passing one), if any.
    best: Option<Step>,
    /// The doubling reached `max_rate` without failing.
    capped: bool,
    /// Lowest failing rate seen.
    failed_at: Option<u32>,
}

/// One step, printed; its violations go to `errors`. The machine is shared:
/// a step that failed, or a fixed-rate step, while other processes took
/// more than [`DISTURBED_PCT`] of a core is run again (up to
/// [`DISTURBED_RETRIES`] times), and the least disturbed attempt counts, so
/// another tenant's build does not pass for saturation.
async fn run_one(cluster: &Cluster, wl: Workload, rate: u32, plan: &Plan, errors: &mut Vec<String>) -> Step {
    let setup = cluster.engine.name();
    let mut best: Option<Step> = None;
    for attempt in 0..=DISTURBED_RETRIES {
        let step_no = cluster.steps.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        let st = run_step(cluster, wl, rate, step_no, plan).await;
        print_step(&setup, &wl, &st);
        for v in &st.violations {
            errors.push(format!("[{setup} {} {rate}/s] {v}", wl.name));
        }
        let disturbed = st.cpu.other > DISTURBED_PCT;
        let retry = disturbed
            && attempt < DISTURBED_RETRIES
            && st.violations.is_empty()
            && (wl.kind == Kind::Fixed || st.failure.is_some())
            && !plan.smoke;
        if retry {
            println!("  (other processes took {:.0} % of a core during that step: running it again)", st.cpu.other);
        }
        let better = match &best {
            None => true,
            Some(b) => (st.passed() && !b.passed()) || (st.passed() == b.passed() && st.cpu.other < b.cpu.other),
        };
        if better {
            best = Some(st);
        }
        if !retry {
            break;
        }
    }
    best.unwrap_or_default()
}

/// Run a workload's steps on a running cluster; violations go to `errors`.
async fn run_workload(cluster: &Cluster, wl: Workload, plan: &Plan, errors: &mut Vec<String>) -> Outcome1 {
    let setup = cluster.engine.name();
    let mut out = Outcome1 { setup: setup.clone(), workload: wl.name, best: None, capped: false, failed_at: None };
    if plan.smoke || wl.kind == Kind::Fixed {
        let st = run_one(cluster, wl, wl.start_rate, plan, errors).await;
        // At these rates anything short of full delivery is a fault, not
        // saturation; latency is only reported (nothing timed is asserted
        // in smoke mode).
        if let Some(why) = st.failure.as_ref().filter(|w| plan.smoke || !w.starts_with("delivery p99")) {
            errors.push(format!("[{setup} {} {}/s] {why}", wl.name, wl.start_rate));
        }
        out.best = Some(st);
        return out;
    }
    let mut rate = wl.start_rate;
    loop {
        let st = run_one(cluster, wl, rate, plan, errors).await;
        if !st.passed() {
            out.failed_at = Some(rate);
            break;
        }
        out.best = Some(st);
        if rate >= wl.max_rate {
            out.capped = true;
            break;
        }
        rate = rate.saturating_mul(2).min(wl.max_rate);
    }
    let Some(mut hi) = out.failed_at else { return out };
    let Some(mut lo) = out.best.as_ref().map(|b| b.rate) else {
        errors.push(format!("[{setup} {}] even the lowest rate {}/s failed", wl.name, wl.start_rate));
        return out;
    };
    for _ in 0..BISECT_STEPS {
        let mid = lo + (hi - lo) / 2;
        if mid == lo || mid == hi {
            break;
        }
        let st = run_one(cluster, wl, mid, plan, errors).await;
        if st.passed() {
            lo = mid;
            out.best = Some(st);
        } else {
            hi = mid;
            out.failed_at = Some(mid);
        }
    }
    out
}

// ---------------------------------------------------------------------------
// Report.

fn fmt_ratio(x: f64, base: f64) -> String {
    if base > 0.0 && x.is_finite() {
        format!("{:.2}", x / base)
    } else {
        "-".into()
    }
}

/// CPU microseconds per delivery.
fn cpu_us_per_delivery(pct: f64, deliveries_per_s: f64) -> f64 {
    if deliveries_per_s > 0.0 {
        pct / 100.0 * 1e6 / deliveries_per_s
    } else {
        0.0
    }
}

fn print_report(outs: &[Outcome1], plan: &Plan) {
    println!();
    println!(
        "{:<8} {:<5} {:>7} {:>9} {:>13} {:>13} {:>13} | {:>25} | {:>17}",
        "setup",
        "wl",
        "rate/s",
        "deliv/s",
        "e2e p50/p99",
        "ack p50/p99",
        "behind ms",
        "cpu% ferry/redis/cli/oth",
        "cpu us/deliv f/r"
    );
    for o in outs {
        let Some(b) = &o.best else {
            println!("{:<8} {:<5} no passing step", o.setup, o.workload);
            continue;
        };
        let rate = if o.capped { format!(">={}", b.rate) } else { b.rate.to_string() };
        println!(
            "{:<8} {:<5} {:>7} {:>9.0} {:>6.1}/{:<6.1} {:>6.1}/{:<6.1} {:>13.1} | {:>5.0} {:>5.0} {:>5.0} {:>5.0}   | {:>7.2} {:>7.2}",
            o.setup,
            o.workload,
            rate,
            b.deliveries_per_s,
            b.e2e.p50,
            b.e2e.p99,
            b.ack.p50,
            b.ack.p99,
            b.behind_ms,
            b.cpu.ferry,
            b.cpu.redis,
            b.cpu.client,
            b.cpu.other,
            cpu_us_per_delivery(b.cpu.ferry, b.deliveries_per_s),
            cpu_us_per_delivery(b.cpu.redis, b.deliveries_per_s),
        );
    }
    println!("\nratios to the embedded single node (same workload):");
    println!(
        "{:<8} {:<5} {:>8} {:>8} {:>8} {:>8} {:>8} {:>10} {:>12}",
        "setup", "wl", "deliv/s", "e2e p50", "e2e p99", "ack p50", "ack p99", "ferry cpu%", "ferry us/dlv"
    );
    for o in outs {
        let base =
            outs.iter().find(|b| b.setup == "embedded" && b.workload == o.workload).and_then(|b| b.best.as_ref());
        let (Some(b), Some(base)) = (&o.best, base) else { continue };
        println!(
            "{:<8} {:<5} {:>8} {:>8} {:>8} {:>8} {:>8} {:>10} {:>12}",
            o.setup,
            o.workload,
            fmt_ratio(b.deliveries_per_s, base.deliveries_per_s),
            fmt_ratio(b.e2e.p50, base.e2e.p50),
            fmt_ratio(b.e2e.p99, base.e2e.p99),
            fmt_ratio(b.ack.p50, base.ack.p50),
            fmt_ratio(b.ack.p99, base.ack.p99),
            fmt_ratio(b.cpu.ferry, base.cpu.ferry),
            fmt_ratio(
                cpu_us_per_delivery(b.cpu.ferry, b.deliveries_per_s),
                cpu_us_per_delivery(base.cpu.ferry, base.deliveries_per_s)
            ),
        );
    }
    // One line per result, for collecting several runs.
    for o in outs {
        if let Some(b) = &o.best {
            println!(
                "RESULT setup={} wl={} rate={} capped={} deliv_s={:.0} e2e_p50={:.1} e2e_p99={:.1} ack_p50={:.1} \
                 ack_p99={:.1} cpu_ferry={:.0} cpu_redis={:.0} cpu_client={:.0} cpu_other={:.0}",
                o.setup,
                o.workload,
                b.rate,
                o.capped,
                b.deliveries_per_s,
                b.e2e.p50,
                b.e2e.p99,
                b.ack.p50,
                b.ack.p99,
                b.cpu.ferry,
                b.cpu.redis,
                b.cpu.client,
                b.cpu.other
            );
        }
    }
    println!(
        "\nrate: publishes/s over {PUBLISHERS} publishers (highest passing step: loss <= {:.1} %, delivery p99 <= \
         {P99_LIMIT_MS} ms, no disconnect). deliv/s: deliveries from the first due publish to the last delivery. \
         e2e: due instant of the paced schedule to subscriber receive. ack: publish sent to `published`. behind: \
         largest lateness of a send behind its due instant (window of {WINDOW} full). cpu%: of one core over the \
         step (ferry = server threads of all nodes; cli = load generator; oth = rest of the machine). {} s of \
         publishing per step.",
        LOSS_LIMIT * 100.0,
        plan.step_secs
    );
}

fn main() {
    let mut plan =
        if std::env::var("FERRY_BENCH_SMOKE").is_ok_and(|v| v == "1") { Plan::smoke() } else { Plan::full() };
    if let Ok(names) = std::env::var("FERRY_BENCH_WORKLOADS") {
        let names: Vec<&str> = names.split(',').map(str::trim).collect();
        plan.workloads.retain(|w| names.contains(&w.name));
    }
    // Fixed rates instead of the search (to reproduce one step).
    let rates: Vec<u32> = std::env::var("FERRY_BENCH_RATES")
        .map(|v| v.split(',').filter_map(|r| r.trim().parse().ok()).collect())
        .unwrap_or_default();
    let watchdog = plan.watchdog;
    std::thread::spawn(move || {
        std::thread::sleep(watchdog);
        println!("ERROR: watchdog: the benchmark ran longer than {watchdog:?}; exiting");
        kill_children();
        std::process::exit(3);
    });
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .try_init();
    let only: Option<Vec<String>> =
        std::env::var("FERRY_BENCH_SETUPS").ok().map(|v| v.split(',').map(|s| s.trim().to_string()).collect());
    let setups: Vec<Engine> =
        SETUPS.into_iter().filter(|e| only.as_ref().is_none_or(|o| o.contains(&e.name()))).collect();
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);

    println!("Ferry cluster benchmark{}", if plan.smoke { " (smoke: tiny sizes, one step each)" } else { "" });
    println!("machine: {}; load average before: {}", machine(), load_average());
    let need = plan.workloads.iter().map(|w| 2 * (w.subscribers + PUBLISHERS) as u64 + 64).max().unwrap_or(0);
    match open_file_limit() {
        Some(l) if l < need => {
            println!("ERROR: open-file limit {l} is below the {need} this run needs; raise it (ulimit -n)");
            std::process::exit(1);
        }
        _ => {}
    }
    println!(
        "setup: in-process nodes on 127.0.0.1 sharing one server runtime ({cpus} workers), clients on their own \
         runtime ({cpus} workers), redis-server 127.0.0.1 child (no persistence; extra args {:?}); binary ferry.v1, QoS 1 publish \
         and subscribe, {PAYLOAD} B payloads, {PUBLISHERS} paced publishers with {WINDOW} in flight each, one ack \
         per subscriber read; history_size {HISTORY}, publish rate and per-IP connection limits off",
        redis_extra_args()
    );
    for w in &plan.workloads {
        println!(
            "workload {}: {} channel(s), {} subscribers, {} from {}/s",
            w.name,
            w.channels,
            w.subscribers,
            if w.kind == Kind::Search && !plan.smoke { "search" } else { "fixed rate" },
            w.start_rate
        );
    }

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
    let t_all = Instant::now();
    let mut outs = Vec::new();
    let mut errors: Vec<String> = Vec::new();
    for engine in setups {
        let t = Instant::now();
        println!(
            "\n[{}] {} node(s){}",
            engine.name(),
            engine.nodes(),
            match engine {
                Engine::Embedded => ", embedded engine (redb)",
                Engine::Redis { .. } => " on one redis-server",
            }
        );
        let cluster = match client_rt.block_on(Cluster::start(engine, server_rt.handle())) {
            Ok(c) => c,
            Err(e) => {
                errors.push(format!("[{}] cannot start: {e}", engine.name()));
                continue;
            }
        };
        for wl in &plan.workloads {
            if rates.is_empty() {
                outs.push(client_rt.block_on(run_workload(&cluster, *wl, &plan, &mut errors)));
            }
            for &rate in &rates {
                let fixed = Workload { start_rate: rate, max_rate: rate, kind: Kind::Fixed, ..*wl };
                outs.push(client_rt.block_on(run_workload(&cluster, fixed, &plan, &mut errors)));
            }
        }
        for e in client_rt.block_on(cluster.stop()) {
            errors.push(format!("[{}] stop: {e}", engine.name()));
        }
        println!("  ({} in {:.0} s)", engine.name(), t.elapsed().as_secs_f64());
    }
    client_rt.shutdown_timeout(Duration::from_secs(5));
    server_rt.shutdown_timeout(Duration::from_secs(5));
    kill_children();

    print_report(&outs, &plan);
    println!("load average after: {}; whole run {:.0} s", load_average(), t_all.elapsed().as_secs_f64());
    if !errors.is_empty() {
        for e in errors.iter().take(20) {
            println!("ERROR: {e}");
        }
        if errors.len() > 20 {
            println!("ERROR: {} errors in all; by kind (numbers as #):", errors.len());
            for (kind, n) in error_kinds(&errors) {
                println!("ERROR:   {n:>4} x {kind}");
            }
        }
        println!("FAILED: see the ERROR lines above");
        std::process::exit(1);
    }
}
