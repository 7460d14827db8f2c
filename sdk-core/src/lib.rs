//! # ferry-core
//!
//! The sans-IO heart of Ferry: wire frames and codec ([`frame`], [`codec`]),
//! payload compression ([`compress`]), and the two session state machines,
//! [`client::ClientSession`] and [`server::ServerSession`]. Nothing here reads
//! a clock, draws ambient randomness, or touches a socket: hosts feed inputs
//! with the current [`Instant`] and drain outputs until they get a timeout.
//!
//! ```
//! use ferry_core::client::{ClientConfig, ClientSession, Output};
//! use ferry_core::Instant;
//!
//! let mut s = ClientSession::new(ClientConfig::new("device-1"), 42);
//! let now = Instant::from_millis(0);
//! s.connect(now);
//! // Drain: the session asks the host to open a transport, then waits.
//! loop {
//!     match s.poll_output(now) {
//!         Output::Open { conn, endpoint } => { /* open a WebSocket to urls[endpoint]; report TransportOpened{conn} */ let _ = (conn, endpoint); }
//!         Output::Timeout(_next) => break,
//!         _ => {}
//!     }
//! }
//! ```

pub mod base64;
pub mod client;
pub mod codec;
pub mod compress;
pub mod error;
pub mod frame;
pub mod rng;
pub mod server;
mod time;
mod timer;

pub use error::{CloseCode, ErrorCode, MESSAGE_ID_REUSED};
pub use time::Instant;
