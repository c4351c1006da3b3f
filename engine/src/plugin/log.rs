//! What a plugin may write to the broker's log through `wasmq::log`, and
//! who sees it.
//!
//! A plugin's log lines go to the broker's own log (with the plugin's name
//! and version), so a chatty or hostile plugin could fill the disk: 8
//! exchanges logging 1 MiB lines wrote 190 MiB in 10 s when the only bound
//! was lines per second per instance (and a rebuilt instance got a fresh
//! window). The budget here is per plugin, shared by all its instances and
//! versions for the life of the broker: lines and bytes per second, each
//! line cut to a length, and what was dropped is counted for `/metrics`.
//!
//! A plugin's author also wants its lines apart from the broker's: each
//! plugin keeps its last [`RECENT`] lines and a broadcast channel that the
//! admin API streams to followers (`wasmq plugin logs NAME --follow`); a
//! follower too slow for it misses lines and is told how many.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::broadcast;

use crate::broker::Map;

/// Lines a plugin may log per second, all its instances together.
pub const LINES_PER_SECOND: u32 = 100;
/// Bytes a plugin may log per second, all its instances together.
pub const BYTES_PER_SECOND: usize = 64 << 10;
/// Longest line kept; a longer one is cut, and says so.
pub const LINE_BYTES: usize = 4 << 10;
/// Lines kept per plugin for `GET /api/plugins/{name}/logs`.
pub const RECENT: usize = 200;
/// Lines a follower may fall behind before it misses some.
const FOLLOW_QUEUE: usize = 1024;

/// The levels of `wasmq::log`, by the ABI's number (1: error ... 5: trace).
pub const LEVELS: [&str; 5] = ["error", "warn", "info", "debug", "trace"];

/// One line a plugin logged.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LogLine {
    /// When (ms since the epoch).
    pub at_ms: u64,
    /// The plugin.
    pub plugin: String,
    /// The version that logged it (short hash).
    pub version: String,
    /// `error`, `warn`, `info`, `debug` or `trace`.
    pub level: String,
    /// The line.
    pub message: String,
}

/// One plugin's log: its budget, counts, last lines and followers.
#[derive(Debug)]
pub struct PluginLog {
    /// Start of the current one-second window, lines and bytes in it.
    window: Mutex<(Instant, u32, usize)>,
    /// Lines refused for being over the budget.
    dropped: AtomicU64,
    /// Lines written, per level.
    lines: [AtomicU64; 5],
    recent: Mutex<VecDeque<Arc<LogLine>>>,
    followers: broadcast::Sender<Arc<LogLine>>,
}

impl PluginLog {
    fn new() -> Self {
        PluginLog {
            window: Mutex::new((Instant::now(), 0, 0)),
            dropped: AtomicU64::new(0),
            lines: Default::default(),
            recent: Mutex::new(VecDeque::new()),
            followers: broadcast::channel(FOLLOW_QUEUE).0,
        }
    }

    /// Write an admitted line: to the broker's log, the counts, the last
    /// lines and any follower.
    pub fn write(&self, plugin: &str, version: &str, level: i32, text: String) {
        let i = (level.clamp(1, 5) - 1) as usize;
        self.lines[i].fetch_add(1, Ordering::Relaxed);
        // A plugin's newline must not start a line of the broker's log.
        let shown = crate::untrusted::escaped(&text);
        match i {
            0 => tracing::error!(target: "wasmq::plugin", plugin, version, "{shown}"),
            1 => tracing::warn!(target: "wasmq::plugin", plugin, version, "{shown}"),
            2 => tracing::info!(target: "wasmq::plugin", plugin, version, "{shown}"),
            3 => tracing::debug!(target: "wasmq::plugin", plugin, version, "{shown}"),
            _ => tracing::trace!(target: "wasmq::plugin", plugin, version, "{shown}"),
        }
        let line = Arc::new(LogLine {
            at_ms: crate::message::now_ms(),
            plugin: plugin.to_owned(),
            version: version.to_owned(),
            level: LEVELS[i].to_owned(),
            message: text,
        });
        {
            let mut r = self.recent.lock();
            if r.len() == RECENT {
                r.pop_front();
            }
            r.push_back(line.clone());
        }
        // No follower is not an error.
        let _ = self.followers.send(line);
    }

    /// The last lines, oldest first.
    pub fn recent(&self) -> Vec<LogLine> {
        self.recent.lock().iter().map(|l| (**l).clone()).collect()
    }

    /// Follow the lines written from now on.
    pub fn follow(&self) -> broadcast::Receiver<Arc<LogLine>> {
        self.followers.subscribe()
    }

    /// Lines written, per level name.
    pub fn counts(&self) -> [(&'static str, u64); 5] {
        std::array::from_fn(|i| (LEVELS[i], self.lines[i].load(Ordering::Relaxed)))
    }

    /// Whether a line of `len` bytes (after the cut) may be written now;
    /// counts it either way.
    pub fn admit(&self, len: usize) -> bool {
        let now = Instant::now();
        let mut w = self.window.lock();
        if now.duration_since(w.0) >= Duration::from_secs(1) {
            *w = (now, 0, 0);
        }
        if w.1 >= LINES_PER_SECOND || w.2 + len > BYTES_PER_SECOND {
            drop(w);
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        w.1 += 1;
        w.2 += len;
        true
    }

    /// Lines dropped so far.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// Every plugin's log, by plugin name; kept by the plugin host so that
/// new instances and new versions of a plugin share its budget.
#[derive(Debug, Default)]
pub struct PluginLogs(Mutex<Map<Arc<str>, Arc<PluginLog>>>);

impl PluginLogs {
    /// The log of plugin `name`.
    pub fn of(&self, name: &str) -> Arc<PluginLog> {
        let mut m = self.0.lock();
        if let Some(b) = m.get(name) {
            return b.clone();
        }
        let b = Arc::new(PluginLog::new());
        m.insert(name.into(), b.clone());
        b
    }

    /// Whether plugin `name` has a log (it was loaded or instantiated).
    pub fn contains(&self, name: &str) -> bool {
        self.0.lock().contains_key(name)
    }

    /// Lines written per plugin and level, sorted by name (for `/metrics`).
    pub fn counts(&self) -> Vec<(String, [(&'static str, u64); 5])> {
        let mut v: Vec<_> = self
            .0
            .lock()
            .iter()
            .map(|(n, b)| (n.to_string(), b.counts()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Lines dropped per plugin, sorted by name (for `/metrics`).
    pub fn dropped(&self) -> Vec<(String, u64)> {
        let mut v: Vec<_> = self
            .0
            .lock()
            .iter()
            .map(|(n, b)| (n.to_string(), b.dropped()))
            .collect();
        v.sort();
        v
    }
}

/// `bytes` as a log line: lossy UTF-8, cut to [`LINE_BYTES`] on a
/// character boundary with a note of what was cut.
pub fn line(bytes: &[u8]) -> String {
    let cut = bytes.len().saturating_sub(LINE_BYTES);
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(LINE_BYTES)]);
    let text = crate::amqp::frame::short_text(&text, LINE_BYTES);
    if cut == 0 {
        text.to_owned()
    } else {
        format!("{text}... [{cut} more bytes cut]")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_and_bytes_per_second_are_bounded_and_drops_counted() {
        let b = PluginLog::new();
        let admitted = (0..200).filter(|_| b.admit(10)).count();
        assert_eq!(admitted, LINES_PER_SECOND as usize);
        assert_eq!(b.dropped(), 100);
        let b = PluginLog::new();
        let admitted = (0..100).filter(|_| b.admit(LINE_BYTES)).count();
        assert_eq!(admitted, BYTES_PER_SECOND / LINE_BYTES);
    }

    #[test]
    fn budgets_are_shared_by_name() {
        let all = PluginLogs::default();
        for _ in 0..LINES_PER_SECOND {
            assert!(all.of("p").admit(1));
        }
        assert!(!all.of("p").admit(1), "a second handle shares the window");
        assert!(all.of("q").admit(1));
        assert_eq!(all.dropped(), vec![("p".into(), 1), ("q".into(), 0)]);
    }

    #[test]
    fn long_lines_are_cut_and_say_so() {
        assert_eq!(line(b"short"), "short");
        let long = "é".repeat(LINE_BYTES);
        let l = line(long.as_bytes());
        assert!(l.len() < LINE_BYTES + 64, "{}", l.len());
        assert!(l.ends_with(&format!("[{} more bytes cut]", long.len() - LINE_BYTES)));
    }

    #[tokio::test]
    async fn lines_are_counted_kept_and_followed() {
        let log = PluginLog::new();
        log.write("p", "abc", 3, "before".into());
        let mut follower = log.follow();
        log.write("p", "abc", 1, "after".into());
        log.write("p", "abc", 9, "beyond trace".into());
        let got = follower.recv().await.unwrap();
        assert_eq!(
            (got.level.as_str(), got.message.as_str()),
            ("error", "after")
        );
        assert_eq!(log.recent().len(), 3);
        let counts = log.counts();
        assert_eq!(counts[0], ("error", 1));
        assert_eq!(counts[2], ("info", 1));
        assert_eq!(counts[4], ("trace", 1));
    }
}
