//! The dashboard at `/ui/`: three static files (HTML, one JS module, CSS) embedded in the
//! binary, so `cargo build` alone makes an agent that serves it. No build step: the files
//! under `http/ui/` are what browsers get.
//!
//! Routing is by URL fragment (`#/services/web`), so the only page is `/ui/`; any other path
//! under `/ui/` that is not one of the assets is a 404. Answers say `Cache-Control: no-cache`
//! with an ETag (a hash of the file), so browsers revalidate and get a 304 until the agent is
//! upgraded, and a content security policy that keeps the page to its own origin.

use axum::Router;
use axum::extract::Path;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;

use crate::AppState;

/// One embedded file.
struct Asset {
    body: &'static [u8],
    content_type: &'static str,
    etag: u64,
}

const fn asset(body: &'static [u8], content_type: &'static str) -> Asset {
    Asset {
        body,
        content_type,
        etag: fnv1a(body),
    }
}

const INDEX: Asset = asset(include_bytes!("ui/index.html"), "text/html; charset=utf-8");

/// The files besides the page, by name under `/ui/`.
const ASSETS: &[(&str, Asset)] = &[
    (
        "app.js",
        asset(
            include_bytes!("ui/app.js"),
            "text/javascript; charset=utf-8",
        ),
    ),
    (
        "app.css",
        asset(include_bytes!("ui/app.css"), "text/css; charset=utf-8"),
    ),
];

/// The page talks only to this agent: no inline script, no other origin, no framing.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
                   img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// FNV-1a, 64 bits: computed at compile time, so the ETag costs nothing per request and
/// changes whenever a file does.
const fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < bytes.len() {
        hash ^= bytes[i] as u64;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        i += 1;
    }
    hash
}

/// `/ui` and everything under `/ui/`.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/ui", get(|| async { Redirect::permanent("/ui/") }))
        .route(
            "/ui/",
            get(|headers: HeaderMap| async move { serve(&INDEX, &headers) }),
        )
        .route("/ui/{*path}", get(file))
}

async fn file(Path(path): Path<String>, headers: HeaderMap) -> Response {
    match ASSETS.iter().find(|(name, _)| *name == path) {
        Some((_, a)) => serve(a, &headers),
        None => (
            StatusCode::NOT_FOUND,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            "no such file in the dashboard; it is at /ui/\n",
        )
            .into_response(),
    }
}

fn serve(a: &Asset, headers: &HeaderMap) -> Response {
    let etag = format!("\"{:016x}\"", a.etag);
    let fresh = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
    let mut out = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static(a.content_type),
            )],
            a.body,
        )
            .into_response()
    };
    let h = out.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&etag) {
        h.insert(header::ETAG, v);
    }
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Well under the 500 KB the dashboard may weigh; the files are meant to stay small.
    const BUDGET: usize = 60 * 1024;

    #[test]
    fn dashboard_stays_small() {
        let total: usize =
            INDEX.body.len() + ASSETS.iter().map(|(_, a)| a.body.len()).sum::<usize>();
        assert!(total < BUDGET, "the dashboard weighs {total} bytes");
    }

    #[test]
    fn etag_follows_content() {
        assert_ne!(fnv1a(b"a"), fnv1a(b"b"));
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        // FNV-1a's published test vector.
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn page_loads_only_its_own_files() {
        let page = std::str::from_utf8(INDEX.body).unwrap_or("");
        assert!(!page.contains("://"), "the page names another origin");
        for (name, _) in ASSETS {
            assert!(page.contains(name), "the page does not load {name}");
        }
        // The policy forbids other origins even if a file named one.
        assert!(CSP.contains("default-src 'none'") && CSP.contains("connect-src 'self'"));
    }
}
