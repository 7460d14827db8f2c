//! The task that drives one `ClientSession`: sockets, the timer, storage,
//! and routing events to the app. No protocol rule lives here.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use ferry_core::client::{
    CallError, ClientConfig, ClientSession, ConnId, ConnectionState, Event, Input, Output, Snapshot,
};
use ferry_core::frame::ReplyBody;
use ferry_core::Instant;
use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::{Cmd, Error, PublishAck, Storage, SubscriptionEvent, TokenProvider};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A write that takes longer than this means the link is gone.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Events held for a restored channel the app has not re-attached to yet.
const ORPHAN_CAP: usize = 100_000;
/// Messages read in one go before the session's outputs are drained.
const READ_BATCH: usize = 64;

type Subscribers = Vec<(u64, mpsc::UnboundedSender<SubscriptionEvent>)>;

pub(crate) struct Driver {
    /// Server URLs; the session names one by index in `Output::Open`.
    urls: Vec<String>,
    tls: Option<Arc<tokio_rustls::rustls::ClientConfig>>,
    enc: ferry_core::codec::Encoding,
    session: ClientSession,
    storage: Arc<dyn Storage>,
    snapshot: Snapshot,
    dirty: bool,
    token_provider: Option<TokenProvider>,
    cmd: mpsc::WeakUnboundedSender<Cmd>,
    state: watch::Sender<ConnectionState>,
    disconnects: watch::Sender<Option<crate::Disconnect>>,
    origin: tokio::time::Instant,
    ws: Option<(ConnId, Ws)>,
    opened: mpsc::UnboundedSender<(ConnId, Result<Ws, String>)>,
    opened_rx: mpsc::UnboundedReceiver<(ConnId, Result<Ws, String>)>,
    subs: HashMap<String, Subscribers>,
    orphans: HashMap<String, VecDeque<SubscriptionEvent>>,
    publishes: HashMap<String, oneshot::Sender<Result<PublishAck, Error>>>,
    calls: HashMap<u64, oneshot::Sender<Result<ReplyBody, Error>>>,
    deadline: Option<Instant>,
    closing: bool,
}

impl Driver {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        urls: Vec<String>,
        tls: Option<Arc<tokio_rustls::rustls::ClientConfig>>,
        cfg: ClientConfig,
        seed: u64,
        snapshot: Option<Snapshot>,
        storage: Arc<dyn Storage>,
        token_provider: Option<TokenProvider>,
        cmd: mpsc::WeakUnboundedSender<Cmd>,
        state: watch::Sender<ConnectionState>,
        disconnects: watch::Sender<Option<crate::Disconnect>>,
    ) -> Self {
        let origin = tokio::time::Instant::now();
        let enc = cfg.encoding;
        let now = Instant::from_millis(0);
        let (session, snapshot) = match snapshot {
            Some(s) => (ClientSession::restore(cfg, seed, &s, now), s),
            None => {
                let cap = cfg.dedup_window;
                (ClientSession::new(cfg, seed), Snapshot { seen_cap: cap, ..Snapshot::default() })
            }
        };
        let (opened, opened_rx) = mpsc::unbounded_channel();
        Driver {
            urls,
            tls,
            enc,
            session,
            storage,
            snapshot,
            dirty: false,
            token_provider,
            cmd,
            state,
            disconnects,
            origin,
            ws: None,
            opened,
            opened_rx,
            subs: HashMap::new(),
            orphans: HashMap::new(),
            publishes: HashMap::new(),
            calls: HashMap::new(),
            deadline: None,
            closing: false,
        }
    }

    fn now(&self) -> Instant {
        Instant::from_millis(self.origin.elapsed().as_millis() as u64)
    }

    pub(crate) async fn run(mut self, mut cmds: mpsc::UnboundedReceiver<Cmd>) {
        self.drain().await;
        while !self.closing {
            let sleep = {
                let wait = self.deadline.map(|t| t.as_millis().saturating_sub(self.now().as_millis()));
                async move {
                    match wait {
                        Some(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
                        None => std::future::pending().await,
                    }
                }
            };
            let read = async {
                match &mut self.ws {
                    Some((conn, ws)) => {
                        let first = ws.next().await;
                        let mut msgs = vec![first];
                        // Take what is already buffered too: one drain (and
                        // one storage write) for a burst.
                        while msgs.len() < READ_BATCH && msgs.last().is_some_and(|m| matches!(m, Some(Ok(_)))) {
                            match ws.next().now_or_never() {
                                Some(m) => msgs.push(m),
                                None => break,
                            }
                        }
                        (*conn, msgs)
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                c = cmds.recv() => match c {
                    Some(c) => self.on_cmd(c),
                    None => {
                        // Every handle is gone: stop cleanly, for good (a
                        // state watcher may outlive the handles).
                        let now = self.now();
                        self.session.close(now);
                        self.closing = true;
                    }
                },
                (conn, msgs) = read => {
                    for m in msgs {
                        self.on_ws(conn, m);
                    }
                }
                Some((conn, r)) = self.opened_rx.recv() => {
                    let now = self.now();
                    match r {
                        Ok(ws) => {
                            self.ws = Some((conn, ws));
                            self.session.handle_input(now, Input::TransportOpened { conn });
                        }
                        Err(reason) => self.session.handle_input(now, Input::TransportClosed { conn, code: None, reason }),
                    }
                }
                _ = sleep => {
                    let now = self.now();
                    self.session.handle_input(now, Input::Timeout);
                }
            }
            self.drain().await;
        }
        self.drain().await;
        self.save();
    }

    fn on_ws(&mut self, conn: ConnId, m: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>) {
        let now = self.now();
        let closed = |d: &mut Self, code, reason| {
            d.ws = None;
            d.session.handle_input(now, Input::TransportClosed { conn, code, reason });
        };
        match m {
            Some(Ok(Message::Binary(b))) => self.session.handle_input(now, Input::TransportMessage { conn, data: &b }),
            Some(Ok(Message::Text(t))) => {
                self.session.handle_input(now, Input::TransportMessage { conn, data: t.as_bytes() })
            }
            Some(Ok(Message::Close(f))) => {
                let (code, reason) =
                    f.map(|f| (Some(u16::from(f.code)), f.reason.to_string())).unwrap_or((None, String::new()));
                closed(self, code, reason)
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => closed(self, None, e.to_string()),
            None => closed(self, None, "connection closed".into()),
        }
    }

    fn on_cmd(&mut self, c: Cmd) {
        let now = self.now();
        match c {
            Cmd::Connect => self.session.connect(now),
            Cmd::Subscribe { channel, qos, token, id, events } => {
                if let Some(buffered) = self.orphans.remove(&channel) {
                    for e in buffered {
                        let _ = events.send(e);
                    }
                }
                self.subs.entry(channel.clone()).or_default().push((id, events));
                self.session.subscribe_with_token(now, &channel, qos, token);
            }
            Cmd::Unsubscribe { channel, id } => {
                if let Some(list) = self.subs.get_mut(&channel) {
                    list.retain(|(i, _)| *i != id);
                    if list.is_empty() {
                        self.subs.remove(&channel);
                        self.session.unsubscribe(now, &channel);
                    }
                }
            }
            Cmd::Publish { channel, data, qos, reply } => match self.session.publish(now, &channel, data, qos) {
                Ok(id) => {
                    self.publishes.insert(id, reply);
                }
                Err(e) => {
                    let _ = reply.send(Err(Error::Publish(e)));
                }
            },
            Cmd::Call { cmd, reply } => match self.session.call(now, cmd) {
                Ok(id) => {
                    self.calls.insert(id, reply);
                }
                Err(e) => {
                    let _ = reply.send(Err(call_error(e)));
                }
            },
            Cmd::NetworkChanged { online } => self.session.handle_input(now, Input::NetworkChanged { online }),
            Cmd::Token(Ok(t)) => self.session.set_token(now, t),
            Cmd::Token(Err(e)) => {
                tracing::warn!("token provider failed: {e}");
                self.session.token_failed(now, false);
            }
            Cmd::Outbox { reply } => {
                let _ = reply.send(self.session.snapshot().outbox.into_iter().map(|r| r.message_id).collect());
            }
            Cmd::Close { reply } => {
                // Terminal: the last state the app sees is Closed, not a
                // pausable Idle (this client cannot connect again).
                self.session.close(now);
                let unacked = self.session.snapshot().outbox.into_iter().map(|r| r.message_id).collect();
                let _ = reply.send(unacked);
                for (_, r) in self.publishes.drain() {
                    let _ = r.send(Err(Error::Closed));
                }
                self.closing = true;
            }
        }
    }

    /// Persist durable state if it changed: before anything goes out, so an
    /// ack or publish is never ahead of what a restart would know.
    fn save(&mut self) {
        if !self.dirty {
            return;
        }
        match self.storage.save(&self.snapshot) {
            Ok(()) => self.dirty = false,
            Err(e) => tracing::error!("saving client state failed: {e}"),
        }
    }

    async fn drain(&mut self) {
        // Frames wait here until the drain ends (or a close must follow
        // them): one storage write covers the whole burst.
        let mut pending: Vec<(ConnId, Vec<u8>)> = Vec::new();
        for _ in 0..1_000_000 {
            let now = self.now();
            match self.session.poll_output(now) {
                Output::Timeout(t) => {
                    self.deadline = t;
                    if pending.is_empty() {
                        self.save();
                        return;
                    }
                    self.flush(&mut pending).await;
                    // A failed write may have produced more work.
                }
                Output::Open { conn, endpoint } => {
                    // The core keeps `endpoint` below the URL count; modulo
                    // only guards against a mismatched core_config.
                    let url = self.urls[endpoint % self.urls.len()].clone();
                    tracing::debug!(conn, endpoint, %url, "opening");
                    let tls = self.tls.clone();
                    let proto = self.enc.subprotocol();
                    let tx = self.opened.clone();
                    tokio::spawn(async move {
                        let r = open(&url, tls, proto).await;
                        let _ = tx.send((conn, r));
                    });
                }
                Output::Transmit { conn, data } => pending.push((conn, data)),
                Output::Close { conn, code, reason } => {
                    self.flush(&mut pending).await;
                    if matches!(&self.ws, Some((c, _)) if *c == conn) {
                        if let Some((_, mut ws)) = self.ws.take() {
                            let frame = tokio_tungstenite::tungstenite::protocol::CloseFrame {
                                code: code.into(),
                                reason: reason.into(),
                            };
                            // Best effort, off the loop: the session has moved on.
                            tokio::spawn(async move {
                                let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(Some(frame))).await;
                            });
                        }
                    }
                }
                Output::Event(e) => self.on_event(e),
            }
        }
    }

    /// Save durable state, then write the pending frames in order: state
    /// first, so an ack or publish is never ahead of what a restart knows.
    async fn flush(&mut self, pending: &mut Vec<(ConnId, Vec<u8>)>) {
        if pending.is_empty() {
            return;
        }
        self.save();
        let text = self.enc.is_text();
        let mut failed = None;
        if let Some((c, ws)) = &mut self.ws {
            let write = async {
                for (conn, data) in pending.drain(..) {
                    if conn != *c {
                        continue;
                    }
                    let msg = if text {
                        Message::Text(String::from_utf8(data).unwrap_or_default().into())
                    } else {
                        Message::Binary(data.into())
                    };
                    ws.feed(msg).await?;
                }
                ws.flush().await
            };
            if !matches!(tokio::time::timeout(WRITE_TIMEOUT, write).await, Ok(Ok(()))) {
                failed = Some(*c);
            }
        }
        pending.clear();
        if let Some(conn) = failed {
            self.ws = None;
            let now = self.now();
            self.session.handle_input(now, Input::TransportClosed { conn, code: None, reason: "write failed".into() });
        }
    }

    fn route(&mut self, channel: &str, ev: SubscriptionEvent) {
        match self.subs.get_mut(channel) {
            Some(list) => {
                list.retain(|(_, tx)| tx.send(ev.clone()).is_ok());
            }
            None => {
                let q = self.orphans.entry(channel.to_string()).or_default();
                if q.len() < ORPHAN_CAP {
                    q.push_back(ev);
                } else {
                    tracing::warn!(channel, "no subscriber attached: event dropped");
                }
            }
        }
    }

    fn on_event(&mut self, e: Event) {
        match e {
            Event::State(s) => {
                let _ = self.state.send(s);
            }
            Event::Disconnected { code, reason, reconnect } => {
                tracing::debug!(code, %reason, reconnect, "disconnected");
                let _ = self.disconnects.send(Some(crate::Disconnect { code, reason, reconnect }));
            }
            Event::Subscribed { channel, position, recovered, .. } => {
                self.route(&channel, SubscriptionEvent::Subscribed { position, recovered })
            }
            Event::Gap { channel, from, to, reason } => {
                self.route(&channel, SubscriptionEvent::Gap { from, to, reason })
            }
            Event::SubscribeFailed { channel, error } => {
                self.route(&channel, SubscriptionEvent::Ended { code: error.code, reason: error.message });
                self.subs.remove(&channel);
            }
            Event::Unsubscribed { channel, code, reason } => {
                self.route(&channel, SubscriptionEvent::Ended { code, reason });
                self.subs.remove(&channel);
            }
            Event::Publication(p) => {
                let ch = p.channel.clone();
                self.route(&ch, SubscriptionEvent::Publication(p));
            }
            Event::Join { channel, info } => self.route(&channel, SubscriptionEvent::Join(info)),
            Event::Leave { channel, info } => self.route(&channel, SubscriptionEvent::Leave(info)),
            Event::PublishAcked { message_id, position, duplicate, .. } => {
                if let Some(r) = self.publishes.remove(&message_id) {
                    let _ = r.send(Ok(PublishAck {
                        message_id,
                        epoch: position.epoch,
                        offset: position.offset,
                        duplicate,
                    }));
                }
            }
            Event::PublishFailed { message_id, error, .. } => {
                if let Some(r) = self.publishes.remove(&message_id) {
                    let _ = r.send(Err(Error::Publish(error)));
                }
            }
            Event::CallResult { call, result } => {
                if let Some(r) = self.calls.remove(&call) {
                    let _ = r.send(result.map_err(call_error));
                }
            }
            Event::TokenRequested => match (&self.token_provider, self.cmd.upgrade()) {
                (Some(p), Some(cmd)) => {
                    let fut = p();
                    tokio::spawn(async move {
                        let _ = cmd.send(Cmd::Token(fut.await));
                    });
                }
                _ => {
                    let now = self.now();
                    self.session.token_failed(now, true);
                }
            },
            Event::Persist(c) => {
                self.snapshot.apply(&c);
                self.dirty = true;
            }
            Event::Error(e) => tracing::warn!("ferry: {e}"),
        }
    }
}

fn call_error(e: CallError) -> Error {
    match e {
        CallError::NotConnected => Error::NotConnected,
        CallError::ConnectionLost => Error::ConnectionLost,
        CallError::Server(r) => Error::Server { code: r.code, message: r.message, temporary: r.temporary },
        _ => Error::ConnectionLost,
    }
}

/// The TLS client for `wss://`: public web roots plus `extra_pem`.
pub(crate) fn tls_config(extra_pem: &[u8]) -> Result<Arc<tokio_rustls::rustls::ClientConfig>, String> {
    use rustls_pki_types::pem::PemObject;
    use tokio_rustls::rustls;
    let mut roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
    if !extra_pem.iter().all(u8::is_ascii_whitespace) {
        let certs = rustls_pki_types::CertificateDer::pem_slice_iter(extra_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("tls root certificates: {e}"))?;
        if certs.is_empty() {
            return Err("tls root certificates: no certificate in the PEM text".into());
        }
        for c in certs {
            roots.add(c).map_err(|e| format!("tls root certificates: {e}"))?;
        }
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

async fn open(url: &str, tls: Option<Arc<tokio_rustls::rustls::ClientConfig>>, proto: &str) -> Result<Ws, String> {
    let mut req = url.into_client_request().map_err(|e| e.to_string())?;
    req.headers_mut().insert("Sec-WebSocket-Protocol", proto.parse().map_err(|_| "bad subprotocol".to_string())?);
    let connector = tls.map(tokio_tungstenite::Connector::Rustls);
    let connect = tokio_tungstenite::connect_async_tls_with_config(req, None, true, connector);
    match tokio::time::timeout(Duration::from_secs(10), connect).await {
        Ok(Ok((ws, resp))) => {
            let agreed = resp.headers().get("sec-websocket-protocol").and_then(|v| v.to_str().ok());
            if agreed != Some(proto) {
                return Err(format!("server did not agree to subprotocol {proto}"));
            }
            Ok(ws)
        }
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("connect timed out".into()),
    }
}
