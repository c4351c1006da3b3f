//! The `fanout` exchange type: every message goes to every binding, whatever
//! its routing key.

use wasmq_sdk::{Binding, BindingId, Destinations, Error, Exchange, Message, Router};

/// Broadcast routing.
#[derive(Default)]
pub struct Fanout {
    bindings: Vec<BindingId>,
}

impl Router for Fanout {
    /// The decision does not even depend on the key: one cache entry per key
    /// is still correct, and saves the call.
    const DETERMINISTIC: bool = true;

    fn new(_exchange: &Exchange<'_>) -> Result<Self, Error> {
        Ok(Fanout::default())
    }

    fn bind(&mut self, b: &Binding<'_>) -> Result<(), Error> {
        self.bindings.push(b.id);
        Ok(())
    }

    fn unbind(&mut self, b: &Binding<'_>) {
        self.bindings.retain(|id| *id != b.id);
    }

    fn route(&mut self, _m: &Message<'_>, out: &mut Destinations) {
        for id in &self.bindings {
            out.push(*id);
        }
    }
}

wasmq_sdk::plugin!(router = Fanout);

#[cfg(test)]
mod tests {
    use super::*;
    use wasmq_sdk::{FieldTable, Target};

    #[test]
    fn every_binding_gets_every_message() {
        let args = FieldTable::new();
        let mut r = Fanout::new(&Exchange {
            name: "x",
            arguments: &args,
        })
        .unwrap();
        for id in 0..3 {
            r.bind(&Binding {
                id: BindingId(id),
                key: "ignored",
                target: Target::Queue("q"),
                arguments: &args,
            })
            .unwrap();
        }
        let mut out = Destinations::new();
        r.route(&Message::new("anything"), &mut out);
        assert_eq!(out.sorted(), vec![BindingId(0), BindingId(1), BindingId(2)]);
    }
}
