//! The views' copies on disk: written atomically with a checksum, read before the first
//! sync so a process that starts while the registry is down still finds its peers.
