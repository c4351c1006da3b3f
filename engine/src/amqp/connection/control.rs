//! What a connection answers itself rather than handing to a channel:
//! channel 0 (`connection.close`, `update-secret`, heartbeats, resource
//! alarms as `connection.blocked`), opening and closing channels, the
//! errors that close one channel or the whole connection, and the
//! deliveries queues send, each to its channel. The event loop in the
//! parent module calls these; they only encode replies into the output
//! buffer, never touch the socket.

use std::sync::Arc;
use std::time::{Duration, Instant};

use amq_protocol::protocol::{AMQPClass, channel, connection};

use super::{Connection, OUT_CAP, Step};
use crate::amqp::channel::{AmqpError, Channel, Delivered, Undo};
use crate::amqp::frame::{Frame, encode_heartbeat, encode_method, short_string};
use crate::amqp::handshake::encode_close;
use crate::broker::{ChannelCredit, Dispatch};
use crate::nodes::remote::{Settlement, Traffic};

impl Connection {
    /// Tell a publishing client it is blocked by a resource alarm, or no
    /// longer (if it asked for these notices).
    pub(super) fn signal_alarm(&mut self) {
        self.alarm_unchecked = false;
        let alarm = self.alarm.borrow();
        let blocked = alarm.is_some();
        if blocked == self.alarm_blocked {
            return;
        }
        self.alarm_blocked = blocked;
        if !self.blocked_capability {
            return;
        }
        let method = match alarm.as_ref() {
            Some(reason) => connection::AMQPMethod::Blocked(connection::Blocked {
                reason: short_string(reason),
            }),
            _ => connection::AMQPMethod::Unblocked(connection::Unblocked {}),
        };
        encode_method(&mut self.out.buf, 0, AMQPClass::Connection(method));
    }

    /// RabbitMQ's `connection.update-secret`: a client refreshes the
    /// secret it logged in with (an expiring token) on a live connection.
    /// RabbitMQ re-validates only with backends whose credentials expire
    /// (OAuth tokens); a password user's login cannot expire, so its update
    /// is acknowledged without checking the secret, and clients' own tests
    /// (amqplib's) rely on exactly that. wasmq's users are password users.
    /// Should the user have been removed meanwhile, the connection closes
    /// (530).
    pub(super) fn update_secret(&mut self, u: &connection::UpdateSecret) -> Step {
        let user = &self.grant.user;
        if self.broker.accounts().exists(user) {
            tracing::info!(peer = %self.peer, user = %user, reason = %crate::untrusted::text(u.reason.as_str()), "secret updated (password users do not expire)");
            encode_method(
                &mut self.out.buf,
                0,
                AMQPClass::Connection(connection::AMQPMethod::UpdateSecretOk(
                    connection::UpdateSecretOk {},
                )),
            );
            return Step::Continue;
        }
        let mut e = AmqpError::new(
            530,
            format!("NOT_ALLOWED - secret update was refused for user '{user}'"),
        );
        (e.class_id, e.method_id) = (10, 70);
        self.connection_error(e)
    }

    pub(super) fn heartbeat_tick(&mut self) -> Step {
        if self.heartbeat == 0 {
            return Step::Continue;
        }
        let hb = Duration::from_secs(u64::from(self.heartbeat));
        if !self.congested.is_empty() || self.alarm_blocked || self.pending() >= OUT_CAP {
            // We are not reading: the client's heartbeats wait in the socket.
            self.last_read = Instant::now();
        }
        if self.last_read.elapsed() > hb * 2 {
            return Step::Stop(format!(
                "missed heartbeats from client, timeout: {}s",
                self.heartbeat
            ));
        }
        if self.last_write.elapsed() >= hb / 2 && self.pending() == 0 {
            encode_heartbeat(&mut self.out.buf);
        }
        Step::Continue
    }

    pub(super) fn close(&mut self, code: u16, text: &str, class_id: u16, method_id: u16) {
        encode_close(&mut self.out.buf, code, text, class_id, method_id);
    }

    // Inlined into the read loop: a `Frame` is a large enum, and passing
    // one by value to an out-of-line call copies it for every frame
    // (measured: ~100 instructions a frame). The other caller, replaying
    // frames held during a cluster commit, is cold.
    #[inline(always)]
    pub(super) fn frame(&mut self, frame: Frame) -> Step {
        if let Frame::Method(
            _,
            AMQPClass::Basic(amq_protocol::protocol::basic::AMQPMethod::Publish(_)),
        ) = &frame
        {
            self.published = true;
        }
        let channel = match &frame {
            Frame::Method(c, _) | Frame::Body(c, _) | Frame::Heartbeat(c) => *c,
            Frame::Header { channel, .. } => *channel,
        };
        if channel == 0 {
            return match frame {
                Frame::Heartbeat(_) => Step::Continue,
                Frame::Method(_, AMQPClass::Connection(connection::AMQPMethod::Close(c))) => {
                    encode_method(
                        &mut self.out.buf,
                        0,
                        AMQPClass::Connection(connection::AMQPMethod::CloseOk(
                            connection::CloseOk {},
                        )),
                    );
                    Step::Stop(format!("client closed: {} {}", c.reply_code, c.reply_text))
                }
                Frame::Method(_, AMQPClass::Connection(connection::AMQPMethod::CloseOk(_))) => {
                    Step::Stop("closed".into())
                }
                Frame::Method(
                    _,
                    AMQPClass::Connection(connection::AMQPMethod::UpdateSecret(u)),
                ) => self.update_secret(&u),
                Frame::Method(_, m) => {
                    self.close(
                        503,
                        "COMMAND_INVALID - unexpected method on channel 0",
                        m.get_amqp_class_id(),
                        m.get_amqp_method_id(),
                    );
                    Step::Stop("unexpected method on channel 0".into())
                }
                _ => {
                    self.close(504, "CHANNEL_ERROR - content frame on channel 0", 0, 0);
                    Step::Stop("content frame on channel 0".into())
                }
            };
        }
        if self
            .committing
            .as_ref()
            .is_some_and(|c| c.held.contains_key(&channel))
        {
            self.hold(channel, frame);
            return Step::Continue;
        }
        if let Frame::Method(_, AMQPClass::Channel(m)) = &frame {
            match m {
                channel::AMQPMethod::Open(_) => {
                    if self.channels.contains_key(&channel) {
                        return self.connection_error(AmqpError::new(
                            504,
                            format!(
                                "CHANNEL_ERROR - second 'channel.open' seen on channel {channel}"
                            ),
                        ));
                    }
                    if channel > self.channel_max {
                        return self.connection_error(AmqpError::new(
                            530,
                            format!(
                                "NOT_ALLOWED - channel {channel} above channel_max {}",
                                self.channel_max
                            ),
                        ));
                    }
                    if let Some(limit) = self
                        .broker
                        .accounts()
                        .user_limit(&self.grant.user, "max-channels")
                    {
                        let user = &self.grant.user;
                        let here: usize = self
                            .broker
                            .connections()
                            .list()
                            .iter()
                            .filter(|c| c.user == *user)
                            .map(|c| c.channel_count())
                            .sum();
                        let elsewhere = self
                            .broker
                            .counted_elsewhere(crate::cluster::presence::Count::ChannelsOf(user));
                        if here as u64 + elsewhere >= limit {
                            return self.connection_error(AmqpError::new(
                                530,
                                format!(
                                    "NOT_ALLOWED - number of channels opened for user '{user}' has reached the maximum allowed user limit of ({limit})"
                                ),
                            ));
                        }
                    }
                    let credit = Arc::new(ChannelCredit::default());
                    let info = self.registered.info.channel_opened(channel, credit);
                    self.channels.insert(channel, Channel::new(channel, info));
                    encode_method(
                        &mut self.out.buf,
                        channel,
                        AMQPClass::Channel(channel::AMQPMethod::OpenOk(channel::OpenOk {})),
                    );
                    return Step::Continue;
                }
                channel::AMQPMethod::Close(_) => {
                    let (mut ctx, channels) = self.ctx();
                    if let Some(mut ch) = channels.remove(&channel) {
                        ch.shutdown(&mut ctx);
                    }
                    self.registered.info.channel_closed(channel);
                    encode_method(
                        &mut self.out.buf,
                        channel,
                        AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {})),
                    );
                    return Step::Continue;
                }
                channel::AMQPMethod::CloseOk(_) => {
                    if self.channels.get(&channel).is_some_and(|c| c.closing) {
                        self.channels.remove(&channel);
                        self.registered.info.channel_closed(channel);
                    }
                    return Step::Continue;
                }
                _ => {}
            }
        }
        let peer = self.peer;
        let (mut ctx, channels) = self.ctx();
        let Some(ch) = channels.get_mut(&channel) else {
            return self.connection_error(AmqpError::new(
                504,
                format!("CHANNEL_ERROR - expected 'channel.open' on channel {channel}"),
            ));
        };
        if ch.closing {
            return Step::Continue;
        }
        match ch.handle(&mut ctx, frame) {
            Ok(()) => {
                if self.proposal.is_some() {
                    self.start_proposal();
                }
                if self.hold {
                    self.hold_channel(channel);
                }
                Step::Continue
            }
            Err(e) if e.is_connection_error() => self.connection_error(e),
            Err(e) => {
                tracing::debug!(%peer, channel, code = e.code, "channel error: {}", e.text);
                self.channel_error(channel, e);
                Step::Continue
            }
        }
    }

    /// A definition change of this channel is being committed: its later
    /// frames wait, so that replies keep their order. (Out of line: the
    /// message path only pays for the emptiness check.)
    #[cold]
    #[inline(never)]
    fn hold(&mut self, channel: u16, frame: Frame) {
        if let Some(held) = self
            .committing
            .as_mut()
            .and_then(|c| c.held.get_mut(&channel))
        {
            held.push_back(frame);
        }
    }

    /// The channel waits for another node's answer: hold its frames.
    #[cold]
    #[inline(never)]
    fn hold_channel(&mut self, channel: u16) {
        self.hold = false;
        self.committing
            .get_or_insert_with(Default::default)
            .held
            .insert(channel, Default::default());
    }

    /// Handle the frames a channel held while it waited, in order.
    #[cold]
    #[inline(never)]
    fn release_held(&mut self, channel: u16) -> Step {
        let held = self
            .committing
            .as_mut()
            .and_then(|c| c.held.remove(&channel))
            .unwrap_or_default();
        for frame in held {
            // `frame` holds a frame back again if the channel waits again.
            if let Step::Stop(why) = self.frame(frame) {
                return Step::Stop(why);
            }
        }
        Step::Continue
    }

    /// The answer to a channel's remote `basic.get` (or its failure):
    /// answer the client, then let the channel's held frames through.
    #[cold]
    #[inline(never)]
    fn answered(
        &mut self,
        channel: u16,
        link: Option<&Arc<crate::cluster::link::Link>>,
        outcome: crate::nodes::remote::QueueAnswer,
    ) -> Step {
        let (mut ctx, channels) = self.ctx();
        let result = match channels.get_mut(&channel) {
            Some(ch) => ch.answered(&mut ctx, link, outcome),
            None => Ok(()),
        };
        if let Err(e) = result {
            self.channel_error(channel, e);
        }
        self.release_held(channel)
    }

    /// Commit the channel's definition change; hold the channel meanwhile.
    #[cold]
    #[inline(never)]
    fn start_proposal(&mut self) {
        let Some(p) = self.proposal.take() else {
            return;
        };
        let Some(node) = self.broker.cluster().cloned() else {
            return;
        };
        let committing = self.committing.get_or_insert_with(Default::default);
        committing.held.insert(p.channel, Default::default());
        committing.proposals.spawn(async move {
            let r = node.propose(p.command.clone()).await;
            if let (
                Ok(crate::cluster::Applied::Done),
                crate::cluster::Command::DeclareQueue {
                    vhost,
                    queue,
                    members,
                    ..
                },
            ) = (&r, &p.command)
                && !members.is_empty()
            {
                node.until_served(vhost, &queue.name).await;
            }
            (p, r)
        });
    }

    /// A channel's change was committed and applied here (or not): answer
    /// it, then handle the frames it held meanwhile.
    #[cold]
    #[inline(never)]
    pub(super) fn committed(&mut self, done: super::Committed) -> Step {
        let (p, result) = match done {
            Ok(r) => r,
            Err(e) => {
                return self.connection_error(AmqpError::new(
                    541,
                    format!("INTERNAL_ERROR - committing a definition change: {e}"),
                ));
            }
        };
        let channel = p.channel;
        let cluster_failed = result.is_err();
        let (ctx, channels) = self.ctx();
        let outcome = p.outcome(&ctx, result);
        match outcome {
            Ok(Some(method)) => {
                if let Some(ch) = channels.get_mut(&channel) {
                    ch.flush_acks(ctx.out);
                }
                encode_method(ctx.out, channel, method);
            }
            Ok(None) => {}
            Err(e) if cluster_failed => return self.connection_error(e),
            Err(e) => {
                tracing::debug!(peer = %self.peer, channel, code = e.code, "channel error: {}", e.text);
                self.channel_error(channel, e);
            }
        }
        self.release_held(channel)
    }

    /// Close one channel with `e`: requeue its deliveries, send channel.close,
    /// and ignore its frames until close-ok.
    pub(super) fn channel_error(&mut self, channel: u16, e: AmqpError) {
        let (mut ctx, channels) = self.ctx();
        let Some(ch) = channels.get_mut(&channel) else {
            return;
        };
        // What was confirmed before the error is acknowledged before it.
        ch.flush_acks(ctx.out);
        ch.shutdown(&mut ctx);
        ch.closing = true;
        encode_method(
            ctx.out,
            channel,
            AMQPClass::Channel(channel::AMQPMethod::Close(channel::Close {
                reply_code: e.code,
                reply_text: e.reply_text(),
                class_id: e.class_id,
                method_id: e.method_id,
            })),
        );
    }

    /// The consumer timeout: each channel with a delivery unacknowledged
    /// past its deadline is closed with RabbitMQ's 406 (its deliveries are
    /// requeued, flagged redelivered, as when any channel closes); then
    /// the timer is set to the earliest deadline left.
    pub(super) fn consumer_timeouts(&mut self) {
        let now = std::time::Instant::now();
        let overdue: Vec<(u16, Duration)> = self
            .channels
            .iter()
            .filter(|(_, ch)| !ch.closing)
            .filter_map(|(id, ch)| ch.overdue(now).map(|t| (*id, t)))
            .collect();
        for (id, after) in overdue {
            tracing::warn!(peer = %self.peer, channel = id, timeout_ms = after.as_millis() as u64, "consumer timeout: closing the channel, its deliveries are requeued");
            self.channel_error(
                id,
                AmqpError::new(
                    406,
                    format!(
                        "PRECONDITION_FAILED - delivery acknowledgement on channel {id} timed out. Timeout value used: {} ms. This timeout value can be configured, see consumers doc guide to learn more",
                        after.as_millis()
                    ),
                ),
            );
        }
        self.earliest = self
            .channels
            .values()
            .filter_map(|ch| ch.earliest_deadline())
            .min();
    }

    pub(super) fn connection_error(&mut self, e: AmqpError) -> Step {
        tracing::info!(peer = %self.peer, code = e.code, "closing connection: {}", crate::untrusted::text(&e.text));
        self.close(e.code, &e.text, e.class_id, e.method_id);
        Step::Stop(e.text)
    }

    pub(super) fn dispatch(&mut self, d: Dispatch) -> Step {
        let notify = self.cancel_notify;
        let mut detached = false;
        let step = self.dispatch_one(d, notify, &mut detached);
        if detached {
            self.rehome_later();
        }
        step
    }

    fn dispatch_one(&mut self, d: Dispatch, notify: bool, detached: &mut bool) -> Step {
        let (mut ctx, channels) = self.ctx();
        match d {
            Dispatch::Deliver {
                queue,
                consumer,
                entry,
            } => match channels.get_mut(&consumer.channel) {
                Some(ch) => match ch.deliver(&mut ctx, queue.clone(), consumer.clone(), entry) {
                    Delivered::Written => {
                        self.out.delivery_ends((consumer, queue));
                    }
                    Delivered::Returned => {
                        if consumer.written() {
                            queue.dispatch();
                        }
                    }
                    Delivered::Held => {}
                },
                None => {
                    consumer.settled();
                    queue.put_back(std::iter::once(entry));
                    consumer.written();
                }
            },
            Dispatch::Cancel { channel, tag, .. } => {
                if let Some(ch) = channels.get_mut(&channel) {
                    ch.server_cancel(&mut ctx, &tag, notify);
                    *detached |= ch.detached();
                }
            }
            Dispatch::Remote { link, traffic } => return self.remote(link, *traffic),
            Dispatch::Replicated { channel, seq, ok } => {
                if let Some(ch) = channels.get_mut(&channel) {
                    ch.remote_confirmed(seq, ok);
                }
                let synced = self.last_synced;
                self.release_confirms(synced);
            }
            Dispatch::Rehome => {
                self.rehome();
                return Step::Continue;
            }
            Dispatch::Moved { vhost, queue } => {
                if ctx.vhost.name == vhost {
                    for ch in channels.values_mut() {
                        ch.rehome(&mut ctx, &queue, notify);
                        *detached |= ch.detached();
                    }
                }
            }
            Dispatch::LinkLost { node } => {
                let mut waiting = Vec::new();
                for ch in channels.values_mut() {
                    ch.node_lost(&mut ctx, &node, notify);
                    *detached |= ch.detached();
                    if ch.asked.as_ref().is_some_and(|(n, _)| *n == node) {
                        waiting.push(ch.id);
                    }
                }
                let synced = self.last_synced;
                self.release_confirms(synced);
                for channel in waiting {
                    if let Step::Stop(why) = self.answered(channel, None, Channel::node_down(&node))
                    {
                        return Step::Stop(why);
                    }
                }
            }
        }
        Step::Continue
    }

    /// Try again to subscribe the consumers of quorum queues that wait for
    /// their leader.
    fn rehome(&mut self) {
        self.rehoming = false;
        let notify = self.cancel_notify;
        let (mut ctx, channels) = self.ctx();
        let mut still = false;
        for ch in channels.values_mut() {
            ch.rehome_detached(&mut ctx, notify);
            still |= ch.detached();
        }
        if still {
            self.rehome_later();
        }
    }

    /// Have [`Connection::rehome`] run in [`super::REHOME_EVERY`].
    pub(super) fn rehome_later(&mut self) {
        if std::mem::replace(&mut self.rehoming, true) {
            return;
        }
        let inbox = self.dispatch_tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(super::REHOME_EVERY).await;
            let _ = inbox.send(Dispatch::Rehome);
        });
    }

    /// Traffic from another node for one of this connection's channels.
    #[cold]
    fn remote(&mut self, link: Arc<crate::cluster::link::Link>, traffic: Traffic) -> Step {
        let notify = self.cancel_notify;
        let (mut ctx, channels) = self.ctx();
        match traffic {
            Traffic::Forwarded { origin, seq, ok } => {
                if let Some(ch) = channels.get_mut(&origin.channel) {
                    ch.remote_confirmed(seq, ok);
                }
                let synced = self.last_synced;
                self.release_confirms(synced);
            }
            Traffic::Deliver {
                origin,
                tag,
                id,
                redelivered,
                exchange,
                routing_key,
                properties,
                body,
            } => {
                let taken = channels.get_mut(&origin.channel).is_some_and(|ch| {
                    ch.deliver_remote(
                        &mut ctx,
                        &link,
                        &tag,
                        id,
                        redelivered,
                        &exchange,
                        &routing_key,
                        &properties,
                        &body,
                    )
                });
                if !taken {
                    link.send_traffic(
                        Traffic::Settle {
                            how: Settlement::Requeue,
                            ids: vec![id],
                        }
                        .encode(),
                    );
                }
            }
            Traffic::Refused {
                origin,
                tag,
                code,
                text,
            } => {
                let mut detached = false;
                let refused = channels.get_mut(&origin.channel).map(|ch| {
                    let r = ch.remote_refused(&mut ctx, &link.peer, &tag, code, text, notify);
                    detached = ch.detached();
                    r
                });
                if detached {
                    self.rehome_later();
                }
                if let Some(Err(e)) = refused {
                    self.channel_error(origin.channel, e);
                }
            }
            Traffic::Answer { origin, outcome } => {
                return self.answered(origin.channel, Some(&link), outcome);
            }
            Traffic::Forward { .. }
            | Traffic::Consume { .. }
            | Traffic::Cancel { .. }
            | Traffic::Settle { .. }
            | Traffic::Get { .. }
            | Traffic::Purge { .. }
            | Traffic::Peek { .. } => {}
        }
        Step::Continue
    }

    /// Send the frames this connection's channels have for other nodes,
    /// dialing a node if need be, and wait while a link is congested (the
    /// client is not read meanwhile: backpressure reaches the publisher).
    pub(super) async fn send_to_nodes(&mut self) -> Step {
        let Some(remote) = self.broker.remote().cloned() else {
            self.to_nodes.clear();
            return Step::Continue;
        };
        let mut unanswered = Vec::new();
        let notify = self.cancel_notify;
        let mut unreached = false;
        for t in std::mem::take(&mut self.to_nodes) {
            // An open link answers at once; a missing one is dialed.
            let link = match remote.node().link_to(&t.node).await {
                Ok(l) => Some(l),
                Err(e) => {
                    // The node logs the outage once (`ClusterNode::link_to`).
                    tracing::debug!(node = %t.node, "cannot reach the node of a queue: {e}");
                    None
                }
            };
            let sent = link.as_ref().is_some_and(|l| l.send_traffic(t.frame));
            if !sent {
                unreached = true;
                let channel = match &t.undo {
                    Undo::Nothing => None,
                    Undo::Answer(c) => {
                        unanswered.push((*c, t.node.clone()));
                        None
                    }
                    Undo::Confirm(c, _) | Undo::Consumer(c, _) => Some(*c),
                };
                let (mut ctx, channels) = self.ctx();
                if let Some(ch) = channel.and_then(|c| channels.get_mut(&c)) {
                    ch.unreached(&mut ctx, &t.node, &t.undo, notify);
                }
            }
            if let Some(l) = link
                && l.congested()
            {
                l.drained().await;
            }
        }
        if unreached {
            let synced = self.last_synced;
            self.release_confirms(synced);
            // A quorum queue's consumer that did not reach the leader's
            // node tries again.
            if self.channels.values().any(Channel::detached) {
                self.rehome_later();
            }
        }
        for (channel, node) in unanswered {
            if let Step::Stop(why) = self.answered(channel, None, Channel::node_down(&node)) {
                return Step::Stop(why);
            }
        }
        Step::Continue
    }

    /// The connection is gone: requeue, cancel, drop exclusive queues.
    pub(super) fn cleanup(&mut self) {
        let (mut ctx, channels) = self.ctx();
        for (_, mut ch) in channels.drain() {
            ch.shutdown(&mut ctx);
        }
        for name in std::mem::take(&mut self.exclusive_queues) {
            let _ = self.broker.delete_queue(&self.vhost, &name, false, false);
        }
    }
}
