//! A connection's output: the bytes waiting for the client, and which
//! deliveries they complete.
//!
//! A consumer's window credit returns when its delivery's bytes are on the
//! socket, not when they were queued here: a client that stops reading
//! must stop receiving, or a fast queue would fill this buffer without
//! bound. So each delivery is recorded with the stream position where it
//! ends, and [`Outbox::wrote`] hands back every delivery the written bytes
//! reached, in order.
//!
//! Writes are partial and the buffer is reused: written bytes are dropped
//! when everything is written (the usual case), or moved out now and then
//! for a slow reader, never per write.

use std::collections::VecDeque;

/// Output for the client, and the deliveries in it (`T`, what a delivery's
/// completion gives back).
pub(crate) struct Outbox<T> {
    /// Frames to send; callers encode into it. Its first `sent` bytes are
    /// written already.
    pub(crate) buf: Vec<u8>,
    sent: usize,
    /// Position of `buf[0]` in the connection's output stream.
    start: u64,
    /// Deliveries in `buf`, with the stream position where each ends.
    ends: VecDeque<(u64, T)>,
    /// Written bytes are moved out once this many have piled up in front of
    /// unwritten ones.
    compact_at: usize,
}

impl<T> Outbox<T> {
    /// An empty outbox that moves written bytes out past `compact_at`.
    pub(crate) fn new(capacity: usize, compact_at: usize) -> Self {
        Outbox {
            buf: Vec::with_capacity(capacity),
            sent: 0,
            start: 0,
            ends: VecDeque::new(),
            compact_at,
        }
    }

    /// Bytes not written yet.
    pub(crate) fn pending(&self) -> usize {
        self.buf.len() - self.sent
    }

    /// The bytes not written yet.
    pub(crate) fn unsent(&self) -> &[u8] {
        &self.buf[self.sent..]
    }

    /// A delivery ends at the current end of the buffer.
    pub(crate) fn delivery_ends(&mut self, delivery: T) {
        self.ends
            .push_back((self.start + self.buf.len() as u64, delivery));
    }

    /// `n` more bytes were written: give every delivery they completed to
    /// `done`, in order.
    pub(crate) fn wrote(&mut self, n: usize, mut done: impl FnMut(T)) {
        debug_assert!(n <= self.pending());
        self.sent += n;
        let written = self.start + self.sent as u64;
        while self.ends.front().is_some_and(|(end, _)| *end <= written) {
            let (_, delivery) = self.ends.pop_front().expect("checked");
            done(delivery);
        }
        if self.sent == self.buf.len() {
            self.buf.clear();
        } else if self.sent >= self.compact_at {
            // A slow reader: move the rest to the front now and then.
            self.buf.drain(..self.sent);
        } else {
            return;
        }
        self.start += self.sent as u64;
        self.sent = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deliveries completed by writing `n` bytes.
    fn write(o: &mut Outbox<&'static str>, n: usize) -> Vec<&'static str> {
        let mut done = Vec::new();
        o.wrote(n, |d| done.push(d));
        done
    }

    #[test]
    fn credit_returns_when_a_deliverys_last_byte_is_written() {
        let mut o = Outbox::new(64, 1 << 20);
        o.buf.extend_from_slice(&[1; 10]);
        o.delivery_ends("a");
        o.buf.extend_from_slice(&[2; 5]); // an ack, say: no delivery
        o.buf.extend_from_slice(&[3; 10]);
        o.delivery_ends("b");
        assert_eq!(o.pending(), 25);
        assert_eq!(write(&mut o, 9), Vec::<&str>::new());
        assert_eq!(write(&mut o, 1), ["a"]);
        assert_eq!(o.unsent()[0], 2);
        assert_eq!(write(&mut o, 14), Vec::<&str>::new());
        assert_eq!(write(&mut o, 1), ["b"]);
        assert_eq!(o.pending(), 0);
        assert!(o.buf.is_empty(), "all written: the buffer is reused");
    }

    #[test]
    fn one_write_completes_several_deliveries_in_order() {
        let mut o = Outbox::new(64, 1 << 20);
        for d in ["a", "b", "c"] {
            o.buf.extend_from_slice(&[0; 4]);
            o.delivery_ends(d);
        }
        assert_eq!(write(&mut o, 12), ["a", "b", "c"]);
    }

    #[test]
    fn positions_survive_the_buffer_being_compacted() {
        // Compact after 8 written bytes with more still pending.
        let mut o = Outbox::new(64, 8);
        o.buf.extend_from_slice(&[1; 10]);
        o.delivery_ends("a");
        o.buf.extend_from_slice(&[2; 10]);
        o.delivery_ends("b");
        assert!(write(&mut o, 8).is_empty());
        assert_eq!(o.buf.len(), 12, "the written 8 bytes moved out");
        assert_eq!(write(&mut o, 2), ["a"]);
        // A delivery added after compaction still ends where it should.
        o.buf.extend_from_slice(&[3; 3]);
        o.delivery_ends("c");
        assert!(write(&mut o, 9).is_empty());
        assert_eq!(write(&mut o, 1), ["b"]);
        assert_eq!(write(&mut o, 3), ["c"]);
        assert_eq!(o.pending(), 0);
    }
}
