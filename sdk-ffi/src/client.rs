//! `FerryClient`, its listeners (foreign traits) and subscription handles.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::Duration;

use ferry_client as fc;
use futures_util::{FutureExt, StreamExt};

use crate::error::FerryError;
use crate::runtime;
use crate::types::*;

/// How long `connect` waits when the config does not say.
const DEFAULT_CONNECT_WAIT: Duration = Duration::from_secs(15);
/// Largest inflated payload accepted from a history page: a bound on what
/// a corrupt or hostile compressed payload can make us allocate.
const HISTORY_INFLATE_LIMIT: usize = 16 << 20;

/// Supplies connection tokens: asked before the current one expires and
/// after the server closed for an expired token. Called on a background
/// thread, so it may block (e.g. on an HTTP call to your backend); throw
/// `FerryError.TokenProvider` when no token can be had now (the client
/// asks again later).
#[uniffi::export(with_foreign)]
pub trait TokenProvider: Send + Sync {
    /// A fresh token.
    fn fetch_token(&self) -> Result<String, FerryError>;
}

/// Receives one subscription's events. The first call is always
/// `on_state` with the connection state at the time of subscribing; after
/// that, connection state changes and channel events arrive in order.
/// Calls come on the client's callback thread, one at a time: do not block
/// it for long (hand heavy work to your own executor).
#[uniffi::export(with_foreign)]
pub trait SubscriptionListener: Send + Sync {
    /// The connection state (the current one first, then every change).
    fn on_state(&self, state: FfiConnectionState);
    /// The subscription is live; `recovered` is false when a gap was reported.
    fn on_subscribed(&self, position: FfiStreamPosition, recovered: bool);
    /// A publication, in offset order.
    fn on_publication(&self, publication: FfiPublication);
    /// Someone subscribed to the channel (namespaces with join/leave on).
    fn on_join(&self, info: FfiClientInfo);
    /// Someone left the channel.
    fn on_leave(&self, info: FfiClientInfo);
    /// Publications were missed and cannot be recovered: reload from your
    /// backend or from `history`.
    fn on_gap(&self, gap: FfiGap);
    /// The subscription ended (refused, or ended by the server); no more
    /// calls follow.
    fn on_ended(&self, code: u16, reason: String);
}

/// Receives connection state changes (the current state first).
#[uniffi::export(with_foreign)]
pub trait StateListener: Send + Sync {
    /// The connection state.
    fn on_state(&self, state: FfiConnectionState);
}

type Job = Box<dyn FnOnce() + Send>;

/// How long `cancel` waits for a listener call in progress.
const CANCEL_WAIT: Duration = Duration::from_secs(2);

std::thread_local! {
    /// Set on the callback thread: `cancel` from inside a listener must not
    /// wait for itself.
    static ON_CALLBACK_THREAD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// What of one handle may still call foreign code: its task and its queued
/// listener calls, each holding a reference to the listener (dropping that
/// reference calls into the foreign runtime too).
#[derive(Default)]
struct Inflight {
    n: Mutex<usize>,
    idle: Condvar,
}

impl Inflight {
    fn enter(self: &Arc<Self>) -> InflightGuard {
        *self.n.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        InflightGuard(self.clone())
    }

    /// Wait (bounded) until none is left.
    fn wait_idle(&self, max: Duration) {
        let n = self.n.lock().unwrap_or_else(|e| e.into_inner());
        let _ = self.idle.wait_timeout_while(n, max, |n| *n > 0);
    }
}

struct InflightGuard(Arc<Inflight>);

impl Drop for InflightGuard {
    fn drop(&mut self) {
        let mut n = self.0.n.lock().unwrap_or_else(|e| e.into_inner());
        *n -= 1;
        if *n == 0 {
            self.0.idle.notify_all();
        }
    }
}

/// A handle's task, with its guard dropped after the task's future (and
/// the listener it holds): struct fields drop in declaration order.
struct Guarded {
    fut: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
    _guard: InflightGuard,
}

impl std::future::Future for Guarded {
    type Output = ();
    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        self.fut.as_mut().poll(cx)
    }
}

/// The client's callback thread: runs listener calls in order, off the
/// runtime, so foreign code never blocks the connection.
fn spawn_callback_thread() -> Result<mpsc::Sender<Job>, FerryError> {
    let (tx, rx) = mpsc::channel::<Job>();
    std::thread::Builder::new()
        .name("ferry-callbacks".into())
        .spawn(move || {
            ON_CALLBACK_THREAD.with(|c| c.set(true));
            // Ends when the client and every handle are gone.
            for job in rx {
                // A listener that throws must not end delivery for the rest.
                if catch_unwind(AssertUnwindSafe(job)).is_err() {
                    tracing::error!("a ferry listener callback failed");
                }
            }
        })
        .map_err(|e| FerryError::Internal { reason: format!("callback thread: {e}") })?;
    Ok(tx)
}

/// A running subscription or observer. Cancels when `cancel` is called or
/// when it is dropped (Kotlin `close()`/`use {}`, Swift deinit, Python
/// garbage collection): keep a reference as long as you want events.
#[derive(uniffi::Object)]
pub struct TaskHandle {
    cancelled: Arc<AtomicBool>,
    finished: Arc<AtomicBool>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    inflight: Arc<Inflight>,
}

#[uniffi::export]
impl TaskHandle {
    /// Stop: a subscription is unsubscribed, and once this returns no
    /// listener call runs and the listener is released: a call already in
    /// progress is waited for (up to 2 s; not when `cancel` is called from
    /// a listener). A process may exit right after it (Python: a callback
    /// entering the interpreter while it shuts down aborts the process).
    /// Idempotent.
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::SeqCst);
        let task = self.task.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = task {
            // Dropping the task drops its ferry-client Subscription, which
            // unsubscribes.
            t.abort();
        }
        // Not on the callback thread (it would wait for itself) nor on a
        // runtime thread (the aborted task is dropped there).
        if !ON_CALLBACK_THREAD.with(|c| c.get()) && tokio::runtime::Handle::try_current().is_err() {
            self.inflight.wait_idle(CANCEL_WAIT);
        }
    }

    /// Whether events may still come (not cancelled, not ended).
    pub fn is_active(&self) -> bool {
        !self.cancelled.load(Ordering::SeqCst) && !self.finished.load(Ordering::SeqCst)
    }
}

impl Drop for TaskHandle {
    fn drop(&mut self) {
        self.cancel();
    }
}

/// Queues listener calls for one handle, skipping them once it is cancelled.
#[derive(Clone)]
struct Deliver {
    jobs: mpsc::Sender<Job>,
    cancelled: Arc<AtomicBool>,
    inflight: Arc<Inflight>,
}

impl Deliver {
    fn new(jobs: &mpsc::Sender<Job>, handle: &TaskHandle) -> Self {
        Deliver { jobs: jobs.clone(), cancelled: handle.cancelled.clone(), inflight: handle.inflight.clone() }
    }

    fn call(&self, f: impl FnOnce() + Send + 'static) -> bool {
        let cancelled = self.cancelled.clone();
        let guard = self.inflight.enter();
        self.jobs
            .send(Box::new(move || {
                if !cancelled.load(Ordering::SeqCst) {
                    f()
                } else {
                    drop(f)
                }
                // After the listener reference in `f` is gone.
                drop(guard);
            }))
            .is_ok()
    }
}

/// A Ferry client: one connection, reconnecting by itself, with durable
/// outbox and stream positions.
///
/// The graceful stop is [`FerryClient::close`]. Kotlin sees it as
/// `shutdown` (renamed in `uniffi.toml`): UniFFI's Kotlin objects already
/// have `AutoCloseable.close()`, which frees the native object.
#[derive(uniffi::Object)]
pub struct FerryClient {
    client: fc::Client,
    jobs: mpsc::Sender<Job>,
    connect_wait: Duration,
}

fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

#[uniffi::export(async_runtime = "tokio")]
impl FerryClient {
    /// Create a client for `url` (`ws://host:port/ws` or `wss://...`). It
    /// restores durable state from `config.storage_dir` but does not
    /// connect until [`FerryClient::connect`]: subscribe first, so that
    /// nothing that arrived while the app was away is missed.
    ///
    /// With a `token_provider` and no `config.token`, the provider is asked
    /// for the first token here, on the calling thread (so create the
    /// client off the UI thread if the provider does network I/O); its
    /// error is thrown from the constructor.
    #[uniffi::constructor]
    pub fn new(
        url: String,
        config: FfiClientConfig,
        token_provider: Option<Arc<dyn TokenProvider>>,
    ) -> Result<Arc<Self>, FerryError> {
        Self::with_urls(vec![url], config, token_provider)
    }

    /// Create a client for several server URLs, the nodes of one cluster;
    /// otherwise as the main constructor. The client starts on one picked
    /// from its seed (so many clients spread over the nodes), stays there
    /// while it works, and after a failed attempt or a lost connection
    /// tries the next URL in the list after the usual backoff,
    /// recovering subscriptions by offsets as after any reconnect
    /// (PROTOCOL.md 9.2). Every URL is checked here: a bad one, or an
    /// empty list, throws `FerryError.Config`.
    #[uniffi::constructor]
    pub fn with_urls(
        urls: Vec<String>,
        config: FfiClientConfig,
        token_provider: Option<Arc<dyn TokenProvider>>,
    ) -> Result<Arc<Self>, FerryError> {
        let mut b = fc::Client::builder_urls(urls).device_id(config.device_id.clone());
        if let Some(seed) = config.seed {
            b = b.seed(seed);
        }
        let token = match (&config.token, &token_provider) {
            (Some(t), _) => Some(t.clone()),
            // Design: ferry-client connects with the configured token and
            // asks the provider only to refresh it; without one it would
            // connect anonymously, so the provider supplies the first.
            (None, Some(p)) => Some(p.fetch_token()?),
            (None, None) => None,
        };
        if let Some(t) = token {
            b = b.token(t);
        }
        if let Some(p) = token_provider {
            b = b.token_provider(move || {
                let p = p.clone();
                async move {
                    // Foreign code may block (HTTP): keep it off the workers.
                    match tokio::task::spawn_blocking(move || p.fetch_token()).await {
                        Ok(r) => r.map_err(|e| e.to_string()),
                        Err(e) => Err(format!("token provider failed: {e}")),
                    }
                }
            });
        }
        if let Some(pem) = &config.tls_root_certificates_pem {
            b = b.tls_root_certificates_pem(pem);
        }
        b = match &config.storage_dir {
            Some(dir) => b.storage_dir(dir),
            None => b.memory_storage(),
        };
        b = b.core_config(|c| {
            c.client.name = "ferry-ffi".into();
            c.client.version = env!("CARGO_PKG_VERSION").into();
            if let Some(v) = config.backoff_min_ms {
                c.backoff_min = ms(v);
            }
            if let Some(v) = config.backoff_max_ms {
                c.backoff_max = ms(v);
            }
            if let Some(v) = config.outbox_max_messages {
                c.outbox_max_messages = v as usize;
            }
            if let Some(v) = config.outbox_max_bytes {
                c.outbox_max_bytes = usize::try_from(v).unwrap_or(usize::MAX);
            }
            if let Some(v) = config.message_ttl_ms {
                c.message_ttl = ms(v);
            }
            if let Some(v) = config.request_timeout_ms {
                c.request_timeout = ms(v);
            }
        });
        // build() spawns the driver task on the current runtime.
        let client = {
            let _enter = runtime().enter();
            b.build()?
        };
        Ok(Arc::new(FerryClient {
            client,
            jobs: spawn_callback_thread()?,
            connect_wait: config.connect_timeout_ms.map(ms).unwrap_or(DEFAULT_CONNECT_WAIT),
        }))
    }

    /// Start connecting and wait until connected. On `Timeout` the client
    /// keeps trying in the background (publishes wait in the outbox);
    /// `Refused` means the server closed for good (e.g. a bad token).
    pub async fn connect(&self) -> Result<(), FerryError> {
        self.client.connect();
        let mut rx = self.client.state();
        let wait = rx.wait_for(|s| matches!(s, fc::ConnectionState::Connected | fc::ConnectionState::Closed { .. }));
        let reached = match tokio::time::timeout(self.connect_wait, wait).await {
            Ok(Ok(state)) => state.clone(),
            Ok(Err(_)) => return Err(FerryError::Closed),
            Err(_) => return Err(FerryError::Timeout { timeout_ms: self.connect_wait.as_millis() as u64 }),
        };
        match reached {
            fc::ConnectionState::Closed { code, reason } => Err(FerryError::Refused { code, reason }),
            _ => Ok(()),
        }
    }

    /// Publish; returns when the server acknowledged it (QoS 1: stored;
    /// QoS 2: the exactly-once handshake is complete; QoS 0: on the reply).
    /// QoS 1/2 publishes wait in the durable outbox while disconnected.
    pub async fn publish(&self, channel: String, data: Vec<u8>, qos: FfiQos) -> Result<FfiPublishAck, FerryError> {
        Ok(self.client.publish(&channel, data, qos.into()).await?.into())
    }

    /// A page of a channel's stored publications (needs a live connection).
    pub async fn history(&self, request: FfiHistoryRequest) -> Result<FfiHistoryPage, FerryError> {
        let (pubs, top) = self.client.history(request.into()).await?;
        let publications = pubs
            .into_iter()
            .map(|mut p| {
                // History comes as stored, possibly compressed; live
                // publications are inflated by the client already.
                let data = ferry_core::compress::unpack(&p.payload, HISTORY_INFLATE_LIMIT)
                    .map_err(|e| FerryError::Internal { reason: format!("history payload: {e}") })?;
                p.payload = ferry_core::frame::Payload { z: false, data: data.into() };
                Ok(FfiPublication::inflated(p))
            })
            .collect::<Result<Vec<_>, FerryError>>()?;
        Ok(FfiHistoryPage { publications, top: top.into() })
    }

    /// Connections subscribed to a channel.
    pub async fn presence(&self, channel: String) -> Result<Vec<FfiClientInfo>, FerryError> {
        Ok(self.client.presence(&channel).await?.into_iter().map(Into::into).collect())
    }

    /// Counts of connections and users subscribed to a channel.
    pub async fn presence_stats(&self, channel: String) -> Result<FfiPresenceStats, FerryError> {
        let (clients, users) = self.client.presence_stats(&channel).await?;
        Ok(FfiPresenceStats { clients, users })
    }

    /// Subscribe; `listener` gets the current connection state first, then
    /// the subscription's events. Subscribing to a channel restored from
    /// durable storage re-attaches to it and delivers what arrived meanwhile.
    /// The handle unsubscribes when cancelled or dropped.
    pub fn subscribe(
        &self,
        channel: String,
        options: FfiSubscribeOptions,
        listener: Arc<dyn SubscriptionListener>,
    ) -> Result<Arc<TaskHandle>, FerryError> {
        let token = options.token.unwrap_or_default();
        // Design: ferry-client's subscribe only queues a command, so its
        // future is ready at once; polling it here keeps `subscribe`
        // synchronous (callable from any thread, even inside a callback).
        let mut sub = self
            .client
            .subscribe_with_token(&channel, options.qos.into(), token)
            .now_or_never()
            .ok_or_else(|| FerryError::Internal { reason: "subscribe did not complete at once".into() })??;
        let mut state = self.client.state();
        let handle = self.handle();
        let out = Deliver::new(&self.jobs, &handle);
        let finished = handle.finished.clone();
        let guard = handle.inflight.enter();
        let task = runtime().spawn(Guarded {
            _guard: guard,
            fut: Box::pin(async move {
                let l = listener;
                let current: FfiConnectionState = state.borrow_and_update().clone().into();
                let mut alive = {
                    let l = l.clone();
                    out.call(move || l.on_state(current))
                };
                let mut watching_state = true;
                // Bounded by the subscription: it ends with the client or the
                // channel, or when the handle aborts this task.
                while alive {
                    tokio::select! {
                        ev = sub.next() => {
                            let Some(ev) = ev else { break };
                            let l = l.clone();
                            alive = out.call(move || dispatch(&*l, ev));
                        }
                        changed = state.changed(), if watching_state => {
                            if changed.is_err() {
                                watching_state = false;
                                continue;
                            }
                            let s: FfiConnectionState = state.borrow_and_update().clone().into();
                            let l = l.clone();
                            alive = out.call(move || l.on_state(s));
                        }
                    }
                }
                finished.store(true, Ordering::SeqCst);
            }),
        });
        *handle.task.lock().unwrap_or_else(|e| e.into_inner()) = Some(task);
        Ok(handle)
    }

    /// Watch the connection state: `listener` gets the current state first,
    /// then every change, until the handle is cancelled or dropped.
    pub fn observe_state(&self, listener: Arc<dyn StateListener>) -> Arc<TaskHandle> {
        let mut state = self.client.state();
        let handle = self.handle();
        let out = Deliver::new(&self.jobs, &handle);
        let finished = handle.finished.clone();
        let guard = handle.inflight.enter();
        let task = runtime().spawn(Guarded {
            _guard: guard,
            fut: Box::pin(async move {
                let mut first = true;
                // Bounded: ends when the client's driver stops or on cancel.
                loop {
                    if !first && state.changed().await.is_err() {
                        break;
                    }
                    first = false;
                    let s: FfiConnectionState = state.borrow_and_update().clone().into();
                    let l = listener.clone();
                    if !out.call(move || l.on_state(s)) {
                        break;
                    }
                }
                finished.store(true, Ordering::SeqCst);
            }),
        });
        *handle.task.lock().unwrap_or_else(|e| e.into_inner()) = Some(task);
        handle
    }

    /// The connection state now.
    pub fn state(&self) -> FfiConnectionState {
        self.client.state().borrow().clone().into()
    }

    /// Why the last connection ended (none until one has).
    pub fn last_disconnect(&self) -> Option<FfiDisconnect> {
        self.client.disconnects().borrow().clone().map(Into::into)
    }

    /// The device's network changed (Android `ConnectivityManager`
    /// callback, iOS `NWPathMonitor`): reconnect now instead of after a
    /// backoff, since the old route is usually gone.
    pub fn network_changed(&self) {
        self.client.network_changed();
    }

    /// The device has no network: stop trying until `network_changed`.
    pub fn network_lost(&self) {
        self.client.network_lost();
    }

    /// The app went to the background (Android `onStop`, iOS
    /// `didEnterBackground`): close the socket now rather than let the OS
    /// kill it silently. State stays durable; publishes wait in the outbox.
    pub fn app_background(&self) {
        self.client.network_lost();
    }

    /// The app came to the foreground: reconnect at once if not connected
    /// (recovery then delivers what arrived meanwhile). A live connection
    /// is left alone.
    pub fn app_foreground(&self) {
        let idle_or_waiting =
            matches!(*self.client.state().borrow(), fc::ConnectionState::Offline | fc::ConnectionState::Backoff { .. });
        if idle_or_waiting {
            self.client.network_changed();
        }
    }

    /// Message ids published but not yet acknowledged.
    pub async fn unacked(&self) -> Vec<String> {
        self.client.unacked().await
    }

    /// Stop for good: wait up to `flush_ms` (default 1000) for the outbox to
    /// drain, then close the connection. The state ends in `Closed` (code
    /// 1000, reason "client closed"), the last state listeners get; later
    /// calls fail with `Closed`. Returns the message ids still
    /// unacknowledged; they stay in durable storage and the next client with
    /// the same storage sends them. Named `shutdown` in Kotlin (see the
    /// type's documentation).
    #[uniffi::method(default(flush_ms = 1000))]
    pub async fn close(&self, flush_ms: u64) -> Vec<String> {
        self.client.close(ms(flush_ms)).await.unacked
    }
}

impl FerryClient {
    fn handle(&self) -> Arc<TaskHandle> {
        Arc::new(TaskHandle {
            cancelled: Arc::new(AtomicBool::new(false)),
            finished: Arc::new(AtomicBool::new(false)),
            task: Mutex::new(None),
            inflight: Default::default(),
        })
    }
}

fn dispatch(l: &dyn SubscriptionListener, ev: fc::SubscriptionEvent) {
    match ev {
        fc::SubscriptionEvent::Publication(p) => l.on_publication(FfiPublication::inflated(p)),
        fc::SubscriptionEvent::Subscribed { position, recovered } => l.on_subscribed(position.into(), recovered),
        fc::SubscriptionEvent::Gap { from, to, reason } => {
            l.on_gap(FfiGap { from: from.map(Into::into), to: to.into(), reason: reason.into() })
        }
        fc::SubscriptionEvent::Join(info) => l.on_join(info.into()),
        fc::SubscriptionEvent::Leave(info) => l.on_leave(info.into()),
        fc::SubscriptionEvent::Ended { code, reason } => l.on_ended(code, reason),
    }
}
