//! A table of named timers; the session's next timeout is the earliest.

use crate::Instant;

/// Named deadlines indexed by a small enum.
#[derive(Debug, Clone)]
pub(crate) struct Timers<const N: usize> {
    at: [Option<Instant>; N],
}

impl<const N: usize> Default for Timers<N> {
    fn default() -> Self {
        Timers { at: [None; N] }
    }
}

impl<const N: usize> Timers<N> {
    pub fn set(&mut self, t: usize, at: Instant) {
        self.at[t] = Some(at);
    }
    pub fn set_opt(&mut self, t: usize, at: Option<Instant>) {
        self.at[t] = at;
    }
    pub fn clear(&mut self, t: usize) {
        self.at[t] = None;
    }
    pub fn get(&self, t: usize) -> Option<Instant> {
        self.at[t]
    }
    /// Whether timer `t` is due at `now`; clears it if so.
    pub fn take_due(&mut self, t: usize, now: Instant) -> bool {
        match self.at[t] {
            Some(at) if at <= now => {
                self.at[t] = None;
                true
            }
            _ => false,
        }
    }
    pub fn earliest(&self) -> Option<Instant> {
        self.at.iter().flatten().min().copied()
    }
}
