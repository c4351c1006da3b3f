//! Plugin versions in a cluster: the same bytes everywhere, served only
//! once every node has compiled and validated them.
//!
//! A plugin file that appears in a node's folder is not swapped in there;
//! it is proposed to the cluster ([`Command::StagePlugin`], bytes and all,
//! so a node that never saw the file gets it from the log). Every node
//! compiles and validates the staged version off the apply path and
//! proposes its verdict. The state machine activates the version at the
//! log index where the last voter's "ready" is applied, so every node
//! swaps it in at the same point of the definitions' history; one refusal
//! and it activates nowhere, and `wasmq plugins` shows which node refused
//! and why. Kept versions can be activated again by an operator
//! (rollback). A node that joins later gets the active versions from the
//! snapshot or the log, before the exchanges that need them.
//!
//! A staged rollout (a shadow or a canary, `candidate/`) is agreed the same
//! way: staging it is a log entry ([`Command::StageCandidate`]) that every
//! node applies by putting the candidate beside its serving version, so a
//! canary's share (a stable hash of the routing key) is the same on every
//! node. Each node judges the trial on its own traffic; the first to see a
//! bound passed, or enough messages decided, proposes the end
//! ([`Command::EndCandidate`]), and every node rolls back or promotes as it
//! applies it: a rollback everywhere if one node's traffic shows a fault,
//! a promotion as an activation at that log index. A node that cannot
//! stage a candidate proposes its abort, with the reason.
//!
//! Each node swaps as it applies the activation, so for the moment between
//! two nodes applying the same entry, a message published on one may be
//! routed by the new version while one published on another is routed by
//! the old; on any one node a message is routed entirely by one version.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use crate::author::candidate::{Event, Mode, Policy, RolloutError, Trial};
use crate::broker::Broker;
use crate::cluster::{Applied, CandidateRecord, Catalog, ClusterNode, Command};

/// The broker's cluster node once it holds one: entries replayed while
/// the node starts are applied before it does.
async fn joined(broker: &Weak<Broker>) -> Option<Arc<ClusterNode>> {
    for _ in 0..600 {
        if let Some(node) = broker.upgrade().and_then(|b| b.cluster().cloned()) {
            return Some(node);
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    None
}

/// A content hash as logs show it (as `PluginVersion::short_hash` does).
pub(crate) fn short(hash: &str) -> &str {
    &hash[..hash.len().min(12)]
}

impl Broker {
    /// A plugin file appeared or changed in this node's folder: propose it
    /// to the cluster (unless the cluster serves exactly it already).
    pub(crate) fn offer_plugin(&self, name: &str, bytes: Vec<u8>) {
        let Some(node) = self.cluster().cloned() else {
            return;
        };
        let hash = crate::plugin::content_hash(&bytes);
        let active = node
            .catalog()
            .plugins
            .get(name)
            .and_then(|r| r.active.clone());
        if active.as_deref() == Some(hash.as_str()) {
            return;
        }
        let (name, me) = (name.to_owned(), node.name().to_owned());
        tracing::info!(plugin = %name, version = %short(&hash), "plugin version proposed to the cluster");
        let runner = node.clone();
        runner.spawn(async move {
            let command = Command::StagePlugin {
                name: name.clone(),
                hash,
                bytes,
                from: me,
            };
            if let Err(e) = node.propose(command).await {
                tracing::error!(plugin = %name, "proposing the plugin version to the cluster failed: {e}");
            }
        });
    }

    /// Once this node has joined: propose the plugin files in its folder
    /// that the cluster has never seen (a version it knows, older or
    /// refused, is not proposed again by a restart; drop the file in again
    /// to re-activate one).
    pub(crate) async fn offer_plugin_dir(self: Arc<Self>) {
        let Some(node) = self.cluster().cloned() else {
            return;
        };
        while !node.until_ready(std::time::Duration::from_secs(3600)).await {}
        let catalog = node.catalog();
        let Ok(entries) = std::fs::read_dir(self.plugin_dir()) else {
            return;
        };
        for path in entries.filter_map(|e| e.ok().map(|e| e.path())) {
            if path.extension().is_none_or(|e| e != "wasm") {
                continue;
            }
            let name = crate::plugin::plugin_name(&path);
            let Ok(bytes) = std::fs::read(&path) else {
                continue;
            };
            let hash = crate::plugin::content_hash(&bytes);
            let known = catalog
                .plugins
                .get(&name)
                .is_some_and(|r| r.versions.iter().any(|v| v.hash == hash));
            if !known {
                self.offer_plugin(&name, bytes);
            }
        }
    }

    /// Compile and validate a staged version (on a blocking thread: this
    /// is called while applying the log) and propose this node's verdict.
    pub(crate) fn validate_staged(&self, name: &str, hash: &str, bytes: &[u8], me: &str) {
        let weak = self.self_ref.clone();
        let (name, hash, bytes, me) = (
            name.to_owned(),
            hash.to_owned(),
            bytes.to_vec(),
            me.to_owned(),
        );
        tokio::spawn(async move {
            let Some(node) = joined(&weak).await else {
                return;
            };
            let (n, h) = (name.clone(), hash.clone());
            let refused = tokio::task::spawn_blocking(move || {
                let broker = weak.upgrade()?;
                if let Some(reason) = broker.builtin_override_refused(&n, &h) {
                    return Some(reason);
                }
                match broker.host.load(&n, &bytes, false) {
                    Ok(_) => None,
                    Err(e) => Some(e.to_string()),
                }
            })
            .await
            .unwrap_or_else(|e| Some(format!("validation panicked: {e}")));
            match &refused {
                None => {
                    tracing::info!(plugin = %name, version = %short(&hash), "plugin version validated; ready")
                }
                Some(why) => {
                    tracing::error!(plugin = %name, version = %short(&hash), "plugin version refused on this node: {why}")
                }
            }
            let verdict = Command::PluginVerdict {
                name: name.clone(),
                hash,
                node: me,
                refused,
            };
            if let Err(e) = node.propose(verdict).await {
                tracing::error!(plugin = %name, "reporting the plugin verdict to the cluster failed: {e}");
            }
        });
    }

    /// Serve a version the cluster activated.
    pub(crate) fn activate_plugin(&self, name: &str, hash: &str, bytes: &[u8]) {
        if self
            .registry
            .get(name)
            .is_some_and(|v| !v.builtin && v.hash == hash)
        {
            return;
        }
        match self.install_plugin(name, bytes) {
            Ok(_) => {
                tracing::info!(plugin = %name, version = %short(hash), "plugin version activated by the cluster")
            }
            Err(e) => tracing::error!(
                plugin = %name, version = %short(hash),
                "the cluster activated a plugin version this node cannot serve; the previous version keeps serving here: {e}"
            ),
        }
    }

    /// Serve the active versions of a catalog (a snapshot installed, or
    /// read at start).
    pub(crate) fn serve_cluster_plugins(&self, catalog: &Catalog) {
        for (name, record) in &catalog.plugins {
            let Some(active) = &record.active else {
                continue;
            };
            if let Some(v) = record.versions.iter().find(|v| &v.hash == active) {
                self.activate_plugin(name, active, &v.bytes);
            }
        }
    }
}

impl Broker {
    /// End `trial` as the judge decided. Alone: at once. In a cluster: by
    /// proposing the end, which every node carries out as it applies it
    /// (a trial that passed a bound already decides nothing here).
    pub(crate) fn conclude(&self, trial: &Arc<Trial>, event: Event, reason: Option<String>) {
        let Some(node) = self.cluster().cloned() else {
            self.end_trial(trial, event, reason);
            return;
        };
        if trial.proposed.swap(true, Ordering::AcqRel) {
            return;
        }
        let me = node.name().to_owned();
        let reason = Some(match reason {
            Some(r) => format!("on node {me}: {r}"),
            None => format!("judged on node {me}"),
        });
        let command = Command::EndCandidate {
            name: trial.plugin.clone(),
            hash: trial.version.hash.clone(),
            event,
            reason,
            node: me,
        };
        let (trial, runner) = (trial.clone(), node.clone());
        runner.spawn(async move {
            if let Err(e) = node.propose(command).await {
                tracing::warn!(plugin = %trial.plugin, "proposing the candidate's end failed; the judge tries again: {e}");
                trial.proposed.store(false, Ordering::Release);
            }
        });
    }

    /// The log staged a candidate: put it beside the serving version here
    /// (or, if this node cannot, propose its abort with the reason).
    pub(crate) fn stage_from_log(&self, c: &CandidateRecord, me: &str) {
        let result = self
            .host
            .load(&c.name, &c.bytes, false)
            .map_err(|e| RolloutError::Refused(e.to_string()))
            .and_then(|v| self.start_trial(v, &c.bytes, c.mode.clone(), c.policy.clone()));
        let e = match result {
            Ok(_) => {
                tracing::info!(plugin = %c.name, version = %short(&c.hash), from = %c.from, "candidate staged by the cluster");
                return;
            }
            Err(e) => e,
        };
        tracing::error!(plugin = %c.name, version = %short(&c.hash), "this node cannot stage the cluster's candidate; proposing its abort: {e}");
        let command = Command::EndCandidate {
            name: c.name.clone(),
            hash: c.hash.clone(),
            event: Event::Aborted,
            reason: Some(format!("node {me} could not stage it: {e}")),
            node: me.to_owned(),
        };
        let weak = self.self_ref.clone();
        tokio::spawn(async move {
            if let Some(node) = joined(&weak).await
                && let Err(e) = node.propose(command).await
            {
                tracing::error!("proposing the candidate's abort failed: {e}");
            }
        });
    }

    /// The log ended candidate `hash` of `name`: end it here, and serve it
    /// if it was promoted.
    pub(crate) fn end_from_log(
        &self,
        name: &str,
        hash: &str,
        event: &Event,
        reason: Option<String>,
        promoted: Option<&[u8]>,
    ) {
        if let Some(t) = self.candidates().get(name)
            && t.version.hash == hash
        {
            self.end_trial(&t, event.clone(), reason);
        }
        if let Some(bytes) = promoted {
            self.activate_plugin(name, hash, bytes);
        }
    }

    /// Another version of `name` activated: a candidate tried beside the
    /// version it replaced ends (the log has dropped it too).
    pub(crate) fn end_replaced_candidate(&self, name: &str, hash: &str) {
        if let Some(t) = self.candidates().get(name)
            && t.version.hash != hash
        {
            let reason = format!("version {} activated by the cluster", short(hash));
            self.end_trial(&t, Event::Aborted, Some(reason));
        }
    }

    /// Make the trials here those of `catalog` (a snapshot installed).
    pub(crate) fn sync_cluster_candidates(&self, catalog: &Catalog, me: &str) {
        let staged = |name: &str| catalog.plugins.get(name).and_then(|r| r.candidate.as_ref());
        for t in self.candidates().all() {
            if staged(&t.plugin).is_none_or(|c| c.hash != t.version.hash) {
                self.end_trial(&t, Event::Aborted, Some("not staged in the cluster".into()));
            }
        }
        for c in catalog
            .plugins
            .values()
            .filter_map(|r| r.candidate.as_ref())
        {
            if self
                .candidates()
                .get(&c.name)
                .is_none_or(|t| t.version.hash != c.hash)
            {
                self.stage_from_log(c, me);
            }
        }
    }

    fn node_or_clustered(&self) -> Result<Arc<ClusterNode>, RolloutError> {
        self.cluster().cloned().ok_or(RolloutError::Clustered)
    }

    /// Stage `bytes` as `name`'s candidate on every node: checked here
    /// first (a file this node refuses never reaches the log), then staged
    /// by the log. Returns this node's trial.
    pub async fn stage_candidate_agreed(
        self: &Arc<Self>,
        name: &str,
        bytes: Vec<u8>,
        mode: Mode,
        policy: Policy,
    ) -> Result<Arc<Trial>, RolloutError> {
        let node = self.node_or_clustered()?;
        let (b, n, checked, m, p) = (
            self.clone(),
            name.to_owned(),
            bytes.clone(),
            mode.clone(),
            policy.clone(),
        );
        let hash = tokio::task::spawn_blocking(move || {
            b.check_candidate(&n, &checked, &m, &p)
                .map(|v| v.hash.clone())
        })
        .await
        .map_err(|e| RolloutError::Refused(format!("checking the candidate panicked: {e}")))??;
        let command = Command::StageCandidate {
            name: name.to_owned(),
            hash: hash.clone(),
            bytes,
            mode,
            policy,
            from: node.name().to_owned(),
        };
        match node.propose(command).await {
            Err(e) => Err(RolloutError::NoQuorum(e.to_string())),
            Ok(Applied::Refused { code: 404, .. }) => Err(RolloutError::NotServing(name.into())),
            Ok(Applied::Refused { text, .. }) => Err(RolloutError::Refused(text)),
            Ok(_) => self
                .candidates()
                .get(name)
                .filter(|t| t.version.hash == hash)
                .ok_or_else(|| {
                    RolloutError::Refused(
                        "the cluster staged it, but this node could not (its log says why)".into(),
                    )
                }),
        }
    }

    /// Promote or abort `name`'s candidate on every node.
    pub async fn end_candidate_agreed(&self, name: &str, event: Event) -> Result<(), RolloutError> {
        let node = self.node_or_clustered()?;
        let hash = match self.candidates().get(name) {
            Some(t) => t.version.hash.clone(),
            None => node
                .catalog()
                .plugins
                .get(name)
                .and_then(|r| r.candidate.as_ref().map(|c| c.hash.clone()))
                .ok_or_else(|| RolloutError::NoCandidate(name.to_owned()))?,
        };
        let me = node.name().to_owned();
        let command = Command::EndCandidate {
            name: name.to_owned(),
            hash,
            event,
            reason: Some(format!("asked by an operator on node {me}")),
            node: me,
        };
        match node.propose(command).await {
            Err(e) => Err(RolloutError::NoQuorum(e.to_string())),
            Ok(Applied::Refused { .. }) => Err(RolloutError::NoCandidate(name.to_owned())),
            Ok(_) => Ok(()),
        }
    }

    /// Serve a kept version of `name` on every node again: `hash` (a prefix
    /// is enough), or the newest kept one that is not serving.
    pub async fn rollback_agreed(
        &self,
        name: &str,
        hash: Option<&str>,
    ) -> Result<String, RolloutError> {
        let node = self.node_or_clustered()?;
        let not_kept = || RolloutError::NotKept {
            plugin: name.to_owned(),
            hash: hash.unwrap_or("previous").to_owned(),
        };
        let catalog = node.catalog();
        let record = catalog
            .plugins
            .get(name)
            .ok_or_else(|| RolloutError::NotServing(name.to_owned()))?;
        let chosen = match hash {
            Some(h) => record.versions.iter().find(|v| v.hash.starts_with(h)),
            None => record.versions.iter().rev().find(|v| {
                record.active.as_deref() != Some(v.hash.as_str()) && v.refused.is_empty()
            }),
        }
        .ok_or_else(not_kept)?
        .hash
        .clone();
        let command = Command::ActivatePlugin {
            name: name.to_owned(),
            hash: chosen.clone(),
        };
        match node.propose(command).await {
            Err(e) => Err(RolloutError::NoQuorum(e.to_string())),
            Ok(Applied::Refused { code: 404, .. }) => Err(not_kept()),
            Ok(Applied::Refused { text, .. }) => Err(RolloutError::Refused(text)),
            Ok(_) => Ok(chosen),
        }
    }
}
