//! The Redis stream engine: a channel's stream, message ids and offline
//! cursors in Redis, shared by every node (docs/CLUSTER.md section 3).
//!
//! Design: a publish batch for one channel is one Lua script, so offset
//! assignment, dedup, append, retention and the fan-out message are one
//! atomic step on the Redis shard that owns the channel (all its keys share
//! the hash tag `{<channel>}`). Message ids are unique server-wide, so each
//! is first claimed under its own key (`SET NX`); a claim for the same
//! channel and digest goes on to the script, whose per-channel id key gives
//! the original offset. A node dying between the two steps leaves only the
//! claim, and the client's retry completes the publish.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use ferry_core::frame::{ClientInfo, Payload, Publication, Qos};
use ferry_core::ErrorCode;
use redis::aio::ConnectionManager;
use redis::cluster_async::ClusterConnection;
use serde::{Deserialize, Serialize};

use super::cluster_link::{ClusterConn, ClusterLink};
use super::pubsub::{Credentials, NodeAddr};
use super::sentinel::SentinelLink;
use super::tls::RedisTls;
use super::{hex, EngineError, Known, PublishItem, Retention};
use crate::store::StreamHeader;

/// `[redis]` settings.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port[/db]` URLs: one = a standalone
    /// Redis (or a primary); several = seed nodes of a Redis Cluster; with
    /// `sentinel_master`, the Sentinels (one or more). `rediss://` = TLS,
    /// to these and to the nodes found through them (all URLs alike).
    pub urls: Vec<String>,
    /// The name of the primary the Sentinels at `urls` watch (`SENTINEL
    /// get-master-addr-by-name`); unset = no Sentinel. The URLs' user and
    /// password are used for the Sentinels and the data nodes alike.
    pub sentinel_master: Option<String>,
    /// Key prefix (default `ferry`), so several deployments can share one Redis.
    pub prefix: String,
    /// `leader` (acknowledged once the primary has the write) or
    /// `replicated` (also after `WAIT 1` confirmed a replica).
    pub durability: Durability,
    /// PEM file of the CA certificates trusted for `rediss://`, instead of
    /// the public web roots (a private CA, a managed Redis's own CA);
    /// only with `rediss://` URLs.
    pub tls_ca: Option<std::path::PathBuf>,
}

impl RedisConfig {
    /// Reject settings that cannot work (without connecting or reading
    /// files): URLs that do not parse, a mix of `redis://` and
    /// `rediss://`, `tls_ca` without TLS.
    pub fn check(&self) -> Result<(), EngineError> {
        super::tls::validate(&self.parse_urls()?, self.tls_ca.is_some()).map(|_| ())
    }

    /// The TLS side of `rediss://` URLs, `tls_ca` read and checked; none
    /// for plain `redis://` (or no URL).
    pub fn tls(&self) -> Result<Option<Arc<RedisTls>>, EngineError> {
        RedisTls::new(&self.parse_urls()?, self.tls_ca.as_deref())
    }

    fn parse_urls(&self) -> Result<Vec<redis::ConnectionInfo>, EngineError> {
        self.urls
            .iter()
            .map(|u| {
                redis::IntoConnectionInfo::into_connection_info(u.as_str())
                    .map_err(|e| EngineError::Config(format!("redis.urls {}: {e}", crate::config::redact_url(u))))
            })
            .collect()
    }
}

/// When a publish counts as stored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Durability {
    /// The primary accepted the write.
    #[default]
    Leader,
    /// The primary accepted it and `WAIT 1` saw a replica confirm it.
    Replicated,
}

/// The outcome of one publish in a batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Appended {
    /// Stored now at this position.
    New {
        /// Epoch.
        epoch: String,
        /// Offset.
        offset: u64,
    },
    /// A retry of a publish stored earlier, at this position.
    Duplicate {
        /// Epoch (of the first store; may be an earlier epoch).
        epoch: String,
        /// Offset.
        offset: u64,
    },
    /// The id belongs to another publish (another channel or other data):
    /// error 107 with [`ferry_core::MESSAGE_ID_REUSED`].
    Conflict,
}

/// A batch as the script committed it.
#[derive(Clone, Debug)]
pub struct BatchResult {
    /// The stream after the batch.
    pub header: StreamHeader,
    /// Per publish, in order.
    pub items: Vec<Appended>,
}

/// What each log entry stores besides its offset, epoch and time.
#[derive(Serialize, Deserialize)]
struct ItemRec {
    message_id: String,
    qos: u8,
    publisher: Option<ClientInfo>,
    data: Vec<u8>,
}

/// One fan-out message as nodes receive it from Redis pub/sub.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FanOut {
    /// Channel.
    pub channel: String,
    /// The stream's epoch.
    pub epoch: String,
    /// The oldest retained offset after this batch.
    pub first: u64,
    /// The publications stored by one script call, in offset order.
    pub publications: Vec<Publication>,
}

#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    /// Replaced by a fresh connection when it answers only timeouts.
    Cluster(ClusterConn),
    Sentinel(Arc<SentinelLink>),
}

/// Run `$body` (a `RedisResult`) with `$c` bound to a connection of any
/// kind; gives a `Result<_, EngineError>`. On Sentinel, a failure that may
/// mean a failover has the Sentinels asked again, and a primary not known
/// yet answers unavailable at once. On a Cluster, a connection that answers
/// only timeouts is replaced.
macro_rules! on_conn {
    ($self:ident, |$c:ident| $body:expr) => {{
        let r: redis::RedisResult<_> = match $self.conn.clone() {
            Conn::Single(mut $c) => $body,
            Conn::Cluster(link) => {
                let mut $c = link.get();
                let r = $body;
                link.observe(&r);
                r
            }
            Conn::Sentinel(link) => {
                let mut $c = link.conn()?;
                let r = $body;
                if let Err(e) = &r {
                    link.failed(e);
                }
                r
            }
        };
        r.map_err(unavailable)
    }};
}

/// How long an id is remembered (QoS 0/1, and QoS 2 after release), ms.
const ID_TTL_MS: u64 = crate::hub::DEDUP_WINDOW_MS;
/// How long an unreleased QoS 2 id is held at most, ms.
const QOS2_TTL_MS: u64 = crate::hub::QOS2_HOLD_MS;

/// Age retention, shared by the scripts that write or read a header:
/// drops entries whose time `t` is below `cutoff` from the front of the
/// log, scanning at most `budget` of them, and returns the new `first`.
/// A log that is gone while the header says it holds offsets expired as a
/// whole (its key TTL, set at each publish, is the age limit).
const TRIM_AGE_LUA: &str = r#"
local function trim_age(log, first, top, cutoff, budget)
  if cutoff <= 0 or first > top then return first end
  if redis.call('EXISTS', log) == 0 then return top + 1 end
  local scanned = 0
  while scanned < budget do
    local batch = redis.call('XRANGE', log, '-', '+', 'COUNT', 128)
    local young = nil
    local cut = nil
    for _, e in ipairs(batch) do
      local f, t = e[2], nil
      for j = 1, #f, 2 do
        if f[j] == 't' then t = tonumber(f[j + 1]) end
      end
      local off = tonumber(string.match(e[1], '^(%d+)'))
      if t and t < cutoff then
        cut = off + 1
      else
        young = off
        break
      end
    end
    if cut then redis.call('XTRIM', log, 'MINID', tostring(cut)) end
    if young then return math.max(first, young) end
    if #batch < 128 then return top + 1 end
    scanned = scanned + #batch
  end
  -- Budget spent: the rest is trimmed by the next call.
  local e = redis.call('XRANGE', log, '-', '+', 'COUNT', 1)
  if #e == 0 then return top + 1 end
  return math.max(first, tonumber(string.match(e[1][1], '^(%d+)')))
end
"#;

/// How many expired entries one publish trims at most (the rest go with
/// the next publishes or header reads).
const AGE_BUDGET_PUBLISH: u64 = 256;
/// ... one header read (a subscribe, a history query).
const AGE_BUDGET_READ: u64 = 4096;

/// The publish script (docs/CLUSTER.md section 3). KEYS: meta, log, fan-out
/// channel, then one id key per publish. ARGV: fresh epoch, known epoch,
/// known top, history size, id TTL, QoS 2 TTL, now, publish command, age
/// cutoff, age limit (ms), then per publish: digest, QoS, record. Needs
/// [`TRIM_AGE_LUA`] before it.
const PUBLISH_LUA: &str = r#"
local meta, log, fan = KEYS[1], KEYS[2], KEYS[3]
local fresh, known_epoch, known_top = ARGV[1], ARGV[2], tonumber(ARGV[3])
local keep, ttl1, ttl2 = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local now, pubcmd = ARGV[7], ARGV[8]
local cutoff, max_age = tonumber(ARGV[9]), tonumber(ARGV[10])
local h = redis.call('HMGET', meta, 'epoch', 'first', 'top')
local epoch, first, top = h[1], tonumber(h[2]), tonumber(h[3])
if not epoch or not first or not top then
  -- A missing stream (never written, flushed, or lost): a fresh epoch,
  -- so no client position from before can be taken as valid.
  epoch, first, top = fresh, 1, 0
  redis.call('DEL', log)
elseif known_epoch == epoch and known_top > top then
  -- A node saw offsets this stream no longer has: its tail was lost.
  epoch, first, top = fresh, top + 1, top
  redis.call('DEL', log)
end
local out = {}
local fanout = {}
local n = #KEYS - 3
for i = 1, n do
  local idkey = KEYS[3 + i]
  local dg, q, rec = ARGV[8 + i * 3], ARGV[9 + i * 3], ARGV[10 + i * 3]
  local prev = redis.call('GET', idkey)
  if prev then
    local e, o, d = string.match(prev, '^([^|]*)|(%d+)|(.*)$')
    if d ~= dg then
      out[#out + 1] = {'conflict', '', '0'}
    else
      out[#out + 1] = {'dup', e, o}
    end
  else
    top = top + 1
    redis.call('XADD', log, tostring(top) .. '-1', 'e', epoch, 't', now, 'r', rec)
    local ttl = ttl1
    if q == '2' then ttl = ttl2 end
    redis.call('SET', idkey, epoch .. '|' .. tostring(top) .. '|' .. dg, 'PX', ttl)
    out[#out + 1] = {'new', epoch, tostring(top)}
    fanout[#fanout + 1] = tostring(top) .. ':' .. tostring(#rec) .. ':' .. rec
  end
end
if top - first + 1 > keep then
  first = top + 1 - keep
  redis.call('XTRIM', log, 'MINID', tostring(first))
end
first = trim_age(log, first, top, cutoff, AGE_BUDGET)
if max_age > 0 and #fanout > 0 then
  -- Its newest entry is this batch: once that is too old, so is the log.
  redis.call('PEXPIRE', log, max_age)
end
redis.call('HSET', meta, 'epoch', epoch, 'first', first, 'top', top)
if #fanout > 0 then
  redis.call(pubcmd, fan, epoch .. '\n' .. tostring(first) .. '\n' .. now .. '\n' .. table.concat(fanout))
end
return {epoch, tostring(first), tostring(top), out}
"#;

/// A stream's header, created (empty, with the given epoch) if missing,
/// so every node tells its subscribers the same epoch; past the age limit
/// trimmed first, so `first` is exact. KEYS: meta, log, fan-out channel.
/// ARGV: fresh epoch ('' = never create), age cutoff, publish command, now.
/// Needs [`TRIM_AGE_LUA`] before it.
const ENSURE_LUA: &str = r#"
if ARGV[1] ~= '' and redis.call('HSETNX', KEYS[1], 'epoch', ARGV[1]) == 1 then
  redis.call('HSET', KEYS[1], 'first', 1, 'top', 0)
  redis.call('DEL', KEYS[2])
end
local h = redis.call('HMGET', KEYS[1], 'epoch', 'first', 'top')
if not h[1] or not h[2] or not h[3] then return {} end
local first, top = tonumber(h[2]), tonumber(h[3])
local nfirst = trim_age(KEYS[2], first, top, tonumber(ARGV[2]), AGE_BUDGET)
if nfirst ~= first then
  redis.call('HSET', KEYS[1], 'first', nfirst)
  -- Nodes drop the expired part of their hot windows (an empty batch).
  redis.call(ARGV[3], KEYS[3], h[1] .. '\n' .. tostring(nfirst) .. '\n' .. ARGV[4] .. '\n')
end
return {h[1], tostring(nfirst), h[3]}
"#;

/// Release: the ids go back to the ordinary window (never lengthened).
const RELEASE_LUA: &str = r#"
for i = 1, #KEYS do
  local t = redis.call('PTTL', KEYS[i])
  if t > tonumber(ARGV[1]) then redis.call('PEXPIRE', KEYS[i], ARGV[1]) end
end
return 1
"#;

/// Stream engine on Redis, standalone or Cluster.
#[derive(Clone)]
pub struct RedisStreams {
    conn: Conn,
    /// The publish path's own connection: with `replicated` it carries
    /// `WAIT`, which blocks its connection, and reads must not queue
    /// behind it. (On Sentinel the link holds both connections.)
    publisher: Conn,
    /// The configured URLs, parsed: credentials and seeds for the nodes
    /// found later (Cluster primaries, the Sentinels' primary).
    seeds: Arc<Vec<redis::ConnectionInfo>>,
    /// With `rediss://` URLs: the trust for every connection.
    tls: Option<Arc<RedisTls>>,
    prefix: String,
    durability: Durability,
    publish: std::sync::Arc<redis::Script>,
    release: std::sync::Arc<redis::Script>,
    ensure: std::sync::Arc<redis::Script>,
}

/// The publish script's reply: epoch, first, top, and per new or
/// duplicate publish (kind, epoch, offset).
type PublishReply = (String, String, String, Vec<(String, String, String)>);

/// Run a pipeline that starts with `inv`'s `EVALSHA`; a node that does not
/// have the script yet (a restart, a promoted replica) gets it loaded and
/// the pipeline runs again.
async fn pipeline_with_script<C: redis::aio::ConnectionLike>(
    pipe: &redis::Pipeline,
    inv: &redis::ScriptInvocation<'_>,
    c: &mut C,
) -> redis::RedisResult<Vec<redis::Value>> {
    match pipe.query_async::<Vec<redis::Value>>(c).await {
        Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
            inv.load_async(c).await?;
            pipe.query_async(c).await
        }
        r => r,
    }
}

/// A script with the age-trim function before it and its scan budget.
fn aged(script: &str, budget: u64) -> String {
    format!("local AGE_BUDGET = {budget}\n{TRIM_AGE_LUA}{script}")
}

fn unavailable(e: redis::RedisError) -> EngineError {
    EngineError::Unavailable(super::tls::explain(&e.to_string()))
}

/// A channel or id inside a key: hash tags must not be cut short by a
/// brace in the name, so `{`, `}` and `%` are percent-encoded.
fn tag(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    for ch in s.chars() {
        match ch {
            '{' => out.push_str("%7B"),
            '}' => out.push_str("%7D"),
            '%' => out.push_str("%25"),
            c => out.push(c),
        }
    }
    out
}

fn untag(s: &str) -> String {
    s.replace("%7B", "{").replace("%7D", "}").replace("%25", "%")
}

impl RedisStreams {
    /// Connect: one URL = standalone, several = Cluster seed nodes, with
    /// `sentinel_master` = Sentinels. Refuses a Redis whose
    /// `maxmemory-policy` could evict Ferry's keys.
    pub async fn connect(cfg: &RedisConfig) -> Result<Self, EngineError> {
        if cfg.urls.is_empty() {
            return Err(EngineError::Unavailable("no [redis] urls".into()));
        }
        let seeds = cfg.parse_urls()?;
        let tls = cfg.tls()?;
        let (conn, publisher) = match (cfg.sentinel_master.as_deref(), seeds.as_slice()) {
            (Some(master), _) => {
                let link = SentinelLink::connect(seeds.clone(), master, tls.clone()).await?;
                (Conn::Sentinel(link.clone()), Conn::Sentinel(link))
            }
            (None, [one]) => {
                let client = super::tls::client(one.clone(), tls.as_deref()).map_err(unavailable)?;
                let mc = redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(Duration::from_secs(5)))
                    .set_response_timeout(Some(Duration::from_secs(5)))
                    .set_number_of_retries(1);
                let conn = ConnectionManager::new_with_config(client.clone(), mc.clone()).await.map_err(unavailable)?;
                let publisher = ConnectionManager::new_with_config(client, mc).await.map_err(unavailable)?;
                (Conn::Single(conn), Conn::Single(publisher))
            }
            (None, many) => {
                // Design: `TRYAGAIN` (a multi-key script meeting a slot in
                // mid-migration), `CLUSTERDOWN` and `MASTERDOWN` are retried by the Cluster client after rand(min ..
                // 10 * 2^n) ms. Its default minimum of 1.28 s held every
                // publish met by a migration (and, through the sequencer
                // shard, its neighbours) for 1.28 s or more, though a
                // migration settles in milliseconds. With a minimum of 10 ms
                // the first retries come within 20, 40, 80 ... ms and the
                // waits still double, so the 16 retries outlast the 5 s
                // response timeout as before (retries used up in a failover
                // left the client answering "timed out" for good in a test).
                // A slot stuck in migration answers 115 after 5 s; the
                // client's retry is deduplicated (docs/CLUSTER.md section 7).
                let mut builder = redis::cluster::ClusterClient::builder(many.iter().cloned())
                    .connection_timeout(Duration::from_secs(5))
                    .response_timeout(Duration::from_secs(5))
                    .min_retry_wait(10);
                // The nodes the seeds name get the seeds' TLS mode; the CA too.
                if let Some(certs) = tls.as_ref().and_then(|t| t.certs()) {
                    builder = builder.certs(certs);
                }
                let client = builder.build().map_err(unavailable)?;
                let mut two = ClusterLink::connect(client, 2).await.map_err(unavailable)?.into_iter();
                let (conn, publisher) = (two.next().expect("two"), two.next().expect("two"));
                (Conn::Cluster(conn), Conn::Cluster(publisher))
            }
        };
        let prefix = if cfg.prefix.is_empty() { "ferry".to_string() } else { cfg.prefix.clone() };
        let streams = RedisStreams {
            conn,
            publisher,
            seeds: Arc::new(seeds),
            tls,
            prefix,
            durability: cfg.durability,
            publish: std::sync::Arc::new(redis::Script::new(&aged(PUBLISH_LUA, AGE_BUDGET_PUBLISH))),
            release: std::sync::Arc::new(redis::Script::new(RELEASE_LUA)),
            ensure: std::sync::Arc::new(redis::Script::new(&aged(ENSURE_LUA, AGE_BUDGET_READ))),
        };
        streams.check_eviction_policy().await?;
        Ok(streams)
    }

    /// `maxmemory-policy` must be `noeviction` on every primary: any other
    /// policy may drop streams and message ids under memory pressure,
    /// silently losing acknowledged publishes and breaking dedup. Where
    /// `CONFIG` is not allowed (managed Redis, ACLs), one warning.
    async fn check_eviction_policy(&self) -> Result<(), EngineError> {
        let mut conns: Vec<(String, redis::aio::MultiplexedConnection)> = Vec::new();
        let policy = |r: redis::RedisResult<Vec<String>>| r.map(|v| v.get(1).cloned());
        let mut answers: Vec<(String, redis::RedisResult<Option<String>>)> = Vec::new();
        let mut get = redis::cmd("CONFIG");
        get.arg("GET").arg("maxmemory-policy");
        match &self.conn {
            Conn::Single(c) => {
                answers.push((self.seeds[0].addr().to_string(), policy(get.query_async(&mut c.clone()).await)))
            }
            Conn::Sentinel(link) => {
                let mut c = link.conn()?;
                let at = link.primary().map(|a| a.to_string()).unwrap_or_default();
                answers.push((at, policy(get.query_async(&mut c).await)));
            }
            Conn::Cluster(_) => {
                for addr in self.fan_topology(&[]).await?.nodes {
                    conns.push((addr.to_string(), self.node_conn(&addr).await?));
                }
            }
        }
        for (at, mut c) in conns {
            answers.push((at, policy(get.query_async(&mut c).await)));
        }
        let mut warned = false;
        for (at, answer) in answers {
            match answer {
                Ok(Some(p)) if p == "noeviction" => {}
                Ok(Some(p)) => {
                    return Err(EngineError::Config(format!(
                        "Redis at {at} has maxmemory-policy {p:?}: set `maxmemory-policy noeviction` \
                         (eviction would drop streams and message ids, losing acknowledged publishes)"
                    )))
                }
                Ok(None) if !warned => {
                    warned = true;
                    tracing::warn!(redis = %at, "could not read maxmemory-policy; make sure it is noeviction");
                }
                Err(e) if e.code().is_some() && !warned => {
                    // A refusal (NOPERM, unknown command on managed Redis),
                    // not a broken link: the operator checks it instead.
                    warned = true;
                    tracing::warn!(
                        redis = %at,
                        "CONFIG GET maxmemory-policy not permitted ({e}); make sure maxmemory-policy is noeviction"
                    );
                }
                Err(e) if e.code().is_some() => {}
                Err(e) => return Err(unavailable(e)),
                Ok(None) => {}
            }
        }
        Ok(())
    }

    /// A direct connection to one node (Cluster discovery, checks).
    async fn node_conn(&self, addr: &NodeAddr) -> Result<redis::aio::MultiplexedConnection, EngineError> {
        let cfg = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(3)));
        self.node_client(addr)?
            .get_multiplexed_async_connection_with_config(&cfg)
            .await
            .map_err(|e| EngineError::Unavailable(super::tls::explain(&format!("{addr}: {e}"))))
    }

    /// A client for one node with the first URL's settings (credentials,
    /// database, TLS).
    fn node_client(&self, addr: &NodeAddr) -> Result<redis::Client, EngineError> {
        super::tls::client(super::tls::at(&self.seeds[0], addr), self.tls.as_deref()).map_err(unavailable)
    }

    /// TLS for fan-out links: with `rediss://` URLs, the client
    /// configuration; none for plain `redis://`.
    pub fn link_tls(&self) -> Option<Arc<tokio_rustls::rustls::ClientConfig>> {
        self.tls.as_ref().map(|t| t.rustls())
    }

    /// Credentials for fan-out links (those of the first URL).
    pub fn credentials(&self) -> Credentials {
        let r = self.seeds[0].redis_settings();
        Credentials { username: r.username().map(str::to_string), password: r.password().map(str::to_string) }
    }

    /// The commands fan-out subscribes and unsubscribes with: sharded ones
    /// on a Cluster (the script `SPUBLISH`es there).
    pub fn fan_commands(&self) -> (&'static str, &'static str) {
        match self.conn {
            Conn::Cluster(_) => ("SSUBSCRIBE", "SUNSUBSCRIBE"),
            _ => ("SUBSCRIBE", "UNSUBSCRIBE"),
        }
    }

    /// A client for classic pub/sub (`SUBSCRIBE`, the control channel):
    /// the server; on Sentinel the current primary (replicas get every
    /// `PUBLISH` too, so a demoted primary keeps delivering); on a Cluster
    /// one primary (a `PUBLISH` reaches every node of the cluster).
    pub async fn pubsub_client(&self) -> Result<redis::Client, EngineError> {
        let t = self.fan_topology(&[]).await?;
        let addr = t.nodes.first().ok_or_else(|| EngineError::Unavailable("no Redis node known".into()))?;
        self.node_client(addr)
    }

    /// Changes whenever the Sentinels' primary changes (Sentinel only).
    pub fn primary_changes(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        match &self.conn {
            Conn::Sentinel(l) => Some(l.changes()),
            _ => None,
        }
    }

    /// Fan-out lost its link to the primary: on Sentinel, ask again.
    pub fn suspect_primary(&self) {
        if let Conn::Sentinel(l) = &self.conn {
            l.suspect();
        }
    }

    /// The nodes fan-out subscribes on, and on a Cluster which of them owns
    /// which slots. On a Cluster, `CLUSTER SLOTS` from the first node of
    /// `hints` (the last known primaries) or the seeds that answers.
    pub async fn fan_topology(&self, hints: &[NodeAddr]) -> Result<Topology, EngineError> {
        let addr_of = super::tls::node_addr;
        match &self.conn {
            Conn::Single(_) => {
                let a = addr_of(&self.seeds[0])
                    .ok_or_else(|| EngineError::Unavailable("only redis:// and rediss:// URLs (TCP)".into()))?;
                Ok(Topology { nodes: vec![a], slots: Vec::new() })
            }
            Conn::Sentinel(l) => match l.primary() {
                Some(a) => Ok(Topology { nodes: vec![a], slots: Vec::new() }),
                None => Err(EngineError::Unavailable("no primary known (Sentinel failover in progress?)".into())),
            },
            Conn::Cluster(_) => {
                let mut why = String::from("no cluster node answered");
                let candidates = hints.iter().cloned().chain(self.seeds.iter().filter_map(addr_of));
                for at in candidates {
                    let asked = async {
                        let mut c = self.node_conn(&at).await?;
                        let v: redis::Value =
                            redis::cmd("CLUSTER").arg("SLOTS").query_async(&mut c).await.map_err(unavailable)?;
                        Topology::from_cluster_slots(&v, &at)
                    };
                    match asked.await {
                        Ok(t) => return Ok(t),
                        Err(e) => why = e.to_string(),
                    }
                }
                Err(EngineError::Unavailable(why))
            }
        }
    }

    fn key(&self, channel: &str, what: &str) -> String {
        format!("{}:{{{}}}:{what}", self.prefix, tag(channel))
    }

    /// The pub/sub channel carrying a channel's fan-out messages.
    pub fn fan_channel(&self, channel: &str) -> String {
        self.key(channel, "fan")
    }

    /// The channel a fan-out pub/sub channel name belongs to.
    pub fn channel_of_fan(&self, fan: &str) -> Option<String> {
        let rest = fan.strip_prefix(&self.prefix)?.strip_prefix(":{")?.strip_suffix("}:fan")?;
        Some(untag(rest))
    }

    fn id_key(&self, channel: &str, id: &str) -> String {
        self.key(channel, &format!("id:{}", tag(id)))
    }

    fn claim_key(&self, id: &str) -> String {
        format!("{}:mid:{{{}}}", self.prefix, tag(id))
    }

    fn cursor_key(&self, user: &str, device: &str, channel: &str) -> String {
        format!("{}:cur:{{{}}}:{}:{}", self.prefix, tag(user), tag(device), tag(channel))
    }

    /// Append a batch of publishes to one channel: dedup, offsets, retention
    /// and fan-out in one atomic script (after claiming each id). `known`
    /// is this node's last view of the stream, to notice a lost tail.
    pub async fn publish(
        &self,
        channel: &str,
        retention: Retention,
        known: Option<&Known>,
        items: &[PublishItem],
        now_ms: u64,
        fresh_epoch: &str,
    ) -> Result<BatchResult, EngineError> {
        // Claim every id server-wide; a claim held by another publish
        // refuses that item before the channel is touched.
        let mut conflict = vec![false; items.len()];
        {
            let claims: Vec<redis::Cmd> = items
                .iter()
                .map(|it| {
                    let ttl = if it.qos == Qos::ExactlyOnce { QOS2_TTL_MS } else { ID_TTL_MS };
                    let claim = format!("{}|{}", tag(channel), hex(&it.digest));
                    let mut cmd = redis::cmd("SET");
                    cmd.arg(self.claim_key(&it.message_id)).arg(claim).arg("NX").arg("PX").arg(ttl).arg("GET");
                    cmd
                })
                .collect();
            let pipe = |claims: Vec<redis::Cmd>| {
                let mut pipe = redis::pipe();
                for cmd in claims {
                    pipe.add_command(cmd);
                }
                pipe
            };
            let prev: Vec<Option<String>> = match self.conn.clone() {
                Conn::Single(mut c) => pipe(claims).query_async(&mut c).await.map_err(unavailable)?,
                Conn::Sentinel(link) => {
                    let mut c = link.conn()?;
                    let r = pipe(claims).query_async(&mut c).await;
                    if let Err(e) = &r {
                        link.failed(e);
                    }
                    r.map_err(unavailable)?
                }
                // Claims live on the shards of their ids: one command each,
                // all in flight together.
                Conn::Cluster(link) => {
                    let c = link.get();
                    let calls = claims.into_iter().map(|cmd| {
                        let mut c = c.clone();
                        async move { cmd.query_async::<Option<String>>(&mut c).await }
                    });
                    let r = futures_util::future::join_all(calls).await.into_iter().collect::<Result<_, _>>();
                    link.observe(&r);
                    r.map_err(unavailable)?
                }
            };
            for (i, (p, it)) in prev.iter().zip(items).enumerate() {
                if let Some(p) = p {
                    conflict[i] = *p != format!("{}|{}", tag(channel), hex(&it.digest));
                }
            }
        }
        let todo: Vec<&PublishItem> = items.iter().zip(&conflict).filter(|(_, c)| !**c).map(|(it, _)| it).collect();
        let mut inv = self.publish.prepare_invoke();
        inv.key(self.key(channel, "meta")).key(self.key(channel, "log")).key(self.fan_channel(channel));
        for it in &todo {
            inv.key(self.id_key(channel, &it.message_id));
        }
        let (known_epoch, known_top) = known.map(|k| (k.epoch.as_str(), k.top)).unwrap_or(("", 0));
        let pubcmd = self.pubcmd();
        inv.arg(fresh_epoch)
            .arg(known_epoch)
            .arg(known_top)
            .arg(retention.history_size.max(1))
            .arg(ID_TTL_MS)
            .arg(QOS2_TTL_MS)
            .arg(now_ms)
            .arg(pubcmd)
            .arg(retention.cutoff(now_ms))
            .arg(retention.max_age_ms);
        for it in &todo {
            let rec = ItemRec {
                message_id: it.message_id.clone(),
                qos: it.qos.as_u8(),
                publisher: it.publisher.clone(),
                data: it.data.clone(),
            };
            let rec = postcard::to_allocvec(&rec).expect("encoding a record cannot fail");
            inv.arg(hex(&it.digest)).arg(it.qos.as_u8()).arg(rec);
        }
        let replicated = self.durability == Durability::Replicated && !todo.is_empty();
        let (epoch, first, top, out) = self.run_publish(&inv, replicated, &self.key(channel, "meta")).await?;
        let num = |s: &str| s.parse::<u64>().map_err(|_| EngineError::Corrupt(format!("not a number: {s:?}")));
        let header = StreamHeader { epoch, first: num(&first)?, top: num(&top)? };
        let mut results = out.into_iter();
        let mut items_out = Vec::with_capacity(items.len());
        for c in conflict {
            if c {
                items_out.push(Appended::Conflict);
                continue;
            }
            let (kind, epoch, offset) = results.next().ok_or_else(|| EngineError::Corrupt("short reply".into()))?;
            items_out.push(match kind.as_str() {
                "new" => Appended::New { epoch, offset: num(&offset)? },
                "dup" => Appended::Duplicate { epoch, offset: num(&offset)? },
                _ => Appended::Conflict,
            });
        }
        Ok(BatchResult { header, items: items_out })
    }

    /// The publish script on the publisher's connection; with `replicated`
    /// followed by `WAIT 1` in the same pipeline. One pipeline keeps both on
    /// one connection, in order: a `WAIT` sent alone after a reconnect would
    /// cover nothing and still count the replicas, confirming a write no
    /// replica has.
    async fn run_publish(
        &self,
        inv: &redis::ScriptInvocation<'_>,
        replicated: bool,
        key: &str,
    ) -> Result<PublishReply, EngineError> {
        let mut pipe = redis::pipe();
        pipe.invoke_script(inv);
        if replicated {
            pipe.cmd("WAIT").arg(1).arg(1000);
        }
        let values: Vec<redis::Value> = match self.publisher.clone() {
            Conn::Single(mut c) => pipeline_with_script(&pipe, inv, &mut c).await.map_err(unavailable)?,
            Conn::Sentinel(link) => {
                let mut c = link.publisher()?;
                let r = pipeline_with_script(&pipe, inv, &mut c).await;
                if let Err(e) = &r {
                    link.failed(e);
                }
                r.map_err(unavailable)?
            }
            Conn::Cluster(link) => {
                let mut c = link.get();
                // Design: on a Cluster the script goes through the client's
                // own routing (it follows MOVED, ASK and TRYAGAIN during a
                // slot migration), then `WAIT` to the same primary; both on
                // the publisher's connection to that node. A reconnect of
                // that one node connection in between is the residual case.
                let reply: redis::RedisResult<PublishReply> = inv.invoke_async(&mut c).await;
                link.observe(&reply);
                let reply = reply.map_err(unavailable)?;
                if replicated {
                    self.wait_replica(&link, &mut c, key).await?;
                }
                return Ok(reply);
            }
        };
        let mut values = values.into_iter();
        let reply = values.next().ok_or_else(|| EngineError::Corrupt("no script reply".into()))?;
        if replicated {
            let n: i64 = values
                .next()
                .map(redis::from_redis_value)
                .transpose()
                .map_err(|e| EngineError::Unavailable(e.to_string()))?
                .unwrap_or(0);
            if n < 1 {
                return Err(EngineError::Unavailable("no replica confirmed the write in time (WAIT 1)".into()));
            }
        }
        redis::from_redis_value(reply).map_err(|e| EngineError::Corrupt(format!("publish reply: {e}")))
    }

    /// `WAIT 1` on the Cluster primary that took `key`'s writes: a replica
    /// confirmed them, or a temporary error.
    async fn wait_replica(&self, link: &ClusterConn, c: &mut ClusterConnection, key: &str) -> Result<(), EngineError> {
        use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
        let mut cmd = redis::cmd("WAIT");
        cmd.arg(1).arg(1000);
        let route = Route::new(slot(key.as_bytes()), SlotAddr::Master);
        let v = c.route_command(cmd, RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route))).await;
        link.observe(&v);
        let v = v.map_err(unavailable)?;
        let n: i64 = redis::from_redis_value(v).map_err(|e| EngineError::Unavailable(e.to_string()))?;
        if n < 1 {
            return Err(EngineError::Unavailable("no replica confirmed the write in time (WAIT 1)".into()));
        }
        Ok(())
    }

    /// How many times this engine's Cluster connections were replaced for
    /// answering only timeouts (always 0 off a Cluster).
    pub fn connections_replaced(&self) -> u64 {
        match &self.conn {
            Conn::Cluster(c) => c.replaced(),
            _ => 0,
        }
    }

    /// The stream header, if the stream exists.
    pub async fn header(&self, channel: &str) -> Result<Option<StreamHeader>, EngineError> {
        let mut cmd = redis::cmd("HMGET");
        cmd.arg(self.key(channel, "meta")).arg("epoch").arg("first").arg("top");
        let (e, f, t): (Option<String>, Option<u64>, Option<u64>) = on_conn!(self, |c| cmd.query_async(&mut c).await)?;
        Ok(match (e, f, t) {
            (Some(epoch), Some(first), Some(top)) => Some(StreamHeader { epoch, first, top }),
            _ => None,
        })
    }

    /// The stream header, creating an empty stream with `fresh_epoch` if
    /// there is none; publications older than `cutoff` (ms, 0 = none) are
    /// trimmed first, so `first` is exact.
    pub async fn ensure(&self, channel: &str, fresh_epoch: &str, cutoff: u64) -> Result<StreamHeader, EngineError> {
        self.aged_header(channel, fresh_epoch, cutoff).await?.ok_or_else(|| EngineError::Corrupt("no header".into()))
    }

    /// The stream header if the stream exists, after trimming publications
    /// older than `cutoff` (ms, 0 = none).
    pub async fn read_header(&self, channel: &str, cutoff: u64) -> Result<Option<StreamHeader>, EngineError> {
        self.aged_header(channel, "", cutoff).await
    }

    async fn aged_header(&self, channel: &str, fresh: &str, cutoff: u64) -> Result<Option<StreamHeader>, EngineError> {
        let mut inv = self.ensure.prepare_invoke();
        inv.key(self.key(channel, "meta")).key(self.key(channel, "log")).key(self.fan_channel(channel));
        inv.arg(fresh).arg(cutoff).arg(self.pubcmd()).arg(crate::hub::now_ms());
        let h: Vec<String> = on_conn!(self, |c| inv.invoke_async(&mut c).await)?;
        let num = |s: &str| s.parse::<u64>().map_err(|_| EngineError::Corrupt(format!("not a number: {s:?}")));
        match h.as_slice() {
            [] => Ok(None),
            [epoch, first, top] => Ok(Some(StreamHeader { epoch: epoch.clone(), first: num(first)?, top: num(top)? })),
            _ => Err(EngineError::Corrupt("header reply".into())),
        }
    }

    /// The command that fans out: sharded pub/sub on a Cluster.
    fn pubcmd(&self) -> &'static str {
        match self.conn {
            Conn::Single(_) | Conn::Sentinel(_) => "PUBLISH",
            Conn::Cluster(_) => "SPUBLISH",
        }
    }

    /// Whether this engine talks to a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self.conn, Conn::Cluster(_))
    }

    /// Publications with offsets `from..`, ascending: at most `limit`, and
    /// no more once `max_bytes` of payload are read (always at least one).
    /// Entries of another epoch than the stream's are left out.
    pub async fn range(
        &self,
        channel: &str,
        from: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<Publication>, EngineError> {
        let mut cmd = redis::cmd("XRANGE");
        cmd.arg(self.key(channel, "log")).arg(format!("{from}-0")).arg("+").arg("COUNT").arg(limit.max(1));
        type Entry = (String, HashMap<String, redis::Value>);
        let entries: Vec<Entry> = on_conn!(self, |c| cmd.query_async(&mut c).await)?;
        let mut out = Vec::new();
        let mut bytes = 0;
        for (id, fields) in entries {
            if out.len() >= limit || (bytes >= max_bytes && !out.is_empty()) {
                break;
            }
            let p = decode_entry(channel, &id, &fields)?;
            bytes += p.payload.data.0.len();
            out.push(p);
        }
        Ok(out)
    }

    /// QoS 2 second step: the id (claim and per-channel key) falls back to
    /// the ordinary window.
    pub async fn release(&self, channel: &str, message_id: &str) -> Result<(), EngineError> {
        // The two keys may live on different cluster shards: one call each.
        for key in [self.claim_key(message_id), self.id_key(channel, message_id)] {
            let mut inv = self.release.prepare_invoke();
            inv.key(key).arg(ID_TTL_MS);
            let _: i64 = on_conn!(self, |c| inv.invoke_async(&mut c).await)?;
        }
        Ok(())
    }

    /// The channel a message id was claimed for (to release it).
    pub async fn claimed_channel(&self, message_id: &str) -> Result<Option<String>, EngineError> {
        let mut cmd = redis::cmd("GET");
        cmd.arg(self.claim_key(message_id));
        let v: Option<String> = on_conn!(self, |c| cmd.query_async(&mut c).await)?;
        Ok(v.and_then(|v| v.split_once('|').map(|(c, _)| untag(c))))
    }

    /// Write an offline cursor.
    pub async fn put_cursor(
        &self,
        user: &str,
        device: &str,
        channel: &str,
        epoch: &str,
        offset: u64,
    ) -> Result<(), EngineError> {
        let mut cmd = redis::cmd("SET");
        cmd.arg(self.cursor_key(user, device, channel)).arg(format!("{epoch}|{offset}"));
        let _: () = on_conn!(self, |c| cmd.query_async(&mut c).await)?;
        Ok(())
    }

    /// Read an offline cursor.
    pub async fn cursor(&self, user: &str, device: &str, channel: &str) -> Result<Option<(String, u64)>, EngineError> {
        let mut cmd = redis::cmd("GET");
        cmd.arg(self.cursor_key(user, device, channel));
        let v: Option<String> = on_conn!(self, |c| cmd.query_async(&mut c).await)?;
        Ok(v.and_then(|v| {
            let (e, o) = v.rsplit_once('|')?;
            Some((e.to_string(), o.parse().ok()?))
        }))
    }

    /// Decode a fan-out message received on `fan`.
    pub fn decode_fanout(&self, fan: &str, payload: &[u8]) -> Result<FanOut, EngineError> {
        let channel = self.channel_of_fan(fan).ok_or_else(|| EngineError::Corrupt(format!("fan-out channel {fan}")))?;
        let bad = || EngineError::Corrupt("fan-out message".into());
        let (epoch, rest) = split_once(payload, b'\n').ok_or_else(bad)?;
        let (first, rest) = split_once(rest, b'\n').ok_or_else(bad)?;
        let (time, mut rest) = split_once(rest, b'\n').ok_or_else(bad)?;
        let epoch = String::from_utf8(epoch.to_vec()).map_err(|_| bad())?;
        let first: u64 = std::str::from_utf8(first).ok().and_then(|t| t.parse().ok()).ok_or_else(bad)?;
        let time_ms: u64 = std::str::from_utf8(time).ok().and_then(|t| t.parse().ok()).ok_or_else(bad)?;
        let mut publications = Vec::new();
        while !rest.is_empty() {
            let (offset, r) = split_once(rest, b':').ok_or_else(bad)?;
            let (len, r) = split_once(r, b':').ok_or_else(bad)?;
            let offset: u64 = std::str::from_utf8(offset).ok().and_then(|t| t.parse().ok()).ok_or_else(bad)?;
            let len: usize = std::str::from_utf8(len).ok().and_then(|t| t.parse().ok()).ok_or_else(bad)?;
            if r.len() < len {
                return Err(bad());
            }
            let (rec, r) = r.split_at(len);
            publications.push(to_publication(&channel, &epoch, offset, time_ms, rec)?);
            rest = r;
        }
        Ok(FanOut { channel, epoch, first, publications })
    }
}

/// Where fan-out subscribes: the nodes, and on a Cluster the slot ranges
/// each primary serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Topology {
    /// Standalone: the server; Sentinel: the primary; Cluster: every primary.
    pub nodes: Vec<NodeAddr>,
    /// Cluster only: `(first slot, last slot, index in nodes)`, sorted.
    pub slots: Vec<(u16, u16, usize)>,
}

impl Topology {
    /// The node a pub/sub channel's subscription goes to (None: a slot no
    /// primary serves right now).
    pub fn route(&self, fan_channel: &str) -> Option<usize> {
        if self.slots.is_empty() {
            return (!self.nodes.is_empty()).then_some(0);
        }
        let s = slot(fan_channel.as_bytes());
        self.slots.iter().find(|(lo, hi, _)| (*lo..=*hi).contains(&s)).map(|(_, _, i)| *i)
    }

    /// Parse a `CLUSTER SLOTS` reply given by the node at `asked`.
    fn from_cluster_slots(v: &redis::Value, asked: &NodeAddr) -> Result<Topology, EngineError> {
        use redis::Value;
        let bad = || EngineError::Corrupt(format!("CLUSTER SLOTS reply from {asked}"));
        let Value::Array(ranges) = v else { return Err(bad()) };
        let mut owned: Vec<(u16, u16, NodeAddr)> = Vec::new();
        for r in ranges {
            let Value::Array(r) = r else { return Err(bad()) };
            let (Some(Value::Int(lo)), Some(Value::Int(hi)), Some(Value::Array(primary))) =
                (r.first(), r.get(1), r.get(2))
            else {
                return Err(bad());
            };
            let host = match primary.first() {
                Some(Value::BulkString(h)) if !h.is_empty() => String::from_utf8_lossy(h).to_string(),
                // An unknown host (`""`): the node that answered.
                _ => asked.host.clone(),
            };
            let Some(Value::Int(port)) = primary.get(1) else { return Err(bad()) };
            let num = |n: i64| u16::try_from(n).map_err(|_| bad());
            owned.push((num(*lo)?, num(*hi)?, NodeAddr { host, port: num(*port)? }));
        }
        // Canonical (by slot), so two answers describing the same cluster
        // compare equal.
        owned.sort();
        let mut nodes: Vec<NodeAddr> = Vec::new();
        let mut slots = Vec::with_capacity(owned.len());
        for (lo, hi, addr) in owned {
            let i = nodes.iter().position(|n| *n == addr).unwrap_or_else(|| {
                nodes.push(addr);
                nodes.len() - 1
            });
            slots.push((lo, hi, i));
        }
        Ok(Topology { nodes, slots })
    }
}

/// Redis Cluster hash slot of a key (CRC16/XMODEM of its hash tag).
pub(crate) fn slot(key: &[u8]) -> u16 {
    let tagged = key
        .iter()
        .position(|b| *b == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            rest.iter().position(|b| *b == b'}').filter(|close| *close > 0).map(|close| &rest[..close])
        })
        .unwrap_or(key);
    let mut crc: u16 = 0;
    for b in tagged {
        crc ^= (*b as u16) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 { (crc << 1) ^ 0x1021 } else { crc << 1 };
        }
    }
    crc % 16384
}

fn split_once(b: &[u8], sep: u8) -> Option<(&[u8], &[u8])> {
    let i = b.iter().position(|x| *x == sep)?;
    Some((&b[..i], &b[i + 1..]))
}

fn to_publication(
    channel: &str,
    epoch: &str,
    offset: u64,
    time_ms: u64,
    rec: &[u8],
) -> Result<Publication, EngineError> {
    let r: ItemRec = postcard::from_bytes(rec).map_err(|e| EngineError::Corrupt(e.to_string()))?;
    Ok(Publication {
        channel: channel.to_string(),
        epoch: epoch.to_string(),
        offset,
        message_id: r.message_id,
        qos: Qos::from_u8(r.qos).unwrap_or(Qos::AtMostOnce),
        publisher: r.publisher,
        time_ms,
        payload: Payload { z: false, data: r.data.into() },
    })
}

fn decode_entry(channel: &str, id: &str, fields: &HashMap<String, redis::Value>) -> Result<Publication, EngineError> {
    let bad = |what: &str| EngineError::Corrupt(format!("log entry {id}: {what}"));
    let offset: u64 = id.split_once('-').and_then(|(o, _)| o.parse().ok()).ok_or_else(|| bad("id"))?;
    let field = |name: &str| -> Result<Vec<u8>, EngineError> {
        match fields.get(name) {
            Some(redis::Value::BulkString(b)) => Ok(b.clone()),
            Some(redis::Value::SimpleString(s)) => Ok(s.clone().into_bytes()),
            _ => Err(bad(name)),
        }
    };
    let epoch = String::from_utf8(field("e")?).map_err(|_| bad("epoch"))?;
    let time_ms = String::from_utf8(field("t")?).ok().and_then(|t| t.parse().ok()).ok_or_else(|| bad("time"))?;
    to_publication(channel, &epoch, offset, time_ms, &field("r")?)
}

/// The error a publish gets for a conflicting id.
pub fn conflict_error(message_id: &str) -> ferry_core::frame::ErrorReply {
    ferry_core::frame::ErrorReply::with_message(
        ErrorCode::BadRequest,
        format!(
            "{}: {message_id:?} was published into another channel or with other data; use a fresh id",
            ferry_core::MESSAGE_ID_REUSED
        ),
    )
}

/// Generic access for the other parts of the Redis engine (presence,
/// node registry), which keep their own scripts and key layout.
impl RedisStreams {
    /// Run one command.
    pub async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, EngineError> {
        on_conn!(self, |c| cmd.query_async(&mut c).await)
    }

    /// Run a script (loaded on first use by the `redis` crate).
    pub async fn invoke<T: redis::FromRedisValue>(&self, inv: &redis::ScriptInvocation<'_>) -> Result<T, EngineError> {
        on_conn!(self, |c| inv.invoke_async(&mut c).await)
    }

    /// A key of this deployment: `<prefix>:{<tag>}:<what>`, where `tag`
    /// (a channel, user or node) is the Redis Cluster hash tag.
    pub fn tagged_key(&self, tag_of: &str, what: &str) -> String {
        format!("{}:{{{}}}:{what}", self.prefix, tag(tag_of))
    }

    /// A key of this deployment without a hash tag of its own.
    pub fn plain_key(&self, what: &str) -> String {
        format!("{}:{what}", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_with_braces_keep_one_hash_tag() {
        assert_eq!(tag("a{b}c%"), "a%7Bb%7Dc%25");
        assert_eq!(untag(&tag("a{b}c%7B")), "a{b}c%7B");
        // Known values from the Redis Cluster specification.
        assert_eq!(slot(b"123456789"), 0x31C3, "CRC16/XMODEM check value, below 16384");
        assert_eq!(slot(b"{user1000}.following"), slot(b"{user1000}.followers"));
        assert_eq!(slot(b"foo{}{bar}"), slot(b"foo{}{bar}"));
    }
}
