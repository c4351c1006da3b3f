//! Messages that cross nodes: publishes routed here to queues that live on
//! another node, and consumers here of such queues.
//!
//! A message is routed once, on the node it was published to (the plugins
//! run there), and each copy goes to its queue's node over the link
//! between the two nodes as a [`Traffic::Forward`]. The queue's node
//! enqueues it as a local publish would, and answers with
//! [`Traffic::Forwarded`] once the copy is in the queue (and, when
//! persistent, synced to disk): a publisher confirm on the first node
//! waits for that answer, so a confirm means what it means for a local
//! queue, on the queue's own node.
//!
//! A consumer of a remote queue is a consumer on the queue's node, made
//! for it by [`home`]'s session for the link, with the client's prefetch.
//! Deliveries travel back as [`Traffic::Deliver`]; the client's channel
//! gives them its own delivery tags and sends acks, nacks and rejects back
//! as [`Traffic::Settle`] with the queue node's ids. When a link closes,
//! the queue's node requeues what was out for delivery through it (marked
//! redelivered), and this node tells its clients their consumers of those
//! queues were cancelled (`basic.cancel`), as RabbitMQ does when a queue's
//! node goes down; publisher confirms waiting on the link are nacked.
//!
//! This hub receives every link's traffic ([`TrafficSink`]) and hands each
//! frame, in the order it arrived, to the client connection it answers
//! (by the connection id the frame carries) or to the link's session.

mod home;

pub use crate::nodes::traffic::{Malformed, Origin, QueueAnswer, Settlement, Traffic};

use std::collections::HashMap;
use std::sync::{Arc, Weak};

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
use tokio::sync::mpsc;

use crate::broker::{Broker, Dispatch};
use crate::cluster::ClusterNode;
use crate::cluster::link::{Link, TrafficSink};

/// The node's end of cross-node message traffic.
pub struct Remote {
    broker: Weak<Broker>,
    node: Arc<ClusterNode>,
    /// This node's client connections: where answers and deliveries from
    /// other nodes go.
    inboxes: RwLock<HashMap<u64, mpsc::UnboundedSender<Dispatch>>>,
    /// Per link: the session serving, on this node, its peer's forwards and
    /// consumers.
    sessions: Mutex<HashMap<u64, mpsc::UnboundedSender<home::Event>>>,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote").finish_non_exhaustive()
    }
}

impl Remote {
    /// The traffic hub of `broker` on cluster node `node`.
    pub fn new(broker: &Arc<Broker>, node: Arc<ClusterNode>) -> Arc<Remote> {
        Arc::new(Remote {
            broker: Arc::downgrade(broker),
            node,
            inboxes: RwLock::default(),
            sessions: Mutex::default(),
        })
    }

    /// The cluster node.
    pub fn node(&self) -> &Arc<ClusterNode> {
        &self.node
    }

    /// A client connection opened: traffic for it goes to `inbox`.
    pub fn register(&self, conn: u64, inbox: mpsc::UnboundedSender<Dispatch>) {
        self.inboxes.write().insert(conn, inbox);
    }

    /// Send what `event` makes to every local client connection.
    pub fn broadcast(&self, event: impl Fn() -> Dispatch) {
        for inbox in self.inboxes.read().values() {
            let _ = inbox.send(event());
        }
    }

    /// A client connection closed.
    pub fn unregister(&self, conn: u64) {
        self.inboxes.write().remove(&conn);
    }

    fn to_session(&self, link: &Arc<Link>, event: home::Event) {
        let mut sessions = self.sessions.lock();
        let session = sessions
            .entry(link.id)
            .or_insert_with(|| home::Session::spawn(self.broker.clone(), link.clone()));
        let _ = session.send(event);
    }

    fn to_connection(&self, link: &Arc<Link>, conn: u64, traffic: Traffic) {
        let event = Dispatch::Remote {
            link: link.clone(),
            traffic: Box::new(traffic),
        };
        let sent = match self.inboxes.read().get(&conn) {
            Some(inbox) => inbox.send(event),
            None => Err(mpsc::error::SendError(event)),
        };
        // The connection is gone: a delivery to it goes back to its queue.
        if let Err(mpsc::error::SendError(Dispatch::Remote { traffic, .. })) = sent
            && let Traffic::Deliver { id, .. } = *traffic
        {
            link.send_traffic(
                Traffic::Settle {
                    how: Settlement::Requeue,
                    ids: vec![id],
                }
                .encode(),
            );
        }
    }
}

impl Broker {
    /// Carry message traffic to and from other nodes through `remote`.
    pub fn set_remote(&self, remote: Arc<Remote>) {
        let _ = self.remote.set(remote);
    }

    /// The traffic hub, in a cluster.
    pub fn remote(&self) -> Option<&Arc<Remote>> {
        self.remote.get()
    }

    /// Send copies routed to other nodes with no confirm to wait for (dead
    /// letters: RabbitMQ's dead-lettering is at most once too).
    pub(crate) fn forward_unconfirmed(
        &self,
        vhost: &crate::broker::VHost,
        forwards: Vec<crate::broker::Forward>,
    ) {
        let Some(remote) = self.remote() else {
            return;
        };
        for f in forwards {
            let frame = forward_frame(
                vhost,
                Origin {
                    conn: 0,
                    channel: 0,
                },
                0,
                &f,
            );
            match remote.node.open_link(&f.node) {
                Some(link) => {
                    link.send_traffic(frame);
                }
                None => {
                    let node = remote.node.clone();
                    tokio::spawn(async move {
                        match node.link_to(&f.node).await {
                            Ok(link) => {
                                link.send_traffic(frame);
                            }
                            Err(e) => {
                                tracing::warn!(node = %f.node, "a dead letter for a queue there was lost: {e}")
                            }
                        }
                    });
                }
            }
        }
    }
}

/// The frame that carries `f` to its node.
pub fn forward_frame(
    vhost: &crate::broker::VHost,
    origin: Origin,
    seq: u64,
    f: &crate::broker::Forward,
) -> Bytes {
    Traffic::Forward {
        origin,
        seq,
        vhost: vhost.name.clone(),
        queues: f.queues.clone(),
        exchange: f.message.exchange.clone(),
        routing_key: f.message.routing_key.clone(),
        properties: f.message.encoded_properties().clone(),
        body: f.message.body.clone(),
    }
    .encode()
}

/// Where a forwarded publish's answer goes: the hub, the link it came
/// on, the publishing channel and its confirm tag.
type AnswerTo = (Option<Arc<Remote>>, Arc<Link>, Origin, u64);

/// A forwarded publish's answer, waiting for its quorum queue commits.
struct Waiting {
    remaining: std::sync::atomic::AtomicU32,
    ok: std::sync::atomic::AtomicBool,
    ticket: std::sync::atomic::AtomicU64,
    answer: Mutex<Option<AnswerTo>>,
}

impl Waiting {
    fn done(&self, ok: bool) {
        use std::sync::atomic::Ordering;
        if !ok {
            self.ok.store(false, Ordering::Release);
        }
        if self.remaining.fetch_sub(1, Ordering::AcqRel) != 1 {
            return;
        }
        if let Some((Some(remote), link, origin, seq)) = self.answer.lock().take() {
            remote.to_session(
                &link,
                home::Event::Enqueued {
                    origin,
                    seq,
                    ticket: self.ticket.load(Ordering::Acquire),
                    ok: self.ok.load(Ordering::Acquire),
                },
            );
        }
    }
}

impl TrafficSink for Remote {
    fn received(&self, link: &Arc<Link>, frame: Bytes) {
        let traffic = match Traffic::decode(frame) {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(peer = %link.peer, "{e}; closing the link");
                link.close();
                return;
            }
        };
        match traffic {
            Traffic::Forwarded { origin, .. }
            | Traffic::Refused { origin, .. }
            | Traffic::Deliver { origin, .. }
            | Traffic::Answer { origin, .. } => self.to_connection(link, origin.conn, traffic),
            // Enqueued here, by the link's reader: the message reaches its
            // queue (and a waiting consumer) without another task's turn.
            Traffic::Forward {
                origin,
                seq,
                vhost,
                queues,
                exchange,
                routing_key,
                properties,
                body,
            } => {
                let Some(broker) = self.broker.upgrade() else {
                    return;
                };
                // A copy proposed to a quorum queue led here answers once
                // committed: the frame's answer then waits for those too,
                // one token for the frame itself and one per proposal. Made
                // only then, so a classic queue's publish costs nothing more.
                let mut waiting: Option<Arc<Waiting>> = None;
                let (ok, ticket) = home::forward(
                    &broker,
                    &vhost,
                    &queues,
                    exchange,
                    routing_key,
                    properties,
                    body,
                    &mut || {
                        if seq == 0 {
                            return None;
                        }
                        let w = waiting.get_or_insert_with(|| {
                            Arc::new(Waiting {
                                remaining: std::sync::atomic::AtomicU32::new(1),
                                ok: std::sync::atomic::AtomicBool::new(true),
                                ticket: std::sync::atomic::AtomicU64::new(0),
                                answer: Mutex::new(Some((
                                    broker.remote().cloned(),
                                    link.clone(),
                                    origin,
                                    seq,
                                ))),
                            })
                        });
                        w.remaining
                            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
                        let w = w.clone();
                        Some(Box::new(move |ok| w.done(ok)))
                    },
                );
                match waiting {
                    Some(w) => {
                        w.ticket.store(ticket, std::sync::atomic::Ordering::Release);
                        w.done(ok);
                    }
                    None if seq != 0 => self.to_session(
                        link,
                        home::Event::Enqueued {
                            origin,
                            seq,
                            ticket,
                            ok,
                        },
                    ),
                    None => {}
                }
            }
            Traffic::Consume { .. }
            | Traffic::Cancel { .. }
            | Traffic::Settle { .. }
            | Traffic::Get { .. }
            | Traffic::Purge { .. }
            | Traffic::Peek { .. } => {
                self.to_session(link, home::Event::Frame(traffic));
            }
        }
    }

    fn private_queues(&self, queues: crate::cluster::private::PrivateQueues) {
        if let Some(broker) = self.broker.upgrade() {
            broker.apply_private(queues);
        }
    }

    fn closed(&self, link: &Arc<Link>) {
        // Dropping the sender ends the session, which requeues what it had
        // out for delivery.
        self.sessions.lock().remove(&link.id);
        // The peer's exclusive queues go with it (unless it is back on
        // another link already: it reports them there).
        let back = self
            .node
            .open_link(&link.peer)
            .is_some_and(|l| l.id != link.id);
        if !back && let Some(broker) = self.broker.upgrade() {
            broker.drop_private(&link.peer);
        }
        for inbox in self.inboxes.read().values() {
            let _ = inbox.send(Dispatch::LinkLost {
                node: link.peer.clone(),
            });
        }
    }
}
