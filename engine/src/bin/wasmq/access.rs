//! `wasmq users`, `wasmq vhosts`, `wasmq permissions`: what operators do
//! with `rabbitmqctl add_user`, `add_vhost` and `set_permissions`, through
//! a running broker's admin API.

use clap::Subcommand;
use serde_json::{Value, json};
use wasmq::admin::client::segment;

use crate::AdminArgs;

#[derive(Subcommand)]
pub enum UsersCommand {
    /// List users and their tags.
    List(AdminArgs),
    /// Create a user, or replace one's password and tags.
    Add {
        #[command(flatten)]
        admin: AdminArgs,
        /// User name.
        name: String,
        /// Its password; read from stdin when left out (a password on the
        /// command line shows in the process list).
        #[arg(value_name = "PASSWORD")]
        new_password: Option<String>,
        /// Tags, comma-separated (administrator, monitoring, management,
        /// impersonator).
        #[arg(long, default_value = "")]
        tags: String,
    },
    /// Change a user's password (tags kept).
    ChangePassword {
        #[command(flatten)]
        admin: AdminArgs,
        /// User name.
        name: String,
        /// The new password; read from stdin when left out.
        #[arg(value_name = "PASSWORD")]
        new_password: Option<String>,
    },
    /// Set a user's tags (password kept).
    SetTags {
        #[command(flatten)]
        admin: AdminArgs,
        /// User name.
        name: String,
        /// The tags (none: no tags).
        tags: Vec<String>,
    },
    /// Delete a user: its connections are closed.
    Delete {
        #[command(flatten)]
        admin: AdminArgs,
        /// User name.
        name: String,
    },
    /// Set a user's limit (max-connections, max-channels); a negative
    /// value is no limit.
    SetLimit(SetLimit),
    /// Clear a user's limit.
    ClearLimit(ClearLimit),
}

/// `set-limit NAME LIMIT VALUE` of a user or a vhost.
#[derive(clap::Args)]
pub struct SetLimit {
    #[command(flatten)]
    admin: AdminArgs,
    /// The user or vhost.
    name: String,
    /// max-connections, max-channels (users) or max-queues (vhosts).
    limit: String,
    /// The limit.
    #[arg(allow_negative_numbers = true)]
    value: i64,
}

/// `clear-limit NAME LIMIT` of a user or a vhost.
#[derive(clap::Args)]
pub struct ClearLimit {
    #[command(flatten)]
    admin: AdminArgs,
    /// The user or vhost.
    name: String,
    /// The limit.
    limit: String,
}

/// Set (`Some`) or clear a limit at `base` (`/api/user-limits` or
/// `/api/vhost-limits`).
fn limit(
    base: &str,
    admin: &AdminArgs,
    name: &str,
    limit: &str,
    value: Option<i64>,
) -> anyhow::Result<()> {
    let path = format!("{base}/{}/{}", segment(name), segment(limit));
    match value {
        Some(v) => {
            admin.client()?.put(&path, &json!({"value": v}))?;
            println!("{limit} of {name}: {v}");
        }
        None => {
            admin.client()?.delete(&path)?;
            println!("{limit} of {name} cleared");
        }
    }
    Ok(())
}

#[derive(Subcommand)]
pub enum VhostsCommand {
    /// List vhosts.
    List(AdminArgs),
    /// Create a vhost.
    Add {
        #[command(flatten)]
        admin: AdminArgs,
        /// Vhost name.
        name: String,
        /// What it is for.
        #[arg(long, default_value = "")]
        description: String,
    },
    /// Delete a vhost with everything in it: its queues and their
    /// messages, exchanges, permissions; its connections are closed.
    Delete {
        #[command(flatten)]
        admin: AdminArgs,
        /// Vhost name.
        name: String,
    },
    /// Set a vhost's limit (max-connections, max-queues); a negative value
    /// is no limit.
    SetLimit(SetLimit),
    /// Clear a vhost's limit.
    ClearLimit(ClearLimit),
}

#[derive(Subcommand)]
pub enum PermissionsCommand {
    /// List permissions (of the vhost given with --vhost, or all with --all).
    List {
        #[command(flatten)]
        admin: AdminArgs,
        /// Every vhost's.
        #[arg(long)]
        all: bool,
    },
    /// Set USER's permissions in the vhost (--vhost, default "/"): three
    /// regular expressions on resource names, as RabbitMQ's.
    Set {
        #[command(flatten)]
        admin: AdminArgs,
        /// User name.
        #[arg(value_name = "USER")]
        username: String,
        /// Resources it may declare and delete.
        configure: String,
        /// Resources it may publish to and bind to.
        write: String,
        /// Resources it may consume from, get from, purge and bind from.
        read: String,
    },
    /// Revoke USER's permissions in the vhost: its connections there close.
    Clear {
        #[command(flatten)]
        admin: AdminArgs,
        /// User name.
        #[arg(value_name = "USER")]
        username: String,
    },
}

#[derive(Subcommand)]
pub enum PoliciesCommand {
    /// List the policies of the vhost (--vhost), or of all with --all.
    List {
        #[command(flatten)]
        admin: AdminArgs,
        /// Every vhost's.
        #[arg(long)]
        all: bool,
        /// Operator policies instead.
        #[arg(long)]
        operator: bool,
    },
    /// Set policy NAME in the vhost (--vhost): queues and exchanges whose
    /// names match PATTERN take DEFINITION (JSON), existing ones at once.
    Set {
        #[command(flatten)]
        admin: AdminArgs,
        /// Policy name.
        name: String,
        /// A regular expression on queue and exchange names.
        pattern: String,
        /// The keys, as JSON: '{"max-length": 1000, "dead-letter-exchange": "dlx"}'.
        definition: String,
        /// The highest priority of the matching policies applies.
        #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
        priority: i64,
        /// queues, classic_queues, quorum_queues, exchanges or all.
        #[arg(long, default_value = "all")]
        apply_to: String,
        /// An operator policy (caps what applications may set).
        #[arg(long)]
        operator: bool,
    },
    /// Delete policy NAME of the vhost.
    Clear {
        #[command(flatten)]
        admin: AdminArgs,
        /// Policy name.
        name: String,
        /// An operator policy.
        #[arg(long)]
        operator: bool,
    },
}

fn policies_path(operator: bool) -> &'static str {
    if operator {
        "/api/operator-policies"
    } else {
        "/api/policies"
    }
}

pub fn policies(command: PoliciesCommand) -> anyhow::Result<()> {
    match command {
        PoliciesCommand::List {
            admin,
            all,
            operator,
        } => {
            let base = policies_path(operator);
            let path = if all {
                base.to_owned()
            } else {
                format!("{base}/{}", segment(&admin.vhost))
            };
            let list = admin.client()?.get(&path)?;
            println!(
                "{:<16} {:<24} {:<24} {:<14} {:>8}  definition",
                "vhost", "name", "pattern", "apply-to", "priority"
            );
            for p in list.as_array().into_iter().flatten() {
                let f = |k: &str| p[k].as_str().unwrap_or("").to_owned();
                println!(
                    "{:<16} {:<24} {:<24} {:<14} {:>8}  {}",
                    f("vhost"),
                    f("name"),
                    f("pattern"),
                    f("apply-to"),
                    p["priority"].as_i64().unwrap_or(0),
                    p["definition"]
                );
            }
        }
        PoliciesCommand::Set {
            admin,
            name,
            pattern,
            definition,
            priority,
            apply_to,
            operator,
        } => {
            let definition: Value = serde_json::from_str(&definition)
                .map_err(|e| anyhow::anyhow!("DEFINITION is not JSON: {e}"))?;
            let path = format!(
                "{}/{}/{}",
                policies_path(operator),
                segment(&admin.vhost),
                segment(&name)
            );
            admin.client()?.put(
                &path,
                &json!({"pattern": pattern, "definition": definition,
                        "priority": priority, "apply-to": apply_to}),
            )?;
            println!("policy {name} set in vhost {}", admin.vhost);
        }
        PoliciesCommand::Clear {
            admin,
            name,
            operator,
        } => {
            let path = format!(
                "{}/{}/{}",
                policies_path(operator),
                segment(&admin.vhost),
                segment(&name)
            );
            admin.client()?.delete(&path)?;
            println!("policy {name} cleared in vhost {}", admin.vhost);
        }
    }
    Ok(())
}

fn password_or_stdin(password: Option<String>) -> anyhow::Result<String> {
    if let Some(p) = password {
        return Ok(p);
    }
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    Ok(line.trim_end_matches(['\r', '\n']).to_owned())
}

fn tags_of(user: &Value) -> String {
    match &user["tags"] {
        Value::Array(tags) => tags
            .iter()
            .filter_map(Value::as_str)
            .collect::<Vec<_>>()
            .join(","),
        Value::String(s) => s.clone(),
        _ => String::new(),
    }
}

pub fn users(command: UsersCommand) -> anyhow::Result<()> {
    match command {
        UsersCommand::List(a) => {
            let users = a.client()?.get("/api/users")?;
            println!("{:<32} tags", "name");
            for u in users.as_array().into_iter().flatten() {
                println!("{:<32} {}", u["name"].as_str().unwrap_or(""), tags_of(u));
            }
        }
        UsersCommand::Add {
            admin,
            name,
            new_password,
            tags,
        } => {
            let password = password_or_stdin(new_password)?;
            let status = admin.client()?.put(
                &format!("/api/users/{}", segment(&name)),
                &json!({"password": password, "tags": tags}),
            )?;
            println!(
                "{} user {name}",
                if status == 201 { "added" } else { "replaced" }
            );
        }
        UsersCommand::ChangePassword {
            admin,
            name,
            new_password,
        } => {
            let password = password_or_stdin(new_password)?;
            let client = admin.client()?;
            let path = format!("/api/users/{}", segment(&name));
            let user = client.get(&path)?;
            client.put(&path, &json!({"password": password, "tags": user["tags"]}))?;
            println!("password of user {name} changed");
        }
        UsersCommand::SetTags { admin, name, tags } => {
            let client = admin.client()?;
            let path = format!("/api/users/{}", segment(&name));
            client.get(&path)?;
            // Without a password, the user's is kept.
            client.put(&path, &json!({"tags": tags}))?;
            println!("tags of user {name}: {}", tags.join(","));
        }
        UsersCommand::Delete { admin, name } => {
            admin
                .client()?
                .delete(&format!("/api/users/{}", segment(&name)))?;
            println!("deleted user {name}");
        }
        UsersCommand::SetLimit(a) => limit(
            "/api/user-limits",
            &a.admin,
            &a.name,
            &a.limit,
            Some(a.value),
        )?,
        UsersCommand::ClearLimit(a) => {
            limit("/api/user-limits", &a.admin, &a.name, &a.limit, None)?
        }
    }
    Ok(())
}

pub fn vhosts(command: VhostsCommand) -> anyhow::Result<()> {
    match command {
        VhostsCommand::List(a) => {
            let vhosts = a.client()?.get("/api/vhosts")?;
            println!("{:<32} {:>10}  description", "name", "messages");
            for v in vhosts.as_array().into_iter().flatten() {
                println!(
                    "{:<32} {:>10}  {}",
                    v["name"].as_str().unwrap_or(""),
                    v["messages"].as_u64().unwrap_or(0),
                    v["description"].as_str().unwrap_or("")
                );
            }
        }
        VhostsCommand::Add {
            admin,
            name,
            description,
        } => {
            admin.client()?.put(
                &format!("/api/vhosts/{}", segment(&name)),
                &json!({"description": description}),
            )?;
            println!("added vhost {name}");
        }
        VhostsCommand::Delete { admin, name } => {
            admin
                .client()?
                .delete(&format!("/api/vhosts/{}", segment(&name)))?;
            println!("deleted vhost {name}");
        }
        VhostsCommand::SetLimit(a) => limit(
            "/api/vhost-limits",
            &a.admin,
            &a.name,
            &a.limit,
            Some(a.value),
        )?,
        VhostsCommand::ClearLimit(a) => {
            limit("/api/vhost-limits", &a.admin, &a.name, &a.limit, None)?
        }
    }
    Ok(())
}

pub fn permissions(command: PermissionsCommand) -> anyhow::Result<()> {
    match command {
        PermissionsCommand::List { admin, all } => {
            let path = if all {
                "/api/permissions".to_owned()
            } else {
                format!("/api/vhosts/{}/permissions", segment(&admin.vhost))
            };
            let list = admin.client()?.get(&path)?;
            println!(
                "{:<20} {:<24} {:<20} {:<20} read",
                "vhost", "user", "configure", "write"
            );
            for p in list.as_array().into_iter().flatten() {
                let f = |k: &str| p[k].as_str().unwrap_or("").to_owned();
                println!(
                    "{:<20} {:<24} {:<20} {:<20} {}",
                    f("vhost"),
                    f("user"),
                    f("configure"),
                    f("write"),
                    f("read")
                );
            }
        }
        PermissionsCommand::Set {
            admin,
            username: user,
            configure,
            write,
            read,
        } => {
            admin.client()?.put(
                &format!(
                    "/api/permissions/{}/{}",
                    segment(&admin.vhost),
                    segment(&user)
                ),
                &json!({"configure": configure, "write": write, "read": read}),
            )?;
            println!("permissions of {user} in vhost {} set", admin.vhost);
        }
        PermissionsCommand::Clear {
            admin,
            username: user,
        } => {
            admin.client()?.delete(&format!(
                "/api/permissions/{}/{}",
                segment(&admin.vhost),
                segment(&user)
            ))?;
            println!("permissions of {user} in vhost {} revoked", admin.vhost);
        }
    }
    Ok(())
}
