//! Users, vhosts, permissions and limits over RabbitMQ's HTTP API paths:
//! `/api/users`, `/api/vhosts`, `/api/permissions`, `/api/vhost-limits`,
//! `/api/user-limits`, `/api/whoami`.
//!
//! Bodies and answers have RabbitMQ's shapes, so its `rabbitmqadmin`, its
//! Terraform provider and operators' scripts work unchanged: a `PUT`
//! answers 201 when it created and 204 when it replaced, a user is shown
//! with its `password_hash` and never a password, and `tags` is taken as
//! a list or as RabbitMQ's comma-separated string. Reading users and
//! permissions needs the administrator tag, as in RabbitMQ.

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
use crate::access::directory::{PermissionRecord, Tags, UserRecord, VHostRecord};
use crate::access::password::PasswordHash;
use crate::broker::AccessChangeError;

type ApiResult<T = Json<Value>> = Result<T, ApiError>;

pub(super) fn routes() -> Router<AdminState> {
    Router::new()
        .route("/api/whoami", get(whoami))
        .route("/api/vhosts", get(vhosts))
        .route(
            "/api/vhosts/{name}",
            get(vhost).put(put_vhost).delete(delete_vhost),
        )
        .route("/api/vhosts/{name}/permissions", get(vhost_permissions))
        .route("/api/users", get(users))
        .route(
            "/api/users/{name}",
            get(user).put(put_user).delete(delete_user),
        )
        .route("/api/users/{name}/permissions", get(user_permissions))
        .route("/api/vhost-limits", get(vhost_limits))
        .route("/api/vhost-limits/{vhost}", get(vhost_limits_of))
        .route(
            "/api/vhost-limits/{vhost}/{name}",
            axum::routing::put(put_vhost_limit).delete(delete_vhost_limit),
        )
        .route("/api/user-limits", get(user_limits))
        .route("/api/user-limits/{user}", get(user_limits_of))
        .route(
            "/api/user-limits/{user}/{name}",
            axum::routing::put(put_user_limit).delete(delete_user_limit),
        )
        .route("/api/permissions", get(permissions))
        .route(
            "/api/permissions/{vhost}/{user}",
            get(permission)
                .put(put_permission)
                .delete(delete_permission),
        )
}

impl From<AccessChangeError> for ApiError {
    fn from(e: AccessChangeError) -> Self {
        match e {
            AccessChangeError::Refused { status, text } => ApiError::new(
                StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST),
                text,
            ),
            AccessChangeError::Unavailable(text) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, text)
            }
        }
    }
}

/// A JSON body, or 400 naming what is wrong with it (an empty body is an
/// empty object, as RabbitMQ takes `PUT /api/vhosts/x` without one).
fn body<T: serde::de::DeserializeOwned>(bytes: &Bytes) -> Result<T, ApiError> {
    let bytes: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        bytes
    };
    serde_json::from_slice(bytes).map_err(|e| ApiError::bad_request(format!("body: {e}")))
}

fn created(new: bool) -> StatusCode {
    if new {
        StatusCode::CREATED
    } else {
        StatusCode::NO_CONTENT
    }
}

async fn whoami(Extension(viewer): Extension<Viewer>, State(s): State<AdminState>) -> Json<Value> {
    let tags = s
        .broker
        .accounts()
        .directory()
        .users
        .get(&viewer.user)
        .map(|u| u.tags.clone())
        .unwrap_or_default();
    Json(json!({"name": viewer.user, "tags": tags}))
}

fn vhost_json(s: &AdminState, v: &VHostRecord) -> Value {
    let (mut messages, mut ready, mut unacked) = (0u64, 0u64, 0u64);
    if let Some(live) = s.broker.vhost(&v.name) {
        for q in live.queues() {
            let (r, u) = (q.len() as u64, q.unacked());
            ready += r;
            unacked += u;
            messages += r + u;
        }
    }
    json!({
        "name": v.name,
        "description": v.description,
        "tags": v.tags,
        "messages": messages,
        "messages_ready": ready,
        "messages_unacknowledged": unacked,
    })
}

async fn vhosts(State(s): State<AdminState>, Extension(viewer): Extension<Viewer>) -> Json<Value> {
    let d = s.broker.accounts().directory();
    Json(Value::Array(
        d.vhosts
            .values()
            .filter(|v| viewer.sees(&v.name))
            .map(|v| vhost_json(&s, v))
            .collect(),
    ))
}

async fn vhost(
    State(s): State<AdminState>,
    Extension(viewer): Extension<Viewer>,
    Path(name): Path<String>,
) -> ApiResult {
    let d = s.broker.accounts().directory();
    match d.vhosts.get(&name).filter(|_| viewer.sees(&name)) {
        Some(v) => Ok(Json(vhost_json(&s, v))),
        None => Err(ApiError::not_found(format!("vhost '{name}'"))),
    }
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct VHostBody {
    description: String,
    tags: Tags,
    /// RabbitMQ 3.8+: accepted; wasmq's queues default to classic.
    #[allow(dead_code)]
    default_queue_type: Option<String>,
    /// RabbitMQ's tracing flag: accepted (wasmq traces per exchange).
    #[allow(dead_code)]
    tracing: Option<bool>,
}

async fn put_vhost(
    State(s): State<AdminState>,
    Path(name): Path<String>,
    bytes: Bytes,
) -> ApiResult<StatusCode> {
    let b: VHostBody = body(&bytes)?;
    let existing = s.broker.accounts().directory().vhosts.get(&name).cloned();
    let change = AccessChange::PutVHost {
        vhost: VHostRecord {
            name,
            description: b.description,
            tags: b.tags.into_vec(),
            // Limits are set on their own path.
            limits: existing
                .as_ref()
                .map(|v| v.limits.clone())
                .unwrap_or_default(),
        },
    };
    let new = existing.is_none();
    s.broker.change_access(change).await?;
    Ok(created(new))
}

async fn delete_vhost(
    State(s): State<AdminState>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    s.broker
        .change_access(AccessChange::DeleteVHost { name })
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

fn user_json(u: &UserRecord) -> Value {
    json!({
        "name": u.name,
        "password_hash": u.password_hash,
        "hashing_algorithm": u.hashing_algorithm,
        "tags": u.tags,
        "limits": u.limits,
        "loopback_only": u.loopback_only,
        "from_config": u.from_config,
    })
}

async fn users(State(s): State<AdminState>, Extension(viewer): Extension<Viewer>) -> ApiResult {
    viewer.administrator("users")?;
    let d = s.broker.accounts().directory();
    Ok(Json(Value::Array(
        d.users.values().map(user_json).collect(),
    )))
}

async fn user(
    State(s): State<AdminState>,
    Extension(viewer): Extension<Viewer>,
    Path(name): Path<String>,
) -> ApiResult {
    viewer.administrator("users")?;
    let d = s.broker.accounts().directory();
    d.users
        .get(&name)
        .map(|u| Json(user_json(u)))
        .ok_or_else(|| ApiError::not_found(format!("user '{name}'")))
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct UserBody {
    password: Option<String>,
    password_hash: Option<String>,
    hashing_algorithm: Option<String>,
    tags: Tags,
    /// wasmq's: logs in from loopback addresses only.
    loopback_only: Option<bool>,
}

async fn put_user(
    State(s): State<AdminState>,
    Path(name): Path<String>,
    bytes: Bytes,
) -> ApiResult<StatusCode> {
    let b: UserBody = body(&bytes)?;
    let existing = s.broker.accounts().directory().users.get(&name).cloned();
    let (password_hash, hashing_algorithm) = match (b.password, b.password_hash) {
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_request(
                "password, password_hash: give one of them, not both",
            ));
        }
        (Some(p), None) => {
            let (h, a) = PasswordHash::new(&p).to_rabbitmq();
            (h, a.to_owned())
        }
        (None, Some(h)) => (
            h,
            b.hashing_algorithm
                .unwrap_or_else(|| "rabbit_password_hashing_sha256".into()),
        ),
        // RabbitMQ: neither keeps the password of an existing user and
        // makes a new one without (a certificate logs it in).
        (None, None) => match &existing {
            Some(u) => (u.password_hash.clone(), u.hashing_algorithm.clone()),
            None => (String::new(), "rabbit_password_hashing_sha256".into()),
        },
    };
    let user = UserRecord {
        name: name.clone(),
        password_hash,
        hashing_algorithm,
        tags: b.tags.into_vec(),
        loopback_only: b
            .loopback_only
            .unwrap_or_else(|| existing.as_ref().is_some_and(|u| u.loopback_only)),
        from_config: false,
        // Limits are set on their own path.
        limits: existing
            .as_ref()
            .map(|u| u.limits.clone())
            .unwrap_or_default(),
    };
    s.broker
        .change_access(AccessChange::PutUser { user })
        .await?;
    Ok(created(existing.is_none()))
}

async fn delete_user(
    State(s): State<AdminState>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    s.broker
        .change_access(AccessChange::DeleteUser { name })
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

fn permission_json(vhost: &str, user: &str, p: &PermissionRecord) -> Value {
    json!({
        "user": user, "vhost": vhost,
        "configure": p.configure, "write": p.write, "read": p.read,
    })
}

/// Every permission for which `keep(vhost, user)` holds.
fn list_permissions(s: &AdminState, keep: impl Fn(&str, &str) -> bool) -> Json<Value> {
    let d = s.broker.accounts().directory();
    let mut out = Vec::new();
    for (vhost, users) in &d.permissions {
        for (user, p) in users {
            if keep(vhost, user) {
                out.push(permission_json(vhost, user, p));
            }
        }
    }
    Json(Value::Array(out))
}

async fn permissions(
    State(s): State<AdminState>,
    Extension(viewer): Extension<Viewer>,
) -> ApiResult {
    viewer.administrator("permissions")?;
    Ok(list_permissions(&s, |_, _| true))
}

async fn vhost_permissions(
    State(s): State<AdminState>,
    Extension(viewer): Extension<Viewer>,
    Path(name): Path<String>,
) -> ApiResult {
    viewer.administrator("permissions")?;
    if !s.broker.accounts().directory().vhosts.contains_key(&name) {
        return Err(ApiError::not_found(format!("vhost '{name}'")));
    }
    Ok(list_permissions(&s, |v, _| v == name))
}

async fn user_permissions(
    State(s): State<AdminState>,
    Extension(viewer): Extension<Viewer>,
    Path(name): Path<String>,
) -> ApiResult {
    viewer.administrator("permissions")?;
    if !s.broker.accounts().exists(&name) {
        return Err(ApiError::not_found(format!("user '{name}'")));
    }
    Ok(list_permissions(&s, |_, u| u == name))
}

async fn permission(
    State(s): State<AdminState>,
    Extension(viewer): Extension<Viewer>,
    Path((vhost, user)): Path<(String, String)>,
) -> ApiResult {
    viewer.administrator("permissions")?;
    let d = s.broker.accounts().directory();
    d.permissions_of(&vhost, &user)
        .map(|p| Json(permission_json(&vhost, &user, p)))
        .ok_or_else(|| {
            ApiError::not_found(format!("permissions of user '{user}' in vhost '{vhost}'"))
        })
}

#[derive(Deserialize)]
struct PermissionBody {
    configure: String,
    write: String,
    read: String,
}

async fn put_permission(
    State(s): State<AdminState>,
    Path((vhost, user)): Path<(String, String)>,
    bytes: Bytes,
) -> ApiResult<StatusCode> {
    let b: PermissionBody = body(&bytes)?;
    let new = s
        .broker
        .accounts()
        .directory()
        .permissions_of(&vhost, &user)
        .is_none();
    let change = AccessChange::PutPermissions {
        vhost,
        user,
        permissions: PermissionRecord {
            configure: b.configure,
            write: b.write,
            read: b.read,
        },
    };
    s.broker.change_access(change).await?;
    Ok(created(new))
}

async fn delete_permission(
    State(s): State<AdminState>,
    Path((vhost, user)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    s.broker
        .change_access(AccessChange::DeletePermissions { vhost, user })
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `{"vhost": ..., "value": {limits}}` for each vhost with limits that
/// `keep` names, as RabbitMQ lists them.
fn list_vhost_limits(s: &AdminState, viewer: &Viewer, keep: impl Fn(&str) -> bool) -> Json<Value> {
    let d = s.broker.accounts().directory();
    Json(Value::Array(
        d.vhosts
            .values()
            .filter(|v| !v.limits.is_empty() && keep(&v.name) && viewer.sees(&v.name))
            .map(|v| json!({"vhost": v.name, "value": v.limits}))
            .collect(),
    ))
}

async fn vhost_limits(
    State(s): State<AdminState>,
    Extension(viewer): Extension<Viewer>,
) -> Json<Value> {
    list_vhost_limits(&s, &viewer, |_| true)
}

async fn vhost_limits_of(
    State(s): State<AdminState>,
    Extension(viewer): Extension<Viewer>,
    Path(vhost): Path<String>,
) -> ApiResult {
    if !s.broker.accounts().directory().vhosts.contains_key(&vhost) || !viewer.sees(&vhost) {
        return Err(ApiError::not_found(format!("vhost '{vhost}'")));
    }
    Ok(list_vhost_limits(&s, &viewer, |v| v == vhost))
}

async fn user_limits(
    State(s): State<AdminState>,
    Extension(viewer): Extension<Viewer>,
) -> ApiResult {
    viewer.administrator("user limits")?;
    Ok(list_user_limits(&s, |_| true))
}

async fn user_limits_of(
    State(s): State<AdminState>,
    Extension(viewer): Extension<Viewer>,
    Path(user): Path<String>,
) -> ApiResult {
    viewer.administrator("user limits")?;
    if !s.broker.accounts().exists(&user) {
        return Err(ApiError::not_found(format!("user '{user}'")));
    }
    Ok(list_user_limits(&s, |u| u == user))
}

fn list_user_limits(s: &AdminState, keep: impl Fn(&str) -> bool) -> Json<Value> {
    let d = s.broker.accounts().directory();
    Json(Value::Array(
        d.users
            .values()
            .filter(|u| !u.limits.is_empty() && keep(&u.name))
            .map(|u| json!({"user": u.name, "value": u.limits}))
            .collect(),
    ))
}

#[derive(Deserialize)]
struct LimitBody {
    value: Value,
}

/// RabbitMQ's `{"value": N}`: an integer (negative: no limit).
fn limit_value(bytes: &Bytes) -> Result<i64, ApiError> {
    let b: LimitBody = body(bytes)?;
    b.value.as_i64().ok_or_else(|| {
        ApiError::bad_request(format!("value: must be an integer (got {})", b.value))
    })
}

async fn put_vhost_limit(
    State(s): State<AdminState>,
    Path((vhost, name)): Path<(String, String)>,
    bytes: Bytes,
) -> ApiResult<StatusCode> {
    let value = Some(limit_value(&bytes)?);
    s.broker
        .change_access(AccessChange::SetVHostLimit { vhost, name, value })
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn delete_vhost_limit(
    State(s): State<AdminState>,
    Path((vhost, name)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    s.broker
        .change_access(AccessChange::SetVHostLimit {
            vhost,
            name,
            value: None,
        })
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn put_user_limit(
    State(s): State<AdminState>,
    Path((user, name)): Path<(String, String)>,
    bytes: Bytes,
) -> ApiResult<StatusCode> {
    let value = Some(limit_value(&bytes)?);
    s.broker
        .change_access(AccessChange::SetUserLimit { user, name, value })
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn delete_user_limit(
    State(s): State<AdminState>,
    Path((user, name)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    s.broker
        .change_access(AccessChange::SetUserLimit {
            user,
            name,
            value: None,
        })
        .await?;
    Ok(StatusCode::NO_CONTENT)
}
