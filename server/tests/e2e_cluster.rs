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

fn of_user<'a>(hooks: &'a [serde_json::Value], user: &str) -> Vec<&'a serde_json::Value> {
    hooks.iter().filter(|h| h["user"] == user).collect()
}

fn joins(c: &TestClient, user: &str) -> usize {
    c.events.iter().filter(|e| matches!(e, Event::Join { info, .. } if info.user == user)).count()
}

fn leaves(c: &TestClient, user: &str) -> usize {
    c.events.iter().filter(|e| matches!(e, Event::Leave { info, .. } if info.user == user)).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_and_webhooks_span_nodes_and_a_dead_node_leaves_in_bounded_time() {
    use ferry_server::cluster_presence::{NODE_BEAT_MS, NODE_DEAD_MS};
    const GRACE_MS: u64 = 300;
    let redis = Redis::start(&[]);
    let (hook_url, hooks, hooked) = hook_receiver().await;
    let mut cfg = on_redis(&redis);
    cfg.presence_grace_ms = GRACE_MS;
    cfg.namespaces.insert(
        "room".into(),
        ferry_server::config::Namespace { join_leave: true, ..ferry_server::config::Namespace::default() },
    );
    cfg.webhooks = ferry_server::config::WebhookConfig {
        url: hook_url.clone(),
        secret: "a webhook secret of a decent length".into(),
        events: vec!["online".into(), "offline".into()],
        retry_initial_ms: 50,
        ..Default::default()
    };
    // Nodes A and B in this process; node C a `ferry` process, to kill -9.
    let a = TestServer::start_with_api(cfg.clone()).await;
    let b = TestServer::start_with_api(cfg.clone()).await;
    let dir = TempDir::new("node-c");
    let toml = format!(
        "presence_grace_ms = {GRACE_MS}\n[redis]\nurls = [\"{}\"]\n[limits]\npublish_rate = 0\n\
         [webhooks]\nurl = \"{hook_url}\"\nsecret = \"a webhook secret of a decent length\"\n\
         events = [\"online\", \"offline\"]\nretry_initial_ms = 50\n[namespaces.room]\njoin_leave = true\n",
        redis.url()
    );
    let conf = dir.path().join("ferry.toml");
    std::fs::write(&conf, toml).unwrap();
    let mut c_node = ServerProcess::spawn(&dir.path().join("data"), &["--config", conf.to_str().unwrap()]);
    let (api_a, api_b) = (a.api.unwrap(), b.api.unwrap());

    let mut watcher = TestClient::new(&a.url(), TestClient::config("w", "watch", Encoding::Binary));
    watcher.subscribe("room:x", Qos::AtMostOnce).await;
    watcher.connect().await;
    assert!(watcher.run_until(T, subscribed).await);
    // Alice on two nodes: one join, one online.
    let mut alice1 = TestClient::new(&b.url(), TestClient::config("a1", "alice", Encoding::Json));
    let mut alice2 = TestClient::new(&c_node.url(), TestClient::config("a2", "alice", Encoding::Binary));
    alice1.subscribe("room:x", Qos::AtLeastOnce).await;
    alice1.connect().await;
    let mut cs = vec![watcher, alice1];
    assert!(run_all(&mut cs, T, |cs| subscribed(&cs[1]) && joins(&cs[0], "alice") == 1).await);
    alice2.subscribe("room:x", Qos::AtLeastOnce).await;
    alice2.connect().await;
    cs.push(alice2);
    assert!(run_all(&mut cs, T, |cs| subscribed(&cs[2])).await);
    // Both nodes' APIs give the same cluster-wide answers; the presence
    // writes are asynchronous, so wait for the counts (bounded poll).
    let stats = json!({"channel": "room:x"});
    let mut counts = (json!(null), json!(null));
    for _ in 0..100 {
        counts = (
            http(api_a, "POST", "/api/presence_stats", Some(&stats), None).await.1,
            http(api_b, "POST", "/api/presence_stats", Some(&stats), None).await.1,
        );
        if counts.0 == json!({"clients": 3, "users": 2}) && counts.0 == counts.1 {
            break;
        }
        run_all(&mut cs, Duration::from_millis(30), |_| false).await; // no event for a Redis write: bounded poll
    }
    assert_eq!(counts.0, json!({"clients": 3, "users": 2}), "every node's connections are counted");
    assert_eq!(counts.0, counts.1, "the same on every node");
    let (_, list_a) = http(api_a, "POST", "/api/presence", Some(&stats), None).await;
    let (_, list_b) = http(api_b, "POST", "/api/presence", Some(&stats), None).await;
    assert_eq!(list_a, list_b);
    let clients: std::collections::BTreeSet<&str> =
        list_a["clients"].as_array().unwrap().iter().map(|c| c["client"].as_str().unwrap()).collect();
    assert_eq!(clients.len(), 3, "client ids are distinct across nodes: {list_a}");
    let users = json!({"users": ["alice", "watch", "nobody"]});
    for api in [api_a, api_b] {
        let (_, r) = http(api, "POST", "/api/online", Some(&users), None).await;
        assert_eq!(r["online"], json!(["alice", "watch"]));
    }

    // Alice's connection on B goes: she is still on C, so no leave. Then C
    // dies: its connections leave within the documented bound.
    let [watcher, mut alice1, alice2]: [TestClient; 3] = cs.try_into().ok().unwrap();
    let now = alice1.now();
    alice1.session.disconnect(now);
    alice1.run_for(Duration::from_millis(50)).await;
    drop(alice1);
    let mut cs = vec![watcher, alice2];
    // The one-connection-left state is visible in the counts.
    let mut two = false;
    for _ in 0..100 {
        if http(api_a, "POST", "/api/presence_stats", Some(&stats), None).await.1 == json!({"clients": 2, "users": 2}) {
            two = true;
            break;
        }
        run_all(&mut cs, Duration::from_millis(30), |_| false).await; // bounded poll, as above
    }
    assert!(two, "alice's closed connection left the list");
    c_node.kill9();
    let killed = Instant::now();
    assert!(run_all(&mut cs, T, |cs| leaves(&cs[0], "alice") == 1).await, "alice leaves once her node is dead");
    let leave_after = killed.elapsed();
    let bound = Duration::from_millis(NODE_DEAD_MS + 2 * NODE_BEAT_MS + GRACE_MS);
    assert_eq!(joins(&cs[0], "alice"), 1, "one join for two connections on two nodes");
    // Offline once, after online once, numbered in order across nodes.
    let deadline = tokio::time::Instant::now() + T;
    loop {
        if of_user(&hooks.lock().unwrap(), "alice").iter().any(|h| h["event"] == "offline") {
            break;
        }
        let woke = tokio::time::timeout_at(deadline, hooked.notified()).await;
        assert!(woke.is_ok(), "no offline webhook: {:?}", hooks.lock().unwrap());
    }
    let offline_after = killed.elapsed();
    let all = hooks.lock().unwrap().clone();
    let alice: Vec<(&str, u64)> = of_user(&all, "alice")
        .iter()
        .map(|h| (h["event"].as_str().unwrap(), h["transition"].as_u64().unwrap()))
        .collect();
    assert_eq!(alice, vec![("online", 1), ("offline", 2)], "once per transition, in order: {all:?}");
    let (_, r) = http(api_b, "POST", "/api/presence_stats", Some(&stats), None).await;
    assert_eq!(r, json!({"clients": 1, "users": 1}), "only the watcher is left");
    println!(
        "[cluster presence] 3 nodes, node with alice's last connection killed: leave after {leave_after:.2?}, \
         offline webhook after {offline_after:.2?} (bound {bound:?} = node timeout {NODE_DEAD_MS} ms + 2 beats + grace)"
    );
    assert!(leave_after <= bound + Duration::from_secs(2), "leave within the bound: {leave_after:?}");

    // Disconnect and unsubscribe through one node's API reach a user on another.
    let mut bob = TestClient::new(&b.url(), TestClient::config("b", "bob", Encoding::Binary));
    bob.subscribe("room:x", Qos::AtLeastOnce).await;
    bob.connect().await;
    cs.push(bob);
    assert!(run_all(&mut cs, T, |cs| subscribed(&cs[2]) && joins(&cs[0], "bob") == 1).await);
    let (s, r) =
        http(api_a, "POST", "/api/unsubscribe", Some(&json!({"user": "bob", "channel": "room:x"})), None).await;
    assert_eq!((s, r), (200, json!({"unsubscribed": 1})));
    assert!(run_all(&mut cs, T, |cs| cs[2].events.iter().any(|e| matches!(e, Event::Unsubscribed { .. }))).await);
    let (s, r) = http(api_a, "POST", "/api/disconnect", Some(&json!({"user": "bob"})), None).await;
    assert_eq!((s, r), (200, json!({"disconnected": 1})));
    assert!(
        run_all(&mut cs, T, |cs| cs[2].events.iter().any(|e| matches!(e, Event::Disconnected { code: 3503, .. })))
            .await,
        "bob on node B is disconnected by node A's API"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_redis_cluster_every_shard_fans_out_to_every_node_once_in_order() {
    logs();
    let cluster = RedisCluster::start(3, 0, &[]).await;
    let cfg = || {
        let mut c = test_config();
        c.redis.urls = cluster.urls();
        c.limits.publish_rate = 0;
        c
    };
    let nodes = [TestServer::start_with_api(cfg()).await, TestServer::start_with_api(cfg()).await];
    // One channel on each of the three shards.
    let mut channels: Vec<(String, usize)> = Vec::new();
    for i in 0..200 {
        let ch = format!("room:{i}");
        let owner = cluster.owner(&format!("ferry:{{{ch}}}:fan")).expect("slot owner");
        if channels.iter().all(|(_, o)| *o != owner) {
            channels.push((ch, owner));
        }
        if channels.len() == 3 {
            break;
        }
    }
    assert_eq!(channels.len(), 3, "a channel per shard");
    let mut clients: Vec<TestClient> = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        for (q, qos) in [Qos::AtMostOnce, Qos::AtLeastOnce, Qos::ExactlyOnce].into_iter().enumerate() {
            let mut c = TestClient::new(
                &n.url(),
                TestClient::config(&format!("s{i}{q}"), &format!("sub{i}{q}"), Encoding::Binary),
            );
            for (ch, _) in &channels {
                c.subscribe(ch, qos).await;
            }
            c.connect().await;
            clients.push(c);
        }
    }
    let all_subscribed =
        |c: &TestClient| c.events.iter().filter(|e| matches!(e, Event::Subscribed { .. })).count() == channels.len();
    assert!(run_all(&mut clients, T, |cs| cs.iter().all(all_subscribed)).await, "subscribed");
    // Each node subscribed each channel on the shard that owns its slot.
    for (ch, owner) in &channels {
        let n = cluster.nodes[*owner].cli(&["PUBSUB", "SHARDNUMSUB", &format!("ferry:{{{ch}}}:fan")]);
        assert_eq!(n.lines().nth(1), Some("2"), "{ch}: SSUBSCRIBEd by both nodes on its shard: {n:?}");
    }
    // A publisher per node, pipelined (no waiting for acks), QoS 1 and 2.
    const N: usize = 60;
    let subs = clients.len();
    for (i, n) in nodes.iter().enumerate() {
        let mut p = TestClient::new(&n.url(), TestClient::config(&format!("p{i}"), &format!("pub{i}"), Encoding::Json));
        p.connect().await;
        for k in 0..N {
            for (ch, _) in &channels {
                p.publish(ch, format!("{i}/{k}").into_bytes(), [Qos::AtLeastOnce, Qos::ExactlyOnce][k % 2]).await;
            }
        }
        clients.push(p);
    }
    let t0 = Instant::now();
    let total = nodes.len() * N;
    let done = |cs: &[TestClient]| {
        cs[subs..].iter().all(|p| p.session.outbox_len() == 0)
            && cs[..subs].iter().all(|c| channels.iter().all(|(ch, _)| c.ids(ch).len() >= total))
    };
    assert!(
        run_all(&mut clients, T, done).await,
        "counts: {:?}",
        clients[..subs]
            .iter()
            .map(|c| channels.iter().map(|(ch, _)| c.ids(ch).len()).collect::<Vec<_>>())
            .collect::<Vec<_>>()
    );
    let took = t0.elapsed();
    for (ch, _) in &channels {
        let (s, h) =
            http(nodes[1].api.unwrap(), "POST", "/api/history", Some(&json!({"channel": ch, "limit": 1000})), None)
                .await;
        assert_eq!(s, 200, "{h}");
        let stored: Vec<String> = h["publications"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["message_id"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(stored.len(), total, "{ch}: every publish stored once");
        for c in &clients[..subs] {
            assert_eq!(c.offsets(ch), (1..=total as u64).collect::<Vec<_>>(), "{ch}: once each, in order");
            assert_eq!(c.ids(ch), stored, "{ch}: the stream's order");
        }
    }
    for n in &nodes {
        let (s, _) = http(n.addr, "GET", "/readyz", None, None).await;
        assert_eq!(s, 200, "every shard link up");
    }
    println!(
        "[cluster] 2 nodes on a 3-primary Redis Cluster: {} publications over 3 channels (one per shard) reached {subs} \
         subscribers (QoS 0/1/2 on both nodes) once, in order, in {took:.2?}",
        total * channels.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_ages_out_on_redis_for_every_node_and_a_late_device_is_told() {
    use ferry_server::config::Namespace;
    let redis = Redis::start(&[]);
    let cfg = || {
        let mut c = on_redis(&redis);
        c.namespaces.insert("tmp".into(), Namespace { history_ttl_secs: 1, ..Namespace::default() });
        c.namespaces.insert("keep".into(), Namespace { history_ttl_secs: 0, ..Namespace::default() });
        c
    };
    let (a, b) = (TestServer::start_with_api(cfg()).await, TestServer::start_with_api(cfg()).await);
    let hist = |ch: &'static str| async move {
        let (s, h) = http(b.api.unwrap(), "POST", "/api/history", Some(&json!({"channel": ch})), None).await;
        assert_eq!(s, 200, "{h}");
        (h["publications"].as_array().unwrap().len(), h["top"]["offset"].as_u64().unwrap(), h["top"]["epoch"].clone())
    };
    let t_pub = Instant::now();
    for i in 0..3 {
        for ch in ["tmp:x", "keep:x"] {
            let (s, r) =
                http(a.api.unwrap(), "POST", "/api/publish", Some(&json!({"channel": ch, "data": i})), None).await;
            assert_eq!(s, 200, "{r}");
        }
    }
    assert_eq!(hist("tmp:x").await.0, 3, "kept while young");
    // The log of an aged namespace expires by itself once its newest entry
    // does (an idle channel needs no reader to be freed).
    let pttl: i64 = redis.cli(&["PTTL", "ferry:{tmp:x}:log"]).parse().unwrap();
    assert!((1..=1000).contains(&pttl), "PTTL {pttl}");
    assert_eq!(redis.cli(&["PTTL", "ferry:{keep:x}:log"]), "-1", "no age limit, no TTL");
    let deadline = Instant::now() + Duration::from_secs(10);
    let epoch = loop {
        let (n, top, epoch) = hist("tmp:x").await;
        if n == 0 {
            assert_eq!(top, 3, "offsets are kept when history ages out");
            break epoch;
        }
        assert!(Instant::now() < deadline, "history never aged out");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(t_pub.elapsed() >= Duration::from_millis(1000), "not before its age: {:?}", t_pub.elapsed());
    assert_eq!(redis.cli(&["XLEN", "ferry:{tmp:x}:log"]), "0", "trimmed in Redis, not only hidden");
    assert_eq!(hist("keep:x").await.0, 3, "other namespaces keep theirs");
    // A device that saw only the first publication comes back on the
    // other node: it is told of the gap, then gets what comes next live.
    let snapshot = saved_at("tmp:x", epoch.as_str().unwrap(), 1);
    let mut late = TestClient::restore(&a.url(), TestClient::config("late", "late", Encoding::Json), snapshot);
    late.connect().await;
    assert!(late.run_until(T, |c| c.events.iter().any(|e| matches!(e, Event::Gap { .. }))).await);
    let gap = late.events.iter().find_map(|e| match e {
        Event::Gap { reason, to, .. } => Some((*reason, to.offset)),
        _ => None,
    });
    assert_eq!(gap, Some((ferry_core::client::GapReason::NotRetained, 3)));
    let (s, _) =
        http(b.api.unwrap(), "POST", "/api/publish", Some(&json!({"channel": "tmp:x", "data": "new"})), None).await;
    assert_eq!(s, 200);
    assert!(late.run_until(T, |c| !c.offsets("tmp:x").is_empty()).await);
    assert_eq!(late.offsets("tmp:x"), vec![4], "nothing aged out is delivered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_position_above_the_top_is_told_as_a_gap_and_resets_nothing() {
    let redis = Redis::start(&[]);
    let a = TestServer::start_with_api(on_redis(&redis)).await;
    for i in 0..3 {
        let (s, _) =
            http(a.api.unwrap(), "POST", "/api/publish", Some(&json!({"channel": "feed:z", "data": i})), None).await;
        assert_eq!(s, 200);
    }
    let epoch = redis.cli(&["HGET", "ferry:{feed:z}:meta", "epoch"]);
    // A device claims offset 9 of this epoch: the stream lost its tail (a
    // failover), or the claim is false. Either way it is told, and one
    // client's word does not reset the channel for everyone else.
    let snapshot = saved_at("feed:z", &epoch, 9);
    let mut dev = TestClient::restore(&a.url(), TestClient::config("d", "d", Encoding::Binary), snapshot);
    dev.connect().await;
    assert!(dev.run_until(T, |c| c.events.iter().any(|e| matches!(e, Event::Gap { .. }))).await);
    let gap = dev.events.iter().find_map(|e| match e {
        Event::Gap { reason, to, .. } => Some((*reason, to.clone())),
        _ => None,
    });
    let (reason, to) = gap.unwrap();
    assert_eq!(reason, ferry_core::client::GapReason::NotRetained);
    assert_eq!((to.epoch.as_str(), to.offset), (epoch.as_str(), 3), "continues after what the stream has");
    // Offset 4 is reused for new data: delivered, not taken for a duplicate.
    let (s, _) =
        http(a.api.unwrap(), "POST", "/api/publish", Some(&json!({"channel": "feed:z", "data": "new"})), None).await;
    assert_eq!(s, 200);
    assert!(dev.run_until(T, |c| !c.offsets("feed:z").is_empty()).await);
    assert_eq!(dev.offsets("feed:z"), [4]);
    assert_eq!(redis.cli(&["HGET", "ferry:{feed:z}:meta", "epoch"]), epoch, "the epoch is kept");
}

/// A gauge from a node's `/metrics`.
async fn gauge(addr: std::net::SocketAddr, name: &str) -> Option<u64> {
    let (_, m) = http(addr, "GET", "/metrics", None, None).await;
    let text = without_node_label(m.as_str().unwrap_or_default());
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_come_and_go_while_redis_is_down_leave_no_backlog() {
    let port = free_port();
    let redis = Redis::start_on(port, &[]);
    let node = TestServer::start_with_api(on_redis(&redis)).await;
    let api = node.api.unwrap();
    let mut stay = TestClient::new(&node.url(), TestClient::config("stay", "stay", Encoding::Binary));
    stay.connect().await;
    assert!(stay.connected().await);
    let users = json!({"users": ["stay", "churn0", "churn199"]});
    let online = || async { http(api, "POST", "/api/online", Some(&users), None).await };
    let mut ok = false;
    for _ in 0..100 {
        if online().await.1["online"] == json!(["stay"]) {
            ok = true;
            break;
        }
        stay.run_for(Duration::from_millis(50)).await; // the writer is asynchronous: bounded poll
    }
    assert!(ok, "online before the outage");
    drop(redis);
    // A reconnect storm while Redis is away: 200 connections come and go.
    for i in 0..200 {
        let mut c =
            TestClient::new(&node.url(), TestClient::config(&format!("c{i}"), &format!("churn{i}"), Encoding::Binary));
        c.connect().await;
        assert!(c.connected().await, "connects while Redis is down");
        c.drop_socket();
    }
    // Each connection's up and down cancel out in the writer's backlog.
    let mut backlog = None;
    for _ in 0..100 {
        backlog = gauge(node.addr, "ferry_presence_backlog").await;
        if backlog.is_some_and(|b| b <= 2) {
            break;
        }
        stay.run_for(Duration::from_millis(100)).await; // the writer drains at its retry pace: bounded poll
    }
    assert!(backlog.is_some_and(|b| b <= 2), "presence backlog while Redis is down: {backlog:?}");
    // Redis is back (empty): the node re-registers who is still here.
    let _redis = Redis::start_on(port, &[]);
    let mut ok = false;
    for _ in 0..200 {
        if online().await.1["online"] == json!(["stay"]) {
            ok = true;
            break;
        }
        stay.run_for(Duration::from_millis(100)).await;
    }
    assert!(ok, "after the outage: {}", online().await.1);
    assert_eq!(gauge(node.addr, "ferry_presence_backlog").await, Some(0));
}
