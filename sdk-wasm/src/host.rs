//! The JavaScript host: transport and storage adapters (duck-typed), the
//! global timer functions, the clock, and reading socket events.

use std::cell::Cell;

use ferry_core::Instant;
use js_sys::{ArrayBuffer, Function, Reflect, Uint8Array};
use wasm_bindgen::prelude::*;
use wasm_bindgen::JsCast;

#[wasm_bindgen]
extern "C" {
    /// A WebSocket-shaped connection: the global `WebSocket`, or what a
    /// transport adapter's `open` returns. Methods are looked up by name,
    /// so any object of this shape works.
    #[wasm_bindgen(typescript_type = "TransportSocket")]
    pub type Socket;

    #[wasm_bindgen(method, catch)]
    pub fn send(this: &Socket, data: &JsValue) -> Result<(), JsValue>;
    #[wasm_bindgen(method, catch, js_name = close)]
    pub fn close_with(this: &Socket, code: u16, reason: &str) -> Result<(), JsValue>;
    #[wasm_bindgen(method, getter)]
    pub fn protocol(this: &Socket) -> Option<String>;
    #[wasm_bindgen(method, setter)]
    pub fn set_onopen(this: &Socket, f: Option<&Function>);
    #[wasm_bindgen(method, setter)]
    pub fn set_onmessage(this: &Socket, f: Option<&Function>);
    #[wasm_bindgen(method, setter)]
    pub fn set_onclose(this: &Socket, f: Option<&Function>);
    #[wasm_bindgen(method, setter)]
    pub fn set_onerror(this: &Socket, f: Option<&Function>);

    /// A transport adapter: `open(url, protocol)` returns a [`Socket`].
    #[wasm_bindgen(typescript_type = "Transport")]
    pub type Transport;
    #[wasm_bindgen(method, catch)]
    pub fn open(this: &Transport, url: &str, protocol: &str) -> Result<Socket, JsValue>;

    /// A storage adapter: `save(key, text)` returns nothing or a promise.
    #[wasm_bindgen(typescript_type = "StorageAdapter")]
    pub type Storage;
    #[wasm_bindgen(method, catch)]
    pub fn save(this: &Storage, key: &str, value: &str) -> Result<JsValue, JsValue>;

    // Global functions, resolved on `globalThis`: present in browsers,
    // workers, Node and mini-programs alike (unlike `window`).
    #[wasm_bindgen(js_name = setTimeout)]
    pub fn set_timeout(f: &Function, ms: f64) -> JsValue;
    #[wasm_bindgen(js_name = clearTimeout)]
    pub fn clear_timeout(handle: &JsValue);
}

/// Milliseconds since the Unix epoch, advanced by `performance.now()` where
/// it exists (monotonic), else read from `Date.now()`; never going backwards.
/// Design: anchored to wall time so that outbox expiry instants saved by one
/// page load still mean the same after a reload.
pub struct Clock {
    perf: Option<(JsValue, Function)>,
    origin: f64,
    base: f64,
    last: Cell<u64>,
}

impl Clock {
    pub fn new() -> Clock {
        let perf =
            Reflect::get(&js_sys::global(), &"performance".into()).ok().filter(|p| p.is_object()).and_then(|p| {
                let f = Reflect::get(&p, &"now".into()).ok()?.dyn_into::<Function>().ok()?;
                Some((p, f))
            });
        let mut c = Clock { perf, origin: 0.0, base: js_sys::Date::now(), last: Cell::new(0) };
        c.origin = c.perf_now().unwrap_or(0.0);
        c
    }

    fn perf_now(&self) -> Option<f64> {
        let (p, f) = self.perf.as_ref()?;
        f.call0(p).ok().and_then(|v| v.as_f64())
    }

    pub fn now(&self) -> Instant {
        let t = match self.perf_now() {
            Some(p) => self.base + (p - self.origin),
            None => js_sys::Date::now(),
        };
        let t = (t.max(0.0) as u64).max(self.last.get());
        self.last.set(t);
        Instant::from_millis(t)
    }
}

/// Why a transport did not open.
pub enum OpenError {
    /// There is no transport here at all (a setup error: retrying cannot help).
    Unavailable(String),
    /// This attempt failed; a later one may succeed.
    Failed(JsValue),
}

/// The default transport: the global `WebSocket`, binary messages as ArrayBuffer.
pub fn open_websocket(url: &str, protocol: &str) -> Result<Socket, OpenError> {
    let ctor = Reflect::get(&js_sys::global(), &"WebSocket".into()).map_err(OpenError::Failed)?;
    if !ctor.is_function() {
        return Err(OpenError::Unavailable(
            "no global WebSocket here: pass a transport adapter (Node 20 needs --experimental-websocket)".into(),
        ));
    }
    let ws = web_sys::WebSocket::new_with_str(url, protocol).map_err(OpenError::Failed)?;
    ws.set_binary_type(web_sys::BinaryType::Arraybuffer);
    Ok(ws.unchecked_into())
}

/// A transport adapter's `open`: an error whose `code` is `no_transport` or
/// `config` (what `webSocketTransport` throws without a WebSocket) means
/// there is no transport here; anything else fails this attempt only.
pub fn open_with(t: &Transport, url: &str, protocol: &str) -> Result<Socket, OpenError> {
    t.open(url, protocol).map_err(|e| {
        let code = Reflect::get(&e, &"code".into()).ok().and_then(|c| c.as_string());
        match code.as_deref() {
            Some("no_transport" | "config") => OpenError::Unavailable(describe(&e)),
            _ => OpenError::Failed(e),
        }
    })
}

/// The bytes of a message event (`{ data: ArrayBuffer | string }`).
pub fn message_bytes(ev: &JsValue) -> Result<Vec<u8>, String> {
    let data = Reflect::get(ev, &"data".into()).unwrap_or(JsValue::UNDEFINED);
    if let Some(s) = data.as_string() {
        return Ok(s.into_bytes());
    }
    if data.is_instance_of::<ArrayBuffer>() {
        return Ok(Uint8Array::new(&data).to_vec());
    }
    if let Some(view) = data.dyn_ref::<Uint8Array>() {
        return Ok(view.to_vec());
    }
    Err("binary message is neither an ArrayBuffer nor a Uint8Array (set binaryType = 'arraybuffer')".into())
}

/// Code and reason of a close event (`{ code, reason }`).
pub fn close_info(ev: &JsValue) -> (Option<u16>, String) {
    let code = Reflect::get(ev, &"code".into()).ok().and_then(|c| c.as_f64()).map(|c| c as u16);
    let reason = Reflect::get(ev, &"reason".into()).ok().and_then(|r| r.as_string()).unwrap_or_default();
    (code, reason)
}

/// Some text for a thrown value or an error event.
pub fn describe(e: &JsValue) -> String {
    if let Some(s) = e.as_string() {
        return s;
    }
    for key in ["message", "errMsg", "reason", "type"] {
        if let Some(s) = Reflect::get(e, &key.into()).ok().and_then(|v| v.as_string()) {
            if !s.is_empty() {
                return s;
            }
        }
    }
    "unknown error".into()
}
