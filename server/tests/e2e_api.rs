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

/// Check `v` against an OpenAPI schema of docs/openapi.json: types, required
/// fields present, no undocumented field. Records `Schema.field` for every
/// documented field seen, so the caller can check that each one occurs.
fn conforms(spec: &Value, schema: &Value, v: &Value, at: &str, seen: &mut std::collections::BTreeSet<String>) {
    let (name, schema) = match schema["$ref"].as_str() {
        Some(r) => {
            let name = r.rsplit('/').next().unwrap();
            (name.to_string(), &spec["components"]["schemas"][name])
        }
        None => (at.to_string(), schema),
    };
    assert!(!schema.is_null(), "{at}: dangling schema {name}");
    if v.is_null() {
        assert!(schema["nullable"] == json!(true), "{at}: null where {name} is not nullable");
        return;
    }
    match schema["type"].as_str() {
        Some("integer") => assert!(v.is_u64() || v.is_i64(), "{at}: {v} is not an integer"),
        Some("string") => assert!(v.is_string(), "{at}: {v} is not a string"),
        Some("boolean") => assert!(v.is_boolean(), "{at}: {v} is not a boolean"),
        Some("array") => {
            let items = v.as_array().unwrap_or_else(|| panic!("{at}: {v} is not an array"));
            for (i, item) in items.iter().enumerate() {
                conforms(spec, &schema["items"], item, &format!("{at}[{i}]"), seen);
            }
        }
        Some("object") => {
            let obj = v.as_object().unwrap_or_else(|| panic!("{at}: {v} is not an object"));
            let props = schema["properties"].as_object();
            for f in schema["required"].as_array().into_iter().flatten() {
                let f = f.as_str().unwrap();
                assert!(obj.contains_key(f), "{at}: documented required field {name}.{f} missing in {v}");
            }
            let open = schema["additionalProperties"] == json!(true);
            for (k, fv) in obj {
                match props.and_then(|p| p.get(k)) {
                    Some(fs) => {
                        seen.insert(format!("{name}.{k}"));
                        conforms(spec, fs, fv, &format!("{at}.{k}"), seen);
                    }
                    None => assert!(open, "{at}: field {k:?} is returned but not documented in {name}: {v}"),
                }
            }
        }
        Some(other) => panic!("{at}: unexpected type {other}"),
        None => {} // any value
    }
}

/// Every field of every schema reachable from `schema`.
fn documented(spec: &Value, schema: &Value, out: &mut std::collections::BTreeSet<String>) {
    let (name, schema) = match schema["$ref"].as_str() {
        Some(r) => {
            let name = r.rsplit('/').next().unwrap();
            (name, &spec["components"]["schemas"][name])
        }
        None => ("", schema),
    };
    if let Some(props) = schema["properties"].as_object() {
        for (k, fs) in props {
            if !name.is_empty() && schema["additionalProperties"] != json!(true) && out.insert(format!("{name}.{k}")) {
                documented(spec, fs, out);
            }
        }
    }
    if !schema["items"].is_null() {
        documented(spec, &schema["items"], out);
    }
}

#[tokio::test]
async fn every_documented_route_answers_as_documented() {
    use std::collections::BTreeSet;
    let mut cfg = test_config();
    cfg.api.keys = vec!["k-doc".into()];
    let srv = TestServer::start_with_api(cfg).await;
    let api = srv.api.unwrap();
    let key = Some("k-doc");
    let spec = spec();
    assert_eq!(spec["components"]["securitySchemes"]["apiKey"]["type"], "apiKey");
    assert_eq!(spec["components"]["securitySchemes"]["apiKey"]["name"], "Authorization");
    // A subscriber that published JSON, so history shows a publisher and
    // data, and presence lists a connection.
    let mut c = TestClient::new(&srv.url(), TestClient::config("phone", "u7", Encoding::Json));
    c.subscribe("news:eu", Qos::AtLeastOnce).await;
    c.connect().await;
    assert!(c.run_until(T, |c| c.events.iter().any(|e| matches!(e, Event::Subscribed { .. }))).await);
    c.publish("news:eu", br#"{"text":"from a client"}"#.to_vec(), Qos::AtLeastOnce).await;
    assert!(c.run_until(T, |c| c.session.outbox_len() == 0).await);

    let paths = spec["paths"].as_object().unwrap();
    assert!(paths.len() >= 12);
    let mut seen = BTreeSet::new();
    let mut all = BTreeSet::new();
    let response = |op: &Value, status: &str| op["responses"][status]["content"]["application/json"]["schema"].clone();
    for (path, ops) in paths {
        for (method, op) in ops.as_object().unwrap() {
            let m = method.to_uppercase();
            let example = &op["requestBody"]["content"]["application/json"]["example"];
            let body = if example.is_null() { None } else { Some(example) };
            let ok = response(op, "200");
            documented(&spec, &ok, &mut all);
            let (status, resp) = http(api, &m, path, body, key).await;
            assert_eq!(status, 200, "{method} {path}: {resp}");
            conforms(&spec, &ok, &resp, &format!("{method} {path}"), &mut seen);
            if op["security"] == json!([]) {
                continue; // open route (this document)
            }
            // Without the key: 401, as documented.
            let (status, resp) = http(api, &m, path, body, None).await;
            assert_eq!(status, 401, "{method} {path}: {resp}");
            conforms(&spec, &response(op, "401"), &resp, &format!("{method} {path} 401"), &mut seen);
            if method == "post" {
                let (status, resp) = http(api, &m, path, Some(&json!({"zzz": 1})), key).await;
                assert_eq!(status, 400, "{method} {path}: {resp}");
                conforms(&spec, &response(op, "400"), &resp, &format!("{method} {path} 400"), &mut seen);
            }
        }
    }
    // Answers whose optional fields the examples do not reach.
    let op = |path: &str| spec["paths"][path]["post"].clone();
    let extra = [
        ("/api/broadcast", json!({"channels": ["news:eu", "bad name"], "data": 1})),
        ("/api/batch", json!({"commands": [{"method": "nope", "params": {}}]})),
        ("/api/presence", json!({"channel": "news:eu", "limit": 1})),
    ];
    for (path, body) in extra {
        let (status, resp) = http(api, "POST", path, Some(&body), key).await;
        assert_eq!(status, 200, "{path}: {resp}");
        conforms(&spec, &response(&op(path), "200"), &resp, path, &mut seen);
    }
    let never: Vec<_> = all.difference(&seen).collect();
    assert!(never.is_empty(), "documented response fields never returned: {never:?}");
    // The served document is the committed one.
    let (_, served) = http(api, "GET", "/api/openapi.json", None, None).await;
    assert_eq!(served, spec);
    // An undocumented route does not exist.
    let (status, _) = http(api, "POST", "/api/drop_everything", Some(&json!({})), key).await;
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

/// The documented error envelope, exactly: `{"error": {"code", "message"}}`.
fn assert_envelope(what: &str, head: &str, body: &Value) -> (u64, String) {
    assert!(head.contains("content-type: application/json"), "{what}: not JSON: {head}");
    let obj = body.as_object().unwrap_or_else(|| panic!("{what}: not an object: {body}"));
    assert_eq!(obj.len(), 1, "{what}: {body}");
    let e = body["error"].as_object().unwrap_or_else(|| panic!("{what}: no error object: {body}"));
    assert_eq!(e.len(), 2, "{what}: {body}");
    let code = e["code"].as_u64().unwrap_or_else(|| panic!("{what}: code: {body}"));
    let message = e["message"].as_str().unwrap_or_else(|| panic!("{what}: message: {body}")).to_string();
    assert!(!message.is_empty(), "{what}");
    (code, message)
}

const JSON: &str = "Content-Type: application/json\r\n";

#[tokio::test]
async fn unknown_fields_are_refused_and_named_on_every_route() {
    let srv = TestServer::start_with_api(test_config()).await;
    let api = srv.api.unwrap();
    let spec = spec();
    let mut checked = 0;
    for (path, ops) in spec["paths"].as_object().unwrap() {
        let Some(op) = ops.get("post") else { continue };
        let mut body = op["requestBody"]["content"]["application/json"]["example"].clone();
        body["qoss"] = json!(1);
        let (status, head, resp) = http_raw(api, "POST", path, JSON, body.to_string().as_bytes()).await;
        assert_eq!(status, 400, "POST {path} with an unknown field: {resp}");
        let (code, message) = assert_envelope(path, &head, &resp);
        assert_eq!(code, 107);
        assert!(message.contains("qoss"), "POST {path}: the message names the field: {message}");
        checked += 1;
    }
    assert!(checked >= 9, "{checked} POST routes");
    // Nothing was published by the refused publishes.
    let (_, h) = http(api, "POST", "/api/history", Some(&json!({"channel": "news:eu"})), None).await;
    assert_eq!(h["publications"], json!([]), "{h}");
    // Inside a batch: the item with an unknown field gets its own error.
    let cmds = json!({"commands": [
        {"method": "publish", "params": {"channel": "news:eu", "data": 1, "qoss": 2}},
        {"method": "online", "params": {"users": []}, "extra": true},
        {"method": "online", "params": {"users": ["u1"]}},
    ]});
    let (status, r) = http(api, "POST", "/api/batch", Some(&cmds), None).await;
    assert_eq!(status, 200, "{r}");
    let replies = r["replies"].as_array().unwrap();
    assert_eq!(replies[0]["error"]["code"], 107, "{r}");
    assert!(replies[0]["error"]["message"].as_str().unwrap().contains("qoss"), "{r}");
    assert!(replies[1]["error"]["message"].as_str().unwrap().contains("extra"), "{r}");
    assert_eq!(replies[2]["result"]["online"], json!([]), "{r}");
}

#[tokio::test]
async fn every_api_error_is_the_json_envelope_with_the_right_status() {
    let mut cfg = test_config();
    cfg.api.keys = vec!["k-1".into()];
    let srv = TestServer::start_with_api(cfg).await;
    let api = srv.api.unwrap();
    let key = "Authorization: apikey k-1\r\n";
    let with_key = |extra: &str| format!("{key}{extra}");
    let good = br#"{"channel":"a:1","data":1}"#;
    // (what, path, headers, body, status, code)
    type Case<'a> = (&'a str, &'a str, String, Vec<u8>, u16, u64);
    let cases: Vec<Case> = vec![
        ("no key (checked before the body)", "/api/publish", JSON.to_string(), b"{oops".to_vec(), 401, 101),
        ("no Content-Type", "/api/publish", with_key(""), good.to_vec(), 415, 107),
        ("text/plain", "/api/publish", with_key("Content-Type: text/plain\r\n"), good.to_vec(), 415, 107),
        ("malformed JSON", "/api/publish", with_key(JSON), b"{\"channel\":".to_vec(), 400, 107),
        ("wrong type", "/api/publish", with_key(JSON), br#"{"channel":5,"data":1}"#.to_vec(), 400, 107),
        ("not an object", "/api/history", with_key(JSON), b"[1,2]".to_vec(), 400, 107),
        ("empty body", "/api/online", with_key(JSON), Vec::new(), 400, 107),
        ("batch not a list", "/api/batch", with_key(JSON), br#"{"commands":{}}"#.to_vec(), 400, 107),
        ("unknown route", "/api/nope", with_key(JSON), b"{}".to_vec(), 404, 104),
        ("too large", "/api/publish", with_key(JSON), vec![b' '; 5 << 20], 413, 112),
    ];
    for (what, path, headers, body, status, code) in cases {
        let (s, head, resp) = http_raw(api, "POST", path, &headers, &body).await;
        assert_eq!(s, status, "{what}: {resp}");
        let (c, _) = assert_envelope(what, &head, &resp);
        assert_eq!(c, code, "{what}: {resp}");
    }
    // A known route with the wrong method.
    let (s, head, resp) = http_raw(api, "GET", "/api/publish", key, b"").await;
    assert_eq!(s, 405, "{resp}");
    assert_envelope("wrong method", &head, &resp);
    // charset parameters are fine.
    let (s, _, resp) =
        http_raw(api, "POST", "/api/publish", &with_key("Content-Type: application/json; charset=utf-8\r\n"), good)
            .await;
    assert_eq!(s, 200, "{resp}");
    // Batch items of the wrong shape get an error each; the rest run.
    let cmds = br#"{"commands":["publish",{"params":{}},{"method":"history","params":{"channel":"a:1"}},{"method":"drop","params":{}}]}"#;
    let (s, _, r) = http_raw(api, "POST", "/api/batch", &with_key(JSON), cmds).await;
    assert_eq!(s, 200, "{r}");
    let replies = r["replies"].as_array().unwrap();
    assert_eq!(replies.len(), 4);
    for i in [0, 1, 3] {
        let (code, _) = assert_envelope(&format!("batch item {i}"), "content-type: application/json", &replies[i]);
        assert!(code == 107 || code == 104, "{r}");
    }
    assert_eq!(replies[2]["result"]["publications"].as_array().map(Vec::len), Some(1), "{r}");
}

#[tokio::test]
async fn an_api_key_reused_as_a_websocket_message_id_elsewhere_is_a_conflict() {
    use ferry_core::codec;
    use ferry_core::frame::*;
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let srv = TestServer::start_with_api(test_config()).await;
    let api = srv.api.unwrap();
    // A WebSocket client publishes with message id "order-1" into a:1.
    let mut ws = raw_ws(&srv.url(), Encoding::Json).await;
    let frames = [
        ClientFrame::Request {
            id: 1,
            cmd: Command::Connect(Connect {
                version: PROTOCOL_VERSION,
                token: "shop".into(),
                device_id: "d".into(),
                client: ClientVersion { name: "raw".into(), version: "0".into() },
                subs: vec![],
                compression: false,
            }),
        },
        ClientFrame::Request {
            id: 2,
            cmd: Command::Publish {
                channel: "a:1".into(),
                message_id: "order-1".into(),
                qos: Qos::AtLeastOnce,
                payload: Payload { z: false, data: Bytes(b"1".to_vec()) },
            },
        },
    ];
    // `connect` must travel alone, so one message per frame.
    for f in &frames {
        let mut msg = Vec::new();
        codec::encode_into(Encoding::Json, f, &mut msg);
        ws.send(Message::Text(String::from_utf8(msg).unwrap().into())).await.unwrap();
    }
    let mut stored = false;
    while !stored {
        let m = tokio::time::timeout(T, ws.next()).await.expect("answer").expect("open").expect("ok");
        assert!(!m.is_close(), "{m:?}");
        if let Message::Text(t) = m {
            for f in codec::decode_server(Encoding::Json, t.as_bytes(), 1 << 20).unwrap() {
                stored |= matches!(f, ServerFrame::Reply { id: 2, outcome: Outcome::Ok(ReplyBody::Published { .. }) });
            }
        }
    }
    // The backend uses the same string as an idempotency key for another
    // channel: 409, not a "duplicate" answer with a:1's offset.
    let body = json!({"channel": "b:1", "data": 1, "idempotency_key": "order-1"});
    let (s, r) = http(api, "POST", "/api/publish", Some(&body), None).await;
    assert_eq!(s, 409, "{r}");
    assert_eq!(r["error"]["code"], 107, "{r}");
    let (_, h) = http(api, "POST", "/api/history", Some(&json!({"channel": "b:1"})), None).await;
    assert_eq!(h["publications"], json!([]), "nothing stored on b:1: {h}");
}
