//! The backend HTTP API end to end, checked against docs/openapi.json.

mod common;

use std::time::Duration;

use common::*;
use ferry_core::client::Event;
use ferry_core::codec::Encoding;
use ferry_core::frame::Qos;
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(20);

fn spec() -> Value {
    serde_json::from_str(include_str!("../../docs/openapi.json")).unwrap()
}

#[tokio::test]
async fn every_documented_route_answers_as_documented() {
    let srv = TestServer::start_with_api(test_config()).await;
    let api = srv.api.unwrap();
    let spec = spec();
    let paths = spec["paths"].as_object().unwrap();
    assert!(paths.len() >= 12);
    for (path, ops) in paths {
        for (method, op) in ops.as_object().unwrap() {
            let example = &op["requestBody"]["content"]["application/json"]["example"];
            let body = if example.is_null() { None } else { Some(example) };
            let (status, resp) = http(api, &method.to_uppercase(), path, body, None).await;
            assert_eq!(status, 200, "{method} {path}: {resp}");
            let schema = &op["responses"]["200"]["content"]["application/json"]["schema"];
            for field in schema["required"].as_array().unwrap() {
                let f = field.as_str().unwrap();
                assert!(resp.get(f).is_some(), "{method} {path}: missing {f} in {resp}");
            }
        }
    }
    // The served document is the committed one.
    let (_, served) = http(api, "GET", "/api/openapi.json", None, None).await;
    assert_eq!(served, spec);
    // An undocumented route does not exist.
    let (status, _) = http(api, "POST", "/api/drop_everything", Some(&json!({})), None).await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn idempotency_keys_and_api_keys() {
    let mut cfg = test_config();
    cfg.api.keys = vec!["k-123".into()];
    let srv = TestServer::start_with_api(cfg).await;
    let api = srv.api.unwrap();
    let body = json!({"channel": "orders:1", "data": {"id": 7}, "idempotency_key": "order-7"});
    let (status, err) = http(api, "POST", "/api/publish", Some(&body), None).await;
    assert_eq!(status, 401, "{err}");
    let (status, _) = http(api, "POST", "/api/publish", Some(&body), Some("wrong")).await;
    assert_eq!(status, 401);
    let (s1, first) = http(api, "POST", "/api/publish", Some(&body), Some("k-123")).await;
    assert_eq!(s1, 200, "{first}");
    for _ in 0..9 {
        let (s, again) = http(api, "POST", "/api/publish", Some(&body), Some("k-123")).await;
        assert_eq!(s, 200);
        assert_eq!(again, first, "a retried publish returns the first result");
    }
    let changed = json!({"channel": "orders:1", "data": {"id": 8}, "idempotency_key": "order-7"});
    let (s, err) = http(api, "POST", "/api/publish", Some(&changed), Some("k-123")).await;
    assert_eq!(s, 409, "{err}");
    let (_, h) = http(api, "POST", "/api/history", Some(&json!({"channel": "orders:1"})), Some("k-123")).await;
    let pubs = h["publications"].as_array().unwrap();
    assert_eq!(pubs.len(), 1, "stored once: {h}");
    assert_eq!(pubs[0]["data"], json!({"id": 7}));
    // Bad input gets a clear error.
    let (s, err) =
        http(api, "POST", "/api/publish", Some(&json!({"channel": "bad name", "data": 1})), Some("k-123")).await;
    assert_eq!(s, 400);
    assert_eq!(err["error"]["code"], 102);
    let (s, _) = http(api, "POST", "/api/publish", Some(&json!({"channel": "a:1"})), Some("k-123")).await;
    assert_eq!(s, 400, "no data");
}

#[tokio::test]
async fn api_sees_and_controls_connections() {
    let srv = TestServer::start_with_api(test_config()).await;
    let api = srv.api.unwrap();
    let mut c = TestClient::new(&srv.url(), TestClient::config("phone", "u7", Encoding::Binary));
    c.subscribe("news:eu", Qos::AtLeastOnce).await;
    c.connect().await;
    assert!(c.run_until(T, |c| c.events.iter().any(|e| matches!(e, Event::Subscribed { .. }))).await);
    // Publish from the backend; the client receives it.
    let (s, r) = http(api, "POST", "/api/publish", Some(&json!({"channel": "news:eu", "data": "hi"})), None).await;
    assert_eq!(s, 200, "{r}");
    assert!(c.run_until(T, |c| c.received.get("news:eu").is_some_and(|v| v.len() == 1)).await);
    assert_eq!(c.received["news:eu"][0].2, b"\"hi\"");
    let (_, online) = http(api, "POST", "/api/online", Some(&json!({"users": ["u7", "u8"]})), None).await;
    assert_eq!(online["online"], json!(["u7"]));
    let (_, p) = http(api, "POST", "/api/presence", Some(&json!({"channel": "news:eu"})), None).await;
    assert_eq!(p["clients"][0]["user"], "u7");
    let (_, ch) = http(api, "GET", "/api/channels", None, None).await;
    assert_eq!(ch["channels"], json!(["news:eu"]));
    // Unsubscribe the user: the client is told and stops receiving.
    let (_, u) = http(api, "POST", "/api/unsubscribe", Some(&json!({"user": "u7", "channel": "news:eu"})), None).await;
    assert_eq!(u["unsubscribed"], 1);
    assert!(c.run_until(T, |c| c.events.iter().any(|e| matches!(e, Event::Unsubscribed { .. }))).await);
    // Disconnect the user for good: close 3503, no reconnect.
    let (_, d) = http(api, "POST", "/api/disconnect", Some(&json!({"user": "u7"})), None).await;
    assert_eq!(d["disconnected"], 1);
    assert!(
        c.run_until(T, |c| matches!(c.session.state(), ferry_core::client::ConnectionState::Closed { code: 3503, .. }))
            .await
    );
    let (_, online) = http(api, "POST", "/api/online", Some(&json!({"users": ["u7"]})), None).await;
    assert_eq!(online["online"], json!([]));
}
