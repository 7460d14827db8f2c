//! The servers under test, each started by the generator as a child
//! process pinned to its own CPU with `taskset`, on loopback, with a
//! private config and data directory; killed on drop.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

/// Which server a measurement is against.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// `ferry serve`, embedded store.
    Ferry,
    /// `nats-server` with its WebSocket listener.
    Nats,
}

impl Kind {
    /// Display name.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Ferry => "Ferry",
            Kind::Nats => "NATS",
        }
    }
}

/// Ferry's config: the embedded store (the data dir), anonymous access
/// (development auth: an empty token is an anonymous user), and the
/// admission limits off, because every generator connection comes from
/// 127.0.0.1 and a single publisher connection sends thousands of msg/s.
/// Everything else stays at its default.
pub fn ferry_config(data_dir: &Path) -> String {
    format!(
        "data_dir = {:?}\nallow_anonymous = true\n\n[limits]\npublish_rate = 0\n\
         connections_per_ip_per_minute = 0\nmax_connections_per_user = 0\n",
        data_dir.display().to_string()
    )
}

/// NATS's config: a client port (required) and the WebSocket listener
/// without TLS; defaults otherwise (slow-consumer limits included).
pub fn nats_config(client_port: u16, ws_port: u16) -> String {
    format!(
        "listen: \"127.0.0.1:{client_port}\"\nwebsocket {{\n  listen: \"127.0.0.1:{ws_port}\"\n  no_tls: true\n}}\n"
    )
}

/// A running server under test.
pub struct Server {
    /// Its WebSocket URL.
    pub url: String,
    child: Child,
    dir: PathBuf,
}

impl Server {
    /// The process id (of the server itself: `taskset` execs it).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Start `kind` pinned to `cpus` (a `taskset -c` list: "0", "0,2").
    pub fn start(kind: Kind, bins: &Bins, cpus: &str) -> anyhow::Result<Server> {
        let dir = std::env::temp_dir().join(format!("ferry-wsload-{}-{}", std::process::id(), unique()));
        std::fs::create_dir_all(&dir)?;
        let log = std::fs::File::create(dir.join("server.log"))?;
        match kind {
            Kind::Ferry => {
                let cfg = dir.join("ferry.toml");
                std::fs::write(&cfg, ferry_config(&dir.join("data")))?;
                let mut child = Command::new("taskset")
                    .arg("-c")
                    .arg(cpus)
                    .arg(&bins.ferry)
                    .args(["serve", "--listen", "127.0.0.1:0", "--api-listen", "off", "--config"])
                    .arg(&cfg)
                    .env("FERRY_LOG", "warn")
                    .stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .stderr(log)
                    .spawn()
                    .with_context(|| format!("cannot start {}", bins.ferry.display()))?;
                // The first stdout line names the address.
                let stdout = child.stdout.take().context("ferry stdout")?;
                let mut lines = BufReader::new(stdout).lines();
                let first = lines.next().transpose()?.unwrap_or_default();
                // Keep draining so that the server never blocks on a full pipe.
                std::thread::spawn(move || for _ in lines.by_ref() {});
                let addr = first
                    .split("ws://")
                    .nth(1)
                    .and_then(|r| r.split('/').next())
                    .with_context(|| format!("ferry did not print its address (got {first:?}); see {}", dir.display()))?
                    .to_string();
                Ok(Server { url: format!("ws://{addr}/ws"), child, dir })
            }
            Kind::Nats => {
                let (client, ws) = (free_port()?, free_port()?);
                let cfg = dir.join("nats.conf");
                std::fs::write(&cfg, nats_config(client, ws))?;
                let child = Command::new("taskset")
                    .arg("-c")
                    .arg(cpus)
                    .arg(&bins.nats)
                    .arg("-c")
                    .arg(&cfg)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(log)
                    .spawn()
                    .with_context(|| format!("cannot start {}", bins.nats.display()))?;
                let srv = Server { url: format!("ws://127.0.0.1:{ws}/"), child, dir };
                wait_port(ws, Duration::from_secs(10)).with_context(|| {
                    format!("nats-server did not listen; see {}", srv.dir.join("server.log").display())
                })?;
                Ok(srv)
            }
        }
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Paths of the two server binaries.
#[derive(Clone, Debug)]
pub struct Bins {
    /// `ferry`.
    pub ferry: PathBuf,
    /// `nats-server`.
    pub nats: PathBuf,
}

impl Bins {
    /// Whether nats-server can be run.
    pub fn nats_available(&self) -> bool {
        Command::new(&self.nats).arg("--version").output().is_ok_and(|o| o.status.success())
    }
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// A loopback port that was free a moment ago.
fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn wait_port(port: u16, budget: Duration) -> anyhow::Result<()> {
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let end = Instant::now() + budget;
    while Instant::now() < end {
        if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    anyhow::bail!("port {port} not listening after {budget:?}")
}
