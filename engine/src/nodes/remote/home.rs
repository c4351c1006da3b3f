//! The queue's node: one session per link, serving the peer's forwarded
//! publishes and its clients' consumers of queues that live here.
//!
//! The session is a task, so a link's frames are handled in the order
//! they came, and its state (consumers, what is out for delivery, confirms
//! waiting for the disk) needs no lock. It ends when the link closes: its
//! consumers are removed and what they had not settled goes back to its
//! queues, in order, marked redelivered, exactly as when a local client's
//! connection drops.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use tokio::sync::{mpsc, watch};

use crate::broker::ConsumeError;
use crate::broker::{Broker, ChannelCredit, Consumer, Dispatch, Entry, Queue, group_by_queue};
use crate::cluster::link::Link;
use crate::message::{Message, decode_properties};
use crate::nodes::traffic::{Origin, QueueAnswer, Settlement, Traffic};
use crate::store::Synced;

/// Consumers made for other nodes get connection ids from the top of the
/// range, which local connections never reach.
static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1 << 62);

struct RemoteConsumer {
    origin: Origin,
    vhost: String,
    queue: Arc<Queue>,
    consumer: Arc<Consumer>,
}

/// What a session is handed, in the order its link carried it.
pub(super) enum Event {
    /// A frame for the session to handle.
    Frame(Traffic),
    /// A forwarded message the link's reader enqueued itself (one task hop
    /// less on the message's way): its confirm waits for the store here.
    Enqueued {
        /// The publishing channel.
        origin: Origin,
        /// Its confirm tag.
        seq: u64,
        /// The store ticket to wait for.
        ticket: u64,
        /// Every queue took it.
        ok: bool,
    },
}

/// A message out for delivery: its queue, the consumer it went to (none
/// for `basic.get`), and its entry.
type OutForDelivery = (Arc<Queue>, Option<Arc<Consumer>>, Entry);

pub(super) struct Session {
    broker: Weak<Broker>,
    link: Arc<Link>,
    /// By the connection id each was given here.
    consumers: HashMap<u64, RemoteConsumer>,
    by_origin: HashMap<(Origin, String), u64>,
    dispatch_tx: mpsc::UnboundedSender<Dispatch>,
    /// Out for delivery (to a consumer, or by `basic.get`), by the id the
    /// peer settles with.
    unacked: BTreeMap<u64, OutForDelivery>,
    next_id: u64,
    /// Forwarded publishes waiting for the store's sync: (origin, confirm
    /// tag, store ticket, every queue took it).
    confirms: VecDeque<(Origin, u64, u64, bool)>,
    synced: Option<watch::Receiver<Synced>>,
}

impl Session {
    /// Start the session for `link`; its frames go to the returned sender.
    pub(super) fn spawn(broker: Weak<Broker>, link: Arc<Link>) -> mpsc::UnboundedSender<Event> {
        let (tx, rx) = mpsc::unbounded_channel();
        let (dispatch_tx, dispatch_rx) = mpsc::unbounded_channel();
        let synced = broker.upgrade().and_then(|b| b.store().map(|s| s.synced()));
        let session = Session {
            broker,
            link,
            consumers: HashMap::new(),
            by_origin: HashMap::new(),
            dispatch_tx,
            unacked: BTreeMap::new(),
            next_id: 1,
            confirms: VecDeque::new(),
            synced,
        };
        tokio::spawn(session.run(rx, dispatch_rx));
        tx
    }

    async fn run(
        mut self,
        mut frames: mpsc::UnboundedReceiver<Event>,
        mut dispatch: mpsc::UnboundedReceiver<Dispatch>,
    ) {
        loop {
            let waiting = !self.confirms.is_empty() && self.synced.is_some();
            tokio::select! {
                f = frames.recv() => match f {
                    Some(Event::Frame(t)) => self.frame(t),
                    Some(Event::Enqueued { origin, seq, ticket, ok }) => {
                        self.confirms.push_back((origin, seq, ticket, ok));
                    }
                    None => break,
                },
                Some(d) = dispatch.recv() => {
                    if self.link.congested() {
                        self.link.drained().await;
                    }
                    self.dispatch(d);
                }
                r = async { self.synced.as_mut().expect("guarded").changed().await }, if waiting => {
                    if r.is_err() {
                        self.synced = None;
                    }
                }
            }
            self.release_confirms();
        }
        self.end(dispatch);
    }

    fn frame(&mut self, t: Traffic) {
        let Some(broker) = self.broker.upgrade() else {
            return;
        };
        match t {
            Traffic::Consume {
                origin,
                tag,
                vhost,
                queue,
                prefetch,
                no_ack,
                exclusive,
                arguments,
            } => {
                if let Err((code, text)) = self.consume(
                    &broker, origin, &tag, &vhost, &queue, prefetch, no_ack, exclusive, &arguments,
                ) {
                    tracing::debug!(peer = %self.link.peer, tag = %crate::untrusted::text(&tag), code, "another node's consumer refused: {text}");
                    self.link.send_traffic(
                        Traffic::Refused {
                            origin,
                            tag,
                            code,
                            text,
                        }
                        .encode(),
                    );
                }
            }
            Traffic::Cancel { origin, tag } => {
                if let Some(id) = self.by_origin.remove(&(origin, tag))
                    && let Some(c) = self.consumers.remove(&id)
                {
                    self.remove(&broker, c);
                }
            }
            Traffic::Settle { how, ids } => self.settle(how, &ids),
            Traffic::Get {
                origin,
                vhost,
                queue,
                no_ack,
            } => {
                let outcome = self.get(&broker, &vhost, &queue, no_ack);
                self.link
                    .send_traffic(Traffic::Answer { origin, outcome }.encode());
            }
            Traffic::Purge {
                origin,
                vhost,
                queue,
            } => {
                let outcome = match shared_queue(&broker, &vhost, &queue) {
                    Ok(q) => QueueAnswer::Purged {
                        message_count: q.purge() as u32,
                    },
                    Err(refused) => refused,
                };
                self.link
                    .send_traffic(Traffic::Answer { origin, outcome }.encode());
            }
            Traffic::Peek {
                origin,
                vhost,
                queue,
                start,
                stop,
            } => {
                let outcome = match shared_queue(&broker, &vhost, &queue) {
                    Ok(q) => {
                        let (length, bodies) = q.peek_range(start, stop, MAX_PEEK);
                        let bytes: usize = bodies.iter().map(|b| b.len()).sum();
                        if bytes > MAX_PEEK_BYTES {
                            QueueAnswer::Error {
                                code: 406,
                                text: format!(
                                    "PRECONDITION_FAILED - a peek returns at most {} MiB of messages (these are {} MiB); ask for a smaller range",
                                    MAX_PEEK_BYTES >> 20,
                                    bytes >> 20
                                ),
                            }
                        } else {
                            QueueAnswer::Peeked {
                                length: length as u32,
                                bodies,
                            }
                        }
                    }
                    Err(refused) => refused,
                };
                self.link
                    .send_traffic(Traffic::Answer { origin, outcome }.encode());
            }
            // Forwards are enqueued by the link's reader; answers go to
            // connections.
            Traffic::Forward { .. }
            | Traffic::Forwarded { .. }
            | Traffic::Refused { .. }
            | Traffic::Deliver { .. }
            | Traffic::Answer { .. } => {}
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn consume(
        &mut self,
        broker: &Broker,
        origin: Origin,
        tag: &str,
        vhost: &str,
        queue: &str,
        prefetch: u32,
        no_ack: bool,
        exclusive: bool,
        arguments: &[u8],
    ) -> Result<(), (u16, String)> {
        let v = broker
            .vhost(vhost)
            .ok_or_else(|| (404, format!("NOT_FOUND - no vhost '{vhost}'")))?;
        // A replicated stream is read from this node's replica, whichever
        // node leads it.
        let q = match v.stream_replica(queue) {
            Some(q) => q,
            None => v
                .queue(queue)
                .map_err(|e| (e.reply_code(), e.to_string()))?,
        };
        if q.owner.is_some() {
            return Err((405, locked(queue, vhost)));
        }
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let consumer = Arc::new(Consumer {
            tag: tag.to_owned(),
            channel: origin.channel,
            connection: id,
            no_ack,
            exclusive,
            prefetch,
            unacked: Default::default(),
            in_flight: Default::default(),
            channel_credit: Arc::new(ChannelCredit::default()),
            sink: self.dispatch_tx.clone(),
            // Enforced by the consuming node, which holds the deliveries.
            timeout: None,
        });
        if let Some(stream) = q.stream() {
            // The consuming node checked RabbitMQ's rules for stream
            // consumers; the arguments are read again here, where the
            // cursor starts.
            let rs = format!("queue '{queue}' in vhost '{vhost}'");
            let args = crate::message::decode_table_body(arguments).ok_or_else(|| {
                (
                    406,
                    format!("PRECONDITION_FAILED - unreadable consumer arguments for {rs}"),
                )
            })?;
            let wants = crate::broker::stream::StreamConsume::parse(&args)
                .map_err(|e| (406, format!("PRECONDITION_FAILED - {e} for {rs}")))?;
            let plugin = match &wants.plugin {
                None => None,
                Some(name) => Some(
                    broker
                        .stream_filter(queue, name, &args)
                        .map_err(|e| (e.reply_code(), e.to_string()))?,
                ),
            };
            stream
                .add(&q, consumer.clone(), wants, plugin)
                .map_err(|why| (406, format!("PRECONDITION_FAILED - {why}: {rs}")))?;
        } else if q.add_consumer(consumer.clone()) == Err(ConsumeError::Exclusive) {
            return Err((
                403,
                format!("ACCESS_REFUSED - queue '{queue}' in vhost '{vhost}' in exclusive use"),
            ));
        }
        tracing::debug!(peer = %self.link.peer, link = self.link.id, tag = %crate::untrusted::text(tag), queue = %crate::untrusted::text(queue), "a consumer for another node's client");
        self.by_origin.insert((origin, tag.to_owned()), id);
        self.consumers.insert(
            id,
            RemoteConsumer {
                origin,
                vhost: vhost.to_owned(),
                queue: q,
                consumer,
            },
        );
        Ok(())
    }

    /// `basic.get` for a client of another node.
    fn get(&mut self, broker: &Broker, vhost: &str, queue: &str, no_ack: bool) -> QueueAnswer {
        let q = match shared_queue(broker, vhost, queue) {
            Ok(q) => q,
            Err(refused) => return refused,
        };
        let Some((entry, m)) = q.pop_readable() else {
            return QueueAnswer::Empty;
        };
        if entry.redelivered {
            q.redelivered.fetch_add(1, Ordering::Relaxed);
        }
        let id = self.next_id;
        self.next_id += 1;
        let outcome = QueueAnswer::Message {
            id,
            redelivered: entry.redelivered,
            exchange: m.exchange.clone(),
            routing_key: m.routing_key.clone(),
            message_count: q.len() as u32,
            properties: m.encoded_properties().clone(),
            body: m.body.clone(),
        };
        if no_ack {
            q.forget([&entry]);
        } else {
            self.unacked.insert(id, (q, None, entry));
        }
        outcome
    }

    fn remove(&self, broker: &Broker, c: RemoteConsumer) {
        let now_unused =
            c.queue
                .remove_consumer(c.consumer.connection, c.consumer.channel, &c.consumer.tag);
        if now_unused
            && c.queue.auto_delete
            && let Some(v) = broker.vhost(&c.vhost)
        {
            broker.delete_unused_queue(&v, &c.queue.name);
        }
    }

    fn dispatch(&mut self, d: Dispatch) {
        match d {
            Dispatch::Deliver {
                queue,
                consumer,
                entry,
            } => {
                let ours = self
                    .consumers
                    .get(&consumer.connection)
                    .filter(|c| Arc::ptr_eq(&c.consumer, &consumer));
                let message = ours.and_then(|_| match queue.message(&entry) {
                    Ok(m) => Some(m),
                    Err(e) => {
                        tracing::error!(queue = %crate::untrusted::text(&queue.name), "reading a stored message failed; not delivered: {e}");
                        None
                    }
                });
                let (Some(c), Some(m)) = (ours, message) else {
                    consumer.settled();
                    queue.put_back(std::iter::once(entry));
                    if consumer.written() {
                        queue.dispatch();
                    }
                    return;
                };
                let id = self.next_id;
                self.next_id += 1;
                let sent = self.link.send_traffic(
                    Traffic::Deliver {
                        origin: c.origin,
                        tag: consumer.tag.clone(),
                        id,
                        redelivered: entry.redelivered,
                        exchange: m.exchange.clone(),
                        routing_key: m.routing_key.clone(),
                        properties: m.encoded_properties().clone(),
                        body: m.body.clone(),
                    }
                    .encode(),
                );
                if !sent {
                    consumer.settled();
                    queue.put_back(std::iter::once(entry));
                } else {
                    if entry.redelivered {
                        queue.redelivered.fetch_add(1, Ordering::Relaxed);
                    }
                    if consumer.no_ack {
                        queue.forget([&entry]);
                    } else {
                        self.unacked
                            .insert(id, (queue.clone(), Some(consumer.clone()), entry));
                    }
                }
                if consumer.written() {
                    queue.dispatch();
                }
            }
            Dispatch::Cancel { connection, .. } => {
                if let Some(c) = self.consumers.remove(&connection) {
                    tracing::debug!(peer = %self.link.peer, tag = %crate::untrusted::text(&c.consumer.tag), "another node's consumer cancelled by its queue");
                    self.by_origin.remove(&(c.origin, c.consumer.tag.clone()));
                    self.link.send_traffic(
                        Traffic::Refused {
                            origin: c.origin,
                            tag: c.consumer.tag.clone(),
                            code: 0,
                            text: String::new(),
                        }
                        .encode(),
                    );
                }
            }
            Dispatch::Remote { .. }
            | Dispatch::LinkLost { .. }
            | Dispatch::Replicated { .. }
            | Dispatch::Rehome
            | Dispatch::Moved { .. } => {}
        }
    }

    fn settle(&mut self, how: Settlement, ids: &[u64]) {
        let mut by_queue: Vec<(Arc<Queue>, Vec<Entry>)> = Vec::new();
        let mut streams: Vec<(Arc<Queue>, Arc<Consumer>, Vec<u64>)> = Vec::new();
        let mut touched_streams: Vec<Arc<Queue>> = Vec::new();
        for id in ids {
            let Some((queue, consumer, entry)) = self.unacked.remove(id) else {
                continue;
            };
            if let Some(c) = &consumer {
                c.settled();
            }
            if how == Settlement::Ack {
                queue.acked.fetch_add(1, Ordering::Relaxed);
            }
            if queue.stream().is_some() {
                // A stream's ack or nack only gives credit back; an ack or
                // a reject also moves a named consumer's stored offset. A
                // requeue does not: it is also how the consuming node hands
                // back what was in flight when the consumer's channel
                // closed, and those frames can arrive before its cancel.
                if let Some(c) = consumer.filter(|_| how != Settlement::Requeue) {
                    match streams.iter_mut().find(|(_, sc, _)| Arc::ptr_eq(sc, &c)) {
                        Some((_, _, offsets)) => offsets.push(entry.id),
                        None => streams.push((queue.clone(), c, vec![entry.id])),
                    }
                }
                if !touched_streams.iter().any(|q| Arc::ptr_eq(q, &queue)) {
                    touched_streams.push(queue);
                }
                continue;
            }
            group_by_queue(&mut by_queue, &queue, entry);
        }
        for (q, c, offsets) in streams {
            if let Some(s) = q.stream() {
                s.settled(&c, &offsets);
            }
        }
        for q in touched_streams {
            q.dispatch();
        }
        for (q, entries) in by_queue {
            match how {
                Settlement::Ack => q.forget(&entries),
                Settlement::Requeue => q.requeue(entries.into_iter()),
                Settlement::Reject => q.reject(entries),
            }
            q.dispatch();
        }
    }

    fn release_confirms(&mut self) {
        let synced = self.synced.as_mut().map(|s| *s.borrow_and_update());
        while let Some(&(origin, seq, ticket, ok)) = self.confirms.front() {
            let on_disk = match (ticket, synced) {
                (0, _) => true,
                (_, Some(s)) => match s.outcome(ticket) {
                    Some(on_disk) => on_disk,
                    None => break,
                },
                // The store stopped: it will not sync.
                (_, None) => false,
            };
            self.confirms.pop_front();
            self.link.send_traffic(
                Traffic::Forwarded {
                    origin,
                    seq,
                    ok: ok && on_disk,
                }
                .encode(),
            );
        }
    }

    /// The link closed: remove its consumers and requeue what they had out.
    fn end(mut self, mut dispatch: mpsc::UnboundedReceiver<Dispatch>) {
        tracing::debug!(peer = %self.link.peer, link = self.link.id, consumers = self.consumers.len(), unacked = self.unacked.len(), "a link's session ended");
        if let Some(broker) = self.broker.upgrade() {
            for (_, c) in std::mem::take(&mut self.consumers) {
                self.remove(&broker, c);
            }
        }
        // Deliveries the queues handed over but the session never sent:
        // back to their queues (no consumer of this link takes more now).
        while let Ok(d) = dispatch.try_recv() {
            if let Dispatch::Deliver {
                queue,
                consumer,
                entry,
            } = d
            {
                consumer.settled();
                consumer.written();
                queue.put_back(std::iter::once(entry));
            }
        }
        let out: Vec<u64> = self.unacked.keys().copied().collect();
        self.settle(Settlement::Requeue, &out);
    }
}

/// Enqueue a forwarded message. Returns whether every queue took it, and
/// the store ticket its confirm waits for.
#[allow(clippy::too_many_arguments)]
pub(super) fn forward(
    broker: &Broker,
    vhost: &str,
    queues: &[String],
    exchange: String,
    routing_key: String,
    properties: bytes::Bytes,
    body: bytes::Bytes,
    reply: &mut dyn FnMut() -> Option<crate::broker::Reply>,
) -> (bool, u64) {
    let Some(v) = broker.vhost(vhost) else {
        return (false, 0);
    };
    let props = match decode_properties(&properties) {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!("a forwarded message's properties do not decode; refused: {e}");
            return (false, 0);
        }
    };
    let message = Arc::new(
        Message::new(exchange, routing_key, props, body).with_encoded_properties(properties),
    );
    let (mut ok, mut ticket) = (true, 0);
    for name in queues {
        match v.queue(name) {
            Ok(q) if q.replica().is_some() => {
                let r = q.replica().expect("checked");
                r.enqueue(message.clone(), reply());
            }
            Ok(q) => {
                let pushed = q.push(message.clone());
                ok &= pushed.accepted;
                ticket = ticket.max(pushed.ticket);
            }
            Err(e) => {
                tracing::debug!("forwarded message for queue '{name}' not taken: {e}");
                ok = false;
            }
        }
    }
    (ok, ticket)
}

/// Most messages one peek returns (the asking node bounds its ask too).
const MAX_PEEK: usize = 10_000;
/// Most bytes of messages one peek returns: its answer is one link frame,
/// well under the link's 64 MiB bound.
const MAX_PEEK_BYTES: usize = 32 << 20;

/// Queue `queue` of `vhost` here, for another node's client to read: the
/// error answer if it is missing or another connection's exclusive queue.
fn shared_queue(broker: &Broker, vhost: &str, queue: &str) -> Result<Arc<Queue>, QueueAnswer> {
    match broker.vhost(vhost).map(|v| v.queue(queue)) {
        None => Err(QueueAnswer::Error {
            code: 404,
            text: format!("NOT_FOUND - no vhost '{vhost}'"),
        }),
        Some(Err(e)) => Err(QueueAnswer::Error {
            code: e.reply_code(),
            text: e.to_string(),
        }),
        Some(Ok(q)) if q.owner.is_some() => Err(QueueAnswer::Error {
            code: 405,
            text: locked(queue, vhost),
        }),
        Some(Ok(q)) => Ok(q),
    }
}

/// The refusal of another connection's exclusive queue, as RabbitMQ words
/// it.
fn locked(queue: &str, vhost: &str) -> String {
    format!(
        "RESOURCE_LOCKED - cannot obtain exclusive access to locked queue '{queue}' in vhost '{vhost}'"
    )
}
