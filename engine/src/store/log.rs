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
//! * **Appends only.** A publish is one `pwrite` at the end of the active
//!   segment, an ack one 8-byte `pwrite` at the end of an ack file. Nothing
//!   is rewritten in place, so a crash can only tear the last write of a
//!   file, and recovery finds it by checksum.
//! * **Written at once, synced in groups.** Writes go to the kernel as they
//!   happen, so a killed process loses nothing it processed; the
//!   [`Syncer`](super::Syncer) thread `fdatasync`s every file written since
//!   its last round and only then are the publishes confirmed.
//! * **Reclaimed by segment.** When every record of a segment (not the
//!   active one) is acked, the segment and its ack file are deleted; disk
//!   use falls as a backlog drains, whatever order messages are acked in.
//! * **Read back by offset.** A message paged out of memory is read with
//!   one `pread` at its [`StoreRef`].
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
}

struct Segment {
    file: Arc<File>,
    /// Records written.
    messages: u32,
    /// Records acked.
    acked: u32,
    /// The ack file and its length, opened on the first ack.
    acks: Option<(Arc<File>, u64)>,
}

struct Inner {
    segments: BTreeMap<u32, Segment>,
    active: u32,
    active_len: u64,
    deleted: bool,
    scratch: Vec<u8>,
}

/// A durable queue's log.
pub struct QueueLog {
    dir: PathBuf,
    sync: Arc<Syncer>,
    segment_bytes: u64,
    inner: Mutex<Inner>,
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

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

fn open_rw(path: &Path) -> Result<File, StoreError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(io(path))
}

/// Create a file holding just its header, synced, with its directory entry.
fn create_file(dir: &Path, path: &Path, magic: &[u8; 8]) -> Result<File, StoreError> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(io(path))?;
    f.write_all_at(&record::file_header(magic), 0)
        .map_err(io(path))?;
    f.sync_data().map_err(io(path))?;
    sync_dir(dir)?;
    Ok(f)
}

/// Read every ack entry of a segment's ack file. Ack files are not synced
/// with the group commit (nothing waits for an ack), so after a power loss
/// any of their unsynced tail may be missing or torn: the first bad entry
/// ends the file, with a warning naming it; the acks after it are dropped
/// and their messages come back, marked redelivered (at least once, never
/// lost). A bad header is still corruption.
fn read_acks(path: &Path) -> Result<(HashSet<u32>, Option<u64>), StoreError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok((HashSet::new(), None)),
        Err(e) => return Err(io(path)(e)),
    };
    let corrupt = |offset: usize, what: &str| StoreError::Corrupt {
        path: path.to_owned(),
        offset: offset as u64,
        what: what.to_owned(),
    };
    if bytes.len() < HEADER_LEN as usize {
        // Created but its header never reached the disk: no acks in it.
        return Ok((HashSet::new(), Some(0)));
    }
    record::check_header(&bytes, ACK_MAGIC).map_err(|w| corrupt(0, &w))?;
    let mut acked = HashSet::new();
    let mut at = HEADER_LEN as usize;
    while at < bytes.len() {
        let entry = bytes.get(at..at + ACK_LEN);
        match entry.and_then(record::decode_ack) {
            Some(offset) => {
                acked.insert(offset);
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
    Ok((acked, Some(at as u64)))
}

impl QueueLog {
    /// Open (creating if need be) the log in `dir` and recover the messages
    /// it holds that were never acked, in the order they were written.
    pub(crate) fn open(
        dir: PathBuf,
        sync: Arc<Syncer>,
        segment_bytes: u64,
    ) -> Result<(QueueLog, Vec<Recovered>), StoreError> {
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let mut ids: Vec<u32> = std::fs::read_dir(&dir)
            .map_err(io(&dir))?
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
            let (acked, ack_len) = read_acks(&ack_path(&dir, id))?;
            let (seg, len) = Self::recover_segment(&path, id, last, &acked, &mut recovered)?;
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
                let id = ids.last().map_or(1, |l| l + 1);
                let path = seg_path(&dir, id);
                let file = create_file(&dir, &path, SEGMENT_MAGIC)?;
                segments.insert(id, Segment::new(file));
                active_len = HEADER_LEN;
                id
            }
        };
        let log = QueueLog {
            dir,
            sync,
            segment_bytes,
            inner: Mutex::new(Inner {
                segments,
                active,
                active_len,
                deleted: false,
                scratch: Vec::new(),
            }),
        };
        Ok((log, recovered))
    }

    fn recover_segment(
        path: &Path,
        id: u32,
        last: bool,
        acked: &HashSet<u32>,
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
        let mut seg = Segment::new(file.try_clone().map_err(io(path))?);
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
            if acked.contains(&offset) {
                seg.acked += 1;
            } else {
                out.push(Recovered {
                    stored: StoreRef {
                        segment: id,
                        offset,
                        len,
                    },
                    meta,
                });
            }
            at = record_end;
        };
        Ok((seg, end))
    }

    /// Append `m`; returns where it is and the sync ticket that covers it.
    pub fn append(&self, m: &Message, meta: RecordMeta) -> Result<(StoreRef, u64), StoreError> {
        let mut inner = self.inner.lock();
        if inner.deleted {
            return Err(StoreError::Deleted);
        }
        let mut buf = std::mem::take(&mut inner.scratch);
        buf.clear();
        record::encode_message(&mut buf, m, meta);
        let n = buf.len() as u64;
        if inner.active_len + n > self.segment_bytes
            && inner.segments[&inner.active].messages > 0
            && let Err(e) = self.roll(&mut inner)
        {
            inner.scratch = buf;
            return Err(e);
        }
        let (id, at) = (inner.active, inner.active_len);
        let file = inner.segments[&id].file.clone();
        if let Err(e) = file.write_all_at(&buf, at) {
            // Leave no half record behind for the next append to follow.
            let _ = file.set_len(at);
            inner.scratch = buf;
            return Err(io(&seg_path(&self.dir, id))(e));
        }
        inner.active_len += n;
        inner
            .segments
            .get_mut(&id)
            .expect("active segment")
            .messages += 1;
        inner.scratch = buf;
        drop(inner);
        let ticket = self.sync.wrote(&file, n);
        let stored = StoreRef {
            segment: id,
            offset: at as u32,
            len: (n as usize - RECORD_HEADER_LEN) as u32,
        };
        Ok((stored, ticket))
    }

    /// Start a new active segment. The old one is synced first, so that a
    /// torn write can only ever be in the last segment.
    fn roll(&self, inner: &mut Inner) -> Result<(), StoreError> {
        let old = inner.active;
        let path = seg_path(&self.dir, old);
        inner.segments[&old].file.sync_data().map_err(io(&path))?;
        let id = old + 1;
        let file = create_file(&self.dir, &seg_path(&self.dir, id), SEGMENT_MAGIC)?;
        inner.segments.insert(id, Segment::new(file));
        inner.active = id;
        inner.active_len = HEADER_LEN;
        let s = &inner.segments[&old];
        if s.acked >= s.messages {
            inner.segments.remove(&old);
            remove_segment(&self.dir, old);
        }
        Ok(())
    }

    /// Record that messages were settled (acked, dead-lettered, expired,
    /// purged): they will not come back at recovery. A segment whose
    /// records are all settled is deleted.
    pub fn ack(&self, refs: impl IntoIterator<Item = StoreRef>) {
        let mut inner = self.inner.lock();
        if inner.deleted {
            return;
        }
        let mut refs = refs.into_iter().peekable();
        let mut buf = Vec::new();
        while let Some(first) = refs.next() {
            // One write per run of acks into the same segment.
            buf.clear();
            record::encode_ack(&mut buf, first.offset);
            let mut count = 1;
            while let Some(r) = refs.next_if(|r| r.segment == first.segment) {
                record::encode_ack(&mut buf, r.offset);
                count += 1;
            }
            if let Err(e) = self.write_acks(&mut inner, first.segment, &buf, count) {
                tracing::error!(
                    "recording acks failed (the messages may be redelivered after a restart): {e}"
                );
            }
        }
    }

    fn write_acks(
        &self,
        inner: &mut Inner,
        id: u32,
        entries: &[u8],
        count: u32,
    ) -> Result<(), StoreError> {
        let active = inner.active;
        let Some(seg) = inner.segments.get_mut(&id) else {
            return Ok(());
        };
        if seg.acked + count >= seg.messages && id != active {
            // Every record settled: the whole segment goes.
            inner.segments.remove(&id);
            remove_segment(&self.dir, id);
            return Ok(());
        }
        let path = ack_path(&self.dir, id);
        if seg.acks.is_none() {
            let f = create_file(&self.dir, &path, ACK_MAGIC)?;
            seg.acks = Some((Arc::new(f), HEADER_LEN));
        }
        let (file, len) = seg.acks.as_mut().expect("just opened");
        file.write_all_at(entries, *len).map_err(io(&path))?;
        *len += entries.len() as u64;
        seg.acked += count;
        // Acks reach the kernel now (a killed broker loses none) but are
        // not part of the group commit: nothing waits on them, a lost ack
        // only means a redelivery, and syncing a file while the next ack
        // is written to the same page makes that write wait for the disk
        // (measured: a persistent backlog drained at 7k msg/s, see
        // docs/performance.md).
        self.sync.count(entries.len() as u64);
        Ok(())
    }

    /// Read a message back (it was paged out of memory, or recovered).
    pub fn load(&self, r: StoreRef) -> Result<Message, StoreError> {
        let file = {
            let inner = self.inner.lock();
            match inner.segments.get(&r.segment) {
                Some(s) => s.file.clone(),
                None => return Err(StoreError::Deleted),
            }
        };
        let path = seg_path(&self.dir, r.segment);
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
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
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
    fn new(file: File) -> Self {
        Segment {
            file: Arc::new(file),
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

    fn open(dir: &Path, segment_bytes: u64) -> Result<(QueueLog, Vec<Recovered>), StoreError> {
        QueueLog::open(dir.to_owned(), Arc::new(Syncer::new()), segment_bytes)
    }

    fn bodies(log: &QueueLog, recovered: &[Recovered]) -> Vec<String> {
        recovered
            .iter()
            .map(|r| String::from_utf8(log.load(r.stored).unwrap().body.to_vec()).unwrap())
            .collect()
    }

    #[test]
    fn appends_and_acks_survive_reopening() {
        let tmp = tempfile::tempdir().unwrap();
        let (log, _) = open(tmp.path(), 1 << 20).unwrap();
        let refs: Vec<StoreRef> = (0..5)
            .map(|i| {
                let m = message(i);
                log.append(&m, meta(&m)).unwrap().0
            })
            .collect();
        log.ack([refs[0], refs[3]]);
        drop(log);
        let (log, recovered) = open(tmp.path(), 1 << 20).unwrap();
        assert_eq!(
            bodies(&log, &recovered),
            ["message 1", "message 2", "message 4"]
        );
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
        drop(log);
        let (log, recovered) = open(tmp.path(), 1 << 20).unwrap();
        assert_eq!(bodies(&log, &recovered).last().unwrap(), "message 9");
    }

    #[test]
    fn a_bad_ack_entry_ends_the_ack_file_and_its_messages_come_back() {
        let tmp = tempfile::tempdir().unwrap();
        let (log, _) = open(tmp.path(), 1 << 20).unwrap();
        let refs: Vec<StoreRef> = (0..3)
            .map(|i| log.append(&message(i), meta(&message(i))).unwrap().0)
            .collect();
        log.ack([refs[0]]);
        log.ack([refs[1]]);
        drop(log);
        let acks = ack_path(tmp.path(), 1);
        let len = std::fs::metadata(&acks).unwrap().len();
        let f = OpenOptions::new().write(true).open(&acks).unwrap();
        f.set_len(len - 3).unwrap(); // the second ack half-written
        drop(f);
        let (log, recovered) = open(tmp.path(), 1 << 20).unwrap();
        assert_eq!(bodies(&log, &recovered), ["message 1", "message 2"]);
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
        let refs: Vec<StoreRef> = (0..12)
            .map(|i| log.append(&message(i), meta(&message(i))).unwrap().0)
            .collect();
        let before = log.segment_count();
        assert!(before >= 3, "{before}");
        // Ack everything but the first message, newest first.
        for r in refs[1..].iter().rev() {
            log.ack([*r]);
        }
        assert_eq!(log.segment_count(), 2, "the first (pinned) and the active");
        log.ack([refs[0]]);
        assert_eq!(log.segment_count(), 1);
        drop(log);
        let (_, recovered) = open(tmp.path(), 200).unwrap();
        assert!(recovered.is_empty());
    }
}
