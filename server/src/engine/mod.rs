//! Storage and fan-out engines behind one seam (docs/CLUSTER.md section 2).
//!
//! Today the hub drives the embedded engine directly (`store::RedbStore`,
//! `presence::MemoryPresence`, the sequencer in `hub`). The Redis engine
//! ([`redis::RedisStreams`]) implements the same stream operations — append
//! with dedup and retention, range, header, cursors, release — for several
//! nodes sharing one Redis; the hub moves onto a common async interface
//! as the cluster issue proceeds.

pub mod cluster_link;
pub mod pubsub;
pub mod redis;
pub mod sentinel;
pub mod tls;

use ferry_core::frame::{ClientInfo, Qos};

/// One publish handed to an engine, already validated and inflated.
#[derive(Clone, Debug)]
pub struct PublishItem {
    /// Publisher-chosen unique id.
    pub message_id: String,
    /// First 16 bytes of the SHA-256 of `data` (see `hub::payload_digest`).
    pub digest: [u8; 16],
    /// Publisher leg QoS.
    pub qos: Qos,
    /// Verified publisher (none for the backend API).
    pub publisher: Option<ClientInfo>,
    /// Payload, uncompressed.
    pub data: Vec<u8>,
}

/// Retention of one channel's namespace.
#[derive(Clone, Copy, Debug)]
pub struct Retention {
    /// Publications kept.
    pub history_size: u64,
    /// Publications older than this are dropped, ms (0: no age limit).
    pub max_age_ms: u64,
}

impl Retention {
    /// A namespace's retention.
    pub fn of(ns: &crate::config::Namespace) -> Retention {
        Retention { history_size: ns.history_size as u64, max_age_ms: ns.history_ttl_secs.saturating_mul(1000) }
    }

    /// Publications with a time below this (ms) are past the age limit at
    /// `now_ms`; 0 when there is none.
    pub fn cutoff(&self, now_ms: u64) -> u64 {
        if self.max_age_ms == 0 {
            0
        } else {
            now_ms.saturating_sub(self.max_age_ms)
        }
    }
}

/// A channel's stream position as a node last saw it; lets the engine
/// notice a stream that lost its tail (docs/CLUSTER.md section 5).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Known {
    /// Epoch.
    pub epoch: String,
    /// Highest offset the node saw in it.
    pub top: u64,
}

/// Engine failures. Temporary by nature: the caller answers 115 and the
/// client retries.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// The engine (Redis) could not be reached or refused the command.
    #[error("engine unavailable: {0}")]
    Unavailable(String),
    /// A stored record does not decode.
    #[error("corrupt record: {0}")]
    Corrupt(String),
    /// The engine is set up in a way Ferry cannot run on safely (not
    /// temporary: the node refuses to start).
    #[error("{0}")]
    Config(String),
}

/// Hex of a digest (stored as text in Redis values).
pub fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}
