//! Stream queues (`x-queue-type: stream`), served through AMQP 0-9-1 as
//! RabbitMQ serves them: publishing appends to a replayable log
//! ([`crate::store::stream`]), consuming reads it without removing
//! anything, each consumer from its own offset.
//!
//! A stream is a [`Queue`] to the rest of the broker (routing, bindings,
//! confirms, the admin API), holding a [`Stream`] instead of a message
//! list. Each consumer is a cursor: a reader of the log, the consumer's
//! credit (prefetch and window, as for any queue; an ack only gives credit
//! back) and what it asked for at `basic.consume`:
//!
//! * `x-stream-offset`: `first`, `last`, `next` (the default), a numeric
//!   offset, a timestamp (seconds), or an interval (`"10m"`: that long ago);
//! * `x-stream-filter` and `x-stream-match-unfiltered`: only messages
//!   whose `x-stream-filter-value` is among the values (and those without
//!   one, if asked). RabbitMQ checks a Bloom filter per chunk and leaves
//!   the rest to the client; here the broker checks each message's value,
//!   so a consumer gets exactly the matching messages;
//! * `x-stream-consumer-name`: the broker remembers how far the named
//!   consumer got (every delivery before it acknowledged or rejected) and
//!   a consumer of the same name resumes there, across reconnects and
//!   restarts, whatever offset it asks for. Consumers of one name are a
//!   single-active group: one reads, the others wait and the next takes
//!   over where the last settled (a super stream's partitions are
//!   consumed this way). RabbitMQ offers both only through its stream
//!   protocol.
//!
//! Deliveries are made by whoever gives credit back (an ack, a socket
//! write) and by a task per stream woken when the group commit makes new
//! records readable.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use amq_protocol::types::{AMQPValue, FieldTable};
use bytes::Bytes;
use parking_lot::Mutex;

use super::queue::{Consumer, Dispatch, Entry, Queue, integer};
use crate::store::stream::{Reader, StreamLog, StreamStats};

/// RabbitMQ's name for the queue type, in its refusals.
const TYPE: &str = "rabbit_stream_queue";

/// Records a cursor may step over (filtered out) in one dispatch before it
/// lets others run; the stream's task carries on after.
const SKIP_BUDGET: usize = 4096;

/// The queue arguments RabbitMQ refuses on a stream.
const REFUSED: &[&str] = &[
    "x-max-length",
    "x-message-ttl",
    "x-expires",
    "x-dead-letter-exchange",
    "x-dead-letter-routing-key",
    "x-dead-letter-strategy",
    "x-max-priority",
    "x-overflow",
    "x-single-active-consumer",
    "x-delivery-limit",
    "x-queue-mode",
    "x-message-deduplication",
    "x-message-group-header",
    "x-delivery-delay",
    "x-quorum-initial-group-size",
];

/// A stream's declare arguments.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StreamArgs {
    /// `x-max-age`, in milliseconds.
    pub max_age_ms: Option<u64>,
    /// `x-stream-max-segment-size-bytes`.
    pub segment_bytes: u64,
}

impl StreamArgs {
    /// Read a stream's arguments; the error is RabbitMQ's text, without
    /// the queue's name (the caller adds it).
    pub fn parse(args: &FieldTable) -> Result<StreamArgs, String> {
        for key in REFUSED {
            if args.inner().contains_key(*key) {
                return Err(format!("invalid arg '{key}'"));
            }
        }
        let max_age_ms = match args.inner().get("x-max-age") {
            None => None,
            Some(v) => Some(
                text(v)
                    .and_then(parse_age)
                    .ok_or_else(|| format!("invalid arg 'x-max-age': {} (expected a number and one of Y, M, D, h, m, s, as in 7D)", show(v)))?,
            ),
        };
        let segment_bytes = match args.inner().get("x-stream-max-segment-size-bytes") {
            None => crate::store::stream::DEFAULT_SEGMENT_BYTES,
            Some(v) => match integer(v) {
                Some(n) if n > 0 => n as u64,
                _ => {
                    return Err(format!(
                        "invalid arg 'x-stream-max-segment-size-bytes': {} (expected a positive integer)",
                        show(v)
                    ));
                }
            },
        };
        Ok(StreamArgs {
            max_age_ms,
            segment_bytes,
        })
    }
}

/// RabbitMQ's refusal of `what` for a stream: `"{what} for queue 'q' in
/// vhost 'v' of queue type rabbit_stream_queue"`.
pub fn refusal(what: &str, queue: &str, vhost: &str) -> String {
    format!("{what} for queue '{queue}' in vhost '{vhost}' of queue type {TYPE}")
}

fn show(v: &AMQPValue) -> String {
    match text(v) {
        Some(s) => format!("'{}'", crate::untrusted::text(s)),
        None => format!("{v:?}"),
    }
}

fn text(v: &AMQPValue) -> Option<&str> {
    match v {
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok(),
        AMQPValue::ShortString(s) => Some(s.as_str()),
        _ => None,
    }
}

/// `7D`, `12h`, `30m`, `10s`, `1Y`, `2M` (RabbitMQ's `x-max-age` units:
/// years of 365 days, months of 30) in milliseconds.
pub fn parse_age(s: &str) -> Option<u64> {
    let unit = s.chars().last()?;
    let n: u64 = s[..s.len() - unit.len_utf8()].parse().ok()?;
    let secs: u64 = match unit {
        'Y' => 365 * 86_400,
        'M' => 30 * 86_400,
        'D' => 86_400,
        'h' => 3_600,
        'm' => 60,
        's' => 1,
        _ => return None,
    };
    n.checked_mul(secs)?.checked_mul(1000)
}

/// Where a consumer starts (`x-stream-offset`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartAt {
    /// The oldest message kept.
    First,
    /// The last message written (and what follows).
    Last,
    /// Only messages written from now on.
    Next,
    /// This offset (clamped to what is kept).
    Offset(u64),
    /// The first message written at or after this time (Unix ms).
    Time(u64),
}

/// What a consumer of a stream asked for at `basic.consume`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamConsume {
    /// Where it starts.
    pub start: StartAt,
    /// `x-stream-filter`: the filter values it wants.
    pub filter: Option<Vec<Bytes>>,
    /// `x-stream-match-unfiltered`: also messages without a filter value.
    pub match_unfiltered: bool,
    /// `x-stream-consumer-name`: its offset is remembered under this name.
    pub name: Option<String>,
    /// `x-wasmq-filter`: a filter plugin that decides, message by message,
    /// what this consumer gets (its other consume arguments are the
    /// plugin's, as a binding's are).
    pub plugin: Option<String>,
}

impl StreamConsume {
    /// Read the consume arguments; the error says which is wrong.
    pub fn parse(args: &FieldTable) -> Result<StreamConsume, String> {
        let start = match args.inner().get("x-stream-offset") {
            None => StartAt::Next,
            Some(AMQPValue::Timestamp(t)) => StartAt::Time(t.saturating_mul(1000)),
            Some(v) => match (text(v), integer(v)) {
                (Some("first"), _) => StartAt::First,
                (Some("last"), _) => StartAt::Last,
                (Some("next"), _) => StartAt::Next,
                (Some(s), _) => match parse_age(s) {
                    Some(ago) => StartAt::Time(crate::message::now_ms().saturating_sub(ago)),
                    None => {
                        return Err(format!(
                            "invalid arg 'x-stream-offset': {} (expected first, last, next, an offset, a timestamp or an interval such as 10m)",
                            show(v)
                        ));
                    }
                },
                (None, Some(n)) if n >= 0 => StartAt::Offset(n as u64),
                _ => {
                    return Err(format!(
                        "invalid arg 'x-stream-offset': {} (expected first, last, next, an offset, a timestamp or an interval such as 10m)",
                        show(v)
                    ));
                }
            },
        };
        let filter = match args.inner().get("x-stream-filter") {
            None => None,
            Some(AMQPValue::FieldArray(a)) => {
                let mut values = Vec::new();
                for v in a.as_slice() {
                    match text(v) {
                        Some(s) => values.push(Bytes::copy_from_slice(s.as_bytes())),
                        None => {
                            return Err(format!(
                                "invalid arg 'x-stream-filter': {} is not a string",
                                show(v)
                            ));
                        }
                    }
                }
                Some(values)
            }
            Some(v) => match text(v) {
                Some(s) => Some(vec![Bytes::copy_from_slice(s.as_bytes())]),
                None => {
                    return Err(format!(
                        "invalid arg 'x-stream-filter': {} (expected a string or an array of strings)",
                        show(v)
                    ));
                }
            },
        };
        let match_unfiltered = match args.inner().get("x-stream-match-unfiltered") {
            None => false,
            Some(AMQPValue::Boolean(b)) => *b,
            Some(v) => {
                return Err(format!(
                    "invalid arg 'x-stream-match-unfiltered': {} (expected a boolean)",
                    show(v)
                ));
            }
        };
        let name = match args.inner().get("x-stream-consumer-name") {
            None => None,
            Some(v) => match text(v) {
                Some(s) if !s.is_empty() && s.len() <= 255 => Some(s.to_owned()),
                _ => {
                    return Err(format!(
                        "invalid arg 'x-stream-consumer-name': {} (expected a string of 1 to 255 bytes)",
                        show(v)
                    ));
                }
            },
        };
        let plugin = match args.inner().get(super::ARG_FILTER) {
            None => None,
            Some(v) => match text(v) {
                Some(s) if !s.is_empty() => Some(s.to_owned()),
                _ => {
                    return Err(format!(
                        "invalid arg '{}': {} (expected a filter plugin's name)",
                        super::ARG_FILTER,
                        show(v)
                    ));
                }
            },
        };
        Ok(StreamConsume {
            start,
            filter,
            match_unfiltered,
            name,
            plugin,
        })
    }

    fn wants(&self, value: Option<&Bytes>) -> bool {
        match (&self.filter, value) {
            (None, _) => true,
            (Some(_), None) => self.match_unfiltered,
            (Some(values), Some(v)) => values.iter().any(|w| w == v),
        }
    }
}

/// The filter value a publisher gave a message (`x-stream-filter-value`).
pub fn filter_value(m: &crate::message::Message) -> Option<&[u8]> {
    let h = m.properties.headers().as_ref()?;
    match h.inner().get("x-stream-filter-value")? {
        AMQPValue::LongString(s) => Some(s.as_bytes()),
        AMQPValue::ShortString(s) => Some(s.as_str().as_bytes()),
        _ => None,
    }
}

/// One consumer reading a stream.
struct Cursor {
    consumer: Arc<Consumer>,
    reader: Reader,
    wants: StreamConsume,
    /// Its `x-wasmq-filter`, instantiated.
    plugin: Option<Arc<crate::plugin::FilterPlugin>>,
    /// A named consumer's deliveries not yet settled.
    outstanding: BTreeSet<u64>,
    /// Reading (false: waiting behind another consumer of its name).
    active: bool,
    /// Its last delivery.
    last_delivered: Option<u64>,
}

/// A consumer of a stream, as the admin API shows it.
#[derive(Clone, Debug)]
pub struct CursorView {
    /// Consumer tag.
    pub tag: String,
    /// Its connection.
    pub connection: u64,
    /// Its channel.
    pub channel: u16,
    /// The offset it reads next.
    pub offset: u64,
    /// Its name, if it has one.
    pub name: Option<String>,
    /// Reading, or waiting behind another consumer of its name.
    pub active: bool,
}

/// A stream queue's log and its consumers.
pub struct Stream {
    log: Arc<StreamLog>,
    /// A replicated stream's group: named consumers' offsets go there.
    replica: Option<Arc<dyn super::Replicated>>,
    cursors: Mutex<Vec<Cursor>>,
    /// Wakes the stream's task: a cursor stopped at its skip budget.
    kick: Arc<tokio::sync::Notify>,
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stream")
            .field("log", &self.log)
            .finish_non_exhaustive()
    }
}

impl Stream {
    /// A stream over `log`.
    pub fn new(log: Arc<StreamLog>) -> Stream {
        Stream {
            log,
            replica: None,
            cursors: Mutex::new(Vec::new()),
            kick: Arc::new(tokio::sync::Notify::new()),
        }
    }

    /// A replica of a replicated stream over its `log`, whose named
    /// consumers' offsets are kept by the stream's group.
    pub fn replicated(log: Arc<StreamLog>, replica: Arc<dyn super::Replicated>) -> Stream {
        Stream {
            replica: Some(replica),
            ..Stream::new(log)
        }
    }

    /// Start the task that delivers what the group commit makes readable
    /// (and what a cursor left at its skip budget). It ends with the queue.
    pub fn start(queue: &Arc<Queue>) {
        let Some(stream) = queue.stream() else {
            return;
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let commits = stream.log.commits.clone();
        let kick = stream.kick.clone();
        let weak: Weak<Queue> = Arc::downgrade(queue);
        rt.spawn(async move {
            loop {
                tokio::select! {
                    _ = commits.notified() => {}
                    _ = kick.notified() => {}
                }
                let Some(q) = weak.upgrade() else {
                    return;
                };
                if q.stream().is_some_and(|s| s.log.is_deleted()) {
                    return;
                }
                q.dispatch();
                drop(q);
                tokio::task::yield_now().await;
            }
        });
    }

    /// The log.
    pub fn log(&self) -> &Arc<StreamLog> {
        &self.log
    }

    /// Offsets, segments and bytes.
    pub fn stats(&self) -> StreamStats {
        self.log.stats()
    }

    /// Append a published message; its offset and the confirm's ticket.
    pub fn append(
        &self,
        m: &crate::message::Message,
    ) -> Result<(u64, u64), crate::store::StoreError> {
        self.log.append(m, filter_value(m))
    }

    /// Where a consumer asking for `wants` starts.
    fn start_offset(&self, wants: &StreamConsume) -> Result<u64, crate::store::StoreError> {
        if let Some(stored) = wants
            .name
            .as_deref()
            .and_then(|n| self.log.stored_offset(n))
        {
            return Ok(stored + 1);
        }
        let committed = self.log.committed();
        Ok(match wants.start {
            StartAt::First => self.log.first(),
            StartAt::Last => committed.saturating_sub(1).max(self.log.first()),
            StartAt::Next => committed,
            StartAt::Offset(n) => n,
            StartAt::Time(ms) => self.log.offset_at_time(ms)?,
        })
    }

    /// Add a consumer reading from where `wants` says; one named like a
    /// consumer reading already waits until that one goes. The error is a
    /// read failure's text.
    pub fn add(
        &self,
        queue: &Arc<Queue>,
        consumer: Arc<Consumer>,
        wants: StreamConsume,
        plugin: Option<Arc<crate::plugin::FilterPlugin>>,
    ) -> Result<(), String> {
        let offset = self.start_offset(&wants).map_err(|e| e.to_string())?;
        let reader = self.log.reader_at(offset).map_err(|e| e.to_string())?;
        {
            let mut cursors = self.cursors.lock();
            let active = wants.name.as_ref().is_none_or(|name| {
                !cursors
                    .iter()
                    .any(|c| c.active && c.wants.name.as_ref() == Some(name))
            });
            cursors.push(Cursor {
                consumer,
                reader,
                wants,
                plugin,
                outstanding: BTreeSet::new(),
                last_delivered: None,
                active,
            });
        }
        self.dispatch(queue);
        Ok(())
    }

    /// Remove a consumer; returns whether none is left. When it was the
    /// active one of its name, the next of that name takes over right
    /// after what the group settled.
    pub fn remove(&self, connection: u64, channel: u16, tag: &str) -> bool {
        let mut cursors = self.cursors.lock();
        let Some(at) = cursors.iter().position(|c| {
            c.consumer.connection == connection
                && c.consumer.channel == channel
                && c.consumer.tag == tag
        }) else {
            return cursors.is_empty();
        };
        let gone = cursors.remove(at);
        if let (true, Some(name)) = (gone.active, &gone.wants.name)
            && let Some(next) = cursors
                .iter_mut()
                .find(|c| !c.active && c.wants.name.as_ref() == Some(name))
        {
            let from = self
                .log
                .stored_offset(name)
                .map_or(next.reader.offset(), |o| o + 1);
            match self.log.reader_at(from) {
                Ok(r) => {
                    next.reader = r;
                    next.active = true;
                    self.kick.notify_one();
                }
                Err(e) => {
                    tracing::error!(consumer = %crate::untrusted::text(&next.consumer.tag), "a waiting stream consumer could not take over: {e}");
                }
            }
        }
        cursors.is_empty()
    }

    /// Every consumer.
    pub fn consumers(&self) -> Vec<Arc<Consumer>> {
        self.cursors
            .lock()
            .iter()
            .map(|c| c.consumer.clone())
            .collect()
    }

    /// Every consumer with its position.
    pub fn cursors(&self) -> Vec<CursorView> {
        self.cursors
            .lock()
            .iter()
            .map(|c| CursorView {
                tag: c.consumer.tag.clone(),
                connection: c.consumer.connection,
                channel: c.consumer.channel,
                offset: c.reader.offset(),
                name: c.wants.name.clone(),
                active: c.active,
            })
            .collect()
    }

    /// Remove every consumer and tell their connections (stream deleted).
    pub fn cancel_all(&self) {
        let cursors = std::mem::take(&mut *self.cursors.lock());
        for c in cursors {
            let _ = c.consumer.sink.send(Dispatch::Cancel {
                connection: c.consumer.connection,
                channel: c.consumer.channel,
                tag: c.consumer.tag.clone(),
            });
        }
        self.kick.notify_one();
    }

    /// Deliveries at `offsets` to `consumer` were settled (acked, or
    /// rejected: a stream redelivers nothing): a named consumer's stored
    /// offset moves up to just before its oldest unsettled delivery.
    pub fn settled(&self, consumer: &Arc<Consumer>, offsets: &[u64]) {
        let mut cursors = self.cursors.lock();
        let Some(c) = cursors
            .iter_mut()
            .find(|c| Arc::ptr_eq(&c.consumer, consumer))
        else {
            return;
        };
        let Some(name) = &c.wants.name else {
            return;
        };
        for o in offsets {
            c.outstanding.remove(o);
        }
        let done = match c.outstanding.first() {
            Some(&oldest) => oldest.checked_sub(1),
            None => c.last_delivered,
        };
        let Some(done) = done else { return };
        match &self.replica {
            Some(r) => {
                // Here at once (a consumer of the name taking over on this
                // node resumes from it), and for every replica through the
                // log.
                crate::cluster::quorum::stream::store_offset(&self.log, name, done);
                r.stream_offset(name, done);
            }
            None => self.log.store_offset(name, done),
        }
    }

    /// Hand consumers with credit what they have not read yet.
    pub fn dispatch(&self, queue: &Arc<Queue>) {
        let mut cursors = self.cursors.lock();
        let mut i = 0;
        let mut more = false;
        while i < cursors.len() {
            let c = &mut cursors[i];
            let mut gone = false;
            let mut skipped = 0;
            while c.active && c.consumer.has_credit() {
                if c.wants.filter.is_some() {
                    match c.reader.peek_filter() {
                        Ok(Some((_, value))) if !c.wants.wants(value.as_ref()) => {
                            if let Err(e) = c.reader.pass() {
                                gone = failed(queue, &c.consumer, e);
                                break;
                            }
                            skipped += 1;
                            if skipped >= SKIP_BUDGET {
                                more = true;
                                break;
                            }
                            continue;
                        }
                        Ok(Some(_)) => {}
                        Ok(None) => break,
                        Err(e) => {
                            gone = failed(queue, &c.consumer, e);
                            break;
                        }
                    }
                }
                let record = match c.reader.next_record() {
                    Ok(Some(r)) => r,
                    Ok(None) => break,
                    Err(e) => {
                        gone = failed(queue, &c.consumer, e);
                        break;
                    }
                };
                let mut message = Arc::new(record.message);
                if let Some(plugin) = &c.plugin {
                    match plugin.filter(&message) {
                        Ok(true) => {}
                        Ok(false) => {
                            skipped += 1;
                            if skipped >= SKIP_BUDGET {
                                more = true;
                                break;
                            }
                            continue;
                        }
                        Err(fault) => {
                            // Never dropped unseen: delivered, marked, for
                            // the consumer to decide.
                            tracing::warn!(queue = %crate::untrusted::text(&queue.name), plugin = %plugin.version().name, offset = record.offset, "a stream consumer's filter faulted; the message is delivered marked: {fault}");
                            message = Arc::new(with_fault(&message, &fault.to_string()));
                        }
                    }
                }
                let mut entry = Entry::new(message);
                entry.id = record.offset;
                c.consumer.take_credit();
                let sent = c.consumer.sink.send(Dispatch::Deliver {
                    queue: queue.clone(),
                    consumer: c.consumer.clone(),
                    entry,
                });
                if sent.is_err() {
                    // The connection is gone; its cleanup removes the
                    // consumer, which holds nothing.
                    gone = true;
                    break;
                }
                queue.delivered.fetch_add(1, Ordering::Relaxed);
                c.last_delivered = Some(record.offset);
                if c.wants.name.is_some() {
                    c.outstanding.insert(record.offset);
                }
            }
            if gone {
                cursors.remove(i);
            } else {
                i += 1;
            }
        }
        drop(cursors);
        if more {
            self.kick.notify_one();
        }
    }

    /// Apply retention: remove whole segments past `x-max-length-bytes`
    /// or `x-max-age` (each its own, or a policy's).
    pub fn retain(&self, max_bytes: Option<usize>, max_age: Option<std::time::Duration>) -> usize {
        self.log.retain(
            max_bytes.map(|b| b as u64),
            max_age.map(|a| a.as_millis() as u64),
            crate::message::now_ms(),
        )
    }

    /// Messages kept.
    pub fn len(&self) -> u64 {
        let s = self.log.stats();
        s.committed - s.first
    }

    /// Whether it keeps none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Delete the files.
    pub fn destroy(&self) {
        self.log.destroy();
        self.kick.notify_one();
    }
}

/// The exchange type that partitions a stream (`plugins/super-stream`).
pub const SUPER_STREAM: &str = "super-stream";

/// The argument of a `super-stream` exchange that makes the broker
/// declare its partitions with it.
pub const PARTITIONS_ARG: &str = "x-super-stream-partitions";

/// The stream arguments a super stream passes on to its partitions.
const PARTITION_ARGS: &[&str] = &[
    "x-max-length-bytes",
    "x-max-age",
    "x-stream-max-segment-size-bytes",
];

/// How many partitions `spec` asks the broker to declare (a
/// `super-stream` exchange with `x-super-stream-partitions`); the error
/// says what is wrong.
pub fn partitions_of(spec: &super::ExchangeSpec) -> Result<Option<u32>, String> {
    let Some(v) = spec.arguments.inner().get(PARTITIONS_ARG) else {
        return Ok(None);
    };
    if spec.kind != SUPER_STREAM {
        return Err(format!(
            "invalid arg '{PARTITIONS_ARG}': only a '{SUPER_STREAM}' exchange takes it"
        ));
    }
    if !spec.durable {
        return Err(format!(
            "invalid arg '{PARTITIONS_ARG}': a super stream is durable (its partitions are streams)"
        ));
    }
    match integer(v) {
        Some(n @ 1..=1000) => Ok(Some(n as u32)),
        _ => Err(format!(
            "invalid arg '{PARTITIONS_ARG}': {} (expected 1 to 1000)",
            show(v)
        )),
    }
}

/// A super stream's partition `i`: its name, its declare arguments (a
/// stream with the exchange's `arguments` for retention) and its binding's
/// arguments (`x-stream-partition-order`); its binding key is `i`.
pub fn partition(
    exchange: &str,
    arguments: &FieldTable,
    i: u32,
) -> (String, FieldTable, FieldTable) {
    let mut declare = FieldTable::default();
    declare.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("stream".into()),
    );
    for key in PARTITION_ARGS {
        if let Some(v) = arguments.inner().get(*key) {
            declare.insert((*key).into(), v.clone());
        }
    }
    let mut order = FieldTable::default();
    order.insert(
        "x-stream-partition-order".into(),
        AMQPValue::LongLongInt(i64::from(i)),
    );
    (format!("{exchange}-{i}"), declare, order)
}

impl super::Broker {
    /// Declare a super stream's `n` partitions (`{exchange}-0` ...), each
    /// a stream with the exchange's retention arguments, bound with its
    /// number as the key and `x-stream-partition-order`. Idempotent: a
    /// partition that exists is kept as it is. (A cluster declares them
    /// with the exchange through its log: `cluster::machine`'s follow-ups.)
    pub(super) fn declare_partitions(
        &self,
        vhost: &super::VHost,
        x: &super::Exchange,
        n: u32,
    ) -> Result<(), super::BrokerError> {
        for i in 0..n {
            let (name, arguments, order) = partition(&x.name, &x.arguments, i);
            self.declare_queue(
                vhost,
                super::QueueDecl {
                    name: name.clone(),
                    durable: true,
                    owner: None,
                    auto_delete: false,
                    arguments,
                },
            )?;
            self.bind(
                vhost,
                &x.name,
                super::exchange::Destination::Queue(name),
                &i.to_string(),
                order,
            )?;
        }
        Ok(())
    }
}

/// The header a delivery carries when its consumer's filter plugin
/// faulted on it.
pub const FAULT_HEADER: &str = "x-wasmq-filter-fault";

fn with_fault(m: &crate::message::Message, why: &str) -> crate::message::Message {
    m.with_header(
        FAULT_HEADER,
        AMQPValue::LongString(amq_protocol::types::LongString::from(why)),
    )
}

impl super::Broker {
    /// The filter plugin `name` for a consumer of the stream `queue`, with
    /// the consumer's arguments as its own (406 when there is no such
    /// filter).
    pub fn stream_filter(
        &self,
        queue: &str,
        name: &str,
        arguments: &FieldTable,
    ) -> Result<Arc<crate::plugin::FilterPlugin>, super::BrokerError> {
        let v = self.registry.get(name).ok_or_else(|| {
            super::BrokerError::PreconditionFailed(format!(
                "unknown filter plugin '{name}' in {} (plugin folder: {})",
                super::ARG_FILTER,
                self.plugin_dir.display()
            ))
        })?;
        let encoded = crate::message::encode_table_body(arguments);
        Ok(Arc::new(crate::plugin::FilterPlugin::new(
            &self.host, &v, queue, "", &encoded,
        )?))
    }
}

/// A cursor could not read its stream: the consumer is cancelled (the
/// client is told), the stream and its other consumers go on.
fn failed(queue: &Queue, consumer: &Consumer, e: crate::store::StoreError) -> bool {
    tracing::error!(queue = %crate::untrusted::text(&queue.name), consumer = %crate::untrusted::text(&consumer.tag), "reading the stream failed; its consumer is cancelled: {e}");
    let _ = consumer.sink.send(Dispatch::Cancel {
        connection: consumer.connection,
        channel: consumer.channel,
        tag: consumer.tag.clone(),
    });
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_read_as_rabbitmq_writes_them() {
        assert_eq!(parse_age("7D"), Some(7 * 86_400_000));
        assert_eq!(parse_age("12h"), Some(12 * 3_600_000));
        assert_eq!(parse_age("30m"), Some(1_800_000));
        assert_eq!(parse_age("10s"), Some(10_000));
        assert_eq!(parse_age("1Y"), Some(365 * 86_400_000));
        for bad in ["", "D", "7", "7d", "-1D", "1.5h", "99999999999999999999Y"] {
            assert_eq!(parse_age(bad), None, "{bad}");
        }
    }

    fn table(pairs: &[(&str, AMQPValue)]) -> FieldTable {
        let mut t = FieldTable::default();
        for (k, v) in pairs {
            t.insert((*k).into(), v.clone());
        }
        t
    }

    #[test]
    fn offsets_are_read_in_every_form_rabbitmq_accepts() {
        let s = |v: &str| AMQPValue::LongString(v.into());
        let parse = |v: AMQPValue| StreamConsume::parse(&table(&[("x-stream-offset", v)]));
        assert_eq!(parse(s("first")).unwrap().start, StartAt::First);
        assert_eq!(parse(s("last")).unwrap().start, StartAt::Last);
        assert_eq!(parse(s("next")).unwrap().start, StartAt::Next);
        assert_eq!(
            parse(AMQPValue::LongLongInt(42)).unwrap().start,
            StartAt::Offset(42)
        );
        assert_eq!(
            parse(AMQPValue::Timestamp(1_700_000_000)).unwrap().start,
            StartAt::Time(1_700_000_000_000)
        );
        assert!(matches!(parse(s("10m")).unwrap().start, StartAt::Time(_)));
        for bad in [
            s("beginning"),
            AMQPValue::LongLongInt(-1),
            AMQPValue::Boolean(true),
        ] {
            let e = parse(bad).unwrap_err();
            assert!(e.contains("x-stream-offset"), "{e}");
        }
        assert_eq!(
            StreamConsume::parse(&FieldTable::default()).unwrap().start,
            StartAt::Next
        );
    }

    #[test]
    fn filters_match_exactly() {
        let c = StreamConsume::parse(&table(&[(
            "x-stream-filter",
            AMQPValue::LongString("eu".into()),
        )]))
        .unwrap();
        assert!(c.wants(Some(&Bytes::from_static(b"eu"))));
        assert!(!c.wants(Some(&Bytes::from_static(b"us"))));
        assert!(!c.wants(None), "unfiltered messages only when asked");
        let c = StreamConsume::parse(&table(&[
            (
                "x-stream-filter",
                AMQPValue::FieldArray(vec![AMQPValue::LongString("eu".into())].into()),
            ),
            ("x-stream-match-unfiltered", AMQPValue::Boolean(true)),
        ]))
        .unwrap();
        assert!(c.wants(None));
    }

    #[test]
    fn arguments_rabbitmq_refuses_on_streams_are_refused() {
        let e = StreamArgs::parse(&table(&[("x-max-length", AMQPValue::LongInt(1))])).unwrap_err();
        assert_eq!(e, "invalid arg 'x-max-length'");
        let e = StreamArgs::parse(&table(&[(
            "x-max-age",
            AMQPValue::LongString("7 days".into()),
        )]))
        .unwrap_err();
        assert!(e.contains("x-max-age"), "{e}");
        let a = StreamArgs::parse(&table(&[
            ("x-max-age", AMQPValue::LongString("7D".into())),
            (
                "x-stream-max-segment-size-bytes",
                AMQPValue::LongInt(1_000_000),
            ),
        ]))
        .unwrap();
        assert_eq!(a.max_age_ms, Some(7 * 86_400_000));
        assert_eq!(a.segment_bytes, 1_000_000);
    }
}
