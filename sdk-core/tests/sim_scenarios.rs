//! Deterministic scenarios through the simulated network.

mod sim;

use std::time::Duration;

use ferry_core::client::{ConnectionState, Event, GapReason, PublishError, Qos0Offline};
use ferry_core::frame::Qos;
use ferry_core::CloseCode;
use sim::{Faults, Sim};

fn connected(s: &Sim, c: usize) -> bool {
    s.clients[c].session.is_connected()
}

fn states(s: &Sim, c: usize) -> Vec<ConnectionState> {
    s.clients[c].events.iter().filter_map(|e| if let Event::State(st) = e { Some(st.clone()) } else { None }).collect()
}

fn received_ids(s: &Sim, c: usize, ch: &str) -> Vec<String> {
    s.clients[c].received.get(ch).map(|v| v.iter().map(|r| r.2.clone()).collect()).unwrap_or_default()
}

#[test]
fn publish_and_receive_all_qos() {
    let mut s = Sim::new(1, Faults::none());
    let cfg = s.client_config("pub");
    let p = s.add_client(cfg);
    let cfg = s.client_config("sub");
    let r = s.add_client(cfg);
    s.connect(p);
    s.connect(r);
    s.subscribe(r, "room:1", Qos::ExactlyOnce);
    assert!(s.run_until_cond(5_000, |s| connected(s, 0) && connected(s, 1)), "{}", s.describe());
    s.run_for(200);
    for (i, q) in [Qos::AtMostOnce, Qos::AtLeastOnce, Qos::ExactlyOnce].into_iter().enumerate() {
        s.publish(p, "room:1", q, vec![i as u8; 200]).unwrap();
    }
    assert!(s.run_until_cond(5_000, |s| s.clients[0].acked.len() == 3 && received_ids(s, 1, "room:1").len() == 3));
    assert_eq!(received_ids(&s, 1, "room:1"), s.hub.ids("room:1"));
    assert_eq!(s.clients[p].session.outbox_len(), 0);
    // The QoS 2 entry was released on the server.
    assert_eq!(s.hub.released.len(), 1);
}

#[test]
fn heartbeat_death_detected_within_interval_plus_grace() {
    let mut s = Sim::new(2, Faults::none());
    let mut cfg = s.client_config("c");
    cfg.ping_grace = Some(Duration::from_secs(2));
    let c = s.add_client(cfg);
    s.connect(c);
    assert!(s.run_until_cond(5_000, |s| connected(s, 0)));
    s.run_for(12_000); // several pings pass while healthy
    assert!(connected(&s, c));
    assert_eq!(s.clients[c].session.stats().connects, 1);
    // Blackhole: nothing arrives in either direction.
    let start = s.now;
    s.partition(60_000);
    let dead = s.run_until_cond(30_000, |s| !connected(s, 0));
    assert!(dead);
    let took = s.now.as_millis() - start.as_millis();
    // ping interval 5 s + grace 2 s, measured from the last ping (<= 5 s before the cut).
    assert!(took <= 7_000 + 100, "client noticed after {took} ms");
    let last = s.clients[c].events.iter().rev().find_map(|e| match e {
        Event::State(ConnectionState::Backoff { .. }) => Some(()),
        _ => None,
    });
    assert!(last.is_some());
    // The server side also detects it: no server session outlives ping + pong timeouts.
    s.run_for(5_000 + 3_000 + 100);
    assert!(s.hub.subscribers.values().all(|v| v.is_empty()));
    // Heal: the client reconnects by itself.
    s.partition_until = s.now;
    assert!(s.run_until_cond(10_000, |s| connected(s, 0)), "{}", s.describe());
}

#[test]
fn backoff_delays_stay_within_bounds_and_reset_after_success() {
    let mut s = Sim::new(3, Faults::none());
    let cfg = s.client_config("c");
    let (min, max) = (cfg.backoff_min.as_millis() as u64, cfg.backoff_max.as_millis() as u64);
    let c = s.add_client(cfg);
    s.partition(120_000);
    s.connect(c);
    s.run_for(100_000);
    let delays: Vec<(u32, u64)> = states(&s, c)
        .into_iter()
        .filter_map(|st| {
            if let ConnectionState::Backoff { attempt, delay_ms } = st {
                Some((attempt, delay_ms))
            } else {
                None
            }
        })
        .collect();
    assert!(delays.len() >= 8, "{delays:?}");
    for (i, (attempt, d)) in delays.iter().enumerate() {
        assert_eq!(*attempt as usize, i);
        let ceiling = (min << (attempt + 1).min(40)).min(max);
        assert!(*d >= min && *d <= ceiling, "attempt {attempt}: {d} not in [{min}, {ceiling}]");
    }
    // Late attempts hit the ceiling range, and jitter spreads them.
    let late: Vec<u64> = delays.iter().skip(5).map(|d| d.1).collect();
    assert!(late.iter().any(|&d| d != late[0]), "no jitter: {late:?}");
    // Heal; after a success the next failure starts from attempt 0 again.
    s.partition_until = s.now;
    assert!(s.run_until_cond(10_000, |s| connected(s, 0)));
    s.clients[c].events.clear();
    s.cut_all();
    s.run_for(50);
    s.run_until_cond(2_000, |s| !connected(s, 0));
    let first = states(&s, c).into_iter().find_map(|st| match st {
        ConnectionState::Backoff { attempt, delay_ms } => Some((attempt, delay_ms)),
        _ => None,
    });
    let (attempt, d) = first.expect("a backoff after the cut");
    assert_eq!(attempt, 0);
    assert!(d >= min && d <= 2 * min);
}

#[test]
fn network_change_reconnects_at_once() {
    let mut s = Sim::new(4, Faults::none());
    let cfg = s.client_config("c");
    let c = s.add_client(cfg);
    s.partition(3_000);
    s.connect(c);
    s.run_for(2_900);
    // Offline: no attempts at all.
    s.network_changed(c, false);
    assert_eq!(s.clients[c].session.state(), ConnectionState::Offline);
    s.run_for(5_000);
    assert_eq!(s.clients[c].session.state(), ConnectionState::Offline);
    // Online: an attempt starts immediately, not after a backoff.
    let t0 = s.now;
    s.network_changed(c, true);
    assert_eq!(s.clients[c].session.state(), ConnectionState::Connecting);
    assert!(s.run_until_cond(1_000, |s| connected(s, 0)));
    assert!(s.now.as_millis() - t0.as_millis() < 200);
    // While live, a network change moves to a new connection at once.
    let before = s.clients[c].session.stats().connects;
    s.network_changed(c, true);
    assert!(s.run_until_cond(1_000, |s| s.clients[0].session.stats().connects == before + 1 && connected(s, 0)));
}

#[test]
fn outbox_full_and_expired_errors() {
    let mut s = Sim::new(5, Faults::none());
    let mut cfg = s.client_config("c");
    cfg.outbox_max_messages = 3;
    cfg.outbox_max_bytes = 1000;
    cfg.message_ttl = Duration::from_secs(10);
    let c = s.add_client(cfg);
    s.partition(60_000);
    s.connect(c);
    // QoS 0 while disconnected fails fast by default.
    assert_eq!(s.publish(c, "a", Qos::AtMostOnce, vec![1]), Err(PublishError::NotConnected));
    let a = s.publish(c, "a", Qos::AtLeastOnce, vec![1; 10]).unwrap();
    s.publish(c, "a", Qos::ExactlyOnce, vec![2; 10]).unwrap();
    // Byte bound.
    assert_eq!(s.publish(c, "a", Qos::AtLeastOnce, vec![3; 990]), Err(PublishError::OutboxFull));
    s.publish(c, "a", Qos::AtLeastOnce, vec![3; 10]).unwrap();
    // Count bound.
    assert_eq!(s.publish(c, "a", Qos::AtLeastOnce, vec![4]), Err(PublishError::OutboxFull));
    // Too large for any message.
    assert!(matches!(s.publish(c, "a", Qos::AtLeastOnce, vec![0; 70_000]), Err(PublishError::TooLarge { .. })));
    s.run_for(10_500);
    assert_eq!(s.clients[c].failed.get(&a).map(String::as_str), Some("expired before the server acknowledged it"));
    assert_eq!(s.clients[c].failed.len(), 3);
    assert_eq!(s.clients[c].session.outbox_len(), 0);
    assert!(s.clients[c].snapshot.outbox.is_empty());
    // With the queue policy, QoS 0 waits for the connection.
    let mut cfg = s.client_config("q");
    cfg.qos0_offline = Qos0Offline::Queue;
    let q = s.add_client(cfg);
    s.connect(q);
    s.publish(q, "a", Qos::AtMostOnce, vec![9]).unwrap();
    s.partition_until = s.now;
    assert!(s.run_until_cond(20_000, |s| s.clients[1].acked.len() == 1), "{}", s.describe());
}

#[test]
fn restore_from_snapshot_after_app_restart() {
    let mut s = Sim::new(6, Faults::none());
    let cfg = s.client_config("pub");
    let p = s.add_client(cfg);
    let cfg = s.client_config("sub");
    let r = s.add_client(cfg);
    s.connect(p);
    s.connect(r);
    s.subscribe(r, "im:7", Qos::ExactlyOnce);
    assert!(s.run_until_cond(5_000, |s| connected(s, 0) && connected(s, 1)));
    for i in 0..20u8 {
        s.publish(p, "im:7", Qos::ExactlyOnce, vec![i]).unwrap();
    }
    assert!(
        s.run_until_cond(5_000, |s| received_ids(s, 1, "im:7").len() == 20 && s.clients[0].session.outbox_len() == 0)
    );
    // The subscriber's app dies; meanwhile the publisher's network goes and it
    // queues more, and then its app dies too.
    s.restart(r);
    s.network_changed(r, false);
    s.partition(20_000);
    for i in 20..50u8 {
        s.publish(p, "im:7", Qos::ExactlyOnce, vec![i]).unwrap();
    }
    s.run_for(1_000);
    let snapshot_outbox = s.clients[p].snapshot.outbox.len();
    assert_eq!(snapshot_outbox, 30);
    s.restart(p);
    s.partition_until = s.now;
    s.run_for(1_000);
    for i in 50..60u8 {
        s.publish(p, "im:7", Qos::ExactlyOnce, vec![i]).unwrap();
    }
    s.network_changed(r, true);
    assert!(
        s.run_until_cond(30_000, |s| received_ids(s, 1, "im:7").len() >= 60 && s.clients[0].session.outbox_len() == 0),
        "{}",
        s.describe()
    );
    s.run_for(2_000);
    let ids = s.hub.ids("im:7");
    assert_eq!(ids.len(), 60, "each publish stored exactly once");
    assert_eq!(received_ids(&s, r, "im:7"), ids, "delivered once, in order, across the restart");
}

#[test]
fn token_refresh_without_reconnect_and_expiry_close() {
    let mut s = Sim::new(7, Faults::none());
    s.hub.token_ttl.insert("t1".into(), Duration::from_secs(60));
    s.hub.token_ttl.insert("t2".into(), Duration::from_secs(60));
    let mut cfg = s.client_config("c");
    cfg.token = "t1".into();
    cfg.refreshable = true;
    cfg.refresh_margin = Duration::from_secs(10);
    let c = s.add_client(cfg);
    s.clients[c].auto_token = Some("t2".into());
    s.connect(c);
    assert!(s.run_until_cond(5_000, |s| connected(s, 0)));
    s.run_for(180_000);
    assert!(s.clients[c].token_requests >= 3, "requests: {}", s.clients[c].token_requests);
    assert_eq!(s.clients[c].session.stats().connects, 1, "refresh must not reconnect");
    // Without refresh support, the server closes with 3005 at expiry and the
    // client stops (no token to come back with).
    let mut cfg = s.client_config("d");
    cfg.token = "t1".into();
    let d = s.add_client(cfg);
    s.connect(d);
    s.run_for(61_000);
    assert_eq!(
        s.clients[d].session.state(),
        ConnectionState::Closed { code: CloseCode::TokenExpired as u16, reason: "token expired".into() }
    );
    // With refresh support but a late token: close 3005, ask, reconnect.
    let mut cfg = s.client_config("e");
    cfg.token = "t1".into();
    cfg.refreshable = true;
    let e = s.add_client(cfg);
    s.connect(e);
    s.run_for(61_000);
    assert!(!connected(&s, e));
    assert!(s.clients[e].token_requests >= 2);
    let now = s.now;
    s.clients[e].session.set_token(now, "t2".into());
    s.drain_client(e);
    assert!(s.run_until_cond(10_000, |s| connected(s, 2)));
}

#[test]
fn terminal_close_codes_stop_reconnecting() {
    let mut s = Sim::new(8, Faults::none());
    let mut cfg = s.client_config("c");
    cfg.token = "bad".into();
    let c = s.add_client(cfg);
    s.connect(c);
    s.run_for(60_000);
    assert!(matches!(s.clients[c].session.state(), ConnectionState::Closed { code: 3500, .. }));
    let attempts = states(&s, c).iter().filter(|st| **st == ConnectionState::Connecting).count();
    assert_eq!(attempts, 1);
    // A reconnect-allowed close does come back.
    let cfg = s.client_config("d");
    let d = s.add_client(cfg);
    s.connect(d);
    assert!(s.run_until_cond(5_000, |s| connected(s, 1)));
    s.cut_all();
    s.run_for(100);
    assert!(s.run_until_cond(10_000, |s| connected(s, 1)));
}

#[test]
fn recovery_gap_reported_when_history_trimmed_or_reset() {
    let mut s = Sim::new(9, Faults::none());
    let cfg = s.client_config("sub");
    let r = s.add_client(cfg);
    s.connect(r);
    s.subscribe(r, "news", Qos::AtLeastOnce);
    assert!(s.run_until_cond(5_000, |s| connected(s, 0)));
    s.run_for(100);
    s.backend_publish("news", "m1", vec![1]);
    s.run_for(500);
    s.network_changed(r, false);
    for i in 2..=10 {
        s.backend_publish("news", &format!("m{i}"), vec![i]);
    }
    s.trim_stream("news", 5);
    s.network_changed(r, true);
    assert!(s.run_until_cond(10_000, |s| received_ids(s, 0, "news").len() == 6));
    let gap =
        s.clients[r].events.iter().find_map(|e| if let Event::Gap { reason, .. } = e { Some(*reason) } else { None });
    assert_eq!(gap, Some(GapReason::NotRetained));
    assert_eq!(received_ids(&s, r, "news"), vec!["m1", "m6", "m7", "m8", "m9", "m10"]);
    // Epoch reset while live: the server closes 3004, the client comes back
    // and reports the epoch change.
    s.clients[r].events.clear();
    s.reset_stream("news");
    s.backend_publish("news", "n1", vec![1]);
    assert!(s.run_until_cond(10_000, |s| received_ids(s, 0, "news").last().map(String::as_str) == Some("n1")));
    s.backend_publish("news", "n2", vec![2]);
    assert!(s.run_until_cond(10_000, |s| received_ids(s, 0, "news").last().map(String::as_str) == Some("n2")));
    let gap =
        s.clients[r].events.iter().find_map(|e| if let Event::Gap { reason, .. } = e { Some(*reason) } else { None });
    assert_eq!(gap, Some(GapReason::EpochChanged));
}

/// Regression: a stream that lost its tail (a Redis failover) reuses the
/// lost offsets for new publications; a client that had seen them kept its
/// position and dropped the new ones as duplicates, silently.
#[test]
fn a_lost_tail_is_reported_and_its_offsets_reused_are_delivered() {
    let mut s = Sim::new(12, Faults::none());
    let cfg = s.client_config("sub");
    let r = s.add_client(cfg);
    s.connect(r);
    s.subscribe(r, "news", Qos::AtLeastOnce);
    assert!(s.run_until_cond(5_000, |s| connected(s, 0)));
    s.run_for(100);
    for i in 1..=5 {
        s.backend_publish("news", &format!("m{i}"), vec![i]);
    }
    assert!(s.run_until_cond(5_000, |s| received_ids(s, 0, "news").len() == 5));
    s.network_changed(r, false);
    s.lose_tail("news", 3);
    s.network_changed(r, true);
    assert!(s.run_until_cond(10_000, |s| s.clients[0]
        .events
        .iter()
        .any(|e| matches!(e, Event::Gap { reason: GapReason::NotRetained, .. }))));
    for i in 4..=6 {
        s.backend_publish("news", &format!("n{i}"), vec![i]);
    }
    assert!(s.run_until_cond(10_000, |s| received_ids(s, 0, "news").last().map(String::as_str) == Some("n6")));
    assert_eq!(received_ids(&s, r, "news"), vec!["m1", "m2", "m3", "m4", "m5", "n4", "n5", "n6"]);
}

/// Regression: QoS 0 publishes once took sequence numbers without
/// persisting them, so the next QoS 1 publish reused the same message id and
/// the server dropped it as a duplicate.
#[test]
fn qos0_and_persisted_message_ids_never_collide() {
    let mut s = Sim::new(10, Faults::none());
    let cfg = s.client_config("p");
    let p = s.add_client(cfg);
    s.connect(p);
    assert!(s.run_until_cond(5_000, |s| connected(s, 0)));
    let a = s.publish(p, "ch", Qos::AtMostOnce, vec![1]).unwrap();
    let b = s.publish(p, "ch", Qos::AtLeastOnce, vec![2]).unwrap();
    assert!(s.run_until_cond(5_000, |s| s.hub.ids("ch").len() == 2));
    s.restart(p);
    assert!(s.run_until_cond(5_000, |s| connected(s, 0)));
    let c = s.publish(p, "ch", Qos::AtMostOnce, vec![3]).unwrap();
    let d = s.publish(p, "ch", Qos::ExactlyOnce, vec![4]).unwrap();
    assert!(s.run_until_cond(5_000, |s| s.clients[0].session.outbox_len() == 0 && s.hub.ids("ch").len() == 4));
    assert_eq!(s.hub.ids("ch"), vec![a, b, c, d]);
}

/// Regression: after a token-expired close, a failing token provider made
/// the client reconnect with the expired token on every backoff step.
#[test]
fn no_reconnect_with_an_expired_token_while_the_provider_fails() {
    let mut s = Sim::new(11, Faults::none());
    s.hub.token_ttl.insert("t1".into(), Duration::from_secs(30));
    let mut cfg = s.client_config("c");
    cfg.token = "t1".into();
    cfg.refreshable = true;
    let c = s.add_client(cfg);
    s.clients[c].fail_tokens = true;
    s.connect(c);
    assert!(s.run_until_cond(5_000, |s| connected(s, 0)));
    // Refreshes fail; the server closes at expiry with 3005.
    s.run_until_cond(40_000, |s| {
        s.clients[0].events.iter().any(|e| matches!(e, Event::Disconnected { code: 3005, .. }))
    });
    let requests_at_close = s.clients[c].token_requests;
    // While the token was valid, a failed refresh was retried (every second
    // from the refresh point, 15 s before expiry) rather than given up.
    assert!(requests_at_close >= 5, "refresh retried {requests_at_close} times");
    let close_index = s.clients[c].events.len();
    s.run_for(20_000);
    let attempts = s.clients[c].events[close_index..]
        .iter()
        .filter(|e| matches!(e, Event::State(ConnectionState::Connecting)))
        .count();
    assert_eq!(attempts, 0, "no connection attempt without a fresh token");
    assert!(s.clients[c].token_requests >= requests_at_close + 3, "the provider is asked again, with backoff");
    // The provider recovers: the next request gets a token and the client connects.
    s.clients[c].fail_tokens = false;
    s.clients[c].auto_token = Some("t2".into());
    assert!(s.run_until_cond(30_000, |s| connected(s, 0)), "{}", s.describe());
}
