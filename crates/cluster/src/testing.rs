//! Real etcd members and a controllable TCP proxy, for tests.
//!
//! Cluster-mode tests run against the real thing: [`EtcdCluster`] starts `etcd` processes
//! (Debian's etcd-server, which `tests/setup.sh` installs) on free loopback ports, in a
//! temporary directory, and injects the faults a test needs without root: SIGKILL, SIGSTOP,
//! forced compaction, a small quota, and [`Proxy`]s on the peer or client paths that can starve,
//! delay or refuse traffic the way a network partition or a dead host does.
//!
//! Layout:
//! - `etcd`: [`EtcdCluster`] and its builder: start, kill, restart, pause, isolate from its
//!   peers, find the leader, compact.
//! - `proxy`: [`Proxy`], a TCP forwarder a test switches between forward, delay, blackhole and
//!   refuse; behind each member's peer port it also tells the members' connections apart, so
//!   one member can be cut off both ways.
//!
//! Both clean up on `Drop`, also when a test panics: every etcd process is killed and reaped,
//! every proxy task stops.
//!
//! ```no_run
//! # async fn demo() -> Result<(), muster_cluster::testing::HarnessError> {
//! use muster_cluster::testing::EtcdCluster;
//!
//! let mut etcd = EtcdCluster::builder().members(3).peer_proxies(true).start().await?;
//! let leader = etcd.leader().await?;
//! etcd.kill(leader).await?;
//! let mut client = etcd.client().await?; // the two members left
//! client.put("k", "v", None).await?;
//! etcd.restart(leader).await?;
//! etcd.isolate(leader)?; // cut off from its peers, both ways
//! etcd.rejoin(leader)?;
//! # Ok(()) }
//! ```

mod etcd;
mod proxy;

use std::io;
use std::time::Duration;

pub use etcd::{EtcdCluster, EtcdClusterBuilder};
pub use proxy::Proxy;

/// What went wrong starting or driving etcd members or a proxy.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HarnessError {
    /// The `etcd` binary is not on PATH.
    #[error("etcd is not on PATH: install Debian's etcd-server (tests/setup.sh does)")]
    EtcdMissing,
    /// The harness was asked for something it cannot do.
    #[error("{0}")]
    Invalid(&'static str),
    /// A file, socket or process operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What the harness was doing.
        what: String,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// An operation needs a running member, and this one was killed.
    #[error("member {index} is not running (killed): restart it first")]
    MemberDown {
        /// The member's index.
        index: usize,
    },
    /// A member's process exited without being told to.
    #[error("member {index} exited by itself ({status}); its log ends:\n{log}")]
    MemberExited {
        /// The member's index.
        index: usize,
        /// How it exited.
        status: String,
        /// The end of its log.
        log: String,
    },
    /// The cluster did not reach a state within the harness's deadline.
    #[error("{what}: not within {waited:?}; last error: {last}\n{logs}")]
    Timeout {
        /// The state waited for.
        what: String,
        /// How long the harness waited.
        waited: Duration,
        /// The last error seen while polling.
        last: String,
        /// The end of every member's log.
        logs: String,
    },
    /// Sending a signal to a member failed.
    #[error("sending {signal} to member {index}: {source}")]
    Signal {
        /// The signal's name.
        signal: &'static str,
        /// The member's index.
        index: usize,
        /// The operating system's error.
        #[source]
        source: nix::Error,
    },
    /// A proxy was started outside a tokio runtime.
    #[error("no tokio runtime: start proxies from inside one (a #[tokio::test])")]
    NoRuntime,
    /// An etcd request made by the harness failed.
    #[error("etcd request failed: {0}")]
    Etcd(#[from] etcd_client::Error),
}

impl HarnessError {
    fn io(what: impl Into<String>, source: io::Error) -> Self {
        Self::Io {
            what: what.into(),
            source,
        }
    }
}
