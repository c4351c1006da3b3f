//! A plugin that misbehaves on request, for the fault tests. Never load it
//! on a real broker.
//!
//! As a router it routes like `fanout`, except by routing key:
//! `trap` panics, `loop` spins forever, `memory` allocates without end,
//! `malformed` routes to a binding that does not exist. The exchange
//! argument `x-fault-in-init: trap` makes `new` panic.
//! As a filter it traps when the body is `trap`, and otherwise passes.
//! As a transform it traps on routing key `trap`, otherwise keeps.

use std::hint::black_box;

use wasmq_sdk::{
    Binding, BindingId, Destinations, Error, Exchange, Filter, Message, Outcome, Router,
    Subscription, Transform,
};

fn misbehave(what: &str) {
    match what {
        "trap" => panic!("asked to trap"),
        "loop" => loop {
            black_box(0u64);
        },
        "memory" => {
            let mut hoard: Vec<Vec<u8>> = Vec::new();
            loop {
                hoard.push(black_box(vec![1u8; 1 << 20]));
            }
        }
        _ => {}
    }
}

/// The router.
pub struct Faulty {
    bindings: Vec<BindingId>,
}

impl Router for Faulty {
    fn new(exchange: &Exchange<'_>) -> Result<Self, Error> {
        if let Some(what) = exchange.arguments.get_str("x-fault-in-init") {
            misbehave(what);
        }
        Ok(Faulty {
            bindings: Vec::new(),
        })
    }

    fn bind(&mut self, b: &Binding<'_>) -> Result<(), Error> {
        self.bindings.push(b.id);
        Ok(())
    }

    fn unbind(&mut self, b: &Binding<'_>) {
        self.bindings.retain(|id| *id != b.id);
    }

    fn route(&mut self, m: &Message<'_>, out: &mut Destinations) {
        misbehave(m.routing_key());
        if m.routing_key() == "malformed" {
            out.push(BindingId(999_999));
            return;
        }
        for id in &self.bindings {
            out.push(*id);
        }
    }
}

/// The filter.
pub struct FaultyFilter;

impl Filter for FaultyFilter {
    fn new(_s: &Subscription<'_>) -> Result<Self, Error> {
        Ok(FaultyFilter)
    }

    fn filter(&mut self, m: &Message<'_>) -> bool {
        misbehave(std::str::from_utf8(m.body()).unwrap_or(""));
        true
    }
}

/// The transform.
pub struct FaultyTransform;

impl Transform for FaultyTransform {
    fn new(_e: &Exchange<'_>) -> Result<Self, Error> {
        Ok(FaultyTransform)
    }

    fn transform(&mut self, m: &Message<'_>) -> Outcome {
        misbehave(m.routing_key());
        Outcome::Keep
    }
}

wasmq_sdk::plugin!(
    router = Faulty,
    filter = FaultyFilter,
    transform = FaultyTransform
);
