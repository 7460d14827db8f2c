//! Rate limits for the log lines that scale with traffic: connection
//! opens and closes, backend API errors.
//!
//! Design: a fixed one-second window per kind of line. Up to the budget,
//! lines are written; past it they are counted, and one line per window
//! says how many were dropped, so a connection storm costs at most
//! `budget + 1` lines a second of each kind instead of one per connection.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The window the budget applies to.
const WINDOW: Duration = Duration::from_secs(1);

/// One kind of line and its per-second budget.
#[derive(Debug)]
pub struct LineBudget {
    what: &'static str,
    per_window: u32,
    state: Mutex<Window>,
}

#[derive(Debug)]
struct Window {
    start: Instant,
    used: u32,
    suppressed: u64,
}

impl LineBudget {
    /// At most `per_sec` lines a second of `what` (0 = no limit).
    pub fn new(what: &'static str, per_sec: u32) -> LineBudget {
        LineBudget {
            what,
            per_window: per_sec,
            state: Mutex::new(Window { start: Instant::now(), used: 0, suppressed: 0 }),
        }
    }

    /// Whether one more line may be written now; if not, it is counted.
    pub fn allow(&self) -> bool {
        if self.per_window == 0 {
            return true;
        }
        let mut w = self.state.lock().unwrap_or_else(|e| e.into_inner());
        self.roll(&mut w, Instant::now());
        if w.used < self.per_window {
            w.used += 1;
            true
        } else {
            w.suppressed += 1;
            false
        }
    }

    /// Write the "suppressed" line of a window that has ended (called by
    /// [`LineBudget::allow`] and by a periodic flush, so the count is told
    /// even when the burst stops).
    pub fn flush(&self) {
        if self.per_window == 0 {
            return;
        }
        let mut w = self.state.lock().unwrap_or_else(|e| e.into_inner());
        self.roll(&mut w, Instant::now());
    }

    fn roll(&self, w: &mut Window, now: Instant) {
        let elapsed = now.duration_since(w.start);
        if elapsed < WINDOW {
            return;
        }
        if w.suppressed > 0 {
            tracing::info!(
                suppressed = w.suppressed,
                "{}: {} lines suppressed in {:.1} s (over limits.log_lines_per_sec = {})",
                self.what,
                w.suppressed,
                elapsed.as_secs_f64(),
                self.per_window
            );
        }
        *w = Window { start: now, used: 0, suppressed: 0 };
    }
}

/// The budgets of one server.
#[derive(Debug)]
pub struct Logs {
    /// Connection open and close lines.
    pub connections: LineBudget,
    /// Backend API error lines.
    pub api_errors: LineBudget,
}

impl Logs {
    /// Both budgets at `per_sec` lines a second.
    pub fn new(per_sec: u32) -> Logs {
        Logs {
            connections: LineBudget::new("connection log", per_sec),
            api_errors: LineBudget::new("API error log", per_sec),
        }
    }

    /// Flush both (see [`LineBudget::flush`]).
    pub fn flush(&self) {
        self.connections.flush();
        self.api_errors.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_bounds_a_burst_and_counts_the_rest() {
        let b = LineBudget::new("test", 3);
        let allowed = (0..100).filter(|_| b.allow()).count();
        assert_eq!(allowed, 3);
        assert_eq!(b.state.lock().unwrap().suppressed, 97);
        // A new window starts the count again (and reports the old one).
        b.state.lock().unwrap().start -= WINDOW;
        assert!(b.allow());
        assert_eq!(b.state.lock().unwrap().suppressed, 0);
        let unlimited = LineBudget::new("test", 0);
        assert!((0..1000).all(|_| unlimited.allow()));
    }
}
