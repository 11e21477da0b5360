//! The agent's settings: a config file (`--config muster.toml`) whose values command-line
//! flags override. Every bound a client can hit is here, with its default.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use muster_core::model::humantime_serde_compat;
use muster_core::{Limits, PreservationConfig, RegistryConfig};
use serde::{Deserialize, Serialize};

/// Everything the agent is configured with.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    /// HTTP listener.
    pub http_addr: SocketAddr,
    /// Where redb keeps its file.
    pub data_dir: PathBuf,
    /// Keep everything in memory, nothing on disk.
    pub dev: bool,
    /// Datacenter name.
    pub datacenter: String,
    /// Node name (defaults to the host name).
    pub node: String,
    /// How long an instance stays critical from a lapsed TTL before it is removed.
    #[serde(with = "humantime_serde_compat")]
    pub evict_after: Duration,
    /// How often lapsed TTLs, evictions and lease expiries are applied.
    #[serde(with = "humantime_serde_compat")]
    pub sweep_interval: Duration,
    /// Largest request body accepted, in bytes.
    pub max_body_bytes: usize,
    /// Most blocking queries and stream subscribers held at once; more get 429.
    pub max_watchers: usize,
    /// Bounds on registrations.
    pub limits: Limits,
    /// Self-preservation.
    pub self_preservation: PreservationConfig,
}

impl Default for AgentConfig {
    fn default() -> AgentConfig {
        AgentConfig {
            http_addr: SocketAddr::from(([127, 0, 0, 1], 8500)),
            data_dir: PathBuf::from("./muster-data"),
            dev: false,
            datacenter: "dc1".into(),
            node: String::new(),
            evict_after: Duration::from_secs(60),
            sweep_interval: Duration::from_millis(250),
            max_body_bytes: 64 * 1024,
            max_watchers: 65_536,
            limits: Limits::default(),
            self_preservation: PreservationConfig::default(),
        }
    }
}

impl AgentConfig {
    /// Reads a TOML config file. Unknown keys are errors, so typos do not pass silently.
    pub fn from_toml(text: &str) -> Result<AgentConfig, toml::de::Error> {
        toml::from_str(text)
    }

    /// The part of the config the state machine uses.
    pub fn registry(&self) -> RegistryConfig {
        RegistryConfig {
            limits: self.limits.clone(),
            evict_after: self.evict_after,
            preservation: self.self_preservation.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_file_overrides_only_what_it_names() {
        let c = AgentConfig::from_toml(
            r#"
            http_addr = "0.0.0.0:9500"
            evict_after = "5m"
            [limits]
            max_tags = 8
            [self_preservation]
            threshold = 0.5
            "#,
        )
        .unwrap();
        assert_eq!(c.http_addr.port(), 9500);
        assert_eq!(c.evict_after, Duration::from_secs(300));
        assert_eq!(c.limits.max_tags, 8);
        assert_eq!(c.limits.max_meta, Limits::default().max_meta);
        assert_eq!(c.self_preservation.threshold, 0.5);
        assert!(c.self_preservation.enabled);
    }

    #[test]
    fn unknown_config_keys_are_rejected_by_name() {
        let err = AgentConfig::from_toml("evict_afterr = \"1m\"").unwrap_err();
        assert!(err.to_string().contains("evict_afterr"), "{err}");
    }

    #[test]
    fn bad_durations_in_config_are_rejected() {
        assert!(AgentConfig::from_toml("evict_after = \"soon\"").is_err());
    }
}
