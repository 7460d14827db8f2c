//! A Redis primary killed with `kill -9` under load while a replica is
//! promoted (issue 14, test 3): real `redis-server` primary and replicas,
//! real Sentinels (or a real Redis Cluster), three real Ferry nodes and
//! real WebSocket clients, all on loopback. QoS 1/2 publishes are
//! pipelined from every node into channels subscribed on every node.
//!
//! * `durability = "replicated"`: no acknowledged publish is lost.
//! * `durability = "leader"`: no loss is silent: every acknowledged publish
//!   reaches each subscriber (live or from the stream), or the stream's
//!   epoch changed and that subscriber was told (`recovered = false`, or a
//!   gap event).
//!
//! Figures (publishes, acknowledged, lost, failover times, epochs) print
//! with `--nocapture`.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use ferry_core::client::{Event, PublishError};
use ferry_core::codec::Encoding;
use ferry_core::frame::Qos;
use ferry_server::engine::redis::{Durability, RedisConfig, RedisStreams};
use tokio::sync::watch;

/// The failover tests start many processes: one at a time on 2 cores.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const MASTER: &str = "ferrymain";
const CHANNELS: [&str; 2] = ["acct:0", "acct:1"];
/// Publishes per publisher (one publisher per node).
const PER_PUBLISHER: usize = 300;

/// One Sentinel-managed Redis: a primary, two replicas (so that the
/// promoted one still has a replica to confirm `WAIT 1`), three Sentinels.
struct SentinelRedis {
    primary: Redis,
    _replicas: Vec<Redis>,
    sentinels: Vec<SentinelProc>,
}

fn field(out: &str, name: &str) -> Option<String> {
    let lines: Vec<&str> = out.lines().collect();
    lines.iter().position(|l| *l == name).and_then(|i| lines.get(i + 1)).map(|s| s.to_string())
}

impl SentinelRedis {
    async fn start() -> SentinelRedis {
        let primary = Redis::start(&[]);
        let replicas: Vec<Redis> =
            (0..2).map(|_| Redis::start(&["--replicaof", "127.0.0.1", &primary.port.to_string()])).collect();
        let linked = poll_until(Duration::from_secs(20), || {
            replicas.iter().all(|r| r.cli(&["INFO", "replication"]).contains("master_link_status:up"))
        })
        .await;
        assert!(linked, "replicas linked");
        let sentinels: Vec<SentinelProc> = (0..3).map(|_| SentinelProc::start(MASTER, primary.port, 2000)).collect();
        // Each Sentinel must know both replicas (to promote one) and the
        // other two Sentinels (to reach the quorum and elect a leader).
        let known = poll_until(Duration::from_secs(20), || {
            sentinels.iter().all(|s| {
                let m = s.cli(&["SENTINEL", "MASTER", MASTER]);
                field(&m, "num-slaves").as_deref() == Some("2")
                    && field(&m, "num-other-sentinels").as_deref() == Some("2")
            })
        })
        .await;
        assert!(known, "sentinels see the replicas and each other");
        SentinelRedis { primary, _replicas: replicas, sentinels }
    }

    fn config(&self, durability: Durability) -> RedisConfig {
        RedisConfig {
            urls: self.sentinels.iter().map(SentinelProc::url).collect(),
            sentinel_master: Some(MASTER.into()),
            durability,
            ..RedisConfig::default()
        }
    }
}

fn node_config(redis: RedisConfig) -> ferry_server::config::Config {
    let mut cfg = test_config();
    cfg.redis = redis;
    // About the engine under failover, not admission control.
    cfg.limits.publish_rate = 0;
    cfg
}

/// One publish as the publisher made it.
struct Sent {
    id: String,
    channel: String,
    /// When the publisher first saw it acknowledged.
    acked_at: Option<Instant>,
}

/// Publish `PER_PUBLISHER` QoS 1/2 messages, a few per tick without waiting
/// for acks (pipelined), then drive until every one is acknowledged.
/// Reports (acknowledged, of which into `CHANNELS[0]`).
async fn publisher(mut c: TestClient, acked: watch::Sender<(usize, usize)>) -> (TestClient, Vec<Sent>) {
    let mut sent = Vec::new();
    let end = tokio::time::Instant::now() + Duration::from_secs(40);
    while (sent.len() < PER_PUBLISHER || c.session.outbox_len() > 0) && tokio::time::Instant::now() < end {
        for _ in 0..3 {
            if sent.len() >= PER_PUBLISHER {
                break;
            }
            let i = sent.len();
            let qos = [Qos::AtLeastOnce, Qos::ExactlyOnce][i % 2];
            let channel = CHANNELS[(i / 2) % CHANNELS.len()];
            let now = c.now();
            match c.session.publish(now, channel, format!("{i}").into_bytes(), qos) {
                Ok(id) => sent.push(Sent { id, channel: channel.into(), acked_at: None }),
                // Full while Redis fails over: try again next tick.
                Err(PublishError::OutboxFull) => break,
                Err(e) => panic!("publish refused: {e:?}"),
            }
        }
        c.run_for(Duration::from_millis(15)).await;
        let now = Instant::now();
        let mut first_channel = 0;
        for s in sent.iter_mut() {
            if s.acked_at.is_none() && c.acked.contains_key(&s.id) {
                s.acked_at = Some(now);
            }
            first_channel += usize::from(s.acked_at.is_some() && s.channel == CHANNELS[0]);
        }
        acked.send_replace((c.acked.len(), first_channel));
    }
    (c, sent)
}

/// Drive a subscriber until told to stop; reports how many publications
/// it surfaced.
async fn subscriber(mut c: TestClient, stop: Arc<AtomicBool>, got: watch::Sender<usize>) -> TestClient {
    let count = |c: &TestClient| c.received.values().map(Vec::len).sum::<usize>();
    while !stop.load(Ordering::Relaxed) {
        let before = count(&c);
        let s = stop.clone();
        c.run_until(Duration::from_millis(200), |c| count(c) != before || s.load(Ordering::Relaxed)).await;
        got.send_replace(count(&c));
    }
    c
}

fn subscribed_all(c: &TestClient) -> bool {
    CHANNELS.iter().all(|ch| c.events.iter().any(|e| matches!(e, Event::Subscribed { channel, .. } if channel == ch)))
}

/// Whether `c` was told of a gap on `ch` (after its first subscription).
fn told_of_gap(c: &TestClient, ch: &str) -> bool {
    let mut subscribes = 0;
    c.events.iter().any(|e| match e {
        Event::Gap { channel, .. } => channel == ch,
        Event::Subscribed { channel, recovered, .. } if channel == ch => {
            subscribes += 1;
            subscribes > 1 && !recovered
        }
        _ => false,
    })
}

/// What a run measured.
#[derive(Debug, Default)]
struct Outcome {
    published: usize,
    acked: usize,
    /// Acknowledged but missing from the stream (current epoch).
    not_in_history: usize,
    /// (acknowledged publish, subscriber) pairs not delivered.
    undelivered: usize,
    /// ... of which the subscriber was not told of a gap on that channel.
    silent: usize,
    qos2_duplicates: usize,
    /// Publications a subscriber (any QoS) surfaced twice.
    duplicates: usize,
    /// Publications a subscriber surfaced at an offset not above the one
    /// before (same channel, same epoch).
    out_of_order: usize,
    epochs_changed: usize,
    kill_to_switch: Option<Duration>,
    kill_to_acks: Option<Duration>,
    /// The longest time without a new acknowledgement on `CHANNELS[0]`.
    longest_ack_stall: Duration,
}

/// Kill the current primary under load; `promoted` waits for the new one
/// to be announced (Sentinel's `+switch-master`, or the Cluster's view).
async fn failover_under_load<F, Fut>(
    nodes: &[TestServer],
    redis: &RedisConfig,
    kill: impl FnOnce(),
    promoted: F,
) -> Outcome
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    // Subscribers: QoS 1 on the first node, QoS 2 on the others.
    let mut subs = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        let qos = if i == 0 { Qos::AtLeastOnce } else { Qos::ExactlyOnce };
        let mut c =
            TestClient::new(&n.url(), TestClient::config(&format!("sub{i}"), &format!("s{i}"), Encoding::Binary));
        for ch in CHANNELS {
            c.subscribe(ch, qos).await;
        }
        c.connect().await;
        subs.push((c, qos));
    }
    for (c, _) in subs.iter_mut() {
        assert!(c.run_until(Duration::from_secs(15), subscribed_all).await, "subscribed: {:?}", c.events);
    }
    let streams = RedisStreams::connect(redis).await.unwrap();
    let mut before = BTreeMap::new();
    for ch in CHANNELS {
        before.insert(ch, streams.header(ch).await.unwrap().expect("stream exists").epoch);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let mut sub_tasks = Vec::new();
    let mut sub_progress = Vec::new();
    for (c, qos) in subs {
        let (tx, rx) = watch::channel(0);
        sub_progress.push(rx);
        sub_tasks.push((tokio::spawn(subscriber(c, stop.clone(), tx)), qos));
    }
    let mut pub_tasks = Vec::new();
    let mut acked_rx = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        let mut c =
            TestClient::new(&n.url(), TestClient::config(&format!("pub{i}"), &format!("p{i}"), Encoding::Binary));
        c.connect().await;
        assert!(c.connected().await);
        let (tx, rx) = watch::channel((0, 0));
        acked_rx.push(rx);
        pub_tasks.push(tokio::spawn(publisher(c, tx)));
    }
    // Kill once a quarter of the load is acknowledged.
    let total_acked = |rx: &[watch::Receiver<(usize, usize)>]| rx.iter().map(|r| r.borrow().0).sum::<usize>();
    // The channel whose shard fails (or whose slot moves).
    let first_acked = |rx: &[watch::Receiver<(usize, usize)>]| rx.iter().map(|r| r.borrow().1).sum::<usize>();
    let quarter = nodes.len() * PER_PUBLISHER / 4;
    let mut first = acked_rx[0].clone();
    let t0 = Instant::now();
    while total_acked(&acked_rx) < quarter {
        // Any publisher's progress wakes us; bounded by the test's time.
        let _ = tokio::time::timeout(Duration::from_millis(100), first.changed()).await;
        assert!(t0.elapsed() < Duration::from_secs(20), "load did not start");
    }
    let acked_at_kill = total_acked(&acked_rx);
    let t_kill = Instant::now();
    kill();
    let switched = promoted().await;
    let kill_to_switch = switched.then(|| t_kill.elapsed());
    let resumed_from = first_acked(&acked_rx);
    let mut kill_to_acks = None;
    let t1 = Instant::now();
    while t1.elapsed() < Duration::from_secs(30) {
        if first_acked(&acked_rx) > resumed_from {
            kill_to_acks = Some(t_kill.elapsed());
            break;
        }
        let _ = tokio::time::timeout(Duration::from_millis(100), first.changed()).await;
    }
    let mut published = Vec::new();
    let mut acked = BTreeMap::new();
    for t in pub_tasks {
        let (c, sent) = t.await.unwrap();
        for (id, pos) in &c.acked {
            acked.insert(id.clone(), pos.clone());
        }
        published.extend(sent);
    }
    // Subscribers: until each has as many publications as were
    // acknowledged (or a bound: with `leader`, some may be gone for good).
    // A slow subscriber (a loaded CI machine, a long catch-up) is not a
    // lost one: wait while any of them still makes progress, and stop once
    // none has for 10 s (a stall) or after 60 s in all.
    let want = acked.len();
    let t_wait = Instant::now();
    loop {
        let done = sub_progress.iter().all(|rx| *rx.borrow() >= want);
        if done || t_wait.elapsed() > Duration::from_secs(60) {
            break;
        }
        let changes = sub_progress.iter_mut().map(|rx| Box::pin(rx.changed()));
        if tokio::time::timeout(Duration::from_secs(10), futures_util::future::select_all(changes)).await.is_err() {
            println!("[failover] no subscriber made progress for 10 s");
            break;
        }
    }
    println!(
        "[failover] subscribers after {:?}: {:?} of {want}",
        t_wait.elapsed(),
        sub_progress.iter().map(|rx| *rx.borrow()).collect::<Vec<_>>()
    );
    stop.store(true, Ordering::Relaxed);
    let mut subs = Vec::new();
    for (t, qos) in sub_tasks {
        subs.push((t.await.unwrap(), qos));
    }
    // The stream as the new primary has it (a fresh connection: this
    // test's own was idle through the failover).
    let streams = RedisStreams::connect(redis).await.unwrap();
    let mut history: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
    let mut epochs_changed = 0;
    for ch in CHANNELS {
        let h = streams.header(ch).await.unwrap().expect("stream");
        if h.epoch != before[ch] {
            epochs_changed += 1;
        }
        let pubs = streams.range(ch, 1, 10_000, usize::MAX).await.unwrap();
        history.insert(ch, pubs.into_iter().filter(|p| p.epoch == h.epoch).map(|p| p.message_id).collect());
    }
    let mut out = Outcome {
        published: published.len(),
        acked: acked.len(),
        epochs_changed,
        kill_to_switch,
        kill_to_acks,
        ..Outcome::default()
    };
    let mut ack_times: Vec<Instant> =
        published.iter().filter(|s| s.channel == CHANNELS[0]).filter_map(|s| s.acked_at).collect();
    ack_times.sort();
    out.longest_ack_stall = ack_times.windows(2).map(|w| w[1] - w[0]).max().unwrap_or_default();
    for s in &published {
        if !acked.contains_key(&s.id) {
            continue;
        }
        if !history[s.channel.as_str()].contains(&s.id) {
            out.not_in_history += 1;
        }
        for (c, _) in &subs {
            if !c.ids(&s.channel).contains(&s.id) {
                out.undelivered += 1;
                if !told_of_gap(c, &s.channel) {
                    out.silent += 1;
                }
            }
        }
    }
    // Which subscriber missed what: a failure names the node and channel.
    for (i, (c, _)) in subs.iter().enumerate() {
        for ch in CHANNELS {
            let got: BTreeSet<String> = c.ids(ch).into_iter().collect();
            let missed: Vec<&str> = published
                .iter()
                .filter(|s| s.channel == ch && acked.contains_key(&s.id) && !got.contains(&s.id))
                .map(|s| s.id.as_str())
                .collect();
            if !missed.is_empty() {
                println!(
                    "[failover] subscriber {i} on {ch}: missed {} (first {:?}), received {}, told of a gap: {}, \
                     events: {:?}",
                    missed.len(),
                    missed.first(),
                    got.len(),
                    told_of_gap(c, ch),
                    c.events
                        .iter()
                        .filter(|e| !matches!(e, Event::Publication(_) | Event::PublishAcked { .. }))
                        .collect::<Vec<_>>()
                );
            }
        }
    }
    for (c, qos) in &subs {
        for ch in CHANNELS {
            let ids = c.ids(ch);
            let dups = ids.len() - ids.iter().collect::<BTreeSet<_>>().len();
            out.duplicates += dups;
            if *qos == Qos::ExactlyOnce {
                out.qos2_duplicates += dups;
            }
            let offsets = c.offsets(ch);
            out.out_of_order += offsets.windows(2).filter(|w| w[1] <= w[0]).count();
        }
    }
    println!(
        "[failover] {} publishes ({} acked at the kill), {} acknowledged; acknowledged but not in the stream: {}; \
         (acknowledged, subscriber) not delivered: {} of which silent: {}; QoS 2 duplicates: {}; \
         duplicates (any QoS): {}; out of order: {}; epochs changed: {}/{}; kill -> new primary: {:?}; kill -> acks again: {:?}; \
         longest stall of acks on {}: {:.2?}",
        out.published,
        acked_at_kill,
        out.acked,
        out.not_in_history,
        out.undelivered,
        out.silent,
        out.qos2_duplicates,
        out.duplicates,
        out.out_of_order,
        out.epochs_changed,
        CHANNELS.len(),
        out.kill_to_switch,
        out.kill_to_acks,
        CHANNELS[0],
        out.longest_ack_stall,
    );
    out
}

async fn sentinel_run(durability: Durability) -> Outcome {
    logs();
    let mut redis = SentinelRedis::start().await;
    let cfg = redis.config(durability);
    let nodes = [
        TestServer::start_with_api(node_config(cfg.clone())).await,
        TestServer::start_with_api(node_config(cfg.clone())).await,
        TestServer::start_with_api(node_config(cfg.clone())).await,
    ];
    let old = redis.primary.port;
    let primary = &mut redis.primary;
    let sentinels = &mut redis.sentinels;
    let out = failover_under_load(
        &nodes,
        &cfg,
        || primary.kill9(),
        || async {
            // The first Sentinel to log `+switch-master` (an event, not a poll).
            let waits = sentinels.iter_mut().map(|s| Box::pin(s.switched.recv()));
            let first = futures_util::future::select_all(waits);
            match tokio::time::timeout(Duration::from_secs(20), first).await {
                Ok((Some(line), _, _)) => {
                    assert!(!line.ends_with(&format!(" {old}")), "{line}");
                    true
                }
                _ => false,
            }
        },
    )
    .await;
    assert!(out.kill_to_switch.is_some(), "Sentinel promoted a replica");
    assert!(out.kill_to_acks.is_some(), "publishes are acknowledged again after the failover");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_failover_with_replicated_durability_loses_no_acknowledged_publish() {
    let _serial = SERIAL.lock().await;
    let out = sentinel_run(Durability::Replicated).await;
    assert_eq!(out.acked, out.published, "every publish acknowledged in the end (outboxes retry)");
    assert_eq!(out.not_in_history, 0, "acknowledged = on a replica = in the stream after the failover");
    assert_eq!(out.undelivered, 0, "every subscriber got every acknowledged publish");
    assert_eq!(out.qos2_duplicates, 0, "exactly once at QoS 2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_failover_with_leader_durability_loses_nothing_silently() {
    let _serial = SERIAL.lock().await;
    let out = sentinel_run(Durability::Leader).await;
    assert_eq!(out.silent, 0, "a subscriber missing an acknowledged publish was told of the gap");
    if out.epochs_changed == 0 {
        assert_eq!(out.not_in_history, 0, "no epoch change: nothing acknowledged is missing");
        assert_eq!(out.qos2_duplicates, 0);
    }
}

/// A Redis Cluster of 3 primaries with `replicas` each; the primary of
/// `acct:0`'s shard is killed under load and one of its replicas takes over.
async fn cluster_kill_run(replicas: usize, durability: Durability) -> Outcome {
    let mut cluster = RedisCluster::start(3, replicas, &[]).await;
    let cfg = RedisConfig { urls: cluster.urls(), durability, ..RedisConfig::default() };
    let nodes = [
        TestServer::start_with_api(node_config(cfg.clone())).await,
        TestServer::start_with_api(node_config(cfg.clone())).await,
        TestServer::start_with_api(node_config(cfg.clone())).await,
    ];
    let key = format!("ferry:{{{}}}:meta", CHANNELS[0]);
    let victim = cluster.owner(&key).expect("owner");
    let other = cluster.owner(&format!("ferry:{{{}}}:meta", CHANNELS[1]));
    println!("[failover] cluster: {} on primary {victim}, {} on {other:?}", CHANNELS[0], CHANNELS[1]);
    let victim_port = cluster.nodes[victim].port;
    let shard_replicas: Vec<u16> = cluster
        .nodes
        .iter()
        .filter(|n| n.cli(&["INFO", "replication"]).contains(&format!("master_port:{victim_port}")))
        .map(|n| n.port)
        .collect();
    assert_eq!(shard_replicas.len(), replicas, "the shard's replicas");
    let role = |port: u16| {
        let out = std::process::Command::new("redis-cli").args(["-p", &port.to_string(), "ROLE"]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).lines().next().unwrap_or_default().to_string()
    };
    let killed = &mut cluster.nodes[victim];
    failover_under_load(
        &nodes,
        &cfg,
        || killed.kill9(),
        || async {
            // No event for "a replica took over the slots": a bounded poll
            // of their roles.
            poll_until(Duration::from_secs(20), || shard_replicas.iter().any(|p| role(*p) == "master")).await
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_primary_killed_under_load_loses_nothing_silently() {
    let _serial = SERIAL.lock().await;
    logs();
    // 3 primaries + 3 replicas; the shard of `acct:0` loses its primary.
    let out = cluster_kill_run(1, Durability::Leader).await;
    assert!(out.kill_to_switch.is_some(), "a replica took over the shard");
    assert!(out.kill_to_acks.is_some(), "publishes are acknowledged again after the failover");
    assert_eq!(out.silent, 0, "a subscriber missing an acknowledged publish was told of the gap");
    if out.epochs_changed == 0 {
        assert_eq!(out.not_in_history, 0, "no epoch change: nothing acknowledged is missing");
        assert_eq!(out.qos2_duplicates, 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_primary_killed_with_replicated_durability_loses_no_acknowledged_publish() {
    let _serial = SERIAL.lock().await;
    logs();
    // 3 primaries with 2 replicas each: after the kill the promoted replica
    // still has one to confirm `WAIT 1`, so publishes are acknowledged again.
    let out = cluster_kill_run(2, Durability::Replicated).await;
    assert!(out.kill_to_switch.is_some(), "a replica took over the shard");
    assert!(out.kill_to_acks.is_some(), "publishes are acknowledged again after the failover");
    assert_eq!(out.acked, out.published, "every publish acknowledged in the end (outboxes retry)");
    assert_eq!(out.not_in_history, 0, "nothing acknowledged is lost");
    assert_eq!(out.undelivered, 0, "every acknowledged publish reaches every subscriber");
    assert_eq!(out.epochs_changed, 0);
    assert_eq!(out.qos2_duplicates, 0);
}

/// A live slot migration under load (issue 14): the slot of `acct:0`'s
/// hash tag moves from its primary to another one with the real commands
/// (`SETSLOT IMPORTING/MIGRATING`, `MIGRATE ... KEYS`, `SETSLOT NODE` on
/// every primary) while three nodes publish into it and subscribers on
/// every node read it. During the move Redis answers the multi-key publish
/// script `TRYAGAIN` (some of its keys are on the source, some not yet);
/// nothing may be lost, duplicated or reordered, no epoch may change, and
/// fan-out must follow the slot to its new primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_slot_migrated_under_load_loses_and_duplicates_nothing() {
    let _serial = SERIAL.lock().await;
    logs();
    let cluster = RedisCluster::start(3, 0, &[]).await;
    let cfg = RedisConfig { urls: cluster.urls(), ..RedisConfig::default() };
    let nodes = [
        TestServer::start_with_api(node_config(cfg.clone())).await,
        TestServer::start_with_api(node_config(cfg.clone())).await,
        TestServer::start_with_api(node_config(cfg.clone())).await,
    ];
    let key = format!("ferry:{{{}}}:meta", CHANNELS[0]);
    let fan = format!("ferry:{{{}}}:fan", CHANNELS[0]);
    let slot = cluster.slot_of(&key);
    let from = cluster.owner(&key).expect("owner");
    let to = (0..cluster.nodes.len()).find(|i| *i != from && cluster.nodes[*i].role() == "master").expect("a target");
    let migration = cluster.slot_migration(slot, from, to);
    println!("[migration] {} (slot {slot}) from primary {from} to primary {to}", CHANNELS[0]);
    let subscribed_on = |port: u16| -> usize {
        // `PUBSUB SHARDNUMSUB <channel>`: the channel, then its count.
        cli_at(port, &["PUBSUB", "SHARDNUMSUB", &fan]).lines().nth(1).and_then(|n| n.parse().ok()).unwrap_or(0)
    };
    let figures: std::sync::Mutex<Vec<String>> = Default::default();
    let begin = migration.clone();
    let started = std::sync::Mutex::new(None::<Instant>);
    let out = failover_under_load(
        &nodes,
        &cfg,
        || {
            *started.lock().unwrap() = Some(Instant::now());
            begin.begin();
        },
        || async {
            let m = migration.clone();
            // Small batches, so publishes meet the half-moved slot.
            let moved = tokio::task::spawn_blocking(move || {
                let n = m.move_keys(4);
                m.finish();
                n
            })
            .await
            .unwrap();
            let t0 = started.lock().unwrap().expect("started");
            let moved_after = t0.elapsed();
            // Every primary agrees on the new owner (gossip; a bounded poll).
            let agreed = poll_until(Duration::from_secs(10), || cluster.owner(&key) == Some(to)).await;
            // Fan-out follows: each node's link now `SSUBSCRIBE`s on the
            // target, none on the source (no event to await from here).
            let followed = poll_until(Duration::from_secs(20), || {
                subscribed_on(migration.to_port) == nodes.len() && subscribed_on(migration.from_port) == 0
            })
            .await;
            figures.lock().unwrap().push(format!(
                "{moved} keys moved in {moved_after:.2?}; fan-out on the new primary after {:.2?} ({} node links; \
                 {} left on the old one)",
                t0.elapsed(),
                subscribed_on(migration.to_port),
                subscribed_on(migration.from_port)
            ));
            assert!(followed, "fan-out subscriptions moved with the slot");
            agreed
        },
    )
    .await;
    for f in figures.lock().unwrap().iter() {
        println!("[migration] {f}");
    }
    for (what, port) in [("source", migration.from_port), ("target", migration.to_port)] {
        let errors = cli_at(port, &["INFO", "errorstats"]);
        let errors: Vec<&str> = errors.lines().filter(|l| l.starts_with("errorstat_")).collect();
        println!("[migration] errors answered by the {what}: {errors:?}");
    }
    assert!(out.kill_to_switch.is_some(), "the slot moved");
    assert!(out.kill_to_acks.is_some(), "publishes are acknowledged again after the move");
    assert_eq!(out.epochs_changed, 0, "a migration is no loss: no epoch changes");
    assert_eq!(out.acked, out.published, "every publish acknowledged in the end (outboxes retry)");
    assert_eq!(out.not_in_history, 0, "every acknowledged publish is in the stream");
    assert_eq!(out.undelivered, 0, "every subscriber got every acknowledged publish");
    assert_eq!(out.duplicates, 0, "once");
    assert_eq!(out.out_of_order, 0, "in order");
}

/// Presence across three nodes while Sentinel replaces a primary killed
/// with `kill -9` (issue 14): clients present in one channel on every node
/// stay connected through the failover; afterwards every node's API gives
/// the same, unchanged lists and counts within a bounded time, nobody who
/// stayed was announced as gone (no `leave` push, no `offline` webhook),
/// and a client that disconnects after the failover leaves within the
/// grace period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_failover_keeps_presence_right_on_every_node() {
    use ferry_server::cluster_presence::NODE_BEAT_MS;
    let _serial = SERIAL.lock().await;
    logs();
    const GRACE_MS: u64 = 300;
    const CH: &str = "room:p";
    let mut redis = SentinelRedis::start().await;
    let (hook_url, hooks, _) = hook_receiver().await;
    let mut cfg = node_config(redis.config(Durability::Leader));
    cfg.presence_grace_ms = GRACE_MS;
    cfg.namespaces.insert(
        "room".into(),
        ferry_server::config::Namespace { join_leave: true, ..ferry_server::config::Namespace::default() },
    );
    cfg.webhooks = ferry_server::config::WebhookConfig {
        url: hook_url,
        secret: "a webhook secret of a decent length".into(),
        events: vec!["online".into(), "offline".into()],
        retry_initial_ms: 50,
        ..Default::default()
    };
    let nodes = [
        TestServer::start_with_api(cfg.clone()).await,
        TestServer::start_with_api(cfg.clone()).await,
        TestServer::start_with_api(cfg.clone()).await,
    ];
    let apis: Vec<std::net::SocketAddr> = nodes.iter().map(|n| n.api.unwrap()).collect();
    // The watcher (node 0) sees join/leave; alice on nodes 0 and 1, bob on
    // node 1, carol on node 2.
    let placement = [("watch", 0), ("alice", 0), ("alice", 1), ("bob", 1), ("carol", 2)];
    let mut cs: Vec<TestClient> = Vec::new();
    for (i, (user, node)) in placement.iter().enumerate() {
        let mut c = TestClient::new(&nodes[*node].url(), TestClient::config(&format!("d{i}"), user, Encoding::Binary));
        c.subscribe(CH, Qos::AtLeastOnce).await;
        c.connect().await;
        cs.push(c);
    }
    let subscribed = |c: &TestClient| c.events.iter().any(|e| matches!(e, Event::Subscribed { .. }));
    assert!(run_all(&mut cs, Duration::from_secs(20), |cs| cs.iter().all(subscribed)).await, "subscribed");
    let stats = serde_json::json!({"channel": CH});
    let users = serde_json::json!({"users": ["alice", "bob", "carol", "watch", "nobody"]});
    // What every node must answer: (counts, client ids, online users).
    type View = (serde_json::Value, Vec<String>, serde_json::Value);
    async fn view(api: std::net::SocketAddr, stats: &serde_json::Value, users: &serde_json::Value) -> Option<View> {
        let (s1, counts) = http(api, "POST", "/api/presence_stats", Some(stats), None).await;
        let (s2, list) = http(api, "POST", "/api/presence", Some(stats), None).await;
        let (s3, online) = http(api, "POST", "/api/online", Some(users), None).await;
        if (s1, s2, s3) != (200, 200, 200) {
            return None;
        }
        let mut ids: Vec<String> = list["clients"]
            .as_array()
            .map(|a| a.iter().filter_map(|c| c["client"].as_str().map(str::to_string)).collect())
            .unwrap_or_default();
        ids.sort();
        Some((counts, ids, online["online"].clone()))
    }
    // Every node agrees on `want` (None: on the same full view); bounded
    // poll, driving the clients meanwhile (no event for a Redis write).
    async fn agreed(
        cs: &mut [TestClient],
        apis: &[std::net::SocketAddr],
        stats: &serde_json::Value,
        users: &serde_json::Value,
        want: impl Fn(&View) -> bool,
        limit: Duration,
    ) -> Option<View> {
        let end = tokio::time::Instant::now() + limit;
        loop {
            let mut views = Vec::new();
            for api in apis {
                views.push(view(*api, stats, users).await);
            }
            if let Some(Some(v)) = views.first() {
                if views.iter().all(|w| w.as_ref() == Some(v)) && want(v) {
                    return Some(v.clone());
                }
            }
            if tokio::time::Instant::now() >= end {
                println!("[presence] views not agreed: {views:?}");
                return None;
            }
            run_all(cs, Duration::from_millis(50), |_| false).await;
        }
    }
    let full = |v: &View| v.0 == serde_json::json!({"clients": 5, "users": 4});
    let before = agreed(&mut cs, &apis, &stats, &users, full, Duration::from_secs(20)).await.expect("presence before");
    assert_eq!(before.2, serde_json::json!(["alice", "bob", "carol", "watch"]));
    // Every join pushed before the kill (a join is pushed once its writes
    // are done), so whatever the watcher sees later came after.
    let joined_all = |c: &TestClient| {
        ["alice", "bob", "carol"]
            .iter()
            .all(|u| c.events.iter().any(|e| matches!(e, Event::Join { info, .. } if info.user == *u)))
    };
    assert!(run_all(&mut cs, Duration::from_secs(10), |cs| joined_all(&cs[0])).await, "joins pushed");
    let events_before = cs[0].events.len();

    // Kill the primary; the clients keep running until Sentinel switched.
    let old = redis.primary.port;
    redis.primary.kill9();
    let killed = Instant::now();
    let mut switched = None;
    while killed.elapsed() < Duration::from_secs(20) && switched.is_none() {
        run_all(&mut cs, Duration::from_millis(50), |_| false).await;
        switched = redis.sentinels.iter_mut().find_map(|s| s.switched.try_recv().ok());
    }
    let line = switched.expect("Sentinel promoted a replica");
    assert!(!line.ends_with(&format!(" {old}")), "{line}");
    let switch_after = killed.elapsed();
    let same = |v: &View| *v == before;
    let after = agreed(&mut cs, &apis, &stats, &users, same, Duration::from_secs(20)).await;
    let right_after = killed.elapsed();
    assert!(after.is_some(), "every node gives the same presence as before the failover");
    // Nobody left: no leave push, no offline webhook, no reconnect.
    run_all(&mut cs, Duration::from_millis(2 * NODE_BEAT_MS + GRACE_MS), |_| false).await;
    let gone: Vec<&Event> = cs[0].events[events_before..].iter().filter(|e| matches!(e, Event::Leave { .. })).collect();
    let joined: Vec<&Event> =
        cs[0].events[events_before..].iter().filter(|e| matches!(e, Event::Join { .. })).collect();
    let offline: Vec<serde_json::Value> =
        hooks.lock().unwrap().iter().filter(|h| h["event"] == "offline").cloned().collect();
    let reconnects =
        cs.iter().map(|c| c.events.iter().filter(|e| matches!(e, Event::Subscribed { .. })).count() - 1).sum::<usize>();
    println!(
        "[presence] kill -> new primary {switch_after:.2?}; kill -> every node's presence right again {right_after:.2?}; \
         after the failover: leaves {}, joins {}, offline webhooks {}, client resubscribes {reconnects}",
        gone.len(),
        joined.len(),
        offline.len()
    );
    assert!(gone.is_empty(), "no spurious leave: {gone:?}");
    assert!(joined.is_empty(), "no spurious join: {joined:?}");
    assert!(offline.is_empty(), "no spurious offline: {offline:?}");
    assert_eq!(view(apis[2], &stats, &users).await.as_ref(), Some(&before), "still right");

    // The new primary may lack the tail of the old one's writes
    // (asynchronous replication; on loopback it had them all). Take away
    // what such a tail would hold: node 2's beat and carol's entries. Node 2
    // finds itself missing at its next beat and re-registers: the views are
    // right again within a beat or two, with no leave (the entry was never
    // removed by a leave), only a join push for carol.
    let streams = RedisStreams::connect(&redis.config(Durability::Leader)).await.unwrap();
    let pres = format!("ferry:{{{CH}}}:pres");
    let entries: Vec<(String, String)> = streams.query(redis::cmd("HGETALL").arg(&pres)).await.unwrap();
    let (client, node) = entries
        .iter()
        .find(|(_, v)| v.split('\n').nth(1) == Some("carol"))
        .map(|(c, v)| (c.clone(), v.split('\n').next().unwrap_or_default().to_string()))
        .expect("carol's entry");
    let _: i64 = streams.query(redis::cmd("ZREM").arg("ferry:nodes").arg(&node)).await.unwrap();
    let _: i64 = streams.query(redis::cmd("HDEL").arg(&pres).arg(&client)).await.unwrap();
    let _: i64 = streams.query(redis::cmd("HDEL").arg(format!("ferry:{{{CH}}}:pusers")).arg("carol")).await.unwrap();
    let _: i64 = streams.query(redis::cmd("HDEL").arg("ferry:{carol}:online").arg(&client)).await.unwrap();
    let lost = Instant::now();
    let partial = view(apis[0], &stats, &users).await;
    let back = agreed(&mut cs, &apis, &stats, &users, same, Duration::from_secs(10)).await;
    let back_after = lost.elapsed();
    assert!(back.is_some(), "node 2 re-registered: every node's presence right again");
    run_all(&mut cs, Duration::from_millis(2 * NODE_BEAT_MS), |_| false).await;
    let since: Vec<String> = cs[0].events[events_before..]
        .iter()
        .filter(|e| matches!(e, Event::Join { .. } | Event::Leave { .. }))
        .map(|e| format!("{e:?}"))
        .collect();
    let carol_hooks: Vec<String> = hooks
        .lock()
        .unwrap()
        .iter()
        .filter(|h| h["user"] == "carol")
        .map(|h| format!("{} {}", h["event"], h["transition"]))
        .collect();
    println!(
        "[presence] a lost tail simulated (node 2's beat and carol's entries gone): right again after {back_after:.2?} \
         (view meanwhile {partial:?}); pushes since the failover {since:?}; carol's webhooks {carol_hooks:?}"
    );
    assert!(since.iter().all(|e| !e.starts_with("Leave")), "no leave for a client that stayed: {since:?}");

    // Carol (alone on node 2) leaves after the failover: within the grace
    // period (and the sweep), on every node.
    let now = cs[4].now();
    cs[4].session.disconnect(now);
    cs[4].run_for(Duration::from_millis(50)).await;
    let carol = cs.pop().unwrap();
    drop(carol);
    let left = Instant::now();
    let carol_left =
        |c: &TestClient| c.events.iter().any(|e| matches!(e, Event::Leave { info, .. } if info.user == "carol"));
    assert!(run_all(&mut cs, Duration::from_secs(10), |cs| carol_left(&cs[0])).await, "carol's leave pushed");
    let leave_after = left.elapsed();
    let without_carol = |v: &View| {
        v.0 == serde_json::json!({"clients": 4, "users": 3}) && v.2 == serde_json::json!(["alice", "bob", "watch"])
    };
    assert!(agreed(&mut cs, &apis, &stats, &users, without_carol, Duration::from_secs(10)).await.is_some());
    let bound = Duration::from_millis(GRACE_MS + 2 * NODE_BEAT_MS);
    println!("[presence] carol disconnected after the failover: leave after {leave_after:.2?} (grace {GRACE_MS} ms + 2 beats = {bound:?})");
    assert!(
        leave_after <= bound + Duration::from_millis(500),
        "leave within the grace period and a sweep: {leave_after:?}"
    );
}
