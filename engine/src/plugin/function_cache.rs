//! Machine code of single functions, shared by every plugin version this
//! broker compiles.
//!
//! A new version of a plugin is mostly the code of the old one: the guest
//! SDK, the allocator, the parts of the standard library it uses, and every
//! function its author did not touch. Cranelift's incremental cache keys
//! each function by its translated body (calls to other functions name them
//! through a side table, so a function that only moved still matches) and
//! reuses the machine code of a match; a hot swap then compiles only what
//! changed. Plugins built with the same SDK share code with each other too.
//!
//! Keys are SHA-256 digests of a function's content (and of the compiler's
//! settings), so one plugin cannot place code under another's key. Some
//! functions get a different key on every compile and always miss
//! (6-12% of a plugin's functions in our tests): that costs time, never
//! correctness.
//!
//! In memory and bounded: past the byte budget the oldest entries go. The
//! whole-module cache in `data_dir/plugin-cache` is what lets a restart
//! skip compiling altogether; this one serves changed files.

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};

use parking_lot::Mutex;
use wasmtime::CacheStore;

/// A bounded in-memory store for Cranelift's incremental cache.
pub(crate) struct FunctionCache {
    budget: usize,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<Vec<u8>, Vec<u8>>,
    /// Keys in insertion order, for eviction.
    order: VecDeque<Vec<u8>>,
    bytes: usize,
    hits: u64,
    misses: u64,
}

/// Look-ups so far: (reused, compiled).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FunctionCacheStats {
    /// Functions whose machine code was reused.
    pub hits: u64,
    /// Functions that had to be compiled.
    pub misses: u64,
    /// Bytes held (keys and machine code).
    pub bytes: usize,
}

impl FunctionCache {
    /// A cache holding at most `budget` bytes of keys and code.
    pub(crate) fn new(budget: usize) -> Self {
        FunctionCache {
            budget,
            inner: Mutex::new(Inner::default()),
        }
    }

    /// Drop every entry (the counters stay).
    pub(crate) fn clear(&self) {
        let mut i = self.inner.lock();
        i.entries.clear();
        i.order.clear();
        i.bytes = 0;
    }

    pub(crate) fn stats(&self) -> FunctionCacheStats {
        let i = self.inner.lock();
        FunctionCacheStats {
            hits: i.hits,
            misses: i.misses,
            bytes: i.bytes,
        }
    }
}

impl std::fmt::Debug for FunctionCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let i = self.inner.lock();
        f.debug_struct("FunctionCache")
            .field("entries", &i.entries.len())
            .field("bytes", &i.bytes)
            .field("budget", &self.budget)
            .finish()
    }
}

impl CacheStore for FunctionCache {
    fn get(&self, key: &[u8]) -> Option<Cow<'_, [u8]>> {
        let mut i = self.inner.lock();
        match i.entries.get(key).cloned() {
            Some(code) => {
                i.hits += 1;
                Some(Cow::Owned(code))
            }
            None => {
                i.misses += 1;
                None
            }
        }
    }

    fn insert(&self, key: &[u8], value: Vec<u8>) -> bool {
        let size = key.len() + value.len();
        if size > self.budget {
            return false;
        }
        let mut i = self.inner.lock();
        if i.entries.contains_key(key) {
            return true;
        }
        while i.bytes + size > self.budget {
            let Some(old) = i.order.pop_front() else {
                break;
            };
            if let Some(code) = i.entries.remove(&old) {
                i.bytes -= old.len() + code.len();
            }
        }
        i.order.push_back(key.to_vec());
        i.entries.insert(key.to_vec(), value);
        i.bytes += size;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_to_its_budget_dropping_the_oldest() {
        let c = FunctionCache::new(100);
        assert!(c.insert(b"a", vec![0; 39]));
        assert!(c.insert(b"b", vec![0; 39]));
        assert_eq!(c.stats().bytes, 80);
        assert!(c.insert(b"c", vec![0; 39]), "evicts a to make room");
        assert_eq!(c.stats().bytes, 80);
        assert!(c.get(b"a").is_none());
        assert_eq!(c.get(b"b").as_deref(), Some(&[0u8; 39][..]));
        assert!(!c.insert(b"big", vec![0; 100]), "larger than the budget");
        let stats = c.stats();
        assert_eq!((stats.hits, stats.misses), (1, 1));
    }
}
