//! Publishing: content assembly, `basic.publish` through the broker,
//! publisher confirms (a persistent message's waits for the store's sync)
//! and transactions.

use super::*;

impl Channel {
    pub(super) fn complete_publish(&mut self, ctx: &mut Ctx<'_>) -> Result<(), AmqpError> {
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
    pub(super) fn publish(
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
        let seq = if self.confirm {
            self.publish_seq + 1
        } else {
            0
        };
        let traced = ctx.grant.tracer
            && message
                .properties
                .headers()
                .as_ref()
                .is_some_and(|h| h.inner().contains_key(crate::author::trace::TRACE_HEADER));
        let mut outcome = if let (true, Some(x)) = (traced, &x) {
            self.publish_traced(ctx, x, message, seq)
        } else if seq == 0 {
            ctx.broker.publish_via(ctx.vhost, x.as_ref(), message)
        } else {
            let (sink, channel) = (&ctx.dispatch, self.id);
            ctx.broker
                .publish_replying(ctx.vhost, x.as_ref(), message, || {
                    let sink = mpsc::UnboundedSender::clone(sink);
                    Some(Box::new(move |ok| {
                        let _ = sink.send(Dispatch::Replicated { channel, seq, ok });
                    }))
                })
        };
        let forwarded = !outcome.forwards.is_empty() || outcome.replicating > 0;
        if forwarded {
            self.forward(
                ctx,
                std::mem::take(&mut outcome.forwards),
                seq,
                outcome.replicating,
            );
        }
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
            if outcome.ticket == 0 && self.confirms.is_empty() && ack && !forwarded {
                self.acks_ready = Some((tag, self.acks_ready.map_or(1, |(_, n)| n + 1)));
                *ctx.acks_ready = true;
            } else {
                // Tags go out in order: the gathered acks first.
                self.flush_acks(ctx.out);
                if outcome.ticket == 0 && self.confirms.is_empty() && !forwarded {
                    self.send_confirm(ctx.out, tag, false, ack);
                } else {
                    self.confirms.push_back((tag, outcome.ticket, ack));
                    *ctx.awaiting_sync = true;
                }
            }
        }
        Ok(())
    }

    /// A publish its user asked to trace: routed and delivered as any
    /// other, its trace kept for the admin API.
    #[cold]
    fn publish_traced(
        &self,
        ctx: &mut Ctx<'_>,
        x: &Arc<crate::broker::Exchange>,
        message: Message,
        seq: u64,
    ) -> crate::broker::PublishOutcome {
        let (sink, channel) = (&ctx.dispatch, self.id);
        ctx.broker.publish_traced(ctx.vhost, x, message, || {
            (seq != 0).then(|| {
                let sink = mpsc::UnboundedSender::clone(sink);
                Box::new(move |ok| {
                    let _ = sink.send(Dispatch::Replicated { channel, seq, ok });
                }) as crate::broker::Reply
            })
        })
    }

    pub(super) fn send_confirm(&self, out: &mut Vec<u8>, tag: u64, multiple: bool, ack: bool) {
        encode_confirm(out, self.id, tag, multiple, ack);
        self.info.confirmed.store(tag, Ordering::Relaxed);
    }

    /// Send the confirms the store has synced far enough for: runs of acks
    /// as one `multiple` ack, a failed sync as a nack. Returns whether
    /// some still wait.
    pub(crate) fn release_confirms(&mut self, out: &mut Vec<u8>, synced: Synced) -> bool {
        let mut acks: Option<(u64, u32)> = None;
        while let Some(&(tag, ticket, mut ack)) = self.confirms.front() {
            if !self.forwarded.is_empty() {
                match self.forwarded_outcome(tag) {
                    Some(ok) => ack &= ok,
                    None => break,
                }
            }
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

    pub(super) fn tx_method(
        &mut self,
        ctx: &mut Ctx<'_>,
        m: &tx::AMQPMethod,
    ) -> Result<(), AmqpError> {
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::amqp::frame::decode;
    use crate::broker::ConnectionInfo;

    fn channel() -> Channel {
        let conn = ConnectionInfo::new(
            1,
            "127.0.0.1:1".parse().unwrap(),
            "guest".into(),
            "/".into(),
            0,
            131_072,
            String::new(),
        );
        let info = conn.channel_opened(1, Arc::new(ChannelCredit::default()));
        Channel::new(1, info)
    }

    /// The confirms in `out`: (ack, tag, multiple).
    fn confirms(out: Vec<u8>) -> Vec<(bool, u64, bool)> {
        let mut buf = BytesMut::from(&out[..]);
        let mut seen = Vec::new();
        while let Some(f) = decode(&mut buf, 131_072).unwrap() {
            match f {
                Frame::Method(1, AMQPClass::Basic(basic::AMQPMethod::Ack(a))) => {
                    seen.push((true, a.delivery_tag, a.multiple))
                }
                Frame::Method(1, AMQPClass::Basic(basic::AMQPMethod::Nack(n))) => {
                    seen.push((false, n.delivery_tag, n.multiple))
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        seen
    }

    fn release(ch: &mut Channel, upto: u64, failed_upto: u64) -> (Vec<(bool, u64, bool)>, bool) {
        let mut out = Vec::new();
        let waiting = ch.release_confirms(&mut out, Synced { upto, failed_upto });
        (confirms(out), waiting)
    }

    #[test]
    fn confirms_go_out_in_order_as_the_sync_reaches_them() {
        let mut ch = channel();
        // (tag, store ticket, routed): ticket 0 needs no sync.
        ch.confirms.extend([
            (1, 0, true),
            (2, 0, true),
            (3, 7, true),
            (4, 0, true),
            (5, 9, true),
            (6, 0, false),
        ]);
        // The sync reached ticket 5: 1 and 2 go as one multiple ack; 3
        // waits, and so does everything behind it.
        assert_eq!(release(&mut ch, 5, 0), (vec![(true, 2, true)], true));
        // Ticket 7's round failed, 9's is on disk: 3 is nacked, 4 and 5
        // acked together, 6 (refused at publish) nacked.
        assert_eq!(
            release(&mut ch, 9, 8),
            (
                vec![(false, 3, false), (true, 5, true), (false, 6, false)],
                false
            )
        );
        assert!(ch.confirms.is_empty());
    }

    #[test]
    fn a_single_ready_confirm_is_not_multiple() {
        let mut ch = channel();
        ch.confirms.push_back((1, 3, true));
        assert_eq!(release(&mut ch, 2, 0), (vec![], true));
        assert_eq!(release(&mut ch, 3, 0), (vec![(true, 1, false)], false));
    }
}
