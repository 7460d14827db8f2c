//! # ferry-server
//!
//! The `ferry` messaging server: WebSocket endpoint (`/ws`, subprotocols
//! `ferry.v1` and `ferry.v1.json`), health check (`/healthz`), channel
//! fan-out, durable streams in an embedded store, recovery, presence and
//! history. Every connection is driven by `ferry_core::server::ServerSession`;
//! this crate supplies sockets, storage and fan-out.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! let cfg = ferry_server::config::Config::default();
//! let listener = tokio::net::TcpListener::bind(cfg.listen).await?;
//! ferry_server::run(listener, cfg, async { let _ = tokio::signal::ctrl_c().await; }).await
//! # }
//! ```

pub mod admin;
pub mod api;
pub mod auth;
pub mod channel;
pub mod cluster;
pub mod cluster_presence;
pub mod config;
pub mod conn;
pub mod engine;
pub mod http_client;
pub mod hub;
pub mod logging;
pub mod metrics;
pub mod presence;
pub mod store;
pub mod tls;
pub mod webhooks;

use std::future::Future;
use std::sync::Arc;

use axum::extract::ws::WebSocketUpgrade;

/// Bytes read from a WebSocket per read call (see `ws_handler`).
const WS_READ_BUFFER: usize = 4 * 1024;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::serve::ListenerExt;
use axum::Router;
use ferry_core::codec::Encoding;
use ferry_core::frame::{SUBPROTOCOL_BINARY, SUBPROTOCOL_JSON};

use crate::config::Config;
use crate::hub::Hub;
use crate::store::RedbStore;

#[derive(Clone)]
struct AppState {
    rate: Arc<IpRate>,
    hub: Arc<Hub>,
    shutdown: tokio::sync::watch::Receiver<bool>,
    live: Arc<LiveConns>,
}

/// Counts connection tasks so shutdown can wait for their close frames.
#[derive(Default)]
struct LiveConns {
    count: std::sync::atomic::AtomicUsize,
    idle: tokio::sync::Notify,
}

/// How long shutdown waits for connections to say goodbye.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Serve on `listener` (and the API on `cfg.api.listen`) until `shutdown`
/// completes; then tell every client to reconnect elsewhere and return.
pub async fn run(
    listener: tokio::net::TcpListener,
    cfg: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let api = match cfg.api.listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| anyhow::anyhow!("cannot listen on {addr} for the API: {e}"))?,
        ),
        None => None,
    };
    serve(listener, api, cfg, shutdown).await
}

/// Like [`run`], with the API listener given (or none).
pub async fn serve(
    listener: tokio::net::TcpListener,
    api: Option<tokio::net::TcpListener>,
    cfg: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    cfg.check()?;
    // Certificates are read before anything starts, so a bad path fails fast.
    let tls = match (&cfg.tls.cert, &cfg.tls.key) {
        (Some(c), Some(k)) => Some(tls::server_config(c, k)?),
        _ => None,
    };
    let mut store = RedbStore::open(&cfg.data_dir)?;
    let store_closed = store.on_close();
    let hub = if cfg.redis.urls.is_empty() {
        Hub::start(Arc::new(cfg), Arc::new(store))?
    } else {
        let streams = cluster::RedisNode::connect(&cfg.redis).await.map_err(|e| {
            let urls: Vec<String> = cfg.redis.urls.iter().map(|u| config::redact_url(u)).collect();
            anyhow::anyhow!("redis {urls:?}: {e}")
        })?;
        Hub::start_redis(Arc::new(cfg), Arc::new(store), streams)?
    };
    let weak_hub = Arc::downgrade(&hub);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    if let Some(jwks) = hub.auth().jwks().cloned() {
        // Keys before the first connection; a failure is not fatal (the
        // refresher retries, tokens wait for it with a reconnect code).
        match jwks.fetch().await {
            Ok(n) => tracing::info!(keys = n, "JWKS fetched"),
            Err(e) => tracing::warn!("JWKS fetch failed, will retry: {e}"),
        }
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = jwks.run() => {}
                _ = stop.changed() => {}
            }
        });
    }
    let live = Arc::new(LiveConns::default());
    {
        // The "suppressed" lines of the log budgets are written even after
        // a burst has ended.
        let (hub, mut stop) = (hub.clone(), stop_rx.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = tick.tick() => hub.logs.flush(),
                    _ = stop.changed() => return,
                }
            }
        });
    }
    let api_task = api.map(|l| {
        let router = api::router(hub.clone(), hub.config().api.keys.clone());
        let mut stop = stop_rx.clone();
        let l = match &tls {
            Some(t) if hub.config().tls.api => tls::Listener::tls(l, t.clone()),
            _ => tls::Listener::plain(l),
        };
        tokio::spawn(async move {
            let Ok(l) = l else { return };
            let _ = axum::serve(l, router)
                .with_graceful_shutdown(async move {
                    let _ = stop.changed().await;
                })
                .await;
        })
    });
    let rate = Arc::new(IpRate::default());
    let admin = if hub.config().admin.enabled() { Some(admin::router(hub.clone())?) } else { None };
    if admin.is_some() && hub.config().admin.allow_remote && !hub.config().tls.enabled() {
        tracing::warn!(
            "[admin] allow_remote without [tls]: the admin password and session cross the network in clear unless a TLS proxy is in front"
        );
    }
    let draining = (hub.clone(), live.clone());
    let mut app = router(AppState { rate, hub, shutdown: stop_rx, live: live.clone() });
    if let Some(admin) = admin {
        app = app.merge(admin);
    }
    let listener = match &tls {
        Some(t) => tls::Listener::tls(listener, t.clone())?,
        None => tls::Listener::plain(listener)?,
    };
    // tap_io: axum provides ConnectInfo<SocketAddr> for tapped listeners.
    axum::serve(listener.tap_io(|_| {}), app.into_make_service_with_connect_info::<std::net::SocketAddr>())
        .with_graceful_shutdown(async move {
            shutdown.await;
            let (hub, live) = draining;
            tracing::info!(
                node = hub.node_name(),
                connections = live.count.load(std::sync::atomic::Ordering::Acquire),
                "shutting down: closing every connection with 3000 (reconnect elsewhere)"
            );
            let _ = stop_tx.send(true);
        })
        .await?;
    // Upgraded connections outlive `serve`: wait (bounded) until each has
    // sent its close frame.
    let wait = async {
        loop {
            let idle = live.idle.notified();
            if live.count.load(std::sync::atomic::Ordering::Acquire) == 0 {
                break;
            }
            idle.await;
        }
    };
    if tokio::time::timeout(SHUTDOWN_GRACE, wait).await.is_err() {
        tracing::warn!(
            "{} connections still open after {} s; stopping anyway",
            live.count.load(std::sync::atomic::Ordering::Acquire),
            SHUTDOWN_GRACE.as_secs()
        );
    }
    if let Some(t) = api_task {
        let _ = tokio::time::timeout(SHUTDOWN_GRACE, t).await;
    }
    // The store closes with the last reference to the hub; wait (bounded)
    // for stragglers so a restart in this process can open it again.
    let deadline = tokio::time::Instant::now() + SHUTDOWN_GRACE;
    while weak_hub.strong_count() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    if weak_hub.strong_count() > 0 {
        tracing::warn!("stopping with {} tasks still holding the store", weak_hub.strong_count());
    } else {
        let _ = tokio::task::spawn_blocking(move || store_closed.recv_timeout(SHUTDOWN_GRACE)).await;
    }
    Ok(())
}

fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/ws", get(ws_handler))
        .with_state(state)
}

async fn readyz(State(st): State<AppState>) -> Response {
    if *st.shutdown.borrow() {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response()
    } else if st.hub.redis().is_some_and(|r| !r.fanout_up()) {
        (StatusCode::SERVICE_UNAVAILABLE, "redis unreachable\n").into_response()
    } else {
        "ready\n".into_response()
    }
}

async fn metrics(State(st): State<AppState>) -> Response {
    ([("content-type", "text/plain; version=0.0.4")], st.hub.render_metrics()).into_response()
}

/// New connections per IP in the last minute.
#[derive(Default)]
struct IpRate {
    seen: std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, std::collections::VecDeque<std::time::Instant>>>,
}

impl IpRate {
    /// Count one connection; false when over `per_minute`.
    fn allow(&self, ip: std::net::IpAddr, per_minute: u32) -> bool {
        if per_minute == 0 {
            return true;
        }
        let now = std::time::Instant::now();
        let mut m = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        // Bounded memory: forget addresses with nothing in the window.
        if m.len() > 100_000 {
            m.retain(|_, q| q.back().is_some_and(|t| now.duration_since(*t).as_secs() < 60));
        }
        let q = m.entry(ip).or_default();
        while q.front().is_some_and(|t| now.duration_since(*t).as_secs() >= 60) {
            q.pop_front();
        }
        if q.len() >= per_minute as usize {
            return false;
        }
        q.push_back(now);
        true
    }
}

async fn ws_handler(
    State(st): State<AppState>,
    axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<std::net::SocketAddr>,
    headers: axum::http::HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    if !st.rate.allow(peer.ip(), st.hub.config().limits.connections_per_ip_per_minute) {
        return (StatusCode::TOO_MANY_REQUESTS, "ferry: too many new connections from this address\n").into_response();
    }
    let allowed = &st.hub.config().allowed_origins;
    if !allowed.is_empty() {
        // Browsers always send Origin; other clients may not, and are not
        // subject to cross-site abuse.
        if let Some(origin) = headers.get("origin").and_then(|v| v.to_str().ok()) {
            if !allowed.iter().any(|a| a == origin) {
                return (StatusCode::FORBIDDEN, "ferry: origin not allowed\n").into_response();
            }
        }
    }
    let limits = &st.hub.config().limits;
    let ws = ws
        .protocols([SUBPROTOCOL_BINARY, SUBPROTOCOL_JSON])
        .max_message_size(limits.max_message_size)
        .max_frame_size(limits.max_frame_size)
        // tungstenite zero-fills its whole read buffer on every read, so its
        // size is resident per connection (128 KiB by default): keep it small,
        // larger frames grow it while they are read.
        .read_buffer_size(WS_READ_BUFFER);
    let enc = ws.selected_protocol().and_then(|p| p.to_str().ok()).and_then(Encoding::from_subprotocol);
    let Some(enc) = enc else {
        return (
            StatusCode::BAD_REQUEST,
            "ferry: request the WebSocket subprotocol ferry.v1 (binary) or ferry.v1.json\n",
        )
            .into_response();
    };
    let hub = st.hub.clone();
    let shutdown = st.shutdown.clone();
    let live = st.live.clone();
    ws.on_upgrade(move |socket| async move {
        live.count.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        conn::serve(hub, socket, enc, shutdown, peer).await;
        live.count.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        live.idle.notify_waiters();
    })
}
