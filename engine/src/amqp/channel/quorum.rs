//! A channel's consumers of quorum queues: they follow the queue's leader.
//!
//! A consumer of a classic queue ends with its queue's node (the client
//! gets `basic.cancel`). A quorum queue outlives any one node, so its
//! consumers do too, as in RabbitMQ: when the leader moves (or its node is
//! lost), the consumer is detached without a word to the client and
//! subscribed again, with the same tag, where the queue is served now. Its
//! deliveries from the old leader stay on the channel; settling them after
//! the move reaches nothing, and the new leader delivers those messages
//! again, marked redelivered.

use super::*;
use crate::nodes::remote::{Origin, Traffic};

/// A consumer of a quorum queue, as the client asked for it.
#[derive(Clone, Debug)]
pub(crate) struct QuorumSub {
    queue: String,
    no_ack: bool,
    exclusive: bool,
    prefetch: u32,
}

impl Channel {
    /// Remember that consumer `tag` is of quorum queue `queue`.
    pub(super) fn follow(&mut self, tag: &str, queue: &str, c: &basic::Consume) {
        self.quorum_subs.insert(
            tag.to_owned(),
            QuorumSub {
                queue: queue.to_owned(),
                no_ack: c.no_ack,
                exclusive: c.exclusive,
                prefetch: self.prefetch,
            },
        );
    }

    /// Whether consumer `tag` is of a quorum queue that still exists: it
    /// waits for the queue's leader instead of being cancelled.
    pub(super) fn keeps_following(&self, ctx: &Ctx<'_>, tag: &str) -> bool {
        self.quorum_subs
            .get(tag)
            .is_some_and(|s| ctx.vhost.queue_exists(&s.queue))
    }

    /// A consumer of this channel, for a queue here.
    pub(super) fn new_consumer(
        &self,
        ctx: &Ctx<'_>,
        tag: &str,
        no_ack: bool,
        exclusive: bool,
        prefetch: u32,
        queue: &Queue,
    ) -> Arc<Consumer> {
        Arc::new(Consumer {
            tag: tag.to_owned(),
            channel: self.id,
            connection: ctx.connection,
            no_ack,
            exclusive,
            prefetch,
            unacked: Default::default(),
            in_flight: Default::default(),
            channel_credit: self.credit.clone(),
            sink: ctx.dispatch.clone(),
            timeout: (!no_ack)
                .then(|| ctx.consumer_timeout(queue.limits().consumer_timeout))
                .flatten(),
        })
    }

    /// Whether a consumer of a quorum queue waits to be subscribed again.
    pub(crate) fn detached(&self) -> bool {
        self.quorum_subs
            .keys()
            .any(|t| !self.consumers.contains_key(t) && !self.remote_consumers.contains_key(t))
    }

    /// Subscribe again the consumers waiting for their queue's leader.
    pub(crate) fn rehome_detached(&mut self, ctx: &mut Ctx<'_>, notify: bool) {
        let mut queues: Vec<String> = self
            .quorum_subs
            .iter()
            .filter(|(t, _)| {
                !self.consumers.contains_key(*t) && !self.remote_consumers.contains_key(*t)
            })
            .map(|(_, s)| s.queue.clone())
            .collect();
        queues.sort();
        queues.dedup();
        for q in queues {
            self.rehome(ctx, &q, notify);
        }
    }

    /// Quorum queue `queue` moved (or went): its consumers on this channel
    /// subscribe where it is served now (or are cancelled).
    pub(crate) fn rehome(&mut self, ctx: &mut Ctx<'_>, queue: &str, notify: bool) {
        if self.closing {
            return;
        }
        let tags: Vec<(String, QuorumSub)> = self
            .quorum_subs
            .iter()
            .filter(|(_, s)| s.queue == queue)
            .map(|(t, s)| (t.clone(), s.clone()))
            .collect();
        for (tag, sub) in tags {
            if !ctx.vhost.queue_exists(queue) {
                self.quorum_subs.remove(&tag);
                self.consumers.remove(&tag);
                self.cancel_remote(ctx, &tag);
                if notify {
                    self.send(
                        ctx,
                        AMQPClass::Basic(basic::AMQPMethod::Cancel(basic::Cancel {
                            consumer_tag: tag.as_str().into(),
                            nowait: true,
                        })),
                    );
                }
                continue;
            }
            let local = ctx.vhost.queue(queue).ok();
            let node = ctx.vhost.remote_node(queue);
            let here = self
                .consumers
                .get(&tag)
                .is_some_and(|(_, q)| local.as_ref().is_some_and(|l| Arc::ptr_eq(l, q)));
            let there = self
                .remote_consumers
                .get(&tag)
                .is_some_and(|r| node.as_deref() == Some(r.node.as_str()));
            if here || there {
                continue;
            }
            if let Some((c, q)) = self.consumers.remove(&tag) {
                q.remove_consumer(c.connection, c.channel, &c.tag);
            }
            self.cancel_remote(ctx, &tag);
            tracing::debug!(queue = %crate::untrusted::text(queue), tag = %crate::untrusted::text(&tag), here = local.is_some(), node = ?node, "a quorum queue's consumer follows its leader");
            if let Some(q) = local {
                let consumer =
                    self.new_consumer(ctx, &tag, sub.no_ack, sub.exclusive, sub.prefetch, &q);
                if q.add_consumer(consumer.clone()).is_ok() {
                    self.consumers.insert(tag, (consumer, q));
                }
            } else if let Some(node) = node
                && node != ctx.broker.cluster().map_or("", |c| c.name())
            {
                ctx.to_nodes.push(ToNode {
                    node: node.clone(),
                    frame: Traffic::Consume {
                        origin: Origin {
                            conn: ctx.connection,
                            channel: self.id,
                        },
                        tag: tag.clone(),
                        vhost: ctx.vhost.name.clone(),
                        queue: queue.to_owned(),
                        prefetch: sub.prefetch,
                        no_ack: sub.no_ack,
                        exclusive: sub.exclusive,
                        arguments: bytes::Bytes::new(),
                    }
                    .encode(),
                    undo: Undo::Consumer(self.id, tag.clone()),
                });
                self.remote_consumers.insert(
                    tag,
                    RemoteConsumer {
                        node,
                        no_ack: sub.no_ack,
                        timeout: (!sub.no_ack)
                            .then(|| {
                                ctx.consumer_timeout(
                                    ctx.broker.consumer_timeout_of(ctx.vhost, queue),
                                )
                            })
                            .flatten(),
                    },
                );
            }
        }
    }
}
