//! Parsing the agent's server-sent-events stream.
