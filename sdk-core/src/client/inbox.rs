//! The inbox of one subscription: ordering, deduplication and the position
//! that acks and recovery report.

use std::collections::{BTreeMap, HashSet, VecDeque};

use crate::frame::{Publication, Qos};

/// What to do with an arriving publication.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Arrival {
    /// Surface these, in order.
    Deliver(Vec<Publication>),
    /// Already seen (by offset or message id); nothing to surface.
    Duplicate,
    /// Held back until the gap before it fills.
    Buffered,
    /// Dropped: the reorder buffer is full (it will be redelivered).
    Dropped,
    /// From another epoch than the subscription's: ignored.
    WrongEpoch,
}

/// Bounded window of recently delivered message ids.
#[derive(Debug, Default, Clone)]
pub(crate) struct SeenIds {
    order: VecDeque<String>,
    set: HashSet<String>,
}

impl SeenIds {
    pub fn contains(&self, id: &str) -> bool {
        self.set.contains(id)
    }
    pub fn insert(&mut self, id: String, cap: usize) {
        if cap == 0 || self.set.contains(&id) {
            return;
        }
        if self.order.len() >= cap {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        self.set.insert(id.clone());
        self.order.push_back(id);
    }
    pub fn iter(&self) -> impl Iterator<Item = &String> {
        self.order.iter()
    }
    pub fn len(&self) -> usize {
        self.order.len()
    }
}

/// Ordering and dedup state for one subscribed channel.
#[derive(Debug, Default, Clone)]
pub(crate) struct Inbox {
    /// Epoch of the stream being delivered.
    pub epoch: String,
    /// Next offset to surface.
    pub next: u64,
    /// Out-of-order arrivals (QoS 1/2 only).
    buffer: BTreeMap<u64, Publication>,
    /// Recently surfaced message ids.
    pub seen: SeenIds,
}

impl Inbox {
    /// Start (or restart) delivery at `from` in `epoch`; keeps the seen ids,
    /// which guard against replays across an epoch change.
    pub fn start(&mut self, epoch: String, from: u64) {
        if self.epoch != epoch {
            self.buffer.clear();
        } else {
            self.buffer.retain(|&o, _| o >= from);
        }
        self.epoch = epoch;
        self.next = from;
    }

    /// Offset of the last surfaced publication (what a cumulative ack covers).
    pub fn delivered(&self) -> u64 {
        self.next.saturating_sub(1)
    }

    pub fn buffered(&self) -> usize {
        self.buffer.len()
    }

    /// Take one arriving publication.
    pub fn arrive(&mut self, p: Publication, qos: Qos, buffer_cap: usize, seen_cap: usize) -> Arrival {
        if p.epoch != self.epoch {
            return Arrival::WrongEpoch;
        }
        if p.offset < self.next {
            return Arrival::Duplicate;
        }
        if qos == Qos::AtMostOnce {
            // Live-only delivery: gaps are accepted, order still holds.
            self.next = p.offset.saturating_add(1);
            return self.surface(vec![p], seen_cap);
        }
        if p.offset > self.next {
            if self.buffer.contains_key(&p.offset) {
                return Arrival::Duplicate;
            }
            if self.buffer.len() >= buffer_cap {
                return Arrival::Dropped;
            }
            self.buffer.insert(p.offset, p);
            return Arrival::Buffered;
        }
        let mut run = vec![p];
        self.next = self.next.saturating_add(1);
        while let Some(q) = self.buffer.remove(&self.next) {
            run.push(q);
            self.next = self.next.saturating_add(1);
        }
        self.surface(run, seen_cap)
    }

    fn surface(&mut self, run: Vec<Publication>, seen_cap: usize) -> Arrival {
        let mut out = Vec::with_capacity(run.len());
        for p in run {
            // An id already surfaced (a replay after an epoch change, or a
            // publish the server stored twice) still advances the offset but
            // is not shown again.
            if self.seen.contains(&p.message_id) {
                continue;
            }
            self.seen.insert(p.message_id.clone(), seen_cap);
            out.push(p);
        }
        if out.is_empty() {
            Arrival::Duplicate
        } else {
            Arrival::Deliver(out)
        }
    }
}
