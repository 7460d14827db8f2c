//! What subscribers record while a step runs: latency (HdrHistogram, µs),
//! unique deliveries, duplicates and order violations per subscriber, and
//! disconnects. One `Stats` is shared by every task of the single-threaded
//! generator (`Rc<RefCell<_>>`, no locks).

use std::collections::BTreeMap;
use std::time::Instant;

use hdrhistogram::Histogram;

/// Bytes every payload starts with: step (u32), channel (u32), sequence
/// number in that channel and step (u64), publish instant in ns since the
/// generator's epoch (u64). The rest is filler up to the payload size.
pub const HEADER: usize = 24;

/// Write a payload of `len` bytes (at least [`HEADER`]).
pub fn make_payload(step: u32, channel: u32, seq: u64, sent_ns: u64, len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(len.max(HEADER));
    v.extend_from_slice(&step.to_le_bytes());
    v.extend_from_slice(&channel.to_le_bytes());
    v.extend_from_slice(&seq.to_le_bytes());
    v.extend_from_slice(&sent_ns.to_le_bytes());
    v.resize(len.max(HEADER), b'.');
    v
}

/// The header fields of a payload.
pub fn parse_payload(d: &[u8]) -> Option<(u32, u32, u64, u64)> {
    let h = d.get(..HEADER)?;
    let u32_at = |i: usize| u32::from_le_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
    let u64_at = |i: usize| u64::from_le_bytes(h[i..i + 8].try_into().unwrap_or([0; 8]));
    Some((u32_at(0), u32_at(4), u64_at(8), u64_at(16)))
}

/// A histogram of microseconds, 1 µs to 10 min, 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).unwrap_or_else(|_| Histogram::new(3).expect("histogram"))
}

/// Per subscriber: which sequence numbers of this step have arrived.
#[derive(Default)]
struct Track {
    step: u32,
    max: Option<u64>,
    seen: Vec<u64>,
}

/// Shared counters of the current step.
pub struct Stats {
    /// The generator's time origin; payloads carry ns since it.
    pub epoch: Instant,
    /// Step whose payloads count; others are late arrivals and ignored.
    pub step: u32,
    /// Publish → arrival latency of this step, µs.
    pub latency: Histogram<u64>,
    /// Unique deliveries this step.
    pub received: u64,
    /// Deliveries of a sequence number the subscriber already had.
    pub duplicates: u64,
    /// Deliveries of a sequence number below one already seen.
    pub out_of_order: u64,
    /// Payloads of another channel or malformed.
    pub corrupt: u64,
    /// Payloads of an earlier step arriving late.
    pub stale: u64,
    /// Subscribers that lost their connection this step.
    pub disconnected: u64,
    /// Why, counted.
    pub reasons: BTreeMap<String, u64>,
    /// Subscribers currently connected and subscribed.
    pub alive: Vec<bool>,
    /// Connect time of each connection of the initial ramp, µs.
    pub connect: Histogram<u64>,
    /// Connection attempts that failed.
    pub connect_failures: u64,
    /// When the last delivery of any step arrived.
    pub last_delivery: Instant,
    tracks: Vec<Track>,
}

impl Stats {
    /// Counters for `subs` subscribers.
    pub fn new(subs: usize) -> Stats {
        let now = Instant::now();
        Stats {
            epoch: now,
            step: 0,
            latency: histogram(),
            received: 0,
            duplicates: 0,
            out_of_order: 0,
            corrupt: 0,
            stale: 0,
            disconnected: 0,
            reasons: BTreeMap::new(),
            alive: vec![false; subs],
            connect: histogram(),
            connect_failures: 0,
            last_delivery: now,
            tracks: (0..subs).map(|_| Track::default()).collect(),
        }
    }

    /// Nanoseconds since the generator's epoch.
    pub fn now_ns(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Start counting step `step`.
    pub fn begin(&mut self, step: u32) {
        self.step = step;
        self.latency.reset();
        self.received = 0;
        self.duplicates = 0;
        self.out_of_order = 0;
        self.corrupt = 0;
        self.stale = 0;
        self.disconnected = 0;
        self.reasons.clear();
    }

    /// Subscribers connected now.
    pub fn connected(&self) -> usize {
        self.alive.iter().filter(|a| **a).count()
    }

    /// Record a subscriber's loss of its connection.
    pub fn lost(&mut self, sub: usize, reason: String) {
        if std::mem::replace(&mut self.alive[sub], false) {
            self.disconnected += 1;
            *self.reasons.entry(reason).or_default() += 1;
        }
    }

    /// One payload arrived at subscriber `sub` (of `channel`) at `now_ns`.
    pub fn deliver(&mut self, sub: usize, channel: u32, data: &[u8], now_ns: u64) {
        let Some((step, ch, seq, sent)) = parse_payload(data) else {
            self.corrupt += 1;
            return;
        };
        if step != self.step {
            self.stale += 1;
            return;
        }
        if ch != channel {
            self.corrupt += 1;
            return;
        }
        let t = &mut self.tracks[sub];
        if t.step != step {
            t.step = step;
            t.max = None;
            t.seen.clear();
        }
        let (word, bit) = ((seq / 64) as usize, 1u64 << (seq % 64));
        if t.seen.len() <= word {
            t.seen.resize(word + 1, 0);
        }
        if t.seen[word] & bit != 0 {
            self.duplicates += 1;
            return;
        }
        t.seen[word] |= bit;
        if t.max.is_some_and(|m| seq < m) {
            self.out_of_order += 1;
        }
        t.max = Some(t.max.map_or(seq, |m| m.max(seq)));
        self.received += 1;
        let _ = self.latency.record((now_ns.saturating_sub(sent) / 1000).max(1));
        self.last_delivery = Instant::now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_duplicates_order_and_stale() {
        let mut s = Stats::new(1);
        s.begin(3);
        let p = |seq| make_payload(3, 5, seq, 0, 100);
        for seq in [0, 1, 1, 3, 2] {
            s.deliver(0, 5, &p(seq), 1_000_000);
        }
        s.deliver(0, 5, &make_payload(2, 5, 9, 0, 100), 0);
        s.deliver(0, 6, &p(7), 0);
        assert_eq!((s.received, s.duplicates, s.out_of_order, s.stale, s.corrupt), (4, 1, 1, 1, 1));
        assert_eq!(s.latency.len(), 4);
        assert!((999..=1001).contains(&s.latency.value_at_quantile(0.5)));
        assert_eq!(parse_payload(&p(2)), Some((3, 5, 2, 0)));
    }
}
