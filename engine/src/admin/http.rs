//! The admin port's connections: admitted within bounds, timed, and served
//! by hyper.
//!
//! `axum::serve` holds every connection it accepts for as long as the
//! client keeps it, with no deadline for the request's headers: 19,990
//! connections that never finished a request took the broker's file
//! descriptors, and AMQP clients then failed to connect ("Too many open
//! files"). Here a connection is admitted only while fewer than
//! [`AdminConfig::max_connections`](super::AdminConfig) are open
//! ([`AdminConfig::max_connections_per_source`](super::AdminConfig) from
//! one address), and that cap is itself kept under a share of the
//! process's descriptor limit, so the AMQP listener always has
//! descriptors left. A request's headers must arrive within
//! [`HEADER_TIMEOUT`] (an idle keep-alive connection is closed after it
//! too) and its body within [`BODY_TIMEOUT`]; hyper's buffers are bounded
//! by [`BUFFER_BYTES`], which also bounds a request's headers.
//!
//! A connection past a bound is closed at once, before anything is read
//! from it, and counted (`wasmq_admin_connections_refused_total`).

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Request};
use axum::middleware::Next;
use axum::response::Response;
use futures::StreamExt as _;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt as _;

use crate::tls::Tls;

/// Time a client has to send a request's headers (and an idle keep-alive
/// connection's next request).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a client has to send a request's body once its headers are in.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// Time an HTTPS client has to finish its TLS handshake.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// hyper's read and write buffer per connection: the largest request head,
/// and what a connection holds of a response its client does not read.
pub const BUFFER_BYTES: usize = 64 << 10;
/// Of the process's descriptor limit, the share the admin port may hold
/// (one in four): the rest is for AMQP clients, queue files and cluster
/// links.
const DESCRIPTOR_SHARE: u64 = 4;

/// The admin port's open connections, by source address.
#[derive(Debug)]
pub(crate) struct Connections {
    open: Arc<crate::untrusted::Places<IpAddr>>,
    /// Connections closed at once for being past a bound.
    pub refused: AtomicU64,
}

/// One admitted connection; its place is given back when dropped.
pub(crate) type Admitted = crate::untrusted::Place<IpAddr>;

impl Connections {
    /// Bounds of `max` connections, `max_per_source` from one address;
    /// `max` is kept under [`DESCRIPTOR_SHARE`] of `descriptors` (the
    /// process's limit, if known).
    pub(crate) fn new(max: usize, max_per_source: usize, descriptors: Option<u64>) -> Self {
        let max = match descriptors {
            Some(n) => max.min(usize::try_from(n / DESCRIPTOR_SHARE).unwrap_or(usize::MAX)),
            None => max,
        };
        Connections {
            open: crate::untrusted::Places::new(max, max_per_source),
            refused: AtomicU64::new(0),
        }
    }

    /// The cap in force (after the descriptor share).
    pub(crate) fn max(&self) -> usize {
        self.open.total()
    }

    /// Open connections.
    pub(crate) fn open(&self) -> usize {
        self.open.held()
    }

    pub(crate) fn admit(&self, source: IpAddr) -> Option<Admitted> {
        let admitted = self.open.take(source).ok();
        if admitted.is_none() {
            self.refused.fetch_add(1, Ordering::Relaxed);
        }
        admitted
    }
}

/// The process's limit on open descriptors, raised to its hard limit
/// first (as servers that hold many sockets do): the soft limit is often
/// 1024 while the hard one allows far more.
pub(crate) fn descriptor_limit() -> Option<u64> {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut l = getrlimit(Resource::Nofile);
    if l.current < l.maximum {
        l.current = l.maximum;
        // Not allowed to raise it: the soft limit stays what it was.
        let _ = setrlimit(Resource::Nofile, l);
        l = getrlimit(Resource::Nofile);
    }
    l.current
}

/// Serve `app` on `listener` until `shutdown`, each connection admitted by
/// `gate`, over TLS with `tls`. Returns once every connection has ended.
pub(crate) async fn serve(
    listener: TcpListener,
    app: Router,
    gate: Arc<Connections>,
    tls: Option<Arc<Tls>>,
    shutdown: CancellationToken,
) {
    let tracker = TaskTracker::new();
    let refusals = crate::untrusted::Refusals::default();
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!("admin accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        let Some(admitted) = gate.admit(peer.ip()) else {
            if let Some(quiet) = refusals.admit(peer.ip()) {
                tracing::warn!(%peer, also_refused = quiet, open = gate.open(), max = gate.max(), "admin connection refused: too many open");
            }
            drop(stream);
            continue;
        };
        stream.set_nodelay(true).ok();
        let (app, tls, shutdown) = (app.clone(), tls.clone(), shutdown.clone());
        tracker.spawn(async move {
            let _admitted = admitted;
            match tls {
                None => connection(stream, peer, app, shutdown).await,
                Some(tls) => {
                    let accepted = crate::tls::within(
                        TLS_HANDSHAKE_TIMEOUT,
                        tls.admin_acceptor().accept(stream),
                    )
                    .await;
                    match accepted {
                        Ok(s) => connection(s, peer, app, shutdown).await,
                        Err(e) => tracing::info!(%peer, "admin TLS handshake failed: {e}"),
                    }
                }
            }
        });
    }
    tracker.close();
    tracker.wait().await;
}

/// One HTTP/1.1 connection, until its client closes it, a deadline passes,
/// or the broker shuts down (the request in progress is answered first).
async fn connection<S>(io: S, peer: SocketAddr, app: Router, shutdown: CancellationToken)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |mut request: Request<hyper::body::Incoming>| {
        request.extensions_mut().insert(ConnectInfo(peer));
        let app = app.clone();
        async move {
            let response = app.oneshot(request.map(Body::new)).await;
            Ok::<_, Infallible>(response.unwrap_or_else(|never| match never {}))
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(BUFFER_BYTES);
    let conn = builder.serve_connection(TokioIo::new(io), service);
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(%peer, "admin connection ended: {e}");
            }
        }
        () = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            // A follower's stream never ends by itself: give the request
            // in progress a moment, then drop it.
            let _ = tokio::time::timeout(Duration::from_secs(2), conn).await;
        }
    }
}

/// A request's body must arrive within [`BODY_TIMEOUT`] of its headers;
/// a client that stalls gets an error (the handler answers 400) instead
/// of holding its connection.
pub(crate) async fn body_deadline(request: Request, next: Next) -> Response {
    let (parts, body) = request.into_parts();
    let deadline = tokio::time::Instant::now() + BODY_TIMEOUT;
    let stream = futures::stream::unfold(Some(body.into_data_stream()), move |state| async move {
        let mut data = state?;
        match tokio::time::timeout_at(deadline, data.next()).await {
            Ok(Some(chunk)) => Some((chunk, Some(data))),
            Ok(None) => None,
            Err(_) => Some((
                Err(axum::Error::new(format!(
                    "request body not received within {BODY_TIMEOUT:?}"
                ))),
                None,
            )),
        }
    });
    next.run(Request::from_parts(parts, Body::from_stream(stream)))
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_connections_are_counted() {
        let gate = Connections::new(2, 1, None);
        let a: IpAddr = "127.0.0.2".parse().unwrap();
        let _held = gate.admit(a).unwrap();
        assert!(gate.admit(a).is_none(), "a second from one source");
        assert_eq!((gate.open(), gate.refused.load(Ordering::Relaxed)), (1, 1));
    }

    #[test]
    fn the_cap_stays_under_a_share_of_the_descriptors() {
        assert_eq!(Connections::new(512, 64, Some(1024)).max(), 256);
        assert_eq!(Connections::new(512, 64, Some(1 << 20)).max(), 512);
        let small = Connections::new(512, 64, Some(100));
        assert_eq!((small.max(), small.open.per_key()), (25, 25));
    }
}
