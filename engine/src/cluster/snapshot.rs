//! A Raft state machine's snapshot on disk: one JSON file per machine,
//! replaced atomically (written to a temporary file, synced, renamed, the
//! folder synced). The cluster's definitions and every quorum queue keep
//! theirs the same way.

// openraft's storage traits return its (large) `StorageError` by value.
#![allow(clippy::result_large_err)]
use std::io::Cursor;
use std::path::Path;

use openraft::storage::{Snapshot, SnapshotMeta};
use openraft::{AnyError, LogId, RaftTypeConfig, StorageError, StorageIOError, StoredMembership};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::log::read_optional;
use super::{Member, NodeId};

const FILE: &str = "snapshot.json";

/// A snapshot as it is kept: what it covers, and the state's bytes.
#[derive(Clone, Serialize, Deserialize)]
pub(crate) struct StoredSnapshot {
    pub meta: SnapshotMeta<NodeId, Member>,
    pub data: Vec<u8>,
}

/// A state machine's error, as openraft takes it.
pub(crate) fn sm_err(e: impl std::fmt::Display) -> StorageError<NodeId> {
    StorageIOError::write_state_machine(AnyError::error(e.to_string())).into()
}

impl StoredSnapshot {
    /// The `built`-th snapshot of `state` as applied up to `last`.
    pub fn build(
        state: &impl Serialize,
        last: Option<LogId<NodeId>>,
        membership: StoredMembership<NodeId, Member>,
        built: u64,
    ) -> Result<StoredSnapshot, StorageError<NodeId>> {
        let snapshot_id = match last {
            Some(l) => format!("{}-{}-{}", l.leader_id, l.index, built),
            None => format!("--{built}"),
        };
        Ok(StoredSnapshot {
            meta: SnapshotMeta {
                last_log_id: last,
                last_membership: membership,
                snapshot_id,
            },
            data: serde_json::to_vec(state).map_err(sm_err)?,
        })
    }

    /// The snapshot kept in `dir`, if there is one.
    pub fn load(dir: &Path) -> Result<Option<StoredSnapshot>, StorageError<NodeId>> {
        match read_optional(&dir.join(FILE))? {
            Some(bytes) => Ok(Some(serde_json::from_slice(&bytes).map_err(sm_err)?)),
            None => Ok(None),
        }
    }

    /// The state it holds.
    pub fn state<T: DeserializeOwned>(&self) -> Result<T, StorageError<NodeId>> {
        serde_json::from_slice(&self.data).map_err(|e| {
            StorageIOError::read_snapshot(Some(self.meta.signature()), AnyError::new(&e)).into()
        })
    }

    /// Keep it in `dir`, replacing the one there.
    pub fn save(&self, dir: &Path) -> Result<(), StorageError<NodeId>> {
        let path = dir.join(FILE);
        let tmp = dir.join("snapshot.json.tmp");
        let bytes = serde_json::to_vec(self).map_err(sm_err)?;
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            std::io::Write::write_all(&mut f, &bytes)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            std::fs::File::open(dir)?.sync_all()
        };
        write().map_err(|e| {
            StorageIOError::write_snapshot(Some(self.meta.signature()), AnyError::new(&e)).into()
        })
    }

    /// As openraft hands it on.
    pub fn snapshot<C>(&self) -> Snapshot<C>
    where
        C: RaftTypeConfig<NodeId = NodeId, Node = Member, SnapshotData = Cursor<Vec<u8>>>,
    {
        Snapshot {
            meta: self.meta.clone(),
            snapshot: Box::new(Cursor::new(self.data.clone())),
        }
    }
}
