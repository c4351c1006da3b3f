//! The JSON endpoints. Each reads the broker's live objects; listings are
//! sorted by vhost and name so that output is stable.

use crate::alarm::Resource;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::UNIX_EPOCH;

use amq_protocol::protocol::BasicProperties;
use amq_protocol::types::ShortString;
use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Extension, Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};

use super::model::{
    ClusterPluginVersion, ExchangeMessageStats, ExchangePlugins, ExchangeView, GotMessage,
    GotProperties, LatencyView, PluginView, PublishResult, QueueMessageStats, QueueView,
};
use super::{AdminState, ApiError, Viewer};
use crate::broker::{Exchange, Queue, VHost};
use crate::json::{json_to_table, table_to_json};
use crate::store::definitions::Definitions;
use crate::{Destination, Message};

type ApiResult<T = Json<Value>> = Result<T, ApiError>;

pub(super) fn routes(max_upload: usize) -> Router<AdminState> {
    Router::new()
        .route("/api/overview", get(overview))
        .route("/api/exchanges", get(exchanges))
        .route("/api/exchanges/{vhost}", get(exchanges_in))
        .route("/api/exchanges/{vhost}/{name}", get(exchange))
        .route("/api/exchanges/{vhost}/{name}/publish", post(publish))
        .route("/api/queues", get(queues))
        .route("/api/queues/{vhost}", get(queues_in))
        .route(
            "/api/queues/{vhost}/{name}",
            get(queue).delete(delete_queue),
        )
        .route("/api/queues/{vhost}/{name}/get", post(get_messages))
        .route(
            "/api/queues/{vhost}/{name}/contents",
            axum::routing::delete(purge_queue),
        )
        .route(
            "/api/queues/{vhost}/{name}/members/{node}",
            post(add_member).delete(remove_member),
        )
        .route("/api/bindings", get(bindings))
        .route("/api/bindings/{vhost}", get(bindings_in))
        .route("/api/connections", get(connections))
        .route(
            "/api/connections/{id}",
            axum::routing::delete(close_connection),
        )
        .route("/api/channels", get(channels))
        .route("/api/consumers", get(consumers))
        .route("/api/definitions", get(export).post(import))
        .route("/api/plugins", get(plugins))
        .route(
            "/api/plugins/{name}",
            get(plugin)
                .put(upload)
                .layer(DefaultBodyLimit::max(max_upload)),
        )
        .route("/metrics", get(super::metrics::render))
}

pub(super) fn vhost(s: &AdminState, name: &str) -> Result<Arc<VHost>, ApiError> {
    s.broker
        .vhost(name)
        .ok_or_else(|| ApiError::not_found(format!("vhost '{name}'")))
}

fn sorted_vhosts(s: &AdminState) -> Vec<Arc<VHost>> {
    let mut v = s.broker.vhosts();
    v.sort_by(|a, b| a.name.cmp(&b.name));
    v
}

/// The vhosts `viewer` may see, sorted.
fn visible_vhosts(s: &AdminState, viewer: &Viewer) -> Vec<Arc<VHost>> {
    let mut v = sorted_vhosts(s);
    v.retain(|v| viewer.sees(&v.name));
    v
}

/// Vhost `name`, if `viewer` may see it (403 if it exists but may not).
pub(super) fn visible_vhost(
    s: &AdminState,
    viewer: &Viewer,
    name: &str,
) -> Result<Arc<VHost>, ApiError> {
    let v = vhost(s, name)?;
    if !viewer.sees(name) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!("user '{}' has no access to vhost '{name}'", viewer.user),
        ));
    }
    Ok(v)
}

fn secs(t: std::time::SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

async fn overview(
    State(s): State<AdminState>,
    Extension(viewer): Extension<Viewer>,
) -> Json<Value> {
    let (mut exchanges, mut queues, mut consumers) = (0, 0, 0);
    let (mut ready, mut unacked) = (0u64, 0u64);
    let (mut published, mut delivered, mut acked, mut redelivered) = (0u64, 0u64, 0u64, 0u64);
    for v in visible_vhosts(&s, &viewer) {
        for x in v.exchanges() {
            exchanges += 1;
            published += x.stats.published.load(Ordering::Relaxed);
        }
        for q in v.queues() {
            queues += 1;
            consumers += q.consumer_count();
            ready += q.len() as u64;
            unacked += q.unacked();
            delivered += q.delivered.load(Ordering::Relaxed);
            acked += q.acked.load(Ordering::Relaxed);
            redelivered += q.redelivered.load(Ordering::Relaxed);
        }
    }
    let mut conns = s.broker.connections().list();
    conns.retain(|c| viewer.sees_connection(&c.user));
    let channels: usize = conns.iter().map(|c| c.channels().len()).sum();
    let store = s.broker.store().map(|st| {
        let stats = st.stats();
        json!({
            "syncs": stats.syncs.load(Ordering::Relaxed),
            "bytes_written": stats.bytes_written.load(Ordering::Relaxed),
            "sync_seconds_total": stats.sync_nanos.load(Ordering::Relaxed) as f64 / 1e9,
        })
    });
    Json(json!({
        "product_name": "wasmq",
        "product_version": env!("CARGO_PKG_VERSION"),
        "uptime_secs": s.started.elapsed().as_secs(),
        "listeners": [
            {"protocol": "amqp", "address": s.amqp_addr.to_string()},
        ],
        "object_totals": {
            "connections": conns.len(),
            "channels": channels,
            "exchanges": exchanges,
            "queues": queues,
            "consumers": consumers,
        },
        "queue_totals": {
            "messages": ready + unacked,
            "messages_ready": ready,
            "messages_unacknowledged": unacked,
        },
        "message_stats": {
            "publish": published,
            "deliver_get": delivered,
            "ack": acked,
            "redeliver": redelivered,
            "confirm": s.broker.connections().confirmed(),
        },
        "store": store,
        "alarms": {
            "disk": s.broker.alarm_raised(Resource::Disk),
            "memory": s.broker.alarm_raised(Resource::Memory),
        },
        "mem_used": crate::alarm::memory_used().ok(),
    }))
}

fn exchange_view(v: &VHost, x: &Exchange) -> ExchangeView {
    let st = &x.stats;
    let n = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    let router = x.router();
    let router = router.version();
    ExchangeView {
        name: x.name.clone(),
        vhost: v.name.clone(),
        kind: x.kind.clone(),
        durable: x.durable,
        auto_delete: x.auto_delete,
        internal: x.internal,
        arguments: table_to_json(&x.arguments),
        plugin: ExchangePlugins {
            router: router.name.clone(),
            router_hash: router.hash.clone(),
            transform: x.transform_name(),
        },
        policy: x.policy_name(),
        messages_delayed: x
            .delayed
            .as_ref()
            .map(|d| v.queue(&d.queue).map_or(0, |q| q.delayed())),
        message_stats: ExchangeMessageStats {
            publish_in: n(&st.published),
            routed: n(&st.routed),
            unroutable: n(&st.unroutable),
            dropped: n(&st.dropped),
            dead_lettered: n(&st.dead_lettered),
            plugin_faults: n(&st.faults),
        },
    }
}

fn list_exchanges(vhosts: &[Arc<VHost>]) -> Json<Vec<ExchangeView>> {
    let mut out = Vec::new();
    for v in vhosts {
        let mut xs = v.exchanges();
        xs.sort_by(|a, b| a.name.cmp(&b.name));
        out.extend(xs.iter().map(|x| exchange_view(v, x)));
    }
    Json(out)
}

async fn exchanges(
    State(s): State<AdminState>,
    Extension(viewer): Extension<Viewer>,
) -> Json<Vec<ExchangeView>> {
    list_exchanges(&visible_vhosts(&s, &viewer))
}

async fn exchanges_in(
    State(s): State<AdminState>,
    Extension(viewer): Extension<Viewer>,
    Path(v): Path<String>,
) -> ApiResult<Json<Vec<ExchangeView>>> {
    Ok(list_exchanges(&[visible_vhost(&s, &viewer, &v)?]))
}

async fn exchange(
    State(s): State<AdminState>,
    Extension(viewer): Extension<Viewer>,
    Path((v, name)): Path<(String, String)>,
) -> ApiResult<Json<ExchangeView>> {
    let v = visible_vhost(&s, &viewer, &v)?;
    let x = v.exchange(&name)?;
    Ok(Json(exchange_view(&v, &x)))
}

fn queue_view(v: &VHost, q: &Queue, node: Option<&str>) -> QueueView {
    let n = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    let ready = q.len() as u64;
    let unacked = q.unacked();
    QueueView {
        name: q.name.clone(),
        vhost: v.name.clone(),
        durable: q.durable,
        exclusive: q.exclusive(),
        auto_delete: q.auto_delete,
        arguments: table_to_json(&q.arguments),
        // A stream's deliveries stay in it: its count is its length.
        messages: if q.stream().is_some() {
            ready
        } else {
            ready + unacked
        },
        messages_ready: ready,
        messages_unacknowledged: unacked,
        message_bytes_ready: q.ready_bytes(),
        consumers: q.consumer_count(),
        segments: q.log().map(|l| l.segment_count()),
        node: node.map(str::to_owned),
        quorum: None,
        policy: None,
        operator_policy: None,
        effective_policy_definition: json!({}),
        deduplication_ids: q.dedup_ids(),
        messages_delayed: q.delayed(),
        message_stats: QueueMessageStats {
            publish: n(&q.enqueued),
            deliver_get: n(&q.delivered),
            redeliver: n(&q.redelivered),
            ack: n(&q.acked),
            dead_lettered: n(&q.dead_lettered),
        },
        queue_type: queue_type(q).into(),
        stream: q.stream().map(|s| stream_view(s)),
    }
}

fn queue_type(q: &Queue) -> &'static str {
    if q.stream().is_some() {
        "stream"
    } else if q.quorum {
        "quorum"
    } else {
        "classic"
    }
}

fn stream_view(s: &crate::broker::stream::Stream) -> crate::admin::model::StreamView {
    use crate::admin::model::{NamedOffsetView, StreamConsumerView, StreamView};
    let st = s.stats();
    StreamView {
        first_offset: st.first,
        last_offset: (st.committed > st.first).then(|| st.committed - 1),
        segments: st.segments,
        bytes: st.bytes,
        consumers: s
            .cursors()
            .into_iter()
            .map(|c| StreamConsumerView {
                consumer_tag: c.tag,
                channel: c.channel,
                offset: c.offset,
                name: c.name,
                active: c.active,
            })
            .collect(),
        named: s
            .log()
            .stored_offsets()
            .into_iter()
            .map(|(name, offset)| NamedOffsetView {
                lag: st.committed.saturating_sub(offset + 1),
                name,
                offset,
            })
            .collect(),
    }
}

/// A queue of another node, as this node knows it (its counts are that
/// node's to give: zeros here).
fn remote_view(v: &VHost, name: String, r: crate::broker::RemoteQueue) -> QueueView {
    if let Some(q) = v.stream_replica(&name) {
        // A replicated stream this node holds a replica of: its log here
        // is the stream's, whoever leads.
        return queue_view(v, &q, Some(&r.node));
    }
    QueueView {
        name,
        vhost: v.name.clone(),
        durable: r.durable,
        exclusive: false,
        auto_delete: r.definition.auto_delete,
        arguments: table_to_json(&r.definition.arguments),
        messages: 0,
        messages_ready: 0,
        messages_unacknowledged: 0,
        message_bytes_ready: 0,
        consumers: 0,
        segments: None,
        node: Some(r.node),
        quorum: None,
        policy: None,
        operator_policy: None,
        effective_policy_definition: json!({}),
        deduplication_ids: None,
        messages_delayed: 0,
        message_stats: QueueMessageStats::default(),
        queue_type: match r.definition.arguments.inner().get("x-queue-type") {
            Some(amq_protocol::types::AMQPValue::LongString(t)) => {
                String::from_utf8_lossy(t.as_bytes()).into_owned()
            }
            _ => "classic".into(),
        },
        stream: None,
    }
}

/// The policies that apply to a queue: the live queue's own, or for a
/// queue of another node what the (replicated) policies make of it.
fn with_policy(s: &AdminState, q: Option<&Queue>, mut view: QueueView) -> QueueView {
    let applied = match q {
        Some(q) => q.policy(),
        None => {
            let quorum = crate::broker::QueueLimits::parse(
                &crate::json::json_to_table(&view.arguments).unwrap_or_default(),
            )
            .is_ok_and(|l| l.quorum);
            let target = if quorum {
                crate::policy::Target::QuorumQueue
            } else {
                crate::policy::Target::ClassicQueue
            };
            Arc::new(
                s.broker
                    .accounts()
                    .policies_for(&view.vhost, &view.name, target),
            )
        }
    };
    view.policy = applied.policy.clone();
    view.operator_policy = applied.operator_policy.clone();
    view.effective_policy_definition = json!(applied.definition);
    view
}

/// A quorum queue's replication as this node's replica sees it; its leader
/// is where the queue lives (one truth for `node` and `quorum.leader`).
/// Its policies too.
fn with_quorum(s: &AdminState, mut view: QueueView) -> QueueView {
    view.quorum = s.broker.quorum_status(&view.vhost, &view.name);
    if let Some(leader) = view.quorum.as_ref().and_then(|q| q.leader.clone()) {
        view.node = Some(leader);
    }
    let local = s
        .broker
        .vhost(&view.vhost)
        .and_then(|v| v.queue(&view.name).ok());
    with_policy(s, local.as_deref(), view)
}

/// A queue as a listing finds it: on this node, or known to be on another.
enum Listed {
    Local(Arc<Queue>),
    Remote(crate::broker::RemoteQueue),
}

/// The query of a queue listing, as RabbitMQ's management API reads it:
/// `page` (from 1) and `page_size` (at most 500) ask for one page and a
/// paged answer; `name` keeps the queues whose name contains it (case
/// insensitive) or, with `use_regex=true`, matches it; `sort` names a
/// field (dotted for nested ones, `message_stats.publish`) and
/// `sort_reverse` turns the order around.
#[derive(Debug, Default, Deserialize)]
pub(super) struct ListQuery {
    page: Option<usize>,
    page_size: Option<usize>,
    name: Option<String>,
    use_regex: Option<bool>,
    sort: Option<String>,
    sort_reverse: Option<bool>,
}

/// The largest page RabbitMQ serves.
const MAX_PAGE_SIZE: usize = 500;

/// A listing: every queue, or one page of them.
#[derive(serde::Serialize)]
#[serde(untagged)]
pub(super) enum Listing {
    All(Vec<QueueView>),
    Page(super::model::QueuePage),
}

fn list_queues(s: &AdminState, vhosts: &[Arc<VHost>], q: &ListQuery) -> ApiResult<Json<Listing>> {
    let bad = |m: String| ApiError::new(StatusCode::BAD_REQUEST, m);
    let matches: Box<dyn Fn(&str) -> bool> = match (&q.name, q.use_regex.unwrap_or(false)) {
        (None, _) => Box::new(|_| true),
        (Some(n), false) => {
            let n = n.to_lowercase();
            Box::new(move |name: &str| name.to_lowercase().contains(&n))
        }
        (Some(n), true) => {
            let re = regex::RegexBuilder::new(n)
                .size_limit(1 << 20)
                .build()
                .map_err(|e| bad(format!("name: not a regular expression: {e}")))?;
            Box::new(move |name: &str| re.is_match(name))
        }
    };
    // Names first: a page of 10,000 queues builds only its own views
    // when sorted by name.
    let mut total = 0;
    let mut found: Vec<(Arc<VHost>, String, Listed)> = Vec::new();
    for v in vhosts {
        let local = v.queues();
        let names: std::collections::HashSet<&str> =
            local.iter().map(|q| q.name.as_str()).collect();
        let remote: Vec<(String, crate::broker::RemoteQueue)> = v
            .remote_queues()
            .into_iter()
            .filter(|(name, _)| !names.contains(name.as_str()))
            .collect();
        total += local.len() + remote.len();
        for lq in &local {
            if matches(&lq.name) {
                found.push((v.clone(), lq.name.clone(), Listed::Local(lq.clone())));
            }
        }
        for (name, r) in remote {
            if matches(&name) {
                found.push((v.clone(), name, Listed::Remote(r)));
            }
        }
    }
    let me = s.broker.cluster().map(|c| c.name());
    let view = |(v, name, l): (Arc<VHost>, String, Listed)| {
        with_quorum(
            s,
            match l {
                Listed::Local(q) => queue_view(&v, &q, me),
                Listed::Remote(r) => remote_view(&v, name, r),
            },
        )
    };
    let reverse = q.sort_reverse.unwrap_or(false);
    let by_name = q.sort.as_deref().is_none_or(|f| f == "name");
    if by_name {
        // By vhost (in the order they are listed), then by name.
        let order = |v: &Arc<VHost>| vhosts.iter().position(|x| Arc::ptr_eq(x, v));
        found.sort_by(|a, b| (order(&a.0), &a.1).cmp(&(order(&b.0), &b.1)));
        if reverse {
            found.reverse();
        }
    }
    let Some(page) = q.page else {
        let mut all: Vec<QueueView> = found.into_iter().map(view).collect();
        if !by_name {
            sort_views(&mut all, q.sort.as_deref().unwrap_or("name"), reverse);
        }
        return Ok(Json(Listing::All(all)));
    };
    let size = q.page_size.unwrap_or(100);
    if page == 0 || size == 0 || size > MAX_PAGE_SIZE {
        return Err(bad(format!(
            "page must be 1 or more and page_size 1 to {MAX_PAGE_SIZE}"
        )));
    }
    let filtered = found.len();
    let page_count = filtered.div_ceil(size);
    if page > page_count.max(1) {
        return Err(bad(format!("page out of range: {page} of {page_count}")));
    }
    let items: Vec<QueueView> = if by_name {
        found
            .into_iter()
            .skip((page - 1) * size)
            .take(size)
            .map(view)
            .collect()
    } else {
        let mut all: Vec<QueueView> = found.into_iter().map(view).collect();
        sort_views(&mut all, q.sort.as_deref().unwrap_or("name"), reverse);
        all.into_iter().skip((page - 1) * size).take(size).collect()
    };
    Ok(Json(Listing::Page(super::model::QueuePage {
        filtered_count: filtered,
        item_count: items.len(),
        items,
        page,
        page_count,
        page_size: size,
        total_count: total,
    })))
}

/// Sort views by the (dotted) field `path` of their JSON: numbers as
/// numbers, the rest as text, missing ones first; ties by name.
fn sort_views(views: &mut [QueueView], path: &str, reverse: bool) {
    let key = |v: &QueueView| -> (Option<f64>, String, String) {
        let json = serde_json::to_value(v).unwrap_or(Value::Null);
        let field = path.split('.').fold(&json, |j, k| &j[k]);
        let text = match field {
            Value::String(s) => s.clone(),
            Value::Null | Value::Number(_) => String::new(),
            other => other.to_string(),
        };
        (field.as_f64(), text, v.name.clone())
    };
    let mut keyed: Vec<_> = views.iter().map(|v| (key(v), v.clone())).collect();
    keyed.sort_by(|a, b| {
        let (x, y) = (&a.0, &b.0);
        x.0.partial_cmp(&y.0)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then_with(|| x.1.cmp(&y.1))
            .then_with(|| x.2.cmp(&y.2))
    });
    if reverse {
        keyed.reverse();
    }
    for (slot, (_, v)) in views.iter_mut().zip(keyed) {
        *slot = v;
    }
}

async fn queues(
    State(s): State<AdminState>,
    Extension(viewer): Extension<Viewer>,
    axum::extract::Query(q): axum::extract::Query<ListQuery>,
) -> ApiResult<Json<Listing>> {
    list_queues(&s, &visible_vhosts(&s, &viewer), &q)
}

async fn queues_in(
    State(s): State<AdminState>,
    Extension(viewer): Extension<Viewer>,
    Path(v): Path<String>,
    axum::extract::Query(q): axum::extract::Query<ListQuery>,
) -> ApiResult<Json<Listing>> {
    list_queues(&s, &[visible_vhost(&s, &viewer, &v)?], &q)
}

async fn queue(
    State(s): State<AdminState>,
    Extension(viewer): Extension<Viewer>,
    Path((v, name)): Path<(String, String)>,
) -> ApiResult<Json<QueueView>> {
    let v = visible_vhost(&s, &viewer, &v)?;
    // Any node answers for any queue, as the list does: a queue of another
    // node (or a quorum queue whose leader is elsewhere, or not yet
    // elected) is shown as this node knows it.
    let record = || {
        s.broker
            .cluster()
            .and_then(|c| c.queue_record(&v.name, &name))
    };
    let view = match v.queue(&name) {
        Ok(q) => queue_view(&v, &q, s.broker.cluster().map(|c| c.name())),
        Err(e) => match (v.remote_queue(&name), record()) {
            (Some(r), _) => remote_view(&v, name, r),
            // Known to the cluster, its leader not (yet) announced here.
            (None, Some(r)) => remote_view(
                &v,
                name,
                crate::broker::RemoteQueue {
                    node: r.node,
                    durable: r.durable,
                    definition: r.queue,
                    leader_term: r.leader_term,
                },
            ),
            (None, None) => return Err(e.into()),
        },
    };
    Ok(Json(with_quorum(&s, view)))
}

/// Add a node to a quorum queue's members (on the queue's leader).
async fn add_member(
    State(s): State<AdminState>,
    Path((v, name, node)): Path<(String, String, String)>,
) -> ApiResult<StatusCode> {
    super::cluster::node(&s)?;
    let v = vhost(&s, &v)?;
    s.broker
        .add_quorum_member(&v.name, &name, &node)
        .await
        .map_err(|e| ApiError::new(StatusCode::CONFLICT, e.to_string()))?;
    Ok(StatusCode::NO_CONTENT)
}

/// Remove a node from a quorum queue's members (on the queue's leader).
async fn remove_member(
    State(s): State<AdminState>,
    Path((v, name, node)): Path<(String, String, String)>,
) -> ApiResult<StatusCode> {
    super::cluster::node(&s)?;
    let v = vhost(&s, &v)?;
    s.broker
        .remove_quorum_member(&v.name, &name, &node)
        .await
        .map_err(|e| ApiError::new(StatusCode::CONFLICT, e.to_string()))?;
    Ok(StatusCode::NO_CONTENT)
}

async fn delete_queue(
    State(s): State<AdminState>,
    Path((v, name)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let v = vhost(&s, &v)?;
    if let Some(node) = s.broker.cluster()
        && v.queue_exists(&name)
        && v.queue(&name).map_or(true, |q| q.owner.is_none())
    {
        // A shared queue in a cluster is deleted through the log, so that
        // every node forgets it.
        let command = crate::cluster::Command::DeleteQueue {
            vhost: v.name.clone(),
            name,
            if_unused: false,
            if_empty: false,
        };
        applied(node.propose(command).await)?;
        return Ok(StatusCode::NO_CONTENT);
    }
    s.broker.delete_queue(&v, &name, false, false)?;
    Ok(StatusCode::NO_CONTENT)
}

/// `DELETE /api/queues/{vhost}/{name}/contents`: purge, as RabbitMQ's API
/// does (the queue stays; a stream purges nothing, as over AMQP).
async fn purge_queue(
    State(s): State<AdminState>,
    Path((v, name)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let v = vhost(&s, &v)?;
    let q = v.queue(&name)?;
    let n = q.purge();
    tracing::info!(queue = %crate::untrusted::text(&name), vhost = %crate::untrusted::text(&v.name), "purged {n} messages through the admin API");
    Ok(StatusCode::NO_CONTENT)
}

/// A committed change's outcome as the API's answer: a refusal with its
/// AMQP code's HTTP kin, no quorum as 503.
fn applied(
    r: Result<crate::cluster::Applied, crate::cluster::ClusterError>,
) -> Result<(), ApiError> {
    match r {
        Ok(crate::cluster::Applied::Refused { code, text }) => Err(ApiError::new(
            match code {
                404 => StatusCode::NOT_FOUND,
                403 => StatusCode::FORBIDDEN,
                405 => StatusCode::CONFLICT,
                541 => StatusCode::INTERNAL_SERVER_ERROR,
                _ => StatusCode::BAD_REQUEST,
            },
            text,
        )),
        Ok(_) => Ok(()),
        Err(e) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            e.to_string(),
        )),
    }
}

fn list_bindings(vhosts: &[Arc<VHost>]) -> Json<Value> {
    let mut out = Vec::new();
    for v in vhosts {
        let mut xs = v.exchanges();
        xs.sort_by(|a, b| a.name.cmp(&b.name));
        for x in xs {
            let table = x.bindings();
            let mut bs: Vec<_> = table.iter().collect();
            bs.sort_by_key(|b| b.id);
            for b in bs {
                let kind = match &b.destination {
                    Destination::Queue(_) => "queue",
                    Destination::Exchange(_) => "exchange",
                };
                out.push(json!({
                    "vhost": v.name,
                    "source": x.name,
                    "destination": b.destination.name(),
                    "destination_type": kind,
                    "routing_key": b.key,
                    "arguments": table_to_json(&b.arguments),
                }));
            }
        }
    }
    Json(Value::Array(out))
}

async fn bindings(
    State(s): State<AdminState>,
    Extension(viewer): Extension<Viewer>,
) -> Json<Value> {
    list_bindings(&visible_vhosts(&s, &viewer))
}

async fn bindings_in(
    State(s): State<AdminState>,
    Extension(viewer): Extension<Viewer>,
    Path(v): Path<String>,
) -> ApiResult {
    Ok(list_bindings(&[visible_vhost(&s, &viewer, &v)?]))
}

async fn connections(
    State(s): State<AdminState>,
    Extension(viewer): Extension<Viewer>,
) -> Json<Value> {
    Json(Value::Array(
        s.broker
            .connections()
            .list()
            .iter()
            .filter(|c| viewer.sees_connection(&c.user))
            .map(|c| {
                json!({
                    "name": c.id.to_string(),
                    "id": c.id,
                    "peer": c.peer.to_string(),
                    "user": c.user,
                    "vhost": c.vhost,
                    "client": c.client,
                    "connected_at": secs(c.connected_at),
                    "channels": c.channels().len(),
                    "heartbeat": c.heartbeat,
                    "frame_max": c.frame_max,
                    // RabbitMQ's names.
                    "ssl": c.tls.is_some(),
                    "ssl_protocol": c.tls.as_ref().map(|t| t.protocol),
                    "peer_cert_subject": c.tls.as_ref().and_then(|t| t.peer_cert_cn.as_ref()).map(|cn| format!("CN={cn}")),
                })
            })
            .collect(),
    ))
}

async fn close_connection(
    State(s): State<AdminState>,
    Path(id): Path<u64>,
) -> Result<StatusCode, ApiError> {
    let c = s
        .broker
        .connections()
        .get(id)
        .ok_or_else(|| ApiError::not_found(format!("connection {id}")))?;
    c.close();
    Ok(StatusCode::NO_CONTENT)
}

async fn channels(
    State(s): State<AdminState>,
    Extension(viewer): Extension<Viewer>,
) -> Json<Value> {
    let mut out = Vec::new();
    for c in s.broker.connections().list() {
        if !viewer.sees_connection(&c.user) {
            continue;
        }
        for ch in c.channels() {
            out.push(json!({
                "name": format!("{} ({})", c.id, ch.id),
                "connection": c.id,
                "number": ch.id,
                "user": c.user,
                "vhost": c.vhost,
                "confirm": ch.is_confirm(),
                "transactional": ch.is_transactional(),
                "prefetch_count": ch.credit.limit.load(Ordering::Relaxed),
                "messages_unacknowledged": ch.credit.unacked.load(Ordering::Relaxed),
                // The client paused its deliveries (channel.flow).
                "flow_paused": ch.credit.paused.load(Ordering::Relaxed),
            }));
        }
    }
    Json(Value::Array(out))
}

async fn consumers(
    State(s): State<AdminState>,
    Extension(viewer): Extension<Viewer>,
) -> Json<Value> {
    let mut out = Vec::new();
    for v in visible_vhosts(&s, &viewer) {
        let mut qs = v.queues();
        qs.sort_by(|a, b| a.name.cmp(&b.name));
        for q in qs {
            for c in q.consumers() {
                out.push(json!({
                    "consumer_tag": c.tag,
                    "queue": {"name": q.name, "vhost": v.name},
                    "connection": c.connection,
                    "channel": c.channel,
                    "ack_required": !c.no_ack,
                    "exclusive": c.exclusive,
                    "prefetch_count": c.prefetch,
                    "messages_unacknowledged": c.unacked.load(Ordering::Relaxed),
                }));
            }
        }
    }
    Json(Value::Array(out))
}

/// Export the durable definitions in RabbitMQ's definitions shape. Only
/// for those who see every vhost (RabbitMQ: administrators).
async fn export(State(s): State<AdminState>, Extension(viewer): Extension<Viewer>) -> ApiResult {
    if !viewer.all {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!(
                "user '{}' may not export definitions (the administrator or monitoring tag)",
                viewer.user
            ),
        ));
    }
    let defs = s.broker.durable_definitions();
    let mut exchanges = Vec::new();
    let mut queues = Vec::new();
    let mut bindings = Vec::new();
    // Users' hashes and permissions only to administrators, as
    // RabbitMQ's `GET /api/users` asks.
    let access = s.broker.accounts().directory().to_rabbitmq();
    for v in &defs.vhosts {
        for x in &v.exchanges {
            exchanges.push(json!({
                "name": x.name, "vhost": v.name, "type": x.kind, "durable": true,
                "auto_delete": x.auto_delete, "internal": x.internal,
                "arguments": table_to_json(&x.arguments),
            }));
        }
        for q in &v.queues {
            // A delayed exchange's schedule is made by its exchange (and a
            // RabbitMQ would refuse its `amq.` name): the export holds the
            // definitions a client declares.
            if crate::broker::schedules(&q.arguments).is_some() {
                continue;
            }
            queues.push(json!({
                "name": q.name, "vhost": v.name, "durable": true,
                "auto_delete": q.auto_delete, "arguments": table_to_json(&q.arguments),
            }));
        }
        for b in &v.bindings {
            bindings.push(json!({
                "source": b.source, "vhost": v.name, "destination": b.destination,
                "destination_type": b.destination_type, "routing_key": b.routing_key,
                "arguments": table_to_json(&b.arguments),
            }));
        }
    }
    let mut doc = json!({
        "product_name": "wasmq",
        "product_version": env!("CARGO_PKG_VERSION"),
        "vhosts": access["vhosts"],
        "exchanges": exchanges,
        "queues": queues,
        "bindings": bindings,
        "parameters": access["parameters"],
        "policies": access["policies"],
        "operator_policies": access["operator_policies"],
    });
    if viewer.admin {
        doc["users"] = access["users"].clone();
        doc["permissions"] = access["permissions"].clone();
    }
    Ok(Json(doc))
}

/// Import definitions (RabbitMQ's shape): users (with their hashes),
/// vhosts and permissions, then every exchange, queue and binding declared
/// durable through the same checks as an AMQP declare. The whole document
/// is checked before any of it is applied; a failure names the item.
async fn import(State(s): State<AdminState>, body: Bytes) -> ApiResult<StatusCode> {
    let defs = Definitions::from_rabbitmq(&body).map_err(ApiError::bad_request)?;
    let access = crate::access::Directory::from_rabbitmq(&body).map_err(ApiError::bad_request)?;
    let access = crate::access::AccessChange::Import { directory: access };
    // A dry run on a copy: the same verdict the change will get.
    s.broker
        .accounts()
        .directory()
        .apply(&access)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.to_string()))?;
    let refused = |e: crate::broker::DefinitionsError| {
        // A store that fails is the broker's fault (500); anything else the
        // document's (400).
        let status = if e.is_internal() {
            StatusCode::INTERNAL_SERVER_ERROR
        } else {
            StatusCode::BAD_REQUEST
        };
        ApiError::new(status, e.to_string())
    };
    // The whole document first: one that would be refused anywhere
    // changes nothing.
    s.broker.check_definitions(&defs).map_err(refused)?;
    s.broker.change_access(access).await?;
    if let Some(node) = s.broker.cluster() {
        // Through the log, one change at a time, in the order a single
        // node imports them; the first refusal stops it and names it.
        for mut command in crate::broker::definition_commands(&defs, node.name()) {
            // A quorum queue is placed as a declare through AMQP places it.
            if let crate::cluster::Command::DeclareQueue {
                vhost,
                queue,
                node: leader,
                members,
                ..
            } = &mut command
                && let Some((l, m)) = s.broker.place_quorum(vhost, &queue.name, &queue.arguments)
            {
                (*leader, *members) = (l, m);
            }
            let what = format!("{command:?}");
            applied(node.propose(command).await).map_err(|ApiError(status, reason)| {
                ApiError::new(status, format!("{reason} (importing {what})"))
            })?;
        }
        return Ok(StatusCode::CREATED);
    }
    s.broker.import_definitions(&defs).map_err(refused)?;
    Ok(StatusCode::CREATED)
}

/// A message to publish or trace.
#[derive(Deserialize)]
pub(super) struct PublishBody {
    #[serde(default)]
    pub(super) routing_key: String,
    #[serde(default)]
    pub(super) payload: String,
    #[serde(default)]
    pub(super) properties: PublishProperties,
}

#[derive(Deserialize, Default)]
pub(super) struct PublishProperties {
    delivery_mode: Option<u8>,
    content_type: Option<String>,
    message_id: Option<String>,
    #[serde(default)]
    headers: Value,
}

/// The message a publish or trace request describes.
pub(super) fn message_from(exchange: &str, body: PublishBody) -> Result<Message, ApiError> {
    let p = body.properties;
    crate::broker::check_short("routing key", &body.routing_key)?;
    for (what, v) in [
        ("content_type", &p.content_type),
        ("message_id", &p.message_id),
    ] {
        if let Some(v) = v {
            crate::broker::check_short(what, v)?;
        }
    }
    let mut props = BasicProperties::default();
    if let Some(m) = p.delivery_mode {
        props = props.with_delivery_mode(m);
    }
    if let Some(c) = p.content_type {
        props = props.with_content_type(ShortString::from(c));
    }
    if let Some(id) = p.message_id {
        props = props.with_message_id(ShortString::from(id));
    }
    let headers = json_to_table(&p.headers).map_err(ApiError::bad_request)?;
    if !headers.inner().is_empty() {
        props = props.with_headers(headers);
    }
    let message = Message::new(
        exchange,
        &body.routing_key,
        props,
        bytes::Bytes::from(body.payload.into_bytes()),
    );
    Ok(message)
}

/// Publish one message (for testing a route): `{"routed": bool}`.
async fn publish(
    State(s): State<AdminState>,
    Path((v, exchange)): Path<(String, String)>,
    Json(body): Json<PublishBody>,
) -> ApiResult<Json<PublishResult>> {
    let v = vhost(&s, &v)?;
    let exchange = if exchange == "amq.default" {
        String::new()
    } else {
        exchange
    };
    let message = message_from(&exchange, body)?;
    let mut outcome = s.broker.publish(&v, &exchange, message)?;
    // Copies for queues of other nodes go there (with no confirm, as
    // RabbitMQ's management publish has none).
    s.broker
        .forward_unconfirmed(&v, std::mem::take(&mut outcome.forwards));
    Ok(Json(PublishResult {
        routed: outcome.delivered > 0,
        queues: outcome.delivered,
        faults: outcome.faults.iter().map(|f| f.to_string()).collect(),
    }))
}

#[derive(Deserialize)]
struct GetBody {
    #[serde(default = "one")]
    count: usize,
    /// `ack_requeue_false` (take them) or `ack_requeue_true` (peek).
    #[serde(default = "take")]
    ackmode: String,
}

fn one() -> usize {
    1
}

fn take() -> String {
    "ack_requeue_false".into()
}

/// Take (or peek at) up to `count` ready messages.
async fn get_messages(
    State(s): State<AdminState>,
    Path((v, name)): Path<(String, String)>,
    Json(body): Json<GetBody>,
) -> ApiResult<Json<Vec<GotMessage>>> {
    let requeue = match body.ackmode.as_str() {
        "ack_requeue_false" => false,
        "ack_requeue_true" => true,
        other => {
            return Err(ApiError::bad_request(format!(
                "ackmode '{other}': use ack_requeue_false or ack_requeue_true"
            )));
        }
    };
    let v = vhost(&s, &v)?;
    let q = v.queue(&name)?;
    let mut taken = Vec::new();
    let mut out = Vec::new();
    while taken.len() < body.count.min(1000) {
        let Some(entry) = q.pop() else { break };
        let m = match q.message(&entry) {
            Ok(m) => m,
            Err(e) => {
                // Nothing reaches the caller: what was taken goes back
                // where it was, not marked redelivered.
                taken.push(entry);
                q.put_back(taken.into_iter());
                return Err(ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("reading: {e}"),
                ));
            }
        };
        let headers = m
            .properties
            .headers()
            .as_ref()
            .map_or(Value::Null, table_to_json);
        out.push(GotMessage {
            exchange: m.exchange.to_string(),
            routing_key: m.routing_key.to_string(),
            redelivered: entry.redelivered,
            payload: String::from_utf8_lossy(&m.body).into_owned(),
            payload_bytes: m.body.len(),
            properties: GotProperties {
                delivery_mode: *m.properties.delivery_mode(),
                content_type: m.properties.content_type().as_ref().map(|c| c.to_string()),
                message_id: m.properties.message_id().as_ref().map(|c| c.to_string()),
                headers,
            },
            message_count: q.len(),
        });
        taken.push(entry);
    }
    if requeue {
        q.requeue(taken.into_iter());
    } else {
        q.acked.fetch_add(taken.len() as u64, Ordering::Relaxed);
        q.forget(&taken);
    }
    Ok(Json(out))
}

fn plugin_view(s: &AdminState, p: crate::plugin::PluginStatus) -> PluginView {
    let version = s.broker.plugins().get(&p.name);
    let state = serde_json::to_value(&p.state)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    let name = p.name.clone();
    // Only a version that serves has a circuit.
    let circuit = p
        .hash
        .as_ref()
        .map(|_| if p.circuit_open { "open" } else { "closed" }.to_owned());
    PluginView {
        name: p.name,
        state,
        roles: p.roles,
        hash: p.hash,
        abi_version: p.abi_version,
        builtin: p.builtin,
        code: p.code.map(str::to_owned),
        loaded_at: p.loaded_at,
        faults: p.faults,
        calls: p.calls,
        latency_us: p.latency_us.map(|l| LatencyView {
            p50: l.p50,
            p90: l.p90,
            p99: l.p99,
        }),
        swaps: p.swaps,
        rejection: p.rejection,
        exports: version
            .as_ref()
            .map(|v| v.exports.clone())
            .unwrap_or_default(),
        size: version.as_ref().map_or(0, |v| v.size),
        self_tests: version.as_ref().map_or(0, |v| v.self_tests),
        circuit,
        cluster: Vec::new(),
        candidate: s.broker.candidates().get(&name).map(|t| candidate_view(&t)),
        transitions: {
            let mut mine: Vec<_> = s
                .broker
                .candidates()
                .history()
                .into_iter()
                .filter(|t| t.plugin == name)
                .collect();
            mine.drain(..mine.len().saturating_sub(5));
            mine
        },
    }
}

/// The cluster's versions of each plugin, by name (empty alone).
fn cluster_plugins(
    s: &AdminState,
) -> std::collections::BTreeMap<String, Vec<ClusterPluginVersion>> {
    let Some(node) = s.broker.cluster() else {
        return Default::default();
    };
    node.catalog()
        .plugins
        .into_iter()
        .map(|(name, r)| {
            let versions = r
                .versions
                .into_iter()
                .map(|v| ClusterPluginVersion {
                    active: r.active.as_deref() == Some(v.hash.as_str()),
                    hash: v.hash,
                    from: v.from,
                    ready: v.ready.into_iter().collect(),
                    refused: v.refused,
                })
                .collect();
            (name, versions)
        })
        .collect()
}

fn plugin_views(s: &AdminState) -> Vec<PluginView> {
    let mut cluster = cluster_plugins(s);
    let mut views: Vec<PluginView> = s
        .broker
        .plugins()
        .list()
        .into_iter()
        .map(|p| {
            let mut v = plugin_view(s, p);
            v.cluster = cluster.remove(&v.name).unwrap_or_default();
            v
        })
        .collect();
    // Versions the cluster has staged (or refused) that serve nowhere yet.
    for (name, versions) in cluster {
        views.push(PluginView {
            name,
            state: "staged".into(),
            cluster: versions,
            ..Default::default()
        });
    }
    views.sort_by(|a, b| a.name.cmp(&b.name));
    views
}

async fn plugins(State(s): State<AdminState>) -> Json<Vec<PluginView>> {
    Json(plugin_views(&s))
}

async fn plugin(
    State(s): State<AdminState>,
    Path(name): Path<String>,
) -> ApiResult<Json<PluginView>> {
    let p = plugin_views(&s)
        .into_iter()
        .find(|p| p.name == name)
        .ok_or_else(|| ApiError::not_found(format!("plugin '{name}'")))?;
    Ok(Json(p))
}

/// Validate an uploaded plugin, then write it into the plugin folder with
/// an atomic rename: the watcher swaps it in as it would a copied file.
/// Validation failures are 400 with the reason; nothing is written.
#[derive(Deserialize, Default)]
struct UploadQuery {
    /// Replace a built-in exchange type with this file (deliberately).
    #[serde(default)]
    override_builtin: bool,
}

async fn upload(
    State(s): State<AdminState>,
    Path(name): Path<String>,
    axum::extract::Query(query): axum::extract::Query<UploadQuery>,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<Value>)> {
    super::plugin_name(&name)?;
    let broker = s.broker.clone();
    let checked_name = name.clone();
    let version = super::blocking(move || {
        broker
            .host()
            .load(&checked_name, &body, false)
            .map(|v| (v, body))
    })
    .await?
    .map_err(|e| ApiError::bad_request(format!("plugin '{name}' rejected: {e}")))?;
    let (version, body) = version;
    if query.override_builtin {
        s.broker.allow_override(&name, &version.hash);
    } else if let Some(reason) = s.broker.builtin_override_refused(&name, &version.hash) {
        return Err(ApiError::bad_request(format!(
            "plugin '{name}' rejected: {reason}"
        )));
    }
    let broker = s.broker.clone();
    let written = name.clone();
    super::blocking(move || broker.write_plugin_file(&written, &body))
        .await?
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("writing the plugin file: {e}"),
            )
        })?;
    tracing::info!(plugin = %name, version = %version.short_hash(), "plugin uploaded through the admin API");
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "name": name,
            "hash": version.hash,
            "roles": version.roles.to_string(),
            "abi_version": version.abi_version,
            "exports": version.exports,
        })),
    ))
}

/// A trial as the API shows it.
pub(super) fn candidate_view(t: &crate::author::candidate::Trial) -> super::model::CandidateView {
    let l = |q| t.latency_us(q);
    super::model::CandidateView {
        plugin: t.plugin.clone(),
        hash: t.version.hash.clone(),
        serving_hash: t.serving_hash.clone(),
        mode: t.mode.clone(),
        policy: t.policy.clone(),
        calls: t.calls.load(Ordering::Relaxed),
        faults: t.faults.load(Ordering::Relaxed),
        agreements: t.agreed.load(Ordering::Relaxed),
        disagreements: t.disagreed.load(Ordering::Relaxed),
        skipped: t.skipped.load(Ordering::Relaxed),
        latency_us: l(0.5).map(|_| LatencyView {
            p50: l(0.5),
            p90: l(0.9),
            p99: l(0.99),
        }),
        running_secs: t.elapsed().as_secs(),
        failure: t.failure(),
        disagreement_samples: t.disagreements(),
    }
}
