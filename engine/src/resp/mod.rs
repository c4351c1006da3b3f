//! The Redis front end: RESP2 and RESP3 (`HELLO 3`) on their own listener,
//! so a service that talks to Redis lists and pub/sub moves to wasmq
//! without a rewrite, one service at a time.
//!
//! What a Redis client does maps onto the broker the way the people moving
//! off Redis use it:
//!
//! * **A list is a durable queue** of the listener's vhost, named by its
//!   key: `LPUSH`/`RPUSH` publish to it through the default exchange (the
//!   queue is declared on first use) and answer once the message is as safe
//!   as a publisher confirm says; `RPOP`/`LPOP`/`BRPOP`/`BLPOP` take from
//!   its head; `LMOVE`/`RPOPLPUSH`/`BLMOVE` write the message to the other
//!   queue before it leaves the first. A queue declared over AMQP is the
//!   same queue. Whatever end a command names, a push joins the tail and a
//!   pop takes the head, so `LPUSH`+`RPOP` and `RPUSH`+`LPOP` are the FIFO
//!   queues they are in Redis; a list used as a stack is not served.
//! * **A channel is a routing key** of a topic exchange (`amq.topic` by
//!   default): `PUBLISH` publishes there, and each `SUBSCRIBE` or
//!   `PSUBSCRIBE` is a private queue bound to it, so Redis subscribers and
//!   AMQP consumers hear each other. Patterns are Redis's globs, matched by
//!   the built-in `redis-channel` binding filter.
//! * **Logins are the broker's users**, permissions as for AMQP.
//!
//! * `request`: commands off the wire, every length bounded.
//! * `reply`: replies in RESP2 or RESP3.
//! * `connection`: one task per client: login, the connection commands,
//!   replies held in order until what they report is on disk.
//! * `lists`, `pubsub`: the two halves of the mapping above.
//! * `remote`: on a cluster node, lists whose queues live on other nodes.

mod connection;
mod lists;
mod pubsub;
mod remote;
pub mod reply;
pub mod request;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use parking_lot::Mutex;
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::Broker;

/// `[redis]`: the RESP listener.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisSection {
    /// Where RESP listens; absent: no RESP listener.
    pub listen: Option<SocketAddr>,
    /// Where RESP over TLS listens (`redis-cli --tls`); needs `[tls]`,
    /// whose certificates it serves, as AMQPS does.
    pub listen_tls: Option<SocketAddr>,
    /// The vhost whose queues are the lists and whose topic exchange
    /// carries the channels.
    pub vhost: String,
    /// The user a one-argument `AUTH password` logs in as (Redis's
    /// `default` user).
    pub default_user: String,
    /// The topic exchange `PUBLISH` publishes to and subscriptions bind to.
    pub exchange: String,
    /// The type of the queue a push declares for a new key: `classic` or
    /// `quorum`.
    pub queue_type: QueueType,
}

/// `[redis] queue_type`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QueueType {
    /// A durable classic queue.
    #[default]
    Classic,
    /// A quorum queue.
    Quorum,
}

impl Default for RedisSection {
    fn default() -> Self {
        RedisSection {
            listen: None,
            listen_tls: None,
            vhost: "/".into(),
            default_user: "guest".into(),
            exchange: "amq.topic".into(),
            queue_type: QueueType::Classic,
        }
    }
}

/// What every RESP connection of a listener shares.
#[derive(Debug)]
pub(crate) struct Shared {
    pub settings: RedisSection,
    /// Largest bulk (a pushed message) once logged in.
    pub max_bulk: usize,
    /// Who is subscribed to what, for `PUBSUB`.
    pub subscriptions: Mutex<Subscribed>,
}

/// The listener's subscriptions by channel and by pattern, counted.
#[derive(Debug, Default)]
pub(crate) struct Subscribed {
    pub channels: HashMap<Vec<u8>, usize>,
    pub patterns: HashMap<Vec<u8>, usize>,
}

/// What every connection of the RESP listeners shares.
pub struct Front(Arc<Shared>);

impl Front {
    /// The front end of `settings`, taking bulks of at most `max_bulk`
    /// bytes once logged in.
    pub fn new(settings: RedisSection, max_bulk: usize) -> Front {
        Front(Arc::new(Shared {
            settings,
            max_bulk,
            subscriptions: Mutex::default(),
        }))
    }
}

/// Accept RESP connections on `listener` until `shutdown` is cancelled;
/// with `tls`, each is RESP over TLS, its handshake in its own task.
pub async fn serve(
    broker: Arc<Broker>,
    listener: TcpListener,
    front: Arc<Front>,
    tls: Option<Arc<crate::tls::Tls>>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) -> std::io::Result<()> {
    let shared = front.0.clone();
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!("RESP accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => return Ok(()),
        };
        let _ = stream.set_nodelay(true);
        let (broker, shared, shutdown) = (broker.clone(), shared.clone(), shutdown.clone());
        match &tls {
            None => {
                tracker.spawn(connection::run(
                    broker,
                    shared,
                    connection::Stream::Tcp(stream),
                    peer,
                    shutdown,
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
                            shared,
                            connection::Stream::Tls(Box::new(s)),
                            peer,
                            shutdown,
                        )
                        .await
                    }
                });
            }
        }
    }
}
