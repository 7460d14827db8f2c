//! Property tests for the wire codec, payload compression, base64 and varints.
//!
//! Case counts (set explicitly per block, so `PROPTEST_CASES` does not change
//! them):
//! - single-frame round trips: 2000 per test (client/server x binary/JSON)
//! - multi-frame `encode_into` round trips: 1000 per encoding
//! - `Batcher` packing and round trip: 1000 per encoding, plus a fixed
//!   check of the per-message frame cap
//! - decoding random bytes: 5000; decoding mutated encodings: 5000;
//!   re-encoding whatever decodes: 2000; size limits: 1000
//! - compression: pack/unpack 1000, random inflate input 5000, mutated
//!   deflate streams 2000, crafted bombs 200
//! - base64: round trip 2000, random text 5000
//! - varint: round trip 5000, random bytes 5000
//!
//! Failure persistence is off so a failing run writes no files into the
//! source tree; proptest prints the minimal failing input instead.

use ferry_core::base64;
use ferry_core::codec::{
    self, decode_client, decode_server, read_varint, write_varint, Batcher, DecodeError, Encoding,
    MAX_FRAMES_PER_MESSAGE,
};
use ferry_core::compress::{self, inflate, unpack};
use ferry_core::frame::*;
use proptest::prelude::*;
use proptest::sample::Index;
use serde::{de::DeserializeOwned, Serialize};
use std::fmt::Debug;

const ENCODINGS: [Encoding; 2] = [Encoding::Binary, Encoding::Json];
/// Large enough that round-trip tests never hit the size limit.
const NO_LIMIT: usize = usize::MAX;

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() }
}

// ---------------------------------------------------------------------------
// Strategies. Sizes stay small: the codec's logic does not depend on length,
// and small values keep thousands of cases fast in debug builds.

/// Unicode text, biased towards what is special to the JSON encoding
/// (newlines split frames, quotes and backslashes need escaping).
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        1 => Just(String::new()),
        1 => prop::sample::select(vec!["\n", "\"", "\\", "\r\n", "\u{2028}", "\0", "{\"a\":1}\n", "é🦀"])
            .prop_map(str::to_owned),
        2 => "[\"\\\\\n\r\t {}\\[\\]:,a-z0-9]{0,12}",
        4 => prop::collection::vec(any::<char>(), 0..12).prop_map(String::from_iter),
    ]
}

fn bytes() -> impl Strategy<Value = Bytes> {
    prop::collection::vec(any::<u8>(), 0..40).prop_map(Bytes)
}

fn qos() -> impl Strategy<Value = Qos> {
    prop::sample::select(vec![Qos::AtMostOnce, Qos::AtLeastOnce, Qos::ExactlyOnce])
}

prop_compose! {
    fn payload()(z in any::<bool>(), data in bytes()) -> Payload {
        Payload { z, data }
    }
}

prop_compose! {
    fn position()(epoch in text(), offset in any::<u64>()) -> StreamPosition {
        StreamPosition { epoch, offset }
    }
}

prop_compose! {
    fn client_info()(client in text(), user in text(), info in prop::option::of(bytes())) -> ClientInfo {
        ClientInfo { client, user, info }
    }
}

prop_compose! {
    fn publication()(
        channel in text(),
        epoch in text(),
        offset in any::<u64>(),
        message_id in text(),
        qos in qos(),
        publisher in prop::option::of(client_info()),
        time_ms in any::<u64>(),
        payload in payload(),
    ) -> Publication {
        Publication { channel, epoch, offset, message_id, qos, publisher, time_ms, payload }
    }
}

prop_compose! {
    fn subscribe_request()(channel in text(), qos in qos(), since in prop::option::of(position()), token in text()) -> SubscribeRequest {
        SubscribeRequest { channel, qos, since, token }
    }
}

fn history_bound() -> impl Strategy<Value = HistoryBound> {
    prop_oneof![any::<u64>().prop_map(HistoryBound::Offset), any::<u64>().prop_map(HistoryBound::TimeMs)]
}

prop_compose! {
    fn history_request()(
        channel in text(),
        since in prop::option::of(history_bound()),
        until in prop::option::of(history_bound()),
        limit in any::<u32>(),
        reverse in any::<bool>(),
    ) -> HistoryRequest {
        HistoryRequest { channel, since, until, limit, reverse }
    }
}

prop_compose! {
    fn connect()(
        version in any::<u32>(),
        token in text(),
        device_id in text(),
        name in text(),
        client_version in text(),
        subs in prop::collection::vec(subscribe_request(), 0..3),
        compression in any::<bool>(),
    ) -> Connect {
        Connect {
            version,
            token,
            device_id,
            client: ClientVersion { name, version: client_version },
            subs,
            compression,
        }
    }
}

fn command() -> impl Strategy<Value = Command> {
    prop_oneof![
        connect().prop_map(Command::Connect),
        subscribe_request().prop_map(Command::Subscribe),
        text().prop_map(|channel| Command::Unsubscribe { channel }),
        (text(), text(), qos(), payload())
            .prop_map(|(channel, message_id, qos, payload)| { Command::Publish { channel, message_id, qos, payload } }),
        text().prop_map(|message_id| Command::Release { message_id }),
        text().prop_map(|channel| Command::Presence { channel }),
        text().prop_map(|channel| Command::PresenceStats { channel }),
        history_request().prop_map(Command::History),
        text().prop_map(|token| Command::Refresh { token }),
    ]
}

prop_compose! {
    fn ack_item()(channel in text(), epoch in text(), offset in any::<u64>()) -> AckItem {
        AckItem { channel, epoch, offset }
    }
}

fn client_frame() -> BoxedStrategy<ClientFrame> {
    prop_oneof![
        4 => (any::<u32>(), command()).prop_map(|(id, cmd)| ClientFrame::Request { id, cmd }),
        1 => prop::collection::vec(ack_item(), 0..4).prop_map(ClientFrame::Ack),
        1 => Just(ClientFrame::Pong),
    ]
    .boxed()
}

prop_compose! {
    fn subscribed()(
        channel in text(),
        qos in qos(),
        epoch in text(),
        top in any::<u64>(),
        from in any::<u64>(),
        recovered in any::<bool>(),
    ) -> Subscribed {
        Subscribed { channel, qos, epoch, top, from, recovered }
    }
}

prop_compose! {
    fn error_reply()(code in any::<u16>(), message in text(), temporary in any::<bool>()) -> ErrorReply {
        ErrorReply { code, message, temporary }
    }
}

fn subscribe_result() -> impl Strategy<Value = SubscribeResult> {
    prop_oneof![
        subscribed().prop_map(SubscribeResult::Ok),
        (text(), error_reply()).prop_map(|(channel, error)| SubscribeResult::Error { channel, error }),
    ]
}

prop_compose! {
    fn connected()(
        client in text(),
        ping_interval_ms in any::<u64>(),
        pong_timeout_ms in any::<u64>(),
        compress_min in prop::option::of(any::<u32>()),
        max_message_size in any::<u32>(),
        expires_in_ms in prop::option::of(any::<u64>()),
        subs in prop::collection::vec(subscribe_result(), 0..3),
        time_ms in any::<u64>(),
        subscribe in prop::collection::vec(text(), 0..3),
    ) -> Connected {
        Connected {
            client,
            ping_interval_ms,
            pong_timeout_ms,
            compress_min,
            max_message_size,
            expires_in_ms,
            subs,
            time_ms,
            subscribe,
        }
    }
}

fn reply_body() -> impl Strategy<Value = ReplyBody> {
    prop_oneof![
        connected().prop_map(ReplyBody::Connected),
        subscribed().prop_map(ReplyBody::Subscribed),
        Just(ReplyBody::Unsubscribed),
        (text(), any::<u64>(), any::<bool>())
            .prop_map(|(epoch, offset, duplicate)| { ReplyBody::Published { epoch, offset, duplicate } }),
        Just(ReplyBody::Released),
        prop::collection::vec(client_info(), 0..3).prop_map(|clients| ReplyBody::Presence { clients }),
        (any::<u32>(), any::<u32>()).prop_map(|(clients, users)| ReplyBody::PresenceStats { clients, users }),
        (prop::collection::vec(publication(), 0..3), position())
            .prop_map(|(publications, top)| ReplyBody::History { publications, top }),
        prop::option::of(any::<u64>()).prop_map(|expires_in_ms| ReplyBody::Refreshed { expires_in_ms }),
    ]
}

fn outcome() -> impl Strategy<Value = Outcome> {
    prop_oneof![3 => reply_body().prop_map(Outcome::Ok), 1 => error_reply().prop_map(Outcome::Error)]
}

fn push() -> impl Strategy<Value = Push> {
    prop_oneof![
        publication().prop_map(Push::Publication),
        (text(), client_info()).prop_map(|(channel, info)| Push::Join { channel, info }),
        (text(), client_info()).prop_map(|(channel, info)| Push::Leave { channel, info }),
        (text(), any::<u16>(), text()).prop_map(|(channel, code, reason)| Push::Unsubscribed { channel, code, reason }),
        Just(Push::Ping),
        (any::<u16>(), text(), any::<bool>())
            .prop_map(|(code, reason, reconnect)| { Push::Disconnect { code, reason, reconnect } }),
    ]
}

fn server_frame() -> BoxedStrategy<ServerFrame> {
    prop_oneof![
        (any::<u32>(), outcome()).prop_map(|(id, outcome)| ServerFrame::Reply { id, outcome }),
        push().prop_map(ServerFrame::Push),
    ]
    .boxed()
}

/// One way to damage an encoded message.
#[derive(Debug, Clone)]
enum Mutation {
    Flip(Index, u8),
    Insert(Index, u8),
    Delete(Index),
    Truncate(Index),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<Index>(), 0u8..8).prop_map(|(i, bit)| Mutation::Flip(i, bit)),
        // Bytes that are structural in one encoding or the other.
        (any::<Index>(), prop_oneof![any::<u8>(), prop::sample::select(b"\n\"\\{}[]:,0\x80\xff".to_vec())])
            .prop_map(|(i, b)| Mutation::Insert(i, b)),
        any::<Index>().prop_map(Mutation::Delete),
        any::<Index>().prop_map(Mutation::Truncate),
    ]
}

fn apply(msg: &mut Vec<u8>, m: &Mutation) {
    match *m {
        Mutation::Insert(ref i, b) => msg.insert(i.index(msg.len() + 1), b),
        // The rest need at least one byte to act on.
        _ if msg.is_empty() => {}
        Mutation::Flip(ref i, bit) => {
            let at = i.index(msg.len());
            msg[at] ^= 1 << bit;
        }
        Mutation::Delete(ref i) => {
            msg.remove(i.index(msg.len()));
        }
        Mutation::Truncate(ref i) => msg.truncate(i.index(msg.len())),
    }
}

// ---------------------------------------------------------------------------
// Helpers shared by client and server frames.

/// Join separately encoded frames the way the module docs define a message,
/// written independently of `codec::join_into`.
fn joined(enc: Encoding, frames: &[Vec<u8>]) -> Vec<u8> {
    let sep: &[u8] = if enc == Encoding::Json { b"\n" } else { b"" };
    frames.join(sep)
}

fn decode<T: DeserializeOwned>(enc: Encoding, msg: &[u8], max: usize) -> Result<Vec<T>, DecodeError> {
    codec::decode_message(enc, msg, max)
}

fn check_single<T>(enc: Encoding, f: &T) -> Result<(), TestCaseError>
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let msg = codec::encode(enc, f);
    match enc {
        // The line separator must never occur inside a JSON frame.
        Encoding::Json => prop_assert!(!msg.contains(&b'\n') && std::str::from_utf8(&msg).is_ok()),
        // The length prefix must cover exactly the body.
        Encoding::Binary => {
            let (len, used) = read_varint(&msg).ok_or_else(|| TestCaseError::fail("no prefix"))?;
            prop_assert_eq!(len as usize + used, msg.len());
        }
    }
    let back: Vec<T> = decode(enc, &msg, msg.len()).map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(back.len(), 1);
    prop_assert_eq!(&back[0], f);
    Ok(())
}

fn check_multi<T>(enc: Encoding, frames: &[T]) -> Result<(), TestCaseError>
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let mut msg = Vec::new();
    for f in frames {
        codec::encode_into(enc, f, &mut msg);
    }
    let encoded: Vec<Vec<u8>> = frames.iter().map(|f| codec::encode(enc, f)).collect();
    // encode_into and encode + join must agree byte for byte.
    prop_assert_eq!(&msg, &joined(enc, &encoded));
    let back: Vec<T> = decode(enc, &msg, msg.len()).map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(back.as_slice(), frames);
    Ok(())
}

fn check_batcher<T>(enc: Encoding, frames: &[T], max: usize) -> Result<(), TestCaseError>
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let encoded: Vec<Vec<u8>> = frames.iter().map(|f| codec::encode(enc, f)).collect();
    let mut b = Batcher::default();
    prop_assert!(b.is_empty());
    let mut queued = 0;
    for e in &encoded {
        b.push(e.clone());
        queued += e.len();
        prop_assert_eq!(b.bytes(), queued);
    }
    prop_assert_eq!(b.len(), encoded.len());

    let sep = usize::from(enc == Encoding::Json);
    let mut next = 0;
    while let Some(msg) = b.next_message(enc, max) {
        let taken = encoded.len() - next - b.len();
        prop_assert!(taken >= 1, "a message must carry at least one frame");
        let part = &encoded[next..next + taken];
        // Whole frames, in queue order, nothing added or dropped.
        prop_assert_eq!(&msg, &joined(enc, part));
        // Over `max` only when a single frame is itself larger.
        prop_assert!(msg.len() <= max || taken == 1, "{} frames in {} B > max {}", taken, msg.len(), max);
        // Greedy: the frame left at the head would not have fitted, or the
        // message already holds as many frames as a decoder accepts.
        if let Some(head) = encoded.get(next + taken) {
            prop_assert!(msg.len() + sep + head.len() > max || taken == MAX_FRAMES_PER_MESSAGE);
        }
        let back: Vec<T> = decode(enc, &msg, NO_LIMIT).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(back.as_slice(), &frames[next..next + taken]);
        next += taken;
        queued -= part.iter().map(Vec::len).sum::<usize>();
        prop_assert_eq!(b.bytes(), queued);
    }
    prop_assert_eq!(next, encoded.len());
    prop_assert!(b.is_empty());
    prop_assert_eq!(b.bytes(), 0);
    Ok(())
}

/// Whatever decodes must re-encode to something that decodes to the same
/// frames, so a relay can forward any accepted message faithfully.
fn check_reencode<T>(enc: Encoding, msg: &[u8]) -> Result<(), TestCaseError>
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    if let Ok(frames) = decode::<T>(enc, msg, NO_LIMIT) {
        prop_assert!(!frames.is_empty() && frames.len() <= MAX_FRAMES_PER_MESSAGE);
        check_multi(enc, &frames)?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Round trips.

proptest! {
    #![proptest_config(config(2000))]

    #[test]
    fn client_frame_round_trips_binary(f in client_frame()) {
        check_single(Encoding::Binary, &f)?;
        prop_assert_eq!(codec::encode_client(Encoding::Binary, &f), codec::encode(Encoding::Binary, &f));
    }

    #[test]
    fn client_frame_round_trips_json(f in client_frame()) {
        check_single(Encoding::Json, &f)?;
        prop_assert_eq!(codec::encode_client(Encoding::Json, &f), codec::encode(Encoding::Json, &f));
    }

    #[test]
    fn server_frame_round_trips_binary(f in server_frame()) {
        check_single(Encoding::Binary, &f)?;
        prop_assert_eq!(codec::encode_server(Encoding::Binary, &f), codec::encode(Encoding::Binary, &f));
    }

    #[test]
    fn server_frame_round_trips_json(f in server_frame()) {
        check_single(Encoding::Json, &f)?;
        prop_assert_eq!(codec::encode_server(Encoding::Json, &f), codec::encode(Encoding::Json, &f));
    }
}

proptest! {
    #![proptest_config(config(1000))]

    #[test]
    fn multi_frame_messages_round_trip_binary(
        c in prop::collection::vec(client_frame(), 1..6),
        s in prop::collection::vec(server_frame(), 1..6),
    ) {
        check_multi(Encoding::Binary, &c)?;
        check_multi(Encoding::Binary, &s)?;
    }

    #[test]
    fn multi_frame_messages_round_trip_json(
        c in prop::collection::vec(client_frame(), 1..6),
        s in prop::collection::vec(server_frame(), 1..6),
    ) {
        check_multi(Encoding::Json, &c)?;
        check_multi(Encoding::Json, &s)?;
    }

    // `max` spans "smaller than any frame" to "everything fits in one".
    #[test]
    fn batcher_packs_in_order_within_max_binary(
        c in prop::collection::vec(client_frame(), 0..8),
        s in prop::collection::vec(server_frame(), 0..8),
        max in 0usize..700,
    ) {
        check_batcher(Encoding::Binary, &c, max)?;
        check_batcher(Encoding::Binary, &s, max)?;
    }

    #[test]
    fn batcher_packs_in_order_within_max_json(
        c in prop::collection::vec(client_frame(), 0..8),
        s in prop::collection::vec(server_frame(), 0..8),
        max in 0usize..700,
    ) {
        check_batcher(Encoding::Json, &c, max)?;
        check_batcher(Encoding::Json, &s, max)?;
    }
}

// ---------------------------------------------------------------------------
// Hostile input: nothing may panic, and limits are enforced.

/// Bytes that look a little like either encoding, so decoding gets past the
/// first byte more often than with uniform noise.
fn garbage() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..200),
        "[{}\\[\\]\":,0-9a-z_\n \\\\]{0,80}".prop_map(String::into_bytes),
        // A small length prefix followed by small variant indices.
        prop::collection::vec(0u8..12, 0..60),
    ]
}

proptest! {
    #![proptest_config(config(5000))]

    #[test]
    fn random_bytes_never_panic(msg in garbage(), max in prop_oneof![Just(NO_LIMIT), 0usize..256]) {
        for enc in ENCODINGS {
            for r in [decode_client(enc, &msg, max).map(|v| v.len()), decode_server(enc, &msg, max).map(|v| v.len())] {
                match r {
                    Ok(n) => prop_assert!(n >= 1 && msg.len() <= max),
                    Err(DecodeError::TooLarge { size, limit }) => prop_assert!(size == msg.len() && limit == max && size > max),
                    Err(_) => {}
                }
            }
        }
    }

    #[test]
    fn mutated_messages_never_panic(
        c in prop::collection::vec(client_frame(), 1..3),
        s in prop::collection::vec(server_frame(), 1..3),
        muts in prop::collection::vec(mutation(), 1..5),
    ) {
        for enc in ENCODINGS {
            let mut cm = Vec::new();
            c.iter().for_each(|f| codec::encode_into(enc, f, &mut cm));
            let mut sm = Vec::new();
            s.iter().for_each(|f| codec::encode_into(enc, f, &mut sm));
            for m in &muts {
                apply(&mut cm, m);
                apply(&mut sm, m);
            }
            // Each damaged message is fed to both decoders: a peer may
            // send either kind of frame.
            for msg in [&cm, &sm] {
                let _ = decode_client(enc, msg, NO_LIMIT);
                let _ = decode_server(enc, msg, NO_LIMIT);
            }
        }
    }
}

proptest! {
    #![proptest_config(config(2000))]

    #[test]
    fn whatever_decodes_reencodes_faithfully(
        c in prop::collection::vec(client_frame(), 1..3),
        s in prop::collection::vec(server_frame(), 1..3),
        muts in prop::collection::vec(mutation(), 0..3),
    ) {
        for enc in ENCODINGS {
            let mut cm = Vec::new();
            c.iter().for_each(|f| codec::encode_into(enc, f, &mut cm));
            let mut sm = Vec::new();
            s.iter().for_each(|f| codec::encode_into(enc, f, &mut sm));
            for m in &muts {
                apply(&mut cm, m);
                apply(&mut sm, m);
            }
            check_reencode::<ClientFrame>(enc, &cm)?;
            check_reencode::<ServerFrame>(enc, &sm)?;
        }
    }
}

proptest! {
    #![proptest_config(config(1000))]

    // The size check comes before any parsing, whatever the content.
    #[test]
    fn oversize_messages_are_too_large(msg in garbage().prop_filter("non-empty", |m| !m.is_empty()), cut in any::<Index>()) {
        let max = cut.index(msg.len());
        for enc in ENCODINGS {
            let want = DecodeError::TooLarge { size: msg.len(), limit: max };
            prop_assert_eq!(decode_client(enc, &msg, max).unwrap_err(), want.clone());
            prop_assert_eq!(decode_server(enc, &msg, max).unwrap_err(), want);
        }
    }

    // Blank lines separate nothing, so a JSON message of only blanks is empty.
    #[test]
    fn blank_json_messages_are_empty(msg in "[ \t\r\n]{0,20}") {
        prop_assert_eq!(decode_client(Encoding::Json, msg.as_bytes(), NO_LIMIT), Err(DecodeError::Empty));
        prop_assert_eq!(decode_server(Encoding::Json, msg.as_bytes(), NO_LIMIT), Err(DecodeError::Empty));
    }
}

#[test]
fn empty_messages_are_empty() {
    for enc in ENCODINGS {
        assert_eq!(decode_client(enc, b"", NO_LIMIT), Err(DecodeError::Empty));
        assert_eq!(decode_server(enc, b"", 0), Err(DecodeError::Empty));
    }
}

/// `n` copies of `f` in one message, with blank lines mixed into JSON
/// (they must not count as frames).
fn repeated<T: Serialize>(enc: Encoding, f: &T, n: usize) -> Vec<u8> {
    let mut msg = Vec::new();
    for i in 0..n {
        codec::encode_into(enc, f, &mut msg);
        if enc == Encoding::Json && i % 100 == 0 {
            msg.extend_from_slice(b"\n \r");
        }
    }
    msg
}

#[test]
fn frame_count_is_capped() {
    for enc in ENCODINGS {
        let ok = repeated(enc, &ClientFrame::Pong, MAX_FRAMES_PER_MESSAGE);
        assert_eq!(decode_client(enc, &ok, NO_LIMIT).map(|v| v.len()), Ok(MAX_FRAMES_PER_MESSAGE));
        let over = repeated(enc, &ClientFrame::Pong, MAX_FRAMES_PER_MESSAGE + 1);
        assert_eq!(decode_client(enc, &over, NO_LIMIT), Err(DecodeError::TooManyFrames));

        let ping = ServerFrame::Push(Push::Ping);
        let ok = repeated(enc, &ping, MAX_FRAMES_PER_MESSAGE);
        assert_eq!(decode_server(enc, &ok, NO_LIMIT).map(|v| v.len()), Ok(MAX_FRAMES_PER_MESSAGE));
        let over = repeated(enc, &ping, MAX_FRAMES_PER_MESSAGE + 1);
        assert_eq!(decode_server(enc, &over, NO_LIMIT), Err(DecodeError::TooManyFrames));
        // The cap holds even when the surplus frame is itself malformed:
        // counting stops before parsing it.
        let mut junk = ok.clone();
        codec::join_into(enc, b"\x01\xff", &mut junk);
        assert_eq!(decode_server(enc, &junk, NO_LIMIT), Err(DecodeError::TooManyFrames));
    }
}

// Frames too small for the byte limit to bite must still be split at the
// frame cap, or the receiver would refuse the whole message.
#[test]
fn batcher_respects_the_frame_cap() {
    for enc in ENCODINGS {
        let mut b = Batcher::default();
        let total = 2 * MAX_FRAMES_PER_MESSAGE + 10;
        for _ in 0..total {
            b.push(codec::encode(enc, &ClientFrame::Pong));
        }
        let mut counts = Vec::new();
        while let Some(msg) = b.next_message(enc, NO_LIMIT) {
            let frames = decode_client(enc, &msg, NO_LIMIT).expect("batched message decodes");
            assert!(frames.iter().all(|f| *f == ClientFrame::Pong));
            counts.push(frames.len());
        }
        assert_eq!(counts, [MAX_FRAMES_PER_MESSAGE, MAX_FRAMES_PER_MESSAGE, 10]);
    }
}

// ---------------------------------------------------------------------------
// Compression.

/// Data with long runs so that deflate sometimes wins and sometimes not.
fn compressible() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec((any::<u8>(), 1usize..300), 0..12)
        .prop_map(|runs| runs.into_iter().flat_map(|(b, n)| std::iter::repeat_n(b, n)).collect())
}

fn payload_data() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![compressible(), prop::collection::vec(any::<u8>(), 0..600)]
}

/// A hand-made raw deflate stream: one fixed-Huffman block holding a
/// literal 0 then `reps` copies of <length 258, distance 1>, i.e.
/// `1 + 258 * reps` zero bytes from about `13 * reps / 8` bytes of input.
fn bomb(reps: usize) -> Vec<u8> {
    struct Bits {
        out: Vec<u8>,
        acc: u64,
        n: u32,
    }
    impl Bits {
        // Deflate packs fields from the least significant bit up.
        fn put(&mut self, v: u64, n: u32) {
            self.acc |= v << self.n;
            self.n += n;
            while self.n >= 8 {
                self.out.push(self.acc as u8);
                self.acc >>= 8;
                self.n -= 8;
            }
        }
        // Huffman codes are sent most significant bit first.
        fn code(&mut self, code: u64, n: u32) {
            let rev = code.reverse_bits() >> (64 - n);
            self.put(rev, n);
        }
    }
    let mut b = Bits { out: Vec::new(), acc: 0, n: 0 };
    b.put(1, 1); // BFINAL
    b.put(1, 2); // BTYPE = fixed Huffman
    b.code(0x30, 8); // literal 0
    for _ in 0..reps {
        b.code(0xC5, 8); // length code 285 = 258
        b.code(0, 5); // distance code 0 = 1
    }
    b.code(0, 7); // end of block
    b.put(0, 7); // flush the last partial byte
    b.out
}

proptest! {
    #![proptest_config(config(1000))]

    #[test]
    fn pack_unpack_round_trips(data in payload_data(), min in prop::option::of(0u32..800)) {
        let p = compress::pack(data.clone(), min);
        if p.z {
            // Compressed only when asked, above the threshold, and smaller.
            prop_assert!(min.is_some_and(|m| data.len() >= m as usize));
            prop_assert!(p.data.0.len() < data.len());
        } else {
            prop_assert_eq!(&p.data.0, &data);
        }
        prop_assert_eq!(unpack(&p, data.len()), Ok(data.clone()));
        if p.z && !data.is_empty() {
            let limit = data.len() - 1;
            prop_assert_eq!(unpack(&p, limit), Err(DecodeError::InflateLimit { limit }));
        }
    }
}

proptest! {
    #![proptest_config(config(200))]

    #[test]
    fn bombs_hit_the_limit(reps in 1usize..2000, limit in 0usize..600_000) {
        let z = bomb(reps);
        let size = 1 + 258 * reps;
        match inflate(&z, limit) {
            Ok(v) => prop_assert!(limit >= size && v.len() == size && v.iter().all(|&b| b == 0)),
            Err(e) => {
                prop_assert!(limit < size);
                prop_assert_eq!(e, DecodeError::InflateLimit { limit });
            }
        }
    }
}

#[test]
fn big_bomb_is_refused() {
    // ~258 MB of zeros from ~1.6 MB; must stop at the 64 KiB limit.
    let z = bomb(1_000_000);
    assert_eq!(inflate(&z, 64 * 1024), Err(DecodeError::InflateLimit { limit: 64 * 1024 }));
    let p = Payload { z: true, data: Bytes(z) };
    assert_eq!(unpack(&p, 1 << 20), Err(DecodeError::InflateLimit { limit: 1 << 20 }));
}

proptest! {
    #![proptest_config(config(5000))]

    #[test]
    fn inflate_random_bytes_never_panics(data in prop::collection::vec(any::<u8>(), 0..200), limit in 0usize..5000) {
        if let Ok(v) = inflate(&data, limit) {
            prop_assert!(v.len() <= limit);
        }
    }
}

proptest! {
    #![proptest_config(config(2000))]

    #[test]
    fn inflate_mutated_streams_never_panics(
        data in compressible(),
        muts in prop::collection::vec(mutation(), 1..4),
        limit in 0usize..5000,
    ) {
        let mut z = miniz_oxide::deflate::compress_to_vec(&data, 3);
        for m in &muts {
            apply(&mut z, m);
        }
        if let Ok(v) = inflate(&z, limit) {
            prop_assert!(v.len() <= limit);
        }
    }
}

// ---------------------------------------------------------------------------
// Base64.

proptest! {
    #![proptest_config(config(2000))]

    #[test]
    fn base64_round_trips(data in prop::collection::vec(any::<u8>(), 0..100)) {
        let text = base64::encode(&data);
        prop_assert_eq!(text.len(), data.len().div_ceil(3) * 4);
        prop_assert_eq!(base64::decode(&text), Ok(data));
    }
}

proptest! {
    #![proptest_config(config(5000))]

    // Accepting only canonical text means decode is exactly encode's inverse:
    // anything it accepts, encode reproduces character for character.
    #[test]
    fn base64_decode_is_total_and_canonical(text in prop_oneof![any::<String>(), "[A-Za-z0-9+/=]{0,16}", "([A-Za-z0-9+/]{4}){0,3}[A-Za-z0-9+/]{2,3}={0,2}"]) {
        if let Ok(data) = base64::decode(&text) {
            prop_assert_eq!(base64::encode(&data), text);
        }
    }
}

// ---------------------------------------------------------------------------
// Varints.

/// Values of every magnitude, so each encoded length is equally likely.
fn varint_value() -> impl Strategy<Value = u64> {
    (any::<u64>(), 0u32..=64).prop_map(|(v, bits)| v.checked_shr(64 - bits).unwrap_or(0))
}

/// LEB128 read independently, with room to detect values past u64.
fn reference_varint(buf: &[u8]) -> Option<(u64, usize)> {
    let mut v: u128 = 0;
    for (i, &b) in buf.iter().enumerate().take(10) {
        v |= u128::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return u64::try_from(v).ok().map(|v| (v, i + 1));
        }
    }
    None
}

proptest! {
    #![proptest_config(config(5000))]

    #[test]
    fn varint_round_trips(v in varint_value(), tail in prop::collection::vec(any::<u8>(), 0..4)) {
        let mut buf = Vec::new();
        write_varint(v, &mut buf);
        let bits = 64 - v.leading_zeros() as usize;
        prop_assert_eq!(buf.len(), bits.div_ceil(7).max(1));
        let n = buf.len();
        // A truncated prefix is never mistaken for a value.
        prop_assert_eq!(read_varint(&buf[..n - 1]), None);
        buf.extend_from_slice(&tail);
        prop_assert_eq!(read_varint(&buf), Some((v, n)));
    }

    #[test]
    fn read_varint_matches_reference(buf in prop_oneof![
        prop::collection::vec(any::<u8>(), 0..14),
        // Long continuation runs reach the 10-byte and overflow edges.
        (prop::collection::vec(0x80u8..=0xff, 8..11), prop::collection::vec(any::<u8>(), 0..3))
            .prop_map(|(mut a, b)| { a.extend(b); a }),
    ]) {
        prop_assert_eq!(read_varint(&buf), reference_varint(&buf));
    }
}

#[test]
fn varint_edges() {
    for v in [0, 127, 128, 16383, 16384, u64::MAX >> 1, u64::MAX] {
        let mut buf = Vec::new();
        write_varint(v, &mut buf);
        assert_eq!(read_varint(&buf), Some((v, buf.len())));
    }
    assert_eq!(read_varint(&[0xff; 9].iter().copied().chain([0x01]).collect::<Vec<_>>()), Some((u64::MAX, 10)));
    // A 10th byte above 1 would overflow u64.
    assert_eq!(read_varint(&[0xff; 9].iter().copied().chain([0x02]).collect::<Vec<_>>()), None);
    assert_eq!(read_varint(&[0x80; 10]), None);
    assert_eq!(read_varint(&[]), None);
}

// ---------------------------------------------------------------------------
// The strategies must keep up with the frame types. The matches below are
// exhaustive on purpose: a new variant breaks the build here until a
// strategy generates it.

fn client_variants(f: &ClientFrame, seen: &mut std::collections::BTreeSet<&'static str>) {
    let name = match f {
        ClientFrame::Request { cmd, .. } => match cmd {
            Command::Connect(c) => {
                if c.subs.iter().any(|s| s.since.is_some()) {
                    seen.insert("since");
                }
                "connect"
            }
            Command::Subscribe(_) => "subscribe",
            Command::Unsubscribe { .. } => "unsubscribe",
            Command::Publish { payload, .. } => {
                seen.insert(if payload.z { "z" } else { "plain" });
                "publish"
            }
            Command::Release { .. } => "release",
            Command::Presence { .. } => "presence",
            Command::PresenceStats { .. } => "presence_stats",
            Command::History(h) => {
                for b in [&h.since, &h.until].into_iter().flatten() {
                    seen.insert(match b {
                        HistoryBound::Offset(_) => "offset",
                        HistoryBound::TimeMs(_) => "time_ms",
                    });
                }
                "history"
            }
            Command::Refresh { .. } => "refresh",
        },
        ClientFrame::Ack(items) if !items.is_empty() => "ack",
        ClientFrame::Ack(_) => "ack_empty",
        ClientFrame::Pong => "pong",
    };
    seen.insert(name);
}

fn server_variants(f: &ServerFrame, seen: &mut std::collections::BTreeSet<&'static str>) {
    let name = match f {
        ServerFrame::Reply { outcome: Outcome::Error(_), .. } => "error",
        ServerFrame::Reply { outcome: Outcome::Ok(body), .. } => match body {
            ReplyBody::Connected(c) => {
                for s in &c.subs {
                    seen.insert(match s {
                        SubscribeResult::Ok(_) => "sub_ok",
                        SubscribeResult::Error { .. } => "sub_error",
                    });
                }
                "connected"
            }
            ReplyBody::Subscribed(_) => "subscribed",
            ReplyBody::Unsubscribed => "unsubscribed",
            ReplyBody::Published { .. } => "published",
            ReplyBody::Released => "released",
            ReplyBody::Presence { clients } => {
                for c in clients {
                    seen.insert(if c.info.is_some() { "info" } else { "no_info" });
                }
                "presence"
            }
            ReplyBody::PresenceStats { .. } => "presence_stats",
            ReplyBody::History { .. } => "history",
            ReplyBody::Refreshed { .. } => "refreshed",
        },
        ServerFrame::Push(p) => match p {
            Push::Publication(p) => {
                seen.insert(if p.publisher.is_some() { "publisher" } else { "no_publisher" });
                "publication"
            }
            Push::Join { .. } => "join",
            Push::Leave { .. } => "leave",
            Push::Unsubscribed { .. } => "push_unsubscribed",
            Push::Ping => "ping",
            Push::Disconnect { .. } => "disconnect",
        },
    };
    seen.insert(name);
}

#[test]
fn strategies_cover_every_variant() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;

    let mut runner = TestRunner::deterministic();
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..2000 {
        client_variants(&client_frame().new_tree(&mut runner).unwrap().current(), &mut seen);
    }
    let want = [
        "ack",
        "ack_empty",
        "connect",
        "history",
        "offset",
        "plain",
        "pong",
        "presence",
        "presence_stats",
        "publish",
        "refresh",
        "release",
        "since",
        "subscribe",
        "time_ms",
        "unsubscribe",
        "z",
    ];
    assert_eq!(seen, want.into_iter().collect());

    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..2000 {
        server_variants(&server_frame().new_tree(&mut runner).unwrap().current(), &mut seen);
    }
    let want = [
        "connected",
        "disconnect",
        "error",
        "history",
        "info",
        "join",
        "leave",
        "no_info",
        "no_publisher",
        "ping",
        "presence",
        "presence_stats",
        "publication",
        "published",
        "publisher",
        "push_unsubscribed",
        "refreshed",
        "released",
        "sub_error",
        "sub_ok",
        "subscribed",
        "unsubscribed",
    ];
    assert_eq!(seen, want.into_iter().collect());
}

#[test]
fn qos_wire_numbers() {
    for v in 0..=u8::MAX {
        match Qos::from_u8(v) {
            Some(q) => assert_eq!(q.as_u8(), v),
            None => assert!(v > 2),
        }
    }
}
