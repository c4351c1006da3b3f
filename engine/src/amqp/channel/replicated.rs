//! Definition methods in a cluster: proposed, not applied.
//!
//! On a clustered node a declare, delete, bind or unbind of anything
//! shared is not run against the broker here: the channel checks the
//! user's permissions, turns the method into a [`Command`] and hands it to
//! its connection as a [`Proposal`]. The connection commits it through the
//! cluster, holds the channel's later frames meanwhile (AMQP answers a
//! channel's methods in order), and sends the `-ok`, or the refusal every
//! node reached, once this node has applied it. Exclusive queues live and
//! die with their connection, on its node, so they and their bindings stay
//! local.

use amq_protocol::protocol::{AMQPClass, exchange, queue};
use amq_protocol::types::FieldTable;

use super::{AmqpError, Channel, Ctx};
use crate::broker::BrokerError;
use crate::cluster::{Applied, ClusterError, Command};
use crate::store::definitions::{BindingDefinition, ExchangeDefinition, QueueDefinition};

/// The `-ok` a proposal answers with.
#[derive(Debug)]
pub(crate) enum Reply {
    ExchangeDeclare,
    ExchangeDelete,
    ExchangeBind,
    ExchangeUnbind,
    /// The queue's name (server-named queues get theirs before proposing).
    QueueDeclare(String),
    QueueBind,
    QueueUnbind,
    QueueDelete,
}

/// A definition change waiting to be committed for a channel.
#[derive(Debug)]
pub(crate) struct Proposal {
    /// The channel that asked.
    pub channel: u16,
    /// The change.
    pub command: Command,
    /// What to answer with.
    pub reply: Reply,
    /// The client asked for no answer.
    pub nowait: bool,
    /// The method, for the error's class and method ids.
    pub class_method: (u16, u16),
}

impl Proposal {
    /// The frame to send once applied, or the channel error to close with.
    pub(crate) fn outcome(
        &self,
        ctx: &Ctx<'_>,
        applied: Result<Applied, ClusterError>,
    ) -> Result<Option<AMQPClass>, AmqpError> {
        let with_ids = |mut e: AmqpError| {
            (e.class_id, e.method_id) = self.class_method;
            e
        };
        let removed = match applied {
            Ok(Applied::Done) => 0,
            Ok(Applied::Removed(n)) => n,
            Ok(Applied::Refused { code, text }) => {
                return Err(with_ids(AmqpError::new(code, text)));
            }
            Err(e) => {
                return Err(with_ids(AmqpError::from(BrokerError::Cluster(
                    e.to_string(),
                ))));
            }
        };
        if self.nowait {
            return Ok(None);
        }
        Ok(Some(match &self.reply {
            Reply::ExchangeDeclare => {
                AMQPClass::Exchange(exchange::AMQPMethod::DeclareOk(exchange::DeclareOk {}))
            }
            Reply::ExchangeDelete => {
                AMQPClass::Exchange(exchange::AMQPMethod::DeleteOk(exchange::DeleteOk {}))
            }
            Reply::ExchangeBind => {
                AMQPClass::Exchange(exchange::AMQPMethod::BindOk(exchange::BindOk {}))
            }
            Reply::ExchangeUnbind => {
                AMQPClass::Exchange(exchange::AMQPMethod::UnbindOk(exchange::UnbindOk {}))
            }
            Reply::QueueDeclare(name) => {
                // A replicated stream's counts are its replica's here,
                // whichever node leads it.
                let (messages, consumers) = ctx
                    .vhost
                    .queue(name)
                    .ok()
                    .or_else(|| ctx.vhost.stream_replica(name))
                    .map(|q| (q.len() as u32, q.consumer_count() as u32))
                    .unwrap_or((0, 0));
                AMQPClass::Queue(queue::AMQPMethod::DeclareOk(queue::DeclareOk {
                    queue: name.as_str().into(),
                    message_count: messages,
                    consumer_count: consumers,
                }))
            }
            Reply::QueueBind => AMQPClass::Queue(queue::AMQPMethod::BindOk(queue::BindOk {})),
            Reply::QueueUnbind => AMQPClass::Queue(queue::AMQPMethod::UnbindOk(queue::UnbindOk {})),
            Reply::QueueDelete => AMQPClass::Queue(queue::AMQPMethod::DeleteOk(queue::DeleteOk {
                message_count: removed,
            })),
        }))
    }
}

/// The binding a bind or unbind names.
pub(super) fn binding(
    source: &str,
    destination: &str,
    to_exchange: bool,
    key: &str,
    arguments: &FieldTable,
) -> BindingDefinition {
    BindingDefinition {
        source: source.to_owned(),
        destination: destination.to_owned(),
        destination_type: if to_exchange { "exchange" } else { "queue" }.into(),
        routing_key: key.to_owned(),
        arguments: arguments.clone(),
    }
}

impl Channel {
    /// Whether definition changes go through the cluster.
    pub(super) fn replicated(ctx: &Ctx<'_>) -> bool {
        ctx.broker.cluster().is_some()
    }

    /// Whether `queue` is one the cluster knows (shared, here or on
    /// another node), as opposed to this connection's exclusive queue.
    pub(super) fn replicated_queue(ctx: &Ctx<'_>, queue: &str) -> bool {
        Self::replicated(ctx)
            && match ctx.vhost.queue(queue) {
                Ok(q) => q.owner.is_none(),
                Err(_) => true,
            }
    }

    /// Hand `command` to the connection to commit.
    pub(super) fn propose(
        &mut self,
        ctx: &mut Ctx<'_>,
        command: Command,
        reply: Reply,
        nowait: bool,
        class_method: (u16, u16),
    ) {
        *ctx.proposal = Some(Proposal {
            channel: self.id,
            command,
            reply,
            nowait,
            class_method,
        });
    }

    /// An `exchange.declare` as a command.
    pub(super) fn exchange_command(ctx: &Ctx<'_>, d: &exchange::Declare) -> Command {
        Command::DeclareExchange {
            vhost: ctx.vhost.name.clone(),
            exchange: ExchangeDefinition {
                name: d.exchange.to_string(),
                kind: d.kind.to_string(),
                auto_delete: d.auto_delete,
                internal: d.internal,
                arguments: d.arguments.clone(),
            },
            durable: d.durable,
        }
    }

    /// A `queue.declare` of a shared queue, living on this node (a quorum
    /// queue: on the members the broker places it on).
    pub(super) fn queue_command(ctx: &Ctx<'_>, name: &str, d: &queue::Declare) -> Command {
        let me = ctx
            .broker
            .cluster()
            .map(|c| c.name().to_owned())
            .unwrap_or_default();
        let (node, members) = match ctx.broker.place_quorum(&ctx.vhost.name, name, &d.arguments) {
            Some((leader, members)) => (leader, members),
            None => (me, Vec::new()),
        };
        Command::DeclareQueue {
            vhost: ctx.vhost.name.clone(),
            queue: QueueDefinition {
                name: name.to_owned(),
                auto_delete: d.auto_delete,
                arguments: d.arguments.clone(),
            },
            durable: d.durable,
            node,
            members,
        }
    }
}
