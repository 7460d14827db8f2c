//! The hub: channel state, the sequencer that orders and durably commits
//! publishes, fan-out, presence and history.
//!
//! Design: one sequencer thread owns offset assignment. It drains every
//! queued publish into one batch, commits it with one fsync (group
//! commit), and only then fans the publications out, in offset order,
//! while holding the channel table lock. A subscriber registers under the
//! same lock, so every publication is either at or below the `top` it was
//! told (and replayed from the store) or delivered live — never both,
//! never neither.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use ferry_core::frame::*;
use ferry_core::server::{FetchEnd, SharedPublication, StreamStart};
use ferry_core::{CloseCode, ErrorCode, MESSAGE_ID_REUSED};
use tokio::sync::{mpsc, oneshot};

use crate::channel;
use crate::config::Config;
use crate::presence::{Change, MemoryPresence, Presence, Stats};
use crate::store::{Batch, DedupEntry, Store, StreamHeader};

/// A subscribe that is still reading the engine (Redis).
pub type PendingSubscribe =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<StreamStart, ErrorReply>> + Send>>;

/// Identifies one connection.
pub type ConnId = u64;

/// Publications kept in memory per channel for recovery without disk reads.
pub const HOT_WINDOW: usize = 256;

/// How long a QoS 0/1 message id is remembered, ms.
pub const DEDUP_WINDOW_MS: u64 = 24 * 3600 * 1000;
/// How long an unreleased QoS 2 message id is kept at most, ms.
pub const QOS2_HOLD_MS: u64 = 7 * 24 * 3600 * 1000;

/// Messages to a connection's task.
#[derive(Debug)]
pub enum ConnMsg {
    /// A publish finished.
    Published {
        /// Request id.
        req: u32,
        /// The stored position, or why not.
        result: Result<Stored, ErrorReply>,
    },
    /// Publications from the store for a fetch.
    Fetched {
        /// Channel.
        channel: String,
        /// In offset order.
        pubs: Vec<Arc<SharedPublication>>,
        /// How it ended.
        end: FetchEnd,
    },
    /// The answer to a call (history). Boxed, like the other large
    /// variants: a channel's blocks hold 32 messages of the largest
    /// variant's size, per connection.
    Reply {
        /// Request id.
        req: u32,
        /// The answer.
        result: Box<Result<ReplyBody, ErrorReply>>,
    },
    /// A push to forward (join, leave, unsubscribed).
    Notice(Box<Push>),
    /// Close the connection.
    Kick(CloseCode, String),
    /// Live publications were dropped: catch up from the store.
    Lagged,
    /// A subscribe that read the engine finished (Redis).
    Subscribed {
        /// Request id.
        req: u32,
        /// Channel.
        channel: String,
        /// Where delivery starts, or why not.
        result: Box<Result<StreamStart, ErrorReply>>,
    },
    /// A `connect` whose recovered subscriptions read the engine (Redis).
    Accepted {
        /// Request id.
        req: u32,
        /// The subscriptions' channels, in the order of `accept.subs`.
        channels: Vec<String>,
        /// The answer.
        accept: Box<ferry_core::server::Accept>,
    },
}

/// Where a publish was stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stored {
    /// Epoch.
    pub epoch: String,
    /// Offset.
    pub offset: u64,
    /// It had been stored before.
    pub duplicate: bool,
}

/// A connection as the hub knows it.
#[derive(Clone)]
pub struct ConnHandle {
    /// Its id.
    pub id: ConnId,
    /// Identity shown in presence and as publisher.
    pub info: ClientInfo,
    /// Device id from `connect`.
    pub device: String,
    /// Channels the connection token grants.
    pub grants: Vec<String>,
    /// When the connection was accepted (`connected`), Unix ms.
    pub since_ms: u64,
    /// Set when live publications were dropped for a full queue; the
    /// connection then catches up from the store.
    pub lagged: Arc<std::sync::atomic::AtomicBool>,
    /// Replies and notices.
    pub ctl: mpsc::UnboundedSender<ConnMsg>,
    /// Live publications (bounded: a full queue means a slow consumer).
    pub data: mpsc::Sender<Arc<SharedPublication>>,
}

struct Chan {
    header: StreamHeader,
    /// The header exists in the store.
    persisted: bool,
    hot: VecDeque<Arc<SharedPublication>>,
    subs: BTreeMap<ConnId, ConnHandle>,
    /// QoS 1/2 subscriptions of this node that are behind the stream
    /// (backpressure: see [`Hub::hold`]).
    holds: BTreeMap<ConnId, Hold>,
    /// While `holds` is not empty: the top once every publish let through
    /// is stored (they pass the check before they are committed, and a
    /// burst of them must not overrun the history either).
    admitted: u64,
}

/// A subscription that is behind its stream.
struct Hold {
    /// The oldest offset it still has to push.
    next: u64,
    /// When it fell behind, Unix ms.
    since_ms: u64,
}

#[derive(Default)]
struct State {
    channels: HashMap<String, Chan>,
    conns: HashMap<ConnId, ConnHandle>,
}

/// Who to tell the outcome of a publish.
pub enum ReplyTo {
    /// A connection's request.
    Conn(mpsc::UnboundedSender<ConnMsg>, u32),
    /// An in-process caller.
    Once(oneshot::Sender<Result<Stored, ErrorReply>>),
}

impl ReplyTo {
    pub(crate) fn send(self, r: Result<Stored, ErrorReply>) {
        match self {
            ReplyTo::Conn(tx, req) => {
                let _ = tx.send(ConnMsg::Published { req, result: r });
            }
            ReplyTo::Once(tx) => {
                let _ = tx.send(r);
            }
        }
    }
}

enum SeqReq {
    Publish {
        channel: String,
        message_id: String,
        qos: Qos,
        data: Vec<u8>,
        publisher: Option<ClientInfo>,
        reply: ReplyTo,
    },
    Release(String),
    Cursor(String, String, u64),
}

/// Counters.
#[derive(Default, Debug)]
pub struct HubStats {
    /// Durable commits.
    pub commits: AtomicU64,
    /// Publications stored.
    pub stored: AtomicU64,
    /// Duplicate publishes answered from the dedup table.
    pub duplicates: AtomicU64,
}

/// A connection in [`Hub::connections_page`].
#[derive(Clone, Debug)]
pub struct ConnSummary {
    /// Hub id (`info.client` is its hex form).
    pub id: ConnId,
    /// Client id, user and token info.
    pub info: ClientInfo,
    /// Device id from `connect`.
    pub device: String,
    /// Accepted at, Unix ms.
    pub since_ms: u64,
    /// Channels it is subscribed to, sorted.
    pub channels: Vec<String>,
    /// Live publications were dropped for it (it catches up from the store).
    pub lagged: bool,
}

/// A page of [`Hub::connections_page`].
#[derive(Clone, Debug)]
pub struct ConnectionsPage {
    /// The connections of the page.
    pub conns: Vec<ConnSummary>,
    /// Connections on this node.
    pub total: usize,
    /// Distinct users among them (anonymous connections count as one).
    pub users: usize,
}

/// A channel in [`Hub::channels_page`].
#[derive(Clone, Debug)]
pub struct ChannelSummary {
    /// Channel name.
    pub name: String,
    /// Stream epoch (empty before the first publication).
    pub epoch: String,
    /// Oldest retained offset.
    pub first: u64,
    /// Newest offset (0 = none yet).
    pub top: u64,
    /// Subscriptions on this node.
    pub subscribers: usize,
}

/// A node in [`Hub::nodes`].
#[derive(Clone, Debug)]
pub struct NodeSummary {
    /// Node id (`embedded` for the embedded engine).
    pub id: String,
    /// The node answering.
    pub this: bool,
    /// Milliseconds since its last beat in Redis (none when embedded).
    pub beat_ago_ms: Option<u64>,
}

/// Shared server state.
pub struct Hub {
    cfg: Arc<Config>,
    auth: crate::auth::Auth,
    store: Arc<dyn Store>,
    presence: Arc<dyn Presence>,
    broker: Arc<dyn Broker>,
    state: Mutex<State>,
    seq: std::sync::mpsc::Sender<SeqReq>,
    next_conn: AtomicU64,
    /// Subscriptions behind their stream, all channels (0: no publish
    /// needs the backpressure check).
    holding: std::sync::atomic::AtomicUsize,
    /// Counters.
    pub stats: HubStats,
    /// Prometheus metrics.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Rate limits of the per-connection and per-request log lines.
    pub logs: crate::logging::Logs,
    /// This node's name (metrics label, logs).
    node: String,
    webhooks: Option<Arc<crate::webhooks::Webhooks>>,
    /// Set when streams, ids, cursors and fan-out are in Redis.
    redis: std::sync::OnceLock<Arc<crate::cluster::RedisNode>>,
    /// Set with `redis`: presence, online users and control across nodes.
    cpresence: std::sync::OnceLock<Arc<crate::cluster_presence::ClusterPresence>>,
}

/// Wall clock, Unix ms.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// A fresh epoch: distinct from every earlier one with overwhelming
/// probability, so a wiped store never reuses an epoch.
pub(crate) fn new_epoch() -> String {
    use std::hash::{BuildHasher, Hasher};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(now_ms());
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    format!("{:016x}", h.finish())
}

impl Hub {
    /// Start the hub over a store; spawns the sequencer thread.
    pub fn start(cfg: Arc<Config>, store: Arc<dyn Store>) -> Result<Arc<Hub>, crate::store::StoreError> {
        let mut state = State::default();
        for (ch, header) in store.headers()? {
            state.channels.insert(
                ch,
                Chan {
                    header,
                    persisted: true,
                    hot: VecDeque::new(),
                    subs: BTreeMap::new(),
                    holds: BTreeMap::new(),
                    admitted: 0,
                },
            );
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let metrics = Arc::new(crate::metrics::Metrics::default());
        let broker = Arc::new(LocalBroker { hub: std::sync::OnceLock::new() });
        let config_error = |what: &str, e: anyhow::Error| crate::store::StoreError::Engine(format!("{what}: {e}"));
        let http = crate::http_client::HttpClient::new(
            crate::tls::client_config(cfg.tls.ca_file.as_deref()).map_err(|e| config_error("tls config", e))?,
        );
        let webhooks = match cfg.webhooks.url.is_empty() {
            true => None,
            false => Some(
                crate::webhooks::Webhooks::start(cfg.webhooks.clone(), http.clone(), metrics.clone())
                    .map_err(|e| config_error("webhooks config", e))?,
            ),
        };
        let auth = crate::auth::Auth::from_config_with(&cfg.auth, cfg.allow_anonymous, Some(http))
            .map_err(|e| config_error("auth config", e))?;
        let hub = Arc::new(Hub {
            logs: crate::logging::Logs::new(cfg.limits.log_lines_per_sec),
            node: cfg.node_name(),
            auth,
            cfg,
            store,
            presence: Arc::new(MemoryPresence::default()),
            broker: broker.clone(),
            state: Mutex::new(state),
            seq: tx,
            next_conn: AtomicU64::new(1),
            holding: Default::default(),
            stats: HubStats::default(),
            webhooks,
            metrics,
            redis: std::sync::OnceLock::new(),
            cpresence: std::sync::OnceLock::new(),
        });
        let weak = Arc::downgrade(&hub);
        let _ = broker.hub.set(weak.clone());
        std::thread::Builder::new()
            .name("ferry-sequencer".into())
            .spawn(move || sequencer(weak, rx))
            .expect("spawn sequencer thread");
        Ok(hub)
    }

    /// Start the hub with streams, message ids, cursors and fan-out in
    /// Redis (docs/CLUSTER.md); must run inside a tokio runtime.
    pub fn start_redis(
        cfg: Arc<Config>,
        store: Arc<dyn Store>,
        streams: crate::engine::redis::RedisStreams,
    ) -> Result<Arc<Hub>, crate::store::StoreError> {
        let grace = cfg.presence_grace_ms;
        let hub = Hub::start(cfg, store)?;
        // Client ids are shown cluster-wide (presence, disconnect by
        // client): each node numbers its connections from a random base.
        let base = u64::from_str_radix(&new_epoch(), 16).unwrap_or(0) & 0xffff_ffff;
        hub.next_conn.store((base << 32) | 1, Ordering::Relaxed);
        let cp = crate::cluster_presence::ClusterPresence::start(Arc::downgrade(&hub), streams.clone(), grace);
        tracing::info!(node = %hub.node, registry_id = cp.node_id(), "node registered in Redis");
        let _ = hub.cpresence.set(cp);
        let node = crate::cluster::RedisNode::start(Arc::downgrade(&hub), streams);
        let _ = hub.redis.set(node);
        Ok(hub)
    }

    /// The Redis link, when the hub runs on Redis.
    pub fn redis(&self) -> Option<&Arc<crate::cluster::RedisNode>> {
        self.redis.get()
    }

    /// Token verification.
    pub fn auth(&self) -> &crate::auth::Auth {
        &self.auth
    }

    /// This node's name (see [`Config::node_name`]).
    pub fn node_name(&self) -> &str {
        &self.node
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// A new connection id.
    pub fn conn_id(&self) -> ConnId {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the table half-updated
        // in a way later readers could not cope with, so poisoning is ignored.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queue a publish; the outcome goes to `reply` after the durable commit.
    pub fn publish(
        &self,
        channel: String,
        message_id: String,
        qos: Qos,
        data: Vec<u8>,
        publisher: Option<ClientInfo>,
        reply: ReplyTo,
    ) {
        if let Err(e) = self.check_backlog(&channel) {
            return reply.send(Err(e));
        }
        if let Some(r) = self.redis.get() {
            let item = crate::cluster::item(message_id, qos, data, publisher);
            return r.submit(crate::cluster::RedisPublish { channel, item, reply });
        }
        let req = SeqReq::Publish { channel, message_id, qos, data, publisher, reply };
        if let Err(std::sync::mpsc::SendError(SeqReq::Publish { reply, .. })) = self.seq.send(req) {
            reply.send(Err(ErrorReply::new(ErrorCode::Unavailable)));
        }
    }

    /// Backpressure: a publish that would push a subscription which is
    /// behind out of the channel's retained history is refused as
    /// temporary (111), so publishers slow down instead of the subscriber
    /// being closed with 3004. The refusal starts at half the history, the
    /// rest being headroom for publishes already queued. One subscription
    /// holds publishers back for at most `limits.backpressure_secs` per
    /// episode, so a stalled client cannot stop a channel for good.
    fn check_backlog(&self, channel: &str) -> Result<(), ErrorReply> {
        if self.holding.load(Ordering::Relaxed) == 0 || self.cfg.limits.backpressure_secs == 0 {
            return Ok(());
        }
        let history = self.cfg.namespace(channel).history_size as u64;
        {
            let mut st = self.lock();
            let Some(c) = st.channels.get_mut(channel) else { return Ok(()) };
            let cutoff = now_ms().saturating_sub(self.cfg.limits.backpressure_secs * 1000);
            let Some(oldest) = c.holds.values().filter(|h| h.since_ms >= cutoff).map(|h| h.next).min() else {
                return Ok(());
            };
            let top = c.admitted.max(c.header.top) + 1;
            if top.saturating_sub(oldest) < (history / 2).max(1) {
                c.admitted = top;
                return Ok(());
            }
        }
        self.metrics.publish_backpressure.fetch_add(1, Ordering::Relaxed);
        Err(ErrorReply::with_message(
            ErrorCode::TooManyRequests,
            "subscribers of this channel are behind; retry shortly (backpressure)",
        ))
    }

    /// Report where a connection's subscription is behind its stream
    /// (`Some(oldest offset still to push)`) or that it is not (`None`).
    pub fn hold(&self, conn: ConnId, channel: &str, next: Option<u64>) {
        let mut st = self.lock();
        let Some(c) = st.channels.get_mut(channel) else { return };
        match next {
            Some(next) => match c.holds.get_mut(&conn) {
                Some(h) => h.next = next,
                None => {
                    c.holds.insert(conn, Hold { next, since_ms: now_ms() });
                    self.holding.fetch_add(1, Ordering::Relaxed);
                }
            },
            None => {
                if c.holds.remove(&conn).is_some() {
                    self.holding.fetch_sub(1, Ordering::Relaxed);
                }
                if c.holds.is_empty() {
                    c.admitted = 0;
                }
            }
        }
    }

    /// Publish from inside the server (tests, backend API) and wait.
    pub async fn publish_wait(
        &self,
        channel: &str,
        message_id: &str,
        qos: Qos,
        data: Vec<u8>,
    ) -> Result<Stored, ErrorReply> {
        let (tx, rx) = oneshot::channel();
        self.publish(channel.into(), message_id.into(), qos, data, None, ReplyTo::Once(tx));
        rx.await.unwrap_or_else(|_| Err(ErrorReply::new(ErrorCode::Unavailable)))
    }

    /// QoS 2 release: the dedup entry may go.
    pub fn release(&self, message_id: String) {
        if let Some(r) = self.redis.get() {
            let streams = r.streams().clone();
            tokio::spawn(async move {
                if let Ok(Some(ch)) = streams.claimed_channel(&message_id).await {
                    let _ = streams.release(&ch, &message_id).await;
                }
            });
            return;
        }
        let _ = self.seq.send(SeqReq::Release(message_id));
    }

    /// Advance a durable offline cursor.
    pub fn ack(&self, conn: &ConnHandle, channel: &str, epoch: String, offset: u64) {
        if conn.info.user.is_empty() || !self.cfg.namespace(channel).offline {
            return;
        }
        if let Some(r) = self.redis.get() {
            return r.put_cursor(&conn.info.user, &conn.device, channel, epoch, offset);
        }
        let key = cursor_key(&conn.info.user, &conn.device, channel);
        let _ = self.seq.send(SeqReq::Cursor(key, epoch, offset));
    }

    /// The checks every subscribe passes: channel name, personal channel
    /// owner, private channel grant. Returns the granted QoS and whether
    /// the subscription keeps a durable offline cursor.
    fn check_subscribe(&self, conn: &ConnHandle, req: &SubscribeRequest) -> Result<(Qos, bool), ErrorReply> {
        channel::validate(&req.channel)?;
        let ns = self.cfg.namespace(&req.channel);
        if let Some(owner) = channel::personal_owner(&req.channel) {
            if owner != conn.info.user {
                return Err(ErrorReply::with_message(
                    ErrorCode::PermissionDenied,
                    "a personal channel belongs to its user",
                ));
            }
        }
        if ns.private && !conn.grants.contains(&req.channel) {
            if req.token.is_empty() {
                return Err(ErrorReply::with_message(
                    ErrorCode::PermissionDenied,
                    "private channel: a subscription token is needed",
                ));
            }
            self.auth.verify_subscription(&req.token, &conn.info.user, &req.channel)?;
        }
        let qos = req.qos.min(ns.max_qos());
        let durable = ns.offline && qos != Qos::AtMostOnce && !conn.info.user.is_empty();
        Ok((qos, durable))
    }

    /// Register a subscriber and say where its delivery starts (embedded
    /// engine; on Redis use [`Self::subscribe_remote`]).
    pub fn subscribe(self: &Arc<Self>, conn: &ConnHandle, req: &SubscribeRequest) -> Result<StreamStart, ErrorReply> {
        let (qos, durable) = self.check_subscribe(conn, req)?;
        // A device that comes back without a position of its own resumes
        // from its durable server-side cursor (offline delivery).
        let since = match &req.since {
            Some(p) => Some(p.clone()),
            None if durable => {
                let key = cursor_key(&conn.info.user, &conn.device, &req.channel);
                self.store
                    .cursor(&key)
                    .map_err(|_| ErrorReply::new(ErrorCode::Unavailable))?
                    .map(|(epoch, offset)| StreamPosition { epoch, offset })
            }
            None => None,
        };
        let mut st = self.lock();
        let chan = st.channels.entry(req.channel.clone()).or_insert_with(|| Chan {
            header: StreamHeader { epoch: new_epoch(), first: 1, top: 0 },
            persisted: false,
            hot: VecDeque::new(),
            subs: BTreeMap::new(),
            holds: BTreeMap::new(),
            admitted: 0,
        });
        let start = stream_start(qos, &chan.header, since.as_ref());
        chan.subs.insert(conn.id, conn.clone());
        drop(st);
        self.subscribed(conn, &req.channel, since.is_none() && durable, &start);
        Ok(start)
    }

    /// On Redis: the subscribe as a future (it reads Redis), or `None` on
    /// the embedded engine.
    pub fn subscribe_remote(self: &Arc<Self>, conn: &ConnHandle, req: &SubscribeRequest) -> Option<PendingSubscribe> {
        let r = self.redis.get()?.clone();
        let (hub, conn, req) = (self.clone(), conn.clone(), req.clone());
        Some(Box::pin(async move { hub.subscribe_redis(&r, &conn, &req).await }))
    }

    async fn subscribe_redis(
        self: &Arc<Self>,
        r: &crate::cluster::RedisNode,
        conn: &ConnHandle,
        req: &SubscribeRequest,
    ) -> Result<StreamStart, ErrorReply> {
        let unavailable =
            |e: crate::engine::EngineError| ErrorReply::with_message(ErrorCode::Unavailable, e.to_string());
        let (qos, durable) = self.check_subscribe(conn, req)?;
        let since = match &req.since {
            Some(p) => Some(p.clone()),
            None if durable => r
                .streams()
                .cursor(&conn.info.user, &conn.device, &req.channel)
                .await
                .map_err(unavailable)?
                .map(|(epoch, offset)| StreamPosition { epoch, offset }),
            None => None,
        };
        // Design: registered locally and subscribed to the fan-out before
        // the header is read, so every publication is either at or below
        // the top read (replayed) or arrives live; the session drops live
        // copies it already replayed.
        {
            let mut st = self.lock();
            if !st.conns.contains_key(&conn.id) {
                return Err(ErrorReply::with_message(ErrorCode::Unavailable, "connection closed"));
            }
            let chan = st.channels.entry(req.channel.clone()).or_insert_with(|| Chan {
                header: StreamHeader { epoch: String::new(), first: 1, top: 0 },
                persisted: true,
                hot: VecDeque::new(),
                subs: BTreeMap::new(),
                holds: BTreeMap::new(),
                admitted: 0,
            });
            chan.subs.insert(conn.id, conn.clone());
        }
        let header = async {
            r.want(&req.channel).await?;
            let cutoff = self.age_cutoff(&req.channel);
            r.streams().ensure(&req.channel, &new_epoch(), cutoff).await.map_err(unavailable)
        }
        .await;
        let header = match header {
            Ok(h) => h,
            Err(e) => {
                self.remove_conn(conn.id, std::slice::from_ref(&req.channel));
                return Err(e);
            }
        };
        let header = self.learn_header(&req.channel, &header);
        let start = stream_start(qos, &header, since.as_ref());
        self.subscribed(conn, &req.channel, since.is_none() && durable, &start);
        Ok(start)
    }

    /// After a subscriber is registered: presence, webhooks, and the
    /// durable cursor of a new durable subscription.
    fn subscribed(self: &Arc<Self>, conn: &ConnHandle, channel: &str, new_durable: bool, start: &StreamStart) {
        match self.cpresence.get() {
            Some(cp) => cp.join(channel, &conn.info),
            None => {
                let change = self.presence.join(channel, conn.id, &conn.info);
                self.announce(channel, change);
            }
        }
        self.hook(crate::webhooks::Hook::Subscribe { user: conn.info.user.clone(), channel: channel.into() });
        if new_durable {
            // A durable subscription starts here: if the device goes away
            // before acking anything, it still resumes from this point.
            match self.redis.get() {
                Some(r) => r.put_cursor(&conn.info.user, &conn.device, channel, start.epoch.clone(), start.from - 1),
                None => {
                    let key = cursor_key(&conn.info.user, &conn.device, channel);
                    let _ = self.seq.send(SeqReq::Cursor(key, start.epoch.clone(), start.from - 1));
                }
            }
        }
    }

    /// Take a stream header read from the engine: a newer epoch replaces
    /// the local view (and its hot window), the same epoch only moves
    /// forward. Returns the header now held.
    pub(crate) fn learn_header(&self, channel: &str, h: &StreamHeader) -> StreamHeader {
        let mut st = self.lock();
        let c = st.channels.entry(channel.to_string()).or_insert_with(|| Chan {
            header: h.clone(),
            persisted: true,
            hot: VecDeque::new(),
            subs: BTreeMap::new(),
            holds: BTreeMap::new(),
            admitted: 0,
        });
        merge_header(c, h);
        c.header.clone()
    }

    /// On Redis, after fan-out may have missed messages: refresh the
    /// headers of every channel with local subscribers and have each of
    /// their connections catch up from the stream.
    pub(crate) async fn catch_up_all(self: &Arc<Self>) {
        let Some(r) = self.redis.get() else { return };
        let channels: Vec<String> =
            self.lock().channels.iter().filter(|(_, c)| !c.subs.is_empty()).map(|(k, _)| k.clone()).collect();
        for ch in &channels {
            let cutoff = self.age_cutoff(ch);
            if let Ok(Some(h)) = r.streams().read_header(ch, cutoff).await {
                self.learn_header(ch, &h);
            }
        }
        let conns: Vec<ConnHandle> = {
            let st = self.lock();
            let mut seen = std::collections::BTreeSet::new();
            st.channels.values().flat_map(|c| c.subs.values()).filter(|h| seen.insert(h.id)).cloned().collect()
        };
        for h in conns {
            let _ = h.ctl.send(ConnMsg::Lagged);
        }
    }

    /// The `publish` webhook for a client publish stored on Redis.
    pub(crate) fn publish_hook(&self, by: &ClientInfo, channel: &str, offset: u64, item: &crate::engine::PublishItem) {
        self.hook(crate::webhooks::Hook::Publish {
            user: by.user.clone(),
            channel: channel.into(),
            offset,
            message_id: item.message_id.clone(),
            b64data: ferry_core::base64::encode(&item.data),
        });
    }

    /// Channels a connection is subscribed to (a scan; for cleanup).
    pub fn channels_of(&self, conn: ConnId) -> Vec<String> {
        self.lock().channels.iter().filter(|(_, c)| c.subs.contains_key(&conn)).map(|(k, _)| k.clone()).collect()
    }

    /// Forget a subscription.
    pub fn unsubscribe(self: &Arc<Self>, conn: ConnId, channel: &str) {
        self.remove_conn(conn, &[channel.to_string()]);
    }

    /// Forget a connection's subscriptions.
    pub fn remove_conn(self: &Arc<Self>, conn: ConnId, channels: &[String]) {
        let user = {
            let mut st = self.lock();
            let mut user = None;
            for ch in channels {
                if let Some(c) = st.channels.get_mut(ch) {
                    if let Some(h) = c.subs.remove(&conn) {
                        user = Some(h.info.user.clone());
                    }
                    if c.holds.remove(&conn).is_some() {
                        self.holding.fetch_sub(1, Ordering::Relaxed);
                        if c.holds.is_empty() {
                            c.admitted = 0;
                        }
                    }
                }
            }
            user
        };
        if let Some(user) = user {
            for ch in channels {
                self.hook(crate::webhooks::Hook::Unsubscribe { user: user.clone(), channel: ch.clone() });
            }
        }
        for ch in channels {
            match self.cpresence.get() {
                // Client ids are the connection id in hex (conn.rs).
                Some(cp) => cp.leave(ch, &format!("{conn:x}")),
                None => {
                    let change = self.presence.leave(ch, conn);
                    self.announce(ch, change);
                }
            }
        }
        if let Some(r) = self.redis.get() {
            // Stop this channel's fan-out to this node once nobody here
            // listens (checked again under the interest lock).
            for ch in channels {
                if self.lock().channels.get(ch).is_some_and(|c| !c.subs.is_empty()) {
                    continue;
                }
                let (r, hub, ch) = (r.clone(), Arc::downgrade(self), ch.clone());
                tokio::spawn(async move {
                    r.unwant(&ch, || {
                        hub.upgrade().is_none_or(|h| h.lock().channels.get(&ch).is_none_or(|c| c.subs.is_empty()))
                    })
                    .await;
                });
            }
        }
    }

    /// Turn a presence change into join/leave pushes (after the grace period for leaves).
    fn announce(self: &Arc<Self>, channel: &str, change: Change) {
        match change {
            Change::None => {}
            Change::Join(info) => {
                if self.cfg.namespace(channel).join_leave {
                    self.broadcast(channel, Push::Join { channel: channel.into(), info });
                }
            }
            Change::LeavePending { user, generation } => {
                // Weak: a pending leave must not keep a stopped server's
                // store open.
                let hub = Arc::downgrade(self);
                let channel = channel.to_string();
                let grace = std::time::Duration::from_millis(self.cfg.presence_grace_ms);
                let settle = async move {
                    tokio::time::sleep(grace).await;
                    let Some(hub) = hub.upgrade() else { return };
                    if let Some(info) = hub.presence.settle_leave(&channel, &user, generation) {
                        if hub.cfg.namespace(&channel).join_leave {
                            hub.broadcast(&channel, Push::Leave { channel: channel.clone(), info });
                        }
                    }
                };
                match tokio::runtime::Handle::try_current() {
                    Ok(rt) => {
                        rt.spawn(settle);
                    }
                    Err(_) => tracing::warn!("presence leave outside a runtime: not announced"),
                }
            }
        }
    }

    /// Send a push to every subscriber of a channel on this node.
    pub(crate) fn broadcast_local(&self, channel: &str, push: Push) {
        self.broadcast(channel, push)
    }

    /// A webhook decided by the cluster's presence.
    pub(crate) fn cluster_hook(&self, h: crate::webhooks::Hook) {
        self.hook(h)
    }

    /// Put every local connection and subscription back into the
    /// cluster's presence (the registry lost this node).
    pub(crate) fn reregister_presence(&self) {
        let Some(cp) = self.cpresence.get() else { return };
        let st = self.lock();
        for h in st.conns.values() {
            cp.user_up(&h.info.user, &h.info.client);
        }
        for (ch, c) in &st.channels {
            for h in c.subs.values() {
                cp.join(ch, &h.info);
            }
        }
    }

    /// Send a push to every subscriber of a channel.
    fn broadcast(&self, channel: &str, push: Push) {
        let st = self.lock();
        if let Some(c) = st.channels.get(channel) {
            for h in c.subs.values() {
                let _ = h.ctl.send(ConnMsg::Notice(Box::new(push.clone())));
            }
        }
    }

    fn hook(&self, h: crate::webhooks::Hook) {
        if let Some(w) = &self.webhooks {
            w.send(h);
        }
    }

    /// A connection is live.
    pub fn register(&self, conn: &ConnHandle) {
        if let Some(cp) = self.cpresence.get() {
            cp.user_up(&conn.info.user, &conn.info.client);
        } else {
            if let Some(w) = &self.webhooks {
                w.user_up(&conn.info.user);
            }
            self.presence.user_up(&conn.info.user);
        }
        self.lock().conns.insert(conn.id, conn.clone());
    }

    /// A connection ended.
    pub fn unregister(&self, conn: &ConnHandle) {
        if let Some(cp) = self.cpresence.get() {
            cp.user_down(&conn.info.user, &conn.info.client);
        } else {
            if let Some(w) = &self.webhooks {
                w.user_down(&conn.info.user, std::time::Duration::from_millis(self.cfg.presence_grace_ms));
            }
            self.presence.user_down(&conn.info.user);
        }
        self.lock().conns.remove(&conn.id);
    }

    /// The Prometheus text for `/metrics`.
    pub fn render_metrics(&self) -> String {
        let (conns, channels, subs) = {
            let st = self.lock();
            let subs: usize = st.channels.values().map(|c| c.subs.len()).sum();
            let channels = st.channels.values().filter(|c| !c.subs.is_empty()).count();
            (st.conns.len(), channels, subs)
        };
        let g = |v: usize| v as u64;
        let failures = self.auth.failures();
        let auth = crate::metrics::Family {
            name: "ferry_auth_failures_total",
            help: "Credentials refused, by credential (token, subscription_token, api_key) and reason.",
            labels: &["credential", "reason"],
            samples: failures.iter().map(|(c, f, n)| (vec![c.as_str(), f.as_str()], *n)).collect(),
        };
        self.metrics.render(
            &self.node,
            &[
                ("ferry_connections", "Live connections.", g(conns)),
                ("ferry_subscriptions", "Live subscriptions.", g(subs)),
                ("ferry_channels", "Channels with subscribers.", g(channels)),
                (
                    "ferry_engine_up",
                    "1 while the storage engine is reachable (always for the embedded one).",
                    self.redis.get().map_or(1, |r| u64::from(r.fanout_up())),
                ),
                (
                    "ferry_presence_backlog",
                    "Presence changes of this node waiting to be written to Redis (0 on the embedded engine).",
                    self.cpresence.get().map_or(0, |p| p.backlog()),
                ),
            ],
            &[
                (
                    "ferry_publications_stored_total",
                    "Publications durably stored.",
                    self.stats.stored.load(Ordering::Relaxed),
                ),
                (
                    "ferry_duplicate_publishes_total",
                    "Publishes answered from the dedup table.",
                    self.stats.duplicates.load(Ordering::Relaxed),
                ),
                ("ferry_store_commits_total", "Durable commits.", self.stats.commits.load(Ordering::Relaxed)),
                (
                    "ferry_redis_connections_replaced_total",
                    "Redis Cluster connections replaced for answering only timeouts (docs/CLUSTER.md section 7).",
                    self.redis.get().map_or(0, |r| r.streams().connections_replaced()),
                ),
            ],
            &[auth],
        )
    }

    /// A channel's stream epoch and top offset.
    pub fn stream_top(&self, channel: &str) -> Option<(String, u64)> {
        self.lock().channels.get(channel).map(|c| (c.header.epoch.clone(), c.header.top))
    }

    /// Live connections of one user.
    pub fn connections_of(&self, user: &str) -> usize {
        self.lock().conns.values().filter(|h| h.info.user == user).count()
    }

    /// Live connections.
    pub fn connection_count(&self) -> usize {
        self.lock().conns.len()
    }

    /// Channels with at least one subscriber, sorted.
    pub fn active_channels(&self) -> Vec<String> {
        let st = self.lock();
        let mut v: Vec<String> =
            st.channels.iter().filter(|(_, c)| !c.subs.is_empty()).map(|(k, _)| k.clone()).collect();
        v.sort();
        v
    }

    /// One page of this node's connections, ordered by id, after `after`
    /// and of `user` when given; with the totals of this node.
    pub fn connections_page(&self, after: Option<ConnId>, user: Option<&str>, limit: usize) -> ConnectionsPage {
        let st = self.lock();
        let users: std::collections::HashSet<&str> = st.conns.values().map(|h| h.info.user.as_str()).collect();
        // Bounded work per call: the smallest `limit` ids above `after`,
        // without sorting every connection.
        let mut heap = std::collections::BinaryHeap::with_capacity(limit + 1);
        for (id, h) in &st.conns {
            if after.is_some_and(|a| *id <= a) || user.is_some_and(|u| u != h.info.user) {
                continue;
            }
            heap.push(*id);
            if heap.len() > limit {
                heap.pop();
            }
        }
        let ids = heap.into_sorted_vec();
        let mut channels: HashMap<ConnId, Vec<String>> = ids.iter().map(|id| (*id, Vec::new())).collect();
        // One pass over the subscriptions, and none for a page of nothing.
        for (name, c) in st.channels.iter().filter(|_| !ids.is_empty()) {
            for id in c.subs.keys() {
                if let Some(v) = channels.get_mut(id) {
                    v.push(name.clone());
                }
            }
        }
        let conns = ids
            .iter()
            .filter_map(|id| {
                let h = st.conns.get(id)?;
                let mut chans = channels.remove(id).unwrap_or_default();
                chans.sort();
                Some(ConnSummary {
                    id: *id,
                    info: h.info.clone(),
                    device: h.device.clone(),
                    since_ms: h.since_ms,
                    channels: chans,
                    lagged: h.lagged.load(Ordering::Relaxed),
                })
            })
            .collect();
        ConnectionsPage { conns, total: st.conns.len(), users: users.len() }
    }

    /// One page of the channels this node knows (those with a stream or a
    /// subscriber), ordered by name, after `after`; with their count.
    /// `active`: only channels with a subscriber here.
    pub fn channels_page(&self, after: Option<&str>, active: bool, limit: usize) -> (Vec<ChannelSummary>, usize) {
        let st = self.lock();
        let mut heap: std::collections::BinaryHeap<&str> = std::collections::BinaryHeap::with_capacity(limit + 1);
        let mut total = 0;
        for (name, c) in &st.channels {
            if active && c.subs.is_empty() {
                continue;
            }
            total += 1;
            if after.is_some_and(|a| name.as_str() <= a) {
                continue;
            }
            heap.push(name.as_str());
            if heap.len() > limit {
                heap.pop();
            }
        }
        let page = heap
            .into_sorted_vec()
            .into_iter()
            .filter_map(|name| {
                let c = st.channels.get(name)?;
                Some(ChannelSummary {
                    name: name.to_string(),
                    epoch: c.header.epoch.clone(),
                    first: c.header.first,
                    top: c.header.top,
                    subscribers: c.subs.len(),
                })
            })
            .collect();
        (page, total)
    }

    /// The nodes sharing this server's Redis, with how long ago each beat
    /// (ms); on the embedded engine, this node alone.
    pub async fn nodes(&self) -> Result<Vec<NodeSummary>, ErrorReply> {
        match self.cpresence.get() {
            Some(cp) => {
                let me = cp.node_id().to_string();
                Ok(cp
                    .nodes()
                    .await?
                    .into_iter()
                    .map(|(id, beat_ago_ms)| NodeSummary { this: id == me, id, beat_ago_ms: Some(beat_ago_ms) })
                    .collect())
            }
            None => Ok(vec![NodeSummary { id: "embedded".into(), this: true, beat_ago_ms: None }]),
        }
    }

    /// This node's id in the Redis registry (none on the embedded engine).
    pub fn node_id(&self) -> Option<&str> {
        self.cpresence.get().map(|cp| cp.node_id())
    }

    /// Close every connection of `user` (or just `client`) on every node;
    /// returns how many there were.
    pub async fn disconnect_user(
        &self,
        user: &str,
        client: Option<&str>,
        code: CloseCode,
    ) -> Result<usize, ErrorReply> {
        match self.cpresence.get() {
            Some(cp) => cp.disconnect(user, client, code).await,
            None => Ok(self.disconnect_local(user, client, code)),
        }
    }

    /// End the subscriptions of `user` to `channel` on every node; returns
    /// how many there were.
    pub async fn unsubscribe_user(self: &Arc<Self>, user: &str, channel: &str) -> Result<usize, ErrorReply> {
        match self.cpresence.get() {
            Some(cp) => cp.unsubscribe(user, channel).await,
            None => Ok(self.unsubscribe_local(user, channel)),
        }
    }

    /// Close `user`'s connections (or just `client`) on this node.
    pub(crate) fn disconnect_local(&self, user: &str, client: Option<&str>, code: CloseCode) -> usize {
        let st = self.lock();
        let mut n = 0;
        for h in st.conns.values() {
            if h.info.user == user && client.is_none_or(|c| c == h.info.client) {
                let _ = h.ctl.send(ConnMsg::Kick(code, "disconnected by the backend".into()));
                n += 1;
            }
        }
        n
    }

    /// End `user`'s subscriptions to `channel` on this node.
    pub(crate) fn unsubscribe_local(self: &Arc<Self>, user: &str, channel: &str) -> usize {
        let ids: Vec<(ConnId, ConnHandle)> = {
            let st = self.lock();
            st.channels
                .get(channel)
                .map(|c| c.subs.iter().filter(|(_, h)| h.info.user == user).map(|(id, h)| (*id, h.clone())).collect())
                .unwrap_or_default()
        };
        for (id, h) in &ids {
            let push = Push::Unsubscribed {
                channel: channel.into(),
                code: CloseCode::ForceDisconnect as u16,
                reason: "unsubscribed by the backend".into(),
            };
            let _ = h.ctl.send(ConnMsg::Notice(Box::new(push)));
            self.unsubscribe(*id, channel);
        }
        ids.len()
    }

    /// Which of `users` are online now (on any node).
    pub async fn online(&self, users: &[String]) -> Result<Vec<String>, ErrorReply> {
        match self.cpresence.get() {
            Some(cp) => cp.online(users).await,
            None => Ok(self.presence.online(users)),
        }
    }

    /// Publications `from..` of `channel` in `epoch`: at most `limit`, and
    /// no more once `max_bytes` of payload are collected (at least one).
    pub async fn fetch(
        self: &Arc<Self>,
        channel: &str,
        epoch: &str,
        from: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Option<(Vec<Arc<SharedPublication>>, FetchEnd)> {
        let cutoff = self.age_cutoff(channel);
        {
            let st = self.lock();
            let Some(c) = st.channels.get(channel) else {
                return Some((vec![], FetchEnd::Done));
            };
            if c.header.epoch != epoch {
                return Some((vec![], FetchEnd::Lost));
            }
            if from < c.header.first {
                return Some((vec![], FetchEnd::Trimmed { first: c.header.first }));
            }
            // From the hot window when it holds `from`, or when `from` is
            // past the top (nothing to read); otherwise from the engine. On
            // Redis an idle channel's window may hold what aged out since:
            // the engine decides then.
            let back = c.hot.back().map_or(0, |p| p.publication().offset);
            // The window is contiguous: `from` sits at a known index.
            let at_from = c.hot.front().and_then(|f| c.hot.get(from.saturating_sub(f.publication().offset) as usize));
            let aged = self.redis.get().is_some() && at_from.is_some_and(|p| p.publication().time_ms < cutoff);
            if !aged
                && c.hot.front().is_some_and(|p| p.publication().offset <= from)
                && (from <= back || from > c.header.top)
            {
                let mut out = Vec::new();
                let mut bytes = 0;
                for p in c.hot.iter().filter(|p| p.publication().offset >= from) {
                    if out.len() >= limit || (bytes >= max_bytes && !out.is_empty()) {
                        break;
                    }
                    bytes += p.publication().payload.data.0.len();
                    out.push(p.clone());
                }
                return Some((out, FetchEnd::Done));
            }
        }
        let read = match self.redis.get() {
            Some(r) => match r.streams().range(channel, from, limit, max_bytes).await {
                Ok(pubs) => Ok(Ok(pubs)),
                // Redis unreachable is temporary: the position is not lost.
                Err(crate::engine::EngineError::Unavailable(_)) => return None,
                Err(e) => Ok(Err(e.to_string())),
            },
            None => {
                let hub = self.clone();
                let ch = channel.to_string();
                tokio::task::spawn_blocking(move || {
                    hub.store.range(&ch, from, limit, max_bytes).map_err(|e| e.to_string())
                })
                .await
            }
        };
        match read {
            Ok(Ok(pubs)) => {
                // Records of another epoch are leftovers of a reset stream.
                let pubs: Vec<Publication> = pubs.into_iter().filter(|p| p.epoch == epoch).collect();
                // On Redis other nodes trim (by count or age): a stream that
                // starts after `from`, or with what aged out, lost `from`.
                if self.redis.get().is_some() && pubs.first().is_some_and(|p| p.offset > from || p.time_ms < cutoff) {
                    return Some((
                        vec![],
                        match pubs.first() {
                            Some(p) if p.time_ms >= cutoff => FetchEnd::Trimmed { first: p.offset },
                            _ => FetchEnd::Lost,
                        },
                    ));
                }
                Some((pubs.into_iter().map(SharedPublication::new).collect(), FetchEnd::Done))
            }
            Ok(Err(e)) => {
                tracing::warn!(%channel, from, "fetch failed, the subscriber's position is given up: {e}");
                Some((vec![], FetchEnd::Lost))
            }
            Err(e) => {
                tracing::warn!(%channel, from, "fetch task failed: {e}");
                Some((vec![], FetchEnd::Lost))
            }
        }
    }

    /// Publications of `channel` with a time below this (ms) are past its
    /// namespace's age limit; 0 when it has none.
    fn age_cutoff(&self, channel: &str) -> u64 {
        crate::engine::Retention::of(self.cfg.namespace(channel)).cutoff(now_ms())
    }

    /// A channel's current stream header: from Redis on the Redis engine
    /// (other nodes publish too), else from memory; none before its first
    /// publication.
    pub async fn stream_header(&self, channel: &str) -> Result<Option<StreamHeader>, ErrorReply> {
        match self.redis.get() {
            Some(r) => r
                .streams()
                .read_header(channel, self.age_cutoff(channel))
                .await
                .map_err(|e| ErrorReply::with_message(ErrorCode::Unavailable, e.to_string())),
            None => Ok(self.lock().channels.get(channel).map(|c| c.header.clone())),
        }
    }

    /// History query: by offsets or times, oldest or newest first, capped at
    /// 1,000 publications and 1 MiB of payload.
    pub async fn history(self: &Arc<Self>, h: &HistoryRequest) -> Result<ReplyBody, ErrorReply> {
        const MAX_BYTES: usize = 1 << 20;
        channel::validate(&h.channel)?;
        // Past the namespace's age limit nothing is served, on either engine
        // (the embedded one trims once a second, Redis when it reads).
        let cutoff = self.age_cutoff(&h.channel);
        let Some(header) = self.stream_header(&h.channel).await? else {
            let top = StreamPosition { epoch: String::new(), offset: 0 };
            return Ok(ReplyBody::History { publications: vec![], top });
        };
        let top = StreamPosition { epoch: header.epoch.clone(), offset: header.top };
        let limit = (h.limit as usize).min(1000);
        let mut lo = header.first;
        let mut hi = header.top;
        let mut by_time = false;
        for (b, lower) in [(&h.since, true), (&h.until, false)] {
            match b {
                Some(HistoryBound::Offset(o)) if lower => lo = lo.max(*o),
                Some(HistoryBound::Offset(o)) => hi = hi.min(*o),
                Some(HistoryBound::TimeMs(_)) => by_time = true,
                None => {}
            }
        }
        if limit == 0 || lo > hi {
            return Ok(ReplyBody::History { publications: vec![], top });
        }
        // Offset-only queries read just the page; time bounds scan the range.
        let (start, count) = match (by_time, h.reverse) {
            (false, false) => (lo, limit),
            (false, true) => (hi.saturating_sub(limit as u64 - 1).max(lo), limit),
            (true, _) => (lo, (hi - lo + 1) as usize),
        };
        let max_bytes = if by_time { usize::MAX } else { MAX_BYTES };
        let pubs = match self.redis.get() {
            Some(r) => r
                .streams()
                .range(&h.channel, start, count, max_bytes)
                .await
                .map_err(|e| ErrorReply::with_message(ErrorCode::Unavailable, e.to_string()))?,
            None => {
                let hub = self.clone();
                let ch = h.channel.clone();
                tokio::task::spawn_blocking(move || hub.store.range(&ch, start, count, max_bytes))
                    .await
                    .map_err(|_| ErrorReply::new(ErrorCode::Internal))?
                    .map_err(|_| ErrorReply::new(ErrorCode::Unavailable))?
            }
        };
        let in_time = |p: &Publication| {
            let after = match &h.since {
                Some(HistoryBound::TimeMs(t)) => p.time_ms >= *t,
                _ => true,
            };
            let before = match &h.until {
                Some(HistoryBound::TimeMs(t)) => p.time_ms <= *t,
                _ => true,
            };
            after && before
        };
        let mut pubs: Vec<Publication> = pubs
            .into_iter()
            .filter(|p| p.epoch == header.epoch && p.offset <= hi && p.time_ms >= cutoff && in_time(p))
            .collect();
        if h.reverse {
            pubs.reverse();
        }
        pubs.truncate(limit);
        Ok(ReplyBody::History { publications: pubs, top })
    }

    /// Presence of a channel (every node), paginated by client id.
    pub async fn presence(
        &self,
        channel: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<ClientInfo>, ErrorReply> {
        if !self.cfg.namespace(channel).presence {
            return Err(ErrorReply::new(ErrorCode::NotAvailable));
        }
        match self.cpresence.get() {
            Some(cp) => cp.list(channel, after, limit).await,
            None => Ok(self.presence.list(channel, after, limit)),
        }
    }

    /// Presence counts of a channel (every node).
    pub async fn presence_stats(&self, channel: &str) -> Result<Stats, ErrorReply> {
        if !self.cfg.namespace(channel).presence {
            return Err(ErrorReply::new(ErrorCode::NotAvailable));
        }
        match self.cpresence.get() {
            Some(cp) => cp.stats(channel).await,
            None => Ok(self.presence.stats(channel)),
        }
    }

    /// Commit a batch built by the sequencer, then apply it in memory.
    fn apply(
        &self,
        batch: Batch,
        replies: Vec<(ReplyTo, Result<Stored, ErrorReply>)>,
        hot_trim: &HashMap<String, u64>,
    ) {
        let started = std::time::Instant::now();
        let result = if batch.is_empty() { Ok(()) } else { self.store.commit(&batch) };
        if !batch.is_empty() {
            self.metrics.commit_took(started.elapsed());
        }
        if let Err(e) = result {
            tracing::error!("store commit failed: {e}");
            for (r, _) in replies {
                r.send(Err(ErrorReply::new(ErrorCode::Unavailable)));
            }
            return;
        }
        self.stats.commits.fetch_add(1, Ordering::Relaxed);
        self.stats.stored.fetch_add(batch.appends.len() as u64, Ordering::Relaxed);
        for p in batch.appends.iter().filter(|_| self.webhooks.is_some()) {
            if let Some(by) = &p.publisher {
                self.hook(crate::webhooks::Hook::Publish {
                    user: by.user.clone(),
                    channel: p.channel.clone(),
                    offset: p.offset,
                    message_id: p.message_id.clone(),
                    b64data: ferry_core::base64::encode(&p.payload.data.0),
                });
            }
        }
        let committed = Committed {
            headers: batch.headers,
            trims: hot_trim.clone(),
            publications: batch.appends.into_iter().map(SharedPublication::new).collect(),
        };
        self.broker.publish(committed);
        for (r, res) in replies {
            r.send(res);
        }
    }
}

/// How often publications past their namespace's age limit are trimmed, ms.
const EXPIRY_EVERY_MS: u64 = 1000;

/// Trim publications older than their namespace's `history_ttl_secs`.
fn expire_by_age(
    hub: &Hub,
    now: u64,
    headers: &mut BTreeMap<String, StreamHeader>,
    batch: &mut Batch,
    hot_trim: &mut HashMap<String, u64>,
) {
    let streams: Vec<(String, StreamHeader)> = {
        let st = hub.lock();
        st.channels
            .iter()
            .filter(|(_, c)| c.persisted && c.header.first <= c.header.top)
            .map(|(k, c)| (k.clone(), c.header.clone()))
            .collect()
    };
    for (ch, h) in streams {
        let ttl = hub.cfg.namespace(&ch).history_ttl_secs;
        if ttl == 0 {
            continue;
        }
        let cutoff = now.saturating_sub(ttl.saturating_mul(1000));
        // Bounded work per pass: the next pass continues.
        let Ok(oldest) = hub.store.range(&ch, h.first, 1024, usize::MAX) else {
            continue;
        };
        let expired = oldest.iter().take_while(|p| p.time_ms < cutoff).count() as u64;
        if expired == 0 {
            continue;
        }
        let first = h.first + expired;
        batch.trims.push((ch.clone(), first));
        hot_trim.insert(ch.clone(), first);
        headers.insert(ch, StreamHeader { first, ..h });
    }
}

/// A durably committed batch, as it travels from the sequencer to every
/// node's subscribers.
pub struct Committed {
    /// New stream headers.
    pub headers: Vec<(String, StreamHeader)>,
    /// Retention: offsets below these are gone, per channel.
    pub trims: HashMap<String, u64>,
    /// New publications, in commit order.
    pub publications: Vec<Arc<SharedPublication>>,
}

/// Fan-out between nodes: the sequencer hands every committed batch to the
/// broker, which hands it to [`Hub::deliver_local`] on every node (this one
/// included), in commit order per channel. The single-node broker calls it
/// directly; a networked one (Redis pub/sub) carries batches between nodes.
pub trait Broker: Send + Sync + 'static {
    /// Fan out one committed batch.
    fn publish(&self, batch: Committed);
}

/// The single-node broker.
pub struct LocalBroker {
    hub: std::sync::OnceLock<std::sync::Weak<Hub>>,
}

impl Broker for LocalBroker {
    fn publish(&self, batch: Committed) {
        if let Some(hub) = self.hub.get().and_then(std::sync::Weak::upgrade) {
            hub.deliver_local(batch);
        }
    }
}

impl Hub {
    /// Apply a committed batch to this node: stream headers, hot windows,
    /// and a copy of each publication to every local subscriber's queue.
    pub fn deliver_local(&self, batch: Committed) {
        let mut lagged = Vec::new();
        {
            let mut st = self.lock();
            for (ch, h) in &batch.headers {
                let c = st.channels.entry(ch.clone()).or_insert_with(|| Chan {
                    header: h.clone(),
                    persisted: true,
                    hot: VecDeque::new(),
                    subs: BTreeMap::new(),
                    holds: BTreeMap::new(),
                    admitted: 0,
                });
                merge_header(c, h);
                if let Some(first) = batch.trims.get(ch) {
                    while c.hot.front().is_some_and(|p| p.publication().offset < *first) {
                        c.hot.pop_front();
                    }
                }
            }
            for shared in batch.publications {
                let Some(c) = st.channels.get_mut(&shared.publication().channel) else {
                    continue;
                };
                // The hot window stays contiguous: on Redis a fan-out
                // message can be missed (pub/sub is at most once), and a
                // window with a hole would serve a fetch without it.
                let offset = shared.publication().offset;
                match c.hot.back().map(|p| p.publication().offset) {
                    Some(back) if offset <= back => {}
                    Some(back) if offset != back + 1 => {
                        c.hot.clear();
                        c.hot.push_back(shared.clone());
                    }
                    _ => c.hot.push_back(shared.clone()),
                }
                if c.hot.len() > HOT_WINDOW {
                    c.hot.pop_front();
                }
                for h in c.subs.values() {
                    // Design: a full queue drops the live copy instead of
                    // dropping the subscriber; the session fetches the
                    // missing offsets from the store at its own pace. A
                    // client that truly cannot keep up is closed by its
                    // session's send-queue and redelivery bounds.
                    if h.data.try_send(shared.clone()).is_err() && !h.lagged.swap(true, Ordering::AcqRel) {
                        lagged.push(h.clone());
                    }
                }
            }
        }
        for h in lagged {
            let _ = h.ctl.send(ConnMsg::Lagged);
        }
    }
}

/// Where a subscription starts in a stream, given the client's position.
fn stream_start(qos: Qos, h: &StreamHeader, since: Option<&StreamPosition>) -> StreamStart {
    let (from, recovered) = match since {
        None => (h.top + 1, true),
        Some(p) if p.epoch == h.epoch && p.offset <= h.top && p.offset + 1 >= h.first => (p.offset + 1, true),
        // The client saw offsets the stream no longer has (Redis lost its
        // tail): they are void; it continues after what is there, told. The
        // epoch is not bumped on a client's word (any subscriber could reset
        // a channel for everyone); nodes bump it from what they saw.
        Some(p) if p.epoch == h.epoch && p.offset > h.top => (h.top + 1, false),
        // Nothing was ever trimmed and the client had seen nothing: no gap.
        Some(p) if p.offset == 0 && h.first == 1 => (1, true),
        Some(_) => (h.first, false),
    };
    StreamStart { qos, epoch: h.epoch.clone(), top: h.top, from, recovered }
}

/// Apply a header from the engine or a committed batch: another epoch
/// replaces the stream (and drops its hot window), the same epoch only
/// moves forward, whatever order the news arrives in.
fn merge_header(c: &mut Chan, h: &StreamHeader) {
    if c.header.epoch != h.epoch {
        c.header = h.clone();
        c.hot.clear();
    } else {
        c.header.top = c.header.top.max(h.top);
        c.header.first = c.header.first.max(h.first);
    }
    c.persisted = true;
}

/// Key of an offline cursor.
pub fn cursor_key(user: &str, device: &str, channel: &str) -> String {
    format!("{user}\u{0}{device}\u{0}{channel}")
}

/// What identifies a publish's content for dedup: the first 16 bytes of
/// the SHA-256 of its (uncompressed) data. Stable across builds, since it
/// is stored with the message id.
pub(crate) fn payload_digest(data: &[u8]) -> [u8; 16] {
    use sha2::Digest;
    let full = sha2::Sha256::digest(data);
    let mut d = [0; 16];
    d.copy_from_slice(&full[..16]);
    d
}

/// Design: message ids are unique per server, not per channel (`release`
/// names only the id). A retry of the same publish (same channel, same
/// data) is a duplicate; any other publish with a used id is refused with
/// 107 instead of being silently answered with the first publish's offset.
fn same_publish(
    id: &str,
    first_channel: &str,
    first_digest: Option<[u8; 16]>,
    channel: &str,
    digest: &[u8; 16],
) -> Result<(), ErrorReply> {
    if first_channel != channel {
        return Err(ErrorReply::with_message(
            ErrorCode::BadRequest,
            format!("{MESSAGE_ID_REUSED}: {id:?} was published into another channel; use a fresh id"),
        ));
    }
    // Entries from before digests were stored can only be checked by channel.
    if first_digest.is_some_and(|d| d != *digest) {
        return Err(ErrorReply::with_message(
            ErrorCode::BadRequest,
            format!("{MESSAGE_ID_REUSED}: {id:?} was published with other data; use a fresh id"),
        ));
    }
    Ok(())
}

/// The sequencer loop: batch, assign offsets, dedup, commit, fan out.
fn sequencer(hub: std::sync::Weak<Hub>, rx: std::sync::mpsc::Receiver<SeqReq>) {
    // A commit has a fixed cost (page tree, checksums, fsync) of about as
    // much as 1,000 inserts: under load, larger batches are cheaper per
    // publish; idle, a batch is whatever is queued (often one).
    const MAX_BATCH: usize = 4096;
    let mut last_expiry = now_ms();
    loop {
        let first = match rx.recv_timeout(std::time::Duration::from_millis(EXPIRY_EVERY_MS)) {
            Ok(r) => Some(r),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => None,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
        };
        let mut reqs: Vec<SeqReq> = first.into_iter().collect();
        while !reqs.is_empty() && reqs.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(r) => reqs.push(r),
                Err(_) => break,
            }
        }
        let Some(hub) = hub.upgrade() else { return };
        let now = now_ms();
        let mut batch = Batch { appends: Vec::with_capacity(reqs.len()), ..Batch::default() };
        batch.dedup_put.reserve(reqs.len());
        let mut replies = Vec::with_capacity(reqs.len());
        let mut headers: BTreeMap<String, StreamHeader> = BTreeMap::new();
        let mut fresh: HashMap<String, (Stored, String, [u8; 16])> = HashMap::with_capacity(reqs.len());
        let mut hot_trim = HashMap::new();
        if now >= last_expiry + EXPIRY_EVERY_MS {
            last_expiry = now;
            expire_by_age(&hub, now, &mut headers, &mut batch, &mut hot_trim);
        }
        if reqs.is_empty() && batch.is_empty() {
            continue;
        }
        let known = {
            let ids: Vec<&str> = reqs
                .iter()
                .filter_map(|r| match r {
                    SeqReq::Publish { message_id, .. } | SeqReq::Release(message_id) => Some(message_id.as_str()),
                    SeqReq::Cursor(..) => None,
                })
                .collect();
            hub.store.dedup_many(&ids)
        };
        for r in reqs {
            match r {
                SeqReq::Publish { channel, message_id, qos, data, publisher, reply } => {
                    let digest = payload_digest(&data);
                    if let Some((s, first_channel, first_digest)) = fresh.get(&message_id) {
                        let r = same_publish(&message_id, first_channel, Some(*first_digest), &channel, &digest)
                            .map(|()| Stored { duplicate: true, ..s.clone() });
                        replies.push((reply, r));
                        continue;
                    }
                    match known.as_ref().map(|k| k.get(&message_id)) {
                        Ok(Some(e)) if e.expires_ms > now => {
                            let r = same_publish(&message_id, &e.channel, e.digest, &channel, &digest).map(|()| {
                                hub.stats.duplicates.fetch_add(1, Ordering::Relaxed);
                                Stored { epoch: e.epoch.clone(), offset: e.offset, duplicate: true }
                            });
                            replies.push((reply, r));
                            continue;
                        }
                        Ok(_) => {}
                        Err(_) => {
                            replies.push((reply, Err(ErrorReply::new(ErrorCode::Unavailable))));
                            continue;
                        }
                    }
                    let h = headers.entry(channel.clone()).or_insert_with(|| {
                        let st = hub.lock();
                        st.channels.get(&channel).map(|c| c.header.clone()).unwrap_or_else(|| StreamHeader {
                            epoch: new_epoch(),
                            first: 1,
                            top: 0,
                        })
                    });
                    h.top += 1;
                    let keep = hub.cfg.namespace(&channel).history_size as u64;
                    if h.top - h.first + 1 > keep {
                        // One trim per channel and batch (below): a full
                        // history moves on every publish.
                        h.first = h.top + 1 - keep;
                        hot_trim.insert(channel.clone(), h.first);
                    }
                    let stored = Stored { epoch: h.epoch.clone(), offset: h.top, duplicate: false };
                    let hold = if qos == Qos::ExactlyOnce { QOS2_HOLD_MS } else { DEDUP_WINDOW_MS };
                    batch.dedup_put.push((
                        message_id.clone(),
                        DedupEntry {
                            channel: channel.clone(),
                            epoch: h.epoch.clone(),
                            offset: h.top,
                            expires_ms: now + hold,
                            digest: Some(digest),
                        },
                    ));
                    batch.appends.push(Publication {
                        channel: channel.clone(),
                        epoch: h.epoch.clone(),
                        offset: h.top,
                        message_id: message_id.clone(),
                        qos,
                        publisher,
                        time_ms: now,
                        payload: Payload { z: false, data: Bytes(data) },
                    });
                    fresh.insert(message_id, (stored.clone(), channel, digest));
                    replies.push((reply, Ok(stored)));
                }
                SeqReq::Release(id) => {
                    // Design: a released QoS 2 id falls back to the ordinary
                    // dedup window instead of vanishing at once, so a late
                    // duplicate frame still finds it.
                    if let Some(mut e) = known.as_ref().ok().and_then(|k| k.get(&id)).cloned() {
                        e.expires_ms = e.expires_ms.min(now + DEDUP_WINDOW_MS);
                        batch.dedup_put.push((id, e));
                    }
                }
                SeqReq::Cursor(key, epoch, offset) => batch.cursors.push((key, (epoch, offset))),
            }
        }
        batch.headers = headers.into_iter().collect();
        // `hot_trim` holds each channel's highest trim (age and size).
        batch.trims = hot_trim.iter().map(|(c, f)| (c.clone(), *f)).collect();
        hub.apply(batch, replies, &hot_trim);
    }
}

#[cfg(test)]
mod tests {
    /// Every connection's control channel allocates blocks of 32 messages
    /// of this size: keep large variants boxed.
    #[test]
    fn a_control_message_stays_small() {
        let size = std::mem::size_of::<super::ConnMsg>();
        assert!(size <= 64, "ConnMsg is {size} bytes");
    }
}
