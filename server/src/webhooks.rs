//! Webhooks: HTTP callbacks to the business backend for user online and
//! offline, subscribe and unsubscribe, and client publishes.
//!
//! Design: one bounded queue and one worker, so calls leave in the order the
//! events happened (per user in particular) and never block delivery: when
//! the queue is full the event is dropped and counted. Each call is signed
//! with HMAC-SHA256 over the body and retried with exponential backoff.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, Mac};
use serde::Serialize;
use sha2::Sha256;
use tokio::sync::mpsc;

use crate::http_client::{HttpClient, Url};

use crate::config::WebhookConfig;
use crate::metrics::Metrics;

/// One webhook event.
#[derive(Clone, Debug, Serialize, PartialEq)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Hook {
    /// A user's first connection (after any grace period since their last).
    Online {
        /// User id.
        user: String,
        /// On a cluster: the user's transition number (online and offline
        /// count up together), so a receiver can order calls from
        /// different nodes.
        #[serde(skip_serializing_if = "Option::is_none")]
        transition: Option<u64>,
    },
    /// A user's last connection went away and they did not come back within the grace period.
    Offline {
        /// User id.
        user: String,
        /// As for `online`.
        #[serde(skip_serializing_if = "Option::is_none")]
        transition: Option<u64>,
    },
    /// A subscription started.
    Subscribe {
        /// User id.
        user: String,
        /// Channel.
        channel: String,
    },
    /// A subscription ended.
    Unsubscribe {
        /// User id.
        user: String,
        /// Channel.
        channel: String,
    },
    /// A client published (in a namespace chosen in the config).
    Publish {
        /// User id.
        user: String,
        /// Channel.
        channel: String,
        /// Offset it was stored at.
        offset: u64,
        /// Message id.
        message_id: String,
        /// Payload, base64.
        b64data: String,
    },
}

/// The sending side, held by the hub.
pub struct Webhooks {
    cfg: WebhookConfig,
    tx: mpsc::Sender<(Hook, u64)>,
    users: std::sync::Mutex<HashMap<String, UserState>>,
}

impl Webhooks {
    /// Start the worker (inside a tokio runtime).
    pub fn start(cfg: WebhookConfig, http: HttpClient, metrics: Arc<Metrics>) -> anyhow::Result<Arc<Webhooks>> {
        let url = Url::parse(&cfg.url).map_err(|e| anyhow::anyhow!("webhooks.url: {e}"))?;
        let (tx, rx) = mpsc::channel(cfg.queue.max(1));
        tokio::spawn(worker(cfg.clone(), url, http, rx, metrics));
        Ok(Arc::new(Webhooks { cfg, tx, users: Default::default() }))
    }

    fn wants(&self, h: &Hook) -> bool {
        let name = match h {
            Hook::Online { .. } => "online",
            Hook::Offline { .. } => "offline",
            Hook::Subscribe { .. } => "subscribe",
            Hook::Unsubscribe { .. } => "unsubscribe",
            Hook::Publish { channel, .. } => {
                return self.cfg.events.iter().any(|e| e == "publish")
                    && self.cfg.publish_namespaces.iter().any(|n| n == crate::channel::namespace_of(channel));
            }
        };
        self.cfg.events.iter().any(|e| e == name)
    }

    /// Queue an event; never waits. Returns false when it was dropped.
    pub fn send(&self, h: Hook) -> bool {
        if !self.wants(&h) {
            return true;
        }
        self.tx.try_send((h, crate::hub::now_ms())).is_ok()
    }

    /// A connection of `user` opened.
    pub fn user_up(self: &Arc<Self>, user: &str) {
        if user.is_empty() {
            return;
        }
        let online = {
            let mut m = self.users.lock().unwrap_or_else(|e| e.into_inner());
            let e = m.entry(user.to_string()).or_default();
            e.conns += 1;
            // Back within the grace period: they never went offline.
            e.conns == 1 && e.pending.take().is_none()
        };
        if online {
            self.send(Hook::Online { user: user.into(), transition: None });
        }
    }

    /// A connection of `user` closed; offline follows after `grace`.
    pub fn user_down(self: &Arc<Self>, user: &str, grace: Duration) {
        if user.is_empty() {
            return;
        }
        let generation = {
            let mut m = self.users.lock().unwrap_or_else(|e| e.into_inner());
            let Some(e) = m.get_mut(user) else { return };
            e.conns = e.conns.saturating_sub(1);
            if e.conns > 0 {
                return;
            }
            e.generation += 1;
            e.pending = Some(e.generation);
            e.generation
        };
        let me = self.clone();
        let user = user.to_string();
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            let gone = {
                let mut m = me.users.lock().unwrap_or_else(|e| e.into_inner());
                let still = m.get(&user).is_some_and(|e| e.conns == 0 && e.pending == Some(generation));
                if still {
                    m.remove(&user);
                }
                still
            };
            if gone {
                me.send(Hook::Offline { user, transition: None });
            }
        });
    }
}

#[derive(Default)]
struct UserState {
    conns: usize,
    /// An offline is scheduled with this generation.
    pending: Option<u64>,
    generation: u64,
}

/// Signature header value for a body.
pub fn sign(secret: &str, body: &[u8]) -> String {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(body);
    let tag = mac.finalize().into_bytes();
    let hex: String = tag.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256={hex}")
}

async fn worker(
    cfg: WebhookConfig,
    url: Url,
    http: HttpClient,
    mut rx: mpsc::Receiver<(Hook, u64)>,
    metrics: Arc<Metrics>,
) {
    let mut seq = 0u64;
    while let Some((hook, at)) = rx.recv().await {
        seq += 1;
        let mut body = serde_json::to_value(&hook).unwrap_or_default();
        body["time_ms"] = at.into();
        body["seq"] = seq.into();
        let body = body.to_string();
        let mut delay = Duration::from_millis(cfg.retry_initial_ms);
        let mut ok = false;
        for attempt in 0..=cfg.retries {
            if attempt > 0 {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(60));
            }
            let sig = sign(&cfg.secret, body.as_bytes());
            let headers = [("Content-Type", "application/json"), ("X-Ferry-Signature", sig.as_str())];
            let timeout = Duration::from_millis(cfg.timeout_ms);
            match http.request("POST", &url, &headers, body.as_bytes(), timeout, 64 * 1024).await {
                Ok(r) if (200..300).contains(&r.status) => {
                    ok = true;
                    break;
                }
                Ok(r) => tracing::warn!(status = r.status, attempt, "webhook refused"),
                Err(e) => tracing::warn!(attempt, "webhook failed: {e}"),
            }
        }
        if !ok {
            metrics.webhook_failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}
