//! A quorum queue's state machine: what every replica agrees the queue
//! holds, changed only by committed [`Op`]s in log order.
//!
//! Each replica keeps the messages not yet settled, with the term they
//! were enqueued in and how often they were returned. The leader also
//! serves the queue: while it leads, a [`Live`] hook (its live queue) is
//! told of each message as it is committed, under the same lock that
//! applies it, so the live queue and the state never disagree about what
//! arrived. A new leader builds its live queue from this state.
//!
//! A snapshot is the state as JSON: its size follows the backlog, not the
//! history, and the log before it is dropped (log compaction).
//!
//! A replicated stream's machine appends each committed message to the
//! replica's stream log instead of holding it ([`super::stream`]).
//!
//! A queue with `x-message-deduplication` deduplicates here, as entries
//! are applied: every replica reads the same ids from the same messages
//! and measures the window on the publish time the leader wrote into the
//! entry, not its own clock, so every replica takes and drops the same
//! messages, and a new leader knows every id its predecessor took. The
//! ids are part of the snapshot.

// openraft's storage traits return its (large) `StorageError` by value.
#![allow(clippy::result_large_err)]
use std::collections::BTreeMap;
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use openraft::storage::{RaftStateMachine, Snapshot, SnapshotMeta};
use openraft::{
    Entry, EntryPayload, LogId, OptionalSend, RaftSnapshotBuilder, StorageError, StoredMembership,
};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::QuorumConfig;
use super::op::{Op, Outcome, StoredMessage, message_id};
use super::stream::{Source, StreamState};
use crate::cluster::snapshot::{Encoding, StoredSnapshot, sm_err};
use crate::cluster::{Member, NodeId};
use crate::store::stream::{Placed, StreamLog};

/// A message the queue holds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Held {
    /// When it was published (ms since the epoch).
    pub published_ms: u64,
    /// The term of the leader that enqueued it: a leader of a later term
    /// cannot know whether it was delivered, so it marks it redelivered.
    pub term: u64,
    /// How often it was returned to the queue (`x-delivery-count`).
    pub returns: u32,
    /// The message.
    pub message: StoredMessage,
}

/// The leader's live queue, told of each message as it is committed.
pub trait Live: Send + Sync {
    /// Message `id` was committed; returns whether the queue took it.
    fn enqueued(&self, id: u64, held: &Held) -> bool;
}

/// What every replica agrees on.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct QueueState {
    /// Messages not settled, by id.
    pub messages: BTreeMap<u64, Held>,
    /// A deduplicating queue's ids and when each expires (ms), as of the
    /// snapshot (the live set is the machine's cache). Always written:
    /// postcard reads fields by position.
    #[serde(default)]
    pub ids: Vec<(u64, u64, u64)>,
}

/// A replicated stream's side of the machine.
struct StreamSide {
    log: Arc<StreamLog>,
    /// The offset the next committed message gets: counted from the log's
    /// entries, so the same on every replica.
    next: u64,
    source: Arc<dyn Source>,
    /// A task tries to fill a gap again.
    refilling: bool,
}

impl StreamSide {
    /// Where a snapshot says the stream is: its next offset and the named
    /// consumers' offsets (the records are in the replica's log).
    fn restore(&mut self, state: &StreamState) {
        self.next = state.next;
        for (name, offset) in &state.offsets {
            super::stream::store_offset(&self.log, name, *offset);
        }
    }
}

struct Inner {
    stream: Option<StreamSide>,
    last_applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, Member>,
    state: QueueState,
    live: Option<Arc<dyn Live>>,
    built: u64,
    /// A deduplicating queue's ids.
    dedup: Option<crate::dedup::Cache>,
}

fn cache_of(
    settings: Option<crate::dedup::Settings>,
    state: &QueueState,
) -> Option<crate::dedup::Cache> {
    let mut c = crate::dedup::Cache::new(settings?);
    // Expiry is judged against the publish times of later entries.
    for (a, b, expires) in &state.ids {
        c.restore((*a, *b), *expires, 0);
    }
    Some(c)
}

/// A replica's state machine. Clones share it.
#[derive(Clone)]
pub struct QuorumMachine {
    inner: Arc<Mutex<Inner>>,
    dir: PathBuf,
}

impl QuorumMachine {
    /// The machine whose snapshot lives in `dir` (loaded if there is one),
    /// deduplicating with `dedup` if the queue does; a replicated stream's
    /// appends to `stream`, filling what it lacks from `source`.
    pub fn open(
        dir: &Path,
        dedup: Option<crate::dedup::Settings>,
        stream: Option<(Arc<StreamLog>, Arc<dyn Source>)>,
    ) -> Result<QuorumMachine, StorageError<NodeId>> {
        std::fs::create_dir_all(dir).map_err(sm_err)?;
        let mut inner = Inner {
            stream: stream.map(|(log, source)| StreamSide {
                log,
                next: 0,
                source,
                refilling: false,
            }),
            last_applied: None,
            membership: StoredMembership::default(),
            state: QueueState::default(),
            live: None,
            built: 0,
            dedup: None,
        };
        if let Some(s) = StoredSnapshot::load(dir)? {
            match inner.stream.as_mut() {
                Some(side) => side.restore(&s.state()?),
                None => inner.state = s.state()?,
            }
            inner.last_applied = s.meta.last_log_id;
            inner.membership = s.meta.last_membership;
        }
        inner.dedup = cache_of(dedup, &inner.state);
        Ok(QuorumMachine {
            inner: Arc::new(Mutex::new(inner)),
            dir: dir.to_owned(),
        })
    }

    /// Stop telling a live queue of committed messages.
    pub fn clear_live(&self) {
        self.inner.lock().live = None;
    }

    /// Start telling `live` of committed messages, after `install` has
    /// put the messages held now into it: both under one lock, so no
    /// message is missed, told twice, or told out of order.
    pub fn set_live_with(&self, live: Arc<dyn Live>, install: impl FnOnce(&BTreeMap<u64, Held>)) {
        let mut inner = self.inner.lock();
        install(&inner.state.messages);
        inner.live = Some(live);
    }

    /// Messages held, and the last index applied.
    pub fn counts(&self) -> (usize, Option<u64>) {
        let inner = self.inner.lock();
        let held = match &inner.stream {
            Some(side) => {
                let s = side.log.stats();
                (s.committed - s.first) as usize
            }
            None => inner.state.messages.len(),
        };
        (held, inner.last_applied.map(|l| l.index))
    }

    /// Fill this replica's stream log with what the log's entries gave it
    /// but it lacks (installed by a snapshot, or lost), from the other
    /// replicas. On failure (no other replica reachable just now) a task
    /// tries again every second until the log is whole: a quiet stream
    /// has no next apply to try it.
    async fn fill_stream(&self) {
        if self.try_fill().await {
            return;
        }
        {
            let mut inner = self.inner.lock();
            let Some(side) = inner.stream.as_mut() else {
                return;
            };
            if std::mem::replace(&mut side.refilling, true) {
                return;
            }
        }
        let machine = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                let gone = machine
                    .inner
                    .lock()
                    .stream
                    .as_ref()
                    .is_none_or(|s| s.log.is_deleted());
                if gone || machine.try_fill().await {
                    break;
                }
            }
            if let Some(side) = machine.inner.lock().stream.as_mut() {
                side.refilling = false;
            }
        });
    }

    /// One attempt of [`Self::fill_stream`]: whether the log is whole.
    async fn try_fill(&self) -> bool {
        let job = {
            let inner = self.inner.lock();
            let Some(side) = &inner.stream else {
                return true;
            };
            if side.log.next_offset() >= side.next {
                return true;
            }
            let peers: Vec<String> = inner
                .membership
                .membership()
                .nodes()
                .map(|(_, n)| n.name.clone())
                .collect();
            (side.log.clone(), side.source.clone(), peers, side.next)
        };
        let (log, source, peers, target) = job;
        let from = log.next_offset();
        match super::stream::fill(&log, &*source, peers, target).await {
            Ok(()) => {
                tracing::info!(
                    stream = %log.dir().display(),
                    from,
                    to = target,
                    "a stream replica filled the offsets it lacked from another replica"
                );
                true
            }
            Err(e) => {
                tracing::warn!(
                    stream = %log.dir().display(),
                    from,
                    to = target,
                    "a stream replica lacks offsets and could not fill them yet: {e}"
                );
                false
            }
        }
    }
}

/// A replicated stream's entry: each message appended at the next offset;
/// a consumer's offset stored.
fn apply_stream(side: &mut StreamSide, op: Op) -> Outcome {
    let mut taken = Vec::with_capacity(op.enqueue.len());
    for e in op.enqueue {
        taken.push(true);
        if let Some((name, offset)) = e.as_consumer_offset() {
            super::stream::store_offset(&side.log, name, offset);
            continue;
        }
        let offset = side.next;
        side.next += 1;
        let Some(m) = e.message.message() else {
            tracing::error!(offset, "a replicated stream's message does not decode");
            continue;
        };
        let filter = crate::broker::stream::filter_value(&m);
        match side.log.append_at(offset, e.published_ms, &m, filter) {
            Ok(Placed::Held | Placed::Appended(_)) => {}
            // Filled from another replica at the next apply.
            Ok(Placed::Gap { .. }) | Err(crate::store::StoreError::Deleted) => {}
            Err(err) => {
                tracing::error!(offset, stream = %side.log.dir().display(), "appending to a replicated stream failed: {err}");
            }
        }
    }
    Outcome { taken }
}

fn apply_op(inner: &mut Inner, log_id: LogId<NodeId>, op: Op) -> Outcome {
    for id in op.settle {
        inner.state.messages.remove(&id);
    }
    for id in op.returned {
        if let Some(h) = inner.state.messages.get_mut(&id) {
            h.returns += 1;
        }
    }
    let mut taken = Vec::with_capacity(op.enqueue.len());
    for (position, e) in op.enqueue.into_iter().enumerate() {
        if let Some(cache) = inner.dedup.as_mut() {
            match dedup_key(&e.message) {
                Err(()) => {
                    // Refused (an id that is not a string, or too long).
                    taken.push(false);
                    continue;
                }
                Ok(Some(key)) => {
                    if cache.admit(key, e.published_ms, None).is_none() {
                        // A duplicate: confirmed, not enqueued.
                        taken.push(true);
                        continue;
                    }
                }
                Ok(None) => {}
            }
        }
        let id = message_id(log_id.index, position);
        let held = Held {
            published_ms: e.published_ms,
            term: log_id.leader_id.term,
            returns: 0,
            message: e.message,
        };
        taken.push(match &inner.live {
            Some(live) => live.enqueued(id, &held),
            None => true,
        });
        inner.state.messages.insert(id, held);
    }
    Outcome { taken }
}

/// The deduplication id of a logged message (`Err`: refused).
fn dedup_key(m: &StoredMessage) -> Result<Option<crate::dedup::Key>, ()> {
    let raw = bytes::Bytes::copy_from_slice(&m.properties);
    let Ok(props) = crate::message::decode_properties(&raw) else {
        return Ok(None);
    };
    match props.headers() {
        None => Ok(None),
        Some(h) => crate::dedup::key_in(h).map_err(|_| ()),
    }
}

impl RaftSnapshotBuilder<QuorumConfig> for QuorumMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<QuorumConfig>, StorageError<NodeId>> {
        let log = self.inner.lock().stream.as_ref().map(|s| s.log.clone());
        if let Some(log) = log {
            // What the write-ahead log drops once this snapshot exists must
            // be in the stream log, on disk.
            crate::store::Flush::flush(&*log).map_err(sm_err)?;
        }
        let stored = {
            let mut inner = self.inner.lock();
            inner.built += 1;
            if let Some(side) = &inner.stream {
                let state = StreamState {
                    next: side.next,
                    offsets: side.log.stored_offsets(),
                };
                let stored = StoredSnapshot::build(
                    &state,
                    inner.last_applied,
                    inner.membership.clone(),
                    inner.built,
                    Encoding::Binary,
                )?;
                drop(inner);
                stored.save(&self.dir)?;
                return Ok(stored.snapshot());
            }
            inner.state.ids = inner.dedup.as_ref().map_or_else(Vec::new, |c| {
                c.entries()
                    .into_iter()
                    .map(|((a, b), e)| (a, b, e))
                    .collect()
            });
            StoredSnapshot::build(
                &inner.state,
                inner.last_applied,
                inner.membership.clone(),
                inner.built,
                Encoding::Binary,
            )?
        };
        stored.save(&self.dir)?;
        Ok(stored.snapshot())
    }
}

impl RaftStateMachine<QuorumConfig> for QuorumMachine {
    type SnapshotBuilder = QuorumMachine;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, Member>), StorageError<NodeId>>
    {
        let inner = self.inner.lock();
        Ok((inner.last_applied, inner.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Outcome>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<QuorumConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        self.fill_stream().await;
        let mut out = Vec::new();
        let mut inner = self.inner.lock();
        let inner = &mut *inner;
        for entry in entries {
            inner.last_applied = Some(entry.log_id);
            out.push(match entry.payload {
                EntryPayload::Blank => Outcome::default(),
                EntryPayload::Normal(op) => match inner.stream.as_mut() {
                    Some(side) => apply_stream(side, op),
                    None => apply_op(inner, entry.log_id, op),
                },
                EntryPayload::Membership(m) => {
                    inner.membership = StoredMembership::new(Some(entry.log_id), m);
                    Outcome::default()
                }
            });
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<Cursor<Vec<u8>>>, StorageError<NodeId>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, Member>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<NodeId>> {
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data: snapshot.into_inner(),
        };
        if self.inner.lock().stream.is_some() {
            let state: StreamState = stored.state()?;
            stored.save(&self.dir)?;
            {
                let mut inner = self.inner.lock();
                inner.stream.as_mut().expect("a stream").restore(&state);
                inner.last_applied = meta.last_log_id;
                inner.membership = meta.last_membership.clone();
            }
            self.fill_stream().await;
            return Ok(());
        }
        let state: QueueState = stored.state()?;
        stored.save(&self.dir)?;
        let mut inner = self.inner.lock();
        let settings = inner.dedup.as_ref().map(crate::dedup::Cache::settings);
        inner.dedup = cache_of(settings, &state);
        inner.state = state;
        inner.last_applied = meta.last_log_id;
        inner.membership = meta.last_membership.clone();
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<QuorumConfig>>, StorageError<NodeId>> {
        Ok(StoredSnapshot::load(&self.dir)?.map(|s| s.snapshot()))
    }
}
