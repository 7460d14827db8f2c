//! One pub/sub connection to one Redis node, for fan-out: `SUBSCRIBE`
//! (standalone, Sentinel) or `SSUBSCRIBE` (Cluster, on the shard that owns
//! the channel's slot), each confirmed before it counts.
//!
//! Design: a small RESP2 client of its own instead of `redis::aio::PubSub`,
//! which has no sharded subscriptions, and instead of the Cluster
//! connection's RESP3 pushes, which resubscribe behind our back: fan-out
//! must know exactly when a shard's subscriptions are live again, because
//! that is when the node catches up on what pub/sub dropped meanwhile. The
//! link reports its own end and a shard channel the server took away (a
//! slot that moved), and the caller rebuilds. With `rediss://` URLs the
//! link speaks TLS (see [`super::tls`]).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_rustls::rustls;

/// The read side of a link: plain TCP or TLS.
type Reader = BufReader<Box<dyn AsyncRead + Send + Unpin>>;
/// The write side of a link: plain TCP or TLS.
type Writer = Box<dyn AsyncWrite + Send + Unpin>;

/// A node to connect to, with the credentials of the configured URL.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeAddr {
    /// Host name or IP.
    pub host: String,
    /// TCP port.
    pub port: u16,
}

impl std::fmt::Display for NodeAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

/// Credentials for `AUTH`, from the configured URL.
#[derive(Clone, Debug, Default)]
pub struct Credentials {
    /// ACL user (Redis 6+), if any.
    pub username: Option<String>,
    /// Password, if any.
    pub password: Option<String>,
}

/// What a link reports besides confirmations.
#[derive(Debug)]
pub enum LinkEvent {
    /// A message on a subscribed channel.
    Message {
        /// The pub/sub channel.
        channel: Vec<u8>,
        /// Its payload.
        payload: Vec<u8>,
    },
    /// The server ended a subscription by itself (Cluster: the channel's
    /// slot moved to another shard).
    Dropped(Vec<u8>),
    /// The connection is gone; nothing more comes from this link.
    Closed(String),
}

/// Why a subscription was not confirmed.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The server answered with an error (`MOVED ...` for a shard channel
    /// asked of the wrong node).
    #[error("redis: {0}")]
    Refused(String),
    /// The link is gone or did not answer in time.
    #[error("pub/sub link: {0}")]
    Broken(String),
}

#[derive(Debug, PartialEq, Eq)]
enum Kind {
    Subscribe,
    Unsubscribe,
    Ping,
}

struct Pending {
    kind: Kind,
    /// The channel, for an unsubscribe (told apart from the server's own).
    channel: Vec<u8>,
    done: Option<oneshot::Sender<Result<(), LinkError>>>,
}

/// One pub/sub connection. Dropping it closes the connection.
pub struct Link {
    addr: NodeAddr,
    writer: tokio::sync::Mutex<Writer>,
    pending: Arc<Mutex<VecDeque<Pending>>>,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Link {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// How long a confirmation may take before the link counts as broken.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(3);

/// Write and flush: TLS may hold a record back until flushed.
async fn write(w: &mut Writer, bytes: &[u8]) -> std::io::Result<()> {
    w.write_all(bytes).await?;
    w.flush().await
}

fn command(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

impl Link {
    /// Connect (over TLS with `tls`, checking the certificate names
    /// `addr.host`) and `AUTH`, within `timeout`. Events go to `events`.
    pub async fn connect(
        addr: &NodeAddr,
        creds: &Credentials,
        tls: Option<Arc<rustls::ClientConfig>>,
        timeout: Duration,
        events: mpsc::UnboundedSender<LinkEvent>,
    ) -> Result<Link, LinkError> {
        let broken = |e: String| LinkError::Broken(format!("{addr}: {e}"));
        let setup = async {
            let stream =
                TcpStream::connect((addr.host.as_str(), addr.port)).await.map_err(|e| broken(e.to_string()))?;
            let _ = stream.set_nodelay(true);
            let (r, mut w): (Box<dyn AsyncRead + Send + Unpin>, Writer) = match tls {
                // Plain TCP splits without a lock.
                None => {
                    let (r, w) = stream.into_split();
                    (Box::new(r), Box::new(w))
                }
                Some(cfg) => {
                    let s = crate::tls::connect(cfg, &addr.host, stream)
                        .await
                        .map_err(|e| broken(super::tls::explain(&format!("TLS: {e}"))))?;
                    let (r, w) = tokio::io::split(s);
                    (Box::new(r), Box::new(w))
                }
            };
            let mut r = BufReader::new(r);
            if let Some(pass) = &creds.password {
                let mut args: Vec<&[u8]> = vec![b"AUTH"];
                if let Some(user) = &creds.username {
                    args.push(user.as_bytes());
                }
                args.push(pass.as_bytes());
                write(&mut w, &command(&args)).await.map_err(|e| broken(e.to_string()))?;
                match read_value(&mut r).await.map_err(broken)? {
                    Resp::Simple => {}
                    Resp::Error(e) => return Err(LinkError::Refused(e)),
                    other => return Err(broken(format!("unexpected AUTH reply {other:?}"))),
                }
            }
            Ok::<_, LinkError>((r, w))
        };
        let (r, w) = tokio::time::timeout(timeout, setup).await.map_err(|_| broken("connect timed out".into()))??;
        let pending: Arc<Mutex<VecDeque<Pending>>> = Arc::default();
        let reader = tokio::spawn(read_loop(r, pending.clone(), events));
        Ok(Link { addr: addr.clone(), writer: tokio::sync::Mutex::new(w), pending, reader })
    }

    /// The node this link is connected to.
    pub fn addr(&self) -> &NodeAddr {
        &self.addr
    }

    /// Send a command whose reply is one confirmation; the receiver gets it.
    async fn send(
        &self,
        kind: Kind,
        args: &[&[u8]],
        wait: bool,
    ) -> Result<oneshot::Receiver<Result<(), LinkError>>, LinkError> {
        let (tx, rx) = oneshot::channel();
        let channel = args.get(1).map(|c| c.to_vec()).unwrap_or_default();
        let mut w = self.writer.lock().await;
        // Queued before writing, under the writer lock: confirmations come
        // back in the order the commands were written.
        self.pending.lock().unwrap_or_else(|p| p.into_inner()).push_back(Pending {
            kind,
            channel,
            done: wait.then_some(tx),
        });
        write(&mut w, &command(args)).await.map_err(|e| LinkError::Broken(format!("{}: {e}", self.addr)))?;
        Ok(rx)
    }

    async fn confirmed(rx: oneshot::Receiver<Result<(), LinkError>>) -> Result<(), LinkError> {
        match tokio::time::timeout(CONFIRM_TIMEOUT, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(LinkError::Broken("link closed".into())),
            Err(_) => Err(LinkError::Broken("no confirmation in time".into())),
        }
    }

    /// Subscribe to each of `channels` with `cmd` (`SUBSCRIBE` or
    /// `SSUBSCRIBE`), all in flight together; returns once every one is
    /// confirmed (or the first failure).
    pub async fn subscribe(&self, cmd: &str, channels: &[Vec<u8>]) -> Result<(), LinkError> {
        let mut waits = Vec::with_capacity(channels.len());
        for ch in channels {
            // One channel per command: one confirmation or one error each,
            // so a refusal is matched to its channel.
            waits.push(self.send(Kind::Subscribe, &[cmd.as_bytes(), ch], true).await?);
        }
        for w in waits {
            Self::confirmed(w).await?;
        }
        Ok(())
    }

    /// Unsubscribe (`UNSUBSCRIBE` or `SUNSUBSCRIBE`) without waiting for
    /// the confirmation (it is still matched, to keep the order).
    pub async fn unsubscribe(&self, cmd: &str, channel: &[u8]) {
        let _ = self.send(Kind::Unsubscribe, &[cmd.as_bytes(), channel], false).await;
    }

    /// A round trip: whether the node still answers on this link.
    pub async fn ping(&self) -> Result<(), LinkError> {
        let rx = self.send(Kind::Ping, &[b"PING"], true).await?;
        Self::confirmed(rx).await
    }
}

async fn read_loop(mut r: Reader, pending: Arc<Mutex<VecDeque<Pending>>>, events: mpsc::UnboundedSender<LinkEvent>) {
    // The oldest command waiting for its confirmation, if it is of `kind`
    // (and, for an unsubscribe, of that channel); any kind for an error.
    let pop = |kind: Option<&Kind>, channel: &[u8]| {
        let mut p = pending.lock().unwrap_or_else(|p| p.into_inner());
        match (p.front(), kind) {
            (Some(f), Some(k)) if f.kind != *k => None,
            (Some(f), Some(Kind::Unsubscribe)) if f.channel != channel => None,
            (Some(_), _) => p.pop_front(),
            (None, _) => None,
        }
    };
    let why = loop {
        let v = match read_value(&mut r).await {
            Ok(v) => v,
            Err(e) => break e,
        };
        match v {
            Resp::Array(Some(items)) => {
                let kind = match items.first() {
                    Some(Resp::Bulk(Some(k))) => k.to_ascii_lowercase(),
                    _ => continue,
                };
                let bulk = |i: usize| match items.get(i) {
                    Some(Resp::Bulk(Some(b))) => b.clone(),
                    _ => Vec::new(),
                };
                match kind.as_slice() {
                    b"message" | b"smessage" => {
                        let _ = events.send(LinkEvent::Message { channel: bulk(1), payload: bulk(2) });
                    }
                    b"subscribe" | b"ssubscribe" => {
                        if let Some(Pending { done: Some(tx), .. }) = pop(Some(&Kind::Subscribe), &[]) {
                            let _ = tx.send(Ok(()));
                        }
                    }
                    // Asked for, or the server's own (a moved slot).
                    b"unsubscribe" | b"sunsubscribe" if pop(Some(&Kind::Unsubscribe), &bulk(1)).is_none() => {
                        let _ = events.send(LinkEvent::Dropped(bulk(1)));
                    }
                    b"pong" => {
                        if let Some(Pending { done: Some(tx), .. }) = pop(Some(&Kind::Ping), &[]) {
                            let _ = tx.send(Ok(()));
                        }
                    }
                    _ => {}
                }
            }
            Resp::Error(e) => {
                if let Some(Pending { done: Some(tx), .. }) = pop(None, &[]) {
                    let _ = tx.send(Err(LinkError::Refused(e)));
                }
            }
            // `PING` on a link with no subscription yet answers `+PONG`.
            Resp::Simple => {
                if let Some(Pending { done: Some(tx), .. }) = pop(Some(&Kind::Ping), &[]) {
                    let _ = tx.send(Ok(()));
                }
            }
            _ => {}
        }
    };
    // Waiters learn the link is gone by their senders being dropped.
    pending.lock().unwrap_or_else(|p| p.into_inner()).clear();
    let _ = events.send(LinkEvent::Closed(why));
}

/// A RESP2 value, as far as pub/sub needs.
#[derive(Debug)]
enum Resp {
    Simple,
    Error(String),
    Int,
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Resp>>),
}

/// Largest bulk string accepted (Redis's own default `proto-max-bulk-len`).
const MAX_BULK: i64 = 512 << 20;

fn read_value<'a>(
    r: &'a mut Reader,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Resp, String>> + Send + 'a>> {
    Box::pin(async move {
        let mut line = Vec::new();
        let n = r.read_until(b'\n', &mut line).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("connection closed by the server".into());
        }
        if line.len() < 3 || !line.ends_with(b"\r\n") {
            return Err("malformed reply".into());
        }
        let body = String::from_utf8_lossy(&line[1..line.len() - 2]).to_string();
        let num = || body.parse::<i64>().map_err(|_| format!("malformed length {body:?}"));
        Ok(match line[0] {
            b'+' => Resp::Simple,
            b'-' => Resp::Error(body),
            b':' => {
                num()?;
                Resp::Int
            }
            b'$' => {
                let len = num()?;
                if len < 0 {
                    return Ok(Resp::Bulk(None));
                }
                if len > MAX_BULK {
                    return Err(format!("bulk string of {len} bytes"));
                }
                let mut buf = vec![0; len as usize + 2];
                r.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
                buf.truncate(len as usize);
                Resp::Bulk(Some(buf))
            }
            b'*' => {
                let len = num()?;
                if len < 0 {
                    return Ok(Resp::Array(None));
                }
                let mut items = Vec::with_capacity(len.min(64) as usize);
                for _ in 0..len {
                    items.push(read_value(r).await?);
                }
                Resp::Array(Some(items))
            }
            other => return Err(format!("unknown reply type {:?}", other as char)),
        })
    })
}
