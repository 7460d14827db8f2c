//! The admin console (docs/ADMIN.md): a web page served at `/admin` on the
//! main listener, and the JSON API under `/admin/api/` it calls.
//!
//! Off unless `[admin]` has a `password` or a `token` (the routes are then
//! not mounted at all: 404). Every response refuses peers beyond loopback,
//! and requests relayed by a proxy, unless `allow_remote`. Every API call
//! but `login` needs the credential: the session cookie a login sets, or
//! `Authorization: Bearer <admin token>`. The console reads and acts
//! through the same functions as the backend API (`crate::api`), so both
//! validate and answer alike.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant as StdInstant;

use axum::extract::rejection::QueryRejection;
use axum::extract::{ConnectInfo, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use ferry_core::ErrorCode;
use hmac::{Hmac, Mac};
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::Sha256;

use crate::api::{self, bad, from_reply, ApiError, ApiJson};
use crate::config::AdminConfig;
use crate::hub::{now_ms, Hub};

const INDEX_HTML: &str = include_str!("../admin/index.html");
const APP_JS: &str = include_str!("../admin/app.js");
const APP_CSS: &str = include_str!("../admin/app.css");
const FAVICON_SVG: &str = include_str!("../admin/favicon.svg");

/// The session cookie's name.
pub const COOKIE: &str = "ferry_admin";

/// Sent with every console response. Only the console's own files run;
/// nothing inline, no frames, no form posts or fetches elsewhere.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// Largest page a list route returns.
const MAX_PAGE: usize = 1000;

/// Logged-out sessions remembered until they expire; beyond it the
/// session key is replaced, which ends every session at once.
const MAX_REVOKED: usize = 10_000;

type HmacSha256 = Hmac<Sha256>;

/// The console's state.
struct Admin {
    hub: Arc<Hub>,
    cfg: AdminConfig,
    /// Signs session cookies; fresh per process, so a restart ends every
    /// session (and a cookie says nothing about the password).
    key: Mutex<[u8; 32]>,
    /// MACs of the configured secrets under `probe`, compared in constant
    /// time with the MAC of what a caller sends (equal lengths always).
    probe: [u8; 32],
    password: Option<[u8; 32]>,
    token: Option<[u8; 32]>,
    logins: crate::IpRate,
    /// Logged-out session nonces → their expiry, Unix seconds.
    revoked: Mutex<HashMap<String, u64>>,
    started: StdInstant,
    secure_cookie: bool,
}

/// How a caller proved itself.
#[derive(Clone, Debug)]
enum Credential {
    Token,
    Session { nonce: String, expires: u64 },
}

fn random_key() -> anyhow::Result<[u8; 32]> {
    let mut k = [0u8; 32];
    getrandom::fill(&mut k).map_err(|e| anyhow::anyhow!("admin console: no OS random numbers: {e}"))?;
    Ok(k)
}

fn mac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    // Any key length is valid for HMAC.
    let mut m = <HmacSha256 as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    for p in parts {
        m.update(p);
        m.update(&[0]);
    }
    m.finalize().into_bytes().into()
}

/// Equal without an early exit on the first differing byte.
fn ct_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

fn unauthorized(msg: &str) -> ApiError {
    ApiError(StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized as u16, msg.into())
}

impl Admin {
    fn new(hub: Arc<Hub>) -> anyhow::Result<Admin> {
        let cfg = hub.config().admin.clone();
        let probe = random_key()?;
        let password = cfg.password.as_ref().map(|p| mac(&probe, &[b"password", p.as_bytes()]));
        let token = cfg.token.as_ref().map(|t| mac(&probe, &[b"token", t.as_bytes()]));
        let secure_cookie = hub.config().tls.enabled();
        Ok(Admin {
            hub,
            cfg,
            key: Mutex::new(random_key()?),
            probe,
            password,
            token,
            logins: Default::default(),
            revoked: Default::default(),
            started: StdInstant::now(),
            secure_cookie,
        })
    }

    fn session_key(&self) -> [u8; 32] {
        *self.key.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A fresh session cookie value: `v1.<expiry>.<nonce>.<mac>`.
    fn new_session(&self) -> anyhow::Result<(String, u64)> {
        let expires = now_ms() / 1000 + self.cfg.session_ttl_secs;
        let mut nonce = [0u8; 16];
        getrandom::fill(&mut nonce).map_err(|e| anyhow::anyhow!("no OS random numbers: {e}"))?;
        let nonce = hex(&nonce);
        let exp = expires.to_string();
        let tag = mac(&self.session_key(), &[b"ferry-admin-session", exp.as_bytes(), nonce.as_bytes()]);
        Ok((format!("v1.{exp}.{nonce}.{}", hex(&tag)), expires))
    }

    /// Check a session cookie value: signature, expiry, not logged out.
    fn check_session(&self, value: &str) -> Option<Credential> {
        let mut parts = value.split('.');
        let (Some("v1"), Some(exp), Some(nonce), Some(tag), None) =
            (parts.next(), parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return None;
        };
        let want = mac(&self.session_key(), &[b"ferry-admin-session", exp.as_bytes(), nonce.as_bytes()]);
        if !ct_eq(&want, &unhex32(tag)?) {
            return None;
        }
        let expires: u64 = exp.parse().ok()?;
        if expires <= now_ms() / 1000 {
            return None;
        }
        if self.revoked.lock().unwrap_or_else(|e| e.into_inner()).contains_key(nonce) {
            return None;
        }
        Some(Credential::Session { nonce: nonce.into(), expires })
    }

    /// The caller's credential, or the 401 to answer.
    fn authorize(&self, headers: &HeaderMap) -> Result<Credential, ApiError> {
        if let Some(auth) = headers.get(header::AUTHORIZATION) {
            let given = auth.to_str().ok().and_then(|v| v.strip_prefix("Bearer ")).unwrap_or("");
            return match &self.token {
                Some(t) if ct_eq(t, &mac(&self.probe, &[b"token", given.as_bytes()])) => Ok(Credential::Token),
                _ => Err(unauthorized("wrong admin token")),
            };
        }
        match session_cookie(headers) {
            Some(v) => self.check_session(v).ok_or_else(|| unauthorized("session expired or not valid; log in again")),
            None => {
                Err(unauthorized("log in first (POST /admin/api/login), or send Authorization: Bearer <admin token>"))
            }
        }
    }

    fn revoke(&self, nonce: String, expires: u64) {
        let now = now_ms() / 1000;
        let mut r = self.revoked.lock().unwrap_or_else(|e| e.into_inner());
        r.retain(|_, exp| *exp > now);
        if r.len() >= MAX_REVOKED {
            // Cannot remember one more: end every session instead.
            r.clear();
            if let Ok(k) = random_key() {
                *self.key.lock().unwrap_or_else(|e| e.into_inner()) = k;
            }
            return;
        }
        r.insert(nonce, expires);
    }

    fn cookie(&self, value: &str, max_age: u64) -> HeaderValue {
        let secure = if self.secure_cookie { "; Secure" } else { "" };
        let c = format!("{COOKIE}={value}; Path=/admin; Max-Age={max_age}; HttpOnly; SameSite=Strict{secure}");
        HeaderValue::from_str(&c).unwrap_or_else(|_| HeaderValue::from_static("ferry_admin=; Max-Age=0"))
    }
}

/// The value of the session cookie, if the request has one.
fn session_cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value)
}

/// The console's routes, to merge into the main listener's router; fails
/// only without OS random numbers (for the session key).
pub(crate) fn router<S: Clone + Send + Sync + 'static>(hub: Arc<Hub>) -> anyhow::Result<Router<S>> {
    let admin = Arc::new(Admin::new(hub)?);
    let api = Router::new()
        .route("/session", get(session))
        .route("/logout", post(logout))
        .route("/info", get(info))
        .route("/nodes", get(nodes))
        .route("/connections", get(connections))
        .route("/channels", get(channels))
        .route("/metrics", get(metrics))
        .route("/presence", post(presence))
        .route("/history", post(history))
        .route("/publish", post(publish))
        .route("/disconnect", post(disconnect))
        .fallback(|| async {
            ApiError(StatusCode::NOT_FOUND, ErrorCode::MethodNotFound as u16, "no such admin route".into())
        })
        .method_not_allowed_fallback(|| async {
            ApiError(
                StatusCode::METHOD_NOT_ALLOWED,
                ErrorCode::MethodNotFound as u16,
                "method not allowed on this admin route".into(),
            )
        })
        // Design: `layer`, not `route_layer`, so unknown routes (the
        // fallback) need the credential too: without it nothing is told,
        // not even which routes exist. Login, added after, is the one
        // route without it.
        .layer(axum::middleware::from_fn_with_state(admin.clone(), require_credential))
        .route("/login", post(login))
        .layer(axum::extract::DefaultBodyLimit::max(api::MAX_BODY));
    let asset =
        |ctype: &'static str, body: &'static str| get(move || async move { ([(header::CONTENT_TYPE, ctype)], body) });
    let html = "text/html; charset=utf-8";
    Ok(Router::new()
        .route("/admin", asset(html, INDEX_HTML))
        .route("/admin/", asset(html, INDEX_HTML))
        .route("/admin/app.js", asset("text/javascript; charset=utf-8", APP_JS))
        .route("/admin/app.css", asset("text/css; charset=utf-8", APP_CSS))
        .route("/admin/favicon.svg", asset("image/svg+xml", FAVICON_SVG))
        .nest("/admin/api", api)
        .layer(axum::middleware::from_fn_with_state(admin.clone(), local_only))
        .layer(axum::middleware::map_response(security_headers))
        .with_state(admin))
}

async fn security_headers(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert("cross-origin-opener-policy", HeaderValue::from_static("same-origin"));
    h.insert("cross-origin-resource-policy", HeaderValue::from_static("same-origin"));
    // Nothing of the console is cached: the data is live, and the page is
    // tiny and compiled in.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// Headers a reverse proxy adds: a request carrying one came from
/// elsewhere, even when the proxy itself connects from loopback.
const RELAYED: [&str; 3] = ["forwarded", "x-forwarded-for", "x-real-ip"];

/// Whether the console may answer this peer.
fn peer_allowed(cfg: &AdminConfig, peer: Option<SocketAddr>, headers: &HeaderMap) -> bool {
    if cfg.allow_remote {
        return true;
    }
    // An unknown peer is refused: fail closed.
    let local = peer.is_some_and(|p| p.ip().to_canonical().is_loopback());
    local && !RELAYED.iter().any(|h| headers.contains_key(*h))
}

async fn local_only(State(a): State<Arc<Admin>>, req: Request, next: Next) -> Response {
    let peer = req.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0);
    if peer_allowed(&a.cfg, peer, req.headers()) {
        return next.run(req).await;
    }
    ApiError(
        StatusCode::FORBIDDEN,
        ErrorCode::PermissionDenied as u16,
        "the admin console answers loopback only (set [admin] allow_remote = true to serve it further)".into(),
    )
    .into_response()
}

async fn require_credential(State(a): State<Arc<Admin>>, mut req: Request, next: Next) -> Response {
    match a.authorize(req.headers()) {
        Ok(c) => {
            req.extensions_mut().insert(c);
            next.run(req).await
        }
        Err(e) => e.into_response(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LoginBody {
    password: String,
}

async fn login(State(a): State<Arc<Admin>>, req: Request) -> Response {
    let peer = req.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip());
    // Every attempt counts, right or wrong, before the body is looked at.
    let ip = peer.unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
    if !a.logins.allow(ip, a.cfg.login_attempts_per_minute) {
        return ApiError(
            StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::TooManyRequests as u16,
            "too many login attempts from this address; wait a minute".into(),
        )
        .into_response();
    }
    let body = match <ApiJson<LoginBody> as axum::extract::FromRequest<()>>::from_request(req, &()).await {
        Ok(ApiJson(b)) => b,
        Err(e) => return e.into_response(),
    };
    let given = mac(&a.probe, &[b"password", body.password.as_bytes()]);
    if !a.password.as_ref().is_some_and(|p| ct_eq(p, &given)) {
        tracing::warn!(peer = ?peer, "admin console: failed login");
        return unauthorized("wrong password").into_response();
    }
    let (value, expires) = match a.new_session() {
        Ok(s) => s,
        Err(e) => {
            return ApiError(StatusCode::INTERNAL_SERVER_ERROR, ErrorCode::Internal as u16, e.to_string())
                .into_response()
        }
    };
    tracing::info!(peer = ?peer, "admin console: login");
    let mut resp = Json(json!({"expires_ms": expires * 1000})).into_response();
    resp.headers_mut().insert(header::SET_COOKIE, a.cookie(&value, a.cfg.session_ttl_secs));
    resp
}

fn credential(req: &axum::http::Extensions) -> Option<Credential> {
    req.get::<Credential>().cloned()
}

async fn session(req: Request) -> Json<Value> {
    Json(match credential(req.extensions()) {
        Some(Credential::Session { expires, .. }) => json!({"via": "session", "expires_ms": expires * 1000}),
        _ => json!({"via": "token", "expires_ms": null}),
    })
}

async fn logout(State(a): State<Arc<Admin>>, req: Request) -> Response {
    if let Some(Credential::Session { nonce, expires }) = credential(req.extensions()) {
        a.revoke(nonce, expires);
    }
    let mut resp = Json(json!({"logged_out": true})).into_response();
    resp.headers_mut().insert(header::SET_COOKIE, a.cookie("", 0));
    resp
}

async fn info(State(a): State<Arc<Admin>>) -> Json<Value> {
    let hub = &a.hub;
    let cfg = hub.config();
    let page = hub.connections_page(None, None, 0);
    let (_, active) = hub.channels_page(None, true, 0);
    let dev_auth = cfg.auth.hmac_secret.is_none()
        && cfg.auth.rsa_public_key.is_none()
        && cfg.auth.ec_public_key.is_none()
        && cfg.auth.jwks_url.is_none();
    Json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_secs": a.started.elapsed().as_secs(),
        "node": hub.node_id().unwrap_or("embedded"),
        "engine": if hub.redis().is_some() { "redis" } else { "embedded" },
        "engine_up": hub.redis().is_none_or(|r| r.fanout_up()),
        "connections": page.total,
        "users": page.users,
        "channels_active": active,
        "tls": cfg.tls.enabled(),
        "auth": if dev_auth { "development" } else { "jwt" },
        "allow_anonymous": cfg.allow_anonymous,
        "time_ms": now_ms(),
    }))
}

async fn nodes(State(a): State<Arc<Admin>>) -> Result<Json<Value>, ApiError> {
    let nodes = a.hub.nodes().await.map_err(from_reply)?;
    let list: Vec<Value> =
        nodes.iter().map(|n| json!({"id": n.id, "this": n.this, "beat_ago_ms": n.beat_ago_ms})).collect();
    Ok(Json(json!({ "nodes": list })))
}

/// A query string of the expected shape, else 400 in the envelope.
fn query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    q.map(|Query(t)| t).map_err(|e| bad(format!("query string: {}", e.body_text())))
}

fn page_limit(limit: Option<usize>) -> Result<usize, ApiError> {
    match limit.unwrap_or(100) {
        n @ 1..=MAX_PAGE => Ok(n),
        _ => Err(bad(format!("limit must be 1 to {MAX_PAGE}"))),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConnectionsQuery {
    /// Client id (hex) the page starts after.
    after: Option<String>,
    user: Option<String>,
    limit: Option<usize>,
}

async fn connections(
    State(a): State<Arc<Admin>>,
    q: Result<Query<ConnectionsQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let q = query(q)?;
    let limit = page_limit(q.limit)?;
    let after = match q.after.as_deref() {
        Some(s) => Some(u64::from_str_radix(s, 16).map_err(|_| bad("after must be a client id (hex)"))?),
        None => None,
    };
    let page = a.hub.connections_page(after, q.user.as_deref(), limit);
    let next = (page.conns.len() == limit).then(|| page.conns.last().map(|c| c.info.client.clone())).flatten();
    let list: Vec<Value> = page
        .conns
        .iter()
        .map(|c| {
            let info = c.info.info.as_ref().map(|b| serde_json::from_slice::<Value>(&b.0).unwrap_or(Value::Null));
            json!({
                "client": c.info.client, "user": c.info.user, "device": c.device, "since_ms": c.since_ms,
                "channels": c.channels, "lagged": c.lagged, "info": info,
            })
        })
        .collect();
    Ok(Json(json!({"connections": list, "total": page.total, "users": page.users, "next": next})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ChannelsQuery {
    after: Option<String>,
    limit: Option<usize>,
    /// Only channels with a subscriber on this node.
    #[serde(default)]
    active: bool,
}

async fn channels(
    State(a): State<Arc<Admin>>,
    q: Result<Query<ChannelsQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let q = query(q)?;
    let limit = page_limit(q.limit)?;
    let (mut page, total) = a.hub.channels_page(q.after.as_deref(), q.active, limit);
    if a.hub.redis().is_some() {
        // Other nodes publish too: the current tops are in Redis.
        let heads = futures_util::future::join_all(page.iter().map(|c| a.hub.stream_header(&c.name))).await;
        for (c, h) in page.iter_mut().zip(heads) {
            if let Some(h) = h.map_err(from_reply)? {
                (c.epoch, c.first, c.top) = (h.epoch, h.first, h.top);
            }
        }
    }
    let cfg = a.hub.config();
    let next = (page.len() == limit).then(|| page.last().map(|c| c.name.clone())).flatten();
    let list: Vec<Value> = page
        .iter()
        .map(|c| {
            let ns = cfg.namespace(&c.name);
            json!({
                "name": c.name, "namespace": crate::channel::namespace_of(&c.name),
                "epoch": c.epoch, "first": c.first, "top": c.top,
                "retained": (c.top + 1).saturating_sub(c.first.max(1)),
                "subscribers": c.subscribers,
                "history_size": ns.history_size, "history_ttl_secs": ns.history_ttl_secs,
                "presence": ns.presence,
            })
        })
        .collect();
    Ok(Json(json!({"channels": list, "total": total, "next": next})))
}

/// The Prometheus text of `/metrics` as a JSON object, so the page shows
/// what a scraper sees (labels stay in the names, but for `node`: the
/// console is one node's, and shows which).
fn metrics_json(text: &str) -> BTreeMap<String, Value> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .map(|(name, v)| (without_node_label(name), v))
        .filter_map(|(name, v)| {
            let x: f64 = v.parse().ok()?;
            let n = if x.fract() == 0.0 && x.abs() < 9e15 {
                json!(x as i64)
            } else {
                serde_json::Number::from_f64(x).map(Value::Number)?
            };
            Some((name.to_string(), n))
        })
        .collect()
}

/// `name{node="x",a="b"}` → `name{a="b"}`; `name{node="x"}` → `name`.
fn without_node_label(name: &str) -> String {
    let Some((base, rest)) = name.split_once('{') else { return name.to_string() };
    let labels = rest.strip_suffix('}').unwrap_or(rest);
    // Node names are escaped label values: no unescaped `",` inside.
    let kept: Vec<&str> = labels
        .split("\",")
        .filter(|l| !l.is_empty())
        .map(|l| l.trim_end_matches('"'))
        .filter(|l| !l.starts_with("node=\""))
        .collect();
    if kept.is_empty() {
        return base.to_string();
    }
    let kept: Vec<String> = kept.iter().map(|l| format!("{l}\"")).collect();
    format!("{base}{{{}}}", kept.join(","))
}

async fn metrics(State(a): State<Arc<Admin>>) -> Json<Value> {
    Json(json!({"time_ms": now_ms(), "metrics": metrics_json(&a.hub.render_metrics())}))
}

/// A channel's presence: the list (paged) and its counts.
async fn presence(
    State(a): State<Arc<Admin>>,
    ApiJson(b): ApiJson<api::PresenceBody>,
) -> Result<Json<Value>, ApiError> {
    let stats = api::presence_stats_value(&a.hub, &b.channel).await?;
    let mut v = api::presence_value(&a.hub, b).await?;
    v["stats"] = stats;
    Ok(Json(v))
}

async fn history(State(a): State<Arc<Admin>>, ApiJson(b): ApiJson<api::HistoryBody>) -> Result<Json<Value>, ApiError> {
    Ok(Json(api::history_value(&a.hub, b).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishBody {
    channel: String,
    data: Option<Value>,
    b64data: Option<String>,
    #[serde(default = "one")]
    qos: u8,
}

fn one() -> u8 {
    1
}

async fn publish(State(a): State<Arc<Admin>>, ApiJson(b): ApiJson<PublishBody>) -> Result<Json<Value>, ApiError> {
    let data = api::payload_of(&b.data, &b.b64data)?;
    // The id shows in history where a publication came from.
    let id = format!("admin:{:x}:{:x}", now_ms(), api::rand_suffix());
    tracing::info!(channel = %b.channel, "admin console: publish");
    Ok(Json(api::publish_one(&a.hub, &b.channel, data, b.qos, Some(id)).await?))
}

async fn disconnect(
    State(a): State<Arc<Admin>>,
    ApiJson(b): ApiJson<api::DisconnectBody>,
) -> Result<Json<Value>, ApiError> {
    let what = format!("{:?}/{:?}", b.user, b.client);
    let v = api::disconnect_value(&a.hub, b).await?;
    tracing::info!(who = %what, n = %v["disconnected"], "admin console: disconnect");
    Ok(Json(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_text_becomes_numbers() {
        let m = metrics_json("# HELP a b\n# TYPE a gauge\na 3\nb{qos=\"1\"} 7\nc 0.25\nbad line\n");
        assert_eq!(m["a"], json!(3));
        assert_eq!(m["b{qos=\"1\"}"], json!(7));
        assert_eq!(m["c"], json!(0.25));
        assert_eq!(m.len(), 3);
        let m = metrics_json("a{node=\"n1\"} 3\nb{node=\"n1\",qos=\"1\"} 7\nc{route=\"/x\",node=\"n\"} 1\n");
        assert_eq!(m["a"], json!(3));
        assert_eq!(m["b{qos=\"1\"}"], json!(7));
        assert_eq!(m["c{route=\"/x\"}"], json!(1));
    }

    #[test]
    fn remote_peers_and_relayed_requests_are_refused_unless_allowed() {
        let mut cfg = AdminConfig::default();
        let h = HeaderMap::new();
        let at = |s: &str| Some(s.parse::<SocketAddr>().unwrap());
        assert!(peer_allowed(&cfg, at("127.0.0.1:5000"), &h));
        assert!(peer_allowed(&cfg, at("[::1]:5000"), &h));
        assert!(peer_allowed(&cfg, at("[::ffff:127.0.0.1]:5000"), &h));
        assert!(!peer_allowed(&cfg, at("10.0.0.1:5000"), &h));
        assert!(!peer_allowed(&cfg, None, &h), "unknown peer: refused");
        let mut relayed = HeaderMap::new();
        relayed.insert("x-forwarded-for", HeaderValue::from_static("203.0.113.9"));
        assert!(!peer_allowed(&cfg, at("127.0.0.1:5000"), &relayed));
        cfg.allow_remote = true;
        assert!(peer_allowed(&cfg, at("10.0.0.1:5000"), &relayed));
    }

    #[test]
    fn cookies_are_found_among_others() {
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, HeaderValue::from_static("a=1; ferry_admin_x=2"));
        h.append(header::COOKIE, HeaderValue::from_static("b=3;ferry_admin=v1.x.y.z"));
        assert_eq!(session_cookie(&h), Some("v1.x.y.z"));
    }

    #[test]
    fn hex_round_trips() {
        let k = [0xa5u8; 32];
        assert_eq!(unhex32(&hex(&k)), Some(k));
        assert_eq!(unhex32("zz"), None);
        assert_eq!(unhex32(&"é".repeat(32)), None, "no panic on multi-byte text");
    }
}
