//! # ferry-e2e
//!
//! End-to-end fault tests for Ferry: the real `ferry` server as a child
//! process, real [`ferry_client::Client`]s, and a fault-injecting TCP proxy
//! between them. This library is the harness; the scenarios are in
//! `tests/tests/*.rs` and print their figures (run them with
//! `cargo test -p ferry-e2e -- --nocapture`).
//!
//! ```no_run
//! # async fn demo() {
//! use ferry_e2e::{FaultProxy, FerryServer, Settings};
//!
//! let server = FerryServer::start(&Settings::default()).await;
//! let proxy = FaultProxy::start(server.addr()).await.unwrap();
//! let client = ferry_e2e::builder(&proxy.url(), "alice", "laptop", 1).build().unwrap();
//! client.connect();
//! proxy.cut_all(); // the client sees a reset and reconnects by itself
//! # }
//! ```
//!
//! Randomness comes from a seed printed at the start of each scenario (a
//! failing test shows its output); `FERRY_E2E_SEED=<n>` replays a seed.

pub mod load;
pub mod proxy;
pub mod server;

use std::time::Duration;

use ferry_client::{Client, ClientBuilder, SubscriptionEvent};
use futures_util::StreamExt;

pub use proxy::{FaultProxy, RandomCuts};
pub use server::{free_addr, FerryServer, RedisServer, Settings, TempDir};

/// SplitMix64: small, seedable, good enough to pick cuts and delays.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }

    /// Uniform in `lo..=hi`.
    pub fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi.saturating_sub(lo) + 1)
    }
}

/// The seed for a scenario: `FERRY_E2E_SEED` if set, else fresh. Printed,
/// so a failure can be replayed.
pub fn seed(scenario: &str) -> u64 {
    let seed = std::env::var("FERRY_E2E_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        Rng::new(t.as_nanos() as u64 ^ u64::from(std::process::id())).next_u64()
    });
    println!("[{scenario}] seed {seed} (replay with FERRY_E2E_SEED={seed})");
    seed
}

/// Scenarios in one test binary run one at a time: each wants the two
/// cores to itself, or its timing bars would measure its neighbour.
/// (An async lock: each test has its own runtime, and the guard is held
/// across awaits.)
pub async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}

/// A client builder with test settings: user `user` (development auth takes
/// the token as the user id), device `device`, fast reconnects, and an
/// outbox big enough for pipelined load.
pub fn builder(url: &str, user: &str, device: &str, seed: u64) -> ClientBuilder {
    builder_urls(&[url.to_string()], user, device, seed)
}

/// [`builder`] for a client given several server URLs (a cluster's nodes).
pub fn builder_urls(urls: &[String], user: &str, device: &str, seed: u64) -> ClientBuilder {
    Client::builder_urls(urls.iter().cloned())
        .token(user)
        .device_id(device)
        .seed(seed)
        .backoff(Duration::from_millis(20), Duration::from_millis(300))
        .outbox_limits(10_000, 64 << 20, Duration::from_secs(3600))
        // Tests that model app restarts pass `storage_dir`; the rest keep
        // state in memory so no run sees another's files.
        .storage(std::sync::Arc::new(ferry_client::MemoryStorage::default()))
}

/// The next event of a subscription within `limit`; panics on timeout or
/// when the stream ends, naming `what` was awaited.
pub async fn next_event(sub: &mut ferry_client::Subscription, limit: Duration, what: &str) -> SubscriptionEvent {
    match tokio::time::timeout(limit, sub.next()).await {
        Ok(Some(e)) => e,
        Ok(None) => panic!("{}: stream ended while waiting for {what}", sub.channel()),
        Err(_) => panic!("{}: no event within {limit:?} while waiting for {what}", sub.channel()),
    }
}

/// Skip events until the subscription is live (`Subscribed`); returns
/// whether it recovered. Panics after `limit`.
pub async fn wait_subscribed(sub: &mut ferry_client::Subscription, limit: Duration) -> bool {
    let e = wait_event(sub, limit, "Subscribed", |e| {
        matches!(e, SubscriptionEvent::Subscribed { .. } | SubscriptionEvent::Ended { .. })
    })
    .await;
    match e {
        SubscriptionEvent::Subscribed { recovered, .. } => recovered,
        other => panic!("{}: {other:?} while waiting for Subscribed", sub.channel()),
    }
}

/// Skip events until one satisfies `pred`, and return it. Panics after
/// `limit`, naming `what` was awaited.
pub async fn wait_event(
    sub: &mut ferry_client::Subscription,
    limit: Duration,
    what: &str,
    mut pred: impl FnMut(&SubscriptionEvent) -> bool,
) -> SubscriptionEvent {
    let end = tokio::time::Instant::now() + limit;
    loop {
        let left = end.saturating_duration_since(tokio::time::Instant::now());
        let e = next_event(sub, left, what).await;
        if pred(&e) {
            return e;
        }
    }
}

/// Poll `probe` every 20 ms until it returns `Some`, for at most `limit`:
/// for facts the API offers no event for (an outbox draining, a presence
/// count). Returns the last probe result's value or None on timeout.
pub async fn eventually<T, F, Fut>(limit: Duration, mut probe: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let end = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = probe().await {
            return Some(v);
        }
        if tokio::time::Instant::now() >= end {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
