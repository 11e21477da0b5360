//! The gateway's own HTTP/1.1 client, for the plain requests [`front`](crate::front)
//! answers: the request head is written as bytes, the answer's head is parsed in place with
//! httparse and turned straight into the client's head, and the body is relayed as it comes,
//! its chunked coding kept as the instance wrote it.
//!
//! A connection comes from the [`Pool`] (or is made), and goes back to it once its answer
//! has been read to the end and nothing follows it; an answer not read to its end (the client
//! went away, the instance broke off) closes it, since HTTP/1.1 cannot abandon one half-way.

use std::io;
use std::mem::MaybeUninit;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use http::StatusCode;
use muster_h1 as h1;
use tokio::io::{AsyncReadExt, AsyncWrite};
use tokio::net::TcpStream;

use crate::upstream::{Pool, Pooled, SendError};

/// An answer head larger than this is refused (502).
pub const MAX_ANSWER_HEAD: usize = 64 * 1024;
/// Headers an answer may have.
const MAX_ANSWER_HEADERS: usize = 100;
/// Room for each read of an answer.
const READ_ROOM: usize = 16 * 1024;
/// A pooled connection keeps a read buffer at most this large.
const KEPT_BUFFER: usize = 4 * 1024;

/// A connection to an instance, with what was read from it and not yet used.
#[derive(Debug)]
pub struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Pooled for Conn {
    /// Looks at the socket without waiting: an idle connection that has something to read
    /// was closed by the instance (or has bytes nobody asked for); either way it is done.
    /// The readiness is the reactor's, so an open, quiet connection costs no system call.
    fn is_closed(&self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        match self.stream.poll_read_ready(&mut cx) {
            Poll::Pending => false,
            Poll::Ready(Err(_)) => true,
            Poll::Ready(Ok(())) => {
                let mut probe = [0u8; 1];
                !matches!(self.stream.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
        }
    }
}

/// How an answer's body ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// It has none (a HEAD request, 204, 304).
    Empty,
    /// After this many bytes.
    Length(u64),
    /// With its last chunk (and trailers).
    Chunked,
    /// When the instance closes the connection.
    UntilClose,
}

/// An answer's head, read; its body not yet.
#[derive(Debug)]
pub struct Answer {
    conn: Conn,
    /// Where the body starts in `conn.buf`.
    body_at: usize,
    /// The answer's status.
    pub status: StatusCode,
    /// How its body ends.
    pub framing: Framing,
    /// Whether the connection may carry another request after this answer.
    reusable: bool,
    /// Whether the instance sent a `date` header.
    pub has_date: bool,
    /// The client's head so far: the status line and the instance's headers, less the
    /// hop-by-hop ones and `x-request-id`, with its `content-length` when it has one.
    pub head: Vec<u8>,
}

/// Why an answer could not be relayed to its end.
#[derive(Debug)]
pub enum RelayError {
    /// Writing to the client failed.
    Client(io::Error),
    /// The instance broke off or sent a malformed body.
    Upstream(String),
}

impl std::fmt::Display for RelayError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RelayError::Client(e) => write!(f, "writing to the client failed: {e}"),
            RelayError::Upstream(why) => write!(f, "the instance's answer broke off: {why}"),
        }
    }
}

/// Sends a request head (`parts`, written in order) to the instance at `authority` and
/// reads the answer's head, turning it into the client's in `head` (cleared first).
///
/// A pooled connection that fails before anything of an answer came back (the instance
/// closed it while it was idle) is dropped and the request goes on another one, when that
/// is safe: the request was never written whole, or it is `idempotent`.
pub async fn exchange(
    pool: &Arc<Pool<Conn>>,
    authority: &str,
    parts: &[&[u8]],
    idempotent: bool,
    head_request: bool,
    mut head: Vec<u8>,
) -> Result<Answer, SendError> {
    loop {
        let (mut conn, reused) = match pool.checkout(authority) {
            Some(c) => (c, true),
            None => (
                Conn {
                    stream: pool.connect_tcp(authority).await?,
                    buf: Vec::new(),
                },
                false,
            ),
        };
        conn.buf.clear();
        let mut unsent = parts.to_vec();
        if let Err(e) = h1::write_all(&mut conn.stream, &mut unsent).await {
            if reused {
                continue;
            }
            return Err(SendError::Protocol(
                format!("writing the request failed: {e}").into(),
            ));
        }
        match read_head(&mut conn, head_request, &mut head).await {
            Ok(parsed) => {
                return Ok(Answer {
                    conn,
                    body_at: parsed.body_at,
                    status: parsed.status,
                    framing: parsed.framing,
                    reusable: parsed.reusable,
                    has_date: parsed.has_date,
                    head,
                });
            }
            Err(HeadError::ClosedEarly) if reused && idempotent => {}
            Err(HeadError::ClosedEarly) => {
                return Err(SendError::Protocol(
                    "the connection closed before an answer came".into(),
                ));
            }
            Err(HeadError::Bad(why)) => return Err(SendError::Protocol(why.into())),
        }
    }
}

struct Parsed {
    body_at: usize,
    status: StatusCode,
    framing: Framing,
    reusable: bool,
    has_date: bool,
}

enum HeadError {
    /// Nothing of an answer came before the connection closed.
    ClosedEarly,
    /// What came is not a usable answer.
    Bad(String),
}

/// Reads until a final (not 1xx) answer head is in `conn.buf`, and writes the client's head
/// from it into `out`.
async fn read_head(
    conn: &mut Conn,
    head_request: bool,
    out: &mut Vec<u8>,
) -> Result<Parsed, HeadError> {
    loop {
        if !conn.buf.is_empty() {
            let mut fields =
                [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_ANSWER_HEADERS];
            let mut resp = httparse::Response::new(&mut []);
            match httparse::ParserConfig::default().parse_response_with_uninit_headers(
                &mut resp,
                &conn.buf,
                &mut fields,
            ) {
                Ok(httparse::Status::Complete(len)) => {
                    let code = resp.code.unwrap_or(0);
                    if code == 101 {
                        return Err(HeadError::Bad(
                            "switched protocols without being asked to".into(),
                        ));
                    }
                    if (100..200).contains(&code) {
                        // An interim answer (100 Continue, 103 Early Hints): not relayed.
                        conn.buf.drain(..len);
                        continue;
                    }
                    let status = StatusCode::from_u16(code)
                        .map_err(|_| HeadError::Bad(format!("status {code} is not valid")))?;
                    return client_head(&resp, status, len, head_request, out);
                }
                Ok(httparse::Status::Partial) if conn.buf.len() < MAX_ANSWER_HEAD => {}
                Ok(httparse::Status::Partial) => {
                    return Err(HeadError::Bad(format!(
                        "the answer's head is larger than {MAX_ANSWER_HEAD} bytes"
                    )));
                }
                Err(e) => {
                    return Err(HeadError::Bad(format!(
                        "the answer's head is malformed: {e}"
                    )));
                }
            }
        }
        conn.buf.reserve(READ_ROOM.min(MAX_ANSWER_HEAD));
        match conn.stream.read_buf(&mut conn.buf).await {
            Ok(0) if conn.buf.is_empty() => return Err(HeadError::ClosedEarly),
            Ok(0) => return Err(HeadError::Bad("the connection closed mid-head".into())),
            Ok(_) => {}
            Err(_) if conn.buf.is_empty() => return Err(HeadError::ClosedEarly),
            Err(e) => return Err(HeadError::Bad(format!("reading the answer failed: {e}"))),
        }
    }
}

/// A header of an answer the client does not get as it is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Special {
    Connection,
    /// Concerns one connection (RFC 9110 §7.6.1), or is replaced by the gateway's.
    Dropped,
    TransferEncoding,
    ContentLength,
    Date,
}

fn special(name: &str) -> Option<Special> {
    let is = |n: &str| name.eq_ignore_ascii_case(n);
    match name.len() {
        4 if is("date") => Some(Special::Date),
        7 if is("trailer") => Some(Special::Dropped),
        10 if is("connection") => Some(Special::Connection),
        10 if is("keep-alive") => Some(Special::Dropped),
        12 if is("x-request-id") => Some(Special::Dropped),
        14 if is("content-length") => Some(Special::ContentLength),
        16 if is("proxy-connection") => Some(Special::Dropped),
        17 if is("transfer-encoding") => Some(Special::TransferEncoding),
        18 if is("proxy-authenticate") => Some(Special::Dropped),
        19 if is("proxy-authorization") => Some(Special::Dropped),
        _ => None,
    }
}

/// Comma-separated tokens of a header value, trimmed.
pub(crate) fn tokens(value: &[u8]) -> impl DoubleEndedIterator<Item = &[u8]> {
    value.split(|b| *b == b',').map(<[u8]>::trim_ascii)
}

/// Whether the `Connection` headers name `name`, a header to drop (beyond `close` and
/// `keep-alive`, which are options, not names).
pub(crate) fn named_by<'v>(connection: impl IntoIterator<Item = &'v [u8]>, name: &str) -> bool {
    connection
        .into_iter()
        .flat_map(tokens)
        .any(|t| t.eq_ignore_ascii_case(name.as_bytes()))
}

fn client_head(
    resp: &httparse::Response<'_, '_>,
    status: StatusCode,
    body_at: usize,
    head_request: bool,
    out: &mut Vec<u8>,
) -> Result<Parsed, HeadError> {
    let mut close = resp.version != Some(1);
    let mut named = false;
    let mut chunked = None;
    let mut length: Option<u64> = None;
    let mut has_date = false;
    let mut kinds = [None; MAX_ANSWER_HEADERS];
    for (f, kind) in resp.headers.iter().zip(kinds.iter_mut()) {
        *kind = special(f.name);
        match *kind {
            Some(Special::Connection) => {
                for t in tokens(f.value) {
                    if t.eq_ignore_ascii_case(b"close") {
                        close = true;
                    } else if t.eq_ignore_ascii_case(b"keep-alive") {
                        close &= resp.version != Some(0);
                    } else if !t.is_empty() {
                        named = true;
                    }
                }
            }
            Some(Special::TransferEncoding) => {
                // Only the last coding says how the body ends.
                let last = tokens(f.value).next_back().unwrap_or(b"");
                chunked = Some(last.eq_ignore_ascii_case(b"chunked"));
            }
            Some(Special::ContentLength) => {
                let n = std::str::from_utf8(f.value)
                    .ok()
                    .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|v| v.parse::<u64>().ok())
                    .ok_or_else(|| {
                        HeadError::Bad("the answer's content-length is not a number".into())
                    })?;
                if length.is_some_and(|l| l != n) {
                    return Err(HeadError::Bad(
                        "the answer has two different content-lengths".into(),
                    ));
                }
                length = Some(n);
            }
            Some(Special::Date) => has_date = true,
            Some(Special::Dropped) | None => {}
        }
    }
    let framing = if head_request || !h1::has_body(status) {
        Framing::Empty
    } else {
        match (chunked, length) {
            (Some(true), _) => Framing::Chunked,
            (Some(false), _) => Framing::UntilClose,
            (None, Some(n)) => Framing::Length(n),
            (None, None) => Framing::UntilClose,
        }
    };
    out.clear();
    h1::status_line(status, out);
    // The headers `Connection` names are looked for only when it names any (rarely).
    let connection = || {
        resp.headers
            .iter()
            .filter(|f| f.name.eq_ignore_ascii_case("connection"))
            .map(|f| f.value)
    };
    for (f, kind) in resp.headers.iter().zip(kinds.iter()) {
        let keep = match kind {
            None | Some(Special::Date) => !(named && named_by(connection(), f.name)),
            // A length beside a transfer coding is not the body's (RFC 9112 §6.3); a coding
            // other than chunked stays, the body then ending with the connection.
            Some(Special::ContentLength) => chunked.is_none(),
            Some(Special::TransferEncoding) => chunked == Some(false),
            Some(_) => false,
        };
        if keep {
            h1::header_line(f.name, f.value, out);
        }
    }
    Ok(Parsed {
        body_at,
        status,
        framing,
        reusable: !close && framing != Framing::UntilClose,
        has_date,
    })
}

impl Answer {
    /// Writes the client's head (`head`, completed by the caller) and relays the body to
    /// `client` as it comes. The connection goes back to `pool` when the body was read to
    /// its end with nothing after it.
    pub async fn relay<W: AsyncWrite + Unpin>(
        self,
        client: &mut W,
        pool: &Pool<Conn>,
        authority: &str,
    ) -> Result<(), RelayError> {
        let Answer {
            mut conn,
            body_at,
            framing,
            mut reusable,
            head,
            ..
        } = self;
        let first = &conn.buf[body_at..];
        let done = match framing {
            Framing::Empty => {
                reusable &= first.is_empty();
                write(client, &mut [&head]).await?;
                true
            }
            Framing::Length(n) => {
                let take = first.len().min(usize::try_from(n).unwrap_or(usize::MAX));
                reusable &= take == first.len();
                write(client, &mut [&head, &first[..take]]).await?;
                let mut left = n - take as u64;
                while left > 0 {
                    let got = read_some(&mut conn).await?;
                    let take = got.min(usize::try_from(left).unwrap_or(usize::MAX));
                    reusable &= take == got;
                    write(client, &mut [&conn.buf[..take]]).await?;
                    left -= take as u64;
                }
                true
            }
            Framing::Chunked => {
                // What came before a malformed part is relayed, then the answer is cut off.
                let mut chunks = Chunks::default();
                let (used, mut ended, mut bad) = split(chunks.feed(first));
                reusable &= used == first.len();
                write(client, &mut [&head, &first[..used]]).await?;
                while !ended {
                    if let Some(why) = bad {
                        return Err(RelayError::Upstream(why));
                    }
                    let got = read_some(&mut conn).await?;
                    let used;
                    (used, ended, bad) = split(chunks.feed(&conn.buf[..got]));
                    reusable &= used == got;
                    write(client, &mut [&conn.buf[..used]]).await?;
                }
                true
            }
            Framing::UntilClose => {
                write(client, &mut [&head, first]).await?;
                loop {
                    conn.buf.clear();
                    conn.buf.reserve(READ_ROOM);
                    match conn.stream.read_buf(&mut conn.buf).await {
                        Ok(0) => break false,
                        Ok(_) => write(client, &mut [&conn.buf]).await?,
                        Err(e) => {
                            return Err(RelayError::Upstream(format!(
                                "reading the body failed: {e}"
                            )));
                        }
                    }
                }
            }
        };
        if done && reusable {
            conn.buf.clear();
            if conn.buf.capacity() > KEPT_BUFFER {
                conn.buf = Vec::new();
            }
            pool.put(authority, conn);
        }
        Ok(())
    }
}

/// A [`Chunks::feed`] result as (valid bytes, ended, what was malformed).
fn split(fed: Result<(usize, bool), (usize, String)>) -> (usize, bool, Option<String>) {
    match fed {
        Ok((used, ended)) => (used, ended, None),
        Err((valid, why)) => (valid, false, Some(why)),
    }
}

async fn write<W: AsyncWrite + Unpin>(
    client: &mut W,
    parts: &mut [&[u8]],
) -> Result<(), RelayError> {
    h1::write_all(client, parts)
        .await
        .map_err(RelayError::Client)
}

/// Reads more of a body into `conn.buf` (cleared first); how much came. The connection
/// closing here cuts the body short.
async fn read_some(conn: &mut Conn) -> Result<usize, RelayError> {
    conn.buf.clear();
    conn.buf.reserve(READ_ROOM);
    match conn.stream.read_buf(&mut conn.buf).await {
        Ok(0) => Err(RelayError::Upstream(
            "the connection closed mid-body".into(),
        )),
        Ok(n) => Ok(n),
        Err(e) => Err(RelayError::Upstream(format!(
            "reading the body failed: {e}"
        ))),
    }
}

/// Finds where a chunked body ends (RFC 9112 §7.1), byte by byte, without changing it:
/// size lines (with extensions), data, the last chunk and the trailer section.
#[derive(Debug, Default)]
pub struct Chunks {
    state: ChunkState,
    size: u64,
    digits: u8,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    #[default]
    Size,
    Extension,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    TrailerStart,
    TrailerLine,
    TrailerLf,
    EndLf,
    Done,
}

impl Chunks {
    /// Reads `bytes` on from where the last call stopped: how many belong to the body, and
    /// whether the body ended with them (the rest, if any, follows the body). Malformed bytes end the body: the error says how many bytes before them were valid.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<(usize, bool), (usize, String)> {
        use ChunkState as S;
        let mut i = 0;
        while i < bytes.len() {
            if self.state == S::Data {
                let take = (bytes.len() - i).min(usize::try_from(self.size).unwrap_or(usize::MAX));
                i += take;
                self.size -= take as u64;
                if self.size == 0 {
                    self.state = S::DataCr;
                }
                continue;
            }
            let b = bytes[i];
            self.state = match self.state {
                S::Done => break,
                S::Data => S::Data,
                S::Size => match b {
                    b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                        if self.digits == 16 {
                            return Err((i, "a chunk size is too large".into()));
                        }
                        self.digits += 1;
                        self.size =
                            self.size << 4 | u64::from((b as char).to_digit(16).unwrap_or(0));
                        S::Size
                    }
                    b';' | b' ' | b'\t' if self.digits > 0 => S::Extension,
                    b'\r' if self.digits > 0 => S::SizeLf,
                    _ => return Err((i, "a chunk size line is malformed".into())),
                },
                S::Extension => match b {
                    b'\r' => S::SizeLf,
                    b'\n' => return Err((i, "a chunk extension ends without CRLF".into())),
                    _ => S::Extension,
                },
                S::SizeLf => match b {
                    b'\n' if self.size == 0 => S::TrailerStart,
                    b'\n' => S::Data,
                    _ => return Err((i, "a chunk size line ends without CRLF".into())),
                },
                S::DataCr => match b {
                    b'\r' => S::DataLf,
                    _ => return Err((i, "a chunk is longer than its size".into())),
                },
                S::DataLf => match b {
                    b'\n' => {
                        self.digits = 0;
                        S::Size
                    }
                    _ => return Err((i, "a chunk ends without CRLF".into())),
                },
                S::TrailerStart => match b {
                    b'\r' => S::EndLf,
                    b'\n' => return Err((i, "a trailer line ends without CRLF".into())),
                    _ => S::TrailerLine,
                },
                S::TrailerLine => match b {
                    b'\r' => S::TrailerLf,
                    b'\n' => return Err((i, "a trailer line ends without CRLF".into())),
                    _ => S::TrailerLine,
                },
                S::TrailerLf => match b {
                    b'\n' => S::TrailerStart,
                    _ => return Err((i, "a trailer line ends without CRLF".into())),
                },
                S::EndLf => match b {
                    b'\n' => S::Done,
                    _ => return Err((i, "a chunked body ends without CRLF".into())),
                },
            };
            i += 1;
        }
        Ok((i, self.state == S::Done))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BODY: &[u8] =
        b"5;name=v\r\nhello\r\n1A\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nx-sum: 9\r\n\r\n";

    #[test]
    fn a_chunked_body_ends_after_its_trailers_however_it_is_split() {
        let mut whole = BODY.to_vec();
        whole.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
        let mut c = Chunks::default();
        assert_eq!(c.feed(&whole).unwrap(), (BODY.len(), true));
        for split in 1..BODY.len() {
            let mut c = Chunks::default();
            let (a, end_a) = c.feed(&BODY[..split]).unwrap();
            assert_eq!((a, end_a), (split, false), "split at {split}");
            assert_eq!(
                c.feed(&whole[split..]).unwrap(),
                (BODY.len() - split, true),
                "split at {split}"
            );
        }
        let mut c = Chunks::default();
        for (i, b) in BODY.iter().enumerate() {
            let (n, end) = c.feed(std::slice::from_ref(b)).unwrap();
            assert_eq!((n, end), (1, i + 1 == BODY.len()), "byte {i}");
        }
    }

    #[test]
    fn malformed_chunked_bodies_are_refused() {
        for bad in [
            &b"x\r\n"[..],
            b"\r\n",
            b"5\nhello",
            b"5\r\nhello!\r\n",
            b"5\r\nhello\n0",
            b"11111111111111111\r\n",
            b"0\r\nx-a: 1\n",
            b"0\r\n\rx",
        ] {
            let mut c = Chunks::default();
            assert!(c.feed(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        // The error says how much before it was valid.
        let mut c = Chunks::default();
        assert_eq!(c.feed(b"5\r\nhello\r\nzz").unwrap_err().0, 10);
    }

    #[test]
    fn a_chunk_size_of_sixteen_hex_digits_is_read_whole() {
        let mut c = Chunks::default();
        let body = b"000000000000000a\r\n0123456789\r\n0\r\n\r\n";
        assert_eq!(c.feed(body).unwrap(), (body.len(), true));
    }
}
