//! Rust values to plain JavaScript objects and back. Event objects carry a
//! `type` field the JavaScript wrapper dispatches on.

use std::time::Duration;

use ferry_core::client::{CallError, ConnectionState, Event, GapReason, PublishError, Snapshot};
use ferry_core::frame::{ClientInfo, ErrorReply, Publication, ReplyBody, StreamPosition};
use js_sys::{Array, Object, Reflect, Uint8Array};
use wasm_bindgen::prelude::*;

/// Reads optional fields of an options object.
pub struct Opts(pub JsValue);

impl Opts {
    pub fn get(&self, key: &str) -> Option<JsValue> {
        if !self.0.is_object() {
            return None;
        }
        Reflect::get(&self.0, &key.into()).ok().filter(|v| !v.is_undefined() && !v.is_null())
    }
    pub fn string(&self, key: &str) -> Option<String> {
        self.get(key).and_then(|v| v.as_string())
    }
    pub fn bool(&self, key: &str) -> Option<bool> {
        self.get(key).and_then(|v| v.as_bool())
    }
    pub fn f64(&self, key: &str) -> Option<f64> {
        self.get(key).and_then(|v| v.as_f64()).filter(|v| v.is_finite() && *v >= 0.0)
    }
    pub fn u32(&self, key: &str) -> Option<u32> {
        self.f64(key).map(|v| v.min(u32::MAX as f64) as u32)
    }
    pub fn ms(&self, key: &str) -> Option<Duration> {
        self.f64(key).map(|v| Duration::from_millis(v as u64))
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Saved {
    v: u32,
    device_id: String,
    snapshot: Snapshot,
}

/// Parse what the storage adapter returned: `(device id, snapshot)`.
pub fn parse_saved(text: &str) -> Result<(String, Snapshot), String> {
    let s: Saved = serde_json::from_str(text).map_err(|e| e.to_string())?;
    if s.v != 1 {
        return Err(format!("unknown storage version {}", s.v));
    }
    Ok((s.device_id, s.snapshot))
}

/// The text given to the storage adapter.
pub fn saved_text(v: u32, device_id: &str, snapshot: &Snapshot) -> String {
    #[derive(serde::Serialize)]
    struct SavedRef<'a> {
        v: u32,
        device_id: &'a str,
        snapshot: &'a Snapshot,
    }
    // Serialising plain data to a string cannot fail.
    serde_json::to_string(&SavedRef { v, device_id, snapshot }).expect("snapshot serialises")
}

struct Obj(Object);

impl Obj {
    fn new() -> Obj {
        Obj(Object::new())
    }
    fn typed(t: &str) -> Obj {
        Obj::new().set("type", t)
    }
    fn set(self, key: &str, value: impl Into<JsValue>) -> Obj {
        // Setting a property on a fresh plain object cannot fail.
        let _ = Reflect::set(&self.0, &key.into(), &value.into());
        self
    }
    fn done(self) -> JsValue {
        self.0.into()
    }
}

fn bytes(b: &[u8]) -> JsValue {
    Uint8Array::from(b).into()
}

fn position(p: &StreamPosition) -> JsValue {
    Obj::new().set("epoch", p.epoch.as_str()).set("offset", p.offset as f64).done()
}

fn client_info(c: &ClientInfo) -> JsValue {
    let info = c.info.as_ref().map(|b| bytes(&b.0)).unwrap_or(JsValue::NULL);
    Obj::new().set("client", c.client.as_str()).set("user", c.user.as_str()).set("info", info).done()
}

fn publication(p: &Publication) -> Obj {
    Obj::new()
        .set("channel", p.channel.as_str())
        .set("epoch", p.epoch.as_str())
        .set("offset", p.offset as f64)
        .set("messageId", p.message_id.as_str())
        .set("qos", p.qos.as_u8())
        .set("publisher", p.publisher.as_ref().map(client_info).unwrap_or(JsValue::NULL))
        .set("timeMs", p.time_ms as f64)
        .set("data", bytes(&p.payload.data.0))
}

fn server_error(code: &str, e: &ErrorReply) -> JsValue {
    Obj::new()
        .set("code", code)
        .set("message", e.message.as_str())
        .set("serverCode", e.code)
        .set("temporary", e.temporary)
        .done()
}

fn error(code: &str, message: &str) -> JsValue {
    Obj::new().set("code", code).set("message", message).done()
}

/// A publish error as `{ code, message, serverCode?, temporary? }`.
pub fn publish_error(e: &PublishError) -> JsValue {
    let msg = e.to_string();
    match e {
        PublishError::OutboxFull => error("outbox_full", &msg),
        PublishError::Expired => error("expired", &msg),
        PublishError::TooLarge { .. } => error("too_large", &msg),
        PublishError::NotConnected => error("not_connected", &msg),
        PublishError::ConnectionLost => error("connection_lost", &msg),
        PublishError::Closed => error("closed", &msg),
        PublishError::Rejected(r) => server_error("rejected", r),
        _ => error("unknown", &msg),
    }
}

/// A call error as `{ code, message, serverCode?, temporary? }`.
pub fn call_error(e: &CallError) -> JsValue {
    let msg = e.to_string();
    match e {
        CallError::NotConnected => error("not_connected", &msg),
        CallError::ConnectionLost => error("connection_lost", &msg),
        CallError::Server(r) => server_error("server", r),
        _ => error("unknown", &msg),
    }
}

/// `{ type, message }`.
pub fn simple(t: &str, message: &str) -> JsValue {
    Obj::typed(t).set("message", message).done()
}

/// A `state` event object.
pub fn state(s: &ConnectionState) -> JsValue {
    let o = Obj::typed("state");
    match s {
        ConnectionState::Idle => o.set("state", "idle"),
        ConnectionState::WaitingToken => o.set("state", "waiting_token"),
        ConnectionState::Connecting => o.set("state", "connecting"),
        ConnectionState::Connected => o.set("state", "connected"),
        ConnectionState::Backoff { attempt, delay_ms } => {
            o.set("state", "backoff").set("attempt", *attempt).set("delayMs", *delay_ms as f64)
        }
        ConnectionState::Offline => o.set("state", "offline"),
        ConnectionState::Closed { code, reason } => {
            o.set("state", "closed").set("code", *code).set("reason", reason.as_str())
        }
    }
    .done()
}

fn reply(body: &ReplyBody) -> JsValue {
    match body {
        ReplyBody::History { publications, top } => {
            let list: Array = publications.iter().map(|p| publication(p).done()).collect();
            Obj::new().set("publications", list).set("top", position(top)).done()
        }
        ReplyBody::Presence { clients } => clients.iter().map(client_info).collect::<Array>().into(),
        ReplyBody::PresenceStats { clients, users } => Obj::new().set("clients", *clients).set("users", *users).done(),
        _ => JsValue::NULL,
    }
}

/// Any app event (not `Persist`, which the driver keeps) as an object.
pub fn event(e: Event) -> JsValue {
    match e {
        Event::State(s) => state(&s),
        Event::Disconnected { code, reason, reconnect } => {
            Obj::typed("disconnected").set("code", code).set("reason", reason).set("reconnect", reconnect).done()
        }
        Event::Subscribed { channel, qos, position: p, recovered } => Obj::typed("subscribed")
            .set("channel", channel)
            .set("qos", qos.as_u8())
            .set("position", position(&p))
            .set("recovered", recovered)
            .done(),
        Event::Gap { channel, from, to, reason } => Obj::typed("gap")
            .set("channel", channel)
            .set("from", from.as_ref().map(position).unwrap_or(JsValue::NULL))
            .set("to", position(&to))
            .set(
                "reason",
                match reason {
                    GapReason::EpochChanged => "epoch_changed",
                    GapReason::NotRetained => "not_retained",
                },
            )
            .done(),
        Event::SubscribeFailed { channel, error } => {
            Obj::typed("subscribe_failed").set("channel", channel).set("error", server_error("server", &error)).done()
        }
        Event::Unsubscribed { channel, code, reason } => {
            Obj::typed("unsubscribed").set("channel", channel).set("code", code).set("reason", reason).done()
        }
        Event::Publication(p) => publication(&p).set("type", "publication").done(),
        Event::Join { channel, info } => {
            Obj::typed("join").set("channel", channel).set("info", client_info(&info)).done()
        }
        Event::Leave { channel, info } => {
            Obj::typed("leave").set("channel", channel).set("info", client_info(&info)).done()
        }
        Event::PublishAcked { message_id, channel, position: p, duplicate } => Obj::typed("ack")
            .set("messageId", message_id)
            .set("channel", channel)
            .set("epoch", p.epoch.as_str())
            .set("offset", p.offset as f64)
            .set("duplicate", duplicate)
            .done(),
        Event::PublishFailed { message_id, channel, error } => Obj::typed("publish_failed")
            .set("messageId", message_id)
            .set("channel", channel)
            .set("error", publish_error(&error))
            .done(),
        Event::CallResult { call, result } => {
            let o = Obj::typed("call").set("call", call as f64);
            match result {
                Ok(body) => o.set("ok", true).set("value", reply(&body)),
                Err(e) => o.set("ok", false).set("error", call_error(&e)),
            }
            .done()
        }
        Event::TokenRequested => Obj::typed("token").done(),
        Event::Error(message) => simple("error", &message),
        Event::Persist(_) => JsValue::NULL,
        // Event is not exhaustive across core versions.
        #[allow(unreachable_patterns)]
        _ => simple("error", "unknown event"),
    }
}

#[cfg(test)]
mod tests {
    use ferry_core::client::{OutboxRecord, SubRecord};
    use ferry_core::frame::Qos;
    use ferry_core::Instant;

    use super::*;

    #[test]
    fn saved_state_round_trips() {
        let snap = Snapshot {
            nonce: 7,
            next_seq: 3,
            outbox: vec![OutboxRecord {
                message_id: "d:7:2".into(),
                channel: "room".into(),
                qos: Qos::ExactlyOnce,
                data: vec![0, 255, 10],
                expires_at: Instant::from_millis(99),
                stored: None,
            }],
            subs: vec![SubRecord {
                channel: "room".into(),
                qos: Qos::AtLeastOnce,
                position: Some(StreamPosition { epoch: "e1".into(), offset: 4 }),
                seen: vec!["a".into(), "b".into()],
            }],
            seen_cap: 1024,
        };
        let text = saved_text(1, "dev-1", &snap);
        assert_eq!(parse_saved(&text), Ok(("dev-1".to_string(), snap)));
    }

    #[test]
    fn unknown_versions_and_garbage_are_refused() {
        let text = saved_text(2, "d", &Snapshot::default());
        assert!(parse_saved(&text).unwrap_err().contains("version"));
        assert!(parse_saved("{not json").is_err());
    }
}
