//! The ready messages of a queue, in delivery order.
//!
//! A plain queue is one FIFO. A queue declared with `x-max-priority` N
//! keeps one FIFO per priority level 0..=N, as RabbitMQ's priority queues
//! do: the next message is the oldest one of the highest non-empty level,
//! a message's priority above N counts as N, and a message without one is
//! priority 0. A requeued delivery goes back to the head of its own level,
//! so it is the next of its priority again.
//!
//! A queue declared with `x-message-group-header` keeps one FIFO per
//! message group ([`Groups`]): a group with a message out (delivered and
//! not settled) delivers nothing more until it is settled, so each group's
//! messages go out one at a time and in order, while different groups go
//! to different consumers in parallel (SQS FIFO's message groups).
//!
//! A plain queue is a bare `VecDeque`, so its operations are the deque's
//! plus one branch: with per-level bookkeeping for every queue, a publish
//! cost 40 more instructions (callgrind, `publish/topic_1000`).

use super::clock::Instant;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

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
    /// An `x-message-group-header` queue.
    Grouped(Box<Groups>),
}

/// The ready messages of a queue with message groups.
///
/// Every message has a place in the queue's one order (`seq`: rising for
/// messages added at the back, falling for those put back at the head, so
/// a returned message is next, as in a plain queue). Each group keeps its
/// messages in that order; `ready` holds the groups that may deliver (a
/// message waiting, none out) by the place of their first message, so the
/// next message is the oldest one whose group is free: O(log groups), never
/// a scan past the messages of busy groups. Group 0 is the messages
/// without a group: never held.
#[derive(Debug, Default)]
pub(crate) struct Groups {
    by_group: HashMap<u32, VecDeque<(i64, Entry)>>,
    ready: BTreeMap<i64, u32>,
    out: HashSet<u32>,
    back: i64,
    front: i64,
    len: usize,
}

impl Groups {
    /// `g`'s first message's place, if `g` may deliver.
    fn head(&self, g: u32) -> Option<i64> {
        if g != 0 && self.out.contains(&g) {
            return None;
        }
        self.by_group.get(&g)?.front().map(|(seq, _)| *seq)
    }

    fn add(&mut self, e: Entry, at_front: bool) {
        let g = e.group;
        let before = self.head(g);
        let q = self.by_group.entry(g).or_default();
        if at_front {
            self.front -= 1;
            q.push_front((self.front, e));
        } else {
            self.back += 1;
            q.push_back((self.back, e));
        }
        self.len += 1;
        self.reindex(g, before);
    }

    /// `g`'s head may have changed from `before`: keep `ready` in step.
    fn reindex(&mut self, g: u32, before: Option<i64>) {
        let after = self.head(g);
        if before != after {
            if let Some(b) = before {
                self.ready.remove(&b);
            }
            if let Some(a) = after {
                self.ready.insert(a, g);
            }
        }
        if self.by_group.get(&g).is_some_and(VecDeque::is_empty) {
            self.by_group.remove(&g);
        }
    }

    /// Take the first message of `g` (which may deliver, or is being
    /// dropped): `deliver` holds the group until [`Groups::release`].
    fn take_from(&mut self, g: u32, deliver: bool) -> Option<Entry> {
        let before = self.head(g);
        let (_, e) = self.by_group.get_mut(&g)?.pop_front()?;
        self.len -= 1;
        if deliver && g != 0 {
            self.out.insert(g);
        }
        self.reindex(g, before);
        Some(e)
    }

    fn pop_front(&mut self) -> Option<Entry> {
        let (_, g) = self.ready.first_key_value().map(|(s, g)| (*s, *g))?;
        self.take_from(g, true)
    }

    /// The oldest message, its group held or not (a length limit drops
    /// it): O(groups).
    fn pop_oldest(&mut self) -> Option<Entry> {
        let g = self
            .by_group
            .iter()
            .filter_map(|(g, q)| q.front().map(|(seq, _)| (*seq, *g)))
            .min()?
            .1;
        self.take_from(g, false)
    }

    fn release(&mut self, g: u32) {
        if g == 0 {
            return;
        }
        let before = self.head(g);
        if self.out.remove(&g) {
            self.reindex(g, before);
        }
    }
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
    /// Messages ordered by priorities 0..=`max_priority` (0: a plain FIFO),
    /// or by message group.
    pub fn new(max_priority: u8, grouped: bool) -> Self {
        if grouped {
            return Ready::Grouped(Box::default());
        }
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
            Ready::Grouped(g) => g.add(e, false),
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
            Ready::Grouped(g) => g.add(e, true),
        }
    }

    /// Take the next message to deliver (in a grouped queue: of a group
    /// with nothing out, which then has one out).
    pub fn pop_front(&mut self) -> Option<Entry> {
        match self {
            Ready::Fifo(q) => q.pop_front(),
            Ready::Levels { levels, len } => {
                let e = levels.iter_mut().rev().find_map(VecDeque::pop_front)?;
                *len -= 1;
                Some(e)
            }
            Ready::Grouped(g) => g.pop_front(),
        }
    }

    /// Copies of up to `count` ready messages from the `skip`th on, in
    /// delivery order (a peek; a grouped queue's are sorted for it, which
    /// costs O(n log n)).
    pub fn peek(&self, skip: usize, count: usize) -> Vec<Entry> {
        match self {
            Ready::Fifo(q) => q.iter().skip(skip).take(count).cloned().collect(),
            Ready::Levels { levels, .. } => levels
                .iter()
                .rev()
                .flat_map(|l| l.iter())
                .skip(skip)
                .take(count)
                .cloned()
                .collect(),
            Ready::Grouped(g) => {
                let mut all: Vec<&(i64, Entry)> = g.by_group.values().flatten().collect();
                all.sort_by_key(|(seq, _)| *seq);
                all.into_iter()
                    .skip(skip)
                    .take(count)
                    .map(|(_, e)| e.clone())
                    .collect()
            }
        }
    }

    /// Take the oldest message to drop it (a length limit): unlike
    /// [`Ready::pop_front`], it holds no group.
    pub fn pop_oldest(&mut self) -> Option<Entry> {
        match self {
            Ready::Grouped(g) => g.pop_oldest(),
            _ => self.pop_front(),
        }
    }

    /// Whether a message can be delivered now (in a grouped queue, one of
    /// a group with nothing out).
    pub fn deliverable(&self) -> bool {
        match self {
            Ready::Grouped(g) => !g.ready.is_empty(),
            _ => !self.is_empty(),
        }
    }

    /// The message out of `group` was settled or returned: the group may
    /// deliver its next one.
    pub fn release(&mut self, group: u32) {
        if let Ready::Grouped(g) = self {
            g.release(group);
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
            Ready::Grouped(g) => {
                let (_, group) = g.ready.first_key_value().map(|(s, g)| (*s, *g))?;
                let head = &g.by_group.get(&group)?.front()?.1;
                if is_expired(head, now) {
                    g.take_from(group, false)
                } else {
                    None
                }
            }
        }
    }

    /// Messages held.
    pub fn len(&self) -> usize {
        match self {
            Ready::Fifo(q) => q.len(),
            Ready::Levels { len, .. } => *len,
            Ready::Grouped(g) => g.len,
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
            Ready::Grouped(g) => {
                let mut all: Vec<(i64, Entry)> = g.by_group.drain().flat_map(|(_, q)| q).collect();
                all.sort_unstable_by_key(|(seq, _)| *seq);
                g.ready.clear();
                g.len = 0;
                // What is out stays held until it is settled.
                all.into_iter().map(|(_, e)| e).collect()
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
        let mut r = Ready::new(5, false);
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
        let mut r = Ready::new(0, false);
        for (b, p) in [("a", 0), ("b", 7), ("c", 1)] {
            r.push_back(entry(b, p));
        }
        assert_eq!(bodies(&mut r), ["a", "b", "c"]);
    }

    #[test]
    fn a_requeued_message_heads_its_own_level() {
        let mut r = Ready::new(2, false);
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
        let mut r = Ready::new(1, false);
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

    fn grouped(body: &str, group: u32) -> Entry {
        let mut e = entry(body, 0);
        e.group = group;
        e
    }

    fn body(e: &Entry) -> String {
        String::from_utf8(e.resident().unwrap().body.to_vec()).unwrap()
    }

    #[test]
    fn a_group_delivers_one_at_a_time_in_order_and_others_go_on() {
        let mut r = Ready::new(0, true);
        for (b, g) in [
            ("a1", 1),
            ("a2", 1),
            ("b1", 2),
            ("n1", 0),
            ("a3", 1),
            ("b2", 2),
            ("n2", 0),
        ] {
            r.push_back(grouped(b, g));
        }
        assert_eq!(r.len(), 7);
        let a1 = r.pop_front().unwrap();
        assert_eq!(body(&a1), "a1");
        // Group 1 is out: the next are b1 and the ungrouped ones.
        let b1 = r.pop_front().unwrap();
        assert_eq!(body(&b1), "b1");
        assert_eq!(body(&r.pop_front().unwrap()), "n1");
        assert_eq!(body(&r.pop_front().unwrap()), "n2");
        assert!(!r.deliverable() && r.len() == 3, "groups 1 and 2 are out");
        assert!(r.pop_front().is_none());
        // a1 settled: a2 next; b1 returned: it heads its group again and,
        // put back at the head, comes before a2.
        r.release(1);
        r.release(2);
        r.push_front(b1);
        assert_eq!(body(&r.pop_front().unwrap()), "b1");
        assert_eq!(body(&r.pop_front().unwrap()), "a2");
        assert!(r.pop_front().is_none());
        r.release(1);
        assert_eq!(body(&r.pop_front().unwrap()), "a3");
        r.release(2);
        assert_eq!(body(&r.pop_front().unwrap()), "b2");
        assert!(r.is_empty());
    }

    #[test]
    fn a_length_limit_drops_the_oldest_even_of_a_busy_group_and_take_keeps_order() {
        let mut r = Ready::new(0, true);
        for (b, g) in [("a1", 1), ("a2", 1), ("b1", 2), ("a3", 1)] {
            r.push_back(grouped(b, g));
        }
        let a1 = r.pop_front().unwrap();
        assert_eq!(body(&a1), "a1");
        // Group 1 is out, a2 is still the oldest message waiting.
        assert_eq!(body(&r.pop_oldest().unwrap()), "a2");
        // Dropping holds nothing: b1 can go.
        assert!(r.deliverable());
        let all: Vec<String> = r.take().iter().map(body).collect();
        assert_eq!(all, ["b1", "a3"]);
        assert!(r.is_empty() && !r.deliverable());
    }

    #[test]
    fn an_expired_head_of_a_free_group_leaves_without_holding_it() {
        let now = Instant::now();
        let mut r = Ready::new(0, true);
        let mut old = grouped("old", 1);
        old.expires_at = Some(now);
        r.push_back(old);
        r.push_back(grouped("next", 1));
        assert_eq!(body(&r.pop_expired(&mut Some(now)).unwrap()), "old");
        assert_eq!(body(&r.pop_front().unwrap()), "next");
    }
}
