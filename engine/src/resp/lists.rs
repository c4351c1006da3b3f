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

use std::sync::Arc;
use std::sync::atomic::AtomicU32;
use std::time::Duration;

use amq_protocol::types::{AMQPValue, FieldTable, LongString};
use bytes::Bytes;

use super::QueueType;
use super::connection::{Conn, Durable, Spec, Then};
use crate::access::Access;
use crate::broker::{BrokerError, ChannelCredit, Consumer, Entry, Queue, QueueDecl};
use crate::message::Message;

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
    /// When it gives up (`None`: never).
    pub deadline: Option<tokio::time::Instant>,
    /// Where a taken message goes: to the client, or moved to that key.
    to: Option<Bytes>,
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

/// The queue `key` names, if it exists here; an error reply if it is
/// elsewhere or not a list.
fn existing(c: &mut Conn, name: &str) -> Result<Option<Arc<Queue>>, ()> {
    match c.vhost().queue(name) {
        Ok(q) if q.stream().is_some() => {
            c.out.error(&format!(
                "WRONGTYPE wasmq: '{name}' is a stream: read it over AMQP with x-stream-offset"
            ));
            Err(())
        }
        Ok(q) => Ok(Some(q)),
        Err(BrokerError::NotFound { .. }) => Ok(None),
        Err(e) => {
            c.out.error(&format!("ERR wasmq: {e}"));
            Err(())
        }
    }
}

/// The queue `name`, if it exists here, for taking from: an exclusive
/// queue of another connection is refused, as AMQP refuses it (405).
fn to_take(c: &mut Conn, name: &str) -> Result<Option<Arc<Queue>>, ()> {
    let q = existing(c, name)?;
    match &q {
        Some(q) if !mine(c, q) => Err(()),
        _ => Ok(q),
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
/// read permission, the queue's exclusivity (`Ok(None)`: no such queue).
fn readable(c: &mut Conn, key: &[u8]) -> Result<Option<Arc<Queue>>, ()> {
    let name = queue_name(c, key).ok_or(())?;
    if !c.allowed(Access::Read, "queue", &name) {
        return Err(());
    }
    to_take(c, &name)
}

/// The queue `key` names, declared if it does not exist.
fn declared(c: &mut Conn, name: &str) -> Result<Arc<Queue>, ()> {
    if let Some(q) = existing(c, name)? {
        return Ok(q);
    }
    if !c.allowed(Access::Configure, "queue", name) {
        return Err(());
    }
    let mut arguments = FieldTable::default();
    if c.shared.settings.queue_type == QueueType::Quorum {
        arguments.insert(
            "x-queue-type".into(),
            AMQPValue::LongString(LongString::from("quorum")),
        );
    }
    let vhost = c.vhost();
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
        Ok(q) => Ok(q),
        Err(e) => {
            c.out.error(&format!("ERR wasmq: {e}"));
            Err(())
        }
    }
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
    let q = if create {
        match declared(c, &name) {
            Ok(q) => q,
            Err(()) => return Then::Done,
        }
    } else {
        match existing(c, &name) {
            Ok(Some(q)) => q,
            Ok(None) => {
                c.out.int(0);
                return Then::Done;
            }
            Err(()) => return Then::Done,
        }
    };
    let on = publish(c, &name, values);
    c.out.int(q.len() as i64 + q.unacked() as i64);
    Then::Wait(on)
}

/// Publish each value to queue `name`: what its reply waits for.
fn publish(c: &mut Conn, name: &str, values: &[Bytes]) -> Durable {
    let seq = c.next_seq();
    c.published = true;
    let vhost = c.vhost();
    let (mut ticket, mut replicas, mut ok) = (0, 0, true);
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
        // A queue that refuses (`x-overflow: reject-publish`), a fault, or
        // a queue on another node that this front end cannot reach: the
        // client hears the push failed.
        ok &= outcome.delivered > 0
            && outcome.rejected == 0
            && outcome.faults.is_empty()
            && outcome.forwards.is_empty();
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
    let Ok(q) = readable(c, &args[0]) else {
        return Then::Done;
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

fn llen(c: &mut Conn, args: &[Bytes]) -> Then {
    let Some(name) = queue_name(c, &args[0]) else {
        return Then::Done;
    };
    match existing(c, &name) {
        Ok(Some(q)) => c.out.int(q.len() as i64),
        Ok(None) => c.out.int(0),
        Err(()) => {}
    }
    Then::Done
}

/// Most messages one `LRANGE` returns.
const MAX_RANGE: i64 = 10_000;

/// `LRANGE key start stop`: a peek at the ready messages in the order they
/// will be taken (index 0 is the next a pop takes; negative indexes count
/// from the newest, as in Redis), leaving them in the queue.
fn lrange(c: &mut Conn, args: &[Bytes]) -> Then {
    let (Some(start), Some(stop)) = (parse_int(&args[1]), parse_int(&args[2])) else {
        c.out.error("ERR value is not an integer or out of range");
        return Then::Done;
    };
    let q = match readable(c, &args[0]) {
        Ok(Some(q)) => q,
        Ok(None) => {
            c.out.array(0);
            return Then::Done;
        }
        Err(()) => return Then::Done,
    };
    let len = q.len() as i64;
    let from = if start < 0 {
        (len + start).max(0)
    } else {
        start
    };
    let to = if stop < 0 {
        len + stop
    } else {
        stop.min(len - 1)
    };
    if from > to || from >= len {
        c.out.array(0);
        return Then::Done;
    }
    if to - from + 1 > MAX_RANGE {
        c.out.error(&format!(
            "ERR wasmq: LRANGE returns at most {MAX_RANGE} messages of a queue; ask for a smaller range"
        ));
        return Then::Done;
    }
    // A message taken meanwhile (its log space freed) is left out.
    let bodies: Vec<Bytes> = q
        .peek(from as usize, (to - from + 1) as usize)
        .iter()
        .filter_map(|e| q.message(e).ok().map(|m| m.body.clone()))
        .collect();
    c.out.bulks(bodies.iter().map(|b| &b[..]));
    Then::Done
}

/// `DEL`: purge each key's queue (it stays declared); the count of keys
/// that held messages, as Redis counts the keys it removed.
fn del(c: &mut Conn, args: &[Bytes]) -> Then {
    let mut removed = 0;
    for key in args {
        match readable(c, key) {
            Ok(Some(q)) => removed += i64::from(q.purge() > 0),
            Ok(None) => {}
            Err(()) => return Then::Done,
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
    if queue_name(c, &args[1]).is_none() {
        return Then::Done;
    }
    let q = match readable(c, &args[0]) {
        Ok(Some(q)) => q,
        Ok(None) => {
            c.out.null();
            return Then::Done;
        }
        Err(()) => return Then::Done,
    };
    let Some(entry) = q.pop() else {
        c.out.null();
        return Then::Done;
    };
    move_entry(c, &q, entry, &args[1])
}

fn ends_ok(end: &[u8]) -> bool {
    end.eq_ignore_ascii_case(b"LEFT") || end.eq_ignore_ascii_case(b"RIGHT")
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
    let ready = c.allowed(Access::Write, "queue", &dst_name) && declared(c, &dst_name).is_ok();
    if !ready {
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
    block(c, keys, &timeout[0], None)
}

/// `BLMOVE src dst wherefrom whereto timeout` and `BRPOPLPUSH src dst timeout`.
fn bmove(c: &mut Conn, args: &[Bytes]) -> Then {
    if args.len() == 5 && !(ends_ok(&args[2]) && ends_ok(&args[3])) {
        c.out.error("ERR syntax error");
        return Then::Done;
    }
    if queue_name(c, &args[1]).is_none() {
        return Then::Done;
    }
    block(c, &args[..1], &args[args.len() - 1], Some(args[1].clone()))
}

/// Take from the first of `keys` with a message, or wait for one up to
/// `timeout` seconds (0: for ever).
fn block(c: &mut Conn, keys: &[Bytes], timeout: &[u8], to: Option<Bytes>) -> Then {
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
            Ok(q) if mine(c, &q) => queues.push((key.clone(), q)),
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
    Then::Block(Blocked {
        waiting,
        deadline: (timeout > 0.0)
            .then(|| tokio::time::Instant::now() + Duration::from_secs_f64(timeout)),
        to,
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
        remove_consumers(self.id, &b.waiting);
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
            remove_consumers(self.id, &b.waiting);
        }
    }

    /// A queue a blocked pop waits on was deleted.
    pub(super) fn cancelled(&mut self, tag: &str) {
        let gone = self
            .blocked
            .as_ref()
            .is_some_and(|b| b.waiting.iter().any(|(_, _, c)| c.tag == tag));
        if gone {
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
