//! The Raft log on disk: entries, the vote and the commit index, in one
//! append-only file of checksummed records.
//!
//! Raft asks little of its log: append a batch and make it durable before
//! saying so, remember the vote durably before answering a candidate,
//! drop a conflicting suffix, and drop a settled prefix once a snapshot
//! covers it. One file of records does all four: every operation is a
//! record appended and synced (`truncate` and `purge` are records too, so
//! nothing is rewritten in place), and opening the file replays them. The
//! file is rewritten (to a temporary file, synced, renamed) when what it
//! holds has grown to several times what is live.
//!
//! Record: `len u32 LE | crc32 u32 LE (of the payload) | payload`, the
//! payload JSON (the definitions log) or postcard (a quorum queue's). A record that is cut short or fails its checksum ends the
//! file: it can only be the tail of a write the process did not live to
//! finish (Raft did not count it, since the append was not acknowledged),
//! and it is cut off with a warning.
//!
//! **Group commit.** An append is written at once and acknowledged to
//! Raft only once synced, by a flush round that runs off Raft's task (on
//! tokio's blocking threads): one `fdatasync` covers every append written
//! before it started, so appends that arrive while a round syncs share the
//! next one (`group_commit.rs`, shared with the quorum queues' log). The
//! vote, a truncation and a purge are synced before they return.

// openraft's storage traits return its (large) `StorageError` by value;
// the helpers here return the same so that `?` carries it unchanged.
#![allow(clippy::result_large_err)]
use std::collections::BTreeMap;
use std::fmt::Debug;
use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::ops::RangeBounds;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::{
    AnyError, Entry, LogId, OptionalSend, RaftTypeConfig, StorageError, StorageIOError, Vote,
};
use parking_lot::Mutex;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::group_commit::GroupCommit;
use super::{NodeId, TypeConfig};

/// The Raft type configurations a [`RaftLog`] can hold: the cluster's
/// definitions log and each quorum queue's log share the file format.
pub trait LogConfig: RaftTypeConfig<NodeId = NodeId, Entry = Entry<Self>, D: Clone> {
    /// Records are encoded with postcard rather than JSON: a quorum
    /// queue's entries carry message bodies, which JSON would spend most
    /// of the write on (base64, then escaping).
    const BINARY: bool;
}

impl LogConfig for TypeConfig {
    const BINARY: bool = false;
}

/// Rewrite the file when it is above this size and several times what is
/// live.
const COMPACT_OVER: u64 = 1 << 20;

#[derive(Serialize, Deserialize)]
#[serde(bound(
    serialize = "Entry<C>: Serialize",
    deserialize = "Entry<C>: DeserializeOwned"
))]
enum Record<C: LogConfig> {
    Entry(Entry<C>),
    Vote(Vote<NodeId>),
    Committed(Option<LogId<NodeId>>),
    /// Entries at this index and after are gone.
    Truncate(u64),
    /// Entries up to this one are gone (a snapshot holds them).
    Purge(LogId<NodeId>),
}

struct Inner<C: LogConfig> {
    path: PathBuf,
    file: Arc<File>,
    len: u64,
    /// Bytes of the entry records that are live, for compaction.
    live: u64,
    entries: BTreeMap<u64, (Entry<C>, u64)>,
    vote: Option<Vote<NodeId>>,
    committed: Option<LogId<NodeId>>,
    purged: Option<LogId<NodeId>>,
}

/// The Raft log of this node. Clones share it (one is the log reader
/// Raft's replication tasks read through).
pub struct RaftLog<C: LogConfig = TypeConfig> {
    inner: Arc<Mutex<Inner<C>>>,
    commit: Arc<GroupCommit<LogFlushed<C>>>,
}

impl<C: LogConfig> Clone for RaftLog<C> {
    fn clone(&self) -> Self {
        RaftLog {
            inner: self.inner.clone(),
            commit: self.commit.clone(),
        }
    }
}

fn encode<C: LogConfig>(record: &Record<C>, out: &mut Vec<u8>) -> u64 {
    let payload = if C::BINARY {
        postcard::to_stdvec(record).expect("log records serialize")
    } else {
        serde_json::to_vec(record).expect("log records serialize")
    };
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    (8 + payload.len()) as u64
}

fn write_err(e: std::io::Error) -> StorageError<NodeId> {
    StorageIOError::write_logs(AnyError::new(&e)).into()
}

fn read_err(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::read_logs(AnyError::new(&e)).into()
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

impl<C: LogConfig> RaftLog<C>
where
    Entry<C>: Serialize + DeserializeOwned,
{
    /// Open (creating if need be) the log at `path` and replay it.
    pub fn open(path: &Path) -> std::io::Result<RaftLog<C>> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        let mut inner = Inner {
            path: path.to_owned(),
            file: Arc::new(file),
            len: 0,
            live: 0,
            entries: BTreeMap::new(),
            vote: None,
            committed: None,
            purged: None,
        };
        let mut at = 0usize;
        while at < bytes.len() {
            let Some(record) = decode(&bytes[at..]) else {
                tracing::warn!(
                    file = %path.display(), offset = at, dropped = bytes.len() - at,
                    "Raft log ends in a torn record (a write the process did not finish); cut off"
                );
                inner.file.set_len(at as u64)?;
                inner.file.sync_all()?;
                break;
            };
            let (record, n) = record;
            inner.replay(record, n as u64);
            at += n;
        }
        inner.len = at as u64;
        Ok(RaftLog {
            inner: Arc::new(Mutex::new(inner)),
            commit: Arc::default(),
        })
    }

    /// What the log holds: its vote, commit index, purge point and
    /// entries (to carry a log into another store).
    #[allow(clippy::type_complexity)]
    pub fn state(
        &self,
    ) -> (
        Option<Vote<NodeId>>,
        Option<LogId<NodeId>>,
        Option<LogId<NodeId>>,
        Vec<Entry<C>>,
    ) {
        let inner = self.inner.lock();
        (
            inner.vote,
            inner.committed,
            inner.purged,
            inner.entries.values().map(|(e, _)| e.clone()).collect(),
        )
    }

    /// Entries held (not purged), for status and tests.
    pub fn len(&self) -> usize {
        self.inner.lock().entries.len()
    }

    /// Whether it holds no entries.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Size of the file in bytes.
    pub fn file_bytes(&self) -> u64 {
        self.inner.lock().len
    }

    fn append_records(&self, records: Vec<Record<C>>) -> Result<(), StorageError<NodeId>> {
        self.write_records(records, true)
    }

    /// Write `records` (and sync them, with `sync`).
    fn write_records(
        &self,
        records: Vec<Record<C>>,
        sync: bool,
    ) -> Result<(), StorageError<NodeId>> {
        let mut inner = self.inner.lock();
        let mut buf = Vec::new();
        let mut sizes = Vec::with_capacity(records.len());
        for r in &records {
            sizes.push(encode(r, &mut buf));
        }
        (&*inner.file).write_all(&buf).map_err(write_err)?;
        if sync {
            inner.file.sync_data().map_err(write_err)?;
        }
        inner.len += buf.len() as u64;
        // What was written is applied the way opening the file replays it.
        for (r, n) in records.into_iter().zip(sizes) {
            inner.replay(r, n);
        }
        if inner.len > COMPACT_OVER && inner.len > 4 * inner.live.max(1) {
            inner.compact().map_err(write_err)?;
        }
        Ok(())
    }
}

fn decode<C: LogConfig>(bytes: &[u8]) -> Option<(Record<C>, usize)>
where
    Entry<C>: DeserializeOwned,
{
    let len = u32::from_le_bytes(bytes.get(..4)?.try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(bytes.get(4..8)?.try_into().ok()?);
    let payload = bytes.get(8..8 + len)?;
    if crc32fast::hash(payload) != crc {
        return None;
    }
    let record = if C::BINARY {
        postcard::from_bytes(payload).ok()?
    } else {
        serde_json::from_slice(payload).ok()?
    };
    Some((record, 8 + len))
}

impl<C: LogConfig> Inner<C>
where
    Entry<C>: Serialize + DeserializeOwned,
{
    fn replay(&mut self, record: Record<C>, size: u64) {
        match record {
            Record::Entry(e) => {
                let index = e.log_id.index;
                if let Some((_, old)) = self.entries.insert(index, (e, size)) {
                    self.live -= old;
                }
                self.live += size;
            }
            Record::Vote(v) => self.vote = Some(v),
            Record::Committed(c) => self.committed = c,
            Record::Truncate(since) => {
                for (_, (_, n)) in self.entries.split_off(&since) {
                    self.live -= n;
                }
            }
            Record::Purge(upto) => {
                let keep = self.entries.split_off(&(upto.index + 1));
                for (_, (_, n)) in std::mem::replace(&mut self.entries, keep) {
                    self.live -= n;
                }
                self.purged = Some(upto);
            }
        }
    }

    /// Rewrite the file with only what is live.
    fn compact(&mut self) -> std::io::Result<()> {
        let tmp = self.path.with_extension("compact");
        let mut buf = Vec::new();
        if let Some(v) = &self.vote {
            encode::<C>(&Record::Vote(*v), &mut buf);
        }
        encode::<C>(&Record::Committed(self.committed), &mut buf);
        if let Some(p) = self.purged {
            encode::<C>(&Record::Purge(p), &mut buf);
        }
        for (e, _) in self.entries.values() {
            encode(&Record::Entry(e.clone()), &mut buf);
        }
        let mut f = File::create(&tmp)?;
        f.write_all(&buf)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent() {
            sync_dir(dir)?;
        }
        self.file = Arc::new(OpenOptions::new().append(true).open(&self.path)?);
        self.len = buf.len() as u64;
        tracing::debug!(file = %self.path.display(), bytes = self.len, "Raft log compacted");
        Ok(())
    }
}

impl<C: LogConfig> RaftLogReader<C> for RaftLog<C>
where
    Entry<C>: Serialize + DeserializeOwned,
{
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<C>>, StorageError<NodeId>> {
        let inner = self.inner.lock();
        Ok(inner
            .entries
            .range(range)
            .map(|(_, (e, _))| e.clone())
            .collect())
    }
}

impl<C: LogConfig> RaftLogStorage<C> for RaftLog<C>
where
    Entry<C>: Serialize + DeserializeOwned,
{
    type LogReader = RaftLog<C>;

    async fn get_log_state(&mut self) -> Result<LogState<C>, StorageError<NodeId>> {
        let inner = self.inner.lock();
        let last = inner
            .entries
            .last_key_value()
            .map(|(_, (e, _))| e.log_id)
            .or(inner.purged);
        Ok(LogState {
            last_purged_log_id: inner.purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError<NodeId>> {
        self.append_records(vec![Record::Vote(*vote)])
            .map_err(|e| match e.into_io() {
                Some(io) => StorageIOError::write_vote(AnyError::error(io.to_string())).into(),
                None => StorageIOError::write_vote(AnyError::error("vote not saved")).into(),
            })
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError<NodeId>> {
        Ok(self.inner.lock().vote)
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<NodeId>>,
    ) -> Result<(), StorageError<NodeId>> {
        // Not synced on its own: a commit index that is lost only means the
        // entries are applied again from the snapshot after a restart.
        let mut inner = self.inner.lock();
        let mut buf = Vec::new();
        let n = encode::<C>(&Record::Committed(committed), &mut buf);
        (&*inner.file).write_all(&buf).map_err(write_err)?;
        inner.len += n;
        inner.committed = committed;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError<NodeId>> {
        Ok(self.inner.lock().committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<C>,
    ) -> Result<(), StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<C>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let records: Vec<Record<C>> = entries.into_iter().map(Record::Entry).collect();
        if let Err(e) = self.write_records(records, false) {
            callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
            return Err(e);
        }
        let inner = self.inner.clone();
        self.commit.join(
            callback,
            move || inner.lock().file.clone(),
            |callback, synced| callback.log_io_completed(synced),
        );
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        self.append_records(vec![Record::Truncate(log_id.index)])
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        self.append_records(vec![Record::Purge(log_id)])
    }
}

/// Read one file whole, for the snapshot store; a missing file is `None`.
pub(crate) fn read_optional(path: &Path) -> Result<Option<Vec<u8>>, StorageError<NodeId>> {
    match std::fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(read_err(e)),
    }
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, EntryPayload};

    use super::*;

    fn entry(term: u64, index: u64) -> Entry<TypeConfig> {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(term, 1), index),
            payload: EntryPayload::Blank,
        }
    }

    #[test]
    fn entries_vote_truncate_and_purge_survive_reopening_and_a_torn_tail_is_cut() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("raft.log");
        let log: RaftLog = RaftLog::open(&path).unwrap();
        log.append_records((1..=5).map(|i| Record::Entry(entry(1, i))).collect())
            .unwrap();
        log.append_records(vec![Record::Vote(Vote::new(2, 7))])
            .unwrap();
        log.append_records(vec![Record::Truncate(4)]).unwrap();
        log.append_records(vec![Record::Purge(entry(1, 1).log_id)])
            .unwrap();
        drop(log);
        // A write cut short by a crash.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&[200, 0, 0, 0, 1, 2]).unwrap();
        drop(f);
        let log: RaftLog = RaftLog::open(&path).unwrap();
        let inner = log.inner.lock();
        assert_eq!(inner.entries.keys().copied().collect::<Vec<_>>(), [2, 3]);
        assert_eq!(inner.vote, Some(Vote::new(2, 7)));
        assert_eq!(inner.purged.map(|p| p.index), Some(1));
    }

    #[test]
    fn compaction_keeps_what_is_live() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("raft.log");
        let log: RaftLog = RaftLog::open(&path).unwrap();
        for i in 1..=20_000u64 {
            log.append_records(vec![Record::Entry(entry(1, i))])
                .unwrap();
            if i % 1000 == 0 {
                log.append_records(vec![Record::Purge(entry(1, i - 10).log_id)])
                    .unwrap();
            }
        }
        let bytes = log.file_bytes();
        assert!(bytes < COMPACT_OVER * 2, "compacted: {bytes}");
        drop(log);
        let log: RaftLog = RaftLog::open(&path).unwrap();
        let inner = log.inner.lock();
        assert_eq!(inner.entries.len(), 10);
        assert_eq!(inner.entries.keys().next(), Some(&19_991));
    }
}
