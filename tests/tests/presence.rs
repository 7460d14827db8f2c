//! Scenario 7: presence under faults. Users join and leave (some with two
//! connections) while the proxy resets every connection now and then; the
//! online list, the counts and the join/leave pushes must match the truth,
//! with no leave/join flapping for a reconnect within the grace period.
//! A blackholed client must drop out within ping + pong timeout + grace.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ferry_client::{Client, ConnectionState, Qos, Subscription, SubscriptionEvent};
use ferry_e2e::{builder, eventually, seed, wait_subscribed, FaultProxy, FerryServer, Rng, Settings};
use futures_util::{FutureExt, StreamExt};

const PING: u64 = 500;
const PONG: u64 = 500;
const GRACE: u64 = 1500;
/// Scheduling slack on a busy two-core machine.
const SLACK: u64 = 1500;
const CHANNEL: &str = "room:lobby";
const USERS: u64 = 4;
const STEPS: usize = 18;
const T: Duration = Duration::from_secs(20);

/// The watcher's view: every join/leave push, in arrival order.
struct Watcher {
    client: Client,
    sub: Subscription,
    log: Vec<String>,
}

impl Watcher {
    fn note(&mut self, e: &SubscriptionEvent) {
        match e {
            SubscriptionEvent::Join(i) if i.user != "watcher" => self.log.push(format!("join {}", i.user)),
            SubscriptionEvent::Leave(i) if i.user != "watcher" => self.log.push(format!("leave {}", i.user)),
            _ => {}
        }
    }

    /// Read pushes until `entry` is logged; how long that took.
    async fn expect(&mut self, entry: &str, limit: Duration) -> Duration {
        let start = Instant::now();
        let end = tokio::time::Instant::now() + limit;
        while !self.log.iter().rev().take(1).any(|l| l == entry) {
            match tokio::time::timeout_at(end, self.sub.next()).await {
                Ok(Some(e)) => self.note(&e),
                Ok(None) => panic!("watcher's subscription ended"),
                Err(_) => panic!("no '{entry}' within {limit:?}; log {:?}", self.log),
            }
        }
        start.elapsed()
    }

    /// Take whatever has already arrived.
    fn drain(&mut self) {
        while let Some(Some(e)) = self.sub.next().now_or_never() {
            self.note(&e);
        }
    }

    /// The server's list and counts, once they match `truth` (users per
    /// connection, watcher included); panics with both if they never do.
    async fn check(&self, truth: &[String]) {
        let mut want = truth.to_vec();
        want.sort();
        let users = want.iter().collect::<std::collections::BTreeSet<_>>().len() as u32;
        let stats = (want.len() as u32, users);
        let seen = eventually(Duration::from_secs(5), || async {
            let mut list: Vec<String> = self.client.presence(CHANNEL).await.ok()?.into_iter().map(|c| c.user).collect();
            list.sort();
            let counts = self.client.presence_stats(CHANNEL).await.ok()?;
            (list == want && counts == stats).then_some(())
        })
        .await;
        if seen.is_none() {
            let list = self.client.presence(CHANNEL).await;
            let counts = self.client.presence_stats(CHANNEL).await;
            panic!("presence {list:?} / {counts:?}, truth {want:?} / {stats:?}");
        }
    }
}

struct Member {
    user: String,
    /// Each member's own network path, so it can be cut alone.
    proxy: FaultProxy,
    client: Client,
    sub: Subscription,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_matches_the_truth_across_cuts_and_a_blackhole() {
    let mut rng = Rng::new(seed("presence"));
    let settings = Settings {
        ping_ms: PING,
        pong_ms: PONG,
        grace_ms: GRACE,
        join_leave: vec!["room".into()],
        ..Settings::default()
    };
    let srv = FerryServer::start(&settings).await;

    let client = builder(&srv.url(), "watcher", "watcher-dev", rng.next_u64()).build().unwrap();
    let mut sub = client.subscribe(CHANNEL, Qos::AtLeastOnce).await.unwrap();
    client.connect();
    assert!(wait_subscribed(&mut sub, T).await);
    let mut watcher = Watcher { client, sub, log: Vec::new() };

    let mut members: Vec<Member> = Vec::new();
    let mut expected_log: Vec<String> = Vec::new();
    let (mut joins, mut leaves, mut cut_rounds, mut cuts) = (0, 0, 0, 0);
    let mut leave_delays = Vec::new();
    let truth = |members: &[Member]| {
        let mut t: Vec<String> = members.iter().map(|m| m.user.clone()).collect();
        t.push("watcher".into());
        t
    };
    for step in 0..STEPS {
        // Every third step cuts; the others join or leave at random,
        // keeping between 2 and 6 connections online.
        let roll = rng.below(2);
        if step % 3 != 2 && (members.len() < 2 || (roll == 0 && members.len() < 6)) {
            let user = format!("u{}", rng.below(USERS));
            let online = members.iter().any(|m| m.user == user);
            let device = format!("{user}-dev{step}");
            let proxy = FaultProxy::start(srv.addr()).await.unwrap();
            let client = builder(&proxy.url(), &user, &device, rng.next_u64()).build().unwrap();
            let mut sub = client.subscribe(CHANNEL, Qos::AtMostOnce).await.unwrap();
            client.connect();
            assert!(wait_subscribed(&mut sub, T).await);
            if !online {
                let entry = format!("join {user}");
                watcher.expect(&entry, T).await;
                expected_log.push(entry);
            }
            members.push(Member { user, proxy, client, sub });
            joins += 1;
        } else if step % 3 != 2 {
            let m = members.remove(rng.below(members.len() as u64) as usize);
            let closed = Instant::now();
            m.client.close(Duration::from_millis(100)).await;
            drop(m.sub);
            if !members.iter().any(|o| o.user == m.user) {
                let entry = format!("leave {}", m.user);
                watcher.expect(&entry, Duration::from_millis(GRACE + SLACK)).await;
                let after = closed.elapsed();
                // The grace period is honoured: not announced before it ends.
                assert!(after >= Duration::from_millis(GRACE - 20), "{entry} after only {after:?}");
                leave_delays.push(after);
                expected_log.push(entry);
            }
            leaves += 1;
        } else {
            // Some connections are reset at once and come back within the
            // grace period: nobody should appear to leave.
            let first = rng.below(members.len() as u64) as usize;
            let hit: Vec<usize> = (0..members.len()).filter(|&i| i == first || rng.below(2) == 0).collect();
            for &i in &hit {
                cuts += members[i].proxy.cut_all();
            }
            for &i in &hit {
                wait_subscribed(&mut members[i].sub, T).await;
            }
            cut_rounds += 1;
        }
        watcher.check(&truth(&members)).await;
        watcher.drain();
        assert_eq!(watcher.log, expected_log, "join/leave pushes after step {step}");
    }

    // A client whose link goes dead without a reset.
    let dead = FaultProxy::start(srv.addr()).await.unwrap();
    let ghost = builder(&dead.url(), "ghost", "ghost-dev", rng.next_u64())
        .core_config(|c| c.connect_timeout = Duration::from_secs(3))
        .build()
        .unwrap();
    let mut ghost_sub = ghost.subscribe(CHANNEL, Qos::AtMostOnce).await.unwrap();
    ghost.connect();
    assert!(wait_subscribed(&mut ghost_sub, T).await);
    watcher.expect("join ghost", T).await;
    expected_log.push("join ghost".into());
    let mut state = ghost.state();
    dead.blackhole(true);
    let bound = Duration::from_millis(PING + PONG + GRACE + SLACK);
    let gone_after = watcher.expect("leave ghost", bound).await;
    expected_log.push("leave ghost".into());
    let noticed = tokio::time::timeout(T, state.wait_for(|s| *s != ConnectionState::Connected)).await.is_ok();
    watcher.check(&truth(&members)).await;
    dead.heal();
    wait_subscribed(&mut ghost_sub, T).await;
    watcher.expect("join ghost", T).await;
    expected_log.push("join ghost".into());
    let mut t = truth(&members);
    t.push("ghost".into());
    watcher.check(&t).await;

    // Nothing more may arrive: wait out one grace period and look again.
    tokio::time::sleep(Duration::from_millis(GRACE + 500)).await;
    watcher.drain();
    println!(
        "[presence] {STEPS} steps: {joins} connections joined, {leaves} left, {cut_rounds} rounds of cuts \
         ({cuts} connections reset), {} pushes; leave announced {:?} after close (grace {GRACE} ms)",
        watcher.log.len(),
        leave_delays
    );
    println!(
        "[presence] blackholed client dropped from presence after {gone_after:.2?} (bound {bound:?}: ping {PING} + \
         pong {PONG} + grace {GRACE} + slack {SLACK} ms)"
    );
    assert!(noticed, "the blackholed client noticed too");
    assert_eq!(watcher.log, expected_log, "no flapping, nothing missing");
    let counts: BTreeMap<&str, usize> = members.iter().fold(BTreeMap::new(), |mut m, x| {
        *m.entry(x.user.as_str()).or_default() += 1;
        m
    });
    println!("[presence] online at the end: {counts:?} + ghost + watcher");
    for m in members {
        m.client.close(Duration::from_millis(100)).await;
    }
    ghost.close(Duration::from_millis(100)).await;
    watcher.client.close(Duration::from_millis(100)).await;
}
