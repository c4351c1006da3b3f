//! What a quorum queue's replicated log carries: every change to the
//! queue's contents, as the leader decided it.
//!
//! A message's id is made of the log index of the entry that enqueued it
//! and its position there: the same on every replica and after any leader
//! change, so a settlement or a return names it without a second counter
//! to agree on.

use serde::{Deserialize, Serialize};

use crate::cluster::command::bytes_field;
use crate::message::Message;

/// Messages per entry at most: a message's id is its entry's log index
/// shifted left by 16 bits, plus its position in the entry.
pub const MAX_BATCH: usize = 4096;

/// The id of the message at `position` in the entry at log `index`.
pub fn message_id(index: u64, position: usize) -> u64 {
    (index << 16) | position as u64
}

/// The log index of the entry that enqueued message `id`.
pub fn entry_index(id: u64) -> u64 {
    id >> 16
}

/// One entry of a quorum queue's log: the changes its leader gathered
/// since the last one was proposed (one entry per round, not per message,
/// so that a busy queue commits many messages per round trip and sync).
// No `skip_serializing_if` here: postcard reads fields by position.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Op {
    /// Published messages joining the queue, in order.
    pub enqueue: Vec<Enqueue>,
    /// Messages that left the queue for good: acked, dead-lettered,
    /// expired, dropped by a limit, purged.
    pub settle: Vec<u64>,
    /// Messages returned to the queue (a nack or reject with requeue, a
    /// consumer gone): each one's delivery count goes up.
    pub returned: Vec<u64>,
}

impl Op {
    /// Nothing to propose.
    pub fn is_empty(&self) -> bool {
        self.enqueue.is_empty() && self.settle.is_empty() && self.returned.is_empty()
    }
}

/// A published message, as an entry carries it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Enqueue {
    /// When it was published (ms since the epoch, the proposer's clock):
    /// its TTL runs from here on every replica.
    pub published_ms: u64,
    /// The message.
    pub message: StoredMessage,
}

/// A message as the log keeps it: what a delivery needs, nothing decoded.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StoredMessage {
    /// The exchange it was published to.
    pub exchange: String,
    /// Its routing key.
    pub routing_key: String,
    /// Its properties, AMQP-encoded.
    #[serde(with = "bytes_field")]
    pub properties: Vec<u8>,
    /// Its body.
    #[serde(with = "bytes_field")]
    pub body: Vec<u8>,
}

impl StoredMessage {
    /// The log's copy of `m`.
    pub fn of(m: &Message) -> StoredMessage {
        StoredMessage {
            exchange: m.exchange.clone(),
            routing_key: m.routing_key.clone(),
            properties: m.encoded_properties().to_vec(),
            body: m.body.to_vec(),
        }
    }

    /// The message again (`None` if its properties do not decode, which
    /// only a corrupted log could make happen).
    pub fn message(&self) -> Option<Message> {
        let raw = bytes::Bytes::copy_from_slice(&self.properties);
        let props = crate::message::decode_properties(&raw).ok()?;
        Some(
            Message::new(
                self.exchange.clone(),
                self.routing_key.clone(),
                props,
                bytes::Bytes::copy_from_slice(&self.body),
            )
            .with_encoded_properties(raw),
        )
    }
}

/// What applying an [`Op`] did.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    /// For each message enqueued, whether the leader's queue took it
    /// (false: refused by `x-overflow: reject-publish`, then settled).
    pub taken: Vec<bool>,
}
