//! End-to-end tests: the real server on an ephemeral loopback port, real
//! WebSocket clients driving the core's ClientSession.

mod common;

use std::time::Duration;

use common::*;
use ferry_core::codec::{self, Encoding};
use ferry_core::frame::*;
use ferry_core::CloseCode;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

const T: Duration = Duration::from_secs(20);

#[tokio::test]
async fn healthz_and_subprotocol_required() {
    let srv = TestServer::start(test_config()).await;
    let r = http_get(srv.addr, "/healthz").await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    // A WebSocket upgrade without a Ferry subprotocol is refused with a reason.
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let req = srv.url().into_client_request().unwrap();
    let err = tokio_tungstenite::connect_async(req).await.unwrap_err();
    assert!(err.to_string().contains("400"), "{err}");
}

async fn send_json(ws: &mut Ws, frames: &[ClientFrame]) {
    let mut msg = Vec::new();
    for f in frames {
        codec::encode_into(Encoding::Json, f, &mut msg);
    }
    ws.send(Message::Text(String::from_utf8(msg).unwrap().into())).await.unwrap();
}

/// Next server frames that are not pings.
async fn recv_json(ws: &mut Ws) -> Vec<ServerFrame> {
    loop {
        let m = tokio::time::timeout(T, ws.next()).await.expect("server answered").expect("open").expect("ok");
        match m {
            Message::Text(t) => {
                let frames = codec::decode_server(Encoding::Json, t.as_bytes(), 1 << 20).unwrap();
                let frames: Vec<_> = frames.into_iter().filter(|f| *f != ServerFrame::Push(Push::Ping)).collect();
                if !frames.is_empty() {
                    return frames;
                }
            }
            Message::Close(f) => panic!("closed: {f:?}"),
            _ => {}
        }
    }
}

fn connect_frame(id: u32, token: &str) -> ClientFrame {
    ClientFrame::Request {
        id,
        cmd: Command::Connect(Connect {
            version: PROTOCOL_VERSION,
            token: token.into(),
            device_id: "raw".into(),
            client: ClientVersion { name: "raw".into(), version: "0".into() },
            subs: vec![],
            compression: true,
        }),
    }
}

fn publish_frame(id: u32, ch: &str, mid: &str, qos: Qos, data: &[u8]) -> ClientFrame {
    ClientFrame::Request {
        id,
        cmd: Command::Publish {
            channel: ch.into(),
            message_id: mid.into(),
            qos,
            payload: Payload { z: false, data: Bytes(data.to_vec()) },
        },
    }
}

#[tokio::test]
async fn plain_json_websocket_speaks_ferry_and_duplicates_are_stored_once() {
    let srv = TestServer::start(test_config()).await;
    let mut ws = raw_ws(&srv.url(), Encoding::Json).await;
    send_json(&mut ws, &[connect_frame(1, "alice")]).await;
    let f = recv_json(&mut ws).await;
    assert!(matches!(&f[0], ServerFrame::Reply { id: 1, outcome: Outcome::Ok(ReplyBody::Connected(_)) }), "{f:?}");
    // The same message id three times, across two frames.
    send_json(
        &mut ws,
        &[
            publish_frame(2, "chat:1", "m-1", Qos::ExactlyOnce, b"hello"),
            publish_frame(3, "chat:1", "m-1", Qos::ExactlyOnce, b"hello"),
        ],
    )
    .await;
    let mut replies = Vec::new();
    while replies.len() < 2 {
        for f in recv_json(&mut ws).await {
            if let ServerFrame::Reply { id, outcome: Outcome::Ok(ReplyBody::Published { offset, duplicate, .. }) } = f {
                replies.push((id, offset, duplicate));
            }
        }
    }
    replies.sort();
    assert_eq!(replies, vec![(2, 1, false), (3, 1, true)]);
    send_json(&mut ws, &[publish_frame(4, "chat:1", "m-1", Qos::ExactlyOnce, b"hello")]).await;
    let f = recv_json(&mut ws).await;
    assert!(
        matches!(
            &f[0],
            ServerFrame::Reply { id: 4, outcome: Outcome::Ok(ReplyBody::Published { offset: 1, duplicate: true, .. }) }
        ),
        "{f:?}"
    );
    // History holds it once.
    let h = ClientFrame::Request {
        id: 5,
        cmd: Command::History(HistoryRequest {
            channel: "chat:1".into(),
            since: None,
            until: None,
            limit: 100,
            reverse: false,
        }),
    };
    send_json(&mut ws, &[h]).await;
    let f = recv_json(&mut ws).await;
    match &f[0] {
        ServerFrame::Reply { id: 5, outcome: Outcome::Ok(ReplyBody::History { publications, top }) } => {
            assert_eq!(publications.len(), 1);
            assert_eq!(publications[0].payload.data.0, b"hello");
            assert_eq!(top.offset, 1);
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn fan_out_to_many_subscribers_in_order() {
    let srv = TestServer::start(test_config()).await;
    let mut clients = Vec::new();
    for i in 0..20 {
        let enc = if i % 2 == 0 { Encoding::Binary } else { Encoding::Json };
        let qos = [Qos::AtMostOnce, Qos::AtLeastOnce, Qos::ExactlyOnce][i % 3];
        let mut c = TestClient::new(&srv.url(), TestClient::config(&format!("sub{i}"), &format!("user{i}"), enc));
        c.subscribe("room:fan", qos).await;
        c.connect().await;
        assert!(c.connected().await);
        clients.push(c);
    }
    // Everyone's subscription is live before anything is published.
    assert!(
        run_all(&mut clients, T, |cs| cs
            .iter()
            .all(|c| c.events.iter().any(|e| matches!(e, ferry_core::client::Event::Subscribed { .. }))))
        .await
    );
    let mut publisher = TestClient::new(&srv.url(), TestClient::config("pub", "boss", Encoding::Binary));
    publisher.connect().await;
    assert!(publisher.connected().await);
    const N: usize = 300;
    let mut ids = Vec::new();
    for i in 0..N {
        // Mixed sizes: some above the compression threshold.
        let data = if i % 10 == 0 { vec![b'z'; 4000] } else { format!("msg {i}").into_bytes() };
        ids.push(publisher.publish("room:fan", data, Qos::AtLeastOnce).await);
    }
    clients.push(publisher);
    let ok = run_all(&mut clients, Duration::from_secs(60), |cs| {
        cs[20].session.outbox_len() == 0 && cs[..20].iter().all(|c| c.ids("room:fan").len() == N)
    })
    .await;
    let counts: Vec<usize> = clients[..20].iter().map(|c| c.ids("room:fan").len()).collect();
    assert!(ok, "received counts {counts:?}, publisher outbox {}", clients[20].session.outbox_len());
    for c in &clients[..20] {
        assert_eq!(c.ids("room:fan"), ids, "every subscriber sees the same order");
        assert_eq!(c.offsets("room:fan"), (1..=N as u64).collect::<Vec<_>>());
        let big = &c.received["room:fan"][0].2;
        assert_eq!(big, &vec![b'z'; 4000], "compressed payloads arrive intact");
    }
}

#[tokio::test]
async fn qos1_publish_is_acknowledged_after_commit_and_survives_restart() {
    let srv = TestServer::start(test_config()).await;
    let mut p = TestClient::new(&srv.url(), TestClient::config("p", "u", Encoding::Binary));
    p.connect().await;
    let mut ids = Vec::new();
    for i in 0..50u8 {
        ids.push(p.publish("news:a", vec![i], Qos::AtLeastOnce).await);
    }
    assert!(p.run_until(T, |c| c.acked.len() == 50).await);
    let epoch = p.acked[&ids[0]].epoch.clone();
    // Acknowledged means committed: a restart from the same directory has them.
    let dir = srv.stop().await;
    let srv = TestServer::start_in(test_config(), dir).await;
    let mut q = TestClient::new(&srv.url(), TestClient::config("q", "u2", Encoding::Json));
    q.connect().await;
    assert!(q.connected().await);
    let h = q
        .call(Command::History(HistoryRequest {
            channel: "news:a".into(),
            since: None,
            until: None,
            limit: 100,
            reverse: false,
        }))
        .await
        .unwrap();
    let ReplyBody::History { publications, top } = h else { panic!() };
    assert_eq!(top, StreamPosition { epoch: epoch.clone(), offset: 50 });
    assert_eq!(publications.iter().map(|p| p.message_id.clone()).collect::<Vec<_>>(), ids);
    // Offsets continue in the same epoch.
    let id = q.publish("news:a", b"next".to_vec(), Qos::AtLeastOnce).await;
    assert!(q.run_until(T, |c| c.acked.contains_key(&id)).await);
    assert_eq!(q.acked[&id], StreamPosition { epoch, offset: 51 });
}

#[tokio::test]
async fn limits_give_documented_codes() {
    let mut cfg = test_config();
    cfg.limits.max_message_size = 4096;
    cfg.limits.max_frame_size = 4096;
    let srv = TestServer::start(cfg).await;
    // A decompression bomb that fits the message limit; the server must
    // refuse it without inflating more than the limit.
    let bomb = miniz_bomb();
    assert!(bomb.len() < 3500);
    let mut ws = raw_ws(&srv.url(), Encoding::Binary).await;
    let send_bin = |frames: Vec<ClientFrame>| {
        let mut msg = Vec::new();
        for f in &frames {
            codec::encode_into(Encoding::Binary, f, &mut msg);
        }
        Message::Binary(msg.into())
    };
    ws.send(send_bin(vec![connect_frame(1, "x")])).await.unwrap();
    let _ = ws.next().await;
    let bomb_frame = ClientFrame::Request {
        id: 2,
        cmd: Command::Publish {
            channel: "c:1".into(),
            message_id: "b".into(),
            qos: Qos::AtLeastOnce,
            payload: Payload { z: true, data: Bytes(bomb) },
        },
    };
    ws.send(send_bin(vec![bomb_frame])).await.unwrap();
    let reply = loop {
        let Some(Ok(Message::Binary(b))) = ws.next().await else { panic!("closed") };
        let frames = codec::decode_server(Encoding::Binary, &b, 1 << 20).unwrap();
        if let Some(ServerFrame::Reply { id: 2, outcome }) =
            frames.into_iter().find(|f| matches!(f, ServerFrame::Reply { .. }))
        {
            break outcome;
        }
    };
    assert!(
        matches!(reply, Outcome::Error(ref e) if e.code == ferry_core::ErrorCode::MessageTooLarge as u16),
        "{reply:?}"
    );
    // An oversized message closes with 3502.
    ws.send(Message::Binary(vec![0u8; 10_000].into())).await.unwrap();
    let code = loop {
        match ws.next().await {
            Some(Ok(Message::Close(f))) => break f.map(|f| u16::from(f.code)),
            Some(Ok(_)) => continue,
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(code, Some(CloseCode::MessageTooLarge as u16));
    // Garbage closes with 3501.
    let mut ws = raw_ws(&srv.url(), Encoding::Json).await;
    ws.send(Message::Text("{\"nonsense\":1}".into())).await.unwrap();
    let code = loop {
        match ws.next().await {
            Some(Ok(Message::Close(f))) => break f.map(|f| u16::from(f.code)),
            Some(Ok(_)) => continue,
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(code, Some(CloseCode::ProtocolViolation as u16));
}

fn miniz_bomb() -> Vec<u8> {
    // Raw deflate of 3 MiB of zeros: about 3 KiB, inflating 750 times past the limit.
    let zeros = vec![0u8; 3 << 20];
    ferry_core::compress::pack(zeros, Some(1)).data.0
}

#[tokio::test]
async fn shutdown_tells_clients_to_reconnect() {
    let srv = TestServer::start(test_config()).await;
    let mut c = TestClient::new(&srv.url(), TestClient::config("s", "s", Encoding::Json));
    c.connect().await;
    assert!(c.connected().await);
    let stopping = tokio::spawn(srv.stop());
    assert!(
        c.run_until(T, |c| c.events.iter().any(|e| matches!(e, ferry_core::client::Event::Disconnected { .. }))).await
    );
    let d = c.events.iter().find_map(|e| match e {
        ferry_core::client::Event::Disconnected { code, reconnect, .. } => Some((*code, *reconnect)),
        _ => None,
    });
    assert_eq!(d, Some((CloseCode::Shutdown as u16, true)));
    let _ = stopping.await;
}

#[tokio::test]
async fn origin_allow_list() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut cfg = test_config();
    cfg.allowed_origins = vec!["https://app.example".into()];
    let srv = TestServer::start(cfg).await;
    let attempt = |origin: Option<&'static str>| {
        let url = srv.url();
        async move {
            let mut req = url.into_client_request().unwrap();
            req.headers_mut().insert("Sec-WebSocket-Protocol", "ferry.v1".parse().unwrap());
            if let Some(o) = origin {
                req.headers_mut().insert("Origin", o.parse().unwrap());
            }
            tokio_tungstenite::connect_async(req).await.map(|_| ()).map_err(|e| e.to_string())
        }
    };
    let err = attempt(Some("https://evil.example")).await.unwrap_err();
    assert!(err.contains("403"), "{err}");
    assert!(attempt(Some("https://app.example")).await.is_ok());
    assert!(attempt(None).await.is_ok(), "non-browser clients send no Origin");
}

#[tokio::test]
async fn metrics_and_readiness() {
    let srv = TestServer::start(test_config()).await;
    assert!(http_get(srv.addr, "/readyz").await.starts_with("HTTP/1.1 200"));
    let mut c = TestClient::new(&srv.url(), TestClient::config("m", "m", Encoding::Binary));
    c.subscribe("m:1", Qos::AtLeastOnce).await;
    c.connect().await;
    assert!(
        c.run_until(T, |c| c.events.iter().any(|e| matches!(e, ferry_core::client::Event::Subscribed { .. }))).await
    );
    c.publish("m:1", b"x".to_vec(), Qos::AtLeastOnce).await;
    assert!(c.run_until(T, |c| c.received.get("m:1").is_some_and(|v| v.len() == 1)).await);
    c.run_for(Duration::from_millis(100)).await;
    let m = without_node_label(&http_get(srv.addr, "/metrics").await);
    let value = |name: &str| -> f64 {
        m.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing in\n{m}"))
    };
    assert_eq!(value("ferry_connections"), 1.0);
    assert_eq!(value("ferry_subscriptions"), 1.0);
    assert_eq!(value("ferry_publications_stored_total"), 1.0);
    assert_eq!(value("ferry_deliveries_total{qos=\"1\"}"), 1.0);
    assert_eq!(value("ferry_acks_pending"), 0.0, "the client acked");
    assert!(value("ferry_store_commit_seconds_count") >= 1.0);
    assert!(value("ferry_bytes_in_total") > 0.0 && value("ferry_bytes_out_total") > 0.0);
}

/// Send one message of frames and collect the outcome of each request id
/// in it (bounded by the server's answering within `T` per message).
async fn outcomes(ws: &mut Ws, frames: &[ClientFrame]) -> std::collections::BTreeMap<u32, Outcome> {
    let want: Vec<u32> = frames
        .iter()
        .filter_map(|f| match f {
            ClientFrame::Request { id, .. } => Some(*id),
            _ => None,
        })
        .collect();
    send_json(ws, frames).await;
    let mut got = std::collections::BTreeMap::new();
    while got.len() < want.len() {
        for f in recv_json(ws).await {
            if let ServerFrame::Reply { id, outcome } = f {
                got.insert(id, outcome);
            }
        }
    }
    got
}

fn history_frame(id: u32, ch: &str) -> ClientFrame {
    ClientFrame::Request {
        id,
        cmd: Command::History(HistoryRequest {
            channel: ch.into(),
            since: None,
            until: None,
            limit: 100,
            reverse: false,
        }),
    }
}

fn stored(o: &Outcome) -> Option<(u64, bool)> {
    match o {
        Outcome::Ok(ReplyBody::Published { offset, duplicate, .. }) => Some((*offset, *duplicate)),
        _ => None,
    }
}

fn error_code(o: &Outcome) -> Option<u16> {
    match o {
        Outcome::Error(e) => Some(e.code),
        _ => None,
    }
}

fn history_len(o: &Outcome) -> usize {
    match o {
        Outcome::Ok(ReplyBody::History { publications, .. }) => publications.len(),
        other => panic!("history: {other:?}"),
    }
}

#[tokio::test]
async fn a_message_id_reused_on_another_channel_or_with_other_data_is_refused_not_silently_deduplicated() {
    let srv = TestServer::start(test_config()).await;
    let mut ws = raw_ws(&srv.url(), Encoding::Json).await;
    send_json(&mut ws, &[connect_frame(1, "alice")]).await;
    recv_json(&mut ws).await;
    let r = outcomes(&mut ws, &[publish_frame(2, "news:a", "m-1", Qos::AtLeastOnce, b"x")]).await;
    assert_eq!(stored(&r[&2]), Some((1, false)));
    // The same id on another channel: refused with 107, nothing stored there.
    let r = outcomes(&mut ws, &[publish_frame(3, "news:b", "m-1", Qos::AtLeastOnce, b"x")]).await;
    assert_eq!(error_code(&r[&3]), Some(107), "{:?}", r[&3]);
    // A true retry (same channel, same data) is still a duplicate.
    let r = outcomes(&mut ws, &[publish_frame(4, "news:a", "m-1", Qos::AtLeastOnce, b"x")]).await;
    assert_eq!(stored(&r[&4]), Some((1, true)));
    // The same id and channel with other data, at QoS 2: refused.
    let r = outcomes(&mut ws, &[publish_frame(5, "news:a", "m-1", Qos::ExactlyOnce, b"y")]).await;
    assert_eq!(error_code(&r[&5]), Some(107), "{:?}", r[&5]);
    // Inside one batch the same rules hold (the sequencer's in-batch table).
    let r = outcomes(
        &mut ws,
        &[
            publish_frame(6, "news:c", "m-2", Qos::ExactlyOnce, b"p"),
            publish_frame(7, "news:d", "m-2", Qos::ExactlyOnce, b"p"),
            publish_frame(8, "news:c", "m-2", Qos::ExactlyOnce, b"q"),
            publish_frame(9, "news:c", "m-2", Qos::ExactlyOnce, b"p"),
        ],
    )
    .await;
    assert_eq!(stored(&r[&6]), Some((1, false)));
    assert_eq!(error_code(&r[&7]), Some(107), "{:?}", r[&7]);
    assert_eq!(error_code(&r[&8]), Some(107), "{:?}", r[&8]);
    assert_eq!(stored(&r[&9]), Some((1, true)));
    let h = outcomes(&mut ws, &[history_frame(10, "news:a"), history_frame(11, "news:b"), history_frame(12, "news:d")])
        .await;
    assert_eq!((history_len(&h[&10]), history_len(&h[&11]), history_len(&h[&12])), (1, 0, 0));
    // The rule survives a restart: digests are stored with the ids.
    let dir = srv.stop().await;
    let srv = TestServer::start_in(test_config(), dir).await;
    let mut ws = raw_ws(&srv.url(), Encoding::Json).await;
    send_json(&mut ws, &[connect_frame(1, "alice")]).await;
    recv_json(&mut ws).await;
    let r = outcomes(
        &mut ws,
        &[
            publish_frame(2, "news:a", "m-1", Qos::AtLeastOnce, b"x"),
            publish_frame(3, "news:a", "m-2", Qos::AtLeastOnce, b"p"),
        ],
    )
    .await;
    assert_eq!(stored(&r[&2]), Some((1, true)));
    assert_eq!(error_code(&r[&3]), Some(107), "{:?}", r[&3]);
}

#[tokio::test]
async fn clients_cannot_publish_into_personal_channels_unless_the_namespace_allows_it() {
    let srv = TestServer::start(test_config()).await;
    let mut bob = raw_ws(&srv.url(), Encoding::Json).await;
    send_json(&mut bob, &[connect_frame(1, "bob")]).await;
    recv_json(&mut bob).await;
    let mut mallory = raw_ws(&srv.url(), Encoding::Json).await;
    send_json(&mut mallory, &[connect_frame(1, "mallory")]).await;
    recv_json(&mut mallory).await;
    for (id, ch) in [(2, "#user:bob"), (3, "#user:mallory")] {
        let r = outcomes(&mut mallory, &[publish_frame(id, ch, &format!("inject-{id}"), Qos::AtLeastOnce, b"x")]).await;
        assert_eq!(error_code(&r[&id]), Some(103), "{ch}: {:?}", r[&id]);
    }
    let h = outcomes(&mut bob, &[history_frame(2, "#user:bob")]).await;
    assert_eq!(history_len(&h[&2]), 0, "nothing reached bob's inbox");
    drop(srv);

    // Allowed explicitly: delivered, and it says who sent it.
    let mut cfg = test_config();
    cfg.namespaces
        .insert("user".into(), ferry_server::config::Namespace { personal_publish: true, ..Default::default() });
    let srv = TestServer::start(cfg).await;
    let mut bob = raw_ws(&srv.url(), Encoding::Json).await;
    send_json(&mut bob, &[connect_frame(1, "bob")]).await;
    recv_json(&mut bob).await;
    let sub = ClientFrame::Request {
        id: 2,
        cmd: Command::Subscribe(SubscribeRequest {
            channel: "#user:bob".into(),
            qos: Qos::AtMostOnce,
            since: None,
            token: String::new(),
        }),
    };
    outcomes(&mut bob, &[sub]).await;
    let mut mallory = raw_ws(&srv.url(), Encoding::Json).await;
    send_json(&mut mallory, &[connect_frame(1, "mallory")]).await;
    recv_json(&mut mallory).await;
    let r = outcomes(&mut mallory, &[publish_frame(2, "#user:bob", "dm-1", Qos::AtLeastOnce, b"hi bob")]).await;
    assert_eq!(stored(&r[&2]), Some((1, false)));
    let p = loop {
        if let Some(p) = recv_json(&mut bob).await.into_iter().find_map(|f| match f {
            ServerFrame::Push(Push::Publication(p)) => Some(p),
            _ => None,
        }) {
            break p;
        }
    };
    assert_eq!(p.payload.data.0, b"hi bob");
    assert_eq!(p.publisher.map(|c| c.user).as_deref(), Some("mallory"), "the verified publisher");
}

#[tokio::test]
async fn a_client_whose_message_ids_collide_with_stored_ones_is_told_instead_of_losing_its_publish() {
    use ferry_core::client::{Event, PublishError};
    let srv = TestServer::start(test_config()).await;
    // Two sessions with the same device id and seed generate the same ids
    // (an app that wiped its storage and seeds its RNG the same way).
    let cfg = || TestClient::config("phone", "alice", Encoding::Json);
    let mut first = TestClient::new_seeded(&srv.url(), cfg(), 7);
    first.connect().await;
    let id = first.publish("notes:1", b"first".to_vec(), Qos::AtLeastOnce).await;
    assert!(first.run_until(T, |c| c.events.iter().any(|e| matches!(e, Event::PublishAcked { .. }))).await);
    drop(first);
    let mut second = TestClient::new_seeded(&srv.url(), cfg(), 7);
    second.connect().await;
    let again = second.publish("notes:1", b"second".to_vec(), Qos::AtLeastOnce).await;
    assert_eq!(again, id, "the ids collide");
    let done =
        |c: &TestClient| c.events.iter().any(|e| matches!(e, Event::PublishAcked { .. } | Event::PublishFailed { .. }));
    assert!(second.run_until(T, done).await);
    let failed = second.events.iter().find_map(|e| match e {
        Event::PublishFailed { error: PublishError::Rejected(r), .. } => Some(r.clone()),
        _ => None,
    });
    let r = failed.unwrap_or_else(|| panic!("the publish must fail, not pass as a duplicate: {:?}", second.events));
    assert_eq!(r.code, 107);
    assert!(r.message.starts_with(ferry_core::MESSAGE_ID_REUSED), "{r:?}");
}
