//! Keeps `docs/PROTOCOL.md` honest: its examples must decode with this
//! crate, and its tables must match the crate's codes, variant indices and
//! field orders.
//!
//! What is checked:
//! - every ```` ```json client ```` / ```` ```json server ```` block: each line
//!   decodes as one frame, re-encodes and decodes to the same value, and the
//!   whole block decodes as one message; the same frames also survive the
//!   binary encoding;
//! - every ```` ```hex client ```` / ```` ```hex server ```` block (one binary
//!   message, `#` starts a comment): decodes, re-encodes to the same bytes, and
//!   holds the same frames as the JSON block of the same direction just above;
//! - the error-code and close-code tables (`| Code | Name | Temporary |` and
//!   `| Code | Name | Reconnect |`): one row per code in `ErrorCode::ALL` /
//!   `CloseCode::ALL`, right name, right yes/no;
//! - the variant index table (`| Enum | Index | Variant |`) against the
//!   postcard index and the crate's full variant list;
//! - the field tables (`| # | Field | Type |` under a heading naming the type)
//!   against the field order serde writes;
//! - a few constants (subprotocols, size limits).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use ferry_core::codec::{self, DecodeError, Encoding};
use ferry_core::frame::*;
use ferry_core::{CloseCode, ErrorCode};
use serde::de::{DeserializeOwned, IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

const DOC_PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/PROTOCOL.md");
const LIMIT: usize = 1 << 20;

fn doc() -> String {
    std::fs::read_to_string(DOC_PATH).unwrap_or_else(|e| panic!("reading {DOC_PATH}: {e}"))
}

// ---------------------------------------------------------------------------
// Markdown helpers

/// A fenced code block: info string, 1-based line of the opening fence, body.
struct Block {
    info: String,
    line: usize,
    body: Vec<String>,
}

fn fenced_blocks(doc: &str) -> Vec<Block> {
    let mut out = Vec::new();
    let mut open: Option<Block> = None;
    for (i, raw) in doc.lines().enumerate() {
        let t = raw.trim();
        match open.take() {
            None => {
                if let Some(info) = t.strip_prefix("```") {
                    open = Some(Block { info: info.trim().to_string(), line: i + 1, body: Vec::new() });
                }
            }
            Some(mut b) => {
                if t == "```" {
                    out.push(b);
                } else {
                    b.body.push(raw.to_string());
                    open = Some(b);
                }
            }
        }
    }
    assert!(open.is_none(), "unterminated code block in PROTOCOL.md");
    out
}

/// Cells of a Markdown table row, trimmed, backticks removed.
fn cells(row: &str) -> Vec<String> {
    let row = row.trim();
    let inner = row.strip_prefix('|').unwrap_or(row);
    let inner = inner.strip_suffix('|').unwrap_or(inner);
    inner.split('|').map(|c| c.trim().replace('`', "")).collect()
}

fn is_separator(row: &str) -> bool {
    cells(row).iter().all(|c| !c.is_empty() && c.chars().all(|ch| matches!(ch, '-' | ':' | ' ')))
}

/// Data rows of every table whose header row starts with `header` (cells
/// compared case-insensitively, ignoring spacing), paired with the text of
/// the nearest heading above the table.
fn tables(doc: &str, header: &[&str]) -> Vec<(String, Vec<Vec<String>>)> {
    let lines: Vec<&str> = doc.lines().collect();
    let mut out = Vec::new();
    let mut heading = String::new();
    let mut i = 0;
    while i < lines.len() {
        let t = lines[i].trim();
        if t.starts_with('#') {
            heading = t.to_string();
        }
        if t.starts_with('|') {
            let head = cells(t);
            let matches = head.len() >= header.len()
                && header.iter().zip(&head).all(|(want, got)| want.eq_ignore_ascii_case(got));
            if matches {
                let mut rows = Vec::new();
                i += 1;
                while i < lines.len() && lines[i].trim().starts_with('|') {
                    if !is_separator(lines[i]) {
                        rows.push(cells(lines[i]));
                    }
                    i += 1;
                }
                out.push((heading.clone(), rows));
                continue;
            }
            // Skip the rest of a table we are not interested in.
            while i < lines.len() && lines[i].trim().starts_with('|') {
                i += 1;
            }
            continue;
        }
        i += 1;
    }
    out
}

fn one_table(doc: &str, header: &[&str]) -> Vec<Vec<String>> {
    let mut t = tables(doc, header);
    assert_eq!(t.len(), 1, "expected exactly one table with header {header:?}");
    t.pop().unwrap().1
}

fn snake_case(camel: &str) -> String {
    let mut s = String::new();
    for (i, c) in camel.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                s.push('_');
            }
            s.push(c.to_ascii_lowercase());
        } else {
            s.push(c);
        }
    }
    s
}

fn yes_no(cell: &str, ctx: &str) -> bool {
    match cell.to_ascii_lowercase().as_str() {
        "yes" => true,
        "no" => false,
        other => panic!("{ctx}: expected yes/no, found {other:?}"),
    }
}

// ---------------------------------------------------------------------------
// Frame examples

#[derive(Debug, PartialEq)]
enum Frames {
    Client(Vec<ClientFrame>),
    Server(Vec<ServerFrame>),
}

type DecodeFn<T> = fn(Encoding, &[u8], usize) -> Result<Vec<T>, DecodeError>;
type EncodeFn<T> = fn(Encoding, &T) -> Vec<u8>;

/// Decode each line as one JSON frame, check the JSON round trip, and check
/// that the block as a whole decodes as one message with the same frames.
fn check_json_block<T: PartialEq + fmt::Debug>(b: &Block, decode: DecodeFn<T>, encode: EncodeFn<T>) -> Vec<T> {
    let mut frames = Vec::new();
    for (n, line) in b.body.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = format!("PROTOCOL.md line {} ({})", b.line + 1 + n, b.info);
        let mut got = decode(Encoding::Json, line.as_bytes(), LIMIT)
            .unwrap_or_else(|e| panic!("{at}: does not decode: {e}\n{line}"));
        assert_eq!(got.len(), 1, "{at}: one frame per line");
        let frame = got.pop().unwrap();
        let again = encode(Encoding::Json, &frame);
        let back = decode(Encoding::Json, &again, LIMIT)
            .unwrap_or_else(|e| panic!("{at}: re-encoded frame does not decode: {e}"));
        assert_eq!(back, vec![frame], "{at}: JSON round trip changed the frame");
        frames.push(back.into_iter().next().unwrap());
    }
    assert!(!frames.is_empty(), "PROTOCOL.md line {}: empty {} block", b.line, b.info);
    let whole = b.body.join("\n");
    let all = decode(Encoding::Json, whole.as_bytes(), LIMIT)
        .unwrap_or_else(|e| panic!("PROTOCOL.md line {}: block as one message: {e}", b.line));
    assert_eq!(all, frames, "PROTOCOL.md line {}: block as one message", b.line);
    frames
}

fn parse_hex(b: &Block) -> Vec<u8> {
    let mut bytes = Vec::new();
    for (n, line) in b.body.iter().enumerate() {
        let data = line.split('#').next().unwrap_or("");
        for tok in data.split_whitespace() {
            let ok = tok.len() == 2 && tok.chars().all(|c| c.is_ascii_hexdigit());
            assert!(ok, "PROTOCOL.md line {}: bad hex byte {tok:?}", b.line + 1 + n);
            bytes.push(u8::from_str_radix(tok, 16).unwrap());
        }
    }
    assert!(!bytes.is_empty(), "PROTOCOL.md line {}: empty hex block", b.line);
    bytes
}

/// Decode a binary message and check that re-encoding gives the same bytes.
fn check_hex_block<T: PartialEq + fmt::Debug>(b: &Block, decode: DecodeFn<T>, encode: EncodeFn<T>) -> Vec<T> {
    let bytes = parse_hex(b);
    let frames = decode(Encoding::Binary, &bytes, LIMIT)
        .unwrap_or_else(|e| panic!("PROTOCOL.md line {}: hex does not decode: {e}", b.line));
    let mut again = Vec::new();
    for f in &frames {
        again.extend(encode(Encoding::Binary, f));
    }
    assert_eq!(again, bytes, "PROTOCOL.md line {}: re-encoding gives other bytes", b.line);
    let back = decode(Encoding::Binary, &again, LIMIT).unwrap();
    assert_eq!(back, frames);
    frames
}

const TAGS: [&str; 4] = ["json client", "json server", "hex client", "hex server"];

#[test]
fn frame_examples_decode_and_round_trip() {
    let doc = doc();
    let mut last_json: Option<Frames> = None;
    let (mut json_blocks, mut hex_blocks, mut frames_seen) = (0, 0, 0);
    for b in fenced_blocks(&doc) {
        let tagged_like = b.info.starts_with("json ") || b.info.starts_with("hex ");
        if !TAGS.contains(&b.info.as_str()) {
            assert!(!tagged_like, "PROTOCOL.md line {}: unknown block tag {:?}", b.line, b.info);
            continue;
        }
        match b.info.as_str() {
            "json client" => {
                let f = check_json_block(&b, codec::decode_client, codec::encode_client);
                frames_seen += f.len();
                json_blocks += 1;
                last_json = Some(Frames::Client(f));
            }
            "json server" => {
                let f = check_json_block(&b, codec::decode_server, codec::encode_server);
                frames_seen += f.len();
                json_blocks += 1;
                last_json = Some(Frames::Server(f));
            }
            "hex client" | "hex server" => {
                let got = if b.info == "hex client" {
                    Frames::Client(check_hex_block(&b, codec::decode_client, codec::encode_client))
                } else {
                    Frames::Server(check_hex_block(&b, codec::decode_server, codec::encode_server))
                };
                assert_eq!(
                    last_json.as_ref(),
                    Some(&got),
                    "PROTOCOL.md line {}: hex block must hold the frames of the JSON block just above it",
                    b.line
                );
                hex_blocks += 1;
            }
            _ => unreachable!(),
        }
    }
    // Guard against the extraction silently finding nothing.
    assert!(json_blocks >= 20, "only {json_blocks} JSON example blocks found");
    assert!(frames_seen >= 30, "only {frames_seen} JSON example frames found");
    assert!(hex_blocks >= 1, "no hex example found");
}

/// Every JSON example must also survive the binary encoding, including
/// frames with absent optional fields (a field skipped when serialising
/// would shift every later field in postcard).
#[test]
fn frame_examples_round_trip_in_binary() {
    let doc = doc();
    let mut failures = Vec::new();
    for b in fenced_blocks(&doc) {
        let msg = b.body.join("\n");
        let res = match b.info.as_str() {
            "json client" => {
                let frames = codec::decode_client(Encoding::Json, msg.as_bytes(), LIMIT).unwrap();
                let mut bin = Vec::new();
                frames.iter().for_each(|f| bin.extend(codec::encode_client(Encoding::Binary, f)));
                codec::decode_client(Encoding::Binary, &bin, LIMIT).map(|g| g == frames)
            }
            "json server" => {
                let frames = codec::decode_server(Encoding::Json, msg.as_bytes(), LIMIT).unwrap();
                let mut bin = Vec::new();
                frames.iter().for_each(|f| bin.extend(codec::encode_server(Encoding::Binary, f)));
                codec::decode_server(Encoding::Binary, &bin, LIMIT).map(|g| g == frames)
            }
            _ => continue,
        };
        if res != Ok(true) {
            failures.push(format!("line {}: {res:?}", b.line));
        }
    }
    assert!(failures.is_empty(), "binary round trip failed:\n{}", failures.join("\n"));
}

// ---------------------------------------------------------------------------
// Code tables

/// Rows of a code table as number -> (name, yes/no cell).
fn code_rows(doc: &str, retry_col: &str) -> BTreeMap<u16, (String, bool)> {
    let rows = one_table(doc, &["Code", "Name", retry_col]);
    let mut out = BTreeMap::new();
    for r in rows {
        let code: u16 = r[0].parse().unwrap_or_else(|_| panic!("{retry_col} table: bad code {:?}", r[0]));
        let flag = yes_no(&r[2], &format!("code {code}"));
        assert!(out.insert(code, (r[1].clone(), flag)).is_none(), "code {code} listed twice");
    }
    out
}

#[test]
fn error_code_table_matches_error_code() {
    let rows = code_rows(&doc(), "Temporary");
    for &c in ErrorCode::ALL {
        let n = c as u16;
        let (name, temporary) = rows.get(&n).unwrap_or_else(|| panic!("error code {n} ({c:?}) missing from the table"));
        assert_eq!(*name, snake_case(&format!("{c:?}")), "name of error code {n}");
        assert_eq!(*temporary, c.temporary(), "Temporary column of error code {n}");
    }
    for n in rows.keys() {
        assert!(ErrorCode::from_u16(*n).is_some(), "error table lists unknown code {n}");
    }
}

#[test]
fn close_code_table_matches_close_code() {
    let rows = code_rows(&doc(), "Reconnect");
    for &c in CloseCode::ALL {
        let n = c as u16;
        let (name, reconnect) = rows.get(&n).unwrap_or_else(|| panic!("close code {n} ({c:?}) missing from the table"));
        assert_eq!(*name, snake_case(&format!("{c:?}")), "name of close code {n}");
        assert_eq!(*reconnect, CloseCode::reconnects(n), "Reconnect column of close code {n}");
    }
    for n in rows.keys() {
        assert!(CloseCode::from_u16(*n).is_some(), "close table lists unknown code {n}");
    }
}

// ---------------------------------------------------------------------------
// Variant indices

/// The variant name a value serializes as in JSON.
fn json_variant<T: Serialize>(v: &T) -> String {
    match serde_json::to_value(v).unwrap() {
        serde_json::Value::String(s) => s,
        serde_json::Value::Object(m) if m.len() == 1 => m.keys().next().unwrap().clone(),
        other => panic!("not an externally tagged enum value: {other}"),
    }
}

/// The postcard variant index a value serializes with.
fn binary_variant<T: Serialize>(v: &T) -> u64 {
    let bytes = postcard::to_allocvec(v).unwrap();
    codec::read_varint(&bytes).expect("variant index").0
}

/// Every variant name of enum `T`, read from serde's "unknown variant" error,
/// so that a variant added to the crate but not to the doc is noticed.
fn all_variants<T: DeserializeOwned + fmt::Debug>() -> BTreeSet<String> {
    let err = serde_json::from_str::<T>("\"__no_such_variant__\"").unwrap_err().to_string();
    let (_, expected) = err.split_once("expected").unwrap_or_else(|| panic!("unexpected error: {err}"));
    let names: BTreeSet<String> = expected.split('`').skip(1).step_by(2).map(str::to_string).collect();
    assert!(!names.is_empty(), "cannot read variant names from: {err}");
    names
}

fn pos() -> StreamPosition {
    StreamPosition { epoch: "e".into(), offset: 7 }
}

fn info() -> ClientInfo {
    ClientInfo { client: "c".into(), user: "u".into(), info: Some(Bytes(vec![1])) }
}

fn payload() -> Payload {
    Payload { z: true, data: Bytes(vec![1, 2, 3]) }
}

fn publication() -> Publication {
    Publication {
        channel: "ch".into(),
        epoch: "e".into(),
        offset: 1,
        message_id: "m".into(),
        qos: Qos::ExactlyOnce,
        publisher: Some(info()),
        time_ms: 5,
        payload: payload(),
    }
}

fn sub_req() -> SubscribeRequest {
    SubscribeRequest { channel: "ch".into(), qos: Qos::AtLeastOnce, since: Some(pos()), token: "t".into() }
}

fn history_req() -> HistoryRequest {
    HistoryRequest {
        channel: "ch".into(),
        since: Some(HistoryBound::Offset(1)),
        until: Some(HistoryBound::TimeMs(2)),
        limit: 3,
        reverse: true,
    }
}

fn connect() -> Connect {
    Connect {
        version: PROTOCOL_VERSION,
        token: "t".into(),
        device_id: "d".into(),
        client: ClientVersion { name: "n".into(), version: "v".into() },
        subs: vec![sub_req()],
        compression: true,
    }
}

fn subscribed() -> Subscribed {
    Subscribed { channel: "ch".into(), qos: Qos::AtLeastOnce, epoch: "e".into(), top: 9, from: 10, recovered: true }
}

fn error_reply() -> ErrorReply {
    ErrorReply::new(ErrorCode::BadRequest)
}

fn connected() -> Connected {
    Connected {
        client: "c".into(),
        ping_interval_ms: 1,
        pong_timeout_ms: 2,
        compress_min: Some(3),
        max_message_size: 4,
        expires_in_ms: Some(5),
        subs: vec![SubscribeResult::Ok(subscribed())],
        time_ms: 6,
        subscribe: vec!["feed:news".into()],
    }
}

// Samples with every optional field present, so that JSON shows all fields.
// When a field is added to a frame type, set it to `Some(..)` here.

fn commands() -> Vec<Command> {
    vec![
        Command::Connect(connect()),
        Command::Subscribe(sub_req()),
        Command::Unsubscribe { channel: "ch".into() },
        Command::Publish { channel: "ch".into(), message_id: "m".into(), qos: Qos::ExactlyOnce, payload: payload() },
        Command::Release { message_id: "m".into() },
        Command::Presence { channel: "ch".into() },
        Command::PresenceStats { channel: "ch".into() },
        Command::History(history_req()),
        Command::Refresh { token: "t".into() },
    ]
}

fn client_frames() -> Vec<ClientFrame> {
    vec![
        ClientFrame::Request { id: 1, cmd: Command::Unsubscribe { channel: "ch".into() } },
        ClientFrame::Ack(vec![AckItem { channel: "ch".into(), epoch: "e".into(), offset: 1 }]),
        ClientFrame::Pong,
    ]
}

fn reply_bodies() -> Vec<ReplyBody> {
    vec![
        ReplyBody::Connected(connected()),
        ReplyBody::Subscribed(subscribed()),
        ReplyBody::Unsubscribed,
        ReplyBody::Published { epoch: "e".into(), offset: 1, duplicate: true },
        ReplyBody::Released,
        ReplyBody::Presence { clients: vec![info()] },
        ReplyBody::PresenceStats { clients: 2, users: 1 },
        ReplyBody::History { publications: vec![publication()], top: pos() },
        ReplyBody::Refreshed { expires_in_ms: Some(1) },
    ]
}

fn outcomes() -> Vec<Outcome> {
    vec![Outcome::Ok(ReplyBody::Released), Outcome::Error(error_reply())]
}

fn subscribe_results() -> Vec<SubscribeResult> {
    vec![SubscribeResult::Ok(subscribed()), SubscribeResult::Error { channel: "ch".into(), error: error_reply() }]
}

fn pushes() -> Vec<Push> {
    vec![
        Push::Publication(publication()),
        Push::Join { channel: "ch".into(), info: info() },
        Push::Leave { channel: "ch".into(), info: info() },
        Push::Unsubscribed { channel: "ch".into(), code: 3500, reason: "r".into() },
        Push::Ping,
        Push::Disconnect { code: 3000, reason: "r".into(), reconnect: true },
    ]
}

fn server_frames() -> Vec<ServerFrame> {
    vec![ServerFrame::Reply { id: 1, outcome: Outcome::Ok(ReplyBody::Released) }, ServerFrame::Push(Push::Ping)]
}

fn history_bounds() -> Vec<HistoryBound> {
    vec![HistoryBound::Offset(1), HistoryBound::TimeMs(2)]
}

/// One sample value of an enum variant.
struct VariantSample {
    /// Variant name as JSON writes it.
    name: String,
    /// postcard variant index.
    index: u64,
    /// The sample in JSON.
    json: String,
}

/// Samples of one enum, checked to cover every variant exactly once.
fn variant_samples<T: Serialize + DeserializeOwned + fmt::Debug>(samples: &[T]) -> Vec<VariantSample> {
    let out: Vec<VariantSample> = samples
        .iter()
        .map(|s| VariantSample {
            name: json_variant(s),
            index: binary_variant(s),
            json: serde_json::to_string(s).unwrap(),
        })
        .collect();
    let names: Vec<&str> = out.iter().map(|s| s.name.as_str()).collect();
    let set: BTreeSet<String> = names.iter().map(|n| n.to_string()).collect();
    assert_eq!(set.len(), names.len(), "duplicate samples: {names:?}");
    assert_eq!(set, all_variants::<T>(), "samples do not cover every variant");
    out
}

fn all_enum_samples() -> Vec<(&'static str, Vec<VariantSample>)> {
    vec![
        ("ClientFrame", variant_samples(&client_frames())),
        ("Command", variant_samples(&commands())),
        ("ServerFrame", variant_samples(&server_frames())),
        ("Outcome", variant_samples(&outcomes())),
        ("ReplyBody", variant_samples(&reply_bodies())),
        ("SubscribeResult", variant_samples(&subscribe_results())),
        ("Push", variant_samples(&pushes())),
        ("HistoryBound", variant_samples(&history_bounds())),
    ]
}

/// The variant index table as (enum, variant) -> (index, body cell).
fn variant_table(doc: &str) -> BTreeMap<(String, String), (u64, String)> {
    let mut out = BTreeMap::new();
    for r in one_table(doc, &["Enum", "Index", "Variant", "Body"]) {
        let idx: u64 = r[1].parse().unwrap_or_else(|_| panic!("bad index in row {r:?}"));
        let key = (r[0].clone(), r[2].clone());
        assert!(out.insert(key, (idx, r[3].clone())).is_none(), "row listed twice: {r:?}");
    }
    out
}

#[test]
fn variant_index_table_matches_postcard() {
    let documented = variant_table(&doc());
    let mut seen = BTreeSet::new();
    for (enum_name, samples) in all_enum_samples() {
        for s in samples {
            let key = (enum_name.to_string(), s.name.clone());
            let (idx, body) =
                documented.get(&key).unwrap_or_else(|| panic!("variant table lacks {enum_name} {}", s.name));
            assert_eq!(*idx, s.index, "postcard index of {enum_name} {}", s.name);
            let unit = s.json.starts_with('"');
            assert_eq!(body == "none", unit, "Body of {enum_name} {} (unit variants say none)", s.name);
            seen.insert(key);
        }
    }
    let extra: Vec<_> = documented.keys().filter(|k| !seen.contains(*k)).collect();
    assert!(extra.is_empty(), "variant table lists variants the crate lacks: {extra:?}");
}

// ---------------------------------------------------------------------------
// Field order

/// Object keys in the order they appear.
struct Keys(Vec<String>);

impl<'de> Deserialize<'de> for Keys {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Keys;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Keys, A::Error> {
                let mut keys = Vec::new();
                while let Some(k) = m.next_key::<String>()? {
                    m.next_value::<IgnoredAny>()?;
                    keys.push(k);
                }
                Ok(Keys(keys))
            }
        }
        d.deserialize_map(V)
    }
}

/// The field names of a struct value, in serialization (= wire) order.
fn fields<T: Serialize>(v: &T) -> Vec<String> {
    serde_json::from_str::<Keys>(&serde_json::to_string(v).unwrap()).unwrap().0
}

/// The field names of the body of an enum value written `{"variant": {...}}`.
fn body_fields(json: &str) -> Vec<String> {
    let m: BTreeMap<String, Keys> =
        serde_json::from_str(json).unwrap_or_else(|e| panic!("{json} has no struct body: {e}"));
    m.into_values().next().unwrap().0
}

#[test]
fn field_tables_match_wire_order() {
    let doc = doc();
    let mut documented: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (heading, rows) in tables(&doc, &["#", "Field", "Type"]) {
        let key = heading
            .split('`')
            .nth(1)
            .unwrap_or_else(|| panic!("field table under heading {heading:?} names no `Type`"))
            .to_string();
        let mut names = Vec::new();
        for (i, r) in rows.iter().enumerate() {
            assert_eq!(r[0], i.to_string(), "{key}: field numbers must count 0, 1, 2, ...");
            names.push(r[1].clone());
        }
        assert!(documented.insert(key.clone(), names).is_none(), "{key} documented twice");
    }

    // Struct types.
    let mut actual: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut put = |k: &str, f: Vec<String>| {
        actual.insert(k.to_string(), f);
    };
    put("StreamPosition", fields(&pos()));
    put("Payload", fields(&payload()));
    put("ClientInfo", fields(&info()));
    put("Publication", fields(&publication()));
    put("ClientVersion", fields(&connect().client));
    put("SubscribeRequest", fields(&sub_req()));
    put("HistoryRequest", fields(&history_req()));
    put("Connect", fields(&connect()));
    put("AckItem", fields(&AckItem { channel: "c".into(), epoch: "e".into(), offset: 1 }));
    put("Subscribed", fields(&subscribed()));
    put("Connected", fields(&connected()));
    put("ErrorReply", fields(&error_reply()));

    // Variants whose body the variant table documents in place
    // ("struct Enum.variant"). A struct variant and a newtype variant around
    // a struct are the same bytes on both wires, so only the fields matter.
    let variants = variant_table(&doc);
    for (enum_name, samples) in all_enum_samples() {
        for s in samples {
            let body = &variants[&(enum_name.to_string(), s.name.clone())].1;
            if let Some(key) = body.strip_prefix("struct ") {
                assert_eq!(key, format!("{enum_name}.{}", s.name), "Body cell of {enum_name} {}", s.name);
                put(key, body_fields(&s.json));
            }
        }
    }
    assert_eq!(documented, actual, "field tables differ from the crate's field order");
}

// ---------------------------------------------------------------------------
// Constants

#[test]
fn constants_match() {
    let doc = doc();
    assert!(doc.contains(&format!("# Ferry wire protocol, version {PROTOCOL_VERSION}")));
    for sp in [SUBPROTOCOL_BINARY, SUBPROTOCOL_JSON] {
        assert!(doc.contains(&format!("| `{sp}`")), "subprotocol {sp} not in the table");
    }
    let limits = one_table(&doc, &["Limit", "Default"]);
    let row = |name: &str| {
        limits.iter().find(|r| r[0] == name).unwrap_or_else(|| panic!("limits table has no {name:?} row"))[1].clone()
    };
    let size = row("Max message size");
    assert!(size.starts_with(&codec::DEFAULT_MAX_MESSAGE_SIZE.to_string()), "max message size: {size}");
    assert_eq!(row("Frames per message"), codec::MAX_FRAMES_PER_MESSAGE.to_string());
}
