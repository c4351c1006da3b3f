//! A Raft state machine's snapshot on disk: one file per machine, replaced
//! atomically (written to a temporary file, synced, renamed, the folder
//! synced). The cluster's definitions and every quorum queue keep theirs
//! the same way.
//!
//! The file (`snapshot.bin`) is a magic line, the metadata as JSON behind
//! its length, then the state's bytes as they are. The state is JSON for
//! the definitions (small, and read by people) and postcard for a quorum
//! queue, whose snapshot holds its whole backlog: JSON made that the
//! largest cost of a queue with a backlog (each message's body escaped,
//! the whole state written again as an array of numbers). The first byte
//! tells the two apart, so a follower decodes what a leader sends either
//! way. A `snapshot.json` of an older version is read, and replaced by
//! the next snapshot.

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

const FILE: &str = "snapshot.bin";
/// What an older version wrote: the whole snapshot as JSON.
const OLD_FILE: &str = "snapshot.json";
const MAGIC: &[u8; 8] = b"wqsnap1\n";
/// Leads a state in postcard: no JSON document starts with a zero byte.
const BINARY: u8 = 0;

/// How a snapshot's state is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Encoding {
    /// JSON: small states people may read.
    Json,
    /// postcard, behind a zero byte: large states (a queue's backlog).
    Binary,
}

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
        encoding: Encoding,
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
            data: match encoding {
                Encoding::Json => serde_json::to_vec(state).map_err(sm_err)?,
                Encoding::Binary => {
                    let mut data = vec![BINARY];
                    postcard::to_io(state, &mut data).map_err(sm_err)?;
                    data
                }
            },
        })
    }

    /// The snapshot kept in `dir`, if there is one.
    pub fn load(dir: &Path) -> Result<Option<StoredSnapshot>, StorageError<NodeId>> {
        if let Some(bytes) = read_optional(&dir.join(FILE))? {
            return Self::decode(&bytes).map(Some);
        }
        match read_optional(&dir.join(OLD_FILE))? {
            Some(bytes) => Ok(Some(serde_json::from_slice(&bytes).map_err(sm_err)?)),
            None => Ok(None),
        }
    }

    fn encode(&self) -> Result<Vec<u8>, StorageError<NodeId>> {
        let meta = serde_json::to_vec(&self.meta).map_err(sm_err)?;
        let mut out = Vec::with_capacity(MAGIC.len() + 4 + meta.len() + self.data.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&(meta.len() as u32).to_le_bytes());
        out.extend_from_slice(&meta);
        out.extend_from_slice(&self.data);
        Ok(out)
    }

    fn decode(bytes: &[u8]) -> Result<StoredSnapshot, StorageError<NodeId>> {
        let bad = || sm_err("snapshot.bin: not a snapshot file (bad magic or length)");
        let rest = bytes.strip_prefix(MAGIC.as_slice()).ok_or_else(bad)?;
        let (len, rest) = rest.split_first_chunk::<4>().ok_or_else(bad)?;
        let len = u32::from_le_bytes(*len) as usize;
        if rest.len() < len {
            return Err(bad());
        }
        let (meta, data) = rest.split_at(len);
        Ok(StoredSnapshot {
            meta: serde_json::from_slice(meta).map_err(sm_err)?,
            data: data.to_vec(),
        })
    }

    /// The state it holds.
    pub fn state<T: DeserializeOwned>(&self) -> Result<T, StorageError<NodeId>> {
        let read = |e: &dyn std::error::Error| -> StorageError<NodeId> {
            StorageIOError::read_snapshot(Some(self.meta.signature()), AnyError::error(e)).into()
        };
        match self.data.split_first() {
            Some((&BINARY, rest)) => postcard::from_bytes(rest).map_err(|e| read(&e)),
            _ => serde_json::from_slice(&self.data).map_err(|e| read(&e)),
        }
    }

    /// Keep it in `dir`, replacing the one there.
    pub fn save(&self, dir: &Path) -> Result<(), StorageError<NodeId>> {
        let path = dir.join(FILE);
        let tmp = dir.join("snapshot.bin.tmp");
        let bytes = self.encode()?;
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            std::io::Write::write_all(&mut f, &bytes)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            // An older version's file is superseded (and would be read
            // only were this one missing).
            match std::fs::remove_file(dir.join(OLD_FILE)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct State {
        name: String,
        #[serde(with = "crate::cluster::command::bytes_field")]
        body: Vec<u8>,
        ids: Vec<u64>,
    }

    fn state() -> State {
        State {
            name: "q".into(),
            body: vec![0, 1, 2, 255],
            ids: vec![7, 8],
        }
    }

    #[test]
    fn both_encodings_round_trip_through_the_file() {
        for encoding in [Encoding::Json, Encoding::Binary] {
            let dir = tempfile::tempdir().unwrap();
            let s = StoredSnapshot::build(&state(), None, Default::default(), 3, encoding).unwrap();
            assert_eq!(s.data[0] == BINARY, encoding == Encoding::Binary);
            s.save(dir.path()).unwrap();
            let back = StoredSnapshot::load(dir.path()).unwrap().unwrap();
            assert_eq!(back.meta, s.meta);
            assert_eq!(back.state::<State>().unwrap(), state());
            // What openraft hands to a follower decodes the same.
            let shipped = StoredSnapshot {
                meta: s.meta.clone(),
                data: s
                    .snapshot::<crate::cluster::quorum::QuorumConfig>()
                    .snapshot
                    .into_inner(),
            };
            assert_eq!(shipped.state::<State>().unwrap(), state());
        }
    }

    #[test]
    fn an_older_versions_json_file_is_read_then_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let old =
            StoredSnapshot::build(&state(), None, Default::default(), 1, Encoding::Json).unwrap();
        std::fs::write(dir.path().join(OLD_FILE), serde_json::to_vec(&old).unwrap()).unwrap();
        let read = StoredSnapshot::load(dir.path()).unwrap().unwrap();
        assert_eq!(read.state::<State>().unwrap(), state());
        let new =
            StoredSnapshot::build(&state(), None, Default::default(), 2, Encoding::Binary).unwrap();
        new.save(dir.path()).unwrap();
        assert!(!dir.path().join(OLD_FILE).exists());
        assert_eq!(
            StoredSnapshot::load(dir.path()).unwrap().unwrap().meta,
            new.meta
        );
    }

    #[test]
    fn a_damaged_file_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE), b"wqsnap1\n\xff\xff\xff\xff{}").unwrap();
        assert!(StoredSnapshot::load(dir.path()).is_err());
        std::fs::write(dir.path().join(FILE), b"garbage").unwrap();
        assert!(StoredSnapshot::load(dir.path()).is_err());
    }
}
