//! The message store: what makes durable queues and persistent messages
//! survive a restart or a `kill -9`.
//!
//! * [`definitions`]: durable exchanges, queues and bindings: a JSON
//!   snapshot, replaced atomically.
//! * [`changes`]: the definitions log: each durable change is one appended,
//!   checksummed line (group-committed), replayed over the snapshot at
//!   start and compacted into it once it outgrows it.
//! * [`log`]: one append-only log per durable queue (segment files of
//!   checksummed message records, plus per-segment ack files), read back at
//!   recovery and, for messages paged out of memory, at delivery.
//! * [`Syncer`] (here): group commit. Appends are buffered in their log;
//!   one thread writes every log appended to since its last round,
//!   `fdatasync`s it, then publishes how far the sync reached as a ticket
//!   number. A
//!   publisher confirm for a persistent message waits for its ticket, so a
//!   confirm means the message is on disk, and one sync covers everything
//!   that arrived while the previous one ran: the busier the broker, the
//!   more each sync confirms.
//!
//! Only persistent messages (delivery mode 2) in durable queues are
//! written; transient ones live in memory and are lost on restart, as in
//! RabbitMQ. The format is specified in `docs/storage.md`.

pub mod changes;
pub mod definitions;
mod ids;
pub mod log;
pub mod record;
pub mod stream;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use parking_lot::{Condvar, Mutex};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

pub use changes::{Change, DefinitionsLog};
pub use definitions::Definitions;
pub use log::{QueueLog, RecordMeta, Recovered, StoreRef};

/// Segment size: a segment is reclaimed when all of its records are acked,
/// so smaller segments give disk space back sooner, larger ones mean fewer
/// files. LavinMQ uses the same 8 MiB.
pub const DEFAULT_SEGMENT_BYTES: u64 = 8 << 20;

/// A store failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A record or file is not what was written.
    #[error("{} at offset {offset}: {what}", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Where in it.
        offset: u64,
        /// What is wrong.
        what: String,
    },
    /// Another broker holds the data folder.
    #[error("data folder {} is in use by another wasmq process", .0.display())]
    Locked(PathBuf),
    /// The queue's log was deleted with the queue.
    #[error("queue deleted")]
    Deleted,
}

/// How far the group commit has reached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Synced {
    /// Every ticket up to this one is on disk...
    pub upto: u64,
    /// ...except that tickets up to this one were in a round whose sync
    /// failed: their publishers get a nack.
    pub failed_upto: u64,
}

impl Synced {
    /// Whether `ticket` is settled, and if so whether it is on disk.
    pub fn outcome(&self, ticket: u64) -> Option<bool> {
        (ticket <= self.upto).then_some(ticket > self.failed_upto)
    }
}

/// How many versions of each plugin are kept for rollback.
pub const KEPT_VERSIONS: usize = 5;

/// A plugin version kept in the data folder.
#[derive(Clone, Debug)]
pub struct KeptVersion {
    /// Its content hash.
    pub hash: String,
    /// Its file.
    pub path: PathBuf,
    /// When it last started serving.
    pub served: std::time::SystemTime,
}

/// Store counters (for metrics and benchmarks).
#[derive(Debug, Default)]
pub struct StoreStats {
    /// Group-commit rounds.
    pub syncs: AtomicU64,
    /// Files synced over all rounds.
    pub files_synced: AtomicU64,
    /// Total time spent syncing, nanoseconds.
    pub sync_nanos: AtomicU64,
    /// Bytes written (records and acks).
    pub bytes_written: AtomicU64,
    /// Duration of each group-commit round.
    pub sync_latency: crate::latency::Latency,
}

fn remove_files(paths: Vec<PathBuf>) {
    for path in paths {
        if let Err(e) = std::fs::remove_file(&path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(file = %path.display(), "reclaiming a settled segment: {e}");
        }
    }
}

/// A log the group commit writes and syncs: a queue's or a stream's.
pub(crate) trait Flush: Send + Sync + std::fmt::Debug {
    /// Write what was appended since the last round and sync it.
    fn flush(&self) -> Result<(), StoreError>;
}

impl Flush for QueueLog {
    fn flush(&self) -> Result<(), StoreError> {
        QueueLog::flush(self)
    }
}

/// What the group-commit thread has to do in its next round.
#[derive(Debug, Default)]
struct Inbox {
    /// Logs with records appended since the last round.
    logs: Vec<Arc<dyn Flush>>,
    /// Files to delete.
    trash: Vec<PathBuf>,
}

/// The group-commit thread: its inbox, and the ticket counter.
#[derive(Debug)]
pub struct Syncer {
    dirty: Mutex<Inbox>,
    wake: Condvar,
    issued: AtomicU64,
    synced: watch::Sender<Synced>,
    stop: AtomicBool,
    /// Counters.
    pub stats: StoreStats,
}

impl Syncer {
    pub(crate) fn new() -> Self {
        Syncer {
            dirty: Mutex::new(Inbox::default()),
            wake: Condvar::new(),
            issued: AtomicU64::new(0),
            synced: watch::Sender::new(Synced::default()),
            stop: AtomicBool::new(false),
            stats: StoreStats::default(),
        }
    }

    /// `log` has pending records: write and sync them in the next round,
    /// and return a ticket that a [`Synced`] at or past it covers.
    ///
    /// The ticket is taken under the inbox lock, after the record is in
    /// the log's buffer, and a round reads the counter under the same lock
    /// as it takes the inbox: so the round that takes this log writes this
    /// record (or an earlier round already did) and no round can cover the
    /// ticket without it.
    pub(crate) fn wrote<F: Flush + 'static>(&self, log: &Arc<F>) -> u64 {
        let mut dirty = self.dirty.lock();
        if !dirty
            .logs
            .iter()
            .any(|l| std::ptr::addr_eq(Arc::as_ptr(l), Arc::as_ptr(log)))
        {
            dirty.logs.push(log.clone());
        }
        let ticket = self.issued.fetch_add(1, Ordering::SeqCst) + 1;
        drop(dirty);
        self.wake.notify_one();
        ticket
    }

    /// Delete the files discarded so far now (tests, which run no thread).
    #[cfg(test)]
    pub(crate) fn empty_trash(&self) {
        let trash = std::mem::take(&mut self.dirty.lock().trash);
        remove_files(trash);
    }

    /// Delete these files (settled segments) in the next round, off the
    /// connections' threads.
    pub(crate) fn discard(&self, paths: impl IntoIterator<Item = PathBuf>) {
        self.dirty.lock().trash.extend(paths);
        self.wake.notify_one();
    }

    /// Bytes written (records by the sync thread, acks at once).
    pub(crate) fn count(&self, bytes: u64) {
        self.stats.bytes_written.fetch_add(bytes, Ordering::Relaxed);
    }

    fn run(&self, interval: std::time::Duration) {
        let mut last = Instant::now();
        loop {
            {
                let mut dirty = self.dirty.lock();
                while dirty.logs.is_empty() && dirty.trash.is_empty() {
                    if self.stop.load(Ordering::SeqCst) {
                        return;
                    }
                    self.wake.wait(&mut dirty);
                }
            }
            // Pace the rounds: each costs the kernel a few hundred µs of
            // CPU whatever it carries, and on a busy machine that CPU is
            // taken from the connections. Waiting out the interval lets
            // one round carry what several would have.
            let since = last.elapsed();
            if since < interval && !self.stop.load(Ordering::SeqCst) {
                std::thread::sleep(interval - since);
            }
            last = Instant::now();
            let (target, inbox) = {
                let mut dirty = self.dirty.lock();
                (
                    self.issued.load(Ordering::SeqCst),
                    std::mem::take(&mut *dirty),
                )
            };
            let Inbox { logs, trash } = inbox;
            let started = Instant::now();
            let mut ok = true;
            for log in &logs {
                if let Err(e) = log.flush() {
                    tracing::error!(
                        "writing or syncing a queue log failed; publishes in this round are nacked: {e}"
                    );
                    ok = false;
                }
            }
            let s = &self.stats;
            s.syncs.fetch_add(1, Ordering::Relaxed);
            s.files_synced
                .fetch_add(logs.len() as u64, Ordering::Relaxed);
            let took = started.elapsed();
            s.sync_nanos
                .fetch_add(took.as_nanos() as u64, Ordering::Relaxed);
            s.sync_latency.record(took);
            self.synced.send_modify(|v| {
                v.upto = v.upto.max(target);
                if !ok {
                    v.failed_upto = target;
                }
            });
            // Settled segments go last, after the confirms: unlinking an
            // 8 MiB file took 11-14 ms here, too long for a connection's
            // worker thread and for this round's publishers.
            remove_files(trash);
        }
    }
}

/// Tuning of the store.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// Segment file size.
    pub segment_bytes: u64,
    /// Shortest time from the start of one group-commit round to the
    /// start of the next.
    pub commit_interval: std::time::Duration,
}

/// The default [`StoreOptions::commit_interval`]. Measured at 5k
/// persistent msg/s on two cores (`docs/performance.md`): unpaced, rounds
/// ran ~2,000 times a second carrying two messages each, the sync thread
/// used as much CPU as a connection worker, and the end-to-end p99 was
/// 6.5-12.6 ms; paced at 2 ms, 4.5x fewer rounds, a quarter less CPU, p99
/// 1.9-3.1 ms. A confirm waits at most this much longer.
pub const DEFAULT_COMMIT_INTERVAL: std::time::Duration = std::time::Duration::from_millis(2);

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            segment_bytes: DEFAULT_SEGMENT_BYTES,
            commit_interval: DEFAULT_COMMIT_INTERVAL,
        }
    }
}

/// The store of one data folder.
pub struct Store {
    dir: PathBuf,
    options: StoreOptions,
    sync: Arc<Syncer>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// The definitions' snapshot and change log, once read.
    definitions: std::sync::OnceLock<DefinitionsLog>,
    opened: Mutex<Vec<PathBuf>>,
    /// Held (with an exclusive `flock`) until [`Store::close`].
    lock: Mutex<Option<File>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// Sync a folder, so that files created or renamed in it stay.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| StoreError::Io {
            path: dir.to_owned(),
            source,
        })
}

impl Store {
    /// Open the store in `dir` (created if need be) and start its
    /// group-commit thread. Fails if another process has it open.
    pub fn open(dir: &Path, options: StoreOptions) -> Result<Arc<Store>, StoreError> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| StoreError::Io { path, source }
        };
        std::fs::create_dir_all(dir.join("queues")).map_err(io(dir))?;
        let lock_path = dir.join("LOCK");
        let lock = File::create(&lock_path).map_err(io(&lock_path))?;
        if lock.try_lock().is_err() {
            return Err(StoreError::Locked(dir.to_owned()));
        }
        let sync = Arc::new(Syncer::new());
        let interval = options.commit_interval;
        let thread = {
            let sync = sync.clone();
            std::thread::Builder::new()
                .name("wasmq-sync".into())
                .spawn(move || sync.run(interval))
                .map_err(io(dir))?
        };
        Ok(Arc::new(Store {
            dir: dir.to_owned(),
            options,
            sync,
            thread: Mutex::new(Some(thread)),
            definitions: std::sync::OnceLock::new(),
            opened: Mutex::new(Vec::new()),
            lock: Mutex::new(Some(lock)),
        }))
    }

    /// The data folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The durable definitions on disk: the snapshot with the changes
    /// logged since replayed over it. Opens the log for appending.
    pub fn definitions(&self) -> Result<Definitions, StoreError> {
        if let Some(log) = self.definitions.get() {
            return Ok(log.definitions());
        }
        let (log, defs) = DefinitionsLog::open(&self.dir)?;
        let _ = self.definitions.set(log);
        Ok(defs)
    }

    fn definitions_log(&self) -> Result<&DefinitionsLog, StoreError> {
        if self.definitions.get().is_none() {
            self.definitions()?;
        }
        Ok(self.definitions.get().expect("opened"))
    }

    /// Record `changes` to the durable definitions; returns once they are
    /// on disk (group commit with concurrent callers).
    pub fn append_definitions(&self, changes: &[Change]) -> Result<(), StoreError> {
        self.definitions_log()?.append(changes)
    }

    /// Make every later definitions change fail to save, as on a full disk
    /// (for tests).
    #[doc(hidden)]
    pub fn fail_definition_writes(&self) -> Result<(), StoreError> {
        self.definitions_log()?.fail_appends();
        Ok(())
    }

    /// Replace the durable definitions with `defs` (a new snapshot, an
    /// empty change log).
    pub fn save_definitions(&self, defs: Definitions) -> Result<(), StoreError> {
        self.definitions_log()?.reset(&defs)
    }

    /// Keep `bytes`, the serving version `hash` of plugin `name`, as that
    /// plugin's newest kept version. The last [`KEPT_VERSIONS`] versions
    /// that served are kept, newest first: a durable exchange must come
    /// back after a restart even if its plugin file was deleted meanwhile
    /// (a deleted file keeps serving its last version while the broker
    /// runs, so it must after a restart too), and an operator can roll
    /// back to any of them by hash.
    pub fn keep_plugin(&self, name: &str, hash: &str, bytes: &[u8]) -> Result<(), StoreError> {
        let dir = self.dir.join("plugins");
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| StoreError::Io { path, source }
        };
        let path = dir.join(format!("{name}.{hash}.wasm"));
        if path.exists() {
            // Serving again (a rollback): it becomes the newest.
            File::options()
                .write(true)
                .open(&path)
                .and_then(|f| f.set_modified(std::time::SystemTime::now()))
                .map_err(io(&path))?;
        } else {
            std::fs::create_dir_all(&dir).map_err(io(&dir))?;
            let tmp = dir.join(format!("{name}.{hash}.tmp"));
            std::fs::write(&tmp, bytes)
                .and_then(|()| File::open(&tmp)?.sync_all())
                .map_err(io(&tmp))?;
            std::fs::rename(&tmp, &path).map_err(io(&path))?;
            sync_dir(&dir)?;
        }
        for old in self.kept_versions(name).into_iter().skip(KEPT_VERSIONS) {
            let _ = std::fs::remove_file(old.path);
        }
        Ok(())
    }

    /// The newest version kept of plugin `name`: its hash and bytes.
    pub fn kept_plugin(&self, name: &str) -> Option<(String, Vec<u8>)> {
        let kept = self.kept_versions(name).into_iter().next()?;
        Some((kept.hash, std::fs::read(kept.path).ok()?))
    }

    /// The bytes of version `hash` of plugin `name`, if it is kept.
    pub fn kept_plugin_version(&self, name: &str, hash: &str) -> Option<Vec<u8>> {
        let kept = self
            .kept_versions(name)
            .into_iter()
            .find(|k| k.hash == hash)?;
        std::fs::read(kept.path).ok()
    }

    /// The versions kept of plugin `name`, the one that served last first.
    pub fn kept_versions(&self, name: &str) -> Vec<KeptVersion> {
        let Ok(entries) = std::fs::read_dir(self.dir.join("plugins")) else {
            return Vec::new();
        };
        let mut kept: Vec<KeptVersion> = entries
            .filter_map(|e| {
                let e = e.ok()?;
                let path = e.path();
                let file = path.file_name()?.to_str()?.to_owned();
                let (n, hash) = file.strip_suffix(".wasm")?.rsplit_once('.')?;
                let served = e.metadata().ok()?.modified().ok()?;
                (n == name).then(|| KeptVersion {
                    hash: hash.to_owned(),
                    path,
                    served,
                })
            })
            .collect();
        kept.sort_by_key(|k| std::cmp::Reverse(k.served));
        kept
    }

    /// The folder of a queue's log: named by a hash, since queue names may
    /// hold any character.
    pub fn queue_dir(&self, vhost: &str, queue: &str) -> PathBuf {
        let mut h = Sha256::new();
        h.update(vhost.as_bytes());
        h.update([0]);
        h.update(queue.as_bytes());
        let hex: String = h.finalize()[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        self.dir.join("queues").join(hex)
    }

    /// Open a durable queue's log and recover its unacked messages.
    pub fn open_queue(
        &self,
        vhost: &str,
        queue: &str,
    ) -> Result<(Arc<QueueLog>, Vec<Recovered>), StoreError> {
        let dir = self.queue_dir(vhost, queue);
        let (log, recovered) =
            QueueLog::open(dir.clone(), self.sync.clone(), self.options.segment_bytes)?;
        self.opened.lock().push(dir);
        Ok((Arc::new(log), recovered))
    }

    /// The folder of a stream's log.
    pub fn stream_dir(&self, vhost: &str, queue: &str) -> PathBuf {
        let q = self.queue_dir(vhost, queue);
        self.dir
            .join("streams")
            .join(q.file_name().expect("a hash"))
    }

    /// Open (or create) a stream's log, with segments of at most
    /// `segment_bytes`.
    pub fn open_stream(
        &self,
        vhost: &str,
        queue: &str,
        segment_bytes: u64,
    ) -> Result<Arc<stream::StreamLog>, StoreError> {
        let dir = self.stream_dir(vhost, queue);
        let log = stream::StreamLog::open(dir.clone(), self.sync.clone(), segment_bytes)?;
        self.opened.lock().push(dir);
        Ok(Arc::new(log))
    }

    /// Open (or create) the log of a stream replicated by the cluster in
    /// `dir` (its replica's folder, which goes with the replica): synced
    /// by this store's group commit, outside the folders the store
    /// recovers on its own.
    pub fn open_stream_in(
        &self,
        dir: PathBuf,
        segment_bytes: u64,
    ) -> Result<Arc<stream::StreamLog>, StoreError> {
        Ok(Arc::new(stream::StreamLog::open(
            dir,
            self.sync.clone(),
            segment_bytes,
        )?))
    }

    /// Delete queue logs that no durable queue opened (left by a queue
    /// deleted while its files could not be removed). Call after recovery.
    pub fn remove_orphans(&self) {
        let opened = self.opened.lock();
        for kind in ["queues", "streams"] {
            let Ok(entries) = std::fs::read_dir(self.dir.join(kind)) else {
                continue;
            };
            for e in entries.flatten() {
                let p = e.path();
                if !opened.contains(&p) {
                    tracing::info!(dir = %p.display(), "removing the log of a queue that no longer exists");
                    let _ = std::fs::remove_dir_all(&p);
                }
            }
        }
    }

    /// Follow the group commit.
    pub fn synced(&self) -> watch::Receiver<Synced> {
        self.sync.synced.subscribe()
    }

    /// The ticket of the last write so far.
    pub fn issued(&self) -> u64 {
        self.sync.issued.load(Ordering::SeqCst)
    }

    /// Counters.
    pub fn stats(&self) -> &StoreStats {
        &self.sync.stats
    }

    /// Wait until everything written so far is synced.
    pub async fn flush(&self) {
        let target = self.issued();
        let mut rx = self.synced();
        let _ = rx.wait_for(|s| s.upto >= target).await;
    }

    /// Finish the last sync round and stop the thread (also on drop).
    pub fn close(&self) {
        self.sync.stop.store(true, Ordering::SeqCst);
        // Taking the inbox lock orders this with the thread's check of
        // `stop`: it is either waiting (and woken) or yet to check.
        drop(self.sync.dirty.lock());
        self.sync.wake.notify_all();
        if let Some(t) = self.thread.lock().take() {
            let _ = t.join();
        }
        // The folder is free for the next process (or test) from here.
        self.lock.lock().take();
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        self.close();
    }
}
