//! Counters and gauges, rendered in the Prometheus text format at `/metrics`.

use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

/// Upper bounds of the commit-latency histogram, milliseconds.
const BUCKETS_MS: [f64; 10] = [1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0];

/// Server-wide metrics.
#[derive(Default, Debug)]
pub struct Metrics {
    /// Bytes received from clients.
    pub bytes_in: AtomicU64,
    /// Bytes sent to clients.
    pub bytes_out: AtomicU64,
    /// WebSocket messages received.
    pub messages_in: AtomicU64,
    /// WebSocket messages sent.
    pub messages_out: AtomicU64,
    /// Publications pushed to subscribers, by subscription QoS.
    pub deliveries: [AtomicU64; 3],
    /// QoS 1/2 deliveries waiting for an ack, all connections.
    pub acks_pending: AtomicI64,
    /// Connections closed as slow consumers.
    pub slow_consumers: AtomicU64,
    /// Webhook deliveries that failed for good.
    pub webhook_failures: AtomicU64,
    commit_buckets: [AtomicU64; BUCKETS_MS.len()],
    commit_count: AtomicU64,
    commit_sum_us: AtomicU64,
}

impl Metrics {
    /// Record one durable commit.
    pub fn commit_took(&self, d: std::time::Duration) {
        let ms = d.as_secs_f64() * 1000.0;
        for (i, b) in BUCKETS_MS.iter().enumerate() {
            if ms <= *b {
                self.commit_buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.commit_count.fetch_add(1, Ordering::Relaxed);
        self.commit_sum_us.fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    /// Render with the gauges the hub knows.
    pub fn render(&self, gauges: &[(&str, &str, u64)], counters: &[(&str, &str, u64)]) -> String {
        let mut out = String::new();
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        for (name, help, v) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        }
        let mut counter = |name: &str, help: &str, v: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        };
        for (name, help, v) in counters {
            counter(name, help, *v);
        }
        counter("ferry_bytes_in_total", "Bytes received from clients.", get(&self.bytes_in));
        counter("ferry_bytes_out_total", "Bytes sent to clients.", get(&self.bytes_out));
        counter("ferry_messages_in_total", "WebSocket messages received.", get(&self.messages_in));
        counter("ferry_messages_out_total", "WebSocket messages sent.", get(&self.messages_out));
        counter(
            "ferry_slow_consumer_disconnects_total",
            "Connections closed as slow consumers.",
            get(&self.slow_consumers),
        );
        counter("ferry_webhook_failures_total", "Webhook calls that failed for good.", get(&self.webhook_failures));
        let _ = writeln!(
            out,
            "# HELP ferry_deliveries_total Publications pushed to subscribers.\n# TYPE ferry_deliveries_total counter"
        );
        for (q, c) in self.deliveries.iter().enumerate() {
            let _ = writeln!(out, "ferry_deliveries_total{{qos=\"{q}\"}} {}", get(c));
        }
        let pending = self.acks_pending.load(Ordering::Relaxed).max(0);
        let _ = writeln!(out, "# HELP ferry_acks_pending QoS 1/2 deliveries waiting for an ack.\n# TYPE ferry_acks_pending gauge\nferry_acks_pending {pending}");
        let _ = writeln!(
            out,
            "# HELP ferry_store_commit_seconds Durable commit latency.\n# TYPE ferry_store_commit_seconds histogram"
        );
        for (i, b) in BUCKETS_MS.iter().enumerate() {
            let _ = writeln!(
                out,
                "ferry_store_commit_seconds_bucket{{le=\"{}\"}} {}",
                b / 1000.0,
                get(&self.commit_buckets[i])
            );
        }
        let count = get(&self.commit_count);
        let _ = writeln!(out, "ferry_store_commit_seconds_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "ferry_store_commit_seconds_sum {}", get(&self.commit_sum_us) as f64 / 1e6);
        let _ = writeln!(out, "ferry_store_commit_seconds_count {count}");
        out
    }
}
