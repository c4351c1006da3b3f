//! Deduplication: the ids a queue (or an exchange) has taken within its
//! window, so that a message published again with the same id is
//! confirmed to its publisher and not enqueued twice (SQS FIFO's
//! `MessageDeduplicationId`; the header and arguments of the community
//! `rabbitmq-message-deduplication` plugin).
//!
//! A message's id is its `x-deduplication-header` header (a string or
//! bytes of at most [`MAX_ID_BYTES`]); a message without one is never
//! deduplicated. The cache keeps a 128-bit key per id, SHA-256 of the id
//! truncated, not the id: a key is 16 bytes whatever the id's length, it
//! is the same on every node and after a restart (so it can be replicated
//! and written to disk), and no publisher can make two ids collide to
//! have another's message dropped.
//!
//! Memory: a key and its expiry in a hash map, and the key again in an
//! insertion-order ring for eviction: about 70 bytes per id (1M ids in the
//! window ≈ 70 MB, `docs/performance.md`). Past its size bound the
//! oldest ids are forgotten first (a late duplicate may then be taken,
//! never a new message refused).

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use amq_protocol::types::{AMQPValue, FieldTable};
use sha2::{Digest, Sha256};

use crate::message::Message;

/// The header that carries a message's id.
pub const ID_HEADER: &str = "x-deduplication-header";
/// The longest id (SQS's `MessageDeduplicationId` bound).
pub const MAX_ID_BYTES: usize = 128;
/// The window when a queue names none (SQS's five minutes).
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(5 * 60);
/// The most ids a queue keeps when it names no bound.
pub const DEFAULT_SIZE: usize = 1_000_000;
/// The largest bound a queue or exchange may ask for.
pub const MAX_SIZE: usize = 100_000_000;

/// A message id's key in the cache.
pub type Key = (u64, u64);

/// A queue's or an exchange's deduplication settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settings {
    /// How long an id is remembered (`None`: until the size bound evicts
    /// it; an exchange without `x-cache-ttl`).
    pub window: Option<Duration>,
    /// The most ids remembered.
    pub size: usize,
}

fn int(v: &AMQPValue) -> Option<i64> {
    crate::broker::queue_integer(v)
}

/// A non-negative integer argument.
fn arg(args: &FieldTable, key: &str) -> Result<Option<u64>, String> {
    match args.inner().get(key) {
        None => Ok(None),
        Some(v) => int(v)
            .and_then(|n| u64::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| {
                format!("invalid arg '{key}': expected a non-negative integer, got {v:?}")
            }),
    }
}

impl Settings {
    /// A queue's, from `x-message-deduplication` (a boolean; absent or
    /// false: none), `x-cache-ttl` (ms, default five minutes) and
    /// `x-cache-size` (default a million).
    pub fn of_queue(args: &FieldTable) -> Result<Option<Settings>, String> {
        match args.inner().get("x-message-deduplication") {
            None | Some(AMQPValue::Boolean(false)) => return Ok(None),
            Some(AMQPValue::Boolean(true)) => {}
            Some(other) => {
                return Err(format!(
                    "invalid arg 'x-message-deduplication': expected a boolean, got {other:?}"
                ));
            }
        }
        let window = arg(args, "x-cache-ttl")?
            .map(Duration::from_millis)
            .unwrap_or(DEFAULT_WINDOW);
        if window.is_zero() {
            return Err("invalid arg 'x-cache-ttl': must be positive".into());
        }
        let size = Self::size(arg(args, "x-cache-size")?.unwrap_or(DEFAULT_SIZE as u64))?;
        Ok(Some(Settings {
            window: Some(window),
            size,
        }))
    }

    /// An `x-message-deduplication` exchange's: `x-cache-size` (required,
    /// as the plugin requires it) and `x-cache-ttl` (ms, optional).
    pub fn of_exchange(args: &FieldTable) -> Result<Settings, String> {
        let size = arg(args, "x-cache-size")?.ok_or(
            "an x-message-deduplication exchange needs x-cache-size (the most ids it remembers)",
        )?;
        let window = arg(args, "x-cache-ttl")?.map(Duration::from_millis);
        if window.is_some_and(|w| w.is_zero()) {
            return Err("invalid arg 'x-cache-ttl': must be positive".into());
        }
        if let Some(p) = args.inner().get("x-cache-persistence") {
            let memory = matches!(p, AMQPValue::LongString(s) if s.as_bytes() == b"memory");
            if !memory {
                return Err("invalid arg 'x-cache-persistence': only 'memory' (an exchange's ids are kept per node; a queue with x-message-deduplication keeps them on disk and replicated)".into());
            }
        }
        Ok(Settings {
            window,
            size: Self::size(size)?,
        })
    }

    fn size(n: u64) -> Result<usize, String> {
        if n == 0 || n > MAX_SIZE as u64 {
            return Err(format!(
                "invalid arg 'x-cache-size': {n} (expected 1 to {MAX_SIZE})"
            ));
        }
        Ok(n as usize)
    }
}

/// The key of `m`'s id, if it has one; an id that is not a string (or
/// bytes) or is longer than [`MAX_ID_BYTES`] is refused with the reason.
pub fn key_of(m: &Message) -> Result<Option<Key>, String> {
    let Some(headers) = m.properties.headers() else {
        return Ok(None);
    };
    key_in(headers)
}

/// The key of the id in `headers`, as [`key_of`].
pub fn key_in(headers: &FieldTable) -> Result<Option<Key>, String> {
    let Some(v) = headers.inner().get(ID_HEADER) else {
        return Ok(None);
    };
    let id: &[u8] = match v {
        AMQPValue::LongString(s) => s.as_bytes(),
        AMQPValue::ShortString(s) => s.as_str().as_bytes(),
        AMQPValue::ByteArray(b) => b.as_slice(),
        other => {
            return Err(format!("its {ID_HEADER} is not a string ({other:?})"));
        }
    };
    if id.len() > MAX_ID_BYTES {
        return Err(format!(
            "its {ID_HEADER} is {} bytes, over the {MAX_ID_BYTES}-byte limit",
            id.len()
        ));
    }
    Ok(Some(key(id)))
}

/// The key of `id`.
pub fn key(id: &[u8]) -> Key {
    let d = Sha256::digest(id);
    (
        u64::from_le_bytes(d[..8].try_into().expect("8 bytes")),
        u64::from_le_bytes(d[8..16].try_into().expect("8 bytes")),
    )
}

/// A message's own window (`x-cache-ttl` header, ms), which an exchange
/// lets override its own, as the plugin does.
pub fn ttl_header(m: &Message) -> Option<Duration> {
    let v = m
        .properties
        .headers()
        .as_ref()?
        .inner()
        .get("x-cache-ttl")?;
    int(v)
        .and_then(|n| u64::try_from(n).ok())
        .map(Duration::from_millis)
}

/// Shards of the id map, so that growing it rehashes a sixteenth of the
/// ids at a time: a single map of a million ids stalled its queue (under
/// whose lock it grows) for the whole rehash (`docs/performance.md`).
const SHARDS: usize = 16;

/// Key → expiry, in [`SHARDS`] maps chosen by the key's low bits.
#[derive(Debug)]
struct Expiries {
    shards: Vec<HashMap<Key, u64>>,
    len: usize,
}

impl Expiries {
    fn new() -> Self {
        Expiries {
            shards: (0..SHARDS).map(|_| HashMap::new()).collect(),
            len: 0,
        }
    }

    fn shard(&self, k: &Key) -> usize {
        (k.0 as usize) % SHARDS
    }

    fn get(&self, k: &Key) -> Option<&u64> {
        self.shards[self.shard(k)].get(k)
    }

    fn insert(&mut self, k: Key, e: u64) {
        let s = self.shard(&k);
        if self.shards[s].insert(k, e).is_none() {
            self.len += 1;
        }
    }

    fn remove(&mut self, k: &Key) {
        let s = self.shard(k);
        if self.shards[s].remove(k).is_some() {
            self.len -= 1;
        }
    }

    fn len(&self) -> usize {
        self.len
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// The ids remembered, with when each is forgotten (ms since the epoch;
/// `u64::MAX`: never, but for the size bound).
#[derive(Debug)]
pub struct Cache {
    settings: Settings,
    expires: Expiries,
    /// Keys in the order they were taken (a key taken again after it
    /// expired is here twice; the older one is skipped when reached).
    order: VecDeque<Key>,
}

impl Cache {
    /// An empty cache.
    pub fn new(settings: Settings) -> Self {
        Cache {
            settings,
            expires: Expiries::new(),
            order: VecDeque::new(),
        }
    }

    /// Its settings.
    pub fn settings(&self) -> Settings {
        self.settings
    }

    /// Ids remembered (some may have expired and not been dropped yet).
    pub fn len(&self) -> usize {
        self.expires.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.expires.is_empty()
    }

    /// When an id taken at `now_ms` is forgotten (under `ttl`, else the
    /// window).
    fn expiry(&self, now_ms: u64, ttl: Option<Duration>) -> u64 {
        match ttl.or(self.settings.window) {
            Some(w) => now_ms.saturating_add(w.as_millis() as u64),
            None => u64::MAX,
        }
    }

    /// Take `key` at `now_ms`, remembered for `ttl` (else the window):
    /// when it is new, the time it is forgotten (ms); `None` if it is a
    /// duplicate within the window.
    pub fn admit(&mut self, key: Key, now_ms: u64, ttl: Option<Duration>) -> Option<u64> {
        self.evict(now_ms);
        if self.expires.get(&key).is_some_and(|e| *e > now_ms) {
            return None;
        }
        let expires = self.expiry(now_ms, ttl);
        self.expires.insert(key, expires);
        self.order.push_back(key);
        self.bound();
        Some(expires)
    }

    /// An id taken by [`Cache::admit`] whose message was refused after
    /// all (a length limit): it may come again.
    pub fn forget(&mut self, key: Key) {
        self.expires.remove(&key);
    }

    /// Remember `key` until `expires` (recovery, a snapshot), unless it
    /// has expired by `now_ms`.
    pub fn restore(&mut self, key: Key, expires: u64, now_ms: u64) {
        if expires > now_ms {
            self.expires.insert(key, expires);
            self.order.push_back(key);
            self.bound();
        }
    }

    /// The ids remembered and when each is forgotten, oldest first.
    pub fn entries(&self) -> Vec<(Key, u64)> {
        let mut seen = std::collections::HashSet::with_capacity(self.expires.len());
        let mut out = Vec::with_capacity(self.expires.len());
        for k in self.order.iter().rev() {
            if seen.insert(*k)
                && let Some(e) = self.expires.get(k)
            {
                out.push((*k, *e));
            }
        }
        out.reverse();
        out
    }

    /// Drop what expired by `now_ms`, from the oldest on, stopping at the
    /// first that has not (ids taken later under a shorter ttl wait for
    /// the size bound or their own lookup).
    pub fn evict(&mut self, now_ms: u64) {
        while let Some(k) = self.order.front() {
            match self.expires.get(k) {
                Some(e) if *e > now_ms => break,
                Some(_) => {
                    self.expires.remove(k);
                }
                None => {}
            }
            self.order.pop_front();
        }
    }

    fn bound(&mut self) {
        while self.expires.len() > self.settings.size {
            let Some(k) = self.order.pop_front() else {
                break;
            };
            self.expires.remove(&k);
        }
        // Keys taken again after they expired leave older copies behind:
        // past twice the ids, the order is rebuilt from the map.
        if self.order.len() > 2 * self.expires.len() + 1024 {
            let live = self.entries();
            self.order = live.into_iter().map(|(k, _)| k).collect();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(window_ms: u64, size: usize) -> Settings {
        Settings {
            window: Some(Duration::from_millis(window_ms)),
            size,
        }
    }

    #[test]
    fn an_id_is_a_duplicate_within_its_window_only() {
        let mut c = Cache::new(settings(1000, 10));
        let k = key(b"order-1");
        assert!(c.admit(k, 0, None).is_some());
        assert!(c.admit(k, 999, None).is_none(), "within the window");
        assert!(c.admit(key(b"order-2"), 500, None).is_some());
        assert!(c.admit(k, 1000, None).is_some(), "the window passed");
        assert!(c.admit(k, 1500, None).is_none());
        // Expired ids leave.
        c.evict(10_000);
        assert!(c.is_empty());
    }

    #[test]
    fn past_its_bound_the_oldest_id_is_forgotten_first() {
        let mut c = Cache::new(settings(60_000, 3));
        for i in 0..5u8 {
            assert!(c.admit(key(&[i]), u64::from(i), None).is_some());
        }
        assert_eq!(c.len(), 3);
        assert!(c.admit(key(&[0]), 10, None).is_some(), "forgotten");
        assert!(c.admit(key(&[4]), 10, None).is_none(), "kept");
        let restored: Vec<Key> = c.entries().into_iter().map(|(k, _)| k).collect();
        assert_eq!(restored, vec![key(&[3]), key(&[4]), key(&[0])]);
    }

    #[test]
    fn a_refused_message_does_not_hold_its_id_and_restores_skip_the_expired() {
        let mut c = Cache::new(settings(1000, 10));
        let k = key(b"x");
        assert!(c.admit(k, 0, None).is_some());
        c.forget(k);
        assert!(c.admit(k, 1, None).is_some());
        let mut d = Cache::new(settings(1000, 10));
        d.restore(key(b"old"), 50, 100);
        d.restore(key(b"live"), 500, 100);
        assert_eq!(d.len(), 1);
        assert!(d.admit(key(b"live"), 200, None).is_none());
    }

    #[test]
    fn ids_are_checked_and_keyed_by_content() {
        let headers = |v: AMQPValue| {
            let mut t = FieldTable::default();
            t.insert(ID_HEADER.into(), v);
            t
        };
        assert_eq!(key_in(&FieldTable::default()), Ok(None));
        assert_eq!(
            key_in(&headers(AMQPValue::LongString("abc".into()))),
            Ok(Some(key(b"abc")))
        );
        assert_ne!(key(b"abc"), key(b"abd"));
        let long = "x".repeat(MAX_ID_BYTES + 1);
        assert!(
            key_in(&headers(AMQPValue::LongString(long.as_str().into())))
                .unwrap_err()
                .contains("over the 128-byte limit")
        );
        assert!(
            key_in(&headers(AMQPValue::LongInt(5)))
                .unwrap_err()
                .contains("not a string")
        );
    }

    #[test]
    fn settings_are_read_and_checked() {
        let args = |pairs: &[(&str, AMQPValue)]| {
            let mut t = FieldTable::default();
            for (k, v) in pairs {
                t.insert((*k).into(), v.clone());
            }
            t
        };
        assert_eq!(Settings::of_queue(&args(&[])), Ok(None));
        let on = ("x-message-deduplication", AMQPValue::Boolean(true));
        assert_eq!(
            Settings::of_queue(&args(std::slice::from_ref(&on))),
            Ok(Some(Settings {
                window: Some(DEFAULT_WINDOW),
                size: DEFAULT_SIZE
            }))
        );
        assert!(
            Settings::of_queue(&args(&[
                on.clone(),
                ("x-cache-size", AMQPValue::LongInt(0))
            ]))
            .unwrap_err()
            .contains("x-cache-size")
        );
        assert!(
            Settings::of_queue(&args(&[on, ("x-cache-ttl", AMQPValue::LongInt(-5))]))
                .unwrap_err()
                .contains("x-cache-ttl")
        );
        assert!(
            Settings::of_exchange(&args(&[]))
                .unwrap_err()
                .contains("needs x-cache-size")
        );
        assert_eq!(
            Settings::of_exchange(&args(&[("x-cache-size", AMQPValue::LongInt(10))])),
            Ok(Settings {
                window: None,
                size: 10
            })
        );
    }
}
