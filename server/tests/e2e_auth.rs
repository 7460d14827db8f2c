//! Token authentication end to end: HS256/RS256/ES256, pinned algorithms,
//! `none` and key confusion refused, expiry, refresh without reconnecting.

mod common;

use std::time::Duration;

use common::*;
use ferry_core::client::{ConnectionState, Event};
use ferry_core::codec::Encoding;
use ferry_core::CloseCode;
use ferry_server::auth::{sign_hs256, Claims};
use ferry_server::config::{AuthConfig, Config};
use jsonwebtoken::{Algorithm, EncodingKey, Header};

const T: Duration = Duration::from_secs(20);
const SECRET: &str = "0123456789abcdef0123456789abcdef-test";

fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

fn claims(user: &str, ttl: i64) -> Claims {
    Claims { sub: user.into(), exp: Some((now() as i64 + ttl) as u64), info: None, channels: vec![] }
}

fn sign(alg: Algorithm, key: &EncodingKey, c: &Claims) -> String {
    jsonwebtoken::encode(&Header::new(alg), c, key).unwrap()
}

fn config(auth: AuthConfig) -> Config {
    Config { auth, allow_anonymous: false, ..test_config() }
}

#[tokio::test]
async fn hs256_tokens_valid_expired_none_and_tampered() {
    let srv = TestServer::start(config(AuthConfig { hmac_secret: Some(SECRET.into()), ..AuthConfig::default() })).await;
    let url = srv.url();
    assert_eq!(try_token(&url, &sign_hs256(SECRET, &claims("u1", 60)).unwrap()).await, None);
    // Expired beyond the 5 s leeway: the documented token-expired close.
    assert_eq!(
        try_token(&url, &sign_hs256(SECRET, &claims("u1", -60)).unwrap()).await,
        Some(CloseCode::TokenExpired as u16)
    );
    // Wrong secret, anonymous (off), garbage.
    assert_eq!(
        try_token(&url, &sign_hs256("another-secret-another-secret-xx", &claims("u1", 60)).unwrap()).await,
        Some(3500)
    );
    assert_eq!(try_token(&url, "").await, Some(3500));
    assert_eq!(try_token(&url, "not.a.jwt").await, Some(3500));
    // alg=none, unsigned.
    let none = format!(
        "{}.{}.",
        ferry_core::base64::encode(br#"{"alg":"none","typ":"JWT"}"#)
            .trim_end_matches('=')
            .replace('+', "-")
            .replace('/', "_"),
        ferry_core::base64::encode(format!(r#"{{"sub":"u1","exp":{}}}"#, now() + 60).as_bytes())
            .trim_end_matches('=')
            .replace('+', "-")
            .replace('/', "_")
    );
    assert_eq!(try_token(&url, &none).await, Some(3500));
    // Missing exp is refused by default.
    let no_exp = Claims { exp: None, ..claims("u1", 0) };
    assert_eq!(try_token(&url, &sign_hs256(SECRET, &no_exp).unwrap()).await, Some(3500));
}

#[tokio::test]
async fn rs256_and_es256_pinned_and_no_key_confusion() {
    let rsa_pub = fixture("rsa_public.pem");
    let auth = AuthConfig {
        rsa_public_key: Some(rsa_pub.clone()),
        ec_public_key: Some(fixture("ec_public.pem")),
        algorithms: Some(vec!["RS256".into()]),
        ..AuthConfig::default()
    };
    // ES256 configured but not pinned: a key without its algorithm is refused at startup...
    let err = ferry_server::auth::Auth::from_config(
        &AuthConfig { algorithms: Some(vec!["HS256".into()]), ..auth.clone() },
        false,
    );
    assert!(err.is_err(), "an algorithm without a key is a config error");
    let srv = TestServer::start(config(auth)).await;
    let url = srv.url();
    let rsa = EncodingKey::from_rsa_pem(&std::fs::read(fixture("rsa_private.pem")).unwrap()).unwrap();
    let ec = EncodingKey::from_ec_pem(&std::fs::read(fixture("ec_private.pem")).unwrap()).unwrap();
    assert_eq!(try_token(&url, &sign(Algorithm::RS256, &rsa, &claims("u2", 60))).await, None);
    // ES256 is not in the pinned list.
    assert_eq!(try_token(&url, &sign(Algorithm::ES256, &ec, &claims("u2", 60))).await, Some(3500));
    // Key confusion: HS256 "signed" with the RSA public key as the secret.
    let public_pem = std::fs::read(&rsa_pub).unwrap();
    let forged = sign(Algorithm::HS256, &EncodingKey::from_secret(&public_pem), &claims("admin", 60));
    assert_eq!(try_token(&url, &forged).await, Some(3500));
    drop(srv);
    // With ES256 allowed it works.
    let srv = TestServer::start(config(AuthConfig {
        ec_public_key: Some(fixture("ec_public.pem")),
        ..AuthConfig::default()
    }))
    .await;
    assert_eq!(try_token(&srv.url(), &sign(Algorithm::ES256, &ec, &claims("u3", 60))).await, None);
}

#[tokio::test]
async fn refresh_keeps_the_connection_and_expiry_closes_it() {
    let mut cfg = config(AuthConfig { hmac_secret: Some(SECRET.into()), leeway_secs: 0, ..AuthConfig::default() });
    cfg.limits.ping_interval_ms = 500;
    cfg.limits.pong_timeout_ms = 500;
    let srv = TestServer::start(cfg).await;
    // Tokens live 6 s; the client refreshes before expiry (at half the
    // lifetime at most) and must never reconnect.
    let mut cc = TestClient::config("r", &sign_hs256(SECRET, &claims("ru", 6)).unwrap(), Encoding::Binary);
    cc.refreshable = true;
    let mut c = TestClient::new(&srv.url(), cc);
    c.token_fn = Some(Box::new(|| sign_hs256(SECRET, &claims("ru", 6)).unwrap()));
    c.connect().await;
    assert!(c.connected().await);
    c.run_for(Duration::from_secs(13)).await;
    assert!(c.session.is_connected());
    assert_eq!(c.session.stats().connects, 1, "refreshed without reconnecting");
    assert!(c.token_requests >= 3, "refreshed {} times", c.token_requests);
    // Without refresh the server closes at expiry with 3005.
    let mut d = TestClient::new(
        &srv.url(),
        TestClient::config("e", &sign_hs256(SECRET, &claims("eu", 2)).unwrap(), Encoding::Json),
    );
    d.connect().await;
    assert!(d.connected().await);
    let started = std::time::Instant::now();
    assert!(d.run_until(T, |c| matches!(c.session.state(), ConnectionState::Closed { .. })).await);
    assert_eq!(
        d.session.state(),
        ConnectionState::Closed { code: CloseCode::TokenExpired as u16, reason: "token expired".into() }
    );
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn private_channels_need_a_subscription_token_or_a_grant() {
    use ferry_server::auth::{sign_subscription_hs256, SubscriptionClaims};
    use ferry_server::config::Namespace;
    let mut cfg = config(AuthConfig { hmac_secret: Some(SECRET.into()), ..AuthConfig::default() });
    cfg.namespaces.insert("vip".into(), Namespace { private: true, ..Namespace::default() });
    let srv = TestServer::start(cfg).await;
    let conn_token =
        sign_hs256(SECRET, &Claims { channels: vec!["vip:granted".into()], ..claims("alice", 60) }).unwrap();
    let mut c = TestClient::new(&srv.url(), TestClient::config("p", &conn_token, Encoding::Json));
    c.connect().await;
    assert!(c.connected().await);
    let sub_token = |user: &str, channel: &str| {
        let exp = Some(now() + 60);
        sign_subscription_hs256(SECRET, &SubscriptionClaims { sub: user.into(), channel: channel.into(), exp }).unwrap()
    };
    let t = c.now();
    c.session.subscribe(t, "vip:none", ferry_core::frame::Qos::AtLeastOnce);
    c.session.subscribe_with_token(
        t,
        "vip:other",
        ferry_core::frame::Qos::AtLeastOnce,
        sub_token("mallory", "vip:other"),
    );
    c.session.subscribe_with_token(
        t,
        "vip:wrong",
        ferry_core::frame::Qos::AtLeastOnce,
        sub_token("alice", "vip:elsewhere"),
    );
    c.session.subscribe_with_token(t, "vip:ok", ferry_core::frame::Qos::AtLeastOnce, sub_token("alice", "vip:ok"));
    c.session.subscribe(t, "vip:granted", ferry_core::frame::Qos::AtLeastOnce);
    c.run_for(Duration::from_millis(1)).await;
    let settled = |c: &TestClient| {
        c.events.iter().filter(|e| matches!(e, Event::Subscribed { .. } | Event::SubscribeFailed { .. })).count() == 5
    };
    assert!(c.run_until(T, settled).await);
    let mut failed: Vec<(String, u16)> = c
        .events
        .iter()
        .filter_map(|e| match e {
            Event::SubscribeFailed { channel, error } => Some((channel.clone(), error.code)),
            _ => None,
        })
        .collect();
    failed.sort();
    assert_eq!(failed, vec![("vip:none".into(), 103), ("vip:other".into(), 103), ("vip:wrong".into(), 103)]);
    let mut ok: Vec<String> = c
        .events
        .iter()
        .filter_map(|e| if let Event::Subscribed { channel, .. } = e { Some(channel.clone()) } else { None })
        .collect();
    ok.sort();
    assert_eq!(ok, ["vip:granted", "vip:ok"]);
}

#[tokio::test]
async fn token_channels_are_subscribed_on_connect() {
    let srv = TestServer::start(config(AuthConfig { hmac_secret: Some(SECRET.into()), ..AuthConfig::default() })).await;
    let token = sign_hs256(
        SECRET,
        &Claims { channels: vec!["feed:news".into(), "bad name".into(), "#user:bob".into()], ..claims("bob", 60) },
    )
    .unwrap();
    // Bob's app never calls subscribe: the token's channels are enough.
    let mut bob = TestClient::new(&srv.url(), TestClient::config("b", &token, Encoding::Binary));
    bob.connect().await;
    let subscribed = |c: &TestClient| {
        let mut chans: Vec<&str> = c
            .events
            .iter()
            .filter_map(|e| if let Event::Subscribed { channel, .. } = e { Some(channel.as_str()) } else { None })
            .collect();
        chans.sort();
        chans == ["#user:bob", "feed:news"]
    };
    assert!(bob.run_until(T, subscribed).await, "events: {:?}", bob.events);
    let alice_token = sign_hs256(SECRET, &claims("alice", 60)).unwrap();
    let mut alice = TestClient::new(&srv.url(), TestClient::config("a", &alice_token, Encoding::Json));
    alice.connect().await;
    assert!(alice.connected().await);
    for i in 0..3u8 {
        alice.publish("feed:news", vec![i], ferry_core::frame::Qos::AtLeastOnce).await;
    }
    assert!(bob.run_until(T, |c| c.offsets("feed:news").len() == 3).await);
    assert_eq!(bob.offsets("feed:news"), vec![1, 2, 3]);
    // An ordinary subscription: durable, so a restored session resubscribes it itself.
    assert!(bob.session.snapshot().subs.iter().any(|s| s.channel == "feed:news"));
}

/// A JWKS endpoint serving `body`; `fetches` counts the answers.
async fn jwks_server(body: std::sync::Arc<std::sync::Mutex<String>>) -> (String, tokio::sync::watch::Receiver<usize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/.well-known/jwks.json", l.local_addr().unwrap());
    let (f, fetches) = tokio::sync::watch::channel(0usize);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 1024];
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            let b = body.lock().unwrap().clone();
            // Chunked, as many real servers answer.
            let resp = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{b}\r\n0\r\n\r\n",
                b.len()
            );
            let _ = s.write_all(resp.as_bytes()).await;
            let _ = s.shutdown().await;
            f.send_modify(|n| *n += 1);
        }
    });
    (url, fetches)
}

#[tokio::test]
async fn jwks_keys_by_kid_with_rotation_and_no_confusion() {
    let read = |n: &str| std::fs::read_to_string(fixture(n)).unwrap();
    let body = std::sync::Arc::new(std::sync::Mutex::new(read("jwks_rsa.json")));
    let (url, fetches) = jwks_server(body.clone()).await;
    let srv = TestServer::start(config(AuthConfig { jwks_url: Some(url), ..AuthConfig::default() })).await;
    let url = srv.url();
    let rsa = EncodingKey::from_rsa_pem(read("rsa_private.pem").as_bytes()).unwrap();
    let ec = EncodingKey::from_ec_pem(read("ec_private.pem").as_bytes()).unwrap();
    let with_kid = |alg: Algorithm, kid: &str, key: &EncodingKey, user: &str| {
        let mut h = Header::new(alg);
        h.kid = Some(kid.into());
        jsonwebtoken::encode(&h, &claims(user, 60), key).unwrap()
    };
    // A key of the set, chosen by kid.
    assert_eq!(try_token(&url, &with_kid(Algorithm::RS256, "rsa-1", &rsa, "u1")).await, None);
    // No kid: tried against the set's keys of that algorithm.
    assert_eq!(try_token(&url, &sign(Algorithm::RS256, &rsa, &claims("u2", 60))).await, None);
    // A kid the server has not seen: refused as temporary (3001, the client
    // reconnects) and the set is refetched; after rotation it passes.
    let rotated = with_kid(Algorithm::ES256, "ec-1", &ec, "u3");
    *body.lock().unwrap() = read("jwks_rsa_ec.json");
    let before = *fetches.borrow();
    let mut c = TestClient::new(&url, TestClient::config("r", &rotated, Encoding::Json));
    c.connect().await;
    assert!(c.run_until(T, |c| c.session.is_connected()).await, "{:?}", c.events);
    let first = c.events.iter().find_map(|e| if let Event::Disconnected { code, .. } = e { Some(*code) } else { None });
    assert_eq!(first, Some(CloseCode::ServerError as u16), "refused as temporary until the refetch");
    assert!(*fetches.borrow() > before, "the unknown kid triggered a refetch");
    // The kid of an RSA key with another algorithm: refused for good.
    assert_eq!(
        try_token(&url, &with_kid(Algorithm::ES256, "rsa-1", &ec, "u4")).await,
        Some(CloseCode::Unauthorized as u16)
    );
    // The set's symmetric key is ignored: HS256 is not accepted from a URL.
    let hs = with_kid(Algorithm::HS256, "hmac-1", &EncodingKey::from_secret(b"secret"), "u5");
    assert_eq!(try_token(&url, &hs).await, Some(CloseCode::Unauthorized as u16));
    // `alg: none` never.
    let none = format!(
        "{}.{}.",
        ferry_core::base64::encode(br#"{"alg":"none","typ":"JWT","kid":"rsa-1"}"#).replace(['+', '/', '='], ""),
        ferry_core::base64::encode(serde_json::to_string(&claims("u6", 60)).unwrap().as_bytes()).replace('=', "")
    );
    assert_eq!(try_token(&url, &none).await, Some(CloseCode::Unauthorized as u16));
}
