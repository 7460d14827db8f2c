//! Ferry's side of the wire, built on ferry-core's frames and codec: the
//! frames the generator sends, and a reader for what it receives.
//!
//! Design: publications arriving on the binary subprotocol are read by a
//! small zero-copy parser of the postcard layout (PROTOCOL.md 3.3) instead
//! of `codec::decode_server`, which allocates five strings and a buffer per
//! frame; at a million deliveries per second that allocation would make the
//! generator, not the server, the bottleneck. Every other frame, and every
//! JSON message, goes through ferry-core's codec. The tests check the fast
//! parser against ferry-core's encoder.

use ferry_core::codec::{self, read_varint, Encoding};
use ferry_core::frame::{
    AckItem, Bytes, ClientFrame, ClientVersion, Command, Connect, Payload, Push, Qos, ServerFrame, SubscribeRequest,
    PROTOCOL_VERSION,
};

/// One publication as the generator needs it.
#[derive(Debug, PartialEq, Eq)]
pub struct PubView<'a> {
    /// Stream offset (for QoS 1 acks).
    pub offset: u64,
    /// Payload bytes as sent by the publisher.
    pub data: &'a [u8],
}

/// What one server message held.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Inbound<'a> {
    /// Publications, in order.
    pub pubs: Vec<PubView<'a>>,
    /// Frames that were not publications, decoded by ferry-core (rare:
    /// replies, pings, disconnect notices).
    pub other: Vec<ServerFrame>,
}

/// A `connect` that restores `subs` (one round trip connects and subscribes).
pub fn connect(device: &str, subs: &[(&str, Qos)]) -> ClientFrame {
    ClientFrame::Request {
        id: 1,
        cmd: Command::Connect(Connect {
            version: PROTOCOL_VERSION,
            token: String::new(),
            device_id: device.to_string(),
            client: ClientVersion { name: "ferry-wsload".into(), version: env!("CARGO_PKG_VERSION").into() },
            subs: subs
                .iter()
                .map(|(c, q)| SubscribeRequest {
                    channel: (*c).to_string(),
                    qos: *q,
                    since: None,
                    token: String::new(),
                })
                .collect(),
            // Off: the payloads are 100 B, far below any threshold, and the
            // reader need not inflate.
            compression: false,
        }),
    }
}

/// A `publish` at `qos`.
pub fn publish(id: u32, channel: &str, message_id: String, qos: Qos, data: Vec<u8>) -> ClientFrame {
    ClientFrame::Request {
        id,
        cmd: Command::Publish {
            channel: channel.to_string(),
            message_id,
            qos,
            payload: Payload { z: false, data: Bytes(data) },
        },
    }
}

/// A cumulative ack of `channel` up to `offset`.
pub fn ack(channel: &str, epoch: &str, offset: u64) -> ClientFrame {
    ClientFrame::Ack(vec![AckItem { channel: channel.into(), epoch: epoch.into(), offset }])
}

/// `pong`.
pub fn pong() -> ClientFrame {
    ClientFrame::Pong
}

/// Append `frame` to a message being built (several frames per message,
/// PROTOCOL.md 2.2).
pub fn append(enc: Encoding, frame: &ClientFrame, out: &mut Vec<u8>) {
    codec::encode_into(enc, frame, out);
}

/// Read one server message.
pub fn read(enc: Encoding, msg: &[u8], limit: usize) -> Result<Inbound<'_>, String> {
    if enc == Encoding::Binary {
        if let Some(pubs) = fast_publications(msg) {
            return Ok(Inbound { pubs, other: Vec::new() });
        }
    }
    let other = codec::decode_server(enc, msg, limit).map_err(|e| format!("undecodable server message: {e}"))?;
    // Publications among these are read with `owned_publications`.
    Ok(Inbound { pubs: Vec::new(), other })
}

/// The (offset, payload) of the publications among decoded frames.
pub fn owned_publications(frames: &[ServerFrame]) -> impl Iterator<Item = PubView<'_>> {
    frames.iter().filter_map(|f| match f {
        ServerFrame::Push(Push::Publication(p)) => Some(PubView { offset: p.offset, data: &p.payload.data.0 }),
        _ => None,
    })
}

/// Every frame of a binary message, when all are uncompressed
/// publications; `None` sends the message to ferry-core's decoder.
pub fn fast_publications(msg: &[u8]) -> Option<Vec<PubView<'_>>> {
    let mut out = Vec::new();
    let mut rest = msg;
    while !rest.is_empty() {
        let (len, n) = read_varint(rest)?;
        let len = usize::try_from(len).ok()?;
        let body = rest.get(n..n.checked_add(len)?)?;
        out.push(publication(body)?);
        rest = &rest[n + len..];
    }
    (!out.is_empty()).then_some(out)
}

/// A cursor over one postcard body.
struct Cur<'a>(&'a [u8]);

impl<'a> Cur<'a> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }
    fn varint(&mut self) -> Option<u64> {
        let (v, n) = read_varint(self.0)?;
        self.0 = &self.0[n..];
        Some(v)
    }
    fn bytes(&mut self) -> Option<&'a [u8]> {
        let len = usize::try_from(self.varint()?).ok()?;
        let (b, rest) = (self.0.get(..len)?, &self.0[len..]);
        self.0 = rest;
        Some(b)
    }
}

/// `ServerFrame::Push(Push::Publication(..))` with `z = false`, field by
/// field in PROTOCOL.md 4.4 order.
fn publication(body: &[u8]) -> Option<PubView<'_>> {
    let mut c = Cur(body);
    // ServerFrame 1 = push, Push 0 = publication.
    if c.byte()? != 1 || c.byte()? != 0 {
        return None;
    }
    c.bytes()?; // channel
    c.bytes()?; // epoch
    let offset = c.varint()?;
    c.bytes()?; // message_id
    if c.byte()? > 2 {
        return None; // qos
    }
    match c.byte()? {
        // publisher: absent
        0 => {}
        // present: ClientInfo {client, user, info: bytes?}
        1 => {
            c.bytes()?;
            c.bytes()?;
            match c.byte()? {
                0 => {}
                1 => {
                    c.bytes()?;
                }
                _ => return None,
            }
        }
        _ => return None,
    }
    c.varint()?; // time_ms
    if c.byte()? != 0 {
        return None; // compressed: let the codec report it
    }
    let data = c.bytes()?;
    c.0.is_empty().then_some(PubView { offset, data })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_core::frame::{ClientInfo, Publication};

    fn publication_frame(offset: u64, data: &[u8], publisher: Option<ClientInfo>) -> ServerFrame {
        ServerFrame::Push(Push::Publication(Publication {
            channel: "bench:c7".into(),
            epoch: "k3x9".into(),
            offset,
            message_id: "r1-0-17".into(),
            qos: Qos::AtMostOnce,
            publisher,
            time_ms: 1_767_225_590_000,
            payload: Payload { z: false, data: Bytes(data.to_vec()) },
        }))
    }

    #[test]
    fn fast_parser_reads_what_ferry_core_encodes() {
        let info = ClientInfo { client: "c-1".into(), user: "u".into(), info: Some(Bytes(vec![1, 2, 3])) };
        let mut msg = Vec::new();
        codec::encode_into(Encoding::Binary, &publication_frame(42, b"hello", None), &mut msg);
        codec::encode_into(Encoding::Binary, &publication_frame(300, &[7u8; 100], Some(info)), &mut msg);
        let pubs = fast_publications(&msg).expect("two publications");
        assert_eq!(pubs, vec![PubView { offset: 42, data: b"hello" }, PubView { offset: 300, data: &[7u8; 100] }]);
    }

    #[test]
    fn other_frames_go_to_the_codec() {
        let mut msg = Vec::new();
        codec::encode_into(Encoding::Binary, &publication_frame(1, b"x", None), &mut msg);
        codec::encode_into(Encoding::Binary, &ServerFrame::Push(Push::Ping), &mut msg);
        assert_eq!(fast_publications(&msg), None);
        let inb = read(Encoding::Binary, &msg, 1 << 20).expect("decodes");
        assert_eq!(inb.other.len(), 2);
        assert_eq!(owned_publications(&inb.other).map(|p| p.offset).collect::<Vec<_>>(), vec![1]);
        // A truncated message is not mistaken for publications.
        let one = codec::encode(Encoding::Binary, &publication_frame(2, b"yz", None));
        assert_eq!(fast_publications(&one[..one.len() - 1]), None);
    }

    #[test]
    fn client_frames_round_trip_through_ferry_core() {
        for enc in [Encoding::Binary, Encoding::Json] {
            let frames = vec![
                connect("d1", &[("bench:c0", Qos::AtLeastOnce)]),
                publish(2, "bench:c0", "m".into(), Qos::AtLeastOnce, vec![0; 100]),
                ack("bench:c0", "e", 9),
                pong(),
            ];
            let mut msg = Vec::new();
            for f in &frames {
                append(enc, f, &mut msg);
            }
            let back = codec::decode_client(enc, &msg, 1 << 20).expect("decodes");
            assert_eq!(back, frames);
        }
    }
}
