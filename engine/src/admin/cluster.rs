//! The cluster's endpoints: `/api/cluster` (this node's view: members,
//! leader, log positions), RabbitMQ's `/api/nodes`, and membership
//! changes. A node without a `[cluster]` section answers as a cluster of
//! one for `/api/nodes` and 404 for the rest.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use super::{AdminState, ApiError};
use crate::cluster::{ClusterNode, NodeStatus};

/// One node in `/api/nodes` (RabbitMQ's field names where they apply).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeView {
    /// Node name.
    pub name: String,
    /// Reachable from the answering node: itself, or a peer whose link is
    /// open (a link closes after an election timeout without a word, so a
    /// node killed, paused or cut off reads `false` within that bound).
    /// Always set; an `Option` so older clients' `null` still reads.
    pub running: Option<bool>,
    /// RabbitMQ's node type; every wasmq node keeps its state on disk.
    #[serde(rename = "type")]
    pub kind: String,
    /// Leads the cluster's definitions log.
    pub is_leader: bool,
    /// A voting member (else a learner catching up).
    pub voter: bool,
    /// The node-to-node address.
    pub cluster_addr: Option<String>,
    /// Last log index the leader knows this member holds.
    pub log_index: Option<u64>,
}

pub(super) fn routes() -> Router<AdminState> {
    Router::new()
        .route("/ready", get(ready))
        .route("/api/cluster", get(status))
        .route("/api/nodes", get(nodes))
        .route("/api/cluster/join", post(join))
        .route("/api/cluster/leave/{name}", post(leave))
        .route(
            "/api/cluster/plugins/{name}/activate/{hash}",
            post(activate_plugin),
        )
}

pub(super) fn node(s: &AdminState) -> Result<&std::sync::Arc<ClusterNode>, ApiError> {
    s.broker.cluster().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "this node runs alone (no [cluster] section)".to_owned(),
        )
    })
}

/// Readiness for a load balancer or Kubernetes: a node alone is ready
/// once it serves; a cluster node once it is a voting member with a
/// leader. Open like `/metrics` (it tells nothing but that).
async fn ready(State(s): State<AdminState>) -> (StatusCode, &'static str) {
    match s.broker.cluster() {
        Some(node) if !node.ready() => (StatusCode::SERVICE_UNAVAILABLE, "not joined\n"),
        Some(_) if !s.broker.caught_up() => (
            StatusCode::SERVICE_UNAVAILABLE,
            "catching up (definitions or quorum queue replicas)\n",
        ),
        _ => (StatusCode::OK, "ready\n"),
    }
}

async fn status(State(s): State<AdminState>) -> Result<Json<NodeStatus>, ApiError> {
    Ok(Json(node(&s)?.status()))
}

async fn nodes(State(s): State<AdminState>) -> Json<Vec<NodeView>> {
    let Some(node) = s.broker.cluster() else {
        return Json(vec![NodeView {
            name: "wasmq@localhost".into(),
            running: Some(true),
            kind: "disc".into(),
            is_leader: true,
            voter: true,
            cluster_addr: None,
            log_index: None,
        }]);
    };
    let st = node.status();
    Json(
        st.members
            .into_iter()
            .map(|m| NodeView {
                running: Some(node.reaches(&m.name)),
                name: m.name,
                kind: "disc".into(),
                is_leader: m.leader,
                voter: m.voter,
                cluster_addr: Some(m.addr),
                log_index: m.matched_index,
            })
            .collect(),
    )
}

#[derive(Deserialize)]
struct JoinBody {
    /// The node-to-node address of a member to join through.
    peer: String,
}

async fn join(
    State(s): State<AdminState>,
    Json(body): Json<JoinBody>,
) -> Result<StatusCode, ApiError> {
    node(&s)?
        .join_via(&body.peer)
        .await
        .map_err(|e| ApiError::new(StatusCode::CONFLICT, e.to_string()))?;
    Ok(StatusCode::NO_CONTENT)
}

/// Serve a kept version of a plugin on every node (rollback): committed
/// like any change; refused if a node refused that version.
async fn activate_plugin(
    State(s): State<AdminState>,
    Path((name, hash)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let applied = node(&s)?
        .propose(crate::cluster::Command::ActivatePlugin { name, hash })
        .await
        .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    match applied {
        crate::cluster::Applied::Refused { code, text } => Err(ApiError::new(
            if code == 404 {
                StatusCode::NOT_FOUND
            } else {
                StatusCode::CONFLICT
            },
            text,
        )),
        _ => Ok(StatusCode::NO_CONTENT),
    }
}

async fn leave(
    State(s): State<AdminState>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    node(&s)?
        .leave(&name)
        .await
        .map_err(|e| ApiError::new(StatusCode::CONFLICT, e.to_string()))?;
    Ok(StatusCode::NO_CONTENT)
}
