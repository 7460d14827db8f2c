//! Presence, online users, webhook transitions and control messages
//! across the nodes of one Redis (docs/CLUSTER.md section 3, "Presence").
//!
//! Design: every change is one atomic script on keys of one hash tag, so
//! nodes agree on "first connection of a user" and "last one left" without
//! talking to each other:
//!
//! * `{<channel>}:pres` (client → node, user key, info), `{<channel>}:pusers`
//!   (user key → connections) and `{<channel>}:leaving` (user key → pending
//!   leave) hold a channel's presence;
//! * `{<user>}:online` holds the user's connections anywhere (client →
//!   node), a pending offline (`~off`) and the user's transition counter
//!   (`~n`), which numbers the `online`/`offline` webhooks;
//! * pending leaves and offlines wait in two sorted sets scored by their
//!   deadline (Redis's clock); whichever node's sweeper takes an entry out
//!   settles it, so each is announced once;
//! * nodes beat into a sorted set; a node whose beat is older than
//!   [`NODE_DEAD_MS`] is purged by the first node that notices: its
//!   connections leave and go offline through the same grace period.
//!
//! Changes from one node go through one ordered queue (a join is never
//! overtaken by its own leave). Join/leave pushes and user-level
//! disconnect/unsubscribe travel on the `ctl` pub/sub channel to every
//! node, at most once (pushes are notifications; the lists are the truth).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use ferry_core::frame::{ClientInfo, ErrorReply};
use ferry_core::CloseCode;
use ferry_core::ErrorCode;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::engine::redis::RedisStreams;
use crate::engine::EngineError;
use crate::hub::Hub;
use crate::presence::Stats;

/// How often a node beats and sweeps due leaves and offlines, ms.
pub const NODE_BEAT_MS: u64 = 500;
/// A node silent for this long is taken as dead and purged, ms.
pub const NODE_DEAD_MS: u64 = 3_000;
/// Most due entries one sweep settles.
const SWEEP_BATCH: usize = 256;

/// KEYS: pres, pusers, leaving. ARGV: client, node, user key, info.
/// Returns 1 when this is the user's first connection in the channel.
const JOIN_LUA: &str = r#"
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2] .. '\n' .. ARGV[3] .. '\n' .. ARGV[4]) == 0 then return 0 end
if redis.call('HINCRBY', KEYS[2], ARGV[3], 1) > 1 then return 0 end
if redis.call('HDEL', KEYS[3], ARGV[3]) == 1 then return 0 end
return 1
"#;

/// KEYS: pres, pusers, leaving. ARGV: token, node, then clients (empty
/// list: every client of `node`, for a dead node). Returns the user keys
/// whose last connection left (a leave is pending with `token`).
const LEAVE_LUA: &str = r#"
local clients = {}
if #ARGV > 2 then
  for i = 3, #ARGV do clients[#clients + 1] = ARGV[i] end
else
  local all = redis.call('HGETALL', KEYS[1])
  for i = 1, #all, 2 do
    if string.sub(all[i + 1], 1, #ARGV[2] + 1) == ARGV[2] .. '\n' then clients[#clients + 1] = all[i] end
  end
end
local gone = {}
for _, c in ipairs(clients) do
  local v = redis.call('HGET', KEYS[1], c)
  if v then
    redis.call('HDEL', KEYS[1], c)
    local _, user, info = string.match(v, '^([^\n]*)\n([^\n]*)\n(.*)$')
    local n = redis.call('HINCRBY', KEYS[2], user, -1)
    if n <= 0 then
      redis.call('HDEL', KEYS[2], user)
      redis.call('HSET', KEYS[3], user, ARGV[1] .. '\n' .. info)
      gone[#gone + 1] = user
    end
  end
end
return gone
"#;

/// KEYS: pusers, leaving. ARGV: user key, token. Returns the info to
/// announce when the user is still gone.
const SETTLE_LEAVE_LUA: &str = r#"
local v = redis.call('HGET', KEYS[2], ARGV[1])
if not v then return false end
local t, info = string.match(v, '^([^\n]*)\n(.*)$')
if t ~= ARGV[2] then return false end
redis.call('HDEL', KEYS[2], ARGV[1])
if tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0') > 0 then return false end
return info
"#;

/// KEYS: online. ARGV: client, node. Returns the transition number when
/// the user came online (not when back within the grace period).
const UP_LUA: &str = r#"
redis.call('PERSIST', KEYS[1])
local all = redis.call('HKEYS', KEYS[1])
local live = 0
for _, f in ipairs(all) do if string.sub(f, 1, 1) ~= '~' then live = live + 1 end end
if redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) == 0 then return false end
if live > 0 then return false end
if redis.call('HDEL', KEYS[1], '~off') == 1 then return false end
return redis.call('HINCRBY', KEYS[1], '~n', 1)
"#;

/// KEYS: online. ARGV: token, node, then clients (empty: every client of
/// `node`). Returns 1 when the user has no connection left (an offline is
/// pending with `token`).
const DOWN_LUA: &str = r#"
local removed = 0
if #ARGV > 2 then
  for i = 3, #ARGV do removed = removed + redis.call('HDEL', KEYS[1], ARGV[i]) end
else
  local all = redis.call('HGETALL', KEYS[1])
  for i = 1, #all, 2 do
    if all[i + 1] == ARGV[2] and string.sub(all[i], 1, 1) ~= '~' then
      removed = removed + redis.call('HDEL', KEYS[1], all[i])
    end
  end
end
if removed == 0 then return 0 end
for _, f in ipairs(redis.call('HKEYS', KEYS[1])) do
  if string.sub(f, 1, 1) ~= '~' then return 0 end
end
redis.call('HSET', KEYS[1], '~off', ARGV[1])
return 1
"#;

/// KEYS: online. ARGV: token. Returns the transition number of the
/// offline, when the user is still gone.
const SETTLE_OFF_LUA: &str = r#"
if redis.call('HGET', KEYS[1], '~off') ~= ARGV[1] then return false end
redis.call('HDEL', KEYS[1], '~off')
local n = redis.call('HINCRBY', KEYS[1], '~n', 1)
-- Only the counter is left: forgotten after a week without the user.
redis.call('PEXPIRE', KEYS[1], 604800000)
return n
"#;

/// KEYS: a deadline set. ARGV: member, delay ms. Scored by Redis's clock,
/// so nodes' clocks do not matter.
const SCHEDULE_LUA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
return 1
"#;

/// KEYS: a deadline set. ARGV: limit. Takes the due members out (each is
/// taken by exactly one caller).
const DUE_LUA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
for _, m in ipairs(due) do redis.call('ZREM', KEYS[1], m) end
return due
"#;

/// KEYS: nodes. ARGV: node, dead after ms. Beats; returns whether the node
/// was missing (taken for dead, or Redis lost it), then the dead nodes.
const BEAT_LUA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local added = redis.call('ZADD', KEYS[1], now, ARGV[1])
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]), 'LIMIT', 0, 16)
return {added, dead}
"#;

/// KEYS: nodes. ARGV: limit. The registered nodes, each followed by the
/// milliseconds since its beat (Redis's clock).
const NODES_LUA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local all = redis.call('ZRANGE', KEYS[1], 0, tonumber(ARGV[1]) - 1, 'WITHSCORES')
local out = {}
for i = 1, #all, 2 do
  out[#out + 1] = all[i]
  out[#out + 1] = math.max(0, now - tonumber(all[i + 1]))
end
return out
"#;

/// Most nodes [`ClusterPresence::nodes`] lists.
const NODES_LIMIT: usize = 1024;

/// A message on the control channel.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "k", rename_all = "snake_case")]
enum Ctl {
    Join { ch: String, info: ClientInfo },
    Leave { ch: String, info: ClientInfo },
    Kick { user: String, client: Option<String>, code: u16 },
    Unsub { user: String, ch: String },
}

/// One change, in the order this node made them.
enum Op {
    Join { channel: String, client: String, user: String, info: ClientInfo },
    Leave { channel: String, client: String },
    Up { user: String, client: String },
    Down { user: String, client: String },
}

struct Scripts {
    join: redis::Script,
    leave: redis::Script,
    settle_leave: redis::Script,
    up: redis::Script,
    down: redis::Script,
    settle_off: redis::Script,
    schedule: redis::Script,
    due: redis::Script,
    beat: redis::Script,
    stats: redis::Script,
    nodes: redis::Script,
}

/// This node's part of cluster-wide presence.
pub(crate) struct ClusterPresence {
    streams: RedisStreams,
    node: String,
    ops: mpsc::UnboundedSender<Op>,
    scripts: Arc<Scripts>,
    grace_ms: u64,
    /// Changes not written yet (the writer's backlog), for `/metrics`.
    backlog: AtomicU64,
}

/// Anonymous connections count as users of their own (as in
/// `presence::MemoryPresence`).
fn user_key(info: &ClientInfo) -> String {
    if info.user.is_empty() {
        format!("\u{1}anon:{}", info.client)
    } else {
        info.user.clone()
    }
}

fn unavailable(e: EngineError) -> ErrorReply {
    ErrorReply::with_message(ErrorCode::Unavailable, e.to_string())
}

impl ClusterPresence {
    /// Start this node's writer, sweeper and control listener.
    pub(crate) fn start(hub: Weak<Hub>, streams: RedisStreams, grace_ms: u64) -> Arc<ClusterPresence> {
        let (ops, rx) = mpsc::unbounded_channel();
        let scripts = Arc::new(Scripts {
            join: redis::Script::new(JOIN_LUA),
            leave: redis::Script::new(LEAVE_LUA),
            settle_leave: redis::Script::new(SETTLE_LEAVE_LUA),
            up: redis::Script::new(UP_LUA),
            down: redis::Script::new(DOWN_LUA),
            settle_off: redis::Script::new(SETTLE_OFF_LUA),
            schedule: redis::Script::new(SCHEDULE_LUA),
            due: redis::Script::new(DUE_LUA),
            beat: redis::Script::new(BEAT_LUA),
            stats: redis::Script::new("return {redis.call('HLEN', KEYS[1]), redis.call('HLEN', KEYS[2])}"),
            nodes: redis::Script::new(NODES_LUA),
        });
        let p = Arc::new(ClusterPresence {
            streams,
            node: crate::hub::new_epoch(),
            ops,
            scripts,
            grace_ms,
            backlog: AtomicU64::new(0),
        });
        tokio::spawn(writer(hub.clone(), Arc::downgrade(&p), rx));
        tokio::spawn(sweeper(hub.clone(), Arc::downgrade(&p)));
        tokio::spawn(control(hub, p.streams.plain_key("ctl"), p.streams.clone()));
        p
    }

    /// This node's id in the registry.
    pub(crate) fn node_id(&self) -> &str {
        &self.node
    }

    /// Presence changes of this node not yet written to Redis.
    pub(crate) fn backlog(&self) -> u64 {
        self.backlog.load(Ordering::Relaxed)
    }

    pub(crate) fn join(&self, channel: &str, info: &ClientInfo) {
        let _ = self.ops.send(Op::Join {
            channel: channel.into(),
            client: info.client.clone(),
            user: user_key(info),
            info: info.clone(),
        });
    }

    pub(crate) fn leave(&self, channel: &str, client: &str) {
        let _ = self.ops.send(Op::Leave { channel: channel.into(), client: client.into() });
    }

    pub(crate) fn user_up(&self, user: &str, client: &str) {
        if !user.is_empty() {
            let _ = self.ops.send(Op::Up { user: user.into(), client: client.into() });
        }
    }

    pub(crate) fn user_down(&self, user: &str, client: &str) {
        if !user.is_empty() {
            let _ = self.ops.send(Op::Down { user: user.into(), client: client.into() });
        }
    }

    fn ckey(&self, channel: &str, what: &str) -> String {
        self.streams.tagged_key(channel, what)
    }

    fn online_key(&self, user: &str) -> String {
        self.streams.tagged_key(user, "online")
    }

    /// Connections present in a channel on every node, by client id.
    pub(crate) async fn list(
        &self,
        channel: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<ClientInfo>, ErrorReply> {
        let mut cmd = redis::cmd("HVALS");
        cmd.arg(self.ckey(channel, "pres"));
        let vals: Vec<String> = self.streams.query(&cmd).await.map_err(unavailable)?;
        let mut v: Vec<ClientInfo> = vals
            .iter()
            .filter_map(|s| serde_json::from_str(s.splitn(3, '\n').nth(2)?).ok())
            .filter(|c: &ClientInfo| after.is_none_or(|a| c.client.as_str() > a))
            .collect();
        v.sort_by(|a, b| a.client.cmp(&b.client));
        v.truncate(limit);
        Ok(v)
    }

    /// Counts of a channel on every node.
    pub(crate) async fn stats(&self, channel: &str) -> Result<Stats, ErrorReply> {
        let mut inv = self.scripts.stats.prepare_invoke();
        inv.key(self.ckey(channel, "pres")).key(self.ckey(channel, "pusers"));
        let (clients, users): (u32, u32) = self.streams.invoke(&inv).await.map_err(unavailable)?;
        Ok(Stats { clients, users })
    }

    /// The nodes in the registry (at most [`NODES_LIMIT`], by beat time)
    /// with the milliseconds since each one's beat.
    pub(crate) async fn nodes(&self) -> Result<Vec<(String, u64)>, ErrorReply> {
        let mut inv = self.scripts.nodes.prepare_invoke();
        inv.key(self.streams.plain_key("nodes")).arg(NODES_LIMIT);
        // A flat reply (id, ms, id, ms, ...) reads as pairs, like HGETALL.
        self.streams.invoke(&inv).await.map_err(unavailable)
    }

    /// Connections of `user` anywhere (client → node).
    pub(crate) async fn connections(&self, user: &str) -> Result<Vec<(String, String)>, ErrorReply> {
        let mut cmd = redis::cmd("HGETALL");
        cmd.arg(self.online_key(user));
        let all: Vec<(String, String)> = self.streams.query(&cmd).await.map_err(unavailable)?;
        Ok(all.into_iter().filter(|(f, _)| !f.starts_with('~')).collect())
    }

    /// Which of `users` have a connection on any node.
    pub(crate) async fn online(&self, users: &[String]) -> Result<Vec<String>, ErrorReply> {
        let checks = users.iter().map(|u| async move { self.connections(u).await.map(|c| !c.is_empty()) });
        let found = futures_util::future::join_all(checks).await;
        let mut out = Vec::new();
        for (u, f) in users.iter().zip(found) {
            if f? {
                out.push(u.clone());
            }
        }
        Ok(out)
    }

    /// Send a control message to every node (this one included).
    async fn broadcast(&self, m: &Ctl) -> Result<(), ErrorReply> {
        let mut cmd = redis::cmd("PUBLISH");
        cmd.arg(self.streams.plain_key("ctl")).arg(serde_json::to_string(m).unwrap_or_default());
        let _: i64 = self.streams.query(&cmd).await.map_err(unavailable)?;
        Ok(())
    }

    /// Close the connections of `user` (or one client) on every node;
    /// returns how many there were.
    pub(crate) async fn disconnect(
        &self,
        user: &str,
        client: Option<&str>,
        code: CloseCode,
    ) -> Result<usize, ErrorReply> {
        let n = self.connections(user).await?.iter().filter(|(c, _)| client.is_none_or(|x| x == c)).count();
        self.broadcast(&Ctl::Kick { user: user.into(), client: client.map(Into::into), code: code as u16 }).await?;
        Ok(n)
    }

    /// End the subscriptions of `user` to `channel` on every node; returns
    /// how many there were.
    pub(crate) async fn unsubscribe(&self, user: &str, channel: &str) -> Result<usize, ErrorReply> {
        let n = self.list(channel, None, usize::MAX).await?.iter().filter(|c| c.user == user).count();
        self.broadcast(&Ctl::Unsub { user: user.into(), ch: channel.into() }).await?;
        Ok(n)
    }

    async fn schedule(&self, set: &str, member: String) -> Result<(), EngineError> {
        let mut inv = self.scripts.schedule.prepare_invoke();
        inv.key(self.streams.plain_key(set)).arg(member).arg(self.grace_ms);
        self.streams.invoke::<i64>(&inv).await.map(|_| ())
    }

    async fn apply(&self, hub: &Arc<Hub>, op: &Op) -> Result<(), EngineError> {
        match op {
            Op::Join { channel, client, user, info } => {
                let mut inv = self.scripts.join.prepare_invoke();
                inv.key(self.ckey(channel, "pres"))
                    .key(self.ckey(channel, "pusers"))
                    .key(self.ckey(channel, "leaving"));
                let json = serde_json::to_string(info).unwrap_or_default();
                inv.arg(client).arg(&self.node).arg(user).arg(json);
                let first: i64 = self.streams.invoke(&inv).await?;
                self.remember(&format!("node:{}", self.node), "chans", channel).await?;
                if first == 1 && hub.config().namespace(channel).join_leave {
                    let _ = self.broadcast(&Ctl::Join { ch: channel.clone(), info: info.clone() }).await;
                }
            }
            Op::Leave { channel, client } => self.leave_clients(channel, std::slice::from_ref(client)).await?,
            Op::Up { user, client } => {
                self.remember(&format!("node:{}", self.node), "users", user).await?;
                let mut inv = self.scripts.up.prepare_invoke();
                inv.key(self.online_key(user)).arg(client).arg(&self.node);
                let n: Option<u64> = self.streams.invoke(&inv).await?;
                if let Some(n) = n {
                    hub.cluster_hook(crate::webhooks::Hook::Online { user: user.clone(), transition: Some(n) });
                }
            }
            Op::Down { user, client } => self.down_clients(user, &self.node, std::slice::from_ref(client)).await?,
        }
        Ok(())
    }

    async fn remember(&self, tag: &str, what: &str, member: &str) -> Result<(), EngineError> {
        let mut cmd = redis::cmd("SADD");
        cmd.arg(self.streams.tagged_key(tag, what)).arg(member);
        self.streams.query::<i64>(&cmd).await.map(|_| ())
    }

    /// Remove clients (none: every client of the node in `ARGV`) from a
    /// channel's presence and schedule the leaves that follow.
    async fn leave_of(&self, channel: &str, node: &str, clients: &[String]) -> Result<(), EngineError> {
        let token = crate::hub::new_epoch();
        let mut inv = self.scripts.leave.prepare_invoke();
        inv.key(self.ckey(channel, "pres")).key(self.ckey(channel, "pusers")).key(self.ckey(channel, "leaving"));
        inv.arg(&token).arg(node);
        for c in clients {
            inv.arg(c);
        }
        let gone: Vec<String> = self.streams.invoke(&inv).await?;
        for user in gone {
            self.schedule("leaves", format!("{channel}\n{user}\n{token}")).await?;
        }
        Ok(())
    }

    async fn leave_clients(&self, channel: &str, clients: &[String]) -> Result<(), EngineError> {
        self.leave_of(channel, &self.node, clients).await
    }

    async fn down_clients(&self, user: &str, node: &str, clients: &[String]) -> Result<(), EngineError> {
        let token = crate::hub::new_epoch();
        let mut inv = self.scripts.down.prepare_invoke();
        inv.key(self.online_key(user)).arg(&token).arg(node);
        for c in clients {
            inv.arg(c);
        }
        let last: i64 = self.streams.invoke(&inv).await?;
        if last == 1 {
            self.schedule("offs", format!("{user}\n{token}")).await?;
        }
        Ok(())
    }

    /// Settle due leaves and offlines; purge dead nodes. Returns whether
    /// this node was missing from the registry (so must re-register).
    async fn sweep(&self, hub: &Arc<Hub>, may_purge: bool) -> Result<bool, EngineError> {
        let mut inv = self.scripts.beat.prepare_invoke();
        inv.key(self.streams.plain_key("nodes")).arg(&self.node).arg(NODE_DEAD_MS);
        let (added, dead): (i64, Vec<String>) = self.streams.invoke(&inv).await?;
        for d in dead.iter().filter(|d| may_purge && **d != self.node) {
            self.purge(d).await?;
        }
        let mut inv = self.scripts.due.prepare_invoke();
        inv.key(self.streams.plain_key("leaves")).arg(SWEEP_BATCH);
        let due: Vec<String> = self.streams.invoke(&inv).await?;
        for m in due {
            let mut parts = m.splitn(3, '\n');
            let (Some(ch), Some(user), Some(token)) = (parts.next(), parts.next(), parts.next()) else { continue };
            let mut inv = self.scripts.settle_leave.prepare_invoke();
            inv.key(self.ckey(ch, "pusers")).key(self.ckey(ch, "leaving")).arg(user).arg(token);
            let info: Option<String> = self.streams.invoke(&inv).await?;
            if let Some(info) = info.and_then(|i| serde_json::from_str::<ClientInfo>(&i).ok()) {
                if hub.config().namespace(ch).join_leave {
                    let _ = self.broadcast(&Ctl::Leave { ch: ch.into(), info }).await;
                }
            }
        }
        let mut inv = self.scripts.due.prepare_invoke();
        inv.key(self.streams.plain_key("offs")).arg(SWEEP_BATCH);
        let due: Vec<String> = self.streams.invoke(&inv).await?;
        for m in due {
            let Some((user, token)) = m.split_once('\n') else { continue };
            let mut inv = self.scripts.settle_off.prepare_invoke();
            inv.key(self.online_key(user)).arg(token);
            let n: Option<u64> = self.streams.invoke(&inv).await?;
            if let Some(n) = n {
                hub.cluster_hook(crate::webhooks::Hook::Offline { user: user.into(), transition: Some(n) });
            }
        }
        Ok(added == 1)
    }

    /// A dead node's connections leave every channel and go offline (after
    /// the grace period, as if they had closed). Idempotent: several nodes
    /// may purge the same node at once.
    async fn purge(&self, dead: &str) -> Result<(), EngineError> {
        let tag = format!("node:{dead}");
        let mut cmd = redis::cmd("SMEMBERS");
        cmd.arg(self.streams.tagged_key(&tag, "chans"));
        let chans: Vec<String> = self.streams.query(&cmd).await?;
        for ch in &chans {
            self.leave_of(ch, dead, &[]).await?;
        }
        let mut cmd = redis::cmd("SMEMBERS");
        cmd.arg(self.streams.tagged_key(&tag, "users"));
        let users: Vec<String> = self.streams.query(&cmd).await?;
        for u in &users {
            self.down_clients(u, dead, &[]).await?;
        }
        let mut cmd = redis::cmd("DEL");
        cmd.arg(self.streams.tagged_key(&tag, "chans")).arg(self.streams.tagged_key(&tag, "users"));
        self.streams.query::<i64>(&cmd).await?;
        let mut cmd = redis::cmd("ZREM");
        cmd.arg(self.streams.plain_key("nodes")).arg(dead);
        self.streams.query::<i64>(&cmd).await?;
        tracing::info!(node = dead, channels = chans.len(), users = users.len(), "purged a dead node's presence");
        Ok(())
    }
}

/// Applies this node's changes in order; a change that fails (Redis down)
/// is retried until it goes through, so the shared view converges.
/// Changes waiting to be written, in order. A join and the leave of the
/// same connection and channel, or the up and down of one connection, that
/// both wait cancel out: while Redis is down the backlog is bounded by the
/// live connections and subscriptions, not by how many came and went.
#[derive(Default)]
struct Backlog {
    next: u64,
    ops: std::collections::BTreeMap<u64, Op>,
    /// (a channel join?, channel or user, client) -> the waiting op.
    open: HashMap<(bool, String, String), u64>,
}

impl Backlog {
    fn push(&mut self, op: Op) {
        let key = match &op {
            Op::Leave { channel, client } => {
                if let Some(seq) = self.open.remove(&(true, channel.clone(), client.clone())) {
                    self.ops.remove(&seq);
                    return;
                }
                None
            }
            Op::Down { user, client } => {
                if let Some(seq) = self.open.remove(&(false, user.clone(), client.clone())) {
                    self.ops.remove(&seq);
                    return;
                }
                None
            }
            Op::Join { channel, client, .. } => Some((true, channel.clone(), client.clone())),
            Op::Up { user, client } => Some((false, user.clone(), client.clone())),
        };
        if let Some(k) = key {
            self.open.insert(k, self.next);
        }
        self.ops.insert(self.next, op);
        self.next += 1;
    }

    /// The oldest waiting change; from here on it is being written, so a
    /// later leave or down must be written too.
    fn pop(&mut self) -> Option<Op> {
        let (seq, op) = self.ops.pop_first()?;
        let key = match &op {
            Op::Join { channel, client, .. } => Some((true, channel.clone(), client.clone())),
            Op::Up { user, client } => Some((false, user.clone(), client.clone())),
            _ => None,
        };
        if let Some(k) = key {
            if self.open.get(&k) == Some(&seq) {
                self.open.remove(&k);
            }
        }
        Some(op)
    }

    fn len(&self) -> usize {
        self.ops.len()
    }
}

async fn writer(hub: Weak<Hub>, p: Weak<ClusterPresence>, mut rx: mpsc::UnboundedReceiver<Op>) {
    let mut backlog = Backlog::default();
    loop {
        while let Ok(op) = rx.try_recv() {
            backlog.push(op);
        }
        let op = match backlog.pop() {
            Some(op) => op,
            None => match rx.recv().await {
                Some(op) => {
                    backlog.push(op);
                    continue;
                }
                None => return,
            },
        };
        let mut delay = Duration::from_millis(50);
        loop {
            let (Some(h), Some(p)) = (hub.upgrade(), p.upgrade()) else { return };
            p.backlog.store(backlog.len() as u64 + 1, Ordering::Relaxed);
            match p.apply(&h, &op).await {
                Ok(()) => break,
                Err(e) => {
                    tracing::warn!(waiting = backlog.len() + 1, "presence change not written yet: {e}");
                    drop((h, p));
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                    // What came meanwhile may cancel out.
                    while let Ok(op) = rx.try_recv() {
                        backlog.push(op);
                    }
                }
            }
        }
        if let Some(p) = p.upgrade() {
            p.backlog.store(backlog.len() as u64, Ordering::Relaxed);
        }
    }
}

/// Beats, settles due leaves and offlines, purges dead nodes; re-registers
/// this node's connections when the registry lost it.
async fn sweeper(hub: Weak<Hub>, p: Weak<ClusterPresence>) {
    let mut first = true;
    // Since when sweeps succeed without a break: after an outage every
    // node's beat looks old, so nobody is purged until the live ones have
    // had a full node timeout to beat again.
    let mut up_since: Option<tokio::time::Instant> = None;
    let mut tick = tokio::time::interval(Duration::from_millis(NODE_BEAT_MS));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let (Some(h), Some(p)) = (hub.upgrade(), p.upgrade()) else { return };
        let may_purge = up_since.is_some_and(|t| t.elapsed() >= Duration::from_millis(NODE_DEAD_MS));
        match p.sweep(&h, may_purge).await {
            Ok(missing) => {
                up_since.get_or_insert_with(tokio::time::Instant::now);
                if missing && !first {
                    // Taken for dead (a pause, a partition) or Redis lost
                    // its data: put this node's connections back.
                    tracing::warn!("this node was missing from the Redis registry; re-registering its presence");
                    h.reregister_presence();
                }
                first = false;
            }
            Err(e) => {
                up_since = None;
                tracing::debug!("presence sweep: {e}");
            }
        }
    }
}

/// Listens to the control channel and applies each message locally.
async fn control(hub: Weak<Hub>, channel: String, streams: RedisStreams) {
    let mut delay = Duration::from_millis(100);
    loop {
        let link = async {
            // Asked again at every (re)connect: on Sentinel the primary moves.
            let client = streams
                .pubsub_client()
                .await
                .map_err(|e| redis::RedisError::from((redis::ErrorKind::Io, "no pub/sub node", e.to_string())))?;
            let mut ps = tokio::time::timeout(Duration::from_secs(5), client.get_async_pubsub())
                .await
                .map_err(|_| redis::RedisError::from((redis::ErrorKind::Io, "pub/sub connect timed out")))??;
            ps.subscribe(&channel).await?;
            Ok::<_, redis::RedisError>(ps)
        };
        match link.await {
            Ok(mut ps) => {
                delay = Duration::from_millis(100);
                let mut stream = ps.on_message();
                while let Some(msg) = stream.next().await {
                    let Some(h) = hub.upgrade() else { return };
                    match serde_json::from_slice::<Ctl>(msg.get_payload_bytes()) {
                        Ok(Ctl::Join { ch, info }) => {
                            h.broadcast_local(&ch, ferry_core::frame::Push::Join { channel: ch.clone(), info })
                        }
                        Ok(Ctl::Leave { ch, info }) => {
                            h.broadcast_local(&ch, ferry_core::frame::Push::Leave { channel: ch.clone(), info })
                        }
                        Ok(Ctl::Kick { user, client, code }) => {
                            let code = CloseCode::from_u16(code).unwrap_or(CloseCode::ForceDisconnect);
                            h.disconnect_local(&user, client.as_deref(), code);
                        }
                        Ok(Ctl::Unsub { user, ch }) => {
                            h.unsubscribe_local(&user, &ch);
                        }
                        Err(e) => tracing::warn!("control message: {e}"),
                    }
                }
                tracing::warn!("Redis control link lost; reconnecting");
            }
            Err(e) => {
                if hub.upgrade().is_none() {
                    return;
                }
                tracing::warn!("Redis control link: {e}; retrying in {delay:?}");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
    }
}
