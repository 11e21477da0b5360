//! A TCP forwarder a test controls: forward, delay, blackhole or refuse.

use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::runtime::Handle;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::HarnessError;

/// What the proxy currently does to traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    None,
    Delay(Duration),
    Blackhole,
    Refuse,
}

/// The switches every connection obeys: one fault for all, and the sources whose connections
/// are starved on top of it (see [`Proxy::cut_source`]).
#[derive(Clone, Debug)]
struct Switches {
    fault: Fault,
    cut_sources: Vec<String>,
}

/// What one connection may do now.
enum Verdict {
    Pass(Duration),
    Hold,
    Close,
}

impl Switches {
    fn verdict(&self, source: Option<&String>) -> Verdict {
        match self.fault {
            Fault::Refuse => Verdict::Close,
            Fault::Blackhole => Verdict::Hold,
            _ if source.is_some_and(|source| self.cut_sources.contains(source)) => Verdict::Hold,
            Fault::None => Verdict::Pass(Duration::ZERO),
            Fault::Delay(latency) => Verdict::Pass(latency),
        }
    }
}

/// One connection's view: the switches, and the source its client named, once it did.
#[derive(Clone)]
struct Link {
    switches: watch::Receiver<Switches>,
    source: Arc<OnceLock<String>>,
}

/// Enough for an etcd peer stream's bursts in one read.
const CHUNK: usize = 64 * 1024;

/// A TCP proxy on `127.0.0.1:0` that forwards to one target, with faults a test switches on and
/// off: [`blackhole`](Self::blackhole), [`refuse`](Self::refuse), [`delay`](Self::delay),
/// [`heal`](Self::heal).
///
/// Each accepted connection dials the target and is forwarded by one task per direction. The
/// switches take effect on live connections too, and return once they hold for new ones. The
/// proxy stops on `Drop`: it closes its listener and every connection.
///
/// The switches need the tokio runtime the proxy was started in to still run.
#[derive(Debug)]
pub struct Proxy {
    addr: SocketAddr,
    target: SocketAddr,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

#[derive(Debug)]
struct Shared {
    switches: watch::Sender<Switches>,
    /// The request header naming a connection's source (lower case, with its colon), when the
    /// proxy looks for one.
    source_header: Option<&'static str>,
    /// The listening socket, absent while refusing. Kept here rather than in the accept task so
    /// that `refuse` closes it before returning; the accept task only polls it, and no lock is
    /// held across an await.
    listener: Mutex<Option<TcpListener>>,
    runtime: Handle,
}

impl Proxy {
    /// Starts a proxy on a free port of 127.0.0.1 forwarding to `target`. Must be called from
    /// inside a tokio runtime.
    pub fn start(target: SocketAddr) -> Result<Proxy, HarnessError> {
        Self::start_with(target, None)
    }

    /// Starts a proxy that tags each connection with the value of the first `header` line its
    /// client sends (an HTTP request header such as etcd's `X-Server-From`), so
    /// [`cut_source`](Self::cut_source) can starve one source's connections.
    pub(super) fn start_sniffing(
        target: SocketAddr,
        header: &'static str,
    ) -> Result<Proxy, HarnessError> {
        Self::start_with(target, Some(header))
    }

    fn start_with(
        target: SocketAddr,
        source_header: Option<&'static str>,
    ) -> Result<Proxy, HarnessError> {
        let runtime = Handle::try_current().map_err(|_| HarnessError::NoRuntime)?;
        let listener = {
            let _entered = runtime.enter();
            listen(SocketAddr::from(([127, 0, 0, 1], 0)))?
        };
        let addr = listener
            .local_addr()
            .map_err(|e| HarnessError::io("reading the proxy's address", e))?;
        let (switches, _) = watch::channel(Switches {
            fault: Fault::None,
            cut_sources: Vec::new(),
        });
        let shared = Arc::new(Shared {
            switches,
            source_header,
            listener: Mutex::new(Some(listener)),
            runtime,
        });
        let accept = shared
            .runtime
            .spawn(accept_loop(Arc::clone(&shared), target));
        Ok(Proxy {
            addr,
            target,
            shared,
            accept,
        })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The address the proxy forwards to.
    pub fn target(&self) -> SocketAddr {
        self.target
    }

    /// Stops every byte, both ways, on every connection, without closing any: what a network
    /// partition looks like. New connections are accepted and then starved. Bytes already read
    /// are held and delivered after [`heal`](Self::heal), as TCP retransmission would.
    pub fn blackhole(&self) -> Result<(), HarnessError> {
        self.set(Fault::Blackhole)
    }

    /// Closes every connection and refuses new ones (the listening socket is closed, so a
    /// connect gets "connection refused"): what a dead process looks like.
    pub fn refuse(&self) {
        // Close the listener first: when this returns, no new connection can get in.
        drop(self.lock_listener().take());
        self.shared
            .switches
            .send_modify(|switches| switches.fault = Fault::Refuse);
    }

    /// Forwards again, with `latency` added before each chunk of bytes passes, both ways.
    pub fn delay(&self, latency: Duration) -> Result<(), HarnessError> {
        self.set(Fault::Delay(latency))
    }

    /// Forwards again without faults. Held bytes flow on; a connection opened after this
    /// returns works at once.
    pub fn heal(&self) -> Result<(), HarnessError> {
        self.set(Fault::None)
    }

    /// Switches to a fault other than refusing, listening again first if it was refusing.
    fn set(&self, fault: Fault) -> Result<(), HarnessError> {
        {
            let mut listener = self.lock_listener();
            if listener.is_none() {
                let _entered = self.shared.runtime.enter();
                *listener = Some(listen(self.addr)?);
            }
        }
        self.shared
            .switches
            .send_modify(|switches| switches.fault = fault);
        Ok(())
    }

    /// Starves the connections whose client named itself `source` (as blackhole does, for them
    /// only), until [`uncut_source`](Self::uncut_source). Only a proxy started to look for a
    /// source header tags connections; a connection is tagged from the first request that
    /// carries the header, and passes untouched before that.
    pub(super) fn cut_source(&self, source: &str) {
        self.shared.switches.send_modify(|switches| {
            if !switches.cut_sources.iter().any(|cut| cut == source) {
                switches.cut_sources.push(source.to_owned());
            }
        });
    }

    /// Lets `source`'s connections through again.
    pub(super) fn uncut_source(&self, source: &str) {
        self.shared
            .switches
            .send_modify(|switches| switches.cut_sources.retain(|cut| cut != source));
    }

    fn lock_listener(&self) -> std::sync::MutexGuard<'_, Option<TcpListener>> {
        self.shared
            .listener
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.refuse();
        self.accept.abort();
    }
}

/// Listens on `addr`, with SO_REUSEADDR so a proxy that refused can listen on its port again
/// while its closed connections sit in TIME_WAIT.
fn listen(addr: SocketAddr) -> Result<TcpListener, HarnessError> {
    let what = || format!("listening on {addr} for a proxy");
    let socket = TcpSocket::new_v4().map_err(|e| HarnessError::io(what(), e))?;
    socket
        .set_reuseaddr(true)
        .map_err(|e| HarnessError::io(what(), e))?;
    socket.bind(addr).map_err(|e| HarnessError::io(what(), e))?;
    socket.listen(1024).map_err(|e| HarnessError::io(what(), e))
}

impl Shared {
    fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<io::Result<(TcpStream, SocketAddr)>> {
        match &*self.listener.lock().unwrap_or_else(PoisonError::into_inner) {
            Some(listener) => listener.poll_accept(cx),
            // Refusing: the switches wake the accept loop when a listener comes back.
            None => Poll::Pending,
        }
    }
}

async fn accept_loop(shared: Arc<Shared>, target: SocketAddr) {
    let mut switches = shared.switches.subscribe();
    loop {
        let accepted = tokio::select! {
            accepted = poll_fn(|cx| shared.poll_accept(cx)) => accepted,
            changed = switches.changed() => {
                if changed.is_err() {
                    return;
                }
                continue;
            }
        };
        match accepted {
            Ok((stream, _)) => {
                let link = Link {
                    switches: shared.switches.subscribe(),
                    source: Arc::new(OnceLock::new()),
                };
                tokio::spawn(forward(stream, target, link, shared.source_header));
            }
            Err(error) => {
                // Out of descriptors or an aborted handshake: do not spin on it.
                tracing::debug!(%error, "proxy accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// Waits until bytes may pass; `None` when the connection must close (refusing, or the proxy
/// is gone), else the latency to add.
async fn passable(link: &mut Link) -> Option<Duration> {
    let source = &link.source;
    let switches = link
        .switches
        .wait_for(|switches| !matches!(switches.verdict(source.get()), Verdict::Hold))
        .await
        .ok()?;
    match switches.verdict(source.get()) {
        Verdict::Pass(latency) => Some(latency),
        Verdict::Hold | Verdict::Close => None,
    }
}

async fn forward(
    client: TcpStream,
    target: SocketAddr,
    mut link: Link,
    source_header: Option<&'static str>,
) {
    // A connection accepted during a blackhole is starved: the target does not hear of it yet.
    if passable(&mut link).await.is_none() {
        return;
    }
    // A target that is down closes the client's connection, as the target would have.
    let Ok(upstream) = TcpStream::connect(target).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (upstream_read, upstream_write) = upstream.into_split();
    let sniff = source_header.map(|header| Sniff {
        header,
        seen: Vec::new(),
    });
    tokio::spawn(pump(client_read, upstream_write, link.clone(), sniff));
    pump(upstream_read, client_write, link, None).await;
}

/// Looks for a source header in what a client sends, across reads.
struct Sniff {
    header: &'static str,
    /// The end of what was read so far, lower-cased, in case the header straddles two reads.
    seen: Vec<u8>,
}

/// Enough to hold a header name and an etcd member id split across two reads.
const SNIFF_CARRY: usize = 256;

impl Sniff {
    /// The header's value if `bytes` completes it.
    fn find(&mut self, bytes: &[u8]) -> Option<String> {
        self.seen.extend(bytes.iter().map(u8::to_ascii_lowercase));
        let header = self.header.as_bytes();
        let found = self
            .seen
            .windows(header.len())
            .position(|window| window == header)
            .and_then(|at| {
                let value = &self.seen[at + header.len()..];
                let end = value.iter().position(|&b| b == b'\r' || b == b'\n')?;
                Some(String::from_utf8_lossy(&value[..end]).trim().to_owned())
            });
        let keep = self.seen.len().saturating_sub(SNIFF_CARRY);
        self.seen.drain(..keep);
        found
    }
}

/// Copies one direction of a connection, obeying the switches between and during reads and
/// writes, and tagging the connection with its source when `sniff` finds it. Returning drops
/// both halves; the connection closes when both directions returned.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    mut link: Link,
    mut sniff: Option<Sniff>,
) {
    let mut buf = vec![0; CHUNK];
    loop {
        let read = loop {
            if passable(&mut link).await.is_none() {
                return;
            }
            tokio::select! {
                read = from.read(&mut buf) => break read,
                changed = link.switches.changed() => if changed.is_err() { return },
            }
        };
        let len = match read {
            Ok(0) | Err(_) => {
                // Pass the end of stream on, so the other side sees the half-close.
                let _ = to.shutdown().await;
                return;
            }
            Ok(len) => len,
        };
        if let Some(found) = sniff.as_mut().and_then(|sniff| sniff.find(&buf[..len])) {
            let _ = link.source.set(found);
            sniff = None;
        }
        let mut delayed = false;
        let mut sent = 0;
        while sent < len {
            let Some(latency) = passable(&mut link).await else {
                return;
            };
            if !delayed && !latency.is_zero() {
                delayed = true;
                tokio::select! {
                    () = tokio::time::sleep(latency) => {}
                    changed = link.switches.changed() => if changed.is_err() { return },
                }
                continue;
            }
            tokio::select! {
                written = to.write(&buf[sent..len]) => match written {
                    Ok(0) | Err(_) => return,
                    Ok(written) => sent += written,
                },
                changed = link.switches.changed() => if changed.is_err() { return },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Sniff;

    fn sniff() -> Sniff {
        Sniff {
            header: "x-server-from:",
            seen: Vec::new(),
        }
    }

    #[test]
    fn sniff_finds_the_header_in_any_case() {
        let request =
            b"GET /raft/stream/message/1 HTTP/1.1\r\nX-Server-From: 8e9e05c52164694d\r\n\r\n";
        assert_eq!(sniff().find(request).as_deref(), Some("8e9e05c52164694d"));
    }

    #[test]
    fn sniff_finds_a_header_split_across_reads() {
        let request = b"POST /raft HTTP/1.1\r\nHost: x\r\nX-Server-From: 2a\r\n\r\nbody";
        for split in 1..request.len() {
            let mut sniff = sniff();
            let first = sniff.find(&request[..split]);
            let found = first.or_else(|| sniff.find(&request[split..]));
            assert_eq!(found.as_deref(), Some("2a"), "split at {split}");
        }
    }

    #[test]
    fn sniff_ignores_requests_without_the_header() {
        let mut sniff = sniff();
        assert_eq!(
            sniff.find(b"GET /raft/probing HTTP/1.1\r\nHost: x\r\n\r\n"),
            None
        );
        // A header name with no line end yet is not a value.
        assert_eq!(sniff.find(b"GET / HTTP/1.1\r\nX-Server-From: 2"), None);
        assert_eq!(sniff.find(b"b\r\n").as_deref(), Some("2b"));
    }
}
