//! The proxy against a local echo server: each fault does what it says, and heal undoes it.

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::time::Duration;

use muster_cluster::testing::Proxy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, timeout};

/// How long "nothing arrives" is watched for: long enough for loopback to deliver many times
/// over.
const QUIET: Duration = Duration::from_millis(300);

/// A server that sends back whatever it receives, on every connection.
async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    tokio::spawn(async move {
        loop {
            let (mut stream, _) = listener.accept().await.expect("accept");
            tokio::spawn(async move {
                let (mut read, mut write) = stream.split();
                let _ = tokio::io::copy(&mut read, &mut write).await;
            });
        }
    });
    addr
}

/// Sends `message` and waits for its echo, up to `limit`.
async fn round_trip(stream: &mut TcpStream, message: &[u8], limit: Duration) -> Result<(), String> {
    stream.write_all(message).await.map_err(|e| e.to_string())?;
    read_echo(stream, message, limit).await
}

async fn read_echo(stream: &mut TcpStream, message: &[u8], limit: Duration) -> Result<(), String> {
    let mut buf = vec![0; message.len()];
    match timeout(limit, stream.read_exact(&mut buf)).await {
        Ok(Ok(_)) if buf == message => Ok(()),
        Ok(Ok(_)) => Err(format!("echo was {buf:?}")),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timed out".to_owned()),
    }
}

#[tokio::test]
async fn forwards_bytes_both_ways() {
    let proxy = Proxy::start(echo_server().await).unwrap();
    let mut stream = TcpStream::connect(proxy.addr()).await.unwrap();
    round_trip(&mut stream, b"ping", Duration::from_secs(5))
        .await
        .unwrap();
    // A second connection is independent of the first.
    let mut other = TcpStream::connect(proxy.addr()).await.unwrap();
    round_trip(&mut other, b"pong", Duration::from_secs(5))
        .await
        .unwrap();
    round_trip(&mut stream, b"again", Duration::from_secs(5))
        .await
        .unwrap();
}

#[tokio::test]
async fn blackhole_starves_open_and_new_connections_until_heal() {
    let proxy = Proxy::start(echo_server().await).unwrap();
    let mut open = TcpStream::connect(proxy.addr()).await.unwrap();
    round_trip(&mut open, b"before", Duration::from_secs(5))
        .await
        .unwrap();

    proxy.blackhole().unwrap();
    assert_eq!(
        round_trip(&mut open, b"during", QUIET).await,
        Err("timed out".to_owned())
    );
    // A new connection is accepted (what a partition looks like), then starved.
    let mut new = timeout(QUIET, TcpStream::connect(proxy.addr()))
        .await
        .expect("a connection during a blackhole is accepted")
        .unwrap();
    assert_eq!(
        round_trip(&mut new, b"new", QUIET).await,
        Err("timed out".to_owned())
    );

    proxy.heal().unwrap();
    // What was sent during the blackhole arrives after it, as TCP would retransmit it.
    read_echo(&mut open, b"during", Duration::from_secs(5))
        .await
        .unwrap();
    read_echo(&mut new, b"new", Duration::from_secs(5))
        .await
        .unwrap();
    let mut fresh = TcpStream::connect(proxy.addr()).await.unwrap();
    round_trip(&mut fresh, b"fresh", Duration::from_secs(5))
        .await
        .unwrap();
}

#[tokio::test]
async fn refuse_closes_connections_and_refuses_new_ones_until_heal() {
    let proxy = Proxy::start(echo_server().await).unwrap();
    let mut open = TcpStream::connect(proxy.addr()).await.unwrap();
    round_trip(&mut open, b"before", Duration::from_secs(5))
        .await
        .unwrap();

    proxy.refuse();
    let mut buf = [0; 1];
    let closed = timeout(Duration::from_secs(5), open.read(&mut buf))
        .await
        .unwrap();
    assert!(
        matches!(closed, Ok(0) | Err(_)),
        "the open connection is closed: {closed:?}"
    );
    let refused = TcpStream::connect(proxy.addr()).await.unwrap_err();
    assert_eq!(refused.kind(), ErrorKind::ConnectionRefused);

    proxy.heal().unwrap();
    let mut fresh = TcpStream::connect(proxy.addr()).await.unwrap();
    round_trip(&mut fresh, b"fresh", Duration::from_secs(5))
        .await
        .unwrap();
}

#[tokio::test]
async fn delay_adds_latency_each_way() {
    let proxy = Proxy::start(echo_server().await).unwrap();
    let mut stream = TcpStream::connect(proxy.addr()).await.unwrap();
    let latency = Duration::from_millis(150);

    proxy.delay(latency).unwrap();
    let started = Instant::now();
    round_trip(&mut stream, b"slow", Duration::from_secs(5))
        .await
        .unwrap();
    assert!(
        started.elapsed() >= latency * 2,
        "took {:?}",
        started.elapsed()
    );

    proxy.heal().unwrap();
    let started = Instant::now();
    round_trip(&mut stream, b"fast", Duration::from_secs(5))
        .await
        .unwrap();
    assert!(started.elapsed() < latency, "took {:?}", started.elapsed());
}

#[tokio::test]
async fn a_refusing_proxy_can_blackhole_again() {
    let proxy = Proxy::start(echo_server().await).unwrap();
    proxy.refuse();
    proxy.blackhole().unwrap();
    let mut new = TcpStream::connect(proxy.addr()).await.unwrap();
    assert_eq!(
        round_trip(&mut new, b"held", QUIET).await,
        Err("timed out".to_owned())
    );
    proxy.heal().unwrap();
    read_echo(&mut new, b"held", Duration::from_secs(5))
        .await
        .unwrap();
}

#[tokio::test]
async fn dropping_the_proxy_closes_its_port_and_connections() {
    let proxy = Proxy::start(echo_server().await).unwrap();
    let addr = proxy.addr();
    let mut open = TcpStream::connect(addr).await.unwrap();
    round_trip(&mut open, b"before", Duration::from_secs(5))
        .await
        .unwrap();
    drop(proxy);
    let mut buf = [0; 1];
    let closed = timeout(Duration::from_secs(5), open.read(&mut buf))
        .await
        .unwrap();
    assert!(
        matches!(closed, Ok(0) | Err(_)),
        "the open connection is closed: {closed:?}"
    );
    assert_eq!(
        TcpStream::connect(addr).await.unwrap_err().kind(),
        ErrorKind::ConnectionRefused
    );
}
