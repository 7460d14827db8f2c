//! Three `ferry` nodes on one Redis (docs/CLUSTER.md): kill -9 of nodes
//! under a QoS 1/2 load while clients that know every node's URL are
//! spread over them. No acknowledged publish may be lost, no QoS 2
//! subscriber may see a message twice, and clients resume on the nodes
//! left by themselves.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use ferry_client::{PublishAck, Qos};
use ferry_e2e::load::{self, Tag, Verdict};
use ferry_e2e::{builder_urls, seed, wait_subscribed, FaultProxy, FerryServer, RedisServer, Rng, Settings};

const CHANNEL: &str = "orders:cluster";
const WINDOW: usize = 32;
const T: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_nodes_under_load_loses_no_acknowledged_publish() {
    let _serial = ferry_e2e::serial().await;
    let mut rng = Rng::new(seed("cluster"));
    let redis = RedisServer::start();
    let settings = Settings { redis: Some(redis.url()), ..Settings::default() };
    let mut nodes = Vec::new();
    for _ in 0..3 {
        nodes.push(FerryServer::start(&settings).await);
    }
    let urls: Vec<String> = nodes.iter().map(|n| n.url()).collect();

    let subs = readers(&urls, "reader", 8, &mut rng).await;
    let publisher = builder_urls(&urls, "writer", "writer-dev", rng.next_u64()).build().unwrap();
    publisher.connect();
    let load = load::tagged_load(&publisher, CHANNEL, WINDOW);
    let acked = load.acked.clone();
    // Kill node 0, then node 1: whoever was on them must move, and
    // everyone ends on node 2.
    let mut progress = acked.subscribe();
    let mut resumed = Vec::new();
    let mut kills = Vec::new();
    for (round, victim) in [0usize, 1].into_iter().enumerate() {
        let target = *progress.borrow() + rng.between(200, 400) as usize;
        let reached = tokio::time::timeout(T, progress.wait_for(|n| *n >= target)).await.is_ok();
        assert!(reached, "round {round}: load stalled at {} acks", *acked.borrow());
        nodes[victim].kill9();
        let killed = Instant::now();
        kills.push(killed);
        let n = *progress.borrow();
        tokio::time::timeout(T, progress.wait_for(|m| *m > n + WINDOW))
            .await
            .unwrap_or_else(|_| panic!("round {round}: acks did not resume after node {victim} died"))
            .unwrap();
        resumed.push(killed.elapsed());
    }
    let results = load.finish(T).await;
    let Settled { failed, expected, stored_tags, stored, epochs } = settle(&publisher, &results).await;
    let acks: Vec<&PublishAck> = results.iter().filter_map(|r| r.as_ref()?.as_ref().ok()).collect();
    let mut total = Verdict::default();
    // Per client that had to move: kill -> resubscribed on a live node, and
    // kill -> its first publication after that.
    let (mut to_sub, mut to_data) = (Vec::new(), Vec::new());
    for (qos, c, task) in subs {
        let rec = task.await.unwrap();
        for (k, killed) in kills.iter().enumerate() {
            let next = kills.get(k + 1).copied();
            let Some(at) = rec.resubscribed_at.iter().find(|t| **t > *killed && next.is_none_or(|n| **t < n)) else {
                continue;
            };
            to_sub.push(*at - *killed);
            if let Some(s) = rec.seen.iter().find(|s| s.at >= *at) {
                to_data.push(s.at - *killed);
            }
        }
        let v = Verdict::of(&rec, &expected);
        println!(
            "[cluster] {qos:?} subscriber: {v:?}, resubscribed {}, unrecovered {}, gaps {}, complete {}",
            rec.resubscribed,
            rec.unrecovered,
            rec.gaps.len(),
            rec.complete
        );
        assert!(rec.complete, "{qos:?}: the END marker arrived");
        assert_eq!((v.lost, v.offset_regressions, v.fifo_violations, v.unexpected), (0, 0, 0, 0), "{qos:?}: {v:?}");
        if qos == Qos::ExactlyOnce {
            assert_eq!(v.duplicates, 0, "exactly once: {v:?}");
        }
        total.add(&v);
        c.close(Duration::from_millis(100)).await;
    }
    println!(
        "[cluster] 3 nodes on one Redis, 2 killed: {} publishes, {} acknowledged, {failed} failed; stored {} (epochs {}); \
         acks resumed {:.2?} and {:.2?} after each kill; subscribers in total: {total:?}",
        results.len(),
        acks.len(),
        stored_tags.len(),
        epochs.len(),
        resumed[0],
        resumed[1]
    );
    println!(
        "[cluster] clients moved: {}; kill -> resubscribed p50 {:.2?} p99 {:.2?}; kill -> data again p50 {:.2?} p99 {:.2?}",
        to_sub.len(),
        percentile(&mut to_sub, 50),
        percentile(&mut to_sub, 99),
        percentile(&mut to_data, 50),
        percentile(&mut to_data, 99),
    );
    assert!(!to_sub.is_empty(), "clients on the killed nodes moved");
    assert_eq!(failed, 0, "every publish acknowledged");
    assert_eq!(stored_tags, expected, "every acknowledged publish is stored");
    assert_eq!(stored.len(), expected.len() + 1, "each stored once");
    assert_eq!(epochs.len(), 1, "no epoch change: nothing was lost");
}

/// docs/DEPLOY.md section 5: a rolling restart, each node in turn stopped
/// with SIGTERM (the drain: close 3000) and started again while a QoS 1/2
/// load runs and subscribers that know every URL are spread over the
/// nodes. Nothing acknowledged may be lost, no QoS 2 subscriber sees a
/// duplicate, and each node exits 0 within its drain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_with_sigterm_loses_nothing() {
    let _serial = ferry_e2e::serial().await;
    let mut rng = Rng::new(seed("rolling"));
    let redis = RedisServer::start();
    let settings = Settings { redis: Some(redis.url()), ..Settings::default() };
    let mut nodes = Vec::new();
    for _ in 0..3 {
        nodes.push(FerryServer::start(&settings).await);
    }
    let urls: Vec<String> = nodes.iter().map(|n| n.url()).collect();
    let subs = readers(&urls, "r", 6, &mut rng).await;
    let publisher = builder_urls(&urls, "writer", "writer-dev", rng.next_u64()).build().unwrap();
    publisher.connect();
    let load = load::tagged_load(&publisher, CHANNEL, WINDOW);
    let acked = load.acked.clone();
    let mut progress = acked.subscribe();
    let mut drains = Vec::new();
    for (i, node) in nodes.iter_mut().enumerate() {
        let target = *progress.borrow() + rng.between(150, 300) as usize;
        let reached = tokio::time::timeout(T, progress.wait_for(|n| *n >= target)).await.is_ok();
        assert!(reached, "node {i}: load stalled at {} acks", *acked.borrow());
        let stopping = Instant::now();
        let status = node.terminate(Duration::from_secs(15)).await;
        drains.push(stopping.elapsed());
        assert!(status.is_some_and(|s| s.success()), "node {i} after SIGTERM: {status:?}");
        node.start_again().await;
        let up = tokio::time::timeout(T, async {
            while !ready(node.addr()).await {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        assert!(up.await.is_ok(), "node {i} ready again");
        let n = *progress.borrow();
        let resumed = tokio::time::timeout(T, progress.wait_for(|m| *m > n + WINDOW)).await;
        assert!(resumed.is_ok(), "node {i}: acks resume after its restart");
    }
    let results = load.finish(T).await;
    let Settled { failed, expected, stored_tags, stored, epochs } = settle(&publisher, &results).await;
    let mut total = Verdict::default();
    let mut moved = 0;
    for (qos, c, task) in subs {
        let rec = task.await.unwrap();
        let v = Verdict::of(&rec, &expected);
        assert!(rec.complete, "{qos:?}: the END marker arrived");
        assert_eq!((v.lost, v.offset_regressions, v.fifo_violations, v.unexpected), (0, 0, 0, 0), "{qos:?}: {v:?}");
        if qos == Qos::ExactlyOnce {
            assert_eq!(v.duplicates, 0, "exactly once: {v:?}");
        }
        moved += rec.resubscribed;
        total.add(&v);
        c.close(Duration::from_millis(100)).await;
    }
    println!(
        "[rolling] 3 nodes on one Redis, each restarted with SIGTERM (drains {drains:.2?}): {} publishes, {failed} failed, \
         stored {}; subscribers resubscribed {moved} times; in total {total:?}",
        results.len(),
        stored_tags.len(),
    );
    // Every node was restarted once, so every subscriber moved at least once.
    assert!(moved >= 6, "subscribers moved ({moved})");
    assert_eq!(failed, 0, "every publish acknowledged");
    assert_eq!(stored_tags, expected, "every acknowledged publish is stored");
    assert_eq!(stored.len(), expected.len() + 1, "each stored once");
    assert_eq!(epochs.len(), 1, "no epoch change: nothing was lost");
}

/// The `p`th percentile (nearest rank) of `v`; zero when empty.
/// `n` subscribers knowing every URL, QoS 2 and 1 by turns, each
/// recording `CHANNEL` for at most 120 s.
async fn readers(
    urls: &[String],
    name: &str,
    n: usize,
    rng: &mut Rng,
) -> Vec<(Qos, ferry_client::Client, tokio::task::JoinHandle<load::Record>)> {
    let mut subs = Vec::new();
    for i in 0..n {
        let qos = if i % 2 == 0 { Qos::ExactlyOnce } else { Qos::AtLeastOnce };
        let c = builder_urls(urls, &format!("{name}{i}"), &format!("{name}{i}-dev"), rng.next_u64()).build().unwrap();
        let mut s = c.subscribe(CHANNEL, qos).await.unwrap();
        c.connect();
        assert!(wait_subscribed(&mut s, T).await);
        subs.push((qos, c, tokio::spawn(load::record(s, Duration::from_secs(120)))));
    }
    subs
}

fn percentile(v: &mut [Duration], p: usize) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    v.sort();
    v[((v.len() * p).div_ceil(100)).clamp(1, v.len()) - 1]
}

/// What a tagged load left in the stream, after its END marker.
struct Settled {
    /// Publishes not acknowledged.
    failed: usize,
    /// Every tag the load published.
    expected: BTreeSet<Tag>,
    /// The tags stored (the END marker left out).
    stored_tags: BTreeSet<Tag>,
    /// Every publication stored, END included.
    stored: Vec<ferry_client::Publication>,
    /// Distinct epochs among them.
    epochs: BTreeSet<String>,
}

/// Publish the END marker after the load's `results` and read the stream.
async fn settle(publisher: &ferry_client::Client, results: &load::Outcomes) -> Settled {
    publisher.publish(CHANNEL, Tag::END.encode(), Qos::ExactlyOnce).await.expect("END marker");
    let failed = results.iter().filter(|r| !matches!(r, Some(Ok(_)))).count();
    let expected = (0..results.len() as u32).map(|seq| Tag { publisher: 0, seq }).collect();
    let (stored, _) = load::full_history(publisher, CHANNEL).await.expect("history");
    let stored_tags = stored.iter().filter_map(Tag::of).filter(|t| *t != Tag::END).collect();
    let epochs = stored.iter().map(|p| p.epoch.clone()).collect();
    Settled { failed, expected, stored_tags, stored, epochs }
}

/// Whether `/readyz` of a node answers 200.
async fn ready(addr: std::net::SocketAddr) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else { return false };
    let _ = s.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
    let mut out = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out)).await;
    out.starts_with("HTTP/1.1 200")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_for_ten_seconds_loses_no_acknowledged_publish() {
    const OUTAGE: Duration = Duration::from_secs(10);
    let _serial = ferry_e2e::serial().await;
    let mut rng = Rng::new(seed("redis-outage"));
    let mut redis = RedisServer::start_persistent();
    let settings = Settings { redis: Some(redis.url()), ..Settings::default() };
    let nodes = [FerryServer::start(&settings).await, FerryServer::start(&settings).await];
    let mut subs = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        let qos = if i == 0 { Qos::ExactlyOnce } else { Qos::AtLeastOnce };
        let c = builder_urls(&[node.url()], &format!("r{i}"), &format!("r{i}-dev"), rng.next_u64()).build().unwrap();
        let mut s = c.subscribe(CHANNEL, qos).await.unwrap();
        c.connect();
        assert!(wait_subscribed(&mut s, T).await);
        subs.push((qos, c, tokio::spawn(load::record(s, Duration::from_secs(60)))));
    }
    let publisher = builder_urls(&[nodes[0].url()], "w", "w-dev", rng.next_u64()).build().unwrap();
    publisher.connect();
    let load = load::tagged_load(&publisher, CHANNEL, WINDOW);
    let acked = load.acked.clone();
    let mut progress = acked.subscribe();
    assert!(tokio::time::timeout(T, progress.wait_for(|n| *n >= 300)).await.is_ok(), "load runs");
    redis.kill9();
    let at_kill = *acked.borrow();
    // The outage itself is the scenario: its length is the point, not a sync.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let settled = *acked.borrow();
    let readyz_down = !ready(nodes[0].addr()).await && !ready(nodes[1].addr()).await;
    tokio::time::sleep(OUTAGE - Duration::from_secs(1)).await;
    let during = *acked.borrow() - settled;
    redis.restart();
    let back = Instant::now();
    let n = *acked.borrow();
    tokio::time::timeout(T, progress.wait_for(|m| *m > n + WINDOW))
        .await
        .expect("acks resume after Redis is back")
        .ok();
    let resumed = back.elapsed();
    let results = load.finish(T).await;
    let Settled { failed, expected, stored_tags, stored, epochs } = settle(&publisher, &results).await;
    let mut verdicts = Vec::new();
    for (qos, c, task) in subs {
        let rec = task.await.unwrap();
        let v = Verdict::of(&rec, &expected);
        println!(
            "[redis outage] {qos:?} subscriber: {v:?}, resubscribed {}, unrecovered {}, complete {}, ended {:?}",
            rec.resubscribed, rec.unrecovered, rec.complete, rec.ended
        );
        verdicts.push((qos, c, rec, v));
    }
    for (qos, c, rec, v) in verdicts {
        assert!(rec.complete, "{qos:?}: the END marker arrived");
        // Publishes refused as temporary are retried after the ones that
        // succeeded meanwhile (PROTOCOL.md 7.5): publisher order may bend
        // there, offset order and completeness may not.
        assert_eq!((v.lost, v.offset_regressions, v.unexpected), (0, 0, 0), "{qos:?}: {v:?}");
        if qos == Qos::ExactlyOnce {
            assert_eq!(v.duplicates, 0, "exactly once: {v:?}");
        }
        c.close(Duration::from_millis(100)).await;
    }
    println!(
        "[redis outage] Redis (appendfsync always) killed for {OUTAGE:?}: {} publishes, {} acked before the kill, \
         {during} acked while it was down, {failed} failed; acks resumed {resumed:.2?} after it was back; \
         stored {} (epochs {})",
        results.len(),
        at_kill,
        stored_tags.len(),
        epochs.len()
    );
    assert!(readyz_down, "/readyz is 503 on both nodes while Redis is down");
    assert_eq!(during, 0, "nothing is acknowledged while Redis is down");
    assert_eq!(failed, 0, "every publish is acknowledged in the end (the outbox resends temporary failures)");
    assert_eq!(stored_tags, expected, "every acknowledged publish is stored");
    assert_eq!(stored.len(), expected.len() + 1, "each stored once");
    assert_eq!(epochs.len(), 1, "Redis kept everything: no new epoch");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_off_from_redis_by_a_blackhole_loses_nothing_and_catches_up() {
    // A partition, not a crash: node 1 reaches Redis through the fault
    // proxy, which stops forwarding (sockets stay open, nothing errors)
    // for longer than Redis's response timeout and the fan-out health check.
    const PARTITION: Duration = Duration::from_secs(8);
    let _serial = ferry_e2e::serial().await;
    let mut rng = Rng::new(seed("redis-partition"));
    let redis = RedisServer::start();
    let proxy = FaultProxy::start(redis.addr()).await.unwrap();
    let direct = Settings { redis: Some(redis.url()), ..Settings::default() };
    let cut_off = Settings { redis: Some(format!("redis://{}", proxy.addr())), ..Settings::default() };
    let nodes = [FerryServer::start(&direct).await, FerryServer::start(&cut_off).await];
    let mut subs = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        for qos in [Qos::ExactlyOnce, Qos::AtLeastOnce] {
            let name = format!("r{i}{}", qos as u8);
            let c = builder_urls(&[node.url()], &name, &format!("{name}-dev"), rng.next_u64()).build().unwrap();
            let mut s = c.subscribe(CHANNEL, qos).await.unwrap();
            c.connect();
            assert!(wait_subscribed(&mut s, T).await);
            subs.push((i, qos, c, tokio::spawn(load::record(s, Duration::from_secs(90)))));
        }
    }
    // The publisher is on the node that will be cut off.
    let publisher = builder_urls(&[nodes[1].url()], "w", "w-dev", rng.next_u64()).build().unwrap();
    publisher.connect();
    let load = load::tagged_load(&publisher, CHANNEL, WINDOW);
    let acked = load.acked.clone();
    let mut progress = acked.subscribe();
    assert!(tokio::time::timeout(T, progress.wait_for(|n| *n >= 300)).await.is_ok(), "load runs");
    proxy.blackhole(true);
    let at_cut = *acked.borrow();
    // The partition's length is the scenario, not a synchronisation.
    tokio::time::sleep(PARTITION).await;
    let during = *acked.borrow() - at_cut;
    proxy.heal();
    let healed = Instant::now();
    let n = *acked.borrow();
    tokio::time::timeout(T, progress.wait_for(|m| *m > n + WINDOW)).await.expect("acks resume after the heal").ok();
    let resumed = healed.elapsed();
    let results = load.finish(T).await;
    let Settled { failed, expected, stored_tags, stored, epochs } = settle(&publisher, &results).await;
    println!(
        "[redis partition] node 1 cut off from Redis for {PARTITION:?}: {} publishes, {at_cut} acked before, {during} \
         while cut off, {failed} failed; acks resumed {resumed:.2?} after the heal; stored {} (epochs {})",
        results.len(),
        stored_tags.len(),
        epochs.len()
    );
    for (node, qos, c, task) in subs {
        let rec = task.await.unwrap();
        let v = Verdict::of(&rec, &expected);
        println!(
            "[redis partition] node {node} {qos:?} subscriber: {v:?}, resubscribed {}, unrecovered {}, complete {}",
            rec.resubscribed, rec.unrecovered, rec.complete
        );
        assert!(rec.complete, "node {node} {qos:?}: the END marker arrived");
        assert_eq!((v.lost, v.offset_regressions, v.unexpected), (0, 0, 0), "node {node} {qos:?}: {v:?}");
        if qos == Qos::ExactlyOnce {
            assert_eq!(v.duplicates, 0, "exactly once: {v:?}");
        }
        c.close(Duration::from_millis(100)).await;
    }
    assert_eq!(failed, 0, "every publish is acknowledged in the end");
    assert_eq!(stored_tags, expected, "every acknowledged publish is stored");
    assert_eq!(stored.len(), expected.len() + 1, "each stored once");
    assert_eq!(epochs.len(), 1, "no new epoch");
}
