//! TLS: the listener (optional, `[tls] cert` and `key`) and the client side
//! of outgoing HTTPS calls (webhooks, JWKS).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::rustls;

/// A byte stream from the listener: plain TCP or TLS over it.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// Time a client gets to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// TLS handshakes in progress at once; beyond it new connections wait in
/// the kernel's accept queue (a handshake flood cannot eat memory).
const MAX_HANDSHAKES: usize = 1024;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Build the server side from PEM files: a certificate chain (leaf first)
/// and its private key (PKCS#8, PKCS#1 or SEC1).
pub fn server_config(cert: &Path, key: &Path) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| anyhow::anyhow!("tls.cert {}: {e}", cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow::anyhow!("tls.cert {}: {e}", cert.display()))?;
    anyhow::ensure!(!chain.is_empty(), "tls.cert {}: no certificate in the file", cert.display());
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| anyhow::anyhow!("tls.key {}: {e}", key.display()))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| anyhow::anyhow!("tls.cert/tls.key: {e}"))?;
    // WebSocket upgrades are HTTP/1.1 requests.
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// The client side for outgoing HTTPS: the public web roots, plus the
/// certificates in `extra_ca` (a PEM file) for a private CA.
pub fn client_config(extra_ca: Option<&Path>) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
    if let Some(path) = extra_ca {
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(|e| anyhow::anyhow!("tls.ca_file {}: {e}", path.display()))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| anyhow::anyhow!("tls.ca_file {}: {e}", path.display()))?;
        anyhow::ensure!(!certs.is_empty(), "tls.ca_file {}: no certificate in the file", path.display());
        for c in certs {
            roots.add(c).map_err(|e| anyhow::anyhow!("tls.ca_file {}: {e}", path.display()))?;
        }
    }
    let cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

/// Open a TLS connection to `host` (name or IP, checked against the
/// certificate) over an established TCP stream.
pub async fn connect(
    cfg: Arc<rustls::ClientConfig>,
    host: &str,
    tcp: TcpStream,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let name = ServerName::try_from(host.to_string())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{host}: {e}")))?;
    tokio_rustls::TlsConnector::from(cfg).connect(name, tcp).await
}

/// The listener behind `axum::serve`: plain TCP, or TLS with each
/// handshake in its own task so a slow client never holds up the others.
pub struct Listener {
    local: SocketAddr,
    inner: Inner,
}

enum Inner {
    Plain(TcpListener),
    Tls(mpsc::Receiver<(tokio_rustls::server::TlsStream<TcpStream>, SocketAddr)>),
}

impl Listener {
    /// Plain TCP (TCP_NODELAY set on every connection).
    pub fn plain(l: TcpListener) -> std::io::Result<Listener> {
        Ok(Listener { local: l.local_addr()?, inner: Inner::Plain(l) })
    }

    /// TLS with `cfg`. The accept loop ends when the listener is dropped.
    pub fn tls(l: TcpListener, cfg: Arc<rustls::ServerConfig>) -> std::io::Result<Listener> {
        let local = l.local_addr()?;
        let (tx, rx) = mpsc::channel(64);
        let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
        let permits = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
        tokio::spawn(async move {
            loop {
                let Ok(permit) = permits.clone().acquire_owned().await else { return };
                let (tcp, peer) = tokio::select! {
                    r = l.accept() => match r {
                        Ok(x) => x,
                        Err(e) => {
                            accept_error(e).await;
                            continue;
                        }
                    },
                    _ = tx.closed() => return,
                };
                let _ = tcp.set_nodelay(true);
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(s)) => {
                            let _ = tx.send((s, peer)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, "TLS handshake failed: {e}"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(Listener { local, inner: Inner::Tls(rx) })
    }
}

/// Out of file descriptors and the like: wait instead of spinning.
async fn accept_error(e: std::io::Error) {
    use std::io::ErrorKind::*;
    if !matches!(e.kind(), ConnectionRefused | ConnectionAborted | ConnectionReset) {
        tracing::warn!("accept: {e}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

impl axum::serve::Listener for Listener {
    type Io = Box<dyn Stream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match &mut self.inner {
                Inner::Plain(l) => match TcpListener::accept(l).await {
                    Ok((tcp, peer)) => {
                        // Small frames (acks, pings, replies) must not wait for Nagle.
                        let _ = tcp.set_nodelay(true);
                        return (Box::new(tcp), peer);
                    }
                    Err(e) => accept_error(e).await,
                },
                Inner::Tls(rx) => match rx.recv().await {
                    Some((s, peer)) => return (Box::new(s), peer),
                    // The accept task only ends with the receiver; never here.
                    None => std::future::pending::<()>().await,
                },
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.local)
    }
}
