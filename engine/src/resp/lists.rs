//! Lists as queues: a key names a queue of the listener's vhost.
//!
//! * A push publishes each value, persistent, through the default exchange
//!   to the queue named by the key, declaring it (durable; classic or
//!   quorum as `[redis] queue_type` says) if it does not exist; its reply
//!   waits until the messages are as safe as a publisher confirm.
//! * A pop takes from the queue's head and settles the message in the
//!   queue's log at once: the client has it, as with Redis. A client that
//!   must not lose a message it took moves it (`LMOVE` to a processing
//!   list, Redis's reliable queue), and the move writes it to the second
//!   queue before it leaves the first.
//! * A blocking pop with nothing to take subscribes to each of its queues
//!   as a consumer with a shared credit of one message: the first queue to
//!   have one sends it, the queues share it out among their consumers in
//!   turn (AMQP consumers and blocked Redis clients alike), and a blocked
//!   client costs nothing until then.
//!
//! On a cluster node a new key's queue is declared through the cluster,
//! and a queue that lives on another node is reached through the message
//! traffic between nodes (`remote`).

use std::sync::Arc;
use std::sync::atomic::AtomicU32;
use std::time::Duration;

use amq_protocol::types::{AMQPValue, FieldTable, LongString};
use bytes::Bytes;

use super::QueueType;
use super::connection::{Conn, Durable, Spec, Then};
use super::remote::{Form, Held, MAX_REMOTE_POP, Taken, ToNode, Undo, Until};
use super::request::Command;
use crate::access::Access;
use crate::broker::{BrokerError, ChannelCredit, Consumer, Entry, Queue, QueueDecl};
use crate::cluster::{Applied, Command as Change};
use crate::message::Message;
use crate::nodes::remote::Traffic;
use crate::store::definitions::QueueDefinition;

pub(super) const SPECS: &[Spec] = &[
    Spec::new("lpush", -3, &["write", "denyoom", "fast"], (1, 1, 1), push),
    Spec::new("rpush", -3, &["write", "denyoom", "fast"], (1, 1, 1), push),
    Spec::new(
        "lpushx",
        -3,
        &["write", "denyoom", "fast"],
        (1, 1, 1),
        pushx,
    ),
    Spec::new(
        "rpushx",
        -3,
        &["write", "denyoom", "fast"],
        (1, 1, 1),
        pushx,
    ),
    Spec::new("lpop", -2, &["write", "fast"], (1, 1, 1), pop),
    Spec::new("rpop", -2, &["write", "fast"], (1, 1, 1), pop),
    Spec::new(
        "blpop",
        -3,
        &["write", "noscript", "blocking"],
        (1, -2, 1),
        bpop,
    ),
    Spec::new(
        "brpop",
        -3,
        &["write", "noscript", "blocking"],
        (1, -2, 1),
        bpop,
    ),
    Spec::new("lrange", 4, &["readonly"], (1, 1, 1), lrange),
    Spec::new("llen", 2, &["readonly", "fast"], (1, 1, 1), llen),
    Spec::new("del", -2, &["write"], (1, -1, 1), del),
    Spec::new("lmove", 5, &["write", "denyoom"], (1, 2, 1), lmove),
    Spec::new("rpoplpush", 3, &["write", "denyoom"], (1, 2, 1), lmove),
    Spec::new(
        "blmove",
        6,
        &["write", "denyoom", "noscript", "blocking"],
        (1, 2, 1),
        bmove,
    ),
    Spec::new(
        "brpoplpush",
        4,
        &["write", "denyoom", "noscript", "blocking"],
        (1, 2, 1),
        bmove,
    ),
];

/// A blocking pop waiting for a message.
pub(crate) struct Blocked {
    /// Each key's queue and this client's consumer of it.
    waiting: Vec<(Bytes, Arc<Queue>, Arc<Consumer>)>,
    /// Each key whose queue lives on another node: the node and this
    /// client's consumer tag there.
    remote: Vec<(Bytes, String, String)>,
    /// When it gives up (`None`: never).
    pub deadline: Option<tokio::time::Instant>,
    /// Where a taken message goes: to the client, or moved to that key.
    pub to: Option<Bytes>,
    /// The command, to run again when a queue it waits on moves.
    pub cmd: Command,
}

impl Blocked {
    /// The key of the consumer `tag` on `node`, if this waits on it.
    pub(super) fn remote_key(&self, node: &str, tag: &str) -> Option<Bytes> {
        self.remote
            .iter()
            .find(|(_, n, t)| n == node && t == tag)
            .map(|(k, _, _)| k.clone())
    }

    /// Whether it waits on a queue of `node`.
    pub(super) fn waits_on_node(&self, node: &str) -> bool {
        self.remote.iter().any(|(_, n, _)| n == node)
    }

    /// Whether it waits on queue `name`.
    pub(super) fn waits_on_queue(&self, name: &str) -> bool {
        self.waiting
            .iter()
            .any(|(k, _, _)| &k[..] == name.as_bytes())
            || self
                .remote
                .iter()
                .any(|(k, _, _)| &k[..] == name.as_bytes())
    }
}

/// Where a key's queue is.
pub(super) enum Found {
    /// On this node.
    Here(Arc<Queue>),
    /// On that node of the cluster.
    There(String),
    /// Nowhere.
    Missing,
    /// Neither: the error is the reply.
    Replied,
    /// Being declared, or its leader being elected: the command runs
    /// again once this is done.
    Wait(Until),
}

/// A key as a queue name: keys are bytes, queue names text.
fn queue_name(c: &mut Conn, key: &[u8]) -> Option<String> {
    match std::str::from_utf8(key) {
        Ok(k) if !k.is_empty() && k.len() <= 255 => Some(k.to_owned()),
        _ => {
            c.out
                .error("ERR wasmq: a key names a queue: UTF-8, 1 to 255 bytes");
            None
        }
    }
}

/// Where the queue `name` is: here, on another node, or nowhere; an
/// error reply if it is not a list.
fn find(c: &mut Conn, name: &str) -> Found {
    let vhost = c.vhost();
    match vhost.queue(name) {
        Ok(q) if q.stream().is_some() => {
            c.out.error(&format!(
                "WRONGTYPE wasmq: '{name}' is a stream: read it over AMQP with x-stream-offset"
            ));
            Found::Replied
        }
        Ok(q) => Found::Here(q),
        Err(BrokerError::OnOtherNode { node, .. }) => Found::There(node),
        Err(BrokerError::NotFound { .. }) => {
            match c.broker.cluster() {
                // Known to the cluster, not served anywhere yet (a quorum
                // queue between two leaders).
                Some(cluster) if cluster.queue_record(&vhost.name, name).is_some() => {
                    let (cluster, v, n) = (cluster.clone(), vhost.name.clone(), name.to_owned());
                    Found::Wait(Box::pin(async move {
                        cluster.until_served(&v, &n).await;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        Ok(())
                    }))
                }
                _ => Found::Missing,
            }
        }
        Err(e) => {
            c.out.error(&format!("ERR wasmq: {e}"));
            Found::Replied
        }
    }
}

/// Whether this connection may take from `q` (it is not another
/// connection's exclusive queue); if not, the refusal is the reply.
fn mine(c: &mut Conn, q: &Queue) -> bool {
    if q.owner.is_none_or(|o| o == c.id) {
        return true;
    }
    c.out.error(&format!(
        "ERR wasmq: RESOURCE_LOCKED - cannot obtain exclusive access to locked queue '{}' in vhost '{}'",
        q.name,
        c.vhost().name
    ));
    false
}

/// The queue `key` names, for taking from: the key checked, the user's
/// read permission, the queue's exclusivity (an exclusive queue of another
/// connection is refused, as AMQP refuses it: 405).
fn readable(c: &mut Conn, key: &[u8]) -> Found {
    let Some(name) = queue_name(c, key) else {
        return Found::Replied;
    };
    if !c.allowed(Access::Read, "queue", &name) {
        return Found::Replied;
    }
    match find(c, &name) {
        Found::Here(q) if !mine(c, &q) => Found::Replied,
        f => f,
    }
}

/// The queue `key` names, declared if it does not exist (on a cluster
/// node, through the cluster: the command then runs again).
fn declared(c: &mut Conn, name: &str) -> Found {
    match find(c, name) {
        Found::Missing => {}
        f => return f,
    }
    if !c.allowed(Access::Configure, "queue", name) {
        return Found::Replied;
    }
    let mut arguments = FieldTable::default();
    if c.shared.settings.queue_type == QueueType::Quorum {
        arguments.insert(
            "x-queue-type".into(),
            AMQPValue::LongString(LongString::from("quorum")),
        );
    }
    let vhost = c.vhost();
    if let Some(cluster) = c.broker.cluster().cloned() {
        return declared_in_cluster(c, cluster, name, arguments);
    }
    match c.broker.declare_queue(
        &vhost,
        QueueDecl {
            name: name.to_owned(),
            durable: true,
            owner: None,
            auto_delete: false,
            arguments,
        },
    ) {
        Ok(q) => Found::Here(q),
        Err(e) => {
            c.out.error(&format!("ERR wasmq: {e}"));
            Found::Replied
        }
    }
}

/// Declare queue `name` through the cluster, as an AMQP declare on this
/// node would be: it lives here (a quorum queue: on the members placed
/// for it), and the command runs again once this node has applied it.
fn declared_in_cluster(
    c: &mut Conn,
    cluster: Arc<crate::cluster::ClusterNode>,
    name: &str,
    arguments: amq_protocol::types::FieldTable,
) -> Found {
    let vhost = c.vhost();
    let (local, exists) = vhost.queue_count_with(name);
    let checked = crate::broker::check_short("queue name", name)
        .and_then(|()| c.broker.check_queue_limit(&vhost, name, local, exists));
    if let Err(e) = checked {
        c.out.error(&format!("ERR wasmq: {e}"));
        return Found::Replied;
    }
    if name.starts_with("amq.") {
        c.out.error(&format!(
            "ERR wasmq: ACCESS_REFUSED - queue name '{name}' contains reserved prefix 'amq.*'"
        ));
        return Found::Replied;
    }
    let (node, members) = c
        .broker
        .place_quorum(&vhost.name, name, &arguments)
        .unwrap_or_else(|| (cluster.name().to_owned(), Vec::new()));
    let quorum = !members.is_empty();
    let change = Change::DeclareQueue {
        vhost: vhost.name.clone(),
        queue: QueueDefinition {
            name: name.to_owned(),
            auto_delete: false,
            arguments,
        },
        durable: true,
        node,
        members,
    };
    let (v, n) = (vhost.name.clone(), name.to_owned());
    Found::Wait(Box::pin(async move {
        match cluster.propose(change).await {
            Ok(Applied::Refused { text, .. }) => Err(format!("ERR wasmq: {text}")),
            Ok(_) => {
                if quorum {
                    cluster.until_served(&v, &n).await;
                }
                Ok(())
            }
            Err(e) => Err(format!("TRYAGAIN wasmq: declaring the queue: {e}")),
        }
    }))
}

fn push(c: &mut Conn, args: &[Bytes]) -> Then {
    push_to(c, &args[0], &args[1..], true)
}

fn pushx(c: &mut Conn, args: &[Bytes]) -> Then {
    push_to(c, &args[0], &args[1..], false)
}

/// Publish `values` to the queue `key` names (declared if `create`); the
/// reply, the queue's length, waits for their confirm.
fn push_to(c: &mut Conn, key: &[u8], values: &[Bytes], create: bool) -> Then {
    let Some(name) = queue_name(c, key) else {
        return Then::Done;
    };
    if !c.allowed(Access::Write, "queue", &name) {
        return Then::Done;
    }
    let found = if create {
        declared(c, &name)
    } else {
        find(c, &name)
    };
    let here = match found {
        Found::Here(q) => Some(q),
        Found::There(_) => None,
        Found::Missing => {
            c.out.int(0);
            return Then::Done;
        }
        Found::Replied => return Then::Done,
        Found::Wait(until) => return Then::Again(until),
    };
    let on = publish(c, &name, values);
    // A queue of another node keeps its own length: the reply counts
    // what this push added.
    c.out.int(match here {
        Some(q) => q.len() as i64 + q.unacked() as i64,
        None => values.len() as i64,
    });
    Then::Wait(on)
}

/// Publish each value to queue `name`: what its reply waits for.
fn publish(c: &mut Conn, name: &str, values: &[Bytes]) -> Durable {
    let seq = c.next_seq();
    c.published = true;
    let vhost = c.vhost();
    let origin = c.origin();
    let (mut ticket, mut replicas, mut ok) = (0, 0, true);
    let mut nodes = Vec::new();
    for v in values {
        let props = amq_protocol::protocol::BasicProperties::default().with_delivery_mode(2);
        let message = Message::new(String::new(), name.to_owned(), props, v.clone());
        let sink = &c.dispatch_tx;
        // Asked for only by a quorum queue's commit.
        let outcome = c.broker.publish_replying(&vhost, None, message, || {
            let sink = sink.clone();
            Some(Box::new(move |ok| {
                let _ = sink.send(crate::broker::Dispatch::Replicated {
                    channel: 0,
                    seq,
                    ok,
                });
            }))
        });
        ticket = ticket.max(outcome.ticket);
        replicas += outcome.replicating;
        // A queue that refuses (`x-overflow: reject-publish`) or a fault:
        // the client hears the push failed.
        ok &= outcome.delivered > 0 && outcome.rejected == 0 && outcome.faults.is_empty();
        // Copies for queues of other nodes: the reply waits for each
        // node's answer.
        for f in &outcome.forwards {
            c.to_nodes.push(ToNode {
                node: f.node.clone(),
                frame: crate::nodes::remote::forward_frame(&vhost, origin, seq, f),
                undo: Undo::Forward(seq),
            });
            nodes.push(f.node.clone());
        }
        for q in outcome.congested {
            if !c.congested.iter().any(|x| Arc::ptr_eq(x, &q)) {
                c.congested.push(q);
            }
        }
    }
    Durable {
        ticket,
        replicas,
        seq,
        ok,
        nodes,
        settle: None,
    }
}

/// Take up to `n` messages off `q`'s head, settled in its log.
fn take(c: &mut Conn, q: &Arc<Queue>, n: usize) -> Result<Vec<Bytes>, String> {
    let mut taken = Vec::new();
    let mut bodies = Vec::new();
    while taken.len() < n {
        let Some(entry) = q.pop() else { break };
        match q.message(&entry) {
            Ok(m) => bodies.push(m.body.clone()),
            Err(e) => {
                // Nothing reaches the client: what was taken goes back.
                taken.push(entry);
                q.put_back(taken.into_iter());
                return Err(format!("ERR wasmq: reading the queue: {e}"));
            }
        }
        taken.push(entry);
    }
    c.settle(q, taken);
    Ok(bodies)
}

impl Conn {
    /// The client has these: they leave the queue for good. Settled in
    /// the queue's log once the commands read together have run (one
    /// write for a pipeline of pops, not one each).
    fn settle(&mut self, q: &Arc<Queue>, taken: Vec<Entry>) {
        if taken.is_empty() {
            return;
        }
        q.acked
            .fetch_add(taken.len() as u64, std::sync::atomic::Ordering::Relaxed);
        match self.settles.iter_mut().find(|(x, _)| Arc::ptr_eq(x, q)) {
            Some((_, entries)) => entries.extend(taken),
            None => self.settles.push((q.clone(), taken)),
        }
    }

    /// Settle what was taken since the last call.
    pub(super) fn flush_settles(&mut self) {
        for (q, entries) in self.settles.drain(..) {
            q.forget(&entries);
        }
    }
}

fn pop(c: &mut Conn, args: &[Bytes]) -> Then {
    let count = match args.get(1) {
        None => None,
        Some(n) if args.len() == 2 => match parse_int(n) {
            Some(n) if n > 0 => Some(n as usize),
            // Redis 7 answers an empty array (not nil) for a count of 0.
            Some(0) => Some(0),
            _ => {
                c.out.error("ERR value is out of range, must be positive");
                return Then::Done;
            }
        },
        Some(_) => {
            c.out.error("ERR syntax error");
            return Then::Done;
        }
    };
    let q = match readable(c, &args[0]) {
        Found::Here(q) => Some(q),
        Found::Missing => None,
        Found::There(node) if count != Some(0) => {
            let n = count.unwrap_or(1).min(MAX_REMOTE_POP);
            let form = if count.is_some() {
                Form::Count
            } else {
                Form::One
            };
            return ask_pops(c, &args[0], node, n, form, None);
        }
        Found::There(_) => None,
        Found::Replied => return Then::Done,
        Found::Wait(until) => return Then::Again(until),
    };
    let bodies = match q {
        Some(q) => match take(c, &q, count.unwrap_or(1).min(100_000)) {
            Ok(b) => b,
            Err(e) => {
                c.out.error(&e);
                return Then::Done;
            }
        },
        None => Vec::new(),
    };
    match count {
        None => match bodies.first() {
            Some(b) => c.out.bulk(b),
            None => c.out.null(),
        },
        Some(_) if bodies.is_empty() && count != Some(0) => c.out.null_array(),
        Some(_) => c.out.bulks(bodies.iter().map(|b| &b[..])),
    }
    Then::Done
}

/// Ask `node` for up to `n` messages of the key's queue: the command
/// holds the connection until every answer is in.
fn ask_pops(
    c: &mut Conn,
    key: &[u8],
    node: String,
    n: usize,
    form: Form,
    to: Option<Bytes>,
) -> Then {
    // The key was checked as a queue name by the caller.
    let queue = String::from_utf8_lossy(key).into_owned();
    let vhost = c.vhost().name.clone();
    for _ in 0..n {
        c.to_nodes.push(ToNode {
            node: node.clone(),
            frame: Traffic::Get {
                origin: c.origin(),
                vhost: vhost.clone(),
                queue: queue.clone(),
                no_ack: false,
            }
            .encode(),
            undo: Undo::Held,
        });
    }
    Then::Hold(Box::new(Held::Pop {
        node,
        form,
        asked: n,
        answered: 0,
        bodies: Vec::new(),
        taken: Vec::new(),
        error: None,
        to,
    }))
}

fn llen(c: &mut Conn, args: &[Bytes]) -> Then {
    let Some(name) = queue_name(c, &args[0]) else {
        return Then::Done;
    };
    match find(c, &name) {
        Found::Here(q) => c.out.int(q.len() as i64),
        Found::Missing => c.out.int(0),
        Found::There(node) => {
            if let Some(then) = c.ask_peek(&node, &name, None) {
                return then;
            }
            // A node that cannot be asked. A quorum queue this node holds
            // a replica of: its count (the replica may trail its leader by
            // the last commits).
            let vhost = c.vhost();
            match c.broker.quorum_status(&vhost.name, &name) {
                Some(s) => c.out.int(s.messages as i64),
                None => c.out.error(&format!(
                    "ERR wasmq: LLEN of a classic queue of another node (this one lives on node '{node}') is answered on that node"
                )),
            }
        }
        Found::Replied => {}
        Found::Wait(until) => return Then::Again(until),
    }
    Then::Done
}

/// Most messages one `LRANGE` returns.
pub(super) const MAX_RANGE: usize = 10_000;

/// The refusal of an `LRANGE` past [`MAX_RANGE`].
pub(super) fn range_too_long(c: &mut Conn) {
    c.out.error(&format!(
        "ERR wasmq: LRANGE returns at most {MAX_RANGE} messages of a queue; ask for a smaller range"
    ));
}

/// `LRANGE key start stop`: a peek at the ready messages in the order they
/// will be taken (index 0 is the next a pop takes; negative indexes count
/// from the newest, as in Redis), leaving them in the queue.
fn lrange(c: &mut Conn, args: &[Bytes]) -> Then {
    let (Some(start), Some(stop)) = (parse_int(&args[1]), parse_int(&args[2])) else {
        c.out.error("ERR value is not an integer or out of range");
        return Then::Done;
    };
    let q = match readable(c, &args[0]) {
        Found::Here(q) => q,
        Found::Missing => {
            c.out.array(0);
            return Then::Done;
        }
        Found::There(node) => {
            let name = String::from_utf8_lossy(&args[0]).into_owned();
            if let Some(then) = c.ask_peek(&node, &name, Some((start, stop))) {
                return then;
            }
            c.out.error(&format!(
                "ERR wasmq: LRANGE of a queue of another node needs that node to answer peeks (this one lives on node '{node}', which is older)"
            ));
            return Then::Done;
        }
        Found::Replied => return Then::Done,
        Found::Wait(until) => return Then::Again(until),
    };
    if crate::broker::redis_range(q.len(), start, stop).is_some_and(|(_, n)| n > MAX_RANGE) {
        range_too_long(c);
        return Then::Done;
    }
    let (_, bodies) = q.peek_range(start, stop, MAX_RANGE);
    c.out.bulks(bodies.iter().map(|b| &b[..]));
    Then::Done
}

/// `DEL`: purge each key's queue (it stays declared); the count of keys
/// that held messages, as Redis counts the keys it removed.
fn del(c: &mut Conn, args: &[Bytes]) -> Then {
    del_keys(c, args.to_vec(), 0)
}

/// Purge each of `keys`' queues, `removed` counted so far; a queue of
/// another node is purged there, the rest after its answer.
pub(super) fn del_keys(c: &mut Conn, keys: Vec<Bytes>, mut removed: i64) -> Then {
    let mut keys = keys.into_iter();
    while let Some(key) = keys.next() {
        match readable(c, &key) {
            Found::Here(q) => removed += i64::from(q.purge() > 0),
            Found::Missing => {}
            Found::There(node) => {
                c.to_nodes.push(ToNode {
                    node: node.clone(),
                    frame: Traffic::Purge {
                        origin: c.origin(),
                        vhost: c.vhost().name.clone(),
                        queue: String::from_utf8_lossy(&key).into_owned(),
                    }
                    .encode(),
                    undo: Undo::Held,
                });
                return Then::Hold(Box::new(Held::Purge {
                    node,
                    rest: keys.collect(),
                    removed,
                }));
            }
            Found::Replied => return Then::Done,
            Found::Wait(until) => return Then::Again(until),
        }
    }
    c.out.int(removed);
    Then::Done
}

/// `LMOVE src dst wherefrom whereto` and `RPOPLPUSH src dst`.
fn lmove(c: &mut Conn, args: &[Bytes]) -> Then {
    if args.len() == 4 && !(ends_ok(&args[2]) && ends_ok(&args[3])) {
        c.out.error("ERR syntax error");
        return Then::Done;
    }
    if let Err(then) = destination(c, &args[1]) {
        return then;
    }
    let q = match readable(c, &args[0]) {
        Found::Here(q) => q,
        Found::Missing => {
            c.out.null();
            return Then::Done;
        }
        Found::There(node) => {
            return ask_pops(c, &args[0], node, 1, Form::Move, Some(args[1].clone()));
        }
        Found::Replied => return Then::Done,
        Found::Wait(until) => return Then::Again(until),
    };
    let Some(entry) = q.pop() else {
        c.out.null();
        return Then::Done;
    };
    move_entry(c, &q, entry, &args[1])
}

/// A move's destination, checked and declared before anything leaves its
/// source (`Err`: what the command does instead).
fn destination(c: &mut Conn, dst: &[u8]) -> Result<(), Then> {
    let Some(name) = queue_name(c, dst) else {
        return Err(Then::Done);
    };
    if !c.allowed(Access::Write, "queue", &name) {
        return Err(Then::Done);
    }
    match declared(c, &name) {
        Found::Here(_) | Found::There(_) => Ok(()),
        Found::Wait(until) => Err(Then::Again(until)),
        Found::Missing | Found::Replied => Err(Then::Done),
    }
}

fn ends_ok(end: &[u8]) -> bool {
    end.eq_ignore_ascii_case(b"LEFT") || end.eq_ignore_ascii_case(b"RIGHT")
}

/// Whether `dst`'s queue exists (here or on another node) and the user
/// may write to it; if not, the refusal is the reply.
fn ready_to_move(c: &mut Conn, dst: &str) -> bool {
    if !c.allowed(Access::Write, "queue", dst) {
        return false;
    }
    match find(c, dst) {
        Found::Here(_) | Found::There(_) => true,
        Found::Replied => false,
        Found::Missing | Found::Wait(_) => {
            c.out.error(&format!(
                "TRYAGAIN wasmq: the destination queue '{dst}' is not served right now; nothing was moved"
            ));
            false
        }
    }
}

/// Publish `body`, taken from a queue of another node, to `dst`'s queue;
/// the reply (the message) waits for the destination's confirm, and the
/// source settles it then (or takes it back).
pub(super) fn move_body(c: &mut Conn, body: Bytes, dst: &[u8], taken: Taken) -> Then {
    let dst_name = String::from_utf8_lossy(dst).into_owned();
    if !ready_to_move(c, &dst_name) {
        taken.settle(false);
        return Then::Done;
    }
    let mut on = publish(c, &dst_name, std::slice::from_ref(&body));
    if !on.ok {
        taken.settle(false);
        c.out
            .error("ERR wasmq: the destination queue refused the message; it stays in the source");
        return Then::Done;
    }
    on.settle = Some(taken);
    c.out.bulk(&body);
    Then::Wait(on)
}

/// Publish what `entry` holds to `dst`'s queue, then settle it in `q`: the
/// reply (the message) waits for the destination's confirm. A message
/// that cannot be moved goes back where it was.
fn move_entry(c: &mut Conn, q: &Arc<Queue>, entry: Entry, dst: &[u8]) -> Then {
    let body = match q.message(&entry) {
        Ok(m) => m.body.clone(),
        Err(e) => {
            q.put_back(std::iter::once(entry));
            c.out.error(&format!("ERR wasmq: reading the queue: {e}"));
            return Then::Done;
        }
    };
    let dst_name = String::from_utf8_lossy(dst).into_owned();
    if !ready_to_move(c, &dst_name) {
        q.put_back(std::iter::once(entry));
        return Then::Done;
    }
    let on = publish(c, &dst_name, std::slice::from_ref(&body));
    if !on.ok {
        q.put_back(std::iter::once(entry));
        c.out
            .error("ERR wasmq: the destination queue refused the message; it stays in the source");
        return Then::Done;
    }
    // Written to the destination's log before the source's settle is: a
    // crash between the two leaves it in both, never in neither.
    c.settle(q, vec![entry]);
    c.out.bulk(&body);
    Then::Wait(on)
}

/// `BLPOP`/`BRPOP key... timeout`.
fn bpop(c: &mut Conn, args: &[Bytes]) -> Then {
    let (keys, timeout) = args.split_at(args.len() - 1);
    block(c, keys, &timeout[0], None, command(b"BRPOP", args))
}

/// A command's words, to run it again.
fn command(name: &'static [u8], args: &[Bytes]) -> Command {
    std::iter::once(Bytes::from_static(name))
        .chain(args.iter().cloned())
        .collect()
}

/// `BLMOVE src dst wherefrom whereto timeout` and `BRPOPLPUSH src dst timeout`.
fn bmove(c: &mut Conn, args: &[Bytes]) -> Then {
    if args.len() == 5 && !(ends_ok(&args[2]) && ends_ok(&args[3])) {
        c.out.error("ERR syntax error");
        return Then::Done;
    }
    if let Err(then) = destination(c, &args[1]) {
        return then;
    }
    let name: &'static [u8] = if args.len() == 5 {
        b"BLMOVE"
    } else {
        b"BRPOPLPUSH"
    };
    let cmd = command(name, args);
    block(
        c,
        &args[..1],
        &args[args.len() - 1],
        Some(args[1].clone()),
        cmd,
    )
}

/// Take from the first of `keys` with a message, or wait for one up to
/// `timeout` seconds (0: for ever).
fn block(c: &mut Conn, keys: &[Bytes], timeout: &[u8], to: Option<Bytes>, cmd: Command) -> Then {
    let timeout = match std::str::from_utf8(timeout)
        .ok()
        .and_then(|t| t.parse::<f64>().ok())
    {
        Some(t) if t < 0.0 => {
            c.out.error("ERR timeout is negative");
            return Then::Done;
        }
        Some(t) if t.is_finite() && t < 1e10 => t,
        _ => {
            c.out.error("ERR timeout is not a float or out of range");
            return Then::Done;
        }
    };
    let mut queues = Vec::with_capacity(keys.len());
    let mut elsewhere = Vec::new();
    for key in keys {
        let Some(name) = queue_name(c, key) else {
            return Then::Done;
        };
        if !c.allowed(Access::Read, "queue", &name) {
            return Then::Done;
        }
        // A blocked client waits on a key that has no list yet: the
        // queue is declared, as a push would.
        match declared(c, &name) {
            Found::Here(q) if mine(c, &q) => queues.push((key.clone(), q)),
            Found::There(node) => elsewhere.push((key.clone(), name, node)),
            Found::Wait(until) => return Then::Again(until),
            _ => return Then::Done,
        }
    }
    for (key, q) in &queues {
        if let Some(entry) = q.pop() {
            return match to {
                Some(dst) => move_entry(c, q, entry, &dst),
                None => {
                    let key = key.clone();
                    reply_taken(c, q, entry, &key)
                }
            };
        }
    }
    // Nothing to take: subscribe to every queue with one shared message
    // of credit.
    let credit = Arc::new(ChannelCredit::default());
    credit.limit.store(1, std::sync::atomic::Ordering::Relaxed);
    // Tags of this wait alone: a late cancel of an earlier one's consumer
    // does not end it.
    let wait = c.next_seq();
    let mut waiting = Vec::with_capacity(queues.len());
    for (i, (key, q)) in queues.into_iter().enumerate() {
        let consumer = Arc::new(Consumer {
            tag: format!("{BLOCKED_TAG}{wait}-{i}"),
            channel: 0,
            connection: c.id,
            no_ack: false,
            exclusive: false,
            prefetch: 1,
            unacked: AtomicU32::new(0),
            in_flight: AtomicU32::new(0),
            channel_credit: credit.clone(),
            sink: c.dispatch_tx.clone(),
            timeout: None,
        });
        if q.add_consumer(consumer.clone()).is_err() {
            c.out.error(&format!(
                "ERR wasmq: queue '{}' has an exclusive consumer",
                String::from_utf8_lossy(&key)
            ));
            remove_consumers(c.id, &waiting);
            return Then::Done;
        }
        waiting.push((key, q, consumer));
    }
    // A queue of another node: a consumer there with a prefetch of one.
    // What it delivers after another queue was first goes back.
    let mut remote = Vec::with_capacity(elsewhere.len());
    let vhost = c.vhost().name.clone();
    for (i, (key, queue, node)) in elsewhere.into_iter().enumerate() {
        let tag = format!("{BLOCKED_TAG}{wait}-r{i}");
        c.to_nodes.push(ToNode {
            node: node.clone(),
            frame: Traffic::Consume {
                origin: c.origin(),
                tag: tag.clone(),
                vhost: vhost.clone(),
                queue,
                prefetch: 1,
                no_ack: false,
                exclusive: false,
                arguments: bytes::Bytes::new(),
            }
            .encode(),
            undo: Undo::Blocked,
        });
        remote.push((key, node, tag));
    }
    Then::Block(Blocked {
        waiting,
        remote,
        deadline: (timeout > 0.0)
            .then(|| tokio::time::Instant::now() + Duration::from_secs_f64(timeout)),
        to,
        cmd,
    })
}

/// Tags of a blocked pop's consumers.
const BLOCKED_TAG: &str = "resp-blocked-";

/// Answer a pop with `[key, message]`.
fn reply_taken(c: &mut Conn, q: &Arc<Queue>, entry: Entry, key: &[u8]) -> Then {
    match q.message(&entry) {
        Ok(m) => {
            c.settle(q, vec![entry]);
            c.out.array(2);
            c.out.bulk(key);
            c.out.bulk(&m.body);
        }
        Err(e) => {
            q.put_back(std::iter::once(entry));
            c.out.error(&format!("ERR wasmq: reading the queue: {e}"));
        }
    }
    Then::Done
}

impl Conn {
    /// A queue sent a blocked pop its message.
    pub(super) fn deliver_blocked(
        &mut self,
        queue: Arc<Queue>,
        consumer: Arc<Consumer>,
        entry: Entry,
    ) {
        let wanted = self
            .blocked
            .as_ref()
            .and_then(|b| b.waiting.iter().find(|(_, _, c)| Arc::ptr_eq(c, &consumer)))
            .map(|(k, _, _)| k.clone());
        consumer.settled();
        consumer.written();
        let Some(key) = wanted else {
            // Too late (it timed out, or another queue was first): back
            // where it was, as if never sent (and on to another consumer).
            queue.put_back(std::iter::once(entry));
            return;
        };
        let b = self.blocked.take().expect("found above");
        self.stop_waiting(&b);
        let start = self.out.buf.len();
        let then = match b.to {
            Some(dst) => move_entry(self, &queue, entry, &dst),
            None => reply_taken(self, &queue, entry, &key),
        };
        self.finish(start, then);
    }

    /// A blocked pop's time ran out: `nil`.
    pub(super) fn unblock_timed_out(&mut self) {
        if self.blocked.is_some() {
            self.unblock();
            let start = self.out.buf.len();
            self.out.null_array();
            self.finish(start, Then::Done);
        }
    }

    /// Stop waiting (timeout, reset, the client left).
    pub(super) fn unblock(&mut self) {
        if let Some(b) = self.blocked.take() {
            self.stop_waiting(&b);
        }
    }

    /// Remove a blocked pop's consumers, here and on other nodes. A cancel
    /// goes out at once on an open link, ahead of the settle of what the
    /// consumer took: the node must not send it the next message first.
    pub(super) fn stop_waiting(&mut self, b: &Blocked) {
        remove_consumers(self.id, &b.waiting);
        let remote = self.broker.remote().cloned();
        for (_, node, tag) in &b.remote {
            let frame = Traffic::Cancel {
                origin: self.origin(),
                tag: tag.clone(),
            }
            .encode();
            let link = remote.as_ref().and_then(|r| r.node().open_link(node));
            if !link.is_some_and(|l| l.send_traffic(frame.clone())) {
                self.to_nodes.push(ToNode {
                    node: node.clone(),
                    frame,
                    undo: Undo::Nothing,
                });
            }
        }
    }

    /// A queue a blocked pop waits on was deleted, or (in a cluster) its
    /// leader here stepped down: the pop waits where it lives now.
    pub(super) fn cancelled(&mut self, tag: &str) {
        let key = self
            .blocked
            .as_ref()
            .and_then(|b| b.waiting.iter().find(|(_, _, c)| c.tag == tag))
            .map(|(k, _, _)| k.clone());
        let Some(key) = key else {
            return;
        };
        let vhost = self.vhost();
        let still = self.broker.cluster().is_some_and(|c| {
            c.queue_record(&vhost.name, &String::from_utf8_lossy(&key))
                .is_some()
        });
        if still {
            self.block_again();
            return;
        }
        {
            self.unblock();
            let start = self.out.buf.len();
            self.out
                .error("ERR wasmq: a queue this command waited on was deleted");
            self.finish(start, Then::Done);
        }
    }
}

fn remove_consumers(connection: u64, waiting: &[(Bytes, Arc<Queue>, Arc<Consumer>)]) {
    for (_, q, c) in waiting {
        q.remove_consumer(connection, 0, &c.tag);
    }
}

fn parse_int(b: &[u8]) -> Option<i64> {
    std::str::from_utf8(b).ok()?.parse().ok()
}
