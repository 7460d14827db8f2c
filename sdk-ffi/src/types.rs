//! Mirrors of ferry-client's types for the foreign languages.
//!
//! Design: the core types never derive UniFFI traits (ferry-core stays free
//! of FFI dependencies), so each exposed type has an `Ffi*` twin here with a
//! `From` impl. The `name` attribute drops the prefix in the bindings.

use ferry_client as fc;

/// Delivery guarantee of a publish or a subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
#[uniffi(name = "Qos")]
pub enum FfiQos {
    /// At most once: never resent, may be lost.
    AtMostOnce,
    /// At least once: resent until acknowledged, may repeat.
    AtLeastOnce,
    /// Exactly once: resent until acknowledged, deduplicated at both ends.
    ExactlyOnce,
}

impl From<FfiQos> for fc::Qos {
    fn from(q: FfiQos) -> Self {
        match q {
            FfiQos::AtMostOnce => fc::Qos::AtMostOnce,
            FfiQos::AtLeastOnce => fc::Qos::AtLeastOnce,
            FfiQos::ExactlyOnce => fc::Qos::ExactlyOnce,
        }
    }
}

impl From<fc::Qos> for FfiQos {
    fn from(q: fc::Qos) -> Self {
        match q {
            fc::Qos::AtMostOnce => FfiQos::AtMostOnce,
            fc::Qos::AtLeastOnce => FfiQos::AtLeastOnce,
            fc::Qos::ExactlyOnce => FfiQos::ExactlyOnce,
        }
    }
}

/// A position in a channel stream.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
#[uniffi(name = "StreamPosition")]
pub struct FfiStreamPosition {
    /// Stream generation.
    pub epoch: String,
    /// Offset of the last publication covered (0 = none).
    pub offset: u64,
}

impl From<fc::StreamPosition> for FfiStreamPosition {
    fn from(p: fc::StreamPosition) -> Self {
        FfiStreamPosition { epoch: p.epoch, offset: p.offset }
    }
}

/// An acknowledged publish.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
#[uniffi(name = "PublishAck")]
pub struct FfiPublishAck {
    /// Message id (idempotency key).
    pub message_id: String,
    /// Stream epoch.
    pub epoch: String,
    /// Stored offset.
    pub offset: u64,
    /// The server had stored it before (a resend).
    pub duplicate: bool,
}

impl From<fc::PublishAck> for FfiPublishAck {
    fn from(a: fc::PublishAck) -> Self {
        FfiPublishAck { message_id: a.message_id, epoch: a.epoch, offset: a.offset, duplicate: a.duplicate }
    }
}

/// A connection as others see it (publisher, presence, join/leave).
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
#[uniffi(name = "ClientInfo")]
pub struct FfiClientInfo {
    /// Server-assigned connection id.
    pub client: String,
    /// User id from the token (empty = anonymous or backend).
    pub user: String,
    /// Connection info from the token, opaque to Ferry.
    pub info: Option<Vec<u8>>,
}

impl From<fc::ClientInfo> for FfiClientInfo {
    fn from(c: fc::ClientInfo) -> Self {
        FfiClientInfo { client: c.client, user: c.user, info: c.info.map(|b| b.0) }
    }
}

/// A publication of a channel.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
#[uniffi(name = "Publication")]
pub struct FfiPublication {
    /// Channel.
    pub channel: String,
    /// Stream epoch.
    pub epoch: String,
    /// Offset within the epoch.
    pub offset: u64,
    /// Publisher-chosen unique message id.
    pub message_id: String,
    /// QoS the publisher asked for.
    pub qos: FfiQos,
    /// Publisher, when known.
    pub publisher: Option<FfiClientInfo>,
    /// Server time of the append, Unix milliseconds.
    pub time_ms: u64,
    /// The data (already inflated).
    pub data: Vec<u8>,
}

impl FfiPublication {
    /// Convert a publication whose payload is already inflated (the client
    /// inflates live ones).
    pub(crate) fn inflated(p: fc::Publication) -> Self {
        FfiPublication {
            channel: p.channel,
            epoch: p.epoch,
            offset: p.offset,
            message_id: p.message_id,
            qos: p.qos.into(),
            publisher: p.publisher.map(Into::into),
            time_ms: p.time_ms,
            data: p.payload.data.0,
        }
    }
}

/// Why a gap was reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
#[uniffi(name = "GapReason")]
pub enum FfiGapReason {
    /// The stream's epoch changed (history lost or reset).
    EpochChanged,
    /// The wanted publications are no longer retained.
    NotRetained,
}

impl From<fc::GapReason> for FfiGapReason {
    fn from(r: fc::GapReason) -> Self {
        match r {
            fc::GapReason::EpochChanged => FfiGapReason::EpochChanged,
            fc::GapReason::NotRetained => FfiGapReason::NotRetained,
        }
    }
}

/// Publications were missed and cannot be recovered.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
#[uniffi(name = "Gap")]
pub struct FfiGap {
    /// Last position seen before, if any.
    pub from: Option<FfiStreamPosition>,
    /// Position delivery resumes after.
    pub to: FfiStreamPosition,
    /// Why.
    pub reason: FfiGapReason,
}

/// Connection state.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Enum)]
#[uniffi(name = "ConnectionState")]
pub enum FfiConnectionState {
    /// Not started yet (`connect` not called).
    Idle,
    /// Waiting for the token provider.
    WaitingToken,
    /// Opening a connection and authenticating.
    Connecting,
    /// Live.
    Connected,
    /// Waiting before the next attempt.
    Backoff {
        /// Attempt number (0-based).
        attempt: u32,
        /// Delay, milliseconds.
        delay_ms: u64,
    },
    /// Offline (the app reported no network, or went to the background).
    Offline,
    /// Stopped for good; will not reconnect: after `close` (code 1000,
    /// reason "client closed"; the last state listeners get), or after a
    /// terminal close code from the server (3500-3999).
    Closed {
        /// Close code.
        code: u16,
        /// Reason.
        reason: String,
    },
}

impl From<fc::ConnectionState> for FfiConnectionState {
    fn from(s: fc::ConnectionState) -> Self {
        match s {
            fc::ConnectionState::Idle => FfiConnectionState::Idle,
            fc::ConnectionState::WaitingToken => FfiConnectionState::WaitingToken,
            fc::ConnectionState::Connecting => FfiConnectionState::Connecting,
            fc::ConnectionState::Connected => FfiConnectionState::Connected,
            fc::ConnectionState::Backoff { attempt, delay_ms } => FfiConnectionState::Backoff { attempt, delay_ms },
            fc::ConnectionState::Offline => FfiConnectionState::Offline,
            fc::ConnectionState::Closed { code, reason } => FfiConnectionState::Closed { code, reason },
        }
    }
}

/// One end of a history range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
#[uniffi(name = "HistoryBound")]
pub enum FfiHistoryBound {
    /// An offset in the current epoch (inclusive).
    Offset {
        /// The offset.
        offset: u64,
    },
    /// A server time, Unix milliseconds (inclusive).
    TimeMs {
        /// The time.
        time_ms: u64,
    },
}

impl From<FfiHistoryBound> for fc::HistoryBound {
    fn from(b: FfiHistoryBound) -> Self {
        match b {
            FfiHistoryBound::Offset { offset } => fc::HistoryBound::Offset(offset),
            FfiHistoryBound::TimeMs { time_ms } => fc::HistoryBound::TimeMs(time_ms),
        }
    }
}

/// A history query.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
#[uniffi(name = "HistoryRequest")]
pub struct FfiHistoryRequest {
    /// Channel.
    pub channel: String,
    /// Lower bound (inclusive); none = oldest retained.
    #[uniffi(default)]
    pub since: Option<FfiHistoryBound>,
    /// Upper bound (inclusive); none = newest.
    #[uniffi(default)]
    pub until: Option<FfiHistoryBound>,
    /// At most this many publications (the server caps it).
    #[uniffi(default = 100)]
    pub limit: u32,
    /// Newest first.
    #[uniffi(default = false)]
    pub reverse: bool,
}

impl From<FfiHistoryRequest> for fc::HistoryRequest {
    fn from(r: FfiHistoryRequest) -> Self {
        fc::HistoryRequest {
            channel: r.channel,
            since: r.since.map(Into::into),
            until: r.until.map(Into::into),
            limit: r.limit,
            reverse: r.reverse,
        }
    }
}

/// One page of history.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
#[uniffi(name = "HistoryPage")]
pub struct FfiHistoryPage {
    /// Publications, in the requested order.
    pub publications: Vec<FfiPublication>,
    /// The stream's newest position.
    pub top: FfiStreamPosition,
}

/// Counts of who is subscribed to a channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Record)]
#[uniffi(name = "PresenceStats")]
pub struct FfiPresenceStats {
    /// Connections.
    pub clients: u32,
    /// Distinct users.
    pub users: u32,
}

/// How to subscribe.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
#[uniffi(name = "SubscribeOptions")]
pub struct FfiSubscribeOptions {
    /// Delivery guarantee wanted (the namespace may grant less).
    pub qos: FfiQos,
    /// Subscription token from your backend, for private channels.
    #[uniffi(default)]
    pub token: Option<String>,
}

/// Client settings. `None` keeps ferry-client's default.
#[derive(Debug, Clone, Default, PartialEq, Eq, uniffi::Record)]
#[uniffi(name = "ClientConfig")]
pub struct FfiClientConfig {
    /// Stable id of this installation (required; offline delivery and
    /// durable state are per device id).
    pub device_id: String,
    /// Connection token; with a token provider it may stay `None` (the
    /// provider is then asked for the first one when the client is created).
    #[uniffi(default)]
    pub token: Option<String>,
    /// Directory for durable state (outbox, stream positions, dedup window),
    /// e.g. Android `filesDir`, iOS Application Support. `None` keeps state
    /// in memory only: it survives reconnects, not app restarts.
    #[uniffi(default)]
    pub storage_dir: Option<String>,
    /// Shortest reconnect delay, milliseconds.
    #[uniffi(default)]
    pub backoff_min_ms: Option<u64>,
    /// Longest reconnect delay, milliseconds.
    #[uniffi(default)]
    pub backoff_max_ms: Option<u64>,
    /// Outbox bound: messages.
    #[uniffi(default)]
    pub outbox_max_messages: Option<u32>,
    /// Outbox bound: bytes.
    #[uniffi(default)]
    pub outbox_max_bytes: Option<u64>,
    /// How long a publish may wait for its ack, milliseconds.
    #[uniffi(default)]
    pub message_ttl_ms: Option<u64>,
    /// Deadline for a reply, milliseconds; past it the link counts as dead.
    #[uniffi(default)]
    pub request_timeout_ms: Option<u64>,
    /// How long `connect` waits for the first connection, milliseconds
    /// (default 15000). The client keeps trying after that.
    #[uniffi(default)]
    pub connect_timeout_ms: Option<u64>,
    /// Extra root certificates (PEM) trusted for `wss://`, e.g. a private
    /// CA; the public roots bundled with the client are trusted anyway.
    #[uniffi(default)]
    pub tls_root_certificates_pem: Option<String>,
    /// Seed for backoff jitter, message-id nonces and the choice of the
    /// first server URL; `None` (default) draws one at random. For
    /// reproducible tests.
    #[uniffi(default)]
    pub seed: Option<u64>,
}

/// Why the last connection ended.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
#[uniffi(name = "Disconnect")]
pub struct FfiDisconnect {
    /// Close code (see PROTOCOL.md).
    pub code: u16,
    /// Reason.
    pub reason: String,
    /// Whether the client reconnects by itself.
    pub reconnect: bool,
}

impl From<fc::Disconnect> for FfiDisconnect {
    fn from(d: fc::Disconnect) -> Self {
        FfiDisconnect { code: d.code, reason: d.reason, reconnect: d.reconnect }
    }
}
