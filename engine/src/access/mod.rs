//! Who may do what: users, their per-vhost permissions, and the checks.
//!
//! RabbitMQ's model, which its users already know: a user may open a vhost
//! only if it has permissions there, and those are three regular
//! expressions matched against resource names (exchanges and queues):
//!
//! * **configure**: declare and delete the resource;
//! * **write**: publish to an exchange, bind a queue or exchange *to* it as
//!   the destination, name it as a dead-letter or alternate exchange;
//! * **read**: consume from or get and purge a queue, bind *from* an
//!   exchange as the source.
//!
//! An empty pattern grants nothing; `.*` grants everything. The default
//! exchange is matched by the name `amq.default`, as in RabbitMQ. A refusal
//! is a channel error 403 ACCESS_REFUSED. Passive declares need no
//! permission.
//!
//! Users, vhosts and permissions change at run time, as with
//! `rabbitmqctl add_user` and `set_permissions`: the [`Directory`] is the
//! data and its changes, [`Accounts`] the live copy every login checks, and
//! passwords are kept only as RabbitMQ's salted hashes (`password`). The
//! config file's `[[users]]` are the initial state.
//!
//! Patterns are compiled when the directory changes (a bad one is refused
//! naming its field), and a user granted everything skips the matching:
//! the publish path of a user with `.*` pays one branch.

mod accounts;
pub mod directory;
pub mod password;

pub use accounts::{Accounts, ApplyError, Login};
pub use directory::{AccessChange, AccessError, Directory, Effect};

use regex::Regex;
use serde::{Deserialize, Deserializer};

/// A user allowed to connect.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct User {
    /// User name.
    pub name: String,
    /// Password (PLAIN and AMQPLAIN send it in clear: use TLS termination
    /// in front of the broker on untrusted networks).
    pub password: String,
    /// Virtual hosts the user may open with full permissions
    /// (configure, write and read `.*`).
    #[serde(default = "default_vhosts")]
    pub vhosts: Vec<String>,
    /// Finer permissions, per vhost (a vhost listed here and in `vhosts`
    /// gets these).
    #[serde(default)]
    pub permissions: Vec<VHostPermissions>,
    /// Accept this user only from loopback addresses (RabbitMQ's rule for
    /// `guest`).
    #[serde(default)]
    pub loopback_only: bool,
    /// Admin API roles: `administrator` (everything) or `monitoring` /
    /// `management` (read-only). Without one the user is AMQP-only.
    #[serde(default)]
    pub tags: Vec<String>,
}

fn default_vhosts() -> Vec<String> {
    vec!["/".into()]
}

impl User {
    /// RabbitMQ's default user: `guest`/`guest`, administrator, loopback
    /// only.
    pub fn guest() -> Self {
        User {
            name: "guest".into(),
            password: "guest".into(),
            vhosts: default_vhosts(),
            permissions: Vec::new(),
            loopback_only: true,
            tags: vec!["administrator".into()],
        }
    }
}

/// One `[[users.permissions]]` entry.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VHostPermissions {
    /// The vhost (created at start if missing).
    pub vhost: String,
    /// Resources the user may declare and delete.
    pub configure: Pattern,
    /// Resources the user may publish to or bind to.
    pub write: Pattern,
    /// Resources the user may consume from, get from, purge, or bind from.
    pub read: Pattern,
}

/// A permission pattern: a regular expression, unanchored like RabbitMQ's
/// (anchor it with `^...$`); empty grants nothing.
#[derive(Clone, Debug)]
pub struct Pattern(Option<Regex>);

impl Pattern {
    /// Compile `s` (empty: grants nothing). A pattern is an operator's
    /// input over the admin API: its compiled size is bounded.
    pub fn new(s: &str) -> Result<Self, regex::Error> {
        if s.is_empty() {
            Ok(Pattern(None))
        } else {
            regex::RegexBuilder::new(s)
                .size_limit(1 << 20)
                .build()
                .map(|r| Pattern(Some(r)))
        }
    }

    /// The pattern that grants nothing.
    pub fn nothing() -> Self {
        Pattern(None)
    }

    /// The pattern as written.
    pub fn source(&self) -> &str {
        self.0.as_ref().map_or("", Regex::as_str)
    }

    fn allows(&self, name: &str) -> bool {
        self.0.as_ref().is_some_and(|r| r.is_match(name))
    }
}

impl<'de> Deserialize<'de> for Pattern {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Pattern::new(&s).map_err(|e| serde::de::Error::custom(format!("bad pattern '{s}': {e}")))
    }
}

/// What is done to a resource.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Declare, delete.
    Configure,
    /// Publish to, bind to.
    Write,
    /// Consume, get, purge, bind from.
    Read,
}

impl Access {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Access::Configure => "configure",
            Access::Write => "write",
            Access::Read => "read",
        }
    }
}

/// The name permissions see: the default exchange (`""`) is
/// `amq.default`, as in RabbitMQ.
pub(crate) fn resource_name(name: &str) -> &str {
    if name.is_empty() { "amq.default" } else { name }
}

/// A user's permissions in the vhost of a connection.
#[derive(Clone, Debug)]
pub enum Permissions {
    /// Everything allowed (a vhost listed in `vhosts`): nothing to match.
    Full,
    /// RabbitMQ's three patterns.
    Patterns {
        /// Declare, delete.
        configure: Pattern,
        /// Publish to, bind to.
        write: Pattern,
        /// Consume, get, purge, bind from.
        read: Pattern,
    },
}

impl Permissions {
    /// Whether `access` to the resource named `name` is allowed.
    pub fn allows(&self, access: Access, name: &str) -> bool {
        let Permissions::Patterns {
            configure,
            write,
            read,
        } = self
        else {
            return true;
        };
        let pattern = match access {
            Access::Configure => configure,
            Access::Write => write,
            Access::Read => read,
        };
        pattern.allows(resource_name(name))
    }

    /// Whether every access is allowed everywhere (no check needed).
    pub fn is_full(&self) -> bool {
        matches!(self, Permissions::Full)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    fn user(toml_text: &str) -> User {
        toml::from_str(toml_text).unwrap()
    }

    #[test]
    fn guest_logs_in_from_loopback_only_and_passwords_must_match() {
        let accounts = Accounts::default();
        accounts
            .apply(&AccessChange::PutUser {
                user: directory::UserRecord::with_password("app", "pw", vec![]),
            })
            .unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let who = |name, password, peer| {
            accounts
                .authenticate(name, password, ip(peer))
                .map(|u| u.name)
        };
        for local in ["127.0.0.1", "127.0.0.2", "::1", "::ffff:127.0.0.1"] {
            assert_eq!(
                who("guest", "guest", local).as_deref(),
                Some("guest"),
                "{local}"
            );
        }
        for remote in ["192.0.2.7", "2001:db8::1", "::ffff:192.0.2.7"] {
            assert_eq!(who("guest", "guest", remote), None, "{remote}");
            assert_eq!(who("app", "pw", remote).as_deref(), Some("app"), "{remote}");
        }
        assert_eq!(who("guest", "wrong", "127.0.0.1"), None);
        assert_eq!(who("app", "guest", "127.0.0.1"), None);
        assert_eq!(who("nobody", "guest", "127.0.0.1"), None);
        // Full permissions are one branch; patterns are compiled once.
        assert!(accounts.permissions_in("guest", "/").unwrap().is_full());
        assert!(accounts.permissions_in("app", "/").is_none());
    }

    #[test]
    fn patterns_are_per_vhost_and_unanchored_like_rabbitmq() {
        let u = user(
            r#"
            name = "app"
            password = "p"
            vhosts = ["/"]
            [[permissions]]
            vhost = "orders"
            configure = "^orders\\."
            write = "^(orders\\.|amq\\.default$)"
            read = ""
            "#,
        );
        // As the config file's users are laid down at the first start.
        let accounts = Accounts::default();
        accounts.replace(Directory::from_config(&[u], false));
        let full = accounts.permissions_in("app", "/").unwrap();
        assert!(full.is_full() && full.allows(Access::Configure, "anything"));
        let p = accounts.permissions_in("app", "orders").unwrap();
        assert!(p.allows(Access::Configure, "orders.eu"));
        assert!(!p.allows(Access::Configure, "billing"));
        assert!(
            p.allows(Access::Write, ""),
            "the default exchange is amq.default"
        );
        assert!(!p.allows(Access::Read, "orders.eu"), "empty grants nothing");
        assert!(accounts.permissions_in("app", "billing").is_none());
        assert_eq!(
            accounts.directory().vhosts.keys().collect::<Vec<_>>(),
            ["/", "orders"]
        );
    }

    #[test]
    fn a_bad_pattern_is_a_config_error() {
        let e = toml::from_str::<User>(
            "name = \"a\"\npassword = \"p\"\n[[permissions]]\nvhost = \"/\"\nconfigure = \"(\"\nwrite = \"\"\nread = \"\"\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("bad pattern '('"), "{e}");
    }
}
