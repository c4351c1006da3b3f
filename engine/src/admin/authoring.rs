//! The plugin author's loop over HTTP: stage a candidate version (shadow
//! or canary), promote or abort it, roll back to a kept version, and trace
//! a message through an exchange.
//!
//! Every change here is a POST, PUT or DELETE, so it needs the
//! `administrator` tag (the admin API's rule); reading a candidate, the
//! kept versions, the rollout history or a plugin's log needs `monitoring`,
//! a plugin's bytes `administrator`. Traces and captures belong to a
//! vhost: a `management` user sees those of its vhosts only.
//! The broker does the work (`author::candidate`, `author::trace`); this
//! file turns requests into its calls and its answers into [`super::model`]
//! types the CLI reads back.

use std::sync::atomic::Ordering;

use axum::extract::{DefaultBodyLimit, Extension, Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Value, json};

use super::api::{PublishBody, message_from};
use super::model::{CandidateView, CaptureView, KeptVersionView, RolloutsView};
use super::{AdminState, ApiError, Viewer, blocking};
use crate::author::candidate::{Event, Mode, Policy, RolloutError};
use crate::author::capture::CaptureSpec;
use crate::author::trace::Trace;

pub(super) fn routes(max_upload: usize) -> Router<AdminState> {
    Router::new()
        .route(
            "/api/plugins/{name}/candidate",
            get(candidate)
                .put(stage)
                .delete(abort)
                .layer(DefaultBodyLimit::max(max_upload)),
        )
        .route("/api/plugins/{name}/candidate/canary", post(to_canary))
        .route("/api/plugins/{name}/candidate/promote", post(promote))
        .route("/api/plugins/{name}/rollback", post(rollback))
        .route("/api/plugins/{name}/versions", get(versions))
        .route("/api/plugins/{name}/wasm", get(wasm))
        .route("/api/rollouts", get(rollouts))
        .route("/api/exchanges/{vhost}/{name}/trace", post(trace))
        .route("/api/traces", get(traces))
        .route("/api/plugins/{name}/logs", get(logs))
        .route(
            "/api/exchanges/{vhost}/{name}/capture",
            get(capture_status).post(start_capture).delete(stop_capture),
        )
        .route(
            "/api/exchanges/{vhost}/{name}/capture/take",
            post(take_capture),
        )
}

fn capture_view(c: &crate::author::capture::Capture) -> CaptureView {
    CaptureView {
        spec: c.spec.clone(),
        done: c.done(),
        kept: c.len(),
        seen: c.seen.load(Ordering::Relaxed),
    }
}

fn exchange_of(
    s: &AdminState,
    v: &str,
    name: &str,
) -> Result<std::sync::Arc<crate::broker::Exchange>, ApiError> {
    Ok(super::api::vhost(s, v)?.exchange(name)?)
}

/// Start capturing what is published to an exchange (administrators only:
/// a capture holds message bodies). The body is a JSON object of
/// [`CaptureSpec`] fields, or empty for the defaults.
async fn start_capture(
    State(s): State<AdminState>,
    Path((v, name)): Path<(String, String)>,
    body: Bytes,
) -> Result<(StatusCode, Json<CaptureView>), ApiError> {
    let spec = capture_spec(&body)?;
    let c = exchange_of(&s, &v, &name)?.start_capture(&v, spec);
    tracing::info!(exchange = %crate::untrusted::text(&name), vhost = %crate::untrusted::text(&v), count = c.spec.count, sample = c.spec.sample, "capture started");
    Ok((StatusCode::CREATED, Json(capture_view(&c))))
}

/// A capture's spec from a request body: an object, or nothing for the
/// defaults (serde would take an array of the fields too, and `[]` as
/// every default).
fn capture_spec(body: &[u8]) -> Result<CaptureSpec, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(CaptureSpec::default());
    }
    let value: Value =
        serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("capture: {e}")))?;
    if !value.is_object() {
        return Err(ApiError::bad_request(
            "capture: the body is a JSON object (count, sample, max_bytes) or empty",
        ));
    }
    let spec: CaptureSpec = serde_json::from_value(value)
        .map_err(|e| ApiError::bad_request(format!("capture: {e}")))?;
    if spec.count == 0 {
        return Err(ApiError::bad_request("count: capture at least one message"));
    }
    if spec.sample == 0 {
        return Err(ApiError::bad_request(
            "sample: keep one message in 1 or more",
        ));
    }
    if spec.max_bytes == 0 {
        return Err(ApiError::bad_request("max_bytes: at least one byte"));
    }
    Ok(spec)
}

/// How a capture is doing (counts only: the messages need a POST), to
/// whoever may see the vhost.
async fn capture_status(
    State(s): State<AdminState>,
    Extension(viewer): Extension<Viewer>,
    Path((v, name)): Path<(String, String)>,
) -> Result<Json<CaptureView>, ApiError> {
    let c = super::api::visible_vhost(&s, &viewer, &v)?
        .exchange(&name)?
        .capture()
        .ok_or_else(|| ApiError::not_found(format!("a capture on exchange '{name}'")))?;
    Ok(Json(capture_view(&c)))
}

/// The captured messages, as one JSON array written as it is made (the
/// capture holds messages as published; their JSON is made a few at a
/// time, off the async workers, never all at once); the capture ends.
async fn take_capture(
    State(s): State<AdminState>,
    Path((v, name)): Path<(String, String)>,
) -> Result<axum::response::Response, ApiError> {
    use axum::response::IntoResponse;
    let c = exchange_of(&s, &v, &name)?
        .stop_capture()
        .ok_or_else(|| ApiError::not_found(format!("a capture on exchange '{name}'")))?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    tokio::task::spawn_blocking(move || {
        for chunk in c.json_chunks(TAKE_CHUNK) {
            // The client left: stop making JSON for nobody.
            if tx.blocking_send(Ok(chunk)).is_err() {
                return;
            }
        }
    });
    let body = axum::body::Body::from_stream(tokio_stream_of(rx));
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response())
}

/// JSON bytes a capture's take makes before handing them on.
const TAKE_CHUNK: usize = 64 << 10;

fn tokio_stream_of<T: Send + 'static>(
    rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures::Stream<Item = T> + Send + 'static {
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|x| (x, rx)) })
}

async fn stop_capture(
    State(s): State<AdminState>,
    Path((v, name)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    exchange_of(&s, &v, &name)?.stop_capture();
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize, Default)]
struct LogsQuery {
    /// Stream lines as they are written (server-sent events).
    #[serde(default)]
    follow: bool,
}

/// A plugin's last log lines, or (`?follow=true`) its lines as they are
/// written, as server-sent events: one `data:` line of JSON per log line.
/// A follower that falls a whole ring of lines behind has stopped reading:
/// it gets a `missed` event with the count and is let go. Only a plugin
/// that is loaded has a log here (404 otherwise: asking creates nothing).
async fn logs(
    State(s): State<AdminState>,
    Extension(viewer): Extension<Viewer>,
    Path(name): Path<String>,
    Query(q): Query<LogsQuery>,
) -> Result<axum::response::Response, ApiError> {
    super::plugin_name(&name)?;
    use axum::response::IntoResponse;
    use axum::response::sse::{Event, KeepAlive, Sse};
    viewer.monitoring("plugin logs")?;
    let known = s.broker.plugins().get(&name).is_some()
        || s.broker.candidates().get(&name).is_some()
        || s.broker.host().has_plugin_log(&name);
    if !known {
        return Err(ApiError::not_found(format!(
            "plugin '{}'",
            crate::untrusted::text(&name)
        )));
    }
    let log = s.broker.host().plugin_log(&name);
    if !q.follow {
        return Ok(Json(log.recent()).into_response());
    }
    let place = super::follow::follow(&s.followers, &viewer.user)
        .map_err(|why| ApiError::new(StatusCode::TOO_MANY_REQUESTS, why))?;
    let rx = log.follow();
    let stream = futures::stream::unfold(Some((rx, place)), |state| async move {
        use tokio::sync::broadcast::error::RecvError;
        let (mut rx, place) = state?;
        match rx.recv().await {
            Ok(line) => {
                let event = Event::default().json_data(&*line).ok()?;
                Some((Ok::<_, std::convert::Infallible>(event), Some((rx, place))))
            }
            // A whole ring behind: it is not reading. Tell it, then let go
            // (the place goes with the state).
            Err(RecvError::Lagged(n)) => Some((
                Ok(Event::default().event("missed").data(n.to_string())),
                None,
            )),
            Err(RecvError::Closed) => None,
        }
    });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}

impl From<RolloutError> for ApiError {
    fn from(e: RolloutError) -> Self {
        let status = match &e {
            RolloutError::NotServing(_)
            | RolloutError::NoCandidate(_)
            | RolloutError::NotKept { .. } => StatusCode::NOT_FOUND,
            RolloutError::Clustered => StatusCode::CONFLICT,
            RolloutError::NoQuorum(_) => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::BAD_REQUEST,
        };
        ApiError::new(status, e.to_string())
    }
}

async fn candidate(
    State(s): State<AdminState>,
    Extension(viewer): Extension<Viewer>,
    Path(name): Path<String>,
) -> Result<Json<CandidateView>, ApiError> {
    super::plugin_name(&name)?;
    viewer.monitoring("a plugin's candidate")?;
    let t = s
        .broker
        .candidates()
        .get(&name)
        .ok_or_else(|| ApiError::from(RolloutError::NoCandidate(name)))?;
    Ok(Json(super::api::candidate_view(&t)))
}

/// How to stage: `mode=shadow&sample=10` or `mode=canary&percent=10`. A
/// canary's bounds are read from the same query string as a [`Policy`]
/// (any not given keeps its default).
#[derive(Deserialize)]
struct StageQuery {
    mode: String,
    /// Shadow: one message in this many.
    sample: Option<u32>,
    /// Canary: the share of routing keys, in percent.
    percent: Option<f64>,
    /// Canary: choose by this header's value instead of the routing key.
    by_header: Option<String>,
}

fn mode(q: &StageQuery) -> Result<Mode, ApiError> {
    match q.mode.as_str() {
        "shadow" => Ok(Mode::Shadow {
            every: q.sample.unwrap_or(1),
        }),
        "canary" => Ok(Mode::Canary {
            percent: q
                .percent
                .ok_or_else(|| ApiError::bad_request("a canary needs percent"))?,
            by_header: q.by_header.clone(),
        }),
        other => Err(ApiError::bad_request(format!(
            "mode '{other}': use shadow or canary"
        ))),
    }
}

/// Stage the uploaded file as the plugin's candidate.
async fn stage(
    State(s): State<AdminState>,
    Path(name): Path<String>,
    Query(q): Query<StageQuery>,
    Query(policy): Query<Policy>,
    body: Bytes,
) -> Result<(StatusCode, Json<CandidateView>), ApiError> {
    super::plugin_name(&name)?;
    let mode = mode(&q)?;
    let trial = stage_on(&s, name, body.to_vec(), mode, policy).await?;
    Ok((
        StatusCode::CREATED,
        Json(super::api::candidate_view(&trial)),
    ))
}

/// Stage a candidate: on this node alone, or on every node through the
/// cluster's log.
async fn stage_on(
    s: &AdminState,
    name: String,
    bytes: Vec<u8>,
    mode: Mode,
    policy: Policy,
) -> Result<std::sync::Arc<crate::author::candidate::Trial>, ApiError> {
    if s.broker.cluster().is_some() {
        return Ok(s
            .broker
            .stage_candidate_agreed(&name, bytes, mode, policy)
            .await?);
    }
    let broker = s.broker.clone();
    Ok(blocking(move || broker.stage_candidate(&name, &bytes, mode, policy)).await??)
}

/// Turn the running candidate (a shadow, say) into a canary.
#[derive(Deserialize)]
struct CanaryBody {
    percent: f64,
    #[serde(default)]
    by_header: Option<String>,
    #[serde(flatten)]
    policy: Policy,
}

async fn to_canary(
    State(s): State<AdminState>,
    Path(name): Path<String>,
    Json(body): Json<CanaryBody>,
) -> Result<(StatusCode, Json<CandidateView>), ApiError> {
    super::plugin_name(&name)?;
    let t = s
        .broker
        .candidates()
        .get(&name)
        .ok_or_else(|| ApiError::from(RolloutError::NoCandidate(name.clone())))?;
    let mode = Mode::Canary {
        percent: body.percent,
        by_header: body.by_header,
    };
    let trial = stage_on(&s, name, t.bytes.to_vec(), mode, body.policy).await?;
    Ok((
        StatusCode::CREATED,
        Json(super::api::candidate_view(&trial)),
    ))
}

async fn promote(
    State(s): State<AdminState>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    super::plugin_name(&name)?;
    if s.broker.cluster().is_some() {
        s.broker
            .end_candidate_agreed(&name, Event::Promoted)
            .await?;
    } else {
        let broker = s.broker.clone();
        let n = name.clone();
        blocking(move || broker.promote_candidate(&n)).await??;
    }
    let hash = s.broker.plugins().get(&name).map(|v| v.hash.clone());
    Ok(Json(json!({"name": name, "serving": hash})))
}

async fn abort(
    State(s): State<AdminState>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    super::plugin_name(&name)?;
    if s.broker.cluster().is_some() {
        s.broker.end_candidate_agreed(&name, Event::Aborted).await?;
    } else {
        let broker = s.broker.clone();
        blocking(move || broker.abort_candidate(&name)).await??;
    }
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize, Default)]
struct RollbackBody {
    /// A kept version's hash (or a prefix); default the previous one.
    hash: Option<String>,
}

async fn rollback(
    State(s): State<AdminState>,
    Path(name): Path<String>,
    body: Option<Json<RollbackBody>>,
) -> Result<Json<Value>, ApiError> {
    super::plugin_name(&name)?;
    let hash = body.and_then(|b| b.0.hash);
    let served = if s.broker.cluster().is_some() {
        s.broker.rollback_agreed(&name, hash.as_deref()).await?
    } else {
        let broker = s.broker.clone();
        let n = name.clone();
        blocking(move || broker.rollback_plugin(&n, hash.as_deref())).await??
    };
    Ok(Json(json!({"name": name, "serving": served})))
}

async fn versions(
    State(s): State<AdminState>,
    Extension(viewer): Extension<Viewer>,
    Path(name): Path<String>,
) -> Result<Json<Vec<KeptVersionView>>, ApiError> {
    super::plugin_name(&name)?;
    viewer.monitoring("a plugin's versions")?;
    let serving = s.broker.plugins().get(&name).map(|v| v.hash.clone());
    let kept = s
        .broker
        .store()
        .map(|st| st.kept_versions(&name))
        .unwrap_or_default();
    Ok(Json(
        kept.into_iter()
            .map(|k| KeptVersionView {
                serving: serving.as_deref() == Some(k.hash.as_str()),
                served_at: k
                    .served
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()),
                size: std::fs::metadata(&k.path).map_or(0, |m| m.len()),
                hash: k.hash,
            })
            .collect(),
    ))
}

/// The serving version's `.wasm` (`?hash=` for another kept version), to
/// test a new build against offline (`wasmq plugin test --against serving`).
#[derive(Deserialize)]
struct WasmQuery {
    hash: Option<String>,
}

async fn wasm(
    State(s): State<AdminState>,
    Extension(viewer): Extension<Viewer>,
    Path(name): Path<String>,
    Query(q): Query<WasmQuery>,
) -> Result<axum::response::Response, ApiError> {
    super::plugin_name(&name)?;
    viewer.administrator("a plugin's bytes")?;
    use axum::response::IntoResponse;
    let hash = match q.hash {
        Some(h) => h,
        None => s
            .broker
            .plugins()
            .get(&name)
            .filter(|v| !v.builtin)
            .map(|v| v.hash.clone())
            .ok_or_else(|| ApiError::from(RolloutError::NotServing(name.clone())))?,
    };
    let bytes = s
        .broker
        .store()
        .and_then(|st| st.kept_plugin_version(&name, &hash))
        .ok_or_else(|| {
            ApiError::from(RolloutError::NotKept {
                plugin: name.clone(),
                hash: hash.clone(),
            })
        })?;
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/wasm")],
        bytes,
    )
        .into_response())
}

async fn rollouts(
    State(s): State<AdminState>,
    Extension(viewer): Extension<Viewer>,
) -> Result<Json<RolloutsView>, ApiError> {
    viewer.monitoring("rollouts")?;
    let c = s.broker.candidates();
    Ok(Json(RolloutsView {
        candidates: c
            .all()
            .iter()
            .map(|t| super::api::candidate_view(t))
            .collect(),
        transitions: c.history(),
    }))
}

/// Run a message through an exchange without enqueueing it.
async fn trace(
    State(s): State<AdminState>,
    Path((v, exchange)): Path<(String, String)>,
    Json(body): Json<PublishBody>,
) -> Result<Json<Trace>, ApiError> {
    let vhost = super::api::vhost(&s, &v)?;
    let x = vhost.exchange(&exchange)?;
    let message = message_from(&exchange, body)?;
    let broker = s.broker.clone();
    let trace = blocking(move || broker.trace(&vhost, &x, message)).await?;
    Ok(Json(trace))
}

/// The traces of publishes that carried `x-wasmq-trace`, of the vhosts
/// the viewer may see.
async fn traces(
    State(s): State<AdminState>,
    Extension(viewer): Extension<Viewer>,
) -> Json<Vec<Trace>> {
    let mut all = s.broker.traces().list();
    all.retain(|t| viewer.sees(&t.vhost));
    Json(all)
}
