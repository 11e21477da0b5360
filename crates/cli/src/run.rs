//! `muster run`: keep a child process registered for as long as it lives.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use muster_client::{Registered, Registration};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::process::Command;
use tokio::signal::unix::{SignalKind, signal};

use crate::args::RunArgs;

/// Registers, starts the command, keeps it registered (muster-client's registration
/// handle heartbeats and registers again when the agent forgot it), and deregisters when it
/// ends.
pub async fn run(target: &crate::client::Target, args: RunArgs) -> anyhow::Result<ExitCode> {
    // The handle reports heartbeat trouble and re-registrations through tracing.
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_target(false)
        .without_time()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("muster_client=info")),
        )
        .try_init();
    let mut builder = muster_client::Client::builder()
        .agents([&target.base])
        // Past the TTL a call is worthless: the instance lapsed meanwhile.
        .request_timeout(args.ttl)
        .tls_danger_accept_invalid_certs(target.skip_verify.is_some());
    if let Some(ca) = &target.ca_file {
        builder = builder.ca_file(ca);
    }
    if let Some((cert, key)) = &target.client_cert {
        builder = builder.client_cert(cert, key);
    }
    if let Some(name) = &target.server_name {
        builder = builder.tls_server_name(name);
    }
    if let Some(token) = &target.token {
        builder = builder.token(token.clone());
    }
    let client = builder.build()?;
    let registration = registration(&args);

    // Listen for TERM and INT before the child exists, so a signal that arrives while
    // registering still reaches the child instead of orphaning it.
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut child = Command::new(&args.command[0])
        .args(&args.command[1..])
        .spawn()
        .with_context(|| format!("cannot start {:?}", args.command[0]))?;
    let registered: anyhow::Result<Registered> = tokio::select! {
        r = bounded(args.ttl, async { Ok(client.register(registration).await?) }) => r,
        _ = term.recv() => Err(anyhow::anyhow!("interrupted by TERM")),
        _ = int.recv() => Err(anyhow::anyhow!("interrupted by INT")),
    };
    let registered = match registered {
        Ok(r) => r,
        Err(e) => {
            let _ = child.start_kill();
            let _ = child.wait().await;
            return Err(e.context("registration failed; the command was stopped"));
        }
    };
    let name = format!("{}/{}", registered.service(), registered.id());
    eprintln!("muster: registered {name}");

    let outcome = tokio::select! {
        status = child.wait() => Outcome::Exited(status?),
        _ = term.recv() => Outcome::Signal(Signal::SIGTERM),
        _ = int.recv() => Outcome::Signal(Signal::SIGINT),
    };

    // Bounded by the TTL inside the handle: past it the instance lapses anyway.
    match registered.deregister().await {
        Ok(()) => eprintln!("muster: deregistered {name}"),
        Err(e) => eprintln!("muster: deregistration failed: {e}"),
    }
    match outcome {
        Outcome::Exited(status) => Ok(exit_code(status)),
        Outcome::Signal(sig) => {
            if let Some(pid) = child.id() {
                let _ = kill(Pid::from_raw(pid as i32), sig);
            }
            let status = match tokio::time::timeout(Duration::from_secs(10), child.wait()).await {
                Ok(s) => s?,
                Err(_) => {
                    let _ = child.start_kill();
                    child.wait().await?
                }
            };
            Ok(exit_code(status))
        }
    }
}

/// The instance `muster run` keeps registered.
fn registration(args: &RunArgs) -> Registration {
    let i = &args.instance;
    let mut r = Registration::new(&args.service, &i.address, i.port).ttl(args.ttl);
    r.id = args.id.clone();
    r.tags = i.tags.clone();
    r.meta = i.meta.iter().cloned().collect();
    r.zone = i.zone.clone();
    r
}

/// `call`, failing if it takes longer than `limit`.
async fn bounded<T>(
    limit: Duration,
    call: impl Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    tokio::time::timeout(limit, call)
        .await
        .unwrap_or_else(|_| Err(anyhow::anyhow!("the agent did not answer within {limit:?}")))
}

enum Outcome {
    Exited(std::process::ExitStatus),
    Signal(Signal),
}

fn exit_code(status: std::process::ExitStatus) -> ExitCode {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => ExitCode::from(u8::try_from(c).unwrap_or(1)),
        (None, Some(sig)) => ExitCode::from(128u8.saturating_add(sig as u8)),
        _ => ExitCode::from(1),
    }
}
