//! The real `ferry` binary as a child process: start on an ephemeral or a
//! given loopback port, `kill -9`, restart on the same port.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// How long a fresh server may take to print its address.
const STARTUP: Duration = Duration::from_secs(15);
/// Attempts to rebind a port after a kill (the old socket may linger briefly).
const REBIND_ATTEMPTS: u32 = 50;

/// The `ferry` binary: `$FERRY_BIN`, else `ferry` in the target directory
/// holding this test executable (`target/<profile>/deps/<test>` →
/// `target/<profile>/ferry`), which `cargo test --workspace` builds.
pub fn ferry_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("FERRY_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("path of the test executable");
    let profile_dir = exe.parent().and_then(Path::parent).expect("test executable inside target/<profile>/deps");
    let bin = profile_dir.join(format!("ferry{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.exists(),
        "{} does not exist: build the server first with `cargo build -p ferry-server --bin ferry` \
         (`cargo test --workspace` does it), or point FERRY_BIN at a ferry binary",
        bin.display()
    );
    warn_if_stale(&bin);
    bin
}

/// `cargo test -p ferry-e2e` alone does not rebuild the server binary, so
/// say so when a source it was built from (listed in cargo's dep-info file
/// next to it) changed since.
fn warn_if_stale(bin: &Path) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let Ok(built) = bin.metadata().and_then(|m| m.modified()) else { return };
        let Ok(deps) = std::fs::read_to_string(bin.with_extension("d")) else { return };
        let sources = deps.split_once(": ").map(|(_, rest)| rest).unwrap_or("");
        let changed = sources
            .split_whitespace()
            .find(|src| std::fs::metadata(src).and_then(|m| m.modified()).is_ok_and(|t| t > built));
        if let Some(src) = changed {
            eprintln!(
                "warning: {src} changed after {} was built; run `cargo build -p ferry-server --bin ferry`",
                bin.display()
            );
        }
    });
}

/// A fresh directory under the system temp dir. Removed on drop, except
/// when the test is failing, so its data can be inspected.
pub struct TempDir(PathBuf);

impl TempDir {
    /// Create `ferry-e2e-<tag>-<pid>-<n>`.
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "ferry-e2e-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("kept {} for inspection", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// A loopback address with a port that was free a moment ago; for a
/// server that must come back on the same address, or a client that must
/// find nothing there yet.
pub fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().expect("local address")
}

/// Admission limits off: every client here connects from 127.0.0.1, many
/// through one proxy, and these tests are about faults. (A rate-limited
/// publish is retried a second later and stored after later ones, which
/// PROTOCOL.md 7.5 allows but which would blur the order checks.)
const NO_ADMISSION_LIMITS: &str = "publish_rate = 0\nmax_connections_per_user = 0\nconnections_per_ip_per_minute = 0\n";

/// Server settings written to the TOML file passed with `--config`.
#[derive(Clone, Debug)]
pub struct Settings {
    /// `limits.ping_interval_ms`.
    pub ping_ms: u64,
    /// `limits.pong_timeout_ms`.
    pub pong_ms: u64,
    /// `presence_grace_ms`.
    pub grace_ms: u64,
    /// `history_size` of every namespace: large, so that a test about
    /// faults never meets retention.
    pub history_size: usize,
    /// Namespaces (channel prefixes) with `join_leave = true`.
    pub join_leave: Vec<String>,
    /// `auth.hmac_secret`: HS256 tokens (with `exp`, no leeway) instead of
    /// development auth, where the token is the user id.
    pub hmac_secret: Option<String>,
    /// `personal_publish` in `[namespaces.user]`: clients may publish into
    /// other users' `#user:<id>` (off by default, as in the server).
    pub personal_publish: bool,
    /// `[redis] urls`: the node keeps its streams in this Redis, shared
    /// with every node given the same one (docs/CLUSTER.md).
    pub redis: Option<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            ping_ms: 1000,
            pong_ms: 1000,
            grace_ms: 1000,
            history_size: 100_000,
            join_leave: Vec::new(),
            hmac_secret: None,
            personal_publish: false,
            redis: None,
        }
    }
}

impl Settings {
    /// The TOML text.
    pub fn toml(&self) -> String {
        let mut t = format!(
            "presence_grace_ms = {}\n\n[limits]\nping_interval_ms = {}\npong_timeout_ms = {}\n{}\n\
             [namespaces.default]\nhistory_size = {}\n",
            self.grace_ms, self.ping_ms, self.pong_ms, NO_ADMISSION_LIMITS, self.history_size
        );
        if let Some(secret) = &self.hmac_secret {
            t.push_str(&format!("\n[auth]\nhmac_secret = {secret:?}\nleeway_secs = 0\n"));
        }
        if self.personal_publish {
            t.push_str(&format!(
                "\n[namespaces.user]\nhistory_size = {}\npersonal_publish = true\n",
                self.history_size
            ));
        }
        if let Some(url) = &self.redis {
            t.push_str(&format!("\n[redis]\nurls = [{url:?}]\n"));
        }
        for ns in &self.join_leave {
            t.push_str(&format!("\n[namespaces.{ns}]\nhistory_size = {}\njoin_leave = true\n", self.history_size));
        }
        t
    }
}

/// A `ferry serve` child process. Killed (SIGKILL) on drop.
pub struct FerryServer {
    child: Option<Child>,
    addr: SocketAddr,
    config: PathBuf,
    data: PathBuf,
    _dir: TempDir,
}

impl FerryServer {
    /// Start on an ephemeral loopback port with a fresh data directory.
    pub async fn start(settings: &Settings) -> FerryServer {
        Self::start_at("127.0.0.1:0".parse().expect("address"), settings).await
    }

    /// Start on `addr` (port 0 = ephemeral) with a fresh data directory.
    pub async fn start_at(addr: SocketAddr, settings: &Settings) -> FerryServer {
        let dir = TempDir::new("server");
        let config = dir.path().join("ferry.toml");
        std::fs::write(&config, settings.toml()).expect("write config");
        let data = dir.path().join("data");
        let mut srv = FerryServer { child: None, addr, config, data, _dir: dir };
        srv.launch().await;
        srv
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its WebSocket URL.
    pub fn url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// `kill -9`: no shutdown, no flush, no close frames.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, as systemd or `docker stop` sends it, and wait (at most
    /// `limit`) for the exit; the exit status, none if it did not exit in
    /// time (then it is killed).
    pub async fn terminate(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        let sent = Command::new("kill").args(["-TERM", &c.id().to_string()]).status().expect("kill -TERM");
        assert!(sent.success(), "kill -TERM");
        let end = std::time::Instant::now() + limit;
        loop {
            if let Some(status) = c.try_wait().expect("wait") {
                return Some(status);
            }
            if std::time::Instant::now() >= end {
                let _ = c.kill();
                let _ = c.wait();
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Start again (after [`FerryServer::terminate`] or
    /// [`FerryServer::kill9`]) on the same address and data.
    pub async fn start_again(&mut self) {
        self.launch().await;
    }

    /// Kill (if running) and start again on the same address and data.
    pub async fn restart(&mut self) {
        self.kill9();
        self.launch().await;
    }

    async fn launch(&mut self) {
        let bin = ferry_bin();
        let mut last = String::new();
        for _ in 0..REBIND_ATTEMPTS {
            match spawn(&bin, &self.config, &self.data, self.addr).await {
                Ok((child, addr)) => {
                    self.child = Some(child);
                    self.addr = addr;
                    return;
                }
                Err(e) => last = e,
            }
            // Only a port still held by the killed process gets here; give
            // the kernel a moment to release it.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("ferry did not start on {}: {last}", self.addr);
    }
}

impl Drop for FerryServer {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Spawn `ferry serve` and read the address from its first stdout line.
async fn spawn(bin: &Path, config: &Path, data: &Path, listen: SocketAddr) -> Result<(Child, SocketAddr), String> {
    let mut cmd = Command::new(bin);
    // The server reads FERRY_* variables as configuration: only the file
    // passed here may configure it (FERRY_LOG, the log level, excepted).
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("FERRY_") && name != "FERRY_LOG" {
            cmd.env_remove(name);
        }
    }
    let mut child = cmd
        .arg("serve")
        .arg("--config")
        .arg(config)
        .arg("--listen")
        .arg(listen.to_string())
        .arg("--data-dir")
        .arg(data)
        .env("FERRY_LOG", std::env::var("FERRY_LOG").unwrap_or_else(|_| "warn".into()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("spawn {}: {e}", bin.display()))?;
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = tokio::sync::oneshot::channel();
    // A plain thread: the pipe is blocking, and it keeps draining so the
    // server never writes into a full or closed pipe.
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        let first = reader.read_line(&mut line).map(|_| line.clone());
        let _ = tx.send(first);
        let mut sink = String::new();
        while reader.read_line(&mut sink).map(|n| n > 0).unwrap_or(false) {
            sink.clear();
        }
    });
    let line = match tokio::time::timeout(STARTUP, rx).await {
        Ok(Ok(Ok(line))) => line,
        other => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("no startup line: {other:?}"));
        }
    };
    let addr = line.split("ws://").nth(1).and_then(|r| r.split('/').next()).and_then(|a| a.parse().ok());
    match addr {
        Some(a) => Ok((child, a)),
        None => {
            // Typically "cannot listen": the process exits without a line.
            let _ = child.kill();
            let status = child.wait().ok();
            Err(format!("startup line {line:?}, exit {status:?}"))
        }
    }
}

/// A private `redis-server` on a free loopback port. Killed on drop.
pub struct RedisServer {
    child: Child,
    port: u16,
    persistent: bool,
    dir: TempDir,
}

impl RedisServer {
    /// Start one without persistence and wait until it accepts connections.
    pub fn start() -> RedisServer {
        Self::spawn(free_addr().port(), false, TempDir::new("redis"))
    }

    /// Start one that fsyncs its append-only file on every write
    /// (`appendfsync always`), so a kill -9 loses nothing it acknowledged.
    pub fn start_persistent() -> RedisServer {
        Self::spawn(free_addr().port(), true, TempDir::new("redis"))
    }

    fn spawn(port: u16, persistent: bool, dir: TempDir) -> RedisServer {
        use std::io::{BufRead, BufReader};
        let persistence: &[&str] = if persistent {
            &["--save", "", "--appendonly", "yes", "--appendfsync", "always"]
        } else {
            &["--save", "", "--appendonly", "no"]
        };
        let mut child = std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(persistence)
            .arg("--dir")
            .arg(dir.path())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("redis-server is installed (scripts/test-all.sh installs it)");
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        // Bounded by the lines it prints before it is ready.
        let ready = (0..200).any(|_| matches!(lines.next(), Some(Ok(l)) if l.contains("Ready to accept connections")));
        assert!(ready, "redis-server on port {port} did not start");
        std::thread::spawn(move || for _ in lines {});
        RedisServer { child, port, persistent, dir }
    }

    /// SIGKILL, keeping its files.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Start again on the same port over the same files.
    pub fn restart(&mut self) {
        self.kill9();
        let dir = std::mem::replace(&mut self.dir, TempDir::new("redis-unused"));
        *self = Self::spawn(self.port, self.persistent, dir);
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// The address it listens on (for a fault proxy in front of it).
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
