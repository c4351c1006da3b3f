//! Consuming from a stream queue: RabbitMQ's rules for stream consumers
//! (manual acks, a prefetch, no exclusivity, no `basic.get`) checked with
//! its reply codes and texts, then a cursor added at the offset the
//! consumer asked for.

use super::*;
use crate::broker::stream::StreamConsume;

impl Channel {
    /// This node's replica of the replicated stream the client names, if
    /// it holds one (and the user may read it): read here, whichever node
    /// leads the stream.
    pub(super) fn stream_replica(
        &self,
        ctx: &Ctx<'_>,
        name: &ShortString,
    ) -> Result<Option<Arc<Queue>>, AmqpError> {
        if ctx.broker.cluster().is_none() {
            return Ok(None);
        }
        let name = self.queue_name(name)?;
        let Some(q) = ctx.vhost.stream_replica(&name) else {
            return Ok(None);
        };
        ctx.grant.check(Access::Read, "queue", &name)?;
        Ok(Some(q))
    }

    /// `basic.consume` on the stream queue `q`.
    pub(super) fn consume_stream(
        &mut self,
        ctx: &mut Ctx<'_>,
        c: &basic::Consume,
        q: Arc<Queue>,
    ) -> Result<(), AmqpError> {
        let stream = q.stream().expect("a stream queue").clone();
        let rs = format!("queue '{}' in vhost '{}'", q.name, ctx.vhost.name);
        let wants = self.check_stream_consume(ctx, c, &q.name)?;
        let plugin = match &wants.plugin {
            None => None,
            Some(name) => Some(
                ctx.broker
                    .stream_filter(&q.name, name, &c.arguments)
                    .map_err(AmqpError::from)?,
            ),
        };
        let tag = self.consumer_tag(ctx, c)?;
        let mut consumer = self.new_consumer(ctx, &tag, false, false, self.prefetch, &q);
        // A stream takes nothing back, so a delivery left unacknowledged
        // has nothing to requeue: no consumer timeout.
        if let Some(c) = Arc::get_mut(&mut consumer) {
            c.timeout = None;
        }
        let before = ctx.out.len();
        if !c.nowait {
            self.send(
                ctx,
                AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(basic::ConsumeOk {
                    consumer_tag: tag.as_str().into(),
                })),
            );
        }
        if let Err(why) = stream.add(&q, consumer.clone(), wants, plugin) {
            ctx.out.truncate(before);
            return Err(AmqpError::new(
                406,
                format!("PRECONDITION_FAILED - {why}: {rs}"),
            ));
        }
        self.consumers.insert(tag, (consumer, q));
        Ok(())
    }

    /// RabbitMQ's rules for a stream consumer (manual acks, a prefetch, no
    /// exclusivity) and its arguments, checked where the client is,
    /// whichever node's replica it reads.
    pub(super) fn check_stream_consume(
        &self,
        ctx: &Ctx<'_>,
        c: &basic::Consume,
        name: &str,
    ) -> Result<StreamConsume, AmqpError> {
        let rs = format!("queue '{name}' in vhost '{}'", ctx.vhost.name);
        if c.no_ack {
            return Err(AmqpError::new(
                540,
                format!(
                    "NOT_IMPLEMENTED - automatic acknowledgement not supported by stream queues {rs}"
                ),
            ));
        }
        if c.exclusive {
            return Err(AmqpError::new(
                540,
                format!("NOT_IMPLEMENTED - exclusive consume not supported by stream queues {rs}"),
            ));
        }
        if self.prefetch == 0 && self.credit.limit.load(Ordering::Relaxed) == 0 {
            return Err(AmqpError::new(
                406,
                format!(
                    "PRECONDITION_FAILED - consumer prefetch count is not set for stream queues {rs}"
                ),
            ));
        }
        StreamConsume::parse(&c.arguments)
            .map_err(|e| AmqpError::new(406, format!("PRECONDITION_FAILED - {e} for {rs}")))
    }

    /// `basic.get` on a stream queue, refused as RabbitMQ refuses it.
    pub(super) fn get_from_stream(ctx: &Ctx<'_>, name: &str) -> AmqpError {
        AmqpError::new(
            540,
            format!(
                "NOT_IMPLEMENTED - basic.get not supported by stream queues queue '{name}' in vhost '{}'",
                ctx.vhost.name
            ),
        )
    }
}
