//! Consuming: `basic.consume`, `basic.get`, deliveries from queues,
//! ack/nack/reject with their tag checks, recover, cancel and channel.flow.

use super::*;
use crate::broker::group_by_queue;

impl Channel {
    pub(super) fn basic_method(
        &mut self,
        ctx: &mut Ctx<'_>,
        m: &basic::AMQPMethod,
    ) -> Result<(), AmqpError> {
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
                if let Some(q) = self.stream_replica(ctx, &c.queue)? {
                    return self.consume_stream(ctx, c, q);
                }
                if let Some(node) = self.remote_home(ctx, &c.queue, Access::Read)? {
                    return self.consume_remote(ctx, c, node);
                }
                let q = self.queue(ctx, &c.queue, Access::Read)?;
                if q.stream().is_some() {
                    return self.consume_stream(ctx, c, q);
                }
                let tag = self.consumer_tag(ctx, c)?;
                let consumer =
                    self.new_consumer(ctx, &tag, c.no_ack, c.exclusive, self.prefetch, &q);
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
                if q.quorum && ctx.broker.cluster().is_some() {
                    self.follow(&tag, &q.name, c);
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
                if let Some(q) = self.stream_replica(ctx, &g.queue)? {
                    return Err(Self::get_from_stream(ctx, &q.name));
                }
                if let Some(node) = self.remote_home(ctx, &g.queue, Access::Read)? {
                    return self.get_remote(ctx, g, node);
                }
                let q = self.queue(ctx, &g.queue, Access::Read)?;
                if q.stream().is_some() {
                    return Err(Self::get_from_stream(ctx, &q.name));
                }
                match q.pop_readable() {
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
                            let deadline =
                                ctx.deadline(ctx.consumer_timeout(q.limits().consumer_timeout));
                            self.unacked.push_back((
                                tag,
                                Unacked::Local {
                                    queue: q,
                                    entry,
                                    consumer: None,
                                },
                                deadline,
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

    /// The tag of a new consumer: the client's, or one made up.
    pub(super) fn consumer_tag(
        &mut self,
        ctx: &Ctx<'_>,
        c: &basic::Consume,
    ) -> Result<String, AmqpError> {
        let tag = if c.consumer_tag.as_str().is_empty() {
            self.next_ctag += 1;
            format!("amq.ctag-{}-{}-{}", ctx.connection, self.id, self.next_ctag)
        } else {
            c.consumer_tag.to_string()
        };
        if self.consumers.contains_key(&tag)
            || self.remote_consumers.contains_key(&tag)
            || self.quorum_subs.contains_key(&tag)
        {
            return Err(AmqpError::new(
                530,
                format!("NOT_ALLOWED - attempt to reuse consumer tag '{tag}'"),
            ));
        }
        Ok(tag)
    }

    /// Settle now, or at commit in a transactional channel (the tag is
    /// checked now either way).
    pub(super) fn ack_or_defer(
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

    pub(super) fn unknown_tag(tag: u64) -> AmqpError {
        AmqpError::new(
            406,
            format!("PRECONDITION_FAILED - unknown delivery tag {tag}"),
        )
    }

    pub(super) fn check_tag(&self, tag: u64, multiple: bool) -> Result<(), AmqpError> {
        if (multiple && tag == 0)
            || self
                .unacked
                .binary_search_by_key(&tag, |(t, _, _)| *t)
                .is_ok()
        {
            return Ok(());
        }
        if multiple && self.unacked.front().is_some_and(|(t, _, _)| *t <= tag) {
            return Ok(());
        }
        Err(Self::unknown_tag(tag))
    }

    /// Ack (`requeue` None) or nack/reject deliveries up to `tag`.
    pub(super) fn settle(
        &mut self,
        tag: u64,
        multiple: bool,
        requeue: Option<bool>,
    ) -> Result<(), AmqpError> {
        let settled: Vec<Unacked> = if multiple {
            let upto = if tag == 0 { u64::MAX } else { tag };
            if tag != 0 && self.unacked.front().is_none_or(|(t, _, _)| *t > upto) {
                return Err(Self::unknown_tag(tag));
            }
            let mut v = Vec::new();
            while self.unacked.front().is_some_and(|(t, _, _)| *t <= upto) {
                v.push(self.unacked.pop_front().unwrap().1);
            }
            v
        } else {
            let at = self
                .unacked
                .binary_search_by_key(&tag, |(t, _, _)| *t)
                .map_err(|_| Self::unknown_tag(tag))?;
            vec![self.unacked.remove(at).unwrap().1]
        };
        let mut touched: Vec<Arc<Queue>> = Vec::new();
        let mut by_queue: Vec<(Arc<Queue>, Vec<Entry>)> = Vec::new();
        let mut remote = Vec::new();
        let mut streams: Vec<(Arc<Queue>, Arc<Consumer>, Vec<u64>)> = Vec::new();
        for u in settled {
            let (queue, entry, consumer) = match u {
                Unacked::Local {
                    queue,
                    entry,
                    consumer,
                } => (queue, entry, consumer),
                Unacked::Remote { link, id } => {
                    remote.push((link, id));
                    continue;
                }
            };
            if let Some(c) = &consumer {
                c.settled();
            }
            if requeue.is_none() {
                queue.acked.fetch_add(1, Ordering::Relaxed);
            }
            if queue.stream().is_some() {
                // A stream's ack or nack only gives credit back (and moves
                // a named consumer's stored offset), once per consumer.
                if let Some(c) = consumer {
                    match streams.iter_mut().find(|(_, sc, _)| Arc::ptr_eq(sc, &c)) {
                        Some((_, _, offsets)) => offsets.push(entry.id),
                        None => streams.push((queue.clone(), c, vec![entry.id])),
                    }
                }
                if !touched.iter().any(|q| Arc::ptr_eq(q, &queue)) {
                    touched.push(queue);
                }
                continue;
            }
            // An ack of a message that is in no log and holds no group
            // needs nothing more (a quorum queue's messages are all in its
            // replicated log).
            if requeue.is_some() || entry.stored.is_some() || entry.id != 0 || entry.group != 0 {
                group_by_queue(&mut by_queue, &queue, entry);
            }
            if !touched.iter().any(|q| Arc::ptr_eq(q, &queue)) {
                touched.push(queue);
            }
        }
        super::remote::settle_remote(remote, requeue);
        for (q, c, offsets) in streams {
            if let Some(s) = q.stream() {
                s.settled(&c, &offsets);
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

    /// The timeout of a delivery of this channel unacknowledged past its
    /// deadline at `now`, if one is.
    pub(crate) fn overdue(&self, now: std::time::Instant) -> Option<std::time::Duration> {
        self.unacked
            .iter()
            .filter_map(|(_, _, d)| d.as_ref())
            .find(|d| d.at <= now)
            .map(|d| d.after)
    }

    /// The earliest deadline of this channel's unacknowledged deliveries.
    pub(crate) fn earliest_deadline(&self) -> Option<std::time::Instant> {
        self.unacked
            .iter()
            .filter_map(|(_, _, d)| d.map(|d| d.at))
            .min()
    }

    /// Requeue every unacked delivery, in order, marked redelivered.
    pub(super) fn requeue_all(&mut self) {
        let mut by_queue: Vec<(Arc<Queue>, Vec<Entry>)> = Vec::new();
        let mut remote = Vec::new();
        for (_, u, _) in self.unacked.drain(..) {
            match u {
                Unacked::Local {
                    queue,
                    entry,
                    consumer,
                } => {
                    if let Some(c) = &consumer {
                        c.settled();
                    }
                    group_by_queue(&mut by_queue, &queue, entry);
                }
                Unacked::Remote { link, id } => remote.push((link, id)),
            }
        }
        for (q, entries) in by_queue {
            q.requeue(entries.into_iter());
        }
        super::remote::settle_remote(remote, Some(true));
    }

    pub(super) fn cancel_consumer(&mut self, ctx: &mut Ctx<'_>, tag: &str) {
        self.quorum_subs.remove(tag);
        if self.cancel_remote(ctx, tag) {
            return;
        }
        if let Some((c, q)) = self.consumers.remove(tag) {
            let now_unused = q.remove_consumer(c.connection, c.channel, &c.tag);
            if now_unused && q.auto_delete {
                ctx.broker.delete_unused_queue(ctx.vhost, &q.name);
            }
        }
    }

    /// The queue deleted a consumer of ours: tell the client.
    pub(crate) fn server_cancel(&mut self, ctx: &mut Ctx<'_>, tag: &str, notify: bool) {
        if self.keeps_following(ctx, tag) {
            // Its quorum queue's leader moved: it re-subscribes there.
            self.consumers.remove(tag);
            return;
        }
        self.quorum_subs.remove(tag);
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
    pub(super) fn resume(&mut self, ctx: &mut Ctx<'_>) {
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
    ) -> Delivered {
        let ours = self
            .consumers
            .get(&consumer.tag)
            .is_some_and(|(c, _)| Arc::ptr_eq(c, &consumer));
        if !ours || self.closing {
            consumer.settled();
            queue.put_back(std::iter::once(entry));
            return Delivered::Returned;
        }
        if self.credit.paused.load(Ordering::Relaxed) {
            self.held.push_back((queue, consumer, entry));
            return Delivered::Held;
        }
        let m = match queue.message(&entry) {
            Ok(m) => m,
            Err(e) => {
                // Left in the log: recovery reports it with file and offset.
                tracing::error!(queue = %crate::untrusted::text(&queue.name), "reading a stored message failed; not delivered: {e}");
                consumer.settled();
                return Delivered::Returned;
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
            let deadline = ctx.deadline(consumer.timeout);
            self.unacked.push_back((
                tag,
                Unacked::Local {
                    queue,
                    entry,
                    consumer: Some(consumer),
                },
                deadline,
            ));
        }
        Delivered::Written
    }

    /// The channel is closing (either side) or its connection is: cancel
    /// consumers, requeue unacked deliveries in order.
    pub(crate) fn shutdown(&mut self, ctx: &mut Ctx<'_>) {
        self.pending = None;
        let tags: Vec<String> = self
            .consumers
            .keys()
            .chain(self.remote_consumers.keys())
            .cloned()
            .collect();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ack_tags_must_name_an_unacked_delivery() {
        let conn = crate::broker::ConnectionInfo::new(
            1,
            "127.0.0.1:1".parse().unwrap(),
            "guest".into(),
            "/".into(),
            0,
            131_072,
            String::new(),
        );
        let info = conn.channel_opened(1, Arc::new(ChannelCredit::default()));
        let ch = Channel::new(1, info);
        // Nothing unacked: only `multiple` with tag 0 ("everything") passes.
        assert!(ch.check_tag(0, true).is_ok());
        for (tag, multiple) in [(1, false), (1, true), (0, false)] {
            let e = ch.check_tag(tag, multiple).unwrap_err();
            assert_eq!(e.code, 406, "{tag} {multiple}");
            assert!(e.text.contains(&format!("unknown delivery tag {tag}")));
        }
    }
}
