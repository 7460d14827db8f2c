//! Scenario 8: tokens on long connections.
//!
//! * Development auth (token = user id, no expiry): a client with a token
//!   provider stays on one connection across many heartbeats, without
//!   reconnecting or asking for tokens it does not need.
//! * HS256 tokens with a short `exp`: the client refreshes in place before
//!   expiry (no reconnect, subscription untouched); when its token source
//!   fails, the server closes at expiry, the client asks for a fresh token,
//!   reconnects and recovers what was published meanwhile.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_client::{ConnectionState, Qos};
use ferry_e2e::load::{self, Tag};
use ferry_e2e::{builder, seed, serial, wait_subscribed, FaultProxy, FerryServer, Rng, Settings};

const PING: u64 = 300;
const PONG: u64 = 300;
/// Heartbeats the connection must survive.
const PINGS: u64 = 10;
const T: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refreshable_client_stays_on_one_connection_for_many_heartbeats() {
    let _one_at_a_time = serial().await;
    let mut rng = Rng::new(seed("token"));
    let settings = Settings { ping_ms: PING, pong_ms: PONG, ..Settings::default() };
    let srv = FerryServer::start(&settings).await;
    // Through a proxy only to count connection attempts and heartbeat bytes.
    let proxy = FaultProxy::start(srv.addr()).await.unwrap();
    let asked = Arc::new(AtomicU32::new(0));
    let counter = asked.clone();
    let client = builder(&proxy.url(), "carol", "carol-tab", rng.next_u64())
        .token_provider(move || {
            counter.fetch_add(1, Ordering::Relaxed);
            async { Ok::<_, String>("carol".to_string()) }
        })
        .build()
        .unwrap();
    let mut sub = client.subscribe("chat:long", Qos::ExactlyOnce).await.unwrap();
    client.connect();
    assert!(wait_subscribed(&mut sub, T).await);
    let mut state = client.state();
    assert_eq!(*state.borrow_and_update(), ConnectionState::Connected);
    let (_, down_before) = proxy.bytes();

    // Any state change during the window ends it early, and fails.
    let window = Duration::from_millis(PING * PINGS);
    let changed = tokio::time::timeout(window, state.changed()).await;
    let (_, down_after) = proxy.bytes();
    let heartbeat_bytes = down_after - down_before;

    // Still usable on the same connection: a round trip through its subscription.
    let ack = client.publish("chat:long", Tag { publisher: 0, seq: 1 }.encode(), Qos::ExactlyOnce).await.unwrap();
    let got = load::take(&mut sub, 1, T).await;
    println!(
        "[token] {window:?} on one connection ({PINGS} ping intervals of {PING} ms): {heartbeat_bytes} bytes of \
         heartbeat to the client, connection attempts {}, token provider called {} times, publish round trip at \
         offset {}",
        proxy.accepted(),
        asked.load(Ordering::Relaxed),
        ack.offset
    );
    assert!(changed.is_err(), "the connection state changed to {:?}", *state.borrow());
    assert_eq!(proxy.accepted(), 1, "never reconnected");
    assert!(heartbeat_bytes > 0, "pings flowed during the window");
    assert_eq!(got.first().map(|p| p.offset), Some(ack.offset));
    client.close(Duration::from_secs(1)).await;
}

/// Token lifetime, seconds (`exp` has one-second resolution).
const TTL: u64 = 3;
const SECRET: &str = "ferry-e2e-test-secret-0123456789abcdef";

fn jwt(user: &str, ttl: u64) -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let claims = ferry_server::auth::Claims { sub: user.into(), exp: Some(now + ttl), ..Default::default() };
    ferry_server::auth::sign_hs256(SECRET, &claims).unwrap()
}

/// What the expiring-token run measured.
struct Expiry {
    /// Refreshes during the first part (on one connection).
    refreshes: usize,
    /// Connection attempts during the first part.
    attempts_refreshing: u64,
    /// From the first refused refresh to the close.
    closed_after: Duration,
    /// Token requests after the close.
    asked_after_close: usize,
    /// Connection attempts after the close while the token source refused.
    attempts_while_refused: u64,
    /// From granting tokens again to connected.
    back_after: Duration,
    /// Sequence numbers recovered after reconnecting.
    recovered: Vec<u32>,
}

/// How long the token source keeps refusing after the expiry close.
const REFUSED_FOR: Duration = Duration::from_millis(1500);

async fn expiring_tokens(rng: &mut Rng) -> Expiry {
    let settings = Settings { ping_ms: PING, pong_ms: PONG, hmac_secret: Some(SECRET.into()), ..Settings::default() };
    let srv = FerryServer::start(&settings).await;
    let proxy = FaultProxy::start(srv.addr()).await.unwrap();
    // The app's token source: refuses while `refuse` is set; every call logged.
    let refuse = Arc::new(AtomicBool::new(false));
    let calls: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let (r, log) = (refuse.clone(), calls.clone());
    let client = builder(&proxy.url(), "carol", "carol-tab", rng.next_u64())
        .token(jwt("carol", TTL))
        .token_provider(move || {
            let granted = !r.load(Ordering::Relaxed);
            log.lock().unwrap().push(Instant::now());
            async move {
                if granted {
                    Ok(jwt("carol", TTL))
                } else {
                    Err("token service unavailable".to_string())
                }
            }
        })
        .build()
        .unwrap();
    let mut sub = client.subscribe("chat:jwt", Qos::ExactlyOnce).await.unwrap();
    client.connect();
    assert!(wait_subscribed(&mut sub, T).await);
    let mut state = client.state();
    state.borrow_and_update();
    let count_since = |t: Instant| calls.lock().unwrap().iter().filter(|c| **c >= t).count();

    // Part 1: two and a half lifetimes on one connection, refreshing in place.
    let window = Duration::from_millis(TTL * 2500);
    let changed = tokio::time::timeout(window, state.changed()).await;
    assert!(changed.is_err(), "the connection state changed to {:?}", *state.borrow());
    let refreshes = calls.lock().unwrap().len();
    let attempts_refreshing = proxy.accepted();

    // Part 2: the token source fails, so the token runs out: the server
    // closes, and once the source works again the client comes back.
    let publisher = builder(&srv.url(), "dave", "dave-pc", rng.next_u64()).token(jwt("dave", 600)).build().unwrap();
    publisher.connect();
    refuse.store(true, Ordering::Relaxed);
    let refused_at = Instant::now();
    let limit = Duration::from_secs(TTL + 2);
    let dropped = tokio::time::timeout(limit, state.wait_for(|s| *s != ConnectionState::Connected)).await.is_ok();
    assert!(dropped, "closed within a token lifetime once refreshes fail");
    let closed_at = Instant::now();
    let attempts_at_close = proxy.accepted();
    for seq in 0..20 {
        publisher.publish("chat:jwt", Tag { publisher: 1, seq }.encode(), Qos::ExactlyOnce).await.unwrap();
    }
    // An observation window: without a fresh token there is nothing to
    // connect with, so no attempt should reach the server meanwhile.
    tokio::time::sleep_until((closed_at + REFUSED_FOR).into()).await;
    let attempts_while_refused = proxy.accepted() - attempts_at_close;
    refuse.store(false, Ordering::Relaxed);
    let granted_at = Instant::now();
    assert!(client.wait_connected(T).await, "reconnected with a fresh token");
    let back_after = granted_at.elapsed();
    let got = load::take(&mut sub, 20, T).await;
    let e = Expiry {
        refreshes,
        attempts_refreshing,
        closed_after: closed_at - refused_at,
        asked_after_close: count_since(closed_at),
        attempts_while_refused,
        back_after,
        recovered: got.iter().filter_map(Tag::of).map(|t| t.seq).collect(),
    };
    println!(
        "[token-jwt] tokens of {TTL} s: {window:?} on {} connection(s) with {} refreshes; refreshes refused -> \
         closed {:.2?} later; token asked {} times after the close, {} connection \
         attempts while refused ({REFUSED_FOR:?}); back {:.2?} after tokens were granted again, {} of 20 recovered",
        e.attempts_refreshing,
        e.refreshes,
        e.closed_after,
        e.asked_after_close,
        e.attempts_while_refused,
        e.back_after,
        e.recovered.len()
    );
    client.close(Duration::from_secs(1)).await;
    publisher.close(Duration::from_secs(1)).await;
    e
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiring_tokens_are_refreshed_in_place_and_an_expired_one_reconnects() {
    let _one_at_a_time = serial().await;
    let e = expiring_tokens(&mut Rng::new(seed("token-jwt"))).await;
    assert_eq!(e.attempts_refreshing, 1, "refreshed without reconnecting");
    assert!(e.refreshes >= 2, "refreshed before each expiry ({} refreshes)", e.refreshes);
    assert!(e.closed_after <= Duration::from_secs(TTL + 1), "closed at expiry");
    // Only the expiry close makes a disconnected client ask for a token
    // (its refresh timer does not run without a connection).
    assert!(e.asked_after_close >= 1, "asked for a fresh token after the expiry close");
    assert_eq!(e.recovered, (0..20).collect::<Vec<_>>(), "recovered in order, once");
}

/// PROTOCOL.md 9.2: "After 3005 the client MUST obtain a fresh token before
/// reconnecting." Regression: while the token source failed, the client
/// used to reconnect with the expired token on every backoff step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_reconnect_with_an_expired_token() {
    let _one_at_a_time = serial().await;
    let e = expiring_tokens(&mut Rng::new(seed("token-jwt-stale"))).await;
    assert_eq!(e.attempts_while_refused, 0, "connection attempts with an expired token");
}
