//! Pub/sub: a channel is a routing key of the listener's topic exchange.
//!
//! `PUBLISH` publishes there (not persistent, as Redis pub/sub is not) and
//! answers how many queues it reached. Each `SUBSCRIBE` channel or
//! `PSUBSCRIBE` pattern of a client is a private queue of its own (so a
//! message that matches two of them is received twice, with each name, as
//! in Redis), bound to the exchange and consumed without acks. A channel
//! whose name a topic key would read as wildcards (`*` or `#` words), and
//! every pattern, is matched by the `redis-channel` binding filter, with
//! Redis's meaning. AMQP publishers reach Redis subscribers and AMQP
//! queues bound to the exchange hear Redis publishers.
//!
//! A subscriber that stops reading does not hold the broker's memory: its
//! queue keeps at most [`SUBSCRIBER_BACKLOG`] bytes and drops the oldest
//! past that (Redis closes such a client instead).

use std::sync::Arc;
use std::sync::atomic::AtomicU32;

use amq_protocol::types::{AMQPValue, FieldTable, LongString};
use bytes::Bytes;

use super::connection::{Conn, Spec, Then, bump};
use crate::access::Access;
use crate::broker::{ChannelCredit, Consumer, Destination, Entry, Queue, QueueDecl};
use crate::message::Message;

#[path = "../../../plugins/redis-channel/src/glob.rs"]
#[allow(dead_code)]
mod glob;

/// Tags of subscription consumers.
pub(super) const TAG: &str = "resp-sub-";

/// Most bytes a subscription's queue holds for a slow subscriber.
pub const SUBSCRIBER_BACKLOG: i64 = 32 << 20;

pub(super) const SPECS: &[Spec] = &[
    Spec::new(
        "publish",
        3,
        &["pubsub", "loading", "stale", "fast"],
        (0, 0, 0),
        publish,
    ),
    Spec::new(
        "subscribe",
        -2,
        &["pubsub", "noscript", "loading", "stale"],
        (0, 0, 0),
        subscribe,
    ),
    Spec::new(
        "unsubscribe",
        -1,
        &["pubsub", "noscript", "loading", "stale"],
        (0, 0, 0),
        unsubscribe,
    ),
    Spec::new(
        "psubscribe",
        -2,
        &["pubsub", "noscript", "loading", "stale"],
        (0, 0, 0),
        psubscribe,
    ),
    Spec::new(
        "punsubscribe",
        -1,
        &["pubsub", "noscript", "loading", "stale"],
        (0, 0, 0),
        punsubscribe,
    ),
    Spec::new(
        "pubsub",
        -2,
        &["pubsub", "loading", "stale"],
        (0, 0, 0),
        pubsub,
    ),
];

/// What RESP2 lets a subscribed client run.
pub(super) fn allowed_when_subscribed(name: &[u8]) -> bool {
    matches!(
        name,
        b"SUBSCRIBE"
            | b"UNSUBSCRIBE"
            | b"PSUBSCRIBE"
            | b"PUNSUBSCRIBE"
            | b"PING"
            | b"QUIT"
            | b"RESET"
    )
}

/// One subscription: a channel or a pattern, and its queue.
struct Sub {
    pattern: bool,
    name: Bytes,
    queue: Arc<Queue>,
    consumer: Arc<Consumer>,
}

/// A connection's subscriptions.
#[derive(Default)]
pub(crate) struct Subscriptions {
    subs: Vec<Sub>,
    made: u64,
}

impl Subscriptions {
    /// Whether the client is in subscribed mode.
    pub(super) fn active(&self) -> bool {
        !self.subs.is_empty()
    }
}

fn publish(c: &mut Conn, args: &[Bytes]) -> Then {
    let exchange = c.shared.settings.exchange.clone();
    let channel = match routing_key(&args[0]) {
        Ok(k) => k.to_owned(),
        Err(e) => {
            c.out.error(e);
            return Then::Done;
        }
    };
    if !c.allowed(Access::Write, "exchange", &exchange) {
        return Then::Done;
    }
    let message = Message::new(
        exchange.clone(),
        channel,
        amq_protocol::protocol::BasicProperties::default(),
        args[1].clone(),
    );
    let vhost = c.vhost();
    c.published = true;
    match c.broker.publish(&vhost, &exchange, message) {
        Ok(outcome) => {
            // Copies for queues of other nodes (subscribers there, or AMQP
            // queues bound there) go with no confirm, as Redis's PUBLISH
            // is at most once.
            let origin = c.origin();
            for f in &outcome.forwards {
                c.to_nodes.push(super::remote::ToNode {
                    node: f.node.clone(),
                    frame: crate::nodes::remote::forward_frame(&vhost, origin, 0, f),
                    undo: super::remote::Undo::Nothing,
                });
            }
            c.out.int(outcome.delivered as i64)
        }
        Err(e) => c.out.error(&format!("ERR wasmq: {e}")),
    }
    Then::Done
}

/// A channel or pattern as a routing key or binding argument: UTF-8 of at
/// most 255 bytes.
fn routing_key(name: &[u8]) -> Result<&str, &'static str> {
    std::str::from_utf8(name)
        .ok()
        .filter(|n| n.len() <= 255)
        .ok_or("ERR wasmq: a channel or pattern is a routing key: UTF-8, at most 255 bytes")
}

fn subscribe(c: &mut Conn, args: &[Bytes]) -> Then {
    for name in args {
        c.subscribe_one(false, name);
    }
    Then::Done
}

fn psubscribe(c: &mut Conn, args: &[Bytes]) -> Then {
    for name in args {
        c.subscribe_one(true, name);
    }
    Then::Done
}

fn unsubscribe(c: &mut Conn, args: &[Bytes]) -> Then {
    c.unsubscribe_some(false, args);
    Then::Done
}

fn punsubscribe(c: &mut Conn, args: &[Bytes]) -> Then {
    c.unsubscribe_some(true, args);
    Then::Done
}

fn pubsub(c: &mut Conn, args: &[Bytes]) -> Then {
    let sub = args[0].to_ascii_uppercase();
    let counts = c.shared.subscriptions.lock();
    match (&sub[..], args.len()) {
        (b"CHANNELS", 1 | 2) => {
            let mut names: Vec<Vec<u8>> = counts
                .channels
                .keys()
                .filter(|ch| args.get(1).is_none_or(|p| glob::glob(p, ch)))
                .cloned()
                .collect();
            names.sort();
            drop(counts);
            c.out.bulks(names.iter().map(|n| &n[..]));
        }
        (b"NUMSUB", _) => {
            let found: Vec<usize> = args[1..]
                .iter()
                .map(|ch| counts.channels.get(&ch[..]).copied().unwrap_or(0))
                .collect();
            drop(counts);
            c.out.map(found.len());
            for (ch, n) in args[1..].iter().zip(found) {
                c.out.bulk(ch);
                c.out.int(n as i64);
            }
        }
        (b"NUMPAT", 1) => {
            let n = counts.patterns.values().sum::<usize>();
            drop(counts);
            c.out.int(n as i64);
        }
        _ => {
            drop(counts);
            c.out.error(&format!(
                "ERR unknown subcommand or wrong number of arguments for '{}'. Try PUBSUB HELP.",
                crate::untrusted::text(&String::from_utf8_lossy(&args[0]))
            ));
        }
    }
    Then::Done
}

impl Conn {
    /// Subscribe to one channel or pattern (again: nothing changes) and
    /// confirm it with the count of subscriptions.
    fn subscribe_one(&mut self, pattern: bool, name: &Bytes) {
        let kind: &[u8] = if pattern { b"psubscribe" } else { b"subscribe" };
        let known = self
            .subs
            .subs
            .iter()
            .any(|s| s.pattern == pattern && s.name == name);
        if !known && let Err(e) = self.add_subscription(pattern, name) {
            self.out.error(&e);
            return;
        }
        let n = self.subs.subs.len();
        self.out.push(3);
        self.out.bulk(kind);
        self.out.bulk(name);
        self.out.int(n as i64);
    }

    fn add_subscription(&mut self, pattern: bool, name: &Bytes) -> Result<(), String> {
        let exchange = self.shared.settings.exchange.clone();
        let text = routing_key(name)?.to_owned();
        if let Some(refused) = self.refusal(Access::Read, "exchange", &exchange) {
            return Err(refused);
        }
        let vhost = self.vhost();
        let x = vhost
            .exchange(&exchange)
            .map_err(|e| format!("ERR wasmq: {e} ([redis] exchange)"))?;
        self.subs.made += 1;
        // Unique across a cluster's nodes too: every node knows it by name.
        let queue_name = crate::broker::server_name("amq.gen-resp");
        let mut arguments = FieldTable::default();
        arguments.insert(
            "x-max-length-bytes".into(),
            AMQPValue::LongLongInt(SUBSCRIBER_BACKLOG),
        );
        let q = self
            .broker
            .declare_queue(
                &vhost,
                QueueDecl {
                    name: queue_name.clone(),
                    durable: false,
                    owner: Some(self.id),
                    auto_delete: false,
                    arguments,
                },
            )
            .map_err(|e| format!("ERR wasmq: {e}"))?;
        // A topic key means the channel itself unless it has wildcard
        // words; anything else is matched by the filter, Redis's way.
        let exact = !pattern
            && matches!(x.kind.as_str(), "topic" | "direct")
            && !text.split('.').any(|w| w == "*" || w == "#");
        // A headers exchange ignores the key and the filter's `x-`
        // arguments: the filter alone decides.
        let (key, binding) = if exact {
            (text.clone(), FieldTable::default())
        } else {
            let mut args = FieldTable::default();
            args.insert(
                crate::broker::ARG_FILTER.into(),
                AMQPValue::LongString(LongString::from("redis-channel")),
            );
            args.insert(
                if pattern {
                    "x-redis-pattern"
                } else {
                    "x-redis-channel"
                }
                .into(),
                AMQPValue::LongString(LongString::from(text.as_str())),
            );
            ("#".to_owned(), args)
        };
        if let Err(e) = self.broker.bind(
            &vhost,
            &exchange,
            Destination::Queue(queue_name.clone()),
            &key,
            binding,
        ) {
            let _ = self.broker.delete_queue(&vhost, &queue_name, false, false);
            return Err(format!("ERR wasmq: {e}"));
        }
        let consumer = Arc::new(Consumer {
            tag: format!("{TAG}{}", self.subs.made),
            channel: 0,
            connection: self.id,
            no_ack: true,
            exclusive: true,
            prefetch: 0,
            unacked: AtomicU32::new(0),
            in_flight: AtomicU32::new(0),
            channel_credit: Arc::new(ChannelCredit::default()),
            sink: self.dispatch_tx.clone(),
            timeout: None,
        });
        if q.add_consumer(consumer.clone()).is_err() {
            let _ = self.broker.delete_queue(&vhost, &queue_name, false, false);
            return Err("ERR wasmq: the subscription's queue refused its consumer".into());
        }
        {
            let mut counts = self.shared.subscriptions.lock();
            let counts = if pattern {
                &mut counts.patterns
            } else {
                &mut counts.channels
            };
            bump(counts, name, true);
        }
        self.subs.subs.push(Sub {
            pattern,
            name: name.clone(),
            queue: q,
            consumer,
        });
        Ok(())
    }

    /// Unsubscribe from these channels or patterns (none named: all of
    /// that kind), confirming each.
    fn unsubscribe_some(&mut self, pattern: bool, names: &[Bytes]) {
        let kind: &[u8] = if pattern {
            b"punsubscribe"
        } else {
            b"unsubscribe"
        };
        let names: Vec<Bytes> = if names.is_empty() {
            self.subs
                .subs
                .iter()
                .filter(|s| s.pattern == pattern)
                .map(|s| s.name.clone())
                .collect()
        } else {
            names.to_vec()
        };
        if names.is_empty() {
            self.out.push(3);
            self.out.bulk(kind);
            self.out.null();
            self.out.int(self.subs.subs.len() as i64);
            return;
        }
        for name in names {
            if let Some(at) = self
                .subs
                .subs
                .iter()
                .position(|s| s.pattern == pattern && s.name == name)
            {
                let sub = self.subs.subs.remove(at);
                self.drop_subscription(sub);
            }
            self.out.push(3);
            self.out.bulk(kind);
            self.out.bulk(&name);
            self.out.int(self.subs.subs.len() as i64);
        }
    }

    /// Drop every subscription (the client left, or `RESET`).
    pub(super) fn unsubscribe_all(&mut self) {
        for sub in std::mem::take(&mut self.subs.subs) {
            self.drop_subscription(sub);
        }
    }

    fn drop_subscription(&mut self, sub: Sub) {
        sub.queue.remove_consumer(self.id, 0, &sub.consumer.tag);
        if let Some(login) = &self.login {
            let _ = self
                .broker
                .delete_queue(&login.vhost, &sub.queue.name, false, false);
        }
        let mut counts = self.shared.subscriptions.lock();
        let counts = if sub.pattern {
            &mut counts.patterns
        } else {
            &mut counts.channels
        };
        bump(counts, &sub.name, false);
    }

    /// A subscription's queue sent a message: `message` (or `pmessage`
    /// with the pattern) to the client.
    pub(super) fn deliver_published(
        &mut self,
        queue: Arc<Queue>,
        consumer: Arc<Consumer>,
        entry: Entry,
    ) {
        let sub = self
            .subs
            .subs
            .iter()
            .find(|s| Arc::ptr_eq(&s.consumer, &consumer));
        if let (Some(sub), Ok(m)) = (sub, queue.message(&entry)) {
            let (pattern, name) = (sub.pattern, sub.name.clone());
            let start = self.out.buf.len();
            if pattern {
                self.out.push(4);
                self.out.bulk(b"pmessage");
                self.out.bulk(&name);
            } else {
                self.out.push(3);
                self.out.bulk(b"message");
            }
            self.out.bulk(m.routing_key.as_bytes());
            self.out.bulk(&m.body);
            self.finish(start, Then::Done);
        }
        if consumer.written() {
            queue.dispatch();
        }
    }
}
