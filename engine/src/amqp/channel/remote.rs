//! A channel's side of queues on other nodes: publishes forwarded there
//! (their confirms wait for the node's answer), consumers of those queues
//! (deliveries come in with the node's ids and get this channel's tags),
//! and what a lost link to a node means for both.

use super::*;
use crate::broker::Forward;
use crate::cluster::link::Link;
use crate::nodes::remote::{Origin, QueueAnswer, Settlement, Traffic, forward_frame};

impl Channel {
    /// The node a queue the client names lives on, if it is another one
    /// (and the user may `access` it).
    pub(super) fn remote_home(
        &self,
        ctx: &Ctx<'_>,
        name: &ShortString,
        access: Access,
    ) -> Result<Option<String>, AmqpError> {
        if ctx.broker.remote().is_none() {
            return Ok(None);
        }
        let name = self.queue_name(name)?;
        let node = ctx.vhost.remote_node(&name);
        if node.is_some() {
            ctx.grant.check(access, "queue", &name)?;
        }
        Ok(node)
    }

    /// `basic.consume` of a queue on `node`: the consumer is made there.
    /// consume-ok goes out now; if the node refuses (an exclusive
    /// consumer holds the queue), the channel is closed with its reason
    /// when the answer comes.
    pub(super) fn consume_remote(
        &mut self,
        ctx: &mut Ctx<'_>,
        c: &basic::Consume,
        node: String,
    ) -> Result<(), AmqpError> {
        let queue = self.queue_name(&c.queue)?;
        let stream = ctx.broker.is_stream(ctx.vhost, &queue);
        if stream {
            // This node holds no replica (`x-initial-cluster-size` placed
            // the stream elsewhere): the consumer reads the leader's, its
            // arguments checked here first, as a local one's are.
            self.check_stream_consume(ctx, c, &queue)?;
        }
        let tag = self.consumer_tag(ctx, c)?;
        if !c.nowait {
            self.send(
                ctx,
                AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(basic::ConsumeOk {
                    consumer_tag: tag.as_str().into(),
                })),
            );
        }
        if !stream && ctx.broker.is_quorum(ctx.vhost, &queue) {
            self.follow(&tag, &queue, c);
        }
        // A stream takes nothing back: no consumer timeout.
        let timeout = (!c.no_ack && !stream)
            .then(|| ctx.consumer_timeout(ctx.broker.consumer_timeout_of(ctx.vhost, &queue)))
            .flatten();
        ctx.to_nodes.push(ToNode {
            node: node.clone(),
            frame: Traffic::Consume {
                origin: self.origin(ctx),
                tag: tag.clone(),
                vhost: ctx.vhost.name.clone(),
                queue,
                prefetch: self.prefetch,
                no_ack: c.no_ack,
                exclusive: c.exclusive,
                arguments: if stream {
                    crate::message::encode_table_body(&c.arguments).into()
                } else {
                    bytes::Bytes::new()
                },
            }
            .encode(),
            undo: Undo::Consumer(self.id, tag.clone()),
        });
        self.remote_consumers.insert(
            tag,
            RemoteConsumer {
                node,
                no_ack: c.no_ack,
                timeout,
            },
        );
        Ok(())
    }

    /// `basic.get` of a queue on `node`: asked there; the channel's later
    /// frames wait for the answer (AMQP answers a channel's methods in
    /// order).
    pub(super) fn get_remote(
        &mut self,
        ctx: &mut Ctx<'_>,
        g: &basic::Get,
        node: String,
    ) -> Result<(), AmqpError> {
        let queue = self.queue_name(&g.queue)?;
        if ctx.broker.is_stream(ctx.vhost, &queue) {
            return Err(Self::get_from_stream(ctx, &queue));
        }
        ctx.to_nodes.push(ToNode {
            node: node.clone(),
            frame: Traffic::Get {
                origin: self.origin(ctx),
                vhost: ctx.vhost.name.clone(),
                queue,
                no_ack: g.no_ack,
            }
            .encode(),
            undo: Undo::Answer(self.id),
        });
        self.asked = Some((node, Asked::Get { no_ack: g.no_ack }));
        *ctx.hold = true;
        Ok(())
    }

    /// `queue.purge` of a queue on `node`: run there, the channel waiting
    /// for the count.
    pub(super) fn purge_remote(
        &mut self,
        ctx: &mut Ctx<'_>,
        p: &queue::Purge,
        node: String,
    ) -> Result<(), AmqpError> {
        let queue = self.queue_name(&p.queue)?;
        ctx.to_nodes.push(ToNode {
            node: node.clone(),
            frame: Traffic::Purge {
                origin: self.origin(ctx),
                vhost: ctx.vhost.name.clone(),
                queue,
            }
            .encode(),
            undo: Undo::Answer(self.id),
        });
        self.asked = Some((node, Asked::Purge { nowait: p.nowait }));
        *ctx.hold = true;
        Ok(())
    }

    /// The answer to this channel's remote `basic.get` or `queue.purge`.
    pub(crate) fn answered(
        &mut self,
        ctx: &mut Ctx<'_>,
        link: Option<&Arc<Link>>,
        outcome: QueueAnswer,
    ) -> Result<(), AmqpError> {
        let Some((_, asked)) = self.asked.take() else {
            return Ok(());
        };
        let no_ack = match asked {
            Asked::Get { no_ack } => no_ack,
            Asked::Purge { nowait } => {
                return match outcome {
                    QueueAnswer::Purged { message_count } => {
                        if !nowait {
                            self.send(
                                ctx,
                                AMQPClass::Queue(queue::AMQPMethod::PurgeOk(queue::PurgeOk {
                                    message_count,
                                })),
                            );
                        }
                        Ok(())
                    }
                    QueueAnswer::Error { code, text } => {
                        let mut e = AmqpError::new(code, text);
                        (e.class_id, e.method_id) = (50, 30);
                        Err(e)
                    }
                    _ => Ok(()),
                };
            }
        };
        match outcome {
            // A purge's answer, or a peek's (RESP connections ask those).
            QueueAnswer::Purged { .. } | QueueAnswer::Peeked { .. } => {}
            QueueAnswer::Empty => {
                self.send(
                    ctx,
                    AMQPClass::Basic(basic::AMQPMethod::GetEmpty(basic::GetEmpty {})),
                );
            }
            QueueAnswer::Error { code, text } => {
                let mut e = AmqpError::new(code, text);
                (e.class_id, e.method_id) = (60, 70);
                return Err(e);
            }
            QueueAnswer::Message {
                id,
                redelivered,
                exchange,
                routing_key,
                message_count,
                properties,
                body,
            } => {
                self.next_tag += 1;
                let tag = self.next_tag;
                self.send(
                    ctx,
                    AMQPClass::Basic(basic::AMQPMethod::GetOk(basic::GetOk {
                        delivery_tag: tag,
                        redelivered,
                        exchange: exchange.as_str().into(),
                        routing_key: routing_key.as_str().into(),
                        message_count,
                    })),
                );
                encode_content(ctx.out, self.id, &properties, &body, ctx.frame_max);
                if !no_ack && let Some(link) = link {
                    let deadline = ctx.deadline(ctx.consumer_timeout(None));
                    self.unacked.push_back((
                        tag,
                        Unacked::Remote {
                            link: link.clone(),
                            id,
                        },
                        deadline,
                    ));
                }
            }
        }
        Ok(())
    }

    /// The error a `basic.get` gets when its queue's node cannot answer.
    pub(crate) fn node_down(node: &str) -> QueueAnswer {
        QueueAnswer::Error {
            code: 404,
            text: format!("NOT_FOUND - home node '{node}' of the queue is down or inaccessible"),
        }
    }

    fn origin(&self, ctx: &Ctx<'_>) -> Origin {
        Origin {
            conn: ctx.connection,
            channel: self.id,
        }
    }

    /// Cancel a consumer of a queue on another node (the client asked, or
    /// the channel is closing). Its unacked deliveries stay settleable.
    pub(super) fn cancel_remote(&mut self, ctx: &mut Ctx<'_>, tag: &str) -> bool {
        let Some(rc) = self.remote_consumers.remove(tag) else {
            return false;
        };
        ctx.to_nodes.push(ToNode {
            node: rc.node,
            frame: Traffic::Cancel {
                origin: self.origin(ctx),
                tag: tag.to_owned(),
            }
            .encode(),
            undo: Undo::Nothing,
        });
        true
    }

    /// Send the copies a publish routed to other nodes; with `seq` (a
    /// confirm tag) its confirm waits for every node's answer, and for
    /// `replicating` commits of quorum queues led here.
    pub(super) fn forward(
        &mut self,
        ctx: &mut Ctx<'_>,
        forwards: Vec<Forward>,
        seq: u64,
        replicating: u32,
    ) {
        let origin = self.origin(ctx);
        let mut nodes = Vec::new();
        for f in &forwards {
            ctx.to_nodes.push(ToNode {
                node: f.node.clone(),
                frame: forward_frame(ctx.vhost, origin, seq, f),
                undo: if seq == 0 {
                    Undo::Nothing
                } else {
                    Undo::Confirm(self.id, seq)
                },
            });
            nodes.push(f.node.clone());
        }
        if seq != 0 {
            self.forwarded.insert(
                seq,
                Forwarded {
                    outstanding: nodes.len() as u32 + replicating,
                    ok: true,
                    nodes,
                },
            );
        }
    }

    /// A node answered for a forwarded publish.
    pub(crate) fn remote_confirmed(&mut self, seq: u64, ok: bool) {
        if let Some(w) = self.forwarded.get_mut(&seq) {
            w.outstanding = w.outstanding.saturating_sub(1);
            w.ok &= ok;
        }
    }

    /// Whether a confirm tag still waits for another node, and if not,
    /// whether every node took its copy.
    pub(super) fn forwarded_outcome(&mut self, tag: u64) -> Option<bool> {
        match self.forwarded.get(&tag) {
            None => Some(true),
            Some(w) if w.outstanding > 0 => None,
            Some(w) => {
                let ok = w.ok;
                self.forwarded.remove(&tag);
                Some(ok)
            }
        }
    }

    /// A delivery from a queue on another node. Returns false if no
    /// consumer of this channel takes it (it goes back to its queue).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn deliver_remote(
        &mut self,
        ctx: &mut Ctx<'_>,
        link: &Arc<Link>,
        tag: &str,
        id: u64,
        redelivered: bool,
        exchange: &str,
        routing_key: &str,
        properties: &Bytes,
        body: &Bytes,
    ) -> bool {
        // A consumer that moved (its quorum queue's leader changed) takes
        // nothing more from the node it left.
        let Some((no_ack, timeout)) = self
            .remote_consumers
            .get(tag)
            .filter(|c| c.node == link.peer)
            .map(|c| (c.no_ack, c.timeout))
        else {
            return false;
        };
        if self.closing {
            return false;
        }
        self.next_tag += 1;
        let delivery_tag = self.next_tag;
        encode_deliver(
            ctx.out,
            self.id,
            tag,
            delivery_tag,
            redelivered,
            exchange,
            routing_key,
        );
        encode_content(ctx.out, self.id, properties, body, ctx.frame_max);
        if !no_ack {
            let deadline = ctx.deadline(timeout);
            self.unacked.push_back((
                delivery_tag,
                Unacked::Remote {
                    link: link.clone(),
                    id,
                },
                deadline,
            ));
        }
        true
    }

    /// The node cancelled a consumer (its queue was deleted), or refused
    /// it (`code` is then the reason).
    ///
    /// `node` is where the refusal comes from: a consumer that has moved
    /// to another node since (its quorum queue's leader changed) is a
    /// newer subscription, which a late word about the old one must not
    /// end.
    pub(crate) fn remote_refused(
        &mut self,
        ctx: &mut Ctx<'_>,
        node: &str,
        tag: &str,
        code: u16,
        text: String,
        notify: bool,
    ) -> Result<(), AmqpError> {
        if self
            .remote_consumers
            .get(tag)
            .is_none_or(|c| c.node != node)
        {
            return Ok(());
        }
        self.remote_consumers.remove(tag);
        tracing::debug!(node, tag = %crate::untrusted::text(tag), code, "a consumer at another node ended");
        if code != 403 && self.keeps_following(ctx, tag) {
            // Its quorum queue's leader moved or its node is lost: it
            // re-subscribes when the new leader is known.
            return Ok(());
        }
        self.quorum_subs.remove(tag);
        if code != 0 {
            return Err(AmqpError::new(code, text));
        }
        if notify {
            self.send(
                ctx,
                AMQPClass::Basic(basic::AMQPMethod::Cancel(basic::Cancel {
                    consumer_tag: tag.into(),
                    nowait: true,
                })),
            );
        }
        Ok(())
    }

    /// The link to `node` closed: its queues requeued what this channel
    /// had unacked from them and dropped its consumers there; confirms
    /// waiting for it are nacks.
    pub(crate) fn node_lost(&mut self, ctx: &mut Ctx<'_>, node: &str, notify: bool) {
        for w in self.forwarded.values_mut() {
            if w.outstanding > 0 && w.nodes.iter().any(|n| n == node) {
                w.outstanding = 0;
                w.ok = false;
            }
        }
        let lost: Vec<String> = self
            .remote_consumers
            .iter()
            .filter(|(_, c)| c.node == node)
            .map(|(t, _)| t.clone())
            .collect();
        for tag in lost {
            let _ = self.remote_refused(ctx, node, &tag, 0, String::new(), notify);
        }
    }

    /// The frame that never reached its node: undo what it promised.
    pub(crate) fn unreached(&mut self, ctx: &mut Ctx<'_>, node: &str, undo: &Undo, notify: bool) {
        match undo {
            Undo::Nothing => {}
            Undo::Confirm(_, seq) => self.remote_confirmed(*seq, false),
            Undo::Consumer(_, tag) => {
                let _ = self.remote_refused(ctx, node, tag, 0, String::new(), notify);
            }
            // Answered by the connection, which also releases the channel.
            Undo::Answer(_) => {}
        }
    }
}

/// Settle deliveries from other nodes: one frame per link.
pub(super) fn settle_remote(remote: Vec<(Arc<Link>, u64)>, requeue: Option<bool>) {
    if remote.is_empty() {
        return;
    }
    let how = match requeue {
        None => Settlement::Ack,
        Some(true) => Settlement::Requeue,
        Some(false) => Settlement::Reject,
    };
    let mut by_link: Vec<(Arc<Link>, Vec<u64>)> = Vec::new();
    for (link, id) in remote {
        match by_link.iter_mut().find(|(l, _)| Arc::ptr_eq(l, &link)) {
            Some((_, ids)) => ids.push(id),
            None => by_link.push((link, vec![id])),
        }
    }
    for (link, ids) in by_link {
        link.send_traffic(Traffic::Settle { how, ids }.encode());
    }
}
