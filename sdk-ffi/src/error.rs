//! The one error type every foreign call can throw.

use ferry_client::{Error, PublishError};

/// Everything that can go wrong, in one flat enum: Kotlin sees
/// `FerryException.OutboxFull` etc., Swift `FerryError.outboxFull`, Python
/// `FerryError.OutboxFull`. Variants carry data where the app can act on it
/// (a server code, a size limit).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, uniffi::Error)]
pub enum FerryError {
    /// The outbox is at its message or byte bound: retry after some acks.
    #[error("outbox full")]
    OutboxFull,
    /// Not acknowledged within the message TTL (it may or may not be stored).
    #[error("expired before the server acknowledged it")]
    Expired,
    /// The payload is larger than the message size limit.
    #[error("payload of {size} bytes exceeds the limit of {limit}")]
    TooLarge {
        /// Payload size, bytes.
        size: u64,
        /// Limit, bytes.
        limit: u64,
    },
    /// Not connected now (QoS 0 publish, history, presence need a live link).
    #[error("not connected")]
    NotConnected,
    /// The connection dropped before the answer came (it may have been applied).
    #[error("connection lost before the answer")]
    ConnectionLost,
    /// The server refused the command (see PROTOCOL.md for codes).
    #[error("rejected by the server ({code}): {reason}")]
    Rejected {
        /// Error code.
        code: u16,
        /// The server's message.
        reason: String,
        /// Whether retrying later may succeed.
        temporary: bool,
    },
    /// The server closed the connection for good (e.g. an invalid token);
    /// the client does not reconnect.
    #[error("connection closed for good ({code}): {reason}")]
    Refused {
        /// Close code.
        code: u16,
        /// Reason.
        reason: String,
    },
    /// `connect` did not reach the server in time; the client keeps trying.
    #[error("not connected within {timeout_ms} ms (still trying)")]
    Timeout {
        /// The wait, milliseconds.
        timeout_ms: u64,
    },
    /// The client was shut down.
    #[error("client shut down")]
    Closed,
    /// Durable storage failed.
    #[error("storage: {reason}")]
    Storage {
        /// What failed.
        reason: String,
    },
    /// Bad configuration.
    #[error("configuration: {reason}")]
    Config {
        /// What is wrong.
        reason: String,
    },
    /// A token provider's failure (throw this from `fetch_token`).
    #[error("token provider: {reason}")]
    TokenProvider {
        /// Why no token.
        reason: String,
    },
    /// A bug or an unexpected foreign failure.
    #[error("internal: {reason}")]
    Internal {
        /// What happened.
        reason: String,
    },
}

impl From<Error> for FerryError {
    fn from(e: Error) -> Self {
        match e {
            Error::Publish(p) => p.into(),
            Error::Server { code, message, temporary } => FerryError::Rejected { code, reason: message, temporary },
            Error::NotConnected => FerryError::NotConnected,
            Error::ConnectionLost => FerryError::ConnectionLost,
            Error::Closed => FerryError::Closed,
            Error::Storage(reason) => FerryError::Storage { reason },
            Error::Config(reason) => FerryError::Config { reason },
            other => FerryError::Internal { reason: other.to_string() },
        }
    }
}

impl From<PublishError> for FerryError {
    fn from(e: PublishError) -> Self {
        match e {
            PublishError::OutboxFull => FerryError::OutboxFull,
            PublishError::Expired => FerryError::Expired,
            PublishError::TooLarge { size, limit } => FerryError::TooLarge { size: size as u64, limit: limit as u64 },
            PublishError::NotConnected => FerryError::NotConnected,
            PublishError::ConnectionLost => FerryError::ConnectionLost,
            PublishError::Closed => FerryError::Closed,
            PublishError::Rejected(r) => {
                FerryError::Rejected { code: r.code, reason: r.message, temporary: r.temporary }
            }
            other => FerryError::Internal { reason: other.to_string() },
        }
    }
}

// Required by UniFFI for foreign-trait methods returning this error: a
// foreign implementation that fails in an undeclared way (a Kotlin
// RuntimeException, a Python TypeError) arrives here.
impl From<uniffi::UnexpectedUniFFICallbackError> for FerryError {
    fn from(e: uniffi::UnexpectedUniFFICallbackError) -> Self {
        FerryError::Internal { reason: e.reason }
    }
}
