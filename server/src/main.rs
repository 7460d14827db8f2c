//! The `ferry` command.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// mimalloc instead of the system allocator: a fan-out and a durable
/// publish profile spent a fifth of their time in glibc malloc and free
/// (docs/PERFORMANCE.md).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;
use ferry_server::config::Config;

#[derive(Parser)]
#[command(
    name = "ferry",
    version = concat!(env!("CARGO_PKG_VERSION"), " (git ", env!("FERRY_GIT_COMMIT"), ")"),
    about = "Ferry real-time messaging server"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Sign an HS256 connection token with the config's `auth.hmac_secret` (for development).
    ///
    /// The secret must be at least 32 bytes, as the server requires: a token
    /// signed with a shorter one could not be verified by any Ferry server.
    Token {
        /// TOML configuration file holding `[auth] hmac_secret`.
        #[arg(long, env = "FERRY_CONFIG")]
        config: Option<PathBuf>,
        /// The secret (at least 32 bytes), instead of a config file.
        #[arg(long, env = "FERRY_HMAC_SECRET")]
        secret: Option<String>,
        /// User id (`sub`).
        #[arg(long)]
        user: String,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
        /// Channels to grant and subscribe the client to (repeatable).
        #[arg(long)]
        channel: Vec<String>,
    },
    /// Print a commented configuration with fresh secrets.
    Genconfig,
    /// Ask a running server's /healthz; exit 0 when it answers 200 (for
    /// container health checks: no curl needed in the image).
    ///
    /// Without --url the address is the configuration's `listen` (file <
    /// environment), the unspecified address probed on loopback, https when
    /// `[tls]` is on (the certificate must then be valid for the URL's host).
    Health {
        /// TOML configuration file.
        #[arg(long, env = "FERRY_CONFIG")]
        config: Option<PathBuf>,
        /// The URL to probe instead, e.g. http://127.0.0.1:8000/healthz.
        #[arg(long)]
        url: Option<String>,
        /// Give up after this many milliseconds.
        #[arg(long, default_value_t = 3000)]
        timeout_ms: u64,
    },
    /// Print the effective configuration (file < environment), then exit.
    ///
    /// Secrets that are set (`auth.hmac_secret`, `api.keys`,
    /// `webhooks.secret`, `admin.password`, `admin.token`) print as
    /// "<redacted>" unless --show-secrets.
    ShowConfig {
        /// TOML configuration file.
        #[arg(long, env = "FERRY_CONFIG")]
        config: Option<PathBuf>,
        /// Print secrets in clear instead of "<redacted>".
        #[arg(long)]
        show_secrets: bool,
    },
    /// Read and check a configuration file, then exit.
    CheckConfig {
        /// TOML configuration file.
        config: PathBuf,
    },
    /// Run the server.
    ///
    /// Any field can be set from the environment as FERRY_<SECTION>_<FIELD>
    /// (file < environment < flags). An unknown field of a known section
    /// (FERRY_LIMITS_PING_INTERVL_MS) is an error; other FERRY_* names
    /// (FERRY_BIN, Kubernetes' FERRY_SERVICE_HOST, FERRY_PORT_...) are
    /// ignored with one warning, silenced by listing them in
    /// FERRY_ENV_IGNORE="FERRY_BIN,FERRY_HOME".
    #[command(after_help = SERVE_ENV_HELP)]
    Serve {
        /// TOML configuration file.
        #[arg(long, env = "FERRY_CONFIG")]
        config: Option<PathBuf>,
        /// Listen address for WebSocket and /healthz (overrides file and environment).
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Data directory of the embedded store (overrides file and environment).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Listen address of the backend API (overrides file and environment); `off` disables it.
        #[arg(long)]
        api_listen: Option<String>,
        /// Keep streams, message ids, cursors and fan-out in Redis, shared
        /// with every node given the same Redis (docs/CLUSTER.md); repeat for
        /// several URLs; `rediss://` for TLS. Overrides `[redis] urls` and
        /// `FERRY_REDIS_URLS`.
        #[arg(long, value_name = "redis[s]://HOST:PORT")]
        redis: Vec<String>,
    },
}

/// The environment variables of `ferry serve` that are not configuration
/// fields, shown under its `--help`.
const SERVE_ENV_HELP: &str = "\
Environment (besides FERRY_<SECTION>_<FIELD>):
  FERRY_CONFIG        configuration file (as --config)
  FERRY_LOG           log filter, tracing-subscriber syntax [default: info]
                      e.g. warn, debug, info,ferry_server::conn=warn
  FERRY_LOG_FORMAT    text (one human-readable line per event) or json (one
                      JSON object per line) [default: text]; logs go to stderr
  FERRY_ENV_IGNORE    FERRY_* names that are not meant for ferry

At info a node logs one line per connection open and close (user, client,
peer, close code and reason, duration) and one per backend API error, at most
limits.log_lines_per_sec of each a second plus one \"suppressed\" count.
SIGTERM/SIGINT close every connection with 3000 (reconnect elsewhere) and stop.";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG").unwrap_or_else(|_| "info".into());
    // Logs go to stderr; stdout carries the startup lines and command output.
    let logs = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match std::env::var("FERRY_LOG_FORMAT").as_deref() {
        Ok("json") => logs.json().init(),
        Ok("text") | Ok("") | Err(_) => logs.init(),
        Ok(other) => anyhow::bail!("FERRY_LOG_FORMAT={other}: use text or json"),
    }
    match Cli::parse().cmd {
        Cmd::Health { config, url, timeout_ms } => health(config, url, timeout_ms).await,
        Cmd::Token { config, secret, user, ttl, channel } => {
            // Design: no override for a short secret. The server refuses
            // one, so a token signed with it would be useless anywhere.
            let secret = match (secret, config) {
                (Some(s), _) => {
                    ferry_server::auth::check_hmac_secret(&s).map_err(|e| anyhow::anyhow!("--secret {e}"))?;
                    s
                }
                (None, Some(path)) => {
                    let s = load(&path)?
                        .auth
                        .hmac_secret
                        .ok_or_else(|| anyhow::anyhow!("{}: no auth.hmac_secret", path.display()))?;
                    ferry_server::auth::check_hmac_secret(&s)
                        .map_err(|e| anyhow::anyhow!("{}: auth.hmac_secret {e}", path.display()))?;
                    s
                }
                (None, None) => anyhow::bail!("give --secret or --config with auth.hmac_secret"),
            };
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
            let claims = ferry_server::auth::Claims { sub: user, exp: Some(now + ttl), info: None, channels: channel };
            println!("{}", ferry_server::auth::sign_hs256(&secret, &claims)?);
            Ok(())
        }
        Cmd::Genconfig => {
            print!("{}", genconfig(&secret(48)?, &secret(32)?, &secret(32)?));
            Ok(())
        }
        Cmd::ShowConfig { config, show_secrets } => {
            let cfg = match &config {
                Some(path) => load(path)?,
                None => Config::default(),
            };
            let cfg = cfg.with_env(std::env::vars())?;
            print!("{}", if show_secrets { toml::to_string(&cfg)? } else { cfg.show_redacted()? });
            Ok(())
        }
        Cmd::CheckConfig { config } => {
            let cfg = load(&config)?;
            ferry_server::auth::Auth::from_config(&cfg.auth, cfg.allow_anonymous)?;
            // Certificates and keys are read now, not at the first connection.
            if let (Some(c), Some(k)) = (&cfg.tls.cert, &cfg.tls.key) {
                ferry_server::tls::server_config(c, k)?;
            }
            ferry_server::tls::client_config(cfg.tls.ca_file.as_deref())?;
            // `[redis] tls_ca` is read and parsed (no connection is made).
            cfg.redis.tls()?;
            println!("{}: ok", config.display());
            Ok(())
        }
        Cmd::Serve { config, listen, data_dir, api_listen, redis } => {
            // Precedence: defaults < file < FERRY_* environment < flags.
            let cfg = match &config {
                Some(path) => load(path)?,
                None => Config::default(),
            };
            let mut cfg = cfg.with_env(std::env::vars())?;
            if let Some(l) = listen {
                cfg.listen = l;
            }
            if let Some(d) = data_dir {
                cfg.data_dir = d;
            }
            if !redis.is_empty() {
                cfg.redis.urls = redis;
            }
            match api_listen.as_deref() {
                Some("off") => cfg.api.enabled = false,
                Some(a) => cfg.api.listen = Some(a.parse().map_err(|e| anyhow::anyhow!("--api-listen {a}: {e}"))?),
                None => {}
            }
            if !cfg.api.enabled {
                cfg.api.listen = None;
            } else if cfg.api.listen.is_none() {
                // Next to the WebSocket port; an ephemeral one stays ephemeral.
                let mut a = cfg.listen;
                a.set_port(if a.port() == 0 { 0 } else { a.port().wrapping_add(1) });
                cfg.api.listen = Some(a);
            }
            cfg.check()?;
            let fds = raise_fd_limit();
            let api = match cfg.api.listen {
                Some(a) => Some(
                    tokio::net::TcpListener::bind(a)
                        .await
                        .map_err(|e| anyhow::anyhow!("cannot listen on {a} for the API: {e}"))?,
                ),
                None => None,
            };
            let api_addr = api.as_ref().and_then(|l| l.local_addr().ok());
            let listener = tokio::net::TcpListener::bind(cfg.listen)
                .await
                .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", cfg.listen))?;
            let addr = listener.local_addr()?;
            // The first line names the address; tests and scripts read it.
            // Write errors are ignored: a closed stdout must not stop a server.
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            let (ws, http) = if cfg.tls.enabled() { ("wss", "https") } else { ("ws", "http") };
            let _ = writeln!(out, "ferry listening on {ws}://{addr}/ws (health: {http}://{addr}/healthz)");
            let api_http = if cfg.tls.api { "https" } else { "http" };
            let _ = writeln!(
                out,
                "api: {} | data: {} | anonymous access: {} | auth: {} | open files: {}{}",
                match api_addr {
                    Some(a) if cfg.api.keys.is_empty() => format!("{api_http}://{a}/api (no key: loopback only)"),
                    Some(a) => format!("{api_http}://{a}/api"),
                    None => "off".into(),
                },
                if cfg.redis.urls.is_empty() {
                    cfg.data_dir.display().to_string()
                } else {
                    let urls: Vec<String> =
                        cfg.redis.urls.iter().map(|u| ferry_server::config::redact_url(u)).collect();
                    format!("redis {}", urls.join(","))
                },
                if cfg.allow_anonymous { "on" } else { "off" },
                if dev_auth(&cfg) { "DEVELOPMENT (token = user id; configure [auth] for production)" } else { "JWT" },
                fds.map_or_else(|| "unknown".to_string(), |n| n.to_string()),
                match (cfg.admin.enabled(), cfg.admin.allow_remote) {
                    (false, _) => String::new(),
                    (true, false) => format!(" | admin: {http}://{addr}/admin (loopback only)"),
                    (true, true) => format!(" | admin: {http}://{addr}/admin"),
                },
            );
            let _ = out.flush();
            drop(out);
            ferry_server::serve(listener, api, cfg, shutdown_signal()).await
        }
    }
}

/// Every connection holds a descriptor, and the usual soft limit (1,024)
/// is far below what a server needs: raise it to the hard limit, as far
/// as the system lets a process go by itself. Returns the limit now held.
#[cfg(unix)]
fn raise_fd_limit() -> Option<u64> {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut lim = getrlimit(Resource::Nofile);
    if lim.current < lim.maximum || (lim.current.is_some() && lim.maximum.is_none()) {
        lim.current = lim.maximum;
        if setrlimit(Resource::Nofile, lim).is_err() {
            return getrlimit(Resource::Nofile).current;
        }
    }
    lim.current
}

#[cfg(not(unix))]
fn raise_fd_limit() -> Option<u64> {
    None
}

async fn health(config: Option<PathBuf>, url: Option<String>, timeout_ms: u64) -> anyhow::Result<()> {
    let (url, ca) = match url {
        Some(u) => (u, None),
        None => {
            let cfg = match &config {
                Some(path) => load(path)?,
                None => Config::default(),
            };
            let cfg = cfg.with_env(std::env::vars())?;
            let mut addr = cfg.listen;
            if addr.ip().is_unspecified() {
                addr.set_ip(match addr {
                    SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                    SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
                });
            }
            let scheme = if cfg.tls.enabled() { "https" } else { "http" };
            (format!("{scheme}://{addr}/healthz"), cfg.tls.ca_file.clone())
        }
    };
    let parsed = ferry_server::http_client::Url::parse(&url).map_err(|e| anyhow::anyhow!("{e}"))?;
    let http = ferry_server::http_client::HttpClient::new(ferry_server::tls::client_config(ca.as_deref())?);
    let timeout = std::time::Duration::from_millis(timeout_ms);
    let r = http.request("GET", &parsed, &[], b"", timeout, 4096).await.map_err(|e| anyhow::anyhow!("{url}: {e}"))?;
    anyhow::ensure!(r.status == 200, "{url}: HTTP {}", r.status);
    println!("{url}: {}", String::from_utf8_lossy(&r.body).trim());
    Ok(())
}

fn load(path: &std::path::Path) -> anyhow::Result<Config> {
    let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Config::from_toml(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// Random URL-safe text from the OS generator.
fn secret(bytes: usize) -> anyhow::Result<String> {
    use std::io::Read;
    let mut buf = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut buf)?;
    Ok(ferry_core::base64::encode(&buf).replace(['+', '/'], "_").trim_end_matches('=').to_string())
}

fn genconfig(hmac: &str, api_key: &str, hook_secret: &str) -> String {
    format!(
        r#"# Ferry configuration. Every value below is the default unless marked;
# every option can also be set as FERRY_<SECTION>_<FIELD> in the environment
# (e.g. FERRY_LIMITS_PING_INTERVAL_MS=20000), and flags override both.

listen = "127.0.0.1:8000"        # WebSocket (/ws), /healthz, /readyz, /metrics
data_dir = "ferry-data"          # the embedded store
# node_name = "ferry-1"          # metrics label and log name; default: the host name
allow_anonymous = false          # generated: tokens required
presence_grace_ms = 5000         # leave is announced after this, unless they come back
allowed_origins = []             # browser origins allowed; empty = any

[auth]                           # generated: JWT HS256 with a fresh secret
hmac_secret = "{hmac}"
# rsa_public_key = "/etc/ferry/rsa_public.pem"
# ec_public_key = "/etc/ferry/ec_public.pem"
# jwks_url = "https://auth.example.com/.well-known/jwks.json" # RS256/ES256 keys by kid
# jwks_refresh_secs = 300
# algorithms = ["HS256"]         # pinned; default: those with a key (+ RS256, ES256 with jwks_url)
leeway_secs = 5
require_exp = true

[webhooks]                       # off while url is empty
url = ""                         # http:// or https:// endpoint of your backend
secret = "{hook_secret}"         # generated: HMAC-SHA256 key of X-Ferry-Signature
events = ["online", "offline"]   # also: subscribe, unsubscribe, publish
publish_namespaces = []          # namespaces whose client publishes are sent
queue = 10000
retries = 5
retry_initial_ms = 500
timeout_ms = 5000

[tls]                            # off unless cert and key are set
# cert = "/etc/ferry/fullchain.pem" # PEM chain, leaf first: the port serves wss:// and https://
# key = "/etc/ferry/privkey.pem"
# api = false                    # serve the API over TLS too
# ca_file = "/etc/ferry/company-ca.pem" # extra roots for outgoing HTTPS (webhooks, JWKS)

# [admin]                        # web console at /admin (docs/ADMIN.md); off without password or token
# password = "a long passphrase" # browser login, at least 12 characters
# token = "..."                  # at least 32 characters: Authorization: Bearer <token>
# allow_remote = false           # loopback peers only unless true

[api]                            # backend HTTP API
listen = "127.0.0.1:8001"
keys = ["{api_key}"]             # generated: send "Authorization: apikey <key>"

[limits]
max_message_size = 65536
max_frame_size = 65536
max_subscriptions = 256
handshake_timeout_ms = 10000
ping_interval_ms = 25000
pong_timeout_ms = 10000
inflight_window = 256
ack_timeout_ms = 30000
max_queued_bytes = 4194304
fanout_queue = 1024
compress_min = 1024
publish_rate = 1000
publish_burst = 2000
max_connections_per_user = 100
connections_per_ip_per_minute = 600
log_lines_per_sec = 50           # connection open/close lines (and API errors) per second

[namespaces.default]
history_size = 1000
history_ttl_secs = 604800
presence = true
join_leave = false
client_publish = true
max_qos = 2
offline = true
private = false
"#
    )
}

fn dev_auth(cfg: &Config) -> bool {
    let a = &cfg.auth;
    a.hmac_secret.is_none() && a.rsa_public_key.is_none() && a.ec_public_key.is_none()
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
