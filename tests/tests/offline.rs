//! Scenario 5: offline delivery. A subscriber's app exits; 1,000 messages
//! are published on its durable subscription and on its personal channel
//! `#user:<id>`; the app starts again with the same device id and storage
//! and must get all of them in order, exactly once, then live messages.

use std::time::{Duration, Instant};

use ferry_client::Qos;
use ferry_e2e::load::{self, Tag};
use ferry_e2e::{builder, seed, wait_subscribed, FerryServer, Rng, Settings, TempDir};

const TEAM: &str = "im:team";
const DM: &str = "#user:u42";
const MESSAGES: u32 = 1000;
const T: Duration = Duration::from_secs(30);

fn seqs(pubs: &[ferry_client::Publication]) -> Vec<u32> {
    pubs.iter().map(|p| Tag::of(p).expect("tagged payload").seq).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_device_gets_everything_once_in_order_then_live() {
    let mut rng = Rng::new(seed("offline"));
    // The boss writes into u42's personal channel: user-to-user delivery,
    // which the server allows only when configured to.
    let srv = FerryServer::start(&Settings { personal_publish: true, ..Settings::default() }).await;
    let storage = TempDir::new("phone-storage");
    let phone = |seed| builder(&srv.url(), "u42", "phone-1", seed).storage_dir(storage.path()).build().unwrap();

    let boss = builder(&srv.url(), "boss", "boss-pc", rng.next_u64()).build().unwrap();
    boss.connect();

    // First run of the app: subscribed, has seen one message on each channel.
    let app = phone(rng.next_u64());
    let mut team = app.subscribe(TEAM, Qos::ExactlyOnce).await.unwrap();
    let mut dm = app.subscribe(DM, Qos::ExactlyOnce).await.unwrap();
    app.connect();
    assert!(wait_subscribed(&mut team, T).await && wait_subscribed(&mut dm, T).await);
    let first = Tag { publisher: 9, seq: 0 }.encode();
    boss.publish(TEAM, first.clone(), Qos::ExactlyOnce).await.unwrap();
    boss.publish(DM, first, Qos::ExactlyOnce).await.unwrap();
    assert_eq!(load::take(&mut team, 1, T).await.len(), 1);
    assert_eq!(load::take(&mut dm, 1, T).await.len(), 1);
    // The app exits: close first (dropping a subscription of a running
    // client would unsubscribe), then everything goes.
    let report = app.close(Duration::from_secs(2)).await;
    assert!(report.unacked.is_empty());
    drop((team, dm, app));

    // 1,000 messages while it is gone: three quarters on the team channel,
    // one quarter on the personal channel.
    let items = (0..MESSAGES).map(|seq| {
        let ch = if seq % 4 == 0 { DM } else { TEAM };
        (ch.to_string(), Tag { publisher: 0, seq }.encode(), Qos::ExactlyOnce)
    });
    let mut failed = 0;
    load::publish_pipelined(&boss, items, 64, |_, r| failed += usize::from(r.is_err())).await;
    assert_eq!(failed, 0);
    let want_dm: Vec<u32> = (0..MESSAGES).filter(|s| s % 4 == 0).collect();
    let want_team: Vec<u32> = (0..MESSAGES).filter(|s| s % 4 != 0).collect();

    // The app starts again: same device id, same storage.
    let started = Instant::now();
    let app = phone(rng.next_u64());
    let mut team = app.subscribe(TEAM, Qos::ExactlyOnce).await.unwrap();
    let mut dm = app.subscribe(DM, Qos::ExactlyOnce).await.unwrap();
    app.connect();
    let (got_team, got_dm) =
        tokio::join!(load::take(&mut team, want_team.len(), T), load::take(&mut dm, want_dm.len(), T));
    let caught_up = started.elapsed();
    // Then live: the next publication on each channel is the new one.
    let live = Tag { publisher: 1, seq: 0 };
    boss.publish(TEAM, live.encode(), Qos::ExactlyOnce).await.unwrap();
    boss.publish(DM, live.encode(), Qos::AtLeastOnce).await.unwrap();
    let (next_team, next_dm) = tokio::join!(load::take(&mut team, 1, T), load::take(&mut dm, 1, T));
    println!(
        "[offline] {MESSAGES} published while away ({} team, {} personal); after restart got {} + {} in {caught_up:.2?}, \
         then live {:?} / {:?}",
        want_team.len(),
        want_dm.len(),
        got_team.len(),
        got_dm.len(),
        next_team.first().and_then(Tag::of),
        next_dm.first().and_then(Tag::of),
    );
    assert_eq!(seqs(&got_team), want_team, "team channel: everything missed, in order, once");
    assert_eq!(seqs(&got_dm), want_dm, "personal channel: everything missed, in order, once");
    assert_eq!(next_team.first().and_then(Tag::of), Some(live), "then live on the team channel, no repeat");
    assert_eq!(next_dm.first().and_then(Tag::of), Some(live), "then live on the personal channel, no repeat");
    app.close(Duration::from_secs(1)).await;
    boss.close(Duration::from_secs(1)).await;
}
