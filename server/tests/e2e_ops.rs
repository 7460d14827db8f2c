//! Operations end to end (docs/DEPLOY.md): the metrics a deployment
//! scrapes, the log lines it keeps (bounded under a connection burst), the
//! `ferry health` probe the container image uses, and the drain on SIGTERM.

mod common;

use std::collections::BTreeMap;
use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use ferry_core::client::Event;
use ferry_core::codec::Encoding;
use ferry_core::CloseCode;
use ferry_server::auth::{sign_hs256, Claims};
use ferry_server::config::{AuthConfig, Config};
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(20);
const SECRET: &str = "0123456789abcdef0123456789abcdef-ops";

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

fn token(secret: &str, user: &str, ttl: i64) -> String {
    let c = Claims { sub: user.into(), exp: Some((now() as i64 + ttl) as u64), info: None, channels: vec![] };
    sign_hs256(secret, &c).unwrap()
}

/// GET a path on the WebSocket port; the body.
async fn get_text(addr: std::net::SocketAddr, path: &str) -> String {
    let (status, _, body) = http_raw(addr, "GET", path, "", b"").await;
    assert_eq!(status, 200, "GET {path}");
    match body {
        Value::String(s) => s,
        other => other.to_string(),
    }
}

/// The samples of a scrape: `name{labels}` → value; panics on a line that
/// is not exposition format, or a family without HELP and TYPE (once each).
fn parse_exposition(text: &str) -> BTreeMap<String, f64> {
    let mut samples = BTreeMap::new();
    let mut help = BTreeMap::<String, usize>::new();
    let mut types = BTreeMap::<String, String>::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            *help.entry(rest.split(' ').next().unwrap().to_string()).or_default() += 1;
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
            assert!(types.insert(name.into(), kind.into()).is_none(), "TYPE twice: {line}");
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("not a sample: {line:?}"));
        let name = series.split('{').next().unwrap();
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|f| types.get(*f).is_some_and(|t| t == "histogram")))
            .unwrap_or(name);
        assert!(types.contains_key(family) && help.get(family) == Some(&1), "{family}: HELP and TYPE once");
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("value of {line:?}"));
        assert!(samples.insert(series.to_string(), value).is_none(), "sample twice: {line}");
    }
    samples
}

#[tokio::test]
async fn metrics_count_api_requests_and_auth_failures_per_node() {
    let mut cfg = Config {
        auth: AuthConfig { hmac_secret: Some(SECRET.into()), ..AuthConfig::default() },
        allow_anonymous: false,
        node_name: Some("node \"a\"".into()),
        ..test_config()
    };
    cfg.api.keys = vec!["key-1".into()];
    let srv = TestServer::start_with_api(cfg).await;
    let api = srv.api.unwrap();
    let url = srv.url();
    // Refused connections, one of each reason.
    assert_eq!(try_token(&url, "not.a.jwt").await, Some(CloseCode::Unauthorized as u16));
    assert_eq!(try_token(&url, &token("another-secret-another-secret-xx", "u", 60)).await, Some(3500));
    assert_eq!(try_token(&url, "").await, Some(3500));
    assert_eq!(try_token(&url, &token(SECRET, "u", -60)).await, Some(CloseCode::TokenExpired as u16));
    assert_eq!(try_token(&url, &token(SECRET, "u", 60)).await, None);
    // API: no key, a wrong key, a good publish, an unknown route.
    let body = json!({"channel": "news", "data": {"n": 1}});
    assert_eq!(http(api, "POST", "/api/publish", Some(&body), None).await.0, 401);
    assert_eq!(http(api, "POST", "/api/publish", Some(&body), Some("nope")).await.0, 401);
    assert_eq!(http(api, "POST", "/api/publish", Some(&body), Some("key-1")).await.0, 200);
    assert_eq!(http(api, "GET", "/api/no/such/route/123", None, Some("key-1")).await.0, 404);
    assert_eq!(http(api, "GET", "/api/info", None, Some("key-1")).await.0, 200);

    let text = get_text(srv.addr, "/metrics").await;
    let m = parse_exposition(&text);
    let node = r#"node="node \"a\"""#;
    let get = |series: &str| m.get(series).copied().unwrap_or_else(|| panic!("{series} missing in\n{text}"));
    let http_series = |route: &str, status: u16| {
        get(&format!("ferry_http_requests_total{{{node},route=\"{route}\",status=\"{status}\"}}"))
    };
    assert_eq!(http_series("/api/publish", 401), 2.0);
    assert_eq!(http_series("/api/publish", 200), 1.0);
    assert_eq!(http_series("/api/info", 200), 1.0);
    // The raw path is not a label: unknown paths share one series.
    assert_eq!(http_series("unmatched", 404), 1.0);
    assert!(!text.contains("/api/no/such"), "raw paths stay out of the labels");
    let auth = |cred: &str, reason: &str| {
        get(&format!("ferry_auth_failures_total{{{node},credential=\"{cred}\",reason=\"{reason}\"}}"))
    };
    assert_eq!(auth("token", "malformed"), 1.0);
    assert_eq!(auth("token", "bad_signature"), 1.0);
    assert_eq!(auth("token", "missing"), 1.0);
    // The expired token's close allows a reconnect, which may come first.
    assert!(auth("token", "expired") >= 1.0);
    assert_eq!(auth("token", "algorithm"), 0.0);
    assert_eq!(auth("api_key", "missing"), 1.0);
    assert_eq!(auth("api_key", "wrong_key"), 1.0);
    assert_eq!(get(&format!("ferry_publications_stored_total{{{node}}}")), 1.0);
    let build = m.keys().find(|k| k.starts_with("ferry_build_info{")).expect("ferry_build_info");
    assert!(build.contains(&format!("version=\"{}\"", env!("CARGO_PKG_VERSION"))) && build.contains("git=\""));
    assert_eq!(m[build], 1.0);
    // Every ferry_* sample carries the node; process_* ones carry nothing.
    for k in m.keys().filter(|k| k.starts_with("ferry_")) {
        assert!(k.contains(&format!("{{{node}")), "{k} without the node label");
    }
    for name in ["process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds", "process_max_fds"] {
        assert!(m.contains_key(name), "{name} missing in\n{text}");
    }
    assert!(get("process_resident_memory_bytes") > 1e6);
    assert!(get("process_open_fds") >= 3.0 && get("process_open_fds") <= get("process_max_fds"));
    let start = get("process_start_time_seconds");
    assert!(start <= now() as f64 + 1.0 && start > now() as f64 - 3600.0, "start time {start}");
    srv.stop().await;
}

/// A `ferry serve` child with its stderr lines on a channel.
struct Node {
    child: Child,
    addr: std::net::SocketAddr,
    api: std::net::SocketAddr,
    lines: std::sync::mpsc::Receiver<String>,
    /// Removed on drop, after the process.
    _dir: TempDir,
}

fn ferry() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ferry"));
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("FERRY_")) {
        c.env_remove(k);
    }
    c
}

impl Node {
    fn spawn(env: &[(&str, &str)]) -> Node {
        let dir = TempDir::new("ops");
        let mut cmd = ferry();
        cmd.args(["serve", "--listen", "127.0.0.1:0", "--data-dir"]).arg(dir.path());
        cmd.env("FERRY_LOG", "info").env("FERRY_LOG_FORMAT", "json");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        let (mut first, mut second) = (String::new(), String::new());
        out.read_line(&mut first).unwrap();
        out.read_line(&mut second).unwrap();
        std::thread::spawn(move || for _ in out.lines().map_while(Result::ok) {});
        let addr = first.split("ws://").nth(1).and_then(|r| r.split('/').next()).unwrap().parse().unwrap();
        let api = second.split("http://").nth(1).and_then(|r| r.split('/').next()).unwrap().parse().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        let err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for l in std::io::BufReader::new(err).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    return;
                }
            }
        });
        Node { child, addr, api, lines, _dir: dir }
    }

    /// Lines until `done` holds for the ones read so far, or `limit` passes.
    fn read_until(&self, limit: Duration, seen: &mut Vec<Value>, mut done: impl FnMut(&[Value]) -> bool) -> bool {
        let end = Instant::now() + limit;
        while !done(seen) {
            let left = end.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => seen.push(serde_json::from_str(&l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"))),
                Err(_) => return false,
            }
        }
        true
    }

    fn url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn message(v: &Value) -> &str {
    v["fields"]["message"].as_str().unwrap_or("")
}

#[tokio::test]
async fn connection_and_api_error_logs_are_one_line_each_and_bounded_in_a_burst() {
    const BUDGET: u64 = 5;
    let node = Node::spawn(&[
        ("FERRY_LIMITS_LOG_LINES_PER_SEC", &BUDGET.to_string()),
        ("FERRY_LIMITS_CONNECTIONS_PER_IP_PER_MINUTE", "0"),
        ("FERRY_API_KEYS", r#"["k"]"#),
    ]);
    let mut seen = Vec::new();
    // One connection: an open line and a close line naming the user, the
    // close code and the duration.
    let mut c = TestClient::new(&node.url(), TestClient::config("d", "alice", Encoding::Json));
    c.connect().await;
    assert!(c.connected().await);
    drop(c);
    let closed = |s: &[Value]| s.iter().any(|l| message(l) == "connection closed");
    assert!(node.read_until(T, &mut seen, closed), "close line in {seen:#?}");
    let open = seen.iter().find(|l| message(l) == "connection open").expect("open line");
    assert_eq!(open["level"], "INFO");
    assert_eq!(open["fields"]["user"], "alice");
    let close = seen.iter().find(|l| message(l) == "connection closed").unwrap();
    assert_eq!(close["fields"]["user"], "alice");
    assert_eq!(close["fields"]["client"], open["fields"]["client"]);
    assert!(close["fields"]["code"].is_u64() && close["fields"]["duration_ms"].is_u64(), "{close}");

    // An API error: route template and status.
    let (status, _) = http(node.api, "POST", "/api/publish", Some(&json!({"channel": "x", "data": 1})), None).await;
    assert_eq!(status, 401);
    let api_error = |s: &[Value]| s.iter().any(|l| message(l) == "API error");
    assert!(node.read_until(T, &mut seen, api_error));
    let e = seen.iter().find(|l| message(l) == "API error").unwrap();
    assert_eq!((e["fields"]["route"].as_str(), e["fields"]["status"].as_u64()), (Some("/api/publish"), Some(401)));
    assert_eq!(e["fields"]["error"], "missing API key");

    // A burst: every open and close is either written or counted in a
    // "suppressed" line, and the lines written stay within the budget.
    const BURST: u64 = 120;
    let started = Instant::now();
    for i in 0..BURST {
        let mut c = TestClient::new(&node.url(), TestClient::config("d", &format!("u{i}"), Encoding::Json));
        c.connect().await;
        assert!(c.connected().await);
    }
    let elapsed = started.elapsed();
    let mut burst = Vec::new();
    let count = |s: &[Value]| -> (u64, u64) {
        let written =
            s.iter().filter(|l| ["connection open", "connection closed"].contains(&message(l))).count() as u64;
        let suppressed: u64 = s.iter().filter_map(|l| l["fields"]["suppressed"].as_u64()).sum();
        (written, suppressed)
    };
    let accounted = node.read_until(T, &mut burst, |s| {
        let (w, s) = count(s);
        w + s == 2 * BURST
    });
    let (written, suppressed) = count(&burst);
    assert!(accounted, "{written} written + {suppressed} suppressed of {} lines", 2 * BURST);
    // One window per started second, plus the one the flush closes.
    let windows = elapsed.as_secs() + 2;
    assert!(written <= BUDGET * windows, "{written} lines in {elapsed:?} with {BUDGET}/s");
    assert!(suppressed > 0);
    let summaries = burst.iter().filter(|l| l["fields"]["suppressed"].is_u64()).count() as u64;
    assert!(summaries <= windows, "{summaries} summary lines");
}

#[tokio::test]
async fn sigterm_closes_every_connection_with_3000_and_exits_cleanly() {
    let mut node = Node::spawn(&[]);
    let mut c = TestClient::new(&node.url(), TestClient::config("d", "bob", Encoding::Json));
    c.connect().await;
    assert!(c.connected().await);
    let pid = rustix::process::Pid::from_raw(node.child.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    assert!(c.run_until(T, |c| c.events.iter().any(|e| matches!(e, Event::Disconnected { .. }))).await);
    let d = c.events.iter().find_map(|e| match e {
        Event::Disconnected { code, reconnect, .. } => Some((*code, *reconnect)),
        _ => None,
    });
    assert_eq!(d, Some((CloseCode::Shutdown as u16, true)));
    drop(c);
    // Bounded wait for the exit: the drain is bounded by the grace period.
    let end = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(s) = node.child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < end, "still running 15 s after SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "{status}");
    let mut seen = Vec::new();
    node.read_until(Duration::from_secs(5), &mut seen, |s| s.iter().any(|l| message(l).starts_with("shutting down")));
    let drain = seen.iter().find(|l| message(l).starts_with("shutting down")).expect("drain line");
    assert_eq!(drain["fields"]["connections"], 1);
}

#[tokio::test]
async fn the_health_command_probes_healthz_from_the_configuration() {
    let node = Node::spawn(&[]);
    // From the environment's listen address, the unspecified IP on loopback.
    let out = ferry()
        .arg("health")
        .env("FERRY_LISTEN", format!("0.0.0.0:{}", node.addr.port()))
        .env("FERRY_LOG", "warn")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("/healthz: ok"));
    let out = ferry().args(["health", "--url", &format!("http://{}/healthz", node.addr)]).output().unwrap();
    assert!(out.status.success());
    // Nothing listening: a failure, quickly.
    let port = free_port();
    let started = Instant::now();
    let out = ferry()
        .args(["health", "--timeout-ms", "2000", "--url", &format!("http://127.0.0.1:{port}/healthz")])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(started.elapsed() < Duration::from_secs(10));
    // A route that is not 200 is unhealthy too.
    let out = ferry().args(["health", "--url", &format!("http://{}/nope", node.addr)]).output().unwrap();
    assert!(!out.status.success());
}

#[test]
fn serve_help_names_the_log_variables_and_a_bad_format_is_refused() {
    let out = ferry().args(["serve", "--help"]).output().unwrap();
    let help = String::from_utf8(out.stdout).unwrap();
    for v in ["FERRY_LOG ", "FERRY_LOG_FORMAT", "text", "json", "log_lines_per_sec"] {
        assert!(help.contains(v), "{v} in\n{help}");
    }
    let out = ferry().arg("genconfig").env("FERRY_LOG_FORMAT", "xml").output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("FERRY_LOG_FORMAT=xml"));
}
