//! The write-ahead log every quorum queue replica on a node shares.
//!
//! A replica per queue with a log file of its own costs a descriptor and
//! a sync stream per queue: a thousand idle queues held a thousand open
//! files per node, and a thousand busy ones a thousand `fdatasync`s per
//! round. RabbitMQ's Ra writes every group of a node through one shared
//! WAL for the same reason. Here the node has one log, and each group's
//! records carry the group's slot (a small number bound to the group's
//! name by an `Open` record), so:
//!
//! * the node holds one descriptor for its quorum logs, however many
//!   queues it holds;
//! * one `fdatasync` makes durable what every group wrote before it
//!   (group commit across queues: a sync is shared by every append and
//!   vote waiting when it starts, which is what lets confirmed throughput
//!   over many queues exceed one queue's);
//! * declaring a queue writes one record instead of creating and syncing
//!   a file.
//!
//! Each group's entries are held in memory, as the single-file log holds
//! its own (Raft's replication reads them back); the file is their
//! durable copy.
//!
//! **Segments.** The log is a sequence of files, `NNNNNNNNNNNNNNNN.wal`.
//! When the newest grows past the segment size a new one is started, and
//! it begins with a checkpoint: every group's vote, commit, purge point
//! and last index. Records in older segments then count only for the
//! entries they hold. A segment none of whose entries is live any more
//! (purged by a snapshot, truncated, or its group deleted) is removed; the
//! oldest, if mostly dead, has its live entries written again into the
//! newest so that it can be. Replay reads the segments in order: a
//! checkpoint drops what it does not list (deleted groups, entries
//! truncated or purged since), and a later version of an entry replaces
//! an earlier one.
//!
//! Record: `len u32 LE | crc32 u32 LE (of the payload) | payload`
//! (postcard), as in the definitions log ([`crate::cluster::log`]). A
//! record cut short or failing its checksum ends the newest segment: it
//! is the tail of a write the process did not live to finish, never
//! acknowledged.

// openraft's storage traits return its (large) `StorageError` by value.
#![allow(clippy::result_large_err)]
use std::collections::{BTreeMap, HashMap};
use std::fmt::Debug;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::ops::RangeBounds;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::{AnyError, Entry, LogId, OptionalSend, StorageError, StorageIOError, Vote};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::QuorumConfig;
use crate::cluster::NodeId;
use crate::cluster::group_commit::GroupCommit;

/// Start a new segment when the newest is past this size.
pub const SEGMENT_BYTES: u64 = 64 << 20;

/// A group's state but its entries, as a checkpoint restates it.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Meta {
    slot: u32,
    group: String,
    vote: Option<Vote<NodeId>>,
    committed: Option<LogId<NodeId>>,
    purged: Option<LogId<NodeId>>,
    /// Entries after this index, in older segments, were truncated.
    last: Option<u64>,
}

#[derive(Serialize, Deserialize)]
enum Record {
    /// `slot` is the group named `group` from here on.
    Open {
        slot: u32,
        group: String,
    },
    Entry {
        slot: u32,
        entry: Entry<QuorumConfig>,
    },
    Vote {
        slot: u32,
        vote: Vote<NodeId>,
    },
    Committed {
        slot: u32,
        committed: Option<LogId<NodeId>>,
    },
    /// The group's entries at this index and after are gone.
    Truncate {
        slot: u32,
        since: u64,
    },
    /// The group's entries up to this one are gone (a snapshot holds them).
    Purge {
        slot: u32,
        upto: LogId<NodeId>,
    },
    /// The group was deleted.
    Drop {
        slot: u32,
    },
    /// Every group there is, at the head of a segment.
    Checkpoint {
        next_slot: u32,
        groups: Vec<Meta>,
    },
}

/// An entry held, and where its record is.
struct Held {
    entry: Entry<QuorumConfig>,
    size: u64,
    segment: u64,
}

/// One group's log as replayed and kept up to date.
struct GroupState {
    slot: u32,
    name: String,
    entries: BTreeMap<u64, Held>,
    vote: Option<Vote<NodeId>>,
    committed: Option<LogId<NodeId>>,
    purged: Option<LogId<NodeId>>,
}

impl GroupState {
    fn new(slot: u32, name: String) -> Self {
        GroupState {
            slot,
            name,
            entries: BTreeMap::new(),
            vote: None,
            committed: None,
            purged: None,
        }
    }

    fn meta(&self) -> Meta {
        Meta {
            slot: self.slot,
            group: self.name.clone(),
            vote: self.vote,
            committed: self.committed,
            purged: self.purged,
            last: self.entries.last_key_value().map(|(i, _)| *i),
        }
    }
}

/// Bytes written to a segment, and how many of them are live entries.
#[derive(Default, Clone, Copy, Debug)]
struct Segment {
    bytes: u64,
    live: u64,
}

type Shared = Arc<Mutex<GroupState>>;

struct Inner {
    dir: PathBuf,
    file: Arc<File>,
    /// The newest segment's number.
    current: u64,
    segments: BTreeMap<u64, Segment>,
    groups: HashMap<u32, Shared>,
    slots: HashMap<String, u32>,
    next_slot: u32,
}

/// What waits for the next sync.
enum Waiter {
    Append(LogFlushed<QuorumConfig>),
    Signal(tokio::sync::oneshot::Sender<std::io::Result<()>>),
}

/// A node's quorum write-ahead log.
pub struct Wal {
    inner: Arc<Mutex<Inner>>,
    commit: Arc<GroupCommit<Waiter>>,
    segment_bytes: u64,
}

impl std::fmt::Debug for Wal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wal")
            .field("dir", &self.inner.lock().dir)
            .finish_non_exhaustive()
    }
}

/// What the log holds, for status and tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WalStats {
    /// Segment files.
    pub segments: usize,
    /// Bytes in them.
    pub bytes: u64,
    /// Bytes of live entries in them.
    pub live: u64,
    /// Groups.
    pub groups: usize,
}

fn segment_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("{n:016}.wal"))
}

fn encode(record: &Record, out: &mut Vec<u8>) -> u64 {
    let payload = postcard::to_stdvec(record).expect("log records serialize");
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    (8 + payload.len()) as u64
}

fn decode(bytes: &[u8]) -> Option<(Record, usize)> {
    let len = u32::from_le_bytes(bytes.get(..4)?.try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(bytes.get(4..8)?.try_into().ok()?);
    let payload = bytes.get(8..8 + len)?;
    if crc32fast::hash(payload) != crc {
        return None;
    }
    Some((postcard::from_bytes(payload).ok()?, 8 + len))
}

fn io_err(e: std::io::Error) -> StorageError<NodeId> {
    StorageIOError::write_logs(AnyError::new(&e)).into()
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

impl Inner {
    fn forget(&mut self, held: &Held) {
        if let Some(s) = self.segments.get_mut(&held.segment) {
            s.live = s.live.saturating_sub(held.size);
        }
    }

    fn group(&self, slot: u32) -> Option<Shared> {
        self.groups.get(&slot).cloned()
    }

    /// Apply `record`, of `size` bytes in segment `segment`, to what is held:
    /// the same whether it was just written or is replayed.
    fn apply(&mut self, record: Record, size: u64, segment: u64) {
        match record {
            Record::Open { slot, group } => {
                self.next_slot = self.next_slot.max(slot + 1);
                self.slots.insert(group.clone(), slot);
                self.groups
                    .insert(slot, Arc::new(Mutex::new(GroupState::new(slot, group))));
            }
            Record::Entry { slot, entry } => {
                let Some(g) = self.group(slot) else {
                    tracing::warn!(slot, "quorum log: an entry of an unknown group; skipped");
                    return;
                };
                let index = entry.log_id.index;
                let old = g.lock().entries.insert(
                    index,
                    Held {
                        entry,
                        size,
                        segment,
                    },
                );
                if let Some(old) = old {
                    self.forget(&old);
                }
                self.segments.entry(segment).or_default().live += size;
            }
            Record::Vote { slot, vote } => {
                if let Some(g) = self.group(slot) {
                    g.lock().vote = Some(vote);
                }
            }
            Record::Committed { slot, committed } => {
                if let Some(g) = self.group(slot) {
                    g.lock().committed = committed;
                }
            }
            Record::Truncate { slot, since } => {
                if let Some(g) = self.group(slot) {
                    let gone = g.lock().entries.split_off(&since);
                    for held in gone.values() {
                        self.forget(held);
                    }
                }
            }
            Record::Purge { slot, upto } => {
                if let Some(g) = self.group(slot) {
                    let gone = purge(&mut g.lock(), upto);
                    for held in gone.values() {
                        self.forget(held);
                    }
                }
            }
            Record::Drop { slot } => self.drop_slot(slot),
            Record::Checkpoint { next_slot, groups } => {
                self.next_slot = self.next_slot.max(next_slot);
                let listed: HashMap<u32, Meta> = groups.into_iter().map(|m| (m.slot, m)).collect();
                let unlisted: Vec<u32> = self
                    .groups
                    .keys()
                    .filter(|s| !listed.contains_key(s))
                    .copied()
                    .collect();
                for slot in unlisted {
                    self.drop_slot(slot);
                }
                for (slot, meta) in listed {
                    self.next_slot = self.next_slot.max(slot + 1);
                    let g = self
                        .groups
                        .entry(slot)
                        .or_insert_with(|| {
                            Arc::new(Mutex::new(GroupState::new(slot, meta.group.clone())))
                        })
                        .clone();
                    self.slots.insert(meta.group.clone(), slot);
                    let mut gone = Vec::new();
                    {
                        let mut g = g.lock();
                        g.vote = meta.vote;
                        g.committed = meta.committed;
                        if let Some(upto) = meta.purged {
                            gone.extend(purge(&mut g, upto).into_values());
                        }
                        g.purged = meta.purged;
                        let after = meta.last.map_or(0, |l| l + 1);
                        gone.extend(g.entries.split_off(&after).into_values());
                    }
                    for held in &gone {
                        self.forget(held);
                    }
                }
            }
        }
    }

    fn drop_slot(&mut self, slot: u32) {
        if let Some(g) = self.groups.remove(&slot) {
            let g = std::mem::replace(&mut *g.lock(), GroupState::new(slot, String::new()));
            if self.slots.get(&g.name) == Some(&slot) {
                self.slots.remove(&g.name);
            }
            for held in g.entries.values() {
                self.forget(held);
            }
        }
    }

    /// Write `records` to the newest segment and apply them.
    fn write(&mut self, records: Vec<Record>) -> std::io::Result<()> {
        let mut buf = Vec::new();
        let sizes: Vec<u64> = records.iter().map(|r| encode(r, &mut buf)).collect();
        (&*self.file).write_all(&buf)?;
        let current = self.current;
        self.segments.entry(current).or_default().bytes += buf.len() as u64;
        for (r, n) in records.into_iter().zip(sizes) {
            self.apply(r, n, current);
        }
        Ok(())
    }

    fn checkpoint(&self) -> Record {
        let mut groups: Vec<Meta> = self.groups.values().map(|g| g.lock().meta()).collect();
        groups.sort_by_key(|m| m.slot);
        Record::Checkpoint {
            next_slot: self.next_slot,
            groups,
        }
    }

    /// Start a new segment (its head a checkpoint), then remove the
    /// segments no live entry needs, moving the oldest's live entries
    /// forward first if most of it is dead.
    fn roll(&mut self) -> std::io::Result<()> {
        self.file.sync_data()?;
        let next = self.current + 1;
        let path = segment_path(&self.dir, next);
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(&path)?;
        file.set_len(0)?;
        self.file = Arc::new(file);
        self.current = next;
        self.segments.insert(next, Segment::default());
        self.write(vec![self.checkpoint()])?;
        self.file.sync_data()?;
        sync_dir(&self.dir)?;
        if let Some((&oldest, seg)) = self.segments.iter().next()
            && oldest != self.current
            && seg.live > 0
            && seg.live * 2 < seg.bytes
        {
            self.relocate(oldest)?;
        }
        let dead: Vec<u64> = self
            .segments
            .iter()
            .filter(|(n, s)| **n != self.current && s.live == 0)
            .map(|(n, _)| *n)
            .collect();
        for n in dead {
            std::fs::remove_file(segment_path(&self.dir, n))?;
            self.segments.remove(&n);
        }
        Ok(())
    }

    /// Write segment `n`'s live entries again into the newest one.
    fn relocate(&mut self, n: u64) -> std::io::Result<()> {
        let mut records = Vec::new();
        for g in self.groups.values() {
            let g = g.lock();
            for held in g.entries.values().filter(|h| h.segment == n) {
                records.push(Record::Entry {
                    slot: g.slot,
                    entry: held.entry.clone(),
                });
            }
        }
        let moved = records.len();
        self.write(records)?;
        self.file.sync_data()?;
        tracing::debug!(
            segment = n,
            entries = moved,
            "quorum log: live entries moved forward"
        );
        Ok(())
    }
}

/// Drop `g`'s entries up to `upto`; returns them.
fn purge(g: &mut GroupState, upto: LogId<NodeId>) -> BTreeMap<u64, Held> {
    let keep = g.entries.split_off(&(upto.index + 1));
    g.purged = Some(upto);
    std::mem::replace(&mut g.entries, keep)
}

impl Wal {
    /// Open (creating if need be) the log in `dir` and replay it.
    pub fn open(dir: &Path) -> std::io::Result<Arc<Wal>> {
        Wal::open_with(dir, SEGMENT_BYTES)
    }

    /// [`Wal::open`], starting new segments past `segment_bytes`.
    pub fn open_with(dir: &Path, segment_bytes: u64) -> std::io::Result<Arc<Wal>> {
        std::fs::create_dir_all(dir)?;
        let mut numbers: Vec<u64> = std::fs::read_dir(dir)?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                name.strip_suffix(".wal")?.parse().ok()
            })
            .collect();
        numbers.sort_unstable();
        let current = numbers.last().copied().unwrap_or(1);
        let file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(segment_path(dir, current))?;
        let mut inner = Inner {
            dir: dir.to_owned(),
            file: Arc::new(file),
            current,
            segments: BTreeMap::new(),
            groups: HashMap::new(),
            slots: HashMap::new(),
            next_slot: 0,
        };
        for n in &numbers {
            let path = segment_path(dir, *n);
            let mut bytes = Vec::new();
            File::open(&path)?.read_to_end(&mut bytes)?;
            inner.segments.insert(*n, Segment::default());
            let mut at = 0usize;
            while at < bytes.len() {
                let Some((record, size)) = decode(&bytes[at..]) else {
                    tracing::warn!(
                        file = %path.display(), offset = at, dropped = bytes.len() - at,
                        "quorum log ends in a torn record (a write the process did not finish); cut off"
                    );
                    if *n == current {
                        inner.file.set_len(at as u64)?;
                        inner.file.sync_all()?;
                    }
                    break;
                };
                inner.apply(record, size as u64, *n);
                at += size;
            }
            inner.segments.entry(*n).or_default().bytes = at as u64;
        }
        // Every segment begins with a checkpoint, so that the ones before
        // it may go: a new log, or a segment a crash left empty (its
        // checkpoint was not synced, so it was cut off above), gets one.
        if inner.segments.get(&current).is_none_or(|s| s.bytes == 0) {
            inner.segments.insert(current, Segment::default());
            inner.write(vec![inner.checkpoint()])?;
            inner.file.sync_data()?;
            sync_dir(dir)?;
        }
        Ok(Arc::new(Wal {
            inner: Arc::new(Mutex::new(inner)),
            commit: Arc::default(),
            segment_bytes,
        }))
    }

    /// The log of group `name`, created (empty) if there is none.
    pub fn group(self: &Arc<Self>, name: &str) -> Result<GroupLog, StorageError<NodeId>> {
        let mut inner = self.inner.lock();
        let slot = match inner.slots.get(name) {
            Some(s) => *s,
            None => {
                let slot = inner.next_slot;
                inner
                    .write(vec![Record::Open {
                        slot,
                        group: name.to_owned(),
                    }])
                    .map_err(io_err)?;
                slot
            }
        };
        let state = inner.group(slot).expect("an open group is held");
        Ok(GroupLog {
            wal: self.clone(),
            slot,
            state,
        })
    }

    /// Whether group `name` has a log here.
    pub fn has_group(&self, name: &str) -> bool {
        self.inner.lock().slots.contains_key(name)
    }

    /// Delete group `name`'s log (its queue was deleted, or this node left
    /// its group).
    pub fn drop_group(&self, name: &str) -> std::io::Result<()> {
        let mut inner = self.inner.lock();
        if let Some(slot) = inner.slots.get(name).copied() {
            inner.write(vec![Record::Drop { slot }])?;
        }
        Ok(())
    }

    /// Write `name`'s log as an older node kept it in a file of its own
    /// (vote, commit, purge point, entries), durably, so that the file can
    /// go. Any log the group already has here is replaced.
    pub fn adopt(
        self: &Arc<Self>,
        name: &str,
        vote: Option<Vote<NodeId>>,
        committed: Option<LogId<NodeId>>,
        purged: Option<LogId<NodeId>>,
        entries: Vec<Entry<QuorumConfig>>,
    ) -> std::io::Result<()> {
        let mut inner = self.inner.lock();
        if let Some(slot) = inner.slots.get(name).copied() {
            inner.write(vec![Record::Drop { slot }])?;
        }
        let slot = inner.next_slot;
        let mut records = vec![Record::Open {
            slot,
            group: name.to_owned(),
        }];
        records.extend(vote.map(|vote| Record::Vote { slot, vote }));
        records.push(Record::Committed { slot, committed });
        records.extend(purged.map(|upto| Record::Purge { slot, upto }));
        records.extend(
            entries
                .into_iter()
                .map(|entry| Record::Entry { slot, entry }),
        );
        inner.write(records)?;
        inner.file.sync_data()
    }

    /// What the log holds.
    pub fn stats(&self) -> WalStats {
        let inner = self.inner.lock();
        WalStats {
            segments: inner.segments.len(),
            bytes: inner.segments.values().map(|s| s.bytes).sum(),
            live: inner.segments.values().map(|s| s.live).sum(),
            groups: inner.groups.len(),
        }
    }

    /// Write `records`, starting a new segment after them if the newest is
    /// full.
    fn write(&self, records: Vec<Record>) -> Result<(), StorageError<NodeId>> {
        let mut inner = self.inner.lock();
        inner.write(records).map_err(io_err)?;
        if inner.segments.get(&inner.current).map_or(0, |s| s.bytes) > self.segment_bytes {
            inner.roll().map_err(io_err)?;
        }
        Ok(())
    }

    /// Answer `waiter` once a sync covers what was written before.
    fn sync_later(&self, waiter: Waiter) {
        let inner = self.inner.clone();
        self.commit.join(
            waiter,
            move || inner.lock().file.clone(),
            |waiter, synced| match waiter {
                Waiter::Append(callback) => callback.log_io_completed(synced),
                Waiter::Signal(tx) => {
                    let _ = tx.send(synced);
                }
            },
        );
    }

    /// Write `records` and return once they are durable (with whatever
    /// else the same sync covers).
    async fn write_synced(
        self: &Arc<Self>,
        records: Vec<Record>,
    ) -> Result<(), StorageError<NodeId>> {
        self.write(records)?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.sync_later(Waiter::Signal(tx));
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(io_err(e)),
            Err(_) => Err(io_err(std::io::Error::other("quorum log sync abandoned"))),
        }
    }
}

/// One group's log in the node's [`Wal`]: what its Raft instance stores
/// through. Clones share it.
#[derive(Clone)]
pub struct GroupLog {
    wal: Arc<Wal>,
    slot: u32,
    state: Shared,
}

impl GroupLog {
    /// Entries held (not purged).
    pub fn len(&self) -> usize {
        self.state.lock().entries.len()
    }

    /// Whether it holds no entries.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl RaftLogReader<QuorumConfig> for GroupLog {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<QuorumConfig>>, StorageError<NodeId>> {
        let state = self.state.lock();
        Ok(state
            .entries
            .range(range)
            .map(|(_, h)| h.entry.clone())
            .collect())
    }
}

impl RaftLogStorage<QuorumConfig> for GroupLog {
    type LogReader = GroupLog;

    async fn get_log_state(&mut self) -> Result<LogState<QuorumConfig>, StorageError<NodeId>> {
        let state = self.state.lock();
        let last = state
            .entries
            .last_key_value()
            .map(|(_, h)| h.entry.log_id)
            .or(state.purged);
        Ok(LogState {
            last_purged_log_id: state.purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError<NodeId>> {
        // Votes of many groups (a failover moves them all) share a sync.
        let slot = self.slot;
        self.wal
            .write_synced(vec![Record::Vote { slot, vote: *vote }])
            .await
            .map_err(|e| {
                StorageIOError::write_vote(AnyError::error(format!("vote not saved: {e}"))).into()
            })
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError<NodeId>> {
        Ok(self.state.lock().vote)
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<NodeId>>,
    ) -> Result<(), StorageError<NodeId>> {
        // Not synced on its own: a commit index that is lost only means the
        // entries are applied again from the snapshot after a restart.
        let slot = self.slot;
        self.wal.write(vec![Record::Committed { slot, committed }])
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError<NodeId>> {
        Ok(self.state.lock().committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<QuorumConfig>,
    ) -> Result<(), StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<QuorumConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let slot = self.slot;
        let records: Vec<Record> = entries
            .into_iter()
            .map(|entry| Record::Entry { slot, entry })
            .collect();
        if let Err(e) = self.wal.write(records) {
            callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
            return Err(e);
        }
        self.wal.sync_later(Waiter::Append(callback));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        let slot = self.slot;
        self.wal
            .write_synced(vec![Record::Truncate {
                slot,
                since: log_id.index,
            }])
            .await
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        // A purge lost in a crash only means entries a snapshot already
        // covers are read again: no sync of its own.
        let slot = self.slot;
        self.wal.write(vec![Record::Purge { slot, upto: log_id }])
    }
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, EntryPayload};

    use super::*;

    fn entry(term: u64, index: u64) -> Entry<QuorumConfig> {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(term, 1), index),
            payload: EntryPayload::Blank,
        }
    }

    fn append(log: &GroupLog, term: u64, indexes: impl IntoIterator<Item = u64>) {
        let slot = log.slot;
        log.wal
            .write(
                indexes
                    .into_iter()
                    .map(|i| Record::Entry {
                        slot,
                        entry: entry(term, i),
                    })
                    .collect(),
            )
            .unwrap();
    }

    fn held(wal: &Arc<Wal>, name: &str) -> Vec<(u64, u64)> {
        let log = wal.group(name).unwrap();
        let state = log.state.lock();
        state
            .entries
            .values()
            .map(|h| (h.entry.log_id.index, h.entry.log_id.leader_id.term))
            .collect()
    }

    fn files(dir: &Path) -> usize {
        std::fs::read_dir(dir).unwrap().count()
    }

    #[tokio::test]
    async fn groups_share_one_file_and_their_logs_survive_reopening() {
        let tmp = tempfile::tempdir().unwrap();
        let wal = Wal::open(tmp.path()).unwrap();
        let mut logs: Vec<GroupLog> = (0..50)
            .map(|i| wal.group(&format!("q{i}")).unwrap())
            .collect();
        for (i, log) in logs.iter().enumerate() {
            append(log, 1, 1..=(i as u64 % 5 + 1));
        }
        logs[3].save_vote(&Vote::new(4, 2)).await.unwrap();
        logs[7]
            .truncate(LogId::new(CommittedLeaderId::new(1, 1), 2))
            .await
            .unwrap();
        logs[9]
            .purge(LogId::new(CommittedLeaderId::new(1, 1), 3))
            .await
            .unwrap();
        wal.drop_group("q11").unwrap();
        logs[12]
            .save_committed(Some(LogId::new(CommittedLeaderId::new(1, 1), 1)))
            .await
            .unwrap();
        logs[1].save_vote(&Vote::new(1, 1)).await.unwrap();
        assert_eq!(files(tmp.path()), 1, "one file for fifty groups");
        drop(logs);
        drop(wal);

        let wal = Wal::open(tmp.path()).unwrap();
        assert_eq!(wal.stats().groups, 49);
        assert!(!wal.has_group("q11"));
        assert_eq!(held(&wal, "q4"), [(1, 1), (2, 1), (3, 1), (4, 1), (5, 1)]);
        assert_eq!(held(&wal, "q7"), [(1, 1)]);
        assert_eq!(held(&wal, "q9"), [(4, 1), (5, 1)]);
        let mut q3 = wal.group("q3").unwrap();
        assert_eq!(q3.read_vote().await.unwrap(), Some(Vote::new(4, 2)));
        let mut q9 = wal.group("q9").unwrap();
        assert_eq!(
            q9.get_log_state()
                .await
                .unwrap()
                .last_purged_log_id
                .map(|l| l.index),
            Some(3)
        );
        let mut q12 = wal.group("q12").unwrap();
        assert_eq!(
            q12.read_committed().await.unwrap().map(|l| l.index),
            Some(1)
        );
    }

    #[test]
    fn a_torn_tail_is_cut_and_what_came_before_it_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let wal = Wal::open(tmp.path()).unwrap();
        append(&wal.group("a").unwrap(), 1, 1..=3);
        drop(wal);
        let path = segment_path(tmp.path(), 1);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&[200, 0, 0, 0, 1, 2]).unwrap();
        drop(f);
        let wal = Wal::open(tmp.path()).unwrap();
        assert_eq!(held(&wal, "a"), [(1, 1), (2, 1), (3, 1)]);
        append(&wal.group("a").unwrap(), 1, [4]);
        drop(wal);
        let wal = Wal::open(tmp.path()).unwrap();
        assert_eq!(held(&wal, "a").len(), 4, "appends after the cut replay");
    }

    /// Segments roll, dead ones go, the oldest's live entries move forward,
    /// and replay after all of that gives back exactly what was live:
    /// truncations and deleted groups whose records were in removed
    /// segments do not come back.
    #[test]
    fn segments_roll_and_go_without_bringing_back_what_was_gone() {
        let tmp = tempfile::tempdir().unwrap();
        let wal = Wal::open_with(tmp.path(), 16 << 10).unwrap();
        let busy = wal.group("busy").unwrap();
        let idle = wal.group("idle").unwrap();
        let gone = wal.group("gone").unwrap();
        let cut = wal.group("cut").unwrap();
        append(&idle, 1, 1..=3);
        append(&gone, 1, 1..=3);
        append(&cut, 1, 1..=10);
        // `cut` loses 6..=10 to a new leader, which writes 6 in term 2.
        wal.write(vec![Record::Truncate {
            slot: cut.slot,
            since: 6,
        }])
        .unwrap();
        append(&cut, 2, [6]);
        wal.drop_group("gone").unwrap();
        for i in 1..=4000u64 {
            append(&busy, 1, [i]);
            if i % 100 == 0 {
                wal.write(vec![Record::Purge {
                    slot: busy.slot,
                    upto: LogId::new(CommittedLeaderId::new(1, 1), i - 10),
                }])
                .unwrap();
            }
        }
        let stats = wal.stats();
        assert!(stats.segments <= 3, "dead segments removed: {stats:?}");
        assert!(stats.bytes < 64 << 10, "{stats:?}");
        drop((busy, idle, gone, cut));
        drop(wal);

        let wal = Wal::open_with(tmp.path(), 16 << 10).unwrap();
        assert_eq!(
            held(&wal, "idle"),
            [(1, 1), (2, 1), (3, 1)],
            "moved forward, kept"
        );
        assert_eq!(
            held(&wal, "cut"),
            [(1, 1), (2, 1), (3, 1), (4, 1), (5, 1), (6, 2)]
        );
        assert!(!wal.has_group("gone"));
        let busy = held(&wal, "busy");
        assert_eq!(busy.first(), Some(&(3991, 1)));
        assert_eq!(busy.len(), 10);
        let stats = wal.stats();
        assert_eq!(stats.groups, 3);
    }

    #[test]
    fn a_log_of_its_own_is_adopted_whole() {
        let tmp = tempfile::tempdir().unwrap();
        let wal = Wal::open(tmp.path()).unwrap();
        append(&wal.group("x").unwrap(), 1, [1]);
        wal.adopt(
            "x",
            Some(Vote::new(3, 1)),
            None,
            Some(LogId::new(CommittedLeaderId::new(1, 1), 4)),
            (5..=7).map(|i| entry(2, i)).collect(),
        )
        .unwrap();
        drop(wal);
        let wal = Wal::open(tmp.path()).unwrap();
        assert_eq!(held(&wal, "x"), [(5, 2), (6, 2), (7, 2)]);
    }
}
