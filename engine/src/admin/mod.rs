//! The admin HTTP API and Prometheus metrics: how operators see and steer
//! a running broker without restarting it.
//!
//! Paths follow RabbitMQ's management API where they fit (`/api/overview`,
//! `/api/queues/{vhost}`, `/api/definitions`, ...) so that people and
//! scripts that know it find their way; the plugin endpoints are wasmq's
//! own. Authentication is HTTP basic against the same `[[users]]` as AMQP
//! (a loopback-only user is refused from elsewhere), with RabbitMQ's tags:
//! `administrator` may do everything, `monitoring` or `management` may only
//! read, and a user without a tag is AMQP-only. `/metrics` is open by
//! default, like RabbitMQ's Prometheus endpoint, because scrapers rarely
//! carry credentials; `admin.metrics_auth` closes it.
//!
//! The API reads the broker's own objects and counters; it keeps no state
//! of its own. A plugin upload is validated here and then written into the
//! plugin folder atomically, so it takes the same hot-swap path as a file
//! copied by hand.
//!
//! With `admin.tls` the API is served over HTTPS only, with the `[tls]`
//! certificate (reloaded like the AMQPS listener's). Each TLS handshake
//! runs in a task of its own, so one slow client holds up no other.

mod api;
mod authoring;
pub mod client;
pub mod cluster;
mod metrics;
pub mod model;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::serve::ListenerExt as _;
use base64::Engine as _;
use serde::Deserialize;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

use crate::Broker;
use crate::access::User;
use crate::tls::Tls;

/// `[admin]`: the HTTP listener.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Serve the admin API at all.
    pub enabled: bool,
    /// Listen address; loopback by default (env `WASMQ_ADMIN_LISTEN`).
    pub listen: SocketAddr,
    /// Require basic auth for `/metrics` too.
    pub metrics_auth: bool,
    /// Largest plugin upload, MiB.
    pub max_upload_mib: usize,
    /// Serve HTTPS (with the `[tls]` certificate) instead of HTTP.
    pub tls: bool,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            enabled: true,
            listen: "127.0.0.1:15672".parse().expect("address"),
            metrics_auth: false,
            max_upload_mib: 16,
            tls: false,
        }
    }
}

/// What the handlers share.
#[derive(Clone)]
pub(crate) struct AdminState {
    broker: Arc<Broker>,
    users: Arc<Vec<User>>,
    started: Instant,
    amqp_addr: SocketAddr,
    metrics_auth: bool,
}

/// An error as the API returns it: a status and a JSON body
/// `{"error": ..., "reason": ...}` (RabbitMQ's shape).
#[derive(Debug)]
pub(crate) struct ApiError(StatusCode, String);

impl ApiError {
    pub(crate) fn new(status: StatusCode, reason: impl Into<String>) -> Self {
        ApiError(status, reason.into())
    }

    pub(crate) fn not_found(what: impl std::fmt::Display) -> Self {
        ApiError(StatusCode::NOT_FOUND, format!("{what} not found"))
    }

    pub(crate) fn bad_request(reason: impl Into<String>) -> Self {
        ApiError(StatusCode::BAD_REQUEST, reason.into())
    }
}

impl From<crate::BrokerError> for ApiError {
    fn from(e: crate::BrokerError) -> Self {
        let status = match e.reply_code() {
            404 => StatusCode::NOT_FOUND,
            403 => StatusCode::FORBIDDEN,
            405 => StatusCode::LOCKED,
            406 | 503 => StatusCode::BAD_REQUEST,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(status, e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let error = self
            .0
            .canonical_reason()
            .unwrap_or("error")
            .to_ascii_lowercase();
        let body = serde_json::json!({ "error": error, "reason": self.1 });
        (self.0, axum::Json(body)).into_response()
    }
}

/// Serve the admin API on `listener` until `shutdown`; over HTTPS when
/// `tls` is given.
pub async fn serve(
    broker: Arc<Broker>,
    users: Vec<User>,
    config: AdminConfig,
    amqp_addr: SocketAddr,
    listener: TcpListener,
    tls: Option<Arc<Tls>>,
    shutdown: CancellationToken,
) {
    let state = AdminState {
        broker,
        users: Arc::new(users),
        started: Instant::now(),
        amqp_addr,
        metrics_auth: config.metrics_auth,
    };
    let app = api::routes(config.max_upload_mib << 20)
        .layer(axum::middleware::from_fn_with_state(state.clone(), auth))
        .with_state(state)
        .into_make_service_with_connect_info::<SocketAddr>();
    let stop = shutdown.clone();
    let result = match tls {
        None => {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await
        }
        Some(tls) => {
            // `tap_io` only to get axum's ConnectInfo<SocketAddr> for a
            // listener of our own.
            let listener = TlsListener::start(listener, tls, shutdown).tap_io(|_| {});
            axum::serve(listener, app)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await
        }
    };
    if let Err(e) = result {
        tracing::error!("admin API stopped: {e}");
    }
}

/// Time an HTTPS client has to finish its TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Accepted HTTPS connections, handshaken off the accept loop.
struct TlsListener {
    ready: tokio::sync::mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    addr: SocketAddr,
}

impl TlsListener {
    fn start(listener: TcpListener, tls: Arc<Tls>, shutdown: CancellationToken) -> Self {
        let addr = listener
            .local_addr()
            .unwrap_or_else(|_| ([0, 0, 0, 0], 0).into());
        let (tx, ready) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let (stream, peer) = tokio::select! {
                    r = listener.accept() => match r {
                        Ok(x) => x,
                        Err(e) => {
                            tracing::warn!("admin accept failed: {e}");
                            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                            continue;
                        }
                    },
                    () = shutdown.cancelled() => return,
                };
                let (acceptor, tx) = (tls.admin_acceptor(), tx.clone());
                tokio::spawn(async move {
                    match crate::tls::within(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(s) => {
                            let _ = tx.send((s, peer)).await;
                        }
                        Err(e) => tracing::info!(%peer, "admin TLS handshake failed: {e}"),
                    }
                });
            }
        });
        TlsListener { ready, addr }
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(x) => x,
            // Shut down: the server stops through its graceful shutdown.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.addr)
    }
}

/// Run `f` on tokio's blocking pool: broker work that compiles, builds
/// instances or writes files, which must not hold up an async worker.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

/// Who is asking, as the read endpoints need it. RabbitMQ's tags:
/// `administrator` and `monitoring` see every vhost and connection;
/// `management` sees only the vhosts it has permissions in, and only its
/// own connections.
#[derive(Clone, Debug)]
pub(crate) struct Viewer {
    pub user: String,
    /// Sees everything.
    pub all: bool,
    /// The vhosts it may see, when not all.
    vhosts: Vec<String>,
}

impl Viewer {
    fn of(user: &User) -> Self {
        Viewer {
            user: user.name.clone(),
            all: user.has_tag("administrator") || user.has_tag("monitoring"),
            vhosts: user.vhost_names(),
        }
    }

    /// Whether it may see vhost `name` and what is in it.
    pub fn sees(&self, name: &str) -> bool {
        self.all || self.vhosts.iter().any(|v| v == name)
    }

    /// Whether it may see a connection of `user`.
    pub fn sees_connection(&self, user: &str) -> bool {
        self.all || self.user == user
    }
}

/// HTTP basic auth against the AMQP users.
async fn auth(
    State(state): State<AdminState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Request,
    next: Next,
) -> Response {
    if (request.uri().path() == "/metrics" && !state.metrics_auth)
        || request.uri().path() == "/ready"
    {
        return next.run(request).await;
    }
    let credentials = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        .and_then(|b| String::from_utf8(b).ok());
    let user = credentials
        .as_deref()
        .and_then(|c| c.split_once(':'))
        .and_then(|(name, password)| {
            crate::access::authenticate(&state.users, name, password, peer.ip())
        });
    if let Some(user) = user {
        // RabbitMQ's management tags: administrators may do everything,
        // monitoring (or management) users may look; others are AMQP-only.
        let reads = matches!(*request.method(), Method::GET | Method::HEAD);
        if user.has_tag("administrator")
            || (reads && (user.has_tag("monitoring") || user.has_tag("management")))
        {
            let viewer = Viewer::of(user);
            let mut request = request;
            request.extensions_mut().insert(viewer);
            return next.run(request).await;
        }
        let needed = if reads {
            "the administrator, monitoring or management tag"
        } else {
            "the administrator tag"
        };
        return ApiError::new(
            StatusCode::FORBIDDEN,
            format!("user '{}' lacks {needed} for this request", user.name),
        )
        .into_response();
    }
    let mut response = ApiError::new(
        StatusCode::UNAUTHORIZED,
        "login failed (HTTP basic auth with an AMQP user)",
    )
    .into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Basic realm=\"wasmq\""),
    );
    response
}
