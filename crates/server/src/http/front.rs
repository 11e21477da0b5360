//! The discovery reads' own HTTP/1.1 reader and writer, in front of hyper on every
//! connection ([`conn::serve`](super::conn::serve)).
//!
//! A discovery read is a GET with a short head and a small answer, and most of its cost in
//! hyper was hyper's: the request's header map and URI, the dispatcher's state machine, the
//! service and body types, the head's encoding. Here the head is parsed in place with
//! httparse, the read ([`fast`](super::fast)) goes through the same [`edge`] as through the
//! router, and the answer is written with one `writev`.
//!
//! Only what is plainly a discovery read is answered here: `GET`, HTTP/1.1, a path and
//! query of ordinary characters, no body, no `Upgrade` or `Expect`, a `Connection` header of
//! `close` or `keep-alive` at most. Anything else, and everything after it on the same
//! connection, is hyper's: the bytes already read are read again first by it, so every
//! other answer (400, 431, HEAD, other routes) stays hyper's and the router's.

use std::mem::MaybeUninit;

use muster_h1 as h1;

use axum::body::{Body, Bytes};
use axum::http::response::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use bytes::BytesMut;
use http_body_util::BodyExt;

use super::JsonRead;
use super::edge::{self, Admitted, Asked};
use super::fast::{self, Fast};
use crate::AppState;

/// Headers a request answered here may carry; one with more is hyper's.
const MAX_HEADERS: usize = 32;

/// What the bytes at the start of a connection's buffer are.
// Returned once per request and taken apart at once: boxing the read would cost an
// allocation per request to save a move.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Head {
    /// Not a whole request head yet.
    Partial,
    /// Not a request answered here (or not a valid one): hyper's, with the rest of the
    /// connection.
    Other,
    /// A discovery read, whose head is the buffer's first `len` bytes.
    Read(Read),
}

/// A discovery read, parsed and through the edge.
pub(crate) struct Read {
    pub(crate) len: usize,
    /// The client asked to close the connection after the answer.
    pub(crate) close: bool,
    pub(crate) fast: Fast,
    pub(crate) query: Option<String>,
    pub(crate) headers: HeaderMap,
    /// Let through by the edge, or the edge's answer refusing it.
    pub(crate) passed: Admitted,
}

/// Parses the request head at the start of `buf`.
pub(crate) fn head(state: &AppState, buf: &[u8]) -> Head {
    if buf.is_empty() {
        return Head::Partial;
    }
    let mut headers = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(buf, &mut headers) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Head::Partial,
        Err(_) => return Head::Other,
    };
    if req.method != Some("GET") || req.version != Some(1) {
        return Head::Other;
    }
    let Some(target) = req
        .path
        .filter(|t| t.starts_with('/') && t.bytes().all(plain))
    else {
        return Head::Other;
    };
    let (path, query) = match target.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (target, None),
    };
    let acl = state.acl().enabled();
    // The headers a route answered here reads: the token's (with ACLs on) and the stream's
    // `Last-Event-ID`.
    let mut kept = HeaderMap::new();
    let mut body = false;
    let mut close = false;
    for h in req.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("content-length") {
            body |= h.value != b"0";
        } else if name.eq_ignore_ascii_case("transfer-encoding")
            || name.eq_ignore_ascii_case("upgrade")
            || name.eq_ignore_ascii_case("expect")
        {
            return Head::Other;
        } else if name.eq_ignore_ascii_case("connection") {
            for option in h.value.split(|&b| b == b',') {
                let option = option.trim_ascii();
                if option.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if !option.eq_ignore_ascii_case(b"keep-alive") {
                    return Head::Other;
                }
            }
        } else if name.eq_ignore_ascii_case("last-event-id")
            || acl
                && (name.eq_ignore_ascii_case("x-consul-token")
                    || name.eq_ignore_ascii_case("authorization"))
        {
            let (Ok(name), Ok(value)) = (
                header::HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_bytes(h.value),
            ) else {
                return Head::Other;
            };
            kept.append(name, value);
        }
    }
    let Some(fast) = fast::matched_parts(&Method::GET, path, query, body) else {
        return Head::Other;
    };
    let asked = Asked {
        method: &Method::GET,
        path,
        query,
        headers: &kept,
    };
    let passed = edge::admit(state, fast.label(), &asked);
    Head::Read(Read {
        len,
        close,
        query: query.map(str::to_owned),
        headers: kept,
        fast,
        passed,
    })
}

/// A byte of a request target answered here: letters, digits and the URI punctuation that
/// every parser on the way (hyper's `Uri` included) takes as it is.
fn plain(b: u8) -> bool {
    PLAIN[usize::from(b)]
}

/// [`plain`]'s answer for each byte, worked out once.
static PLAIN: [bool; 256] = {
    let mut table = [false; 256];
    let punctuation = b"-._~!$&'()*+,;=:@/?%";
    let mut i = 0;
    while i < punctuation.len() {
        table[punctuation[i] as usize] = true;
        i += 1;
    }
    let mut b = 0u8;
    while b < 128 {
        table[b as usize] |= b.is_ascii_alphanumeric();
        b += 1;
    }
    table
};

/// The whole of a response body. The answers given here are in memory already: one frame.
pub(crate) async fn body_bytes(mut body: Body) -> Result<Bytes, axum::Error> {
    let first = match body.frame().await {
        None => return Ok(Bytes::new()),
        Some(frame) => frame?.into_data().unwrap_or_default(),
    };
    if http_body::Body::is_end_stream(&body) {
        return Ok(first);
    }
    let mut all = BytesMut::from(&first[..]);
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            all.extend_from_slice(&data);
        }
    }
    Ok(all.freeze())
}

/// Writes the head of an answer of `parts` with a body of `len` bytes (none: a stream of
/// unknown length, sent in chunks) to `out`, as hyper would: the status line, the handler's
/// headers, `lines` (whole header lines, written as they are), `content-length` or
/// `transfer-encoding: chunked`, `connection: close` when the connection ends after it, and
/// `date`.
pub(crate) fn encode_head(
    parts: &Parts,
    lines: &[&str],
    len: Option<usize>,
    close: bool,
    out: &mut Vec<u8>,
) {
    status_line(parts.status, out);
    for (name, value) in &parts.headers {
        if name == header::CONTENT_LENGTH
            || name == header::TRANSFER_ENCODING
            || name == header::CONNECTION
        {
            continue;
        }
        header_line(name.as_str(), value.as_bytes(), out);
    }
    let len = len.filter(|_| has_body(parts.status));
    let chunked = len.is_none() && has_body(parts.status);
    end_head(
        lines,
        len,
        chunked,
        close,
        !parts.headers.contains_key(header::DATE),
        out,
    );
}

/// [`encode_head`] for a discovery read's answer, as hyper would write it once it is a
/// `Response` ([`JsonRead::into_response`](super::JsonRead)): the same headers, in the same
/// order.
pub(crate) fn encode_json_head(json: &JsonRead, lines: &[&str], close: bool, out: &mut Vec<u8>) {
    status_line(StatusCode::OK, out);
    out.extend_from_slice(b"content-type: application/json\r\n");
    let (name, index) = json.index;
    header_line(
        name.as_str(),
        itoa::Buffer::new().format(index).as_bytes(),
        out,
    );
    if let Some((name, value)) = json.flag {
        header_line(name.as_str(), value.as_bytes(), out);
    }
    end_head(lines, Some(json.body.len()), false, close, true, out);
}

/// The end of a head: `lines`, the body's length (or chunked), `connection: close`, `date`
/// (unless the handler set its own), and the blank line.
fn end_head(
    lines: &[&str],
    len: Option<usize>,
    chunked: bool,
    close: bool,
    date: bool,
    out: &mut Vec<u8>,
) {
    for line in lines {
        out.extend_from_slice(line.as_bytes());
    }
    if let Some(len) = len {
        h1::content_length_line(len as u64, out);
    } else if chunked {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    if date {
        h1::date_line(out);
    }
    out.extend_from_slice(b"\r\n");
}

pub(crate) use h1::{
    CHUNK_SIZE_LINE, chunk_size_line, has_body, header_line, status_line, write_all,
};

#[cfg(test)]
mod tests {
    use axum::response::Response;

    use super::*;

    #[test]
    fn a_head_is_written_with_length_and_date_and_no_length_of_the_handlers() {
        let resp = Response::builder()
            .status(StatusCode::OK)
            .header("content-type", "application/json")
            .header("content-length", "999")
            .header("x-consul-index", "7")
            .body(())
            .unwrap();
        let (parts, ()) = resp.into_parts();
        let mut out = Vec::new();
        encode_head(&parts, &["x-a: b\r\n", ""], Some(12), false, &mut out);
        let text = String::from_utf8(out).unwrap();
        let mut lines = text.split("\r\n");
        assert_eq!(lines.next(), Some("HTTP/1.1 200 OK"));
        let rest: Vec<&str> = lines.collect();
        assert!(rest.contains(&"content-type: application/json"), "{text}");
        assert!(rest.contains(&"x-consul-index: 7"), "{text}");
        assert!(rest.contains(&"x-a: b"), "{text}");
        assert!(rest.contains(&"content-length: 12"), "{text}");
        assert!(!rest.iter().any(|l| l.contains("999")), "{text}");
        assert!(!rest.iter().any(|l| l.starts_with("connection")), "{text}");
        let date = rest.iter().find_map(|l| l.strip_prefix("date: ")).unwrap();
        assert!(httpdate::parse_http_date(date).is_ok(), "{date}");
        assert!(text.ends_with("\r\n\r\n"), "{text}");
    }

    #[test]
    fn a_closing_answer_says_so_and_a_bodiless_status_has_no_length() {
        let (parts, ()) = Response::builder()
            .status(StatusCode::NOT_MODIFIED)
            .body(())
            .unwrap()
            .into_parts();
        let mut out = Vec::new();
        encode_head(&parts, &[], Some(0), true, &mut out);
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 304 Not Modified\r\n"), "{text}");
        assert!(text.contains("\r\nconnection: close\r\n"), "{text}");
        assert!(!text.contains("content-length"), "{text}");
    }

    #[test]
    fn only_ordinary_target_bytes_are_plain() {
        for t in [
            "/v1/health/service/web?passing&index=5&wait=1s",
            "/api/v1/services/a-b.c",
        ] {
            assert!(t.bytes().all(plain), "{t}");
        }
        for t in [
            "/a b", "/a\"b", "/a{b}", "/a\\b", "/a<b>", "/a|b", "/a^b", "/a`b",
        ] {
            assert!(!t.bytes().all(plain), "{t}");
        }
    }
}
