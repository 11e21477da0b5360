//! Authentication: API keys from a file, and JWTs signed with HS256 or RS256.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use aws_lc_rs::digest::{SHA256, digest};
use http::header::{AUTHORIZATION, HeaderName};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Deserializer};

use super::{Denial, Identity};
use crate::table::RequestHeaders;

/// How a route authenticates requests. At least one of `api_keys_file` and `jwt` is set; when
/// both are, either a valid API key or a valid JWT is enough.
///
/// ```toml
/// [route.auth]
/// api_keys_file = "keys.txt"
/// api_key_header = "x-api-key"
/// jwt = { algorithm = "RS256", key_file = "jwt.pub.pem", issuer = "https://id.example", audience = "api", leeway = "30s" }
/// ```
///
/// - `api_keys_file`: the keys accepted, one per line, optionally preceded by a name and
///   whitespace (`billing-batch 3f9c...`); the name (or, without one, `sha256:` and the first
///   12 hex digits of the key's SHA-256) is the request's subject in the access log and for
///   `rate_limit.key = "subject"`. Lines starting with `#` and blank lines are skipped. A file
///   without keys, or with a key twice, is an error. Keys are held only as SHA-256 digests.
/// - `api_key_header`: the request header carrying the key, `x-api-key` by default. Only this
///   header is read; `Authorization: ApiKey <key>` is not accepted, since `Authorization`
///   carries the JWT (it can be the key header on routes without `jwt`, holding the bare key).
///   A request with the header twice is refused.
/// - `jwt`: see [`JwtConfig`]. The token comes from `Authorization: Bearer <token>`.
///
/// Paths are relative to the routes file's directory. The files are read when the routes file
/// is loaded; reload the routes to pick up a changed key file. A request without credentials
/// gets 401 `missing_credentials`; a wrong key 401 `invalid_api_key`; a bad token 401
/// `invalid_token`. 401s carry `WWW-Authenticate` (`Bearer` when JWTs are accepted).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// File of accepted API keys.
    #[serde(default)]
    pub api_keys_file: Option<PathBuf>,
    /// Header carrying the API key.
    #[serde(default = "default_api_key_header", deserialize_with = "header_name")]
    pub api_key_header: HeaderName,
    /// JWT verification.
    #[serde(default)]
    pub jwt: Option<JwtConfig>,
}

fn default_api_key_header() -> HeaderName {
    HeaderName::from_static("x-api-key")
}

fn header_name<'de, D: Deserializer<'de>>(d: D) -> Result<HeaderName, D::Error> {
    let text = String::deserialize(d)?;
    HeaderName::try_from(text.as_str())
        .map_err(|_| serde::de::Error::custom(format!("{text:?} is not a valid header name")))
}

/// How JWTs are verified.
///
/// - `algorithm`: `HS256` or `RS256`. Only this algorithm is accepted, whatever the token's
///   header says; `none` never is.
/// - `key_file`: for HS256 the shared secret, raw bytes, one trailing newline ignored, at least
///   32 bytes (RFC 7518 §3.2); for RS256 the PEM public key (`-----BEGIN PUBLIC KEY-----` or
///   `-----BEGIN RSA PUBLIC KEY-----`).
/// - `issuer`, `audience`: when set, the token's `iss` must equal it and its `aud` must
///   contain it. When `audience` is not set, tokens are accepted whatever their `aud`.
/// - `leeway`: clock skew allowed on `exp` and `nbf`, 30s by default, at most 1h.
///
/// Every token needs `exp`; `nbf` is honoured when present.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    /// The one accepted signature algorithm.
    pub algorithm: JwtAlgorithm,
    /// The HS256 secret or the RS256 public key.
    pub key_file: PathBuf,
    /// Required `iss`.
    #[serde(default)]
    pub issuer: Option<String>,
    /// Required member of `aud`.
    #[serde(default)]
    pub audience: Option<String>,
    /// Clock skew allowed on `exp` and `nbf`.
    #[serde(
        default = "default_leeway",
        with = "muster_core::model::humantime_serde_compat"
    )]
    pub leeway: Duration,
}

fn default_leeway() -> Duration {
    Duration::from_secs(30)
}

/// Leeway is for clock skew; more than this is a token lifetime in disguise, and a huge one
/// would overflow the library's `now - leeway`.
const MAX_LEEWAY: Duration = Duration::from_secs(3600);

/// RFC 7518 §3.2: an HS256 key must be at least as long as the hash output.
const MIN_HS256_SECRET: usize = 32;

/// JWT signature algorithms the gateway verifies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum JwtAlgorithm {
    /// HMAC with SHA-256 and a shared secret.
    HS256,
    /// RSASSA-PKCS1-v1_5 with SHA-256 and a public key.
    RS256,
}

impl JwtAlgorithm {
    fn as_jsonwebtoken(self) -> Algorithm {
        match self {
            JwtAlgorithm::HS256 => Algorithm::HS256,
            JwtAlgorithm::RS256 => Algorithm::RS256,
        }
    }
}

/// A route's compiled authentication.
#[derive(Debug)]
pub(super) struct Authenticator {
    keys: Option<ApiKeys>,
    jwt: Option<Jwt>,
}

// The WWW-Authenticate challenges for a request without valid credentials. "ApiKey" is no
// registered scheme, but RFC 9110 requires a challenge on every 401.
const CHALLENGE_KEY: &str = "ApiKey";
const CHALLENGE_BEARER: &str = "Bearer";
const CHALLENGE_BOTH: &str = "Bearer, ApiKey";
/// RFC 6750 §3.1: the answer to a token that was presented and refused.
const CHALLENGE_BAD_TOKEN: &str = "Bearer error=\"invalid_token\"";

impl Authenticator {
    pub(super) fn compile(config: &AuthConfig, base_dir: &Path) -> Result<Authenticator, String> {
        if config.api_keys_file.is_none() && config.jwt.is_none() {
            return Err("auth: set api_keys_file, jwt, or both".to_string());
        }
        if config.jwt.is_some() && config.api_key_header == AUTHORIZATION {
            return Err(
                "auth.api_key_header: Authorization carries the JWT; name another header for API keys"
                    .to_string(),
            );
        }
        let keys = config
            .api_keys_file
            .as_ref()
            .map(|file| ApiKeys::load(&base_dir.join(file), config.api_key_header.clone()))
            .transpose()
            .map_err(|e| format!("auth.api_keys_file: {e}"))?;
        let jwt = config
            .jwt
            .as_ref()
            .map(|j| Jwt::compile(j, base_dir))
            .transpose()?;
        Ok(Authenticator { keys, jwt })
    }

    fn challenge(&self) -> &'static str {
        match (&self.keys, &self.jwt) {
            (Some(_), Some(_)) => CHALLENGE_BOTH,
            (None, Some(_)) => CHALLENGE_BEARER,
            _ => CHALLENGE_KEY,
        }
    }

    pub(super) fn check<H: RequestHeaders + ?Sized>(
        &self,
        headers: &H,
    ) -> Result<Identity, Denial> {
        // Either credential is enough: the first that verifies wins, and a refusal reports
        // every credential that was presented.
        let key_error = match self.keys.as_ref().and_then(|keys| keys.check(headers)) {
            Some(Ok(identity)) => return Ok(identity),
            Some(Err(e)) => Some(e),
            None => None,
        };
        let token_error = match self.jwt.as_ref().and_then(|jwt| jwt.check(headers)) {
            Some(Ok(identity)) => return Ok(identity),
            Some(Err(e)) => Some(e),
            None => None,
        };
        Err(match (key_error, token_error) {
            (Some(key), Some(token)) => Denial::unauthorized(
                "invalid_token",
                format!("{key}, and {token}"),
                CHALLENGE_BAD_TOKEN,
            ),
            (None, Some(token)) => {
                Denial::unauthorized("invalid_token", token, CHALLENGE_BAD_TOKEN)
            }
            (Some(key), None) => Denial::unauthorized("invalid_api_key", key, self.challenge()),
            (None, None) => Denial::unauthorized(
                "missing_credentials",
                self.missing_message(),
                self.challenge(),
            ),
        })
    }

    fn missing_message(&self) -> String {
        match (&self.keys, &self.jwt) {
            (Some(keys), Some(_)) => format!(
                "missing credentials: an API key (header {}) or a bearer token (Authorization: Bearer)",
                keys.header
            ),
            (Some(keys), None) => format!("missing API key (header {})", keys.header),
            _ => "missing bearer token (Authorization: Bearer)".to_string(),
        }
    }
}

/// Reads the one value of `name`, or says why there is none to use. `None` means absent.
fn single_header<'h, H: RequestHeaders + ?Sized>(
    headers: &'h H,
    name: &'h HeaderName,
) -> Option<Result<&'h [u8], String>> {
    let mut values = headers.values(name);
    let first = values.next()?;
    // Two values leave it to each hop to pick one; an upstream might pick the other.
    if values.next().is_some() {
        return Some(Err(format!("more than one {name} header")));
    }
    let value = first.trim_ascii();
    if value.is_empty() {
        return None;
    }
    Some(Ok(value))
}

/// The accepted API keys, by SHA-256 digest.
///
/// Lookup is by digest, so its timing depends only on the digest of what the client sent,
/// never on how much of a real key it guessed: learning which digest bytes match reveals
/// nothing usable without a SHA-256 preimage.
struct ApiKeys {
    header: HeaderName,
    by_digest: HashMap<[u8; 32], String>,
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiKeys")
            .field("header", &self.header)
            .field("keys", &self.by_digest.len())
            .finish()
    }
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0; 32];
    out.copy_from_slice(digest(&SHA256, bytes).as_ref());
    out
}

impl ApiKeys {
    fn load(path: &Path, header: HeaderName) -> Result<ApiKeys, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let by_digest = parse_keys(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(ApiKeys { header, by_digest })
    }

    /// `None` when the request carries no key.
    fn check<H: RequestHeaders + ?Sized>(&self, headers: &H) -> Option<Result<Identity, String>> {
        let key = match single_header(headers, &self.header)? {
            Ok(key) => key,
            Err(e) => return Some(Err(e)),
        };
        Some(match self.by_digest.get(&sha256(key)) {
            Some(name) => Ok(Identity {
                subject: Some(name.clone()),
            }),
            None => Err(format!("API key not recognised (header {})", self.header)),
        })
    }
}

/// Parses a keys file into digests and names; the error names the line.
fn parse_keys(text: &str) -> Result<HashMap<[u8; 32], String>, String> {
    let mut keys: HashMap<[u8; 32], (String, usize)> = HashMap::new();
    for (index, line) in text.lines().enumerate() {
        let number = index + 1;
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut words = line.split_whitespace();
        let (name, key) = match (words.next(), words.next(), words.next()) {
            (Some(key), None, None) => (None, key),
            (Some(name), Some(key), None) => (Some(name), key),
            _ => {
                return Err(format!(
                    "line {number}: expected a key, or a name and a key, separated by whitespace"
                ));
            }
        };
        // A key a header cannot carry could never match; say so now rather than 401 forever.
        if !key.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(format!(
                "line {number}: the key has characters an HTTP header cannot carry (use printable ASCII)"
            ));
        }
        let digest = sha256(key.as_bytes());
        let name = match name {
            Some(name) => name.to_string(),
            None => format!("sha256:{}", hex_prefix(&digest)),
        };
        if let Some((_, first)) = keys.get(&digest) {
            return Err(format!("line {number}: repeats the key of line {first}"));
        }
        keys.insert(digest, (name, number));
    }
    if keys.is_empty() {
        return Err("holds no keys (one key per line; # starts a comment)".to_string());
    }
    Ok(keys
        .into_iter()
        .map(|(digest, (name, _))| (digest, name))
        .collect())
}

/// Enough of a digest to tell keys apart in a log. A reader could only use it to confirm a
/// guessed key, which is why keys should be long random strings.
fn hex_prefix(digest: &[u8; 32]) -> String {
    digest[..6].iter().map(|b| format!("{b:02x}")).collect()
}

/// A compiled JWT verifier.
struct Jwt {
    algorithm: Algorithm,
    key: DecodingKey,
    validation: Validation,
}

impl std::fmt::Debug for Jwt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jwt")
            .field("algorithm", &self.algorithm)
            .field("issuer", &self.validation.iss)
            .field("audience", &self.validation.aud)
            .finish_non_exhaustive()
    }
}

/// The claims the gateway reads; `exp`, `nbf`, `iss` and `aud` are checked by the library.
#[derive(Deserialize)]
struct Claims {
    #[serde(default)]
    sub: Option<String>,
}

impl Jwt {
    fn compile(config: &JwtConfig, base_dir: &Path) -> Result<Jwt, String> {
        if config.leeway > MAX_LEEWAY {
            return Err(format!(
                "auth.jwt.leeway: {} is more than the 1h allowed for clock skew",
                humantime::format_duration(config.leeway)
            ));
        }
        let path = base_dir.join(&config.key_file);
        let bytes = std::fs::read(&path)
            .map_err(|e| format!("auth.jwt.key_file: cannot read {}: {e}", path.display()))?;
        let key = match config.algorithm {
            JwtAlgorithm::HS256 => {
                let secret = bytes
                    .strip_suffix(b"\r\n")
                    .or_else(|| bytes.strip_suffix(b"\n"))
                    .unwrap_or(&bytes);
                if secret.len() < MIN_HS256_SECRET {
                    return Err(format!(
                        "auth.jwt.key_file: the HS256 secret in {} is {} bytes; at least {MIN_HS256_SECRET} are needed",
                        path.display(),
                        secret.len()
                    ));
                }
                DecodingKey::from_secret(secret)
            }
            JwtAlgorithm::RS256 => {
                // The PEM parser would take the public half out of a private key, but a
                // private key has no business on the gateway.
                if bytes.windows(11).any(|w| w == b"PRIVATE KEY") {
                    return Err(format!(
                        "auth.jwt.key_file: {} holds a private key; give the public key (openssl pkey -pubout)",
                        path.display()
                    ));
                }
                DecodingKey::from_rsa_pem(&bytes)
            }
        }
        .map_err(|e| {
            format!(
                "auth.jwt.key_file: {} is not a {:?} key: {e}",
                path.display(),
                config.algorithm
            )
        })?;
        let algorithm = config.algorithm.as_jsonwebtoken();
        // The accepted algorithm comes from the config alone; the library refuses tokens
        // whose header names another, which closes RS256→HS256 confusion.
        let mut validation = Validation::new(algorithm);
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.leeway = config.leeway.as_secs() + u64::from(config.leeway.subsec_nanos() > 0);
        // The library checks `iss` and `aud` only when the token has them; a configured
        // issuer or audience must also make the claim required, or leaving it out would pass.
        let mut required = vec!["exp"];
        if let Some(issuer) = &config.issuer {
            validation.set_issuer(&[issuer]);
            required.push("iss");
        }
        match &config.audience {
            Some(audience) => {
                validation.set_audience(&[audience]);
                required.push("aud");
            }
            // Without an expected audience the library would refuse every token that has one.
            None => validation.validate_aud = false,
        }
        validation.set_required_spec_claims(&required);
        Ok(Jwt {
            algorithm,
            key,
            validation,
        })
    }

    /// `None` when the request carries no bearer token.
    fn check<H: RequestHeaders + ?Sized>(&self, headers: &H) -> Option<Result<Identity, String>> {
        let value = match single_header(headers, &AUTHORIZATION)? {
            Ok(value) => value,
            Err(e) => return Some(Err(e)),
        };
        let token = match value.iter().position(|b| *b == b' ') {
            Some(space) if value[..space].eq_ignore_ascii_case(b"bearer") => {
                value[space..].trim_ascii()
            }
            _ => return Some(Err("Authorization is not a Bearer token".to_string())),
        };
        Some(
            jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
                .map(|data| Identity {
                    subject: data.claims.sub,
                })
                .map_err(|e| self.explain(e.kind(), token)),
        )
    }

    /// A message for a refused token that names the failed check but none of the token.
    fn explain(&self, kind: &ErrorKind, token: &[u8]) -> String {
        match kind {
            ErrorKind::ExpiredSignature => "JWT expired".to_string(),
            ErrorKind::ImmatureSignature => "JWT not valid yet (nbf is in the future)".to_string(),
            ErrorKind::InvalidSignature => "JWT signature invalid".to_string(),
            ErrorKind::InvalidIssuer => "JWT issuer (iss) not accepted on this route".to_string(),
            ErrorKind::InvalidAudience => {
                "JWT audience (aud) not accepted on this route".to_string()
            }
            ErrorKind::MissingRequiredClaim(claim) => format!("JWT has no {claim} claim"),
            ErrorKind::InvalidClaimFormat(claim) => format!("JWT claim {claim} is malformed"),
            ErrorKind::InvalidAlgorithm => match jsonwebtoken::decode_header(token) {
                Ok(header) => format!(
                    "JWT algorithm {:?} not accepted (this route takes {:?})",
                    header.alg, self.algorithm
                ),
                Err(_) => format!(
                    "JWT algorithm not accepted (this route takes {:?})",
                    self.algorithm
                ),
            },
            _ => "JWT malformed".to_string(),
        }
    }
}
