//! Several server endpoints (nodes of one cluster): which one the session
//! tries, through the simulated network. The simulated nodes share one hub,
//! as cluster nodes share their store, so a move is recovered by offsets.

mod sim;

use std::time::Duration;

use ferry_core::client::{ClientConfig, ClientSession, ConnectionState, Event, Input, Output};
use ferry_core::frame::{Push, Qos, ServerFrame};
use ferry_core::{codec, CloseCode, Instant};
use sim::{Faults, Sim};

fn connected(s: &Sim, c: usize) -> bool {
    s.clients[c].session.is_connected()
}

/// The endpoint of the first `Open` a fresh session asks for.
fn first_endpoint(endpoints: usize, seed: u64) -> usize {
    let mut cfg = ClientConfig::new("dev");
    cfg.endpoints = endpoints;
    let mut s = ClientSession::new(cfg, seed);
    s.connect(Instant(0));
    for _ in 0..1_000 {
        match s.poll_output(Instant(0)) {
            Output::Open { endpoint, .. } => return endpoint,
            Output::Timeout(_) => break,
            _ => {}
        }
    }
    panic!("seed {seed}: no Open");
}

#[test]
fn the_first_endpoint_comes_from_the_seed_and_spreads_clients_over_the_nodes() {
    let mut counts = [0u32; 3];
    for seed in 0..600 {
        let e = first_endpoint(3, seed);
        assert!(e < 3, "seed {seed}: endpoint {e}");
        assert_eq!(e, first_endpoint(3, seed), "seed {seed}: the same seed picks the same endpoint");
        counts[e] += 1;
    }
    // 200 each on average; a fair draw stays well within this.
    assert!(counts.iter().all(|&n| (140..=260).contains(&n)), "spread over 600 seeds: {counts:?}");
    for seed in 0..50 {
        assert_eq!(first_endpoint(1, seed), 0);
        assert_eq!(first_endpoint(0, seed), 0, "0 endpoints counts as 1");
    }
}

#[test]
fn failed_attempts_go_round_robin_after_backoff_and_a_working_node_is_kept() {
    for seed in 0..20 {
        let mut s = Sim::new(seed, Faults::none());
        let mut cfg = s.client_config("c");
        cfg.endpoints = 3;
        let c = s.add_client(cfg);
        for n in 0..3 {
            s.kill_node(n);
        }
        s.connect(c);
        s.run_for(20_000);
        let opens: Vec<(usize, u64)> = s.opens.iter().map(|(_, e, t)| (*e, *t)).collect();
        assert!(opens.len() >= 5, "seed {seed}: {opens:?}");
        for w in opens.windows(2) {
            assert_eq!(w[1].0, (w[0].0 + 1) % 3, "seed {seed}: round robin: {opens:?}");
            // Each move waits the usual backoff (at least its floor, 200 ms).
            assert!(w[1].1 - w[0].1 >= 200, "seed {seed}: no backoff between attempts: {opens:?}");
        }
        // Only one node comes back: the client finds it and stays there.
        let live = (opens.last().unwrap().0 + 2) % 3;
        s.revive_node(live);
        assert!(s.run_until_cond(30_000, |s| connected(s, 0)), "seed {seed}: {}", s.describe());
        assert_eq!(s.clients[c].session.endpoint(), live);
        assert_eq!(*s.opened_endpoints(c).last().unwrap(), live);
        let before = s.opens.len();
        s.run_for(60_000); // many pings pass
        assert!(connected(&s, c));
        assert_eq!(s.opens.len(), before, "seed {seed}: a working node is kept");
        assert_eq!(s.clients[c].session.endpoint(), live);
    }
}

#[test]
fn a_dead_node_is_left_for_the_next_one_and_streams_recover_by_offsets() {
    for seed in 0..20 {
        let mut s = Sim::new(100 + seed, Faults::none());
        let mut cfg = s.client_config("sub");
        cfg.endpoints = 2;
        let sub = s.add_client(cfg);
        s.subscribe(sub, "room:1", Qos::AtLeastOnce);
        s.connect(sub);
        assert!(s.run_until_cond(5_000, |s| connected(s, 0)), "seed {seed}");
        let first = s.clients[sub].session.endpoint();
        s.run_for(500);
        for i in 0..5 {
            s.backend_publish("room:1", &format!("a{i}"), vec![1]);
        }
        s.run_for(500);
        s.kill_node(first);
        // Published while the client is between nodes: recovered by offset.
        for i in 0..5 {
            s.backend_publish("room:1", &format!("b{i}"), vec![2]);
        }
        assert!(
            s.run_until_cond(20_000, |s| connected(s, 0)
                && s.clients[0].received.get("room:1").map_or(0, Vec::len) == 10),
            "seed {seed}: {}",
            s.describe()
        );
        assert_eq!(s.clients[sub].session.endpoint(), 1 - first, "seed {seed}");
        let ids: Vec<String> = s.clients[sub].received["room:1"].iter().map(|r| r.2.clone()).collect();
        assert_eq!(ids, s.hub.ids("room:1"), "seed {seed}: everything once, in order");
        assert!(!s.clients[sub].events.iter().any(|e| matches!(e, Event::Gap { .. })), "seed {seed}: no gap");
        assert!(s.clients[sub].events.iter().any(|e| matches!(e, Event::Subscribed { recovered: true, .. })));
    }
}

#[test]
fn a_network_change_retries_the_current_endpoint_first() {
    let mut s = Sim::new(7, Faults::none());
    let mut cfg = s.client_config("c");
    cfg.endpoints = 3;
    let c = s.add_client(cfg);
    s.connect(c);
    assert!(s.run_until_cond(5_000, |s| connected(s, 0)));
    let e = s.clients[c].session.endpoint();
    s.network_changed(c, true);
    assert!(s.run_until_cond(5_000, |s| connected(s, 0)));
    s.network_changed(c, false);
    s.run_for(1_000);
    s.network_changed(c, true);
    assert!(s.run_until_cond(5_000, |s| connected(s, 0)));
    assert_eq!(s.opened_endpoints(c), vec![e, e, e]);
    // A cut connection (the node may be gone) moves on.
    s.cut_all();
    assert!(s.run_until_cond(10_000, |s| connected(s, 0) && s.opens.len() == 4));
    assert_eq!(s.opened_endpoints(c), vec![e, e, e, (e + 1) % 3]);
}

#[test]
fn a_token_expiry_close_keeps_the_endpoint() {
    let mut cfg = ClientConfig::new("dev");
    cfg.endpoints = 4;
    cfg.refreshable = true;
    cfg.encoding = codec::Encoding::Json;
    let mut s = ClientSession::new(cfg, 9);
    let mut t = Instant(0);
    let drain = |s: &mut ClientSession, t: Instant| -> Vec<Output> {
        let mut out = Vec::new();
        for _ in 0..10_000 {
            match s.poll_output(t) {
                Output::Timeout(_) => return out,
                o => out.push(o),
            }
        }
        panic!("did not drain");
    };
    let opens = |out: &[Output]| -> Vec<(u64, usize)> {
        out.iter()
            .filter_map(|o| if let Output::Open { conn, endpoint } = o { Some((*conn, *endpoint)) } else { None })
            .collect()
    };
    s.connect(t);
    let [(conn, e)] = opens(&drain(&mut s, t))[..] else { panic!("one Open") };
    s.handle_input(t, Input::TransportOpened { conn });
    drain(&mut s, t);
    // The server says the token expired, then closes.
    let push = ServerFrame::Push(Push::Disconnect {
        code: CloseCode::TokenExpired as u16,
        reason: "token expired".into(),
        reconnect: true,
    });
    let mut msg = Vec::new();
    codec::encode_into(codec::Encoding::Json, &push, &mut msg);
    s.handle_input(t, Input::TransportMessage { conn, data: &msg });
    s.handle_input(
        t,
        Input::TransportClosed { conn, code: Some(CloseCode::TokenExpired as u16), reason: String::new() },
    );
    drain(&mut s, t);
    s.set_token(t, "fresh".into());
    t = t.plus(Duration::from_secs(60));
    s.handle_input(t, Input::Timeout);
    let [(_, again)] = opens(&drain(&mut s, t))[..] else { panic!("one Open after the backoff") };
    assert_eq!(again, e, "the node is fine: same endpoint");
    assert_eq!(s.state(), ConnectionState::Connecting);
}

#[test]
fn under_random_node_deaths_the_endpoint_stays_in_range_and_the_client_comes_back() {
    for seed in 0..30 {
        let faults = Faults { cut_per_sec: 0.05, ..Faults::none() };
        let mut s = Sim::new(1_000 + seed, faults);
        let n = 1 + (seed as usize % 4);
        let mut cfg = s.client_config("c");
        cfg.endpoints = n;
        let c = s.add_client(cfg);
        s.connect(c);
        // Bounded chaos: a node dies or comes back every 2 s for 60 s.
        for step in 0..30u64 {
            let node = ((seed + step * 7) % n as u64) as usize;
            if step % 3 == 2 {
                s.revive_node(node);
            } else {
                s.kill_node(node);
            }
            s.run_for(2_000);
            // The simulation asserts every Open is in range; so must the getter be.
            assert!(s.clients[c].session.endpoint() < n, "seed {seed}");
        }
        // In the end only one node is up, and links stop being cut: the
        // client must find that node and stay there.
        s.faults.cut_per_sec = 0.0;
        let up = seed as usize % n;
        for node in 0..n {
            if node == up {
                s.revive_node(node);
            } else {
                s.kill_node(node);
            }
        }
        // (A link to a node just killed still looks live until its reset arrives.)
        assert!(
            s.run_until_cond(30_000, |s| connected(s, 0) && s.clients[0].session.endpoint() == up),
            "seed {seed}: {}",
            s.describe()
        );
        s.run_for(10_000);
        assert!(connected(&s, c), "seed {seed}: stays on the node that works");
    }
}
