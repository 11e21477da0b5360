//! Wall-clock time for token expiry. Consul's `ExpirationTime` is an absolute instant that
//! every agent of a cluster must read alike, so unlike TTLs (the agent's own clock) it is
//! compared with the system clock.
#![allow(clippy::disallowed_types)]

use std::time::SystemTime;

/// Milliseconds since the epoch now.
pub fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Parses an RFC 3339 time (`Z` or a `±HH:MM` offset, fractions allowed) into
/// milliseconds since the epoch.
pub fn parse_time_ms(text: &str) -> Option<u64> {
    let (base, offset_s): (&str, i64) = if let Some(b) = text.strip_suffix('Z') {
        (b, 0)
    } else if text.len() > 6 && matches!(text.as_bytes()[text.len() - 6], b'+' | b'-') {
        let (b, off) = text.split_at(text.len() - 6);
        let sign = if off.starts_with('-') { -1 } else { 1 };
        let h: i64 = off.get(1..3)?.parse().ok()?;
        let m: i64 = off.get(4..6)?.parse().ok()?;
        (b, sign * (h * 3600 + m * 60))
    } else {
        (text, 0)
    };
    let t = humantime::parse_rfc3339_weak(base).ok()?;
    let ms = i64::try_from(t.duration_since(SystemTime::UNIX_EPOCH).ok()?.as_millis()).ok()?;
    u64::try_from(ms - offset_s * 1000).ok()
}

/// `ms` since the epoch in RFC 3339 with milliseconds, UTC.
pub fn format_time_ms(ms: u64) -> String {
    let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(ms);
    humantime::format_rfc3339_millis(t).to_string()
}
