//! `muster agent`: config file, then flags, then serve until Ctrl-C or TERM.

use std::sync::Arc;

use anyhow::{Context, bail};
use muster_server::{Agent, AgentConfig};
use muster_store::{MemoryStore, RedbStore, Store};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use crate::args::AgentArgs;

/// Builds the config: defaults, then the file, then flags.
fn config(http_addr: Option<&str>, args: &AgentArgs) -> anyhow::Result<AgentConfig> {
    let mut c = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the config file {}", path.display()))?;
            AgentConfig::from_toml(&text)
                .with_context(|| format!("invalid config file {}", path.display()))?
        }
        None => AgentConfig::default(),
    };
    if let Some(addr) = http_addr {
        c.http_addr = addr.parse().with_context(|| {
            format!("--http-addr {addr:?} must be an IP address and port, e.g. 127.0.0.1:8500")
        })?;
    }
    if let Some(d) = &args.data_dir {
        c.data_dir = d.clone();
    }
    c.dev |= args.dev;
    if let Some(v) = &args.datacenter {
        c.datacenter = v.clone();
    }
    if let Some(v) = &args.node {
        c.node = v.clone();
    }
    if c.node.is_empty() {
        c.node = gethostname::gethostname().to_string_lossy().into_owned();
    }
    if let Some(v) = args.evict_after {
        c.evict_after = v;
    }
    if let Some(v) = args.max_body_bytes {
        c.max_body_bytes = v;
    }
    if let Some(v) = args.max_watchers {
        c.max_watchers = v;
    }
    if args.disable_self_preservation {
        c.self_preservation.enabled = false;
    }
    if let Some(v) = args.self_preservation_threshold {
        c.self_preservation.threshold = v;
    }
    if let Some(v) = args.self_preservation_min {
        c.self_preservation.min_renewers = v;
    }
    if !(0.0..=1.0).contains(&c.self_preservation.threshold) {
        bail!("the self-preservation threshold must be between 0 and 1");
    }
    Ok(c)
}

/// Runs the agent until Ctrl-C or TERM.
pub async fn run(http_addr: Option<&str>, args: AgentArgs) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_new(&args.log)
                .with_context(|| format!("invalid --log filter {:?}", args.log))?,
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let config = config(http_addr, &args)?;
    let store: Arc<dyn Store> = if config.dev {
        tracing::warn!("--dev: everything is kept in memory and lost when the agent stops");
        Arc::new(MemoryStore::new())
    } else {
        let dir = config.data_dir.clone();
        Arc::new(
            tokio::task::spawn_blocking(move || RedbStore::open(&dir))
                .await?
                .context("is another agent using this data directory? pick another with --data-dir, or use --dev")?,
        )
    };
    let listener = TcpListener::bind(config.http_addr).await.with_context(|| {
        format!(
            "cannot listen on {}; is another agent running? choose another with --http-addr",
            config.http_addr
        )
    })?;
    let shutdown = CancellationToken::new();
    let addr = listener.local_addr()?;
    let data = if config.dev {
        "memory (--dev)".to_string()
    } else {
        config.data_dir.display().to_string()
    };
    let agent = Agent::open(config, store, shutdown.clone()).await?;
    tracing::info!(http = %addr, data = %data, "muster agent ready");
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutting down");
        shutdown.cancel();
    });
    agent.serve(listener).await?;
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use clap::Parser;

    use super::*;
    use crate::args::{Cli, Command};

    fn agent_args(argv: &[&str]) -> (Option<String>, AgentArgs) {
        let cli = Cli::try_parse_from(argv).unwrap();
        match cli.command {
            Command::Agent(a) => (cli.http_addr, a),
            _ => panic!("not the agent command"),
        }
    }

    #[test]
    fn flags_override_the_config_file_which_overrides_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("muster.toml");
        std::fs::write(
            &file,
            "http_addr = \"127.0.0.1:9000\"\nevict_after = \"5m\"\ndatacenter = \"eu\"\n",
        )
        .unwrap();
        let path = file.to_str().unwrap();
        let (http, args) =
            agent_args(&["muster", "agent", "--config", path, "--evict-after", "2m"]);
        let c = config(http.as_deref(), &args).unwrap();
        assert_eq!(
            c.evict_after,
            Duration::from_secs(120),
            "flag wins over file"
        );
        assert_eq!(c.http_addr.port(), 9000, "file wins over default");
        assert_eq!(c.datacenter, "eu");
        assert_eq!(c.max_body_bytes, AgentConfig::default().max_body_bytes);

        let (http, args) = agent_args(&[
            "muster",
            "--http-addr",
            "127.0.0.1:9100",
            "agent",
            "--config",
            path,
        ]);
        assert_eq!(
            config(http.as_deref(), &args).unwrap().http_addr.port(),
            9100
        );
    }

    #[test]
    fn bad_settings_are_refused_with_the_reason() {
        let (http, args) = agent_args(&["muster", "--http-addr", "localhost", "agent"]);
        let err = format!("{:#}", config(http.as_deref(), &args).unwrap_err());
        assert!(err.contains("--http-addr"), "{err}");

        let (http, args) = agent_args(&["muster", "agent", "--self-preservation-threshold", "1.5"]);
        let err = format!("{:#}", config(http.as_deref(), &args).unwrap_err());
        assert!(err.contains("threshold"), "{err}");

        let (http, args) = agent_args(&["muster", "agent", "--config", "/nonexistent/muster.toml"]);
        let err = format!("{:#}", config(http.as_deref(), &args).unwrap_err());
        assert!(err.contains("/nonexistent/muster.toml"), "{err}");
    }
}
