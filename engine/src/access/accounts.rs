//! The live access directory: what a login and an admin request check
//! against, changed at run time.
//!
//! A login reads one immutable snapshot (an `ArcSwap` load): users' hashes
//! parsed and permissions compiled when the directory changes, never per
//! login or per message. A connection keeps the [`Permissions`] it logged
//! in with; a change that revokes or alters them closes it instead of
//! reaching into its checks, so the publish path keeps its single branch
//! for a user granted everything.
//!
//! On a single node every change is written to `access.json` in the data
//! folder before it takes effect; in a cluster the Raft log is the record
//! and every node replaces its snapshot as entries apply.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;
use parking_lot::Mutex;

use super::directory::{AccessChange, AccessError, Directory, Effect, UserRecord};
use super::password::PasswordHash;
use super::{Pattern, Permissions, User};
use crate::policy::{Applied, PolicySet, Target};

/// A logged-in user, as the AMQP handshake and the admin API see it.
#[derive(Clone, Debug)]
pub struct Login {
    /// Name.
    pub name: String,
    /// Tags.
    pub tags: Vec<String>,
    /// The vhosts it has permissions in.
    pub vhosts: Vec<String>,
}

impl Login {
    /// Whether the user has `tag`.
    pub fn has_tag(&self, tag: &str) -> bool {
        self.tags.iter().any(|t| t == tag)
    }
}

/// One directory, with hashes parsed and patterns compiled.
#[derive(Default)]
struct Compiled {
    directory: Directory,
    passwords: HashMap<String, PasswordHash>,
    /// By user, then vhost.
    grants: HashMap<String, HashMap<String, Arc<Permissions>>>,
    /// By vhost: its policies and its operator policies, compiled.
    policies: HashMap<String, (PolicySet, PolicySet)>,
}

impl Compiled {
    fn new(directory: Directory) -> Compiled {
        let passwords = directory
            .users
            .values()
            .map(|u| {
                // Checked when the change was applied; a hash that no
                // longer parses admits nobody.
                (
                    u.name.clone(),
                    u.password().unwrap_or_else(|_| PasswordHash::none()),
                )
            })
            .collect();
        let mut grants: HashMap<String, HashMap<String, Arc<Permissions>>> = HashMap::new();
        for (vhost, users) in &directory.permissions {
            for (user, p) in users {
                let compiled = if [&p.configure, &p.write, &p.read]
                    .iter()
                    .all(|s| s.as_str() == ".*")
                {
                    // `.*` matches every name: nothing to match per use.
                    Permissions::Full
                } else {
                    let pattern = |s: &str| Pattern::new(s).unwrap_or(Pattern::nothing());
                    Permissions::Patterns {
                        configure: pattern(&p.configure),
                        write: pattern(&p.write),
                        read: pattern(&p.read),
                    }
                };
                grants
                    .entry(user.clone())
                    .or_default()
                    .insert(vhost.clone(), Arc::new(compiled));
            }
        }
        let mut policies: HashMap<String, (PolicySet, PolicySet)> = HashMap::new();
        let vhosts = directory
            .policies
            .keys()
            .chain(directory.operator_policies.keys());
        for vhost in vhosts {
            if policies.contains_key(vhost) {
                continue;
            }
            let set = |m: &std::collections::BTreeMap<
                String,
                std::collections::BTreeMap<String, crate::policy::PolicyRecord>,
            >| {
                PolicySet::new(m.get(vhost).into_iter().flat_map(|p| p.values()))
            };
            policies.insert(
                vhost.clone(),
                (set(&directory.policies), set(&directory.operator_policies)),
            );
        }
        Compiled {
            directory,
            passwords,
            grants,
            policies,
        }
    }

    fn login(&self, user: &UserRecord) -> Login {
        let mut vhosts: Vec<String> = self
            .grants
            .get(&user.name)
            .map(|g| g.keys().cloned().collect())
            .unwrap_or_default();
        vhosts.sort();
        Login {
            name: user.name.clone(),
            tags: user.tags.clone(),
            vhosts,
        }
    }
}

/// The broker's users, vhosts and permissions.
pub struct Accounts {
    live: ArcSwap<Compiled>,
    /// Where a single node keeps them (none: in memory, or in a cluster's
    /// log).
    file: Mutex<Option<PathBuf>>,
}

impl Default for Accounts {
    /// RabbitMQ's default: `guest`/`guest`, administrator, loopback only,
    /// with every permission in `/`.
    fn default() -> Self {
        let accounts = Accounts {
            live: ArcSwap::from_pointee(Compiled::default()),
            file: Mutex::new(None),
        };
        accounts.replace(Directory::from_config(&[User::guest()], false));
        accounts
    }
}

impl std::fmt::Debug for Accounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Accounts").finish_non_exhaustive()
    }
}

impl Accounts {
    /// The user `name` if `password` is its password and it may connect
    /// from `peer` (AMQP logins and the admin API's basic auth alike).
    pub fn authenticate(&self, name: &str, password: &str, peer: IpAddr) -> Option<Login> {
        let live = self.live.load();
        let user = live.directory.users.get(name)?;
        let hash = live.passwords.get(name)?;
        if !hash.verify(password) || !may_connect_from(user, peer) {
            return None;
        }
        Some(live.login(user))
    }

    /// The user `name` (a client certificate's CN, already verified
    /// against the configured CA) if it may connect from `peer`. Its
    /// password is not asked: the certificate is the credential.
    pub fn certificate_user(&self, name: &str, peer: IpAddr) -> Option<Login> {
        let live = self.live.load();
        let user = live.directory.users.get(name)?;
        may_connect_from(user, peer).then(|| live.login(user))
    }

    /// Whether the user exists.
    pub fn exists(&self, name: &str) -> bool {
        self.live.load().directory.users.contains_key(name)
    }

    /// The user's permissions in `vhost`, `None` if it may not open it.
    pub fn permissions_in(&self, user: &str, vhost: &str) -> Option<Arc<Permissions>> {
        self.live.load().grants.get(user)?.get(vhost).cloned()
    }

    /// A vhost's limit `name` (`max-connections`, `max-queues`), if it has
    /// one (a negative value is none, as in RabbitMQ).
    pub fn vhost_limit(&self, vhost: &str, name: &str) -> Option<u64> {
        let live = self.live.load();
        let v = *live.directory.vhosts.get(vhost)?.limits.get(name)?;
        u64::try_from(v).ok()
    }

    /// A user's limit `name` (`max-connections`, `max-channels`), if it has
    /// one.
    pub fn user_limit(&self, user: &str, name: &str) -> Option<u64> {
        let live = self.live.load();
        let v = *live.directory.users.get(user)?.limits.get(name)?;
        u64::try_from(v).ok()
    }

    /// What the policies of `vhost` make of its queue or exchange `name`.
    pub fn policies_for(&self, vhost: &str, name: &str, target: Target) -> Applied {
        let live = self.live.load();
        let Some((policies, operator)) = live.policies.get(vhost) else {
            return Applied::default();
        };
        let operator = match target {
            Target::Exchange => None,
            _ => operator.matching(name, target),
        };
        Applied::of(policies.matching(name, target), operator)
    }

    /// A copy of the directory.
    pub fn directory(&self) -> Directory {
        self.live.load().directory.clone()
    }

    /// Keep the directory in `path` (a single node with a store): what is
    /// there is loaded, and every change is written there first. A missing
    /// file is an empty, unseeded directory.
    pub fn open(&self, path: PathBuf) -> Result<(), String> {
        let directory = Directory::read(&path)?.unwrap_or_default();
        self.replace(directory);
        *self.file.lock() = Some(path);
        Ok(())
    }

    /// Replace the whole directory (a cluster's snapshot, a file read).
    pub fn replace(&self, directory: Directory) {
        self.live.store(Arc::new(Compiled::new(directory)));
    }

    /// Apply `change`: checked whole, written to the file (if kept in
    /// one), then live. Returns what the broker must do.
    pub fn apply(&self, change: &AccessChange) -> Result<Vec<Effect>, ApplyError> {
        // One change at a time: two writers must not both start from the
        // same directory and lose one another's change.
        let file = self.file.lock();
        let mut directory = self.live.load().directory.clone();
        let effects = directory.apply(change).map_err(ApplyError::Refused)?;
        if let Some(path) = file.as_ref() {
            let bytes = serde_json::to_vec_pretty(&directory).expect("directory serializes");
            crate::store::definitions::replace_file(path, &bytes)
                .map_err(|e| ApplyError::Store(e.to_string()))?;
        }
        self.replace(directory);
        Ok(effects)
    }
}

/// Why a change did not take effect.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The change itself was refused.
    #[error(transparent)]
    Refused(#[from] AccessError),
    /// Writing it down failed (nothing changed).
    #[error("writing the access directory failed: {0}")]
    Store(String),
}

impl ApplyError {
    /// The HTTP status it answers with.
    pub fn status(&self) -> u16 {
        match self {
            ApplyError::Refused(e) => e.status(),
            ApplyError::Store(_) => 500,
        }
    }
}

/// Whether `user` may log in from `peer`: anywhere, or only from a
/// loopback address (an IPv4 client of a dual-stack listener shows as
/// `::ffff:127.0.0.1`, which is loopback too).
fn may_connect_from(user: &UserRecord, peer: IpAddr) -> bool {
    !user.loopback_only || peer.to_canonical().is_loopback()
}
