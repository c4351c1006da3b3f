//! Exchange and queue methods: declare (with RabbitMQ's equivalence
//! checks), bind, unbind, purge and delete, each checked against the
//! user's permissions.

use super::replicated::{Reply, binding};
use super::*;
use crate::broker::QueueDecl;
use crate::cluster::Command;

impl Channel {
    pub(super) fn queue_name(&self, name: &ShortString) -> Result<String, AmqpError> {
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

    pub(super) fn check_access(ctx: &Ctx<'_>, q: &Queue) -> Result<(), AmqpError> {
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
    pub(super) fn queue(
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

    pub(super) fn exchange_method(
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
                if !d.passive && Self::replicated(ctx) {
                    let command = Self::exchange_command(ctx, d);
                    self.propose(ctx, command, Reply::ExchangeDeclare, d.nowait, (40, 10));
                    return Ok(());
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
                if Self::replicated(ctx) {
                    if d.exchange.as_str().is_empty() || d.exchange.as_str().starts_with("amq.") {
                        return Err(BrokerError::AccessRefused(format!(
                            "cannot delete predeclared exchange '{}'",
                            d.exchange
                        ))
                        .into());
                    }
                    let command = Command::DeleteExchange {
                        vhost: ctx.vhost.name.clone(),
                        name: d.exchange.to_string(),
                        if_unused: d.if_unused,
                    };
                    self.propose(ctx, command, Reply::ExchangeDelete, d.nowait, (40, 20));
                    return Ok(());
                }
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
                if Self::replicated(ctx) {
                    let command = Command::Bind {
                        vhost: ctx.vhost.name.clone(),
                        binding: binding(
                            b.source.as_str(),
                            b.destination.as_str(),
                            true,
                            b.routing_key.as_str(),
                            &b.arguments,
                        ),
                    };
                    self.propose(ctx, command, Reply::ExchangeBind, b.nowait, (40, 30));
                    return Ok(());
                }
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
                if Self::replicated(ctx) {
                    let command = Command::Unbind {
                        vhost: ctx.vhost.name.clone(),
                        binding: binding(
                            u.source.as_str(),
                            u.destination.as_str(),
                            true,
                            u.routing_key.as_str(),
                            &u.arguments,
                        ),
                    };
                    self.propose(ctx, command, Reply::ExchangeUnbind, u.nowait, (40, 40));
                    return Ok(());
                }
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

    pub(super) fn queue_method(
        &mut self,
        ctx: &mut Ctx<'_>,
        m: &queue::AMQPMethod,
    ) -> Result<(), AmqpError> {
        use queue::AMQPMethod as M;
        match m {
            M::Declare(d) => {
                if crate::amqp::PANIC_ON_DECLARE
                    .get()
                    .is_some_and(|n| n == d.queue.as_str())
                {
                    panic!("queue.declare of the panic trigger '{}'", d.queue);
                }
                let q = if d.passive {
                    let name = self.queue_name(&d.queue)?;
                    if ctx.vhost.remote_node(&name).is_some() {
                        // It exists, on another node, which keeps its
                        // counts: the answer says it exists (a replicated
                        // stream's replica here has them too).
                        self.last_queue = name.clone();
                        let (messages, consumers) = ctx
                            .vhost
                            .stream_replica(&name)
                            .map(|q| (q.len() as u32, q.consumer_count() as u32))
                            .unwrap_or((0, 0));
                        if !d.nowait {
                            self.send(
                                ctx,
                                AMQPClass::Queue(M::DeclareOk(queue::DeclareOk {
                                    queue: name.as_str().into(),
                                    message_count: messages,
                                    consumer_count: consumers,
                                })),
                            );
                        }
                        return Ok(());
                    }
                    let q = ctx.vhost.queue(&name)?;
                    Self::check_access(ctx, &q)?;
                    q.touch();
                    q
                } else {
                    let name = if d.queue.as_str().is_empty() {
                        crate::broker::server_name("amq.gen")
                    } else {
                        d.queue.to_string()
                    };
                    ctx.grant.check(Access::Configure, "queue", &name)?;
                    if let Some(dlx) = exchange_arg(&d.arguments, ARG_DEAD_LETTER_EXCHANGE) {
                        ctx.grant.check(Access::Read, "queue", &name)?;
                        ctx.grant.check(Access::Write, "exchange", &dlx)?;
                    }
                    let owner = d.exclusive.then_some(ctx.connection);
                    if owner.is_none() && Self::replicated(ctx) {
                        crate::broker::check_short("queue name", &name)?;
                        let (local, exists) = ctx.vhost.queue_count_with(&name);
                        ctx.broker
                            .check_queue_limit(ctx.vhost, &name, local, exists)?;
                        if name.starts_with("amq.") && !name.starts_with("amq.gen-") {
                            return Err(BrokerError::AccessRefused(format!(
                                "queue name '{name}' contains reserved prefix 'amq.*'"
                            ))
                            .into());
                        }
                        self.last_queue = name.clone();
                        let command = Self::queue_command(ctx, &name, d);
                        self.propose(ctx, command, Reply::QueueDeclare(name), d.nowait, (50, 10));
                        return Ok(());
                    }
                    let q = ctx.broker.declare_queue(
                        ctx.vhost,
                        QueueDecl {
                            name: name.to_string(),
                            durable: d.durable,
                            owner,
                            auto_delete: d.auto_delete,
                            arguments: d.arguments.clone(),
                        },
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
                let name = self.queue_name(&b.queue)?;
                if Self::replicated_queue(ctx, &name) {
                    ctx.grant.check(Access::Write, "queue", &name)?;
                    ctx.grant
                        .check(Access::Read, "exchange", b.exchange.as_str())?;
                    let command = Command::Bind {
                        vhost: ctx.vhost.name.clone(),
                        binding: binding(
                            b.exchange.as_str(),
                            &name,
                            false,
                            b.routing_key.as_str(),
                            &b.arguments,
                        ),
                    };
                    self.propose(ctx, command, Reply::QueueBind, b.nowait, (50, 20));
                    return Ok(());
                }
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
                let name = self.queue_name(&u.queue)?;
                if Self::replicated_queue(ctx, &name) {
                    ctx.grant.check(Access::Write, "queue", &name)?;
                    ctx.grant
                        .check(Access::Read, "exchange", u.exchange.as_str())?;
                    let command = Command::Unbind {
                        vhost: ctx.vhost.name.clone(),
                        binding: binding(
                            u.exchange.as_str(),
                            &name,
                            false,
                            u.routing_key.as_str(),
                            &u.arguments,
                        ),
                    };
                    self.propose(ctx, command, Reply::QueueUnbind, false, (50, 50));
                    return Ok(());
                }
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
                if let Some(node) = self.remote_home(ctx, &p.queue, Access::Read)? {
                    return self.purge_remote(ctx, p, node);
                }
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
                let name = self.queue_name(&d.queue)?;
                if Self::replicated_queue(ctx, &name) && ctx.vhost.queue_exists(&name) {
                    ctx.grant.check(Access::Configure, "queue", &name)?;
                    match ctx.vhost.queue(&name) {
                        // Its node checks the conditions; applying does not
                        // (it must not depend on one node's consumers).
                        Ok(q) => {
                            if d.if_unused && q.consumer_count() > 0 {
                                return Err(BrokerError::PreconditionFailed(format!(
                                    "queue '{name}' in vhost '{}' in use",
                                    ctx.vhost.name
                                ))
                                .into());
                            }
                            if d.if_empty && !q.is_empty() {
                                return Err(BrokerError::PreconditionFailed(format!(
                                    "queue '{name}' in vhost '{}' not empty",
                                    ctx.vhost.name
                                ))
                                .into());
                            }
                        }
                        Err(e) if d.if_unused || d.if_empty => return Err(e.into()),
                        Err(_) => {}
                    }
                    let command = Command::DeleteQueue {
                        vhost: ctx.vhost.name.clone(),
                        name,
                        if_unused: d.if_unused,
                        if_empty: d.if_empty,
                    };
                    self.propose(ctx, command, Reply::QueueDelete, d.nowait, (50, 40));
                    return Ok(());
                }
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
}
