//! `muster`: the agent and the command-line client in one binary.
//!
//! # Layout
//!
//! - [`args`]: the command line (clap), phase one: raw flags.
//! - [`agent`]: `muster agent`, which builds the config (file, then flags) and serves.
//! - [`client`]: the HTTP calls the other commands make.
//! - [`commands`]: register, deregister, heartbeat, services, discover, watch, status,
//!   members, catalog.
//! - [`run`]: `muster run`, which keeps a child process registered while it lives.
//! - [`gateway`]: `muster gateway`, the reverse proxy, on a multi-threaded runtime of its own.

mod agent;
mod args;
mod client;
mod commands;
mod fd_limit;
mod gateway;
mod run;

use std::process::ExitCode;

use clap::Parser;

use crate::args::{Cli, Command};

// mimalloc (why: muster-alloc's documentation).
#[global_allocator]
static ALLOCATOR: muster_alloc::Allocator = muster_alloc::Allocator;

/// Where the agent listens, and where the client commands look for it, by default.
pub(crate) const DEFAULT_HTTP_ADDR: &str = "127.0.0.1:8500";

fn main() -> ExitCode {
    let cli = Cli::parse();
    quiet_caught_panics();
    if let Command::Gateway(g) = cli.command {
        let token = client::resolve_token(cli.token.as_ref(), cli.token_file.as_deref(), |name| {
            std::env::var(name).ok()
        });
        return match token.and_then(|token| gateway::main(cli.http_addr.as_deref(), token, g)) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::from(1)
            }
        };
    }
    // One thread: the agent spreads HTTP connections over threads of its own
    // (`--http-threads`), and the client commands need no more.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(async move {
        if let Command::Agent(a) = cli.command {
            return agent::run(cli.http_addr.as_deref(), a)
                .await
                .map(|()| ExitCode::SUCCESS);
        }
        let target = client::Target::resolve(&cli, |name| std::env::var(name).ok())?;
        if let Some(warning) = target.warning() {
            eprintln!("{warning}");
        }
        match cli.command {
            Command::Run(r) => run::run(&target, r).await,
            other => commands::dispatch(&target, other)
                .await
                .map(|()| ExitCode::SUCCESS),
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            // A closed pipe (`muster services | head`) is not an error.
            if e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) {
                return ExitCode::SUCCESS;
            }
            if let Some(none) = e.downcast_ref::<commands::NothingFound>() {
                eprintln!("{none}");
                return ExitCode::from(commands::NOTHING_FOUND);
            }
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// Panics the store catches (redb's, on a damaged database file) become one error line that
/// names the file; the default hook would print another message, and a backtrace, before it.
fn quiet_caught_panics() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !muster_store::panic_is_caught() {
            default(info);
        }
    }));
}
