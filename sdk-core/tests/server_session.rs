//! ServerSession rules, driven frame by frame with a virtual clock.

use std::time::Duration;

use ferry_core::codec::{self, Encoding};
use ferry_core::frame::*;
use ferry_core::server::{
    Accept, FetchEnd, ServerConfig, ServerEvent, ServerOutput, ServerSession, SharedPublication, StreamStart,
};
use ferry_core::{CloseCode, ErrorCode, Instant};

/// Everything one drain produced.
#[derive(Default, Debug)]
struct Drained {
    frames: Vec<ServerFrame>,
    events: Vec<ServerEvent>,
    close: Option<u16>,
    timeout: Option<Instant>,
    messages: usize,
}

fn drain(s: &mut ServerSession, now: Instant) -> Drained {
    let mut d = Drained::default();
    for _ in 0..100_000 {
        match s.poll_output(now) {
            ServerOutput::Transmit(m) => {
                d.messages += 1;
                d.frames.extend(codec::decode_server(s.encoding(), &m, 1 << 24).expect("server output decodes"));
            }
            ServerOutput::Event(e) => d.events.push(e),
            ServerOutput::Close { code, .. } => d.close = Some(code),
            ServerOutput::Timeout(t) => {
                d.timeout = t;
                return d;
            }
        }
    }
    panic!("server session output did not drain");
}

fn send(s: &mut ServerSession, now: Instant, frames: &[ClientFrame]) -> Drained {
    let mut msg = Vec::new();
    for f in frames {
        codec::encode_into(s.encoding(), f, &mut msg);
    }
    s.handle_message(now, &msg);
    drain(s, now)
}

fn req(id: u32, cmd: Command) -> ClientFrame {
    ClientFrame::Request { id, cmd }
}

fn connect_cmd(subs: Vec<SubscribeRequest>) -> Command {
    Command::Connect(Connect {
        version: PROTOCOL_VERSION,
        token: "t".into(),
        device_id: "d".into(),
        client: ClientVersion::default(),
        subs,
        compression: true,
    })
}

fn start(top: u64, from: u64, qos: Qos) -> StreamStart {
    StreamStart { qos, epoch: "e".into(), top, from, recovered: true }
}

fn cfg() -> ServerConfig {
    ServerConfig {
        ping_interval: Duration::from_secs(25),
        pong_timeout: Duration::from_secs(10),
        inflight_window: 4,
        ack_timeout: Duration::from_secs(30),
        max_redeliveries: 2,
        ..ServerConfig::default()
    }
}

fn live(enc: Encoding, subs: Vec<(SubscribeRequest, StreamStart)>) -> (ServerSession, Drained) {
    live_with(cfg(), enc, subs)
}

fn live_with(c: ServerConfig, enc: Encoding, subs: Vec<(SubscribeRequest, StreamStart)>) -> (ServerSession, Drained) {
    let t0 = Instant(0);
    let mut s = ServerSession::new(c, enc, t0);
    let d = send(&mut s, t0, &[req(1, connect_cmd(subs.iter().map(|x| x.0.clone()).collect()))]);
    assert!(matches!(d.events[..], [ServerEvent::Connect { req: 1, .. }]));
    let accept = Accept {
        client: ClientInfo { client: "c1".into(), user: "u".into(), info: None },
        expires_in: None,
        subs: subs.into_iter().map(|x| Ok(x.1)).collect(),
        time_ms: 0,
        subscribe: vec![],
    };
    s.accept(t0, 1, accept);
    let d = drain(&mut s, t0);
    (s, d)
}

fn publication(ch: &str, offset: u64) -> std::sync::Arc<SharedPublication> {
    SharedPublication::new(Publication {
        channel: ch.into(),
        epoch: "e".into(),
        offset,
        message_id: format!("m{offset}"),
        qos: Qos::AtLeastOnce,
        publisher: None,
        time_ms: 0,
        payload: Payload { z: false, data: Bytes(vec![b'x'; 2000]) },
    })
}

fn pushed_offsets(d: &Drained) -> Vec<u64> {
    d.frames
        .iter()
        .filter_map(|f| match f {
            ServerFrame::Push(Push::Publication(p)) => Some(p.offset),
            _ => None,
        })
        .collect()
}

#[test]
fn handshake_deadline_and_connect_first() {
    let mut s = ServerSession::new(cfg(), Encoding::Binary, Instant(0));
    let d = drain(&mut s, Instant(0));
    assert_eq!(d.timeout, Some(Instant(10_000)));
    s.handle_timeout(Instant(10_000));
    let d = drain(&mut s, Instant(10_000));
    assert_eq!(d.close, Some(CloseCode::HandshakeTimeout as u16));
    assert!(matches!(d.frames.last(), Some(ServerFrame::Push(Push::Disconnect { code: 3006, reconnect: true, .. }))));

    let mut s = ServerSession::new(cfg(), Encoding::Json, Instant(0));
    let d = send(&mut s, Instant(1), &[req(1, Command::Presence { channel: "x".into() })]);
    assert_eq!(d.close, Some(CloseCode::ProtocolViolation as u16));

    let mut s = ServerSession::new(cfg(), Encoding::Json, Instant(0));
    s.handle_message(Instant(1), b"{not json");
    assert_eq!(drain(&mut s, Instant(1)).close, Some(CloseCode::ProtocolViolation as u16));

    let mut s = ServerSession::new(cfg(), Encoding::Binary, Instant(0));
    s.handle_message(Instant(1), &vec![0u8; 70_000]);
    assert_eq!(drain(&mut s, Instant(1)).close, Some(CloseCode::MessageTooLarge as u16));

    let mut s = ServerSession::new(cfg(), Encoding::Binary, Instant(0));
    let mut c = connect_cmd(vec![]);
    if let Command::Connect(c) = &mut c {
        c.version = 9;
    }
    let d = send(&mut s, Instant(1), &[req(1, c)]);
    assert_eq!(d.close, Some(CloseCode::UnsupportedVersion as u16));
}

#[test]
fn rejected_connect_replies_then_closes() {
    let mut s = ServerSession::new(cfg(), Encoding::Binary, Instant(0));
    send(&mut s, Instant(0), &[req(7, connect_cmd(vec![]))]);
    s.reject(Instant(0), 7, ErrorReply::new(ErrorCode::Unauthorized), CloseCode::Unauthorized);
    let d = drain(&mut s, Instant(0));
    assert!(matches!(&d.frames[0], ServerFrame::Reply { id: 7, outcome: Outcome::Error(e) } if e.code == 101));
    assert!(matches!(&d.frames[1], ServerFrame::Push(Push::Disconnect { code: 3500, reconnect: false, .. })));
    assert_eq!(d.close, Some(3500));
}

#[test]
fn pings_on_schedule_and_closes_without_pong() {
    let (mut s, d) = live(Encoding::Binary, vec![]);
    assert!(matches!(&d.frames[0], ServerFrame::Reply { id: 1, outcome: Outcome::Ok(ReplyBody::Connected(c)) }
        if c.ping_interval_ms == 25_000 && c.pong_timeout_ms == 10_000 && c.compress_min == Some(1024)));
    assert_eq!(d.timeout, Some(Instant(25_000)));
    s.handle_timeout(Instant(25_000));
    let d = drain(&mut s, Instant(25_000));
    assert_eq!(d.frames, vec![ServerFrame::Push(Push::Ping)]);
    assert_eq!(d.timeout, Some(Instant(35_000)));
    send(&mut s, Instant(25_100), &[ClientFrame::Pong]);
    s.handle_timeout(Instant(35_000));
    assert_eq!(drain(&mut s, Instant(35_000)).close, None, "a pong was received");
    s.handle_timeout(Instant(50_000));
    let d = drain(&mut s, Instant(50_000));
    assert_eq!(d.frames, vec![ServerFrame::Push(Push::Ping)]);
    s.handle_timeout(Instant(60_000));
    let d = drain(&mut s, Instant(60_000));
    assert_eq!(d.close, Some(CloseCode::HeartbeatTimeout as u16));
    assert!(d.events.iter().any(|e| matches!(e, ServerEvent::Closed { code: 3002, .. })));
}

#[test]
fn publish_acknowledged_only_after_durable_write_and_retries_coalesce() {
    let (mut s, _) = live(Encoding::Binary, vec![]);
    let now = Instant(100);
    let publish = |id| {
        req(
            id,
            Command::Publish {
                channel: "ch".into(),
                message_id: "m-1".into(),
                qos: Qos::ExactlyOnce,
                payload: Payload { z: false, data: Bytes(b"hi".to_vec()) },
            },
        )
    };
    let d = send(&mut s, now, &[publish(2)]);
    assert!(d.frames.is_empty(), "no reply before the host confirms the write");
    assert!(
        matches!(&d.events[..], [ServerEvent::Publish { req: 2, message_id, data, .. }] if message_id == "m-1" && data == b"hi")
    );
    // A retry of the same message id while the write is pending is not handed
    // to the host again.
    let d = send(&mut s, now, &[publish(3)]);
    assert!(d.events.is_empty() && d.frames.is_empty());
    // Duplicated frame (same request id): dropped.
    let d = send(&mut s, now, &[publish(3)]);
    assert!(d.events.is_empty() && d.frames.is_empty());
    s.publish_ok(now, 2, "e".into(), 5, false);
    let d = drain(&mut s, now);
    let replies: Vec<_> = d
        .frames
        .iter()
        .map(|f| match f {
            ServerFrame::Reply { id, outcome: Outcome::Ok(ReplyBody::Published { offset, duplicate, .. }) } => {
                (*id, *offset, *duplicate)
            }
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(replies, vec![(2, 5, false), (3, 5, true)]);
    // QoS 2 second step.
    let d = send(&mut s, now, &[req(4, Command::Release { message_id: "m-1".into() })]);
    assert_eq!(d.events, vec![ServerEvent::Release { message_id: "m-1".into() }]);
    assert!(matches!(&d.frames[..], [ServerFrame::Reply { id: 4, outcome: Outcome::Ok(ReplyBody::Released) }]));
}

#[test]
fn a_pending_publish_shares_its_result_only_with_true_retries() {
    let (mut s, _) = live(Encoding::Binary, vec![]);
    let now = Instant(100);
    let publish = |id, channel: &str, data: &[u8]| {
        req(
            id,
            Command::Publish {
                channel: channel.into(),
                message_id: "m-1".into(),
                qos: Qos::ExactlyOnce,
                payload: Payload { z: false, data: Bytes(data.to_vec()) },
            },
        )
    };
    let d = send(&mut s, now, &[publish(2, "a", b"x")]);
    assert_eq!(d.events.len(), 1);
    // While request 2 is being stored: the same id on another channel, or
    // with other data, is refused at once (107), not answered with 2's offset.
    let d = send(&mut s, now, &[publish(3, "b", b"x"), publish(4, "a", b"y"), publish(5, "a", b"x")]);
    assert!(d.events.is_empty(), "nothing more is handed to the host: {:?}", d.events);
    let refused: Vec<_> = d
        .frames
        .iter()
        .map(|f| match f {
            ServerFrame::Reply { id, outcome: Outcome::Error(e) } => {
                assert!(e.message.starts_with(ferry_core::MESSAGE_ID_REUSED), "{e:?}");
                (*id, e.code)
            }
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(refused, vec![(3, 107), (4, 107)]);
    s.publish_ok(now, 2, "e".into(), 1, false);
    let d = drain(&mut s, now);
    let ok: Vec<_> = d
        .frames
        .iter()
        .filter_map(|f| match f {
            ServerFrame::Reply { id, outcome: Outcome::Ok(ReplyBody::Published { offset, duplicate, .. }) } => {
                Some((*id, *offset, *duplicate))
            }
            _ => None,
        })
        .collect();
    assert_eq!(ok, vec![(2, 1, false), (5, 1, true)], "the true retry shares the result");
}

#[test]
fn bad_payloads_get_error_replies() {
    let (mut s, _) = live(Encoding::Binary, vec![]);
    let bomb = miniz_oxide::deflate::compress_to_vec(&vec![0u8; 8 << 20], 6);
    let d = send(
        &mut s,
        Instant(1),
        &[
            req(
                2,
                Command::Publish {
                    channel: "c".into(),
                    message_id: "a".into(),
                    qos: Qos::AtLeastOnce,
                    payload: Payload { z: true, data: Bytes(bomb) },
                },
            ),
            req(
                3,
                Command::Publish {
                    channel: "c".into(),
                    message_id: "b".into(),
                    qos: Qos::AtLeastOnce,
                    payload: Payload { z: true, data: Bytes(vec![1, 2, 3]) },
                },
            ),
        ],
    );
    let codes: Vec<u16> = d
        .frames
        .iter()
        .map(|f| match f {
            ServerFrame::Reply { outcome: Outcome::Error(e), .. } => e.code,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(codes, vec![ErrorCode::MessageTooLarge as u16, ErrorCode::BadRequest as u16]);
    assert!(d.events.is_empty());
    assert_eq!(d.close, None);
}

#[test]
fn inflight_window_bounds_deliveries_and_acks_pull_more_from_the_store() {
    let sub = SubscribeRequest { channel: "ch".into(), qos: Qos::AtLeastOnce, since: None, token: String::new() };
    let (mut s, _) = live(Encoding::Binary, vec![(sub, start(0, 1, Qos::AtLeastOnce))]);
    let now = Instant(10);
    for o in 1..=10 {
        s.deliver(now, &publication("ch", o));
    }
    let d = drain(&mut s, now);
    assert_eq!(pushed_offsets(&d), vec![1, 2, 3, 4], "window of 4");
    assert_eq!(s.inflight(), 4);
    assert!(d.messages < 4, "frames coalesce into fewer messages");
    // Compression was agreed: 2000-byte payloads go deflated.
    assert!(d.frames.iter().all(|f| matches!(f, ServerFrame::Push(Push::Publication(p)) if p.payload.z)));
    // Acks only move forward, and never past what was sent.
    let ack = |o| ClientFrame::Ack(vec![AckItem { channel: "ch".into(), epoch: "e".into(), offset: o }]);
    let d = send(&mut s, now, &[ack(2)]);
    assert!(d.events.contains(&ServerEvent::Acked { channel: "ch".into(), epoch: "e".into(), offset: 2 }));
    let fetch = d.events.iter().find_map(|e| match e {
        ServerEvent::Fetch { from, limit, .. } => Some((*from, *limit)),
        _ => None,
    });
    assert_eq!(fetch, Some((5, 2)), "room for two: fetch from the store");
    let d = send(&mut s, now, &[ack(1)]);
    assert!(d.events.is_empty(), "a lower ack is ignored");
    for o in 5..=6 {
        s.deliver(now, &publication("ch", o));
    }
    s.fetch_done(now, "ch", FetchEnd::Done);
    let d = drain(&mut s, now);
    assert_eq!(pushed_offsets(&d), vec![5, 6]);
    // 7..=10 are known to exist and the window is full: no fetch yet.
    assert!(!d.events.iter().any(|e| matches!(e, ServerEvent::Fetch { .. })));
    let d = send(&mut s, now, &[ack(99)]);
    assert!(d.events.contains(&ServerEvent::Acked { channel: "ch".into(), epoch: "e".into(), offset: 6 }));
    assert_eq!(s.inflight(), 0);
    assert!(d.events.iter().any(|e| matches!(e, ServerEvent::Fetch { from: 7, limit: 4, .. })));
    // The store lost the position: reconnect and recover with a gap.
    s.fetch_done(now, "ch", FetchEnd::Lost);
    assert_eq!(drain(&mut s, now).close, Some(CloseCode::InsufficientState as u16));
}

#[test]
fn unacknowledged_deliveries_are_redelivered_then_the_consumer_is_dropped() {
    let sub = SubscribeRequest { channel: "ch".into(), qos: Qos::ExactlyOnce, since: None, token: String::new() };
    // Pings far apart: this is about acks, not heartbeats.
    let c = ServerConfig { ping_interval: Duration::from_secs(1000), ..cfg() };
    let (mut s, _) = live_with(c, Encoding::Json, vec![(sub, start(0, 1, Qos::ExactlyOnce))]);
    s.deliver(Instant(0), &publication("ch", 1));
    assert_eq!(pushed_offsets(&drain(&mut s, Instant(0))), vec![1]);
    s.handle_timeout(Instant(29_999));
    assert!(pushed_offsets(&drain(&mut s, Instant(29_999))).is_empty());
    s.handle_timeout(Instant(30_000));
    let d = drain(&mut s, Instant(30_000));
    assert_eq!(pushed_offsets(&d), vec![1], "redelivered after the ack timeout");
    assert_eq!(d.timeout, Some(Instant(60_000)));
    s.handle_timeout(Instant(60_000));
    assert_eq!(pushed_offsets(&drain(&mut s, Instant(60_000))), vec![1]);
    s.handle_timeout(Instant(90_000));
    let d = drain(&mut s, Instant(90_000));
    assert_eq!(d.close, Some(CloseCode::SlowConsumer as u16));
    assert!(CloseCode::reconnects(3003));
}

#[test]
fn qos0_subscriptions_skip_gaps_and_need_no_acks() {
    let sub = SubscribeRequest { channel: "ch".into(), qos: Qos::AtMostOnce, since: None, token: String::new() };
    let (mut s, _) = live(Encoding::Binary, vec![(sub, start(0, 1, Qos::AtMostOnce))]);
    for o in [1, 2, 5, 3, 6] {
        s.deliver(Instant(0), &publication("ch", o));
    }
    let d = drain(&mut s, Instant(0));
    assert_eq!(pushed_offsets(&d), vec![1, 2, 5, 6]);
    assert_eq!(s.inflight(), 0);
}

#[test]
fn slow_reader_is_disconnected_instead_of_growing_memory() {
    let mut c = cfg();
    c.max_queued_bytes = 64 * 1024;
    c.inflight_window = 10_000;
    let t0 = Instant(0);
    let mut s = ServerSession::new(c, Encoding::Binary, t0);
    let sub = SubscribeRequest { channel: "ch".into(), qos: Qos::AtMostOnce, since: None, token: String::new() };
    send(&mut s, t0, &[req(1, connect_cmd(vec![sub]))]);
    let accept = Accept {
        client: ClientInfo::default(),
        expires_in: None,
        subs: vec![Ok(start(0, 1, Qos::AtMostOnce))],
        time_ms: 0,
        subscribe: vec![],
    };
    s.accept(t0, 1, accept);
    // The host delivers but never drains (the socket is not writable).
    let mut rng = ferry_core::rng::Rng::new(7);
    let mut big = |o| {
        SharedPublication::new(Publication {
            payload: Payload { z: false, data: Bytes((0..4000).map(|_| rng.next_u64() as u8).collect()) },
            ..publication("ch", o).publication().clone()
        })
    };
    for o in 1..=100 {
        s.deliver(t0, &big(o));
        assert!(s.queued_bytes() <= 64 * 1024 + 8 * 1024);
    }
    let d = drain(&mut s, t0);
    assert_eq!(d.close, Some(CloseCode::SlowConsumer as u16));
}

#[test]
fn subscribe_limits_and_duplicates() {
    let mut c = cfg();
    c.max_subscriptions = 1;
    let t0 = Instant(0);
    let mut s = ServerSession::new(c, Encoding::Binary, t0);
    send(&mut s, t0, &[req(1, connect_cmd(vec![]))]);
    s.accept(
        t0,
        1,
        Accept {
            client: ClientInfo::default(),
            expires_in: Some(Duration::from_secs(5)),
            subs: vec![],
            time_ms: 0,
            subscribe: vec![],
        },
    );
    drain(&mut s, t0);
    let sub = |ch: &str| {
        Command::Subscribe(SubscribeRequest {
            channel: ch.into(),
            qos: Qos::AtLeastOnce,
            since: None,
            token: String::new(),
        })
    };
    let d = send(&mut s, t0, &[req(2, sub("a")), req(3, sub("a")), req(4, sub("b"))]);
    assert!(matches!(&d.events[..], [ServerEvent::Subscribe { req: 2, .. }]));
    let errs: Vec<(u32, u16)> = d
        .frames
        .iter()
        .filter_map(|f| match f {
            ServerFrame::Reply { id, outcome: Outcome::Error(e) } => Some((*id, e.code)),
            _ => None,
        })
        .collect();
    assert_eq!(errs, vec![(3, ErrorCode::AlreadySubscribed as u16), (4, ErrorCode::LimitExceeded as u16)]);
    s.subscribe_ok(t0, 2, start(7, 8, Qos::AtLeastOnce));
    let d = drain(&mut s, t0);
    assert!(
        matches!(&d.frames[..], [ServerFrame::Reply { id: 2, outcome: Outcome::Ok(ReplyBody::Subscribed(x)) }] if x.top == 7 && x.from == 8)
    );
    // The token expires: close 3005 unless refreshed.
    send(&mut s, Instant(1000), &[req(5, Command::Refresh { token: "new".into() })]);
    s.refresh_ok(Instant(1000), 5, Some(Duration::from_secs(10)));
    drain(&mut s, Instant(1000));
    s.handle_timeout(Instant(5_000));
    assert_eq!(drain(&mut s, Instant(5_000)).close, None, "refreshed in time");
    s.handle_timeout(Instant(11_000));
    assert_eq!(drain(&mut s, Instant(11_000)).close, Some(CloseCode::TokenExpired as u16));
}

#[test]
fn duplicated_connect_frame_is_ignored_but_a_second_connect_is_not() {
    let (mut s, _) = live(Encoding::Binary, vec![]);
    // The same frame again (a duplicating network): dropped silently.
    let d = send(&mut s, Instant(5), &[req(1, connect_cmd(vec![]))]);
    assert_eq!(d.close, None);
    assert!(d.frames.is_empty() && d.events.is_empty());
    assert_eq!(s.stats().duplicate_requests, 1);
    // A new connect on a live connection breaks the protocol.
    let d = send(&mut s, Instant(6), &[req(2, connect_cmd(vec![]))]);
    assert_eq!(d.close, Some(CloseCode::ProtocolViolation as u16));
}

#[test]
fn unsubscribe_answers_not_subscribed_and_cancels_a_pending_subscribe() {
    let (mut s, _) = live(Encoding::Binary, vec![]);
    let t = Instant(1);
    let d = send(&mut s, t, &[req(2, Command::Unsubscribe { channel: "none".into() })]);
    assert!(
        matches!(&d.frames[..], [ServerFrame::Reply { id: 2, outcome: Outcome::Error(e) }] if e.code == ErrorCode::NotSubscribed as u16)
    );
    let sub = Command::Subscribe(SubscribeRequest {
        channel: "a".into(),
        qos: Qos::AtLeastOnce,
        since: None,
        token: String::new(),
    });
    send(&mut s, t, &[req(3, sub)]);
    let d = send(&mut s, t, &[req(4, Command::Unsubscribe { channel: "a".into() })]);
    let ids: Vec<u32> =
        d.frames.iter().filter_map(|f| if let ServerFrame::Reply { id, .. } = f { Some(*id) } else { None }).collect();
    assert_eq!(ids, vec![3, 4], "the pending subscribe is answered, then the unsubscribe");
    assert!(d.events.contains(&ServerEvent::Unsubscribed { channel: "a".into() }));
    // The host's late verdict changes nothing.
    s.subscribe_ok(t, 3, start(0, 1, Qos::AtLeastOnce));
    assert!(drain(&mut s, t).frames.is_empty());
    assert_eq!(s.channels().count(), 0);
}

#[test]
fn dropped_live_copies_are_fetched_after_stream_advanced() {
    let sub = SubscribeRequest { channel: "ch".into(), qos: Qos::AtLeastOnce, since: None, token: String::new() };
    let (mut s, _) = live(Encoding::Binary, vec![(sub, start(0, 1, Qos::AtLeastOnce))]);
    let now = Instant(1);
    s.deliver(now, &publication("ch", 1));
    assert_eq!(pushed_offsets(&drain(&mut s, now)), vec![1]);
    // The host's queue was full: 2 and 3 never reached the session, and
    // nothing later will reveal them. The host says how far the stream got.
    s.stream_advanced(now, "ch", "e", 3);
    let d = drain(&mut s, now);
    assert!(d.events.iter().any(|e| matches!(e, ServerEvent::Fetch { from: 2, .. })), "{:?}", d.events);
    s.deliver(now, &publication("ch", 2));
    s.deliver(now, &publication("ch", 3));
    s.fetch_done(now, "ch", FetchEnd::Done);
    assert_eq!(pushed_offsets(&drain(&mut s, now)), vec![2, 3]);
    // Another epoch means the stream was reset under the subscriber.
    s.stream_advanced(now, "ch", "other", 9);
    assert_eq!(drain(&mut s, now).close, Some(CloseCode::InsufficientState as u16));
}

/// Regression: two channels catching up share one in-flight window. When
/// the first filled it, the second's fetch result could not be pushed, and
/// the session took "nothing pushed" for "the stream ends here": it forgot
/// the second channel's top and never fetched it again, so that subscriber
/// stalled until a new live publication, silently (seen as a subscriber
/// missing a few hundred publications after a Redis failover).
#[test]
fn a_fetch_refused_for_lack_of_room_is_fetched_again_once_acks_free_it() {
    let sub =
        |ch: &str| SubscribeRequest { channel: ch.into(), qos: Qos::AtLeastOnce, since: None, token: String::new() };
    let (mut s, _) = live(
        Encoding::Binary,
        vec![(sub("a"), start(0, 1, Qos::AtLeastOnce)), (sub("b"), start(0, 1, Qos::AtLeastOnce))],
    );
    let now = Instant(10);
    // Both streams advanced while live copies were dropped (lagged).
    s.stream_advanced(now, "a", "e", 10);
    s.stream_advanced(now, "b", "e", 10);
    let d = drain(&mut s, now);
    let fetches: Vec<(String, u64, usize)> = d
        .events
        .iter()
        .filter_map(|e| match e {
            ServerEvent::Fetch { channel, from, limit, .. } => Some((channel.clone(), *from, *limit)),
            _ => None,
        })
        .collect();
    assert_eq!(fetches, vec![("a".into(), 1, 4), ("b".into(), 1, 4)]);
    // The host serves a's fetch first: the shared window of 4 is full ...
    for o in 1..=4 {
        s.deliver(now, &publication("a", o));
    }
    s.fetch_done(now, "a", FetchEnd::Done);
    // ... so b's fetch result cannot be pushed at all.
    for o in 1..=4 {
        s.deliver(now, &publication("b", o));
    }
    s.fetch_done(now, "b", FetchEnd::Done);
    let d = drain(&mut s, now);
    assert_eq!(pushed_offsets(&d), vec![1, 2, 3, 4], "a's four fill the window");
    // Acks free the window: b is fetched again from 1, a from 5.
    let d = send(&mut s, now, &[ClientFrame::Ack(vec![AckItem { channel: "a".into(), epoch: "e".into(), offset: 4 }])]);
    let again: Vec<(String, u64)> = d
        .events
        .iter()
        .filter_map(|e| match e {
            ServerEvent::Fetch { channel, from, .. } => Some((channel.clone(), *from)),
            _ => None,
        })
        .collect();
    assert!(again.contains(&("b".into(), 1)), "b is fetched again: {again:?}");
    assert!(again.contains(&("a".into(), 5)), "a goes on: {again:?}");
}

/// Overload at QoS 0 (issue 15): a lagging subscription whose position
/// the stream no longer retains skips to the live stream and counts the
/// drop; it is not closed (3004), which cut every lagging QoS 0
/// subscriber of a short history again and again.
#[test]
fn a_qos0_subscription_whose_position_is_trimmed_skips_ahead_and_counts_the_drop() {
    let sub = SubscribeRequest { channel: "ch".into(), qos: Qos::AtMostOnce, since: None, token: String::new() };
    let (mut s, _) = live(Encoding::Binary, vec![(sub, start(0, 1, Qos::AtMostOnce))]);
    let now = Instant(1);
    s.deliver(now, &publication("ch", 1));
    assert_eq!(pushed_offsets(&drain(&mut s, now)), vec![1]);
    // Copies 2..=10 were dropped by the host; the stream reaches 10.
    s.stream_advanced(now, "ch", "e", 10);
    let d = drain(&mut s, now);
    assert!(d.events.iter().any(|e| matches!(e, ServerEvent::Fetch { from: 2, .. })), "{:?}", d.events);
    // ... and now starts at 9 (retention trimmed 2..=8).
    s.fetch_done(now, "ch", FetchEnd::Trimmed { first: 9 });
    let d = drain(&mut s, now);
    assert_eq!(d.close, None, "not closed at QoS 0");
    assert_eq!(s.stats().dropped_at_most_once, 7, "2..=8 skipped and counted");
    // What is retained is fetched and pushed (the tail of a burst).
    assert!(d.events.iter().any(|e| matches!(e, ServerEvent::Fetch { from: 9, .. })), "{:?}", d.events);
    s.deliver(now, &publication("ch", 9));
    s.deliver(now, &publication("ch", 10));
    s.fetch_done(now, "ch", FetchEnd::Done);
    assert_eq!(pushed_offsets(&drain(&mut s, now)), vec![9, 10]);
    assert_eq!(s.stats().dropped_at_most_once, 7);
    // Live again; a gap a dropped live copy leaves is counted too.
    s.deliver(now, &publication("ch", 11));
    s.deliver(now, &publication("ch", 13));
    assert_eq!(pushed_offsets(&drain(&mut s, now)), vec![11, 13]);
    assert_eq!(s.stats().dropped_at_most_once, 8);
    // At QoS 1 the same stays a close: a lost position must be told.
    let sub = SubscribeRequest { channel: "q".into(), qos: Qos::AtLeastOnce, since: None, token: String::new() };
    let (mut s, _) = live(Encoding::Binary, vec![(sub, start(0, 1, Qos::AtLeastOnce))]);
    s.stream_advanced(now, "q", "e", 10);
    drain(&mut s, now);
    s.fetch_done(now, "q", FetchEnd::Trimmed { first: 9 });
    assert_eq!(drain(&mut s, now).close, Some(CloseCode::InsufficientState as u16));
}

/// What the host's backpressure reads: a QoS 1 subscription is behind
/// from the moment it has something left to push (a full window, a
/// dropped live copy) until it has pushed up to the stream's top; a QoS 0
/// one never holds publishers back.
#[test]
fn a_qos1_subscription_reports_where_it_is_behind_and_qos0_never_does() {
    let q1 = SubscribeRequest { channel: "q".into(), qos: Qos::AtLeastOnce, since: None, token: String::new() };
    let q0 = SubscribeRequest { channel: "z".into(), qos: Qos::AtMostOnce, since: None, token: String::new() };
    let mut c = cfg();
    c.inflight_window = 100;
    let subs = vec![(q1, start(0, 1, Qos::AtLeastOnce)), (q0, start(0, 1, Qos::AtMostOnce))];
    let (mut s, _) = live_with(c, Encoding::Binary, subs);
    let now = Instant(1);
    let behind = |s: &ServerSession| s.behind().map(|(c, n)| (c.to_string(), n)).collect::<Vec<_>>();
    s.deliver(now, &publication("q", 1));
    s.deliver(now, &publication("z", 1));
    drain(&mut s, now);
    assert_eq!(behind(&s), vec![], "live: nothing left to push");
    assert_eq!(s.position("q"), Some(2));
    assert_eq!(s.position("z"), None, "QoS 0 has no position to hold");
    // The host dropped live copies of both; their streams reach 50.
    s.stream_advanced(now, "q", "e", 50);
    s.stream_advanced(now, "z", "e", 50);
    drain(&mut s, now);
    assert_eq!(behind(&s), vec![("q".to_string(), 2)], "only the QoS 1 subscription holds, from 2");
    // Fetched up to the top: no longer behind.
    for o in 2..=50 {
        s.deliver(now, &publication("q", o));
    }
    s.fetch_done(now, "q", FetchEnd::Done);
    drain(&mut s, now);
    assert_eq!(s.position("q"), Some(51));
    assert_eq!(behind(&s), vec![]);
}
