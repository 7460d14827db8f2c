//! Counters and gauges, rendered in the Prometheus text format at `/metrics`.
//!
//! Every `ferry_*` sample carries a `node` label (the node's name, see
//! [`crate::config::Config::node_name`]), so the series of the nodes of one
//! cluster stay apart even when they are relabelled or federated. The
//! standard `process_*` series (Linux only: read from `/proc/self`) carry no
//! label, as client libraries write them.

use std::collections::BTreeMap;
use std::fmt::{Display, Write};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;

/// Upper bounds of the commit-latency histogram, milliseconds.
const BUCKETS_MS: [f64; 10] = [1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0];

/// The version this binary was built from.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The git commit this binary was built from (`FERRY_GIT_COMMIT` at build
/// time, else `git rev-parse`), or `unknown`.
pub const GIT_COMMIT: &str = env!("FERRY_GIT_COMMIT");

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
    /// QoS 0 publications skipped for subscribers that lagged (at most once).
    pub qos0_dropped: AtomicU64,
    /// Publishes refused because subscribers of the channel were behind.
    pub publish_backpressure: AtomicU64,
    /// Webhook deliveries that failed for good.
    pub webhook_failures: AtomicU64,
    /// Backend API requests by route and status.
    pub http: HttpRequests,
    commit_buckets: [AtomicU64; BUCKETS_MS.len()],
    commit_count: AtomicU64,
    commit_sum_us: AtomicU64,
}

/// Backend API requests counted by (route template, HTTP status).
///
/// Design: keyed by the matched route template (`/api/publish`), never the
/// raw path, and every unknown path shares one label, so the number of
/// series is bounded by routes × statuses whatever clients send.
#[derive(Default, Debug)]
pub struct HttpRequests {
    counts: Mutex<BTreeMap<(String, u16), u64>>,
}

/// The `route` label of requests that matched no route.
pub const UNMATCHED_ROUTE: &str = "unmatched";

impl HttpRequests {
    /// Count one request answered with `status` on `route` (a template).
    pub fn count(&self, route: &str, status: u16) {
        *self.counts.lock().unwrap_or_else(|e| e.into_inner()).entry((route.to_owned(), status)).or_insert(0) += 1;
    }

    /// Requests counted so far for (`route`, `status`).
    pub fn get(&self, route: &str, status: u16) -> u64 {
        let counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        counts.get(&(route.to_owned(), status)).copied().unwrap_or(0)
    }

    fn snapshot(&self) -> Vec<((String, u16), u64)> {
        self.counts.lock().unwrap_or_else(|e| e.into_inner()).iter().map(|(k, v)| (k.clone(), *v)).collect()
    }
}

/// A labelled counter family given to [`Metrics::render`]: name, help,
/// label names, and the samples (label values, value).
pub struct Family<'a> {
    /// Metric name.
    pub name: &'a str,
    /// HELP text.
    pub help: &'a str,
    /// Label names, in the order of each sample's values.
    pub labels: &'a [&'a str],
    /// Label values and the value.
    pub samples: Vec<(Vec<&'a str>, u64)>,
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

    /// Render everything: the gauges and counters the hub knows, labelled
    /// counter families, this struct's own series, and the process's.
    pub fn render(
        &self,
        node: &str,
        gauges: &[(&str, &str, u64)],
        counters: &[(&str, &str, u64)],
        families: &[Family<'_>],
    ) -> String {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut e = Exposition::new(&[("node", node)]);
        e.family("ferry_build_info", "The running build: 1, with its version and git commit.", "gauge");
        e.sample("ferry_build_info", &[("version", VERSION), ("git", GIT_COMMIT)], 1);
        for (name, help, v) in gauges {
            e.family(name, help, "gauge");
            e.sample(name, &[], v);
        }
        let mut counter = |name: &str, help: &str, v: u64| {
            e.family(name, help, "counter");
            e.sample(name, &[], v);
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
        counter(
            "ferry_qos0_dropped_total",
            "QoS 0 publications skipped for subscribers whose queue overflowed (at most once allows it).",
            get(&self.qos0_dropped),
        );
        counter(
            "ferry_publish_backpressure_total",
            "Publishes refused (111, temporary) because QoS 1/2 subscribers of the channel were behind.",
            get(&self.publish_backpressure),
        );
        counter("ferry_webhook_failures_total", "Webhook calls that failed for good.", get(&self.webhook_failures));
        e.family("ferry_deliveries_total", "Publications pushed to subscribers.", "counter");
        for (q, c) in self.deliveries.iter().enumerate() {
            e.sample("ferry_deliveries_total", &[("qos", &q.to_string())], get(c));
        }
        let pending = self.acks_pending.load(Ordering::Relaxed).max(0);
        e.family("ferry_acks_pending", "QoS 1/2 deliveries waiting for an ack.", "gauge");
        e.sample("ferry_acks_pending", &[], pending);
        e.family("ferry_http_requests_total", "Backend API requests by route template and HTTP status.", "counter");
        for ((route, status), n) in self.http.snapshot() {
            e.sample("ferry_http_requests_total", &[("route", &route), ("status", &status.to_string())], n);
        }
        for f in families {
            e.family(f.name, f.help, "counter");
            for (values, v) in &f.samples {
                let labels: Vec<(&str, &str)> = f.labels.iter().copied().zip(values.iter().copied()).collect();
                e.sample(f.name, &labels, v);
            }
        }
        e.family("ferry_store_commit_seconds", "Durable commit latency.", "histogram");
        for (i, b) in BUCKETS_MS.iter().enumerate() {
            let le = (b / 1000.0).to_string();
            e.sample("ferry_store_commit_seconds_bucket", &[("le", &le)], get(&self.commit_buckets[i]));
        }
        let count = get(&self.commit_count);
        e.sample("ferry_store_commit_seconds_bucket", &[("le", "+Inf")], count);
        e.sample("ferry_store_commit_seconds_sum", &[], get(&self.commit_sum_us) as f64 / 1e6);
        e.sample("ferry_store_commit_seconds_count", &[], count);
        let mut out = e.finish();
        out.push_str(&process_metrics());
        out
    }
}

/// Writes the text exposition format: one HELP and TYPE per family, label
/// values escaped, the constant labels on every sample.
pub struct Exposition {
    out: String,
    constant: Vec<(String, String)>,
}

impl Exposition {
    /// A writer that adds `constant` labels to every sample.
    pub fn new(constant: &[(&str, &str)]) -> Exposition {
        Exposition {
            out: String::new(),
            constant: constant.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        }
    }

    /// Start a family: its HELP (escaped) and TYPE lines.
    pub fn family(&mut self, name: &str, help: &str, kind: &str) {
        let _ = writeln!(self.out, "# HELP {name} {}\n# TYPE {name} {kind}", escape_help(help));
    }

    /// One sample of the current family.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl Display) {
        self.out.push_str(name);
        let all = self.constant.iter().map(|(k, v)| (k.as_str(), v.as_str())).chain(labels.iter().copied());
        let mut first = true;
        for (k, v) in all {
            self.out.push(if first { '{' } else { ',' });
            first = false;
            let _ = write!(self.out, "{k}=\"{}\"", escape_label(v));
        }
        if !first {
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }

    /// The text written.
    pub fn finish(self) -> String {
        self.out
    }
}

/// A label value as the exposition format wants it: `\`, `"` and newline
/// escaped.
pub fn escape_label(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

/// HELP text as the exposition format wants it: `\` and newline escaped.
fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

/// The standard `process_*` series of this process, from `/proc/self`:
/// CPU seconds, resident and virtual memory, open and maximum descriptors,
/// start time. Empty where `/proc` is not there (not Linux).
pub fn process_metrics() -> String {
    #[cfg(target_os = "linux")]
    {
        linux::render().unwrap_or_default()
    }
    #[cfg(not(target_os = "linux"))]
    {
        String::new()
    }
}

#[cfg(target_os = "linux")]
mod linux {
    use super::Exposition;

    /// Fields of `/proc/self/stat` (man 5 proc), counted from 1.
    const UTIME: usize = 14;
    const STIME: usize = 15;
    const STARTTIME: usize = 22;
    const VSIZE: usize = 23;
    const RSS: usize = 24;

    pub(super) fn render() -> Option<String> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        // The command name (field 2) is in parentheses and may hold spaces:
        // fields are counted after its closing one.
        let rest = &stat[stat.rfind(')')? + 1..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<u64>().ok());
        let ticks = rustix::param::clock_ticks_per_second() as f64;
        let page = rustix::param::page_size() as u64;
        let mut e = Exposition::new(&[]);
        if let (Some(u), Some(s)) = (field(UTIME), field(STIME)) {
            e.family("process_cpu_seconds_total", "Total user and system CPU time spent in seconds.", "counter");
            e.sample("process_cpu_seconds_total", &[], (u + s) as f64 / ticks);
        }
        if let Some(rss) = field(RSS) {
            e.family("process_resident_memory_bytes", "Resident memory size in bytes.", "gauge");
            e.sample("process_resident_memory_bytes", &[], rss * page);
        }
        if let Some(v) = field(VSIZE) {
            e.family("process_virtual_memory_bytes", "Virtual memory size in bytes.", "gauge");
            e.sample("process_virtual_memory_bytes", &[], v);
        }
        if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
            // The directory handle read here is one of them: not counted.
            let open = dir.count().saturating_sub(1);
            e.family("process_open_fds", "Number of open file descriptors.", "gauge");
            e.sample("process_open_fds", &[], open);
        }
        if let Some(max) = rustix::process::getrlimit(rustix::process::Resource::Nofile).current {
            e.family("process_max_fds", "Maximum number of open file descriptors.", "gauge");
            e.sample("process_max_fds", &[], max);
        }
        // Absent where /proc/stat is hidden (systemd's ProcSubset=pid).
        let boot = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| s.lines().find_map(|l| l.strip_prefix("btime ").and_then(|v| v.trim().parse::<u64>().ok())));
        if let (Some(boot), Some(start)) = (boot, field(STARTTIME)) {
            e.family("process_start_time_seconds", "Start time of the process since unix epoch in seconds.", "gauge");
            e.sample("process_start_time_seconds", &[], boot as f64 + start as f64 / ticks);
        }
        Some(e.finish())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_escaped_and_constant_labels_come_first() {
        let mut e = Exposition::new(&[("node", "a\"b")]);
        e.family("x_total", "Help with \\ and\nnewline.", "counter");
        e.sample("x_total", &[("route", "/p\\q\n")], 3);
        let text = e.finish();
        assert_eq!(
            text,
            "# HELP x_total Help with \\\\ and\\nnewline.\n# TYPE x_total counter\n\
             x_total{node=\"a\\\"b\",route=\"/p\\\\q\\n\"} 3\n"
        );
    }

    #[test]
    fn http_requests_are_counted_by_route_and_status() {
        let h = HttpRequests::default();
        h.count("/api/publish", 200);
        h.count("/api/publish", 200);
        h.count(UNMATCHED_ROUTE, 404);
        assert_eq!(h.get("/api/publish", 200), 2);
        assert_eq!(h.get(UNMATCHED_ROUTE, 404), 1);
        assert_eq!(h.get("/api/publish", 401), 0);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn process_series_are_read_from_proc() {
        let text = process_metrics();
        for name in [
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
            "process_open_fds",
            "process_max_fds",
            "process_start_time_seconds",
        ] {
            let v: f64 = text
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{name} ")))
                .unwrap_or_else(|| panic!("{name} in {text}"))
                .parse()
                .unwrap();
            assert!(v > 0.0 || name == "process_cpu_seconds_total", "{name} = {v}");
        }
        let start: f64 =
            text.lines().find_map(|l| l.strip_prefix("process_start_time_seconds ")).unwrap().parse().unwrap();
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
        assert!(start <= now + 1.0 && start > now - 24.0 * 3600.0, "start {start}, now {now}");
    }
}
