//! Error codes (in replies) and close codes (in `disconnect` pushes and
//! WebSocket close frames), with the retry rule for each.

/// Start of the message of error 107 when a message id is reused by a
/// publish that is not a retry of the first (another channel or other
/// data). Message ids are unique per server, not per channel.
pub const MESSAGE_ID_REUSED: &str = "message id already used by another publish";

/// Error codes carried by [`crate::frame::ErrorReply`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
#[repr(u16)]
pub enum ErrorCode {
    /// Unexpected server failure.
    Internal = 100,
    /// The token is missing, malformed, badly signed or not accepted.
    Unauthorized = 101,
    /// The channel name is invalid or its namespace does not exist.
    UnknownChannel = 102,
    /// The client may not do this on this channel.
    PermissionDenied = 103,
    /// The command is not known to this server.
    MethodNotFound = 104,
    /// Already subscribed to this channel on this connection.
    AlreadySubscribed = 105,
    /// A configured limit (subscriptions, channels, ...) is reached.
    LimitExceeded = 106,
    /// The command is malformed or makes no sense in this state.
    BadRequest = 107,
    /// The feature is off for this namespace (history, presence, ...).
    NotAvailable = 108,
    /// The token has expired.
    TokenExpired = 109,
    /// The server is overloaded or rate-limiting this client.
    TooManyRequests = 111,
    /// The message exceeds the size limit.
    MessageTooLarge = 112,
    /// The requested QoS exceeds the namespace's maximum.
    QosNotAllowed = 113,
    /// Not subscribed to this channel.
    NotSubscribed = 114,
    /// The store could not commit in time; the command had no effect or
    /// its effect will be reported on retry.
    Unavailable = 115,
}

impl ErrorCode {
    /// All codes, for documentation tables and tests.
    pub const ALL: &'static [ErrorCode] = &[
        ErrorCode::Internal,
        ErrorCode::Unauthorized,
        ErrorCode::UnknownChannel,
        ErrorCode::PermissionDenied,
        ErrorCode::MethodNotFound,
        ErrorCode::AlreadySubscribed,
        ErrorCode::LimitExceeded,
        ErrorCode::BadRequest,
        ErrorCode::NotAvailable,
        ErrorCode::TokenExpired,
        ErrorCode::TooManyRequests,
        ErrorCode::MessageTooLarge,
        ErrorCode::QosNotAllowed,
        ErrorCode::NotSubscribed,
        ErrorCode::Unavailable,
    ];

    /// From the wire number.
    pub fn from_u16(code: u16) -> Option<ErrorCode> {
        Self::ALL.iter().copied().find(|c| *c as u16 == code)
    }

    /// Whether retrying the same command later may succeed.
    pub fn temporary(self) -> bool {
        matches!(self, ErrorCode::Internal | ErrorCode::TooManyRequests | ErrorCode::Unavailable)
    }

    /// Default message.
    pub fn message(self) -> &'static str {
        match self {
            ErrorCode::Internal => "internal server error",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::UnknownChannel => "unknown channel",
            ErrorCode::PermissionDenied => "permission denied",
            ErrorCode::MethodNotFound => "method not found",
            ErrorCode::AlreadySubscribed => "already subscribed",
            ErrorCode::LimitExceeded => "limit exceeded",
            ErrorCode::BadRequest => "bad request",
            ErrorCode::NotAvailable => "not available",
            ErrorCode::TokenExpired => "token expired",
            ErrorCode::TooManyRequests => "too many requests",
            ErrorCode::MessageTooLarge => "message too large",
            ErrorCode::QosNotAllowed => "qos not allowed",
            ErrorCode::NotSubscribed => "not subscribed",
            ErrorCode::Unavailable => "temporarily unavailable",
        }
    }
}

/// Close codes: 3000-3499 ask the client to reconnect (with backoff),
/// 3500-3999 are terminal. 1000 is a normal close by either side.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
#[repr(u16)]
pub enum CloseCode {
    /// Normal close, initiated by the client or at the client's request.
    Normal = 1000,
    /// The server is shutting down or restarting.
    Shutdown = 3000,
    /// Internal server error.
    ServerError = 3001,
    /// No ping (client side) or pong (server side) within the deadline.
    HeartbeatTimeout = 3002,
    /// The client could not keep up with its deliveries.
    SlowConsumer = 3003,
    /// The server cannot continue a stream from where the client is; reconnect
    /// and recover (a gap will be reported).
    InsufficientState = 3004,
    /// The token expired and was not refreshed in time; reconnect with a new token.
    TokenExpired = 3005,
    /// No `connect` command within the handshake deadline, or a reply never came.
    HandshakeTimeout = 3006,
    /// The server asks this client to reconnect (e.g. rebalancing).
    ForceReconnect = 3007,
    /// The client received no reply to a command in time (client side).
    RequestTimeout = 3008,
    /// The token is invalid: do not reconnect with it.
    Unauthorized = 3500,
    /// The client broke the protocol (malformed or unexpected frames).
    ProtocolViolation = 3501,
    /// A message exceeded the size limit.
    MessageTooLarge = 3502,
    /// The client was disconnected by the backend and must not come back.
    ForceDisconnect = 3503,
    /// The protocol version is not supported.
    UnsupportedVersion = 3504,
    /// Too many connections or floods: do not reconnect automatically.
    Banned = 3505,
    /// Client side, never on the wire: the host cannot open a transport at
    /// all (no WebSocket implementation in this runtime). A setup error, so
    /// retrying cannot help.
    TransportUnavailable = 3506,
}

impl CloseCode {
    /// All codes, for documentation tables and tests.
    pub const ALL: &'static [CloseCode] = &[
        CloseCode::Normal,
        CloseCode::Shutdown,
        CloseCode::ServerError,
        CloseCode::HeartbeatTimeout,
        CloseCode::SlowConsumer,
        CloseCode::InsufficientState,
        CloseCode::TokenExpired,
        CloseCode::HandshakeTimeout,
        CloseCode::ForceReconnect,
        CloseCode::RequestTimeout,
        CloseCode::Unauthorized,
        CloseCode::ProtocolViolation,
        CloseCode::MessageTooLarge,
        CloseCode::ForceDisconnect,
        CloseCode::UnsupportedVersion,
        CloseCode::Banned,
        CloseCode::TransportUnavailable,
    ];

    /// From the wire number.
    pub fn from_u16(code: u16) -> Option<CloseCode> {
        Self::ALL.iter().copied().find(|c| *c as u16 == code)
    }

    /// Whether a client should reconnect after a close with `code`.
    ///
    /// Unknown codes follow the ranges: below 3500 (and any code outside
    /// 3000-4999, such as an abnormal 1006) reconnect; 3500-3999 do not.
    pub fn reconnects(code: u16) -> bool {
        !matches!(code, 1000 | 3500..=3999)
    }

    /// Default reason text.
    pub fn reason(self) -> &'static str {
        match self {
            CloseCode::Normal => "normal close",
            CloseCode::Shutdown => "server shutting down",
            CloseCode::ServerError => "server error",
            CloseCode::HeartbeatTimeout => "heartbeat timeout",
            CloseCode::SlowConsumer => "slow consumer",
            CloseCode::InsufficientState => "insufficient state",
            CloseCode::TokenExpired => "token expired",
            CloseCode::HandshakeTimeout => "handshake timeout",
            CloseCode::ForceReconnect => "reconnect requested",
            CloseCode::RequestTimeout => "request timeout",
            CloseCode::Unauthorized => "unauthorized",
            CloseCode::ProtocolViolation => "protocol violation",
            CloseCode::MessageTooLarge => "message too large",
            CloseCode::ForceDisconnect => "disconnected",
            CloseCode::UnsupportedVersion => "unsupported protocol version",
            CloseCode::Banned => "banned",
            CloseCode::TransportUnavailable => "no transport available",
        }
    }
}
