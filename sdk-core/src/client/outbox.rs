//! The outbox: publishes waiting for the server's acknowledgement.
//!
//! Every QoS 1/2 publish gets its message id at creation and keeps it across
//! every resend, so the server can deduplicate. Entries leave only when the
//! server confirmed them (QoS 2: after `released`), failed for good, or
//! expired. Bounded by count, bytes and per-entry TTL.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::frame::Qos;
use crate::Instant;

/// A persisted outbox entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxRecord {
    /// Message id (idempotency key).
    pub message_id: String,
    /// Channel name.
    pub channel: String,
    /// Publish QoS.
    pub qos: Qos,
    /// Uncompressed payload.
    pub data: Vec<u8>,
    /// When the entry expires, in the host's clock.
    pub expires_at: Instant,
    /// QoS 2: stored by the server, awaiting `released`.
    pub stored: Option<StoredAt>,
}

/// Where the server stored a message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredAt {
    /// Stream epoch.
    pub epoch: String,
    /// Offset.
    pub offset: u64,
    /// The server had stored it before.
    pub duplicate: bool,
}

/// Where an entry stands on the current connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Wire {
    /// Not sent on this connection.
    Idle,
    /// Sent with this request id (publish or release).
    Sent(u32),
}

#[derive(Clone, Debug)]
pub(crate) struct Entry {
    pub rec: OutboxRecord,
    pub wire: Wire,
    /// Not before this instant (retry after a temporary error).
    pub not_before: Instant,
}

/// The bounded outbox.
#[derive(Debug, Default)]
pub(crate) struct Outbox {
    pub entries: VecDeque<Entry>,
    bytes: usize,
}

/// Size an entry counts for in the byte bound.
fn cost(r: &OutboxRecord) -> usize {
    r.data.len() + r.channel.len() + r.message_id.len()
}

impl Outbox {
    pub fn len(&self) -> usize {
        self.entries.len()
    }
    pub fn bytes(&self) -> usize {
        self.bytes
    }
    pub fn fits(&self, rec: &OutboxRecord, max_count: usize, max_bytes: usize) -> bool {
        self.entries.len() < max_count && self.bytes + cost(rec) <= max_bytes
    }
    pub fn push(&mut self, rec: OutboxRecord) {
        self.bytes += cost(&rec);
        self.entries.push_back(Entry { rec, wire: Wire::Idle, not_before: Instant(0) });
    }
    pub fn position(&self, message_id: &str) -> Option<usize> {
        self.entries.iter().position(|e| e.rec.message_id == message_id)
    }
    pub fn remove(&mut self, i: usize) -> Option<Entry> {
        let e = self.entries.remove(i)?;
        self.bytes -= cost(&e.rec);
        Some(e)
    }
    /// Number of entries on the wire.
    pub fn in_flight(&self) -> usize {
        self.entries.iter().filter(|e| e.wire != Wire::Idle).count()
    }
    /// The connection ended: nothing is on the wire any more.
    pub fn reset_wire(&mut self) {
        for e in &mut self.entries {
            e.wire = Wire::Idle;
        }
    }
    /// Earliest expiry among entries not yet known stored.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.entries.iter().filter(|e| e.rec.stored.is_none()).map(|e| e.rec.expires_at).min()
    }
    /// Earliest retry instant among idle entries held back.
    pub fn next_retry(&self, now: Instant) -> Option<Instant> {
        self.entries.iter().filter(|e| e.wire == Wire::Idle && e.not_before > now).map(|e| e.not_before).min()
    }
}
