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

// openraft's storage traits return its (large) `StorageError` by value.
#![allow(clippy::result_large_err)]
use std::collections::BTreeMap;
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use openraft::storage::{RaftStateMachine, Snapshot, SnapshotMeta};
use openraft::{
    AnyError, Entry, EntryPayload, LogId, OptionalSend, RaftSnapshotBuilder, StorageError,
    StorageIOError, StoredMembership,
};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::QuorumConfig;
use super::op::{Op, Outcome, StoredMessage, message_id};
use crate::cluster::log::read_optional;
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
    /// Messages ever enqueued, settled, returned (for status).
    pub enqueued: u64,
    /// Settled.
    pub settled: u64,
}

#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, Member>,
    data: Vec<u8>,
}

struct Inner {
    last_applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, Member>,
    state: QueueState,
    live: Option<Arc<dyn Live>>,
    built: u64,
}

/// A replica's state machine. Clones share it.
#[derive(Clone)]
pub struct QuorumMachine {
    inner: Arc<Mutex<Inner>>,
    dir: PathBuf,
}

fn sm_err(e: impl std::fmt::Display) -> StorageError<NodeId> {
    StorageIOError::write_state_machine(AnyError::error(e.to_string())).into()
}

impl QuorumMachine {
    /// The machine whose snapshot lives in `dir` (loaded if there is one).
    pub fn open(dir: &Path) -> Result<QuorumMachine, StorageError<NodeId>> {
        std::fs::create_dir_all(dir).map_err(sm_err)?;
        let mut inner = Inner {
            last_applied: None,
            membership: StoredMembership::default(),
            state: QueueState::default(),
            live: None,
            built: 0,
        };
        if let Some(bytes) = read_optional(&dir.join("snapshot.json"))? {
            let s: StoredSnapshot = serde_json::from_slice(&bytes).map_err(sm_err)?;
            inner.state = serde_json::from_slice(&s.data).map_err(sm_err)?;
            inner.last_applied = s.meta.last_log_id;
            inner.membership = s.meta.last_membership;
        }
        Ok(QuorumMachine {
            inner: Arc::new(Mutex::new(inner)),
            dir: dir.to_owned(),
        })
    }

    /// Start (or stop, with `None`) telling a live queue of committed
    /// messages; returns the messages held now, which the live queue
    /// starts from. Both happen under one lock, so no message is missed
    /// or told twice.
    pub fn set_live(&self, live: Option<Arc<dyn Live>>) -> Vec<(u64, Held)> {
        let mut inner = self.inner.lock();
        let held = match live {
            Some(_) => inner
                .state
                .messages
                .iter()
                .map(|(id, h)| (*id, h.clone()))
                .collect(),
            None => Vec::new(),
        };
        inner.live = live;
        held
    }

    /// Start telling `live` of committed messages, after `install` has
    /// put the messages held now into it: both under one lock, so no
    /// message is missed, told twice, or told out of order.
    pub fn set_live_with(&self, live: Arc<dyn Live>, install: impl FnOnce(&BTreeMap<u64, Held>)) {
        let mut inner = self.inner.lock();
        install(&inner.state.messages);
        inner.live = Some(live);
    }

    /// Messages held and the last applied index.
    pub fn counts(&self) -> (usize, Option<u64>, u64, u64) {
        let inner = self.inner.lock();
        (
            inner.state.messages.len(),
            inner.last_applied.map(|l| l.index),
            inner.state.enqueued,
            inner.state.settled,
        )
    }

    /// How often message `id` was returned, if it is held.
    pub fn returns(&self, id: u64) -> Option<u32> {
        self.inner.lock().state.messages.get(&id).map(|h| h.returns)
    }

    fn save(&self, s: &StoredSnapshot) -> Result<(), StorageError<NodeId>> {
        let path = self.dir.join("snapshot.json");
        let tmp = self.dir.join("snapshot.json.tmp");
        let bytes = serde_json::to_vec(s).map_err(sm_err)?;
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            std::io::Write::write_all(&mut f, &bytes)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            std::fs::File::open(&self.dir)?.sync_all()
        };
        write().map_err(|e| {
            StorageIOError::write_snapshot(Some(s.meta.signature()), AnyError::new(&e)).into()
        })
    }
}

fn apply_op(inner: &mut Inner, log_id: LogId<NodeId>, op: Op) -> Outcome {
    for id in op.settle {
        if inner.state.messages.remove(&id).is_some() {
            inner.state.settled += 1;
        }
    }
    for id in op.returned {
        if let Some(h) = inner.state.messages.get_mut(&id) {
            h.returns += 1;
        }
    }
    let mut taken = Vec::with_capacity(op.enqueue.len());
    for (position, e) in op.enqueue.into_iter().enumerate() {
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
        inner.state.enqueued += 1;
        inner.state.messages.insert(id, held);
    }
    Outcome { taken }
}

impl RaftSnapshotBuilder<QuorumConfig> for QuorumMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<QuorumConfig>, StorageError<NodeId>> {
        let stored = {
            let mut inner = self.inner.lock();
            inner.built += 1;
            let data = serde_json::to_vec(&inner.state).map_err(sm_err)?;
            let last = inner.last_applied;
            let snapshot_id = match last {
                Some(l) => format!("{}-{}-{}", l.leader_id, l.index, inner.built),
                None => format!("--{}", inner.built),
            };
            StoredSnapshot {
                meta: SnapshotMeta {
                    last_log_id: last,
                    last_membership: inner.membership.clone(),
                    snapshot_id,
                },
                data,
            }
        };
        self.save(&stored)?;
        Ok(Snapshot {
            meta: stored.meta,
            snapshot: Box::new(Cursor::new(stored.data)),
        })
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
        let data = snapshot.into_inner();
        let state: QueueState = serde_json::from_slice(&data).map_err(|e| {
            StorageError::from(StorageIOError::read_snapshot(
                Some(meta.signature()),
                AnyError::new(&e),
            ))
        })?;
        self.save(&StoredSnapshot {
            meta: meta.clone(),
            data,
        })?;
        let mut inner = self.inner.lock();
        inner.state = state;
        inner.last_applied = meta.last_log_id;
        inner.membership = meta.last_membership.clone();
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<QuorumConfig>>, StorageError<NodeId>> {
        let Some(bytes) = read_optional(&self.dir.join("snapshot.json"))? else {
            return Ok(None);
        };
        let s: StoredSnapshot = serde_json::from_slice(&bytes).map_err(sm_err)?;
        Ok(Some(Snapshot {
            meta: s.meta,
            snapshot: Box::new(Cursor::new(s.data)),
        }))
    }
}
