//! `rediss://`: TLS on every connection the node opens to Redis — the
//! `redis` crate's clients (commands, Cluster, Sentinel, the control link)
//! and Ferry's own fan-out links ([`super::pubsub::Link`]).
//!
//! Design: TLS is a property of the configured URLs (all `rediss://` or
//! none), and the nodes found later (Cluster primaries, the Sentinels'
//! primary) are reached the same way as the URLs: a Cluster with
//! `tls-cluster yes` announces its TLS ports, a Sentinel set with
//! `tls-replication yes` its primary's TLS port. The trust is the webpki
//! roots, or with `[redis] tls_ca` only the CAs in that file (a private
//! CA should not also let any public certificate pass for the Redis).

use std::path::Path;
use std::sync::Arc;

use redis::{ConnectionAddr, ConnectionInfo};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use tokio_rustls::rustls;

use super::pubsub::NodeAddr;
use super::EngineError;

/// The TLS side of a `rediss://` configuration, shared by every connection.
#[derive(Clone)]
pub struct RedisTls {
    /// `tls_ca` as the `redis` crate takes it (PEM bytes); none = webpki roots.
    certs: Option<redis::TlsCertificates>,
    /// The same trust for Ferry's own links.
    rustls: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for RedisTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisTls").field("private_ca", &self.certs.is_some()).finish()
    }
}

impl RedisTls {
    /// For `urls` (parsed) and `tls_ca`: none when the URLs are plain
    /// `redis://`. Reads and checks the CA file now, so a bad path or file
    /// fails at startup (and in `ferry check-config`).
    pub fn new(urls: &[ConnectionInfo], tls_ca: Option<&Path>) -> Result<Option<Arc<RedisTls>>, EngineError> {
        if !validate(urls, tls_ca.is_some())? {
            return Ok(None);
        }
        // The redis crate builds its rustls configs with the process-wide
        // provider; pin the one the rest of the server uses (ring), so a
        // second provider compiled in later cannot make that ambiguous.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let (certs, roots) = match tls_ca {
            None => (None, rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() }),
            Some(path) => {
                let (pem, roots) = read_ca(path).map_err(EngineError::Config)?;
                (Some(redis::TlsCertificates { client_tls: None, root_cert: Some(pem) }), roots)
            }
        };
        let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| EngineError::Config(format!("TLS: {e}")))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Some(Arc::new(RedisTls { certs, rustls: Arc::new(cfg) })))
    }

    /// `tls_ca` for a Cluster client builder, if set.
    pub fn certs(&self) -> Option<redis::TlsCertificates> {
        self.certs.clone()
    }

    /// The client configuration for Ferry's own links.
    pub fn rustls(&self) -> Arc<rustls::ClientConfig> {
        self.rustls.clone()
    }
}

/// Whether `urls` ask for TLS; refuses a mix of `redis://` and
/// `rediss://`, `#insecure` (certificates are always checked) and a
/// `tls_ca` without TLS. Reads no file.
pub fn validate(urls: &[ConnectionInfo], has_ca: bool) -> Result<bool, EngineError> {
    let tls = urls.iter().filter(|u| is_tls(u)).count();
    if tls == 0 {
        // No URL: no Redis, and nothing to say about its TLS (URLs may
        // still come from a flag).
        if has_ca && !urls.is_empty() {
            return Err(EngineError::Config(
                "redis.tls_ca is set but the [redis] urls are plain redis://: use rediss:// for TLS".into(),
            ));
        }
        return Ok(false);
    }
    if tls != urls.len() {
        return Err(EngineError::Config("[redis] urls mix redis:// and rediss://: use one or the other".into()));
    }
    if urls.iter().any(|u| matches!(u.addr(), ConnectionAddr::TcpTls { insecure: true, .. })) {
        return Err(EngineError::Config(
            "rediss://...#insecure is not supported: put the CA that signed the Redis certificate in redis.tls_ca"
                .into(),
        ));
    }
    Ok(true)
}

/// The PEM file's bytes and its certificates, checked.
fn read_ca(path: &Path) -> Result<(Vec<u8>, rustls::RootCertStore), String> {
    let at = |e: &dyn std::fmt::Display| format!("redis.tls_ca {}: {e}", path.display());
    let pem = std::fs::read(path).map_err(|e| at(&e))?;
    let certs = CertificateDer::pem_slice_iter(&pem).collect::<Result<Vec<_>, _>>().map_err(|e| at(&e))?;
    if certs.is_empty() {
        return Err(at(&"no certificate in the file"));
    }
    let mut roots = rustls::RootCertStore::empty();
    for c in certs {
        roots.add(c).map_err(|e| at(&e))?;
    }
    Ok((pem, roots))
}

/// Whether a parsed URL is `rediss://` (or `valkeys://`).
pub fn is_tls(info: &ConnectionInfo) -> bool {
    matches!(info.addr(), ConnectionAddr::TcpTls { .. })
}

/// `template`'s settings (credentials, database, TLS or not) at `addr`.
pub fn at(template: &ConnectionInfo, addr: &NodeAddr) -> ConnectionInfo {
    let a = match template.addr() {
        ConnectionAddr::TcpTls { insecure, .. } => {
            ConnectionAddr::TcpTls { host: addr.host.clone(), port: addr.port, insecure: *insecure, tls_params: None }
        }
        _ => ConnectionAddr::Tcp(addr.host.clone(), addr.port),
    };
    template.clone().set_addr(a)
}

/// The host and port of a parsed TCP URL (plain or TLS).
pub fn node_addr(info: &ConnectionInfo) -> Option<NodeAddr> {
    match info.addr() {
        ConnectionAddr::Tcp(host, port) | ConnectionAddr::TcpTls { host, port, .. } => {
            Some(NodeAddr { host: host.clone(), port: *port })
        }
        _ => None,
    }
}

/// A client for `info`, trusting `tls_ca` when it is a TLS address.
pub fn client(info: ConnectionInfo, tls: Option<&RedisTls>) -> redis::RedisResult<redis::Client> {
    match tls.and_then(|t| t.certs.as_ref()) {
        Some(certs) if is_tls(&info) => redis::Client::build_with_tls(info, certs.clone()),
        _ => redis::Client::open(info),
    }
}

/// An error text, with a hint when it is a certificate that did not verify
/// (rustls says "invalid peer certificate: ..."), so a startup failure
/// names the cause instead of reading like a network problem.
pub fn explain(e: &str) -> String {
    if e.contains("invalid peer certificate") {
        format!(
            "{e} (TLS: the Redis server's certificate does not verify; redis.tls_ca must hold the CA that signed \
             it, and the certificate must name the host in the URL)"
        )
    } else {
        e.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(u: &str) -> ConnectionInfo {
        redis::IntoConnectionInfo::into_connection_info(u).unwrap()
    }

    #[test]
    fn nodes_found_later_keep_the_urls_tls_and_credentials() {
        let node = NodeAddr { host: "10.0.0.9".into(), port: 7001 };
        let n = at(&info("rediss://u:p@10.0.0.1:6380/"), &node);
        assert!(is_tls(&n));
        assert_eq!(node_addr(&n), Some(node.clone()));
        assert_eq!(n.redis_settings().password(), Some("p"));
        assert!(!is_tls(&at(&info("redis://10.0.0.1:6379/"), &node)));
    }

    #[test]
    fn tls_settings_that_cannot_work_are_refused() {
        let tls = [info("rediss://a:6380/"), info("rediss://b:6380/")];
        assert!(validate(&tls, true).unwrap());
        assert!(!validate(&[info("redis://a:6379/")], false).unwrap());
        assert!(!validate(&[], true).unwrap(), "no Redis: nothing to check");
        let mixed = [info("rediss://a:6380/"), info("redis://b:6379/")];
        assert!(validate(&mixed, false).unwrap_err().to_string().contains("mix"));
        assert!(validate(&[info("redis://a:6379/")], true).unwrap_err().to_string().contains("use rediss://"));
        assert!(validate(&[info("rediss://a:6380/#insecure")], false).is_err());
        assert!(explain("invalid peer certificate: UnknownIssuer").contains("redis.tls_ca"));
        assert_eq!(explain("connection refused"), "connection refused");
    }
}
