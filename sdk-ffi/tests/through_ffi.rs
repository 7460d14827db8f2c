//! The FFI layer driven from Rust (UniFFI foreign traits can be implemented
//! in Rust too) against the real `ferry` server: the conversions, the
//! callback thread and the handles, without any generated bindings. The
//! bindings' own end-to-end tests run in `sdk-ffi/test.sh`.

use std::sync::{mpsc, Arc};
use std::time::Duration;

use ferry_e2e::{FerryServer, Settings};
use ferry_ffi::{
    FerryClient, FerryError, FfiClientConfig, FfiClientInfo, FfiConnectionState, FfiGap, FfiPublication, FfiQos,
    FfiStreamPosition, FfiSubscribeOptions, SubscriptionListener,
};

const T: Duration = Duration::from_secs(20);

#[derive(Debug)]
enum Seen {
    State(FfiConnectionState),
    Subscribed,
    Publication(FfiPublication, std::thread::ThreadId),
    Other,
}

struct Listener(std::sync::Mutex<mpsc::Sender<Seen>>);

impl Listener {
    fn send(&self, s: Seen) {
        let _ = self.0.lock().unwrap().send(s);
    }
}

impl SubscriptionListener for Listener {
    fn on_state(&self, state: FfiConnectionState) {
        self.send(Seen::State(state))
    }
    fn on_subscribed(&self, _: FfiStreamPosition, _: bool) {
        self.send(Seen::Subscribed)
    }
    fn on_publication(&self, p: FfiPublication) {
        self.send(Seen::Publication(p, std::thread::current().id()))
    }
    fn on_join(&self, _: FfiClientInfo) {
        self.send(Seen::Other)
    }
    fn on_leave(&self, _: FfiClientInfo) {
        self.send(Seen::Other)
    }
    fn on_gap(&self, _: FfiGap) {
        self.send(Seen::Other)
    }
    fn on_ended(&self, _: u16, _: String) {
        self.send(Seen::Other)
    }
}

fn config(device: &str, user: &str) -> FfiClientConfig {
    FfiClientConfig { device_id: device.into(), token: Some(user.into()), ..FfiClientConfig::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_publish_receive_and_cancel_through_the_ffi_types() {
    let srv = FerryServer::start(&Settings::default()).await;
    let alice = FerryClient::new(srv.url(), config("ffi-alice", "alice"), None).unwrap();
    let (tx, rx) = mpsc::channel();
    let handle = alice
        .subscribe(
            "chat:ffi".into(),
            FfiSubscribeOptions { qos: FfiQos::ExactlyOnce, token: None },
            Arc::new(Listener(std::sync::Mutex::new(tx))),
        )
        .unwrap();
    // Blocking receives run off the test's runtime threads.
    let next = move || rx.recv_timeout(T).expect("a listener call in time");
    let (first, next) = tokio::task::spawn_blocking(move || (next(), next)).await.unwrap();
    assert!(matches!(first, Seen::State(FfiConnectionState::Idle)), "current state first, got {first:?}");

    alice.connect().await.unwrap();
    let bob = FerryClient::new(srv.url(), config("ffi-bob", "bob"), None).unwrap();
    bob.connect().await.unwrap();
    let (seen, next) = tokio::task::spawn_blocking(move || {
        let mut seen = Vec::new();
        // Bounded: every receive has a deadline and the loop stops at the subscription.
        for _ in 0..100 {
            let s = next();
            let done = matches!(s, Seen::Subscribed);
            seen.push(s);
            if done {
                break;
            }
        }
        (seen, next)
    })
    .await
    .unwrap();
    assert!(matches!(seen.last(), Some(Seen::Subscribed)), "subscribed: {seen:?}");

    let n = 10;
    let mut acks = Vec::new();
    for i in 0..n {
        acks.push(bob.publish("chat:ffi".into(), format!("p{i}").into_bytes(), FfiQos::ExactlyOnce).await.unwrap());
    }
    let got = tokio::task::spawn_blocking(move || {
        let mut got = Vec::new();
        for _ in 0..1000 {
            if got.len() == n {
                break;
            }
            if let Seen::Publication(p, thread) = next() {
                got.push((p, thread));
            }
        }
        got
    })
    .await
    .unwrap();
    let data: Vec<Vec<u8>> = got.iter().map(|(p, _)| p.data.clone()).collect();
    assert_eq!(data, (0..n).map(|i| format!("p{i}").into_bytes()).collect::<Vec<_>>());
    assert_eq!(
        got.iter().map(|(p, _)| p.offset).collect::<Vec<_>>(),
        acks.iter().map(|a| a.offset).collect::<Vec<_>>()
    );
    assert!(got.iter().all(|(_, t)| *t == got[0].1), "one callback thread");
    assert_eq!(got[0].0.publisher.as_ref().map(|p| p.user.as_str()), Some("bob"));

    let too_large = bob.publish("chat:ffi".into(), vec![0; 200_000], FfiQos::AtLeastOnce).await;
    assert!(matches!(too_large, Err(FerryError::TooLarge { size: 200_000, .. })), "{too_large:?}");

    assert!(handle.is_active());
    handle.cancel();
    assert!(!handle.is_active());
    let stats = bob.presence_stats("chat:ffi".into()).await.unwrap();
    assert!(stats.clients <= 1, "alice unsubscribed or leaving");
    assert_eq!(alice.close(1000).await, Vec::<String>::new());
    assert!(matches!(alice.publish("chat:ffi".into(), vec![1], FfiQos::AtLeastOnce).await, Err(FerryError::Closed)));
    bob.close(1000).await;
    println!("[ffi-rust] {n} QoS 2 publications through the FFI types, in order on one callback thread");
}

/// Blocks in `on_publication` until released, telling the test when it is inside.
struct Slow {
    inside: std::sync::Mutex<mpsc::Sender<()>>,
    release: std::sync::Mutex<mpsc::Receiver<()>>,
    finished: std::sync::atomic::AtomicBool,
}

impl SubscriptionListener for Slow {
    fn on_state(&self, _: FfiConnectionState) {}
    fn on_subscribed(&self, _: FfiStreamPosition, _: bool) {}
    fn on_publication(&self, _: FfiPublication) {
        if self.finished.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        let _ = self.inside.lock().unwrap().send(());
        let _ = self.release.lock().unwrap().recv_timeout(T);
        self.finished.store(true, std::sync::atomic::Ordering::SeqCst);
    }
    fn on_join(&self, _: FfiClientInfo) {}
    fn on_leave(&self, _: FfiClientInfo) {}
    fn on_gap(&self, _: FfiGap) {}
    fn on_ended(&self, _: u16, _: String) {}
}

/// A foreign runtime may exit right after `cancel` (Python aborts the
/// process when a callback enters the interpreter while it shuts down):
/// `cancel` returns only once the listener call in progress has returned
/// and the listener is released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_returns_after_the_listener_call_in_progress_and_releases_the_listener() {
    let srv = FerryServer::start(&Settings::default()).await;
    let alice = FerryClient::new(srv.url(), config("ffi-slow", "alice"), None).unwrap();
    let (inside_tx, inside_rx) = mpsc::channel();
    let (release_tx, release_rx) = mpsc::channel();
    let slow = Arc::new(Slow {
        inside: std::sync::Mutex::new(inside_tx),
        release: std::sync::Mutex::new(release_rx),
        finished: Default::default(),
    });
    let handle = alice
        .subscribe("chat:slow".into(), FfiSubscribeOptions { qos: FfiQos::AtLeastOnce, token: None }, slow.clone())
        .unwrap();
    alice.connect().await.unwrap();
    alice.publish("chat:slow".into(), b"x".to_vec(), FfiQos::AtLeastOnce).await.unwrap();
    let (cancelled_tx, cancelled_rx) = mpsc::channel();
    let slow2 = slow.clone();
    let waiter = tokio::task::spawn_blocking(move || {
        inside_rx.recv_timeout(T).expect("the listener is called");
        // Off the runtime, as a foreign thread calls it.
        let canceller = std::thread::spawn(move || {
            handle.cancel();
            let finished = slow2.finished.load(std::sync::atomic::Ordering::SeqCst);
            let _ = cancelled_tx.send(finished);
            handle
        });
        // While the call is in progress, cancel has not returned.
        let early = cancelled_rx.recv_timeout(Duration::from_millis(300));
        release_tx.send(()).unwrap();
        let finished = cancelled_rx.recv_timeout(T).ok();
        (early, finished, canceller.join().unwrap())
    });
    let (early, finished, handle) = waiter.await.unwrap();
    assert!(early.is_err(), "cancel returned while the listener call was running: {early:?}");
    assert_eq!(finished, Some(true), "cancel returned after the call finished");
    assert!(!handle.is_active());
    assert_eq!(Arc::strong_count(&slow), 1, "the listener is released once cancel returns");
    alice.close(1000).await;
}
