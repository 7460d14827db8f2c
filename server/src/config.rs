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
    /// This node's name: the `node` label of its metrics and the name in
    /// its logs. Unset = the host name (a container's name in compose, the
    /// machine's under systemd).
    pub node_name: Option<String>,
    /// Token verification. With no key configured the server runs in
    /// development mode: the connect token is taken as the user id.
    pub auth: AuthConfig,
    /// Allow connections with an empty token.
    pub allow_anonymous: bool,
    /// The backend HTTP API.
    pub api: ApiConfig,
    /// The web console at `/admin` (docs/ADMIN.md); off without a
    /// `password` or `token`.
    pub admin: AdminConfig,
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
            node_name: None,
            auth: AuthConfig::default(),
            api: ApiConfig::default(),
            admin: AdminConfig::default(),
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

/// The admin console (docs/ADMIN.md), served at `/admin` on the main
/// listener. Off unless `password` or `token` is set; loopback peers only
/// unless `allow_remote`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Password of the browser login (at least [`ADMIN_PASSWORD_MIN`]
    /// characters); a login gives an expiring session cookie.
    pub password: Option<String>,
    /// Token for scripts (`Authorization: Bearer <token>`, at least
    /// [`ADMIN_TOKEN_MIN`] characters).
    pub token: Option<String>,
    /// Serve the console to peers beyond loopback, and to requests relayed
    /// by a proxy (`Forwarded`, `X-Forwarded-For`, `X-Real-IP`).
    pub allow_remote: bool,
    /// Lifetime of a login session, seconds.
    pub session_ttl_secs: u64,
    /// Login attempts one address may make per minute.
    pub login_attempts_per_minute: u32,
}

/// Shortest admin password accepted.
pub const ADMIN_PASSWORD_MIN: usize = 12;
/// Shortest admin token accepted.
pub const ADMIN_TOKEN_MIN: usize = 32;

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            password: None,
            token: None,
            allow_remote: false,
            session_ttl_secs: 8 * 3600,
            login_attempts_per_minute: 10,
        }
    }
}

impl AdminConfig {
    /// Whether the console is served at all.
    pub fn enabled(&self) -> bool {
        self.password.is_some() || self.token.is_some()
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
    /// Info lines per second for connection opens and closes, and as many
    /// for backend API errors; beyond it lines are dropped and counted in
    /// one "suppressed" line per second (0 = no limit).
    pub log_lines_per_sec: u32,
    /// Seconds one QoS 1/2 subscription that is behind may hold back
    /// publishes to its channel per episode (0 = never: a subscriber whose
    /// position leaves the history is closed with 3004).
    pub backpressure_secs: u64,
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
            log_lines_per_sec: 50,
            backpressure_secs: 10,
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

/// Environment variables of the `ferry` command that are not configuration
/// fields.
const NOT_FIELDS: &[&str] = &["FERRY_CONFIG", "FERRY_LOG", "FERRY_LOG_FORMAT", "FERRY_HMAC_SECRET", ENV_IGNORE];

/// The variable naming further `FERRY_*` variables to ignore without a word
/// (comma- or space-separated), e.g. `FERRY_BIN,FERRY_HOME` set by a wrapper.
pub const ENV_IGNORE: &str = "FERRY_ENV_IGNORE";

/// What [`Config::show_redacted`] prints in place of a secret that is set.
pub const REDACTED: &str = "<redacted>";

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

/// Every `FERRY_...` name a field of `tree` can be set with.
fn env_names(tree: &serde_json::Map<String, serde_json::Value>, prefix: &str, out: &mut Vec<String>) {
    for (k, v) in tree {
        let name = format!("{prefix}_{}", k.to_ascii_uppercase());
        match v {
            serde_json::Value::Object(t) => env_names(t, &name, out),
            _ => out.push(name),
        }
    }
}

/// Whether `name=value` is one of the variables Kubernetes injects for a
/// Service whose name starts with `ferry` (`FERRY_SERVICE_HOST`,
/// `FERRY_PORT_8000_TCP_ADDR`, `FERRY_API_SERVICE_PORT_HTTP`, ...). The
/// value is checked too, so `FERRY_API_PORT=8001` (a guess at a field) is
/// not taken for the link `FERRY_API_PORT=tcp://10.0.0.1:8001`.
fn kubernetes_service_link(name: &str, value: &str) -> bool {
    let t: Vec<&str> = name.split('_').collect();
    let ip = |v: &str| v.parse::<std::net::IpAddr>().is_ok();
    let port = |v: &str| v.parse::<u16>().is_ok();
    let proto = |v: &str| ["tcp", "udp", "sctp"].iter().any(|p| v.eq_ignore_ascii_case(p));
    // `tcp://10.0.0.1:8000` (or `tcp://[fd00::1]:8000`).
    let link =
        |v: &str| v.split_once("://").is_some_and(|(p, a)| proto(p) && a.parse::<std::net::SocketAddr>().is_ok());
    if t.first() != Some(&"FERRY") {
        return false;
    }
    // The Service name (FERRY, FERRY_API, ...) ends at some i >= 1.
    (1..=t.len()).any(|i| match &t[i..] {
        ["SERVICE", "HOST"] => ip(value),
        ["SERVICE", "PORT", ..] => port(value),
        ["PORT"] => link(value),
        ["PORT", n, p] => port(n) && proto(p) && link(value),
        ["PORT", n, p, "PROTO"] => port(n) && proto(p) && proto(value),
        ["PORT", n, p, "PORT"] => port(n) && proto(p) && port(value),
        ["PORT", n, p, "ADDR"] => port(n) && proto(p) && ip(value),
        _ => false,
    })
}

/// Edit distance, for "did you mean" hints.
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let here = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(here + 1);
            prev = here;
        }
    }
    row[b.len()]
}

/// What [`Config::apply_env`] did with the `FERRY_*` variables.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EnvReport {
    /// Variables applied as configuration fields.
    pub applied: Vec<String>,
    /// Variables ignored because they cannot be configuration fields
    /// (Kubernetes service links, names outside every section), sorted.
    /// Those listed in `FERRY_ENV_IGNORE` are not here.
    pub ignored: Vec<String>,
}

impl Config {
    /// Apply `FERRY_...` environment overrides (file < environment < flags),
    /// warning in one log line about variables ignored as not configuration.
    /// See [`Config::apply_env`].
    pub fn with_env(self, vars: impl IntoIterator<Item = (String, String)>) -> anyhow::Result<Config> {
        let (c, report) = self.apply_env(vars)?;
        if !report.ignored.is_empty() {
            tracing::warn!(
                "ignoring environment variables that are not configuration fields: {} (list them in {ENV_IGNORE} to silence this)",
                report.ignored.join(", ")
            );
        }
        Ok(c)
    }

    /// Apply `FERRY_...` environment overrides.
    /// Values are TOML (`8000`, `true`, `["a", "b"]`); anything else is a string.
    /// A namespace must already exist in the file to be overridden.
    ///
    /// Design: a name whose first word begins a top-level field or section
    /// (`FERRY_LIMITS_...`, `FERRY_LISTEN_...`, `FERRY_DATA_...`) or nearly
    /// does (`FERRY_LIMIT_...`) is meant as configuration, so a typo in it is
    /// an error, never silently ignored. Anything else (`FERRY_BIN` from a
    /// wrapper script, the `FERRY_SERVICE_HOST`, `FERRY_PORT_...` links
    /// Kubernetes injects for a Service named `ferry`) cannot be
    /// configuration and is reported in [`EnvReport::ignored`]. Names listed
    /// in `FERRY_ENV_IGNORE` are skipped without a report.
    pub fn apply_env(self, vars: impl IntoIterator<Item = (String, String)>) -> anyhow::Result<(Config, EnvReport)> {
        let tree = match serde_json::to_value(&self)? {
            serde_json::Value::Object(m) => m,
            _ => anyhow::bail!("configuration is not a table"),
        };
        let vars: Vec<(String, String)> = vars.into_iter().filter(|(n, _)| n.starts_with("FERRY_")).collect();
        let allowed: Vec<String> = vars
            .iter()
            .filter(|(n, _)| n == ENV_IGNORE)
            .flat_map(|(_, v)| v.split([',', ' ']).filter(|s| !s.is_empty()).map(str::to_string).collect::<Vec<_>>())
            .collect();
        // First words of top-level keys: `listen`, `data`, `allow`, `limits`, ...
        let first_words: Vec<String> =
            tree.keys().map(|k| k.split('_').next().unwrap_or_default().to_ascii_uppercase()).collect();
        let mut report = EnvReport::default();
        let mut root = toml::Table::try_from(&self)?;
        for (name, value) in vars {
            if NOT_FIELDS.contains(&name.as_str()) || allowed.contains(&name) {
                continue;
            }
            let rest = &name["FERRY_".len()..];
            let Some(path) = env_path(&tree, &rest.to_ascii_lowercase()) else {
                let first = rest.split('_').next().unwrap_or_default().to_ascii_uppercase();
                // Near a first word: one edit, for words long enough that one
                // edit does not reach unrelated names (`APP` is not `API`).
                let meant = first_words.iter().any(|w| *w == first || (w.len() >= 4 && distance(w, &first) <= 1));
                if !meant || kubernetes_service_link(&name, &value) {
                    report.ignored.push(name);
                    continue;
                }
                let mut names = Vec::new();
                env_names(&tree, "FERRY", &mut names);
                let upper = name.to_ascii_uppercase();
                // A field with something after it (`FERRY_LISTEN_ADDR`), else
                // the nearest name within a few typos.
                let hint = names
                    .iter()
                    .find(|n| upper.starts_with(&format!("{n}_")))
                    .or_else(|| {
                        names.iter().map(|n| (distance(n, &upper), n)).filter(|(d, _)| *d <= 3).min().map(|(_, n)| n)
                    })
                    .map(|n| format!(" (did you mean {n}?)"))
                    .unwrap_or_default();
                let ns = if rest.to_ascii_uppercase().starts_with("NAMESPACES_") {
                    "; a namespace must be in the configuration file to be set from the environment"
                } else {
                    ""
                };
                anyhow::bail!(
                    "{name}: no such configuration field{hint}{ns}; if it is not meant for ferry, list it in {ENV_IGNORE}"
                );
            };
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
            report.applied.push(name);
        }
        report.ignored.sort();
        let c: Config = root.try_into().map_err(|e| anyhow::anyhow!("environment overrides: {e}"))?;
        c.check()?;
        Ok((c, report))
    }

    /// The configuration as TOML with every secret that is set
    /// (`auth.hmac_secret`, each of `api.keys`, `webhooks.secret`,
    /// `admin.password`, `admin.token`) replaced
    /// by [`REDACTED`]: still valid TOML, showing which secrets are set and
    /// how many keys there are, but no secret.
    pub fn show_redacted(&self) -> anyhow::Result<String> {
        let mut c = self.clone();
        if c.auth.hmac_secret.is_some() {
            c.auth.hmac_secret = Some(REDACTED.into());
        }
        for k in &mut c.api.keys {
            *k = REDACTED.into();
        }
        if !c.webhooks.secret.is_empty() {
            c.webhooks.secret = REDACTED.into();
        }
        for s in [&mut c.admin.password, &mut c.admin.token].into_iter().flatten() {
            *s = REDACTED.into();
        }
        for u in &mut c.redis.urls {
            *u = redact_url(u);
        }
        Ok(toml::to_string(&c)?)
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
        self.redis.check()?;
        let a = &self.admin;
        if let Some(p) = &a.password {
            anyhow::ensure!(
                p.chars().count() >= ADMIN_PASSWORD_MIN,
                "admin.password must be at least {ADMIN_PASSWORD_MIN} characters"
            );
        }
        if let Some(t) = &a.token {
            anyhow::ensure!(t.len() >= ADMIN_TOKEN_MIN, "admin.token must be at least {ADMIN_TOKEN_MIN} bytes");
            // It travels in an HTTP header.
            anyhow::ensure!(
                t.bytes().all(|b| b.is_ascii_graphic()),
                "admin.token must be printable ASCII without spaces"
            );
        }
        anyhow::ensure!(a.session_ttl_secs >= 60, "admin.session_ttl_secs must be at least 60");
        anyhow::ensure!(a.login_attempts_per_minute > 0, "admin.login_attempts_per_minute must be positive");
        for (name, ns) in &self.namespaces {
            anyhow::ensure!(ns.max_qos <= 2, "namespaces.{name}.max_qos must be 0, 1 or 2");
            anyhow::ensure!(ns.history_size > 0, "namespaces.{name}.history_size must be positive");
        }
        Ok(())
    }

    /// This node's name: `node_name`, else the host name, else `ferry`.
    pub fn node_name(&self) -> String {
        if let Some(n) = self.node_name.as_deref().filter(|n| !n.is_empty()) {
            return n.to_string();
        }
        #[cfg(unix)]
        {
            let u = rustix::system::uname();
            let host = u.nodename().to_string_lossy();
            if !host.is_empty() {
                return host.into_owned();
            }
        }
        "ferry".into()
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

/// A URL with its password (`scheme://user:password@host`) replaced by
/// [`REDACTED`], for printing.
pub fn redact_url(u: &str) -> String {
    let Some((scheme, rest)) = u.split_once("://") else { return u.to_string() };
    let host_end = rest.find('/').unwrap_or(rest.len());
    match rest[..host_end].rfind('@') {
        Some(at) => format!("{scheme}://{REDACTED}@{}", &rest[at + 1..]),
        None => u.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn redis_passwords_are_redacted() {
        assert_eq!(super::redact_url("redis://:s3cret@10.0.0.1:6379/0"), "redis://<redacted>@10.0.0.1:6379/0");
        assert_eq!(super::redact_url("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
    }

    use super::*;

    fn env(vars: &[(&str, &str)]) -> anyhow::Result<(Config, EnvReport)> {
        Config::default().apply_env(vars.iter().map(|(k, v)| (k.to_string(), v.to_string())))
    }

    #[test]
    fn redis_sentinel_settings_come_from_the_environment() {
        let (c, r) = env(&[
            ("FERRY_REDIS_URLS", r#"["redis://10.0.0.1:26379", "redis://10.0.0.2:26379"]"#),
            ("FERRY_REDIS_SENTINEL_MASTER", "ferry-main"),
            ("FERRY_REDIS_DURABILITY", "replicated"),
        ])
        .unwrap();
        assert_eq!(c.redis.sentinel_master.as_deref(), Some("ferry-main"));
        assert_eq!(c.redis.urls.len(), 2);
        assert_eq!(c.redis.durability, crate::engine::redis::Durability::Replicated);
        assert_eq!(r.applied.len(), 3);
    }

    #[test]
    fn redis_tls_settings_come_from_the_environment_and_are_checked() {
        let (c, _) = env(&[
            ("FERRY_REDIS_URLS", r#"["rediss://10.0.0.1:6380"]"#),
            ("FERRY_REDIS_TLS_CA", "/etc/ferry/redis-ca.pem"),
        ])
        .unwrap();
        assert_eq!(c.redis.tls_ca.as_deref(), Some(std::path::Path::new("/etc/ferry/redis-ca.pem")));
        // A private CA for plain redis:// would silently mean no TLS.
        let e = env(&[("FERRY_REDIS_URLS", r#"["redis://10.0.0.1:6379"]"#), ("FERRY_REDIS_TLS_CA", "/ca.pem")]);
        assert!(e.unwrap_err().to_string().contains("use rediss://"));
    }

    #[test]
    fn admin_settings_come_from_the_environment_and_are_checked() {
        let token = "t".repeat(ADMIN_TOKEN_MIN);
        let (c, r) = env(&[
            ("FERRY_ADMIN_PASSWORD", "correct horse battery"),
            ("FERRY_ADMIN_TOKEN", token.as_str()),
            ("FERRY_ADMIN_ALLOW_REMOTE", "true"),
        ])
        .unwrap();
        assert_eq!(r.applied.len(), 3);
        assert!(c.admin.enabled() && c.admin.allow_remote);
        assert_eq!(c.admin.token.as_deref(), Some(token.as_str()));
        assert!(!Config::default().admin.enabled(), "off by default");
        let e = env(&[("FERRY_ADMIN_PASSWORD", "short")]).unwrap_err().to_string();
        assert!(e.contains("admin.password must be at least"), "{e}");
        let e = env(&[("FERRY_ADMIN_TOKEN", "short")]).unwrap_err().to_string();
        assert!(e.contains("admin.token must be at least"), "{e}");
        let e = env(&[("FERRY_ADMIN_PASSWORD_X", "x")]).unwrap_err().to_string();
        assert!(e.contains("did you mean FERRY_ADMIN_PASSWORD?"), "{e}");
    }

    #[test]
    fn kubernetes_links_are_recognised_by_name_and_value() {
        for (n, v) in [
            ("FERRY_PORT", "tcp://10.0.0.1:8000"),
            ("FERRY_PORT_8000_TCP", "tcp://10.0.0.1:8000"),
            ("FERRY_PORT_8000_TCP_PROTO", "tcp"),
            ("FERRY_PORT_8000_TCP_PORT", "8000"),
            ("FERRY_PORT_8000_TCP_ADDR", "10.0.0.1"),
            ("FERRY_SERVICE_HOST", "10.0.0.1"),
            ("FERRY_SERVICE_PORT", "8000"),
            ("FERRY_SERVICE_PORT_HTTP_API", "8001"),
            // A Service named `ferry-api`, whose name begins like a section.
            ("FERRY_API_SERVICE_HOST", "fd00::1"),
            ("FERRY_API_PORT", "tcp://[fd00::1]:8001"),
            ("FERRY_API_PORT_8001_UDP_ADDR", "10.0.0.2"),
        ] {
            assert!(kubernetes_service_link(n, v), "{n}={v}");
        }
        for (n, v) in [
            ("FERRY_API_PORT", "8001"),
            ("FERRY_SERVICE_HOST", "ferry.local"),
            ("FERRY_PORT_HTTP_TCP", "tcp://10.0.0.1:8000"),
            ("FERRY_PORT_8000_TCP_ADDR", "8000"),
            ("FERRY_LIMITS_PING_INTERVAL_MS", "1"),
            ("OTHER_PORT", "tcp://10.0.0.1:8000"),
        ] {
            assert!(!kubernetes_service_link(n, v), "{n}={v}");
        }
    }

    #[test]
    fn foreign_names_are_ignored_and_config_looking_ones_refused() {
        let (c, report) = env(&[
            ("FERRY_BIN", "/bin/ferry"),
            ("FERRY_APP_NAME", "x"),
            ("FERRY_API_SERVICE_PORT", "8001"),
            ("FERRY_LIMITS_PING_INTERVAL_MS", "2000"),
            ("FERRY_HOME", "/h"),
            ("FERRY_ENV_IGNORE", "FERRY_HOME"),
            ("PATH", "/bin"),
        ])
        .unwrap();
        assert_eq!(c.limits.ping_interval_ms, 2000);
        assert_eq!(report.applied, ["FERRY_LIMITS_PING_INTERVAL_MS"]);
        assert_eq!(report.ignored, ["FERRY_API_SERVICE_PORT", "FERRY_APP_NAME", "FERRY_BIN"]);
        for (n, hint) in [
            ("FERRY_LIMITS_PING_INTERVL_MS", "FERRY_LIMITS_PING_INTERVAL_MS"),
            ("FERRY_WEBHOOK_URL", "FERRY_WEBHOOKS_URL"),
            ("FERRY_AUTH_HMAC_SECRT", "FERRY_AUTH_HMAC_SECRET"),
            ("FERRY_ALLOWED_ORIGINS_X", "FERRY_ALLOWED_ORIGINS"),
        ] {
            let e = env(&[(n, "1")]).unwrap_err().to_string();
            assert!(e.starts_with(&format!("{n}: no such configuration field (did you mean {hint}?)")), "{e}");
        }
    }

    #[test]
    fn redacted_output_names_set_secrets_only() {
        let mut c = Config::default();
        c.auth.hmac_secret = Some("s".repeat(40));
        c.api.keys = vec!["k1".into(), "k2".into()];
        c.admin.password = Some("correct horse battery".into());
        let shown: Config = toml::from_str(&c.show_redacted().unwrap()).unwrap();
        assert_eq!(shown.auth.hmac_secret.as_deref(), Some(REDACTED));
        assert_eq!(shown.api.keys, [REDACTED, REDACTED]);
        assert_eq!(shown.webhooks.secret, "", "unset stays unset");
        assert_eq!(shown.admin.password.as_deref(), Some(REDACTED));
        assert_eq!(shown.admin.token, None, "unset stays unset");
    }
}
