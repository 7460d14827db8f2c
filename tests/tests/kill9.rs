//! Scenario 4: `kill -9` of the server process five times during a steady
//! QoS 1/2 publish load, restarting it on the same port each time. No
//! acknowledged publish may be lost, offsets must continue in the same
//! epoch without holes, and clients must resume by themselves.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use ferry_client::{PublishAck, Qos};
use ferry_e2e::load::{self, Tag, Verdict};
use ferry_e2e::{builder, free_addr, seed, wait_subscribed, FerryServer, Rng, Settings};

const KILLS: usize = 5;
/// Acknowledged publishes between kills (drawn from this range): the load
/// is running when the server dies.
const PER_ROUND: (u64, u64) = (200, 600);
const WINDOW: usize = 64;
const CHANNEL: &str = "orders:k9";
const T: Duration = Duration::from_secs(30);

/// A publish's result, by index; None until it settles.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_five_times_under_load_loses_no_acknowledged_publish() {
    let mut rng = Rng::new(seed("kill9"));
    let mut srv = FerryServer::start_at(free_addr(), &Settings::default()).await;
    let url = srv.url();

    let mut subs = Vec::new();
    for (i, qos) in [Qos::ExactlyOnce, Qos::AtLeastOnce].into_iter().enumerate() {
        let c = builder(&url, &format!("reader{i}"), &format!("reader{i}-dev"), rng.next_u64()).build().unwrap();
        let mut s = c.subscribe(CHANNEL, qos).await.unwrap();
        c.connect();
        assert!(wait_subscribed(&mut s, T).await);
        subs.push((qos, c, tokio::spawn(load::record(s, Duration::from_secs(120)))));
    }

    let publisher = builder(&url, "writer", "writer-dev", rng.next_u64()).build().unwrap();
    publisher.connect();
    let load = load::tagged_load(&publisher, CHANNEL, WINDOW);
    let acked = load.acked.clone();

    let mut progress = acked.subscribe();
    let mut target = rng.between(PER_ROUND.0, PER_ROUND.1) as usize;
    let mut rounds = Vec::new();
    for round in 0..KILLS {
        let reached = tokio::time::timeout(T, progress.wait_for(|n| *n >= target)).await.is_ok();
        assert!(reached, "round {round}: load stalled at {} acks", *acked.borrow());
        let before = *progress.borrow();
        srv.kill9();
        let killed = Instant::now();
        srv.restart().await;
        let up = killed.elapsed();
        assert_eq!(srv.url(), url, "same address after restart");
        // Publishing has resumed once a new acknowledgement arrives.
        let n = *progress.borrow();
        tokio::time::timeout(T, progress.wait_for(|m| *m > n))
            .await
            .unwrap_or_else(|_| panic!("round {round}: no ack after restart"))
            .unwrap();
        rounds.push((before, up, killed.elapsed()));
        target = *progress.borrow() + rng.between(PER_ROUND.0, PER_ROUND.1) as usize;
    }
    tokio::time::timeout(T, progress.wait_for(|n| *n >= target)).await.expect("load after the last restart").unwrap();
    let results = load.finish(T).await;
    publisher.publish(CHANNEL, Tag::END.encode(), Qos::ExactlyOnce).await.expect("END marker");

    let failed: Vec<String> = results
        .iter()
        .enumerate()
        .filter_map(|(i, r)| r.as_ref()?.as_ref().err().map(|e| format!("#{i}: {e}")))
        .collect();
    let acks: Vec<&PublishAck> = results.iter().filter_map(|r| r.as_ref()?.as_ref().ok()).collect();
    let retried = acks.iter().filter(|a| a.duplicate).count();

    // What the server holds, compared with what it acknowledged.
    let (stored, top) = load::full_history(&publisher, CHANNEL).await.expect("history");
    let offsets: Vec<u64> = stored.iter().map(|p| p.offset).collect();
    let ids: Vec<&str> = stored.iter().map(|p| p.message_id.as_str()).collect();
    let distinct: BTreeSet<&str> = ids.iter().copied().collect();
    let mut misplaced = 0;
    for a in &acks {
        let at = stored.get((a.offset as usize).wrapping_sub(1));
        if at.map(|p| (&p.epoch, &p.message_id)) != Some((&a.epoch, &a.message_id)) {
            misplaced += 1;
        }
    }
    let epochs: BTreeSet<&str> =
        acks.iter().map(|a| a.epoch.as_str()).chain(stored.iter().map(|p| p.epoch.as_str())).collect();

    let stored_tags: Vec<Tag> = stored.iter().filter_map(Tag::of).filter(|t| *t != Tag::END).collect();
    let expected: BTreeSet<Tag> = stored_tags.iter().copied().collect();
    let mut verdicts = Vec::new();
    for (qos, c, task) in subs {
        let rec = task.await.unwrap();
        let v = Verdict::of(&rec, &expected);
        let exact = rec.seen.iter().map(|s| s.message_id.as_str()).eq(ids[..ids.len() - 1].iter().copied());
        println!(
            "[kill9] {qos:?} subscriber: {v:?}, resubscribed {}, gaps {}, complete {}, identical to the stored stream {exact}",
            rec.resubscribed,
            rec.gaps.len(),
            rec.complete
        );
        verdicts.push((qos, rec, v, exact));
        c.close(Duration::from_millis(100)).await;
    }
    for (i, (before, up, resumed)) in rounds.iter().enumerate() {
        println!("[kill9] kill {}: {before} acked before it; server up again {up:.2?}, acks resumed {resumed:.2?} after the kill", i + 1);
    }
    println!(
        "[kill9] {} publishes ({} acknowledged, {} as retries of a stored message, {} failed); stored {} (top {}), \
         {} distinct ids, epochs {:?}, acks not at their stored position {misplaced}",
        results.len(),
        acks.len(),
        retried,
        failed.len(),
        stored.len(),
        top.offset,
        distinct.len(),
        epochs
    );
    publisher.close(Duration::from_secs(1)).await;

    assert!(failed.is_empty(), "publishes failed: {failed:?}");
    assert_eq!(acks.len(), results.len(), "every publish settled with an ack");
    assert_eq!(offsets, (1..=stored.len() as u64).collect::<Vec<_>>(), "offsets contiguous from 1");
    assert_eq!(epochs.len(), 1, "one epoch across five kills");
    assert_eq!(distinct.len(), ids.len(), "each message stored once");
    assert_eq!(misplaced, 0, "each ack names where its message is stored");
    assert_eq!(stored.len(), acks.len() + 1, "stored = acknowledged + END marker");
    for (qos, rec, v, exact) in &verdicts {
        assert!(rec.complete, "{qos:?} subscriber reached the end");
        assert_eq!((v.lost, v.offset_regressions, v.unexpected, rec.gaps.len()), (0, 0, 0, 0), "{qos:?} subscriber");
        if *qos == Qos::ExactlyOnce {
            assert!(*exact, "the QoS 2 subscriber saw exactly the stored stream");
        }
    }
}
