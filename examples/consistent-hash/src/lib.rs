//! # Example: consistent-hash sharding router
//!
//! Shows a custom exchange type that spreads messages over queues by a hash
//! of the routing key (or of a header), like RabbitMQ's
//! `x-consistent-hash` exchange. Each binding's key is its weight: the
//! number of points it gets on the hash ring. The ring is built from the
//! bindings' *target names*, not their ids, so a key maps to the same queue
//! across broker restarts and plugin hot swaps.
//!
//! Exchange argument `hash-header`: hash this header's value instead of
//! the routing key.
//!
//! Build and load (the README's run command does this for you):
//!
//! ```text
//! cargo build --profile plugin --target wasm32-unknown-unknown -p wasmq-example-consistent-hash
//! cp target/wasm32-unknown-unknown/plugin/wasmq_example_consistent_hash.wasm examples/plugins/consistent-hash.wasm.tmp
//! mv examples/plugins/consistent-hash.wasm.tmp examples/plugins/consistent-hash.wasm
//! ```
//!
//! then declare an exchange of type `consistent-hash`.

use std::collections::BTreeMap;

use wasmq_sdk::{Binding, BindingId, Destinations, Error, Exchange, FieldValue, Message, Router};

/// Points per unit of weight would make weights coarse; one point per unit
/// times this factor spreads keys evenly with few bindings.
const POINTS_PER_WEIGHT: u32 = 64;

/// The router.
pub struct ConsistentHash {
    header: Option<String>,
    /// binding id → (target name, weight)
    bindings: BTreeMap<BindingId, (String, u32)>,
    ring: BTreeMap<u64, BindingId>,
}

/// FNV-1a, finished with a 64-bit mixer: stable across platforms and
/// versions (unlike `std`'s `DefaultHasher`), which is the point.
pub fn hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

impl ConsistentHash {
    fn rebuild(&mut self) {
        self.ring.clear();
        for (id, (target, weight)) in &self.bindings {
            for point in 0..weight * POINTS_PER_WEIGHT {
                self.ring
                    .insert(hash(format!("{target}#{point}").as_bytes()), *id);
            }
        }
    }

    fn pick(&self, key: &[u8]) -> Option<BindingId> {
        let h = hash(key);
        self.ring
            .range(h..)
            .next()
            .or_else(|| self.ring.iter().next())
            .map(|(_, id)| *id)
    }
}

impl Router for ConsistentHash {
    fn new(exchange: &Exchange<'_>) -> Result<Self, Error> {
        let header = match exchange.arguments.get("hash-header") {
            None => None,
            Some(v) => Some(
                v.as_str()
                    .ok_or("hash-header must be a string naming a header")?
                    .to_owned(),
            ),
        };
        Ok(ConsistentHash {
            header,
            bindings: BTreeMap::new(),
            ring: BTreeMap::new(),
        })
    }

    fn bind(&mut self, b: &Binding<'_>) -> Result<(), Error> {
        let weight: u32 = b.key.trim().parse().map_err(|_| {
            Error::new(format!(
                "binding key must be a weight (a positive integer), got {:?}",
                b.key
            ))
        })?;
        if weight == 0 || weight > 1000 {
            return Err(Error::new("binding weight must be between 1 and 1000"));
        }
        self.bindings
            .insert(b.id, (b.target.name().to_owned(), weight));
        self.rebuild();
        Ok(())
    }

    fn unbind(&mut self, b: &Binding<'_>) {
        if self.bindings.remove(&b.id).is_some() {
            self.rebuild();
        }
    }

    fn route(&mut self, m: &Message<'_>, out: &mut Destinations) {
        let picked = match &self.header {
            None => self.pick(m.routing_key().as_bytes()),
            Some(h) => match m.headers().get(h) {
                Some(FieldValue::String(s)) => self.pick(s),
                Some(v) => self.pick(format!("{v:?}").as_bytes()),
                // No header: hash the routing key, so the message still goes somewhere.
                None => self.pick(m.routing_key().as_bytes()),
            },
        };
        if let Some(id) = picked {
            out.push(id);
        }
    }
}

wasmq_sdk::plugin!(router = ConsistentHash);

// The mapping this example promises to keep across restarts and hot swaps,
// pinned: the broker rejects a build that would move these keys. Checked on
// the compiled plugin each time it loads.
wasmq_sdk::self_test!(
    r#"{"router": [
  {
    "bindings": [
      {"key": "1", "queue": "shard-a"}, {"key": "1", "queue": "shard-b"}, {"key": "2", "queue": "shard-c"}
    ],
    "messages": [
      {"routing_key": "order-1", "expect": [1]},
      {"routing_key": "order-3", "expect": [2]},
      {"routing_key": "order-5", "expect": [0]},
      {"routing_key": "user-7", "expect": [2]}
    ]
  },
  {
    "exchange_arguments": {"hash-header": "user"},
    "bindings": [
      {"key": "1", "queue": "shard-a"}, {"key": "1", "queue": "shard-b"}, {"key": "2", "queue": "shard-c"}
    ],
    "messages": [
      {"routing_key": "any", "headers": {"user": "order-5"}, "expect": [0]},
      {"routing_key": "any", "headers": {"user": "order-1"}, "expect": [1]}
    ]
  }
]}"#
);

#[cfg(test)]
mod tests {
    use super::*;
    use wasmq_sdk::{FieldTable, Target};

    fn router(args: &FieldTable, targets: &[(&str, &str)]) -> ConsistentHash {
        let mut r = ConsistentHash::new(&Exchange {
            name: "shard",
            arguments: args,
        })
        .unwrap();
        let empty = FieldTable::new();
        for (i, (target, weight)) in targets.iter().enumerate() {
            r.bind(&Binding {
                id: BindingId(i as u32),
                key: weight,
                target: Target::Queue(target),
                arguments: &empty,
            })
            .unwrap();
        }
        r
    }

    fn route(r: &mut ConsistentHash, m: &Message<'_>) -> Vec<BindingId> {
        let mut out = Destinations::new();
        r.route(m, &mut out);
        out.ids()
    }

    #[test]
    fn each_message_goes_to_exactly_one_shard_and_spread_is_fair() {
        let mut r = router(
            &FieldTable::new(),
            &[("a", "1"), ("b", "1"), ("c", "1"), ("d", "1")],
        );
        let mut counts = [0u32; 4];
        for i in 0..4000 {
            let ids = route(&mut r, &Message::new(&format!("order-{i}")));
            assert_eq!(ids.len(), 1);
            counts[ids[0].0 as usize] += 1;
        }
        for c in counts {
            assert!((700..1300).contains(&c), "unfair spread {counts:?}");
        }
    }

    #[test]
    fn mapping_depends_on_targets_not_binding_ids() {
        let mut a = router(&FieldTable::new(), &[("q1", "1"), ("q2", "1"), ("q3", "1")]);
        // Same targets bound in another order (other ids), as after a restart.
        let mut b = router(&FieldTable::new(), &[("q3", "1"), ("q1", "1"), ("q2", "1")]);
        let names_a = ["q1", "q2", "q3"];
        let names_b = ["q3", "q1", "q2"];
        for i in 0..500 {
            let key = format!("k{i}");
            let ia = route(&mut a, &Message::new(&key))[0].0 as usize;
            let ib = route(&mut b, &Message::new(&key))[0].0 as usize;
            assert_eq!(names_a[ia], names_b[ib], "key {key}");
        }
    }

    #[test]
    fn removing_a_shard_only_moves_its_keys() {
        let mut r = router(&FieldTable::new(), &[("q1", "1"), ("q2", "1"), ("q3", "1")]);
        let before: Vec<_> = (0..600)
            .map(|i| route(&mut r, &Message::new(&format!("k{i}")))[0])
            .collect();
        let empty = FieldTable::new();
        r.unbind(&Binding {
            id: BindingId(2),
            key: "1",
            target: Target::Queue("q3"),
            arguments: &empty,
        });
        for (i, old) in before.iter().enumerate() {
            let now = route(&mut r, &Message::new(&format!("k{i}")))[0];
            if *old != BindingId(2) {
                assert_eq!(now, *old, "key k{i} moved although its shard stayed");
            }
        }
    }

    #[test]
    fn hash_header_and_bad_weights() {
        let mut args = FieldTable::new();
        args.insert("hash-header", "tenant");
        let mut r = router(&args, &[("q1", "1"), ("q2", "1")]);
        let mut h = FieldTable::new();
        h.insert("tenant", "acme");
        let x = route(&mut r, &Message::new("a").with_headers(h.clone()));
        let y = route(&mut r, &Message::new("b").with_headers(h));
        assert_eq!(x, y, "same header, same shard, whatever the key");
        let empty = FieldTable::new();
        let err = r
            .bind(&Binding {
                id: BindingId(9),
                key: "heavy",
                target: Target::Queue("q9"),
                arguments: &empty,
            })
            .unwrap_err();
        assert!(err.message().contains("weight"));
    }
}
