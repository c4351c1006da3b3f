//! The AMQP 0-9-1 front end: what makes RabbitMQ clients (pika, lapin,
//! amqplib, the Java client) work unchanged.
//!
//! * [`frame`]: frames to and from bytes; no sockets.
//! * `handshake`: protocol header, start/start-ok with PLAIN, AMQPLAIN or
//!   EXTERNAL, tune, open: what a connection starts with.
//! * `connection`: one task per client connection: the handshake, then a
//!   loop that reads frames, runs channel methods against the
//!   [`Broker`], receives deliveries from queues, and writes everything back
//!   in batches (`connection/mod.rs`); what the connection answers itself,
//!   channel 0, channel open/close and errors (`connection/control.rs`).
//!   Heartbeats both ways; a connection error closes only this connection,
//!   with its reply code.
//! * `outbox`: a connection's output buffer, and which deliveries its
//!   written bytes complete (a consumer's credit returns then).
//! * `socket`: the client's byte stream, plain TCP or TLS (AMQPS), behind
//!   one read-and-write call the connection loop waits on.
//! * [`field_table`]: the nesting bound every field table is checked
//!   against before it is decoded (a deep one would overflow the stack).
//! * `grant`: the user and permissions a connection logged in with, and
//!   the 403 a channel answers a refused method with (who may do what is
//!   [`crate::access`], shared with the config and the admin API).
//! * `channel`: per-channel state: content assembly, consumers, unacked
//!   deliveries, prefetch, publisher confirms, transactions. A method error
//!   closes only the channel.
//!
//! The broker core knows nothing of AMQP; this module turns its errors into
//! reply codes.

mod channel;
mod connection;
pub mod field_table;
pub mod frame;
mod grant;
pub(crate) mod handshake;
mod outbox;
mod socket;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub(crate) use channel::AmqpError;
use socket::Socket;

use crate::Broker;
use crate::tls::Tls;

/// Which clients' refusals (failed logins, TLS handshakes, protocol
/// headers) may be logged now: one per source address per 10 s, so that a
/// scanner or a client retrying a wrong password does not fill the log.
/// Process-wide, as the log is.
pub(crate) static REFUSALS: std::sync::LazyLock<crate::untrusted::Refusals> =
    std::sync::LazyLock::new(Default::default);

/// A queue name whose `queue.declare` panics the connection's handler.
/// Only tests set it: a panic in a handler is a bug, so nothing else
/// reaches the code that contains one (the connection still requeues its
/// deliveries and drops its exclusive queues, and the rest of the broker
/// runs on), and that code needs a test all the same.
#[doc(hidden)]
pub static PANIC_ON_DECLARE: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Front-end settings.
#[derive(Clone, Debug)]
pub struct AmqpConfig {
    /// Heartbeat proposed to clients, seconds (0 disables).
    pub heartbeat: u16,
    /// Largest frame accepted and sent, bytes.
    pub frame_max: u32,
    /// Channels per connection.
    pub channel_max: u16,
    /// Largest message body accepted, bytes.
    pub max_message_size: u64,
    /// How long a delivery may stay unacknowledged before its channel is
    /// closed (406) and it is requeued, where its queue sets none.
    pub consumer_timeout: Option<std::time::Duration>,
}

impl Default for AmqpConfig {
    fn default() -> Self {
        AmqpConfig {
            heartbeat: 60,
            frame_max: 131_072,
            channel_max: 2047,
            // RabbitMQ 3.x's default.
            max_message_size: 128 << 20,
            // RabbitMQ's default (`consumer_timeout`, 30 minutes).
            consumer_timeout: Some(std::time::Duration::from_secs(30 * 60)),
        }
    }
}

/// Accept AMQP connections on `listener` until `shutdown` is cancelled;
/// with `tls`, each is an AMQPS connection whose TLS handshake runs in its
/// own task (a slow or silent client holds up no one). Each connection
/// task is spawned on `tracker`, so the caller can wait for them to close
/// cleanly.
pub async fn serve(
    broker: Arc<Broker>,
    listener: TcpListener,
    tls: Option<Arc<Tls>>,
    config: Arc<AmqpConfig>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) -> std::io::Result<()> {
    loop {
        let (stream, peer): (_, SocketAddr) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => return Ok(()),
        };
        let _ = stream.set_nodelay(true);
        let id = crate::broker::connections::next_id();
        let (broker, config, shutdown) = (broker.clone(), config.clone(), shutdown.clone());
        match &tls {
            None => {
                tracker.spawn(connection::run(
                    broker,
                    Socket::Tcp(stream),
                    peer,
                    config,
                    shutdown,
                    id,
                ));
            }
            Some(tls) => {
                let acceptor = tls.amqp_acceptor();
                tracker.spawn(async move {
                    if let Some(s) =
                        crate::tls::accept_client(acceptor, stream, peer, &shutdown).await
                    {
                        connection::run(
                            broker,
                            Socket::Tls(Box::new(s)),
                            peer,
                            config,
                            shutdown,
                            id,
                        )
                        .await
                    }
                });
            }
        }
    }
}
