//! What a plugin may write to the broker's log through `wasmq::log`.
//!
//! A plugin's log lines go to the broker's own log, so a chatty or hostile
//! plugin could fill the disk: 8 exchanges logging 1 MiB lines wrote
//! 190 MiB in 10 s when the only bound was lines per second per instance
//! (and a rebuilt instance got a fresh window). The budget here is per
//! plugin, shared by all its instances and versions for the life of the
//! broker: lines and bytes per second, each line cut to a length, and
//! what was dropped is counted for `/metrics`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::broker::Map;

/// Lines a plugin may log per second, all its instances together.
pub const LINES_PER_SECOND: u32 = 100;
/// Bytes a plugin may log per second, all its instances together.
pub const BYTES_PER_SECOND: usize = 64 << 10;
/// Longest line kept; a longer one is cut, and says so.
pub const LINE_BYTES: usize = 4 << 10;

/// One plugin's budget.
#[derive(Debug)]
pub struct LogBudget {
    /// Start of the current one-second window, lines and bytes in it.
    window: Mutex<(Instant, u32, usize)>,
    /// Lines refused for being over the budget.
    dropped: AtomicU64,
}

impl LogBudget {
    fn new() -> Self {
        LogBudget {
            window: Mutex::new((Instant::now(), 0, 0)),
            dropped: AtomicU64::new(0),
        }
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

/// Every plugin's budget, by plugin name; kept by the plugin host so that
/// new instances and new versions of a plugin share its budget.
#[derive(Debug, Default)]
pub struct LogBudgets(Mutex<Map<Arc<str>, Arc<LogBudget>>>);

impl LogBudgets {
    /// The budget of plugin `name`.
    pub fn of(&self, name: &str) -> Arc<LogBudget> {
        let mut m = self.0.lock();
        if let Some(b) = m.get(name) {
            return b.clone();
        }
        let b = Arc::new(LogBudget::new());
        m.insert(name.into(), b.clone());
        b
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
        let b = LogBudget::new();
        let admitted = (0..200).filter(|_| b.admit(10)).count();
        assert_eq!(admitted, LINES_PER_SECOND as usize);
        assert_eq!(b.dropped(), 100);
        let b = LogBudget::new();
        let admitted = (0..100).filter(|_| b.admit(LINE_BYTES)).count();
        assert_eq!(admitted, BYTES_PER_SECOND / LINE_BYTES);
    }

    #[test]
    fn budgets_are_shared_by_name() {
        let all = LogBudgets::default();
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
}
