//! Test a plugin natively, the way the broker drives it, in a few lines.
//!
//! The broker calls a router's `bind` for every binding and its `route` for
//! every message, and delivers to the bindings' queues. [`TestRouter`] does
//! the same with queue names, so a plugin's first test is three lines:
//!
//! ```
//! use wasmq_sdk::testing::TestRouter;
//! # use wasmq_sdk::{Binding, Destinations, Error, Exchange, Message, Router};
//! # struct Direct(Vec<(wasmq_sdk::BindingId, String)>);
//! # impl Router for Direct {
//! #     fn new(_: &Exchange<'_>) -> Result<Self, Error> { Ok(Direct(Vec::new())) }
//! #     fn bind(&mut self, b: &Binding<'_>) -> Result<(), Error> { self.0.push((b.id, b.key.into())); Ok(()) }
//! #     fn unbind(&mut self, b: &Binding<'_>) { self.0.retain(|(id, _)| *id != b.id) }
//! #     fn route(&mut self, m: &Message<'_>, out: &mut Destinations) {
//! #         for (id, key) in &self.0 { if key == m.routing_key() { out.push(*id) } }
//! #     }
//! # }
//! let mut t = TestRouter::<Direct>::new();
//! t.bind("orders", "order.created");
//! assert_eq!(t.route_key("order.created"), ["orders"]);
//! ```
//!
//! Filters and transforms are plain values: call their trait methods on a
//! [`Message`] built with [`Message::new`].

use crate::{Binding, BindingId, Destinations, Exchange, FieldTable, Message, Router, Target};

/// A router with queues bound by name, as the broker would drive it.
pub struct TestRouter<R: Router> {
    router: R,
    /// Each binding's (queue, key, arguments), by id; `None` once unbound.
    bindings: Vec<Option<(String, String, FieldTable)>>,
}

impl<R: Router> TestRouter<R> {
    /// The router of an exchange declared without arguments. Panics if the
    /// router refuses it (use [`TestRouter::with_arguments`] to test that).
    pub fn new() -> Self {
        match Self::with_arguments(FieldTable::new()) {
            Ok(t) => t,
            Err(e) => panic!("the router refused an exchange without arguments: {e}"),
        }
    }

    /// The router of an exchange declared with `arguments`, or the error
    /// the declare would be refused with.
    pub fn with_arguments(arguments: FieldTable) -> Result<Self, crate::Error> {
        let router = R::new(&Exchange {
            name: "test",
            arguments: &arguments,
        })?;
        Ok(TestRouter {
            router,
            bindings: Vec::new(),
        })
    }

    /// Bind `queue` with `key`. Panics if the router refuses the binding.
    pub fn bind(&mut self, queue: &str, key: &str) -> &mut Self {
        if let Err(e) = self.try_bind(queue, key, FieldTable::new()) {
            panic!("the router refused binding {queue} with key {key:?}: {e}");
        }
        self
    }

    /// Bind `queue` with `key` and `arguments`, or the error the bind
    /// would be refused with.
    pub fn try_bind(
        &mut self,
        queue: &str,
        key: &str,
        arguments: FieldTable,
    ) -> Result<&mut Self, crate::Error> {
        let id = BindingId(self.bindings.len() as u32);
        self.router.bind(&Binding {
            id,
            key,
            target: Target::Queue(queue),
            arguments: &arguments,
        })?;
        self.bindings
            .push(Some((queue.to_owned(), key.to_owned(), arguments)));
        Ok(self)
    }

    /// Remove the bindings of `queue` with `key`.
    pub fn unbind(&mut self, queue: &str, key: &str) -> &mut Self {
        for (i, slot) in self.bindings.iter_mut().enumerate() {
            if slot
                .as_ref()
                .is_some_and(|(q, k, _)| q == queue && k == key)
            {
                let (q, k, arguments) = slot.take().expect("checked");
                self.router.unbind(&Binding {
                    id: BindingId(i as u32),
                    key: &k,
                    target: Target::Queue(&q),
                    arguments: &arguments,
                });
            }
        }
        self
    }

    /// The queues `message` reaches, sorted, each once (as the broker
    /// delivers: one copy per queue however many bindings matched).
    pub fn route(&mut self, message: &Message<'_>) -> Vec<String> {
        let mut out = Destinations::new();
        self.router.route(message, &mut out);
        let mut queues: Vec<String> = out
            .ids()
            .into_iter()
            .filter_map(|id| self.bindings.get(id.0 as usize)?.as_ref())
            .map(|(q, _, _)| q.clone())
            .collect();
        queues.sort();
        queues.dedup();
        queues
    }

    /// The queues a message with routing key `key` (and nothing else)
    /// reaches.
    pub fn route_key(&mut self, key: &str) -> Vec<String> {
        self.route(&Message::new(key))
    }

    /// The router itself.
    pub fn router(&mut self) -> &mut R {
        &mut self.router
    }
}

impl<R: Router> Default for TestRouter<R> {
    fn default() -> Self {
        Self::new()
    }
}
