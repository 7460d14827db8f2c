//! Time as the host gives it: the core never reads a clock.

use std::time::Duration;

/// A monotonic instant in milliseconds since an origin the host picks
/// (process start, `performance.now()`, a simulated clock, ...).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct Instant(pub u64);

impl Instant {
    /// From milliseconds since the host's origin.
    pub const fn from_millis(ms: u64) -> Self {
        Instant(ms)
    }
    /// Milliseconds since the host's origin.
    pub const fn as_millis(self) -> u64 {
        self.0
    }
    /// `self + d`, saturating.
    pub fn plus(self, d: Duration) -> Instant {
        Instant(self.0.saturating_add(d.as_millis().min(u64::MAX as u128) as u64))
    }
    /// `self + ms`, saturating.
    pub fn add_ms(self, ms: u64) -> Instant {
        Instant(self.0.saturating_add(ms))
    }
    /// Time from `earlier` to `self`, zero if `earlier` is later.
    pub fn since(self, earlier: Instant) -> Duration {
        Duration::from_millis(self.0.saturating_sub(earlier.0))
    }
}

pub(crate) fn ms(d: Duration) -> u64 {
    d.as_millis().min(u64::MAX as u128) as u64
}
