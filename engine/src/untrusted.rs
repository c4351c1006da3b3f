//! What a peer sends is not ours to print as it is.
//!
//! A name in a cluster hello, a user name in a failed login, an exchange a
//! client declared: each may be megabytes long, or carry a newline that
//! starts a forged line in the broker's log (`... INFO wasmq::admin:
//! FORGED ...`), or terminal escapes that rewrite what an operator sees.
//! Every such string goes into a log line through [`text`], which cuts it
//! to [`TEXT_CHARS`] characters and escapes every control character, so
//! one log line is one event whatever the peer sent.
//!
//! A peer refused again and again (a scanner, a misconfigured node in a
//! loop) would still fill the log with refusals that are each well formed:
//! [`Refusals`] lets one refusal per source through per
//! [`REFUSAL_LOG_EVERY`] and counts the rest into the next line.
//!
//! What a peer may hold open before it has proven anything (a handshake
//! on the cluster port, a connection to the admin port, a log follower)
//! is counted in [`Places`]: so many in total, so many per source or user,
//! each given back when its holder drops it.

use std::collections::HashMap;
use std::fmt;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// Characters of a peer's string a log line shows; the rest is counted.
/// An AMQP short string (a name, a close text) fits whole.
pub const TEXT_CHARS: usize = 256;
/// At most one refusal logged per source address per this long.
pub const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);
/// Sources whose refusals are remembered; past it the oldest go.
const SOURCES: usize = 1024;

/// A peer's string, safe for a log line: see [`text`].
#[derive(Clone, Copy)]
pub struct Text<'a>(&'a str, usize);

/// `s` as a log line may show it: at most [`TEXT_CHARS`] characters, every
/// control character (newlines, escapes, bidirectional overrides) written
/// as an escape, and what was cut counted.
pub fn text(s: &str) -> Text<'_> {
    Text(s, TEXT_CHARS)
}

/// `s` with its control characters escaped but not cut: for text already
/// bounded where it entered (a plugin's log line).
pub fn escaped(s: &str) -> Text<'_> {
    Text(s, usize::MAX)
}

/// Whether a log line would show `c` as an escape.
fn needs_escape(c: char) -> bool {
    c.is_control()
        // Bidirectional overrides and isolates reorder what a terminal shows.
        || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
        || c == '\u{2028}'
        || c == '\u{2029}'
}

impl fmt::Display for Text<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use fmt::Write as _;
        for (shown, (i, c)) in self.0.char_indices().enumerate() {
            if shown == self.1 {
                return write!(f, "…[{} more bytes]", self.0.len() - i);
            }
            if needs_escape(c) {
                for e in c.escape_default() {
                    f.write_char(e)?;
                }
            } else {
                f.write_char(c)?;
            }
        }
        Ok(())
    }
}

impl fmt::Debug for Text<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{self}\"")
    }
}

/// Which refusals of which sources may be logged now.
#[derive(Debug, Default)]
pub struct Refusals {
    /// By source: when its last refusal was logged, and how many were not
    /// since.
    sources: Mutex<HashMap<IpAddr, (Instant, u64)>>,
}

impl Refusals {
    /// A refusal of `source` happened: `Some(n)` if it may be logged, `n`
    /// being how many of its refusals were not since the last logged one;
    /// `None` to stay quiet.
    pub fn admit(&self, source: IpAddr) -> Option<u64> {
        let now = Instant::now();
        let mut s = self.sources.lock();
        if let Some((at, quiet)) = s.get_mut(&source) {
            if now.duration_since(*at) < REFUSAL_LOG_EVERY {
                *quiet += 1;
                return None;
            }
            let n = *quiet;
            *at = now;
            *quiet = 0;
            return Some(n);
        }
        if s.len() >= SOURCES {
            // Many sources at once: forget the quiet ones first.
            s.retain(|_, (at, _)| now.duration_since(*at) < REFUSAL_LOG_EVERY);
            if s.len() >= SOURCES {
                s.clear();
            }
        }
        s.insert(source, (now, 0));
        Some(0)
    }
}

/// Places held at once: at most so many in total, so many per key (a
/// source address, a user).
#[derive(Debug)]
pub struct Places<K: Eq + Hash> {
    total: usize,
    per_key: usize,
    held: Mutex<HashMap<K, usize>>,
}

/// Why no place was given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Full {
    /// Every place is held.
    Total(usize),
    /// The key holds all of its places.
    Key(usize),
}

/// One place; given back when dropped.
#[derive(Debug)]
pub struct Place<K: Eq + Hash> {
    places: Arc<Places<K>>,
    key: K,
}

impl<K: Eq + Hash + Clone> Places<K> {
    /// At most `total` places, `per_key` for one key (at least one each).
    pub fn new(total: usize, per_key: usize) -> Arc<Self> {
        let total = total.max(1);
        Arc::new(Places {
            total,
            per_key: per_key.clamp(1, total),
            held: Mutex::default(),
        })
    }

    /// A place for `key`, or which bound is reached.
    pub fn take(self: &Arc<Self>, key: K) -> Result<Place<K>, Full> {
        let mut held = self.held.lock();
        if held.values().sum::<usize>() >= self.total {
            return Err(Full::Total(self.total));
        }
        let n = held.entry(key.clone()).or_default();
        if *n >= self.per_key {
            return Err(Full::Key(self.per_key));
        }
        *n += 1;
        Ok(Place {
            places: self.clone(),
            key,
        })
    }

    /// Places held now.
    pub fn held(&self) -> usize {
        self.held.lock().values().sum()
    }

    /// The bound in total.
    pub fn total(&self) -> usize {
        self.total
    }

    /// The bound per key.
    pub fn per_key(&self) -> usize {
        self.per_key
    }

    /// Keys holding a place now (none is kept for a key that holds none).
    pub fn keys(&self) -> usize {
        self.held.lock().len()
    }
}

impl<K: Eq + Hash> Drop for Place<K> {
    fn drop(&mut self) {
        let mut held = self.places.held.lock();
        if let Some(n) = held.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_and_long_text_cut() {
        let forged = "n2\n2026-01-01T00:00:00Z  INFO wasmq::admin: FORGED";
        let shown = text(forged).to_string();
        assert!(!shown.contains('\n'), "{shown}");
        assert!(shown.starts_with("n2\\n2026"), "{shown}");
        assert_eq!(
            text("\u{1b}[2J\u{202e}x").to_string(),
            "\\u{1b}[2J\\u{202e}x"
        );
        let long = "é".repeat(60 << 10);
        let shown = text(&long).to_string();
        assert_eq!(shown.chars().filter(|c| *c == 'é').count(), TEXT_CHARS);
        assert!(shown.ends_with(&format!("…[{} more bytes]", long.len() - 2 * TEXT_CHARS)));
        assert_eq!(text("plain name-1").to_string(), "plain name-1");
        assert_eq!(escaped(&long).to_string(), long, "escaped() does not cut");
        assert_eq!(format!("{:?}", text("a\"b")), "\"a\"b\"");
    }

    #[test]
    fn one_refusal_per_source_is_logged_per_window_and_the_rest_counted() {
        let r = Refusals::default();
        let a: IpAddr = "127.0.0.2".parse().unwrap();
        let b: IpAddr = "127.0.0.3".parse().unwrap();
        assert_eq!(r.admit(a), Some(0));
        assert_eq!(r.admit(a), None);
        assert_eq!(r.admit(a), None);
        assert_eq!(r.admit(b), Some(0), "another source has its own window");
        // The window passes.
        r.sources.lock().get_mut(&a).unwrap().0 -= REFUSAL_LOG_EVERY;
        assert_eq!(r.admit(a), Some(2), "the quiet ones are counted");
    }

    #[test]
    fn the_sources_remembered_are_bounded() {
        let r = Refusals::default();
        for i in 0..(SOURCES as u32 * 3) {
            r.admit(IpAddr::from(i.to_be_bytes()));
        }
        assert!(r.sources.lock().len() <= SOURCES);
    }

    #[test]
    fn places_are_bounded_per_key_and_in_total_and_given_back() {
        let places = Places::new(4, 2);
        let a1 = places.take("a").unwrap();
        let _a2 = places.take("a").unwrap();
        assert_eq!(places.take("a").unwrap_err(), Full::Key(2));
        let _b1 = places.take("b").unwrap();
        let _b2 = places.take("b").unwrap();
        assert_eq!(places.take("c").unwrap_err(), Full::Total(4));
        assert_eq!(places.keys(), 2, "a refused key keeps no entry");
        drop(a1);
        let _c = places.take("c").expect("a place given back is taken again");
        assert_eq!((places.held(), places.keys()), (4, 3));
        assert_eq!(Places::<u8>::new(0, 9).per_key(), 1);
    }
}
