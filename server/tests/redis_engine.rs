//! The Redis stream engine against real `redis-server` processes on
//! loopback ports: a standalone server, and a 3-primary Redis Cluster.
//! Two engine instances stand for two Ferry nodes sharing one Redis.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{poll_until, tryagain_count, Redis, RedisCluster};

use ferry_core::frame::{ClientInfo, Qos};
use ferry_server::engine::redis::{Appended, Durability, RedisConfig, RedisStreams};
use ferry_server::engine::{EngineError, Known, PublishItem, Retention};

fn item(id: &str, data: &[u8], qos: Qos, user: &str) -> PublishItem {
    use sha2::Digest;
    let full = sha2::Sha256::digest(data);
    let mut digest = [0; 16];
    digest.copy_from_slice(&full[..16]);
    PublishItem {
        message_id: id.into(),
        digest,
        qos,
        publisher: Some(ClientInfo { client: format!("c-{user}"), user: user.into(), info: None }),
        data: data.to_vec(),
    }
}

const KEEP: Retention = Retention { history_size: 1000, max_age_ms: 0 };

async fn node(urls: Vec<String>) -> RedisStreams {
    RedisStreams::connect(&RedisConfig { urls, ..RedisConfig::default() }).await.unwrap()
}

fn offsets(r: &[Appended]) -> Vec<String> {
    r.iter()
        .map(|a| match a {
            Appended::New { offset, .. } => format!("new {offset}"),
            Appended::Duplicate { offset, .. } => format!("dup {offset}"),
            Appended::Conflict => "conflict".into(),
        })
        .collect()
}

#[tokio::test]
async fn two_nodes_share_offsets_ids_and_history() {
    let redis = Redis::start(&[]);
    let a = node(vec![redis.url()]).await;
    let b = node(vec![redis.url()]).await;
    let batch = [item("m1", b"one", Qos::AtLeastOnce, "u1"), item("m2", b"two", Qos::ExactlyOnce, "u1")];
    let r = a.publish("chat:1", KEEP, None, &batch, 1000, "e1").await.unwrap();
    assert_eq!(offsets(&r.items), ["new 1", "new 2"]);
    assert_eq!((r.header.epoch.as_str(), r.header.first, r.header.top), ("e1", 1, 2));
    // A retry on the other node is a duplicate; a reuse is refused, on this
    // channel (other data), on another channel, and inside one batch.
    let again = [
        item("m2", b"two", Qos::ExactlyOnce, "u1"),
        item("m1", b"other", Qos::AtLeastOnce, "u2"),
        item("m3", b"three", Qos::AtLeastOnce, "u2"),
        item("m3", b"three", Qos::AtLeastOnce, "u2"),
    ];
    let r = b.publish("chat:1", KEEP, None, &again, 2000, "ignored").await.unwrap();
    assert_eq!(offsets(&r.items), ["dup 2", "conflict", "new 3", "dup 3"]);
    assert_eq!(r.header.epoch, "e1", "an existing stream keeps its epoch");
    let r = b.publish("chat:2", KEEP, None, &[item("m1", b"one", Qos::AtLeastOnce, "u1")], 2000, "e2").await.unwrap();
    assert_eq!(offsets(&r.items), ["conflict"], "ids are unique across channels");
    assert_eq!(b.header("chat:2").await.unwrap().map(|h| h.top), Some(0), "nothing stored on chat:2");
    // History, read from either node, in order with publisher and data.
    let h = a.range("chat:1", 1, 100, usize::MAX).await.unwrap();
    let got: Vec<(u64, &str, &[u8], &str)> = h
        .iter()
        .map(|p| {
            (p.offset, p.message_id.as_str(), p.payload.data.0.as_slice(), p.publisher.as_ref().unwrap().user.as_str())
        })
        .collect();
    assert_eq!(got, [(1, "m1", &b"one"[..], "u1"), (2, "m2", b"two", "u1"), (3, "m3", b"three", "u2")]);
    assert_eq!(h[2].time_ms, 2000);
    assert_eq!(h[1].qos, Qos::ExactlyOnce);
    assert_eq!(a.range("chat:1", 2, 1, usize::MAX).await.unwrap().len(), 1, "limit");
    assert_eq!(a.range("chat:1", 1, 100, 1).await.unwrap().len(), 1, "byte bound, at least one");
    // Release: the QoS 2 id falls back to the 24 h window.
    let ttl = |k: &str| redis.cli(&["PTTL", k]).parse::<i64>().unwrap();
    assert!(ttl("ferry:mid:{m2}") > 2 * 24 * 3600 * 1000, "unreleased QoS 2 ids are held longer");
    assert_eq!(a.claimed_channel("m2").await.unwrap().as_deref(), Some("chat:1"));
    a.release("chat:1", "m2").await.unwrap();
    assert!(ttl("ferry:mid:{m2}") <= 24 * 3600 * 1000);
    assert!(ttl("ferry:{chat:1}:id:m2") <= 24 * 3600 * 1000);
    assert!(ttl("ferry:{chat:1}:id:m2") > 0, "still remembered for late duplicates");
    // Offline cursors are shared too.
    a.put_cursor("u1", "phone", "chat:1", "e1", 2).await.unwrap();
    assert_eq!(b.cursor("u1", "phone", "chat:1").await.unwrap(), Some(("e1".into(), 2)));
    assert_eq!(b.cursor("u1", "tablet", "chat:1").await.unwrap(), None);
}

#[tokio::test]
async fn retention_trims_and_lost_streams_get_a_new_epoch() {
    let redis = Redis::start(&[]);
    let a = node(vec![redis.url()]).await;
    let keep5 = Retention { history_size: 5, max_age_ms: 0 };
    let items: Vec<_> =
        (1..=12).map(|i| item(&format!("r{i}"), format!("p{i}").as_bytes(), Qos::AtLeastOnce, "u")).collect();
    let r = a.publish("feed:x", keep5, None, &items, 1, "e1").await.unwrap();
    assert_eq!((r.header.first, r.header.top), (8, 12));
    let h = a.range("feed:x", 1, 100, usize::MAX).await.unwrap();
    assert_eq!(h.iter().map(|p| p.offset).collect::<Vec<_>>(), [8, 9, 10, 11, 12]);
    // A node that saw offset 20 in this epoch: the stream lost its tail,
    // so it gets a new epoch instead of reusing offsets 13..20.
    let known = Known { epoch: "e1".into(), top: 20 };
    let r =
        a.publish("feed:x", keep5, Some(&known), &[item("r13", b"p13", Qos::AtLeastOnce, "u")], 2, "e2").await.unwrap();
    assert_eq!(r.header.epoch, "e2");
    assert_eq!(offsets(&r.items), ["new 13"], "offsets move on, in the new epoch");
    assert_eq!(a.range("feed:x", 1, 100, usize::MAX).await.unwrap().iter().map(|p| p.offset).collect::<Vec<_>>(), [13]);
    // A node that knows less than Redis has is fine.
    let behind = Known { epoch: "e2".into(), top: 1 };
    let r = a
        .publish("feed:x", keep5, Some(&behind), &[item("r14", b"p14", Qos::AtLeastOnce, "u")], 3, "e3")
        .await
        .unwrap();
    assert_eq!(r.header.epoch, "e2");
    // Redis lost everything (flush, restart without persistence): a fresh epoch.
    assert_eq!(redis.cli(&["FLUSHALL"]), "OK");
    let r = a.publish("feed:x", keep5, None, &[item("r15", b"p15", Qos::AtLeastOnce, "u")], 4, "e4").await.unwrap();
    assert_eq!((r.header.epoch.as_str(), offsets(&r.items)), ("e4", vec!["new 1".to_string()]));
}

#[tokio::test]
async fn replicated_publishes_wait_on_their_own_connection_and_survive_a_script_flush() {
    let primary = Redis::start(&[]);
    let replica = Redis::start(&["--replicaof", "127.0.0.1", &primary.port.to_string()]);
    let linked = common::poll_until(Duration::from_secs(20), || {
        replica.cli(&["INFO", "replication"]).contains("master_link_status:up")
    })
    .await;
    assert!(linked, "replica linked");
    let cfg = RedisConfig { urls: vec![primary.url()], durability: Durability::Replicated, ..RedisConfig::default() };
    let a = RedisStreams::connect(&cfg).await.unwrap();
    let r = a.publish("w:1", KEEP, None, &[item("w1", b"one", Qos::AtLeastOnce, "u")], 1, "e1").await.unwrap();
    assert_eq!(offsets(&r.items), ["new 1"]);
    // A primary that lost its script cache (a restart, a promoted replica):
    // loaded again, and the WAIT still follows the script.
    assert_eq!(primary.cli(&["SCRIPT", "FLUSH"]), "OK");
    let r = a.publish("w:1", KEEP, None, &[item("w2", b"two", Qos::AtLeastOnce, "u")], 2, "e1").await.unwrap();
    assert_eq!(offsets(&r.items), ["new 2"]);
    // The replica hangs: WAIT 1 blocks its connection for its 1 s timeout,
    // and the publish is refused as temporary. Reads on this node are not
    // queued behind it.
    replica.signal("-STOP");
    let third = [item("w3", b"three", Qos::AtLeastOnce, "u")];
    let b = a.clone();
    let items = third.clone();
    let publish =
        tokio::spawn(async move { b.publish("w:1", KEEP, None, &items, 3, "e1").await.map(|r| r.items.len()) });
    // A client blocked (`flags=b`) in WAIT; `cmd` alone is the last command.
    let blocked =
        || primary.cli(&["CLIENT", "LIST"]).lines().any(|l| l.contains(" flags=b ") && l.contains(" cmd=wait "));
    assert!(common::poll_until(Duration::from_secs(5), blocked).await, "the publish waits in WAIT");
    let h = a.header("w:1").await.unwrap().unwrap();
    assert_eq!(h.top, 3, "the write itself is on the primary");
    assert!(blocked(), "a read answered while the publish still waits (its own connection)");
    let refused = publish.await.unwrap();
    replica.signal("-CONT");
    assert!(matches!(refused, Err(EngineError::Unavailable(ref m)) if m.contains("WAIT")), "{refused:?}");
    // Written on the primary, not confirmed: the client's retry is a duplicate.
    let r = a.publish("w:1", KEEP, None, &third, 4, "e1").await.unwrap();
    assert_eq!(offsets(&r.items), ["dup 3"]);
}

#[tokio::test]
async fn age_retention_trims_in_bounded_steps_and_reads_see_an_exact_first() {
    let redis = Redis::start(&[]);
    let a = node(vec![redis.url()]).await;
    let aged = Retention { history_size: 10_000, max_age_ms: 1000 };
    // 600 publications at time 1 s, then one at 100 s with a 1 s age limit.
    let old: Vec<_> = (1..=600).map(|i| item(&format!("a{i}"), b"x", Qos::AtMostOnce, "u")).collect();
    for chunk in old.chunks(200) {
        a.publish("tmp:a", aged, None, chunk, 1_000, "e1").await.unwrap();
    }
    let r = a.publish("tmp:a", aged, None, &[item("a601", b"y", Qos::AtMostOnce, "u")], 100_000, "e1").await.unwrap();
    // One publish trims a bounded number of expired entries ...
    assert_eq!((r.header.first, r.header.top), (257, 601), "256 trimmed by the publish");
    assert_eq!(redis.cli(&["XLEN", "ferry:{tmp:a}:log"]), "345");
    // ... and a header read (subscribe, history) trims the rest first.
    let h = a.read_header("tmp:a", aged.cutoff(100_000)).await.unwrap().unwrap();
    assert_eq!((h.epoch.as_str(), h.first, h.top), ("e1", 601, 601));
    assert_eq!(
        a.range("tmp:a", 1, 1000, usize::MAX).await.unwrap().iter().map(|p| p.offset).collect::<Vec<_>>(),
        [601]
    );
    // The log expired as a whole (its key TTL): the header says nothing is left.
    assert_eq!(redis.cli(&["DEL", "ferry:{tmp:a}:log"]), "1");
    let h = a.read_header("tmp:a", aged.cutoff(200_000)).await.unwrap().unwrap();
    assert_eq!((h.first, h.top), (602, 601), "offsets are kept");
    // No age limit: nothing trimmed, whatever the times.
    let keep: Vec<_> = (1..=10).map(|i| item(&format!("k{i}"), b"x", Qos::AtMostOnce, "u")).collect();
    let r = a.publish("keep:a", KEEP, None, &keep, 1_000, "e1").await.unwrap();
    assert_eq!((r.header.first, r.header.top), (1, 10));
    assert_eq!(a.read_header("keep:a", 0).await.unwrap().map(|h| h.first), Some(1));
    assert_eq!(a.read_header("none:a", 5).await.unwrap(), None, "a read creates nothing");
}

#[tokio::test]
async fn fan_out_reaches_every_node_in_offset_order() {
    use futures_util::StreamExt;
    let redis = Redis::start(&[]);
    let a = node(vec![redis.url()]).await;
    let client = redis::Client::open(redis.url()).unwrap();
    let mut sub = client.get_async_pubsub().await.unwrap();
    sub.subscribe(a.fan_channel("room:{odd}%")).await.unwrap();
    let mut msgs = sub.into_on_message();
    for i in 0..3 {
        let batch: Vec<_> =
            (0..2).map(|j| item(&format!("f{i}-{j}"), format!("d{i}{j}").as_bytes(), Qos::AtMostOnce, "u")).collect();
        a.publish("room:{odd}%", KEEP, None, &batch, 10 + i, "e1").await.unwrap();
    }
    // A batch of duplicates sends nothing.
    a.publish("room:{odd}%", KEEP, None, &[item("f0-0", b"d00", Qos::AtMostOnce, "u")], 99, "e1").await.unwrap();
    let mut got = Vec::new();
    for _ in 0..3 {
        let m = tokio::time::timeout(Duration::from_secs(10), msgs.next()).await.expect("fan-out message").unwrap();
        let f = a.decode_fanout(m.get_channel_name(), m.get_payload_bytes()).unwrap();
        assert_eq!(f.channel, "room:{odd}%");
        got.extend(f.publications.into_iter().map(|p| (p.offset, p.payload.data.0, p.time_ms)));
    }
    let want: Vec<(u64, Vec<u8>, u64)> =
        (0..6u64).map(|k| (k + 1, format!("d{}{}", k / 2, k % 2).into_bytes(), 10 + k / 2)).collect();
    assert_eq!(got, want);
}

#[tokio::test]
async fn replicated_durability_waits_for_a_replica_and_redis_down_is_temporary() {
    let primary = Redis::start(&[]);
    let cfg = |durability| RedisConfig { urls: vec![primary.url()], durability, ..RedisConfig::default() };
    let strict = RedisStreams::connect(&cfg(Durability::Replicated)).await.unwrap();
    // No replica: the write happened but is not confirmed, so the publish
    // is answered as temporary; the retry, once a replica is there, is a
    // duplicate at the same offset.
    let it = [item("w1", b"x", Qos::AtLeastOnce, "u")];
    let r = strict.publish("acct:1", KEEP, None, &it, 1, "e1").await;
    assert!(matches!(r, Err(EngineError::Unavailable(ref m)) if m.contains("WAIT")), "{r:?}");
    let replica = Redis::start(&["--replicaof", "127.0.0.1", &primary.port.to_string()]);
    let mut synced = false;
    for _ in 0..200 {
        if replica.cli(&["INFO", "replication"]).contains("master_link_status:up") {
            synced = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await; // no event for replication state: bounded poll
    }
    assert!(synced, "replica linked");
    let r = strict.publish("acct:1", KEEP, None, &it, 2, "e1").await.unwrap();
    assert_eq!(offsets(&r.items), ["dup 1"]);
    let r = strict.publish("acct:1", KEEP, None, &[item("w2", b"y", Qos::AtLeastOnce, "u")], 3, "e1").await.unwrap();
    assert_eq!(offsets(&r.items), ["new 2"]);
    assert_eq!(replica.cli(&["HGET", "ferry:{acct:1}:meta", "top"]), "2", "the replica has it");
    // Redis gone: a clear temporary error, bounded in time.
    drop(replica);
    drop(primary);
    let t0 = std::time::Instant::now();
    let r = strict.publish("acct:1", KEEP, None, &[item("w3", b"z", Qos::AtLeastOnce, "u")], 4, "e1").await;
    assert!(matches!(r, Err(EngineError::Unavailable(_))), "{r:?}");
    assert!(t0.elapsed() < Duration::from_secs(15), "{:?}", t0.elapsed());
}

#[tokio::test]
async fn a_redis_cluster_spreads_channels_over_shards() {
    let nodes: Vec<Redis> =
        (0..3).map(|_| Redis::start(&["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"])).collect();
    for n in &nodes {
        // Each node needs its own cluster state file.
        assert_eq!(n.cli(&["CONFIG", "GET", "cluster-enabled"]).lines().last(), Some("yes"));
    }
    let addrs: Vec<String> = nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect();
    let out = Command::new("redis-cli")
        .args(["--cluster", "create"])
        .args(&addrs)
        .args(["--cluster-replicas", "0", "--cluster-yes"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    let mut ok = false;
    for _ in 0..200 {
        if nodes.iter().all(|n| n.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok")) {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await; // no event for cluster state: bounded poll
    }
    assert!(ok, "cluster state ok");
    let a = node(nodes.iter().map(|n| n.url()).collect()).await;
    let b = node(vec![nodes[2].url(), nodes[0].url()]).await;
    // Channels land on different shards; each stream is still atomic.
    let mut shards = std::collections::BTreeSet::new();
    for c in 0..12 {
        let ch = format!("chan:{c}");
        let items: Vec<_> =
            (0..3).map(|i| item(&format!("{ch}/m{i}"), format!("{c}/{i}").as_bytes(), Qos::ExactlyOnce, "u")).collect();
        let r = a.publish(&ch, KEEP, None, &items, 5, "e1").await.unwrap();
        assert_eq!(offsets(&r.items), ["new 1", "new 2", "new 3"], "{ch}");
        let again = b.publish(&ch, KEEP, None, &items[1..2], 6, "e1").await.unwrap();
        assert_eq!(offsets(&again.items), ["dup 2"], "{ch}");
        assert_eq!(b.range(&ch, 1, 10, usize::MAX).await.unwrap().len(), 3);
        let key = format!("ferry:{{{ch}}}:meta");
        let owner = nodes.iter().position(|n| n.cli(&["EXISTS", &key]) == "1");
        shards.insert(owner);
    }
    assert!(shards.len() >= 2, "channels spread over shards: {shards:?}");
    // Ids are unique across the cluster, whatever shard their channel is on.
    let r =
        b.publish("chan:0", KEEP, None, &[item("chan:5/m0", b"5/0", Qos::ExactlyOnce, "u")], 7, "e1").await.unwrap();
    assert_eq!(offsets(&r.items), ["conflict"]);
    b.release("chan:5", "chan:5/m0").await.unwrap();
}

#[tokio::test]
async fn an_evicting_redis_is_refused_and_a_locked_down_one_accepted_with_a_warning() {
    // Eviction would drop streams and ids: refused, naming the setting.
    let lru = Redis::start(&["--maxmemory-policy", "allkeys-lru"]);
    let cfg = RedisConfig { urls: vec![lru.url()], ..RedisConfig::default() };
    match RedisStreams::connect(&cfg).await {
        Err(EngineError::Config(m)) => assert!(m.contains("maxmemory-policy") && m.contains("noeviction"), "{m}"),
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("an evicting Redis was accepted"),
    }
    // The node refuses to start, saying why.
    let dir = common::TempDir::new("evict");
    let node = ferry_server::config::Config { redis: cfg, data_dir: dir.path().to_path_buf(), ..Default::default() };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let served =
        tokio::time::timeout(Duration::from_secs(20), ferry_server::serve(listener, None, node, async {})).await;
    let err = served.expect("serve returns at once").expect_err("refused");
    assert!(format!("{err:#}").contains("maxmemory-policy"), "{err:#}");
    // Managed Redis often forbids CONFIG: a warning, and on we go. Here an
    // ACL user without it, which also exercises AUTH on the fan-out link.
    let locked = Redis::start(&["--user", "ferry", "on", ">s3cret", "~*", "&*", "+@all", "-config"]);
    let url = format!("redis://ferry:s3cret@127.0.0.1:{}/", locked.port);
    let a = RedisStreams::connect(&RedisConfig { urls: vec![url], ..RedisConfig::default() }).await.unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let link = ferry_server::engine::pubsub::Link::connect(
        &ferry_server::engine::pubsub::NodeAddr { host: "127.0.0.1".into(), port: locked.port },
        &a.credentials(),
        a.link_tls(),
        Duration::from_secs(5),
        tx,
    )
    .await
    .unwrap();
    link.subscribe("SUBSCRIBE", &[a.fan_channel("news").into_bytes()]).await.unwrap();
    a.publish("news", KEEP, None, &[item("n1", b"hello", Qos::AtLeastOnce, "u")], 1, "e1").await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.expect("fan-out message");
    match got {
        Some(ferry_server::engine::pubsub::LinkEvent::Message { channel, payload }) => {
            let f = a.decode_fanout(std::str::from_utf8(&channel).unwrap(), &payload).unwrap();
            assert_eq!(f.publications[0].payload.data.0, b"hello");
        }
        other => panic!("{other:?}"),
    }
    // Without the password, the link is refused.
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    let wrong =
        ferry_server::engine::pubsub::Credentials { username: Some("ferry".into()), password: Some("no".into()) };
    let addr = ferry_server::engine::pubsub::NodeAddr { host: "127.0.0.1".into(), port: locked.port };
    assert!(ferry_server::engine::pubsub::Link::connect(&addr, &wrong, None, Duration::from_secs(5), tx)
        .await
        .is_err());
}

/// A publish meeting its channel's slot half-migrated: the script's keys
/// are split between two primaries, so Redis answers `TRYAGAIN` until the
/// slot settles. The publish is retried by the engine, stored once, in
/// order, soon after the slot settles; a retry of it is a duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_into_a_migrating_slot_is_retried_and_stored_once_soon_after_the_move() {
    let cluster = RedisCluster::start(3, 0, &[]).await;
    let a = node(cluster.urls()).await;
    let ch = "mig:1";
    let r = a.publish(ch, KEEP, None, &[item("m1", b"one", Qos::AtLeastOnce, "u")], 1000, "e1").await.unwrap();
    assert_eq!(offsets(&r.items), ["new 1"]);
    let meta = format!("ferry:{{{ch}}}:meta");
    let from = cluster.owner(&meta).expect("owner");
    let to = (0..3).find(|i| *i != from).unwrap();
    let m = cluster.slot_migration(cluster.slot_of(&meta), from, to);
    m.begin();
    m.move_key(&meta);
    let before = tryagain_count(m.from_port) + tryagain_count(m.to_port);
    let b = a.clone();
    let publish = tokio::spawn(async move {
        let two = [item("m2", b"two", Qos::ExactlyOnce, "u")];
        b.publish("mig:1", KEEP, None, &two, 1001, "e1").await
    });
    // The script met the split slot (no event for that: a bounded poll).
    let met =
        poll_until(Duration::from_secs(5), || tryagain_count(m.from_port) + tryagain_count(m.to_port) > before).await;
    assert!(met, "Redis answered TRYAGAIN");
    assert!(!publish.is_finished(), "the engine retries TRYAGAIN instead of failing at once");
    let settle = std::time::Instant::now();
    let mm = m.clone();
    tokio::task::spawn_blocking(move || {
        mm.move_keys(100);
        mm.finish();
    })
    .await
    .unwrap();
    let settled = settle.elapsed();
    let r = tokio::time::timeout(Duration::from_secs(10), publish).await.expect("bounded").unwrap().unwrap();
    let stored = settle.elapsed();
    println!("[migration] slot settled in {settled:.2?}; publish stored {stored:.2?} after the settling began");
    assert_eq!(offsets(&r.items), ["new 2"], "stored once, after the one before");
    assert!(
        stored < settled + Duration::from_millis(500),
        "stored soon after the slot settled, not after a long retry wait: {stored:?} (settled in {settled:?})"
    );
    let again = [item("m2", b"two", Qos::ExactlyOnce, "u")];
    let r = a.publish(ch, KEEP, None, &again, 1002, "e1").await.unwrap();
    assert_eq!(offsets(&r.items), ["dup 2"]);
    let h = a.range(ch, 1, 10, usize::MAX).await.unwrap();
    assert_eq!(h.iter().map(|p| p.message_id.as_str()).collect::<Vec<_>>(), ["m1", "m2"]);
    assert_eq!(a.header(ch).await.unwrap().unwrap().epoch, "e1", "no epoch change");

    // A slot that stays half-moved: a temporary error in bounded time (the
    // client retries it), nothing stored; stored once the slot settles.
    let ch = "mig:2";
    let r = a.publish(ch, KEEP, None, &[item("n1", b"one", Qos::AtLeastOnce, "u")], 1000, "e2").await.unwrap();
    assert_eq!(offsets(&r.items), ["new 1"]);
    let meta = format!("ferry:{{{ch}}}:meta");
    let from = cluster.owner(&meta).expect("owner");
    let to = (0..3).find(|i| *i != from).unwrap();
    let m = cluster.slot_migration(cluster.slot_of(&meta), from, to);
    m.begin();
    m.move_key(&meta);
    let t0 = std::time::Instant::now();
    let two = [item("n2", b"two", Qos::ExactlyOnce, "u")];
    let r = tokio::time::timeout(Duration::from_secs(10), a.publish(ch, KEEP, None, &two, 1001, "e2")).await;
    let failed_after = t0.elapsed();
    println!("[migration] a slot stuck half-moved: publish answered {r:?} after {failed_after:.2?}");
    assert!(matches!(r, Ok(Err(EngineError::Unavailable(_)))), "temporary: {r:?}");
    // The Cluster client's response timeout (5 s) bounds it.
    assert!(failed_after < Duration::from_secs(8), "bounded: {failed_after:?}");
    let mm = m.clone();
    tokio::task::spawn_blocking(move || {
        mm.move_keys(100);
        mm.finish();
    })
    .await
    .unwrap();
    let r = a.publish(ch, KEEP, None, &two, 1002, "e2").await.unwrap();
    assert_eq!(offsets(&r.items), ["new 2"], "the retry is stored once");
}

/// Primaries killed one after another under load (issue 14): after each
/// failover, once the cluster reports `ok`, one engine's connections serve
/// every channel again within a bound, reads and publishes alike. Seen
/// before: after a kill, the `redis` crate's Cluster connections of one
/// node answered "timed out" to every command for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_connections_serve_again_after_primaries_are_killed_one_after_another() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    let mut cluster = RedisCluster::start(3, 2, &[]).await;
    let a = node(cluster.urls()).await;
    let channels: Vec<String> = (0..12).map(|i| format!("kill:{i}")).collect();
    for ch in &channels {
        a.publish(ch, KEEP, None, &[item(&format!("{ch}/0"), b"x", Qos::AtLeastOnce, "u")], 1, "e1").await.unwrap();
    }
    // Load: publishes and reads in flight on every channel through the kills.
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let mut load = Vec::new();
    for (w, ch) in channels.iter().enumerate() {
        let (a, ch, stop, errors) = (a.clone(), ch.clone(), stop.clone(), errors.clone());
        load.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) && n < 100_000 {
                n += 1;
                let it = [item(&format!("{ch}/{w}/{n}"), b"load", Qos::AtLeastOnce, "u")];
                let p = a.publish(&ch, KEEP, None, &it, 2, "e1").await;
                let h = a.header(&ch).await;
                if p.is_err() || h.is_err() {
                    errors.fetch_add(1, Ordering::Relaxed);
                    // Not a busy loop against a dead shard.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }));
    }
    // Kill the primary of channel 0's shard, then another shard's, then the
    // one promoted for channel 0 (2 replicas each: one is left to promote).
    let meta = |ch: &str| format!("ferry:{{{ch}}}:meta");
    let first = cluster.owner(&meta(&channels[0])).expect("owner");
    let other = channels.iter().find_map(|ch| cluster.owner(&meta(ch)).filter(|o| *o != first)).expect("another shard");
    let mut killed = Vec::new();
    for round in 0..3 {
        let victim = match round {
            0 => first,
            1 => other,
            _ => cluster.owner(&meta(&channels[0])).expect("promoted"),
        };
        killed.push(victim);
        let port = cluster.nodes[victim].port;
        cluster.nodes[victim].kill9();
        let t_kill = std::time::Instant::now();
        // No event for "the cluster healed": a bounded poll of the survivors.
        let alive: Vec<usize> = (0..cluster.nodes.len()).filter(|i| !killed.contains(i)).collect();
        let healed = poll_until(Duration::from_secs(30), || {
            alive.iter().all(|i| cluster.nodes[*i].cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok"))
                && channels.iter().all(|ch| cluster.owner(&meta(ch)).is_some_and(|o| alive.contains(&o)))
        })
        .await;
        assert!(healed, "round {round}: the cluster healed after {port} was killed");
        let healed_after = t_kill.elapsed();
        // Every channel serves again, reads and publishes, within a bound.
        let t0 = std::time::Instant::now();
        for ch in &channels {
            loop {
                let it = [item(&format!("{ch}/probe/{round}"), b"p", Qos::AtLeastOnce, "u")];
                let p = tokio::time::timeout(Duration::from_secs(6), a.publish(ch, KEEP, None, &it, 3, "e1")).await;
                let h = tokio::time::timeout(Duration::from_secs(6), a.header(ch)).await;
                if matches!(p, Ok(Ok(_))) && matches!(h, Ok(Ok(Some(_)))) {
                    break;
                }
                assert!(
                    t0.elapsed() < Duration::from_secs(20),
                    "round {round}: {ch} still refused 20 s after the cluster healed: publish {p:?}, header {h:?}"
                );
            }
        }
        println!(
            "[kill] round {round}: killed {port}; healed after {healed_after:.2?}; every channel served {:.2?} later; errors so far {}",
            t0.elapsed(),
            errors.load(Ordering::Relaxed)
        );
    }
    stop.store(true, Ordering::Relaxed);
    for t in load {
        tokio::time::timeout(Duration::from_secs(30), t).await.expect("load ends").unwrap();
    }
}

/// A primary that hangs (`SIGSTOP`: its sockets stay open, nothing
/// answers) is replaced by its replica; an engine that had a connection to
/// it serves that shard again soon after, not never.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_primary_replaced_by_its_replica_is_left_behind() {
    common::logs();
    let cluster = RedisCluster::start(3, 1, &[]).await;
    let a = node(cluster.urls()).await;
    let ch = "hang:1";
    a.publish(ch, KEEP, None, &[item("h0", b"x", Qos::AtLeastOnce, "u")], 1, "e1").await.unwrap();
    let meta = format!("ferry:{{{ch}}}:meta");
    let victim = cluster.owner(&meta).expect("owner");
    cluster.nodes[victim].signal("-STOP");
    let t0 = std::time::Instant::now();
    let mut last = None;
    let mut n = 0;
    while t0.elapsed() < Duration::from_secs(40) {
        n += 1;
        let it = [item(&format!("h{n}"), b"y", Qos::AtLeastOnce, "u")];
        match tokio::time::timeout(Duration::from_secs(7), a.publish(ch, KEEP, None, &it, 2, "e1")).await {
            Ok(Ok(_)) => {
                last = Some(t0.elapsed());
                break;
            }
            r => println!("[hang] {:.2?}: {r:?}", t0.elapsed()),
        }
        // Reads too: they share the connections' fate.
        let h = tokio::time::timeout(Duration::from_secs(7), a.header(ch)).await;
        println!("[hang] {:.2?}: header {h:?}", t0.elapsed());
    }
    cluster.nodes[victim].signal("-CONT");
    println!("[hang] served again after {last:?}; connections replaced {} times", a.connections_replaced());
    assert!(last.is_some(), "the shard serves again through its promoted replica");
    assert!(a.connections_replaced() >= 1, "by replacing the connections that only timed out");
}
