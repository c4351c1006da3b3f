//! A durable queue's messages in its log: put back at start-up, read back
//! when paged out, and the log removed with the queue.
//!
//! Writing and settling are on the message path (`push`, `forget`, in the
//! queue itself); what is here runs when a queue is recovered, when a
//! paged-out message is delivered, and when the queue is deleted.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::clock::{Instant, now_ms};
use super::{Entry, Queue};
use crate::message::Message;
use crate::store::{QueueLog, Recovered, StoreError};

impl Queue {
    /// The message of `entry`, read back from the log if it was paged out,
    /// with its `x-delivery-count` if it was returned before to a queue
    /// with a delivery limit or a single node's quorum queue (other
    /// classic queues deliver a message as it was published, as
    /// RabbitMQ's do).
    pub fn message(&self, entry: &Entry) -> Result<Arc<Message>, StoreError> {
        let m = match (&entry.message, &self.log, entry.stored) {
            (Some(m), _, _) => m.clone(),
            (None, Some(log), Some(r)) => Arc::new(log.load(r)?),
            _ => return Err(StoreError::Deleted),
        };
        // A redelivery only: the limits' lock is not taken on first
        // deliveries.
        if entry.returns == 0 || !(self.quorum || self.limits().delivery_limit.is_some()) {
            return Ok(m);
        }
        Ok(Arc::new(crate::broker::dead_letter::with_delivery_count(
            &m,
            entry.returns,
        )))
    }

    /// The queue's log, for durable queues with a store.
    pub fn log(&self) -> Option<&Arc<QueueLog>> {
        self.log.as_ref()
    }

    /// Take the next message for `basic.get`, skipping (and logging) any
    /// whose stored copy cannot be read back.
    pub fn pop_readable(&self) -> Option<(Entry, Arc<Message>)> {
        loop {
            let entry = self.pop()?;
            match self.message(&entry) {
                Ok(m) => return Some((entry, m)),
                Err(e) => {
                    tracing::error!(queue = %crate::untrusted::text(&self.name), "reading a stored message failed; skipped: {e}")
                }
            }
        }
    }

    /// Put recovered messages in the queue (at startup, before any client
    /// sees it), in log order, marked redelivered: they may have been
    /// delivered before the restart.
    pub fn restore(self: &Arc<Self>, recovered: Vec<Recovered>) {
        let now = Instant::now();
        let now_ms = now_ms();
        let mut st = self.state.lock();
        let queue_ttl = st.limits.message_ttl.map(|d| d.as_millis() as u64);
        for r in recovered {
            // A grouped queue reads each message's group back, a delayed
            // exchange's queue its delay (the record keeps only its size
            // and timing).
            let loaded = match &self.log {
                Some(log) if self.group_header.is_some() || self.due_sink.is_some() => {
                    log.load(r.stored).ok()
                }
                _ => None,
            };
            let group = match (&self.group_header, &loaded) {
                (Some(h), Some(m)) => super::group_hash(m, h).unwrap_or(0),
                _ => 0,
            };
            let due = self.due_of(&st, loaded.as_ref(), Some(r.meta.published_ms));
            let ttl = match (queue_ttl, r.meta.ttl_ms) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let entry = Entry {
                message: None,
                stored: Some(r.stored),
                body_len: r.meta.body_len,
                redelivered: true,
                priority: r.meta.priority,
                id: 0,
                returns: r.returns,
                group,
                expires_at: ttl.map(|t| {
                    let left = (r.meta.published_ms + t).saturating_sub(now_ms);
                    now + Duration::from_millis(left)
                }),
            };
            self.enqueued.fetch_add(1, Ordering::Relaxed);
            if let Some(due) = due.filter(|d| self.holds(*d)) {
                self.wait(&mut st, entry, due);
                continue;
            }
            self.count_ready(&mut st, &entry);
            st.messages.push_back(entry);
        }
    }

    /// The queue was deleted: remove its log.
    pub(crate) fn destroy_log(&self) {
        if let Some(log) = &self.log {
            log.destroy();
        }
        if let Some(s) = &self.stream {
            s.destroy();
        }
    }
}
