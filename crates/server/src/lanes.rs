//! HTTP connections dealt to several single-threaded event loops.
//!
//! One task accepts; each connection goes, in turn, to one of the lanes: the accepting
//! runtime and one thread per further lane, each running its own current-thread runtime and
//! its own `axum::serve` over the connections it is handed. A connection is served on one
//! thread from start to end, as in a worker-per-core server, and dealing in turn keeps the
//! lanes evenly loaded, which `SO_REUSEPORT` would only do on average (and it would let a
//! second agent bind the same port).

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// A lane's connections, as axum's listener.
struct Lane {
    rx: mpsc::UnboundedReceiver<std::net::TcpStream>,
    addr: SocketAddr,
}

impl axum::serve::Listener for Lane {
    type Io = TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (TcpStream, SocketAddr) {
        loop {
            let Some(stream) = self.rx.recv().await else {
                // The acceptor stopped: shutdown is under way, and axum ends on its signal.
                return std::future::pending().await;
            };
            // Registers the socket with this lane's runtime.
            match stream
                .peer_addr()
                .and_then(|peer| Ok((TcpStream::from_std(stream)?, peer)))
            {
                Ok(accepted) => return accepted,
                Err(e) => {
                    tracing::debug!(error = %e, "dropped a connection handed to an HTTP thread")
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.addr)
    }
}

/// Serves `app` on `listener` over `lanes` event loops until `shutdown`, then waits for
/// every lane to drain.
pub(crate) async fn serve(
    listener: TcpListener,
    app: Router,
    lanes: usize,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let addr = listener.local_addr()?;
    let mut senders = Vec::with_capacity(lanes);
    let mut threads = Vec::with_capacity(lanes - 1);
    for n in 1..lanes {
        let (tx, rx) = mpsc::unbounded_channel();
        let (app, shutdown) = (app.clone(), shutdown.clone());
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let thread = std::thread::Builder::new()
            .name(format!("muster-http-{n}"))
            .spawn(move || {
                runtime.block_on(async move {
                    let lane = Lane { rx, addr };
                    axum::serve(lane, app.into_make_service())
                        .with_graceful_shutdown(shutdown.cancelled_owned())
                        .await
                })
            })?;
        senders.push(tx);
        threads.push(thread);
    }
    let (tx, rx) = mpsc::unbounded_channel();
    senders.push(tx);
    let local = tokio::spawn(
        axum::serve(Lane { rx, addr }, app.into_make_service())
            .with_graceful_shutdown(shutdown.clone().cancelled_owned())
            .into_future(),
    );

    let mut next = 0;
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted.and_then(|(stream, _)| stream.into_std()) {
            Ok(stream) => {
                // A lane only stops after shutdown; until then its receiver is there.
                let _ = senders[next].send(stream);
                next = (next + 1) % senders.len();
            }
            Err(e) if is_connection_error(&e) => {}
            Err(e) => {
                // Out of file descriptors and the like: wait rather than spin (as axum does).
                tracing::error!(error = %e, "cannot accept HTTP connections; retrying in 1s");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
    drop(senders);
    local.await.map_err(std::io::Error::other)??;
    tokio::task::spawn_blocking(move || {
        for thread in threads {
            match thread.join() {
                Ok(result) => result?,
                Err(_) => return Err(std::io::Error::other("an HTTP thread panicked")),
            }
        }
        Ok(())
    })
    .await
    .map_err(std::io::Error::other)?
}

/// Errors that end one connection, not the listener.
fn is_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    )
}
