//! Test harness: a real server on an ephemeral loopback port and clients
//! that drive `ferry_core::client::ClientSession` over tokio-tungstenite.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ferry_core::client::{ClientConfig, ClientSession, ConnId, Event, Input, Output, Snapshot};
use ferry_core::codec::Encoding;
use ferry_core::frame::*;
use ferry_core::Instant;
use ferry_server::config::Config;
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "ferry-test-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A server running in this process.
pub struct TestServer {
    pub addr: SocketAddr,
    /// The backend API, when started with it.
    pub api: Option<SocketAddr>,
    pub dir: TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl TestServer {
    pub async fn start(mut cfg: Config) -> Self {
        let dir = TempDir::new("srv");
        cfg.data_dir = dir.path().to_path_buf();
        Self::start_in(cfg, dir).await
    }

    pub async fn start_in(cfg: Config, dir: TempDir) -> Self {
        Self::start_full(cfg, dir, false).await
    }

    /// With the backend API on its own ephemeral port.
    pub async fn start_with_api(cfg: Config) -> Self {
        Self::start_full(cfg, TempDir::new("srv"), true).await
    }

    async fn start_full(mut cfg: Config, dir: TempDir, with_api: bool) -> Self {
        cfg.data_dir = dir.path().to_path_buf();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let api = if with_api { Some(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap()) } else { None };
        let api_addr = api.as_ref().map(|l| l.local_addr().unwrap());
        let (tx, rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(ferry_server::serve(listener, api, cfg, async move {
            let _ = rx.await;
        }));
        // A server that failed to start says why, instead of refusing connections silently.
        tokio::time::sleep(Duration::from_millis(20)).await;
        if task.is_finished() {
            panic!("test server stopped at once: {:?}", task.await);
        }
        TestServer { addr, api: api_addr, dir, stop: Some(tx), task: Some(task) }
    }

    pub fn url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// Stop gracefully and give back the data directory.
    pub async fn stop(mut self) -> TempDir {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
        let dir = TempDir(self.dir.0.clone());
        std::mem::forget(self.dir);
        dir
    }
}

/// The `ferry` binary as a child process (for kill -9).
pub struct ServerProcess {
    pub child: Child,
    pub addr: SocketAddr,
}

impl ServerProcess {
    pub fn spawn(data_dir: &Path, extra: &[&str]) -> Self {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir)
            .args(extra)
            .env("FERRY_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn ferry");
        use std::io::BufRead;
        let out = child.stdout.take().unwrap();
        let mut reader = std::io::BufReader::new(out);
        let mut line = String::new();
        reader.read_line(&mut line).expect("startup line");
        // Keep draining so the server never writes into a closed pipe.
        std::thread::spawn(move || {
            let mut sink = String::new();
            while reader.read_line(&mut sink).map(|n| n > 0).unwrap_or(false) {
                sink.clear();
            }
        });
        let addr = line
            .split("ws://")
            .nth(1)
            .and_then(|r| r.split('/').next())
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no address in startup line {line:?}"));
        ServerProcess { child, addr }
    }
    pub fn url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }
    pub fn kill9(&mut self) {
        // SIGKILL: no chance to flush anything.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Open a raw WebSocket with a subprotocol.
pub async fn raw_ws(url: &str, enc: Encoding) -> Ws {
    let mut req = url.into_client_request().unwrap();
    req.headers_mut().insert("Sec-WebSocket-Protocol", enc.subprotocol().parse().unwrap());
    let (ws, resp) = tokio_tungstenite::connect_async(req).await.expect("connect");
    assert_eq!(resp.headers().get("sec-websocket-protocol").and_then(|v| v.to_str().ok()), Some(enc.subprotocol()));
    ws
}

/// A test client: a ClientSession driven over a real socket.
pub struct TestClient {
    pub url: String,
    pub session: ClientSession,
    pub enc: Encoding,
    ws: Option<(ConnId, Ws)>,
    origin: std::time::Instant,
    deadline: Option<Instant>,
    pub events: Vec<Event>,
    pub snapshot: Snapshot,
    /// Publications surfaced, per channel: (offset, message id, payload).
    pub received: std::collections::BTreeMap<String, Vec<(u64, String, Vec<u8>)>>,
    pub acked: std::collections::BTreeMap<String, StreamPosition>,
    /// Stop reading the socket (simulates a frozen app).
    pub paused: bool,
    /// Answers `TokenRequested` (a token provider).
    pub token_fn: Option<Box<dyn Fn() -> String + Send>>,
    /// How many times a token was requested.
    pub token_requests: usize,
}

impl TestClient {
    pub fn config(device: &str, token: &str, enc: Encoding) -> ClientConfig {
        let mut c = ClientConfig::new(device);
        c.token = token.into();
        c.encoding = enc;
        c.backoff_min = Duration::from_millis(50);
        c.backoff_max = Duration::from_millis(500);
        c
    }

    pub fn new(url: &str, cfg: ClientConfig) -> Self {
        static SEED: AtomicU64 = AtomicU64::new(1);
        let enc = cfg.encoding;
        let snapshot = Snapshot { seen_cap: cfg.dedup_window, ..Snapshot::default() };
        let session = ClientSession::new(cfg, SEED.fetch_add(1, Ordering::Relaxed));
        Self::with_session(url, session, enc, snapshot)
    }

    /// A fresh session with a chosen seed (two sessions with the same seed
    /// and device id generate the same message ids).
    pub fn new_seeded(url: &str, cfg: ClientConfig, seed: u64) -> Self {
        let enc = cfg.encoding;
        let snapshot = Snapshot { seen_cap: cfg.dedup_window, ..Snapshot::default() };
        Self::with_session(url, ClientSession::new(cfg, seed), enc, snapshot)
    }

    pub fn restore(url: &str, cfg: ClientConfig, snapshot: Snapshot) -> Self {
        let enc = cfg.encoding;
        let session = ClientSession::restore(cfg, 99, &snapshot, Instant(0));
        Self::with_session(url, session, enc, snapshot)
    }

    fn with_session(url: &str, session: ClientSession, enc: Encoding, snapshot: Snapshot) -> Self {
        TestClient {
            url: url.into(),
            session,
            enc,
            ws: None,
            origin: std::time::Instant::now(),
            deadline: None,
            events: Vec::new(),
            snapshot,
            received: Default::default(),
            acked: Default::default(),
            paused: false,
            token_fn: None,
            token_requests: 0,
        }
    }

    pub fn now(&self) -> Instant {
        Instant::from_millis(self.origin.elapsed().as_millis() as u64)
    }

    pub fn ids(&self, ch: &str) -> Vec<String> {
        self.received.get(ch).map(|v| v.iter().map(|r| r.1.clone()).collect()).unwrap_or_default()
    }

    pub fn offsets(&self, ch: &str) -> Vec<u64> {
        self.received.get(ch).map(|v| v.iter().map(|r| r.0).collect()).unwrap_or_default()
    }

    /// Process outputs of the session (opening sockets, writing, events).
    async fn drain(&mut self) {
        loop {
            let now = self.now();
            match self.session.poll_output(now) {
                Output::Timeout(t) => {
                    self.deadline = t;
                    return;
                }
                Output::Open { conn, .. } => {
                    let mut req = self.url.as_str().into_client_request().unwrap();
                    req.headers_mut().insert("Sec-WebSocket-Protocol", self.enc.subprotocol().parse().unwrap());
                    match tokio::time::timeout(Duration::from_secs(5), tokio_tungstenite::connect_async(req)).await {
                        Ok(Ok((ws, _))) => {
                            self.ws = Some((conn, ws));
                            let now = self.now();
                            self.session.handle_input(now, Input::TransportOpened { conn });
                        }
                        _ => {
                            let now = self.now();
                            self.session.handle_input(
                                now,
                                Input::TransportClosed { conn, code: None, reason: "connect failed".into() },
                            );
                        }
                    }
                }
                Output::Transmit { conn, data } => {
                    if let Some((c, ws)) = &mut self.ws {
                        if *c == conn {
                            let msg = if self.enc.is_text() {
                                Message::Text(String::from_utf8(data).unwrap().into())
                            } else {
                                Message::Binary(data.into())
                            };
                            if let Err(e) = ws.send(msg).await {
                                let now = self.now();
                                self.ws = None;
                                let reason = format!("write failed: {e}");
                                self.session.handle_input(now, Input::TransportClosed { conn, code: None, reason });
                            }
                        }
                    }
                }
                Output::Close { conn, code, reason } => {
                    if let Some((c, mut ws)) = self.ws.take() {
                        if c == conn {
                            let frame = tokio_tungstenite::tungstenite::protocol::CloseFrame {
                                code: code.into(),
                                reason: reason.into(),
                            };
                            let _ = tokio::time::timeout(Duration::from_millis(200), ws.close(Some(frame))).await;
                        } else {
                            self.ws = Some((c, ws));
                        }
                    }
                }
                Output::Event(e) => self.on_event(e),
            }
        }
    }

    fn on_event(&mut self, e: Event) {
        match &e {
            Event::Persist(c) => self.snapshot.apply(c),
            Event::Publication(p) => self.received.entry(p.channel.clone()).or_default().push((
                p.offset,
                p.message_id.clone(),
                p.payload.data.0.clone(),
            )),
            Event::PublishAcked { message_id, position, .. } => {
                self.acked.insert(message_id.clone(), position.clone());
            }
            Event::TokenRequested => {
                self.token_requests += 1;
                if let Some(f) = &self.token_fn {
                    let t = f();
                    let now = self.now();
                    self.session.set_token(now, t);
                }
            }
            _ => {}
        }
        if !matches!(e, Event::Persist(_)) {
            self.events.push(e);
        }
    }

    /// Drive the session until `done` holds or `limit` passes; returns whether it held.
    pub async fn run_until(&mut self, limit: Duration, mut done: impl FnMut(&TestClient) -> bool) -> bool {
        let end = tokio::time::Instant::now() + limit;
        self.drain().await;
        loop {
            if done(self) {
                return true;
            }
            if tokio::time::Instant::now() >= end {
                return false;
            }
            self.step(end).await;
            self.drain().await;
        }
    }

    /// Drive for a while.
    pub async fn run_for(&mut self, d: Duration) {
        self.run_until(d, |_| false).await;
    }

    async fn step(&mut self, end: tokio::time::Instant) {
        let wake = match self.deadline {
            Some(t) => {
                let wait = t.as_millis().saturating_sub(self.now().as_millis());
                (tokio::time::Instant::now() + Duration::from_millis(wait)).min(end)
            }
            None => end,
        };
        // Never sleep long: the condition may depend on other clients.
        let wake = wake.min(tokio::time::Instant::now() + Duration::from_millis(20));
        let paused = self.paused;
        let msg = match &mut self.ws {
            Some((conn, ws)) if !paused => {
                let conn = *conn;
                tokio::select! {
                    m = ws.next() => Some((conn, m)),
                    _ = tokio::time::sleep_until(wake) => None,
                }
            }
            _ => {
                tokio::time::sleep_until(wake).await;
                None
            }
        };
        let now = self.now();
        match msg {
            Some((conn, Some(Ok(Message::Binary(b))))) => {
                self.session.handle_input(now, Input::TransportMessage { conn, data: &b })
            }
            Some((conn, Some(Ok(Message::Text(t))))) => {
                self.session.handle_input(now, Input::TransportMessage { conn, data: t.as_bytes() })
            }
            Some((conn, Some(Ok(Message::Close(f))))) => {
                self.ws = None;
                let (code, reason) =
                    f.map(|f| (Some(u16::from(f.code)), f.reason.to_string())).unwrap_or((None, String::new()));
                self.session.handle_input(now, Input::TransportClosed { conn, code, reason });
            }
            Some((_, Some(Ok(_)))) => {}
            Some((conn, Some(Err(e)))) => {
                self.ws = None;
                self.session.handle_input(now, Input::TransportClosed { conn, code: None, reason: e.to_string() });
            }
            Some((conn, None)) => {
                self.ws = None;
                self.session.handle_input(now, Input::TransportClosed { conn, code: None, reason: "eof".into() });
            }
            None => self.session.handle_input(now, Input::Timeout),
        }
    }

    pub async fn connect(&mut self) {
        let now = self.now();
        self.session.connect(now);
        self.drain().await;
    }

    pub async fn subscribe(&mut self, ch: &str, qos: Qos) {
        let now = self.now();
        self.session.subscribe(now, ch, qos);
        self.drain().await;
    }

    pub async fn publish(&mut self, ch: &str, data: Vec<u8>, qos: Qos) -> String {
        let now = self.now();
        let id = self.session.publish(now, ch, data, qos).expect("publish accepted");
        self.drain().await;
        id
    }

    pub async fn call(&mut self, cmd: Command) -> Result<ReplyBody, String> {
        let now = self.now();
        let call = self.session.call(now, cmd).map_err(|e| e.to_string())?;
        let mut result = None;
        self.run_until(Duration::from_secs(10), |c| {
            c.events.iter().any(|e| matches!(e, Event::CallResult { call: id, .. } if *id == call))
        })
        .await;
        for e in &self.events {
            if let Event::CallResult { call: id, result: r } = e {
                if *id == call {
                    result = Some(r.clone().map_err(|e| e.to_string()));
                }
            }
        }
        result.unwrap_or_else(|| Err("no answer".into()))
    }

    pub async fn connected(&mut self) -> bool {
        self.run_until(Duration::from_secs(10), |c| c.session.is_connected()).await
    }

    /// Tell the session the network changed (it reconnects at once).
    pub async fn network_changed(&mut self) {
        let now = self.now();
        self.session.handle_input(now, Input::NetworkChanged { online: true });
        self.drain().await;
    }

    /// Drop the socket without a close frame (the app died or the link broke).
    pub fn drop_socket(&mut self) {
        self.ws = None;
    }
}

/// Drive several clients round-robin until `done` holds.
pub async fn run_all(clients: &mut [TestClient], limit: Duration, mut done: impl FnMut(&[TestClient]) -> bool) -> bool {
    let end = tokio::time::Instant::now() + limit;
    loop {
        if done(clients) {
            return true;
        }
        if tokio::time::Instant::now() >= end {
            return false;
        }
        for c in clients.iter_mut() {
            c.run_until(Duration::from_millis(5), |_| false).await;
        }
    }
}

/// One HTTP/1.1 request; returns the status and the body parsed as JSON
/// (or as a JSON string when it is not JSON).
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
    key: Option<&str>,
) -> (u16, serde_json::Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = TcpStream::connect(addr).await.unwrap();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let auth = key.map(|k| format!("Authorization: apikey {k}\r\n")).unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut raw)).await.expect("http answered").unwrap();
    let text = String::from_utf8_lossy(&raw).to_string();
    let status: u16 = text.split(' ').nth(1).and_then(|c| c.parse().ok()).expect("status line");
    let (head, rest) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    // Chunked bodies: join the chunks.
    let payload = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        let mut out = String::new();
        let mut r = rest;
        while let Some((size, tail)) = r.split_once("\r\n") {
            let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            if n == 0 {
                break;
            }
            out.push_str(&tail[..n]);
            r = &tail[n + 2..];
        }
        out
    } else {
        rest.to_string()
    };
    let json = serde_json::from_str(&payload).unwrap_or(serde_json::Value::String(payload));
    (status, json)
}

/// One HTTP/1.1 request with raw headers and body; returns the status, the
/// response head (lower-cased) and the body parsed as JSON (or a string).
pub async fn http_raw(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &str,
    body: &[u8],
) -> (u16, String, serde_json::Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n{headers}Content-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    // The server may answer (413) before reading a large body: a failed
    // write is then expected, the answer is what counts.
    let _ = s.write_all(body).await;
    let mut raw = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut raw)).await.expect("http answered");
    let text = String::from_utf8_lossy(&raw).to_string();
    let status: u16 = text.split(' ').nth(1).and_then(|c| c.parse().ok()).expect("status line");
    let (head, rest) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let json = serde_json::from_str(rest).unwrap_or(serde_json::Value::String(rest.to_string()));
    (status, head.to_ascii_lowercase(), json)
}

/// A config for tests: small timings where a test needs them.
pub fn test_config() -> Config {
    Config::default()
}

/// A private `redis-server` child, killed on drop.
pub struct Redis {
    child: std::process::Child,
    pub port: u16,
    dir: std::path::PathBuf,
    /// TLS only (`rediss://`, see [`Redis::start_tls`]).
    pub tls: bool,
}

/// The test certificates (tests/fixtures/tls/README.md).
pub fn tls_fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tls").join(name)
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Redis {
    /// Stop (`SIGSTOP`) or resume (`SIGCONT`) the process: a hung node
    /// whose sockets stay open.
    pub fn signal(&self, sig: &str) {
        let ok = std::process::Command::new("kill").args([sig, &self.child.id().to_string()]).status().unwrap();
        assert!(ok.success(), "kill {sig}");
    }

    pub fn start(extra: &[&str]) -> Redis {
        Self::start_on(free_port(), extra)
    }

    /// TLS only: no plain port, the fixtures' `redis.pem` (valid for
    /// 127.0.0.1 and localhost, signed by `redis-ca.pem`), clients not
    /// asked for a certificate.
    pub fn start_tls(extra: &[&str]) -> Redis {
        let port = free_port();
        let file = |name| tls_fixture(name).to_str().unwrap().to_string();
        let mut args: Vec<String> = ["--port", "0", "--tls-port", &port.to_string()].map(String::from).to_vec();
        args.extend(["--tls-cert-file".into(), file("redis.pem"), "--tls-key-file".into(), file("redis.key")]);
        args.extend(["--tls-ca-cert-file".into(), file("redis-ca.pem"), "--tls-auth-clients".into(), "no".into()]);
        args.extend(extra.iter().map(|a| a.to_string()));
        let mut r = Self::start_on(port, &args.iter().map(String::as_str).collect::<Vec<_>>());
        r.tls = true;
        r
    }

    /// On a given port (a restart keeps its address).
    pub fn start_on(port: u16, extra: &[&str]) -> Redis {
        use std::io::{BufRead, BufReader};
        use std::process::{Command, Stdio};
        let dir = std::env::temp_dir().join(format!("ferry-redis-{}-{port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--dir", dir.to_str().unwrap()])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("redis-server is installed (scripts/test-all.sh installs it)");
        // Ready once it says so (bounded by the lines it prints).
        let out = child.stdout.take().unwrap();
        let mut lines = BufReader::new(out).lines();
        let mut ready = false;
        for _ in 0..200 {
            match lines.next() {
                Some(Ok(l)) if l.contains("Ready to accept connections") => {
                    ready = true;
                    break;
                }
                Some(Ok(_)) => {}
                _ => break,
            }
        }
        assert!(ready, "redis-server on port {port} did not start");
        // Keep draining its output so it never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Redis { child, port, dir, tls: false }
    }

    pub fn url(&self) -> String {
        format!("{}://127.0.0.1:{}/", if self.tls { "rediss" } else { "redis" }, self.port)
    }

    pub fn cli(&self, args: &[&str]) -> String {
        let out = std::process::Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(cli_tls(self.tls))
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

/// `redis-cli` options for a TLS server.
fn cli_tls(tls: bool) -> Vec<String> {
    match tls {
        true => vec!["--tls".into(), "--cacert".into(), tls_fixture("redis-ca.pem").to_str().unwrap().into()],
        false => Vec::new(),
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Redis {
    /// `kill -9`: no chance to flush or hand over anything.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

/// Poll `cond` every 50 ms for at most `limit` (for Redis states that have
/// no event to wait on: replication links, cluster state, Sentinel views).
pub async fn poll_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = tokio::time::Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if tokio::time::Instant::now() >= end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A Redis Cluster of real `redis-server`s: `primaries` primaries with
/// `replicas` replicas each, made by `redis-cli --cluster create`.
pub struct RedisCluster {
    pub nodes: Vec<Redis>,
}

impl RedisCluster {
    pub async fn start(primaries: usize, replicas: usize, extra: &[&str]) -> RedisCluster {
        Self::start_with(primaries, replicas, extra, false).await
    }

    /// TLS only, the cluster bus and replication too (`tls-cluster yes`).
    pub async fn start_tls(primaries: usize, replicas: usize, extra: &[&str]) -> RedisCluster {
        let mut args = vec!["--tls-cluster", "yes", "--tls-replication", "yes"];
        args.extend_from_slice(extra);
        Self::start_with(primaries, replicas, &args, true).await
    }

    async fn start_with(primaries: usize, replicas: usize, extra: &[&str], tls: bool) -> RedisCluster {
        let mut args = vec!["--cluster-enabled", "yes", "--cluster-node-timeout", "1000"];
        args.extend_from_slice(extra);
        let start = |_| if tls { Redis::start_tls(&args) } else { Redis::start(&args) };
        let nodes: Vec<Redis> = (0..primaries * (1 + replicas)).map(start).collect();
        let addrs: Vec<String> = nodes.iter().map(Redis::addr).collect();
        // Bounded: `--cluster create` waits forever for nodes whose cluster
        // bus cannot connect (e.g. a TLS certificate refused there).
        let out = std::process::Command::new("timeout")
            .args(["60", "redis-cli"])
            .args(cli_tls(tls))
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
        let c = RedisCluster { nodes };
        let ok = poll_until(Duration::from_secs(20), || {
            c.nodes.iter().all(|n| n.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok"))
                && c.nodes.iter().filter(|n| n.role() == "slave").all(|n| {
                    let info = n.cli(&["INFO", "replication"]);
                    info.contains("master_link_status:up")
                })
                && c.nodes.iter().filter(|n| n.role() == "slave").count() == primaries * replicas
        })
        .await;
        assert!(ok, "cluster up with its replicas linked");
        c
    }

    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(Redis::url).collect()
    }

    /// Index of the node serving `key`'s slot as primary.
    pub fn owner(&self, key: &str) -> Option<usize> {
        let slot: u16 = self.nodes.iter().find_map(|n| n.cli(&["CLUSTER", "KEYSLOT", key]).parse().ok())?;
        self.nodes.iter().position(|n| n.role() == "master" && owns(n, slot))
    }
}

fn owns(n: &Redis, slot: u16) -> bool {
    // `CLUSTER NODES`: the line with `myself` lists the slot ranges it serves.
    let nodes = n.cli(&["CLUSTER", "NODES"]);
    let Some(me) = nodes.lines().find(|l| l.contains("myself")) else { return false };
    me.split_whitespace().skip(8).any(|r| {
        let (lo, hi) = r.split_once('-').unwrap_or((r, r));
        match (lo.parse::<u16>(), hi.parse::<u16>()) {
            (Ok(lo), Ok(hi)) => (lo..=hi).contains(&slot),
            _ => false,
        }
    })
}

impl Redis {
    /// `master` or `slave` (first line of `ROLE`).
    pub fn role(&self) -> String {
        self.cli(&["ROLE"]).lines().next().unwrap_or_default().to_string()
    }
}

/// A Redis Sentinel process watching one primary, killed on drop. Its
/// `+switch-master` log lines arrive on `switched`.
pub struct SentinelProc {
    child: std::process::Child,
    pub port: u16,
    /// TLS only, to clients and to the Redis it watches.
    pub tls: bool,
    dir: std::path::PathBuf,
    pub switched: tokio::sync::mpsc::UnboundedReceiver<String>,
}

impl SentinelProc {
    /// Watch `primary_port` as `name` (quorum 2) with fast failure
    /// detection; runs `redis-server <conf> --sentinel`.
    pub fn start(name: &str, primary_port: u16, down_after_ms: u64) -> SentinelProc {
        Self::start_with(name, primary_port, down_after_ms, false)
    }

    /// TLS only (fixtures as [`Redis::start_tls`]), watching a TLS Redis.
    pub fn start_tls(name: &str, primary_port: u16, down_after_ms: u64) -> SentinelProc {
        Self::start_with(name, primary_port, down_after_ms, true)
    }

    fn start_with(name: &str, primary_port: u16, down_after_ms: u64, tls: bool) -> SentinelProc {
        use std::io::{BufRead, BufReader};
        use std::process::{Command, Stdio};
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("ferry-sentinel-{}-{port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let conf = dir.join("sentinel.conf");
        let file = |name| tls_fixture(name).display().to_string();
        let listen = match tls {
            true => format!(
                "port 0\ntls-port {port}\ntls-cert-file {}\ntls-key-file {}\ntls-ca-cert-file {}\n\
                 tls-auth-clients no\ntls-replication yes\n",
                file("redis.pem"),
                file("redis.key"),
                file("redis-ca.pem")
            ),
            false => format!("port {port}\n"),
        };
        std::fs::write(
            &conf,
            format!(
                "{listen}bind 127.0.0.1\ndir {}\n\
                 sentinel monitor {name} 127.0.0.1 {primary_port} 2\n\
                 sentinel down-after-milliseconds {name} {down_after_ms}\n\
                 sentinel failover-timeout {name} 3000\n\
                 sentinel parallel-syncs {name} 2\n",
                dir.display()
            ),
        )
        .unwrap();
        let mut child = Command::new("redis-server")
            .arg(&conf)
            .arg("--sentinel")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("redis-server --sentinel");
        let out = child.stdout.take().unwrap();
        let mut lines = BufReader::new(out).lines();
        let mut ready = false;
        for _ in 0..200 {
            match lines.next() {
                Some(Ok(l)) if l.contains("+monitor") => {
                    ready = true;
                    break;
                }
                Some(Ok(_)) => {}
                _ => break,
            }
        }
        assert!(ready, "sentinel on port {port} did not start");
        let (tx, switched) = tokio::sync::mpsc::unbounded_channel();
        std::thread::spawn(move || {
            let echo = std::env::var_os("FERRY_TEST_SENTINEL_LOG").is_some();
            for l in lines.map_while(Result::ok) {
                if echo {
                    println!("[sentinel {port}] {l}");
                }
                if l.contains("+switch-master") {
                    let _ = tx.send(l);
                }
            }
        });
        SentinelProc { child, port, tls, dir, switched }
    }

    pub fn url(&self) -> String {
        format!("{}://127.0.0.1:{}/", if self.tls { "rediss" } else { "redis" }, self.port)
    }

    pub fn cli(&self, args: &[&str]) -> String {
        let out = std::process::Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(cli_tls(self.tls))
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

impl Drop for SentinelProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `redis-cli -p <port> <args>`: stdout, trimmed (for steps run off the
/// async runtime, which own no `Redis`).
pub fn cli_at(port: u16, args: &[&str]) -> String {
    let out = std::process::Command::new("redis-cli").args(["-p", &port.to_string()]).args(args).output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A live migration of one hash slot from one Cluster primary to another,
/// made of the real commands (the steps `redis-cli --cluster reshard`
/// takes): `CLUSTER SETSLOT <slot> IMPORTING` on the target, `MIGRATING` on
/// the source, `MIGRATE ... KEYS ...` in batches until the source has no
/// key of the slot left, then `CLUSTER SETSLOT <slot> NODE <target>` on the
/// target, the source and every other primary.
#[derive(Clone, Debug)]
pub struct SlotMigration {
    pub slot: u16,
    pub from_port: u16,
    pub from_id: String,
    pub to_port: u16,
    pub to_id: String,
    /// The other primaries (told the new owner last).
    pub others: Vec<u16>,
}

impl RedisCluster {
    /// The slot of `key` (`CLUSTER KEYSLOT`).
    pub fn slot_of(&self, key: &str) -> u16 {
        self.nodes[0].cli(&["CLUSTER", "KEYSLOT", key]).parse().expect("CLUSTER KEYSLOT")
    }

    /// A migration of `slot` from primary `from` to primary `to`.
    pub fn slot_migration(&self, slot: u16, from: usize, to: usize) -> SlotMigration {
        let id = |i: usize| self.nodes[i].cli(&["CLUSTER", "MYID"]);
        SlotMigration {
            slot,
            from_port: self.nodes[from].port,
            from_id: id(from),
            to_port: self.nodes[to].port,
            to_id: id(to),
            others: (0..self.nodes.len())
                .filter(|i| *i != from && *i != to && self.nodes[*i].role() == "master")
                .map(|i| self.nodes[i].port)
                .collect(),
        }
    }
}

impl SlotMigration {
    /// Open the migration: the target imports, the source migrates.
    pub fn begin(&self) {
        let slot = self.slot.to_string();
        let r = cli_at(self.to_port, &["CLUSTER", "SETSLOT", &slot, "IMPORTING", &self.from_id]);
        assert_eq!(r, "OK", "IMPORTING on the target");
        let r = cli_at(self.from_port, &["CLUSTER", "SETSLOT", &slot, "MIGRATING", &self.to_id]);
        assert_eq!(r, "OK", "MIGRATING on the source");
    }

    /// Move every key of the slot, `batch` keys per `MIGRATE`; returns how
    /// many moved. Bounded: the slot takes no new key while it migrates
    /// (multi-key writes get `TRYAGAIN`), and the loop stops after 10,000
    /// rounds anyway.
    pub fn move_keys(&self, batch: usize) -> usize {
        let slot = self.slot.to_string();
        let (n, to_port) = (batch.to_string(), self.to_port.to_string());
        let mut moved = 0;
        for _ in 0..10_000 {
            let keys = cli_at(self.from_port, &["CLUSTER", "GETKEYSINSLOT", &slot, &n]);
            let keys: Vec<&str> = keys.lines().filter(|l| !l.is_empty()).collect();
            if keys.is_empty() {
                return moved;
            }
            let mut args = vec!["MIGRATE", "127.0.0.1", to_port.as_str(), "", "0", "5000", "KEYS"];
            args.extend(&keys);
            let r = cli_at(self.from_port, &args);
            assert!(r == "OK" || r == "NOKEY", "MIGRATE: {r}");
            moved += keys.len();
        }
        panic!("slot {} still has keys after 10,000 rounds", self.slot);
    }

    /// Move one key of the slot (to leave the slot half-moved).
    pub fn move_key(&self, key: &str) {
        let r = cli_at(self.from_port, &["MIGRATE", "127.0.0.1", &self.to_port.to_string(), key, "0", "5000"]);
        assert_eq!(r, "OK", "MIGRATE {key}");
    }

    /// Close the migration: the target owns the slot, as every primary is told.
    pub fn finish(&self) {
        let slot = self.slot.to_string();
        for port in [self.to_port, self.from_port].iter().chain(&self.others) {
            let r = cli_at(*port, &["CLUSTER", "SETSLOT", &slot, "NODE", &self.to_id]);
            assert_eq!(r, "OK", "SETSLOT NODE on {port}");
        }
    }
}

/// How many times the node at `port` answered `TRYAGAIN` (`INFO errorstats`).
pub fn tryagain_count(port: u16) -> u64 {
    cli_at(port, &["INFO", "errorstats"])
        .lines()
        .find_map(|l| l.strip_prefix("errorstat_TRYAGAIN:count="))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// A webhook receiver that accepts every call; `notify` fires after each.
pub async fn hook_receiver(
) -> (String, std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>, std::sync::Arc<tokio::sync::Notify>) {
    use std::sync::{Arc, Mutex};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://127.0.0.1:{}/hooks", l.local_addr().unwrap().port());
    let got: Arc<Mutex<Vec<serde_json::Value>>> = Arc::default();
    let notify = Arc::new(tokio::sync::Notify::new());
    let (g, n) = (got.clone(), notify.clone());
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let (g, n) = (g.clone(), n.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let body = loop {
                    let k = s.read(&mut chunk).await.unwrap_or(0);
                    if k == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..k]);
                    let text = String::from_utf8_lossy(&buf).to_string();
                    if let Some((h, b)) = text.split_once("\r\n\r\n") {
                        let len: usize = h
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length: ")
                                    .map(|v| v.trim().parse().unwrap())
                            })
                            .unwrap_or(0);
                        if b.len() >= len {
                            break b[..len].to_string();
                        }
                    }
                };
                g.lock().unwrap().push(serde_json::from_str(&body).unwrap());
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").await;
                let _ = s.shutdown().await;
                n.notify_waiters();
            });
        }
    });
    (url, got, notify)
}

/// The nodes' logs (info by default, `FERRY_LOG` to change), captured by
/// the test harness: printed when a test fails (and with `--nocapture`).
pub fn logs() {
    let f = tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("ferry_server=info"));
    let _ = tracing_subscriber::fmt().with_env_filter(f).with_test_writer().try_init();
}

/// The saved state of a device that was subscribed to `channel` at QoS 1
/// and had surfaced up to (`epoch`, `offset`).
pub fn saved_at(channel: &str, epoch: &str, offset: u64) -> ferry_core::client::Snapshot {
    ferry_core::client::Snapshot {
        subs: vec![ferry_core::client::SubRecord {
            channel: channel.into(),
            qos: ferry_core::frame::Qos::AtLeastOnce,
            position: Some(ferry_core::frame::StreamPosition { epoch: epoch.into(), offset }),
            seen: vec![],
        }],
        seen_cap: 1024,
        ..Default::default()
    }
}

/// A `/metrics` text with the `node` label (on every `ferry_*` sample)
/// taken out, so a test can look for `ferry_connections 1` or
/// `ferry_deliveries_total{qos="1"} 1` whatever the node is called.
pub fn without_node_label(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        match line.find("{node=\"") {
            Some(i) if !line.starts_with('#') => {
                // The value ends at the first quote not escaped.
                let rest = &line[i + 7..];
                let mut end = None;
                let mut escaped = false;
                for (j, ch) in rest.char_indices() {
                    match ch {
                        '\\' if !escaped => escaped = true,
                        '"' if !escaped => {
                            end = Some(j);
                            break;
                        }
                        _ => escaped = false,
                    }
                }
                let after = &rest[end.map_or(rest.len(), |e| e + 1)..];
                out.push_str(&line[..i]);
                match after.strip_prefix(',') {
                    Some(more) => {
                        out.push('{');
                        out.push_str(more);
                    }
                    None => out.push_str(after.strip_prefix('}').unwrap_or(after)),
                }
            }
            _ => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// The raw HTTP/1.1 response (status line, headers, body) to a GET.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

/// Connect with a token; the close code if refused, None if connected.
pub async fn try_token(url: &str, token: &str) -> Option<u16> {
    let mut c = TestClient::new(url, TestClient::config("d", token, Encoding::Json));
    c.connect().await;
    let done = c
        .run_until(Duration::from_secs(20), |c| {
            c.session.is_connected() || c.events.iter().any(|e| matches!(e, Event::Disconnected { .. }))
        })
        .await;
    assert!(done);
    c.events.iter().find_map(|e| if let Event::Disconnected { code, .. } = e { Some(*code) } else { None })
}
