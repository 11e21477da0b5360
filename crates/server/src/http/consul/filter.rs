//! Consul's `?filter=` expressions, evaluated over the JSON elements of a response.
//!
//! Consul parses filters with HashiCorp go-bexpr v0.1.2 (its `go.mod` pins that version); this
//! module reproduces the part of it Consul exposes, from go-bexpr's `grammar.peg`,
//! `evaluate.go`, `field_config.go`, `validate.go` and `coerce.go`:
//!
//! - Matches: `Sel == V`, `Sel != V`, `V in Sel`, `V not in Sel`, `Sel contains V`,
//!   `Sel not contains V`, `Sel is empty`, `Sel is not empty`, `Sel matches V`,
//!   `Sel not matches V`; joined by `and`, `or`, `not` and parentheses, `not` binding
//!   tightest and `or` loosest.
//! - A selector is a dotted path of identifiers (`[a-zA-Z][a-zA-Z0-9_]*`); a map key that is
//!   not an identifier is written `Meta["key with.dots"]`. Names are case-sensitive.
//! - A value is a double-quoted string (Go escapes), a backquoted raw string, a number
//!   (`-?(0|[1-9][0-9]*)(\.[0-9]+)?`) or a bare selector, which stands for its own text:
//!   `Checks.Status == passing` compares with the string `passing`.
//! - The value is read as the type of the field it meets: a number field compares by value
//!   (`Port == 8080` and `Port == "8080"` agree; integers parse like Go's
//!   `strconv.ParseInt(v, 0, 64)`), a boolean field like `strconv.ParseBool`.
//! - A list met *inside* a selector is an implicit "any": `Checks.Status != "critical"` holds
//!   when at least one check is not critical, and nothing holds on an empty list (Consul's
//!   docs note that `Checks.Status == passing` needs only one passing check).
//! - `in`/`contains` is a substring test on a string, membership on a list and a key test on a
//!   map; `is empty` tests the length of a string, list or map.
//! - A map key that is absent satisfies `!=`, `not in`, `not contains`, `is empty` and
//!   `not matches`, and nothing else.
//!
//! Where the JSON cannot tell us what go-bexpr knows from Go types, we choose:
//!
//! - go-bexpr rejects an unknown selector when the filter is created ("Selector ... is not
//!   valid"); with no static type to check against, a field the element lacks (or holds as
//!   `null`) is treated as an absent map key. Renderers must therefore emit every field, as
//!   Consul does, so that an empty string is `""` and not absent.
//! - Operators go-bexpr refuses for a field's type (`==` on a list or map, `matches` on a
//!   number, `in` on a number) never hold on that field, and their negations always do, with
//!   two extensions for lists at the end of a selector: `Tags == "v"` and `Tags matches "re"`
//!   hold when some element does, so `Tags != "v"` means no element equals `v`.
//! - go-bexpr answers `true` for `matches` on an absent map key (its missing-key switch lists
//!   only `==`, `in` and `is not empty` as false); we answer `false`, so `not matches` is
//!   always the negation of `matches`.
//! - go-bexpr cuts a double-quoted string at the first `"`, so `\"` is unusable there; here
//!   `\"` is an escaped quote. Whitespace around parentheses and after `not` is optional.
//! - Regular expressions are compiled by the `regex` crate, whose syntax is RE2's like Go's,
//!   but whose `\d`, `\w`, `\s` and `\b` are Unicode-aware where Go's are ASCII-only.
//!
//! Limits keep a hostile filter cheap: [`MAX_LEN`] bytes, [`MAX_DEPTH`] levels of `not` and
//! parentheses, [`MAX_REGEXES`] regular expressions of at most [`REGEX_SIZE_LIMIT`] bytes each.
//!
//! Syntax errors read like go-bexpr's parser errors, `line:column (offset): reason`, and a bad
//! pattern like its validation error, `Failed to compile regular expression "(": ...`; the
//! caller adds Consul's "Failed to create boolean expression evaluator: " prefix.

use regex::{Regex, RegexBuilder};
use serde_json::Value;

/// Longest filter accepted, in bytes. Real filters are one or two lines; this bounds the
/// parse and every evaluation.
pub const MAX_LEN: usize = 4096;

/// Deepest nesting of `not` and parentheses; keeps parsing and evaluation recursion shallow.
pub const MAX_DEPTH: usize = 64;

/// Most `matches`/`not matches` operators in one filter: with [`REGEX_SIZE_LIMIT`], a bound
/// on the memory one request can make the agent spend on automata.
pub const MAX_REGEXES: usize = 32;

/// Largest compiled program, and largest lazy-DFA cache, for one regular expression. Tag and
/// metadata patterns need far less: `^[a-z0-9-]+\.example\.com$` compiles to under 1 KiB,
/// `^\w+-\d+\s*$` with its Unicode classes to about 55 KiB; `\w{100}` needs 5 MiB.
pub const REGEX_SIZE_LIMIT: usize = 512 * 1024;

/// A parsed filter expression.
#[derive(Clone, Debug)]
pub struct Filter {
    expr: Expr,
    /// The compiled patterns of the `matches` operators, indexed by [`Test::Matches`].
    regexes: Vec<Regex>,
}

#[derive(Clone, Debug)]
enum Expr {
    Or(Vec<Expr>),
    And(Vec<Expr>),
    Not(Box<Expr>),
    Match(Match),
}

/// One matching operator: `test` applied at the end of `path`, its result inverted for the
/// negative forms (`!=`, `not in`, `not contains`, `is not empty`, `not matches`).
#[derive(Clone, Debug)]
struct Match {
    path: Vec<String>,
    test: Test,
    negated: bool,
}

#[derive(Clone, Debug)]
enum Test {
    /// `==`: the raw value, read as the type of the field.
    Equal(String),
    /// `in` / `contains`.
    Contains(String),
    /// `is empty`.
    Empty,
    /// `matches`: an index into [`Filter::regexes`].
    Matches(usize),
}

impl Filter {
    /// Parses `text`; the error message is what Consul says after "Failed to create boolean
    /// expression evaluator: " (the caller adds that prefix).
    pub fn parse(text: &str) -> Result<Filter, String> {
        if text.len() > MAX_LEN {
            return Err(format!(
                "filter expression is {} bytes long; at most {MAX_LEN} are allowed",
                text.len()
            ));
        }
        let tokens = lex(text).map_err(|e| e.render(text))?;
        let mut parser = Parser {
            tokens,
            pos: 0,
            patterns: Vec::new(),
            end: text.len(),
        };
        let expr = parser.parse_input().map_err(|e| e.render(text))?;
        // Like go-bexpr's validation pass, after the parse, and reported without a position.
        let regexes = parser
            .patterns
            .iter()
            .map(|p| compile(p))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Filter { expr, regexes })
    }

    /// Whether `item` (one element of the response list, e.g. {"Node": {...}, "Service":
    /// {...}, "Checks": [...]}) matches.
    pub fn matches(&self, item: &Value) -> bool {
        self.eval(&self.expr, item)
    }

    fn eval(&self, expr: &Expr, item: &Value) -> bool {
        match expr {
            Expr::Or(all) => all.iter().any(|e| self.eval(e, item)),
            Expr::And(all) => all.iter().all(|e| self.eval(e, item)),
            Expr::Not(e) => !self.eval(e, item),
            Expr::Match(m) => self.select(m, item, &m.path),
        }
    }

    /// Walks `path` down from `value` and applies `m` at its end, as go-bexpr's
    /// `evaluateMatchExpressionRecurse` does.
    fn select(&self, m: &Match, value: &Value, path: &[String]) -> bool {
        let Some((field, rest)) = path.split_first() else {
            return self.holds(&m.test, Some(value)) != m.negated;
        };
        match value {
            Value::Object(fields) => match fields.get(field) {
                Some(inner) => self.select(m, inner, rest),
                None => self.holds(&m.test, None) != m.negated,
            },
            // A list inside a selector is an "any" over its elements, each tested with the
            // whole operator, negation included; an empty list matches nothing.
            Value::Array(items) => items.iter().any(|item| self.select(m, item, path)),
            // A scalar has no fields: what is selected below it is absent.
            _ => self.holds(&m.test, None) != m.negated,
        }
    }

    /// Whether the positive form of `test` holds on `value` (`None` or `null`: absent).
    fn holds(&self, test: &Test, value: Option<&Value>) -> bool {
        let value = match value {
            None | Some(Value::Null) => return matches!(test, Test::Empty),
            Some(v) => v,
        };
        match (test, value) {
            (Test::Empty, Value::String(s)) => s.is_empty(),
            (Test::Empty, Value::Array(items)) => items.is_empty(),
            (Test::Empty, Value::Object(fields)) => fields.is_empty(),
            (Test::Empty, _) => false,
            (Test::Equal(raw), Value::Array(items)) => items.iter().any(|i| equals(i, raw)),
            (Test::Equal(raw), v) => equals(v, raw),
            (Test::Contains(raw), Value::String(s)) => s.contains(raw.as_str()),
            (Test::Contains(raw), Value::Array(items)) => items.iter().any(|i| equals(i, raw)),
            (Test::Contains(raw), Value::Object(fields)) => fields.contains_key(raw),
            (Test::Contains(_), _) => false,
            (Test::Matches(i), v) => {
                let Some(re) = self.regexes.get(*i) else {
                    return false;
                };
                match v {
                    Value::String(s) => re.is_match(s),
                    Value::Array(items) => items
                        .iter()
                        .any(|item| item.as_str().is_some_and(|s| re.is_match(s))),
                    _ => false,
                }
            }
        }
    }
}

/// Whether the scalar `value` equals the raw filter value read as `value`'s type.
fn equals(value: &Value, raw: &str) -> bool {
    match value {
        Value::String(s) => s == raw,
        Value::Bool(b) => go_parse_bool(raw) == Some(*b),
        Value::Number(n) => {
            let int = n
                .as_i64()
                .map(i128::from)
                .or_else(|| n.as_u64().map(i128::from));
            match (int, go_parse_int(raw)) {
                (Some(int), Some(parsed)) => int == parsed,
                // Not an integer literal, or not an integer field: compare as floats, so
                // `Port == 8080.0` holds where go-bexpr would refuse the value.
                _ => match (n.as_f64(), raw.parse::<f64>()) {
                    (Some(a), Ok(b)) => a == b,
                    _ => false,
                },
            }
        }
        _ => false,
    }
}

/// Go's `strconv.ParseBool`.
fn go_parse_bool(raw: &str) -> Option<bool> {
    match raw {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// Go's `strconv.ParseInt(raw, 0, 64)`, as go-bexpr's `CoerceInt*` call it: an optional sign,
/// a `0x`/`0o`/`0b`/`0` base prefix, underscores between digits. Values past 64 bits parse
/// too; they equal no JSON number.
fn go_parse_int(raw: &str) -> Option<i128> {
    let (negative, unsigned) = match raw.as_bytes().first()? {
        b'-' => (true, &raw[1..]),
        b'+' => (false, &raw[1..]),
        _ => (false, raw),
    };
    let lower = unsigned.get(..2).map(str::to_ascii_lowercase);
    let (radix, digits, prefixed) = match lower.as_deref() {
        Some("0x") => (16, &unsigned[2..], true),
        Some("0o") => (8, &unsigned[2..], true),
        Some("0b") => (2, &unsigned[2..], true),
        _ if unsigned.len() > 1 && unsigned.starts_with('0') => (8, &unsigned[1..], true),
        _ => (10, unsigned, false),
    };
    if digits.ends_with('_') || digits.contains("__") || (digits.starts_with('_') && !prefixed) {
        return None;
    }
    let digits: String = digits.chars().filter(|c| *c != '_').collect();
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    let magnitude = i128::from_str_radix(&digits, radix).ok()?;
    Some(if negative { -magnitude } else { magnitude })
}

/// Compiles a `matches` pattern within [`REGEX_SIZE_LIMIT`].
fn compile(pattern: &str) -> Result<Regex, String> {
    RegexBuilder::new(pattern)
        .size_limit(REGEX_SIZE_LIMIT)
        .dfa_size_limit(REGEX_SIZE_LIMIT)
        .build()
        .map_err(|e| {
            let reason = match &e {
                // The syntax error's last line names the fault; the lines above repeat the
                // pattern with a caret, which a one-line HTTP error cannot show.
                regex::Error::Syntax(text) => text
                    .lines()
                    .rev()
                    .find_map(|l| l.strip_prefix("error: "))
                    .unwrap_or(text)
                    .to_string(),
                other => other.to_string(),
            };
            format!("Failed to compile regular expression {pattern:?}: {reason}")
        })
}

/// A parse failure at a byte offset of the filter text.
#[derive(Debug)]
struct Failure {
    at: usize,
    reason: String,
    /// A limit was hit: no other reading of the text can help.
    fatal: bool,
}

impl Failure {
    fn at(at: usize, reason: impl Into<String>) -> Failure {
        Failure {
            at,
            reason: reason.into(),
            fatal: false,
        }
    }

    /// `line:column (offset): reason`, as go-bexpr's generated parser reports; the column
    /// counts characters from 1, the offset bytes from 0.
    fn render(&self, text: &str) -> String {
        let before = text.get(..self.at).unwrap_or(text);
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
        format!("{line}:{column} ({}): {}", self.at, self.reason)
    }
}

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    LParen,
    RParen,
    Eq,
    Ne,
    Str(String),
    Num(String),
    /// A selector; a bare identifier is also how the keywords arrive.
    Sel(Vec<String>),
    End,
}

impl Tok {
    fn is_keyword(&self, word: &str) -> bool {
        matches!(self, Tok::Sel(path) if path.len() == 1 && path[0] == word)
    }

    fn describe(&self) -> String {
        match self {
            Tok::LParen => "\"(\"".into(),
            Tok::RParen => "\")\"".into(),
            Tok::Eq => "\"==\"".into(),
            Tok::Ne => "\"!=\"".into(),
            Tok::Str(s) => format!("string {s:?}"),
            Tok::Num(n) => format!("number {n}"),
            Tok::Sel(path) => format!("{:?}", path.join(".")),
            Tok::End => "end of input".into(),
        }
    }
}

#[derive(Debug)]
struct Token {
    tok: Tok,
    at: usize,
}

/// Splits `text` into tokens; the last is always [`Tok::End`].
fn lex(text: &str) -> Result<Vec<Token>, Failure> {
    let bytes = text.as_bytes();
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let at = i;
        let tok = match bytes[i] {
            b' ' | b'\t' | b'\r' | b'\n' => {
                i += 1;
                continue;
            }
            b'(' => {
                i += 1;
                Tok::LParen
            }
            b')' => {
                i += 1;
                Tok::RParen
            }
            b'=' | b'!' if bytes.get(i + 1) == Some(&b'=') => {
                i += 2;
                if bytes[at] == b'=' { Tok::Eq } else { Tok::Ne }
            }
            b'"' | b'`' => {
                let (s, next) = string_literal(text, i)?;
                i = next;
                Tok::Str(s)
            }
            b'-' | b'0'..=b'9' => {
                let (n, next) = number_literal(text, i)?;
                i = next;
                Tok::Num(n)
            }
            b'a'..=b'z' | b'A'..=b'Z' => {
                let (path, next) = selector(text, i)?;
                i = next;
                Tok::Sel(path)
            }
            b'=' | b'!' | b'<' | b'>' | b'~' => {
                let len = bytes[i..]
                    .iter()
                    .take_while(|b| matches!(b, b'=' | b'!' | b'<' | b'>' | b'~'))
                    .count();
                let op = &text[i..i + len];
                return Err(Failure::at(i, format!("unknown operator {op:?}")));
            }
            _ => {
                let c = text[i..].chars().next().unwrap_or('?');
                return Err(Failure::at(i, format!("unexpected character {c:?}")));
            }
        };
        tokens.push(Token { tok, at });
    }
    tokens.push(Token {
        tok: Tok::End,
        at: text.len(),
    });
    Ok(tokens)
}

fn identifier(bytes: &[u8], start: usize) -> usize {
    let mut i = start + 1;
    while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
        i += 1;
    }
    i
}

/// `Ident ( "." Ident / "[" string "]" )*`, starting at an ASCII letter.
fn selector(text: &str, start: usize) -> Result<(Vec<String>, usize), Failure> {
    let bytes = text.as_bytes();
    let mut i = identifier(bytes, start);
    let mut path = vec![text[start..i].to_string()];
    loop {
        match bytes.get(i) {
            Some(b'.') if bytes.get(i + 1).is_some_and(u8::is_ascii_alphabetic) => {
                let end = identifier(bytes, i + 1);
                path.push(text[i + 1..end].to_string());
                i = end;
            }
            Some(b'[') => {
                let open = i;
                i = skip_space(bytes, i + 1);
                if !matches!(bytes.get(i), Some(b'"' | b'`')) {
                    return Err(Failure::at(open, "Invalid index"));
                }
                let (key, next) = string_literal(text, i)?;
                i = skip_space(bytes, next);
                if bytes.get(i) != Some(&b']') {
                    return Err(Failure::at(open, "Unclosed index expression"));
                }
                i += 1;
                path.push(key);
            }
            _ => return Ok((path, i)),
        }
    }
}

fn skip_space(bytes: &[u8], mut i: usize) -> usize {
    while matches!(bytes.get(i), Some(b' ' | b'\t' | b'\r' | b'\n')) {
        i += 1;
    }
    i
}

/// `-?(0|[1-9][0-9]*)(\.[0-9]+)?`, which must end at whitespace, `)` or the end.
fn number_literal(text: &str, start: usize) -> Result<(String, usize), Failure> {
    let bytes = text.as_bytes();
    let digits = |mut i: usize| {
        while bytes.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        i
    };
    let mut i = start;
    if bytes[i] == b'-' {
        i += 1;
    }
    let int_start = i;
    i = match bytes.get(i) {
        Some(b'0') => i + 1,
        Some(b'1'..=b'9') => digits(i),
        _ => int_start,
    };
    let mut valid = i > int_start;
    if valid && bytes.get(i) == Some(&b'.') && bytes.get(i + 1).is_some_and(u8::is_ascii_digit) {
        i = digits(i + 1);
    }
    valid &= matches!(
        bytes.get(i),
        None | Some(b' ' | b'\t' | b'\r' | b'\n' | b')')
    );
    if !valid {
        return Err(Failure::at(start, "Invalid number literal"));
    }
    Ok((text[start..i].to_string(), i))
}

/// A double-quoted string with Go's escapes, or a backquoted raw string (carriage returns
/// dropped, as Go's `strconv.Unquote` does). Returns the value and the offset past it.
fn string_literal(text: &str, start: usize) -> Result<(String, usize), Failure> {
    let bytes = text.as_bytes();
    if bytes[start] == b'`' {
        return match text[start + 1..].find('`') {
            Some(len) => {
                let end = start + 1 + len;
                Ok((text[start + 1..end].replace('\r', ""), end + 1))
            }
            None => Err(Failure::at(start, "Unterminated string literal")),
        };
    }
    // Escapes can produce any byte (`\xff`), so collect bytes and check UTF-8 at the end.
    let mut out = Vec::new();
    let mut i = start + 1;
    loop {
        match bytes.get(i) {
            None => return Err(Failure::at(start, "Unterminated string literal")),
            Some(b'"') => break,
            Some(b'\n') => return Err(Failure::at(i, "newline in string literal")),
            Some(b'\\') => i = escape(text, i, &mut out)?,
            Some(&b) => {
                out.push(b);
                i += 1;
            }
        }
    }
    match String::from_utf8(out) {
        Ok(s) => Ok((s, i + 1)),
        Err(_) => Err(Failure::at(start, "string literal is not valid UTF-8")),
    }
}

/// Decodes the escape at `text[at]` (a backslash) into `out`, as Go's `strconv.UnquoteChar`
/// does inside double quotes; returns the offset past it.
fn escape(text: &str, at: usize, out: &mut Vec<u8>) -> Result<usize, Failure> {
    let bytes = text.as_bytes();
    let bad = || Failure::at(at, "invalid escape sequence in string literal");
    let hex = |from: usize, len: usize| -> Result<u32, Failure> {
        let digits = text.get(from..from + len).ok_or_else(bad)?;
        if !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad());
        }
        u32::from_str_radix(digits, 16).map_err(|_| bad())
    };
    let simple = |b: u8| match b {
        b'a' => Some(0x07),
        b'b' => Some(0x08),
        b'f' => Some(0x0c),
        b'n' => Some(b'\n'),
        b'r' => Some(b'\r'),
        b't' => Some(b'\t'),
        b'v' => Some(0x0b),
        b'\\' => Some(b'\\'),
        b'"' => Some(b'"'),
        _ => None,
    };
    let kind = *bytes.get(at + 1).ok_or_else(bad)?;
    if let Some(b) = simple(kind) {
        out.push(b);
        return Ok(at + 2);
    }
    match kind {
        b'x' => {
            out.push(u8::try_from(hex(at + 2, 2)?).map_err(|_| bad())?);
            Ok(at + 4)
        }
        b'u' | b'U' => {
            let len = if kind == b'u' { 4 } else { 8 };
            let c = char::from_u32(hex(at + 2, len)?).ok_or_else(bad)?;
            out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes());
            Ok(at + 2 + len)
        }
        b'0'..=b'7' => {
            let digits = text.get(at + 1..at + 4).ok_or_else(bad)?;
            if !digits.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
                return Err(bad());
            }
            let value = u32::from_str_radix(digits, 8).map_err(|_| bad())?;
            out.push(u8::try_from(value).map_err(|_| bad())?);
            Ok(at + 4)
        }
        _ => Err(bad()),
    }
}

/// Recursive descent over the tokens, following go-bexpr's PEG: `or` over `and` over `not`
/// over a parenthesised expression or a single match.
struct Parser {
    tokens: Vec<Token>,
    pos: usize,
    /// The `matches` patterns, compiled once the whole filter has parsed.
    patterns: Vec<String>,
    end: usize,
}

impl Parser {
    fn peek(&self) -> &Tok {
        self.peek_at(0)
    }

    fn peek_at(&self, ahead: usize) -> &Tok {
        self.tokens
            .get(self.pos + ahead)
            .map_or(&Tok::End, |t| &t.tok)
    }

    fn offset(&self) -> usize {
        self.tokens.get(self.pos).map_or(self.end, |t| t.at)
    }

    fn bump(&mut self) -> Tok {
        let tok = self.peek().clone();
        if self.pos < self.tokens.len() {
            self.pos += 1;
        }
        tok
    }

    fn unexpected(&self, wanted: &str) -> Failure {
        Failure::at(
            self.offset(),
            format!("expected {wanted}, found {}", self.peek().describe()),
        )
    }

    fn parse_input(&mut self) -> Result<Expr, Failure> {
        let expr = self.parse_or(0)?;
        match self.peek() {
            Tok::End => Ok(expr),
            Tok::RParen => Err(Failure::at(self.offset(), "Unmatched parentheses")),
            _ => Err(self.unexpected("\"and\", \"or\" or the end of the expression")),
        }
    }

    fn parse_or(&mut self, depth: usize) -> Result<Expr, Failure> {
        let mut all = vec![self.parse_and(depth)?];
        while self.peek().is_keyword("or") {
            self.bump();
            all.push(self.parse_and(depth)?);
        }
        Ok(if all.len() == 1 {
            all.swap_remove(0)
        } else {
            Expr::Or(all)
        })
    }

    fn parse_and(&mut self, depth: usize) -> Result<Expr, Failure> {
        let mut all = vec![self.parse_not(depth)?];
        while self.peek().is_keyword("and") {
            self.bump();
            all.push(self.parse_not(depth)?);
        }
        Ok(if all.len() == 1 {
            all.swap_remove(0)
        } else {
            Expr::And(all)
        })
    }

    fn nest(&self, depth: usize) -> Result<usize, Failure> {
        if depth >= MAX_DEPTH {
            return Err(Failure {
                at: self.offset(),
                reason: format!("expression nests deeper than {MAX_DEPTH} levels"),
                fatal: true,
            });
        }
        Ok(depth + 1)
    }

    /// `"not" NotExpression / Primary`. Like the PEG, a leading `not` is first read as the
    /// operator and, if what follows is no expression, as a selector or value named "not"
    /// (`not contains "x"`). Only the `not` branch recurses, and a primary starting with
    /// `not` fails or succeeds within a few tokens, so this stays linear.
    fn parse_not(&mut self, depth: usize) -> Result<Expr, Failure> {
        if !self.peek().is_keyword("not") {
            return self.parse_primary(depth);
        }
        let (start, patterns) = (self.pos, self.patterns.len());
        self.bump();
        let negation = self.nest(depth).and_then(|inner| self.parse_not(inner));
        let first = match negation {
            Ok(expr) => return Ok(Expr::Not(Box::new(expr))),
            Err(e) if e.fatal => return Err(e),
            Err(e) => e,
        };
        self.pos = start;
        self.patterns.truncate(patterns);
        self.parse_primary(depth).map_err(|second| {
            // Report whichever reading got further, as a PEG parser does.
            if second.at > first.at { second } else { first }
        })
    }

    fn parse_primary(&mut self, depth: usize) -> Result<Expr, Failure> {
        if *self.peek() != Tok::LParen {
            return self.parse_match().map(Expr::Match);
        }
        let open = self.offset();
        let inner = self.nest(depth)?;
        self.bump();
        let expr = self.parse_or(inner)?;
        match self.peek() {
            Tok::RParen => {
                self.bump();
                Ok(expr)
            }
            Tok::End => Err(Failure::at(open, "Unmatched parentheses")),
            _ => Err(self.unexpected("\")\", \"and\" or \"or\"")),
        }
    }

    /// `Selector op Value / Selector "is" ["not"] "empty" / Value ["not"] "in" Selector`.
    fn parse_match(&mut self) -> Result<Match, Failure> {
        let path = match self.peek().clone() {
            Tok::Str(value) | Tok::Num(value) => {
                self.bump();
                return self.parse_in(value);
            }
            Tok::Sel(path) => path,
            _ => return Err(self.unexpected("a selector, a value or \"(\"")),
        };
        self.bump();
        let op_at = self.offset();
        let (negated, op) = match self.bump() {
            Tok::Eq => (false, "=="),
            Tok::Ne => (true, "!="),
            Tok::Sel(word) if word.len() == 1 => match word[0].as_str() {
                "contains" => (false, "contains"),
                "matches" => (false, "matches"),
                "in" => return self.parse_in_selector(path.join(".")),
                "is" => return self.parse_is(path),
                "not" => match self.bump() {
                    t if t.is_keyword("contains") => (true, "contains"),
                    t if t.is_keyword("matches") => (true, "matches"),
                    t if t.is_keyword("in") => {
                        return self
                            .parse_in_selector(path.join("."))
                            .map(|m| Match { negated: true, ..m });
                    }
                    _ => {
                        return Err(Failure::at(
                            op_at,
                            "expected \"contains\", \"matches\" or \"in\" after \"not\"",
                        ));
                    }
                },
                _ => return Err(self.bad_operator(op_at, &path)),
            },
            _ => return Err(self.bad_operator(op_at, &path)),
        };
        let value_at = self.offset();
        let value = self.parse_value(op)?;
        let test = match op {
            "contains" => Test::Contains(value),
            "matches" => {
                if self.patterns.len() >= MAX_REGEXES {
                    return Err(Failure {
                        at: value_at,
                        reason: format!("more than {MAX_REGEXES} \"matches\" operators"),
                        fatal: true,
                    });
                }
                self.patterns.push(value);
                Test::Matches(self.patterns.len() - 1)
            }
            _ => Test::Equal(value),
        };
        Ok(Match {
            path,
            test,
            negated,
        })
    }

    fn bad_operator(&self, at: usize, path: &[String]) -> Failure {
        let found = self
            .tokens
            .get(self.pos.saturating_sub(1))
            .map_or_else(|| Tok::End.describe(), |t| t.tok.describe());
        Failure::at(
            at,
            format!(
                "expected an operator (==, !=, contains, not contains, in, not in, matches, \
                 not matches, is empty, is not empty) after selector {:?}, found {found}",
                path.join(".")
            ),
        )
    }

    /// After `Value`: `["not"] "in" Selector`; the `not` is the caller's.
    fn parse_in(&mut self, value: String) -> Result<Match, Failure> {
        if self.peek().is_keyword("not") && self.peek_at(1).is_keyword("in") {
            self.bump();
            self.bump();
            let m = self.parse_in_selector(value)?;
            return Ok(Match { negated: true, ..m });
        }
        if self.peek().is_keyword("in") {
            self.bump();
            return self.parse_in_selector(value);
        }
        Err(self.unexpected("\"in\" or \"not in\" after a value"))
    }

    fn parse_in_selector(&mut self, value: String) -> Result<Match, Failure> {
        match self.peek().clone() {
            Tok::Sel(path) => {
                self.bump();
                Ok(Match {
                    path,
                    test: Test::Contains(value),
                    negated: false,
                })
            }
            _ => Err(Failure::at(self.offset(), "Invalid selector")),
        }
    }

    fn parse_is(&mut self, path: Vec<String>) -> Result<Match, Failure> {
        let negated = self.peek().is_keyword("not");
        if negated {
            self.bump();
        }
        if !self.peek().is_keyword("empty") {
            return Err(self.unexpected("\"empty\" or \"not empty\" after \"is\""));
        }
        self.bump();
        Ok(Match {
            path,
            test: Test::Empty,
            negated,
        })
    }

    fn parse_value(&mut self, op: &str) -> Result<String, Failure> {
        match self.peek().clone() {
            Tok::Str(s) | Tok::Num(s) => {
                self.bump();
                Ok(s)
            }
            Tok::Sel(path) => {
                self.bump();
                Ok(path.join("."))
            }
            _ => Err(self.unexpected(&format!("a value after {op:?}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// A `/v1/health/service/web` element, shaped as `render` writes it.
    fn entry() -> Value {
        json!({
            "Node": {
                "ID": "0e0b1c3a-0000-4000-8000-000000000001",
                "Node": "node-1",
                "Address": "10.0.0.1",
                "Datacenter": "dc1",
                "TaggedAddresses": {"lan": "10.0.0.1", "wan": "10.0.0.1"},
                "Meta": {"env": "prod", "consul-network-segment": ""},
            },
            "Service": {
                "ID": "web-1",
                "Service": "web",
                "Tags": ["primary", "prod"],
                "Meta": {"version": "1.4.2", "key with.dots": "dotted", "blank": ""},
                "Port": 8080,
                "Address": "",
                "Weights": {"Passing": 1, "Warning": 1},
                "EnableTagOverride": false,
                "Ratio": 0.5,
            },
            "Checks": [
                {"CheckID": "serfHealth", "Status": "passing", "Output": "Agent alive", "ServiceTags": []},
                {"CheckID": "service:web-1", "Status": "critical", "Output": "", "ServiceTags": ["primary", "prod"]},
            ],
            "Nothing": null,
        })
    }

    fn check(filter: &str, item: &Value) -> bool {
        match Filter::parse(filter) {
            Ok(f) => f.matches(item),
            Err(e) => panic!("{filter:?} did not parse: {e}"),
        }
    }

    fn on_entry(filter: &str) -> bool {
        check(filter, &entry())
    }

    fn error(filter: &str) -> String {
        match Filter::parse(filter) {
            Ok(f) => panic!("{filter:?} parsed as {f:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn equal_compares_strings_exactly() {
        assert!(on_entry(r#"Service.Service == "web""#));
        assert!(!on_entry(r#"Service.Service == "Web""#));
        assert!(!on_entry(r#"Service.Service == "we""#));
        assert!(on_entry(r#"Service.Address == """#));
        assert!(on_entry(r#"Service.Service=="web""#));
    }

    #[test]
    fn not_equal_negates_equal_on_a_present_field() {
        assert!(on_entry(r#"Service.Service != "db""#));
        assert!(!on_entry(r#"Service.Service != "web""#));
        assert!(!on_entry(r#"Service.Address != """#));
    }

    #[test]
    fn bare_words_are_string_values() {
        assert!(on_entry("Service.Service == web"));
        // Identifiers have no hyphens: `node-1` must be quoted.
        assert!(error("Node.Node == node-1").contains("found number -1"));
        assert!(on_entry(r#"Node.Node == "node-1""#));
        assert!(on_entry("Checks.Status == passing"));
        assert!(on_entry("primary in Service.Tags"));
        // A bare selector stands for its dotted text.
        assert!(check("A == b.c", &json!({"A": "b.c"})));
    }

    #[test]
    fn number_fields_compare_by_value_whatever_the_literal() {
        assert!(on_entry("Service.Port == 8080"));
        assert!(on_entry(r#"Service.Port == "8080""#));
        assert!(on_entry(r#"Service.Port == "0x1F90""#));
        assert!(on_entry(r#"Service.Port == "8_080""#));
        assert!(on_entry("Service.Port == 8080.0"));
        assert!(!on_entry("Service.Port == 8081"));
        assert!(on_entry("Service.Port != 8081"));
        assert!(!on_entry(r#"Service.Port == "http""#));
        assert!(on_entry(r#"Service.Port != "http""#));
        assert!(on_entry("Service.Weights.Passing == 1"));
        assert!(on_entry("Service.Ratio == 0.5"));
        assert!(check("N == -3", &json!({"N": -3})));
        assert!(check("N == 18446744073709551615", &json!({"N": u64::MAX})));
        assert!(check(
            r#"N == "18446744073709551615""#,
            &json!({"N": u64::MAX})
        ));
    }

    #[test]
    fn number_literals_against_string_fields_compare_as_text() {
        assert!(check("V == 1.2", &json!({"V": "1.2"})));
        assert!(!check("V == 1.2", &json!({"V": "1.20"})));
        assert!(check("V == -1", &json!({"V": "-1"})));
    }

    #[test]
    fn boolean_fields_read_values_like_go_parse_bool() {
        assert!(on_entry("Service.EnableTagOverride == false"));
        assert!(on_entry(r#"Service.EnableTagOverride == "F""#));
        assert!(on_entry("Service.EnableTagOverride == 0"));
        assert!(!on_entry("Service.EnableTagOverride == true"));
        assert!(!on_entry("Service.EnableTagOverride == no"));
        assert!(on_entry("Service.EnableTagOverride != true"));
    }

    #[test]
    fn contains_on_a_string_is_a_substring_test() {
        assert!(on_entry(r#"Service.Service contains "e""#));
        assert!(on_entry(r#""we" in Service.Service"#));
        assert!(!on_entry(r#"Service.Service contains "x""#));
        assert!(on_entry(r#"Service.Service not contains "x""#));
        assert!(on_entry(r#""x" not in Service.Service"#));
        assert!(on_entry(r#""" in Service.Service"#));
    }

    #[test]
    fn contains_on_a_list_is_membership_not_substring() {
        assert!(on_entry(r#"Service.Tags contains "prod""#));
        assert!(!on_entry(r#"Service.Tags contains "pro""#));
        assert!(on_entry(r#""primary" in Service.Tags"#));
        assert!(on_entry(r#""canary" not in Service.Tags"#));
        assert!(!on_entry(r#""prod" not in Service.Tags"#));
        assert!(check("1 in L", &json!({"L": [3, 1]})));
        assert!(!check(r#""x" in L"#, &json!({"L": [{"x": 1}]})));
    }

    #[test]
    fn contains_on_a_map_tests_its_keys() {
        assert!(on_entry(r#"Service.Meta contains "version""#));
        assert!(on_entry(r#""key with.dots" in Service.Meta"#));
        assert!(!on_entry(r#""1.4.2" in Service.Meta"#));
        assert!(on_entry(r#""owner" not in Service.Meta"#));
    }

    #[test]
    fn contains_on_a_number_never_holds() {
        assert!(!on_entry(r#"Service.Port contains "80""#));
        assert!(on_entry(r#"Service.Port not contains "80""#));
    }

    #[test]
    fn is_empty_covers_strings_lists_maps_null_and_missing_fields() {
        assert!(on_entry("Service.Address is empty"));
        assert!(on_entry("Service.Meta.blank is empty"));
        assert!(on_entry("Checks.ServiceTags is empty"));
        assert!(check("Tags is empty", &json!({"Tags": []})));
        assert!(check("Meta is empty", &json!({"Meta": {}})));
        assert!(on_entry("Nothing is empty"));
        assert!(on_entry("Service.Meta.owner is empty"));
        assert!(on_entry("Service.Missing.Deeper is empty"));
        assert!(!on_entry("Service.Tags is empty"));
        assert!(!on_entry("Service.Port is empty"));
        assert!(on_entry("Service.Tags is not empty"));
        assert!(on_entry("Service.Meta is not empty"));
        assert!(!on_entry("Service.Meta.owner is not empty"));
        assert!(!on_entry("Nothing is not empty"));
    }

    #[test]
    fn matches_is_an_unanchored_regex_search() {
        assert!(on_entry(r#"Service.Meta.version matches "^1\\.""#));
        assert!(on_entry(r#"Service.Meta.version matches "4""#));
        assert!(on_entry(r"Service.Meta.version matches `^1\.4\.\d+$`"));
        assert!(!on_entry(r#"Service.Meta.version matches "^2""#));
        assert!(on_entry(r#"Service.Meta.version not matches "^2""#));
        assert!(on_entry(r#"Service.Tags matches "^pri""#));
        assert!(!on_entry(r#"Service.Tags not matches "^pri""#));
        assert!(!on_entry(r#"Service.Port matches "80""#));
    }

    #[test]
    fn a_list_inside_a_selector_matches_when_any_element_does() {
        assert!(on_entry(r#"Checks.Status == "critical""#));
        assert!(on_entry(r#"Checks.Status == "passing""#));
        assert!(!on_entry(r#"Checks.Status == "warning""#));
        // go-bexpr applies the whole operator per element: one non-critical check suffices.
        assert!(on_entry(r#"Checks.Status != "critical""#));
        let all_critical = json!({"Checks": [{"Status": "critical"}, {"Status": "critical"}]});
        assert!(!check(r#"Checks.Status != "critical""#, &all_critical));
        assert!(!check(r#"not Checks.Status == "critical""#, &all_critical));
        assert!(on_entry(r#"Checks.ServiceTags contains "prod""#));
        assert!(on_entry(r#"Checks.Output is empty"#));
    }

    #[test]
    fn an_empty_list_inside_a_selector_matches_nothing() {
        let no_checks = json!({"Checks": []});
        assert!(!check(r#"Checks.Status == "passing""#, &no_checks));
        assert!(!check(r#"Checks.Status != "passing""#, &no_checks));
        assert!(!check("Checks.Status is empty", &no_checks));
        assert!(check("Checks is empty", &no_checks));
    }

    #[test]
    fn equal_on_a_list_field_means_some_element_and_not_equal_means_none() {
        assert!(on_entry(r#"Service.Tags == "prod""#));
        assert!(!on_entry(r#"Service.Tags != "prod""#));
        assert!(on_entry(r#"Service.Tags != "canary""#));
    }

    #[test]
    fn equal_on_a_map_field_never_holds() {
        assert!(!on_entry(r#"Service.Meta == "version""#));
        assert!(on_entry(r#"Service.Meta != "version""#));
    }

    #[test]
    fn an_absent_field_satisfies_only_negative_operators() {
        for positive in [
            r#"Service.Meta.owner == "x""#,
            r#"Service.Meta.owner == """#,
            r#"Service.Meta.owner contains "x""#,
            r#""x" in Service.Meta.owner"#,
            r#"Service.Meta.owner matches ".*""#,
            "Service.Meta.owner is not empty",
            r#"Nothing == "x""#,
            r#"Service.Port.Deeper == "x""#,
            r#"Missing == "x""#,
        ] {
            assert!(!on_entry(positive), "{positive}");
        }
        for negative in [
            r#"Service.Meta.owner != "x""#,
            r#"Service.Meta.owner not contains "x""#,
            r#""x" not in Service.Meta.owner"#,
            r#"Service.Meta.owner not matches ".*""#,
            "Service.Meta.owner is empty",
            r#"Missing != "x""#,
        ] {
            assert!(on_entry(negative), "{negative}");
        }
    }

    #[test]
    fn map_keys_index_with_dots_or_brackets() {
        assert!(on_entry(r#"Service.Meta.version == "1.4.2""#));
        assert!(on_entry(r#"Service.Meta["version"] == "1.4.2""#));
        assert!(on_entry(r#"Service.Meta[ `version` ] == "1.4.2""#));
        assert!(on_entry(r#"Service.Meta["key with.dots"] == dotted"#));
        assert!(on_entry(r#"Node.Meta["consul-network-segment"] is empty"#));
        assert!(check(
            r#"M["a"]["b"].c == 1"#,
            &json!({"M": {"a": {"b": {"c": 1}}}})
        ));
    }

    #[test]
    fn selectors_are_case_sensitive() {
        assert!(!on_entry(r#"service.service == "web""#));
        assert!(on_entry(r#"service.service != "web""#));
    }

    #[test]
    fn not_binds_tighter_than_and_which_binds_tighter_than_or() {
        let t = r#"Service.Service == "web""#;
        let f = r#"Service.Service == "db""#;
        // f and f or t == (f and f) or t
        assert!(on_entry(&format!("{f} and {f} or {t}")));
        // t or t and f == t or (t and f)
        assert!(on_entry(&format!("{t} or {t} and {f}")));
        // not t or t == (not t) or t
        assert!(on_entry(&format!("not {t} or {t}")));
        // not f and f == (not f) and f
        assert!(!on_entry(&format!("not {f} and {f}")));
        assert!(on_entry(&format!("not not {t}")));
        assert!(!on_entry(&format!("not not not {t}")));
    }

    #[test]
    fn parentheses_override_precedence() {
        let t = r#"Service.Service == "web""#;
        let f = r#"Service.Service == "db""#;
        assert!(!on_entry(&format!("{f} and ({f} or {t})")));
        assert!(!on_entry(&format!("not ({f} or {t})")));
        assert!(on_entry(&format!("not({f} and {t})")));
        assert!(on_entry(&format!("( ( {t} ) )")));
        assert!(on_entry(&format!("\n\t({t})\r\n")));
    }

    #[test]
    fn not_before_an_operator_is_a_selector_or_value_named_not() {
        assert!(check(r#"not contains "x""#, &json!({"not": "xyz"})));
        assert!(check(r#"not not contains "x""#, &json!({"not": "abc"})));
        assert!(check("not == 1", &json!({"not": 1})));
        assert!(check("not is empty", &json!({"not": ""})));
        assert!(check("not in L", &json!({"L": ["not"]})));
    }

    #[test]
    fn keywords_are_usable_as_values() {
        assert!(check(
            "S == and and T == or",
            &json!({"S": "and", "T": "or"})
        ));
        assert!(check("S == not", &json!({"S": "not"})));
    }

    #[test]
    fn double_quoted_strings_take_go_escapes() {
        let item = json!({"S": "a\"b\\c\td\u{e9}A\u{1F600}\u{7}"});
        assert!(check(r#"S == "a\"b\\c\td\u00e9\x41\U0001F600\a""#, &item));
        assert!(check(r#"S == "\101\102""#, &json!({"S": "AB"})));
        assert!(check(r#"S == "\xc3\xa9""#, &json!({"S": "\u{e9}"})));
    }

    #[test]
    fn backquoted_strings_are_raw() {
        assert!(check(r"S == `a\nb`", &json!({"S": "a\\nb"})));
        assert!(check("S == `a\r\nb`", &json!({"S": "a\nb"})));
        assert!(check("S == `say \"hi\"`", &json!({"S": "say \"hi\""})));
    }

    #[test]
    fn malformed_string_literals_are_rejected() {
        assert!(error(r#"S == "abc"#).contains("Unterminated string literal"));
        assert!(error("S == `abc").contains("Unterminated string literal"));
        assert!(error(r#"S == "\q""#).contains("invalid escape"));
        assert!(error(r#"S == "\'""#).contains("invalid escape"));
        assert!(error(r#"S == "\x4""#).contains("invalid escape"));
        assert!(error(r#"S == "\400""#).contains("invalid escape"));
        assert!(error(r#"S == "\ud800""#).contains("invalid escape"));
        assert!(error(r#"S == "\xff""#).contains("not valid UTF-8"));
        assert!(error("S == \"a\nb\"").contains("newline"));
    }

    #[test]
    fn unbalanced_parentheses_are_rejected() {
        assert_eq!(
            error(r#"(Service.Service == "web""#),
            "1:1 (0): Unmatched parentheses"
        );
        assert!(error(r#"Service.Service == "web")"#).contains("Unmatched parentheses"));
        assert!(error("()").contains("expected a selector"));
        assert!(error("(a == 1 b == 2)").contains(r#"1:9 (8): expected ")", "and" or "or""#));
        assert!(error(r#"(a == 1) and (b == 2"#).contains("1:14 (13)"));
    }

    #[test]
    fn a_missing_value_is_rejected() {
        assert_eq!(
            error("Service.Service =="),
            "1:19 (18): expected a value after \"==\", found end of input"
        );
        assert!(error("Service.Tags contains").contains("a value after \"contains\""));
        assert!(error(r#"Service.Meta.version matches )"#).contains("a value after"));
        assert!(error(r#""x" in"#).contains("Invalid selector"));
        assert!(error(r#""x" in "y""#).contains("Invalid selector"));
        assert!(error(r#""x""#).contains("\"in\" or \"not in\""));
    }

    #[test]
    fn unknown_operators_are_rejected() {
        for text in [
            "Service.Port = 8080",
            "Service.Port > 8080",
            "Service.Port <= 8080",
            "Service.Port equals 8080",
            "Service.Port",
            "Service.Tags has prod",
        ] {
            let e = error(text);
            assert!(
                e.contains("expected an operator") || e.contains("unknown operator"),
                "{text}: {e}"
            );
        }
        assert!(error("Service.Port >= 1").contains("1:14 (13): unknown operator \">=\""));
        assert!(error("Service.Tags is full").contains("\"empty\" or \"not empty\""));
        assert!(error("Service.Tags not equal x").contains("after \"not\""));
    }

    #[test]
    fn dangling_connectives_and_trailing_tokens_are_rejected() {
        assert!(error(r#"a == 1 and"#).contains("expected a selector"));
        assert!(error(r#"a == 1 or or b == 2"#).contains("expected an operator"));
        assert!(error(r#"a == 1 b == 2"#).contains("\"and\", \"or\""));
        assert!(error("not").contains("expected"));
        assert!(error("").starts_with("1:1 (0): expected a selector"));
        assert!(error("   ").contains("expected a selector"));
    }

    #[test]
    fn malformed_numbers_and_indexes_are_rejected() {
        assert!(error("a == 1.2.3").contains("Invalid number literal"));
        assert!(error("a == 01").contains("Invalid number literal"));
        assert!(error("a == 1x").contains("Invalid number literal"));
        assert!(error("a == -").contains("Invalid number literal"));
        assert!(error("a == 1e5").contains("Invalid number literal"));
        assert!(error("a[1] == 1").contains("Invalid index"));
        assert!(error(r#"a["b" == 1"#).contains("Unclosed index expression"));
        assert!(error("a. == 1").contains("unexpected character '.'"));
        assert!(error("_a == 1").contains("unexpected character '_'"));
    }

    #[test]
    fn errors_locate_the_fault_by_line_and_column() {
        let e = error("a == 1 and\n  b != 2 c");
        assert!(e.starts_with("2:10 (20): expected \"and\""), "{e}");
        let e = error("a == 1 and\n  b = 2");
        assert!(e.starts_with("2:5 (15): unknown operator \"=\""), "{e}");
        let e = error("é == 1");
        assert!(e.starts_with("1:1 (0): unexpected character"), "{e}");
        let e = error("a == \"é\" b");
        assert!(e.starts_with("1:10 (10): "), "{e}");
    }

    #[test]
    fn too_long_expressions_are_rejected() {
        let clause = r#"Service.Service == "web""#;
        let mut long = clause.to_string();
        while long.len() <= MAX_LEN {
            long.push_str(" or ");
            long.push_str(clause);
        }
        assert!(error(&long).contains(&format!("at most {MAX_LEN}")));
        let fits = long[..long.len() - clause.len() - 4].to_string();
        if fits.len() <= MAX_LEN {
            assert!(on_entry(&fits));
        }
    }

    #[test]
    fn too_deep_expressions_are_rejected() {
        let clause = r#"Service.Service == "web""#;
        let nested = |n: usize| format!("{}{clause}{}", "(".repeat(n), ")".repeat(n));
        assert!(on_entry(&nested(MAX_DEPTH)));
        assert!(error(&nested(MAX_DEPTH + 1)).contains("nests deeper than 64"));
        let nots = |n: usize| format!("{}{clause}", "not ".repeat(n));
        assert!(on_entry(&nots(MAX_DEPTH)));
        assert!(error(&nots(MAX_DEPTH + 1)).contains("nests deeper than 64"));
        assert!(error(&format!("{}(", "not (".repeat(40))).contains("nests deeper"));
    }

    #[test]
    fn failing_not_chains_parse_in_linear_time() {
        // Each `not` is tried as an operator and then as a selector; were the second try to
        // re-parse what follows, this would take 2^60 steps.
        let text = format!("{}(a == 1 and b ==", "not ".repeat(60));
        assert!(error(&text).contains("a value after"));
        let text = format!("{}not", "not ".repeat(60));
        assert!(Filter::parse(&text).is_err());
    }

    #[test]
    fn bad_regular_expressions_are_rejected() {
        let e = error(r#"Service.Meta.version matches "(""#);
        assert!(
            e.starts_with(r#"Failed to compile regular expression "(": "#),
            "{e}"
        );
        assert!(!e.contains('\n'), "{e}");
        assert!(error(r#"a not matches "[z-a]""#).contains("Failed to compile"));
    }

    #[test]
    fn huge_regular_expressions_are_rejected() {
        assert!(error(r#"a matches "\\w{100}""#).contains("size limit"));
        let e = error(r#"a matches "(\\w{100}){100}""#);
        assert!(e.contains("Failed to compile regular expression"), "{e}");
        assert!(e.contains("size limit"), "{e}");
        // Everyday patterns, Unicode classes included, stay well inside the limit.
        assert!(Filter::parse(r#"a matches "^[a-z0-9-]+\\.example\\.com$""#).is_ok());
        assert!(Filter::parse(r#"a matches "^\\w+-\\d+\\s*$""#).is_ok());
    }

    #[test]
    fn too_many_regular_expressions_are_rejected() {
        let clause = |i: usize| format!(r#"a matches "x{i}""#);
        let join = |n: usize| (0..n).map(clause).collect::<Vec<_>>().join(" or ");
        assert!(check(&join(MAX_REGEXES), &json!({"a": "x7"})));
        assert!(error(&join(MAX_REGEXES + 1)).contains("more than 32"));
    }

    #[test]
    fn regexes_in_an_abandoned_reading_do_not_count() {
        // `not matches "x"` is first tried as `not (matches "x" ...)`, which fails; the
        // pattern must be compiled once, for the selector named "not".
        let f = Filter::parse(r#"not matches "x""#).unwrap();
        assert_eq!(f.regexes.len(), 1);
        assert!(f.matches(&json!({"not": "xx"})));
    }

    #[test]
    fn filters_from_consul_docs_and_prometheus_configs() {
        // Consul's API docs (features/filtering).
        let agent_service = json!({
            "ID": "redis3", "Service": "redis", "Tags": ["primary", "qa"],
            "Meta": {"env": "qa"}, "Port": 1234, "Address": "",
        });
        assert!(check(r#"Meta.env == "qa""#, &agent_service));
        let catalog_service = json!({
            "Node": "node-2", "NodeMeta": {"arch": "arm", "os": "linux"},
            "ServiceTags": ["test", "tag"], "ServiceMeta": {"environment": "production"},
        });
        assert!(check(r#"NodeMeta.os == "linux""#, &catalog_service));
        assert!(check(
            r#"ServiceMeta["environment"] == production"#,
            &catalog_service
        ));
        let node_check = json!({"Node": "node-1", "CheckID": "node-health", "ServiceName": ""});
        assert!(!check(r#"ServiceName != """#, &node_check));
        // Prometheus `consul_sd_configs.filter` and the like.
        assert!(on_entry(
            r#"Service.Tags contains "prod" and Service.Meta.version matches "^1\\.""#
        ));
        assert!(on_entry(r#""primary" in Service.Tags"#));
        assert!(on_entry(r#"Checks.Status != "critical""#));
        assert!(on_entry(
            r#"Service.Service == "web" and Node.Meta.env == "prod" and not (Service.Tags contains "canary")"#
        ));
        assert!(!on_entry(
            r#"(Service.Tags contains "canary" or Service.Port == 9090) and Service.Meta.version is not empty"#
        ));
    }

    /// Valid filters whose mutations feed the robustness test.
    const SEEDS: &[&str] = &[
        r#"Service.Tags contains "prod" and Service.Meta.version matches "^1\\.""#,
        r#"not ("primary" in Service.Tags or Checks.Status != "critical")"#,
        r#"Service.Meta["key with.dots"] is not empty and Service.Port == -8080.5"#,
        r"Node.Meta.env not matches `^(dev|qa)$` or Service.Address is empty",
        r#""\u00e9\x41\101" not in Service.Meta"#,
    ];

    const PIECES: &[&str] = &[
        "Service",
        ".",
        "Tags",
        "Meta",
        "[",
        "]",
        "\"",
        "`",
        "\\",
        "(",
        ")",
        "==",
        "!=",
        "=",
        "!",
        " and ",
        " or ",
        "not ",
        " in ",
        " contains ",
        " matches ",
        " is ",
        "empty",
        "-",
        "0",
        "1.5",
        "x",
        "é",
        "\n",
        " ",
        "\\u",
        "\\x",
        "\\1",
        "{",
        "*",
        "+",
        "?",
        "\0",
    ];

    #[test]
    fn arbitrary_input_never_panics() {
        let mut rng = fastrand::Rng::with_seed(0x5eed_f17e);
        let item = entry();
        let mut parsed = 0;
        for round in 0..6000 {
            let text = if round % 2 == 0 {
                let mut bytes = SEEDS[rng.usize(..SEEDS.len())].as_bytes().to_vec();
                for _ in 0..rng.usize(1..4) {
                    let at = rng.usize(..=bytes.len());
                    match rng.u8(..3) {
                        0 if at < bytes.len() => {
                            bytes.remove(at);
                        }
                        1 => bytes.insert(at, rng.u8(..)),
                        _ => {
                            let piece = PIECES[rng.usize(..PIECES.len())].as_bytes();
                            bytes.splice(at..at, piece.iter().copied());
                        }
                    }
                }
                String::from_utf8_lossy(&bytes).into_owned()
            } else {
                (0..rng.usize(..24))
                    .map(|_| {
                        if rng.bool() {
                            PIECES[rng.usize(..PIECES.len())].to_string()
                        } else {
                            rng.char(..).to_string()
                        }
                    })
                    .collect()
            };
            if let Ok(filter) = Filter::parse(&text) {
                parsed += 1;
                filter.matches(&item);
                filter.matches(&Value::Null);
                filter.matches(&json!([item.clone(), 1, "x"]));
            }
        }
        // The mutations must reach the evaluator too, not only the error paths.
        assert!(parsed > 100, "only {parsed} inputs parsed");
    }
}
