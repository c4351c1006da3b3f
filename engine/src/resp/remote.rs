//! A RESP connection on a cluster node: lists whose queues live on other
//! nodes, and lists declared through the cluster.
//!
//! A key's queue may live on another node (a classic queue declared
//! there, or a quorum queue led there). The connection then speaks the
//! same message traffic an AMQP channel does ([`Traffic`]):
//!
//! * a push is routed here and its copy forwarded to the queue's node; the
//!   reply waits for that node's answer (the copy on its disk, or
//!   committed by the quorum queue's majority), as a publisher confirm
//!   does;
//! * a pop asks the queue's node for messages (`Get`) and settles each
//!   there once it is in the reply: a link lost before the answer leaves
//!   the message in its queue;
//! * a blocking pop is a consumer there, with a prefetch of one; a move
//!   settles its source only once its destination has the message.
//!
//! A command that needs another node's answer, or a definition committed
//! through the cluster, holds the connection: no further command is read
//! until it is answered, so replies stay in the order of the commands.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;

use super::connection::{Conn, Then};
use super::request::Command;
use crate::cluster::link::Link;
use crate::nodes::remote::{Origin, QueueAnswer, Settlement, Traffic};

/// Most messages one pop with a count asks another node for.
pub(super) const MAX_REMOTE_POP: usize = 1000;

/// How many times one command runs again before it gives up.
const MAX_AGAIN: u32 = 40;

/// How long a blocked pop whose queue's node cannot be reached waits
/// before it asks again.
const UNREACHABLE_RETRY: std::time::Duration = std::time::Duration::from_millis(500);

/// What a command waits for before it runs again: `Err` is its reply.
pub(crate) type Until = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;

/// A command that runs again once `until` is done.
pub(crate) struct Again {
    pub cmd: Command,
    pub until: Until,
    tries: u32,
}

/// A frame for another node.
pub(crate) struct ToNode {
    pub node: String,
    pub frame: Bytes,
    /// What it means if the node cannot be reached.
    pub undo: Undo,
}

/// What a frame that did not reach its node leaves undone.
pub(crate) enum Undo {
    Nothing,
    /// A push's copy: its reply says it was not stored.
    Forward(u64),
    /// The held command's question: it is answered with an error.
    Held,
    /// A blocked pop's consumer there: answered with an error.
    Blocked,
}

/// How a pop's messages are written back.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Form {
    /// `RPOP key`: a bulk, or nil.
    One,
    /// `RPOP key count`: an array, or a nil array.
    Count,
    /// `LMOVE src dst ...`: the message moved, or nil.
    Move,
}

/// A command waiting for another node's answer.
pub(crate) enum Held {
    /// Pops asked of `node`'s queue.
    Pop {
        node: String,
        form: Form,
        asked: usize,
        answered: usize,
        bodies: Vec<Bytes>,
        /// Each message's id there, to settle it once in the reply.
        taken: Vec<u64>,
        error: Option<String>,
        /// A move's destination key.
        to: Option<Bytes>,
    },
    /// `LLEN` (`range` none) or `LRANGE` asked of `node`.
    Peek {
        node: String,
        range: Option<(i64, i64)>,
    },
    /// `DEL`: a purge asked of `node`, then the keys after it.
    Purge {
        node: String,
        rest: Vec<Bytes>,
        removed: i64,
    },
}

/// A message taken from a queue of another node, to settle there.
pub(crate) struct Taken {
    pub link: Arc<Link>,
    pub id: u64,
}

impl Taken {
    /// Done with it (`true`), or back to its queue.
    pub(crate) fn settle(&self, done: bool) {
        let how = if done {
            Settlement::Ack
        } else {
            Settlement::Requeue
        };
        self.link.send_traffic(
            Traffic::Settle {
                how,
                ids: vec![self.id],
            }
            .encode(),
        );
    }
}

impl Conn {
    /// Where answers to this connection's frames come back.
    pub(super) fn origin(&self) -> Origin {
        Origin {
            conn: self.id,
            channel: 0,
        }
    }

    /// Run `cmd` again once `until` is done.
    pub(super) fn wait_again(&mut self, cmd: Command, until: Until) {
        // How many times this command already ran again.
        let tries = std::mem::take(&mut self.again_tries);
        self.again = Some(Again { cmd, until, tries });
    }

    /// The wait of a command to run again is over.
    pub(super) fn run_again(&mut self, r: Result<(), String>) {
        let Some(again) = self.again.take() else {
            return;
        };
        if let Err(e) = r {
            let start = self.out.buf.len();
            // An empty error is a blocked pop's time running out: nil.
            if e.is_empty() {
                self.out.null_array();
            } else {
                self.out.error(&e);
            }
            self.finish(start, Then::Done);
            return;
        }
        if again.tries >= MAX_AGAIN {
            let start = self.out.buf.len();
            self.out.error(
                "TRYAGAIN wasmq: the queue has no leader reachable from this node yet; try again",
            );
            self.finish(start, Then::Done);
            return;
        }
        self.again_tries = again.tries + 1;
        self.command(again.cmd);
        self.again_tries = 0;
    }

    /// Ask `node` for queue `queue`'s length (`range` none) or an `LRANGE`
    /// of it, if that node answers a peek; `None` if it does not (an older
    /// node).
    pub(super) fn ask_peek(
        &mut self,
        node: &str,
        queue: &str,
        range: Option<(i64, i64)>,
    ) -> Option<Then> {
        use crate::cluster::link::FEATURE_PEEK;
        let remote = self.broker.remote()?;
        let link = remote.node().open_link(node)?;
        if !link.peer_has(FEATURE_PEEK) {
            return None;
        }
        // An empty range asks for the length alone.
        let (start, stop) = range.unwrap_or((1, 0));
        self.to_nodes.push(ToNode {
            node: node.to_owned(),
            frame: Traffic::Peek {
                origin: self.origin(),
                vhost: self.vhost().name.clone(),
                queue: queue.to_owned(),
                start,
                stop,
            }
            .encode(),
            undo: Undo::Held,
        });
        Some(Then::Hold(Box::new(Held::Peek {
            node: node.to_owned(),
            range,
        })))
    }

    /// Send the frames for other nodes, dialing a node if need be. What
    /// cannot reach its node is undone (its reply says so).
    pub(super) async fn send_to_nodes(&mut self) {
        let Some(remote) = self.broker.remote().cloned() else {
            self.to_nodes.clear();
            return;
        };
        for t in std::mem::take(&mut self.to_nodes) {
            let link = match remote.node().link_to(&t.node).await {
                Ok(l) => Some(l),
                Err(e) => {
                    tracing::debug!(node = %t.node, "cannot reach the node of a queue: {e}");
                    None
                }
            };
            if link.as_ref().is_some_and(|l| l.send_traffic(t.frame)) {
                if let Some(l) = link
                    && l.congested()
                {
                    l.drained().await;
                }
                continue;
            }
            let why = format!(
                "ERR wasmq: the queue lives on node '{}', which cannot be reached from this node",
                t.node
            );
            match t.undo {
                Undo::Nothing => {}
                Undo::Forward(seq) => self.forward_failed(seq, &t.node),
                Undo::Held => self.held_failed(&t.node, &why),
                // A blocked pop keeps waiting, as a Redis client expects:
                // the queue's node may come back, or (a quorum queue) a
                // survivor take over. It asks again shortly.
                Undo::Blocked => self.block_again_after(UNREACHABLE_RETRY),
            }
        }
    }

    /// A push's copy for `node` will never be answered.
    fn forward_failed(&mut self, seq: u64, node: &str) {
        for on in self.waits_mut() {
            if on.seq == seq
                && let Some(i) = on.nodes.iter().position(|n| n == node)
            {
                on.nodes.swap_remove(i);
                on.ok = false;
            }
        }
    }

    /// The held command's node will not answer: reply with `why`.
    fn held_failed(&mut self, node: &str, why: &str) {
        let asked_there = match &self.held {
            Some(
                Held::Pop { node: n, .. }
                | Held::Purge { node: n, .. }
                | Held::Peek { node: n, .. },
            ) => n == node,
            None => false,
        };
        if asked_there {
            // What it had taken there goes back to its queue with the link.
            self.held = None;
            let start = self.out.buf.len();
            self.out.error(why);
            self.finish(start, Then::Done);
        }
    }

    /// The connection is ending: what its held pop took goes back.
    pub(super) fn held_ended(&mut self) {
        self.again = None;
        self.held = None;
    }

    /// Traffic from another node for this connection.
    pub(super) fn on_traffic(&mut self, link: Arc<Link>, traffic: Traffic) {
        match traffic {
            Traffic::Forwarded { seq, ok, .. } => {
                for on in self.waits_mut() {
                    if on.seq == seq
                        && let Some(i) = on.nodes.iter().position(|n| *n == link.peer)
                    {
                        on.nodes.swap_remove(i);
                        on.ok &= ok;
                        break;
                    }
                }
            }
            Traffic::Answer { outcome, .. } => self.answered(&link, outcome),
            Traffic::Deliver { tag, id, body, .. } => self.deliver_remote(&link, &tag, id, body),
            Traffic::Refused {
                tag, code, text, ..
            } => self.remote_refused(&link, &tag, code, &text),
            Traffic::Forward { .. }
            | Traffic::Consume { .. }
            | Traffic::Cancel { .. }
            | Traffic::Settle { .. }
            | Traffic::Get { .. }
            | Traffic::Purge { .. }
            | Traffic::Peek { .. } => {}
        }
    }

    /// The queue's node answered the held command.
    fn answered(&mut self, link: &Arc<Link>, outcome: QueueAnswer) {
        match self.held.take() {
            Some(Held::Pop {
                node,
                form,
                asked,
                mut answered,
                mut bodies,
                mut taken,
                mut error,
                to,
            }) if node == link.peer => {
                answered += 1;
                match outcome {
                    QueueAnswer::Message { id, body, .. } => {
                        bodies.push(body);
                        taken.push(id);
                    }
                    QueueAnswer::Empty
                    | QueueAnswer::Purged { .. }
                    | QueueAnswer::Peeked { .. } => {}
                    QueueAnswer::Error { text, .. } => {
                        error.get_or_insert(format!("ERR wasmq: {text}"));
                    }
                }
                if answered < asked {
                    self.held = Some(Held::Pop {
                        node,
                        form,
                        asked,
                        answered,
                        bodies,
                        taken,
                        error,
                        to,
                    });
                    return;
                }
                let start = self.out.buf.len();
                let then = self.popped(link, form, bodies, taken, error, to);
                self.finish(start, then);
            }
            Some(Held::Peek { node, range }) if node == link.peer => {
                let start = self.out.buf.len();
                match outcome {
                    QueueAnswer::Peeked { length, bodies } => match range {
                        None => self.out.int(i64::from(length)),
                        Some((from, to)) => {
                            let asked = crate::broker::redis_range(length as usize, from, to)
                                .map_or(0, |(_, n)| n);
                            if asked > super::lists::MAX_RANGE {
                                super::lists::range_too_long(self);
                            } else {
                                self.out.bulks(bodies.iter().map(|b| &b[..]));
                            }
                        }
                    },
                    QueueAnswer::Error { text, .. } => {
                        self.out.error(&format!("ERR wasmq: {text}"))
                    }
                    QueueAnswer::Empty
                    | QueueAnswer::Message { .. }
                    | QueueAnswer::Purged { .. } => self
                        .out
                        .error("ERR wasmq: the queue's node answered something else"),
                }
                self.finish(start, Then::Done);
            }
            Some(Held::Purge {
                node,
                rest,
                mut removed,
            }) if node == link.peer => {
                let start = self.out.buf.len();
                match outcome {
                    QueueAnswer::Purged { message_count } => {
                        removed += i64::from(message_count > 0);
                        let then = super::lists::del_keys(self, rest, removed);
                        self.finish(start, then);
                    }
                    QueueAnswer::Error { text, .. } => {
                        self.out.error(&format!("ERR wasmq: {text}"));
                        self.finish(start, Then::Done);
                    }
                    QueueAnswer::Empty
                    | QueueAnswer::Message { .. }
                    | QueueAnswer::Peeked { .. } => {
                        let then = super::lists::del_keys(self, rest, removed);
                        self.finish(start, then);
                    }
                }
            }
            other => {
                // Not asked for now (the command it answers gave up): a
                // message it took goes back to its queue.
                if let QueueAnswer::Message { id, .. } = outcome {
                    Taken {
                        link: link.clone(),
                        id,
                    }
                    .settle(false);
                }
                self.held = other;
            }
        }
    }

    /// A held pop has every answer: reply, and settle what it took.
    fn popped(
        &mut self,
        link: &Arc<Link>,
        form: Form,
        bodies: Vec<Bytes>,
        taken: Vec<u64>,
        error: Option<String>,
        to: Option<Bytes>,
    ) -> Then {
        let settle = |how, ids: Vec<u64>| {
            if !ids.is_empty() {
                link.send_traffic(Traffic::Settle { how, ids }.encode());
            }
        };
        if let Some(e) = error
            && bodies.is_empty()
        {
            self.out.error(&e);
            return Then::Done;
        }
        match form {
            Form::One => {
                match bodies.first() {
                    Some(b) => self.out.bulk(b),
                    None => self.out.null(),
                }
                settle(Settlement::Ack, taken);
            }
            Form::Count => {
                if bodies.is_empty() {
                    self.out.null_array();
                } else {
                    self.out.bulks(bodies.iter().map(|b| &b[..]));
                }
                settle(Settlement::Ack, taken);
            }
            Form::Move => {
                let (Some(body), Some(&id), Some(dst)) = (bodies.first(), taken.first(), to) else {
                    self.out.null();
                    return Then::Done;
                };
                let taken = Taken {
                    link: link.clone(),
                    id,
                };
                return super::lists::move_body(self, body.clone(), &dst, taken);
            }
        }
        Then::Done
    }

    /// A delivery to a blocked pop's consumer on another node.
    fn deliver_remote(&mut self, link: &Arc<Link>, tag: &str, id: u64, body: Bytes) {
        let taken = Taken {
            link: link.clone(),
            id,
        };
        let key = self
            .blocked
            .as_ref()
            .and_then(|b| b.remote_key(&link.peer, tag));
        let Some(key) = key else {
            // Too late (it timed out, or another queue was first): back
            // where it was.
            taken.settle(false);
            return;
        };
        let b = self.blocked.take().expect("found above");
        self.stop_waiting(&b);
        let start = self.out.buf.len();
        let then = match b.to.clone() {
            Some(dst) => super::lists::move_body(self, body, &dst, taken),
            None => {
                taken.settle(true);
                self.out.array(2);
                self.out.bulk(&key);
                self.out.bulk(&body);
                Then::Done
            }
        };
        self.finish(start, then);
    }

    /// A blocked pop's consumer on another node was refused or cancelled
    /// there.
    fn remote_refused(&mut self, link: &Arc<Link>, tag: &str, code: u16, text: &str) {
        if self
            .blocked
            .as_ref()
            .is_none_or(|b| b.remote_key(&link.peer, tag).is_none())
        {
            return;
        }
        if code == 0 {
            // Cancelled (the queue moved): wait where it lives now.
            self.block_again();
        } else {
            self.unblock();
            let start = self.out.buf.len();
            self.out.error(&format!("ERR wasmq: {text}"));
            self.finish(start, Then::Done);
        }
    }

    /// The link to `node` closed: pushes waiting for it failed, a pop
    /// asked there is answered with an error (what it took there is back
    /// in its queue), and a blocked pop waits again where its queues live
    /// now.
    pub(super) fn link_lost(&mut self, node: &str) {
        for on in self.waits_mut() {
            let before = on.nodes.len();
            on.nodes.retain(|n| n != node);
            if on.nodes.len() != before {
                on.ok = false;
            }
        }
        self.held_failed(
            node,
            &format!("ERR wasmq: the link to node '{node}' was lost; nothing was taken"),
        );
        if self.blocked.as_ref().is_some_and(|b| b.waits_on_node(node)) {
            self.block_again();
        }
    }

    /// A quorum queue's leader changed: a blocked pop waiting on it waits
    /// again where it lives now.
    pub(super) fn moved(&mut self, vhost: &str, queue: &str) {
        let here = self.login.as_ref().is_some_and(|l| l.vhost.name == vhost);
        if here
            && self
                .blocked
                .as_ref()
                .is_some_and(|b| b.waits_on_queue(queue))
        {
            self.block_again();
        }
    }

    /// Run a blocked pop's command again after `pause`, with the time it
    /// has left then.
    fn block_again_after(&mut self, pause: std::time::Duration) {
        let Some(b) = self.blocked.take() else {
            return;
        };
        self.stop_waiting(&b);
        if b.deadline
            .is_some_and(|at| at <= tokio::time::Instant::now() + pause)
        {
            // Its time runs out first: nil then, as for any timeout.
            let at = b.deadline.expect("checked");
            self.wait_again(
                b.cmd,
                Box::pin(async move {
                    tokio::time::sleep_until(at).await;
                    Err(String::new())
                }),
            );
            return;
        }
        let mut cmd = b.cmd.clone();
        if let (Some(last), Some(at)) = (cmd.last_mut(), b.deadline) {
            let left = at.saturating_duration_since(tokio::time::Instant::now() + pause);
            *last = Bytes::from(format!("{:.3}", left.as_secs_f64().max(0.001)));
        }
        self.wait_again(
            cmd,
            Box::pin(async move {
                tokio::time::sleep(pause).await;
                Ok(())
            }),
        );
    }

    /// Run a blocked pop's command again, with the time it has left.
    pub(super) fn block_again(&mut self) {
        let Some(b) = self.blocked.take() else {
            return;
        };
        self.stop_waiting(&b);
        let left = match b.deadline {
            None => 0.0,
            Some(at) => {
                let left = at.saturating_duration_since(tokio::time::Instant::now());
                if left.is_zero() {
                    let start = self.out.buf.len();
                    self.out.null_array();
                    self.finish(start, Then::Done);
                    return;
                }
                // Never 0, which would mean for ever.
                left.as_secs_f64().max(0.001)
            }
        };
        let mut cmd = b.cmd.clone();
        if let Some(last) = cmd.last_mut() {
            *last = Bytes::from(format!("{left:.3}"));
        }
        self.command(cmd);
    }
}
