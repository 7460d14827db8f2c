//! Presence end to end: join/leave with grace, per-user aggregation,
//! eviction of a silent connection on the heartbeat's schedule.

mod common;

use std::time::{Duration, Instant};

use common::*;
use ferry_core::client::Event;
use ferry_core::codec::{self, Encoding};
use ferry_core::frame::*;
use ferry_server::config::Namespace;
use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::Message;

const T: Duration = Duration::from_secs(20);

fn joins(c: &TestClient, user: &str) -> usize {
    c.events.iter().filter(|e| matches!(e, Event::Join { info, .. } if info.user == user)).count()
}

fn leaves(c: &TestClient, user: &str) -> usize {
    c.events.iter().filter(|e| matches!(e, Event::Leave { info, .. } if info.user == user)).count()
}

async fn stats(c: &mut TestClient) -> (u32, u32) {
    match c.call(Command::PresenceStats { channel: "room:p".into() }).await.unwrap() {
        ReplyBody::PresenceStats { clients, users } => (clients, users),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_leave_with_grace_and_silent_connection_eviction() {
    let mut cfg = test_config();
    cfg.presence_grace_ms = 400;
    cfg.limits.ping_interval_ms = 300;
    cfg.limits.pong_timeout_ms = 300;
    cfg.namespaces.insert("room".into(), Namespace { join_leave: true, ..Namespace::default() });
    let srv = TestServer::start(cfg).await;
    let mut a = TestClient::new(&srv.url(), TestClient::config("a", "alice", Encoding::Binary));
    a.subscribe("room:p", Qos::AtMostOnce).await;
    a.connect().await;
    assert!(a.run_until(T, |c| c.events.iter().any(|e| matches!(e, Event::Subscribed { .. }))).await);

    // Bob joins with two connections: one join.
    let mut b1 = TestClient::new(&srv.url(), TestClient::config("b1", "bob", Encoding::Json));
    let mut b2 = TestClient::new(&srv.url(), TestClient::config("b2", "bob", Encoding::Binary));
    for b in [&mut b1, &mut b2] {
        b.subscribe("room:p", Qos::AtLeastOnce).await;
        b.connect().await;
    }
    let mut cs = vec![a, b1, b2];
    assert!(run_all(&mut cs, T, |cs| joins(&cs[0], "bob") == 1 && cs[2].session.is_connected()).await);
    let [mut a, mut b1, mut b2]: [TestClient; 3] = cs.try_into().ok().unwrap();
    assert_eq!(stats(&mut a).await, (3, 2));
    let list = match a.call(Command::Presence { channel: "room:p".into() }).await.unwrap() {
        ReplyBody::Presence { clients } => clients,
        other => panic!("{other:?}"),
    };
    let mut users: Vec<String> = list.iter().map(|c| c.user.clone()).collect();
    users.sort();
    assert_eq!(users, ["alice", "bob", "bob"]);

    // One of Bob's connections goes: Bob is still present, nothing announced.
    let now = b2.now();
    b2.session.disconnect(now);
    b2.run_for(Duration::from_millis(50)).await;
    // The other reconnects quickly (network change): no leave, no second join.
    b1.network_changed().await;
    let mut cs = vec![a, b1];
    assert!(run_all(&mut cs, T, |cs| cs[1].session.stats().connects == 2).await);
    let t0 = Instant::now();
    run_all(&mut cs, Duration::from_millis(900), |_| false).await;
    let [mut a, b1]: [TestClient; 2] = cs.try_into().ok().unwrap();
    assert!(t0.elapsed() >= Duration::from_millis(800));
    assert_eq!(joins(&a, "bob"), 1, "no flapping join");
    assert_eq!(leaves(&a, "bob"), 0, "no flapping leave");
    assert_eq!(stats(&mut a).await, (2, 2));

    // Carol connects from a plain socket, subscribes, then goes silent: she
    // never answers a ping. The server evicts her on the heartbeat schedule.
    let mut carol = raw_ws(&srv.url(), Encoding::Json).await;
    let connect = ClientFrame::Request {
        id: 1,
        cmd: Command::Connect(Connect {
            version: PROTOCOL_VERSION,
            token: "carol".into(),
            device_id: "c".into(),
            client: ClientVersion::default(),
            subs: vec![SubscribeRequest {
                channel: "room:p".into(),
                qos: Qos::AtMostOnce,
                since: None,
                token: String::new(),
            }],
            compression: false,
        }),
    };
    let msg = codec::encode(Encoding::Json, &connect);
    carol.send(Message::Text(String::from_utf8(msg).unwrap().into())).await.unwrap();
    // Bob keeps answering pings; Carol does not.
    let mut cs = vec![a, b1];
    assert!(run_all(&mut cs, T, |cs| joins(&cs[0], "carol") == 1).await);
    let silent_since = Instant::now();
    assert!(run_all(&mut cs, T, |cs| leaves(&cs[0], "carol") == 1).await);
    let took = silent_since.elapsed();
    // Ping interval + pong timeout + grace is 1 s; the bound leaves room for a loaded CI machine.
    assert!(took < Duration::from_millis(300 + 300 + 400 + 4000), "evicted after {took:?}");
    let [mut a, mut b1]: [TestClient; 2] = cs.try_into().ok().unwrap();
    assert_eq!(leaves(&a, "bob"), 0);
    b1.run_for(Duration::from_millis(10)).await;
    assert_eq!(stats(&mut a).await, (2, 2));
    drop(carol);
}

/// PROTOCOL.md 11.1 and SERVER.md state one presence model; this test
/// checks both say it and that the server does it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_are_per_connection_and_join_leave_per_user_as_both_documents_say() {
    const MODEL: &str = "lists are per connection, join/leave events are per user";
    let squash = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ").replace("**", "").to_lowercase();
    for (name, text) in
        [("PROTOCOL.md", include_str!("../../docs/PROTOCOL.md")), ("SERVER.md", include_str!("../../docs/SERVER.md"))]
    {
        assert!(squash(text).contains(MODEL), "{name} must state the presence model: {MODEL:?}");
    }

    let mut cfg = test_config();
    cfg.presence_grace_ms = 300;
    cfg.namespaces.insert("room".into(), Namespace { join_leave: true, ..Namespace::default() });
    let srv = TestServer::start(cfg).await;
    let mut watcher = TestClient::new(&srv.url(), TestClient::config("w", "watcher", Encoding::Json));
    watcher.subscribe("room:p", Qos::AtMostOnce).await;
    watcher.connect().await;
    assert!(watcher.run_until(T, |c| c.events.iter().any(|e| matches!(e, Event::Subscribed { .. }))).await);
    // Alice in two tabs, and two anonymous visitors.
    let mut cs = vec![watcher];
    for (device, token) in [("tab1", "alice"), ("tab2", "alice"), ("v1", ""), ("v2", "")] {
        let mut c = TestClient::new(&srv.url(), TestClient::config(device, token, Encoding::Binary));
        c.subscribe("room:p", Qos::AtMostOnce).await;
        c.connect().await;
        cs.push(c);
    }
    let subscribed = |c: &TestClient| c.events.iter().any(|e| matches!(e, Event::Subscribed { .. }));
    assert!(run_all(&mut cs, T, |cs| cs.iter().all(subscribed) && joins(&cs[0], "") == 2).await);
    let mut w = cs.remove(0);
    // Events per user: one join for alice's two tabs, one per anonymous visitor.
    assert_eq!(joins(&w, "alice"), 1);
    // Lists per connection, each with its user; stats both ways.
    let list = match w.call(Command::Presence { channel: "room:p".into() }).await.unwrap() {
        ReplyBody::Presence { clients } => clients,
        other => panic!("{other:?}"),
    };
    let mut users: Vec<&str> = list.iter().map(|c| c.user.as_str()).collect();
    users.sort();
    assert_eq!(users, ["", "", "alice", "alice", "watcher"]);
    assert_eq!(stats(&mut w).await, (5, 4), "5 connections, 4 users (each anonymous one counts)");
    // Alice closes one tab: nothing announced; the other: leave after the grace.
    let mut tab2 = cs.remove(1);
    let now = tab2.now();
    tab2.session.disconnect(now);
    tab2.run_for(Duration::from_millis(20)).await;
    let mut tab1 = cs.remove(0);
    let closed = Instant::now();
    let now = tab1.now();
    tab1.session.disconnect(now);
    tab1.run_for(Duration::from_millis(20)).await;
    assert!(w.run_until(T, |c| leaves(c, "alice") == 1).await);
    assert!(closed.elapsed() >= Duration::from_millis(250), "leave only after the grace period");
    assert_eq!(leaves(&w, "alice"), 1, "one leave for two tabs");
    assert_eq!(stats(&mut w).await, (3, 3));
}
