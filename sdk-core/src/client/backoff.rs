//! Reconnect delays: exponential growth with full jitter above a floor.

use std::time::Duration;

use crate::rng::Rng;
use crate::time::ms;

/// Backoff state: the attempt counter and its bounds.
#[derive(Debug, Clone)]
pub struct Backoff {
    min_ms: u64,
    max_ms: u64,
    attempt: u32,
}

impl Backoff {
    /// Delays between `min` and `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        let min_ms = ms(min).max(1);
        Backoff { min_ms, max_ms: ms(max).max(min_ms), attempt: 0 }
    }
    /// Attempts since the last success.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }
    /// The ceiling for attempt `n`: `min(max, min * 2^(n+1))`.
    pub fn ceiling(&self, n: u32) -> u64 {
        let factor = 1u64.checked_shl(n.saturating_add(1).min(62)).unwrap_or(u64::MAX);
        self.min_ms.saturating_mul(factor).min(self.max_ms)
    }
    /// Next delay in milliseconds, uniform in `[min, ceiling(attempt)]`.
    pub fn next_delay(&mut self, rng: &mut Rng) -> u64 {
        let d = rng.range(self.min_ms, self.ceiling(self.attempt));
        self.attempt = self.attempt.saturating_add(1);
        d
    }
    /// A connection succeeded: start again from the floor.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}
