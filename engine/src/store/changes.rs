//! The definitions log: durable definitions change by appending, not by
//! rewriting them all.
//!
//! `definitions.json` is a snapshot; `definitions.log` holds the changes
//! made since, one line each: the CRC-32 of the JSON (8 hex digits), a
//! space, the JSON of one [`Change`]. A change states what a definition is
//! *after* it (put) or that it is gone (delete), never a difference, so
//! replaying a change twice is harmless and the last line about a
//! definition is its state.
//!
//! A durable declare, delete, bind or unbind therefore costs one appended
//! line and one `fdatasync`, the same with 100,000 definitions as with 100
//! (rewriting the whole file made it grow with their number). Appends that
//! arrive while a sync runs share the next one (group commit). Once the log
//! outgrows the snapshot (and 4 MiB), the snapshot is rewritten from the
//! [`DefinitionSet`] the log keeps in memory and the log starts over: the
//! rewrite costs what all those appends saved, so each change still costs
//! a constant amount on average.
//!
//! A crash can leave a torn last line; recovery stops there and cuts it off.
//! A bad line before the last is corruption and stops the start.
//!
//! The same [`Change`]s are what a cluster will replicate: the log is the
//! shape of a replicated state machine's command log.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::StoreError;
use super::definitions::{
    BindingDefinition, DEFINITIONS_VERSION, Definitions, ExchangeDefinition, QueueDefinition,
    VHostDefinitions,
};

/// The log is compacted into the snapshot once it is larger than this and
/// than the snapshot.
const COMPACT_MIN_BYTES: u64 = 4 << 20;

/// One change to the durable definitions: the state of one definition
/// after it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Change {
    /// A durable exchange exists, as given.
    PutExchange {
        /// Its vhost.
        vhost: String,
        /// The exchange.
        exchange: ExchangeDefinition,
    },
    /// The exchange is gone.
    DeleteExchange {
        /// Its vhost.
        vhost: String,
        /// Its name.
        name: String,
    },
    /// A durable queue exists, as given.
    PutQueue {
        /// Its vhost.
        vhost: String,
        /// The queue.
        queue: QueueDefinition,
    },
    /// The queue is gone.
    DeleteQueue {
        /// Its vhost.
        vhost: String,
        /// Its name.
        name: String,
    },
    /// A durable binding exists.
    PutBinding {
        /// Its vhost.
        vhost: String,
        /// The binding.
        binding: BindingDefinition,
    },
    /// The binding is gone.
    DeleteBinding {
        /// Its vhost.
        vhost: String,
        /// The binding.
        binding: BindingDefinition,
    },
}

/// What makes a binding itself: its ends, key and arguments (encoded).
type BindingId = (String, String, String, String, Vec<u8>);

fn binding_id(b: &BindingDefinition) -> BindingId {
    (
        b.source.clone(),
        b.destination_type.clone(),
        b.destination.clone(),
        b.routing_key.clone(),
        crate::message::encode_table_body(&b.arguments),
    )
}

/// One vhost's definitions, by name (bindings by what makes them unique).
#[derive(Clone, Debug, Default)]
struct VHostSet {
    exchanges: BTreeMap<String, ExchangeDefinition>,
    queues: BTreeMap<String, QueueDefinition>,
    bindings: BTreeMap<BindingId, BindingDefinition>,
}

/// The durable definitions, keyed so that a change applies in O(log n).
#[derive(Clone, Debug, Default)]
pub struct DefinitionSet {
    vhosts: BTreeMap<String, VHostSet>,
}

impl DefinitionSet {
    /// The set of a snapshot.
    pub fn from_definitions(defs: &Definitions) -> Self {
        let mut set = DefinitionSet::default();
        for v in &defs.vhosts {
            let vs = set.vhosts.entry(v.name.clone()).or_default();
            for x in &v.exchanges {
                vs.exchanges.insert(x.name.clone(), x.clone());
            }
            for q in &v.queues {
                vs.queues.insert(q.name.clone(), q.clone());
            }
            for b in &v.bindings {
                vs.bindings.insert(binding_id(b), b.clone());
            }
        }
        set
    }

    /// Apply one change.
    pub fn apply(&mut self, change: &Change) {
        match change {
            Change::PutExchange { vhost, exchange } => {
                self.vhost(vhost)
                    .exchanges
                    .insert(exchange.name.clone(), exchange.clone());
            }
            Change::DeleteExchange { vhost, name } => {
                self.vhost(vhost).exchanges.remove(name);
            }
            Change::PutQueue { vhost, queue } => {
                self.vhost(vhost)
                    .queues
                    .insert(queue.name.clone(), queue.clone());
            }
            Change::DeleteQueue { vhost, name } => {
                self.vhost(vhost).queues.remove(name);
            }
            Change::PutBinding { vhost, binding } => {
                self.vhost(vhost)
                    .bindings
                    .insert(binding_id(binding), binding.clone());
            }
            Change::DeleteBinding { vhost, binding } => {
                self.vhost(vhost).bindings.remove(&binding_id(binding));
            }
        }
    }

    fn vhost(&mut self, name: &str) -> &mut VHostSet {
        self.vhosts.entry(name.to_owned()).or_default()
    }

    /// As a snapshot. A binding whose exchange or queue is not in the set
    /// (a crash between a delete and the deletes of its bindings) is left
    /// out; the predeclared `amq.*` exchanges are not in the set but always
    /// exist.
    pub fn to_definitions(&self) -> Definitions {
        let mut vhosts = Vec::new();
        for (name, v) in &self.vhosts {
            let exchange_exists =
                |x: &str| x.starts_with("amq.") || x.is_empty() || v.exchanges.contains_key(x);
            let bindings = v
                .bindings
                .values()
                .filter(|b| {
                    exchange_exists(&b.source)
                        && if b.destination_type == "exchange" {
                            exchange_exists(&b.destination)
                        } else {
                            v.queues.contains_key(&b.destination)
                        }
                })
                .cloned()
                .collect::<Vec<_>>();
            if v.exchanges.is_empty() && v.queues.is_empty() && bindings.is_empty() {
                continue;
            }
            vhosts.push(VHostDefinitions {
                name: name.clone(),
                exchanges: v.exchanges.values().cloned().collect(),
                queues: v.queues.values().cloned().collect(),
                bindings,
            });
        }
        Definitions {
            version: DEFINITIONS_VERSION,
            vhosts,
        }
    }
}

/// What the log's writer holds.
struct Writer {
    file: File,
    /// The definitions the snapshot and the log hold together.
    set: DefinitionSet,
    /// Bytes in the log, and in the snapshot last written.
    log_bytes: u64,
    snapshot_bytes: u64,
}

/// The snapshot and the log of one data folder.
pub struct DefinitionsLog {
    /// Compact once the log is over this and over the snapshot.
    compact_min: u64,
    snapshot: PathBuf,
    path: PathBuf,
    writer: Mutex<Writer>,
    /// Appends written so far (the group commit's sequence).
    appended: AtomicU64,
    /// A handle to the log for `fdatasync`, and how many appends are on
    /// disk. Held while syncing: appends that arrive meanwhile wait here,
    /// then find themselves synced by the next one.
    synced: Mutex<(File, u64)>,
    /// Set by tests: every append fails as a full disk would.
    failing: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for DefinitionsLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DefinitionsLog")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

/// One log line for `change`.
fn line(change: &Change) -> Vec<u8> {
    let json = serde_json::to_vec(change).expect("changes serialize");
    let mut out = format!("{:08x} ", crc32fast::hash(&json)).into_bytes();
    out.extend_from_slice(&json);
    out.push(b'\n');
    out
}

/// The changes in `bytes` (a log's contents), and the length of the part
/// that holds whole, good lines (a torn last line is cut off there).
fn parse(path: &Path, bytes: &[u8]) -> Result<(Vec<Change>, usize), StoreError> {
    let mut changes = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let Some(len) = bytes[at..].iter().position(|&b| b == b'\n') else {
            // The last line never got its newline: torn by a crash.
            break;
        };
        let text = &bytes[at..at + len];
        let parsed = (text.len() > 9 && text[8] == b' ')
            .then(|| {
                let crc = u32::from_str_radix(std::str::from_utf8(&text[..8]).ok()?, 16).ok()?;
                let json = &text[9..];
                (crc32fast::hash(json) == crc)
                    .then(|| serde_json::from_slice::<Change>(json).ok())
                    .flatten()
            })
            .flatten();
        match parsed {
            Some(c) => changes.push(c),
            None if at + len + 1 == bytes.len() => break,
            None => {
                return Err(StoreError::Corrupt {
                    path: path.to_owned(),
                    offset: at as u64,
                    what: "a definitions log line that does not check out".into(),
                });
            }
        }
        at += len + 1;
    }
    Ok((changes, at))
}

impl DefinitionsLog {
    /// Open the snapshot `dir/definitions.json` and the log
    /// `dir/definitions.log`, replay the log, and return the definitions
    /// they hold together.
    pub fn open(dir: &Path) -> Result<(DefinitionsLog, Definitions), StoreError> {
        Self::open_with(dir, COMPACT_MIN_BYTES)
    }

    fn open_with(
        dir: &Path,
        compact_min: u64,
    ) -> Result<(DefinitionsLog, Definitions), StoreError> {
        let snapshot = dir.join("definitions.json");
        let path = dir.join("definitions.log");
        let base = Definitions::load(&snapshot)?;
        let snapshot_bytes = std::fs::metadata(&snapshot).map_or(0, |m| m.len());
        let mut set = DefinitionSet::from_definitions(&base);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io(&path)(e)),
        };
        let (changes, good) = parse(&path, &bytes)?;
        for c in &changes {
            set.apply(c);
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io(&path))?;
        if good < bytes.len() {
            tracing::warn!(
                file = %path.display(),
                "cutting off a torn last line ({} bytes) left by a crash",
                bytes.len() - good
            );
            file.set_len(good as u64).map_err(io(&path))?;
            file.sync_all().map_err(io(&path))?;
        }
        let sync = file.try_clone().map_err(io(&path))?;
        let defs = set.to_definitions();
        Ok((
            DefinitionsLog {
                compact_min,
                snapshot,
                path,
                writer: Mutex::new(Writer {
                    file,
                    set,
                    log_bytes: good as u64,
                    snapshot_bytes,
                }),
                appended: AtomicU64::new(0),
                synced: Mutex::new((sync, 0)),
                failing: std::sync::atomic::AtomicBool::new(false),
            },
            defs,
        ))
    }

    /// Append `changes` and return once they are on disk.
    pub fn append(&self, changes: &[Change]) -> Result<(), StoreError> {
        if changes.is_empty() {
            return Ok(());
        }
        if self.failing.load(Ordering::Relaxed) {
            return Err(io(&self.path)(std::io::Error::from(
                std::io::ErrorKind::StorageFull,
            )));
        }
        // Lock order: `writer`, released, then `synced`; never both (a
        // syncing caller holds `synced` and reads `appended`).
        let (seq, compacted) = {
            let mut w = self.writer.lock();
            let mut bytes = Vec::new();
            for c in changes {
                w.set.apply(c);
                bytes.extend(line(c));
            }
            w.file.write_all(&bytes).map_err(io(&self.path))?;
            w.log_bytes += bytes.len() as u64;
            let seq = self.appended.fetch_add(1, Ordering::AcqRel) + 1;
            let compacted = w.log_bytes > self.compact_min.max(w.snapshot_bytes);
            if compacted {
                self.compact(&mut w)?;
            }
            (seq, compacted)
        };
        let mut synced = self.synced.lock();
        if compacted {
            // The snapshot is synced and holds everything appended so far.
            synced.1 = synced.1.max(seq);
            return Ok(());
        }
        if synced.1 >= seq {
            return Ok(());
        }
        // Everything appended up to here is written: one sync covers it.
        let upto = self.appended.load(Ordering::Acquire);
        synced.0.sync_data().map_err(io(&self.path))?;
        synced.1 = upto;
        Ok(())
    }

    /// Replace everything with `defs`: a new snapshot, an empty log.
    pub fn reset(&self, defs: &Definitions) -> Result<(), StoreError> {
        let seq = {
            let mut w = self.writer.lock();
            w.set = DefinitionSet::from_definitions(defs);
            self.compact(&mut w)?;
            self.appended.load(Ordering::Acquire)
        };
        let mut synced = self.synced.lock();
        synced.1 = synced.1.max(seq);
        Ok(())
    }

    /// Write the set as the snapshot, then empty the log (a crash in
    /// between replays the log over the new snapshot: harmless, as every
    /// change states a final state).
    fn compact(&self, w: &mut Writer) -> Result<(), StoreError> {
        let defs = w.set.to_definitions();
        defs.save(&self.snapshot)?;
        w.snapshot_bytes = std::fs::metadata(&self.snapshot).map_or(0, |m| m.len());
        w.file.set_len(0).map_err(io(&self.path))?;
        w.file.sync_all().map_err(io(&self.path))?;
        w.log_bytes = 0;
        Ok(())
    }

    /// The definitions as the log holds them now.
    pub fn definitions(&self) -> Definitions {
        self.writer.lock().set.to_definitions()
    }

    /// Make every later append fail (tests of what a failing disk does).
    #[doc(hidden)]
    pub fn fail_appends(&self) {
        self.failing.store(true, Ordering::Relaxed);
    }

    /// Bytes in the log now (for tests and diagnostics).
    pub fn log_bytes(&self) -> u64 {
        self.writer.lock().log_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol::types::{AMQPValue, FieldTable, ShortString};

    fn queue(vhost: &str, name: &str) -> Change {
        Change::PutQueue {
            vhost: vhost.into(),
            queue: QueueDefinition {
                name: name.into(),
                auto_delete: false,
                arguments: FieldTable::default(),
            },
        }
    }

    fn binding(source: &str, queue: &str, key: &str) -> BindingDefinition {
        let mut arguments = FieldTable::default();
        arguments.insert(
            ShortString::from("x-match"),
            AMQPValue::LongString("all".into()),
        );
        BindingDefinition {
            source: source.into(),
            destination: queue.into(),
            destination_type: "queue".into(),
            routing_key: key.into(),
            arguments,
        }
    }

    fn exchange(vhost: &str, name: &str) -> Change {
        Change::PutExchange {
            vhost: vhost.into(),
            exchange: ExchangeDefinition {
                name: name.into(),
                kind: "topic".into(),
                ..Default::default()
            },
        }
    }

    #[test]
    fn changes_replay_over_the_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (log, defs) = DefinitionsLog::open(dir.path()).unwrap();
            assert!(defs.vhosts.is_empty());
            log.append(&[exchange("/", "x"), queue("/", "a"), queue("/", "b")])
                .unwrap();
            log.append(&[Change::PutBinding {
                vhost: "/".into(),
                binding: binding("x", "a", "k.#"),
            }])
            .unwrap();
            // Idempotent: the same binding twice is one binding.
            log.append(&[Change::PutBinding {
                vhost: "/".into(),
                binding: binding("x", "a", "k.#"),
            }])
            .unwrap();
            log.append(&[Change::DeleteQueue {
                vhost: "/".into(),
                name: "b".into(),
            }])
            .unwrap();
        }
        let (log, defs) = DefinitionsLog::open(dir.path()).unwrap();
        let v = &defs.vhosts[0];
        assert_eq!(v.exchanges.len(), 1);
        assert_eq!(
            v.queues.iter().map(|q| &q.name[..]).collect::<Vec<_>>(),
            ["a"]
        );
        assert_eq!(v.bindings, vec![binding("x", "a", "k.#")]);
        assert_eq!(log.definitions(), defs);
    }

    #[test]
    fn a_torn_last_line_is_cut_off_and_a_bad_middle_line_is_corruption() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (log, _) = DefinitionsLog::open(dir.path()).unwrap();
            log.append(&[queue("/", "a")]).unwrap();
            log.append(&[queue("/", "b")]).unwrap();
        }
        let path = dir.path().join("definitions.log");
        let full = std::fs::read(&path).unwrap();
        // Torn: the second line lost its end.
        std::fs::write(&path, &full[..full.len() - 5]).unwrap();
        let (log, defs) = DefinitionsLog::open(dir.path()).unwrap();
        assert_eq!(defs.vhosts[0].queues.len(), 1);
        let first = full.iter().position(|&b| b == b'\n').unwrap() + 1;
        assert_eq!(log.log_bytes(), first as u64);
        assert_eq!(std::fs::read(&path).unwrap().len(), first);
        log.append(&[queue("/", "c")]).unwrap();
        drop(log);
        let (_, defs) = DefinitionsLog::open(dir.path()).unwrap();
        assert_eq!(defs.vhosts[0].queues.len(), 2);
        // A flipped byte in the first of two lines.
        let mut bad = std::fs::read(&path).unwrap();
        bad[12] ^= 0x20;
        std::fs::write(&path, &bad).unwrap();
        let e = DefinitionsLog::open(dir.path()).unwrap_err().to_string();
        assert!(e.contains("definitions.log at offset 0"), "{e}");
    }

    #[test]
    fn the_log_is_compacted_into_the_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _) = DefinitionsLog::open_with(dir.path(), 4096).unwrap();
        let mut n = 0;
        // Past 4 KiB of lines (and the snapshot's size), the log starts over.
        while log.log_bytes() > 0 || n == 0 {
            log.append(&[queue("/", &format!("q{n}"))]).unwrap();
            n += 1;
            assert!(n < 10_000, "never compacted");
        }
        log.append(&[Change::DeleteQueue {
            vhost: "/".into(),
            name: "q0".into(),
        }])
        .unwrap();
        drop(log);
        let (_, defs) = DefinitionsLog::open(dir.path()).unwrap();
        assert_eq!(defs.vhosts[0].queues.len(), n - 1);
    }

    #[test]
    fn concurrent_appends_share_syncs_and_survive_compaction() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _) = DefinitionsLog::open_with(dir.path(), 4096).unwrap();
        let log = std::sync::Arc::new(log);
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let log = log.clone();
                std::thread::spawn(move || {
                    for i in 0..150 {
                        log.append(&[queue("/", &format!("t{t}.q{i}"))]).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        drop(log);
        let (_, defs) = DefinitionsLog::open(dir.path()).unwrap();
        assert_eq!(defs.vhosts[0].queues.len(), 8 * 150);
    }

    #[test]
    fn dangling_bindings_are_left_out() {
        let mut set = DefinitionSet::default();
        set.apply(&exchange("/", "x"));
        set.apply(&queue("/", "a"));
        set.apply(&Change::PutBinding {
            vhost: "/".into(),
            binding: binding("x", "a", "k"),
        });
        set.apply(&Change::PutBinding {
            vhost: "/".into(),
            binding: binding("amq.topic", "a", "k"),
        });
        assert_eq!(set.to_definitions().vhosts[0].bindings.len(), 2);
        set.apply(&Change::DeleteQueue {
            vhost: "/".into(),
            name: "a".into(),
        });
        assert!(set.to_definitions().vhosts[0].bindings.is_empty());
    }
}
