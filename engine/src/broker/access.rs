//! Users, vhosts and permissions changed at run time, and what a change
//! does to the running broker.
//!
//! On a single node a change is applied to the node's [`Accounts`] (which
//! writes it to disk first); in a cluster it is proposed through the Raft
//! log and every node applies it as the entry commits, so every node gives
//! the same verdict and ends with the same users. Either way the broker
//! then does what the change implies: a new vhost is made, a deleted one
//! loses everything in it, and the connections of a user deleted or whose
//! permissions were revoked or changed are closed (320 CONNECTION_FORCED,
//! saying why).
//!
//! [`Accounts`]: crate::access::Accounts

use crate::access::{AccessChange, AccessError, ApplyError, Directory, Effect};
use crate::cluster::{Applied, Command};

use super::Broker;

/// Why an operator's change did not take effect.
#[derive(Debug, thiserror::Error)]
pub enum AccessChangeError {
    /// Refused (the same verdict on every node).
    #[error("{text}")]
    Refused {
        /// HTTP status: 400, 404 or 409.
        status: u16,
        /// Why.
        text: String,
    },
    /// Not applied: the store failed, or the cluster has no quorum.
    #[error("{0}")]
    Unavailable(String),
}

impl AccessChangeError {
    fn from_apply(e: ApplyError) -> Self {
        match e {
            ApplyError::Refused(e) => AccessChangeError::Refused {
                status: e.status(),
                text: e.to_string(),
            },
            ApplyError::Store(text) => AccessChangeError::Unavailable(text),
        }
    }
}

/// How an access change refused in the cluster's log reads: its HTTP
/// status travels as the code.
pub(crate) fn refused(e: &AccessError) -> Applied {
    Applied::Refused {
        code: e.status(),
        text: e.to_string(),
    }
}

impl Broker {
    /// `what` on the other nodes of the cluster, as they last reported it
    /// (0 on a node alone): what limits counted cluster-wide add to this
    /// node's own count.
    pub fn counted_elsewhere(&self, what: crate::cluster::presence::Count<'_>) -> u64 {
        self.cluster().map_or(0, |c| c.counted_elsewhere(what))
    }

    /// Report this node's connections to its peers whenever they change
    /// (after [`SETTLE`]) and every [`REFRESH`], until `stop`.
    ///
    /// [`SETTLE`]: crate::cluster::presence::SETTLE
    /// [`REFRESH`]: crate::cluster::presence::REFRESH
    pub async fn report_presence(
        self: std::sync::Arc<Self>,
        stop: tokio_util::sync::CancellationToken,
    ) {
        use crate::cluster::presence::{REFRESH, SETTLE};
        let Some(node) = self.cluster().cloned() else {
            return;
        };
        loop {
            tokio::select! {
                () = self.connections().changed() => tokio::time::sleep(SETTLE).await,
                () = tokio::time::sleep(REFRESH) => {}
                () = stop.cancelled() => return,
            }
            let presence = self.connections().presence(node.name());
            tokio::select! {
                () = node.report_presence(&presence) => {}
                () = stop.cancelled() => return,
            }
        }
    }

    /// Apply an operator's change of users, vhosts or permissions.
    pub async fn change_access(&self, change: AccessChange) -> Result<(), AccessChangeError> {
        let Some(node) = self.cluster() else {
            let effects = self
                .accounts()
                .apply(&change)
                .map_err(AccessChangeError::from_apply)?;
            self.access_effects(effects);
            return Ok(());
        };
        match node.propose(Command::Access { change }).await {
            Ok(Applied::Refused { code, text }) => {
                Err(AccessChangeError::Refused { status: code, text })
            }
            Ok(_) => Ok(()),
            Err(e) => Err(AccessChangeError::Unavailable(e.to_string())),
        }
    }

    /// A committed access change, applied to the cluster's copy of the
    /// directory: this node's live copy becomes it.
    pub(crate) fn apply_access(&self, directory: &Directory, effects: Vec<Effect>) {
        self.accounts().replace(directory.clone());
        self.access_effects(effects);
    }

    /// The cluster's directory as a snapshot has it. Until the cluster's
    /// first seed commits, this node keeps its own config file's users, so
    /// that clients can log in while the cluster forms. Vhosts are made,
    /// never deleted here: a snapshot deletes the definitions it lacks
    /// itself.
    pub(crate) fn reset_access(&self, directory: &Directory) {
        if !directory.seeded {
            return;
        }
        let before = self.accounts().directory();
        let effects = crate::access::directory::effects(&before, directory)
            .into_iter()
            .filter(|e| !matches!(e, Effect::DeleteVHost(_)))
            .collect();
        self.apply_access(directory, effects);
        for name in directory.vhosts.keys() {
            let _ = self.add_vhost(name);
        }
    }

    /// Propose the config file's users to the cluster until it takes them
    /// (the first node's seed wins; with `enforce` every node's start lays
    /// them over again).
    pub async fn seed_cluster_access(self: std::sync::Arc<Self>, config: Directory, enforce: bool) {
        let mut wait = std::time::Duration::from_millis(200);
        loop {
            let Some(node) = self.cluster().cloned() else {
                return;
            };
            let change = AccessChange::Config {
                directory: config.clone(),
                enforce,
            };
            match node.propose(Command::Access { change }).await {
                Ok(Applied::Refused { text, .. }) => {
                    tracing::error!("the cluster refused this node's config users: {text}");
                    return;
                }
                Ok(_) => return,
                Err(e) => {
                    tracing::debug!("proposing the config users failed, trying again: {e}");
                }
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(std::time::Duration::from_secs(5));
        }
    }

    /// Do what a change of the directory implies.
    pub(crate) fn access_effects(&self, effects: Vec<Effect>) {
        for effect in effects {
            match effect {
                Effect::AddVHost(name) => {
                    if let Err(e) = self.add_vhost(&name) {
                        tracing::error!(vhost = %crate::untrusted::text(&name), "creating a vhost: {e}");
                    }
                }
                Effect::DeleteVHost(name) => self.remove_vhost(&name),
                Effect::PoliciesChanged(vhost) => self.apply_policies(&vhost),
                Effect::CloseUser {
                    user,
                    vhost,
                    reason,
                } => {
                    for c in self.connections().list() {
                        if c.user == user && vhost.as_ref().is_none_or(|v| *v == c.vhost) {
                            c.close_because(reason.clone());
                        }
                    }
                }
            }
        }
    }

    /// Delete vhost `name`: its connections close, its queues (and their
    /// messages) and exchanges go. In a cluster the replicated queues and
    /// exchanges were deleted through the log first.
    pub(crate) fn remove_vhost(&self, name: &str) {
        let Some(vhost) = self.vhost(name) else {
            return;
        };
        for c in self.connections().list() {
            if c.vhost == name {
                c.close_because(format!("vhost '{name}' is deleted"));
            }
        }
        for q in vhost.queues() {
            if let Err(e) = self.delete_queue(&vhost, &q.name, false, false) {
                tracing::warn!(vhost = %crate::untrusted::text(name), queue = %crate::untrusted::text(&q.name), "deleting a queue of a deleted vhost: {e}");
            }
        }
        for x in vhost.exchanges() {
            if !x.name.is_empty() && !x.name.starts_with("amq.") {
                let _ = self.delete_exchange(&vhost, &x.name, false);
            }
        }
        for (q, _) in vhost.remote_queues() {
            vhost.set_remote(&q, None);
        }
        self.vhosts.write().remove(name);
        tracing::info!(vhost = %crate::untrusted::text(name), "vhost deleted");
    }

    /// Lay the config file's users over the kept ones at start (once, or
    /// at every start with `enforce`), and make every vhost the directory
    /// names.
    pub fn seed_access(&self, config: Directory, enforce: bool) -> Result<(), ApplyError> {
        let effects = self.accounts().apply(&AccessChange::Config {
            directory: config,
            enforce,
        })?;
        self.access_effects(effects);
        for name in self.accounts().directory().vhosts.keys() {
            if let Err(e) = self.add_vhost(name) {
                tracing::error!(vhost = %crate::untrusted::text(name), "creating a vhost: {e}");
            }
        }
        Ok(())
    }
}
