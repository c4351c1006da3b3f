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

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};

use amq_protocol::types::FieldTable;
use parking_lot::Mutex;
use tokio::sync::mpsc;

use crate::message::Message;

/// Deliveries a consumer's connection may hold unwritten.
pub const CONSUMER_WINDOW: u32 = 256;

/// A message in a queue.
#[derive(Clone, Debug)]
pub struct Entry {
    /// The message.
    pub message: Arc<Message>,
    /// Whether it was delivered before (requeued).
    pub redelivered: bool,
}

/// A channel's shared prefetch (`basic.qos` with `global`).
#[derive(Debug, Default)]
pub struct ChannelCredit {
    /// Limit, 0 for none.
    pub limit: AtomicU32,
    /// Unacked deliveries across the channel's consumers.
    pub unacked: AtomicU32,
}

/// What a queue sends a consumer's connection.
#[derive(Debug)]
pub enum Dispatch {
    /// Deliver `entry` to `consumer`.
    Deliver {
        /// From this queue.
        queue: Arc<Queue>,
        /// To this consumer.
        consumer: Arc<Consumer>,
        /// The message.
        entry: Entry,
    },
    /// The queue is gone: tell the client its consumer was cancelled.
    Cancel {
        /// Channel.
        channel: u16,
        /// Consumer tag.
        tag: String,
    },
}

/// One consumer of a queue.
#[derive(Debug)]
pub struct Consumer {
    /// Consumer tag.
    pub tag: String,
    /// Its channel.
    pub channel: u16,
    /// Its connection's id.
    pub connection: u64,
    /// Acks not expected.
    pub no_ack: bool,
    /// Whether it holds the queue exclusively.
    pub exclusive: bool,
    /// Per-consumer prefetch, 0 for none.
    pub prefetch: u32,
    /// Unacked deliveries of this consumer.
    pub unacked: AtomicU32,
    /// Deliveries handed to the connection but not yet written.
    pub in_flight: AtomicU32,
    /// The channel's shared prefetch.
    pub channel_credit: Arc<ChannelCredit>,
    /// Where deliveries go (the connection's task).
    pub sink: mpsc::UnboundedSender<Dispatch>,
}

impl Consumer {
    fn has_credit(&self) -> bool {
        if self.in_flight.load(Ordering::Relaxed) >= CONSUMER_WINDOW {
            return false;
        }
        if self.no_ack {
            return true;
        }
        let own = self.prefetch == 0 || self.unacked.load(Ordering::Relaxed) < self.prefetch;
        let limit = self.channel_credit.limit.load(Ordering::Relaxed);
        own && (limit == 0 || self.channel_credit.unacked.load(Ordering::Relaxed) < limit)
    }

    fn take_credit(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        if !self.no_ack {
            self.unacked.fetch_add(1, Ordering::Relaxed);
            self.channel_credit.unacked.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The delivery was written to the socket. Returns whether the window
    /// had been full (the caller should then dispatch the queue).
    pub fn written(&self) -> bool {
        self.in_flight.fetch_sub(1, Ordering::Relaxed) == CONSUMER_WINDOW
    }

    /// A delivery was acked, rejected or requeued.
    pub fn settled(&self) {
        if !self.no_ack {
            self.unacked.fetch_sub(1, Ordering::Relaxed);
            self.channel_credit.unacked.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

#[derive(Default)]
struct State {
    messages: VecDeque<Entry>,
    consumers: Vec<Arc<Consumer>>,
    next: usize,
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
    state: Mutex<State>,
    /// Messages ever enqueued.
    pub enqueued: AtomicU64,
    /// Messages ever delivered to consumers or `basic.get`.
    pub delivered: AtomicU64,
    /// Estimated bytes of ready (not yet delivered) messages.
    ready_bytes: AtomicUsize,
    /// Above this many ready bytes, publishers into the queue are held back.
    flow_high: usize,
    /// Notified when ready bytes fall to `flow_high / 2` or below.
    drained: tokio::sync::Notify,
}

/// What a ready message is taken to cost in memory: its body and key plus
/// the entry, the `Arc`'d message and its properties.
fn footprint(m: &Message) -> usize {
    m.body.len() + m.routing_key.len() + 256
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Queue {
    pub(crate) fn new(
        name: String,
        durable: bool,
        owner: Option<u64>,
        auto_delete: bool,
        arguments: FieldTable,
        flow_high: usize,
    ) -> Self {
        Queue {
            name,
            durable,
            owner,
            auto_delete,
            arguments,
            state: Mutex::new(State::default()),
            enqueued: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            ready_bytes: AtomicUsize::new(0),
            flow_high: flow_high.max(1),
            drained: tokio::sync::Notify::new(),
        }
    }

    fn hold(&self, m: &Message) {
        self.ready_bytes.fetch_add(footprint(m), Ordering::Relaxed);
    }

    fn release(&self, bytes: usize) {
        let before = self.ready_bytes.fetch_sub(bytes, Ordering::Relaxed);
        let low = self.flow_high / 2;
        if before > low && before - bytes <= low {
            self.drained.notify_waiters();
        }
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

    /// Whether the queue is exclusive to a connection.
    pub fn exclusive(&self) -> bool {
        self.owner.is_some()
    }

    /// Add a message and hand it to a consumer if one has credit.
    pub fn push(self: &Arc<Self>, message: Arc<Message>) {
        self.enqueued.fetch_add(1, Ordering::Relaxed);
        self.hold(&message);
        let mut st = self.state.lock();
        st.messages.push_back(Entry {
            message,
            redelivered: false,
        });
        self.dispatch_locked(&mut st);
    }

    /// Put deliveries back at the head of the queue, in their original
    /// order, marked redelivered.
    pub fn requeue(self: &Arc<Self>, entries: impl DoubleEndedIterator<Item = Entry>) {
        let mut st = self.state.lock();
        for mut e in entries.rev() {
            e.redelivered = true;
            self.hold(&e.message);
            st.messages.push_front(e);
        }
        self.dispatch_locked(&mut st);
    }

    /// Move waiting messages to consumers with credit.
    pub fn dispatch(self: &Arc<Self>) {
        let mut st = self.state.lock();
        self.dispatch_locked(&mut st);
    }

    fn dispatch_locked(self: &Arc<Self>, st: &mut State) {
        while !st.messages.is_empty() && !st.consumers.is_empty() {
            let n = st.consumers.len();
            let Some(offset) = (0..n).find(|i| st.consumers[(st.next + i) % n].has_credit()) else {
                return;
            };
            let at = (st.next + offset) % n;
            st.next = (at + 1) % n;
            let consumer = st.consumers[at].clone();
            let entry = st.messages.pop_front().expect("checked non-empty");
            self.release(footprint(&entry.message));
            consumer.take_credit();
            let dispatch = Dispatch::Deliver {
                queue: self.clone(),
                consumer: consumer.clone(),
                entry,
            };
            if let Err(mpsc::error::SendError(Dispatch::Deliver { entry, .. })) =
                consumer.sink.send(dispatch)
            {
                // The connection is gone; its cleanup will remove the consumer.
                self.hold(&entry.message);
                st.messages.push_front(entry);
                st.consumers.remove(at);
                st.next = 0;
            } else {
                self.delivered.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Take the oldest message (`basic.get`).
    pub fn pop(&self) -> Option<Entry> {
        let e = self.state.lock().messages.pop_front();
        if let Some(e) = &e {
            self.release(footprint(&e.message));
            self.delivered.fetch_add(1, Ordering::Relaxed);
        }
        e
    }

    /// Add a consumer and start feeding it.
    pub fn add_consumer(self: &Arc<Self>, consumer: Arc<Consumer>) -> Result<(), ConsumeError> {
        let mut st = self.state.lock();
        if st.consumers.iter().any(|c| c.exclusive)
            || (consumer.exclusive && !st.consumers.is_empty())
        {
            return Err(ConsumeError::Exclusive);
        }
        st.consumers.push(consumer);
        self.dispatch_locked(&mut st);
        Ok(())
    }

    /// Remove a consumer; returns whether the queue now has none.
    pub fn remove_consumer(&self, connection: u64, channel: u16, tag: &str) -> bool {
        let mut st = self.state.lock();
        st.consumers
            .retain(|c| !(c.connection == connection && c.channel == channel && c.tag == tag));
        st.next = 0;
        st.consumers.is_empty()
    }

    /// Remove every consumer and tell their connections (queue deleted).
    pub(crate) fn cancel_consumers(&self) {
        let consumers = std::mem::take(&mut self.state.lock().consumers);
        for c in consumers {
            let _ = c.sink.send(Dispatch::Cancel {
                channel: c.channel,
                tag: c.tag.clone(),
            });
        }
    }

    /// Messages waiting.
    pub fn len(&self) -> usize {
        self.state.lock().messages.len()
    }

    /// Whether no message is waiting.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Consumers attached.
    pub fn consumer_count(&self) -> usize {
        self.state.lock().consumers.len()
    }

    /// Remove every waiting message; returns how many.
    pub fn purge(&self) -> usize {
        let mut st = self.state.lock();
        let n = st.messages.len();
        let bytes: usize = st.messages.iter().map(|e| footprint(&e.message)).sum();
        st.messages.clear();
        drop(st);
        self.release(bytes);
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(body: usize) -> Arc<Message> {
        Arc::new(Message::new("", "q", Default::default(), vec![0u8; body]))
    }

    #[test]
    fn ready_bytes_follow_push_pop_requeue_and_purge() {
        let q = Arc::new(Queue::new(
            "q".into(),
            false,
            None,
            false,
            FieldTable::default(),
            5_000,
        ));
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
        let q = Arc::new(Queue::new(
            "q".into(),
            false,
            None,
            false,
            FieldTable::default(),
            5_000,
        ));
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
}
