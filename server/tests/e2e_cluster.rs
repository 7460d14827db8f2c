//! Several Ferry nodes on one real `redis-server` (docs/CLUSTER.md): real
//! servers on ephemeral loopback ports, real WebSocket clients, the backend
//! API on every node. Figures print with `--nocapture`.

mod common;

use std::time::{Duration, Instant};

use common::*;
use ferry_core::client::Event;
use ferry_core::codec::Encoding;
use ferry_core::frame::Qos;
use serde_json::json;

const T: Duration = Duration::from_secs(30);

fn on_redis(redis: &Redis) -> ferry_server::config::Config {
    let mut cfg = test_config();
    cfg.redis.urls = vec![redis.url()];
    // These tests are about the engine, not admission control.
    cfg.limits.publish_rate = 0;
    cfg
}

fn subscribed(c: &TestClient) -> bool {
    c.events.iter().any(|e| matches!(e, Event::Subscribed { .. }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publications_reach_subscribers_on_every_node_once_in_order() {
    let redis = Redis::start(&[]);
    let nodes = [
        TestServer::start_with_api(on_redis(&redis)).await,
        TestServer::start_with_api(on_redis(&redis)).await,
        TestServer::start_with_api(on_redis(&redis)).await,
    ];
    // One subscriber per node, every QoS; publishers on two other nodes.
    let mut subs: Vec<TestClient> = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        for (q, qos) in [Qos::AtMostOnce, Qos::AtLeastOnce, Qos::ExactlyOnce].into_iter().enumerate() {
            let mut c = TestClient::new(
                &n.url(),
                TestClient::config(&format!("s{i}{q}"), &format!("sub{i}{q}"), Encoding::Binary),
            );
            c.subscribe("room:1", qos).await;
            c.connect().await;
            subs.push(c);
        }
    }
    assert!(run_all(&mut subs, T, |cs| cs.iter().all(subscribed)).await);
    let mut p0 = TestClient::new(&nodes[0].url(), TestClient::config("p0", "pub0", Encoding::Json));
    let mut p1 = TestClient::new(&nodes[1].url(), TestClient::config("p1", "pub1", Encoding::Binary));
    p0.connect().await;
    p1.connect().await;
    const N: usize = 150;
    let t0 = Instant::now();
    let mut want = Vec::new();
    for i in 0..N {
        let qos = [Qos::AtLeastOnce, Qos::ExactlyOnce][i % 2];
        let data = format!("m{i}").into_bytes();
        // Each publisher waits for its ack before the next, so the stream
        // order is the order of this loop.
        let p = if i % 3 == 0 { &mut p1 } else { &mut p0 };
        let id = p.publish("room:1", data.clone(), qos).await;
        assert!(p.run_until(T, |c| c.session.outbox_len() == 0).await, "publish {i} acked");
        want.push((id, data));
    }
    // And from the backend API of the third node.
    let api = nodes[2].api.unwrap();
    let (s, r) =
        http(api, "POST", "/api/publish", Some(&json!({"channel": "room:1", "data": "from the api"})), None).await;
    assert_eq!(s, 200, "{r}");
    let total = N + 1;
    let all = |c: &TestClient| c.received.get("room:1").is_some_and(|v| v.len() >= total);
    assert!(
        run_all(&mut subs, T, |cs| cs.iter().all(all)).await,
        "counts: {:?}",
        subs.iter().map(|c| c.received.get("room:1").map_or(0, Vec::len)).collect::<Vec<_>>()
    );
    let took = t0.elapsed();
    for c in &subs {
        let got = &c.received["room:1"];
        let offsets: Vec<u64> = got.iter().map(|(o, _, _)| *o).collect();
        assert_eq!(offsets, (1..=total as u64).collect::<Vec<_>>(), "once each, in order");
        for (k, (id, data)) in want.iter().enumerate() {
            assert_eq!((&got[k].1, &got[k].2), (id, data));
        }
        assert_eq!(got[N].2, b"\"from the api\"");
    }
    println!(
        "[cluster] 3 nodes on one Redis: {total} publications (2 publisher nodes + API on a third) reached {} subscribers \
         (QoS 0/1/2 on every node) once, in order, in {took:.2?}",
        subs.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotent_api_publish_retried_on_every_node_is_stored_once() {
    let redis = Redis::start(&[]);
    let nodes = [
        TestServer::start_with_api(on_redis(&redis)).await,
        TestServer::start_with_api(on_redis(&redis)).await,
        TestServer::start_with_api(on_redis(&redis)).await,
    ];
    let mut watcher = TestClient::new(&nodes[1].url(), TestClient::config("w", "w", Encoding::Json));
    watcher.subscribe("orders:9", Qos::ExactlyOnce).await;
    watcher.connect().await;
    assert!(watcher.run_until(T, subscribed).await);
    let body = json!({"channel": "orders:9", "data": {"order": 9}, "idempotency_key": "order-9", "qos": 2});
    let mut offsets = Vec::new();
    for i in 0..10 {
        let (s, r) = http(nodes[i % 3].api.unwrap(), "POST", "/api/publish", Some(&body), None).await;
        assert_eq!(s, 200, "try {i}: {r}");
        offsets.push(r["offset"].as_u64().unwrap());
    }
    assert_eq!(offsets, vec![1; 10], "every retry answers the first offset");
    // The same key with other data, on another node: refused.
    let other = json!({"channel": "orders:9", "data": {"order": 10}, "idempotency_key": "order-9"});
    let (s, r) = http(nodes[2].api.unwrap(), "POST", "/api/publish", Some(&other), None).await;
    assert_eq!(s, 409, "{r}");
    for n in &nodes {
        let (_, h) = http(n.api.unwrap(), "POST", "/api/history", Some(&json!({"channel": "orders:9"})), None).await;
        assert_eq!(h["publications"].as_array().map(Vec::len), Some(1), "stored once: {h}");
    }
    assert!(watcher.run_until(T, |c| c.received.get("orders:9").is_some_and(|v| !v.is_empty())).await);
    watcher.run_for(Duration::from_millis(200)).await;
    assert_eq!(watcher.received["orders:9"].len(), 1, "delivered once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_device_catches_up_on_another_node_from_its_cursor() {
    let redis = Redis::start(&[]);
    let a = TestServer::start_with_api(on_redis(&redis)).await;
    let b = TestServer::start_with_api(on_redis(&redis)).await;
    let mut dev = TestClient::new(&a.url(), TestClient::config("phone-1", "u42", Encoding::Binary));
    dev.subscribe("im:team", Qos::ExactlyOnce).await;
    dev.connect().await;
    assert!(dev.run_until(T, subscribed).await);
    let (s, _) =
        http(a.api.unwrap(), "POST", "/api/publish", Some(&json!({"channel": "im:team", "data": 0})), None).await;
    assert_eq!(s, 200);
    assert!(dev.run_until(T, |c| c.received.get("im:team").is_some_and(|v| v.len() == 1)).await);
    // Acks travel with the next frames; give the cursor time to be written
    // before the app goes away (the cursor writer runs in ack order).
    dev.run_for(Duration::from_millis(300)).await;
    dev.drop_socket();
    drop(dev);
    const N: u64 = 1000;
    let items: Vec<_> =
        (1..=N).map(|i| json!({"method": "publish", "params": {"channel": "im:team", "data": i}})).collect();
    for chunk in items.chunks(250) {
        let (s, r) = http(b.api.unwrap(), "POST", "/api/batch", Some(&json!({"commands": chunk})), None).await;
        assert_eq!(s, 200, "{r}");
        assert!(r["replies"].as_array().unwrap().iter().all(|x| x.get("result").is_some()), "{r}");
    }
    // A fresh process on the same device, on the other node.
    let t0 = Instant::now();
    let mut dev = TestClient::new(&b.url(), TestClient::config("phone-1", "u42", Encoding::Binary));
    dev.subscribe("im:team", Qos::ExactlyOnce).await;
    dev.connect().await;
    assert!(
        dev.run_until(T, |c| c.received.get("im:team").is_some_and(|v| v.len() as u64 >= N)).await,
        "got {}",
        dev.received.get("im:team").map_or(0, Vec::len)
    );
    dev.run_for(Duration::from_millis(200)).await;
    let offsets: Vec<u64> = dev.received["im:team"].iter().map(|(o, _, _)| *o).collect();
    assert_eq!(offsets, (2..=N + 1).collect::<Vec<_>>(), "everything missed, once, in order, nothing seen before");
    println!("[cluster] offline device: {N} missed publications caught up on another node in {:.2?}", t0.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_means_temporary_errors_then_service_resumes_with_a_visible_gap() {
    let port = free_port();
    let redis = Redis::start_on(port, &[]);
    let node = TestServer::start_with_api(on_redis(&redis)).await;
    let api = node.api.unwrap();
    let mut c = TestClient::new(&node.url(), TestClient::config("d", "u1", Encoding::Json));
    c.subscribe("feed:1", Qos::AtLeastOnce).await;
    c.connect().await;
    assert!(c.run_until(T, subscribed).await);
    let publish = |i: u64| json!({"channel": "feed:1", "data": i});
    let (s, _) = http(api, "POST", "/api/publish", Some(&publish(1)), None).await;
    assert_eq!(s, 200);
    assert!(c.run_until(T, |c| c.received.get("feed:1").is_some_and(|v| v.len() == 1)).await);
    // Redis goes away (without persistence: its data is lost with it).
    drop(redis);
    let (s, r) = http(api, "POST", "/api/publish", Some(&publish(2)), None).await;
    assert_eq!(s, 503, "temporary while Redis is down: {r}");
    assert_eq!(r["error"]["code"], 115);
    let ready = |addr| async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out.starts_with("HTTP/1.1 200")
    };
    let mut seen_unready = false;
    for _ in 0..100 {
        if !ready(node.addr).await {
            seen_unready = true;
            break;
        }
        c.run_for(Duration::from_millis(50)).await; // no event to await for a link loss: bounded poll
    }
    assert!(seen_unready, "/readyz says 503 while Redis is unreachable");
    assert!(c.session.is_connected(), "clients stay connected");
    // Redis is back, empty: the stream gets a new epoch, publishes work, and
    // the subscriber is told of the gap instead of silently skipping.
    let _redis = Redis::start_on(port, &[]);
    let mut resumed = false;
    for _ in 0..100 {
        let (s, _) = http(api, "POST", "/api/publish", Some(&publish(3)), None).await;
        if s == 200 {
            resumed = true;
            break;
        }
        c.run_for(Duration::from_millis(50)).await; // reconnects are the driver's: bounded poll
    }
    assert!(resumed, "publishes resume by themselves");
    let mut ok = false;
    for _ in 0..100 {
        if ready(node.addr).await {
            ok = true;
            break;
        }
        c.run_for(Duration::from_millis(50)).await;
    }
    assert!(ok, "/readyz back to 200");
    // The subscriber's stream changed epoch: it reconnects, learns of the
    // gap (recovered = false) and receives what is published from now on.
    let (s, _) = http(api, "POST", "/api/publish", Some(&publish(4)), None).await;
    assert_eq!(s, 200);
    assert!(
        c.run_until(T, |c| c.events.iter().any(|e| matches!(e, Event::Subscribed { recovered: false, .. }))).await,
        "{:?}",
        c.events
    );
}
