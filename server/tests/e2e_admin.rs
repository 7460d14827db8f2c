//! The admin console (docs/ADMIN.md) through a real server on a loopback
//! port: off by default, nothing without the credential, loopback only
//! unless allowed, and its actions (publish, history, disconnect) work.
//! The page itself is tested in headless Chromium by server/admin/test.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use ferry_core::client::{ConnectionState, Event};
use ferry_core::codec::Encoding;
use ferry_core::frame::Qos;
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(20);
const PASSWORD: &str = "correct horse battery staple";
const TOKEN: &str = "admin-token-0123456789abcdef0123456789";
const JSON: &str = "Content-Type: application/json\r\n";

/// Every console API route but login, with a body that would be valid.
fn routes() -> Vec<(&'static str, &'static str, Option<Value>)> {
    vec![
        ("GET", "/admin/api/session", None),
        ("POST", "/admin/api/logout", None),
        ("GET", "/admin/api/info", None),
        ("GET", "/admin/api/nodes", None),
        ("GET", "/admin/api/connections", None),
        ("GET", "/admin/api/connections?user=u1&limit=5", None),
        ("GET", "/admin/api/channels", None),
        ("GET", "/admin/api/metrics", None),
        ("POST", "/admin/api/presence", Some(json!({"channel": "chat:lobby"}))),
        ("POST", "/admin/api/history", Some(json!({"channel": "chat:lobby", "limit": 5}))),
        ("POST", "/admin/api/publish", Some(json!({"channel": "chat:lobby", "data": {"x": 1}}))),
        ("POST", "/admin/api/disconnect", Some(json!({"user": "nobody"}))),
        // Unknown routes say nothing either without the credential.
        ("GET", "/admin/api/no-such-route", None),
        ("DELETE", "/admin/api/info", None),
    ]
}

fn admin_config() -> ferry_server::config::Config {
    let mut cfg = test_config();
    cfg.admin.password = Some(PASSWORD.into());
    cfg.admin.token = Some(TOKEN.into());
    cfg
}

async fn call(addr: SocketAddr, method: &str, path: &str, headers: &str, body: Option<&Value>) -> (u16, String, Value) {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let headers = if body.is_empty() { headers.to_string() } else { format!("{headers}{JSON}") };
    http_raw(addr, method, path, &headers, body.as_bytes()).await
}

/// The documented error envelope, and nothing else.
fn assert_envelope(what: &str, body: &Value, code: u64) {
    assert_eq!(body["error"]["code"], code, "{what}: {body}");
    assert_eq!(body.as_object().map(|o| o.len()), Some(1), "{what}: {body}");
    assert_eq!(body["error"].as_object().map(|o| o.len()), Some(2), "{what}: {body}");
}

async fn login(addr: SocketAddr, password: &str) -> (u16, String, Value) {
    call(addr, "POST", "/admin/api/login", "", Some(&json!({ "password": password }))).await
}

/// The `Cookie:` header line for the session a login head sets.
fn cookie_of(head: &str) -> String {
    let line = head.lines().find(|l| l.starts_with("set-cookie: ferry_admin=")).expect("a session cookie");
    let value = line["set-cookie: ".len()..].split(';').next().unwrap();
    format!("Cookie: {value}\r\n")
}

#[tokio::test]
async fn the_console_is_off_without_an_admin_section() {
    let srv = TestServer::start(test_config()).await;
    for (m, path) in [
        ("GET", "/admin"),
        ("GET", "/admin/"),
        ("GET", "/admin/app.js"),
        ("GET", "/admin/api/info"),
        ("POST", "/admin/api/login"),
    ] {
        let (status, _, _) = call(srv.addr, m, path, "", None).await;
        assert_eq!(status, 404, "{m} {path}");
    }
    let (status, _, _) = login(srv.addr, PASSWORD).await;
    assert_eq!(status, 404);
    // An [admin] section without a password or token leaves it off too.
    let mut cfg = test_config();
    cfg.admin.allow_remote = true;
    let srv = TestServer::start(cfg).await;
    let (status, _, _) = call(srv.addr, "GET", "/admin", "", None).await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn nothing_without_the_credential_and_a_wrong_password_gets_401() {
    let srv = TestServer::start(admin_config()).await;
    let a = srv.addr;
    // The page is served (it holds no data), with a strict policy.
    let (status, head, _) = call(a, "GET", "/admin", "", None).await;
    assert_eq!(status, 200);
    assert!(head.contains("content-type: text/html"), "{head}");
    assert!(head.contains("content-security-policy: default-src 'none'; script-src 'self'"), "{head}");
    assert!(head.contains("x-frame-options: deny"), "{head}");
    let (status, head, _) = call(a, "GET", "/admin/app.js", "", None).await;
    assert_eq!(status, 200);
    assert!(head.contains("content-type: text/javascript"), "{head}");
    // Wrong password: 401, the envelope, no cookie.
    let (status, head, body) = login(a, "correct horse battery stapler").await;
    assert_eq!(status, 401);
    assert_envelope("wrong password", &body, 101);
    assert!(!head.contains("set-cookie"), "{head}");
    // A bearer header with the password, a wrong token, a forged or
    // tampered cookie: all refused on every route.
    let (_, head, _) = login(a, PASSWORD).await;
    let good = cookie_of(&head);
    let tampered = good.replacen("v1.", "v1.9", 1);
    let refused = [
        String::new(),
        format!("Authorization: Bearer {PASSWORD}\r\n"),
        format!("Authorization: Bearer {TOKEN}x\r\n"),
        format!("Authorization: apikey {TOKEN}\r\n"),
        "Cookie: ferry_admin=v1.99999999999.00.00\r\n".to_string(),
        tampered,
    ];
    for (m, path, body) in routes() {
        for h in &refused {
            let (status, _, resp) = call(a, m, path, h, body.as_ref()).await;
            assert_eq!(status, 401, "{m} {path} with {h:?}: {resp}");
            assert_envelope(&format!("{m} {path}"), &resp, 101);
        }
    }
    // With the token or the session every route answers.
    for h in [format!("Authorization: Bearer {TOKEN}\r\n"), good.clone()] {
        for (m, path, body) in routes() {
            if path.ends_with("/logout") {
                continue;
            }
            let (status, _, resp) = call(a, m, path, &h, body.as_ref()).await;
            let want = match (m, path) {
                (_, "/admin/api/no-such-route") => 404,
                ("DELETE", _) => 405,
                _ => 200,
            };
            assert_eq!(status, want, "{m} {path}: {resp}");
        }
    }
    // Logging out ends that session on the server, not just in the browser.
    let (status, head, _) = call(a, "POST", "/admin/api/logout", &good, None).await;
    assert_eq!(status, 200);
    assert!(head.contains("set-cookie: ferry_admin=; path=/admin; max-age=0"), "{head}");
    let (status, _, _) = call(a, "GET", "/admin/api/info", &good, None).await;
    assert_eq!(status, 401, "a logged-out cookie is refused");
}

#[tokio::test]
async fn logins_are_rate_limited_per_address() {
    let mut cfg = admin_config();
    cfg.admin.login_attempts_per_minute = 3;
    let srv = TestServer::start(cfg).await;
    for _ in 0..3 {
        let (status, _, _) = login(srv.addr, "wrong password, guessing").await;
        assert_eq!(status, 401);
    }
    // Even the right password waits now.
    let (status, head, body) = login(srv.addr, PASSWORD).await;
    assert_eq!(status, 429, "{body}");
    assert_envelope("rate limited", &body, 111);
    assert!(!head.contains("set-cookie"));
}

#[tokio::test]
async fn relayed_requests_are_refused_unless_remote_is_allowed() {
    let srv = TestServer::start(admin_config()).await;
    let bearer = format!("Authorization: Bearer {TOKEN}\r\n");
    for relay in ["X-Forwarded-For: 203.0.113.7\r\n", "Forwarded: for=203.0.113.7\r\n", "X-Real-IP: 203.0.113.7\r\n"] {
        for path in ["/admin", "/admin/api/info"] {
            let (status, _, body) = call(srv.addr, "GET", path, &format!("{relay}{bearer}"), None).await;
            assert_eq!(status, 403, "{relay} {path}: {body}");
            assert_envelope(path, &body, 103);
        }
    }
    let mut cfg = admin_config();
    cfg.admin.allow_remote = true;
    let srv = TestServer::start(cfg).await;
    let (status, _, _) =
        call(srv.addr, "GET", "/admin/api/info", &format!("X-Forwarded-For: 1.2.3.4\r\n{bearer}"), None).await;
    assert_eq!(status, 200);
}

/// This machine's own address on its first non-loopback interface, found
/// without sending anything (a UDP connect only picks a route).
fn own_non_loopback_ip() -> Option<std::net::IpAddr> {
    let s = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    s.connect("198.51.100.1:9").ok()?;
    let ip = s.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

#[tokio::test]
async fn peers_beyond_loopback_are_refused_unless_remote_is_allowed() {
    let Some(ip) = own_non_loopback_ip() else {
        eprintln!("SKIP: this machine has no non-loopback address to connect from");
        return;
    };
    for allow_remote in [false, true] {
        let mut cfg = admin_config();
        cfg.admin.allow_remote = allow_remote;
        let dir = TempDir::new("admin-remote");
        cfg.data_dir = dir.path().to_path_buf();
        // Listens on every address; connecting to the machine's own
        // address makes the peer that address (the packets stay local).
        let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
        let addr = SocketAddr::new(ip, listener.local_addr().unwrap().port());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(ferry_server::serve(listener, None, cfg, async move {
            let _ = stopped.await;
        }));
        let bearer = format!("Authorization: Bearer {TOKEN}\r\n");
        let (page, _, _) = call(addr, "GET", "/admin", "", None).await;
        let (info, _, body) = call(addr, "GET", "/admin/api/info", &bearer, None).await;
        let (login_status, _, _) = login(addr, PASSWORD).await;
        if allow_remote {
            assert_eq!((page, info, login_status), (200, 200, 200), "{body}");
        } else {
            assert_eq!((page, info, login_status), (403, 403, 403), "{body}");
            assert_envelope("remote", &body, 103);
        }
        // The rest of the server answers remote peers as ever.
        let (health, _, _) = call(addr, "GET", "/healthz", "", None).await;
        assert_eq!(health, 200);
        let _ = stop.send(());
        let _ = tokio::time::timeout(T, task).await;
    }
}

#[tokio::test]
async fn the_console_sees_publishes_pages_and_disconnects() {
    let mut cfg = admin_config();
    cfg.namespaces.insert("quiet".into(), ferry_server::config::Namespace { presence: false, ..Default::default() });
    let srv = TestServer::start(cfg).await;
    let a = srv.addr;
    let (_, head, _) = login(a, PASSWORD).await;
    let s = cookie_of(&head);
    let mut c = TestClient::new(&srv.url(), TestClient::config("phone-1", "u1", Encoding::Json));
    c.subscribe("chat:lobby", Qos::AtLeastOnce).await;
    c.connect().await;
    assert!(c.run_until(T, |c| c.events.iter().any(|e| matches!(e, Event::Subscribed { .. }))).await);
    for i in 1..=25 {
        c.publish("chat:lobby", format!("{{\"n\":{i}}}").into_bytes(), Qos::AtLeastOnce).await;
    }
    assert!(c.run_until(T, |c| c.session.outbox_len() == 0).await);

    let (_, _, conns) = call(a, "GET", "/admin/api/connections", &s, None).await;
    assert_eq!(conns["total"], 1, "{conns}");
    assert_eq!(conns["users"], 1);
    let row = &conns["connections"][0];
    assert_eq!(row["user"], "u1");
    assert_eq!(row["device"], "phone-1");
    assert_eq!(row["channels"], json!(["chat:lobby"]));
    let (_, _, chans) = call(a, "GET", "/admin/api/channels?active=true", &s, None).await;
    let ch = &chans["channels"][0];
    assert_eq!(
        (ch["name"].as_str(), ch["top"].as_u64(), ch["subscribers"].as_u64()),
        (Some("chat:lobby"), Some(25), Some(1)),
        "{chans}"
    );
    assert_eq!(ch["retained"], 25);
    assert_eq!(ch["history_size"], 1000);
    let (_, _, p) = call(a, "POST", "/admin/api/presence", &s, Some(&json!({"channel": "chat:lobby"}))).await;
    assert_eq!(p["stats"], json!({"clients": 1, "users": 1}), "{p}");
    assert_eq!(p["clients"][0]["user"], "u1");
    let (status, _, p) = call(a, "POST", "/admin/api/presence", &s, Some(&json!({"channel": "quiet:x"}))).await;
    assert_eq!(status, 400, "presence off in the namespace: the API's own error");
    assert_envelope("presence off", &p, 108);

    // Publish from the console; the client receives it.
    let body = json!({"channel": "chat:lobby", "data": {"text": "from the console"}});
    let (status, _, r) = call(a, "POST", "/admin/api/publish", &s, Some(&body)).await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["offset"], 26);
    assert!(r["message_id"].as_str().unwrap().starts_with("admin:"));
    assert!(
        c.run_until(T, |c| c
            .received
            .get("chat:lobby")
            .is_some_and(|v| v.iter().any(|m| m.2 == br#"{"text":"from the console"}"#)))
            .await
    );
    let (status, _, r) =
        call(a, "POST", "/admin/api/publish", &s, Some(&json!({"channel": "bad name", "data": 1}))).await;
    assert_eq!(status, 400, "{r}");

    // History, newest first, a page of 10 at a time down to offset 1.
    let mut until: Option<u64> = None;
    let mut seen = Vec::new();
    for _ in 0..5 {
        let mut q = json!({"channel": "chat:lobby", "limit": 10, "reverse": true});
        if let Some(u) = until {
            q["until_offset"] = json!(u);
        }
        let (_, _, h) = call(a, "POST", "/admin/api/history", &s, Some(&q)).await;
        let offs: Vec<u64> =
            h["publications"].as_array().unwrap().iter().map(|p| p["offset"].as_u64().unwrap()).collect();
        if offs.is_empty() {
            break;
        }
        until = Some(offs[offs.len() - 1] - 1);
        seen.extend(offs);
        if until == Some(0) {
            break;
        }
    }
    assert_eq!(seen, (1..=26).rev().collect::<Vec<u64>>());

    // Counters reflect the traffic.
    let (_, _, m) = call(a, "GET", "/admin/api/metrics", &s, None).await;
    assert_eq!(m["metrics"]["ferry_connections"], 1);
    assert_eq!(m["metrics"]["ferry_publications_stored_total"], 26);

    // Disconnect the user for good: close 3503.
    let (_, _, d) = call(a, "POST", "/admin/api/disconnect", &s, Some(&json!({"user": "u1"}))).await;
    assert_eq!(d["disconnected"], 1);
    assert!(c.run_until(T, |c| matches!(c.session.state(), ConnectionState::Closed { code: 3503, .. })).await);
    let (_, _, conns) = call(a, "GET", "/admin/api/connections", &s, None).await;
    assert_eq!(conns["total"], 0, "{conns}");
}

#[test]
fn show_config_redacts_the_admin_secrets() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
        .arg("show-config")
        .env("FERRY_ADMIN_PASSWORD", PASSWORD)
        .env("FERRY_ADMIN_TOKEN", TOKEN)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains(PASSWORD) && !text.contains(TOKEN), "{text}");
    assert!(text.contains("[admin]\npassword = \"<redacted>\"\ntoken = \"<redacted>\""), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_redis_every_node_is_listed_and_tops_are_the_clusters() {
    let redis = Redis::start(&[]);
    let node = |_| {
        let mut cfg = admin_config();
        cfg.redis.urls = vec![redis.url()];
        cfg
    };
    let a = TestServer::start(node(0)).await;
    let b = TestServer::start(node(1)).await;
    let bearer = format!("Authorization: Bearer {TOKEN}\r\n");
    // Each node registers with its first beat (every 500 ms): wait, bounded.
    let mut listed = Value::Null;
    for _ in 0..100 {
        let (_, _, r) = call(a.addr, "GET", "/admin/api/nodes", &bearer, None).await;
        listed = r;
        if listed["nodes"].as_array().is_some_and(|n| n.len() == 2) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let nodes = listed["nodes"].as_array().unwrap_or_else(|| panic!("{listed}"));
    assert_eq!(nodes.len(), 2, "{listed}");
    assert_eq!(nodes.iter().filter(|n| n["this"] == true).count(), 1, "{listed}");
    assert!(nodes.iter().all(|n| n["beat_ago_ms"].as_u64().is_some_and(|ms| ms < 3_000)), "{listed}");
    let (_, _, info) = call(a.addr, "GET", "/admin/api/info", &bearer, None).await;
    assert_eq!(info["engine"], "redis");
    assert!(nodes.iter().any(|n| n["id"] == info["node"] && n["this"] == true), "{info} {listed}");
    // A channel node A knows, published on node B: A shows B's top.
    let mut c = TestClient::new(&a.url(), TestClient::config("d", "u1", Encoding::Json));
    c.subscribe("chat:lobby", Qos::AtLeastOnce).await;
    c.connect().await;
    assert!(c.run_until(T, |c| c.events.iter().any(|e| matches!(e, Event::Subscribed { .. }))).await);
    for i in 0..3 {
        let body = json!({"channel": "chat:lobby", "data": i});
        let (status, _, r) = call(b.addr, "POST", "/admin/api/publish", &bearer, Some(&body)).await;
        assert_eq!(status, 200, "{r}");
    }
    let (_, _, chans) = call(a.addr, "GET", "/admin/api/channels", &bearer, None).await;
    assert_eq!(chans["channels"][0]["name"], "chat:lobby", "{chans}");
    assert_eq!(chans["channels"][0]["top"], 3, "{chans}");
}
