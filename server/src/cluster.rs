//! The hub on the Redis engine: several nodes share streams, message ids
//! and offline cursors in Redis, and fan out through Redis pub/sub
//! (docs/CLUSTER.md). Connections, sessions and hot windows stay on their
//! node; [`crate::hub::Hub`] calls in here when `[redis] urls` are set.
//!
//! Design: publishes go to sequencer shards chosen by a hash of the
//! channel, so one channel's publishes keep their order and different
//! channels proceed in parallel. A shard drains its queue, groups it by
//! channel and makes one script call per channel batch. Fan-out comes back
//! through one pub/sub connection per node, subscribed to the channels this
//! node has subscribers for; after that connection is lost and regained,
//! every local subscriber catches up from the stream, since pub/sub may
//! have dropped messages meanwhile.

use std::collections::{BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use ferry_core::frame::{ClientInfo, ErrorReply, Qos};
use ferry_core::server::SharedPublication;
use ferry_core::ErrorCode;
use futures_util::StreamExt;
use tokio::sync::mpsc;

use crate::engine::redis::{conflict_error, Appended, RedisConfig, RedisStreams};
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

/// This node's link to Redis.
pub struct RedisNode {
    streams: RedisStreams,
    shards: Vec<mpsc::UnboundedSender<RedisPublish>>,
    cursors: mpsc::UnboundedSender<(String, String, String, String, u64)>,
    interest: tokio::sync::Mutex<Interest>,
    /// The pub/sub link is up (fan-out flows).
    fanout_up: AtomicBool,
}

#[derive(Default)]
struct Interest {
    sink: Option<redis::aio::PubSubSink>,
    channels: BTreeSet<String>,
}

fn unavailable(e: EngineError) -> ErrorReply {
    ErrorReply::with_message(ErrorCode::Unavailable, e.to_string())
}

impl RedisNode {
    /// Connect to Redis; refuses a Redis Cluster for now (its sharded
    /// pub/sub fan-out is not built yet).
    pub async fn connect(cfg: &RedisConfig) -> Result<RedisStreams, EngineError> {
        let streams = RedisStreams::connect(cfg).await?;
        if streams.is_cluster() {
            return Err(EngineError::Unavailable(
                "Redis Cluster (several [redis] urls) is not supported yet: give one URL (standalone or primary)"
                    .into(),
            ));
        }
        Ok(streams)
    }

    /// Start the node's tasks for `hub` (inside a tokio runtime).
    pub(crate) fn start(hub: Weak<Hub>, streams: RedisStreams, cfg: &RedisConfig) -> Arc<RedisNode> {
        let mut shards = Vec::with_capacity(SHARDS);
        let mut rxs = Vec::with_capacity(SHARDS);
        for _ in 0..SHARDS {
            let (tx, rx) = mpsc::unbounded_channel();
            shards.push(tx);
            rxs.push(rx);
        }
        let (cursors, cursor_rx) = mpsc::unbounded_channel();
        let node = Arc::new(RedisNode {
            streams,
            shards,
            cursors,
            interest: tokio::sync::Mutex::new(Interest::default()),
            fanout_up: AtomicBool::new(false),
        });
        for rx in rxs {
            tokio::spawn(shard(hub.clone(), node.streams.clone(), rx));
        }
        tokio::spawn(cursor_writer(node.streams.clone(), cursor_rx));
        let url = cfg.urls.first().cloned().unwrap_or_default();
        tokio::spawn(fanout(hub, Arc::downgrade(&node), url));
        node
    }

    /// The stream engine.
    pub fn streams(&self) -> &RedisStreams {
        &self.streams
    }

    /// Whether fan-out from Redis currently flows.
    pub fn fanout_up(&self) -> bool {
        self.fanout_up.load(Ordering::Relaxed)
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
    /// confirmed the subscription, so nothing published after is missed.
    pub(crate) async fn want(&self, channel: &str) -> Result<(), ErrorReply> {
        let mut i = self.interest.lock().await;
        if i.channels.contains(channel) {
            return Ok(());
        }
        let Some(sink) = i.sink.as_mut() else {
            return Err(ErrorReply::with_message(ErrorCode::Unavailable, "fan-out from Redis is down"));
        };
        sink.subscribe(self.streams.fan_channel(channel))
            .await
            .map_err(|e| ErrorReply::with_message(ErrorCode::Unavailable, e.to_string()))?;
        i.channels.insert(channel.to_string());
        Ok(())
    }

    /// Stop fan-out of `channel` to this node if `still_unused` holds
    /// (checked under the interest lock, so a concurrent `want` wins).
    pub(crate) async fn unwant(&self, channel: &str, still_unused: impl Fn() -> bool) {
        let mut i = self.interest.lock().await;
        if !i.channels.contains(channel) || !still_unused() {
            return;
        }
        i.channels.remove(channel);
        if let Some(sink) = i.sink.as_mut() {
            let _ = sink.unsubscribe(self.streams.fan_channel(channel)).await;
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
    let retention = Retention { history_size: hub.config().namespace(&channel).history_size as u64 };
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

/// The pub/sub link: (re)connects, resubscribes the node's channels, and
/// hands each fan-out message to the hub. After a reconnect every local
/// subscriber catches up from the stream.
async fn fanout(hub: Weak<Hub>, node: Weak<RedisNode>, url: String) {
    let mut delay = Duration::from_millis(100);
    let mut first = true;
    loop {
        let Some(n) = node.upgrade() else { return };
        let link = async {
            let client = redis::Client::open(url.as_str())?;
            let ps = tokio::time::timeout(Duration::from_secs(5), client.get_async_pubsub())
                .await
                .map_err(|_| redis::RedisError::from((redis::ErrorKind::Io, "pub/sub connect timed out")))??;
            Ok::<_, redis::RedisError>(ps)
        };
        match link.await {
            Ok(ps) => {
                delay = Duration::from_millis(100);
                let (mut sink, mut stream) = ps.split();
                let resubscribed = {
                    let mut i = n.interest.lock().await;
                    let mut ok = true;
                    for ch in &i.channels {
                        ok &= sink.subscribe(n.streams.fan_channel(ch)).await.is_ok();
                    }
                    i.sink = Some(sink);
                    ok
                };
                if resubscribed {
                    let count = n.interest.lock().await.channels.len();
                    tracing::info!(channels = count, "Redis pub/sub link up");
                    n.fanout_up.store(true, Ordering::Relaxed);
                    if !first {
                        if let Some(h) = hub.upgrade() {
                            h.catch_up_all().await;
                        }
                    }
                    first = false;
                    drop(n);
                    while let Some(msg) = stream.next().await {
                        let (Some(h), Some(n)) = (hub.upgrade(), node.upgrade()) else { return };
                        match n.streams.decode_fanout(msg.get_channel_name(), msg.get_payload_bytes()) {
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
                }
                let Some(n) = node.upgrade() else { return };
                n.fanout_up.store(false, Ordering::Relaxed);
                n.interest.lock().await.sink = None;
                tracing::warn!("Redis pub/sub link lost; reconnecting");
            }
            Err(e) => {
                drop(n);
                tracing::warn!("Redis pub/sub: {e}; retrying in {delay:?}");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// The digest the engines store with a message id.
pub(crate) fn item(message_id: String, qos: Qos, data: Vec<u8>, publisher: Option<ClientInfo>) -> PublishItem {
    PublishItem { digest: crate::hub::payload_digest(&data), message_id, qos, publisher, data }
}
