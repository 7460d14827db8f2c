//! A small HTTP/1.1 client for the server's own outgoing calls (webhooks,
//! JWKS): `http://` and `https://` (rustls), one request per connection,
//! bounded in time and size.
//!
//! Design: written here rather than pulling in hyper's client stack, since
//! both callers send one request at a time to one configured URL and need
//! nothing beyond status, `Content-Length` and chunked bodies.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio_rustls::rustls;

/// A parsed `http(s)://host[:port]/path` URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Url {
    /// TLS or not.
    pub https: bool,
    /// Host name or IP (IPv6 without brackets).
    pub host: String,
    /// Port (80/443 by default).
    pub port: u16,
    /// Path and query, starting with `/`.
    pub path: String,
}

impl Url {
    /// Parse; only `http://` and `https://` are accepted.
    pub fn parse(url: &str) -> Result<Url, String> {
        let (https, rest) = if let Some(r) = url.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("http://") {
            (false, r)
        } else {
            return Err(format!("{url}: only http:// and https:// URLs are supported"));
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let default_port = if https { 443 } else { 80 };
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, after) = v6.split_once(']').ok_or_else(|| format!("{url}: unclosed [ in the host"))?;
            let port = match after.strip_prefix(':') {
                Some(p) => p.parse().map_err(|_| format!("{url}: bad port"))?,
                None if after.is_empty() => default_port,
                None => return Err(format!("{url}: bad host")),
            };
            (h.to_string(), port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), p.parse().map_err(|_| format!("{url}: bad port"))?),
                None => (authority.to_string(), default_port),
            }
        };
        if host.is_empty() || authority.contains('@') {
            return Err(format!("{url}: bad host"));
        }
        Ok(Url { https, host, port, path: path.to_string() })
    }

    fn host_header(&self) -> String {
        let h = if self.host.contains(':') { format!("[{}]", self.host) } else { self.host.clone() };
        match (self.https, self.port) {
            (true, 443) | (false, 80) => h,
            _ => format!("{h}:{}", self.port),
        }
    }
}

/// A response: status and the (de-chunked) body.
#[derive(Debug)]
pub struct Response {
    /// HTTP status.
    pub status: u16,
    /// Body, at most the caller's limit.
    pub body: Vec<u8>,
}

/// The client: holds the TLS trust for `https://`.
#[derive(Clone)]
pub struct HttpClient {
    tls: Arc<rustls::ClientConfig>,
}

impl HttpClient {
    /// With the TLS client configuration (see [`crate::tls::client_config`]).
    pub fn new(tls: Arc<rustls::ClientConfig>) -> HttpClient {
        HttpClient { tls }
    }

    /// Send one request; the whole exchange is bounded by `timeout`, the
    /// response body by `max_body` bytes.
    pub async fn request(
        &self,
        method: &str,
        url: &Url,
        headers: &[(&str, &str)],
        body: &[u8],
        timeout: Duration,
        max_body: usize,
    ) -> Result<Response, String> {
        let call = async {
            let tcp = tokio::net::TcpStream::connect((url.host.as_str(), url.port))
                .await
                .map_err(|e| format!("connect {}:{}: {e}", url.host, url.port))?;
            let _ = tcp.set_nodelay(true);
            let mut s: Box<dyn crate::tls::Stream> = if url.https {
                Box::new(crate::tls::connect(self.tls.clone(), &url.host, tcp).await.map_err(|e| format!("TLS: {e}"))?)
            } else {
                Box::new(tcp)
            };
            let mut req = format!("{method} {} HTTP/1.1\r\nHost: {}\r\n", url.path, url.host_header());
            for (k, v) in headers {
                req.push_str(&format!("{k}: {v}\r\n"));
            }
            req.push_str(&format!("Content-Length: {}\r\nConnection: close\r\n\r\n", body.len()));
            s.write_all(req.as_bytes()).await.map_err(|e| e.to_string())?;
            s.write_all(body).await.map_err(|e| e.to_string())?;
            s.flush().await.map_err(|e| e.to_string())?;
            read_response(&mut s, max_body).await
        };
        tokio::time::timeout(timeout, call).await.map_err(|_| "timed out".to_string())?
    }
}

/// Largest response head accepted.
const MAX_HEAD: usize = 16 * 1024;

async fn read_response(s: &mut (impl AsyncRead + Unpin), max_body: usize) -> Result<Response, String> {
    // Everything up to the limit, then parse: `Connection: close` means the
    // body ends at EOF or at its declared length, whichever comes first.
    let limit = MAX_HEAD + max_body + 64 * 1024;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let n = match s.read(&mut chunk).await {
            Ok(n) => n,
            // A peer that closes without TLS close_notify still sent its body.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => 0,
            Err(e) => return Err(e.to_string()),
        };
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(done) = complete(&buf) {
            buf.truncate(done);
            break;
        }
        if buf.len() > limit {
            return Err(format!("response larger than {max_body} bytes"));
        }
    }
    parse(&buf, max_body)
}

fn head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// Length of a complete response with a `Content-Length`, if it is all here.
fn complete(buf: &[u8]) -> Option<usize> {
    let end = head_end(buf)?;
    let head = std::str::from_utf8(&buf[..end]).ok()?;
    let len: usize = header(head, "content-length")?.parse().ok()?;
    (buf.len() >= end + len).then_some(end + len)
}

fn parse(buf: &[u8], max_body: usize) -> Result<Response, String> {
    let end = head_end(buf).ok_or("incomplete response head")?;
    if end > MAX_HEAD {
        return Err("response head too large".into());
    }
    let head = std::str::from_utf8(&buf[..end]).map_err(|_| "response head is not UTF-8")?;
    let status_line = head.lines().next().unwrap_or_default();
    let status = status_line
        .strip_prefix("HTTP/1.")
        .and_then(|r| r.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let raw = &buf[end..];
    let body = if header(head, "transfer-encoding").is_some_and(|t| t.eq_ignore_ascii_case("chunked")) {
        dechunk(raw, max_body)?
    } else {
        match header(head, "content-length").and_then(|l| l.parse::<usize>().ok()) {
            Some(n) if raw.len() < n => return Err("response body cut short".into()),
            Some(n) => raw[..n].to_vec(),
            None => raw.to_vec(),
        }
    };
    if body.len() > max_body {
        return Err(format!("response larger than {max_body} bytes"));
    }
    Ok(Response { status, body })
}

fn dechunk(mut raw: &[u8], max_body: usize) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let line_end = raw.windows(2).position(|w| w == b"\r\n").ok_or("bad chunk")?;
        let size_text = std::str::from_utf8(&raw[..line_end]).map_err(|_| "bad chunk size")?;
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16).map_err(|_| "bad chunk size")?;
        raw = &raw[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        if raw.len() < size + 2 || out.len() + size > max_body {
            return Err("chunked body cut short or too large".into());
        }
        out.extend_from_slice(&raw[..size]);
        raw = &raw[size + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = Url::parse("https://hooks.example.com/ferry?x=1").unwrap();
        assert_eq!((u.https, u.host.as_str(), u.port, u.path.as_str()), (true, "hooks.example.com", 443, "/ferry?x=1"));
        let u = Url::parse("http://127.0.0.1:9000").unwrap();
        assert_eq!((u.https, u.port, u.path.as_str(), u.host_header()), (false, 9000, "/", "127.0.0.1:9000".into()));
        let u = Url::parse("http://[::1]:81/a").unwrap();
        assert_eq!((u.host.as_str(), u.port, u.host_header()), ("::1", 81, "[::1]:81".into()));
        assert!(Url::parse("ftp://x/").is_err());
        assert!(Url::parse("http://user@host/").is_err());
        assert!(Url::parse("http://host:port/").is_err());
        assert!(Url::parse("http:///").is_err());
    }

    #[test]
    fn responses() {
        let r = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", 100).unwrap();
        assert_eq!((r.status, r.body.as_slice()), (200, &b"hello"[..]));
        let r =
            parse(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n", 100)
                .unwrap();
        assert_eq!(r.body, b"abcde");
        let r = parse(b"HTTP/1.0 503 Busy\r\n\r\nall of it", 100).unwrap();
        assert_eq!((r.status, r.body.as_slice()), (503, &b"all of it"[..]));
        assert!(parse(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nshort", 100).is_err());
        assert!(parse(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", 4).is_err());
        assert!(parse(b"garbage\r\n\r\n", 100).is_err());
        assert!(parse(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 100).is_err());
        assert_eq!(complete(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA"), Some(40));
    }
}
