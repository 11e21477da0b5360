//! `muster gateway`: the reverse proxy, in a runtime of its own (one worker per CPU unless
//! told otherwise), with SIGHUP for reloads and TERM for a graceful drain.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use muster_client::Token;
use muster_gateway::{Gateway, GatewayConfig, Limits, TlsFiles};

use crate::args::GatewayArgs;

/// Runs the gateway until TERM or Ctrl-C, following the agents with `token` (if any).
pub fn main(
    http_addr: Option<&str>,
    token: Option<Token>,
    args: GatewayArgs,
) -> anyhow::Result<ExitCode> {
    crate::agent::init_logging(&args.log, None)?;
    // A proxy's memory is mostly small, long-lived allocations spread thin: transparent huge
    // pages would back each touched 4 KiB with 2 MiB (about 20 MiB more RSS for 1,000 routes)
    // for a TLB gain a proxy does not notice.
    if let Err(e) = nix::sys::prctl::set_thp_disable(true) {
        tracing::debug!(error = %e, "cannot turn transparent huge pages off");
    }
    let mut builder = match args.threads {
        Some(0) => anyhow::bail!("--threads must be at least 1"),
        // One worker: the current-thread scheduler, which skips the work-stealing machinery
        // (shared queues, atomics, wake-ups of idle workers) that one worker never uses.
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    let runtime = builder
        // Table builds run on the blocking pool. A thread that ends gives its allocator heap
        // back; one kept for tokio's default 10 s holds the garbage of the build it made
        // (the build itself ends by releasing free memory, and the gateway does so every
        // second too).
        .thread_keep_alive(std::time::Duration::from_millis(200))
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(run(http_addr, token, args))?;
    Ok(ExitCode::SUCCESS)
}

async fn run(
    http_addr: Option<&str>,
    token: Option<Token>,
    args: GatewayArgs,
) -> anyhow::Result<()> {
    let agents = if args.agents.is_empty() {
        vec![http_addr.unwrap_or(crate::DEFAULT_HTTP_ADDR).to_string()]
    } else {
        args.agents.clone()
    };
    let mut config = GatewayConfig::new(args.listen, agents);
    config.admin = args.admin;
    config.zone = args.zone.clone();
    config.routes_file = args.routes.clone();
    config.cache_dir = args.cache_dir.clone();
    config.token = token;
    config.tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
        }),
        _ => None,
    };
    config.access_log = args.access_log;
    config.drain_timeout = args.drain_timeout;
    config.connect_timeout = args.connect_timeout;
    config.limits = Limits {
        max_header_bytes: args.max_header_bytes,
        max_connections: args.max_connections,
        ..config.limits
    };
    config.release_memory = Some(muster_alloc::release_free_memory);
    let render: muster_gateway::MetricsRender =
        Arc::new(|| muster_server::telemetry::handle().render());
    // Installs the recorder before the gateway makes its metric handles.
    muster_server::telemetry::handle();
    let gateway = Gateway::start(config, Some(render)).await?;
    let gateway = Arc::new(gateway);
    tokio::spawn(reload_on_hangup(gateway.clone()));
    crate::agent::wait_for_signal().await;
    tracing::info!("draining");
    gateway.shutdown().await;
    Ok(())
}

async fn reload_on_hangup(gateway: Arc<Gateway>) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hangup) = signal(SignalKind::hangup()) else {
        tracing::warn!("cannot listen for SIGHUP; restart the gateway to reload");
        return;
    };
    while hangup.recv().await.is_some() {
        if let Err(e) = gateway.reload() {
            tracing::error!(error = %e, "reload refused");
        }
    }
}
