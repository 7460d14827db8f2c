//! A fault-injecting TCP proxy on loopback.
//!
//! Clients connect to the proxy, which opens one upstream connection per
//! client connection and copies bytes both ways. Faults:
//!
//! * **cut**: reset a connection (RST on both sockets, `SO_LINGER` 0), as a
//!   crashed NAT or a dropped mobile link does;
//! * **blackhole**: stop forwarding in both directions (or one) but keep the
//!   sockets open, so neither end gets an error and only heartbeats can notice.
//!   Bytes read meanwhile are held and delivered after [`FaultProxy::heal`],
//!   as TCP retransmission would after a partition ends;
//! * **latency**: every chunk is delivered this long after it was read (in
//!   each direction, so the round trip grows by twice as much), without
//!   limiting throughput.

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::Rng;

/// Chunks read ahead of a stalled writer, per direction. Bounded so a
/// blackholed link pushes back on the sender like a full TCP window.
const QUEUE_CHUNKS: usize = 64;
/// Bytes per read.
const CHUNK: usize = 16 * 1024;

#[derive(Clone, Copy, Debug, Default)]
struct Faults {
    /// Nothing reaches the server.
    dead_to_server: bool,
    /// Nothing reaches the client.
    dead_to_client: bool,
    latency: Duration,
}

struct Shared {
    upstream: SocketAddr,
    faults: watch::Sender<Faults>,
    /// Live connections by id, each with the signal that cuts it. A cut
    /// connection leaves the table at once, so it is never cut twice.
    conns: Mutex<BTreeMap<u64, Arc<Notify>>>,
    next_id: AtomicU64,
    accepted: AtomicU64,
    cuts: AtomicU64,
    to_server: AtomicU64,
    to_client: AtomicU64,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Arc<Notify>>> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn cut_all(&self) -> usize {
        let conns = std::mem::take(&mut *self.lock());
        for cut in conns.values() {
            cut.notify_one();
        }
        self.cuts.fetch_add(conns.len() as u64, Ordering::Relaxed);
        conns.len()
    }

    fn cut_random(&self, rng: &mut Rng) -> bool {
        let mut conns = self.lock();
        // BTreeMap order makes the choice depend only on the seed and the
        // set of live connections.
        let pick = rng.below(conns.len() as u64) as usize;
        let Some(id) = conns.keys().nth(pick).copied() else { return false };
        if let Some(cut) = conns.remove(&id) {
            cut.notify_one();
            self.cuts.fetch_add(1, Ordering::Relaxed);
        }
        true
    }
}

/// The proxy. Dropping it stops accepting; live connections are cut.
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

impl FaultProxy {
    /// Listen on `127.0.0.1:0` and forward every connection to `upstream`.
    pub async fn start(upstream: SocketAddr) -> io::Result<FaultProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            upstream,
            faults: watch::Sender::new(Faults::default()),
            conns: Mutex::new(BTreeMap::new()),
            next_id: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            cuts: AtomicU64::new(0),
            to_server: AtomicU64::new(0),
            to_client: AtomicU64::new(0),
        });
        let accept = tokio::spawn(accept_loop(listener, shared.clone()));
        Ok(FaultProxy { addr, shared, accept })
    }

    /// The proxy's own address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A Ferry WebSocket URL that goes through the proxy.
    pub fn url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// Reset every live connection; returns how many were cut.
    pub fn cut_all(&self) -> usize {
        self.shared.cut_all()
    }

    /// Reset one live connection chosen with `rng`; false when none is live.
    pub fn cut_random(&self, rng: &mut Rng) -> bool {
        self.shared.cut_random(rng)
    }

    /// Cut a random live connection every `min..=max` (drawn from `seed`)
    /// until the returned guard is dropped.
    pub fn cut_randomly(&self, seed: u64, min: Duration, max: Duration) -> RandomCuts {
        let shared = self.shared.clone();
        let task = tokio::spawn(async move {
            let mut rng = Rng::new(seed);
            let span = max.saturating_sub(min).as_millis() as u64;
            loop {
                tokio::time::sleep(min + Duration::from_millis(rng.below(span + 1))).await;
                shared.cut_random(&mut rng);
            }
        });
        RandomCuts { task }
    }

    /// Deliver every chunk this long after it was read, in each direction (0 = none).
    pub fn set_latency(&self, latency: Duration) {
        self.shared.faults.send_modify(|f| f.latency = latency);
    }

    /// Stop (true) or resume (false) forwarding, keeping sockets open.
    pub fn blackhole(&self, on: bool) {
        self.shared.faults.send_modify(|f| (f.dead_to_server, f.dead_to_client) = (on, on));
    }

    /// Stop (true) or resume (false) forwarding towards clients only: what
    /// a client sends arrives, but it hears nothing back (replies, acks,
    /// pings), as with a broken return route.
    pub fn blackhole_to_client(&self, on: bool) {
        self.shared.faults.send_modify(|f| f.dead_to_client = on);
    }

    /// Remove every fault: no blackhole, no latency.
    pub fn heal(&self) {
        self.shared.faults.send_replace(Faults::default());
    }

    /// Connections reset so far (by any cut).
    pub fn cuts(&self) -> u64 {
        self.shared.cuts.load(Ordering::Relaxed)
    }

    /// Connections accepted so far: each is one connection attempt by a client.
    pub fn accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::Relaxed)
    }

    /// Connections being relayed now (cut ones not included).
    pub fn live(&self) -> usize {
        self.lock().len()
    }

    /// Bytes delivered to the server and to clients so far.
    pub fn bytes(&self) -> (u64, u64) {
        (self.shared.to_server.load(Ordering::Relaxed), self.shared.to_client.load(Ordering::Relaxed))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Arc<Notify>>> {
        self.shared.lock()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept.abort();
        for cut in std::mem::take(&mut *self.lock()).values() {
            cut.notify_one();
        }
    }
}

/// Random cutting in the background; stops when dropped.
pub struct RandomCuts {
    task: JoinHandle<()>,
}

impl Drop for RandomCuts {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            // Out of descriptors or similar: back off instead of spinning.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        shared.accepted.fetch_add(1, Ordering::Relaxed);
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        let cut = Arc::new(Notify::new());
        shared.lock().insert(id, cut.clone());
        let shared = shared.clone();
        tokio::spawn(async move {
            relay(client, &shared, &cut).await;
            shared.lock().remove(&id);
        });
    }
}

/// One client connection, from upstream connect to teardown.
async fn relay(mut client: TcpStream, shared: &Shared, cut: &Notify) {
    let _ = client.set_nodelay(true);
    let upstream = tokio::select! {
        r = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(shared.upstream)) => r,
        _ = cut.notified() => {
            reset(&client);
            return;
        }
    };
    let mut server = match upstream {
        Ok(Ok(s)) => s,
        _ => {
            // Upstream down: the client sees a reset, as if nothing listened.
            reset(&client);
            return;
        }
    };
    let _ = server.set_nodelay(true);
    let aborted = {
        let (cr, cw) = client.split();
        let (sr, sw) = server.split();
        let up = pipe(cr, sw, shared.faults.subscribe(), |f| f.dead_to_server, &shared.to_server);
        let down = pipe(sr, cw, shared.faults.subscribe(), |f| f.dead_to_client, &shared.to_client);
        tokio::select! {
            r = async { tokio::try_join!(up, down) } => r.is_err(),
            _ = cut.notified() => true,
        }
    };
    if aborted {
        // An error on one side becomes a reset on the other, as a router
        // that lost the flow would answer.
        reset(&client);
        reset(&server);
    }
}

fn reset(s: &TcpStream) {
    let _ = s.set_zero_linger();
}

/// Copy one direction: a reader stamps chunks with their delivery time,
/// a writer delivers them in order once due and not blackholed.
async fn pipe(
    mut from: tokio::net::tcp::ReadHalf<'_>,
    mut to: tokio::net::tcp::WriteHalf<'_>,
    faults: watch::Receiver<Faults>,
    dead: fn(&Faults) -> bool,
    delivered: &AtomicU64,
) -> io::Result<()> {
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(QUEUE_CHUNKS);
    let read_faults = faults.clone();
    let reader = async move {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = from.read(&mut buf).await?;
            if n == 0 {
                // EOF: dropping `tx` lets the writer finish and pass it on.
                return Ok::<(), io::Error>(());
            }
            let due = Instant::now() + read_faults.borrow().latency;
            if tx.send((due, buf[..n].to_vec())).await.is_err() {
                return Ok(());
            }
        }
    };
    let mut faults = faults;
    let writer = async move {
        while let Some((due, bytes)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            let _ = faults.wait_for(|f| !dead(f)).await;
            to.write_all(&bytes).await?;
            delivered.fetch_add(bytes.len() as u64, Ordering::Relaxed);
        }
        // A FIN is a packet too: it waits out the blackhole like data.
        let _ = faults.wait_for(|f| !dead(f)).await;
        to.shutdown().await
    };
    tokio::try_join!(reader, writer).map(|_| ())
}
