//! Scenario 6: the durable outbox across an app restart. A publisher queues
//! 100 QoS 2 messages while the server is unreachable and closes; a new
//! client with the same storage starts; once the server is back, all 100
//! are stored exactly once, in order. And the harder case for exactly-once:
//! the server stored the messages but the answers never reached the app
//! before it closed.

use std::time::{Duration, Instant};

use ferry_client::{Error, Qos, SubscriptionEvent};
use ferry_e2e::load::{self, Tag};
use ferry_e2e::{
    builder, eventually, free_addr, seed, serial, wait_subscribed, FaultProxy, FerryServer, Rng, Settings, TempDir,
};

const CHANNEL: &str = "orders:1";
const MESSAGES: u32 = 100;
const T: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_survives_app_restart_while_server_is_down() {
    let _one_at_a_time = serial().await;
    let mut rng = Rng::new(seed("outbox-restart"));
    // Nothing listens here yet.
    let addr = free_addr();
    let url = format!("ws://{addr}/ws");
    let storage = TempDir::new("publisher-storage");
    let app = |seed| builder(&url, "shop", "till-1", seed).storage_dir(storage.path()).build().unwrap();

    let first = app(rng.next_u64());
    first.connect();
    let mut pending = Vec::new();
    for seq in 0..MESSAGES {
        pending.push(load::submit(&first, CHANNEL, Tag { publisher: 0, seq }.encode(), Qos::ExactlyOnce).await);
    }
    // Commands are handled in order, so this sees all 100 queued.
    let queued = first.unacked().await;
    assert_eq!(queued.len(), MESSAGES as usize, "all queued in the outbox");
    let report = first.close(Duration::from_millis(100)).await;
    assert_eq!(report.unacked, queued, "all still unacknowledged at close, kept in storage");
    for p in pending {
        assert_eq!(p.await, Err(Error::Closed));
    }
    drop(first);

    // The app starts again with the same storage while the server is still
    // down, then the server comes up on the address it was configured with.
    let second = app(rng.next_u64());
    second.connect();
    let srv = FerryServer::start_at(addr, &Settings::default()).await;
    let up = Instant::now();
    let reader = builder(&srv.url(), "auditor", "auditor-dev", rng.next_u64()).build().unwrap();
    // A live subscriber, to see that nothing beyond the 100 is delivered
    // later (a fresh subscription starts at the top: history is the check
    // of what was stored).
    let mut sub = reader.subscribe(CHANNEL, Qos::ExactlyOnce).await.unwrap();
    reader.connect();
    let _ = wait_subscribed(&mut sub, T).await;

    let drained = eventually(T, || async { second.unacked().await.is_empty().then_some(()) }).await;
    let drain_time = up.elapsed();
    let (stored, top) = load::full_history(&reader, CHANNEL).await.expect("history");
    let ids: Vec<String> = stored.iter().map(|p| p.message_id.clone()).collect();
    let seqs: Vec<u32> = stored.iter().map(|p| Tag::of(p).expect("tagged payload").seq).collect();
    // The subscriber's view agrees: nothing beyond the 100 shows up later.
    let marker = Tag::END;
    reader.publish(CHANNEL, marker.encode(), Qos::ExactlyOnce).await.unwrap();
    let mut live = Vec::new();
    ferry_e2e::wait_event(&mut sub, T, "the marker", |e| match e {
        SubscriptionEvent::Publication(p) if Tag::of(p) == Some(marker) => true,
        SubscriptionEvent::Publication(p) => {
            live.push(p.message_id.clone());
            false
        }
        _ => false,
    })
    .await;
    println!(
        "[outbox-restart] {MESSAGES} QoS 2 messages queued offline, app restarted: outbox drained {:.2?} after the \
         server came up; stored {} (top offset {}), {} distinct",
        drain_time,
        stored.len(),
        top.offset,
        ids.iter().collect::<std::collections::BTreeSet<_>>().len()
    );
    assert!(drained.is_some(), "outbox drained after the server came back");
    assert_eq!(ids, queued, "stored exactly once each, in the order queued");
    assert_eq!(seqs, (0..MESSAGES).collect::<Vec<_>>());
    assert_eq!(stored.iter().map(|p| p.offset).collect::<Vec<_>>(), (1..=u64::from(MESSAGES)).collect::<Vec<_>>());
    assert!(live.iter().all(|id| queued.contains(id)), "the subscriber saw nothing else");
    assert_eq!(live.iter().collect::<std::collections::BTreeSet<_>>().len(), live.len(), "nor anything twice");
    second.close(Duration::from_secs(1)).await;
    reader.close(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_but_unanswered_qos2_is_not_stored_twice_after_restart() {
    let _one_at_a_time = serial().await;
    let mut rng = Rng::new(seed("outbox-lost-answers"));
    // Slow heartbeats: the one-way dead link must not be noticed (and the
    // connection replaced) before the app closes.
    let settings = Settings { ping_ms: 10_000, pong_ms: 10_000, ..Settings::default() };
    let srv = FerryServer::start(&settings).await;
    let proxy = FaultProxy::start(srv.addr()).await.unwrap();
    let storage = TempDir::new("till-2-storage");
    let app = |seed| builder(&proxy.url(), "shop", "till-2", seed).storage_dir(storage.path()).build().unwrap();

    let reader = builder(&srv.url(), "auditor", "auditor-dev", rng.next_u64()).build().unwrap();
    let mut sub = reader.subscribe(CHANNEL, Qos::ExactlyOnce).await.unwrap();
    reader.connect();
    assert!(wait_subscribed(&mut sub, T).await);

    let first = app(rng.next_u64());
    first.connect();
    assert!(first.wait_connected(T).await);
    // What the app sends arrives; nothing comes back.
    proxy.blackhole_to_client(true);
    let mut pending = Vec::new();
    for seq in 0..50 {
        pending.push(load::submit(&first, CHANNEL, Tag { publisher: 0, seq }.encode(), Qos::ExactlyOnce).await);
    }
    let stored_first = load::take(&mut sub, 50, T).await;
    let queued = first.unacked().await;
    let report = first.close(Duration::from_millis(100)).await;
    for p in pending {
        assert_eq!(p.await, Err(Error::Closed));
    }
    drop(first);
    proxy.heal();

    let second = app(rng.next_u64());
    second.connect();
    let drained = eventually(T, || async { second.unacked().await.is_empty().then_some(()) }).await;
    let (stored, _) = load::full_history(&reader, CHANNEL).await.expect("history");
    let ids: Vec<String> = stored.iter().map(|p| p.message_id.clone()).collect();
    // The subscriber sees the marker next: no second copy was delivered.
    reader.publish(CHANNEL, Tag::END.encode(), Qos::ExactlyOnce).await.unwrap();
    let next = load::take(&mut sub, 1, T).await;
    println!(
        "[outbox-lost-answers] 50 QoS 2 messages stored while the answers were held; {} unacknowledged at close; \
         after restart: outbox drained {}, stored {} ({} distinct), the subscriber's next delivery is the marker: {}",
        report.unacked.len(),
        drained.is_some(),
        stored.len(),
        ids.iter().collect::<std::collections::BTreeSet<_>>().len(),
        next.first().and_then(Tag::of) == Some(Tag::END)
    );
    assert_eq!(stored_first.len(), 50, "stored before the app closed");
    assert_eq!(queued.len(), 50, "none acknowledged: the answers were held");
    assert_eq!(report.unacked, queued, "kept in storage at close");
    assert!(drained.is_some(), "the retries were answered after the restart");
    assert_eq!(ids, queued, "each stored exactly once, in order");
    assert_eq!(next.first().and_then(Tag::of), Some(Tag::END), "nothing delivered twice");
    second.close(Duration::from_secs(1)).await;
    reader.close(Duration::from_secs(1)).await;
}
