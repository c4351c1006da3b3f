//! Dead-lettering as RabbitMQ does it: the copy a queue sends to its
//! dead-letter exchange (routing key, `x-death` history, expiration
//! removed), and the sink a queue hands its dead messages to.

use super::*;

/// A copy of `m` carrying a quorum queue's `x-delivery-count` header: how
/// often it was returned to the queue before this delivery.
pub(crate) fn with_delivery_count(m: &Message, count: u32) -> Message {
    m.with_header("x-delivery-count", AMQPValue::LongLongInt(i64::from(count)))
}

/// A dead-lettered copy of `m`, as RabbitMQ makes it: routed with the
/// queue's `x-dead-letter-routing-key` (or its own key), its `expiration`
/// removed (kept as `original-expiration`), and an `x-death` entry for
/// (queue, reason) added or counted up, newest first, plus the
/// `x-first-death-*` headers on its first death.
fn dead_lettered(queue: &Queue, m: &Message, reason: DeathReason) -> Message {
    use amq_protocol::types::{FieldArray, LongString, ShortString};
    let s = |v: &str| AMQPValue::LongString(LongString::from(v));
    let mut headers = m.properties.headers().clone().unwrap_or_default();
    let mut deaths: Vec<AMQPValue> = match headers.inner().get("x-death") {
        Some(AMQPValue::FieldArray(a)) => a.as_slice().to_vec(),
        _ => Vec::new(),
    };
    let same = |t: &FieldTable| {
        t.inner().get("queue") == Some(&s(&queue.name))
            && t.inner().get("reason") == Some(&s(reason.as_str()))
    };
    let mut count = 1i64;
    if let Some(at) = deaths
        .iter()
        .position(|d| matches!(d, AMQPValue::FieldTable(t) if same(t)))
        && let AMQPValue::FieldTable(t) = deaths.remove(at)
        && let Some(AMQPValue::LongLongInt(n)) = t.inner().get("count")
    {
        count = n + 1;
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut death = FieldTable::default();
    death.insert(ShortString::from("count"), AMQPValue::LongLongInt(count));
    death.insert(ShortString::from("reason"), s(reason.as_str()));
    death.insert(ShortString::from("queue"), s(&queue.name));
    death.insert(ShortString::from("time"), AMQPValue::Timestamp(now));
    death.insert(ShortString::from("exchange"), s(&m.exchange));
    death.insert(
        ShortString::from("routing-keys"),
        AMQPValue::FieldArray(FieldArray::from(vec![s(&m.routing_key)])),
    );
    if let Some(exp) = m.properties.expiration() {
        death.insert(ShortString::from("original-expiration"), s(exp.as_str()));
    }
    deaths.insert(0, AMQPValue::FieldTable(death));
    headers.insert(
        ShortString::from("x-death"),
        AMQPValue::FieldArray(FieldArray::from(deaths)),
    );
    if !headers.inner().contains_key("x-first-death-reason") {
        headers.insert(
            ShortString::from("x-first-death-reason"),
            s(reason.as_str()),
        );
        headers.insert(ShortString::from("x-first-death-queue"), s(&queue.name));
        headers.insert(ShortString::from("x-first-death-exchange"), s(&m.exchange));
    }
    let mut props = m.properties.clone().with_headers(headers);
    if props.expiration().is_some() {
        // Rebuild without the expiration: a dead letter does not expire again.
        let mut p = amq_protocol::protocol::BasicProperties::default();
        if let Some(v) = props.content_type() {
            p = p.with_content_type(v.clone());
        }
        if let Some(v) = props.content_encoding() {
            p = p.with_content_encoding(v.clone());
        }
        if let Some(v) = props.headers() {
            p = p.with_headers(v.clone());
        }
        if let Some(v) = props.delivery_mode() {
            p = p.with_delivery_mode(*v);
        }
        if let Some(v) = props.priority() {
            p = p.with_priority(*v);
        }
        if let Some(v) = props.correlation_id() {
            p = p.with_correlation_id(v.clone());
        }
        if let Some(v) = props.reply_to() {
            p = p.with_reply_to(v.clone());
        }
        if let Some(v) = props.message_id() {
            p = p.with_message_id(v.clone());
        }
        if let Some(v) = props.timestamp() {
            p = p.with_timestamp(*v);
        }
        if let Some(v) = props.kind() {
            p = p.with_type(v.clone());
        }
        if let Some(v) = props.user_id() {
            p = p.with_user_id(v.clone());
        }
        if let Some(v) = props.app_id() {
            p = p.with_app_id(v.clone());
        }
        if let Some(v) = props.cluster_id() {
            p = p.with_cluster_id(v.clone());
        }
        props = p;
    }
    let limits = queue.limits();
    let key = limits
        .dead_letter_routing_key
        .clone()
        .unwrap_or_else(|| m.routing_key.clone());
    let exchange = limits.dead_letter_exchange.clone().unwrap_or_default();
    Message::new(exchange, key, props, m.body.clone())
}

impl Broker {
    /// The sink of a queue with a dead-letter exchange: republish each dead
    /// message there, with RabbitMQ's `x-death` bookkeeping. Holds the
    /// broker weakly (queues live inside it).
    pub(crate) fn dead_letter_sink(&self, vhost: &str) -> DeadLetterSink {
        let broker = self.self_ref.clone();
        let vhost = vhost.to_owned();
        Arc::new(move |queue: &Queue, dead: Vec<(Entry, DeathReason)>| {
            let limits = queue.limits();
            let (Some(broker), Some(dlx)) =
                (broker.upgrade(), limits.dead_letter_exchange.as_deref())
            else {
                return;
            };
            let Some(v) = broker.vhost(&vhost) else {
                return;
            };
            for (entry, reason) in dead {
                let original = match queue.message(&entry) {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::error!(queue = %crate::untrusted::text(&queue.name), "reading a dead letter back failed: {e}");
                        continue;
                    }
                };
                let message = dead_lettered(queue, &original, reason);
                match broker.publish(&v, dlx, message) {
                    Ok(out) if out.delivered > 0 => broker.forward_unconfirmed(&v, out.forwards),
                    Ok(_) => {
                        tracing::debug!(queue = %crate::untrusted::text(&queue.name), dlx, "dead letter routed nowhere; dropped")
                    }
                    Err(e) => {
                        tracing::warn!(queue = %crate::untrusted::text(&queue.name), "dead-lettering failed: {e}")
                    }
                }
            }
        })
    }
}
