//! The `super-stream` exchange type: a stream partitioned over several
//! streams (its partitions), each message to exactly one of them, chosen
//! by a hash of its routing key, so that every message of one key lands
//! in one partition, in order, while different keys spread over all.
//!
//! The partitions are the exchange's bindings, ordered by the binding
//! argument `x-stream-partition-order` (as RabbitMQ's super streams order
//! them), else by the binding key read as a number, else by the key. A
//! message goes to partition `murmur3_32(routing key, seed 104729) mod n`:
//! MurmurHash3 (x86, 32-bit) is stable across platforms and versions, so a
//! key keeps its partition for as long as the partitions stay the same.
//! The broker declares the partitions and these bindings itself when the
//! exchange is declared with `x-super-stream-partitions` (one call).

use wasmq_sdk::{Binding, BindingId, Destinations, Error, Exchange, Message, Router};

/// The seed the hash starts from.
pub const SEED: u32 = 104_729;

/// One partition: its order and its binding.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Partition {
    order: (i64, String),
    id: BindingId,
}

/// Routes each message to one partition by its routing key's hash.
#[derive(Default)]
pub struct SuperStream {
    partitions: Vec<Partition>,
}

/// MurmurHash3, x86 32-bit.
pub fn murmur3_32(data: &[u8], seed: u32) -> u32 {
    const C1: u32 = 0xcc9e_2d51;
    const C2: u32 = 0x1b87_3593;
    let mut h = seed;
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
        h ^= k;
        h = h.rotate_left(13).wrapping_mul(5).wrapping_add(0xe654_6b64);
    }
    let tail = chunks.remainder();
    if !tail.is_empty() {
        let mut k = 0u32;
        for (i, b) in tail.iter().enumerate() {
            k |= u32::from(*b) << (8 * i);
        }
        k = k.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
        h ^= k;
    }
    h ^= data.len() as u32;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

impl Router for SuperStream {
    const DETERMINISTIC: bool = true;

    fn new(_exchange: &Exchange<'_>) -> Result<Self, Error> {
        Ok(SuperStream::default())
    }

    fn bind(&mut self, b: &Binding<'_>) -> Result<(), Error> {
        let order = match b.arguments.get("x-stream-partition-order") {
            Some(v) => v
                .as_i64()
                .ok_or_else(|| Error::new("x-stream-partition-order must be an integer"))?,
            None => b.key.parse().unwrap_or(i64::MAX),
        };
        self.partitions.push(Partition {
            order: (order, b.key.to_owned()),
            id: b.id,
        });
        self.partitions.sort();
        Ok(())
    }

    fn unbind(&mut self, b: &Binding<'_>) {
        self.partitions.retain(|p| p.id != b.id);
    }

    fn route(&mut self, m: &Message<'_>, out: &mut Destinations) {
        if self.partitions.is_empty() {
            return;
        }
        let h = murmur3_32(m.routing_key().as_bytes(), SEED);
        out.push(self.partitions[h as usize % self.partitions.len()].id);
    }
}

wasmq_sdk::plugin!(router = SuperStream);

#[cfg(test)]
mod tests {
    use super::*;
    use wasmq_sdk::{FieldTable, Target};

    #[test]
    fn murmur3_matches_the_reference_vectors() {
        // From the reference implementation (SMHasher's MurmurHash3_x86_32).
        assert_eq!(murmur3_32(b"", 0), 0);
        assert_eq!(murmur3_32(b"", 1), 0x514e_28b7);
        assert_eq!(murmur3_32(b"hello", 0), 0x248b_fa47);
        assert_eq!(murmur3_32(b"Hello, world!", 1234), 0xfaf6_cdb3);
        assert_eq!(
            murmur3_32(b"The quick brown fox jumps over the lazy dog", 0),
            0x2e4f_f723
        );
    }

    #[test]
    fn a_key_keeps_its_partition_and_keys_spread_over_all() {
        let args = FieldTable::new();
        let mut r = SuperStream::new(&Exchange {
            name: "x",
            arguments: &args,
        })
        .unwrap();
        // Bound out of order: ordered by key as a number.
        for (id, key) in [(3, "2"), (1, "0"), (2, "1")] {
            r.bind(&Binding {
                id: BindingId(id),
                key,
                target: Target::Queue("p"),
                arguments: &args,
            })
            .unwrap();
        }
        let route = |r: &mut SuperStream, key: &str| {
            let mut out = Destinations::new();
            r.route(&Message::new(key), &mut out);
            out.sorted()
        };
        let mut seen = std::collections::BTreeMap::new();
        for i in 0..300 {
            let key = format!("customer-{i}");
            let to = route(&mut r, &key);
            assert_eq!(to.len(), 1, "exactly one partition");
            assert_eq!(route(&mut r, &key), to, "the same partition again");
            *seen.entry(to[0]).or_insert(0) += 1;
        }
        assert_eq!(seen.len(), 3, "{seen:?}");
        assert!(seen.values().all(|n| *n > 60), "{seen:?}");
        let expected = BindingId(1 + murmur3_32(b"customer-7", SEED) % 3);
        assert_eq!(route(&mut r, "customer-7"), [expected]);
    }
}
