//! One RESP client connection: its login, the connection commands (`PING`,
//! `HELLO`, `CLIENT`, `INFO`, ...), and the loop that reads commands, runs
//! them, and writes replies.
//!
//! Replies go out in the order the commands came, but a push's reply waits
//! until its message is as safe as a publisher confirm says (on disk, or
//! committed by a quorum queue's majority). So a reply that waits holds the
//! replies of the commands after it: pipelined pushes are answered together
//! after one group commit, which is what makes Redis's `appendfsync always`
//! cheap here.
//!
//! Before a login the connection may only log in (or quit, or say hello),
//! and a bulk may be no longer than [`UNAUTHENTICATED_BULK`]: a peer
//! without a password cannot make the broker buffer a message.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::Shared;
use super::lists::Blocked;
use super::pubsub::Subscriptions;
use super::remote::{Again, Held, ToNode};
use super::reply::Out;
use super::request::{Command, Parser};
use crate::Broker;
use crate::access::{Access, Permissions, resource_name};
use crate::broker::{ConnectionInfo, Dispatch, Entry, Queue, Registered, VHost};
use crate::store::Synced;

/// Longest bulk before a login.
pub const UNAUTHENTICATED_BULK: usize = 64 * 1024;

/// Most bytes read ahead while a command blocks (`BRPOP`): the socket is
/// read on so that the client's leaving is seen, and a client that sends
/// more than this behind a blocked command is closed (Redis's query
/// buffer limit, smaller).
const READ_AHEAD_WHILE_BLOCKED: usize = 1 << 20;

/// What one read takes at most, bytes.
const READ_CHUNK: usize = 16 * 1024;

/// The Redis version the front end says it is: the commands it serves are
/// Redis 7.2's (clients pick their command forms from it).
pub const REDIS_VERSION: &str = "7.2.0";

/// A logged-in user.
pub(super) struct Login {
    pub user: String,
    pub vhost: Arc<VHost>,
    pub permissions: Arc<Permissions>,
    _registered: Registered,
}

/// What a push waits for before its reply goes out.
pub(super) struct Durable {
    /// The store's sync ticket (0: none).
    pub ticket: u64,
    /// Quorum queue commits still to hear of.
    pub replicas: u32,
    /// Its tag for those answers.
    pub seq: u64,
    /// Every message was taken so far (else the reply is [`NOT_STORED`]).
    pub ok: bool,
    /// Other nodes a copy was forwarded to, each still to answer once.
    pub nodes: Vec<String>,
    /// A message taken from a queue of another node for a move: settled
    /// there once the move's reply goes out (requeued if it failed).
    pub settle: Option<super::remote::Taken>,
}

/// The reply to a push whose message did not become safe.
const NOT_STORED: &str = "ERR wasmq: the message was not stored (a disk write failed or a quorum queue lost its leader); it may not have been taken";

/// A reply that waits for its message's durability, with the replies of
/// the commands that came after it.
struct Waiting {
    on: Durable,
    reply: Vec<u8>,
    later: Vec<u8>,
}

/// What a command asks of the connection once it has run.
pub(super) enum Then {
    /// Its reply is in the buffer.
    Done,
    /// Its reply waits for durability: a store ticket and commits.
    Wait(Durable),
    /// It blocks the connection (a blocking pop with nothing to take).
    Block(Blocked),
    /// It runs again once this is done (a definition change committed
    /// through the cluster, a quorum queue's leader elected); the
    /// connection reads no further command meanwhile.
    Again(super::remote::Until),
    /// It waits for another node's answer (a pop or purge of a queue
    /// there); the connection reads no further command meanwhile.
    Hold(Box<Held>),
    /// Close after the reply.
    Quit,
}

/// One client connection.
pub(super) struct Conn {
    pub id: u64,
    pub peer: SocketAddr,
    /// Over TLS: its protocol and the client certificate's CN.
    tls: Option<crate::broker::TlsInfo>,
    pub broker: Arc<Broker>,
    pub shared: Arc<Shared>,
    pub out: Out,
    pub login: Option<Login>,
    pub name: Option<Bytes>,
    pub dispatch_tx: mpsc::UnboundedSender<Dispatch>,
    pub blocked: Option<Blocked>,
    pub subs: Subscriptions,
    /// Queues a push went to that are above their flow watermark: the
    /// socket is not read until they drain.
    pub congested: Vec<Arc<Queue>>,
    /// It has published (pushed): a resource alarm stops reading it, as
    /// it stops an AMQP connection that publishes. A client that only
    /// pops drains the broker, and is read on.
    pub published: bool,
    /// Messages popped and not yet settled in their queues' logs.
    pub settles: Vec<(Arc<Queue>, Vec<Entry>)>,
    next_seq: u64,
    waits: VecDeque<Waiting>,
    /// Frames for other nodes, sent before the connection next waits.
    pub to_nodes: Vec<ToNode>,
    /// A command to run again once its wait is over.
    pub again: Option<Again>,
    /// A command waiting for another node's answer.
    pub held: Option<Held>,
    /// How many times the command running now ran again.
    pub again_tries: u32,
}

/// A client's byte stream.
pub(super) enum Stream {
    /// Plain TCP: read when readable, so an idle connection holds no
    /// buffer.
    Tcp(TcpStream),
    /// RESP over TLS.
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl Stream {
    /// Wait for bytes and append them to `buf`: how many (0 at EOF).
    /// Cancel-safe: nothing read is lost if the wait is dropped.
    async fn read(&mut self, buf: &mut BytesMut) -> std::io::Result<usize> {
        let reserve = |buf: &mut BytesMut| {
            if buf.capacity() - buf.len() < 1024 {
                buf.reserve(READ_CHUNK);
            }
        };
        match self {
            Stream::Tcp(s) => loop {
                s.readable().await?;
                reserve(buf);
                match s.try_read_buf(buf) {
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    r => return r,
                }
            },
            Stream::Tls(s) => {
                reserve(buf);
                s.read_buf(buf).await
            }
        }
    }

    async fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            Stream::Tcp(s) => s.write_all(bytes).await,
            Stream::Tls(s) => {
                s.write_all(bytes).await?;
                s.flush().await
            }
        }
    }

    /// The TLS side, as the admin API shows it.
    fn tls_info(&self) -> Option<crate::broker::TlsInfo> {
        match self {
            Stream::Tcp(_) => None,
            Stream::Tls(s) => {
                let conn = s.get_ref().1;
                Some(crate::broker::TlsInfo {
                    protocol: crate::tls::protocol_name(conn),
                    peer_cert_cn: crate::tls::peer_common_name(conn),
                })
            }
        }
    }
}

/// Serve one connection until it closes.
pub(super) async fn run(
    broker: Arc<Broker>,
    shared: Arc<Shared>,
    mut socket: Stream,
    peer: SocketAddr,
    shutdown: CancellationToken,
) {
    let id = crate::broker::connections::next_id();
    let tls = socket.tls_info();
    let (dispatch_tx, mut dispatch_rx) = mpsc::unbounded_channel();
    let mut conn = Conn {
        id,
        peer,
        tls,
        broker: broker.clone(),
        shared: shared.clone(),
        out: Out::default(),
        login: None,
        name: None,
        dispatch_tx,
        blocked: None,
        subs: Subscriptions::default(),
        congested: Vec::new(),
        published: false,
        settles: Vec::new(),
        next_seq: 0,
        waits: VecDeque::new(),
        to_nodes: Vec::new(),
        again: None,
        held: None,
        again_tries: 0,
    };
    // Answers and deliveries from queues of other nodes come by this
    // connection's id.
    if let Some(remote) = broker.remote() {
        remote.register(id, conn.dispatch_tx.clone());
    }
    let mut parser = Parser::new(UNAUTHENTICATED_BULK);
    // Held only while there is something in it: an idle connection keeps
    // no buffers (10,000 idle clients are a few KiB each).
    let mut rbuf = BytesMut::new();
    let mut synced = broker.store().map(|s| s.synced());
    let mut alarm = broker.alarm();
    let mut closing = false;
    let why = loop {
        // Run what has arrived, unless a command blocks the connection.
        while !closing && !conn.paused() {
            let max = if conn.login.is_some() {
                shared.max_bulk
            } else {
                UNAUTHENTICATED_BULK
            };
            parser.set_max_bulk(max);
            match parser.next(&mut rbuf) {
                Ok(Some(cmd)) => {
                    if conn.command(cmd) {
                        closing = true;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    conn.out.error(&format!("ERR {e}"));
                    closing = true;
                }
            }
        }
        if conn.paused() && rbuf.len() >= READ_AHEAD_WHILE_BLOCKED && !closing {
            conn.unblock();
            conn.again = None;
            conn.held = None;
            conn.out
                .error("ERR wasmq: more than 1 MiB sent behind a blocked command");
            closing = true;
        }
        if rbuf.is_empty() && rbuf.capacity() > 0 && !parser.mid_command() {
            rbuf = BytesMut::new();
        }
        conn.flush_settles();
        if !conn.to_nodes.is_empty() {
            conn.send_to_nodes().await;
        }
        // Without a store nothing waits for a sync: the default covers
        // ticket 0 only.
        conn.release(
            synced
                .as_ref()
                .map_or_else(Synced::default, |s| *s.borrow()),
        );
        if !conn.out.buf.is_empty() {
            if let Err(e) = socket.write_all(&conn.out.buf).await {
                break format!("write: {e}");
            }
            if conn.out.buf.capacity() > 64 * 1024 {
                conn.out.buf = Vec::new();
            } else {
                conn.out.buf.clear();
            }
        }
        if closing && conn.waits.is_empty() {
            break "closed".into();
        }
        let congested = conn.congested.first().cloned();
        let alarmed = conn.published && alarm.borrow().is_some();
        let read = !closing && !alarmed && congested.is_none();
        let deadline = conn.blocked.as_ref().and_then(|b| b.deadline);
        let again = conn.again.is_some();
        let closed = conn
            .login
            .as_ref()
            .map(|l| l._registered.info.closed().clone());
        tokio::select! {
            r = socket.read(&mut rbuf), if read => match r {
                Ok(0) => break "client closed".into(),
                Ok(_) => {}
                Err(e) => break format!("read: {e}"),
            },
            Some(d) = dispatch_rx.recv() => {
                conn.dispatch(d);
                // What else arrived goes out in the same write.
                while let Ok(d) = dispatch_rx.try_recv() {
                    conn.dispatch(d);
                    if conn.out.buf.len() > 64 * 1024 {
                        break;
                    }
                }
            }
            r = async { synced.as_mut().expect("guarded").changed().await }, if synced.is_some() && !conn.waits.is_empty() => {
                if r.is_err() {
                    break "store closed".into();
                }
            }
            () = async {
                match deadline {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            }, if deadline.is_some() => conn.unblock_timed_out(),
            r = async { (&mut conn.again.as_mut().expect("guarded").until).await }, if again => conn.run_again(r),
            () = async { if let Some(q) = &congested { q.until_drained().await } }, if congested.is_some() => {
                conn.congested.retain(|q| q.congested());
            }
            r = alarm.changed() => {
                if r.is_err() {
                    break "broker stopped".into();
                }
            }
            () = async { closed.as_ref().expect("guarded").cancelled().await }, if closed.is_some() => {
                conn.out.error("ERR wasmq: connection closed by an operator");
                let _ = socket.write_all(&conn.out.buf).await;
                break "closed by an operator".into();
            }
            () = shutdown.cancelled() => {
                conn.out.error("ERR wasmq: the broker is shutting down");
                let _ = socket.write_all(&conn.out.buf).await;
                break "broker shutting down".into();
            }
        }
    };
    tracing::debug!(%peer, connection = id, "RESP connection ended: {why}");
    conn.unblock();
    conn.held_ended();
    if let Some(remote) = broker.remote() {
        remote.unregister(id);
    }
    dispatch_rx.close();
    while let Ok(d) = dispatch_rx.try_recv() {
        conn.dispatch(d);
    }
    conn.unsubscribe_all();
    conn.flush_settles();
}

impl Conn {
    /// Run one command; returns whether the connection is to close.
    pub(super) fn command(&mut self, cmd: Command) -> bool {
        let start = self.out.buf.len();
        let then = self.run(&cmd);
        if let Then::Again(until) = then {
            self.wait_again(cmd, until);
            return false;
        }
        self.finish(start, then)
    }

    /// Whether a command holds the connection (blocked, waiting to run
    /// again, or for another node's answer): no further command is read.
    fn paused(&self) -> bool {
        self.blocked.is_some() || self.again.is_some() || self.held.is_some()
    }

    /// Place the reply written from `start` on: out now, or after the
    /// replies it must follow, or held until what it reports is safe.
    /// Returns whether the connection is to close.
    pub(super) fn finish(&mut self, start: usize, then: Then) -> bool {
        let quit = matches!(then, Then::Quit);
        match then {
            Then::Wait(on) => {
                let reply = self.out.buf.split_off(start);
                self.waits.push_back(Waiting {
                    on,
                    reply,
                    later: Vec::new(),
                });
            }
            Then::Block(b) => self.blocked = Some(b),
            Then::Hold(h) => self.held = Some(*h),
            // Only a command read from the client runs again; one run on
            // an event (a delivery, an answer) that finds its queue between
            // leaders says so.
            Then::Again(_) => {
                self.out.buf.truncate(start);
                self.out
                    .error("TRYAGAIN wasmq: a queue is between leaders; try again");
                if let Some(w) = self.waits.back_mut() {
                    w.later.extend(self.out.buf.drain(start..));
                }
            }
            Then::Done | Then::Quit => {
                if let Some(w) = self.waits.back_mut() {
                    w.later.extend(self.out.buf.drain(start..));
                }
            }
        }
        quit
    }

    /// A tag for the quorum queue commits of a push.
    pub(super) fn next_seq(&mut self) -> u64 {
        self.next_seq += 1;
        self.next_seq
    }

    /// Send the replies whose messages are now as safe as they say.
    fn release(&mut self, synced: Synced) {
        while let Some(w) = self.waits.front() {
            if w.on.replicas > 0 {
                break;
            }
            let on_disk = match w.on.ticket {
                0 => true,
                t => match synced.outcome(t) {
                    Some(on_disk) => on_disk,
                    None => break,
                },
            };
            if !w.on.nodes.is_empty() {
                break;
            }
            let w = self.waits.pop_front().expect("front");
            if let Some(t) = &w.on.settle {
                t.settle(w.on.ok && on_disk);
            }
            if w.on.ok && on_disk {
                self.out.buf.extend_from_slice(&w.reply);
            } else {
                self.out.error(NOT_STORED);
            }
            self.out.buf.extend_from_slice(&w.later);
        }
    }

    /// A quorum queue answered a push's commit (the loop then releases
    /// what no longer waits).
    pub(super) fn replicated(&mut self, seq: u64, ok: bool) {
        if let Some(w) = self.waits.iter_mut().find(|w| w.on.seq == seq) {
            w.on.replicas = w.on.replicas.saturating_sub(1);
            w.on.ok &= ok;
        }
    }

    fn dispatch(&mut self, d: Dispatch) {
        match d {
            Dispatch::Deliver {
                queue,
                consumer,
                entry,
            } => {
                if consumer.tag.starts_with(super::pubsub::TAG) {
                    self.deliver_published(queue, consumer, entry);
                } else {
                    self.deliver_blocked(queue, consumer, entry);
                }
            }
            Dispatch::Replicated { seq, ok, .. } => self.replicated(seq, ok),
            Dispatch::Cancel { tag, .. } => self.cancelled(&tag),
            Dispatch::Remote { link, traffic } => self.on_traffic(link, *traffic),
            Dispatch::LinkLost { node } => self.link_lost(&node),
            Dispatch::Moved { vhost, queue } => self.moved(&vhost, &queue),
            Dispatch::Rehome => {}
        }
    }

    /// Run one command, writing its reply.
    fn run(&mut self, cmd: &Command) -> Then {
        // Upper case on the stack: every command name served is short.
        let mut upper = [0u8; 16];
        let name = match &cmd[0][..] {
            n if n.len() <= upper.len() => {
                upper[..n.len()].copy_from_slice(n);
                upper[..n.len()].make_ascii_uppercase();
                &upper[..n.len()]
            }
            _ => {
                self.unknown(cmd);
                return Then::Done;
            }
        };
        let args = &cmd[1..];
        if self.login.is_none() && !matches!(name, b"AUTH" | b"HELLO" | b"QUIT") {
            self.out.error("NOAUTH Authentication required.");
            return Then::Done;
        }
        if self.subs.active() && !self.out.resp3 && !super::pubsub::allowed_when_subscribed(name) {
            self.out.error(&format!(
                "ERR Can't execute '{}': only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / PING / QUIT / RESET are allowed in this context",
                String::from_utf8_lossy(name).to_lowercase()
            ));
            return Then::Done;
        }
        let Some(spec) = all_specs().find(|s| s.name.as_bytes().eq_ignore_ascii_case(name)) else {
            self.unknown(cmd);
            return Then::Done;
        };
        let n = args.len() as i64 + 1;
        if (spec.arity >= 0 && n != spec.arity) || (spec.arity < 0 && n < -spec.arity) {
            self.out.error(&format!(
                "ERR wrong number of arguments for '{}' command",
                spec.name
            ));
            return Then::Done;
        }
        (spec.run)(self, args)
    }

    fn unknown(&mut self, cmd: &Command) {
        let name = String::from_utf8_lossy(&cmd[0]);
        if let Some(why) = refused(&name.to_ascii_uppercase()) {
            self.out
                .error(&format!("ERR wasmq: {} {why}", name.to_ascii_uppercase()));
            return;
        }
        let mut text = format!(
            "ERR unknown command '{}', with args beginning with: ",
            crate::untrusted::text(&name)
        );
        for a in cmd[1..].iter().take(8) {
            text.push_str(&format!(
                "'{}' ",
                crate::untrusted::text(&String::from_utf8_lossy(a))
            ));
        }
        self.out.error(&text);
    }

    /// The logged-in user's permission for `access` to `kind` `name`, or a
    /// `NOPERM` reply.
    pub(super) fn allowed(&mut self, access: Access, kind: &str, name: &str) -> bool {
        match self.refusal(access, kind, name) {
            None => true,
            Some(e) => {
                self.out.error(&e);
                false
            }
        }
    }

    /// Why the logged-in user may not have `access` to `kind` `name`.
    pub(super) fn refusal(&self, access: Access, kind: &str, name: &str) -> Option<String> {
        let login = self.login.as_ref().expect("commands run logged in");
        if login.permissions.allows(access, name) {
            return None;
        }
        Some(format!(
            "NOPERM {} access to {kind} '{}' in vhost '{}' refused for user '{}'",
            access.as_str(),
            resource_name(name),
            login.vhost.name,
            login.user
        ))
    }

    /// The waits of pushes (for `seq`'s answers).
    pub(super) fn waits_mut(&mut self) -> impl Iterator<Item = &mut Durable> {
        self.waits.iter_mut().map(|w| &mut w.on)
    }

    pub(super) fn vhost(&self) -> Arc<VHost> {
        self.login
            .as_ref()
            .expect("commands run logged in")
            .vhost
            .clone()
    }

    /// Log in as `user` with `password`; a reply is written only on
    /// failure.
    fn authenticate(&mut self, user: &str, password: &str) -> bool {
        let accounts = self.broker.accounts();
        let Some(login) = accounts.authenticate(user, password, self.peer.ip()) else {
            if let Some(quiet) = crate::amqp::REFUSALS.admit(self.peer.ip()) {
                tracing::warn!(peer = %self.peer, user = %crate::untrusted::text(user), also_refused = quiet, "RESP authentication failed");
            }
            self.out
                .error("WRONGPASS invalid username-password pair or user is disabled.");
            return false;
        };
        let vhost_name = self.shared.settings.vhost.clone();
        let Some((vhost, permissions)) = self
            .broker
            .vhost(&vhost_name)
            .zip(accounts.permissions_in(&login.name, &vhost_name))
        else {
            self.out.error(&format!(
                "NOPERM user '{}' has no access to vhost '{vhost_name}' ([redis] vhost)",
                login.name
            ));
            return false;
        };
        // A second login replaces the first.
        self.login = None;
        let info = Arc::new(
            ConnectionInfo::new(
                self.id,
                self.peer,
                login.name.clone(),
                vhost_name.clone(),
                0,
                0,
                "RESP (Redis protocol)".into(),
            )
            .with_tls(self.tls.clone()),
        );
        let broker = self.broker.clone();
        let registered = match broker.connections().register_unless(info, |open| {
            crate::amqp::handshake::over_connection_limit(&broker, &login.name, &vhost_name, open)
        }) {
            Ok(r) => r,
            Err(why) => {
                self.out
                    .error(&format!("ERR max number of clients reached: {why}"));
                return false;
            }
        };
        tracing::info!(peer = %self.peer, connection = self.id, user = %login.name, vhost = %vhost_name, "RESP connection logged in");
        self.login = Some(Login {
            user: login.name,
            vhost,
            permissions,
            _registered: registered,
        });
        true
    }
}

/// How a command is called and run.
pub(super) struct Spec {
    /// Its name, lower case, as errors name it.
    pub name: &'static str,
    /// Redis's arity: the number of words with the name, negative for at
    /// least that many.
    pub arity: i64,
    /// Redis's flags for `COMMAND`.
    pub flags: &'static [&'static str],
    /// The positions of its first and last key and the step between them
    /// (0 0 0: none; a negative last counts from the end).
    pub keys: (i64, i64, i64),
    pub run: fn(&mut Conn, &[Bytes]) -> Then,
}

impl Spec {
    /// A command's table row: name, arity, flags, key positions, runner.
    pub(super) const fn new(
        name: &'static str,
        arity: i64,
        flags: &'static [&'static str],
        keys: (i64, i64, i64),
        run: fn(&mut Conn, &[Bytes]) -> Then,
    ) -> Spec {
        Spec {
            name,
            arity,
            flags,
            keys,
            run,
        }
    }
}

const CONNECTION: &[Spec] = &[
    Spec::new("ping", -1, &["fast"], (0, 0, 0), ping),
    Spec::new("echo", 2, &["fast"], (0, 0, 0), echo),
    Spec::new("quit", -1, &["fast"], (0, 0, 0), quit),
    Spec::new(
        "auth",
        -2,
        &["noscript", "loading", "stale", "fast"],
        (0, 0, 0),
        auth,
    ),
    Spec::new(
        "hello",
        -1,
        &["noscript", "loading", "stale", "fast"],
        (0, 0, 0),
        hello,
    ),
    Spec::new(
        "select",
        2,
        &["loading", "stale", "fast"],
        (0, 0, 0),
        select,
    ),
    Spec::new("client", -2, &["loading", "stale"], (0, 0, 0), client),
    Spec::new("info", -1, &["loading", "stale"], (0, 0, 0), info),
    Spec::new("command", -1, &["loading", "stale"], (0, 0, 0), command),
    Spec::new(
        "reset",
        1,
        &["noscript", "loading", "stale", "fast"],
        (0, 0, 0),
        reset,
    ),
];

/// Every command served, for `COMMAND`.
fn all_specs() -> impl Iterator<Item = &'static Spec> {
    CONNECTION
        .iter()
        .chain(super::lists::SPECS)
        .chain(super::pubsub::SPECS)
}

/// Redis commands whose meaning a queue broker does not have: refused
/// with why, never half done.
fn refused(name: &str) -> Option<&'static str> {
    Some(match name {
        "LINDEX" | "LSET" | "LINSERT" | "LREM" | "LTRIM" | "LPOS" | "LMPOP" | "BLMPOP" => {
            "is not served: a wasmq list is a queue (pushes join its tail, pops take its head); see docs/redis.md"
        }
        "GET" | "SET" | "MGET" | "MSET" | "INCR" | "DECR" | "HSET" | "HGET" | "SADD" | "ZADD"
        | "EXPIRE" | "KEYS" | "SCAN" | "FLUSHALL" | "FLUSHDB" => {
            "is not served: wasmq is a message broker; it serves lists as queues and pub/sub (docs/redis.md)"
        }
        "MULTI" | "EXEC" | "WATCH" | "EVAL" | "EVALSHA" | "FUNCTION" => {
            "is not served: there are no transactions or scripts over RESP; an AMQP channel has tx.select"
        }
        _ => return None,
    })
}

fn ping(c: &mut Conn, args: &[Bytes]) -> Then {
    if args.len() > 1 {
        c.out
            .error("ERR wrong number of arguments for 'ping' command");
        return Then::Done;
    }
    if c.subs.active() && !c.out.resp3 {
        // In subscribed mode RESP2 answers with a push-shaped array.
        c.out.array(2);
        c.out.bulk(b"pong");
        c.out.bulk(args.first().map_or(&b""[..], |a| &a[..]));
        return Then::Done;
    }
    match args.first() {
        Some(m) => c.out.bulk(m),
        None => c.out.simple("PONG"),
    }
    Then::Done
}

fn echo(c: &mut Conn, args: &[Bytes]) -> Then {
    c.out.bulk(&args[0]);
    Then::Done
}

fn quit(c: &mut Conn, _: &[Bytes]) -> Then {
    c.out.ok();
    Then::Quit
}

fn auth(c: &mut Conn, args: &[Bytes]) -> Then {
    let (user, password) = match args {
        [p] => (c.shared.settings.default_user.clone(), p),
        [u, p] => (String::from_utf8_lossy(u).into_owned(), p),
        _ => {
            c.out.error("ERR syntax error");
            return Then::Done;
        }
    };
    if c.authenticate(&user, &String::from_utf8_lossy(password)) {
        c.out.ok();
    }
    Then::Done
}

fn hello(c: &mut Conn, args: &[Bytes]) -> Then {
    let mut resp3 = c.out.resp3;
    let mut i = 0;
    if let Some(v) = args.first() {
        match &v[..] {
            b"2" => resp3 = false,
            b"3" => resp3 = true,
            _ => {
                c.out.error("NOPROTO unsupported protocol version");
                return Then::Done;
            }
        }
        i = 1;
    }
    let mut name = None;
    while i < args.len() {
        let opt = args[i].to_ascii_uppercase();
        match (&opt[..], args.len() - i) {
            (b"AUTH", 3..) => {
                let (u, p) = (
                    String::from_utf8_lossy(&args[i + 1]).into_owned(),
                    String::from_utf8_lossy(&args[i + 2]).into_owned(),
                );
                if !c.authenticate(&u, &p) {
                    return Then::Done;
                }
                i += 3;
            }
            (b"SETNAME", 2..) => {
                name = Some(args[i + 1].clone());
                i += 2;
            }
            _ => {
                c.out.error(&format!(
                    "ERR Syntax error in HELLO option '{}'",
                    crate::untrusted::text(&String::from_utf8_lossy(&args[i]))
                ));
                return Then::Done;
            }
        }
    }
    if c.login.is_none() {
        c.out.error("NOAUTH HELLO must be called with the client already authenticated, otherwise the HELLO <proto> AUTH <user> <pass> option can be used to authenticate the client and select the RESP protocol version at the same time");
        return Then::Done;
    }
    if name.is_some() {
        c.name = name;
    }
    c.out.resp3 = resp3;
    c.out.map(7);
    c.out.bulk(b"server");
    c.out.bulk(b"redis");
    c.out.bulk(b"version");
    c.out.bulk(REDIS_VERSION.as_bytes());
    c.out.bulk(b"proto");
    c.out.int(if resp3 { 3 } else { 2 });
    c.out.bulk(b"id");
    c.out.int(c.id as i64);
    c.out.bulk(b"mode");
    c.out.bulk(b"standalone");
    c.out.bulk(b"role");
    c.out.bulk(b"master");
    c.out.bulk(b"modules");
    c.out.array(0);
    Then::Done
}

fn select(c: &mut Conn, args: &[Bytes]) -> Then {
    if &args[0][..] == b"0" {
        c.out.ok();
    } else {
        c.out.error("ERR wasmq: one RESP listener serves one vhost ([redis] vhost in the config): only SELECT 0");
    }
    Then::Done
}

fn client(c: &mut Conn, args: &[Bytes]) -> Then {
    let sub = args[0].to_ascii_uppercase();
    match (&sub[..], args.len()) {
        (b"SETNAME", 2) => {
            if args[1].iter().any(|b| *b <= b' ' || *b > b'~') {
                c.out.error(
                    "ERR Client names cannot contain spaces, newlines or special characters.",
                );
            } else {
                c.name = (!args[1].is_empty()).then(|| args[1].clone());
                c.out.ok();
            }
        }
        (b"GETNAME", 1) => match &c.name {
            Some(n) => {
                let n = n.clone();
                c.out.bulk(&n)
            }
            None => c.out.null(),
        },
        (b"ID", 1) => c.out.int(c.id as i64),
        // What a client library says of itself (redis-py, node-redis send
        // it on connect): taken, not kept.
        (b"SETINFO", 3) => c.out.ok(),
        (b"INFO", 1) => {
            let text = format!(
                "id={} addr={} name={} db=0 user={} resp={}\n",
                c.id,
                c.peer,
                c.name
                    .as_ref()
                    .map_or(String::new(), |n| String::from_utf8_lossy(n).into_owned()),
                c.login.as_ref().map_or("", |l| l.user.as_str()),
                if c.out.resp3 { 3 } else { 2 }
            );
            c.out.bulk(text.as_bytes());
        }
        _ => c.out.error(&format!(
            "ERR unknown subcommand or wrong number of arguments for '{}'. Try CLIENT HELP.",
            crate::untrusted::text(&String::from_utf8_lossy(&args[0]))
        )),
    }
    Then::Done
}

fn info(c: &mut Conn, _: &[Bytes]) -> Then {
    let vhost = c.vhost();
    let queues = vhost.queues();
    let (mut ready, mut unacked) = (0usize, 0u64);
    for q in &queues {
        ready += q.len();
        unacked += q.unacked();
    }
    let subs = c.shared.subscriptions.lock();
    let text = format!(
        "# Server\r\nredis_version:{REDIS_VERSION}\r\nredis_mode:standalone\r\nwasmq_version:{}\r\nprocess_id:{}\r\ntcp_port:{}\r\n\r\n\
         # Clients\r\nconnected_clients:{}\r\n\r\n\
         # Persistence\r\naof_enabled:{}\r\n\r\n\
         # Pubsub\r\npubsub_channels:{}\r\npubsub_patterns:{}\r\n\r\n\
         # Keyspace\r\nwasmq_vhost:{}\r\nwasmq_queues:{}\r\nwasmq_messages_ready:{ready}\r\nwasmq_messages_unacknowledged:{unacked}\r\n",
        env!("CARGO_PKG_VERSION"),
        std::process::id(),
        c.peer.port(),
        c.broker.connections().len(),
        u8::from(c.broker.store().is_some()),
        subs.channels.len(),
        subs.patterns.len(),
        vhost.name,
        queues.len(),
    );
    drop(subs);
    c.out.bulk(text.as_bytes());
    Then::Done
}

fn command(c: &mut Conn, args: &[Bytes]) -> Then {
    let sub = args.first().map(|a| a.to_ascii_uppercase());
    match sub.as_deref() {
        None => {
            let all: Vec<_> = all_specs().collect();
            c.out.array(all.len());
            for s in all {
                describe(&mut c.out, s);
            }
        }
        Some(b"COUNT") => c.out.int(all_specs().count() as i64),
        Some(b"INFO") => {
            c.out.array(args.len() - 1);
            for a in &args[1..] {
                match all_specs().find(|s| s.name.as_bytes().eq_ignore_ascii_case(a)) {
                    Some(s) => describe(&mut c.out, s),
                    None => c.out.null(),
                }
            }
        }
        // redis-cli asks for its hints: it has none from here.
        Some(b"DOCS") => c.out.map(0),
        Some(_) => c.out.error(&format!(
            "ERR unknown subcommand '{}'. Try COMMAND HELP.",
            crate::untrusted::text(&String::from_utf8_lossy(&args[0]))
        )),
    }
    Then::Done
}

fn describe(out: &mut Out, s: &Spec) {
    out.array(6);
    out.bulk(s.name.as_bytes());
    out.int(s.arity);
    out.array(s.flags.len());
    for f in s.flags {
        out.simple(f);
    }
    out.int(s.keys.0);
    out.int(s.keys.1);
    out.int(s.keys.2);
}

fn reset(c: &mut Conn, _: &[Bytes]) -> Then {
    c.unblock();
    c.unsubscribe_all();
    c.name = None;
    c.out.resp3 = false;
    c.out.simple("RESET");
    Then::Done
}

/// Counted for `INFO` and `PUBSUB`.
pub(super) fn bump(counts: &mut std::collections::HashMap<Vec<u8>, usize>, key: &[u8], up: bool) {
    if up {
        *counts.entry(key.to_vec()).or_default() += 1;
    } else if let Some(n) = counts.get_mut(key) {
        *n -= 1;
        if *n == 0 {
            counts.remove(key);
        }
    }
}
