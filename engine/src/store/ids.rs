//! A deduplicating queue's ids on disk: `queues/<id>/dedup.ids`, beside
//! its segments, written and synced in the same group-commit round as the
//! queue's messages. A publish is confirmed only once its id is on disk,
//! so a duplicate sent after a crash within the window is still caught.
//!
//! ```text
//! header (16 bytes: magic, version) | record | record | ...
//! record (32 bytes): key (16) | expires_ms (8) | crc32 of the 24 (4) | 0 (4)
//! ```
//!
//! Appends only. The file is rewritten from the live ids (to a temporary
//! file, synced, then renamed over it) when it holds more than twice as
//! many records as there are live ids, so its size follows the window,
//! not the history. A torn record at the tail (a crash mid-write) ends the
//! reading there.

use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::{StoreError, sync_dir};
use crate::dedup::Key;

const MAGIC: &[u8; 8] = b"WQIDS\0\0\x01";
const HEADER: u64 = 16;
const RECORD: usize = 32;

fn io(path: &Path) -> impl Fn(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

fn encode(out: &mut Vec<u8>, key: Key, expires: u64) {
    let start = out.len();
    out.extend_from_slice(&key.0.to_le_bytes());
    out.extend_from_slice(&key.1.to_le_bytes());
    out.extend_from_slice(&expires.to_le_bytes());
    let crc = crc32fast::hash(&out[start..start + 24]);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
}

fn decode(r: &[u8]) -> Option<(Key, u64)> {
    let u = |i: usize| u64::from_le_bytes(r[i..i + 8].try_into().expect("8 bytes"));
    let crc = u32::from_le_bytes(r[24..28].try_into().expect("4 bytes"));
    (crc32fast::hash(&r[..24]) == crc).then(|| ((u(0), u(8)), u(16)))
}

fn header() -> [u8; HEADER as usize] {
    let mut h = [0u8; HEADER as usize];
    h[..8].copy_from_slice(MAGIC);
    h
}

/// What waits to be written to a queue's ids file (publishers add to it;
/// the sync thread takes it).
#[derive(Debug, Default)]
pub(crate) struct IdsPending {
    pending: Vec<u8>,
    /// The live ids, to replace the file's content with.
    rewrite: Option<Vec<u8>>,
    /// Records in the file and waiting (live or expired).
    pub(super) records: u64,
}

impl IdsPending {
    /// Records on disk or waiting.
    pub fn records(&self) -> u64 {
        self.records
    }

    /// An id to write in the next round.
    pub fn push(&mut self, key: Key, expires: u64) {
        encode(&mut self.pending, key, expires);
        self.records += 1;
    }

    /// Replace the file with `live` (and what is pushed after) in the next
    /// round.
    pub fn rewrite(&mut self, live: &[(Key, u64)]) {
        let mut bytes = Vec::with_capacity(live.len() * RECORD);
        for (k, e) in live {
            encode(&mut bytes, *k, *e);
        }
        self.pending.clear();
        self.records = live.len() as u64;
        self.rewrite = Some(bytes);
    }

    /// Take what is to be written: (a new content, if rewritten; appends).
    pub fn take(&mut self) -> (Option<Vec<u8>>, Vec<u8>) {
        (self.rewrite.take(), std::mem::take(&mut self.pending))
    }

    /// Put back what could not be written (ahead of newer appends).
    pub fn restore(&mut self, rewrite: Option<Vec<u8>>, mut appends: Vec<u8>) {
        if self.rewrite.is_none() {
            self.rewrite = rewrite;
            appends.append(&mut self.pending);
            self.pending = appends;
        }
    }
}

/// One queue's ids file, as the sync thread writes it.
#[derive(Debug)]
pub(crate) struct IdsFile {
    path: PathBuf,
    file: Option<File>,
    len: u64,
}

impl IdsFile {
    /// The ids file in `dir` and the ids in it (a file of another format
    /// is an error; a torn tail is cut off).
    pub fn open(dir: &Path) -> Result<(IdsFile, Vec<(Key, u64)>), StoreError> {
        let path = dir.join("dedup.ids");
        let mut f = IdsFile {
            path,
            file: None,
            len: 0,
        };
        let bytes = match std::fs::read(&f.path) {
            Ok(b) => b,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok((f, Vec::new())),
            Err(e) => return Err(io(&f.path)(e)),
        };
        if bytes.len() < HEADER as usize || &bytes[..8] != MAGIC {
            return Err(StoreError::Corrupt {
                path: f.path.clone(),
                offset: 0,
                what: "not a deduplication ids file".into(),
            });
        }
        let mut ids = Vec::new();
        let mut at = HEADER as usize;
        while at + RECORD <= bytes.len() {
            let Some(r) = decode(&bytes[at..at + RECORD]) else {
                break;
            };
            ids.push(r);
            at += RECORD;
        }
        if at != bytes.len() {
            tracing::warn!(file = %f.path.display(), offset = at, "torn deduplication record at the tail; cut off");
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&f.path)
            .map_err(io(&f.path))?;
        file.set_len(at as u64).map_err(io(&f.path))?;
        f.len = at as u64;
        f.file = Some(file);
        Ok((f, ids))
    }

    /// Write a round's ids (the folder exists): the rewrite, if any, to a
    /// temporary file renamed over the old one, then the appends; synced.
    pub fn write(&mut self, rewrite: Option<&[u8]>, appends: &[u8]) -> Result<(), StoreError> {
        if let Some(content) = rewrite {
            let tmp = self.path.with_extension("ids.tmp");
            let f = File::create(&tmp).map_err(io(&tmp))?;
            f.write_all_at(&header(), 0).map_err(io(&tmp))?;
            f.write_all_at(content, HEADER).map_err(io(&tmp))?;
            f.sync_data().map_err(io(&tmp))?;
            std::fs::rename(&tmp, &self.path).map_err(io(&self.path))?;
            if let Some(dir) = self.path.parent() {
                sync_dir(dir)?;
            }
            self.len = HEADER + content.len() as u64;
            self.file = Some(
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&self.path)
                    .map_err(io(&self.path))?,
            );
        }
        if appends.is_empty() {
            return Ok(());
        }
        if self.file.is_none() {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&self.path)
                .map_err(io(&self.path))?;
            f.write_all_at(&header(), 0).map_err(io(&self.path))?;
            self.len = HEADER;
            self.file = Some(f);
            if let Some(dir) = self.path.parent() {
                sync_dir(dir)?;
            }
        }
        let f = self.file.as_ref().expect("opened");
        f.write_all_at(appends, self.len).map_err(io(&self.path))?;
        self.len += appends.len() as u64;
        f.sync_data().map_err(io(&self.path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_survive_reopening_a_rewrite_and_a_torn_tail() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut f, ids) = IdsFile::open(tmp.path()).unwrap();
        assert!(ids.is_empty());
        let mut p = IdsPending::default();
        p.push((1, 2), 100);
        p.push((3, 4), 200);
        let (r, a) = p.take();
        f.write(r.as_deref(), &a).unwrap();
        drop(f);
        let (mut f, ids) = IdsFile::open(tmp.path()).unwrap();
        assert_eq!(ids, vec![((1, 2), 100), ((3, 4), 200)]);
        // Rewritten to the live ids, with one pushed after.
        p.rewrite(&[((3, 4), 200)]);
        p.push((5, 6), 300);
        assert_eq!(p.records(), 2);
        let (r, a) = p.take();
        f.write(r.as_deref(), &a).unwrap();
        drop(f);
        // A torn record at the tail is cut off.
        let path = tmp.path().join("dedup.ids");
        let len = std::fs::metadata(&path).unwrap().len();
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(&[7; 20], len).unwrap();
        let (_, ids) = IdsFile::open(tmp.path()).unwrap();
        assert_eq!(ids, vec![((3, 4), 200), ((5, 6), 300)]);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), len);
    }
}
