//! The ACL token a client presents to agents that have ACLs on.

use http::HeaderValue;

use crate::Error;

/// An ACL token's secret, sent as `X-Consul-Token` with every call to an agent.
///
/// Its `Debug` prints `<hidden>`, so a config holding one can be logged. Checked when
/// used (by [`Builder::build`](crate::Builder::build), or [`Token::header_value`]).
///
/// ```
/// use muster_client::Token;
///
/// let token = Token::new("0b7f3a5e-7c61-4c8e-9a4e-2f1d9b6c8e10");
/// assert_eq!(format!("{token:?}"), "<hidden>");
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl Token {
    /// The header the token travels in, Consul's. (The agent also takes `Authorization:
    /// Bearer` and `?token=`; a header keeps the secret out of URLs, which get logged.)
    pub const HEADER: &'static str = "x-consul-token";

    /// A token with this secret.
    pub fn new(secret: impl Into<String>) -> Token {
        Token(secret.into())
    }

    /// The secret itself.
    pub fn secret(&self) -> &str {
        &self.0
    }

    /// The secret as a header value, marked sensitive (HTTP/2 will not index it, and its
    /// `Debug` hides it). Fails, without quoting the secret, when it is empty or holds
    /// anything but visible ASCII: no header could carry it as given.
    pub fn header_value(&self) -> Result<HeaderValue, Error> {
        if self.0.is_empty() {
            return Err(Error::invalid(
                "token",
                "empty; leave the token unset to call without one",
            ));
        }
        if let Some(at) = self.0.bytes().position(|b| !b.is_ascii_graphic()) {
            return Err(Error::invalid(
                "token",
                format!(
                    "byte {} of {} is not visible ASCII (a space, a line break, a control \
                     or non-ASCII character)",
                    at + 1,
                    self.0.len()
                ),
            ));
        }
        let mut value = HeaderValue::from_str(&self.0)
            .map_err(|_| Error::invalid("token", "not a valid header value"))?;
        value.set_sensitive(true);
        Ok(value)
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<hidden>")
    }
}

impl From<&str> for Token {
    fn from(secret: &str) -> Token {
        Token::new(secret)
    }
}

impl From<String> for Token {
    fn from(secret: String) -> Token {
        Token::new(secret)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_never_shows_the_secret() {
        let token = Token::new("s3cr3t-value");
        assert_eq!(format!("{token:?}"), "<hidden>");
        assert_eq!(format!("{:?}", Some(token.clone())), "Some(<hidden>)");
        let header = token.header_value().unwrap();
        assert!(header.is_sensitive());
        assert!(!format!("{header:?}").contains("s3cr3t"));
    }

    #[test]
    fn a_token_no_header_can_carry_is_refused_without_quoting_it() {
        for bad in ["", "abc\n", "two words", "caf\u{e9}", "tab\there"] {
            match Token::new(bad).header_value() {
                Err(Error::InvalidSetting { setting, reason }) => {
                    assert_eq!(setting, "token");
                    if !bad.is_empty() {
                        assert!(!reason.contains(bad), "{reason}");
                    }
                }
                other => panic!("{bad:?} was accepted: {other:?}"),
            }
        }
        assert_eq!(
            Token::new("b6a1f9e2-0c1d-4e5f-8a9b-1c2d3e4f5a6b")
                .header_value()
                .unwrap(),
            "b6a1f9e2-0c1d-4e5f-8a9b-1c2d3e4f5a6b"
        );
    }
}
