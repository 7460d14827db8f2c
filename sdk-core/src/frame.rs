//! Wire frames of protocol v1: the serde types both encodings share.
//!
//! Design: enums are externally tagged (serde's default) because postcard
//! cannot decode internally tagged enums; in JSON a variant reads
//! `{"subscribe": {...}}`, which any language can dispatch on. No field is
//! ever skipped when serialising (postcard is not self-describing, so a
//! skipped field would shift every later one); in JSON, absent optional
//! fields decode as their default (`null`, `false`, `[]`).

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::ErrorCode;

/// Protocol version spoken by this crate.
pub const PROTOCOL_VERSION: u32 = 1;
/// WebSocket subprotocol for the binary (postcard) encoding.
pub const SUBPROTOCOL_BINARY: &str = "ferry.v1";
/// WebSocket subprotocol for the JSON encoding.
pub const SUBPROTOCOL_JSON: &str = "ferry.v1.json";

/// Raw bytes: a byte string in postcard, standard base64 (with padding) in JSON.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct Bytes(pub Vec<u8>);

impl std::fmt::Debug for Bytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Bytes({} B)", self.0.len())
    }
}

impl From<Vec<u8>> for Bytes {
    fn from(v: Vec<u8>) -> Self {
        Bytes(v)
    }
}

impl From<&[u8]> for Bytes {
    fn from(v: &[u8]) -> Self {
        Bytes(v.to_vec())
    }
}

impl Serialize for Bytes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.serialize_str(&crate::base64::encode(&self.0))
        } else {
            s.serialize_bytes(&self.0)
        }
    }
}

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
            crate::base64::decode(&s).map(Bytes).map_err(|_| serde::de::Error::custom("invalid base64"))
        } else {
            struct V;
            impl<'de> serde::de::Visitor<'de> for V {
                type Value = Bytes;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("a byte string")
                }
                fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Bytes, E> {
                    Ok(Bytes(v.to_vec()))
                }
                fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Bytes, E> {
                    Ok(Bytes(v))
                }
            }
            d.deserialize_byte_buf(V)
        }
    }
}

/// Quality of service: a number 0, 1 or 2 on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum Qos {
    /// At most once: never resent, may be lost.
    #[default]
    AtMostOnce,
    /// At least once: resent until acknowledged, may repeat.
    AtLeastOnce,
    /// Exactly once: resent until acknowledged, deduplicated at both ends.
    ExactlyOnce,
}

impl Qos {
    /// The wire number.
    pub fn as_u8(self) -> u8 {
        match self {
            Qos::AtMostOnce => 0,
            Qos::AtLeastOnce => 1,
            Qos::ExactlyOnce => 2,
        }
    }
    /// From the wire number.
    pub fn from_u8(v: u8) -> Option<Qos> {
        match v {
            0 => Some(Qos::AtMostOnce),
            1 => Some(Qos::AtLeastOnce),
            2 => Some(Qos::ExactlyOnce),
            _ => None,
        }
    }
}

impl Serialize for Qos {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u8(self.as_u8())
    }
}

impl<'de> Deserialize<'de> for Qos {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = u8::deserialize(d)?;
        Qos::from_u8(v).ok_or_else(|| serde::de::Error::custom("qos must be 0, 1 or 2"))
    }
}

/// A position in a channel stream.
///
/// `epoch` changes whenever the stream's stored history is lost or reset;
/// within one epoch offsets start at 1 and grow by exactly 1 per publication.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Default)]
pub struct StreamPosition {
    /// Stream generation.
    pub epoch: String,
    /// Offset of the last publication covered by this position (0 = none).
    pub offset: u64,
}

/// A payload, possibly deflate-compressed (raw deflate, RFC 1951).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Payload {
    /// True when `data` is deflate-compressed.
    #[serde(default)]
    pub z: bool,
    /// The bytes.
    pub data: Bytes,
}

/// Who published, as shown to subscribers and in presence.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ClientInfo {
    /// Server-assigned connection id.
    pub client: String,
    /// User id from the token (empty = anonymous or backend).
    pub user: String,
    /// Connection info from the token, opaque to Ferry.
    #[serde(default)]
    pub info: Option<Bytes>,
}

/// A publication in a channel stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Publication {
    /// Channel name.
    pub channel: String,
    /// Stream epoch.
    pub epoch: String,
    /// Offset within the epoch.
    pub offset: u64,
    /// Publisher-chosen unique message id (idempotency key).
    pub message_id: String,
    /// QoS the publisher asked for.
    pub qos: Qos,
    /// Publisher, when known.
    #[serde(default)]
    pub publisher: Option<ClientInfo>,
    /// Server wall time of the append, Unix milliseconds.
    pub time_ms: u64,
    /// The data.
    pub payload: Payload,
}

impl Publication {
    /// This publication's position.
    pub fn position(&self) -> StreamPosition {
        StreamPosition { epoch: self.epoch.clone(), offset: self.offset }
    }
}

/// Client name and version, for logs and metrics.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ClientVersion {
    /// SDK or app name.
    pub name: String,
    /// Its version.
    pub version: String,
}

/// A subscription request, in `connect` (restore) or `subscribe`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubscribeRequest {
    /// Channel name.
    pub channel: String,
    /// Delivery QoS wanted.
    pub qos: Qos,
    /// Recover from this position: deliver what came after it.
    #[serde(default)]
    pub since: Option<StreamPosition>,
    /// Subscription token for private channels (a JWT naming the user and
    /// the channel); empty otherwise.
    #[serde(default)]
    pub token: String,
}

/// One end of a history range.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HistoryBound {
    /// An offset in the current epoch (inclusive).
    Offset(u64),
    /// A server time, Unix milliseconds (inclusive).
    TimeMs(u64),
}

/// A history query.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryRequest {
    /// Channel name.
    pub channel: String,
    /// Lower bound (inclusive); none = oldest retained.
    #[serde(default)]
    pub since: Option<HistoryBound>,
    /// Upper bound (inclusive); none = newest.
    #[serde(default)]
    pub until: Option<HistoryBound>,
    /// At most this many publications (the server caps it).
    pub limit: u32,
    /// Newest first.
    #[serde(default)]
    pub reverse: bool,
}

/// `connect`: the first command of every connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Connect {
    /// Protocol version the client speaks.
    pub version: u32,
    /// Connection token (JWT), empty for anonymous access.
    pub token: String,
    /// Stable id of this device/installation.
    pub device_id: String,
    /// Client name and version.
    pub client: ClientVersion,
    /// Subscriptions to restore, with recovery positions.
    #[serde(default)]
    pub subs: Vec<SubscribeRequest>,
    /// The client can inflate and deflate payloads.
    #[serde(default)]
    pub compression: bool,
}

/// A client command; each is answered by exactly one [`Reply`] with its id.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Command {
    /// Authenticate and restore subscriptions.
    Connect(Connect),
    /// Subscribe to a channel.
    Subscribe(SubscribeRequest),
    /// Unsubscribe from a channel.
    Unsubscribe {
        /// Channel name.
        channel: String,
    },
    /// Publish into a channel.
    Publish {
        /// Channel name.
        channel: String,
        /// Unique id chosen by the publisher; retries reuse it.
        message_id: String,
        /// QoS of the publisher-to-server leg.
        qos: Qos,
        /// The data.
        payload: Payload,
    },
    /// QoS 2 second step: the publisher has the stored result and will
    /// never send `message_id` again, so the server may forget it.
    Release {
        /// The released message id.
        message_id: String,
    },
    /// Who is subscribed to a channel.
    Presence {
        /// Channel name.
        channel: String,
    },
    /// Counts of clients and users subscribed to a channel.
    PresenceStats {
        /// Channel name.
        channel: String,
    },
    /// Stored publications of a channel.
    History(HistoryRequest),
    /// Replace the connection token without reconnecting.
    Refresh {
        /// The new token.
        token: String,
    },
}

/// A frame from client to server.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientFrame {
    /// A command with its request id (non-zero, unique per connection).
    Request {
        /// Request id echoed by the reply.
        id: u32,
        /// The command.
        cmd: Command,
    },
    /// Cumulative acknowledgements of QoS 1/2 deliveries.
    Ack(Vec<AckItem>),
    /// Answer to a ping.
    Pong,
}

/// "Everything in `channel` up to `offset` of `epoch` has been received."
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AckItem {
    /// Channel name.
    pub channel: String,
    /// Stream epoch.
    pub epoch: String,
    /// Highest contiguous offset received.
    pub offset: u64,
}

/// Result of a subscription: where delivery starts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subscribed {
    /// Channel name.
    pub channel: String,
    /// Delivery QoS granted (may be below the one asked for).
    pub qos: Qos,
    /// Current stream epoch.
    pub epoch: String,
    /// Offset of the newest publication at subscribe time (0 = empty).
    pub top: u64,
    /// First offset the server will push; `top + 1` when nothing is replayed.
    pub from: u64,
    /// True when everything after the requested `since` will be delivered.
    pub recovered: bool,
}

/// A presence entry.
pub type PresenceEntry = ClientInfo;

/// Successful reply bodies.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplyBody {
    /// Answer to `connect`.
    Connected(Connected),
    /// Answer to `subscribe`.
    Subscribed(Subscribed),
    /// Answer to `unsubscribe`.
    Unsubscribed,
    /// Answer to `publish`: the stored position (QoS 1/2: after a durable write).
    Published {
        /// Stream epoch.
        epoch: String,
        /// Stored offset.
        offset: u64,
        /// True when this message id had been stored before.
        duplicate: bool,
    },
    /// Answer to `release`.
    Released,
    /// Answer to `presence`.
    Presence {
        /// Subscribed connections.
        clients: Vec<PresenceEntry>,
    },
    /// Answer to `presence_stats`.
    PresenceStats {
        /// Number of subscribed connections.
        clients: u32,
        /// Number of distinct users among them.
        users: u32,
    },
    /// Answer to `history`.
    History {
        /// Publications in the requested order.
        publications: Vec<Publication>,
        /// Current stream position.
        top: StreamPosition,
    },
    /// Answer to `refresh`.
    Refreshed {
        /// Milliseconds until the new token expires; none = never.
        #[serde(default)]
        expires_in_ms: Option<u64>,
    },
}

/// Answer to `connect`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Connected {
    /// Server-assigned connection id.
    pub client: String,
    /// The server pings every this many milliseconds.
    pub ping_interval_ms: u64,
    /// Pong (and ping) grace, milliseconds.
    pub pong_timeout_ms: u64,
    /// Payloads at least this large are compressed; none = compression off.
    #[serde(default)]
    pub compress_min: Option<u32>,
    /// Largest WebSocket message the server accepts, bytes.
    pub max_message_size: u32,
    /// Milliseconds until the token expires; none = never.
    #[serde(default)]
    pub expires_in_ms: Option<u64>,
    /// Results for the restored subscriptions, in request order.
    pub subs: Vec<SubscribeResult>,
    /// Server wall time, Unix milliseconds.
    pub time_ms: u64,
    /// Channels the connection token asks this client to subscribe to;
    /// the client subscribes to those it has no subscription for yet.
    #[serde(default)]
    pub subscribe: Vec<String>,
}

/// Result of one restored subscription in `connect`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SubscribeResult {
    /// Subscribed.
    Ok(Subscribed),
    /// Refused.
    Error {
        /// Channel name.
        channel: String,
        /// Why.
        error: ErrorReply,
    },
}

/// An error reply.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    /// Numeric code, see [`ErrorCode`].
    pub code: u16,
    /// Human-readable message.
    pub message: String,
    /// True when retrying the same command later may succeed.
    pub temporary: bool,
}

impl ErrorReply {
    /// An error with the code's default message and temporary flag.
    pub fn new(code: ErrorCode) -> Self {
        ErrorReply { code: code as u16, message: code.message().into(), temporary: code.temporary() }
    }
    /// An error with a custom message.
    pub fn with_message(code: ErrorCode, message: impl Into<String>) -> Self {
        ErrorReply { code: code as u16, message: message.into(), temporary: code.temporary() }
    }
}

/// Outcome of a command.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Success.
    Ok(ReplyBody),
    /// Failure.
    Error(ErrorReply),
}

/// A server push (no request id).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Push {
    /// A publication in a subscribed channel.
    Publication(Publication),
    /// A client joined a channel.
    Join {
        /// Channel name.
        channel: String,
        /// Who.
        info: ClientInfo,
    },
    /// A client left a channel.
    Leave {
        /// Channel name.
        channel: String,
        /// Who.
        info: ClientInfo,
    },
    /// The server ended a subscription (e.g. permission revoked).
    Unsubscribed {
        /// Channel name.
        channel: String,
        /// Close-code-like reason code, see [`crate::CloseCode`].
        code: u16,
        /// Why.
        reason: String,
    },
    /// Heartbeat; answer with `pong`.
    Ping,
    /// The server is closing the connection.
    Disconnect {
        /// Close code, see [`crate::CloseCode`].
        code: u16,
        /// Why.
        reason: String,
        /// Whether the client should reconnect.
        reconnect: bool,
    },
}

/// A frame from server to client.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServerFrame {
    /// The answer to a client's request.
    Reply {
        /// The request id.
        id: u32,
        /// Result.
        outcome: Outcome,
    },
    /// A push.
    Push(Push),
}
