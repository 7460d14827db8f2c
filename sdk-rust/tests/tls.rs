//! `wss://`: a real server with `[tls]` from the config, the client trusting
//! the test CA, and the refusals around it.

use std::time::Duration;

use ferry_client::{Client, Qos};
use ferry_server::config::{Config, TlsConfig};

const T: Duration = Duration::from_secs(20);

fn fixture(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../server/tests/fixtures/tls").join(name)
}

fn temp(tag: &str) -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!("ferry-tls-test-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    p
}

struct Server {
    addr: std::net::SocketAddr,
    api: std::net::SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

async fn tls_server(tag: &str) -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let api_addr = api.local_addr().unwrap();
    let cfg = Config {
        data_dir: temp(tag),
        tls: TlsConfig {
            cert: Some(fixture("server.pem")),
            key: Some(fixture("server.key")),
            api: true,
            ca_file: None,
        },
        ..Config::default()
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(ferry_server::serve(listener, Some(api), cfg, async move {
        let _ = rx.await;
    }));
    Server { addr, api: api_addr, stop: Some(tx), task }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.task.abort();
    }
}

fn ca() -> Vec<u8> {
    std::fs::read(fixture("ca.pem")).unwrap()
}

#[tokio::test]
async fn wss_publish_and_receive_with_the_test_ca() {
    let srv = tls_server("ok").await;
    for host in ["127.0.0.1", "localhost"] {
        let url = format!("wss://{host}:{}/ws", srv.addr.port());
        let c = Client::builder(&url)
            .token("alice")
            .device_id(format!("d-{host}"))
            .tls_root_certificates_pem(ca())
            .memory_storage()
            .build()
            .unwrap();
        let mut sub = c.subscribe("tls:room", Qos::AtLeastOnce).await.unwrap();
        c.connect();
        assert!(c.wait_connected(T).await, "connects over TLS to {url}");
        let ack = c.publish("tls:room", host.as_bytes().to_vec(), Qos::ExactlyOnce).await.unwrap();
        let p = tokio::time::timeout(T, sub.next_publication()).await.unwrap().unwrap();
        assert_eq!((p.offset, p.payload.data.0.as_slice()), (ack.offset, host.as_bytes()));
    }
    // The API answers over TLS too (tls.api = true): a raw HTTPS request.
    let status = https_get(srv.api, "/api/info").await;
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
}

#[tokio::test]
async fn wss_refuses_an_unknown_certificate_and_plain_ws_gets_nothing() {
    let srv = tls_server("bad").await;
    // Without the test CA the certificate is not trusted: never connected,
    // and the reason says why.
    let url = format!("wss://127.0.0.1:{}/ws", srv.addr.port());
    let c = Client::builder(&url).token("eve").device_id("e").memory_storage().build().unwrap();
    let mut d = c.disconnects();
    c.connect();
    let why = tokio::time::timeout(T, d.wait_for(|d| d.is_some())).await.unwrap().unwrap().clone().unwrap();
    assert!(why.reason.to_lowercase().contains("certificate"), "{why:?}");
    assert!(why.reconnect, "a TLS failure is retried like any network failure");
    assert_ne!(*c.state().borrow(), ferry_client::ConnectionState::Connected);
    // Plain ws:// to the TLS port: the handshake fails, nothing is served.
    let plain = format!("ws://127.0.0.1:{}/ws", srv.addr.port());
    let c = Client::builder(&plain).token("eve").device_id("p").memory_storage().build().unwrap();
    let mut d = c.disconnects();
    c.connect();
    let why = tokio::time::timeout(T, d.wait_for(|d| d.is_some())).await.unwrap().unwrap().clone().unwrap();
    assert!(why.reconnect, "{why:?}");
    assert!(!c.wait_connected(Duration::from_millis(1)).await);
}

async fn https_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let cfg = ferry_server::tls::client_config(Some(&fixture("ca.pem"))).unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut s = ferry_server::tls::connect(cfg, "localhost", tcp).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    tokio::time::timeout(T, s.read_to_string(&mut out)).await.unwrap().unwrap_or_default();
    out
}
