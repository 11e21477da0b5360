//! Parsing the agent's server-sent-events stream.
//!
//! The parser is fed bytes as they arrive, split anywhere (inside a line, inside a CRLF,
//! inside a UTF-8 character), and hands back whole events. It follows the WHATWG rules that
//! matter here: lines end in LF, CR or CRLF; a blank line dispatches the event; `:` starts a
//! comment; one optional space after the colon is dropped; several `data:` lines join with
//! newlines; an event without data is not dispatched, but its `id:` still counts.

/// One dispatched event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Event {
    /// `event:`; `message` when the event named none.
    pub kind: String,
    /// The last event id seen, this event's or an earlier one's (the `Last-Event-ID` rule).
    pub id: Option<String>,
    /// The `data:` lines joined with newlines.
    pub data: String,
}

/// A line buffer up to this size is kept for the next line; a larger one is freed.
const KEEP_LINE_CAPACITY: usize = 64 * 1024;

/// An incremental parser. Lines longer than `max_line` make [`Parser::feed`] fail, so a
/// broken or hostile peer cannot make the client buffer without bound.
#[derive(Debug)]
pub(crate) struct Parser {
    /// Bytes of the line being read.
    line: Vec<u8>,
    /// The previous chunk ended in CR: a leading LF in the next one belongs to it.
    after_cr: bool,
    kind: String,
    data: String,
    has_data: bool,
    last_id: Option<String>,
    max_line: usize,
}

/// The stream is not a usable event stream.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum ParseError {
    /// A line longer than the limit.
    LineTooLong(usize),
}

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ParseError::LineTooLong(max) => write!(f, "an event is longer than {max} bytes"),
        }
    }
}

impl Parser {
    pub(crate) fn new(max_line: usize) -> Parser {
        Parser {
            line: Vec::new(),
            after_cr: false,
            kind: String::new(),
            data: String::new(),
            has_data: false,
            last_id: None,
            max_line,
        }
    }

    /// Feeds a chunk; every event it completes is pushed to `out`.
    pub(crate) fn feed(&mut self, chunk: &[u8], out: &mut Vec<Event>) -> Result<(), ParseError> {
        let mut rest = chunk;
        if self.after_cr {
            self.after_cr = false;
            if let Some(b'\n') = rest.first() {
                rest = &rest[1..];
            }
        }
        while let Some(end) = rest.iter().position(|b| *b == b'\n' || *b == b'\r') {
            self.push_bytes(&rest[..end])?;
            let line = std::mem::take(&mut self.line);
            self.line_done(&line, out);
            // The buffer is kept for the next line, unless a large event (a snapshot of
            // the whole catalog) grew it: then its memory goes back instead of staying
            // held for the stream's life.
            if line.capacity() <= KEEP_LINE_CAPACITY {
                self.line = line;
                self.line.clear();
            }
            if rest[end] == b'\r' {
                match rest.get(end + 1) {
                    Some(b'\n') => rest = &rest[end + 2..],
                    Some(_) => rest = &rest[end + 1..],
                    None => {
                        self.after_cr = true;
                        rest = &[];
                    }
                }
            } else {
                rest = &rest[end + 1..];
            }
        }
        self.push_bytes(rest)
    }

    fn push_bytes(&mut self, bytes: &[u8]) -> Result<(), ParseError> {
        // The event's data so far counts too: endless `data:` lines without the blank line
        // that ends an event must not grow memory without bound either.
        if self.data.len() + self.line.len() + bytes.len() > self.max_line {
            return Err(ParseError::LineTooLong(self.max_line));
        }
        self.line.extend_from_slice(bytes);
        Ok(())
    }

    fn line_done(&mut self, line: &[u8], out: &mut Vec<Event>) {
        if line.is_empty() {
            self.dispatch(out);
            return;
        }
        // Invalid UTF-8 is replaced, as browsers do; the JSON parse then reports it.
        let line = String::from_utf8_lossy(line);
        if line.starts_with(':') {
            return; // a comment: the agent's keep-alive
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line.as_ref(), ""),
        };
        match field {
            "event" => self.kind = value.to_string(),
            "data" => {
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(value);
                self.has_data = true;
            }
            "id" if !value.contains('\0') => self.last_id = Some(value.to_string()),
            _ => {} // `retry:` and unknown fields: the client keeps its own backoff
        }
    }

    fn dispatch(&mut self, out: &mut Vec<Event>) {
        let kind = std::mem::take(&mut self.kind);
        if !self.has_data {
            return;
        }
        self.has_data = false;
        out.push(Event {
            kind: if kind.is_empty() {
                "message".to_string()
            } else {
                kind
            },
            id: self.last_id.clone(),
            data: std::mem::take(&mut self.data),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_chunks(chunks: &[&[u8]]) -> Vec<Event> {
        let mut p = Parser::new(1 << 20);
        let mut out = Vec::new();
        for c in chunks {
            p.feed(c, &mut out).unwrap();
        }
        out
    }

    fn ev(kind: &str, id: Option<&str>, data: &str) -> Event {
        Event {
            kind: kind.into(),
            id: id.map(str::to_string),
            data: data.into(),
        }
    }

    const STREAM: &[u8] = b": hello\n\nevent: snapshot\nid: 7\ndata: {\"index\":7}\n\n:keep-alive\r\n\r\nevent:change\r\nid:9\r\ndata: a\r\ndata:b\r\n\r\ndata: plain\rdata:  two spaces\r\r";

    #[test]
    fn events_comments_and_line_endings() {
        let events = parse_chunks(&[STREAM]);
        assert_eq!(
            events,
            [
                ev("snapshot", Some("7"), "{\"index\":7}"),
                ev("change", Some("9"), "a\nb"),
                ev("message", Some("9"), "plain\n two spaces"),
            ]
        );
    }

    #[test]
    fn chunk_boundaries_anywhere_give_the_same_events() {
        let whole = parse_chunks(&[STREAM]);
        // Every split into two pieces, and byte by byte.
        for cut in 0..=STREAM.len() {
            let (a, b) = STREAM.split_at(cut);
            assert_eq!(parse_chunks(&[a, b]), whole, "split at {cut}");
        }
        let bytes: Vec<&[u8]> = STREAM.chunks(1).collect();
        assert_eq!(parse_chunks(&bytes), whole);
    }

    #[test]
    fn a_multibyte_character_split_across_chunks_survives() {
        let s = "data: zürich\n\n".as_bytes();
        let cut = s.iter().position(|b| *b >= 0x80).unwrap() + 1;
        let events = parse_chunks(&[&s[..cut], &s[cut..]]);
        assert_eq!(events, [ev("message", None, "zürich")]);
    }

    #[test]
    fn an_event_without_data_is_not_dispatched_but_its_id_counts() {
        let events = parse_chunks(&[b"event: change\nid: 4\n\ndata: x\n\n"]);
        assert_eq!(events, [ev("message", Some("4"), "x")]);
    }

    #[test]
    fn an_unfinished_event_waits_for_its_blank_line() {
        let mut p = Parser::new(1024);
        let mut out = Vec::new();
        p.feed(b"event: change\ndata: x\n", &mut out).unwrap();
        assert!(out.is_empty());
        p.feed(b"\n", &mut out).unwrap();
        assert_eq!(out, [ev("change", None, "x")]);
    }

    #[test]
    fn an_overlong_line_is_an_error() {
        let mut p = Parser::new(8);
        let mut out = Vec::new();
        p.feed(b"data: 12", &mut out).unwrap();
        assert_eq!(
            p.feed(b"3", &mut out),
            Err(ParseError::LineTooLong(8)),
            "the limit holds across chunks"
        );
    }

    #[test]
    fn the_buffer_a_large_event_grew_is_not_kept() {
        let mut p = Parser::new(1 << 20);
        let mut out = Vec::new();
        let big = format!("data: {}\n\n", "x".repeat(200 * 1024));
        // In pieces, as a network delivers it.
        for piece in big.as_bytes().chunks(16 * 1024) {
            p.feed(piece, &mut out).unwrap();
        }
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].data.len(), 200 * 1024);
        assert!(
            p.line.capacity() <= KEEP_LINE_CAPACITY,
            "{}",
            p.line.capacity()
        );
        p.feed(b"data: small\n\n", &mut out).unwrap();
        assert_eq!(out[1].data, "small");
    }
}
