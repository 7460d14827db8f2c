//! # ferry-ffi
//!
//! Ferry's mobile SDK: [`ferry_client`] exposed through UniFFI to Kotlin
//! (Android, JVM), Swift (iOS, macOS) and Python. This crate only converts
//! types and threads; every protocol rule stays in ferry-core, so apps get
//! the same guarantees (QoS 1/2 outbox, recovery, dedup) as Rust ones.
//!
//! The shape, as a Python app sees it (`cargo xtask bindings` generates it):
//!
//! ```text
//! client = FerryClient("ws://127.0.0.1:8000/ws", ClientConfig(device_id="phone-1", token="alice",
//!                      storage_dir=app_dir), None)
//! handle = client.subscribe("chat:lobby", SubscribeOptions(qos=Qos.EXACTLY_ONCE, token=None), listener)
//! await client.connect()
//! ack = await client.publish("chat:lobby", b"hi", Qos.EXACTLY_ONCE)   # ack.offset
//! handle.cancel()                      # or drop it
//! await client.close()                # flushes the outbox (1 s by default)
//! ```
//!
//! Threads: the client's driver runs on a small tokio runtime owned by this
//! library. Listener callbacks run on one dedicated thread per client, one
//! at a time and in order, so a slow callback never stalls the connection
//! and the app never sees two callbacks of one client at once.

mod client;
mod error;
mod types;

pub use client::{FerryClient, StateListener, SubscriptionListener, TaskHandle, TokenProvider};
pub use error::FerryError;
pub use types::*;

uniffi::setup_scaffolding!("ferry");

/// The runtime every client's driver task runs on. Design: one shared
/// runtime, not one per client, because a mobile app has few clients and
/// threads are costly there; two workers keep one slow task from
/// starving the others.
pub(crate) fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("ferry-ffi")
            .enable_all()
            .build()
            .expect("the ferry-ffi tokio runtime could not start")
    })
}
