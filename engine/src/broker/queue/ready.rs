//! The ready messages of a queue, in delivery order.
//!
//! A plain queue is one FIFO. A queue declared with `x-max-priority` N
//! keeps one FIFO per priority level 0..=N, as RabbitMQ's priority queues
//! do: the next message is the oldest one of the highest non-empty level,
//! a message's priority above N counts as N, and a message without one is
//! priority 0. A requeued delivery goes back to the head of its own level,
//! so it is the next of its priority again.
//!
//! A plain queue is a bare `VecDeque`, so its operations are the deque's
//! plus one branch: with per-level bookkeeping for every queue, a publish
//! cost 40 more instructions (callgrind, `publish/topic_1000`).

use super::clock::Instant;
use std::collections::VecDeque;

use super::entry::Entry;

/// RabbitMQ's upper bound for `x-max-priority`.
pub const MAX_PRIORITY: u8 = 255;

/// Ready messages, highest priority first, FIFO within a priority.
#[derive(Debug)]
pub(crate) enum Ready {
    /// A plain queue.
    Fifo(VecDeque<Entry>),
    /// An `x-max-priority` queue: one FIFO per level, indexed by priority.
    Levels {
        levels: Vec<VecDeque<Entry>>,
        len: usize,
    },
}

impl Default for Ready {
    fn default() -> Self {
        Ready::Fifo(VecDeque::new())
    }
}

/// Whether `e` expired; the clock is read only for an entry that can
/// expire, and at most once per `now`.
fn is_expired(e: &Entry, now: &mut Option<Instant>) -> bool {
    e.expires_at
        .is_some_and(|t| t <= *now.get_or_insert_with(Instant::now))
}

impl Ready {
    /// Messages ordered by priorities 0..=`max_priority` (0: a plain FIFO).
    pub fn new(max_priority: u8) -> Self {
        if max_priority == 0 {
            return Ready::default();
        }
        Ready::Levels {
            levels: (0..=max_priority).map(|_| VecDeque::new()).collect(),
            len: 0,
        }
    }

    /// The deque of `e`'s priority level (above the maximum: the top one).
    fn level_of<'a>(levels: &'a mut [VecDeque<Entry>], e: &Entry) -> &'a mut VecDeque<Entry> {
        let l = usize::from(e.priority).min(levels.len() - 1);
        &mut levels[l]
    }

    /// Add a message behind the others of its priority.
    pub fn push_back(&mut self, e: Entry) {
        match self {
            Ready::Fifo(q) => q.push_back(e),
            Ready::Levels { levels, len } => {
                *len += 1;
                Self::level_of(levels, &e).push_back(e);
            }
        }
    }

    /// Put a message back ahead of the others of its priority.
    pub fn push_front(&mut self, e: Entry) {
        match self {
            Ready::Fifo(q) => q.push_front(e),
            Ready::Levels { levels, len } => {
                *len += 1;
                Self::level_of(levels, &e).push_front(e);
            }
        }
    }

    /// Take the next message to deliver.
    pub fn pop_front(&mut self) -> Option<Entry> {
        match self {
            Ready::Fifo(q) => q.pop_front(),
            Ready::Levels { levels, len } => {
                let e = levels.iter_mut().rev().find_map(VecDeque::pop_front)?;
                *len -= 1;
                Some(e)
            }
        }
    }

    /// Take the head of some level that expired by `now` (RabbitMQ expires
    /// messages at the head only; each priority level has its own head).
    /// `now` is read from the clock on first need (most queues hold no
    /// message that can expire, and this runs on every dispatch).
    pub fn pop_expired(&mut self, now: &mut Option<Instant>) -> Option<Entry> {
        match self {
            Ready::Fifo(q) => {
                if q.front().is_some_and(|e| is_expired(e, now)) {
                    q.pop_front()
                } else {
                    None
                }
            }
            Ready::Levels { levels, len } => {
                if *len == 0 {
                    return None;
                }
                let level = levels
                    .iter_mut()
                    .find(|l| l.front().is_some_and(|e| is_expired(e, &mut *now)))?;
                *len -= 1;
                level.pop_front()
            }
        }
    }

    /// Messages held.
    pub fn len(&self) -> usize {
        match self {
            Ready::Fifo(q) => q.len(),
            Ready::Levels { len, .. } => *len,
        }
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Take every message, in delivery order.
    pub fn take(&mut self) -> Vec<Entry> {
        match self {
            Ready::Fifo(q) => std::mem::take(q).into(),
            Ready::Levels { levels, len } => {
                let mut all = Vec::with_capacity(*len);
                for level in levels.iter_mut().rev() {
                    all.extend(level.drain(..));
                }
                *len = 0;
                all
            }
        }
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
        let e = r.pop_expired(&mut Some(now)).unwrap();
        assert_eq!(&e.resident().unwrap().body[..], b"old-lo");
        assert!(r.pop_expired(&mut Some(now)).is_none());
        let all = r.take();
        assert_eq!(all.len(), 2);
        assert_eq!(&all[0].resident().unwrap().body[..], b"hi");
        assert_eq!(r.len(), 0);
    }
}
