//! One AMQP channel: methods against the broker, content assembly,
//! consumers, unacked deliveries, confirms and transactions.
//!
//! The state lives here, with the frame dispatch; each group of methods has
//! a file:
//!
//! * `error`: [`AmqpError`], the reply code and text a failed method
//!   closes its channel (or connection) with.
//! * `publish`: content assembly, `basic.publish`, publisher confirms
//!   (released when the store's sync reaches them) and transactions.
//! * `declare`: exchange and queue declare, bind, unbind, purge, delete.
//! * `consume`: consume, get, deliver, ack/nack/reject (and their tag
//!   checks), recover, cancel, and channel.flow.
//! * `replicated`: in a cluster, definition methods become proposals the
//!   connection commits before it answers.

mod consume;
mod declare;
mod error;
mod publish;
mod quorum;
mod remote;
mod replicated;
mod stream;

pub(crate) use error::AmqpError;
use error::{exchange_arg, server_only, unexpected};
pub(crate) use replicated::Proposal;

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
    /// Set when a method became a definition change for the cluster to
    /// commit (the connection holds the channel until it is applied).
    pub proposal: &'a mut Option<Proposal>,
    /// Frames for other nodes (cluster traffic).
    pub to_nodes: &'a mut Vec<ToNode>,
    /// The channel waits for another node's answer (a remote
    /// `basic.get`): its later frames are held until it comes.
    pub hold: &'a mut bool,
    /// The time, read once per batch of frames (deliveries record their
    /// deadline from it without each reading the clock).
    pub now: &'a mut Option<std::time::Instant>,
    /// The earliest deadline of the connection's unacknowledged
    /// deliveries, as far as it knows (its timer is set to it).
    pub earliest: &'a mut Option<std::time::Instant>,
    /// `[amqp] consumer_timeout_ms` (`None`: no limit).
    pub default_consumer_timeout: Option<std::time::Duration>,
}

impl Ctx<'_> {
    /// A consumer's timeout: its queue's (`x-consumer-timeout` or a
    /// policy's), else the broker's default.
    pub fn consumer_timeout(
        &self,
        queue: Option<std::time::Duration>,
    ) -> Option<std::time::Duration> {
        queue.or(self.default_consumer_timeout)
    }

    /// The deadline of a delivery made now under `timeout`, noted as the
    /// connection's earliest if it is.
    pub fn deadline(&mut self, timeout: Option<std::time::Duration>) -> Option<Deadline> {
        let after = timeout?;
        let now = *self.now.get_or_insert_with(std::time::Instant::now);
        let at = now + after;
        if self.earliest.is_none_or(|e| at < e) {
            *self.earliest = Some(at);
        }
        Some(Deadline { at, after })
    }
}

struct Pending {
    publish: basic::Publish,
    header: Option<(BasicProperties, Bytes, u64)>,
    body: BytesMut,
    single: Option<Bytes>,
}

enum Unacked {
    /// From a queue of this node.
    Local {
        queue: Arc<Queue>,
        entry: Entry,
        consumer: Option<Arc<Consumer>>,
    },
    /// From a queue on another node: settled there, by its id.
    Remote {
        link: Arc<crate::cluster::link::Link>,
        id: u64,
    },
}

/// A consumer of a queue on another node.
pub(crate) struct RemoteConsumer {
    /// The queue's node.
    pub node: String,
    /// Acks not expected.
    pub no_ack: bool,
    /// Its consumer timeout (see [`crate::broker::Consumer::timeout`]),
    /// enforced here.
    pub timeout: Option<std::time::Duration>,
}

/// When a delivery must be acknowledged by (its consumer timeout).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Deadline {
    /// The moment.
    pub at: std::time::Instant,
    /// The timeout it came from, for the error's text.
    pub after: std::time::Duration,
}

/// What a channel asked another node, waiting for the answer.
pub(crate) enum Asked {
    /// `basic.get`.
    Get {
        /// Acks not expected.
        no_ack: bool,
    },
    /// `queue.purge`.
    Purge {
        /// No `purge-ok` wanted.
        nowait: bool,
    },
}

/// A publish whose confirm waits for other nodes to take their copies.
pub(crate) struct Forwarded {
    /// Nodes yet to answer.
    pub outstanding: u32,
    /// Every answer so far was yes.
    pub ok: bool,
    /// The nodes asked.
    pub nodes: Vec<String>,
}

/// A frame for another node, sent by the connection once the frames in
/// hand are handled (it may have to dial the node first).
pub(crate) struct ToNode {
    /// The node.
    pub node: String,
    /// The traffic frame.
    pub frame: Bytes,
    /// What to undo if the node cannot be reached.
    pub undo: Undo,
}

/// What a frame that never reached its node leaves to undo.
pub(crate) enum Undo {
    /// Nothing (a cancel, a dead letter).
    Nothing,
    /// Nack this channel's publish with this confirm tag.
    Confirm(u16, u64),
    /// Cancel this channel's consumer.
    Consumer(u16, String),
    /// Answer this channel's `basic.get` or `queue.purge` with an error.
    Answer(u16),
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
    remote_consumers: Map<String, RemoteConsumer>,
    /// Consumers of quorum queues, attached or waiting for the leader.
    quorum_subs: Map<String, quorum::QuorumSub>,
    /// Deliveries not settled yet, in tag order, each with the time it
    /// must be acknowledged by.
    unacked: VecDeque<(u64, Unacked, Option<Deadline>)>,
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
    /// Confirms that also wait for other nodes, by tag.
    forwarded: Map<u64, Forwarded>,
    /// A `basic.get` or `queue.purge` sent to another node, waiting for
    /// its answer: the node, and what was asked.
    pub(crate) asked: Option<(String, Asked)>,
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
pub(crate) enum Delivered {
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
            remote_consumers: Map::default(),
            quorum_subs: Map::default(),
            unacked: VecDeque::new(),
            next_tag: 0,
            prefetch: 0,
            credit: info.credit.clone(),
            info,
            confirm: false,
            publish_seq: 0,
            confirms: VecDeque::new(),
            forwarded: Map::default(),
            asked: None,
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
}
