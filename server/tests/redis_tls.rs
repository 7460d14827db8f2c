//! `rediss://`: Ferry nodes on a TLS-only `redis-server` (no plain port),
//! standalone and Cluster (`tls-cluster yes`), through real WebSocket
//! clients; a certificate that does not verify stops the node at startup
//! with an error that says so. Certificates: tests/fixtures/tls.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use ferry_core::client::Event;
use ferry_core::codec::Encoding;
use ferry_core::frame::Qos;
use serde_json::json;

const T: Duration = Duration::from_secs(30);

fn on_tls(urls: Vec<String>) -> ferry_server::config::Config {
    let mut cfg = test_config();
    cfg.redis.urls = urls;
    cfg.redis.tls_ca = Some(tls_fixture("redis-ca.pem"));
    cfg.limits.publish_rate = 0;
    cfg
}

fn subscribed(c: &TestClient) -> usize {
    c.events.iter().filter(|e| matches!(e, Event::Subscribed { .. })).count()
}

fn joins(c: &TestClient, user: &str) -> usize {
    c.events.iter().filter(|e| matches!(e, Event::Join { info, .. } if info.user == user)).count()
}

/// The `ferry` binary with no inherited `FERRY_*` variable.
fn ferry() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ferry"));
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("FERRY_")) {
        c.env_remove(k);
    }
    c.env("FERRY_LOG", "warn");
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_on_a_tls_only_redis_fan_out_and_share_presence() {
    let redis = Redis::start_tls(&[]);
    let mut cfg = on_tls(vec![redis.url()]);
    cfg.namespaces.insert(
        "room".into(),
        ferry_server::config::Namespace { join_leave: true, ..ferry_server::config::Namespace::default() },
    );
    let a = TestServer::start_with_api(cfg.clone()).await;
    let b = TestServer::start_with_api(cfg).await;

    let mut watcher = TestClient::new(&a.url(), TestClient::config("w", "watch", Encoding::Binary));
    watcher.subscribe("room:x", Qos::AtLeastOnce).await;
    watcher.connect().await;
    assert!(watcher.run_until(T, |c| subscribed(c) == 1).await);
    let mut alice = TestClient::new(&b.url(), TestClient::config("a", "alice", Encoding::Json));
    alice.subscribe("room:x", Qos::AtLeastOnce).await;
    alice.connect().await;
    let mut cs = vec![watcher, alice];
    // Alice's join on B reaches the watcher on A: the control link.
    assert!(run_all(&mut cs, T, |cs| subscribed(&cs[1]) == 1 && joins(&cs[0], "alice") == 1).await, "join");
    // Both nodes' fan-out links are subscribed on the TLS port.
    let fan = "ferry:{room:x}:fan";
    assert_eq!(redis.cli(&["PUBSUB", "NUMSUB", fan]).lines().nth(1), Some("2"), "both nodes subscribed {fan}");

    // Published on B (client) and A (API); both subscribers get each once.
    let [watcher, mut alice]: [TestClient; 2] = cs.try_into().ok().unwrap();
    for i in 0..5 {
        alice.publish("room:x", format!("m{i}").into_bytes(), Qos::AtLeastOnce).await;
    }
    assert!(alice.run_until(T, |c| c.session.outbox_len() == 0).await, "publishes acked");
    let (s, r) =
        http(a.api.unwrap(), "POST", "/api/publish", Some(&json!({"channel": "room:x", "data": "api"})), None).await;
    assert_eq!(s, 200, "{r}");
    let mut cs = vec![watcher, alice];
    let all = |c: &TestClient| c.offsets("room:x").len() >= 6;
    assert!(run_all(&mut cs, T, |cs| cs.iter().all(all)).await, "{:?}", cs[0].offsets("room:x"));
    for c in &cs {
        assert_eq!(c.offsets("room:x"), (1..=6).collect::<Vec<_>>(), "once each, in order");
    }
    assert_eq!(cs[0].received["room:x"][5].2, b"\"api\"");

    // Cluster-wide presence from either node's API (the writes are
    // asynchronous: bounded poll).
    let stats = json!({"channel": "room:x"});
    let mut counts = (json!(null), json!(null));
    for _ in 0..100 {
        counts = (
            http(a.api.unwrap(), "POST", "/api/presence_stats", Some(&stats), None).await.1,
            http(b.api.unwrap(), "POST", "/api/presence_stats", Some(&stats), None).await.1,
        );
        if counts.0 == json!({"clients": 2, "users": 2}) && counts.0 == counts.1 {
            break;
        }
        run_all(&mut cs, Duration::from_millis(30), |_| false).await;
    }
    assert_eq!(counts.0, json!({"clients": 2, "users": 2}), "both nodes' connections");
    assert_eq!(counts.0, counts.1, "the same on both nodes");
    for n in [&a, &b] {
        assert_eq!(http(n.addr, "GET", "/readyz", None, None).await.0, 200, "Redis links up");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_that_does_not_verify_stops_the_node_at_startup_saying_so() {
    let redis = Redis::start_tls(&[]);
    // A CA that did not sign the server's certificate (the listener
    // tests' CA), through the environment (FERRY_REDIS_TLS_CA), on the
    // real binary.
    let dir = TempDir::new("tls-wrong-ca");
    let mut child = ferry()
        .args(["serve", "--listen", "127.0.0.1:0", "--api-listen", "off", "--data-dir"])
        .arg(dir.path())
        .args(["--redis", &redis.url()])
        .env("FERRY_REDIS_TLS_CA", tls_fixture("ca.pem"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut status = None;
    let exited = poll_until(T, || {
        status = child.try_wait().unwrap();
        status.is_some()
    })
    .await;
    if !exited {
        let _ = child.kill();
    }
    let _ = child.wait();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(exited, "the node gave up within {T:?} instead of hanging");
    assert!(!status.unwrap().success());
    assert!(err.contains("certificate") && err.contains("redis.tls_ca"), "says why: {err}");

    // No tls_ca: the public web roots, which do not know the test CA either.
    let mut cfg = on_tls(vec![redis.url()]);
    cfg.redis.tls_ca = None;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    cfg.data_dir = dir.path().join("in-process");
    let started = tokio::time::timeout(T, ferry_server::serve(listener, None, cfg, std::future::pending())).await;
    let e = started.expect("gave up instead of hanging").expect_err("refused");
    assert!(format!("{e:#}").contains("certificate"), "says why: {e:#}");
}

#[test]
fn check_config_reads_the_redis_ca_and_refuses_tls_settings_that_cannot_work() {
    let dir = TempDir::new("tls-check");
    let check = |name: &str, redis: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, format!("allow_anonymous = true\n[redis]\n{redis}\n")).unwrap();
        let out = ferry().arg("check-config").arg(&p).output().unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stderr).to_string())
    };
    let ca = tls_fixture("redis-ca.pem");
    let good = check("good.toml", &format!("urls = [\"rediss://127.0.0.1:6380/\"]\ntls_ca = {:?}", ca));
    assert!(good.0, "{}", good.1);
    let missing = check("missing.toml", "urls = [\"rediss://127.0.0.1:6380/\"]\ntls_ca = \"/nonexistent/ca.pem\"");
    assert!(!missing.0 && missing.1.contains("redis.tls_ca /nonexistent/ca.pem"), "{}", missing.1);
    let not_pem = check(
        "not-pem.toml",
        &format!("urls = [\"rediss://127.0.0.1:6380/\"]\ntls_ca = {:?}", tls_fixture("README.md")),
    );
    assert!(!not_pem.0 && not_pem.1.contains("no certificate"), "{}", not_pem.1);
    let plain = check("plain.toml", &format!("urls = [\"redis://127.0.0.1:6379/\"]\ntls_ca = {:?}", ca));
    assert!(!plain.0 && plain.1.contains("use rediss://"), "{}", plain.1);
    let mixed = check("mixed.toml", "urls = [\"rediss://127.0.0.1:7000/\", \"redis://127.0.0.1:7001/\"]");
    assert!(!mixed.0 && mixed.1.contains("mix"), "{}", mixed.1);
    let insecure = check("insecure.toml", "urls = [\"rediss://127.0.0.1:6380/#insecure\"]");
    assert!(!insecure.0 && insecure.1.contains("#insecure is not supported"), "{}", insecure.1);
    let unknown = check("unknown.toml", "urls = [\"rediss://127.0.0.1:6380/\"]\ntls_insecure = true");
    assert!(!unknown.0 && unknown.1.contains("unknown field"), "{}", unknown.1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_tls_redis_cluster_every_shard_fans_out_to_both_nodes() {
    let cluster = RedisCluster::start_tls(3, 0, &[]).await;
    let cfg = || on_tls(cluster.urls());
    let nodes = [TestServer::start_with_api(cfg()).await, TestServer::start_with_api(cfg()).await];
    // One channel on each shard: the nodes' links to every primary, found
    // through CLUSTER SLOTS, are TLS.
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
        let mut c =
            TestClient::new(&n.url(), TestClient::config(&format!("s{i}"), &format!("sub{i}"), Encoding::Binary));
        for (ch, _) in &channels {
            c.subscribe(ch, Qos::AtLeastOnce).await;
        }
        c.connect().await;
        clients.push(c);
    }
    assert!(run_all(&mut clients, T, |cs| cs.iter().all(|c| subscribed(c) == channels.len())).await, "subscribed");
    for (ch, owner) in &channels {
        let n = cluster.nodes[*owner].cli(&["PUBSUB", "SHARDNUMSUB", &format!("ferry:{{{ch}}}:fan")]);
        assert_eq!(n.lines().nth(1), Some("2"), "{ch}: SSUBSCRIBEd by both nodes on its shard: {n:?}");
    }
    const N: usize = 10;
    for (i, n) in nodes.iter().enumerate() {
        let mut p = TestClient::new(&n.url(), TestClient::config(&format!("p{i}"), &format!("pub{i}"), Encoding::Json));
        p.connect().await;
        for k in 0..N {
            for (ch, _) in &channels {
                p.publish(ch, format!("{i}/{k}").into_bytes(), Qos::AtLeastOnce).await;
            }
        }
        clients.push(p);
    }
    let total = nodes.len() * N;
    let done = |cs: &[TestClient]| {
        cs[2..].iter().all(|p| p.session.outbox_len() == 0)
            && cs[..2].iter().all(|c| channels.iter().all(|(ch, _)| c.offsets(ch).len() >= total))
    };
    assert!(
        run_all(&mut clients, T, done).await,
        "counts: {:?}",
        clients[..2]
            .iter()
            .map(|c| channels.iter().map(|(ch, _)| c.offsets(ch).len()).collect::<Vec<_>>())
            .collect::<Vec<_>>()
    );
    for c in &clients[..2] {
        for (ch, _) in &channels {
            assert_eq!(c.offsets(ch), (1..=total as u64).collect::<Vec<_>>(), "{ch}: once each, in order");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_a_tls_sentinel_two_nodes_fan_out_on_the_tls_primary() {
    let primary = Redis::start_tls(&[]);
    let sentinel = SentinelProc::start_tls("tlsmain", primary.port, 5_000);
    let cfg = || {
        let mut c = on_tls(vec![sentinel.url()]);
        c.redis.sentinel_master = Some("tlsmain".into());
        c
    };
    // The Sentinel is asked over TLS; it names the primary's TLS port,
    // which commands, the control link and fan-out reach over TLS.
    let nodes = [TestServer::start_with_api(cfg()).await, TestServer::start_with_api(cfg()).await];
    let mut sub = TestClient::new(&nodes[0].url(), TestClient::config("s", "sub", Encoding::Binary));
    sub.subscribe("room:s", Qos::AtLeastOnce).await;
    sub.connect().await;
    assert!(sub.run_until(T, |c| subscribed(c) == 1).await, "subscribed");
    let mut publisher = TestClient::new(&nodes[1].url(), TestClient::config("p", "pub", Encoding::Json));
    publisher.connect().await;
    for i in 0..5 {
        publisher.publish("room:s", format!("m{i}").into_bytes(), Qos::AtLeastOnce).await;
    }
    let mut cs = vec![sub, publisher];
    assert!(
        run_all(&mut cs, T, |cs| cs[1].session.outbox_len() == 0 && cs[0].offsets("room:s").len() >= 5).await,
        "{:?}",
        cs[0].offsets("room:s")
    );
    assert_eq!(cs[0].offsets("room:s"), (1..=5).collect::<Vec<_>>(), "once each, in order");
    // The subscriber's node listens on the primary's TLS port.
    assert_eq!(primary.cli(&["PUBSUB", "NUMSUB", "ferry:{room:s}:fan"]).lines().nth(1), Some("1"));
}
