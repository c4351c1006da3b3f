//! The `topic` exchange type, with RabbitMQ's semantics: keys are words
//! separated by `.`; in a binding key `*` matches exactly one word and `#`
//! matches zero or more words.
//!
//! Bindings live in a trie keyed by word, so routing walks the routing key's
//! words once (branching only at `*` and `#`) instead of matching every
//! binding. The routing key is split lazily with `split_once`: a publish
//! allocates nothing.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use wasmq_sdk::{Binding, BindingId, Destinations, Error, Exchange, Message, Router};

/// Topic routing over a word trie.
#[derive(Default)]
pub struct Topic {
    root: Node,
}

/// A fast hasher for short words (the FxHash mix, 8 bytes at a time).
/// SipHash's flood resistance buys nothing here: the trie belongs to one
/// exchange, in a sandbox with a deadline, and its keys come from the
/// clients allowed to bind to it. It was most of the routing time.
#[derive(Default)]
struct WordHasher(u64);

const SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

impl Hasher for WordHasher {
    /// Whole loads only, as wyhash and foldhash do: 8-byte words, the last
    /// one overlapping; under 8 bytes two overlapping 4-byte halves, or the
    /// first, middle and last byte. The length is mixed in, so keys that
    /// read alike but differ in length hash apart. (Copying the tail into a
    /// buffer instead is a `memory.copy` in Wasm, a call into the host.)
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let n = bytes.len();
        self.0 ^= n as u64;
        if n >= 8 {
            let mut chunks = bytes.chunks_exact(8);
            for c in &mut chunks {
                self.add(u64::from_le_bytes(c.try_into().unwrap()));
            }
            if !chunks.remainder().is_empty() {
                self.add(u64::from_le_bytes(bytes[n - 8..].try_into().unwrap()));
            }
        } else if n >= 4 {
            let lo = u32::from_le_bytes(bytes[..4].try_into().unwrap());
            let hi = u32::from_le_bytes(bytes[n - 4..].try_into().unwrap());
            self.add(u64::from(lo) | u64::from(hi) << 32);
        } else if n > 0 {
            let (a, b, c) = (bytes[0], bytes[n / 2], bytes[n - 1]);
            self.add(u64::from(a) | u64::from(b) << 8 | u64::from(c) << 16);
        }
    }

    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }

    #[inline]
    fn finish(&self) -> u64 {
        // The multiply leaves the best-mixed bits at the top; hashbrown takes
        // its bucket index from the bottom. Rotate them down (as rustc-hash 2 does).
        self.0.rotate_left(26)
    }
}

impl WordHasher {
    #[inline]
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(SEED);
    }
}

#[derive(Default)]
struct Node {
    words: HashMap<Box<str>, Node, BuildHasherDefault<WordHasher>>,
    star: Option<Box<Node>>,
    hash: Option<Box<Node>>,
    bindings: Vec<BindingId>,
}

impl Node {
    fn is_empty(&self) -> bool {
        self.words.is_empty()
            && self.star.is_none()
            && self.hash.is_none()
            && self.bindings.is_empty()
    }

    fn child_mut(&mut self, word: &str) -> &mut Node {
        match word {
            "*" => self.star.get_or_insert_with(Default::default),
            "#" => self.hash.get_or_insert_with(Default::default),
            w => self.words.entry(w.into()).or_default(),
        }
    }

    /// Remove `id` under the path `words`; prunes nodes left empty.
    fn remove(&mut self, mut words: std::str::Split<'_, char>, id: BindingId) {
        match words.next() {
            None => self.bindings.retain(|b| *b != id),
            Some(w) => {
                let slot: Option<&mut Node> = match w {
                    "*" => self.star.as_deref_mut(),
                    "#" => self.hash.as_deref_mut(),
                    w => self.words.get_mut(w),
                };
                let Some(child) = slot else { return };
                child.remove(words, id);
                if child.is_empty() {
                    match w {
                        "*" => self.star = None,
                        "#" => self.hash = None,
                        w => {
                            self.words.remove(w);
                        }
                    }
                }
            }
        }
    }

    /// Match the remaining words (`None`: no words left) from this node.
    fn walk(&self, rest: Option<&str>, out: &mut Destinations) {
        if let Some(hash) = &self.hash {
            // `#` swallows zero, one, ... all remaining words.
            let mut r = rest;
            loop {
                hash.walk(r, out);
                match r {
                    None => break,
                    Some(s) => r = next_word(s).1,
                }
            }
        }
        match rest {
            None => {
                for id in &self.bindings {
                    out.push(*id);
                }
            }
            Some(s) => {
                let (word, tail) = next_word(s);
                if let Some(child) = self.words.get(word) {
                    child.walk(tail, out);
                }
                if let Some(star) = &self.star {
                    star.walk(tail, out);
                }
            }
        }
    }
}

/// Split off the first word: `"a.b.c"` → `("a", Some("b.c"))`, `"a"` → `("a", None)`.
///
/// A plain byte loop rather than `split_once('.')`: words are a few bytes,
/// and core's searcher (a call into `memchr`, which then sets up a
/// word-at-a-time scan) cost more than the scan itself. In the Wasm build it
/// was 14% of an unmemoized route under perf.
#[inline]
fn next_word(s: &str) -> (&str, Option<&str>) {
    match s.bytes().position(|b| b == b'.') {
        Some(i) => (&s[..i], Some(&s[i + 1..])),
        None => (s, None),
    }
}

/// Words of a key; the empty key has none (as in RabbitMQ).
fn words(key: &str) -> Option<&str> {
    if key.is_empty() { None } else { Some(key) }
}

impl Router for Topic {
    const DETERMINISTIC: bool = true;

    fn new(_exchange: &Exchange<'_>) -> Result<Self, Error> {
        Ok(Topic::default())
    }

    fn bind(&mut self, b: &Binding<'_>) -> Result<(), Error> {
        let mut node = &mut self.root;
        if !b.key.is_empty() {
            for w in b.key.split('.') {
                node = node.child_mut(w);
            }
        }
        if !node.bindings.contains(&b.id) {
            node.bindings.push(b.id);
        }
        Ok(())
    }

    fn unbind(&mut self, b: &Binding<'_>) {
        if b.key.is_empty() {
            self.root.bindings.retain(|id| *id != b.id);
        } else {
            self.root.remove(b.key.split('.'), b.id);
        }
    }

    fn route(&mut self, m: &Message<'_>, out: &mut Destinations) {
        self.root.walk(words(m.routing_key()), out);
    }
}

wasmq_sdk::plugin!(router = Topic);

// RabbitMQ's topic semantics, checked by the broker on the compiled plugin
// each time it loads this version.
wasmq_sdk::self_test!(
    r##"{"router": [{
  "bindings": [
    {"key": "a.b.c"}, {"key": "a.*.c"}, {"key": "a.#.c"}, {"key": "#"},
    {"key": "*"}, {"key": "#.c"}, {"key": "a.#"}, {"key": ""}
  ],
  "messages": [
    {"routing_key": "a.b.c", "expect": [0, 1, 2, 3, 5, 6]},
    {"routing_key": "a.c", "expect": [2, 3, 5, 6]},
    {"routing_key": "a.b.b.c", "expect": [2, 3, 5, 6]},
    {"routing_key": "", "expect": [3, 7]},
    {"routing_key": "a", "expect": [3, 4, 6]},
    {"routing_key": "c", "expect": [3, 4, 5]},
    {"routing_key": "b.c", "expect": [3, 5]}
  ]
}]}"##
);

#[cfg(test)]
mod tests {
    use super::*;
    use wasmq_sdk::testing::TestRouter;
    use wasmq_sdk::{FieldTable, Target};

    fn router(keys: &[&str]) -> Topic {
        let args = FieldTable::new();
        let mut r = Topic::new(&Exchange {
            name: "t",
            arguments: &args,
        })
        .unwrap();
        for (i, key) in keys.iter().enumerate() {
            r.bind(&Binding {
                id: BindingId(i as u32),
                key,
                target: Target::Queue("q"),
                arguments: &args,
            })
            .unwrap();
        }
        r
    }

    fn matches(binding: &str, key: &str) -> bool {
        let mut t = TestRouter::<Topic>::new();
        t.bind("q", binding);
        t.route_key(key) == ["q"]
    }

    #[test]
    fn a_queue_gets_one_copy_however_many_of_its_bindings_match() {
        let mut t = TestRouter::<Topic>::new();
        t.bind("audit", "#")
            .bind("audit", "orders.*")
            .bind("eu", "*.eu.#");
        assert_eq!(t.route_key("orders.eu.created"), ["audit", "eu"]);
        assert_eq!(t.route_key("orders.created"), ["audit"]);
        t.unbind("audit", "#");
        assert_eq!(t.route_key("users.eu"), ["eu"]);
    }

    #[test]
    fn rabbitmq_topic_semantics() {
        // (binding key, routing key, expected) — cases from RabbitMQ's suite.
        let cases = [
            ("a.b.c", "a.b.c", true),
            ("a.*.c", "a.b.c", true),
            ("a.*.c", "a.c", false),
            ("a.#.c", "a.c", true),
            ("a.#.c", "a.b.b.c", true),
            ("#", "", true),
            ("#", "a.b", true),
            ("*", "", false),
            ("*", "a", true),
            ("*", "a.b", false),
            ("#.c", "c", true),
            ("#.c", "a.b.c", true),
            ("a.#", "a", true),
            ("a.#.#", "a", true),
            ("*.#", "", false),
            ("#.*", "a", true),
            ("#.*", "", false),
            ("a.*.*", "a.b", false),
            ("a.#.b.#", "a.x.b.y.b", true),
            ("", "", true),
            ("", "a", false),
            ("a..b", "a..b", true),
            ("a.*.b", "a..b", true),
            ("orders.*.eu", "orders.created.eu", true),
            ("orders.*.eu", "orders.created.us", false),
        ];
        for (binding, key, want) in cases {
            assert_eq!(
                matches(binding, key),
                want,
                "binding {binding:?} key {key:?}"
            );
        }
    }

    /// RabbitMQ's topic matching, written the obvious way (backtracking over
    /// words), as the reference the trie is checked against.
    fn reference(binding: &[&str], key: &[&str]) -> bool {
        match (binding.split_first(), key.split_first()) {
            (None, None) => true,
            (Some((&"#", rest)), _) => (0..=key.len()).any(|skip| reference(rest, &key[skip..])),
            (Some((&"*", rest)), Some((_, tail))) => reference(rest, tail),
            (Some((w, rest)), Some((k, tail))) => w == k && reference(rest, tail),
            _ => false,
        }
    }

    fn split(key: &str) -> Vec<&str> {
        if key.is_empty() {
            Vec::new()
        } else {
            key.split('.').collect()
        }
    }

    #[test]
    fn trie_agrees_with_the_reference_on_random_keys() {
        // xorshift: a fixed seed, so a failure reproduces.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = |n: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % n
        };
        let vocabulary = ["a", "b", "c", "", "*", "#"];
        let key = |next: &mut dyn FnMut(u64) -> u64, wildcards: bool| {
            let len = next(5);
            let words: Vec<&str> = (0..len)
                .map(|_| vocabulary[next(if wildcards { 6 } else { 4 }) as usize])
                .collect();
            words.join(".")
        };
        for _ in 0..300 {
            let bindings: Vec<String> = (0..next(12) + 1).map(|_| key(&mut next, true)).collect();
            let refs: Vec<&str> = bindings.iter().map(String::as_str).collect();
            let mut r = router(&refs);
            // Unbind some, so pruning is covered too.
            let args = FieldTable::new();
            let removed: Vec<usize> = (0..bindings.len()).filter(|_| next(4) == 0).collect();
            for &i in &removed {
                r.unbind(&Binding {
                    id: BindingId(i as u32),
                    key: &bindings[i],
                    target: Target::Queue("q"),
                    arguments: &args,
                });
            }
            for _ in 0..20 {
                let routing_key = key(&mut next, false);
                let mut out = Destinations::new();
                r.route(&Message::new(&routing_key), &mut out);
                let mut want: Vec<BindingId> = (0..bindings.len())
                    .filter(|i| !removed.contains(i))
                    .filter(|&i| reference(&split(&bindings[i]), &split(&routing_key)))
                    .map(|i| BindingId(i as u32))
                    .collect();
                want.sort();
                want.dedup();
                let mut got = out.sorted();
                got.dedup();
                assert_eq!(got, want, "bindings {bindings:?} key {routing_key:?}");
            }
        }
    }

    #[test]
    fn unbind_prunes_and_keeps_others() {
        let args = FieldTable::new();
        let mut r = router(&["a.#", "a.b", "#"]);
        r.unbind(&Binding {
            id: BindingId(0),
            key: "a.#",
            target: Target::Queue("q"),
            arguments: &args,
        });
        let mut out = Destinations::new();
        r.route(&Message::new("a.b"), &mut out);
        assert_eq!(out.sorted(), vec![BindingId(1), BindingId(2)]);
        r.unbind(&Binding {
            id: BindingId(1),
            key: "a.b",
            target: Target::Queue("q"),
            arguments: &args,
        });
        r.unbind(&Binding {
            id: BindingId(2),
            key: "#",
            target: Target::Queue("q"),
            arguments: &args,
        });
        assert!(r.root.is_empty());
    }
}
