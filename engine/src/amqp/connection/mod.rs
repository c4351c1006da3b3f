//! One client connection: handshake, then the frame/delivery loop.
//!
//! One task per connection owns the socket and all channel state, so it
//! needs no locks. Each wake-up handles every complete frame one read
//! brought (a publisher's batch of messages is one read, not one task
//! hand-off per frame), takes the deliveries queues have sent it, and
//! writes everything in one batch. Once a delivery's bytes are on the
//! socket, its consumer gets its window credit back.
//!
//! Writing never stops reading. A client that is not reading its socket
//! (say, a single-threaded one blocked sending its own publishes) leaves
//! output pending; the connection keeps reading and handling its frames
//! meanwhile, or both sides could wait on each other forever. Pending output
//! is bounded all the same: no new deliveries are taken while a batch's
//! worth waits (they stay in their queues, which the consumer window
//! bounds), and reading pauses while `OUT_CAP` of replies wait.
//!
//! Flow control is by not reading: while a queue this connection published
//! into is over its watermark, or a resource alarm blocks publishers, the
//! socket is left unread (TCP then slows the client) while deliveries and
//! confirms still go out.
//!
//! `control` holds what the connection answers itself (channel 0, channel
//! open/close, errors, routing deliveries to channels); this file holds the
//! task, its state and the read/write loop.

mod control;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use amq_protocol::protocol::{AMQPClass, connection};
use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::AmqpConfig;
use super::channel::{AmqpError, Channel, Ctx, Proposal, ToNode};
use super::frame::{Frame, decode};
use super::grant::Grant;
use super::handshake::{HandshakeError, close_with, handshake, over_connection_limit};
use super::outbox::Outbox;
use super::socket::{Io, Socket};
use crate::Broker;
use crate::broker::{ConnectionInfo, Consumer, Dispatch, Map, Queue, Registered, TlsInfo, VHost};
use crate::cluster::{Applied, ClusterError};

/// Time a client has to finish the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes buffered before a write, at most; and no deliveries are taken
/// while this much output waits for a client that is not reading.
const WRITE_BATCH: usize = 256 * 1024;
/// Output waiting for the client above which its frames are not read (their
/// replies would grow it further).
const OUT_CAP: usize = 4 * WRITE_BATCH;
/// Time the last output of a closing connection has to reach its client.
const LAST_WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Read-buffer space made before a read when less than `READ_MIN` is left.
/// Bodies are slices of the buffer, so a buffer lives as long as the last
/// message read into it: kept small enough that a straggler pins little.
const READ_SIZE: usize = 16 * 1024;
const READ_MIN: usize = 1024;
/// How often a connection that is not reading its socket checks whether
/// the client has gone.
const PEER_CHECK: Duration = Duration::from_secs(1);
/// How often consumers of quorum queues that lost their leader's node try
/// to subscribe again.
const REHOME_EVERY: Duration = Duration::from_millis(500);
/// Why a connection ends when the client closed its socket.
const CLIENT_GONE: &str = "client went away";

pub(crate) async fn run(
    broker: Arc<Broker>,
    mut socket: Socket,
    peer: SocketAddr,
    config: Arc<AmqpConfig>,
    shutdown: CancellationToken,
    id: u64,
) {
    let mut buf = BytesMut::with_capacity(16 * 1024);
    let hs = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        handshake(&broker, &config, peer, &mut socket, &mut buf),
    )
    .await;
    let session = match hs {
        Ok(Ok(Some(s))) => s,
        Ok(Ok(None)) => return,
        Ok(Err(HandshakeError::Frame(e))) => {
            // A malformed frame before login still gets its reply code.
            if let Some(quiet) = crate::amqp::REFUSALS.admit(peer.ip()) {
                tracing::info!(%peer, also_refused = quiet, "handshake failed: {}", crate::untrusted::text(&e.to_string()));
            }
            close_with(&mut socket, e.reply_code(), &e.to_string(), 0, 0).await;
            return;
        }
        Ok(Err(e)) => {
            tracing::debug!(%peer, "handshake failed: {}", crate::untrusted::text(&e.to_string()));
            return;
        }
        Err(_) => {
            if let Some(quiet) = crate::amqp::REFUSALS.admit(peer.ip()) {
                tracing::info!(%peer, also_refused = quiet, "handshake timed out");
            }
            return;
        }
    };
    let frame_max = session.frame_max;
    let info = Arc::new(
        ConnectionInfo::new(
            id,
            peer,
            session.user.clone(),
            session.vhost.name.clone(),
            session.heartbeat,
            frame_max,
            session.client.clone(),
        )
        .with_tls(socket_tls(&socket)),
    );
    let registered = match broker.connections().register_unless(info, |open| {
        over_connection_limit(&broker, &session.user, &session.vhost.name, open)
    }) {
        Ok(r) => r,
        Err(why) => {
            close_with(&mut socket, 530, &why, 10, 40).await;
            return;
        }
    };
    tracing::info!(%peer, connection = id, user = %session.user, vhost = %session.vhost.name, "connection opened");
    let (dispatch_tx, dispatch_rx) = mpsc::unbounded_channel();
    let alarm = broker.alarm();
    if let Some(remote) = broker.remote() {
        remote.register(id, dispatch_tx.clone());
    }
    let mut conn = Connection {
        id,
        registered,
        peer,
        broker,
        vhost: session.vhost,
        grant: session.grant,
        socket,
        rbuf: buf,
        unread: true,
        out: Outbox::new(64 * 1024, WRITE_BATCH),
        frame_max,
        max_message_size: config.max_message_size,
        channel_max: session.channel_max,
        heartbeat: session.heartbeat,
        cancel_notify: session.cancel_notify,
        rehoming: false,
        channels: Map::default(),
        dispatch_tx,
        exclusive_queues: Vec::new(),
        congested: Vec::new(),
        awaiting_sync: false,
        acks_ready: false,
        published: false,
        blocked_capability: session.blocked_capability,
        alarm,
        alarm_blocked: false,
        alarm_unchecked: true,
        last_read: Instant::now(),
        last_write: Instant::now(),
        proposal: None,
        committing: None,
        to_nodes: Vec::new(),
        last_synced: Default::default(),
        hold: false,
        now: None,
        earliest: None,
        consumer_timeout: config.consumer_timeout,
    };
    // The client may use the connection from here on: it is registered
    // (and counted against its limits).
    super::frame::encode_method(
        &mut conn.out.buf,
        0,
        AMQPClass::Connection(connection::AMQPMethod::OpenOk(connection::OpenOk {})),
    );
    let reason = match contain_panic(conn.run(dispatch_rx, shutdown)).await {
        Ok(reason) => reason,
        Err(why) => {
            // A handler panicked: a bug, but one connection's. Tell the
            // client (its state may be half-changed, so say no more), then
            // clean up as for any close, so its unacknowledged deliveries
            // are requeued and its exclusive queues go.
            tracing::error!(%peer, connection = id, "connection handler panicked: {why}");
            conn.close(
                541,
                "INTERNAL_ERROR - the broker failed handling this connection",
                0,
                0,
            );
            let _ = conn.flush().await;
            // As on any close: wait briefly for close-ok, reading what the
            // client still sends, so the socket is not reset under the
            // close frame.
            conn.await_close_ok().await;
            format!("internal error: {why}")
        }
    };
    conn.cleanup();
    tracing::info!(%peer, connection = id, "connection closed: {}", crate::untrusted::text(&reason));
}

/// What the admin API shows of a connection's TLS.
fn socket_tls(socket: &Socket) -> Option<TlsInfo> {
    socket.tls().map(|t| TlsInfo {
        protocol: crate::tls::protocol_name(t),
        peer_cert_cn: crate::tls::peer_common_name(t),
    })
}

/// Whether the client closed its side or reset the connection, asked of the
/// socket without reading it (the unread bytes stay where they are, so TCP
/// still holds back a client that is merely blocked).
fn peer_closed(socket: &tokio::net::TcpStream) -> bool {
    use rustix::event::{PollFd, PollFlags, Timespec};
    let flags = PollFlags::RDHUP | PollFlags::HUP | PollFlags::ERR;
    let mut fds = [PollFd::new(socket, PollFlags::RDHUP)];
    let now = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    matches!(rustix::event::poll(&mut fds, Some(&now)), Ok(n) if n > 0)
        && fds[0].revents().intersects(flags)
}

/// Run `fut`, turning a panic in any of its polls into `Err` with the
/// panic's message, so that the caller's cleanup still runs. (A panic in a
/// spawned task would end the task with the connection's state unreleased.)
async fn contain_panic<F: std::future::Future>(fut: F) -> Result<F::Output, String> {
    use std::panic::{AssertUnwindSafe, catch_unwind};
    use std::task::Poll;
    let mut fut = std::pin::pin!(fut);
    std::future::poll_fn(
        |cx| match catch_unwind(AssertUnwindSafe(|| fut.as_mut().poll(cx))) {
            Ok(Poll::Ready(out)) => Poll::Ready(Ok(out)),
            Ok(Poll::Pending) => Poll::Pending,
            Err(panic) => Poll::Ready(Err(panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("(no message)")
                .to_owned())),
        },
    )
    .await
}

struct Connection {
    id: u64,
    /// Listed in the broker's connection registry while it lives.
    registered: Registered,
    peer: SocketAddr,
    broker: Arc<Broker>,
    vhost: Arc<VHost>,
    /// The user and its permissions in the vhost.
    grant: Grant,
    /// The client's stream, plain or TLS.
    socket: Socket,
    /// Bytes read and not yet decoded. Body frames are slices of it, so a
    /// message's body is never copied on its way in.
    rbuf: BytesMut,
    /// `rbuf` may hold complete frames not handled yet (reading paused, or
    /// the handshake read ahead): handle them before reading more.
    unread: bool,
    /// Output for the client, and the deliveries in it: a consumer's
    /// window credit returns once its delivery is written.
    out: Outbox<(Arc<Consumer>, Arc<Queue>)>,
    frame_max: u32,
    max_message_size: u64,
    channel_max: u16,
    heartbeat: u16,
    cancel_notify: bool,
    /// Some channel has a consumer of a quorum queue waiting to
    /// re-subscribe (its leader's node was lost, or it moved), and a
    /// [`Dispatch::Rehome`] will come in [`REHOME_EVERY`] to try again. A
    /// timer task sends it, so the message loop carries no timer of its own.
    rehoming: bool,
    channels: Map<u16, Channel>,
    dispatch_tx: mpsc::UnboundedSender<Dispatch>,
    exclusive_queues: Vec<String>,
    /// Queues this connection's publishes overfilled: while any is listed,
    /// frames from the client are not read (deliveries still go out).
    congested: Vec<Arc<Queue>>,
    /// Some channel holds publisher confirms waiting for the store's sync.
    awaiting_sync: bool,
    /// Some channel gathered acks to send once this batch of frames is
    /// handled.
    acks_ready: bool,
    /// The client has published: a resource alarm blocks it.
    published: bool,
    /// The client understands connection.blocked.
    blocked_capability: bool,
    /// The broker's resource alarm.
    alarm: tokio::sync::watch::Receiver<Option<String>>,
    /// A resource alarm blocks it (not read; told so if it asked).
    alarm_blocked: bool,
    /// The alarm changed (or it just started publishing) since it was last
    /// looked at: checked after the step, not on every one.
    alarm_unchecked: bool,
    last_read: Instant,
    last_write: Instant,
    /// A channel's method just became a definition change to commit.
    proposal: Option<Proposal>,
    /// Definition changes being committed by the cluster (made on the
    /// first one, so a broker alone never carries it).
    committing: Option<Box<Committing>>,
    /// Frames for other nodes (a cluster's message traffic), sent after
    /// the frames in hand are handled.
    to_nodes: Vec<ToNode>,
    /// How far the store had synced when last looked at.
    last_synced: crate::store::Synced,
    /// A channel just asked another node and waits for its answer.
    hold: bool,
    /// The time read for this batch of frames (see [`Ctx::now`]).
    now: Option<std::time::Instant>,
    /// The earliest deadline of an unacknowledged delivery, as far as is
    /// known (a delivery acked since may have had it).
    earliest: Option<std::time::Instant>,
    /// `[amqp] consumer_timeout_ms`.
    consumer_timeout: Option<Duration>,
}

/// A connection's definition changes in flight through the cluster.
#[derive(Default)]
pub(super) struct Committing {
    /// The changes being committed.
    pub proposals: JoinSet<(Proposal, Result<Applied, ClusterError>)>,
    /// Channels waiting for their change to be applied, and the frames
    /// they received meanwhile (handled, in order, once it is).
    pub held: Map<u16, std::collections::VecDeque<Frame>>,
}

type Committed = Result<(Proposal, Result<Applied, ClusterError>), tokio::task::JoinError>;

enum Step {
    Continue,
    Stop(String),
}

impl Connection {
    async fn run(
        &mut self,
        mut dispatch: mpsc::UnboundedReceiver<Dispatch>,
        shutdown: CancellationToken,
    ) -> String {
        let tick = if self.heartbeat == 0 {
            Duration::from_secs(3600)
        } else {
            Duration::from_millis(u64::from(self.heartbeat) * 500)
        };
        let mut heartbeat = tokio::time::interval(tick);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut liveness = tokio::time::interval(PEER_CHECK);
        liveness.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut synced = self.broker.store().map(|s| s.synced());
        let closed_by_operator = self.registered.info.closed().clone();
        // Made once: a fresh `cancelled()` future per wake-up would join and
        // leave the token's waiter list every time.
        let mut shut_down = std::pin::pin!(shutdown.cancelled());
        let mut closed = std::pin::pin!(closed_by_operator.cancelled());
        // Fires at the earliest deadline of an unacknowledged delivery
        // (set when it is earlier than the one armed).
        let mut ack_timer = std::pin::pin!(tokio::time::sleep(Duration::ZERO));
        let mut armed: Option<std::time::Instant> = None;
        loop {
            self.now = None;
            if self.earliest != armed {
                armed = self.earliest;
                if let Some(at) = armed {
                    ack_timer.as_mut().reset(at.into());
                }
            }
            let blocked = self.congested.first().cloned();
            let pending = self.pending();
            let readable = blocked.is_none() && !self.alarm_blocked && pending < OUT_CAP;
            let waiting = self.awaiting_sync && synced.is_some();
            let mut step = if readable && self.unread {
                self.frames()
            } else {
                tokio::select! {
                    biased;
                    () = &mut shut_down => {
                        self.forced_close("broker shutdown").await
                    }
                    () = &mut closed => {
                        let why = self.registered.info.close_reason();
                        self.forced_close(why.as_deref().unwrap_or("closed via the admin API")).await
                    }
                    // The sender lives in the broker this connection holds, so
                    // `changed` cannot fail.
                    _ = self.alarm.changed() => {
                        self.alarm_unchecked = true;
                        Step::Continue
                    }
                    // Writing and reading share one branch: a TLS stream is
                    // one object, not two halves.
                    io = self.socket.io(&mut self.rbuf, self.out.unsent(), readable), if pending > 0 || readable || self.socket.tls_pending() => match io {
                        Io::Wrote(Ok(0)) => return "write failed: client socket closed".into(),
                        Io::Wrote(Ok(n)) => {
                            self.wrote(n);
                            Step::Continue
                        }
                        Io::Wrote(Err(e)) => return format!("write failed: {e}"),
                        Io::Read(Ok(0) | Err(_)) => Step::Stop(CLIENT_GONE.into()),
                        Io::Read(Ok(_)) => {
                            self.last_read = Instant::now();
                            self.frames()
                        }
                    },
                    () = async { blocked.as_ref().expect("guarded").until_drained().await }, if blocked.is_some() => {
                        self.congested.retain(|q| q.ready_bytes() > 0 && q.congested());
                        if let Some(q) = &blocked {
                            self.congested.retain(|c| !Arc::ptr_eq(c, q));
                        }
                        Step::Continue
                    }
                    d = dispatch.recv(), if pending < WRITE_BATCH => {
                        match d {
                            Some(d) => self.dispatch(d),
                            None => Step::Continue,
                        }
                    }
                    Some(done) = async { self.committing.as_mut().expect("guarded").proposals.join_next().await }, if self.committing.as_ref().is_some_and(|c| !c.proposals.is_empty()) => {
                        self.committed(done)
                    }
                    _ = heartbeat.tick() => self.heartbeat_tick(),
                    () = &mut ack_timer, if armed.is_some() => {
                        self.consumer_timeouts();
                        Step::Continue
                    }
                    // Not reading (flow control, an alarm, output backed
                    // up), the connection would never see its client's
                    // EOF or reset, and would hold what it took from it
                    // (half a message, a queue's congestion) forever.
                    _ = liveness.tick(), if !readable => {
                        if peer_closed(self.socket.tcp()) {
                            Step::Stop(CLIENT_GONE.into())
                        } else {
                            Step::Continue
                        }
                    }
                    r = async { synced.as_mut().expect("guarded").changed().await }, if waiting => {
                        if r.is_err() {
                            // The store stopped (shutdown): nothing more syncs.
                            synced = None;
                        }
                        Step::Continue
                    }
                }
            };
            if self.published && self.alarm_unchecked {
                self.signal_alarm();
            }
            if self.awaiting_sync
                && let Some(rx) = &mut synced
            {
                let now = *rx.borrow_and_update();
                self.release_confirms(now);
            }
            // Batch: take whatever else is ready before writing.
            if matches!(step, Step::Continue) {
                while self.pending() < WRITE_BATCH {
                    match dispatch.try_recv() {
                        Ok(d) => {
                            step = self.dispatch(d);
                            if matches!(step, Step::Stop(_)) {
                                break;
                            }
                        }
                        Err(_) => break,
                    }
                }
            }
            if matches!(step, Step::Continue) && !self.to_nodes.is_empty() {
                step = self.send_to_nodes().await;
            }
            if let Step::Stop(reason) = step {
                // A client that only shut down its sending side still gets
                // what was processed (a gone one fails the write at once).
                let _ = self.flush().await;
                if reason != CLIENT_GONE {
                    self.await_close_ok().await;
                }
                return reason;
            }
            if let Err(e) = self.write_ready() {
                return format!("write failed: {e}");
            }
        }
    }

    /// Handle the complete frames in the read buffer, until one stops the
    /// connection, reading has to pause (flow control), or enough output
    /// is waiting that it should be written first; then send the acks the
    /// batch gathered.
    fn frames(&mut self) -> Step {
        let step = self.handle_frames();
        if std::mem::take(&mut self.acks_ready) {
            for ch in self.channels.values_mut() {
                ch.flush_acks(&mut self.out.buf);
            }
        }
        step
    }

    fn handle_frames(&mut self) -> Step {
        let start = self.out.buf.len();
        loop {
            if self.published && self.alarm_unchecked {
                // It just started publishing: an alarm raised earlier
                // blocks it from here on, mid-batch.
                self.signal_alarm();
            }
            if !self.congested.is_empty()
                || self.alarm_blocked
                || self.out.buf.len() - start >= WRITE_BATCH
                || self.pending() >= OUT_CAP
            {
                self.unread = true;
                return Step::Continue;
            }
            match decode(&mut self.rbuf, self.frame_max) {
                Ok(Some(f)) => {
                    if let Step::Stop(reason) = self.frame(f) {
                        return Step::Stop(reason);
                    }
                }
                Ok(None) => {
                    self.unread = false;
                    if self.rbuf.capacity() - self.rbuf.len() < READ_MIN {
                        self.rbuf.reserve(READ_SIZE);
                    }
                    return Step::Continue;
                }
                Err(e) => {
                    self.close(e.reply_code(), &e.to_string(), 0, 0);
                    return Step::Stop(e.to_string());
                }
            }
        }
    }

    /// Output not written yet.
    fn pending(&self) -> usize {
        self.out.pending()
    }

    /// Write as much output as the socket takes now, without waiting.
    fn write_ready(&mut self) -> std::io::Result<()> {
        while self.out.pending() > 0 {
            match self.socket.try_write(self.out.unsent()) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => self.wrote(n),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// `n` more bytes of output reached the socket: return the window
    /// credit of the deliveries they completed, and drop what is written.
    fn wrote(&mut self, n: usize) {
        self.last_write = Instant::now();
        self.out.wrote(n, |(consumer, queue)| {
            if consumer.written() {
                queue.dispatch();
            }
        });
    }

    /// Write all pending output (closing: it may wait, though not forever).
    async fn flush(&mut self) -> std::io::Result<()> {
        tokio::time::timeout(LAST_WRITE_TIMEOUT, async {
            while self.out.pending() > 0 {
                match self.socket.write(self.out.unsent()).await? {
                    0 => return Err(std::io::ErrorKind::WriteZero.into()),
                    n => self.wrote(n),
                }
            }
            // TLS may still hold the last records.
            self.socket.flush().await
        })
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
    }

    fn release_confirms(&mut self, synced: crate::store::Synced) {
        self.last_synced = synced;
        let mut waiting = false;
        let mut failed = Vec::new();
        for ch in self.channels.values_mut() {
            waiting |= ch.release_confirms(&mut self.out.buf, synced);
            if std::mem::take(&mut ch.tx_failed) {
                failed.push(ch.id);
            }
        }
        self.awaiting_sync = waiting;
        for id in failed {
            self.channel_error(
                id,
                AmqpError::new(
                    541,
                    "INTERNAL_ERROR - the transaction's messages failed to sync to disk",
                ),
            );
        }
    }

    /// Close the connection on the broker's initiative (320): confirms
    /// waiting for the disk go out first, so what was processed is synced
    /// and acknowledged.
    async fn forced_close(&mut self, why: &str) -> Step {
        if self.awaiting_sync
            && let Some(store) = self.broker.store()
        {
            store.flush().await;
            let now = *store.synced().borrow();
            self.release_confirms(now);
        }
        self.close(320, &format!("CONNECTION_FORCED - {why}"), 0, 0);
        let _ = self.flush().await;
        self.await_close_ok().await;
        Step::Stop(why.into())
    }

    /// After we sent connection.close: wait briefly for close-ok, dropping
    /// whatever else the client sent meanwhile (the spec says to).
    async fn await_close_ok(&mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            loop {
                match decode(&mut self.rbuf, self.frame_max) {
                    Ok(Some(Frame::Method(
                        0,
                        AMQPClass::Connection(connection::AMQPMethod::CloseOk(_)),
                    )))
                    | Err(_) => return,
                    Ok(Some(_)) => continue,
                    Ok(None) => {}
                }
                match self.socket.read_buf(&mut self.rbuf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
        let _ = self.socket.shutdown().await;
    }

    fn ctx(&mut self) -> (Ctx<'_>, &mut Map<u16, Channel>) {
        (
            Ctx {
                broker: &self.broker,
                vhost: &self.vhost,
                grant: &self.grant,
                out: &mut self.out.buf,
                connection: self.id,
                dispatch: &self.dispatch_tx,
                frame_max: self.frame_max,
                max_message_size: self.max_message_size,
                exclusive_queues: &mut self.exclusive_queues,
                congested: &mut self.congested,
                awaiting_sync: &mut self.awaiting_sync,
                acks_ready: &mut self.acks_ready,
                proposal: &mut self.proposal,
                to_nodes: &mut self.to_nodes,
                hold: &mut self.hold,
                now: &mut self.now,
                earliest: &mut self.earliest,
                default_consumer_timeout: self.consumer_timeout,
            },
            &mut self.channels,
        )
    }
}
