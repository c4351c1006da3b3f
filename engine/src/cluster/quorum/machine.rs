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
use crate::cluster::snapshot::{Encoding, StoredSnapshot, sm_err};
use crate::cluster::{Member, NodeId};

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

struct Inner {
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
    /// deduplicating with `dedup` if the queue does.
    pub fn open(
        dir: &Path,
        dedup: Option<crate::dedup::Settings>,
    ) -> Result<QuorumMachine, StorageError<NodeId>> {
        std::fs::create_dir_all(dir).map_err(sm_err)?;
        let mut inner = Inner {
            last_applied: None,
            membership: StoredMembership::default(),
            state: QueueState::default(),
            live: None,
            built: 0,
            dedup: None,
        };
        if let Some(s) = StoredSnapshot::load(dir)? {
            inner.state = s.state()?;
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
        (
            inner.state.messages.len(),
            inner.last_applied.map(|l| l.index),
        )
    }
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
        let stored = {
            let mut inner = self.inner.lock();
            inner.built += 1;
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
        let mut out = Vec::new();
        let mut inner = self.inner.lock();
        for entry in entries {
            inner.last_applied = Some(entry.log_id);
            out.push(match entry.payload {
                EntryPayload::Blank => Outcome::default(),
                EntryPayload::Normal(op) => apply_op(&mut inner, entry.log_id, op),
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
