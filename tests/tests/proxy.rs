//! The fault proxy itself, against a plain TCP echo server: the faults the
//! scenarios rely on behave as documented.

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ferry_e2e::FaultProxy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const T: Duration = Duration::from_secs(5);

async fn echo_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

async fn round_trip(s: &mut TcpStream, msg: &[u8]) -> std::io::Result<Vec<u8>> {
    s.write_all(msg).await?;
    let mut buf = vec![0; msg.len()];
    s.read_exact(&mut buf).await?;
    Ok(buf)
}

#[tokio::test]
async fn forwards_delays_holds_and_resets() {
    let proxy = FaultProxy::start(echo_server().await).await.unwrap();
    let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
    assert_eq!(round_trip(&mut s, b"hello").await.unwrap(), b"hello");
    // Counted just after each write, so possibly a moment after the echo arrived.
    let counted = ferry_e2e::eventually(T, || async { (proxy.bytes() == (5, 5)).then_some(()) }).await;
    assert!(counted.is_some(), "bytes {:?}", proxy.bytes());

    // Latency applies in each direction.
    proxy.set_latency(Duration::from_millis(50));
    let t = Instant::now();
    assert_eq!(round_trip(&mut s, b"slow").await.unwrap(), b"slow");
    assert!(t.elapsed() >= Duration::from_millis(100), "round trip took {:?}", t.elapsed());
    proxy.heal();

    // A blackhole holds bytes without an error on either side, and
    // delivers them once healed.
    proxy.blackhole(true);
    s.write_all(b"held").await.unwrap();
    let mut buf = [0u8; 4];
    assert!(tokio::time::timeout(Duration::from_millis(300), s.read_exact(&mut buf)).await.is_err(), "nothing passes");
    proxy.heal();
    tokio::time::timeout(T, s.read_exact(&mut buf)).await.unwrap().unwrap();
    assert_eq!(&buf, b"held");

    // A cut resets the connection; the proxy keeps accepting new ones.
    assert_eq!(proxy.cut_all(), 1);
    let err = tokio::time::timeout(T, round_trip(&mut s, b"gone")).await.unwrap().unwrap_err();
    assert!(matches!(err.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe), "{err:?}");
    let mut s2 = TcpStream::connect(proxy.addr()).await.unwrap();
    assert_eq!(round_trip(&mut s2, b"again").await.unwrap(), b"again");
    assert_eq!((proxy.cuts(), proxy.accepted()), (1, 2));
}

#[tokio::test]
async fn a_dead_upstream_looks_like_a_refused_connection() {
    // Bound and released: nothing listens there.
    let proxy = FaultProxy::start(ferry_e2e::free_addr()).await.unwrap();
    let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
    let err = tokio::time::timeout(T, round_trip(&mut s, b"anyone?")).await.unwrap();
    assert!(err.is_err(), "{err:?}");
}

#[tokio::test]
async fn random_cuts_reset_each_connection_once() {
    let proxy = FaultProxy::start(echo_server().await).await.unwrap();
    let mut conns = Vec::new();
    for _ in 0..3 {
        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(round_trip(&mut s, b"up").await.unwrap(), b"up");
        conns.push(s);
    }
    let cutter = proxy.cut_randomly(7, Duration::from_millis(5), Duration::from_millis(20));
    let all_cut = ferry_e2e::eventually(T, || async { (proxy.live() == 0).then_some(()) }).await;
    drop(cutter);
    assert!(all_cut.is_some(), "{} still live", proxy.live());
    assert_eq!(proxy.cuts(), 3, "each cut once");
    for mut s in conns {
        assert!(tokio::time::timeout(T, round_trip(&mut s, b"x")).await.unwrap().is_err());
    }
}
