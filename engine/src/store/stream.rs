//! A stream's log: an append-only sequence of messages, each with an
//! offset, kept until retention removes whole segments, read by any number
//! of readers at their own positions.
//!
//! Unlike a queue's log, nothing is ever acknowledged out of a stream: a
//! segment is either whole or gone. That makes the format simple and the
//! costs flat:
//!
//! * appending is a buffered write, flushed and synced by the store's
//!   group commit ([`super::Syncer`]) like every queue's log, so a confirm
//!   means the message is on disk and one sync covers every stream and
//!   queue written in that round;
//! * a reader only ever sees offsets below [`StreamLog::committed`], which
//!   moves once a round's records are on disk: no reader is handed an
//!   offset that a crash could take back and give to another message;
//! * attaching at an offset or a time is a binary search of the segment
//!   list (in memory, one entry per segment) and then of the segment's
//!   sparse index file (on disk, one entry per [`INDEX_EVERY`] bytes),
//!   never a scan of the data, and no per-message state is held in memory
//!   whatever the stream's size;
//! * retention deletes the oldest segment files, never rewrites one.
//!
//! Readers use positioned reads (`pread`) of the shared segment files, so
//! a thousand readers of the same data share the page cache's one copy.
//!
//! The format is specified in `docs/storage.md`.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use parking_lot::Mutex;

use super::log::{io, open_rw};
use super::record::{self, RecordMeta};
use super::{StoreError, Syncer};
use crate::message::Message;

/// First bytes of a stream segment.
pub const STREAM_MAGIC: &[u8; 8] = b"wasmqstr";
/// First bytes of a segment's index.
pub const INDEX_MAGIC: &[u8; 8] = b"wasmqidx";
/// First bytes of a stream's consumer offsets file.
pub const OFFSETS_MAGIC: &[u8; 8] = b"wasmqoff";
/// An index entry per this many bytes of records (and one for each
/// segment's first record): attaching reads at most this much past the
/// entry it finds.
pub const INDEX_EVERY: u64 = 4096;
/// RabbitMQ's default `x-stream-max-segment-size-bytes`.
pub const DEFAULT_SEGMENT_BYTES: u64 = 500_000_000;
/// Stream record header: length and CRC of the rest.
const HEADER: usize = 8;
/// Fixed part after the header: offset and timestamp.
const FIXED: usize = 16;
/// One index entry: offset, timestamp, position.
const INDEX_ENTRY: usize = 24;

fn corrupt(path: &Path, offset: u64, what: impl Into<String>) -> StoreError {
    StoreError::Corrupt {
        path: path.to_owned(),
        offset,
        what: what.into(),
    }
}

fn segment_path(dir: &Path, first: u64) -> PathBuf {
    dir.join(format!("{first:020}.segment"))
}

fn index_path(dir: &Path, first: u64) -> PathBuf {
    dir.join(format!("{first:020}.index"))
}

/// One message read from a stream.
#[derive(Debug)]
pub struct StreamRecord {
    /// Its offset.
    pub offset: u64,
    /// When it was appended (Unix milliseconds; never decreasing along the
    /// stream).
    pub timestamp_ms: u64,
    /// Its `x-stream-filter-value`, if it had one.
    pub filter: Option<Bytes>,
    /// The message, its properties carrying `x-stream-offset`.
    pub message: Message,
}

/// One segment file and what is known of it without reading it.
#[derive(Debug)]
struct Segment {
    /// Offset of its first record.
    first: u64,
    /// Timestamp of its first record (0 while it has none).
    first_ts: u64,
    /// Timestamp of its last record.
    last_ts: u64,
    /// Bytes in the file, header included.
    len: u64,
    /// Index entries written.
    indexed: u64,
    /// Position of the last indexed record.
    last_indexed: u64,
    file: Arc<File>,
    index: Arc<File>,
}

/// Where a segment's appends stood, to undo a round that failed.
#[derive(Clone, Copy, Debug)]
struct Position {
    len: u64,
    indexed: u64,
    last_indexed: u64,
    first_ts: u64,
    last_ts: u64,
}

impl Segment {
    fn position(&self) -> Position {
        Position {
            len: self.len,
            indexed: self.indexed,
            last_indexed: self.last_indexed,
            first_ts: self.first_ts,
            last_ts: self.last_ts,
        }
    }

    fn restore(&mut self, at: Position) {
        self.len = at.len;
        self.indexed = at.indexed;
        self.last_indexed = at.last_indexed;
        self.first_ts = at.first_ts;
        self.last_ts = at.last_ts;
    }
}

/// Records appended, not yet written: the group commit writes them.
#[derive(Debug, Default)]
struct Pending {
    bytes: Vec<u8>,
    /// (offset, timestamp, position in `bytes`) of each record.
    records: Vec<(u64, u64, usize)>,
}

#[derive(Debug)]
struct Inner {
    /// Oldest first; never empty.
    segments: Vec<Segment>,
    /// The offset the next append gets.
    next: u64,
    /// The timestamp of the last append.
    last_ts: u64,
    pending: Pending,
    /// Named consumers' offsets to write.
    offsets_pending: Vec<u8>,
    deleted: bool,
}

/// What [`StreamLog::append_at`] did with a record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placed {
    /// The log held that offset already.
    Held,
    /// Appended; the group commit's ticket.
    Appended(u64),
    /// The log ends before that offset: it lacks the records from `next`.
    Gap {
        /// The offset the log would give its next record.
        next: u64,
    },
}

/// What a stream holds, for the admin API.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StreamStats {
    /// First offset still kept.
    pub first: u64,
    /// One past the last committed offset.
    pub committed: u64,
    /// Segment files.
    pub segments: usize,
    /// Bytes of segment files.
    pub bytes: u64,
}

/// A stream's log.
pub struct StreamLog {
    dir: PathBuf,
    sync: Arc<Syncer>,
    max_segment_bytes: u64,
    inner: Mutex<Inner>,
    /// Every offset below this is on disk and may be read.
    committed: AtomicU64,
    /// Woken when `committed` moves.
    pub(crate) commits: Arc<tokio::sync::Notify>,
    /// Named consumers' last acknowledged offsets.
    offsets: Mutex<HashMap<String, u64>>,
    offsets_file: Mutex<Option<File>>,
    /// Stored offsets appended since the file was last compacted.
    offsets_written: AtomicU64,
}

impl std::fmt::Debug for StreamLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamLog")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl super::Flush for StreamLog {
    fn flush(&self) -> Result<(), StoreError> {
        let offsets = self.flush_offsets();
        self.flush_records().and(offsets)
    }
}

fn create(path: &Path, magic: &[u8; 8]) -> Result<File, StoreError> {
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(io(path))?;
    f.write_all(&record::file_header(magic)).map_err(io(path))?;
    Ok(f)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// The next record of a sequential scan at `pos`: its offset, timestamp
/// and the position after it; `Ok(None)` at the end of what is whole (a
/// short or torn tail). `buf` is reused.
fn next_record(
    scan: &mut impl std::io::Read,
    pos: u64,
    buf: &mut Vec<u8>,
) -> std::io::Result<Option<(u64, u64, u64)>> {
    let mut head = [0u8; HEADER];
    if !read_exact_or_end(scan, &mut head)? {
        return Ok(None);
    }
    let (len, crc) = record::record_header(&head);
    if len as usize <= FIXED + 1 || len > record::MAX_RECORD {
        return Ok(None);
    }
    buf.clear();
    buf.resize(len as usize, 0);
    if !read_exact_or_end(scan, buf)? || !record::crc_ok(buf, crc) {
        return Ok(None);
    }
    Ok(Some((
        u64_at(buf, 0),
        u64_at(buf, 8),
        pos + HEADER as u64 + u64::from(len),
    )))
}

fn read_exact_or_end(r: &mut impl std::io::Read, buf: &mut [u8]) -> std::io::Result<bool> {
    match r.read_exact(buf) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e),
    }
}

/// Fill `buf` from `pos`; false if the file ends first.
fn read_full(file: &File, buf: &mut [u8], pos: u64) -> std::io::Result<bool> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], pos + done as u64) {
            Ok(0) => return Ok(false),
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Decode a checked record's payload (after its header).
fn decode(payload: Bytes) -> Result<StreamRecord, String> {
    let offset = u64_at(&payload, 0);
    let timestamp_ms = u64_at(&payload, 8);
    let flen = payload[FIXED] as usize;
    let at = FIXED + 1;
    if payload.len() < at + flen + record::RECORD_HEADER_LEN {
        return Err("truncated stream record".into());
    }
    let filter = (flen > 0).then(|| payload.slice(at..at + flen));
    let inner = payload.slice(at + flen + record::RECORD_HEADER_LEN..);
    Ok(StreamRecord {
        offset,
        timestamp_ms,
        filter,
        message: record::decode_message(inner)?,
    })
}

impl StreamLog {
    /// Open (or create) the stream in `dir`: every segment's first offset
    /// and time from its name and index; the last segment read through to
    /// find its end (a torn tail is cut off) and its index rebuilt.
    pub fn open(
        dir: PathBuf,
        sync: Arc<Syncer>,
        max_segment_bytes: u64,
    ) -> Result<StreamLog, StoreError> {
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let mut firsts: Vec<u64> = std::fs::read_dir(&dir)
            .map_err(io(&dir))?
            .flatten()
            .filter_map(|e| {
                let name = e.file_name();
                let name = name.to_str()?;
                name.strip_suffix(".segment")?.parse().ok()
            })
            .collect();
        firsts.sort_unstable();
        // The newest segment may be shorter than its header: the process
        // died as it rolled over to it, before the header reached the
        // file. It holds nothing (a record goes in only after the header),
        // so it goes, and the one before is read to its end as the active
        // one; if it was the only one, it is made again, empty, at the
        // offset its name gives.
        let mut remade = None;
        if let Some(&newest) = firsts.last() {
            let path = segment_path(&dir, newest);
            let len = std::fs::metadata(&path).map_err(io(&path))?.len();
            if len < record::HEADER_LEN {
                tracing::warn!(segment = %path.display(), "a stream segment without its header (cut off as it was made) is dropped");
                std::fs::remove_file(&path).map_err(io(&path))?;
                let ipath = index_path(&dir, newest);
                if ipath.exists() {
                    std::fs::remove_file(&ipath).map_err(io(&ipath))?;
                }
                firsts.pop();
                if firsts.is_empty() {
                    remade = Some(newest);
                }
            }
        }
        let mut segments = Vec::new();
        let mut next = 0;
        if let Some(first) = remade {
            segments.push(Self::new_segment(&dir, first)?);
            crate::store::sync_dir(&dir)?;
            next = first;
        }
        for (i, &first) in firsts.iter().enumerate() {
            let last = i + 1 == firsts.len();
            let (seg, end) = Self::open_segment(&dir, first, last)?;
            segments.push(seg);
            next = end;
        }
        // A segment's last time is its successor's first, for sealed ones.
        for i in 1..segments.len() {
            let next_ts = segments[i].first_ts;
            if segments[i - 1].last_ts == 0 {
                segments[i - 1].last_ts = next_ts;
            }
        }
        let last_ts = segments.last().map_or(0, |s| s.last_ts);
        if segments.is_empty() {
            segments.push(Self::new_segment(&dir, 0)?);
            crate::store::sync_dir(&dir)?;
        }
        let (offsets, offsets_file) = Self::open_offsets(&dir)?;
        let log = StreamLog {
            sync,
            max_segment_bytes: max_segment_bytes.max(4096),
            inner: Mutex::new(Inner {
                segments,
                next,
                last_ts,
                pending: Pending::default(),
                offsets_pending: Vec::new(),
                deleted: false,
            }),
            committed: AtomicU64::new(next),
            commits: Arc::new(tokio::sync::Notify::new()),
            offsets_written: AtomicU64::new(offsets.len() as u64),
            offsets: Mutex::new(offsets),
            offsets_file: Mutex::new(Some(offsets_file)),
            dir,
        };
        Ok(log)
    }

    fn new_segment(dir: &Path, first: u64) -> Result<Segment, StoreError> {
        let file = create(&segment_path(dir, first), STREAM_MAGIC)?;
        let index = create(&index_path(dir, first), INDEX_MAGIC)?;
        Ok(Segment {
            first,
            first_ts: 0,
            last_ts: 0,
            len: record::HEADER_LEN,
            indexed: 0,
            last_indexed: 0,
            file: Arc::new(file),
            index: Arc::new(index),
        })
    }

    /// A segment as it is on disk. The last one (`active`) is read to its
    /// end: records past a torn one are cut off, and its index is rebuilt
    /// from what is valid (an index is written with its records but only
    /// the data's sync is waited for, so after a crash either may be
    /// ahead of the other).
    fn open_segment(dir: &Path, first: u64, active: bool) -> Result<(Segment, u64), StoreError> {
        let path = segment_path(dir, first);
        let file = open_rw(&path)?;
        let mut header = [0u8; record::HEADER_LEN as usize];
        if !read_full(&file, &mut header, 0).map_err(io(&path))? {
            return Err(corrupt(&path, 0, "segment shorter than its header"));
        }
        record::check_header(&header, STREAM_MAGIC).map_err(|e| corrupt(&path, 0, e))?;
        let ipath = index_path(dir, first);
        let index = match open_rw(&ipath) {
            Ok(f) => f,
            Err(_) => create(&ipath, INDEX_MAGIC)?,
        };
        let mut seg = Segment {
            first,
            first_ts: 0,
            last_ts: 0,
            len: file.metadata().map_err(io(&path))?.len(),
            indexed: 0,
            last_indexed: 0,
            file: Arc::new(file),
            index: Arc::new(index),
        };
        let mut end = first;
        if active {
            // Rebuild the index from the records that are whole.
            seg.index.set_len(record::HEADER_LEN).map_err(io(&ipath))?;
            let mut pos = record::HEADER_LEN;
            let mut buf = Vec::new();
            let mut entries = Vec::new();
            let mut expected = first;
            // Read through once, sequentially, with a large buffer.
            let mut scan = std::io::BufReader::with_capacity(1 << 20, &*seg.file);
            std::io::Seek::seek(&mut scan, std::io::SeekFrom::Start(pos)).map_err(io(&path))?;
            while let Some((offset, ts, after)) =
                next_record(&mut scan, pos, &mut buf).map_err(io(&path))?
            {
                if offset != expected {
                    break;
                }
                if seg.first_ts == 0 {
                    seg.first_ts = ts;
                }
                seg.last_ts = ts;
                if seg.indexed == 0 || pos - seg.last_indexed >= INDEX_EVERY {
                    entries.extend_from_slice(&offset.to_le_bytes());
                    entries.extend_from_slice(&ts.to_le_bytes());
                    entries.extend_from_slice(&pos.to_le_bytes());
                    seg.indexed += 1;
                    seg.last_indexed = pos;
                }
                expected += 1;
                pos = after;
            }
            if pos < seg.len {
                tracing::warn!(
                    segment = %path.display(),
                    "stream segment ends in a torn or partial record at byte {pos}; cut off there"
                );
                seg.file.set_len(pos).map_err(io(&path))?;
            }
            seg.len = pos;
            seg.index
                .write_all_at(&entries, record::HEADER_LEN)
                .map_err(io(&ipath))?;
            end = expected;
        } else {
            let ilen = seg.index.metadata().map_err(io(&ipath))?.len();
            seg.indexed = ilen.saturating_sub(record::HEADER_LEN) / INDEX_ENTRY as u64;
            if seg.indexed > 0 {
                let e = read_index(&seg.index, 0).map_err(io(&ipath))?;
                seg.first_ts = e.1;
            }
        }
        Ok((seg, end))
    }

    fn open_offsets(dir: &Path) -> Result<(HashMap<String, u64>, File), StoreError> {
        let path = dir.join("offsets");
        let mut offsets = HashMap::new();
        if let Ok(bytes) = std::fs::read(&path)
            && record::check_header(&bytes, OFFSETS_MAGIC).is_ok()
        {
            // Entries: crc u32 | name_len u8 | name | offset u64; a torn
            // tail ends the file.
            let mut at = record::HEADER_LEN as usize;
            while at + 5 <= bytes.len() {
                let crc = u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4"));
                let n = bytes[at + 4] as usize;
                let end = at + 5 + n + 8;
                if end > bytes.len() || crc32fast::hash(&bytes[at + 4..end]) != crc {
                    break;
                }
                let name = String::from_utf8_lossy(&bytes[at + 5..at + 5 + n]).into_owned();
                offsets.insert(name, u64_at(&bytes, at + 5 + n));
                at = end;
            }
        }
        // Compacted at every open: one entry per name.
        let tmp = dir.join("offsets.tmp");
        let mut f = create(&tmp, OFFSETS_MAGIC)?;
        let mut out = Vec::new();
        for (name, offset) in &offsets {
            encode_offset(&mut out, name, *offset);
        }
        f.write_all(&out).map_err(io(&tmp))?;
        f.sync_data().map_err(io(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
        Ok((offsets, f))
    }

    /// Append `message` (its properties given `x-stream-offset` here, so
    /// that a reader sends the stored bytes as they are) with its filter
    /// value. Returns its offset and the group commit's ticket.
    pub fn append(
        self: &Arc<Self>,
        message: &Message,
        filter: Option<&[u8]>,
    ) -> Result<(u64, u64), StoreError> {
        let mut inner = self.inner.lock();
        if inner.deleted {
            return Err(StoreError::Deleted);
        }
        let offset = inner.next;
        let ts = crate::message::now_ms();
        Self::push_record(&mut inner, offset, ts, message, filter);
        drop(inner);
        let ticket = self.sync.wrote(self);
        Ok((offset, ticket))
    }

    /// Place `message` at `offset` with the time `ts_ms` another node gave
    /// it (a replicated stream: every replica's log holds the same records
    /// at the same offsets). An offset this log holds already is left as
    /// it is (a replica applies its log's tail again after a restart); one
    /// past the next is a gap, for the caller to fill first.
    pub fn append_at(
        self: &Arc<Self>,
        offset: u64,
        ts_ms: u64,
        message: &Message,
        filter: Option<&[u8]>,
    ) -> Result<Placed, StoreError> {
        let mut inner = self.inner.lock();
        if inner.deleted {
            return Err(StoreError::Deleted);
        }
        if offset < inner.next {
            return Ok(Placed::Held);
        }
        if offset > inner.next {
            return Ok(Placed::Gap { next: inner.next });
        }
        Self::push_record(&mut inner, offset, ts_ms, message, filter);
        drop(inner);
        Ok(Placed::Appended(self.sync.wrote(self)))
    }

    /// The offset the next record gets (appended, perhaps not yet on disk).
    pub fn next_offset(&self) -> u64 {
        self.inner.lock().next
    }

    /// Start again, empty, at `offset` (past the end): a replica that fell
    /// so far behind that what it lacks is gone from every other replica
    /// (retention removed it) keeps what they keep. Readers go on from
    /// `offset`.
    pub fn restart_at(&self, offset: u64) -> Result<(), StoreError> {
        let gone = {
            let mut inner = self.inner.lock();
            if inner.deleted || offset <= inner.next {
                return Ok(());
            }
            let fresh = Self::new_segment(&self.dir, offset)?;
            crate::store::sync_dir(&self.dir)?;
            let old = std::mem::replace(&mut inner.segments, vec![fresh]);
            inner.pending = Pending::default();
            inner.next = offset;
            self.committed.store(offset, Ordering::Release);
            old.iter()
                .flat_map(|s| {
                    [
                        segment_path(&self.dir, s.first),
                        index_path(&self.dir, s.first),
                    ]
                })
                .collect::<Vec<_>>()
        };
        self.sync.discard(gone);
        self.commits.notify_one();
        Ok(())
    }

    /// Committed records from `from` (or the first kept, if later), about
    /// `max_bytes` of them (at least one if there is one): what another
    /// replica asks for to fill its gap.
    pub fn read_from(
        self: &Arc<Self>,
        from: u64,
        max_bytes: usize,
    ) -> Result<Vec<StreamRecord>, StoreError> {
        let mut reader = self.reader_at(from)?;
        let mut out = Vec::new();
        let mut bytes = 0;
        while bytes < max_bytes {
            let Some(r) = reader.next_record()? else {
                break;
            };
            bytes += r.message.body.len() + r.message.encoded_properties().len() + 64;
            out.push(r);
        }
        Ok(out)
    }

    /// Encode one record into the pending buffer.
    fn push_record(
        inner: &mut Inner,
        offset: u64,
        ts: u64,
        message: &Message,
        filter: Option<&[u8]>,
    ) {
        // Never decreasing along the stream, whatever the clocks of the
        // nodes that gave the times: a seek by time is a binary search.
        let ts = ts.max(inner.last_ts);
        // Every delivery from a stream carries its offset.
        let stamped = message.with_header(
            "x-stream-offset",
            amq_protocol::types::AMQPValue::LongLongInt(offset as i64),
        );
        let meta = RecordMeta {
            published_ms: ts,
            ttl_ms: None,
            body_len: stamped.body.len() as u32,
            priority: 0,
        };
        let filter = filter.map(|f| &f[..f.len().min(255)]).unwrap_or_default();
        let out = &mut inner.pending.bytes;
        let start = out.len();
        out.extend_from_slice(&[0u8; HEADER]);
        out.extend_from_slice(&offset.to_le_bytes());
        out.extend_from_slice(&ts.to_le_bytes());
        out.push(filter.len() as u8);
        out.extend_from_slice(filter);
        record::encode_message(out, &stamped, meta);
        let payload = &out[start + HEADER..];
        let len = payload.len() as u32;
        let crc = crc32fast::hash(payload);
        out[start..start + 4].copy_from_slice(&len.to_le_bytes());
        out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
        inner.pending.records.push((offset, ts, start));
        inner.next = offset + 1;
        inner.last_ts = ts;
    }

    /// Write the pending records (rolling to a new segment where the
    /// active one is full), sync them, then let readers see them.
    fn flush_records(&self) -> Result<(), StoreError> {
        let mut inner = self.inner.lock();
        if inner.deleted || inner.pending.records.is_empty() {
            return Ok(());
        }
        let pending = std::mem::take(&mut inner.pending);
        let upto = inner.next;
        // Written under the lock: appends wait for a round's writes (not
        // for its sync), and a reader's view of the segments never sees a
        // record half-placed.
        let mut synced: Vec<Arc<File>> = Vec::new();
        let segments = inner.segments.len();
        let active = inner.segments.last().map(Segment::position);
        if let Err(e) = self.write_round(&mut inner, &pending, &mut synced) {
            // Undone: the next round writes the same records at the same
            // places again (appends waited on the lock, so none is newer),
            // and no offset is skipped or given twice.
            inner.segments.truncate(segments);
            if let (Some(seg), Some(at)) = (inner.segments.last_mut(), active) {
                seg.restore(at);
            }
            inner.pending = pending;
            return Err(e);
        }
        drop(inner);
        for f in &synced {
            f.sync_data().map_err(io(&self.dir))?;
        }
        self.sync.count(pending.bytes.len() as u64);
        // Never back: a replicated stream's log is also flushed outside
        // the group commit (to fill a gap, or before a snapshot), and a
        // round that wrote earlier records may end after one that wrote
        // and synced later ones.
        self.committed.fetch_max(upto, Ordering::AcqRel);
        self.commits.notify_one();
        Ok(())
    }

    /// Write `pending` into the active segment, rolling to new ones as
    /// they fill, with their index entries.
    fn write_round(
        &self,
        inner: &mut Inner,
        pending: &Pending,
        synced: &mut Vec<Arc<File>>,
    ) -> Result<(), StoreError> {
        let mut index = Vec::new();
        let n = pending.records.len();
        let mut i = 0;
        while i < n {
            let full = {
                let seg = inner.segments.last().expect("never empty");
                seg.len > record::HEADER_LEN && seg.len >= self.max_segment_bytes
            };
            if full {
                debug_assert!(index.is_empty());
                self.seal(inner, synced)?;
                let first = pending.records[i].0;
                inner.segments.push(Self::new_segment(&self.dir, first)?);
                crate::store::sync_dir(&self.dir)?;
            }
            let seg = inner.segments.last_mut().expect("never empty");
            // As many records as fit before the segment is full.
            let mut j = i;
            let mut len = seg.len;
            while j < n && (j == i || len < self.max_segment_bytes) {
                let (offset, ts, start) = pending.records[j];
                let end = pending
                    .records
                    .get(j + 1)
                    .map_or(pending.bytes.len(), |r| r.2);
                let pos = len;
                if seg.indexed == 0 || pos - seg.last_indexed >= INDEX_EVERY {
                    index.extend_from_slice(&offset.to_le_bytes());
                    index.extend_from_slice(&ts.to_le_bytes());
                    index.extend_from_slice(&pos.to_le_bytes());
                    seg.indexed += 1;
                    seg.last_indexed = pos;
                }
                if seg.first_ts == 0 {
                    seg.first_ts = ts;
                }
                seg.last_ts = ts;
                len += (end - start) as u64;
                j += 1;
            }
            let from = pending.records[i].2;
            let to = pending.records.get(j).map_or(pending.bytes.len(), |r| r.2);
            let path = segment_path(&self.dir, seg.first);
            seg.file
                .write_all_at(&pending.bytes[from..to], seg.len)
                .map_err(io(&path))?;
            let ipos = record::HEADER_LEN
                + (seg.indexed - (index.len() / INDEX_ENTRY) as u64) * INDEX_ENTRY as u64;
            seg.index
                .write_all_at(&index, ipos)
                .map_err(io(&index_path(&self.dir, seg.first)))?;
            index.clear();
            seg.len = len;
            if !synced.iter().any(|f| Arc::ptr_eq(f, &seg.file)) {
                synced.push(seg.file.clone());
            }
            i = j;
        }
        Ok(())
    }

    /// The active segment is full: sync it and its index for good.
    fn seal(&self, inner: &mut Inner, synced: &mut Vec<Arc<File>>) -> Result<(), StoreError> {
        let seg = inner.segments.last().expect("never empty");
        seg.file
            .sync_data()
            .map_err(io(&segment_path(&self.dir, seg.first)))?;
        seg.index
            .sync_data()
            .map_err(io(&index_path(&self.dir, seg.first)))?;
        synced.retain(|f| !Arc::ptr_eq(f, &seg.file));
        Ok(())
    }

    fn flush_offsets(&self) -> Result<(), StoreError> {
        let out = std::mem::take(&mut self.inner.lock().offsets_pending);
        if out.is_empty() {
            return Ok(());
        }
        let mut file = self.offsets_file.lock();
        let Some(f) = file.as_mut() else {
            return Ok(());
        };
        let path = self.dir.join("offsets");
        f.write_all(&out).map_err(io(&path))?;
        f.sync_data().map_err(io(&path))
    }

    /// Remember that the consumer `name` has everything up to `offset`:
    /// written in the next group-commit round.
    pub fn store_offset(self: &Arc<Self>, name: &str, offset: u64) {
        {
            let mut offsets = self.offsets.lock();
            if offsets.get(name) == Some(&offset) {
                return;
            }
            offsets.insert(name.to_owned(), offset);
        }
        {
            let mut inner = self.inner.lock();
            if inner.deleted {
                return;
            }
            encode_offset(&mut inner.offsets_pending, name, offset);
        }
        self.offsets_written.fetch_add(1, Ordering::Relaxed);
        self.sync.wrote(self);
    }

    /// The last offset the consumer `name` acknowledged, if it ever did.
    pub fn stored_offset(&self, name: &str) -> Option<u64> {
        self.offsets.lock().get(name).copied()
    }

    /// Every named consumer's stored offset.
    pub fn stored_offsets(&self) -> Vec<(String, u64)> {
        let mut v: Vec<(String, u64)> = self
            .offsets
            .lock()
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        v.sort();
        v
    }

    /// One past the last offset readers may read.
    pub fn committed(&self) -> u64 {
        self.committed.load(Ordering::Acquire)
    }

    /// The first offset still kept.
    pub fn first(&self) -> u64 {
        self.inner.lock().segments[0].first
    }

    /// Offsets, segments and bytes.
    pub fn stats(&self) -> StreamStats {
        let inner = self.inner.lock();
        StreamStats {
            first: inner.segments[0].first,
            committed: self.committed(),
            segments: inner.segments.len(),
            bytes: inner.segments.iter().map(|s| s.len).sum(),
        }
    }

    /// Remove the oldest segments while the stream holds more than
    /// `max_bytes`, or while a segment's newest record is older than
    /// `max_age_ms` at `now_ms`; the active segment always stays. Returns
    /// how many were removed. Readers in a removed segment finish it from
    /// their open file.
    pub fn retain(&self, max_bytes: Option<u64>, max_age_ms: Option<u64>, now_ms: u64) -> usize {
        let mut gone = Vec::new();
        {
            let mut inner = self.inner.lock();
            loop {
                if inner.segments.len() < 2 {
                    break;
                }
                let total: u64 = inner.segments.iter().map(|s| s.len).sum();
                let oldest = &inner.segments[0];
                let too_big = max_bytes.is_some_and(|m| total > m);
                let too_old =
                    max_age_ms.is_some_and(|age| oldest.last_ts.saturating_add(age) < now_ms);
                if !(too_big || too_old) {
                    break;
                }
                let seg = inner.segments.remove(0);
                gone.push(segment_path(&self.dir, seg.first));
                gone.push(index_path(&self.dir, seg.first));
            }
        }
        let n = gone.len() / 2;
        if n > 0 {
            self.sync.discard(gone);
        }
        n
    }

    /// Delete the stream's files (the stream is deleted).
    pub fn destroy(&self) {
        {
            let mut inner = self.inner.lock();
            inner.deleted = true;
            inner.pending = Pending::default();
            inner.offsets_pending.clear();
        }
        self.offsets_file.lock().take();
        if let Err(e) = std::fs::remove_dir_all(&self.dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(dir = %self.dir.display(), "removing a deleted stream's files: {e}");
        }
    }

    /// Whether the stream was deleted.
    pub fn is_deleted(&self) -> bool {
        self.inner.lock().deleted
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A reader positioned at `offset` (clamped to what is kept and what
    /// is committed).
    pub fn reader_at(self: &Arc<Self>, offset: u64) -> Result<Reader, StoreError> {
        let committed = self.committed();
        let (seg, offset) = {
            let inner = self.inner.lock();
            let offset = offset.clamp(inner.segments[0].first, committed);
            let at = inner.segments.partition_point(|s| s.first <= offset).max(1) - 1;
            (SegmentRef::of(&inner.segments[at]), offset)
        };
        // From the last index entry at or before `offset`, skip the rest
        // of one index interval.
        let mut reader = self.indexed_reader(seg, |e| e.0 <= offset)?;
        while reader.next < offset {
            if reader.skip()?.is_none() {
                break;
            }
        }
        Ok(reader)
    }

    /// The first offset whose timestamp is at or after `ts_ms` (the
    /// committed end if none is).
    pub fn offset_at_time(self: &Arc<Self>, ts_ms: u64) -> Result<u64, StoreError> {
        let committed = self.committed();
        let seg = {
            let inner = self.inner.lock();
            // The first segment whose newest record is at or after the time.
            let at = inner
                .segments
                .iter()
                .position(|s| s.last_ts >= ts_ms || s.last_ts == 0)
                .unwrap_or(inner.segments.len() - 1);
            SegmentRef::of(&inner.segments[at])
        };
        // From the last index entry before the time, step to it.
        let mut reader = self.indexed_reader(seg, |e| e.1 < ts_ms)?;
        loop {
            if reader.next >= committed {
                return Ok(committed);
            }
            let before = reader.next;
            match reader.peek_ts()? {
                Some(ts) if ts >= ts_ms => return Ok(before),
                Some(_) => {
                    reader.skip()?;
                }
                None => return Ok(reader.next),
            }
        }
    }

    /// A reader at the last index entry of `seg` for which `before` holds
    /// (entries are ordered, so `before` holds for a prefix of them), or
    /// at the segment's start: a binary search of the index file.
    fn indexed_reader(
        self: &Arc<Self>,
        seg: SegmentRef,
        before: impl Fn((u64, u64, u64)) -> bool,
    ) -> Result<Reader, StoreError> {
        let ipath = index_path(&self.dir, seg.first);
        let (mut lo, mut hi) = (0u64, seg.indexed);
        while lo < hi {
            let mid = (lo + hi) / 2;
            if before(read_index(&seg.index, mid).map_err(io(&ipath))?) {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        let (next, pos) = match lo {
            0 => (seg.first, record::HEADER_LEN),
            k => {
                let e = read_index(&seg.index, k - 1).map_err(io(&ipath))?;
                (e.0, e.2)
            }
        };
        Ok(Reader {
            log: self.clone(),
            file: seg.file,
            segment: seg.first,
            pos,
            next,
            window: Bytes::new(),
            window_at: 0,
            window_committed: 0,
        })
    }
}

/// What a seek needs of a segment, taken out of the log's lock.
struct SegmentRef {
    file: Arc<File>,
    index: Arc<File>,
    first: u64,
    indexed: u64,
}

impl SegmentRef {
    fn of(s: &Segment) -> SegmentRef {
        SegmentRef {
            file: s.file.clone(),
            index: s.index.clone(),
            first: s.first,
            indexed: s.indexed,
        }
    }
}

fn encode_offset(out: &mut Vec<u8>, name: &str, offset: u64) {
    let name = &name.as_bytes()[..name.len().min(255)];
    let start = out.len();
    out.extend_from_slice(&[0u8; 4]);
    out.push(name.len() as u8);
    out.extend_from_slice(name);
    out.extend_from_slice(&offset.to_le_bytes());
    let crc = crc32fast::hash(&out[start + 4..]);
    out[start..start + 4].copy_from_slice(&crc.to_le_bytes());
}

/// Index entry `i` of `index`: (offset, timestamp, position).
fn read_index(index: &File, i: u64) -> std::io::Result<(u64, u64, u64)> {
    let mut e = [0u8; INDEX_ENTRY];
    if !read_full(index, &mut e, record::HEADER_LEN + i * INDEX_ENTRY as u64)? {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "index entry past the end of the index",
        ));
    }
    Ok((u64_at(&e, 0), u64_at(&e, 8), u64_at(&e, 16)))
}

/// A position in a stream, read forward.
pub struct Reader {
    log: Arc<StreamLog>,
    file: Arc<File>,
    /// First offset of the segment `file` is.
    segment: u64,
    pos: u64,
    /// The offset of the record at `pos`.
    next: u64,
    /// The segment's bytes from `window_at`, read ahead: records are
    /// sliced out of it without a copy or a system call each.
    window: Bytes,
    window_at: u64,
    /// Offsets below this were committed (so whole on disk) when the
    /// window was read; a record past it is read again.
    window_committed: u64,
}

/// Bytes a reader reads ahead at once.
const READ_AHEAD: usize = 64 * 1024;

impl std::fmt::Debug for Reader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reader")
            .field("next", &self.next)
            .finish_non_exhaustive()
    }
}

impl Reader {
    /// The offset the next record read has.
    pub fn offset(&self) -> u64 {
        self.next
    }

    /// Move to the segment holding `self.next` (this one ended).
    fn advance_segment(&mut self) -> bool {
        let inner = self.log.inner.lock();
        let Some(seg) = inner.segments.iter().find(|s| s.first > self.segment) else {
            return false;
        };
        if seg.first > self.next {
            // Retention removed what was between: go on from what is kept.
            self.next = seg.first;
        }
        self.segment = seg.first;
        self.file = seg.file.clone();
        self.pos = record::HEADER_LEN;
        true
    }

    /// The record at `pos` if the window holds all of it and it was
    /// committed when the window was read: (payload length, CRC).
    fn in_window(&self) -> Option<(usize, u32)> {
        if self.next >= self.window_committed || self.pos < self.window_at {
            return None;
        }
        let at = (self.pos - self.window_at) as usize;
        let head: &[u8; HEADER] = self.window.get(at..at + HEADER)?.try_into().ok()?;
        let (len, crc) = record::record_header(head);
        (at + HEADER + len as usize <= self.window.len()).then_some((len as usize, crc))
    }

    /// Read the segment from `pos`, at least `need` bytes if it has them.
    fn fill(&mut self, need: usize, committed: u64) -> Result<(), StoreError> {
        let mut buf = vec![0u8; need.max(READ_AHEAD)];
        let mut n = 0;
        while n < buf.len() {
            match self.file.read_at(&mut buf[n..], self.pos + n as u64) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(StoreError::Io {
                        path: segment_path(&self.log.dir, self.segment),
                        source: e,
                    });
                }
            }
        }
        buf.truncate(n);
        self.window = Bytes::from(buf);
        self.window_at = self.pos;
        self.window_committed = committed;
        Ok(())
    }

    /// The next committed record: (offset, timestamp, payload, position
    /// after it); `None` at the end of what is committed.
    fn raw(&mut self) -> Result<Option<(u64, u64, Bytes, u64)>, StoreError> {
        let committed = self.log.committed();
        if self.next >= committed {
            return Ok(None);
        }
        let mut refilled = false;
        loop {
            if let Some((len, crc)) = self.in_window() {
                let at = (self.pos - self.window_at) as usize + HEADER;
                let payload = self.window.slice(at..at + len);
                let path = || segment_path(&self.log.dir, self.segment);
                if len <= FIXED || !record::crc_ok(&payload, crc) {
                    return Err(corrupt(&path(), self.pos, "checksum mismatch"));
                }
                let offset = u64_at(&payload, 0);
                if offset != self.next {
                    return Err(corrupt(
                        &path(),
                        self.pos,
                        format!("offset {offset} where {} was expected", self.next),
                    ));
                }
                let ts = u64_at(&payload, 8);
                return Ok(Some((
                    offset,
                    ts,
                    payload,
                    self.pos + (HEADER + len) as u64,
                )));
            }
            if refilled {
                // Nothing more in this segment: the record is in the next.
                if !self.advance_segment() {
                    return Ok(None);
                }
                refilled = false;
                continue;
            }
            // A record larger than the read-ahead is read whole.
            let need = match self
                .window
                .get((self.pos.saturating_sub(self.window_at)) as usize..)
            {
                Some(rest) if self.pos >= self.window_at && rest.len() >= HEADER => {
                    let head: &[u8; HEADER] = rest[..HEADER].try_into().expect("8 bytes");
                    HEADER
                        + (record::record_header(head).0 as usize).min(record::MAX_RECORD as usize)
                }
                _ => 0,
            };
            self.fill(need, committed)?;
            refilled = true;
        }
    }

    /// Step over the next committed record; its offset, or `None` at the
    /// end.
    fn skip(&mut self) -> Result<Option<u64>, StoreError> {
        Ok(self.raw()?.map(|(o, _, _, after)| {
            self.pos = after;
            self.next = o + 1;
            o
        }))
    }

    fn peek_ts(&mut self) -> Result<Option<u64>, StoreError> {
        Ok(self.raw()?.map(|r| r.1))
    }

    /// The next committed record's filter value and offset, without
    /// decoding its message; `None` at the end.
    pub fn peek_filter(&mut self) -> Result<Option<(u64, Option<Bytes>)>, StoreError> {
        Ok(self.raw()?.map(|(o, _, payload, _)| {
            let flen = payload[FIXED] as usize;
            (
                o,
                (flen > 0).then(|| payload.slice(FIXED + 1..FIXED + 1 + flen)),
            )
        }))
    }

    /// Read the next committed record; `None` at the end.
    pub fn next_record(&mut self) -> Result<Option<StreamRecord>, StoreError> {
        let Some((o, _, payload, after)) = self.raw()? else {
            return Ok(None);
        };
        // The segment's path only for an error: naming it is a format and
        // an allocation, per record otherwise.
        let r = decode(payload)
            .map_err(|e| corrupt(&segment_path(&self.log.dir, self.segment), self.pos, e))?;
        self.pos = after;
        self.next = o + 1;
        Ok(Some(r))
    }

    /// Step over the next record (one a filter does not want).
    pub fn pass(&mut self) -> Result<(), StoreError> {
        self.skip().map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::super::Flush;
    use super::*;
    use crate::message::Message;
    use amq_protocol::protocol::BasicProperties;

    fn open(dir: &Path, segment_bytes: u64) -> Arc<StreamLog> {
        Arc::new(StreamLog::open(dir.to_owned(), Arc::new(Syncer::new()), segment_bytes).unwrap())
    }

    fn msg(i: u64) -> Message {
        Message::new(
            "",
            "s",
            BasicProperties::default(),
            format!("m{i}:{}", "x".repeat(100)),
        )
    }

    /// Append `range` (the even ones with filter value "even") and write
    /// them as a group-commit round would.
    fn append(log: &Arc<StreamLog>, range: std::ops::Range<u64>) {
        for i in range {
            let filter = (i % 2 == 0).then_some(&b"even"[..]);
            let (offset, _) = log.append(&msg(i), filter).unwrap();
            assert_eq!(offset, i);
        }
        log.flush().unwrap();
    }

    fn body(r: &StreamRecord) -> String {
        String::from_utf8_lossy(&r.message.body)
            .split(':')
            .next()
            .unwrap()
            .to_owned()
    }

    fn read_all(log: &Arc<StreamLog>, from: u64) -> Vec<u64> {
        let mut r = log.reader_at(from).unwrap();
        let mut out = Vec::new();
        while let Some(rec) = r.next_record().unwrap() {
            assert_eq!(body(&rec), format!("m{}", rec.offset));
            out.push(rec.offset);
        }
        out
    }

    #[test]
    fn nothing_is_readable_before_its_round_is_written_and_synced() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path(), DEFAULT_SEGMENT_BYTES);
        log.append(&msg(0), None).unwrap();
        assert_eq!(log.committed(), 0);
        assert!(read_all(&log, 0).is_empty());
        log.flush().unwrap();
        assert_eq!(log.committed(), 1);
        assert_eq!(read_all(&log, 0), [0]);
    }

    #[test]
    fn records_roll_over_segments_and_every_offset_is_found_by_the_index() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path(), 16 * 1024);
        for chunk in 0..10 {
            append(&log, chunk * 100..(chunk + 1) * 100);
        }
        let stats = log.stats();
        assert!(stats.segments > 5, "{stats:?}");
        assert_eq!((stats.first, stats.committed), (0, 1000));
        for from in [0, 1, 99, 100, 457, 999] {
            assert_eq!(read_all(&log, from), (from..1000).collect::<Vec<_>>());
        }
        assert!(read_all(&log, 1000).is_empty());
        assert_eq!(read_all(&log, 5000).len(), 0, "past the end: the end");
    }

    #[test]
    fn a_segment_cut_off_before_its_header_is_dropped_on_reopening() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = open(dir.path(), 16 * 1024);
            append(&log, 0..300);
        }
        // Killed as it rolled over: the next segment's file made, its
        // header not written.
        std::fs::File::create(segment_path(dir.path(), 300)).unwrap();
        let log = open(dir.path(), 16 * 1024);
        assert_eq!(log.stats().committed, 300);
        assert_eq!(read_all(&log, 0), (0..300).collect::<Vec<_>>());
        append(&log, 300..310);
        assert_eq!(read_all(&log, 295), (295..310).collect::<Vec<_>>());

        // The only segment left (retention dropped the older ones): it is
        // made again where its name says.
        let alone = tempfile::tempdir().unwrap();
        std::fs::File::create(segment_path(alone.path(), 50)).unwrap();
        let log = open(alone.path(), 16 * 1024);
        assert_eq!(log.stats().committed, 50);
        append(&log, 50..55);
        assert_eq!(read_all(&log, 50), (50..55).collect::<Vec<_>>());
    }

    #[test]
    fn a_reopened_stream_keeps_its_offsets_and_cuts_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = open(dir.path(), 16 * 1024);
            append(&log, 0..300);
        }
        // Tear the last record of the active segment.
        let mut segs: Vec<PathBuf> = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "segment"))
            .collect();
        segs.sort();
        let last = segs.last().unwrap();
        let len = std::fs::metadata(last).unwrap().len();
        let f = OpenOptions::new().write(true).open(last).unwrap();
        f.set_len(len - 7).unwrap();
        drop(f);
        let log = open(dir.path(), 16 * 1024);
        assert_eq!(log.committed(), 299, "the torn record is gone");
        assert_eq!(read_all(&log, 0), (0..299).collect::<Vec<_>>());
        // Appends go on from there, in the same files.
        append(&log, 299..310);
        assert_eq!(read_all(&log, 250), (250..310).collect::<Vec<_>>());
        drop(log);
        let log = open(dir.path(), 16 * 1024);
        assert_eq!(log.committed(), 310);
        assert_eq!(read_all(&log, 0).len(), 310);
    }

    #[test]
    fn a_time_finds_the_first_record_written_at_or_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path(), 8 * 1024);
        append(&log, 0..50);
        std::thread::sleep(std::time::Duration::from_millis(5));
        let t = crate::message::now_ms();
        std::thread::sleep(std::time::Duration::from_millis(5));
        append(&log, 50..120);
        assert_eq!(log.offset_at_time(t).unwrap(), 50);
        assert_eq!(log.offset_at_time(0).unwrap(), 0);
        assert_eq!(log.offset_at_time(u64::MAX).unwrap(), 120);
    }

    #[test]
    fn retention_drops_the_oldest_whole_segments_and_readers_skip_ahead() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path(), 8 * 1024);
        for chunk in 0..10 {
            append(&log, chunk * 50..(chunk + 1) * 50);
        }
        let mut early = log.reader_at(0).unwrap();
        let before = log.stats();
        let removed = log.retain(Some(before.bytes / 2), None, 0);
        log.sync.empty_trash();
        let after = log.stats();
        assert!(removed > 0 && after.segments == before.segments - removed);
        assert!(after.bytes <= before.bytes / 2);
        assert!(after.first > 0);
        assert_eq!(read_all(&log, 0).first(), Some(&after.first));
        // A reader in a removed segment finishes it, then goes on from
        // what is kept: no offset twice, none out of order.
        let mut seen = Vec::new();
        while let Some(r) = early.next_record().unwrap() {
            seen.push(r.offset);
        }
        assert!(seen.windows(2).all(|w| w[1] > w[0]));
        assert_eq!(*seen.last().unwrap(), 499);
        // By age: everything but the active segment is old at a late time.
        log.retain(None, Some(1), u64::MAX / 2);
        assert_eq!(log.stats().segments, 1);
    }

    #[test]
    fn filter_values_are_read_without_decoding_the_message() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path(), DEFAULT_SEGMENT_BYTES);
        append(&log, 0..4);
        let mut r = log.reader_at(0).unwrap();
        let mut even = Vec::new();
        while let Some((o, f)) = r.peek_filter().unwrap() {
            if f.as_deref() == Some(&b"even"[..]) {
                even.push(r.next_record().unwrap().unwrap().offset);
            } else {
                r.pass().unwrap();
            }
            assert!(r.offset() > o);
        }
        assert_eq!(even, [0, 2]);
    }

    #[test]
    fn named_offsets_survive_a_reopen_and_a_torn_entry() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = open(dir.path(), DEFAULT_SEGMENT_BYTES);
            log.store_offset("billing", 7);
            log.store_offset("audit", 3);
            log.store_offset("billing", 9);
            log.flush().unwrap();
            log.store_offset("audit", 5);
            log.flush().unwrap();
        }
        // A half-written entry at the end is ignored.
        let path = dir.path().join("offsets");
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.extend_from_slice(&[1, 2, 3]);
        std::fs::write(&path, bytes).unwrap();
        let log = open(dir.path(), DEFAULT_SEGMENT_BYTES);
        assert_eq!(log.stored_offset("billing"), Some(9));
        assert_eq!(log.stored_offset("audit"), Some(5));
        assert_eq!(log.stored_offset("nobody"), None);
    }

    #[test]
    fn a_round_that_fails_to_write_is_written_again_by_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path(), DEFAULT_SEGMENT_BYTES);
        append(&log, 0..3);
        // The active segment's file turns read-only: the next round fails.
        let path = segment_path(dir.path(), 0);
        let writable = {
            let mut inner = log.inner.lock();
            let seg = inner.segments.last_mut().unwrap();
            std::mem::replace(&mut seg.file, Arc::new(File::open(&path).unwrap()))
        };
        for i in 3..5 {
            log.append(&msg(i), None).unwrap();
        }
        assert!(log.flush().is_err());
        assert_eq!(
            log.committed(),
            3,
            "nothing of the failed round is readable"
        );
        log.inner.lock().segments.last_mut().unwrap().file = writable;
        log.flush().unwrap();
        assert_eq!(read_all(&log, 0), [0, 1, 2, 3, 4]);
        drop(log);
        let log = open(dir.path(), DEFAULT_SEGMENT_BYTES);
        assert_eq!(read_all(&log, 0), [0, 1, 2, 3, 4], "and so after a reopen");
    }

    #[test]
    fn every_delivery_carries_its_offset_in_its_stored_properties() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path(), DEFAULT_SEGMENT_BYTES);
        append(&log, 0..3);
        let mut r = log.reader_at(2).unwrap();
        let rec = r.next_record().unwrap().unwrap();
        let h = rec.message.properties.headers().clone().unwrap();
        assert_eq!(
            h.inner().get("x-stream-offset"),
            Some(&amq_protocol::types::AMQPValue::LongLongInt(2))
        );
    }
}
