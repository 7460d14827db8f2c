//! # ferry-client
//!
//! The native Rust client for Ferry. A thin tokio driver of
//! `ferry_core::client::ClientSession`: one task per client owns the
//! session, moves bytes between it and a WebSocket, arms one timer, and
//! routes events to subscriptions and pending calls. Every protocol rule —
//! heartbeat, reconnect with backoff, outbox resend, acks, dedup, recovery —
//! lives in the core.
//!
//! ```no_run
//! # async fn demo() -> Result<(), ferry_client::Error> {
//! use ferry_client::{Client, Qos};
//! use futures_util::StreamExt;
//!
//! let client = Client::builder("ws://127.0.0.1:8000/ws").token("alice").device_id("laptop-1").build()?;
//! let mut room = client.subscribe("chat:lobby", Qos::ExactlyOnce).await?;
//! client.connect();
//! let ack = client.publish("chat:lobby", b"hello".to_vec(), Qos::ExactlyOnce).await?;
//! println!("stored at offset {}", ack.offset);
//! while let Some(event) = room.next().await {
//!     println!("{event:?}");
//! }
//! # Ok(()) }
//! ```
//!
//! **Several servers.** [`Client::builder_urls`] takes the URLs of several
//! nodes of one cluster. The client starts on one picked from its seed (so
//! many clients spread over the nodes), stays there while it works, and
//! after a failed attempt or a lost connection tries the next URL in the
//! list after the usual backoff; subscriptions recover by their offsets as
//! after any reconnect. A network change retries the current URL first.
//! The choice is made in `ferry-core`, so every Ferry SDK behaves the same
//! (PROTOCOL.md 9.2).

mod driver;
pub mod storage;

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use ferry_core::client::ClientConfig;
pub use ferry_core::client::{ConnectionState, GapReason, PublishError, Snapshot};
pub use ferry_core::codec::Encoding;
pub use ferry_core::frame::{ClientInfo, HistoryBound, HistoryRequest, Publication, Qos, StreamPosition};
use tokio::sync::{mpsc, oneshot, watch};

pub use storage::{FileStorage, MemoryStorage, Storage};

/// Client errors.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A publish failed (outbox full, expired, too large, rejected, ...).
    #[error(transparent)]
    Publish(#[from] PublishError),
    /// The server refused a command.
    #[error("server error {code}: {message}")]
    Server {
        /// Error code (see PROTOCOL.md).
        code: u16,
        /// Message.
        message: String,
        /// Whether retrying later may succeed.
        temporary: bool,
    },
    /// Not connected now (history, presence need a live connection).
    #[error("not connected")]
    NotConnected,
    /// The connection dropped before the answer came.
    #[error("connection lost before the answer")]
    ConnectionLost,
    /// The client was closed.
    #[error("client closed")]
    Closed,
    /// Durable storage failed.
    #[error("storage: {0}")]
    Storage(String),
    /// Bad configuration.
    #[error("configuration: {0}")]
    Config(String),
}

/// Why the last connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disconnect {
    /// Close code (see PROTOCOL.md 12.2).
    pub code: u16,
    /// Reason.
    pub reason: String,
    /// Whether the client reconnects by itself.
    pub reconnect: bool,
}

/// An acknowledged publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishAck {
    /// Message id (idempotency key).
    pub message_id: String,
    /// Stream epoch.
    pub epoch: String,
    /// Stored offset.
    pub offset: u64,
    /// The server had stored it before (a retry).
    pub duplicate: bool,
}

/// Something that happened on a subscription.
#[derive(Debug, Clone, PartialEq)]
pub enum SubscriptionEvent {
    /// A publication, in offset order, payload inflated.
    Publication(Publication),
    /// The subscription is live; `recovered` is false after a gap.
    Subscribed {
        /// Position delivery continues after.
        position: StreamPosition,
        /// Whether nothing was missed.
        recovered: bool,
    },
    /// Publications were missed and cannot be recovered.
    Gap {
        /// Last position seen before.
        from: Option<StreamPosition>,
        /// Position delivery resumes after.
        to: StreamPosition,
        /// Why.
        reason: GapReason,
    },
    /// Someone joined the channel.
    Join(ClientInfo),
    /// Someone left the channel.
    Leave(ClientInfo),
    /// The subscription ended (refused or ended by the server); the stream ends.
    Ended {
        /// Code.
        code: u16,
        /// Why.
        reason: String,
    },
}

/// Asynchronous token source, asked before expiry and after a token-expired close.
pub type TokenProvider = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<String, String>> + Send>> + Send + Sync>;

/// Builds a [`Client`].
pub struct ClientBuilder {
    urls: Vec<String>,
    cfg: ClientConfig,
    token_provider: Option<TokenProvider>,
    storage: Option<Arc<dyn Storage>>,
    storage_dir: Option<std::path::PathBuf>,
    seed: Option<u64>,
    extra_roots: Vec<u8>,
}

impl ClientBuilder {
    /// Connection token (signed by your backend; empty = anonymous).
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.cfg.token = token.into();
        self
    }
    /// An async token provider, called for refresh and after expiry.
    pub fn token_provider<F, Fut>(mut self, f: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<String, String>> + Send + 'static,
    {
        self.token_provider = Some(Arc::new(move || Box::pin(f())));
        self.cfg.refreshable = true;
        self
    }
    /// Stable id of this installation (required for offline delivery).
    pub fn device_id(mut self, id: impl Into<String>) -> Self {
        self.cfg.device_id = id.into();
        self
    }
    /// Wire encoding (binary by default).
    pub fn encoding(mut self, e: Encoding) -> Self {
        self.cfg.encoding = e;
        self
    }
    /// Offer payload compression (on by default).
    pub fn compression(mut self, on: bool) -> Self {
        self.cfg.compression = on;
        self
    }
    /// Compress own publishes from this many bytes up (at least the
    /// server's threshold).
    pub fn compression_threshold(mut self, bytes: u32) -> Self {
        self.cfg.compress_min = Some(bytes);
        self
    }
    /// Reconnect delays.
    pub fn backoff(mut self, min: Duration, max: Duration) -> Self {
        self.cfg.backoff_min = min;
        self.cfg.backoff_max = max;
        self
    }
    /// Outbox bounds: messages, bytes, and how long a publish may wait.
    pub fn outbox_limits(mut self, messages: usize, bytes: usize, ttl: Duration) -> Self {
        self.cfg.outbox_max_messages = messages;
        self.cfg.outbox_max_bytes = bytes;
        self.cfg.message_ttl = ttl;
        self
    }
    /// Deadline for a reply; past it the link counts as dead.
    pub fn request_timeout(mut self, t: Duration) -> Self {
        self.cfg.request_timeout = t;
        self
    }
    /// Keep durable state in files under `dir` (one per device id).
    /// Default: [`default_state_dir`].
    pub fn storage_dir(mut self, dir: impl AsRef<Path>) -> Self {
        self.storage_dir = Some(dir.as_ref().to_path_buf());
        self.storage = None;
        self
    }
    /// Keep durable state in a custom store.
    pub fn storage(mut self, s: Arc<dyn Storage>) -> Self {
        self.storage = Some(s);
        self.storage_dir = None;
        self
    }
    /// Keep state in memory only: it survives reconnects, not restarts.
    pub fn memory_storage(self) -> Self {
        self.storage(Arc::new(MemoryStorage::default()))
    }
    /// Trust the certificates in this PEM text for `wss://`, beside the
    /// public web roots (for a private CA or a test certificate).
    pub fn tls_root_certificates_pem(mut self, pem: impl AsRef<[u8]>) -> Self {
        self.extra_roots.extend_from_slice(pem.as_ref());
        self.extra_roots.push(b'\n');
        self
    }
    /// Seed for backoff jitter and message-id nonces (random by default).
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }
    /// Direct access to every core setting.
    pub fn core_config(mut self, f: impl FnOnce(&mut ClientConfig)) -> Self {
        f(&mut self.cfg);
        self
    }

    /// Create the client (inside a tokio runtime), restoring durable state.
    /// It does not connect until [`Client::connect`], so that the app can
    /// first re-attach to its durable subscriptions and miss nothing.
    pub fn build(self) -> Result<Client, Error> {
        if self.cfg.device_id.is_empty() {
            return Err(Error::Config("device_id must not be empty".into()));
        }
        let storage: Arc<dyn Storage> = match self.storage {
            Some(s) => s,
            None => {
                let dir = self.storage_dir.clone().unwrap_or_else(default_state_dir);
                Arc::new(FileStorage::in_dir(&dir, &self.cfg.device_id).map_err(|e| Error::Storage(e.to_string()))?)
            }
        };
        // A URL that cannot be used is a setup error, reported here once
        // instead of retried forever as if the network were down.
        if self.urls.is_empty() {
            return Err(Error::Config("at least one server URL is needed".into()));
        }
        for url in &self.urls {
            use tokio_tungstenite::tungstenite::client::IntoClientRequest;
            if !(url.starts_with("ws://") || url.starts_with("wss://")) {
                return Err(Error::Config(format!("server URL {url:?}: must start with ws:// or wss://")));
            }
            url.as_str().into_client_request().map_err(|e| Error::Config(format!("server URL {url:?}: {e}")))?;
        }
        let tls = if self.urls.iter().any(|u| u.starts_with("wss://")) {
            Some(driver::tls_config(&self.extra_roots).map_err(Error::Config)?)
        } else {
            None
        };
        let mut cfg = self.cfg;
        // The core chooses among the URLs by index (PROTOCOL.md 9.2).
        cfg.endpoints = self.urls.len();
        let snapshot = storage.load().map_err(|e| Error::Storage(e.to_string()))?;
        let seed = self.seed.unwrap_or_else(random_seed);
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let (state_tx, state_rx) = watch::channel(ConnectionState::Idle);
        let (disc_tx, disc_rx) = watch::channel(None);
        let handle = tokio::runtime::Handle::try_current()
            .map_err(|_| Error::Config("build() must run inside a tokio runtime".into()))?;
        let driver = driver::Driver::new(
            self.urls,
            tls,
            cfg,
            seed,
            snapshot,
            storage,
            self.token_provider,
            cmd_tx.downgrade(),
            state_tx,
            disc_tx,
        );
        let task = handle.spawn(driver.run(cmd_rx));
        Ok(Client {
            inner: Arc::new(Inner {
                cmd: cmd_tx,
                state: state_rx,
                disconnects: disc_rx,
                task: std::sync::Mutex::new(Some(task)),
            }),
        })
    }
}

/// Where client state lives by default: `$FERRY_CLIENT_STATE_DIR`, else
/// `$XDG_STATE_HOME/ferry-client`, else `~/.local/state/ferry-client`, else
/// `./.ferry-client`. One JSON file per device id.
pub fn default_state_dir() -> std::path::PathBuf {
    let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(std::path::PathBuf::from);
    env("FERRY_CLIENT_STATE_DIR")
        .or_else(|| env("XDG_STATE_HOME").map(|p| p.join("ferry-client")))
        .or_else(|| env("HOME").map(|p| p.join(".local/state/ferry-client")))
        .unwrap_or_else(|| std::path::PathBuf::from(".ferry-client"))
}

fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0));
    h.finish()
}

pub(crate) enum Cmd {
    Connect,
    Subscribe { channel: String, qos: Qos, token: String, id: u64, events: mpsc::UnboundedSender<SubscriptionEvent> },
    Unsubscribe { channel: String, id: u64 },
    Publish { channel: String, data: Vec<u8>, qos: Qos, reply: oneshot::Sender<Result<PublishAck, Error>> },
    Call { cmd: ferry_core::frame::Command, reply: oneshot::Sender<Result<ferry_core::frame::ReplyBody, Error>> },
    NetworkChanged { online: bool },
    Token(Result<String, String>),
    Outbox { reply: oneshot::Sender<Vec<String>> },
    Close { reply: oneshot::Sender<Vec<String>> },
}

struct Inner {
    cmd: mpsc::UnboundedSender<Cmd>,
    state: watch::Receiver<ConnectionState>,
    disconnects: watch::Receiver<Option<Disconnect>>,
    task: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// A Ferry client. Cheap to clone; all clones share one connection.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

/// What [`Client::close`] left behind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseReport {
    /// Message ids still not acknowledged (kept in durable storage, sent
    /// by the next client with the same storage).
    pub unacked: Vec<String>,
}

impl Client {
    /// Start building a client for a server URL (`ws://host:port/ws`).
    pub fn builder(url: impl Into<String>) -> ClientBuilder {
        Self::builder_urls([url.into()])
    }

    /// Start building a client for several server URLs, the nodes of one
    /// cluster (`["ws://a:8000/ws", "ws://b:8000/ws"]`). The client starts
    /// on one picked from its seed, stays there while it works, and after
    /// a failed attempt or a lost connection tries the next one in the list
    /// (after the usual backoff), recovering its streams by offsets as after
    /// any reconnect (PROTOCOL.md 9.2). Every URL is checked by
    /// [`ClientBuilder::build`]; an empty list is an [`Error::Config`] there.
    pub fn builder_urls<I, S>(urls: I) -> ClientBuilder
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        ClientBuilder {
            urls: urls.into_iter().map(Into::into).collect(),
            cfg: {
                let mut c = ClientConfig::new("");
                c.client.name = "ferry-client".into();
                c.client.version = env!("CARGO_PKG_VERSION").into();
                c
            },
            token_provider: None,
            storage: None,
            storage_dir: None,
            seed: None,
            extra_roots: Vec::new(),
        }
    }

    fn send(&self, c: Cmd) -> Result<(), Error> {
        self.inner.cmd.send(c).map_err(|_| Error::Closed)
    }

    /// Start connecting; the client then reconnects by itself until
    /// [`Client::close`] or a terminal close code (both end in
    /// [`ConnectionState::Closed`]).
    pub fn connect(&self) {
        let _ = self.send(Cmd::Connect);
    }

    /// Subscribe; the returned stream yields events in order and
    /// unsubscribes when dropped. Subscribing to a channel restored from
    /// durable storage re-attaches to it (and gets what arrived meanwhile).
    pub async fn subscribe(&self, channel: &str, qos: Qos) -> Result<Subscription, Error> {
        self.subscribe_with_token(channel, qos, String::new()).await
    }

    /// Subscribe to a private channel with a subscription token from your backend.
    pub async fn subscribe_with_token(&self, channel: &str, qos: Qos, token: String) -> Result<Subscription, Error> {
        static IDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let id = IDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (tx, rx) = mpsc::unbounded_channel();
        self.send(Cmd::Subscribe { channel: channel.into(), qos, token, id, events: tx })?;
        Ok(Subscription { channel: channel.into(), id, rx, cmd: self.inner.cmd.clone() })
    }

    /// Publish; resolves when the server acknowledged (QoS 1: stored; QoS 2:
    /// the exactly-once handshake is complete). QoS 0 resolves on the reply.
    pub async fn publish(&self, channel: &str, data: Vec<u8>, qos: Qos) -> Result<PublishAck, Error> {
        let (tx, rx) = oneshot::channel();
        self.send(Cmd::Publish { channel: channel.into(), data, qos, reply: tx })?;
        rx.await.map_err(|_| Error::Closed)?
    }

    async fn call(&self, cmd: ferry_core::frame::Command) -> Result<ferry_core::frame::ReplyBody, Error> {
        let (tx, rx) = oneshot::channel();
        self.send(Cmd::Call { cmd, reply: tx })?;
        rx.await.map_err(|_| Error::Closed)?
    }

    /// Stored publications of a channel.
    pub async fn history(&self, req: HistoryRequest) -> Result<(Vec<Publication>, StreamPosition), Error> {
        match self.call(ferry_core::frame::Command::History(req)).await? {
            ferry_core::frame::ReplyBody::History { publications, top } => Ok((publications, top)),
            _ => Err(Error::ConnectionLost),
        }
    }

    /// Connections subscribed to a channel.
    pub async fn presence(&self, channel: &str) -> Result<Vec<ClientInfo>, Error> {
        match self.call(ferry_core::frame::Command::Presence { channel: channel.into() }).await? {
            ferry_core::frame::ReplyBody::Presence { clients } => Ok(clients),
            _ => Err(Error::ConnectionLost),
        }
    }

    /// Counts of connections and users subscribed to a channel.
    pub async fn presence_stats(&self, channel: &str) -> Result<(u32, u32), Error> {
        match self.call(ferry_core::frame::Command::PresenceStats { channel: channel.into() }).await? {
            ferry_core::frame::ReplyBody::PresenceStats { clients, users } => Ok((clients, users)),
            _ => Err(Error::ConnectionLost),
        }
    }

    /// Watch the connection state.
    pub fn state(&self) -> watch::Receiver<ConnectionState> {
        self.inner.state.clone()
    }

    /// Watch why connections end (none until the first one does).
    pub fn disconnects(&self) -> watch::Receiver<Option<Disconnect>> {
        self.inner.disconnects.clone()
    }

    /// Wait until connected (or `timeout`).
    pub async fn wait_connected(&self, timeout: Duration) -> bool {
        let mut rx = self.state();
        tokio::time::timeout(timeout, rx.wait_for(|s| *s == ConnectionState::Connected)).await.is_ok_and(|r| r.is_ok())
    }

    /// The device's network changed: reconnect now instead of after a backoff.
    pub fn network_changed(&self) {
        let _ = self.send(Cmd::NetworkChanged { online: true });
    }

    /// The device went offline: stop trying until `network_changed`.
    pub fn network_lost(&self) {
        let _ = self.send(Cmd::NetworkChanged { online: false });
    }

    /// Message ids in the outbox now.
    pub async fn unacked(&self) -> Vec<String> {
        let (tx, rx) = oneshot::channel();
        if self.send(Cmd::Outbox { reply: tx }).is_err() {
            return Vec::new();
        }
        rx.await.unwrap_or_default()
    }

    /// Close for good: wait up to `flush` for the outbox to drain, then
    /// close the connection and stop. The state ends in
    /// [`ConnectionState::Closed`] `{ code: 1000, reason: "client closed" }`
    /// (the last value [`Client::state`] watchers see); later calls fail
    /// with [`Error::Closed`]. Whatever is still unacknowledged stays in
    /// durable storage for the next client.
    pub async fn close(&self, flush: Duration) -> CloseReport {
        let end = tokio::time::Instant::now() + flush;
        while tokio::time::Instant::now() < end {
            if self.unacked().await.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (tx, rx) = oneshot::channel();
        let unacked = if self.send(Cmd::Close { reply: tx }).is_ok() { rx.await.unwrap_or_default() } else { vec![] };
        let task = self.inner.task.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = task {
            let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
        }
        CloseReport { unacked }
    }
}

/// A subscription: a stream of [`SubscriptionEvent`]s. Dropping it unsubscribes.
pub struct Subscription {
    channel: String,
    id: u64,
    rx: mpsc::UnboundedReceiver<SubscriptionEvent>,
    cmd: mpsc::UnboundedSender<Cmd>,
}

impl Subscription {
    /// The channel.
    pub fn channel(&self) -> &str {
        &self.channel
    }
    /// The next publication, skipping other events (None when the stream ends).
    pub async fn next_publication(&mut self) -> Option<Publication> {
        while let Some(e) = self.rx.recv().await {
            if let SubscriptionEvent::Publication(p) = e {
                return Some(p);
            }
        }
        None
    }
}

impl futures_util::Stream for Subscription {
    type Item = SubscriptionEvent;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let _ = self.cmd.send(Cmd::Unsubscribe { channel: self.channel.clone(), id: self.id });
    }
}
