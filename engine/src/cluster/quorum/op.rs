//! What a quorum queue's replicated log carries: every change to the
//! queue's contents, as the leader decided it.
//!
//! A message's id is the log index of the entry that enqueued it: the same
//! on every replica and after any leader change, so a settlement or a
//! return names it without a second counter to agree on.

use serde::{Deserialize, Serialize};

use crate::cluster::command::base64_bytes;
use crate::message::Message;

/// One change to a quorum queue.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// A published message joins the queue.
    Enqueue {
        /// When it was published (ms since the epoch, the proposer's
        /// clock): its TTL runs from here on every replica.
        published_ms: u64,
        /// The message.
        message: StoredMessage,
    },
    /// These messages left the queue for good: acked, dead-lettered,
    /// expired, dropped by a limit, purged.
    Settle {
        /// Their ids.
        ids: Vec<u64>,
    },
    /// These messages were returned to the queue (a nack or reject with
    /// requeue, a consumer gone): each one's delivery count goes up.
    Return {
        /// Their ids.
        ids: Vec<u64>,
    },
}

/// A message as the log keeps it: what a delivery needs, nothing decoded.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StoredMessage {
    /// The exchange it was published to.
    pub exchange: String,
    /// Its routing key.
    pub routing_key: String,
    /// Its properties, AMQP-encoded.
    #[serde(with = "base64_bytes")]
    pub properties: Vec<u8>,
    /// Its body.
    #[serde(with = "base64_bytes")]
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
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Outcome {
    /// The message has this id; `taken` is false when the leader's queue
    /// refused it (`x-overflow: reject-publish`), which is then settled.
    Enqueued {
        /// Its id.
        id: u64,
        /// Whether the queue took it.
        taken: bool,
    },
    /// Done.
    Done,
}
