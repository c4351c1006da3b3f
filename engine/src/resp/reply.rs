//! Replies onto the wire, in the protocol version the client chose with
//! `HELLO` (RESP2 until it does). RESP3 has types of its own for a null, a
//! map and a push (a subscriber's message); RESP2 writes them as the null
//! bulk, a flat array and an array.

use std::io::Write;

/// A connection's reply buffer.
#[derive(Debug, Default)]
pub struct Out {
    /// Bytes not yet written to the socket.
    pub buf: Vec<u8>,
    /// RESP3, once `HELLO 3` was answered.
    pub resp3: bool,
}

impl Out {
    /// `+text`.
    pub fn simple(&mut self, text: &str) {
        self.line(b'+', text);
    }

    /// `+OK`.
    pub fn ok(&mut self) {
        self.buf.extend_from_slice(b"+OK\r\n");
    }

    /// `-text`: the text starts with its code (`ERR`, `WRONGTYPE`, ...).
    /// A line end in it would end the reply early: it becomes a space.
    pub fn error(&mut self, text: &str) {
        self.line(b'-', text);
    }

    /// `:n`.
    pub fn int(&mut self, n: i64) {
        let _ = write!(self.buf, ":{n}\r\n");
    }

    /// `$len` and the bytes.
    pub fn bulk(&mut self, bytes: &[u8]) {
        let _ = write!(self.buf, "${}\r\n", bytes.len());
        self.buf.extend_from_slice(bytes);
        self.buf.extend_from_slice(b"\r\n");
    }

    /// No value (`$-1` / `_`).
    pub fn null(&mut self) {
        self.buf
            .extend_from_slice(if self.resp3 { b"_\r\n" } else { b"$-1\r\n" });
    }

    /// No array (`*-1` / `_`): what a blocking pop answers on its timeout.
    pub fn null_array(&mut self) {
        self.buf
            .extend_from_slice(if self.resp3 { b"_\r\n" } else { b"*-1\r\n" });
    }

    /// The header of an array of `n` elements.
    pub fn array(&mut self, n: usize) {
        let _ = write!(self.buf, "*{n}\r\n");
    }

    /// The header of a map of `n` pairs (RESP2: an array of 2n).
    pub fn map(&mut self, n: usize) {
        if self.resp3 {
            let _ = write!(self.buf, "%{n}\r\n");
        } else {
            self.array(2 * n);
        }
    }

    /// The header of a push of `n` elements: what a subscriber is sent
    /// (RESP2: an array).
    pub fn push(&mut self, n: usize) {
        if self.resp3 {
            let _ = write!(self.buf, ">{n}\r\n");
        } else {
            self.array(n);
        }
    }

    /// An array of bulks.
    pub fn bulks<'a>(&mut self, items: impl ExactSizeIterator<Item = &'a [u8]>) {
        self.array(items.len());
        for i in items {
            self.bulk(i);
        }
    }

    /// A one-line reply of `kind`; a line end in the text would end it
    /// early, so it becomes a space.
    fn line(&mut self, kind: u8, text: &str) {
        self.buf.push(kind);
        self.buf.extend(
            text.bytes()
                .map(|b| if b == b'\r' || b == b'\n' { b' ' } else { b }),
        );
        self.buf.extend_from_slice(b"\r\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resp2_and_resp3_shapes() {
        let mut o = Out::default();
        o.null();
        o.null_array();
        o.map(1);
        o.push(3);
        o.error("ERR a\r\nb");
        assert_eq!(o.buf, b"$-1\r\n*-1\r\n*2\r\n*3\r\n-ERR a  b\r\n");
        let mut o = Out {
            resp3: true,
            ..Default::default()
        };
        o.null();
        o.map(1);
        o.push(3);
        o.int(-4);
        o.bulk(b"x");
        assert_eq!(o.buf, b"_\r\n%1\r\n>3\r\n:-4\r\n$1\r\nx\r\n");
    }
}
