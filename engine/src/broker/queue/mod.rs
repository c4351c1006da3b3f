//! A queue: an ordered buffer of messages and the consumers it feeds.
//!
//! Delivery is push-based with credit, as in RabbitMQ: a message arriving at
//! a queue goes straight to the next consumer (round-robin) that has credit,
//! or waits in the queue. A consumer's credit is bounded twice:
//!
//! * **prefetch** (`basic.qos`): deliveries not yet acked, per consumer and
//!   optionally per channel;
//! * **window**: deliveries handed to its connection but not yet written to
//!   the socket. Credit comes back only after the delivery is written, so a
//!   slow client (even in no-ack mode) cannot make the broker buffer without
//!   bound: messages stay in the queue instead.
//!
//! Whoever returns credit (an ack, a socket write) calls [`Queue::dispatch`]
//! to move waiting messages on.
//!
//! The other direction is bounded too: a queue whose ready messages exceed
//! its flow watermark (bytes) reports itself [`Queue::congested`], and the
//! AMQP connection that published into it stops reading from its client
//! until the queue drains below half the watermark ([`Queue::until_drained`]).
//! That is RabbitMQ's credit flow in spirit: TCP pushes back on a publisher
//! that outruns its consumers, instead of the broker's memory growing.
//!
//! Queue arguments ([`QueueLimits`]) add message TTL (`x-message-ttl` and
//! the per-message `expiration`, enforced at the head of the queue as
//! RabbitMQ does, plus a periodic sweep), length limits (`x-max-length`,
//! `x-max-length-bytes` with `x-overflow`), and dead-lettering: messages
//! that expire, overflow or are rejected without requeue are handed to the
//! queue's [`DeadLetterSink`] *after* the queue's lock is released (the
//! dead-letter exchange may route straight back into this queue).
//! `x-max-priority` orders ready messages by priority ([`ready`]).
//!
//! The files beside this one: `arguments` (the `x-` arguments read at
//! declare time), `consumer` (a consumer and its credit), `ready` (the
//! ready messages, FIFO or by priority), `entry` (one message in a
//! queue, in memory or paged out), `clock` (the time TTLs are read
//! from, which tests advance instead of sleeping), `stored` (a durable
//! queue's messages recovered from and read back from its log) and
//! `replicated` (a quorum queue's live queue, reporting to its Raft log)
//! and `schedule` (messages held until a time: `x-delivery-delay`, and a
//! delayed exchange's scheduled messages).

mod arguments;
mod clock;
mod consumer;
mod entry;
mod ready;
mod replicated;
mod schedule;
mod stored;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use amq_protocol::types::FieldTable;
use parking_lot::Mutex;

pub use arguments::{Overflow, QueueLimits, integer, message_ttl};
use clock::{Instant, now_ms};
pub use consumer::{CONSUMER_WINDOW, ChannelCredit, Consumer, Dispatch};
pub use entry::Entry;
use ready::Ready;
pub use replicated::{Replicated, Reply};
pub use schedule::{DELAY_HEADER, Delay, DueSink, MAX_DELAY_MS, delay_of};

use crate::message::Message;
use crate::store::{QueueLog, RecordMeta, StoreError, StoreRef};

/// What [`Queue::push`] did with a message.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pushed {
    /// Taken (false: refused by `x-overflow: reject-publish*`, or the
    /// store could not write it).
    pub accepted: bool,
    /// The store's sync ticket covering it (0: not persisted). A publisher
    /// confirm waits for it.
    pub ticket: u64,
}

/// Add `entry` to `queue`'s group, keeping the order entries came in, so
/// each queue is then called once for all of its entries.
pub fn group_by_queue(
    groups: &mut Vec<(Arc<Queue>, Vec<Entry>)>,
    queue: &Arc<Queue>,
    entry: Entry,
) {
    match groups.iter_mut().find(|(q, _)| Arc::ptr_eq(q, queue)) {
        Some((_, entries)) => entries.push(entry),
        None => groups.push((queue.clone(), vec![entry])),
    }
}

/// Why a message left a queue other than by delivery.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeathReason {
    /// Rejected or nacked with `requeue=false`.
    Rejected,
    /// Its TTL passed.
    Expired,
    /// Pushed out by a length limit.
    MaxLength,
    /// Returned more often than the queue's `x-delivery-limit`.
    DeliveryLimit,
}

impl DeathReason {
    /// RabbitMQ's name for it (the `reason` in `x-death`).
    pub fn as_str(&self) -> &'static str {
        match self {
            DeathReason::Rejected => "rejected",
            DeathReason::Expired => "expired",
            DeathReason::MaxLength => "maxlen",
            DeathReason::DeliveryLimit => "delivery_limit",
        }
    }
}

/// The group of `m` by its `header`: 0 without the header; a string's
/// hash otherwise (never 0). Two groups whose hashes collide are served as
/// one: their order holds, they only lose their parallelism.
pub fn group_hash(m: &Message, header: &str) -> Result<u32, String> {
    use amq_protocol::types::AMQPValue;
    use std::hash::{BuildHasher, Hasher};
    let Some(v) = m
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(header))
    else {
        return Ok(0);
    };
    let bytes: &[u8] = match v {
        AMQPValue::LongString(s) => s.as_bytes(),
        AMQPValue::ShortString(s) => s.as_str().as_bytes(),
        other => {
            return Err(format!(
                "its group header '{}' is not a string ({other:?})",
                crate::untrusted::text(header)
            ));
        }
    };
    // A fixed seed: the same group hashes alike in every queue and run.
    let mut h = foldhash::fast::FixedState::with_seed(0x5157_4d51).build_hasher();
    h.write(bytes);
    let g = h.finish();
    Ok(((g ^ (g >> 32)) as u32).max(1))
}

/// Where a queue sends messages it dead-letters. Set by the broker for
/// queues with `x-dead-letter-exchange`; called without the queue's lock.
pub type DeadLetterSink = Arc<dyn Fn(&Queue, Vec<(Entry, DeathReason)>) + Send + Sync>;

#[derive(Default)]
struct State {
    messages: Ready,
    consumers: Vec<Arc<Consumer>>,
    next: usize,
    /// Body bytes of ready messages, for `x-max-length-bytes`.
    body_bytes: usize,
    /// The arguments the queue acts on: its own, with what policies set
    /// laid over them. Kept under the lock every publish takes anyway, so
    /// that a policy can change them without the publish path paying for
    /// a second synchronisation.
    limits: Arc<QueueLimits>,
    /// The ids taken within the window (`x-message-deduplication`), under
    /// the lock a publish takes anyway, so that two publishes of one id at
    /// once cannot both be taken.
    dedup: Option<crate::dedup::Cache>,
    /// Messages not yet due (`schedule`).
    waiting: schedule::Waiting,
}

/// What a publish checks against, copied out of the limits under the lock.
#[derive(Clone, Copy)]
struct Bounds {
    max_length: Option<usize>,
    max_length_bytes: Option<usize>,
}

impl Bounds {
    fn of(l: &QueueLimits) -> Bounds {
        Bounds {
            max_length: l.max_length,
            max_length_bytes: l.max_length_bytes,
        }
    }
}

/// What a deduplicating queue made of a message's id.
enum Taken {
    /// It has none: never deduplicated.
    NoId,
    /// New: taken, remembered until the time given.
    New(crate::dedup::Key, u64),
    /// Taken within the window already.
    Duplicate,
}

/// Why a consumer could not be added.
#[derive(Debug, PartialEq, Eq)]
pub enum ConsumeError {
    /// Another consumer holds the queue exclusively, or one exists and this
    /// one asked for exclusivity.
    Exclusive,
}

/// A queue.
pub struct Queue {
    /// Name.
    pub name: String,
    /// Survives a restart.
    pub durable: bool,
    /// The connection that owns it, for exclusive queues.
    pub owner: Option<u64>,
    /// Deleted when its last consumer goes.
    pub auto_delete: bool,
    /// Declare arguments.
    pub arguments: FieldTable,
    /// The policy and operator policy that apply, and what they set.
    policy: arc_swap::ArcSwap<crate::policy::Applied>,
    /// A quorum queue's (`x-queue-type`, fixed when declared).
    pub quorum: bool,
    /// `x-single-active-consumer` (fixed when declared).
    single_active: bool,
    state: Mutex<State>,
    /// Messages ever enqueued.
    pub enqueued: AtomicU64,
    /// Messages ever delivered to consumers or `basic.get`.
    pub delivered: AtomicU64,
    /// Of those, deliveries marked redelivered.
    pub redelivered: AtomicU64,
    /// Deliveries acked by clients.
    pub acked: AtomicU64,
    /// Messages dead-lettered (expired, rejected, overflowed) to an exchange.
    pub dead_lettered: AtomicU64,
    /// Estimated bytes of ready (not yet delivered) messages.
    ready_bytes: AtomicUsize,
    /// Above this many ready bytes, publishers into the queue are held back.
    flow_high: usize,
    /// Notified when ready bytes fall to `flow_high / 2` or below.
    drained: tokio::sync::Notify,
    dead_letters: Option<DeadLetterSink>,
    /// Last use, for `x-expires`.
    used: Mutex<Instant>,
    /// The log persistent messages are written to (durable queues with a
    /// store).
    log: Option<Arc<QueueLog>>,
    /// Above this many ready bytes, persistent messages are kept on disk
    /// only (paged out) and read back when delivered.
    page_over: usize,
    /// A quorum queue's replicated log (set on the live queue its leader
    /// serves from): settlements and returns are proposed there.
    replica: Option<Arc<dyn Replicated>>,
    /// `x-message-group-header` (fixed when declared): the header naming a
    /// message's group.
    group_header: Option<String>,
    /// `x-message-deduplication` (fixed when declared).
    dedup: bool,
    /// Estimated bytes of waiting (not yet due) messages: they count
    /// towards paging, not towards flow control.
    waiting_bytes: AtomicUsize,
    /// Wakes the queue's timer (started with its first waiting message).
    timer: std::sync::OnceLock<Arc<tokio::sync::Notify>>,
    /// A delayed exchange's queue: where due messages go.
    due_sink: Option<DueSink>,
    /// A stream queue's log and consumers (`x-queue-type: stream`): then
    /// nothing else of the queue's state is used.
    stream: Option<Arc<crate::broker::stream::Stream>>,
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

type Dead = Vec<(Entry, DeathReason)>;

/// How a queue was declared.
#[derive(Clone, Debug, Default)]
pub struct QueueDecl {
    /// Name.
    pub name: String,
    /// Durable.
    pub durable: bool,
    /// The owning connection of an exclusive queue.
    pub owner: Option<u64>,
    /// Auto-delete.
    pub auto_delete: bool,
    /// Arguments.
    pub arguments: FieldTable,
}

impl Queue {
    pub(crate) fn new(
        decl: QueueDecl,
        limits: QueueLimits,
        flow_high: usize,
        dead_letters: Option<DeadLetterSink>,
        log: Option<Arc<QueueLog>>,
    ) -> Self {
        let dedup = limits.dedup.map(|s| {
            // A durable queue's ids come back from its ids file.
            let mut c = crate::dedup::Cache::new(s);
            if let Some(log) = &log {
                let now = now_ms();
                for (k, e) in log.recovered_ids() {
                    c.restore(k, e, now);
                }
            }
            c
        });
        Queue {
            log,
            page_over: flow_high / 4,
            name: decl.name,
            durable: decl.durable,
            owner: decl.owner,
            auto_delete: decl.auto_delete,
            arguments: decl.arguments,
            state: Mutex::new(State {
                messages: Ready::new(limits.max_priority, limits.group_header.is_some()),
                dedup,
                limits: Arc::new(limits.clone()),
                ..State::default()
            }),
            quorum: limits.quorum,
            single_active: limits.single_active,
            policy: Default::default(),
            enqueued: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            redelivered: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            dead_lettered: AtomicU64::new(0),
            ready_bytes: AtomicUsize::new(0),
            flow_high: flow_high.max(1),
            drained: tokio::sync::Notify::new(),
            dead_letters,
            used: Mutex::new(Instant::now()),
            replica: None,
            group_header: limits.group_header.clone(),
            dedup: limits.dedup.is_some(),
            waiting_bytes: AtomicUsize::new(0),
            timer: std::sync::OnceLock::new(),
            due_sink: None,
            stream: None,
        }
    }

    /// Made a stream queue over `stream`.
    pub(crate) fn with_stream(mut self, stream: crate::broker::stream::Stream) -> Self {
        self.stream = Some(Arc::new(stream));
        self
    }

    /// A stream queue's stream.
    pub fn stream(&self) -> Option<&Arc<crate::broker::stream::Stream>> {
        self.stream.as_ref()
    }

    /// Record a use (consume, cancel, get, redeclare) for `x-expires`.
    pub fn touch(&self) {
        *self.used.lock() = Instant::now();
    }

    /// How long the queue has gone unused; `None` while it has consumers.
    pub fn unused_for(&self) -> Option<Duration> {
        if self.consumer_count() > 0 {
            return None;
        }
        Some(self.used.lock().elapsed())
    }

    /// Count `e` into the ready totals (it joined the ready messages).
    fn count_ready(&self, st: &mut State, e: &Entry) {
        st.body_bytes += e.body_len as usize;
        self.ready_bytes.fetch_add(e.footprint(), Ordering::Relaxed);
    }

    /// Take `e` out of the ready totals (it left the ready messages).
    fn uncount_ready(&self, st: &mut State, e: &Entry) {
        st.body_bytes -= e.body_len as usize;
        self.release_bytes(e.footprint());
    }

    /// These entries left the queue for good (acked, delivered without
    /// ack, dead-lettered, expired, purged): record it in the log, so they
    /// do not come back at recovery.
    pub fn forget<'a>(&self, entries: impl IntoIterator<Item = &'a Entry>) {
        if self.stream.is_some() {
            return;
        }
        if self.group_header.is_some() {
            let entries: Vec<&Entry> = entries.into_iter().collect();
            self.release_groups(entries.iter().map(|e| e.group));
            return self.settle_in_log(entries);
        }
        self.settle_in_log(entries);
    }

    fn settle_in_log<'a>(&self, entries: impl IntoIterator<Item = &'a Entry>) {
        if let Some(log) = &self.log {
            log.ack(entries.into_iter().filter_map(|e| e.stored));
        } else if let Some(r) = &self.replica {
            let ids: Vec<u64> = entries.into_iter().map(|e| e.id).collect();
            if !ids.is_empty() {
                r.settled(ids);
            }
        }
    }

    fn release_bytes(&self, bytes: usize) {
        let before = self.ready_bytes.fetch_sub(bytes, Ordering::Relaxed);
        let low = self.flow_high / 2;
        if before > low && before - bytes <= low {
            self.drained.notify_waiters();
        }
    }

    /// Hand dead messages to the sink (none: they are dropped, as RabbitMQ
    /// drops dead letters of a queue without a dead-letter exchange).
    fn bury(&self, dead: Dead) {
        if dead.is_empty() {
            return;
        }
        let stored: Vec<StoreRef> = dead.iter().filter_map(|(e, _)| e.stored).collect();
        let replicated: Vec<u64> = match &self.replica {
            Some(_) => dead.iter().map(|(e, _)| e.id).collect(),
            None => Vec::new(),
        };
        // Every queue the broker makes has a sink: a dead-letter exchange
        // may come from a policy after the queue was declared.
        if let Some(sink) = &self.dead_letters
            && self.limits().dead_letter_exchange.is_some()
        {
            self.dead_lettered
                .fetch_add(dead.len() as u64, Ordering::Relaxed);
            sink(self, dead);
        }
        // After the sink: a dead letter is in its new queue's log before it
        // leaves this one's (at least once, never lost).
        if let (Some(log), false) = (&self.log, stored.is_empty()) {
            log.ack(stored);
        }
        if let (Some(r), false) = (&self.replica, replicated.is_empty()) {
            r.settled(replicated);
        }
    }

    /// Made with `applied` already laid over its arguments.
    pub(crate) fn with_policy(self, applied: crate::policy::Applied) -> Self {
        self.policy.store(Arc::new(applied));
        self
    }

    /// The arguments it acts on now (its own, with its policies'), as one
    /// snapshot.
    pub fn limits(&self) -> Arc<QueueLimits> {
        self.state.lock().limits.clone()
    }

    /// The policies that apply to it and what they set.
    pub fn policy(&self) -> Arc<crate::policy::Applied> {
        self.policy.load_full()
    }

    /// Policies changed: act on `limits` from now on. A lower length limit
    /// holds at once for what is waiting (its head is dropped or
    /// dead-lettered as a publish past it would drop it; RabbitMQ does the
    /// same); a lower TTL at the next expiry sweep.
    pub fn set_policy(self: &Arc<Self>, applied: crate::policy::Applied, limits: QueueLimits) {
        self.policy.store(Arc::new(applied));
        let bounds = Bounds::of(&limits);
        let mut dead = Vec::new();
        {
            let mut st = self.state.lock();
            st.limits = Arc::new(limits);
            while !st.messages.is_empty() && Self::over_limit(bounds, &st, 0, 0) {
                let e = st.messages.pop_oldest().expect("checked");
                self.uncount_ready(&mut st, &e);
                dead.push((e, DeathReason::MaxLength));
            }
        }
        self.bury(dead);
    }

    /// Whether the queue is exclusive to a connection.
    pub fn exclusive(&self) -> bool {
        self.owner.is_some()
    }

    /// Whether publishers into this queue should be held back.
    pub fn congested(&self) -> bool {
        self.ready_bytes.load(Ordering::Relaxed) > self.flow_high
    }

    /// Estimated bytes of ready messages.
    pub fn ready_bytes(&self) -> usize {
        self.ready_bytes.load(Ordering::Relaxed)
    }

    /// Wait until the queue has drained to half its flow watermark.
    pub async fn until_drained(&self) {
        loop {
            let notified = self.drained.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.ready_bytes.load(Ordering::Relaxed) <= self.flow_high / 2 {
                return;
            }
            notified.await;
        }
    }

    /// Move expired messages off the head (RabbitMQ expires at the head only).
    fn expire_head(&self, st: &mut State, dead: &mut Dead) {
        let mut now = None;
        while let Some(e) = st.messages.pop_expired(&mut now) {
            self.uncount_ready(st, &e);
            dead.push((e, DeathReason::Expired));
        }
    }

    fn over_limit(bounds: Bounds, st: &State, extra: usize, extra_bytes: usize) -> bool {
        bounds
            .max_length
            .is_some_and(|max| st.messages.len() + extra > max)
            || bounds
                .max_length_bytes
                .is_some_and(|max| st.body_bytes + extra_bytes > max)
    }

    /// The group of `m` in a queue with message groups (0: none, or no
    /// groups); `None` refuses it: its group header is not a string.
    #[inline]
    pub(crate) fn group_of(&self, m: &Message) -> Option<u32> {
        let Some(header) = &self.group_header else {
            return Some(0);
        };
        group_hash(m, header).map_err(|why| {
            tracing::debug!(queue = %crate::untrusted::text(&self.name), "message refused: {why}");
        }).ok()
    }

    /// Add a message and hand it to a consumer if one has credit. A
    /// persistent message in a queue with a log is written there first
    /// (and kept on disk only, when the queue holds many bytes already).
    pub fn push(self: &Arc<Self>, message: Arc<Message>) -> Pushed {
        if let Some(stream) = &self.stream {
            return match stream.append(&message) {
                Ok((_, ticket)) => {
                    self.enqueued.fetch_add(1, Ordering::Relaxed);
                    Pushed {
                        accepted: true,
                        ticket,
                    }
                }
                Err(StoreError::Deleted) => Pushed::default(),
                Err(e) => {
                    tracing::error!(queue = %crate::untrusted::text(&self.name), "appending to a stream failed; refused: {e}");
                    Pushed::default()
                }
            };
        }
        let own_ttl = message_ttl(&message).ok().flatten();
        let Some(group) = self.group_of(&message) else {
            return Pushed::default();
        };
        let mut ticket = 0;
        let mut taken_id = None;
        if self.dedup {
            match self.take_id(&message) {
                Err(()) => return Pushed::default(),
                Ok(Taken::Duplicate) => {
                    // Confirmed once what is already in the store is
                    // (the first copy among it).
                    return Pushed {
                        accepted: true,
                        ticket: self.log.as_ref().map_or(0, |l| l.issued()),
                    };
                }
                Ok(Taken::New(key, expires)) => {
                    if let Some(log) = &self.log {
                        ticket = log.remember(key, expires);
                    }
                    taken_id = Some(key);
                }
                Ok(Taken::NoId) => {}
            }
        }
        let mut entry = Entry::new(message);
        entry.group = group;
        if self.replica.is_some() {
            // A quorum queue's messages arrive through its log
            // (`push_replicated`); a direct push is a bug.
            debug_assert!(false, "push into a quorum queue's live queue");
            return Pushed::default();
        }
        // Paged out only once it is accepted: a message refused or
        // dead-lettered on its way in must still have its body.
        let mut page_out = false;
        // A single node's quorum queue keeps every message on disk, as a
        // quorum queue's log does whatever the delivery mode.
        if let Some(log) = &self.log
            && let Some(m) = entry
                .message
                .as_ref()
                .filter(|m| self.quorum || m.is_persistent())
        {
            let meta = RecordMeta {
                published_ms: now_ms(),
                ttl_ms: own_ttl.map(|d| d.as_millis() as u64),
                body_len: entry.body_len,
                priority: entry.priority,
            };
            match log.append(m, meta) {
                Ok((stored, t)) => {
                    entry.stored = Some(stored);
                    ticket = t;
                    page_out = self.ready_bytes() + self.waiting_bytes() > self.page_over;
                }
                Err(StoreError::Deleted) => {}
                Err(e) => {
                    tracing::error!(queue = %crate::untrusted::text(&self.name), "persisting a message failed; refused: {e}");
                    return Pushed::default();
                }
            }
        }
        let accepted = self.admit(entry, own_ttl, None, page_out);
        if !accepted && let Some(key) = taken_id {
            // Refused after all (a length limit): it may come again.
            if let Some(c) = self.state.lock().dedup.as_mut() {
                c.forget(key);
            }
        }
        Pushed { accepted, ticket }
    }

    /// Check `m`'s deduplication id against the window and take it if it
    /// is new. `Err` refuses the message (an id that is not a string, or
    /// is too long).
    fn take_id(&self, m: &Message) -> Result<Taken, ()> {
        let key = match crate::dedup::key_of(m) {
            Ok(Some(k)) => k,
            Ok(None) => return Ok(Taken::NoId),
            Err(why) => {
                tracing::debug!(queue = %crate::untrusted::text(&self.name), "message refused: {why}");
                return Err(());
            }
        };
        let now = now_ms();
        let mut st = self.state.lock();
        let Some(cache) = st.dedup.as_mut() else {
            return Ok(Taken::NoId);
        };
        Ok(match cache.admit(key, now, None) {
            Some(expires) => Taken::New(key, expires),
            None => Taken::Duplicate,
        })
    }

    fn sweep_ids(&self) {
        let live = {
            let mut st = self.state.lock();
            let Some(cache) = st.dedup.as_mut() else {
                return;
            };
            cache.evict(now_ms());
            match &self.log {
                Some(log) if log.id_records() > 2 * cache.len() as u64 + 10_000 => cache.entries(),
                _ => return,
            }
        };
        if let Some(log) = &self.log {
            log.rewrite_ids(&live);
        }
    }

    /// The ids the queue remembers (a deduplicating queue).
    pub fn dedup_ids(&self) -> Option<usize> {
        self.state
            .lock()
            .dedup
            .as_ref()
            .map(crate::dedup::Cache::len)
    }

    /// Take `entry` in, under the queue's limits: its TTL is the shorter of
    /// the queue's and its own (`own_ttl`), counted from `published_ms`
    /// (a replicated message) or from now.
    #[inline(always)]
    fn admit(
        self: &Arc<Self>,
        mut entry: Entry,
        own_ttl: Option<Duration>,
        published_ms: Option<u64>,
        page_out: bool,
    ) -> bool {
        let mut dead = Vec::new();
        let accepted = {
            let mut st = self.state.lock();
            let (bounds, overflow) = (Bounds::of(&st.limits), st.limits.overflow);
            let ttl = match (st.limits.message_ttl, own_ttl) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            entry.expires_at = ttl.map(|t| match published_ms {
                None => Instant::now() + t,
                Some(p) => {
                    let left = (p + t.as_millis() as u64).saturating_sub(now_ms());
                    Instant::now() + Duration::from_millis(left)
                }
            });
            if let Some(due) = self.due_of(&st, entry.message.as_deref(), published_ms)
                && self.holds(due)
            {
                // Not ready until due: no length limit or consumer yet.
                self.enqueued.fetch_add(1, Ordering::Relaxed);
                if page_out {
                    entry.message = None;
                }
                self.wait(&mut st, entry, due);
                return true;
            }
            self.expire_head(&mut st, &mut dead);
            let size = entry.body_len as usize;
            let mut accepted = true;
            if Self::over_limit(bounds, &st, 1, size) {
                match overflow {
                    Overflow::DropHead => {
                        while !st.messages.is_empty() && Self::over_limit(bounds, &st, 1, size) {
                            let e = st.messages.pop_oldest().expect("checked");
                            self.uncount_ready(&mut st, &e);
                            dead.push((e, DeathReason::MaxLength));
                        }
                    }
                    Overflow::RejectPublish => accepted = false,
                    Overflow::RejectPublishDlx => {
                        accepted = false;
                        // Its log record is settled below, as refused.
                        let mut copy = entry.clone();
                        copy.stored = None;
                        dead.push((copy, DeathReason::MaxLength));
                    }
                }
            }
            // A message that alone exceeds the limit, or has a TTL of 0 with
            // nobody to take it, goes no further.
            let zero_ttl = ttl == Some(Duration::ZERO) && st.consumers.is_empty();
            if accepted && (Self::over_limit(bounds, &st, 1, size) || zero_ttl) {
                let reason = if zero_ttl {
                    DeathReason::Expired
                } else {
                    DeathReason::MaxLength
                };
                dead.push((entry, reason));
            } else if accepted {
                self.enqueued.fetch_add(1, Ordering::Relaxed);
                if page_out {
                    entry.message = None;
                }
                self.count_ready(&mut st, &entry);
                st.messages.push_back(entry);
                self.dispatch_locked(&mut st, &mut dead);
            } else if let Some(r) = entry.stored {
                // Refused after it was written: settle it in the log.
                if let Some(log) = &self.log {
                    log.ack([r]);
                }
            } else if let Some(r) = &self.replica {
                r.settled(vec![entry.id]);
            }
            accepted
        };
        self.bury(dead);
        accepted
    }

    /// Put deliveries back at the head of the queue, in their original
    /// order, marked redelivered.
    pub fn requeue(self: &Arc<Self>, entries: impl DoubleEndedIterator<Item = Entry>) {
        self.return_front(entries, true);
    }

    /// Put back, at the head and in order, entries that were dispatched but
    /// never reached the client: unlike [`Queue::requeue`] they are not
    /// marked redelivered.
    pub fn put_back(self: &Arc<Self>, entries: impl DoubleEndedIterator<Item = Entry>) {
        self.return_front(entries, false);
    }

    fn return_front(self: &Arc<Self>, entries: impl DoubleEndedIterator<Item = Entry>, mark: bool) {
        if self.stream.is_some() {
            // A stream takes nothing back: its consumers read on.
            return;
        }
        let mut dead = Vec::new();
        if mark && let Some(r) = &self.replica {
            return self.return_replicated(r.clone(), entries.collect());
        }
        let (mut counted, mut over) = (Vec::new(), Vec::new());
        {
            let mut st = self.state.lock();
            // A quorum queue's leader cannot tell a client whether a
            // delivery that came back reached it: it is flagged.
            let flag = mark || self.replica.is_some();
            let limit = st.limits.delivery_limit;
            for mut e in entries.rev() {
                e.redelivered |= flag;
                st.messages.release(e.group);
                if mark {
                    // A delivery the client had: counted, and past the
                    // limit dead-lettered instead of queued again.
                    e.returns = e.returns.saturating_add(1);
                    if limit.is_some_and(|l| e.returns > l) {
                        over.push((e, DeathReason::DeliveryLimit));
                        continue;
                    }
                    if (limit.is_some() || self.quorum)
                        && let Some(r) = e.stored
                    {
                        counted.push(r);
                    }
                }
                self.count_ready(&mut st, &e);
                st.messages.push_front(e);
            }
            self.dispatch_locked(&mut st, &mut dead);
        }
        if let (Some(log), false) = (&self.log, counted.is_empty()) {
            log.returned(counted);
        }
        // Those over the limit leave in the order they were delivered.
        over.reverse();
        over.extend(dead);
        self.bury(over);
    }

    /// The groups of deliveries that were settled may deliver again (a
    /// queue with message groups; the caller dispatches).
    fn release_groups(&self, groups: impl Iterator<Item = u32>) {
        if self.group_header.is_none() {
            return;
        }
        let mut st = self.state.lock();
        for g in groups {
            st.messages.release(g);
        }
    }

    /// Dead-letter deliveries a client rejected without requeue.
    pub fn reject(&self, entries: Vec<Entry>) {
        if self.stream.is_some() {
            return;
        }
        self.release_groups(entries.iter().map(|e| e.group));
        self.bury(
            entries
                .into_iter()
                .map(|e| (e, DeathReason::Rejected))
                .collect(),
        );
    }

    /// Move waiting messages to consumers with credit.
    pub fn dispatch(self: &Arc<Self>) {
        if let Some(s) = &self.stream {
            return s.dispatch(self);
        }
        let mut dead = Vec::new();
        {
            let mut st = self.state.lock();
            self.dispatch_locked(&mut st, &mut dead);
        }
        self.bury(dead);
    }

    /// Expire messages at the head (the broker's periodic sweep); forget
    /// the deduplication ids past their window, and rewrite the ids on
    /// disk when most of them are gone.
    pub fn expire(self: &Arc<Self>) {
        if let Some(s) = &self.stream {
            let limits = self.limits();
            s.retain(limits.max_length_bytes, limits.max_age);
            return;
        }
        if self.dedup {
            self.sweep_ids();
        }
        self.arm_waiting();
        let mut dead = Vec::new();
        {
            let mut st = self.state.lock();
            if st.limits.message_ttl.is_none() && self.ready_bytes() == 0 {
                return;
            }
            self.expire_head(&mut st, &mut dead);
        }
        self.bury(dead);
    }

    fn dispatch_locked(self: &Arc<Self>, st: &mut State, dead: &mut Dead) {
        loop {
            self.expire_head(st, dead);
            if !st.messages.deliverable() || st.consumers.is_empty() {
                return;
            }
            if let Some(r) = &self.replica
                && !r.leads_surely()
            {
                r.confirm_then_dispatch(Arc::downgrade(self));
                return;
            }
            // With a single active consumer, only the oldest is served.
            let n = if self.single_active {
                1
            } else {
                st.consumers.len()
            };
            let Some(offset) = (0..n).find(|i| st.consumers[(st.next + i) % n].has_credit()) else {
                return;
            };
            let at = (st.next + offset) % n;
            st.next = (at + 1) % n;
            let consumer = st.consumers[at].clone();
            let entry = st.messages.pop_front().expect("checked non-empty");
            self.uncount_ready(st, &entry);
            consumer.take_credit();
            let dispatch = Dispatch::Deliver {
                queue: self.clone(),
                consumer: consumer.clone(),
                entry,
            };
            if let Err(tokio::sync::mpsc::error::SendError(Dispatch::Deliver {
                mut entry, ..
            })) = consumer.sink.send(dispatch)
            {
                // The connection is gone; its cleanup will remove the consumer.
                // A quorum queue flags what comes back (its order among
                // first deliveries holds only for messages never handed out).
                entry.redelivered |= self.replica.is_some();
                self.count_ready(st, &entry);
                st.messages.release(entry.group);
                st.messages.push_front(entry);
                st.consumers.remove(at);
                st.next = 0;
            } else {
                self.delivered.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Copies of up to `count` ready messages from the `skip`th on, in the
    /// order they would be delivered, leaving them where they are (a peek).
    pub fn peek(&self, skip: usize, count: usize) -> Vec<Entry> {
        if self.stream.is_some() {
            return Vec::new();
        }
        self.state.lock().messages.peek(skip, count)
    }

    /// The ready messages' count, and the bodies of those from `start` to
    /// `stop` as Redis's `LRANGE` counts them (at most `max`), left in the
    /// queue. A message taken meanwhile is left out.
    pub fn peek_range(&self, start: i64, stop: i64, max: usize) -> (usize, Vec<bytes::Bytes>) {
        let len = self.len();
        let Some((from, n)) = redis_range(len, start, stop) else {
            return (len, Vec::new());
        };
        let bodies = self
            .peek(from, n.min(max))
            .iter()
            .filter_map(|e| self.message(e).ok().map(|m| m.body.clone()))
            .collect();
        (len, bodies)
    }

    /// Take the oldest live message (`basic.get`).
    pub fn pop(&self) -> Option<Entry> {
        self.touch();
        if self.stream.is_some() {
            return None;
        }
        let mut dead = Vec::new();
        let e = {
            let mut st = self.state.lock();
            self.expire_head(&mut st, &mut dead);
            let e = st.messages.pop_front();
            if let Some(e) = &e {
                self.uncount_ready(&mut st, e);
                self.delivered.fetch_add(1, Ordering::Relaxed);
            }
            e
        };
        self.bury(dead);
        e
    }

    /// Add a consumer and start feeding it.
    pub fn add_consumer(self: &Arc<Self>, consumer: Arc<Consumer>) -> Result<(), ConsumeError> {
        self.touch();
        if let Some(s) = &self.stream {
            // A consumer without stream arguments reads from `next`.
            let wants = crate::broker::stream::StreamConsume::parse(&FieldTable::default())
                .expect("no arguments parse");
            return s
                .add(self, consumer, wants, None)
                .map_err(|_| ConsumeError::Exclusive);
        }
        let mut dead = Vec::new();
        {
            let mut st = self.state.lock();
            if st.consumers.iter().any(|c| c.exclusive)
                || (consumer.exclusive && !st.consumers.is_empty())
            {
                return Err(ConsumeError::Exclusive);
            }
            st.consumers.push(consumer);
            self.dispatch_locked(&mut st, &mut dead);
        }
        self.bury(dead);
        Ok(())
    }

    /// Remove a consumer; returns whether the queue now has none.
    pub fn remove_consumer(&self, connection: u64, channel: u16, tag: &str) -> bool {
        self.touch();
        if let Some(s) = &self.stream {
            return s.remove(connection, channel, tag);
        }
        let mut st = self.state.lock();
        st.consumers
            .retain(|c| !(c.connection == connection && c.channel == channel && c.tag == tag));
        st.next = 0;
        st.consumers.is_empty()
    }

    /// Remove every consumer and tell their connections (queue deleted).
    pub(crate) fn cancel_consumers(&self) {
        if let Some(s) = &self.stream {
            return s.cancel_all();
        }
        let consumers = std::mem::take(&mut self.state.lock().consumers);
        for c in consumers {
            let _ = c.sink.send(Dispatch::Cancel {
                connection: c.connection,
                channel: c.channel,
                tag: c.tag.clone(),
            });
        }
    }

    /// Messages waiting.
    pub fn len(&self) -> usize {
        if let Some(s) = &self.stream {
            return s.len() as usize;
        }
        self.state.lock().messages.len()
    }

    /// Whether no message is waiting.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Consumers attached.
    pub fn consumer_count(&self) -> usize {
        if let Some(s) = &self.stream {
            return s.consumers().len();
        }
        self.state.lock().consumers.len()
    }

    /// The consumers attached, in round-robin order.
    pub fn consumers(&self) -> Vec<Arc<Consumer>> {
        if let Some(s) = &self.stream {
            return s.consumers();
        }
        self.state.lock().consumers.clone()
    }

    /// Deliveries to consumers not acked yet.
    pub fn unacked(&self) -> u64 {
        if let Some(s) = &self.stream {
            return s
                .consumers()
                .iter()
                .map(|c| u64::from(c.unacked.load(Ordering::Relaxed)))
                .sum();
        }
        self.state
            .lock()
            .consumers
            .iter()
            .map(|c| u64::from(c.unacked.load(Ordering::Relaxed)))
            .sum()
    }

    /// Remove every waiting message; returns how many.
    pub fn purge(&self) -> usize {
        if self.stream.is_some() {
            // As RabbitMQ: a stream is not purged (retention removes its
            // old segments).
            return 0;
        }
        let mut st = self.state.lock();
        let mut messages = st.messages.take();
        st.body_bytes = 0;
        // Those waiting for their time go too, as SQS's purge takes them.
        let waiting = st.waiting.take();
        drop(st);
        let bytes: usize = messages.iter().map(Entry::footprint).sum();
        self.release_bytes(bytes);
        let waited: usize = waiting.iter().map(Entry::footprint).sum();
        self.waiting_bytes.fetch_sub(waited, Ordering::Relaxed);
        messages.extend(waiting);
        self.forget(&messages);
        messages.len()
    }
}

/// Where Redis's `LRANGE start stop` falls in a list of `len`: the first
/// index and how many (negative indexes count from the end), or `None`
/// for an empty range.
pub fn redis_range(len: usize, start: i64, stop: i64) -> Option<(usize, usize)> {
    let len = len as i64;
    let from = if start < 0 {
        (len + start).max(0)
    } else {
        start
    };
    let to = if stop < 0 {
        len + stop
    } else {
        stop.min(len - 1)
    };
    (from <= to && from < len).then(|| (from as usize, (to - from + 1) as usize))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decl() -> QueueDecl {
        QueueDecl {
            name: "q".into(),
            ..Default::default()
        }
    }

    fn queue(limits: QueueLimits, flow: usize) -> Arc<Queue> {
        Arc::new(Queue::new(decl(), limits, flow, None, None))
    }

    fn message(body: usize) -> Arc<Message> {
        Arc::new(Message::new("", "q", Default::default(), vec![0u8; body]))
    }

    #[test]
    fn ready_bytes_follow_push_pop_requeue_and_purge() {
        let q = queue(QueueLimits::default(), 5_000);
        for _ in 0..3 {
            q.push(message(1000));
        }
        assert!(!q.congested());
        q.push(message(1000));
        assert!(q.congested(), "4 x ~1.26 KB is over 5 KB");
        let e = q.pop().unwrap();
        assert!(!q.congested());
        q.requeue(std::iter::once(e));
        assert!(q.congested());
        assert!(q.pop().unwrap().redelivered);
        assert_eq!(q.purge(), 3);
        assert_eq!(q.ready_bytes(), 0);
    }

    #[tokio::test]
    async fn until_drained_waits_for_half_the_watermark() {
        let q = queue(QueueLimits::default(), 5_000);
        for _ in 0..5 {
            q.push(message(1000));
        }
        let waiter = {
            let q = q.clone();
            tokio::spawn(async move { q.until_drained().await })
        };
        for _ in 0..3 {
            q.pop();
        }
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "2 x ~1.26 KB is still above 2.5 KB");
        q.pop();
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
    }

    /// A queue whose dead letters (it has a dead-letter exchange) are
    /// collected.
    fn collecting(
        mut limits: QueueLimits,
    ) -> (Arc<Queue>, Arc<parking_lot::Mutex<Vec<DeathReason>>>) {
        limits.dead_letter_exchange = Some("dlx".into());
        let dead = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let sink: DeadLetterSink = {
            let dead = dead.clone();
            Arc::new(move |_q: &Queue, d: Vec<(Entry, DeathReason)>| {
                dead.lock().extend(d.into_iter().map(|(_, r)| r))
            })
        };
        let q = Arc::new(Queue::new(decl(), limits, 1 << 30, Some(sink), None));
        (q, dead)
    }

    #[test]
    fn max_length_drop_head_and_reject_publish() {
        let (q, dead) = collecting(QueueLimits {
            max_length: Some(2),
            ..Default::default()
        });
        for _ in 0..3 {
            assert!(q.push(message(10)).accepted);
        }
        assert_eq!(q.len(), 2);
        assert_eq!(*dead.lock(), vec![DeathReason::MaxLength]);

        let (q, dead) = collecting(QueueLimits {
            max_length: Some(1),
            overflow: Overflow::RejectPublish,
            ..Default::default()
        });
        assert!(q.push(message(10)).accepted);
        assert!(!q.push(message(10)).accepted);
        assert_eq!(q.len(), 1);
        assert!(
            dead.lock().is_empty(),
            "reject-publish does not dead-letter"
        );

        let (q, dead) = collecting(QueueLimits {
            max_length_bytes: Some(15),
            overflow: Overflow::RejectPublishDlx,
            ..Default::default()
        });
        assert!(q.push(message(10)).accepted);
        assert!(!q.push(message(10)).accepted);
        assert_eq!(*dead.lock(), vec![DeathReason::MaxLength]);
    }

    #[tokio::test(start_paused = true)]
    async fn ttl_expires_at_the_head() {
        let (q, dead) = collecting(QueueLimits {
            message_ttl: Some(Duration::from_millis(20)),
            ..Default::default()
        });
        q.push(message(1));
        tokio::time::advance(Duration::from_millis(10)).await;
        q.push(message(1));
        tokio::time::advance(Duration::from_millis(9)).await;
        q.expire();
        assert_eq!(q.len(), 2, "19 ms: nothing is due");
        tokio::time::advance(Duration::from_millis(1)).await;
        q.expire();
        assert_eq!(q.len(), 1, "20 ms: the first is due, the second is not");
        tokio::time::advance(Duration::from_millis(10)).await;
        q.expire();
        assert_eq!(q.len(), 0);
        assert_eq!(
            *dead.lock(),
            vec![DeathReason::Expired, DeathReason::Expired]
        );
        assert_eq!(q.ready_bytes(), 0);
    }

    fn expiring(ms: u64) -> Arc<Message> {
        let properties = amq_protocol::protocol::BasicProperties::default()
            .with_expiration(ms.to_string().into());
        Arc::new(Message::new("", "q", properties, vec![0u8; 1]))
    }

    #[tokio::test(start_paused = true)]
    async fn the_shorter_of_queue_and_message_ttl_wins_and_only_the_head_expires() {
        let (q, dead) = collecting(QueueLimits {
            message_ttl: Some(Duration::from_millis(100)),
            ..Default::default()
        });
        q.push(expiring(500)); // the queue's 100 ms wins
        q.push(expiring(10));
        tokio::time::advance(Duration::from_millis(50)).await;
        q.expire();
        assert_eq!(
            q.len(),
            2,
            "the second is past its 10 ms, but RabbitMQ expires at the head only"
        );
        tokio::time::advance(Duration::from_millis(50)).await;
        q.expire();
        assert_eq!(q.len(), 0, "the head's 100 ms passed, then the one behind");
        assert_eq!(dead.lock().len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn an_expired_head_is_never_delivered() {
        let q = queue(
            QueueLimits {
                message_ttl: Some(Duration::from_millis(100)),
                ..Default::default()
            },
            1 << 30,
        );
        q.push(message(1));
        tokio::time::advance(Duration::from_millis(60)).await;
        q.push(message(2));
        tokio::time::advance(Duration::from_millis(40)).await;
        let (c, mut rx) = consumer("c");
        q.add_consumer(c).unwrap();
        let got = delivered(&mut rx);
        assert_eq!(
            got.len(),
            1,
            "the first expired at 100 ms, the second is 40 ms old"
        );
        assert_eq!(got[0].body_len, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn unused_for_counts_from_the_last_use_and_stops_while_consumed() {
        let q = queue(QueueLimits::default(), 1 << 30);
        tokio::time::advance(Duration::from_millis(700)).await;
        assert_eq!(q.unused_for(), Some(Duration::from_millis(700)));
        q.touch();
        tokio::time::advance(Duration::from_millis(200)).await;
        assert_eq!(q.unused_for(), Some(Duration::from_millis(200)));
        let (c, _rx) = consumer("c");
        q.add_consumer(c).unwrap();
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(q.unused_for(), None, "a queue with a consumer is in use");
    }

    fn consumer(
        tag: &str,
    ) -> (
        Arc<Consumer>,
        tokio::sync::mpsc::UnboundedReceiver<Dispatch>,
    ) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let c = Arc::new(Consumer {
            tag: tag.into(),
            channel: 1,
            connection: 1,
            no_ack: false,
            exclusive: false,
            prefetch: 0,
            unacked: Default::default(),
            in_flight: Default::default(),
            channel_credit: Default::default(),
            sink: tx,
            timeout: None,
        });
        (c, rx)
    }

    fn delivered(rx: &mut tokio::sync::mpsc::UnboundedReceiver<Dispatch>) -> Vec<Entry> {
        let mut out = Vec::new();
        while let Ok(Dispatch::Deliver { entry, .. }) = rx.try_recv() {
            out.push(entry);
        }
        out
    }

    #[test]
    fn a_single_active_consumer_gets_everything_until_it_goes() {
        let q = queue(
            QueueLimits {
                single_active: true,
                ..Default::default()
            },
            1 << 30,
        );
        let (first, mut first_rx) = consumer("first");
        let (second, mut second_rx) = consumer("second");
        q.add_consumer(first).unwrap();
        q.add_consumer(second).unwrap();
        for _ in 0..3 {
            q.push(message(1));
        }
        assert_eq!(delivered(&mut first_rx).len(), 3);
        assert!(delivered(&mut second_rx).is_empty());
        q.remove_consumer(1, 1, "first");
        q.push(message(1));
        assert_eq!(delivered(&mut second_rx).len(), 1);
    }

    /// What a quorum queue's live queue tells its log.
    #[derive(Default)]
    struct Log {
        settled: parking_lot::Mutex<Vec<u64>>,
        counts: parking_lot::Mutex<std::collections::HashMap<u64, u32>>,
    }

    impl Replicated for Log {
        fn enqueue(&self, _: Arc<Message>, _: Option<Reply>) {}
        fn settled(&self, ids: Vec<u64>) {
            self.settled.lock().extend(ids);
        }
        fn returned(&self, ids: &[u64]) -> Vec<u32> {
            let mut c = self.counts.lock();
            ids.iter()
                .map(|id| {
                    let n = c.entry(*id).or_default();
                    *n += 1;
                    *n
                })
                .collect()
        }
    }

    #[test]
    fn a_classic_queue_counts_returns_and_dead_letters_past_the_delivery_limit() {
        let dead = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let sink: DeadLetterSink = {
            let dead = dead.clone();
            Arc::new(move |_q: &Queue, d: Vec<(Entry, DeathReason)>| {
                dead.lock()
                    .extend(d.into_iter().map(|(e, r)| (e.body_len, e.returns, r)))
            })
        };
        let limits = QueueLimits {
            delivery_limit: Some(1),
            dead_letter_exchange: Some("dlx".into()),
            ..Default::default()
        };
        let q = Arc::new(Queue::new(decl(), limits, 1 << 30, Some(sink), None));
        q.push(message(1));
        q.push(message(2));
        let (a, b) = (q.pop().unwrap(), q.pop().unwrap());
        q.requeue([a, b].into_iter());
        let a = q.pop().unwrap();
        assert_eq!(a.returns, 1);
        let m = q.message(&a).unwrap();
        let headers = m.properties.headers().clone().unwrap();
        assert_eq!(
            headers.inner().get("x-delivery-count"),
            Some(&amq_protocol::types::AMQPValue::LongLongInt(1))
        );
        // Put back undelivered (never reached a client): not counted.
        q.put_back(std::iter::once(a));
        let (a, b) = (q.pop().unwrap(), q.pop().unwrap());
        assert_eq!((a.returns, b.returns), (1, 1));
        q.requeue([a, b].into_iter());
        assert!(q.is_empty());
        assert_eq!(
            *dead.lock(),
            vec![
                (1, 2, DeathReason::DeliveryLimit),
                (2, 2, DeathReason::DeliveryLimit)
            ],
            "in delivery order"
        );
    }

    #[test]
    fn a_quorum_queue_counts_returns_and_dead_letters_past_the_delivery_limit() {
        let log = Arc::new(Log::default());
        let dead = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let sink: DeadLetterSink = {
            let dead = dead.clone();
            Arc::new(move |_q: &Queue, d: Vec<(Entry, DeathReason)>| {
                dead.lock().extend(d.into_iter().map(|(e, r)| (e.id, r)))
            })
        };
        let limits = QueueLimits {
            quorum: true,
            delivery_limit: Some(2),
            dead_letter_exchange: Some("dlx".into()),
            ..Default::default()
        };
        let q = Arc::new(
            Queue::new(decl(), limits, 1 << 30, Some(sink), None)
                .with_replica(log.clone() as Arc<dyn Replicated>),
        );
        assert!(q.push_replicated(7, message(1), now_ms(), false));
        let mut e = q.pop().unwrap();
        assert_eq!(e.id, 7);
        for count in 1..=2 {
            q.requeue(std::iter::once(e));
            e = q.pop().unwrap();
            assert!(e.redelivered);
            let headers = e.resident().unwrap().properties.headers().clone().unwrap();
            assert_eq!(
                headers.inner().get("x-delivery-count"),
                Some(&amq_protocol::types::AMQPValue::LongLongInt(count))
            );
        }
        q.requeue(std::iter::once(e));
        // The third return passed the limit of 2.
        assert!(q.is_empty());
        assert_eq!(*dead.lock(), vec![(7, DeathReason::DeliveryLimit)]);
        assert_eq!(
            *log.settled.lock(),
            vec![7],
            "dead-lettered: settled in the log"
        );
        // An acked one is settled too.
        assert!(q.push_replicated(8, message(1), now_ms(), false));
        let e = q.pop().unwrap();
        q.forget([&e]);
        assert_eq!(*log.settled.lock(), vec![7, 8]);
    }
}
