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
}

/// Publish `PER_PUBLISHER` QoS 1/2 messages, a few per tick without waiting
/// for acks (pipelined), then drive until every one is acknowledged.
async fn publisher(mut c: TestClient, acked: watch::Sender<usize>) -> (TestClient, Vec<Sent>) {
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
                Ok(id) => sent.push(Sent { id, channel: channel.into() }),
                // Full while Redis fails over: try again next tick.
                Err(PublishError::OutboxFull) => break,
                Err(e) => panic!("publish refused: {e:?}"),
            }
        }
        c.run_for(Duration::from_millis(15)).await;
        acked.send_replace(c.acked.len());
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
    epochs_changed: usize,
    kill_to_switch: Option<Duration>,
    kill_to_acks: Option<Duration>,
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
        let (tx, rx) = watch::channel(0);
        acked_rx.push(rx);
        pub_tasks.push(tokio::spawn(publisher(c, tx)));
    }
    // Kill once a quarter of the load is acknowledged.
    let total_acked = |rx: &[watch::Receiver<usize>]| rx.iter().map(|r| *r.borrow()).sum::<usize>();
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
    let resumed_from = total_acked(&acked_rx);
    let mut kill_to_acks = None;
    let t1 = Instant::now();
    while t1.elapsed() < Duration::from_secs(30) {
        if total_acked(&acked_rx) > resumed_from {
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
        if *qos == Qos::ExactlyOnce {
            for ch in CHANNELS {
                let ids = c.ids(ch);
                out.qos2_duplicates += ids.len() - ids.iter().collect::<BTreeSet<_>>().len();
            }
        }
    }
    println!(
        "[failover] {} publishes ({} acked at the kill), {} acknowledged; acknowledged but not in the stream: {}; \
         (acknowledged, subscriber) not delivered: {} of which silent: {}; QoS 2 duplicates: {}; \
         epochs changed: {}/{}; kill -> new primary: {:?}; kill -> acks again: {:?}",
        out.published,
        acked_at_kill,
        out.acked,
        out.not_in_history,
        out.undelivered,
        out.silent,
        out.qos2_duplicates,
        out.epochs_changed,
        CHANNELS.len(),
        out.kill_to_switch,
        out.kill_to_acks,
    );
    out
}

/// The nodes' view of the failover (info by default, `FERRY_LOG` to
/// change), captured by the test harness: printed only when a test fails.
fn logs() {
    let f = tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("ferry_server=info"));
    let _ = tracing_subscriber::fmt().with_env_filter(f).with_test_writer().try_init();
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_primary_killed_under_load_loses_nothing_silently() {
    let _serial = SERIAL.lock().await;
    logs();
    // 3 primaries + 3 replicas; the shard of `acct:0` loses its primary.
    let mut cluster = RedisCluster::start(3, 1, &[]).await;
    let cfg = RedisConfig { urls: cluster.urls(), ..RedisConfig::default() };
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
    let replica = cluster
        .nodes
        .iter()
        .position(|n| n.cli(&["INFO", "replication"]).contains(&format!("master_port:{victim_port}")))
        .expect("the shard's replica");
    let (killed, survivor) = if victim < replica {
        let (a, b) = cluster.nodes.split_at_mut(replica);
        (&mut a[victim], &b[0])
    } else {
        let (a, b) = cluster.nodes.split_at_mut(victim);
        (&mut b[0], &a[replica])
    };
    let out = failover_under_load(
        &nodes,
        &cfg,
        || killed.kill9(),
        || async {
            // No event for "the replica took over the slots": a bounded
            // poll of its role.
            poll_until(Duration::from_secs(20), || survivor.role() == "master").await
        },
    )
    .await;
    assert!(out.kill_to_switch.is_some(), "a replica took over the shard");
    assert!(out.kill_to_acks.is_some(), "publishes are acknowledged again after the failover");
    assert_eq!(out.silent, 0, "a subscriber missing an acknowledged publish was told of the gap");
    if out.epochs_changed == 0 {
        assert_eq!(out.not_in_history, 0, "no epoch change: nothing acknowledged is missing");
        assert_eq!(out.qos2_duplicates, 0);
    }
}
