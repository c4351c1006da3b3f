//! One durable queue's log: append-only segment files of message records,
//! each with an ack file of the records settled since.
//!
//! ```text
//! queues/<id>/0000000001.seg   header | record | record | ...
//! queues/<id>/0000000001.ack   header | offset+crc | offset+crc | ...
//! queues/<id>/0000000002.seg   (the active segment: appends go here)
//! ```
//!
//! Why this shape (LavinMQ's, for the same reasons):
//!
//! * **Appends only.** Records are appended at the end of the active
//!   segment, acks (8 bytes each) at the end of an ack file. Nothing is
//!   rewritten in place, so a crash can only tear the last write of a
//!   file, and recovery finds it by checksum.
//! * **Buffered, then written and synced in groups.** A publish encodes
//!   its record into the log's pending buffer, in memory, and takes a sync
//!   ticket; the [`Syncer`] thread writes each dirty log's
//!   pending records with one `pwrite` per segment, `fdatasync`s it, and
//!   only then are the publishes confirmed. Publishing connections never
//!   touch the file: on ext4, `fdatasync` of a growing file holds the
//!   inode lock while it writes the inode, and an append made on a tokio
//!   worker meanwhile stalled that worker and every connection on it for
//!   milliseconds (the persistent p99 in `docs/performance.md`). Records
//!   not written yet are read back from the buffer.
//! * **Acks are written at once** (one `pwrite` per run of acks), but are
//!   not synced with the group commit: nothing waits for them, and a lost
//!   ack only means a redelivery.
//! * **Reclaimed by segment.** When every record of a segment (not the
//!   active one) is acked, the segment and its ack file are deleted; disk
//!   use falls as a backlog drains, whatever order messages are acked in.
//! * **Read back by offset.** A message paged out of memory is read with
//!   one `pread` at its [`StoreRef`].
//!
//! An ack file also records **returns** (a delivery given back to the
//! queue, in a queue with a delivery limit): the same 8-byte entry with
//! the offset's top bit set ([`record::RETURNED`]; offsets stay below
//! 2 GiB). They settle nothing; at recovery each message comes back with
//! its count, so `x-delivery-limit` holds across a restart. A broker that
//! does not know them reads them as acks of offsets where no record is,
//! which settle nothing either.
//!
//! A segment is synced before the next one is started, so a torn write is
//! always in the last segment: recovery truncates it there and warns. A bad
//! record anywhere else is corruption, reported with its file and offset.

use std::collections::{BTreeMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{BufReader, ErrorKind, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use parking_lot::Mutex;

use super::record::{self, ACK_LEN, ACK_MAGIC, HEADER_LEN, RECORD_HEADER_LEN, SEGMENT_MAGIC};
use super::{StoreError, Syncer, sync_dir};
use crate::message::Message;

pub use record::RecordMeta;

/// Where a stored message is: segment, byte offset of its record, payload
/// length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoreRef {
    /// Segment number.
    pub segment: u32,
    /// Offset of the record header in the segment.
    pub offset: u32,
    /// Payload length.
    pub len: u32,
}

/// A message found at recovery, not yet acked.
#[derive(Clone, Copy, Debug)]
pub struct Recovered {
    /// Where it is.
    pub stored: StoreRef,
    /// Its size and timing.
    pub meta: RecordMeta,
    /// How often it was returned to its queue (recorded in queues with a
    /// delivery limit).
    pub returns: u32,
}

/// What an ack file holds: the offsets settled, and how often each
/// returned one was.
#[derive(Default)]
struct Settled {
    acked: HashSet<u32>,
    returned: std::collections::HashMap<u32, u32>,
}

struct Segment {
    /// The segment file; `None` until the sync thread creates it (after
    /// syncing the previous segment).
    file: Option<Arc<File>>,
    /// Records written.
    messages: u32,
    /// Records acked.
    acked: u32,
    /// The ack file and its length, opened on the first ack.
    acks: Option<(Arc<File>, u64)>,
}

/// Records appended to one segment and not yet written to its file.
#[derive(Clone)]
struct Chunk {
    segment: u32,
    /// Where in the segment the first record goes.
    offset: u64,
    bytes: Vec<u8>,
}

impl Chunk {
    fn holds(&self, r: StoreRef) -> bool {
        r.segment == self.segment
            && u64::from(r.offset) >= self.offset
            && u64::from(r.offset) < self.offset + self.bytes.len() as u64
    }

    /// The record at `r`, header included.
    fn record(&self, r: StoreRef) -> &[u8] {
        let at = (u64::from(r.offset) - self.offset) as usize;
        &self.bytes[at..at + RECORD_HEADER_LEN + r.len as usize]
    }
}

struct Inner {
    segments: BTreeMap<u32, Segment>,
    active: u32,
    /// Logical length of the active segment, pending records included.
    active_len: u64,
    deleted: bool,
    /// Appended records the sync thread has not taken yet, in order.
    pending: Vec<Chunk>,
    /// Records the sync thread is writing now (readable until written).
    writing: Arc<Vec<Chunk>>,
    /// An emptied buffer to reuse for the next chunk.
    spare: Vec<u8>,
}

/// A durable queue's log.
pub struct QueueLog {
    dir: PathBuf,
    /// Whether `dir` exists. A queue's folder and first segment are made by
    /// its first persistent message, not by its declaration: a durable
    /// queue that only ever carries transient messages (or none yet) costs
    /// no directory, no file and no open descriptor, so a broker can hold
    /// 100k of them under an ordinary descriptor limit.
    dir_made: AtomicBool,
    sync: Arc<Syncer>,
    segment_bytes: u64,
    inner: Mutex<Inner>,
    /// A deduplicating queue's ids waiting to be written (see `ids`).
    ids_pending: Mutex<super::ids::IdsPending>,
    /// Its ids file, written by the sync thread; and the ids read from it
    /// at start-up, until the queue takes them.
    ids: Mutex<(super::ids::IdsFile, Vec<(crate::dedup::Key, u64)>)>,
}

impl std::fmt::Debug for QueueLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueLog")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

fn seg_path(dir: &Path, id: u32) -> PathBuf {
    dir.join(format!("{id:010}.seg"))
}

fn ack_path(dir: &Path, id: u32) -> PathBuf {
    dir.join(format!("{id:010}.ack"))
}

/// A mapper of an IO error on `path` into the store's error.
pub(super) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Open an existing file for reading and writing.
pub(super) fn open_rw(path: &Path) -> Result<File, StoreError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(io(path))
}

/// Read every ack entry of a segment's ack file. Ack files are not synced
/// with the group commit (nothing waits for an ack), so after a power loss
/// any of their unsynced tail may be missing or torn: the first bad entry
/// ends the file, with a warning naming it; the acks after it are dropped
/// and their messages come back, marked redelivered (at least once, never
/// lost). The file itself is created without a sync, so a header that
/// never reached the disk (not our magic) drops its acks the same way; a
/// header of another format version is an error.
fn read_acks(path: &Path) -> Result<(Settled, Option<u64>), StoreError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok((Settled::default(), None)),
        Err(e) => return Err(io(path)(e)),
    };
    if bytes.len() < HEADER_LEN as usize {
        // Created but its header never reached the disk: no acks in it.
        return Ok((Settled::default(), Some(0)));
    }
    if &bytes[..8] != ACK_MAGIC {
        let w = "bad magic";
        // Ack files are created and written without a sync: after a crash
        // the header may not have reached the disk. Its acks are lost (the
        // messages come back, marked redelivered); nothing is corrupt.
        tracing::warn!(file = %path.display(), "ack file header unreadable ({w}); its acks are dropped and their messages will be redelivered");
        let f = open_rw(path)?;
        f.set_len(0).map_err(io(path))?;
        f.write_all_at(&record::file_header(ACK_MAGIC), 0)
            .map_err(io(path))?;
        return Ok((Settled::default(), Some(HEADER_LEN)));
    }
    record::check_header(&bytes, ACK_MAGIC).map_err(|what| StoreError::Corrupt {
        path: path.to_owned(),
        offset: 0,
        what,
    })?;
    let mut settled = Settled::default();
    let mut at = HEADER_LEN as usize;
    while at < bytes.len() {
        let entry = bytes.get(at..at + ACK_LEN);
        if entry.is_some_and(|e| e.iter().all(|&b| b == 0)) {
            // A hole: runs of acks are written outside the log's lock, so
            // a later run can reach the file before an earlier one that
            // the process did not live to write. (No real entry is all
            // zeros: its CRC would not match.)
            at += ACK_LEN;
            continue;
        }
        match entry.and_then(record::decode_ack) {
            Some(entry) if entry & record::RETURNED != 0 => {
                *settled
                    .returned
                    .entry(entry & !record::RETURNED)
                    .or_default() += 1;
                at += ACK_LEN;
            }
            Some(offset) => {
                settled.acked.insert(offset);
                at += ACK_LEN;
            }
            None => {
                let dropped = (bytes.len() - at).div_ceil(ACK_LEN);
                tracing::warn!(
                    file = %path.display(), offset = at, dropped,
                    "bad ack entry (torn or unsynced before a crash); the acks from here on are dropped and their messages will be redelivered"
                );
                let f = open_rw(path)?;
                f.set_len(at as u64).map_err(io(path))?;
                f.sync_data().map_err(io(path))?;
                break;
            }
        }
    }
    Ok((settled, Some(at as u64)))
}

impl QueueLog {
    /// Open (creating if need be) the log in `dir` and recover the messages
    /// it holds that were never acked, in the order they were written.
    pub(crate) fn open(
        dir: PathBuf,
        sync: Arc<Syncer>,
        segment_bytes: u64,
    ) -> Result<(QueueLog, Vec<Recovered>), StoreError> {
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => Some(entries),
            Err(e) if e.kind() == ErrorKind::NotFound => None,
            Err(e) => return Err(io(&dir)(e)),
        };
        let dir_made = entries.is_some();
        let mut ids: Vec<u32> = entries
            .into_iter()
            .flatten()
            .filter_map(|e| {
                let name = e.ok()?.file_name();
                name.to_str()?.strip_suffix(".seg")?.parse().ok()
            })
            .collect();
        ids.sort_unstable();
        let mut segments = BTreeMap::new();
        let mut recovered = Vec::new();
        let mut active_len = HEADER_LEN;
        for (i, &id) in ids.iter().enumerate() {
            let last = i + 1 == ids.len();
            let path = seg_path(&dir, id);
            let (settled, ack_len) = read_acks(&ack_path(&dir, id))?;
            let (seg, len) = Self::recover_segment(&path, id, last, &settled, &mut recovered)?;
            let mut seg = seg;
            if let Some(len) = ack_len {
                let p = ack_path(&dir, id);
                seg.acks = Some((Arc::new(open_rw(&p)?), len.max(HEADER_LEN)));
                if len < HEADER_LEN {
                    let (f, _) = seg.acks.as_ref().expect("just set");
                    f.write_all_at(&record::file_header(ACK_MAGIC), 0)
                        .map_err(io(&p))?;
                }
            }
            if !last && seg.acked >= seg.messages {
                remove_segment(&dir, id);
                continue;
            }
            if last {
                active_len = len;
            }
            segments.insert(id, seg);
        }
        let active = match ids.last() {
            Some(&id) if segments.contains_key(&id) => id,
            _ => {
                // Its file is made by the sync thread with the first write.
                let id = ids.last().map_or(1, |l| l + 1);
                segments.insert(id, Segment::new(None));
                active_len = HEADER_LEN;
                id
            }
        };
        let (ids_file, ids) = super::ids::IdsFile::open(&dir)?;
        let log = QueueLog {
            ids_pending: Mutex::new(super::ids::IdsPending::default()),
            ids: Mutex::new((ids_file, ids)),
            dir,
            dir_made: AtomicBool::new(dir_made),
            sync,
            segment_bytes,
            inner: Mutex::new(Inner {
                segments,
                active,
                active_len,
                deleted: false,
                pending: Vec::new(),
                writing: Arc::default(),
                spare: Vec::new(),
            }),
        };
        Ok((log, recovered))
    }

    fn recover_segment(
        path: &Path,
        id: u32,
        last: bool,
        settled: &Settled,
        out: &mut Vec<Recovered>,
    ) -> Result<(Segment, u64), StoreError> {
        let file = open_rw(path)?;
        let file_len = file.metadata().map_err(io(path))?.len();
        let corrupt = |offset: u64, what: &str| StoreError::Corrupt {
            path: path.to_owned(),
            offset,
            what: what.to_owned(),
        };
        let torn = |offset: u64, what: &str| -> Result<u64, StoreError> {
            if !last {
                return Err(corrupt(offset, what));
            }
            tracing::warn!(file = %path.display(), offset, "{what} at the tail (torn write); truncated");
            file.set_len(offset).map_err(io(path))?;
            if offset < HEADER_LEN {
                file.set_len(0).map_err(io(path))?;
                file.write_all_at(&record::file_header(SEGMENT_MAGIC), 0)
                    .map_err(io(path))?;
            }
            file.sync_data().map_err(io(path))?;
            Ok(offset.max(HEADER_LEN))
        };
        let mut seg = Segment::new(Some(file.try_clone().map_err(io(path))?));
        let mut reader = BufReader::with_capacity(1 << 20, &file);
        let mut header = [0u8; HEADER_LEN as usize];
        if let Err(e) = reader.read_exact(&mut header) {
            if e.kind() != ErrorKind::UnexpectedEof {
                return Err(io(path)(e));
            }
            let len = torn(0, "segment header missing")?;
            return Ok((seg, len));
        }
        record::check_header(&header, SEGMENT_MAGIC).map_err(|w| corrupt(0, &w))?;
        let mut at = HEADER_LEN;
        let mut payload = Vec::new();
        let end = loop {
            if at == file_len {
                break at;
            }
            let mut h = [0u8; RECORD_HEADER_LEN];
            if reader.read_exact(&mut h).is_err() {
                break torn(at, "record header cut short")?;
            }
            let (len, crc) = record::record_header(&h);
            let record_end = at + RECORD_HEADER_LEN as u64 + u64::from(len);
            if len > record::MAX_RECORD || record_end > file_len {
                break torn(at, "record cut short")?;
            }
            payload.resize(len as usize, 0);
            reader.read_exact(&mut payload).map_err(io(path))?;
            let meta = if record::crc_ok(&payload, crc) {
                record::decode_meta(&payload).map_err(|w| corrupt(at, &w))?
            } else if record_end == file_len {
                break torn(at, "record checksum mismatch")?;
            } else {
                return Err(corrupt(at, "record checksum mismatch"));
            };
            let offset = at as u32;
            seg.messages += 1;
            if settled.acked.contains(&offset) {
                seg.acked += 1;
            } else {
                out.push(Recovered {
                    stored: StoreRef {
                        segment: id,
                        offset,
                        len,
                    },
                    meta,
                    returns: settled.returned.get(&offset).copied().unwrap_or(0),
                });
            }
            at = record_end;
        };
        Ok((seg, end))
    }

    /// Append `m`; returns where it is and the sync ticket that covers it.
    /// The record is buffered here; the sync thread writes and syncs it.
    pub fn append(
        self: &Arc<Self>,
        m: &Message,
        meta: RecordMeta,
    ) -> Result<(StoreRef, u64), StoreError> {
        let n = record::encoded_len(m, meta) as u64;
        let mut inner = self.inner.lock();
        if inner.deleted {
            return Err(StoreError::Deleted);
        }
        if inner.active_len + n > self.segment_bytes && inner.segments[&inner.active].messages > 0 {
            self.roll(&mut inner);
        }
        let (id, at) = (inner.active, inner.active_len);
        let inner = &mut *inner;
        let chunk = match inner.pending.last_mut() {
            Some(c) if c.segment == id => c,
            _ => {
                let bytes = std::mem::take(&mut inner.spare);
                inner.pending.push(Chunk {
                    segment: id,
                    offset: at,
                    bytes,
                });
                inner.pending.last_mut().expect("just pushed")
            }
        };
        let before = chunk.bytes.len();
        record::encode_message(&mut chunk.bytes, m, meta);
        debug_assert_eq!((chunk.bytes.len() - before) as u64, n);
        inner.active_len += n;
        inner
            .segments
            .get_mut(&id)
            .expect("active segment")
            .messages += 1;
        let ticket = self.sync.wrote(self);
        let stored = StoreRef {
            segment: id,
            offset: at as u32,
            len: (n as usize - RECORD_HEADER_LEN) as u32,
        };
        Ok((stored, ticket))
    }

    /// Start a new active segment. Only its number is taken here: the
    /// sync thread creates its file after syncing the old one, so that a
    /// torn write can only ever be in the last segment.
    fn roll(&self, inner: &mut Inner) {
        let old = inner.active;
        let id = old + 1;
        inner.segments.insert(id, Segment::new(None));
        inner.active = id;
        inner.active_len = HEADER_LEN;
        let s = &inner.segments[&old];
        if s.acked >= s.messages {
            self.remove_settled(inner, old);
        }
    }

    /// Every record of segment `id` is settled: forget it and delete its
    /// files (records of it not written yet never will be).
    fn remove_settled(&self, inner: &mut Inner, id: u32) {
        inner.segments.remove(&id);
        inner.pending.retain(|c| c.segment != id);
        self.sync
            .discard([seg_path(&self.dir, id), ack_path(&self.dir, id)]);
    }

    /// Write the pending records to their segment files and sync them (the
    /// sync thread's part of a group-commit round). A segment is synced
    /// before the next one's file is created. On a failure the records not
    /// written go back to the front of the pending buffer (tried again in a
    /// later round) and the error fails this round's confirms.
    pub(crate) fn flush(&self) -> Result<(), StoreError> {
        let ids = self.flush_ids();
        self.flush_records().and(ids)
    }

    /// Write and sync the deduplication ids pushed since the last round.
    fn flush_ids(&self) -> Result<(), StoreError> {
        let (rewrite, appends) = self.ids_pending.lock().take();
        if rewrite.is_none() && appends.is_empty() {
            return Ok(());
        }
        if self.inner.lock().deleted {
            return Ok(());
        }
        let written = self
            .make_dir()
            .and_then(|()| self.ids.lock().0.write(rewrite.as_deref(), &appends));
        if written.is_err() {
            self.ids_pending.lock().restore(rewrite, appends);
        }
        written
    }

    /// Remember a deduplication id until `expires` (ms since the epoch):
    /// written and synced in the next round, whose ticket is returned (a
    /// publish's confirm waits for it).
    pub fn remember(self: &Arc<Self>, key: crate::dedup::Key, expires: u64) -> u64 {
        self.ids_pending.lock().push(key, expires);
        self.sync.wrote(self)
    }

    /// Replace the ids on disk with `live` (they hold more than twice as
    /// many records), in the next round.
    pub fn rewrite_ids(self: &Arc<Self>, live: &[(crate::dedup::Key, u64)]) {
        self.ids_pending.lock().rewrite(live);
        self.sync.wrote(self);
    }

    /// Id records on disk or waiting (live or expired).
    pub fn id_records(&self) -> u64 {
        self.ids_pending.lock().records()
    }

    /// The ids read at start-up (once), with their expiries.
    pub fn recovered_ids(&self) -> Vec<(crate::dedup::Key, u64)> {
        let ids = std::mem::take(&mut self.ids.lock().1);
        self.ids_pending.lock().records = ids.len() as u64;
        ids
    }

    /// The latest ticket issued by the store: a round that covers it has
    /// written everything appended before this call.
    pub fn issued(&self) -> u64 {
        self.sync.issued.load(Ordering::SeqCst)
    }

    fn flush_records(&self) -> Result<(), StoreError> {
        let writing = {
            let mut inner = self.inner.lock();
            if inner.deleted || inner.pending.is_empty() {
                inner.pending.clear();
                return Ok(());
            }
            let chunks = std::mem::take(&mut inner.pending);
            inner.writing = Arc::new(chunks);
            inner.writing.clone()
        };
        let mut written = 0;
        let mut last: Option<(u32, Arc<File>)> = None;
        let mut result = Ok(());
        for c in writing.iter() {
            if let Err(e) = self.write_chunk(c, &mut last) {
                result = Err(e);
                break;
            }
            written += 1;
        }
        if result.is_ok()
            && let Some((id, file)) = &last
        {
            result = file.sync_data().map_err(io(&seg_path(&self.dir, *id)));
        }
        let bytes: usize = writing[..written].iter().map(|c| c.bytes.len()).sum();
        self.sync.count(bytes as u64);
        let mut inner = self.inner.lock();
        let chunks = std::mem::take(&mut inner.writing);
        drop(writing);
        if result.is_err() && !inner.deleted {
            // Keep what was not written, and the chunk before it (which may
            // not be synced: writing the same bytes at the same offsets
            // again is harmless), ahead of newer records.
            let failed_from = written.saturating_sub(1);
            let mut back = Arc::unwrap_or_clone(chunks).split_off(failed_from);
            back.retain(|c| inner.segments.contains_key(&c.segment));
            back.append(&mut inner.pending);
            inner.pending = back;
        } else if let Ok(v) = Arc::try_unwrap(chunks)
            && let Some(mut c) = v.into_iter().next_back()
        {
            c.bytes.clear();
            inner.spare = c.bytes;
        }
        result
    }

    /// Write one chunk; `last` is the segment written before (synced first
    /// if this chunk starts another).
    fn write_chunk(
        &self,
        c: &Chunk,
        last: &mut Option<(u32, Arc<File>)>,
    ) -> Result<(), StoreError> {
        if let Some((id, file)) = last.as_ref()
            && *id != c.segment
        {
            file.sync_data().map_err(io(&seg_path(&self.dir, *id)))?;
        }
        let path = seg_path(&self.dir, c.segment);
        let file = {
            let mut inner = self.inner.lock();
            if inner.deleted {
                return Ok(());
            }
            let Some(seg) = inner.segments.get_mut(&c.segment) else {
                // Settled and removed meanwhile: nothing to write.
                return Ok(());
            };
            match &seg.file {
                Some(f) => f.clone(),
                None => {
                    // Created under the lock, so that a segment removed
                    // meanwhile never gets a file again; synced outside.
                    self.make_dir()?;
                    let f = Arc::new(
                        OpenOptions::new()
                            .read(true)
                            .write(true)
                            .create(true)
                            .truncate(true)
                            .open(&path)
                            .map_err(io(&path))?,
                    );
                    seg.file = Some(f.clone());
                    drop(inner);
                    let header = f
                        .write_all_at(&record::file_header(SEGMENT_MAGIC), 0)
                        .and_then(|()| f.sync_data())
                        .map_err(io(&path))
                        .and_then(|()| sync_dir(&self.dir));
                    if let Err(e) = header {
                        // Created again, header first, by the next try.
                        if let Some(seg) = self.inner.lock().segments.get_mut(&c.segment) {
                            seg.file = None;
                        }
                        return Err(e);
                    }
                    f
                }
            }
        };
        if let Err(e) = file.write_all_at(&c.bytes, c.offset) {
            // Leave no half record behind.
            let _ = file.set_len(c.offset);
            return Err(io(&path)(e));
        }
        *last = Some((c.segment, file));
        Ok(())
    }

    /// Record that messages were settled (acked, dead-lettered, expired,
    /// purged): they will not come back at recovery. A segment whose
    /// records are all settled is deleted.
    pub fn ack(&self, refs: impl IntoIterator<Item = StoreRef>) {
        self.settle(refs, false);
    }

    /// Record that messages were returned to the queue once more (their
    /// delivery count, for `x-delivery-limit`); like acks, not synced: a
    /// return lost in a crash counts one delivery fewer.
    pub fn returned(&self, refs: impl IntoIterator<Item = StoreRef>) {
        self.settle(refs, true);
    }

    fn settle(&self, refs: impl IntoIterator<Item = StoreRef>, returns: bool) {
        let flag = if returns { record::RETURNED } else { 0 };
        // Entries and where each run of them goes are settled under the
        // lock; the writes happen after it is released, so that a write
        // the kernel makes wait never holds up this queue's publishers or
        // the sync thread (measured: lock waits under persistent load).
        let mut buf = Vec::new();
        let mut writes: Vec<(Arc<File>, u32, u64, std::ops::Range<usize>)> = Vec::new();
        {
            let mut inner = self.inner.lock();
            if inner.deleted {
                return;
            }
            let mut refs = refs.into_iter().peekable();
            while let Some(first) = refs.next() {
                // One write per run of acks into the same segment.
                let start = buf.len();
                record::encode_ack(&mut buf, first.offset | flag);
                let mut count = 1;
                while let Some(r) = refs.next_if(|r| r.segment == first.segment) {
                    record::encode_ack(&mut buf, r.offset | flag);
                    count += 1;
                }
                // Returns settle nothing.
                let settles = if returns { 0 } else { count };
                match self.reserve_acks(
                    &mut inner,
                    first.segment,
                    (buf.len() - start) as u64,
                    settles,
                ) {
                    Ok(Some((file, at))) => {
                        writes.push((file, first.segment, at, start..buf.len()))
                    }
                    Ok(None) => buf.truncate(start),
                    Err(e) => {
                        buf.truncate(start);
                        tracing::error!(
                            "recording acks failed (the messages may be redelivered after a restart): {e}"
                        );
                    }
                }
            }
        }
        for (file, id, at, range) in writes {
            if let Err(e) = file.write_all_at(&buf[range.clone()], at) {
                tracing::error!(
                    file = %ack_path(&self.dir, id).display(),
                    "recording acks failed (the messages may be redelivered after a restart): {e}"
                );
            }
            self.sync.count(range.len() as u64);
        }
    }

    /// Count `count` acks into segment `id` and reserve `bytes` at the end
    /// of its ack file for them: where to write, or `None` when the
    /// segment is gone or now wholly settled (and deleted).
    fn reserve_acks(
        &self,
        inner: &mut Inner,
        id: u32,
        bytes: u64,
        count: u32,
    ) -> Result<Option<(Arc<File>, u64)>, StoreError> {
        let active = inner.active;
        let Some(seg) = inner.segments.get_mut(&id) else {
            return Ok(None);
        };
        if seg.acked + count >= seg.messages && id != active {
            // Every record settled: the whole segment goes.
            self.remove_settled(inner, id);
            return Ok(None);
        }
        let path = ack_path(&self.dir, id);
        if seg.acks.is_none() {
            // An ack may come before the sync thread wrote the segment.
            self.make_dir()?;
            // Not synced, like the acks in it: a connection's worker
            // thread must not wait for the disk. After a crash a missing
            // or torn ack file only means redeliveries.
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&path)
                .map_err(io(&path))?;
            f.write_all_at(&record::file_header(ACK_MAGIC), 0)
                .map_err(io(&path))?;
            seg.acks = Some((Arc::new(f), HEADER_LEN));
        }
        let (file, len) = seg.acks.as_mut().expect("just opened");
        let at = *len;
        *len += bytes;
        seg.acked += count;
        // Acks reach the kernel at once (a killed broker loses none) but
        // are not part of the group commit: nothing waits on them, a lost
        // ack only means a redelivery, and syncing a file while the next
        // ack is written to the same page makes that write wait for the
        // disk (measured: a persistent backlog drained at 7k msg/s, see
        // docs/performance.md).
        Ok(Some((file.clone(), at)))
    }

    /// Create the log's folder if this is its first file. The folder's own
    /// entry is synced (with its parent), so a segment synced inside it
    /// cannot vanish with the folder after a crash.
    fn make_dir(&self) -> Result<(), StoreError> {
        if self.dir_made.load(Ordering::Acquire) {
            return Ok(());
        }
        std::fs::create_dir_all(&self.dir).map_err(io(&self.dir))?;
        if let Some(parent) = self.dir.parent() {
            sync_dir(parent)?;
        }
        self.dir_made.store(true, Ordering::Release);
        Ok(())
    }

    /// Read a message back (it was paged out of memory, or recovered).
    pub fn load(&self, r: StoreRef) -> Result<Message, StoreError> {
        let path = seg_path(&self.dir, r.segment);
        let file = {
            let inner = self.inner.lock();
            let buffered = inner
                .pending
                .iter()
                .chain(inner.writing.iter())
                .find(|c| c.holds(r));
            if let Some(c) = buffered {
                // Not written yet: from memory.
                let rec = c.record(r);
                let (len, crc) = record::record_header(rec[..8].try_into().expect("8 bytes"));
                debug_assert!(len == r.len && record::crc_ok(&rec[RECORD_HEADER_LEN..], crc));
                let payload = Bytes::copy_from_slice(&rec[RECORD_HEADER_LEN..]);
                drop(inner);
                return record::decode_message(payload).map_err(|what| StoreError::Corrupt {
                    path,
                    offset: u64::from(r.offset),
                    what,
                });
            }
            match inner.segments.get(&r.segment).and_then(|s| s.file.clone()) {
                Some(f) => f,
                None => return Err(StoreError::Deleted),
            }
        };
        let corrupt = |what: &str| StoreError::Corrupt {
            path: path.clone(),
            offset: u64::from(r.offset),
            what: what.to_owned(),
        };
        let mut buf = vec![0u8; RECORD_HEADER_LEN + r.len as usize];
        file.read_exact_at(&mut buf, u64::from(r.offset))
            .map_err(io(&path))?;
        let (len, crc) = record::record_header(buf[..8].try_into().expect("8 bytes"));
        if len != r.len || !record::crc_ok(&buf[RECORD_HEADER_LEN..], crc) {
            return Err(corrupt("record checksum mismatch on read"));
        }
        record::decode_message(Bytes::from(buf).slice(RECORD_HEADER_LEN..)).map_err(|w| corrupt(&w))
    }

    /// The queue was deleted: remove its files; later appends and acks are
    /// refused or ignored.
    pub fn destroy(&self) {
        let mut inner = self.inner.lock();
        inner.deleted = true;
        inner.segments.clear();
        if let Err(e) = std::fs::remove_dir_all(&self.dir)
            && e.kind() != ErrorKind::NotFound
        {
            tracing::warn!(dir = %self.dir.display(), "removing a deleted queue's log: {e}");
        }
    }

    /// Segment files on disk (for tests and metrics).
    pub fn segment_count(&self) -> usize {
        self.inner.lock().segments.len()
    }

    /// The log's folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Segment {
    fn new(file: Option<File>) -> Self {
        Segment {
            file: file.map(Arc::new),
            messages: 0,
            acked: 0,
            acks: None,
        }
    }
}

fn remove_segment(dir: &Path, id: u32) {
    for p in [seg_path(dir, id), ack_path(dir, id)] {
        if let Err(e) = std::fs::remove_file(&p)
            && e.kind() != ErrorKind::NotFound
        {
            tracing::warn!(file = %p.display(), "reclaiming a settled segment: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol::protocol::BasicProperties;

    fn message(i: u32) -> Message {
        Message::new(
            "",
            "q",
            BasicProperties::default().with_delivery_mode(2),
            format!("message {i}").into_bytes(),
        )
    }

    fn meta(m: &Message) -> RecordMeta {
        RecordMeta {
            published_ms: 1,
            ttl_ms: None,
            body_len: m.body.len() as u32,
            priority: 0,
        }
    }

    /// Append `message(i)` for each `i`; where each went.
    fn append(log: &Arc<QueueLog>, range: std::ops::Range<u32>) -> Vec<StoreRef> {
        range
            .map(|i| log.append(&message(i), meta(&message(i))).unwrap().0)
            .collect()
    }

    /// What a group-commit round does: write and sync, delete settled
    /// segments.
    fn round(log: &QueueLog) {
        log.flush().unwrap();
        log.sync.empty_trash();
    }

    /// A log with no sync thread: tests write its records with
    /// [`QueueLog::flush`] (as a group-commit round would).
    fn open(dir: &Path, segment_bytes: u64) -> Result<(Arc<QueueLog>, Vec<Recovered>), StoreError> {
        QueueLog::open(dir.to_owned(), Arc::new(Syncer::new()), segment_bytes)
            .map(|(log, r)| (Arc::new(log), r))
    }

    fn bodies(log: &QueueLog, recovered: &[Recovered]) -> Vec<String> {
        recovered
            .iter()
            .map(|r| String::from_utf8(log.load(r.stored).unwrap().body.to_vec()).unwrap())
            .collect()
    }

    /// Returns are counted per message across a reopen and settle
    /// nothing: a segment of returned messages is not reclaimed.
    #[test]
    fn returns_are_counted_across_reopening_and_settle_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let (log, _) = open(tmp.path(), 1 << 20).unwrap();
        let refs = append(&log, 0..3);
        round(&log);
        log.returned([refs[1]]);
        log.returned([refs[1], refs[2]]);
        log.ack([refs[2]]);
        round(&log);
        drop(log);
        let (log, recovered) = open(tmp.path(), 1 << 20).unwrap();
        assert_eq!(bodies(&log, &recovered), ["message 0", "message 1"]);
        let returns: Vec<u32> = recovered.iter().map(|r| r.returns).collect();
        assert_eq!(returns, [0, 2]);
    }

    #[test]
    fn appends_and_acks_survive_reopening() {
        let tmp = tempfile::tempdir().unwrap();
        let (log, _) = open(tmp.path(), 1 << 20).unwrap();
        let refs = append(&log, 0..5);
        log.ack([refs[0], refs[3]]);
        round(&log);
        drop(log);
        let (log, recovered) = open(tmp.path(), 1 << 20).unwrap();
        assert_eq!(
            bodies(&log, &recovered),
            ["message 1", "message 2", "message 4"]
        );
    }

    #[test]
    fn the_folder_and_first_segment_wait_for_the_first_record() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("q");
        let (log, recovered) = open(&dir, 1 << 20).unwrap();
        assert!(recovered.is_empty());
        assert!(!dir.exists(), "declaring a durable queue writes nothing");
        let refs = append(&log, 0..2);
        // Acked before the sync thread wrote the segment: the ack file
        // needs the folder too.
        log.ack([refs[0]]);
        round(&log);
        assert!(seg_path(&dir, 1).exists());
        drop(log);
        let (log, recovered) = open(&dir, 1 << 20).unwrap();
        assert_eq!(bodies(&log, &recovered), ["message 1"]);
        log.destroy();
        assert!(!dir.exists());

        let (log, _) = open(&tmp.path().join("never-written"), 1 << 20).unwrap();
        log.destroy();
    }

    #[test]
    fn a_torn_tail_is_truncated_and_earlier_records_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let (log, _) = open(tmp.path(), 1 << 20).unwrap();
        for i in 0..3 {
            let m = message(i);
            log.append(&m, meta(&m)).unwrap();
        }
        let r = log.append(&message(3), meta(&message(3))).unwrap().0;
        round(&log);
        drop(log);
        let seg = seg_path(tmp.path(), 1);
        let full = std::fs::metadata(&seg).unwrap().len();
        // Cut the last record in the middle, as a crash mid-write would.
        let f = OpenOptions::new().write(true).open(&seg).unwrap();
        f.set_len(u64::from(r.offset) + 12).unwrap();
        drop(f);
        let (log, recovered) = open(tmp.path(), 1 << 20).unwrap();
        assert_eq!(
            bodies(&log, &recovered),
            ["message 0", "message 1", "message 2"]
        );
        assert_eq!(
            std::fs::metadata(&seg).unwrap().len(),
            u64::from(r.offset),
            "truncated to the last whole record (was {full})"
        );
        // Appending goes on from there.
        let m = message(9);
        log.append(&m, meta(&m)).unwrap();
        round(&log);
        drop(log);
        let (log, recovered) = open(tmp.path(), 1 << 20).unwrap();
        assert_eq!(bodies(&log, &recovered).last().unwrap(), "message 9");
    }

    #[test]
    fn a_bad_ack_entry_ends_the_ack_file_and_its_messages_come_back() {
        let tmp = tempfile::tempdir().unwrap();
        let (log, _) = open(tmp.path(), 1 << 20).unwrap();
        let refs = append(&log, 0..3);
        log.ack([refs[0]]);
        log.ack([refs[1]]);
        round(&log);
        drop(log);
        let acks = ack_path(tmp.path(), 1);
        let len = std::fs::metadata(&acks).unwrap().len();
        let f = OpenOptions::new().write(true).open(&acks).unwrap();
        f.set_len(len - 3).unwrap(); // the second ack half-written
        drop(f);
        let (log, recovered) = open(tmp.path(), 1 << 20).unwrap();
        assert_eq!(bodies(&log, &recovered), ["message 1", "message 2"]);
        round(&log);
        drop(log);

        let mut bytes = std::fs::read(&acks).unwrap();
        bytes.extend_from_within(16..24);
        bytes[17] ^= 0xff; // first entry bad, a good one after it
        std::fs::write(&acks, bytes).unwrap();
        let (log, recovered) = open(tmp.path(), 1 << 20).unwrap();
        assert_eq!(
            bodies(&log, &recovered),
            ["message 0", "message 1", "message 2"],
            "every ack from the bad entry on is dropped: redelivered, not lost"
        );
        assert_eq!(std::fs::metadata(&acks).unwrap().len(), 16);
    }

    #[test]
    fn corruption_in_the_middle_of_the_last_segment_is_reported_not_truncated() {
        let tmp = tempfile::tempdir().unwrap();
        let (log, _) = open(tmp.path(), 1 << 20).unwrap();
        let r = log.append(&message(0), meta(&message(0))).unwrap().0;
        log.append(&message(1), meta(&message(1))).unwrap();
        round(&log);
        drop(log);
        let seg = seg_path(tmp.path(), 1);
        let mut bytes = std::fs::read(&seg).unwrap();
        bytes[r.offset as usize + 10] ^= 0xff;
        std::fs::write(&seg, &bytes).unwrap();
        let err = open(tmp.path(), 1 << 20).unwrap_err().to_string();
        assert!(
            err.contains(&format!("0000000001.seg at offset {}", r.offset)),
            "{err}"
        );
        assert_eq!(std::fs::read(&seg).unwrap(), bytes, "nothing was cut off");
    }

    #[test]
    fn settled_segments_are_deleted_whatever_the_ack_order() {
        let tmp = tempfile::tempdir().unwrap();
        // Small segments: a few records each.
        let (log, _) = open(tmp.path(), 200).unwrap();
        let refs = append(&log, 0..12);
        let before = log.segment_count();
        assert!(before >= 3, "{before}");
        // Ack everything but the first message, newest first.
        for r in refs[1..].iter().rev() {
            log.ack([*r]);
        }
        assert_eq!(log.segment_count(), 2, "the first (pinned) and the active");
        log.ack([refs[0]]);
        assert_eq!(log.segment_count(), 1);
        round(&log);
        drop(log);
        let (_, recovered) = open(tmp.path(), 200).unwrap();
        assert!(recovered.is_empty());
    }

    #[test]
    fn records_are_readable_before_the_sync_thread_writes_them() {
        let tmp = tempfile::tempdir().unwrap();
        // Small segments, so that the buffer spans several.
        let (log, _) = open(tmp.path(), 200).unwrap();
        let refs = append(&log, 0..8);
        let segments = refs.last().unwrap().segment;
        assert!(segments >= 3, "{segments}");
        assert!(
            !seg_path(tmp.path(), segments).exists(),
            "publishing creates no file: the sync thread does"
        );
        let read = |log: &QueueLog| -> Vec<String> {
            refs.iter()
                .map(|r| String::from_utf8(log.load(*r).unwrap().body.to_vec()).unwrap())
                .collect()
        };
        let expected: Vec<String> = (0..8).map(|i| format!("message {i}")).collect();
        assert_eq!(read(&log), expected, "from the buffer");
        round(&log);
        assert!(seg_path(tmp.path(), segments).exists());
        assert_eq!(read(&log), expected, "from the files");
        drop(log);
        let (log, recovered) = open(tmp.path(), 200).unwrap();
        assert_eq!(bodies(&log, &recovered), expected);
    }

    #[test]
    fn a_segment_settled_before_it_was_written_never_gets_a_file() {
        let tmp = tempfile::tempdir().unwrap();
        let (log, _) = open(tmp.path(), 200).unwrap();
        let refs = append(&log, 0..8);
        let first_two: Vec<StoreRef> = refs.iter().filter(|r| r.segment <= 2).copied().collect();
        log.ack(first_two.iter().copied());
        round(&log);
        assert!(!seg_path(tmp.path(), 2).exists());
        assert!(seg_path(tmp.path(), refs.last().unwrap().segment).exists());
        drop(log);
        let (log, recovered) = open(tmp.path(), 200).unwrap();
        assert_eq!(recovered.len(), 8 - first_two.len());
        assert_eq!(bodies(&log, &recovered).last().unwrap(), "message 7");
    }

    #[test]
    fn an_ack_file_whose_header_never_reached_the_disk_only_means_redelivery() {
        let tmp = tempfile::tempdir().unwrap();
        let (log, _) = open(tmp.path(), 1 << 20).unwrap();
        let r = log.append(&message(0), meta(&message(0))).unwrap().0;
        log.append(&message(1), meta(&message(1))).unwrap();
        log.ack([r]);
        round(&log);
        drop(log);
        // A crash can leave the unsynced file with its size but zeros.
        let acks = ack_path(tmp.path(), 1);
        let len = std::fs::metadata(&acks).unwrap().len() as usize;
        std::fs::write(&acks, vec![0u8; len]).unwrap();
        let (log, recovered) = open(tmp.path(), 1 << 20).unwrap();
        assert_eq!(bodies(&log, &recovered), ["message 0", "message 1"]);
    }

    #[test]
    fn a_hole_in_an_ack_file_is_skipped_not_the_end() {
        let tmp = tempfile::tempdir().unwrap();
        let (log, _) = open(tmp.path(), 1 << 20).unwrap();
        let refs = append(&log, 0..3);
        log.ack([refs[0]]);
        log.ack([refs[2]]);
        round(&log);
        drop(log);
        // As if the first run's write never happened but the second's did.
        let acks = ack_path(tmp.path(), 1);
        let mut bytes = std::fs::read(&acks).unwrap();
        bytes[16..24].fill(0);
        std::fs::write(&acks, bytes).unwrap();
        let (log, recovered) = open(tmp.path(), 1 << 20).unwrap();
        assert_eq!(bodies(&log, &recovered), ["message 0", "message 1"]);
    }
}
