//! The hub on the Redis engine: several nodes share streams, message ids
//! and offline cursors in Redis, and fan out through Redis pub/sub
//! (docs/CLUSTER.md). Connections, sessions and hot windows stay on their
//! node; [`crate::hub::Hub`] calls in here when `[redis] urls` are set.
//!
//! Design: publishes go to sequencer shards chosen by a hash of the
//! channel, so one channel's publishes keep their order and different
//! channels proceed in parallel. A shard drains its queue, groups it by
//! channel and makes one script call per channel batch. Fan-out comes back
//! through pub/sub links subscribed to the channels this node has
//! subscribers for: one link to the server (standalone) or to the primary
//! (Sentinel), one per primary on a Cluster, where each channel is
//! `SSUBSCRIBE`d on the shard that owns its slot. Any lost link, moved slot
//! or new primary rebuilds the whole set (rediscover, reconnect,
//! resubscribe); then every local subscriber catches up from the stream,
//! since pub/sub may have dropped messages meanwhile.

use std::collections::{BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use ferry_core::frame::{ClientInfo, ErrorReply, Qos};
use ferry_core::server::SharedPublication;
use ferry_core::ErrorCode;
use tokio::sync::{mpsc, watch, Notify};

use crate::engine::pubsub::{Link, LinkEvent, NodeAddr};
use crate::engine::redis::{conflict_error, Appended, RedisConfig, RedisStreams, Topology};
use crate::engine::{EngineError, Known, PublishItem, Retention};
use crate::hub::{Committed, Hub, ReplyTo, Stored};

/// Sequencer shards per node.
const SHARDS: usize = 8;
/// Most publishes one shard takes into one round.
const MAX_ROUND: usize = 1024;

/// A publish waiting for its shard.
pub(crate) struct RedisPublish {
    pub channel: String,
    pub item: PublishItem,
    pub reply: ReplyTo,
}

/// How long a subscribe waits for fan-out links that are being rebuilt
/// (a failover) before it answers "unavailable".
const WANT_WAIT: Duration = Duration::from_secs(5);
/// Between health checks of the links (pings; on a Cluster, a look at the
/// slot map). A safety net: a lost link, a moved slot and a new primary
/// are events that rebuild at once.
const CHECK_EVERY: Duration = Duration::from_secs(5);

/// This node's link to Redis.
pub struct RedisNode {
    streams: RedisStreams,
    shards: Vec<mpsc::UnboundedSender<RedisPublish>>,
    cursors: mpsc::UnboundedSender<(String, String, String, String, u64)>,
    fan: Arc<Fan>,
}

impl Drop for RedisNode {
    fn drop(&mut self) {
        // The fan-out task holds no reference to the node: tell it.
        self.fan.stop.notify_one();
    }
}

/// Fan-out state shared by `want`/`unwant` and the fan-out task.
struct Fan {
    state: tokio::sync::Mutex<FanState>,
    /// (generation of the link set, whether it is complete and live).
    up: watch::Sender<(u64, bool)>,
    /// Mirrors `up.1` for cheap reads (`/readyz`, metrics).
    fanout_up: AtomicBool,
    /// A subscribe found the slot map stale (`MOVED`).
    rebuild: Notify,
    /// The node is gone.
    stop: Notify,
}

#[derive(Default)]
struct FanState {
    /// Channels whose subscription Redis confirmed.
    channels: BTreeSet<String>,
    /// The live links, by index in `topology.nodes`.
    links: Vec<Arc<Link>>,
    topology: Option<Topology>,
}

fn unavailable(e: EngineError) -> ErrorReply {
    ErrorReply::with_message(ErrorCode::Unavailable, e.to_string())
}

impl RedisNode {
    /// Connect to Redis: standalone, Cluster or Sentinel (docs/CLUSTER.md).
    pub async fn connect(cfg: &RedisConfig) -> Result<RedisStreams, EngineError> {
        RedisStreams::connect(cfg).await
    }

    /// Start the node's tasks for `hub` (inside a tokio runtime).
    pub(crate) fn start(hub: Weak<Hub>, streams: RedisStreams) -> Arc<RedisNode> {
        let mut shards = Vec::with_capacity(SHARDS);
        let mut rxs = Vec::with_capacity(SHARDS);
        for _ in 0..SHARDS {
            let (tx, rx) = mpsc::unbounded_channel();
            shards.push(tx);
            rxs.push(rx);
        }
        let (cursors, cursor_rx) = mpsc::unbounded_channel();
        let fan = Arc::new(Fan {
            state: tokio::sync::Mutex::new(FanState::default()),
            up: watch::Sender::new((0, false)),
            fanout_up: AtomicBool::new(false),
            rebuild: Notify::new(),
            stop: Notify::new(),
        });
        let node = Arc::new(RedisNode { streams, shards, cursors, fan: fan.clone() });
        for rx in rxs {
            tokio::spawn(shard(hub.clone(), node.streams.clone(), rx));
        }
        tokio::spawn(cursor_writer(node.streams.clone(), cursor_rx));
        tokio::spawn(fanout(hub, fan, node.streams.clone()));
        node
    }

    /// The stream engine.
    pub fn streams(&self) -> &RedisStreams {
        &self.streams
    }

    /// Whether fan-out from Redis currently flows: every link the node
    /// needs (each Cluster primary's) is up and subscribed.
    pub fn fanout_up(&self) -> bool {
        self.fan.fanout_up.load(Ordering::Relaxed)
    }

    pub(crate) fn submit(&self, p: RedisPublish) {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        p.channel.hash(&mut h);
        let i = (h.finish() as usize) % self.shards.len();
        if let Err(mpsc::error::SendError(p)) = self.shards[i].send(p) {
            p.reply.send(Err(ErrorReply::new(ErrorCode::Unavailable)));
        }
    }

    pub(crate) fn put_cursor(&self, user: &str, device: &str, channel: &str, epoch: String, offset: u64) {
        let _ = self.cursors.send((user.into(), device.into(), channel.into(), epoch, offset));
    }

    /// Make sure fan-out of `channel` reaches this node; returns once Redis
    /// confirmed the subscription (on the shard owning the channel), so
    /// nothing published after is missed. While the links are being
    /// rebuilt it waits for them, up to [`WANT_WAIT`].
    pub(crate) async fn want(&self, channel: &str) -> Result<(), ErrorReply> {
        let deadline = tokio::time::Instant::now() + WANT_WAIT;
        let fan_channel = self.streams.fan_channel(channel);
        let (sub, _) = self.streams.fan_commands();
        let mut why = String::from("fan-out from Redis is down");
        loop {
            let (generation, was_up) = {
                let mut st = self.fan.state.lock().await;
                if st.channels.contains(channel) {
                    return Ok(());
                }
                let (generation, up) = *self.fan.up.borrow();
                if up {
                    let link = st.topology.as_ref().and_then(|t| t.route(&fan_channel)).and_then(|i| st.links.get(i));
                    match link {
                        Some(link) => match link.subscribe(sub, &[fan_channel.clone().into_bytes()]).await {
                            Ok(()) => {
                                st.channels.insert(channel.to_string());
                                return Ok(());
                            }
                            Err(e) => {
                                why = format!("fan-out subscription: {e}");
                                tracing::warn!(%channel, "{why}; rebuilding fan-out");
                                self.fan.rebuild.notify_one();
                            }
                        },
                        None => {
                            why = "no Redis node serves this channel's slot".into();
                            self.fan.rebuild.notify_one();
                        }
                    }
                }
                (generation, up)
            };
            // Wait for a link set (a newer one, if this one failed us).
            let mut rx = self.fan.up.subscribe();
            let ready = tokio::time::timeout_at(deadline, rx.wait_for(|(g, up)| *up && (!was_up || *g != generation)))
                .await
                .is_ok_and(|r| r.is_ok());
            if !ready {
                return Err(ErrorReply::with_message(ErrorCode::Unavailable, why));
            }
        }
    }

    /// Stop fan-out of `channel` to this node if `still_unused` holds
    /// (checked under the fan-out lock, so a concurrent `want` wins).
    pub(crate) async fn unwant(&self, channel: &str, still_unused: impl Fn() -> bool) {
        let mut st = self.fan.state.lock().await;
        if !st.channels.contains(channel) || !still_unused() {
            return;
        }
        st.channels.remove(channel);
        tracing::debug!(%channel, "no local subscriber left: fan-out unsubscribed");
        let fan_channel = self.streams.fan_channel(channel);
        let link = st.topology.as_ref().and_then(|t| t.route(&fan_channel)).and_then(|i| st.links.get(i));
        if let Some(link) = link {
            link.unsubscribe(self.streams.fan_commands().1, fan_channel.as_bytes()).await;
        }
    }
}

/// One sequencer shard: batches per channel, in arrival order.
async fn shard(hub: Weak<Hub>, streams: RedisStreams, mut rx: mpsc::UnboundedReceiver<RedisPublish>) {
    while let Some(first) = rx.recv().await {
        let mut round = vec![first];
        while round.len() < MAX_ROUND {
            match rx.try_recv() {
                Ok(p) => round.push(p),
                Err(_) => break,
            }
        }
        let mut order: Vec<String> = Vec::new();
        let mut by_channel: HashMap<String, Vec<RedisPublish>> = HashMap::new();
        for p in round {
            if !by_channel.contains_key(&p.channel) {
                order.push(p.channel.clone());
            }
            by_channel.entry(p.channel.clone()).or_default().push(p);
        }
        let Some(h) = hub.upgrade() else { return };
        let calls = order.into_iter().map(|ch| {
            let batch = by_channel.remove(&ch).unwrap_or_default();
            commit_channel(h.clone(), streams.clone(), ch, batch)
        });
        futures_util::future::join_all(calls).await;
    }
}

async fn commit_channel(hub: Arc<Hub>, streams: RedisStreams, channel: String, batch: Vec<RedisPublish>) {
    let known = hub.stream_top(&channel).map(|(epoch, top)| Known { epoch, top });
    let retention = Retention::of(hub.config().namespace(&channel));
    let items: Vec<PublishItem> = batch.iter().map(|p| p.item.clone()).collect();
    let started = std::time::Instant::now();
    let result = streams
        .publish(&channel, retention, known.as_ref(), &items, crate::hub::now_ms(), &crate::hub::new_epoch())
        .await;
    hub.metrics.commit_took(started.elapsed());
    match result {
        Ok(r) => {
            hub.learn_header(&channel, &r.header);
            for (p, a) in batch.into_iter().zip(r.items) {
                let res = match a {
                    Appended::New { epoch, offset } => {
                        hub.stats.stored.fetch_add(1, Ordering::Relaxed);
                        if let Some(by) = &p.item.publisher {
                            hub.publish_hook(by, &channel, offset, &p.item);
                        }
                        Ok(Stored { epoch, offset, duplicate: false })
                    }
                    Appended::Duplicate { epoch, offset } => {
                        hub.stats.duplicates.fetch_add(1, Ordering::Relaxed);
                        Ok(Stored { epoch, offset, duplicate: true })
                    }
                    Appended::Conflict => Err(conflict_error(&p.item.message_id)),
                };
                p.reply.send(res);
            }
            hub.stats.commits.fetch_add(1, Ordering::Relaxed);
        }
        Err(e) => {
            tracing::warn!(%channel, "Redis publish failed: {e}");
            for p in batch {
                p.reply.send(Err(unavailable(EngineError::Unavailable(e.to_string()))));
            }
        }
    }
}

/// Writes offline cursors in ack order (a later ack never loses to an
/// earlier one).
async fn cursor_writer(streams: RedisStreams, mut rx: mpsc::UnboundedReceiver<(String, String, String, String, u64)>) {
    while let Some((user, device, channel, epoch, offset)) = rx.recv().await {
        // Coalesce a burst: only the newest position per key is written.
        let mut latest: HashMap<(String, String, String), (String, u64)> = HashMap::new();
        let mut keys = Vec::new();
        let mut put = |u: String, d: String, c: String, e: String, o: u64| {
            let k = (u, d, c);
            if !latest.contains_key(&k) {
                keys.push(k.clone());
            }
            latest.insert(k, (e, o));
        };
        put(user, device, channel, epoch, offset);
        while let Ok((u, d, c, e, o)) = rx.try_recv() {
            put(u, d, c, e, o);
        }
        for k in keys {
            let (e, o) = &latest[&k];
            if let Err(err) = streams.put_cursor(&k.0, &k.1, &k.2, e, *o).await {
                // The next ack writes it again; a lost cursor only means a
                // device replays from an older position (QoS 1/2 dedup).
                tracing::warn!("offline cursor not written: {err}");
            }
        }
    }
}

/// Connect a link to every node of a fresh topology and subscribe every
/// wanted channel on the node owning it; installs the set only when all of
/// it is confirmed.
async fn build(
    fan: &Fan,
    streams: &RedisStreams,
    hints: &[NodeAddr],
    events: &mpsc::UnboundedSender<LinkEvent>,
) -> Result<Topology, String> {
    let topology = streams.fan_topology(hints).await.map_err(|e| e.to_string())?;
    let creds = streams.credentials();
    let tls = streams.link_tls();
    let links = futures_util::future::join_all(
        topology.nodes.iter().map(|a| Link::connect(a, &creds, tls.clone(), Duration::from_secs(2), events.clone())),
    )
    .await
    .into_iter()
    .collect::<Result<Vec<_>, _>>()
    .map_err(|e| e.to_string())?;
    let mut st = fan.state.lock().await;
    let mut per_node: Vec<Vec<Vec<u8>>> = vec![Vec::new(); links.len()];
    for ch in &st.channels {
        let f = streams.fan_channel(ch);
        let i = topology.route(&f).ok_or_else(|| format!("no Redis node serves the slot of {ch:?} yet"))?;
        per_node[i].push(f.into_bytes());
    }
    let (sub, _) = streams.fan_commands();
    let subscribed = futures_util::future::join_all(links.iter().zip(&per_node).map(|(l, chs)| l.subscribe(sub, chs)));
    for r in subscribed.await {
        r.map_err(|e| e.to_string())?;
    }
    st.links = links.into_iter().map(Arc::new).collect();
    st.topology = Some(topology.clone());
    tracing::debug!(channels = st.channels.len(), nodes = topology.nodes.len(), "Redis fan-out links up");
    Ok(topology)
}

/// Whether the installed links still answer and (Cluster) the slot map is
/// still the one they were built for.
async fn healthy(fan: &Fan, streams: &RedisStreams, topology: &Topology) -> Result<(), String> {
    let links: Vec<Arc<Link>> = fan.state.lock().await.links.clone();
    for l in links {
        l.ping().await.map_err(|e| format!("{}: {e}", l.addr()))?;
    }
    if !topology.slots.is_empty() {
        let now = streams.fan_topology(&topology.nodes).await.map_err(|e| e.to_string())?;
        if now != *topology {
            return Err("the cluster's slot map changed".into());
        }
    }
    Ok(())
}

/// The fan-out task: builds the link set, hands each fan-out message to the
/// hub, and rebuilds the whole set on any sign that it is incomplete (a link
/// lost, a subscription ended by the server, `MOVED`, a new primary, a
/// failed health check). After every rebuild the local subscribers catch up
/// from the streams.
async fn fanout(hub: Weak<Hub>, fan: Arc<Fan>, streams: RedisStreams) {
    let mut delay = Duration::from_millis(100);
    let mut first = true;
    let mut hints: Vec<NodeAddr> = Vec::new();
    let mut primary = streams.primary_changes();
    loop {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let built = tokio::select! {
            b = build(&fan, &streams, &hints, &tx) => b,
            _ = fan.stop.notified() => return,
        };
        drop(tx);
        let topology = match built {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!("Redis fan-out: {e}; retrying in {delay:?}");
                fan.state.lock().await.links.clear();
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = fan.stop.notified() => return,
                }
                delay = (delay * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        delay = Duration::from_millis(100);
        hints = topology.nodes.clone();
        if let Some(p) = primary.as_mut() {
            p.borrow_and_update();
        }
        fan.fanout_up.store(true, Ordering::Relaxed);
        fan.up.send_modify(|(g, up)| {
            *g += 1;
            *up = true;
        });
        if !first {
            tracing::info!(nodes = topology.nodes.len(), "Redis fan-out resubscribed; local subscribers catch up");
            if let Some(h) = hub.upgrade() {
                h.catch_up_all().await;
            }
        }
        first = false;
        let mut lost = false;
        let why = loop {
            let primary_changed = async {
                match primary.as_mut() {
                    Some(p) => p.changed().await.is_ok(),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                ev = rx.recv() => match ev {
                    Some(LinkEvent::Message { channel, payload }) => {
                        let Some(h) = hub.upgrade() else { return };
                        deliver(&h, &streams, &channel, &payload);
                    }
                    Some(LinkEvent::Dropped(ch)) => {
                        break format!("Redis ended the subscription to {} (slot moved?)", String::from_utf8_lossy(&ch));
                    }
                    Some(LinkEvent::Closed(why)) => {
                        lost = true;
                        break format!("link lost: {why}");
                    }
                    None => break "links gone".to_string(),
                },
                _ = fan.rebuild.notified() => break "a subscription was refused (slot map changed?)".to_string(),
                true = primary_changed => break "the Redis primary changed".to_string(),
                _ = tokio::time::sleep(CHECK_EVERY) => {
                    if let Err(e) = healthy(&fan, &streams, &topology).await {
                        lost = true;
                        break format!("health check: {e}");
                    }
                }
                _ = fan.stop.notified() => return,
            }
        };
        fan.fanout_up.store(false, Ordering::Relaxed);
        fan.up.send_modify(|(_, up)| *up = false);
        {
            let mut st = fan.state.lock().await;
            st.links.clear();
            st.topology = None;
        }
        if lost {
            streams.suspect_primary();
        }
        tracing::warn!("Redis fan-out: {why}; resubscribing");
    }
}

fn deliver(h: &Arc<Hub>, streams: &RedisStreams, channel: &[u8], payload: &[u8]) {
    match streams.decode_fanout(&String::from_utf8_lossy(channel), payload) {
        Ok(f) => h.deliver_local(Committed {
            headers: vec![(
                f.channel.clone(),
                crate::store::StreamHeader {
                    epoch: f.epoch.clone(),
                    first: f.first,
                    top: f.publications.last().map(|p| p.offset).unwrap_or(0),
                },
            )],
            trims: [(f.channel.clone(), f.first)].into_iter().collect(),
            publications: f.publications.into_iter().map(SharedPublication::new).collect(),
        }),
        Err(e) => tracing::warn!("fan-out message: {e}"),
    }
}

/// The digest the engines store with a message id.
pub(crate) fn item(message_id: String, qos: Qos, data: Vec<u8>, publisher: Option<ClientInfo>) -> PublishItem {
    PublishItem { digest: crate::hub::payload_digest(&data), message_id, qos, publisher, data }
}
