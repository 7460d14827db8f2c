//! ClientSession rules, driven frame by frame by a hand-written server.

use ferry_core::client::{ClientConfig, ClientSession, ConnectionState, Event, Input, Output, PublishError};
use ferry_core::codec::{self, Encoding};
use ferry_core::frame::*;
use ferry_core::{CloseCode, Instant};

#[derive(Default, Debug)]
struct Out {
    frames: Vec<ClientFrame>,
    events: Vec<Event>,
    opened: Option<u64>,
    endpoint: Option<usize>,
    closed: Option<u16>,
}

fn drain(s: &mut ClientSession, now: Instant) -> Out {
    let mut o = Out::default();
    for _ in 0..100_000 {
        match s.poll_output(now) {
            Output::Open { conn, endpoint } => {
                o.opened = Some(conn);
                o.endpoint = Some(endpoint);
            }
            Output::Transmit { data, .. } => {
                o.frames.extend(codec::decode_client(Encoding::Json, &data, 1 << 20).expect("client output decodes"))
            }
            Output::Close { code, .. } => o.closed = Some(code),
            Output::Event(e) => o.events.push(e),
            Output::Timeout(_) => return o,
        }
    }
    panic!("client output did not drain");
}

fn server_says(s: &mut ClientSession, conn: u64, now: Instant, frames: &[ServerFrame]) -> Out {
    let mut msg = Vec::new();
    for f in frames {
        codec::encode_into(Encoding::Json, f, &mut msg);
    }
    s.handle_input(now, Input::TransportMessage { conn, data: &msg });
    drain(s, now)
}

fn reply(id: u32, body: ReplyBody) -> ServerFrame {
    ServerFrame::Reply { id, outcome: Outcome::Ok(body) }
}

fn connected(subs: Vec<SubscribeResult>) -> ReplyBody {
    ReplyBody::Connected(Connected {
        client: "c".into(),
        ping_interval_ms: 25_000,
        pong_timeout_ms: 10_000,
        compress_min: Some(64),
        max_message_size: 65_536,
        expires_in_ms: None,
        subs,
        time_ms: 0,
        subscribe: vec![],
    })
}

fn publication(offset: u64, payload: Payload) -> ServerFrame {
    ServerFrame::Push(Push::Publication(Publication {
        channel: "ch".into(),
        epoch: "e".into(),
        offset,
        message_id: format!("m{offset}"),
        qos: Qos::AtLeastOnce,
        publisher: None,
        time_ms: 0,
        payload,
    }))
}

fn plain(b: &[u8]) -> Payload {
    Payload { z: false, data: Bytes(b.to_vec()) }
}

/// A live session subscribed to "ch" (QoS 1), delivering from offset 1.
fn live() -> (ClientSession, u64) {
    live_with(|_| {})
}

fn live_with(tune: impl FnOnce(&mut ClientConfig)) -> (ClientSession, u64) {
    let mut cfg = ClientConfig::new("dev");
    cfg.encoding = Encoding::Json;
    tune(&mut cfg);
    let mut s = ClientSession::new(cfg, 1);
    let t = Instant(0);
    s.subscribe(t, "ch", Qos::AtLeastOnce);
    s.connect(t);
    let conn = drain(&mut s, t).opened.expect("asks to open");
    s.handle_input(t, Input::TransportOpened { conn });
    let o = drain(&mut s, t);
    let id = match &o.frames[..] {
        [ClientFrame::Request { id, cmd: Command::Connect(c) }] => {
            assert_eq!(c.subs.len(), 1);
            *id
        }
        other => panic!("{other:?}"),
    };
    let sub =
        Subscribed { channel: "ch".into(), qos: Qos::AtLeastOnce, epoch: "e".into(), top: 0, from: 1, recovered: true };
    server_says(&mut s, conn, t, &[reply(id, connected(vec![SubscribeResult::Ok(sub)]))]);
    assert!(s.is_connected());
    (s, conn)
}

fn surfaced(o: &Out) -> Vec<u64> {
    o.events.iter().filter_map(|e| if let Event::Publication(p) = e { Some(p.offset) } else { None }).collect()
}

fn acks(o: &Out) -> Vec<u64> {
    o.frames.iter().filter_map(|f| if let ClientFrame::Ack(items) = f { Some(items[0].offset) } else { None }).collect()
}

#[test]
fn reorders_dedups_and_acks_cumulatively() {
    let (mut s, conn) = live();
    let t = Instant(1);
    let o = server_says(&mut s, conn, t, &[publication(2, plain(b"b")), publication(3, plain(b"c"))]);
    assert!(surfaced(&o).is_empty(), "held until 1 arrives");
    assert!(acks(&o).is_empty());
    let o = server_says(&mut s, conn, t, &[publication(1, plain(b"a"))]);
    assert_eq!(surfaced(&o), vec![1, 2, 3]);
    assert_eq!(acks(&o), vec![3]);
    // A duplicate is not surfaced but is acked again (the first ack may be lost).
    let o = server_says(&mut s, conn, t, &[publication(2, plain(b"b"))]);
    assert!(surfaced(&o).is_empty());
    assert_eq!(acks(&o), vec![3]);
    assert_eq!(s.stats().duplicates, 1);
}

#[test]
fn a_corrupt_payload_is_reported_and_does_not_stall_the_stream() {
    let (mut s, conn) = live();
    let t = Instant(1);
    let bomb = miniz_oxide::deflate::compress_to_vec(&vec![0u8; 1 << 20], 6);
    let o = server_says(
        &mut s,
        conn,
        t,
        &[
            publication(1, Payload { z: true, data: Bytes(vec![0xff, 0x00, 0x13]) }),
            publication(2, Payload { z: true, data: Bytes(bomb) }),
            publication(3, Payload { z: true, data: Bytes(miniz_oxide::deflate::compress_to_vec(b"hello", 6)) }),
        ],
    );
    assert_eq!(surfaced(&o), vec![3]);
    let errors = o.events.iter().filter(|e| matches!(e, Event::Error(_))).count();
    assert_eq!(errors, 2);
    assert_eq!(acks(&o), vec![3]);
    let got = o.events.iter().find_map(|e| if let Event::Publication(p) = e { Some(p.payload.clone()) } else { None });
    assert_eq!(got, Some(plain(b"hello")));
}

#[test]
fn hostile_values_from_the_server_do_not_panic() {
    let (mut s, conn) = live();
    let t = Instant(1);
    server_says(&mut s, conn, t, &[publication(u64::MAX, plain(b"x")), publication(u64::MAX - 1, plain(b"y"))]);
    // Replies to requests never made are ignored.
    let o = server_says(&mut s, conn, t, &[reply(999, ReplyBody::Released), reply(0, connected(vec![]))]);
    assert!(o.closed.is_none());
    assert!(s.is_connected());
    // A subscribed result with from = 0 and a huge top.
    s.subscribe(t, "z", Qos::ExactlyOnce);
    let id = match &drain(&mut s, t).frames[..] {
        [ClientFrame::Request { id, .. }] => *id,
        other => panic!("{other:?}"),
    };
    let sub = Subscribed {
        channel: "z".into(),
        qos: Qos::ExactlyOnce,
        epoch: "x".into(),
        top: u64::MAX,
        from: 0,
        recovered: false,
    };
    let o = server_says(&mut s, conn, t, &[reply(id, ReplyBody::Subscribed(sub))]);
    assert!(o.events.iter().any(|e| matches!(e, Event::Subscribed { channel, .. } if channel == "z")));
    assert!(s.is_connected());
    // Garbage closes the link as a protocol violation, and the client comes back.
    s.handle_input(t, Input::TransportMessage { conn, data: b"\x00\xff garbage" });
    let o = drain(&mut s, t);
    assert_eq!(o.closed, Some(CloseCode::ProtocolViolation as u16));
    assert!(matches!(s.state(), ConnectionState::Backoff { attempt: 0, .. }));
}

#[test]
fn pushes_that_overtake_the_subscribe_reply_are_kept() {
    let (mut s, conn) = live();
    let t = Instant(1);
    s.subscribe(t, "other", Qos::ExactlyOnce);
    let o = drain(&mut s, t);
    let id = match &o.frames[..] {
        [ClientFrame::Request { id, cmd: Command::Subscribe(r) }] if r.channel == "other" => *id,
        other => panic!("{other:?}"),
    };
    let early = ServerFrame::Push(Push::Publication(Publication {
        channel: "other".into(),
        epoch: "e".into(),
        offset: 8,
        message_id: "x8".into(),
        qos: Qos::ExactlyOnce,
        publisher: None,
        time_ms: 0,
        payload: plain(b"x"),
    }));
    let o = server_says(&mut s, conn, t, &[early]);
    assert!(surfaced(&o).is_empty());
    let sub = Subscribed {
        channel: "other".into(),
        qos: Qos::ExactlyOnce,
        epoch: "e".into(),
        top: 7,
        from: 8,
        recovered: true,
    };
    let o = server_says(&mut s, conn, t, &[reply(id, ReplyBody::Subscribed(sub))]);
    assert_eq!(surfaced(&o), vec![8]);
}

#[test]
fn late_callbacks_from_an_old_transport_are_ignored() {
    let (mut s, conn) = live();
    let t = Instant(1);
    s.handle_input(t, Input::TransportClosed { conn, code: Some(3000), reason: "restart".into() });
    drain(&mut s, t);
    assert!(matches!(s.state(), ConnectionState::Backoff { .. }));
    // The old socket reports again, and a message trickles in from it.
    s.handle_input(t, Input::TransportClosed { conn, code: Some(3500), reason: "late".into() });
    s.handle_input(t, Input::TransportMessage { conn, data: b"{}" });
    let o = drain(&mut s, t);
    assert!(o.events.is_empty() && o.closed.is_none());
    assert!(matches!(s.state(), ConnectionState::Backoff { .. }), "not closed for good by a stale 3500");
}

#[test]
fn own_compression_threshold_is_never_below_the_servers() {
    let publish_z = |client_min: Option<u32>, size: usize| {
        let (mut s, _) = live_with(|c| c.compress_min = client_min);
        let t = Instant(1);
        s.publish(t, "ch", vec![b'a'; size], Qos::AtLeastOnce).unwrap();
        let o = drain(&mut s, t);
        o.frames
            .iter()
            .find_map(|f| match f {
                ClientFrame::Request { cmd: Command::Publish { payload, .. }, .. } => Some(payload.z),
                _ => None,
            })
            .unwrap()
    };
    // The server announced 64 bytes.
    assert!(publish_z(None, 5_000));
    assert!(!publish_z(Some(10_000), 5_000), "the client's higher threshold applies");
    assert!(publish_z(Some(10_000), 20_000));
    assert!(!publish_z(Some(1), 40), "never below the server's");
}

#[test]
fn token_channels_in_connected_become_subscriptions() {
    let mut cfg = ClientConfig::new("dev");
    cfg.encoding = Encoding::Json;
    let mut s = ClientSession::new(cfg, 1);
    let t = Instant(0);
    s.subscribe(t, "mine", Qos::ExactlyOnce);
    s.connect(t);
    let conn = drain(&mut s, t).opened.expect("asks to open");
    s.handle_input(t, Input::TransportOpened { conn });
    let id = match &drain(&mut s, t).frames[..] {
        [ClientFrame::Request { id, cmd: Command::Connect(_) }] => *id,
        other => panic!("{other:?}"),
    };
    let mine = Subscribed {
        channel: "mine".into(),
        qos: Qos::ExactlyOnce,
        epoch: "e".into(),
        top: 0,
        from: 1,
        recovered: true,
    };
    let ReplyBody::Connected(mut c) = connected(vec![SubscribeResult::Ok(mine)]) else { unreachable!() };
    c.subscribe = vec!["feed:news".into(), "mine".into()];
    let o = server_says(&mut s, conn, t, &[reply(id, ReplyBody::Connected(c))]);
    // Only the channel the app did not have is subscribed, at the default QoS;
    // the app's own subscription keeps its QoS 2.
    let subs: Vec<_> = o
        .frames
        .iter()
        .filter_map(|f| match f {
            ClientFrame::Request { cmd: Command::Subscribe(r), .. } => Some((r.channel.clone(), r.qos)),
            ClientFrame::Request { cmd: Command::Unsubscribe { channel }, .. } => panic!("unsubscribed {channel}"),
            _ => None,
        })
        .collect();
    assert_eq!(subs, vec![("feed:news".to_string(), Qos::AtLeastOnce)]);
    // It is durable like any subscription: a restored session asks for it again.
    assert!(s.snapshot().subs.iter().any(|x| x.channel == "feed:news" && x.qos == Qos::AtLeastOnce));
}

fn states(o: &Out) -> Vec<ConnectionState> {
    o.events.iter().filter_map(|e| if let Event::State(s) = e { Some(s.clone()) } else { None }).collect()
}

#[test]
fn close_is_terminal_and_disconnect_is_a_pause() {
    let (mut s, conn) = live();
    // disconnect(): a pause, in Idle, and connect() resumes.
    s.disconnect(Instant(10));
    let o = drain(&mut s, Instant(10));
    assert_eq!(o.closed, Some(CloseCode::Normal as u16));
    assert_eq!(states(&o), [ConnectionState::Idle]);
    s.handle_input(Instant(11), Input::TransportClosed { conn, code: Some(1000), reason: String::new() });
    s.connect(Instant(20));
    let o = drain(&mut s, Instant(20));
    let conn = o.opened.expect("connect after disconnect opens a transport");
    assert_eq!(states(&o), [ConnectionState::Connecting]);
    s.handle_input(Instant(21), Input::TransportOpened { conn });
    drain(&mut s, Instant(21));

    // close(): the transport closes with 1000, the last state is Closed, and
    // no reconnect follows, not on a late close event, a network change or
    // any timer.
    s.publish(Instant(30), "ch", b"kept".to_vec(), Qos::AtLeastOnce).unwrap();
    drain(&mut s, Instant(30));
    s.close(Instant(40));
    let o = drain(&mut s, Instant(40));
    let closed = ConnectionState::Closed { code: 1000, reason: "client closed".into() };
    assert_eq!(o.closed, Some(1000));
    assert_eq!(states(&o), std::slice::from_ref(&closed));
    s.handle_input(Instant(41), Input::TransportClosed { conn, code: Some(1000), reason: String::new() });
    s.handle_input(Instant(42), Input::NetworkChanged { online: true });
    s.handle_input(Instant(1_000_000), Input::Timeout);
    let o = drain(&mut s, Instant(1_000_000));
    assert!(o.opened.is_none() && o.events.is_empty(), "{o:?}");
    assert_eq!(s.state(), closed);
    assert_eq!(s.publish(Instant(43), "ch", b"x".to_vec(), Qos::AtLeastOnce), Err(PublishError::Closed));
    assert_eq!(s.snapshot().outbox.len(), 1, "the outbox is kept for the next session");
    // Closing twice changes nothing.
    s.close(Instant(44));
    assert!(drain(&mut s, Instant(44)).events.is_empty());
}

#[test]
fn a_missing_transport_closes_for_good_instead_of_retrying() {
    let mut cfg = ClientConfig::new("dev");
    cfg.encoding = Encoding::Json;
    let mut s = ClientSession::new(cfg, 1);
    let t = Instant(0);
    s.connect(t);
    let conn = drain(&mut s, t).opened.expect("asks to open");
    s.handle_input(t, Input::TransportUnavailable { conn, reason: "no global WebSocket".into() });
    let o = drain(&mut s, t);
    let code = CloseCode::TransportUnavailable as u16;
    assert!(o.events.contains(&Event::Disconnected { code, reason: "no global WebSocket".into(), reconnect: false }));
    assert_eq!(states(&o), [ConnectionState::Closed { code, reason: "no global WebSocket".into() }]);
    assert_eq!(s.poll_output(t), Output::Timeout(None), "no reconnect timer");
    s.handle_input(Instant(60_000), Input::Timeout);
    s.handle_input(Instant(60_001), Input::NetworkChanged { online: true });
    assert!(drain(&mut s, Instant(60_001)).opened.is_none(), "no further attempt");
    // An input about another transport does not count.
    let mut s2 = ClientSession::new(ClientConfig::new("dev"), 1);
    s2.connect(t);
    let conn2 = drain(&mut s2, t).opened.unwrap();
    s2.handle_input(t, Input::TransportUnavailable { conn: conn2 + 1, reason: "stale".into() });
    assert_eq!(s2.state(), ConnectionState::Connecting);
}

#[test]
fn a_subscribe_refused_as_temporary_is_retried_on_the_same_connection() {
    // Seen on a node whose Redis was briefly down: the connection stayed
    // up, and the subscription was never asked for again.
    let mut cfg = ClientConfig::new("dev");
    cfg.encoding = Encoding::Json;
    cfg.retry_delay = std::time::Duration::from_millis(500);
    let mut s = ClientSession::new(cfg, 1);
    let t = Instant(0);
    s.subscribe(t, "ch", Qos::AtLeastOnce);
    s.connect(t);
    let conn = drain(&mut s, t).opened.expect("asks to open");
    s.handle_input(t, Input::TransportOpened { conn });
    let id = match &drain(&mut s, t).frames[..] {
        [ClientFrame::Request { id, cmd: Command::Connect(_) }] => *id,
        other => panic!("{other:?}"),
    };
    let refused =
        SubscribeResult::Error { channel: "ch".into(), error: ErrorReply::new(ferry_core::ErrorCode::Unavailable) };
    let o = server_says(&mut s, conn, t, &[reply(id, connected(vec![refused]))]);
    assert!(s.is_connected());
    assert!(!o.events.iter().any(|e| matches!(e, Event::SubscribeFailed { .. })), "temporary: kept, not failed");
    assert!(o.frames.is_empty(), "no retry at once: {:?}", o.frames);
    s.handle_input(Instant(499), Input::Timeout);
    assert!(drain(&mut s, Instant(499)).frames.is_empty(), "not before retry_delay");
    s.handle_input(Instant(500), Input::Timeout);
    let o = drain(&mut s, Instant(500));
    let id = match &o.frames[..] {
        [ClientFrame::Request { id, cmd: Command::Subscribe(r) }] if r.channel == "ch" => *id,
        other => panic!("the subscribe is sent again on the same connection: {other:?}"),
    };
    // Refused again: retried again; then it goes through.
    let again = ServerFrame::Reply { id, outcome: Outcome::Error(ErrorReply::new(ferry_core::ErrorCode::Unavailable)) };
    server_says(&mut s, conn, Instant(500), &[again]);
    s.handle_input(Instant(1000), Input::Timeout);
    let id = match &drain(&mut s, Instant(1000)).frames[..] {
        [ClientFrame::Request { id, cmd: Command::Subscribe(_) }] => *id,
        other => panic!("{other:?}"),
    };
    let sub =
        Subscribed { channel: "ch".into(), qos: Qos::AtLeastOnce, epoch: "e".into(), top: 0, from: 1, recovered: true };
    let o = server_says(&mut s, conn, Instant(1000), &[reply(id, ReplyBody::Subscribed(sub))]);
    assert!(o.events.iter().any(|e| matches!(e, Event::Subscribed { .. })), "{:?}", o.events);
    s.handle_input(Instant(5000), Input::Timeout);
    assert!(drain(&mut s, Instant(5000))
        .frames
        .iter()
        .all(|f| !matches!(f, ClientFrame::Request { cmd: Command::Subscribe(_), .. })));
}
