//! Registers itself, discovers a service, and calls it through the balancing tower service.
//!
//! Start an agent (`muster agent --dev`), then:
//!
//! ```sh
//! cargo run -p muster-client --example discover            # agent at 127.0.0.1:8500
//! cargo run -p muster-client --example discover -- HOST:PORT
//! ```
//!
//! It serves a tiny HTTP answer on a loopback port, registers that as an instance of
//! `hello`, waits for its own instance to show up through discovery, then calls `hello`
//! three times through `Balanced` (which picks the instance and rewrites the URI), and
//! deregisters.

use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::rt::TokioExecutor;
use muster_client::tower::BalanceLayer;
use muster_client::{Client, Registration};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower::discover::Change;
use tower::{Layer, ServiceExt};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let agent = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8500".into());
    let client = Client::builder().agents([agent.as_str()]).build()?;

    // Something to discover: this process, answering "hello" on a loopback port.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let _ = conn.read(&mut buf).await;
                let _ = conn
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\nconnection: close\r\n\r\nhello\n",
                    )
                    .await;
            });
        }
    });

    let registered = client
        .register(Registration::new("hello", "127.0.0.1", port).ttl(Duration::from_secs(10)))
        .await?;
    println!("registered hello/{} on port {port}", registered.id());

    // Discover: wait until our own instance is inserted.
    let mut changes = client.discover("hello")?;
    while let Some(Ok(change)) = changes.next().await {
        if let Change::Insert(id, instance) = change {
            println!("discovered {id} at {}", instance.authority());
            if id == registered.id() {
                break;
            }
        }
    }

    // Call it through the balancing service: the URI names no host, the view picks one.
    let http = HttpClient::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let hello = BalanceLayer::new(client.view("hello")?).layer(http);
    for n in 1..=3 {
        let answer = hello
            .clone()
            .oneshot(http::Request::get("/greeting").body(Empty::new())?)
            .await?;
        let status = answer.status();
        let body = answer.into_body().collect().await?.to_bytes();
        println!(
            "call {n}: {status} {}",
            String::from_utf8_lossy(&body).trim()
        );
    }

    registered.deregister().await?;
    println!("deregistered");
    Ok(())
}
