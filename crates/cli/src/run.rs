//! `muster run`: keep a child process registered for as long as it lives.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use reqwest::Method;
use tokio::process::Command;
use tokio::signal::unix::{SignalKind, signal};

use crate::args::RunArgs;
use crate::client::Client;
use crate::commands::instance_path;

/// Registers, starts the command, heartbeats, and deregisters when it ends.
pub async fn run(addr: &str, args: RunArgs) -> anyhow::Result<ExitCode> {
    let client = Client::new(addr);
    let host = gethostname::gethostname().to_string_lossy().into_owned();
    let id = args.id.clone().unwrap_or_else(|| {
        let host: String = host
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '-'
                }
            })
            .collect();
        format!("{}-{host}-{}", args.service, args.instance.port)
    });
    let path = instance_path(&args.service, &id);
    let mut body = args.instance.body();
    body["ttl"] = serde_json::json!(humantime::format_duration(args.ttl).to_string());

    // Listen for TERM and INT before the child exists, so a signal that arrives while
    // registering still reaches the child instead of orphaning it.
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut child = Command::new(&args.command[0])
        .args(&args.command[1..])
        .spawn()
        .with_context(|| format!("cannot start {:?}", args.command[0]))?;
    let registered = tokio::select! {
        r = bounded(args.ttl, client.call(Method::PUT, &path, Some(&body))) => r.map(|_| ()),
        _ = term.recv() => Err(anyhow::anyhow!("interrupted by TERM")),
        _ = int.recv() => Err(anyhow::anyhow!("interrupted by INT")),
    };
    if let Err(e) = registered {
        let _ = child.start_kill();
        let _ = child.wait().await;
        return Err(e.context("registration failed; the command was stopped"));
    }
    eprintln!("muster: registered {}/{id}", args.service);

    let heartbeat_path = format!("{path}/heartbeat");
    let period = args.ttl / 3;
    let mut next = tokio::time::Instant::now() + jittered(period);
    let outcome = loop {
        tokio::select! {
            status = child.wait() => break Outcome::Exited(status?),
            _ = term.recv() => break Outcome::Signal(Signal::SIGTERM),
            _ = int.recv() => break Outcome::Signal(Signal::SIGINT),
            () = tokio::time::sleep_until(next) => {
                next = tokio::time::Instant::now() + jittered(period);
                // A heartbeat later than the period is worthless; bounding the calls keeps an
                // agent that stopped answering from blocking child exits and signals.
                let beat = client.send(Method::PUT, &heartbeat_path, None);
                match bounded(period, beat).await {
                    Ok(r) if r.status() == reqwest::StatusCode::NOT_FOUND => {
                        // The agent forgot us (evicted, or a wiped agent): register again.
                        let again = client.call(Method::PUT, &path, Some(&body));
                        if let Err(e) = bounded(period, again).await {
                            eprintln!("muster: re-registration failed: {e:#}");
                        }
                    }
                    Ok(_) => {}
                    Err(e) => eprintln!("muster: heartbeat failed: {e:#}"),
                }
            }
        }
    };

    // Past the TTL the instance lapses anyway; do not wait longer for the agent.
    let deregister = client.call(Method::DELETE, &path, None);
    if let Err(e) = bounded(args.ttl, deregister).await {
        eprintln!("muster: deregistration failed: {e:#}");
    } else {
        eprintln!("muster: deregistered {}/{id}", args.service);
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

/// A period with up to ±10% jitter, so many instances do not heartbeat in lockstep.
fn jittered(period: Duration) -> Duration {
    let spread = period.as_millis() as u64 / 5;
    period.saturating_sub(Duration::from_millis(spread / 2))
        + Duration::from_millis(fastrand::u64(0..=spread))
}

fn exit_code(status: std::process::ExitStatus) -> ExitCode {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => ExitCode::from(u8::try_from(c).unwrap_or(1)),
        (None, Some(sig)) => ExitCode::from(128u8.saturating_add(sig as u8)),
        _ => ExitCode::from(1),
    }
}
