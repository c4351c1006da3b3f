//! The publish path: transform → route → filter → deliver, with a defined
//! outcome for every message whatever the plugins do.
//!
//! * A transform may rewrite, drop or dead-letter the message.
//! * The router picks bindings; a binding's filter may drop it there.
//! * Exchange-to-exchange bindings recurse (each exchange at most once per
//!   publish, so cycles end); a queue receives a message at most once.
//! * Unroutable at an exchange with `alternate-exchange`: routed there.
//! * A plugin fault: the message goes to the exchange's
//!   `x-dead-letter-exchange` with `x-wasmq-fault*` headers; without one,
//!   the fault is reported in the outcome so the AMQP layer can nack it (in
//!   confirm mode) or return it (mandatory). It is never dropped silently.

use std::sync::Arc;

use amq_protocol::types::{AMQPValue, FieldTable, LongString, ShortString};

use super::exchange::{Destination, Exchange};
use super::queue::{Delay, Queue, Reply, delay_of};
use super::{Broker, BrokerError, VHost};
use crate::author::candidate::{self, By};
use crate::author::trace::{self, Observer, Step, Steps};
use crate::message::Message;
use crate::plugin::{PluginFault, TransformDecision, TransformPlugin};

/// A plugin fault the publisher must hear about (it was not dead-lettered).
#[derive(Clone, Debug, PartialEq)]
pub struct FaultReport {
    /// The exchange being decided for.
    pub exchange: String,
    /// The plugin that faulted.
    pub plugin: String,
    /// What happened.
    pub fault: PluginFault,
}

impl std::fmt::Display for FaultReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "plugin '{}' of exchange '{}' {}",
            self.plugin, self.exchange, self.fault
        )
    }
}

/// What happened to one published message.
#[derive(Debug, Default)]
pub struct PublishOutcome {
    /// Queues it was delivered to.
    pub delivered: usize,
    /// Copies dead-lettered (transform decisions and faults).
    pub dead_lettered: usize,
    /// A transform dropped it (or dead-lettered it with nowhere to go).
    pub dropped: bool,
    /// Faults that were not dead-lettered: the publisher must be told.
    pub faults: Vec<FaultReport>,
    /// Queues that refused it (`x-overflow: reject-publish`): a nack for a
    /// confirming publisher.
    pub rejected: usize,
    /// Queues it went to that are above their flow watermark: the
    /// publisher should be held back until they drain.
    pub congested: Vec<Arc<Queue>>,
    /// The store's sync ticket covering every copy written to a queue log
    /// (0: none was). A publisher confirm waits until the store has synced
    /// this far.
    pub ticket: u64,
    /// Copies for queues on other nodes, to be sent there (counted in
    /// `delivered`). Empty unless clustered.
    pub forwards: Vec<Forward>,
    /// Copies proposed to quorum queues led here whose commit will be
    /// answered through the replies the caller handed out: a publisher
    /// confirm waits for that many answers.
    pub replicating: u32,
}

/// A message routed to queues that live on another node.
#[derive(Debug)]
pub struct Forward {
    /// The node.
    pub node: String,
    /// Its queues the message goes to.
    pub queues: Vec<String>,
    /// The message (each copy of one publish shares it).
    pub message: Arc<Message>,
}

impl PublishOutcome {
    /// Whether any queue got it.
    pub fn routed(&self) -> bool {
        self.delivered > 0
    }
}

/// What one publish gathers on its way through the exchanges: the queues
/// it reaches, the exchanges it has entered, and its outcome.
#[derive(Default)]
struct Routing {
    deliveries: Vec<(Arc<Queue>, Arc<Message>)>,
    /// Exchanges this publish has entered (cycles end there). Held as
    /// `Arc`s so pointer identity stays sound for the whole publish; a name
    /// clone per exchange was an allocation on every publish.
    visited: Vec<Arc<Exchange>>,
    outcome: PublishOutcome,
    ids: Vec<u32>,
    /// Routing a delayed exchange's message that is due: no delayed
    /// exchange on its way holds it again.
    due: bool,
}

impl Routing {
    fn deliver(&mut self, q: Arc<Queue>, m: &Arc<Message>) {
        if !self.deliveries.iter().any(|(dq, _)| Arc::ptr_eq(dq, &q)) {
            self.deliveries.push((q, m.clone()));
        }
    }

    /// Deliver to `vhost`'s queue `name`, here or on its node.
    fn deliver_to(&mut self, vhost: &VHost, name: &str, m: &Arc<Message>) {
        match vhost.queue(name) {
            Ok(q) => self.deliver(q, m),
            Err(BrokerError::OnOtherNode { node, name, .. }) => self.forward(node, name, m),
            Err(_) => {}
        }
    }

    #[cold]
    fn forward(&mut self, node: String, queue: String, m: &Arc<Message>) {
        let forwards = &mut self.outcome.forwards;
        if forwards
            .iter()
            .any(|f| f.node == node && f.queues.contains(&queue))
        {
            return;
        }
        // One frame per node for all the queues there that get the same
        // copy (a transform or dead-lettering makes another message).
        match forwards
            .iter_mut()
            .find(|f| f.node == node && Arc::ptr_eq(&f.message, m))
        {
            Some(f) => f.queues.push(queue),
            None => forwards.push(Forward {
                node,
                queues: vec![queue],
                message: m.clone(),
            }),
        }
    }

    /// Copies routed so far, here and to other nodes.
    fn reached(&self) -> usize {
        self.deliveries.len()
            + self
                .outcome
                .forwards
                .iter()
                .map(|f| f.queues.len())
                .sum::<usize>()
    }
}

/// A copy of `m` with extra headers.
fn with_headers(m: &Message, extra: &[(&str, String)]) -> Message {
    let mut headers = m.properties.headers().clone().unwrap_or_default();
    for (k, v) in extra {
        headers.insert(
            ShortString::from(*k),
            AMQPValue::LongString(LongString::from(v.as_str())),
        );
    }
    let props = m.properties.clone().with_headers(headers);
    Message::new(
        m.exchange.clone(),
        m.routing_key.clone(),
        props,
        m.body.clone(),
    )
}

impl Broker {
    /// Publish `message` to `exchange` (`""` is the default exchange) and
    /// deliver it to the queues it routes to.
    pub fn publish(
        &self,
        vhost: &VHost,
        exchange: &str,
        message: Message,
    ) -> Result<PublishOutcome, BrokerError> {
        let x = if exchange.is_empty() {
            None
        } else {
            Some(vhost.exchange(exchange)?)
        };
        Ok(self.publish_via(vhost, x.as_ref(), message))
    }

    /// [`Broker::publish`] to an exchange the caller has looked up already
    /// (`None`: the default exchange).
    pub fn publish_via(
        &self,
        vhost: &VHost,
        exchange: Option<&Arc<Exchange>>,
        message: Message,
    ) -> PublishOutcome {
        self.publish_with(vhost, exchange, message, || None, &mut ())
    }

    /// [`Broker::publish_via`], with `reply` making the answer each quorum
    /// queue's commit is to be told to (a publisher confirm waits for it).
    pub fn publish_replying(
        &self,
        vhost: &VHost,
        exchange: Option<&Arc<Exchange>>,
        message: Message,
        reply: impl FnMut() -> Option<Reply>,
    ) -> PublishOutcome {
        self.publish_with(vhost, exchange, message, reply, &mut ())
    }

    /// [`Broker::publish_replying`] to an exchange, keeping the message's
    /// trace (the publish carried [`trace::TRACE_HEADER`] and its user may
    /// trace).
    #[cold]
    pub fn publish_traced(
        &self,
        vhost: &VHost,
        exchange: &Arc<Exchange>,
        message: Message,
        reply: impl FnMut() -> Option<Reply>,
    ) -> PublishOutcome {
        let mut steps = Steps::new(&message, false);
        let outcome = self.publish_with(vhost, Some(exchange), message, reply, &mut steps);
        self.traces
            .keep(trace::Trace::finish(vhost, exchange, steps, &outcome));
        outcome
    }

    /// Route `message` through `exchange` without enqueueing it; the queues
    /// here it reaches are told to `steps`.
    pub(crate) fn route_only(
        &self,
        vhost: &VHost,
        exchange: &Arc<Exchange>,
        message: Message,
        steps: &mut Steps,
    ) -> PublishOutcome {
        let mut ctx = Routing::default();
        self.route_into(vhost, exchange, Arc::new(message), &mut ctx, steps);
        ctx.outcome.delivered = ctx.reached();
        for (q, _) in &ctx.deliveries {
            steps.delivered(q);
        }
        ctx.outcome
    }

    /// The publish path, made once per kind of `reply` (no dynamic call for
    /// a publisher without confirms) and of observer (none for a publish
    /// that is not traced).
    #[inline(always)]
    fn publish_with<O: Observer>(
        &self,
        vhost: &VHost,
        exchange: Option<&Arc<Exchange>>,
        message: Message,
        reply: impl FnMut() -> Option<Reply>,
        obs: &mut O,
    ) -> PublishOutcome {
        if let Some(x) = exchange
            && x.capturing.load(std::sync::atomic::Ordering::Relaxed)
        {
            x.offer_capture(&message);
        }
        let message = Arc::new(message);
        let mut ctx = Routing::default();
        match exchange {
            // The default exchange binds every queue by name; it is not a
            // plugin because its behaviour is fixed by the spec.
            None => ctx.deliver_to(vhost, &message.routing_key, &message),
            Some(x) => self.route_into(vhost, x, message, &mut ctx, obs),
        }
        self.deliver_routed(ctx, reply, obs)
    }

    /// Route a delayed exchange's message that is due: through `x`'s
    /// router and bindings as they are now (its transform ran when it was
    /// published), and deliver it.
    pub(crate) fn publish_due(
        &self,
        vhost: &VHost,
        x: &Arc<Exchange>,
        message: Arc<Message>,
    ) -> PublishOutcome {
        let mut ctx = Routing {
            due: true,
            ..Routing::default()
        };
        ctx.visited.push(x.clone());
        self.route_bindings(vhost, x, message, &mut ctx, &mut ());
        self.deliver_routed(ctx, || None, &mut ())
    }

    /// Hand a routed message to the queues it reached.
    #[inline(always)]
    fn deliver_routed<O: Observer>(
        &self,
        mut ctx: Routing,
        mut reply: impl FnMut() -> Option<Reply>,
        obs: &mut O,
    ) -> PublishOutcome {
        ctx.outcome.delivered = ctx.reached();
        for (q, m) in ctx.deliveries {
            obs.delivered(&q);
            if let Some(r) = q.replica() {
                // A quorum queue: the copy is proposed to its log, and
                // joins the queue when committed.
                let answer = reply();
                ctx.outcome.replicating += u32::from(answer.is_some());
                r.enqueue(m, answer);
                continue;
            }
            let pushed = q.push(m);
            if !pushed.accepted {
                ctx.outcome.delivered -= 1;
                ctx.outcome.rejected += 1;
            }
            ctx.outcome.ticket = ctx.outcome.ticket.max(pushed.ticket);
            if q.congested() {
                ctx.outcome.congested.push(q);
            }
        }
        ctx.outcome
    }

    /// Inlined into the publish path (its recursive calls stay calls):
    /// grown by the delay check, the compiler stopped inlining it, and the
    /// call cost a publish 8 instructions (callgrind, `publish/topic_1000`).
    #[inline(always)]
    fn route_into<O: Observer>(
        &self,
        vhost: &VHost,
        x: &Arc<Exchange>,
        message: Arc<Message>,
        ctx: &mut Routing,
        obs: &mut O,
    ) {
        if ctx.visited.iter().any(|v| Arc::ptr_eq(v, x)) {
            return;
        }
        ctx.visited.push(x.clone());
        if obs.counts() {
            x.count(&x.stats.published);
        }
        obs.step(|| Step::Exchange {
            exchange: x.name.clone(),
            kind: x.kind.clone(),
        });
        if let Some(ids) = &x.dedup {
            let log = x.dedup_log.get();
            match take_id(ids, &message) {
                Taken::NoId => {}
                Taken::New(key, expires) => {
                    // Confirmed once the id is on disk with the message.
                    if let Some(log) = log {
                        ctx.outcome.ticket = ctx.outcome.ticket.max(log.remember(key, expires));
                    }
                }
                Taken::Duplicate | Taken::Refused => {
                    // Confirmed (a duplicate once what the store has taken
                    // is on disk), not routed.
                    if let Some(log) = log {
                        ctx.outcome.ticket = ctx.outcome.ticket.max(log.issued());
                    }
                    if obs.counts() {
                        x.count(&x.stats.dropped);
                    }
                    ctx.outcome.dropped = true;
                    return;
                }
            }
        }

        let message = match x.transform.load_full() {
            None => message,
            Some(t) => match self.transform_step(x, &t, &message, obs) {
                Ok(TransformDecision::Keep) => message,
                Ok(TransformDecision::Rewrite {
                    routing_key,
                    properties,
                    body,
                }) => Arc::new(Message::new(
                    message.exchange.clone(),
                    routing_key.unwrap_or_else(|| message.routing_key.clone()),
                    properties.unwrap_or_else(|| message.properties.clone()),
                    body.unwrap_or_else(|| message.body.clone()),
                )),
                Ok(TransformDecision::Drop) => {
                    if obs.counts() {
                        x.count(&x.stats.dropped);
                    }
                    ctx.outcome.dropped = true;
                    return;
                }
                Ok(TransformDecision::DeadLetter(reason)) => {
                    let headers = [
                        ("x-wasmq-dead-letter-reason", reason),
                        ("x-wasmq-dead-letter-exchange", x.name.clone()),
                    ];
                    if !self.dead_letter(vhost, x, &message, &headers, ctx, obs) {
                        tracing::warn!(exchange = %crate::untrusted::text(&x.name), "transform dead-lettered a message but the exchange has no usable x-dead-letter-exchange; dropped");
                        ctx.outcome.dropped = true;
                    }
                    return;
                }
                Err(fault) => {
                    let plugin = t.version().name.clone();
                    self.on_fault(vhost, x, &plugin, &message, fault, ctx, obs);
                    return;
                }
            },
        };
        if let Some(d) = &x.delayed
            && !ctx.due
        {
            match delay_of(&message) {
                Ok(Delay::Ms(_)) => {
                    // Routed when due, by `publish_due`.
                    obs.step(|| Step::Delayed {
                        exchange: x.name.clone(),
                        queue: d.queue.clone(),
                    });
                    let before = ctx.reached();
                    ctx.deliver_to(vhost, &d.queue, &message);
                    if ctx.reached() == before {
                        // Its schedule is not there (being declared, or
                        // deleted): refused, never dropped unseen.
                        tracing::warn!(exchange = %crate::untrusted::text(&x.name), "delayed message refused: the exchange's schedule queue is missing");
                        ctx.outcome.rejected += 1;
                    }
                    return;
                }
                Ok(Delay::Now) => {}
                Err(why) => {
                    // Refused: nacked to a confirming publisher, returned
                    // if mandatory.
                    tracing::debug!(exchange = %crate::untrusted::text(&x.name), "message refused: {why}");
                    ctx.outcome.rejected += 1;
                    return;
                }
            }
        }
        self.route_bindings(vhost, x, message, ctx, obs);
    }

    /// The routing step: `x`'s router picks bindings, their filters decide,
    /// the message goes on to their queues and exchanges (or to the
    /// alternate exchange when none takes it). A call of its own cost a
    /// publish 12 instructions.
    #[inline(always)]
    fn route_bindings<O: Observer>(
        &self,
        vhost: &VHost,
        x: &Arc<Exchange>,
        message: Arc<Message>,
        ctx: &mut Routing,
        obs: &mut O,
    ) {
        let mut ids = std::mem::take(&mut ctx.ids);
        ids.clear();
        let started = O::ON.then(std::time::Instant::now);
        let by = match candidate::route(x, &message, &mut ids) {
            Ok(by) => by,
            Err(fault) => {
                let plugin = x.router_kind().to_owned();
                self.on_fault(vhost, x, &plugin, &message, fault, ctx, obs);
                ctx.ids = ids;
                return;
            }
        };
        let table = x.bindings.load();
        obs.step(|| trace::route_step(x, by, &ids, &table, trace::since(started)));
        let before = ctx.reached();
        for &id in &ids {
            // An id missing from the table was unbound while this message was
            // being routed (the router validated ids against next_id).
            let Some(b) = table.get(id) else {
                continue;
            };
            if let Some(filter) = &b.filter {
                let started = O::ON.then(std::time::Instant::now);
                let (decided, by) = candidate::filter(x, b, filter, &message);
                if let Ok(passed) = decided {
                    obs.step(|| {
                        let v = match (&b.filter_candidate, by) {
                            (Some((c, _)), By::Candidate) => c.version(),
                            _ => filter.version(),
                        };
                        trace::filter_step(x, b, v, by, passed, trace::since(started))
                    });
                }
                match decided {
                    Ok(true) => {}
                    Ok(false) => continue,
                    Err(fault) => {
                        let plugin = filter.version().name.clone();
                        self.on_fault(vhost, x, &plugin, &message, fault, ctx, obs);
                        continue;
                    }
                }
            }
            match &b.destination {
                Destination::Queue(name) => ctx.deliver_to(vhost, name, &message),
                Destination::Exchange(name) => {
                    if let Ok(dx) = vhost.exchange(name) {
                        self.route_into(vhost, &dx, message.clone(), ctx, obs);
                    }
                }
            }
        }
        ids.clear();
        ctx.ids = ids;
        if ctx.reached() == before
            && let Some(ae) = x.alternate_exchange.load_full()
            && let Ok(ae) = vhost.exchange(&ae)
        {
            obs.step(|| Step::Alternate {
                exchange: x.name.clone(),
                to: ae.name.clone(),
            });
            self.route_into(vhost, &ae, message, ctx, obs);
        }
        if !obs.counts() {
        } else if ctx.reached() > before {
            x.count(&x.stats.routed);
        } else {
            x.count(&x.stats.unroutable);
        }
    }

    /// `x`'s transform decides (the serving version, or a staged candidate).
    #[inline(always)]
    fn transform_step<O: Observer>(
        &self,
        x: &Exchange,
        t: &TransformPlugin,
        message: &Arc<Message>,
        obs: &mut O,
    ) -> Result<TransformDecision, PluginFault> {
        let started = O::ON.then(std::time::Instant::now);
        let (decided, by) = candidate::transform(x, t, message);
        obs.step(|| {
            let v = match by {
                By::Serving => t.version().clone(),
                By::Candidate => {
                    candidate_transform_version(x).unwrap_or_else(|| t.version().clone())
                }
            };
            trace::transform_step(x, &v, by, &decided, message, trace::since(started))
        });
        decided
    }

    /// Route a copy of `message` with `headers` to `x`'s dead-letter
    /// exchange. Returns whether it reached a queue.
    fn dead_letter<O: Observer>(
        &self,
        vhost: &VHost,
        x: &Exchange,
        message: &Message,
        headers: &[(&str, String)],
        ctx: &mut Routing,
        obs: &mut O,
    ) -> bool {
        let Some(dlx) = x
            .dead_letter_exchange
            .as_ref()
            .and_then(|n| vhost.exchange(n).ok())
        else {
            return false;
        };
        obs.step(|| Step::DeadLetter {
            exchange: x.name.clone(),
            to: dlx.name.clone(),
            reason: headers.first().map(|(_, v)| v.clone()).unwrap_or_default(),
        });
        let before = ctx.reached();
        self.route_into(
            vhost,
            &dlx,
            Arc::new(with_headers(message, headers)),
            ctx,
            obs,
        );
        let reached = ctx.reached() > before;
        if reached && obs.counts() {
            x.count(&x.stats.dead_lettered);
            ctx.outcome.dead_lettered += 1;
        }
        reached
    }

    #[allow(clippy::too_many_arguments)]
    fn on_fault<O: Observer>(
        &self,
        vhost: &VHost,
        x: &Exchange,
        plugin: &str,
        message: &Message,
        fault: PluginFault,
        ctx: &mut Routing,
        obs: &mut O,
    ) {
        if obs.counts() {
            x.count(&x.stats.faults);
        }
        obs.step(|| Step::Fault {
            exchange: x.name.clone(),
            plugin: plugin.to_owned(),
            fault: fault.to_string(),
        });
        let headers = [
            ("x-wasmq-fault", fault.kind().to_owned()),
            ("x-wasmq-fault-reason", fault.to_string()),
            ("x-wasmq-fault-exchange", x.name.clone()),
            ("x-wasmq-fault-plugin", plugin.to_owned()),
        ];
        if !self.dead_letter(vhost, x, message, &headers, ctx, obs) {
            ctx.outcome.faults.push(FaultReport {
                exchange: x.name.clone(),
                plugin: plugin.to_owned(),
                fault,
            });
        }
    }
}

/// What a deduplicating exchange made of a message's id.
enum Taken {
    /// It has none: routed.
    NoId,
    /// New: routed, remembered until the time given.
    New(crate::dedup::Key, u64),
    /// Taken within the window already: not routed.
    Duplicate,
    /// Not an id it can take (not a string, too long): not routed.
    Refused,
}

/// Whether a deduplicating exchange routes `m`: it has no id, or one not
/// taken within its window (the message's own `x-cache-ttl` header, else
/// the exchange's). An id it cannot read is not routed.
fn take_id(ids: &parking_lot::Mutex<crate::dedup::Cache>, m: &Message) -> Taken {
    let key = match crate::dedup::key_of(m) {
        Ok(None) => return Taken::NoId,
        Ok(Some(k)) => k,
        Err(why) => {
            tracing::debug!("message not routed: {why}");
            return Taken::Refused;
        }
    };
    let now = crate::message::now_ms();
    let mut c = ids.lock();
    match c.admit(key, now, crate::dedup::ttl_header(m)) {
        Some(expires) => Taken::New(key, expires),
        None => Taken::Duplicate,
    }
}

/// The version of the transform candidate staged on `x`.
fn candidate_transform_version(x: &Exchange) -> Option<Arc<crate::plugin::PluginVersion>> {
    x.candidates
        .load()
        .as_ref()
        .and_then(|c| c.transform.as_ref().map(|(t, _)| t.version().clone()))
}

#[allow(dead_code)]
fn _assert_send_sync() {
    fn check<T: Send + Sync>() {}
    check::<Exchange>();
    check::<Queue>();
    check::<FieldTable>();
}
