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

mod access;
mod api;
mod authoring;
pub mod client;
pub mod cluster;
pub mod follow;
pub mod http;
mod metrics;
pub mod model;
mod policies;
mod ui;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::Broker;
use crate::access::Login;
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
    /// Open connections at most (kept under a quarter of the process's
    /// descriptor limit); one past it is closed at once.
    pub max_connections: usize,
    /// Open connections from one address at most.
    pub max_connections_per_source: usize,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            enabled: true,
            listen: "127.0.0.1:15672".parse().expect("address"),
            metrics_auth: false,
            max_upload_mib: 16,
            tls: false,
            max_connections: 512,
            max_connections_per_source: 64,
        }
    }
}

/// What the handlers share.
#[derive(Clone)]
pub(crate) struct AdminState {
    broker: Arc<Broker>,
    started: Instant,
    amqp_addr: SocketAddr,
    metrics_auth: bool,
    /// The admin port's connections (counted in `/metrics`).
    connections: Arc<http::Connections>,
    /// Followers of plugin logs.
    followers: Arc<follow::Followers>,
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
    config: AdminConfig,
    amqp_addr: SocketAddr,
    listener: TcpListener,
    tls: Option<Arc<Tls>>,
    shutdown: CancellationToken,
) {
    let connections = Arc::new(http::Connections::new(
        config.max_connections,
        config.max_connections_per_source,
        http::descriptor_limit(),
    ));
    let state = AdminState {
        broker,
        started: Instant::now(),
        amqp_addr,
        metrics_auth: config.metrics_auth,
        connections: connections.clone(),
        followers: follow::followers(),
    };
    // The body deadline runs inside authentication: nobody's body is read
    // before they have logged in.
    let max_upload = config.max_upload_mib << 20;
    let app = api::routes(max_upload)
        .merge(ui::routes())
        .merge(access::routes())
        .merge(policies::routes())
        .merge(cluster::routes())
        .merge(authoring::routes(max_upload))
        .layer(axum::middleware::from_fn(http::body_deadline))
        .layer(axum::middleware::from_fn_with_state(state.clone(), auth))
        .with_state(state);
    http::serve(listener, app, connections, tls, shutdown).await;
}

/// 400 unless `name` is a plugin name the API takes (it becomes a file
/// name: a name too long for one is the request's fault, not the broker's).
pub(crate) fn plugin_name(name: &str) -> Result<(), ApiError> {
    if crate::plugin::valid_plugin_name(name) {
        return Ok(());
    }
    Err(ApiError::bad_request(format!(
        "plugin names are 1 to {} letters, digits, '-' and '_' (got {} bytes: '{}')",
        crate::plugin::MAX_PLUGIN_NAME,
        name.len(),
        crate::untrusted::text(name)
    )))
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
/// own connections. What is not a vhost's object (plugin files, their
/// logs, versions and rollouts) needs `monitoring`, and a plugin's bytes
/// `administrator` (the access table in `docs/configuration.md`).
#[derive(Clone, Debug)]
pub(crate) struct Viewer {
    pub user: String,
    /// Sees everything (`administrator` or `monitoring`).
    pub all: bool,
    /// Tagged `administrator`.
    pub admin: bool,
    /// The vhosts it may see, when not all.
    vhosts: Vec<String>,
}

impl Viewer {
    fn of(user: &Login) -> Self {
        let admin = user.has_tag("administrator");
        Viewer {
            user: user.name.clone(),
            all: admin || user.has_tag("monitoring"),
            admin,
            vhosts: user.vhosts.clone(),
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

    /// 403 unless it is tagged `monitoring` or `administrator`.
    pub fn monitoring(&self, what: &str) -> Result<(), ApiError> {
        if self.all {
            return Ok(());
        }
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!(
                "user '{}' lacks the monitoring or administrator tag needed to read {what}",
                self.user
            ),
        ))
    }

    /// 403 unless it is tagged `administrator`.
    pub fn administrator(&self, what: &str) -> Result<(), ApiError> {
        if self.admin {
            return Ok(());
        }
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!(
                "user '{}' lacks the administrator tag needed to read {what}",
                self.user
            ),
        ))
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
        || ui::is_asset(request.uri().path())
    {
        return next.run(request).await;
    }
    // The web UI asks with its own login form: no browser dialog for it.
    let from_ui = request.headers().contains_key("x-requested-with");
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
            state
                .broker
                .accounts()
                .authenticate(name, password, peer.ip())
        });
    if let Some(user) = user {
        // RabbitMQ's management tags: administrators may do everything,
        // monitoring (or management) users may look; others are AMQP-only.
        let reads = matches!(*request.method(), Method::GET | Method::HEAD);
        if user.has_tag("administrator")
            || (reads && (user.has_tag("monitoring") || user.has_tag("management")))
        {
            let viewer = Viewer::of(&user);
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
    if !from_ui {
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Basic realm=\"wasmq\""),
        );
    }
    response
}
