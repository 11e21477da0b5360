//! DNS: healthy instances for any program that can resolve a name.
//!
//! - [`name`]: query names to typed lookups (Consul's name forms).
//! - [`answer`]: responses from a snapshot, with records encoded once per service change.
//!
//! - [`client_cap`]: TCP connections counted per client address.
//!
//! This module holds the listeners: UDP workers sharing one socket, and a TCP accept loop
//! with a global connection cap, a cap per client address and an idle timeout. Both read the latest snapshot per query, so
//! an instance that turns critical is gone from the next answer, and answer as the agent's
//! DNS token, resolved per query so a token set with `PUT /v1/agent/token/dns` applies at
//! once.

pub mod answer;
mod client_cap;
pub mod name;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use self::answer::{DnsSettingError, Outcome, Responder, Transport, answer_bytes};
use self::client_cap::ClientCap;
use crate::AppState;
use crate::telemetry as m;

/// Queries forwarded to recursors at once; beyond that, forwarding queries are dropped
/// (clients retry), so a dead recursor cannot pile up tasks.
const MAX_FORWARDS: usize = 1024;
/// How often a UDP worker blocked in `recv_from` looks at the shutdown token.
const SHUTDOWN_POLL: Duration = Duration::from_millis(100);
/// Largest UDP datagram.
const UDP_BUF: usize = 65_535;
/// Receive buffer asked for on the UDP socket. The kernel default (about 200 KiB) holds only
/// a few hundred queries, and a burst beyond that is dropped before we see it; the kernel
/// caps the request at `net.core.rmem_max`.
const UDP_RECV_BUFFER: usize = 4 << 20;
/// Refused TCP connections are logged at most this often (with the count since the last
/// line): a client hammering the cap must not flood the log.
const REFUSED_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Starts the UDP workers and the TCP accept loop. They stop when `shutdown` is cancelled.
pub(crate) fn spawn(
    state: AppState,
    udp: UdpSocket,
    tcp: TcpListener,
    shutdown: CancellationToken,
) -> Result<Vec<JoinHandle<()>>, DnsSettingError> {
    let config = state.config();
    let node_ip = match config.http_addr.ip() {
        ip if !ip.is_unspecified() => ip,
        _ => match udp.local_addr().map(|a| a.ip()) {
            Ok(ip) if !ip.is_unspecified() => ip,
            _ => IpAddr::V4(Ipv4Addr::LOCALHOST),
        },
    };
    let responder = Arc::new(Responder::new(config, node_ip)?);
    if config.dns.max_tcp_connections_per_client == 0 {
        return Err(DnsSettingError(
            "dns.max_tcp_connections_per_client must be at least 1".into(),
        ));
    }
    let forwards = Arc::new(Semaphore::new(MAX_FORWARDS));
    if let Err(e) = socket2::SockRef::from(&udp).set_recv_buffer_size(UDP_RECV_BUFFER) {
        tracing::debug!("cannot enlarge the DNS receive buffer: {e}");
    }
    let udp = udp
        .into_std()
        .map_err(|e| DnsSettingError(format!("DNS UDP socket: {e}")))?;
    udp.set_nonblocking(false)
        .and_then(|()| udp.set_read_timeout(Some(SHUTDOWN_POLL)))
        .map_err(|e| DnsSettingError(format!("DNS UDP socket: {e}")))?;
    let runtime = tokio::runtime::Handle::try_current()
        .map_err(|e| DnsSettingError(format!("DNS needs a tokio runtime: {e}")))?;
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 4);
    let mut tasks = Vec::new();
    for i in 0..workers {
        let socket = udp
            .try_clone()
            .map_err(|e| DnsSettingError(format!("DNS UDP socket: {e}")))?;
        let (state, responder, forwards, runtime, shutdown) = (
            state.clone(),
            responder.clone(),
            forwards.clone(),
            runtime.clone(),
            shutdown.clone(),
        );
        std::thread::Builder::new()
            .name(format!("muster-dns-udp-{i}"))
            .spawn(move || udp_worker(state, responder, socket, forwards, runtime, shutdown))
            .map_err(|e| DnsSettingError(format!("cannot start a DNS thread: {e}")))?;
    }
    tasks.push(tokio::spawn(tcp_accept(
        state.clone(),
        responder,
        tcp,
        forwards,
        shutdown,
    )));
    Ok(tasks)
}

/// One UDP worker: a plain thread on a blocking socket. UDP answers are cheap to build, so
/// the syscalls are the cost; a thread per core in `recv_from` is what NSD does too, and it
/// keeps the DNS path off the runtime that serves HTTP. Forwarded queries go to the runtime.
fn udp_worker(
    state: AppState,
    responder: Arc<Responder>,
    socket: std::net::UdpSocket,
    forwards: Arc<Semaphore>,
    runtime: tokio::runtime::Handle,
    shutdown: CancellationToken,
) {
    let mut buf = vec![0u8; UDP_BUF];
    let mut out = Vec::with_capacity(512);
    while !shutdown.is_cancelled() {
        let (len, peer) = match socket.recv_from(&mut buf) {
            Ok(x) => x,
            // The read timeout (to see the shutdown token), or an ICMP error from an
            // earlier send.
            Err(_) => continue,
        };
        let packet = &buf[..len];
        let snapshot = state.snapshot();
        let caller = state.acl().dns_caller(&snapshot);
        match responder.respond(&snapshot, &caller, packet, Transport::Udp, &mut out) {
            Outcome::Reply => {
                let _ = socket.send_to(&out, peer);
            }
            Outcome::Drop => {}
            Outcome::Forward => {
                let Ok(permit) = forwards.clone().try_acquire_owned() else {
                    continue;
                };
                let Ok(reply_socket) = socket.try_clone() else {
                    continue;
                };
                let (packet, responder) = (packet.to_vec(), responder.clone());
                runtime.spawn(async move {
                    if let Some(reply) = forward_or_fail(&responder, &packet).await {
                        let _ = reply_socket.send_to(&reply, peer);
                    }
                    drop(permit);
                });
            }
        }
    }
}

async fn forward_or_fail(responder: &Responder, packet: &[u8]) -> Option<Vec<u8>> {
    let config = responder.config();
    match forward(&config.recursors, config.recursor_timeout, packet).await {
        Some(reply) => {
            metrics::counter!(m::DNS_FORWARDED, "result" => "ok").increment(1);
            Some(reply)
        }
        None => {
            metrics::counter!(m::DNS_FORWARDED, "result" => "failed").increment(1);
            let mut out = Vec::new();
            (responder.servfail(packet, &mut out) == Outcome::Reply).then_some(out)
        }
    }
}

/// Sends `packet` to each recursor in turn; the first answer with the query's id wins.
async fn forward(recursors: &[SocketAddr], timeout: Duration, packet: &[u8]) -> Option<Vec<u8>> {
    let id = packet.get(..2)?;
    for r in recursors {
        let local: SocketAddr = if r.is_ipv4() {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let Ok(sock) = UdpSocket::bind(local).await else {
            continue;
        };
        if sock.connect(r).await.is_err() || sock.send(packet).await.is_err() {
            continue;
        }
        let mut buf = vec![0u8; UDP_BUF];
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, sock.recv(&mut buf)).await {
                Ok(Ok(n)) if n >= 12 && &buf[..2] == id && buf[2] & 0x80 != 0 => {
                    buf.truncate(n);
                    return Some(buf);
                }
                Ok(Ok(_)) => continue,
                Ok(Err(_)) | Err(_) => break,
            }
        }
    }
    None
}

async fn tcp_accept(
    state: AppState,
    responder: Arc<Responder>,
    listener: TcpListener,
    forwards: Arc<Semaphore>,
    shutdown: CancellationToken,
) {
    let connections = Arc::new(Semaphore::new(responder.config().max_tcp_connections));
    let clients = ClientCap::new(responder.config().max_tcp_connections_per_client);
    let mut refused = RefusedLog::default();
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!("DNS TCP accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // The client's own cap first: a client at its cap is refused without taking a
        // global slot, and the global cap then only fills up with many clients.
        let Some(slot) = clients.try_acquire(peer.ip()) else {
            refused.count(Refusal::PerClient, peer);
            continue;
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            refused.count(Refusal::Global, peer);
            continue;
        };
        let (state, responder, forwards, shutdown) = (
            state.clone(),
            responder.clone(),
            forwards.clone(),
            shutdown.clone(),
        );
        tokio::spawn(async move {
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = tcp_connection(state, responder, stream, forwards) => {}
            }
            drop(permit);
            drop(slot);
        });
    }
}

/// Why a TCP connection was closed on accept: the `reason` label of
/// `muster_dns_tcp_refused_total`.
#[derive(Clone, Copy, Debug)]
enum Refusal {
    /// `dns.max_tcp_connections` reached.
    Global,
    /// The client address holds `dns.max_tcp_connections_per_client` already.
    PerClient,
}

impl Refusal {
    fn label(self) -> &'static str {
        match self {
            Refusal::Global => "global",
            Refusal::PerClient => "per_client",
        }
    }
}

/// Counts refused connections and logs them, at most once per [`REFUSED_LOG_INTERVAL`].
#[derive(Debug, Default)]
struct RefusedLog {
    last: Option<tokio::time::Instant>,
    unlogged: u64,
}

impl RefusedLog {
    fn count(&mut self, why: Refusal, peer: SocketAddr) {
        metrics::counter!(m::DNS_TCP_REFUSED, "reason" => why.label()).increment(1);
        self.unlogged += 1;
        let now = tokio::time::Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < REFUSED_LOG_INTERVAL)
        {
            return;
        }
        let cause = match why {
            Refusal::Global => "dns.max_tcp_connections reached",
            Refusal::PerClient => "the client holds dns.max_tcp_connections_per_client",
        };
        tracing::warn!(
            "DNS TCP connection from {peer} closed on accept: {cause} ({} refused since the last such line)",
            self.unlogged
        );
        self.last = Some(now);
        self.unlogged = 0;
    }
}

/// Serves length-prefixed queries on one connection until the client closes it, stays
/// idle past the timeout, or sends something that is not DNS.
async fn tcp_connection(
    state: AppState,
    responder: Arc<Responder>,
    mut stream: TcpStream,
    forwards: Arc<Semaphore>,
) {
    let idle = responder.config().tcp_idle_timeout;
    let _ = stream.set_nodelay(true);
    let mut out = Vec::with_capacity(512);
    loop {
        let mut len = [0u8; 2];
        // The timeout covers the whole query, so a client trickling bytes is cut off too.
        let packet = tokio::time::timeout(idle, async {
            stream.read_exact(&mut len).await?;
            let mut packet = vec![0u8; usize::from(u16::from_be_bytes(len))];
            stream.read_exact(&mut packet).await?;
            Ok::<_, std::io::Error>(packet)
        })
        .await;
        let Ok(Ok(packet)) = packet else { return };
        let snapshot = state.snapshot();
        let caller = state.acl().dns_caller(&snapshot);
        let reply = match responder.respond(&snapshot, &caller, &packet, Transport::Tcp, &mut out) {
            Outcome::Reply => Some(std::mem::take(&mut out)),
            Outcome::Drop => None,
            Outcome::Forward => {
                let Ok(_permit) = forwards.try_acquire() else {
                    return;
                };
                forward_or_fail(&responder, &packet).await
            }
        };
        let Some(reply) = reply else { return };
        let Ok(n) = u16::try_from(reply.len()) else {
            return;
        };
        let mut framed = Vec::with_capacity(reply.len() + 2);
        framed.extend_from_slice(&n.to_be_bytes());
        framed.extend_from_slice(&reply);
        out = reply;
        match tokio::time::timeout(idle, stream.write_all(&framed)).await {
            Ok(Ok(())) => {}
            _ => return,
        }
    }
}
