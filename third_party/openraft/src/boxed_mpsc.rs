//! Tokio's unbounded channel with each message boxed.
//!
//! Not part of openraft as published: added for wasmq (`third_party/README.md`).
//! A tokio channel allocates its first block of 32 slots when it is
//! made, and a slot is as large as the message: with a quorum queue's
//! types, 176 to 392 bytes, so 5.5 to 12.5 KiB per channel, four to six
//! channels per Raft instance, held for as long as the instance lives
//! whether it carries anything or not. A node with thousands of Raft
//! groups (one per queue) holds that for every one of them. Boxed, a
//! slot is a pointer (a block is 256 bytes); a message costs one small
//! allocation, on paths that already allocate per message.

pub(crate) use tokio::sync::mpsc::error;
use tokio::sync::mpsc as inner;

pub(crate) struct UnboundedSender<T>(inner::UnboundedSender<Box<T>>);

pub(crate) struct WeakUnboundedSender<T>(inner::WeakUnboundedSender<Box<T>>);

pub(crate) struct UnboundedReceiver<T>(inner::UnboundedReceiver<Box<T>>);

pub(crate) fn unbounded_channel<T>() -> (UnboundedSender<T>, UnboundedReceiver<T>) {
    let (tx, rx) = inner::unbounded_channel();
    (UnboundedSender(tx), UnboundedReceiver(rx))
}

impl<T> Clone for UnboundedSender<T> {
    fn clone(&self) -> Self {
        UnboundedSender(self.0.clone())
    }
}

impl<T> Clone for WeakUnboundedSender<T> {
    fn clone(&self) -> Self {
        WeakUnboundedSender(self.0.clone())
    }
}

impl<T> std::fmt::Debug for UnboundedSender<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl<T> std::fmt::Debug for WeakUnboundedSender<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl<T> std::fmt::Debug for UnboundedReceiver<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl<T> UnboundedSender<T> {
    pub(crate) fn send(&self, message: T) -> Result<(), error::SendError<T>> {
        self.0.send(Box::new(message)).map_err(|e| error::SendError(*e.0))
    }

    pub(crate) fn downgrade(&self) -> WeakUnboundedSender<T> {
        WeakUnboundedSender(self.0.downgrade())
    }
}

impl<T> WeakUnboundedSender<T> {
    pub(crate) fn upgrade(&self) -> Option<UnboundedSender<T>> {
        self.0.upgrade().map(UnboundedSender)
    }
}

impl<T> UnboundedReceiver<T> {
    pub(crate) async fn recv(&mut self) -> Option<T> {
        self.0.recv().await.map(|b| *b)
    }

    pub(crate) fn try_recv(&mut self) -> Result<T, error::TryRecvError> {
        self.0.try_recv().map(|b| *b)
    }
}
