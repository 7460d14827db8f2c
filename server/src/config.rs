//! Server configuration: a TOML file, every field with a production default.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ferry_core::frame::Qos;
use serde::{Deserialize, Serialize};

/// The whole configuration.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address for WebSocket connections and `/healthz`.
    pub listen: SocketAddr,
    /// Where the embedded store keeps its files.
    pub data_dir: PathBuf,
    /// Token verification. With no key configured the server runs in
    /// development mode: the connect token is taken as the user id.
    pub auth: AuthConfig,
    /// Allow connections with an empty token.
    pub allow_anonymous: bool,
    /// The backend HTTP API.
    pub api: ApiConfig,
    /// Callbacks to the business backend; off without a URL.
    pub webhooks: WebhookConfig,
    /// TLS for the listener (off without `cert` and `key`) and trust for
    /// outgoing HTTPS.
    pub tls: TlsConfig,
    /// Browser origins allowed to connect (exact `scheme://host[:port]`);
    /// empty = any. Connections without an Origin header are not browsers
    /// and are always allowed.
    pub allowed_origins: Vec<String>,
    /// Milliseconds a user stays present after their last connection
    /// leaves a channel, so a quick reconnect does not flap join/leave.
    pub presence_grace_ms: u64,
    /// Streams, message ids, cursors and fan-out in Redis, shared by every
    /// node (docs/CLUSTER.md); off without `urls` (the embedded engine).
    pub redis: crate::engine::redis::RedisConfig,
    /// Connection limits and timings.
    pub limits: Limits,
    /// Namespace options; the key is the part of a channel name before the
    /// first `:`; `default` applies to channels without a namespace and to
    /// namespaces not listed.
    pub namespaces: BTreeMap<String, Namespace>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:8000".parse().expect("valid address"),
            data_dir: PathBuf::from("ferry-data"),
            auth: AuthConfig::default(),
            api: ApiConfig::default(),
            webhooks: WebhookConfig::default(),
            tls: TlsConfig::default(),
            allowed_origins: Vec::new(),
            allow_anonymous: true,
            presence_grace_ms: 5_000,
            redis: Default::default(),
            limits: Limits::default(),
            namespaces: BTreeMap::new(),
        }
    }
}

/// TLS settings.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first. With `key`, the WebSocket port
    /// serves `wss://` (and `https://` for health and metrics).
    pub cert: Option<PathBuf>,
    /// PEM private key of the certificate.
    pub key: Option<PathBuf>,
    /// Serve the backend API over TLS too, with the same certificate.
    pub api: bool,
    /// Extra root certificates (PEM) trusted for outgoing HTTPS (webhooks,
    /// JWKS) beside the public web roots, e.g. a company CA.
    pub ca_file: Option<PathBuf>,
}

impl TlsConfig {
    /// Whether the listener serves TLS.
    pub fn enabled(&self) -> bool {
        self.cert.is_some() && self.key.is_some()
    }
}

/// Webhook settings.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebhookConfig {
    /// `http://` or `https://` URL of the receiver; empty = webhooks off.
    /// HTTPS trusts the public web roots and `tls.ca_file`.
    pub url: String,
    /// HMAC-SHA256 key for the `X-Ferry-Signature` header.
    pub secret: String,
    /// Events to send: online, offline, subscribe, unsubscribe, publish.
    pub events: Vec<String>,
    /// Namespaces whose client publishes are sent (with `publish` in events).
    pub publish_namespaces: Vec<String>,
    /// Events waiting to be sent; beyond it new events are dropped and counted.
    pub queue: usize,
    /// Retries after the first attempt.
    pub retries: u32,
    /// First retry delay, ms (doubling each time, at most 60 s).
    pub retry_initial_ms: u64,
    /// Per-call timeout, ms.
    pub timeout_ms: u64,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        WebhookConfig {
            url: String::new(),
            secret: String::new(),
            events: vec!["online".into(), "offline".into()],
            publish_namespaces: Vec::new(),
            queue: 10_000,
            retries: 5,
            retry_initial_ms: 500,
            timeout_ms: 5_000,
        }
    }
}

/// Backend API settings.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    /// Address of the API (its own port). The `ferry` command derives one
    /// when unset (the WebSocket port + 1); the library leaves the API off.
    pub listen: Option<SocketAddr>,
    /// Set false to turn the API off in the `ferry` command.
    pub enabled: bool,
    /// Accepted API keys (`Authorization: apikey <key>`). Empty = no key
    /// needed, which is only allowed on a loopback address.
    pub keys: Vec<String>,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig { listen: None, enabled: true, keys: Vec::new() }
    }
}

/// JWT verification settings.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// HS256 secret (at least 32 bytes).
    pub hmac_secret: Option<String>,
    /// RS256 public key: PEM text or a file path.
    pub rsa_public_key: Option<String>,
    /// ES256 public key: PEM text or a file path.
    pub ec_public_key: Option<String>,
    /// Accepted algorithms (default: those with a key); `none` is never accepted.
    pub algorithms: Option<Vec<String>>,
    /// URL of a JSON Web Key Set (`http(s)://`): RS256/ES256 keys chosen by
    /// the token's `kid`, refetched every `jwks_refresh_secs` and soon after
    /// an unknown `kid` (whose token is refused as temporary meanwhile).
    pub jwks_url: Option<String>,
    /// Seconds between JWKS refetches (at least 10).
    pub jwks_refresh_secs: u64,
    /// Clock skew tolerated on `exp`, seconds.
    pub leeway_secs: u64,
    /// Refuse tokens without `exp`.
    pub require_exp: bool,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            hmac_secret: None,
            rsa_public_key: None,
            ec_public_key: None,
            algorithms: None,
            jwks_url: None,
            jwks_refresh_secs: 300,
            leeway_secs: 5,
            require_exp: true,
        }
    }
}

/// Per-connection limits and timings.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest WebSocket message (and inflated payload), bytes.
    pub max_message_size: usize,
    /// Largest WebSocket frame (fragment), bytes.
    pub max_frame_size: usize,
    /// Subscriptions per connection.
    pub max_subscriptions: usize,
    /// Milliseconds from WebSocket open to `connect`.
    pub handshake_timeout_ms: u64,
    /// Milliseconds between pings.
    pub ping_interval_ms: u64,
    /// Milliseconds to wait for a pong.
    pub pong_timeout_ms: u64,
    /// Unacknowledged QoS 1/2 deliveries per connection.
    pub inflight_window: usize,
    /// Milliseconds before an unacknowledged delivery is pushed again.
    pub ack_timeout_ms: u64,
    /// Bytes waiting for one connection's socket before it is dropped as slow.
    pub max_queued_bytes: usize,
    /// Live publications queued from fan-out to one connection; beyond it the
    /// live copies are dropped and the connection catches up from the store.
    pub fanout_queue: usize,
    /// Payloads at least this large are compressed for clients that agree (0 = off).
    pub compress_min: u32,
    /// Publishes per second one connection may make (sustained; 0 = no limit).
    pub publish_rate: u32,
    /// Publishes one connection may make in a burst.
    pub publish_burst: u32,
    /// Connections one user may hold at once (0 = no limit).
    pub max_connections_per_user: u32,
    /// New connections one IP address may open per minute (0 = no limit).
    pub connections_per_ip_per_minute: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_size: 64 * 1024,
            max_frame_size: 64 * 1024,
            max_subscriptions: 256,
            handshake_timeout_ms: 10_000,
            ping_interval_ms: 25_000,
            pong_timeout_ms: 10_000,
            inflight_window: 256,
            ack_timeout_ms: 30_000,
            max_queued_bytes: 4 << 20,
            fanout_queue: 1024,
            compress_min: 1024,
            publish_rate: 1000,
            publish_burst: 2000,
            max_connections_per_user: 100,
            connections_per_ip_per_minute: 600,
        }
    }
}

/// Options of one namespace.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Namespace {
    /// Publications kept per channel.
    pub history_size: usize,
    /// Seconds a publication is kept (0 = no age limit).
    pub history_ttl_secs: u64,
    /// Presence queries allowed.
    pub presence: bool,
    /// Join/leave pushes.
    pub join_leave: bool,
    /// Clients may publish (else backend only).
    pub client_publish: bool,
    /// Highest QoS granted.
    pub max_qos: u8,
    /// Durable per-(user, device, channel) cursors: a device that comes
    /// back without a position of its own resumes where it left off.
    pub offline: bool,
    /// Subscribing needs a subscription token for the channel, or the
    /// channel listed in the connection token's `channels` claim.
    pub private: bool,
    /// Clients may publish into other users' personal channels
    /// (`#user:<id>`, governed by `[namespaces.user]` or `default`), for
    /// user-to-user delivery; each publication carries its verified
    /// publisher. Off by default: only the backend API publishes there,
    /// so no client can inject into someone's offline inbox (error 103).
    pub personal_publish: bool,
}

impl Default for Namespace {
    fn default() -> Self {
        Namespace {
            history_size: 1000,
            history_ttl_secs: 7 * 24 * 3600,
            presence: true,
            join_leave: false,
            client_publish: true,
            max_qos: 2,
            offline: true,
            private: false,
            personal_publish: false,
        }
    }
}

impl Namespace {
    /// Highest QoS as the enum.
    pub fn max_qos(&self) -> Qos {
        Qos::from_u8(self.max_qos.min(2)).unwrap_or(Qos::ExactlyOnce)
    }
}

/// Environment variables that are not configuration fields.
const NOT_FIELDS: &[&str] = &["FERRY_CONFIG", "FERRY_LOG", "FERRY_LOG_FORMAT", "FERRY_HMAC_SECRET"];

/// Find the field path a `FERRY_...` name refers to, walking the config
/// tree (unset options included): `FERRY_LIMITS_PING_INTERVAL_MS` →
/// `limits.ping_interval_ms`, `FERRY_NAMESPACES_CHAT_JOIN_LEAVE` →
/// `namespaces.chat.join_leave`.
fn env_path(tree: &serde_json::Map<String, serde_json::Value>, rest: &str) -> Option<Vec<String>> {
    // Longest key first, so a key with underscores wins over a prefix.
    let mut keys: Vec<&String> = tree.keys().collect();
    keys.sort_by_key(|k| std::cmp::Reverse(k.len()));
    for k in keys {
        if rest == k.as_str() {
            return Some(vec![k.clone()]);
        }
        if let Some(tail) = rest.strip_prefix(&format!("{k}_")) {
            if let Some(serde_json::Value::Object(t)) = tree.get(k.as_str()) {
                if let Some(mut p) = env_path(t, tail) {
                    p.insert(0, k.clone());
                    return Some(p);
                }
            }
        }
    }
    None
}

impl Config {
    /// Apply `FERRY_...` environment overrides (file < environment < flags).
    /// Values are TOML (`8000`, `true`, `["a", "b"]`); anything else is a string.
    /// A namespace must already exist in the file to be overridden.
    pub fn with_env(self, vars: impl IntoIterator<Item = (String, String)>) -> anyhow::Result<Config> {
        let tree = match serde_json::to_value(&self)? {
            serde_json::Value::Object(m) => m,
            _ => anyhow::bail!("configuration is not a table"),
        };
        let mut root = toml::Table::try_from(&self)?;
        for (name, value) in vars {
            let Some(rest) = name.strip_prefix("FERRY_") else { continue };
            if NOT_FIELDS.contains(&name.as_str()) {
                continue;
            }
            let rest = rest.to_ascii_lowercase();
            let path = env_path(&tree, &rest).ok_or_else(|| anyhow::anyhow!("{name}: no such configuration field"))?;
            let parsed = toml::from_str::<toml::Table>(&format!("v = {value}"))
                .ok()
                .and_then(|mut t| t.remove("v"))
                .unwrap_or(toml::Value::String(value.clone()));
            let mut t = &mut root;
            for k in &path[..path.len() - 1] {
                let entry = t.entry(k.clone()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
                t = match entry {
                    toml::Value::Table(inner) => inner,
                    _ => anyhow::bail!("{name}: not a section"),
                };
            }
            t.insert(path[path.len() - 1].clone(), parsed);
        }
        let c: Config = root.try_into().map_err(|e| anyhow::anyhow!("environment overrides: {e}"))?;
        c.check()?;
        Ok(c)
    }

    /// Read and check a TOML file.
    pub fn from_toml(text: &str) -> anyhow::Result<Config> {
        let c: Config = toml::from_str(text)?;
        c.check()?;
        Ok(c)
    }

    /// Reject settings that cannot work.
    pub fn check(&self) -> anyhow::Result<()> {
        let l = &self.limits;
        anyhow::ensure!(l.max_message_size >= 1024, "limits.max_message_size must be at least 1024");
        anyhow::ensure!(l.max_frame_size >= 1024, "limits.max_frame_size must be at least 1024");
        anyhow::ensure!(l.ping_interval_ms > 0, "limits.ping_interval_ms must be positive");
        anyhow::ensure!(l.pong_timeout_ms > 0, "limits.pong_timeout_ms must be positive");
        anyhow::ensure!(l.inflight_window > 0, "limits.inflight_window must be positive");
        if let Some(addr) = self.api.listen {
            anyhow::ensure!(
                !self.api.keys.is_empty() || addr.ip().is_loopback(),
                "api.keys must be set when the API listens beyond loopback ({addr})"
            );
        }
        anyhow::ensure!(
            self.tls.cert.is_some() == self.tls.key.is_some(),
            "tls.cert and tls.key go together: set both for TLS, or neither"
        );
        anyhow::ensure!(!self.tls.api || self.tls.enabled(), "tls.api needs tls.cert and tls.key");
        if !self.webhooks.url.is_empty() {
            crate::http_client::Url::parse(&self.webhooks.url).map_err(|e| anyhow::anyhow!("webhooks.url: {e}"))?;
        }
        for (name, ns) in &self.namespaces {
            anyhow::ensure!(ns.max_qos <= 2, "namespaces.{name}.max_qos must be 0, 1 or 2");
            anyhow::ensure!(ns.history_size > 0, "namespaces.{name}.history_size must be positive");
        }
        Ok(())
    }

    /// Options for a channel.
    pub fn namespace(&self, channel: &str) -> &Namespace {
        static DEFAULT: std::sync::OnceLock<Namespace> = std::sync::OnceLock::new();
        let ns = crate::channel::namespace_of(channel);
        self.namespaces
            .get(ns)
            .or_else(|| self.namespaces.get("default"))
            .unwrap_or_else(|| DEFAULT.get_or_init(Namespace::default))
    }

    /// Session settings derived from the limits.
    pub fn session(&self) -> ferry_core::server::ServerConfig {
        let l = &self.limits;
        ferry_core::server::ServerConfig {
            ping_interval: Duration::from_millis(l.ping_interval_ms),
            pong_timeout: Duration::from_millis(l.pong_timeout_ms),
            handshake_timeout: Duration::from_millis(l.handshake_timeout_ms),
            max_message_size: l.max_message_size,
            max_subscriptions: l.max_subscriptions,
            inflight_window: l.inflight_window,
            ack_timeout: Duration::from_millis(l.ack_timeout_ms),
            max_redeliveries: 5,
            compress_min: (l.compress_min > 0).then_some(l.compress_min),
            max_queued_bytes: l.max_queued_bytes,
            request_id_window: 1024,
        }
    }
}
