//! A quorum queue's live queue: the queue its leader serves from, fed by
//! the replicated log instead of by publishes.
//!
//! The queue code is the classic one; what differs is where its changes
//! go. A message enters through [`Queue::push_replicated`] once its log
//! entry is committed, and settlements and returns are reported to the
//! [`Replicated`] log instead of the queue's own disk log, so every
//! replica's state machine agrees on which messages are still in the
//! queue and how often each was returned (`x-delivery-limit`).

use std::sync::Arc;

use super::{DeathReason, Entry, Queue, message_ttl};
use crate::message::Message;

/// What a quorum queue's live queue (on its leader) reports to its
/// replicated log. Implemented by the queue's Raft replica; the queue
/// itself knows nothing of Raft.
pub trait Replicated: Send + Sync {
    /// Propose `message` for the queue; `reply(taken)` once it is
    /// committed and in the queue, or refused, or failed.
    fn enqueue(&self, message: Arc<Message>, reply: Option<Reply>);
    /// These messages left the queue for good (acked, dead-lettered,
    /// expired, dropped, purged).
    fn settled(&self, ids: Vec<u64>);
    /// These messages were returned (nack/reject with requeue, a consumer
    /// gone): each one's new delivery count, in the same order.
    fn returned(&self, ids: &[u64]) -> Vec<u32>;
    /// Whether this leader may hand messages out now: no other leader can
    /// have been elected since a majority last acknowledged it. A leader
    /// paused (or cut off) while another took over would otherwise deliver
    /// what it held, unflagged, after the new leader delivered later
    /// messages.
    fn leads_surely(&self) -> bool {
        true
    }
    /// Confirm the leadership with a majority, then dispatch `queue` again.
    fn confirm_then_dispatch(&self, _queue: std::sync::Weak<Queue>) {}
    /// A replicated stream's named consumer `name` acknowledged everything
    /// up to `offset`: kept in the log, for every replica.
    fn stream_offset(&self, _name: &str, _offset: u64) {}
}

/// Told whether a replicated enqueue was taken.
pub type Reply = Box<dyn FnOnce(bool) + Send>;

impl Queue {
    /// This queue as the live queue of a quorum queue's leader.
    pub(crate) fn with_replica(mut self, replica: Arc<dyn Replicated>) -> Self {
        self.replica = Some(replica);
        // Its replicated log deduplicates, the same on every replica (see
        // `cluster::quorum::machine`); what reaches it is new.
        self.dedup = false;
        self.state.get_mut().dedup = None;
        self
    }

    /// The quorum queue's replicated log, if this is one.
    pub fn replica(&self) -> Option<&Arc<dyn Replicated>> {
        self.replica.as_ref()
    }

    /// Add a message a quorum queue's log committed (its id is the log
    /// index), as [`Queue::push`] adds a published one: limits, TTL from
    /// when it was published, and a consumer if one has credit. Returns
    /// whether it was taken (a refused one is settled in the log).
    pub fn push_replicated(
        self: &Arc<Self>,
        id: u64,
        message: Arc<Message>,
        published_ms: u64,
        redelivered: bool,
    ) -> bool {
        let own_ttl = message_ttl(&message).ok().flatten();
        // A message the queue refuses (a group header that is not a
        // string) is settled in the log as refused.
        let Some(group) = self.group_of(&message) else {
            self.forget([&Entry {
                id,
                ..Entry::new(message)
            }]);
            return false;
        };
        let mut entry = Entry::new(message);
        entry.id = id;
        entry.group = group;
        entry.redelivered = redelivered;
        self.admit(entry, own_ttl, Some(published_ms), false)
    }

    /// A quorum queue's returns: counted in its log; a message returned
    /// more often than `x-delivery-limit` is dead-lettered, the others go
    /// back with their `x-delivery-count` header.
    pub(super) fn return_replicated(self: &Arc<Self>, r: Arc<dyn Replicated>, entries: Vec<Entry>) {
        let ids: Vec<u64> = entries.iter().map(|e| e.id).collect();
        let counts = r.returned(&ids);
        let mut dead = Vec::new();
        let mut back = Vec::with_capacity(entries.len());
        let delivery_limit = self.limits().delivery_limit;
        for (mut e, count) in entries.into_iter().zip(counts) {
            if delivery_limit.is_some_and(|limit| count > limit) {
                dead.push((e, DeathReason::DeliveryLimit));
                continue;
            }
            if let Some(m) = &e.message {
                e.message = Some(Arc::new(crate::broker::dead_letter::with_delivery_count(
                    m, count,
                )));
            }
            e.redelivered = true;
            back.push(e);
        }
        {
            let mut st = self.state.lock();
            for e in dead.iter().map(|(e, _)| e).chain(&back) {
                st.messages.release(e.group);
            }
            for e in back.into_iter().rev() {
                self.count_ready(&mut st, &e);
                st.messages.push_front(e);
            }
            self.dispatch_locked(&mut st, &mut dead);
        }
        self.bury(dead);
    }
}
