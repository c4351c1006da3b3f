//! Messages that are in a queue but not yet due.
//!
//! Two things hold a message back until a time:
//!
//! * a queue's own delay, `x-delivery-delay` (SQS's queue-level
//!   `DelaySeconds`): every message that enters waits that long before a
//!   consumer can have it;
//! * a delayed exchange (`x-delayed-message`): its scheduled messages wait
//!   in a queue of the broker's own, `amq.delayed.<exchange>`, each for its
//!   `x-delay`, and when one is due the queue hands it to a [`DueSink`]
//!   that routes it through the exchange's bindings of that moment.
//!
//! Both are the same mechanism in the queue: waiting messages sit in a
//! min-heap by due time ([`Waiting`]) beside the ready ones, and one timer
//! task per queue sleeps until the earliest. The due time is wall-clock
//! milliseconds counted from the message's publish time, which a durable
//! queue stores with the message and a quorum queue replicates with it:
//! a restarted broker or a new leader computes the same due time, and a
//! message whose time passed while no broker ran is due at once.
//!
//! Waiting messages are not ready: they do not count towards the queue's
//! length limits or its publisher flow control (a publisher of delayed
//! messages would otherwise be held back until they are due), but they do
//! count towards paging, so a backlog of persistent delayed messages is
//! kept on disk with only its 64-byte entries (and 16 bytes of due time
//! and order) in memory.

use std::cmp::Ordering as CmpOrdering;
use std::collections::BinaryHeap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use amq_protocol::types::AMQPValue;

use super::clock::now_ms;
use super::{Entry, Queue, State};
use crate::message::Message;

/// The longest delay: RabbitMQ's delayed-message exchange takes delays of
/// up to 2^32 - 1 milliseconds (49.7 days), and so does this broker.
pub const MAX_DELAY_MS: u64 = u32::MAX as u64;

/// The header a delayed exchange reads a message's delay from.
pub const DELAY_HEADER: &str = "x-delay";

/// Where a delayed exchange's queue sends messages that are due. Called
/// without the queue's lock; the entries are settled in the queue after
/// it returns (so a routed copy is in its queue's log before the
/// scheduled one leaves). It returns false when it cannot route now (its
/// exchange is not there yet, as at start-up before definitions are
/// back): the entries wait another [`RETRY_MS`].
pub type DueSink = Arc<dyn Fn(&Arc<Queue>, &[Entry]) -> bool + Send + Sync>;

/// How long due messages a sink could not take wait before the next try.
pub const RETRY_MS: u64 = 1000;

/// What a message's `x-delay` header asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delay {
    /// None, zero or negative: routed at once (as RabbitMQ's plugin does).
    Now,
    /// Held this many milliseconds.
    Ms(u64),
}

/// The delay `m`'s `x-delay` header asks for; `Err` says why it is not
/// one (not an integer, or past [`MAX_DELAY_MS`]).
pub fn delay_of(m: &Message) -> Result<Delay, String> {
    let Some(v) = m
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(DELAY_HEADER))
    else {
        return Ok(Delay::Now);
    };
    let n = match v {
        AMQPValue::LongString(s) => s.to_string().trim().parse::<i64>().ok(),
        AMQPValue::ShortString(s) => s.as_str().trim().parse::<i64>().ok(),
        other => super::integer(other),
    };
    match n {
        None => Err(format!(
            "its {DELAY_HEADER} header is not an integer number of milliseconds ({v:?})"
        )),
        Some(n) if n <= 0 => Ok(Delay::Now),
        Some(n) if n as u64 > MAX_DELAY_MS => Err(format!(
            "its {DELAY_HEADER} of {n} ms is past the maximum of {MAX_DELAY_MS} ms"
        )),
        Some(n) => Ok(Delay::Ms(n as u64)),
    }
}

/// A message waiting, ordered so that the heap's top is the earliest due
/// (and of those, the first to arrive).
#[derive(Debug)]
struct Pending {
    due: u64,
    seq: u64,
    entry: Entry,
}

impl PartialEq for Pending {
    fn eq(&self, other: &Self) -> bool {
        (self.due, self.seq) == (other.due, other.seq)
    }
}
impl Eq for Pending {}
impl PartialOrd for Pending {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}
impl Ord for Pending {
    fn cmp(&self, other: &Self) -> CmpOrdering {
        (other.due, other.seq).cmp(&(self.due, self.seq))
    }
}

/// A queue's waiting messages.
#[derive(Debug)]
pub(super) struct Waiting {
    heap: BinaryHeap<Pending>,
    seq: u64,
    /// The due time the queue's timer sleeps until (`u64::MAX`: none), so
    /// that only a message due earlier wakes it.
    armed: u64,
    /// Body bytes waiting.
    body_bytes: usize,
}

impl Default for Waiting {
    fn default() -> Self {
        Waiting {
            heap: BinaryHeap::new(),
            seq: 0,
            armed: u64::MAX,
            body_bytes: 0,
        }
    }
}

impl Waiting {
    fn push(&mut self, due: u64, entry: Entry) {
        self.seq += 1;
        self.body_bytes += entry.body_len as usize;
        self.heap.push(Pending {
            due,
            seq: self.seq,
            entry,
        });
    }

    /// The earliest message if it is due at `now`: strictly past its due
    /// millisecond, since both are whole milliseconds of a clock read by
    /// truncation, and a message must never go out early.
    fn pop_due(&mut self, now: u64) -> Option<Entry> {
        if self.heap.peek()?.due >= now {
            return None;
        }
        let p = self.heap.pop()?;
        self.body_bytes -= p.entry.body_len as usize;
        Some(p.entry)
    }

    fn next_due(&self) -> Option<u64> {
        self.heap.peek().map(|p| p.due)
    }

    /// Messages waiting.
    pub(super) fn len(&self) -> usize {
        self.heap.len()
    }

    /// Take every waiting message, earliest due first.
    pub(super) fn take(&mut self) -> Vec<Entry> {
        self.body_bytes = 0;
        let mut all = std::mem::take(&mut self.heap).into_sorted_vec();
        // Sorted ascending by `Ord`, which is reversed: latest first.
        all.reverse();
        all.into_iter().map(|p| p.entry).collect()
    }
}

/// How many due messages one turn of the timer moves, so that a burst of
/// them does not hold the queue's lock for long.
const BATCH: usize = 512;

impl Queue {
    /// When `entry` (published at `published_ms`, `None`: now) is due, if
    /// it is held back at all: by the queue's `x-delivery-delay`, or in a
    /// delayed exchange's queue by its `x-delay` (the exchange routed it
    /// here only with a valid one).
    pub(super) fn due_of(
        &self,
        st: &State,
        message: Option<&Message>,
        published_ms: Option<u64>,
    ) -> Option<u64> {
        let delay = if self.due_sink.is_some() {
            match message.map(delay_of) {
                Some(Ok(Delay::Ms(ms))) => ms,
                _ => 0,
            }
        } else {
            st.limits.delivery_delay?.as_millis() as u64
        };
        Some(published_ms.unwrap_or_else(now_ms).saturating_add(delay))
    }

    /// Whether a message due at `due` waits (a delayed exchange's queue
    /// holds even a due one for its timer: it has no consumers).
    pub(super) fn holds(&self, due: u64) -> bool {
        self.due_sink.is_some() || due >= now_ms()
    }

    /// Put `entry` among the waiting messages until `due`, and make sure
    /// the timer wakes for it.
    pub(super) fn wait(self: &Arc<Self>, st: &mut State, entry: Entry, due: u64) {
        self.waiting_bytes
            .fetch_add(entry.footprint(), Ordering::Relaxed);
        st.waiting.push(due, entry);
        self.arm(st);
    }

    /// Messages waiting for their time (`x-delivery-delay`, or a delayed
    /// exchange's scheduled messages).
    pub fn delayed(&self) -> usize {
        self.state.lock().waiting.len()
    }

    /// Bytes of waiting messages as they count towards paging.
    pub(super) fn waiting_bytes(&self) -> usize {
        self.waiting_bytes.load(Ordering::Relaxed)
    }

    /// This queue holds a delayed exchange's scheduled messages: due ones
    /// go to `sink` instead of to consumers.
    pub(crate) fn with_due_sink(mut self, sink: DueSink) -> Self {
        self.due_sink = Some(sink);
        self
    }

    /// Whether this is a delayed exchange's queue.
    pub fn schedules(&self) -> bool {
        self.due_sink.is_some()
    }

    /// Wake the timer if the earliest waiting message is due before the
    /// time it sleeps until, starting it on first use.
    fn arm(self: &Arc<Self>, st: &mut State) {
        let Some(next) = st.waiting.next_due() else {
            return;
        };
        if next >= st.waiting.armed {
            return;
        }
        let wake = match self.timer.get() {
            Some(w) => w.clone(),
            None => {
                // Outside a runtime (a unit test, recovery before the
                // server runs) the next push or the sweep starts it.
                let Ok(rt) = tokio::runtime::Handle::try_current() else {
                    return;
                };
                let wake = Arc::new(tokio::sync::Notify::new());
                if self.timer.set(wake.clone()).is_err() {
                    return;
                }
                rt.spawn(run_timer(Arc::downgrade(self), wake.clone()));
                wake
            }
        };
        st.waiting.armed = next;
        wake.notify_one();
    }

    /// Start the timer for messages recovered before a runtime ran (the
    /// broker's periodic sweep calls it).
    pub(super) fn arm_waiting(self: &Arc<Self>) {
        // The sweep calls this for every queue: no lock for the many with
        // a timer already, or nothing waiting.
        if self.timer.get().is_some() || self.waiting_bytes() == 0 {
            return;
        }
        let mut st = self.state.lock();
        if st.waiting.len() > 0 && self.timer.get().is_none() {
            st.waiting.armed = u64::MAX;
            self.arm(&mut st);
        }
    }

    /// Move what is due, one batch: into the ready messages (and on to
    /// consumers), or to the due sink. Returns when the next waiting
    /// message is due (0: more are due now).
    fn promote_due(self: &Arc<Self>) -> Option<u64> {
        let mut due = Vec::new();
        let mut dead = Vec::new();
        let next = {
            let mut st = self.state.lock();
            let now = now_ms();
            while due.len() < BATCH
                && let Some(e) = st.waiting.pop_due(now)
            {
                self.waiting_bytes
                    .fetch_sub(e.footprint(), Ordering::Relaxed);
                due.push(e);
            }
            if self.due_sink.is_none() {
                for e in due.drain(..) {
                    self.count_ready(&mut st, &e);
                    st.messages.push_back(e);
                }
                self.dispatch_locked(&mut st, &mut dead);
            }
            let next = st.waiting.next_due();
            st.waiting.armed = next.unwrap_or(u64::MAX);
            next
        };
        self.bury(dead);
        let full = due.len() == BATCH;
        if let (Some(sink), false) = (&self.due_sink, due.is_empty()) {
            if !sink(self, &due) {
                let mut st = self.state.lock();
                let retry = now_ms() + RETRY_MS;
                for e in due {
                    self.waiting_bytes
                        .fetch_add(e.footprint(), Ordering::Relaxed);
                    st.waiting.push(retry, e);
                }
                let next = st.waiting.next_due();
                st.waiting.armed = next.unwrap_or(u64::MAX);
                return next;
            }
            self.delivered
                .fetch_add(due.len() as u64, Ordering::Relaxed);
            self.forget(&due);
        }
        // More are due: the timer comes back at once, after letting
        // the runtime's other tasks run.
        if full { Some(0) } else { next }
    }
}

/// A queue's timer: sleeps until its earliest waiting message is due (or
/// an earlier one arrives), moves what is due, and ends with the queue.
async fn run_timer(queue: Weak<Queue>, wake: Arc<tokio::sync::Notify>) {
    loop {
        let next = match queue.upgrade() {
            Some(q) => q.promote_due(),
            None => return,
        };
        match next {
            // A burst: one batch at a time, so that routing a million due
            // messages does not hold a runtime worker for seconds.
            Some(due) if due < now_ms() => tokio::task::yield_now().await,
            Some(due) => {
                let wait = Duration::from_millis((due + 1).saturating_sub(now_ms()));
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = wake.notified() => {}
                }
            }
            None => wake.notified().await,
        }
    }
}

impl Drop for Queue {
    fn drop(&mut self) {
        // Its timer holds it weakly: woken, it finds the queue gone.
        if let Some(w) = self.timer.get() {
            w.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol::protocol::BasicProperties;
    use amq_protocol::types::FieldTable;

    fn with_delay(v: AMQPValue) -> Message {
        let mut h = FieldTable::default();
        h.insert(DELAY_HEADER.into(), v);
        Message::new(
            "x",
            "k",
            BasicProperties::default().with_headers(h),
            bytes::Bytes::new(),
        )
    }

    #[test]
    fn a_delay_is_an_integer_of_milliseconds_up_to_the_maximum() {
        assert_eq!(
            delay_of(&with_delay(AMQPValue::LongInt(5000))),
            Ok(Delay::Ms(5000))
        );
        assert_eq!(
            delay_of(&with_delay(AMQPValue::LongString("250".into()))),
            Ok(Delay::Ms(250))
        );
        assert_eq!(
            delay_of(&with_delay(AMQPValue::LongLongInt(-3))),
            Ok(Delay::Now)
        );
        assert!(
            delay_of(&with_delay(AMQPValue::LongString("soon".into())))
                .unwrap_err()
                .contains("not an integer")
        );
        assert!(
            delay_of(&with_delay(AMQPValue::LongLongInt(1 << 40)))
                .unwrap_err()
                .contains("maximum")
        );
        assert_eq!(
            delay_of(&with_delay(AMQPValue::LongLongInt(7 * 86_400_000))),
            Ok(Delay::Ms(7 * 86_400_000))
        );
    }

    #[test]
    fn the_earliest_due_comes_first_and_equal_times_keep_their_order() {
        let mut w = Waiting::default();
        let e = |b: &str| {
            Entry::new(Arc::new(Message::new(
                "",
                b,
                BasicProperties::default(),
                bytes::Bytes::new(),
            )))
        };
        w.push(30, e("c"));
        w.push(10, e("a"));
        w.push(10, e("b"));
        w.push(20, e("x"));
        let key = |e: Entry| e.resident().unwrap().routing_key.clone();
        assert_eq!(w.pop_due(5).map(key), None);
        assert_eq!(w.pop_due(10).map(key), None, "due only once past");
        assert_eq!(w.pop_due(11).map(key).as_deref(), Some("a"));
        assert_eq!(w.pop_due(11).map(key).as_deref(), Some("b"));
        assert_eq!(w.next_due(), Some(20));
        let rest: Vec<String> = w.take().into_iter().map(key).collect();
        assert_eq!(rest, ["x", "c"]);
        assert_eq!(w.len(), 0);
    }
}
