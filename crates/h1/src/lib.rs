//! HTTP/1.1 wire pieces shared by the agent's front (its own reader and writer for
//! discovery reads) and the gateway's (its own for plain proxied requests): the status and
//! header lines of a head, the `date` header, chunk size lines and vectored writes.
//!
//! Both sides write heads as hyper does (lower-case names it adds, the canonical reason
//! phrase), so an answer reads the same whichever path wrote it.

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::Poll;
// The `date` header is the wall clock, read at the edge.
#[allow(clippy::disallowed_types)]
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::StatusCode;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

/// Appends `HTTP/1.1 <code> <reason>\r\n`, with the code's canonical reason phrase.
pub fn status_line(status: StatusCode, out: &mut Vec<u8>) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("<none>").as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Appends `<name>: <value>\r\n`.
pub fn header_line(name: &str, value: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Appends `content-length: <len>\r\n`.
pub fn content_length_line(len: u64, out: &mut Vec<u8>) {
    out.extend_from_slice(b"content-length: ");
    out.extend_from_slice(itoa::Buffer::new().format(len).as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Appends `date: <now>\r\n`, the time formatted once a second per thread.
pub fn date_line(out: &mut Vec<u8>) {
    out.extend_from_slice(b"date: ");
    DATE.with_borrow_mut(|date| out.extend_from_slice(date.now()));
    out.extend_from_slice(b"\r\n");
}

/// Whether an answer with `status` carries a body (and so a length).
pub fn has_body(status: StatusCode) -> bool {
    !(status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED)
}

/// The `date` header's value, formatted once a second per thread.
struct Date {
    second: u64,
    text: [u8; 29],
}

impl Date {
    #[allow(clippy::disallowed_types)]
    fn now(&mut self) -> &[u8] {
        let now = SystemTime::now();
        let second = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        if second != self.second {
            let text = httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_secs(second));
            if let Ok(text) = <[u8; 29]>::try_from(text.as_bytes()) {
                self.text = text;
                self.second = second;
            }
        }
        &self.text
    }
}

thread_local! {
    static DATE: RefCell<Date> = const {
        RefCell::new(Date {
            second: u64::MAX,
            text: [b' '; 29],
        })
    };
}

/// Writes `parts` (at most four at a time) in order, in as few calls as the socket allows,
/// and flushes.
pub async fn write_all<W: AsyncWrite + Unpin>(io: &mut W, parts: &mut [&[u8]]) -> io::Result<()> {
    const MOST: usize = 4;
    let mut first = 0;
    while first < parts.len() {
        if parts[first].is_empty() {
            first += 1;
            continue;
        }
        let mut slices = [io::IoSlice::new(&[]); MOST];
        let count = (parts.len() - first).min(MOST);
        for (slice, part) in slices.iter_mut().zip(&parts[first..first + count]) {
            *slice = io::IoSlice::new(part);
        }
        let mut n = io.write_vectored(&slices[..count]).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        while n > 0 {
            let take = n.min(parts[first].len());
            parts[first] = &parts[first][take..];
            n -= take;
            if parts[first].is_empty() {
                first += 1;
            }
        }
    }
    io.flush().await
}

/// Room for a chunk's size line: 16 hex digits and CRLF.
pub const CHUNK_SIZE_LINE: usize = 18;

/// A chunk's size line, as chunked transfer coding writes it (hex digits, CRLF), in `out`.
pub fn chunk_size_line(len: usize, out: &mut [u8; CHUNK_SIZE_LINE]) -> &[u8] {
    let digits = (usize::BITS - len.leading_zeros()).div_ceil(4).max(1) as usize;
    for (i, slot) in out[..digits].iter_mut().enumerate() {
        let nibble = (len >> (4 * (digits - 1 - i))) & 0xf;
        *slot = b"0123456789abcdef"[nibble];
    }
    out[digits..digits + 2].copy_from_slice(b"\r\n");
    &out[..digits + 2]
}

/// Waits for `answer` while watching the socket: what the client sends meanwhile (the next
/// requests, pipelined) is kept in `buf`, and a client whose connection fails ends the wait
/// (`None`), so that a parked query does not outlive its client. A client that only closes
/// its side still gets its answer (`true`: close after it), as hyper does.
///
/// An answer that has to wait gives back the read buffer first when it holds nothing, so
/// that a parked request keeps no buffer.
pub async fn watching<S, F>(
    answer: F,
    io: &mut S,
    buf: &mut Vec<u8>,
    max: usize,
) -> Option<(F::Output, bool)>
where
    S: AsyncRead + Unpin,
    F: Future,
{
    let mut answer = std::pin::pin!(answer);
    let mut waited = false;
    let mut ended = false;
    std::future::poll_fn(|cx| {
        if let Poll::Ready(resp) = answer.as_mut().poll(cx) {
            return Poll::Ready(Some((resp, ended)));
        }
        if !waited {
            waited = true;
            if buf.is_empty() {
                *buf = Vec::new();
            }
        }
        while !ended && buf.len() < max {
            let mut room = [0u8; 512];
            let mut rb = ReadBuf::new(&mut room);
            match Pin::new(&mut *io).poll_read(cx, &mut rb) {
                Poll::Pending => break,
                Poll::Ready(Err(_)) => return Poll::Ready(None),
                Poll::Ready(Ok(())) if rb.filled().is_empty() => ended = true,
                Poll::Ready(Ok(())) => buf.extend_from_slice(rb.filled()),
            }
        }
        Poll::Pending
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_size_lines_are_lower_case_hex_and_crlf() {
        for len in [0usize, 1, 9, 10, 15, 16, 255, 4096, 12_850, usize::MAX] {
            let mut line = [0u8; CHUNK_SIZE_LINE];
            let got = chunk_size_line(len, &mut line);
            assert_eq!(got, format!("{len:x}\r\n").as_bytes(), "{len}");
        }
    }

    #[test]
    fn a_date_line_is_an_http_date() {
        let mut out = Vec::new();
        date_line(&mut out);
        let text = std::str::from_utf8(&out).unwrap();
        let value = text
            .strip_prefix("date: ")
            .unwrap()
            .strip_suffix("\r\n")
            .unwrap();
        assert!(httpdate::parse_http_date(value).is_ok(), "{text}");
    }

    #[test]
    fn writes_of_many_parts_arrive_whole_and_in_order() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let (mut a, mut b) = tokio::io::duplex(7);
            let reader = tokio::spawn(async move {
                let mut got = Vec::new();
                tokio::io::AsyncReadExt::read_to_end(&mut b, &mut got)
                    .await
                    .unwrap();
                got
            });
            let parts: Vec<Vec<u8>> = (0..6u8)
                .map(|i| vec![b'a' + i; 5 + usize::from(i)])
                .collect();
            let mut slices: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
            write_all(&mut a, &mut slices).await.unwrap();
            drop(a);
            assert_eq!(reader.await.unwrap(), parts.concat());
        });
    }
}
