//! The client's errors.

/// What can go wrong.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A setting given to the builder (or to a registration) is not valid.
    #[error("invalid setting {setting}: {reason}")]
    InvalidSetting {
        /// The setting, as the builder method names it.
        setting: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The service has no instance to pick (none registered, none known yet, or all in
    /// maintenance).
    #[error("no endpoints for service {service:?}")]
    NoEndpoints {
        /// The service.
        service: String,
    },
    /// No agent could be reached.
    #[error("no agent could be reached (tried {tried}): {last}")]
    Unreachable {
        /// The agents tried, comma-separated.
        tried: String,
        /// The last failure.
        last: String,
    },
    /// An agent answered with an error.
    #[error("the agent at {agent} answered {status}: {message}")]
    Agent {
        /// The agent's base URL.
        agent: String,
        /// The HTTP status.
        status: u16,
        /// The agent's error message.
        message: String,
    },
    /// No tokio runtime is running where one is needed.
    #[error("muster-client needs a tokio runtime: build the client inside one")]
    NoRuntime,
}

impl Error {
    pub(crate) fn invalid(setting: &'static str, reason: impl Into<String>) -> Error {
        Error::InvalidSetting {
            setting,
            reason: reason.into(),
        }
    }
}
