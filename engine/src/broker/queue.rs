//! A queue: an ordered buffer of messages waiting for consumers.
//!
//! This is the in-memory queue the router delivers to; consumers, acks and
//! persistence build on it.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use amq_protocol::types::FieldTable;
use parking_lot::Mutex;

use crate::message::Message;

/// A queue.
pub struct Queue {
    /// Name.
    pub name: String,
    /// Survives a restart.
    pub durable: bool,
    /// Owned by one connection.
    pub exclusive: bool,
    /// Deleted when its last consumer goes.
    pub auto_delete: bool,
    /// Declare arguments.
    pub arguments: FieldTable,
    messages: Mutex<VecDeque<Arc<Message>>>,
    /// Notified on every push, for consumers waiting on an empty queue.
    pub(crate) ready: tokio::sync::Notify,
    /// Messages ever delivered into the queue.
    pub enqueued: AtomicU64,
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue")
            .field("name", &self.name)
            .field("len", &self.len())
            .finish()
    }
}

impl Queue {
    pub(crate) fn new(
        name: String,
        durable: bool,
        exclusive: bool,
        auto_delete: bool,
        arguments: FieldTable,
    ) -> Self {
        Queue {
            name,
            durable,
            exclusive,
            auto_delete,
            arguments,
            messages: Mutex::new(VecDeque::new()),
            ready: tokio::sync::Notify::new(),
            enqueued: AtomicU64::new(0),
        }
    }

    /// Append a message.
    pub fn push(&self, message: Arc<Message>) {
        self.messages.lock().push_back(message);
        self.enqueued.fetch_add(1, Ordering::Relaxed);
        self.ready.notify_one();
    }

    /// Take the oldest message.
    pub fn pop(&self) -> Option<Arc<Message>> {
        self.messages.lock().pop_front()
    }

    /// Messages waiting.
    pub fn len(&self) -> usize {
        self.messages.lock().len()
    }

    /// Whether no message is waiting.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Remove every waiting message; returns how many.
    pub fn purge(&self) -> usize {
        let mut m = self.messages.lock();
        let n = m.len();
        m.clear();
        n
    }

    /// Wait for a message, then take it.
    pub async fn pop_wait(&self) -> Arc<Message> {
        loop {
            let notified = self.ready.notified();
            if let Some(m) = self.pop() {
                return m;
            }
            notified.await;
        }
    }
}
