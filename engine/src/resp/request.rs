//! Commands off the wire: RESP multibulk requests (`*2\r\n$4\r\nLLEN\r\n$1\r\nq\r\n`)
//! and inline commands (`PING\r\n`, what a person types into telnet).
//!
//! A server reads only these two shapes, so this is a request parser, not
//! a general RESP decoder: an element that is not a bulk string (a nested
//! array, an integer) is a protocol error, as it is to Redis. It is written
//! here rather than taken from `redis-protocol` because that decoder
//! recurses into nested arrays without a depth bound, knows no inline
//! commands, takes any announced length, and parses a request again from
//! its first byte each time more of it arrives; the parser below keeps
//! its place, so a large request costs its size once.
//!
//! Every length is bounded before anything is allocated for it: a
//! multibulk of at most [`MAX_ARGS`] elements (the vector grows as they
//! arrive, never to the announced count), a bulk of at most the broker's
//! `max_message_size`, an inline command of at most [`MAX_INLINE`] bytes.
//! Past a bound the connection gets Redis's error text and is closed (the
//! rest of the stream cannot be framed).

use bytes::{Buf, Bytes, BytesMut};

/// Most arguments in one command (Redis's own limit).
pub const MAX_ARGS: usize = 1024 * 1024;

/// Longest inline command, bytes (Redis's `PROTO_INLINE_MAX_SIZE`).
pub const MAX_INLINE: usize = 64 * 1024;

/// Longest length prefix (`*`/`$` line), bytes: enough for any number.
const MAX_PREFIX_LINE: usize = 32;

/// The stream cannot be read on: answered with `-ERR Protocol error: ...`
/// and the connection closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Protocol error: {0}")]
pub struct ProtocolError(pub String);

fn error<T>(text: impl Into<String>) -> Result<T, ProtocolError> {
    Err(ProtocolError(text.into()))
}

/// One command's arguments, the command name first.
pub type Command = Vec<Bytes>;

/// Where the parser is within a multibulk request.
#[derive(Debug, Default)]
struct Partial {
    /// Elements announced.
    expected: usize,
    /// Elements read so far.
    args: Vec<Bytes>,
    /// The length of the bulk being read, once its `$` line was read.
    bulk: Option<usize>,
}

/// Reads commands out of a connection's buffer as they complete.
#[derive(Debug)]
pub struct Parser {
    max_bulk: usize,
    partial: Option<Partial>,
}

impl Parser {
    /// A parser taking bulks of at most `max_bulk` bytes.
    pub fn new(max_bulk: usize) -> Parser {
        Parser {
            max_bulk,
            partial: None,
        }
    }

    /// Bulks from here on may be at most `max` bytes.
    pub fn set_max_bulk(&mut self, max: usize) {
        self.max_bulk = max;
    }

    /// Whether part of a command has been read.
    pub fn mid_command(&self) -> bool {
        self.partial.is_some()
    }

    /// The next complete command in `buf`, consuming its bytes; `None`
    /// until one has arrived whole. An empty inline line is skipped, as
    /// Redis does.
    pub fn next(&mut self, buf: &mut BytesMut) -> Result<Option<Command>, ProtocolError> {
        loop {
            if self.partial.is_none() {
                let Some(&first) = buf.first() else {
                    return Ok(None);
                };
                if first != b'*' {
                    match inline(buf)? {
                        Some(args) if args.is_empty() => continue,
                        other => return Ok(other),
                    }
                }
                let Some(n) = prefix(buf, "invalid multibulk length")? else {
                    return Ok(None);
                };
                if n > MAX_ARGS as i64 {
                    return error("invalid multibulk length");
                }
                if n <= 0 {
                    // `*0` and `*-1` are no command: read on.
                    continue;
                }
                self.partial = Some(Partial {
                    expected: n as usize,
                    // Grown as elements arrive, never to the announced count.
                    args: Vec::with_capacity((n as usize).min(16)),
                    bulk: None,
                });
            }
            let p = self.partial.as_mut().expect("set above");
            while p.args.len() < p.expected {
                let len = match p.bulk {
                    Some(len) => len,
                    None => {
                        let Some(&first) = buf.first() else {
                            return Ok(None);
                        };
                        if first != b'$' {
                            return error(format!("expected '$', got '{}'", first as char));
                        }
                        let Some(n) = prefix(buf, "invalid bulk length")? else {
                            return Ok(None);
                        };
                        if !(0..=self.max_bulk as i64).contains(&n) {
                            return error("invalid bulk length");
                        }
                        let len = n as usize;
                        p.bulk = Some(len);
                        len
                    }
                };
                if buf.len() < len + 2 {
                    // Room for the rest of this bulk, once, as it arrives.
                    buf.reserve(len + 2 - buf.len());
                    return Ok(None);
                }
                if &buf[len..len + 2] != b"\r\n" {
                    return error("bulk not terminated by CRLF");
                }
                // A small argument is copied out, so that the read buffer
                // stays this connection's alone (no message in a queue
                // holds it, and it grows without copying); a large one is
                // handed over where it lies.
                let arg = if len < ZERO_COPY_FROM {
                    Bytes::copy_from_slice(&buf[..len])
                } else {
                    buf.split_to(len).freeze()
                };
                buf.advance(if len < ZERO_COPY_FROM { len + 2 } else { 2 });
                p.args.push(arg);
                p.bulk = None;
            }
            let done = self.partial.take().expect("set above");
            return Ok(Some(done.args));
        }
    }
}

/// Arguments at least this long are not copied out of the read buffer.
const ZERO_COPY_FROM: usize = 16 * 1024;

/// The number of the `*` or `$` line at the start of `buf`, consuming the
/// line; `None` until it has arrived; `what` is the error for a line that
/// is not a number or is too long.
fn prefix(buf: &mut BytesMut, what: &str) -> Result<Option<i64>, ProtocolError> {
    let window = &buf[..buf.len().min(MAX_PREFIX_LINE + 2)];
    let Some(at) = memchr::memchr(b'\n', window) else {
        return if buf.len() >= MAX_PREFIX_LINE + 2 {
            error(what)
        } else {
            Ok(None)
        };
    };
    let end = if at > 0 && buf[at - 1] == b'\r' {
        at - 1
    } else {
        at
    };
    let n = number(&buf[1..end]).ok_or_else(|| ProtocolError(what.into()))?;
    buf.advance(at + 1);
    Ok(Some(n))
}

/// A line ending in `\n` (its `\r` optional), without the line end;
/// `None` until it has arrived; an error past `max` bytes.
fn line(buf: &mut BytesMut, max: usize, too_long: &str) -> Result<Option<Bytes>, ProtocolError> {
    let window = &buf[..buf.len().min(max + 2)];
    match memchr::memchr(b'\n', window) {
        Some(at) => {
            let mut l = buf.split_to(at + 1).freeze();
            l.truncate(at);
            if l.last() == Some(&b'\r') {
                l.truncate(at - 1);
            }
            Ok(Some(l))
        }
        // Whether the line is too long depends only on its first bytes,
        // not on how they arrived.
        None if buf.len() >= max + 2 => error(too_long),
        None => Ok(None),
    }
}

/// An inline command: words split at spaces, with Redis's quoting
/// (`"..."` with escapes, `'...'`).
fn inline(buf: &mut BytesMut) -> Result<Option<Command>, ProtocolError> {
    let Some(l) = line(buf, MAX_INLINE, "too big inline request")? else {
        return Ok(None);
    };
    split_words(&l).map(Some)
}

fn split_words(l: &[u8]) -> Result<Command, ProtocolError> {
    let mut args = Vec::new();
    let mut i = 0;
    while i < l.len() {
        while i < l.len() && l[i].is_ascii_whitespace() {
            i += 1;
        }
        if i == l.len() {
            break;
        }
        let mut word = Vec::new();
        match l[i] {
            b'"' => {
                i += 1;
                loop {
                    match l.get(i) {
                        None => return error("unbalanced quotes in request"),
                        Some(b'"') => {
                            i += 1;
                            break;
                        }
                        Some(b'\\') if i + 1 < l.len() => {
                            let c = l[i + 1];
                            i += 2;
                            if c == b'x'
                                && let Some(h) = l.get(i..i + 2)
                                && let Ok(s) = std::str::from_utf8(h)
                                && let Ok(b) = u8::from_str_radix(s, 16)
                            {
                                word.push(b);
                                i += 2;
                                continue;
                            }
                            word.push(match c {
                                b'n' => b'\n',
                                b'r' => b'\r',
                                b't' => b'\t',
                                b'b' => 8,
                                b'a' => 7,
                                other => other,
                            });
                        }
                        Some(&c) => {
                            word.push(c);
                            i += 1;
                        }
                    }
                }
                if l.get(i).is_some_and(|c| !c.is_ascii_whitespace()) {
                    return error("unbalanced quotes in request");
                }
            }
            b'\'' => {
                i += 1;
                loop {
                    match l.get(i) {
                        None => return error("unbalanced quotes in request"),
                        Some(b'\'') => {
                            i += 1;
                            break;
                        }
                        Some(b'\\') if l.get(i + 1) == Some(&b'\'') => {
                            word.push(b'\'');
                            i += 2;
                        }
                        Some(&c) => {
                            word.push(c);
                            i += 1;
                        }
                    }
                }
                if l.get(i).is_some_and(|c| !c.is_ascii_whitespace()) {
                    return error("unbalanced quotes in request");
                }
            }
            _ => {
                while i < l.len() && !l[i].is_ascii_whitespace() {
                    word.push(l[i]);
                    i += 1;
                }
            }
        }
        args.push(Bytes::from(word));
    }
    Ok(args)
}

/// A decimal integer, as RESP writes lengths (at most 18 digits: no
/// overflow, and more than any bound here).
fn number(text: &[u8]) -> Option<i64> {
    let (negative, digits) = match text.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, text),
    };
    if digits.is_empty() || digits.len() > 18 {
        return None;
    }
    let mut n: i64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        n = n * 10 + i64::from(d - b'0');
    }
    Some(if negative { -n } else { n })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(parser: &mut Parser, bytes: &[u8]) -> Result<Vec<Vec<String>>, ProtocolError> {
        let mut buf = BytesMut::from(bytes);
        let mut out = Vec::new();
        while let Some(c) = parser.next(&mut buf)? {
            out.push(
                c.iter()
                    .map(|a| String::from_utf8_lossy(a).into_owned())
                    .collect(),
            );
        }
        Ok(out)
    }

    #[test]
    fn multibulk_and_inline_commands_in_one_stream() {
        let mut p = Parser::new(1024);
        let got = all(
            &mut p,
            b"*2\r\n$4\r\nLLEN\r\n$1\r\nq\r\nPING\r\n\r\nset \"a b\" 'c\\'d' \"\\x41\\n\"\n*0\r\n",
        )
        .unwrap();
        assert_eq!(
            got,
            vec![
                vec!["LLEN".to_owned(), "q".into()],
                vec!["PING".into()],
                vec!["set".into(), "a b".into(), "c'd".into(), "A\n".into()],
            ]
        );
        assert!(!p.mid_command());
    }

    #[test]
    fn a_command_split_anywhere_comes_out_once_whole() {
        let wire = b"*3\r\n$5\r\nLPUSH\r\n$1\r\nq\r\n$11\r\nhello world\r\n";
        for cut in 1..wire.len() {
            let mut p = Parser::new(1024);
            let mut buf = BytesMut::from(&wire[..cut]);
            assert_eq!(p.next(&mut buf).unwrap(), None, "cut at {cut}");
            buf.extend_from_slice(&wire[cut..]);
            let c = p.next(&mut buf).unwrap().unwrap();
            assert_eq!(c.len(), 3);
            assert_eq!(&c[2][..], b"hello world");
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn hostile_lengths_are_refused_before_anything_is_allocated() {
        let mut p = Parser::new(1024);
        // 2^31 elements: refused at the prefix.
        let e = p
            .next(&mut BytesMut::from(&b"*2147483648\r\n"[..]))
            .unwrap_err();
        assert_eq!(e.0, "invalid multibulk length");
        // Many elements announced, few sent: nothing is reserved for them.
        let mut p = Parser::new(1024);
        let mut buf = BytesMut::from(&b"*1048576\r\n$1\r\na\r\n"[..]);
        assert_eq!(p.next(&mut buf).unwrap(), None);
        assert!(p.partial.as_ref().unwrap().args.capacity() <= 16);
        // A bulk past the limit, a negative one, garbage.
        for bad in [
            &b"*1\r\n$1025\r\n"[..],
            b"*1\r\n$-5\r\n",
            b"*1\r\n$x\r\n",
            b"*x\r\n",
        ] {
            let mut p = Parser::new(1024);
            assert!(p.next(&mut BytesMut::from(bad)).is_err(), "{bad:?}");
        }
        // A length line that never ends.
        let mut p = Parser::new(1024);
        let e = p.next(&mut BytesMut::from(
            &b"*11111111111111111111111111111111111111"[..],
        ));
        assert!(e.is_err());
    }

    #[test]
    fn nested_arrays_and_unterminated_input_are_errors() {
        let mut p = Parser::new(1024);
        let e = p
            .next(&mut BytesMut::from(&b"*1\r\n*1\r\n$1\r\na\r\n"[..]))
            .unwrap_err();
        assert_eq!(e.0, "expected '$', got '*'");
        let mut p = Parser::new(1024);
        let e = p
            .next(&mut BytesMut::from(&b"*1\r\n$1\r\nabc"[..]))
            .unwrap_err();
        assert_eq!(e.0, "bulk not terminated by CRLF");
        // An inline command that never ends is refused at its bound.
        let mut p = Parser::new(1024);
        let long = vec![b'a'; MAX_INLINE + 10];
        assert_eq!(
            p.next(&mut BytesMut::from(&long[..])).unwrap_err().0,
            "too big inline request"
        );
        let mut p = Parser::new(1024);
        assert_eq!(
            p.next(&mut BytesMut::from(&b"a \"b\n"[..])).unwrap_err().0,
            "unbalanced quotes in request"
        );
    }
}
