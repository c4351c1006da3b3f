//! Policies and operator policies over RabbitMQ's HTTP API paths:
//! `/api/policies` and `/api/operator-policies`, with its bodies
//! (`pattern`, `definition`, `priority`, `apply-to`) and answers.

use std::collections::BTreeMap;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Extension, Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{AdminState, ApiError, Viewer};
use crate::access::AccessChange;
use crate::policy::PolicyRecord;

type ApiResult<T = Json<Value>> = Result<T, ApiError>;

pub(super) fn routes() -> Router<AdminState> {
    Router::new()
        .route("/api/policies", get(|s, v| list(s, v, None, false)))
        .route(
            "/api/policies/{vhost}",
            get(|s, v, Path(vhost): Path<String>| list(s, v, Some(vhost), false)),
        )
        .route(
            "/api/policies/{vhost}/{name}",
            get(|s, v, p| one(s, v, p, false))
                .put(|s, p, b| put(s, p, b, false))
                .delete(|s, p| delete(s, p, false)),
        )
        .route("/api/operator-policies", get(|s, v| list(s, v, None, true)))
        .route(
            "/api/operator-policies/{vhost}",
            get(|s, v, Path(vhost): Path<String>| list(s, v, Some(vhost), true)),
        )
        .route(
            "/api/operator-policies/{vhost}/{name}",
            get(|s, v, p| one(s, v, p, true))
                .put(|s, p, b| put(s, p, b, true))
                .delete(|s, p| delete(s, p, true)),
        )
}

fn policy_json(vhost: &str, p: &PolicyRecord) -> Value {
    json!({
        "vhost": vhost, "name": p.name, "pattern": p.pattern,
        "apply-to": p.apply_to, "priority": p.priority, "definition": p.definition,
    })
}

fn policies_of(s: &AdminState, operator: bool) -> BTreeMap<String, BTreeMap<String, PolicyRecord>> {
    let d = s.broker.accounts().directory();
    if operator {
        d.operator_policies
    } else {
        d.policies
    }
}

async fn list(
    State(s): State<AdminState>,
    Extension(viewer): Extension<Viewer>,
    vhost: Option<String>,
    operator: bool,
) -> ApiResult {
    if let Some(v) = &vhost
        && (!s.broker.accounts().directory().vhosts.contains_key(v) || !viewer.sees(v))
    {
        return Err(ApiError::not_found(format!("vhost '{v}'")));
    }
    let mut out = Vec::new();
    for (v, by_name) in policies_of(&s, operator) {
        if vhost.as_ref().is_some_and(|w| *w != v) || !viewer.sees(&v) {
            continue;
        }
        out.extend(by_name.values().map(|p| policy_json(&v, p)));
    }
    Ok(Json(Value::Array(out)))
}

async fn one(
    State(s): State<AdminState>,
    Extension(viewer): Extension<Viewer>,
    Path((vhost, name)): Path<(String, String)>,
    operator: bool,
) -> ApiResult {
    policies_of(&s, operator)
        .get(&vhost)
        .and_then(|p| p.get(&name))
        .filter(|_| viewer.sees(&vhost))
        .map(|p| Json(policy_json(&vhost, p)))
        .ok_or_else(|| ApiError::not_found(format!("policy '{name}' in vhost '{vhost}'")))
}

/// RabbitMQ's body: `pattern` and `definition` required, `priority` 0 and
/// `apply-to` `all` when left out.
#[derive(Deserialize)]
struct Body {
    pattern: String,
    definition: BTreeMap<String, Value>,
    #[serde(default)]
    priority: i64,
    #[serde(rename = "apply-to", default = "all")]
    apply_to: String,
}

fn all() -> String {
    "all".into()
}

async fn put(
    State(s): State<AdminState>,
    Path((vhost, name)): Path<(String, String)>,
    bytes: Bytes,
    operator: bool,
) -> ApiResult<StatusCode> {
    let b: Body =
        serde_json::from_slice(&bytes).map_err(|e| ApiError::bad_request(format!("body: {e}")))?;
    let new = policies_of(&s, operator)
        .get(&vhost)
        .is_none_or(|p| !p.contains_key(&name));
    let change = AccessChange::PutPolicy {
        vhost,
        policy: PolicyRecord {
            name,
            pattern: b.pattern,
            apply_to: b.apply_to,
            priority: b.priority,
            definition: b.definition,
        },
        operator,
    };
    s.broker.change_access(change).await?;
    Ok(if new {
        StatusCode::CREATED
    } else {
        StatusCode::NO_CONTENT
    })
}

async fn delete(
    State(s): State<AdminState>,
    Path((vhost, name)): Path<(String, String)>,
    operator: bool,
) -> ApiResult<StatusCode> {
    s.broker
        .change_access(AccessChange::DeletePolicy {
            vhost,
            name,
            operator,
        })
        .await?;
    Ok(StatusCode::NO_CONTENT)
}
