//! The `direct` exchange type: a message goes to every binding whose key
//! equals its routing key. A hash map from key to bindings, so a publish
//! costs one look-up however many bindings there are.

use std::collections::HashMap;

use wasmq_sdk::{Binding, BindingId, Destinations, Error, Exchange, Message, Router};

/// Exact-match routing on the routing key.
#[derive(Default)]
pub struct Direct {
    by_key: HashMap<String, Vec<BindingId>>,
}

impl Router for Direct {
    const DETERMINISTIC: bool = true;

    fn new(_exchange: &Exchange<'_>) -> Result<Self, Error> {
        Ok(Direct::default())
    }

    fn bind(&mut self, b: &Binding<'_>) -> Result<(), Error> {
        self.by_key.entry(b.key.to_owned()).or_default().push(b.id);
        Ok(())
    }

    fn unbind(&mut self, b: &Binding<'_>) {
        if let Some(ids) = self.by_key.get_mut(b.key) {
            ids.retain(|id| *id != b.id);
            if ids.is_empty() {
                self.by_key.remove(b.key);
            }
        }
    }

    fn route(&mut self, m: &Message<'_>, out: &mut Destinations) {
        if let Some(ids) = self.by_key.get(m.routing_key()) {
            for id in ids {
                out.push(*id);
            }
        }
    }
}

wasmq_sdk::plugin!(router = Direct);

#[cfg(test)]
mod tests {
    use super::*;
    use wasmq_sdk::{FieldTable, Target};

    #[test]
    fn routes_exact_keys_only() {
        let args = FieldTable::new();
        let mut r = Direct::new(&Exchange {
            name: "x",
            arguments: &args,
        })
        .unwrap();
        for (id, key) in [(1, "a"), (2, "b"), (3, "a")] {
            r.bind(&Binding {
                id: BindingId(id),
                key,
                target: Target::Queue("q"),
                arguments: &args,
            })
            .unwrap();
        }
        let route = |r: &mut Direct, key| {
            let mut out = Destinations::new();
            r.route(&Message::new(key), &mut out);
            out.sorted()
        };
        assert_eq!(route(&mut r, "a"), vec![BindingId(1), BindingId(3)]);
        assert_eq!(route(&mut r, "a.b"), vec![]);
        r.unbind(&Binding {
            id: BindingId(1),
            key: "a",
            target: Target::Queue("q"),
            arguments: &args,
        });
        assert_eq!(route(&mut r, "a"), vec![BindingId(3)]);
    }
}
