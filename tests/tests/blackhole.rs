//! Scenario 3: a dead link (blackhole, no reset) lasting longer than the
//! ping interval plus the presence grace. Both ends must notice through
//! heartbeats alone, and after the link heals the client must reconnect
//! and recover what was published meanwhile, with nothing lost or repeated.

use std::time::{Duration, Instant};

use ferry_client::{ConnectionState, Qos, SubscriptionEvent};
use ferry_e2e::load::Tag;
use ferry_e2e::{builder, seed, wait_event, wait_subscribed, FaultProxy, FerryServer, Rng, Settings};

const PING: u64 = 1000;
const PONG: u64 = 1000;
const GRACE: u64 = 1000;
/// Scheduling slack on a busy two-core machine.
const SLACK: u64 = 1500;
const DURING: u32 = 100;
const T: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blackhole_is_detected_by_both_sides_and_recovered_after_heal() {
    let mut rng = Rng::new(seed("blackhole"));
    let settings = Settings {
        ping_ms: PING,
        pong_ms: PONG,
        grace_ms: GRACE,
        join_leave: vec!["room".into()],
        ..Settings::default()
    };
    let srv = FerryServer::start(&settings).await;
    let proxy = FaultProxy::start(srv.addr()).await.unwrap();
    let channel = "room:bh";

    // The watcher is connected directly: it publishes and sees join/leave.
    let watcher = builder(&srv.url(), "watcher", "watcher-dev", rng.next_u64()).build().unwrap();
    let mut watch = watcher.subscribe(channel, Qos::AtLeastOnce).await.unwrap();
    watcher.connect();
    assert!(wait_subscribed(&mut watch, T).await);

    // Alice goes through the proxy. A short connect timeout, so an attempt
    // that started inside the blackhole is retried soon after the heal.
    let alice = builder(&proxy.url(), "alice", "alice-phone", rng.next_u64())
        .core_config(|c| c.connect_timeout = Duration::from_secs(3))
        .build()
        .unwrap();
    let mut inbox = alice.subscribe(channel, Qos::ExactlyOnce).await.unwrap();
    alice.connect();
    assert!(wait_subscribed(&mut inbox, T).await);
    wait_event(&mut watch, T, "alice joins", |e| matches!(e, SubscriptionEvent::Join(i) if i.user == "alice")).await;

    // Warm up: a message goes through.
    watcher.publish(channel, Tag { publisher: 0, seq: u32::MAX - 1 }.encode(), Qos::ExactlyOnce).await.unwrap();
    wait_event(&mut inbox, T, "warm-up message", |e| matches!(e, SubscriptionEvent::Publication(_))).await;

    let mut state = alice.state();
    let t0 = Instant::now();
    proxy.blackhole(true);
    // Published during the blackhole by a client that is not behind it.
    for seq in 0..DURING {
        watcher.publish(channel, Tag { publisher: 0, seq }.encode(), Qos::ExactlyOnce).await.unwrap();
    }
    let client_bound = Duration::from_millis(PING + PONG + SLACK);
    tokio::time::timeout(client_bound, state.wait_for(|s| *s != ConnectionState::Connected))
        .await
        .unwrap_or_else(|_| panic!("client still Connected {client_bound:?} into the blackhole"))
        .unwrap();
    let client_noticed = t0.elapsed();
    let server_bound = Duration::from_millis(PING + PONG + GRACE + SLACK);
    let left = server_bound.saturating_sub(t0.elapsed());
    wait_event(&mut watch, left, "alice's leave", |e| matches!(e, SubscriptionEvent::Leave(i) if i.user == "alice"))
        .await;
    let server_noticed = t0.elapsed();
    let present = watcher.presence(channel).await.unwrap();
    assert!(present.iter().all(|c| c.user != "alice"), "alice still listed: {present:?}");
    assert_eq!(proxy.cuts(), 0, "a blackhole resets nothing");
    // The link stayed dead for longer than ping + grace before it heals.
    let dead_for = t0.elapsed();
    assert!(dead_for >= Duration::from_millis(PING + GRACE));

    proxy.heal();
    let healed = Instant::now();
    let mut got = Vec::new();
    let mut recovered = None;
    let end = tokio::time::Instant::now() + T;
    while got.len() < DURING as usize {
        let left = end.saturating_duration_since(tokio::time::Instant::now());
        match ferry_e2e::next_event(&mut inbox, left, "publications after heal").await {
            SubscriptionEvent::Publication(p) => got.push(Tag::of(&p).expect("tagged payload").seq),
            SubscriptionEvent::Subscribed { recovered: r, .. } => recovered = Some(r),
            SubscriptionEvent::Gap { .. } => panic!("gap after heal"),
            _ => {}
        }
    }
    let resync = healed.elapsed();
    wait_event(&mut watch, T, "alice joins again", |e| matches!(e, SubscriptionEvent::Join(i) if i.user == "alice"))
        .await;
    println!(
        "[blackhole] ping {PING} ms, pong {PONG} ms, grace {GRACE} ms: client left Connected after {client_noticed:.2?}, \
         server dropped presence after {server_noticed:.2?}, link dead {dead_for:.2?}"
    );
    println!(
        "[blackhole] {DURING} published during the blackhole, {} received after heal in {resync:.2?} \
         (recovered {recovered:?}), connection attempts {}",
        got.len(),
        proxy.accepted()
    );
    assert_eq!(recovered, Some(true), "resubscribed with recovery");
    assert_eq!(got, (0..DURING).collect::<Vec<_>>(), "all of them, in order, once");
    // Nothing more: the next event is a live message, not a repeat.
    watcher.publish(channel, Tag { publisher: 1, seq: 0 }.encode(), Qos::ExactlyOnce).await.unwrap();
    let next = wait_event(&mut inbox, T, "live message", |e| matches!(e, SubscriptionEvent::Publication(_))).await;
    let SubscriptionEvent::Publication(p) = next else { unreachable!() };
    assert_eq!(Tag::of(&p), Some(Tag { publisher: 1, seq: 0 }), "no repeat before the live message");
    alice.close(Duration::from_millis(200)).await;
    watcher.close(Duration::from_millis(200)).await;
}
