//! A message as a queue holds it: in memory or paged out to the queue's
//! log, with what a queue orders and expires it by. Shared by the queue and
//! its ready list (`ready`), which otherwise know nothing of each other's
//! insides.

use super::clock::Instant;
use std::sync::Arc;

use crate::message::Message;
use crate::store::StoreRef;

/// A message in a queue.
#[derive(Clone, Debug)]
pub struct Entry {
    /// The message, or `None` while it is paged out to the queue's log.
    pub(super) message: Option<Arc<Message>>,
    /// Where it is in the queue's log, if it is persisted there.
    pub stored: Option<StoreRef>,
    /// Body length (known without loading a paged-out message).
    pub body_len: u32,
    /// Whether it was delivered before (requeued, or recovered).
    pub redelivered: bool,
    /// When it expires (queue TTL or the message's `expiration`).
    pub expires_at: Option<Instant>,
    /// Its `priority` property (0 without one); orders it in a queue with
    /// `x-max-priority`.
    pub priority: u8,
    /// Its id in a quorum queue's replicated log (the index of the entry
    /// that enqueued it); 0 in a classic queue.
    pub id: u64,
    /// How often a classic queue got it back from a consumer (nack or
    /// reject with requeue, a channel or connection closed): its
    /// `x-delivery-count`, checked against `x-delivery-limit`. A quorum
    /// queue counts in its log instead.
    pub returns: u32,
    /// Its message group in a queue with `x-message-group-header` (0: none).
    pub group: u32,
}

impl Entry {
    /// An in-memory entry for `message`.
    pub fn new(message: Arc<Message>) -> Self {
        Entry {
            body_len: message.body.len() as u32,
            priority: message.properties.priority().unwrap_or(0),
            message: Some(message),
            stored: None,
            redelivered: false,
            expires_at: None,
            id: 0,
            returns: 0,
            group: 0,
        }
    }

    /// The message, if it is in memory (see [`super::Queue::message`]).
    pub fn resident(&self) -> Option<&Arc<Message>> {
        self.message.as_ref()
    }

    /// What the entry is taken to cost in memory: for a resident message
    /// its body and key plus the entry, the `Arc`'d message and its
    /// properties; for a paged-out one the entry alone.
    pub(super) fn footprint(&self) -> usize {
        match &self.message {
            Some(m) => m.body.len() + m.routing_key.len() + 256,
            None => std::mem::size_of::<Entry>(),
        }
    }
}

#[cfg(test)]
mod tests {
    /// What a paged-out message costs in memory (`docs/configuration.md`
    /// says so under `queue_flow_bytes`): a field added here is paid per
    /// message of every backlog.
    #[test]
    fn an_entry_is_64_bytes() {
        assert_eq!(std::mem::size_of::<super::Entry>(), 64);
    }
}
