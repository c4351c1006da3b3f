//! Loading plugin files and swapping new versions into running exchanges.
//!
//! A swap is all-or-nothing across the broker: the new version is compiled
//! and validated first (off the publish path), then for every exchange and
//! binding that uses the plugin a replacement is built and its bindings are
//! replayed into it, and only if every one succeeds are they all stored.
//! Publishers never wait: each message loads one router snapshot, so it is
//! routed entirely by the old version or entirely by the new one. If any
//! use refuses the new version, nothing changes and the file is rejected.
//!
//! With a tiered plugin host a version first serves on baseline code; once
//! its optimized code is compiled (on a thread of its own) the same swap
//! runs again with the same version, so every instance is rebuilt on the
//! optimized code. That second swap changes no decision, and is skipped if
//! another version has replaced this one meanwhile.

use std::path::Path;
use std::sync::Arc;

use super::Broker;
use super::exchange::{Binding, BindingTable, Exchange};
use crate::plugin::{
    FilterPlugin, PluginError, PluginVersion, PluginWatcher, RouterPlugin, TransformPlugin,
};

/// A version's role handles for every use of its plugin in one exchange:
/// built (instances made, bindings replayed) but not stored yet. A swap
/// stores them as the serving handles; a staged rollout beside them, as
/// candidates (`author/candidate/lifecycle.rs`).
pub(crate) struct Handles {
    /// The exchange's router, if the plugin is its type.
    pub router: Option<RouterPlugin>,
    /// The exchange's transform, if the plugin is it.
    pub transform: Option<TransformPlugin>,
    /// A filter for each binding the plugin filters, by binding id.
    pub filters: Vec<(u32, FilterPlugin)>,
}

impl Handles {
    /// `table` with each filtered binding rebuilt by `place` around its new
    /// filter (`None`: the plugin filters no binding here).
    pub fn bindings(
        &mut self,
        table: &BindingTable,
        place: impl Fn(Binding, Arc<FilterPlugin>) -> Binding,
    ) -> Option<BindingTable> {
        if self.filters.is_empty() {
            return None;
        }
        let mut next = table.clone();
        for (id, filter) in self.filters.drain(..) {
            if let Some(b) = table.get(id) {
                next = next.replaced(place((**b).clone(), Arc::new(filter)));
            }
        }
        Some(next)
    }
}

impl Broker {
    /// Load every `.wasm` in the plugin folder (at start). Files that fail
    /// validation are logged and skipped. Returns how many were loaded.
    pub fn load_plugin_dir(&self) -> usize {
        let Ok(entries) = std::fs::read_dir(&self.plugin_dir) else {
            tracing::warn!(dir = %self.plugin_dir.display(), "plugin folder cannot be read; only built-in plugins are available");
            return 0;
        };
        let mut paths: Vec<_> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "wasm"))
            .collect();
        paths.sort();
        paths
            .iter()
            .filter(|p| self.load_plugin_file(p).is_ok())
            .count()
    }

    /// React to a change of `path` in the plugin folder: load it, or keep
    /// the last good version serving if it was deleted.
    pub fn plugin_file_changed(&self, path: &Path) {
        if path.exists() && self.cluster().is_some() {
            // In a cluster a version serves only once every node took it.
            match std::fs::read(path) {
                Ok(bytes) => self.offer_plugin(&crate::plugin::plugin_name(path), bytes),
                Err(e) => tracing::error!("plugin file {} cannot be read: {e}", path.display()),
            }
            return;
        }
        if path.exists() {
            let _ = self.load_plugin_file(path);
            return;
        }
        let name = crate::plugin::plugin_name(path);
        match self.registry.orphan(&name) {
            Some(v) if !v.builtin => tracing::warn!(
                plugin = %name, version = %v.short_hash(),
                "plugin file {} was deleted; its last good version keeps serving until a new file is added",
                path.display()
            ),
            _ => {}
        }
    }

    /// Validate the plugin at `path` and swap it in. Errors are logged and
    /// recorded in the registry (state `rejected`) and returned.
    pub fn load_plugin_file(&self, path: &Path) -> Result<Arc<PluginVersion>, String> {
        let name = crate::plugin::plugin_name(path);
        match std::fs::read(path) {
            Ok(bytes) => self.install_plugin(&name, &bytes),
            Err(e) => {
                let reason = format!("plugin file {} cannot be read: {e}", path.display());
                tracing::error!(plugin = %name, "{reason}");
                self.registry.reject(&name, reason.clone());
                Err(reason)
            }
        }
    }

    /// Write `bytes` into the plugin folder as `name.wasm`, synced and
    /// renamed into place, so the watcher (and a restart) never sees it
    /// half-written.
    pub fn write_plugin_file(&self, name: &str, bytes: &[u8]) -> std::io::Result<()> {
        use std::io::Write;
        let tmp = self.plugin_dir.join(format!(".{name}.wasm.upload"));
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, self.plugin_dir.join(format!("{name}.wasm")))
    }

    /// Validate `bytes` as plugin `name` and swap it in everywhere it is
    /// used. On any failure the previous version keeps serving.
    pub fn install_plugin(&self, name: &str, bytes: &[u8]) -> Result<Arc<PluginVersion>, String> {
        if let Some(current) = self.registry.get(name)
            && !current.builtin
            && current.hash == crate::plugin::content_hash(bytes)
        {
            return Ok(current);
        }
        let started = std::time::Instant::now();
        if let Some(reason) =
            self.builtin_override_refused(name, &crate::plugin::content_hash(bytes))
        {
            tracing::error!(plugin = %name, "plugin refused, the built-in keeps serving: {reason}");
            self.registry.reject(name, reason.clone());
            return Err(reason);
        }
        let result = self
            .host
            .load(name, bytes, false)
            .map_err(|e| e.to_string())
            .and_then(|v| self.swap_in(&v).map(|()| v));
        match result {
            Ok(v) => {
                self.keep_plugin(&v, bytes);
                tracing::info!(
                    plugin = %name, version = %v.short_hash(), roles = %v.roles, bytes = v.size,
                    code = v.code_tier(),
                    elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
                    "plugin version serving"
                );
                self.optimize_later(&v, bytes);
                Ok(v)
            }
            Err(reason) => {
                tracing::error!(plugin = %name, "plugin rejected, previous version keeps serving: {reason}");
                self.registry.reject(name, reason.clone());
                Err(reason)
            }
        }
    }

    /// Keep `version`'s bytes in the store as its plugin's last good
    /// version (without a store, nothing outlives the process anyway).
    fn keep_plugin(&self, version: &PluginVersion, bytes: &[u8]) {
        if let Some(store) = self.store()
            && let Err(e) = store.keep_plugin(&version.name, &version.hash, bytes)
        {
            tracing::warn!(plugin = %version.name, "keeping the plugin's last good version failed: {e}");
        }
    }

    /// Keep the plugins loaded before the store was attached (the plugin
    /// folder is read first, since recovery needs the exchange types), and
    /// bring back, from what was kept, the last good version of every
    /// plugin in `needed` whose file is gone.
    pub(crate) fn recover_plugins(&self, needed: &[String]) {
        let Some(store) = self.store() else { return };
        for status in self.registry.list() {
            let Some(v) = self.registry.get(&status.name).filter(|v| !v.builtin) else {
                continue;
            };
            let path = self.plugin_dir.join(format!("{}.wasm", v.name));
            match std::fs::read(&path) {
                Ok(bytes) if crate::plugin::content_hash(&bytes) == v.hash => {
                    self.keep_plugin(&v, &bytes)
                }
                _ => {}
            }
        }
        for name in needed {
            if self.registry.get(name).is_some() {
                continue;
            }
            let Some((hash, bytes)) = store.kept_plugin(name) else {
                continue;
            };
            match self.host.load(name, &bytes, false) {
                Ok(v) => {
                    tracing::warn!(
                        plugin = %name, version = %v.short_hash(),
                        "plugin file {}.wasm is gone from {}; a durable exchange uses it, so its last good version (kept in the data folder) serves until a new file is added",
                        name, self.plugin_dir.display()
                    );
                    self.registry.serve(v.clone());
                    self.registry.orphan(name);
                    self.optimize_later(&v, &bytes);
                }
                Err(e) => {
                    tracing::error!(plugin = %name, kept = %hash, "the kept version of the plugin no longer loads: {e}")
                }
            }
        }
    }

    /// If `version` runs baseline code: compile its optimized code on a
    /// thread of its own, then rebuild its instances on it, if it still
    /// serves.
    pub(crate) fn optimize_later(&self, version: &Arc<PluginVersion>, bytes: &[u8]) {
        if version.optimized() {
            return;
        }
        let (broker, host) = (self.self_ref.clone(), self.host.clone());
        let (version, bytes) = (version.clone(), bytes.to_vec());
        let name = version.name.clone();
        let spawned = std::thread::Builder::new()
            .name("wasmq-optimize".into())
            .spawn(move || {
                let started = std::time::Instant::now();
                let compiled = host.optimize(&version, &bytes);
                let Some(broker) = broker.upgrade() else {
                    return;
                };
                let name = &version.name;
                let result = compiled.map_err(|e| e.to_string()).and_then(|()| {
                    let _serial = broker.swapping.lock();
                    match broker.registry.get(name) {
                        Some(v) if Arc::ptr_eq(&v, &version) => broker.swap_locked(&version),
                        _ => Ok(()), // replaced meanwhile: nothing to rebuild
                    }
                });
                match result {
                    Ok(()) => tracing::info!(
                        plugin = %name, version = %version.short_hash(),
                        elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
                        "plugin version optimized"
                    ),
                    // Not a rejection: the version keeps serving, on the
                    // code it has.
                    Err(e) => tracing::warn!(
                        plugin = %name, version = %version.short_hash(),
                        "optimizing the plugin failed; it keeps its current code: {e}"
                    ),
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(plugin = %name, "no thread to optimize the plugin: {e}");
        }
    }

    fn swap_in(&self, version: &Arc<PluginVersion>) -> Result<(), String> {
        let _serial = self.swapping.lock();
        self.swap_locked(version)
    }

    /// The exchanges that use plugin `name` (as type, transform or a
    /// binding's filter), sorted by vhost and name: the order their control
    /// locks are taken in.
    pub(crate) fn users_of(&self, name: &str) -> Vec<(String, Arc<Exchange>)> {
        let mut users = Vec::new();
        for vhost in self.vhosts() {
            for x in vhost.exchanges() {
                let uses = Self::routes_with(&x, name)
                    || x.transforms_with(name)
                    || x.bindings
                        .load()
                        .iter()
                        .any(|b| b.filter_name.as_deref() == Some(name));
                if uses {
                    users.push((vhost.name.clone(), x));
                }
            }
        }
        users.sort_by(|a, b| (&a.0, &a.1.name).cmp(&(&b.0, &b.1.name)));
        users
    }

    /// Whether `x`'s router is plugin `name`. The predeclared exchanges
    /// keep the shipped built-in as their router; a filter or transform on
    /// them is swapped like any other.
    pub(crate) fn routes_with(x: &Exchange, name: &str) -> bool {
        x.router_kind() == name && !Self::is_predeclared(&x.name)
    }

    /// Build `version`'s handles for its plugin's uses in `x`, whose
    /// bindings are `table`.
    pub(crate) fn handles_for(
        &self,
        version: &Arc<PluginVersion>,
        x: &Exchange,
        table: &BindingTable,
    ) -> Result<Handles, PluginError> {
        let name = version.name.as_str();
        let router = match Self::routes_with(x, name) {
            true => Some(RouterPlugin::new(
                &self.host,
                version,
                &x.name,
                &x.encoded_arguments,
                table,
            )?),
            false => None,
        };
        let transform = match x.transforms_with(name) {
            true => Some(TransformPlugin::new(
                &self.host,
                version,
                &x.name,
                &x.encoded_arguments,
            )?),
            false => None,
        };
        let mut filters = Vec::new();
        for b in table.iter() {
            if b.filter_name.as_deref() == Some(name) {
                let f =
                    FilterPlugin::new(&self.host, version, &x.name, &b.key, &b.encoded_arguments)?;
                filters.push((b.id, f));
            }
        }
        Ok(Handles {
            router,
            transform,
            filters,
        })
    }

    /// [`Broker::swap_in`], with `swapping` held by the caller.
    fn swap_locked(&self, version: &Arc<PluginVersion>) -> Result<(), String> {
        let _swap = self.swap.write();
        let users = self.users_of(&version.name);
        // Hold every affected exchange's control lock from prepare to commit,
        // so no binding change slips in between.
        let _controls: Vec<_> = users.iter().map(|(_, x)| x.control.lock()).collect();
        let mut prepared = Vec::with_capacity(users.len());
        for (vhost, x) in &users {
            let table = x.bindings.load_full();
            let handles = self
                .handles_for(version, x, &table)
                .map_err(|e| format!("exchange '{}' in vhost '{vhost}': {e}", x.name))?;
            prepared.push((x, table, handles));
        }
        for (x, table, mut handles) in prepared {
            let filtered = handles.bindings(&table, |b, filter| Binding {
                filter: Some(filter),
                ..b
            });
            if let Some(b) = filtered {
                x.bindings.store(Arc::new(b));
            }
            if let Some(t) = handles.transform {
                x.transform.store(Some(Arc::new(t)));
            }
            if let Some(r) = handles.router {
                x.router.store(Arc::new(r));
                x.reset_memo();
            }
        }
        self.registry.serve(version.clone());
        Ok(())
    }

    /// Watch the plugin folder and hot-swap changed files.
    pub fn watch_plugins(self: &Arc<Self>) -> notify::Result<PluginWatcher> {
        let broker = Arc::downgrade(self);
        PluginWatcher::start(&self.plugin_dir, move |path| {
            if let Some(b) = broker.upgrade() {
                b.plugin_file_changed(path);
            }
        })
    }
}
