//! Delayed exchanges (`x-delayed-message`, the interface of RabbitMQ's
//! community `rabbitmq_delayed_message_exchange` plugin): a message with
//! an `x-delay` header waits that many milliseconds, then is routed by the
//! exchange's `x-delayed-type` against the bindings of that moment.
//!
//! Where the plugin keeps its delays in one node's Mnesia table, here a
//! delayed exchange's scheduled messages wait in a queue of the broker's
//! own, `amq.delayed.<exchange>`, held in due-time order by the queue's
//! schedule (`queue::schedule`). So a scheduled message is stored as any
//! queued one: a persistent message in a durable exchange's queue is in
//! the queue's log before its publish is confirmed, survives a restart or
//! a kill -9, and is paged out of memory in a large backlog. When it is
//! due, the queue hands it to the sink made here, which routes it and only
//! then settles it in the log.

use super::*;
use crate::broker::queue::DueSink;

/// The delayed exchange a queue's arguments say it schedules for.
pub fn schedules(args: &FieldTable) -> Option<&str> {
    match args.inner().get(ARG_SCHEDULES)? {
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok(),
        AMQPValue::ShortString(s) => Some(s.as_str()),
        _ => None,
    }
}

/// The copy of a scheduled message that is routed when it is due: its
/// `x-delay` negated, as RabbitMQ's plugin marks a message it delayed
/// (consumers check for a negative `x-delay`), which also keeps a message
/// dead-lettered back into a delayed exchange from being held again for
/// the same delay unless something sets a new one (the `backoff` example).
fn delayed_copy(m: &Arc<Message>) -> Arc<Message> {
    use crate::broker::queue::{Delay, delay_of};
    let Ok(Delay::Ms(ms)) = delay_of(m) else {
        return m.clone();
    };
    let mut headers = m.properties.headers().clone().unwrap_or_default();
    headers.insert(
        crate::broker::queue::DELAY_HEADER.into(),
        AMQPValue::LongLongInt(-(ms as i64)),
    );
    let props = m.properties.clone().with_headers(headers);
    Arc::new(Message::new(
        m.exchange.clone(),
        m.routing_key.clone(),
        props,
        m.body.clone(),
    ))
}

impl Broker {
    /// Check a delayed exchange's declaration: an `x-delayed-type` that is
    /// a routing type (not itself delayed), and a name short enough for
    /// its queue's.
    pub(super) fn delayed_of(&self, spec: &ExchangeSpec) -> Result<Delayed, BrokerError> {
        let routing = match spec.arguments.inner().get(ARG_DELAYED_TYPE) {
            Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
            Some(AMQPValue::ShortString(s)) => s.as_str().to_owned(),
            Some(other) => {
                return Err(BrokerError::PreconditionFailed(format!(
                    "Invalid argument, '{ARG_DELAYED_TYPE}' must be an existing exchange type (got {other:?})"
                )));
            }
            None => {
                return Err(BrokerError::PreconditionFailed(format!(
                    "Invalid argument, '{ARG_DELAYED_TYPE}' must be an existing exchange type (it is missing)"
                )));
            }
        };
        if routing == DELAYED_EXCHANGE || routing == DEDUP_EXCHANGE {
            return Err(BrokerError::PreconditionFailed(format!(
                "Invalid argument, '{ARG_DELAYED_TYPE}' must be a routing type, not '{routing}'"
            )));
        }
        let queue = schedule_queue(&spec.name);
        if queue.len() > 255 {
            return Err(BrokerError::PreconditionFailed(format!(
                "delayed exchange name '{}' is too long: its schedule queue '{}' would be over 255 bytes",
                crate::untrusted::text(&spec.name),
                crate::untrusted::text(&queue)
            )));
        }
        Ok(Delayed { routing, queue })
    }

    /// Whether a delayed exchange's queue comes from the cluster's log (a
    /// quorum queue the log declares and deletes with the exchange, see
    /// `cluster::machine`) rather than from the exchange's declaration.
    pub(super) fn schedules_in_cluster(&self) -> bool {
        self.cluster().is_some() || self.replicated.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Declare the queue delayed exchange `x`'s messages wait in (durable
    /// with the exchange); an existing one is kept with what it holds.
    pub(super) fn declare_schedule(&self, vhost: &VHost, x: &Exchange) -> Result<(), BrokerError> {
        let Some(d) = &x.delayed else {
            return Ok(());
        };
        if self.schedules_in_cluster() {
            return Ok(());
        }
        let mut arguments = FieldTable::default();
        arguments.insert(
            ARG_SCHEDULES.into(),
            AMQPValue::LongString(x.name.as_str().into()),
        );
        self.declare_queue(
            vhost,
            QueueDecl {
                name: d.queue.clone(),
                durable: x.durable,
                owner: None,
                auto_delete: false,
                arguments,
            },
        )?;
        Ok(())
    }

    /// The sink of delayed exchange `exchange`'s queue: route each due
    /// message through the exchange's bindings of now. Holds the broker
    /// weakly (queues live inside it).
    pub(crate) fn due_sink(&self, vhost: &str, exchange: &str) -> DueSink {
        let broker = self.self_ref.clone();
        let (vhost, exchange) = (vhost.to_owned(), exchange.to_owned());
        Arc::new(move |queue: &Arc<Queue>, due: &[Entry]| {
            let Some(broker) = broker.upgrade() else {
                return false;
            };
            let Some(v) = broker.vhost(&vhost) else {
                return false;
            };
            let Ok(x) = v.exchange(&exchange) else {
                return false;
            };
            for entry in due {
                let message = match queue.message(entry) {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::error!(exchange = %crate::untrusted::text(&exchange), "reading a scheduled message back failed; skipped: {e}");
                        continue;
                    }
                };
                let out = broker.publish_due(&v, &x, delayed_copy(&message));
                if !out.forwards.is_empty() {
                    broker.forward_unconfirmed(&v, out.forwards);
                }
            }
            true
        })
    }
}
