//! Redis Sentinel: the configured URLs are Sentinels; they name the
//! primary of `[redis] sentinel_master`, and the node follows failovers.
//!
//! Design: one task owns the discovery. Anything that suggests the primary
//! changed kicks it: a command that failed on the connection (I/O, timeout,
//! `READONLY` from a demoted primary), the fan-out link to the primary
//! dropping, or a Sentinel's `+switch-master` event. It asks the Sentinels
//! for the primary's address, connects, and checks `ROLE` says `master`
//! before commands go there; until then commands answer "unavailable"
//! (115) at once, which the clients' outboxes retry. Every change is
//! announced on a watch, so fan-out resubscribes on the new primary and
//! catches up.

use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::MultiplexedConnection;
use redis::ConnectionInfo;
use tokio::sync::{watch, Notify};

use super::pubsub::NodeAddr;
use super::tls::RedisTls;
use super::EngineError;

/// How long one Sentinel or primary may take to connect or answer.
const ASK_TIMEOUT: Duration = Duration::from_secs(2);
/// Between checks while the node is healthy (a safety net: the events
/// above normally arrive first).
const CHECK_EVERY: Duration = Duration::from_secs(5);

#[derive(Clone)]
struct Primary {
    addr: NodeAddr,
    conn: MultiplexedConnection,
    /// The publisher's own connection (see `RedisStreams::publish`).
    publisher: MultiplexedConnection,
}

/// The node's view of a Sentinel-managed primary.
pub struct SentinelLink {
    sentinels: Vec<ConnectionInfo>,
    /// With `rediss://`: for the Sentinels and the primary alike.
    tls: Option<Arc<RedisTls>>,
    master: String,
    current: RwLock<Option<Primary>>,
    changed: watch::Sender<u64>,
    kick: Notify,
}

fn timeout_error() -> redis::RedisError {
    redis::RedisError::from((redis::ErrorKind::Io, "timed out"))
}

async fn connect(info: ConnectionInfo, tls: Option<&RedisTls>) -> redis::RedisResult<MultiplexedConnection> {
    let cfg = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(ASK_TIMEOUT))
        .set_response_timeout(Some(Duration::from_secs(5)));
    super::tls::client(info, tls)?.get_multiplexed_async_connection_with_config(&cfg).await
}

impl SentinelLink {
    /// Ask the `sentinels` for `master` and connect to it; the returned
    /// link keeps following it (a task that ends when the link is dropped).
    pub async fn connect(
        sentinels: Vec<ConnectionInfo>,
        master: &str,
        tls: Option<Arc<RedisTls>>,
    ) -> Result<Arc<SentinelLink>, EngineError> {
        if sentinels.is_empty() {
            return Err(EngineError::Unavailable("no Sentinel URL".into()));
        }
        let link = Arc::new(SentinelLink {
            sentinels,
            tls,
            master: master.to_string(),
            current: RwLock::new(None),
            changed: watch::Sender::new(0),
            kick: Notify::new(),
        });
        link.discover().await?;
        tokio::spawn(watch_primary(Arc::downgrade(&link)));
        Ok(link)
    }

    /// The connection to the primary, or unavailable while it is unknown.
    pub fn conn(&self) -> Result<MultiplexedConnection, EngineError> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).as_ref().map(|p| p.conn.clone()).ok_or_else(|| {
            EngineError::Unavailable(format!("no primary for {:?} yet (Sentinel failover in progress?)", self.master))
        })
    }

    /// The publisher's own connection to the current primary.
    pub fn publisher(&self) -> Result<MultiplexedConnection, EngineError> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).as_ref().map(|p| p.publisher.clone()).ok_or_else(|| {
            EngineError::Unavailable(format!("no primary for {:?} yet (Sentinel failover in progress?)", self.master))
        })
    }

    /// The primary's address, while one is known.
    pub fn primary(&self) -> Option<NodeAddr> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).as_ref().map(|p| p.addr.clone())
    }

    /// The connection settings (credentials, database, TLS) for `addr`.
    pub fn info_for(&self, addr: &NodeAddr) -> ConnectionInfo {
        super::tls::at(&self.sentinels[0], addr)
    }

    /// Changes whenever the primary (or the connection to it) changes.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// A command failed with `e`: if that may mean the primary moved or
    /// died, have the Sentinels asked again.
    pub fn failed(&self, e: &redis::RedisError) {
        let moved = matches!(e.code(), Some("READONLY" | "MASTERDOWN" | "LOADING"));
        if moved || e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_connection_refusal() {
            self.suspect();
        }
    }

    /// Ask the Sentinels again (the fan-out link to the primary dropped).
    pub fn suspect(&self) {
        self.kick.notify_one();
    }

    /// The primary's address according to the first Sentinel that knows.
    async fn ask(&self) -> Result<NodeAddr, EngineError> {
        let mut why = String::from("no Sentinel answered");
        for s in &self.sentinels {
            let asked = async {
                let mut c = connect(s.clone(), self.tls.as_deref()).await?;
                let mut cmd = redis::cmd("SENTINEL");
                cmd.arg("get-master-addr-by-name").arg(&self.master);
                let r: Option<(String, u16)> =
                    tokio::time::timeout(ASK_TIMEOUT, cmd.query_async(&mut c)).await.map_err(|_| timeout_error())??;
                Ok::<_, redis::RedisError>(r)
            };
            match asked.await {
                Ok(Some((host, port))) => return Ok(NodeAddr { host, port }),
                Ok(None) => why = format!("the Sentinels do not know a master named {:?}", self.master),
                Err(e) => why = super::tls::explain(&format!("Sentinel {}: {e}", s.addr())),
            }
        }
        Err(EngineError::Unavailable(why))
    }

    /// Find the primary and make it current. Keeps a working connection to
    /// the same primary; returns whether a primary is in place.
    async fn discover(&self) -> Result<(), EngineError> {
        let addr = match self.ask().await {
            Ok(a) => a,
            Err(e) => {
                self.set(None);
                return Err(e);
            }
        };
        let same = self.current.read().unwrap_or_else(|p| p.into_inner()).clone().filter(|p| p.addr == addr);
        if let Some(mut p) = same {
            if is_master(&mut p.conn).await.unwrap_or(false) {
                return Ok(());
            }
        }
        let checked = async {
            let mut conn = connect(self.info_for(&addr), self.tls.as_deref()).await?;
            let master = is_master(&mut conn).await?;
            let publisher = connect(self.info_for(&addr), self.tls.as_deref()).await?;
            Ok::<_, redis::RedisError>(((conn, publisher), master))
        };
        match checked.await {
            Ok(((conn, publisher), true)) => {
                tracing::info!(primary = %addr, master = %self.master, "Redis primary (from Sentinel)");
                self.set(Some(Primary { addr, conn, publisher }));
                Ok(())
            }
            Ok((_, false)) => {
                self.set(None);
                Err(EngineError::Unavailable(format!("{addr} is not a primary yet (failover in progress)")))
            }
            Err(e) => {
                self.set(None);
                Err(EngineError::Unavailable(super::tls::explain(&format!("primary {addr}: {e}"))))
            }
        }
    }

    fn set(&self, p: Option<Primary>) {
        let mut cur = self.current.write().unwrap_or_else(|p| p.into_inner());
        let was = cur.as_ref().map(|p| p.addr.clone());
        let now = p.as_ref().map(|p| p.addr.clone());
        let fresh = p.is_some();
        *cur = p;
        drop(cur);
        // A new connection, even to the same address, is news: fan-out's
        // link may have missed messages meanwhile.
        if was != now || fresh {
            self.changed.send_modify(|g| *g += 1);
        }
    }
}

async fn is_master(c: &mut MultiplexedConnection) -> redis::RedisResult<bool> {
    let role: Vec<redis::Value> =
        tokio::time::timeout(ASK_TIMEOUT, redis::cmd("ROLE").query_async(c)).await.map_err(|_| timeout_error())??;
    Ok(matches!(role.first(), Some(redis::Value::BulkString(b)) if b == b"master"))
}

/// `+switch-master` events from one of the Sentinels.
async fn switch_events(sentinels: &[ConnectionInfo], tls: Option<&RedisTls>) -> Option<redis::aio::PubSubStream> {
    for s in sentinels {
        let opened = async {
            let mut ps = super::tls::client(s.clone(), tls)?.get_async_pubsub().await?;
            ps.subscribe("+switch-master").await?;
            Ok::<_, redis::RedisError>(ps.into_on_message())
        };
        if let Ok(Ok(stream)) = tokio::time::timeout(ASK_TIMEOUT, opened).await {
            return Some(stream);
        }
    }
    None
}

async fn watch_primary(link: Weak<SentinelLink>) {
    let mut events: Option<redis::aio::PubSubStream> = None;
    let mut healthy = true;
    let mut delay = Duration::from_millis(100);
    loop {
        let Some(l) = link.upgrade() else { return };
        if events.is_none() {
            events = switch_events(&l.sentinels, l.tls.as_deref()).await;
        }
        if healthy {
            delay = Duration::from_millis(100);
            let kicked = l.kick.notified();
            let ended = tokio::select! {
                _ = kicked => false,
                m = async {
                    match events.as_mut() {
                        Some(s) => s.next().await,
                        None => std::future::pending().await,
                    }
                } => m.is_none(),
                _ = tokio::time::sleep(CHECK_EVERY) => false,
            };
            if ended {
                events = None;
            }
        } else {
            // Between attempts while no primary answers (Sentinel has not
            // promoted a replica yet); bounded backoff.
            drop(l);
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(500));
            let Some(l2) = link.upgrade() else { return };
            healthy = l2.discover().await.is_ok();
            continue;
        }
        healthy = match l.discover().await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!("Redis Sentinel: {e}; retrying");
                false
            }
        };
    }
}
