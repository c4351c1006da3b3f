//! A queue's consumers and the credit that bounds what each is sent.
//!
//! A consumer may be sent a delivery only while it has credit on both
//! bounds the queue's module doc describes: its prefetch (and its
//! channel's shared one) and its window of deliveries handed to its
//! connection but not yet written. The counters are atomics because the
//! queue takes credit under its own lock while the connection's task
//! returns it (a write, an ack) without that lock.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use tokio::sync::mpsc;

use super::{Entry, Queue};

/// Deliveries a consumer's connection may hold unwritten.
pub const CONSUMER_WINDOW: u32 = 256;

/// A channel's shared prefetch (`basic.qos` with `global`).
#[derive(Debug, Default)]
pub struct ChannelCredit {
    /// Limit, 0 for none.
    pub limit: AtomicU32,
    /// Unacked deliveries across the channel's consumers.
    pub unacked: AtomicU32,
    /// The client asked the channel to stop sending content
    /// (`channel.flow` with `active = false`): its consumers get nothing.
    pub paused: AtomicBool,
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
        /// The consumer's connection.
        connection: u64,
        /// Channel.
        channel: u16,
        /// Consumer tag.
        tag: String,
    },
    /// Message traffic from another node for this connection: a forwarded
    /// publish's outcome, a delivery, a consumer refused or cancelled.
    Remote {
        /// The link it came on (settles go back on it).
        link: Arc<crate::cluster::link::Link>,
        /// What it says (boxed: a queue's deliveries share this enum,
        /// and should not be copied at this variant's size).
        traffic: Box<crate::nodes::traffic::Traffic>,
    },
    /// The link to this node closed: what went through it is lost.
    LinkLost {
        /// The node.
        node: String,
    },
    /// A quorum queue's enqueue was committed (or failed): a publisher
    /// confirm it waited for.
    Replicated {
        /// The publishing channel.
        channel: u16,
        /// Its confirm tag.
        seq: u64,
        /// Taken.
        ok: bool,
    },
    /// Time to try again to subscribe this connection's consumers of
    /// quorum queues that wait for their leader.
    Rehome,
    /// A quorum queue has a new leader (or is gone): consumers of it
    /// re-subscribe where it lives now.
    Moved {
        /// Its vhost.
        vhost: String,
        /// The queue.
        queue: String,
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
    /// How long its deliveries may stay unacknowledged before its channel
    /// is closed (the queue's `x-consumer-timeout`, else the broker's
    /// default, read when it subscribed; `None`: no limit, or enforced
    /// elsewhere: on the consuming node for a consumer from another node).
    pub timeout: Option<std::time::Duration>,
}

impl Consumer {
    pub(crate) fn has_credit(&self) -> bool {
        if self.in_flight.load(Ordering::Relaxed) >= CONSUMER_WINDOW
            || self.channel_credit.paused.load(Ordering::Relaxed)
        {
            return false;
        }
        if self.no_ack {
            return true;
        }
        let own = self.prefetch == 0 || self.unacked.load(Ordering::Relaxed) < self.prefetch;
        let limit = self.channel_credit.limit.load(Ordering::Relaxed);
        own && (limit == 0 || self.channel_credit.unacked.load(Ordering::Relaxed) < limit)
    }

    pub(crate) fn take_credit(&self) {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn consumer(no_ack: bool, prefetch: u32, channel: &Arc<ChannelCredit>) -> Consumer {
        Consumer {
            tag: "c".into(),
            channel: 1,
            connection: 1,
            no_ack,
            exclusive: false,
            prefetch,
            unacked: AtomicU32::new(0),
            in_flight: AtomicU32::new(0),
            channel_credit: channel.clone(),
            sink: mpsc::unbounded_channel().0,
            timeout: None,
        }
    }

    #[test]
    fn prefetch_bounds_unacked_deliveries_until_settled() {
        let channel = Arc::new(ChannelCredit::default());
        let c = consumer(false, 2, &channel);
        c.take_credit();
        c.take_credit();
        assert!(!c.has_credit(), "two unacked with prefetch 2");
        c.written();
        c.written();
        assert!(!c.has_credit(), "written is not acked");
        c.settled();
        assert!(c.has_credit());
        assert_eq!(channel.unacked.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn the_channel_limit_is_shared_by_its_consumers() {
        let channel = Arc::new(ChannelCredit::default());
        channel.limit.store(1, Ordering::Relaxed);
        let (a, b) = (consumer(false, 0, &channel), consumer(false, 0, &channel));
        a.take_credit();
        assert!(!b.has_credit(), "the channel's one unacked is a's");
        a.settled();
        assert!(b.has_credit());
    }

    #[test]
    fn the_window_bounds_even_no_ack_consumers() {
        let channel = Arc::new(ChannelCredit::default());
        let c = consumer(true, 0, &channel);
        for _ in 0..CONSUMER_WINDOW {
            assert!(c.has_credit());
            c.take_credit();
        }
        assert!(!c.has_credit(), "the window is full");
        assert!(c.written(), "the write that reopens a full window says so");
        assert!(c.has_credit());
        assert!(!c.written());
        assert_eq!(
            channel.unacked.load(Ordering::Relaxed),
            0,
            "no-ack takes no prefetch"
        );
    }

    #[test]
    fn channel_flow_pauses_every_consumer() {
        let channel = Arc::new(ChannelCredit::default());
        let c = consumer(true, 0, &channel);
        channel.paused.store(true, Ordering::Relaxed);
        assert!(!c.has_credit());
        channel.paused.store(false, Ordering::Relaxed);
        assert!(c.has_credit());
    }
}
