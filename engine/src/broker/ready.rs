//! The ready messages of a queue, in delivery order.
//!
//! A plain queue is one FIFO. A queue declared with `x-max-priority` N
//! keeps one FIFO per priority level 0..=N, as RabbitMQ's priority queues
//! do: the next message is the oldest one of the highest non-empty level,
//! a message's priority above N counts as N, and a message without one is
//! priority 0. A requeued delivery goes back to the head of its own level,
//! so it is the next of its priority again.
//!
//! Levels are a `Vec` indexed by priority; a plain queue has just the one,
//! and finding the head costs it nothing more than a `VecDeque` would.

use std::collections::VecDeque;
use std::time::Instant;

use super::queue::Entry;

/// RabbitMQ's upper bound for `x-max-priority`.
pub const MAX_PRIORITY: u8 = 255;

/// Ready messages, highest priority first, FIFO within a priority.
#[derive(Debug)]
pub(crate) struct Ready {
    levels: Vec<VecDeque<Entry>>,
    len: usize,
}

impl Default for Ready {
    fn default() -> Self {
        Ready::new(0)
    }
}

impl Ready {
    /// Messages ordered by priorities 0..=`max_priority` (0: a plain FIFO).
    pub fn new(max_priority: u8) -> Self {
        Ready {
            levels: (0..=max_priority).map(|_| VecDeque::new()).collect(),
            len: 0,
        }
    }

    fn level(&self, e: &Entry) -> usize {
        usize::from(e.priority).min(self.levels.len() - 1)
    }

    /// The highest level holding a message.
    fn top(&self) -> Option<usize> {
        if self.len == 0 {
            return None;
        }
        (0..self.levels.len())
            .rev()
            .find(|&l| !self.levels[l].is_empty())
    }

    /// Add a message behind the others of its priority.
    pub fn push_back(&mut self, e: Entry) {
        let l = self.level(&e);
        self.levels[l].push_back(e);
        self.len += 1;
    }

    /// Put a message back ahead of the others of its priority.
    pub fn push_front(&mut self, e: Entry) {
        let l = self.level(&e);
        self.levels[l].push_front(e);
        self.len += 1;
    }

    /// Take the next message to deliver.
    pub fn pop_front(&mut self) -> Option<Entry> {
        let l = self.top()?;
        self.len -= 1;
        self.levels[l].pop_front()
    }

    /// Take the head of some level that expired by `now` (RabbitMQ expires
    /// messages at the head only; each priority level has its own head).
    pub fn pop_expired(&mut self, now: Instant) -> Option<Entry> {
        if self.len == 0 {
            return None;
        }
        let l = self.levels.iter().position(|level| {
            level
                .front()
                .is_some_and(|e| e.expires_at.is_some_and(|t| t <= now))
        })?;
        self.len -= 1;
        self.levels[l].pop_front()
    }

    /// Messages held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Take every message, in delivery order.
    pub fn take(&mut self) -> Vec<Entry> {
        let mut all = Vec::with_capacity(self.len);
        for level in self.levels.iter_mut().rev() {
            all.extend(level.drain(..));
        }
        self.len = 0;
        all
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::message::Message;

    fn entry(body: &str, priority: u8) -> Entry {
        let mut e = Entry::new(Arc::new(Message::new(
            "",
            "q",
            Default::default(),
            body.as_bytes().to_vec(),
        )));
        e.priority = priority;
        e
    }

    fn bodies(r: &mut Ready) -> Vec<String> {
        std::iter::from_fn(|| r.pop_front())
            .map(|e| String::from_utf8(e.resident().unwrap().body.to_vec()).unwrap())
            .collect()
    }

    #[test]
    fn higher_priorities_first_fifo_within_one() {
        let mut r = Ready::new(5);
        for (b, p) in [("a0", 0), ("b3", 3), ("c9", 9), ("d3", 3), ("e0", 0)] {
            r.push_back(entry(b, p));
        }
        assert_eq!(r.len(), 5);
        // 9 is above the maximum and counts as 5.
        assert_eq!(bodies(&mut r), ["c9", "b3", "d3", "a0", "e0"]);
        assert!(r.is_empty());
    }

    #[test]
    fn a_plain_queue_ignores_priorities() {
        let mut r = Ready::new(0);
        for (b, p) in [("a", 0), ("b", 7), ("c", 1)] {
            r.push_back(entry(b, p));
        }
        assert_eq!(bodies(&mut r), ["a", "b", "c"]);
    }

    #[test]
    fn a_requeued_message_heads_its_own_level() {
        let mut r = Ready::new(2);
        r.push_back(entry("hi-1", 2));
        r.push_back(entry("lo-1", 0));
        r.push_back(entry("hi-2", 2));
        let first = r.pop_front().unwrap();
        r.push_front(entry("lo-0", 0));
        r.push_front(first);
        assert_eq!(bodies(&mut r), ["hi-1", "hi-2", "lo-0", "lo-1"]);
    }

    #[test]
    fn expiry_looks_at_every_level_head_and_take_keeps_delivery_order() {
        let now = Instant::now();
        let mut r = Ready::new(1);
        let mut old = entry("old-lo", 0);
        old.expires_at = Some(now);
        r.push_back(old);
        r.push_back(entry("hi", 1));
        r.push_back(entry("lo", 0));
        let e = r.pop_expired(now).unwrap();
        assert_eq!(&e.resident().unwrap().body[..], b"old-lo");
        assert!(r.pop_expired(now).is_none());
        let all = r.take();
        assert_eq!(all.len(), 2);
        assert_eq!(&all[0].resident().unwrap().body[..], b"hi");
        assert_eq!(r.len(), 0);
    }
}
