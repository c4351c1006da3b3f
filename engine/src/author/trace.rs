//! Why did this message go there? A message's way through its exchanges,
//! step by step, as `wasmq trace` and the admin API show it.
//!
//! The publish path (`route.rs`) is generic over an [`Observer`]. The
//! publishes of every client run it with `()`, whose steps are never
//! built and whose clock is never read, so the compiler removes both; a
//! trace runs the very same code with a [`Steps`] recorder. A trace is
//! therefore exactly the decision the broker makes, down to which version
//! of a plugin (serving or a staged candidate) decided each step.
//!
//! A dry trace ([`Broker::trace`]) enqueues nothing and counts nothing. A
//! message published with the header [`TRACE_HEADER`] by a user allowed to
//! trace is delivered as usual and its trace is kept in a short history
//! ([`Broker::traces`]).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;

use crate::author::candidate::By;
use crate::broker::Queue;
use crate::broker::exchange::{BindingTable, Destination, Exchange};
use crate::broker::{Broker, VHost};
use crate::message::Message;
use crate::plugin::{PluginFault, PluginVersion, TransformDecision};

/// A publish carrying this header (any value) is traced, if its user may.
pub const TRACE_HEADER: &str = "x-wasmq-trace";

/// Traces kept from traced publishes.
const KEPT: usize = 100;
/// Bytes of traces kept (as their JSON measures them): a publish through
/// a wide fanout makes a large trace, and 100 of them must not grow the
/// broker without bound.
pub const KEPT_BYTES: usize = 4 << 20;
/// Bindings one route step lists; the rest are counted in its `omitted`.
pub const TRACED_BINDINGS: usize = 256;

/// One step of a message's way.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "step", rename_all = "snake_case")]
pub enum Step {
    /// It entered an exchange.
    Exchange {
        /// The exchange.
        exchange: String,
        /// Its type (router plugin).
        kind: String,
    },
    /// The exchange's transform decided.
    Transform {
        /// The exchange.
        exchange: String,
        /// The plugin.
        plugin: String,
        /// The version that decided (short hash).
        version: String,
        /// Whether a staged candidate decided (a canary's share).
        candidate: bool,
        /// `keep`, `drop`, `dead_letter (reason)`, `rewrite (...)` or `fault: ...`.
        outcome: String,
        /// The routing key routed on after it.
        routing_key: String,
        /// Call time, µs.
        took_us: f64,
    },
    /// The exchange's router picked bindings.
    Route {
        /// The exchange.
        exchange: String,
        /// The router plugin.
        plugin: String,
        /// The version that decided (short hash).
        version: String,
        /// Whether a staged candidate decided.
        candidate: bool,
        /// The bindings chosen (at most [`TRACED_BINDINGS`]).
        bindings: Vec<TracedBinding>,
        /// Bindings chosen beyond those listed.
        #[serde(default, skip_serializing_if = "is_zero")]
        omitted: usize,
        /// Call time, µs.
        took_us: f64,
    },
    /// A binding's filter decided.
    Filter {
        /// The exchange.
        exchange: String,
        /// The filter plugin.
        plugin: String,
        /// The version that decided (short hash).
        version: String,
        /// Whether a staged candidate decided.
        candidate: bool,
        /// The binding's destination.
        destination: String,
        /// The binding's key.
        key: String,
        /// Whether the message passed.
        passed: bool,
        /// Call time, µs.
        took_us: f64,
    },
    /// A plugin faulted.
    Fault {
        /// The exchange.
        exchange: String,
        /// The plugin.
        plugin: String,
        /// The fault.
        fault: String,
    },
    /// Nothing was routed: on to the alternate exchange.
    Alternate {
        /// The exchange.
        exchange: String,
        /// Its `alternate-exchange`.
        to: String,
    },
    /// Held by a delayed exchange: it is routed when its `x-delay` is up.
    Delayed {
        /// The exchange.
        exchange: String,
        /// The queue it waits in.
        queue: String,
    },
    /// Dead-lettered (a transform's decision or a fault).
    DeadLetter {
        /// The exchange.
        exchange: String,
        /// Its `x-dead-letter-exchange`.
        to: String,
        /// Why.
        reason: String,
    },
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// A binding a router chose.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TracedBinding {
    /// `queue` or `exchange`.
    pub destination_type: String,
    /// Its name.
    pub destination: String,
    /// The binding key.
    pub key: String,
    /// Its filter plugin, if any.
    pub filter: Option<String>,
}

/// A message's whole way.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Trace {
    /// The virtual host.
    pub vhost: String,
    /// The exchange published to.
    pub exchange: String,
    /// The routing key published with.
    pub routing_key: String,
    /// Whether it was only traced (nothing enqueued).
    pub dry: bool,
    /// The steps, in order.
    pub steps: Vec<Step>,
    /// The queues on this node it reached (or would).
    pub queues: Vec<String>,
    /// Queues on other nodes it reached, as `node/queue`.
    pub forwarded: Vec<String>,
    /// Faults the publisher is told of (not dead-lettered).
    pub faults: Vec<String>,
    /// Whole time, µs.
    pub took_us: f64,
    /// When (ms since the epoch).
    pub at_ms: u64,
}

/// What the publish path tells at each step.
pub(crate) trait Observer {
    /// Whether steps are recorded (and the clock read for them).
    const ON: bool;
    /// Record the step `f` builds.
    fn step(&mut self, f: impl FnOnce() -> Step);
    /// Whether the exchanges' counters count this publish.
    fn counts(&self) -> bool {
        true
    }
    /// The message reached `queue` (here; copies to other nodes are in the
    /// outcome's forwards).
    #[inline(always)]
    fn delivered(&mut self, _queue: &Queue) {}
}

impl Observer for () {
    const ON: bool = false;
    #[inline(always)]
    fn step(&mut self, _: impl FnOnce() -> Step) {}
}

/// The recorder a trace runs with.
pub(crate) struct Steps {
    routing_key: String,
    started: Instant,
    dry: bool,
    steps: Vec<Step>,
    queues: Vec<String>,
}

impl Steps {
    /// A recorder for `message`'s way; `dry`: nothing is enqueued or
    /// counted.
    pub(crate) fn new(message: &Message, dry: bool) -> Steps {
        Steps {
            routing_key: message.routing_key.to_string(),
            started: Instant::now(),
            dry,
            steps: Vec::new(),
            queues: Vec::new(),
        }
    }
}

impl Observer for Steps {
    const ON: bool = true;
    fn step(&mut self, f: impl FnOnce() -> Step) {
        self.steps.push(f());
    }
    fn counts(&self) -> bool {
        !self.dry
    }
    fn delivered(&mut self, queue: &Queue) {
        self.queues.push(queue.name.clone());
    }
}

/// Time since `t`, µs (0 when not tracing).
pub(crate) fn since(t: Option<Instant>) -> f64 {
    t.map_or(0.0, |t| t.elapsed().as_secs_f64() * 1e6)
}

pub(crate) fn transform_step(
    x: &Exchange,
    version: &PluginVersion,
    by: By,
    decided: &Result<TransformDecision, PluginFault>,
    message: &Message,
    took_us: f64,
) -> Step {
    let (outcome, routing_key) = match decided {
        Ok(d) => {
            let key = match d {
                TransformDecision::Rewrite {
                    routing_key: Some(k),
                    ..
                } => k.clone(),
                _ => message.routing_key.to_string(),
            };
            (crate::author::candidate::describe_transform(d), key)
        }
        Err(f) => (format!("fault: {f}"), message.routing_key.to_string()),
    };
    Step::Transform {
        exchange: x.name.clone(),
        plugin: version.name.clone(),
        version: version.short_hash().to_owned(),
        candidate: by == By::Candidate,
        outcome,
        routing_key,
        took_us,
    }
}

pub(crate) fn route_step(
    x: &Exchange,
    by: By,
    ids: &[u32],
    table: &BindingTable,
    took_us: f64,
) -> Step {
    let version = match by {
        By::Candidate => x
            .candidates
            .load()
            .as_ref()
            .and_then(|c| c.router.as_ref().map(|(r, _)| r.version().clone())),
        By::Serving => None,
    }
    .unwrap_or_else(|| x.router.load().version().clone());
    let mut seen = std::collections::HashSet::new();
    let mut chosen = ids
        .iter()
        .filter(|id| seen.insert(**id))
        .filter_map(|id| table.get(*id));
    let bindings: Vec<TracedBinding> = chosen
        .by_ref()
        .take(TRACED_BINDINGS)
        .map(|b| {
            let (t, n) = match &b.destination {
                Destination::Queue(q) => ("queue", q),
                Destination::Exchange(e) => ("exchange", e),
            };
            TracedBinding {
                destination_type: t.into(),
                destination: n.clone(),
                key: b.key.clone(),
                filter: b.filter_name.clone(),
            }
        })
        .collect();
    Step::Route {
        exchange: x.name.clone(),
        plugin: x.router_kind().to_owned(),
        version: version.short_hash().to_owned(),
        candidate: by == By::Candidate,
        bindings,
        omitted: chosen.count(),
        took_us,
    }
}

pub(crate) fn filter_step(
    x: &Exchange,
    binding: &crate::broker::Binding,
    version: &PluginVersion,
    by: By,
    passed: bool,
    took_us: f64,
) -> Step {
    Step::Filter {
        exchange: x.name.clone(),
        plugin: version.name.clone(),
        version: version.short_hash().to_owned(),
        candidate: by == By::Candidate,
        destination: binding.destination.name().to_owned(),
        key: binding.key.clone(),
        passed,
        took_us,
    }
}

/// Traces of traced publishes, newest last: at most [`KEPT`] of them and
/// [`KEPT_BYTES`] together.
#[derive(Debug, Default)]
pub struct Traces {
    kept: Mutex<(VecDeque<(Trace, usize)>, usize)>,
}

impl Traces {
    /// The kept traces, oldest first.
    pub fn list(&self) -> Vec<Trace> {
        self.kept.lock().0.iter().map(|(t, _)| t.clone()).collect()
    }

    /// Bytes the kept traces take, as their JSON measures them.
    pub fn bytes(&self) -> usize {
        self.kept.lock().1
    }

    pub(crate) fn keep(&self, trace: Trace) {
        let size = trace.json_len();
        if size > KEPT_BYTES {
            return;
        }
        let mut k = self.kept.lock();
        let (traces, bytes) = &mut *k;
        while traces.len() == KEPT || *bytes + size > KEPT_BYTES {
            match traces.pop_front() {
                Some((_, n)) => *bytes -= n,
                None => break,
            }
        }
        traces.push_back((trace, size));
        *bytes += size;
    }
}

impl Trace {
    /// The length of its JSON, counted without making it.
    fn json_len(&self) -> usize {
        struct Count(usize);
        impl std::io::Write for Count {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0 += b.len();
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let mut c = Count(0);
        let _ = serde_json::to_writer(&mut c, self);
        c.0
    }
}

impl Trace {
    /// The trace of a routing that has run.
    pub(crate) fn finish(
        vhost: &VHost,
        exchange: &Exchange,
        steps: Steps,
        outcome: &crate::broker::PublishOutcome,
    ) -> Trace {
        Trace {
            vhost: vhost.name.clone(),
            exchange: exchange.name.clone(),
            routing_key: steps.routing_key,
            dry: steps.dry,
            steps: steps.steps,
            queues: steps.queues,
            forwarded: outcome
                .forwards
                .iter()
                .flat_map(|f| f.queues.iter().map(move |q| format!("{}/{q}", f.node)))
                .collect(),
            faults: outcome.faults.iter().map(|f| f.to_string()).collect(),
            took_us: since(Some(steps.started)),
            at_ms: crate::message::now_ms(),
        }
    }
}

impl Broker {
    /// Run `message` through `exchange` as a publish would, enqueueing
    /// nothing and counting nothing, and tell each step.
    pub fn trace(&self, vhost: &VHost, exchange: &Arc<Exchange>, message: Message) -> Trace {
        let mut steps = Steps::new(&message, true);
        let outcome = self.route_only(vhost, exchange, message, &mut steps);
        Trace::finish(vhost, exchange, steps, &outcome)
    }

    /// The traces of traced publishes.
    pub fn traces(&self) -> &Traces {
        &self.traces
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trace(vhost: &str, bindings: usize) -> Trace {
        Trace {
            vhost: vhost.into(),
            exchange: "fan".into(),
            routing_key: "k".into(),
            dry: false,
            steps: vec![Step::Route {
                exchange: "fan".into(),
                plugin: "fanout".into(),
                version: "abc".into(),
                candidate: false,
                bindings: (0..bindings)
                    .map(|i| TracedBinding {
                        destination_type: "queue".into(),
                        destination: format!("queue-number-{i}"),
                        key: String::new(),
                        filter: None,
                    })
                    .collect(),
                omitted: 0,
                took_us: 1.0,
            }],
            queues: vec![],
            forwarded: vec![],
            faults: vec![],
            took_us: 1.0,
            at_ms: 0,
        }
    }

    #[test]
    fn kept_traces_are_bounded_by_bytes_as_well_as_count() {
        let kept = Traces::default();
        for _ in 0..300 {
            kept.keep(trace("/", TRACED_BINDINGS));
        }
        let one = trace("/", TRACED_BINDINGS).json_len();
        assert!(kept.bytes() <= KEPT_BYTES, "{}", kept.bytes());
        assert_eq!(kept.list().len(), (KEPT_BYTES / one).min(KEPT));
        assert_eq!(kept.bytes(), kept.list().len() * one);
        for _ in 0..300 {
            kept.keep(trace("/", 0));
        }
        assert_eq!(kept.list().len(), KEPT, "small ones are bounded by count");
        assert!(kept.list().iter().all(|t| t.json_len() < 1024));
    }
}
