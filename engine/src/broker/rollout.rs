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
//! Each node swaps as it applies the activation, so for the moment between
//! two nodes applying the same entry, a message published on one may be
//! routed by the new version while one published on another is routed by
//! the old; on any one node a message is routed entirely by one version.

use std::sync::Arc;

use super::Broker;
use crate::cluster::{Catalog, Command};

/// A content hash as logs show it (as `PluginVersion::short_hash` does).
pub(super) fn short(hash: &str) -> &str {
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
        let Ok(entries) = std::fs::read_dir(&self.plugin_dir) else {
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
            // Entries replayed while the node starts are applied before the
            // broker holds its cluster node.
            let mut node = None;
            for _ in 0..600 {
                node = weak.upgrade().and_then(|b| b.cluster().cloned());
                if node.is_some() {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            let Some(node) = node else { return };
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
