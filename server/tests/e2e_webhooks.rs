//! Webhooks end to end: a local receiver that fails at first, HMAC
//! signatures, retries, order, and the presence grace period.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use ferry_core::client::Event;
use ferry_core::codec::Encoding;
use ferry_core::frame::Qos;
use ferry_server::config::WebhookConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const T: Duration = Duration::from_secs(20);

#[derive(Default)]
struct Received {
    attempts: usize,
    /// (signature header, body) of accepted calls.
    accepted: Vec<(String, String)>,
}

/// A receiver that answers 500 to the first `fail` calls, then 200, over
/// TLS with the given server config when `tls`; `notify` fires after each
/// call is answered.
async fn receiver_on(
    fail: usize,
    tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
) -> (String, Arc<Mutex<Received>>, Arc<tokio::sync::Notify>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let scheme = if tls.is_some() { "https://localhost" } else { "http://127.0.0.1" };
    let url = format!("{scheme}:{}/hooks", l.local_addr().unwrap().port());
    let got = Arc::new(Mutex::new(Received::default()));
    let notify = Arc::new(tokio::sync::Notify::new());
    let g = got.clone();
    let n = notify.clone();
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let mut s: Box<dyn ferry_server::tls::Stream> = match &acceptor {
                Some(a) => match a.accept(tcp).await {
                    Ok(t) => Box::new(t),
                    Err(_) => continue,
                },
                None => Box::new(tcp),
            };
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            // Read headers, then the body by Content-Length.
            let (head, body) = loop {
                let n = s.read(&mut chunk).await.unwrap_or(0);
                if n == 0 {
                    break (String::new(), String::new());
                }
                buf.extend_from_slice(&chunk[..n]);
                let text = String::from_utf8_lossy(&buf).to_string();
                if let Some((h, b)) = text.split_once("\r\n\r\n") {
                    let len: usize = h
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase().strip_prefix("content-length: ").map(|v| v.trim().parse().unwrap())
                        })
                        .unwrap_or(0);
                    if b.len() >= len {
                        break (h.to_string(), b[..len].to_string());
                    }
                }
            };
            let sig = head
                .lines()
                .find_map(|l| l.strip_prefix("X-Ferry-Signature: ").map(str::to_string))
                .unwrap_or_default();
            let ok = {
                let mut r = g.lock().unwrap();
                r.attempts += 1;
                let ok = r.attempts > fail;
                if ok {
                    r.accepted.push((sig, body));
                }
                ok
            };
            let status = if ok { "200 OK" } else { "500 Internal Server Error" };
            let _ = s
                .write_all(format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").as_bytes())
                .await;
            let _ = s.shutdown().await;
            n.notify_one();
        }
    });
    (url, got, notify)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_ordered_retried_and_graceful() {
    let (url, got, answered) = receiver_on(2, None).await;
    let mut cfg = test_config();
    cfg.presence_grace_ms = 400;
    cfg.webhooks = WebhookConfig {
        url,
        secret: "hook-secret".into(),
        events: ["online", "offline", "subscribe", "unsubscribe", "publish"].map(String::from).to_vec(),
        publish_namespaces: vec!["chat".into()],
        retry_initial_ms: 50,
        ..WebhookConfig::default()
    };
    let srv = TestServer::start(cfg).await;
    let mut c = TestClient::new(&srv.url(), TestClient::config("d", "u1", Encoding::Binary));
    c.subscribe("chat:1", Qos::AtLeastOnce).await;
    c.connect().await;
    assert!(c.run_until(T, |c| c.events.iter().any(|e| matches!(e, Event::Subscribed { .. }))).await);
    c.publish("chat:1", b"hi".to_vec(), Qos::AtLeastOnce).await;
    c.publish("other:1", b"not hooked".to_vec(), Qos::AtLeastOnce).await;
    assert!(c.run_until(T, |c| c.acked.len() == 2).await);
    // A quick reconnect inside the grace period is not an offline/online pair.
    c.network_changed().await;
    assert!(c.run_until(T, |c| c.session.stats().connects == 2).await);
    c.run_for(Duration::from_millis(600)).await;
    // Leave for good.
    let now = c.now();
    c.session.disconnect(now);
    c.run_for(Duration::from_millis(100)).await;
    // Each answered call wakes the test; offline comes last.
    let deadline = tokio::time::Instant::now() + T;
    let events = loop {
        let events: Vec<serde_json::Value> =
            got.lock().unwrap().accepted.iter().map(|(_, b)| serde_json::from_str(b).unwrap()).collect();
        if events.iter().any(|e| e["event"] == "offline") {
            break events;
        }
        let woke = tokio::time::timeout_at(deadline, answered.notified()).await;
        assert!(woke.is_ok(), "no offline: {events:?}");
    };
    let kinds: Vec<&str> = events.iter().map(|e| e["event"].as_str().unwrap()).collect();
    // The reconnect re-subscribes (unsubscribe + subscribe) but is not offline/online.
    assert_eq!(kinds.first(), Some(&"online"));
    assert_eq!(kinds.last(), Some(&"offline"));
    assert_eq!(kinds.iter().filter(|k| **k == "online").count(), 1, "{kinds:?}");
    assert_eq!(kinds.iter().filter(|k| **k == "publish").count(), 1, "only the chat namespace: {kinds:?}");
    assert!(kinds.iter().position(|k| *k == "subscribe") < kinds.iter().position(|k| *k == "publish"));
    let publish = events.iter().find(|e| e["event"] == "publish").unwrap();
    assert_eq!(publish["channel"], "chat:1");
    assert_eq!(publish["b64data"], ferry_core::base64::encode(b"hi"));
    // In order, each signed over its body.
    let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    for (sig, body) in &got.lock().unwrap().accepted {
        assert_eq!(sig, &ferry_server::webhooks::sign("hook-secret", body.as_bytes()));
    }
    // The first event needed two retries.
    assert_eq!(got.lock().unwrap().attempts, events.len() + 2);
}

const TLS_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tls");

/// The test leaf certificate for localhost (signed by `ca.pem`).
fn test_certificate() -> Arc<tokio_rustls::rustls::ServerConfig> {
    let (cert, key) = (format!("{TLS_DIR}/server.pem"), format!("{TLS_DIR}/server.key"));
    ferry_server::tls::server_config(cert.as_ref(), key.as_ref()).unwrap()
}

#[tokio::test]
async fn https_receiver_trusted_through_tls_ca_file() {
    let (url, got, called) = receiver_on(0, Some(test_certificate())).await;
    let mut cfg = test_config();
    cfg.tls.ca_file = Some(format!("{TLS_DIR}/ca.pem").into());
    cfg.webhooks =
        WebhookConfig { url, secret: "s3".into(), events: vec!["online".into()], ..WebhookConfig::default() };
    let srv = TestServer::start(cfg).await;
    let mut c = TestClient::new(&srv.url(), TestClient::config("d", "carol", Encoding::Json));
    c.connect().await;
    assert!(c.connected().await);
    tokio::time::timeout(T, called.notified()).await.expect("the HTTPS webhook arrives");
    let r = got.lock().unwrap();
    let (sig, body) = &r.accepted[0];
    assert_eq!(sig, &ferry_server::webhooks::sign("s3", body.as_bytes()));
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!((v["event"].as_str(), v["user"].as_str()), (Some("online"), Some("carol")));
}

#[tokio::test]
async fn https_receiver_with_an_untrusted_certificate_is_never_called() {
    let (url, got, _) = receiver_on(0, Some(test_certificate())).await;
    let mut cfg = test_config();
    // No tls.ca_file: the test CA is not among the public roots.
    cfg.webhooks = WebhookConfig {
        url,
        secret: "s3".into(),
        events: vec!["online".into()],
        retries: 1,
        retry_initial_ms: 10,
        ..WebhookConfig::default()
    };
    let srv = TestServer::start_with_api(cfg).await;
    let mut c = TestClient::new(&srv.url(), TestClient::config("d", "dave", Encoding::Json));
    c.connect().await;
    assert!(c.connected().await);
    // Both attempts fail the certificate check and are counted.
    let metrics = format!("http://{}/metrics", srv.addr);
    let deadline = std::time::Instant::now() + T;
    loop {
        let (_, text) = http(srv.addr, "GET", "/metrics", None, None).await;
        let text = without_node_label(text.as_str().unwrap_or_default());
        if text.lines().any(|l| l == "ferry_webhook_failures_total 1") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{metrics}: {text}");
        c.run_for(Duration::from_millis(20)).await;
    }
    assert!(got.lock().unwrap().accepted.is_empty());
}
