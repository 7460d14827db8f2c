//! Durable client state: what must survive an app restart for QoS 1/2 to
//! hold (the outbox, stream positions, recently seen message ids, the
//! message id sequence).
//!
//! Hosts either save [`Snapshot`] whole (`ClientSession::snapshot`) or keep
//! one up to date by applying each [`Change`] the session emits as
//! `Event::Persist`; both give the same state.

use serde::{Deserialize, Serialize};

use super::outbox::{OutboxRecord, StoredAt};
use crate::frame::{Qos, StreamPosition};

/// Persisted subscription.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubRecord {
    /// Channel name.
    pub channel: String,
    /// QoS asked for.
    pub qos: Qos,
    /// Last surfaced position (recovery resumes after it).
    pub position: Option<StreamPosition>,
    /// Recently surfaced message ids, oldest first.
    pub seen: Vec<String>,
}

/// Everything a client must keep across restarts.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Random per-install part of message ids.
    pub nonce: u64,
    /// Next message sequence number.
    pub next_seq: u64,
    /// Outbox, oldest first.
    pub outbox: Vec<OutboxRecord>,
    /// Subscriptions.
    pub subs: Vec<SubRecord>,
    /// Bound on `seen` per subscription.
    pub seen_cap: usize,
}

/// One change to the durable state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Change {
    /// Identity of message ids (emitted once per new session).
    Ids {
        /// Nonce.
        nonce: u64,
        /// Next sequence number.
        next_seq: u64,
    },
    /// A new outbox entry; also advances `next_seq` past its sequence.
    OutboxAdd {
        /// The entry.
        record: OutboxRecord,
        /// Next sequence number after it.
        next_seq: u64,
    },
    /// A QoS 2 entry was stored and awaits release.
    OutboxStored {
        /// Message id.
        message_id: String,
        /// Where.
        stored: StoredAt,
    },
    /// An outbox entry is done (acknowledged, failed or expired).
    OutboxRemove {
        /// Message id.
        message_id: String,
    },
    /// A subscription was added (or its QoS changed).
    Subscribe {
        /// Channel name.
        channel: String,
        /// QoS.
        qos: Qos,
    },
    /// A subscription was removed.
    Unsubscribe {
        /// Channel name.
        channel: String,
    },
    /// The position of a subscription moved, possibly surfacing messages.
    Position {
        /// Channel name.
        channel: String,
        /// New position.
        position: StreamPosition,
        /// Message ids surfaced with this move, in order.
        surfaced: Vec<String>,
    },
}

impl Snapshot {
    /// Apply one change.
    pub fn apply(&mut self, change: &Change) {
        match change {
            Change::Ids { nonce, next_seq } => {
                self.nonce = *nonce;
                self.next_seq = *next_seq;
            }
            Change::OutboxAdd { record, next_seq } => {
                self.next_seq = self.next_seq.max(*next_seq);
                self.outbox.retain(|r| r.message_id != record.message_id);
                self.outbox.push(record.clone());
            }
            Change::OutboxStored { message_id, stored } => {
                if let Some(r) = self.outbox.iter_mut().find(|r| &r.message_id == message_id) {
                    r.stored = Some(stored.clone());
                }
            }
            Change::OutboxRemove { message_id } => self.outbox.retain(|r| &r.message_id != message_id),
            Change::Subscribe { channel, qos } => match self.subs.iter_mut().find(|s| &s.channel == channel) {
                Some(s) => s.qos = *qos,
                None => {
                    self.subs.push(SubRecord { channel: channel.clone(), qos: *qos, position: None, seen: Vec::new() })
                }
            },
            Change::Unsubscribe { channel } => self.subs.retain(|s| &s.channel != channel),
            Change::Position { channel, position, surfaced } => {
                if let Some(s) = self.subs.iter_mut().find(|s| &s.channel == channel) {
                    s.position = Some(position.clone());
                    for id in surfaced {
                        if !s.seen.contains(id) {
                            s.seen.push(id.clone());
                        }
                    }
                    let cap = self.seen_cap;
                    if s.seen.len() > cap {
                        let extra = s.seen.len() - cap;
                        s.seen.drain(..extra);
                    }
                }
            }
        }
    }
}
