//! One AMQP channel: methods against the broker, content assembly,
//! consumers, unacked deliveries, confirms and transactions.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use amq_protocol::protocol::{
    AMQPClass, BasicProperties, basic, channel, confirm, exchange, queue, tx,
};
use amq_protocol::types::ShortString;
use bytes::{Bytes, BytesMut};
use tokio::sync::mpsc;

use super::frame::{
    Frame, encode_confirm, encode_content, encode_deliver, encode_method, short_string,
};
use super::grant::Grant;
use crate::access::Access;
use crate::broker::{
    ARG_ALTERNATE_EXCHANGE, ARG_DEAD_LETTER_EXCHANGE, Broker, BrokerError, ChannelCredit,
    ChannelInfo, ConsumeError, Consumer, Destination, Dispatch, Entry, ExchangeSpec, Map, Queue,
    VHost,
};
use crate::message::Message;
use crate::store::Synced;

/// An error from handling a frame: closes the channel or the connection.
#[derive(Debug)]
pub(crate) struct AmqpError {
    pub code: u16,
    pub text: String,
    pub class_id: u16,
    pub method_id: u16,
}

impl AmqpError {
    pub(crate) fn new(code: u16, text: impl Into<String>) -> Self {
        AmqpError {
            code,
            text: text.into(),
            class_id: 0,
            method_id: 0,
        }
    }

    /// Raised by `basic.publish` (class 60, method 40): for errors found
    /// in a publish's content, after the method itself was handled.
    fn on_publish(mut self) -> Self {
        (self.class_id, self.method_id) = (60, 40);
        self
    }

    fn on(mut self, method: &AMQPClass) -> Self {
        self.class_id = method.get_amqp_class_id();
        self.method_id = method.get_amqp_method_id();
        self
    }

    /// Whether the code is a connection-level error (the spec's "hard" errors).
    pub(crate) fn is_connection_error(&self) -> bool {
        matches!(self.code, 320 | 402 | 501..=506 | 530 | 540 | 541)
    }

    /// Reply text, cut to the 255 bytes a short string holds.
    pub(crate) fn reply_text(&self) -> ShortString {
        short_string(&self.text)
    }
}

impl From<BrokerError> for AmqpError {
    fn from(e: BrokerError) -> Self {
        AmqpError::new(e.reply_code(), e.to_string())
    }
}

/// A method only the server sends (e.g. `queue.declare-ok`) arrived from
/// the client.
fn server_only(class: &str) -> AmqpError {
    AmqpError::new(
        503,
        format!("COMMAND_INVALID - server-side {class} method sent by client"),
    )
}

/// An exchange named by a declare argument, for the permission check (a
/// malformed one is refused by the declare itself).
fn exchange_arg(args: &amq_protocol::types::FieldTable, key: &str) -> Option<String> {
    crate::broker::string_arg(args, key).ok().flatten()
}

fn unexpected(what: &str) -> AmqpError {
    AmqpError::new(505, format!("UNEXPECTED_FRAME - {what}"))
}

/// What a channel needs from its connection while handling a frame.
pub(crate) struct Ctx<'a> {
    pub broker: &'a Arc<Broker>,
    pub vhost: &'a Arc<VHost>,
    /// The user and its permissions in the vhost.
    pub grant: &'a Grant,
    pub out: &'a mut Vec<u8>,
    pub connection: u64,
    pub dispatch: &'a mpsc::UnboundedSender<Dispatch>,
    pub frame_max: u32,
    /// Largest message body accepted (`amqp.max_message_size`).
    pub max_message_size: u64,
    /// Exclusive queues this connection declared (deleted when it closes).
    pub exclusive_queues: &'a mut Vec<String>,
    /// Queues above their flow watermark that this connection published
    /// into: it stops reading until they drain.
    pub congested: &'a mut Vec<Arc<Queue>>,
    /// Set when a channel holds confirms waiting for the store's sync.
    pub awaiting_sync: &'a mut bool,
    /// Set when a channel gathered acks to send at the end of the batch.
    pub acks_ready: &'a mut bool,
}

struct Pending {
    publish: basic::Publish,
    header: Option<(BasicProperties, Bytes, u64)>,
    body: BytesMut,
    single: Option<Bytes>,
}

struct Unacked {
    queue: Arc<Queue>,
    entry: Entry,
    consumer: Option<Arc<Consumer>>,
}

/// The `confirms` tag of a deferred `tx.commit-ok` (delivery tags start at 1).
const COMMIT_OK: u64 = 0;

struct TxPublish {
    mandatory: bool,
    message: Message,
}

enum TxAck {
    Ack(u64, bool),
    Nack(u64, bool, bool),
}

pub(crate) struct Channel {
    pub id: u16,
    /// Closed by the server; waiting for close-ok, ignoring everything else.
    pub closing: bool,
    pending: Option<Pending>,
    consumers: Map<String, (Arc<Consumer>, Arc<Queue>)>,
    unacked: VecDeque<(u64, Unacked)>,
    next_tag: u64,
    prefetch: u32,
    credit: Arc<ChannelCredit>,
    /// What the admin API shows of this channel.
    info: Arc<ChannelInfo>,
    confirm: bool,
    publish_seq: u64,
    /// Confirms not sent yet, in publish order: (tag, store ticket, ack).
    /// A persistent message's confirm waits for the group commit to reach
    /// its ticket; later confirms wait behind it, so `multiple` acks are
    /// always truthful.
    /// In a transactional channel, the one entry is a `tx.commit-ok`
    /// (tag [`COMMIT_OK`]) waiting for the commit's messages to be synced.
    confirms: VecDeque<(u64, u64, bool)>,
    /// Acks for publishes confirmed as they were handled (nothing to wait
    /// for on disk) and not sent yet: the last tag and how many. They go out
    /// as one `multiple` ack at the end of the connection's batch of frames,
    /// or before anything else this channel sends.
    acks_ready: Option<(u64, u32)>,
    tx: Option<(Vec<TxPublish>, Vec<TxAck>)>,
    /// The highest store ticket of the transaction being committed.
    tx_ticket: u64,
    /// A commit whose messages failed to sync: the channel must be closed.
    pub tx_failed: bool,
    last_queue: String,
    next_ctag: u64,
    /// The exchange the last publish was allowed to write to: publishers
    /// mostly use one, so a restricted user's pattern is matched once.
    writable: Option<String>,
    /// Deliveries that reached the connection after the client paused the
    /// channel (`channel.flow`): sent, in order, when it resumes.
    held: VecDeque<(Arc<Queue>, Arc<Consumer>, Entry)>,
}

/// What became of a delivery handed to [`Channel::deliver`].
pub(crate) enum Delivery {
    /// Written to the output buffer.
    Written,
    /// Not sent: given back to its queue (the consumer is gone, or the
    /// channel is closing), or left in the store (it could not be read).
    Returned,
    /// Kept until the client resumes the paused channel.
    Held,
}

impl Channel {
    pub(crate) fn new(id: u16, info: Arc<ChannelInfo>) -> Self {
        Channel {
            id,
            closing: false,
            pending: None,
            consumers: Map::default(),
            unacked: VecDeque::new(),
            next_tag: 0,
            prefetch: 0,
            credit: info.credit.clone(),
            info,
            confirm: false,
            publish_seq: 0,
            confirms: VecDeque::new(),
            acks_ready: None,
            tx: None,
            tx_ticket: 0,
            tx_failed: false,
            last_queue: String::new(),
            next_ctag: 0,
            writable: None,
            held: VecDeque::new(),
        }
    }

    fn send(&mut self, ctx: &mut Ctx<'_>, method: AMQPClass) {
        self.flush_acks(ctx.out);
        encode_method(ctx.out, self.id, method);
    }

    /// Send the acks gathered in `acks_ready`, as one `multiple` ack when
    /// there are several (clients wait for those, and it saves frames).
    pub(crate) fn flush_acks(&mut self, out: &mut Vec<u8>) {
        if let Some((last, n)) = self.acks_ready.take() {
            self.send_confirm(out, last, n > 1, true);
        }
    }

    /// Handle one frame for this channel.
    pub(crate) fn handle(&mut self, ctx: &mut Ctx<'_>, frame: Frame) -> Result<(), AmqpError> {
        match frame {
            Frame::Method(_, method) => {
                if self.pending.is_some() {
                    return Err(
                        unexpected("method frame while a message's content was expected")
                            .on(&method),
                    );
                }
                self.method(ctx, &method)
                    .map_err(|e| if e.class_id == 0 { e.on(&method) } else { e })
            }
            Frame::Header {
                class_id,
                body_size,
                properties,
                raw_properties,
                ..
            } => {
                let Some(p) = self.pending.as_mut().filter(|p| p.header.is_none()) else {
                    return Err(unexpected("content header without basic.publish"));
                };
                if class_id != 60 {
                    return Err(unexpected("content header for a class other than basic"));
                }
                if body_size > ctx.max_message_size {
                    // Refused on the header's word, before a byte of the
                    // body is buffered; the body frames that follow reach
                    // a closing channel and are dropped as they arrive.
                    self.pending = None;
                    return Err(AmqpError::new(
                        406,
                        format!(
                            "PRECONDITION_FAILED - message size {body_size} is larger than configured max size {}",
                            ctx.max_message_size
                        ),
                    )
                    .on_publish());
                }
                p.header = Some((properties, raw_properties, body_size));
                if body_size == 0 {
                    self.complete_publish(ctx)?;
                }
                Ok(())
            }
            Frame::Body(_, chunk) => {
                let Some(p) = self.pending.as_mut().filter(|p| p.header.is_some()) else {
                    return Err(unexpected("content body without a content header"));
                };
                let size = p.header.as_ref().map_or(0, |h| h.2);
                let have = p.single.as_ref().map_or(p.body.len(), Bytes::len) as u64;
                if have + chunk.len() as u64 > size {
                    return Err(AmqpError::new(
                        501,
                        "FRAME_ERROR - content body larger than its header announced",
                    ));
                }
                // One body frame (the common case) is kept as the read
                // buffer's slice: no copy.
                let complete = have + chunk.len() as u64 == size;
                if have == 0 && complete {
                    p.single = Some(chunk);
                } else {
                    if let Some(first) = p.single.take() {
                        p.body.extend_from_slice(&first);
                    }
                    p.body.extend_from_slice(&chunk);
                }
                if complete {
                    self.complete_publish(ctx)?;
                }
                Ok(())
            }
            Frame::Heartbeat(_) => Err(AmqpError::new(
                501,
                "FRAME_ERROR - heartbeat on a non-zero channel",
            )),
        }
    }

    fn complete_publish(&mut self, ctx: &mut Ctx<'_>) -> Result<(), AmqpError> {
        let p = self.pending.take().expect("called with pending content");
        let (properties, raw, _) = p.header.expect("header before completion");
        // A consumer may trust `user-id`: RabbitMQ refuses one that is not
        // the publisher's own (unless it is tagged `impersonator`).
        if let Some(uid) = properties.user_id()
            && uid.as_str() != ctx.grant.user
            && !ctx.grant.impersonator
        {
            return Err(AmqpError::new(
                406,
                format!(
                    "PRECONDITION_FAILED - user_id property set to '{uid}' but authenticated user was '{}'",
                    ctx.grant.user
                ),
            )
            .on_publish());
        }
        let body = p.single.unwrap_or_else(|| p.body.freeze());
        let publish = p.publish;
        let mandatory = publish.mandatory;
        // The decoded strings move into the message: no copies.
        let message = Message::new(
            String::from(publish.exchange),
            String::from(publish.routing_key),
            properties,
            body,
        )
        .with_encoded_properties(raw);
        if let Some((publishes, _)) = self.tx.as_mut() {
            publishes.push(TxPublish { mandatory, message });
            return Ok(());
        }
        self.publish(ctx, mandatory, message)
    }

    /// Publish `message` to the exchange it names.
    fn publish(
        &mut self,
        ctx: &mut Ctx<'_>,
        mandatory: bool,
        message: Message,
    ) -> Result<(), AmqpError> {
        // Errors name the method as the client sent it.
        let publish_method = |m: &Message| {
            AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
                exchange: m.exchange.as_str().into(),
                routing_key: m.routing_key.as_str().into(),
                mandatory,
                immediate: false,
            }))
        };
        let exchange = message.exchange.as_str();
        if !ctx.grant.permissions.is_full() && self.writable.as_deref() != Some(exchange) {
            ctx.grant
                .check(Access::Write, "exchange", exchange)
                .map_err(|e| e.on(&publish_method(&message)))?;
            self.writable = Some(exchange.to_owned());
        }
        // Looked up once, here, and handed to the broker.
        let x = if exchange.is_empty() {
            None
        } else {
            let x = ctx
                .vhost
                .exchange(exchange)
                .map_err(|e| AmqpError::from(e).on(&publish_method(&message)))?;
            if x.internal {
                return Err(AmqpError::new(
                    403,
                    format!("ACCESS_REFUSED - cannot publish to internal exchange '{exchange}'"),
                )
                .on(&publish_method(&message)));
            }
            Some(x)
        };
        if let Err(e) = crate::broker::message_ttl(&message) {
            return Err(AmqpError::new(406, format!("PRECONDITION_FAILED - {e}"))
                .on(&publish_method(&message)));
        }
        let returned = mandatory.then(|| {
            (
                message.routing_key.clone(),
                message.encoded_properties().clone(),
                message.body.clone(),
            )
        });
        let outcome = ctx.broker.publish_via(ctx.vhost, x.as_ref(), message);
        let exchange = x.as_ref().map_or("", |x| x.name.as_str());
        let nothing = outcome.delivered == 0 && outcome.dead_lettered == 0 && !outcome.dropped;
        for q in &outcome.congested {
            if !ctx.congested.iter().any(|c| Arc::ptr_eq(c, q)) {
                ctx.congested.push(q.clone());
            }
        }
        if let Some((routing_key, props, body)) = returned
            && nothing
        {
            let reply_text = match outcome.faults.first() {
                Some(f) => format!("NO_ROUTE - {f}"),
                None => "NO_ROUTE".to_owned(),
            };
            self.send(
                ctx,
                AMQPClass::Basic(basic::AMQPMethod::Return(basic::Return {
                    reply_code: 312,
                    reply_text: short_string(&reply_text),
                    exchange: exchange.into(),
                    routing_key: routing_key.into(),
                })),
            );
            encode_content(ctx.out, self.id, &props, &body, ctx.frame_max);
        }
        self.tx_ticket = self.tx_ticket.max(outcome.ticket);
        if self.confirm {
            self.publish_seq += 1;
            let tag = self.publish_seq;
            let ack = outcome.faults.is_empty() && outcome.rejected == 0;
            if outcome.ticket == 0 && self.confirms.is_empty() && ack {
                self.acks_ready = Some((tag, self.acks_ready.map_or(1, |(_, n)| n + 1)));
                *ctx.acks_ready = true;
            } else {
                // Tags go out in order: the gathered acks first.
                self.flush_acks(ctx.out);
                if outcome.ticket == 0 && self.confirms.is_empty() {
                    self.send_confirm(ctx.out, tag, false, ack);
                } else {
                    self.confirms.push_back((tag, outcome.ticket, ack));
                    *ctx.awaiting_sync = true;
                }
            }
        }
        Ok(())
    }

    fn send_confirm(&self, out: &mut Vec<u8>, tag: u64, multiple: bool, ack: bool) {
        encode_confirm(out, self.id, tag, multiple, ack);
    }

    /// Send the confirms the store has synced far enough for: runs of acks
    /// as one `multiple` ack, a failed sync as a nack. Returns whether
    /// some still wait.
    pub(crate) fn release_confirms(&mut self, out: &mut Vec<u8>, synced: Synced) -> bool {
        let mut acks: Option<(u64, u32)> = None;
        while let Some(&(tag, ticket, ack)) = self.confirms.front() {
            let on_disk = if ticket == 0 {
                true
            } else {
                match synced.outcome(ticket) {
                    Some(on_disk) => on_disk,
                    None => break,
                }
            };
            self.confirms.pop_front();
            if tag == COMMIT_OK {
                if on_disk {
                    encode_method(
                        out,
                        self.id,
                        AMQPClass::Tx(tx::AMQPMethod::CommitOk(tx::CommitOk {})),
                    );
                } else {
                    self.tx_failed = true;
                }
                continue;
            }
            if ack && on_disk {
                acks = Some((tag, acks.map_or(1, |(_, n)| n + 1)));
                continue;
            }
            if let Some((last, n)) = acks.take() {
                self.send_confirm(out, last, n > 1, true);
            }
            self.send_confirm(out, tag, false, false);
        }
        if let Some((last, n)) = acks {
            self.send_confirm(out, last, n > 1, true);
        }
        !self.confirms.is_empty()
    }

    fn queue_name(&self, name: &ShortString) -> Result<String, AmqpError> {
        if name.as_str().is_empty() {
            if self.last_queue.is_empty() {
                // A channel error, as RabbitMQ makes it: the connection's
                // other channels are not at fault.
                return Err(AmqpError::new(
                    404,
                    "NOT_FOUND - no previous declaration of queue",
                ));
            }
            return Ok(self.last_queue.clone());
        }
        Ok(name.to_string())
    }

    fn check_access(ctx: &Ctx<'_>, q: &Queue) -> Result<(), AmqpError> {
        if let Some(owner) = q.owner
            && owner != ctx.connection
        {
            return Err(AmqpError::new(
                405,
                format!(
                    "RESOURCE_LOCKED - cannot obtain exclusive access to locked queue '{}' in vhost '{}'",
                    q.name, ctx.vhost.name
                ),
            ));
        }
        Ok(())
    }

    /// The queue `name` (empty: the last declared), if the user has
    /// `access` to it (checked first, as RabbitMQ does) and it is not
    /// another connection's exclusive queue.
    fn queue(
        &self,
        ctx: &Ctx<'_>,
        name: &ShortString,
        access: Access,
    ) -> Result<Arc<Queue>, AmqpError> {
        let name = self.queue_name(name)?;
        ctx.grant.check(access, "queue", &name)?;
        let q = ctx.vhost.queue(&name)?;
        Self::check_access(ctx, &q)?;
        Ok(q)
    }

    fn method(&mut self, ctx: &mut Ctx<'_>, method: &AMQPClass) -> Result<(), AmqpError> {
        use AMQPClass as C;
        match method {
            C::Basic(basic::AMQPMethod::Publish(p)) => {
                self.pending = Some(Pending {
                    publish: p.clone(),
                    header: None,
                    body: BytesMut::new(),
                    single: None,
                });
            }
            C::Channel(channel::AMQPMethod::Flow(f)) => {
                // Paused, the channel's consumers have no credit, so queues
                // stop dispatching to them; deliveries already on their way
                // are held here. flow-ok follows once nothing more will be
                // sent, as the spec asks.
                self.credit.paused.store(!f.active, Ordering::Relaxed);
                self.send(
                    ctx,
                    C::Channel(channel::AMQPMethod::FlowOk(channel::FlowOk {
                        active: f.active,
                    })),
                );
                if f.active {
                    self.resume(ctx);
                }
            }
            C::Exchange(m) => self.exchange_method(ctx, m)?,
            C::Queue(m) => self.queue_method(ctx, m)?,
            C::Basic(m) => self.basic_method(ctx, m)?,
            C::Confirm(confirm::AMQPMethod::Select(s)) => {
                if self.tx.is_some() {
                    return Err(AmqpError::new(
                        406,
                        "PRECONDITION_FAILED - cannot switch from tx to confirm mode",
                    ));
                }
                self.confirm = true;
                self.info.confirm.store(true, Ordering::Relaxed);
                if !s.nowait {
                    self.send(
                        ctx,
                        C::Confirm(confirm::AMQPMethod::SelectOk(confirm::SelectOk {})),
                    );
                }
            }
            C::Tx(m) => self.tx_method(ctx, m)?,
            other => {
                return Err(AmqpError::new(
                    540,
                    format!(
                        "NOT_IMPLEMENTED - method {}.{} is not supported on a channel",
                        other.get_amqp_class_id(),
                        other.get_amqp_method_id()
                    ),
                ));
            }
        }
        Ok(())
    }

    fn exchange_method(
        &mut self,
        ctx: &mut Ctx<'_>,
        m: &exchange::AMQPMethod,
    ) -> Result<(), AmqpError> {
        use exchange::AMQPMethod as M;
        let reply = |this: &mut Self, ctx: &mut Ctx<'_>, nowait: bool, ok: M| {
            if !nowait {
                this.send(ctx, AMQPClass::Exchange(ok));
            }
        };
        match m {
            M::Declare(d) => {
                if !d.passive {
                    ctx.grant
                        .check(Access::Configure, "exchange", d.exchange.as_str())?;
                    // Exchanges it will send unroutable or faulted messages to.
                    for key in [ARG_ALTERNATE_EXCHANGE, ARG_DEAD_LETTER_EXCHANGE] {
                        if let Some(x) = exchange_arg(&d.arguments, key) {
                            ctx.grant.check(Access::Write, "exchange", &x)?;
                        }
                    }
                }
                let spec = ExchangeSpec {
                    name: d.exchange.to_string(),
                    kind: d.kind.to_string(),
                    durable: d.durable,
                    auto_delete: d.auto_delete,
                    internal: d.internal,
                    arguments: d.arguments.clone(),
                };
                ctx.broker.declare_exchange(ctx.vhost, spec, d.passive)?;
                reply(self, ctx, d.nowait, M::DeclareOk(exchange::DeclareOk {}));
            }
            M::Delete(d) => {
                ctx.grant
                    .check(Access::Configure, "exchange", d.exchange.as_str())?;
                match ctx
                    .broker
                    .delete_exchange(ctx.vhost, d.exchange.as_str(), d.if_unused)
                {
                    // Deletes are idempotent, as in RabbitMQ.
                    Ok(()) | Err(BrokerError::NotFound { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
                reply(self, ctx, d.nowait, M::DeleteOk(exchange::DeleteOk {}));
            }
            M::Bind(b) => {
                ctx.grant
                    .check(Access::Write, "exchange", b.destination.as_str())?;
                ctx.grant
                    .check(Access::Read, "exchange", b.source.as_str())?;
                let dest = Destination::Exchange(b.destination.to_string());
                ctx.broker.bind(
                    ctx.vhost,
                    b.source.as_str(),
                    dest,
                    b.routing_key.as_str(),
                    b.arguments.clone(),
                )?;
                reply(self, ctx, b.nowait, M::BindOk(exchange::BindOk {}));
            }
            M::Unbind(u) => {
                ctx.grant
                    .check(Access::Write, "exchange", u.destination.as_str())?;
                ctx.grant
                    .check(Access::Read, "exchange", u.source.as_str())?;
                let dest = Destination::Exchange(u.destination.to_string());
                ctx.broker.unbind(
                    ctx.vhost,
                    u.source.as_str(),
                    &dest,
                    u.routing_key.as_str(),
                    &u.arguments,
                )?;
                reply(self, ctx, u.nowait, M::UnbindOk(exchange::UnbindOk {}));
            }
            _ => return Err(server_only("exchange")),
        }
        Ok(())
    }

    fn queue_method(&mut self, ctx: &mut Ctx<'_>, m: &queue::AMQPMethod) -> Result<(), AmqpError> {
        use queue::AMQPMethod as M;
        match m {
            M::Declare(d) => {
                if super::PANIC_ON_DECLARE
                    .get()
                    .is_some_and(|n| n == d.queue.as_str())
                {
                    panic!("queue.declare of the panic trigger '{}'", d.queue);
                }
                let q = if d.passive {
                    let q = ctx.vhost.queue(&self.queue_name(&d.queue)?)?;
                    Self::check_access(ctx, &q)?;
                    q.touch();
                    q
                } else {
                    let name = if d.queue.as_str().is_empty() {
                        server_name("amq.gen")
                    } else {
                        d.queue.to_string()
                    };
                    ctx.grant.check(Access::Configure, "queue", &name)?;
                    if let Some(dlx) = exchange_arg(&d.arguments, ARG_DEAD_LETTER_EXCHANGE) {
                        ctx.grant.check(Access::Read, "queue", &name)?;
                        ctx.grant.check(Access::Write, "exchange", &dlx)?;
                    }
                    let owner = d.exclusive.then_some(ctx.connection);
                    let q = ctx.broker.declare_queue(
                        ctx.vhost,
                        &name,
                        d.durable,
                        owner,
                        d.auto_delete,
                        d.arguments.clone(),
                    )?;
                    if owner.is_some() && !ctx.exclusive_queues.contains(&name) {
                        ctx.exclusive_queues.push(name);
                    }
                    q
                };
                self.last_queue = q.name.clone();
                if !d.nowait {
                    self.send(
                        ctx,
                        AMQPClass::Queue(M::DeclareOk(queue::DeclareOk {
                            queue: q.name.as_str().into(),
                            message_count: q.len() as u32,
                            consumer_count: q.consumer_count() as u32,
                        })),
                    );
                }
            }
            M::Bind(b) => {
                let q = self.queue(ctx, &b.queue, Access::Write)?;
                ctx.grant
                    .check(Access::Read, "exchange", b.exchange.as_str())?;
                let dest = Destination::Queue(q.name.clone());
                ctx.broker.bind(
                    ctx.vhost,
                    b.exchange.as_str(),
                    dest,
                    b.routing_key.as_str(),
                    b.arguments.clone(),
                )?;
                if !b.nowait {
                    self.send(ctx, AMQPClass::Queue(M::BindOk(queue::BindOk {})));
                }
            }
            M::Unbind(u) => {
                let q = self.queue(ctx, &u.queue, Access::Write)?;
                ctx.grant
                    .check(Access::Read, "exchange", u.exchange.as_str())?;
                let dest = Destination::Queue(q.name.clone());
                ctx.broker.unbind(
                    ctx.vhost,
                    u.exchange.as_str(),
                    &dest,
                    u.routing_key.as_str(),
                    &u.arguments,
                )?;
                self.send(ctx, AMQPClass::Queue(M::UnbindOk(queue::UnbindOk {})));
            }
            M::Purge(p) => {
                let q = self.queue(ctx, &p.queue, Access::Read)?;
                let n = q.purge();
                if !p.nowait {
                    self.send(
                        ctx,
                        AMQPClass::Queue(M::PurgeOk(queue::PurgeOk {
                            message_count: n as u32,
                        })),
                    );
                }
            }
            M::Delete(d) => {
                let n = match self.queue(ctx, &d.queue, Access::Configure) {
                    Ok(q) => {
                        let n =
                            ctx.broker
                                .delete_queue(ctx.vhost, &q.name, d.if_unused, d.if_empty)?;
                        ctx.exclusive_queues.retain(|name| *name != q.name);
                        n
                    }
                    // Deleting a queue that is not there: delete-ok with no
                    // messages, as in RabbitMQ.
                    Err(e) if e.code == 404 && !d.queue.as_str().is_empty() => 0,
                    Err(e) => return Err(e),
                };
                if !d.nowait {
                    self.send(
                        ctx,
                        AMQPClass::Queue(M::DeleteOk(queue::DeleteOk {
                            message_count: n as u32,
                        })),
                    );
                }
            }
            _ => return Err(server_only("queue")),
        }
        Ok(())
    }

    fn basic_method(&mut self, ctx: &mut Ctx<'_>, m: &basic::AMQPMethod) -> Result<(), AmqpError> {
        use basic::AMQPMethod as M;
        match m {
            M::Qos(q) => {
                // RabbitMQ's reading: global=false limits each new consumer,
                // global=true the channel as a whole.
                if q.global {
                    self.credit
                        .limit
                        .store(u32::from(q.prefetch_count), Ordering::Relaxed);
                } else {
                    self.prefetch = u32::from(q.prefetch_count);
                }
                self.send(ctx, AMQPClass::Basic(M::QosOk(basic::QosOk {})));
                for (c, q) in self.consumers.values() {
                    let _ = c;
                    q.dispatch();
                }
            }
            M::Consume(c) => {
                let q = self.queue(ctx, &c.queue, Access::Read)?;
                let tag = if c.consumer_tag.as_str().is_empty() {
                    self.next_ctag += 1;
                    format!("amq.ctag-{}-{}-{}", ctx.connection, self.id, self.next_ctag)
                } else {
                    c.consumer_tag.to_string()
                };
                if self.consumers.contains_key(&tag) {
                    return Err(AmqpError::new(
                        530,
                        format!("NOT_ALLOWED - attempt to reuse consumer tag '{tag}'"),
                    ));
                }
                let consumer = Arc::new(Consumer {
                    tag: tag.clone(),
                    channel: self.id,
                    connection: ctx.connection,
                    no_ack: c.no_ack,
                    exclusive: c.exclusive,
                    prefetch: self.prefetch,
                    unacked: Default::default(),
                    in_flight: Default::default(),
                    channel_credit: self.credit.clone(),
                    sink: ctx.dispatch.clone(),
                });
                // consume-ok goes out before any delivery to this consumer:
                // it is written to the buffer before the queue can dispatch.
                let before = ctx.out.len();
                if !c.nowait {
                    self.send(
                        ctx,
                        AMQPClass::Basic(M::ConsumeOk(basic::ConsumeOk {
                            consumer_tag: tag.as_str().into(),
                        })),
                    );
                }
                if q.add_consumer(consumer.clone()) == Err(ConsumeError::Exclusive) {
                    // Refused: take the consume-ok back (channel.close follows).
                    ctx.out.truncate(before);
                    return Err(AmqpError::new(
                        403,
                        format!(
                            "ACCESS_REFUSED - queue '{}' in vhost '{}' in exclusive use",
                            q.name, ctx.vhost.name
                        ),
                    ));
                }
                self.consumers.insert(tag, (consumer, q));
            }
            M::Cancel(c) => {
                self.cancel_consumer(ctx, c.consumer_tag.as_str());
                if !c.nowait {
                    self.send(
                        ctx,
                        AMQPClass::Basic(M::CancelOk(basic::CancelOk {
                            consumer_tag: c.consumer_tag.clone(),
                        })),
                    );
                }
            }
            M::Get(g) => {
                let q = self.queue(ctx, &g.queue, Access::Read)?;
                let popped = loop {
                    let Some(entry) = q.pop() else { break None };
                    match q.message(&entry) {
                        Ok(m) => break Some((entry, m)),
                        Err(e) => {
                            tracing::error!(queue = %q.name, "reading a stored message failed; skipped: {e}")
                        }
                    }
                };
                match popped {
                    None => self.send(ctx, AMQPClass::Basic(M::GetEmpty(basic::GetEmpty {}))),
                    Some((entry, m)) => {
                        if entry.redelivered {
                            q.redelivered.fetch_add(1, Ordering::Relaxed);
                        }
                        self.next_tag += 1;
                        let tag = self.next_tag;
                        self.send(
                            ctx,
                            AMQPClass::Basic(M::GetOk(basic::GetOk {
                                delivery_tag: tag,
                                redelivered: entry.redelivered,
                                exchange: m.exchange.as_str().into(),
                                routing_key: m.routing_key.as_str().into(),
                                message_count: q.len() as u32,
                            })),
                        );
                        encode_content(
                            ctx.out,
                            self.id,
                            m.encoded_properties(),
                            &m.body,
                            ctx.frame_max,
                        );
                        if g.no_ack {
                            q.forget([&entry]);
                        } else {
                            self.unacked.push_back((
                                tag,
                                Unacked {
                                    queue: q,
                                    entry,
                                    consumer: None,
                                },
                            ));
                        }
                    }
                }
            }
            M::Ack(a) => self.ack_or_defer(a.delivery_tag, a.multiple, None)?,
            M::Nack(n) => self.ack_or_defer(n.delivery_tag, n.multiple, Some(n.requeue))?,
            M::Reject(r) => self.ack_or_defer(r.delivery_tag, false, Some(r.requeue))?,
            M::Recover(_) | M::RecoverAsync(_) => {
                self.requeue_all();
                if matches!(m, M::Recover(_)) {
                    self.send(ctx, AMQPClass::Basic(M::RecoverOk(basic::RecoverOk {})));
                }
            }
            _ => return Err(server_only("basic")),
        }
        Ok(())
    }

    fn tx_method(&mut self, ctx: &mut Ctx<'_>, m: &tx::AMQPMethod) -> Result<(), AmqpError> {
        use tx::AMQPMethod as M;
        match m {
            M::Select(_) => {
                if self.confirm {
                    return Err(AmqpError::new(
                        406,
                        "PRECONDITION_FAILED - cannot switch from confirm to tx mode",
                    ));
                }
                self.tx.get_or_insert_with(Default::default);
                self.info.transactional.store(true, Ordering::Relaxed);
                self.send(ctx, AMQPClass::Tx(M::SelectOk(tx::SelectOk {})));
            }
            M::Commit(_) => {
                let Some((publishes, acks)) = self
                    .tx
                    .as_mut()
                    .map(|(p, a)| (std::mem::take(p), std::mem::take(a)))
                else {
                    return Err(AmqpError::new(
                        406,
                        "PRECONDITION_FAILED - channel is not transactional",
                    ));
                };
                self.tx_ticket = 0;
                for p in publishes {
                    self.publish(ctx, p.mandatory, p.message)?;
                }
                for a in acks {
                    match a {
                        TxAck::Ack(tag, multiple) => self.settle(tag, multiple, None)?,
                        TxAck::Nack(tag, multiple, requeue) => {
                            self.settle(tag, multiple, Some(requeue))?
                        }
                    }
                }
                if self.tx_ticket == 0 {
                    self.send(ctx, AMQPClass::Tx(M::CommitOk(tx::CommitOk {})));
                } else {
                    // Committed means on disk, as a confirm does.
                    self.flush_acks(ctx.out);
                    self.confirms.push_back((COMMIT_OK, self.tx_ticket, true));
                    *ctx.awaiting_sync = true;
                }
            }
            M::Rollback(_) => {
                let Some((publishes, acks)) = self.tx.as_mut() else {
                    return Err(AmqpError::new(
                        406,
                        "PRECONDITION_FAILED - channel is not transactional",
                    ));
                };
                publishes.clear();
                acks.clear();
                self.send(ctx, AMQPClass::Tx(M::RollbackOk(tx::RollbackOk {})));
            }
            _ => return Err(server_only("tx")),
        }
        Ok(())
    }

    /// Settle now, or at commit in a transactional channel (the tag is
    /// checked now either way).
    fn ack_or_defer(
        &mut self,
        tag: u64,
        multiple: bool,
        requeue: Option<bool>,
    ) -> Result<(), AmqpError> {
        if self.tx.is_none() {
            return self.settle(tag, multiple, requeue);
        }
        self.check_tag(tag, multiple)?;
        if let Some((_, acks)) = &mut self.tx {
            acks.push(match requeue {
                None => TxAck::Ack(tag, multiple),
                Some(r) => TxAck::Nack(tag, multiple, r),
            });
        }
        Ok(())
    }

    fn unknown_tag(tag: u64) -> AmqpError {
        AmqpError::new(
            406,
            format!("PRECONDITION_FAILED - unknown delivery tag {tag}"),
        )
    }

    fn check_tag(&self, tag: u64, multiple: bool) -> Result<(), AmqpError> {
        if (multiple && tag == 0) || self.unacked.binary_search_by_key(&tag, |(t, _)| *t).is_ok() {
            return Ok(());
        }
        if multiple && self.unacked.front().is_some_and(|(t, _)| *t <= tag) {
            return Ok(());
        }
        Err(Self::unknown_tag(tag))
    }

    /// Ack (`requeue` None) or nack/reject deliveries up to `tag`.
    fn settle(&mut self, tag: u64, multiple: bool, requeue: Option<bool>) -> Result<(), AmqpError> {
        let settled: Vec<Unacked> = if multiple {
            let upto = if tag == 0 { u64::MAX } else { tag };
            if tag != 0 && self.unacked.front().is_none_or(|(t, _)| *t > upto) {
                return Err(Self::unknown_tag(tag));
            }
            let mut v = Vec::new();
            while self.unacked.front().is_some_and(|(t, _)| *t <= upto) {
                v.push(self.unacked.pop_front().unwrap().1);
            }
            v
        } else {
            let at = self
                .unacked
                .binary_search_by_key(&tag, |(t, _)| *t)
                .map_err(|_| Self::unknown_tag(tag))?;
            vec![self.unacked.remove(at).unwrap().1]
        };
        let mut touched: Vec<Arc<Queue>> = Vec::new();
        let mut by_queue: Vec<(Arc<Queue>, Vec<Entry>)> = Vec::new();
        for u in settled {
            if let Some(c) = &u.consumer {
                c.settled();
            }
            if requeue.is_none() {
                u.queue.acked.fetch_add(1, Ordering::Relaxed);
            }
            // An ack of a message that is in no log needs nothing more.
            if requeue.is_some() || u.entry.stored.is_some() {
                group_by_queue(&mut by_queue, &u.queue, u.entry);
            }
            if !touched.iter().any(|q| Arc::ptr_eq(q, &u.queue)) {
                touched.push(u.queue);
            }
        }
        // Ack (settled in the queue's log, one write per segment), requeue,
        // or (nack/reject without requeue) dead-letter.
        for (q, entries) in by_queue {
            match requeue {
                None => q.forget(&entries),
                Some(true) => q.requeue(entries.into_iter()),
                Some(false) => q.reject(entries),
            }
        }
        for q in touched {
            q.dispatch();
        }
        // Channel-wide prefetch frees credit for every consumer here.
        if self.credit.limit.load(Ordering::Relaxed) != 0 {
            for (_, q) in self.consumers.values() {
                q.dispatch();
            }
        }
        Ok(())
    }

    /// Requeue every unacked delivery, in order, marked redelivered.
    fn requeue_all(&mut self) {
        let mut by_queue: Vec<(Arc<Queue>, Vec<Entry>)> = Vec::new();
        for (_, u) in self.unacked.drain(..) {
            if let Some(c) = &u.consumer {
                c.settled();
            }
            group_by_queue(&mut by_queue, &u.queue, u.entry);
        }
        for (q, entries) in by_queue {
            q.requeue(entries.into_iter());
        }
    }

    fn cancel_consumer(&mut self, ctx: &Ctx<'_>, tag: &str) {
        if let Some((c, q)) = self.consumers.remove(tag) {
            let now_unused = q.remove_consumer(c.connection, c.channel, &c.tag);
            if now_unused && q.auto_delete {
                let _ = ctx.broker.delete_queue(ctx.vhost, &q.name, false, false);
            }
        }
    }

    /// The queue deleted a consumer of ours: tell the client.
    pub(crate) fn server_cancel(&mut self, ctx: &mut Ctx<'_>, tag: &str, notify: bool) {
        if self.consumers.remove(tag).is_some() && notify {
            self.send(
                ctx,
                AMQPClass::Basic(basic::AMQPMethod::Cancel(basic::Cancel {
                    consumer_tag: tag.into(),
                    nowait: true,
                })),
            );
        }
    }

    /// The client resumed the channel: send what was held, in order, then
    /// let the queues dispatch again.
    fn resume(&mut self, ctx: &mut Ctx<'_>) {
        for (queue, consumer, entry) in std::mem::take(&mut self.held) {
            // Their window credit comes back now rather than when written:
            // at most one window per consumer, once.
            let _ = self.deliver(ctx, queue, consumer.clone(), entry);
            consumer.written();
        }
        for (_, q) in self.consumers.values() {
            q.dispatch();
        }
    }

    /// Write a delivery from a queue (or hold it while the channel is
    /// paused).
    pub(crate) fn deliver(
        &mut self,
        ctx: &mut Ctx<'_>,
        queue: Arc<Queue>,
        consumer: Arc<Consumer>,
        entry: Entry,
    ) -> Delivery {
        let ours = self
            .consumers
            .get(&consumer.tag)
            .is_some_and(|(c, _)| Arc::ptr_eq(c, &consumer));
        if !ours || self.closing {
            consumer.settled();
            queue.put_back(std::iter::once(entry));
            return Delivery::Returned;
        }
        if self.credit.paused.load(Ordering::Relaxed) {
            self.held.push_back((queue, consumer, entry));
            return Delivery::Held;
        }
        let m = match queue.message(&entry) {
            Ok(m) => m,
            Err(e) => {
                // Left in the log: recovery reports it with file and offset.
                tracing::error!(queue = %queue.name, "reading a stored message failed; not delivered: {e}");
                consumer.settled();
                return Delivery::Returned;
            }
        };
        if entry.redelivered {
            queue.redelivered.fetch_add(1, Ordering::Relaxed);
        }
        self.next_tag += 1;
        let tag = self.next_tag;
        encode_deliver(
            ctx.out,
            self.id,
            &consumer.tag,
            tag,
            entry.redelivered,
            &m.exchange,
            &m.routing_key,
        );
        encode_content(
            ctx.out,
            self.id,
            m.encoded_properties(),
            &m.body,
            ctx.frame_max,
        );
        if consumer.no_ack {
            queue.forget([&entry]);
        } else {
            self.unacked.push_back((
                tag,
                Unacked {
                    queue,
                    entry,
                    consumer: Some(consumer),
                },
            ));
        }
        Delivery::Written
    }

    /// The channel is closing (either side) or its connection is: cancel
    /// consumers, requeue unacked deliveries in order.
    pub(crate) fn shutdown(&mut self, ctx: &Ctx<'_>) {
        self.pending = None;
        let tags: Vec<String> = self.consumers.keys().cloned().collect();
        for tag in tags {
            self.cancel_consumer(ctx, &tag);
        }
        // Held deliveries were dispatched after the unacked ones: they go
        // back first, so the unacked end up in front of them.
        let mut by_queue: Vec<(Arc<Queue>, Vec<Entry>)> = Vec::new();
        for (queue, consumer, entry) in self.held.drain(..) {
            consumer.settled();
            consumer.written();
            group_by_queue(&mut by_queue, &queue, entry);
        }
        for (queue, entries) in by_queue {
            queue.put_back(entries.into_iter());
        }
        self.requeue_all();
    }
}

/// Add `entry` to `queue`'s group, keeping the order entries came in, so
/// each queue is then called once for all of its entries.
fn group_by_queue(groups: &mut Vec<(Arc<Queue>, Vec<Entry>)>, queue: &Arc<Queue>, entry: Entry) {
    match groups.iter_mut().find(|(q, _)| Arc::ptr_eq(q, queue)) {
        Some((_, entries)) => entries.push(entry),
        None => groups.push((queue.clone(), vec![entry])),
    }
}

fn server_name(prefix: &str) -> String {
    use std::sync::atomic::AtomicU64;
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    format!(
        "{prefix}-{:x}{:06x}",
        t ^ (n.wrapping_mul(0x9e37_79b9_7f4a_7c15)),
        n & 0xff_ffff
    )
}
