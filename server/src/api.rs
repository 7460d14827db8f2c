//! The backend HTTP API: JSON over HTTP on its own port, for the business
//! systems beside Ferry. Documented in `docs/openapi.json` (served at
//! `/api/openapi.json`); a test checks every documented route.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant as StdInstant};

use axum::extract::{FromRequest, MatchedPath, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use ferry_core::frame::{HistoryBound, HistoryRequest, Publication, Qos, ReplyBody};
use ferry_core::{CloseCode, ErrorCode};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::auth::{Credential, Failure};
use crate::hub::Hub;

/// The OpenAPI document, committed and served as-is.
pub const OPENAPI: &str = include_str!("../../docs/openapi.json");

/// How long an idempotency key remembers its request, ms.
const IDEMPOTENCY_WINDOW: Duration = Duration::from_secs(24 * 3600);

/// idempotency key → (request fingerprint, response, when).
type IdempotencyTable = HashMap<String, (String, Value, StdInstant)>;

#[derive(Clone)]
struct Api {
    hub: Arc<Hub>,
    keys: Arc<Vec<String>>,
    started: StdInstant,
    idem: Arc<Mutex<IdempotencyTable>>,
}

/// Largest request body, bytes (a batch of 1000 small publishes fits).
pub const MAX_BODY: usize = 4 << 20;

/// The API router.
pub fn router(hub: Arc<Hub>, keys: Vec<String>) -> Router {
    let api = Api { hub, keys: Arc::new(keys), started: StdInstant::now(), idem: Default::default() };
    Router::new()
        .route("/api/info", get(info))
        .route("/api/channels", get(channels))
        .route("/api/publish", post(publish))
        .route("/api/broadcast", post(broadcast))
        .route("/api/history", post(history))
        .route("/api/presence", post(presence))
        .route("/api/presence_stats", post(presence_stats))
        .route("/api/online", post(online))
        .route("/api/disconnect", post(disconnect))
        .route("/api/unsubscribe", post(unsubscribe))
        .route("/api/batch", post(batch))
        // Design: the key is checked before the body is read, so a caller
        // without it learns nothing from validation errors.
        .route_layer(axum::middleware::from_fn_with_state(api.clone(), require_key))
        .route("/api/openapi.json", get(|| async { ([("content-type", "application/json")], OPENAPI) }))
        .fallback(|| async {
            ApiError(
                StatusCode::NOT_FOUND,
                ErrorCode::MethodNotFound as u16,
                "no such route; see /api/openapi.json".into(),
            )
        })
        .method_not_allowed_fallback(|| async {
            ApiError(
                StatusCode::METHOD_NOT_ALLOWED,
                ErrorCode::MethodNotFound as u16,
                "method not allowed on this route; see /api/openapi.json".into(),
            )
        })
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        // Outermost, so it sees every answer, refusals of the key included.
        .layer(axum::middleware::from_fn_with_state(api.clone(), observe))
        .with_state(api)
}

/// Count every request by route template and status, and log the errors.
async fn observe(State(api): State<Api>, req: Request, next: Next) -> Response {
    let route = req.extensions().get::<MatchedPath>().map(|p| p.as_str().to_owned());
    let method = req.method().clone();
    let resp = next.run(req).await;
    let route = route.as_deref().unwrap_or(crate::metrics::UNMATCHED_ROUTE);
    let status = resp.status();
    api.hub.metrics.http.count(route, status.as_u16());
    if (status.is_client_error() || status.is_server_error()) && api.hub.logs.api_errors.allow() {
        let error = resp.extensions().get::<ErrorMessage>().map_or("", |m| m.0.as_str());
        let status = status.as_u16();
        if status >= 500 {
            tracing::warn!(%method, route, status, error, "API error");
        } else {
            tracing::info!(%method, route, status, error, "API error");
        }
    }
    resp
}

/// An error's message, carried on the response for [`observe`]'s log line.
#[derive(Clone)]
struct ErrorMessage(String);

async fn require_key(State(api): State<Api>, req: Request, next: Next) -> Response {
    match api.check_key(req.headers()) {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

/// A JSON request body, strictly read: `Content-Type: application/json`
/// (else 415), at most [`MAX_BODY`] bytes (else 413), valid JSON of the
/// expected shape with no unknown fields (else 400 naming the problem).
/// Every refusal is the documented error envelope.
pub(crate) struct ApiJson<T>(pub(crate) T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let ctype = req.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
        let mime = ctype.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
        if mime != "application/json" {
            return Err(ApiError(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                ErrorCode::BadRequest as u16,
                format!(
                    "Content-Type must be application/json (got {})",
                    if ctype.is_empty() { "none" } else { ctype }
                ),
            ));
        }
        let body = axum::body::Bytes::from_request(req, state).await.map_err(|e| {
            let status = e.status();
            let code = if status == StatusCode::PAYLOAD_TOO_LARGE {
                ErrorCode::MessageTooLarge
            } else {
                ErrorCode::BadRequest
            };
            ApiError(status, code as u16, format!("request body: {}", e.body_text()))
        })?;
        parse(&body).map(ApiJson)
    }
}

/// Parse a JSON value of the expected shape; the message names the field.
fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| bad(format!("invalid request body: {e}")))
}

/// The same for an already parsed value (batch items).
fn parse_value<T: DeserializeOwned>(what: &str, v: Value) -> Result<T, ApiError> {
    serde_json::from_value(v).map_err(|e| bad(format!("{what}: {e}")))
}

/// An API error: HTTP status plus Ferry's error code; answered as the
/// documented envelope `{"error": {"code", "message"}}`.
pub(crate) struct ApiError(pub(crate) StatusCode, pub(crate) u16, pub(crate) String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let note = ErrorMessage(self.2.chars().take(200).collect());
        let mut resp = (self.0, Json(json!({"error": {"code": self.1, "message": self.2}}))).into_response();
        resp.extensions_mut().insert(note);
        resp
    }
}

pub(crate) fn bad(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, ErrorCode::BadRequest as u16, msg.into())
}

pub(crate) fn from_reply(e: ferry_core::frame::ErrorReply) -> ApiError {
    let status = if e.temporary { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::BAD_REQUEST };
    ApiError(status, e.code, e.message)
}

impl Api {
    fn check_key(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        if self.keys.is_empty() {
            return Ok(());
        }
        let given = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("apikey ").or_else(|| v.strip_prefix("Bearer ")));
        let Some(given) = given.filter(|g| !g.is_empty()) else {
            self.hub.auth().record_failure(Credential::ApiKey, Failure::Missing);
            return Err(ApiError(StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized as u16, "missing API key".into()));
        };
        // Constant-time comparison: no early exit on the first differing byte.
        let ok = self.keys.iter().any(|k| {
            k.len() == given.len() && k.bytes().zip(given.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
        });
        if ok {
            Ok(())
        } else {
            self.hub.auth().record_failure(Credential::ApiKey, Failure::WrongKey);
            Err(ApiError(StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized as u16, "wrong API key".into()))
        }
    }
}

/// Message data: JSON (`data`) or base64 bytes (`b64data`).
#[derive(Deserialize, Serialize, Clone, Debug)]
#[serde(deny_unknown_fields)]
struct PublishBody {
    channel: Option<String>,
    #[serde(default)]
    channels: Vec<String>,
    data: Option<Value>,
    b64data: Option<String>,
    #[serde(default = "one")]
    qos: u8,
    idempotency_key: Option<String>,
}

fn one() -> u8 {
    1
}

fn payload(b: &PublishBody) -> Result<Vec<u8>, ApiError> {
    payload_of(&b.data, &b.b64data)
}

/// The bytes of a publish: JSON `data` or base64 `b64data`, exactly one.
pub(crate) fn payload_of(data: &Option<Value>, b64data: &Option<String>) -> Result<Vec<u8>, ApiError> {
    match (data, b64data) {
        (Some(v), None) => Ok(serde_json::to_vec(v).unwrap_or_default()),
        (None, Some(s)) => ferry_core::base64::decode(s).map_err(|_| bad("b64data is not valid base64")),
        _ => Err(bad("give exactly one of data (JSON) or b64data (base64)")),
    }
}

async fn info(State(api): State<Api>) -> Result<Json<Value>, ApiError> {
    Ok(Json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_secs": api.started.elapsed().as_secs(),
        "connections": api.hub.connection_count(),
        "channels": api.hub.active_channels().len(),
    })))
}

async fn channels(State(api): State<Api>) -> Result<Json<Value>, ApiError> {
    Ok(Json(json!({ "channels": api.hub.active_channels() })))
}

/// Publish once into `channel`, waiting for the durable commit; `key` is
/// the message id (a fresh `api:` id without one).
pub(crate) async fn publish_one(
    hub: &Hub,
    channel: &str,
    data: Vec<u8>,
    qos: u8,
    key: Option<String>,
) -> Result<Value, ApiError> {
    crate::channel::validate(channel).map_err(from_reply)?;
    let qos = Qos::from_u8(qos).ok_or_else(|| bad("qos must be 0, 1 or 2"))?;
    // The idempotency key is the message id: a retry inside the dedup window
    // is answered with the first result and stored once.
    let id = key.unwrap_or_else(|| format!("api:{:x}:{}", crate::hub::now_ms(), rand_suffix()));
    let stored = hub.publish_wait(channel, &id, qos, data).await.map_err(|e| {
        // The key was used for another publish (maybe by a WebSocket client
        // as its message id): a conflict, like a reused key with another body.
        if e.code == ErrorCode::BadRequest as u16 && e.message.starts_with(ferry_core::MESSAGE_ID_REUSED) {
            ApiError(StatusCode::CONFLICT, e.code, e.message)
        } else {
            from_reply(e)
        }
    })?;
    Ok(
        json!({"channel": channel, "epoch": stored.epoch, "offset": stored.offset, "duplicate": stored.duplicate, "message_id": id}),
    )
}

pub(crate) fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(StdInstant::now().elapsed().as_nanos());
    h.finish()
}

/// Run `f` once per idempotency key: the same key with the same body gets
/// the first answer; with a different body it is refused.
async fn idempotent<F, Fut>(api: &Api, key: Option<&str>, body: &PublishBody, f: F) -> Result<Value, ApiError>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<Value, ApiError>>,
{
    let Some(key) = key else { return f().await };
    let fingerprint = serde_json::to_string(body).unwrap_or_default();
    {
        let mut m = api.idem.lock().unwrap_or_else(|e| e.into_inner());
        m.retain(|_, (_, _, at)| at.elapsed() < IDEMPOTENCY_WINDOW);
        if let Some((fp, resp, _)) = m.get(key) {
            if *fp != fingerprint {
                return Err(ApiError(
                    StatusCode::CONFLICT,
                    ErrorCode::BadRequest as u16,
                    "idempotency key reused with a different request".into(),
                ));
            }
            return Ok(resp.clone());
        }
    }
    let resp = f().await?;
    api.idem
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(key.into(), (fingerprint, resp.clone(), StdInstant::now()));
    Ok(resp)
}

async fn publish(State(api): State<Api>, ApiJson(b): ApiJson<PublishBody>) -> Result<Json<Value>, ApiError> {
    let channel = b.channel.clone().ok_or_else(|| bad("channel is required"))?;
    let data = payload(&b)?;
    let key = b.idempotency_key.clone();
    let resp =
        idempotent(&api, key.as_deref(), &b, || publish_one(&api.hub, &channel, data, b.qos, key.clone())).await?;
    Ok(Json(resp))
}

async fn broadcast(State(api): State<Api>, ApiJson(b): ApiJson<PublishBody>) -> Result<Json<Value>, ApiError> {
    if b.channels.is_empty() || b.channels.len() > 1000 {
        return Err(bad("channels: 1 to 1000 names"));
    }
    let data = payload(&b)?;
    let key = b.idempotency_key.clone();
    let resp = idempotent(&api, key.as_deref(), &b, || async {
        let mut results = Vec::new();
        for ch in &b.channels {
            let k = key.as_ref().map(|k| format!("{k}:{ch}"));
            results.push(match publish_one(&api.hub, ch, data.clone(), b.qos, k).await {
                Ok(v) => v,
                Err(ApiError(_, code, message)) => json!({"channel": ch, "error": {"code": code, "message": message}}),
            });
        }
        Ok(json!({ "results": results }))
    })
    .await?;
    Ok(Json(resp))
}

/// A history query (`/api/history`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct HistoryBody {
    channel: String,
    since_offset: Option<u64>,
    until_offset: Option<u64>,
    since_time_ms: Option<u64>,
    until_time_ms: Option<u64>,
    #[serde(default = "hundred")]
    limit: u32,
    #[serde(default)]
    reverse: bool,
}

fn hundred() -> u32 {
    100
}

/// A publication as the API shows it.
pub(crate) fn pub_json(p: &Publication) -> Value {
    let data = &p.payload.data.0;
    let mut v = json!({
        "offset": p.offset, "epoch": p.epoch, "message_id": p.message_id, "qos": p.qos.as_u8(),
        "time_ms": p.time_ms, "b64data": ferry_core::base64::encode(data),
    });
    if let Ok(j) = serde_json::from_slice::<Value>(data) {
        v["data"] = j;
    }
    if let Some(by) = &p.publisher {
        v["publisher"] = json!({"client": by.client, "user": by.user});
    }
    v
}

/// Run a history query; the answer as `/api/history` gives it.
pub(crate) async fn history_value(hub: &Arc<Hub>, b: HistoryBody) -> Result<Value, ApiError> {
    let bound = |o: Option<u64>, t: Option<u64>| match (o, t) {
        (Some(o), None) => Ok(Some(HistoryBound::Offset(o))),
        (None, Some(t)) => Ok(Some(HistoryBound::TimeMs(t))),
        (None, None) => Ok(None),
        _ => Err(bad("give an offset or a time for each bound, not both")),
    };
    let req = HistoryRequest {
        channel: b.channel,
        since: bound(b.since_offset, b.since_time_ms)?,
        until: bound(b.until_offset, b.until_time_ms)?,
        limit: b.limit,
        reverse: b.reverse,
    };
    match hub.history(&req).await.map_err(from_reply)? {
        ReplyBody::History { publications, top } => Ok(json!({
            "publications": publications.iter().map(pub_json).collect::<Vec<_>>(),
            "top": {"epoch": top.epoch, "offset": top.offset},
        })),
        _ => Err(ApiError(StatusCode::INTERNAL_SERVER_ERROR, ErrorCode::Internal as u16, "unexpected".into())),
    }
}

async fn history(State(api): State<Api>, ApiJson(b): ApiJson<HistoryBody>) -> Result<Json<Value>, ApiError> {
    Ok(Json(history_value(&api.hub, b).await?))
}

/// A presence query (`/api/presence`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PresenceBody {
    pub(crate) channel: String,
    after: Option<String>,
    #[serde(default = "thousand")]
    limit: usize,
}

fn thousand() -> usize {
    1000
}

async fn presence(State(api): State<Api>, ApiJson(b): ApiJson<PresenceBody>) -> Result<Json<Value>, ApiError> {
    Ok(Json(presence_value(&api.hub, b).await?))
}

/// Run a presence query; the answer as `/api/presence` gives it.
pub(crate) async fn presence_value(hub: &Hub, b: PresenceBody) -> Result<Value, ApiError> {
    let list = hub.presence(&b.channel, b.after.as_deref(), b.limit.min(10_000)).await.map_err(from_reply)?;
    let next = if list.len() == b.limit { list.last().map(|c| c.client.clone()) } else { None };
    let clients: Vec<Value> = list.iter().map(|c| json!({"client": c.client, "user": c.user})).collect();
    Ok(json!({ "clients": clients, "next": next }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ChannelBody {
    channel: String,
}

async fn presence_stats(State(api): State<Api>, ApiJson(b): ApiJson<ChannelBody>) -> Result<Json<Value>, ApiError> {
    Ok(Json(presence_stats_value(&api.hub, &b.channel).await?))
}

/// A channel's presence counts, as `/api/presence_stats` gives them.
pub(crate) async fn presence_stats_value(hub: &Hub, channel: &str) -> Result<Value, ApiError> {
    let s = hub.presence_stats(channel).await.map_err(from_reply)?;
    Ok(json!({ "clients": s.clients, "users": s.users }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UsersBody {
    users: Vec<String>,
}

async fn online(State(api): State<Api>, ApiJson(b): ApiJson<UsersBody>) -> Result<Json<Value>, ApiError> {
    let online = api.hub.online(&b.users).await.map_err(from_reply)?;
    Ok(Json(json!({ "online": online })))
}

/// A disconnect order (`/api/disconnect`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DisconnectBody {
    pub(crate) user: String,
    pub(crate) client: Option<String>,
    /// Reconnect allowed (3007) or not (3503, the default).
    #[serde(default)]
    reconnect: bool,
}

async fn disconnect(State(api): State<Api>, ApiJson(b): ApiJson<DisconnectBody>) -> Result<Json<Value>, ApiError> {
    Ok(Json(disconnect_value(&api.hub, b).await?))
}

/// Carry out a disconnect order; the answer as `/api/disconnect` gives it.
pub(crate) async fn disconnect_value(hub: &Hub, b: DisconnectBody) -> Result<Value, ApiError> {
    let code = if b.reconnect { CloseCode::ForceReconnect } else { CloseCode::ForceDisconnect };
    let n = hub.disconnect_user(&b.user, b.client.as_deref(), code).await.map_err(from_reply)?;
    Ok(json!({ "disconnected": n }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UnsubscribeBody {
    user: String,
    channel: String,
}

async fn unsubscribe(State(api): State<Api>, ApiJson(b): ApiJson<UnsubscribeBody>) -> Result<Json<Value>, ApiError> {
    let n = api.hub.unsubscribe_user(&b.user, &b.channel).await.map_err(from_reply)?;
    Ok(Json(json!({ "unsubscribed": n })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchBody {
    /// Parsed one by one, so that one malformed item gets its own error
    /// reply instead of failing the whole batch.
    commands: Vec<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchCommand {
    method: String,
    params: Value,
}

async fn batch(State(api): State<Api>, ApiJson(b): ApiJson<BatchBody>) -> Result<Json<Value>, ApiError> {
    if b.commands.len() > 1000 {
        return Err(bad("at most 1000 commands per batch"));
    }
    let mut replies = Vec::with_capacity(b.commands.len());
    for (i, item) in b.commands.into_iter().enumerate() {
        replies.push(match batch_one(&api, i, item).await {
            Ok(v) => json!({"result": v}),
            Err(ApiError(_, code, message)) => json!({"error": {"code": code, "message": message}}),
        });
    }
    Ok(Json(json!({ "replies": replies })))
}

async fn batch_one(api: &Api, i: usize, item: Value) -> Result<Value, ApiError> {
    let c: BatchCommand = parse_value(&format!("commands[{i}]"), item)?;
    let what = format!("commands[{i}].params");
    match c.method.as_str() {
        "publish" => {
            let p: PublishBody = parse_value(&what, c.params)?;
            let ch = p.channel.clone().ok_or_else(|| bad(format!("{what}: channel is required")))?;
            let data = payload(&p)?;
            let key = p.idempotency_key.clone();
            idempotent(api, key.as_deref(), &p, || publish_one(&api.hub, &ch, data, p.qos, key.clone())).await
        }
        "history" => history_value(&api.hub, parse_value(&what, c.params)?).await,
        "presence_stats" => {
            let p: ChannelBody = parse_value(&what, c.params)?;
            presence_stats_value(&api.hub, &p.channel).await
        }
        "online" => {
            let u: UsersBody = parse_value(&what, c.params)?;
            let online = api.hub.online(&u.users).await.map_err(from_reply)?;
            Ok(json!({ "online": online }))
        }
        other => Err(ApiError(
            StatusCode::BAD_REQUEST,
            ErrorCode::MethodNotFound as u16,
            format!("commands[{i}]: unknown method {other:?} (publish, history, presence_stats, online)"),
        )),
    }
}
