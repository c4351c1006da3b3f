//! Queue arguments: what a client's `x-` arguments on `queue.declare` ask
//! of a queue, read once at declare time into [`QueueLimits`] so the
//! message path never looks at a field table. An invalid argument is the
//! declaring client's error (406), and the message names the argument, as
//! RabbitMQ's does.

use std::time::Duration;

use amq_protocol::types::{AMQPValue, FieldTable};

use super::ready::MAX_PRIORITY;
use crate::broker::string_arg;
use crate::message::Message;

/// What to do when a length limit is reached (`x-overflow`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Overflow {
    /// Drop (dead-letter) the oldest messages to make room.
    #[default]
    DropHead,
    /// Refuse the new message (a nack for confirming publishers).
    RejectPublish,
    /// Refuse the new message and dead-letter it.
    RejectPublishDlx,
}

/// The queue arguments wasmq acts on.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct QueueLimits {
    /// `x-message-ttl`.
    pub message_ttl: Option<Duration>,
    /// `x-dead-letter-exchange`.
    pub dead_letter_exchange: Option<String>,
    /// `x-dead-letter-routing-key`.
    pub dead_letter_routing_key: Option<String>,
    /// `x-max-length`.
    pub max_length: Option<usize>,
    /// `x-max-length-bytes` (bodies).
    pub max_length_bytes: Option<usize>,
    /// `x-overflow`.
    pub overflow: Overflow,
    /// `x-expires`: delete the queue after it has been unused this long (no
    /// consumers, no `basic.get`, no redeclaration).
    pub expires: Option<Duration>,
    /// `x-max-priority`: the highest message priority the queue orders by
    /// (0: a plain FIFO queue).
    pub max_priority: u8,
    /// `x-queue-type = quorum`: replicated through a Raft group of its own.
    pub quorum: bool,
    /// `x-queue-type = stream`: a replayable log (`broker::stream`).
    pub stream: bool,
    /// A stream's `x-max-age` (its own, or a policy's `max-age`).
    pub max_age: Option<Duration>,
    /// `x-delivery-limit`: a message returned more often than this is
    /// dead-lettered (reason `delivery_limit`) or dropped. Quorum queues
    /// count returns in their log, classic queues in the entry and (for
    /// persistent messages) the queue's ack file.
    pub delivery_limit: Option<u32>,
    /// `x-quorum-initial-group-size`: how many nodes hold a replica.
    pub initial_group_size: Option<usize>,
    /// `x-queue-leader-locator = client-local`: a quorum queue's first
    /// leader is the node the client declared it on (a member then, as in
    /// RabbitMQ), not the node leading the fewest (`balanced`, the
    /// default).
    pub client_local: bool,
    /// `x-single-active-consumer`: only the oldest consumer gets
    /// deliveries; the next takes over when it goes.
    pub single_active: bool,
    /// `x-consumer-timeout`: a delivery from this queue not acknowledged
    /// within this long closes its channel (406) and is requeued. Without
    /// it, `[amqp] consumer_timeout_ms` holds.
    pub consumer_timeout: Option<Duration>,
    /// `x-message-group-header`: the header naming a message's group;
    /// while a message of a group is out (delivered, not settled), no
    /// other message of that group is delivered.
    pub group_header: Option<String>,
    /// `x-message-deduplication` (with `x-cache-ttl`, `x-cache-size`): a
    /// message whose `x-deduplication-header` was taken within the window
    /// is confirmed and not enqueued.
    pub dedup: Option<crate::dedup::Settings>,
    /// `x-delivery-delay` (SQS's queue-level `DelaySeconds`): every message
    /// entering the queue waits this long before it can be delivered.
    pub delivery_delay: Option<Duration>,
}

/// An integer argument of any of AMQP's integer types.
pub fn integer(v: &AMQPValue) -> Option<i64> {
    Some(match v {
        AMQPValue::ShortShortInt(n) => i64::from(*n),
        AMQPValue::ShortShortUInt(n) => i64::from(*n),
        AMQPValue::ShortInt(n) => i64::from(*n),
        AMQPValue::ShortUInt(n) => i64::from(*n),
        AMQPValue::LongInt(n) => i64::from(*n),
        AMQPValue::LongUInt(n) => i64::from(*n),
        AMQPValue::LongLongInt(n) => *n,
        _ => return None,
    })
}

fn int_arg(args: &FieldTable, key: &str) -> Result<Option<u64>, String> {
    let Some(v) = args.inner().get(key) else {
        return Ok(None);
    };
    let Some(n) = integer(v) else {
        return Err(format!(
            "invalid arg '{key}': expected a non-negative integer, got {v:?}"
        ));
    };
    u64::try_from(n)
        .map(Some)
        .map_err(|_| format!("invalid arg '{key}': {n} is negative"))
}

impl QueueLimits {
    /// Read the queue arguments; an invalid one is the declaring client's
    /// error (406), named in the message.
    pub fn parse(args: &FieldTable) -> Result<Self, String> {
        let overflow = match string_arg(args, "x-overflow")?.as_deref() {
            None | Some("drop-head") => Overflow::DropHead,
            Some("reject-publish") => Overflow::RejectPublish,
            Some("reject-publish-dlx") => Overflow::RejectPublishDlx,
            Some(other) => {
                return Err(format!(
                    "invalid arg 'x-overflow': '{other}' (expected drop-head, reject-publish or reject-publish-dlx)"
                ));
            }
        };
        // RabbitMQ's queue types.
        let (quorum, stream) = match string_arg(args, "x-queue-type")?.as_deref() {
            None | Some("classic") => (false, false),
            Some("quorum") => (true, false),
            Some("stream") => (false, true),
            Some(other) => {
                return Err(format!(
                    "invalid arg 'x-queue-type': '{other}' (expected classic, quorum or stream)"
                ));
            }
        };
        // A stream's own arguments (`broker::stream`); the rest of the
        // queue's are refused there as RabbitMQ refuses them.
        let max_age = match stream {
            true => crate::broker::stream::StreamArgs::parse(args)?
                .max_age_ms
                .map(Duration::from_millis),
            false => None,
        };
        let mut limits = QueueLimits {
            message_ttl: int_arg(args, "x-message-ttl")?.map(Duration::from_millis),
            dead_letter_exchange: string_arg(args, "x-dead-letter-exchange")?,
            dead_letter_routing_key: string_arg(args, "x-dead-letter-routing-key")?,
            max_length: int_arg(args, "x-max-length")?.map(|n| n as usize),
            max_length_bytes: int_arg(args, "x-max-length-bytes")?.map(|n| n as usize),
            overflow,
            expires: int_arg(args, "x-expires")?.map(Duration::from_millis),
            max_priority: 0,
            quorum,
            stream,
            max_age,
            delivery_limit: int_arg(args, "x-delivery-limit")?
                .map(|n| u32::try_from(n).unwrap_or(u32::MAX)),
            // A stream's replica count is RabbitMQ's `x-initial-cluster-size`.
            initial_group_size: int_arg(
                args,
                match stream {
                    true => "x-initial-cluster-size",
                    false => "x-quorum-initial-group-size",
                },
            )?
            .map(|n| n as usize),
            client_local: match string_arg(args, "x-queue-leader-locator")?.as_deref() {
                None | Some("balanced") => false,
                Some("client-local") => true,
                Some(other) => {
                    return Err(format!(
                        "invalid arg 'x-queue-leader-locator': '{other}' (expected client-local or balanced)"
                    ));
                }
            },
            consumer_timeout: int_arg(args, "x-consumer-timeout")?.map(Duration::from_millis),
            group_header: string_arg(args, "x-message-group-header")?,
            dedup: crate::dedup::Settings::of_queue(args)?,
            delivery_delay: int_arg(args, "x-delivery-delay")?.map(Duration::from_millis),
            single_active: match args.inner().get("x-single-active-consumer") {
                None => false,
                Some(AMQPValue::Boolean(b)) => *b,
                Some(other) => {
                    return Err(format!(
                        "invalid arg 'x-single-active-consumer': expected a boolean, got {other:?}"
                    ));
                }
            },
        };
        if quorum {
            // What RabbitMQ's quorum queues refuse, refused the same way.
            for arg in ["x-max-priority", "x-queue-mode", "x-queue-master-locator"] {
                if args.inner().contains_key(arg) {
                    return Err(format!(
                        "invalid arg '{arg}': not supported by quorum queues"
                    ));
                }
            }
            if overflow == Overflow::RejectPublishDlx {
                return Err("invalid arg 'x-overflow': 'reject-publish-dlx' is not supported by quorum queues (drop-head or reject-publish)".into());
            }
            if limits.initial_group_size == Some(0) {
                return Err("invalid arg 'x-quorum-initial-group-size': must be positive".into());
            }
        } else if stream {
            if limits.initial_group_size == Some(0) {
                return Err("invalid arg 'x-initial-cluster-size': must be positive".into());
            }
        } else {
            for arg in ["x-quorum-initial-group-size"] {
                if args.inner().contains_key(arg) {
                    return Err(format!(
                        "invalid arg '{arg}': only quorum queues (x-queue-type = quorum) take it"
                    ));
                }
            }
        }
        if limits.expires == Some(Duration::ZERO) {
            return Err("invalid arg 'x-expires': must be positive".into());
        }
        if let Some(h) = &limits.group_header {
            if h.is_empty() || h.len() > 255 {
                return Err(
                    "invalid arg 'x-message-group-header': a header name of 1 to 255 bytes".into(),
                );
            }
            if args.inner().contains_key("x-max-priority") {
                return Err("invalid arg 'x-message-group-header': a queue with message groups cannot also have x-max-priority (a group's order is its publish order)".into());
            }
        }
        if let Some(d) = limits.delivery_delay
            && d.as_millis() as u64 > super::MAX_DELAY_MS
        {
            return Err(format!(
                "invalid arg 'x-delivery-delay': {} ms is past the maximum of {} ms",
                d.as_millis(),
                super::MAX_DELAY_MS
            ));
        }
        if limits.consumer_timeout == Some(Duration::ZERO) {
            return Err("invalid arg 'x-consumer-timeout': must be positive".into());
        }
        if let Some(n) = int_arg(args, "x-max-priority")? {
            limits.max_priority = u8::try_from(n).map_err(|_| {
                format!("invalid arg 'x-max-priority': {n} is above the maximum of {MAX_PRIORITY}")
            })?;
        }
        if limits.dead_letter_routing_key.is_some() && limits.dead_letter_exchange.is_none() {
            return Err(
                "x-dead-letter-routing-key defined but x-dead-letter-exchange is not".into(),
            );
        }
        Ok(limits)
    }
}

/// A message's own TTL (`expiration`, milliseconds as text).
pub fn message_ttl(m: &Message) -> Result<Option<Duration>, String> {
    match m.properties.expiration() {
        None => Ok(None),
        Some(s) => s
            .as_str()
            .parse::<u64>()
            .map(|ms| Some(Duration::from_millis(ms)))
            .map_err(|_| format!("invalid expiration '{}': expected milliseconds", s.as_str())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_arguments_are_validated() {
        let mut args = FieldTable::default();
        args.insert("x-message-ttl".into(), AMQPValue::LongString("soon".into()));
        assert!(
            QueueLimits::parse(&args)
                .unwrap_err()
                .contains("x-message-ttl")
        );
        let mut args = FieldTable::default();
        args.insert("x-overflow".into(), AMQPValue::LongString("explode".into()));
        assert!(
            QueueLimits::parse(&args)
                .unwrap_err()
                .contains("x-overflow")
        );
        let mut args = FieldTable::default();
        args.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString("k".into()),
        );
        assert!(QueueLimits::parse(&args).is_err());
        let mut args = FieldTable::default();
        args.insert("x-max-length".into(), AMQPValue::LongInt(10));
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString("dlx".into()),
        );
        let l = QueueLimits::parse(&args).unwrap();
        assert_eq!(
            (l.max_length, l.dead_letter_exchange.as_deref()),
            (Some(10), Some("dlx"))
        );
    }

    #[test]
    fn integers_of_any_width_are_read_and_negatives_refused() {
        let mut args = FieldTable::default();
        args.insert("x-max-length".into(), AMQPValue::ShortShortUInt(7));
        args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(1500));
        args.insert("x-max-priority".into(), AMQPValue::ShortInt(9));
        let l = QueueLimits::parse(&args).unwrap();
        assert_eq!(l.max_length, Some(7));
        assert_eq!(l.message_ttl, Some(Duration::from_millis(1500)));
        assert_eq!(l.max_priority, 9);

        let mut args = FieldTable::default();
        args.insert("x-max-length".into(), AMQPValue::LongInt(-1));
        assert!(QueueLimits::parse(&args).unwrap_err().contains("negative"));
        let mut args = FieldTable::default();
        args.insert("x-max-priority".into(), AMQPValue::LongInt(256));
        assert!(
            QueueLimits::parse(&args)
                .unwrap_err()
                .contains("x-max-priority")
        );
        let mut args = FieldTable::default();
        args.insert("x-expires".into(), AMQPValue::LongInt(0));
        assert!(QueueLimits::parse(&args).unwrap_err().contains("x-expires"));
    }

    #[test]
    fn unknown_queue_types_are_refused_by_name() {
        for kind in ["lazy", "Stream"] {
            let mut args = FieldTable::default();
            args.insert("x-queue-type".into(), AMQPValue::LongString(kind.into()));
            assert!(QueueLimits::parse(&args).unwrap_err().contains(kind));
        }
    }

    #[test]
    fn quorum_queues_take_their_arguments_and_refuse_what_rabbitmq_refuses() {
        let quorum = |extra: &[(&str, AMQPValue)]| {
            let mut args = FieldTable::default();
            args.insert(
                "x-queue-type".into(),
                AMQPValue::LongString("quorum".into()),
            );
            for (k, v) in extra {
                args.insert((*k).into(), v.clone());
            }
            QueueLimits::parse(&args)
        };
        let l = quorum(&[
            ("x-delivery-limit", AMQPValue::LongInt(3)),
            ("x-quorum-initial-group-size", AMQPValue::LongInt(5)),
        ])
        .unwrap();
        assert!(l.quorum);
        assert_eq!(l.delivery_limit, Some(3));
        assert_eq!(l.initial_group_size, Some(5));
        assert!(!l.client_local);
        let locator =
            |v: &str| quorum(&[("x-queue-leader-locator", AMQPValue::LongString(v.into()))]);
        assert!(locator("client-local").unwrap().client_local);
        assert!(!locator("balanced").unwrap().client_local);
        for (arg, value) in [
            (
                "x-queue-leader-locator",
                AMQPValue::LongString("min-masters".into()),
            ),
            ("x-max-priority", AMQPValue::LongInt(5)),
            (
                "x-overflow",
                AMQPValue::LongString("reject-publish-dlx".into()),
            ),
            ("x-quorum-initial-group-size", AMQPValue::LongInt(0)),
        ] {
            let e = quorum(&[(arg, value)]).unwrap_err();
            assert!(e.contains(arg), "{e}");
        }
        // A classic queue takes a delivery limit, not a group size.
        let mut args = FieldTable::default();
        args.insert("x-delivery-limit".into(), AMQPValue::LongInt(3));
        assert_eq!(QueueLimits::parse(&args).unwrap().delivery_limit, Some(3));
        args.insert("x-quorum-initial-group-size".into(), AMQPValue::LongInt(3));
        assert!(
            QueueLimits::parse(&args)
                .unwrap_err()
                .contains("x-quorum-initial-group-size")
        );
    }
}
