//! Limits, namespace rules, slow consumers and history queries end to end.

mod common;

use std::time::Duration;

use common::*;
use ferry_core::client::Event;
use ferry_core::codec::Encoding;
use ferry_core::frame::*;
use ferry_core::{CloseCode, ErrorCode};
use ferry_server::config::Namespace;
use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::Message;

const T: Duration = Duration::from_secs(30);

fn noise(seed: u64, n: usize) -> Vec<u8> {
    let mut r = ferry_core::rng::Rng::new(seed);
    (0..n).map(|_| r.next_u64() as u8).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumer_is_disconnected_and_recovers_without_loss() {
    let mut cfg = test_config();
    cfg.limits.max_queued_bytes = 256 * 1024;
    let srv = TestServer::start(cfg).await;
    let mut slow = TestClient::new(&srv.url(), TestClient::config("slow", "s", Encoding::Binary));
    slow.subscribe("feed:x", Qos::AtLeastOnce).await;
    slow.connect().await;
    assert!(slow.run_until(T, |c| c.events.iter().any(|e| matches!(e, Event::Subscribed { .. }))).await);
    // The app freezes: it stops reading its socket.
    slow.paused = true;
    let mut publisher = TestClient::new(&srv.url(), TestClient::config("p", "p", Encoding::Binary));
    publisher.connect().await;
    let mut ids = Vec::new();
    for i in 0..400 {
        ids.push(publisher.publish("feed:x", noise(i, 30_000), Qos::AtLeastOnce).await);
        publisher.run_for(Duration::from_millis(1)).await;
    }
    assert!(publisher.run_until(T, |c| c.session.outbox_len() == 0).await);
    // It thaws, finds itself dropped as a slow consumer, reconnects and
    // recovers everything, in order, once.
    slow.paused = false;
    let thaw = std::time::Instant::now();
    slow.run_until(T, |c| c.events.iter().any(|e| matches!(e, Event::Disconnected { .. }))).await;
    eprintln!("thaw -> disconnected: {:?}, received {}", thaw.elapsed(), slow.ids("feed:x").len());
    assert!(
        slow.run_until(Duration::from_secs(60), |c| c.ids("feed:x").len() == ids.len()).await,
        "got {}; events {:?}",
        slow.ids("feed:x").len(),
        slow.events.iter().filter(|e| !matches!(e, Event::Publication(_))).collect::<Vec<_>>()
    );
    eprintln!("thaw -> complete: {:?}", thaw.elapsed());
    let codes: Vec<u16> = slow
        .events
        .iter()
        .filter_map(|e| if let Event::Disconnected { code, .. } = e { Some(*code) } else { None })
        .collect();
    eprintln!("disconnects: {codes:?}");
    assert_eq!(slow.ids("feed:x"), ids);
    let dropped = slow.events.iter().any(|e| {
        matches!(e, Event::Disconnected { code, reconnect: true, .. } if *code == CloseCode::SlowConsumer as u16 || *code == 1006)
    });
    assert!(
        dropped,
        "the server dropped the frozen connection: {:?}",
        slow.events.iter().filter(|e| matches!(e, Event::Disconnected { .. })).collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn history_by_offset_and_by_time() {
    let srv = TestServer::start(test_config()).await;
    let mut c = TestClient::new(&srv.url(), TestClient::config("h", "h", Encoding::Json));
    c.connect().await;
    let mut ids = Vec::new();
    for i in 0..10u8 {
        ids.push(c.publish("log:1", vec![i], Qos::AtLeastOnce).await);
        assert!(c.run_until(T, |c| c.acked.len() == ids.len()).await);
        // Distinct server times for the time-range query.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let hist = |since, until, limit, reverse| {
        Command::History(HistoryRequest { channel: "log:1".into(), since, until, limit, reverse })
    };
    let get = |r: ReplyBody| match r {
        ReplyBody::History { publications, top } => (publications, top),
        other => panic!("{other:?}"),
    };
    let (p, top) =
        get(c.call(hist(Some(HistoryBound::Offset(3)), Some(HistoryBound::Offset(6)), 100, false)).await.unwrap());
    assert_eq!(p.iter().map(|p| p.offset).collect::<Vec<_>>(), [3, 4, 5, 6]);
    assert_eq!(top.offset, 10);
    let (p, _) = get(c.call(hist(None, None, 3, true)).await.unwrap());
    assert_eq!(p.iter().map(|p| p.offset).collect::<Vec<_>>(), [10, 9, 8], "newest first");
    let (all, _) = get(c.call(hist(None, None, 100, false)).await.unwrap());
    let (t3, t7) = (all[2].time_ms, all[6].time_ms);
    let (p, _) =
        get(c.call(hist(Some(HistoryBound::TimeMs(t3)), Some(HistoryBound::TimeMs(t7)), 100, false)).await.unwrap());
    assert_eq!(p.first().map(|p| p.offset), Some(3));
    assert_eq!(p.last().map(|p| p.offset), Some(7));
    assert!(p.iter().all(|p| p.time_ms >= t3 && p.time_ms <= t7));
    let (p, top) = get(c.call(hist(None, None, 0, false)).await.unwrap());
    assert!(p.is_empty() && top.offset == 10);
}

#[tokio::test]
async fn namespace_rules_and_subscription_limits() {
    let mut cfg = test_config();
    cfg.limits.max_subscriptions = 3;
    cfg.namespaces.insert(
        "feed".into(),
        Namespace { client_publish: false, max_qos: 1, presence: false, ..Namespace::default() },
    );
    let srv = TestServer::start(cfg).await;
    let mut c = TestClient::new(&srv.url(), TestClient::config("n", "n", Encoding::Binary));
    c.connect().await;
    assert!(c.connected().await);
    // Backend-only namespace: clients may not publish.
    let now = c.now();
    let id = c.session.publish(now, "feed:a", b"x".to_vec(), Qos::AtLeastOnce).unwrap();
    assert!(
        c.run_until(T, |c| c
            .events
            .iter()
            .any(|e| matches!(e, Event::PublishFailed { message_id, .. } if *message_id == id)))
            .await
    );
    let err = c.events.iter().find_map(|e| match e {
        Event::PublishFailed { error: ferry_core::client::PublishError::Rejected(r), .. } => Some(r.code),
        _ => None,
    });
    assert_eq!(err, Some(ErrorCode::PermissionDenied as u16));
    // QoS is capped at the namespace maximum.
    c.subscribe("feed:a", Qos::ExactlyOnce).await;
    assert!(
        c.run_until(T, |c| c
            .events
            .iter()
            .any(|e| matches!(e, Event::Subscribed { channel, qos: Qos::AtLeastOnce, .. } if channel == "feed:a")))
            .await
    );
    // Presence off for the namespace.
    let r = c.call(Command::PresenceStats { channel: "feed:a".into() }).await;
    assert!(r.unwrap_err().contains("108"), "presence is off");
    // Bad channel names and the subscription limit.
    c.subscribe("bad name", Qos::AtMostOnce).await;
    c.subscribe("a:1", Qos::AtMostOnce).await;
    c.subscribe("a:2", Qos::AtMostOnce).await;
    c.subscribe("a:3", Qos::AtMostOnce).await;
    let failed = |c: &TestClient, ch: &str| {
        c.events.iter().find_map(|e| match e {
            Event::SubscribeFailed { channel, error } if channel == ch => Some(error.code),
            _ => None,
        })
    };
    assert!(c.run_until(T, |c| failed(c, "a:3").is_some() && failed(c, "bad name").is_some()).await);
    assert_eq!(failed(&c, "bad name"), Some(ErrorCode::UnknownChannel as u16));
    assert_eq!(failed(&c, "a:3"), Some(ErrorCode::LimitExceeded as u16));
}

#[tokio::test]
async fn handshake_deadline_closes_idle_sockets() {
    let mut cfg = test_config();
    cfg.limits.handshake_timeout_ms = 300;
    let srv = TestServer::start(cfg).await;
    let mut ws = raw_ws(&srv.url(), Encoding::Binary).await;
    let started = std::time::Instant::now();
    let code = loop {
        match tokio::time::timeout(T, ws.next()).await.unwrap() {
            Some(Ok(Message::Close(f))) => break f.map(|f| u16::from(f.code)),
            Some(Ok(_)) => continue,
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(code, Some(CloseCode::HandshakeTimeout as u16));
    assert!(started.elapsed() >= Duration::from_millis(290));
}

#[tokio::test]
async fn history_expires_by_age() {
    let mut cfg = test_config();
    cfg.namespaces.insert("tmp".into(), Namespace { history_ttl_secs: 1, ..Namespace::default() });
    let srv = TestServer::start(cfg).await;
    let mut c = TestClient::new(&srv.url(), TestClient::config("t", "t", Encoding::Binary));
    c.connect().await;
    for i in 0..3u8 {
        c.publish("tmp:x", vec![i], Qos::AtLeastOnce).await;
        c.publish("keep:x", vec![i], Qos::AtLeastOnce).await;
    }
    assert!(c.run_until(T, |c| c.acked.len() == 6).await);
    let count = |r: ReplyBody| match r {
        ReplyBody::History { publications, top } => (publications.len(), top.offset),
        other => panic!("{other:?}"),
    };
    let hist = |ch: &str| {
        Command::History(HistoryRequest { channel: ch.into(), since: None, until: None, limit: 10, reverse: false })
    };
    assert_eq!(count(c.call(hist("tmp:x")).await.unwrap()), (3, 3));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (n, top) = count(c.call(hist("tmp:x")).await.unwrap());
        if n == 0 {
            assert_eq!(top, 3, "offsets are kept when history expires");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "history never expired");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(count(c.call(hist("keep:x")).await.unwrap()), (3, 3), "other namespaces keep theirs");
    // A device that saw only the first message comes back: a gap is reported.
    let h = c.call(hist("tmp:x")).await.unwrap();
    let ReplyBody::History { top, .. } = h else { panic!() };
    let snapshot = saved_at("tmp:x", &top.epoch, 1);
    let mut back = TestClient::restore(&srv.url(), TestClient::config("late", "", Encoding::Json), snapshot);
    back.connect().await;
    assert!(back.run_until(T, |c| c.events.iter().any(|e| matches!(e, Event::Gap { .. }))).await);
    let gap = back.events.iter().find_map(|e| match e {
        Event::Gap { reason, to, .. } => Some((*reason, to.offset)),
        _ => None,
    });
    assert_eq!(gap, Some((ferry_core::client::GapReason::NotRetained, 3)));
}

#[tokio::test]
async fn rate_limits() {
    use ferry_core::codec;
    use futures_util::SinkExt;
    let mut cfg = test_config();
    cfg.limits.publish_rate = 5;
    cfg.limits.publish_burst = 5;
    cfg.limits.max_connections_per_user = 2;
    cfg.limits.connections_per_ip_per_minute = 6;
    let srv = TestServer::start(cfg).await;
    // Publish rate: a burst of 20 gets 5 through and 15 "too many requests".
    let mut ws = raw_ws(&srv.url(), Encoding::Json).await;
    let mut msg = Vec::new();
    let connect = Connect {
        version: PROTOCOL_VERSION,
        token: "rl".into(),
        device_id: "rl".into(),
        client: ClientVersion::default(),
        subs: vec![],
        compression: false,
    };
    codec::encode_into(Encoding::Json, &ClientFrame::Request { id: 1, cmd: Command::Connect(connect) }, &mut msg);
    ws.send(Message::Text(String::from_utf8(msg).unwrap().into())).await.unwrap();
    let mut msg = Vec::new();
    for i in 0..20u32 {
        let cmd = Command::Publish {
            channel: "rl:1".into(),
            message_id: format!("m{i}"),
            qos: Qos::AtLeastOnce,
            payload: Payload { z: false, data: Bytes(vec![1]) },
        };
        codec::encode_into(Encoding::Json, &ClientFrame::Request { id: 2 + i, cmd }, &mut msg);
    }
    ws.send(Message::Text(String::from_utf8(msg).unwrap().into())).await.unwrap();
    let (mut ok, mut limited) = (0, 0);
    while ok + limited < 20 {
        let Some(Ok(Message::Text(t))) = tokio::time::timeout(T, ws.next()).await.unwrap() else { panic!("closed") };
        for f in codec::decode_server(Encoding::Json, t.as_bytes(), 1 << 20).unwrap() {
            match f {
                ServerFrame::Reply { id, outcome: Outcome::Ok(ReplyBody::Published { .. }) } if id > 1 => ok += 1,
                ServerFrame::Reply { outcome: Outcome::Error(e), .. } => {
                    assert_eq!(e.code, ErrorCode::TooManyRequests as u16);
                    assert!(e.temporary, "the client retries it later");
                    limited += 1;
                }
                _ => {}
            }
        }
    }
    assert_eq!((ok, limited), (5, 15));
    // Connections per user: the third one is refused with 3505.
    let mut conns = Vec::new();
    for i in 0..3 {
        let mut c = TestClient::new(&srv.url(), TestClient::config(&format!("dev{i}"), "same-user", Encoding::Binary));
        c.connect().await;
        assert!(
            c.run_until(T, |c| c.session.is_connected()
                || !c.events.iter().all(|e| !matches!(e, Event::Disconnected { .. })))
                .await
        );
        conns.push(c);
    }
    assert!(conns[0].session.is_connected() && conns[1].session.is_connected());
    assert!(matches!(conns[2].session.state(), ferry_core::client::ConnectionState::Closed { code: 3505, .. }));
    // New connections per IP per minute: 1 raw + 3 clients so far; two more pass, then 429.
    let _a = raw_ws(&srv.url(), Encoding::Binary).await;
    let _b = raw_ws(&srv.url(), Encoding::Binary).await;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = srv.url().into_client_request().unwrap();
    req.headers_mut().insert("Sec-WebSocket-Protocol", "ferry.v1".parse().unwrap());
    let err = tokio_tungstenite::connect_async(req).await.unwrap_err().to_string();
    assert!(err.contains("429"), "{err}");
}

/// Regression: a full fan-out queue used to close live, acking subscribers
/// with 3003; now the dropped copies are fetched from the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_fanout_queue_drops_copies_not_subscribers() {
    let mut cfg = test_config();
    cfg.limits.fanout_queue = 2;
    let srv = TestServer::start(cfg).await;
    let mut clients = Vec::new();
    for i in 0..5 {
        let mut c =
            TestClient::new(&srv.url(), TestClient::config(&format!("s{i}"), &format!("s{i}"), Encoding::Binary));
        c.subscribe("burst:1", Qos::AtLeastOnce).await;
        c.connect().await;
        assert!(c.run_until(T, |c| c.events.iter().any(|e| matches!(e, Event::Subscribed { .. }))).await);
        clients.push(c);
    }
    let mut p = TestClient::new(&srv.url(), TestClient::config("p", "p", Encoding::Binary));
    p.connect().await;
    assert!(p.connected().await);
    let mut ids = Vec::new();
    for i in 0..500u32 {
        ids.push(p.publish("burst:1", i.to_be_bytes().to_vec(), Qos::AtLeastOnce).await);
    }
    clients.push(p);
    let ok = run_all(&mut clients, Duration::from_secs(60), |cs| {
        cs[5].session.outbox_len() == 0 && cs[..5].iter().all(|c| c.ids("burst:1").len() == 500)
    })
    .await;
    assert!(ok, "counts {:?}", clients[..5].iter().map(|c| c.ids("burst:1").len()).collect::<Vec<_>>());
    for c in &clients[..5] {
        assert_eq!(c.ids("burst:1"), ids);
        let drops: Vec<_> = c.events.iter().filter(|e| matches!(e, Event::Disconnected { .. })).collect();
        assert!(drops.is_empty(), "no subscriber was disconnected: {drops:?}");
    }
}

#[tokio::test]
async fn a_message_near_the_size_limit_is_read_whole() {
    // The server reads sockets in small chunks (its per-connection buffer
    // is small on purpose): a message of many chunks still arrives whole.
    let srv = TestServer::start(test_config()).await;
    let mut sub = TestClient::new(&srv.url(), TestClient::config("s", "s", Encoding::Binary));
    sub.subscribe("big:1", Qos::AtLeastOnce).await;
    sub.connect().await;
    assert!(sub.run_until(T, |c| c.events.iter().any(|e| matches!(e, Event::Subscribed { .. }))).await);
    let mut p = TestClient::new(&srv.url(), TestClient::config("p", "p", Encoding::Binary));
    p.connect().await;
    // Incompressible, so it stays this big on the wire.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let data: Vec<u8> = (0..60_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    p.publish("big:1", data.clone(), Qos::AtLeastOnce).await;
    assert!(p.run_until(T, |c| c.acked.len() == 1).await, "acked");
    assert!(sub.run_until(T, |c| c.received.get("big:1").is_some_and(|v| !v.is_empty())).await);
    assert_eq!(sub.received["big:1"][0].2, data);
}

/// Overload at QoS 0 (issue 15): a subscriber whose node-side queue
/// overflows (here a queue of 1 against a burst) is not disconnected: at
/// most once allows a drop, so it skips ahead to the live stream and the
/// drop is counted. Before, the session fetched from where it was, found
/// that position trimmed from a short history and closed 3004, so under
/// a sustained overload every QoS 0 subscriber was cut again and again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_qos0_subscriber_skips_ahead_and_stays_connected() {
    let mut cfg = test_config();
    cfg.limits.fanout_queue = 1;
    cfg.limits.publish_rate = 0;
    cfg.namespaces.insert("fast".into(), Namespace { history_size: 2, ..Namespace::default() });
    let srv = TestServer::start(cfg).await;
    let mut sub = TestClient::new(&srv.url(), TestClient::config("s", "s", Encoding::Binary));
    sub.subscribe("fast:x", Qos::AtMostOnce).await;
    sub.connect().await;
    assert!(sub.run_until(T, |c| c.events.iter().any(|e| matches!(e, Event::Subscribed { .. }))).await);
    let mut publisher = TestClient::new(&srv.url(), TestClient::config("p", "p", Encoding::Binary));
    publisher.connect().await;
    assert!(publisher.connected().await);
    // Bursts the fan-out queue of 1 cannot hold.
    for round in 0..20u8 {
        for i in 0..50u8 {
            publisher.publish("fast:x", vec![round, i], Qos::AtMostOnce).await;
        }
        publisher.run_for(Duration::from_millis(5)).await;
        sub.run_for(Duration::from_millis(5)).await;
    }
    let last = publisher.publish("fast:x", b"last".to_vec(), Qos::AtLeastOnce).await;
    assert!(publisher.run_until(T, |c| c.acked.contains_key(&last)).await, "the last publish is acknowledged");
    assert!(
        sub.run_until(T, |c| c.ids("fast:x").contains(&last)).await,
        "the subscriber gets the live stream; events {:?}",
        sub.events.iter().filter(|e| !matches!(e, Event::Publication(_))).collect::<Vec<_>>()
    );
    let disconnects: Vec<&Event> = sub.events.iter().filter(|e| matches!(e, Event::Disconnected { .. })).collect();
    assert!(disconnects.is_empty(), "never disconnected: {disconnects:?}");
    let got = sub.ids("fast:x").len();
    let dropped = metric(&srv, "ferry_qos0_dropped_total").await;
    println!("[qos0 overload] 1001 published, {got} delivered, {dropped} dropped (counted)");
    assert!(dropped > 0, "the burst overflowed the queue of 1");
    assert_eq!(got as u64 + dropped, 1001, "every publication delivered or counted");
}

/// The value of a counter in `/metrics` (its only series, whatever its
/// `node` label); panics if the server does not export it.
async fn metric(srv: &TestServer, name: &str) -> u64 {
    let m = http_get(srv.addr, "/metrics").await;
    m.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("{name} is exported"))
}

/// Overload with a QoS 1 subscriber that is behind: publishers are slowed
/// (111, temporary; the client retries) instead of the subscriber losing
/// its position. Before, the publishes went on, retention trimmed the
/// subscriber's position away and it was closed with 3004, losing what
/// it had not read yet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qos1_subscriber_that_is_behind_slows_publishers_instead_of_losing_its_position() {
    const N: usize = 200;
    let mut cfg = test_config();
    cfg.limits.fanout_queue = 1;
    cfg.limits.inflight_window = 8;
    cfg.limits.publish_rate = 0;
    cfg.namespaces.insert("slow".into(), Namespace { history_size: 40, ..Namespace::default() });
    let srv = TestServer::start(cfg).await;
    let mut sub = TestClient::new(&srv.url(), TestClient::config("s", "s", Encoding::Binary));
    sub.subscribe("slow:x", Qos::AtLeastOnce).await;
    sub.connect().await;
    assert!(sub.run_until(T, |c| c.events.iter().any(|e| matches!(e, Event::Subscribed { .. }))).await);
    let mut pcfg = TestClient::config("p", "p", Encoding::Binary);
    pcfg.retry_delay = Duration::from_millis(20);
    let mut publisher = TestClient::new(&srv.url(), pcfg);
    publisher.connect().await;
    assert!(publisher.connected().await);
    // A frozen app: the server fills its window of 8 and then it is behind.
    sub.paused = true;
    // In rounds of 5, each acknowledged before the next (backpressure acts
    // on what is committed), until the server starts refusing.
    let mut ids = Vec::new();
    let mut refusing = false;
    while ids.len() < N {
        let round = if refusing { N - ids.len() } else { 5 };
        for _ in 0..round {
            let i = ids.len();
            ids.push(publisher.publish("slow:x", format!("m{i}").into_bytes(), Qos::AtLeastOnce).await);
        }
        for _ in 0..300 {
            publisher.run_for(Duration::from_millis(10)).await;
            refusing = metric(&srv, "ferry_publish_backpressure_total").await > 0;
            if refusing || publisher.acked.len() == ids.len() {
                break;
            }
        }
    }
    let acked_while_frozen = publisher.acked.len();
    sub.paused = false;
    for _ in 0..3000 {
        publisher.run_for(Duration::from_millis(5)).await;
        sub.run_for(Duration::from_millis(5)).await;
        let gone = sub.events.iter().any(|e| matches!(e, Event::Disconnected { .. }));
        if gone || (publisher.acked.len() == N && sub.ids("slow:x").len() >= N) {
            break;
        }
    }
    let disconnects: Vec<&Event> = sub.events.iter().filter(|e| matches!(e, Event::Disconnected { .. })).collect();
    let refused = metric(&srv, "ferry_publish_backpressure_total").await;
    println!(
        "[backpressure] {acked_while_frozen} of {N} acknowledged while the subscriber was frozen, {refused} refusals"
    );
    assert!(disconnects.is_empty(), "the subscriber stays connected: {disconnects:?}");
    assert!(refused > 0, "publishes were refused while the subscriber was behind");
    assert!(acked_while_frozen < N, "the publisher was held back");
    assert_eq!(publisher.acked.len(), N, "every publish is acknowledged in the end (retried)");
    // Every publication once, in stream order. A publish retried after a
    // refusal is stored after those that passed meanwhile (PROTOCOL.md
    // 7.5), so the set is compared, not the publisher's order.
    let mut got = sub.ids("slow:x");
    assert_eq!(got.len(), N, "no duplicate, nothing missing");
    got.sort();
    ids.sort();
    assert_eq!(got, ids, "every publication once");
    let offsets = sub.offsets("slow:x");
    assert_eq!(offsets, (1..=N as u64).collect::<Vec<_>>(), "the stream in offset order, no gap");
}
