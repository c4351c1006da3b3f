//! The access directory as data: users, vhosts and permissions, and the
//! changes an operator makes to them.
//!
//! This is what is kept (a file on a single node, the Raft log and its
//! snapshots in a cluster) and what a definitions export carries, in
//! RabbitMQ's shapes. A change is applied by [`Directory::apply`], which
//! depends on nothing but the directory and the change: every node of a
//! cluster applies the same entries in the same order and reaches the same
//! verdict. A change is checked whole before anything of it is applied (an
//! import with one bad permission changes nothing), and none may leave a
//! broker that had an administrator without one.
//!
//! What applying did to the running broker (a vhost to create or delete,
//! connections to close) is not returned by each change: it is read off the
//! directory before and after ([`effects`]), so an import, a config seed
//! and a single `PUT` have their consequences computed the same way.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::password::PasswordHash;
use super::{Pattern, User};
use crate::policy::PolicyRecord;

/// The tag that makes a user an administrator.
pub const ADMINISTRATOR: &str = "administrator";

/// Users, vhosts and permissions.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Directory {
    /// By name.
    #[serde(default)]
    pub users: BTreeMap<String, UserRecord>,
    /// By name.
    #[serde(default)]
    pub vhosts: BTreeMap<String, VHostRecord>,
    /// By vhost, then user.
    #[serde(default)]
    pub permissions: BTreeMap<String, BTreeMap<String, PermissionRecord>>,
    /// By vhost, then name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub policies: BTreeMap<String, BTreeMap<String, PolicyRecord>>,
    /// By vhost, then name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub operator_policies: BTreeMap<String, BTreeMap<String, PolicyRecord>>,
    /// The config file's users were laid down (they are the initial state
    /// only once).
    #[serde(default)]
    pub seeded: bool,
}

/// A user as kept: its password only as a salted hash.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRecord {
    /// Name.
    pub name: String,
    /// RabbitMQ's `password_hash`: base64 of salt and digest ("" for none).
    pub password_hash: String,
    /// RabbitMQ's `hashing_algorithm`.
    pub hashing_algorithm: String,
    /// `administrator`, `monitoring`, `management`, `impersonator`, ...
    #[serde(default)]
    pub tags: Vec<String>,
    /// Logs in from loopback addresses only (RabbitMQ's `loopback_users`).
    #[serde(default)]
    pub loopback_only: bool,
    /// Kept as the config file says: changed only there
    /// (`[access] config_users = "enforce"`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub from_config: bool,
    /// `max-connections`, `max-channels` (a negative value: no limit).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub limits: BTreeMap<String, i64>,
}

impl UserRecord {
    /// A user with `password` hashed now.
    pub fn with_password(name: &str, password: &str, tags: Vec<String>) -> UserRecord {
        let (password_hash, algorithm) = PasswordHash::new(password).to_rabbitmq();
        UserRecord {
            name: name.to_owned(),
            password_hash,
            hashing_algorithm: algorithm.to_owned(),
            tags,
            loopback_only: false,
            from_config: false,
            limits: BTreeMap::new(),
        }
    }

    /// Whether it has `tag`.
    pub fn has_tag(&self, tag: &str) -> bool {
        self.tags.iter().any(|t| t == tag)
    }

    /// Its stored password.
    pub fn password(&self) -> Result<PasswordHash, String> {
        PasswordHash::from_rabbitmq(&self.password_hash, &self.hashing_algorithm)
    }
}

/// A vhost as kept.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VHostRecord {
    /// Name.
    pub name: String,
    /// What it is for (shown, not used).
    #[serde(default)]
    pub description: String,
    /// Operator tags (shown, not used).
    #[serde(default)]
    pub tags: Vec<String>,
    /// `max-connections`, `max-queues` (a negative value: no limit).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub limits: BTreeMap<String, i64>,
}

/// A user's three patterns in one vhost.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PermissionRecord {
    /// Resources the user may declare and delete.
    pub configure: String,
    /// Resources the user may publish to or bind to.
    pub write: String,
    /// Resources the user may consume from, get from, purge, or bind from.
    pub read: String,
}

impl PermissionRecord {
    /// Everything (`.*` three times).
    pub fn full() -> PermissionRecord {
        PermissionRecord {
            configure: ".*".into(),
            write: ".*".into(),
            read: ".*".into(),
        }
    }
}

/// One change of the directory.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum AccessChange {
    /// Create or replace a user.
    PutUser {
        /// The user.
        user: UserRecord,
    },
    /// Delete a user and its permissions.
    DeleteUser {
        /// Its name.
        name: String,
    },
    /// Create (or describe) a vhost.
    PutVHost {
        /// The vhost.
        vhost: VHostRecord,
    },
    /// Delete a vhost, everything in it, and the permissions there.
    DeleteVHost {
        /// Its name.
        name: String,
    },
    /// Set a user's permissions in a vhost.
    PutPermissions {
        /// The vhost.
        vhost: String,
        /// The user.
        user: String,
        /// The patterns.
        permissions: PermissionRecord,
    },
    /// Revoke a user's permissions in a vhost.
    DeletePermissions {
        /// The vhost.
        vhost: String,
        /// The user.
        user: String,
    },
    /// Create or replace a policy (or an operator policy).
    PutPolicy {
        /// Its vhost.
        vhost: String,
        /// The policy.
        policy: PolicyRecord,
        /// An operator policy.
        #[serde(default)]
        operator: bool,
    },
    /// Delete a policy (or an operator policy).
    DeletePolicy {
        /// Its vhost.
        vhost: String,
        /// Its name.
        name: String,
        /// An operator policy.
        #[serde(default)]
        operator: bool,
    },
    /// Set (or with no value, clear) one of a vhost's limits.
    SetVHostLimit {
        /// The vhost.
        vhost: String,
        /// `max-connections` or `max-queues`.
        name: String,
        /// The limit (negative: none).
        value: Option<i64>,
    },
    /// Set (or with no value, clear) one of a user's limits.
    SetUserLimit {
        /// The user.
        user: String,
        /// `max-connections` or `max-channels`.
        name: String,
        /// The limit (negative: none).
        value: Option<i64>,
    },
    /// The config file's users, their vhosts and permissions: laid down
    /// once, as the initial state; with `enforce`, laid over what is kept
    /// at every start and marked as the config file's.
    Config {
        /// What the config file says.
        directory: Directory,
        /// `[access] config_users = "enforce"`.
        enforce: bool,
    },
    /// Users, vhosts and permissions of a definitions import: each added
    /// or replaced, all of it or nothing.
    Import {
        /// What the document says.
        directory: Directory,
    },
}

/// Why a change was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AccessError {
    /// No such user, vhost or permission.
    #[error("{kind} '{name}' not found")]
    NotFound {
        /// What was looked for.
        kind: &'static str,
        /// Its name.
        name: String,
    },
    /// A field of the request is wrong.
    #[error("{field}: {reason}")]
    Invalid {
        /// The field at fault.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// It would leave the broker without an administrator.
    #[error(
        "refused: no user would be left with the administrator tag (the admin API would be locked); give another user the tag first"
    )]
    LastAdministrator,
    /// The user is the config file's.
    #[error(
        "user '{0}' is defined in the config file, which is authoritative ([access] config_users = \"enforce\"): change it there"
    )]
    FromConfig(String),
}

impl AccessError {
    /// The HTTP status it answers with.
    pub fn status(&self) -> u16 {
        match self {
            AccessError::NotFound { .. } => 404,
            AccessError::Invalid { .. } => 400,
            AccessError::LastAdministrator | AccessError::FromConfig(_) => 409,
        }
    }

    fn invalid(field: impl Into<String>, reason: impl Into<String>) -> AccessError {
        AccessError::Invalid {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// What a change asks of the running broker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Create the vhost.
    AddVHost(String),
    /// Delete the vhost and everything in it; close its connections.
    DeleteVHost(String),
    /// The vhost's policies changed: its queues and exchanges take what
    /// applies to them now.
    PoliciesChanged(String),
    /// Close the user's connections (to one vhost, or all), saying why.
    CloseUser {
        /// The user.
        user: String,
        /// Only the connections to this vhost.
        vhost: Option<String>,
        /// Told to the client (320 CONNECTION_FORCED).
        reason: String,
    },
}

/// A name of a user or vhost: what an AMQP short string carries, and no
/// control characters (names end up in logs and file names' hashes).
fn check_name(field: &str, name: &str) -> Result<(), AccessError> {
    if name.is_empty() || name.len() > 255 {
        return Err(AccessError::invalid(
            field,
            format!("must be 1 to 255 bytes (got {})", name.len()),
        ));
    }
    if name.chars().any(char::is_control) {
        return Err(AccessError::invalid(
            field,
            format!(
                "must not contain control characters (got '{}')",
                crate::untrusted::text(name)
            ),
        ));
    }
    Ok(())
}

fn check_user(user: &UserRecord) -> Result<(), AccessError> {
    check_name("name", &user.name)?;
    check_limits(&user.limits, &USER_LIMITS)?;
    user.password()
        .map_err(|e| AccessError::invalid("password_hash", e))?;
    for tag in &user.tags {
        if tag.is_empty()
            || tag.len() > 255
            || tag.contains(',')
            || tag.chars().any(char::is_control)
        {
            return Err(AccessError::invalid(
                "tags",
                format!(
                    "a tag is 1 to 255 bytes without commas or control characters (got '{}')",
                    crate::untrusted::text(tag)
                ),
            ));
        }
    }
    Ok(())
}

/// The limits RabbitMQ has for vhosts.
pub const VHOST_LIMITS: [&str; 2] = ["max-connections", "max-queues"];
/// The limits RabbitMQ has for users.
pub const USER_LIMITS: [&str; 2] = ["max-connections", "max-channels"];

fn check_limits(limits: &BTreeMap<String, i64>, known: &[&str]) -> Result<(), AccessError> {
    for name in limits.keys() {
        if !known.contains(&name.as_str()) {
            return Err(AccessError::invalid(
                "limits",
                format!(
                    "unknown limit '{}' (known: {})",
                    crate::untrusted::text(name),
                    known.join(", ")
                ),
            ));
        }
    }
    Ok(())
}

fn check_permissions(p: &PermissionRecord) -> Result<(), AccessError> {
    for (field, pattern) in [
        ("configure", &p.configure),
        ("write", &p.write),
        ("read", &p.read),
    ] {
        Pattern::new(pattern).map_err(|e| {
            AccessError::invalid(
                field,
                format!(
                    "bad regular expression '{}': {e}",
                    crate::untrusted::text(pattern)
                ),
            )
        })?;
    }
    Ok(())
}

impl Directory {
    /// The directory kept in `path` (`access.json`), `None` if there is no
    /// such file; an unreadable one is an error naming the line.
    pub fn read(path: &std::path::Path) -> Result<Option<Directory>, String> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice::<Directory>(&bytes)
                .map(Some)
                .map_err(|e| {
                    format!(
                        "{}: line {} column {}: {e}",
                        path.display(),
                        e.line(),
                        e.column()
                    )
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("{}: {e}", path.display())),
        }
    }
}

impl Directory {
    /// The directory the config file's users make: each user, the vhosts
    /// it names, full permissions in its `vhosts` and its patterns in
    /// `permissions`.
    pub fn from_config(users: &[User], from_config: bool) -> Directory {
        let mut d = Directory::default();
        for u in users {
            let mut record = UserRecord::with_password(&u.name, &u.password, u.tags.clone());
            record.loopback_only = u.loopback_only;
            record.from_config = from_config;
            d.users.insert(u.name.clone(), record);
            for v in &u.vhosts {
                d.add_vhost(v);
                d.permissions
                    .entry(v.clone())
                    .or_default()
                    .insert(u.name.clone(), PermissionRecord::full());
            }
            for p in &u.permissions {
                d.add_vhost(&p.vhost);
                d.permissions.entry(p.vhost.clone()).or_default().insert(
                    u.name.clone(),
                    PermissionRecord {
                        configure: p.configure.source().to_owned(),
                        write: p.write.source().to_owned(),
                        read: p.read.source().to_owned(),
                    },
                );
            }
        }
        d
    }

    fn add_vhost(&mut self, name: &str) {
        self.vhosts
            .entry(name.to_owned())
            .or_insert_with(|| VHostRecord {
                name: name.to_owned(),
                ..Default::default()
            });
    }

    /// A user's permissions in a vhost.
    pub fn permissions_of(&self, vhost: &str, user: &str) -> Option<&PermissionRecord> {
        self.permissions.get(vhost)?.get(user)
    }

    fn administrators(&self) -> usize {
        self.users
            .values()
            .filter(|u| u.has_tag(ADMINISTRATOR))
            .count()
    }

    fn config_user(&self, name: &str) -> Result<(), AccessError> {
        match self.users.get(name) {
            Some(u) if u.from_config => Err(AccessError::FromConfig(name.to_owned())),
            _ => Ok(()),
        }
    }

    /// Apply `change` whole, or refuse it and change nothing. Returns what
    /// the running broker must do.
    pub fn apply(&mut self, change: &AccessChange) -> Result<Vec<Effect>, AccessError> {
        let mut next = self.clone();
        next.apply_to(change)?;
        if self.administrators() > 0 && next.administrators() == 0 {
            return Err(AccessError::LastAdministrator);
        }
        let effects = effects(self, &next);
        *self = next;
        Ok(effects)
    }

    fn apply_to(&mut self, change: &AccessChange) -> Result<(), AccessError> {
        match change {
            AccessChange::PutUser { user } => {
                check_user(user)?;
                self.config_user(&user.name)?;
                let mut user = user.clone();
                user.from_config = false;
                self.users.insert(user.name.clone(), user);
            }
            AccessChange::DeleteUser { name } => {
                if !self.users.contains_key(name) {
                    return Err(AccessError::NotFound {
                        kind: "user",
                        name: name.clone(),
                    });
                }
                self.config_user(name)?;
                self.users.remove(name);
                for per_vhost in self.permissions.values_mut() {
                    per_vhost.remove(name);
                }
            }
            AccessChange::PutVHost { vhost } => {
                check_name("name", &vhost.name)?;
                check_limits(&vhost.limits, &VHOST_LIMITS)?;
                self.vhosts.insert(vhost.name.clone(), vhost.clone());
            }
            AccessChange::SetVHostLimit { vhost, name, value } => {
                let Some(v) = self.vhosts.get_mut(vhost) else {
                    return Err(AccessError::NotFound {
                        kind: "vhost",
                        name: vhost.clone(),
                    });
                };
                set_limit(&mut v.limits, name, *value, &VHOST_LIMITS)?;
            }
            AccessChange::SetUserLimit { user, name, value } => {
                self.config_user(user)?;
                let Some(u) = self.users.get_mut(user) else {
                    return Err(AccessError::NotFound {
                        kind: "user",
                        name: user.clone(),
                    });
                };
                set_limit(&mut u.limits, name, *value, &USER_LIMITS)?;
            }
            AccessChange::DeleteVHost { name } => {
                if self.vhosts.remove(name).is_none() {
                    return Err(AccessError::NotFound {
                        kind: "vhost",
                        name: name.clone(),
                    });
                }
                self.permissions.remove(name);
                self.policies.remove(name);
                self.operator_policies.remove(name);
            }
            AccessChange::PutPolicy {
                vhost,
                policy,
                operator,
            } => {
                check_name("name", &policy.name)?;
                policy
                    .check(*operator)
                    .map_err(|e| AccessError::invalid(e.field, e.reason))?;
                if !self.vhosts.contains_key(vhost) {
                    return Err(AccessError::NotFound {
                        kind: "vhost",
                        name: vhost.clone(),
                    });
                }
                let set = if *operator {
                    &mut self.operator_policies
                } else {
                    &mut self.policies
                };
                set.entry(vhost.clone())
                    .or_default()
                    .insert(policy.name.clone(), policy.clone());
            }
            AccessChange::DeletePolicy {
                vhost,
                name,
                operator,
            } => {
                let set = if *operator {
                    &mut self.operator_policies
                } else {
                    &mut self.policies
                };
                let removed = set.get_mut(vhost).and_then(|p| p.remove(name));
                if removed.is_none() {
                    return Err(AccessError::NotFound {
                        kind: if *operator {
                            "operator policy"
                        } else {
                            "policy"
                        },
                        name: format!("{name}@{vhost}"),
                    });
                }
                if set.get(vhost).is_some_and(BTreeMap::is_empty) {
                    set.remove(vhost);
                }
            }
            AccessChange::PutPermissions {
                vhost,
                user,
                permissions,
            } => {
                check_permissions(permissions)?;
                if !self.vhosts.contains_key(vhost) {
                    return Err(AccessError::NotFound {
                        kind: "vhost",
                        name: vhost.clone(),
                    });
                }
                if !self.users.contains_key(user) {
                    return Err(AccessError::NotFound {
                        kind: "user",
                        name: user.clone(),
                    });
                }
                self.config_user(user)?;
                self.permissions
                    .entry(vhost.clone())
                    .or_default()
                    .insert(user.clone(), permissions.clone());
            }
            AccessChange::DeletePermissions { vhost, user } => {
                if self.permissions_of(vhost, user).is_none() {
                    return Err(AccessError::NotFound {
                        kind: "permissions",
                        name: format!("{user}@{vhost}"),
                    });
                }
                self.config_user(user)?;
                if let Some(per_vhost) = self.permissions.get_mut(vhost) {
                    per_vhost.remove(user);
                    if per_vhost.is_empty() {
                        self.permissions.remove(vhost);
                    }
                }
            }
            AccessChange::Config { directory, enforce } => {
                if self.seeded && !enforce {
                    return Ok(());
                }
                self.seeded = true;
                if *enforce {
                    // Users the config file no longer names are the
                    // operator's from now on.
                    for u in self.users.values_mut() {
                        u.from_config = false;
                    }
                }
                self.lay_over(directory, *enforce)?;
            }
            AccessChange::Import { directory } => {
                for name in directory.users.keys() {
                    self.config_user(name)?;
                }
                for (vhost, users) in &directory.permissions {
                    for user in users.keys() {
                        self.config_user(user).map_err(|_| {
                            AccessError::invalid(
                                "permissions",
                                format!("user '{user}' in vhost '{vhost}' is the config file's"),
                            )
                        })?;
                    }
                }
                let mut clean = directory.clone();
                for u in clean.users.values_mut() {
                    u.from_config = false;
                }
                self.lay_over(&clean, false)?;
            }
        }
        Ok(())
    }

    /// Add or replace every user, vhost and permission of `other`.
    fn lay_over(&mut self, other: &Directory, from_config: bool) -> Result<(), AccessError> {
        for v in other.vhosts.values() {
            check_name("vhosts[].name", &v.name)?;
            check_limits(&v.limits, &VHOST_LIMITS).map_err(|e| match e {
                AccessError::Invalid { reason, .. } => AccessError::invalid(
                    format!("vhosts[{}].limits", crate::untrusted::text(&v.name)),
                    reason,
                ),
                e => e,
            })?;
            self.vhosts.insert(v.name.clone(), v.clone());
        }
        for u in other.users.values() {
            check_user(u).map_err(|e| match e {
                AccessError::Invalid { field, reason } => AccessError::invalid(
                    format!("users[{}].{field}", crate::untrusted::text(&u.name)),
                    reason,
                ),
                e => e,
            })?;
            let mut u = u.clone();
            u.from_config = from_config;
            self.users.insert(u.name.clone(), u);
        }
        for (operator, policies) in [(false, &other.policies), (true, &other.operator_policies)] {
            for (vhost, by_name) in policies {
                for p in by_name.values() {
                    let at = format!(
                        "{}[{}@{}]",
                        if operator {
                            "operator_policies"
                        } else {
                            "policies"
                        },
                        crate::untrusted::text(&p.name),
                        crate::untrusted::text(vhost)
                    );
                    p.check(operator)
                        .map_err(|e| AccessError::invalid(format!("{at}.{}", e.field), e.reason))?;
                    if !self.vhosts.contains_key(vhost) {
                        return Err(AccessError::invalid(at, format!("no vhost '{vhost}'")));
                    }
                    let set = if operator {
                        &mut self.operator_policies
                    } else {
                        &mut self.policies
                    };
                    set.entry(vhost.clone())
                        .or_default()
                        .insert(p.name.clone(), p.clone());
                }
            }
        }
        for (vhost, users) in &other.permissions {
            for (user, p) in users {
                let at = format!(
                    "permissions[{}@{}]",
                    crate::untrusted::text(user),
                    crate::untrusted::text(vhost)
                );
                check_permissions(p).map_err(|e| match e {
                    AccessError::Invalid { field, reason } => {
                        AccessError::invalid(format!("{at}.{field}"), reason)
                    }
                    e => e,
                })?;
                if !self.vhosts.contains_key(vhost) {
                    return Err(AccessError::invalid(at, format!("no vhost '{vhost}'")));
                }
                if !self.users.contains_key(user) {
                    return Err(AccessError::invalid(at, format!("no user '{user}'")));
                }
                self.permissions
                    .entry(vhost.clone())
                    .or_default()
                    .insert(user.clone(), p.clone());
            }
        }
        Ok(())
    }
}

/// RabbitMQ's `tags`: a list, or one comma-separated string.
#[derive(Deserialize, Default, Debug)]
#[serde(untagged)]
pub enum Tags {
    /// Absent.
    #[default]
    None,
    /// `"administrator,monitoring"`.
    Text(String),
    /// `["administrator", "monitoring"]`.
    List(Vec<String>),
}

impl Tags {
    /// The tags, trimmed, empty ones dropped.
    pub fn into_vec(self) -> Vec<String> {
        let list = match self {
            Tags::None => Vec::new(),
            Tags::Text(s) => s.split(',').map(str::to_owned).collect(),
            Tags::List(l) => l,
        };
        list.into_iter()
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty())
            .collect()
    }
}

fn default_vhost() -> String {
    "/".into()
}

// The access parts of RabbitMQ's definitions document.
#[derive(Deserialize)]
struct Doc {
    #[serde(default)]
    users: Vec<DocUser>,
    #[serde(default)]
    vhosts: Vec<DocVHost>,
    #[serde(default)]
    permissions: Vec<DocPermission>,
    #[serde(default)]
    exchanges: Vec<InVHost>,
    #[serde(default)]
    queues: Vec<InVHost>,
    #[serde(default)]
    bindings: Vec<InVHost>,
    #[serde(default)]
    parameters: Vec<DocParameter>,
    #[serde(default)]
    policies: Vec<DocPolicy>,
    #[serde(default)]
    operator_policies: Vec<DocPolicy>,
}

#[derive(Deserialize)]
struct DocPolicy {
    #[serde(default = "default_vhost")]
    vhost: String,
    name: String,
    pattern: String,
    #[serde(rename = "apply-to", default = "default_apply_to")]
    apply_to: String,
    #[serde(default)]
    priority: i64,
    #[serde(default)]
    definition: BTreeMap<String, serde_json::Value>,
}

fn default_apply_to() -> String {
    "all".into()
}

impl DocPolicy {
    fn into_record(self) -> (String, PolicyRecord) {
        (
            self.vhost,
            PolicyRecord {
                name: self.name,
                pattern: self.pattern,
                apply_to: self.apply_to,
                priority: self.priority,
                definition: self.definition,
            },
        )
    }
}

// RabbitMQ exports a vhost's limits as a runtime parameter too.
#[derive(Deserialize)]
struct DocParameter {
    #[serde(default)]
    component: String,
    #[serde(default)]
    name: String,
    #[serde(default = "default_vhost")]
    vhost: String,
    #[serde(default)]
    value: serde_json::Value,
}

/// Limits as RabbitMQ writes them: a map (`{"max-connections": 10}`, users
/// and parameters) or a list of pairs (`[["max-connections", 10]]`,
/// vhosts in an export).
fn limits_of(field: &str, v: &serde_json::Value) -> Result<BTreeMap<String, i64>, String> {
    let pairs: Vec<(String, &serde_json::Value)> = match v {
        serde_json::Value::Null => Vec::new(),
        serde_json::Value::Object(m) => m.iter().map(|(k, v)| (k.clone(), v)).collect(),
        serde_json::Value::Array(items) => items
            .iter()
            .map(|item| match item.as_array().map(Vec::as_slice) {
                Some([serde_json::Value::String(k), v]) => Ok((k.clone(), v)),
                _ => Err(format!("{field}: a limit is a [name, value] pair")),
            })
            .collect::<Result<_, _>>()?,
        _ => return Err(format!("{field}: limits are a map of name to integer")),
    };
    pairs
        .into_iter()
        .map(|(k, v)| match v.as_i64() {
            Some(n) => Ok((k, n)),
            None => Err(format!("{field}.{k}: must be an integer (got {v})")),
        })
        .collect()
}

#[derive(Deserialize)]
struct DocUser {
    name: String,
    #[serde(default)]
    password_hash: String,
    #[serde(default)]
    hashing_algorithm: String,
    #[serde(default)]
    tags: Tags,
    loopback_only: Option<bool>,
    #[serde(default)]
    limits: serde_json::Value,
}

#[derive(Deserialize)]
struct DocVHost {
    name: String,
    description: Option<String>,
    #[serde(default)]
    tags: Tags,
    metadata: Option<DocMetadata>,
    #[serde(default)]
    limits: serde_json::Value,
}

#[derive(Deserialize)]
struct DocMetadata {
    #[serde(default)]
    description: String,
    #[serde(default)]
    tags: Tags,
}

#[derive(Deserialize)]
struct DocPermission {
    user: String,
    vhost: String,
    configure: String,
    write: String,
    read: String,
}

#[derive(Deserialize)]
struct InVHost {
    #[serde(default = "default_vhost")]
    vhost: String,
}

impl Directory {
    /// The users, vhosts and permissions of a definitions document in
    /// RabbitMQ's shape (`rabbitmqctl export_definitions`, `GET
    /// /api/definitions`). Every vhost an exchange, queue or binding names
    /// is a vhost too. A user without `loopback_only` (RabbitMQ keeps that
    /// in the node's `loopback_users`, which names `guest` by default) is
    /// loopback-only if it is `guest`.
    pub fn from_rabbitmq(bytes: &[u8]) -> Result<Directory, String> {
        let doc: Doc = serde_json::from_slice(bytes).map_err(|e| format!("definitions: {e}"))?;
        let mut d = Directory::default();
        for v in doc.vhosts {
            let limits = limits_of(&format!("vhosts[{}].limits", v.name), &v.limits)?;
            let (description, tags) = match v.metadata {
                Some(m) => (v.description.unwrap_or(m.description), m.tags.into_vec()),
                None => (v.description.unwrap_or_default(), v.tags.into_vec()),
            };
            d.vhosts.insert(
                v.name.clone(),
                VHostRecord {
                    name: v.name,
                    description,
                    tags,
                    limits,
                },
            );
        }
        for (operator, list) in [(false, doc.policies), (true, doc.operator_policies)] {
            for p in list {
                let (vhost, record) = p.into_record();
                d.add_vhost(&vhost);
                let set = if operator {
                    &mut d.operator_policies
                } else {
                    &mut d.policies
                };
                set.entry(vhost)
                    .or_default()
                    .insert(record.name.clone(), record);
            }
        }
        for p in doc.parameters {
            if p.component == "operator_policy" {
                // RabbitMQ keeps operator policies as runtime parameters.
                let mut value = p.value.clone();
                if let Some(m) = value.as_object_mut() {
                    m.insert("vhost".into(), p.vhost.clone().into());
                    m.entry("name").or_insert(p.name.clone().into());
                }
                let policy: DocPolicy = serde_json::from_value(value)
                    .map_err(|e| format!("parameters[operator_policy@{}]: {e}", p.vhost))?;
                let (vhost, record) = policy.into_record();
                d.add_vhost(&vhost);
                d.operator_policies
                    .entry(vhost)
                    .or_default()
                    .insert(record.name.clone(), record);
                continue;
            }
            if p.component != "vhost-limits" {
                continue;
            }
            let limits = limits_of(&format!("parameters[vhost-limits@{}]", p.vhost), &p.value)?;
            d.add_vhost(&p.vhost);
            if let Some(v) = d.vhosts.get_mut(&p.vhost) {
                v.limits.extend(limits);
            }
        }
        for item in doc.exchanges.iter().chain(&doc.queues).chain(&doc.bindings) {
            d.add_vhost(&item.vhost);
        }
        for u in doc.users {
            let loopback_only = u.loopback_only.unwrap_or(u.name == "guest");
            let hashing_algorithm = if u.hashing_algorithm.is_empty() {
                super::password::Algorithm::Sha256.name().to_owned()
            } else {
                u.hashing_algorithm
            };
            let limits = limits_of(&format!("users[{}].limits", u.name), &u.limits)?;
            d.users.insert(
                u.name.clone(),
                UserRecord {
                    name: u.name,
                    password_hash: u.password_hash,
                    hashing_algorithm,
                    tags: u.tags.into_vec(),
                    loopback_only,
                    from_config: false,
                    limits,
                },
            );
        }
        for p in doc.permissions {
            d.permissions.entry(p.vhost).or_default().insert(
                p.user,
                PermissionRecord {
                    configure: p.configure,
                    write: p.write,
                    read: p.read,
                },
            );
        }
        Ok(d)
    }

    /// Its users, vhosts and permissions as RabbitMQ's definitions
    /// document has them (`loopback_only` added: RabbitMQ ignores it).
    pub fn to_rabbitmq(&self) -> serde_json::Value {
        use serde_json::json;
        let users: Vec<_> = self
            .users
            .values()
            .map(|u| {
                json!({
                    "name": u.name, "password_hash": u.password_hash,
                    "hashing_algorithm": u.hashing_algorithm, "tags": u.tags,
                    "limits": u.limits, "loopback_only": u.loopback_only,
                })
            })
            .collect();
        let vhosts: Vec<_> = self
            .vhosts
            .values()
            .map(|v| {
                let limits: Vec<_> = v.limits.iter().map(|(k, n)| json!([k, n])).collect();
                json!({
                    "name": v.name, "limits": limits,
                    "metadata": {"description": v.description, "tags": v.tags},
                })
            })
            .collect();
        let mut permissions = Vec::new();
        for (vhost, users) in &self.permissions {
            for (user, p) in users {
                permissions.push(json!({
                    "user": user, "vhost": vhost,
                    "configure": p.configure, "write": p.write, "read": p.read,
                }));
            }
        }
        let parameters: Vec<_> = self
            .vhosts
            .values()
            .filter(|v| !v.limits.is_empty())
            .map(|v| {
                json!({"component": "vhost-limits", "name": "limits", "vhost": v.name, "value": v.limits})
            })
            .collect();
        let policies = |set: &BTreeMap<String, BTreeMap<String, PolicyRecord>>| {
            let mut out = Vec::new();
            for (vhost, by_name) in set {
                for p in by_name.values() {
                    out.push(json!({
                        "vhost": vhost, "name": p.name, "pattern": p.pattern,
                        "apply-to": p.apply_to, "priority": p.priority,
                        "definition": p.definition,
                    }));
                }
            }
            out
        };
        json!({
            "users": users, "vhosts": vhosts, "permissions": permissions,
            "parameters": parameters, "policies": policies(&self.policies),
            "operator_policies": policies(&self.operator_policies),
        })
    }
}

fn set_limit(
    limits: &mut BTreeMap<String, i64>,
    name: &str,
    value: Option<i64>,
    known: &[&str],
) -> Result<(), AccessError> {
    if !known.contains(&name) {
        return Err(AccessError::invalid(
            "name",
            format!(
                "unknown limit '{}' (known: {})",
                crate::untrusted::text(name),
                known.join(", ")
            ),
        ));
    }
    match value {
        Some(v) => limits.insert(name.to_owned(), v),
        None => limits.remove(name),
    };
    Ok(())
}

/// What the running broker must do to go from `before` to `after`: new
/// vhosts made, gone ones deleted, the connections of a user deleted, or
/// of one whose permissions in a vhost were revoked or changed, closed
/// (RabbitMQ closes them on a deletion or revocation; a change closes
/// them too, so that narrower permissions hold at once, not at the next
/// login).
pub fn effects(before: &Directory, after: &Directory) -> Vec<Effect> {
    let mut out = Vec::new();
    for name in after.vhosts.keys() {
        if !before.vhosts.contains_key(name) {
            out.push(Effect::AddVHost(name.clone()));
        }
    }
    for name in before.vhosts.keys() {
        if !after.vhosts.contains_key(name) {
            out.push(Effect::DeleteVHost(name.clone()));
        }
    }
    for vhost in after.vhosts.keys() {
        if before.policies.get(vhost) != after.policies.get(vhost)
            || before.operator_policies.get(vhost) != after.operator_policies.get(vhost)
        {
            out.push(Effect::PoliciesChanged(vhost.clone()));
        }
    }
    for name in before.users.keys() {
        if !after.users.contains_key(name) {
            out.push(Effect::CloseUser {
                user: name.clone(),
                vhost: None,
                reason: format!("user '{name}' was deleted"),
            });
        }
    }
    for (vhost, users) in &before.permissions {
        if !after.vhosts.contains_key(vhost) {
            continue;
        }
        for (user, p) in users {
            if !after.users.contains_key(user) {
                continue;
            }
            let reason = match after.permissions_of(vhost, user) {
                None => format!("permissions of user '{user}' in vhost '{vhost}' were revoked"),
                Some(q) if q != p => {
                    format!("permissions of user '{user}' in vhost '{vhost}' were changed")
                }
                Some(_) => continue,
            };
            out.push(Effect::CloseUser {
                user: user.clone(),
                vhost: Some(vhost.clone()),
                reason,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admin_and_app() -> Directory {
        let mut d = Directory::default();
        let changes = [
            AccessChange::PutVHost {
                vhost: VHostRecord {
                    name: "/".into(),
                    ..Default::default()
                },
            },
            AccessChange::PutUser {
                user: UserRecord::with_password("root", "pw", vec![ADMINISTRATOR.into()]),
            },
            AccessChange::PutUser {
                user: UserRecord::with_password("app", "pw", vec![]),
            },
            AccessChange::PutPermissions {
                vhost: "/".into(),
                user: "app".into(),
                permissions: PermissionRecord::full(),
            },
        ];
        for c in &changes {
            d.apply(c).unwrap();
        }
        d
    }

    #[test]
    fn revoking_or_deleting_closes_what_it_must_and_nothing_else() {
        let mut d = admin_and_app();
        let narrower = PermissionRecord {
            read: "^app\\.".into(),
            ..PermissionRecord::full()
        };
        let put = AccessChange::PutPermissions {
            vhost: "/".into(),
            user: "app".into(),
            permissions: narrower.clone(),
        };
        let fx = d.apply(&put).unwrap();
        assert!(
            matches!(&fx[..], [Effect::CloseUser { user, vhost: Some(v), reason }]
            if user == "app" && v == "/" && reason.contains("changed"))
        );
        assert_eq!(
            d.apply(&put).unwrap(),
            vec![],
            "the same again changes nothing"
        );
        // A password change closes nothing (RabbitMQ neither).
        let fx = d
            .apply(&AccessChange::PutUser {
                user: UserRecord::with_password("app", "new", vec![]),
            })
            .unwrap();
        assert_eq!(fx, vec![]);
        let fx = d
            .apply(&AccessChange::DeleteUser { name: "app".into() })
            .unwrap();
        assert!(matches!(&fx[..], [Effect::CloseUser { user, vhost: None, .. }] if user == "app"));
        assert!(d.permissions_of("/", "app").is_none(), "its permissions go");
    }

    #[test]
    fn the_last_administrator_stays() {
        let mut d = admin_and_app();
        let before = d.clone();
        assert_eq!(
            d.apply(&AccessChange::DeleteUser {
                name: "root".into()
            }),
            Err(AccessError::LastAdministrator)
        );
        assert_eq!(
            d.apply(&AccessChange::PutUser {
                user: UserRecord::with_password("root", "pw", vec!["monitoring".into()]),
            }),
            Err(AccessError::LastAdministrator)
        );
        assert_eq!(d, before, "nothing half-applied");
        // With a second administrator the first may go.
        d.apply(&AccessChange::PutUser {
            user: UserRecord::with_password("ops", "pw", vec![ADMINISTRATOR.into()]),
        })
        .unwrap();
        d.apply(&AccessChange::DeleteUser {
            name: "root".into(),
        })
        .unwrap();
    }

    #[test]
    fn bad_input_names_the_field_and_changes_nothing() {
        let mut d = admin_and_app();
        let before = d.clone();
        let bad_regex = AccessChange::PutPermissions {
            vhost: "/".into(),
            user: "app".into(),
            permissions: PermissionRecord {
                write: "(".into(),
                ..PermissionRecord::full()
            },
        };
        let e = d.apply(&bad_regex).unwrap_err();
        assert!(
            matches!(&e, AccessError::Invalid { field, .. } if field == "write"),
            "{e}"
        );
        let mut import = Directory::default();
        import
            .users
            .insert("new".into(), UserRecord::with_password("new", "pw", vec![]));
        import
            .permissions
            .entry("nowhere".into())
            .or_default()
            .insert("new".into(), PermissionRecord::full());
        let e = d
            .apply(&AccessChange::Import { directory: import })
            .unwrap_err();
        assert!(e.to_string().contains("no vhost 'nowhere'"), "{e}");
        assert!(!d.users.contains_key("new"), "an import is all or nothing");
        let mut user = UserRecord::with_password("x", "pw", vec![]);
        user.hashing_algorithm = "rabbit_password_hashing_md5".into();
        let e = d.apply(&AccessChange::PutUser { user }).unwrap_err();
        assert!(matches!(&e, AccessError::Invalid { field, .. } if field == "password_hash"));
        assert_eq!(d, before);
    }

    #[test]
    fn a_rabbitmq_export_imports_and_its_users_keep_their_passwords() {
        let bytes = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/fixtures/rabbitmq-3.10.8-definitions.json"
        ))
        .unwrap();
        let doc = Directory::from_rabbitmq(&bytes).unwrap();
        let mut d = Directory::default();
        d.apply(&AccessChange::Import { directory: doc }).unwrap();
        assert!(d.users["alice"].password().unwrap().verify("wonder land"));
        assert!(d.users["bob"].password().unwrap().verify("b0b!"));
        assert_eq!(d.users["carol"].tags, ["monitoring", "management"]);
        assert!(d.users["guest"].loopback_only && !d.users["alice"].loopback_only);
        assert_eq!(
            d.permissions_of("orders", "bob").unwrap().write,
            "^(orders\\.|amq\\.default)$"
        );
        assert_eq!(d.vhosts["/"].description, "Default virtual host");
        // And back: the same document.
        let again = Directory::from_rabbitmq(d.to_rabbitmq().to_string().as_bytes()).unwrap();
        assert_eq!(again.users, d.users);
        assert_eq!(again.permissions, d.permissions);
        assert_eq!(again.vhosts, d.vhosts);
    }

    #[test]
    fn config_users_seed_once_or_stay_the_config_files() {
        let users: Vec<User> = toml::from_str::<toml::Table>(
            "[[users]]\nname = \"root\"\npassword = \"pw\"\ntags = [\"administrator\"]\nvhosts = [\"/\", \"prod\"]\n",
        )
        .unwrap()["users"]
            .clone()
            .try_into()
            .unwrap();
        let seed = Directory::from_config(&users, false);
        let mut d = Directory::default();
        let fx = d
            .apply(&AccessChange::Config {
                directory: seed.clone(),
                enforce: false,
            })
            .unwrap();
        assert_eq!(
            fx,
            vec![
                Effect::AddVHost("/".into()),
                Effect::AddVHost("prod".into())
            ]
        );
        d.apply(&AccessChange::PutUser {
            user: UserRecord::with_password("root", "changed", vec![ADMINISTRATOR.into()]),
        })
        .unwrap();
        // Seeding again (a restart) keeps the operator's change.
        d.apply(&AccessChange::Config {
            directory: seed.clone(),
            enforce: false,
        })
        .unwrap();
        assert!(d.users["root"].password().unwrap().verify("changed"));
        // Enforced, the config file wins and its users are not changeable.
        d.apply(&AccessChange::Config {
            directory: seed,
            enforce: true,
        })
        .unwrap();
        assert!(d.users["root"].password().unwrap().verify("pw"));
        let e = d
            .apply(&AccessChange::PutUser {
                user: UserRecord::with_password("root", "x", vec![ADMINISTRATOR.into()]),
            })
            .unwrap_err();
        assert_eq!(e, AccessError::FromConfig("root".into()));
    }
}
