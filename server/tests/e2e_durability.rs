//! Durability and recovery end to end: kill -9, offline devices, slow
//! consumers.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use ferry_core::client::Event;
use ferry_core::codec::Encoding;
use ferry_core::frame::*;

const T: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_five_times_loses_no_acknowledged_publish() {
    let dir = TempDir::new("kill9");
    let mut srv = ServerProcess::spawn(dir.path(), &[]);
    let mut publisher = TestClient::new(&srv.url(), TestClient::config("pub", "pub", Encoding::Binary));
    let mut sub = TestClient::new(&srv.url(), TestClient::config("sub", "sub", Encoding::Json));
    sub.subscribe("orders:eu", Qos::ExactlyOnce).await;
    sub.connect().await;
    publisher.connect().await;
    assert!(publisher.connected().await && sub.connected().await);
    assert!(sub.run_until(T, |c| c.events.iter().any(|e| matches!(e, Event::Subscribed { .. }))).await);
    let mut published = Vec::new();
    let mut n = 0u32;
    for round in 0..5 {
        // Steady load: publish while both sides run, then kill mid-stream.
        for _ in 0..40 {
            n += 1;
            let qos = if n % 2 == 0 { Qos::ExactlyOnce } else { Qos::AtLeastOnce };
            published.push(publisher.publish("orders:eu", n.to_be_bytes().to_vec(), qos).await);
            publisher.run_for(Duration::from_millis(2)).await;
            sub.run_for(Duration::from_millis(1)).await;
        }
        let acked_before_kill: BTreeSet<String> = publisher.acked.keys().cloned().collect();
        srv.kill9();
        srv = ServerProcess::spawn(dir.path(), &[]);
        publisher.url = srv.url();
        sub.url = srv.url();
        eprintln!("round {round}: {} published, {} acked before kill -9", published.len(), acked_before_kill.len());
    }
    let mut clients = [publisher, sub];
    let all = published.len();
    let ok = run_all(&mut clients, Duration::from_secs(60), |cs| {
        // Both must be on the last server (one connection per server run).
        cs[0].session.outbox_len() == 0
            && cs[1].ids("orders:eu").len() >= all
            && cs.iter().all(|c| c.session.stats().connects == 6 && c.session.is_connected())
    })
    .await;
    let [publisher, mut sub] = clients;
    assert!(ok, "outbox {} received {}", publisher.session.outbox_len(), sub.ids("orders:eu").len());
    // Every publish was acknowledged once the server stayed up, stored once,
    // and offsets are 1..=N in one epoch.
    let h = sub
        .call(Command::History(HistoryRequest {
            channel: "orders:eu".into(),
            since: None,
            until: None,
            limit: 1000,
            reverse: false,
        }))
        .await
        .unwrap_or_else(|e| {
            let why: Vec<_> = sub.events.iter().filter(|e| matches!(e, Event::Disconnected { .. })).collect();
            panic!("history failed: {e}; disconnects: {why:?}")
        });
    let ReplyBody::History { publications, top } = h else { panic!() };
    let stored: Vec<String> = publications.iter().map(|p| p.message_id.clone()).collect();
    assert_eq!(stored.len(), all, "each publish stored exactly once");
    assert_eq!(stored.iter().collect::<BTreeSet<_>>(), published.iter().collect::<BTreeSet<_>>());
    assert_eq!(publications.iter().map(|p| p.offset).collect::<Vec<_>>(), (1..=all as u64).collect::<Vec<_>>());
    assert!(publications.iter().all(|p| p.epoch == top.epoch), "the epoch survived every restart");
    // The subscriber got each exactly once, in offset order.
    assert_eq!(sub.ids("orders:eu"), stored);
}

#[tokio::test]
async fn offline_device_catches_up_from_its_server_cursor() {
    // "boss" writes into u42's personal channel: user-to-user delivery is
    // off unless the namespace allows it.
    let mut cfg = test_config();
    cfg.namespaces
        .insert("user".into(), ferry_server::config::Namespace { personal_publish: true, ..Default::default() });
    let srv = TestServer::start(cfg).await;
    // The device subscribes and sees a first message, then its app is removed
    // from memory (no client-side state kept at all).
    let mut dev = TestClient::new(&srv.url(), TestClient::config("phone-1", "u42", Encoding::Binary));
    dev.subscribe("im:team", Qos::ExactlyOnce).await;
    dev.subscribe("#user:u42", Qos::ExactlyOnce).await;
    dev.connect().await;
    assert!(dev.run_until(T, |c| c.events.iter().filter(|e| matches!(e, Event::Subscribed { .. })).count() == 2).await);
    let before = dev.publish("im:team", b"before".to_vec(), Qos::AtLeastOnce).await;
    assert!(dev.run_until(T, |c| c.ids("im:team") == [before.clone()]).await);
    dev.run_for(Duration::from_millis(200)).await; // let the ack reach the server
    dev.drop_socket();
    drop(dev);
    // 1,000 messages while it is away, on the shared and the personal channel.
    let mut other = TestClient::new(&srv.url(), TestClient::config("pc", "boss", Encoding::Binary));
    other.connect().await;
    let mut want_team = Vec::new();
    let mut want_dm = Vec::new();
    for i in 0..1000 {
        if i % 4 == 0 {
            want_dm.push(other.publish("#user:u42", format!("dm {i}").into_bytes(), Qos::ExactlyOnce).await);
        } else {
            want_team.push(other.publish("im:team", format!("m {i}").into_bytes(), Qos::AtLeastOnce).await);
        }
    }
    assert!(other.run_until(T, |c| c.session.outbox_len() == 0).await);
    // Only user u42 may read its personal channel.
    let mut snoop = TestClient::new(&srv.url(), TestClient::config("x", "mallory", Encoding::Json));
    snoop.subscribe("#user:u42", Qos::AtLeastOnce).await;
    snoop.connect().await;
    assert!(snoop.run_until(T, |c| c.events.iter().any(|e| matches!(e, Event::SubscribeFailed { .. }))).await);
    // The same device comes back with a fresh process and no stored state.
    let mut dev = TestClient::new(&srv.url(), TestClient::config("phone-1", "u42", Encoding::Binary));
    dev.subscribe("im:team", Qos::ExactlyOnce).await;
    dev.subscribe("#user:u42", Qos::ExactlyOnce).await;
    dev.connect().await;
    assert!(
        dev.run_until(T, |c| c.ids("im:team").len() == want_team.len() && c.ids("#user:u42").len() == want_dm.len())
            .await,
        "team {} dm {}",
        dev.ids("im:team").len(),
        dev.ids("#user:u42").len()
    );
    assert_eq!(dev.ids("im:team"), want_team, "everything missed, in order, once");
    assert_eq!(dev.ids("#user:u42"), want_dm);
    // Then live.
    let live = other.publish("im:team", b"live".to_vec(), Qos::AtLeastOnce).await;
    let mut cs = [other, dev];
    assert!(run_all(&mut cs, T, |cs| cs[1].ids("im:team").last() == Some(&live)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_under_load_loses_no_acknowledged_publish() {
    let srv = TestServer::start(test_config()).await;
    let mut p = TestClient::new(&srv.url(), TestClient::config("gp", "gp", Encoding::Binary));
    p.connect().await;
    assert!(p.connected().await);
    for i in 0..300u32 {
        p.publish("load:1", i.to_be_bytes().to_vec(), if i % 2 == 0 { Qos::AtLeastOnce } else { Qos::ExactlyOnce })
            .await;
    }
    // Stop while publishes are still in flight.
    p.run_until(T, |c| c.acked.len() >= 50).await;
    let stopping = tokio::spawn(srv.stop());
    assert!(p.run_until(T, |c| c.events.iter().any(|e| matches!(e, Event::Disconnected { .. }))).await);
    let dir = stopping.await.unwrap();
    let acked: BTreeSet<String> = p.acked.keys().cloned().collect();
    // Restart from the same directory: every acknowledged publish is there,
    // and the publisher's outbox delivers the rest exactly once.
    let srv = TestServer::start_in(test_config(), dir).await;
    p.url = srv.url();
    let drained =
        p.run_until(Duration::from_secs(60), |c| c.session.outbox_len() == 0 && c.session.is_connected()).await;
    assert!(
        drained,
        "state {:?} outbox {} events {:?}",
        p.session.state(),
        p.session.outbox_len(),
        p.events
            .iter()
            .filter(|e| matches!(e, Event::Disconnected { .. } | Event::PublishFailed { .. }))
            .take(5)
            .collect::<Vec<_>>()
    );
    let h = p
        .call(Command::History(HistoryRequest {
            channel: "load:1".into(),
            since: None,
            until: None,
            limit: 1000,
            reverse: false,
        }))
        .await
        .unwrap();
    let ReplyBody::History { publications, .. } = h else { panic!() };
    let stored: Vec<String> = publications.iter().map(|p| p.message_id.clone()).collect();
    assert!(acked.iter().all(|id| stored.contains(id)), "an acknowledged publish was lost");
    assert_eq!(stored.len(), 300, "every publish stored exactly once");
    eprintln!("{} acknowledged before the shutdown, 300 stored after restart", acked.len());
}
